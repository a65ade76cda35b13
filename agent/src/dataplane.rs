//! The only module that touches aya: loads detour's eBPF object, attaches its programs
//! to a cgroup, pins maps and links, and implements [`Maps`] over the real maps.
//!
//! Pin layout under the bpffs directory (default `/sys/fs/bpf/detour`):
//! `maps/<MAP_NAME>` and `links/<program name>`.
//!
//! Invariants:
//! - The programs stay attached while their link pins exist, whether or not an agent runs:
//!   an agent that exits or is killed never detaches them. Deleting the pin directory
//!   (`detour` leaves that to the operator) detaches them.
//! - On start the agent reuses pinned maps (the kernel state it finds is what it serves
//!   from) and adopts pinned links whose program is identical to the one it loaded. A
//!   pinned link running a different program (an upgrade) is replaced without a gap: the
//!   new program is attached alongside, its link pin is renamed over the old one, and the
//!   old link detaches when its last reference goes. Both programs read the same maps and
//!   a connect already rewritten by one is no VIP for the other.
//! - A pinned link is adopted only if its program also uses this agent's pinned maps: a
//!   map migrated to another layout ([`map_upgrade`]) replaces every program using the old
//!   one, the same way.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues, RingBuf};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{loaded_programs, CgroupSockAddr, ProgramError, RawTracePoint, SockOps};
use aya::{Ebpf, EbpfLoader};
use detour_ebpf::{
    counters, globals, maps, programs, Backend, BackendState, BackendStats, FrontendKey,
    ServiceEntry, SlotKey, SockOrigin,
};
use tracing::info;

use crate::reconcile::{MapOpError, Maps};

pub mod features;
mod map_upgrade;
pub mod steer;

/// The compiled eBPF object, built by `build.rs` (aya-build) for bpfel-unknown-none.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detour"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("this kernel cannot run detour: {0}")]
    Kernel(String),
    #[error("{0}")]
    Memlock(String),
    #[error("no cgroup v2 mount found in /proc/mounts; pass --cgroup")]
    NoCgroup2,
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {program}: link pin {path}: {reason}")]
    Link {
        program: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("parsing the eBPF object: {0}")]
    Object(#[from] Box<aya_obj::ParseError>),
    #[error("pinned map {map} has layout {pinned}, this agent declares {declared}: its key or value type changed, which cannot be migrated; the running programs keep serving (delete the pin directory to start afresh, with a gap)")]
    MapLayout {
        map: &'static str,
        pinned: String,
        declared: String,
    },
}

/// Where and how to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_slots: u32,
    pub max_sockets: u32,
    /// Steered flows the translation tables hold.
    pub max_steered: u32,
    pub steer: steer::SteerOptions,
}

/// What happened to each program at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOutcome {
    Attached,
    Adopted,
    Replaced,
}

/// The loaded maps; programs live on through their pinned links.
pub struct Dataplane {
    services: BpfHashMap<MapData, FrontendKey, ServiceEntry>,
    slots: BpfHashMap<MapData, SlotKey, u32>,
    backends: Array<MapData, Backend>,
    stats: PerCpuArray<MapData, BackendStats>,
    state: Array<MapData, BackendState>,
    counters: PerCpuArray<MapData, u64>,
    /// Taken by the event reader ([`Dataplane::take_events`]).
    events: Option<RingBuf<MapData>>,
    pub links: Vec<(&'static str, LinkOutcome)>,
    /// SYN steering; `None` when it could not start (off, with a warning).
    pub steering: Option<steer::Steering>,
    pub pin_dir: PathBuf,
    /// What the kernel offered at load ([`features::probe`]).
    pub kernel: features::Features,
}

/// The first cgroup v2 mount point listed in `/proc/mounts`.
pub fn find_cgroup2_mount() -> Result<PathBuf, DataplaneError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|source| DataplaneError::Cgroup {
        path: "/proc/mounts".into(),
        source,
    })?;
    mounts
        .lines()
        .find_map(|line| {
            let mut f = line.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or(DataplaneError::NoCgroup2)
}

/// Mounts bpffs at `/sys/fs/bpf` if the pin directory is not already on a bpffs.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    let err = |source| DataplaneError::Bpffs {
        path: pin_dir.to_owned(),
        source,
    };
    let mounts = fs::read_to_string("/proc/mounts").map_err(err)?;
    let on_bpffs = mounts.lines().any(|line| {
        let mut f = line.split_whitespace();
        matches!((f.next(), f.next(), f.next()), (Some(_), Some(dir), Some("bpf")) if pin_dir.starts_with(dir))
    });
    if on_bpffs {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        return Err(err(io::Error::other(
            "not on a bpffs; mount one there or use a directory under /sys/fs/bpf",
        )));
    }
    fs::create_dir_all(root).map_err(err)?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    info!(path = "/sys/fs/bpf", "mounted bpffs");
    Ok(())
}

/// Programs in attach order (see [`programs::ALL`]).
const PROGRAMS: [&str; 6] = programs::ALL;

const MAP_NAMES: [&str; 12] = [
    maps::SERVICES,
    maps::SLOTS,
    maps::BACKENDS,
    maps::BACKEND_STATS,
    maps::SOCK_ORIGIN,
    maps::BACKEND_STATE,
    maps::EVENTS,
    maps::COUNTERS,
    maps::RESET_SEEN,
    maps::STEER,
    maps::STEER_BACK,
    maps::STEER_CONTROL,
];

/// The kernel's HZ, from the resolution of the coarse clock, which ticks once per
/// jiffy. `None` if it cannot be read or makes no sense.
pub fn kernel_hz() -> Option<u32> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `res` is a valid timespec to write to.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) };
    if rc != 0 || res.tv_sec != 0 || res.tv_nsec <= 0 {
        return None;
    }
    let hz = 1_000_000_000 / res.tv_nsec as u64;
    (10..=10_000).contains(&hz).then_some(hz as u32)
}

impl Dataplane {
    /// Loads the object (reusing pinned maps), attaches or adopts the programs.
    pub fn load(opts: &LoadOptions) -> Result<Self, DataplaneError> {
        let kernel = features::probe();
        let verdict = features::verdict(&kernel);
        for warning in &verdict.warnings {
            tracing::warn!("{warning}");
        }
        if !verdict.refusals.is_empty() {
            return Err(DataplaneError::Kernel(verdict.to_string()));
        }
        features::raise_memlock(kernel.version).map_err(DataplaneError::Memlock)?;
        info!(
            kernel = %kernel.version_string(),
            probed = kernel.pieces.len(),
            off = verdict.warnings.len(),
            "the kernel offers every piece detour needs; optional pieces it lacks are off or fall back"
        );
        ensure_bpffs(&opts.pin_dir)?;
        let maps_dir = opts.pin_dir.join("maps");
        let links_dir = opts.pin_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(|source| DataplaneError::Bpffs {
                path: dir.clone(),
                source,
            })?;
        }
        let cgroup = fs::File::open(&opts.cgroup).map_err(|source| DataplaneError::Cgroup {
            path: opts.cgroup.clone(),
            source,
        })?;

        let hz = kernel_hz().unwrap_or_else(|| {
            tracing::warn!("cannot tell the kernel's HZ; SYN timeouts of rewritten connects stay at the kernel's default");
            0
        });
        let mut loader = EbpfLoader::new();
        loader.override_global(globals::HZ, &hz, true);
        let max_entries = std::collections::HashMap::from([
            (maps::SERVICES, opts.max_services),
            (maps::SLOTS, opts.max_slots),
            (maps::BACKENDS, opts.max_backends),
            (maps::BACKEND_STATS, opts.max_backends),
            (maps::BACKEND_STATE, opts.max_backends),
            (maps::SOCK_ORIGIN, opts.max_sockets),
            (maps::STEER, opts.max_steered),
            (maps::STEER_BACK, opts.max_steered),
        ]);
        let declared = map_upgrade::declared(EBPF_OBJECT, &MAP_NAMES, &max_entries)?;
        let migration = map_upgrade::Plan::new(&maps_dir, &declared)?;
        for name in MAP_NAMES {
            loader.map_pin_path(name, migration.pin_path(&maps_dir, name));
        }
        for (&name, &size) in &max_entries {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // Migrated maps are complete and pinned before any program of ours runs.
        migration.migrate(&mut ebpf)?;
        let our_maps = map_ids(&ebpf)?;

        let mut links = Vec::new();
        for name in PROGRAMS {
            let outcome =
                attach_program(&mut ebpf, name, &cgroup, &links_dir.join(name), &our_maps)?;
            info!(program = name, outcome = ?outcome, cgroup = %opts.cgroup.display(), "program ready");
            links.push((name, outcome));
        }

        let tcx = features::tcx_available(&kernel);
        let steering = match steer::Steering::start(&mut ebpf, &opts.steer, &links_dir, tcx) {
            Ok(steering) => Some(steering),
            Err(reason) => {
                tracing::warn!(
                    "SYN steering is off: {reason}; a stalled handshake fails as before"
                );
                None
            }
        };
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name))
        };
        let map_err = |map| move |source| DataplaneError::Map { map, source };
        Ok(Self {
            services: BpfHashMap::try_from(take(&mut ebpf, maps::SERVICES)?)
                .map_err(map_err(maps::SERVICES))?,
            slots: BpfHashMap::try_from(take(&mut ebpf, maps::SLOTS)?)
                .map_err(map_err(maps::SLOTS))?,
            backends: Array::try_from(take(&mut ebpf, maps::BACKENDS)?)
                .map_err(map_err(maps::BACKENDS))?,
            stats: PerCpuArray::try_from(take(&mut ebpf, maps::BACKEND_STATS)?)
                .map_err(map_err(maps::BACKEND_STATS))?,
            state: Array::try_from(take(&mut ebpf, maps::BACKEND_STATE)?)
                .map_err(map_err(maps::BACKEND_STATE))?,
            counters: PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS)?)
                .map_err(map_err(maps::COUNTERS))?,
            events: Some(
                RingBuf::try_from(take(&mut ebpf, maps::EVENTS)?).map_err(map_err(maps::EVENTS))?,
            ),
            links,
            steering,
            pin_dir: opts.pin_dir.clone(),
            kernel,
        })
    }

    /// Kernel counters of a backend id, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats, MapOpError> {
        let per_cpu = self
            .stats
            .get(&id, 0)
            .map_err(|e| op_err(maps::BACKEND_STATS, "lookup", e))?;
        Ok(per_cpu
            .iter()
            .fold(BackendStats::default(), |acc, s| BackendStats {
                connects: acc.connects + s.connects,
                established: acc.established + s.established,
                refused: acc.refused + s.refused,
                timeouts: acc.timeouts + s.timeouts,
                resets: acc.resets + s.resets,
                aborts: acc.aborts + s.aborts,
            }))
    }

    /// The kernel's passive view of a backend id.
    pub fn backend_state(&self, id: u32) -> Result<BackendState, MapOpError> {
        self.state
            .get(&id, 0)
            .map_err(|e| op_err(maps::BACKEND_STATE, "lookup", e))
    }

    /// Lifts the kernel's suspect mark and failure run of a backend: the agent decided
    /// it is not (or no longer) ejected. The measured RTT is kept.
    pub fn clear_suspect(&mut self, id: u32) -> Result<(), MapOpError> {
        let mut state = self.backend_state(id)?;
        if state.suspect_until_ns == 0 && state.soft_until_ns == 0 && state.fail_streak == 0 {
            return Ok(());
        }
        state.suspect_until_ns = 0;
        state.soft_until_ns = 0;
        state.fail_streak = 0;
        self.state
            .set(id, state, 0)
            .map_err(|e| op_err(maps::BACKEND_STATE, "update", e))
    }

    /// The global counters ([`counters`]), summed over CPUs.
    pub fn counters(&self) -> Result<[u64; counters::COUNT as usize], MapOpError> {
        let mut out = [0; counters::COUNT as usize];
        for (index, slot) in out.iter_mut().enumerate() {
            *slot = self
                .counters
                .get(&(index as u32), 0)
                .map_err(|e| op_err(maps::COUNTERS, "lookup", e))?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// A second handle on the map of rewritten sockets, for a blocking task that asks
    /// "did detour rewrite this socket, and where to?" by cookie.
    pub fn origins(&self) -> Result<SockOrigins, MapOpError> {
        let path = self.pin_dir.join("maps").join(maps::SOCK_ORIGIN);
        let data =
            MapData::from_pin(&path).map_err(|e| op_err(maps::SOCK_ORIGIN, "open pin", e))?;
        let map = BpfHashMap::try_from(aya::maps::Map::LruHashMap(data))
            .map_err(|e| op_err(maps::SOCK_ORIGIN, "open", e))?;
        Ok(SockOrigins { map })
    }

    /// The ring buffer of connection events; `None` after the first call.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}

/// Kernel ids of the loaded object's pinned maps (`DETOUR_*`).
fn map_ids(ebpf: &Ebpf) -> Result<std::collections::HashSet<u32>, DataplaneError> {
    MAP_NAMES
        .iter()
        .map(|&map| {
            let data: &MapData = match ebpf.map(map).ok_or(DataplaneError::MissingMap(map))? {
                aya::maps::Map::HashMap(d)
                | aya::maps::Map::LruHashMap(d)
                | aya::maps::Map::Array(d)
                | aya::maps::Map::PerCpuArray(d)
                | aya::maps::Map::RingBuf(d) => d,
                _ => return Err(DataplaneError::MissingMap(map)),
            };
            Ok(data
                .info()
                .map_err(|source| DataplaneError::Map { map, source })?
                .id())
        })
        .collect()
}

/// Whether a loaded program uses only `our_maps` among detour's pinned maps (kernel map
/// names are the first 15 bytes of `DETOUR_*`; the object's own data sections are not).
fn uses_our_maps(
    program: &aya::programs::ProgramInfo,
    our_maps: &std::collections::HashSet<u32>,
) -> bool {
    let Ok(Some(ids)) = program.map_ids() else {
        // Unknown (a kernel before 4.15): trust the tag, as before.
        return true;
    };
    ids.iter().all(|id| {
        our_maps.contains(id)
            || aya::maps::MapInfo::from_id(*id)
                .is_ok_and(|m| m.name_as_str().is_some_and(|n| !n.starts_with("DETOUR_")))
    })
}

/// Attaches `name` to the cgroup, or adopts/replaces the link pinned at `pin`.
fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    pin: &Path,
    our_maps: &std::collections::HashSet<u32>,
) -> Result<LinkOutcome, DataplaneError> {
    let perr = |source| DataplaneError::Program {
        program: name,
        source,
    };
    let link_err = |reason: String| DataplaneError::Link {
        program: name,
        path: pin.to_owned(),
        reason,
    };
    let mut program = Attachable::find(ebpf, name)
        .ok_or_else(|| link_err("program missing from the eBPF object".into()))?
        .map_err(perr)?;
    let new_tag = program.load().map_err(perr)?;

    let existing = if pin.exists() {
        let pinned = PinnedLink::from_pin(pin).map_err(|e| link_err(e.to_string()))?;
        let link = FdLink::from(pinned);
        let prog_id = link
            .info()
            .map_err(|e| link_err(e.to_string()))?
            .program_id();
        let old = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == prog_id);
        let old_tag = old.as_ref().map(|p| p.tag());
        let same_maps = old.as_ref().is_some_and(|p| uses_our_maps(p, our_maps));
        if old_tag == Some(new_tag) && same_maps {
            // Same program already serving from the same pinned maps: keep it.
            return Ok(LinkOutcome::Adopted);
        }
        info!(
            program = name,
            old_tag = %old_tag.map_or_else(|| "none".to_string(), |t| format!("{t:016x}")),
            new_tag = %format!("{new_tag:016x}"),
            same_maps,
            "pinned link runs another program or other maps; replacing"
        );
        Some(link)
    } else {
        None
    };

    let link = program.attach(cgroup).map_err(perr)?.map_err(link_err)?;
    if existing.is_none() {
        link.pin(pin).map_err(|e| link_err(e.to_string()))?;
        return Ok(LinkOutcome::Attached);
    }
    // Pin beside the old link, then rename over it: the pin path always names a live
    // link, and the old one detaches when `existing` (its last fd) is dropped.
    // bpffs refuses names with a dot (EPERM): no `.new`.
    let staging = staging_pin(pin);
    let _ = fs::remove_file(&staging);
    link.pin(&staging).map_err(|e| link_err(e.to_string()))?;
    fs::rename(&staging, pin).map_err(|e| link_err(e.to_string()))?;
    drop(existing);
    Ok(LinkOutcome::Replaced)
}

/// Where a pin's replacement is made before it is renamed over it.
fn staging_pin(pin: &Path) -> PathBuf {
    let mut name = pin.as_os_str().to_owned();
    name.push("-new");
    PathBuf::from(name)
}

/// Read access to `DETOUR_SOCK_ORIGIN`, independent of the [`Dataplane`].
pub struct SockOrigins {
    map: BpfHashMap<MapData, u64, SockOrigin>,
}

impl SockOrigins {
    /// What detour did to the socket with this cookie, if it rewrote it.
    pub fn get(&self, cookie: u64) -> Option<SockOrigin> {
        self.map.get(&cookie, 0).ok()
    }

    /// Tells the kernel that the agent is about to destroy this socket, so its end is
    /// not counted as the backend refusing or resetting it. `false` if the socket is no
    /// longer known (it closed meanwhile).
    pub fn mark_destroyed(&mut self, cookie: u64) -> bool {
        let Some(mut origin) = self.get(cookie) else {
            return false;
        };
        origin.flags |= detour_ebpf::ORIGIN_DESTROYED_BY_AGENT;
        // BPF_EXIST: update only, never re-create an entry the socket's close removed.
        self.map.insert(cookie, origin, 2).is_ok()
    }
}

/// The program kinds detour attaches: to its cgroup, and the one tracepoint.
enum Attachable<'a> {
    SockAddr(&'a mut CgroupSockAddr),
    SockOps(&'a mut SockOps),
    /// Not cgroup-scoped: attached to [`programs::RECEIVE_RESET_TRACEPOINT`].
    RawTracePoint(&'a mut RawTracePoint),
}

impl<'a> Attachable<'a> {
    fn find(ebpf: &'a mut Ebpf, name: &str) -> Option<Result<Self, ProgramError>> {
        let program = ebpf.program_mut(name)?;
        Some(if name == programs::SOCK_OPS {
            program.try_into().map(Self::SockOps)
        } else if name == programs::RECEIVE_RESET {
            program.try_into().map(Self::RawTracePoint)
        } else {
            program.try_into().map(Self::SockAddr)
        })
    }

    /// Loads the program into the kernel; returns its tag.
    fn load(&mut self) -> Result<u64, ProgramError> {
        Ok(match self {
            Self::SockAddr(p) => {
                p.load()?;
                p.info()?.tag()
            }
            Self::SockOps(p) => {
                p.load()?;
                p.info()?.tag()
            }
            Self::RawTracePoint(p) => {
                p.load()?;
                p.info()?.tag()
            }
        })
    }

    /// Attaches to the cgroup (or the tracepoint) as a bpf_link and hands the link over.
    fn attach(&mut self, cgroup: &fs::File) -> Result<Result<FdLink, String>, ProgramError> {
        // With bpf_link (kernel >= 5.7) the kernel rejects attach flags: links always
        // share the cgroup with other programs, which lets an upgrade overlap old and new.
        let to_fd = |e: aya::programs::links::LinkError| e.to_string();
        Ok(match self {
            Self::SockAddr(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into().map_err(to_fd)
            }
            Self::SockOps(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into().map_err(to_fd)
            }
            Self::RawTracePoint(p) => {
                let id = p.attach(programs::RECEIVE_RESET_TRACEPOINT)?;
                Ok(FdLink::from(p.take_link(id)?))
            }
        })
    }
}

fn op_err(map: &'static str, op: &'static str, e: aya::maps::MapError) -> MapOpError {
    MapOpError {
        map,
        op,
        reason: e.to_string(),
    }
}

fn op_err_io(map: &'static str, op: &'static str, e: io::Error) -> MapOpError {
    MapOpError {
        map,
        op,
        reason: e.to_string(),
    }
}

fn is_not_found(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::KeyNotFound)
}

impl Maps for Dataplane {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapOpError> {
        // The reconciler writes a backend only when it hands out the id: the counters
        // start from zero for the new address, whatever the id counted before.
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| op_err_io(maps::BACKEND_STATS, "count cpus", e))?;
        let zeros = PerCpuValues::try_from(vec![BackendStats::default(); cpus])
            .map_err(|e| op_err_io(maps::BACKEND_STATS, "build values", e))?;
        self.stats
            .set(id, zeros, 0)
            .map_err(|e| op_err(maps::BACKEND_STATS, "update", e))?;
        self.state
            .set(id, BackendState::default(), 0)
            .map_err(|e| op_err(maps::BACKEND_STATE, "update", e))?;
        self.backends
            .set(id, backend, 0)
            .map_err(|e| op_err(maps::BACKENDS, "update", e))
    }

    fn clear_backend(&mut self, id: u32) -> Result<(), MapOpError> {
        let unused = Backend {
            addr: [0; 4],
            port: 0,
            family: 0,
            pad: 0,
        };
        self.backends
            .set(id, unused, 0)
            .map_err(|e| op_err(maps::BACKENDS, "update", e))
    }

    fn write_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapOpError> {
        self.slots
            .insert(key, backend_id, 0)
            .map_err(|e| op_err(maps::SLOTS, "update", e))
    }

    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapOpError> {
        match self.slots.remove(&key) {
            Err(e) if !is_not_found(&e) => Err(op_err(maps::SLOTS, "delete", e)),
            _ => Ok(()),
        }
    }

    fn write_service(&mut self, key: &FrontendKey, entry: &ServiceEntry) -> Result<(), MapOpError> {
        self.services
            .insert(key, entry, 0)
            .map_err(|e| op_err(maps::SERVICES, "update", e))
    }

    fn delete_service(&mut self, key: &FrontendKey) -> Result<(), MapOpError> {
        match self.services.remove(key) {
            Err(e) if !is_not_found(&e) => Err(op_err(maps::SERVICES, "delete", e)),
            _ => Ok(()),
        }
    }

    fn services(&self) -> Result<Vec<(FrontendKey, ServiceEntry)>, MapOpError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| op_err(maps::SERVICES, "iterate", e))
    }

    fn slot(&self, key: SlotKey) -> Result<Option<u32>, MapOpError> {
        match self.slots.get(&key, 0) {
            Ok(id) => Ok(Some(id)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(op_err(maps::SLOTS, "lookup", e)),
        }
    }

    fn backend(&self, id: u32) -> Result<Option<Backend>, MapOpError> {
        match self.backends.get(&id, 0) {
            Ok(b) if b.family != 0 => Ok(Some(b)),
            Ok(_) => Ok(None),
            Err(e) => Err(op_err(maps::BACKENDS, "lookup", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_testbed::{require_root, Cgroup, PinDir};

    fn options(cgroup: &Cgroup, pins: &PinDir) -> LoadOptions {
        LoadOptions {
            cgroup: cgroup.path().to_owned(),
            pin_dir: pins.path().to_owned(),
            max_services: 16,
            max_backends: 64,
            max_slots: 256,
            max_sockets: 1024,
            max_steered: 64,
            steer: steer::SteerOptions::default(),
        }
    }

    fn outcomes(dataplane: &Dataplane) -> Vec<(&'static str, LinkOutcome)> {
        dataplane.links.clone()
    }

    #[test]
    fn a_second_load_adopts_every_link_and_serves_from_the_same_maps() {
        require_root("loading detour's programs into a test cgroup").unwrap();
        // Dropped in reverse: the dataplane, then the pins (detaching), then the cgroup.
        let cgroup = Cgroup::new().unwrap();
        let pins = PinDir::new().unwrap();
        // 127.0.9.1:8080, as `::ffff:127.0.9.1` in network order.
        let backend = Backend {
            addr: [
                0,
                0,
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                u32::from_ne_bytes([127, 0, 9, 1]),
            ],
            port: 8080u16.to_be(),
            family: detour_ebpf::AF_INET,
            pad: 0,
        };
        let first = {
            let mut dataplane = Dataplane::load(&options(&cgroup, &pins)).unwrap();
            dataplane.write_backend(3, &backend).unwrap();
            outcomes(&dataplane)
        };
        let attached: Vec<_> = PROGRAMS
            .iter()
            .map(|&p| (p, LinkOutcome::Attached))
            .collect();
        assert_eq!(first, attached);
        let mut links: Vec<String> = fs::read_dir(pins.path().join("links"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        links.sort();
        let mut expected: Vec<String> = PROGRAMS.iter().map(ToString::to_string).collect();
        expected.sort();
        assert_eq!(
            links, expected,
            "one link pin per program, and nothing else"
        );

        // The agent exited (its maps and programs live on in the pins); the next one
        // adopts every link and reads what the first wrote.
        let mut again = Dataplane::load(&options(&cgroup, &pins)).unwrap();
        let adopted: Vec<_> = PROGRAMS
            .iter()
            .map(|&p| (p, LinkOutcome::Adopted))
            .collect();
        assert_eq!(outcomes(&again), adopted);
        assert_eq!(again.backend(3).unwrap(), Some(backend));
        // Clearing a mark that is not there is a no-op, not an error.
        again.clear_suspect(3).unwrap();
        assert_eq!(again.backend_state(3).unwrap().suspect_until_ns, 0);
    }

    #[test]
    fn backend_stats_pinned_by_an_older_agent_are_widened_with_their_counts() {
        require_root("loading detour's programs into a test cgroup").unwrap();
        let cgroup = Cgroup::new().unwrap();
        let pins = PinDir::new().unwrap();
        let opts = options(&cgroup, &pins);
        // What an agent before `aborts` pinned: five counters per backend per CPU.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default)]
        struct Older([u64; 5]);
        // SAFETY: repr(C) u64s only.
        unsafe impl aya::Pod for Older {}
        let maps_dir = pins.path().join("maps");
        fs::create_dir_all(&maps_dir).unwrap();
        {
            let mut older = PerCpuArray::<MapData, Older>::create(opts.max_backends, 0).unwrap();
            let cpus = aya::util::nr_cpus().unwrap();
            let values = (0..cpus)
                .map(|cpu| Older([10 + cpu as u64, 20, 30, 40, 50]))
                .collect::<Vec<_>>();
            older
                .set(7, PerCpuValues::try_from(values).unwrap(), 0)
                .unwrap();
            older.pin(maps_dir.join(maps::BACKEND_STATS)).unwrap();
        }
        let dataplane = Dataplane::load(&opts).unwrap();
        let cpus = aya::util::nr_cpus().unwrap() as u64;
        assert_eq!(
            dataplane.backend_stats(7).unwrap(),
            BackendStats {
                connects: (0..cpus).map(|cpu| 10 + cpu).sum(),
                established: 20 * cpus,
                refused: 30 * cpus,
                timeouts: 40 * cpus,
                resets: 50 * cpus,
                aborts: 0,
            }
        );
        let pinned = aya::maps::MapInfo::from_pin(maps_dir.join(maps::BACKEND_STATS)).unwrap();
        assert_eq!(pinned.value_size() as usize, size_of::<BackendStats>());
    }

    #[test]
    fn a_replacement_link_is_pinned_beside_the_old_one_without_a_dot() {
        // bpffs refuses names with a dot, and the rename must stay in one directory.
        let pin = Path::new("/sys/fs/bpf/detour/links/detour_connect4");
        let staging = staging_pin(pin);
        assert_eq!(staging.parent(), pin.parent());
        assert_eq!(staging.file_name().unwrap(), "detour_connect4-new");
        assert!(!staging.file_name().unwrap().to_string_lossy().contains('.'));
    }
}
