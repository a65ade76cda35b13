//! Fail open, forced: every miss or error inside the programs leaves a connect, or what
//! `getpeername` shows, as the application asked. The tests write the faults straight
//! into the pinned maps while the agent is stopped (`SIGSTOP`: it writes nothing
//! meanwhile), so each one is certain to happen, on every kernel the matrix runs.
//!
//! - a lookup that misses: a frontend whose slots are not there (a table being
//!   replaced, as a torn write would leave it), a slot naming a backend id past the
//!   array, an id no backend was written to, a backend of the other address family, an
//!   empty table;
//! - a map that is full: more connections open at once than the map of rewritten
//!   sockets holds (`--max-sockets 8`);
//! - (a full event ring is `passive::a_full_event_ring_drops_and_counts_and_never_blocks_a_connect`,
//!   a table replaced under a connect loop is
//!   `scenarios::table_swaps_under_a_connect_loop_fail_no_connect`).
//!
//! Something listens on each VIP itself and answers "vip", so a connect the programs left
//! alone is seen to reach the address the application asked for. Restoring the real
//! entry makes the backend answer again, so a test that could not tell the two apart
//! would fail.
//!
//! Addresses: VIPs 127.210.17.N:80 and [::1]:1817N, backends 127.10.17.N:8080 and
//! [::1]:2817N.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use detour_agent::reconcile::frontend_key;
use detour_ebpf::{maps, Backend, FrontendKey, ServiceEntry, SlotKey, AF_INET6};

use crate::client::{self, Get, Script};
use crate::world::World;

/// Service ids the agent never hands out in these tests (it counts up from 0).
const MISSING_SLOTS_ID: u32 = 0xFFFF_FF00;
const BAD_SLOT_ID: u32 = 0xFFFF_FF01;

struct PinnedMaps {
    services: HashMap<MapData, FrontendKey, ServiceEntry>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: Array<MapData, Backend>,
}

impl PinnedMaps {
    fn open(pins: &Path) -> Result<Self> {
        let data = |name: &str| {
            let path = pins.join("maps").join(name);
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        Ok(Self {
            services: HashMap::try_from(Map::HashMap(data(maps::SERVICES)?))?,
            slots: HashMap::try_from(Map::HashMap(data(maps::SLOTS)?))?,
            backends: Array::try_from(Map::Array(data(maps::BACKENDS)?))?,
        })
    }
}

/// A config of one service `name` on `vip`, served by `backend`, health checks off.
fn one_service(name: &str, vip: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "services:\n  - name: {name}\n    vips: [\"{}\"]\n    ports: [{{number: {}, targetPort: {}}}]\n    healthCheck: {{disabled: true}}\n    endpoints:\n      - {{address: \"{}\"}}\n",
        vip.ip(),
        vip.port(),
        backend.port(),
        backend.ip(),
    )
}

/// Sends SIGSTOP (`stop`) or SIGCONT to the agent.
fn signal_agent(w: &mut World, stop: bool) -> Result<()> {
    let pid = w.agent().pid().context("agent pid")?;
    let signal = if stop { libc::SIGSTOP } else { libc::SIGCONT };
    // SAFETY: a plain signal to our own child process.
    ensure!(unsafe { libc::kill(pid as i32, signal) } == 0);
    Ok(())
}

/// Every GET through `vip` answered by `want`.
fn all_answered_by(w: &World, vip: &str, want: &str, case: &str) -> Result<()> {
    let got = w.answers(vip, 3)?;
    ensure!(
        got.len() == 1 && got.get(want) == Some(&3),
        "{case}: GETs to {vip} answered {got:?}, want all by {want:?}"
    );
    Ok(())
}

/// The faults of a missed lookup, one after another, for one VIP.
fn lookups_that_miss_leave_the_connect_alone(vip: &str, backend: &str) -> Result<()> {
    let mut w = World::new()?;
    w.backend("b1", backend)?;
    w.backend("vip", vip)?;
    let vip_addr: SocketAddr = vip.parse()?;
    w.write_config(&one_service("open", vip_addr, backend.parse()?))?;
    w.start_agent()?;
    all_answered_by(&w, vip, "b1", "the agent's own table")?;

    let mut m = PinnedMaps::open(w.pins.path())?;
    let key = frontend_key(vip_addr);
    let real = m.services.get(&key, 0).context("the VIP's entry")?;
    ensure!(real.slot_count > 0, "{real:?}");
    // An id inside the array that no backend was written to.
    let unwritten = m.backends.len() - 1;
    ensure!(m.backends.get(&unwritten, 0)?.family == 0);
    let other_family = unwritten - 1;
    ensure!(m.backends.get(&other_family, 0)?.family == 0);
    let real_backend = m.backends.get(&real_backend_id(&m, &real)?, 0)?;

    signal_agent(&mut w, true)?;
    let cases = (|| -> Result<()> {
        let mut with = |case: &str, entry: ServiceEntry| -> Result<()> {
            m.services.insert(key, entry, 0)?;
            all_answered_by(&w, vip, "vip", case)
        };
        with(
            "slots missing (a table being replaced)",
            ServiceEntry {
                service_id: MISSING_SLOTS_ID,
                ..real
            },
        )?;
        let bad_slot = SlotKey::new(BAD_SLOT_ID, 0, 0);
        let one_slot = ServiceEntry {
            service_id: BAD_SLOT_ID,
            generation: 0,
            slot_count: 1,
            standby_count: 0,
            ..real
        };
        m.slots.insert(bad_slot, u32::MAX, 0)?;
        with("a slot naming a backend id past the array", one_slot)?;
        m.slots.insert(bad_slot, unwritten, 0)?;
        with("a slot naming an unwritten backend", one_slot)?;
        // A backend of the other family: a v4 VIP cannot be sent to a v6 address, nor a
        // v6 VIP (not v4-mapped) to a v4 one.
        let mut backend = real_backend;
        if backend.family == AF_INET6 {
            backend.family = detour_ebpf::AF_INET;
        } else {
            backend.family = AF_INET6;
            backend.addr = [0, 0, 0, u32::from_be(1)];
        }
        m.backends.set(other_family, backend, 0)?;
        m.slots.insert(bad_slot, other_family, 0)?;
        with("a backend of the other address family", one_slot)?;
        with(
            "an empty table",
            ServiceEntry {
                slot_count: 0,
                standby_count: 0,
                ..real
            },
        )?;
        Ok(())
    })();
    // Undo the faults whatever happened, then let the agent run again.
    let restored = m
        .services
        .insert(key, real, 0)
        .context("restoring the VIP's entry");
    let _ = m.slots.remove(&SlotKey::new(BAD_SLOT_ID, 0, 0));
    let _ = m.backends.set(
        other_family,
        Backend {
            addr: [0; 4],
            port: 0,
            family: 0,
            pad: 0,
        },
        0,
    );
    signal_agent(&mut w, false)?;
    cases?;
    restored?;
    // The restored table is used again: the faults, not the VIP, made the difference.
    all_answered_by(&w, vip, "b1", "the restored table")
}

/// The backend id the live table's first slot names.
fn real_backend_id(m: &PinnedMaps, entry: &ServiceEntry) -> Result<u32> {
    Ok(m.slots
        .get(&SlotKey::new(entry.service_id, entry.generation, 0), 0)?)
}

#[test]
fn a_connect_whose_lookup_misses_goes_where_the_application_asked_ipv4() -> Result<()> {
    lookups_that_miss_leave_the_connect_alone("127.210.17.1:80", "127.10.17.1:8080")
}

#[test]
fn a_connect_whose_lookup_misses_goes_where_the_application_asked_ipv6() -> Result<()> {
    lookups_that_miss_leave_the_connect_alone("[::1]:18170", "[::1]:28170")
}

/// More connections open at once than the map of rewritten sockets holds.
fn a_full_socket_map_costs_only_the_vip_in_getpeername(vip: &str, backend: &str) -> Result<()> {
    let mut w = World::new()?;
    w.backend("b1", backend)?;
    let vip: SocketAddr = vip.parse()?;
    let backend: SocketAddr = backend.parse()?;
    w.write_config(&one_service("full", vip, backend))?;
    w.bed
        .start_agent(&["--max-sockets", "8"], crate::world::READY_TIMEOUT)?;
    // Eight times what the map holds, all open at once.
    let count = 64;
    let child = client::spawn_in(&w.cgroup, &Script::Concurrent { target: vip, count })?;
    let gets: Vec<Get> = client::results(child, std::time::Duration::from_secs(120))?;
    ensure!(gets.len() == count as usize, "{} results", gets.len());
    let mut forgotten = 0;
    for g in &gets {
        // Every connect was rewritten and answered, whether or not its entry stayed.
        ensure!(g.body.as_deref() == Some("b1"), "{g:?}");
        // getpeername shows the VIP, or (its entry evicted) the real peer: never another
        // address.
        ensure!(g.peer == Some(vip) || g.peer == Some(backend), "{g:?}");
        forgotten += usize::from(g.peer == Some(backend));
    }
    ensure!(
        forgotten > 0,
        "{count} sockets open at once in a map of 8, yet every one kept its entry: the map was never full"
    );
    eprintln!("{count} sockets open at once in a map of 8: {forgotten} show the backend as their peer, the rest the VIP");
    Ok(())
}

#[test]
fn a_full_map_of_rewritten_sockets_costs_getpeername_the_vip_and_nothing_else_ipv4() -> Result<()> {
    a_full_socket_map_costs_only_the_vip_in_getpeername("127.210.17.2:80", "127.10.17.2:8080")
}

#[test]
fn a_full_map_of_rewritten_sockets_costs_getpeername_the_vip_and_nothing_else_ipv6() -> Result<()> {
    a_full_socket_map_costs_only_the_vip_in_getpeername("[::1]:18171", "[::1]:28171")
}
