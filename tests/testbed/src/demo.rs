//! The failover demo — Istio's "failover for external services" example on this machine —
//! run by `cargo xtask demo` and by the end-to-end test that holds it to what it shows.
//!
//! `mydb` (`hosts: [mydb.com]`, VIP 127.200.0.1:80) is backed by two "DynamoDB
//! us-east-1" HTTP backends in the node's zone and one "us-west-1" backend, with
//! `failover: from us-east1 to us-west`. One client inside the agent's cgroup requests
//! `http://mydb.com/` every 100 ms, resolving the name each time through the system
//! resolver (getaddrinfo, with a resolv.conf of its own naming the agent's DNS server),
//! from before the us-east1 backends stop until after they are back; the demo prints,
//! from what that client saw, which region answered when, every failed request, and when
//! traffic moved.
//!
//! Invariants:
//! - every resource (backends, the [`AgentBed`] with its agent, cgroup, pins and temp dir,
//!   the client) is a guard owned by [`run`], so any early return tears everything down:
//!   client and agent first, then the pins (detaching programs), the cgroup, the temp
//!   files, the backends;
//! - every wait is bounded, and so is the client (in requests, and by its stop file);
//! - the verdict ([`Report::verdict`]) is computed from the client's own lines, never
//!   assumed: it fails unless the client ran across the failure and the return, traffic
//!   moved to us-west and came back, and no more requests failed than detour's passive
//!   health allows (one per stopped backend, the connect that finds it refusing).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lines::{mono_ns, LineStream};
use crate::{http_request, Agent, AgentBed, Cgroup, HttpBackend};

pub const EAST_A: &str = "dynamodb.us-east-1 (a)";
pub const EAST_B: &str = "dynamodb.us-east-1 (b)";
pub const WEST: &str = "dynamodb.us-west-1";
/// The VIP and port of `mydb`.
pub const VIP: &str = "127.200.0.1:80";
/// The name the client requests, and where the agent answers DNS for it.
pub const HOST: &str = "mydb.com";
pub const AGENT_DNS: &str = "127.0.0.153";
/// Each backend: its name (what it answers), address and the region it stands for.
pub const BACKENDS: [(&str, &str, &str); 3] = [
    (EAST_A, "127.0.1.1:8080", "us-east1"),
    (EAST_B, "127.0.1.2:8080", "us-east1"),
    (WEST, "127.0.2.1:8080", "us-west"),
];

/// The agent config: Istio's ServiceEntry + DestinationRule, one-to-one.
pub const CONFIG: &str = "\
# Istio's \"failover for external services\" example as a detour config.
node: { locality: us-east1/us-east1-b }
services:
  - name: mydb
    hosts: [mydb.com]
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

/// Marks a client line wherever it appears in the output (a test harness may print
/// before it on the same line).
const LINE_MARK: &str = "detour-demo ";
/// Time between two requests of the client.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// Requests answered before the us-east1 backends stop, and after each change before
/// the demo moves on.
const SETTLE_REQUESTS: usize = 10;
/// Upper bound of every wait for the client or the agent.
const WAIT: Duration = Duration::from_secs(20);

/// What the client does; [`ClientArgs::to_args`] and [`ClientArgs::parse`] carry it to
/// the re-executed process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientArgs {
    /// Resolved before every request, with getaddrinfo.
    pub host: String,
    pub port: u16,
    /// The client's own `/etc/resolv.conf` ([`crate::use_resolv_conf`]); empty: the
    /// system's.
    pub resolv_conf: PathBuf,
    pub interval: Duration,
    /// Connect and read timeout of one request.
    pub timeout: Duration,
    /// Requests at most, whatever happens.
    pub max_requests: u32,
    /// The client stops before its next request once this file exists.
    pub stop_file: PathBuf,
}

impl ClientArgs {
    pub fn to_args(&self) -> Vec<String> {
        vec![
            self.host.clone(),
            self.port.to_string(),
            self.resolv_conf.display().to_string(),
            self.interval.as_millis().to_string(),
            self.timeout.as_millis().to_string(),
            self.max_requests.to_string(),
            self.stop_file.display().to_string(),
        ]
    }

    pub fn parse(args: &[String]) -> Result<Self> {
        let [host, port, resolv_conf, interval, timeout, max_requests, stop_file] = args else {
            bail!(
                "expected HOST PORT RESOLV_CONF INTERVAL_MS TIMEOUT_MS MAX_REQUESTS STOP_FILE, got {args:?}"
            );
        };
        Ok(Self {
            host: host.clone(),
            port: port.parse().context("PORT")?,
            resolv_conf: resolv_conf.into(),
            interval: Duration::from_millis(interval.parse().context("INTERVAL_MS")?),
            timeout: Duration::from_millis(timeout.parse().context("TIMEOUT_MS")?),
            max_requests: max_requests.parse().context("MAX_REQUESTS")?,
            stop_file: stop_file.into(),
        })
    }
}

/// The client loop: one line per request, `detour-demo #N 200 <backend>` or
/// `detour-demo #N ERR <reason>`, flushed as it happens.
pub fn client(args: &ClientArgs, out: &mut impl Write) -> Result<()> {
    if !args.resolv_conf.as_os_str().is_empty() {
        crate::use_resolv_conf(&args.resolv_conf)?;
    }
    for n in 1..=args.max_requests {
        if args.stop_file.exists() {
            break;
        }
        let resolved = {
            use std::net::ToSocketAddrs as _;
            (args.host.as_str(), args.port)
                .to_socket_addrs()
                .with_context(|| format!("resolving {}", args.host))
                .and_then(|mut all| all.next().context("no address"))
        };
        match resolved.and_then(|target| http_request(target, args.timeout)) {
            Ok(r) => writeln!(out, "{LINE_MARK}#{n} {} {}", r.status, r.body.trim_end())?,
            Err(e) => writeln!(out, "{LINE_MARK}#{n} ERR {}", describe(&e))?,
        }
        out.flush()?;
        thread::sleep(args.interval);
    }
    Ok(())
}

/// "connection refused", "timed out", … for the client's error lines.
pub fn describe(err: &anyhow::Error) -> String {
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

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered 200 by the backend named.
    Served(String),
    /// Failed, or answered another status: why.
    Failed(String),
}

/// One request as the demo read it: when its line arrived ([`mono_ns`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub at_ns: u64,
    pub n: u32,
    pub outcome: Outcome,
}

/// Reads a client line (anything before its mark is ignored); `None` if it is not one.
pub fn parse_line(at_ns: u64, line: &str) -> Option<Request> {
    let rest = &line[line.find(LINE_MARK)? + LINE_MARK.len()..];
    let rest = rest.strip_prefix('#')?;
    let (n, rest) = rest.split_once(' ')?;
    let (status, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let outcome = match status {
        "200" => Outcome::Served(rest.to_owned()),
        "ERR" => Outcome::Failed(rest.to_owned()),
        other => Outcome::Failed(format!("status {other}")),
    };
    Some(Request {
        at_ns,
        n: n.parse().ok()?,
        outcome,
    })
}

/// The region a backend name stands for.
fn region_of(backend: &str) -> &'static str {
    BACKENDS
        .iter()
        .find(|(name, _, _)| *name == backend)
        .map_or("unknown", |(_, _, region)| region)
}

/// What the client saw, against when the demo stopped and restarted us-east1.
#[derive(Debug, Clone)]
pub struct Report {
    pub requests: Vec<Request>,
    /// When the client started.
    pub started_ns: u64,
    /// When the us-east1 backends were stopped, and started again.
    pub stopped_ns: u64,
    pub restarted_ns: u64,
    /// How many backends the demo stopped.
    pub stopped_backends: usize,
}

/// The phase a request falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Healthy,
    EastDown,
    EastBack,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Self::Healthy => "all healthy",
            Self::EastDown => "us-east1 down",
            Self::EastBack => "us-east1 back",
        }
    }
}

impl Report {
    pub fn phase_of(&self, r: &Request) -> Phase {
        if r.at_ns < self.stopped_ns {
            Phase::Healthy
        } else if r.at_ns < self.restarted_ns {
            Phase::EastDown
        } else {
            Phase::EastBack
        }
    }

    fn in_phase(&self, phase: Phase) -> impl Iterator<Item = &Request> {
        self.requests
            .iter()
            .filter(move |r| self.phase_of(r) == phase)
    }

    fn region_of(r: &Request) -> Option<&'static str> {
        match &r.outcome {
            Outcome::Served(backend) => Some(region_of(backend)),
            Outcome::Failed(_) => None,
        }
    }

    /// The first request of the run of answers from `region` that ends `phase`: from
    /// there on, to the end of the phase, only `region` answered. While a change is under
    /// way, answers may still mix (one stopped backend of two spills part of the traffic,
    /// gradually); the move is complete where this run begins.
    fn settled_in(&self, phase: Phase, region: &str) -> Option<&Request> {
        self.in_phase(phase)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .take_while(|r| Self::region_of(r) == Some(region))
            .last()
    }

    /// When traffic moved to us-west for good after the stop.
    pub fn moved(&self) -> Option<&Request> {
        self.settled_in(Phase::EastDown, "us-west")
    }

    /// When traffic came back to us-east1 for good after the restart.
    pub fn returned(&self) -> Option<&Request> {
        self.settled_in(Phase::EastBack, "us-east1")
    }

    pub fn failed(&self) -> impl Iterator<Item = &Request> {
        self.requests
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
    }

    /// Whether what the client saw is failover as detour promises it; the reason if not.
    pub fn verdict(&self) -> Result<(), String> {
        let count = |phase| self.in_phase(phase).count();
        let (healthy, down, back) = (
            count(Phase::Healthy),
            count(Phase::EastDown),
            count(Phase::EastBack),
        );
        if healthy == 0 || down == 0 || back == 0 {
            return Err(format!(
                "the client did not run across the failure and the return: {healthy} requests \
                 before the stop, {down} while us-east1 was down, {back} after it came back"
            ));
        }
        let before: Vec<&Request> = self.in_phase(Phase::Healthy).collect();
        if let Some(r) = before
            .iter()
            .find(|r| Self::region_of(r) != Some("us-east1"))
        {
            return Err(format!(
                "with every backend healthy, #{} was {:?}, not us-east1",
                r.n, r.outcome
            ));
        }
        if self.moved().is_none() {
            return Err(
                "traffic never moved to us-west for good while us-east1 was down: the last \
                 request before the restart was not answered from us-west"
                    .into(),
            );
        }
        if self.returned().is_none() {
            return Err(
                "traffic never came back to us-east1 for good: the last request was not \
                 answered from us-east1"
                    .into(),
            );
        }
        // The kernel's fast path: a refusing backend costs at most the one connect that
        // found it refusing, and nothing fails outside the failover.
        let failed: Vec<&Request> = self.failed().collect();
        let outside = failed
            .iter()
            .filter(|r| self.phase_of(r) != Phase::EastDown);
        if let Some(r) = outside.clone().next() {
            return Err(format!(
                "#{} failed ({:?}) outside the failover",
                r.n, r.outcome
            ));
        }
        if failed.len() > self.stopped_backends {
            return Err(format!(
                "{} requests failed while {} backends were down: at most one each",
                failed.len(),
                self.stopped_backends
            ));
        }
        Ok(())
    }

    fn secs(&self, at_ns: u64) -> String {
        format!(
            "+{:.2}s",
            at_ns.saturating_sub(self.started_ns) as f64 / 1e9
        )
    }

    /// The timeline: runs of requests answered by one region (or failed the same way),
    /// with the demo's own actions in between, then when traffic moved and what failed.
    pub fn timeline(&self) -> String {
        let mut out = String::new();
        let mut marks = vec![
            (self.stopped_ns, "stopped the us-east1 backends".to_owned()),
            (
                self.restarted_ns,
                "started the us-east1 backends".to_owned(),
            ),
        ]
        .into_iter()
        .peekable();
        let key = |r: &Request| match &r.outcome {
            Outcome::Served(backend) => format!("200  {}", region_of(backend)),
            Outcome::Failed(why) => format!("ERR  {why}"),
        };
        let mut i = 0;
        while i < self.requests.len() {
            let first = &self.requests[i];
            while let Some((at, what)) = marks.next_if(|(at, _)| *at <= first.at_ns) {
                let _ = writeln!(out, "{:>8}  -- {what}", self.secs(at));
            }
            let next_mark = marks.peek().map_or(u64::MAX, |(at, _)| *at);
            let run: Vec<&Request> = self.requests[i..]
                .iter()
                .take_while(|r| key(r) == key(first) && r.at_ns < next_mark)
                .collect();
            let mut by_backend: BTreeMap<&str, usize> = BTreeMap::new();
            for r in &run {
                if let Outcome::Served(b) = &r.outcome {
                    *by_backend.entry(b.as_str()).or_default() += 1;
                }
            }
            let backends: Vec<String> = by_backend
                .iter()
                .map(|(b, n)| format!("{b} ×{n}"))
                .collect();
            let last = run.last().expect("a run has its first request");
            let span = if run.len() == 1 {
                format!("#{}", first.n)
            } else {
                format!("#{}–#{}", first.n, last.n)
            };
            let _ = writeln!(
                out,
                "{:>8}  {span:<10} {}{}",
                self.secs(first.at_ns),
                key(first),
                if backends.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", backends.join(", "))
                }
            );
            i += run.len();
        }
        for (at, what) in marks {
            let _ = writeln!(out, "{:>8}  -- {what}", self.secs(at));
        }
        let ms = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
        match self.moved() {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "\ntraffic moved to us-west at {} (#{}), {:.0} ms after the stop",
                    self.secs(r.at_ns),
                    r.n,
                    ms(self.stopped_ns, r.at_ns)
                );
            }
            None => out.push_str("\ntraffic never moved to us-west for good\n"),
        }
        match self.returned() {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "traffic back in us-east1 at {} (#{}), {:.0} ms after the restart",
                    self.secs(r.at_ns),
                    r.n,
                    ms(self.restarted_ns, r.at_ns)
                );
            }
            None => out.push_str("traffic never came back to us-east1 for good\n"),
        }
        let failed: Vec<String> = self
            .failed()
            .map(|r| match &r.outcome {
                Outcome::Failed(why) => format!("#{} {why}", r.n),
                Outcome::Served(_) => unreachable!("filtered"),
            })
            .collect();
        let _ = writeln!(
            out,
            "failed requests: {} of {}{}",
            failed.len(),
            self.requests.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(" ({})", failed.join(", "))
            }
        );
        out
    }

    /// One row per phase: requests, answers per backend, errors.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "| phase | requests | {EAST_A} | {EAST_B} | {WEST} | failed |\n|---|---:|---:|---:|---:|---:|\n"
        );
        for phase in [Phase::Healthy, Phase::EastDown, Phase::EastBack] {
            let requests: Vec<&Request> = self.in_phase(phase).collect();
            let served = |b: &str| {
                requests
                    .iter()
                    .filter(|r| r.outcome == Outcome::Served(b.to_owned()))
                    .count()
            };
            let failed = requests
                .iter()
                .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
                .count();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {failed} |",
                phase.label(),
                requests.len(),
                served(EAST_A),
                served(EAST_B),
                served(WEST),
            );
        }
        out
    }
}

/// Runs the demo with the `detour` at `binary`, printing to `out`. `client_command`
/// gives the command that runs [`client`] with the arguments given (`cargo xtask demo`
/// re-executes itself, a test its own binary); the demo starts it inside its cgroup.
/// Returns the report whatever its verdict; fails only when the demo could not run.
pub fn run(
    binary: PathBuf,
    client_command: impl Fn(&ClientArgs) -> Command,
    out: &mut dyn Write,
) -> Result<Report> {
    crate::require_root("the failover demo")?;
    // Guards: dropped in reverse order — the bed (agent, pins, cgroup and the client in
    // it, temp dir), then the backends.
    let mut backends = Vec::new();
    for (name, addr, _) in BACKENDS {
        backends.push(HttpBackend::start_at(name, addr.parse()?)?);
    }
    let mut bed = AgentBed::new(binary)?;
    bed.write_config(CONFIG)?;
    writeln!(out, "== {} ==\n{CONFIG}", bed.config_path().display())?;
    let stop_file = bed.dir.join("stop-client");
    let resolv_conf = bed.dir.join("resolv.conf");
    std::fs::write(
        &resolv_conf,
        format!("nameserver {AGENT_DNS}\noptions timeout:1 attempts:2\n"),
    )?;
    let args = ClientArgs {
        host: HOST.to_owned(),
        port: 80,
        resolv_conf,
        interval: INTERVAL,
        timeout: Duration::from_secs(1),
        // Far more than the scenario takes; the stop file ends it.
        max_requests: 1000,
        stop_file: stop_file.clone(),
    };
    let (east, _west) = backends.split_at_mut(2);
    bed.start_agent(&["--dns-listen", &format!("{AGENT_DNS}:53")], WAIT)?;
    let AgentBed {
        agent: Some(agent),
        cgroup,
        ..
    } = &mut bed
    else {
        unreachable!("the agent was just started");
    };
    scenario(agent, cgroup, east, client_command(&args), &stop_file, out)
        .map_err(|e| e.context(format!("demo failed{}", agent.log_tail())))
}

fn scenario(
    agent: &mut Agent,
    cgroup: &Cgroup,
    east: &mut [HttpBackend],
    mut client_command: Command,
    stop_file: &Path,
    out: &mut dyn Write,
) -> Result<Report> {
    agent.wait_endpoints("mydb", WAIT, |eps| {
        eps.as_array()
            .is_some_and(|a| a.len() == 3 && a.iter().all(|e| e["health"] == "HEALTHY"))
    })?;
    show_endpoints(agent, out)?;

    // One client, from before the failure until after the return.
    let mut client = LineStream::spawn_in(cgroup, &mut client_command)?;
    let started_ns = mono_ns();
    writeln!(
        out,
        "client started: GET http://{HOST}/ every {} ms, from inside the cgroup; {HOST} \
         resolved by getaddrinfo each time, through the agent's DNS server ({AGENT_DNS}), to \
         the VIP {VIP}",
        INTERVAL.as_millis()
    )?;
    wait_requests(&mut client, started_ns, SETTLE_REQUESTS, |_| true)?;

    let stopped_ns = mono_ns();
    for backend in east.iter_mut() {
        backend.stop();
        writeln!(out, "stopped {} at {}", backend.name(), backend.addr())?;
    }
    // Until the client has seen only us-west answer for a while.
    wait_requests(&mut client, stopped_ns, SETTLE_REQUESTS, |r| {
        r.outcome == Outcome::Served(WEST.to_owned())
    })?;
    show_endpoints(agent, out)?;

    let restarted_ns = mono_ns();
    for backend in east.iter_mut() {
        backend.start()?;
        writeln!(out, "started {} at {}", backend.name(), backend.addr())?;
    }
    // Until the client has seen only us-east1 answer again for a while.
    wait_requests(
        &mut client,
        restarted_ns,
        SETTLE_REQUESTS,
        |r| matches!(&r.outcome, Outcome::Served(b) if region_of(b) == "us-east1"),
    )?;
    std::fs::write(stop_file, b"")?;
    let (status, lines) = client.wait(CLIENT_STOP_BOUND)?;
    if !status.success() {
        bail!("the demo client failed ({status}): {lines:?}");
    }
    show_endpoints(agent, out)?;
    Ok(Report {
        requests: lines
            .iter()
            .filter_map(|(at, line)| parse_line(*at, line))
            .collect(),
        started_ns,
        stopped_ns,
        restarted_ns,
        stopped_backends: east.len(),
    })
}

/// How long the client may take to notice its stop file: one request's worst case (a
/// connect and a read timeout) and a pause, with room to spare.
const CLIENT_STOP_BOUND: Duration = Duration::from_secs(10);

/// Waits (bounded) until the last `n` requests the client reported since `since_ns` are
/// all ones for which `counts` holds.
fn wait_requests(
    client: &mut LineStream,
    since_ns: u64,
    n: usize,
    counts: impl Fn(&Request) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let requests: Vec<Request> = client
            .since(since_ns)
            .iter()
            .filter_map(|(at, line)| parse_line(*at, line))
            .collect();
        let seen = requests.iter().rev().take_while(|r| counts(r)).count();
        if seen >= n {
            return Ok(());
        }
        if let Some(status) = client.exited() {
            bail!(
                "the demo client exited ({status}) early; its last lines:\n{}",
                client.tail()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the client's last {seen} requests, not {n}, were as expected after {WAIT:?}; its last lines:\n{}",
                client.tail()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn show_endpoints(agent: &Agent, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "\n$ detour endpoints mydb")?;
    write!(out, "{}", agent.cli(&["endpoints", "mydb"])?)?;
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(at_ms: u64, n: u32, backend: &str) -> Request {
        Request {
            at_ns: at_ms * 1_000_000,
            n,
            outcome: Outcome::Served(backend.into()),
        }
    }

    fn failed(at_ms: u64, n: u32) -> Request {
        Request {
            at_ns: at_ms * 1_000_000,
            n,
            outcome: Outcome::Failed("connection refused".into()),
        }
    }

    /// A client that ran from 0 to 3 s; us-east1 stopped at 1 s and back at 2 s.
    fn report(requests: Vec<Request>) -> Report {
        Report {
            requests,
            started_ns: 0,
            stopped_ns: 1_000_000_000,
            restarted_ns: 2_000_000_000,
            stopped_backends: 2,
        }
    }

    fn failover() -> Vec<Request> {
        vec![
            served(100, 1, EAST_A),
            served(200, 2, EAST_B),
            failed(1_050, 3),
            served(1_150, 4, WEST),
            served(1_250, 5, WEST),
            served(2_050, 6, WEST),
            served(2_150, 7, EAST_B),
            served(2_250, 8, EAST_A),
        ]
    }

    #[test]
    fn a_client_across_the_failure_and_the_return_is_failover() {
        let r = report(failover());
        assert_eq!(r.verdict(), Ok(()));
        assert_eq!(r.moved().map(|r| r.n), Some(4));
        assert_eq!(r.returned().map(|r| r.n), Some(7));
        let timeline = r.timeline();
        assert!(
            timeline.contains("traffic moved to us-west at +1.15s (#4), 150 ms after the stop"),
            "{timeline}"
        );
        assert!(
            timeline.contains("traffic back in us-east1 at +2.15s (#7), 150 ms after the restart"),
            "{timeline}"
        );
        assert!(
            timeline.contains("failed requests: 1 of 8 (#3 connection refused)"),
            "{timeline}"
        );
        assert!(
            timeline.contains(
                "  +0.10s  #1–#2      200  us-east1 (dynamodb.us-east-1 (a) ×1, dynamodb.us-east-1 (b) ×1)\n  +1.00s  -- stopped the us-east1 backends\n"
            ),
            "{timeline}"
        );
        let summary = r.summary();
        assert!(
            summary.contains("| us-east1 down | 3 | 0 | 0 | 2 | 1 |"),
            "{summary}"
        );
    }

    #[test]
    fn a_client_that_does_not_cross_the_failure_fails_the_verdict() {
        // The old demo's shape: the client ran only after the failover was done.
        let mut requests = failover();
        requests.retain(|r| r.at_ns >= 1_100_000_000);
        let verdict = report(requests).verdict().unwrap_err();
        assert!(
            verdict.contains("did not run across the failure"),
            "{verdict}"
        );
        // Or stopped before the return.
        let mut requests = failover();
        requests.retain(|r| r.at_ns < 2_000_000_000);
        assert!(report(requests).verdict().is_err());
    }

    #[test]
    fn no_failover_no_return_or_too_many_failures_fail_the_verdict() {
        let mut stuck = failover();
        stuck[3].outcome = Outcome::Failed("connection refused".into());
        stuck[4].outcome = Outcome::Failed("connection refused".into());
        let verdict = report(stuck).verdict().unwrap_err();
        assert!(
            verdict.contains("never moved to us-west for good"),
            "{verdict}"
        );

        let mut no_return = failover();
        no_return[6].outcome = Outcome::Served(WEST.into());
        no_return[7].outcome = Outcome::Served(WEST.into());
        let verdict = report(no_return).verdict().unwrap_err();
        assert!(
            verdict.contains("never came back to us-east1 for good"),
            "{verdict}"
        );

        // Failing again after us-west answered: the move never settled.
        let mut flapping = failover();
        flapping[4].outcome = Outcome::Failed("timed out".into());
        let verdict = report(flapping).verdict().unwrap_err();
        assert!(
            verdict.contains("never moved to us-west for good"),
            "{verdict}"
        );

        let mut three = failover();
        three.insert(3, failed(1_060, 10));
        three.insert(3, failed(1_070, 11));
        let verdict = report(three).verdict().unwrap_err();
        assert!(
            verdict.contains("3 requests failed while 2 backends were down"),
            "{verdict}"
        );

        let mut early = failover();
        early[1] = failed(200, 2);
        let verdict = report(early).verdict().unwrap_err();
        assert!(verdict.contains("not us-east1"), "{verdict}");
    }

    #[test]
    fn answers_may_mix_while_a_change_is_under_way() {
        // The first us-east1 backend stops a moment before the second: gradual spill
        // sends part of the traffic to us-west while the second still answers. The move
        // is complete where only us-west answers; the same on the way back.
        let requests = vec![
            served(100, 1, EAST_A),
            served(1_050, 2, WEST),
            served(1_100, 3, EAST_B),
            failed(1_150, 4),
            served(1_250, 5, WEST),
            served(1_350, 6, WEST),
            served(2_050, 7, EAST_A),
            served(2_100, 8, WEST),
            served(2_150, 9, EAST_B),
        ];
        let r = report(requests);
        assert_eq!(r.verdict(), Ok(()));
        assert_eq!(r.moved().map(|r| r.n), Some(5));
        assert_eq!(r.returned().map(|r| r.n), Some(9));
    }

    #[test]
    fn client_lines_parse_behind_other_output() {
        assert_eq!(
            parse_line(
                5,
                "test demo_client ... detour-demo #12 200 dynamodb.us-west-1"
            ),
            Some(Request {
                at_ns: 5,
                n: 12,
                outcome: Outcome::Served(WEST.into())
            })
        );
        assert_eq!(
            parse_line(6, "detour-demo #13 ERR connection refused").map(|r| r.outcome),
            Some(Outcome::Failed("connection refused".into()))
        );
        assert_eq!(
            parse_line(7, "detour-demo #14 503 x").map(|r| r.outcome),
            Some(Outcome::Failed("status 503".into()))
        );
        assert_eq!(parse_line(8, "running 1 test"), None);
    }

    #[test]
    fn client_args_round_trip() {
        let args = ClientArgs {
            host: HOST.into(),
            port: 80,
            resolv_conf: "/tmp/r c".into(),
            interval: INTERVAL,
            timeout: Duration::from_secs(1),
            max_requests: 7,
            stop_file: "/tmp/x y/stop".into(),
        };
        assert_eq!(ClientArgs::parse(&args.to_args()).unwrap(), args);
        assert!(ClientArgs::parse(&["1".into()]).is_err());
    }

    #[test]
    fn the_client_stops_at_its_stop_file_and_names_what_answered() {
        let dir = crate::TempDir::new().unwrap();
        let backend = HttpBackend::start_at("b", "127.0.0.1:0".parse().unwrap()).unwrap();
        let args = ClientArgs {
            host: backend.addr().ip().to_string(),
            port: backend.addr().port(),
            resolv_conf: PathBuf::new(),
            interval: Duration::from_millis(1),
            timeout: Duration::from_secs(1),
            max_requests: 3,
            stop_file: dir.join("stop"),
        };
        let mut out = Vec::new();
        client(&args, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<Request> = text.lines().filter_map(|l| parse_line(0, l)).collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines
            .iter()
            .all(|r| r.outcome == Outcome::Served("b".into())));
        std::fs::write(&args.stop_file, b"").unwrap();
        let mut out = Vec::new();
        client(&args, &mut out).unwrap();
        assert!(out.is_empty());
        let addr = backend.addr();
        drop(backend);
        let err = http_request(addr, Duration::from_secs(1)).unwrap_err();
        assert_eq!(describe(&err), "connection refused");
    }
}
