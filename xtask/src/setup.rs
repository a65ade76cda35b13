//! `cargo xtask setup`: install what building and testing detour needs on a fresh machine.
//!
//! Invariants:
//! - idempotent: every step checks first and only installs what is missing, and the
//!   report says for each item whether it was found or installed;
//! - `apt-get update` runs at most once, and only when a package must be installed;
//! - root is required up front (apt, mount), with a clear error otherwise.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, stdout_of, succeeds};

/// Debian packages bpf-linker (LLVM 22), the privileged tests (`ip`) and the kernel
/// matrix (`cargo xtask test-kernels`: qemu, a static busybox for the guests' initramfs,
/// cpio to pack it, xz to unpack modules) need.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
];

/// LLVM 22's prefix; bpf-linker's `llvm-22` feature links against it. The default
/// (LLVM 23) feature does not link on this distribution.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Runs every step, printing what each found or did as it goes.
pub fn run() -> Result<()> {
    detour_testbed::require_root("cargo xtask setup")?;
    let steps: [fn() -> Result<String>; 6] = [
        lint_components,
        nightly,
        rust_src,
        debian_packages,
        bpf_linker,
        bpffs,
    ];
    for step in steps {
        eprintln!("setup: {}", step()?);
    }
    Ok(())
}

fn rustup() -> Command {
    Command::new("rustup")
}

/// rustfmt and clippy for the default toolchain, which `cargo xtask test` runs.
fn lint_components() -> Result<String> {
    let have = |tool: &str| succeeds(Command::new("cargo").args([tool, "--version"]));
    if have("fmt") && have("clippy") {
        return Ok("rustfmt and clippy: present".into());
    }
    cmd::run(rustup().args(["component", "add", "rustfmt", "clippy"]))?;
    Ok("rustfmt and clippy: installed".into())
}

fn nightly() -> Result<String> {
    let toolchains = stdout_of(rustup().args(["toolchain", "list"]))
        .context("`rustup toolchain list` failed: is rustup installed and on PATH?")?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        return Ok("nightly toolchain: present".into());
    }
    cmd::run(rustup().args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    Ok("nightly toolchain: installed".into())
}

fn rust_src() -> Result<String> {
    let installed =
        stdout_of(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))
            .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok("nightly rust-src: present".into());
    }
    cmd::run(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok("nightly rust-src: installed".into())
}

fn package_installed(package: &str) -> bool {
    stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.trim() == "install ok installed")
}

fn debian_packages() -> Result<String> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(format!("Debian packages: present ({})", PACKAGES.join(" ")));
    }
    let apt = || {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    cmd::run(apt().arg("update"))?;
    cmd::run(
        apt()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    Ok(format!("Debian packages: installed {}", missing.join(" ")))
}

fn bpf_linker() -> Result<String> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok("bpf-linker: present".into());
    }
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
    )?;
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails: is ~/.cargo/bin on PATH?"
        );
    }
    Ok("bpf-linker: installed".into())
}

fn bpffs() -> Result<String> {
    Ok(if detour_testbed::ensure_bpffs_mounted()? {
        format!("bpffs: mounted at {}", detour_testbed::BPFFS_MOUNT)
    } else {
        format!("bpffs: already mounted at {}", detour_testbed::BPFFS_MOUNT)
    })
}
