//! `cargo xtask crd`: writes the CustomResourceDefinitions generated from the agent's
//! types into `deploy/crds/` (kube-rs / controller-rs style).
//!
//! The agent's `crdgen` binary renders them; this task only runs it and writes the file,
//! so xtask never links the agent (whose build needs bpf-linker, which `cargo xtask
//! setup` installs). The agent's unit test `deploy_holds_the_crd_these_types_generate`
//! fails while the file differs from what `crdgen` prints.
//!
//! Invariant: the file is replaced whole (written beside it, then renamed), so a failed
//! or interrupted run never leaves a truncated CRD behind.

use std::fs;

use anyhow::{bail, Context as _, Result};

use crate::cmd;

/// Where the FailoverService CRD lives, relative to the workspace root.
const FAILOVER_SERVICE: &str = "deploy/crds/failoverservice.yaml";

pub fn run() -> Result<()> {
    let mut crdgen = cmd::cargo();
    crdgen.args(["run", "--quiet", "-p", "detour-agent", "--bin", "crdgen"]);
    eprintln!("$ {}", cmd::display(&crdgen));
    let output = crdgen
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", cmd::display(&crdgen)))?;
    if !output.status.success() {
        bail!("`{}` failed: {}", cmd::display(&crdgen), output.status);
    }
    if output.stdout.is_empty() {
        bail!("`{}` printed nothing", cmd::display(&crdgen));
    }
    let path = cmd::workspace_root().join(FAILOVER_SERVICE);
    let unchanged = fs::read(&path).is_ok_and(|old| old == output.stdout);
    if unchanged {
        eprintln!("{FAILOVER_SERVICE} is up to date");
        return Ok(());
    }
    let dir = path.parent().expect("the CRD path has a directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let staging = path.with_extension("yaml.tmp");
    fs::write(&staging, &output.stdout)
        .with_context(|| format!("writing {}", staging.display()))?;
    fs::rename(&staging, &path)
        .with_context(|| format!("renaming {} to {}", staging.display(), path.display()))?;
    eprintln!("wrote {FAILOVER_SERVICE}");
    Ok(())
}
