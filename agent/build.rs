//! Builds detour's eBPF object (crate `detour-ebpf`, target bpfel-unknown-none, nightly)
//! into OUT_DIR so the agent can embed it. Needs `bpf-linker` and the nightly toolchain
//! with `rust-src`: `cargo xtask setup` installs both.
//!
//! `DETOUR_EBPF_VARIANT` (a number, unset in real builds) reaches the eBPF build, whose
//! `option_env!` turns it into a constant the programs write: a build with it set has
//! programs that differ from the default build's (another program tag) and behave the
//! same. The upgrade tests (`tests/e2e/upgrade.rs`) build such a second agent to upgrade
//! to and downgrade from.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{manifest_dir}/../ebpf");
    // aya-build replays the nested cargo's stderr as build warnings; without this every
    // "Compiling ..." line of the eBPF build would show up as a warning. Errors still do.
    std::env::set_var("CARGO_TERM_QUIET", "true");
    // The nested cargo inherits it; the eBPF crate's `option_env!` makes that cargo
    // rebuild the programs when it changes, this line makes the agent embed them anew.
    println!("cargo:rerun-if-env-changed=DETOUR_EBPF_VARIANT");
    aya_build::build_ebpf(
        [Package {
            name: "detour-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs (run `cargo xtask setup` if bpf-linker or nightly is missing)",
    )
}
