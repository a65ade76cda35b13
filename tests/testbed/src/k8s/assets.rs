//! Where the control-plane binaries come from.
//!
//! envtest's convention: the directory named by `KUBEBUILDER_ASSETS` holds `etcd` and
//! `kube-apiserver` (what `setup-envtest use 1.36 -p path` prints). When it is unset, the
//! directory `cargo xtask test` unpacks the repository's copy into (`target/k8s-assets`)
//! is used if it holds them. Otherwise every cluster start fails with [`MISSING_HINT`]:
//! the Kubernetes tests fail loudly, they never skip.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The environment variable naming the directory with the binaries (envtest's name).
pub const ASSETS_ENV: &str = "KUBEBUILDER_ASSETS";

/// What to do when no binaries are found; quoted by every error that says so.
pub const MISSING_HINT: &str = "the Kubernetes tests need real etcd and kube-apiserver \
     binaries: run them through `cargo xtask test` (it unpacks ../shared/k8s and sets \
     KUBEBUILDER_ASSETS), or get envtest's with `setup-envtest use 1.36 -p path` and set \
     KUBEBUILDER_ASSETS to the directory it prints";

/// The binaries every cluster needs.
const REQUIRED: &[&str] = &["etcd", "kube-apiserver"];

/// The directory holding the control-plane binaries, checked to hold `etcd` and
/// `kube-apiserver`.
pub fn assets_dir() -> Result<PathBuf> {
    let unpacked = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/k8s-assets");
    resolve(std::env::var_os(ASSETS_ENV).map(PathBuf::from), &unpacked)
}

/// `assets_dir` with its inputs as arguments, for tests.
fn resolve(from_env: Option<PathBuf>, unpacked: &Path) -> Result<PathBuf> {
    match from_env {
        Some(dir) => {
            let missing = missing_in(&dir);
            if !missing.is_empty() {
                bail!(
                    "{ASSETS_ENV}={} has no executable {}: {MISSING_HINT}",
                    dir.display(),
                    missing.join(", ")
                );
            }
            Ok(dir)
        }
        None if missing_in(unpacked).is_empty() => Ok(unpacked.to_owned()),
        None => bail!("{ASSETS_ENV} is not set: {MISSING_HINT}"),
    }
}

/// The binary `name` in `dir`, or an error saying it is missing and where to get it.
pub(crate) fn binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !is_executable(&path) {
        bail!(
            "{} is missing (envtest's assets carry only etcd, kube-apiserver and \
             kubectl; kube-controller-manager comes with the repository's ../shared/k8s, \
             which `cargo xtask test` unpacks)",
            path.display()
        );
    }
    Ok(path)
}

fn missing_in(dir: &Path) -> Vec<&'static str> {
    REQUIRED
        .iter()
        .copied()
        .filter(|name| !is_executable(&dir.join(name)))
        .collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TempDir;

    fn fake_binaries(dir: &Path, names: &[&str]) {
        use std::os::unix::fs::PermissionsExt;
        for name in names {
            let path = dir.join(name);
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn env_dir_wins_and_must_hold_both_binaries() {
        let env = TempDir::new().unwrap();
        let unpacked = TempDir::new().unwrap();
        fake_binaries(unpacked.path(), REQUIRED);
        fake_binaries(env.path(), &["etcd"]);
        let err = resolve(Some(env.path().into()), unpacked.path()).unwrap_err();
        assert!(
            err.to_string().contains("no executable kube-apiserver"),
            "{err}"
        );
        assert!(err.to_string().contains("setup-envtest use 1.36"), "{err}");
        fake_binaries(env.path(), &["kube-apiserver"]);
        assert_eq!(
            resolve(Some(env.path().into()), unpacked.path()).unwrap(),
            env.path()
        );
    }

    #[test]
    fn unset_env_falls_back_to_the_unpacked_copy_or_fails_with_the_hint() {
        let unpacked = TempDir::new().unwrap();
        let err = resolve(None, unpacked.path()).unwrap_err();
        assert!(
            err.to_string().contains("KUBEBUILDER_ASSETS is not set"),
            "{err}"
        );
        assert!(err.to_string().contains("cargo xtask test"), "{err}");
        fake_binaries(unpacked.path(), REQUIRED);
        assert_eq!(resolve(None, unpacked.path()).unwrap(), unpacked.path());
    }

    #[test]
    fn a_missing_optional_binary_is_named() {
        let dir = TempDir::new().unwrap();
        let err = binary(dir.path(), "kube-controller-manager").unwrap_err();
        assert!(
            err.to_string()
                .contains("kube-controller-manager is missing"),
            "{err}"
        );
    }
}
