//! Endpoints given by DNS name (`resolution: DNS`), the second seed's "DynamoDB" by
//! hostname: the names resolve through a DNS server the test runs on loopback
//! ([`DnsServer`]), whose records the test changes, stops and restarts; the backends
//! behind the names are local HTTP servers.
//!
//! Addresses: VIP 127.210.40.1:80; backends 127.10.40.N:8080.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use detour_testbed::DnsServer;
use serde_json::Value;

use crate::world::{endpoint, World};

const VIP: &str = "127.210.40.1:80";
const EVENTUAL: Duration = Duration::from_secs(20);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

fn config(east: &str, west: &str) -> String {
    format!(
        r#"
node: {{ locality: us-east1/us-east1-b }}
services:
  - name: mydb
    vips: [127.210.40.1]
    ports: [{{number: 80, name: http, targetPort: 8080}}]
    resolution: DNS
    endpoints:
      - {{address: {east}, locality: us-east1/us-east1-b}}
      - {{address: {west}, locality: us-west1/us-west1-a}}
    localityLbSetting: {{failover: [{{from: us-east1, to: us-west1}}]}}
    # Lenient enough for the emulated kernels of the matrix, slow under a connect loop.
    healthCheck: {{interval: 500ms, timeout: 500ms, unhealthyThreshold: 2, healthyThreshold: 1}}
"#
    )
}

/// Starts the agent asking `dns` only, with TTLs bounded to 200 ms..1 s so that record
/// changes show within a second; `extra` are more arguments.
fn start_agent(w: &mut World, dns: &DnsServer, extra: &[&str]) -> Result<()> {
    let server = dns.addr().to_string();
    let mut args = vec![
        "--dns-server",
        &server,
        "--dns-min-ttl",
        "200ms",
        "--dns-max-ttl",
        "1s",
        "--dns-timeout",
        "200ms",
    ];
    args.extend_from_slice(extra);
    w.bed.start_agent(&args, crate::world::READY_TIMEOUT)?;
    Ok(())
}

/// `detour names -o json`, polled until `pred` holds for the row of `name`.
fn wait_name(
    w: &mut World,
    name: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + EVENTUAL;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let names: Value = serde_json::from_str(&w.agent().cli(&["names", "-o", "json"])?)?;
        if let Some(row) = names
            .as_array()
            .context("names is an array")?
            .iter()
            .find(|row| row["name"] == name)
        {
            if pred(row) {
                return Ok(row.clone());
            }
            last = row.clone();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{name}: not {what} within {EVENTUAL:?}; last {last:#}\n{}",
        w.log()
    )
}

/// Polls single GETs until `want` answers every one of 10 in a row.
fn wait_answered_by(w: &World, want: &str) -> Result<()> {
    w.wait_answered_by(VIP, want, EVENTUAL)
}

fn addresses(row: &Value) -> Vec<String> {
    row["addresses"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn names_resolve_follow_their_records_and_survive_a_silent_resolver() -> Result<()> {
    let dns = DnsServer::start()?;
    dns.set("east.db.test", &[ip("127.10.40.1")], 1);
    dns.set("west.db.test", &[ip("127.10.40.2")], 1);
    let mut w = World::new()?;
    w.backend("east", "127.10.40.1:8080")?;
    w.backend("west", "127.10.40.2:8080")?;
    w.backend("east-new", "127.10.40.3:8080")?;
    w.write_config(&config("east.db.test", "west.db.test"))?;
    start_agent(&mut w, &dns, &[])?;

    // Served from the first apply: the agent waited for the names' first answers.
    let gets = w.gets(VIP, 10)?;
    ensure!(
        gets.iter().all(|g| g.body.as_deref() == Some("east")),
        "expected the same-zone name's backend: {gets:?}\n{}",
        w.log()
    );
    let east = wait_name(&mut w, "east.db.test", "resolved", |r| {
        r["state"] == "resolved"
    })?;
    ensure!(addresses(&east) == ["127.10.40.1"], "{east:#}");
    ensure!(east["services"] == serde_json::json!(["mydb"]), "{east:#}");
    let eps = w.agent().endpoints_json(Some("mydb"))?;
    ensure!(
        endpoint(&eps, "127.10.40.1:8080")?["hostname"] == "east.db.test",
        "{eps:#}"
    );
    ensure!(
        endpoint(&eps, "127.10.40.2:8080")?["hostname"] == "west.db.test",
        "{eps:#}"
    );
    let table = w.agent().cli(&["endpoints", "mydb"])?;
    ensure!(
        table.contains(" NAME ") && table.contains("west.db.test"),
        "{table}"
    );

    // The record changes under a connect loop: traffic moves, no connect fails.
    let (child, stop) = w.connect_loop(VIP)?;
    dns.set("east.db.test", &[ip("127.10.40.3")], 1);
    wait_answered_by(&w, "east-new")?;
    let summary = World::finish_loop(child, &stop)?;
    ensure!(
        summary.failed == 0,
        "a record change failed connects: {summary:?}\n{}",
        w.log()
    );
    ensure!(summary.ok > 20, "the loop barely ran: {summary:?}");
    let eps = w.agent().endpoints_json(Some("mydb"))?;
    ensure!(
        endpoint(&eps, "127.10.40.1:8080").is_err(),
        "the old address stays: {eps:#}"
    );

    // The resolver falls silent: the last addresses keep serving, and it says so.
    dns.set_answering(false);
    let stale = wait_name(&mut w, "east.db.test", "stale", |r| r["state"] == "stale")?;
    ensure!(addresses(&stale) == ["127.10.40.3"], "{stale:#}");
    ensure!(
        stale["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{stale:#}"
    );
    let answers = w.answers(VIP, 10)?;
    ensure!(
        answers.get("east-new") == Some(&10),
        "{answers:?}\n{}",
        w.log()
    );
    let metrics = crate::passive::scrape(w.agent().metrics_address()?)?;
    ensure!(
        metrics.contains("detour_dns_name_failing{name=\"east.db.test\"} 1")
            && metrics.contains("detour_dns_name_addresses{name=\"east.db.test\"} 1"),
        "{metrics}"
    );
    dns.set_answering(true);
    wait_name(&mut w, "east.db.test", "resolved again", |r| {
        r["state"] == "resolved"
    })?;

    // The name's backend stops: health fails it and traffic fails over to the other
    // name's, then returns.
    w.stop_backend("east-new");
    wait_answered_by(&w, "west")?;
    w.start_backend("east-new")?;
    wait_answered_by(&w, "east-new")?;
    Ok(())
}

#[test]
fn a_name_that_never_resolved_serves_from_its_first_answer() -> Result<()> {
    let dns = DnsServer::start()?;
    dns.set("west.late.test", &[ip("127.10.40.12")], 1);
    let mut w = World::new()?;
    w.backend("east", "127.10.40.11:8080")?;
    w.backend("west", "127.10.40.12:8080")?;
    w.write_config(&config("east.late.test", "west.late.test"))?;
    // Its DNS server is on, but no service has hosts: port 53 stays free.
    const UNUSED_DNS: &str = "127.0.0.155:53";
    start_agent(&mut w, &dns, &["--dns-listen", UNUSED_DNS])?;
    ensure!(
        !w.log().contains("DNS server for services' hosts listening"),
        "bound without hosts:\n{}",
        w.log()
    );
    std::net::UdpSocket::bind(UNUSED_DNS).context("the agent took port 53 without hosts")?;

    // east.late.test is NXDOMAIN: the service runs on the other name meanwhile.
    let failed = wait_name(&mut w, "east.late.test", "failed", |r| {
        r["state"] == "failed"
    })?;
    ensure!(addresses(&failed).is_empty(), "{failed:#}");
    wait_answered_by(&w, "west")?;
    let events = w.log();
    ensure!(
        events.contains("east.late.test"),
        "the log names the name: {events}"
    );

    dns.set("east.late.test", &[ip("127.10.40.11")], 1);
    wait_name(&mut w, "east.late.test", "resolved", |r| {
        r["state"] == "resolved"
    })?;
    wait_answered_by(&w, "east")?;
    Ok(())
}

/// The second seed, as written: Istio's ServiceEntry and DestinationRule from the blog
/// post (`docs/examples/seed-dns*.yaml`, loaded unchanged after a detour document that
/// gives the node's locality). The DynamoDB names resolve through the test's DNS server
/// to local backends on port 80; the application resolves `mydb.com` with getaddrinfo
/// (its resolv.conf names only the agent's DNS server), gets the VIP detour allocated,
/// and its requests reach us-east-1. The seed's own failure step, the file with the
/// us-east1 endpoint's port set to 81 where nothing listens, fails at most one request
/// and moves traffic to us-west; the first file again brings it back.
#[test]
fn the_seed_as_written_resolves_to_detour_and_fails_over_on_the_bad_port() -> Result<()> {
    const AGENT_DNS: &str = "127.0.0.154";
    const NODE: &str = "node: {locality: us-east1}\n---\n";
    const SEED: &str = include_str!("../../docs/examples/seed-dns.yaml");
    const SEED_PORT_81: &str = include_str!("../../docs/examples/seed-dns-port81.yaml");
    let dns = DnsServer::start()?;
    dns.set("dynamodb.us-east-1.amazonaws.com", &[ip("127.10.41.1")], 1);
    dns.set("dynamodb.us-west-1.amazonaws.com", &[ip("127.10.41.2")], 1);
    let mut w = World::new()?;
    w.backend("dynamodb.us-east-1", "127.10.41.1:80")?;
    w.backend("dynamodb.us-west-1", "127.10.41.2:80")?;
    w.write_config(&format!("{NODE}{SEED}"))?;
    let server = dns.addr().to_string();
    w.bed.start_agent(
        &[
            "--dns-server",
            &server,
            "--dns-listen",
            &format!("{AGENT_DNS}:53"),
        ],
        crate::world::READY_TIMEOUT,
    )?;
    let resolv_conf = w.dir.join("resolv.conf");
    std::fs::write(
        &resolv_conf,
        format!("nameserver {AGENT_DNS}\noptions timeout:1 attempts:2\n"),
    )?;
    let by_name = |w: &World, count: u32| {
        crate::client::gets_by_name(&w.cgroup, "mydb.com", 80, count, 100, &resolv_conf)
    };

    let vip: std::net::SocketAddr = {
        let services = w.agent().services_json()?;
        ensure!(services[0]["name"] == "external-svc-dns", "{services:#}");
        let vip = services[0]["vips"][0].as_str().context("a VIP")?.to_owned();
        vip.parse()?
    };
    ensure!(
        vip.ip().to_string().starts_with("240.240."),
        "allocated from Istio's range: {vip}"
    );
    let gets = by_name(&w, 5)?;
    for g in &gets {
        ensure!(
            g.body.as_deref() == Some("dynamodb.us-east-1") && g.peer == Some(vip),
            "mydb.com should resolve to {vip} and reach us-east-1: {gets:?}\n{}",
            w.log()
        );
    }

    // The seed's step: the us-east1 endpoint's port becomes 81.
    w.write_config(&format!("{NODE}{SEED_PORT_81}"))?;
    w.agent().reload()?;
    let gets = by_name(&w, 10)?;
    let failed = gets.iter().filter(|g| g.body.is_none()).count();
    ensure!(
        failed <= 1,
        "{failed} requests failed: {gets:?}\n{}",
        w.log()
    );
    ensure!(
        gets.iter()
            .rev()
            .take(5)
            .all(|g| g.body.as_deref() == Some("dynamodb.us-west-1")),
        "traffic should have moved to us-west: {gets:?}\n{}",
        w.log()
    );
    let eps = w.agent().endpoints_json(Some("external-svc-dns"))?;
    let bad = endpoint(&eps, "127.10.41.1:81")?;
    ensure!(
        bad["health"] == "UNHEALTHY" || bad["outlier"] == "EJECTED",
        "the bad port should be failed or ejected: {bad:#}"
    );
    ensure!(
        bad["hostname"] == "dynamodb.us-east-1.amazonaws.com",
        "{bad:#}"
    );

    // Undone: back to us-east1 once the health check sees it.
    w.write_config(&format!("{NODE}{SEED}"))?;
    w.agent().reload()?;
    let deadline = Instant::now() + EVENTUAL;
    loop {
        let gets = by_name(&w, 3)?;
        if gets
            .iter()
            .all(|g| g.body.as_deref() == Some("dynamodb.us-east-1"))
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "never returned to us-east-1: {gets:?}\n{}",
            w.log()
        );
    }
    Ok(())
}
