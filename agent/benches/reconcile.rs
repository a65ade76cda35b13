//! `cargo bench -p detour-agent --bench reconcile`: what one table change costs the
//! reconciler with 100,000 frontends in the maps, through a full apply and through the
//! scoped path (`Reconciler::apply_services`) that health verdicts and ejections take, and
//! what moving one endpoint (an EndpointSlice change) costs through the scoped path.
//!
//! The maps are an in-memory stand-in (hash maps), so this measures the reconciler's own
//! work, not the kernel's map updates. Medians of 21 changes each.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use detour_agent::reconcile::{Desired, DesiredService, MapOpError, Maps, Reconciler, Table};
use litemap::LiteMap;

use detour_ebpf::{Backend, FrontendKey, ServiceEntry, SlotKey};

const FRONTENDS: u32 = 100_000;
const CHANGES: usize = 21;

/// Maps kept in hash maps; never fails.
#[derive(Default)]
struct MemoryMaps {
    backends: HashMap<u32, Backend>,
    slots: HashMap<SlotKey, u32>,
    services: HashMap<FrontendKey, ServiceEntry>,
}

impl Maps for MemoryMaps {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapOpError> {
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn clear_backend(&mut self, id: u32) -> Result<(), MapOpError> {
        self.backends.remove(&id);
        Ok(())
    }
    fn write_slot(&mut self, key: SlotKey, backend_id: u32) -> Result<(), MapOpError> {
        self.slots.insert(key, backend_id);
        Ok(())
    }
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapOpError> {
        self.slots.remove(&key);
        Ok(())
    }
    fn write_service(&mut self, key: &FrontendKey, entry: &ServiceEntry) -> Result<(), MapOpError> {
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
        Ok(self.slots.get(&key).copied())
    }
    fn backend(&self, id: u32) -> Result<Option<Backend>, MapOpError> {
        Ok(self.backends.get(&id).copied())
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a valid address")
}

/// `FRONTENDS` services of one frontend and two backends each.
fn desired() -> Desired {
    let services = (0..FRONTENDS)
        .map(|j| {
            let (hi, lo) = ((j >> 8) & 0xff, j & 0xff);
            let frontend = addr(&format!("127.212.{hi}.{lo}:{}", 80 + (j >> 16)));
            let backends: Vec<SocketAddr> = (0..2)
                .map(|k| addr(&format!("127.{}.{hi}.{lo}:9000", 213 + k)))
                .collect();
            DesiredService {
                name: format!("s{j}"),
                tables: LiteMap::from_iter([(frontend, Table::plain(backends.clone()))]),
                backends,
            }
        })
        .collect();
    Desired { services }
}

/// Flips the first service's table between one backend and both.
fn flip(desired: &mut Desired, change: usize) {
    let service = &mut desired.services[0];
    let both: Vec<SocketAddr> = service.backends.to_vec();
    let (_, table) = service.tables.iter_mut().next().expect("one frontend");
    table.slots = if change.is_multiple_of(2) {
        vec![both[0]].into()
    } else {
        both.into()
    };
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let mut desired = desired();
    let mut maps = MemoryMaps::default();
    let mut reconciler =
        Reconciler::new(FRONTENDS * 2, FRONTENDS * 4).with_max_slots(FRONTENDS * 8);
    let started = Instant::now();
    reconciler.apply(&mut maps, &desired, Instant::now());
    println!(
        "first apply of {FRONTENDS} frontends: {:?}",
        started.elapsed()
    );
    let (mut full, mut fast) = (Vec::new(), Vec::new());
    for change in 0..CHANGES * 2 {
        flip(&mut desired, change);
        let started = Instant::now();
        if change.is_multiple_of(2) {
            reconciler.apply(&mut maps, &desired, Instant::now());
            full.push(started.elapsed());
        } else {
            reconciler
                .apply_services(&mut maps, &desired, &[0], &[], Instant::now())
                .expect("a table-only change takes the scoped path");
            fast.push(started.elapsed());
        }
    }
    println!(
        "one table changed, median of {CHANGES}: full apply {:?}, scoped path {:?}",
        median(full),
        median(fast)
    );
    let mut moved = Vec::new();
    for change in 0..CHANGES {
        let dropped = move_endpoint(&mut desired, change);
        let started = Instant::now();
        reconciler
            .apply_services(&mut maps, &desired, &[1], &[dropped], Instant::now())
            .expect("an endpoint move takes the scoped path");
        moved.push(started.elapsed());
    }
    println!(
        "one endpoint moved to a new address, median of {CHANGES}: scoped path {:?}",
        median(moved)
    );
}

/// Moves the second service's first endpoint to a new address; returns the old one.
fn move_endpoint(desired: &mut Desired, change: usize) -> SocketAddr {
    let service = &mut desired.services[1];
    let old = *service.backends.first().expect("two backends");
    let new = addr(&format!("127.250.{}.{}:9000", change / 256, change % 256));
    service.backends.retain(|b| *b != old);
    service.add_backends([new]);
    let (_, table) = service.tables.iter_mut().next().expect("one frontend");
    table.slots = service.backends.as_slice().into();
    old
}
