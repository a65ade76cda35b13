//! `detour controller`: the small leader-elected Deployment that connects the agents'
//! cluster to the others. Agents watch only their own cluster; the controller reads the
//! remote clusters named by kubeconfig Secrets ([`clusters`]) and, for every
//! FailoverService, mirrors the endpoints of its remote backing Services into local
//! EndpointSlices ([`mirror`]), gives it a VIP (a selectorless Service it owns), and
//! writes its status ([`status`]).
//!
//! One loop does everything: watches ([`watch`]) wake it, it recomputes what should
//! exist from what the watches hold, and writes the difference.
//!
//! Invariants:
//! - only the leader (a `coordination.k8s.io` Lease, kube-lease-manager) writes; every
//!   replica watches, so a new leader starts warm;
//! - writes are server-side apply with field manager [`FIELD_MANAGER`], and happen only
//!   when what is wanted differs from what the watch shows (or was just written);
//! - nothing is written or deleted before the local watches have listed once;
//! - fail-static: mirrors of a remote Service are rewritten only from a connection that
//!   has listed it, and never deleted while its cluster is unreachable; they are deleted
//!   when no FailoverService names the Service any more, or its cluster's Secret entry is
//!   gone;
//! - one FailoverService's problems (a missing backend, an unknown cluster, a conflict)
//!   show in its own status and change nothing for the others.

pub mod clusters;
pub mod mirror;
pub mod names;
pub mod status;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource as _, ResourceExt as _};
use serde_json::{json, Value};
use tokio::sync::{watch as channel, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::sources::kubernetes::objects::WatchedSlice;
use crate::sources::kubernetes::{labels, FailoverService};
use clusters::{remote_entries, Clusters};
use mirror::MirrorKey;
use status::BackendState;
use watch::{watch, Watched};

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "detour-controller";
/// How often the loop runs without being woken, to retry and to repair.
const RESYNC: Duration = Duration::from_secs(30);
/// After a failed write, when to try again.
const RETRY: Duration = Duration::from_secs(1);
/// Wakes that arrive this close together are handled by one pass.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// A write not yet seen by the watch is not repeated within this time.
const PENDING: Duration = Duration::from_secs(5);

/// `detour controller` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// The controller's namespace: remote-cluster Secrets are read, mirrored
    /// EndpointSlices and the leader Lease are written here.
    #[arg(long, default_value = "detour-system")]
    pub namespace: String,
    /// This cluster's name, as FailoverServices' `clusterName` calls it: references to it
    /// are local and not mirrored.
    #[arg(long)]
    pub cluster_name: String,
    /// A kubeconfig for the local cluster; default: in-cluster, else `$KUBECONFIG` or
    /// `~/.kube/config`.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// How long a new remote cluster may take to list before what it has listed is
    /// served anyway.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub initial_sync_timeout: Duration,
    /// The Lease that elects the one replica that writes.
    #[arg(long, default_value = "detour-controller")]
    pub lease_name: String,
    /// This replica's identity in the Lease; default: the host name and the process id.
    #[arg(long)]
    pub identity: Option<String>,
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("reading the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("finding the local cluster's configuration (in-cluster or kubeconfig): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the local cluster's client: {0}")]
    Client(#[from] kube::Error),
    #[error("leader election with Lease {lease}: {source}")]
    Lease {
        lease: String,
        source: kube_lease_manager::LeaseManagerError,
    },
}

/// Runs the controller for `args` until interrupted (SIGINT/SIGTERM).
pub async fn run(args: ControllerArgs) -> Result<(), ControllerError> {
    // `try_init`: a test or embedding that set a subscriber keeps it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ControllerError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| ControllerError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(config)?;
    let (stop_tx, stop_rx) = channel::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        info!("stopping");
        let _ = stop_tx.send(true);
    });
    Controller::start(client, args).run(stop_rx).await
}

/// The controller's local watches.
struct Local {
    failover_services: Watched<FailoverService>,
    secrets: Watched<Secret>,
    mirrors: Watched<EndpointSlice>,
    vips: Watched<Service>,
    services: Watched<PartialObjectMeta<Service>>,
    /// The cluster's own EndpointSlices (slim), for the local tiers' endpoint counts.
    slices: Watched<WatchedSlice>,
}

impl Local {
    fn start(client: &kube::Client, namespace: &str, wake: &Arc<Notify>) -> Self {
        let w = || Arc::clone(wake);
        Self {
            failover_services: Watched::spawn(
                "FailoverServices".into(),
                watch(Api::all(client.clone()), watcher::Config::default()),
                w(),
            ),
            secrets: Watched::spawn(
                "remote-cluster Secrets".into(),
                watch(
                    Api::namespaced(client.clone(), namespace),
                    watcher::Config::default()
                        .labels(&format!("{}=true", labels::REMOTE_CLUSTER_SECRET)),
                ),
                w(),
            ),
            mirrors: Watched::spawn(
                "mirrored EndpointSlices".into(),
                watch(
                    Api::namespaced(client.clone(), namespace),
                    watcher::Config::default().labels(&format!(
                        "{}={}",
                        labels::MANAGED_BY,
                        labels::CONTROLLER
                    )),
                ),
                w(),
            ),
            vips: Watched::spawn(
                "VIP Services".into(),
                watch(
                    Api::all(client.clone()),
                    watcher::Config::default().labels(labels::FAILOVER_SERVICE),
                ),
                w(),
            ),
            services: Watched::spawn(
                "local Services".into(),
                watch(
                    Api::<PartialObjectMeta<Service>>::all(client.clone()),
                    watcher::Config::default(),
                ),
                w(),
            ),
            slices: Watched::spawn(
                "local EndpointSlices".into(),
                watch(
                    Api::<WatchedSlice>::all(client.clone()),
                    watcher::Config::default().labels(labels::KUBE_SERVICE_NAME),
                ),
                w(),
            ),
        }
    }

    fn synced(&self) -> bool {
        self.failover_services.synced()
            && self.secrets.synced()
            && self.mirrors.synced()
            && self.vips.synced()
            && self.services.synced()
            && self.slices.synced()
    }
}

/// What one remote Service looks like to this pass.
enum KeyView {
    /// Its cluster is named by no Secret: mirror nothing.
    Unknown,
    /// Not listed by a serving connection: leave its mirrors as they are.
    NotSynced,
    /// Listed: these are its mirrors.
    Listed { found: bool, mirror: mirror::Mirror },
}

/// The controller: its watches, its remote clusters and what it wrote recently.
pub struct Controller {
    client: kube::Client,
    args: ControllerArgs,
    wake: Arc<Notify>,
    local: Local,
    clusters: Clusters,
    /// Writes the watches have not shown yet: object key → (what was written, when).
    pending: HashMap<String, (Value, Instant)>,
}

impl Controller {
    /// Starts the watches (they run from now on, leader or not).
    pub fn start(client: kube::Client, args: ControllerArgs) -> Self {
        let wake = Arc::new(Notify::new());
        Self {
            local: Local::start(&client, &args.namespace, &wake),
            clusters: Clusters::new(args.initial_sync_timeout, Arc::clone(&wake)),
            client,
            args,
            wake,
            pending: HashMap::new(),
        }
    }

    /// Elects a leader and reconciles until `stop` turns true. Only the leader writes.
    pub async fn run(mut self, mut stop: channel::Receiver<bool>) -> Result<(), ControllerError> {
        let identity = self.args.identity.clone().unwrap_or_else(default_identity);
        let lease = |source| ControllerError::Lease {
            lease: self.args.lease_name.clone(),
            source,
        };
        let manager = kube_lease_manager::LeaseManagerBuilder::new(
            self.client.clone(),
            &self.args.lease_name,
        )
        .with_namespace(&self.args.namespace)
        .with_identity(&identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .map_err(lease)?;
        let (mut leader, lease_task) = manager.watch().await;
        info!(cluster = %self.args.cluster_name, namespace = %self.args.namespace, %identity, "controller started");
        let mut retry_at: Option<Instant> = None;
        let mut was_leader = false;
        let mut lease_alive = true;
        loop {
            let next = [
                Some(Instant::now() + RESYNC),
                retry_at,
                self.clusters.next_deadline(),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + RESYNC);
            tokio::select! {
                () = self.wake.notified() => tokio::time::sleep(DEBOUNCE).await,
                () = tokio::time::sleep_until(next) => {}
                changed = leader.changed(), if lease_alive => if changed.is_err() {
                    // The lease task retries API errors itself; it ends only when the
                    // runtime shuts down.
                    warn!("leader election stopped; no longer writing");
                    lease_alive = false;
                },
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                break;
            }
            let is_leader = lease_alive && *leader.borrow();
            if is_leader != was_leader {
                info!(leader = is_leader, %identity, "leadership changed");
                was_leader = is_leader;
                self.pending.clear();
            }
            let ok = self.pass(is_leader).await;
            retry_at = (!ok).then(|| Instant::now() + RETRY);
        }
        // Dropping the receiver makes the lease task release the Lease.
        drop(leader);
        if let Ok(Err(error)) = lease_task.await {
            warn!(%error, "releasing the Lease");
        }
        Ok(())
    }

    /// One pass: brings the remote connections, mirrors, VIP Services and statuses in
    /// step with the watches. Returns false when a write failed (to retry soon).
    pub async fn pass(&mut self, write: bool) -> bool {
        if !self.local.synced() {
            return true;
        }
        let local_cluster = self.args.cluster_name.clone();
        let failover_services = self.local.failover_services.store().state();
        let wanted: BTreeSet<MirrorKey> = failover_services
            .iter()
            .flat_map(|f| f.spec.backing_services.iter())
            .filter_map(|b| {
                let s = b.kube_service.as_ref()?;
                let cluster = s.cluster_name.as_deref()?;
                (cluster != local_cluster).then(|| MirrorKey {
                    cluster: cluster.to_owned(),
                    namespace: s.namespace.clone(),
                    service: s.name.clone(),
                })
            })
            .collect();
        let (entries, refused) =
            remote_entries(&self.local.secrets.store().state(), &local_cluster);
        self.clusters.update(entries, refused, &wanted).await;
        if !write {
            return true;
        }

        let views: BTreeMap<MirrorKey, KeyView> = wanted
            .iter()
            .map(|key| (key.clone(), self.view(key)))
            .collect();
        let mut ok = true;
        let mut failed_keys = BTreeSet::new();
        if !self.write_mirrors(&views, &mut failed_keys).await {
            ok = false;
        }
        let refused = status::conflicts(&failover_services);
        let vips = match self.write_vips(&failover_services, &refused).await {
            Ok(vips) => vips,
            Err(vips) => {
                ok = false;
                vips
            }
        };
        for fos in &failover_services {
            if !self
                .write_status(fos, &refused, &views, &vips, &failed_keys)
                .await
            {
                ok = false;
            }
        }
        ok
    }

    fn view(&self, key: &MirrorKey) -> KeyView {
        let Some(remote) = self.clusters.remotes.get(&key.cluster) else {
            return KeyView::Unknown;
        };
        let Some(connection) = remote.active.as_ref() else {
            return KeyView::NotSynced;
        };
        let Some(watch) = connection.synced_service(key) else {
            return KeyView::NotSynced;
        };
        let service = watch.service.store().state().into_iter().next();
        let slices = watch.slices.store().state();
        KeyView::Listed {
            found: service.is_some(),
            mirror: mirror::mirror(
                key,
                &self.args.namespace,
                service.as_deref(),
                slices.iter().map(AsRef::as_ref),
                |node| connection.node_locality(node),
            ),
        }
    }

    /// Applies the mirrors that changed, then deletes those no longer wanted.
    async fn write_mirrors(
        &mut self,
        views: &BTreeMap<MirrorKey, KeyView>,
        failed: &mut BTreeSet<MirrorKey>,
    ) -> bool {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.args.namespace);
        let existing: BTreeMap<String, Arc<EndpointSlice>> = self
            .local
            .mirrors
            .store()
            .state()
            .into_iter()
            .map(|s| (s.name_any(), s))
            .collect();
        let mut ok = true;
        let mut wanted_names = BTreeSet::new();
        for (key, view) in views {
            let KeyView::Listed { mirror, .. } = view else {
                continue;
            };
            for slice in &mirror.slices {
                let name = slice.name_any();
                wanted_names.insert(name.clone());
                let desired = slice_projection(slice);
                let observed = existing.get(&name).map(|s| slice_projection(s));
                if !self.needs_write(&format!("slice/{name}"), &desired, observed.as_ref()) {
                    continue;
                }
                match api
                    .patch(&name, &apply_params(), &Patch::Apply(slice))
                    .await
                {
                    Ok(_) => {
                        debug!(slice = %name, service = %key, endpoints = slice.endpoints.as_ref().map_or(0, Vec::len), "mirrored EndpointSlice written");
                        self.written(format!("slice/{name}"), desired);
                    }
                    Err(error) => {
                        warn!(slice = %name, service = %key, %error, "writing a mirrored EndpointSlice failed");
                        failed.insert(key.clone());
                        ok = false;
                    }
                }
            }
        }
        for (name, slice) in &existing {
            if wanted_names.contains(name) {
                continue;
            }
            let keep = match MirrorKey::of_mirror(slice) {
                // Fail-static: an unreachable cluster's mirrors stay.
                Some(key) => matches!(views.get(&key), Some(KeyView::NotSynced)),
                None => false,
            };
            if keep {
                continue;
            }
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {
                    info!(slice = %name, "mirrored EndpointSlice deleted: no longer wanted");
                    self.pending.remove(&format!("slice/{name}"));
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => {
                    warn!(slice = %name, %error, "deleting a mirrored EndpointSlice failed");
                    ok = false;
                }
            }
        }
        ok
    }

    /// Applies each accepted FailoverService's VIP Service (those without
    /// `spec.virtualIP`), deletes the others; returns the VIP of each FailoverService
    /// (by namespace/name) that has one, `Err` with the same when a write failed.
    async fn write_vips(
        &mut self,
        failover_services: &[Arc<FailoverService>],
        refused: &BTreeMap<(String, String), status::Refused>,
    ) -> Result<BTreeMap<(String, String), String>, BTreeMap<(String, String), String>> {
        let mut ok = true;
        let mut vips = BTreeMap::new();
        let mut wanted = BTreeSet::new();
        for fos in failover_services {
            let namespace = fos.namespace().unwrap_or_default();
            let id = (namespace.clone(), fos.name_any());
            if let Some(vip) = &fos.spec.virtual_ip {
                vips.insert(id, vip.clone());
                continue;
            }
            if refused.contains_key(&id) {
                continue;
            }
            let Some(service) = vip_service(fos) else {
                continue;
            };
            let name = service.name_any();
            wanted.insert((namespace.clone(), name.clone()));
            let observed = self
                .local
                .vips
                .store()
                .get(&ObjectRef::new(&name).within(&namespace));
            if let Some(ip) = observed
                .as_ref()
                .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
                .filter(|ip| !ip.is_empty() && ip != "None")
            {
                vips.insert(id.clone(), ip);
            }
            let desired = vip_projection(&service);
            let key = format!("service/{namespace}/{name}");
            if !self.needs_write(
                &key,
                &desired,
                observed.map(|s| vip_projection(&s)).as_ref(),
            ) {
                continue;
            }
            let api: Api<Service> = Api::namespaced(self.client.clone(), &namespace);
            match api
                .patch(&name, &apply_params(), &Patch::Apply(&service))
                .await
            {
                Ok(written) => {
                    info!(service = %name, %namespace, failover_service = %fos.name_any(), "VIP Service written");
                    if let Some(ip) = written.spec.and_then(|s| s.cluster_ip) {
                        vips.insert(id, ip);
                    }
                    self.written(key, desired);
                }
                Err(error) => {
                    warn!(service = %name, %namespace, %error, "writing a VIP Service failed");
                    ok = false;
                }
            }
        }
        for service in self.local.vips.store().state() {
            let namespace = service.namespace().unwrap_or_default();
            let name = service.name_any();
            if wanted.contains(&(namespace.clone(), name.clone())) {
                continue;
            }
            let api: Api<Service> = Api::namespaced(self.client.clone(), &namespace);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    info!(service = %name, %namespace, "VIP Service deleted: its FailoverService is gone, has a virtualIP or is not accepted");
                    self.pending.remove(&format!("service/{namespace}/{name}"));
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => {
                    warn!(service = %name, %namespace, %error, "deleting a VIP Service failed");
                    ok = false;
                }
            }
        }
        if ok {
            Ok(vips)
        } else {
            Err(vips)
        }
    }

    async fn write_status(
        &mut self,
        fos: &FailoverService,
        refused: &BTreeMap<(String, String), status::Refused>,
        views: &BTreeMap<MirrorKey, KeyView>,
        vips: &BTreeMap<(String, String), String>,
        failed_keys: &BTreeSet<MirrorKey>,
    ) -> bool {
        let namespace = fos.namespace().unwrap_or_default();
        let name = fos.name_any();
        let id = (namespace.clone(), name.clone());
        let mut write_failed = false;
        let backends = fos
            .spec
            .backing_services
            .iter()
            .map(|b| {
                // Each agent resolves an external endpoint itself: nothing to mirror.
                let Some(s) = &b.kube_service else {
                    return (String::new(), BackendState::External);
                };
                let cluster = s
                    .cluster_name
                    .clone()
                    .unwrap_or_else(|| self.args.cluster_name.clone());
                if cluster == self.args.cluster_name {
                    let exists = self
                        .local
                        .services
                        .store()
                        .get(&ObjectRef::new(&s.name).within(&s.namespace))
                        .is_some();
                    let state = if exists {
                        let (ready, serving_terminating) = status::count_local(
                            &self.local.slices.store().state(),
                            &s.namespace,
                            &s.name,
                        );
                        BackendState::Local {
                            ready,
                            serving_terminating,
                        }
                    } else {
                        BackendState::NotFound
                    };
                    return (cluster, state);
                }
                let key = MirrorKey {
                    cluster: cluster.clone(),
                    namespace: s.namespace.clone(),
                    service: s.name.clone(),
                };
                write_failed |= failed_keys.contains(&key);
                let state = match views.get(&key) {
                    None | Some(KeyView::Unknown) => BackendState::ClusterUnknown,
                    Some(KeyView::NotSynced) => BackendState::NotSynced,
                    Some(KeyView::Listed { found: false, .. }) => BackendState::NotFound,
                    Some(KeyView::Listed { mirror, .. }) => BackendState::Remote {
                        ready: mirror.ready,
                        serving_terminating: mirror.serving_terminating,
                    },
                };
                (cluster, state)
            })
            .collect();
        let desired = status::status(&status::Inputs {
            fos,
            refused: refused.get(&id),
            backends,
            virtual_ip: vips.get(&id).cloned(),
            write_failed,
            now: Time(k8s_openapi::jiff::Timestamp::now()),
        });
        let desired_value = serde_json::to_value(&desired).unwrap_or(Value::Null);
        let observed = fos
            .status
            .as_ref()
            .map(|s| serde_json::to_value(s).unwrap_or(Value::Null));
        let key = format!("status/{namespace}/{name}");
        if !self.needs_write(&key, &desired_value, observed.as_ref()) {
            return true;
        }
        let api: Api<FailoverService> = Api::namespaced(self.client.clone(), &namespace);
        let body = json!({
            "apiVersion": FailoverService::api_version(&()),
            "kind": FailoverService::kind(&()),
            "status": desired,
        });
        match api
            .patch_status(&name, &apply_params(), &Patch::Apply(&body))
            .await
        {
            Ok(_) => {
                debug!(failover_service = %name, %namespace, "status written");
                self.written(key, desired_value);
                true
            }
            Err(kube::Error::Api(status)) if status.code == 404 => true,
            Err(error) => {
                warn!(failover_service = %name, %namespace, %error, "writing status failed");
                false
            }
        }
    }

    /// Whether `desired` must be written: it differs from what the watch shows, and was
    /// not written moments ago (the watch may not show it yet).
    fn needs_write(&mut self, key: &str, desired: &Value, observed: Option<&Value>) -> bool {
        if observed == Some(desired) {
            self.pending.remove(key);
            return false;
        }
        !matches!(
            self.pending.get(key),
            Some((written, at)) if written == desired && at.elapsed() < PENDING
        )
    }

    fn written(&mut self, key: String, desired: Value) {
        self.pending.insert(key, (desired, Instant::now()));
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "detour-controller".into());
    format!("{host}-{}", std::process::id())
}

/// What of a mirrored slice the controller owns, to compare desired and observed.
fn slice_projection(slice: &EndpointSlice) -> Value {
    json!({
        "labels": slice.metadata.labels,
        "addressType": slice.address_type,
        "endpoints": slice.endpoints,
        "ports": slice.ports,
    })
}

/// What of a VIP Service the controller owns.
fn vip_projection(service: &Service) -> Value {
    let spec = service.spec.as_ref();
    json!({
        "labels": service.metadata.labels,
        "owners": service.metadata.owner_references.iter().flatten().map(|o| &o.uid).collect::<Vec<_>>(),
        "type": spec.and_then(|s| s.type_.as_ref()),
        "ports": spec.and_then(|s| s.ports.as_ref()),
    })
}

/// The selectorless Service whose ClusterIP is `fos`'s VIP, owned by it (`None` until it
/// has a uid).
fn vip_service(fos: &FailoverService) -> Option<Service> {
    let name = fos.name_any();
    let number = fos.spec.port.number;
    Some(Service {
        metadata: ObjectMeta {
            name: Some(names::vip_service(&name)),
            namespace: fos.namespace(),
            labels: Some(BTreeMap::from([(
                labels::FAILOVER_SERVICE.to_owned(),
                names::label_value(&name),
            )])),
            owner_references: Some(vec![OwnerReference {
                api_version: FailoverService::api_version(&()).into_owned(),
                kind: FailoverService::kind(&()).into_owned(),
                name,
                uid: fos.metadata.uid.clone()?,
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(vec![ServicePort {
                name: Some(labels::port_name(number)),
                port: i32::from(number),
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::Int(i32::from(number))),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}
