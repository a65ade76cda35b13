//! Destroying the TCP sockets that are connected, or still connecting, to ejected backends.
//!
//! When detour ejects a backend, the sockets it rewrote to that backend must not linger:
//! an application keeps using an established connection (or keeps waiting in a handshake
//! to a black-holed backend) until something breaks it. This module breaks it at once,
//! the way `ss -K` does: a `NETLINK_SOCK_DIAG` dump of the TCP sockets
//! (`SOCK_DIAG_BY_FAMILY` with an `inet_diag_req_v2` and an `idiag_states` mask, for
//! `AF_INET` and `AF_INET6`), then one `SOCK_DESTROY` per chosen socket, naming it by its
//! exact id including its cookie (the id the dump reported, sent back unchanged). The
//! kernel aborts it with `tcp_abort(ECONNABORTED)`: the peer gets a RST and the
//! application's next call on the socket fails with `ECONNABORTED` — a blocked `connect`
//! or `read` wakes up with it. What this kernel (6.18) shows, and the tests pin down:
//! data that had already arrived is still read first; the error is reported once, after
//! which reads return EOF and writes fail; on a `CLOSE_WAIT` socket the backend's FIN
//! still reads as EOF and the next write fails with `ECONNABORTED`.
//!
//! Needs `CONFIG_INET_DIAG_DESTROY` (without it every destroy fails with `EOPNOTSUPP`,
//! reported per socket), `CAP_NET_ADMIN` over the sockets' namespace, and
//! `CAP_SYS_ADMIN` to enter other namespaces. [`probe_destroy`] asks the kernel once at
//! start, by destroying a listener of the agent's own, and the agent turns destruction
//! off (one warning line) where it cannot work.
//!
//! Invariants:
//! - only sockets whose destination (the dump's `id.idiag_dst`/`idiag_dport`) is one of
//!   the given backends, whose state is one of [`Which`]'s at dump time, and whose cookie
//!   the caller's predicate accepts are destroyed — detour passes a predicate that holds
//!   only for the cookies in its own map of rewritten sockets, so an application's own
//!   direct connections to a backend are never touched. Destination addresses are
//!   compared canonically: an `AF_INET6` socket connected to `::ffff:10.0.0.1` (a
//!   dual-stack socket that reached an IPv4 backend) matches the backend `10.0.0.1`;
//! - a socket is named to the kernel by its cookie as well as its addresses, so a socket
//!   that closed between the dump and the destroy, and a new one that took its ports, is
//!   never hit (the kernel answers `ENOENT`: counted as [`DestroyReport::already_gone`]);
//! - destroying is idempotent: a second call finds nothing left to destroy. After an
//!   error, calling again finishes the job;
//! - every read of the kernel's replies is bounded: each receive in time
//!   ([`RECV_TIMEOUT`], `SO_RCVTIMEO`) and in size (one 64 KiB buffer; a datagram that
//!   does not fit is an error, never read in part), a dump in datagrams, bytes and total
//!   time, the wait for an acknowledgement in replies; the cgroup walk in depth, cgroups
//!   and processes. Past a bound the namespace fails with an error that names it.
//!
//! The messages are the `netlink-packet-sock-diag` crate's (`InetRequest` for the dump,
//! `SockDiagDestroy` for the abort, `InetResponseHeader` for each socket), framed by
//! `netlink-packet-core` and sent through a `netlink-sys` socket. What is still written
//! here, and why:
//! - the walk from one message of a datagram to the next, with the length checks that
//!   `NetlinkBuffer::new_checked` makes, kept for the numbers in [`ReplyError`]:
//!   netlink-packet-core parses one message, not a datagram of them;
//! - only the fixed part of each `inet_diag_msg` is decoded, not the attributes after
//!   it (the crate's `InetResponse` parses them all): detour needs none of them, and an
//!   attribute that a newer kernel sends and this crate version misreads must not stop
//!   the destroys;
//! - the cookie is read as `__u32[2]` in host order, low half first: the crate keeps it
//!   as 8 opaque bytes;
//! - `SO_RCVTIMEO` is set through `socket2`, as `netlink-sys` has no receive timeout.
//!
//! Network namespaces: a sock_diag netlink socket sees (and destroys) the sockets of the
//! network namespace it was created in, whichever thread later uses it. So to reach a
//! pod's sockets, [`destroy_in_cgroup`] spawns a short-lived thread per distinct
//! namespace that `setns(2)`s into it, creates the netlink socket there and exits; the
//! dump and the destroys then run on the caller's thread through that socket. No thread
//! of a pool ever changes namespace, and the caller's thread never does.
//!
//! Why userspace sock_diag rather than a BPF TCP iterator calling the `bpf_sock_destroy`
//! kfunc: both end in the same kernel function, `tcp_abort`; sock_diag needs no kfunc
//! (BTF extern) linking, which aya 0.14 does not do; and a BPF TCP iterator walks only
//! the namespace it was created in too, so it would need the same `setns` dance per pod.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, Parseable, NLMSG_ALIGNTO, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP,
    NLMSG_OVERRUN, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, TCP_CLOSE_WAIT, TCP_ESTABLISHED,
    TCP_SYN_SENT,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseBuffer, InetResponseHeader, SocketId, StateFlags,
};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};
use socket2::SockRef;
use tracing::{debug, warn};

/// `struct nlmsghdr`; netlink-packet-core does not export its length.
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_msg` without its attributes: family, state, timer, retrans, sockid,
/// expires, rqueue, wqueue, uid, inode.
const DIAG_MSG_LEN: usize = mem::size_of::<InetResponseBuffer>();

/// Bigger than any datagram the kernel builds for a dump (it caps them at 32 KiB).
const RECV_BUF_LEN: usize = 64 * 1024;
/// How long one receive waits for the kernel before the namespace counts as failed.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// At ~300 sockets per datagram, ~20 million sockets: more than any node holds.
const MAX_DUMP_DATAGRAMS: usize = 1 << 16;
/// At ~100 bytes per socket, ~10 million sockets.
const MAX_DUMP_BYTES: usize = 1 << 30;
/// A dump of a million sockets takes about a second.
const MAX_DUMP_TIME: Duration = Duration::from_secs(60);
/// Replies read while waiting for one acknowledgement before giving up.
const MAX_ACK_REPLIES: usize = 64;
/// Bounds on the walk of a cgroup tree; exceeding one is an error, never a silent cut.
const MAX_CGROUP_DEPTH: usize = 64;
const MAX_CGROUPS: usize = 1 << 16;
const MAX_PROCESSES: usize = 1 << 20;

/// Which TCP states count as "to this backend".
///
/// The states are the client side of a connection the application still uses. Left out
/// on purpose: `FIN_WAIT*`, `CLOSING`, `LAST_ACK`, `TIME_WAIT` (the application has
/// closed or shut down its sending side and the kernel finishes those alone) and
/// `LISTEN`/`SYN_RECV` (server side, never a socket detour rewrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// `ESTABLISHED` and `CLOSE_WAIT`. A `CLOSE_WAIT` socket is one whose backend sent
    /// FIN while the application still holds it, typically idle in a connection pool;
    /// destroying it makes the next request fail at the write, before it is sent,
    /// instead of being written into a half-closed connection. Data already received is
    /// still read first.
    Established,
    /// `SYN_SENT`: handshakes waiting on a backend that does not answer.
    Connecting,
    /// Both of the above.
    Both,
}

impl Which {
    fn states(self) -> &'static [u8] {
        match self {
            Which::Established => &[TCP_ESTABLISHED, TCP_CLOSE_WAIT],
            Which::Connecting => &[TCP_SYN_SENT],
            Which::Both => &[TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_SYN_SENT],
        }
    }

    /// The `idiag_states` bit mask: bit `n` selects TCP state `n`.
    fn state_mask(self) -> u32 {
        self.states().iter().fold(0, |mask, s| mask | 1 << s)
    }

    fn includes(self, state: u8) -> bool {
        self.states().contains(&state)
    }
}

/// What one call did.
#[derive(Debug, Default)]
pub struct DestroyReport {
    /// Sockets the kernel aborted.
    pub destroyed: usize,
    /// Sockets to a given backend, in a given state, that the predicate refused.
    pub skipped: usize,
    /// Sockets that closed between the dump and the destroy (`ENOENT`).
    pub already_gone: usize,
    /// Sockets the kernel refused to destroy, by cookie.
    pub failed: Vec<(u64, io::Error)>,
    /// Network namespaces whose sockets were searched.
    pub namespaces: usize,
    /// [`destroy_in_cgroup`] only: namespaces that could not be searched. The others
    /// were still searched; a namespace that vanished is not an error and is not here.
    pub namespace_errors: Vec<SockDiagError>,
}

impl DestroyReport {
    fn absorb(&mut self, other: DestroyReport) {
        self.destroyed += other.destroyed;
        self.skipped += other.skipped;
        self.already_gone += other.already_gone;
        self.failed.extend(other.failed);
        self.namespaces += other.namespaces;
        self.namespace_errors.extend(other.namespace_errors);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("{call} for {netns}: {source}")]
    Syscall {
        netns: String,
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{request} in {netns}: the kernel answered {source}")]
    Kernel {
        netns: String,
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no reply from the kernel in {netns} within {timeout:?} (SO_RCVTIMEO)")]
    Silent { netns: String, timeout: Duration },
    #[error("sock_diag reply in {netns}: {source}")]
    Reply {
        netns: String,
        #[source]
        source: ReplyError,
    },
    #[error("cgroup {path}: {call}: {source}")]
    Cgroup {
        path: PathBuf,
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} with its descendants holds more than {limit} {what}")]
    CgroupTooLarge {
        path: PathBuf,
        what: &'static str,
        limit: usize,
    },
}

/// A netlink reply that does not read as the kernel's ABI says it must.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("a {len}-byte datagram did not fit the {cap}-byte buffer")]
    Truncated { len: usize, cap: usize },
    #[error("{left} trailing bytes are too few for a netlink header")]
    ShortHeader { left: usize },
    #[error("a netlink message claims {len} bytes with {left} left in the datagram")]
    BadLength { len: u32, left: usize },
    #[error("a {what} payload of {len} bytes is shorter than {need}")]
    ShortPayload {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("unexpected netlink message type {0}")]
    UnexpectedType(u16),
    #[error("the kernel dropped replies (NLMSG_OVERRUN)")]
    Overrun,
    #[error("a {what} the crate could not decode: {reason}")]
    Undecodable {
        what: &'static str,
        /// netlink-packet-core's `DecodeError`, which carries only its message.
        reason: String,
    },
    #[error("the dump passed {limit} {what} without ending")]
    DumpTooLarge { limit: usize, what: &'static str },
    #[error("the dump did not end within {0:?}")]
    DumpTooSlow(Duration),
    #[error("no acknowledgement among {0} replies")]
    NoAck(usize),
}

/// Destroys, in the calling thread's network namespace, the TCP sockets to `dsts` in the
/// states `which` selects whose cookie `pred` accepts.
///
/// `pred` runs on the calling thread, once per socket to `dsts` in those states.
pub fn destroy_in_current_netns(
    dsts: &[SocketAddr],
    which: Which,
    pred: &dyn Fn(u64) -> bool,
) -> Result<DestroyReport, SockDiagError> {
    let netns = "the current network namespace";
    if dsts.is_empty() {
        return Ok(DestroyReport::default());
    }
    let sock = DiagSocket::open().map_err(|source| SockDiagError::Syscall {
        netns: netns.to_owned(),
        call: "socket(AF_NETLINK, NETLINK_SOCK_DIAG)",
        source,
    })?;
    destroy_with(sock, netns, dsts, which, pred)
}

/// Does what [`destroy_in_current_netns`] does in every distinct network namespace of the
/// processes in `cgroup` and its descendants.
///
/// Namespaces are told apart by the device and inode of `/proc/<pid>/ns/net`. Each is
/// entered by a fresh thread that only creates the netlink socket there (see the module
/// doc). A namespace whose processes all exit before it is entered is skipped. A
/// namespace that fails is reported in [`DestroyReport::namespace_errors`] and the
/// others are still searched; only failing to read the cgroup tree is an `Err`.
/// Returns at once when `dsts` is empty.
pub fn destroy_in_cgroup(
    cgroup: &Path,
    dsts: &[SocketAddr],
    which: Which,
    pred: &dyn Fn(u64) -> bool,
) -> Result<DestroyReport, SockDiagError> {
    let mut report = DestroyReport::default();
    if dsts.is_empty() {
        return Ok(report);
    }
    let pids = cgroup_pids(cgroup)?;
    let (namespaces, errors) = netns_of_pids(&pids);
    report.namespace_errors = errors;
    for (key, pids) in namespaces {
        let opened = match open_netns(key, &pids) {
            Ok(Some(opened)) => opened,
            Ok(None) => {
                debug!(netns = key.inode, "network namespace vanished; skipped");
                continue;
            }
            Err(e) => {
                report.namespace_errors.push(e);
                continue;
            }
        };
        let label = opened.label();
        let result = socket_in_netns(opened.file, &label)
            .and_then(|sock| destroy_with(sock, &label, dsts, which, pred));
        match result {
            Ok(r) => report.absorb(r),
            Err(e) => report.namespace_errors.push(e),
        }
    }
    Ok(report)
}

/// Why this kernel cannot destroy sockets for detour, as [`probe_destroy`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestroyUnavailable {
    /// `EOPNOTSUPP`: the kernel was built without `CONFIG_INET_DIAG_DESTROY`.
    NotBuilt,
    /// `ENOENT` for a socket that exists: sock_diag has no TCP handler, `inet_diag` or
    /// `tcp_diag` is not loaded and the kernel could not load it.
    NoTcpDiag,
    /// `EPERM`: the agent lacks `CAP_NET_ADMIN`.
    NotPermitted,
    /// Anything else, as the kernel or the system call said it.
    Failed(String),
}

impl std::fmt::Display for DestroyUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DestroyUnavailable::NotBuilt => {
                f.write_str("the kernel was built without CONFIG_INET_DIAG_DESTROY")
            }
            DestroyUnavailable::NoTcpDiag => f.write_str(
                "the tcp_diag module is not loaded and the kernel could not load it \
                 (`modprobe tcp_diag` on the node, or list it in /etc/modules-load.d)",
            ),
            DestroyUnavailable::NotPermitted => {
                f.write_str("the agent lacks CAP_NET_ADMIN, which destroying a socket needs")
            }
            DestroyUnavailable::Failed(why) => write!(f, "destroying a test socket failed: {why}"),
        }
    }
}

impl DestroyUnavailable {
    /// What the kernel's answer to destroying a socket that exists means.
    #[must_use]
    pub fn from_kernel(error: &io::Error) -> Self {
        match error.raw_os_error() {
            Some(libc::EOPNOTSUPP) => DestroyUnavailable::NotBuilt,
            Some(libc::ENOENT) => DestroyUnavailable::NoTcpDiag,
            Some(libc::EPERM) | Some(libc::EACCES) => DestroyUnavailable::NotPermitted,
            _ => DestroyUnavailable::Failed(error.to_string()),
        }
    }
}

/// Whether this kernel lets detour destroy TCP sockets, found by destroying one of the
/// agent's own: a listener on an ephemeral loopback port of the current network
/// namespace, named by its local address (a listener is found by it, and `tcp_abort`
/// closes a listener too). The socket exists, so the kernel's answer tells the cases
/// apart: done, `EOPNOTSUPP` (not built in), `ENOENT` (no TCP handler), `EPERM`.
pub fn probe_destroy() -> Result<(), DestroyUnavailable> {
    let failed = |what: &str, e: io::Error| DestroyUnavailable::Failed(format!("{what}: {e}"));
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| failed("a loopback listener to destroy", e))?;
    destroy_listener(&listener)
}

/// Destroys `listener`, an IPv4 loopback listener of the current network namespace.
fn destroy_listener(listener: &std::net::TcpListener) -> Result<(), DestroyUnavailable> {
    let failed = |what: &str, e: io::Error| DestroyUnavailable::Failed(format!("{what}: {e}"));
    let port = listener
        .local_addr()
        .map_err(|e| failed("the listener's port", e))?
        .port();
    let mut sock = DiagSocket::open().map_err(|e| failed("socket(NETLINK_SOCK_DIAG)", e))?;
    let msg = DiagMsg {
        family: AF_INET,
        state: 0,
        id: SockId {
            sport: port,
            dport: 0,
            src: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            dst: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            interface: 0,
            // INET_DIAG_NOCOOKIE in both halves: match by address alone.
            cookie: u64::MAX,
        },
    };
    match sock.destroy("the agent's network namespace", &msg) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(DestroyUnavailable::from_kernel(&e)),
        Err(e) => Err(DestroyUnavailable::Failed(e.to_string())),
    }
}

/// Dumps, filters and destroys through `sock`, in whatever namespace it belongs to.
fn destroy_with(
    mut sock: DiagSocket,
    netns: &str,
    dsts: &[SocketAddr],
    which: Which,
    pred: &dyn Fn(u64) -> bool,
) -> Result<DestroyReport, SockDiagError> {
    let targets: HashSet<(IpAddr, u16)> = dsts
        .iter()
        .map(|d| (d.ip().to_canonical(), d.port()))
        .collect();
    let mut report = DestroyReport {
        namespaces: 1,
        ..DestroyReport::default()
    };
    // An AF_INET6 dump holds dual-stack sockets to IPv4 backends too (as ::ffff:a.b.c.d),
    // so it is needed whatever the targets; an AF_INET dump only for IPv4 targets.
    let mut families = vec![(AF_INET6, "SOCK_DIAG_BY_FAMILY dump of AF_INET6")];
    if targets.iter().any(|(ip, _)| ip.is_ipv4()) {
        families.push((AF_INET, "SOCK_DIAG_BY_FAMILY dump of AF_INET"));
    }
    let mut chosen = Vec::new();
    // A dump can show a socket twice when the hash table changes under it.
    let mut seen = HashSet::new();
    for (family, request) in families {
        sock.dump(netns, request, family, which.state_mask(), |msg| {
            let dst = msg.id.dst();
            if !which.includes(msg.state)
                || !targets.contains(&(dst.ip(), dst.port()))
                || !seen.insert(msg.id.cookie)
            {
                return;
            }
            if pred(msg.id.cookie) {
                chosen.push(msg);
            } else {
                report.skipped += 1;
            }
        })?;
    }
    // Destroys only after the dumps: a dump in progress owns the socket's replies.
    for msg in chosen {
        match sock.destroy(netns, &msg)? {
            Ok(()) => {
                debug!(cookie = msg.id.cookie, state = msg.state, %netns, "destroyed socket");
                report.destroyed += 1;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => report.already_gone += 1,
            Err(e) => report.failed.push((msg.id.cookie, e)),
        }
    }
    Ok(report)
}

/// `struct inet_diag_sockid`, as the module uses it: the crate's [`SocketId`] with its
/// cookie read as the one number `SO_COOKIE` and detour's map of rewritten sockets use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SockId {
    sport: u16,
    dport: u16,
    src: IpAddr,
    dst: IpAddr,
    interface: u32,
    cookie: u64,
}

impl SockId {
    fn from_crate(id: &SocketId) -> Self {
        SockId {
            sport: id.source_port,
            dport: id.destination_port,
            src: id.source_address,
            dst: id.destination_address,
            interface: id.interface_id,
            cookie: cookie_from_bytes(id.cookie),
        }
    }

    /// The id exactly as the dump reported it, to name the socket back to the kernel.
    fn to_crate(self) -> SocketId {
        SocketId {
            source_port: self.sport,
            destination_port: self.dport,
            source_address: self.src,
            destination_address: self.dst,
            interface_id: self.interface,
            cookie: cookie_to_bytes(self.cookie),
        }
    }

    /// The destination, canonical (an IPv4-mapped IPv6 address comes out as IPv4).
    fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.dst.to_canonical(), self.dport)
    }
}

/// `idiag_cookie` is `__u32[2]`, the low half first, each in host order
/// (`sock_diag_save_cookie`); the crate keeps it as 8 opaque bytes.
fn cookie_from_bytes(b: [u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let hi = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
    u64::from(hi) << 32 | u64::from(lo)
}

fn cookie_to_bytes(cookie: u64) -> [u8; 8] {
    let mut b = [0; 8];
    b[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
    b[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    b
}

/// The part of `struct inet_diag_msg` this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DiagMsg {
    family: u8,
    state: u8,
    id: SockId,
}

impl DiagMsg {
    /// Decodes the fixed part with the crate; the attributes after it are not read (see
    /// the module doc).
    fn decode(payload: &[u8]) -> Result<Self, ReplyError> {
        if payload.len() < DIAG_MSG_LEN {
            return Err(ReplyError::ShortPayload {
                what: "inet_diag_msg",
                len: payload.len(),
                need: DIAG_MSG_LEN,
            });
        }
        let header = InetResponseHeader::parse(payload).map_err(|e| ReplyError::Undecodable {
            what: "inet_diag_msg",
            reason: e.to_string(),
        })?;
        Ok(DiagMsg {
            family: header.family,
            state: header.state,
            id: SockId::from_crate(&header.socket_id),
        })
    }
}

/// One request, header and all, as the crate serializes it.
fn encode<I: NetlinkSerializable>(flags: u16, seq: u32, payload: I) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    // nlmsg_pid 0: the kernel fills in our port id.
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    msg.finalize();
    let mut out = vec![0; msg.buffer_len()];
    msg.serialize(&mut out);
    out
}

/// An `inet_diag_req_v2` dump of the TCP sockets of `family` in the `states` mask.
fn dump_request(seq: u32, family: u8, states: u32) -> Vec<u8> {
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::from_bits_retain(states),
        socket_id,
    });
    encode(NLM_F_REQUEST | NLM_F_DUMP, seq, request)
}

/// Names the socket by its whole id, cookie included; the kernel ignores the states.
fn destroy_request(seq: u32, msg: &DiagMsg) -> Vec<u8> {
    let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
        family: msg.family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::empty(),
        socket_id: msg.id.to_crate(),
    }));
    encode(NLM_F_REQUEST | NLM_F_ACK, seq, request)
}

/// One netlink message of a datagram.
#[derive(Debug, PartialEq, Eq)]
struct NlMsg<'a> {
    msg_type: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a datagram into its messages (`NLMSG_OK`/`NLMSG_NEXT`, but strict: a message
/// that does not fit is an error, not the end). The crate reads each header; the walk
/// from one message to the next is here, as netlink-packet-core has none.
fn split_messages(mut buf: &[u8]) -> Result<Vec<NlMsg<'_>>, ReplyError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < NLMSG_HDRLEN {
            return Err(ReplyError::ShortHeader { left: buf.len() });
        }
        let len = NetlinkBuffer::new(buf).length();
        let ulen = len as usize;
        if ulen < NLMSG_HDRLEN || ulen > buf.len() {
            return Err(ReplyError::BadLength {
                len,
                left: buf.len(),
            });
        }
        // The checks above are `NetlinkBuffer::new_checked`'s, kept here for their
        // numbers; with them its accessors cannot panic.
        let msg = NetlinkBuffer::new(&buf[..ulen]);
        out.push(NlMsg {
            msg_type: msg.message_type(),
            seq: msg.sequence_number(),
            payload: msg.payload(),
        });
        // NLMSG_ALIGN; the last message may end without its padding.
        let next = ulen
            .next_multiple_of(usize::from(NLMSG_ALIGNTO))
            .min(buf.len());
        buf = &buf[next..];
    }
    Ok(out)
}

/// The `int` an `NLMSG_DONE` carries: 0 or a negative errno.
fn done_code(msg: &NlMsg<'_>) -> Result<i32, ReplyError> {
    DoneBuffer::new_checked(msg.payload)
        .map(|done| done.code())
        .map_err(|_| ReplyError::ShortPayload {
            what: "NLMSG_DONE",
            len: msg.payload.len(),
            need: mem::size_of::<i32>(),
        })
}

/// The `int` an `NLMSG_ERROR` carries: 0 (an acknowledgement) or a negative errno.
fn error_code(msg: &NlMsg<'_>) -> Result<i32, ReplyError> {
    ErrorBuffer::new_checked(msg.payload)
        .map(|error| error.code().map_or(0, |code| code.get()))
        .map_err(|_| ReplyError::ShortPayload {
            what: "NLMSG_ERROR",
            len: msg.payload.len(),
            need: mem::size_of::<i32>(),
        })
}

/// What the dump loop makes of one message.
#[derive(Debug, PartialEq, Eq)]
enum DumpStep {
    Socket(DiagMsg),
    /// A message of an earlier request, or `NLMSG_NOOP`.
    Ignore,
    Done,
    Failed(i32),
}

fn dump_step(msg: &NlMsg<'_>, seq: u32) -> Result<DumpStep, ReplyError> {
    if msg.seq != seq {
        return Ok(DumpStep::Ignore);
    }
    match msg.msg_type {
        NLMSG_NOOP => Ok(DumpStep::Ignore),
        NLMSG_OVERRUN => Err(ReplyError::Overrun),
        // A dump ends with DONE, whose int is 0 unless the dump failed midway.
        NLMSG_DONE => match done_code(msg)? {
            0 => Ok(DumpStep::Done),
            e => Ok(DumpStep::Failed(-e)),
        },
        // A rejected dump request is answered with an error instead.
        NLMSG_ERROR => match error_code(msg)? {
            0 => Ok(DumpStep::Done),
            e => Ok(DumpStep::Failed(-e)),
        },
        SOCK_DIAG_BY_FAMILY => Ok(DumpStep::Socket(DiagMsg::decode(msg.payload)?)),
        other => Err(ReplyError::UnexpectedType(other)),
    }
}

/// The kernel's answer to an acknowledged request, if `msg` is it.
fn ack_of(msg: &NlMsg<'_>, seq: u32) -> Result<Option<i32>, ReplyError> {
    if msg.seq != seq || msg.msg_type != NLMSG_ERROR {
        return Ok(None);
    }
    error_code(msg).map(|e| Some(-e))
}

/// How much of one dump is read before it counts as failed.
#[derive(Debug, Clone, Copy)]
struct DumpLimits {
    datagrams: usize,
    bytes: usize,
    time: Duration,
}

impl DumpLimits {
    const DEFAULT: DumpLimits = DumpLimits {
        datagrams: MAX_DUMP_DATAGRAMS,
        bytes: MAX_DUMP_BYTES,
        time: MAX_DUMP_TIME,
    };
}

/// Where replies come from: the netlink socket, or a test's datagrams.
trait Datagrams {
    /// The next datagram, whole, within [`RECV_TIMEOUT`].
    fn next_datagram(&mut self, netns: &str) -> Result<&[u8], SockDiagError>;
}

/// Reads the replies to dump `seq` up to its end, handing each socket to `each`.
fn read_dump(
    source: &mut impl Datagrams,
    netns: &str,
    request: &'static str,
    seq: u32,
    limits: DumpLimits,
    mut each: impl FnMut(DiagMsg),
) -> Result<(), SockDiagError> {
    let reply_err = |source| SockDiagError::Reply {
        netns: netns.to_owned(),
        source,
    };
    let started = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..limits.datagrams {
        let datagram = source.next_datagram(netns)?;
        bytes += datagram.len();
        if bytes > limits.bytes {
            return Err(reply_err(ReplyError::DumpTooLarge {
                limit: limits.bytes,
                what: "bytes",
            }));
        }
        for msg in split_messages(datagram).map_err(reply_err)? {
            match dump_step(&msg, seq).map_err(reply_err)? {
                DumpStep::Socket(m) => each(m),
                DumpStep::Ignore => {}
                DumpStep::Done => return Ok(()),
                DumpStep::Failed(errno) => {
                    return Err(SockDiagError::Kernel {
                        netns: netns.to_owned(),
                        request,
                        source: io::Error::from_raw_os_error(errno),
                    })
                }
            }
        }
        if started.elapsed() >= limits.time {
            return Err(reply_err(ReplyError::DumpTooSlow(limits.time)));
        }
    }
    Err(reply_err(ReplyError::DumpTooLarge {
        limit: limits.datagrams,
        what: "datagrams",
    }))
}

/// Reads replies until the acknowledgement of request `seq`: `Ok(Err)` when the kernel
/// refused it.
fn read_ack(
    source: &mut impl Datagrams,
    netns: &str,
    seq: u32,
) -> Result<Result<(), io::Error>, SockDiagError> {
    let reply_err = |source| SockDiagError::Reply {
        netns: netns.to_owned(),
        source,
    };
    let mut replies = 0;
    while replies < MAX_ACK_REPLIES {
        let datagram = source.next_datagram(netns)?;
        let msgs = split_messages(datagram).map_err(reply_err)?;
        // An empty datagram counts as one reply, so that a stream of them ends too.
        replies += msgs.len().max(1);
        for reply in msgs {
            match ack_of(&reply, seq).map_err(reply_err)? {
                Some(0) => return Ok(Ok(())),
                Some(errno) => return Ok(Err(io::Error::from_raw_os_error(errno))),
                None => {}
            }
        }
    }
    Err(reply_err(ReplyError::NoAck(MAX_ACK_REPLIES)))
}

/// A `NETLINK_SOCK_DIAG` socket, bound to the namespace it was created in.
struct DiagSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl DiagSocket {
    fn open() -> io::Result<Self> {
        let sock = Socket::new(NETLINK_SOCK_DIAG)?;
        // Every receive below is bounded by this (SO_RCVTIMEO).
        SockRef::from(&sock).set_read_timeout(Some(RECV_TIMEOUT))?;
        Ok(DiagSocket {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, netns: &str, request: &[u8]) -> Result<(), SockDiagError> {
        // Port 0 addresses the kernel.
        let kernel = NetlinkAddr::new(0, 0);
        loop {
            match self.sock.send_to(request, &kernel, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(SockDiagError::Syscall {
                        netns: netns.to_owned(),
                        call: "sendto(NETLINK_SOCK_DIAG)",
                        source,
                    })
                }
            }
        }
    }

    /// Dumps the TCP sockets of `family` in the `states` mask, handing each to `each`.
    fn dump(
        &mut self,
        netns: &str,
        request: &'static str,
        family: u8,
        states: u32,
        each: impl FnMut(DiagMsg),
    ) -> Result<(), SockDiagError> {
        let seq = self.next_seq();
        self.send(netns, &dump_request(seq, family, states))?;
        read_dump(self, netns, request, seq, DumpLimits::DEFAULT, each)
    }

    /// Asks the kernel to destroy one socket: `Err` when talking to the kernel failed,
    /// `Ok(Err)` when the kernel refused.
    fn destroy(
        &mut self,
        netns: &str,
        msg: &DiagMsg,
    ) -> Result<Result<(), io::Error>, SockDiagError> {
        let seq = self.next_seq();
        self.send(netns, &destroy_request(seq, msg))?;
        read_ack(self, netns, seq)
    }
}

impl Datagrams for DiagSocket {
    fn next_datagram(&mut self, netns: &str) -> Result<&[u8], SockDiagError> {
        loop {
            // MSG_TRUNC: netlink returns the datagram's real length, so a cut is visible.
            match self.sock.recv(&mut &mut self.buf[..], libc::MSG_TRUNC) {
                Ok(len) if len > self.buf.len() => {
                    return Err(SockDiagError::Reply {
                        netns: netns.to_owned(),
                        source: ReplyError::Truncated {
                            len,
                            cap: self.buf.len(),
                        },
                    })
                }
                Ok(len) => return Ok(&self.buf[..len]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(SockDiagError::Silent {
                        netns: netns.to_owned(),
                        timeout: RECV_TIMEOUT,
                    })
                }
                Err(source) => {
                    return Err(SockDiagError::Syscall {
                        netns: netns.to_owned(),
                        call: "recv(NETLINK_SOCK_DIAG)",
                        source,
                    })
                }
            }
        }
    }
}

/// Creates a sock_diag socket inside the namespace `ns` from a thread that exists only
/// for that: it enters the namespace, creates the socket and ends.
fn socket_in_netns(ns: File, netns: &str) -> Result<DiagSocket, SockDiagError> {
    let syscall = |call, source| SockDiagError::Syscall {
        netns: netns.to_owned(),
        call,
        source,
    };
    let thread = std::thread::Builder::new()
        .name("detour-netns".into())
        .spawn(move || -> Result<DiagSocket, (&'static str, io::Error)> {
            // SAFETY: `ns` is an open namespace file for the duration of the call.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(("setns(CLONE_NEWNET)", io::Error::last_os_error()));
            }
            DiagSocket::open().map_err(|e| ("socket(AF_NETLINK, NETLINK_SOCK_DIAG)", e))
        })
        .map_err(|e| syscall("spawning the namespace thread", e))?;
    match thread.join() {
        Ok(result) => result.map_err(|(call, e)| syscall(call, e)),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A network namespace's identity: the device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct NetnsKey {
    dev: u64,
    inode: u64,
}

impl NetnsKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        NetnsKey {
            dev: meta.dev(),
            inode: meta.ino(),
        }
    }
}

/// A namespace file opened through one of its processes.
struct OpenedNetns {
    file: File,
    pid: u32,
    key: NetnsKey,
}

impl OpenedNetns {
    fn label(&self) -> String {
        format!("/proc/{}/ns/net (net:[{}])", self.pid, self.key.inode)
    }
}

/// Whether an error on `/proc/<pid>/...` only means the process has gone (or is a
/// zombie, whose namespaces are gone).
fn process_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

fn netns_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// The processes of `root` and its descendants, read from each `cgroup.procs`. Those in
/// another PID namespace than the agent's read as pid 0 and cannot be entered: they
/// are left out with a warning (an agent in a pod needs the host's PID namespace).
fn cgroup_pids(root: &Path) -> Result<Vec<u32>, SockDiagError> {
    let too_large = |what, limit| SockDiagError::CgroupTooLarge {
        path: root.to_owned(),
        what,
        limit,
    };
    let mut pids = Vec::new();
    let mut hidden = 0usize;
    let mut stack = vec![(root.to_owned(), 0usize)];
    let mut cgroups = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        cgroups += 1;
        if cgroups > MAX_CGROUPS {
            return Err(too_large("cgroups", MAX_CGROUPS));
        }
        let cgroup_err = |path: &Path, call, source| SockDiagError::Cgroup {
            path: path.to_owned(),
            call,
            source,
        };
        // Only the cgroup asked for must exist; a descendant may be removed meanwhile.
        let is_root = depth == 0;
        let procs_path = dir.join("cgroup.procs");
        let procs = match std::fs::read_to_string(&procs_path) {
            Ok(procs) => procs,
            // Gone with its cgroup; if only the file is missing, the children still count.
            Err(e) if !is_root && e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(cgroup_err(&procs_path, "reading cgroup.procs", e)),
        };
        for line in procs.lines() {
            let Ok(pid) = line.trim().parse::<u32>() else {
                continue;
            };
            // A process outside the reader's PID namespace reads as pid 0.
            if pid == 0 {
                hidden += 1;
                continue;
            }
            pids.push(pid);
            if pids.len() > MAX_PROCESSES {
                return Err(too_large("processes", MAX_PROCESSES));
            }
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if !is_root && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(cgroup_err(&dir, "listing child cgroups", e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| cgroup_err(&dir, "listing child cgroups", e))?;
            let is_dir = entry
                .file_type()
                .map_err(|e| cgroup_err(&entry.path(), "stat", e))?
                .is_dir();
            if is_dir {
                if depth + 1 > MAX_CGROUP_DEPTH {
                    return Err(too_large("levels of cgroups", MAX_CGROUP_DEPTH));
                }
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    if hidden > 0 {
        warn!(
            cgroup = %root.display(),
            hidden,
            "processes in another PID namespace (cgroup.procs shows pid 0): their sockets \
             cannot be destroyed; run the agent in the host's PID namespace (hostPID)"
        );
    }
    Ok(pids)
}

/// The distinct network namespaces of `pids`, each with the processes in it; processes
/// that have gone are left out, other failures are returned beside.
fn netns_of_pids(pids: &[u32]) -> (BTreeMap<NetnsKey, Vec<u32>>, Vec<SockDiagError>) {
    let mut namespaces: BTreeMap<NetnsKey, Vec<u32>> = BTreeMap::new();
    let mut errors = Vec::new();
    for &pid in pids {
        let path = netns_path(pid);
        match std::fs::metadata(&path) {
            Ok(meta) => namespaces.entry(NetnsKey::of(&meta)).or_default().push(pid),
            Err(e) if process_gone(&e) => {}
            Err(e) => errors.push(SockDiagError::Syscall {
                netns: path.display().to_string(),
                call: "stat",
                source: e,
            }),
        }
    }
    (namespaces, errors)
}

/// Opens namespace `key` through the first of `pids` still in it; `None` when none is
/// (the namespace may be gone). Holding the file keeps the namespace alive from here on.
fn open_netns(key: NetnsKey, pids: &[u32]) -> Result<Option<OpenedNetns>, SockDiagError> {
    for &pid in pids {
        let path = netns_path(pid);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if process_gone(&e) => continue,
            Err(e) => {
                return Err(SockDiagError::Syscall {
                    netns: path.display().to_string(),
                    call: "open",
                    source: e,
                })
            }
        };
        let meta = file.metadata().map_err(|e| SockDiagError::Syscall {
            netns: path.display().to_string(),
            call: "fstat",
            source: e,
        })?;
        // The pid may have been reused by a process in another namespace.
        if NetnsKey::of(&meta) == key {
            return Ok(Some(OpenedNetns { file, pid, key }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::thread;
    use std::time::Instant;

    use detour_testbed::{require_root, wait_with_timeout, Cgroup, Netns, TempDir};
    use netlink_packet_core::Emitable;
    use netlink_packet_sock_diag::inet::SocketIdBuffer;

    /// `struct inet_diag_sockid`.
    const SOCKID_LEN: usize = mem::size_of::<SocketIdBuffer>();

    use super::*;

    #[test]
    fn the_kernels_answer_to_a_destroy_names_what_is_missing() {
        let of = |errno| DestroyUnavailable::from_kernel(&io::Error::from_raw_os_error(errno));
        assert_eq!(of(libc::EOPNOTSUPP), DestroyUnavailable::NotBuilt);
        assert_eq!(of(libc::ENOENT), DestroyUnavailable::NoTcpDiag);
        assert_eq!(of(libc::EPERM), DestroyUnavailable::NotPermitted);
        assert!(matches!(of(libc::EINVAL), DestroyUnavailable::Failed(_)));
        assert!(DestroyUnavailable::NotBuilt
            .to_string()
            .contains("CONFIG_INET_DIAG_DESTROY"));
        assert!(DestroyUnavailable::NoTcpDiag
            .to_string()
            .contains("modprobe tcp_diag"));
    }

    #[test]
    fn the_destroy_probe_closes_its_own_listener_on_this_kernel() {
        detour_testbed::require_root("destroying a socket through sock_diag").unwrap();
        let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        assert_eq!(
            listener.accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        destroy_listener(&listener).unwrap();
        // A destroyed listener is closed: accept no longer waits for connections.
        let e = listener.accept().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        assert_eq!(probe_destroy(), Ok(()));
    }

    // ---- encoding and decoding, against the kernel's byte layouts (x86_64 and the
    // other little-endian targets detour runs on) ----

    #[test]
    #[cfg(target_endian = "little")]
    fn dump_request_is_an_inet_diag_req_v2_dump() {
        let bytes = dump_request(7, libc::AF_INET6 as u8, Which::Both.state_mask());
        #[rustfmt::skip]
        let mut expected = vec![
            72, 0, 0, 0,        // nlmsg_len
            20, 0,              // nlmsg_type SOCK_DIAG_BY_FAMILY
            0x01, 0x03,         // NLM_F_REQUEST | NLM_F_ROOT | NLM_F_MATCH
            7, 0, 0, 0,         // nlmsg_seq
            0, 0, 0, 0,         // nlmsg_pid
            10, 6, 0, 0,        // AF_INET6, IPPROTO_TCP, idiag_ext, pad
            0x06, 0x01, 0, 0,   // idiag_states: ESTABLISHED, SYN_SENT, CLOSE_WAIT
        ];
        expected.extend_from_slice(&[0; SOCKID_LEN]);
        assert_eq!(bytes, expected);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn destroy_request_names_the_socket_by_its_whole_id() {
        let msg = DiagMsg {
            family: libc::AF_INET as u8,
            state: TCP_ESTABLISHED,
            id: SockId {
                sport: 40000,
                dport: 8080,
                src: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
                dst: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
                interface: 3,
                cookie: 0x0000_0001_0000_0002,
            },
        };
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &[72, 0, 0, 0, 21, 0, 0x05, 0x00, 9, 0, 0, 0, 0, 0, 0, 0][..], // SOCK_DESTROY, REQUEST|ACK
            &[2, 6, 0, 0, 0, 0, 0, 0],          // AF_INET, IPPROTO_TCP, no states
            &[0x9c, 0x40, 0x1f, 0x90],          // sport 40000, dport 8080, big-endian
            &[127, 0, 0, 1], &[0; 12],          // idiag_src
            &[127, 0, 0, 2], &[0; 12],          // idiag_dst
            &[3, 0, 0, 0],                      // idiag_if
            &[2, 0, 0, 0, 1, 0, 0, 0],          // idiag_cookie: low half, high half
        ]
        .concat();
        assert_eq!(destroy_request(9, &msg), expected);
    }

    /// An `inet_diag_msg` as the kernel writes it, followed by an attribute.
    #[rustfmt::skip]
    fn kernel_diag_msg(family: u8, state: u8, dst: [u8; 16], cookie: [u8; 8]) -> Vec<u8> {
        [
            &[family, state, 0, 0][..],         // family, state, timer, retrans
            &[0xa4, 0x10, 0x01, 0xbb],          // sport 42000, dport 443
            &[10, 0, 0, 9], &[0; 12],           // idiag_src
            &dst,                               // idiag_dst
            &[0, 0, 0, 0],                      // idiag_if
            &cookie,                            // idiag_cookie
            &[0; 20],                           // expires, rqueue, wqueue, uid, inode
            &[8, 0, 1, 0, 0, 0, 0, 0],          // an INET_DIAG_* attribute: ignored
        ]
        .concat()
    }

    fn nlmsg(msg_type: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&msg_type.to_ne_bytes());
        out.extend_from_slice(&(libc::NLM_F_MULTI as u16).to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&4242u32.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize((len + 3) & !3, 0);
        out
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn diag_msg_decodes_and_its_id_round_trips() {
        let mut dst = [0; 16];
        dst[..4].copy_from_slice(&[10, 1, 2, 3]);
        let payload = kernel_diag_msg(2, TCP_SYN_SENT, dst, [0xef, 0xbe, 0xad, 0xde, 7, 0, 0, 0]);
        let msg = DiagMsg::decode(&payload).unwrap();
        assert_eq!(msg.family, 2);
        assert_eq!(msg.state, TCP_SYN_SENT);
        assert_eq!(msg.id.sport, 42000);
        assert_eq!(msg.id.cookie, 0x7_dead_beef);
        assert_eq!(msg.id.dst(), "10.1.2.3:443".parse().unwrap());
        let mut id = vec![0; SOCKID_LEN];
        msg.id.to_crate().emit(&mut id);
        assert_eq!(id, payload[4..4 + SOCKID_LEN]);

        let err = DiagMsg::decode(&payload[..DIAG_MSG_LEN - 1]).unwrap_err();
        assert!(matches!(
            err,
            ReplyError::ShortPayload {
                need: DIAG_MSG_LEN,
                ..
            }
        ));
    }

    #[test]
    fn ipv4_mapped_destinations_read_as_ipv4() {
        let mapped: Ipv6Addr = "::ffff:10.0.0.1".parse().unwrap();
        let msg = DiagMsg::decode(&kernel_diag_msg(10, 1, mapped.octets(), [0; 8])).unwrap();
        assert_eq!(msg.id.dst(), "10.0.0.1:443".parse().unwrap());

        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        let msg = DiagMsg::decode(&kernel_diag_msg(10, 1, v6.octets(), [0; 8])).unwrap();
        assert_eq!(msg.id.dst(), "[fd00::1]:443".parse().unwrap());

        // The crate refuses to read an inet_diag_msg of another family.
        let err = DiagMsg::decode(&kernel_diag_msg(1, 1, v6.octets(), [0; 8])).unwrap_err();
        assert!(
            matches!(err, ReplyError::Undecodable { .. }),
            "AF_UNIX is no TCP family: {err}"
        );
    }

    #[test]
    fn state_masks_select_the_documented_states() {
        assert_eq!(Which::Established.state_mask(), 1 << 1 | 1 << 8);
        assert_eq!(Which::Connecting.state_mask(), 1 << 2);
        assert_eq!(Which::Both.state_mask(), 1 << 1 | 1 << 2 | 1 << 8);
        assert!(!Which::Established.includes(TCP_SYN_SENT));
        assert!(!Which::Both.includes(6), "TIME_WAIT is never destroyed");
    }

    #[test]
    fn a_multipart_datagram_splits_into_its_messages() {
        let diag = kernel_diag_msg(2, 1, [0; 16], [1, 0, 0, 0, 0, 0, 0, 0]);
        let mut datagram = nlmsg(SOCK_DIAG_BY_FAMILY, 5, &diag);
        datagram.extend(nlmsg(libc::NLMSG_NOOP as u16, 5, &[1])); // padded to 4
        let done = nlmsg(libc::NLMSG_DONE as u16, 5, &0i32.to_ne_bytes());
        datagram.extend(done);
        let msgs = split_messages(&datagram).unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[1].payload, [1]);
        let steps: Vec<_> = msgs.iter().map(|m| dump_step(m, 5).unwrap()).collect();
        assert!(matches!(steps[0], DumpStep::Socket(m) if m.id.cookie == 1));
        assert_eq!(steps[1], DumpStep::Ignore);
        assert_eq!(steps[2], DumpStep::Done);
        // The last message's padding may be missing.
        let unpadded = &nlmsg(libc::NLMSG_NOOP as u16, 5, &[1])[..17];
        assert_eq!(split_messages(unpadded).unwrap().len(), 1);
    }

    #[test]
    fn malformed_datagrams_are_errors_not_loops() {
        let msg = nlmsg(libc::NLMSG_DONE as u16, 1, &0i32.to_ne_bytes());
        assert_eq!(
            split_messages(&msg[..10]).unwrap_err(),
            ReplyError::ShortHeader { left: 10 }
        );
        let mut short = msg.clone();
        short[0] = 8; // shorter than its own header: would never advance
        assert_eq!(
            split_messages(&short).unwrap_err(),
            ReplyError::BadLength { len: 8, left: 20 }
        );
        let mut long = msg;
        long[0] = 200;
        assert_eq!(
            split_messages(&long).unwrap_err(),
            ReplyError::BadLength { len: 200, left: 20 }
        );
        let done = nlmsg(libc::NLMSG_DONE as u16, 1, &[]);
        let msgs = split_messages(&done).unwrap();
        assert!(matches!(
            dump_step(&msgs[0], 1),
            Err(ReplyError::ShortPayload {
                what: "NLMSG_DONE",
                ..
            })
        ));
    }

    #[test]
    fn dump_steps_follow_seq_and_kernel_errors() {
        let step = |ty: i32, seq: u32, payload: &[u8]| {
            let datagram = nlmsg(ty as u16, seq, payload);
            let msgs = split_messages(&datagram).unwrap();
            dump_step(&msgs[0], 3)
        };
        let eperm = (-libc::EPERM).to_ne_bytes();
        assert_eq!(
            step(libc::NLMSG_DONE, 3, &eperm),
            Ok(DumpStep::Failed(libc::EPERM))
        );
        assert_eq!(
            step(libc::NLMSG_ERROR, 3, &eperm),
            Ok(DumpStep::Failed(libc::EPERM))
        );
        assert_eq!(
            step(libc::NLMSG_DONE, 2, &0i32.to_ne_bytes()),
            Ok(DumpStep::Ignore)
        );
        assert_eq!(step(libc::NLMSG_OVERRUN, 3, &[]), Err(ReplyError::Overrun));
        assert_eq!(step(99, 3, &[]), Err(ReplyError::UnexpectedType(99)));
        assert!(matches!(
            step(SOCK_DIAG_BY_FAMILY.into(), 3, &[0; 8]),
            Err(ReplyError::ShortPayload {
                what: "inet_diag_msg",
                ..
            })
        ));
    }

    #[test]
    fn acks_are_matched_by_seq() {
        let ack = |seq: u32, errno: i32| {
            // An error message carries the int and then the request's header.
            let mut payload = (-errno).to_ne_bytes().to_vec();
            payload.extend_from_slice(&[0; NLMSG_HDRLEN]);
            let datagram = nlmsg(libc::NLMSG_ERROR as u16, seq, &payload);
            let msgs = split_messages(&datagram).unwrap();
            ack_of(&msgs[0], 4)
        };
        assert_eq!(ack(4, 0), Ok(Some(0)));
        assert_eq!(ack(4, libc::ENOENT), Ok(Some(libc::ENOENT)));
        assert_eq!(ack(3, 0), Ok(None), "an earlier request's ack");
    }

    /// The same datagram, again and again: a kernel (or a bug) that never ends a reply.
    struct Endless {
        datagram: Vec<u8>,
        reads: usize,
    }

    impl Datagrams for Endless {
        fn next_datagram(&mut self, _netns: &str) -> Result<&[u8], SockDiagError> {
            self.reads += 1;
            Ok(&self.datagram)
        }
    }

    fn endless_sockets(seq: u32) -> Endless {
        let diag = kernel_diag_msg(2, TCP_ESTABLISHED, [0; 16], [1, 0, 0, 0, 0, 0, 0, 0]);
        Endless {
            datagram: [
                nlmsg(SOCK_DIAG_BY_FAMILY, seq, &diag),
                nlmsg(SOCK_DIAG_BY_FAMILY, seq, &diag),
            ]
            .concat(),
            reads: 0,
        }
    }

    #[test]
    fn a_dump_that_never_ends_stops_at_its_limits() {
        let limits = DumpLimits {
            datagrams: 5,
            bytes: usize::MAX,
            time: Duration::from_secs(3600),
        };
        let mut source = endless_sockets(1);
        let mut sockets = 0;
        let err = read_dump(&mut source, "test", "dump", 1, limits, |_| sockets += 1).unwrap_err();
        assert!(
            matches!(
                err,
                SockDiagError::Reply {
                    source: ReplyError::DumpTooLarge {
                        limit: 5,
                        what: "datagrams"
                    },
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!((source.reads, sockets), (5, 10));

        let mut source = endless_sockets(1);
        let len = source.datagram.len();
        let by_bytes = DumpLimits {
            bytes: 3 * len,
            ..limits
        };
        let err = read_dump(&mut source, "test", "dump", 1, by_bytes, |_| {}).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("passed {} bytes", 3 * len)),
            "{err}"
        );
        assert_eq!(
            source.reads, 4,
            "the datagram past the limit is not decoded"
        );

        let mut source = endless_sockets(1);
        let by_time = DumpLimits {
            time: Duration::ZERO,
            ..limits
        };
        let err = read_dump(&mut source, "test", "dump", 1, by_time, |_| {}).unwrap_err();
        assert!(
            matches!(
                err,
                SockDiagError::Reply {
                    source: ReplyError::DumpTooSlow(_),
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(source.reads, 1);
    }

    #[test]
    fn an_acknowledgement_that_never_comes_stops_after_a_bounded_wait() {
        // Replies to another request, then nothing at all: both end.
        for mut source in [
            endless_sockets(1),
            Endless {
                datagram: Vec::new(),
                reads: 0,
            },
        ] {
            let err = read_ack(&mut source, "test", 2).unwrap_err();
            assert!(
                matches!(
                    err,
                    SockDiagError::Reply {
                        source: ReplyError::NoAck(MAX_ACK_REPLIES),
                        ..
                    }
                ),
                "{err}"
            );
            assert!(source.reads <= MAX_ACK_REPLIES, "{}", source.reads);
        }
        let mut payload = (-libc::EOPNOTSUPP).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; NLMSG_HDRLEN]);
        let mut source = Endless {
            datagram: nlmsg(libc::NLMSG_ERROR as u16, 2, &payload),
            reads: 0,
        };
        let refused = read_ack(&mut source, "test", 2).unwrap().unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EOPNOTSUPP));
    }

    proptest::proptest! {
        /// Whatever bytes arrive, the reply parsers return, without a panic.
        #[test]
        fn any_datagram_is_parsed_or_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Ok(msgs) = split_messages(&bytes) {
                for msg in &msgs {
                    let _ = dump_step(msg, msg.seq);
                    let _ = ack_of(msg, msg.seq);
                }
            }
        }

        /// Well-framed messages of any type and payload: the same.
        #[test]
        fn any_message_is_parsed_or_refused(
            msg_type in proptest::prop_oneof![
                proptest::strategy::Just(SOCK_DIAG_BY_FAMILY),
                proptest::strategy::Just(NLMSG_DONE),
                proptest::strategy::Just(NLMSG_ERROR),
                proptest::num::u16::ANY,
            ],
            family in proptest::prop_oneof![
                proptest::strategy::Just(AF_INET),
                proptest::strategy::Just(AF_INET6),
                proptest::num::u8::ANY,
            ],
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..160),
        ) {
            let mut payload = payload;
            if let Some(first) = payload.first_mut() {
                *first = family;
            }
            let datagram = nlmsg(msg_type, 1, &payload);
            let msgs = split_messages(&datagram).unwrap();
            proptest::prop_assert_eq!(msgs.len(), 1);
            let _ = dump_step(&msgs[0], 1);
            let _ = ack_of(&msgs[0], 1);
        }
    }

    // ---- the cgroup walk, on an ordinary directory tree ----

    #[test]
    fn cgroup_walk_reads_descendants_and_drops_gone_processes() {
        let dir = TempDir::new().unwrap();
        let me = std::process::id();
        // Above any pid_max (PID_MAX_LIMIT is 4194304): a process that has gone.
        let gone = 4_194_304;
        std::fs::write(dir.join("cgroup.procs"), format!("{me}\n{gone}\n")).unwrap();
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/cgroup.procs"), format!("{me}\n")).unwrap();
        // A child cgroup removed while we walk: no cgroup.procs any more.
        std::fs::create_dir(dir.join("gone")).unwrap();

        let mut pids = cgroup_pids(dir.path()).unwrap();
        pids.sort();
        assert_eq!(pids, [me, me, gone]);
        let (namespaces, errors) = netns_of_pids(&pids);
        assert!(errors.is_empty(), "{errors:?}");
        let mine = NetnsKey::of(&std::fs::metadata("/proc/self/ns/net").unwrap());
        assert_eq!(
            namespaces.into_iter().collect::<Vec<_>>(),
            [(mine, vec![me, me])]
        );
        assert_eq!(open_netns(mine, &[gone, me]).unwrap().unwrap().pid, me);
        assert!(open_netns(mine, &[gone]).unwrap().is_none(), "vanished");

        let err = cgroup_pids(&dir.join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing/cgroup.procs"), "{err}");
    }

    #[test]
    fn cgroup_walk_is_bounded_in_depth() {
        let dir = TempDir::new().unwrap();
        let deep: PathBuf = (0..=MAX_CGROUP_DEPTH).fold(dir.path().to_owned(), |p, _| p.join("d"));
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        let err = cgroup_pids(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                SockDiagError::CgroupTooLarge {
                    what: "levels of cgroups",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn nothing_to_destroy_touches_nothing() {
        let report =
            destroy_in_cgroup(Path::new("/nonexistent"), &[], Which::Both, &|_| true).unwrap();
        assert_eq!((report.destroyed, report.namespaces), (0, 0));
    }

    // ---- the kernel (root; loopback or namespaces this test creates) ----

    const WAIT: Duration = Duration::from_secs(5);

    fn cookie_of(sock: &impl AsRawFd) -> u64 {
        let mut cookie = 0u64;
        let mut len = mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: the option value points at a live u64 of the size passed.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    /// The sockets to `dst` in the states `which` selects, in this thread's namespace.
    fn sockets_to(dst: SocketAddr, which: Which) -> Vec<DiagMsg> {
        let mut sock = DiagSocket::open().unwrap();
        let mut found = Vec::new();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            sock.dump("test", "dump", family, which.state_mask(), |m| {
                if m.id.dst() == dst {
                    found.push(m);
                }
            })
            .unwrap();
        }
        found
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// A connected pair: (client, the server's end).
    fn connect(listener: &TcpListener, to: SocketAddr) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect_timeout(&to, WAIT).unwrap();
        let (server, _) = listener.accept().unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(WAIT)).unwrap();
        }
        (client, server)
    }

    fn read_once(s: &mut TcpStream) -> io::Result<Vec<u8>> {
        let mut buf = [0; 64];
        s.read(&mut buf).map(|n| buf[..n].to_vec())
    }

    /// Whether `client` still talks to `server` both ways.
    fn still_connected(client: &mut TcpStream, server: &mut TcpStream) -> bool {
        client.write_all(b"ping").is_ok()
            && read_once(server).ok().as_deref() == Some(b"ping")
            && server.write_all(b"pong").is_ok()
            && read_once(client).ok().as_deref() == Some(b"pong")
    }

    #[test]
    fn established_sockets_to_the_backend_are_aborted_and_others_untouched() {
        require_root("destroying sockets").unwrap();
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let (mut c1, mut s1) = connect(&a, a_addr);
        let (mut c2, mut s2) = connect(&a, a_addr);
        // A dual-stack AF_INET6 socket to the same IPv4 backend.
        let mapped = SocketAddr::new(
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
            a_addr.port(),
        );
        let (mut c4, _s4) = connect(&a, mapped);
        let (mut c3, mut s3) = connect(&b, b_addr);
        // Data that arrived before the abort is still read first.
        s2.write_all(b"unread").unwrap();
        wait_until("the data to arrive", || {
            let mut buf = [0; 6];
            c2.peek(&mut buf).is_ok_and(|n| n == 6)
        });

        let report = destroy_in_current_netns(&[a_addr], Which::Established, &|_| true).unwrap();
        assert_eq!(
            (
                report.destroyed,
                report.skipped,
                report.already_gone,
                report.namespaces
            ),
            (3, 0, 0, 1),
            "{report:?}"
        );
        assert!(
            report.failed.is_empty() && report.namespace_errors.is_empty(),
            "{report:?}"
        );

        // What the application sees: ECONNABORTED; what the backend sees: a reset.
        let aborted = |r: io::Result<Vec<u8>>| r.unwrap_err().raw_os_error();
        assert_eq!(aborted(read_once(&mut c1)), Some(libc::ECONNABORTED));
        assert_eq!(aborted(read_once(&mut c4)), Some(libc::ECONNABORTED));
        assert_eq!(read_once(&mut c2).unwrap(), b"unread");
        assert_eq!(aborted(read_once(&mut c2)), Some(libc::ECONNABORTED));
        assert_eq!(aborted(read_once(&mut s1)), Some(libc::ECONNRESET));
        // The error is reported once; after it the socket is simply closed.
        assert_eq!(read_once(&mut c1).unwrap(), b"");
        assert!(c1.write_all(b"x").is_err());
        assert!(
            still_connected(&mut c3, &mut s3),
            "the other backend's socket was hit"
        );

        let again = destroy_in_current_netns(&[a_addr], Which::Established, &|_| true).unwrap();
        assert_eq!(
            (again.destroyed, again.skipped),
            (0, 0),
            "not idempotent: {again:?}"
        );
    }

    #[test]
    fn sockets_the_predicate_refuses_survive() {
        require_root("destroying sockets").unwrap();
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let a_addr = a.local_addr().unwrap();
        let (mut c1, _s1) = connect(&a, a_addr);
        let (mut c2, mut s2) = connect(&a, a_addr);
        let keep = cookie_of(&c2);
        assert_ne!(cookie_of(&c1), keep);

        let report = destroy_in_current_netns(&[a_addr], Which::Both, &|c| c != keep).unwrap();
        assert_eq!((report.destroyed, report.skipped), (1, 1), "{report:?}");
        assert_eq!(
            read_once(&mut c1).unwrap_err().raw_os_error(),
            Some(libc::ECONNABORTED)
        );
        assert!(still_connected(&mut c2, &mut s2));
    }

    #[test]
    fn close_wait_sockets_are_aborted_after_their_data_and_eof() {
        require_root("destroying sockets").unwrap();
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let a_addr = a.local_addr().unwrap();
        let (mut c, mut s) = connect(&a, a_addr);
        let cookie = cookie_of(&c);
        s.write_all(b"bye").unwrap();
        drop(s); // FIN: the client is in CLOSE_WAIT until it closes
        wait_until("CLOSE_WAIT", || {
            sockets_to(a_addr, Which::Established)
                .iter()
                .any(|m| m.id.cookie == cookie && m.state == TCP_CLOSE_WAIT)
        });

        let report = destroy_in_current_netns(&[a_addr], Which::Connecting, &|_| true).unwrap();
        assert_eq!(report.destroyed, 0, "CLOSE_WAIT is not connecting");
        let report = destroy_in_current_netns(&[a_addr], Which::Established, &|_| true).unwrap();
        assert_eq!(report.destroyed, 1, "{report:?}");
        assert_eq!(read_once(&mut c).unwrap(), b"bye");
        assert_eq!(
            read_once(&mut c).unwrap(),
            b"",
            "the backend's FIN still reads as EOF"
        );
        let err = c.write_all(b"request").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED));
    }

    /// Both ends of a veth pair inside `ns`, the far end down, with a permanent neighbour
    /// entry for `10.231.20.2` so no ARP failure ends a connect early: every packet to it
    /// is silently lost.
    fn black_hole_in(ns: &Netns) -> SocketAddr {
        ns.ip(&["link", "add", "bh0", "type", "veth", "peer", "name", "bh1"])
            .unwrap();
        ns.ip(&["addr", "add", "10.231.20.1/30", "dev", "bh0"])
            .unwrap();
        ns.ip(&["link", "set", "bh0", "up"]).unwrap();
        ns.ip(&[
            "neigh",
            "add",
            "10.231.20.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "bh0",
            "nud",
            "permanent",
        ])
        .unwrap();
        // Bounds a connect the test fails to abort: 1 + 2 + 4 s instead of two minutes.
        ns.exec("sh", &["-c", "echo 2 > /proc/sys/net/ipv4/tcp_syn_retries"])
            .unwrap();
        "10.231.20.2:80".parse().unwrap()
    }

    #[test]
    fn handshakes_to_a_black_holed_backend_fail_at_once() {
        require_root("destroying sockets").unwrap();
        let ns = Netns::new().unwrap();
        let dst = black_hole_in(&ns);
        ns.run_in(|| {
            let (tx, rx) = mpsc::channel();
            let blocking = tx.clone();
            // Threads spawned here inherit this thread's namespace.
            thread::spawn(move || {
                let r = TcpStream::connect(dst);
                let _ = blocking.send(("blocking", r.map(drop), Instant::now()));
            });
            thread::spawn(move || {
                let r = TcpStream::connect_timeout(&dst, Duration::from_secs(30));
                let _ = tx.send(("nonblocking", r.map(drop), Instant::now()));
            });
            wait_until("two SYN_SENT sockets", || {
                sockets_to(dst, Which::Connecting).len() == 2
            });
            let report = destroy_in_current_netns(&[dst], Which::Established, &|_| true).unwrap();
            assert_eq!(report.destroyed, 0, "SYN_SENT is not established");

            let destroyed_at = Instant::now();
            let report = destroy_in_current_netns(&[dst], Which::Connecting, &|_| true).unwrap();
            assert_eq!(report.destroyed, 2, "{report:?}");
            for _ in 0..2 {
                let (which, result, at) = rx.recv_timeout(WAIT).expect("connect still hangs");
                let err = result.unwrap_err();
                assert_eq!(
                    err.raw_os_error(),
                    Some(libc::ECONNABORTED),
                    "{which}: {err}"
                );
                assert!(
                    at.duration_since(destroyed_at) < Duration::from_secs(1),
                    "{which}"
                );
            }
        })
        .unwrap();
    }

    /// A cgroup below a test's [`Cgroup`]; its processes are killed and it is removed on
    /// `Drop`, before the parent's guard removes the parent.
    struct ChildCgroup(PathBuf);

    impl ChildCgroup {
        fn new(parent: &Cgroup) -> Self {
            let path = parent.path().join("nested");
            std::fs::create_dir(&path).unwrap();
            ChildCgroup(path)
        }

        fn adopt(&self, pid: u32) {
            std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
        }
    }

    impl Drop for ChildCgroup {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                match std::fs::remove_dir(&self.0) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        thread::sleep(Duration::from_millis(10))
                    }
                    _ => return,
                }
            }
            eprintln!("sockdiag test: could not remove {}", self.0.display());
        }
    }

    fn accept_within(listener: &TcpListener) -> TcpStream {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(WAIT)).unwrap();
                    return s;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("accepting the helper's connection: {e}"),
            }
        }
    }

    #[test]
    fn sockets_of_processes_in_a_cgroup_are_found_in_their_namespace() {
        require_root("destroying sockets in a cgroup").unwrap();
        let cg = Cgroup::new().unwrap();
        let nested = ChildCgroup::new(&cg);
        let ns = Netns::new().unwrap();
        let listener = ns
            .run_in(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let dst = listener.local_addr().unwrap();
        // The application: connects inside the namespace, then waits for a reply.
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{} && echo hello >&3 && read -r line <&3; echo \"read $?\"",
            dst.port()
        );
        let mut app = cg
            .spawn(
                ns.command("bash")
                    .args(["-c", &script])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
            )
            .unwrap();
        nested.adopt(app.id());
        let mut server = accept_within(&listener);
        let mut hello = String::new();
        BufReader::new(&server).read_line(&mut hello).unwrap();
        assert_eq!(hello, "hello\n");

        // The walk finds the process in the nested cgroup, and its namespace.
        assert_eq!(cgroup_pids(cg.path()).unwrap(), [app.id()]);
        let (namespaces, errors) = netns_of_pids(&[app.id()]);
        assert!(errors.is_empty(), "{errors:?}");
        let expected = NetnsKey::of(&std::fs::metadata(ns.path()).unwrap());
        assert_eq!(namespaces.keys().copied().collect::<Vec<_>>(), [expected]);

        // From the host namespace the socket is invisible...
        let here = destroy_in_current_netns(&[dst], Which::Both, &|_| true).unwrap();
        assert_eq!(here.destroyed, 0);
        // ...through the cgroup it is found and aborted.
        let report = destroy_in_cgroup(cg.path(), &[dst], Which::Established, &|_| true).unwrap();
        assert!(report.namespace_errors.is_empty(), "{report:?}");
        assert_eq!((report.destroyed, report.namespaces), (1, 1), "{report:?}");

        let status = wait_with_timeout(&mut app, WAIT)
            .unwrap()
            .expect("the application still waits on its socket");
        assert!(status.success());
        let mut out = String::new();
        app.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let mut err = String::new();
        app.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(out, "read 1\n", "stderr: {err}");
        assert!(err.contains("Software caused connection abort"), "{err}");
        assert_eq!(
            read_once(&mut server).unwrap_err().raw_os_error(),
            Some(libc::ECONNRESET)
        );
        drop(nested);
    }

    #[test]
    fn a_cgroup_in_the_host_namespace_is_searched_too() {
        require_root("destroying sockets in a cgroup").unwrap();
        let cg = Cgroup::new().unwrap();
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let a_addr = a.local_addr().unwrap();
        let (mut c, _s) = connect(&a, a_addr);
        // A process in the host namespace; the socket is ours, not its: the namespace is
        // what the walk finds.
        let mut sleeper = cg.spawn(Command::new("sleep").arg("30")).unwrap();
        let report = destroy_in_cgroup(cg.path(), &[a_addr], Which::Both, &|_| true).unwrap();
        assert_eq!((report.destroyed, report.namespaces), (1, 1), "{report:?}");
        assert_eq!(
            read_once(&mut c).unwrap_err().raw_os_error(),
            Some(libc::ECONNABORTED)
        );
        drop(cg);
        assert!(wait_with_timeout(&mut sleeper, WAIT).unwrap().is_some());
    }
}
