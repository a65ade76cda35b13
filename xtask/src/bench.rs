//! `cargo xtask bench`: what a VIP costs a `connect()`.
//!
//! A client process inside a test cgroup opens and closes TCP connections (closing with
//! RST, as many pools and load generators do) in a tight loop, against the backend's own
//! address ("direct") and a detour VIP that maps to it ("VIP"), with the agent running.
//! Three setups: no program attached (baseline), the agent with 1 service, the agent with
//! 100,000 services. Each row is the median over runs of the mean time per connect, so one
//! noisy run does not move it.
//!
//! With the agent, each setup runs the client twice:
//! - one target after the other, pausing after each run while the kernel's own
//!   accounting of the programs' run time (`BPF_ENABLE_STATS`, what
//!   `kernel.bpf_stats_enabled` turns on) is read, so every program's cost per connect is
//!   attributed to the target that caused it: on "direct" the programs only find no VIP,
//!   on "VIP" they rewrite the connect and follow the socket to its RST close;
//! - direct and VIP interleaved in blocks of `--block` connects within each run, for the
//!   wall-time rows: a run's VIP/direct ratio then compares connects made side by side,
//!   and the ratio reported is the median of the runs' ratios.
//!
//! Invariants:
//! - all traffic is loopback: the backend is an accept-and-drop listener on
//!   127.0.3.1:9000, VIPs are in 127.201.0.0/16 and 127.210.0.0/16;
//! - the client closes with `SO_LINGER {on, 0}` (RST, no TIME_WAIT), so hundreds of
//!   thousands of connects do not exhaust ephemeral ports and skew later runs;
//! - the whole task is time-bounded: each client has a deadline, the task has one overall;
//! - agents, cgroups and pins are guards, torn down after each setup and on any error.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use detour_testbed::{Agent, AgentBed, Cgroup, LineStream};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::{cmd, setup};

const BACKEND: &str = "127.0.3.1:9000";
const VIP: &str = "127.201.0.1:80";
const LOCALITY: &str = "us-east1/us-east1-b";
/// The whole task's budget.
const TASK_BUDGET: Duration = Duration::from_secs(570);
/// A connect slower than this means a dropped SYN (full accept queue) or similar.
const SLOW_CONNECT: Duration = Duration::from_millis(10);

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Runs per target and setup.
    #[arg(long, default_value_t = 7)]
    runs: u32,
    /// Connects per run.
    #[arg(long, default_value_t = 20_000)]
    connects: u32,
    /// Services loaded in the large setup (the benchmark's own service included).
    #[arg(long, default_value_t = 100_000)]
    services: u32,
    /// Connects per block when direct and VIP are interleaved within a run.
    #[arg(long, default_value_t = 500)]
    block: u32,
}

/// Arguments of the hidden `bench-client` subcommand.
#[derive(clap::Args)]
pub struct ClientArgs {
    /// `NAME=ADDR`, repeated; each run visits them in rotating order.
    #[arg(long = "target", value_parser = parse_target, required = true)]
    targets: Vec<(String, SocketAddr)>,
    #[arg(long)]
    runs: u32,
    #[arg(long)]
    connects: u32,
    /// Unmeasured connects per target before the first run.
    #[arg(long, default_value_t = WARMUP_CONNECTS)]
    warmup: u32,
    /// Pause after each line printed (the warm-up's and every run's), so the parent can
    /// read the kernel's program statistics between runs.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// Interleave the targets in blocks of this many connects within each run (0: one
    /// target after the other).
    #[arg(long, default_value_t = 0)]
    block: u32,
}

fn parse_target(s: &str) -> Result<(String, SocketAddr)> {
    let (name, addr) = s.split_once('=').context("expected NAME=ADDR")?;
    Ok((name.to_owned(), addr.parse()?))
}

/// One measured run, as the client reports it (one JSON object per line).
#[derive(Debug, Clone)]
struct RunResult {
    target: String,
    /// Which run of the client it was (runs of different targets pair up by it).
    run: u32,
    elapsed: Duration,
    connects: u32,
    /// Connects over [`SLOW_CONNECT`] (a SYN the backend's full accept queue dropped,
    /// waiting for its retransmission), and the time they took.
    slow: u32,
    slow_elapsed: Duration,
}

impl RunResult {
    /// Mean time of the connects that were not slow. A dropped SYN costs a whole
    /// retransmission timeout (1 s direct, the handshake timeout through a VIP), so a few
    /// of them, which come from the accept-and-drop backend falling behind on a busy
    /// machine, would otherwise outweigh everything measured; they are counted apart.
    fn ns_per_connect(&self) -> f64 {
        let fast = self.connects.saturating_sub(self.slow).max(1);
        self.elapsed.saturating_sub(self.slow_elapsed).as_nanos() as f64 / f64::from(fast)
    }

    fn connects_per_sec(&self) -> f64 {
        1e9 / self.ns_per_connect()
    }
}

/// Unmeasured connects the client makes to each target before its first run.
const WARMUP_CONNECTS: u32 = 1000;

/// The client: runs inside the cgroup, prints one JSON line per run.
pub fn client(args: &ClientArgs) -> Result<()> {
    let targets: Vec<(String, SockAddr)> = args
        .targets
        .iter()
        .map(|(name, addr)| (name.clone(), SockAddr::from(*addr)))
        .collect();
    for (name, addr) in &targets {
        for _ in 0..args.warmup {
            connect_once(addr).with_context(|| format!("warm-up connect to {name}"))?;
        }
    }
    let mut out = std::io::stdout().lock();
    let pause = Duration::from_millis(args.pause_ms);
    writeln!(out, "{}", serde_json::json!({"warmed_up": true}))?;
    out.flush()?;
    thread::sleep(pause);
    let n = targets.len();
    for run in 0..args.runs {
        let order: Vec<usize> = (0..n).map(|i| (i + run as usize) % n).collect();
        if args.block == 0 {
            // One target after the other, pausing between them.
            for &t in &order {
                let timed = timed_connects(&targets[t], args.connects)?;
                print_run(&mut out, &targets[t].0, run, args.connects, timed)?;
                thread::sleep(pause);
            }
        } else {
            // Blocks of the targets in turn, so what else the machine does falls on all
            // of them alike.
            let mut totals = vec![Timed::default(); n];
            let mut done = 0;
            while done < args.connects {
                let count = args.block.min(args.connects - done);
                for &t in &order {
                    let timed = timed_connects(&targets[t], count)?;
                    totals[t].elapsed += timed.elapsed;
                    totals[t].slow += timed.slow;
                    totals[t].slow_elapsed += timed.slow_elapsed;
                }
                done += count;
            }
            for &t in &order {
                print_run(&mut out, &targets[t].0, run, args.connects, totals[t])?;
            }
            thread::sleep(pause);
        }
    }
    Ok(())
}

/// What a series of connects took.
#[derive(Debug, Clone, Copy, Default)]
struct Timed {
    elapsed: Duration,
    /// Connects slower than [`SLOW_CONNECT`], and their share of `elapsed`.
    slow: u32,
    slow_elapsed: Duration,
}

/// `count` connects to one target.
fn timed_connects((name, addr): &(String, SockAddr), count: u32) -> Result<Timed> {
    let mut timed = Timed::default();
    let start = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        connect_once(addr).with_context(|| format!("connect to {name}"))?;
        let took = t.elapsed();
        if took > SLOW_CONNECT {
            timed.slow += 1;
            timed.slow_elapsed += took;
        }
    }
    timed.elapsed = start.elapsed();
    Ok(timed)
}

fn print_run(
    out: &mut impl Write,
    target: &str,
    run: u32,
    connects: u32,
    timed: Timed,
) -> Result<()> {
    let line = serde_json::json!({
        "target": target,
        "run": run,
        "elapsed_ns": u64::try_from(timed.elapsed.as_nanos())?,
        "connects": connects,
        "slow": timed.slow,
        "slow_ns": u64::try_from(timed.slow_elapsed.as_nanos())?,
    });
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// socket, connect, close with RST (no TIME_WAIT).
fn connect_once(addr: &SockAddr) -> std::io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_linger(Some(Duration::ZERO))?;
    socket.connect(addr)
}

/// A listener that accepts and immediately drops every connection.
pub(crate) struct AcceptSink {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptSink {
    pub(crate) fn start(addr: SocketAddr) -> Result<Self> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket
            .bind(&addr.into())
            .with_context(|| format!("binding {addr}"))?;
        // The kernel caps this at net.core.somaxconn.
        socket.listen(65_535)?;
        socket.set_nonblocking(true)?;
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Drain the queue, then sleep in poll until the next connection.
                    while listener.accept().is_ok() {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut pfd = libc::pollfd {
                        fd: listener.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut pfd, 1, 20) };
                }
            })
        };
        Ok(Self {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for AcceptSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One row of the report.
struct Row {
    setup: String,
    target: String,
    ns_per_connect: f64,
    connects_per_sec: f64,
    /// Slow connects over all runs, left out of the means.
    slow: u32,
    /// VIP over direct of the same setup, for VIP rows.
    ratio: Option<f64>,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    detour_testbed::require_root("cargo xtask bench")?;
    if args.runs == 0 || args.connects == 0 || args.services == 0 || args.block == 0 {
        bail!("--runs, --connects, --services and --block must be positive");
    }
    let deadline = Instant::now() + TASK_BUDGET;
    setup::run()?;
    let binary = cmd::build_agent()?;

    let sink = AcceptSink::start(BACKEND.parse()?)?;
    let overflows_before = listen_overflows();
    let mut rows = Vec::new();
    let mut costs = Vec::new();
    let mut notes = Vec::new();

    eprintln!("bench: baseline, no program attached");
    {
        let cgroup = Cgroup::new()?;
        let results = run_client(&cgroup, &[("direct", BACKEND)], args, deadline, None)?;
        rows.extend(summarize("no program attached", &results));
    }

    let mut failed = Vec::new();
    for services in [1, args.services] {
        let setup_name = if services == 1 {
            "agent, 1 service".to_owned()
        } else {
            format!("agent, {} services", thousands(f64::from(services)))
        };
        eprintln!("bench: {setup_name}");
        match bench_with_agent(&binary, services, args, deadline) {
            Ok((results, setup_costs, setup_notes)) => {
                rows.extend(summarize(&setup_name, &results));
                costs.extend(setup_costs.into_iter().map(|c| (setup_name.clone(), c)));
                notes.extend(
                    setup_notes
                        .into_iter()
                        .map(|n| format!("{setup_name}: {n}")),
                );
            }
            Err(e) => {
                // Keep going: the other setups' figures are still worth reporting.
                eprintln!("bench: {setup_name} failed: {e:#}");
                let first_line = format!("{e:#}")
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                notes.push(format!("{setup_name}: FAILED: {first_line}"));
                failed.push(setup_name);
            }
        }
    }

    let overflows = listen_overflows().zip(overflows_before).map(|(a, b)| a - b);
    notes.push(format!(
        "backend {} accepted {} connections; listen queue overflows during the bench: {}",
        sink.addr,
        thousands(sink.accepted() as f64),
        overflows.map_or_else(|| "unknown".to_owned(), |n| n.to_string())
    ));
    print!("{}", report(args, &rows, &costs, &notes));
    if !failed.is_empty() {
        bail!("bench setups failed: {}", failed.join("; "));
    }
    Ok(())
}

/// One agent setup: load `services` services, wait until `bench` is programmed, run the
/// client against the backend and the VIP, reading the programs' run time between runs.
/// Returns the runs, the programs' costs by target and notes for the report.
fn bench_with_agent(
    binary: &Path,
    services: u32,
    args: &BenchArgs,
    deadline: Instant,
) -> Result<(Vec<RunResult>, Vec<ProgramCost>, Vec<String>)> {
    // The bed's guards: the agent, then the pins (detaching), the cgroup, the config.
    let mut bed = AgentBed::new(binary)?;
    write_config(&bed.config_path(), services)?;
    let loading = Instant::now();
    let ready_budget = deadline
        .saturating_duration_since(Instant::now())
        .min(Duration::from_secs(240));
    bed.start_agent(&[], ready_budget)?;
    let (agent, cgroup, pins) = (bed.agent.as_ref().expect("started"), &bed.cgroup, &bed.pins);
    wait_in_table(agent, "bench", deadline)?;
    let mut notes = vec![format!(
        "agent ready and `bench` in the table {:.1}s after start",
        loading.elapsed().as_secs_f64()
    )];
    // The kernel accounts run time while this fd is open (BPF_ENABLE_STATS).
    let _stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("turning on the kernel's BPF run-time statistics")?;
    let programs = AgentPrograms::find(pins.path())?;
    let mut costs = Costs::default();
    let mut last = programs.read()?;
    let mut between = |run: Option<&RunResult>| -> Result<()> {
        let now = programs.read()?;
        if let Some(run) = run {
            costs.add(run, &last, &now);
        }
        last = now;
        Ok(())
    };
    let targets = [("direct", BACKEND), ("VIP", VIP)];
    eprintln!("  one target at a time, reading the programs' run time between runs");
    let timed = run_client(cgroup, &targets, args, deadline, Some(&mut between))
        .map_err(|e| e.context(format!("bench client failed{}", agent.log_tail())))?;
    eprintln!(
        "  direct and VIP interleaved in blocks of {} connects",
        args.block
    );
    let results = run_client(cgroup, &targets, args, deadline, None)
        .map_err(|e| e.context(format!("bench client failed{}", agent.log_tail())))?;
    // Every connect the client made to the VIP went through the program: the kernel's
    // count must be the client's, or the figures are not what they claim to measure.
    // Two clients ran, each warming up first.
    let made: u64 = timed
        .iter()
        .chain(&results)
        .filter(|r| r.target == "VIP")
        .map(|r| u64::from(r.connects))
        .sum::<u64>()
        + 2 * u64::from(WARMUP_CONNECTS);
    let counted = bench_connects(agent).context("reading the agent's count for `bench`")?;
    if counted != made {
        bail!("the kernel counted {counted} connects to `bench`, the client made {made}");
    }
    notes.push(format!(
        "the kernel counted {counted} connects to `bench`, as many as the clients made \
         (warm-ups included)"
    ));
    Ok((results, costs.rows(), notes))
}

/// How long the client pauses after each run while the parent reads program statistics.
const STATS_PAUSE: Duration = Duration::from_millis(50);

/// A program's accumulated run time and invocations, as the kernel accounts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RunTime {
    pub ns: u64,
    pub count: u64,
}

/// The programs one agent attached, found through its link pins (`links/<program>`).
pub(crate) struct AgentPrograms {
    /// (program name, program id), by name.
    ids: Vec<(String, u32)>,
}

impl AgentPrograms {
    pub fn find(pins: &Path) -> Result<Self> {
        let dir = pins.join("links");
        let mut ids = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            let link: FdLink = PinnedLink::from_pin(&path)
                .with_context(|| format!("opening the link pinned at {}", path.display()))?
                .into();
            let id = link
                .info()
                .with_context(|| format!("link info of {}", path.display()))?
                .program_id();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            ids.push((name, id));
        }
        ids.sort();
        if ids.is_empty() {
            bail!("no program links pinned under {}", dir.display());
        }
        Ok(Self { ids })
    }

    /// Every program's run time now.
    pub fn read(&self) -> Result<BTreeMap<String, RunTime>> {
        let mut out = BTreeMap::new();
        // Other programs on the machine come and go while this iterates: an entry that
        // cannot be read is someone else's that just left, or ours missing (below).
        for info in aya::programs::loaded_programs().filter_map(Result::ok) {
            if let Some((name, _)) = self.ids.iter().find(|(_, id)| *id == info.id()) {
                let ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
                out.insert(
                    name.clone(),
                    RunTime {
                        ns,
                        count: info.run_count(),
                    },
                );
            }
        }
        if out.len() != self.ids.len() {
            bail!(
                "read run time of {} of the agent's {} programs",
                out.len(),
                self.ids.len()
            );
        }
        Ok(out)
    }
}

/// Program run time summed over the runs of each target.
#[derive(Default)]
struct Costs {
    /// (target, program) → run time; connects by target.
    by_program: BTreeMap<(String, String), RunTime>,
    connects: BTreeMap<String, u64>,
}

impl Costs {
    fn add(
        &mut self,
        run: &RunResult,
        before: &BTreeMap<String, RunTime>,
        after: &BTreeMap<String, RunTime>,
    ) {
        *self.connects.entry(run.target.clone()).or_default() += u64::from(run.connects);
        for (program, now) in after {
            let then = before.get(program).copied().unwrap_or_default();
            let sum = self
                .by_program
                .entry((run.target.clone(), program.clone()))
                .or_default();
            sum.ns += now.ns.saturating_sub(then.ns);
            sum.count += now.count.saturating_sub(then.count);
        }
    }

    /// Programs that ran, per target ("direct" first).
    fn rows(&self) -> Vec<ProgramCost> {
        let mut rows: Vec<ProgramCost> = self
            .by_program
            .iter()
            .filter(|(_, t)| t.count > 0)
            .map(|((target, program), t)| {
                let connects = self.connects.get(target).copied().unwrap_or(0).max(1) as f64;
                ProgramCost {
                    target: target.clone(),
                    program: program.clone(),
                    runs_per_connect: t.count as f64 / connects,
                    ns_per_run: t.ns as f64 / t.count as f64,
                    ns_per_connect: t.ns as f64 / connects,
                }
            })
            .collect();
        rows.sort_by_key(|r| (r.target != "direct", r.program.clone()));
        rows
    }
}

/// One program's cost on one target of a setup.
#[derive(Debug, Clone, PartialEq)]
struct ProgramCost {
    target: String,
    program: String,
    runs_per_connect: f64,
    ns_per_run: f64,
    ns_per_connect: f64,
}

/// What runs between the client's runs: given the run that just ended (`None` after the
/// warm-up).
type Between<'a> = dyn FnMut(Option<&RunResult>) -> Result<()> + 'a;

/// Runs `bench-client` in `cgroup` and collects its per-run results. `between` is called
/// while the client pauses after its warm-up (`None`) and after each run (`Some`); with
/// it the client pauses [`STATS_PAUSE`] there.
fn run_client(
    cgroup: &Cgroup,
    targets: &[(&str, &str)],
    args: &BenchArgs,
    deadline: Instant,
    mut between: Option<&mut Between<'_>>,
) -> Result<Vec<RunResult>> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut command = Command::new(exe);
    let pause = if between.is_some() {
        STATS_PAUSE
    } else {
        Duration::ZERO
    };
    command
        .arg("bench-client")
        .args(["--runs", &args.runs.to_string()])
        .args(["--connects", &args.connects.to_string()])
        .args(["--warmup", &WARMUP_CONNECTS.to_string()])
        .args(["--pause-ms", &pause.as_millis().to_string()])
        // Program statistics need one target at a time; wall time is fairer interleaved.
        .args([
            "--block",
            &if between.is_some() { 0 } else { args.block }.to_string(),
        ]);
    for (name, addr) in targets {
        command.arg("--target").arg(format!("{name}={addr}"));
    }
    let mut client = LineStream::spawn_in(cgroup, &mut command)?;
    let mut results = Vec::new();
    loop {
        let next = client
            .next_line(deadline)
            .with_context(|| format!("the benchmark ran out of its {TASK_BUDGET:?} budget"))?;
        match next {
            Some((_, line)) => {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("bad client line {line:?}"))?;
                if v["warmed_up"] == true {
                    if let Some(between) = between.as_mut() {
                        between(None)?;
                    }
                    continue;
                }
                let result = RunResult {
                    target: v["target"].as_str().unwrap_or_default().to_owned(),
                    run: u32::try_from(v["run"].as_u64().unwrap_or(0))?,
                    elapsed: Duration::from_nanos(v["elapsed_ns"].as_u64().unwrap_or(0)),
                    connects: u32::try_from(v["connects"].as_u64().unwrap_or(0))?,
                    slow: u32::try_from(v["slow"].as_u64().unwrap_or(0))?,
                    slow_elapsed: Duration::from_nanos(v["slow_ns"].as_u64().unwrap_or(0)),
                };
                eprintln!(
                    "  run {:>2} {:<6} {:>9.0} ns/connect{}",
                    v["run"],
                    result.target,
                    result.ns_per_connect(),
                    if result.slow > 0 {
                        format!(" ({} connects over {SLOW_CONNECT:?})", result.slow)
                    } else {
                        String::new()
                    }
                );
                if let Some(between) = between.as_mut() {
                    between(Some(&result))?;
                }
                results.push(result);
            }
            None => break,
        }
    }
    let (status, _) = client.wait(deadline.saturating_duration_since(Instant::now()))?;
    if !status.success() {
        bail!("the bench client failed: {status}");
    }
    let expected = targets.len() * args.runs as usize;
    if results.len() != expected {
        bail!(
            "the bench client reported {} runs, expected {expected}",
            results.len()
        );
    }
    Ok(results)
}

/// Waits until `service` has a backend in its kernel table (at most 60 s, and not
/// past `deadline`).
pub(crate) fn wait_in_table(agent: &Agent, service: &str, deadline: Instant) -> Result<()> {
    let within = deadline
        .saturating_duration_since(Instant::now())
        .min(Duration::from_secs(60));
    agent
        .wait_endpoints(service, within, |eps| {
            eps.as_array()
                .is_some_and(|a| a.iter().any(|e| e["in_table"] == true))
        })
        .map(drop)
        .map_err(|e| {
            e.context(format!(
                "`{service}` never got a backend in the table{}",
                agent.log_tail()
            ))
        })
}

fn bench_connects(agent: &Agent) -> Option<u64> {
    let eps = agent.endpoints_json(Some("bench")).ok()?;
    Some(
        eps.as_array()?
            .iter()
            .filter_map(|e| e["connects"].as_u64())
            .sum(),
    )
}

/// The agent config: the benchmark's service first, then `services - 1` fillers with
/// health checks disabled, each with its own VIP:port and endpoint.
fn write_config(path: &Path, services: u32) -> Result<()> {
    let mut w = BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, "node: {{ locality: {LOCALITY} }}")?;
    writeln!(w, "services:")?;
    writeln!(w, "  - name: bench")?;
    writeln!(w, "    vips: [127.201.0.1]")?;
    writeln!(w, "    ports: [{{number: 80, name: http}}]")?;
    writeln!(w, "    endpoints:")?;
    writeln!(
        w,
        "      - {{address: 127.0.3.1, ports: {{http: 9000}}, locality: {LOCALITY}}}"
    )?;
    writeln!(w, "    healthCheck: {{interval: 1s, timeout: 500ms}}")?;
    for i in 1..services {
        let (vip, port) = filler_vip(i - 1);
        let endpoint = filler_endpoint(i - 1);
        writeln!(
            w,
            "  - {{name: filler-{i:06}, vips: [{vip}], ports: [{{number: {port}, name: http}}], \
             endpoints: [{{address: {endpoint}, ports: {{http: 9000}}, locality: {LOCALITY}}}], \
             healthCheck: {{disabled: true}}}}"
        )?;
    }
    w.flush()?;
    Ok(())
}

/// Filler `j`'s VIP: 127.210.0.0/16, one port per 65,536 fillers.
fn filler_vip(j: u32) -> (String, u32) {
    let ip = format!("127.210.{}.{}", (j >> 8) & 0xff, j & 0xff);
    (ip, 80 + (j >> 16))
}

/// Filler `j`'s endpoint: 127.211.0.0/16 (never contacted: health checks are off).
fn filler_endpoint(j: u32) -> String {
    format!("127.211.{}.{}", (j >> 8) & 0xff, j & 0xff)
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One row per target, in first-seen order, with the VIP/direct ratio on VIP rows: the
/// median over runs of each run's ratio.
fn summarize(setup: &str, results: &[RunResult]) -> Vec<Row> {
    let mut targets: Vec<&str> = Vec::new();
    for r in results {
        if !targets.contains(&r.target.as_str()) {
            targets.push(&r.target);
        }
    }
    let mut rows: Vec<Row> = targets
        .iter()
        .map(|t| {
            let of = |f: fn(&RunResult) -> f64| {
                median(results.iter().filter(|r| r.target == *t).map(f).collect())
            };
            Row {
                setup: setup.to_owned(),
                target: (*t).to_owned(),
                ns_per_connect: of(RunResult::ns_per_connect),
                connects_per_sec: of(RunResult::connects_per_sec),
                slow: results
                    .iter()
                    .filter(|r| r.target == *t)
                    .map(|r| r.slow)
                    .sum(),
                ratio: None,
            }
        })
        .collect();
    // Each run's VIP time over the same run's direct time: the two were measured side by
    // side, so the ratio of a run cancels what the machine did meanwhile.
    let ratios: Vec<f64> = results
        .iter()
        .filter(|r| r.target == "VIP")
        .filter_map(|vip| {
            let direct = results
                .iter()
                .find(|r| r.target == "direct" && r.run == vip.run)?;
            Some(vip.ns_per_connect() / direct.ns_per_connect())
        })
        .collect();
    if !ratios.is_empty() {
        for row in rows.iter_mut().filter(|r| r.target == "VIP") {
            row.ratio = Some(median(ratios.clone()));
        }
    }
    rows
}

/// `12345.6` → `12,346`.
/// The sum of the samples of `name` in a Prometheus text exposition (one sample for a
/// series without labels); `None` when there is none.
pub(crate) fn metric_sum(text: &str, name: &str) -> Option<u64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *sum.get_or_insert(0) += value as u64;
    }
    sum
}

/// The 1-minute load average, as `/proc/loadavg` says it.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

pub(crate) fn thousands(value: f64) -> String {
    let digits = format!("{value:.0}");
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn report(
    args: &BenchArgs,
    rows: &[Row],
    costs: &[(String, ProgramCost)],
    notes: &[String],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## connect() through a detour VIP vs direct\n\n\
         {} runs × {} connects per row (connect, then close with RST), with the agent: \
         direct and VIP interleaved in blocks of {}; each figure is the median over runs, \
         the ratio the median of each run's VIP / direct. Connects over {SLOW_CONNECT:?} (a SYN \
         the backend's full accept queue dropped) are counted apart, not in the means.\n",
        args.runs,
        thousands(f64::from(args.connects)),
        args.block
    );
    let _ = writeln!(
        out,
        "| setup | target | mean ns/connect | connects/s | slow, left out | VIP / direct |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
    for r in rows {
        let addr = if r.target == "VIP" { VIP } else { BACKEND };
        let ratio = r.ratio.map_or_else(String::new, |x| format!("{x:.3}"));
        let _ = writeln!(
            out,
            "| {} | {} {addr} | {} | {} | {} | {ratio} |",
            r.setup,
            r.target,
            thousands(r.ns_per_connect),
            thousands(r.connects_per_sec),
            r.slow
        );
    }
    let _ = writeln!(
        out,
        "\n### The programs' own run time (BPF_ENABLE_STATS), summed over each target's runs\n"
    );
    let _ = writeln!(
        out,
        "| setup | target | program | runs/connect | ns/run | ns/connect |"
    );
    let _ = writeln!(out, "|---|---|---|---:|---:|---:|");
    for (setup, c) in costs {
        let _ = writeln!(
            out,
            "| {setup} | {} | {} | {:.2} | {:.0} | {:.0} |",
            c.target, c.program, c.runs_per_connect, c.ns_per_run, c.ns_per_connect
        );
    }
    let _ = writeln!(out);
    for note in notes {
        let _ = writeln!(out, "- {note}");
    }
    out
}

/// `TcpExt: ListenOverflows` from /proc/net/netstat (this network namespace).
fn listen_overflows() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next()?, tcp_ext.next()?);
    let index = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(index)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn filler_vips_are_distinct_for_100k() {
        let mut seen = std::collections::HashSet::new();
        for j in 0..100_000 {
            let (ip, port) = filler_vip(j);
            assert!(ip.starts_with("127.210."));
            assert!(seen.insert((ip, port)), "duplicate VIP for filler {j}");
        }
        assert_ne!(filler_endpoint(0), filler_endpoint(256));
    }

    #[test]
    fn config_has_bench_plus_fillers() {
        use detour_agent::config::HealthCheckKind;
        let dir = detour_testbed::TempDir::new().unwrap();
        let path = dir.join("c.yaml");
        write_config(&path, 3).unwrap();
        let config = detour_agent::config::parse(&std::fs::read_to_string(&path).unwrap())
            .expect("the agent accepts the benchmark's config");
        assert_eq!(config.node.locality.to_string(), LOCALITY);
        // Each service: name, VIP:port, backend, and whether it is health checked.
        let shape: Vec<(String, String, String, bool)> = config
            .services
            .iter()
            .map(|s| {
                let ([vip], [port], [endpoint]) = (&s.vips[..], &s.ports[..], &s.endpoints[..])
                else {
                    panic!("{} has one VIP, port and endpoint", s.name);
                };
                assert_eq!(endpoint.locality.to_string(), LOCALITY);
                (
                    s.name.clone(),
                    SocketAddr::new(*vip, port.number).to_string(),
                    SocketAddr::new(endpoint.address, endpoint.port_for(port)).to_string(),
                    s.health_check.kind != HealthCheckKind::None,
                )
            })
            .collect();
        let row = |name: &str, vip: &str, backend: &str, checked| {
            (name.to_owned(), vip.to_owned(), backend.to_owned(), checked)
        };
        assert_eq!(
            shape,
            [
                row("bench", VIP, BACKEND, true),
                row("filler-000001", "127.210.0.0:80", "127.211.0.0:9000", false),
                row("filler-000002", "127.210.0.1:80", "127.211.0.1:9000", false),
            ]
        );
    }

    #[test]
    fn summary_ratio() {
        let r = |target: &str, run: u32, ms: u64| RunResult {
            target: target.into(),
            run,
            elapsed: Duration::from_millis(ms),
            connects: 1000,
            slow: 0,
            slow_elapsed: Duration::ZERO,
        };
        let rows = summarize(
            "s",
            &[
                r("direct", 0, 10),
                r("VIP", 0, 11),
                r("direct", 1, 20),
                r("VIP", 1, 12),
                r("VIP", 2, 13),
                r("direct", 2, 12),
            ],
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].ns_per_connect, 12_000.0);
        // Per run: 1.1, 0.6, 13/12; the median is 13/12, not 12/12 (ratio of medians).
        assert!((rows[1].ratio.unwrap() - 13.0 / 12.0).abs() < 1e-9);
    }

    #[test]
    fn program_costs_are_attributed_to_the_run_that_caused_them() {
        let at =
            |ns, count| BTreeMap::from([("detour_connect4".to_owned(), RunTime { ns, count })]);
        let run = |target: &str| RunResult {
            target: target.into(),
            run: 0,
            elapsed: Duration::from_millis(1),
            connects: 100,
            slow: 0,
            slow_elapsed: Duration::ZERO,
        };
        let mut costs = Costs::default();
        costs.add(&run("VIP"), &at(1_000, 10), &at(51_000, 110));
        costs.add(&run("direct"), &at(51_000, 110), &at(61_000, 210));
        costs.add(&run("VIP"), &at(61_000, 210), &at(101_000, 310));
        let rows = costs.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].target.as_str(), rows[0].ns_per_run),
            ("direct", 100.0)
        );
        let vip = &rows[1];
        assert_eq!(vip.target, "VIP");
        assert_eq!(vip.runs_per_connect, 1.0);
        assert_eq!(vip.ns_per_run, 450.0);
        assert_eq!(vip.ns_per_connect, 450.0);
    }

    #[test]
    fn client_connects_and_sink_accepts() {
        let sink = AcceptSink::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = SockAddr::from(sink.addr);
        for _ in 0..100 {
            connect_once(&addr).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.accepted() < 100 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.accepted(), 100);
        drop(sink);
        assert!(connect_once(&addr).is_err(), "the sink must stop listening");
    }

    #[test]
    fn reads_listen_overflows() {
        assert!(listen_overflows().is_some());
    }
}
