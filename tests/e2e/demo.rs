//! The demo, end to end: `cargo xtask demo`'s own scenario ([`detour_testbed::demo`])
//! with this build's agent, its client re-executed from this test binary. The test holds
//! the demo to what it prints: one client ran across the failure and the return, traffic
//! moved to us-west and came back, and the timeline says so in that order.

use anyhow::{ensure, Context, Result};
use detour_testbed::demo;

/// The client's arguments ([`demo::ClientArgs::to_args`]) as a JSON array.
const CLIENT_ENV: &str = "DETOUR_E2E_DEMO_CLIENT";

/// Entry point of the re-executed test binary: the demo's client.
#[test]
#[ignore = "helper process: the demo test runs it inside its cgroup"]
fn demo_client_process() {
    let args = std::env::var(CLIENT_ENV).expect("run by the demo test with arguments");
    let args: Vec<String> = serde_json::from_str(&args).expect("a JSON array of arguments");
    let args = demo::ClientArgs::parse(&args).expect("the demo's client arguments");
    demo::client(&args, &mut std::io::stdout().lock()).expect("the client runs");
}

#[test]
fn the_demo_fails_over_under_load_and_shows_what_the_client_saw() -> Result<()> {
    let client = |args: &demo::ClientArgs| {
        let mut command =
            crate::client::helper("demo::demo_client_process").expect("the test binary");
        command.env(
            CLIENT_ENV,
            serde_json::to_string(&args.to_args()).expect("strings serialize"),
        );
        command
    };
    let mut printed = Vec::new();
    let report = demo::run(env!("CARGO_BIN_EXE_detour").into(), client, &mut printed)?;
    let printed = String::from_utf8(printed)?;
    let timeline = report.timeline();
    eprintln!("{printed}\n{timeline}\n{}", report.summary());
    report
        .verdict()
        .map_err(anyhow::Error::msg)
        .context("the demo's verdict")?;

    // The timeline shows requests on both sides of each change: us-east1 answering
    // before the stop, us-west after it, us-east1 again after the restart.
    let lines: Vec<&str> = timeline.lines().collect();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .with_context(|| format!("no {needle:?} in the timeline:\n{timeline}"))
    };
    let (stopped, restarted) = (
        at("-- stopped the us-east1 backends")?,
        at("-- started the us-east1 backends")?,
    );
    let answered = |region: &str, range: std::ops::Range<usize>| {
        lines[range]
            .iter()
            .any(|l| l.contains(&format!("200  {region}")))
    };
    ensure!(
        answered("us-east1", 0..stopped)
            && answered("us-west", stopped..restarted)
            && answered("us-east1", restarted..lines.len()),
        "the client's requests do not cross the failure and the return:\n{timeline}"
    );
    ensure!(
        timeline.contains("traffic moved to us-west at")
            && timeline.contains("traffic back in us-east1 at"),
        "{timeline}"
    );
    // The agent's own view while us-east1 was down, as the demo printed it.
    ensure!(
        printed.matches("$ detour endpoints mydb").count() == 3 && printed.contains("UNHEALTHY"),
        "{printed}"
    );
    Ok(())
}
