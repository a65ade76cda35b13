//! From what the agent's own cluster holds to the service model: FailoverServices, the
//! Services and EndpointSlices they name (the cluster's own, and those `detour
//! controller` mirrors from remote clusters) and the node's labels become a
//! [`Config`], the same type the standalone file gives.
//!
//! Each FailoverService becomes one service of the model named `NAME.NAMESPACE`, served
//! on its virtual IP and `port.number`; each `takeOver` entry becomes another, named
//! `NAME.NAMESPACE.takeover.SERVICE.SERVICE_NAMESPACE`, served on that Service's
//! ClusterIPs and the listed ports only, with the same endpoints. Backing services are
//! priorities 0, 1, ... in their listed order (the failover order, as in Gloo), with
//! locality tiers inside each.
//!
//! Invariants:
//! - pure: no I/O, no clock; the same inputs give the same model, whatever the order
//!   the watchers delivered them in;
//! - every service is written in the file's schema and checked by
//!   [`config::service_from_json`], so the two sources accept the same services and give
//!   the same errors; a FailoverService that fails becomes a [`Problem`] and is left
//!   out, and the others are untouched;
//! - precedence is age: when two FailoverServices claim the same VIP:port, the older
//!   (by `creationTimestamp`, then namespace/name) keeps it, as Istio does for
//!   ServiceEntries, and the newer is a [`Problem`];
//! - an endpoint is used when ready (a missing `ready` counts as ready, as the API says);
//!   serving-but-terminating endpoints are used only when the FailoverService has no
//!   ready endpoint at all; one address appears once per service, at its best priority;
//! - the virtual IP is `spec.virtualIP`, else the ClusterIPs of the Service the
//!   controller created for it (labelled [`labels::FAILOVER_SERVICE`]), else
//!   `status.virtualIP`; a FailoverService with none yet is a [`Problem`] (waiting for
//!   the controller), and its take-overs are still served.
//!
//! Locality: an endpoint of a remote cluster takes its region from its mirrored slice's
//! [`labels::REGION`] and its zone from `endpoints[].zone`. An endpoint of the agent's own
//! cluster takes its zone from `endpoints[].zone` and the region of the node the agent
//! runs on: a cluster spanning regions is rare, and reading every Node to learn it would
//! cost every agent a watch of all Nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use kube::ResourceExt as _;
use serde_json::{json, Value};

use super::failover_service::{FailoverService, FailoverServiceSpec};
use super::index::{
    version, Condition, FailoverKey, FastMap, Index, Slices, StoredService, Touched,
};
use super::labels;
use super::objects::{WatchedService, WatchedSlice};
use crate::config::{self, Config, Locality, NodeConfig, ObjectName, ServiceConfig, ServiceOrigin};
use crate::intern::intern;

/// What the agent's cluster holds, as the watchers last saw it.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// The name of the agent's own cluster (`--cluster-name`): backing services with no
    /// `clusterName`, or this one, are read from the cluster's own EndpointSlices.
    pub cluster: String,
    /// The labels of the agent's Node.
    pub node_labels: BTreeMap<String, String>,
    pub failover_services: Vec<Arc<FailoverService>>,
    pub services: Vec<Arc<WatchedService>>,
    pub slices: Vec<Arc<WatchedSlice>>,
}

/// A FailoverService (or one of its take-overs) that is not served, or not in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `namespace/name` of the FailoverService.
    pub failover_service: String,
    pub message: String,
}

/// The model, and what could not go into it.
#[derive(Debug, Clone, Default)]
pub struct Built {
    pub config: Config,
    pub problems: Vec<Problem>,
    /// How many FailoverServices were derived afresh (the others were reused).
    pub derived: usize,
    /// Against the previous build of the same [`Model`]: the only services that may
    /// differ (added, removed or changed), by name; `None` when any may (the first
    /// build, a relist, the node's labels).
    pub touched: Option<BTreeSet<String>>,
    /// Whether the services are the previous build's, in the same order (only their
    /// content may differ).
    pub same_order: bool,
}

/// The node's locality from its labels (current labels first, then the legacy
/// `failure-domain.beta.kubernetes.io/*`). A zone without a region cannot be placed and
/// is left out.
#[must_use]
pub fn node_locality(labels: &BTreeMap<String, String>) -> Locality {
    let (region, zone) = labels::node_locality(labels);
    locality(intern(&region), intern(&zone))
}

/// The node's labels as `failoverPriority` compares them: the Node's own, and the
/// cluster's name as Istio's `topology.istio.io/cluster` (unless the Node sets it), so
/// that `failoverPriority: [topology.istio.io/cluster]` prefers this cluster's endpoints.
fn node_labels(labels: &BTreeMap<String, String>, cluster: &str) -> BTreeMap<String, String> {
    let mut labels = labels.clone();
    if !cluster.is_empty() {
        labels
            .entry(config::well_known::CLUSTER.to_owned())
            .or_insert_with(|| cluster.to_owned());
    }
    labels
}

fn locality(region: Arc<str>, zone: Arc<str>) -> Locality {
    if region.is_empty() {
        return Locality::default();
    }
    Locality {
        region,
        zone,
        subzone: intern(""),
    }
}

/// Builds the model from `inventory`, from scratch. See the module invariants.
#[must_use]
pub fn build(inventory: &Inventory) -> Built {
    let mut model = Model::new(inventory.cluster.clone());
    model.sync(inventory);
    model.build()
}

/// The model, kept up to date from the watch events, with what did not change reused.
///
/// The [`Index`] files each object as it arrives and marks the FailoverServices that
/// read it touched; [`Model::build`] re-derives only those. A touched FailoverService's
/// inputs (itself, its backing Services and their own or mirrored slices, the Services
/// it takes over, its VIP Service, the node's locality and the cluster's name) are also
/// fingerprinted by `resourceVersion`, so one whose inputs came back unchanged (a
/// relist) reuses what it gave last time. Objects without a `resourceVersion` (never
/// the case for objects from an API server) are never reused.
///
/// Assembly across FailoverServices (who keeps a VIP:port) depends on all of them: when
/// the re-derived services keep their names, order and frontends, they replace their
/// old selves in the last build's config in place (`Config::with_replaced`); otherwise
/// the whole assembly runs again, in precedence order. Each build says which services
/// may differ from the previous build's and whether their order held
/// ([`Built::touched`], [`Built::same_order`]), so the agent's own work scales with the
/// change too.
#[derive(Debug, Default)]
pub struct Model {
    index: Index,
    derived: FastMap<FailoverKey, Derived>,
    /// The services the last build's assembly left out, by name, and why.
    left_out: BTreeSet<String>,
    left_out_problems: Vec<Problem>,
    /// The last build's configuration, for the next one to change in place.
    last: Option<Config>,
}

/// What one FailoverService gave last time, and from which inputs.
#[derive(Debug)]
struct Derived {
    fingerprint: Option<u64>,
    services: Vec<Arc<ServiceConfig>>,
    problems: Vec<String>,
}

impl Model {
    /// An empty model for the agent's cluster `cluster` (see [`Inventory::cluster`]).
    #[must_use]
    pub fn new(cluster: String) -> Self {
        Self {
            index: Index::new(cluster),
            derived: FastMap::default(),
            left_out: BTreeSet::new(),
            left_out_problems: Vec::new(),
            last: None,
        }
    }

    /// How many FailoverServices the index holds.
    #[must_use]
    pub fn failover_services(&self) -> usize {
        self.index.order.len()
    }

    /// The index the watch events go to.
    pub fn index_mut(&mut self) -> &mut Index {
        &mut self.index
    }

    /// Makes the index hold exactly `inventory` (as relists of every kind would).
    pub fn sync(&mut self, inventory: &Inventory) {
        assert_eq!(
            inventory.cluster, self.index.cluster,
            "a model is for one cluster"
        );
        self.index.set_node_labels(inventory.node_labels.clone());
        self.index
            .replace_failover_services(inventory.failover_services.clone());
        let services = inventory
            .services
            .iter()
            .map(|s| self.index.stage_service(s))
            .collect();
        self.index.replace_services(services);
        let slices = inventory
            .slices
            .iter()
            .map(|s| self.index.stage_slice(s))
            .collect();
        self.index.replace_slices(slices);
    }

    /// The model from what the index holds. See the module invariants.
    pub fn build(&mut self) -> Built {
        // `names` collects the services of what is derived afresh or forgotten, before
        // and after; `None` when everything is looked at.
        let (touched, mut names): (Vec<FailoverKey>, Option<BTreeSet<String>>) =
            match self.index.take_touched() {
                Touched::All => {
                    // Those derived last time (some may be gone) and those there now.
                    let mut all: Vec<FailoverKey> = self
                        .derived
                        .keys()
                        .cloned()
                        .chain(self.index.order.iter().map(|(_, key)| key.clone()))
                        .collect();
                    all.sort_unstable();
                    all.dedup();
                    (all, None)
                }
                Touched::These(keys) => (keys.into_iter().collect(), Some(BTreeSet::new())),
            };
        let node = NodeConfig {
            locality: node_locality(&self.index.node_labels),
            labels: node_labels(&self.index.node_labels, &self.index.cluster),
        };
        let index = &self.index;
        let mut fresh = 0;
        let mut same_order = names.is_some();
        let mut rederived: Vec<FailoverKey> = Vec::new();
        let service_names = |derived: Option<&Derived>| -> Vec<String> {
            derived
                .into_iter()
                .flat_map(|d| d.services.iter().map(|s| s.name.clone()))
                .collect()
        };
        for key in touched {
            let Some(fos) = index.failover_services.get(&key.0, &key.1) else {
                // Gone: forgotten.
                if let Some(gone) = self.derived.remove(&key) {
                    same_order = false;
                    if let Some(names) = &mut names {
                        names.extend(service_names(Some(&gone)));
                    }
                }
                continue;
            };
            let fingerprint = fingerprint(index, fos, &node.locality);
            let last = self.derived.get(&key);
            if last.is_some_and(|last| fingerprint.is_some() && last.fingerprint == fingerprint) {
                continue;
            }
            fresh += 1;
            let before = service_names(last);
            let entry = derive(index, fos, &node.locality, fingerprint);
            let after = service_names(Some(&entry));
            // A new FailoverService, or one whose services are named otherwise, moves
            // the others.
            same_order &= last.is_some() && before == after;
            if let Some(names) = &mut names {
                names.extend(before.into_iter().chain(after));
            }
            self.derived.insert(key.clone(), entry);
            rederived.push(key);
        }
        let mut problems = Vec::new();
        for (_, key) in &index.order {
            for message in self.derived.get(key).into_iter().flat_map(|d| &d.problems) {
                problems.push(Problem {
                    failover_service: format!("{}/{}", key.0, key.1),
                    message: message.clone(),
                });
            }
        }
        // The services of what was derived afresh, in place in the last build's config,
        // when that is all that changed (see `Config::with_replaced`); else the whole
        // assembly.
        let replaced = if same_order && names.is_some() {
            let services: Vec<Arc<ServiceConfig>> = rederived
                .iter()
                .filter_map(|key| self.derived.get(key))
                .flat_map(|d| d.services.iter().cloned())
                .collect();
            self.last
                .as_ref()
                .and_then(|last| last.with_replaced(&services))
        } else {
            None
        };
        let config = match replaced {
            Some(config) => config,
            None => {
                let candidates: Vec<Arc<ServiceConfig>> = index
                    .order
                    .iter()
                    .filter_map(|(_, key)| self.derived.get(key))
                    .flat_map(|d| d.services.iter().cloned())
                    .collect();
                let (config, left_out) = config::assemble(node, candidates);
                let left_out_names: BTreeSet<String> = left_out
                    .iter()
                    .map(|(service, _)| service.name.clone())
                    .collect();
                if left_out_names != self.left_out {
                    // Who keeps a contested VIP:port changed.
                    same_order = false;
                    if let Some(names) = &mut names {
                        names.extend(left_out_names.symmetric_difference(&self.left_out).cloned());
                    }
                    self.left_out = left_out_names;
                }
                self.left_out_problems = left_out
                    .into_iter()
                    .map(|(service, error)| Problem {
                        // Which FailoverService it came from, as the service records.
                        failover_service: match &service.origin {
                            ServiceOrigin::FailoverService {
                                namespace, name, ..
                            } => format!("{namespace}/{name}"),
                            ServiceOrigin::File { .. } => String::new(),
                        },
                        message: format!("{}: {error}", service.name),
                    })
                    .collect();
                config
            }
        };
        problems.extend(self.left_out_problems.iter().cloned());
        self.last = Some(config.clone());
        Built {
            config,
            problems,
            derived: fresh,
            touched: names,
            same_order,
        }
    }
}

/// One FailoverService's services and problems, derived afresh.
fn derive(
    index: &Index,
    fos: &FailoverService,
    node: &Locality,
    fingerprint: Option<u64>,
) -> Derived {
    let mut problems = Vec::new();
    let mut services = Vec::new();
    let documents = index.documents(fos, node, &mut |message| problems.push(message));
    for (document, take_over) in documents {
        let name = document["name"].as_str().unwrap_or_default().to_owned();
        match config::service_from_json(document) {
            Ok(mut service) => {
                service.origin = ServiceOrigin::FailoverService {
                    namespace: fos.namespace().unwrap_or_default(),
                    name: fos.name_any(),
                    take_over,
                };
                services.push(Arc::new(service));
            }
            Err(error) => problems.push(format!("{name}: {error}")),
        }
    }
    Derived {
        fingerprint,
        services,
        problems,
    }
}

/// The inputs of one FailoverService, hashed in the order they are read. foldhash, not
/// SipHash: nothing here is keyed by what a client chose, and at 10,000
/// FailoverServices the hashing of a rebuild showed in profiles.
struct Fingerprint(foldhash::fast::FoldHasher<'static>);

impl Default for Fingerprint {
    fn default() -> Self {
        use std::hash::BuildHasher as _;
        Self(foldhash::fast::FixedState::with_seed(0).build_hasher())
    }
}

impl Fingerprint {
    fn value<T: std::hash::Hash + ?Sized>(&mut self, value: &T) {
        value.hash(&mut self.0);
    }

    /// A Service that may not exist.
    fn service(&mut self, service: Option<&StoredService>) -> Option<()> {
        self.value(&service.is_some());
        service.map_or(Some(()), |service| self.version(service.version))
    }

    /// An object's version (`index::version`: identity and resourceVersion); `None` if
    /// it has none.
    fn version(&mut self, version: Option<u64>) -> Option<()> {
        self.value(&version?);
        Some(())
    }

    fn finish(&self) -> u64 {
        std::hash::Hasher::finish(&self.0)
    }
}

/// One endpoint chosen for a FailoverService, before it is written as a document.
struct Chosen {
    address: Address,
    port: u16,
    locality: Locality,
    priority: u32,
    cluster: String,
}

/// Where a chosen endpoint is: an address, or (an `external` backing service's) a DNS
/// name that every agent resolves itself ([`crate::sources::dns`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Address {
    Ip(IpAddr),
    Name(String),
}

impl Address {
    /// Whether a VIP of `vip`'s family can be rewritten to it: a name's families are
    /// known only once it resolves (the DNS source keeps to the VIP's family).
    fn serves_family_of(&self, vip: &IpAddr) -> bool {
        match self {
            Self::Ip(ip) => ip.is_ipv4() == vip.is_ipv4(),
            Self::Name(_) => true,
        }
    }
}

impl serde::Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Ip(ip) => ip.serialize(serializer),
            Self::Name(name) => serializer.serialize_str(name),
        }
    }
}

/// A hash of every input `fos`'s services are derived from (see [`Model`]), or `None`
/// when one of them has no `resourceVersion` to tell its versions apart.
fn fingerprint(index: &Index, fos: &FailoverService, node: &Locality) -> Option<u64> {
    let mut inputs = Fingerprint::default();
    inputs.version(version(&fos.metadata))?;
    inputs.value(&index.cluster);
    inputs.value(node);
    let namespace = fos.metadata.namespace.as_deref().unwrap_or_default();
    let name = fos.metadata.name.as_deref().unwrap_or_default();
    inputs.service(index.vip_service(namespace, name))?;
    for backing in &fos.spec.backing_services {
        // An external endpoint is in the spec, which the version covers.
        let Some(backing) = &backing.kube_service else {
            continue;
        };
        let slices = if index.is_local(backing) {
            inputs.service(index.service(&backing.namespace, &backing.name))?;
            index.local_slices(&backing.namespace, &backing.name)
        } else {
            let cluster = backing.cluster_name.as_deref().unwrap_or_default();
            index.mirrored_slices(cluster, &backing.namespace, &backing.name)
        };
        inputs.value(&slices.map_or(0, Slices::len));
        for slice in slices.into_iter().flat_map(Slices::values) {
            inputs.version(slice.version)?;
        }
    }
    for take_over in &fos.spec.take_over {
        let target = &take_over.service;
        inputs.service(index.service(&target.namespace, &target.name))?;
    }
    Some(inputs.finish())
}

/// Reading the index: what one FailoverService gives.
impl Index {
    /// The model services of one FailoverService, in the file's schema, each with the
    /// Service it takes over (`None` for the one on the FailoverService's own VIP).
    fn documents(
        &self,
        fos: &FailoverService,
        node: &Locality,
        problem: &mut dyn FnMut(String),
    ) -> Vec<(Value, Option<ObjectName>)> {
        let namespace = fos.namespace().unwrap_or_default();
        let name = fos.name_any();
        let spec = &fos.spec;
        let endpoints = self.endpoints(spec, node, problem);
        let policy = policy(spec);
        let mut documents = Vec::new();
        let vips = self.virtual_ips(fos, &namespace, &name);
        if vips.is_empty() {
            problem(
                "no virtual IP yet: set spec.virtualIP, or run `detour controller`, which \
                 creates a Service for it"
                    .to_owned(),
            );
        } else {
            let ports = [spec.port.number];
            documents.push((
                document(
                    &format!("{name}.{namespace}"),
                    &vips,
                    &ports,
                    &endpoints,
                    &policy,
                    problem,
                ),
                None,
            ));
        }
        for take_over in &spec.take_over {
            let target = &take_over.service;
            let Some(service) = self.service(&target.namespace, &target.name) else {
                problem(format!(
                    "takeOver: Service {}/{} does not exist",
                    target.namespace, target.name
                ));
                continue;
            };
            let vips = service.cluster_ips.clone();
            if vips.is_empty() {
                problem(format!(
                    "takeOver: Service {}/{} has no ClusterIP (headless or ExternalName)",
                    target.namespace, target.name
                ));
                continue;
            }
            documents.push((
                document(
                    &format!(
                        "{name}.{namespace}.takeover.{}.{}",
                        target.name, target.namespace
                    ),
                    &vips,
                    &take_over.ports,
                    &endpoints,
                    &policy,
                    problem,
                ),
                Some(ObjectName {
                    namespace: target.namespace.clone(),
                    name: target.name.clone(),
                }),
            ));
        }
        documents
    }

    fn virtual_ips(&self, fos: &FailoverService, namespace: &str, name: &str) -> Vec<IpAddr> {
        let spec_vip = fos.spec.virtual_ip.as_deref();
        let status_vip = fos.status.as_ref().and_then(|s| s.virtual_ip.as_deref());
        if let Some(vip) = spec_vip.and_then(|vip| vip.parse().ok()) {
            return vec![vip];
        }
        if let Some(service) = self.vip_service(namespace, name) {
            let ips = service.cluster_ips.clone();
            if !ips.is_empty() {
                return ips;
            }
        }
        status_vip
            .and_then(|vip| vip.parse().ok())
            .into_iter()
            .collect()
    }

    /// The endpoints of every backing service: ready ones, or, when there is none at
    /// all, the serving-but-terminating ones.
    fn endpoints(
        &self,
        spec: &FailoverServiceSpec,
        node: &Locality,
        problem: &mut dyn FnMut(String),
    ) -> Vec<Chosen> {
        let mut ready = Vec::new();
        let mut terminating = Vec::new();
        for (priority, backing) in spec.backing_services.iter().enumerate() {
            let priority = u32::try_from(priority).unwrap_or(u32::MAX);
            let backing = match (&backing.kube_service, &backing.external) {
                (Some(service), _) => service,
                (None, Some(external)) => {
                    // Ready: its health is the agent's checks' to judge.
                    ready.push(Chosen {
                        address: external
                            .address
                            .parse()
                            .map_or_else(|_| Address::Name(external.address.clone()), Address::Ip),
                        port: external.port.unwrap_or(spec.port.number),
                        locality: external
                            .locality
                            .as_deref()
                            .and_then(|l| l.parse().ok())
                            .unwrap_or_default(),
                        priority,
                        cluster: String::new(),
                    });
                    continue;
                }
                (None, None) => {
                    problem(format!(
                        "backingServices[{priority}]: neither kubeService nor external"
                    ));
                    continue;
                }
            };
            let (cluster, slices, port_name) = if self.is_local(backing) {
                let Some(service) = self.service(&backing.namespace, &backing.name) else {
                    problem(format!(
                        "backingServices[{priority}]: Service {}/{} does not exist in this cluster",
                        backing.namespace, backing.name
                    ));
                    continue;
                };
                let Some(port_name) = service
                    .ports
                    .iter()
                    .find(|(_, port)| *port == i32::from(spec.port.number))
                    .map(|(name, _)| name.to_string())
                else {
                    problem(format!(
                        "backingServices[{priority}]: Service {}/{} has no port {}",
                        backing.namespace, backing.name, spec.port.number
                    ));
                    continue;
                };
                let slices = self.local_slices(&backing.namespace, &backing.name);
                (self.cluster.clone(), slices, port_name)
            } else {
                let cluster = backing.cluster_name.as_deref().unwrap_or_default();
                let slices = self.mirrored_slices(cluster, &backing.namespace, &backing.name);
                (
                    cluster.to_owned(),
                    slices,
                    labels::port_name(spec.port.number),
                )
            };
            for slice in slices.into_iter().flat_map(Slices::values) {
                let Some(port) = slice
                    .ports
                    .iter()
                    .find(|(name, _)| **name == *port_name)
                    .and_then(|(_, port)| *port)
                else {
                    continue;
                };
                let region = if self.is_local(backing) {
                    node.region.clone()
                } else {
                    slice.region.clone().unwrap_or_else(|| intern(""))
                };
                for endpoint in &slice.endpoints {
                    let chosen = Chosen {
                        address: Address::Ip(endpoint.address),
                        port,
                        locality: locality(region.clone(), endpoint.zone.clone()),
                        priority,
                        cluster: cluster.clone(),
                    };
                    match endpoint.condition {
                        Condition::Ready => ready.push(chosen),
                        Condition::Terminating => terminating.push(chosen),
                        Condition::Out => {}
                    }
                }
            }
        }
        let mut chosen = if ready.is_empty() { terminating } else { ready };
        // One address once, at its best priority (a pod listed twice while its slice is
        // being rewritten, or a Service named twice across clusters).
        let mut seen = std::collections::HashSet::new();
        chosen.retain(|endpoint| seen.insert((endpoint.address.clone(), endpoint.port)));
        chosen
    }
}

/// The FailoverService's policy fields, in the file's schema.
fn policy(spec: &FailoverServiceSpec) -> Value {
    let mut policy = serde_json::Map::new();
    if let Some(lb) = &spec.locality_lb_setting {
        let mut setting = serde_json::Map::new();
        if !lb.failover.is_empty() {
            setting.insert(
                "failover".into(),
                lb.failover
                    .iter()
                    .map(|rule| json!({"from": rule.from, "to": rule.to}))
                    .collect(),
            );
        }
        if let Some(spill) = lb.spill {
            setting.insert("spill".into(), json!(spill));
        }
        if let Some(factor) = lb.overprovisioning_factor {
            setting.insert("overprovisioningFactor".into(), json!(factor));
        }
        if !lb.failover_priority.is_empty() {
            setting.insert("failoverPriority".into(), json!(lb.failover_priority));
        }
        policy.insert("localityLbSetting".into(), Value::Object(setting));
    }
    if let Some(outlier) = &spec.outlier_detection {
        policy.insert("outlierDetection".into(), json!(outlier));
    }
    let mut check = spec
        .health_check
        .as_ref()
        .map_or_else(|| json!({}), |check| json!(check));
    // The file's defaults name the service; a FailoverService's are its hostname.
    if let Some(http) = check.get_mut("http").and_then(Value::as_object_mut) {
        http.entry("host").or_insert_with(|| json!(spec.hostname));
    }
    if let Some(grpc) = check.get_mut("grpc").and_then(Value::as_object_mut) {
        grpc.entry("authority")
            .or_insert_with(|| json!(spec.hostname));
    }
    policy.insert("healthCheck".into(), check);
    if let Some(terminate) = spec.terminate_connections {
        policy.insert("terminateConnections".into(), json!(terminate));
    }
    if let Some(tls) = &spec.tls {
        policy.insert("tls".into(), json!(tls));
    }
    Value::Object(policy)
}

/// One model service in the file's schema: `vips` × `ports`, every port to the
/// endpoint's backend port.
fn document(
    name: &str,
    vips: &[IpAddr],
    ports: &[u16],
    endpoints: &[Chosen],
    policy: &Value,
    problem: &mut dyn FnMut(String),
) -> Value {
    // A VIP of a family no endpoint has cannot be rewritten (the model refuses it): a
    // dual-stack Service with single-stack backends keeps its other family untouched.
    let vips: Vec<&IpAddr> = vips
        .iter()
        .filter(|vip| {
            let served =
                endpoints.is_empty() || endpoints.iter().any(|e| e.address.serves_family_of(vip));
            if !served {
                problem(format!(
                    "{name}: VIP {vip} is left alone: no endpoint of its family"
                ));
            }
            served
        })
        .collect();
    let port_names: Vec<String> = ports.iter().map(|p| labels::port_name(*p)).collect();
    let mut document = json!({
        "name": name,
        "vips": vips,
        "ports": ports
            .iter()
            .zip(&port_names)
            .map(|(number, name)| json!({"number": number, "name": name}))
            .collect::<Vec<_>>(),
        "endpoints": endpoints
            .iter()
            .map(|endpoint| {
                let mut entry = json!({
                    "address": endpoint.address,
                    "ports": port_names
                        .iter()
                        .map(|name| (name.clone(), json!(endpoint.port)))
                        .collect::<serde_json::Map<_, _>>(),
                    "priority": endpoint.priority,
                });
                if !endpoint.cluster.is_empty() {
                    entry["cluster"] = json!(endpoint.cluster);
                }
                if !endpoint.locality.is_empty() {
                    entry["locality"] = json!(endpoint.locality.to_string());
                }
                entry
            })
            .collect::<Vec<_>>(),
    });
    if endpoints
        .iter()
        .any(|e| matches!(e.address, Address::Name(_)))
    {
        document["resolution"] = json!("DNS");
    }
    if let (Some(document), Some(policy)) = (document.as_object_mut(), policy.as_object()) {
        document.extend(policy.clone());
    }
    document
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object<T: serde::de::DeserializeOwned>(value: Value) -> Arc<T> {
        Arc::new(serde_json::from_value(value).expect("a valid object"))
    }

    fn failover_service(name: &str, created: &str, spec: Value) -> Arc<FailoverService> {
        object(json!({
            "apiVersion": "failover.detour.io/v1alpha1",
            "kind": "FailoverService",
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
            "spec": spec,
        }))
    }

    fn service(namespace: &str, name: &str, ip: &str, ports: Value) -> Arc<WatchedService> {
        object(json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports},
        }))
    }

    /// `(address, zone, ready, serving, terminating)` per endpoint.
    type At<'a> = (&'a str, &'a str, bool, bool, bool);

    fn endpoints(at: &[At<'_>]) -> Value {
        at.iter()
            .map(|(address, zone, ready, serving, terminating)| {
                json!({
                    "addresses": [address],
                    "zone": zone,
                    "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                })
            })
            .collect()
    }

    fn local_slice(service: &str, port: (&str, u16), at: &[At<'_>]) -> Arc<WatchedSlice> {
        object(json!({
            "metadata": {
                "name": format!("{service}-abcde"),
                "namespace": "default",
                "labels": {labels::KUBE_SERVICE_NAME: service},
            },
            "addressType": "IPv4",
            "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
            "endpoints": endpoints(at),
        }))
    }

    fn mirrored_slice(
        cluster: &str,
        region: &str,
        number: u16,
        at: &[At<'_>],
    ) -> Arc<WatchedSlice> {
        object(json!({
            "metadata": {
                "name": format!("detour-{cluster}-default-reviews-{region}"),
                "namespace": "detour-system",
                "labels": {
                    labels::MANAGED_BY: labels::CONTROLLER,
                    labels::CLUSTER: cluster,
                    labels::SERVICE_NAME: "reviews",
                    labels::SERVICE_NAMESPACE: "default",
                    labels::REGION: region,
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": labels::port_name(number), "port": 9080, "protocol": "TCP"}],
            "endpoints": endpoints(at),
        }))
    }

    fn node_labels() -> BTreeMap<String, String> {
        [(labels::REGION, "us-east1"), (labels::ZONE, "us-east1-b")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// Each service of the model as `name vips ports: endpoint@locality/pN/cluster:port`.
    fn shown(built: &Built) -> Vec<String> {
        built
            .config
            .services
            .iter()
            .map(|service| {
                let vips: Vec<String> = service.vips.iter().map(ToString::to_string).collect();
                let ports: Vec<String> =
                    service.ports.iter().map(|p| p.number.to_string()).collect();
                let endpoints: Vec<String> = service
                    .endpoints
                    .iter()
                    .map(|e| {
                        format!(
                            "{}:{}@{}/p{}/{}",
                            e.address,
                            e.port_for(&service.ports[0]),
                            e.locality,
                            e.priority,
                            e.cluster
                        )
                    })
                    .collect();
                format!(
                    "{} [{}] [{}]: {}",
                    service.name,
                    vips.join(","),
                    ports.join(","),
                    endpoints.join(" ")
                )
            })
            .collect()
    }

    /// The second seed in Kubernetes: endpoints outside the cluster, by DNS name and by
    /// address, after a Service of the cluster in failover order, with TLS originated.
    #[test]
    fn external_backing_services_become_named_and_literal_endpoints() {
        let inventory = Inventory {
            cluster: "kind1".into(),
            node_labels: node_labels(),
            failover_services: vec![failover_service(
                "mydb",
                "2026-12-01T07:00:00Z",
                json!({
                    "hostname": "mydb.default.global",
                    "hosts": ["mydb.com"],
                    "port": {"number": 80},
                    "virtualIP": "10.96.100.2",
                    "backingServices": [
                        {"kubeService": {"name": "cache", "namespace": "default"}},
                        {"external": {"address": "dynamodb.us-east-1.amazonaws.com", "port": 443, "locality": "us-east1"}},
                        {"external": {"address": "192.0.2.7", "locality": "us-west"}},
                    ],
                    "tls": {"mode": "SIMPLE", "sni": "dynamodb.example"},
                    "healthCheck": {"tcp": {}},
                }),
            )],
            services: vec![service(
                "default",
                "cache",
                "10.96.0.11",
                json!([{"name": "http", "port": 80}]),
            )],
            slices: vec![local_slice(
                "cache",
                ("http", 8080),
                &[("10.1.0.5", "us-east1-b", true, true, false)],
            )],
        };
        let built = build(&inventory);
        assert_eq!(built.problems, []);
        // The literal ones are endpoints at once; the name waits for the DNS source.
        assert_eq!(
            shown(&built),
            ["mydb.default [10.96.100.2] [80]: \
              10.1.0.5:8080@us-east1/us-east1-b/p0/kind1 192.0.2.7:80@us-west/p2/"]
        );
        let service = &built.config.services[0];
        let named: Vec<(String, u16, String, u32)> = service
            .named_endpoints
            .iter()
            .map(|n| {
                (
                    n.hostname.to_string(),
                    n.template.port_for(&service.ports[0]),
                    n.template.locality.to_string(),
                    n.template.priority,
                )
            })
            .collect();
        assert_eq!(
            named,
            [(
                "dynamodb.us-east-1.amazonaws.com".into(),
                443,
                "us-east1".into(),
                1
            )]
        );
        assert_eq!(
            service.tls,
            Some(crate::config::TlsOrigination {
                sni: Some("dynamodb.example".into()),
                ca_certificates: None,
            })
        );
    }

    /// The first seed: the agent runs in kind1; `reviews` runs in kind2 and kind3, whose
    /// endpoints the controller mirrored; the FailoverService lists kind2 first and
    /// takes over kind1's own `reviews` Service on 9080.
    #[test]
    fn the_seed_becomes_two_services_with_ordered_priorities() {
        let inventory = Inventory {
            cluster: "kind1".into(),
            node_labels: node_labels(),
            failover_services: vec![failover_service(
                "reviews-failover",
                "2026-11-30T07:00:00Z",
                json!({
                    "hostname": "reviews-failover.default.global",
                    "port": {"number": 9080, "protocol": "http"},
                    "virtualIP": "10.96.100.1",
                    "backingServices": [
                        {"kubeService": {"name": "reviews", "namespace": "default", "clusterName": "kind2"}},
                        {"kubeService": {"name": "reviews", "namespace": "default", "clusterName": "kind3"}},
                    ],
                    "outlierDetection": {"consecutiveErrors": 1, "interval": "10s", "baseEjectionTime": "2m"},
                    "takeOver": [{"service": {"name": "reviews", "namespace": "default"}, "ports": [9080]}],
                }),
            )],
            services: vec![service(
                "default",
                "reviews",
                "10.96.0.10",
                json!([{"name": "http", "port": 9080}, {"name": "admin", "port": 9901}]),
            )],
            slices: vec![
                mirrored_slice(
                    "kind2",
                    "us-east1",
                    9080,
                    &[
                        ("10.2.0.1", "us-east1-b", true, true, false),
                        ("10.2.0.2", "us-east1-c", false, false, false),
                    ],
                ),
                mirrored_slice(
                    "kind3",
                    "us-west1",
                    9080,
                    &[("10.3.0.1", "us-west1-a", true, true, false)],
                ),
                // Another port's mirror is not this FailoverService's.
                mirrored_slice(
                    "kind3",
                    "eu-west1",
                    9901,
                    &[("10.4.0.1", "eu-west1-a", true, true, false)],
                ),
            ],
        };
        let built = build(&inventory);
        assert_eq!(built.problems, []);
        assert_eq!(
            shown(&built),
            [
                "reviews-failover.default [10.96.100.1] [9080]: \
                 10.2.0.1:9080@us-east1/us-east1-b/p0/kind2 10.3.0.1:9080@us-west1/us-west1-a/p1/kind3",
                "reviews-failover.default.takeover.reviews.default [10.96.0.10] [9080]: \
                 10.2.0.1:9080@us-east1/us-east1-b/p0/kind2 10.3.0.1:9080@us-west1/us-west1-a/p1/kind3",
            ]
        );
        let service = &built.config.services[0];
        assert_eq!(
            service
                .outlier_detection
                .policy
                .settings()
                .consecutive_failures,
            1
        );
        assert_eq!(
            built.config.node.locality.to_string(),
            "us-east1/us-east1-b"
        );
        // Where each came from is data on the model, not something to parse back out of
        // the name.
        let origins: Vec<String> = built
            .config
            .services
            .iter()
            .map(|s| s.origin.to_string())
            .collect();
        assert_eq!(
            origins,
            [
                "fos default/reviews-failover",
                "fos default/reviews-failover, takeover of svc default/reviews",
            ]
        );
        assert_eq!(
            built.config.services[1].origin,
            ServiceOrigin::FailoverService {
                namespace: "default".into(),
                name: "reviews-failover".into(),
                take_over: Some(ObjectName {
                    namespace: "default".into(),
                    name: "reviews".into(),
                }),
            }
        );
    }

    /// A backing Service of the agent's own cluster: its port is found by number through
    /// the Service, terminating endpoints serve only when nothing is ready, and the
    /// region is the node's.
    #[test]
    fn a_local_backing_service_maps_its_named_port_and_falls_back_to_terminating() {
        let spec = json!({
            "hostname": "db.default.global",
            "port": {"number": 5432},
            "virtualIP": "10.96.100.2",
            "backingServices": [{"kubeService": {"name": "db", "namespace": "default"}}],
        });
        let mut inventory = Inventory {
            cluster: "kind1".into(),
            node_labels: node_labels(),
            failover_services: vec![failover_service("db", "2026-11-30T07:00:00Z", spec)],
            services: vec![service(
                "default",
                "db",
                "10.96.0.20",
                json!([{"name": "pg", "port": 5432, "targetPort": 15432}]),
            )],
            slices: vec![local_slice(
                "db",
                ("pg", 15432),
                &[
                    ("10.1.0.1", "us-east1-b", true, true, false),
                    ("10.1.0.2", "us-east1-c", false, true, true),
                ],
            )],
        };
        assert_eq!(
            shown(&build(&inventory)),
            ["db.default [10.96.100.2] [5432]: 10.1.0.1:15432@us-east1/us-east1-b/p0/kind1"]
        );
        inventory.slices = vec![local_slice(
            "db",
            ("pg", 15432),
            &[
                ("10.1.0.1", "us-east1-b", false, false, false),
                ("10.1.0.2", "us-east1-c", false, true, true),
            ],
        )];
        assert_eq!(
            shown(&build(&inventory)),
            ["db.default [10.96.100.2] [5432]: 10.1.0.2:15432@us-east1/us-east1-c/p0/kind1"]
        );
    }

    /// One bad FailoverService, or a newer one claiming an older one's VIP, is a
    /// problem of its own; the others are served as before.
    #[test]
    fn bad_or_conflicting_failover_services_touch_no_other() {
        let spec = |vip: &str, backing: &str| {
            json!({
                "hostname": "x.default.global",
                "port": {"number": 80},
                "virtualIP": vip,
                "backingServices": [{"kubeService": {"name": backing, "namespace": "default"}}],
            })
        };
        let inventory = Inventory {
            cluster: "kind1".into(),
            node_labels: BTreeMap::new(),
            failover_services: vec![
                failover_service("newer", "2026-11-30T08:00:00Z", spec("10.96.100.3", "web")),
                failover_service("older", "2026-11-30T07:00:00Z", spec("10.96.100.3", "web")),
                failover_service(
                    "missing",
                    "2026-11-30T07:30:00Z",
                    spec("10.96.100.4", "nope"),
                ),
                failover_service(
                    "no-vip",
                    "2026-11-30T07:40:00Z",
                    json!({
                        "hostname": "y.default.global",
                        "port": {"number": 80},
                        "backingServices": [{"kubeService": {"name": "web", "namespace": "default"}}],
                    }),
                ),
            ],
            services: vec![service(
                "default",
                "web",
                "10.96.0.30",
                json!([{"port": 80}]),
            )],
            slices: vec![local_slice(
                "web",
                ("", 8080),
                &[("10.1.0.9", "", true, true, false)],
            )],
        };
        let built = build(&inventory);
        assert_eq!(
            shown(&built),
            [
                "older.default [10.96.100.3] [80]: 10.1.0.9:8080@/p0/kind1",
                "missing.default [10.96.100.4] [80]: ",
            ]
        );
        let problems: Vec<String> = built
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.failover_service, p.message))
            .collect();
        assert_eq!(
            problems,
            [
                "default/missing: backingServices[0]: Service default/nope does not exist in this cluster",
                "default/no-vip: no virtual IP yet: set spec.virtualIP, or run `detour controller`, which creates a Service for it",
                "default/newer: newer.default: vips[0]: VIP 10.96.100.3:80 is already used by service \"older.default\"",
            ]
        );
    }

    /// The VIP comes from the Service the controller created when the spec names none.
    #[test]
    fn the_controllers_vip_service_gives_the_virtual_ip() {
        let mut vip_service = service(
            "default",
            "web-failover",
            "10.96.0.77",
            json!([{"port": 80}]),
        );
        Arc::make_mut(&mut vip_service).metadata.labels =
            Some([(labels::FAILOVER_SERVICE.to_owned(), "web".to_owned())].into());
        let inventory = Inventory {
            cluster: "kind1".into(),
            node_labels: BTreeMap::new(),
            failover_services: vec![failover_service(
                "web",
                "2026-11-30T07:00:00Z",
                json!({
                    "hostname": "web.default.global",
                    "port": {"number": 80},
                    "backingServices": [{"kubeService": {"name": "web", "namespace": "default"}}],
                }),
            )],
            services: vec![
                service("default", "web", "10.96.0.30", json!([{"port": 80}])),
                vip_service,
            ],
            slices: vec![],
        };
        assert_eq!(
            shown(&build(&inventory)),
            ["web.default [10.96.0.77] [80]: "]
        );
    }

    /// The model after relists of everything `inventory` holds.
    fn rebuild(model: &mut Model, inventory: &Inventory) -> Built {
        model.sync(inventory);
        model.build()
    }

    /// `count` FailoverServices `svcN`, each over its own Service and one slice, every
    /// object with a resourceVersion as an API server gives it.
    fn versioned_inventory(count: usize) -> Inventory {
        let mut inventory = Inventory {
            cluster: "kind1".into(),
            node_labels: node_labels(),
            ..Inventory::default()
        };
        for n in 0..count {
            let name = format!("svc{n}");
            inventory.failover_services.push(object(json!({
                "metadata": {"name": name, "namespace": "default", "resourceVersion": "1",
                             "creationTimestamp": "2026-11-30T07:00:00Z"},
                "spec": {
                    "hostname": format!("{name}.default.global"),
                    "port": {"number": 80, "protocol": "tcp"},
                    "virtualIP": format!("10.96.0.{}", n + 1),
                    "backingServices": [{"kubeService": {"name": name, "namespace": "default"}}],
                },
            })));
            inventory.services.push(object(json!({
                "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
                "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]},
            })));
            inventory.slices.push(versioned_slice(&name, "1", true));
        }
        inventory
    }

    fn versioned_slice(service: &str, version: &str, ready: bool) -> Arc<WatchedSlice> {
        let address = format!(
            "10.1.0.{}",
            service.trim_start_matches("svc").parse::<u8>().unwrap() + 1
        );
        object(json!({
            "metadata": {"name": format!("{service}-abcde"), "namespace": "default",
                         "resourceVersion": version,
                         "labels": {labels::KUBE_SERVICE_NAME: service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": [address], "zone": "us-east1-b", "conditions": {"ready": ready}},
                {"addresses": ["10.2.0.1"], "zone": "us-east1-c", "conditions": {"ready": true}},
            ],
        }))
    }

    #[test]
    fn a_change_rederives_only_the_failover_services_that_read_it() {
        let mut inventory = versioned_inventory(3);
        let mut model = Model::new("kind1".into());
        let first = rebuild(&mut model, &inventory);
        assert_eq!(first.derived, 3);
        assert_eq!(first.config.services.len(), 3);

        // Nothing changed: everything is reused, and is what a fresh build gives.
        let again = rebuild(&mut model, &inventory);
        assert_eq!(again.derived, 0);
        assert_eq!(again.config, build(&inventory).config);

        // One slice changes: only its FailoverService is derived again.
        inventory.slices[1] = versioned_slice("svc1", "2", false);
        let changed = rebuild(&mut model, &inventory);
        assert_eq!(changed.derived, 1);
        assert_eq!(changed.config, build(&inventory).config);
        assert_ne!(changed.config, first.config);
        assert_eq!(
            changed.config.services[1].endpoints.len(),
            1,
            "{:?}",
            changed.config.services[1]
        );

        // The node's locality is an input of every one.
        inventory
            .node_labels
            .insert(labels::ZONE.into(), "us-east1-c".into());
        assert_eq!(rebuild(&mut model, &inventory).derived, 3);

        // A backing Service that goes away is seen, and a FailoverService that goes is
        // forgotten.
        inventory.services.remove(2);
        let gone = rebuild(&mut model, &inventory);
        assert_eq!(gone.derived, 1);
        assert_eq!(gone.config, build(&inventory).config);
        inventory.failover_services.remove(0);
        let fewer = rebuild(&mut model, &inventory);
        assert_eq!((fewer.derived, fewer.config.services.len()), (0, 2));
        assert_eq!(fewer.config, build(&inventory).config);
    }

    #[test]
    fn failover_priority_reaches_the_model_with_the_clusters_name_on_the_node() {
        let mut inventory = versioned_inventory(1);
        let mut fos = (*inventory.failover_services[0]).clone();
        fos.spec.locality_lb_setting = Some(
            serde_json::from_value(json!({
                "failoverPriority": ["topology.istio.io/cluster", "topology.kubernetes.io/region=us-east1"],
            }))
            .unwrap(),
        );
        inventory.failover_services[0] = Arc::new(fos);
        let built = build(&inventory);
        assert!(built.problems.is_empty(), "{:?}", built.problems);
        let service = &built.config.services[0];
        assert_eq!(
            service.locality_lb.failover_priority,
            [
                config::PriorityLabel {
                    key: config::well_known::CLUSTER.into(),
                    value: None
                },
                config::PriorityLabel {
                    key: config::well_known::REGION.into(),
                    value: Some("us-east1".into())
                },
            ]
        );
        assert_eq!(
            built.config.node.labels.get(config::well_known::CLUSTER),
            Some(&"kind1".to_owned())
        );
        // This cluster's endpoints, in the node's region: both labels match.
        let levels: Vec<u32> = service
            .endpoints
            .iter()
            .map(|e| built.config.priority_of(service, e))
            .collect();
        assert_eq!(levels, [0, 0]);
    }

    #[test]
    fn objects_without_a_version_are_never_reused() {
        let mut inventory = versioned_inventory(2);
        let mut slice = (*inventory.slices[0]).clone();
        slice.metadata.resource_version = None;
        inventory.slices[0] = Arc::new(slice);
        let mut model = Model::new("kind1".into());
        assert_eq!(rebuild(&mut model, &inventory).derived, 2);
        assert_eq!(rebuild(&mut model, &inventory).derived, 1);
    }

    /// Events for a small world of FailoverServices, Services and slices, each object
    /// in a few versions, so that keys collide, objects move between keys and come and
    /// go: `(kind, which, version)`; version 0 deletes.
    mod incremental {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        pub(super) enum Event {
            FailoverService(usize, usize),
            Service(usize, usize),
            Slice(usize, usize),
            Node(usize),
            Build,
        }

        pub(super) fn event() -> impl Strategy<Value = Event> {
            prop_oneof![
                (0..3usize, 0..5usize).prop_map(|(i, v)| Event::FailoverService(i, v)),
                (0..5usize, 0..5usize).prop_map(|(i, v)| Event::Service(i, v)),
                (0..6usize, 0..6usize).prop_map(|(i, v)| Event::Slice(i, v)),
                (0..2usize).prop_map(Event::Node),
                Just(Event::Build),
            ]
        }

        fn meta(name: &str, namespace: &str, version: u64, labels: Value) -> Value {
            json!({"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"),
                   "resourceVersion": version.to_string(),
                   "creationTimestamp": "2026-11-30T07:00:00Z", "labels": labels})
        }

        /// FailoverService `f{i}` in version `v`: which Services back it, in which
        /// clusters, what it takes over, and whether it has its own VIP.
        pub(super) fn failover_service(i: usize, v: usize, rv: u64) -> Arc<FailoverService> {
            let backing = |service: usize, cluster: Option<&str>| {
                let mut service = json!({"name": format!("s{service}"), "namespace": "default"});
                if let Some(cluster) = cluster {
                    service["clusterName"] = json!(cluster);
                }
                json!({"kubeService": service})
            };
            let (backing, take_over, vip) = match v {
                1 => (vec![backing(i, None)], vec![], true),
                2 => (
                    vec![backing(i, None), backing(i, Some("kind2"))],
                    vec![],
                    true,
                ),
                3 => (
                    vec![
                        backing((i + 1) % 3, Some("kind2")),
                        backing(i, Some("kind1")),
                    ],
                    vec![(i + 1) % 3],
                    false,
                ),
                _ => (vec![backing(2, None)], vec![3], false),
            };
            let mut spec = json!({
                "hostname": format!("f{i}.default.global"),
                "port": {"number": 80, "protocol": "tcp"},
                "backingServices": backing,
                "takeOver": take_over.iter().map(|t| json!({"service": {"name": format!("s{t}"), "namespace": "default"}, "ports": [80]})).collect::<Vec<_>>(),
            });
            if vip {
                spec["virtualIP"] = json!(format!("10.96.0.{}", i + 1));
            }
            object(json!({
                "apiVersion": "failover.detour.io/v1alpha1", "kind": "FailoverService",
                "metadata": meta(&format!("f{i}"), "default", rv, json!({})),
                "spec": spec,
            }))
        }

        /// Service `s{i}` in version `v`: its port's name and ClusterIP change, and the
        /// Service can be (or stop being) a FailoverService's VIP Service.
        pub(super) fn service(i: usize, v: usize, rv: u64) -> Arc<WatchedService> {
            let labels = match v {
                3 => json!({labels::FAILOVER_SERVICE: format!("f{}", i % 3)}),
                4 => json!({labels::FAILOVER_SERVICE: format!("f{}", (i + 1) % 3)}),
                _ => json!({}),
            };
            let port_name = if v == 2 { "web" } else { "http" };
            let ip = format!("10.96.1.{}", 10 * i + v);
            object(json!({
                "metadata": meta(&format!("s{i}"), "default", rv, labels),
                "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": port_name, "port": 80}]},
            }))
        }

        /// Slice `e{i}` in version `v`: whose it is (local for `s0`..`s2`, or mirrored
        /// from kind2), and its endpoints.
        pub(super) fn slice(i: usize, v: usize, rv: u64) -> Arc<WatchedSlice> {
            let service = (i + v) % 3;
            let (namespace, labels, port_name) = if v.is_multiple_of(2) {
                (
                    "default",
                    json!({labels::KUBE_SERVICE_NAME: format!("s{service}")}),
                    "http".to_owned(),
                )
            } else {
                (
                    "detour-system",
                    json!({
                        labels::MANAGED_BY: labels::CONTROLLER,
                        labels::CLUSTER: "kind2",
                        labels::SERVICE_NAME: format!("s{service}"),
                        labels::SERVICE_NAMESPACE: "default",
                        labels::REGION: "us-west1",
                    }),
                    labels::port_name(80),
                )
            };
            object(json!({
                "metadata": meta(&format!("e{i}"), namespace, rv, labels),
                "addressType": "IPv4",
                "ports": [{"name": port_name, "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": [format!("10.1.{i}.{v}")], "zone": "us-east1-b", "conditions": {"ready": v != 5}},
                    {"addresses": [format!("10.2.{i}.1")], "zone": "us-east1-c"},
                ],
            }))
        }

        pub(super) fn node(v: usize) -> BTreeMap<String, String> {
            let mut labels = node_labels();
            if v == 1 {
                labels.insert(labels::ZONE.into(), "us-east1-c".into());
            }
            labels
        }
    }

    /// What a build says changed is a bound on what did: every service it does not name
    /// is the previous build's, and "same order" means the same names in order.
    fn check_change_report(
        previous: Option<&Config>,
        built: &Built,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        let (Some(previous), Some(touched)) = (previous, &built.touched) else {
            return Ok(());
        };
        let names = |config: &Config| -> Vec<String> {
            config.services.iter().map(|s| s.name.clone()).collect()
        };
        for name in names(previous).into_iter().chain(names(&built.config)) {
            if !touched.contains(&name) {
                proptest::prop_assert_eq!(
                    previous.service(&name),
                    built.config.service(&name),
                    "{} changed but was not reported",
                    name
                );
            }
        }
        if built.same_order {
            proptest::prop_assert_eq!(names(previous), names(&built.config));
        }
        Ok(())
    }

    proptest::proptest! {
        /// Whatever the events and wherever a model is built in between, the model kept
        /// up to date from them is the one built from scratch from what they leave.
        #[test]
        fn a_model_kept_from_events_is_the_model_built_from_scratch(
            events in proptest::collection::vec(incremental::event(), 1..60),
        ) {
            use incremental::Event;
            let mut model = Model::new("kind1".into());
            model.index_mut().set_node_labels(node_labels());
            let mut world = Inventory { cluster: "kind1".into(), node_labels: node_labels(), ..Inventory::default() };
            let (mut fos, mut services, mut slices) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
            let mut rv = 0u64;
            let mut previous: Option<Config> = None;
            for event in events {
                rv += 1;
                let index = model.index_mut();
                match event {
                    Event::FailoverService(i, 0) => { index.delete_failover_service("default", &format!("f{i}")); fos.remove(&i); }
                    Event::FailoverService(i, v) => { let o = incremental::failover_service(i, v, rv); index.apply_failover_service(o.clone()); fos.insert(i, o); }
                    Event::Service(i, 0) => { index.delete_service("default", &format!("s{i}")); services.remove(&i); }
                    Event::Service(i, v) => { let o = incremental::service(i, v, rv); index.apply_service(&o); services.insert(i, o); }
                    Event::Slice(i, 0) => {
                        if let Some(old) = slices.remove(&i) {
                            let old: &Arc<WatchedSlice> = &old;
                            index.delete_slice(old.metadata.namespace.as_deref().unwrap_or_default(), &format!("e{i}"));
                        }
                    }
                    Event::Slice(i, v) => {
                        let o = incremental::slice(i, v, rv);
                        // A slice's namespace never changes: a "move" to another
                        // namespace is a delete and a create, as the API server sees it.
                        if let Some(old) = slices.get(&i) {
                            let old: &Arc<WatchedSlice> = old;
                            if old.metadata.namespace != o.metadata.namespace {
                                index.delete_slice(old.metadata.namespace.as_deref().unwrap_or_default(), &format!("e{i}"));
                            }
                        }
                        index.apply_slice(&o);
                        slices.insert(i, o);
                    }
                    Event::Node(v) => { index.set_node_labels(incremental::node(v)); world.node_labels = incremental::node(v); }
                    Event::Build => {}
                }
                world.failover_services = fos.values().cloned().collect();
                world.services = services.values().cloned().collect();
                world.slices = slices.values().cloned().collect();
                if matches!(event, Event::Build) {
                    let kept = model.build();
                    let fresh = build(&world);
                    proptest::prop_assert_eq!(&kept.config, &fresh.config);
                    proptest::prop_assert_eq!(&kept.problems, &fresh.problems);
                    check_change_report(previous.as_ref(), &kept)?;
                    previous = Some(kept.config);
                }
            }
            let kept = model.build();
            let fresh = build(&world);
            proptest::prop_assert_eq!(&kept.config, &fresh.config);
            proptest::prop_assert_eq!(&kept.problems, &fresh.problems);
            check_change_report(previous.as_ref(), &kept)?;
            // Nothing touched since: nothing derived again.
            proptest::prop_assert_eq!(model.build().derived, 0);
        }
    }
}
