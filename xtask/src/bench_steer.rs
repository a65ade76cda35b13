//! `cargo xtask bench-steer`: what SYN steering does for the requests a black-holed
//! (`--fault black-hole`, the default) or refusing (`--fault refused`) backend would
//! stall or fail, against the same bed with steering off; and what the steering programs
//! cost every packet when nothing fails (`--fault none`), with the translation table
//! empty (the gate closed) or holding `--idle-flows` entries of flows that are not this
//! traffic's (the gate open: every packet is looked up).
//!
//! The bed, fresh for every run, so that each run starts with the black hole never seen
//! (new namespace, veth, backends, agent, pins and cgroup): a network namespace of the
//! task's own behind one veth pair (root end 10.233.0.1/24), and on its end the two
//! backends of one service, both in the node's locality:
//! - `a`, 10.233.0.2:8080, a black hole: a listener with `listen(0)` whose accept queue
//!   one connection already fills, so the kernel drops every SYN to it, unanswered (as
//!   `tests/e2e/steering.rs` makes it); with `--fault refused`, nothing listens there, so
//!   the namespace's kernel answers every SYN with a reset (a backend whose process
//!   died); with `--fault none`, a second HTTP backend like b;
//! - `b`, 10.233.0.3:8080, the test bed's HTTP backend, which answers its name.
//!
//! `--idle-flows N` (steering on only) puts N entries in each translation map before the
//! load, as `sock_ops` would for N steered flows, and adds N to the gate's insert count:
//! flows between addresses of 10.234.0.0/16 that no packet of the load matches, so the
//! load runs with the gate open and pays the lookups of a table of that size.
//!
//! The agent runs in the root namespace, attached to its bed's cgroup, with
//! `outlierDetection: {consecutiveErrors: 5, interval: 10s, baseEjectionTime: 30s,
//! handshakeTimeout: 100ms}` (`--handshake-timeout`) and no active checks; in mode `steer` with `--steer-devices
//! <the veth's root end>` (the tc program translates a steered flow's packets both ways
//! on that one device), in mode `off` with `--steer-devices none`.
//!
//! The load is `bench-failover`'s client (the hidden `failover-client`, this binary
//! re-executed in the agent's cgroup): `--rate` new connections per second to the VIP for
//! `--duration`, each carrying one `GET /` and closed after the answer; an open loop (a
//! pool of `--in-flight` threads takes each request when it is due, so a stalled
//! handshake holds back no other request; the run fails if the pool ever ran dry). Its
//! timeout (`--timeout`, 5 s, for the connect and then the answer) is far above the
//! handshake timeout, so that a failure is the agent's or the kernel's doing, not the
//! client's. Every request is recorded with its start, its latency and its outcome (the
//! backend that answered, or how it failed).
//!
//! The modes alternate run by run (off, steer, off, steer, ...). Reported per mode,
//! medians over its runs: requests, failures (and their kinds over all runs), requests
//! delayed by a stalled handshake (latency above 50 ms), latency over all requests (to
//! the answer or the failure) and over the delayed ones, and the agent's
//! `detour_steer_*` counters; in notes, what `detour events` reported (by kind and
//! backend) and the backends' namespace's TCP counters (`nstat`: SYNs the full accept
//! queue dropped, resets that half-open connections received), which tell a stall on
//! the black hole from one on `b`. Kept in `target/bench-steer/` for a closer look: every
//! request of every run (`requests-runN-MODE.tsv`), the agent's events and log, the
//! per-run figures (`runs.json`) and the report, under the fault's name
//! (`target/bench-steer/black-hole/`, `.../refused/`, `.../none/`; with `--idle-flows N`,
//! `.../none-idle-flows-N/`).
//!
//! The agent measured is a release build of the work tree, or `--agent-binary`.
//!
//! Invariants:
//! - traffic stays on loopback (the VIP 127.205.0.1) and inside the task's namespace
//!   (10.233.0.0/24); steering is attached to that veth's root end only;
//! - every resource of a run (event stream, client, agent, pins, cgroup, backends, veth,
//!   namespace) is a guard owned by the run and dropped in that order, on error too; the
//!   agent is attached to its bed's cgroup, never the machine's root cgroup;
//! - every wait is bounded: the client's requests and its process, the agent's
//!   readiness, the task's budget.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use detour_testbed::{mono_ns, Agent, AgentBed, BlackHole, HttpBackend, LineStream, Netns, Veth};

use crate::bench::{load_average, metric_sum, AgentPrograms, RunTime};
use crate::failover::{
    count_summary, fmt_ms, latency_of, median, nanos, ClientRun, Latency, Request, CLIENT_LEAD,
};
use crate::{cmd, parse_duration, setup};

const SERVICE: &str = "steer";
const VIP_IP: &str = "127.205.0.1";
const VIP: &str = "127.205.0.1:80";
const LOCALITY: &str = "us-east1/us-east1-b";
/// The veth's root end, and the namespace end's two addresses: the black hole's and b's.
const HOST_CIDR: &str = "10.233.0.1/24";
const HOLE_CIDR: &str = "10.233.0.2/24";
const B_CIDR: &str = "10.233.0.3/24";
const HOLE: &str = "10.233.0.2:8080";
const B: &str = "10.233.0.3:8080";
/// What b answers (its name).
const B_NAME: &str = "b";
/// A request slower than this was held up by a stalled handshake: on this bed every
/// other request takes well under a millisecond, a stall at least the handshake timeout.
const DELAYED_NS: u64 = 50_000_000;
/// How the agent names the pinned links of the steering programs.
const STEER_LINKS: &str = "detour_steer-";
/// How long the agent gets to answer and to put both backends in the table.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
pub struct SteerArgs {
    /// Runs per mode, interleaved (off, steer, off, ...); every figure is the median over
    /// a mode's runs.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// New connections per second, open loop: each is sent when due, whether earlier ones
    /// have ended or not.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Load per run.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    duration: Duration,
    /// Per-request timeout (the connect, then the answer): far above the handshake
    /// timeout, so that failures are the agent's or the kernel's, not the client's.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Client threads: how many requests can be in flight at once (a run peaks at about
    /// 70 here: the stalled handshakes).
    #[arg(long, default_value_t = 256)]
    in_flight: u32,
    /// A `detour` binary to measure instead of a release build of the work tree.
    #[arg(long)]
    agent_binary: Option<PathBuf>,
    /// What is wrong with backend `a`.
    #[arg(long, value_enum, default_value_t = Fault::BlackHole)]
    fault: Fault,
    /// Entries of flows no packet of the load belongs to, put in the translation table
    /// before the load when steering is on (at most the agent's `--max-steered-flows`,
    /// 16,384 by default): the gate is open and every packet pays the lookups.
    #[arg(long, default_value_t = 0)]
    idle_flows: u32,
    /// The service's `outlierDetection.handshakeTimeout`: how long a SYN may go
    /// unanswered before the handshake is steered.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    handshake_timeout: Duration,
    /// Threads that spin on the CPU through each run's load (a loaded node): with
    /// `--fault none`, every steering is a false one (a healthy backend's handshake that
    /// took longer than the handshake timeout).
    #[arg(long, default_value_t = 0)]
    cpu_hogs: u32,
}

/// What is wrong with backend `a`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Its SYNs go unanswered (a full accept queue drops them).
    BlackHole,
    /// Nothing listens: its SYNs are answered with a reset.
    Refused,
    /// Nothing: `a` answers like b (what the programs cost when nothing fails).
    None,
}

impl Fault {
    fn as_str(self) -> &'static str {
        match self {
            Self::BlackHole => "black-hole",
            Self::Refused => "refused",
            Self::None => "none",
        }
    }

    /// What `a` is, in the report's words.
    fn describe(self) -> &'static str {
        match self {
            Self::BlackHole => "a black-holed backend",
            Self::Refused => "a refusing backend (nothing listens: every SYN gets a reset)",
            Self::None => "two healthy backends (no fault)",
        }
    }
}

/// Steering on or off, the one difference between the runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Off,
    Steer,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Steer => "steer",
        }
    }

    /// Steering off or on.
    fn label(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Steer => "on",
        }
    }

    /// Run `run` (0-based) of the interleaved sequence: off first.
    fn of_run(run: u32) -> Self {
        if run.is_multiple_of(2) {
            Self::Off
        } else {
            Self::Steer
        }
    }
}

// ---------------------------------------------------------------------------------------
// The bed

/// One run's bed. Field order is drop order: the agent bed (agent, pins, cgroup with the
/// client, temp dir), the backends, the veth, the namespace.
struct Bed {
    node: AgentBed,
    _b: HttpBackend,
    /// `a` when it is a black hole; nothing when it refuses.
    _hole: Option<BlackHole>,
    /// `a` when nothing is wrong with it.
    _a: Option<HttpBackend>,
    veth: Veth,
    ns: Netns,
}

impl Bed {
    /// The namespace, the backends and the agent's bed, the agent not yet started.
    fn new(binary: &Path, fault: Fault, handshake_timeout: Duration) -> Result<Self> {
        let ns = Netns::new()?;
        let veth = ns.veth(HOST_CIDR, HOLE_CIDR)?;
        ns.ip(&["addr", "add", B_CIDR, "dev", veth.peer_name()])?;
        let hole = match fault {
            Fault::BlackHole => Some(BlackHole::start_in(&ns, HOLE.parse()?)?),
            Fault::Refused | Fault::None => None,
        };
        let a = match fault {
            Fault::None => Some(HttpBackend::start_in(&ns, "a", HOLE.parse()?)?),
            Fault::BlackHole | Fault::Refused => None,
        };
        let b = HttpBackend::start_in(&ns, B_NAME, B.parse()?)?;
        let node = AgentBed::new(binary)?;
        node.write_config(&config(handshake_timeout))?;
        Ok(Self {
            node,
            _b: b,
            _hole: hole,
            _a: a,
            veth,
            ns,
        })
    }

    /// Starts the agent in `mode` and waits until both backends are in the table.
    fn start_agent(&mut self, mode: Mode) -> Result<()> {
        let devices = match mode {
            Mode::Off => "none",
            Mode::Steer => self.veth.host_name(),
        };
        self.node
            .start_agent(&["--steer-devices", devices], READY_TIMEOUT)?;
        let agent = self.agent();
        agent
            .wait_endpoints(SERVICE, READY_TIMEOUT, |eps| {
                eps.as_array()
                    .is_some_and(|a| a.len() == 2 && a.iter().all(|e| e["in_table"] == true))
            })
            .map_err(|e| e.context(format!("both backends in the table{}", agent.log_tail())))?;
        // Steering is what the mode says, or the run would measure the other mode: on,
        // the program is attached to the veth (both directions) and the counters are
        // there; off, it is attached nowhere.
        let log = self.node.log();
        let attached: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("SYN steering attached"))
            .collect();
        let counters = steer_counters(&agent.metrics()?);
        let as_said = match mode {
            Mode::Off => attached.is_empty(),
            Mode::Steer => {
                counters.is_some()
                    && !attached.is_empty()
                    && attached.iter().all(|l| l.contains(devices))
            }
        };
        ensure!(
            as_said,
            "mode {}: steering attached {attached:#?}, counters {counters:?}{}",
            mode.as_str(),
            agent.log_tail()
        );
        Ok(())
    }

    fn agent(&self) -> &Agent {
        self.node.agent.as_ref().expect("started")
    }
}

/// The agent's config: the VIP, `a` and b in the node's locality, no active
/// checks (only what the kernel sees of real connects counts).
fn config(handshake_timeout: Duration) -> String {
    let host = |s: &'static str| s.split_once(':').map_or(s, |(h, _)| h);
    format!(
        "node: {{ locality: {LOCALITY} }}\n\
         services:\n\
         \x20 - name: {SERVICE}\n\
         \x20   vips: [{VIP_IP}]\n\
         \x20   ports: [{{number: 80, name: http, targetPort: 8080}}]\n\
         \x20   healthCheck: {{disabled: true}}\n\
         \x20   outlierDetection: {{consecutiveErrors: 5, interval: 10s, baseEjectionTime: 30s, handshakeTimeout: {handshake_ms}ms}}\n\
         \x20   endpoints:\n\
         \x20     - {{address: {a}, locality: {LOCALITY}}}\n\
         \x20     - {{address: {b}, locality: {LOCALITY}}}\n",
        a = host(HOLE),
        b = host(B),
        handshake_ms = handshake_timeout.as_millis(),
    )
}

/// The agent's steering counters; `None` when it has none (steering off).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SteerCounters {
    steered: u64,
    no_candidate: u64,
    table_full: u64,
    unseen: u64,
    late_dropped: u64,
    refusals_held: u64,
}

fn steer_counters(metrics: &str) -> Option<SteerCounters> {
    let get = |name: &str| metric_sum(metrics, &format!("detour_steer_{name}_total"));
    Some(SteerCounters {
        steered: get("steered")?,
        no_candidate: get("no_candidate")?,
        table_full: get("table_full")?,
        unseen: get("unseen")?,
        late_dropped: get("late_dropped")?,
        // Absent from an agent older than refusal holding (`--agent-binary`).
        refusals_held: get("refusals_held").unwrap_or(0),
    })
}

// ---------------------------------------------------------------------------------------
// One run

/// One run's figures.
#[derive(Debug, Default, Clone)]
struct RunFigures {
    requests: usize,
    failed: usize,
    /// `phase:kind` → count.
    failure_kinds: BTreeMap<String, usize>,
    /// The answering backend → count.
    answered_by: BTreeMap<String, usize>,
    /// Requests slower than [`DELAYED_NS`], and how many of them were answered.
    delayed: usize,
    delayed_answered: usize,
    /// When the first and the last delayed request that was answered started, ms into
    /// the load.
    delayed_answered_span: Option<(f64, f64)>,
    /// When the first and the last failed request started, ms into the load.
    failed_span: Option<(f64, f64)>,
    /// Over every request, to its answer or its failure.
    all: Latency,
    delayed_latency: Latency,
}

/// The figures of one run's requests; `load_start_ns` is when the first was due.
fn analyze(requests: &[Request], load_start_ns: u64) -> RunFigures {
    let mut f = RunFigures {
        requests: requests.len(),
        ..RunFigures::default()
    };
    for r in requests {
        if r.failed() {
            f.failed += 1;
            *f.failure_kinds
                .entry(r.outcome.trim_start_matches('!').to_owned())
                .or_default() += 1;
        } else {
            *f.answered_by.entry(r.outcome.clone()).or_default() += 1;
        }
    }
    let delayed: Vec<&Request> = requests
        .iter()
        .filter(|r| r.latency_ns > DELAYED_NS)
        .collect();
    f.delayed = delayed.len();
    f.delayed_answered = delayed.iter().filter(|r| !r.failed()).count();
    let into_load = |ns: u64| into_ms(load_start_ns, ns);
    let span = |of: &mut dyn Iterator<Item = &Request>| {
        let starts: Vec<u64> = of.map(|r| r.start_ns).collect();
        let (first, last) = (starts.iter().min()?, starts.iter().max()?);
        Some((into_load(*first), into_load(*last)))
    };
    f.delayed_answered_span = span(&mut delayed.iter().copied().filter(|r| !r.failed()));
    f.failed_span = span(&mut requests.iter().filter(|r| r.failed()));
    f.all = latency_of(requests.iter().map(|r| r.latency_ns).collect());
    f.delayed_latency = latency_of(delayed.iter().map(|r| r.latency_ns).collect());
    f
}

/// From `from_ns` to `to_ns` (CLOCK_MONOTONIC), in ms.
fn into_ms(from_ns: u64, to_ns: u64) -> f64 {
    (i128::from(to_ns) - i128::from(from_ns)) as f64 / 1e6
}

/// What the agent said of `a` after a run.
#[derive(Debug, Default, Clone)]
struct HoleState {
    outlier: String,
    ejections: u64,
    /// Handshakes the kernel counted as timed out (SYN unanswered).
    timeouts: u64,
    /// Handshakes the kernel counted as refused (a reset answered the SYN).
    refused: u64,
    connects: u64,
}

fn hole_state(agent: &Agent) -> Result<HoleState> {
    let eps = agent.endpoints_json(Some(SERVICE))?;
    let hole = eps
        .as_array()
        .and_then(|a| a.iter().find(|e| e["address"] == HOLE))
        .with_context(|| format!("no {HOLE} in {eps}"))?;
    let n = |key: &str| hole[key].as_u64().unwrap_or(0);
    Ok(HoleState {
        outlier: hole["outlier"].as_str().unwrap_or("?").to_owned(),
        ejections: n("ejections"),
        timeouts: n("timeouts"),
        refused: n("refused"),
        connects: n("connects"),
    })
}

/// One run, its figures with the agent's view.
#[derive(Debug, Clone)]
struct Run {
    run: u32,
    mode: Mode,
    figures: RunFigures,
    steer: Option<SteerCounters>,
    hole: HoleState,
    /// `kind backend` → count, from `detour events`.
    events: BTreeMap<String, usize>,
    /// The backends' namespace's TCP counters that are not 0 (`nstat`).
    ns_tcp: BTreeMap<String, u64>,
    /// The steering programs' run time over the load (`BPF_ENABLE_STATS`), by pinned
    /// link (program, device, direction); empty with steering off.
    tc_cost: BTreeMap<String, RunTime>,
}

impl Run {
    fn json(&self) -> serde_json::Value {
        let latency = |l: &Latency| {
            serde_json::json!({
                "count": l.count,
                "p50_ms": finite(l.p50_ms),
                "p99_ms": finite(l.p99_ms),
                "max_ms": finite(l.max_ms),
            })
        };
        let f = &self.figures;
        serde_json::json!({
            "run": self.run,
            "mode": self.mode.as_str(),
            "requests": f.requests,
            "failed": f.failed,
            "failure_kinds": f.failure_kinds,
            "answered_by": f.answered_by,
            "delayed": f.delayed,
            "delayed_answered": f.delayed_answered,
            "delayed_answered_started_ms": f.delayed_answered_span,
            "failed_started_ms": f.failed_span,
            "latency_all": latency(&f.all),
            "latency_delayed": latency(&f.delayed_latency),
            "steer": self.steer.map(|s| serde_json::json!({
                "steered": s.steered,
                "no_candidate": s.no_candidate,
                "table_full": s.table_full,
                "unseen": s.unseen,
                "late_dropped": s.late_dropped,
                "refusals_held": s.refusals_held,
            })),
            "a": {
                "outlier": self.hole.outlier,
                "ejections": self.hole.ejections,
                "timeouts": self.hole.timeouts,
                "refused": self.hole.refused,
                "connects": self.hole.connects,
            },
            "events": self.events,
            "namespace_tcp": self.ns_tcp,
            "tc_programs": self.tc_cost.iter().map(|(link, t)| (link.clone(), serde_json::json!({
                "runs": t.count,
                "ns": t.ns,
            }))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// JSON has no NaN: an empty set's percentile is `null`.
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn one_run(binary: &Path, args: &SteerArgs, run: u32, kept: &Path) -> Result<Run> {
    let mode = Mode::of_run(run);
    let name = format!("run{run}-{}", mode.as_str());
    let mut bed = Bed::new(binary, args.fault, args.handshake_timeout)?;
    let started = bed.start_agent(mode);
    // Kept for a closer look, whatever happens: the bed's temp dir goes with the run.
    let keep_log = |bed: &Bed| {
        let _ = std::fs::write(kept.join(format!("agent-{name}.log")), bed.node.log());
    };
    if let Err(e) = started {
        keep_log(&bed);
        return Err(e);
    }
    let agent = bed.agent();
    // What the agent reports as it happens (ejections, stalls, steerings), kept too.
    let events = LineStream::spawn(
        Command::new(binary)
            .args(["events", "-o", "json", "--socket"])
            .arg(&agent.options().socket),
    )?;
    // The kernel accounts the programs' run time while this fd is open; the steering
    // links (pinned as `detour_steer-*`) are read before and after the load.
    let _stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("turning on the kernel's BPF run-time statistics")?;
    let programs = AgentPrograms::find(bed.node.pins.path())?;
    if mode == Mode::Steer && args.idle_flows > 0 {
        fill_translation_table(bed.node.pins.path(), args.idle_flows)?;
    }
    let tc_before = programs.read()?;
    let hogs = CpuHogs::start(args.cpu_hogs)?;
    let start_at = mono_ns() + nanos(CLIENT_LEAD);
    let client = ClientRun::spawn(
        &bed.node.cgroup,
        &[VIP],
        args.in_flight,
        args.rate,
        args.duration,
        args.timeout,
        start_at,
    )?;
    let requests = client.finish();
    drop(hogs);
    let tc_after = programs.read()?;
    let tc_cost = tc_after
        .iter()
        .filter(|(link, _)| link.starts_with(STEER_LINKS))
        .map(|(link, after)| {
            let before = tc_before.get(link).copied().unwrap_or_default();
            let run = RunTime {
                ns: after.ns.saturating_sub(before.ns),
                count: after.count.saturating_sub(before.count),
            };
            (link.clone(), run)
        })
        .collect();
    let metrics = agent.metrics();
    let hole = hole_state(agent);
    // The backends' side of it: the namespace's TCP counters (SYNs the black hole
    // dropped, resets, PAWS rejections, ...), those that are not 0.
    let nstat = bed
        .ns
        .exec("nstat", &["-as"])
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
    keep_log(&bed);
    let events = events.lines();
    let mut reported = String::new();
    for (t, line) in &events {
        let _ = writeln!(reported, "{:.3}\t{line}", into_ms(start_at, *t));
    }
    std::fs::write(kept.join(format!("events-{name}.tsv")), reported)?;
    let requests = requests.map_err(|e| e.context(format!("the load{}", agent.log_tail())))?;
    let mut raw = format!(
        "# run {run}, mode {}: start (ms into the load), latency (ms), outcome\n",
        mode.as_str()
    );
    let mut sorted: Vec<&Request> = requests.iter().collect();
    sorted.sort_by_key(|r| r.start_ns);
    for r in sorted {
        let _ = writeln!(
            raw,
            "{:.3}\t{:.3}\t{}",
            into_ms(start_at, r.start_ns),
            r.latency_ns as f64 / 1e6,
            r.outcome
        );
    }
    std::fs::write(kept.join(format!("requests-{name}.tsv")), raw)?;
    Ok(Run {
        run,
        mode,
        figures: analyze(&requests, start_at),
        steer: steer_counters(&metrics?),
        hole: hole?,
        tc_cost,
        events: event_counts(&events),
        // A diagnostic: a machine without nstat still gets the figures.
        ns_tcp: nstat.map(|t| tcp_counters(&t)).unwrap_or_default(),
    })
}

/// Threads spinning on the CPU until dropped (a loaded node).
struct CpuHogs {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuHogs {
    fn start(count: u32) -> Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..count {
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("cpu-hog-{i}"))
                    .spawn(move || {
                        let mut x = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005) + 1);
                        }
                    })?,
            );
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Puts `count` entries in each translation map, as `sock_ops` would for `count` steered
/// flows that no packet of the load belongs to, and adds them to the gate's insert count
/// (the agent's sweep deletes them a grace period after the load: their cookie is no
/// open socket's).
fn fill_translation_table(pins: &Path, count: u32) -> Result<()> {
    use aya::maps::{Array, HashMap, Map, MapData};
    use detour_ebpf::{maps, steer, FlowKey, Steer, SteerBack};
    let open = |name: &str| -> Result<MapData> {
        let path = pins.join("maps").join(name);
        MapData::from_pin(&path)
            .with_context(|| format!("opening the map pinned at {}", path.display()))
    };
    let mut flows: HashMap<MapData, FlowKey, Steer> =
        HashMap::try_from(Map::HashMap(open(maps::STEER)?))?;
    let mut back: HashMap<MapData, FlowKey, SteerBack> =
        HashMap::try_from(Map::HashMap(open(maps::STEER_BACK)?))?;
    let mut control: Array<MapData, u64> = Array::try_from(Map::Array(open(maps::STEER_CONTROL)?))?;
    // 10.234.H.L:P, as the maps hold an address: IPv4-mapped, network order.
    let addr = |i: u32| -> [u32; 4] {
        let v4 = std::net::Ipv4Addr::new(10, 234, (i >> 8) as u8, i as u8);
        let o = v4.to_ipv6_mapped().octets();
        std::array::from_fn(|w| u32::from_ne_bytes(o[4 * w..4 * w + 4].try_into().unwrap()))
    };
    let (client, old, new) = (addr(1), addr(2), addr(3));
    for i in 0..count {
        // One client address, a local port and a backend port per flow: 65,535² tuples.
        let port = (1024 + (i % 60_000) as u16).to_be();
        let backend_port = (8080 + (i / 60_000) as u16).to_be();
        let key = |remote| FlowKey {
            local: client,
            remote,
            local_port: port,
            remote_port: backend_port,
        };
        let entry = Steer {
            to: new,
            to_port: backend_port,
            steps: 1,
            seen: 1,
            to_id: 0,
            tried: [steer::NO_BACKEND; 4],
            service_id: 0,
            pad: 0,
            steered_at_ns: mono_ns(),
            closed_at_ns: 0,
            cookie: 0,
        };
        flows.insert(key(old), entry, 0).with_context(|| {
            format!("translation entry {i} of {count} (is --max-steered-flows smaller?)")
        })?;
        let reply = SteerBack {
            from: old,
            from_port: backend_port,
            pad: 0,
        };
        back.insert(key(new), reply, 0)
            .with_context(|| format!("reply entry {i} of {count}"))?;
    }
    let inserted = control.get(&steer::INSERTED, 0)?;
    control.set(steer::INSERTED, inserted + u64::from(count), 0)?;
    Ok(())
}

/// What the agent reported, counted by kind and backend (`a`, `b`).
fn event_counts(lines: &[(u64, String)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, line) in lines {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let backend = match e["backend"].as_str() {
            Some(HOLE) => "a",
            Some(B) => B_NAME,
            Some(other) => other,
            None => "-",
        };
        let kind = e["kind"].as_str().unwrap_or("?");
        *counts.entry(format!("{kind} {backend}")).or_default() += 1;
    }
    counts
}

/// The `Tcp*` counters of `nstat -as` output.
fn tcp_counters(nstat: &str) -> BTreeMap<String, u64> {
    nstat
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, value) = (f.next()?, f.next()?.parse().ok()?);
            name.starts_with("Tcp").then(|| (name.to_owned(), value))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The task

pub fn run(args: &SteerArgs) -> Result<()> {
    detour_testbed::require_root("cargo xtask bench-steer")?;
    ensure!(
        args.runs > 0 && args.rate > 0 && args.in_flight > 0 && !args.duration.is_zero(),
        "--runs, --rate, --in-flight and --duration must be positive"
    );
    setup::run()?;
    // Described before the build: the tree may change while the runs go on.
    let (binary, agent) = match &args.agent_binary {
        Some(binary) => (binary.clone(), format!("`{}`", binary.display())),
        None => {
            let describe = cmd::stdout_of(
                Command::new("git")
                    .current_dir(cmd::workspace_root())
                    .args(["describe", "--always", "--dirty"]),
            )
            .map_or_else(|| "?".to_owned(), |s| s.trim().to_owned());
            let binary = cmd::build_agent()?;
            (binary, format!("built from the work tree at {describe}"))
        }
    };
    // The machine may be shared: what else ran shows in the load around the runs.
    let load_before = load_average();
    let kept = cmd::target_dir()
        .join("bench-steer")
        .join(if args.idle_flows > 0 {
            format!("{}-idle-flows-{}", args.fault.as_str(), args.idle_flows)
        } else {
            args.fault.as_str().to_owned()
        });
    std::fs::create_dir_all(&kept).with_context(|| format!("creating {}", kept.display()))?;
    // This task's own files from an earlier invocation, so that none is taken for this one's.
    for entry in std::fs::read_dir(&kept)? {
        let path = entry?.path();
        let ours = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            ["requests-", "agent-", "events-"]
                .iter()
                .any(|p| n.starts_with(p))
                || n == "runs.json"
        });
        if ours {
            std::fs::remove_file(&path)?;
        }
    }
    let per_run = READY_TIMEOUT * 2 + CLIENT_LEAD + args.duration + args.timeout * 2;
    let budget = per_run * args.runs * 2 + Duration::from_secs(60);
    let deadline = Instant::now() + budget;

    let mut runs = Vec::new();
    for run in 0..args.runs * 2 {
        ensure!(
            Instant::now() < deadline,
            "the benchmark ran out of its {budget:?} budget"
        );
        let r = one_run(&binary, args, run, &kept)
            .with_context(|| format!("run {run} ({})", Mode::of_run(run).as_str()))?;
        let f = &r.figures;
        eprintln!(
            "run {run} {:<5}: {} requests, {} failed {:?}, {} delayed > 50 ms ({} answered), \
             p50 {:.3} p99 {:.3} max {:.1} ms; steered {}; a {} ({} ejections, {} \
             timeouts, {} refused)",
            r.mode.as_str(),
            f.requests,
            f.failed,
            f.failure_kinds,
            f.delayed,
            f.delayed_answered,
            f.all.p50_ms,
            f.all.p99_ms,
            f.all.max_ms,
            r.steer
                .map_or_else(|| "–".to_owned(), |s| s.steered.to_string()),
            r.hole.outlier,
            r.hole.ejections,
            r.hole.timeouts,
            r.hole.refused,
        );
        runs.push(r);
    }
    let json: Vec<serde_json::Value> = runs.iter().map(Run::json).collect();
    std::fs::write(
        kept.join("runs.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    let agent = format!(
        "{agent}; load average (1 min) {load_before} before the runs, {} after",
        load_average()
    );
    let text = report(args, &agent, &runs);
    std::fs::write(kept.join("report.md"), &text)?;
    print!("{text}");
    eprintln!("raw figures: {}", kept.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The report

fn report(args: &SteerArgs, agent: &str, runs: &[Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## SYN steering: {}, steering on and off\n\n\
         {} runs per mode, interleaved (off first), each on a fresh bed; medians over a \
         mode's runs (range in parentheses where runs differ). Load: {} new connections/s \
         for {:?}, one `GET /` each, open loop (up to {} in flight), client timeout {:?}. \
         Half the connects that pick a backend pick `a` until the kernel or the agent \
         avoids it. Delayed: latency over {} ms. Latency: from before the connect to the \
         answer or the failure. Agent: {agent}.\n",
        args.fault.describe(),
        args.runs,
        args.rate,
        args.duration,
        args.in_flight,
        args.timeout,
        DELAYED_NS / 1_000_000
    );
    let _ = writeln!(
        out,
        "Handshake timeout {:?}.{}\n",
        args.handshake_timeout,
        if args.cpu_hogs > 0 {
            format!(
                " {} threads spun on the CPU through each load (a loaded node).",
                args.cpu_hogs
            )
        } else {
            String::new()
        }
    );
    if args.idle_flows > 0 {
        let _ = writeln!(
            out,
            "With steering on, {} entries of flows no packet of the load belongs to were put \
             in each translation map before the load: the gate is open, and every packet on \
             the veth is looked up in tables of that size.\n",
            args.idle_flows
        );
    }
    let _ = writeln!(
        out,
        "| steering | requests | failed | delayed > {} ms | of them answered | p50 / p99 / \
         max, all (ms) | p50 / p99 / max, delayed (ms) | `detour_steer_steered_total` |",
        DELAYED_NS / 1_000_000
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|---|---:|");
    let mut notes = Vec::new();
    for mode in [Mode::Off, Mode::Steer] {
        let of: Vec<&Run> = runs.iter().filter(|r| r.mode == mode).collect();
        if of.is_empty() {
            continue;
        }
        let counts = |f: fn(&RunFigures) -> usize| {
            count_summary(&of.iter().map(|r| f(&r.figures)).collect::<Vec<_>>())
        };
        let ms =
            |f: fn(&RunFigures) -> f64| fmt_ms(median(of.iter().map(|r| f(&r.figures)).collect()));
        let steered: Vec<usize> = of
            .iter()
            .filter_map(|r| r.steer)
            .map(|s| usize::try_from(s.steered).unwrap_or(usize::MAX))
            .collect();
        let label = match mode {
            Mode::Off => "off (`--steer-devices none`)",
            Mode::Steer => "on (`--steer-devices <veth>`)",
        };
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {} / {} / {} | {} / {} / {} | {} |",
            counts(|f| f.requests),
            counts(|f| f.failed),
            counts(|f| f.delayed),
            counts(|f| f.delayed_answered),
            ms(|f| f.all.p50_ms),
            ms(|f| f.all.p99_ms),
            ms(|f| f.all.max_ms),
            ms(|f| f.delayed_latency.p50_ms),
            ms(|f| f.delayed_latency.p99_ms),
            ms(|f| f.delayed_latency.max_ms),
            count_summary(&steered),
        );

        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        let mut answered: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &of {
            for (k, n) in &r.figures.failure_kinds {
                *kinds.entry(k).or_default() += n;
            }
            for (k, n) in &r.figures.answered_by {
                *answered.entry(k).or_default() += n;
            }
        }
        // Over all runs: the first start and the last.
        let span = |f: fn(&RunFigures) -> Option<(f64, f64)>| {
            let spans: Vec<(f64, f64)> = of.iter().filter_map(|r| f(&r.figures)).collect();
            let first = spans.iter().map(|s| s.0).min_by(f64::total_cmp);
            let last = spans.iter().map(|s| s.1).max_by(f64::total_cmp);
            match first.zip(last) {
                Some((first, last)) => format!(
                    "started {}–{} ms into the load",
                    fmt_ms(Some(first)),
                    fmt_ms(Some(last))
                ),
                None => "none".to_owned(),
            }
        };
        let ejected = of.iter().filter(|r| r.hole.ejections > 0).count();
        let of_a = |f: fn(&HoleState) -> u64| -> Vec<usize> {
            of.iter()
                .map(|r| usize::try_from(f(&r.hole)).unwrap_or(usize::MAX))
                .collect()
        };
        let mut note = format!(
            "steering {}: failures over all runs {kinds:?}, {}; delayed and answered: {}; \
             answered by {answered:?}; `a` after the run: ejected in {ejected} of {} runs, \
             handshakes to it timed out {}, refused {} (the kernel's counts)",
            mode.label(),
            span(|f| f.failed_span),
            span(|f| f.delayed_answered_span),
            of.len(),
            count_summary(&of_a(|h| h.timeouts)),
            count_summary(&of_a(|h| h.refused)),
        );
        let mut events: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &of {
            for (k, n) in &r.events {
                *events.entry(k).or_default() += n;
            }
        }
        let ns_sum = |name: &str| -> u64 {
            of.iter()
                .map(|r| r.ns_tcp.get(name).copied().unwrap_or(0))
                .sum()
        };
        let _ = write!(
            note,
            "; `detour events` over all runs {events:?}; in the backends' namespace over all \
             runs, SYNs dropped by a full accept queue (TcpExtListenDrops) {}, resets \
             received by half-open connections (TcpExtEmbryonicRsts) {}",
            ns_sum("TcpExtListenDrops"),
            ns_sum("TcpExtEmbryonicRsts")
        );
        if mode == Mode::Steer {
            let sum = |f: fn(&SteerCounters) -> u64| -> u64 {
                of.iter().filter_map(|r| r.steer).map(|s| f(&s)).sum()
            };
            let _ = write!(
                note,
                "; over all runs `detour_steer_*_total`: no_candidate {}, table_full {}, \
                 unseen {}, late_dropped {}, refusals_held {}",
                sum(|s| s.no_candidate),
                sum(|s| s.table_full),
                sum(|s| s.unseen),
                sum(|s| s.late_dropped),
                sum(|s| s.refusals_held)
            );
            for direction in ["egress", "ingress"] {
                let per_run: Vec<(u64, f64)> = of
                    .iter()
                    .filter_map(|r| {
                        let t = r
                            .tc_cost
                            .iter()
                            .find(|(link, _)| link.ends_with(&format!("-{direction}")))?
                            .1;
                        (t.count > 0).then(|| (t.count, t.ns as f64 / t.count as f64))
                    })
                    .collect();
                if per_run.is_empty() {
                    continue;
                }
                let runs: Vec<usize> = per_run
                    .iter()
                    .map(|(n, _)| usize::try_from(*n).unwrap_or(usize::MAX))
                    .collect();
                let ns: Vec<f64> = per_run.iter().map(|(_, ns)| *ns).collect();
                let low = ns.iter().copied().fold(f64::INFINITY, f64::min);
                let high = ns.iter().copied().fold(0.0, f64::max);
                let _ = write!(
                    note,
                    "; the {direction} program on the veth (`BPF_ENABLE_STATS`, over the load): \
                     {} invocations per run, {:.0} ns each (median; {low:.0}–{high:.0})",
                    count_summary(&runs),
                    median(ns).unwrap_or(f64::NAN),
                );
            }
        }
        notes.push(note);
    }
    let _ = writeln!(out);
    for n in notes {
        let _ = writeln!(out, "- {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(start_ms: u64, latency_ms: u64, outcome: &str) -> Request {
        Request {
            start_ns: start_ms * 1_000_000,
            latency_ns: latency_ms * 1_000_000,
            outcome: outcome.to_owned(),
        }
    }

    #[test]
    fn modes_alternate_off_first() {
        let modes: Vec<Mode> = (0..4).map(Mode::of_run).collect();
        assert_eq!(modes, [Mode::Off, Mode::Steer, Mode::Off, Mode::Steer]);
    }

    #[test]
    fn a_run_counts_failures_answers_and_delays() {
        let requests = [
            req(1000, 1, "b"),
            req(1001, 101, "b"),
            req(1002, 130, "!connect:aborted"),
            req(1003, 0, "b"),
            req(1010, 50, "b"),
        ];
        let f = analyze(&requests, 1_000_000_000);
        assert_eq!(
            (f.requests, f.failed, f.delayed, f.delayed_answered),
            (5, 1, 2, 1)
        );
        assert_eq!(f.failure_kinds.get("connect:aborted"), Some(&1));
        assert_eq!(f.answered_by.get("b"), Some(&4));
        assert_eq!(f.delayed_answered_span, Some((1.0, 1.0)));
        assert_eq!(f.failed_span, Some((2.0, 2.0)));
        assert_eq!((f.all.p50_ms, f.all.max_ms), (50.0, 130.0));
        assert_eq!(f.delayed_latency.count, 2);
        assert_eq!(f.delayed_latency.p50_ms, 101.0);
        let none = analyze(&requests[..1], 1_000_000_000);
        assert_eq!((none.delayed, none.delayed_answered_span), (0, None));
        assert!(none.delayed_latency.p50_ms.is_nan());
    }

    #[test]
    fn steering_counters_only_when_all_are_there() {
        let metrics = "# HELP detour_steer_steered_total ...\n\
                       detour_steer_steered_total 7\n\
                       detour_steer_no_candidate_total 0\n\
                       detour_steer_table_full_total 0\n\
                       detour_steer_unseen_total 1\n\
                       detour_steer_late_dropped_total 2\n\
                       detour_steer_flows 2\n";
        let counters = SteerCounters {
            steered: 7,
            no_candidate: 0,
            table_full: 0,
            unseen: 1,
            late_dropped: 2,
            refusals_held: 0,
        };
        // An agent from before refusal holding has no such counter: 0.
        assert_eq!(steer_counters(metrics), Some(counters));
        let with_held = format!("{metrics}detour_steer_refusals_held_total 5\n");
        assert_eq!(
            steer_counters(&with_held),
            Some(SteerCounters {
                refusals_held: 5,
                ..counters
            })
        );
        assert_eq!(steer_counters("detour_connects_total 3\n"), None);
        assert_eq!(
            metric_sum("detour_steer_steered_total 7\n", "detour_steer"),
            None
        );
    }

    #[test]
    fn events_and_namespace_counters_are_counted() {
        let line = |kind: &str, backend: &str| {
            (
                0,
                format!(r#"{{"kind":"{kind}","service":"steer","backend":"{backend}"}}"#),
            )
        };
        let lines = [
            line("timeout", HOLE),
            line("timeout", HOLE),
            line("steered", B),
            line("timeout", "10.0.0.9:80"),
            (0, "not json".to_owned()),
        ];
        let counts = event_counts(&lines);
        assert_eq!(counts.get("timeout a"), Some(&2));
        assert_eq!(counts.get("steered b"), Some(&1));
        assert_eq!(counts.get("timeout 10.0.0.9:80"), Some(&1));
        assert_eq!(counts.len(), 3);
        let nstat = "#kernel\nIpInReceives 14848 0.0\nTcpPassiveOpens 2947 0.0\n\
                     TcpExtEmbryonicRsts                95                 0.0\n";
        let tcp = tcp_counters(nstat);
        assert_eq!(tcp.len(), 2);
        assert_eq!(tcp.get("TcpExtEmbryonicRsts"), Some(&95));
    }

    #[test]
    fn config_reads_as_intended() {
        use crate::config_view::OneService;
        use detour_agent::config::HealthCheckKind;
        let config = detour_agent::config::parse(&config(Duration::from_millis(100)))
            .expect("the agent accepts its config");
        assert_eq!(config.node.locality.to_string(), LOCALITY);
        let one = OneService::of(&config);
        assert_eq!(one.service.name, SERVICE);
        assert_eq!(one.vips(), [VIP]);
        let expected: Vec<(String, String)> = [HOLE, B]
            .iter()
            .map(|a| ((*a).to_owned(), LOCALITY.to_owned()))
            .collect();
        assert_eq!(one.endpoints(ToString::to_string), expected);
        assert_eq!(one.checks().4, &HealthCheckKind::None);
        let outlier = &one.service.outlier_detection;
        let settings = outlier.policy.settings();
        assert_eq!(
            (
                settings.consecutive_failures,
                settings.interval,
                settings.base_ejection_time,
                outlier.handshake_timeout
            ),
            (
                5,
                Duration::from_secs(10),
                Duration::from_secs(30),
                Duration::from_millis(100)
            )
        );
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        // The veth's addresses are the namespace's, in the range this task owns.
        for cidr in [HOST_CIDR, HOLE_CIDR, B_CIDR] {
            assert!(
                cidr.starts_with("10.233.0.") && cidr.ends_with("/24"),
                "{cidr}"
            );
        }
        assert!(HOLE.starts_with(HOLE_CIDR.split('/').next().unwrap()));
        assert!(B.starts_with(B_CIDR.split('/').next().unwrap()));
    }
}
