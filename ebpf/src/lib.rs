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
}

/// Program function names in the object.
pub mod programs {
    pub const CONNECT4: &str = "detour_connect4";
    pub const CONNECT6: &str = "detour_connect6";
    pub const GETPEERNAME4: &str = "detour_getpeername4";
    pub const GETPEERNAME6: &str = "detour_getpeername6";
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

/// A frontend's current backend table.
///
/// The agent replaces this value in one map update to switch tables: `generation` says
/// which half of the slot space holds the live table and `slot_count` how many slots it
/// has. The slots of a generation are fully written before the entry points at them, so
/// a connect sees the old table or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Stable id of the frontend (key prefix of its slots).
    pub service_id: u32,
    /// 0 or 1: which generation of slots is live.
    pub generation: u32,
    /// Number of live slots; 0 means no backend, the connect is left alone.
    pub slot_count: u32,
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
}

// No implicit padding anywhere: the sizes are the sums of the field sizes.
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 20);
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 16);
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 20);
const _: () = assert!(core::mem::size_of::<BackendStats>() == 8);
const _: () = assert!(core::mem::size_of::<SockOrigin>() == 44);
