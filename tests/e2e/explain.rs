//! `detour explain` and `detour services`' SOURCE against a running agent: the reasons a
//! user reads for each endpoint follow what the agent put in the kernel's table.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::world::World;

const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

const VIP: &str = "127.210.70.1:80";

/// Two same-zone backends and one in the node's region, active checks every 100 ms.
const CONFIG: &str = r#"
node: { locality: us-east1/us-east1-b }
services:
  - name: explained
    vips: [127.210.70.1]
    ports: [{number: 80, name: http, targetPort: 8080}]
    healthCheck: {interval: 100ms, timeout: 100ms, unhealthyThreshold: 1, healthyThreshold: 1}
    endpoints:
      - {address: 127.10.70.1, locality: us-east1/us-east1-b}
      - {address: 127.10.70.2, locality: us-east1/us-east1-b}
      - {address: 127.10.70.3, locality: us-east1/us-east1-c}
"#;

/// `detour explain SERVICE -o json`.
fn explain_json(w: &mut World, service: &str) -> Result<Value> {
    let text = w.agent().cli(&["explain", service, "-o", "json"])?;
    serde_json::from_str(&text).with_context(|| format!("explain printed {text:?}"))
}

/// The endpoint `address` of the only frontend.
fn endpoint<'a>(view: &'a Value, address: &str) -> Result<&'a Value> {
    view["frontends"][0]["endpoints"]
        .as_array()
        .context("endpoints is an array")?
        .iter()
        .find(|e| e["address"] == address)
        .with_context(|| format!("no endpoint {address} in {view:#}"))
}

/// Polls `detour explain` until `pred` holds, bounded by [`CHANGE_TIMEOUT`].
fn wait_explain(w: &mut World, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    loop {
        let view = explain_json(w, "explained")?;
        if pred(&view) {
            return Ok(view);
        }
        if Instant::now() > deadline {
            bail!("condition not met within {CHANGE_TIMEOUT:?}; explain now: {view:#}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn explain_says_why_each_endpoint_is_in_the_table_or_not() -> Result<()> {
    let mut w = World::new()?;
    w.backend("zone-1", "127.10.70.1:8080")?;
    w.backend("zone-2", "127.10.70.2:8080")?;
    w.backend("region", "127.10.70.3:8080")?;
    w.write_config(CONFIG)?;
    w.start_agent()?;

    // Every backend up: the zone serves, the region waits.
    let view = wait_explain(&mut w, |v| {
        endpoint(v, "127.10.70.1:8080").is_ok_and(|e| e["health"] == "passing")
            && endpoint(v, "127.10.70.2:8080").is_ok_and(|e| e["health"] == "passing")
    })?;
    ensure!(
        view["port"] == 80 && view["frontends"][0]["frontend"] == VIP,
        "{view:#}"
    );
    ensure!(
        view["origin"]["kind"] == "file"
            && view["origin"]["path"] == w.config_path().display().to_string(),
        "{view:#}"
    );
    for zone in ["127.10.70.1:8080", "127.10.70.2:8080"] {
        let e = endpoint(&view, zone)?;
        ensure!(
            e["verdict"] == "in-table"
                && e["reason"] == "in table: tier same-zone active (100% of new connects)"
                && e["share_percent"] == 50.0,
            "{e:#}"
        );
    }
    let region = endpoint(&view, "127.10.70.3:8080")?;
    ensure!(
        region["verdict"] == "standby"
            && region["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("standby: tier same-region not active")),
        "{region:#}"
    );

    // One zone backend refuses: its check fails, and the region takes the spill (one
    // of two zone backends usable keeps 1.4 × 50% = 70% in the zone).
    w.stop_backend("zone-1");
    let view = wait_explain(&mut w, |v| {
        endpoint(v, "127.10.70.1:8080").is_ok_and(|e| e["health"] == "failing")
    })?;
    let down = endpoint(&view, "127.10.70.1:8080")?;
    let reason = down["reason"].as_str().unwrap_or_default();
    ensure!(
        down["verdict"] == "out"
            && down["in_table"] == false
            && reason.starts_with("not in table: health check failing (")
            && reason.contains("Connection refused"),
        "{down:#}"
    );
    let zone = endpoint(&view, "127.10.70.2:8080")?;
    ensure!(
        zone["reason"] == "in table: tier same-zone active (70% of new connects)"
            && zone["share_percent"] == 70.0,
        "{zone:#}"
    );
    let region = endpoint(&view, "127.10.70.3:8080")?;
    ensure!(
        region["reason"]
            == "in table: tier same-region takes 30% of new connects, spilled from same-zone"
            && region["share_percent"] == 30.0,
        "{region:#}"
    );
    // The same verdicts `detour endpoints` gives: both read the agent's one plan.
    let eps = w.agent().endpoints_json(Some("explained"))?;
    for e in eps.as_array().context("endpoints is an array")? {
        let address = e["address"].as_str().unwrap_or_default();
        ensure!(
            endpoint(&view, address)?["in_table"] == e["in_table"],
            "explain and endpoints disagree on {address}: {view:#} {eps:#}"
        );
    }

    // The table a person reads: one line per endpoint, the reason last.
    let table = w.agent().cli(&["explain", "explained:80"])?;
    let line = table
        .lines()
        .find(|l| l.starts_with("127.10.70.1:8080"))
        .with_context(|| format!("no line for the stopped backend in\n{table}"))?;
    ensure!(
        line.contains(" failing ") && line.contains("not in table: health check failing ("),
        "{table}"
    );
    ensure!(
        table.contains("VIP 127.210.70.1:80: same-zone 70%, same-region 30%;"),
        "{table}"
    );

    // `detour services` names the file the service comes from.
    let services = w.agent().services_json()?;
    ensure!(
        services[0]["origin"]["path"] == w.config_path().display().to_string(),
        "{services:#}"
    );
    let table = w.agent().cli(&["services"])?;
    ensure!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.contains("  SOURCE  ") && h.ends_with("  STATE"))
            && table.contains(&format!("file {}", w.config_path().display())),
        "{table}"
    );
    Ok(())
}

#[test]
fn explain_refuses_what_it_cannot_explain() -> Result<()> {
    let mut w = World::new()?;
    w.backend("zone-1", "127.10.71.1:8080")?;
    w.write_config(
        r#"
services:
  - name: two-ports
    vips: [127.210.71.1]
    ports: [{number: 80, targetPort: 8080}, {number: 81, targetPort: 8080}]
    endpoints: [{address: 127.10.71.1}]
"#,
    )?;
    w.start_agent()?;
    let error = |args: &[&str]| -> Result<String> {
        match w.agent.as_ref().context("agent")?.cli(args) {
            Ok(out) => bail!("{args:?} succeeded: {out}"),
            Err(e) => Ok(format!("{e:#}")),
        }
    };
    let e = error(&["explain", "nosuch"])?;
    ensure!(e.contains("no service named \"nosuch\""), "{e}");
    let e = error(&["explain", "two-ports"])?;
    ensure!(
        e.contains("has ports 80, 81: name one, e.g. `detour explain two-ports:80`"),
        "{e}"
    );
    let e = error(&["explain", "two-ports:82"])?;
    ensure!(e.contains("has no port 82; its ports: 80, 81"), "{e}");
    let one = explain_json(&mut w, "two-ports:81")?;
    ensure!(
        one["port"] == 81 && one["frontends"][0]["frontend"] == "127.210.71.1:81",
        "{one:#}"
    );
    Ok(())
}
