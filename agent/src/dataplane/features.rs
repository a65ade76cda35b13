//! What the running kernel offers detour, probed at start before anything is loaded, so
//! that a kernel that lacks a piece gets a sentence saying which and why, not a
//! verifier dump or an `EINVAL` from deep inside a load.
//!
//! The probes are aya's (libbpf's strategy: load a minimal program or create a minimal
//! map of the type, call the helper from a minimal program) plus the kernel's version
//! for what no probe can ask without attaching (the cgroup `getpeername` hooks).
//! Probing loads and frees small objects only; nothing stays behind.
//!
//! Invariants:
//! - every piece detour cannot run without is [`Need::Required`]: if one is missing the
//!   agent refuses to start, naming every missing one (not just the first);
//! - a piece detour can run without is [`Need::Optional`]: one warning line names it and
//!   what the user loses, and the agent turns that part off (none today: every piece
//!   the programs use is required; SYN steering's tcx and `bpf_redirect_neigh` will be
//!   the first optional ones);
//! - [`verdict`] is pure: the probing is in [`probe`], the decision and its words here.

use std::fmt;

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};
use aya::util::KernelVersion;

/// The oldest kernel detour runs on, and why: the cgroup `getpeername` hooks that make
/// a rewritten socket show its VIP, and the BPF ring buffer the kernel reports
/// connection outcomes through, both arrived in 5.8 (bpf_link for cgroups in 5.7).
/// Debian 11 and Amazon Linux 2's 5.10 is the oldest kernel in the test matrix.
pub const MINIMUM: (u32, u32) = (5, 8);

/// Whether detour can run without a piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Required,
    Optional,
}

/// One probed piece of the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub name: &'static str,
    /// `None` when the probe itself failed (an unexpected error): counted as missing.
    pub present: Option<bool>,
    pub need: Need,
    /// What detour uses it for: what is lost without it.
    pub used_for: &'static str,
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// `major.minor.patch` of the running kernel, `None` if it could not be read.
    pub version: Option<(u32, u32, u32)>,
    pub pieces: Vec<Piece>,
}

/// What the agent does about [`Features`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Why the agent cannot run here, one sentence per reason; empty when it can.
    pub refusals: Vec<String>,
    /// One line per optional piece that is missing.
    pub warnings: Vec<String>,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.refusals.join("; "))
    }
}

/// Probes the running kernel.
#[must_use]
pub fn probe() -> Features {
    let version = KernelVersion::current().ok().map(|v| {
        let code = v.code();
        (code >> 16, (code >> 8) & 0xff, code & 0xff)
    });
    let program = |name, t: ProgramType, used_for| Piece {
        name,
        present: is_program_supported(t).ok(),
        need: Need::Required,
        used_for,
    };
    let map = |name, t: MapType, used_for| Piece {
        name,
        present: is_map_supported(t).ok(),
        need: Need::Required,
        used_for,
    };
    let helper = |name, t: ProgramType, h: BpfHelper, used_for| Piece {
        name,
        present: is_helper_supported(t, h).ok(),
        need: Need::Required,
        used_for,
    };
    let pieces = vec![
        program(
            "cgroup/connect and getpeername programs",
            ProgramType::CgroupSockAddr,
            "rewriting connects to a VIP",
        ),
        program(
            "sock_ops programs",
            ProgramType::SockOps,
            "passive health: what happens to rewritten connections",
        ),
        program(
            "raw tracepoints",
            ProgramType::RawTracePoint,
            "telling a reset from the backend apart from a local abort",
        ),
        map("hash maps", MapType::Hash, "the frontends and slot tables"),
        map(
            "LRU hash maps",
            MapType::LruHash,
            "remembering each rewritten socket's VIP",
        ),
        map(
            "per-CPU arrays",
            MapType::PerCpuArray,
            "per-backend counters",
        ),
        map(
            "BPF ring buffers",
            MapType::RingBuf,
            "connection outcomes to the agent",
        ),
        helper(
            "bpf_get_socket_cookie in sock_ops",
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "matching a connection's outcome to its rewrite",
        ),
        helper(
            "bpf_probe_read_kernel in raw tracepoints",
            ProgramType::RawTracePoint,
            BpfHelper::BPF_FUNC_probe_read_kernel,
            "telling a reset from the backend apart from a local abort",
        ),
    ];
    Features { version, pieces }
}

/// Decides from `features` whether the agent can run and what to warn about.
#[must_use]
pub fn verdict(features: &Features) -> Verdict {
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    match features.version {
        Some((major, minor, patch)) if (major, minor) < MINIMUM => refusals.push(format!(
            "kernel {major}.{minor}.{patch} is older than {}.{}, the oldest detour runs on \
             (it needs the cgroup getpeername hooks and the BPF ring buffer)",
            MINIMUM.0, MINIMUM.1
        )),
        _ => {}
    }
    for piece in &features.pieces {
        if piece.present == Some(true) {
            continue;
        }
        let how = if piece.present.is_none() {
            "could not be probed"
        } else {
            "is missing"
        };
        match piece.need {
            Need::Required => refusals.push(format!(
                "{} {how} (needed for {})",
                piece.name, piece.used_for
            )),
            Need::Optional => warnings.push(format!(
                "{} {how}: turned off, so no {}",
                piece.name, piece.used_for
            )),
        }
    }
    Verdict { refusals, warnings }
}

/// Whether this kernel charges BPF maps to `RLIMIT_MEMLOCK`: before 5.11 it does (then
/// memory cgroups account them).
#[must_use]
pub fn charges_memlock(version: Option<(u32, u32, u32)>) -> bool {
    version.is_some_and(|(major, minor, _)| (major, minor) < (5, 11))
}

/// On a kernel that charges maps to `RLIMIT_MEMLOCK`, raises the limit to unlimited,
/// or says exactly what is missing: the maps need far more than the usual 64 KiB or
/// 8 MiB, and without `CAP_SYS_RESOURCE` the limit cannot be raised (the load would
/// then fail with a bare `EPERM`).
pub fn raise_memlock(version: Option<(u32, u32, u32)>) -> Result<(), String> {
    if !charges_memlock(version) {
        return Ok(());
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        tracing::info!("this kernel charges BPF maps to RLIMIT_MEMLOCK; raised it to unlimited");
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a valid rlimit struct.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) };
    Err(format!(
        "this kernel charges BPF maps to RLIMIT_MEMLOCK, which is {} bytes here and cannot be \
         raised ({error}): give the agent CAP_SYS_RESOURCE, or raise the limit before it starts \
         (`ulimit -l unlimited`, systemd's LimitMEMLOCK=infinity, or the container runtime's \
         memlock ulimit)",
        current.rlim_cur
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(name: &'static str, present: Option<bool>, need: Need) -> Piece {
        Piece {
            name,
            present,
            need,
            used_for: "something",
        }
    }

    #[test]
    fn everything_present_on_a_new_kernel_runs_without_a_word() {
        let features = Features {
            version: Some((6, 1, 0)),
            pieces: vec![piece("a", Some(true), Need::Required)],
        };
        assert_eq!(
            verdict(&features),
            Verdict {
                refusals: vec![],
                warnings: vec![]
            }
        );
    }

    #[test]
    fn an_old_kernel_and_every_missing_piece_are_named() {
        let features = Features {
            version: Some((5, 4, 0)),
            pieces: vec![
                piece("ring buffers", Some(false), Need::Required),
                piece("cookies", None, Need::Required),
                piece("tcx", Some(false), Need::Optional),
                piece("hash maps", Some(true), Need::Required),
            ],
        };
        let v = verdict(&features);
        assert_eq!(v.refusals.len(), 3, "{v:?}");
        assert!(
            v.refusals[0].starts_with("kernel 5.4.0 is older than 5.8"),
            "{v:?}"
        );
        assert_eq!(
            v.refusals[1],
            "ring buffers is missing (needed for something)"
        );
        assert_eq!(
            v.refusals[2],
            "cookies could not be probed (needed for something)"
        );
        assert_eq!(v.warnings, ["tcx is missing: turned off, so no something"]);
    }

    #[test]
    fn an_unreadable_version_is_left_to_the_probes() {
        let features = Features {
            version: None,
            pieces: vec![],
        };
        assert!(verdict(&features).refusals.is_empty());
        assert!(!charges_memlock(None));
    }

    #[test]
    fn memlock_is_charged_before_5_11() {
        assert!(charges_memlock(Some((5, 10, 223))));
        assert!(!charges_memlock(Some((5, 11, 0))));
        assert!(!charges_memlock(Some((6, 18, 0))));
    }

    #[test]
    fn this_kernel_has_everything_detour_needs() {
        detour_testbed::require_root("probing the kernel's BPF features").unwrap();
        let features = probe();
        let v = verdict(&features);
        assert!(v.refusals.is_empty(), "{features:?}: {v}");
    }
}
