//! Fixtures for detour's privileged end-to-end tests, `cargo xtask demo` and
//! `cargo xtask bench`.
//!
//! Every fixture that touches the machine is a guard: it creates something uniquely named
//! (a child cgroup, a bpffs pin directory, a network namespace, a listening socket, an
//! agent process) and its `Drop` removes it again, pass or fail, within a bounded time.
//! Invariants the guards keep, following the project's rules for kernel tests:
//! - nothing is ever attached to, or created as, the machine's root cgroup — only children
//!   of the cgroup v2 mount point;
//! - names carry the process id and a per-process counter, so concurrent tests and a
//!   leftover from a crashed run never collide;
//! - every wait (a child exiting, a cgroup emptying, an `ip` command) has a deadline, so a
//!   broken kernel or agent fails a test instead of hanging it.
//!
//! [`demo`] is the failover demo itself, so that `cargo xtask demo` and the end-to-end
//! test that holds it to what it prints run the same code.
//!
//! [`k8s`] starts real Kubernetes control planes (etcd + kube-apiserver per simulated
//! cluster) under the same guard rules.
//!
//! Fixtures that need root say so: [`require_root`] fails with a clear message, it never
//! skips silently.

mod acceptor;
mod agent;
mod bed;
mod blackhole;
mod cgroup;
pub mod demo;
mod dns;
mod echo;
mod eventually;
mod grpc;
mod http;
pub mod k8s;
mod lines;
mod mountns;
mod netns;
mod pindir;
mod process;
mod tempdir;
mod tls;

pub use agent::{Agent, AgentOptions};
pub use bed::AgentBed;
pub use blackhole::BlackHole;
pub use cgroup::Cgroup;
pub use dns::DnsServer;
pub use echo::{echo_exchange, EchoBackend};
pub use eventually::eventually;
pub use grpc::GrpcHealthBackend;
pub use http::{http_get, http_request, http_request_on, HttpBackend, HttpResponse};
pub use lines::{mono_ns, LineStream};
pub use mountns::use_resolv_conf;
pub use netns::{Netns, Veth};
pub use pindir::{ensure_bpffs_mounted, PinDir, BPFFS_MOUNT};
pub use process::{output_with_timeout, wait_with_timeout, write_executable};
pub use tempdir::TempDir;
pub use tls::{ServerCert, TestCa, TlsBackend};

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Result};

/// Prefix of every machine-wide name the testbed creates (cgroups, pin directories,
/// network namespaces), so leftovers are easy to recognise.
pub const NAME_PREFIX: &str = "detour-test";

/// A name no other fixture of this machine uses right now: `detour-test-<pid>-<n>`.
///
/// The pid makes it unique across concurrent processes, the counter within one.
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}-{}-{n}", std::process::id())
}

/// Creates a fresh directory `parent/<unique_name()>` and returns its path.
///
/// A name left behind by a crashed run whose pid has been reused is skipped, never
/// reused: the directory returned was created by this call.
pub(crate) fn create_unique_dir(parent: &std::path::Path) -> Result<std::path::PathBuf> {
    create_dir_named(parent, unique_name)
}

fn create_dir_named(
    parent: &std::path::Path,
    mut name: impl FnMut() -> String,
) -> Result<std::path::PathBuf> {
    let mut last_err = None;
    for _ in 0..16 {
        let path = parent.join(name());
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("creating {}", path.display())))
            }
        }
    }
    Err(
        anyhow::Error::new(last_err.expect("the loop ran")).context(format!(
            "no free {NAME_PREFIX}-* name in {}",
            parent.display()
        )),
    )
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with a message naming `what` unless this process is root.
///
/// Privileged tests call this first so that running them unprivileged is a loud failure,
/// never a silent skip.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN): run it as root, \
             e.g. through `cargo xtask test`"
        );
    }
    Ok(())
}

/// The mount point of a filesystem of type `fstype`, read from `/proc/mounts`.
pub(crate) fn mount_point_of(fstype: &str) -> Result<Option<std::path::PathBuf>> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    Ok(mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| unescape_mount_path(target).into())
    }))
}

/// Undoes the octal escapes (`\040` for a space) `/proc/mounts` uses in paths.
fn unescape_mount_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        match escaped.and_then(|oct| u8::from_str_radix(std::str::from_utf8(oct).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_carry_the_prefix() {
        let (a, b) = (unique_name(), unique_name());
        assert_ne!(a, b);
        assert!(a.starts_with("detour-test-"));
    }

    #[test]
    fn unique_dirs_skip_leftovers() {
        let parent = TempDir::new().unwrap();
        std::fs::create_dir(parent.join("leftover")).unwrap();
        let mut names = ["leftover", "fresh"].into_iter().map(String::from);
        let made = create_dir_named(parent.path(), || names.next().unwrap()).unwrap();
        assert_eq!(made, parent.join("fresh"));
        let a = create_unique_dir(parent.path()).unwrap();
        let b = create_unique_dir(parent.path()).unwrap();
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/sys/fs/bpf"), "/sys/fs/bpf");
        assert_eq!(unescape_mount_path(r"/x\"), r"/x\");
    }

    #[test]
    fn finds_proc_mount() {
        assert_eq!(
            mount_point_of("proc").unwrap().as_deref(),
            Some(std::path::Path::new("/proc"))
        );
    }
}
