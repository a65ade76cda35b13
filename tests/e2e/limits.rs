//! Full maps: the real agent with tiny `--max-services`, `--max-backends` and
//! `--max-slots`. The services past a limit are refused by name (log, `detour services`,
//! metrics) while the ones that fit answer connects; a reload that grows past a limit
//! keeps serving the previous state of what does not fit.
//!
//! Addresses: VIPs 127.210.40.x (nothing listens there, so a VIP the agent did not
//! program refuses the connect), backends 127.10.4N.x, N per test (tests run side by
//! side).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use detour_testbed::{Agent, AgentOptions};
use serde_json::Value;

use crate::world::{World, READY_TIMEOUT};

/// One service: name, VIP, endpoints as (address, weight).
struct Svc<'a> {
    name: &'a str,
    vip: &'a str,
    endpoints: &'a [(&'a str, u32)],
}

fn config(services: &[Svc]) -> String {
    let mut yaml = String::from("services:\n");
    for s in services {
        yaml.push_str(&format!(
            "  - name: {}\n    vips: [{}]\n    ports: [{{number: 80, targetPort: 8080}}]\n    healthCheck: {{disabled: true}}\n    endpoints:\n",
            s.name, s.vip
        ));
        for (address, weight) in s.endpoints {
            yaml.push_str(&format!(
                "      - {{address: {address}, weight: {weight}}}\n"
            ));
        }
    }
    yaml
}

/// Starts backends `b1..=bN` at 127.10.`net`.N:8080 (each answers its name).
fn backends(w: &mut World, net: u8, n: u8) -> Result<()> {
    for i in 1..=n {
        w.backend(&format!("b{i}"), &format!("127.10.{net}.{i}:8080"))?;
    }
    Ok(())
}

fn start_agent_with(w: &mut World, args: &[&str]) -> Result<()> {
    let mut agent = Agent::start_with_args(
        AgentOptions {
            binary: env!("CARGO_BIN_EXE_detour").into(),
            config: w.config_path(),
            cgroup: w.cgroup.path().to_owned(),
            bpffs: w.pins.path().to_owned(),
            socket: w.dir.join("detour.sock"),
            log: w.dir.join("agent.log"),
        },
        args,
    )?;
    agent.wait_ready(READY_TIMEOUT)?;
    w.agent = Some(agent);
    Ok(())
}

/// `detour services -o json`, by service name.
fn services(w: &mut World) -> Result<BTreeMap<String, Value>> {
    let json = w.agent().services_json()?;
    Ok(json
        .as_array()
        .context("services is an array")?
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s.clone(),
            )
        })
        .collect())
}

/// The STATE cell of each service, as the table prints it, by name.
fn states(w: &mut World) -> Result<BTreeMap<String, String>> {
    Ok(services(w)?
        .into_iter()
        .map(|(name, s)| {
            let state = s["state"].as_str().unwrap_or_default().to_string();
            let cell = match s["limit"].as_str() {
                Some(limit) => format!("{state}: {limit}"),
                None => state,
            };
            (name, cell)
        })
        .collect())
}

/// Polls the services' states until they are `want`, bounded in time.
fn wait_states(w: &mut World, want: &[(&str, &str)]) -> Result<()> {
    let want: BTreeMap<String, String> = want
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = states(w)?;
        if got == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "states {got:#?}, want {want:#?}\nlog:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /metrics`: the value of `metric{limit="<limit>"}`.
fn refused_metric(w: &mut World, metric: &str, limit: &str) -> Result<f64> {
    use std::io::{Read, Write};
    let addr = w.agent().metrics_address()?;
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: detour\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let series = format!("{metric}{{limit=\"{limit}\"}} ");
    let line = response
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .with_context(|| format!("no {series} in\n{response}"))?;
    Ok(line.trim().parse()?)
}

/// Every GET through `vip` answered by `backends` (names separated by `|`).
fn answered_by(w: &World, vip: &str, backends: &str) -> Result<()> {
    let got = w.answers(vip, 10)?;
    let allowed: Vec<&str> = backends.split('|').collect();
    ensure!(
        got.keys().all(|b| allowed.contains(&b.as_str())) && got.values().sum::<u32>() == 10,
        "{vip}: answers {got:?}, want all from {backends}\nlog:\n{}",
        w.log()
    );
    Ok(())
}

/// Every GET through `vip` fails: the agent did not program it.
fn not_rewritten(w: &World, vip: &str) -> Result<()> {
    let got = w.answers(vip, 3)?;
    ensure!(
        got.get("ERR") == Some(&3),
        "{vip} should not be served: {got:?}"
    );
    Ok(())
}

/// The agent's warning names the service and the limit.
fn logged_refusal(w: &World, service: &str, limit: &str) -> Result<()> {
    let log = w.log();
    ensure!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("does not fit")
            && l.contains(&format!("service={service} "))
            && l.contains(&format!("limit={limit} "))),
        "no warning naming {service} and {limit}:\n{log}"
    );
    Ok(())
}

/// Three services, each a little bigger than a limit allows for the second one: with
/// `flag` set, the second is refused, the first and third answer.
fn a_limit_refuses_what_does_not_fit(
    flag: &str,
    value: &str,
    services_yaml: &[Svc],
    refused: &str,
    served: &[(&str, &str)],
) -> Result<()> {
    let mut w = World::new()?;
    let net = services_yaml[0].endpoints[0]
        .0
        .split('.')
        .nth(2)
        .unwrap_or_default();
    backends(&mut w, net.parse()?, 6)?;
    w.write_config(&config(services_yaml))?;
    start_agent_with(&mut w, &[&format!("--{flag}"), value])?;
    let state = format!("NOT-PROGRAMMED: {flag} ({value}) reached");
    let mut want: Vec<(&str, &str)> = services_yaml
        .iter()
        .map(|s| (s.name, if s.name == refused { "" } else { "OK" }))
        .collect();
    for entry in &mut want {
        if entry.0 == refused {
            entry.1 = &state;
        }
    }
    wait_states(&mut w, &want)?;
    for (vip, backend) in served {
        answered_by(&w, vip, backend)?;
    }
    let vip = services_yaml
        .iter()
        .find(|s| s.name == refused)
        .map(|s| format!("{}:80", s.vip))
        .context("refused service is configured")?;
    not_rewritten(&w, &vip)?;
    logged_refusal(&w, refused, flag)?;
    ensure!(refused_metric(&mut w, "detour_services_refused", flag)? == 1.0);
    let table = w.agent().cli(&["services"])?;
    ensure!(
        table
            .lines()
            .any(|l| l.starts_with(refused) && l.ends_with(&state)),
        "detour services does not show {refused} as {state}:\n{table}"
    );
    Ok(())
}

#[test]
fn services_past_max_services_are_refused_by_name_and_the_rest_answer() -> Result<()> {
    // The file's order decides: `first` and `second` fit, `third` does not.
    a_limit_refuses_what_does_not_fit(
        "max-services",
        "2",
        &[
            Svc {
                name: "first",
                vip: "127.210.40.3",
                endpoints: &[("127.10.41.1", 1)],
            },
            Svc {
                name: "second",
                vip: "127.210.40.2",
                endpoints: &[("127.10.41.2", 1)],
            },
            Svc {
                name: "third",
                vip: "127.210.40.1",
                endpoints: &[("127.10.41.3", 1)],
            },
        ],
        "third",
        &[("127.210.40.3:80", "b1"), ("127.210.40.2:80", "b2")],
    )
}

#[test]
fn a_service_past_max_backends_is_refused_whole_and_a_later_one_that_fits_answers() -> Result<()> {
    // 3 ids: `wide` takes 2, `wider` needs 2 more and is refused, `narrow` needs 1.
    a_limit_refuses_what_does_not_fit(
        "max-backends",
        "3",
        &[
            Svc {
                name: "wide",
                vip: "127.210.40.11",
                endpoints: &[("127.10.42.1", 1), ("127.10.42.5", 1)],
            },
            Svc {
                name: "wider",
                vip: "127.210.40.12",
                endpoints: &[("127.10.42.2", 1), ("127.10.42.3", 1)],
            },
            Svc {
                name: "narrow",
                vip: "127.210.40.13",
                endpoints: &[("127.10.42.4", 1)],
            },
        ],
        "wider",
        &[("127.210.40.11:80", "b1|b5"), ("127.210.40.13:80", "b4")],
    )
}

#[test]
fn a_table_past_max_slots_is_refused_and_the_others_answer() -> Result<()> {
    // 4 slots: `small` takes 1, `weighted` needs 1 + 3 = 4 and is refused, `tiny` 1.
    a_limit_refuses_what_does_not_fit(
        "max-slots",
        "4",
        &[
            Svc {
                name: "small",
                vip: "127.210.40.21",
                endpoints: &[("127.10.43.1", 1)],
            },
            Svc {
                name: "weighted",
                vip: "127.210.40.22",
                endpoints: &[("127.10.43.2", 1), ("127.10.43.3", 3)],
            },
            Svc {
                name: "tiny",
                vip: "127.210.40.23",
                endpoints: &[("127.10.43.4", 1)],
            },
        ],
        "weighted",
        &[("127.210.40.21:80", "b1"), ("127.210.40.23:80", "b4")],
    )
}

#[test]
fn a_reload_past_the_limits_keeps_serving_the_previous_state() -> Result<()> {
    let mut w = World::new()?;
    backends(&mut w, 40, 5)?;
    let a = "127.210.40.31";
    let b = "127.210.40.32";
    let n = "127.210.40.33";
    w.write_config(&config(&[
        Svc {
            name: "alpha",
            vip: a,
            endpoints: &[("127.10.40.1", 1)],
        },
        Svc {
            name: "beta",
            vip: b,
            endpoints: &[("127.10.40.2", 1)],
        },
    ]))?;
    start_agent_with(&mut w, &["--max-services", "2", "--max-backends", "3"])?;
    wait_states(&mut w, &[("alpha", "OK"), ("beta", "OK")])?;
    let loops = [
        w.connect_loop(&format!("{a}:80"))?,
        w.connect_loop(&format!("{b}:80"))?,
    ];

    // A new service listed first (no service entry left for it), and alpha growing by
    // two backends (one id left for them).
    w.write_config(&config(&[
        Svc {
            name: "newcomer",
            vip: n,
            endpoints: &[("127.10.40.5", 1)],
        },
        Svc {
            name: "alpha",
            vip: a,
            endpoints: &[("127.10.40.1", 1), ("127.10.40.3", 1), ("127.10.40.4", 1)],
        },
        Svc {
            name: "beta",
            vip: b,
            endpoints: &[("127.10.40.2", 1)],
        },
    ]))?;
    wait_states(
        &mut w,
        &[
            ("newcomer", "NOT-PROGRAMMED: max-services (2) reached"),
            ("alpha", "NOT-UPDATED: max-backends (3) reached"),
            ("beta", "OK"),
        ],
    )?;
    // Connects keep flowing for a while on the state that could not be replaced.
    std::thread::sleep(Duration::from_millis(500));
    for (child, stop) in loops {
        let summary = World::finish_loop(child, &stop)?;
        ensure!(
            summary.failed == 0,
            "connects failed across the reload: {summary:?}\nlog:\n{}",
            w.log()
        );
        ensure!(summary.ok > 20, "the loop barely ran: {summary:?}");
    }
    // alpha serves its previous table, whatever the new one says.
    answered_by(&w, &format!("{a}:80"), "b1")?;
    answered_by(&w, &format!("{b}:80"), "b2")?;
    not_rewritten(&w, &format!("{n}:80"))?;
    let alpha = &services(&mut w)?["alpha"];
    ensure!(alpha["in_table"] == 1, "alpha's kernel table: {alpha:#}");
    logged_refusal(&w, "newcomer", "max-services")?;
    ensure!(w.log().lines().any(|l| l.contains("WARN")
        && l.contains("service=alpha ")
        && l.contains("limit=max-backends ")));
    ensure!(refused_metric(&mut w, "detour_services_refused", "max-services")? == 1.0);
    ensure!(refused_metric(&mut w, "detour_services_not_updated", "max-backends")? == 1.0);

    // Removing beta makes room: the newcomer is programmed (alpha, which still needs two
    // ids and finds one, keeps its previous table).
    w.write_config(&config(&[
        Svc {
            name: "newcomer",
            vip: n,
            endpoints: &[("127.10.40.5", 1)],
        },
        Svc {
            name: "alpha",
            vip: a,
            endpoints: &[("127.10.40.1", 1), ("127.10.40.3", 1), ("127.10.40.4", 1)],
        },
    ]))?;
    wait_states(
        &mut w,
        &[
            ("newcomer", "OK"),
            ("alpha", "NOT-UPDATED: max-backends (3) reached"),
        ],
    )?;
    answered_by(&w, &format!("{n}:80"), "b5")?;
    answered_by(&w, &format!("{a}:80"), "b1")?;
    Ok(())
}

#[test]
fn past_the_metrics_backend_limit_only_per_service_series_are_exported() -> Result<()> {
    let mut w = World::new()?;
    backends(&mut w, 48, 3)?;
    w.write_config(&config(&[Svc {
        name: "three",
        vip: "127.210.48.1",
        endpoints: &[("127.10.48.1", 1), ("127.10.48.2", 1), ("127.10.48.3", 1)],
    }]))?;
    start_agent_with(&mut w, &["--metrics-backend-limit", "2"])?;
    answered_by(&w, "127.210.48.1:80", "b1|b2|b3")?;
    let body = crate::passive::scrape(w.agent().metrics_address()?)?;
    let samples: Vec<&str> = body.lines().filter(|l| !l.starts_with('#')).collect();
    // Three backends, a limit of two: none of their series, and the count of them.
    ensure!(
        !samples.iter().any(|l| l.starts_with("detour_backend_")),
        "per-backend series past the limit:\n{body}"
    );
    ensure!(
        samples.contains(&"detour_metrics_backends_omitted 3"),
        "{body}"
    );
    ensure!(
        samples.contains(&r#"detour_service_backends_in_table{service="three"} 3"#),
        "{body}"
    );
    // `detour endpoints` still shows every one.
    let endpoints = w.agent().endpoints_json(None)?;
    ensure!(endpoints.as_array().map(Vec::len) == Some(3), "{endpoints}");
    Ok(())
}
