//! Running commands from xtask: where the workspace is, echoing what runs, failing on a
//! non-zero exit, and the two builds other tasks depend on (eBPF object, agent binary).
//!
//! Invariant: every command runs with the workspace root as its working directory, so
//! tasks behave the same from any directory `cargo xtask` is invoked in.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// `cargo` in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// A shell-like rendering of `cmd` for logs.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .map(|a| {
            if a.is_empty() || a.contains([' ', '"', '\'', '$', '\x1f']) {
                format!("{a:?}")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Echoes and runs `cmd` with inherited stdio; fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("running {}", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", display(cmd));
    }
    Ok(())
}

/// Test counts summed over every `test result:` line of a `cargo test` run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestTotals {
    /// Adds `test result: ok. 57 passed; 0 failed; 1 ignored; 0 measured; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Echoes and runs a `cargo test` command, passing its stdout through while counting
/// tests; fails unless it exits successfully.
pub fn run_cargo_test(cmd: &mut Command) -> Result<TestTotals> {
    use std::io::{BufRead, BufReader, Write};

    eprintln!("$ {}", display(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", display(cmd)))?;
    let mut totals = TestTotals::default();
    if let Some(stdout) = child.stdout.take() {
        let mut out = std::io::stdout().lock();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            totals.add_line(&line);
            writeln!(out, "{line}")?;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{}` failed: {status}", display(cmd));
    }
    Ok(totals)
}

/// Runs `cmd` quietly and tells whether it succeeded (false if it cannot even start).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` quietly and returns its stdout, or `None` if it failed.
pub fn stdout_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo xtask build-ebpf`: the same build aya-build does for the agent, into `target/`.
pub fn build_ebpf() -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "+nightly",
        "build",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "--release",
        "-p",
        "detour-ebpf",
        "--bins",
        "--target-dir",
    ])
    .arg(target_dir())
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
    )
    // A RUSTC inherited from an outer cargo would pin the stable compiler.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER");
    run(&mut cmd)?;
    let object = target_dir().join("bpfel-unknown-none/release/detour");
    if !object.is_file() {
        bail!("the build succeeded but {} is missing", object.display());
    }
    eprintln!("eBPF object: {}", object.display());
    Ok(())
}

/// `cargo build --release -p detour-agent`; returns the `detour` binary.
pub fn build_agent() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "detour-agent"]))?;
    let binary = target_dir().join("release/detour");
    if !binary.is_file() {
        bail!("the build succeeded but {} is missing", binary.display());
    }
    Ok(binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let mut cmd = Command::new("cargo");
        cmd.args(["fmt", "--all", "a b", ""]);
        assert_eq!(display(&cmd), r#"cargo fmt --all "a b" """#);
    }

    #[test]
    fn sums_test_result_lines() {
        let mut t = TestTotals::default();
        t.add_line("test result: ok. 57 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.78s");
        t.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("test foo ... ok");
        assert_eq!(
            t,
            TestTotals {
                passed: 60,
                failed: 2,
                ignored: 1
            }
        );
    }

    #[test]
    fn root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }
}
