//! Types shared between detour's eBPF programs and the agent.
//!
//! Everything here is the on-the-wire layout of a BPF map key or value, so:
//! - every type is `#[repr(C)]` with explicit-width integers, no `bool` and no implicit
//!   padding (padding bytes would be uninitialised in hash keys and break lookups);
//! - addresses are stored exactly as the kernel presents them in `bpf_sock_addr`: four
//!   `u32` words in network byte order, IPv4 as an IPv4-mapped IPv6 address
//!   (`::ffff:a.b.c.d`), ports as the network-order `u16` in the low half;
//! - userspace gets `aya::Pod` through the `user` feature; the eBPF side never does.
//!
//! Map names are constants here so the agent and the programs cannot disagree.
#![no_std]

/// IP protocol number of TCP; the only protocol whose connects detour rewrites.
pub const IPPROTO_TCP: u8 = 6;

/// `AF_INET` / `AF_INET6` as stored in [`Backend::family`].
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// Upper bound on the slots of one generation of a service's backend table.
///
/// A slot table repeats backend ids in proportion to their weights; the kernel picks a
/// uniformly random slot, so one lookup serves any weight distribution.
pub const MAX_SLOTS: u32 = 4096;

/// Default `max_entries` of the maps, overridable when the agent loads the object.
pub const DEFAULT_MAX_SERVICES: u32 = 131_072;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
pub const DEFAULT_MAX_TABLE_SLOTS: u32 = 1_048_576;
/// Sockets whose VIP `getpeername` can still return (LRU: the oldest are forgotten).
pub const DEFAULT_MAX_SOCKETS: u32 = 131_072;
/// Steered flows the translation table holds (a plain hash: a full table means a flow is
/// not steered, never that a live one is forgotten).
pub const DEFAULT_MAX_STEERED: u32 = 16_384;

/// SYN steering: when a rewritten socket's SYN goes unanswered for its handshake
/// timeout, `sock_ops` picks another backend and the tc program `detour_steer`
/// translates that one flow for its whole life (see the programs' module doc).
pub mod steer {
    /// [`crate::maps::STEER_CONTROL`] indexes. Only [`REMOVED`] and [`ENABLED`] are
    /// written by the agent; the kernel adds to the others atomically.
    ///
    /// Entries put into [`crate::maps::STEER`] since the map was created. The tc
    /// program does nothing while this equals [`REMOVED`]: the gate every packet pays.
    pub const INSERTED: u32 = 0;
    /// Entries the agent has deleted from [`crate::maps::STEER`] (after their grace).
    pub const REMOVED: u32 = 1;
    /// 1 once the agent has attached the tc program where the flows run; `sock_ops`
    /// steers nothing before.
    pub const ENABLED: u32 = 2;
    /// Flows steered (a flow steered twice counts twice).
    pub const STEERED: u32 = 3;
    /// Steerings not made because a table was full (or the reply tuple at the new
    /// backend was already another steered flow's).
    pub const TABLE_FULL: u32 = 4;
    /// Stalled handshakes that found no other backend to go to.
    pub const NO_CANDIDATE: u32 = 5;
    /// Packets from the abandoned backend of a steered flow, dropped (a late SYN-ACK).
    pub const LATE_DROPPED: u32 = 6;
    /// Steerings undone because the tc program never saw the flow's packets (its path
    /// leaves by a device detour is not attached to).
    pub const UNSEEN: u32 = 7;
    /// Steerings undone at their first packet because the new 4-tuple was already a
    /// socket's at this host (a connection, or its TIME_WAIT, from the same local port
    /// to the new backend; the flow is steered again at its next timeout), and reply
    /// entries dropped because a new connection of this host took their 4-tuple.
    pub const COLLISIONS: u32 = 8;
    /// Resets held back: a reset refusing a rewritten connect's SYN while another
    /// backend could take the flow is dropped, and the flow is steered at its next
    /// timeout instead of failing.
    pub const REFUSALS_HELD: u32 = 9;
    /// ICMP errors about a steered flow's packets to its new backend (unreachable,
    /// fragmentation needed / packet too big, time exceeded), translated so that the
    /// socket, which still believes its peer is the abandoned backend, takes them (path
    /// MTU discovery keeps working). ICMP errors about its packets to the abandoned
    /// backend count as [`LATE_DROPPED`].
    pub const ICMP_TRANSLATED: u32 = 10;
    /// Number of indexes.
    pub const COUNT: u32 = 11;

    /// How many times one flow may be steered before it is left to its own timeout.
    pub const MAX_STEERS: u32 = 3;
    /// Table slots (and as many standby slots) a steering examines from a random
    /// start: half of a connect's [`crate::SUSPECT_PROBES`], which keeps `sock_ops`
    /// within the verifier's budget. Tables are interleaved, so every backend whose
    /// share is above 1/8 is in the window.
    pub const PROBES: u32 = 8;
    /// [`crate::Steer::tried`] slot not used yet.
    pub const NO_BACKEND: u32 = u32::MAX;
    /// A handshake completed within this many `2^30` ns (~1.07 s) units counts as
    /// evidence that a backend is alive.
    pub const EVIDENCE_UNITS: u32 = 8;
    /// How long the entries of a closed steered flow are kept (its TIME_WAIT ACKs and
    /// a late retransmission still need translating), in ns.
    pub const CLOSED_GRACE_NS: u64 = 60_000_000_000;
}

/// Map names, as the `#[map]`/`#[btf_map]` statics are named in the object.
pub mod maps {
    /// [`crate::FrontendKey`] → [`crate::ServiceEntry`].
    pub const SERVICES: &str = "DETOUR_SERVICES";
    /// [`crate::SlotKey`] → backend id (`u32`).
    pub const SLOTS: &str = "DETOUR_SLOTS";
    /// backend id → [`crate::Backend`] (array; `family == 0` means unused).
    pub const BACKENDS: &str = "DETOUR_BACKENDS";
    /// backend id → [`crate::BackendStats`], per CPU.
    pub const BACKEND_STATS: &str = "DETOUR_BACKEND_STATS";
    /// socket cookie → [`crate::SockOrigin`] (LRU).
    pub const SOCK_ORIGIN: &str = "DETOUR_SOCK_ORIGIN";
    /// backend id → [`crate::BackendState`] (array, shared by all CPUs): the kernel's
    /// passive view of a backend, which the connect programs consult.
    pub const BACKEND_STATE: &str = "DETOUR_BACKEND_STATE";
    /// Ring buffer of [`crate::ConnEvent`]s for the agent.
    pub const EVENTS: &str = "DETOUR_EVENTS";
    /// [`crate::counters`] index → `u64`, per CPU.
    pub const COUNTERS: &str = "DETOUR_COUNTERS";
    /// One [`crate::ResetSeen`] per CPU: the socket whose reset this CPU is receiving.
    pub const RESET_SEEN: &str = "DETOUR_RESET_SEEN";
    /// [`crate::FlowKey`] of a steered socket (its own address and port, the backend
    /// its connect chose) → [`crate::Steer`]: where the tc program sends the flow.
    pub const STEER: &str = "DETOUR_STEER";
    /// [`crate::FlowKey`] of a steered flow as it really runs (its own address and port,
    /// the backend it was steered to) → [`crate::SteerBack`]: whose address the replies
    /// must carry.
    pub const STEER_BACK: &str = "DETOUR_STEER_BACK";
    /// [`crate::steer`] index → `u64` (array, shared by all CPUs).
    pub const STEER_CONTROL: &str = "DETOUR_STEER_CONTROL";
}

/// Global variables the agent sets when it loads the object.
pub mod globals {
    /// The kernel's `HZ`: jiffies per second, to express the initial SYN timeout.
    /// 0 leaves the kernel's own timeout alone.
    pub const HZ: &str = "DETOUR_HZ";
}

/// Size in bytes of [`maps::EVENTS`]: 256 KiB holds about 6,500 events (each takes
/// its 32 bytes and the ring's 8-byte header).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Pending (unread) bytes in [`maps::EVENTS`] from which every event wakes the agent:
/// an eighth of the ring, about 800 events. Below it only the events that decide
/// something at once wake it (see `emit` in the programs); the agent polls the ring
/// every [`EVENTS_POLL_MS`] for the rest, so a burst costs one wakeup, not one per
/// event, and the ring still never fills while the agent keeps up.
pub const EVENTS_WAKEUP_BYTES: u64 = EVENTS_RING_BYTES as u64 / 8;

/// How often the agent reads [`maps::EVENTS`] without being woken, in ms: the longest
/// an event that does not wake the agent waits to be read.
pub const EVENTS_POLL_MS: u64 = 10;

/// Indexes of [`maps::COUNTERS`].
pub mod counters {
    /// Events the ring buffer had no room for (dropped, never waited for).
    pub const EVENTS_DROPPED: u32 = 0;
    /// Events written to the ring buffer.
    pub const EVENTS_SENT: u32 = 1;
    /// Connects whose first pick was suspect and that went to another table member.
    pub const SUSPECT_AVOIDED: u32 = 2;
    /// Connects that went to the standby set because the members probed were suspect.
    pub const STANDBY_USED: u32 = 3;
    /// Connects that found only suspect backends and used the first pick anyway.
    pub const ALL_SUSPECT: u32 = 4;
    /// Number of counters.
    pub const COUNT: u32 = 5;
}

/// How many table slots a connect examines, from its random pick onwards, looking for a
/// backend that is not suspect (and as many again in the standby set). Tables are
/// interleaved, so a window this long holds every member whose share is above 1/16.
pub const SUSPECT_PROBES: u32 = 16;

/// Program function names in the object.
pub mod programs {
    pub const CONNECT4: &str = "detour_connect4";
    pub const CONNECT6: &str = "detour_connect6";
    pub const GETPEERNAME4: &str = "detour_getpeername4";
    pub const GETPEERNAME6: &str = "detour_getpeername6";
    /// `sock_ops`: watches rewritten connections and reports their outcomes.
    pub const SOCK_OPS: &str = "detour_sock_ops";
    /// tc (tcx on 6.6+, clsact before), egress: translates steered flows, both ways.
    pub const STEER: &str = "detour_steer";
    /// tc, ingress: translates steered flows' replies (except on `lo`, whose egress
    /// program already saw both directions) and holds back a reset that refuses a
    /// rewritten connect while another backend could take it.
    pub const STEER_INGRESS: &str = "detour_steer_ingress";
    /// Raw tracepoint `tcp_receive_reset`: notes, per CPU, the socket a reset is being
    /// received for, so that `sock_ops` can tell a reset from the backend apart from
    /// the local side aborting. Not cgroup-scoped: it runs for every reset the host
    /// receives and only writes [`crate::maps::RESET_SEEN`].
    pub const RECEIVE_RESET: &str = "detour_receive_reset";
    /// The tracepoint [`RECEIVE_RESET`] attaches to.
    pub const RECEIVE_RESET_TRACEPOINT: &str = "tcp_receive_reset";

    /// Every program, in the order the agent attaches them: the reset tracepoint, then
    /// `sock_ops`, so that every connect the connect programs rewrite from the start is
    /// also watched, and every close `sock_ops` sees can be told a reset or an abort.
    pub const ALL: [&str; 6] = [
        RECEIVE_RESET,
        SOCK_OPS,
        CONNECT4,
        CONNECT6,
        GETPEERNAME4,
        GETPEERNAME6,
    ];
}

/// A service frontend: the VIP and port an application connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// Network-order words; IPv4 is `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// Network-order port.
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// A frontend's current backend table and passive-health parameters.
///
/// The agent replaces this value in one map update to switch tables: `generation` says
/// which half of the slot space holds the live table, `slot_count` how many slots the
/// table has and `standby_count` how many standby slots follow them. The slots of a
/// generation are fully written before the entry points at them, so a connect sees the
/// old table or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Stable id of the frontend (key prefix of its slots).
    pub service_id: u32,
    /// 0 or 1: which generation of slots is live.
    pub generation: u32,
    /// Number of live slots (indexes `0..slot_count`); 0 means no backend, the connect
    /// is left alone.
    pub slot_count: u32,
    /// Number of standby slots (indexes `slot_count..slot_count + standby_count`): the
    /// next tier, used only when every table slot probed is suspect.
    pub standby_count: u32,
    /// Failed connects in a row after which the kernel marks a backend suspect on its
    /// own; 0 turns the kernel's marking off.
    pub fail_threshold: u32,
    /// How long a kernel suspect mark lasts if the agent does not act on it, in ms.
    pub suspect_ms: u32,
    /// Initial SYN timeout of rewritten connects, in ms (0: the kernel's default). A
    /// handshake with no answer by then is reported as a timeout.
    pub handshake_timeout_ms: u32,
    pub flags: u32,
}

/// One slot of a service's table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub service_id: u32,
    /// `generation * MAX_SLOTS + index`.
    pub slot: u32,
}

impl SlotKey {
    #[inline(always)]
    pub const fn new(service_id: u32, generation: u32, index: u32) -> Self {
        Self {
            service_id,
            slot: generation * MAX_SLOTS + index,
        }
    }
}

/// A backend address. An id's address never changes while any table refers to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Network-order words; IPv4 is `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// Network-order port.
    pub port: u16,
    /// [`AF_INET`], [`AF_INET6`], or 0 for an unused id.
    pub family: u8,
    pub pad: u8,
}

/// Per-backend counters kept by the kernel (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Connects rewritten to this backend.
    pub connects: u64,
    /// Of those, handshakes that completed.
    pub established: u64,
    /// Handshakes that failed without a retransmission timeout: refused or reset.
    pub refused: u64,
    /// Handshakes whose SYN went unanswered for two retransmission timeouts.
    pub timeouts: u64,
    /// Established connections the backend reset: a RST was received for them.
    pub resets: u64,
    /// Established connections this side ended without a close: the application
    /// aborted them (`SO_LINGER` 0, closing with unread data) or TCP gave up on them
    /// (retransmission or keepalive timeout). No RST was received. Appended after
    /// `resets` so that pinned maps of the older, shorter layout can be widened.
    pub aborts: u64,
}

/// The start of the kernel's `struct sock_common`, which opens every `struct sock`:
/// `skc_daddr`, `skc_rcv_saddr`, `skc_hash`, `skc_dport`, `skc_num`. This layout has not
/// changed since Linux 2.6 (the rest of the struct has), so it is read at these fixed
/// offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCommonHead {
    /// Remote IPv4 address, network order (an IPv6 socket's is not its peer).
    pub daddr: u32,
    pub rcv_saddr: u32,
    pub hash: u32,
    /// Remote port, network order.
    pub dport: u16,
    /// Local port, host order.
    pub num: u16,
}

/// What the `tcp_receive_reset` program last saw on a CPU ([`maps::RESET_SEEN`]).
///
/// The kernel receives a reset (`tcp_reset`) by firing the tracepoint, then closing the
/// socket (`tcp_done` → `tcp_set_state`), which runs `sock_ops`' state callback: the
/// same call chain on the same CPU, microseconds apart. A close whose socket matches
/// this record (local port, and remote address for IPv4) within
/// [`RESET_SEEN_WINDOW_NS`] was a received reset; any other established → close was the
/// local side. `sock_ops` clears the record when it uses it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetSeen {
    pub head: SockCommonHead,
    /// `bpf_ktime_get_ns()` when the reset was seen; 0 = nothing pending.
    pub at_ns: u64,
}

/// How long a [`ResetSeen`] record stays good: far longer than the microseconds between
/// the tracepoint and the state change, far shorter than a port's reuse.
pub const RESET_SEEN_WINDOW_NS: u64 = 10_000_000;

/// The kernel's passive view of one backend, shared by all CPUs.
///
/// Written by the `sock_ops` program as connections succeed and fail; the connect
/// programs avoid a backend while `suspect_until_ns` is in the future. The agent is the
/// authority: it clears the mark when it restores a backend or decides not to eject it,
/// and it resets the state when it hands the id to a new address. A mark it never acts
/// on (no agent running) expires by itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendState {
    /// `bpf_ktime_get_ns()` until which connects avoid this backend; 0 = not suspect.
    pub suspect_until_ns: u64,
    /// Failed handshakes since the last successful one (a first SYN retransmission
    /// does not count). 64 bits because that is the
    /// only width the BPF target has atomic adds for.
    pub fail_streak: u64,
    /// Smoothed handshake round-trip time in µs (0 = never measured); the initial SYN
    /// timeout is at least 3× this, so a far backend is not mistaken for a dead one.
    pub rtt_us: u32,
    /// When a handshake last completed, in `2^30` ns units of `bpf_ktime_get_ns()`
    /// (0 = never): the evidence of life SYN steering prefers.
    pub established_at: u32,
    /// A softer mark: a SYN was retransmitted and the handshake's outcome is not known
    /// yet (a black hole, or a listen queue that overflowed). Connects avoid the
    /// backend until then, but prefer it to one with a `suspect_until_ns` mark when
    /// everything is suspect. Lasts 4 handshake timeouts; a completed handshake ends it.
    pub soft_until_ns: u64,
}

/// Kinds of [`ConnEvent`].
pub mod event_kind {
    /// A handshake completed after one or more failures (the first success ends a
    /// failure run; other successes are only counted in [`crate::BackendStats`]).
    pub const ESTABLISHED: u32 = 1;
    /// A handshake failed without a retransmission timeout: refused or reset.
    pub const REFUSED: u32 = 2;
    /// The SYN went unanswered for a second retransmission timeout: a black hole.
    pub const TIMEOUT: u32 = 3;
    /// An established connection ended in a reset instead of a close. Sent only by
    /// older builds of the programs (a pinned program the agent is replacing): it decides
    /// nothing, so the programs now only count it in [`crate::BackendStats::resets`].
    pub const RESET: u32 = 4;
    /// The SYN went unanswered for the handshake timeout once and was retransmitted.
    /// A black hole, or a listen queue that overflowed: the kernel avoids the backend
    /// at once, but only [`TIMEOUT`] (or the handshake failing) counts as a failure,
    /// and a handshake that completes after all clears the suspicion.
    pub const SYN_RETRANSMIT: u32 = 5;
    /// A stalled handshake was steered to this backend (`backend_id`); the backend it
    /// left was reported as a [`TIMEOUT`] just before.
    pub const STEERED: u32 = 6;
}

/// One connection outcome, as the `sock_ops` program reports it through [`maps::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when it happened.
    pub ts_ns: u64,
    /// One of [`event_kind`].
    pub kind: u32,
    pub service_id: u32,
    pub backend_id: u32,
    /// The backend's failure run including this event (0 for a success).
    pub fail_streak: u32,
    /// Handshake RTT in µs for [`event_kind::ESTABLISHED`], else 0.
    pub rtt_us: u32,
    /// 1 if this event made the kernel mark the backend suspect.
    pub marked_suspect: u32,
}

/// What detour did to a socket at connect time; read back by `getpeername` so the
/// application sees the VIP it asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOrigin {
    pub vip: [u32; 4],
    pub backend: [u32; 4],
    pub vip_port: u16,
    pub backend_port: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// Copied from the frontend's [`ServiceEntry`] at connect time, so the `sock_ops`
    /// program needs no second lookup.
    pub fail_threshold: u32,
    pub suspect_ms: u32,
    pub handshake_timeout_ms: u32,
    /// [`ORIGIN_OUTCOME_REPORTED`] once the handshake's outcome has been reported.
    pub flags: u32,
}

/// [`SockOrigin::flags`]: the handshake's outcome has been reported.
pub const ORIGIN_OUTCOME_REPORTED: u32 = 1;
/// [`SockOrigin::flags`]: the agent is destroying this socket (its backend left); its
/// end is not the backend's doing and is neither counted nor reported.
pub const ORIGIN_DESTROYED_BY_AGENT: u32 = 2;

/// [`SockOrigin::flags`]: the socket's flow was steered to another backend (its
/// [`Steer`] entry says which); its peer address is still the connect's pick.
pub const ORIGIN_STEERED: u32 = 4;

/// [`SockOrigin::flags`]: a reset refusing this socket's SYN was held back (dropped
/// before the socket saw it) so that the flow is steered at its next timeout; that
/// timeout counts the backend as refused, not timed out, and clears the flag.
pub const ORIGIN_RESET_HELD: u32 = 8;

/// A TCP flow from the local socket's side. Addresses as everywhere (IPv4 mapped),
/// ports network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
}

/// Where a steered flow goes ([`maps::STEER`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Steer {
    /// The backend the flow is translated to.
    pub to: [u32; 4],
    pub to_port: u16,
    /// Times steered (1..=[`steer::MAX_STEERS`]); 0 = abandoned, the tc program
    /// ignores the entry until the agent deletes it.
    pub steps: u8,
    /// Set by the tc program: 1 once it has translated a packet of the flow, 2 when
    /// the new 4-tuple was already a socket's at this host (the entry is then inert
    /// until `sock_ops` steers the flow elsewhere).
    pub seen: u8,
    pub to_id: u32,
    /// Backend ids the flow has been sent to: the connect's pick, then each steering.
    pub tried: [u32; 4],
    pub service_id: u32,
    pub pad: u32,
    /// `bpf_ktime_get_ns()` of the last steering.
    pub steered_at_ns: u64,
    /// When the socket closed; 0 while it lives.
    pub closed_at_ns: u64,
    pub cookie: u64,
}

/// Whose address the replies of a steered flow carry ([`maps::STEER_BACK`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteerBack {
    pub from: [u32; 4],
    pub from_port: u16,
    pub pad: u16,
}

/// The IPv4-mapped prefix word (`::ffff:0:0/96`, third word) in network order.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), built only from integers, and have no padding
    // (checked by the size assertions below), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::ServiceEntry {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::SockOrigin {}
    unsafe impl aya::Pod for super::BackendState {}
    unsafe impl aya::Pod for super::ConnEvent {}
    unsafe impl aya::Pod for super::ResetSeen {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Steer {}
    unsafe impl aya::Pod for super::SteerBack {}
}

// No implicit padding anywhere: the sizes are the sums of the field sizes.
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 20);
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 32);
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 20);
const _: () = assert!(core::mem::size_of::<BackendStats>() == 48);
const _: () = assert!(core::mem::size_of::<SockCommonHead>() == 16);
const _: () = assert!(core::mem::size_of::<ResetSeen>() == 24);
const _: () = assert!(core::mem::size_of::<BackendState>() == 32);
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 32);
const _: () = assert!(core::mem::size_of::<SockOrigin>() == 60);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 36);
const _: () = assert!(core::mem::size_of::<Steer>() == 72);
const _: () = assert!(core::mem::size_of::<SteerBack>() == 20);
