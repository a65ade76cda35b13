//! `cargo xtask demo`: Istio's "failover for external services" example, on this machine.
//!
//! `mydb` (VIP 127.200.0.1:80) is backed by two "DynamoDB us-east-1" HTTP backends in the
//! node's zone and one "us-west-1" backend, with `failover: from us-east1 to us-west`.
//! A client inside the agent's cgroup calls the VIP while the demo stops and restarts the
//! us-east1 backends; each response names the backend that served it.
//!
//! Invariants:
//! - every resource (backends, temp dir, pin dir, cgroup, agent) is a guard declared in
//!   `run`, so any early return or error tears everything down in reverse order: agent
//!   first, then the cgroup (detaching programs), pins, backends, temp files;
//! - the client is bounded in requests and time and is killed at its deadline;
//! - the demo exits non-zero when a phase did not behave as failover should, so it doubles
//!   as a smoke test of the whole datapath.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use detour_testbed::{http_request, Agent, AgentOptions, Cgroup, HttpBackend, PinDir, TempDir};

use crate::{cmd, parse_duration, setup};

const EAST_A: &str = "dynamodb.us-east-1 (a)";
const EAST_B: &str = "dynamodb.us-east-1 (b)";
const WEST: &str = "dynamodb.us-west-1";
const VIP: &str = "127.200.0.1:80";

/// The agent config: Istio's ServiceEntry + DestinationRule, one-to-one.
const CONFIG: &str = "\
# Istio's \"failover for external services\" example as a detour config.
node: { locality: us-east1/us-east1-b }
services:
  - name: mydb
    vips: [127.200.0.1]
    ports: [{number: 80, name: http}]
    endpoints:
      # dynamodb.us-east-1 (a)
      - {address: 127.0.1.1, ports: {http: 8080}, locality: us-east1/us-east1-b}
      # dynamodb.us-east-1 (b)
      - {address: 127.0.1.2, ports: {http: 8080}, locality: us-east1/us-east1-b}
      # dynamodb.us-west-1
      - {address: 127.0.2.1, ports: {http: 8080}, locality: us-west/us-west-1a}
    localityLbSetting: {failover: [{from: us-east1, to: us-west}]}
    healthCheck: {interval: 200ms, timeout: 100ms, unhealthyThreshold: 1, healthyThreshold: 1}
    # The seed's DestinationRule outlierDetection, field for field.
    outlierDetection: {consecutive5xxErrors: 1, interval: 15s, baseEjectionTime: 1m}
";

/// Arguments of the hidden `demo-client` subcommand.
#[derive(clap::Args)]
pub struct ClientArgs {
    /// The address to GET http://ADDR/ from.
    #[arg(long)]
    vip: SocketAddr,
    /// Number of requests.
    #[arg(long)]
    count: u32,
    /// Pause between requests.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    interval: Duration,
    /// Number of the first request (numbering continues across phases).
    #[arg(long, default_value_t = 1)]
    first: u32,
    /// Phase label printed before the backend's name.
    #[arg(long, default_value = "")]
    label: String,
    /// Connect and read timeout of one request.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    timeout: Duration,
}

/// The client loop: one line per request, `#N  200  label: backend` or `#N  ERR  reason`.
pub fn client(args: &ClientArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for i in 0..args.count {
        let n = format!("#{}", args.first + i);
        match http_request(args.vip, args.timeout) {
            Ok(r) => writeln!(
                out,
                "{n:<5}{:<5}{}: {}",
                r.status,
                args.label,
                r.body.trim_end()
            )?,
            Err(e) => writeln!(out, "{n:<5}{:<5}{}", "ERR", describe(&e))?,
        }
        out.flush()?;
        if i + 1 < args.count {
            thread::sleep(args.interval);
        }
    }
    Ok(())
}

/// "connection refused", "timed out", … for the client's error lines.
fn describe(err: &anyhow::Error) -> String {
    use std::io::ErrorKind;
    match err
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind)
    {
        Some(ErrorKind::ConnectionRefused) => "connection refused".into(),
        Some(ErrorKind::ConnectionReset) => "connection reset".into(),
        Some(ErrorKind::TimedOut | ErrorKind::WouldBlock) => "timed out".into(),
        _ => format!("{:#}", err.root_cause()),
    }
}

/// What one phase's requests did.
#[derive(Default)]
struct Tally {
    served: BTreeMap<String, u32>,
    errors: BTreeMap<String, u32>,
}

impl Tally {
    fn total(&self) -> u32 {
        self.served.values().chain(self.errors.values()).sum()
    }

    fn error_count(&self) -> u32 {
        self.errors.values().sum()
    }

    /// Adds one client line; `label` is the phase label the client was given.
    fn record(&mut self, line: &str, label: &str) {
        let rest = line.split_once(' ').map_or("", |(_, r)| r.trim_start());
        let (status, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let rest = rest.trim_start();
        if status == "200" {
            let backend = rest.strip_prefix(&format!("{label}: ")).unwrap_or(rest);
            *self.served.entry(backend.to_owned()).or_default() += 1;
        } else if status == "ERR" {
            *self.errors.entry(rest.to_owned()).or_default() += 1;
        } else {
            *self.errors.entry(format!("status {status}")).or_default() += 1;
        }
    }
}

/// One phase of the scenario and what failover should make of it.
struct Phase {
    title: &'static str,
    label: &'static str,
    requests: u32,
    expected: &'static [&'static str],
    tally: Tally,
}

impl Phase {
    fn as_expected(&self) -> bool {
        self.tally.error_count() == 0
            && self.tally.total() == self.requests
            && self
                .tally
                .served
                .keys()
                .all(|b| self.expected.contains(&b.as_str()))
    }
}

pub fn run() -> Result<()> {
    detour_testbed::require_root("cargo xtask demo")?;
    setup::run()?;
    let binary = cmd::build_agent()?;
    let started = Instant::now();

    // Guards: dropped in reverse order — agent, cgroup, pins, backends, temp dir.
    let tmp = TempDir::new()?;
    let mut east = [
        HttpBackend::start_at(EAST_A, "127.0.1.1:8080".parse()?)?,
        HttpBackend::start_at(EAST_B, "127.0.1.2:8080".parse()?)?,
    ];
    let _west = HttpBackend::start_at(WEST, "127.0.2.1:8080".parse()?)?;
    let config = tmp.join("mydb.yaml");
    std::fs::write(&config, CONFIG)?;
    let pins = PinDir::new()?;
    let cgroup = Cgroup::new()?;
    let mut agent = Agent::start(AgentOptions {
        binary,
        config: config.clone(),
        cgroup: cgroup.path().to_owned(),
        bpffs: pins.path().to_owned(),
        socket: tmp.join("detour.sock"),
        log: tmp.join("agent.log"),
    })?;

    println!("== {} ==\n{CONFIG}", config.display());
    let result = scenario(&mut agent, &cgroup, &mut east);
    let phases = result.map_err(|e| {
        let tail = agent.log_tail();
        e.context(format!("demo failed{tail}"))
    })?;
    summarize(&phases);
    println!("\ndemo finished in {:.1}s", started.elapsed().as_secs_f64());
    if let Some(bad) = phases.iter().find(|p| !p.as_expected()) {
        bail!(
            "phase {:?} did not behave as failover should (see above)",
            bad.title
        );
    }
    Ok(())
}

fn scenario(agent: &mut Agent, cgroup: &Cgroup, east: &mut [HttpBackend; 2]) -> Result<Vec<Phase>> {
    agent.wait_ready(Duration::from_secs(20))?;
    wait_all_healthy(agent, 3, Duration::from_secs(5));
    let mut phases = vec![
        Phase {
            title: "1. all endpoints healthy: traffic stays in us-east1",
            label: "healthy",
            requests: 10,
            expected: &[EAST_A, EAST_B],
            tally: Tally::default(),
        },
        Phase {
            title: "2. both us-east1 endpoints stopped: failover to us-west",
            label: "us-east1 down",
            requests: 15,
            expected: &[WEST],
            tally: Tally::default(),
        },
        Phase {
            title: "3. us-east1 endpoints back: traffic returns to us-east1",
            label: "us-east1 back",
            requests: 10,
            expected: &[EAST_A, EAST_B],
            tally: Tally::default(),
        },
    ];
    let mut next = 1;
    for (i, phase) in phases.iter_mut().enumerate() {
        println!("\n== Phase {} ==", phase.title);
        match i {
            1 => {
                for backend in east.iter_mut() {
                    backend.stop();
                    println!("stopped {} at {}", backend.name(), backend.addr());
                }
                thread::sleep(Duration::from_secs(1));
            }
            2 => {
                for backend in east.iter_mut() {
                    backend.start()?;
                    println!("started {} at {}", backend.name(), backend.addr());
                }
                thread::sleep(Duration::from_secs(1));
            }
            _ => {}
        }
        println!("$ detour endpoints mydb");
        print!("{}", agent.cli(&["endpoints", "mydb"])?);
        println!();
        phase.tally = run_client(cgroup, phase.label, next, phase.requests)?;
        next += phase.requests;
    }
    Ok(phases)
}

/// Waits (bounded) until the agent's health checks have marked `n` endpoints of `mydb`
/// healthy, so phase 1 does not start while they are still UNKNOWN.
fn wait_all_healthy(agent: &Agent, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let healthy = agent.services_json().ok().and_then(|services| {
            services.as_array()?.iter().find(|s| s["name"] == "mydb")?["healthy"].as_u64()
        });
        if healthy == Some(n) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    println!("(note: not all {n} endpoints reported healthy after {timeout:?})");
}

/// Runs `demo-client` inside `cgroup`, echoing and tallying its lines.
fn run_client(cgroup: &Cgroup, label: &str, first: u32, count: u32) -> Result<Tally> {
    let interval = Duration::from_millis(100);
    let timeout = Duration::from_secs(1);
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut command = Command::new(exe);
    command
        .arg("demo-client")
        .args(["--vip", VIP, "--label", label])
        .args(["--first", &first.to_string(), "--count", &count.to_string()])
        .args(["--interval", "100ms", "--timeout", "1s"])
        .stdout(Stdio::piped());
    let mut child = cgroup.spawn(&mut command)?;
    let stdout = child.stdout.take().context("client stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Worst case: every request times out on connect and on read.
    let deadline = Instant::now() + (interval + timeout * 2) * count + Duration::from_secs(5);
    let mut tally = Tally::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("{line}");
                tally.record(&line, label);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the demo client overran its deadline");
            }
        }
    }
    let _ = reader.join();
    let status = child.wait()?;
    if !status.success() {
        bail!("the demo client failed: {status}");
    }
    Ok(tally)
}

fn summarize(phases: &[Phase]) {
    println!("\n== Summary ==");
    println!("| phase | requests | {EAST_A} | {EAST_B} | {WEST} | errors | as expected |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for p in phases {
        let served = |b: &str| p.tally.served.get(b).copied().unwrap_or(0);
        let errors = if p.tally.errors.is_empty() {
            "0".to_owned()
        } else {
            let kinds: Vec<String> = p
                .tally
                .errors
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            kinds.join(", ")
        };
        println!(
            "| {} | {} | {} | {} | {} | {errors} | {} |",
            p.label,
            p.tally.total(),
            served(EAST_A),
            served(EAST_B),
            served(WEST),
            if p.as_expected() { "yes" } else { "NO" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_reads_client_lines() {
        let mut t = Tally::default();
        t.record("#1   200  healthy: dynamodb.us-east-1 (a)", "healthy");
        t.record("#2   200  healthy: dynamodb.us-east-1 (a)", "healthy");
        t.record("#13  ERR  connection refused", "healthy");
        t.record("#14  503  healthy: x", "healthy");
        assert_eq!(t.served.get(EAST_A), Some(&2));
        assert_eq!(t.errors.get("connection refused"), Some(&1));
        assert_eq!(t.errors.get("status 503"), Some(&1));
        assert_eq!(t.total(), 4);
    }

    #[test]
    fn phase_expectations() {
        let mut p = Phase {
            title: "t",
            label: "us-east1 down",
            requests: 2,
            expected: &[WEST],
            tally: Tally::default(),
        };
        p.tally
            .record("#1   200  us-east1 down: dynamodb.us-west-1", p.label);
        p.tally
            .record("#2   200  us-east1 down: dynamodb.us-west-1", p.label);
        assert!(p.as_expected());
        p.tally.record("#3   ERR  connection refused", p.label);
        assert!(!p.as_expected());
    }

    #[test]
    fn client_against_a_backend_and_a_closed_port() {
        let backend = HttpBackend::start_at("b", "127.0.0.1:0".parse().unwrap()).unwrap();
        let ok = http_request(backend.addr(), Duration::from_secs(1)).unwrap();
        assert_eq!(ok.body, "b\n");
        let addr = backend.addr();
        drop(backend);
        let err = http_request(addr, Duration::from_secs(1)).unwrap_err();
        assert_eq!(describe(&err), "connection refused");
    }

    #[test]
    fn config_is_the_istio_example() {
        for needle in [
            "vips: [127.200.0.1]",
            "{from: us-east1, to: us-west}",
            "unhealthyThreshold: 1",
            "locality: us-west/us-west-1a",
        ] {
            assert!(CONFIG.contains(needle), "{needle}");
        }
    }
}
