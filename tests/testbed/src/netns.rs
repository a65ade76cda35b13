//! A throw-away network namespace, with veth pairs to the root namespace.
//!
//! Tests that need a backend that is really unreachable (black-holed, link down) build it
//! here, never with an unused outside address. Invariants:
//! - the namespace is uniquely named `detour-test-<pid>-<n>` and deleted on `Drop`, which
//!   also destroys every veth pair with an end inside it;
//! - every `ip` invocation has a deadline.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process::run_checked;

/// Deadline for one `ip` command.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// A uniquely named network namespace (`ip netns add`); deleted on `Drop`.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings its loopback up.
    pub fn new() -> Result<Self> {
        crate::require_root("creating a network namespace")?;
        // Skip names a crashed run left behind (its pid since reused).
        let name = std::iter::repeat_with(crate::unique_name)
            .find(|n| !Path::new("/run/netns").join(n).exists())
            .expect("repeat_with never ends");
        run_checked(Command::new("ip").args(["netns", "add", &name]), IP_TIMEOUT)?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind-mount, usable with `setns(2)`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `program args..` inside the namespace; fails on a non-zero exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run_checked(self.command(program).args(args), IP_TIMEOUT)
    }

    /// Runs `ip -n <ns> args..`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run_checked(
            Command::new("ip").args(["-n", &self.name]).args(args),
            IP_TIMEOUT,
        )
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it creates live there.
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        run_in_netns(&self.path(), f)
    }

    /// Connects the namespace to the root namespace with a veth pair.
    ///
    /// `host_addr` and `ns_addr` are `ip addr` arguments with a prefix length, e.g.
    /// `10.231.0.1/30` and `10.231.0.2/30`; both ends are brought up.
    pub fn veth(&self, host_addr: &str, ns_addr: &str) -> Result<Veth> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Interface names are limited to 15 bytes: "dt" + pid + counter in hex.
        let id = format!(
            "dt{:x}x{:x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let veth = Veth {
            host: format!("{id}h"),
            peer: format!("{id}n"),
            netns: self.name.clone(),
        };
        run_checked(
            Command::new("ip").args([
                "link", "add", &veth.host, "type", "veth", "peer", "name", &veth.peer, "netns",
                &self.name,
            ]),
            IP_TIMEOUT,
        )?;
        // From here on the guard deletes the pair if a later step fails.
        let ip = |args: &[&str]| run_checked(Command::new("ip").args(args), IP_TIMEOUT);
        ip(&["addr", "add", host_addr, "dev", &veth.host])?;
        ip(&["link", "set", &veth.host, "up"])?;
        self.ip(&["addr", "add", ns_addr, "dev", &veth.peer])?;
        self.ip(&["link", "set", &veth.peer, "up"])?;
        Ok(veth)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_checked(
            Command::new("ip").args(["netns", "del", &self.name]),
            IP_TIMEOUT,
        ) {
            eprintln!("detour-testbed: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// One veth pair between the root namespace (`host_name`) and a [`Netns`] (`peer_name`).
///
/// `Drop` deletes the pair (a no-op when the namespace, and with it the pair, is gone).
#[derive(Debug)]
pub struct Veth {
    host: String,
    peer: String,
    netns: String,
}

impl Veth {
    /// The root-namespace end.
    pub fn host_name(&self) -> &str {
        &self.host
    }

    /// The end inside the namespace.
    pub fn peer_name(&self) -> &str {
        &self.peer
    }

    /// Sets the namespace end up or down; down black-holes everything routed over it.
    pub fn set_peer_up(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        run_checked(
            Command::new("ip").args(["-n", &self.netns, "link", "set", &self.peer, state]),
            IP_TIMEOUT,
        )
        .map(drop)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Fails harmlessly when the namespace's deletion already took the pair with it.
        let _ = run_checked(
            Command::new("ip").args(["link", "del", &self.host]),
            IP_TIMEOUT,
        );
    }
}

/// Runs `f` on a fresh thread that has `setns(2)`-ed into the network namespace at `path`.
///
/// Only that thread changes namespace; the caller's stays where it is. Sockets keep the
/// namespace they were created in, so a listener made here can be used from any thread.
pub(crate) fn run_in_netns<R: Send>(path: &Path, f: impl FnOnce() -> R + Send) -> Result<R> {
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `ns` is an open namespace descriptor for the duration of the call.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("setns({})", path.display()));
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{http_get, HttpBackend};

    #[test]
    fn backend_in_namespace_is_reached_over_veth_and_black_holed_when_down() {
        crate::require_root("the netns test").unwrap();
        let ns = Netns::new().unwrap();
        let veth = ns.veth("10.231.7.1/30", "10.231.7.2/30").unwrap();
        let addr = "10.231.7.2:8080".parse().unwrap();
        let _backend = HttpBackend::start_in(&ns, "inside", addr).unwrap();

        let body = http_get(addr, Duration::from_secs(2)).unwrap();
        assert_eq!(body, "inside\n");
        let out = ns
            .exec("ip", &["-o", "link", "show", veth.peer_name()])
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(veth.peer_name()));

        veth.set_peer_up(false).unwrap();
        let start = Instant::now();
        let err = http_get(addr, Duration::from_millis(300)).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2), "{err:#}");

        let name = ns.name().to_owned();
        drop(veth);
        drop(ns);
        let list = run_checked(Command::new("ip").args(["netns", "list"]), IP_TIMEOUT).unwrap();
        assert!(!String::from_utf8_lossy(&list.stdout).contains(&name));
    }
}
