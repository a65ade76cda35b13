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
//! - a piece detour can run without is [`Need::Optional`]: one warning line names it,
//!   why it is missing where the probe can tell, and what the user loses; the agent
//!   turns that part off or falls back ([`Features::has`]). Today: socket destruction
//!   (sock_diag `SOCK_DESTROY`), linear SYN retransmission timeouts, and tcx links for
//!   SYN steering (clsact filters without them);
//! - [`verdict`] is pure: the probing is in [`probe`], the decision and its words here.
//!
//! Probing socket destruction destroys a loopback listener the agent opened for it (see
//! [`crate::sockdiag::probe_destroy`]). When the kernel has no TCP handler for sock_diag
//! (`tcp_diag` not loaded, and the kernel's own module autoload did not load it) the
//! agent runs `modprobe tcp_diag` once, bounded in time, and probes again, as Cilium
//! does for the modules it needs.

use std::fmt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};
use aya::util::KernelVersion;

use crate::sockdiag::{self, DestroyUnavailable};

/// The oldest kernel detour runs on, and why: the cgroup `getpeername` hooks that make
/// a rewritten socket show its VIP, and the BPF ring buffer the kernel reports
/// connection outcomes through, both arrived in 5.8 (bpf_link for cgroups in 5.7).
/// Debian 11 and Amazon Linux 2's 5.10 is the oldest kernel in the test matrix.
pub const MINIMUM: (u32, u32) = (5, 8);

/// Whether detour can run without a piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Need {
    Required,
    Optional,
}

/// One probed piece of the kernel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Piece {
    /// Stable name for machines: the `feature` label of `detour_kernel_feature`, the
    /// key in `detour kernel -o json`.
    pub key: &'static str,
    pub name: &'static str,
    /// `None` when the probe itself failed (an unexpected error): counted as missing.
    pub present: Option<bool>,
    pub need: Need,
    /// What detour uses it for.
    pub used_for: &'static str,
    /// For an optional piece, what the user loses without it.
    pub without: &'static str,
    /// Why it is missing, where the probe can tell.
    pub detail: Option<String>,
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Features {
    /// `major.minor.patch` of the running kernel, `None` if it could not be read.
    pub version: Option<(u32, u32, u32)>,
    pub pieces: Vec<Piece>,
}

impl Features {
    /// Whether the piece named `key` was probed and found.
    #[must_use]
    pub fn has(&self, key: &str) -> bool {
        self.pieces
            .iter()
            .any(|p| p.key == key && p.present == Some(true))
    }

    /// The kernel version as `major.minor.patch`, or `unknown`.
    #[must_use]
    pub fn version_string(&self) -> String {
        self.version
            .map_or_else(|| "unknown".to_owned(), |(a, b, c)| format!("{a}.{b}.{c}"))
    }
}

/// Keys of the optional pieces the agent asks about.
pub mod key {
    pub const SOCKET_DESTROY: &str = "socket_destroy";
    pub const SYN_LINEAR_TIMEOUTS: &str = "syn_linear_timeouts";
    pub const TCX: &str = "tcx";
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

/// Whether tc programs attach through tcx links (Linux 6.6+), which coexist with a CNI's
/// own programs and can be pinned and replaced in one step; before, through a clsact
/// qdisc's filters.
#[must_use]
pub fn tcx_available(features: &Features) -> bool {
    features.has(key::TCX)
}

/// The tcx piece from the kernel's version. No probe can ask without attaching to a
/// device (as for the cgroup `getpeername` hooks), and tcx arrived whole in 6.6.
#[must_use]
pub fn tcx(version: Option<(u32, u32, u32)>) -> Piece {
    let (present, detail) = match version {
        Some(v) => (
            Some(v >= (6, 6, 0)),
            (v < (6, 6, 0)).then(|| "the kernel is older than 6.6".to_owned()),
        ),
        None => (
            None,
            Some("the kernel's version could not be read".to_owned()),
        ),
    };
    Piece {
        key: key::TCX,
        name: "tcx links for tc programs",
        present,
        need: Need::Optional,
        used_for: "attaching SYN steering beside a CNI's own tc programs, replaced in one step by the next agent",
        without: "SYN steering attaches as clsact filters instead (the sch_ingress and cls_bpf \
                  modules): they share each device's qdisc with other filters, and an agent \
                  restart replaces them by deleting and adding, not in one step",
        detail,
    }
}

/// Probes the running kernel.
#[must_use]
pub fn probe() -> Features {
    let version = KernelVersion::current().ok().map(|v| {
        let code = v.code();
        (code >> 16, (code >> 8) & 0xff, code & 0xff)
    });
    fn required<E: std::error::Error>(
        key: &'static str,
        name: &'static str,
        probed: Result<bool, E>,
        used_for: &'static str,
    ) -> Piece {
        let (present, detail) = match probed {
            Ok(present) => (Some(present), None),
            Err(e) => (None, Some(error_chain(&e))),
        };
        Piece {
            key,
            name,
            present,
            need: Need::Required,
            used_for,
            without: "",
            detail,
        }
    }
    let program = |key, name, t: ProgramType, used_for| {
        required(key, name, is_program_supported(t), used_for)
    };
    let map = |key, name, t: MapType, used_for| required(key, name, is_map_supported(t), used_for);
    let helper = |key, name, t: ProgramType, h: BpfHelper, used_for| {
        required(key, name, is_helper_supported(t, h), used_for)
    };
    let mut pieces = vec![
        program(
            "cgroup_sock_addr",
            "cgroup/connect and getpeername programs",
            ProgramType::CgroupSockAddr,
            "rewriting connects to a VIP",
        ),
        program(
            "sock_ops",
            "sock_ops programs",
            ProgramType::SockOps,
            "passive health: what happens to rewritten connections",
        ),
        program(
            "raw_tracepoint",
            "raw tracepoints",
            ProgramType::RawTracePoint,
            "telling a reset from the backend apart from a local abort",
        ),
        map(
            "hash_map",
            "hash maps",
            MapType::Hash,
            "the frontends and slot tables",
        ),
        map(
            "lru_hash_map",
            "LRU hash maps",
            MapType::LruHash,
            "remembering each rewritten socket's VIP",
        ),
        map(
            "percpu_array",
            "per-CPU arrays",
            MapType::PerCpuArray,
            "per-backend counters",
        ),
        map(
            "ringbuf",
            "BPF ring buffers",
            MapType::RingBuf,
            "connection outcomes to the agent",
        ),
        helper(
            "sock_ops_socket_cookie",
            "bpf_get_socket_cookie in sock_ops",
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "matching a connection's outcome to its rewrite",
        ),
        helper(
            "raw_tracepoint_probe_read_kernel",
            "bpf_probe_read_kernel in raw tracepoints",
            ProgramType::RawTracePoint,
            BpfHelper::BPF_FUNC_probe_read_kernel,
            "telling a reset from the backend apart from a local abort",
        ),
    ];
    pieces.push(socket_destroy(probe_socket_destroy()));
    pieces.push(tcx(version));
    pieces.push(syn_linear_timeouts(
        std::fs::read_to_string(SYN_LINEAR_TIMEOUTS_SYSCTL)
            .ok()
            .as_deref(),
    ));
    Features { version, pieces }
}

/// An error with its sources, `: `-separated (aya's probe errors keep the errno in a
/// source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether a probe failed for want of privilege rather than of a kernel piece.
fn not_permitted(piece: &Piece) -> bool {
    piece.present.is_none()
        && piece
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("os error 1)") || d.contains("Operation not permitted"))
}

/// The sysctl that makes the first SYN retransmission timeouts linear (6.5+).
const SYN_LINEAR_TIMEOUTS_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_syn_linear_timeouts";

/// How long `modprobe` may take before the agent gives up on it.
const MODPROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Probes socket destruction; when sock_diag has no TCP handler, loads `tcp_diag` and
/// probes again.
fn probe_socket_destroy() -> Result<(), DestroyUnavailable> {
    match sockdiag::probe_destroy() {
        Err(DestroyUnavailable::NoTcpDiag) => match modprobe("tcp_diag") {
            Ok(()) => {
                tracing::info!("loaded the tcp_diag module, which destroying sockets needs");
                sockdiag::probe_destroy()
            }
            Err(why) => {
                tracing::warn!("could not load the tcp_diag module: {why}");
                Err(DestroyUnavailable::NoTcpDiag)
            }
        },
        other => other,
    }
}

/// Runs `modprobe -q MODULE`, bounded by [`MODPROBE_TIMEOUT`].
pub(crate) fn modprobe(module: &str) -> Result<(), String> {
    let mut child = Command::new("modprobe")
        .args(["-q", module])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run modprobe: {e}"))?;
    let deadline = Instant::now() + MODPROBE_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("modprobe {module} failed ({status})")),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "modprobe {module} did not finish in {}s",
                    MODPROBE_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for modprobe: {e}")),
        }
    }
}

/// The socket-destruction piece from what `probe_socket_destroy` found.
#[must_use]
pub fn socket_destroy(probed: Result<(), DestroyUnavailable>) -> Piece {
    Piece {
        key: key::SOCKET_DESTROY,
        name: "socket destruction (sock_diag SOCK_DESTROY)",
        present: Some(probed.is_ok()),
        need: Need::Optional,
        used_for: "closing the connections to an ejected or removed backend at once",
        without: "turned off, so connections already open to an ejected or removed backend, \
                  and handshakes still waiting on it, stay until they fail on their own",
        detail: probed.err().map(|e| e.to_string()),
    }
}

/// The linear-SYN-timeouts piece from the sysctl's contents (`None`: no such sysctl).
#[must_use]
pub fn syn_linear_timeouts(sysctl: Option<&str>) -> Piece {
    let (present, detail) = match sysctl.map(|v| v.trim().parse::<u32>()) {
        None => (Some(false), Some("the kernel is older than 6.5".to_owned())),
        Some(Ok(0)) => (
            Some(false),
            Some("net.ipv4.tcp_syn_linear_timeouts is 0".to_owned()),
        ),
        Some(Ok(_)) => (Some(true), None),
        Some(Err(e)) => (None, Some(format!("{SYN_LINEAR_TIMEOUTS_SYSCTL}: {e}"))),
    };
    Piece {
        key: key::SYN_LINEAR_TIMEOUTS,
        name: "linear SYN retransmission timeouts (tcp_syn_linear_timeouts)",
        present,
        need: Need::Optional,
        used_for: "declaring a black-holed handshake failed after 2 handshake timeouts",
        without: "the kernel doubles the second SYN timeout, so a handshake to a black-holed \
                  backend counts as failed after 3 handshake timeouts instead of 2",
        detail,
    }
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
    // Without the privilege to load BPF, every probe fails alike: one sentence says so.
    let unprivileged = features
        .pieces
        .iter()
        .any(|p| p.need == Need::Required && not_permitted(p));
    if unprivileged {
        refusals.push(
            "the kernel did not permit loading BPF programs and maps (EPERM): run the agent as \
             root, or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (CAP_SYS_ADMIN before 5.8)"
                .to_owned(),
        );
    }
    for piece in &features.pieces {
        if piece.present == Some(true) || (unprivileged && not_permitted(piece)) {
            continue;
        }
        let how = if piece.present.is_none() {
            "could not be probed"
        } else {
            "is missing"
        };
        let why = piece
            .detail
            .as_ref()
            .map_or_else(String::new, |d| format!(" ({d})"));
        match piece.need {
            Need::Required => refusals.push(format!(
                "{} {how}{why}, needed for {}",
                piece.name, piece.used_for
            )),
            Need::Optional => {
                warnings.push(format!("{} {how}{why}: {}", piece.name, piece.without));
            }
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
            key: name,
            name,
            present,
            need,
            used_for: "something",
            without: "turned off, so no something",
            detail: None,
        }
    }

    #[test]
    fn tcx_is_there_from_6_6_and_its_absence_is_one_warning_that_names_the_fallback() {
        assert_eq!(tcx(Some((6, 6, 0))).present, Some(true));
        assert_eq!(tcx(Some((6, 18, 2))).present, Some(true));
        let old = Features {
            version: Some((6, 1, 90)),
            pieces: vec![tcx(Some((6, 1, 90)))],
        };
        assert!(!tcx_available(&old));
        let verdict = verdict(&old);
        assert!(verdict.refusals.is_empty(), "{verdict:?}");
        assert_eq!(verdict.warnings.len(), 1, "{verdict:?}");
        let line = &verdict.warnings[0];
        assert!(
            line.contains("older than 6.6") && line.contains("clsact filters instead"),
            "{line}"
        );
        // An unreadable version is no tcx: clsact works on every kernel.
        assert_eq!(tcx(None).present, None);
        assert!(!tcx_available(&Features {
            version: None,
            pieces: vec![tcx(None)],
        }));
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
            "ring buffers is missing, needed for something"
        );
        assert_eq!(
            v.refusals[2],
            "cookies could not be probed, needed for something"
        );
        assert_eq!(v.warnings, ["tcx is missing: turned off, so no something"]);
    }

    #[test]
    fn a_kernel_without_socket_destruction_runs_with_it_turned_off_and_says_why() {
        let features = Features {
            version: Some((6, 1, 0)),
            pieces: vec![socket_destroy(Err(DestroyUnavailable::NotBuilt))],
        };
        let v = verdict(&features);
        assert!(v.refusals.is_empty(), "{v:?}");
        assert_eq!(v.warnings.len(), 1);
        assert!(
            v.warnings[0].starts_with(
                "socket destruction (sock_diag SOCK_DESTROY) is missing (the kernel was built \
                 without CONFIG_INET_DIAG_DESTROY): turned off, so connections already open"
            ),
            "{v:?}"
        );
        assert!(!features.has(key::SOCKET_DESTROY));
        let works = Features {
            version: Some((6, 1, 0)),
            pieces: vec![socket_destroy(Ok(()))],
        };
        assert!(works.has(key::SOCKET_DESTROY));
        assert!(verdict(&works).warnings.is_empty());
    }

    #[test]
    fn linear_syn_timeouts_come_from_the_sysctl() {
        let before_6_5 = syn_linear_timeouts(None);
        assert_eq!(before_6_5.present, Some(false));
        assert_eq!(
            before_6_5.detail.as_deref(),
            Some("the kernel is older than 6.5")
        );
        let off = syn_linear_timeouts(Some("0\n"));
        assert_eq!(off.present, Some(false));
        assert_eq!(
            off.detail.as_deref(),
            Some("net.ipv4.tcp_syn_linear_timeouts is 0")
        );
        assert_eq!(syn_linear_timeouts(Some("4\n")).present, Some(true));
        assert_eq!(syn_linear_timeouts(Some("four")).present, None);
        let v = verdict(&Features {
            version: Some((5, 10, 0)),
            pieces: vec![before_6_5],
        });
        assert!(v.refusals.is_empty());
        assert!(
            v.warnings[0].ends_with("counts as failed after 3 handshake timeouts instead of 2"),
            "{v:?}"
        );
    }

    #[test]
    fn probes_refused_for_want_of_privilege_are_one_sentence() {
        let denied = |name| Piece {
            detail: Some("`bpf_prog_load` failed: Operation not permitted (os error 1)".into()),
            ..piece(name, None, Need::Required)
        };
        let features = Features {
            version: Some((6, 1, 0)),
            pieces: vec![
                denied("sock_ops"),
                denied("ring buffers"),
                piece("cookies", Some(false), Need::Required),
            ],
        };
        let v = verdict(&features);
        assert_eq!(v.refusals.len(), 2, "{v:?}");
        assert!(
            v.refusals[0].starts_with("the kernel did not permit loading BPF programs"),
            "{v:?}"
        );
        assert_eq!(v.refusals[1], "cookies is missing, needed for something");
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
        // 6.18, with CONFIG_INET_DIAG_DESTROY: nothing is off either.
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);
    }
}
