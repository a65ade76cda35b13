//! `cargo xtask fuzz`: the long run of the fuzz targets in `fuzz/` under libFuzzer
//! (cargo-fuzz, nightly), one target after the other, each for `--time` seconds.
//!
//! Each target's corpus grows in `fuzz/corpus/<target>` (not committed) on top of the
//! committed `fuzz/seeds/<target>`. libFuzzer stops at the first failure and writes the
//! input to `fuzz/artifacts/<target>/`: a panic, an input that runs longer than
//! `-timeout`, or memory past `-rss_limit_mb`/a single allocation past
//! `-malloc_limit_mb` (that needs the address sanitizer, the default) all count. Copy
//! such an input to `fuzz/regressions/<target>/` once it is fixed, so `cargo test`
//! replays it.

use anyhow::{bail, Context, Result};

use crate::cmd;

/// The targets, as `fuzz/Cargo.toml` names their binaries.
const TARGETS: [&str; 5] = [
    "config",
    "api_request",
    "http_status",
    "grpc_response",
    "dns_query",
];

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 60)]
    time: u64,
    /// Targets to run (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
    /// cargo-fuzz's sanitizer: `address` also catches single huge allocations, `none`
    /// runs faster.
    #[arg(long, default_value = "address")]
    sanitizer: String,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    ensure_cargo_fuzz()?;
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let fuzz = cmd::workspace_root().join("fuzz");
    for target in targets {
        let corpus = fuzz.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        cmd::run(
            cmd::cargo()
                .args(["+nightly", "fuzz", "run", "--features", "libfuzzer"])
                .args(["--sanitizer", &args.sanitizer, target])
                .arg(&corpus)
                .arg(fuzz.join("seeds").join(target))
                .arg("--")
                .arg(format!("-max_total_time={}", args.time))
                // A health response, a request line and a config fit; longer inputs
                // only slow the search down.
                .arg("-max_len=8192")
                .arg("-timeout=10")
                .arg("-rss_limit_mb=1024")
                .arg("-malloc_limit_mb=256")
                .arg("-print_final_stats=1"),
        )?;
    }
    Ok(())
}

/// Installs cargo-fuzz unless it is there already.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = cmd::cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    cmd::run(cmd::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    if !cmd::cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        bail!("cargo-fuzz was installed but `cargo fuzz` does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}
