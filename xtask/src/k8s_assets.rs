//! The real Kubernetes control-plane binaries the Kubernetes tests run (etcd,
//! kube-apiserver, kube-controller-manager), made available to `cargo test` the way
//! envtest does it: `KUBEBUILDER_ASSETS` names the directory holding them.
//!
//! Invariants:
//! - a `KUBEBUILDER_ASSETS` already set (e.g. by `setup-envtest`) is used as it is;
//! - otherwise the repository's copy — `DETOUR_K8S_ASSETS` if set, else `../shared/k8s`
//!   beside the repository, else `/work/shared/k8s` — is unpacked into
//!   `target/k8s-assets` by its own `unpack` script, which keeps binaries whose sha256
//!   already matches `SHA256SUMS` (so a second run only checks sums) and fails on a
//!   mismatch;
//! - when there is neither, one line says that the Kubernetes tests will fail and how to
//!   get the binaries; the tests then fail saying the same. Nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};
use detour_testbed::k8s::ASSETS_ENV;

use crate::cmd;

/// Overrides where the packed binaries (with their `unpack` script) are.
const SOURCE_ENV: &str = "DETOUR_K8S_ASSETS";

/// Makes the binaries available; returns the directory to export as `KUBEBUILDER_ASSETS`
/// to `cargo test`, or `None` when there is nothing to export (already set, or missing).
pub fn prepare() -> Result<Option<PathBuf>> {
    if let Some(dir) = std::env::var_os(ASSETS_ENV).filter(|d| !d.is_empty()) {
        eprintln!(
            "k8s assets: {ASSETS_ENV}={} (from the environment)",
            Path::new(&dir).display()
        );
        return Ok(None);
    }
    let root = cmd::workspace_root();
    let candidates = [
        root.join("../shared/k8s"),
        PathBuf::from("/work/shared/k8s"),
    ];
    let Some(source) = find_source(std::env::var_os(SOURCE_ENV).map(PathBuf::from), &candidates)?
    else {
        eprintln!(
            "k8s assets: NOT FOUND ({ASSETS_ENV} unset, no ../shared/k8s): the Kubernetes \
             tests will fail; get the binaries with `setup-envtest use 1.36 -p path` and set \
             {ASSETS_ENV} to the directory it prints"
        );
        return Ok(None);
    };
    let dest = cmd::target_dir().join("k8s-assets");
    cmd::run(Command::new(source.join("unpack")).arg(&dest))?;
    eprintln!(
        "k8s assets: {ASSETS_ENV}={} (unpacked from {})",
        dest.display(),
        source.display()
    );
    Ok(Some(dest))
}

/// The first directory holding an `unpack` script and its `SHA256SUMS`: the override
/// (which must then hold them), else the first candidate that does.
fn find_source(overridden: Option<PathBuf>, candidates: &[PathBuf]) -> Result<Option<PathBuf>> {
    let usable = |dir: &Path| dir.join("unpack").is_file() && dir.join("SHA256SUMS").is_file();
    if let Some(dir) = overridden {
        if !usable(&dir) {
            bail!(
                "{SOURCE_ENV}={} holds no `unpack` script with its SHA256SUMS",
                dir.display()
            );
        }
        return Ok(Some(dir));
    }
    Ok(candidates.iter().find(|dir| usable(dir)).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_testbed::TempDir;

    fn packed(dir: &TempDir) -> PathBuf {
        std::fs::write(dir.join("unpack"), "#!/bin/sh\n").unwrap();
        std::fs::write(dir.join("SHA256SUMS"), "").unwrap();
        dir.path().to_owned()
    }

    #[test]
    fn the_override_must_hold_the_script() {
        let empty = TempDir::new().unwrap();
        let err = find_source(Some(empty.path().into()), &[]).unwrap_err();
        assert!(err.to_string().contains("DETOUR_K8S_ASSETS="), "{err}");
        let good = TempDir::new().unwrap();
        let other = TempDir::new().unwrap();
        assert_eq!(
            find_source(Some(packed(&good)), &[packed(&other)]).unwrap(),
            Some(good.path().to_owned())
        );
    }

    #[test]
    fn the_first_usable_candidate_wins_and_none_is_not_an_error() {
        let (empty, second, third) = (
            TempDir::new().unwrap(),
            TempDir::new().unwrap(),
            TempDir::new().unwrap(),
        );
        let candidates = [empty.path().to_owned(), packed(&second), packed(&third)];
        assert_eq!(
            find_source(None, &candidates).unwrap(),
            Some(second.path().to_owned())
        );
        assert_eq!(find_source(None, &candidates[..1]).unwrap(), None);
    }
}
