//! The scenarios a user of detour relies on, each in its own world.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use detour_ebpf::programs;

use crate::world::{endpoint, link_outcomes, World};

const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Asserts that `n` requests to `vip` were answered exactly as `expected` (body → count).
fn expect_answers(w: &World, vip: &str, n: u32, expected: &[(&str, u32)]) -> Result<()> {
    let got = w.answers(vip, n)?;
    let want: BTreeMap<String, u32> = expected.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    ensure!(
        got == want,
        "{n} requests to {vip}: expected {want:?}, got {got:?}"
    );
    Ok(())
}

fn health_checks(interval: &str) -> String {
    format!("{{interval: {interval}, timeout: 100ms, unhealthyThreshold: 1, healthyThreshold: 1}}")
}

#[test]
fn connect_to_the_vip_reaches_the_nearest_tier_and_getpeername_shows_the_vip() -> Result<()> {
    let mut w = World::new()?;
    w.backend("zone", "127.10.1.1:8080")?;
    w.backend("region", "127.10.1.2:8080")?;
    w.backend("west", "127.10.1.3:8080")?;
    w.write_config(&format!(
        r#"
node: {{ locality: us-east1/us-east1-b }}
services:
  - name: nearest
    vips: [127.210.1.1]
    ports: [{{number: 80, name: http, targetPort: 8080}}]
    endpoints:
      - {{address: 127.10.1.3, locality: us-west/us-west-1a}}
      - {{address: 127.10.1.2, locality: us-east1/us-east1-c}}
      - {{address: 127.10.1.1, locality: us-east1/us-east1-b}}
    localityLbSetting: {{failover: [{{from: us-east1, to: us-west}}]}}
    healthCheck: {}
"#,
        health_checks("100ms")
    ))?;
    w.start_agent()?;
    let gets = w.gets("127.210.1.1:80", 20)?;
    for g in &gets {
        ensure!(
            g.body.as_deref() == Some("zone"),
            "expected the same-zone backend, got {g:?}"
        );
        ensure!(
            g.peer == Some("127.210.1.1:80".parse()?),
            "getpeername should return the VIP, got {:?}",
            g.peer
        );
    }
    let services = w.agent().services_json()?;
    ensure!(services[0]["tier"] == "same-zone", "{services:#}");
    let eps = w.agent().endpoints_json(Some("nearest"))?;
    ensure!(
        endpoint(&eps, "127.10.1.1:8080")?["connects"].as_u64() >= Some(20),
        "{eps:#}"
    );
    ensure!(
        endpoint(&eps, "127.10.1.2:8080")?["in_table"] == false,
        "{eps:#}"
    );

    // With the zone's only backend gone, the region serves; then the failover region.
    w.stop_backend("zone");
    w.wait_endpoints("nearest", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.1.2:8080").is_ok_and(|e| e["in_table"] == true)
    })?;
    expect_answers(&w, "127.210.1.1:80", 10, &[("region", 10)])?;
    ensure!(w.agent().services_json()?[0]["tier"] == "same-region");
    // With the region's backends gone too, the failover rule's target serves: the tier
    // says it was the rule, not the catch-all of anything left.
    w.stop_backend("region");
    w.wait_endpoints("nearest", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.1.3:8080").is_ok_and(|e| e["in_table"] == true)
            && endpoint(eps, "127.10.1.2:8080").is_ok_and(|e| e["in_table"] == false)
    })?;
    expect_answers(&w, "127.210.1.1:80", 10, &[("west", 10)])?;
    let services = w.agent().services_json()?;
    ensure!(services[0]["tier"] == "failover[0]:us-west", "{services:#}");
    Ok(())
}

#[test]
fn ipv6_vips_are_rewritten_too() -> Result<()> {
    let mut w = World::new()?;
    w.backend("v6", "[::1]:28082")?;
    w.write_config(
        r#"
services:
  - name: six
    vips: ["::1"]
    ports: [{number: 18082, name: http, targetPort: 28082}]
    endpoints:
      - {address: "::1"}
"#,
    )?;
    w.start_agent()?;
    for g in w.gets("[::1]:18082", 10)? {
        ensure!(g.body.as_deref() == Some("v6"), "{g:?}");
        ensure!(
            g.peer == Some("[::1]:18082".parse()?),
            "getpeername: {:?}",
            g.peer
        );
    }
    Ok(())
}

#[test]
fn weights_are_honoured_within_a_tier() -> Result<()> {
    let mut w = World::new()?;
    w.backend("heavy", "127.10.3.1:8080")?;
    w.backend("light", "127.10.3.2:8080")?;
    w.write_config(
        r#"
services:
  - name: weighted
    vips: [127.210.3.1]
    ports: [{number: 80, targetPort: 8080}]
    endpoints:
      - {address: 127.10.3.1, weight: 3}
      - {address: 127.10.3.2, weight: 1}
"#,
    )?;
    w.start_agent()?;
    let n = 400;
    let by = w.answers("127.210.3.1:80", n)?;
    let heavy = f64::from(by.get("heavy").copied().unwrap_or(0)) / f64::from(n);
    // Expect 0.75; the bounds are more than 4 standard deviations (0.022) away.
    ensure!(
        (0.65..=0.85).contains(&heavy),
        "heavy share {heavy}: {by:?}"
    );
    ensure!(!by.contains_key("ERR"), "{by:?}");
    Ok(())
}

#[test]
fn table_swaps_under_a_connect_loop_fail_no_connect() -> Result<()> {
    let mut w = World::new()?;
    for (name, addr) in [
        ("a", "127.10.4.1:8080"),
        ("b", "127.10.4.2:8080"),
        ("c", "127.10.4.3:8080"),
    ] {
        w.backend(name, addr)?;
    }
    let config = |addrs: &[&str]| {
        let eps: String = addrs
            .iter()
            .map(|a| format!("      - {{address: {a}}}\n"))
            .collect();
        format!(
            "services:\n  - name: swap\n    vips: [127.210.4.1]\n    ports: [{{number: 80, targetPort: 8080}}]\n    healthCheck: {{disabled: true}}\n    terminateConnections: false\n    endpoints:\n{eps}"
        )
    };
    // Connections to a backend a swap removes are left alone here (they are destroyed
    // by default): this test is about the swap itself never failing a connect.
    let sets: [&[&str]; 4] = [
        &["127.10.4.1"],
        &["127.10.4.2", "127.10.4.3"],
        &["127.10.4.3"],
        &["127.10.4.1", "127.10.4.2", "127.10.4.3"],
    ];
    w.write_config(&config(sets[0]))?;
    w.start_agent()?;
    let (child, stop) = w.connect_loop("127.210.4.1:80")?;
    let mut swaps = 0;
    for round in 0..24 {
        let set = sets[(round + 1) % sets.len()];
        w.write_config(&config(set))?;
        w.agent().reload()?;
        w.wait_endpoints("swap", CHECK_TIMEOUT, |eps| {
            eps.as_array()
                .is_some_and(|a| a.len() == set.len() && a.iter().all(|e| e["in_table"] == true))
        })?;
        swaps += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let summary = World::finish_loop(child, &stop)?;
    ensure!(summary.failed == 0, "{swaps} swaps: {summary:?}");
    ensure!(summary.ok > 100, "the loop barely ran: {summary:?}");
    Ok(())
}

#[test]
fn killing_and_restarting_the_agent_fails_no_connect() -> Result<()> {
    let mut w = World::new()?;
    w.backend("a", "127.10.5.1:8080")?;
    w.write_config(
        r#"
services:
  - name: sturdy
    vips: [127.210.5.1]
    ports: [{number: 80, targetPort: 8080}]
    endpoints: [{address: 127.10.5.1}]
"#,
    )?;
    w.start_agent()?;
    let (child, stop) = w.connect_loop("127.210.5.1:80")?;
    std::thread::sleep(Duration::from_millis(300));
    w.agent().kill9()?;
    std::thread::sleep(Duration::from_millis(500));
    let restarted_at = w.log().len();
    w.agent().restart()?;
    w.agent().wait_ready(crate::world::READY_TIMEOUT)?;
    std::thread::sleep(Duration::from_millis(300));
    let summary = World::finish_loop(child, &stop)?;
    ensure!(summary.failed == 0, "{summary:?}");
    ensure!(summary.ok > 100, "{summary:?}");
    // Every one of the programs the first agent attached, and no other, adopted.
    let log = w.log();
    let adopted = link_outcomes(&log[restarted_at..]);
    let every_program: BTreeMap<String, String> = programs::ALL
        .into_iter()
        .map(|p| (p.to_owned(), "Adopted".to_owned()))
        .collect();
    ensure!(
        adopted == every_program
            && link_outcomes(&log[..restarted_at]).len() == programs::ALL.len(),
        "the restarted agent should adopt all {} pinned links, got {adopted:?}:\n{log}",
        programs::ALL.len()
    );
    // And it still serves, with counters that survived the restart.
    expect_answers(&w, "127.210.5.1:80", 5, &[("a", 5)])?;
    let eps = w.agent().endpoints_json(Some("sturdy"))?;
    ensure!(
        endpoint(&eps, "127.10.5.1:8080")?["connects"].as_u64() > Some(summary.ok),
        "{eps:#}"
    );
    Ok(())
}

#[test]
fn a_bad_config_is_rejected_with_field_and_line_and_the_old_one_keeps_serving() -> Result<()> {
    let mut w = World::new()?;
    w.backend("a", "127.10.6.1:8080")?;
    let good = r#"
services:
  - name: steady
    vips: [127.210.6.1]
    ports: [{number: 80, targetPort: 8080}]
    endpoints: [{address: 127.10.6.1}]
"#;
    w.write_config(good)?;
    w.start_agent()?;
    let before = w.agent().services_json()?;
    w.write_config(
        r#"
services:
  - name: steady
    vips: [127.210.6.1]
    ports: [{number: 80, targetPort: 8080}]
    endpoints:
      - address: 127.10.6.300
"#,
    )?;
    w.agent().reload()?;
    let deadline = std::time::Instant::now() + CHECK_TIMEOUT;
    while !w.log().contains("configuration rejected") {
        ensure!(
            std::time::Instant::now() < deadline,
            "no rejection logged:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = w.log();
    let line = log
        .lines()
        .find(|l| l.contains("configuration rejected"))
        .unwrap_or_default();
    ensure!(
        line.contains("services[0].endpoints[0].address"),
        "field not named: {line}"
    );
    ensure!(line.contains("line 7"), "line not named: {line}");
    ensure!(w.agent().services_json()? == before);
    expect_answers(&w, "127.210.6.1:80", 5, &[("a", 5)])?;

    // A corrected file is picked up by itself (no SIGHUP): the agent watches the file.
    w.backend("b", "127.10.6.2:8080")?;
    w.write_config(&good.replace("127.10.6.1", "127.10.6.2"))?;
    w.wait_endpoints("steady", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.6.2:8080").is_ok_and(|e| e["in_table"] == true)
    })?;
    expect_answers(&w, "127.210.6.1:80", 5, &[("b", 5)])?;
    Ok(())
}

#[test]
fn an_agent_refuses_to_start_on_a_bad_config() -> Result<()> {
    let mut w = World::new()?;
    w.write_config("services:\n  - name: x\n    vips: [127.210.8.1]\n    ports: [{number: 0}]\n")?;
    let err = w
        .start_agent()
        .err()
        .ok_or_else(|| anyhow::anyhow!("agent started"))?;
    let msg = format!("{err:#}");
    ensure!(msg.contains("services[0].ports[0].number"), "{msg}");
    ensure!(
        w.pins.pinned()?.is_empty(),
        "nothing should be attached: {:?}",
        w.pins.pinned()?
    );
    Ok(())
}

#[test]
fn demo_scenario_fails_over_to_us_west_and_comes_back() -> Result<()> {
    let mut w = World::new()?;
    w.backend("east-a", "127.10.7.1:8080")?;
    w.backend("east-b", "127.10.7.2:8080")?;
    w.backend("west", "127.10.7.3:8080")?;
    w.write_config(&format!(
        r#"
node: {{ locality: us-east1/us-east1-b }}
services:
  - name: mydb
    vips: [127.210.7.1]
    ports: [{{number: 80, name: http}}]
    endpoints:
      - {{address: 127.10.7.1, ports: {{http: 8080}}, locality: us-east1/us-east1-b}}
      - {{address: 127.10.7.2, ports: {{http: 8080}}, locality: us-east1/us-east1-b}}
      - {{address: 127.10.7.3, ports: {{http: 8080}}, locality: us-west/us-west-1a}}
    localityLbSetting: {{failover: [{{from: us-east1, to: us-west}}]}}
    healthCheck: {}
"#,
        health_checks("100ms")
    ))?;
    w.start_agent()?;
    let by = w.answers("127.210.7.1:80", 20)?;
    ensure!(by.keys().all(|k| k.starts_with("east")), "{by:?}");
    let east_a_connects = |w: &mut World| -> Result<u64> {
        let eps = w.agent().endpoints_json(Some("mydb"))?;
        Ok(endpoint(&eps, "127.10.7.1:8080")?["connects"]
            .as_u64()
            .unwrap_or(0))
    };
    let before_failover = east_a_connects(&mut w)?;

    w.stop_backend("east-a");
    w.stop_backend("east-b");
    // With gradual spill us-west joins the table as soon as one us-east1 backend is out;
    // failover is complete when both are.
    let eps = w.wait_endpoints("mydb", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.7.3:8080").is_ok_and(|e| e["in_table"] == true)
            && ["127.10.7.1:8080", "127.10.7.2:8080"]
                .iter()
                .all(|a| endpoint(eps, a).is_ok_and(|e| e["in_table"] == false))
    })?;
    ensure!(
        endpoint(&eps, "127.10.7.1:8080")?["health"] == "UNHEALTHY",
        "{eps:#}"
    );
    ensure!(w.agent().services_json()?[0]["tier"] == "failover[0]:us-west");
    expect_answers(&w, "127.210.7.1:80", 10, &[("west", 10)])?;

    w.start_backend("east-a")?;
    w.start_backend("east-b")?;
    w.wait_endpoints("mydb", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.7.3:8080").is_ok_and(|e| e["in_table"] == false)
    })?;
    let by = w.answers("127.210.7.1:80", 20)?;
    ensure!(by.keys().all(|k| k.starts_with("east")), "{by:?}");
    // Out of the table and back: the endpoint's counters carried on.
    let after_return = east_a_connects(&mut w)?;
    ensure!(
        after_return >= before_failover + u64::from(by.get("east-a").copied().unwrap_or(0)),
        "east-a connects went from {before_failover} to {after_return}"
    );

    // Everything down: panic mode keeps every endpoint in the table rather than none.
    for b in ["east-a", "east-b", "west"] {
        w.stop_backend(b);
    }
    w.wait_endpoints("mydb", CHECK_TIMEOUT, |eps| {
        eps.as_array().is_some_and(|a| {
            a.iter()
                .all(|e| e["health"] == "UNHEALTHY" && e["in_table"] == true)
        })
    })?;
    ensure!(w.agent().services_json()?[0]["tier"] == "panic");
    Ok(())
}

#[test]
fn an_http_check_takes_a_backend_answering_503_out_and_puts_it_back() -> Result<()> {
    let mut w = World::new()?;
    w.backend("primary", "127.10.9.1:8080")?;
    w.backend("standby", "127.10.9.2:8080")?;
    w.write_config(
        r#"
node: { locality: us-east1/us-east1-b }
services:
  - name: checked
    vips: [127.210.9.1]
    ports: [{number: 80, targetPort: 8080}]
    endpoints:
      - {address: 127.10.9.1, locality: us-east1/us-east1-b}
      - {address: 127.10.9.2, locality: us-west/us-west-1a}
    healthCheck:
      interval: 100ms
      timeout: 100ms
      unhealthyThreshold: 2
      healthyThreshold: 2
      http: {path: /healthz, host: checked.example, expectedStatuses: [{start: 200, end: 300}]}
"#,
    )?;
    w.start_agent()?;
    w.wait_endpoints("checked", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.9.1:8080").is_ok_and(|e| e["health"] == "HEALTHY")
    })?;
    expect_answers(&w, "127.210.9.1:80", 5, &[("primary", 5)])?;

    // Up and accepting connections, but failing: a TCP check would not notice.
    w.set_status("primary", 503);
    let eps = w.wait_endpoints("checked", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.9.1:8080").is_ok_and(|e| e["health"] == "UNHEALTHY")
    })?;
    let last_error = &endpoint(&eps, "127.10.9.1:8080")?["last_error"];
    ensure!(
        last_error == "status 503 is not an expected status",
        "{eps:#}"
    );
    expect_answers(&w, "127.210.9.1:80", 5, &[("standby", 5)])?;

    w.set_status("primary", 200);
    w.wait_endpoints("checked", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.9.1:8080").is_ok_and(|e| e["in_table"] == true)
    })?;
    expect_answers(&w, "127.210.9.1:80", 5, &[("primary", 5)])?;
    Ok(())
}

#[test]
fn a_grpc_check_takes_a_not_serving_backend_out_and_puts_it_back() -> Result<()> {
    let mut w = World::new()?;
    let primary = detour_testbed::GrpcHealthBackend::start_at("127.10.10.1:9090".parse()?)?;
    let _standby = detour_testbed::GrpcHealthBackend::start_at("127.10.10.2:9090".parse()?)?;
    w.write_config(
        r#"
node: { locality: us-east1/us-east1-b }
services:
  - name: rpc
    vips: [127.210.10.1]
    ports: [{number: 9090, name: grpc}]
    endpoints:
      - {address: 127.10.10.1, locality: us-east1/us-east1-b}
      - {address: 127.10.10.2, locality: us-west/us-west-1a}
    healthCheck:
      interval: 100ms
      timeout: 100ms
      unhealthyThreshold: 1
      healthyThreshold: 1
      grpc: {serviceName: rpc.v1}
"#,
    )?;
    w.start_agent()?;
    w.wait_endpoints("rpc", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.10.1:9090")
            .is_ok_and(|e| e["health"] == "HEALTHY" && e["in_table"] == true)
    })?;
    primary.set_serving(false);
    let eps = w.wait_endpoints("rpc", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.10.1:9090").is_ok_and(|e| e["health"] == "UNHEALTHY")
    })?;
    ensure!(
        endpoint(&eps, "127.10.10.1:9090")?["last_error"] == "service reports NOT_SERVING",
        "{eps:#}"
    );
    ensure!(
        endpoint(&eps, "127.10.10.2:9090")?["in_table"] == true,
        "{eps:#}"
    );
    ensure!(
        w.agent().services_json()?[0]["tier"] == "other",
        "{:#}",
        w.agent().services_json()?
    );
    primary.set_serving(true);
    w.wait_endpoints("rpc", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.10.1:9090").is_ok_and(|e| e["in_table"] == true)
            && endpoint(eps, "127.10.10.2:9090").is_ok_and(|e| e["in_table"] == false)
    })?;
    Ok(())
}

#[test]
fn failover_priority_prefers_the_endpoints_that_share_the_nodes_labels() -> Result<()> {
    let mut w = World::new()?;
    w.backend("same-zone-other-team", "127.10.19.1:8080")?;
    w.backend("other-zone-same-team", "127.10.19.2:8080")?;
    w.backend("other-region-same-team", "127.10.19.3:8080")?;
    w.write_config(&format!(
        r#"
node:
  locality: us-east1/us-east1-b
  labels: {{team: payments}}
services:
  - name: labelled
    vips: [127.210.19.1]
    ports: [{{number: 80, targetPort: 8080}}]
    localityLbSetting:
      spill: strict
      failoverPriority: [topology.kubernetes.io/region, team]
    endpoints:
      - {{address: 127.10.19.1, locality: us-east1/us-east1-b, labels: {{team: search}}}}
      - {{address: 127.10.19.2, locality: us-east1/us-east1-c, labels: {{team: payments}}}}
      - {{address: 127.10.19.3, locality: us-west/us-west-1a, labels: {{team: payments}}}}
    healthCheck: {}
"#,
        health_checks("100ms")
    ))?;
    w.start_agent()?;
    // Region and team match: it serves, though another endpoint is in the node's zone.
    w.wait_endpoints("labelled", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.19.2:8080").is_ok_and(|e| e["in_table"] == true)
    })?;
    expect_answers(&w, "127.210.19.1:80", 10, &[("other-zone-same-team", 10)])?;
    // Gone: the next level is the region alone (the team is not looked at once the
    // region differs, so the other region's same team comes last).
    w.stop_backend("other-zone-same-team");
    w.wait_endpoints("labelled", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.19.1:8080").is_ok_and(|e| e["in_table"] == true)
    })?;
    expect_answers(&w, "127.210.19.1:80", 10, &[("same-zone-other-team", 10)])?;
    w.stop_backend("same-zone-other-team");
    w.wait_endpoints("labelled", CHECK_TIMEOUT, |eps| {
        endpoint(eps, "127.10.19.3:8080").is_ok_and(|e| e["in_table"] == true)
    })?;
    expect_answers(&w, "127.210.19.1:80", 10, &[("other-region-same-team", 10)])?;
    Ok(())
}

#[test]
fn a_tier_under_min_health_percent_serves_all_of_its_endpoints() -> Result<()> {
    let mut w = World::new()?;
    let backends = [
        ("a", "127.10.23.1:8080"),
        ("b", "127.10.23.2:8080"),
        ("c", "127.10.23.3:8080"),
        ("d", "127.10.23.4:8080"),
    ];
    for (name, addr) in backends {
        w.backend(name, addr)?;
    }
    w.write_config(
        r#"
node: { locality: us-east1/us-east1-b }
services:
  - name: thin
    vips: [127.210.23.1]
    ports: [{number: 80, targetPort: 8080}]
    endpoints:
      - {address: 127.10.23.1, locality: us-east1/us-east1-b}
      - {address: 127.10.23.2, locality: us-east1/us-east1-b}
      - {address: 127.10.23.3, locality: us-east1/us-east1-b}
      - {address: 127.10.23.4, locality: us-east1/us-east1-b}
    healthCheck:
      interval: 100ms
      timeout: 100ms
      unhealthyThreshold: 1
      healthyThreshold: 1
      http: {path: /healthz}
    outlierDetection: {minHealthPercent: 50}
"#,
    )?;
    w.start_agent()?;
    let health_is = |eps: &serde_json::Value, addr: &str, health: &str, in_table: bool| {
        endpoint(eps, addr).is_ok_and(|e| e["health"] == health && e["in_table"] == in_table)
    };
    w.wait_endpoints("thin", CHECK_TIMEOUT, |eps| {
        backends
            .iter()
            .all(|(_, addr)| health_is(eps, addr, "HEALTHY", true))
    })?;

    // Three of four failing their checks: 25% usable is under 50% and there is no other
    // tier to take the traffic, so every endpoint serves, as in Envoy's panic mode.
    for (name, _) in &backends[1..] {
        w.set_status(name, 503);
    }
    w.wait_endpoints("thin", CHECK_TIMEOUT, |eps| {
        health_is(eps, "127.10.23.1:8080", "HEALTHY", true)
            && backends[1..]
                .iter()
                .all(|(_, addr)| health_is(eps, addr, "UNHEALTHY", true))
    })?;
    // 200 uniform picks of 4 miss one with probability 4 × 0.75^200 < 1e-24.
    let seen = w.answers("127.210.23.1:80", 200)?;
    ensure!(
        seen.keys().map(String::as_str).eq(["a", "b", "c", "d"]),
        "in panic every endpoint answers: {seen:?}"
    );

    // Two of four: 50% is not under 50%, so only the healthy ones serve again.
    w.set_status("c", 200);
    w.wait_endpoints("thin", CHECK_TIMEOUT, |eps| {
        health_is(eps, "127.10.23.3:8080", "HEALTHY", true)
            && health_is(eps, "127.10.23.2:8080", "UNHEALTHY", false)
            && health_is(eps, "127.10.23.4:8080", "UNHEALTHY", false)
    })?;
    let seen = w.answers("127.210.23.1:80", 200)?;
    ensure!(
        seen.keys().map(String::as_str).eq(["a", "c"]),
        "out of panic only the healthy endpoints answer: {seen:?}"
    );
    Ok(())
}
