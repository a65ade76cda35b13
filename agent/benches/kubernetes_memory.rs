//! `cargo bench -p detour-agent --bench kubernetes_memory [SERVICES [ENDPOINTS]]`: what
//! the agent's Kubernetes pipeline holds, stage by stage, for the objects of
//! `cargo xtask bench-kubernetes` (default 10,000 FailoverServices × 10 endpoints over
//! three clusters: 49,998 objects): the index of watched objects, the model (its derived
//! services and the `Config`), the plans and desired tables, outlier detection's state,
//! and the reconciler's.
//!
//! Live heap bytes come from a counting global allocator: what each stage's allocations
//! asked for and still hold, without the allocator's own overhead (about 16 bytes per
//! allocation with glibc, so the live allocation count is printed too). The objects are
//! parsed from the same JSON the API server is given, with what the server adds
//! (`uid`, `resourceVersion`, `creationTimestamp`) and the agent's metadata slimming,
//! and handed to the index one by one as watch events are. This measures what the data
//! costs, not the process: the end-to-end RSS is `cargo xtask bench-kubernetes`'s.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use detour_agent::passive::PassiveHealth;
use detour_agent::plan_cache::{Dirty, PlanCache};
use detour_agent::reconcile::{MapOpError, Maps, Reconciler};
use detour_agent::sources::kubernetes::model::Model;
use detour_agent::sources::kubernetes::objects::{slim_metadata, WatchedService, WatchedSlice};
use detour_agent::sources::kubernetes::FailoverService;
use detour_ebpf::{Backend, FrontendKey, ServiceEntry, SlotKey};
use detour_testbed::k8s::scale::{
    bench_objects, bench_slice, filler_objects, LOCAL_CLUSTER, REGION, ZONE,
};
use serde_json::{json, Value};

/// Counts the bytes and allocations live on the heap.
struct Counting;

static BYTES: AtomicIsize = AtomicIsize::new(0);
static ALLOCATIONS: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        ALLOCATIONS.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Live (bytes, allocations).
fn live() -> (isize, isize) {
    (
        BYTES.load(Ordering::Relaxed),
        ALLOCATIONS.load(Ordering::Relaxed),
    )
}

/// Prints what `stage` added since `before`; returns the new mark.
fn report(stage: &str, before: (isize, isize), total: &mut isize) -> (isize, isize) {
    let now = live();
    let bytes = now.0 - before.0;
    *total += bytes;
    println!(
        "{stage:<44} {:>8.1} MiB in {:>9} allocations",
        bytes as f64 / (1024.0 * 1024.0),
        now.1 - before.1
    );
    now
}

/// Maps that keep nothing: the reconciler's own state is what is measured.
struct NoMaps;

impl Maps for NoMaps {
    fn write_backend(&mut self, _: u32, _: &Backend) -> Result<(), MapOpError> {
        Ok(())
    }
    fn clear_backend(&mut self, _: u32) -> Result<(), MapOpError> {
        Ok(())
    }
    fn write_slot(&mut self, _: SlotKey, _: u32) -> Result<(), MapOpError> {
        Ok(())
    }
    fn delete_slot(&mut self, _: SlotKey) -> Result<(), MapOpError> {
        Ok(())
    }
    fn write_service(&mut self, _: &FrontendKey, _: &ServiceEntry) -> Result<(), MapOpError> {
        Ok(())
    }
    fn delete_service(&mut self, _: &FrontendKey) -> Result<(), MapOpError> {
        Ok(())
    }
    fn services(&self) -> Result<Vec<(FrontendKey, ServiceEntry)>, MapOpError> {
        Ok(Vec::new())
    }
    fn slot(&self, _: SlotKey) -> Result<Option<u32>, MapOpError> {
        Ok(None)
    }
    fn backend(&self, _: u32) -> Result<Option<Backend>, MapOpError> {
        Ok(None)
    }
}

/// `object` as the API server would send it: with a uid, a resourceVersion and a
/// creation time.
fn served(mut object: Value, n: usize) -> Value {
    let meta = &mut object["metadata"];
    meta["uid"] = json!(format!("00000000-0000-0000-0000-{n:012}"));
    meta["resourceVersion"] = json!((1000 + n).to_string());
    meta["creationTimestamp"] = json!("2026-11-30T07:00:00Z");
    object
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let services: u32 = args.next().map_or(10_000, |a| a.parse().expect("SERVICES"));
    let endpoints: u32 = args.next().map_or(10, |a| a.parse().expect("ENDPOINTS"));
    println!("{services} FailoverServices x {endpoints} endpoints");
    let mut total = 0;
    let start = live();

    let mut model = Model::new(LOCAL_CLUSTER.to_owned());
    model.index_mut().set_node_labels(
        [
            ("topology.kubernetes.io/region", REGION),
            ("topology.kubernetes.io/zone", ZONE),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    );
    let objects = || {
        bench_objects()
            .into_iter()
            .chain(std::iter::once(bench_slice("10.231.79.2".parse().unwrap())))
            .chain((1..services).flat_map(move |i| filler_objects(i, endpoints)))
            .enumerate()
    };
    // One kind at a time, each object handed over as its watch event would be.
    let mut mark = start;
    for kind in ["Service", "EndpointSlice", "FailoverService"] {
        let started = Instant::now();
        let mut count = 0;
        for (n, object) in objects().filter(|(_, o)| o["kind"] == kind) {
            count += 1;
            let object = served(object, n);
            let index = model.index_mut();
            match kind {
                "Service" => {
                    let mut service: WatchedService = serde_json::from_value(object).unwrap();
                    slim_metadata(&mut service.metadata);
                    index.apply_service(&service);
                }
                "EndpointSlice" => {
                    let mut slice: WatchedSlice = serde_json::from_value(object).unwrap();
                    slim_metadata(&mut slice.metadata);
                    index.apply_slice(&slice);
                }
                _ => {
                    let mut fos: FailoverService = serde_json::from_value(object).unwrap();
                    slim_metadata(&mut fos.metadata);
                    index.apply_failover_service(Arc::new(fos));
                }
            }
        }
        let indexed_in = started.elapsed();
        mark = report(
            &format!("index: {count} {kind}s ({indexed_in:.1?})"),
            mark,
            &mut total,
        );
    }

    let started = Instant::now();
    let built = model.build();
    let built_in = started.elapsed();
    assert!(built.problems.is_empty(), "{:?}", &built.problems[..1]);
    let config = built.config;
    let mark = report(
        &format!("model ({} services, {built_in:.1?})", config.services.len()),
        mark,
        &mut total,
    );

    let mut plans = PlanCache::default();
    plans.refresh(
        &config,
        0,
        &mut Dirty::All,
        |_, _| detour_agent::health::Health::Unknown,
        |_, _| false,
    );
    let mark = report("plans and desired tables", mark, &mut total);

    let mut passive = PassiveHealth::default();
    passive.sync(&config);
    let mark = report("outlier detection", mark, &mut total);

    let mut reconciler = Reconciler::new(65_536, 262_144).with_max_slots(4_000_000);
    let applied = reconciler.apply(&mut NoMaps, plans.desired(), Instant::now());
    assert!(applied.errors.is_empty() && applied.refused.is_empty());
    report("reconciler", mark, &mut total);
    println!(
        "{:<44} {:>8.1} MiB in {:>9} allocations",
        "total",
        total as f64 / (1024.0 * 1024.0),
        live().1 - start.1
    );

    // What one EndpointSlice change costs the model: `bench`'s endpoint moves, as in
    // `cargo xtask bench-kubernetes`, and the model is built again (medians of 21).
    let mut times = Vec::new();
    for change in 0..21u32 {
        let to = if change % 2 == 0 {
            "10.231.79.3"
        } else {
            "10.231.79.2"
        };
        let mut slice: WatchedSlice = serde_json::from_value(served(
            bench_slice(to.parse().unwrap()),
            100_000 + change as usize,
        ))
        .unwrap();
        slim_metadata(&mut slice.metadata);
        let started = Instant::now();
        model.index_mut().apply_slice(&slice);
        let built = model.build();
        times.push(started.elapsed());
        assert_eq!(
            built.derived, 1,
            "only bench's FailoverService is derived again"
        );
    }
    times.sort();
    println!(
        "one EndpointSlice change through the index and the model: {:?} (median of 21)",
        times[10]
    );
    // Keeps everything alive up to here.
    drop((model, config, plans, passive, reconciler));
}
