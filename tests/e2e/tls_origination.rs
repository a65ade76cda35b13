//! TLS origination, the second seed's "Failover for HTTPS": the application speaks plain
//! HTTP to the VIP, the backends speak only TLS, with certificates from a CA of the
//! test's own ([`TestCa`]) that the service names in `tls.caCertificates`.
//!
//! Addresses: VIPs 127.210.42.N:80; backends 127.10.42.N:8443.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use detour_testbed::{DnsServer, TestCa, TlsBackend};

use crate::client;
use crate::world::{endpoint, Events, World, READY_TIMEOUT};

const EVENTUAL: Duration = Duration::from_secs(20);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

/// A service at `vip` whose two endpoints (`east`, `west`: addresses or names) speak TLS
/// at 8443, verified against `ca`.
fn config(vip: &str, east: &str, west: &str, ca: &std::path::Path, extra: &str) -> String {
    format!(
        r#"
node: {{ locality: us-east1/us-east1-b }}
services:
  - name: mydb
    vips: [{vip}]
    ports: [{{number: 80, name: http, targetPort: 8443}}]
    resolution: DNS
    endpoints:
      - {{address: {east}, locality: us-east1/us-east1-b}}
      - {{address: {west}, locality: us-west1/us-west1-a}}
    localityLbSetting: {{failover: [{{from: us-east1, to: us-west1}}]}}
    outlierDetection: {{consecutiveErrors: 2, interval: 1s, baseEjectionTime: 2s}}
    # A TLS handshake under the emulated kernels of the matrix takes far longer than
    # here: the check is lenient.
    healthCheck: {{interval: 1s, timeout: 1s, unhealthyThreshold: 2, healthyThreshold: 1}}
    tls: {{mode: SIMPLE, caCertificates: {ca}{extra}}}
"#,
        ca = ca.display()
    )
}

/// Waits until `count` GETs to `vip` are all answered by `want`.
fn wait_answered_by(w: &World, vip: &str, want: &str) -> Result<()> {
    w.wait_answered_by(vip, want, EVENTUAL)
}

/// What a backend stopping under a stream of GETs may cost through the originator: the
/// request in flight on it at that instant (its bytes were relayed, the backend's close
/// ends it; the client sends one at a time, so at most one), and nothing else. Every
/// later connect it refused was retried on the next backend: the originator gave up on
/// no connection.
fn only_the_request_in_flight_failed(w: &mut World, gets: &[client::Get]) -> Result<()> {
    let failed: Vec<_> = gets.iter().filter(|g| g.error.is_some()).collect();
    ensure!(
        failed.len() <= 1,
        "{} of {} GETs failed while east stopped: {failed:?}\n{}",
        failed.len(),
        gets.len(),
        w.log()
    );
    let metrics = crate::passive::scrape(w.agent().metrics_address()?)?;
    ensure!(
        metrics.contains("detour_tls_connections_reset_total{reason=\"no-backend\"} 0"),
        "the originator gave up on a connection:\n{metrics}"
    );
    Ok(())
}

#[test]
fn plain_http_to_the_vip_reaches_tls_backends_by_name_and_a_dead_one_costs_only_the_request_in_flight(
) -> Result<()> {
    const VIP: &str = "127.210.42.1:80";
    let ca = TestCa::new("origination")?;
    let dns = DnsServer::start()?;
    dns.set("east.db.test", &[ip("127.10.42.1")], 1);
    dns.set("west.db.test", &[ip("127.10.42.2")], 1);
    let mut east = TlsBackend::start_at(
        "east",
        "127.10.42.1:8443".parse()?,
        &ca.issue(&["east.db.test"])?,
    )?;
    let _west = TlsBackend::start_at(
        "west",
        "127.10.42.2:8443".parse()?,
        &ca.issue(&["west.db.test"])?,
    )?;
    let mut w = World::new()?;
    let ca_file = w.dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    w.write_config(&config(
        "127.210.42.1",
        "east.db.test",
        "west.db.test",
        &ca_file,
        "",
    ))?;
    let server = dns.addr().to_string();
    w.bed.start_agent(
        &[
            "--dns-server",
            &server,
            "--dns-min-ttl",
            "200ms",
            "--dns-max-ttl",
            "1s",
        ],
        READY_TIMEOUT,
    )?;

    // Plain HTTP in, TLS out, SNI = the endpoint's name (each certificate names only its
    // own), and the same-zone backend first.
    let gets = w.gets(VIP, 10)?;
    ensure!(
        gets.iter().all(|g| g.body.as_deref() == Some("east")),
        "expected east for every GET: {gets:?}\n{}",
        w.log()
    );
    ensure!(east.requests() >= 10, "east answered {}", east.requests());
    // `detour endpoints` counts the originator's connects, as it counts the kernel's.
    w.wait_endpoints("mydb", EVENTUAL, |eps| {
        endpoint(eps, "127.10.42.1:8443").is_ok_and(|e| {
            e["connects"].as_u64() >= Some(10) && e["established"].as_u64() >= Some(10)
        })
    })?;
    // getpeername still names the VIP, as on the kernel path.
    ensure!(
        gets[0].peer == Some(VIP.parse()?),
        "peer {:?}",
        gets[0].peer
    );

    // The same-zone backend dies under a stream of requests: the originator retries each
    // connection's refused connect on the next backend, so none fails but the one that
    // was in flight on it.
    let events = Events::start(&w)?;
    let gets = std::thread::scope(|scope| -> Result<Vec<client::Get>> {
        let stream = scope.spawn(|| client::gets(&w.cgroup, VIP.parse()?, 60, 20));
        std::thread::sleep(Duration::from_millis(300));
        east.stop();
        stream
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?
    })?;
    only_the_request_in_flight_failed(&mut w, &gets)?;
    ensure!(
        gets.iter().any(|g| g.body.as_deref() == Some("west")),
        "west never answered: {gets:?}"
    );
    let eps = w.wait_endpoints("mydb", EVENTUAL, |eps| {
        endpoint(eps, "127.10.42.1:8443").is_ok_and(|e| e["in_table"] == false)
    })?;
    ensure!(
        endpoint(&eps, "127.10.42.1:8443")?["hostname"] == "east.db.test",
        "{eps:#}"
    );

    // Back once it listens again.
    east.start()?;
    wait_answered_by(&w, VIP, "east")?;
    let events = events.finish()?;
    ensure!(
        events
            .iter()
            .any(|e| e["kind"] == "refused" && e["backend"] == "127.10.42.1:8443"),
        "no refused event for east: {events:#?}"
    );
    Ok(())
}

/// What the tests whose endpoints are given by address share: east and west TLS
/// backends at `east` and `west` (port 8443), east's certificate naming `east_names` and
/// west's its address, from a CA of their own; a world whose `ca.pem` holds that CA
/// (unless `with_ca` is false) and whose config serves them at `vip`.
struct ByAddress {
    ca: TestCa,
    east: TlsBackend,
    west: TlsBackend,
    ca_file: std::path::PathBuf,
    w: World,
}

fn by_address(
    vip: &str,
    east: &str,
    east_names: &[&str],
    west: &str,
    with_ca: bool,
) -> Result<ByAddress> {
    let ca = TestCa::new(vip)?;
    let east_backend = TlsBackend::start_at(
        "east",
        format!("{east}:8443").parse()?,
        &ca.issue(east_names)?,
    )?;
    let west_backend =
        TlsBackend::start_at("west", format!("{west}:8443").parse()?, &ca.issue(&[west])?)?;
    let w = World::new()?;
    let ca_file = w.dir.join("ca.pem");
    if with_ca {
        std::fs::write(&ca_file, ca.pem())?;
    }
    w.write_config(&config(vip, east, west, &ca_file, ""))?;
    Ok(ByAddress {
        ca,
        east: east_backend,
        west: west_backend,
        ca_file,
        w,
    })
}

#[test]
fn a_certificate_for_another_name_is_refused_and_its_backend_ejected() -> Result<()> {
    const VIP: &str = "127.210.42.2:80";
    // Endpoints by IP address: the name checked is the address, unless `sni` says
    // otherwise. East's certificate names something else entirely.
    let ByAddress {
        east,
        west,
        ca_file,
        mut w,
        ..
    } = by_address(
        "127.210.42.2",
        "127.10.42.3",
        &["elsewhere.test"],
        "127.10.42.4",
        true,
    )?;
    w.start_agent()?;
    let events = Events::start(&w)?;

    // Every GET is answered, by west: east's handshake fails, the connection moves on.
    let gets = w.gets(VIP, 10)?;
    ensure!(
        gets.iter().all(|g| g.body.as_deref() == Some("west")),
        "{gets:?}\n{}",
        w.log()
    );
    ensure!(
        east.requests() == 0,
        "east served a request with a wrong certificate"
    );
    // Its health check makes the same handshake (a TCP connect alone would pass it, and
    // end its ejection), and says why it fails.
    let eps = w.wait_endpoints("mydb", EVENTUAL, |eps| {
        endpoint(eps, "127.10.42.3:8443").is_ok_and(|e| {
            e["health"] == "UNHEALTHY"
                && e["last_error"]
                    .as_str()
                    .is_some_and(|m| m.contains("certificate"))
        })
    })?;
    let events = events.finish()?;
    let tls_failure = events
        .iter()
        .find(|e| e["kind"] == "tls-handshake" && e["backend"] == "127.10.42.3:8443")
        .with_context(|| format!("no tls-handshake event for east: {events:#?}\n{eps:#}"))?;
    ensure!(
        tls_failure["detail"]
            .as_str()
            .is_some_and(|d| d.contains("127.10.42.3") && d.contains("certificate")),
        "{tls_failure:#}"
    );
    ensure!(
        events
            .iter()
            .any(|e| e["kind"] == "ejected" && e["backend"] == "127.10.42.3:8443"),
        "east not ejected: {events:#?}"
    );

    // With `sni` naming what east's certificate holds, east serves (and west, whose
    // certificate names only its address, is the one refused).
    w.write_config(&config(
        "127.210.42.2",
        "127.10.42.3",
        "127.10.42.4",
        &ca_file,
        ", sni: elsewhere.test",
    ))?;
    w.agent().reload()?;
    wait_answered_by(&w, VIP, "east")?;
    ensure!(west.requests() >= 10);
    Ok(())
}

#[test]
fn a_service_whose_ca_file_cannot_be_read_is_not_served_until_it_can() -> Result<()> {
    const VIP: &str = "127.210.42.3:80";
    // Every backend bound, so none is dropped (stopped) here.
    let ByAddress {
        ca,
        east: _east,
        west: _west,
        ca_file,
        mut w,
    } = by_address(
        "127.210.42.3",
        "127.10.42.5",
        &["127.10.42.5"],
        "127.10.42.6",
        false,
    )?;
    w.start_agent()?;
    // The kernel leaves its connects alone (nothing listens at the VIP): the application's
    // plain bytes never reach a TLS port, and the log says why.
    let gets = w.gets(VIP, 3)?;
    ensure!(
        gets.iter().all(|g| g.error.is_some()),
        "served without a CA: {gets:?}"
    );
    ensure!(
        w.log().contains("cannot originate TLS") && w.log().contains("ca.pem"),
        "{}",
        w.log()
    );
    std::fs::write(&ca_file, ca.pem())?;
    w.agent().reload()?;
    wait_answered_by(&w, VIP, "east")?;
    Ok(())
}

/// The listener each frontend of `service` has, from `detour services -o json`.
fn relays(w: &mut World, service: &str) -> Result<Vec<String>> {
    let services = w.agent().services_json()?;
    let row = services
        .as_array()
        .context("services is an array")?
        .iter()
        .find(|s| s["name"] == service)
        .with_context(|| format!("no {service} in {services:#}"))?;
    Ok(row["tls_relays"]
        .as_array()
        .context("tls_relays")?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect())
}

#[test]
fn an_agent_restart_closes_relayed_connections_and_takes_its_port_back() -> Result<()> {
    use std::io::{Read, Write};
    const VIP: &str = "127.210.42.4:80";
    let ByAddress {
        east: _east,
        west: _west,
        mut w,
        ..
    } = by_address(
        "127.210.42.4",
        "127.10.42.7",
        &["127.10.42.7"],
        "127.10.42.8",
        true,
    )?;
    w.start_agent()?;
    wait_answered_by(&w, VIP, "east")?;
    let before = relays(&mut w, "mydb")?;
    ensure!(
        before.len() == 1 && before[0].starts_with(&format!("{VIP}>127.0.0.1:")),
        "{before:?}"
    );

    // A relayed connection open across the restart, from this test's process (the
    // test's cgroup is the agent's; the relay listens on loopback, so a connect to the
    // listener itself stands in for a rewritten one).
    let relay: std::net::SocketAddr = before[0].split_once('>').context("relay")?.1.parse()?;
    let mut open = std::net::TcpStream::connect(relay)?;
    open.set_read_timeout(Some(Duration::from_secs(10)))?;
    open.write_all(b"GET / HTTP/1.1\r\nHost: mydb\r\n\r\n")?;
    let mut answer = [0u8; 256];
    let n = open.read(&mut answer)?;
    ensure!(
        String::from_utf8_lossy(&answer[..n]).ends_with("east\n"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );

    // New connects during the restart: GETs every 20 ms, for the record (the README's
    // "what an agent restart costs" quotes this line of the test's output).
    let (cgroup, agent) = (&w.bed.cgroup, w.bed.agent.as_mut().context("no agent")?);
    let gets = std::thread::scope(|scope| -> Result<Vec<client::Get>> {
        let stream = scope.spawn(|| client::gets(cgroup, VIP.parse()?, 100, 20));
        std::thread::sleep(Duration::from_millis(300));
        let restarting = std::time::Instant::now();
        agent.restart()?;
        agent.wait_ready(READY_TIMEOUT)?;
        eprintln!("agent restarted in {:?}", restarting.elapsed());
        stream
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?
    })?;
    let failed: Vec<&str> = gets.iter().filter_map(|g| g.error.as_deref()).collect();
    eprintln!(
        "GETs every 20 ms across the restart: {} of {} failed: {:?}",
        failed.len(),
        gets.len(),
        failed.first()
    );
    // The pinned table still named the old listener: the new agent binds that port
    // again, so the kernel's table never has to change.
    ensure!(
        relays(&mut w, "mydb")? == before,
        "relays now {:?}, before {before:?}",
        relays(&mut w, "mydb")?
    );
    wait_answered_by(&w, VIP, "east")?;
    // What the restart cost: the relayed connection ended with the old agent.
    let ended = match open.read(&mut answer) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => {
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        }
    };
    ensure!(
        ended,
        "the relayed connection outlived the agent that relayed it"
    );
    Ok(())
}

/// The second seed in Kubernetes: a FailoverService whose backing services are outside
/// the cluster (`external`), one by DNS name and one by address, with TLS originated,
/// against a real API server (the CRD as it ships, so its CEL rules too).
#[test]
fn a_failover_service_with_external_endpoints_by_name_originates_tls() -> Result<()> {
    use detour_testbed::k8s::{AnyCluster, ClusterOptions, ServerKind};
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, PostParams};
    use serde_json::json;

    const VIP: &str = "127.210.45.1:80";
    let ca = TestCa::new("kubernetes")?;
    let dns = DnsServer::start()?;
    dns.set("east.db.test", &[ip("127.10.45.1")], 1);
    let mut east = TlsBackend::start_at(
        "east",
        "127.10.45.1:8443".parse()?,
        &ca.issue(&["east.db.test"])?,
    )?;
    let _west = TlsBackend::start_at(
        "west",
        "127.10.45.2:8443".parse()?,
        &ca.issue(&["127.10.45.2"])?,
    )?;
    let mut w = World::new()?;
    let ca_file = w.dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cluster = runtime.block_on(async {
        let cluster =
            AnyCluster::start_on(ServerKind::Real, "kind1", ClusterOptions::default()).await?;
        let client = cluster.client();
        crate::kube::install_crd(client.clone()).await?;
        Api::<Node>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "node-a", "labels": {
                        "topology.kubernetes.io/region": "us-east1",
                        "topology.kubernetes.io/zone": "us-east1-b",
                    }},
                }))?,
            )
            .await?;
        crate::kube::create_failover_service(
            client,
            "default",
            "mydb",
            json!({
                "hostname": "mydb.default.global",
                "hosts": ["mydb.com"],
                "port": {"number": 80},
                "virtualIP": "127.210.45.1",
                "backingServices": [
                    {"external": {"address": "east.db.test", "port": 8443, "locality": "us-east1/us-east1-b"}},
                    {"external": {"address": "127.10.45.2", "port": 8443, "locality": "us-west1"}},
                ],
                "tls": {"mode": "SIMPLE", "caCertificates": ca_file.display().to_string()},
                "healthCheck": {"interval": "1s", "timeout": "1s"},
            }),
        )
        .await?;
        anyhow::Ok(cluster)
    })?;
    let server = dns.addr().to_string();
    w.start_kubernetes_agent_with(
        cluster.kubeconfig_path(),
        "node-a",
        "kind1",
        &[
            "--dns-server",
            &server,
            "--dns-min-ttl",
            "200ms",
            "--dns-max-ttl",
            "1s",
        ],
    )?;

    // The name resolves, its backend is the node's own zone, and TLS is originated to it
    // with SNI = the name.
    wait_answered_by(&w, VIP, "east")?;
    let names = w.agent().cli(&["names"])?;
    ensure!(
        names.contains("east.db.test") && names.contains("RESOLVED"),
        "{names}"
    );
    // It dies: the next backing service, by address, takes over; only a request in
    // flight on it may fail.
    let gets = std::thread::scope(|scope| -> Result<Vec<client::Get>> {
        let stream = scope.spawn(|| client::gets(&w.cgroup, VIP.parse()?, 40, 20));
        std::thread::sleep(Duration::from_millis(200));
        east.stop();
        stream
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?
    })?;
    only_the_request_in_flight_failed(&mut w, &gets)?;
    wait_answered_by(&w, VIP, "west")?;
    drop(w);
    runtime.block_on(async move { drop(cluster) });
    Ok(())
}
