//! Builds detour's eBPF object (crate `detour-ebpf`, target bpfel-unknown-none, nightly)
//! into OUT_DIR so the agent can embed it. Needs `bpf-linker` and the nightly toolchain
//! with `rust-src`: `cargo xtask setup` installs both.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{manifest_dir}/../ebpf");
    // aya-build replays the nested cargo's stderr as build warnings; without this every
    // "Compiling ..." line of the eBPF build would show up as a warning. Errors still do.
    std::env::set_var("CARGO_TERM_QUIET", "true");
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
