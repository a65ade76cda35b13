//! SYN steering's userspace half: attaches the tc program `detour_steer` where steered
//! flows run, turns steering on in the kernel, and deletes the translations of flows
//! that closed once their grace period is over.
//!
//! What steering is (the programs' module doc has the kernel side): when a rewritten
//! socket's SYN goes unanswered for its handshake timeout, `sock_ops` picks another
//! backend and records a per-flow translation; `detour_steer` rewrites that flow's
//! packets (destination out, source back) for its whole life. The application's connect
//! takes one handshake timeout longer instead of failing.
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
//! What is not done yet (issue 9): ICMP errors inside steered flows are not translated;
//! a backend reached through another device than the connect's pick is not redirected to
//! it (`bpf_redirect_neigh`); pods' own namespaces are attached to only when named with
//! `--steer-netns`.

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
        let program: &mut SchedClassifier = ebpf
            .program_mut(programs::STEER)
            .ok_or_else(|| format!("the object has no program {}", programs::STEER))?
            .try_into()
            .map_err(|e| format!("{}: {e}", programs::STEER))?;
        program
            .load()
            .map_err(|e| format!("loading {}: {e}", programs::STEER))?;
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
                for &direction in directions(device) {
                    let attachment = attach_in(program, netns, device, direction, links_dir, tcx)?;
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
    pub fn sweep(&mut self, now_ns: u64) -> Result<Sweep, MapOpError> {
        let err = |op: &'static str| {
            move |e: aya::maps::MapError| MapOpError {
                map: maps::STEER,
                op,
                reason: e.to_string(),
            }
        };
        let mut sweep = Sweep::default();
        let mut expired = Vec::new();
        for item in self.flows.iter() {
            let (key, entry) = match item {
                Ok(kv) => kv,
                // Deleted under the iteration by a recycling socket: skip it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(err("iterate")(e)),
            };
            sweep.entries += 1;
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

/// Where on `device` the program runs. A flow's packets leave by egress and its replies
/// arrive by ingress; on `lo` every packet passes egress and then ingress, so egress
/// alone sees both directions, and an ingress program would see its own translations
/// (a reply already given A's address looks like a late packet from A).
fn directions(device: &str) -> &'static [TcAttachType] {
    if device == "lo" {
        &[TcAttachType::Egress]
    } else {
        &[TcAttachType::Egress, TcAttachType::Ingress]
    }
}

/// Attaches `program` to `device` in `netns` (the agent's own when `None`), replacing
/// what an earlier agent left there.
fn attach_in(
    program: &mut SchedClassifier,
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
    let what = format!(
        "{} on {device} {dir} in netns {netns_name}",
        programs::STEER
    );
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
            match tc::qdisc_detach_program(device, direction, programs::STEER) {
                Ok(()) => {}
                Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!("{what}: removing the previous filter: {e}"),
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
