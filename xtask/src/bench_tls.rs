//! `cargo xtask bench-tls`: what the TLS originator's hop costs, against a client that
//! speaks TLS to the backend itself, measured side by side in the same runs.
//!
//! The bed: the test bed's [`TlsBackend`] on 127.10.44.1:8443 with a certificate for
//! `db.bench` from a CA of the task's own ([`TestCa`]), in a process of its own (the
//! hidden `bench-tls-server`), so that its CPU time is read apart from the client's and
//! the agent's; an agent whose one service `db` (VIP 127.204.0.1:80, targetPort 8443)
//! originates TLS to it (`tls: {mode: SIMPLE, sni: db.bench, caCertificates: <the CA>}`).
//! A client in the agent's cgroup (the hidden `bench-tls-client`) takes two paths to the
//! same backend:
//! - "direct TLS": TCP connect to the backend, rustls handshake (the same CA, SNI
//!   `db.bench`, rustls' ring provider and safe defaults, as the agent's), HTTP inside;
//! - "via detour": TCP connect to the VIP, plain HTTP; the kernel sends the connect to
//!   the originator, which makes the TCP and TLS handshakes to the backend and relays.
//!
//! Three measurements per path and run:
//! - a new connection per request: `GET /` with `Connection: close`, latency from before
//!   the connect to the last byte of the body; p50/p99 and requests/s;
//! - keep-alive: one connection, `GET /` after `GET /`, latency from writing a request to
//!   the last byte of its body; p50/p99 and requests/s over the requests' span (the
//!   connection's first request, which makes both hops' handshakes, is not timed);
//! - bulk throughput on one connection: `GET /bytes/N` after a warming `GET /` on the
//!   same connection, timed from the request to the last body byte.
//!
//! The runs alternate which path goes first; each figure is the median over runs, each
//! ratio the median of the runs' own via / direct. CPU is read around every phase: the
//! client's own (getrusage), the agent's and the backend's (`/proc/PID/stat`, in clock
//! ticks of 10 ms: a bulk phase of a few hundred milliseconds reads them to a few
//! percent). The backend's requests and TLS handshakes are read at the same moments, from
//! its process's stats socket.
//!
//! Why the client and the backend run from a release build of this crate (built by the
//! task) rather than this binary: `cargo xtask` runs a debug build, and a debug rustls
//! on the direct path would be measured against the agent's release rustls.
//!
//! Invariants:
//! - loopback only: the backend on 127.10.44.1, the VIP 127.204.0.1, the originator on
//!   the agent's loopback listener, the backend's stats socket on 127.0.0.1;
//! - the agent, its cgroup (never the root cgroup) and pins are the [`AgentBed`]'s guards,
//!   the backend and the client are [`LineStream`]s (killed on drop): an error anywhere
//!   leaves nothing behind;
//! - bounded: every socket operation has a timeout, the client a readiness deadline, the
//!   task [`TASK_BUDGET`].

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use detour_testbed::{AgentBed, LineStream, ServerCert, TestCa, TlsBackend};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::bench::{load_average, median, metric_sum, thousands, wait_in_table};
use crate::{cmd, setup};

const BACKEND: &str = "127.10.44.1:8443";
const VIP_IP: &str = "127.204.0.1";
const VIP: &str = "127.204.0.1:80";
const SNI: &str = "db.bench";
const SERVICE: &str = "db";
/// What the backend answers to `GET /` (its name and a newline).
const BACKEND_NAME: &str = "db";
const LOCALITY: &str = "us-east1/us-east1-b";
/// The whole task's budget, builds excluded.
const TASK_BUDGET: Duration = Duration::from_secs(8 * 60);
/// Bounds every connect, read and write of the client.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the client waits for a first GET through the VIP to be answered.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// The client's pause after each line it prints, while the task reads the agent's and
/// the backend's CPU time.
const PHASE_PAUSE: Duration = Duration::from_millis(50);
/// The client's read buffer, the same for both paths.
const READ_BUFFER: usize = 256 * 1024;
/// The longest response head the client reads.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// The most the test bed's backend sends for `GET /bytes/N`.
const MAX_BODY: u64 = 1 << 30;

#[derive(clap::Args)]
pub struct TlsArgs {
    /// Runs; each measures both paths, alternating which goes first.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Requests per path and run, each on a new connection.
    #[arg(long, default_value_t = 2000)]
    requests: u32,
    /// Requests per path and run, one after the other on one keep-alive connection.
    #[arg(long, default_value_t = 10_000)]
    keepalive_requests: u32,
    /// Bytes of the bulk transfer per path and run (`GET /bytes/N`).
    #[arg(long, default_value_t = 256 << 20)]
    bulk_bytes: u64,
    /// Unmeasured requests per path before the first run.
    #[arg(long, default_value_t = 200)]
    warmup: u32,
}

/// Arguments of the hidden `bench-tls-server` subcommand: the test bed's [`TlsBackend`]
/// at `listen`.
#[derive(clap::Args)]
pub struct TlsServerArgs {
    #[arg(long)]
    listen: SocketAddr,
    /// PEM files of the server certificate and its key.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
}

/// Arguments of the hidden `bench-tls-client` subcommand.
#[derive(clap::Args)]
pub struct TlsClientArgs {
    #[arg(long)]
    vip: SocketAddr,
    #[arg(long)]
    backend: SocketAddr,
    /// The CA's PEM file, and the name the backend's certificate must carry.
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    sni: String,
    #[arg(long)]
    runs: u32,
    #[arg(long)]
    requests: u32,
    #[arg(long)]
    keepalive_requests: u32,
    #[arg(long)]
    warmup: u32,
    #[arg(long)]
    bulk_bytes: u64,
}

/// The two ways to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Way {
    Direct,
    Via,
}

impl Way {
    fn as_str(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Via => "via",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "direct" => Ok(Way::Direct),
            "via" => Ok(Way::Via),
            _ => bail!("unknown path {s:?}"),
        }
    }

    /// The order of the paths in run `run`: direct first in even runs.
    fn order(run: u32) -> [Way; 2] {
        if run.is_multiple_of(2) {
            [Way::Direct, Way::Via]
        } else {
            [Way::Via, Way::Direct]
        }
    }
}

/// How a request phase uses connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    /// A new connection per request.
    NewConnection,
    /// One connection for all of them.
    KeepAlive,
}

impl Mode {
    /// The phase's `kind` in the client's lines.
    fn as_str(self) -> &'static str {
        match self {
            Mode::NewConnection => "requests",
            Mode::KeepAlive => "keepalive",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::NewConnection => "new connection per request",
            Mode::KeepAlive => "keep-alive, one connection",
        }
    }

    /// The figures of a request phase in this mode: p50, p99, requests/s, and the
    /// client's, the agent's and the backend's CPU per request.
    fn figures(self) -> [Figure; 6] {
        match self {
            Mode::NewConnection => [
                Figure::P50,
                Figure::P99,
                Figure::RequestsPerSec,
                Figure::RequestClientCpu,
                Figure::RequestAgentCpu,
                Figure::RequestServerCpu,
            ],
            Mode::KeepAlive => [
                Figure::KeepAliveP50,
                Figure::KeepAliveP99,
                Figure::KeepAliveRequestsPerSec,
                Figure::KeepAliveClientCpu,
                Figure::KeepAliveAgentCpu,
                Figure::KeepAliveServerCpu,
            ],
        }
    }
}

// ---------------------------------------------------------------------------------------
// The task.

pub fn run(args: &TlsArgs) -> Result<()> {
    detour_testbed::require_root("cargo xtask bench-tls")?;
    if args.runs == 0 || args.requests == 0 || args.keepalive_requests == 0 || args.bulk_bytes == 0
    {
        bail!("--runs, --requests, --keepalive-requests and --bulk-bytes must be positive");
    }
    if args.bulk_bytes > MAX_BODY {
        bail!("--bulk-bytes is at most {MAX_BODY} (what the backend sends)");
    }
    setup::run()?;
    let agent_binary = cmd::build_agent()?;
    let xtask = build_release_xtask()?;
    let deadline = Instant::now() + TASK_BUDGET;

    // The bed's guards: the agent, then the pins, the cgroup, the temp dir. The backend
    // and the client are declared after it, so they go first.
    let mut bed = AgentBed::new(agent_binary)?;
    let ca = TestCa::new("bench-tls")?;
    let cert = ca.issue(&[SNI])?;
    let ca_file = bed.dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let (cert_file, key_file) = (bed.dir.join("db.pem"), bed.dir.join("db.key"));
    std::fs::write(&cert_file, &cert.cert_pem)?;
    std::fs::write(&key_file, &cert.key_pem)?;

    let mut server = Command::new(&xtask);
    server
        .arg("bench-tls-server")
        .args(["--listen", BACKEND])
        .arg("--cert")
        .arg(&cert_file)
        .arg("--key")
        .arg(&key_file);
    let mut server = LineStream::spawn(&mut server)?;
    let listening = expect_line(&mut server, deadline.min(Instant::now() + IO_TIMEOUT))
        .context("the backend did not start")?;
    ensure!(
        listening["listening"] == BACKEND,
        "the backend said {listening}"
    );
    let stats: SocketAddr = listening["stats"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no stats address in {listening}"))?;
    let server_pid = server.id();

    bed.write_config(&config(&ca_file))?;
    let started = Instant::now();
    bed.start_agent(&[], Duration::from_secs(60))?;
    let agent = bed.agent.as_ref().expect("started");
    wait_in_table(agent, SERVICE, deadline)?;
    let agent_pid = agent.pid().context("the agent's pid")?;
    let relays = agent.services_json()?;
    let mut notes = vec![format!(
        "agent ready and `{SERVICE}` in its table {:.1}s after start; relays: {}",
        started.elapsed().as_secs_f64(),
        relays
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == SERVICE)
            .map(|s| s["tls_relays"].to_string())
            .collect::<Vec<_>>()
            .join(" ")
    )];
    let relayed_before = originator_counter(agent, "detour_tls_connections_relayed_total")?;
    let load_before = load_average();

    let mut client = Command::new(&xtask);
    client
        .arg("bench-tls-client")
        .args(["--vip", VIP, "--backend", BACKEND, "--sni", SNI])
        .arg("--ca")
        .arg(&ca_file)
        .args(["--runs", &args.runs.to_string()])
        .args(["--requests", &args.requests.to_string()])
        .args(["--keepalive-requests", &args.keepalive_requests.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--bulk-bytes", &args.bulk_bytes.to_string()]);
    // Read before the client starts: every request the backend answers from here on is
    // the client's (the health checks only make handshakes).
    let backend_before = backend_counts(stats)?;
    let mut backend_last = backend_before;
    let mut client = LineStream::spawn_in(&bed.cgroup, &mut client)?;
    let cpu = |pid: u32| process_cpu(pid).with_context(|| format!("CPU time of {pid}"));
    let (mut agent_cpu, mut server_cpu) = (cpu(agent_pid)?, cpu(server_pid)?);
    let mut phases = Vec::new();
    let mut done = None;
    while let Some((_, line)) = client
        .next_line(deadline)
        .with_context(|| format!("the benchmark ran out of its {TASK_BUDGET:?} budget"))?
    {
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("bad client line {line:?}"))?;
        // The client pauses after each line: the CPU used and the handshakes made since
        // the last line are the phase's (and the pause's, in which nothing runs but
        // health checks).
        let (agent_now, server_now) = (cpu(agent_pid)?, cpu(server_pid)?);
        let (agent_used, server_used) = (agent_now - agent_cpu, server_now - server_cpu);
        (agent_cpu, server_cpu) = (agent_now, server_now);
        let backend_now = backend_counts(stats)?;
        let handshakes = backend_now.handshakes_since(&backend_last);
        backend_last = backend_now;
        if let Some(ms) = v["ready_ms"].as_f64() {
            eprintln!("bench-tls: a GET through the VIP answered after {ms:.0} ms");
            notes.push(format!(
                "first GET through the VIP answered {ms:.0} ms after the client started; \
                 direct TLS negotiated {} {}",
                v["version"].as_str().unwrap_or("?"),
                v["suite"].as_str().unwrap_or("?")
            ));
        } else if v["warmed_up"] == true {
            eprintln!("bench-tls: warmed up; measuring");
        } else if v["done"] == true {
            done = Some(v);
        } else {
            let phase = Phase::from_json(&v, agent_used, server_used, handshakes)?;
            eprintln!("  {}", phase.describe());
            phases.push(phase);
        }
    }
    let (status, _) = client.wait(deadline.saturating_duration_since(Instant::now()))?;
    if !status.success() {
        bail!("the bench client failed: {status}{}", agent.log_tail());
    }
    let done = done.context("the client ended without its summary")?;
    let expected = 3 * 2 * args.runs as usize;
    ensure!(
        phases.len() == expected,
        "the client reported {} phases, expected {expected}",
        phases.len()
    );

    // Every connection the client made to the VIP went through the originator to the
    // backend: its count must be the client's, or the figures are not what they claim.
    let relayed =
        originator_counter(agent, "detour_tls_connections_relayed_total")? - relayed_before;
    let via_ok = done["via_connections"].as_u64().unwrap_or(0);
    let via_failed = done["via_failed"].as_u64().unwrap_or(0);
    ensure!(
        (via_ok..=via_ok + via_failed).contains(&relayed),
        "the originator relayed {relayed} connections, the client made {via_ok} \
         (and {via_failed} failed while waiting for readiness)"
    );
    notes.push(format!(
        "the originator relayed {relayed} connections; the client made {via_ok} to the VIP \
         ({via_failed} failed while it waited for readiness)"
    ));
    // And every request it made reached the backend, through either path.
    let answered = backend_counts(stats)?.requests - backend_before.requests;
    let made = done["requests_made"].as_u64().unwrap_or(0);
    ensure!(
        answered == made,
        "the backend answered {answered} requests, the client made {made}"
    );
    notes.push(format!(
        "the backend answered {answered} requests, as many as the client made"
    ));
    notes.push(handshake_note(&phases));
    notes.push(format!(
        "agent built from the work tree at {}",
        cmd::stdout_of(
            Command::new("git")
                .current_dir(cmd::workspace_root())
                .args(["describe", "--always", "--dirty"])
        )
        .map_or_else(|| "?".to_owned(), |s| s.trim().to_owned())
    ));
    // The machine may be shared: what else ran shows in the load around the runs.
    notes.push(format!(
        "load average (1 min) {} before the client started, {} after it ended (the \
         client, the agent and the backend add to it themselves)",
        load_before,
        load_average()
    ));
    drop(server);
    print!("{}", report(args, &summarize(&phases), &notes));
    Ok(())
}

/// `cargo build --release -p xtask`; returns the binary that runs the client and the
/// backend (see the module doc).
fn build_release_xtask() -> Result<PathBuf> {
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "xtask"]))?;
    let binary = cmd::target_dir().join("release/xtask");
    if !binary.is_file() {
        bail!("the build succeeded but {} is missing", binary.display());
    }
    Ok(binary)
}

/// The next line of `stream` as JSON, skipping lines that are not.
fn expect_line(stream: &mut LineStream, deadline: Instant) -> Result<serde_json::Value> {
    loop {
        let (_, line) = stream
            .next_line(deadline)?
            .context("the process ended without a word")?;
        match serde_json::from_str(&line) {
            Ok(v) => return Ok(v),
            Err(_) => eprintln!("{line}"),
        }
    }
}

/// The agent's config: one service whose VIP originates TLS to the backend.
fn config(ca_file: &Path) -> String {
    let (ip, port) = BACKEND.split_once(':').expect("BACKEND is IP:port");
    format!(
        "node: {{ locality: {LOCALITY} }}\n\
         services:\n  \
           - name: {SERVICE}\n    \
             vips: [{VIP_IP}]\n    \
             ports: [{{number: 80, name: http, targetPort: {port}}}]\n    \
             endpoints:\n      \
               - {{address: {ip}, locality: {LOCALITY}}}\n    \
             tls: {{mode: SIMPLE, sni: {SNI}, caCertificates: {}}}\n",
        ca_file.display()
    )
}

/// One counter of the agent's `/metrics` (the sum of its series).
fn originator_counter(agent: &detour_testbed::Agent, name: &str) -> Result<u64> {
    metric_sum(&agent.metrics()?, name)
        .with_context(|| format!("no {name} in the agent's /metrics"))
}

/// The backend's counts, from its process's stats socket.
fn backend_counts(stats: SocketAddr) -> Result<BackendCounts> {
    let line = exchange(stats, b"").context("reading the backend's counts")?;
    BackendCounts::parse(&line)
}

/// Writes `request` to a new connection to `addr` and reads the answer to its end.
fn exchange(addr: SocketAddr, request: &[u8]) -> Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    conn.write_all(request)?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    Ok(response)
}

/// What the backend has answered and accepted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct BackendCounts {
    requests: u64,
    /// TLS handshakes, full and resumed.
    full: u64,
    resumed: u64,
}

impl BackendCounts {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "full": self.full,
            "resumed": self.resumed,
        })
    }

    fn parse(line: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("the backend's counts are not JSON: {line:?}"))?;
        let get = |key: &str| v[key].as_u64().with_context(|| format!("no {key} in {v}"));
        Ok(Self {
            requests: get("requests")?,
            full: get("full")?,
            resumed: get("resumed")?,
        })
    }

    /// The full and resumed handshakes since `earlier`.
    fn handshakes_since(&self, earlier: &Self) -> (u64, u64) {
        (self.full - earlier.full, self.resumed - earlier.resumed)
    }
}

/// User and system CPU time of process `pid` (all its threads, live and exited).
fn process_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = cpu_ticks(&stat).context("unreadable /proc/PID/stat")?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(per_second > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(Duration::from_nanos(
        ticks * 1_000_000_000 / per_second as u64,
    ))
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces, so fields are counted after its `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

// ---------------------------------------------------------------------------------------
// What the client reports, and the summary.

/// One phase of one run on one path, as the client reported it, with the agent's and
/// the backend's CPU and the backend's handshakes over it.
#[derive(Debug, Clone, PartialEq)]
struct Phase {
    run: u32,
    path: Way,
    kind: PhaseKind,
    /// The time the client's figures are counted over: for requests on new connections
    /// the whole phase, connects and closes included; for keep-alive requests their span,
    /// without the connection's setup and close; for bulk the whole phase.
    wall: Duration,
    client_cpu: Duration,
    agent_cpu: Duration,
    server_cpu: Duration,
    /// The backend's full and resumed TLS handshakes during the phase (health checks'
    /// included).
    handshakes: (u64, u64),
}

#[derive(Debug, Clone, PartialEq)]
enum PhaseKind {
    /// Requests one after the other: each request's latency.
    Requests { mode: Mode, latencies_ns: Vec<u64> },
    /// One transfer of `bytes` body bytes, timed from the request to the last byte.
    Bulk { bytes: u64, elapsed: Duration },
}

impl Phase {
    fn from_json(
        v: &serde_json::Value,
        agent_cpu: Duration,
        server_cpu: Duration,
        handshakes: (u64, u64),
    ) -> Result<Self> {
        let ns = |key: &str| -> Result<Duration> {
            Ok(Duration::from_nanos(
                v[key]
                    .as_u64()
                    .with_context(|| format!("no {key} in {v}"))?,
            ))
        };
        let kind = match v["kind"].as_str() {
            Some("bulk") => PhaseKind::Bulk {
                bytes: v["bytes"].as_u64().context("bytes")?,
                elapsed: ns("elapsed_ns")?,
            },
            Some(kind) => PhaseKind::Requests {
                mode: [Mode::NewConnection, Mode::KeepAlive]
                    .into_iter()
                    .find(|m| m.as_str() == kind)
                    .with_context(|| format!("unknown phase kind {kind:?} in {v}"))?,
                latencies_ns: serde_json::from_value(v["latencies_ns"].clone())
                    .context("latencies_ns")?,
            },
            None => bail!("no phase kind in {v}"),
        };
        Ok(Self {
            run: u32::try_from(v["run"].as_u64().context("run")?)?,
            path: Way::parse(v["path"].as_str().context("path")?)?,
            kind,
            wall: ns("wall_ns")?,
            client_cpu: ns("cpu_ns")?,
            agent_cpu,
            server_cpu,
            handshakes,
        })
    }

    /// This phase's figures.
    fn figures(&self) -> Vec<(Figure, f64)> {
        let wall = self.wall.as_secs_f64();
        match &self.kind {
            PhaseKind::Requests { mode, latencies_ns } => {
                let n = latencies_ns.len().max(1) as f64;
                let per_request = |d: Duration| d.as_secs_f64() * 1e6 / n;
                let values = [
                    percentile(latencies_ns, 50.0) / 1e3,
                    percentile(latencies_ns, 99.0) / 1e3,
                    n / wall,
                    per_request(self.client_cpu),
                    per_request(self.agent_cpu),
                    per_request(self.server_cpu),
                ];
                mode.figures().into_iter().zip(values).collect()
            }
            PhaseKind::Bulk { bytes, elapsed } => {
                let share = |d: Duration| 100.0 * d.as_secs_f64() / wall;
                vec![
                    (
                        Figure::MegabytesPerSec,
                        *bytes as f64 / 1e6 / elapsed.as_secs_f64(),
                    ),
                    (Figure::BulkClientCpu, share(self.client_cpu)),
                    (Figure::BulkAgentCpu, share(self.agent_cpu)),
                    (Figure::BulkServerCpu, share(self.server_cpu)),
                ]
            }
        }
    }

    fn describe(&self) -> String {
        let f = self.figures();
        let cpu = format!(
            "CPU client {:.0} ms, agent {:.0} ms, backend {:.0} ms",
            self.client_cpu.as_secs_f64() * 1e3,
            self.agent_cpu.as_secs_f64() * 1e3,
            self.server_cpu.as_secs_f64() * 1e3
        );
        let (full, resumed) = self.handshakes;
        match &self.kind {
            PhaseKind::Requests { mode, .. } => format!(
                "run {} {:<6} {}: p50 {:.0} µs, p99 {:.0} µs, {:.0} req/s; {cpu}; \
                 handshakes {full} full, {resumed} resumed",
                self.run,
                self.path.as_str(),
                mode.label(),
                f[0].1,
                f[1].1,
                f[2].1
            ),
            PhaseKind::Bulk { .. } => format!(
                "run {} {:<6} bulk: {:.0} MB/s; {cpu}",
                self.run,
                self.path.as_str(),
                f[0].1
            ),
        }
    }
}

/// The figures of the report, in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Figure {
    P50,
    P99,
    RequestsPerSec,
    RequestClientCpu,
    RequestAgentCpu,
    RequestServerCpu,
    KeepAliveP50,
    KeepAliveP99,
    KeepAliveRequestsPerSec,
    KeepAliveClientCpu,
    KeepAliveAgentCpu,
    KeepAliveServerCpu,
    MegabytesPerSec,
    BulkClientCpu,
    BulkAgentCpu,
    BulkServerCpu,
}

impl Figure {
    fn label(self) -> &'static str {
        match self {
            Figure::P50 => "new connection per request: p50 latency (µs)",
            Figure::P99 => "new connection per request: p99 latency (µs)",
            Figure::RequestsPerSec => "new connection per request: requests/s",
            Figure::RequestClientCpu => "… client CPU per request (µs)",
            Figure::RequestAgentCpu => "… agent CPU per request (µs)",
            Figure::RequestServerCpu => "… backend CPU per request (µs)",
            Figure::KeepAliveP50 => "keep-alive, one connection: p50 latency (µs)",
            Figure::KeepAliveP99 => "keep-alive, one connection: p99 latency (µs)",
            Figure::KeepAliveRequestsPerSec => "keep-alive, one connection: requests/s",
            Figure::KeepAliveClientCpu => "… client CPU per request (µs)",
            Figure::KeepAliveAgentCpu => "… agent CPU per request (µs)",
            Figure::KeepAliveServerCpu => "… backend CPU per request (µs)",
            Figure::MegabytesPerSec => "bulk, one connection: MB/s",
            Figure::BulkClientCpu => "… client CPU (% of one core)",
            Figure::BulkAgentCpu => "… agent CPU (% of one core)",
            Figure::BulkServerCpu => "… backend CPU (% of one core)",
        }
    }

    /// Whether via / direct means something (not for the agent's CPU: direct barely
    /// touches it).
    fn has_ratio(self) -> bool {
        !matches!(
            self,
            Figure::RequestAgentCpu | Figure::KeepAliveAgentCpu | Figure::BulkAgentCpu
        )
    }
}

/// One row of the report: a figure's median over runs on each path, and the median of
/// the runs' own via / direct.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    figure: Figure,
    direct: f64,
    via: f64,
    ratio: Option<f64>,
}

/// The report's rows from every phase of every run.
fn summarize(phases: &[Phase]) -> Vec<Row> {
    // (figure, path, run) → value.
    let mut values = std::collections::BTreeMap::new();
    for phase in phases {
        for (figure, value) in phase.figures() {
            values.insert((figure, phase.path, phase.run), value);
        }
    }
    let mut figures: Vec<Figure> = values.keys().map(|(f, _, _)| *f).collect();
    figures.dedup();
    figures
        .into_iter()
        .map(|figure| {
            let on = |path: Way| -> Vec<(u32, f64)> {
                values
                    .iter()
                    .filter(|((f, p, _), _)| *f == figure && *p == path)
                    .map(|((_, _, run), v)| (*run, *v))
                    .collect()
            };
            let (direct, via) = (on(Way::Direct), on(Way::Via));
            let ratios: Vec<f64> = via
                .iter()
                .filter_map(|(run, v)| {
                    let (_, d) = direct.iter().find(|(r, _)| r == run)?;
                    (*d > 0.0).then(|| v / d)
                })
                .collect();
            Row {
                figure,
                direct: median(direct.iter().map(|(_, v)| *v).collect()),
                via: median(via.iter().map(|(_, v)| *v).collect()),
                ratio: (figure.has_ratio() && !ratios.is_empty()).then(|| median(ratios)),
            }
        })
        .collect()
}

/// The `p`th percentile (nearest rank) of `ns`, unsorted; NaN when empty.
fn percentile(ns: &[u64], p: f64) -> f64 {
    if ns.is_empty() {
        return f64::NAN;
    }
    let mut sorted = ns.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// How the backend's handshakes split between full and resumed, per kind of request
/// phase and path.
fn handshake_note(phases: &[Phase]) -> String {
    let mut parts = Vec::new();
    for mode in [Mode::NewConnection, Mode::KeepAlive] {
        for path in [Way::Direct, Way::Via] {
            let (mut full, mut resumed) = (0, 0);
            for phase in phases.iter().filter(|p| p.path == path) {
                if matches!(phase.kind, PhaseKind::Requests { mode: m, .. } if m == mode) {
                    full += phase.handshakes.0;
                    resumed += phase.handshakes.1;
                }
            }
            parts.push(format!(
                "{}, {}: {full} full, {resumed} resumed",
                mode.label(),
                path.as_str()
            ));
        }
    }
    format!(
        "the backend's TLS handshakes during the request phases (health checks' included): {}",
        parts.join("; ")
    )
}

fn format_figure(figure: Figure, value: f64) -> String {
    if value.is_nan() {
        return "–".to_owned();
    }
    match figure {
        Figure::RequestsPerSec | Figure::KeepAliveRequestsPerSec | Figure::MegabytesPerSec => {
            thousands(value)
        }
        Figure::BulkClientCpu | Figure::BulkAgentCpu | Figure::BulkServerCpu => {
            format!("{value:.0}%")
        }
        _ if value < 100.0 => format!("{value:.1}"),
        _ => thousands(value),
    }
}

fn report(args: &TlsArgs, rows: &[Row], notes: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## TLS origination: the originator's hop against a direct TLS client\n\n\
         {} runs; per path and run {} requests on a new connection each (`GET /`, \
         `Connection: close`), {} requests on one keep-alive connection and one \
         `GET /bytes/{}` on one connection; backend: the test bed's TlsBackend. Each figure \
         is the median over runs, the ratio the median of each run's via / direct.\n",
        args.runs,
        thousands(f64::from(args.requests)),
        thousands(f64::from(args.keepalive_requests)),
        args.bulk_bytes,
    );
    let _ = writeln!(
        out,
        "| | direct TLS {BACKEND} | via detour {VIP} | via / direct |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for row in rows {
        let ratio = row.ratio.map_or_else(String::new, |r| format!("{r:.2}"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {ratio} |",
            row.figure.label(),
            format_figure(row.figure, row.direct),
            format_figure(row.figure, row.via)
        );
    }
    let _ = writeln!(out);
    for note in notes {
        let _ = writeln!(out, "- {note}");
    }
    out
}

// ---------------------------------------------------------------------------------------
// The client.

/// The client: runs inside the agent's cgroup, prints one JSON line per phase.
pub fn client(args: &TlsClientArgs) -> Result<()> {
    let pem = std::fs::read(&args.ca).with_context(|| format!("reading {}", args.ca.display()))?;
    let mut client = Client::new(args, &pem)?;
    let mut out = std::io::stdout().lock();
    let mut say = |line: serde_json::Value| -> Result<()> {
        writeln!(out, "{line}")?;
        out.flush()?;
        thread::sleep(PHASE_PAUSE);
        Ok(())
    };

    // Ready: a GET through the VIP answered by the backend.
    let start = Instant::now();
    loop {
        match client.request(Way::Via) {
            Ok(_) => break,
            Err(e) if start.elapsed() < READY_WITHIN => {
                client.via_failed += 1;
                if client.via_failed == 1 {
                    eprintln!("bench-tls-client: waiting for the VIP: {e:#}");
                }
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(e.context(format!("no answer through the VIP in {READY_WITHIN:?}")))
            }
        }
    }
    let (version, suite) = client.negotiated()?;
    say(serde_json::json!({
        "ready_ms": start.elapsed().as_secs_f64() * 1e3,
        "version": version,
        "suite": suite,
    }))?;
    for path in [Way::Direct, Way::Via] {
        for _ in 0..args.warmup {
            client
                .request(path)
                .with_context(|| format!("warm-up request, {}", path.as_str()))?;
        }
    }
    say(serde_json::json!({"warmed_up": true}))?;

    for run in 0..args.runs {
        for (mode, n) in [
            (Mode::NewConnection, args.requests),
            (Mode::KeepAlive, args.keepalive_requests),
        ] {
            for path in Way::order(run) {
                let (latencies_ns, wall, cpu) = client
                    .requests(mode, path, n)
                    .with_context(|| format!("run {run}, {}, {}", path.as_str(), mode.label()))?;
                say(serde_json::json!({
                    "run": run,
                    "path": path.as_str(),
                    "kind": mode.as_str(),
                    "latencies_ns": latencies_ns,
                    "wall_ns": u64::try_from(wall.as_nanos())?,
                    "cpu_ns": u64::try_from(cpu.as_nanos())?,
                }))?;
            }
        }
        for path in Way::order(run) {
            let cpu = process_cpu_self()?;
            let start = Instant::now();
            let elapsed = client
                .bulk(path, args.bulk_bytes)
                .with_context(|| format!("run {run}, {}, bulk", path.as_str()))?;
            let wall = start.elapsed();
            let cpu = process_cpu_self()? - cpu;
            say(serde_json::json!({
                "run": run,
                "path": path.as_str(),
                "kind": "bulk",
                "bytes": args.bulk_bytes,
                "elapsed_ns": u64::try_from(elapsed.as_nanos())?,
                "wall_ns": u64::try_from(wall.as_nanos())?,
                "cpu_ns": u64::try_from(cpu.as_nanos())?,
            }))?;
        }
    }
    let summary = serde_json::json!({
        "done": true,
        "via_connections": client.via_connections,
        "via_failed": client.via_failed,
        "requests_made": client.requests_made,
    });
    writeln!(out, "{summary}")?;
    out.flush()?;
    Ok(())
}

/// This process's user and system CPU time.
fn process_cpu_self() -> Result<Duration> {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let of = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(of(usage.ru_utime) + of(usage.ru_stime))
}

/// A connection on either path.
enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

struct Client {
    vip: SocketAddr,
    backend: SocketAddr,
    /// One configuration for every direct connection, as the agent has one per service
    /// (so both resume sessions alike).
    tls: Arc<ClientConfig>,
    name: ServerName<'static>,
    /// `GET /`, closing; `GET /`, keep-alive.
    request_close: Vec<u8>,
    request_keep: Vec<u8>,
    expect_body: Vec<u8>,
    buf: Vec<u8>,
    via_connections: u64,
    via_failed: u64,
    requests_made: u64,
}

impl Client {
    fn new(args: &TlsClientArgs, ca_pem: &[u8]) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert.context("the CA's PEM")?)?;
        }
        let request = |close: bool| {
            format!(
                "GET / HTTP/1.1\r\nHost: {}\r\n{}\r\n",
                args.sni,
                if close { "Connection: close\r\n" } else { "" }
            )
            .into_bytes()
        };
        Ok(Self {
            vip: args.vip,
            backend: args.backend,
            tls: client_config(Arc::new(roots))?,
            name: ServerName::try_from(args.sni.clone())?,
            request_close: request(true),
            request_keep: request(false),
            expect_body: format!("{BACKEND_NAME}\n").into_bytes(),
            buf: vec![0; READ_BUFFER],
            via_connections: 0,
            via_failed: 0,
            requests_made: 0,
        })
    }

    /// A TCP connection on `path`, TLS on the direct one (its handshake runs at the
    /// first write).
    fn open(&self, path: Way) -> Result<Conn> {
        let addr = match path {
            Way::Direct => self.backend,
            Way::Via => self.vip,
        };
        let tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(match path {
            Way::Direct => Conn::Tls(Box::new(StreamOwned::new(
                ClientConnection::new(self.tls.clone(), self.name.clone())?,
                tcp,
            ))),
            Way::Via => Conn::Plain(tcp),
        })
    }

    /// One `GET /` on `conn`, closing it or not; the answer must be the backend's name.
    fn get(&mut self, conn: &mut Conn, close: bool) -> Result<()> {
        let request = if close {
            &self.request_close
        } else {
            &self.request_keep
        };
        conn.write_all(request)?;
        conn.flush()?;
        let response = read_response(conn, &mut self.buf)?;
        self.requests_made += 1;
        ensure!(
            response.status == 200 && response.body_prefix == self.expect_body,
            "unexpected response: {} {:?}",
            response.status,
            String::from_utf8_lossy(&response.body_prefix)
        );
        Ok(())
    }

    /// Reads `conn` to its end after a closing request (the server closes first, so no
    /// TIME_WAIT piles up here); a connection on `path` that served all it was asked.
    fn finish(&mut self, mut conn: Conn, path: Way) -> Result<()> {
        drain(&mut conn, &mut self.buf)?;
        if path == Way::Via {
            self.via_connections += 1;
        }
        Ok(())
    }

    /// A connection on `path` on which a `GET /` was answered, so both hops' handshakes
    /// are done.
    fn open_warm(&mut self, path: Way) -> Result<Conn> {
        let mut conn = self.open(path)?;
        self.get(&mut conn, false)?;
        Ok(conn)
    }

    /// One `GET /` on a new connection; returns the time from before the connect to the
    /// last byte of the body. The connection is then read to its end, outside the time
    /// returned.
    fn request(&mut self, path: Way) -> Result<Duration> {
        let start = Instant::now();
        let mut conn = self.open(path)?;
        self.get(&mut conn, true)?;
        let took = start.elapsed();
        self.finish(conn, path)?;
        Ok(took)
    }

    /// `n` `GET /`s on `path`, one after the other, in `mode`: each one's latency, and the
    /// wall and CPU time they took together. Keep-alive requests run on one connection
    /// opened (and warmed) before the clock starts and closed after it stops; each is
    /// timed from writing it to the last byte of its body.
    fn requests(
        &mut self,
        mode: Mode,
        path: Way,
        n: u32,
    ) -> Result<(Vec<u64>, Duration, Duration)> {
        let mut conn = match mode {
            Mode::NewConnection => None,
            Mode::KeepAlive => Some(self.open_warm(path)?),
        };
        let cpu = process_cpu_self()?;
        let start = Instant::now();
        let mut latencies_ns = Vec::with_capacity(n as usize);
        for i in 0..n {
            let took = match &mut conn {
                None => self.request(path),
                Some(conn) => {
                    let start = Instant::now();
                    self.get(conn, false).map(|()| start.elapsed())
                }
            }
            .with_context(|| format!("request {i}"))?;
            latencies_ns.push(u64::try_from(took.as_nanos())?);
        }
        let wall = start.elapsed();
        let cpu = process_cpu_self()? - cpu;
        if let Some(mut conn) = conn {
            self.get(&mut conn, true)?;
            self.finish(conn, path)?;
        }
        Ok((latencies_ns, wall, cpu))
    }

    /// `GET /` then `GET /bytes/N` on one connection; returns the time from the second
    /// request to the last byte of its body.
    fn bulk(&mut self, path: Way, bytes: u64) -> Result<Duration> {
        let mut conn = self.open_warm(path)?;
        let request = format!(
            "GET /bytes/{bytes} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.name.to_str()
        );
        let start = Instant::now();
        conn.write_all(request.as_bytes())?;
        conn.flush()?;
        let response = read_response(&mut conn, &mut self.buf)?;
        let took = start.elapsed();
        self.requests_made += 1;
        ensure!(
            response.status == 200 && response.body_len == bytes,
            "GET /bytes/{bytes} answered {} with {} bytes",
            response.status,
            response.body_len
        );
        self.finish(conn, path)?;
        Ok(took)
    }

    /// The protocol version and cipher suite a direct connection negotiates.
    fn negotiated(&mut self) -> Result<(String, String)> {
        let mut conn = self.open(Way::Direct)?;
        self.get(&mut conn, true)?;
        drain(&mut conn, &mut self.buf)?;
        let Conn::Tls(tls) = &conn else {
            bail!("a direct connection without TLS");
        };
        Ok((
            format!("{:?}", tls.conn.protocol_version().context("no version")?),
            format!(
                "{:?}",
                tls.conn
                    .negotiated_cipher_suite()
                    .context("no suite")?
                    .suite()
            ),
        ))
    }
}

fn client_config(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// What [`read_response`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Response {
    status: u16,
    body_len: u64,
    /// The body's first bytes (at most [`BODY_PREFIX`]).
    body_prefix: Vec<u8>,
}

const BODY_PREFIX: usize = 256;

/// Reads one HTTP/1.1 response with a `Content-Length` from `conn`: the head, then
/// exactly that many body bytes (so a keep-alive connection can carry the next).
fn read_response(conn: &mut impl Read, buf: &mut [u8]) -> Result<Response> {
    let mut head = Vec::new();
    let (status, length, mut body_prefix) = loop {
        let n = conn.read(buf)?;
        if n == 0 {
            bail!("the connection closed inside the response head");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let (status, length) = parse_head(&head[..end])?;
            break (status, length, head.split_off(end + 4));
        }
        ensure!(head.len() <= MAX_RESPONSE_HEAD, "response head too long");
    };
    let mut body_len = body_prefix.len() as u64;
    body_prefix.truncate(BODY_PREFIX);
    while body_len < length {
        let n = conn.read(buf)?;
        if n == 0 {
            bail!("the connection closed after {body_len} of {length} body bytes");
        }
        if body_prefix.len() < BODY_PREFIX {
            let take = n.min(BODY_PREFIX - body_prefix.len());
            body_prefix.extend_from_slice(&buf[..take]);
        }
        body_len += n as u64;
    }
    ensure!(
        body_len == length,
        "{body_len} body bytes, Content-Length {length}"
    );
    Ok(Response {
        status,
        body_len,
        body_prefix,
    })
}

/// The status and `Content-Length` of a response head (without its blank line).
fn parse_head(head: &[u8]) -> Result<(u16, u64)> {
    let head = std::str::from_utf8(head).context("a response head that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code
            .parse()
            .with_context(|| format!("status line {status_line:?}"))?,
        _ => bail!("status line {status_line:?}"),
    };
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .context("no Content-Length")?
        .1
        .trim()
        .parse()
        .context("Content-Length")?;
    Ok((status, length))
}

/// Reads `conn` to its end (the server closes after a `Connection: close` response).
fn drain(conn: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    loop {
        match conn.read(buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // A TLS peer that closed without close_notify: the bytes were all there.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("reading to the end of the connection"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The backend.

/// The backend: the test bed's [`TlsBackend`] at `--listen` until killed. Its first line
/// says where it listens and where its stats socket is: each connection to that gets the
/// backend's requests and handshakes so far as one JSON line.
pub fn server(args: &TlsServerArgs) -> Result<()> {
    let cert = ServerCert {
        cert_pem: std::fs::read_to_string(&args.cert)?,
        key_pem: std::fs::read_to_string(&args.key)?,
    };
    let backend = TlsBackend::start_at(BACKEND_NAME, args.listen, &cert)?;
    let stats = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .context("binding the stats socket")?;
    println!(
        "{}",
        serde_json::json!({
            "listening": backend.addr().to_string(),
            "stats": stats.local_addr()?.to_string(),
        })
    );
    std::io::stdout().flush()?;
    for conn in stats.incoming() {
        let Ok(mut conn) = conn else {
            continue;
        };
        let (full, resumed) = backend.handshakes();
        let counts = BackendCounts {
            requests: backend.requests(),
            full,
            resumed,
        };
        // The reader may be gone; the next one asks again.
        let _ = writeln!(conn, "{}", counts.json());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7], 99.0), 7.0);
        assert_eq!(percentile(&[1, 2, 3], 0.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn paths_alternate_by_run() {
        assert_eq!(Way::order(0), [Way::Direct, Way::Via]);
        assert_eq!(Way::order(1), [Way::Via, Way::Direct]);
        assert_eq!(Way::order(4), Way::order(0));
        for p in [Way::Direct, Way::Via] {
            assert_eq!(Way::parse(p.as_str()).unwrap(), p);
        }
    }

    fn requests(run: u32, path: Way, latencies_us: &[u64], wall_ms: u64) -> Phase {
        Phase {
            run,
            path,
            kind: PhaseKind::Requests {
                mode: Mode::NewConnection,
                latencies_ns: latencies_us.iter().map(|us| us * 1000).collect(),
            },
            wall: Duration::from_millis(wall_ms),
            client_cpu: Duration::from_millis(wall_ms / 2),
            agent_cpu: Duration::ZERO,
            server_cpu: Duration::from_millis(1),
            handshakes: (1, latencies_us.len() as u64 - 1),
        }
    }

    fn keepalive(run: u32, path: Way, latencies_us: &[u64], wall_ms: u64) -> Phase {
        let mut phase = requests(run, path, latencies_us, wall_ms);
        phase.kind = PhaseKind::Requests {
            mode: Mode::KeepAlive,
            latencies_ns: latencies_us.iter().map(|us| us * 1000).collect(),
        };
        phase.handshakes = (0, 1);
        phase
    }

    fn bulk(run: u32, path: Way, ms: u64) -> Phase {
        Phase {
            run,
            path,
            kind: PhaseKind::Bulk {
                bytes: 100_000_000,
                elapsed: Duration::from_millis(ms),
            },
            wall: Duration::from_millis(2 * ms),
            client_cpu: Duration::from_millis(ms),
            agent_cpu: Duration::from_millis(ms / 2),
            server_cpu: Duration::ZERO,
            handshakes: (0, 0),
        }
    }

    #[test]
    fn figures_of_a_phase() {
        let f = requests(0, Way::Direct, &[100, 200, 300, 400], 2).figures();
        assert_eq!(f[0], (Figure::P50, 200.0));
        assert_eq!(f[1], (Figure::P99, 400.0));
        assert_eq!(f[2], (Figure::RequestsPerSec, 2000.0));
        assert_eq!(f[3], (Figure::RequestClientCpu, 250.0));
        let f = keepalive(0, Way::Via, &[10, 20, 30, 40], 1).figures();
        assert_eq!(f[0], (Figure::KeepAliveP50, 20.0));
        assert_eq!(f[2], (Figure::KeepAliveRequestsPerSec, 4000.0));
        assert_eq!(f[5].0, Figure::KeepAliveServerCpu);
        let f = bulk(0, Way::Via, 100).figures();
        assert_eq!(f[0], (Figure::MegabytesPerSec, 1000.0));
        assert_eq!(f[1], (Figure::BulkClientCpu, 50.0));
        assert_eq!(f[2], (Figure::BulkAgentCpu, 25.0));
    }

    #[test]
    fn summary_takes_medians_and_per_run_ratios() {
        let phases = [
            requests(0, Way::Direct, &[100], 10),
            requests(0, Way::Via, &[110], 10),
            requests(1, Way::Via, &[120], 10),
            requests(1, Way::Direct, &[200], 10),
            requests(2, Way::Direct, &[120], 10),
            requests(2, Way::Via, &[130], 10),
            keepalive(0, Way::Direct, &[50], 10),
            keepalive(0, Way::Via, &[60], 10),
            bulk(0, Way::Direct, 100),
            bulk(0, Way::Via, 200),
        ];
        let rows = summarize(&phases);
        let row = |figure: Figure| {
            let r = rows.iter().find(|r| r.figure == figure).unwrap();
            (r.direct, r.via, r.ratio)
        };
        let (direct, via, ratio) = row(Figure::P50);
        assert_eq!((direct, via), (120.0, 120.0));
        // Per run: 1.1, 0.6, 130/120; the median is 130/120, not 120/120 (the ratio of
        // the medians).
        assert!((ratio.unwrap() - 130.0 / 120.0).abs() < 1e-9);
        assert_eq!(row(Figure::KeepAliveP50), (50.0, 60.0, Some(1.2)));
        assert_eq!(row(Figure::MegabytesPerSec), (1000.0, 500.0, Some(0.5)));
        // The agent's CPU has no ratio (direct barely uses it), and rows keep the
        // report's order.
        let without: Vec<Figure> = rows
            .iter()
            .filter(|r| !r.figure.has_ratio())
            .inspect(|r| assert_eq!(r.ratio, None))
            .map(|r| r.figure)
            .collect();
        assert_eq!(
            without,
            [
                Figure::RequestAgentCpu,
                Figure::KeepAliveAgentCpu,
                Figure::BulkAgentCpu
            ]
        );
        assert!(rows.windows(2).all(|w| w[0].figure < w[1].figure));
        assert_eq!(rows.len(), 16);
    }

    #[test]
    fn handshakes_are_summed_per_path() {
        let phases = [
            requests(0, Way::Direct, &[1, 2, 3], 1),
            requests(1, Way::Direct, &[1, 2], 1),
            requests(0, Way::Via, &[1, 2], 1),
            keepalive(0, Way::Via, &[1, 2], 1),
            keepalive(1, Way::Via, &[1, 2], 1),
            bulk(0, Way::Via, 1),
        ];
        assert_eq!(
            handshake_note(&phases),
            "the backend's TLS handshakes during the request phases (health checks' \
             included): new connection per request, direct: 2 full, 3 resumed; \
             new connection per request, via: 1 full, 1 resumed; \
             keep-alive, one connection, direct: 0 full, 0 resumed; \
             keep-alive, one connection, via: 0 full, 2 resumed"
        );
    }

    #[test]
    fn response_heads_and_bodies() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\ncontent-length: 12").unwrap(),
            (200, 12)
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: x").is_err());
        assert!(parse_head(b"SSH-2.0 hello").is_err());
        let mut buf = [0u8; 3];
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ndb\n";
        let mut reader = &raw[..];
        let r = read_response(&mut reader, &mut buf).unwrap();
        // Bytes past the body (nothing is pipelined here) mean the stream is not what
        // the client thinks it is.
        let mut more = &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ndb\nNEXT"[..];
        assert!(read_response(&mut more, &mut [0u8; 64]).is_err());
        assert_eq!(
            (r.status, r.body_len, &r.body_prefix[..]),
            (200, 3, &b"db\n"[..])
        );
        let mut short = &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\ndb\n"[..];
        assert!(read_response(&mut short, &mut buf).is_err());
    }

    #[test]
    fn phases_from_the_client_lines() {
        let line = serde_json::json!({
            "run": 1, "path": "via", "kind": "keepalive", "latencies_ns": [1000, 3000],
            "wall_ns": 5000, "cpu_ns": 2000,
        });
        let phase = Phase::from_json(&line, Duration::ZERO, Duration::ZERO, (0, 1)).unwrap();
        assert_eq!(phase.run, 1);
        assert_eq!(
            phase.kind,
            PhaseKind::Requests {
                mode: Mode::KeepAlive,
                latencies_ns: vec![1000, 3000]
            }
        );
        assert_eq!(phase.handshakes, (0, 1));
        let mut line = line;
        line["kind"] = "requests".into();
        let phase = Phase::from_json(&line, Duration::ZERO, Duration::ZERO, (1, 0)).unwrap();
        assert!(matches!(
            phase.kind,
            PhaseKind::Requests {
                mode: Mode::NewConnection,
                ..
            }
        ));
        line["kind"] = "pipelined".into();
        assert!(Phase::from_json(&line, Duration::ZERO, Duration::ZERO, (0, 0)).is_err());
    }

    #[test]
    fn backend_counts_round_trip() {
        let counts = BackendCounts {
            requests: 7,
            full: 2,
            resumed: 5,
        };
        assert_eq!(
            BackendCounts::parse(&counts.json().to_string()).unwrap(),
            counts
        );
        assert!(BackendCounts::parse("{\"requests\": 1}").is_err());
        let earlier = BackendCounts {
            requests: 1,
            full: 1,
            resumed: 2,
        };
        assert_eq!(counts.handshakes_since(&earlier), (1, 3));
    }

    #[test]
    fn cpu_ticks_of_a_stat_line() {
        let stat = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 111 222 13 14 15";
        assert_eq!(cpu_ticks(stat), Some(333));
        assert_eq!(cpu_ticks("1 (x) S 1"), None);
        assert!(process_cpu(std::process::id()).is_ok());
        assert!(process_cpu_self().is_ok());
    }

    #[test]
    fn metric_sums_over_series() {
        let text = "# HELP x\n\
                    detour_tls_connections_relayed_total 8\n\
                    detour_tls_connections_relayed_totally 100\n\
                    detour_tls_bytes_total{direction=\"up\"} 100\n\
                    detour_tls_bytes_total{direction=\"down\"} 2000\n";
        assert_eq!(
            metric_sum(text, "detour_tls_connections_relayed_total"),
            Some(8)
        );
        assert_eq!(metric_sum(text, "detour_tls_bytes_total"), Some(2100));
        assert_eq!(metric_sum(text, "detour_missing"), None);
    }

    #[test]
    fn config_is_one_tls_service() {
        let dir = detour_testbed::TempDir::new().unwrap();
        let ca = dir.join("ca.pem");
        let config = detour_agent::config::parse(&config(&ca))
            .expect("the agent accepts the benchmark's config");
        let [service] = &config.services[..] else {
            panic!("one service: {:?}", config.services);
        };
        assert_eq!(service.name, SERVICE);
        let ([vip], [port], [endpoint]) = (
            &service.vips[..],
            &service.ports[..],
            &service.endpoints[..],
        ) else {
            panic!("one VIP, port and endpoint");
        };
        assert_eq!(SocketAddr::new(*vip, port.number).to_string(), VIP);
        assert_eq!(
            SocketAddr::new(endpoint.address, endpoint.port_for(port)).to_string(),
            BACKEND
        );
        let tls = service.tls.as_ref().expect("the service originates TLS");
        assert_eq!(tls.sni.as_deref(), Some(SNI));
        assert_eq!(tls.ca_certificates.as_deref(), Some(ca.as_path()));
    }

    /// The test bed's backend and the client's direct path, end to end on 127.0.0.1 (no
    /// agent, no cgroup): answers, keep-alive, bulk bytes, resumption and counts.
    #[test]
    fn direct_client_against_the_backend() {
        let ca = TestCa::new("bench-tls-unit").unwrap();
        let cert = ca.issue(&[SNI]).unwrap();
        let backend =
            TlsBackend::start_at(BACKEND_NAME, "127.0.0.1:0".parse().unwrap(), &cert).unwrap();
        let args = TlsClientArgs {
            vip: backend.addr(),
            backend: backend.addr(),
            ca: PathBuf::new(),
            sni: SNI.into(),
            runs: 1,
            requests: 1,
            keepalive_requests: 1,
            warmup: 0,
            bulk_bytes: 1,
        };
        let mut client = Client::new(&args, ca.pem().as_bytes()).unwrap();
        let (latencies, _, _) = client
            .requests(Mode::NewConnection, Way::Direct, 5)
            .unwrap();
        assert_eq!(latencies.len(), 5);
        let (full, resumed) = backend.handshakes();
        assert_eq!(full + resumed, 5);
        assert!(resumed >= 3, "{full} full, {resumed} resumed");
        let (version, _) = client.negotiated().unwrap();
        assert_eq!(version, "TLSv1_3");
        // Keep-alive: one connection, so one handshake, for the warming request, the
        // timed ones and the closing one.
        let (latencies, _, _) = client.requests(Mode::KeepAlive, Way::Direct, 20).unwrap();
        assert_eq!(latencies.len(), 20);
        let (full_now, resumed_now) = backend.handshakes();
        assert_eq!(full_now + resumed_now, 7);
        client.bulk(Way::Direct, 1_000_000).unwrap();
        // Plain HTTP to a TLS server gets no answer it could take for one.
        assert!(client.request(Way::Via).is_err());
        assert_eq!(client.via_connections, 0);
        assert_eq!(client.requests_made, 5 + 1 + 22 + 2);
        assert_eq!(backend.requests(), client.requests_made);
    }
}
