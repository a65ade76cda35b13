//! `cargo xtask demo`: Istio's "failover for external services" example, on this machine.
//!
//! The scenario itself is [`detour_testbed::demo`], shared with the end-to-end test that
//! holds it to what it prints; this task installs what is missing, builds the agent,
//! runs the demo with this binary's hidden `demo-client` as the client, and exits
//! non-zero when the client did not see failover as detour promises it (so the demo
//! doubles as a smoke test of the whole datapath).

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use detour_testbed::demo;

use crate::{cmd, setup};

/// Arguments of the hidden `demo-client` subcommand: [`demo::ClientArgs::to_args`].
#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(num_args = 7, value_names = ["HOST", "PORT", "RESOLV_CONF", "INTERVAL_MS", "TIMEOUT_MS", "MAX_REQUESTS", "STOP_FILE"])]
    args: Vec<String>,
}

/// The client loop, run inside the demo's cgroup.
pub fn client(args: &ClientArgs) -> Result<()> {
    demo::client(
        &demo::ClientArgs::parse(&args.args)?,
        &mut std::io::stdout().lock(),
    )
}

pub fn run() -> Result<()> {
    detour_testbed::require_root("cargo xtask demo")?;
    setup::run()?;
    let binary = cmd::build_agent()?;
    let started = Instant::now();
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let client = |args: &demo::ClientArgs| {
        let mut command = Command::new(&exe);
        command.arg("demo-client").args(args.to_args());
        command
    };
    let report = demo::run(binary, client, &mut std::io::stdout().lock())?;
    println!("\n== What the client saw ==\n{}", report.timeline());
    println!("== Summary ==\n{}", report.summary());
    println!("demo finished in {:.1}s", started.elapsed().as_secs_f64());
    if let Err(why) = report.verdict() {
        bail!("the demo did not behave as failover should: {why}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_view::OneService;
    use detour_agent::config::HealthCheckKind;
    use std::time::Duration;

    #[test]
    fn config_is_the_istio_example() {
        let config = detour_agent::config::parse(demo::CONFIG).expect("the agent accepts it");
        assert_eq!(config.node.locality.to_string(), "us-east1/us-east1-b");
        let one = OneService::of(&config);
        let mydb = one.service;
        // The client's VIP is the service's, and its backends the ones the demo starts,
        // in the regions the demo says.
        assert_eq!(one.vips(), [demo::VIP]);
        assert_eq!(mydb.hosts, [demo::HOST]);
        let started: Vec<(String, String)> = demo::BACKENDS
            .iter()
            .map(|(_, addr, region)| ((*addr).to_owned(), (*region).to_owned()))
            .collect();
        assert_eq!(one.endpoints(|l| l.region.to_string()), started);
        assert_eq!(
            one.failover_rules(),
            [("us-east1".to_owned(), "us-west".to_owned())]
        );
        // Checks every 200 ms that take a backend out on its first failure.
        assert_eq!(
            one.checks(),
            (
                Duration::from_millis(200),
                Duration::from_millis(100),
                1,
                1,
                &HealthCheckKind::Tcp
            )
        );
        let outlier = mydb.outlier_detection.policy.settings();
        assert_eq!(
            (
                outlier.consecutive_failures,
                outlier.interval,
                outlier.base_ejection_time
            ),
            (1, Duration::from_secs(15), Duration::from_secs(60))
        );
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
    }
}
