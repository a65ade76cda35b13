//! Passive health end to end: what the kernel sees of real connections ejects backends,
//! with active health checks off, and the kernel's own fast path protects the
//! connections in between.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use detour_testbed::{HttpBackend, Netns};

use crate::client::{self, HoldEnd, Script};
use crate::world::{endpoint, World};

const EJECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits (bounded) for a file the client creates.
pub(crate) fn wait_for_file(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn is_ejected(eps: &serde_json::Value, address: &str) -> bool {
    endpoint(eps, address).is_ok_and(|e| e["outlier"] == "EJECTED" && e["in_table"] == false)
}

fn outlier_config(name: &str, vip: &str, outlier: &str, endpoints: &str) -> String {
    format!(
        r#"
node: {{ locality: us-east1/us-east1-b }}
services:
  - name: {name}
    vips: [{vip}]
    ports: [{{number: 80, targetPort: 8080}}]
    localityLbSetting: {{failover: [{{from: us-east1, to: us-west}}]}}
    healthCheck: {{disabled: true}}
    outlierDetection: {outlier}
    endpoints:
{endpoints}"#
    )
}

#[test]
fn a_killed_backend_costs_at_most_one_failed_connect() -> Result<()> {
    let mut w = World::new()?;
    w.backend("a", "127.10.11.1:8080")?;
    w.backend("b", "127.10.11.2:8080")?;
    w.write_config(&outlier_config(
        "killed",
        "127.210.11.1",
        "{consecutiveErrors: 1, interval: 10s, baseEjectionTime: 30s}",
        "      - {address: 127.10.11.1, locality: us-east1/us-east1-b}\n      - {address: 127.10.11.2, locality: us-east1/us-east1-b}\n",
    ))?;
    w.start_agent()?;
    let (child, stop) = w.connect_loop("127.210.11.1:80")?;
    std::thread::sleep(Duration::from_millis(300));
    w.stop_backend("a");
    let started = Instant::now();
    let eps = w.wait_endpoints("killed", EJECT_TIMEOUT, |eps| {
        is_ejected(eps, "127.10.11.1:8080")
    })?;
    eprintln!(
        "killed backend ejected {:?} after it stopped",
        started.elapsed()
    );
    // Keep connecting for a while with the backend out.
    std::thread::sleep(Duration::from_millis(500));
    let summary = World::finish_loop(child, &stop)?;
    ensure!(summary.ok > 100, "the loop barely ran: {summary:?}");
    // Every failed connect counts, whatever its error (refused, timed out, ...), but the
    // one the kill itself caught: the loop has one connect in flight at a time, and if
    // its handshake had completed, the backend's queue is reset with it as with any
    // crash (connect() then fails with ECONNRESET) — not a connect detour sent to a dead
    // backend. So: at most that one reset, and at most one other failure.
    if summary.reset > 1 || summary.failed - summary.reset > 1 {
        let now = w.agent().endpoints_json(Some("killed"))?;
        let metrics = scrape(w.agent().metrics_address()?)?;
        let metrics: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.contains("fast_path") || l.contains("failures") || l.contains("events"))
            })
            .collect();
        bail!(
            "a killed backend must cost at most one failed connect: {summary:?}\nendpoints: {now:#}\nmetrics: {metrics:#?}"
        );
    }
    let a = endpoint(&eps, "127.10.11.1:8080")?;
    ensure!(a["refused"].as_u64() >= Some(1), "{a:#}");
    ensure!(a["ejections"] == 1, "{a:#}");
    ensure!(
        endpoint(&eps, "127.10.11.2:8080")?["outlier"] == "OK",
        "{eps:#}"
    );

    // Prometheus sees the same story.
    let metrics = scrape(w.agent().metrics_address()?)?;
    let labels = r#"service="killed",backend="127.10.11.1:8080",locality="us-east1/us-east1-b""#;
    for line in [
        format!("detour_backend_ejections_total{{{labels}}} 1"),
        format!("detour_backend_ejected{{{labels}}} 1"),
        format!("detour_backend_in_table{{{labels}}} 0"),
    ] {
        ensure!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    // The kernel's counters are per address, whatever services have it.
    let refused = r#"detour_backend_failures_total{backend="127.10.11.1:8080",kind="refused"} "#;
    ensure!(
        metrics
            .lines()
            .any(|l| l.strip_prefix(refused).is_some_and(|v| v != "0")),
        "no refused failures in\n{metrics}"
    );
    Ok(())
}

/// `GET /metrics`, the body.
pub(crate) fn scrape(addr: std::net::SocketAddr) -> Result<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: detour\r\n\r\n")?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("a response with a head")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_string())
}

#[test]
fn a_black_holed_backend_is_ejected_without_active_checks_and_its_connections_are_reset(
) -> Result<()> {
    let mut w = World::new()?;
    let ns = Netns::new()?;
    let veth = ns.veth("10.231.12.1/30", "10.231.12.2/30")?;
    let primary = HttpBackend::start_in(&ns, "primary", "10.231.12.2:8080".parse()?)?;
    w.backend("standby", "127.10.12.2:8080")?;
    w.write_config(&outlier_config(
        "blackhole",
        "127.210.12.1",
        "{consecutiveErrors: 1, interval: 10s, baseEjectionTime: 30s, handshakeTimeout: 100ms}",
        "      - {address: 10.231.12.2, locality: us-east1/us-east1-b}\n      - {address: 127.10.12.2, locality: us-west/us-west-1a}\n",
    ))?;
    w.start_agent()?;
    let by = w.answers("127.210.12.1:80", 5)?;
    ensure!(by.get("primary") == Some(&5), "{by:?}");

    // An established connection to the primary, held open by a client in the cgroup.
    let ready = w.dir.join("hold-ready");
    let hold = client::spawn_in(
        &w.cgroup,
        &Script::Hold {
            target: "127.210.12.1:80".parse()?,
            ready_file: ready.clone(),
            max_ms: 20_000,
        },
    )?;
    wait_for_file(&ready, Duration::from_secs(10))?;

    let (child, stop) = w.connect_loop("127.210.12.1:80")?;
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    veth.set_peer_up(false)?;
    let eps = w.wait_endpoints("blackhole", EJECT_TIMEOUT, |eps| {
        is_ejected(eps, "10.231.12.2:8080")
    })?;
    let took = started.elapsed();
    eprintln!("black-holed backend ejected {took:?} after its link went down (active checks off)");
    std::thread::sleep(Duration::from_millis(500));
    let summary = World::finish_loop(child, &stop)?;

    let held: Vec<HoldEnd> = client::results(hold, Duration::from_secs(30))?;
    let held = held.first().context("the holding client printed nothing")?;
    ensure!(
        !held.timed_out && held.error.is_some(),
        "the established connection to the ejected backend was not reset: {held:?}"
    );
    ensure!(
        held.kind.as_deref() == Some("ConnectionAborted"),
        "expected the kernel's abort (ECONNABORTED), got {held:?}"
    );
    ensure!(summary.ok > 100, "the loop barely ran: {summary:?}");
    ensure!(
        summary.failed <= 1,
        "only the handshake that found the black hole may fail, and at once: {summary:?}"
    );
    let p = endpoint(&eps, "10.231.12.2:8080")?;
    ensure!(p["timeouts"].as_u64() >= Some(1), "{p:#}");
    // The sockets the agent destroyed are not the backend refusing or resetting them.
    let now = w.agent().endpoints_json(Some("blackhole"))?;
    let p = endpoint(&now, "10.231.12.2:8080")?;
    ensure!(p["refused"] == 0 && p["resets"] == 0, "{p:#}");
    let by = w.answers("127.210.12.1:80", 5)?;
    ensure!(by.get("standby") == Some(&5), "{by:?}");
    drop(primary);
    Ok(())
}

#[test]
fn with_every_backend_ejected_connects_still_go_to_all_of_them() -> Result<()> {
    let mut w = World::new()?;
    w.backend("a", "127.10.13.1:8080")?;
    w.backend("b", "127.10.13.2:8080")?;
    w.write_config(&outlier_config(
        "panic",
        "127.210.13.1",
        "{consecutiveErrors: 1, interval: 10s, baseEjectionTime: 30s}",
        "      - {address: 127.10.13.1, locality: us-east1/us-east1-b}\n      - {address: 127.10.13.2, locality: us-east1/us-east1-b}\n",
    ))?;
    w.start_agent()?;
    w.stop_backend("a");
    w.stop_backend("b");
    w.gets("127.210.13.1:80", 20)?;
    w.wait_endpoints("panic", EJECT_TIMEOUT, |eps| {
        eps.as_array().is_some_and(|a| {
            a.iter()
                .all(|e| e["outlier"] == "EJECTED" && e["in_table"] == true)
        })
    })?;
    ensure!(w.agent().services_json()?[0]["tier"] == "panic");
    let connects = |w: &mut World| -> Result<Vec<u64>> {
        let eps = w.agent().endpoints_json(Some("panic"))?;
        ["127.10.13.1:8080", "127.10.13.2:8080"]
            .iter()
            .map(|a| Ok(endpoint(&eps, a)?["connects"].as_u64().unwrap_or(0)))
            .collect()
    };
    let before = connects(&mut w)?;
    let gets = w.gets("127.210.13.1:80", 40)?;
    ensure!(
        gets.iter().all(|g| g.error.is_some()),
        "every backend is down"
    );
    let after = connects(&mut w)?;
    ensure!(
        after[0] > before[0] && after[1] > before[1],
        "panic mode must keep trying every backend: connects {before:?} -> {after:?}"
    );
    // The agent itself is fine and answers.
    ensure!(w
        .agent()
        .services_json()?
        .as_array()
        .is_some_and(|a| a.len() == 1));
    Ok(())
}

#[test]
fn an_ejected_backend_comes_back_after_its_ejection_time_and_events_tell_the_story() -> Result<()> {
    let mut w = World::new()?;
    w.backend("a", "127.10.14.1:8080")?;
    w.backend("b", "127.10.14.2:8080")?;
    w.write_config(&outlier_config(
        "restore",
        "127.210.14.1",
        "{consecutiveErrors: 1, interval: 10s, baseEjectionTime: 1s}",
        "      - {address: 127.10.14.1, locality: us-east1/us-east1-b}\n      - {address: 127.10.14.2, locality: us-east1/us-east1-b}\n",
    ))?;
    w.start_agent()?;
    let events = crate::world::Events::start(&w)?;

    w.stop_backend("a");
    let gets = w.gets("127.210.14.1:80", 20)?;
    let failed = gets.iter().filter(|g| g.error.is_some()).count();
    ensure!(failed <= 1, "{failed} of 20 requests failed");
    w.wait_endpoints("restore", EJECT_TIMEOUT, |eps| {
        is_ejected(eps, "127.10.14.1:8080")
    })?;
    w.start_backend("a")?;
    let eps = w.wait_endpoints("restore", EJECT_TIMEOUT, |eps| {
        endpoint(eps, "127.10.14.1:8080")
            .is_ok_and(|e| e["outlier"] == "OK" && e["in_table"] == true)
    })?;
    ensure!(
        endpoint(&eps, "127.10.14.1:8080")?["ejections"] == 1,
        "{eps:#}"
    );
    let by = w.answers("127.210.14.1:80", 30)?;
    ensure!(by.contains_key("a") && !by.contains_key("ERR"), "{by:?}");

    let lines = events.finish()?;
    let kinds: Vec<(String, String)> = lines
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("").to_string(),
                e["backend"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let position = |kind: &str| {
        kinds
            .iter()
            .position(|(k, b)| k == kind && b == "127.10.14.1:8080")
    };
    let (Some(refused), Some(ejected), Some(restored)) = (
        position("refused"),
        position("ejected"),
        position("restored"),
    ) else {
        bail!("`detour events` missed part of the story: {lines:#?}");
    };
    ensure!(refused < ejected && ejected < restored, "{lines:#?}");
    Ok(())
}

/// `detour_events_received_total` and `detour_events_dropped_total`, as scraped.
fn events_counted(addr: std::net::SocketAddr) -> Result<(u64, u64)> {
    let metrics = scrape(addr)?;
    let value = |name: &str| -> Result<u64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .with_context(|| format!("no {name} in\n{metrics}"))
    };
    Ok((
        value("detour_events_received_total ")?,
        value("detour_events_dropped_total ")?,
    ))
}

#[test]
fn a_full_event_ring_drops_and_counts_and_never_blocks_a_connect() -> Result<()> {
    let mut w = World::new()?;
    w.backend("a", "127.10.15.1:8080")?;
    // Passive ejection off, so every connect keeps going to the dead backend and every
    // one of them is an event.
    w.write_config(&outlier_config(
        "ring",
        "127.210.15.1",
        "{consecutiveErrors: 0}",
        "      - {address: 127.10.15.1, locality: us-east1/us-east1-b}\n",
    ))?;
    w.start_agent()?;
    w.stop_backend("a");
    let addr = w.agent().metrics_address()?;
    let (received_before, dropped_before) = events_counted(addr)?;
    let pid = w.agent().pid().context("agent pid")?;
    // A stopped agent reads nothing: the ring fills and the rest must be dropped.
    // Enough refused connects to fill the ring three times over, counted, not timed:
    // each event takes its size plus the ring's 8-byte record header.
    let connects = 3 * u64::from(detour_ebpf::EVENTS_RING_BYTES)
        / (std::mem::size_of::<detour_ebpf::ConnEvent>() as u64 + 8);
    // SAFETY: plain signal to our own child process.
    ensure!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) } == 0);
    // The time bound only keeps a hung kernel from hanging the test.
    let looped = w
        .connect_loop_bounded("127.210.15.1:80", connects, Duration::from_secs(120))
        .and_then(|(child, _)| World::await_loop(child, Duration::from_secs(150)));
    // SAFETY: as above.
    ensure!(unsafe { libc::kill(pid as i32, libc::SIGCONT) } == 0);
    let summary = looped?;
    // Never blocks: every connect ended, refused as the dead backend refuses it, while
    // nothing read the ring.
    ensure!(
        summary.ok == 0 && summary.failed == connects && summary.refused == connects,
        "all {connects} connects end refused with the agent stopped: {summary:?}"
    );
    // Once running again, the agent reads what the ring held; everything else was
    // dropped, and counted: one event per refused connect, each either received or
    // dropped, none lost and none counted twice.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (received, dropped) = loop {
        let (received, dropped) = events_counted(addr)?;
        let counted = (received - received_before, dropped - dropped_before);
        if counted.0 + counted.1 >= connects || Instant::now() > deadline {
            break counted;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        received + dropped == connects,
        "{connects} refused connects, but {received} events received + {dropped} dropped"
    );
    ensure!(dropped > 0, "the ring never overflowed: {summary:?}");
    ensure!(received > 0, "nothing the ring held was read: {summary:?}");
    eprintln!(
        "{connects} refused connects with the agent stopped: {received} events received, {dropped} dropped and counted"
    );
    Ok(())
}

/// `ADDR,COUNT,MODE` for [`closing_client`].
const CLOSING_CLIENT_ENV: &str = "DETOUR_E2E_CLOSING_CLIENT";

/// Entry point of the re-executed test binary: `COUNT` connects to `ADDR`, failing on
/// the first connect that fails. MODE `abort`: each is closed with RST (`SO_LINGER
/// {on, 0}`, as many pools and load generators close). MODE `read`: each reads until
/// the backend ends it, which must be with a reset (`ECONNRESET`).
#[test]
#[ignore = "helper process: a test runs it inside its cgroup"]
fn closing_client() {
    use std::io::Read;
    let spec = std::env::var(CLOSING_CLIENT_ENV).expect("run by a test with ADDR,COUNT,MODE");
    let mut parts = spec.split(',');
    let target: std::net::SocketAddr = parts.next().unwrap().parse().expect("a socket address");
    let count: u32 = parts.next().expect("COUNT").parse().expect("a count");
    let mode = parts.next().expect("MODE");
    for i in 0..count {
        let connected = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5));
        let mut conn = match connected {
            // The backend can accept and reset before `connect` looks at the socket's
            // error: the handshake completed and the reset came, as `read` expects.
            Err(e) if mode == "read" && e.kind() == std::io::ErrorKind::ConnectionReset => continue,
            connected => connected.unwrap_or_else(|e| panic!("connect {i} to {target}: {e}")),
        };
        if mode == "read" {
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            let end = loop {
                match conn.read(&mut buf) {
                    Ok(0) => break "EOF".to_owned(),
                    Ok(_) => continue,
                    Err(e) => break format!("{e} ({:?})", e.kind()),
                }
            };
            assert!(
                end.contains("ConnectionReset"),
                "connect {i}: ended with {end}, not a reset"
            );
            continue;
        }
        linger_zero(&conn).expect("SO_LINGER 0");
    }
}

/// `SO_LINGER {on, 0}`: closing `conn` then sends a RST instead of a FIN.
fn linger_zero(conn: &std::net::TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(conn).set_linger(Some(Duration::ZERO))
}

/// A backend that resets every connection it accepts (`SO_LINGER` 0, then close) until
/// the returned flag is set; a bounded accept loop on a non-blocking listener.
fn resetting_backend(
    addr: &str,
) -> Result<(
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        // At most a minute, whatever the test does.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((conn, _)) => {
                    let _ = linger_zero(&conn);
                    drop(conn);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    Ok((stop, thread))
}

#[test]
fn resets_from_the_backend_and_aborts_of_the_client_are_counted_apart_and_send_no_event(
) -> Result<()> {
    const CONNECTS: u64 = 200;
    let mut w = World::new()?;
    w.backend("a", "127.10.16.1:8080")?;
    let (stop, resetter) = resetting_backend("127.10.16.2:8080")?;
    let service = |name: &str, vip: &str, backend: &str| {
        format!(
            r#"
  - name: {name}
    vips: [{vip}]
    ports: [{{number: 80, targetPort: 8080}}]
    healthCheck: {{disabled: true}}
    outlierDetection: {{consecutiveErrors: 1, interval: 10s, baseEjectionTime: 30s}}
    endpoints: [{{address: {backend}, locality: us-east1/us-east1-b}}]"#
        )
    };
    let config = format!(
        "node: {{ locality: us-east1/us-east1-b }}\nservices:{}{}\n",
        service("aborted", "127.210.16.1", "127.10.16.1"),
        service("resetting", "127.210.16.2", "127.10.16.2"),
    );
    w.write_config(&config)?;
    w.start_agent()?;
    let addr = w.agent().metrics_address()?;
    let received = || -> Result<u64> {
        let metrics = scrape(addr)?;
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("detour_events_received_total ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .with_context(|| format!("no detour_events_received_total in\n{metrics}"))
    };
    let before = received()?;

    let run = |target: &str, mode: &str| -> Result<()> {
        let mut cmd = client::helper("passive::closing_client")?;
        cmd.env(CLOSING_CLIENT_ENV, format!("{target},{CONNECTS},{mode}"));
        let (status, lines) = detour_testbed::LineStream::spawn_in(&w.cgroup, &mut cmd)?
            .wait(Duration::from_secs(30))
            .with_context(|| format!("the {mode} client"))?;
        ensure!(
            status.success(),
            "the {mode} client failed: {status}\n{lines:?}"
        );
        Ok(())
    };
    run("127.210.16.1:80", "abort")?;
    run("127.210.16.2:80", "read")?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    resetter.join().expect("the resetting backend");

    // The kernel tells them apart: the client's own aborts are no backend failure, the
    // backend's resets are.
    let eps = w.wait_endpoints("aborted", Duration::from_secs(5), |eps| {
        endpoint(eps, "127.10.16.1:8080").is_ok_and(|e| e["aborts"].as_u64() >= Some(CONNECTS))
    })?;
    let a = endpoint(&eps, "127.10.16.1:8080")?;
    ensure!(
        a["resets"] == 0,
        "the client's aborts counted as resets: {a:#}"
    );
    ensure!(a["established"].as_u64() >= Some(CONNECTS), "{a:#}");
    ensure!(a["outlier"] == "OK" && a["ejections"] == 0, "{a:#}");
    let eps = w.wait_endpoints("resetting", Duration::from_secs(5), |eps| {
        endpoint(eps, "127.10.16.2:8080").is_ok_and(|e| e["resets"].as_u64() >= Some(CONNECTS))
    })?;
    let b = endpoint(&eps, "127.10.16.2:8080")?;
    ensure!(
        b["aborts"] == 0,
        "the backend's resets counted as aborts: {b:#}"
    );
    ensure!(b["outlier"] == "OK" && b["ejections"] == 0, "{b:#}");

    // ...and none of them went through the ring: wait well past the reader's poll.
    std::thread::sleep(Duration::from_millis(10 * detour_ebpf::EVENTS_POLL_MS));
    let after = received()?;
    ensure!(
        after == before,
        "{} events for {} connections ended by a reset or an abort (after an established connection they decide nothing)",
        after - before,
        2 * CONNECTS
    );
    Ok(())
}
