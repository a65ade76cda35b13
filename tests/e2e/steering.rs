//! SYN steering: a handshake whose SYN goes unanswered is moved to another backend at
//! its timeout, so the application's connect succeeds instead of failing.
//!
//! Everything runs in a network namespace of the test's own: the client (also in the
//! test's cgroup, where the connect programs rewrite it), both backends on that
//! namespace's loopback, and the steering program, which the agent attaches to that
//! namespace's `lo` (`--steer-netns`); the machine's own devices are never touched.
//!
//! The black hole is real and kernel-made ([`BlackHole`]): a listener whose accept queue
//! is full drops every SYN, so the connect sees nothing, exactly as with a backend that
//! stopped answering. The refusing backend is an address nothing listens on: the kernel
//! answers its SYNs with a reset, as for a backend whose process died.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use detour_testbed::{BlackHole, EchoBackend, HttpBackend, Netns};

use crate::client::{self, EchoEnd, Get, HoldEnd, Script};
use crate::passive::{scrape, wait_for_file};
use crate::world::{endpoint, World};

fn config(vip: &str, a: &str, b: &str) -> String {
    // consecutiveErrors is high so that the agent never ejects the black hole: every
    // time the kernel's soft mark on it lapses (4 handshake timeouts), a connect picks
    // it again and must be steered again.
    format!(
        r#"
node: {{ locality: us-east1/us-east1-b }}
services:
  - name: steer
    vips: [{vip}]
    ports: [{{number: 80, targetPort: 8080}}]
    healthCheck: {{disabled: true}}
    outlierDetection: {{consecutiveErrors: 100000, interval: 10s, baseEjectionTime: 30s, handshakeTimeout: 100ms}}
    endpoints:
      - {{address: {a}, locality: us-east1/us-east1-b}}
      - {{address: {b}, locality: us-east1/us-east1-b}}
"#
    )
}

/// Fails, with what the agent saw (steering counters, endpoints, its log), when a GET
/// failed.
fn no_get_failed(w: &mut World, gets: &[Get]) -> Result<()> {
    let failed: Vec<&Get> = gets.iter().filter(|g| g.error.is_some()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    let metrics = scrape(w.agent().metrics_address()?)?;
    let counters: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("detour_steer") || l.starts_with("detour_backend_failures"))
        .collect();
    let endpoints = w.agent().endpoints_json(Some("steer"))?;
    anyhow::bail!(
        "{} of {} GETs failed: {failed:?}\ncounters: {counters:#?}\nendpoints: {endpoints:#}\nagent log:\n{}",
        failed.len(),
        gets.len(),
        w.agent().log_tail()
    )
}

/// `name value` of a metric line without labels.
fn metric(metrics: &str, name: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// What is wrong with backend A.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// SYNs go unanswered.
    BlackHole,
    /// Nothing listens: SYNs are answered with a reset.
    Refused,
}

fn every_get_answered_by_b_through_a_black_hole(
    vip: &str,
    a: &str,
    b: &str,
    lo_addrs: &[&str],
) -> Result<()> {
    every_get_answered_by_b(Fault::BlackHole, vip, a, b, lo_addrs)
}

fn every_get_answered_by_b(
    fault: Fault,
    vip: &str,
    a: &str,
    b: &str,
    lo_addrs: &[&str],
) -> Result<()> {
    let mut w = World::new()?;
    let ns = Netns::new()?;
    for addr in lo_addrs {
        ns.ip(&["addr", "add", addr, "dev", "lo"])?;
    }
    let port = |host: &str| -> Result<SocketAddr> { Ok(SocketAddr::new(host.parse()?, 8080)) };
    let _hole = match fault {
        Fault::BlackHole => Some(BlackHole::start_in(&ns, port(a)?)?),
        Fault::Refused => None,
    };
    let _b = HttpBackend::start_in(&ns, "b", port(b)?)?;
    w.write_config(&config(vip, a, b))?;
    let netns = ns.path().display().to_string();
    w.bed.start_agent(
        &["--steer-devices", "lo", "--steer-netns", &netns],
        crate::world::READY_TIMEOUT,
    )?;

    let target = SocketAddr::new(vip.parse()?, 80);
    let client = client::spawn_in_netns(
        &w.cgroup,
        &ns.path(),
        &Script::Gets {
            target,
            count: 150,
            interval_ms: 10,
        },
    )?;
    let gets: Vec<Get> = match client::results(client, Duration::from_secs(60)) {
        Ok(gets) => gets,
        Err(e) => {
            let metrics = scrape(w.agent().metrics_address()?)?;
            let steer: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("detour_steer"))
                .collect();
            return Err(e.context(format!(
                "steering metrics: {steer:#?}\nagent log:\n{}",
                w.agent().log_tail()
            )));
        }
    };
    ensure!(gets.len() == 150, "{} results", gets.len());
    no_get_failed(&mut w, &gets)?;
    ensure!(
        gets.iter().all(|g| g.body.as_deref() == Some("b")),
        "every GET is answered by b: {gets:?}"
    );
    // The application still sees the VIP as its peer, steered or not.
    ensure!(
        gets.iter().all(|g| g.peer == Some(target)),
        "getpeername shows the VIP: {:?}",
        gets.iter().map(|g| g.peer).collect::<Vec<_>>()
    );

    let metrics = scrape(w.agent().metrics_address()?)?;
    let steered = metric(&metrics, "detour_steer_steered_total").unwrap_or(0);
    ensure!(
        steered >= 1,
        "no handshake was steered (the faulty backend was never picked?):\n{metrics}"
    );
    ensure!(
        metric(&metrics, "detour_steer_unseen_total") == Some(0),
        "the program saw every steered flow:\n{metrics}"
    );
    let held = metric(&metrics, "detour_steer_refusals_held_total").unwrap_or(0);
    // What A's handshakes counted as: refusals for a refusing A, timeouts for a black
    // hole, never the other.
    let eps = w.agent().endpoints_json(Some("steer"))?;
    let a_ep = endpoint(&eps, &port(a)?.to_string())?;
    let (timeouts, refused) = (a_ep["timeouts"].as_u64(), a_ep["refused"].as_u64());
    match fault {
        // Every steering of a refused flow follows a held reset.
        Fault::Refused => ensure!(
            held >= steered && refused >= Some(held) && timeouts == Some(0),
            "{held} resets held for {steered} steerings; A: {a_ep:#}\n{metrics}"
        ),
        Fault::BlackHole => ensure!(
            held == 0 && timeouts >= Some(steered) && refused == Some(0),
            "{held} resets held; A: {a_ep:#}\n{metrics}"
        ),
    }
    eprintln!("{fault:?}: {steered} handshakes steered away from A ({held} resets held); 150 of 150 GETs answered");
    Ok(())
}

#[test]
fn ipv4_handshakes_to_a_black_hole_are_steered_and_no_get_fails() -> Result<()> {
    every_get_answered_by_b_through_a_black_hole("127.210.40.1", "127.10.40.1", "127.10.40.2", &[])
}

#[test]
fn ipv6_handshakes_to_a_black_hole_are_steered_and_no_get_fails() -> Result<()> {
    every_get_answered_by_b_through_a_black_hole(
        "fd00:210::1",
        "fd00:10::1",
        "fd00:10::2",
        &["fd00:10::1/128", "fd00:10::2/128"],
    )
}

#[test]
fn ipv4_refused_handshakes_are_steered_and_no_get_fails() -> Result<()> {
    every_get_answered_by_b(
        Fault::Refused,
        "127.210.43.1",
        "127.10.43.1",
        "127.10.43.2",
        &[],
    )
}

#[test]
fn ipv6_refused_handshakes_are_steered_and_no_get_fails() -> Result<()> {
    every_get_answered_by_b(
        Fault::Refused,
        "fd00:210::43:1",
        "fd00:10::43:1",
        "fd00:10::43:2",
        &["fd00:10::43:1/128", "fd00:10::43:2/128"],
    )
}

#[test]
fn when_every_backend_refuses_the_connect_still_fails_with_refused() -> Result<()> {
    // No backend left to steer to: the last reset goes through, so a dead service fails
    // fast (after one handshake timeout per backend tried) instead of hanging.
    let mut w = World::new()?;
    let ns = Netns::new()?;
    w.write_config(&config("127.210.44.1", "127.10.44.1", "127.10.44.2"))?;
    let netns = ns.path().display().to_string();
    w.bed.start_agent(
        &["--steer-devices", "lo", "--steer-netns", &netns],
        crate::world::READY_TIMEOUT,
    )?;
    let client = client::spawn_in_netns(
        &w.cgroup,
        &ns.path(),
        &Script::Gets {
            target: "127.210.44.1:80".parse()?,
            count: 5,
            interval_ms: 10,
        },
    )?;
    let gets: Vec<Get> = client::results(client, Duration::from_secs(30))?;
    ensure!(gets.len() == 5, "{} results", gets.len());
    ensure!(
        gets.iter().all(|g| g
            .error
            .as_deref()
            .is_some_and(|e| e.to_lowercase().contains("refused"))),
        "every GET fails as refused: {gets:?}"
    );
    let metrics = scrape(w.agent().metrics_address()?)?;
    let held = metric(&metrics, "detour_steer_refusals_held_total").unwrap_or(0);
    ensure!(
        held <= 5,
        "at most one reset held per connect (one other backend to try): {held}\n{metrics}"
    );
    Ok(())
}

#[test]
fn a_connect_to_a_black_hole_is_steered_to_the_standby_tier_and_endpoints_show_it() -> Result<()> {
    let mut w = World::new()?;
    let ns = Netns::new()?;
    let (a, b): (SocketAddr, SocketAddr) =
        ("127.10.41.1:8080".parse()?, "127.10.41.2:8080".parse()?);
    let _hole = BlackHole::start_in(&ns, a)?;
    let _b = HttpBackend::start_in(&ns, "b", b)?;
    // The black hole is the only member of the table; b is the next tier (standby): the
    // first connect goes to the black hole, and only steering can save it.
    w.write_config(
        r#"
node: { locality: us-east1/us-east1-b }
services:
  - name: steer
    vips: [127.210.41.1]
    ports: [{number: 80, targetPort: 8080}]
    localityLbSetting: {failover: [{from: us-east1, to: us-west}]}
    healthCheck: {disabled: true}
    outlierDetection: {consecutiveErrors: 100000, interval: 10s, baseEjectionTime: 30s, handshakeTimeout: 100ms}
    endpoints:
      - {address: 127.10.41.1, locality: us-east1/us-east1-b}
      - {address: 127.10.41.2, locality: us-west/us-west-1a}
"#,
    )?;
    let netns = ns.path().display().to_string();
    w.bed.start_agent(
        &["--steer-devices", "lo", "--steer-netns", &netns],
        crate::world::READY_TIMEOUT,
    )?;

    let ready = w.dir.join("hold-ready");
    let hold = client::spawn_in_netns(
        &w.cgroup,
        &ns.path(),
        &Script::Hold {
            target: "127.210.41.1:80".parse()?,
            ready_file: ready.clone(),
            max_ms: 8_000,
        },
    )?;
    wait_for_file(&ready, Duration::from_secs(10)).context("the connect did not succeed")?;
    // The sweep counts open steered flows every 5 s.
    let eps = w.wait_endpoints("steer", Duration::from_secs(15), |eps| {
        endpoint(eps, "127.10.41.2:8080").is_ok_and(|e| e["steered"] == 1)
    })?;
    let hole = endpoint(&eps, "127.10.41.1:8080")?;
    ensure!(
        hole["timeouts"].as_u64() >= Some(1),
        "the black hole's stall counts: {hole:#}"
    );
    ensure!(hole["steered"] == 0, "{hole:#}");
    let table = w.agent().cli(&["endpoints"])?;
    ensure!(
        table.lines().next().is_some_and(|h| h.ends_with("STEERED")),
        "{table}"
    );

    let held: Vec<HoldEnd> = client::results(hold, Duration::from_secs(30))?;
    let held = held.first().context("the holding client printed nothing")?;
    // Ended by the client's own time limit (its last read timing out), not by anything
    // that happened to the connection.
    ensure!(
        held.timed_out,
        "the steered connection lived until the client ended it: {held:?}"
    );
    Ok(())
}

#[test]
fn over_a_veth_a_stalled_handshake_is_steered_both_ways_on_one_device() -> Result<()> {
    over_a_veth(Fault::BlackHole, 46)
}

#[test]
fn over_a_veth_a_refused_handshake_is_steered_both_ways_on_one_device() -> Result<()> {
    over_a_veth(Fault::Refused, 47)
}

fn over_a_veth(fault: Fault, net: u8) -> Result<()> {
    // Both backends behind one veth pair the test makes: the agent attaches steering to
    // its root end (egress translates the flow; ingress the replies, and holds the
    // refusals), in the agent's own namespace, and to no other device.
    let mut w = World::new()?;
    let ns = Netns::new()?;
    let subnet = |host: u8| format!("10.231.{net}.{host}");
    let veth = ns.veth(&format!("{}/24", subnet(1)), &format!("{}/24", subnet(2)))?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", subnet(3)),
        "dev",
        veth.peer_name(),
    ])?;
    let (a, b): (SocketAddr, SocketAddr) = (
        format!("{}:8080", subnet(2)).parse()?,
        format!("{}:8080", subnet(3)).parse()?,
    );
    let _hole = match fault {
        Fault::BlackHole => Some(BlackHole::start_in(&ns, a)?),
        Fault::Refused => None,
    };
    let _b = HttpBackend::start_in(&ns, "b", b)?;
    let vip = format!("127.210.{net}.1");
    w.write_config(&config(&vip, &subnet(2), &subnet(3)))?;
    w.bed.start_agent(
        &["--steer-devices", veth.host_name()],
        crate::world::READY_TIMEOUT,
    )?;
    let gets = client::gets(&w.cgroup, format!("{vip}:80").parse()?, 100, 10)?;
    no_get_failed(&mut w, &gets)?;
    ensure!(
        gets.iter().all(|g| g.body.as_deref() == Some("b")),
        "every GET is answered by b: {gets:?}"
    );
    let metrics = scrape(w.agent().metrics_address()?)?;
    let steered = metric(&metrics, "detour_steer_steered_total").unwrap_or(0);
    ensure!(steered >= 1, "no handshake was steered:\n{metrics}");
    ensure!(
        metric(&metrics, "detour_steer_unseen_total") == Some(0),
        "{metrics}"
    );
    let held = metric(&metrics, "detour_steer_refusals_held_total").unwrap_or(0);
    if fault == Fault::Refused {
        ensure!(
            held >= steered,
            "{held} resets held for {steered} steerings"
        );
    }
    eprintln!(
        "over a veth, {fault:?}: {steered} handshakes steered ({held} resets held); 100 of 100 GETs answered"
    );
    Ok(())
}

/// One service whose only active member is `active` (the connect's pick), with the
/// `standby` endpoints as later failover tiers (us-west, then eu-west): only steering can
/// save a connect that `active` does not answer.
fn tiered_config(vip: &str, active: &[SocketAddr], standby: &[SocketAddr]) -> String {
    let mut endpoints = String::new();
    for a in active {
        let a = a.ip();
        endpoints += &format!("      - {{address: {a}, locality: us-east1/us-east1-b}}\n");
    }
    for s in standby {
        let s = s.ip();
        endpoints += &format!("      - {{address: {s}, locality: us-west/us-west-1a}}\n");
    }
    format!(
        r#"
node: {{ locality: us-east1/us-east1-b }}
services:
  - name: steer
    vips: [{vip}]
    ports: [{{number: 80, targetPort: 8080}}]
    localityLbSetting: {{failover: [{{from: us-east1, to: us-west}}]}}
    healthCheck: {{disabled: true}}
    outlierDetection: {{consecutiveErrors: 100000, interval: 10s, baseEjectionTime: 30s, handshakeTimeout: 100ms}}
    endpoints:
{endpoints}"#
    )
}

/// `N` backend addresses on a namespace's `lo`: 127.10.`net`.1:8080, .2, ...
fn backends<const N: usize>(net: u8) -> [SocketAddr; N] {
    std::array::from_fn(|i| SocketAddr::from(([127, 10, net, i as u8 + 1], 8080)))
}

/// `count` GETs of `target`, `interval_ms` apart, from a client in the test's cgroup and
/// in `ns`; bounded by `within`.
fn gets_in(
    w: &World,
    ns: &Netns,
    target: SocketAddr,
    count: u32,
    interval_ms: u64,
    within: Duration,
) -> Result<Vec<Get>> {
    let script = Script::Gets {
        target,
        count,
        interval_ms,
    };
    client::results(
        client::spawn_in_netns(&w.cgroup, &ns.path(), &script)?,
        within,
    )
}

/// An agent steering on `ns`'s `lo`, with `extra` arguments.
fn start_steering_agent(w: &mut World, ns: &Netns, extra: &[&str]) -> Result<()> {
    let netns = ns.path().display().to_string();
    let mut args = vec!["--steer-devices", "lo", "--steer-netns", &netns];
    args.extend_from_slice(extra);
    w.bed.start_agent(&args, crate::world::READY_TIMEOUT)?;
    Ok(())
}

#[test]
fn a_steered_connection_carries_long_transfers_both_ways_and_outlives_an_agent_crash() -> Result<()>
{
    let mut w = World::new()?;
    let ns = Netns::new()?;
    let [a, b] = backends(48);
    let _hole = BlackHole::start_in(&ns, a)?;
    let _echo = EchoBackend::start_in(&ns, b)?;
    w.write_config(&tiered_config("127.210.48.1", &[a], &[b]))?;
    start_steering_agent(&mut w, &ns, &[])?;

    let target: SocketAddr = "127.210.48.1:80".parse()?;
    let (ready, go) = (w.dir.join("echo-ready"), w.dir.join("echo-go"));
    const BYTES: u64 = 4 << 20;
    let client = client::spawn_in_netns(
        &w.cgroup,
        &ns.path(),
        &Script::Echo {
            target,
            bytes: BYTES,
            ready_file: ready.clone(),
            go_file: go.clone(),
            max_ms: 60_000,
        },
    )?;
    if let Err(e) = wait_for_file(&ready, Duration::from_secs(20)) {
        let end: Vec<EchoEnd> = client::results(client, Duration::from_secs(5))?;
        anyhow::bail!("the first exchange did not finish ({e:#}): {end:?}");
    }
    let metrics = scrape(w.agent().metrics_address()?)?;
    ensure!(
        metric(&metrics, "detour_steer_steered_total") == Some(1),
        "the connection was steered once:\n{metrics}"
    );

    // A crash: nothing is cleaned up, and the new agent takes over the pinned programs,
    // maps and links while the flow is open.
    w.agent().kill9()?;
    w.agent().restart()?;
    w.agent().wait_ready(crate::world::READY_TIMEOUT)?;
    // The new agent counts the flow it inherited (its sweep runs every 5 s).
    w.wait_endpoints("steer", Duration::from_secs(15), |eps| {
        endpoint(eps, &b.to_string()).is_ok_and(|e| e["steered"] == 1)
    })
    .context("the restarted agent does not see the steered flow")?;
    std::fs::write(&go, b"")?;

    let end: Vec<EchoEnd> = client::results(client, Duration::from_secs(60))?;
    let end = end.first().context("the echo client printed nothing")?;
    ensure!(
        end.error.is_none() && end.echoed == 2 * BYTES,
        "every byte came back intact, before and after the restart: {end:?}\nagent log:\n{}",
        w.agent().log_tail()
    );
    ensure!(
        end.peer == Some(target),
        "getpeername shows the VIP: {end:?}"
    );
    Ok(())
}

#[test]
fn when_the_backend_a_handshake_was_steered_to_stalls_too_it_is_steered_again() -> Result<()> {
    let mut w = World::new()?;
    let ns = Netns::new()?;
    let [a, b, c] = backends(49);
    let _holes = (BlackHole::start_in(&ns, a)?, BlackHole::start_in(&ns, b)?);
    let _c = HttpBackend::start_in(&ns, "c", c)?;
    // Both black holes are the active members, c the standby tier. The connect picks one
    // hole; at its timeout the other hole is the first choice (same tier, untried, not
    // suspect), and c (standby, no handshake seen yet) only the next one.
    w.write_config(&tiered_config("127.210.49.1", &[a, b], &[c]))?;
    start_steering_agent(&mut w, &ns, &[])?;
    let gets = gets_in(
        &w,
        &ns,
        "127.210.49.1:80".parse()?,
        1,
        0,
        Duration::from_secs(30),
    )?;
    no_get_failed(&mut w, &gets)?;
    ensure!(
        gets.iter().all(|g| g.body.as_deref() == Some("c")),
        "{gets:?}"
    );
    let metrics = scrape(w.agent().metrics_address()?)?;
    ensure!(
        metric(&metrics, "detour_steer_steered_total") == Some(2),
        "steered twice, hole to hole to c:\n{metrics}"
    );
    let eps = w.agent().endpoints_json(Some("steer"))?;
    for hole in [a, b] {
        let e = endpoint(&eps, &hole.to_string())?;
        ensure!(e["timeouts"].as_u64() == Some(1), "{e:#}");
    }
    Ok(())
}

#[test]
fn when_every_backend_is_a_black_hole_the_application_gets_its_own_timeout() -> Result<()> {
    let mut w = World::new()?;
    let ns = Netns::new()?;
    let [a, b] = backends(50);
    let _holes = (BlackHole::start_in(&ns, a)?, BlackHole::start_in(&ns, b)?);
    w.write_config(&config(
        "127.210.50.1",
        &a.ip().to_string(),
        &b.ip().to_string(),
    ))?;
    start_steering_agent(&mut w, &ns, &[])?;
    // Each GET's connect has the client's own 2 s limit; nothing may outlast it.
    let gets = gets_in(
        &w,
        &ns,
        "127.210.50.1:80".parse()?,
        3,
        0,
        Duration::from_secs(30),
    )?;
    ensure!(gets.len() == 3, "{gets:?}");
    ensure!(
        gets.iter().all(|g| g
            .error
            .as_deref()
            .is_some_and(|e| e.to_lowercase().contains("timed out"))),
        "every GET ends at the client's own connect timeout: {gets:?}"
    );
    let metrics = scrape(w.agent().metrics_address()?)?;
    let steered = metric(&metrics, "detour_steer_steered_total").unwrap_or(0);
    // One other backend to try per connect, then the flow is left alone.
    ensure!(
        (1..=3).contains(&steered),
        "{steered} steerings:\n{metrics}"
    );
    Ok(())
}

#[test]
fn with_the_translation_table_full_a_stalled_handshake_fails_as_without_steering_and_counts(
) -> Result<()> {
    let mut w = World::new()?;
    let ns = Netns::new()?;
    let [a, b] = backends(51);
    let _hole = BlackHole::start_in(&ns, a)?;
    let _b = HttpBackend::start_in(&ns, "b", b)?;
    w.write_config(&tiered_config("127.210.51.1", &[a], &[b]))?;
    start_steering_agent(&mut w, &ns, &["--max-steered-flows", "1"])?;
    let target: SocketAddr = "127.210.51.1:80".parse()?;

    // The one entry: a connection steered to b and held open.
    let ready = w.dir.join("hold-ready");
    let hold = client::spawn_in_netns(
        &w.cgroup,
        &ns.path(),
        &Script::Hold {
            target,
            ready_file: ready.clone(),
            max_ms: 15_000,
        },
    )?;
    wait_for_file(&ready, Duration::from_secs(10)).context("the held connect did not succeed")?;

    // While the kernel's soft mark on the black hole lasts (4 handshake timeouts after a
    // stall), connects go to b without steering; once it lapses, a connect picks the
    // black hole again, and with no room to steer it times out as it would without
    // steering. Spaced GETs meet both.
    let gets = gets_in(&w, &ns, target, 6, 300, Duration::from_secs(60))?;
    let timed_out = |g: &Get| {
        g.error
            .as_deref()
            .is_some_and(|e| e.to_lowercase().contains("timed out"))
    };
    ensure!(
        gets.len() == 6
            && gets.iter().any(timed_out)
            && gets
                .iter()
                .all(|g| timed_out(g) || g.body.as_deref() == Some("b")),
        "with no room to steer, a connect to the black hole times out as without steering \
         (and one made while it is marked goes to b): {gets:?}"
    );
    let metrics = scrape(w.agent().metrics_address()?)?;
    ensure!(
        metric(&metrics, "detour_steer_steered_total") == Some(1)
            && metric(&metrics, "detour_steer_table_full_total") >= Some(1),
        "one flow steered, the later stalls counted as a full table:\n{metrics}"
    );
    let held: Vec<HoldEnd> = client::results(hold, Duration::from_secs(30))?;
    ensure!(
        held.first().is_some_and(|h| h.timed_out),
        "the steered connection lived on beside the full table: {held:?}"
    );
    Ok(())
}

#[test]
fn a_time_wait_at_the_backend_steered_to_costs_one_more_timeout_not_the_connect() -> Result<()> {
    let mut w = World::new()?;
    let ns = Netns::new()?;
    let [a, b, c] = backends(52);
    let _hole = BlackHole::start_in(&ns, a)?;
    let _b = HttpBackend::start_in(&ns, "b", b)?;
    let _c = HttpBackend::start_in(&ns, "c", c)?;
    let target: SocketAddr = "127.210.52.1:80".parse()?;
    // First b alone, so that a GET completes a handshake with it: steering's first choice
    // is a backend with a handshake completed lately, which makes b the first choice
    // below and c the next one.
    w.write_config(&tiered_config("127.210.52.1", &[b], &[]))?;
    start_steering_agent(&mut w, &ns, &[])?;
    let first = gets_in(&w, &ns, target, 1, 0, Duration::from_secs(30))?;
    ensure!(
        first.iter().all(|g| g.body.as_deref() == Some("b")),
        "{first:?}"
    );

    // Then the black hole is the only active member, b and c the standby tier.
    w.write_config(&tiered_config("127.210.52.1", &[a], &[b, c]))?;
    w.agent().reload()?;
    w.wait_endpoints("steer", Duration::from_secs(10), |eps| {
        endpoint(eps, &a.to_string()).is_ok() && endpoint(eps, &c.to_string()).is_ok()
    })?;
    // The connect goes to the black hole from a local port that has a TIME_WAIT with b:
    // steered to b, its 4-tuple would be that TIME_WAIT's. The steering is undone at its
    // first packet, and the flow is steered to c at its next timeout.
    let script = Script::GetFromATimeWaitPort { direct: b, target };
    let client = client::spawn_in_netns(&w.cgroup, &ns.path(), &script)?;
    let gets: Vec<Get> = client::results(client, Duration::from_secs(30))?;
    no_get_failed(&mut w, &gets)?;
    ensure!(
        gets.iter().all(|g| g.body.as_deref() == Some("c")),
        "{gets:?}"
    );
    let metrics = scrape(w.agent().metrics_address()?)?;
    ensure!(
        metric(&metrics, "detour_steer_collisions_total") == Some(1)
            && metric(&metrics, "detour_steer_steered_total") == Some(2),
        "one steering undone by the TIME_WAIT, then one to c:\n{metrics}"
    );
    // The collision is not b's fault.
    let eps = w.agent().endpoints_json(Some("steer"))?;
    let b_ep = endpoint(&eps, &b.to_string())?;
    ensure!(b_ep["timeouts"].as_u64() == Some(0), "{b_ep:#}");
    Ok(())
}
