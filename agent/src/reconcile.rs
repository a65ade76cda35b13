//! Reconciler: desired backend tables → BPF maps, by diff, in an order that never lets a
//! connect see a half-written table.
//!
//! The desired state is, per frontend (VIP:port), a [`Table`]: the slot table (backend
//! addresses repeated in proportion to their weights), the standby slots the kernel
//! falls back to when every backend it probes is suspect, and the passive-health
//! parameters the kernel applies to the frontend's connections. The reconciler owns the id spaces (frontend
//! ids and backend ids) and the knowledge of what is in the maps.
//!
//! Ordering invariants (each write is one map update):
//! 1. a backend's address is written before any slot refers to its id;
//! 2. a frontend's new table is written into the generation that is *not* live, then the
//!    frontend entry is replaced in one update to point at it (the atomic switch);
//! 3. slots of the old generation are left in place until they are overwritten by a later
//!    switch or the frontend is removed, so a connect that read the old entry an instant
//!    before the switch still finds valid slots;
//! 4. a backend that no table refers to any more is cleared only after
//!    [`BACKEND_RELEASE_DELAY`], and ids are handed out round-robin, so an id is not
//!    reused while a connect could still be reading an old slot that names it.
//!
//! 5. after a switch, slots of the new live generation past its length (left by an
//!    earlier, longer table) are deleted: no connect that reads the new entry can reach
//!    them, so each frontend holds at most its live table and the one before it.
//!
//! Capacity: the maps hold at most `max_frontends` service entries, `max_backends`
//! backend ids (ids waiting for their release delay included) and `max_slots` slot
//! entries (both generations of every frontend). Admission is decided per service,
//! before anything is written, so the kernel never has to refuse a write:
//! - services that already have a frontend in the maps come first, in the order given;
//!   each of their frontends gets its new table if that fits, and keeps its previous
//!   table otherwise (a new frontend of such a service that does not fit is left out).
//!   A running service is never evicted, nor held back, by one that is not running yet;
//! - then the other services, in the order given (the configuration's): a service is
//!   admitted whole (all its frontends and the ids of all its configured backends) if it
//!   fits in what is left, or refused whole, and the next one is tried. So the first
//!   service that does not fit is refused, as is every later one that does not fit,
//!   while a later, smaller one that fits is admitted; the outcome depends only on the
//!   order given and on what is already running, never on map iteration order;
//! - a service left out ([`Refusal`]) is named with the first limit it hit, in the
//!   order services, backends, slots; it is tried again on every apply, so it is
//!   programmed as soon as room is made (a service removed, a backend id released).
//!
//! Idempotency: applying the same desired state twice writes nothing the second time.
//! A failed write leaves that frontend's live table as it was (the switch is the last
//! write) and is reported per frontend; other frontends are still applied.
//! State is restored from the maps at start-up, so a restarted agent continues from what
//! the kernel is serving instead of rebuilding from scratch.
//!
//! Restoring trusts nothing in the maps (an older build, a foreign layout or a bug may
//! have written them): an entry is adopted only if its generation is 0 or 1, its slot
//! and standby counts add up (checked) to at most [`MAX_SLOTS`], every backend id its
//! slots name is below the backend map's capacity, its service id is not another
//! entry's, and the frontends adopted stay within the frontend map's capacity; reading
//! one costs at most `2 × MAX_SLOTS` lookups and allocates no more than that. An entry
//! that fails is logged with what is wrong, is not adopted, and keeps its service id
//! reserved until the next [`Reconciler::apply`] replaces it (its frontend is desired:
//! written anew, switched in one update) or deletes it (not desired).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use litemap::LiteMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use detour_ebpf::{
    Backend, FrontendKey, ServiceEntry, SlotKey, AF_INET, AF_INET6, IPPROTO_TCP, MAX_SLOTS,
    V4_MAPPED_WORD,
};

/// How long a backend id stays reserved after the last table that named it was replaced.
pub const BACKEND_RELEASE_DELAY: Duration = Duration::from_secs(2);

/// The map operations the reconciler needs; implemented over aya in `dataplane` and by a
/// fake in tests.
pub trait Maps {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapOpError>;
    fn clear_backend(&mut self, id: u32) -> Result<(), MapOpError>;
    fn write_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapOpError>;
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapOpError>;
    fn write_service(&mut self, key: &FrontendKey, entry: &ServiceEntry) -> Result<(), MapOpError>;
    fn delete_service(&mut self, key: &FrontendKey) -> Result<(), MapOpError>;
    fn services(&self) -> Result<Vec<(FrontendKey, ServiceEntry)>, MapOpError>;
    fn slot(&self, key: SlotKey) -> Result<Option<u32>, MapOpError>;
    fn backend(&self, id: u32) -> Result<Option<Backend>, MapOpError>;
}

/// A failed map operation, named by map and operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} on map {map} failed: {reason}")]
pub struct MapOpError {
    pub map: &'static str,
    pub op: &'static str,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("frontend {frontend}: {source}")]
    Frontend {
        frontend: SocketAddr,
        #[source]
        source: MapOpError,
    },
    #[error("backend {backend}: no free backend id (all {max} in use)")]
    BackendIdsExhausted { backend: SocketAddr, max: u32 },
    #[error("backend {backend}: {source}")]
    Backend {
        backend: SocketAddr,
        #[source]
        source: MapOpError,
    },
    #[error("frontend {frontend}: no free frontend id (all {max} in use)")]
    FrontendIdsExhausted { frontend: SocketAddr, max: u32 },
    #[error("frontend {frontend}: table of {len} slots exceeds the limit of {MAX_SLOTS}")]
    TableTooLarge { frontend: SocketAddr, len: usize },
    #[error("frontend {frontend}: backend {backend} is not of the VIP's address family")]
    FamilyMismatch {
        frontend: SocketAddr,
        backend: SocketAddr,
    },
    #[error("reading the maps at start-up: {0}")]
    Restore(#[source] MapOpError),
    #[error("releasing backend id {id}: {source}")]
    Release {
        id: u32,
        #[source]
        source: MapOpError,
    },
}

/// Why restore did not adopt a service entry found in the maps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreReject {
    #[error("generation {0} is neither 0 nor 1")]
    Generation(u32),
    #[error("{slots} slots and {standby} standby slots exceed the limit of {MAX_SLOTS}")]
    TooManySlots { slots: u32, standby: u32 },
    #[error("a slot names backend id {id}, beyond the backend map's {max} entries")]
    BackendId { id: u32, max: u32 },
    #[error("service id {0} is already another frontend's")]
    DuplicateServiceId(u32),
    #[error("more frontends than the map's {0} entries")]
    OverCapacity(u32),
    #[error("the key is not one detour writes (padding set)")]
    NonCanonicalKey,
    #[error("slot {index} of its live table is missing")]
    MissingSlot { index: u32 },
}

/// The kernel's passive-health parameters of one frontend (see [`ServiceEntry`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Passive {
    pub fail_threshold: u32,
    pub suspect_ms: u32,
    pub handshake_timeout_ms: u32,
}

/// What one frontend should serve.
///
/// The slot lists are shared (`Arc`), not copied: the plan a table comes from
/// (`desired::FrontendPlan`) holds the same lists, and at 10,000 services a copy each
/// was a tenth of the plans' memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The slot table. Empty means "no backend": connects are left alone.
    pub slots: Arc<[SocketAddr]>,
    /// Standby slots, used by the kernel only when the slots it probes are all suspect.
    pub standby: Arc<[SocketAddr]>,
    pub passive: Passive,
}

impl Default for Table {
    fn default() -> Self {
        Self::plain(Vec::new())
    }
}

impl Table {
    /// A table with no standby and no passive parameters.
    pub fn plain(slots: impl Into<Arc<[SocketAddr]>>) -> Self {
        Self {
            slots: slots.into(),
            standby: Arc::from([]),
            passive: Passive::default(),
        }
    }
}

/// What the maps should serve: services in the order they are admitted in (see the
/// module doc). A frontend belongs to one service; a later duplicate is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: Vec<DesiredService>,
}

impl Desired {
    /// The table of a frontend, whichever service has it.
    pub fn table(&self, frontend: &SocketAddr) -> Option<&Table> {
        self.services.iter().find_map(|s| s.tables.get(frontend))
    }

    /// Every frontend's table, service by service.
    pub fn tables(&self) -> impl Iterator<Item = (&SocketAddr, &Table)> {
        self.services.iter().flat_map(|s| s.tables.iter())
    }
}

/// What one service should serve.
///
/// Both collections are sorted vectors, not B-trees: a service has one frontend or a
/// few and some ten backends, and at 10,000 services a B-tree's first node each (room
/// for eleven entries) was 14 MB.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredService {
    /// The name [`Refusal`]s report.
    pub name: String,
    /// Tables by frontend, in frontend order.
    pub tables: LiteMap<SocketAddr, Table>,
    /// Every configured backend of the service, in a table or not: sorted, no
    /// duplicates ([`DesiredService::add_backends`] keeps it so). Each keeps its id
    /// (and so its kernel counters) while it is configured, and a failover target's
    /// address is in the maps before any table needs it.
    pub backends: Vec<SocketAddr>,
}

impl DesiredService {
    /// Adds `backends` to the configured ones, keeping them sorted and unique.
    pub fn add_backends(&mut self, backends: impl IntoIterator<Item = SocketAddr>) {
        self.backends.extend(backends);
        self.backends.sort_unstable();
        self.backends.dedup();
    }
}

/// A map size the reconciler keeps within, named as the agent's flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Limit {
    /// Service entries: one per frontend (VIP:port).
    Services,
    /// Backend ids: one per distinct backend address.
    Backends,
    /// Slot entries: a frontend's live table and the one before it.
    Slots,
}

impl Limit {
    pub const ALL: [Limit; 3] = [Limit::Services, Limit::Backends, Limit::Slots];

    /// The flag that sets it: `max-services`, `max-backends` or `max-slots`.
    pub fn flag(self) -> &'static str {
        match self {
            Limit::Services => "max-services",
            Limit::Backends => "max-backends",
            Limit::Slots => "max-slots",
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.flag())
    }
}

/// A service the maps could not take (all of it, or its new state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub service: String,
    /// The first limit the service hit.
    pub limit: Limit,
    /// That limit's value.
    pub max: u32,
    /// `true`: the service runs, on the tables it had where the new ones did not fit
    /// (its new frontends that did not fit are not programmed). `false`: nothing of it
    /// is in the maps.
    pub running: bool,
    /// The frontends that do not serve what is desired.
    pub frontends: Vec<SocketAddr>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}) reached", self.limit, self.max)
    }
}

/// What a service or frontend would add to the maps.
#[derive(Debug, Default)]
struct Need {
    entries: u32,
    ids: BTreeSet<SocketAddr>,
    slots: u64,
}

#[derive(Debug, Clone)]
struct FrontendState {
    service_id: u32,
    generation: u32,
    /// The live slots followed by the live standby slots, as backend ids.
    live: Vec<u32>,
    /// How many of `live` are table slots; the rest are standby.
    slot_count: u32,
    passive: Passive,
    /// How many slots have ever been written in each generation (for removal).
    written: [u32; 2],
}

impl FrontendState {
    /// Slot entries this frontend holds in the maps.
    fn slots(&self) -> u64 {
        u64::from(self.written[0]) + u64::from(self.written[1])
    }
}

#[derive(Debug, Clone, Copy)]
struct BackendState {
    id: u32,
    /// Set when no live table refers to the backend any more.
    unreferenced_since: Option<Instant>,
}

/// What one [`Reconciler::apply`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub switched: usize,
    pub added: usize,
    pub removed: usize,
    pub errors: Vec<ReconcileError>,
    /// Services (or their new state) that do not fit, in the order they were tried.
    pub refused: Vec<Refusal>,
}

/// A service entry found at restore that was not adopted; [`Reconciler::apply`] replaces
/// or deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Untrusted {
    key: FrontendKey,
    /// The frontend the key names.
    frontend: SocketAddr,
    /// Whether `key` is the one detour writes for `frontend` (so a new entry for it
    /// replaces this one).
    canonical: bool,
    service_id: u32,
}

/// Backend ids in use and the address each names, indexed by id: ids are handed out
/// from 0 up, so a vector is both the set of ids in use and the reverse of
/// `Reconciler::backends`, which every kernel event needs (a separate map of it was
/// 5 MiB at 100,000 backends, rebuilt on every full apply).
#[derive(Debug, Default)]
struct BackendIds {
    addrs: Vec<Option<SocketAddr>>,
    used: usize,
}

impl BackendIds {
    fn len(&self) -> usize {
        self.used
    }

    fn contains(&self, id: u32) -> bool {
        self.get(id).is_some()
    }

    fn get(&self, id: u32) -> Option<SocketAddr> {
        self.addrs.get(id as usize).copied().flatten()
    }

    fn insert(&mut self, id: u32, addr: SocketAddr) {
        let at = id as usize;
        if at >= self.addrs.len() {
            // Grown by an eighth, not doubled: ~12% spare at most, amortized still O(1).
            let more = (at + 1 - self.addrs.len()).max(self.addrs.capacity() / 8 + 1);
            if self.addrs.len() + more > self.addrs.capacity() {
                self.addrs.reserve_exact(more);
            }
            self.addrs.resize(at + 1, None);
        }
        if self.addrs[at].replace(addr).is_none() {
            self.used += 1;
        }
    }

    fn remove(&mut self, id: u32) {
        if let Some(slot) = self.addrs.get_mut(id as usize) {
            if slot.take().is_some() {
                self.used -= 1;
            }
        }
    }

    /// The highest id in use.
    fn highest(&self) -> Option<u32> {
        self.addrs
            .iter()
            .rposition(Option::is_some)
            .map(|at| at as u32)
    }
}

pub struct Reconciler {
    frontends: BTreeMap<SocketAddr, FrontendState>,
    /// Entries restore did not adopt, until apply replaces or deletes them.
    untrusted: Vec<Untrusted>,
    backends: HashMap<SocketAddr, BackendState>,
    /// The address each backend id in use names (ids are below `max_backends`).
    backend_ids: BackendIds,
    service_ids: BTreeSet<u32>,
    max_backends: u32,
    max_frontends: u32,
    /// Slot entries the slot map holds; unbounded unless set ([`Reconciler::with_max_slots`]).
    max_slots: u32,
    next_backend_id: u32,
    next_service_id: u32,
    /// The last full apply refused some service: only a full apply may admit it.
    refusals_pending: bool,
    /// Slot entries held: the sum of every frontend's `slots()`, kept as they change
    /// (a sum over 100,000 frontends per change showed in the scoped path's cost).
    slots: u64,
}

impl Reconciler {
    /// An empty reconciler for empty maps.
    pub fn new(max_frontends: u32, max_backends: u32) -> Self {
        Self {
            frontends: BTreeMap::new(),
            untrusted: Vec::new(),
            refusals_pending: false,
            backends: HashMap::new(),
            backend_ids: BackendIds::default(),
            service_ids: BTreeSet::new(),
            max_backends,
            max_frontends,
            max_slots: u32::MAX,
            next_backend_id: 0,
            next_service_id: 0,
            slots: 0,
        }
    }

    /// Rebuilds the reconciler's view from maps a previous agent left behind. Entries
    /// that cannot be trusted (see the module doc) are logged and left for the next
    /// [`Reconciler::apply`]; only a failing map read is an error.
    pub fn restore(
        maps: &impl Maps,
        max_frontends: u32,
        max_backends: u32,
    ) -> Result<Self, ReconcileError> {
        let mut this = Self::new(max_frontends, max_backends);
        for (key, entry) in maps.services().map_err(ReconcileError::Restore)? {
            let Some(frontend) = frontend_addr(&key) else {
                // Not TCP: not detour's to judge (nor to delete).
                continue;
            };
            let adopted = if frontend_key(frontend) != key {
                Err(RestoreReject::NonCanonicalKey)
            } else {
                this.adopt(maps, frontend, &entry)?
            };
            if let Err(why) = adopted {
                tracing::warn!(
                    %frontend,
                    service_id = entry.service_id,
                    generation = entry.generation,
                    slot_count = entry.slot_count,
                    standby_count = entry.standby_count,
                    %why,
                    "pinned service entry not adopted; the next apply replaces or deletes it"
                );
                this.untrusted.push(Untrusted {
                    key,
                    frontend,
                    canonical: frontend_key(frontend) == key,
                    service_id: entry.service_id,
                });
            }
        }
        this.next_backend_id = this
            .backend_ids
            .highest()
            .map_or(0, |id| (id + 1) % max_backends.max(1));
        Ok(this)
    }

    /// Bounds the slot entries this reconciler writes (the slot map's size).
    #[must_use]
    pub fn with_max_slots(mut self, max_slots: u32) -> Self {
        self.max_slots = max_slots;
        self
    }

    /// The value of a limit.
    pub fn limit(&self, limit: Limit) -> u32 {
        match limit {
            Limit::Services => self.max_frontends,
            Limit::Backends => self.max_backends,
            Limit::Slots => self.max_slots,
        }
    }

    /// Slot entries in the maps: both generations of every frontend.
    pub fn slots_in_use(&self) -> u64 {
        self.slots
    }

    /// Backend ids in use, those waiting for their release delay included.
    pub fn backends_in_use(&self) -> usize {
        self.backend_ids.len()
    }

    /// Frontends in the maps.
    pub fn frontends_in_use(&self) -> usize {
        self.frontends.len()
    }

    /// Adopts one service entry read from the maps, after checking it; `Ok(Err)` says
    /// why it was not adopted (nothing of it is then kept).
    fn adopt(
        &mut self,
        maps: &impl Maps,
        frontend: SocketAddr,
        entry: &ServiceEntry,
    ) -> Result<Result<(), RestoreReject>, ReconcileError> {
        let restore = ReconcileError::Restore;
        if self.frontends.len() >= self.max_frontends as usize {
            return Ok(Err(RestoreReject::OverCapacity(self.max_frontends)));
        }
        if entry.generation > 1 {
            return Ok(Err(RestoreReject::Generation(entry.generation)));
        }
        let total = match entry.slot_count.checked_add(entry.standby_count) {
            Some(total) if total <= MAX_SLOTS => total,
            _ => {
                return Ok(Err(RestoreReject::TooManySlots {
                    slots: entry.slot_count,
                    standby: entry.standby_count,
                }))
            }
        };
        if self.service_ids.contains(&entry.service_id) {
            return Ok(Err(RestoreReject::DuplicateServiceId(entry.service_id)));
        }
        // Grows with the slots found, never from the count alone. A hole is not a table
        // detour wrote (it writes every slot before the entry that counts them): the
        // kernel would read past what is there, so the entry is rewritten, not adopted
        // as the slots that happen to exist.
        let mut live = Vec::new();
        for index in 0..total {
            let slot = SlotKey::new(entry.service_id, entry.generation, index);
            let Some(id) = maps.slot(slot).map_err(restore)? else {
                return Ok(Err(RestoreReject::MissingSlot { index }));
            };
            if id >= self.max_backends {
                return Ok(Err(RestoreReject::BackendId {
                    id,
                    max: self.max_backends,
                }));
            }
            live.push(id);
        }
        let mut written = [0u32; 2];
        written[entry.generation as usize] = total;
        // Slots are always written from index 0 up, so the first miss ends them.
        let other = 1 - entry.generation;
        let mut n = 0;
        while n < MAX_SLOTS
            && maps
                .slot(SlotKey::new(entry.service_id, other, n))
                .map_err(restore)?
                .is_some()
        {
            n += 1;
        }
        written[other as usize] = n;
        for &id in &live {
            if self.backend_ids.contains(id) {
                continue;
            }
            if let Some(backend) = maps.backend(id).map_err(restore)? {
                if let Some(addr) = backend_addr(&backend) {
                    self.backends.insert(
                        addr,
                        BackendState {
                            id,
                            unreferenced_since: None,
                        },
                    );
                    self.backend_ids.insert(id, addr);
                }
            }
        }
        self.next_service_id = self.next_service_id.max(entry.service_id.saturating_add(1));
        self.service_ids.insert(entry.service_id);
        self.slots += u64::from(written[0]) + u64::from(written[1]);
        self.frontends.insert(
            frontend,
            FrontendState {
                service_id: entry.service_id,
                generation: entry.generation,
                slot_count: entry.slot_count.min(live.len() as u32),
                live,
                written,
                passive: Passive {
                    fail_threshold: entry.fail_threshold,
                    suspect_ms: entry.suspect_ms,
                    handshake_timeout_ms: entry.handshake_timeout_ms,
                },
            },
        );
        Ok(Ok(()))
    }

    /// The backend id of an address, if it has one.
    pub fn backend_id(&self, addr: &SocketAddr) -> Option<u32> {
        self.backends.get(addr).map(|b| b.id)
    }

    /// The kernel's id of a frontend (the `service_id` of its entry and events).
    pub fn service_id(&self, frontend: &SocketAddr) -> Option<u32> {
        self.frontends.get(frontend).map(|f| f.service_id)
    }

    /// The live slot table of a frontend, as backend ids (without the standby slots).
    pub fn live_table(&self, frontend: &SocketAddr) -> Option<&[u32]> {
        self.frontends
            .get(frontend)
            .map(|f| &f.live[..f.slot_count as usize])
    }

    /// The live standby slots of a frontend, as backend ids.
    pub fn live_standby(&self, frontend: &SocketAddr) -> Option<&[u32]> {
        self.frontends
            .get(frontend)
            .map(|f| &f.live[f.slot_count as usize..])
    }

    /// Every backend address with its id.
    /// The backend address a kernel id names, while the id is in use (its release
    /// delay included): what a kernel event's `backend_id` means.
    pub fn backend_addr(&self, id: u32) -> Option<SocketAddr> {
        self.backend_ids.get(id)
    }

    pub fn backend_ids(&self) -> impl Iterator<Item = (SocketAddr, u32)> + '_ {
        self.backends.iter().map(|(addr, state)| (*addr, state.id))
    }

    /// Makes the maps serve `desired`, as far as they have room (see the module doc).
    /// Frontends not in `desired` are removed.
    pub fn apply(&mut self, maps: &mut impl Maps, desired: &Desired, now: Instant) -> ApplyReport {
        let mut report = ApplyReport::default();
        // The first service to name a frontend has it.
        let mut owner: HashMap<SocketAddr, usize> = HashMap::new();
        for (index, service) in desired.services.iter().enumerate() {
            for frontend in service.tables.keys() {
                owner.entry(*frontend).or_insert(index);
            }
        }
        self.delete_untrusted(maps, &owner, &mut report);
        // Removals first: what they free is there for everything after.
        let gone: Vec<SocketAddr> = self
            .frontends
            .keys()
            .filter(|k| !owner.contains_key(k))
            .copied()
            .collect();
        for frontend in gone {
            match self.remove_frontend(maps, frontend) {
                Ok(()) => report.removed += 1,
                Err(e) => report.errors.push(e),
            }
        }

        let mut configured = self.admit(maps, desired, &owner, &mut report);
        // A desired frontend's untrusted entry was replaced by its new one.
        let frontends = &self.frontends;
        self.untrusted
            .retain(|u| !(u.canonical && frontends.contains_key(&u.frontend)));
        match self.release_unreferenced(maps, &configured, now) {
            // Ids released: a service refused for want of them may fit now.
            Ok(released) if released > 0 && !report.refused.is_empty() => {
                report.refused.clear();
                configured = self.admit(maps, desired, &owner, &mut report);
                // Marks what the second pass left unreferenced; nothing new expires.
                if let Err(e) = self.release_unreferenced(maps, &configured, now) {
                    report.errors.push(e);
                }
            }
            Ok(_) => {}
            Err(e) => report.errors.push(e),
        }
        self.refusals_pending = !report.refused.is_empty();
        report
    }

    /// [`Reconciler::apply`] for a change confined to the services at `changed`
    /// (indices into `desired.services`): each keeps the frontends it had, all of them
    /// in the maps, and every other service is as the last apply left it. Their tables
    /// and configured backends may change: a new backend gets its id here, and of
    /// `dropped` (backends the change may have stopped naming), those no table and no
    /// service names any more start their release delay, as in a full apply; the
    /// release itself is [`Reconciler::release_expired`]'s. Costs the changed services'
    /// frontends, plus, when something is dropped, one pass over the live tables and
    /// the configured backends (no allocation per frontend), not the full apply's
    /// admission of every service: this is what a health verdict, an ejection or an
    /// EndpointSlice change costs at 10,000 services.
    ///
    /// `None`, having written nothing, where the change is not that local or needs the
    /// whole picture: restored entries still untrusted, a refusal from the last apply
    /// waiting for room, a frontend that is not in the maps, or tables and backends that
    /// would not fit. The caller then runs the full [`Reconciler::apply`].
    pub fn apply_services(
        &mut self,
        maps: &mut impl Maps,
        desired: &Desired,
        changed: &[usize],
        dropped: &[SocketAddr],
        now: Instant,
    ) -> Option<ApplyReport> {
        if self.refusals_pending || !self.untrusted.is_empty() {
            return None;
        }
        // The slot entries in use, counted (a pass over every frontend) only if some
        // table needs more.
        let mut total: Option<u64> = None;
        let mut new_ids: BTreeSet<SocketAddr> = BTreeSet::new();
        for &index in changed {
            let service = desired.services.get(index)?;
            for (frontend, table) in &service.tables {
                // Not ours since the last apply: a frontend moved between services.
                self.frontends.get(frontend)?;
                let need = self.frontend_need(*frontend, table);
                new_ids.extend(need.ids);
                if need.slots > 0 {
                    let in_use = total.get_or_insert_with(|| self.slots_in_use());
                    let slots_only = Need {
                        slots: need.slots,
                        ..Need::default()
                    };
                    self.exceeded(&slots_only, *in_use)
                        .is_none()
                        .then_some(())?;
                    *in_use += need.slots;
                }
            }
            new_ids.extend(
                service
                    .backends
                    .iter()
                    .filter(|b| !self.backends.contains_key(b)),
            );
        }
        if self.backend_ids.len() + new_ids.len() > self.max_backends as usize {
            return None;
        }
        // The ids the changed frontends name now: those they stop naming are candidates
        // for release, as are the backends the caller says were dropped.
        let mut candidates: BTreeSet<u32> = dropped
            .iter()
            .filter_map(|addr| self.backend_id(addr))
            .collect();
        let mut report = ApplyReport::default();
        // `apply_counted` keeps a count for the full path's admission; unused here.
        let mut slots = 0;
        for &index in changed {
            let service = &desired.services[index];
            for backend in &service.backends {
                if let Err(e) = self.ensure_backend(maps, *backend) {
                    report.errors.push(e);
                }
            }
            for (frontend, table) in &service.tables {
                candidates.extend(
                    self.frontends
                        .get(frontend)
                        .into_iter()
                        .flat_map(|f| f.live.iter().copied()),
                );
                self.apply_counted(maps, *frontend, table, &mut slots, &mut report);
            }
        }
        // What the changed services still name is referenced: no need to look further.
        for &index in changed {
            let service = &desired.services[index];
            for addr in &service.backends {
                if let Some(id) = self.backend_id(addr) {
                    candidates.remove(&id);
                }
            }
            for frontend in service.tables.keys() {
                for id in self
                    .frontends
                    .get(frontend)
                    .into_iter()
                    .flat_map(|f| &f.live)
                {
                    candidates.remove(id);
                }
            }
        }
        if !candidates.is_empty() {
            self.mark_unreferenced(desired, candidates, now);
        }
        Some(report)
    }

    /// Starts the release delay of the backends among `candidates` (ids) that no live
    /// table and no service of `desired` names.
    fn mark_unreferenced(&mut self, desired: &Desired, candidates: BTreeSet<u32>, now: Instant) {
        for addr in self.unnamed(desired, candidates).into_keys() {
            if let Some(state) = self.backends.get_mut(&addr) {
                state.unreferenced_since.get_or_insert(now);
            }
        }
    }

    /// The backends among `candidates` (ids) that no live table and no service of
    /// `desired` names, by address: one pass over the live tables and, while any is
    /// left, over the configured backends.
    fn unnamed(
        &self,
        desired: &Desired,
        mut candidates: BTreeSet<u32>,
    ) -> HashMap<SocketAddr, u32> {
        for frontend in self.frontends.values() {
            for id in &frontend.live {
                candidates.remove(id);
            }
        }
        let mut unnamed: HashMap<SocketAddr, u32> = self
            .backends
            .iter()
            .filter(|(_, state)| candidates.contains(&state.id))
            .map(|(addr, state)| (*addr, state.id))
            .collect();
        for service in &desired.services {
            if unnamed.is_empty() {
                break;
            }
            for backend in &service.backends {
                unnamed.remove(backend);
            }
        }
        unnamed
    }

    /// Clears `release` (address, id) from the maps and forgets them; returns how many.
    fn clear_backends(
        &mut self,
        maps: &mut impl Maps,
        release: impl IntoIterator<Item = (SocketAddr, u32)>,
    ) -> Result<usize, ReconcileError> {
        let mut count = 0;
        for (addr, id) in release {
            maps.clear_backend(id)
                .map_err(|source| ReconcileError::Release { id, source })?;
            self.backends.remove(&addr);
            self.backend_ids.remove(id);
            count += 1;
        }
        Ok(count)
    }

    /// Clears the backends whose release delay is over and that no live table and no
    /// service of `desired` names (a backend named again since it was marked has had its
    /// mark cleared, so this only confirms). Returns how many were released: a service
    /// refused for want of ids may fit now, which only a full [`Reconciler::apply`]
    /// admits.
    pub fn release_expired(
        &mut self,
        maps: &mut impl Maps,
        desired: &Desired,
        now: Instant,
    ) -> Result<usize, ReconcileError> {
        let expired: BTreeSet<u32> = self
            .backends
            .values()
            .filter(|state| {
                state
                    .unreferenced_since
                    .is_some_and(|since| now.duration_since(since) >= BACKEND_RELEASE_DELAY)
            })
            .map(|state| state.id)
            .collect();
        if expired.is_empty() {
            return Ok(0);
        }
        let release = self.unnamed(desired, expired.clone());
        // Named again: no longer waiting.
        for (addr, state) in &mut self.backends {
            if expired.contains(&state.id) && !release.contains_key(addr) {
                state.unreferenced_since = None;
            }
        }
        self.clear_backends(maps, release)
    }

    /// Whether the last full apply left a service refused, waiting for room that only a
    /// full [`Reconciler::apply`] can give it.
    pub fn has_refusals(&self) -> bool {
        self.refusals_pending
    }

    /// Applies the services that fit, running ones first (see the module doc); returns
    /// the backends of the services that have something in the maps, which keep their
    /// ids.
    fn admit(
        &mut self,
        maps: &mut impl Maps,
        desired: &Desired,
        owner: &HashMap<SocketAddr, usize>,
        report: &mut ApplyReport,
    ) -> BTreeSet<SocketAddr> {
        let owned = |index: usize| {
            desired.services[index]
                .tables
                .iter()
                .filter(move |(frontend, _)| owner[*frontend] == index)
        };
        let (running, waiting): (Vec<usize>, Vec<usize>) = (0..desired.services.len())
            .partition(|&i| owned(i).any(|(f, _)| self.frontends.contains_key(f)));
        let mut slots = self.slots_in_use();
        // Backends of services with something in the maps: these keep their ids.
        let mut configured = BTreeSet::new();

        for index in running {
            let service = &desired.services[index];
            configured.extend(service.backends.iter().copied());
            let new_refusal = |this: &Self, limit: Limit| Refusal {
                service: service.name.clone(),
                limit,
                max: this.limit(limit),
                running: true,
                frontends: Vec::new(),
            };
            let mut refusal: Option<Refusal> = None;
            for (frontend, table) in owned(index) {
                let need = self.frontend_need(*frontend, table);
                if let Some(limit) = self.exceeded(&need, slots) {
                    // Keeps its previous table, or stays out if it has none.
                    refusal
                        .get_or_insert_with(|| new_refusal(self, limit))
                        .frontends
                        .push(*frontend);
                    continue;
                }
                self.apply_counted(maps, *frontend, table, &mut slots, report);
            }
            // Failover targets, as far as ids are left, if the tables fit: a service
            // that is already short does not take ids it cannot use for its new tables
            // (a table that needs one later gets it then, if there is room).
            if refusal.is_none() {
                for backend in &service.backends {
                    if self.backends.contains_key(backend) {
                        continue;
                    }
                    if self.backend_ids.len() >= self.max_backends as usize {
                        refusal = Some(new_refusal(self, Limit::Backends));
                        break;
                    }
                    if let Err(e) = self.ensure_backend(maps, *backend) {
                        report.errors.push(e);
                    }
                }
            }
            report.refused.extend(refusal);
        }

        for index in waiting {
            let service = &desired.services[index];
            let mut need = Need::default();
            for (frontend, table) in owned(index) {
                let n = self.frontend_need(*frontend, table);
                need.entries += n.entries;
                need.ids.extend(n.ids);
                need.slots += n.slots;
            }
            need.ids.extend(
                service
                    .backends
                    .iter()
                    .filter(|b| !self.backends.contains_key(b)),
            );
            if let Some(limit) = self.exceeded(&need, slots) {
                report.refused.push(Refusal {
                    service: service.name.clone(),
                    limit,
                    max: self.limit(limit),
                    running: false,
                    frontends: owned(index).map(|(f, _)| *f).collect(),
                });
                continue;
            }
            configured.extend(service.backends.iter().copied());
            for backend in &service.backends {
                if let Err(e) = self.ensure_backend(maps, *backend) {
                    report.errors.push(e);
                }
            }
            for (frontend, table) in owned(index) {
                self.apply_counted(maps, *frontend, table, &mut slots, report);
            }
        }

        configured
    }

    /// [`Reconciler::apply_frontend`], keeping `slots` (the slot entries in use) and the
    /// report up to date.
    fn apply_counted(
        &mut self,
        maps: &mut impl Maps,
        frontend: SocketAddr,
        table: &Table,
        slots: &mut u64,
        report: &mut ApplyReport,
    ) {
        let held = |this: &Self| {
            this.frontends
                .get(&frontend)
                .map_or(0, FrontendState::slots)
        };
        let before = held(self);
        let result = self.apply_frontend(maps, frontend, table);
        let after = held(self);
        self.slots = self.slots + after - before;
        *slots = (*slots + after).saturating_sub(before);
        match result {
            Ok(Change::None) => {}
            Ok(Change::Added) => report.added += 1,
            Ok(Change::Switched) => report.switched += 1,
            Err(e) => report.errors.push(e),
        }
    }

    /// What writing `table` for `frontend` would add to the maps.
    fn frontend_need(&self, frontend: SocketAddr, table: &Table) -> Need {
        let addrs = table.slots.iter().chain(table.standby.iter());
        let ids: BTreeSet<SocketAddr> = addrs
            .clone()
            .filter(|a| !self.backends.contains_key(a))
            .copied()
            .collect();
        let len = (table.slots.len() + table.standby.len()) as u64;
        let Some(state) = self.frontends.get(&frontend) else {
            return Need {
                entries: 1,
                ids,
                slots: len,
            };
        };
        let unchanged = ids.is_empty()
            && state.slot_count as usize == table.slots.len()
            && state.passive == table.passive
            && state.live.len() == len as usize
            && addrs
                .zip(&state.live)
                .all(|(a, id)| self.backends.get(a).is_some_and(|b| b.id == *id));
        let slots = if unchanged {
            0
        } else {
            // The switch writes into the other generation, over what is there already.
            len.saturating_sub(u64::from(state.written[1 - state.generation as usize]))
        };
        Need {
            entries: 0,
            ids,
            slots,
        }
    }

    /// The first limit `need` would cross, with `slots` slot entries in use. What needs
    /// nothing of a kind fits, even when the maps hold more than the limit (pinned maps
    /// of an agent that ran with larger limits).
    fn exceeded(&self, need: &Need, slots: u64) -> Option<Limit> {
        let entries = self.frontends.len() as u64 + u64::from(need.entries);
        let ids = (self.backend_ids.len() + need.ids.len()) as u64;
        if need.entries > 0 && entries > u64::from(self.max_frontends) {
            Some(Limit::Services)
        } else if !need.ids.is_empty() && ids > u64::from(self.max_backends) {
            Some(Limit::Backends)
        } else if need.slots > 0 && slots + need.slots > u64::from(self.max_slots) {
            Some(Limit::Slots)
        } else {
            None
        }
    }

    /// Deletes the entries restore did not adopt whose frontend is not desired (the
    /// others are replaced when their frontend is added).
    fn delete_untrusted(
        &mut self,
        maps: &mut impl Maps,
        desired: &HashMap<SocketAddr, usize>,
        report: &mut ApplyReport,
    ) {
        let mut kept = Vec::new();
        for untrusted in std::mem::take(&mut self.untrusted) {
            if untrusted.canonical && desired.contains_key(&untrusted.frontend) {
                kept.push(untrusted);
                continue;
            }
            match maps.delete_service(&untrusted.key) {
                Ok(()) => report.removed += 1,
                Err(source) => {
                    report.errors.push(ReconcileError::Frontend {
                        frontend: untrusted.frontend,
                        source,
                    });
                    kept.push(untrusted);
                }
            }
        }
        self.untrusted = kept;
    }

    fn apply_frontend(
        &mut self,
        maps: &mut impl Maps,
        frontend: SocketAddr,
        table: &Table,
    ) -> Result<Change, ReconcileError> {
        let len = table.slots.len() + table.standby.len();
        if len > MAX_SLOTS as usize {
            return Err(ReconcileError::TableTooLarge { frontend, len });
        }
        let all = table.slots.iter().chain(table.standby.iter());
        if let Some(backend) = all.clone().find(|b| b.is_ipv4() != frontend.is_ipv4()) {
            return Err(ReconcileError::FamilyMismatch {
                frontend,
                backend: *backend,
            });
        }
        let mut ids = Vec::with_capacity(len);
        for addr in all {
            ids.push(self.ensure_backend(maps, *addr)?);
        }
        let slot_count = table.slots.len() as u32;
        let (service_id, generation, added) = match self.frontends.get_mut(&frontend) {
            Some(state)
                if state.live == ids
                    && state.slot_count == slot_count
                    && state.passive == table.passive =>
            {
                return Ok(Change::None)
            }
            Some(state) => {
                let generation = 1 - state.generation;
                // Recorded before writing, so slots of a write that fails half-way are
                // still deleted when the frontend goes (deleting a missing slot is fine).
                let written = &mut state.written[generation as usize];
                *written = (*written).max(ids.len() as u32);
                (state.service_id, generation, false)
            }
            None => (self.allocate_service_id(frontend)?, 0, true),
        };
        // An empty table leaves connects alone, standby or not.
        let standby_count = if slot_count == 0 {
            0
        } else {
            ids.len() as u32 - slot_count
        };
        let entry = ServiceEntry {
            service_id,
            generation,
            slot_count,
            standby_count,
            fail_threshold: table.passive.fail_threshold,
            suspect_ms: table.passive.suspect_ms,
            handshake_timeout_ms: table.passive.handshake_timeout_ms,
            flags: 0,
        };
        let written = ids.iter().enumerate().try_for_each(|(index, id)| {
            maps.write_slot(SlotKey::new(service_id, generation, index as u32), *id)
        });
        // The switch: from here on connects read the new generation.
        let switched = written.and_then(|()| maps.write_service(&frontend_key(frontend), &entry));
        if let Err(source) = switched {
            if added {
                // Nothing points at the new id's slots: undo them and free the id.
                for index in 0..ids.len() as u32 {
                    let _ = maps.delete_slot(SlotKey::new(service_id, generation, index));
                }
                self.service_ids.remove(&service_id);
            }
            return Err(ReconcileError::Frontend { frontend, source });
        }

        let state = self.frontends.entry(frontend).or_insert(FrontendState {
            service_id,
            generation,
            live: Vec::new(),
            slot_count: 0,
            passive: Passive::default(),
            written: [0, 0],
        });
        state.generation = generation;
        // Invariant 5: what lies past the new table in its generation is unreachable now.
        // Deleted from the top, so `written` stays the length of a prefix whatever fails.
        let written = &mut state.written[generation as usize];
        *written = (*written).max(len as u32);
        while *written > len as u32
            && maps
                .delete_slot(SlotKey::new(service_id, generation, *written - 1))
                .is_ok()
        {
            *written -= 1;
        }
        state.live = ids;
        state.slot_count = slot_count;
        state.passive = table.passive;
        Ok(if added {
            Change::Added
        } else {
            Change::Switched
        })
    }

    fn remove_frontend(
        &mut self,
        maps: &mut impl Maps,
        frontend: SocketAddr,
    ) -> Result<(), ReconcileError> {
        let wrap = |source| ReconcileError::Frontend { frontend, source };
        let Some(state) = self.frontends.get(&frontend).cloned() else {
            return Ok(());
        };
        maps.delete_service(&frontend_key(frontend)).map_err(wrap)?;
        self.frontends.remove(&frontend);
        self.slots -= state.slots();
        self.service_ids.remove(&state.service_id);
        for generation in 0..2u32 {
            for index in 0..state.written[generation as usize] {
                maps.delete_slot(SlotKey::new(state.service_id, generation, index))
                    .map_err(wrap)?;
            }
        }
        Ok(())
    }

    fn ensure_backend(
        &mut self,
        maps: &mut impl Maps,
        addr: SocketAddr,
    ) -> Result<u32, ReconcileError> {
        if let Some(state) = self.backends.get_mut(&addr) {
            state.unreferenced_since = None;
            return Ok(state.id);
        }
        if self.backend_ids.len() as u32 >= self.max_backends {
            return Err(ReconcileError::BackendIdsExhausted {
                backend: addr,
                max: self.max_backends,
            });
        }
        let mut id = self.next_backend_id;
        while self.backend_ids.contains(id) {
            id = (id + 1) % self.max_backends;
        }
        maps.write_backend(id, &backend_value(addr))
            .map_err(|source| ReconcileError::Backend {
                backend: addr,
                source,
            })?;
        self.next_backend_id = (id + 1) % self.max_backends;
        self.backend_ids.insert(id, addr);
        self.backends.insert(
            addr,
            BackendState {
                id,
                unreferenced_since: None,
            },
        );
        Ok(id)
    }

    fn allocate_service_id(&mut self, frontend: SocketAddr) -> Result<u32, ReconcileError> {
        if self.frontends.len() as u32 >= self.max_frontends {
            return Err(ReconcileError::FrontendIdsExhausted {
                frontend,
                max: self.max_frontends,
            });
        }
        let mut id = self.next_service_id;
        // An untrusted entry's id stays reserved: its slots may still be read.
        while self.service_ids.contains(&id) || self.untrusted.iter().any(|u| u.service_id == id) {
            id = id.wrapping_add(1);
        }
        self.next_service_id = id.wrapping_add(1);
        self.service_ids.insert(id);
        Ok(id)
    }

    /// Clears backends that are neither configured nor named by a live table, once they
    /// have been so for [`BACKEND_RELEASE_DELAY`].
    fn release_unreferenced(
        &mut self,
        maps: &mut impl Maps,
        configured: &BTreeSet<SocketAddr>,
        now: Instant,
    ) -> Result<usize, ReconcileError> {
        let referenced: BTreeSet<u32> = self
            .frontends
            .values()
            .flat_map(|f| f.live.iter().copied())
            .collect();
        let mut release = Vec::new();
        for (addr, state) in &mut self.backends {
            if referenced.contains(&state.id) || configured.contains(addr) {
                state.unreferenced_since = None;
                continue;
            }
            let since = *state.unreferenced_since.get_or_insert(now);
            if now.duration_since(since) >= BACKEND_RELEASE_DELAY {
                release.push((*addr, state.id));
            }
        }
        self.clear_backends(maps, release)
    }

    /// Whether some backend is waiting for its release delay (the caller should call
    /// [`Reconciler::apply`] again later even if nothing else changes).
    pub fn has_pending_releases(&self) -> bool {
        self.backends
            .values()
            .any(|b| b.unreferenced_since.is_some())
    }
}

enum Change {
    None,
    Added,
    Switched,
}

fn words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [0, 0, V4_MAPPED_WORD, u32::from_ne_bytes(v4.octets())],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

fn ip_from_words(addr: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The map key of a TCP frontend.
pub fn frontend_key(addr: SocketAddr) -> FrontendKey {
    FrontendKey {
        addr: words(addr.ip()),
        port: addr.port().to_be(),
        proto: IPPROTO_TCP,
        pad: 0,
    }
}

/// The frontend a map key stands for (TCP only).
pub fn frontend_addr(key: &FrontendKey) -> Option<SocketAddr> {
    (key.proto == IPPROTO_TCP)
        .then(|| SocketAddr::new(ip_from_words(key.addr), u16::from_be(key.port)))
}

/// The map value of a backend address.
pub fn backend_value(addr: SocketAddr) -> Backend {
    Backend {
        addr: words(addr.ip()),
        port: addr.port().to_be(),
        family: if addr.is_ipv4() { AF_INET } else { AF_INET6 },
        pad: 0,
    }
}

/// The address a backend map value stands for; `None` for an unused id.
pub fn backend_addr(backend: &Backend) -> Option<SocketAddr> {
    let ip = ip_from_words(backend.addr);
    match (backend.family, ip) {
        (AF_INET, IpAddr::V4(_)) | (AF_INET6, IpAddr::V6(_)) => {
            Some(SocketAddr::new(ip, u16::from_be(backend.port)))
        }
        (AF_INET6, IpAddr::V4(v4)) => Some(SocketAddr::new(
            IpAddr::V6(v4.to_ipv6_mapped()),
            u16::from_be(backend.port),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map fake that records every write and can be told to fail.
    #[derive(Default, Debug)]
    struct FakeMaps {
        services: BTreeMap<FrontendKey, ServiceEntry>,
        slots: HashMap<(u32, u32), u32>,
        backends: HashMap<u32, Backend>,
        writes: Vec<String>,
        fail_service_writes_for: Option<FrontendKey>,
        /// Map sizes, enforced as the kernel does: a new key in a full hash map and an
        /// array index past the end fail (E2BIG); replacing a key always works.
        capacity: Option<Capacity>,
    }

    #[derive(Debug, Clone, Copy)]
    struct Capacity {
        services: usize,
        backends: u32,
        slots: usize,
    }

    impl FakeMaps {
        fn sized(services: usize, backends: u32, slots: usize) -> Self {
            Self {
                capacity: Some(Capacity {
                    services,
                    backends,
                    slots,
                }),
                ..Self::default()
            }
        }
    }

    fn full(map: &'static str) -> MapOpError {
        MapOpError {
            map,
            op: "update",
            reason: "Argument list too long (os error 7)".into(),
        }
    }

    fn err(op: &'static str) -> MapOpError {
        MapOpError {
            map: "fake",
            op,
            reason: "injected".into(),
        }
    }

    impl Maps for FakeMaps {
        fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapOpError> {
            if self.capacity.is_some_and(|c| id >= c.backends) {
                return Err(full("backends"));
            }
            self.writes.push(format!("backend {id}"));
            self.backends.insert(id, *backend);
            Ok(())
        }
        fn clear_backend(&mut self, id: u32) -> Result<(), MapOpError> {
            self.writes.push(format!("clear {id}"));
            self.backends.remove(&id);
            Ok(())
        }
        fn write_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapOpError> {
            if self.capacity.is_some_and(|c| {
                self.slots.len() >= c.slots && !self.slots.contains_key(&(key.service_id, key.slot))
            }) {
                return Err(full("slots"));
            }
            self.writes
                .push(format!("slot {}/{}", key.service_id, key.slot));
            self.slots.insert((key.service_id, key.slot), backend_id);
            Ok(())
        }
        fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapOpError> {
            self.slots.remove(&(key.service_id, key.slot));
            Ok(())
        }
        fn write_service(
            &mut self,
            key: &FrontendKey,
            entry: &ServiceEntry,
        ) -> Result<(), MapOpError> {
            if self.fail_service_writes_for == Some(*key) {
                return Err(err("update"));
            }
            if self.capacity.is_some_and(|c| {
                self.services.len() >= c.services && !self.services.contains_key(key)
            }) {
                return Err(full("services"));
            }
            self.writes.push(format!("service {}", entry.service_id));
            self.services.insert(*key, *entry);
            Ok(())
        }
        fn delete_service(&mut self, key: &FrontendKey) -> Result<(), MapOpError> {
            self.services.remove(key);
            Ok(())
        }
        fn services(&self) -> Result<Vec<(FrontendKey, ServiceEntry)>, MapOpError> {
            Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn slot(&self, key: SlotKey) -> Result<Option<u32>, MapOpError> {
            Ok(self.slots.get(&(key.service_id, key.slot)).copied())
        }
        fn backend(&self, id: u32) -> Result<Option<Backend>, MapOpError> {
            Ok(self.backends.get(&id).copied())
        }
    }

    impl FakeMaps {
        /// What a connect would see for `frontend`: the backend addresses of the live
        /// table, or `None` if any slot or backend is missing (a torn table).
        fn served(&self, frontend: SocketAddr) -> Option<Vec<SocketAddr>> {
            let entry = self.services.get(&frontend_key(frontend))?;
            (0..entry.slot_count)
                .map(|i| {
                    let key = SlotKey::new(entry.service_id, entry.generation, i);
                    let id = self.slots.get(&(key.service_id, key.slot))?;
                    backend_addr(self.backends.get(id)?)
                })
                .collect()
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// One service per frontend, named as the frontend, in the order given; the
    /// configured backends are those the tables name.
    fn desired(entries: &[(&str, &[&str])]) -> Desired {
        Desired {
            services: entries
                .iter()
                .map(|(f, bs)| service(f, &[(f, bs)]))
                .collect(),
        }
    }

    /// A service with the given frontends and tables; its backends are those they name.
    fn service(name: &str, frontends: &[(&str, &[&str])]) -> DesiredService {
        let tables: LiteMap<SocketAddr, Table> = frontends
            .iter()
            .map(|(f, bs)| {
                (
                    sa(f),
                    Table::plain(bs.iter().map(|b| sa(b)).collect::<Vec<_>>()),
                )
            })
            .collect();
        let mut service = DesiredService {
            name: name.to_string(),
            ..DesiredService::default()
        };
        service.add_backends(tables.values().flat_map(|t| t.slots.iter().copied()));
        service.tables = tables;
        service
    }

    /// A reconciler with the fake's limits.
    fn sized(services: u32, backends: u32, slots: u32) -> (FakeMaps, Reconciler) {
        (
            FakeMaps::sized(services as usize, backends, slots as usize),
            Reconciler::new(services, backends).with_max_slots(slots),
        )
    }

    /// The reconciler's counts are the maps' (so its limits are the maps' limits).
    fn assert_accounting(maps: &FakeMaps, r: &Reconciler) {
        assert_eq!(maps.slots.len() as u64, r.slots_in_use(), "slot entries");
        assert_eq!(maps.services.len(), r.frontends_in_use(), "service entries");
        assert_eq!(maps.backends.len(), r.backends_in_use(), "backend ids");
        // The id → address answer matches what the maps hold, id by id.
        for (&id, backend) in &maps.backends {
            assert_eq!(r.backend_addr(id), backend_addr(backend), "backend id {id}");
        }
        for (addr, id) in r.backend_ids() {
            assert_eq!(r.backend_addr(id), Some(addr));
        }
    }

    /// (service, limit, running) of each refusal.
    fn refusals(report: &ApplyReport) -> Vec<(String, Limit, bool)> {
        report
            .refused
            .iter()
            .map(|r| (r.service.clone(), r.limit, r.running))
            .collect()
    }

    #[test]
    fn services_past_max_services_are_refused_in_the_order_given() {
        let (mut maps, mut r) = sized(2, 16, 64);
        // The order given, not the addresses' order, decides: .3 and .2 come first.
        let want = desired(&[
            ("127.200.0.3:80", &["127.0.0.3:80"]),
            ("127.200.0.2:80", &["127.0.0.2:80"]),
            ("127.200.0.1:80", &["127.0.0.1:80"]),
        ]);
        let report = r.apply(&mut maps, &want, Instant::now());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            refusals(&report),
            [("127.200.0.1:80".into(), Limit::Services, false)]
        );
        assert_eq!(report.refused[0].to_string(), "max-services (2) reached");
        assert_eq!(report.refused[0].frontends, [sa("127.200.0.1:80")]);
        assert_eq!(
            maps.served(sa("127.200.0.3:80")),
            Some(vec![sa("127.0.0.3:80")])
        );
        assert_eq!(
            maps.served(sa("127.200.0.2:80")),
            Some(vec![sa("127.0.0.2:80")])
        );
        assert!(maps.served(sa("127.200.0.1:80")).is_none());
        // Its backend took no id.
        assert_eq!(r.backend_id(&sa("127.0.0.1:80")), None);
        assert_accounting(&maps, &r);
    }

    #[test]
    fn a_service_that_does_not_fit_is_refused_whole_and_a_later_one_that_fits_is_admitted() {
        let (mut maps, mut r) = sized(16, 3, 64);
        let want = Desired {
            services: vec![
                service(
                    "s1",
                    &[("127.200.0.1:80", &["127.0.1.1:80", "127.0.1.2:80"])],
                ),
                // Two VIPs: both or neither.
                service(
                    "s2",
                    &[
                        ("127.200.0.2:80", &["127.0.2.1:80"]),
                        ("127.200.0.12:80", &["127.0.2.2:80"]),
                    ],
                ),
                service("s3", &[("127.200.0.3:80", &["127.0.3.1:80"])]),
            ],
        };
        let report = r.apply(&mut maps, &want, Instant::now());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(refusals(&report), [("s2".into(), Limit::Backends, false)]);
        assert_eq!(
            report.refused[0].frontends,
            [sa("127.200.0.2:80"), sa("127.200.0.12:80")]
        );
        assert!(maps.served(sa("127.200.0.2:80")).is_none());
        assert!(
            maps.served(sa("127.200.0.12:80")).is_none(),
            "half a service"
        );
        assert_eq!(
            r.backend_id(&sa("127.0.2.1:80")),
            None,
            "no id for half of it"
        );
        assert_eq!(
            maps.served(sa("127.200.0.3:80")),
            Some(vec![sa("127.0.3.1:80")])
        );
        assert_accounting(&maps, &r);
        // Applying again changes nothing and refuses the same.
        maps.writes.clear();
        let again = r.apply(&mut maps, &want, Instant::now());
        assert!(maps.writes.is_empty(), "{:?}", maps.writes);
        assert_eq!(refusals(&again), refusals(&report));
    }

    #[test]
    fn failover_targets_count_against_max_backends_when_admitting() {
        // A service is admitted with ids for every configured backend, so failing over
        // later never needs an id that is not there.
        let (mut maps, mut r) = sized(16, 2, 64);
        let mut s1 = service("s1", &[("127.200.0.1:80", &["127.0.1.1:80"])]);
        s1.add_backends([sa("127.0.9.1:80")]);
        let want = Desired {
            services: vec![s1, service("s2", &[("127.200.0.2:80", &["127.0.2.1:80"])])],
        };
        let report = r.apply(&mut maps, &want, Instant::now());
        assert_eq!(refusals(&report), [("s2".into(), Limit::Backends, false)]);
        assert!(r.backend_id(&sa("127.0.9.1:80")).is_some());
        assert_accounting(&maps, &r);
    }

    #[test]
    fn tables_past_max_slots_are_refused() {
        let (mut maps, mut r) = sized(16, 16, 5);
        let four = [
            "127.0.2.1:80",
            "127.0.2.2:80",
            "127.0.2.3:80",
            "127.0.2.4:80",
        ];
        let want = desired(&[
            ("127.200.0.1:80", &["127.0.1.1:80", "127.0.1.2:80"]),
            ("127.200.0.2:80", &four),
            ("127.200.0.3:80", &["127.0.3.1:80"]),
        ]);
        let report = r.apply(&mut maps, &want, Instant::now());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            refusals(&report),
            [("127.200.0.2:80".into(), Limit::Slots, false)]
        );
        assert_eq!(maps.slots.len(), 3);
        assert_accounting(&maps, &r);
    }

    #[test]
    fn running_services_are_never_evicted_by_new_ones() {
        let (mut maps, mut r) = sized(2, 16, 64);
        let now = Instant::now();
        let a = ("127.200.0.1:80", &["127.0.1.1:80"][..]);
        let b = ("127.200.0.2:80", &["127.0.2.1:80"][..]);
        r.apply(&mut maps, &desired(&[a, b]), now);
        maps.writes.clear();
        // A new service listed first still comes after the running ones.
        let report = r.apply(
            &mut maps,
            &desired(&[("127.200.0.9:80", &["127.0.9.1:80"]), a, b]),
            now,
        );
        assert_eq!(
            refusals(&report),
            [("127.200.0.9:80".into(), Limit::Services, false)]
        );
        assert!(maps.writes.is_empty(), "{:?}", maps.writes);
        assert_eq!(maps.served(sa(a.0)), Some(vec![sa("127.0.1.1:80")]));
        assert_eq!(maps.served(sa(b.0)), Some(vec![sa("127.0.2.1:80")]));
    }

    #[test]
    fn growth_past_a_limit_keeps_the_previous_table_of_what_does_not_fit() {
        let (mut maps, mut r) = sized(16, 4, 64);
        let now = Instant::now();
        let before = Desired {
            services: vec![
                service(
                    "grows",
                    &[
                        ("127.200.0.1:80", &["127.0.1.1:80"]),
                        ("127.200.0.11:80", &["127.0.1.1:80", "127.0.1.2:80"]),
                    ],
                ),
                service("same", &[("127.200.0.2:80", &["127.0.2.1:80"])]),
            ],
        };
        r.apply(&mut maps, &before, now);
        assert_accounting(&maps, &r);
        // .1 grows by two new backends (one id is free); .11 changes within the ids it
        // has; a new VIP needs another id; a new service needs one too.
        let after = Desired {
            services: vec![
                service(
                    "grows",
                    &[
                        (
                            "127.200.0.1:80",
                            &["127.0.1.1:80", "127.0.1.3:80", "127.0.1.4:80"],
                        ),
                        ("127.200.0.11:80", &["127.0.1.2:80"]),
                        ("127.200.0.21:80", &["127.0.1.5:80"]),
                    ],
                ),
                service("same", &[("127.200.0.2:80", &["127.0.2.1:80"])]),
                service("new", &[("127.200.0.3:80", &["127.0.3.1:80"])]),
            ],
        };
        let report = r.apply(&mut maps, &after, now);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // The running service is tried first: its new VIP takes the free id, so the new
        // service finds none.
        assert_eq!(
            refusals(&report),
            [
                ("grows".into(), Limit::Backends, true),
                ("new".into(), Limit::Backends, false)
            ]
        );
        assert_eq!(report.refused[0].frontends, [sa("127.200.0.1:80")]);
        assert_eq!(
            maps.served(sa("127.200.0.1:80")),
            Some(vec![sa("127.0.1.1:80")]),
            "keeps its previous table"
        );
        assert_eq!(
            maps.served(sa("127.200.0.11:80")),
            Some(vec![sa("127.0.1.2:80")])
        );
        assert_eq!(
            maps.served(sa("127.200.0.21:80")),
            Some(vec![sa("127.0.1.5:80")])
        );
        assert_eq!(
            maps.served(sa("127.200.0.2:80")),
            Some(vec![sa("127.0.2.1:80")])
        );
        assert_accounting(&maps, &r);
    }

    /// Services `s0..n`, each with one frontend and the backends `backends[i]` configured,
    /// serving the table `tables[i]` (a subset of them, repeats allowed).
    fn tables_desired(backends: &[Vec<SocketAddr>], tables: &[Vec<SocketAddr>]) -> Desired {
        Desired {
            services: backends
                .iter()
                .zip(tables)
                .enumerate()
                .map(|(i, (configured, slots))| DesiredService {
                    name: format!("s{i}"),
                    tables: LiteMap::from_iter([(
                        sa(&format!("127.200.0.{}:80", i + 1)),
                        Table::plain(slots.clone()),
                    )]),
                    backends: configured
                        .iter()
                        .copied()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                })
                .collect(),
        }
    }

    proptest::proptest! {
        /// A run of changes confined to one service each (its table, and which backends
        /// it configures, out of a pool the services share) applied through the scoped
        /// path, with the release delay passing now and then, leaves the maps serving
        /// exactly what full applies of the same states leave, holding ids for the same
        /// backends.
        #[test]
        fn service_changes_through_the_scoped_path_serve_what_full_applies_serve(
            steps in proptest::collection::vec(
                (0..4usize, 1..64u8, proptest::collection::vec(0..6usize, 1..6), proptest::bool::ANY),
                1..32,
            ),
        ) {
            let pool: Vec<SocketAddr> = (1..=6).map(|b| sa(&format!("127.0.1.{b}:80"))).collect();
            let mut configured: Vec<Vec<SocketAddr>> = (0..4).map(|i| vec![pool[i]]).collect();
            let mut tables: Vec<Vec<SocketAddr>> = configured.clone();
            let (mut fast_maps, mut fast) = sized(16, 64, 256);
            let (mut full_maps, mut full) = sized(16, 64, 256);
            let mut now = Instant::now();
            let first = tables_desired(&configured, &tables);
            fast.apply(&mut fast_maps, &first, now);
            full.apply(&mut full_maps, &first, now);
            for (service, mask, picks, later) in steps {
                if later {
                    now += BACKEND_RELEASE_DELAY;
                }
                let was: BTreeSet<SocketAddr> = configured[service].iter().copied().collect();
                configured[service] = (0..6).filter(|b| mask & (1 << b) != 0).map(|b| pool[b]).collect();
                // The table picks among what the service configures.
                let choices = &configured[service];
                tables[service] = picks.iter().map(|&b| choices[b % choices.len()]).collect();
                let want = tables_desired(&configured, &tables);
                let dropped: Vec<SocketAddr> = was.into_iter().filter(|b| !configured[service].contains(b)).collect();
                let report = fast.apply_services(&mut fast_maps, &want, &[service], &dropped, now);
                proptest::prop_assert!(report.is_some(), "a one-service change took the full path");
                proptest::prop_assert!(report.unwrap().errors.is_empty());
                proptest::prop_assert!(fast.release_expired(&mut fast_maps, &want, now).is_ok());
                full.apply(&mut full_maps, &want, now);
                for (frontend, table) in want.tables() {
                    proptest::prop_assert_eq!(fast_maps.served(*frontend), Some(table.slots.to_vec()));
                    proptest::prop_assert_eq!(full_maps.served(*frontend), Some(table.slots.to_vec()));
                }
                let held = |r: &Reconciler| r.backend_ids().map(|(addr, _)| addr).collect::<BTreeSet<_>>();
                proptest::prop_assert_eq!(held(&fast), held(&full));
                proptest::prop_assert_eq!(fast.has_pending_releases(), full.has_pending_releases());
                assert_accounting(&fast_maps, &fast);
            }
        }
    }

    #[test]
    fn the_scoped_path_declines_what_needs_the_whole_picture() {
        let (mut maps, mut r) = sized(16, 2, 64);
        let now = Instant::now();
        let a = ("127.200.0.1:80", &["127.0.1.1:80", "127.0.1.2:80"][..]);
        let c = ("127.200.0.3:80", &["127.0.3.1:80"][..]);
        // A refusal waits for room: only a full apply may admit `c`.
        r.apply(&mut maps, &desired(&[a, c]), now);
        assert!(r.has_refusals());
        assert!(r
            .apply_services(&mut maps, &desired(&[a, c]), &[0], &[], now)
            .is_none());
        let (mut maps, mut r) = sized(16, 3, 64);
        r.apply(&mut maps, &desired(&[a]), now);
        // A frontend not in the maps, or more backends than there are ids for.
        assert!(r
            .apply_services(&mut maps, &desired(&[c]), &[0], &[], now)
            .is_none());
        let wide = ("127.200.0.1:80", &["127.0.9.1:80", "127.0.9.2:80"][..]);
        assert!(r
            .apply_services(&mut maps, &desired(&[wide]), &[0], &[], now)
            .is_none());
        assert_eq!(
            maps.served(sa(a.0)),
            Some(vec![sa("127.0.1.1:80"), sa("127.0.1.2:80")])
        );
        // What fits goes through, and only it is written: a table change, then an
        // endpoint moved to a backend that gets the last id.
        let one = ("127.200.0.1:80", &["127.0.1.2:80"][..]);
        let report = r
            .apply_services(&mut maps, &desired(&[one]), &[0], &[], now)
            .unwrap();
        assert_eq!(report.switched, 1);
        assert_eq!(maps.served(sa(a.0)), Some(vec![sa("127.0.1.2:80")]));
        let moved = ("127.200.0.1:80", &["127.0.9.1:80"][..]);
        let dropped = [sa("127.0.1.1:80"), sa("127.0.1.2:80")];
        let report = r
            .apply_services(&mut maps, &desired(&[moved]), &[0], &dropped, now)
            .unwrap();
        assert_eq!(report.switched, 1);
        assert_eq!(maps.served(sa(a.0)), Some(vec![sa("127.0.9.1:80")]));
        assert_eq!(r.backends_in_use(), 3);
        assert!(r.has_pending_releases());
        // The dropped backends keep their ids for the delay, then are released.
        let want = desired(&[moved]);
        assert_eq!(r.release_expired(&mut maps, &want, now).unwrap(), 0);
        let later = now + BACKEND_RELEASE_DELAY;
        assert_eq!(r.release_expired(&mut maps, &want, later).unwrap(), 2);
        assert_eq!(r.backends_in_use(), 1);
        assert!(!r.has_pending_releases());
        assert_accounting(&maps, &r);
    }

    #[test]
    fn a_refused_service_is_admitted_once_room_is_made() {
        let (mut maps, mut r) = sized(16, 2, 64);
        let t0 = Instant::now();
        let a = ("127.200.0.1:80", &["127.0.1.1:80", "127.0.1.2:80"][..]);
        let c = ("127.200.0.3:80", &["127.0.3.1:80"][..]);
        let report = r.apply(&mut maps, &desired(&[a, c]), t0);
        assert_eq!(refusals(&report), [(c.0.into(), Limit::Backends, false)]);
        // `a` goes; its ids are held for the release delay, so `c` waits for them.
        let report = r.apply(&mut maps, &desired(&[c]), t0);
        assert_eq!(refusals(&report), [(c.0.into(), Limit::Backends, false)]);
        assert!(r.has_pending_releases());
        let report = r.apply(&mut maps, &desired(&[c]), t0 + BACKEND_RELEASE_DELAY);
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        assert_eq!(maps.served(sa(c.0)), Some(vec![sa("127.0.3.1:80")]));
        assert_accounting(&maps, &r);
    }

    #[test]
    fn slots_a_table_no_longer_needs_are_freed_for_others() {
        let (mut maps, mut r) = sized(16, 16, 6);
        let now = Instant::now();
        let four = [
            "127.0.1.1:80",
            "127.0.1.2:80",
            "127.0.1.3:80",
            "127.0.1.4:80",
        ];
        let a = "127.200.0.1:80";
        let b = ("127.200.0.2:80", &four[..]);
        r.apply(&mut maps, &desired(&[(a, &four)]), now);
        // 4 slots in one generation, then 1 in the other: 5 entries.
        r.apply(&mut maps, &desired(&[(a, &four[..1])]), now);
        assert_eq!(r.slots_in_use(), 5);
        let report = r.apply(&mut maps, &desired(&[(a, &four[..1]), b]), now);
        assert_eq!(refusals(&report), [(b.0.into(), Limit::Slots, false)]);
        // Back to the first generation with one slot: its three others are deleted.
        let report = r.apply(&mut maps, &desired(&[(a, &four[1..2]), b]), now);
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        assert_eq!(r.slots_in_use(), 6);
        assert_eq!(maps.served(sa(a)), Some(vec![sa("127.0.1.2:80")]));
        assert_eq!(maps.served(sa(b.0)), Some(four.map(sa).to_vec()));
        assert_accounting(&maps, &r);
    }

    #[test]
    fn a_switch_past_max_slots_keeps_the_live_table() {
        let (mut maps, mut r) = sized(16, 16, 4);
        let now = Instant::now();
        let a = "127.200.0.1:80";
        r.apply(
            &mut maps,
            &desired(&[(a, &["127.0.1.1:80", "127.0.1.2:80"])]),
            now,
        );
        // Three more slots in the other generation: 5 > 4.
        let three = ["127.0.1.1:80", "127.0.1.2:80", "127.0.1.3:80"];
        let report = r.apply(&mut maps, &desired(&[(a, &three)]), now);
        assert_eq!(refusals(&report), [(a.into(), Limit::Slots, true)]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            maps.served(sa(a)),
            Some(vec![sa("127.0.1.1:80"), sa("127.0.1.2:80")])
        );
        // A change that fits in what the frontend holds is applied.
        let report = r.apply(&mut maps, &desired(&[(a, &three[1..])]), now);
        assert!(report.refused.is_empty(), "{:?}", report.refused);
        assert_eq!(
            maps.served(sa(a)),
            Some(three[1..].iter().map(|b| sa(b)).collect())
        );
        assert_accounting(&maps, &r);
    }

    #[test]
    fn maps_smaller_than_the_limits_fail_per_frontend_and_keep_what_serves() {
        // Injected: the kernel's maps are smaller than the reconciler was told (a pinned
        // map of another size). Writes fail, and nothing is left half-done.
        let mut maps = FakeMaps::sized(16, 16, 3);
        let mut r = Reconciler::new(16, 16).with_max_slots(100);
        let now = Instant::now();
        let a = ("127.200.0.1:80", &["127.0.1.1:80", "127.0.1.2:80"][..]);
        let b = ("127.200.0.2:80", &["127.0.2.1:80", "127.0.2.2:80"][..]);
        let report = r.apply(&mut maps, &desired(&[a, b]), now);
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        let error = report.errors[0].to_string();
        assert!(
            error.contains("127.200.0.2:80") && error.contains("os error 7"),
            "{error}"
        );
        assert_eq!(
            maps.served(sa(a.0)),
            Some(vec![sa("127.0.1.1:80"), sa("127.0.1.2:80")])
        );
        assert!(maps.served(sa(b.0)).is_none());
        assert_eq!(maps.slots.len(), 2, "the failed add left slots behind");
        // A switch that the map cannot take keeps the live table.
        let report = r.apply(
            &mut maps,
            &desired(&[(a.0, &["127.0.1.3:80", "127.0.1.4:80"])]),
            now,
        );
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        assert_eq!(
            maps.served(sa(a.0)),
            Some(vec![sa("127.0.1.1:80"), sa("127.0.1.2:80")])
        );
    }

    #[test]
    fn key_conversions_round_trip() {
        for s in ["127.200.0.1:80", "[fd00::1]:443", "[::ffff:10.0.0.1]:80"] {
            let a = sa(s);
            let expect = match a.ip() {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                    SocketAddr::new(IpAddr::V4(v6.to_ipv4_mapped().unwrap()), a.port())
                }
                _ => a,
            };
            assert_eq!(frontend_addr(&frontend_key(a)), Some(expect));
        }
        assert_eq!(
            backend_addr(&backend_value(sa("10.1.2.3:8080"))),
            Some(sa("10.1.2.3:8080"))
        );
        assert_eq!(
            backend_addr(&backend_value(sa("[fd00::5]:8080"))),
            Some(sa("[fd00::5]:8080"))
        );
        // The kernel's view of 127.0.0.1:80: bytes in network order.
        let key = frontend_key(sa("127.0.0.1:80"));
        assert_eq!(key.addr[3].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
    }

    #[test]
    fn serves_what_is_desired_and_is_idempotent() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 16);
        let now = Instant::now();
        let want = desired(&[("127.200.0.1:80", &["127.0.1.1:8080", "127.0.1.2:8080"])]);
        let report = r.apply(&mut maps, &want, now);
        assert!(report.errors.is_empty());
        assert_eq!(report.added, 1);
        assert_eq!(
            maps.served(sa("127.200.0.1:80")),
            Some(want.table(&sa("127.200.0.1:80")).unwrap().slots.to_vec())
        );

        maps.writes.clear();
        let report = r.apply(&mut maps, &want, now);
        assert_eq!((report.added, report.switched, report.removed), (0, 0, 0));
        assert!(
            maps.writes.is_empty(),
            "second apply wrote {:?}",
            maps.writes
        );
    }

    #[test]
    fn switch_writes_slots_before_the_entry_and_uses_the_other_generation() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 16);
        let now = Instant::now();
        r.apply(
            &mut maps,
            &desired(&[("127.200.0.1:80", &["127.0.1.1:8080"])]),
            now,
        );
        let old = maps.services[&frontend_key(sa("127.200.0.1:80"))];
        maps.writes.clear();
        let want = desired(&[("127.200.0.1:80", &["127.0.2.1:8080", "127.0.2.2:8080"])]);
        let report = r.apply(&mut maps, &want, now);
        assert_eq!(report.switched, 1);
        let new = maps.services[&frontend_key(sa("127.200.0.1:80"))];
        assert_eq!(new.generation, 1 - old.generation);
        assert_eq!(new.service_id, old.service_id);
        // Backends, then slots, then the one switching write last.
        assert_eq!(
            maps.writes.last().unwrap(),
            &format!("service {}", new.service_id)
        );
        let first_slot = maps
            .writes
            .iter()
            .position(|w| w.starts_with("slot"))
            .unwrap();
        let last_backend = maps
            .writes
            .iter()
            .rposition(|w| w.starts_with("backend"))
            .unwrap();
        assert!(last_backend < first_slot);
        assert_eq!(
            maps.served(sa("127.200.0.1:80")),
            Some(want.table(&sa("127.200.0.1:80")).unwrap().slots.to_vec())
        );
    }

    #[test]
    fn old_generation_stays_readable_after_a_switch() {
        // A connect that read the entry just before the switch must still find its slot
        // and backend: nothing of the old table is deleted by the switch.
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 16);
        let now = Instant::now();
        r.apply(
            &mut maps,
            &desired(&[("127.200.0.1:80", &["127.0.1.1:8080", "127.0.1.2:8080"])]),
            now,
        );
        let old = maps.services[&frontend_key(sa("127.200.0.1:80"))];
        r.apply(
            &mut maps,
            &desired(&[("127.200.0.1:80", &["127.0.2.1:8080"])]),
            now,
        );
        for i in 0..old.slot_count {
            let id = maps.slots[&(
                old.service_id,
                SlotKey::new(old.service_id, old.generation, i).slot,
            )];
            assert!(
                maps.backends.contains_key(&id),
                "backend {id} of the old table is gone"
            );
        }
    }

    #[test]
    fn unreferenced_backends_are_released_after_the_delay() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 16);
        let t0 = Instant::now();
        r.apply(
            &mut maps,
            &desired(&[("127.200.0.1:80", &["127.0.1.1:8080"])]),
            t0,
        );
        let old_id = r.backend_id(&sa("127.0.1.1:8080")).unwrap();
        let want = desired(&[("127.200.0.1:80", &["127.0.2.1:8080"])]);
        r.apply(&mut maps, &want, t0);
        assert!(maps.backends.contains_key(&old_id));
        assert!(r.has_pending_releases());
        r.apply(&mut maps, &want, t0 + BACKEND_RELEASE_DELAY);
        assert!(!maps.backends.contains_key(&old_id));
        assert!(!r.has_pending_releases());
        // The released id is not handed out again straight away.
        r.apply(
            &mut maps,
            &desired(&[("127.200.0.1:80", &["127.0.3.1:8080"])]),
            t0 + BACKEND_RELEASE_DELAY,
        );
        assert_ne!(r.backend_id(&sa("127.0.3.1:8080")), Some(old_id));
    }

    #[test]
    fn a_configured_backend_keeps_its_id_while_out_of_every_table() {
        // A failover target or an ejected backend is still configured: its id, and so
        // the kernel's counters for it, must survive any time out of the table.
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 16);
        let t0 = Instant::now();
        let mut want = desired(&[("127.200.0.1:80", &["127.0.1.1:8080"])]);
        want.services[0].add_backends([sa("127.0.2.1:8080")]);
        r.apply(&mut maps, &want, t0);
        let standby = r
            .backend_id(&sa("127.0.2.1:8080"))
            .expect("configured backend has an id");
        assert!(
            maps.backends.contains_key(&standby),
            "written before any table needs it"
        );
        r.apply(&mut maps, &want, t0 + 10 * BACKEND_RELEASE_DELAY);
        assert_eq!(r.backend_id(&sa("127.0.2.1:8080")), Some(standby));
        assert!(!r.has_pending_releases());
    }

    #[test]
    fn removed_frontends_disappear_with_their_slots() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 16);
        let now = Instant::now();
        r.apply(
            &mut maps,
            &desired(&[
                ("127.200.0.1:80", &["127.0.1.1:8080"]),
                ("127.200.0.2:80", &["127.0.1.1:8080"]),
            ]),
            now,
        );
        r.apply(
            &mut maps,
            &desired(&[("127.200.0.1:80", &["127.0.2.1:8080"])]),
            now,
        );
        let report = r.apply(
            &mut maps,
            &desired(&[("127.200.0.2:80", &["127.0.1.1:8080"])]),
            now,
        );
        assert_eq!(report.removed, 1);
        assert!(maps.served(sa("127.200.0.1:80")).is_none());
        assert_eq!(maps.services.len(), 1);
        let remaining = maps.services.values().next().unwrap().service_id;
        assert!(maps.slots.keys().all(|(sid, _)| *sid == remaining));
    }

    #[test]
    fn a_failed_switch_keeps_the_old_table_and_other_frontends_apply() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 16);
        let now = Instant::now();
        let a = "127.200.0.1:80";
        let b = "127.200.0.2:80";
        r.apply(
            &mut maps,
            &desired(&[(a, &["127.0.1.1:8080"]), (b, &["127.0.1.1:8080"])]),
            now,
        );
        maps.fail_service_writes_for = Some(frontend_key(sa(a)));
        let report = r.apply(
            &mut maps,
            &desired(&[(a, &["127.0.2.1:8080"]), (b, &["127.0.2.1:8080"])]),
            now,
        );
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].to_string().contains("127.200.0.1:80"));
        assert_eq!(maps.served(sa(a)), Some(vec![sa("127.0.1.1:8080")]));
        assert_eq!(maps.served(sa(b)), Some(vec![sa("127.0.2.1:8080")]));
        // Once the map accepts writes again, the next apply converges.
        maps.fail_service_writes_for = None;
        r.apply(
            &mut maps,
            &desired(&[(a, &["127.0.2.1:8080"]), (b, &["127.0.2.1:8080"])]),
            now,
        );
        assert_eq!(maps.served(sa(a)), Some(vec![sa("127.0.2.1:8080")]));
    }

    #[test]
    fn a_failed_add_leaves_no_slots_and_no_id_behind() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 16);
        let now = Instant::now();
        let a = "127.200.0.1:80";
        maps.fail_service_writes_for = Some(frontend_key(sa(a)));
        let report = r.apply(&mut maps, &desired(&[(a, &["127.0.1.1:8080"])]), now);
        assert_eq!(report.errors.len(), 1);
        assert!(maps.slots.is_empty(), "orphan slots: {:?}", maps.slots);
        maps.fail_service_writes_for = None;
        let report = r.apply(&mut maps, &desired(&[(a, &["127.0.1.1:8080"])]), now);
        assert_eq!(report.added, 1);
        assert_eq!(maps.served(sa(a)), Some(vec![sa("127.0.1.1:8080")]));
        assert_eq!(
            maps.services[&frontend_key(sa(a))].service_id,
            1,
            "id 0 was freed, next id is used"
        );
    }

    #[test]
    fn restore_continues_where_the_previous_agent_left_off() {
        let mut maps = FakeMaps::default();
        let now = Instant::now();
        let want = desired(&[
            ("127.200.0.1:80", &["127.0.1.1:8080", "127.0.1.2:8080"]),
            ("[fd00::1]:80", &["[fd00::2]:8080"]),
        ]);
        {
            let mut first = Reconciler::new(16, 16);
            first.apply(&mut maps, &want, now);
            first.apply(
                &mut maps,
                &desired(&[
                    ("127.200.0.1:80", &["127.0.1.2:8080"]),
                    ("[fd00::1]:80", &["[fd00::2]:8080"]),
                ]),
                now,
            );
            first.apply(&mut maps, &want, now);
        }
        let mut second = Reconciler::restore(&maps, 16, 16).unwrap();
        maps.writes.clear();
        let report = second.apply(&mut maps, &want, now);
        assert!(report.errors.is_empty());
        assert!(
            maps.writes.is_empty(),
            "restored agent rewrote {:?}",
            maps.writes
        );
        // A change after restore goes to the non-live generation of the same id.
        let before = maps.services[&frontend_key(sa("127.200.0.1:80"))];
        second.apply(
            &mut maps,
            &desired(&[
                ("127.200.0.1:80", &["127.0.1.1:8080"]),
                ("[fd00::1]:80", &["[fd00::2]:8080"]),
            ]),
            now,
        );
        let after = maps.services[&frontend_key(sa("127.200.0.1:80"))];
        assert_eq!(after.service_id, before.service_id);
        assert_eq!(after.generation, 1 - before.generation);
        assert_eq!(
            maps.served(sa("127.200.0.1:80")),
            Some(vec![sa("127.0.1.1:8080")])
        );
    }

    #[test]
    fn bad_tables_are_rejected_per_frontend() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 16);
        let report = r.apply(
            &mut maps,
            &desired(&[
                ("127.200.0.1:80", &["[fd00::2]:80"]),
                ("127.200.0.2:80", &["127.0.0.2:80"]),
            ]),
            Instant::now(),
        );
        assert_eq!(report.errors.len(), 1);
        assert!(matches!(
            report.errors[0],
            ReconcileError::FamilyMismatch { .. }
        ));
        assert_eq!(report.added, 1);
    }

    #[test]
    fn running_out_of_backend_ids_is_an_error_not_a_wrap() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(16, 2);
        let report = r.apply(
            &mut maps,
            &desired(&[(
                "127.200.0.1:80",
                &["127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:1"],
            )]),
            Instant::now(),
        );
        // Refused before anything is written, with the limit named.
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            refusals(&report),
            [("127.200.0.1:80".into(), Limit::Backends, false)]
        );
        assert!(maps.services.is_empty());
        assert!(maps.backends.is_empty());
    }

    fn entry(
        service_id: u32,
        generation: u32,
        slot_count: u32,
        standby_count: u32,
    ) -> ServiceEntry {
        ServiceEntry {
            service_id,
            generation,
            slot_count,
            standby_count,
            fail_threshold: 0,
            suspect_ms: 0,
            handshake_timeout_ms: 0,
            flags: 0,
        }
    }

    #[test]
    fn restore_adopts_only_entries_that_fit_and_apply_replaces_or_deletes_the_rest() {
        let mut maps = FakeMaps::default();
        let good = sa("127.200.0.1:80");
        maps.services.insert(frontend_key(good), entry(3, 1, 1, 0));
        maps.slots.insert((3, SlotKey::new(3, 1, 0).slot), 0);
        maps.backends.insert(0, backend_value(sa("127.0.1.1:8080")));
        let bad = [
            (
                "127.200.0.2:80",
                entry(4, 0, u32::MAX, 1),
                "exceed the limit",
            ),
            (
                "127.200.0.3:80",
                entry(5, 0, MAX_SLOTS + 1, 0),
                "exceed the limit",
            ),
            ("127.200.0.4:80", entry(6, 7, 1, 0), "generation 7"),
            ("127.200.0.5:80", entry(7, 0, 1, 0), "backend id 1000000"),
            ("127.200.0.6:80", entry(3, 0, 1, 0), "service id 3"),
            ("127.200.0.7:80", entry(u32::MAX, 0, 0, 0), "padding"),
        ];
        for (frontend, e, _) in &bad {
            let mut key = frontend_key(sa(frontend));
            if e.service_id == u32::MAX {
                key.pad = 1;
            }
            maps.services.insert(key, *e);
        }
        maps.slots.insert((7, 0), 1_000_000);

        let started = Instant::now();
        let mut r = Reconciler::restore(&maps, 16, 16).unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(r.live_table(&good), Some(&[0][..]));
        assert_eq!(r.backend_id(&sa("127.0.1.1:8080")), Some(0));
        let rejected: BTreeSet<SocketAddr> = r.untrusted.iter().map(|u| u.frontend).collect();
        let expected: BTreeSet<SocketAddr> = bad.iter().map(|(f, ..)| sa(f)).collect();
        assert_eq!(rejected, expected);
        for (frontend, ..) in &bad {
            assert_eq!(r.live_table(&sa(frontend)), None, "{frontend} adopted");
        }

        // One rejected frontend is still desired: it gets a fresh id and a new entry,
        // never the service id an untrusted entry still holds; the rest are deleted.
        let want = desired(&[
            ("127.200.0.1:80", &["127.0.1.1:8080"]),
            ("127.200.0.4:80", &["127.0.1.2:8080"]),
        ]);
        maps.writes.clear();
        let report = r.apply(&mut maps, &want, Instant::now());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(maps.served(good), Some(vec![sa("127.0.1.1:8080")]));
        assert_eq!(
            maps.served(sa("127.200.0.4:80")),
            Some(vec![sa("127.0.1.2:8080")])
        );
        let replaced = maps.services[&frontend_key(sa("127.200.0.4:80"))].service_id;
        // Neither the adopted frontend's id nor the id its own untrusted entry held.
        assert!(![3, 6].contains(&replaced), "{replaced}");
        let keys: BTreeSet<FrontendKey> = maps.services.keys().copied().collect();
        let wanted: BTreeSet<FrontendKey> = want.tables().map(|(f, _)| frontend_key(*f)).collect();
        assert_eq!(keys, wanted);
        assert!(r.untrusted.is_empty());
        // The adopted table was not rewritten.
        assert!(
            !maps.writes.contains(&"service 3".to_string()),
            "{:?}",
            maps.writes
        );
    }

    mod restore_properties {
        use super::*;
        use proptest::prelude::*;

        const FRONTENDS: [&str; 4] = [
            "127.200.0.1:80",
            "127.200.0.2:80",
            "127.200.0.3:80",
            "[fd00::1]:80",
        ];
        const BACKENDS: [&str; 4] = [
            "127.0.1.1:8080",
            "127.0.1.2:8080",
            "127.0.1.3:8080",
            "[fd00::2]:8080",
        ];

        fn counts() -> impl Strategy<Value = u32> {
            prop_oneof![
                0..4u32,
                Just(MAX_SLOTS),
                Just(MAX_SLOTS - 1),
                Just(u32::MAX)
            ]
        }

        prop_compose! {
            fn arb_entry()(
                service_id in prop_oneof![0..4u32, Just(u32::MAX)],
                generation in prop_oneof![0..2u32, Just(2u32), Just(u32::MAX)],
                slot_count in counts(),
                standby_count in counts(),
            ) -> ServiceEntry {
                entry(service_id, generation, slot_count, standby_count)
            }
        }

        prop_compose! {
            fn arb_maps()(
                services in proptest::collection::vec(
                    (0..FRONTENDS.len(), prop_oneof![4 => Just(0u8), 1 => Just(1u8)],
                     prop_oneof![4 => Just(IPPROTO_TCP), 1 => Just(17u8)], arb_entry()),
                    0..6,
                ),
                slots in proptest::collection::vec(
                    (prop_oneof![0..4u32, Just(u32::MAX)],
                     prop_oneof![0..4u32, MAX_SLOTS..MAX_SLOTS + 4, Just(u32::MAX)],
                     prop_oneof![0..20u32, Just(u32::MAX)]),
                    0..24,
                ),
                backends in proptest::collection::vec(
                    (0..20u32, 0..BACKENDS.len(), prop_oneof![4 => Just(true), 1 => Just(false)]),
                    0..12,
                ),
            ) -> FakeMaps {
                let mut maps = FakeMaps::default();
                for (f, pad, proto, e) in services {
                    let mut key = frontend_key(sa(FRONTENDS[f]));
                    key.pad = pad;
                    key.proto = proto;
                    maps.services.insert(key, e);
                }
                for (sid, slot, id) in slots {
                    maps.slots.insert((sid, slot), id);
                }
                for (id, b, valid) in backends {
                    let mut value = backend_value(sa(BACKENDS[b]));
                    if !valid {
                        value.family = 99;
                    }
                    maps.backends.insert(id, value);
                }
                maps
            }
        }

        prop_compose! {
            fn arb_desired()(
                tables in proptest::collection::btree_map(
                    0..3usize,
                    proptest::collection::vec(0..3usize, 1..4),
                    0..4,
                ),
            ) -> Desired {
                // IPv4 frontends and backends only, so every table is valid.
                let tables: LiteMap<SocketAddr, Table> = tables
                    .into_iter()
                    .map(|(f, bs)| {
                        (sa(FRONTENDS[f]), Table::plain(bs.into_iter().map(|b| sa(BACKENDS[b])).collect::<Vec<_>>()))
                    })
                    .collect();
                let mut service = DesiredService {
                    name: "any".into(),
                    ..DesiredService::default()
                };
                service.add_backends(tables.values().flat_map(|t| t.slots.iter().copied()));
                service.tables = tables;
                Desired { services: vec![service] }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// Whatever the maps hold, restore does not panic, and the first apply makes
            /// them serve exactly what is desired.
            #[test]
            fn any_pinned_state_converges_to_what_is_desired(
                mut maps in arb_maps(),
                want in arb_desired(),
            ) {
                let mut r = Reconciler::restore(&maps, 16, 16).unwrap();
                let report = r.apply(&mut maps, &want, Instant::now());
                prop_assert!(report.errors.is_empty(), "{:?}", report.errors);
                for (frontend, table) in want.tables() {
                    prop_assert_eq!(maps.served(*frontend), Some(table.slots.to_vec()));
                }
                let keys: BTreeSet<FrontendKey> = maps
                    .services
                    .keys()
                    .filter(|k| k.proto == IPPROTO_TCP)
                    .copied()
                    .collect();
                let wanted: BTreeSet<FrontendKey> =
                    want.tables().map(|(f, _)| frontend_key(*f)).collect();
                prop_assert_eq!(keys, wanted);
            }
        }
    }
}
