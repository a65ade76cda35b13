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
//! SYN steering (`detour_steer`, a tc program, and `sock_ops`' retransmission timeout):
//! when the SYN of a rewritten socket goes unanswered for its handshake timeout and the
//! agent has turned steering on (`DETOUR_STEER_CONTROL[ENABLED]`), `sock_ops` picks
//! another backend of the frontend — untried, not marked for failures, of the same
//! address family; one with a handshake completed in the last ~8 s first, a softly
//! suspect one only as a last resort and only with such handshakes — and records the flow in
//! `DETOUR_STEER` (its 4-tuple → the new backend) and `DETOUR_STEER_BACK` (the reply
//! tuple → the first pick). This runs before the kernel builds the retransmission, so
//! that very retransmission is translated. The backend left behind counts a timeout at
//! once. A flow whose new backend stalls too is steered again, at most
//! `MAX_STEERS` times, then left to its own timeout. If the tc program never saw a
//! steered flow's packets by its next timeout (the flow leaves by a device detour is not
//! attached to), the steering is undone and the flow goes on as without it. Entries are
//! never evicted: a full table means the flow is not steered. A closed flow's entries
//! stay for a grace period (its TIME_WAIT ACKs), then the agent deletes them; the gate
//! (`INSERTED != REMOVED`) is what every other packet pays. Two 4-tuple checks against
//! this host's sockets (`bpf_skc_lookup_tcp`), each paid once per flow or connection: a
//! steered flow's first translated packet must not take a tuple a socket here already
//! has (else the steering is undone and redone at the next timeout), and a SYN-ACK that
//! answers a socket of this host is never translated as a steered flow's reply. ICMP
//! errors ride with their flow: one quoting a steered flow's packet to the new backend
//! (packet too big, unreachable) is rewritten to quote the packet to the first pick, which
//! is the socket's peer, and one quoting its old packets to the first pick is dropped like
//! a late SYN-ACK (`translate_icmp`).
//!
//! Refused backends (`detour_steer_ingress`): a reset answering a rewritten socket's SYN
//! would fail the connect at once. While steering is on, the ingress program looks at
//! every packet's TCP flags in its linear head; for a reset it finds the socket
//! (`bpf_sk_lookup_tcp`), and if that is a rewritten socket still in SYN_SENT with
//! steering budget and a backend to go to, it drops the reset, marks the refusing
//! backend softly suspect and flags the origin (`ORIGIN_RESET_HELD`). The socket's SYN
//! timeout then comes as for a black hole and `sock_ops` steers the flow, counting the
//! backend as refused. Nothing in BPF can make the socket retransmit sooner, so a refused
//! connect costs its handshake timeout instead of failing. A reset is held at most once
//! per backend tried, and goes through when nothing is left to try, so a service with no
//! live backend still fails fast. tc can read only the cookie of the packet's own
//! socket, so the found socket is first assigned to the packet (`bpf_sk_assign`, ingress
//! only, the socket the stack would find anyway).
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
        macros::{cgroup_sock_addr, classifier, map, raw_tracepoint, sock_ops},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
        programs::{RawTracePointContext, SockAddrContext, SockOpsContext, TcContext},
        EbpfContext,
    };
    use detour_ebpf::{
        counters, event_kind, steer, Backend, BackendState, BackendStats, ConnEvent, FlowKey,
        FrontendKey, ResetSeen, ServiceEntry, SlotKey, SockCommonHead, SockOrigin, Steer,
        SteerBack, AF_INET, AF_INET6, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
        DEFAULT_MAX_SOCKETS, DEFAULT_MAX_STEERED, DEFAULT_MAX_TABLE_SLOTS, EVENTS_RING_BYTES,
        EVENTS_WAKEUP_BYTES, IPPROTO_TCP, ORIGIN_DESTROYED_BY_AGENT, ORIGIN_OUTCOME_REPORTED,
        ORIGIN_RESET_HELD, ORIGIN_STEERED, RESET_SEEN_WINDOW_NS, SUSPECT_PROBES, V4_MAPPED_WORD,
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

    // Entries appear in softirq context (the SYN timer) and live as long as their flow.
    #[map(name = "DETOUR_STEER")]
    static STEER: HashMap<FlowKey, Steer> =
        HashMap::with_max_entries(DEFAULT_MAX_STEERED, BPF_F_NO_PREALLOC);

    #[map(name = "DETOUR_STEER_BACK")]
    static STEER_BACK: HashMap<FlowKey, SteerBack> =
        HashMap::with_max_entries(DEFAULT_MAX_STEERED, BPF_F_NO_PREALLOC);

    #[map(name = "DETOUR_STEER_CONTROL")]
    static STEER_CONTROL: Array<u64> = Array::with_max_entries(steer::COUNT, 0);

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
        if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG;
            let _ = ctx.set_cb_flags(flags as i32);
            return;
        }
        // A steered socket's outcomes are the backend it was steered to.
        // A raw pointer, null for none: with an `Option` the compiler may spill its
        // undefined payload on the `None` path, which the verifier refuses.
        let mut steered: *mut Steer = core::ptr::null_mut();
        if unsafe { (*origin).flags } & ORIGIN_STEERED != 0 {
            if let Some(entry) = STEER.get_ptr_mut(&flow_key(ctx, origin)) {
                steered = entry;
            }
        }
        // Read apart (the origin's first, the entry's volatile): a select between the
        // two pointers before one load would dereference a maybe-null one.
        let mut backend_id = unsafe { core::ptr::read_volatile(&(*origin).backend_id) };
        if !steered.is_null() {
            backend_id = unsafe { core::ptr::read_volatile(&(*steered).to_id) };
        }
        if op == BPF_SOCK_OPS_TIMEOUT_INIT {
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
            on_syn_timeout(ctx, cookie, origin, steered);
        } else if op == BPF_SOCK_OPS_STATE_CB {
            // The socket is closing (checked before the lookup).
            let old = ctx.arg(0);
            if !steered.is_null() {
                let entry = steered;
                // Its translation outlives it by a grace period (TIME_WAIT's ACKs).
                unsafe { (*entry).closed_at_ns = bpf_ktime_get_ns() };
            }
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

    /// The flow of a rewritten socket, keyed as the tc program sees its packets: the
    /// socket's own address and port, and the backend its connect chose. The wire
    /// family is the backend's (a dual-stack socket reaching an IPv4 backend sends IPv4).
    #[inline(always)]
    fn flow_key(ctx: &SockOpsContext, origin: *const SockOrigin) -> FlowKey {
        let remote = unsafe { (*origin).backend };
        // Context fields must be read at constant offsets: the IPv4 address is read
        // whatever the family, so the compiler cannot turn the two reads into one load
        // through a chosen pointer (which the verifier refuses).
        let local_ip4 = unsafe { core::ptr::read_volatile(&(*ctx.ops).local_ip4) };
        let local = if is_v4_mapped(&remote) {
            [0, 0, V4_MAPPED_WORD, local_ip4]
        } else {
            unsafe {
                [
                    core::ptr::read_volatile(&(*ctx.ops).local_ip6[0]),
                    core::ptr::read_volatile(&(*ctx.ops).local_ip6[1]),
                    core::ptr::read_volatile(&(*ctx.ops).local_ip6[2]),
                    core::ptr::read_volatile(&(*ctx.ops).local_ip6[3]),
                ]
            }
        };
        FlowKey {
            local,
            remote,
            // sock_ops gives the local port in host order.
            local_port: (ctx.local_port() as u16).to_be(),
            remote_port: unsafe { (*origin).backend_port },
        }
    }

    #[inline(always)]
    fn is_v4_mapped(addr: &[u32; 4]) -> bool {
        addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
    }

    #[inline(always)]
    fn control_add(index: u32, value: u64) {
        if let Some(slot) = STEER_CONTROL.get_ptr_mut(index) {
            // Shared by all CPUs; only rare events count here.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, value) };
        }
    }

    #[inline(always)]
    fn control(index: u32) -> u64 {
        match STEER_CONTROL.get_ptr(index) {
            Some(slot) => unsafe { core::ptr::read_volatile(slot) },
            None => 0,
        }
    }

    /// The SYN of a rewritten socket went unanswered for its timeout (`args[0]`
    /// retransmissions so far). Without steering: the first timeout makes the backend
    /// softly suspect, the second is its failure. With steering: the backend that
    /// stalled fails at once and the retransmission that follows goes to another one.
    #[inline(always)]
    fn on_syn_timeout(
        ctx: &SockOpsContext,
        cookie: u64,
        origin: *mut SockOrigin,
        steered: *mut Steer,
    ) {
        let first_pick = unsafe { (*origin).backend_id };
        let mut tried = [
            first_pick,
            steer::NO_BACKEND,
            steer::NO_BACKEND,
            steer::NO_BACKEND,
        ];
        // Where the next backend goes in `tried`: after the first pick and one backend
        // per steering so far.
        let mut slot = 1usize;
        let mut collided = false;
        if !steered.is_null() {
            let entry = steered;
            let (steps, seen, stalled) = unsafe { ((*entry).steps, (*entry).seen, (*entry).to_id) };
            if steps == 0 {
                // Already undone (below, at an earlier timeout): nothing more to do.
                unsafe { (*origin).flags |= ORIGIN_OUTCOME_REPORTED };
                return;
            }
            if seen == 0 {
                // The tc program never saw the retransmission it was to translate: this
                // flow leaves by a device detour is not attached to. Back to the old
                // way; the connect's pick already failed when the flow was steered.
                // Its reply entry goes now (replies are never looked up by `steps`).
                forget_back(&flow_key(ctx, origin), unsafe { &*entry });
                unsafe {
                    (*entry).steps = 0;
                    (*entry).closed_at_ns = bpf_ktime_get_ns();
                    (*origin).flags = ((*origin).flags & !ORIGIN_STEERED) | ORIGIN_OUTCOME_REPORTED;
                }
                control_add(steer::UNSEEN, 1);
                return;
            }
            // Collided: undone by the tc program at its first packet, the new 4-tuple
            // being a socket's here already; the backend it was sent to never saw the
            // SYN and is not blamed. Otherwise the backend it was steered to stalled too.
            collided = seen == SEEN_COLLIDED;
            if !collided {
                steered_away(origin, stalled);
                if u32::from(steps) >= steer::MAX_STEERS {
                    // Left alone: the application's own timeout applies.
                    unsafe { (*origin).flags |= ORIGIN_OUTCOME_REPORTED };
                    return;
                }
            }
            tried = unsafe { (*entry).tried };
            slot = usize::from(steps) + 1;
        } else if control(steer::ENABLED) == 0 {
            unsteered_timeout(ctx, origin, first_pick);
            return;
        }
        // One call site of the choice: it is the program's largest piece for the
        // verifier, and two copies took 6.18's past its limit.
        let mut to = NO_ADDRESS;
        let to_id = if slot < 4 {
            steer_target(origin, &tried, &mut to)
        } else {
            steer::NO_BACKEND
        };
        if to_id == steer::NO_BACKEND {
            control_add(steer::NO_CANDIDATE, 1);
        } else {
            let done = if steered.is_null() {
                start_steering(ctx, cookie, origin, to_id, &to)
            } else {
                resteer(ctx, origin, steered, slot, to_id, &to)
            };
            if done {
                return;
            }
        }
        if steered.is_null() {
            unsteered_timeout(ctx, origin, first_pick);
        } else {
            // Left alone: the application's own timeout applies (a collided flow goes
            // back to its first pick, which its packets now reach untranslated).
            unsafe { (*origin).flags |= ORIGIN_OUTCOME_REPORTED };
            if collided {
                unsafe { (*origin).flags &= !ORIGIN_STEERED };
            }
        }
    }

    /// A SYN timeout without steering: the first makes the backend softly suspect, the
    /// second is its failure. After a held reset it is the backend's refusal, and the
    /// flow's outcome: the next reset reaches the socket.
    ///
    /// The held reset's flag is read here and in [`steered_away`], where it is used, not
    /// once before the choice: a value live across `steer_target`'s loop doubles the
    /// states the verifier walks there, which took `sock_ops` past its limit.
    #[inline(always)]
    fn unsteered_timeout(ctx: &SockOpsContext, origin: *mut SockOrigin, backend_id: u32) {
        if unsafe { (*origin).flags } & ORIGIN_RESET_HELD != 0 {
            unsafe {
                (*origin).flags = ((*origin).flags & !ORIGIN_RESET_HELD) | ORIGIN_OUTCOME_REPORTED
            };
            on_failure(origin, backend_id, event_kind::REFUSED);
        } else if ctx.arg(0) == 0 {
            on_first_retransmit(origin, backend_id);
        } else {
            unsafe { (*origin).flags |= ORIGIN_OUTCOME_REPORTED };
            on_failure(origin, backend_id, event_kind::TIMEOUT);
        }
    }

    /// A flow leaves `backend_id` after its SYN went unanswered (or was refused: a reset
    /// held back): the backend is softly suspect for new connects at once, and this
    /// handshake counts as its failure.
    #[inline(always)]
    fn steered_away(origin: *mut SockOrigin, backend_id: u32) {
        soft_suspect(origin, backend_id);
        let kind = if unsafe { (*origin).flags } & ORIGIN_RESET_HELD != 0 {
            unsafe { (*origin).flags &= !ORIGIN_RESET_HELD };
            event_kind::REFUSED
        } else {
            event_kind::TIMEOUT
        };
        on_failure(origin, backend_id, kind);
    }

    /// Marks `backend_id` softly suspect for 4 handshake timeouts: new connects avoid it
    /// while another backend is unsuspected (its handshake completing ends that).
    #[inline(always)]
    fn soft_suspect(origin: *const SockOrigin, backend_id: u32) {
        if unsafe { (*origin).fail_threshold } != 0 {
            if let Some(state) = BACKEND_STATE.get_ptr_mut(backend_id) {
                let ttl_ns =
                    u64::from(unsafe { (*origin).handshake_timeout_ms }).max(1) * 4_000_000;
                unsafe { (*state).soft_until_ns = bpf_ktime_get_ns() + ttl_ns };
            }
        }
    }

    /// Whether a handshake with `backend_id` completed lately (positive evidence).
    #[inline(always)]
    fn alive_lately(backend_id: u32, now_units: u32) -> bool {
        match BACKEND_STATE.get(backend_id) {
            Some(state) => {
                let at = unsafe { core::ptr::read_volatile(&state.established_at) };
                at != 0 && now_units.wrapping_sub(at) <= steer::EVIDENCE_UNITS
            }
            None => false,
        }
    }

    /// The backend a stalled flow goes to: one of the frontend's table, then of its
    /// standby set, that the flow has not tried, of the flow's address family, and not
    /// marked for failures; a backend with a handshake completed lately first, else the
    /// first unsuspected one in the table, else in the standby set, else the first only
    /// softly suspect one (a SYN of its own unanswered, not yet a failure) that
    /// completed handshakes lately.
    #[inline(always)]
    ///
    /// Returns the id ([`steer::NO_BACKEND`] for none) and fills `chosen`. No `Option`
    /// of a struct: its `None` leaves stack bytes uninitialised, and 5.10's verifier
    /// refuses a program that copies them.
    fn steer_target(origin: *const SockOrigin, tried: &[u32; 4], chosen: &mut Backend) -> u32 {
        let key = FrontendKey {
            addr: unsafe { (*origin).vip },
            port: unsafe { (*origin).vip_port },
            proto: IPPROTO_TCP,
            pad: 0,
        };
        let Some(entry) = (unsafe { SERVICES.get(&key) }).copied() else {
            return steer::NO_BACKEND;
        };
        let v4 = is_v4_mapped(unsafe { &(*origin).backend });
        let random = unsafe { bpf_get_prandom_u32() };
        let mut now = unsafe { bpf_ktime_get_ns() };
        let now_units = (now >> 30) as u32;
        let mut fallback = steer::NO_BACKEND;
        let mut fallback_rank = 0u32;
        let mut pass = 0;
        while pass < 2 {
            let (base, len) = if pass == 0 {
                (0, entry.slot_count)
            } else {
                (entry.slot_count, entry.standby_count)
            };
            pass += 1;
            if len == 0 {
                continue;
            }
            let start = random % len;
            let mut i = 0;
            while i < steer::PROBES && i < len {
                let index = base + (start + i) % len;
                i += 1;
                let Some(id) = slot_backend(&entry, index) else {
                    continue;
                };
                if id == tried[0] || id == tried[1] || id == tried[2] || id == tried[3] {
                    continue;
                }
                let suspected = suspicion(id, &mut now);
                if suspected == HARD {
                    continue;
                }
                let Some(backend) = BACKENDS.get(id) else {
                    continue;
                };
                if (backend.family == AF_INET) != v4 || backend.family == 0 {
                    continue;
                }
                let alive = alive_lately(id, now_units);
                if suspected == CLEAR && alive {
                    *chosen = *backend;
                    return id;
                }
                // A softly suspect backend (a SYN of its own unanswered, outcome not
                // known yet) only when nothing better is left, and only with handshakes
                // completed lately: that one is slow, not dead (seen under emulated 6.1,
                // where a healthy backend's handshake can take longer than the timeout).
                // One without them may well be the black hole another flow left.
                if suspected != CLEAR && !alive {
                    continue;
                }
                let rank = if suspected == CLEAR { 2 } else { 1 };
                if rank > fallback_rank {
                    *chosen = *backend;
                    fallback = id;
                    fallback_rank = rank;
                }
            }
        }
        fallback
    }

    const NO_ADDRESS: Backend = Backend {
        addr: [0; 4],
        port: 0,
        family: 0,
        pad: 0,
    };

    /// Steers a flow for the first time, away from the connect's pick, to `to`. False
    /// (nothing changed) when a table is full.
    #[inline(always)]
    fn start_steering(
        ctx: &SockOpsContext,
        cookie: u64,
        origin: *mut SockOrigin,
        to_id: u32,
        to: &Backend,
    ) -> bool {
        let from = unsafe { (*origin).backend_id };
        let tried = [from, to_id, steer::NO_BACKEND, steer::NO_BACKEND];
        let key = flow_key(ctx, origin);
        // An entry for this 4-tuple is a closed flow's still in its grace period (the
        // port was reused): this flow takes it over.
        let recycled = match STEER.get_ptr(&key) {
            Some(old) => {
                forget_back(&key, unsafe { &*old });
                true
            }
            None => false,
        };
        let mut back_key = key;
        if !claim_reply(&key, to, &mut back_key) {
            return false;
        }
        let now = unsafe { bpf_ktime_get_ns() };
        let entry = Steer {
            to: to.addr,
            to_port: to.port,
            steps: 1,
            seen: 0,
            to_id,
            tried,
            service_id: unsafe { (*origin).service_id },
            pad: 0,
            steered_at_ns: now,
            closed_at_ns: 0,
            cookie,
        };
        // The gate opens before the entry exists and closes (in the agent) only after
        // it is gone: a packet never finds an entry behind a closed gate.
        if !recycled {
            control_add(steer::INSERTED, 1);
        }
        if STEER.insert(&key, &entry, 0).is_err() {
            let _ = STEER_BACK.remove(&back_key);
            if !recycled {
                control_add(steer::INSERTED, u64::MAX);
            }
            control_add(steer::TABLE_FULL, 1);
            return false;
        }
        unsafe { (*origin).flags |= ORIGIN_STEERED };
        steered_away(origin, from);
        steered_to(origin, to_id);
        true
    }

    /// Steers an already steered flow once more, to `to`, recorded in `tried[slot]`.
    #[inline(always)]
    fn resteer(
        ctx: &SockOpsContext,
        origin: *mut SockOrigin,
        entry: *mut Steer,
        slot: usize,
        to_id: u32,
        to: &Backend,
    ) -> bool {
        let old = unsafe { *entry };
        if slot >= 4 {
            return false;
        }
        let key = flow_key(ctx, origin);
        let mut back_key = key;
        if !claim_reply(&key, to, &mut back_key) {
            return false;
        }
        forget_back(&key, &old);
        unsafe {
            (*entry).to = to.addr;
            (*entry).to_port = to.port;
            (*entry).to_id = to_id;
            // A constant index per arm: the verifier cannot bound a variable one here.
            match slot {
                1 => (*entry).tried[1] = to_id,
                2 => (*entry).tried[2] = to_id,
                _ => (*entry).tried[3] = to_id,
            }
            (*entry).seen = 0;
            (*entry).steps = old.steps + 1;
            (*entry).steered_at_ns = bpf_ktime_get_ns();
        }
        steered_to(origin, to_id);
        true
    }

    #[inline(always)]
    fn steered_to(origin: *mut SockOrigin, to_id: u32) {
        if let Some(stats) = BACKEND_STATS.get_ptr_mut(to_id) {
            unsafe { (*stats).connects += 1 };
        }
        control_add(steer::STEERED, 1);
        emit(origin, to_id, event_kind::STEERED, 0, 0, 0, false);
    }

    /// Writes the reply entry of flow `key` steered to `to`: replies from `to` to the
    /// flow's address and port carry the first pick's; its key goes to `back_key` (an
    /// out-parameter: no `Option` of a struct, see `steer_target`). False (counted as a
    /// full table) when it cannot: the table is full, or that reply tuple is already
    /// another steered flow's, which keeps it (`BPF_NOEXIST`).
    #[inline(always)]
    fn claim_reply(key: &FlowKey, to: &Backend, back_key: &mut FlowKey) -> bool {
        *back_key = FlowKey {
            local: key.local,
            remote: to.addr,
            local_port: key.local_port,
            remote_port: to.port,
        };
        let back = SteerBack {
            from: key.remote,
            from_port: key.remote_port,
            pad: 0,
        };
        if STEER_BACK
            .insert(
                &*back_key,
                &back,
                u64::from(aya_ebpf::bindings::BPF_NOEXIST),
            )
            .is_err()
        {
            control_add(steer::TABLE_FULL, 1);
            return false;
        }
        true
    }

    /// Deletes the reply entry of `entry` (flow `key`) if it is still this flow's.
    #[inline(always)]
    fn forget_back(key: &FlowKey, entry: &Steer) {
        let back_key = FlowKey {
            local: key.local,
            remote: entry.to,
            local_port: key.local_port,
            remote_port: entry.to_port,
        };
        if let Some(back) = unsafe { STEER_BACK.get(&back_key) } {
            if back.from == key.remote && back.from_port == key.remote_port {
                let _ = STEER_BACK.remove(&back_key);
            }
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
        // 0 when the handshake gave no sample (a retransmitted SYN without timestamps).
        let rtt_us = unsafe { (*ctx.ops).srtt_us } >> 3;
        unsafe {
            let old = (*state).rtt_us;
            if rtt_us != 0 {
                (*state).rtt_us = if old == 0 {
                    rtt_us
                } else {
                    (old * 7 + rtt_us) / 8
                };
            }
            if control(steer::ENABLED) != 0 {
                // Evidence of life for steering; written only when it changes, so the
                // backend's line is not dirtied by every handshake.
                let units = ((bpf_ktime_get_ns() >> 30) as u32).max(1);
                if core::ptr::read_volatile(&(*state).established_at) != units {
                    (*state).established_at = units;
                }
            }
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

    // tc verdicts: let the packet go on to the next program (tcx's TCX_NEXT, and for a
    // clsact filter "no verdict", which also goes on), or drop it.
    const TC_NEXT: i32 = -1;
    const TC_DROP: i32 = 2;
    /// Where the IP header starts: detour attaches to Ethernet-framed devices (`lo`,
    /// veth, physical NICs), whose tc programs see the MAC header first.
    const L3: usize = 14;
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const IPPROTO_TCP_U8: u8 = 6;
    const BPF_F_PSEUDO_HDR: u64 = 1 << 4;

    /// SYN steering's packet half: translates the flows `sock_ops` steered, both ways,
    /// and drops what the abandoned backend still sends them. Attached on egress (and
    /// ingress) of the devices steered flows use; every other packet pays one array
    /// read (the gate) while no flow is steered.
    ///
    /// - a packet of a steered flow (its own address and port → the connect's pick A):
    ///   the destination becomes the new backend B;
    /// - a packet from B to a steered flow: the source becomes A again, so the socket,
    ///   which still believes its peer is A, takes it;
    /// - a packet from A to a steered flow: dropped (a late SYN-ACK would otherwise
    ///   reach the socket, which then has two peers).
    #[classifier]
    pub fn detour_steer(ctx: TcContext) -> i32 {
        if control(steer::INSERTED) == control(steer::REMOVED) {
            return TC_NEXT;
        }
        translate(&ctx).unwrap_or(TC_NEXT)
    }

    /// SYN steering on ingress: translates steered flows' replies like [`detour_steer`]
    /// (except on `lo`, whose egress program already saw both directions: translating
    /// again would take its own translated replies for late packets), then holds back a
    /// reset that refuses a rewritten connect while another backend could take the flow
    /// (see [`hold_refusal`]). Every other packet pays the two gates and, while steering
    /// is on, a look at its TCP flags in the packet's linear head.
    #[classifier]
    pub fn detour_steer_ingress(ctx: TcContext) -> i32 {
        let on_lo = unsafe { (*ctx.skb.skb).ifindex } == LOOPBACK_IFINDEX;
        if !on_lo && control(steer::INSERTED) != control(steer::REMOVED) {
            if let Some(TC_DROP) = translate(&ctx) {
                return TC_DROP;
            }
        }
        if control(steer::ENABLED) == 0 || !is_reset(&ctx) {
            return TC_NEXT;
        }
        hold_refusal(&ctx).unwrap_or(TC_NEXT)
    }

    /// `lo`'s ifindex in every network namespace (`LOOPBACK_IFINDEX`,
    /// include/net/flow.h).
    const LOOPBACK_IFINDEX: u32 = 1;
    /// RST in the TCP flags byte.
    const TCP_RST: u8 = 0x04;

    /// Whether the packet is a TCP segment with RST set, read straight from its linear
    /// head (no helper call: this is the per-packet cost of holding refusals). A reset
    /// is a bare header, always in the head; a packet whose headers are not is not one.
    #[inline(always)]
    fn is_reset(ctx: &TcContext) -> bool {
        let data = ctx.data();
        let end = ctx.data_end();
        let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
        let l4 = if protocol == ETH_P_IP {
            if data + L3 + 20 > end {
                return false;
            }
            let version_ihl = unsafe { *((data + L3) as *const u8) };
            let proto = unsafe { *((data + L3 + 9) as *const u8) };
            if proto != IPPROTO_TCP_U8 {
                return false;
            }
            L3 + usize::from(version_ihl & 0x0f) * 4
        } else if protocol == ETH_P_IPV6 {
            if data + L3 + 40 > end {
                return false;
            }
            if unsafe { *((data + L3 + 6) as *const u8) } != IPPROTO_TCP_U8 {
                return false;
            }
            L3 + 40
        } else {
            return false;
        };
        if data + l4 + 14 > end {
            return false;
        }
        let flags = unsafe { *((data + l4 + 13) as *const u8) };
        flags & TCP_RST != 0
    }

    /// A reset (`RST`) refusing a rewritten connect's SYN, while another backend could
    /// take the flow: dropped, so the socket never sees it and its connect does not
    /// fail. The refusing backend is softly suspect at once (new connects avoid it), and
    /// the flow is steered at its next SYN timeout by `sock_ops` (the reset cannot make
    /// the socket retransmit sooner; nothing a BPF program can do can), where the
    /// backend counts as refused.
    ///
    /// Held at most once per backend the flow tries; let through (so a service with no
    /// backend left still fails fast) when the flow's outcome is reported, its steering
    /// budget is spent, or no backend is left to steer to. `None`: let the packet be.
    #[inline(always)]
    fn hold_refusal(ctx: &TcContext) -> Option<i32> {
        let p = parse(ctx)?;
        if p.flags & TCP_RST == 0 {
            return None;
        }
        // The socket the reset is for, as the stack will find it. Only one still in
        // SYN_SENT can be a refused connect.
        let sk = lookup_tcp(ctx, p.v4, &p.src, p.sport, &p.dst, p.dport);
        if sk.is_null() {
            return None;
        }
        let state = unsafe { (*sk).state };
        // Its cookie is the key of its origin; tc can only read the cookie of the
        // packet's own socket, so the socket is assigned to the packet first (ingress
        // only; the stack would find the same one).
        let assigned = if state == TCP_SYN_SENT {
            unsafe { aya_ebpf::helpers::generated::bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) }
        } else {
            -1
        };
        unsafe { aya_ebpf::helpers::generated::bpf_sk_release(sk.cast()) };
        if assigned != 0 {
            return None;
        }
        let cookie = cookie(ctx);
        let origin = SOCK_ORIGIN.get_ptr_mut(&cookie)?;
        let flags = unsafe { (*origin).flags };
        if flags & (ORIGIN_OUTCOME_REPORTED | ORIGIN_RESET_HELD | ORIGIN_DESTROYED_BY_AGENT) != 0 {
            return None;
        }
        let first_pick = unsafe { (*origin).backend_id };
        let mut tried = [
            first_pick,
            steer::NO_BACKEND,
            steer::NO_BACKEND,
            steer::NO_BACKEND,
        ];
        let mut refusing = first_pick;
        if flags & ORIGIN_STEERED != 0 {
            let key = FlowKey {
                local: p.dst,
                remote: unsafe { (*origin).backend },
                local_port: p.dport,
                remote_port: unsafe { (*origin).backend_port },
            };
            let entry = unsafe { STEER.get(&key) }?;
            // Undone or collided flows, and a spent budget: the reset goes through.
            if entry.steps == 0
                || entry.seen == SEEN_COLLIDED
                || u32::from(entry.steps) >= steer::MAX_STEERS
            {
                return None;
            }
            tried = entry.tried;
            refusing = entry.to_id;
        }
        let mut to = NO_ADDRESS;
        if steer_target(origin, &tried, &mut to) == steer::NO_BACKEND {
            return None;
        }
        unsafe { (*origin).flags |= ORIGIN_RESET_HELD };
        soft_suspect(origin, refusing);
        control_add(steer::REFUSALS_HELD, 1);
        Some(TC_DROP)
    }

    /// The packet's addresses and TCP ports, with where they sit.
    struct Packet {
        src: [u32; 4],
        dst: [u32; 4],
        sport: u16,
        dport: u16,
        /// TCP flags (byte 13 of the header).
        flags: u8,
        v4: bool,
        l4: usize,
    }

    #[inline(always)]
    fn parse(ctx: &TcContext) -> Option<Packet> {
        let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
        let (src, dst, v4, l4) = if protocol == ETH_P_IP {
            let version_ihl: u8 = ctx.load(L3).ok()?;
            let proto: u8 = ctx.load(L3 + 9).ok()?;
            let frag: u16 = ctx.load(L3 + 6).ok()?;
            // TCP only, and no fragment but a first one (later ones carry no ports).
            if proto != IPPROTO_TCP_U8 || u16::from_be(frag) & 0x1fff != 0 {
                return None;
            }
            let saddr: u32 = ctx.load(L3 + 12).ok()?;
            let daddr: u32 = ctx.load(L3 + 16).ok()?;
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            (
                [0, 0, V4_MAPPED_WORD, saddr],
                [0, 0, V4_MAPPED_WORD, daddr],
                true,
                L3 + ihl,
            )
        } else if protocol == ETH_P_IPV6 {
            let next: u8 = ctx.load(L3 + 6).ok()?;
            if next != IPPROTO_TCP_U8 {
                return None;
            }
            let src: [u32; 4] = ctx.load(L3 + 8).ok()?;
            let dst: [u32; 4] = ctx.load(L3 + 24).ok()?;
            (src, dst, false, L3 + 40)
        } else {
            return None;
        };
        let ports: [u16; 2] = ctx.load(l4).ok()?;
        let flags: u8 = ctx.load(l4 + 13).ok()?;
        Some(Packet {
            src,
            dst,
            sport: ports[0],
            dport: ports[1],
            flags,
            v4,
            l4,
        })
    }

    #[inline(always)]
    fn translate(ctx: &TcContext) -> Option<i32> {
        let Some(p) = parse(ctx) else {
            return translate_icmp(ctx);
        };
        let outgoing = FlowKey {
            local: p.src,
            remote: p.dst,
            local_port: p.sport,
            remote_port: p.dport,
        };
        if let Some(entry) = STEER.get_ptr_mut(&outgoing) {
            let (steps, seen, to, to_port) =
                unsafe { ((*entry).steps, (*entry).seen, (*entry).to, (*entry).to_port) };
            if steps != 0 && seen != SEEN_COLLIDED {
                if seen == 0 {
                    // The flow's first packet to the new backend (its retransmitted SYN):
                    // the new 4-tuple must not already be a socket's here.
                    if owned_here(ctx, p.v4, &to, to_port, &p.src, p.sport) {
                        let key = FlowKey {
                            local: p.src,
                            remote: to,
                            local_port: p.sport,
                            remote_port: to_port,
                        };
                        if let Some(back) = unsafe { STEER_BACK.get(&key) } {
                            if back.from == p.dst && back.from_port == p.dport {
                                let _ = STEER_BACK.remove(&key);
                            }
                        }
                        // Undone; `sock_ops` steers it elsewhere at its next timeout.
                        unsafe { (*entry).seen = SEEN_COLLIDED };
                        control_add(steer::COLLISIONS, 1);
                        return Some(TC_NEXT);
                    }
                    unsafe { (*entry).seen = 1 };
                }
                rewrite(ctx, &p, false, &to, to_port)?;
                return Some(TC_NEXT);
            }
        }
        let incoming = FlowKey {
            local: p.dst,
            remote: p.src,
            local_port: p.dport,
            remote_port: p.sport,
        };
        if let Some(back) = unsafe { STEER_BACK.get(&incoming) } {
            let (from, from_port) = (back.from, back.from_port);
            // A SYN-ACK whose 4-tuple a socket here owns answers that socket's own
            // connect: a new connection from a port a closed steered flow used, to the
            // backend it was steered to, while that flow's entries wait out their grace.
            // Translating it would hand it to nobody (the client resets it, every retry
            // alike); the stale reply entry goes instead.
            if p.flags & TCP_SYN_ACK == TCP_SYN_ACK
                && owned_here(ctx, p.v4, &p.src, p.sport, &p.dst, p.dport)
            {
                let _ = STEER_BACK.remove(&incoming);
                control_add(steer::COLLISIONS, 1);
                return Some(TC_NEXT);
            }
            rewrite(ctx, &p, true, &from, from_port)?;
            return Some(TC_NEXT);
        }
        if let Some(entry) = unsafe { STEER.get(&incoming) } {
            if entry.steps != 0 {
                control_add(steer::LATE_DROPPED, 1);
                return Some(TC_DROP);
            }
        }
        None
    }

    const IPPROTO_ICMP_U8: u8 = 1;
    const IPPROTO_ICMPV6_U8: u8 = 58;
    /// ICMPv4 errors that quote a packet: destination unreachable (fragmentation needed
    /// among them) and time exceeded.
    const ICMP_UNREACHABLE: u8 = 3;
    const ICMP_TIME_EXCEEDED: u8 = 11;
    /// ICMPv6 errors: destination unreachable, packet too big, time exceeded.
    const ICMPV6_UNREACHABLE: u8 = 1;
    const ICMPV6_PACKET_TOO_BIG: u8 = 2;
    const ICMPV6_TIME_EXCEEDED: u8 = 3;
    /// Where an ICMP error's quoted packet starts, after the ICMP header (both families).
    const ICMP_QUOTE: usize = 8;

    /// An ICMP error about a steered flow's packet, which quotes that packet (this
    /// host's address and port → the backend's):
    /// - quoting a packet to the new backend B (packet too big, unreachable): the quoted
    ///   destination becomes A again, so the socket (whose peer is A) takes the error and
    ///   path MTU discovery works. The outer header stays: the kernel finds the socket by
    ///   the quoted one;
    /// - quoting a packet to the abandoned backend A: dropped, as a late packet from A
    ///   is. A host-unreachable for A's old SYNs (neighbour resolution gives up after
    ///   seconds) would otherwise abort the steered handshake.
    ///
    /// Checksums: the quoted IPv4 header's own checksum absorbs its address change, so
    /// the ICMP checksum changes only with the port (and, for ICMPv6, whose quoted header
    /// has no checksum, with the address); both edits are checksum-neutral over the
    /// packet, so a received packet's `CHECKSUM_COMPLETE` sum stays right.
    #[inline(always)]
    fn translate_icmp(ctx: &TcContext) -> Option<i32> {
        let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
        let (icmp, quote, quote_l4, quoted, v4) = if protocol == ETH_P_IP {
            let version_ihl: u8 = ctx.load(L3).ok()?;
            let proto: u8 = ctx.load(L3 + 9).ok()?;
            let frag: u16 = ctx.load(L3 + 6).ok()?;
            if proto != IPPROTO_ICMP_U8 || u16::from_be(frag) & 0x1fff != 0 {
                return None;
            }
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let icmp = L3 + ihl;
            let kind: u8 = ctx.load(icmp).ok()?;
            if kind != ICMP_UNREACHABLE && kind != ICMP_TIME_EXCEEDED {
                return None;
            }
            let quote = icmp + ICMP_QUOTE;
            let quoted_vihl: u8 = ctx.load(quote).ok()?;
            let quoted_proto: u8 = ctx.load(quote + 9).ok()?;
            let quoted_ihl = usize::from(quoted_vihl & 0x0f) * 4;
            if quoted_proto != IPPROTO_TCP_U8 || quoted_ihl < 20 {
                return None;
            }
            let saddr: u32 = ctx.load(quote + 12).ok()?;
            let daddr: u32 = ctx.load(quote + 16).ok()?;
            (
                icmp,
                quote,
                quote + quoted_ihl,
                ([0, 0, V4_MAPPED_WORD, saddr], [0, 0, V4_MAPPED_WORD, daddr]),
                true,
            )
        } else if protocol == ETH_P_IPV6 {
            let next: u8 = ctx.load(L3 + 6).ok()?;
            if next != IPPROTO_ICMPV6_U8 {
                return None;
            }
            let icmp = L3 + 40;
            let kind: u8 = ctx.load(icmp).ok()?;
            if kind != ICMPV6_UNREACHABLE
                && kind != ICMPV6_PACKET_TOO_BIG
                && kind != ICMPV6_TIME_EXCEEDED
            {
                return None;
            }
            let quote = icmp + ICMP_QUOTE;
            let quoted_next: u8 = ctx.load(quote + 6).ok()?;
            if quoted_next != IPPROTO_TCP_U8 {
                return None;
            }
            let src: [u32; 4] = ctx.load(quote + 8).ok()?;
            let dst: [u32; 4] = ctx.load(quote + 24).ok()?;
            (icmp, quote, quote + 40, (src, dst), false)
        } else {
            return None;
        };
        // Every ICMP error quotes at least the first 8 bytes of the segment: the ports.
        let ports: [u16; 2] = ctx.load(quote_l4).ok()?;
        let (src, dst) = quoted;
        let key = FlowKey {
            local: src,
            remote: dst,
            local_port: ports[0],
            remote_port: ports[1],
        };
        let icmp_check = icmp + 2;
        if let Some(back) = unsafe { STEER_BACK.get(&key) } {
            let (from, from_port) = (back.from, back.from_port);
            if v4 {
                let (old, new) = (u64::from(dst[3]), u64::from(from[3]));
                ctx.l3_csum_replace(quote + 10, old, new, 4).ok()?;
                ctx.store(quote + 16, &from[3], 0).ok()?;
            } else {
                let (mut old, mut new) = (dst, from);
                let diff = unsafe {
                    aya_ebpf::helpers::generated::bpf_csum_diff(
                        old.as_mut_ptr(),
                        16,
                        new.as_mut_ptr(),
                        16,
                        0,
                    )
                };
                if diff < 0 {
                    return None;
                }
                ctx.l4_csum_replace(icmp_check, 0, diff as u64, 0).ok()?;
                ctx.store(quote + 24, &from, 0).ok()?;
            }
            if from_port != ports[1] {
                let (old, new) = (u64::from(ports[1]), u64::from(from_port));
                ctx.l4_csum_replace(icmp_check, old, new, 2).ok()?;
                ctx.store(quote_l4 + 2, &from_port, 0).ok()?;
            }
            control_add(steer::ICMP_TRANSLATED, 1);
            return Some(TC_NEXT);
        }
        if let Some(entry) = unsafe { STEER.get(&key) } {
            if entry.steps != 0 {
                control_add(steer::LATE_DROPPED, 1);
                return Some(TC_DROP);
            }
        }
        None
    }

    /// `struct bpf_sock_tuple`'s halves, as the socket lookup helpers read them.
    #[repr(C)]
    struct Tuple4 {
        saddr: u32,
        daddr: u32,
        sport: u16,
        dport: u16,
    }

    #[repr(C)]
    struct Tuple6 {
        saddr: [u32; 4],
        daddr: [u32; 4],
        sport: u16,
        dport: u16,
    }

    const TCP_LISTEN: u32 = 10;
    /// SYN and ACK in the TCP flags byte.
    const TCP_SYN_ACK: u8 = 0x12;
    /// [`Steer::seen`]: the new 4-tuple collided at this host; the entry is inert until
    /// `sock_ops` steers the flow elsewhere.
    const SEEN_COLLIDED: u8 = 2;

    /// Whether a socket of this host owns the flow between its local `local`:`lport` and
    /// the peer `remote`:`rport` (a connection, or its TIME_WAIT), looked up as a packet
    /// from the peer would be. A listener found on the local port is not an owner.
    #[inline(always)]
    fn owned_here(
        ctx: &TcContext,
        v4: bool,
        remote: &[u32; 4],
        rport: u16,
        local: &[u32; 4],
        lport: u16,
    ) -> bool {
        let sk = lookup(ctx, v4, remote, rport, local, lport, false);
        if sk.is_null() {
            return false;
        }
        let state = unsafe { (*sk).state };
        unsafe { aya_ebpf::helpers::generated::bpf_sk_release(sk.cast()) };
        state != TCP_LISTEN
    }

    /// The full socket (a connection in any state but TIME_WAIT, or a listener) a packet
    /// from `remote`:`rport` to `local`:`lport` goes to; null for none. The caller
    /// releases it.
    #[inline(always)]
    fn lookup_tcp(
        ctx: &TcContext,
        v4: bool,
        remote: &[u32; 4],
        rport: u16,
        local: &[u32; 4],
        lport: u16,
    ) -> *mut aya_ebpf::bindings::bpf_sock {
        lookup(ctx, v4, remote, rport, local, lport, true)
    }

    /// `bpf_sk_lookup_tcp` (`full`: full sockets only) or `bpf_skc_lookup_tcp` (request
    /// and TIME_WAIT sockets too) in the device's namespace.
    #[inline(always)]
    fn lookup(
        ctx: &TcContext,
        v4: bool,
        remote: &[u32; 4],
        rport: u16,
        local: &[u32; 4],
        lport: u16,
        full: bool,
    ) -> *mut aya_ebpf::bindings::bpf_sock {
        use aya_ebpf::helpers::generated::{bpf_sk_lookup_tcp, bpf_skc_lookup_tcp};
        // BPF_F_CURRENT_NETNS: the namespace of the device the program runs on.
        let netns = u64::MAX;
        // One call per family with its own tuple on the stack: the verifier checks each
        // with a constant size.
        if v4 {
            let mut tuple = Tuple4 {
                saddr: remote[3],
                daddr: local[3],
                sport: rport,
                dport: lport,
            };
            let (tuple, size) = (
                (&raw mut tuple).cast(),
                core::mem::size_of::<Tuple4>() as u32,
            );
            unsafe {
                if full {
                    bpf_sk_lookup_tcp(ctx.as_ptr(), tuple, size, netns, 0)
                } else {
                    bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, size, netns, 0)
                }
            }
        } else {
            let mut tuple = Tuple6 {
                saddr: *remote,
                daddr: *local,
                sport: rport,
                dport: lport,
            };
            let (tuple, size) = (
                (&raw mut tuple).cast(),
                core::mem::size_of::<Tuple6>() as u32,
            );
            unsafe {
                if full {
                    bpf_sk_lookup_tcp(ctx.as_ptr(), tuple, size, netns, 0)
                } else {
                    bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, size, netns, 0)
                }
            }
        }
    }

    /// Rewrites the destination (or, for `source`, the source) address and port, and
    /// the checksums that cover them. The helpers handle both a locally built packet
    /// (checksum still partial) and a received one.
    #[inline(always)]
    fn rewrite(
        ctx: &TcContext,
        p: &Packet,
        source: bool,
        addr: &[u32; 4],
        port: u16,
    ) -> Option<()> {
        let tcp_check = p.l4 + 16;
        let (old_addr, old_port, port_at) = if source {
            (p.src, p.sport, p.l4)
        } else {
            (p.dst, p.dport, p.l4 + 2)
        };
        if p.v4 {
            let at = if source { L3 + 12 } else { L3 + 16 };
            let (old, new) = (u64::from(old_addr[3]), u64::from(addr[3]));
            ctx.l4_csum_replace(tcp_check, old, new, BPF_F_PSEUDO_HDR | 4)
                .ok()?;
            ctx.l3_csum_replace(L3 + 10, old, new, 4).ok()?;
            ctx.store(at, &addr[3], 0).ok()?;
        } else {
            let at = if source { L3 + 8 } else { L3 + 24 };
            let mut from = old_addr;
            let mut to = *addr;
            let diff = unsafe {
                aya_ebpf::helpers::generated::bpf_csum_diff(
                    from.as_mut_ptr(),
                    16,
                    to.as_mut_ptr(),
                    16,
                    0,
                )
            };
            if diff < 0 {
                return None;
            }
            ctx.l4_csum_replace(tcp_check, 0, diff as u64, BPF_F_PSEUDO_HDR)
                .ok()?;
            ctx.store(at, addr, 0).ok()?;
        }
        if old_port != port {
            ctx.l4_csum_replace(tcp_check, u64::from(old_port), u64::from(port), 2)
                .ok()?;
            ctx.store(port_at, &port, 0).ok()?;
        }
        Some(())
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
