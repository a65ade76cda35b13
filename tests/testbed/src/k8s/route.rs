//! A blackhole route for a cluster's service CIDR, so a connect to a ClusterIP that detour
//! did not rewrite fails on this machine instead of leaving it (the routing table
//! otherwise sends 198.18.0.0/15 to the default gateway).
//!
//! Invariant: the route exists exactly while the guard does; needs root.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::process::run_checked;

const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// `ip route add blackhole CIDR`, removed on `Drop`.
#[derive(Debug)]
pub(crate) struct BlackholeRoute {
    cidr: String,
}

impl BlackholeRoute {
    pub fn add(cidr: &str) -> Result<Self> {
        crate::require_root("a blackhole route for a test cluster's service CIDR")?;
        run_checked(
            Command::new("ip").args(["route", "add", "blackhole", cidr]),
            IP_TIMEOUT,
        )?;
        Ok(Self { cidr: cidr.into() })
    }
}

impl Drop for BlackholeRoute {
    fn drop(&mut self) {
        let del = run_checked(
            Command::new("ip").args(["route", "del", "blackhole", &self.cidr]),
            IP_TIMEOUT,
        );
        if let Err(del) = del {
            eprintln!(
                "k8s testbed: removing the blackhole route {} failed: {del:#}",
                self.cidr
            );
        }
    }
}
