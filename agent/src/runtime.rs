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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use clap::Args;
use detour_agent::api::{
    self, EndpointView, EventView, ExplainView, Request, Response, ServiceView,
};
use detour_agent::config::{self, Config, HealthCheckKind};
use detour_agent::config_watch::{
    self, ConfigChange, Decision, FileEvent, SettlePolicy, Trust, WriteTracker,
};
use detour_agent::dataplane::steer::{SteerOptions, Sweep};
use detour_agent::dataplane::{features, find_cgroup2_mount, Dataplane, LoadOptions};
use detour_agent::desired::{self, FrontendPlan, PlannedEndpoint};
use detour_agent::explain;
use detour_agent::health::{
    self, EjectedFlag, Health, HealthChange, ProbeKind, ProbeSpec, Thresholds,
};
use detour_agent::metrics::{
    self, AddressMetrics, BackendMetrics, Histogram, LimitMetrics, ServiceMetrics, Snapshot,
};
use detour_agent::nameserver;
use detour_agent::originator::{self, Originator};
use detour_agent::outlier::{Event as OutlierEvent, Outcome};
use detour_agent::passive::{self, PassiveHealth};
use detour_agent::plan_cache::{Dirty, PlanCache};
use detour_agent::reconcile::{Limit, Reconciler, Refusal};
use detour_agent::report;
use detour_agent::selection::Tier;
use detour_agent::sockdiag::{self, Which};
use detour_agent::sources::dns::{self, lookup, Names, Recorded, TtlBounds};
use detour_agent::sources::kubernetes::watch as kube_watch;
use detour_ebpf::ConnEvent;
use litemap::LiteMap;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Standalone YAML configuration (services, endpoints, node locality).
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config: Option<PathBuf>,
    /// Serve the FailoverServices of the cluster the agent runs in (a DaemonSet), instead
    /// of a file: watches FailoverServices, Services, EndpointSlices and its own Node.
    #[arg(long)]
    kubernetes: bool,
    /// This node's name, whose labels give the node's locality (set it from the
    /// Downward API's `spec.nodeName`).
    #[arg(long, env = "NODE_NAME", required_if_eq("kubernetes", "true"))]
    node_name: Option<String>,
    /// This cluster's name, as remote-cluster Secrets and a backing service's
    /// `clusterName` call it; backing services of this cluster are read directly.
    #[arg(long, env = "DETOUR_CLUSTER_NAME", default_value = "")]
    cluster_name: String,
    /// A kubeconfig to reach the API server; default: in-cluster, then `KUBECONFIG`.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// cgroup v2 directory to attach to; default: the cgroup v2 mount from /proc/mounts.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/detour")]
    bpffs: PathBuf,
    /// Unix socket for the CLI.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// How often the config file's stamp is polled when inotify cannot watch it
    /// (SIGHUP reloads at once).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    config_poll: Duration,
    /// How long a file written in place must stand still, after its writer closed it,
    /// before it is read.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    config_settle: Duration,
    /// How long a file written in place must stand still before a change that removes
    /// services, frontends or endpoints is applied (a rename or SIGHUP applies at once).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    config_removal_hold: Duration,
    #[arg(long, default_value_t = detour_ebpf::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    #[arg(long, default_value_t = detour_ebpf::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    #[arg(long, default_value_t = detour_ebpf::DEFAULT_MAX_TABLE_SLOTS)]
    max_slots: u32,
    /// Connected sockets whose VIP `getpeername` remembers (the oldest are forgotten).
    #[arg(long, default_value_t = detour_ebpf::DEFAULT_MAX_SOCKETS)]
    max_sockets: u32,
    /// SYN steering: devices whose traffic the steering program translates (comma
    /// separated; `none` turns steering off). A handshake whose SYN goes unanswered for
    /// the service's handshake timeout is moved to another backend instead of failing,
    /// for flows that leave by one of these devices.
    #[arg(long, default_value = "lo", value_delimiter = ',')]
    steer_devices: Vec<String>,
    /// A network namespace (e.g. `/run/netns/NAME`) whose `--steer-devices` get the
    /// steering program instead of the agent's own namespace's; repeat for more.
    #[arg(long = "steer-netns")]
    steer_netns: Vec<PathBuf>,
    /// Steered flows the translation tables hold; past it a stalled handshake is not
    /// steered (it fails as without steering) and `detour_steer_table_full_total` counts.
    #[arg(long, default_value_t = detour_ebpf::DEFAULT_MAX_STEERED)]
    max_steered_flows: u32,
    /// Where Prometheus scrapes `/metrics` (port 0: any free port, logged at start).
    #[arg(long, default_value = "127.0.0.1:9474", value_parser = parse_metrics_address)]
    metrics_address: SocketAddr,
    /// Per-backend series (`detour_backend_*`) are exported only while the services have
    /// at most this many backends in all (the rows of `detour endpoints`); above it they
    /// are left out, the per-service series stay, and
    /// `detour_metrics_backends_omitted` says how many were left out. 0 leaves them out
    /// always.
    #[arg(long, default_value_t = 1000)]
    metrics_backend_limit: usize,
    /// A name server for endpoints given by DNS name (`IP` or `IP:PORT`; repeat for
    /// more); default: the node's own (`/etc/resolv.conf`, after `/etc/hosts`).
    #[arg(long = "dns-server", value_parser = parse_dns_server)]
    dns_servers: Vec<SocketAddr>,
    /// A name is asked again at its records' TTL, but never sooner than this (also the
    /// wait after a failed lookup)...
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    dns_min_ttl: Duration,
    /// ...and never later than this.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    dns_max_ttl: Duration,
    /// How long one try of a DNS query waits for its answer (two tries per server).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    dns_timeout: Duration,
    /// Where the agent answers DNS for services' `hosts` (UDP), or `off`; bound once a
    /// service has `hosts`. A loopback address of its own, so it never takes the node
    /// resolver's port; route only the hosts' names to it (see the README).
    #[arg(long, default_value = "127.0.0.153:53", value_parser = parse_dns_listen)]
    dns_listen: DnsListen,
    /// The range VIPs of services with `hosts` and no `vips` are allocated from.
    #[arg(long, default_value = config::DEFAULT_VIP_RANGE)]
    vip_range: ipnet::Ipv4Net,
    /// Where the TLS originator listens (one port per frontend of a service with `tls`):
    /// an address applications' connects can reach once rewritten. Loopback serves
    /// processes in the node's network namespace; pods need the node's own address.
    #[arg(long, default_value = "127.0.0.1")]
    tls_listen: IpAddr,
    /// Connections the TLS originator relays at once; past it, new ones are reset.
    #[arg(long, default_value_t = 1024)]
    tls_max_connections: usize,
    /// How long the TLS handshake with a backend may take once TCP connected (the TCP
    /// connect itself has the service's `outlierDetection.handshakeTimeout`).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    tls_handshake_timeout: Duration,
}

/// The DNS name the endpoint at `ip` of `service` was resolved from, as `source` (the
/// file as parsed) names it and `names` resolved it; `None` for an address the file
/// gives itself (resolving the same address too adds no endpoint: the literal one stays).
fn hostname_in(source: &Config, names: &Names, service: &str, ip: IpAddr) -> Option<String> {
    let service = source.service(service)?;
    if service.endpoints.iter().any(|e| e.address == ip) {
        return None;
    }
    service
        .named_endpoints
        .iter()
        .find(|named| names.addresses(&named.hostname).contains(&ip))
        .map(|named| named.hostname.to_string())
}

/// `--dns-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
struct DnsListen(Option<SocketAddr>);

fn parse_dns_listen(text: &str) -> Result<DnsListen, String> {
    if text == "off" {
        return Ok(DnsListen(None));
    }
    parse_dns_server(text).map(|address| DnsListen(Some(address)))
}

/// `--dns-server`: `IP:PORT`, or an IP alone for port 53.
fn parse_dns_server(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{text:?} is not IP or IP:PORT"))
}

type ApiCall = (Request, oneshot::Sender<Response>);

/// `--metrics-address`: `IP:PORT`, or `:PORT` for the loopback address (`:0` picks a
/// free port). Loopback, not every interface, for the short form: metrics go beyond
/// the node only when asked for by address (the DaemonSet gives `0.0.0.0:9474`).
fn parse_metrics_address(text: &str) -> Result<SocketAddr, String> {
    let expected = || format!("{text:?}: expected IP:PORT (127.0.0.1:9474, [::1]:9474) or :PORT");
    match text.strip_prefix(':') {
        Some(port) => port
            .parse::<u16>()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .map_err(|_| expected()),
        None => text.parse().map_err(|_| expected()),
    }
}

/// Active health by service, then target, with the last check's error. A service
/// whose checks are off is its name alone: each of its targets is `Unchecked`, and
/// holding that per target was 6 MB at 100,000 targets.
#[derive(Debug, Default)]
struct HealthMap {
    unchecked: BTreeSet<String>,
    checked: ByService<(Health, Option<String>)>,
}

impl HealthMap {
    /// `None` for a target no check is configured for.
    fn health(&self, service: &str, target: SocketAddr) -> Option<Health> {
        if self.unchecked.contains(service) {
            return Some(Health::Unchecked);
        }
        self.checked.get(service, target).map(|(health, _)| *health)
    }

    /// The last failed check's error, while the target is failing.
    fn last_error(&self, service: &str, target: SocketAddr) -> Option<&String> {
        self.checked.get(service, target)?.1.as_ref()
    }

    /// The services with health entries, in name order.
    fn services(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.unchecked.iter().map(String::as_str).collect();
        names.extend(self.checked.services());
        names.sort_unstable();
        names
    }

    /// Forgets `service`.
    fn remove(&mut self, service: &str) {
        self.unchecked.remove(service);
        self.checked.set(service, LiteMap::new());
    }
}

/// Returns the heap's free memory to the system. glibc keeps what a burst of
/// allocations freed (the first sync's lists) for reuse, so the agent's RSS stayed at its
/// peak; `malloc_trim` gives back every free page. Elsewhere (musl), nothing to do.
fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own free lists; any pad is valid.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Values by service, then by target. One service's entries are one small sorted map:
/// a change to a service touches only it, a lookup needs no owned key, and the
/// service's name is held once, not once per target (at 100,000 targets, a `BTreeMap`
/// keyed by (name, target) held 100,000 copies of the names and 12 MB of nodes).
///
/// Invariant: no service's map is empty (an emptied one is removed).
#[derive(Debug)]
struct ByService<V>(BTreeMap<String, LiteMap<SocketAddr, V>>);

impl<V> Default for ByService<V> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<V> ByService<V> {
    fn get(&self, service: &str, target: SocketAddr) -> Option<&V> {
        self.0.get(service)?.get(&target)
    }

    fn get_mut(&mut self, service: &str, target: SocketAddr) -> Option<&mut V> {
        self.0.get_mut(service)?.get_mut(&target)
    }

    /// The service's entries, replaced whole (an empty map removes the service).
    fn set(&mut self, service: &str, entries: LiteMap<SocketAddr, V>) {
        if entries.is_empty() {
            self.0.remove(service);
        } else if let Some(slot) = self.0.get_mut(service) {
            *slot = entries;
        } else {
            self.0.insert(service.to_owned(), entries);
        }
    }

    /// Takes the service's entries out.
    fn take(&mut self, service: &str) -> LiteMap<SocketAddr, V> {
        self.0.remove(service).unwrap_or_default()
    }

    /// The services that have entries.
    fn services(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// Probe tasks by service and target, with the spec they run so a change restarts them,
/// and the flag that tells each whether its target is ejected.
#[derive(Default)]
struct Probes {
    running: ByService<(ProbeSpec, JoinHandle<()>, EjectedFlag)>,
}

impl Probes {
    /// Starts, restarts and stops probe tasks so they match `config`; forgets the health
    /// of targets that are no longer probed. Only the services `scope` names are looked
    /// at (the others' probes run on untouched), unless it says all.
    fn sync(
        &mut self,
        config: &Config,
        scope: &Dirty,
        changes: &mpsc::Sender<HealthChange>,
        health: &mut HealthMap,
        is_ejected: impl Fn(&str, SocketAddr) -> bool,
        hostname: impl Fn(&str, IpAddr) -> Option<String>,
    ) {
        // The names to look at: every service that has entries or is configured, or
        // those in scope (configured or not: a removed one loses its entries).
        let names: Vec<String> = match scope {
            Dirty::All => {
                let mut names: BTreeSet<&str> = self.running.services().collect();
                names.extend(health.services());
                names.extend(config.services.iter().map(|s| s.name.as_str()));
                names.into_iter().map(str::to_owned).collect()
            }
            Dirty::Services(names) => names.iter().cloned().collect(),
        };
        for name in &names {
            let Some(service) = config.service(name) else {
                for (_, (_, task, _)) in self.running.take(name) {
                    task.abort();
                }
                health.remove(name);
                continue;
            };
            let hc = &service.health_check;
            let kind = match &hc.kind {
                // A backend that TLS is originated to is checked with the handshake the
                // originator makes: a TCP connect alone would pass a backend whose
                // certificate every real connection refuses (and end its ejection).
                HealthCheckKind::Tcp => Some(match &service.tls {
                    Some(tls) => ProbeKind::Tls {
                        tls: tls.clone(),
                        name: None,
                    },
                    None => ProbeKind::Tcp,
                }),
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
            let Some(spec) = spec else {
                for (_, (_, task, _)) in self.running.take(name) {
                    task.abort();
                }
                health.remove(name);
                health.unchecked.insert(name.clone());
                continue;
            };
            health.unchecked.remove(name);
            let mut targets: Vec<SocketAddr> = desired::targets(service).collect();
            targets.sort_unstable();
            targets.dedup();
            let mut running = self.running.take(name);
            let mut old_health = health.checked.take(name);
            let mut now_running = LiteMap::with_capacity(targets.len());
            let mut now_health = LiteMap::with_capacity(targets.len());
            for target in targets {
                let spec = match &spec.kind {
                    ProbeKind::Tls { tls, .. } => ProbeSpec {
                        kind: ProbeKind::Tls {
                            tls: tls.clone(),
                            name: tls.sni.clone().or_else(|| hostname(name, target.ip())),
                        },
                        ..spec.clone()
                    },
                    _ => spec.clone(),
                };
                match running.remove(&target) {
                    // Its probe runs on, and its health stands.
                    Some(probe) if probe.0 == spec => {
                        now_running.insert(target, probe);
                        let kept = old_health.remove(&target);
                        now_health.insert(target, kept.unwrap_or((Health::Unknown, None)));
                    }
                    stale => {
                        if let Some((_, task, _)) = stale {
                            task.abort();
                        }
                        let ejected = EjectedFlag::default();
                        ejected.set(is_ejected(name, target));
                        let task = health::spawn_probe(
                            name.clone(),
                            target,
                            spec.clone(),
                            changes.clone(),
                            ejected.clone(),
                        );
                        now_running.insert(target, (spec.clone(), task, ejected));
                        now_health.insert(target, (Health::Unknown, None));
                    }
                }
            }
            // Probes of targets no longer wanted stop.
            for (_, (_, task, _)) in running {
                task.abort();
            }
            self.running.set(name, now_running);
            health.checked.set(name, now_health);
        }
    }

    /// Tells the probe of (`service`, `target`), if any, whether the target is ejected.
    fn set_ejected(&self, service: &str, target: SocketAddr, ejected: bool) {
        if let Some((_, _, flag)) = self.running.get(service, target) {
            flag.set(ejected);
        }
    }
}

struct Agent {
    /// `--max-steered-flows`.
    max_steered_flows: u32,
    /// The last sweep of the steering table: live steered flows per service and backend.
    steered: Sweep,
    /// The standalone file; `None` when Kubernetes is the source.
    config_path: Option<PathBuf>,
    /// `--metrics-backend-limit`.
    metrics_backend_limit: usize,
    /// The file as parsed, names unresolved: `config` is this with [`dns::expand`]ed
    /// names. With Kubernetes as the source, the model while one of its external backing
    /// services names an endpoint by DNS, else empty (`config` is then the model as
    /// built, not a copy).
    source: Config,
    /// The running configuration.
    config: Config,
    /// Every DNS name `source` uses, and what it resolved to.
    names: Names,
    /// Built at the first name; `Err` holds why it could not be.
    lookups: Option<Result<lookup::Lookups, String>>,
    /// `--dns-server` and `--dns-timeout`, for building `lookups`.
    dns_servers: Vec<SocketAddr>,
    dns_timeout: Duration,
    dns_answers: mpsc::Sender<lookup::Outcome>,
    /// `--vip-range`, for every parse of the file.
    parse_options: config::ParseOptions,
    /// What the DNS server for `hosts` answers; sent on whenever it changes.
    zone: watch::Sender<Arc<nameserver::Zone>>,
    /// `--dns-listen`, and the server once bound: only once a service has `hosts`, so a
    /// node without any never has port 53 taken.
    dns_listen: Option<SocketAddr>,
    nameserver: Option<JoinHandle<()>>,
    config_text: String,
    /// The last file content that failed to parse, so a bad file is reported once.
    rejected_text: Option<String>,
    /// What the config file looked like when last read; the poll reads it again only
    /// when this changes, so a large file costs a `stat` per poll, not a read.
    config_stamp: Option<FileStamp>,
    /// Whether the file is whole yet: see `config_watch`.
    config_tracker: WriteTracker,
    /// inotify watches the file; otherwise its stamp is polled.
    config_watched: bool,
    /// When to look at the file again (a settle or a removal hold ends).
    config_wake: Option<Instant>,
    /// A parsed change that removes something waits for the file to stand still.
    config_held: Option<String>,
    dataplane: Dataplane,
    reconciler: Reconciler,
    health: HealthMap,
    probes: Probes,
    /// Per-service plans, re-planned only where `dirty` says.
    plans: PlanCache,
    /// What changed since the last apply: the services to re-plan.
    dirty: Dirty,
    /// Services the maps have no room for (or for their new state), by name, from the
    /// last apply.
    refused: BTreeMap<String, Refusal>,
    /// Relays connects to services with `tls`; their kernel tables point at it.
    originator: Originator,
    /// The rustls configuration of each service with `tls`, with the settings it was
    /// built from.
    tls_clients: HashMap<String, (config::TlsOrigination, Arc<rustls::ClientConfig>)>,
    /// `--tls-handshake-timeout`.
    tls_handshake_timeout: Duration,
    /// The listeners the plans were last told about.
    plans_relays: HashMap<SocketAddr, SocketAddr>,
    changes: mpsc::Sender<HealthChange>,
    passive: PassiveHealth,
    /// Kernel ids → names, rebuilt after every apply.
    service_of_id: HashMap<u32, String>,
    /// What `detour events` streams.
    events: broadcast::Sender<EventView>,
    /// The cgroup the programs are attached to: whose sockets detour may destroy.
    cgroup: PathBuf,
    /// Finished socket destructions come back here.
    destroyed: mpsc::UnboundedSender<Destroyed>,
    counters: Counters,
    /// What the last Kubernetes model left out, as logged; logged again only on change.
    kubernetes_problems: Vec<String>,
    /// Why each backend now ejected was ejected (`refused, ejection 2`), for `detour
    /// explain`; pruned to the ejected ones at every ejection.
    ejection_causes: HashMap<(String, SocketAddr), String>,
    /// Bumped by every reload that may change which services there are or their
    /// order: the plan cache checks the order (a pass over every service) only then.
    config_shape: u64,
}

/// What the agent counts itself, for metrics.
#[derive(Default)]
struct Counters {
    events_received: u64,
    /// DNS lookups that failed or answered no address.
    dns_failures: u64,
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

/// Reads the config file, at most [`config::MAX_DOCUMENT_BYTES`] of it: a file past
/// that is refused without being held in memory whole.
fn read_text(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let limit = config::MAX_DOCUMENT_BYTES as u64;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(limit + 1).read_to_string(&mut text))
        .with_context(|| format!("reading config {}", path.display()))?;
    if text.len() as u64 > limit {
        anyhow::bail!(
            "config {} is larger than the {limit} bytes accepted",
            path.display()
        );
    }
    Ok(text)
}

fn parse_config(path: &Path, text: &str, options: &config::ParseOptions) -> anyhow::Result<Config> {
    let config = config::parse_with(text, options)
        .with_context(|| format!("config {}", path.display()))?
        .defined_in(path);
    for warning in config.warnings() {
        warn!(config = %path.display(), %warning, "configuration accepted with a warning");
    }
    Ok(config)
}

impl Agent {
    /// Re-plans the services marked dirty and makes the maps serve the result.
    fn apply(&mut self) {
        let started = Instant::now();
        let health = &self.health;
        let passive = &self.passive;
        let refreshed = self.plans.refresh(
            &self.config,
            // Counts the reloads that may have added, removed or moved services.
            self.config_shape,
            &mut self.dirty,
            |service, target| health.health(service, target).unwrap_or(Health::Unknown),
            |service, target| passive.is_ejected(service, target),
        );
        let planned_in = started.elapsed();
        let tiers_before: HashMap<SocketAddr, &Option<Tier>> = refreshed
            .previous
            .iter()
            .map(|p| (p.frontend, &p.tier))
            .collect();
        let mut tier_events = Vec::new();
        let replanned = refreshed
            .services
            .iter()
            .flat_map(|service| self.plans.service(service));
        for plan in replanned {
            if tiers_before.get(&plan.frontend) != Some(&&plan.tier) {
                let tier = report::tier_name(plan);
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
        // Before the kernel's tables change: a listener new in this apply has its route
        // before any connect is sent to it.
        self.route_originated(&refreshed.services);
        let reconciling = Instant::now();
        // A change that keeps every service's frontends (health, ejection, weights, an
        // endpoint moved) goes through the reconciler's scoped path, which costs the
        // services re-planned, not all of them.
        let dropped = if refreshed.services.is_empty() {
            None
        } else {
            refreshed.dropped_targets(&self.plans)
        };
        let changed: Vec<usize> = refreshed
            .services
            .iter()
            .filter_map(|service| self.plans.position(service))
            .collect();
        let fast = dropped.and_then(|dropped| {
            self.reconciler.apply_services(
                &mut self.dataplane,
                self.plans.desired(),
                &changed,
                &dropped,
                Instant::now(),
            )
        });
        let fast_path = fast.is_some();
        let report = fast.unwrap_or_else(|| {
            self.reconciler
                .apply(&mut self.dataplane, self.plans.desired(), Instant::now())
        });
        let reconciled_in = reconciling.elapsed();
        self.counters.reconcile.observe(started.elapsed());
        for e in &report.errors {
            error!(error = %e, "could not program a frontend; it keeps its previous table");
        }
        if report.added + report.switched + report.removed > 0 {
            info!(
                added = report.added,
                switched = report.switched,
                removed = report.removed,
                replanned = refreshed.services.len(),
                fast_path,
                plan_ms = planned_in.as_millis(),
                reconcile_ms = reconciled_in.as_millis(),
                "maps updated"
            );
        }
        self.note_refusals(report.refused);
        if fast_path {
            // No frontend came or went: the service ids still name the same services.
            return;
        }
        self.index_ids();
    }

    /// Which service each kernel frontend id names, for kernel events (backend ids the
    /// reconciler answers itself).
    fn index_ids(&mut self) {
        self.service_of_id = self
            .plans
            .iter()
            .filter_map(|p| Some((self.reconciler.service_id(&p.frontend)?, p.service.clone())))
            .collect();
    }

    /// SYN steering's figures for `/metrics`.
    fn steer_metrics(&self) -> Option<detour_agent::metrics::SteerMetrics> {
        let steering = self.dataplane.steering.as_ref()?;
        let c = steering
            .counters()
            .map_err(|e| warn!(error = %e, "cannot read the steering counters"))
            .ok()?;
        use detour_ebpf::steer as s;
        Some(detour_agent::metrics::SteerMetrics {
            steered: c[s::STEERED as usize],
            table_full: c[s::TABLE_FULL as usize],
            no_candidate: c[s::NO_CANDIDATE as usize],
            late_dropped: c[s::LATE_DROPPED as usize],
            unseen: c[s::UNSEEN as usize],
            collisions: c[s::COLLISIONS as usize],
            refusals_held: c[s::REFUSALS_HELD as usize],
            icmp_translated: c[s::ICMP_TRANSLATED as usize],
            entries: c[s::INSERTED as usize].saturating_sub(c[s::REMOVED as usize]),
            capacity: u64::from(self.max_steered_flows),
            live: self.steered.live.values().map(|&n| u64::from(n)).sum(),
        })
    }

    /// Deletes the steering entries of flows closed long enough ago, and keeps the count
    /// of live steered flows per service and backend for `detour endpoints` and metrics.
    fn sweep_steering(&mut self) {
        // Nothing steered (the usual state): no origins to open, no table to walk.
        if self
            .dataplane
            .steering
            .as_ref()
            .is_none_or(|s| s.is_empty())
        {
            self.steered = Sweep::default();
            return;
        }
        let origins = match self.dataplane.origins() {
            Ok(origins) => origins,
            Err(e) => {
                warn!(error = %e, "cannot read the socket origins; the steering sweep waits");
                return;
            }
        };
        let Some(steering) = self.dataplane.steering.as_mut() else {
            return;
        };
        match steering.sweep(monotonic_ns(), |cookie| origins.get(cookie).is_some()) {
            Ok(sweep) => {
                if sweep.removed > 0 {
                    debug!(
                        removed = sweep.removed,
                        left = sweep.entries,
                        "steering entries of closed flows deleted"
                    );
                }
                self.steered = sweep;
            }
            Err(e) => warn!(error = %e, "could not sweep the steering table; retrying"),
        }
    }

    /// Clears the backend ids whose release delay is over; a service refused for want of
    /// ids gets a full apply, which may admit it now.
    fn release_backends(&mut self) {
        if self.reconciler.has_refusals() {
            self.apply();
            return;
        }
        match self.reconciler.release_expired(
            &mut self.dataplane,
            self.plans.desired(),
            Instant::now(),
        ) {
            // A released id stops naming its address in the reconciler itself.
            Ok(_) => {}
            Err(e) => error!(error = %e, "could not release a backend id; retrying"),
        }
    }

    /// Logs and publishes what changed in which services the maps have no room for.
    fn note_refusals(&mut self, refused: Vec<Refusal>) {
        let refused: BTreeMap<String, Refusal> = refused
            .into_iter()
            .map(|r| (r.service.clone(), r))
            .collect();
        for (service, r) in &refused {
            let before = self.refused.get(service);
            if before.is_some_and(|b| (b.limit, b.max, b.running) == (r.limit, r.max, r.running)) {
                continue;
            }
            let frontends: Vec<String> = r.frontends.iter().map(ToString::to_string).collect();
            let frontends = frontends.join(",");
            if r.running {
                warn!(%service, limit = %r.limit, max = r.max, %frontends, "service's new state does not fit in the maps; these frontends keep their previous tables (or stay out, if new)");
            } else {
                warn!(%service, limit = %r.limit, max = r.max, %frontends, "service does not fit in the maps; not programmed");
            }
            let kind = if r.running {
                "not-updated"
            } else {
                "not-programmed"
            };
            self.publish(kind, service, None, format!("{r}; frontends {frontends}"));
        }
        for service in self.refused.keys() {
            if !refused.contains_key(service) && self.config.service(service).is_some() {
                info!(%service, "service fits in the maps now; programmed");
                self.publish(
                    "programmed",
                    service,
                    None,
                    "the maps have room for it now".into(),
                );
            }
        }
        self.refused = refused;
    }

    /// `STATE` of a service: `OK`, or `NOT-PROGRAMMED`/`NOT-UPDATED` and the limit.
    fn service_state(&self, service: &str) -> (String, Option<String>) {
        match self.refused.get(service) {
            None => ("OK".into(), None),
            Some(r) if r.running => ("NOT-UPDATED".into(), Some(r.to_string())),
            Some(r) => ("NOT-PROGRAMMED".into(), Some(r.to_string())),
        }
    }

    /// Whether the kernel's table of `plan`'s frontend has `e` now: the plan's word,
    /// unless the frontend is one the maps had no room for.
    fn in_kernel_table(&self, plan: &FrontendPlan, e: &PlannedEndpoint) -> bool {
        let left_out = self
            .refused
            .get(&plan.service)
            .is_some_and(|r| r.frontends.contains(&plan.frontend));
        if !left_out {
            return e.in_table;
        }
        match (
            self.reconciler.live_table(&plan.frontend),
            self.reconciler.backend_id(&e.target),
        ) {
            (Some(live), Some(id)) => live.contains(&id),
            _ => false,
        }
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

    /// Feeds one connection outcome (the kernel's or the originator's) to outlier
    /// detection and acts on an ejection; returns whether the plans must be re-applied.
    fn judge(&mut self, service: &str, target: SocketAddr, outcome: Outcome, now: Instant) -> bool {
        let service = service.to_owned();
        let mut changed = false;
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
                let passive = &self.passive;
                self.ejection_causes
                    .retain(|(s, t), _| passive.is_ejected(s, *t));
                self.ejection_causes.insert(
                    (service.clone(), target),
                    format!("{kind}, ejection {ejection_count}"),
                );
                self.terminate(&service, target, "ejected");
                self.probes.set_ejected(&service, target, true);
                self.dirty.mark(&service);
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
        changed
    }

    /// One outcome from the TLS originator: judged like the kernel's events.
    fn on_originator_report(&mut self, report: originator::Report) {
        let now = Instant::now();
        let kind = match report.outcome {
            Outcome::Success => "recovered".to_owned(),
            Outcome::Failure(kind) => kind.to_string(),
        };
        self.publish(&kind, &report.service, Some(report.target), report.detail);
        if self.judge(&report.service, report.target, report.outcome, now) {
            self.apply();
        }
    }

    /// Gives each frontend of a service with `tls` its originator listener and each such
    /// service its rustls configuration (a CA file is read again whenever its service
    /// changed), and tells the plans where the listeners are. Run after every change of
    /// `config`; a service whose TLS configuration fails gets no listener, so its
    /// connects are left alone, and says why.
    fn sync_originator(&mut self) {
        let touched = |name: &str| match &self.dirty {
            Dirty::All => true,
            Dirty::Services(names) => names.contains(name),
        };
        let mut clients = HashMap::new();
        let mut failures = Vec::new();
        for service in self.config.services.iter() {
            let Some(tls) = &service.tls else { continue };
            let known = self.tls_clients.remove(&service.name);
            if let Some(entry) = known
                .as_ref()
                .filter(|(was, _)| was == tls && !touched(&service.name))
            {
                clients.insert(service.name.clone(), entry.clone());
                continue;
            }
            match originator::tls::client_config(tls) {
                Ok(client) => {
                    clients.insert(service.name.clone(), (tls.clone(), client));
                }
                // What served keeps serving: a CA file caught mid-rotation does not
                // take a running service down.
                Err(e) if known.is_some() => {
                    let why = format!("{e:#}; the previous TLS settings stay in use");
                    failures.push((service.name.clone(), why));
                    clients.extend(known.map(|entry| (service.name.clone(), entry)));
                }
                Err(e) => failures.push((service.name.clone(), format!("{e:#}"))),
            }
        }
        self.tls_clients = clients;
        for (service, why) in failures {
            if self.tls_clients.contains_key(&service) {
                warn!(%service, error = %why, "cannot read the service's TLS settings");
            } else {
                error!(%service, error = %why, "cannot originate TLS: the service's connects are left alone");
            }
            self.publish("tls-failed", &service, None, why);
        }
        let frontends: Vec<SocketAddr> = self
            .config
            .services
            .iter()
            .filter(|s| self.tls_clients.contains_key(&s.name))
            .flat_map(|s| {
                s.ports
                    .iter()
                    .flat_map(|p| s.vips.iter().map(|vip| SocketAddr::new(*vip, p.number)))
            })
            .collect();
        let reconciler = &self.reconciler;
        // After a restart, the port the pinned table still sends connects to.
        let previous = |frontend: SocketAddr| match reconciler.live_table(&frontend) {
            Some([id]) => reconciler.backend_addr(*id),
            _ => None,
        };
        for (frontend, e) in self.originator.sync(&frontends, previous) {
            let service = self
                .config
                .services
                .iter()
                .find(|s| {
                    s.ports.iter().any(|p| p.number == frontend.port())
                        && s.vips.contains(&frontend.ip())
                })
                .map_or_else(String::new, |s| s.name.clone());
            error!(%service, %frontend, error = %format!("{e:#}"), "cannot listen for TLS origination");
            self.publish("tls-failed", &service, None, format!("{frontend}: {e:#}"));
        }
        let relays = self.originator.relays();
        if relays != self.plans_relays {
            for service in self.config.services.iter().filter(|s| s.tls.is_some()) {
                self.dirty.mark(&service.name);
            }
            self.plans.set_relays(relays.clone());
            self.plans_relays = relays;
        }
    }

    /// SIGHUP reads every CA file again, even when the configuration's text did not
    /// change (a rotated CA file changes none).
    fn reload_tls(&mut self) {
        let originated: Vec<String> = self
            .config
            .services
            .iter()
            .filter(|s| s.tls.is_some())
            .map(|s| s.name.clone())
            .collect();
        if originated.is_empty() {
            return;
        }
        for name in &originated {
            self.dirty.mark(name);
        }
        self.sync_originator();
        self.apply();
    }

    /// Gives the originator the new plans of the re-planned `services` that originate
    /// TLS.
    fn route_originated(&self, services: &[String]) {
        for name in services {
            let Some(service) = self.config.service(name) else {
                continue;
            };
            let (Some(tls), Some((_, client))) = (&service.tls, self.tls_clients.get(name)) else {
                continue;
            };
            let routes = self.plans.service(name).iter().map(|plan| {
                let route = originator::Route::of(
                    plan,
                    client.clone(),
                    |target| {
                        let hostname = self.hostname_of(name, target.ip());
                        originator::tls::server_name(
                            tls.sni.as_deref(),
                            (!hostname.is_empty()).then_some(hostname.as_str()),
                            target,
                        )
                    },
                    service.outlier_detection.handshake_timeout,
                    self.tls_handshake_timeout,
                );
                (plan.frontend, route)
            });
            self.originator.set_routes(routes);
        }
    }

    /// A batch of connection outcomes from the kernel.
    fn on_kernel_events(&mut self, batch: Vec<ConnEvent>) {
        let now = Instant::now();
        self.counters.events_received += batch.len() as u64;
        let mut changed = false;
        for event in batch {
            let (Some(service), Some(target)) = (
                self.service_of_id.get(&event.service_id).cloned(),
                self.reconciler.backend_addr(event.backend_id),
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
                detour_ebpf::event_kind::STEERED => {
                    "a handshake whose SYN went unanswered elsewhere was steered here".to_string()
                }
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
                changed |= self.judge(&service, target, outcome, now);
            }
            if lifts_suspect_mark(&event, || self.passive.is_ejected_anywhere(target)) {
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
        if config.tls.is_some() {
            // The kernel holds no socket to this backend: the originator does.
            let closed = self.originator.terminate(service, target);
            if closed > 0 {
                info!(%service, backend = %target, why, closed, "relayed connections closed");
            }
            return;
        }
        if !self.dataplane.kernel.has(features::key::SOCKET_DESTROY) {
            // Said once at start, with why; the ejection's own event still goes out.
            debug!(%service, backend = %target, "socket destruction is off on this kernel");
            return;
        }
        let frontends: BTreeSet<u32> = self
            .plans
            .service(service)
            .iter()
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
        // With steering, a handshake still waiting on this backend is moved at its
        // timeout instead of failing: only established connections are destroyed.
        let which = if self
            .dataplane
            .steering
            .as_ref()
            .is_some_and(|s| s.enabled())
        {
            Which::Established
        } else {
            Which::Both
        };
        tokio::task::spawn_blocking(move || {
            // Only sockets detour rewrote, for this service, to this backend; each is
            // marked first so the kernel does not count its end as a failure.
            let origins = std::cell::RefCell::new(origins);
            // A steered socket's kernel peer is still the backend it left: it is not
            // this backend's to destroy.
            let ours = |cookie: u64| {
                let ours = origins.borrow().get(cookie).is_some_and(|o| {
                    o.backend_id == backend_id
                        && frontends.contains(&o.service_id)
                        && o.flags & detour_ebpf::ORIGIN_STEERED == 0
                });
                ours && origins.borrow_mut().mark_destroyed(cookie)
            };
            let report = sockdiag::destroy_in_cgroup(&cgroup, &[target], which, &ours)
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
        self.dirty.mark(service);
        self.probes.set_ejected(service, target, false);
        self.ejection_causes.remove(&(service.to_owned(), target));
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
        // A change from a probe that a reload just stopped is stale: ignore it.
        let Some(entry) = self.health.checked.get_mut(&change.service, change.target) else {
            return;
        };
        self.dirty.mark(&change.service);
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
        // ends an ejection (the probe reports every pass while its target is ejected).
        if change.passed {
            if self
                .passive
                .restore(&change.service, change.target, Instant::now())
                .is_some()
            {
                self.on_restored(&change.service, change.target, "active health check passed");
            } else if !self.passive.is_ejected(&change.service, change.target) {
                // The ejection ended some other way (a reload forgot it): stop reporting.
                self.probes
                    .set_ejected(&change.service, change.target, false);
            }
        }
        self.apply();
    }

    /// Without inotify: a new stamp is a change whose writer the agent cannot see.
    fn poll_config(&mut self) {
        let Some(path) = &self.config_path else {
            return;
        };
        let now = stamp(path);
        if now.is_some() && now != self.config_stamp {
            self.config_stamp = now;
            self.config_tracker
                .observe(FileEvent::Unknown, Instant::now());
            self.check_config();
        }
    }

    fn on_file_event(&mut self, event: FileEvent) {
        self.config_tracker.observe(event, Instant::now());
        self.check_config();
    }

    /// Reads the file if `config_watch` says it is whole, or schedules the next look.
    fn check_config(&mut self) {
        let now = Instant::now();
        self.config_wake = None;
        match self.config_tracker.decide(now) {
            Decision::Idle => {
                if self.config_held.is_some() {
                    // The file has not changed since a removal was held: apply it once
                    // the hold is over.
                    match self.config_tracker.removal_wait(now) {
                        Some(at) => self.config_wake = Some(at),
                        None => self.reload("file stood still", Trust::InPlace),
                    }
                }
            }
            Decision::WaitUntil(at) => self.config_wake = at,
            Decision::Read(trust) => {
                self.config_tracker.read_done();
                self.reload("file changed", trust);
            }
        }
    }

    /// Re-reads the config file and applies it if it parses, validates and (for an
    /// in-place write that removes something) has stood still long enough; keeps the
    /// running config otherwise.
    fn reload(&mut self, why: &str, trust: Trust) {
        let Some(path) = self.config_path.clone() else {
            return;
        };
        // Stamped before reading: a write landing during the read changes the stamp
        // again, so the next poll reads once more.
        self.config_stamp = stamp(&path);
        let started = Instant::now();
        let parsed = read_text(&path).and_then(|text| {
            if text == self.config_text || self.rejected_text.as_ref() == Some(&text) {
                return Ok(None);
            }
            match parse_config(&path, &text, &self.parse_options) {
                Ok(config) => Ok(Some((text, config))),
                Err(e) => {
                    self.rejected_text = Some(text);
                    Err(e)
                }
            }
        });
        if !matches!(parsed, Ok(Some(_))) {
            // Unchanged or rejected: nothing is held any more.
            self.config_held = None;
        }
        match parsed {
            Ok(None) => {}
            Ok(Some((text, source))) => {
                let parsed_in = started.elapsed();
                let config = self.resolve(source);
                let change = ConfigChange::between(&self.config, &config);
                let hold = match trust {
                    Trust::Complete => None,
                    Trust::InPlace if change.removals.is_empty() => None,
                    Trust::InPlace => self.config_tracker.removal_wait(Instant::now()),
                };
                if let Some(until) = hold {
                    if self.config_held.as_ref() != Some(&text) {
                        info!(
                            removes = %change.removals.join(", "),
                            wait_ms = until.saturating_duration_since(Instant::now()).as_millis(),
                            "config file written in place removes something; applying it once the file stands still (rename the file into place, or SIGHUP, to apply at once)"
                        );
                    }
                    self.config_held = Some(text);
                    self.config_wake = Some(until);
                    return;
                }
                self.config_held = None;
                self.config_text = text;
                self.rejected_text = None;
                self.use_config(config, change, false, why, started, parsed_in);
            }
            Err(e) => {
                self.counters.config_reloads_failed += 1;
                error!(why, error = %format!("{e:#}"), "configuration rejected; still serving the previous one");
            }
        }
    }

    /// Takes `source` as the source's configuration: tracks the names it uses (new ones
    /// are looked up at once) and returns it with what they resolved to so far.
    fn resolve(&mut self, source: Config) -> Config {
        let config = dns::expand_all(&source, &self.names);
        self.source = source;
        if !self.names.track(&self.source, Instant::now()).is_empty() {
            self.look_up_due();
        }
        config
    }

    /// The running configuration of a Kubernetes model: the model itself, or, when
    /// external backing services name endpoints by DNS, the model with its names
    /// resolved as the file's are (`source` then holds the model, for the next answer).
    fn resolve_model(&mut self, model: Config) -> Config {
        let named = model.services.iter().any(|s| !s.named_endpoints.is_empty());
        if !named && self.source.services.is_empty() {
            return model;
        }
        let config = self.resolve(model);
        if !named {
            // The last name is gone: stop holding a second copy of the model.
            self.source = Config::default();
        }
        config
    }

    /// Sends the DNS server the zone of the running configuration, if it changed: a pass
    /// over the services, but only those with `hosts` cost more than a look.
    fn publish_zone(&mut self) {
        let zone = nameserver::zone_of(&self.config);
        if !zone.is_empty() {
            self.start_nameserver();
        }
        self.zone.send_if_modified(|current| {
            if **current == zone {
                return false;
            }
            *current = Arc::new(zone);
            true
        });
    }

    /// Binds and starts the DNS server for `hosts`, unless it runs or is `off`. A failure
    /// is logged and tried again at the next change of hosts; everything else runs.
    fn start_nameserver(&mut self) {
        if self.nameserver.is_some() {
            return;
        }
        let Some(address) = self.dns_listen else {
            warn!("services have hosts, but --dns-listen is off: nothing answers DNS for them");
            return;
        };
        match nameserver::bind(address) {
            Ok(socket) => {
                let bound = socket.local_addr().unwrap_or(address);
                info!(address = %bound, "DNS server for services' hosts listening");
                let zone = self.zone.subscribe();
                self.nameserver = Some(tokio::spawn(nameserver::serve(socket, zone)));
            }
            Err(error) => {
                warn!(%address, %error, "cannot answer DNS for services' hosts there; everything else runs (--dns-listen ADDR to move it)");
            }
        }
    }

    /// Starts a lookup of every name that is due.
    fn look_up_due(&mut self) {
        let due = self.names.take_due(Instant::now());
        if due.is_empty() {
            return;
        }
        let lookups = self.lookups.get_or_insert_with(|| {
            lookup::Lookups::new(&self.dns_servers, self.dns_timeout).map_err(|e| format!("{e:#}"))
        });
        match lookups {
            Ok(lookups) => {
                for name in due {
                    lookups.spawn(name, self.dns_answers.clone());
                }
            }
            Err(error) => {
                // No resolver: each name fails now and is tried again at the floor
                // (the resolver is built again then).
                let error = error.clone();
                self.lookups = None;
                for name in due {
                    self.on_name_answer((name, Err(error.clone())));
                }
            }
        }
    }

    /// A lookup answered: new addresses re-plan the services that use the name (through
    /// the same diffed apply as any change); a failure keeps the last good ones and says
    /// so.
    fn on_name_answer(&mut self, (name, outcome): lookup::Outcome) {
        let started = Instant::now();
        let error = outcome.as_ref().err().cloned();
        let recorded = self.names.record(&name, outcome, started);
        if matches!(recorded, Recorded::Untracked | Recorded::Unchanged) {
            // The common answer, a refresh at the TTL: nothing to say or re-plan.
            return;
        }
        let users: Vec<String> = dns::services_using(&self.source, &name)
            .map(|s| s.name.clone())
            .collect();
        match recorded {
            Recorded::Untracked | Recorded::Unchanged => {}
            Recorded::Failed { kept } => {
                let error = error.unwrap_or_else(|| "the name has no addresses".to_owned());
                let failures = self.names.get(&name).map_or(0, |r| r.failures);
                if failures == 1 {
                    warn!(%name, %error, kept, "DNS lookup failed; the last addresses keep serving");
                } else {
                    debug!(%name, %error, kept, failures, "DNS lookup failed again");
                }
                self.counters.dns_failures += 1;
                for service in &users {
                    self.publish(
                        "dns-failed",
                        service,
                        None,
                        format!("{name}: {error}; keeping {kept} address(es)"),
                    );
                }
            }
            Recorded::Changed => {
                let addresses = self.names.addresses(&name);
                let list = addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                info!(%name, addresses = %list, "DNS name resolved to new addresses");
                for service in &users {
                    self.publish("dns-resolved", service, None, format!("{name}: {list}"));
                }
                let replaced = dns::users_of(&self.source, &name, &self.names);
                let Some(config) = self.config.with_replaced(&replaced) else {
                    return;
                };
                let mut change =
                    ConfigChange::among(&self.config, &config, users.iter().map(String::as_str));
                // An address that left a name's answer is drained, not cut: no new
                // connect goes to it, and connections open to it end on their own. A
                // record that rotates (as cloud services' do, every few minutes) says
                // nothing about the old address being down; health checks and outlier
                // detection say that. An edit of the file that removes a name still
                // terminates, as any removed backend.
                change.removed_targets.clear();
                self.use_config(config, change, true, "dns", started, Duration::ZERO);
            }
        }
    }

    /// Makes `config` the running one: terminates what `change` removed, re-syncs the
    /// probes and passive health of what it touched, and applies. Both sources end here.
    fn use_config(
        &mut self,
        config: Config,
        change: ConfigChange,
        same_order: bool,
        why: &str,
        started: Instant,
        parsed_in: Duration,
    ) {
        if !same_order {
            self.config_shape += 1;
        }
        // Destroyed with the old plans' frontend ids, before the apply forgets
        // them; the backend ids outlive the apply by the release delay.
        for (service, target) in &change.removed_targets {
            self.terminate(service, *target, "removed");
        }
        // What the change touches: only those services are re-synced and re-planned. A
        // new node locality changes every service's tiers.
        let scope = if config.node == self.config.node {
            let mut scope = std::mem::take(&mut self.dirty);
            for service in &change.services {
                scope.mark(service);
            }
            scope
        } else {
            Dirty::All
        };
        let diffed_in = started.elapsed();
        self.counters.config_reloads_ok += 1;
        let has_hosts =
            |c: &Config, name: &str| c.service(name).is_some_and(|s| !s.hosts.is_empty());
        let hosts_changed = change
            .services
            .iter()
            .any(|name| has_hosts(&self.config, name) || has_hosts(&config, name));
        self.config = config;
        if hosts_changed {
            self.publish_zone();
        }
        self.probes.sync(
            &self.config,
            &scope,
            &self.changes,
            &mut self.health,
            |s, t| self.passive.is_ejected(s, t),
            |s, ip| hostname_in(&self.source, &self.names, s, ip),
        );
        self.passive.sync_scope(&self.config, &scope);
        self.dirty = scope;
        self.sync_originator();
        let synced_in = started.elapsed();
        let applying = Instant::now();
        self.apply();
        info!(
            why,
            services = self.config.services.len(),
            read_parse_ms = parsed_in.as_millis(),
            diff_ms = (diffed_in - parsed_in).as_millis(),
            sync_ms = (synced_in - diffed_in).as_millis(),
            apply_ms = applying.elapsed().as_millis(),
            total_ms = started.elapsed().as_millis(),
            "configuration reloaded"
        );
    }

    /// A new model from the Kubernetes watches. The first one replaces whatever the
    /// pinned maps held; until it arrives they keep serving.
    fn on_kubernetes_update(&mut self, update: kube_watch::Update) {
        let started = Instant::now();
        let built = update.built;
        let problems: Vec<String> = built
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.failover_service, p.message))
            .collect();
        if problems != self.kubernetes_problems {
            for problem in problems
                .iter()
                .filter(|p| !self.kubernetes_problems.contains(p))
            {
                warn!(%problem, "kubernetes: FailoverService not served in full");
            }
            self.kubernetes_problems = problems;
        }
        let config = self.resolve_model(built.config);
        let change = match &built.touched {
            Some(names) => {
                ConfigChange::among(&self.config, &config, names.iter().map(String::as_str))
            }
            None => ConfigChange::between(&self.config, &config),
        };
        // The model's word on order holds against its previous build, which is what
        // runs unless this is the first (the pinned maps' config before it is empty).
        let same_order = built.same_order && update.first_sync.is_none();
        // Only what changed: a rebuild per watch event would repeat every warning.
        let changed = change.services.iter().filter_map(|s| config.service(s));
        for warning in config.warnings_of(changed) {
            info!(%warning, "kubernetes: service accepted with a warning");
        }
        if let Some(first_sync) = update.first_sync {
            info!(
                sync_ms = first_sync.as_millis(),
                "kubernetes: first sync; the maps now follow the cluster"
            );
        } else if change.services.is_empty() && config.node == self.config.node {
            // Nothing to apply; the model's build still becomes the running config, so
            // that what the next build says changed is against it.
            if !same_order {
                self.config_shape += 1;
            }
            self.config = config;
            return;
        }
        let first = update.first_sync.is_some();
        self.use_config(
            config,
            change,
            same_order,
            "kubernetes",
            started,
            Duration::ZERO,
        );
        if first {
            // The lists of the first sync came and went (whole objects, pages of JSON);
            // what they freed goes back to the system instead of staying in the heap.
            release_free_heap();
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
            Request::Explain { service, port } => match self.explain(&service, port) {
                Ok(view) => Response::Explain(view),
                Err(error) => Response::Error(error),
            },
            Request::Names => Response::Names(self.name_views()),
        }
    }

    /// `detour explain`: the plans of one service port, with what the agent observed of
    /// each endpoint (see `detour_agent::explain`).
    fn explain(&self, name: &str, port: Option<u16>) -> Result<ExplainView, String> {
        let service = self
            .config
            .service(name)
            .ok_or_else(|| format!("no service named {name:?}"))?;
        let ports: Vec<u16> = service.ports.iter().map(|p| p.number).collect();
        let port = match (port, &ports[..]) {
            (Some(port), _) if ports.contains(&port) => port,
            (Some(port), _) => {
                return Err(format!(
                    "service {name:?} has no port {port}; its ports: {}",
                    join_ports(&ports)
                ))
            }
            (None, [only]) => *only,
            (None, _) => {
                return Err(format!(
                    "service {name:?} has ports {}: name one, e.g. `detour explain {name}:{}`",
                    join_ports(&ports),
                    ports[0]
                ))
            }
        };
        let (state, limit) = self.service_state(name);
        let state = limit.map_or_else(|| state.clone(), |limit| format!("{state}: {limit}"));
        let now = Instant::now();
        let wall = std::time::SystemTime::now();
        let frontends = self
            .plans
            .service(name)
            .iter()
            .filter(|plan| plan.port == port)
            .map(|plan| {
                let facts = explain::FrontendFacts {
                    spill: service.locality_lb.spill,
                    state: state.clone(),
                    left_out: self
                        .refused
                        .get(name)
                        .is_some_and(|r| r.frontends.contains(&plan.frontend)),
                };
                explain::explain(
                    service,
                    plan,
                    &facts,
                    |e| explain::Observed {
                        last_error: self.health.last_error(name, e.target).cloned(),
                        ejection: self
                            .passive
                            .state(name, e.target)
                            .filter(|o| o.is_ejected())
                            .map(|o| explain::Ejection {
                                time_left: o.time_left(now),
                                cause: self
                                    .ejection_causes
                                    .get(&(name.to_owned(), e.target))
                                    .cloned(),
                            }),
                        suspect: self.kernel_suspect(&e.target),
                        in_kernel_table: self.in_kernel_table(plan, e),
                    },
                    wall,
                )
            })
            .collect();
        Ok(ExplainView {
            service: name.to_owned(),
            port,
            origin: service.origin.clone(),
            frontends,
        })
    }

    /// What the kernel counted for `target`, or, for a backend only the TLS originator
    /// connects to (the kernel has no id for it), what the originator counted: a failed
    /// TLS handshake there counts as refused.
    fn stats(&self, target: &SocketAddr) -> detour_ebpf::BackendStats {
        match self.reconciler.backend_id(target) {
            Some(id) => self.dataplane.backend_stats(id).unwrap_or_default(),
            None => {
                let counts = self.originator.backend_counts(*target);
                detour_ebpf::BackendStats {
                    connects: counts.connects,
                    established: counts.established,
                    refused: counts.refused + counts.tls_failures,
                    timeouts: counts.timeouts,
                    ..Default::default()
                }
            }
        }
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

    /// `detour services`: one row per (service, port), several VIPs sharing it, from
    /// [`report::ports`] as the metrics are.
    fn service_views(&self) -> Vec<ServiceView> {
        report::ports(
            self.plans.iter(),
            |plan, e| self.in_kernel_table(plan, e),
            |t| self.connects(t),
        )
        .into_iter()
        .map(|port| {
            let (state, limit) = self.service_state(&port.service);
            ServiceView {
                vips: port.frontends.iter().map(|(f, _)| f.to_string()).collect(),
                tier: port.tiers(),
                endpoints: port.targets,
                healthy: port.usable,
                in_table: port.in_table,
                connects: port.connects,
                state,
                limit,
                origin: self.config.service(&port.service).map(|s| s.origin.clone()),
                hosts: self
                    .config
                    .service(&port.service)
                    .map(|s| s.hosts.clone())
                    .unwrap_or_default(),
                tls_relays: port
                    .frontends
                    .iter()
                    .filter_map(|(frontend, _)| {
                        let plan = self
                            .plans
                            .service(&port.service)
                            .iter()
                            .find(|p| p.frontend == *frontend)?;
                        match plan.via {
                            desired::Via::Kernel => None,
                            desired::Via::Originator { relay: Some(relay) } => {
                                Some(format!("{frontend}>{relay}"))
                            }
                            desired::Via::Originator { relay: None } => {
                                Some(format!("{frontend}>no-listener"))
                            }
                        }
                    })
                    .collect(),
                name: port.service,
                port: port.port,
            }
        })
        .collect()
    }

    /// The DNS name the endpoint at `ip` of `service` was resolved from; "" for one
    /// given by address.
    fn hostname_of(&self, service: &str, ip: IpAddr) -> String {
        hostname_in(&self.source, &self.names, service, ip).unwrap_or_default()
    }

    /// `detour names`: every tracked DNS name.
    fn name_views(&self) -> Vec<api::NameView> {
        let now = Instant::now();
        self.names
            .iter()
            .map(|(name, record)| api::NameView {
                name: name.to_string(),
                services: dns::services_using(&self.source, name)
                    .map(|s| s.name.clone())
                    .collect(),
                state: record.state().to_owned(),
                addresses: record.addresses.as_deref().unwrap_or(&[]).to_vec(),
                resolved_secs_ago: record
                    .resolved
                    .map(|(at, _)| now.duration_since(at).as_secs()),
                ttl_secs: record.resolved.map(|(_, ttl)| ttl.as_secs()),
                next_lookup_in_ms: (!record.in_flight).then(|| {
                    let left = record.next_at.saturating_duration_since(now);
                    left.as_millis().try_into().unwrap_or(u64::MAX)
                }),
                failures: record.failures,
                last_error: record.last_error.clone(),
            })
            .collect()
    }

    /// `detour endpoints`: one row per (service, target), from [`report::endpoints`] as
    /// the metrics are.
    fn endpoint_views(&self, service: Option<&str>) -> Vec<EndpointView> {
        let now = Instant::now();
        report::endpoints(self.plans.iter(), service, |plan, e| {
            self.in_kernel_table(plan, e)
        })
        .into_iter()
        .map(|row| {
            let (p, e) = (row.plan, row.endpoint);
            let config = self.config.service(&p.service);
            let stats = self.stats(&e.target);
            let outlier = self.passive.state(&p.service, e.target);
            let ejected = outlier.filter(|o| o.is_ejected());
            EndpointView {
                service: p.service.clone(),
                port: p.port,
                address: e.target,
                locality: config.map(|c| e.locality(c)).unwrap_or_default(),
                cluster: config.map(|c| e.cluster(c)).unwrap_or_default().to_owned(),
                hostname: self.hostname_of(&p.service, e.target.ip()),
                health: e.health.to_string(),
                weight: e.weight,
                tier: e.tier.to_string(),
                in_table: row.in_table,
                connects: stats.connects,
                last_error: self.health.last_error(&p.service, e.target).cloned(),
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
                aborts: stats.aborts,
                steered: self.steered_to(&p.frontend, e.target),
            }
        })
        .collect()
    }

    /// Open flows of `frontend` steered to `target`, as the last sweep counted them.
    fn steered_to(&self, frontend: &SocketAddr, target: SocketAddr) -> u64 {
        match (
            self.reconciler.service_id(frontend),
            self.reconciler.backend_id(&target),
        ) {
            (Some(service), Some(backend)) => self
                .steered
                .live
                .get(&(service, backend))
                .map_or(0, |&n| u64::from(n)),
            _ => 0,
        }
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
    /// What a scrape exposes: the rows of [`report`], as `detour services` and
    /// `detour endpoints` show them, and the kernel's counters once per address.
    fn metrics_snapshot(&self) -> Snapshot {
        let in_table = |plan: &FrontendPlan, e: &PlannedEndpoint| self.in_kernel_table(plan, e);
        let mut endpoints = report::endpoints(self.plans.iter(), None, in_table);
        // Per-backend series only up to the limit: at 100,000 backends they were
        // 930,000 series and 75 MiB of text per scrape.
        let backends_omitted = if endpoints.len() > self.metrics_backend_limit {
            std::mem::take(&mut endpoints).len()
        } else {
            0
        };
        let targets: BTreeSet<SocketAddr> = endpoints.iter().map(|r| r.endpoint.target).collect();
        let backends: Vec<BackendMetrics> = endpoints
            .iter()
            .map(|row| {
                let (plan, e) = (row.plan, row.endpoint);
                let config = self.config.service(&plan.service);
                let outlier = self.passive.state(&plan.service, e.target);
                BackendMetrics {
                    service: plan.service.clone(),
                    backend: e.target.to_string(),
                    locality: config.map(|c| e.locality(c)).unwrap_or_default(),
                    ejections: outlier.map_or(0, |o| u64::from(o.ejections_total)),
                    ejected: e.ejected,
                    healthy: match e.health {
                        Health::Healthy => Some(true),
                        Health::Unhealthy => Some(false),
                        Health::Unknown | Health::Unchecked => None,
                    },
                    in_table: row.in_table,
                }
            })
            .collect();
        let addresses = targets
            .into_iter()
            .map(|target| {
                let stats = self.stats(&target);
                AddressMetrics {
                    backend: target.to_string(),
                    connects: stats.connects,
                    established: stats.established,
                    failures_refused: stats.refused,
                    failures_timeout: stats.timeouts,
                    failures_reset: stats.resets,
                    aborts: stats.aborts,
                }
            })
            .collect();
        let services = report::services(self.plans.iter(), in_table)
            .into_iter()
            .map(|s| ServiceMetrics {
                tiers: s
                    .frontends
                    .iter()
                    .map(|(frontend, tier)| (frontend.to_string(), tier.clone()))
                    .collect(),
                panic: s.panic,
                backends_in_table: s.in_table as u64,
                service: s.service,
            })
            .collect();
        let kernel = self.dataplane.counters().unwrap_or_default();
        let services_over_limit = Limit::ALL
            .iter()
            .map(|limit| {
                let hit = || self.refused.values().filter(|r| r.limit == *limit);
                LimitMetrics {
                    limit: limit.flag().to_string(),
                    refused: hit().filter(|r| !r.running).count() as u64,
                    not_updated: hit().filter(|r| r.running).count() as u64,
                }
            })
            .collect();
        Snapshot {
            services_over_limit,
            addresses,
            backends,
            services,
            events_dropped: kernel[detour_ebpf::counters::EVENTS_DROPPED as usize],
            events_received: self.counters.events_received,
            reconcile: self.counters.reconcile.clone(),
            config_reloads_ok: self.counters.config_reloads_ok,
            dns_lookup_failures: self.counters.dns_failures,
            originator: self.originator.stats(),
            steering: self.steer_metrics(),
            names: self
                .names
                .iter()
                .map(|(name, record)| metrics::NameMetrics {
                    name: name.to_string(),
                    addresses: record.addresses.as_ref().map_or(0, |a| a.len() as u64),
                    failing: record.last_error.is_some(),
                })
                .collect(),
            config_reloads_failed: self.counters.config_reloads_failed,
            sockets_destroyed: self.counters.sockets_destroyed,
            fast_path_avoided: kernel[detour_ebpf::counters::SUSPECT_AVOIDED as usize],
            fast_path_standby: kernel[detour_ebpf::counters::STANDBY_USED as usize],
            fast_path_all_suspect: kernel[detour_ebpf::counters::ALL_SUSPECT as usize],
            backends_omitted: backends_omitted as u64,
            kernel_features: self
                .dataplane
                .kernel
                .pieces
                .iter()
                .map(|p| (p.key.to_owned(), p.present == Some(true)))
                .collect(),
        }
    }
}

fn join_ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    // Watching starts before the first read, so no write after it goes unseen; an
    // event for what was read costs one compare of texts.
    let (file_tx, mut file_rx) = mpsc::channel::<FileEvent>(64);
    let (kube_tx, mut kube_rx) = mpsc::channel::<kube_watch::Update>(1);
    let mut watcher = None;
    let mut kube_task = None;
    let parse_options = config::ParseOptions {
        vip_range: args.vip_range,
    };
    let (config_stamp, config_text, config) = match &args.config {
        Some(path) => {
            watcher = match config_watch::Watcher::new(path).and_then(|w| w.spawn(file_tx)) {
                Ok(task) => Some(task),
                Err(error) => {
                    warn!(%error, config = %path.display(), "cannot watch the config file with inotify; polling it instead (in-place writes are read once they stand still)");
                    None
                }
            };
            let config_stamp = stamp(path);
            let config_text = read_text(path)?;
            let config = parse_config(path, &config_text, &parse_options)?;
            (config_stamp, config_text, config)
        }
        None => {
            let client = kube_client(args.kubeconfig.as_deref()).await?;
            let options = kube_watch::Options {
                node_name: args.node_name.clone().unwrap_or_default(),
                cluster: args.cluster_name.clone(),
            };
            kube_task = Some(kube_watch::spawn(client, options, kube_tx));
            (None, String::new(), Config::default())
        }
    };
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
        max_steered: args.max_steered_flows,
        steer: SteerOptions {
            devices: args
                .steer_devices
                .iter()
                .filter(|d| !d.is_empty() && d.as_str() != "none")
                .cloned()
                .collect(),
            netns: args.steer_netns.clone(),
        },
    })
    .context("loading the datapath")?;
    let reconciler = Reconciler::restore(&dataplane, args.max_services, args.max_backends)
        .context("restoring state from pinned maps")?
        .with_max_slots(args.max_slots);

    let (changes_tx, mut changes_rx) = mpsc::channel::<HealthChange>(1024);
    let (events_tx, _) = broadcast::channel::<EventView>(4096);
    let mut dataplane = dataplane;
    let ring = dataplane
        .take_events()
        .context("the event ring buffer is missing")?;
    let (kernel_tx, mut kernel_rx) = mpsc::channel::<Vec<ConnEvent>>(256);
    let event_reader = spawn_event_reader(ring, kernel_tx)?;
    let (destroyed_tx, mut destroyed_rx) = mpsc::unbounded_channel::<Destroyed>();
    let (dns_tx, mut dns_rx) = mpsc::channel::<lookup::Outcome>(256);
    let (originator, mut originated_rx) =
        Originator::new(args.tls_listen, args.tls_max_connections);
    let mut agent = Agent {
        steered: Sweep::default(),
        max_steered_flows: args.max_steered_flows,
        config_shape: 0,
        config_path: args.config.clone(),
        metrics_backend_limit: args.metrics_backend_limit,
        kubernetes_problems: Vec::new(),
        ejection_causes: HashMap::new(),
        source: Config::default(),
        config: Config::default(),
        names: Names::new(TtlBounds {
            min: args.dns_min_ttl,
            max: args.dns_max_ttl,
        }),
        lookups: None,
        dns_servers: args.dns_servers.clone(),
        dns_timeout: args.dns_timeout,
        dns_answers: dns_tx,
        parse_options,
        zone: watch::channel(Arc::new(nameserver::Zone::new())).0,
        dns_listen: args.dns_listen.0,
        nameserver: None,
        config_text,
        rejected_text: None,
        config_stamp,
        config_tracker: WriteTracker::new(SettlePolicy {
            settle: args.config_settle,
            removal_hold: args.config_removal_hold,
        }),
        config_watched: watcher.is_some(),
        config_wake: None,
        config_held: None,
        dataplane,
        reconciler,
        health: HealthMap::default(),
        probes: Probes::default(),
        plans: PlanCache::default(),
        dirty: Dirty::All,
        refused: BTreeMap::new(),
        originator,
        tls_clients: HashMap::new(),
        tls_handshake_timeout: args.tls_handshake_timeout,
        plans_relays: HashMap::new(),
        changes: changes_tx,
        passive: PassiveHealth::default(),
        service_of_id: HashMap::new(),
        events: events_tx,
        cgroup: cgroup.clone(),
        destroyed: destroyed_tx,
        counters: Counters::default(),
    };
    agent.config = agent.resolve(config);
    first_lookups(&mut agent, &mut dns_rx).await;
    agent.publish_zone();
    agent.probes.sync(
        &agent.config,
        &Dirty::All,
        &agent.changes,
        &mut agent.health,
        |_, _| false,
        |s, ip| hostname_in(&agent.source, &agent.names, s, ip),
    );
    agent.passive.sync(&agent.config);
    agent.sync_originator();
    if agent.config_path.is_some() {
        agent.apply();
    } else {
        info!("kubernetes: serving what the pinned maps hold until the first sync");
    }
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
    let mut steer_sweep = tokio::time::interval(STEER_SWEEP);
    loop {
        let outlier_deadline = agent.passive.next_deadline();
        let names_due = agent.names.next_due();
        tokio::select! {
            Some(batch) = kernel_rx.recv() => agent.on_kernel_events(batch),
            Some(report) = originated_rx.recv() => agent.on_originator_report(report),
            Some(done) = destroyed_rx.recv() => agent.on_destroyed(done),
            Some(reply) = scrape_rx.recv() => {
                let _ = reply.send(metrics::render(&agent.metrics_snapshot()));
            }
            () = sleep_until(outlier_deadline), if outlier_deadline.is_some() => {
                agent.on_outlier_deadline();
            }
            Some(change) = changes_rx.recv() => agent.on_health_change(change),
            Some(answer) = dns_rx.recv() => agent.on_name_answer(answer),
            () = sleep_until(names_due), if names_due.is_some() => agent.look_up_due(),
            Some(update) = kube_rx.recv() => agent.on_kubernetes_update(update),
            Some((request, reply)) = api_rx.recv() => {
                let _ = reply.send(agent.answer(request));
            }
            _ = hup.recv() => {
                // An explicit reload reports a still-bad file again, and says the
                // writer is done: whatever the file holds now is applied.
                agent.rejected_text = None;
                agent.config_tracker.read_done();
                agent.config_held = None;
                agent.reload("SIGHUP", Trust::Complete);
                agent.reload_tls();
            }
            event = file_rx.recv(), if agent.config_watched => match event {
                Some(event) => agent.on_file_event(event),
                None => {
                    warn!("config file watch ended; polling the file instead");
                    agent.config_watched = false;
                }
            },
            () = sleep_until(agent.config_wake), if agent.config_wake.is_some() => {
                agent.check_config();
            }
            _ = poll.tick(), if !agent.config_watched && agent.config_path.is_some() => {
                agent.poll_config();
            }
            _ = release.tick(), if agent.reconciler.has_pending_releases() => agent.release_backends(),
            _ = steer_sweep.tick(), if agent.dataplane.steering.is_some() => agent.sweep_steering(),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    api_task.abort();
    event_reader.abort();
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    if let Some(task) = kube_task {
        task.abort();
    }
    metrics_task.abort();
    if let Some(task) = agent.nameserver.take() {
        task.abort();
    }
    let _ = std::fs::remove_file(&args.socket);
    warn!(pins = %args.bpffs.display(), "agent stopping; programs stay attached through their pins");
    Ok(())
}

/// How often the steering table is swept for closed flows past their grace.
const STEER_SWEEP: Duration = Duration::from_secs(5);

/// Waits for the first answers for the names the configuration uses, so that the first
/// apply serves their addresses instead of replacing what the pinned maps hold with
/// none; bounded by two tries of every server, plus a second. A name still unanswered
/// then is served from its first answer on.
async fn first_lookups(agent: &mut Agent, answers: &mut mpsc::Receiver<lookup::Outcome>) {
    let in_flight = |names: &Names| names.iter().filter(|(_, r)| r.in_flight).count();
    if in_flight(&agent.names) == 0 {
        return;
    }
    let wait = (agent.dns_timeout * 2 + Duration::from_secs(1)).min(lookup::LOOKUP_DEADLINE);
    let deadline = tokio::time::Instant::now() + wait;
    while in_flight(&agent.names) > 0 {
        match tokio::time::timeout_at(deadline, answers.recv()).await {
            Ok(Some((name, outcome))) => {
                agent.names.record(&name, outcome, Instant::now());
            }
            Ok(None) | Err(_) => break,
        }
    }
    for (name, record) in agent.names.iter() {
        match (&record.addresses, &record.last_error) {
            (Some(addresses), _) => info!(%name, addresses = addresses.len(), "DNS name resolved"),
            (None, Some(error)) => {
                warn!(%name, %error, "DNS name did not resolve; its endpoints serve once it does");
            }
            (None, None) => {
                warn!(%name, "DNS name not answered yet; its endpoints serve once it is")
            }
        }
    }
    agent.config = dns::expand_all(&agent.source, &agent.names);
}

/// A client for the agent's own cluster: `kubeconfig` when given, else in-cluster
/// configuration, else `KUBECONFIG` / `~/.kube/config`.
async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding the Kubernetes API server (in-cluster or KUBECONFIG)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
    }
}

/// Serves the CLI socket within [`api::Limits`]: answers come from the agent's loop,
/// event streams straight from the broadcast channel.
async fn serve_api(
    listener: tokio::net::UnixListener,
    calls: mpsc::Sender<ApiCall>,
    events: broadcast::Sender<EventView>,
) {
    let limits = api::Limits::default();
    api::serve(listener, limits, move |request, mut write| {
        let calls = calls.clone();
        let events = events.clone();
        async move {
            if request == Request::Events {
                stream_events(events.subscribe(), &mut write).await;
                return;
            }
            let (tx, rx) = oneshot::channel();
            if calls.send((request, tx)).await.is_err() {
                return;
            }
            let response = rx
                .await
                .unwrap_or_else(|_| Response::Error("agent is stopping".into()));
            let answer = api::write_response(&mut write, &response);
            let _ = tokio::time::timeout(limits.write_timeout, answer).await;
        }
    })
    .await;
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

/// Whether the agent lifts the kernel's suspect mark of `event`'s backend once it has
/// judged the event. The mark stands while some service has the backend ejected, and
/// while a first SYN retransmission awaits its outcome; a success, or a failure run the
/// agent does not eject for (the tier's cap was reached), lifts it.
fn lifts_suspect_mark(event: &ConnEvent, ejected_anywhere: impl FnOnce() -> bool) -> bool {
    let settles = event.kind == detour_ebpf::event_kind::ESTABLISHED
        || (event.marked_suspect != 0 && event.kind != detour_ebpf::event_kind::SYN_RETRANSMIT);
    settles && !ejected_anywhere()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u32, marked_suspect: u32) -> ConnEvent {
        ConnEvent {
            ts_ns: 1,
            kind,
            service_id: 1,
            backend_id: 7,
            fail_streak: 1,
            rtt_us: 0,
            marked_suspect,
        }
    }

    #[test]
    fn the_suspect_mark_settles_on_a_success_or_an_unconfirmed_failure_only() {
        use detour_ebpf::event_kind::{ESTABLISHED, REFUSED, SYN_RETRANSMIT, TIMEOUT};
        let not_ejected = || false;
        // A success lifts the mark; so does a failure the kernel marked and the agent
        // did not eject for (a tier at its ejection cap).
        assert!(lifts_suspect_mark(&event(ESTABLISHED, 0), not_ejected));
        assert!(lifts_suspect_mark(&event(ESTABLISHED, 1), not_ejected));
        assert!(lifts_suspect_mark(&event(REFUSED, 1), not_ejected));
        assert!(lifts_suspect_mark(&event(TIMEOUT, 1), not_ejected));
        // A first SYN retransmission's mark stands until its handshake's outcome.
        assert!(!lifts_suspect_mark(&event(SYN_RETRANSMIT, 1), not_ejected));
        // A failure below the threshold marked nothing: its run goes on counting.
        assert!(!lifts_suspect_mark(&event(REFUSED, 0), not_ejected));
        assert!(!lifts_suspect_mark(&event(TIMEOUT, 0), not_ejected));
        // While any service has the backend ejected, nothing lifts it.
        for (kind, marked) in [(ESTABLISHED, 0), (REFUSED, 1), (TIMEOUT, 1)] {
            assert!(!lifts_suspect_mark(&event(kind, marked), || true));
        }
    }

    #[test]
    fn a_reload_terminates_exactly_the_targets_it_removes() {
        let old = detour_agent::config::parse(
            "
services:
  - name: kept
    vips: [127.200.0.1]
    ports: [{number: 80, targetPort: 8080}]
    endpoints: [{address: 127.0.1.1}, {address: 127.0.1.2}]
  - name: shrunk
    vips: [127.200.0.2]
    ports: [{number: 80, targetPort: 8080}, {number: 81, targetPort: 8081}]
    endpoints: [{address: 127.0.2.1}, {address: 127.0.2.2}]
  - name: dropped
    vips: [127.200.0.3]
    ports: [{number: 80, targetPort: 8080}]
    endpoints: [{address: 127.0.3.1}]
  - name: moved
    vips: [127.200.0.4]
    ports: [{number: 80, targetPort: 8080}]
    endpoints: [{address: 127.0.4.1}]
",
        )
        .unwrap();
        let new = detour_agent::config::parse(
            "
services:
  - name: kept
    vips: [127.200.0.1]
    ports: [{number: 80, targetPort: 8080}]
    endpoints: [{address: 127.0.1.1, weight: 2}, {address: 127.0.1.2}]
  - name: shrunk
    vips: [127.200.0.2]
    ports: [{number: 80, targetPort: 8080}]
    endpoints: [{address: 127.0.2.1}]
  - name: moved
    vips: [127.200.0.4]
    ports: [{number: 80, targetPort: 9090}]
    endpoints: [{address: 127.0.4.1}]
  - name: added
    vips: [127.200.0.5]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.5.1}]
",
        )
        .unwrap();
        let change = ConfigChange::between(&old, &new);
        let mut removed: Vec<(String, String)> = change
            .removed_targets
            .iter()
            .map(|(service, target)| (service.clone(), target.to_string()))
            .collect();
        removed.sort();
        let expected: Vec<(String, String)> = [
            ("dropped", "127.0.3.1:8080"),
            ("moved", "127.0.4.1:8080"),
            ("shrunk", "127.0.2.1:8081"),
            ("shrunk", "127.0.2.2:8080"),
            ("shrunk", "127.0.2.2:8081"),
        ]
        .iter()
        .map(|(s, t)| ((*s).to_owned(), (*t).to_owned()))
        .collect();
        // An edited endpoint that stays (`kept`'s new weight) loses nothing; a target
        // that moved port is gone from its old one.
        assert_eq!(removed, expected);
        let touched: Vec<&str> = change.services.iter().map(String::as_str).collect();
        assert_eq!(touched, ["added", "dropped", "kept", "moved", "shrunk"]);
        // Nothing removed, nothing to terminate.
        assert!(ConfigChange::between(&new, &new).removed_targets.is_empty());
    }

    #[test]
    fn the_metrics_address_takes_a_port_alone_for_loopback() {
        assert_eq!(
            parse_metrics_address(":0"),
            Ok("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_address(":9474"),
            Ok("127.0.0.1:9474".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_address("0.0.0.0:9474"),
            Ok("0.0.0.0:9474".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_address("[::1]:80"),
            Ok("[::1]:80".parse().unwrap())
        );
        for bad in ["", ":", ":x", ":70000", "9474", "localhost:9474"] {
            let error = parse_metrics_address(bad).unwrap_err();
            assert!(error.contains("expected IP:PORT"), "{bad}: {error}");
        }
    }

    /// Two services: `plain` with checks off (two endpoints), `checked` with TCP checks
    /// every `interval` (one endpoint, on a loopback port nothing listens on).
    fn probe_config(with_plain: bool, interval: &str) -> Config {
        let plain = "
  - name: plain
    vips: [127.200.0.1]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.9.1}, {address: 127.0.9.2}]
    healthCheck: {disabled: true}";
        config::parse(&format!(
            "services:{}
  - name: checked
    vips: [127.200.0.2]
    ports: [{{number: 80}}]
    endpoints: [{{address: 127.0.9.3, ports: {{port-80: 9}}}}]
    healthCheck: {{interval: {interval}}}
",
            if with_plain { plain } else { "" }
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn probe_sync_keeps_what_stays_and_forgets_what_left() {
        let (changes, _rx) = mpsc::channel(16);
        let (mut probes, mut health) = (Probes::default(), HealthMap::default());
        let target = |a: &str| -> SocketAddr { a.parse().unwrap() };
        let checked = target("127.0.9.3:9");
        let task_id = |probes: &Probes| probes.running.get("checked", checked).unwrap().1.id();

        let first = probe_config(true, "1s");
        probes.sync(
            &first,
            &Dirty::All,
            &changes,
            &mut health,
            |_, _| false,
            |_, _| None,
        );
        let health_of = |h: &HealthMap, s: &str, t: &str| h.health(s, target(t));
        assert_eq!(
            health_of(&health, "plain", "127.0.9.1:80"),
            Some(Health::Unchecked)
        );
        assert_eq!(
            health_of(&health, "plain", "127.0.9.2:80"),
            Some(Health::Unchecked)
        );
        assert_eq!(
            health_of(&health, "checked", "127.0.9.3:9"),
            Some(Health::Unknown)
        );
        assert_eq!(probes.running.services().collect::<Vec<_>>(), ["checked"]);
        let probe = task_id(&probes);
        // A verdict the probe reported stands while its probe runs on.
        health.checked.get_mut("checked", checked).unwrap().0 = Health::Healthy;

        // `plain` removed: its entries go; `checked`, out of scope, is untouched.
        let second = probe_config(false, "1s");
        let scope = Dirty::Services(["plain".to_owned()].into());
        probes.sync(
            &second,
            &scope,
            &changes,
            &mut health,
            |_, _| false,
            |_, _| None,
        );
        assert_eq!(health.services(), ["checked"]);
        assert_eq!(
            health_of(&health, "checked", "127.0.9.3:9"),
            Some(Health::Healthy)
        );
        assert_eq!(task_id(&probes), probe);

        // In scope with the same spec: the probe and its verdict stay.
        let scope = Dirty::Services(["checked".to_owned()].into());
        probes.sync(
            &second,
            &scope,
            &changes,
            &mut health,
            |_, _| false,
            |_, _| None,
        );
        assert_eq!(task_id(&probes), probe);
        assert_eq!(
            health_of(&health, "checked", "127.0.9.3:9"),
            Some(Health::Healthy)
        );

        // A new spec restarts the probe, and its health starts over.
        let third = probe_config(false, "2s");
        probes.sync(
            &third,
            &scope,
            &changes,
            &mut health,
            |_, _| false,
            |_, _| None,
        );
        assert_ne!(task_id(&probes), probe);
        assert_eq!(
            health_of(&health, "checked", "127.0.9.3:9"),
            Some(Health::Unknown)
        );

        // Checks turned off: the probe stops and every target is unchecked.
        let off = config::parse(
            "services:
  - name: checked
    vips: [127.200.0.2]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.9.3, ports: {port-80: 9}}]
    healthCheck: {disabled: true}
",
        )
        .unwrap();
        probes.sync(
            &off,
            &scope,
            &changes,
            &mut health,
            |_, _| false,
            |_, _| None,
        );
        assert_eq!(probes.running.services().count(), 0);
        assert_eq!(
            health_of(&health, "checked", "127.0.9.3:9"),
            Some(Health::Unchecked)
        );

        // A full sync of a config without it forgets it.
        probes.sync(
            &probe_config(true, "2s"),
            &Dirty::All,
            &changes,
            &mut health,
            |_, _| false,
            |_, _| None,
        );
        assert_eq!(health.services(), ["checked", "plain"]);
        let empty = config::parse("services: []").unwrap();
        probes.sync(
            &empty,
            &Dirty::All,
            &changes,
            &mut health,
            |_, _| false,
            |_, _| None,
        );
        assert!(health.services().is_empty());
        assert_eq!(probes.running.services().count(), 0);
    }
}
