//! `cargo xtask`: detour's developer tasks — machine setup, the eBPF build, the full test
//! gate, a failover demo, a `connect()` benchmark and a failover benchmark against HAProxy.
//!
//! Everything that changes the machine (installs, bpffs, cgroups, pins, the agent) goes
//! through `setup` or through `detour-testbed` guards, so every task either leaves the
//! machine as it found it (demo, bench, bench-failover) or only adds what is missing
//! (setup, and bench-failover's Debian `haproxy` package).
//! The hidden `demo-client`, `bench-client` and `failover-client` subcommands are this
//! same binary re-executed inside a test cgroup, so their connects are the ones detour's
//! programs see.

mod bench;
mod cmd;
mod demo;
mod failover;
mod fuzz;
mod setup;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "detour developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing detour needs (idempotent; needs root).
    Setup,
    /// Build the eBPF object into target/bpfel-unknown-none/release/detour.
    BuildEbpf,
    /// Setup, rustfmt check, clippy -D warnings, then every test (privileged ones too).
    Test {
        /// Passed to `cargo test` after its own `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Re-enact Istio's "failover for external services" example with a real agent.
    Demo,
    /// Benchmark connect() through a VIP against direct connects.
    Bench(bench::BenchArgs),
    /// Measure failover (refused, black-holed backend) and the request path against HAProxy.
    BenchFailover(failover::FailoverArgs),
    /// Fuzz the parsers of outside bytes with libFuzzer, `--time` seconds per target.
    Fuzz(fuzz::FuzzArgs),
    /// The demo's HTTP client, run inside the demo cgroup.
    #[command(hide = true)]
    DemoClient(demo::ClientArgs),
    /// The benchmark's connect loop, run inside the bench cgroup.
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
    /// The failover benchmark's HTTP load, run inside the bench cgroup.
    #[command(hide = true)]
    FailoverClient(failover::ClientArgs),
}

fn main() -> ExitCode {
    // `{:#}` prints the cause chain; anyhow's Debug would add a backtrace whenever
    // RUST_BACKTRACE is set, burying the one line that says what to do.
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => cmd::build_ebpf(),
        Task::Test { args } => test(&args),
        Task::Demo => demo::run(),
        Task::Bench(args) => bench::run(&args),
        Task::BenchFailover(args) => failover::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::DemoClient(args) => demo::client(&args),
        Task::BenchClient(args) => bench::client(&args),
        Task::FailoverClient(args) => failover::client(&args),
    }
}

/// The gate CI runs: any failing step fails the task.
fn test(extra: &[String]) -> Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))?;
    cmd::run(cmd::cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let totals = cmd::run_cargo_test(
        cmd::cargo()
            .args(["test", "--workspace"])
            .args((!extra.is_empty()).then_some("--"))
            .args(extra),
    )?;
    // cargo's own last line is the last crate's (often doc tests: "0 passed"); this one
    // tells the whole run at a glance.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if totals.passed == 0 {
        anyhow::bail!("cargo test ran no test");
    }
    Ok(())
}

/// Parses "100ms", "1s" for clap.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}
