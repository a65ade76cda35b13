//! SYN steering's userspace half: attaches the tc programs `detour_steer` (egress) and
//! `detour_steer_ingress` where steered flows run, turns steering on in the kernel, and
//! deletes the translations of flows that closed once their grace period is over.
//!
//! What steering is (the programs' module doc has the kernel side): when a rewritten
//! socket's SYN goes unanswered for its handshake timeout, `sock_ops` picks another
//! backend and records a per-flow translation; `detour_steer` rewrites that flow's
//! packets (destination out, source back) for its whole life. The application's connect
//! takes one handshake timeout longer instead of failing. A reset refusing such a
//! connect is held back by the ingress program while another backend could take the
//! flow, which is then steered at its timeout the same way.
//!
//! Invariants:
//! - `sock_ops` steers only once [`steer::ENABLED`] is 1, which is written only after the
//!   tc program is attached to at least one device; an agent started with steering off
//!   writes 0, so no new flow is steered, and flows already steered keep their
//!   translation (the program stays attached).
//! - The program stays attached when the agent exits, so steered flows survive a restart:
//!   on tcx (Linux 6.6+) through a link pinned under `links/`, which the next agent
//!   replaces atomically with its own program; on older kernels as a clsact filter, which
//!   the next agent deletes and adds again (a packet in between goes untranslated and is
//!   retransmitted).
//! - The gate: the tc program does nothing while [`steer::INSERTED`] equals
//!   [`steer::REMOVED`]. The kernel counts an entry in before it exists; the agent counts
//!   it out only after deleting it. So a live entry is never behind a closed gate.
//! - An entry is deleted only [`steer::CLOSED_GRACE_NS`] after its socket closed, and its
//!   reply entry only if that still names this flow.
//!
//! - A steered socket whose origin the kernel forgot (evicted from the LRU of origins past
//!   `--max-sockets`) never has its close noted: the sweep takes it as closed, so such
//!   entries cannot fill the table for good.
//!
//! What is not done yet (issue 9): ICMP errors inside steered flows are not translated; a backend reached through another
//! device than the connect's pick is not redirected to (`bpf_redirect_neigh`); pods' own
//! namespaces are attached to only when named with `--steer-netns`.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{self, SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::Ebpf;
use detour_ebpf::{maps, programs, steer, FlowKey, Steer, SteerBack};
use tracing::{info, warn};

use crate::reconcile::MapOpError;

/// Where to steer: the devices, in the agent's own network namespace and in each of
/// `netns`.
#[derive(Debug, Clone, Default)]
pub struct SteerOptions {
    /// Devices to attach to (`lo`, and the devices traffic to backends leaves by).
    /// Empty: steering off.
    pub devices: Vec<String>,
    /// Further network namespaces (bind mounts such as `/run/netns/NAME`) whose
    /// `devices` get the program too: where clients in pods run.
    pub netns: Vec<PathBuf>,
}

/// One place the program is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// `self` or the namespace's path.
    pub netns: String,
    pub device: String,
    pub direction: &'static str,
    /// `tcx` or `clsact`.
    pub how: &'static str,
}

/// The steering maps, and where the program runs.
pub struct Steering {
    control: Array<MapData, u64>,
    flows: BpfHashMap<MapData, FlowKey, Steer>,
    back: BpfHashMap<MapData, FlowKey, SteerBack>,
    pub attachments: Vec<Attachment>,
}

/// How old a steering must be before a missing origin makes it an orphan: a socket's
/// origin is written before it is ever steered, so this only avoids reading a map in
/// the middle of the kernel's own updates.
const ORPHAN_AFTER_NS: u64 = 1_000_000_000;

/// What one sweep found.
#[derive(Debug, Default, Clone)]
pub struct Sweep {
    /// Entries deleted now.
    pub removed: u64,
    /// Live steered flows by (service id, backend id they go to).
    pub live: HashMap<(u32, u32), u32>,
    /// Entries in the table, closed ones in their grace period included.
    pub entries: u64,
}

impl Steering {
    /// Takes the steering maps out of `ebpf`, attaches the program as `opts` says and
    /// turns steering on (or off, with no devices). An error leaves steering off.
    pub fn start(
        ebpf: &mut Ebpf,
        opts: &SteerOptions,
        links_dir: &Path,
        tcx: bool,
    ) -> Result<Self, String> {
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| format!("the object has no map {name}"))
        };
        let control = Array::try_from(take(ebpf, maps::STEER_CONTROL)?)
            .map_err(|e| format!("{}: {e}", maps::STEER_CONTROL))?;
        let flows = BpfHashMap::try_from(take(ebpf, maps::STEER)?)
            .map_err(|e| format!("{}: {e}", maps::STEER))?;
        let back = BpfHashMap::try_from(take(ebpf, maps::STEER_BACK)?)
            .map_err(|e| format!("{}: {e}", maps::STEER_BACK))?;
        let mut steering = Self {
            control,
            flows,
            back,
            attachments: Vec::new(),
        };
        if opts.devices.is_empty() {
            steering.set_enabled(false)?;
            return Ok(steering);
        }
        for name in [programs::STEER, programs::STEER_INGRESS] {
            classifier(ebpf, name)?
                .load()
                .map_err(|e| format!("loading {name}: {e}"))?;
        }
        if !tcx {
            // Before tcx the program sits in a clsact qdisc as a cls_bpf filter; Debian's
            // kernels build both as modules (`sch_ingress` holds clsact).
            for module in ["sch_ingress", "cls_bpf"] {
                if let Err(why) = super::features::modprobe(module) {
                    warn!("could not load the {module} module, which steering needs before Linux 6.6: {why}");
                }
            }
        }
        // The named namespaces instead of the agent's own, when there are any.
        let places: Vec<Option<&Path>> = if opts.netns.is_empty() {
            vec![None]
        } else {
            opts.netns.iter().map(|p| Some(p.as_path())).collect()
        };
        for netns in places {
            for device in &opts.devices {
                for direction in [TcAttachType::Egress, TcAttachType::Ingress] {
                    let name = match direction {
                        TcAttachType::Ingress => programs::STEER_INGRESS,
                        _ => programs::STEER,
                    };
                    let program = classifier(ebpf, name)?;
                    let attachment =
                        attach_in(program, name, netns, device, direction, links_dir, tcx)?;
                    info!(
                        netns = %attachment.netns,
                        device = %attachment.device,
                        direction = attachment.direction,
                        how = attachment.how,
                        "SYN steering attached"
                    );
                    steering.attachments.push(attachment);
                }
            }
        }
        steering.set_enabled(true)?;
        Ok(steering)
    }

    fn set_enabled(&mut self, on: bool) -> Result<(), String> {
        self.control
            .set(steer::ENABLED, u64::from(on), 0)
            .map_err(|e| format!("{}: {e}", maps::STEER_CONTROL))
    }

    /// Whether `sock_ops` steers.
    pub fn enabled(&self) -> bool {
        !self.attachments.is_empty()
    }

    /// Whether the translation table is empty, from the gate's two counters (no map
    /// walk); `false` when they cannot be read.
    pub fn is_empty(&self) -> bool {
        let read = |index: u32| self.control.get(&index, 0).ok();
        matches!(
            (read(steer::INSERTED), read(steer::REMOVED)),
            (Some(inserted), Some(removed)) if inserted == removed
        )
    }

    /// The control array: counters and the gate.
    pub fn counters(&self) -> Result<[u64; steer::COUNT as usize], MapOpError> {
        let mut out = [0; steer::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.control.get(&(i as u32), 0).map_err(|e| MapOpError {
                map: maps::STEER_CONTROL,
                op: "read",
                reason: e.to_string(),
            })?;
        }
        Ok(out)
    }

    /// Deletes the entries of flows closed more than the grace period before `now_ns`
    /// (`CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`), and counts the live ones.
    ///
    /// `known(cookie)` says whether the kernel still remembers the socket's origin. A
    /// steered socket whose origin is gone (evicted from the LRU of origins by more than
    /// `--max-sockets` sockets) will never have its close noted, so its entry is treated
    /// as closed now: without this, such entries would fill the table for good. The
    /// price, only past `--max-sockets`: such a flow, if still open, loses its
    /// translation after the grace period.
    pub fn sweep(&mut self, now_ns: u64, known: impl Fn(u64) -> bool) -> Result<Sweep, MapOpError> {
        let err = |op: &'static str| {
            move |e: aya::maps::MapError| MapOpError {
                map: maps::STEER,
                op,
                reason: e.to_string(),
            }
        };
        let mut sweep = Sweep::default();
        let mut expired = Vec::new();
        let mut orphans = Vec::new();
        for item in self.flows.iter() {
            let (key, entry) = match item {
                Ok(kv) => kv,
                // Deleted under the iteration by a recycling socket: skip it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(err("iterate")(e)),
            };
            sweep.entries += 1;
            if entry.closed_at_ns == 0
                && now_ns.saturating_sub(entry.steered_at_ns) > ORPHAN_AFTER_NS
                && !known(entry.cookie)
            {
                orphans.push((key, entry));
                continue;
            }
            if entry.closed_at_ns != 0 {
                if now_ns.saturating_sub(entry.closed_at_ns) > steer::CLOSED_GRACE_NS {
                    expired.push((key, entry));
                }
            } else if entry.steps != 0 {
                *sweep
                    .live
                    .entry((entry.service_id, entry.to_id))
                    .or_default() += 1;
            }
        }
        for (key, mut entry) in orphans {
            entry.closed_at_ns = now_ns;
            // BPF_EXIST: only if the flow's entry is still there.
            match self.flows.insert(key, entry, 2) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(err("mark closed")(e)),
            }
        }
        for (key, entry) in expired {
            let back_key = FlowKey {
                local: key.local,
                remote: entry.to,
                local_port: key.local_port,
                remote_port: entry.to_port,
            };
            if let Ok(back) = self.back.get(&back_key, 0) {
                if back.from == key.remote && back.from_port == key.remote_port {
                    let _ = self.back.remove(&back_key);
                }
            }
            // Re-read: a socket that reused the 4-tuple may have taken the entry over.
            match self.flows.get(&key, 0) {
                Ok(now) if now.closed_at_ns == entry.closed_at_ns => {}
                _ => continue,
            }
            match self.flows.remove(&key) {
                Ok(()) => sweep.removed += 1,
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(err("delete")(e)),
            }
        }
        if sweep.removed > 0 {
            // Only the agent writes REMOVED, and only after the entries are gone.
            let removed = self
                .control
                .get(&steer::REMOVED, 0)
                .map_err(err("read removed"))?;
            self.control
                .set(steer::REMOVED, removed + sweep.removed, 0)
                .map_err(err("write removed"))?;
            sweep.entries -= sweep.removed;
        }
        Ok(sweep)
    }
}

/// The tc program `name` of the object.
fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("the object has no program {name}"))?
        .try_into()
        .map_err(|e| format!("{name}: {e}"))
}

/// Attaches `program` to `device` in `netns` (the agent's own when `None`), replacing
/// what an earlier agent left there: `detour_steer` on egress, `detour_steer_ingress` on
/// ingress. A flow's packets leave by egress and its replies arrive by ingress; on `lo`
/// every packet passes egress and then ingress, so the egress program translates both
/// directions there and the ingress one only holds refusals (it knows `lo` by its
/// ifindex). The pin is named after `detour_steer` in both directions, so that an agent
/// from before the ingress program existed has its ingress link replaced in place.
fn attach_in(
    program: &mut SchedClassifier,
    name: &str,
    netns: Option<&Path>,
    device: &str,
    direction: TcAttachType,
    links_dir: &Path,
    tcx: bool,
) -> Result<Attachment, String> {
    let netns_name = netns.map_or_else(|| "self".to_string(), |p| p.display().to_string());
    let dir = match direction {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    };
    let ns_file = match netns {
        Some(path) => File::open(path).map_err(|e| format!("netns {}: {e}", path.display()))?,
        None => File::open("/proc/self/ns/net").map_err(|e| format!("own netns: {e}"))?,
    };
    let inode = ns_file
        .metadata()
        .map_err(|e| format!("netns {netns_name}: {e}"))?
        .ino();
    let pin = links_dir.join(format!("{}-{inode}-{device}-{dir}", programs::STEER));
    let what = format!("{name} on {device} {dir} in netns {netns_name}");
    let work = || -> Result<&'static str, String> {
        if let Some(ns) = netns.map(|_| &ns_file) {
            // SAFETY: `ns` is an open namespace file; this thread exists only for this.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "setns into {netns_name}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        if tcx {
            // An earlier agent's link: its program is replaced in one step, so no
            // packet of a steered flow goes untranslated.
            let replaced = PinnedLink::from_pin(&pin).ok().and_then(|old| {
                let link = SchedClassifierLink::try_from(FdLink::from(old)).ok()?;
                match program.attach_to_link(link) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        // Its device is gone (a namespace deleted since): start afresh.
                        warn!("{what}: the pinned link cannot be replaced ({e}); attaching anew");
                        None
                    }
                }
            });
            let id = match replaced {
                Some(id) => id,
                None => {
                    let _ = std::fs::remove_file(&pin);
                    program
                        .attach_with_options(
                            device,
                            direction,
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .map_err(|e| format!("{what}: {e}"))?
                }
            };
            let link = program.take_link(id).map_err(|e| format!("{what}: {e}"))?;
            let link: FdLink = link.try_into().map_err(|e| format!("{what}: {e}"))?;
            if !pin.exists() {
                link.pin(&pin)
                    .map_err(|e| format!("{what}: pin {}: {e}", pin.display()))?;
            }
            Ok("tcx")
        } else {
            match tc::qdisc_add_clsact(device) {
                Ok(()) => {}
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(format!("{what}: adding clsact: {e}")),
            }
            // Either program may be there from an earlier agent (before the ingress
            // program existed, `detour_steer` ran on ingress too).
            for old in [programs::STEER, programs::STEER_INGRESS] {
                match tc::qdisc_detach_program(device, direction, old) {
                    Ok(()) => {}
                    Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => warn!("{what}: removing the previous filter {old}: {e}"),
                }
            }
            let id = program
                .attach_with_options(
                    device,
                    direction,
                    TcAttachOptions::Netlink(Default::default()),
                )
                .map_err(|e| format!("{what}: {e}"))?;
            // The filter stays when the agent exits: steered flows keep their translation.
            std::mem::forget(program.take_link(id).map_err(|e| format!("{what}: {e}"))?);
            Ok("clsact")
        }
    };
    let how = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("detour-steer-attach".into())
            .spawn_scoped(scope, work)
            .map_err(|e| format!("{what}: spawning a thread: {e}"))?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    Ok(Attachment {
        netns: netns_name,
        device: device.to_string(),
        direction: dir,
        how,
    })
}

/// `detour_steer` run on crafted packets through the kernel's `BPF_PROG_TEST_RUN`: a
/// flow's packets to the abandoned backend leave for the new one, the new backend's
/// replies come back with the old one's address, the old one's late packets are dropped
/// and counted, each with IPv4 and IPv6 and with the IP and TCP checksums (pseudo-header
/// included) checked against an independent computation; and nothing is touched while
/// the gate is closed or for a flow that is not steered.
///
/// aya 0.14's `TestRun` wrapper (no hand-made `bpf(2)` call needed) runs the program
/// on an skb the kernel builds from the bytes, Ethernet header first (it sets the skb's
/// protocol from the EtherType), as on a device. Privileged: each test loads its own
/// copy of the object, so its maps are its own.
///
/// Not covered: that skb's checksum state is always `CHECKSUM_NONE`, so the
/// `CHECKSUM_PARTIAL` (locally built) and `CHECKSUM_COMPLETE` (received) paths of the
/// checksum helpers, where `BPF_F_PSEUDO_HDR` matters, are not exercised here.
#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use aya::maps::{Array, HashMap as BpfHashMap, MapData};
    use aya::programs::SchedClassifier;
    use aya::{Ebpf, EbpfLoader, TestRun, TestRunOptions};
    use detour_ebpf::{maps, programs, steer, FlowKey, Steer, SteerBack};
    use detour_testbed::require_root;
    use std::path::Path;

    use super::{SteerOptions, Steering};

    /// The program's verdicts: TC_ACT_UNSPEC / TCX_NEXT, and TC_ACT_SHOT.
    const NEXT: i32 = -1;
    const DROP: i32 = 2;
    const L3: usize = 14;
    const TCP_SYN: u8 = 0x02;
    const TCP_RST: u8 = 0x04;
    const TCP_ACK: u8 = 0x10;

    /// One steered flow: the client, the backend its connect picked (A, abandoned) and
    /// the one it was steered to (B).
    #[derive(Clone, Copy)]
    struct Flow {
        client: SocketAddr,
        old: SocketAddr,
        new: SocketAddr,
    }

    fn v4_flow() -> Flow {
        Flow {
            client: "10.0.0.1:40000".parse().unwrap(),
            old: "10.0.0.2:8080".parse().unwrap(),
            new: "10.0.0.3:9090".parse().unwrap(),
        }
    }

    fn v6_flow() -> Flow {
        Flow {
            client: "[fd00::1]:40000".parse().unwrap(),
            old: "[fd00::2]:8080".parse().unwrap(),
            new: "[fd00::3]:9090".parse().unwrap(),
        }
    }

    /// An address as the maps hold it: four network-order words, IPv4 mapped.
    fn words(ip: IpAddr) -> [u32; 4] {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let octets = v6.octets();
        std::array::from_fn(|i| u32::from_ne_bytes(octets[4 * i..4 * i + 4].try_into().unwrap()))
    }

    fn flow_key(local: SocketAddr, remote: SocketAddr) -> FlowKey {
        FlowKey {
            local: words(local.ip()),
            remote: words(remote.ip()),
            local_port: local.port().to_be(),
            remote_port: remote.port().to_be(),
        }
    }

    fn steer_entry(to: SocketAddr, steps: u8) -> Steer {
        Steer {
            to: words(to.ip()),
            to_port: to.port().to_be(),
            steps,
            seen: 0,
            to_id: 7,
            tried: [3, 7, steer::NO_BACKEND, steer::NO_BACKEND],
            service_id: 11,
            pad: 0,
            steered_at_ns: 1_000,
            closed_at_ns: 0,
            cookie: 0xc00c1e,
        }
    }

    /// The object loaded (every map, small), `detour_steer` loaded.
    struct Harness {
        ebpf: Ebpf,
    }

    impl Harness {
        fn new() -> Self {
            require_root("running detour_steer through BPF_PROG_TEST_RUN").unwrap();
            let mut loader = EbpfLoader::new();
            for name in [
                maps::SERVICES,
                maps::SLOTS,
                maps::BACKENDS,
                maps::BACKEND_STATS,
                maps::BACKEND_STATE,
                maps::SOCK_ORIGIN,
                maps::STEER,
                maps::STEER_BACK,
            ] {
                loader.map_max_entries(name, 64);
            }
            let mut ebpf = loader.load(super::super::EBPF_OBJECT).unwrap();
            for name in [programs::STEER, programs::STEER_INGRESS] {
                let program: &mut SchedClassifier =
                    ebpf.program_mut(name).unwrap().try_into().unwrap();
                program.load().unwrap();
            }
            Self { ebpf }
        }

        fn control(&mut self) -> Array<&mut MapData, u64> {
            Array::try_from(self.ebpf.map_mut(maps::STEER_CONTROL).unwrap()).unwrap()
        }

        fn flows(&mut self) -> BpfHashMap<&mut MapData, FlowKey, Steer> {
            BpfHashMap::try_from(self.ebpf.map_mut(maps::STEER).unwrap()).unwrap()
        }

        fn back(&mut self) -> BpfHashMap<&mut MapData, FlowKey, SteerBack> {
            BpfHashMap::try_from(self.ebpf.map_mut(maps::STEER_BACK).unwrap()).unwrap()
        }

        /// Sets the gate's two counters.
        fn gate(&mut self, inserted: u64, removed: u64) {
            let mut control = self.control();
            control.set(steer::INSERTED, inserted, 0).unwrap();
            control.set(steer::REMOVED, removed, 0).unwrap();
        }

        /// What `sock_ops` writes when it steers `flow` (`steps` times): both entries,
        /// and the gate opened.
        fn steer(&mut self, flow: Flow, steps: u8) {
            self.flows()
                .insert(
                    flow_key(flow.client, flow.old),
                    steer_entry(flow.new, steps),
                    0,
                )
                .unwrap();
            let back = SteerBack {
                from: words(flow.old.ip()),
                from_port: flow.old.port().to_be(),
                pad: 0,
            };
            self.back()
                .insert(flow_key(flow.client, flow.new), back, 0)
                .unwrap();
            self.gate(1, 0);
        }

        fn entry(&mut self, flow: Flow) -> Steer {
            self.flows()
                .get(&flow_key(flow.client, flow.old), 0)
                .unwrap()
        }

        fn counter(&mut self, index: u32) -> u64 {
            self.control().get(&index, 0).unwrap()
        }

        /// Runs the egress program once on `packet`: its verdict and the packet it left.
        fn run(&self, packet: &[u8]) -> (i32, Vec<u8>) {
            self.run_program(programs::STEER, packet, None)
        }

        /// Runs `name` once on `packet`, as if on the device `ifindex` of the calling
        /// thread's namespace (the kernel's default: `lo`).
        fn run_program(&self, name: &str, packet: &[u8], ifindex: Option<u32>) -> (i32, Vec<u8>) {
            let program: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
            let mut out = vec![0; packet.len()];
            // `struct __sk_buff` as the test run takes it: every field 0 but `ifindex`
            // (at byte 40), which names the device the packet is on.
            let mut ctx = [0u8; 192];
            if let Some(ifindex) = ifindex {
                ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
            }
            let result = program
                .test_run(TestRunOptions {
                    data_in: Some(packet),
                    data_out: Some(&mut out),
                    ctx_in: ifindex.map(|_| &ctx[..]),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(result.data_size_out as usize, packet.len());
            (result.return_value as i32, out)
        }
    }

    /// RFC 1071: the one's complement of the one's complement sum of `bytes`'s 16-bit
    /// words (an odd last byte padded with zero). 0 over data that includes a correct
    /// checksum.
    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u64 = bytes
            .chunks(2)
            .map(|pair| u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Where the TCP header starts in one of [`packet`]'s packets.
    fn l4(packet: &[u8]) -> usize {
        match u16::from_be_bytes([packet[12], packet[13]]) {
            0x0800 => L3 + usize::from(packet[L3] & 0x0f) * 4,
            0x86dd => L3 + 40,
            other => panic!("EtherType {other:#06x}"),
        }
    }

    /// The pseudo-header and segment the TCP checksum covers, read from `packet`.
    fn tcp_checksummed(packet: &[u8]) -> Vec<u8> {
        let at = l4(packet);
        let segment = &packet[at..];
        let mut covered = Vec::new();
        if at == L3 + 40 {
            covered.extend_from_slice(&packet[L3 + 8..L3 + 40]);
            covered.extend_from_slice(&(segment.len() as u32).to_be_bytes());
            covered.extend_from_slice(&[0, 0, 0, 6]);
        } else {
            covered.extend_from_slice(&packet[L3 + 12..L3 + 20]);
            covered.extend_from_slice(&[0, 6]);
            covered.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        }
        covered.extend_from_slice(segment);
        covered
    }

    fn tcp_checksum_ok(packet: &[u8]) -> bool {
        checksum(&tcp_checksummed(packet)) == 0
    }

    /// Whether the IPv4 header checksum is right (an IPv6 packet has none).
    fn ip_checksum_ok(packet: &[u8]) -> bool {
        at_v6(packet) || checksum(&packet[L3..l4(packet)]) == 0
    }

    fn at_v6(packet: &[u8]) -> bool {
        l4(packet) == L3 + 40
    }

    /// `packet` with its checksum fields zeroed, to compare the rest byte for byte (an
    /// incremental update may write 0xffff where a full computation writes 0).
    fn masked(packet: &[u8]) -> Vec<u8> {
        let mut out = packet.to_vec();
        let at = l4(packet);
        out[at + 16..at + 18].fill(0);
        if !at_v6(packet) {
            out[L3 + 10..L3 + 12].fill(0);
        }
        out
    }

    /// An Ethernet frame with a TCP segment from `src` to `dst` (same family), with TCP
    /// options (MSS, NOP, window scale), `payload`, and correct checksums.
    fn packet(src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&src.port().to_be_bytes());
        tcp.extend_from_slice(&dst.port().to_be_bytes());
        tcp.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
        let ack: u32 = if flags & TCP_ACK != 0 { 0x0a0b_0c0d } else { 0 };
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.extend_from_slice(&[7 << 4, flags]); // 28-byte header
        tcp.extend_from_slice(&64240u16.to_be_bytes()); // window
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend_from_slice(&[2, 4, 0x05, 0xb4, 1, 3, 3, 7]); // MSS 1460, NOP, WS 7
        tcp.extend_from_slice(payload);

        let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                frame.extend_from_slice(&[0x45, 0]);
                frame.extend_from_slice(&(20 + tcp.len() as u16).to_be_bytes());
                frame.extend_from_slice(&[0x1c, 0x46, 0x40, 0, 64, 6, 0, 0]); // id, DF, TTL
                frame.extend_from_slice(&s.octets());
                frame.extend_from_slice(&d.octets());
                let sum = checksum(&frame[L3..]);
                frame[L3 + 10..L3 + 12].copy_from_slice(&sum.to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                frame.extend_from_slice(&[0x60, 0x01, 0x23, 0x45]); // flow label
                frame.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
                frame.extend_from_slice(&[6, 64]); // next header, hop limit
                frame.extend_from_slice(&s.octets());
                frame.extend_from_slice(&d.octets());
            }
            _ => panic!("{src} and {dst} are of different families"),
        }
        frame.extend_from_slice(&tcp);
        let at = l4(&frame);
        let sum = checksum(&tcp_checksummed(&frame));
        frame[at + 16..at + 18].copy_from_slice(&sum.to_be_bytes());
        frame
    }

    /// Asserts that `out` is `expected` (checksum fields aside) with valid checksums.
    fn assert_translated(out: &[u8], expected: &[u8]) {
        assert_eq!(masked(out), masked(expected), "the translated packet");
        assert!(ip_checksum_ok(out), "IPv4 header checksum of {out:02x?}");
        assert!(tcp_checksum_ok(out), "TCP checksum of {out:02x?}");
    }

    #[test]
    fn the_test_packets_have_correct_checksums_and_a_changed_address_breaks_them() {
        for flow in [v4_flow(), v6_flow()] {
            let good = packet(flow.client, flow.old, TCP_SYN, b"odd");
            assert!(ip_checksum_ok(&good) && tcp_checksum_ok(&good));
            let mut bad = good.clone();
            let last = l4(&bad) - 1; // the destination address's last byte
            bad[last] ^= 1;
            assert!(!tcp_checksum_ok(&bad));
            assert_eq!(ip_checksum_ok(&bad), at_v6(&bad));
            let mut bad = good.clone();
            bad[l4(&good) + 3] ^= 1; // destination port
            assert!(!tcp_checksum_ok(&bad));
        }
    }

    /// The client's packet to A leaves for B, and the program notes it saw the flow.
    fn forward(flow: Flow) {
        let mut h = Harness::new();
        h.steer(flow, 1);
        let syn = packet(flow.client, flow.old, TCP_SYN, b"");
        let (verdict, out) = h.run(&syn);
        assert_eq!(verdict, NEXT);
        assert_translated(&out, &packet(flow.client, flow.new, TCP_SYN, b""));
        assert_eq!(
            h.entry(flow),
            Steer {
                seen: 1,
                ..steer_entry(flow.new, 1)
            }
        );
        // A later segment, with a payload of odd length.
        let data = packet(flow.client, flow.old, TCP_ACK, b"GET / HTTP/1.0\r\n\r\n!");
        let (verdict, out) = h.run(&data);
        assert_eq!(verdict, NEXT);
        assert_translated(
            &out,
            &packet(flow.client, flow.new, TCP_ACK, b"GET / HTTP/1.0\r\n\r\n!"),
        );
        assert_eq!(h.counter(steer::LATE_DROPPED), 0);
    }

    /// B's reply reaches the client with A's address and port.
    fn reply(flow: Flow) {
        let mut h = Harness::new();
        h.steer(flow, 1);
        let syn_ack = packet(flow.new, flow.client, TCP_SYN | TCP_ACK, b"");
        let (verdict, out) = h.run(&syn_ack);
        assert_eq!(verdict, NEXT);
        assert_translated(&out, &packet(flow.old, flow.client, TCP_SYN | TCP_ACK, b""));
        let data = packet(flow.new, flow.client, TCP_ACK, b"HTTP/1.0 200 OK\r\n");
        let (verdict, out) = h.run(&data);
        assert_eq!(verdict, NEXT);
        assert_translated(
            &out,
            &packet(flow.old, flow.client, TCP_ACK, b"HTTP/1.0 200 OK\r\n"),
        );
        assert_eq!(
            h.entry(flow).seen,
            0,
            "a reply is not the flow's own packet"
        );
        assert_eq!(h.counter(steer::LATE_DROPPED), 0);
    }

    /// A's late SYN-ACK is dropped and counted.
    fn late(flow: Flow) {
        let mut h = Harness::new();
        h.steer(flow, 1);
        let syn_ack = packet(flow.old, flow.client, TCP_SYN | TCP_ACK, b"");
        assert_eq!(h.run(&syn_ack).0, DROP);
        assert_eq!(h.counter(steer::LATE_DROPPED), 1);
        assert_eq!(h.run(&syn_ack).0, DROP);
        assert_eq!(h.counter(steer::LATE_DROPPED), 2);
    }

    #[test]
    fn ipv4_packets_to_the_abandoned_backend_go_to_the_new_one() {
        forward(v4_flow());
    }

    #[test]
    fn ipv4_replies_from_the_new_backend_carry_the_abandoned_ones_address() {
        reply(v4_flow());
    }

    #[test]
    fn ipv4_late_packets_from_the_abandoned_backend_are_dropped_and_counted() {
        late(v4_flow());
    }

    #[test]
    fn ipv6_packets_to_the_abandoned_backend_go_to_the_new_one() {
        forward(v6_flow());
    }

    #[test]
    fn ipv6_replies_from_the_new_backend_carry_the_abandoned_ones_address() {
        reply(v6_flow());
    }

    #[test]
    fn ipv6_late_packets_from_the_abandoned_backend_are_dropped_and_counted() {
        late(v6_flow());
    }

    #[test]
    fn a_backend_on_the_same_port_changes_only_the_address() {
        for mut flow in [v4_flow(), v6_flow()] {
            flow.new.set_port(flow.old.port());
            let mut h = Harness::new();
            h.steer(flow, 2);
            let (verdict, out) = h.run(&packet(flow.client, flow.old, TCP_SYN, b""));
            assert_eq!(verdict, NEXT);
            assert_translated(&out, &packet(flow.client, flow.new, TCP_SYN, b""));
            let (verdict, out) = h.run(&packet(flow.new, flow.client, TCP_ACK, b"x"));
            assert_eq!(verdict, NEXT);
            assert_translated(&out, &packet(flow.old, flow.client, TCP_ACK, b"x"));
        }
    }

    /// Runs `test` on a thread in a network namespace of its own with a veth pair, given
    /// the ifindex of one end: a device other than `lo` for the ingress program, made
    /// without touching the machine's namespace (the namespace goes with the thread).
    fn on_a_device_of_a_new_namespace(test: impl FnOnce(u32) + Send) {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: unshares this thread's network namespace only.
                    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
                    // A child forked from this thread starts in its namespace.
                    let status = std::process::Command::new("ip")
                        .args(["link", "add", "t0", "type", "veth", "peer", "name", "t1"])
                        .status()
                        .unwrap();
                    assert!(status.success(), "ip link add: {status}");
                    // SAFETY: a NUL-terminated name.
                    let ifindex = unsafe { libc::if_nametoindex(c"t0".as_ptr()) };
                    assert!(ifindex > 1, "t0's ifindex: {ifindex}");
                    test(ifindex);
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        });
    }

    /// The ingress program translates replies on a device, and leaves them to the egress
    /// program on `lo` (which every packet there passes first): translating twice would
    /// take its own translated reply for a late one from A.
    #[test]
    fn ingress_translates_replies_on_a_device_and_not_on_lo() {
        for flow in [v4_flow(), v6_flow()] {
            let mut h = Harness::new();
            h.steer(flow, 1);
            let syn_ack = packet(flow.new, flow.client, TCP_SYN | TCP_ACK, b"");
            let translated = packet(flow.old, flow.client, TCP_SYN | TCP_ACK, b"");
            // On lo: left alone, translated or not, and not taken for a late packet.
            assert_eq!(
                h.run_program(programs::STEER_INGRESS, &syn_ack, None),
                (NEXT, syn_ack.clone())
            );
            assert_eq!(
                h.run_program(programs::STEER_INGRESS, &translated, None),
                (NEXT, translated.clone())
            );
            assert_eq!(h.counter(steer::LATE_DROPPED), 0);
            on_a_device_of_a_new_namespace(|ifindex| {
                let (verdict, out) =
                    h.run_program(programs::STEER_INGRESS, &syn_ack, Some(ifindex));
                assert_eq!(verdict, NEXT);
                assert_translated(&out, &translated);
                // A's own late SYN-ACK is dropped there, as on egress.
                assert_eq!(
                    h.run_program(programs::STEER_INGRESS, &translated, Some(ifindex))
                        .0,
                    DROP
                );
            });
            assert_eq!(h.counter(steer::LATE_DROPPED), 1);
        }
    }

    /// A reset no rewritten socket is waiting for (here: no socket at all) goes through,
    /// steering on or off, and holds nothing.
    #[test]
    fn ingress_lets_a_reset_for_no_rewritten_socket_through() {
        for flow in [v4_flow(), v6_flow()] {
            let mut h = Harness::new();
            for enabled in [0, 1] {
                h.control().set(steer::ENABLED, enabled, 0).unwrap();
                for flags in [TCP_RST | TCP_ACK, TCP_RST] {
                    let reset = packet(flow.old, flow.client, flags, b"");
                    assert_eq!(
                        h.run_program(programs::STEER_INGRESS, &reset, None),
                        (NEXT, reset)
                    );
                }
            }
            assert_eq!(h.counter(steer::REFUSALS_HELD), 0);
        }
    }

    /// Every packet of a steered flow, each way, and A's late one.
    fn flow_packets(flow: Flow) -> [Vec<u8>; 3] {
        [
            packet(flow.client, flow.old, TCP_SYN, b""),
            packet(flow.new, flow.client, TCP_SYN | TCP_ACK, b""),
            packet(flow.old, flow.client, TCP_SYN | TCP_ACK, b""),
        ]
    }

    #[test]
    fn a_closed_gate_leaves_even_a_steered_flow_alone() {
        for flow in [v4_flow(), v6_flow()] {
            let mut h = Harness::new();
            h.steer(flow, 1);
            h.gate(3, 3);
            for input in flow_packets(flow) {
                assert_eq!(h.run(&input), (NEXT, input));
            }
            assert_eq!(h.entry(flow).seen, 0);
            assert_eq!(h.counter(steer::LATE_DROPPED), 0);
        }
    }

    #[test]
    fn an_abandoned_entry_neither_translates_nor_drops() {
        for flow in [v4_flow(), v6_flow()] {
            let mut h = Harness::new();
            h.steer(flow, 0);
            let [to_old, _, from_old] = flow_packets(flow);
            assert_eq!(h.run(&to_old), (NEXT, to_old));
            assert_eq!(h.run(&from_old), (NEXT, from_old));
            assert_eq!(h.entry(flow).seen, 0);
            assert_eq!(h.counter(steer::LATE_DROPPED), 0);
        }
    }

    const ICMP_UNREACHABLE: u8 = 3;
    const ICMP_FRAGMENTATION_NEEDED: u8 = 4;
    const ICMP_HOST_UNREACHABLE: u8 = 1;
    const ICMP_ECHO_REQUEST: u8 = 8;
    const ICMPV6_UNREACHABLE: u8 = 1;
    const ICMPV6_PACKET_TOO_BIG: u8 = 2;

    /// An ICMP (ICMPv6 for IPv6) error from `router` to `to`, of `kind` and `code`, that
    /// quotes the IP packet of `quoted` (a frame from [`packet`]) whole, as Linux quotes
    /// up to 576 bytes; the rest of the header is an MTU of 1400.
    fn icmp_error(router: IpAddr, to: IpAddr, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
        let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0x78];
        icmp.extend_from_slice(&quoted[L3..]);
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x03];
        match (router, to) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                frame.extend_from_slice(&[0x45, 0xc0]);
                frame.extend_from_slice(&(20 + icmp.len() as u16).to_be_bytes());
                frame.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
                frame.extend_from_slice(&s.octets());
                frame.extend_from_slice(&d.octets());
                let sum = checksum(&frame[L3..]);
                frame[L3 + 10..L3 + 12].copy_from_slice(&sum.to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                frame.extend_from_slice(&[0x60, 0, 0, 0]);
                frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
                frame.extend_from_slice(&[58, 64]);
                frame.extend_from_slice(&s.octets());
                frame.extend_from_slice(&d.octets());
            }
            _ => panic!("{router} and {to} are of different families"),
        }
        frame.extend_from_slice(&icmp);
        let at = icmp_at(&frame);
        let sum = checksum(&icmp_checksummed(&frame));
        frame[at + 2..at + 4].copy_from_slice(&sum.to_be_bytes());
        frame
    }

    /// Where the ICMP header starts in one of [`icmp_error`]'s frames.
    fn icmp_at(frame: &[u8]) -> usize {
        if u16::from_be_bytes([frame[12], frame[13]]) == 0x86dd {
            L3 + 40
        } else {
            L3 + usize::from(frame[L3] & 0x0f) * 4
        }
    }

    /// What the ICMP checksum covers: the message, and for ICMPv6 a pseudo-header too.
    fn icmp_checksummed(frame: &[u8]) -> Vec<u8> {
        let at = icmp_at(frame);
        let mut covered = Vec::new();
        if at == L3 + 40 {
            covered.extend_from_slice(&frame[L3 + 8..L3 + 40]);
            covered.extend_from_slice(&((frame.len() - at) as u32).to_be_bytes());
            covered.extend_from_slice(&[0, 0, 0, 58]);
        }
        covered.extend_from_slice(&frame[at..]);
        covered
    }

    /// The quoted packet of an ICMP error, as a frame of its own (so that [`l4`] and the
    /// checksum checks of TCP segments read it).
    fn quoted(frame: &[u8]) -> Vec<u8> {
        let mut out = frame[..L3].to_vec();
        let ethertype = if frame[12..14] == [0x86, 0xdd] {
            0x86dd
        } else {
            0x0800u16
        };
        out[12..14].copy_from_slice(&ethertype.to_be_bytes());
        out.extend_from_slice(&frame[icmp_at(frame) + 8..]);
        out
    }

    /// Asserts that the ICMP error `out` is `expected` but for checksum fields, that its
    /// ICMP checksum and the quoted IPv4 header's are right. The quoted TCP checksum is
    /// left as it was: the kernel reads only the quoted ports and sequence number.
    fn assert_icmp_translated(out: &[u8], expected: &[u8]) {
        let mask = |frame: &[u8]| {
            let mut m = frame.to_vec();
            let at = icmp_at(frame);
            m[at + 2..at + 4].fill(0);
            let q = quoted(frame);
            let quoted_l4 = at + 8 + (l4(&q) - L3);
            m[quoted_l4 + 16..quoted_l4 + 18].fill(0);
            if !at_v6(&q) {
                m[at + 8 + 10..at + 8 + 12].fill(0);
            }
            m
        };
        assert_eq!(mask(out), mask(expected), "the translated ICMP error");
        assert_eq!(
            checksum(&icmp_checksummed(out)),
            0,
            "ICMP checksum of {out:02x?}"
        );
        assert!(
            ip_checksum_ok(&quoted(out)),
            "quoted IPv4 header checksum of {out:02x?}"
        );
    }

    /// A router's ICMP error about a steered flow's packet to B reaches the socket as one
    /// about its packet to A, on `lo`'s egress and on a device's ingress.
    fn icmp_about_the_new_backend(flow: Flow, kind: u8, code: u8) {
        let router: IpAddr = match flow.client.ip() {
            IpAddr::V4(_) => "192.0.2.1".parse().unwrap(),
            IpAddr::V6(_) => "2001:db8::1".parse().unwrap(),
        };
        let data = |to| packet(flow.client, to, TCP_ACK, &[0x5a; 1300]);
        let error = icmp_error(router, flow.client.ip(), kind, code, &data(flow.new));
        let translated = icmp_error(router, flow.client.ip(), kind, code, &data(flow.old));
        let mut h = Harness::new();
        h.steer(flow, 1);
        let (verdict, out) = h.run(&error);
        assert_eq!(verdict, NEXT);
        assert_icmp_translated(&out, &translated);
        on_a_device_of_a_new_namespace(|ifindex| {
            let (verdict, out) = h.run_program(programs::STEER_INGRESS, &error, Some(ifindex));
            assert_eq!(verdict, NEXT);
            assert_icmp_translated(&out, &translated);
        });
        assert_eq!(h.counter(steer::ICMP_TRANSLATED), 2);
        assert_eq!(h.counter(steer::LATE_DROPPED), 0);
    }

    #[test]
    fn ipv4_fragmentation_needed_for_the_new_backend_reaches_the_socket_as_for_the_old() {
        icmp_about_the_new_backend(v4_flow(), ICMP_UNREACHABLE, ICMP_FRAGMENTATION_NEEDED);
    }

    #[test]
    fn ipv6_packet_too_big_for_the_new_backend_reaches_the_socket_as_for_the_old() {
        icmp_about_the_new_backend(v6_flow(), ICMPV6_PACKET_TOO_BIG, 0);
    }

    #[test]
    fn ipv6_unreachable_for_the_new_backend_reaches_the_socket_as_for_the_old() {
        icmp_about_the_new_backend(v6_flow(), ICMPV6_UNREACHABLE, 3);
    }

    #[test]
    fn a_backend_on_the_same_port_changes_only_the_quoted_address() {
        let mut flow = v4_flow();
        flow.new.set_port(flow.old.port());
        icmp_about_the_new_backend(flow, ICMP_UNREACHABLE, ICMP_HOST_UNREACHABLE);
    }

    /// An error about the flow's old SYNs to A (a host unreachable once neighbour
    /// resolution gives up) would abort the steered handshake: dropped, as a late packet.
    #[test]
    fn an_icmp_error_about_the_abandoned_backend_is_dropped_as_late() {
        for (flow, kind, code) in [
            (v4_flow(), ICMP_UNREACHABLE, ICMP_HOST_UNREACHABLE),
            (v6_flow(), ICMPV6_UNREACHABLE, 3),
        ] {
            let mut h = Harness::new();
            h.steer(flow, 1);
            let syn = packet(flow.client, flow.old, TCP_SYN, b"");
            let error = icmp_error(flow.client.ip(), flow.client.ip(), kind, code, &syn);
            assert_eq!(h.run(&error).0, DROP);
            assert_eq!(h.counter(steer::LATE_DROPPED), 1);
            assert_eq!(h.counter(steer::ICMP_TRANSLATED), 0);
        }
    }

    /// Errors about other flows, and ICMP that is no error, pass untouched.
    #[test]
    fn other_icmp_is_left_alone() {
        let flow = v4_flow();
        let mut h = Harness::new();
        h.steer(flow, 1);
        let router: IpAddr = "192.0.2.1".parse().unwrap();
        let other: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let to_other = packet(flow.client, other, TCP_SYN, b"");
        let to_new = packet(flow.client, flow.new, TCP_SYN, b"");
        for icmp in [
            icmp_error(router, flow.client.ip(), ICMP_UNREACHABLE, 1, &to_other),
            // An echo request's payload that happens to look like a quote.
            icmp_error(router, flow.client.ip(), ICMP_ECHO_REQUEST, 0, &to_new),
        ] {
            assert_eq!(h.run(&icmp), (NEXT, icmp.clone()));
        }
        assert_eq!(h.counter(steer::ICMP_TRANSLATED), 0);
        assert_eq!(h.counter(steer::LATE_DROPPED), 0);
    }

    #[test]
    fn packets_of_other_flows_are_left_alone() {
        for flow in [v4_flow(), v6_flow()] {
            let mut h = Harness::new();
            h.steer(flow, 1);
            let other_port = |mut addr: SocketAddr| {
                addr.set_port(addr.port() + 1);
                addr
            };
            let stranger: SocketAddr = match flow.client.ip() {
                IpAddr::V4(_) => (Ipv4Addr::new(10, 0, 0, 9), 5555).into(),
                IpAddr::V6(_) => (Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9), 5555).into(),
            };
            let others = [
                // Another socket of the client to A, and to B.
                packet(other_port(flow.client), flow.old, TCP_SYN, b""),
                packet(flow.client, other_port(flow.old), TCP_SYN, b""),
                packet(flow.client, flow.new, TCP_ACK, b"direct"),
                // Replies to another socket, from B and from A.
                packet(flow.new, other_port(flow.client), TCP_SYN | TCP_ACK, b""),
                packet(flow.old, other_port(flow.client), TCP_SYN | TCP_ACK, b""),
                // Someone else.
                packet(stranger, flow.client, TCP_SYN, b""),
                packet(flow.client, stranger, TCP_ACK, b"hi"),
            ];
            for input in others {
                assert_eq!(h.run(&input), (NEXT, input));
            }
            assert_eq!(h.entry(flow).seen, 0);
            assert_eq!(h.counter(steer::LATE_DROPPED), 0);
        }
    }

    /// The agent's sweep: closed flows go after their grace (with their reply entry, if
    /// it is still theirs), open ones are counted, and an open one whose socket origin
    /// is gone is taken as closed now.
    #[test]
    fn the_sweep_deletes_closed_flows_after_their_grace_and_counts_open_ones() {
        let mut harness = Harness::new();
        let mut steering = Steering::start(
            &mut harness.ebpf,
            &SteerOptions::default(),
            Path::new("/nonexistent"),
            false,
        )
        .unwrap();
        let sec = 1_000_000_000u64;
        let now = 1_000 * sec;
        let client = |port: u16| SocketAddr::new("10.0.0.1".parse().unwrap(), port);
        let (old, new) = (
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.3:9090".parse().unwrap(),
        );
        let mut put = |port: u16, closed_at_ns: u64, cookie: u64| {
            let mut entry = steer_entry(new, 1);
            entry.steered_at_ns = now - 100 * sec;
            entry.closed_at_ns = closed_at_ns;
            entry.cookie = cookie;
            steering
                .flows
                .insert(flow_key(client(port), old), entry, 0)
                .unwrap();
            let back = SteerBack {
                from: words(old.ip()),
                from_port: old.port().to_be(),
                pad: 0,
            };
            steering
                .back
                .insert(flow_key(client(port), new), back, 0)
                .unwrap();
            steering
                .control
                .set(steer::INSERTED, u64::from(port) - 40_000 + 1, 0)
                .unwrap();
        };
        put(40_000, now - 61 * sec, 1); // closed past its grace
        put(40_001, now - 10 * sec, 2); // closed, in its grace
        put(40_002, 0, 3); // open, its socket known
        put(40_003, 0, 4); // open, its origin gone
        let known = |cookie: u64| cookie != 4;

        let sweep = steering.sweep(now, known).unwrap();
        assert_eq!(sweep.removed, 1);
        assert_eq!(sweep.live.get(&(11, 7)), Some(&1), "{:?}", sweep.live);
        assert_eq!(sweep.entries, 3);
        assert!(steering
            .flows
            .get(&flow_key(client(40_000), old), 0)
            .is_err());
        assert!(steering
            .back
            .get(&flow_key(client(40_000), new), 0)
            .is_err());
        assert!(steering.back.get(&flow_key(client(40_001), new), 0).is_ok());
        let orphan = steering
            .flows
            .get(&flow_key(client(40_003), old), 0)
            .unwrap();
        assert_eq!(
            orphan.closed_at_ns, now,
            "an orphan is closed as of this sweep"
        );
        let counters = steering.counters().unwrap();
        assert_eq!(counters[steer::REMOVED as usize], 1);
        assert_eq!(counters[steer::INSERTED as usize], 4);

        // 61 s on, the one in its grace and the orphan go too; the open one stays.
        let sweep = steering.sweep(now + 61 * sec, known).unwrap();
        assert_eq!(sweep.removed, 2);
        assert_eq!(sweep.entries, 1);
        assert_eq!(steering.counters().unwrap()[steer::REMOVED as usize], 3);
        assert!(steering
            .flows
            .get(&flow_key(client(40_002), old), 0)
            .is_ok());
    }

    /// A reply entry that another flow took over (the same client port, the same new
    /// backend) is not deleted with the closed flow.
    #[test]
    fn the_sweep_leaves_a_reply_entry_that_names_another_flow() {
        let mut harness = Harness::new();
        let mut steering = Steering::start(
            &mut harness.ebpf,
            &SteerOptions::default(),
            Path::new("/nonexistent"),
            false,
        )
        .unwrap();
        let sec = 1_000_000_000u64;
        let client = SocketAddr::new("10.0.0.1".parse().unwrap(), 40_000);
        let (old, new): (SocketAddr, SocketAddr) = (
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.3:9090".parse().unwrap(),
        );
        let mut entry = steer_entry(new, 1);
        entry.closed_at_ns = 1;
        steering
            .flows
            .insert(flow_key(client, old), entry, 0)
            .unwrap();
        let other = SteerBack {
            from: words("10.0.0.9".parse().unwrap()),
            from_port: 80u16.to_be(),
            pad: 0,
        };
        steering
            .back
            .insert(flow_key(client, new), other, 0)
            .unwrap();
        steering.control.set(steer::INSERTED, 1, 0).unwrap();
        let sweep = steering.sweep(100 * sec, |_| true).unwrap();
        assert_eq!(sweep.removed, 1);
        assert_eq!(steering.back.get(&flow_key(client, new), 0).unwrap(), other);
    }

    /// Real sockets on loopback (`127.0.NET.x`): the new backend (`.3`) listens, and a
    /// connection from the flow's local address and port (`.1`) to it exists; the flow's
    /// first pick is `.2`.
    fn connected_flow(net: u8) -> (std::net::TcpListener, socket2::Socket, Flow) {
        let listener = std::net::TcpListener::bind(format!("127.0.{net}.3:0")).unwrap();
        let new = listener.local_addr().unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let local: SocketAddr = format!("127.0.{net}.1:0").parse().unwrap();
        socket.bind(&local.into()).unwrap();
        socket.connect(&new.into()).unwrap();
        let flow = Flow {
            client: socket.local_addr().unwrap().as_socket().unwrap(),
            old: format!("127.0.{net}.2:8080").parse().unwrap(),
            new,
        };
        (listener, socket, flow)
    }

    /// A flow whose new 4-tuple is already a connection of this host (the same local
    /// address and port, to the new backend) is not translated: its entry is undone and
    /// counted, its reply entry dropped. The same packet with no such connection is.
    #[test]
    fn a_new_4_tuple_that_is_already_a_connection_here_is_not_translated() {
        let mut h = Harness::new();
        let (listener, socket, flow) = connected_flow(77);
        h.steer(flow, 1);
        let syn = packet(flow.client, flow.old, TCP_SYN, b"");
        let (verdict, out) = h.run(&syn);
        assert_eq!(verdict, NEXT);
        assert_eq!(out, syn, "not translated");
        assert_eq!(h.entry(flow).seen, 2, "undone: marked as collided");
        assert_eq!(h.counter(steer::COLLISIONS), 1);
        assert!(h.back().get(&flow_key(flow.client, flow.new), 0).is_err());

        // Once that connection is gone (closed with a reset, so it leaves no TIME_WAIT),
        // the same flow is translated.
        socket.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(socket);
        h.steer(flow, 1);
        let (verdict, out) = h.run(&syn);
        assert_eq!(verdict, NEXT);
        assert_translated(&out, &packet(flow.client, flow.new, TCP_SYN, b""));
        assert_eq!(h.entry(flow).seen, 1);
        assert_eq!(h.counter(steer::COLLISIONS), 1);
        drop(listener);
    }

    /// A SYN-ACK from the new backend to a port a closed steered flow used, answering a
    /// new connection of this host from that port, is that connection's: it is not
    /// translated and the stale reply entry goes (the bench saw every retry of such a
    /// connect reset by the client until it timed out).
    #[test]
    fn a_syn_ack_for_a_new_connection_of_this_host_is_not_translated() {
        let mut h = Harness::new();
        let (listener, socket, flow) = connected_flow(78);
        h.steer(flow, 1);
        let syn_ack = packet(flow.new, flow.client, TCP_SYN | TCP_ACK, b"");
        let (verdict, out) = h.run(&syn_ack);
        assert_eq!(verdict, NEXT);
        assert_eq!(out, syn_ack, "not translated");
        assert!(h.back().get(&flow_key(flow.client, flow.new), 0).is_err());
        assert_eq!(h.counter(steer::COLLISIONS), 1);

        // With no such connection, the same SYN-ACK is the steered flow's own.
        socket.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(socket);
        h.steer(flow, 1);
        let (verdict, out) = h.run(&syn_ack);
        assert_eq!(verdict, NEXT);
        assert_translated(&out, &packet(flow.old, flow.client, TCP_SYN | TCP_ACK, b""));
        drop(listener);
    }
}
