//! `cargo xtask bench-reload`: how long a one-service edit of the standalone file takes
//! to reach real connects, and what the agent's memory does, at 100 to 100,000 services.
//!
//! Per setup (`SERVICESxENDPOINTS`): the agent loads `bench` (one endpoint) plus fillers,
//! a client in the bench cgroup connects to `bench`'s VIP in a loop, and the task
//! rewrites the file (write a temporary file, rename it into place, as the README says
//! to) moving `bench`'s endpoint between two accept-and-drop listeners. The latency of a
//! change is from the rename to the first connection the new listener accepts; the client
//! connects back to back, so that is when the kernel's table changed, give or take one
//! connect. The agent's own log gives how that splits into read+parse and apply, and
//! `/proc/PID/status` its resident memory after the first load and after the changes.
//!
//! Invariants: loopback only (`bench` at 127.233.0.1, filler VIPs in 127.212.0.0/16,
//! filler endpoints in 127.213.0.0/16 to 127.232.0.0/16, never contacted: their health
//! checks are off); every wait is bounded; the
//! agent, cgroup and pins are guards removed after each setup, pass or fail.

use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use detour_testbed::{AgentBed, Cgroup, LineStream};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::bench::{median, thousands, wait_in_table, AcceptSink};
use crate::{cmd, setup};

const VIP: &str = "127.233.0.1:80";
const BACKEND_A: &str = "127.0.4.1:9000";
const BACKEND_B: &str = "127.0.4.2:9000";
const LOCALITY: &str = "us-east1/us-east1-b";
/// The longest one change may take before the setup is abandoned.
const CHANGE_BUDGET: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub struct ReloadArgs {
    /// Setups as SERVICESxENDPOINTS (endpoints per filler service), comma-separated.
    #[arg(long, default_value = "100x10,10000x10,100000x1", value_delimiter = ',', value_parser = parse_setup)]
    setups: Vec<(u32, u32)>,
    /// Changes measured per setup.
    #[arg(long, default_value_t = 20)]
    changes: u32,
}

/// Arguments of the hidden `reload-client` subcommand: connect to `target` back to back
/// until `stop_file` exists or `max_ms` passed; print `{"ok": N, "failed": N}`.
#[derive(clap::Args)]
pub struct ReloadClientArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long)]
    stop_file: PathBuf,
    #[arg(long)]
    max_ms: u64,
}

fn parse_setup(s: &str) -> Result<(u32, u32)> {
    let (services, endpoints) = s
        .split_once('x')
        .with_context(|| format!("{s:?}: expected SERVICESxENDPOINTS, e.g. 10000x10"))?;
    let services: u32 = services.parse().context("services")?;
    let endpoints: u32 = endpoints.parse().context("endpoints")?;
    if services == 0 || !(1..=20).contains(&endpoints) || services > 1_000_000 {
        bail!("{s:?}: services must be 1..=1000000 and endpoints 1..=20");
    }
    Ok((services, endpoints))
}

pub fn client(args: &ReloadClientArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_millis(args.max_ms);
    let addr = SockAddr::from(args.target);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    while Instant::now() < deadline && !args.stop_file.exists() {
        // A few hundred connects between checks of the stop file.
        for _ in 0..200 {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_linger(Some(Duration::ZERO))?;
            match socket.connect(&addr) {
                Ok(()) => ok += 1,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"ok": ok, "failed": failed, "first_error": first_error})
    );
    Ok(())
}

/// What one setup measured.
struct SetupResult {
    services: u32,
    endpoints: u32,
    file_mib: f64,
    load: Duration,
    latencies: Vec<Duration>,
    read_parse_ms: Vec<f64>,
    apply_ms: Vec<f64>,
    rss_loaded_mib: f64,
    rss_after_mib: f64,
    client: String,
}

pub fn run(args: &ReloadArgs) -> Result<()> {
    detour_testbed::require_root("cargo xtask bench-reload")?;
    if args.changes < 2 {
        bail!("--changes must be at least 2");
    }
    setup::run()?;
    let binary = cmd::build_agent()?;
    let a = AcceptSink::start(BACKEND_A.parse()?)?;
    let b = AcceptSink::start(BACKEND_B.parse()?)?;
    let mut results = Vec::new();
    for &(services, endpoints) in &args.setups {
        eprintln!("bench-reload: {services} services x {endpoints} endpoints");
        results.push(
            one_setup(&binary, services, endpoints, args.changes, &a, &b)
                .with_context(|| format!("setup {services}x{endpoints}"))?,
        );
    }
    print!("{}", report(&results, args.changes));
    Ok(())
}

fn one_setup(
    binary: &Path,
    services: u32,
    endpoints: u32,
    changes: u32,
    a: &AcceptSink,
    b: &AcceptSink,
) -> Result<SetupResult> {
    // The bed's guards: the agent, then the pins (detaching), the cgroup, the config.
    let mut bed = AgentBed::new(binary)?;
    let config = bed.config_path();
    let template = config_text(services, endpoints);
    write_atomically(&config, &template.replace("@BACKEND@", "127.0.4.1"))?;
    let file_mib = template.len() as f64 / (1024.0 * 1024.0);
    let log = bed.log_path();
    let loading = Instant::now();
    bed.start_agent(&[], Duration::from_secs(240))?;
    let AgentBed {
        agent: Some(agent),
        cgroup,
        dir,
        ..
    } = &mut bed
    else {
        unreachable!("the agent was just started");
    };
    wait_in_table(agent, "bench", Instant::now() + Duration::from_secs(60))?;
    let load = loading.elapsed();
    let pid = agent.pid().context("agent pid")?;
    let stop = dir.join("stop-client");
    let client = ReloadClient::spawn(cgroup, VIP, stop, changes)?;
    // The client is connecting once A accepts its connects.
    wait_until_accepts(a, Duration::from_secs(10))?;
    let rss_loaded_mib = rss_mib(pid)?;

    let mut latencies = Vec::new();
    for change in 0..changes {
        let (to, sink) = if change % 2 == 0 {
            ("127.0.4.2", b)
        } else {
            ("127.0.4.1", a)
        };
        let before = sink.accepted();
        let started = Instant::now();
        write_atomically(&config, &template.replace("@BACKEND@", to))?;
        loop {
            if sink.accepted() > before {
                break;
            }
            if started.elapsed() > CHANGE_BUDGET {
                bail!(
                    "change {change} did not reach {to} within {CHANGE_BUDGET:?}{}",
                    agent.log_tail()
                );
            }
            thread::sleep(Duration::from_micros(200));
        }
        let latency = started.elapsed();
        eprintln!(
            "  change {change:>2}: {:.1} ms",
            latency.as_secs_f64() * 1e3
        );
        latencies.push(latency);
        thread::sleep(Duration::from_millis(100));
    }
    let rss_after_mib = rss_mib(pid)?;
    let summary = client.finish()?;
    if summary.failed != 0 {
        bail!(
            "the client saw {} failed connects during reloads (first: {})",
            summary.failed,
            summary.first_error.unwrap_or_default()
        );
    }
    let client = format!("{} connects, 0 failed", thousands(summary.ok as f64));
    agent.stop()?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // Kept for a closer look: the temp dir goes away with the task.
    let kept = Path::new("target/bench-reload");
    if std::fs::create_dir_all(kept).is_ok() {
        let _ = std::fs::write(
            kept.join(format!("agent-{services}x{endpoints}.log")),
            &text,
        );
    }
    let (read_parse_ms, apply_ms) = reload_timings(&text);
    Ok(SetupResult {
        services,
        endpoints,
        file_mib,
        load,
        latencies,
        read_parse_ms,
        apply_ms,
        rss_loaded_mib,
        rss_after_mib,
        client,
    })
}

/// Waits until `sink` accepted a connection after this call, bounded by `timeout`.
fn wait_until_accepts(sink: &AcceptSink, timeout: Duration) -> Result<()> {
    let before = sink.accepted();
    let deadline = Instant::now() + timeout;
    while sink.accepted() == before {
        if Instant::now() > deadline {
            bail!("no connection accepted within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A running `reload-client` (connects to `target` in a loop inside the bench cgroup
/// until its stop file exists), shared by bench-reload and bench-kubernetes. Killed and
/// reaped if dropped before [`ReloadClient::finish`].
pub(crate) struct ReloadClient {
    client: LineStream,
    stop: PathBuf,
}

/// What a [`ReloadClient`] saw.
pub(crate) struct ReloadSummary {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

impl ReloadClient {
    pub(crate) fn spawn(
        cgroup: &Cgroup,
        target: &str,
        stop: PathBuf,
        changes: u32,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let max_ms = (CHANGE_BUDGET.as_millis() as u64) * u64::from(changes + 1);
        let mut command = Command::new(exe);
        command
            .arg("reload-client")
            .args(["--target", target])
            .arg("--stop-file")
            .arg(&stop)
            .args(["--max-ms", &max_ms.to_string()]);
        Ok(Self {
            client: LineStream::spawn_in(cgroup, &mut command)?,
            stop,
        })
    }

    /// Writes the stop file, waits (bounded) for the client and reads its summary.
    pub(crate) fn finish(self) -> Result<ReloadSummary> {
        std::fs::write(&self.stop, b"")?;
        let (status, lines) = self
            .client
            .wait(Duration::from_secs(15))
            .context("the connect client did not stop")?;
        ensure!(status.success(), "the connect client failed: {status}");
        let line = lines.last().map_or("", |(_, l)| l.as_str());
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("bad client line {line:?}"))?;
        Ok(ReloadSummary {
            ok: v["ok"].as_u64().context("client line without \"ok\"")?,
            failed: v["failed"]
                .as_u64()
                .context("client line without \"failed\"")?,
            first_error: v["first_error"].as_str().map(ToOwned::to_owned),
        })
    }
}

/// The config: `bench` first (its endpoint is `@BACKEND@`, filled in per change), then
/// fillers with `endpoints` endpoints each and health checks disabled.
fn config_text(services: u32, endpoints: u32) -> String {
    let mut w = String::new();
    let _ = writeln!(w, "node: {{ locality: {LOCALITY} }}");
    let _ = writeln!(w, "services:");
    let _ = writeln!(
        w,
        "  - {{name: bench, vips: [127.233.0.1], ports: [{{number: 80, targetPort: 9000}}], \
         endpoints: [{{address: \"@BACKEND@\", locality: {LOCALITY}}}], healthCheck: {{disabled: true}}}}"
    );
    for i in 1..services {
        let j = i - 1;
        let vip = format!("127.212.{}.{}", (j >> 8) & 0xff, j & 0xff);
        let port = 80 + (j >> 16);
        let mut eps = String::new();
        for k in 0..endpoints {
            let _ = write!(
                eps,
                "{}{{address: 127.{}.{}.{}}}",
                if k == 0 { "" } else { ", " },
                213 + k,
                (j >> 8) & 0xff,
                j & 0xff
            );
        }
        let _ = writeln!(
            w,
            "  - {{name: filler-{i:06}, vips: [{vip}], ports: [{{number: {port}, targetPort: 9000}}], \
             endpoints: [{eps}], healthCheck: {{disabled: true}}}}"
        );
    }
    w
}

/// Writes `path` as the README says to: a temporary file renamed into place.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
    w.write_all(text.as_bytes())?;
    w.into_inner()?.sync_data()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// `read_parse_ms` and `apply_ms` of every "configuration reloaded" line of the log.
fn reload_timings(log: &str) -> (Vec<f64>, Vec<f64>) {
    let field = |line: &str, name: &str| -> Option<f64> {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        line[at..].split_whitespace().next()?.parse().ok()
    };
    let mut parse = Vec::new();
    let mut apply = Vec::new();
    for line in log.lines().filter(|l| l.contains("configuration reloaded")) {
        if let (Some(p), Some(a)) = (field(line, "read_parse_ms"), field(line, "apply_ms")) {
            parse.push(p);
            apply.push(a);
        }
    }
    (parse, apply)
}

fn percentile(values: &[Duration], p: f64) -> f64 {
    let mut ms: Vec<f64> = values.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (ms.len() as f64)).ceil() as usize;
    ms[rank.clamp(1, ms.len()) - 1]
}

fn report(results: &[SetupResult], changes: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\none-service edit of the standalone file (rename), {changes} changes per setup; \
         latency = rename → first connect to the new backend\n"
    );
    let _ = writeln!(
        out,
        "| services × endpoints | file | first load | p50 | p99 | max | read+parse (median) | apply (median) | RSS loaded | RSS after | client |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in results {
        let med = |v: &[f64]| {
            if v.is_empty() {
                "n/a".to_owned()
            } else {
                format!("{:.0} ms", median(v.to_vec()))
            }
        };
        let _ = writeln!(
            out,
            "| {} × {} | {:.1} MiB | {:.1} s | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} | {:.0} MiB | {:.0} MiB | {} |",
            thousands(f64::from(r.services)),
            r.endpoints,
            r.file_mib,
            r.load.as_secs_f64(),
            percentile(&r.latencies, 50.0),
            percentile(&r.latencies, 99.0),
            percentile(&r.latencies, 100.0),
            med(&r.read_parse_ms),
            med(&r.apply_ms),
            r.rss_loaded_mib,
            r.rss_after_mib,
            r.client,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setups_parse_and_refuse_nonsense() {
        assert_eq!(parse_setup("10000x10").unwrap(), (10_000, 10));
        for bad in ["10000", "x10", "0x1", "10x0", "10x21", "ax1"] {
            assert!(parse_setup(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_config_parses_with_the_agent_s_rules_in_shape() {
        let text = config_text(3, 2).replace("@BACKEND@", "127.0.4.1");
        let config =
            detour_agent::config::parse(&text).expect("the agent accepts the reload config");
        // Each service: name, VIP:port, backends.
        let shape: Vec<(String, String, Vec<String>)> = config
            .services
            .iter()
            .map(|s| {
                let ([vip], [port]) = (&s.vips[..], &s.ports[..]) else {
                    panic!("{} has one VIP and port", s.name);
                };
                let backends = s
                    .endpoints
                    .iter()
                    .map(|e| std::net::SocketAddr::new(e.address, e.port_for(port)).to_string());
                (
                    s.name.clone(),
                    std::net::SocketAddr::new(*vip, port.number).to_string(),
                    backends.collect(),
                )
            })
            .collect();
        let row = |name: &str, vip: &str, backends: &[&str]| {
            let backends = backends.iter().map(ToString::to_string).collect();
            (name.to_owned(), vip.to_owned(), backends)
        };
        assert_eq!(
            shape,
            [
                row("bench", VIP, &[BACKEND_A]),
                row(
                    "filler-000001",
                    "127.212.0.0:80",
                    &["127.213.0.0:9000", "127.214.0.0:9000"]
                ),
                row(
                    "filler-000002",
                    "127.212.0.1:80",
                    &["127.213.0.1:9000", "127.214.0.1:9000"]
                ),
            ]
        );
        assert!(config
            .services
            .iter()
            .all(|s| s.health_check.kind == detour_agent::config::HealthCheckKind::None));
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert!((percentile(&v, 50.0) - 10.0).abs() < 1e-9);
        assert!((percentile(&v, 99.0) - 20.0).abs() < 1e-9);
    }

    #[test]
    fn timings_come_from_the_reload_lines() {
        let log = "x configuration reloaded why=\"file changed\" services=3 read_parse_ms=12 apply_ms=4 total_ms=16\nother";
        assert_eq!(reload_timings(log), (vec![12.0], vec![4.0]));
    }
}
