//! `cargo xtask bench-failover`: failover measured against HAProxy, and the price of the
//! path (throughput and latency) through detour, through HAProxy and direct.
//!
//! The bed: two primary HTTP backends (`us-east1/us-east1-b`, the node's zone), each in its
//! own network namespace behind its own veth pair, so one can be refused (stopped) or
//! black-holed (its link taken down) alone; a failover backend (`us-west`) on loopback.
//! detour serves them on a VIP with the failover rule `us-east1 → us-west`; HAProxy (from
//! Debian's packages, installed on demand) serves the same three with the backup server as
//! the failover tier, tuned as tightly as it goes (`observe layer4`, `error-limit 1`,
//! `on-error mark-down`, 100 ms checks, retries redispatched to another server).
//!
//! Clients run inside the agent's cgroup as a re-executed `failover-client`: threads
//! sending HTTP/1.1 GETs, one new connection per request, every request recorded with its
//! start (CLOCK_MONOTONIC, shared by all processes), latency and who answered (or how it
//! failed). Two measurements:
//! - fault runs: paced load (an open loop, so a stalled request does not hold back the
//!   next) on the VIP or on HAProxy; after `--before` one primary is stopped (refused) or
//!   black-holed; the run goes on for `--after`. Reported: failed requests, when the last
//!   request went to the dead backend ("traffic moved"), when detour ejected it / HAProxy
//!   marked it down, latency in the first second after it;
//! - steady state: the same client against the backends directly, the VIP and HAProxy,
//!   saturated at a few concurrency levels (throughput) and paced (latency).
//!
//! Which request "went to the dead backend": through detour, every failed request (only
//! the dead backend fails; a failure before the fault would be reported); through
//! HAProxy, every session its log shows retried (only the dead backend refuses or times
//! out a connect) or failed, since HAProxy hides retries from the client.
//!
//! The fault instant is when the injecting call returned: the stopped backend's listener
//! closes just before `stop()` returns, and `ip link set down` exits right after its one
//! netlink request. Just before it, the dead backend's TIME_WAIT sockets are destroyed
//! (unless `--keep-time-wait`): a SYN that meets one once the listener is gone gets a
//! stale ACK instead of a reset, and the client only resends it after 2 jiffies, so the
//! refusal arrives 8 ms late (HZ=250) and how often that happens depends on the load
//! that came before — a confound, measured separately.
//!
//! Invariants:
//! - traffic stays on 127.0.0.0/8 and inside the namespaces this task creates
//!   (10.232.0.0/29); black holes are links taken down inside them;
//! - every resource (namespaces, veths, backends, pins, cgroup, agent, event stream,
//!   HAProxy) is a guard owned by `run`, so any error tears everything down;
//! - every wait is bounded: clients have a deadline, settling has one, the task has one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use detour_testbed::{
    mono_ns, Agent, AgentBed, Cgroup, HttpBackend, LineStream, Netns, TempDir, Veth,
};

use crate::bench::thousands;
use crate::{cmd, parse_duration, setup};

/// The detour VIP of the service.
const VIP: &str = "127.202.0.1:80";
/// HAProxy's listener for fault runs (logs every session).
const HAPROXY_FAULT: &str = "127.0.6.1:80";
/// HAProxy's listener for steady-state runs (no logging, so it costs HAProxy nothing).
const HAPROXY_STEADY: &str = "127.0.6.1:81";
const WEST: &str = "127.0.5.1:8080";
const NODE_LOCALITY: &str = "us-east1/us-east1-b";
const WEST_LOCALITY: &str = "us-west/us-west-1a";
const SERVICE: &str = "failover";
/// The backend every fault run kills.
const DEAD: &str = "east-a";

/// One primary's addresses: the veth's root end, its namespace end, the backend.
struct PrimarySpec {
    name: &'static str,
    host_cidr: &'static str,
    ns_cidr: &'static str,
    addr: &'static str,
}

const PRIMARIES: [PrimarySpec; 2] = [
    PrimarySpec {
        name: "east-a",
        host_cidr: "10.232.0.1/30",
        ns_cidr: "10.232.0.2/30",
        addr: "10.232.0.2:8080",
    },
    PrimarySpec {
        name: "east-b",
        host_cidr: "10.232.0.5/30",
        ns_cidr: "10.232.0.6/30",
        addr: "10.232.0.6:8080",
    },
];

/// How long agent and HAProxy get to see every backend healthy again after a fault.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The latency window after a fault.
const FAULT_WINDOW: Duration = Duration::from_secs(1);
/// Lead time between spawning a client and its first request.
pub(crate) const CLIENT_LEAD: Duration = Duration::from_millis(300);
/// A paced request whose thread took it up this long after it was due was held back by a
/// full pool: the client counts those, and the bench fails the run if there are any.
const LATE: u64 = 2_000_000;

#[derive(clap::Args)]
pub struct FailoverArgs {
    /// Runs; every figure is the median over runs.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Client threads of the saturated runs (each sends its next request as soon as its
    /// last one ended), comma-separated: throughput is measured at each level.
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    workers: Vec<u32>,
    /// Request rate of the paced runs (fault runs and the latency columns): an open loop,
    /// requests are sent on schedule whether earlier ones have ended or not.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Threads of the paced runs: how many requests can be in flight at once.
    #[arg(long, default_value_t = 256)]
    in_flight: u32,
    /// Leave the TIME_WAIT sockets the load left on the dead backend in place (by default
    /// they are destroyed just before each fault). A SYN that meets one of them once the
    /// listener is gone is answered with a stale ACK, and the client resends it only after
    /// 2 jiffies before it is refused (see docs/benchmarks.md).
    #[arg(long)]
    keep_time_wait: bool,
    /// Print each fault run's timeline to stderr: requests that failed or took over 20 ms,
    /// HAProxy's retried or failed sessions, what detour (`detour events`) and HAProxy
    /// (its log) reported, in ms from the fault.
    #[arg(long)]
    timeline: bool,
    /// Load before the fault.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    before: Duration,
    /// Load after the fault.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    after: Duration,
    /// Length of each steady-state load (per path: each saturated level, then paced).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    steady: Duration,
    /// Per-request timeout (connect and response).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    timeout: Duration,
    /// HAProxy's mode: `tcp` (L4 like detour, its cheapest) or `http`.
    #[arg(long, value_enum, default_value_t = HaproxyMode::Tcp)]
    haproxy_mode: HaproxyMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HaproxyMode {
    Tcp,
    Http,
}

impl HaproxyMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
        }
    }
}

/// Arguments of the hidden `failover-client` subcommand.
#[derive(clap::Args)]
pub struct ClientArgs {
    /// Where to send requests; several are used round-robin by each thread.
    #[arg(long = "target", required = true)]
    targets: Vec<SocketAddr>,
    #[arg(long)]
    workers: u32,
    /// Requests per second, open loop; 0: each thread back to back (closed loop).
    #[arg(long)]
    rate: u32,
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, value_parser = parse_duration)]
    timeout: Duration,
    /// CLOCK_MONOTONIC nanoseconds of the first request.
    #[arg(long)]
    start_at: u64,
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the duration of the call.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, to place HAProxy's wall-clock log times.
fn realtime_offset_ns() -> i128 {
    let mono = mono_ns();
    let real = clock_ns(libc::CLOCK_REALTIME);
    i128::from(real) - i128::from(mono)
}

fn sleep_until(mono: u64) {
    let now = mono_ns();
    if mono > now {
        thread::sleep(Duration::from_nanos(mono - now));
    }
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------
// The client (inside the cgroup)

/// One request as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) start_ns: u64,
    pub(crate) latency_ns: u64,
    /// The backend that answered, or `!phase:kind` for a failure.
    pub(crate) outcome: String,
}

impl Request {
    pub(crate) fn failed(&self) -> bool {
        self.outcome.starts_with('!')
    }

    fn end_ns(&self) -> u64 {
        self.start_ns + self.latency_ns
    }
}

/// Runs the threads and prints one line per request: `start_ns latency_ns outcome`.
///
/// Paced (`rate > 0`) is an open loop: request `k` is due at `start + k / rate` whatever
/// the others are doing, and the threads are a pool that takes the next due request, so
/// a stalled request does not hold back the ones behind it (as with many independent
/// callers) until every thread is stalled. Saturated (`rate == 0`) is a closed loop: each
/// thread sends its next request as soon as the last one ended.
pub fn client(args: &ClientArgs) -> Result<()> {
    ensure!(args.workers > 0, "--workers must be positive");
    sleep_until(args.start_at);
    let start = args.start_at.max(mono_ns());
    let end = start + nanos(args.duration);
    let period = if args.rate == 0 {
        0
    } else {
        1_000_000_000 / u64::from(args.rate)
    };
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let late = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let threads: Vec<_> = (0..args.workers)
        .map(|w| {
            let (targets, timeout) = (args.targets.clone(), args.timeout);
            let (next, late) = (next.clone(), late.clone());
            thread::spawn(move || {
                let mut out = Vec::new();
                let mut i = w as usize;
                loop {
                    if period > 0 {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let due = start + k * period;
                        if due >= end {
                            break;
                        }
                        // A thread that takes a slot already past due found no thread
                        // free before (waking up late from the sleep is scheduling
                        // noise, not a full pool).
                        if mono_ns() > due + LATE {
                            late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        sleep_until(due);
                    }
                    let t0 = mono_ns();
                    if t0 >= end && period == 0 {
                        break;
                    }
                    let outcome = request(targets[i % targets.len()], timeout);
                    i += 1;
                    out.push(Request {
                        start_ns: t0,
                        latency_ns: mono_ns() - t0,
                        outcome,
                    });
                }
                out
            })
        })
        .collect();
    let mut stdout = BufWriter::new(std::io::stdout().lock());
    for t in threads {
        let requests = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        for r in requests {
            writeln!(stdout, "{} {} {}", r.start_ns, r.latency_ns, r.outcome)?;
        }
    }
    writeln!(
        stdout,
        "# late {}",
        late.load(std::sync::atomic::Ordering::Relaxed)
    )?;
    stdout.flush()?;
    Ok(())
}

/// `GET /` on a new connection; the answering backend's name, or `!phase:kind`.
fn request(addr: SocketAddr, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut conn = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(conn) => conn,
        Err(e) => return format!("!connect:{}", error_kind(&e)),
    };
    let _ = conn.set_nodelay(true);
    let mut io = || -> std::io::Result<Vec<u8>> {
        conn.set_write_timeout(Some(timeout))?;
        conn.write_all(b"GET / HTTP/1.1\r\nHost: failover\r\nConnection: close\r\n\r\n")?;
        let mut raw = Vec::with_capacity(256);
        let mut buf = [0u8; 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            conn.set_read_timeout(Some(left))?;
            match conn.read(&mut buf)? {
                0 => return Ok(raw),
                n => raw.extend_from_slice(&buf[..n]),
            }
        }
    };
    let raw = match io() {
        Ok(raw) => raw,
        Err(e) => return format!("!response:{}", error_kind(&e)),
    };
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return "!response:incomplete".to_owned();
    };
    match head.split_whitespace().nth(1) {
        Some("200") => body.trim().to_owned(),
        Some(status) => format!("!response:status-{status}"),
        None => "!response:malformed".to_owned(),
    }
}

fn error_kind(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused",
        ErrorKind::ConnectionAborted => "aborted",
        ErrorKind::ConnectionReset => "reset",
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
        ErrorKind::AddrNotAvailable => "no-port",
        _ => "other",
    }
}

fn parse_request(line: &str) -> Result<Request> {
    let mut f = line.splitn(3, ' ');
    let (Some(start), Some(latency), Some(outcome)) = (f.next(), f.next(), f.next()) else {
        bail!("bad client line {line:?}");
    };
    Ok(Request {
        start_ns: start.parse()?,
        latency_ns: latency.parse()?,
        outcome: outcome.to_owned(),
    })
}

/// A client process in the cgroup, and the thread collecting its output. If it is dropped
/// unfinished (an error), the cgroup's guard kills it with everything else in there.
pub(crate) struct ClientRun {
    client: LineStream,
    deadline: Instant,
}

impl ClientRun {
    pub(crate) fn spawn(
        cgroup: &Cgroup,
        targets: &[&str],
        workers: u32,
        rate: u32,
        duration: Duration,
        timeout: Duration,
        start_at: u64,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let mut command = Command::new(exe);
        command
            .arg("failover-client")
            .args(["--workers", &workers.to_string()])
            .args(["--rate", &rate.to_string()])
            .args(["--duration", &format!("{}ms", duration.as_millis())])
            .args(["--timeout", &format!("{}ms", timeout.as_millis())])
            .args(["--start-at", &start_at.to_string()]);
        for t in targets {
            command.args(["--target", t]);
        }
        Ok(Self {
            client: LineStream::spawn_in(cgroup, &mut command)?,
            deadline: Instant::now() + CLIENT_LEAD + duration + timeout + Duration::from_secs(10),
        })
    }

    pub(crate) fn finish(self) -> Result<Vec<Request>> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let (status, lines) = self
            .client
            .wait(left)
            .context("the failover client overran its deadline")?;
        ensure!(status.success(), "the failover client failed: {status}");
        let mut late = 0;
        let mut requests = Vec::with_capacity(lines.len());
        for (_, line) in &lines {
            match line.strip_prefix("# late ") {
                Some(n) => late = n.parse()?,
                None => requests.push(parse_request(line)?),
            }
        }
        // An open loop that fell behind measured something else: say so, loudly.
        ensure!(
            late == 0,
            "{late} paced requests started over {}ms late: every client thread was busy \
             (raise --in-flight or lower --rate)",
            LATE / 1_000_000
        );
        Ok(requests)
    }
}

// ---------------------------------------------------------------------------------------
// HAProxy

/// HAProxy running in the foreground with its config and stats socket in a temp dir.
struct Haproxy {
    stream: LineStream,
    stats: PathBuf,
}

fn ensure_haproxy() -> Result<()> {
    if cmd::succeeds(Command::new("haproxy").arg("-v")) {
        return Ok(());
    }
    eprintln!("bench-failover: haproxy is missing; installing Debian's package");
    let apt = || {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    cmd::run(apt().arg("update"))?;
    cmd::run(apt().args(["install", "-y", "haproxy"]))?;
    ensure!(
        cmd::succeeds(Command::new("haproxy").arg("-v")),
        "haproxy was installed but `haproxy -v` fails"
    );
    Ok(())
}

fn haproxy_version() -> String {
    cmd::stdout_of(Command::new("haproxy").arg("-v"))
        .and_then(|v| v.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "haproxy (version unknown)".to_owned())
}

/// The HAProxy configuration: the same three backends, west as the backup (failover
/// tier), health from 100 ms checks and from every connection (`observe layer4`), one
/// error marks a server down, and a failed connect is retried on another server.
fn haproxy_config(mode: HaproxyMode, stats: &Path) -> String {
    let server_opts =
        "check inter 100ms fall 1 rise 1 observe layer4 error-limit 1 on-error mark-down";
    let servers = |out: &mut String| {
        for p in &PRIMARIES {
            let _ = writeln!(out, "    server {} {} {server_opts}", p.name, p.addr);
        }
        let _ = writeln!(out, "    server west {WEST} {server_opts} backup");
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "global\n\
         \x20   log stdout format raw local0\n\
         \x20   maxconn 4096\n\
         \x20   stats socket {} mode 600 level admin\n\
         defaults\n\
         \x20   mode {}\n\
         \x20   balance roundrobin\n\
         \x20   timeout connect 100ms\n\
         \x20   timeout check 100ms\n\
         \x20   timeout client 5s\n\
         \x20   timeout server 5s\n\
         \x20   retries 3\n\
         \x20   option redispatch 1\n",
        stats.display(),
        mode.as_str()
    );
    if mode == HaproxyMode::Http {
        // Also retry a request whose server died after the connect (safe: GETs).
        out.push_str("    retry-on all-retryable-errors\n");
    }
    let _ = writeln!(
        out,
        "listen {SERVICE}\n\
         \x20   bind {HAPROXY_FAULT}\n\
         \x20   log global\n\
         \x20   log-format \"session %Ts.%ms %s %rc %Tc %Tt %ts\""
    );
    servers(&mut out);
    let _ = writeln!(out, "listen steady\n    bind {HAPROXY_STEADY}");
    servers(&mut out);
    out
}

/// One session from HAProxy's log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    /// Accept time, wall clock, milliseconds since the epoch.
    accept_ms: u64,
    server: String,
    retries: u32,
    /// Total session time, ms (-1: unknown).
    total_ms: i64,
    /// Termination state, `--` when it ended normally.
    state: String,
}

/// `session 1700000000.123 east-b +1 0 3 --` (see `haproxy_config`).
fn parse_session(line: &str) -> Option<Session> {
    let mut f = line.split_whitespace();
    if f.next()? != "session" {
        return None;
    }
    let (secs, ms) = f.next()?.split_once('.')?;
    let accept_ms = secs.parse::<u64>().ok()? * 1000 + ms.parse::<u64>().ok()?;
    let server = f.next()?.to_owned();
    let retries = f.next()?.trim_start_matches('+').parse().ok()?;
    let _connect_ms = f.next()?;
    let total_ms = f.next()?.parse().ok()?;
    let state = f.next()?.to_owned();
    Some(Session {
        accept_ms,
        server,
        retries,
        total_ms,
        state,
    })
}

impl Haproxy {
    fn start(tmp: &TempDir, mode: HaproxyMode) -> Result<Self> {
        let config = tmp.join("haproxy.cfg");
        let stats = tmp.join("haproxy.sock");
        std::fs::write(&config, haproxy_config(mode, &stats))?;
        cmd::run(
            Command::new("haproxy")
                .arg("-c")
                .arg("-q")
                .arg("-f")
                .arg(&config),
        )
        .context("HAProxy rejected the bench's config")?;
        let stream = LineStream::spawn(Command::new("haproxy").arg("-db").arg("-f").arg(&config))?;
        Ok(Self { stream, stats })
    }

    /// `show stat`: (proxy, server) → status, for servers only.
    fn statuses(&self) -> Result<BTreeMap<(String, String), String>> {
        let mut conn = UnixStream::connect(&self.stats)
            .with_context(|| format!("connecting to {}", self.stats.display()))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"show stat\n")?;
        let mut csv = String::new();
        conn.read_to_string(&mut csv)?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .context("empty `show stat`")?
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (px, sv, st) = (col("pxname"), col("svname"), col("status"));
        let (Some(px), Some(sv), Some(st)) = (px, sv, st) else {
            bail!("unexpected `show stat` header {header:?}");
        };
        let mut out = BTreeMap::new();
        for line in lines {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() > st && f[sv] != "FRONTEND" && f[sv] != "BACKEND" {
                out.insert((f[px].to_owned(), f[sv].to_owned()), f[st].to_owned());
            }
        }
        Ok(out)
    }

    fn all_up(&mut self) -> Result<bool> {
        if let Some(status) = self.stream.exited() {
            bail!("haproxy exited ({status}):\n{}", self.stream.tail());
        }
        let Ok(statuses) = self.statuses() else {
            return Ok(false);
        };
        Ok(statuses.len() == 6 && statuses.values().all(|s| s == "UP"))
    }
}

// ---------------------------------------------------------------------------------------
// The bed

/// One primary: its namespace, veth and backend (dropped in this order's reverse: the
/// backend stops first, then the veth and the namespace go).
struct Primary {
    backend: HttpBackend,
    veth: Veth,
    ns: Netns,
}

impl Primary {
    fn start(spec: &PrimarySpec) -> Result<Self> {
        let ns = Netns::new()?;
        let veth = ns.veth(spec.host_cidr, spec.ns_cidr)?;
        let backend = HttpBackend::start_in(&ns, spec.name, spec.addr.parse()?)?;
        Ok(Self { backend, veth, ns })
    }
}

fn agent_config() -> String {
    let [a, b] = &PRIMARIES;
    let host = |s: &str| s.split_once(':').map_or("", |(h, _)| h).to_owned();
    format!(
        "node: {{ locality: {NODE_LOCALITY} }}\n\
         services:\n\
         \x20 - name: {SERVICE}\n\
         \x20   vips: [{vip}]\n\
         \x20   ports: [{{number: 80, name: http, targetPort: 8080}}]\n\
         \x20   endpoints:\n\
         \x20     - {{address: {a}, locality: {NODE_LOCALITY}}}\n\
         \x20     - {{address: {b}, locality: {NODE_LOCALITY}}}\n\
         \x20     - {{address: {w}, locality: {WEST_LOCALITY}}}\n\
         \x20   localityLbSetting: {{failover: [{{from: us-east1, to: us-west}}]}}\n\
         \x20   healthCheck: {{interval: 100ms, timeout: 100ms, unhealthyThreshold: 1, healthyThreshold: 1}}\n\
         \x20   outlierDetection: {{consecutiveErrors: 1, interval: 1s, baseEjectionTime: 30s, handshakeTimeout: 100ms}}\n",
        vip = host(VIP),
        a = host(a.addr),
        b = host(b.addr),
        w = host(WEST),
    )
}

/// Everything a run needs, borrowed from the guards `run` owns.
struct Bed<'a> {
    cgroup: &'a Cgroup,
    agent: &'a Agent,
    events: &'a LineStream,
    haproxy: &'a mut Haproxy,
    dead: &'a mut Primary,
    args: &'a FailoverArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Refused,
    BlackHole,
}

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Self::Refused => "refused (backend stopped)",
            Self::BlackHole => "black-holed (link down)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    Detour,
    Haproxy,
}

impl Bed<'_> {
    /// Waits until detour has every endpoint healthy, not ejected, the primaries in the
    /// table, and HAProxy has every server up.
    fn wait_settled(&mut self) -> Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let detour = self
                .agent
                .endpoints_json(Some(SERVICE))
                .ok()
                .and_then(|eps| {
                    let eps = eps.as_array()?.clone();
                    Some(eps.len() == 3 && eps.iter().all(endpoint_settled))
                })
                .unwrap_or(false);
            if detour && self.haproxy.all_up()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "backends not healthy again {SETTLE_TIMEOUT:?} after the fault: detour {}, \
                     haproxy {:?}{}",
                    self.agent
                        .cli(&["endpoints", SERVICE])
                        .unwrap_or_else(|e| format!("{e:#}")),
                    self.haproxy.statuses().ok(),
                    self.agent.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn inject(&mut self, fault: Fault) -> Result<()> {
        match fault {
            Fault::Refused => {
                self.dead.backend.stop();
                Ok(())
            }
            Fault::BlackHole => self.link_down(),
        }
    }

    /// `ip -n NS link set PEER down`, waited for closely: the testbed's `set_peer_up`
    /// polls for the exit every 5 ms, which would blur the fault instant.
    fn link_down(&self) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["-n", self.dead.ns.name(), "link", "set"])
            .args([self.dead.veth.peer_name(), "down"])
            .stdin(Stdio::null())
            .spawn()
            .context("spawning ip")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(status.success(), "`ip link set down` failed: {status}");
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("`ip link set down` did not finish within 10s");
            }
            thread::sleep(Duration::from_micros(50));
        }
    }

    fn repair(&mut self, fault: Fault) -> Result<()> {
        match fault {
            Fault::Refused => self.dead.backend.start(),
            Fault::BlackHole => self.dead.veth.set_peer_up(true),
        }
    }

    /// One fault run: paced load, the fault after `before`, load for `after` more.
    fn fault_run(&mut self, system: System, fault: Fault) -> Result<FaultRun> {
        self.wait_settled()?;
        let args = self.args;
        let target = match system {
            System::Detour => VIP,
            System::Haproxy => HAPROXY_FAULT,
        };
        let start_at = mono_ns() + nanos(CLIENT_LEAD);
        let client = ClientRun::spawn(
            self.cgroup,
            &[target],
            args.in_flight,
            args.rate,
            args.before + args.after,
            args.timeout,
            start_at,
        )?;
        sleep_until(start_at + nanos(args.before));
        let time_wait = self.time_wait(!args.keep_time_wait);
        let offset = realtime_offset_ns();
        let injecting = mono_ns();
        let injected = self.inject(fault);
        // The fault instant is when the injecting call returned: a stopped backend's
        // listener closes just before `stop()` returns, and `ip link set down` exits
        // right after its one netlink request.
        let fault_ns = mono_ns();
        let requests = client.finish();
        let repaired = self.repair(fault);
        injected?;
        repaired?;
        let requests = requests?;
        let proxy_lines = self.haproxy.stream.since(start_at);
        let attempts = match system {
            System::Detour => None,
            System::Haproxy => Some(haproxy_attempts(&proxy_lines, offset, &requests)),
        };
        let reports = match system {
            System::Detour => self.events.since(injecting),
            System::Haproxy => self.haproxy.stream.since(injecting),
        };
        let detected = match system {
            System::Detour => detour_detection(&reports, PRIMARIES[0].addr),
            System::Haproxy => haproxy_detection(&reports),
        };
        if args.timeline {
            print_timeline(system, fault, fault_ns, &requests, &reports, offset);
        }
        let mut run = analyze_fault(&requests, injecting, fault_ns, attempts.as_deref());
        run.detected_ms = detected.detected.map(|t| ms_between(fault_ns, t));
        run.suspect_ms = detected.suspect.map(|t| ms_between(fault_ns, t));
        run.inject_ms = ms_between(injecting, fault_ns);
        run.time_wait = time_wait?;
        Ok(run)
    }

    /// TIME_WAIT sockets in the dead backend's namespace (before clearing them, if asked).
    fn time_wait(&self, clear: bool) -> Result<usize> {
        let out = self.dead.ns.exec("ss", &["-Htan", "state", "time-wait"])?;
        if clear {
            self.dead.ns.exec("ss", &["-HKtan", "state", "time-wait"])?;
        }
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }

    /// One steady-state run against `targets`: saturated at each `--workers` level, then
    /// paced.
    fn steady_run(&mut self, targets: &[&str]) -> Result<Steady> {
        self.wait_settled()?;
        let args = self.args;
        let load = |threads: u32, rate: u32| -> Result<Load> {
            let start_at = mono_ns() + nanos(CLIENT_LEAD);
            let client = ClientRun::spawn(
                self.cgroup,
                targets,
                threads,
                rate,
                args.steady,
                args.timeout,
                start_at,
            )?;
            Ok(summarize_load(&client.finish()?, args.steady))
        };
        let saturated = args
            .workers
            .iter()
            .map(|&threads| load(threads, 0))
            .collect::<Result<Vec<_>>>()?;
        let paced = load(args.in_flight, args.rate)?;
        Ok(Steady { saturated, paced })
    }
}

/// One steady-state run of one path.
#[derive(Debug, Clone)]
struct Steady {
    /// At each `--workers` level, in order.
    saturated: Vec<Load>,
    paced: Load,
}

fn endpoint_settled(e: &serde_json::Value) -> bool {
    let west = e["locality"] == WEST_LOCALITY;
    e["health"] == "HEALTHY" && e["outlier"] == "OK" && (west || e["in_table"] == true)
}

fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    (i128::from(to_ns) - i128::from(from_ns)) as f64 / 1e6
}

/// One fault run, request by request around the fault, relative to it (stderr).
fn print_timeline(
    system: System,
    fault: Fault,
    fault_ns: u64,
    requests: &[Request],
    reports: &[(u64, String)],
    realtime_offset: i128,
) {
    eprintln!("--- timeline: {system:?}, {} ---", fault.describe());
    let mut lines: Vec<(u64, String)> = requests
        .iter()
        .filter(|r| r.failed() || r.latency_ns > 20_000_000)
        .map(|r| {
            let line = format!(
                "request {:>9.3} ms  {}",
                r.latency_ns as f64 / 1e6,
                r.outcome
            );
            (r.start_ns, line)
        })
        .collect();
    for (t, line) in reports {
        match parse_session(line) {
            Some(s) if s.retries > 0 || s.state != "--" => {
                let start = i128::from(s.accept_ms) * 1_000_000 - realtime_offset;
                let start = u64::try_from(start).unwrap_or(0);
                lines.push((start, format!("haproxy {line}")));
            }
            Some(_) => {}
            None => lines.push((*t, format!("report  {line}"))),
        }
    }
    lines.sort();
    for (t, line) in lines {
        eprintln!("{:>+10.3} ms  {line}", ms_between(fault_ns, t));
    }
}

// ---------------------------------------------------------------------------------------
// Analysis (pure)

/// A request's trip to the dead backend, as far as it can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attempt {
    start_ns: u64,
    end_ns: u64,
    /// It went to the dead backend (failed there, or was retried elsewhere).
    affected: bool,
}

/// HAProxy's sessions from its log lines, placed on CLOCK_MONOTONIC.
///
/// HAProxy logs the accept time to the millisecond (rounded down, from the date its event
/// loop last read), so each session that went to the dead backend is matched to the
/// client's own record of it, which has the microsecond: the request that started
/// within a millisecond or so of the accept and whose latency is closest to HAProxy's
/// total time.
fn haproxy_attempts(
    lines: &[(u64, String)],
    realtime_offset: i128,
    requests: &[Request],
) -> Vec<Attempt> {
    let mut by_start: Vec<&Request> = requests.iter().collect();
    by_start.sort_by_key(|r| r.start_ns);
    lines
        .iter()
        .filter_map(|(_, l)| parse_session(l))
        .map(|s| {
            let start = i128::from(s.accept_ms) * 1_000_000 - realtime_offset;
            let start_ns = u64::try_from(start).unwrap_or(0);
            let total_ns = u64::try_from(s.total_ms.max(0)).unwrap_or(0) * 1_000_000;
            let affected = s.retries > 0 || (s.server == DEAD && s.state != "--");
            let matched = affected
                .then(|| {
                    let (from, to) = (start_ns.saturating_sub(1_000_000), start_ns + 2_000_000);
                    let first = by_start.partition_point(|r| r.start_ns < from);
                    by_start[first..]
                        .iter()
                        .take_while(|r| r.start_ns <= to)
                        .min_by_key(|r| r.latency_ns.abs_diff(total_ns))
                })
                .flatten();
            match matched {
                Some(r) => Attempt {
                    start_ns: r.start_ns,
                    end_ns: r.end_ns(),
                    affected,
                },
                None => Attempt {
                    start_ns,
                    end_ns: start_ns + total_ns,
                    affected,
                },
            }
        })
        .collect()
}

/// When the system noticed, from its own reports (monotonic arrival times).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Detection {
    /// When it took the backend out: detour's `ejected` or an active check's
    /// `-> UNHEALTHY`, whichever came first; HAProxy's `is DOWN`.
    detected: Option<u64>,
    /// detour: the first failure report for the backend (the kernel avoids it from then).
    suspect: Option<u64>,
}

fn detour_detection(lines: &[(u64, String)], backend: &str) -> Detection {
    let mut d = Detection::default();
    for (t, line) in lines {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if e["backend"] != backend {
            continue;
        }
        let kind = e["kind"].as_str().unwrap_or_default();
        let unhealthy = kind == "health-changed"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("-> UNHEALTHY"));
        if d.detected.is_none() && (kind == "ejected" || unhealthy) {
            d.detected = Some(*t);
        }
        if d.suspect.is_none() && matches!(kind, "refused" | "timeout" | "syn-retransmit") {
            d.suspect = Some(*t);
        }
    }
    d
}

fn haproxy_detection(lines: &[(u64, String)]) -> Detection {
    let needle = format!("Server {SERVICE}/{DEAD} is DOWN");
    Detection {
        detected: lines
            .iter()
            .find(|(_, l)| l.contains(&needle))
            .map(|(t, _)| *t),
        suspect: None,
    }
}

/// One fault run's figures.
#[derive(Debug, Default, Clone)]
struct FaultRun {
    requests: usize,
    failed: usize,
    /// Of `failed`, requests sent before the fault (in flight when it struck).
    failed_in_flight: usize,
    /// Failures that ended before the fault's injection began (there should be none).
    failed_before: usize,
    failure_kinds: BTreeMap<String, usize>,
    /// Requests answered by the dead backend that started after the fault (none).
    answered_by_dead: usize,
    /// Requests that went to the dead backend and ended after the fault.
    affected: usize,
    /// From the fault to the start of the last request that went to the dead backend.
    moved_ms: Option<f64>,
    /// From the fault to the end of the last such request.
    settled_ms: Option<f64>,
    detected_ms: Option<f64>,
    suspect_ms: Option<f64>,
    inject_ms: f64,
    /// TIME_WAIT sockets in the dead backend's namespace just before the fault.
    time_wait: usize,
    /// Successful requests started in the first [`FAULT_WINDOW`] after the fault.
    window: Latency,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Latency {
    pub(crate) count: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

pub(crate) fn latency_of(mut ns: Vec<u64>) -> Latency {
    ns.sort_unstable();
    let at = |q: f64| {
        if ns.is_empty() {
            return f64::NAN;
        }
        // Nearest rank.
        let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len());
        ns[rank - 1] as f64 / 1e6
    };
    Latency {
        count: ns.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

/// Figures of one fault run. `proxy` are HAProxy's sessions (it hides retries from the
/// client); without them, a request went to the dead backend iff it failed.
fn analyze_fault(
    requests: &[Request],
    injecting_ns: u64,
    fault_ns: u64,
    proxy: Option<&[Attempt]>,
) -> FaultRun {
    let mut run = FaultRun {
        requests: requests.len(),
        ..FaultRun::default()
    };
    for r in requests.iter().filter(|r| r.failed()) {
        run.failed += 1;
        if r.start_ns < fault_ns {
            run.failed_in_flight += 1;
        }
        if r.end_ns() < injecting_ns {
            run.failed_before += 1;
        }
        *run.failure_kinds
            .entry(r.outcome.trim_start_matches('!').to_owned())
            .or_default() += 1;
    }
    run.answered_by_dead = requests
        .iter()
        .filter(|r| r.start_ns >= fault_ns && r.outcome == DEAD)
        .count();
    let from_client: Vec<Attempt> = requests
        .iter()
        .map(|r| Attempt {
            start_ns: r.start_ns,
            end_ns: r.end_ns(),
            affected: r.failed() || (r.start_ns >= fault_ns && r.outcome == DEAD),
        })
        .collect();
    let attempts = proxy.unwrap_or(&from_client);
    let affected: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.affected && a.end_ns >= fault_ns)
        .collect();
    run.affected = affected.len();
    run.moved_ms = affected
        .iter()
        .map(|a| a.start_ns)
        .max()
        .map(|t| ms_between(fault_ns, t));
    run.settled_ms = affected
        .iter()
        .map(|a| a.end_ns)
        .max()
        .map(|t| ms_between(fault_ns, t));
    let window_end = fault_ns + nanos(FAULT_WINDOW);
    run.window = latency_of(
        requests
            .iter()
            .filter(|r| !r.failed() && (fault_ns..window_end).contains(&r.start_ns))
            .map(|r| r.latency_ns)
            .collect(),
    );
    run
}

/// A steady-state run's figures.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Load {
    ok: usize,
    failed: usize,
    per_sec: f64,
    latency: Latency,
}

fn summarize_load(requests: &[Request], duration: Duration) -> Load {
    let ok: Vec<u64> = requests
        .iter()
        .filter(|r| !r.failed())
        .map(|r| r.latency_ns)
        .collect();
    Load {
        ok: ok.len(),
        failed: requests.len() - ok.len(),
        per_sec: ok.len() as f64 / duration.as_secs_f64(),
        latency: latency_of(ok),
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| !v.is_nan());
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

// ---------------------------------------------------------------------------------------
// The task

pub fn run(args: &FailoverArgs) -> Result<()> {
    detour_testbed::require_root("cargo xtask bench-failover")?;
    ensure!(
        args.runs > 0 && args.rate > 0 && args.in_flight > 0,
        "--runs, --rate and --in-flight must be positive"
    );
    ensure!(
        !args.workers.is_empty() && !args.workers.contains(&0),
        "--workers must list positive thread counts"
    );
    ensure!(
        args.after >= FAULT_WINDOW,
        "--after must be at least {FAULT_WINDOW:?}"
    );
    setup::run()?;
    ensure_haproxy()?;
    let binary = cmd::build_agent()?;
    let steady_loads = u32::try_from(args.workers.len())? + 1;
    let per_run = (args.before + args.after + args.timeout + CLIENT_LEAD) * 4
        + (args.steady + args.timeout + CLIENT_LEAD) * 3 * steady_loads;
    let deadline = Instant::now() + per_run * args.runs * 2 + Duration::from_secs(120);

    // Guards, dropped in reverse order: HAProxy, the event stream, the agent bed (agent,
    // pins — detaching the programs —, cgroup, its temp dir), backends, veths and
    // namespaces, HAProxy's temp dir.
    let tmp = TempDir::new()?;
    let [a, b] = &PRIMARIES;
    let mut primary_a = Primary::start(a)?;
    let _primary_b = Primary::start(b)?;
    let _west = HttpBackend::start_at("west", WEST.parse()?)?;
    let mut node = AgentBed::new(&binary)?;
    node.write_config(&agent_config())?;
    let socket = node.options().socket;
    node.start_agent(&[], Duration::from_secs(30))?;
    let events = LineStream::spawn(
        Command::new(&binary)
            .args(["events", "-o", "json", "--socket"])
            .arg(&socket),
    )?;
    let (cgroup, agent) = (&node.cgroup, node.agent.as_ref().expect("started"));
    let mut haproxy = Haproxy::start(&tmp, args.haproxy_mode)?;
    let mut bed = Bed {
        cgroup,
        agent,
        events: &events,
        haproxy: &mut haproxy,
        dead: &mut primary_a,
        args,
    };
    let direct: Vec<&str> = PRIMARIES.iter().map(|p| p.addr).collect();
    let steady_targets: [(&str, Vec<&str>); 3] = [
        ("direct", direct),
        ("detour VIP", vec![VIP]),
        ("HAProxy", vec![HAPROXY_STEADY]),
    ];

    let mut steady: BTreeMap<&str, Vec<Steady>> = BTreeMap::new();
    let mut faults: BTreeMap<(Fault, System), Vec<FaultRun>> = BTreeMap::new();
    for run in 0..args.runs as usize {
        ensure!(
            Instant::now() < deadline,
            "the benchmark ran out of its time budget"
        );
        for i in 0..steady_targets.len() {
            let (name, targets) = &steady_targets[(i + run) % steady_targets.len()];
            let result = bed.steady_run(targets)?;
            let per_sec: Vec<String> = result
                .saturated
                .iter()
                .zip(&args.workers)
                .map(|(l, w)| format!("{:.0} req/s at {w} threads", l.per_sec))
                .collect();
            eprintln!(
                "run {run} steady {name:<10} {}; paced p50 {:.3} ms p99 {:.3} ms",
                per_sec.join(", "),
                result.paced.latency.p50_ms,
                result.paced.latency.p99_ms,
            );
            steady.entry(name).or_default().push(result);
        }
        for fault in [Fault::Refused, Fault::BlackHole] {
            let mut systems = [System::Detour, System::Haproxy];
            systems.rotate_left(run % 2);
            for system in systems {
                let r = bed.fault_run(system, fault).map_err(|e| {
                    e.context(format!(
                        "fault run {system:?}, {} failed{}",
                        fault.describe(),
                        agent.log_tail()
                    ))
                })?;
                eprintln!(
                    "run {run} {fault:?} {system:?}: {} of {} failed {:?}, moved {:?} ms, \
                     settled {:?} ms, detected {:?} ms, window p50 {:.2} p99 {:.2} max {:.2} ms",
                    r.failed,
                    r.requests,
                    r.failure_kinds,
                    r.moved_ms,
                    r.settled_ms,
                    r.detected_ms,
                    r.window.p50_ms,
                    r.window.p99_ms,
                    r.window.max_ms
                );
                faults.entry((fault, system)).or_default().push(r);
            }
        }
    }
    bed.wait_settled()?;
    print!(
        "{}",
        report(args, &haproxy_version(), &steady_targets, &steady, &faults)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The report

pub(crate) fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "–".to_owned(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// `2 (1–3)`: median and range of a count over runs.
pub(crate) fn count_summary(values: &[usize]) -> String {
    let (Some(min), Some(max)) = (values.iter().min(), values.iter().max()) else {
        return "–".to_owned();
    };
    let med = median(values.iter().map(|&v| v as f64).collect()).unwrap_or(f64::NAN);
    let med = if med.fract() == 0.0 {
        format!("{med:.0}")
    } else {
        format!("{med:.1}")
    };
    if min == max {
        med
    } else {
        format!("{med} ({min}–{max})")
    }
}

fn report(
    args: &FailoverArgs,
    haproxy_version: &str,
    targets: &[(&str, Vec<&str>)],
    steady: &BTreeMap<&str, Vec<Steady>>,
    faults: &BTreeMap<(Fault, System), Vec<FaultRun>>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Failover: detour vs HAProxy ({haproxy_version}, mode {})\n\n\
         {} runs; medians over runs (range in parentheses where runs differ). Fault runs: \
         {} requests/s, open loop (up to {} in flight), a new connection per request, {:?} \
         of load before the fault and {:?} after; latency over successful requests started \
         in the first {:?} after the fault.{}\n",
        args.haproxy_mode.as_str(),
        args.runs,
        args.rate,
        args.in_flight,
        args.before,
        args.after,
        FAULT_WINDOW,
        if args.keep_time_wait {
            " The TIME_WAIT sockets the load left on the dead backend were kept."
        } else {
            " The dead backend's TIME_WAIT sockets were destroyed just before each fault."
        }
    );
    let _ = writeln!(
        out,
        "| fault | through | requests | failed: sent after the fault | failed: in flight at \
         the fault | went to the dead backend | traffic moved after (ms) | last of them done \
         (ms) | detected after (ms) | p50 / p99 / max latency (ms) |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut kinds_notes = Vec::new();
    for ((fault, system), runs) in faults {
        let med = |f: fn(&FaultRun) -> Option<f64>| median(runs.iter().filter_map(f).collect());
        let system_name = match system {
            System::Detour => "detour",
            System::Haproxy => "HAProxy",
        };
        let _ = writeln!(
            out,
            "| {} | {system_name} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} |",
            fault.describe(),
            count_summary(&runs.iter().map(|r| r.requests).collect::<Vec<_>>()),
            count_summary(
                &runs
                    .iter()
                    .map(|r| r.failed - r.failed_in_flight)
                    .collect::<Vec<_>>()
            ),
            count_summary(&runs.iter().map(|r| r.failed_in_flight).collect::<Vec<_>>()),
            count_summary(&runs.iter().map(|r| r.affected).collect::<Vec<_>>()),
            fmt_ms(med(|r| r.moved_ms)),
            fmt_ms(med(|r| r.settled_ms)),
            fmt_ms(med(|r| r.detected_ms)),
            fmt_ms(med(|r| Some(r.window.p50_ms))),
            fmt_ms(med(|r| Some(r.window.p99_ms))),
            fmt_ms(med(|r| Some(r.window.max_ms))),
        );
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for r in runs {
            for (k, n) in &r.failure_kinds {
                *kinds.entry(k).or_default() += n;
            }
        }
        let before: usize = runs.iter().map(|r| r.failed_before).sum();
        let by_dead: usize = runs.iter().map(|r| r.answered_by_dead).sum();
        let suspect = med(|r| r.suspect_ms);
        let inject = med(|r| Some(r.inject_ms));
        let time_wait = median(runs.iter().map(|r| r.time_wait as f64).collect());
        kinds_notes.push(format!(
            "{} through {system_name}: failures over all runs {kinds:?}; failed before the \
             fault {before}; answered by the dead backend after it {by_dead}; first failure \
             report after {} ms; injecting took {} ms; TIME_WAIT sockets on the dead \
             backend just before the fault {} ({})",
            fault.describe(),
            fmt_ms(suspect),
            fmt_ms(inject),
            time_wait.map_or_else(|| "–".to_owned(), |n| format!("{n:.0}")),
            if args.keep_time_wait {
                "kept"
            } else {
                "destroyed"
            }
        ));
    }
    let _ = writeln!(out);
    for n in &kinds_notes {
        let _ = writeln!(out, "- {n}");
    }

    let levels: Vec<String> = args.workers.iter().map(u32::to_string).collect();
    let _ = writeln!(
        out,
        "\n## Steady state: direct, detour VIP, HAProxy\n\n\
         Saturated: {} client threads, each sending its next request as soon as its last \
         ended, for {:?}; requests/s and (in parentheses) the ratio to direct at the same \
         level. Paced: {} requests/s, open loop. Direct: both primaries, round-robin.\n",
        levels.join(" or "),
        args.steady,
        args.rate
    );
    let mut head = "| path |".to_owned();
    for w in &args.workers {
        let _ = write!(head, " requests/s, {w} threads |");
    }
    let _ = writeln!(
        out,
        "{head} p50 / p99 at {} req/s (ms) | failed |",
        args.rate
    );
    let _ = writeln!(out, "|---|{}---|---:|", "---:|".repeat(args.workers.len()));
    let saturated = |runs: &[Steady], level: usize| {
        median(
            runs.iter()
                .filter_map(|r| r.saturated.get(level))
                .map(|l| l.per_sec)
                .collect(),
        )
    };
    for (name, _) in targets {
        let Some(runs) = steady.get(name) else {
            continue;
        };
        let mut row = format!("| {name} |");
        for level in 0..args.workers.len() {
            let per_sec = saturated(runs, level);
            let direct = steady.get("direct").and_then(|d| saturated(d, level));
            let ratio = per_sec.zip(direct).map(|(v, d)| v / d);
            let _ = write!(
                row,
                " {} ({}) |",
                per_sec.map_or_else(|| "–".to_owned(), thousands),
                ratio.map_or_else(|| "–".to_owned(), |r| format!("{r:.2}"))
            );
        }
        let paced = |f: fn(&Latency) -> f64| {
            fmt_ms(median(runs.iter().map(|r| f(&r.paced.latency)).collect()))
        };
        let failed: usize = runs
            .iter()
            .map(|r| r.paced.failed + r.saturated.iter().map(|l| l.failed).sum::<usize>())
            .sum();
        let _ = writeln!(
            out,
            "{row} {} / {} | {failed} |",
            paced(|l| l.p50_ms),
            paced(|l| l.p99_ms)
        );
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
    fn client_lines_round_trip() {
        let r = parse_request("12 34 !connect:refused").unwrap();
        assert_eq!(
            (r.start_ns, r.latency_ns, r.failed(), r.end_ns()),
            (12, 34, true, 46)
        );
        assert_eq!(parse_request("1 2 east-b").unwrap().outcome, "east-b");
        assert!(parse_request("1 2").is_err());
    }

    #[test]
    fn request_names_the_backend_or_the_failure() {
        let backend = HttpBackend::start_at("east-b", "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = backend.addr();
        assert_eq!(request(addr, Duration::from_secs(2)), "east-b");
        drop(backend);
        assert_eq!(
            request(addr, Duration::from_secs(2)),
            "!connect:refused",
            "a stopped backend refuses"
        );
    }

    #[test]
    fn detour_fault_analysis() {
        // Fault at 1000 ms; one refused request at 1002, one answered by the survivor.
        let requests = [
            req(990, 1, DEAD),
            req(998, 3, "!response:incomplete"),
            req(1002, 0, "!connect:refused"),
            req(1003, 2, "east-b"),
            req(1500, 4, "east-b"),
        ];
        let run = analyze_fault(&requests, 999_000_000, 1_000_000_000, None);
        assert_eq!((run.requests, run.failed, run.affected), (5, 2, 2));
        assert_eq!(run.failed_in_flight, 1);
        assert_eq!(run.failed_before, 0);
        assert_eq!(run.moved_ms, Some(2.0));
        assert_eq!(run.settled_ms, Some(2.0));
        assert_eq!(run.window.count, 2);
        assert_eq!((run.window.p50_ms, run.window.max_ms), (2.0, 4.0));
        assert_eq!(run.failure_kinds.get("connect:refused"), Some(&1));
        assert_eq!(run.failure_kinds.get("response:incomplete"), Some(&1));
    }

    #[test]
    fn proxy_attempts_decide_what_went_to_the_dead_backend() {
        let requests = [req(1010, 100, "east-b"), req(1200, 1, "east-b")];
        let attempts = [
            Attempt {
                start_ns: 1_010_000_000,
                end_ns: 1_110_000_000,
                affected: true,
            },
            Attempt {
                start_ns: 1_200_000_000,
                end_ns: 1_201_000_000,
                affected: false,
            },
        ];
        let run = analyze_fault(&requests, 999_000_000, 1_000_000_000, Some(&attempts));
        assert_eq!((run.failed, run.affected), (0, 1));
        assert_eq!(run.moved_ms, Some(10.0));
        assert_eq!(run.settled_ms, Some(110.0));
        assert_eq!(run.window.max_ms, 100.0);
    }

    #[test]
    fn haproxy_sessions_parse_and_place() {
        let s = parse_session("session 1700000000.012 east-b +1 0 3 --").unwrap();
        assert_eq!(
            s,
            Session {
                accept_ms: 1_700_000_000_012,
                server: "east-b".into(),
                retries: 1,
                total_ms: 3,
                state: "--".into()
            }
        );
        assert!(parse_session("[WARNING] Server failover/east-a is DOWN").is_none());
        let lines = vec![
            (0, "session 1700000000.012 east-b 1 0 3 --".to_owned()),
            (0, format!("session 1700000000.020 {DEAD} 0 -1 100 SC")),
            (0, format!("session 1700000000.030 {DEAD} 0 0 1 --")),
            (0, "Server failover/east-a is DOWN".to_owned()),
        ];
        // Wall clock 1_700_000_000 s is monotonic 0 here. The client saw the first session
        // as a 3.1 ms request at 12.4 ms (next to a 0.2 ms one); none matches the second.
        let offset = 1_700_000_000_000_000_000;
        let client = [
            Request {
                start_ns: 12_300_000,
                latency_ns: 200_000,
                outcome: "east-b".into(),
            },
            Request {
                start_ns: 12_400_000,
                latency_ns: 3_100_000,
                outcome: "east-b".into(),
            },
        ];
        let attempts = haproxy_attempts(&lines, offset, &client);
        assert_eq!(attempts.len(), 3);
        assert_eq!(attempts[0].start_ns, 12_400_000);
        assert_eq!(attempts[0].end_ns, 15_500_000);
        assert_eq!(attempts[1].start_ns, 20_000_000);
        assert_eq!(attempts[1].end_ns, 120_000_000);
        assert!(attempts[0].affected && attempts[1].affected && !attempts[2].affected);
        assert_eq!(
            haproxy_attempts(&lines, offset, &[])[0].start_ns,
            12_000_000
        );
        assert_eq!(haproxy_detection(&lines).detected, Some(0));
    }

    #[test]
    fn detour_events_tell_detection() {
        let a = PRIMARIES[0].addr;
        let health = |t, detail: &str| {
            let line =
                format!(r#"{{"kind":"health-changed","backend":"{a}","detail":"{detail}"}}"#);
            (t, line)
        };
        let mut lines = vec![
            (
                5,
                r#"{"kind":"refused","backend":"127.0.0.9:1"}"#.to_owned(),
            ),
            (7, format!(r#"{{"kind":"syn-retransmit","backend":"{a}"}}"#)),
            health(8, "UNKNOWN -> HEALTHY"),
            (9, format!(r#"{{"kind":"ejected","backend":"{a}"}}"#)),
            (11, format!(r#"{{"kind":"ejected","backend":"{a}"}}"#)),
        ];
        let d = detour_detection(&lines, a);
        assert_eq!((d.suspect, d.detected), (Some(7), Some(9)));
        lines.insert(
            2,
            health(8, "HEALTHY -> UNHEALTHY: connect timed out after 100ms"),
        );
        assert_eq!(detour_detection(&lines, a).detected, Some(8));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = latency_of((1..=100).map(|ms| ms * 1_000_000).collect());
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (50.0, 99.0, 100.0));
        assert!(latency_of(vec![]).p50_ms.is_nan());
        assert_eq!(median(vec![3.0, f64::NAN, 1.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn configs_read_as_intended() {
        use crate::config_view::OneService;
        use detour_agent::config::HealthCheckKind;
        let config =
            detour_agent::config::parse(&agent_config()).expect("the agent accepts its config");
        assert_eq!(config.node.locality.to_string(), NODE_LOCALITY);
        let one = OneService::of(&config);
        let service = one.service;
        assert_eq!(service.name, SERVICE);
        assert_eq!(one.vips(), [VIP]);
        // The primaries in the node's zone, the standby in us-west, which the failover
        // rule names.
        let expected: Vec<(String, String)> = [
            (PRIMARIES[0].addr, NODE_LOCALITY),
            (PRIMARIES[1].addr, NODE_LOCALITY),
            (WEST, WEST_LOCALITY),
        ]
        .iter()
        .map(|(a, l)| ((*a).to_owned(), (*l).to_owned()))
        .collect();
        assert_eq!(one.endpoints(ToString::to_string), expected);
        assert_eq!(
            one.failover_rules(),
            [("us-east1".to_owned(), "us-west".to_owned())]
        );
        assert_eq!(
            one.checks(),
            (
                Duration::from_millis(100),
                Duration::from_millis(100),
                1,
                1,
                &HealthCheckKind::Tcp
            )
        );
        let outlier = &service.outlier_detection;
        let settings = outlier.policy.settings();
        assert_eq!(
            (
                settings.consecutive_failures,
                settings.interval,
                settings.base_ejection_time,
                outlier.handshake_timeout
            ),
            (
                1,
                Duration::from_secs(1),
                Duration::from_secs(30),
                Duration::from_millis(100)
            )
        );
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());

        let haproxy = haproxy_config(HaproxyMode::Tcp, Path::new("/tmp/x.sock"));
        for needle in [
            "mode tcp",
            "option redispatch 1",
            "server east-a 10.232.0.2:8080 check inter 100ms fall 1 rise 1 observe layer4 \
             error-limit 1 on-error mark-down",
            "server west 127.0.5.1:8080 check",
            "on-error mark-down backup",
            "bind 127.0.6.1:80",
        ] {
            assert!(haproxy.contains(needle), "{needle} in\n{haproxy}");
        }
        assert!(!haproxy.contains("retry-on"));
        assert!(haproxy_config(HaproxyMode::Http, Path::new("/x")).contains("retry-on"));
    }

    #[test]
    fn count_summaries() {
        assert_eq!(count_summary(&[2, 2, 2]), "2");
        assert_eq!(count_summary(&[1, 3, 2]), "2 (1–3)");
        assert_eq!(count_summary(&[1, 2]), "1.5 (1–2)");
        assert_eq!(count_summary(&[]), "–");
    }
}
