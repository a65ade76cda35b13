//! detour's eBPF programs: connect-time service translation.
//!
//! `cgroup/connect4|6` look the destination up in `DETOUR_SERVICES`; on a hit they pick a
//! uniformly random slot of the frontend's live table (one hash lookup for the frontend,
//! one for the slot, one array lookup for the backend: O(1) whatever the number of
//! backends or their weights) and rewrite the destination to that backend. The VIP is
//! remembered by socket cookie in an LRU map so `cgroup/getpeername4|6` can hand it back
//! to the application. (Socket-local storage was measured at ~1.5 µs per connect for its
//! allocation; the preallocated LRU costs nothing measurable. Cookies are never reused,
//! so an entry can only ever match its own socket; an entry evicted from a full map makes
//! `getpeername` show the backend instead of the VIP, never a wrong address.)
//!
//! Passive health (`sock_ops`, attached to the same cgroup): for every socket the connect
//! programs rewrote (it has a `DETOUR_SOCK_ORIGIN` entry) the program asks for state and
//! retransmission-timeout callbacks, shortens the initial SYN timeout to the service's
//! handshake timeout (at least 3× the backend's measured handshake RTT), and reports the
//! outcome: a first SYN retransmission (suspect), a second one (timeout: a black hole),
//! SYN_SENT → CLOSE before that (refused or reset), established, established → CLOSE
//! (a reset the backend sent, or an abort of the local side: see below). Outcomes are
//! counted per backend per CPU. Only what can change the agent's
//! mind goes to it through a ring buffer: failures, first SYN retransmissions and the
//! success that ends a failure run. A reset after an established connection and a
//! success with no failure run before it decide nothing and are only counted, so the
//! common connect pays for no event. A full ring drops the event and counts the drop.
//!
//! Events are batched: only the first failure of a run and the failure that reaches the
//! service's `fail_threshold` wake the agent at once (`BPF_RB_FORCE_WAKEUP`); the rest
//! are written with `BPF_RB_NO_WAKEUP` and read at the agent's next periodic poll
//! (`EVENTS_POLL_MS`), or woken for once the ring holds `EVENTS_WAKEUP_BYTES`. A burst of
//! failures costs one wakeup instead of one per event, and what the agent decides on
//! reaches it no later than before.
//!
//! In-kernel fast path: a failure that completes `fail_threshold` failures in a row
//! marks the backend suspect in `DETOUR_BACKEND_STATE` until `suspect_ms` from now; a
//! first SYN retransmission marks it softly suspect for 4 handshake timeouts (its
//! handshake completing ends that). A
//! connect whose random pick is suspect looks at the next [`SUSPECT_PROBES`] slots of the
//! table, then of the standby set (the next tier), and only when all of those are suspect
//! uses the first softly suspect backend it saw, else its first pick, so a service is
//! never black-holed. The agent stays the authority:
//! it clears marks it does not confirm and rewrites tables without ejected backends.
//!
//! Reset or abort: `sock_ops` sees only the state change, the same for a reset received
//! and for the application aborting (`SO_LINGER` 0, closing with unread data). The raw
//! tracepoint `tcp_receive_reset` fires just before the kernel closes a socket for a
//! reset it received, on the same CPU and in the same call chain, and notes the socket
//! (local port, remote IPv4 address) in a per-CPU record; the state callback that
//! matches that record counts a reset, any other established → close an abort. The
//! socket is read at fixed offsets of `struct sock_common` (see
//! `detour_ebpf::SockCommonHead`): no BTF needed, on any kernel detour supports.
//!
//! Why `sock_ops` rather than the `inet_sock_set_state` tracepoint: it runs only for
//! sockets of the attached cgroup, it can shorten the SYN timeout (`TIMEOUT_INIT`), which
//! the tracepoint cannot, and it sees retransmission timeouts (`RTO_CB`), which is the
//! only early sign of a black hole: a tracepoint would learn of one when the handshake
//! finally gives up, seconds later.
//!
//! Invariants the agent relies on:
//! - a connect that is not to a known TCP frontend is never touched;
//! - a missing slot or backend (a table being replaced under us) leaves the connect alone
//!   rather than guessing: the agent only points a frontend at fully written slots;
//! - every program returns 1 (allow): detour redirects, it never refuses a connect;
//! - `sock_ops` acts only on sockets with a `DETOUR_SOCK_ORIGIN` entry, never blocks
//!   (ring buffer full → drop and count), and forgets a socket's entry when it closes.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// `atomic_xadd`: the BPF target has no `fetch_add` on its atomic types.
#![cfg_attr(
    target_arch = "bpf",
    allow(internal_features),
    feature(core_intrinsics)
)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};

    use aya_ebpf::{
        bindings::{
            bpf_sock_addr, BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
            BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB,
            BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
            BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TIMEOUT_INIT,
        },
        helpers::{
            bpf_probe_read_kernel,
            generated::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
        },
        macros::{cgroup_sock_addr, map, raw_tracepoint, sock_ops},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
        programs::{RawTracePointContext, SockAddrContext, SockOpsContext},
        EbpfContext,
    };
    use detour_ebpf::{
        counters, event_kind, Backend, BackendState, BackendStats, ConnEvent, FrontendKey,
        ResetSeen, ServiceEntry, SlotKey, SockCommonHead, SockOrigin, AF_INET, AF_INET6,
        DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOCKETS, DEFAULT_MAX_TABLE_SLOTS,
        EVENTS_RING_BYTES, EVENTS_WAKEUP_BYTES, IPPROTO_TCP, ORIGIN_DESTROYED_BY_AGENT,
        ORIGIN_OUTCOME_REPORTED, RESET_SEEN_WINDOW_NS, SUSPECT_PROBES, V4_MAPPED_WORD,
    };

    /// Allow the syscall to go on (with whatever address we left in the context).
    const ALLOW: i32 = 1;

    /// Which build of the programs this is: `DETOUR_EBPF_VARIANT` at build time (a
    /// number, default 0; see `agent/build.rs`). Upgrade tests build a second agent with
    /// it set, so that its programs differ (another program tag) while behaving the
    /// same: it only lands in the bits 16.. of [`SockOrigin::flags`], which no reader
    /// looks at.
    const BUILD_VARIANT: u32 = match option_env!("DETOUR_EBPF_VARIANT") {
        Some(text) => parse_variant(text.as_bytes()),
        None => 0,
    };

    const fn parse_variant(digits: &[u8]) -> u32 {
        let mut value = 0u32;
        let mut i = 0;
        while i < digits.len() {
            assert!(
                digits[i].is_ascii_digit(),
                "DETOUR_EBPF_VARIANT must be a number"
            );
            value = value * 10 + (digits[i] - b'0') as u32;
            i += 1;
        }
        value & 0xffff
    }

    // Frontend entries are replaced while connects read them: without preallocation the
    // old element is freed after an RCU grace period, so a reader never sees it reused.
    #[map(name = "DETOUR_SERVICES")]
    static SERVICES: HashMap<FrontendKey, ServiceEntry> =
        HashMap::with_max_entries(DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

    #[map(name = "DETOUR_SLOTS")]
    static SLOTS: HashMap<SlotKey, u32> =
        HashMap::with_max_entries(DEFAULT_MAX_TABLE_SLOTS, BPF_F_NO_PREALLOC);

    #[map(name = "DETOUR_BACKENDS")]
    static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

    #[map(name = "DETOUR_BACKEND_STATS")]
    static BACKEND_STATS: PerCpuArray<BackendStats> =
        PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

    #[map(name = "DETOUR_SOCK_ORIGIN")]
    static SOCK_ORIGIN: LruHashMap<u64, SockOrigin> =
        LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

    #[map(name = "DETOUR_BACKEND_STATE")]
    static BACKEND_STATE: Array<BackendState> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

    #[map(name = "DETOUR_EVENTS")]
    static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

    #[map(name = "DETOUR_COUNTERS")]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

    #[map(name = "DETOUR_RESET_SEEN")]
    static RESET_SEEN: PerCpuArray<ResetSeen> = PerCpuArray::with_max_entries(1, 0);

    /// The kernel's HZ, set by the agent at load time (0: leave SYN timeouts alone).
    #[unsafe(no_mangle)]
    static DETOUR_HZ: u32 = 0;

    // TCP states as the kernel numbers them (include/net/tcp_states.h).
    const TCP_ESTABLISHED: u32 = 1;
    const TCP_SYN_SENT: u32 = 2;
    const TCP_CLOSE: u32 = 7;

    #[inline(always)]
    fn cookie(ctx: &impl EbpfContext) -> u64 {
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
    }

    #[inline(always)]
    fn count(index: u32) {
        if let Some(counter) = COUNTERS.get_ptr_mut(index) {
            // Per-CPU value: no other writer can race this increment.
            unsafe { *counter += 1 };
        }
    }

    /// The backend chosen for a frontend, with what the socket's bookkeeping needs.
    struct Choice {
        entry: ServiceEntry,
        backend_id: u32,
        backend: Backend,
    }

    #[inline(always)]
    fn slot_backend(entry: &ServiceEntry, index: u32) -> Option<u32> {
        let slot = SlotKey::new(entry.service_id, entry.generation, index);
        unsafe { SLOTS.get(&slot) }.copied()
    }

    const CLEAR: u32 = 0;
    const SOFT: u32 = 1;
    const HARD: u32 = 2;

    /// How strongly the kernel's fast path currently avoids `backend_id`: [`CLEAR`],
    /// [`SOFT`] (a SYN retransmission awaits its outcome) or [`HARD`] (failures). `now`
    /// is read once, and only when some backend has a mark: healthy services never pay
    /// for the clock.
    #[inline(always)]
    fn suspicion(backend_id: u32, now: &mut u64) -> u32 {
        let Some(state) = BACKEND_STATE.get(backend_id) else {
            return CLEAR;
        };
        let hard = unsafe { core::ptr::read_volatile(&state.suspect_until_ns) };
        let soft = unsafe { core::ptr::read_volatile(&state.soft_until_ns) };
        if hard == 0 && soft == 0 {
            return CLEAR;
        }
        if *now == 0 {
            *now = unsafe { bpf_ktime_get_ns() };
        }
        if hard > *now {
            HARD
        } else if soft > *now {
            SOFT
        } else {
            CLEAR
        }
    }

    /// The first backend that is not suspect among the slots `base + (start + i) % len`,
    /// `i` from `first` up to [`SUSPECT_PROBES`]; meanwhile remembers in `soft` the first
    /// one that is only softly suspect.
    #[inline(always)]
    fn unsuspected(
        entry: &ServiceEntry,
        base: u32,
        len: u32,
        start: u32,
        first: u32,
        now: &mut u64,
        soft: &mut Option<u32>,
    ) -> Option<u32> {
        let mut i = first;
        while i < SUSPECT_PROBES && i < len {
            if let Some(id) = slot_backend(entry, base + (start + i) % len) {
                match suspicion(id, now) {
                    CLEAR => return Some(id),
                    SOFT if soft.is_none() => *soft = Some(id),
                    _ => {}
                }
            }
            i += 1;
        }
        None
    }

    #[inline(always)]
    fn choose(key: &FrontendKey) -> Option<Choice> {
        // Copy the entry out at once: everything below uses one consistent snapshot.
        let entry = *unsafe { SERVICES.get(key) }?;
        if entry.slot_count == 0 {
            return None;
        }
        let random = unsafe { bpf_get_prandom_u32() };
        let start = random % entry.slot_count;
        let first = slot_backend(&entry, start)?;
        let mut now = 0;
        let mut backend_id = first;
        let first_suspicion = suspicion(first, &mut now);
        if first_suspicion != CLEAR {
            let mut soft = (first_suspicion == SOFT).then_some(first);
            if let Some(id) =
                unsuspected(&entry, 0, entry.slot_count, start, 1, &mut now, &mut soft)
            {
                count(counters::SUSPECT_AVOIDED);
                backend_id = id;
            } else if let Some(id) = (entry.standby_count > 0)
                .then(|| {
                    let start = (random >> 16) % entry.standby_count;
                    let (base, len) = (entry.slot_count, entry.standby_count);
                    unsuspected(&entry, base, len, start, 0, &mut now, &mut soft)
                })
                .flatten()
            {
                count(counters::STANDBY_USED);
                backend_id = id;
            } else {
                // Everything suspect: trying a backend beats refusing the connect, and
                // one that may only be slow beats one that failed.
                count(counters::ALL_SUSPECT);
                backend_id = soft.unwrap_or(first);
            }
        }
        let backend = *BACKENDS.get(backend_id)?;
        if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
            unsafe { (*stats).connects += 1 };
        }
        Some(Choice {
            entry,
            backend_id,
            backend,
        })
    }

    #[inline(always)]
    fn remember(ctx: &SockAddrContext, key: &FrontendKey, choice: &Choice) {
        let origin = SockOrigin {
            vip: key.addr,
            backend: choice.backend.addr,
            vip_port: key.port,
            backend_port: choice.backend.port,
            service_id: choice.entry.service_id,
            backend_id: choice.backend_id,
            fail_threshold: choice.entry.fail_threshold,
            suspect_ms: choice.entry.suspect_ms,
            handshake_timeout_ms: choice.entry.handshake_timeout_ms,
            flags: BUILD_VARIANT << 16,
        };
        // A failed insert only costs getpeername the VIP; the connect goes on regardless.
        // A later connect of the same socket overwrites: the latest connect wins.
        let _ = SOCK_ORIGIN.insert(&cookie(ctx), &origin, 0);
    }

    #[cgroup_sock_addr(connect4)]
    pub fn detour_connect4(ctx: SockAddrContext) -> i32 {
        let sa: *mut bpf_sock_addr = ctx.sock_addr;
        if unsafe { (*sa).protocol } != u32::from(IPPROTO_TCP) {
            return ALLOW;
        }
        let key = FrontendKey {
            addr: [0, 0, V4_MAPPED_WORD, unsafe { (*sa).user_ip4 }],
            port: unsafe { (*sa).user_port } as u16,
            proto: IPPROTO_TCP,
            pad: 0,
        };
        let Some(choice) = choose(&key) else {
            return ALLOW;
        };
        if choice.backend.family != AF_INET {
            return ALLOW;
        }
        unsafe {
            (*sa).user_ip4 = choice.backend.addr[3];
            (*sa).user_port = u32::from(choice.backend.port);
        }
        remember(&ctx, &key, &choice);
        ALLOW
    }

    #[cgroup_sock_addr(connect6)]
    pub fn detour_connect6(ctx: SockAddrContext) -> i32 {
        let sa: *mut bpf_sock_addr = ctx.sock_addr;
        if unsafe { (*sa).protocol } != u32::from(IPPROTO_TCP) {
            return ALLOW;
        }
        // The verifier wants 4-byte loads of user_ip6, one word at a time.
        let key = FrontendKey {
            addr: unsafe {
                [
                    (*sa).user_ip6[0],
                    (*sa).user_ip6[1],
                    (*sa).user_ip6[2],
                    (*sa).user_ip6[3],
                ]
            },
            port: unsafe { (*sa).user_port } as u16,
            proto: IPPROTO_TCP,
            pad: 0,
        };
        let Some(choice) = choose(&key) else {
            return ALLOW;
        };
        // An IPv4-mapped VIP on a dual-stack socket keeps its backends in mapped form.
        if choice.backend.family != AF_INET6 && key.addr[2] != V4_MAPPED_WORD {
            return ALLOW;
        }
        unsafe {
            (*sa).user_ip6[0] = choice.backend.addr[0];
            (*sa).user_ip6[1] = choice.backend.addr[1];
            (*sa).user_ip6[2] = choice.backend.addr[2];
            (*sa).user_ip6[3] = choice.backend.addr[3];
            (*sa).user_port = u32::from(choice.backend.port);
        }
        remember(&ctx, &key, &choice);
        ALLOW
    }

    /// Gives the VIP back when the socket's peer is still the backend detour chose.
    #[inline(always)]
    fn restore_peer(ctx: &SockAddrContext, v6: bool) -> i32 {
        let sa: *mut bpf_sock_addr = ctx.sock_addr;
        let Some(origin) = (unsafe { SOCK_ORIGIN.get(&cookie(ctx)) }).copied() else {
            return ALLOW;
        };
        unsafe {
            if (*sa).user_port as u16 != origin.backend_port {
                return ALLOW;
            }
            if v6 {
                if (*sa).user_ip6[0] != origin.backend[0]
                    || (*sa).user_ip6[1] != origin.backend[1]
                    || (*sa).user_ip6[2] != origin.backend[2]
                    || (*sa).user_ip6[3] != origin.backend[3]
                {
                    return ALLOW;
                }
                (*sa).user_ip6[0] = origin.vip[0];
                (*sa).user_ip6[1] = origin.vip[1];
                (*sa).user_ip6[2] = origin.vip[2];
                (*sa).user_ip6[3] = origin.vip[3];
            } else {
                if (*sa).user_ip4 != origin.backend[3] {
                    return ALLOW;
                }
                (*sa).user_ip4 = origin.vip[3];
            }
            (*sa).user_port = u32::from(origin.vip_port);
        }
        ALLOW
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn detour_getpeername4(ctx: SockAddrContext) -> i32 {
        restore_peer(&ctx, false)
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn detour_getpeername6(ctx: SockAddrContext) -> i32 {
        restore_peer(&ctx, true)
    }

    #[sock_ops]
    pub fn detour_sock_ops(ctx: SockOpsContext) -> u32 {
        let op = ctx.op();
        // Decide from the callback alone whether it can matter before looking the socket
        // up: the lookup is most of the cost, and most state changes (SYN_SENT →
        // ESTABLISHED, the FIN states) and retransmissions (of established data) never
        // do.
        let wanted =
            if op == BPF_SOCK_OPS_TCP_CONNECT_CB || op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
                true
            } else if op == BPF_SOCK_OPS_TIMEOUT_INIT {
                (unsafe { core::ptr::read_volatile(&DETOUR_HZ) }) != 0
            } else if op == BPF_SOCK_OPS_RTO_CB {
                (unsafe { (*ctx.ops).state }) == TCP_SYN_SENT
            } else if op == BPF_SOCK_OPS_STATE_CB {
                ctx.arg(1) == TCP_CLOSE
            } else {
                false
            };
        if wanted {
            let cookie = cookie(&ctx);
            // Only sockets the connect programs rewrote have an origin.
            if let Some(origin) = SOCK_ORIGIN.get_ptr_mut(&cookie) {
                on_tracked(&ctx, op, cookie, origin);
            }
        }
        // sock_ops: 1 means the callback's reply (if any) is valid; never an error.
        1
    }

    #[inline(always)]
    fn on_tracked(ctx: &SockOpsContext, op: u32, cookie: u64, origin: *mut SockOrigin) {
        let backend_id = unsafe { (*origin).backend_id };
        if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG;
            let _ = ctx.set_cb_flags(flags as i32);
        } else if op == BPF_SOCK_OPS_TIMEOUT_INIT {
            let hz = u64::from(unsafe { core::ptr::read_volatile(&DETOUR_HZ) });
            let timeout_ms = u64::from(unsafe { (*origin).handshake_timeout_ms });
            if hz == 0 || timeout_ms == 0 {
                return;
            }
            let mut timeout_us = timeout_ms * 1000;
            if let Some(state) = BACKEND_STATE.get(backend_id) {
                timeout_us = timeout_us.max(u64::from(state.rtt_us) * 3);
            }
            let jiffies = (timeout_us * hz).div_ceil(1_000_000).max(1);
            ctx.set_reply(jiffies as u32);
        } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            unsafe { (*origin).flags |= ORIGIN_OUTCOME_REPORTED };
            on_established(ctx, origin, backend_id);
        } else if op == BPF_SOCK_OPS_RTO_CB {
            // The socket is in SYN_SENT (checked before the lookup).
            if unsafe { (*origin).flags } & ORIGIN_OUTCOME_REPORTED != 0 {
                return;
            }
            // args[0]: retransmissions so far. The first timeout makes the backend
            // suspect (new connects avoid it now); the second is the failure. Later ones
            // are the same stall.
            if ctx.arg(0) == 0 {
                on_first_retransmit(origin, backend_id);
            } else {
                unsafe { (*origin).flags |= ORIGIN_OUTCOME_REPORTED };
                on_failure(origin, backend_id, event_kind::TIMEOUT);
            }
        } else if op == BPF_SOCK_OPS_STATE_CB {
            // The socket is closing (checked before the lookup).
            let old = ctx.arg(0);
            if unsafe { (*origin).flags } & ORIGIN_DESTROYED_BY_AGENT != 0 {
                let _ = SOCK_ORIGIN.remove(&cookie);
                return;
            }
            if old == TCP_SYN_SENT && unsafe { (*origin).flags } & ORIGIN_OUTCOME_REPORTED == 0 {
                on_failure(origin, backend_id, event_kind::REFUSED);
            } else if old == TCP_ESTABLISHED {
                // Decides nothing (only handshakes eject), so it is counted, never sent:
                // an application that closes with RST pays for no event.
                let received = reset_received(ctx);
                if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
                    if received {
                        unsafe { (*stats).resets += 1 };
                    } else {
                        unsafe { (*stats).aborts += 1 };
                    }
                }
            }
            // The socket is gone: its cookie will never be seen again.
            let _ = SOCK_ORIGIN.remove(&cookie);
        }
    }

    /// Whether the socket closing now is closing because it received a reset: the
    /// `tcp_receive_reset` program saw this socket on this CPU just before (see
    /// [`ResetSeen`]). Clears the record it matches.
    #[inline(always)]
    fn reset_received(ctx: &SockOpsContext) -> bool {
        let Some(seen) = RESET_SEEN.get_ptr_mut(0) else {
            return false;
        };
        let at_ns = unsafe { (*seen).at_ns };
        if at_ns == 0 {
            return false;
        }
        let head = unsafe { (*seen).head };
        let same_socket = u32::from(head.num) == ctx.local_port()
            && (ctx.family() != u32::from(AF_INET) || head.daddr == ctx.remote_ip4());
        if !same_socket {
            // A record of another socket (an abort here usually finds one: the reset
            // this node last received): no clock read for it.
            return false;
        }
        unsafe { (*seen).at_ns = 0 };
        unsafe { bpf_ktime_get_ns() }.wrapping_sub(at_ns) < RESET_SEEN_WINDOW_NS
    }

    /// `tcp_receive_reset(const struct sock *sk)`: the kernel is about to close `sk`
    /// because a reset arrived. Remembers which socket, for [`reset_received`].
    #[raw_tracepoint(tracepoint = "tcp_receive_reset")]
    pub fn detour_receive_reset(ctx: RawTracePointContext) -> i32 {
        let sk: *const SockCommonHead = ctx.arg(0);
        let Ok(head) = (unsafe { bpf_probe_read_kernel(sk) }) else {
            return 0;
        };
        if let Some(seen) = RESET_SEEN.get_ptr_mut(0) {
            unsafe {
                *seen = ResetSeen {
                    head,
                    at_ns: bpf_ktime_get_ns(),
                }
            };
        }
        0
    }

    #[inline(always)]
    fn on_established(ctx: &SockOpsContext, origin: *mut SockOrigin, backend_id: u32) {
        if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
            unsafe { (*stats).established += 1 };
        }
        let Some(state) = BACKEND_STATE.get_ptr_mut(backend_id) else {
            return;
        };
        // srtt_us is kept <<3 by TCP; at this point it is the handshake's one sample.
        let rtt_us = unsafe { (*ctx.ops).srtt_us } >> 3;
        unsafe {
            let old = (*state).rtt_us;
            (*state).rtt_us = if old == 0 {
                rtt_us
            } else {
                (old * 7 + rtt_us) / 8
            };
            // A completed handshake ends the kernel's own soft suspicion. Only the
            // success that ends a failure run or a hard mark is news to the agent,
            // which decides about that mark.
            (*state).soft_until_ns = 0;
            if (*state).fail_streak != 0 || (*state).suspect_until_ns != 0 {
                (*state).fail_streak = 0;
                emit(
                    origin,
                    backend_id,
                    event_kind::ESTABLISHED,
                    0,
                    rtt_us,
                    0,
                    false,
                );
            }
        }
    }

    #[inline(always)]
    fn mark_suspect(origin: *mut SockOrigin, state: *mut BackendState) {
        let until =
            unsafe { bpf_ktime_get_ns() } + u64::from(unsafe { (*origin).suspect_ms }) * 1_000_000;
        unsafe {
            if until > (*state).suspect_until_ns {
                (*state).suspect_until_ns = until;
            }
        }
    }

    #[inline(always)]
    fn on_first_retransmit(origin: *mut SockOrigin, backend_id: u32) {
        let Some(state) = BACKEND_STATE.get_ptr_mut(backend_id) else {
            return;
        };
        let mut marked = 0;
        if unsafe { (*origin).fail_threshold } != 0 {
            let ttl_ns = u64::from(unsafe { (*origin).handshake_timeout_ms }).max(1) * 4_000_000;
            unsafe { (*state).soft_until_ns = bpf_ktime_get_ns() + ttl_ns };
            marked = 1;
        }
        let streak = unsafe { (*state).fail_streak }.min(u64::from(u32::MAX)) as u32;
        // The kernel already avoids the backend; the agent only reports this.
        emit(
            origin,
            backend_id,
            event_kind::SYN_RETRANSMIT,
            streak,
            0,
            marked,
            false,
        );
    }

    #[inline(always)]
    fn on_failure(origin: *mut SockOrigin, backend_id: u32, kind: u32) {
        if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
            unsafe {
                if kind == event_kind::TIMEOUT {
                    (*stats).timeouts += 1;
                } else {
                    (*stats).refused += 1;
                }
            }
        }
        let Some(state) = BACKEND_STATE.get_ptr_mut(backend_id) else {
            return;
        };
        // Shared by all CPUs: count with an atomic add so concurrent failures all count.
        // The `generic` BPF CPU cannot return the old value from the add, so read the
        // count back; concurrent failures may then read the same total, never a lower one.
        let streak = unsafe {
            let streak = &raw mut (*state).fail_streak;
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(streak, 1);
            core::ptr::read_volatile(streak)
        }
        .min(u64::from(u32::MAX)) as u32;
        let threshold = unsafe { (*origin).fail_threshold };
        let mut marked = 0;
        if threshold != 0 && streak >= threshold {
            mark_suspect(origin, state);
            marked = 1;
        }
        // The agent decides on the first failure of a run (consecutiveErrors 1) and on
        // the one that reaches the threshold: those wake it at once; the failures in
        // between reach it with the next of those or its periodic poll.
        let urgent = streak == 1 || streak == threshold;
        emit(origin, backend_id, kind, streak, 0, marked, urgent);
    }

    /// Sends an event to the agent. Only an `urgent` one, or one that finds the ring
    /// [`EVENTS_WAKEUP_BYTES`] full, wakes the agent (a wakeup is an interrupt of its
    /// own, and in a VM an exit); the others wait for the agent's next read, which its
    /// periodic poll bounds. A full ring drops the event and counts the drop.
    #[inline(always)]
    fn emit(
        origin: *mut SockOrigin,
        backend_id: u32,
        kind: u32,
        fail_streak: u32,
        rtt_us: u32,
        marked_suspect: u32,
        urgent: bool,
    ) {
        let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
            count(counters::EVENTS_DROPPED);
            return;
        };
        entry.write(ConnEvent {
            ts_ns: unsafe { bpf_ktime_get_ns() },
            kind,
            service_id: unsafe { (*origin).service_id },
            backend_id,
            fail_streak,
            rtt_us,
            marked_suspect,
        });
        // Pending data counts from the consumer's position to the producer's, this
        // (reserved) event included.
        let wakeup = urgent || EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= EVENTS_WAKEUP_BYTES;
        entry.submit(u64::from(if wakeup {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        }));
        count(counters::EVENTS_SENT);
    }

    #[cfg(not(test))]
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // SAFETY: the verifier rejects any program that could reach here at run time.
        unsafe { core::hint::unreachable_unchecked() }
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}
