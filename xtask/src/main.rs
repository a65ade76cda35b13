//! `cargo xtask`: detour's developer tasks — machine setup, the eBPF build, the CRDs in
//! `deploy/crds/`, the full test gate, a failover demo, a `connect()` benchmark, a
//! failover benchmark against HAProxy, how fast a change reaches connects from the
//! config file (`bench-reload`) and from a real Kubernetes API server
//! (`bench-kubernetes`, which reuses `reload-client`), what the TLS originator's hop
//! costs against a direct TLS client (`bench-tls`), and what SYN steering does for the
//! requests a black-holed or refusing backend stalls or fails (`bench-steer`, which reuses
//! `failover-client`).
//!
//! Everything that changes the machine (installs, bpffs, cgroups, pins, the agent) goes
//! through `setup` or through `detour-testbed` guards, so every task either leaves the
//! machine as it found it (demo, bench, bench-failover) or only adds what is missing
//! (setup, and bench-failover's Debian `haproxy` package).
//! The hidden `demo-client`, `bench-client` and `failover-client` subcommands are this
//! same binary re-executed inside a test cgroup, so their connects are the ones detour's
//! programs see; `bench-tls-client` (in the cgroup) and `bench-tls-server` are a release
//! build of it, so their TLS costs what the agent's does.

mod bench;
mod bench_kubernetes;
mod bench_reload;
mod bench_steer;
mod bench_tls;
mod cmd;
#[cfg(test)]
mod config_view;
mod crd;
mod demo;
mod failover;
mod fuzz;
mod k8s_assets;
mod kernels;
mod setup;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
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
    /// Write the CRDs generated from the agent's types into deploy/crds/.
    Crd,
    /// Setup, rustfmt check, clippy -D warnings, then every test (privileged ones too).
    Test {
        /// Run the tests this many times in a row (fmt and clippy once); any failing run
        /// fails the task. For finding flaky tests: `cargo xtask test --repeat 20`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        /// Skip the kernel matrix (`cargo xtask test-kernels`, the end-to-end suite on
        /// Debian's 5.10, 6.1 and 6.12 under qemu: about half an hour under emulation)
        /// for a quick local run. CI never skips it.
        #[arg(long)]
        skip_kernels: bool,
        /// Passed to `cargo test` after its own `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the privileged end-to-end suite on Debian's 5.10, 6.1 and 6.12 kernels under
    /// qemu (fetched once into target/kernels/).
    TestKernels(kernels::KernelArgs),
    /// Re-enact Istio's "failover for external services" example with a real agent.
    Demo,
    /// Benchmark connect() through a VIP against direct connects.
    Bench(bench::BenchArgs),
    /// Measure failover (refused, black-holed backend) and the request path against HAProxy.
    BenchFailover(failover::FailoverArgs),
    /// Measure a one-service edit of the config file reaching connects, and agent memory.
    BenchReload(bench_reload::ReloadArgs),
    /// Measure an EndpointSlice change reaching connects, agent memory and CPU, with
    /// 10,000 FailoverServices on a real control plane.
    BenchKubernetes(bench_kubernetes::KubernetesArgs),
    /// Measure the TLS originator's hop (new connections, keep-alive requests, bulk
    /// throughput) against a client that speaks TLS to the backend itself.
    BenchTls(bench_tls::TlsArgs),
    /// Measure SYN steering: requests to a black-holed backend with steering on and off.
    BenchSteer(bench_steer::SteerArgs),
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
    /// The reload benchmark's connect loop, run inside the bench cgroup.
    #[command(hide = true)]
    ReloadClient(bench_reload::ReloadClientArgs),
    /// The TLS benchmark's client (direct TLS and via the VIP), run inside its cgroup.
    #[command(hide = true)]
    BenchTlsClient(bench_tls::TlsClientArgs),
    /// The TLS benchmark's HTTPS backend.
    #[command(hide = true)]
    BenchTlsServer(bench_tls::TlsServerArgs),
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
        Task::Crd => crd::run(),
        Task::Test {
            repeat,
            skip_kernels,
            args,
        } => test(repeat, skip_kernels, &args),
        Task::TestKernels(args) => kernels::run(&args),
        Task::Demo => demo::run(),
        Task::Bench(args) => bench::run(&args),
        Task::BenchFailover(args) => failover::run(&args),
        Task::BenchReload(args) => bench_reload::run(&args),
        Task::BenchKubernetes(args) => bench_kubernetes::run(&args),
        Task::BenchTls(args) => bench_tls::run(&args),
        Task::BenchSteer(args) => bench_steer::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::DemoClient(args) => demo::client(&args),
        Task::BenchClient(args) => bench::client(&args),
        Task::FailoverClient(args) => failover::client(&args),
        Task::ReloadClient(args) => bench_reload::client(&args),
        Task::BenchTlsClient(args) => bench_tls::client(&args),
        Task::BenchTlsServer(args) => bench_tls::server(&args),
    }
}

/// The gate CI runs: any failing step fails the task.
fn test(repeat: u32, skip_kernels: bool, extra: &[String]) -> Result<()> {
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
    // The upgrade tests' second agent build (tests/e2e/upgrade.rs builds it the same way
    // if it is missing). Built here, before the tests run, so that its compile does not
    // compete with the timing-sensitive tests for the CPUs.
    cmd::run(
        cmd::cargo()
            .args(["build", "-p", "detour-agent", "--bin", "detour"])
            .env(
                "CARGO_TARGET_DIR",
                cmd::target_dir().join("upgrade-variant"),
            )
            .env("DETOUR_EBPF_VARIANT", "1"),
    )?;
    // The Kubernetes tests' control-plane binaries (envtest's KUBEBUILDER_ASSETS).
    let k8s_assets = k8s_assets::prepare()?;
    for run in 1..=repeat {
        let totals = cmd::run_cargo_test(
            cmd::cargo()
                .args(["test", "--workspace"])
                .envs(
                    k8s_assets
                        .iter()
                        .map(|dir| (detour_testbed::k8s::ASSETS_ENV, dir)),
                )
                .args((!extra.is_empty()).then_some("--"))
                .args(extra),
        )
        .with_context(|| format!("test run {run} of {repeat}"))?;
        // cargo's own last line is the last crate's (often doc tests: "0 passed"); this
        // one tells the whole run at a glance.
        let of = if repeat > 1 {
            format!(" (run {run} of {repeat})")
        } else {
            String::new()
        };
        println!(
            "tests: {} passed, {} failed, {} skipped{of}",
            totals.passed, totals.failed, totals.ignored
        );
        if totals.passed == 0 {
            anyhow::bail!("cargo test ran no test");
        }
    }
    if skip_kernels {
        println!("kernel matrix: skipped (--skip-kernels)");
        return Ok(());
    }
    // The same end-to-end suite against the kernels users run (the test binary takes
    // `extra` as its own arguments, as cargo test passed them to it).
    kernels::run(&kernels::KernelArgs {
        kernels: Vec::new(),
        args: extra.to_vec(),
        refresh: false,
    })
}

/// Parses "100ms", "1s" for clap.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}
