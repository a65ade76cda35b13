//! The agent's main loop: one task owns the configuration, the health verdicts, the
//! reconciler and the maps; everything else talks to it through channels.
//!
//! Invariants:
//! - the configuration in force is always one that parsed and validated; a bad file on
//!   reload is logged with its field and line and the running state keeps serving;
//! - every change (config, health, ejection, restoration, release timer) ends in one
//!   `apply`, which diffs and writes only what changed;
//! - the kernel's suspect mark of a backend stands only while some service has it
//!   ejected: a mark the agent does not confirm (the tier's ejection cap was reached) is
//!   cleared as soon as its event is read, and every restoration clears it;
//! - the API socket is bound only after the first apply, so "socket answers" means "the
//!   kernel serves the configuration";
//! - leaving the loop (SIGTERM, SIGINT) never detaches the programs: they stay pinned.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use clap::Args;
use detour_agent::api::{self, EndpointView, EventView, Request, Response, ServiceView};
use detour_agent::config::{self, Config, HealthCheckKind};
use detour_agent::dataplane::{find_cgroup2_mount, Dataplane, LoadOptions};
use detour_agent::desired::{self, FrontendPlan};
use detour_agent::health::{self, Health, HealthChange, ProbeKind, ProbeSpec, Thresholds};
use detour_agent::metrics::{self, BackendMetrics, Histogram, ServiceMetrics, Snapshot};
use detour_agent::outlier::Event as OutlierEvent;
use detour_agent::passive::{self, PassiveHealth};
use detour_agent::reconcile::Reconciler;
use detour_agent::selection::Tier;
use detour_agent::sockdiag::{self, Which};
use detour_ebpf::ConnEvent;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Standalone YAML configuration (services, endpoints, node locality).
    #[arg(long)]
    config: PathBuf,
    /// cgroup v2 directory to attach to; default: the cgroup v2 mount from /proc/mounts.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/detour")]
    bpffs: PathBuf,
    /// Unix socket for the CLI.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// How often the config file is checked for changes (SIGHUP reloads at once).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    config_poll: Duration,
    #[arg(long, default_value_t = detour_ebpf::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    #[arg(long, default_value_t = detour_ebpf::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    #[arg(long, default_value_t = detour_ebpf::DEFAULT_MAX_TABLE_SLOTS)]
    max_slots: u32,
    /// Connected sockets whose VIP `getpeername` remembers (the oldest are forgotten).
    #[arg(long, default_value_t = detour_ebpf::DEFAULT_MAX_SOCKETS)]
    max_sockets: u32,
    /// Where Prometheus scrapes `/metrics` (port 0: any free port, logged at start).
    #[arg(long, default_value = "127.0.0.1:9474")]
    metrics_address: SocketAddr,
}

type ApiCall = (Request, oneshot::Sender<Response>);

/// Probe tasks by (service, target), with the spec they run so a change restarts them.
#[derive(Default)]
struct Probes {
    running: HashMap<(String, SocketAddr), (ProbeSpec, JoinHandle<()>)>,
}

impl Probes {
    /// Starts, restarts and stops probe tasks so they match `config`; forgets the health
    /// of targets that are no longer probed.
    fn sync(
        &mut self,
        config: &Config,
        changes: &mpsc::Sender<HealthChange>,
        health: &mut HashMap<(String, SocketAddr), (Health, Option<String>)>,
    ) {
        let mut wanted = HashMap::new();
        for service in &config.services {
            let hc = &service.health_check;
            let kind = match &hc.kind {
                HealthCheckKind::Tcp => Some(ProbeKind::Tcp),
                HealthCheckKind::Http(check) => Some(ProbeKind::Http(check.clone())),
                HealthCheckKind::Grpc(check) => Some(ProbeKind::Grpc(check.clone())),
                HealthCheckKind::None => None,
            };
            let spec = kind.map(|kind| ProbeSpec {
                interval: hc.interval,
                timeout: hc.timeout,
                thresholds: Thresholds {
                    healthy: hc.healthy_threshold,
                    unhealthy: hc.unhealthy_threshold,
                },
                kind,
            });
            for target in desired::targets(service) {
                wanted.insert((service.name.clone(), target), spec.clone());
            }
        }
        self.running.retain(|key, (spec, task)| {
            let keep = wanted.get(key).is_some_and(|w| w.as_ref() == Some(spec));
            if !keep {
                task.abort();
            }
            keep
        });
        health.retain(|key, _| wanted.contains_key(key));
        for (key, spec) in wanted {
            match spec {
                None => {
                    health.insert(key, (Health::Unchecked, None));
                }
                Some(spec) if !self.running.contains_key(&key) => {
                    health.insert(key.clone(), (Health::Unknown, None));
                    let task =
                        health::spawn_probe(key.0.clone(), key.1, spec.clone(), changes.clone());
                    self.running.insert(key, (spec, task));
                }
                Some(_) => {}
            }
        }
    }
}

struct Agent {
    config_path: PathBuf,
    config: Config,
    config_text: String,
    /// The last file content that failed to parse, so a bad file is reported once.
    rejected_text: Option<String>,
    /// What the config file looked like when last read; the poll reads it again only
    /// when this changes, so a large file costs a `stat` per poll, not a read.
    config_stamp: Option<FileStamp>,
    dataplane: Dataplane,
    reconciler: Reconciler,
    health: HashMap<(String, SocketAddr), (Health, Option<String>)>,
    probes: Probes,
    plans: Vec<FrontendPlan>,
    changes: mpsc::Sender<HealthChange>,
    passive: PassiveHealth,
    /// Kernel ids → names, rebuilt after every apply.
    service_of_id: HashMap<u32, String>,
    backend_of_id: HashMap<u32, SocketAddr>,
    /// What `detour events` streams.
    events: broadcast::Sender<EventView>,
    /// The cgroup the programs are attached to: whose sockets detour may destroy.
    cgroup: PathBuf,
    /// Finished socket destructions come back here.
    destroyed: mpsc::UnboundedSender<Destroyed>,
    counters: Counters,
}

/// What the agent counts itself, for metrics.
#[derive(Default)]
struct Counters {
    events_received: u64,
    config_reloads_ok: u64,
    config_reloads_failed: u64,
    sockets_destroyed: u64,
    reconcile: Histogram,
}

/// The outcome of destroying the sockets of one backend of one service.
struct Destroyed {
    service: String,
    backend: SocketAddr,
    why: &'static str,
    report: Result<sockdiag::DestroyReport, String>,
}

/// Enough of a file's metadata to notice a write or a replacement (rename over it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))
}

fn parse_config(path: &Path, text: &str) -> anyhow::Result<Config> {
    let config = config::parse(text).with_context(|| format!("config {}", path.display()))?;
    for warning in config.warnings() {
        warn!(config = %path.display(), %warning, "configuration accepted with a warning");
    }
    Ok(config)
}

impl Agent {
    fn apply(&mut self) {
        let started = Instant::now();
        let health = &self.health;
        let passive = &self.passive;
        let plans = desired::plan(
            &self.config,
            |service, target| {
                health
                    .get(&(service.to_string(), target))
                    .map_or(Health::Unknown, |(h, _)| *h)
            },
            |service, target| passive.is_ejected(service, target),
        );
        let tiers_before: HashMap<SocketAddr, &Option<Tier>> =
            self.plans.iter().map(|p| (p.frontend, &p.tier)).collect();
        let mut tier_events = Vec::new();
        for plan in &plans {
            if tiers_before.get(&plan.frontend) != Some(&&plan.tier) {
                let tier = tier_name(plan);
                info!(service = %plan.service, frontend = %plan.frontend, %tier, backends = plan.table.len(), "tier selected");
                tier_events.push((
                    plan.service.clone(),
                    format!("{}: {tier}, {} slots", plan.frontend, plan.table.len()),
                ));
            }
        }
        for (service, detail) in tier_events {
            self.publish("tier-changed", &service, None, detail);
        }
        let report = self.reconciler.apply(
            &mut self.dataplane,
            &desired::desired(&plans),
            Instant::now(),
        );
        self.counters.reconcile.observe(started.elapsed());
        for e in &report.errors {
            error!(error = %e, "could not program a frontend; it keeps its previous table");
        }
        if report.added + report.switched + report.removed > 0 {
            info!(
                added = report.added,
                switched = report.switched,
                removed = report.removed,
                "maps updated"
            );
        }
        self.plans = plans;
        self.service_of_id = self
            .plans
            .iter()
            .filter_map(|p| Some((self.reconciler.service_id(&p.frontend)?, p.service.clone())))
            .collect();
        self.backend_of_id = self
            .reconciler
            .backend_ids()
            .map(|(addr, id)| (id, addr))
            .collect();
    }

    /// Sends an event to `detour events` streams (if any) and nowhere else: callers log.
    fn publish(&self, kind: &str, service: &str, backend: Option<SocketAddr>, detail: String) {
        let _ = self.events.send(EventView {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            kind: kind.to_string(),
            service: service.to_string(),
            backend,
            detail,
        });
    }

    /// A batch of connection outcomes from the kernel.
    fn on_kernel_events(&mut self, batch: Vec<ConnEvent>) {
        let now = Instant::now();
        self.counters.events_received += batch.len() as u64;
        let mut changed = false;
        for event in batch {
            let (Some(service), Some(&target)) = (
                self.service_of_id.get(&event.service_id).cloned(),
                self.backend_of_id.get(&event.backend_id),
            ) else {
                // A frontend or backend removed since the connect: nothing to judge.
                continue;
            };
            let kind = passive::kind_name(event.kind);
            let detail = match event.kind {
                detour_ebpf::event_kind::ESTABLISHED => {
                    format!("handshake completed in {}µs", event.rtt_us)
                }
                detour_ebpf::event_kind::RESET => "established connection reset".to_string(),
                detour_ebpf::event_kind::SYN_RETRANSMIT => format!(
                    "SYN unanswered, retransmitted{}",
                    if event.marked_suspect != 0 {
                        "; kernel marked it suspect"
                    } else {
                        ""
                    }
                ),
                _ => format!(
                    "{} in a row{}",
                    event.fail_streak,
                    if event.marked_suspect != 0 {
                        "; kernel marked it suspect"
                    } else {
                        ""
                    }
                ),
            };
            self.publish(kind, &service, Some(target), detail);
            if let Some(outcome) = passive::outcome(event.kind) {
                match self.passive.observe(&service, target, outcome, now) {
                    Some(OutlierEvent::Ejected {
                        until,
                        ejection_count,
                        kind,
                        ..
                    }) => {
                        let secs = until.saturating_duration_since(now).as_secs_f64();
                        warn!(%service, backend = %target, %kind, ejection = ejection_count, seconds = secs, "backend ejected");
                        self.publish(
                            "ejected",
                            &service,
                            Some(target),
                            format!("{kind}; ejection {ejection_count}, for {secs:.0}s"),
                        );
                        self.terminate(&service, target, "ejected");
                        changed = true;
                    }
                    Some(OutlierEvent::EjectionSkipped { kind, reason, .. }) => {
                        warn!(%service, backend = %target, %kind, %reason, "backend not ejected");
                        self.publish(
                            "ejection-skipped",
                            &service,
                            Some(target),
                            format!("{kind}; {reason}"),
                        );
                    }
                    Some(OutlierEvent::Restored { .. }) | None => {}
                }
            }
            // The kernel's mark stands while the backend is ejected, and while a first
            // SYN retransmission awaits its outcome; a success or a failure run the
            // agent does not eject for lifts it.
            let settles = event.kind == detour_ebpf::event_kind::ESTABLISHED
                || (event.marked_suspect != 0
                    && event.kind != detour_ebpf::event_kind::SYN_RETRANSMIT);
            if settles && !self.passive.is_ejected_anywhere(target) {
                self.clear_suspect(event.backend_id, target);
            }
        }
        if changed {
            self.apply();
        }
    }

    /// Destroys, in the background, the sockets detour rewrote to `target` for
    /// `service` (established and still connecting), if the service wants that.
    fn terminate(&self, service: &str, target: SocketAddr, why: &'static str) {
        let Some(config) = self.config.service(service) else {
            return;
        };
        if !config.terminate_connections {
            return;
        }
        let frontends: BTreeSet<u32> = self
            .plans
            .iter()
            .filter(|p| p.service == service)
            .filter_map(|p| self.reconciler.service_id(&p.frontend))
            .collect();
        let Some(backend_id) = self.reconciler.backend_id(&target) else {
            return;
        };
        let origins = match self.dataplane.origins() {
            Ok(origins) => origins,
            Err(e) => {
                error!(%service, backend = %target, error = %e, "cannot destroy its sockets");
                return;
            }
        };
        let (cgroup, done) = (self.cgroup.clone(), self.destroyed.clone());
        let service = service.to_string();
        tokio::task::spawn_blocking(move || {
            // Only sockets detour rewrote, for this service, to this backend; each is
            // marked first so the kernel does not count its end as a failure.
            let origins = std::cell::RefCell::new(origins);
            let ours = |cookie: u64| {
                let ours = origins.borrow().get(cookie).is_some_and(|o| {
                    o.backend_id == backend_id && frontends.contains(&o.service_id)
                });
                ours && origins.borrow_mut().mark_destroyed(cookie)
            };
            let report = sockdiag::destroy_in_cgroup(&cgroup, &[target], Which::Both, &ours)
                .map_err(|e| e.to_string());
            let _ = done.send(Destroyed {
                service,
                backend: target,
                why,
                report,
            });
        });
    }

    fn on_destroyed(&mut self, done: Destroyed) {
        let Destroyed {
            service,
            backend,
            why,
            report,
        } = done;
        match report {
            Ok(report) => {
                self.counters.sockets_destroyed += report.destroyed as u64;
                for e in &report.namespace_errors {
                    warn!(%service, %backend, error = %e, "could not search a network namespace for sockets");
                }
                for (cookie, e) in &report.failed {
                    warn!(%service, %backend, cookie, error = %e, "could not destroy a socket");
                }
                if report.destroyed > 0 {
                    info!(%service, %backend, why, destroyed = report.destroyed, namespaces = report.namespaces, "sockets destroyed");
                    self.publish(
                        "sockets-destroyed",
                        &service,
                        Some(backend),
                        format!("{} ({why})", report.destroyed),
                    );
                }
            }
            Err(e) => error!(%service, %backend, error = %e, "could not destroy sockets"),
        }
    }

    fn clear_suspect(&mut self, id: u32, target: SocketAddr) {
        if let Err(e) = self.dataplane.clear_suspect(id) {
            error!(backend = %target, error = %e, "could not clear the kernel's suspect mark");
        }
    }

    /// Restorations whose time has come.
    fn on_outlier_deadline(&mut self) {
        let restored = self.passive.advance(Instant::now());
        for (service, event) in &restored {
            if let OutlierEvent::Restored { key } = event {
                self.on_restored(service, *key, "ejection time over");
            }
        }
        if !restored.is_empty() {
            self.apply();
        }
    }

    fn on_restored(&mut self, service: &str, target: SocketAddr, why: &str) {
        info!(%service, backend = %target, why, "backend restored");
        self.publish("restored", service, Some(target), why.to_string());
        if !self.passive.is_ejected_anywhere(target) {
            if let Some(id) = self.reconciler.backend_id(&target) {
                self.clear_suspect(id, target);
            }
        }
    }

    /// An active health check changed its verdict.
    fn on_health_change(&mut self, change: HealthChange) {
        let key = (change.service.clone(), change.target);
        // A change from a probe that a reload just stopped is stale: ignore it.
        let Some(entry) = self.health.get_mut(&key) else {
            return;
        };
        let before = entry.0;
        *entry = (change.health, change.last_error.clone());
        if before.usable() && !change.health.usable() {
            self.terminate(&change.service, change.target, "failed its health check");
        }
        if before != change.health {
            self.publish(
                "health-changed",
                &change.service,
                Some(change.target),
                format!(
                    "{before} -> {}{}",
                    change.health,
                    change
                        .last_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
            );
        }
        // Envoy's successful_active_health_check_uneject_host: a passing active check
        // ends an ejection.
        if change.health == Health::Healthy
            && self
                .passive
                .restore(&change.service, change.target, Instant::now())
                .is_some()
        {
            self.on_restored(&change.service, change.target, "active health check passed");
        }
        self.apply();
    }

    /// Re-reads the config file; keeps the running config when the new one is bad.
    /// Reloads if the file's metadata changed since it was last read.
    fn poll_config(&mut self) {
        let now = stamp(&self.config_path);
        if now.is_some() && now != self.config_stamp {
            self.reload("file changed");
        }
    }

    fn reload(&mut self, why: &str) {
        // Stamped before reading: a write landing during the read changes the stamp
        // again, so the next poll reads once more.
        self.config_stamp = stamp(&self.config_path);
        let parsed = read_text(&self.config_path).and_then(|text| {
            if text == self.config_text || self.rejected_text.as_ref() == Some(&text) {
                return Ok(None);
            }
            match parse_config(&self.config_path, &text) {
                Ok(config) => Ok(Some((text, config))),
                Err(e) => {
                    self.rejected_text = Some(text);
                    Err(e)
                }
            }
        });
        match parsed {
            Ok(None) => {}
            Ok(Some((text, config))) => {
                info!(
                    why,
                    services = config.services.len(),
                    "configuration reloaded"
                );
                let removed: Vec<(String, SocketAddr)> = self
                    .config
                    .services
                    .iter()
                    .flat_map(|old| {
                        let new = config.service(&old.name);
                        desired::targets(old)
                            .filter(move |t| {
                                new.is_none_or(|n| !desired::targets(n).any(|x| x == *t))
                            })
                            .map(|t| (old.name.clone(), t))
                    })
                    .collect();
                // Destroyed with the old plans' frontend ids, before the apply forgets
                // them; the backend ids outlive the apply by the release delay.
                for (service, target) in &removed {
                    self.terminate(service, *target, "removed");
                }
                self.counters.config_reloads_ok += 1;
                self.config = config;
                self.config_text = text;
                self.rejected_text = None;
                self.probes
                    .sync(&self.config, &self.changes, &mut self.health);
                self.passive.sync(&self.config);
                self.apply();
            }
            Err(e) => {
                self.counters.config_reloads_failed += 1;
                error!(why, error = %format!("{e:#}"), "configuration rejected; still serving the previous one");
            }
        }
    }

    fn answer(&self, request: Request) -> Response {
        match request {
            Request::Services => Response::Services(self.service_views()),
            // Streams are served by `serve_api` itself.
            Request::Events => Response::Error("events are streamed, not answered".into()),
            Request::Endpoints { service } => {
                if let Some(name) = &service {
                    if !self.config.services.iter().any(|s| &s.name == name) {
                        return Response::Error(format!("no service named {name:?}"));
                    }
                }
                Response::Endpoints(self.endpoint_views(service.as_deref()))
            }
        }
    }

    fn stats(&self, target: &SocketAddr) -> detour_ebpf::BackendStats {
        self.reconciler
            .backend_id(target)
            .and_then(|id| self.dataplane.backend_stats(id).ok())
            .unwrap_or_default()
    }

    fn connects(&self, target: &SocketAddr) -> u64 {
        self.stats(target).connects
    }

    /// Whether the kernel currently avoids `target` on its own.
    fn kernel_suspect(&self, target: &SocketAddr) -> bool {
        let Some(state) = self
            .reconciler
            .backend_id(target)
            .and_then(|id| self.dataplane.backend_state(id).ok())
        else {
            return false;
        };
        let now = monotonic_ns();
        state.suspect_until_ns > now || state.soft_until_ns > now
    }

    fn service_views(&self) -> Vec<ServiceView> {
        // One row per (service, port), in config order; several VIPs share the row.
        let mut views: Vec<ServiceView> = Vec::new();
        let mut row_of: HashMap<(&str, u16), usize> = HashMap::new();
        let mut targets: Vec<BTreeSet<SocketAddr>> = Vec::new();
        for plan in &self.plans {
            let tier = tier_name(plan);
            let row = *row_of
                .entry((plan.service.as_str(), plan.port))
                .or_insert_with(|| {
                    views.push(ServiceView {
                        name: plan.service.clone(),
                        port: plan.port,
                        vips: Vec::new(),
                        tier: String::new(),
                        endpoints: 0,
                        healthy: 0,
                        in_table: 0,
                        connects: 0,
                    });
                    targets.push(BTreeSet::new());
                    views.len() - 1
                });
            let v = &mut views[row];
            v.vips.push(plan.frontend.to_string());
            if v.tier.is_empty() {
                v.tier = tier;
            } else if !v.tier.split(',').any(|t| t == tier) {
                v.tier = format!("{},{tier}", v.tier);
            }
            v.endpoints += plan.endpoints.len();
            // Usable: not failing its active check and not ejected.
            v.healthy += plan
                .endpoints
                .iter()
                .filter(|e| e.health.usable() && !e.ejected)
                .count();
            v.in_table += plan.endpoints.iter().filter(|e| e.in_table).count();
            targets[row].extend(plan.endpoints.iter().map(|e| e.target));
        }
        for (v, targets) in views.iter_mut().zip(&targets) {
            v.connects = targets.iter().map(|t| self.connects(t)).sum();
        }
        views
    }

    fn endpoint_views(&self, service: Option<&str>) -> Vec<EndpointView> {
        let now = Instant::now();
        self.plans
            .iter()
            .filter(|p| service.is_none_or(|s| s == p.service))
            .flat_map(|p| {
                p.endpoints.iter().map(move |e| {
                    let stats = self.stats(&e.target);
                    let outlier = self.passive.state(&p.service, e.target);
                    let ejected = outlier.filter(|o| o.is_ejected());
                    EndpointView {
                        service: p.service.clone(),
                        port: p.port,
                        address: e.target,
                        locality: e.locality.clone(),
                        health: e.health.to_string(),
                        weight: e.weight,
                        tier: e.tier.to_string(),
                        in_table: e.in_table,
                        connects: stats.connects,
                        last_error: self
                            .health
                            .get(&(p.service.clone(), e.target))
                            .and_then(|(_, err)| err.clone()),
                        outlier: if ejected.is_some() {
                            "EJECTED"
                        } else if self.kernel_suspect(&e.target) {
                            "SUSPECT"
                        } else {
                            "OK"
                        }
                        .to_string(),
                        ejected_for_ms: ejected
                            .map(|o| o.time_left(now).as_millis().try_into().unwrap_or(u64::MAX)),
                        ejections: outlier.map_or(0, |o| o.ejections_total),
                        consecutive_failures: outlier.map_or(0, |o| o.consecutive_failures),
                        established: stats.established,
                        refused: stats.refused,
                        timeouts: stats.timeouts,
                        resets: stats.resets,
                    }
                })
            })
            .collect()
    }
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads the kernel's ring buffer of connection outcomes and passes them on in batches.
/// Never blocks the kernel: a slow agent only makes the ring fill, and the kernel then
/// drops and counts.
///
/// The kernel wakes this reader only for the events that decide something at once (the
/// first failure of a run, the one that reaches the threshold) or when the ring passes
/// [`detour_ebpf::EVENTS_WAKEUP_BYTES`]; the rest are written without a wakeup, so the
/// reader also polls every [`detour_ebpf::EVENTS_POLL_MS`]. That bounds how late an
/// event that did not wake it is read, and a burst is read in one batch.
fn spawn_event_reader(
    ring: RingBuf<MapData>,
    batches: mpsc::Sender<Vec<ConnEvent>>,
) -> anyhow::Result<JoinHandle<()>> {
    // SAFETY: the AsyncFd owns the ring buffer, so the fd stays open, and is the only
    // one registered for it, for as long as it is registered.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
    let mut poll = tokio::time::interval(Duration::from_millis(detour_ebpf::EVENTS_POLL_MS));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Ok(tokio::spawn(async move {
        loop {
            let batch = tokio::select! {
                guard = ring.readable_mut() => {
                    let Ok(mut guard) = guard else {
                        error!("event ring buffer unreadable; passive health stops");
                        return;
                    };
                    let batch = drain_events(guard.get_inner_mut());
                    // A full batch may have left more behind: stay ready and read again.
                    if batch.len() < MAX_EVENT_BATCH {
                        guard.clear_ready();
                    }
                    batch
                }
                _ = poll.tick() => drain_events(ring.get_mut()),
            };
            if !batch.is_empty() && batches.send(batch).await.is_err() {
                return;
            }
        }
    }))
}

/// Most events passed on in one batch.
const MAX_EVENT_BATCH: usize = 4096;

/// Takes up to [`MAX_EVENT_BATCH`] events off the ring.
fn drain_events(reader: &mut RingBuf<MapData>) -> Vec<ConnEvent> {
    let mut batch = Vec::new();
    while batch.len() < MAX_EVENT_BATCH {
        let Some(item) = reader.next() else { break };
        if item.len() >= std::mem::size_of::<ConnEvent>() {
            // SAFETY: the kernel wrote a whole ConnEvent; it may be unaligned.
            batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
    }
    batch
}

impl Agent {
    fn metrics_snapshot(&self) -> Snapshot {
        let mut backends = Vec::new();
        let mut seen = BTreeSet::new();
        let mut services: Vec<ServiceMetrics> = Vec::new();
        for plan in &self.plans {
            match services.iter_mut().find(|s| s.service == plan.service) {
                Some(s) => {
                    s.backends_in_table +=
                        plan.endpoints.iter().filter(|e| e.in_table).count() as u64
                }
                None => services.push(ServiceMetrics {
                    service: plan.service.clone(),
                    tier: tier_name(plan),
                    panic: plan.tier == Some(Tier::Panic),
                    backends_in_table: plan.endpoints.iter().filter(|e| e.in_table).count() as u64,
                }),
            }
            for e in &plan.endpoints {
                if !seen.insert((plan.service.clone(), e.target)) {
                    continue;
                }
                let stats = self.stats(&e.target);
                let outlier = self.passive.state(&plan.service, e.target);
                backends.push(BackendMetrics {
                    service: plan.service.clone(),
                    backend: e.target.to_string(),
                    locality: e.locality.clone(),
                    connects: stats.connects,
                    established: stats.established,
                    failures_refused: stats.refused,
                    failures_timeout: stats.timeouts,
                    failures_reset: stats.resets,
                    ejections: outlier.map_or(0, |o| u64::from(o.ejections_total)),
                    ejected: e.ejected,
                    healthy: match e.health {
                        Health::Healthy => Some(true),
                        Health::Unhealthy => Some(false),
                        Health::Unknown | Health::Unchecked => None,
                    },
                    in_table: e.in_table,
                });
            }
        }
        let kernel = self.dataplane.counters().unwrap_or_default();
        Snapshot {
            backends,
            services,
            events_dropped: kernel[detour_ebpf::counters::EVENTS_DROPPED as usize],
            events_received: self.counters.events_received,
            reconcile: self.counters.reconcile.clone(),
            config_reloads_ok: self.counters.config_reloads_ok,
            config_reloads_failed: self.counters.config_reloads_failed,
            sockets_destroyed: self.counters.sockets_destroyed,
            fast_path_avoided: kernel[detour_ebpf::counters::SUSPECT_AVOIDED as usize],
            fast_path_standby: kernel[detour_ebpf::counters::STANDBY_USED as usize],
            fast_path_all_suspect: kernel[detour_ebpf::counters::ALL_SUSPECT as usize],
        }
    }
}

fn tier_name(plan: &FrontendPlan) -> String {
    plan.tier
        .as_ref()
        .map_or_else(|| "none".to_string(), ToString::to_string)
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let config_stamp = stamp(&args.config);
    let config_text = read_text(&args.config)?;
    let config = parse_config(&args.config, &config_text)?;
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => find_cgroup2_mount()?,
    };
    let dataplane = Dataplane::load(&LoadOptions {
        cgroup: cgroup.clone(),
        pin_dir: args.bpffs.clone(),
        max_services: args.max_services,
        max_backends: args.max_backends,
        max_slots: args.max_slots,
        max_sockets: args.max_sockets,
    })
    .context("loading the datapath")?;
    let reconciler = Reconciler::restore(&dataplane, args.max_services, args.max_backends)
        .context("restoring state from pinned maps")?;

    let (changes_tx, mut changes_rx) = mpsc::channel::<HealthChange>(1024);
    let (events_tx, _) = broadcast::channel::<EventView>(4096);
    let mut dataplane = dataplane;
    let ring = dataplane
        .take_events()
        .context("the event ring buffer is missing")?;
    let (kernel_tx, mut kernel_rx) = mpsc::channel::<Vec<ConnEvent>>(256);
    let event_reader = spawn_event_reader(ring, kernel_tx)?;
    let (destroyed_tx, mut destroyed_rx) = mpsc::unbounded_channel::<Destroyed>();
    let mut agent = Agent {
        config_path: args.config.clone(),
        config,
        config_text,
        rejected_text: None,
        config_stamp,
        dataplane,
        reconciler,
        health: HashMap::new(),
        probes: Probes::default(),
        plans: Vec::new(),
        changes: changes_tx,
        passive: PassiveHealth::default(),
        service_of_id: HashMap::new(),
        backend_of_id: HashMap::new(),
        events: events_tx,
        cgroup: cgroup.clone(),
        destroyed: destroyed_tx,
        counters: Counters::default(),
    };
    agent
        .probes
        .sync(&agent.config, &agent.changes, &mut agent.health);
    agent.passive.sync(&agent.config);
    agent.apply();
    info!(
        cgroup = %cgroup.display(),
        pins = %args.bpffs.display(),
        services = agent.config.services.len(),
        "agent ready"
    );

    let (api_tx, mut api_rx) = mpsc::channel::<ApiCall>(64);
    let listener = api::bind(&args.socket)?;
    let api_task = tokio::spawn(serve_api(listener, api_tx, agent.events.clone()));
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .with_context(|| format!("binding the metrics address {}", args.metrics_address))?;
    info!(address = %metrics_listener.local_addr()?, "metrics listening");
    let (scrape_tx, mut scrape_rx) = mpsc::channel::<oneshot::Sender<String>>(16);
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, move || {
        let scrape = scrape_tx.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            if scrape.send(tx).await.is_err() {
                return String::new();
            }
            rx.await.unwrap_or_default()
        }
    }));

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut poll = tokio::time::interval(args.config_poll);
    let mut release = tokio::time::interval(Duration::from_secs(1));
    loop {
        let outlier_deadline = agent.passive.next_deadline();
        tokio::select! {
            Some(batch) = kernel_rx.recv() => agent.on_kernel_events(batch),
            Some(done) = destroyed_rx.recv() => agent.on_destroyed(done),
            Some(reply) = scrape_rx.recv() => {
                let _ = reply.send(metrics::render(&agent.metrics_snapshot()));
            }
            () = sleep_until(outlier_deadline), if outlier_deadline.is_some() => {
                agent.on_outlier_deadline();
            }
            Some(change) = changes_rx.recv() => agent.on_health_change(change),
            Some((request, reply)) = api_rx.recv() => {
                let _ = reply.send(agent.answer(request));
            }
            _ = hup.recv() => {
                // An explicit reload reports a still-bad file again.
                agent.rejected_text = None;
                agent.reload("SIGHUP");
            }
            _ = poll.tick() => agent.poll_config(),
            _ = release.tick(), if agent.reconciler.has_pending_releases() => agent.apply(),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    api_task.abort();
    event_reader.abort();
    metrics_task.abort();
    let _ = std::fs::remove_file(&args.socket);
    warn!(pins = %args.bpffs.display(), "agent stopping; programs stay attached through their pins");
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
    }
}

async fn serve_api(
    listener: tokio::net::UnixListener,
    calls: mpsc::Sender<ApiCall>,
    events: broadcast::Sender<EventView>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let calls = calls.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut read = tokio::io::BufReader::new(read);
            let response = match api::read_request(&mut read).await {
                Ok(None) => return,
                Ok(Some(Request::Events)) => {
                    stream_events(events.subscribe(), &mut write).await;
                    return;
                }
                Ok(Some(request)) => {
                    let (tx, rx) = oneshot::channel();
                    if calls.send((request, tx)).await.is_err() {
                        return;
                    }
                    rx.await
                        .unwrap_or_else(|_| Response::Error("agent is stopping".into()))
                }
                Err(response) => response,
            };
            let _ = api::write_response(&mut write, &response).await;
        });
    }
}

/// Writes events to one `detour events` client until it goes away.
async fn stream_events(
    mut events: broadcast::Receiver<EventView>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) {
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(missed)) => EventView {
                time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                kind: "lagged".into(),
                service: String::new(),
                backend: None,
                detail: format!("this stream fell behind and missed {missed} events"),
            },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if api::write_response(write, &Response::Event(event))
            .await
            .is_err()
        {
            return;
        }
    }
}
