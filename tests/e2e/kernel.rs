//! `detour kernel` on the kernel under test: what the probes find must be what this
//! kernel version offers. Run in the kernel matrix, this checks the probes on 5.10, 6.1,
//! 6.12 and the host's kernel, each against the versions the pieces arrived in.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

#[test]
fn the_kernel_probe_finds_what_this_kernel_version_offers() -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_detour"))
        .args(["kernel", "-o", "json"])
        .output()
        .context("running detour kernel")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "detour kernel refused this kernel: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).context("detour kernel -o json")?;
    let version = report["version"]
        .as_array()
        .context("a kernel version")?
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .collect::<Vec<_>>();
    let pieces = report["pieces"].as_array().context("pieces")?;
    let present = |key: &str| {
        pieces
            .iter()
            .find(|p| p["key"] == key)
            .map(|p| p["present"] == true)
    };
    for p in pieces.iter().filter(|p| p["need"] == "required") {
        ensure!(p["present"] == true, "a required piece is missing: {p}");
    }
    // Every kernel of the matrix is built with CONFIG_INET_DIAG_DESTROY, and tcp_diag is
    // loaded (or built in).
    ensure!(
        present("socket_destroy") == Some(true),
        "socket destruction: {stdout}"
    );
    // tcp_syn_linear_timeouts arrived in 6.5, on by default (4).
    let linear = version.as_slice() >= [6, 5].as_slice();
    ensure!(
        present("syn_linear_timeouts") == Some(linear),
        "linear SYN timeouts on {version:?}: {stdout}"
    );
    // tcx arrived in 6.6; before it, steering attaches as clsact filters.
    let tcx = version.as_slice() >= [6, 6].as_slice();
    ensure!(present("tcx") == Some(tcx), "tcx on {version:?}: {stdout}");
    Ok(())
}
