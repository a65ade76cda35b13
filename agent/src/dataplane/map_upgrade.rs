//! Pinned maps whose layout no longer matches what this agent's eBPF object declares
//! (another `--max-*` size, other map flags, another ring size): an agent upgrade, a
//! downgrade, or an operator resizing the maps.
//!
//! aya reuses a pinned map whatever its layout, so without this an agent started with
//! another `--max-services` would silently keep the old size and fail writes past it.
//! Instead, before loading, every pinned map is compared with the object's declaration
//! (type, key size, value size, `max_entries`, flags):
//!
//! - the same layout: the pin is reused as it is (the common restart);
//! - the same type, key and value size, other `max_entries` or flags: **migrated**. aya
//!   creates the new map at a staging pin (`maps/<NAME>-new`), every entry of the old map
//!   is copied into it, and the staging pin is renamed over the old one — all before any
//!   new program is attached. The programs still attached keep the old map until their
//!   links are replaced (the caller does that next, see `attach_program`), so connects
//!   see a full table throughout. What the old programs write into a migrated map
//!   between the copy and the link swap (milliseconds) stays in the old map: counter
//!   increments are lost, and a socket they rewrite then is forgotten by the new
//!   programs (its `getpeername` shows the backend, its outcome is not reported). The
//!   ring buffer is recreated empty (events in flight are lost, as when an agent
//!   restarts);
//! - a value type this build **widened** (fields appended; [`WIDENINGS`] lists each older
//!   size it knows): migrated the same way, each value converted, the new fields 0;
//! - another type, key or value size: **refused** before anything changes (the running
//!   programs and maps keep serving), with an error naming the map and both layouts. The
//!   meaning of a value's bytes is not in the map, so no generic copy can be right: a
//!   build that changes a key or value type must carry its own migration (or a new map
//!   name), or the operator deletes the pin directory and accepts a gap.
//!
//! Invariants: a pin path always names a complete map (the staging pin only becomes the
//! real one by `rename`, after the copy); a staging pin left by an agent that died
//! mid-migration is removed before loading, so it is never mistaken for a migrated map.
//! A map shrunk below what it holds keeps what fits (hash maps in iteration order, arrays
//! their lowest indexes) and the rest is logged as dropped: the reconciler then sees those
//! services as missing and programs them as its limits allow.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use aya::maps::{
    Array, HashMap as BpfHashMap, Map, MapData, MapError, MapInfo, MapType, PerCpuArray,
    PerCpuValues,
};
use aya::{Ebpf, Pod};
use detour_ebpf::{
    maps, Backend, BackendState, BackendStats, FrontendKey, ResetSeen, ServiceEntry, SlotKey,
    SockOrigin,
};
use tracing::{info, warn};

use super::{staging_pin, DataplaneError};

/// What a map is, as far as programs and copies care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B max_entries {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

impl Layout {
    fn of_pin(info: &MapInfo) -> Result<Self, MapError> {
        Ok(Self {
            map_type: map_type_number(info.map_type()?),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// Entries can be copied from a map of layout `self` into one of layout `new`.
    fn copies_into(&self, new: &Layout) -> bool {
        self.map_type == new.map_type
            && self.key_size == new.key_size
            && self.value_size == new.value_size
    }

    /// Map `name`'s values can be widened from layout `self` into `new`: one of
    /// [`WIDENINGS`].
    fn widens_into(&self, name: &str, new: &Layout) -> bool {
        self.map_type == new.map_type
            && self.key_size == new.key_size
            && widening(name, self.value_size, new.value_size).is_some()
    }
}

/// [`BackendStats`] before `aborts` was appended.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BackendStatsBeforeAborts {
    connects: u64,
    established: u64,
    refused: u64,
    timeouts: u64,
    resets: u64,
}

// SAFETY: `repr(C)`, only `u64`s: no padding, every bit pattern valid.
unsafe impl aya::Pod for BackendStatsBeforeAborts {}

impl From<BackendStatsBeforeAborts> for BackendStats {
    fn from(old: BackendStatsBeforeAborts) -> Self {
        Self {
            connects: old.connects,
            established: old.established,
            refused: old.refused,
            timeouts: old.timeouts,
            resets: old.resets,
            aborts: 0,
        }
    }
}

/// A value type this build widened: entries of `map` whose values are `from` bytes
/// long are copied into values `to` bytes long by `copy`.
struct Widening {
    map: &'static str,
    from: u32,
    to: u32,
    copy: fn(&Map, &mut Map) -> Result<Copied, MapError>,
}

/// Every widening this build knows.
const WIDENINGS: [Widening; 1] = [Widening {
    map: maps::BACKEND_STATS,
    from: size_of::<BackendStatsBeforeAborts>() as u32,
    to: size_of::<BackendStats>() as u32,
    copy: widen_per_cpu::<BackendStatsBeforeAborts, BackendStats>,
}];

/// The widening of `name` from `old` to `new` value size, if this build knows it.
fn widening(name: &str, old: u32, new: u32) -> Option<&'static Widening> {
    WIDENINGS
        .iter()
        .find(|w| w.map == name && w.from == old && w.to == new)
}

/// The kernel's number for a map type (`aya::maps::MapType` carries it as discriminant).
fn map_type_number(t: MapType) -> u32 {
    t as u32
}

const RINGBUF: u32 = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32;

/// The layout the object declares for each map in `names`, after the `max_entries`
/// overrides the loader applies.
pub(super) fn declared(
    object: &[u8],
    names: &[&'static str],
    max_entries: &HashMap<&'static str, u32>,
) -> Result<HashMap<&'static str, Layout>, DataplaneError> {
    let obj = aya_obj::Object::parse(object).map_err(Box::new)?;
    names
        .iter()
        .map(|&name| {
            let map = obj.maps.get(name).ok_or(DataplaneError::MissingMap(name))?;
            let map_type = map.map_type();
            Ok((
                name,
                Layout {
                    map_type,
                    key_size: map.key_size(),
                    // The kernel takes (and reports) a ring buffer's value size as 0.
                    value_size: if map_type == RINGBUF {
                        0
                    } else {
                        map.value_size()
                    },
                    max_entries: max_entries.get(name).copied().unwrap_or(map.max_entries()),
                    flags: map.map_flags(),
                },
            ))
        })
        .collect()
}

/// A pinned map to migrate into a new one.
#[derive(Debug)]
struct Migration {
    name: &'static str,
    pin: PathBuf,
    staging: PathBuf,
    old: Layout,
    new: Layout,
}

/// Which pins the loader should use, and what to copy once it has created the new maps.
#[derive(Debug, Default)]
pub(super) struct Plan {
    migrations: Vec<Migration>,
}

impl Plan {
    /// Compares every pinned map in `maps_dir` with `declared`; fails, changing nothing
    /// on the kernel side, if one cannot be migrated.
    pub(super) fn new(
        maps_dir: &Path,
        declared: &HashMap<&'static str, Layout>,
    ) -> Result<Self, DataplaneError> {
        let mut plan = Self::default();
        for (&name, &new) in declared {
            let pin = maps_dir.join(name);
            let staging = staging_pin(&pin);
            if staging.exists() {
                // Left by an agent that died mid-migration: never a complete map.
                fs::remove_file(&staging).map_err(|source| DataplaneError::Bpffs {
                    path: staging.clone(),
                    source,
                })?;
                warn!(map = name, pin = %staging.display(), "removed a staging pin left by an interrupted migration");
            }
            if !pin.exists() {
                continue;
            }
            let map_err = |source| DataplaneError::Map { map: name, source };
            let old =
                Layout::of_pin(&MapInfo::from_pin(&pin).map_err(map_err)?).map_err(map_err)?;
            if old == new {
                continue;
            }
            if !old.copies_into(&new) && !old.widens_into(name, &new) && new.map_type != RINGBUF {
                return Err(DataplaneError::MapLayout {
                    map: name,
                    pinned: old.to_string(),
                    declared: new.to_string(),
                });
            }
            info!(map = name, pinned = %old, declared = %new, "pinned map has another layout; migrating it");
            plan.migrations.push(Migration {
                name,
                pin,
                staging,
                old,
                new,
            });
        }
        Ok(plan)
    }

    /// Where the loader should find or create `name`.
    pub(super) fn pin_path(&self, maps_dir: &Path, name: &str) -> PathBuf {
        self.migrations
            .iter()
            .find(|m| m.name == name)
            .map_or_else(|| maps_dir.join(name), |m| m.staging.clone())
    }

    /// Copies every migrated map's entries from its old pin into the map the loader
    /// created at the staging pin, then renames the staging pin over the old one.
    /// Returns the kernel ids of the maps replaced: programs still using them must be
    /// replaced too.
    pub(super) fn migrate(&self, ebpf: &mut Ebpf) -> Result<HashSet<u32>, DataplaneError> {
        let mut replaced = HashSet::new();
        for m in &self.migrations {
            let started = Instant::now();
            let map_err = |source| DataplaneError::Map {
                map: m.name,
                source,
            };
            let old = MapData::from_pin(&m.pin).map_err(map_err)?;
            replaced.insert(old.info().map_err(map_err)?.id());
            let old = Map::from_map_data(old).map_err(map_err)?;
            let new = ebpf
                .map_mut(m.name)
                .ok_or(DataplaneError::MissingMap(m.name))?;
            let copied = if m.new.map_type == RINGBUF {
                Copied::default()
            } else {
                copy(m.name, &m.old, &m.new, &old, new).map_err(map_err)?
            };
            fs::rename(&m.staging, &m.pin).map_err(|source| DataplaneError::Bpffs {
                path: m.pin.clone(),
                source,
            })?;
            info!(
                map = m.name,
                from = %m.old,
                to = %m.new,
                copied = copied.copied,
                dropped = copied.dropped,
                elapsed = ?started.elapsed(),
                "map migrated"
            );
            if copied.dropped > 0 {
                warn!(
                    map = m.name,
                    dropped = copied.dropped,
                    max_entries = m.new.max_entries,
                    "the migrated map is smaller than what the old one held; entries past it were dropped"
                );
            }
        }
        Ok(replaced)
    }
}

#[derive(Debug, Default)]
struct Copied {
    copied: u64,
    dropped: u64,
}

/// Copies one of detour's maps, typed by its name: key and value sizes were checked
/// equal, and they are the sizes of the types below, or the layouts are one of
/// [`WIDENINGS`], which then does the copy.
fn copy(
    name: &str,
    old_layout: &Layout,
    new_layout: &Layout,
    old: &Map,
    new: &mut Map,
) -> Result<Copied, MapError> {
    if let Some(widening) = widening(name, old_layout.value_size, new_layout.value_size) {
        return (widening.copy)(old, new);
    }
    match name {
        maps::SERVICES => copy_hash::<FrontendKey, ServiceEntry>(old, new),
        maps::SLOTS => copy_hash::<SlotKey, u32>(old, new),
        maps::SOCK_ORIGIN => copy_hash::<u64, SockOrigin>(old, new),
        maps::BACKENDS => copy_array::<Backend>(old, new),
        maps::BACKEND_STATE => copy_array::<BackendState>(old, new),
        maps::BACKEND_STATS => copy_per_cpu::<BackendStats>(old, new),
        maps::COUNTERS => copy_per_cpu::<u64>(old, new),
        maps::RESET_SEEN => copy_per_cpu::<ResetSeen>(old, new),
        _ => Err(MapError::Unsupported {
            name: name.to_string(),
            map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_UNSPEC,
        }),
    }
}

fn copy_hash<K: Pod, V: Pod>(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old = BpfHashMap::<&MapData, K, V>::try_from(old)?;
    let mut new = BpfHashMap::<&mut MapData, K, V>::try_from(new)?;
    let mut out = Copied::default();
    for entry in old.iter() {
        let (key, value) = entry?;
        match new.insert(key, value, 0) {
            Ok(()) => out.copied += 1,
            // E2BIG: the new map is full.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                out.dropped += 1
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn copy_array<V: Pod>(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old = Array::<&MapData, V>::try_from(old)?;
    let mut new = Array::<&mut MapData, V>::try_from(new)?;
    let common = old.len().min(new.len());
    for index in 0..common {
        new.set(index, old.get(&index, 0)?, 0)?;
    }
    Ok(Copied {
        copied: u64::from(common),
        dropped: u64::from(old.len() - common),
    })
}

fn copy_per_cpu<V: Pod>(old: &Map, new: &mut Map) -> Result<Copied, MapError> {
    let old = PerCpuArray::<&MapData, V>::try_from(old)?;
    let mut new = PerCpuArray::<&mut MapData, V>::try_from(new)?;
    let common = old.len().min(new.len());
    for index in 0..common {
        new.set(index, old.get(&index, 0)?, 0)?;
    }
    Ok(Copied {
        copied: u64::from(common),
        dropped: u64::from(old.len() - common),
    })
}

/// [`copy_per_cpu`] converting each value from `Old` to `New`.
fn widen_per_cpu<Old: Pod, New: Pod + From<Old>>(
    old: &Map,
    new: &mut Map,
) -> Result<Copied, MapError> {
    let old = PerCpuArray::<&MapData, Old>::try_from(old)?;
    let mut new = PerCpuArray::<&mut MapData, New>::try_from(new)?;
    let common = old.len().min(new.len());
    for index in 0..common {
        let values: Vec<New> = old.get(&index, 0)?.iter().map(|v| New::from(*v)).collect();
        let values = PerCpuValues::try_from(values).map_err(|e| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "widen per-CPU values",
                io_error: e,
            })
        })?;
        new.set(index, values, 0)?;
    }
    Ok(Copied {
        copied: u64::from(common),
        dropped: u64::from(old.len() - common),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detour"));

    #[test]
    fn declared_layouts_come_from_the_object_with_the_overrides() {
        let sizes = HashMap::from([(maps::SERVICES, 7)]);
        let got = declared(OBJECT, &[maps::SERVICES, maps::SLOTS, maps::EVENTS], &sizes).unwrap();
        let services = got[maps::SERVICES];
        assert_eq!(services.max_entries, 7);
        assert_eq!(services.key_size as usize, size_of::<FrontendKey>());
        assert_eq!(services.value_size as usize, size_of::<ServiceEntry>());
        assert_eq!(
            got[maps::SLOTS].max_entries,
            detour_ebpf::DEFAULT_MAX_TABLE_SLOTS
        );
        assert_eq!(got[maps::EVENTS].map_type, RINGBUF);
        assert_eq!(got[maps::EVENTS].value_size, 0);
        assert_eq!(
            got[maps::EVENTS].max_entries,
            detour_ebpf::EVENTS_RING_BYTES
        );
    }

    #[test]
    fn only_the_same_type_and_sizes_copy() {
        let a = Layout {
            map_type: 1,
            key_size: 4,
            value_size: 8,
            max_entries: 16,
            flags: 0,
        };
        assert!(a.copies_into(&Layout {
            max_entries: 2,
            flags: 1,
            ..a
        }));
        assert!(!a.copies_into(&Layout {
            value_size: 12,
            ..a
        }));
        assert!(!a.copies_into(&Layout { key_size: 8, ..a }));
        assert!(!a.copies_into(&Layout { map_type: 2, ..a }));
    }

    #[test]
    fn only_the_listed_widenings_widen() {
        let older = Layout {
            map_type: 6,
            key_size: 4,
            value_size: 40,
            max_entries: 64,
            flags: 0,
        };
        let now = Layout {
            value_size: size_of::<BackendStats>() as u32,
            ..older
        };
        assert!(older.widens_into(maps::BACKEND_STATS, &now));
        assert!(!older.widens_into(maps::COUNTERS, &now), "another map");
        assert!(!now.widens_into(maps::BACKEND_STATS, &older), "narrowing");
        assert!(!Layout {
            value_size: 32,
            ..older
        }
        .widens_into(maps::BACKEND_STATS, &now));
        assert!(!older.widens_into(maps::BACKEND_STATS, &Layout { key_size: 8, ..now }));
    }

    #[test]
    fn a_missing_map_is_named() {
        let err = declared(OBJECT, &["NO_SUCH_MAP"], &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("NO_SUCH_MAP"), "{err}");
    }
}
