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
//! Invariants the agent relies on:
//! - a connect that is not to a known TCP frontend is never touched;
//! - a missing slot or backend (a table being replaced under us) leaves the connect alone
//!   rather than guessing: the agent only points a frontend at fully written slots;
//! - every program returns 1 (allow): detour redirects, it never refuses a connect.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{bpf_sock_addr, BPF_F_NO_PREALLOC},
        helpers::generated::{bpf_get_prandom_u32, bpf_get_socket_cookie},
        macros::{cgroup_sock_addr, map},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::SockAddrContext,
        EbpfContext,
    };
    use detour_ebpf::{
        Backend, BackendStats, FrontendKey, ServiceEntry, SlotKey, SockOrigin, AF_INET, AF_INET6,
        DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOCKETS, DEFAULT_MAX_TABLE_SLOTS,
        IPPROTO_TCP, V4_MAPPED_WORD,
    };

    /// Allow the syscall to go on (with whatever address we left in the context).
    const ALLOW: i32 = 1;

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

    #[inline(always)]
    fn cookie(ctx: &SockAddrContext) -> u64 {
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
    }

    /// The backend chosen for a frontend, with the ids needed for bookkeeping.
    struct Choice {
        service_id: u32,
        backend_id: u32,
        backend: Backend,
    }

    #[inline(always)]
    fn choose(key: &FrontendKey) -> Option<Choice> {
        // Copy the entry out at once: everything below uses one consistent snapshot.
        let entry = *unsafe { SERVICES.get(key) }?;
        if entry.slot_count == 0 {
            return None;
        }
        let index = unsafe { bpf_get_prandom_u32() } % entry.slot_count;
        let slot = SlotKey::new(entry.service_id, entry.generation, index);
        let backend_id = *unsafe { SLOTS.get(&slot) }?;
        let backend = *BACKENDS.get(backend_id)?;
        if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
            // Per-CPU value: no other writer can race this increment.
            unsafe { (*stats).connects += 1 };
        }
        Some(Choice {
            service_id: entry.service_id,
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
            service_id: choice.service_id,
            backend_id: choice.backend_id,
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
