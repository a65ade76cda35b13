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

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt as _;
use serde_json::{json, Value};

use super::failover_service::{FailoverService, FailoverServiceSpec, KubeServiceRef};
use super::labels;
use super::objects::{WatchedEndpoint, WatchedService, WatchedSlice};
use crate::config::{self, Config, Locality, NodeConfig, ObjectName, ServiceConfig, ServiceOrigin};

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
}

/// The node's locality from its labels (current labels first, then the legacy
/// `failure-domain.beta.kubernetes.io/*`). A zone without a region cannot be placed and
/// is left out.
#[must_use]
pub fn node_locality(labels: &BTreeMap<String, String>) -> Locality {
    let (region, zone) = labels::node_locality(labels);
    locality(region, zone)
}

fn locality(region: String, zone: String) -> Locality {
    if region.is_empty() {
        return Locality::default();
    }
    Locality {
        region,
        zone,
        subzone: String::new(),
    }
}

/// Builds the model from `inventory`, from scratch. See the module invariants.
#[must_use]
pub fn build(inventory: &Inventory) -> Built {
    Model::default().build(inventory)
}

/// The model, rebuilt per change with what did not change reused.
///
/// A FailoverService's services depend on a known set of objects: itself, its backing
/// Services and their (own or mirrored) slices, the Services it takes over, its VIP
/// Service, the node's locality and the cluster's name. [`Model::build`] fingerprints
/// those by `resourceVersion` and reuses the services it derived last time when the
/// fingerprint is the same, so one EndpointSlice change re-derives only the
/// FailoverServices that read it. Objects without a `resourceVersion` (never the case
/// for objects from an API server) are never reused. Assembly across FailoverServices
/// (who keeps a VIP:port) runs on every build: it depends on all of them.
#[derive(Debug, Default)]
pub struct Model {
    derived: HashMap<String, Derived>,
}

/// What one FailoverService gave last time, and from which inputs.
#[derive(Debug)]
struct Derived {
    fingerprint: Option<u64>,
    services: Vec<Arc<ServiceConfig>>,
    problems: Vec<String>,
}

impl Model {
    /// Builds the model from `inventory`. See the module invariants.
    pub fn build(&mut self, inventory: &Inventory) -> Built {
        let index = Index::new(inventory);
        let node = NodeConfig {
            locality: node_locality(&inventory.node_labels),
        };
        let mut ordered: Vec<&Arc<FailoverService>> = inventory.failover_services.iter().collect();
        // Borrowed keys: at 10,000 FailoverServices, allocating in the comparator
        // cost more than all the rest of a rebuild that reuses everything.
        ordered.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
        let mut derived = HashMap::with_capacity(ordered.len());
        let mut fresh = 0;
        let mut problems = Vec::new();
        let mut candidates: Vec<Arc<ServiceConfig>> = Vec::with_capacity(ordered.len());
        for fos in ordered {
            let id = format!("{}/{}", fos.namespace().unwrap_or_default(), fos.name_any());
            let fingerprint = index.fingerprint(fos, &node.locality);
            let reused = self
                .derived
                .remove(&id)
                .filter(|last| fingerprint.is_some() && last.fingerprint == fingerprint);
            let entry = reused.unwrap_or_else(|| {
                fresh += 1;
                derive(&index, fos, &node.locality, fingerprint)
            });
            for message in &entry.problems {
                problems.push(Problem {
                    failover_service: id.clone(),
                    message: message.clone(),
                });
            }
            candidates.extend(entry.services.iter().cloned());
            derived.insert(id, entry);
        }
        // FailoverServices that are gone are forgotten.
        self.derived = derived;
        let (config, left_out) = config::assemble(node, candidates);
        for (service, error) in left_out {
            // Which FailoverService it came from, as the service itself records.
            let failover_service = match &service.origin {
                ServiceOrigin::FailoverService {
                    namespace, name, ..
                } => format!("{namespace}/{name}"),
                ServiceOrigin::File { .. } => String::new(),
            };
            problems.push(Problem {
                failover_service,
                message: format!("{}: {error}", service.name),
            });
        }
        Built {
            config,
            problems,
            derived: fresh,
        }
    }
}

/// Age first (the older keeps a contested VIP:port), then namespace and name.
fn sort_key(fos: &FailoverService) -> (Option<k8s_openapi::jiff::Timestamp>, &str, &str) {
    (
        fos.metadata.creation_timestamp.as_ref().map(|t| t.0),
        fos.metadata.namespace.as_deref().unwrap_or_default(),
        fos.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// One FailoverService's services and problems, derived afresh.
fn derive(
    index: &Index<'_>,
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

/// Rebuilt per watch event over every Service and slice: hashed with foldhash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The inventory, indexed for lookups by name.
struct Index<'a> {
    cluster: &'a str,
    /// By (namespace, name).
    services: FastMap<(&'a str, &'a str), &'a WatchedService>,
    /// The Service the controller made for a FailoverService, by (namespace, name of
    /// the FailoverService).
    vip_services: FastMap<(&'a str, &'a str), &'a WatchedService>,
    /// The cluster's own slices, by (namespace, Service name).
    local_slices: FastMap<(&'a str, &'a str), Vec<&'a WatchedSlice>>,
    /// Mirrored slices, by (cluster, namespace, Service name).
    mirrored_slices: FastMap<(&'a str, &'a str, &'a str), Vec<&'a WatchedSlice>>,
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

    /// An object by identity and version; `None` if it has no version.
    fn object(&mut self, meta: &ObjectMeta) -> Option<()> {
        self.value(&meta.uid);
        self.value(meta.resource_version.as_ref()?);
        Some(())
    }

    /// A Service that may not exist.
    fn service(&mut self, service: Option<&WatchedService>) -> Option<()> {
        self.value(&service.is_some());
        service.map_or(Some(()), |service| self.object(&service.metadata))
    }

    fn finish(&self) -> u64 {
        std::hash::Hasher::finish(&self.0)
    }
}

/// One endpoint chosen for a FailoverService, before it is written as a document.
struct Chosen {
    address: IpAddr,
    port: u16,
    locality: Locality,
    priority: u32,
    cluster: String,
}

impl<'a> Index<'a> {
    fn new(inventory: &'a Inventory) -> Self {
        let mut index = Self {
            cluster: &inventory.cluster,
            services: FastMap::default(),
            vip_services: FastMap::default(),
            local_slices: FastMap::default(),
            mirrored_slices: FastMap::default(),
        };
        for service in &inventory.services {
            let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
            let name = service.metadata.name.as_deref().unwrap_or_default();
            index.services.insert((namespace, name), service);
            if let Some(owner) = label(&service.metadata.labels, labels::FAILOVER_SERVICE) {
                index.vip_services.insert((namespace, owner), service);
            }
        }
        for slice in &inventory.slices {
            let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
            let tags = &slice.metadata.labels;
            if label(tags, labels::MANAGED_BY) == Some(labels::CONTROLLER) {
                if let (Some(cluster), Some(ns), Some(name)) = (
                    label(tags, labels::CLUSTER),
                    label(tags, labels::SERVICE_NAMESPACE),
                    label(tags, labels::SERVICE_NAME),
                ) {
                    index
                        .mirrored_slices
                        .entry((cluster, ns, name))
                        .or_default()
                        .push(slice);
                }
            } else if let Some(name) = label(tags, labels::KUBE_SERVICE_NAME) {
                index
                    .local_slices
                    .entry((namespace, name))
                    .or_default()
                    .push(slice);
            }
        }
        // Slices in name order, so that the model does not depend on watch order.
        for slices in index
            .local_slices
            .values_mut()
            .chain(index.mirrored_slices.values_mut())
        {
            slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        }
        index
    }

    /// A hash of every input `fos`'s services are derived from (see [`Model`]), or
    /// `None` when one of them has no `resourceVersion` to tell its versions apart.
    fn fingerprint(&self, fos: &FailoverService, node: &Locality) -> Option<u64> {
        let mut inputs = Fingerprint::default();
        inputs.object(&fos.metadata)?;
        inputs.value(&self.cluster);
        inputs.value(node);
        let namespace = fos.namespace().unwrap_or_default();
        let name = fos.name_any();
        let vip_service = self.vip_services.get(&(namespace.as_str(), name.as_str()));
        inputs.value(&vip_service.is_some());
        if let Some(vip_service) = vip_service {
            inputs.object(&vip_service.metadata)?;
        }
        for backing in &fos.spec.backing_services {
            let backing = &backing.kube_service;
            let slices = if self.is_local(backing) {
                let key = (backing.namespace.as_str(), backing.name.as_str());
                inputs.service(self.services.get(&key).copied())?;
                self.local_slices.get(&key)
            } else {
                let cluster = backing.cluster_name.as_deref().unwrap_or_default();
                self.mirrored_slices.get(&(
                    cluster,
                    backing.namespace.as_str(),
                    backing.name.as_str(),
                ))
            };
            inputs.value(&slices.map_or(0, Vec::len));
            for slice in slices.into_iter().flatten() {
                inputs.object(&slice.metadata)?;
            }
        }
        for take_over in &fos.spec.take_over {
            let key = (
                take_over.service.namespace.as_str(),
                take_over.service.name.as_str(),
            );
            inputs.service(self.services.get(&key).copied())?;
        }
        Some(inputs.finish())
    }

    fn is_local(&self, backing: &KubeServiceRef) -> bool {
        backing
            .cluster_name
            .as_deref()
            .is_none_or(|cluster| cluster == self.cluster)
    }

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
        if !spec
            .locality_lb_setting
            .as_ref()
            .is_none_or(|lb| lb.failover_priority.is_empty())
        {
            problem(
                "localityLbSetting.failoverPriority is not supported yet: remove it \
                 (detour orders endpoints by backingServices, zone, region and failover)"
                    .to_owned(),
            );
            return Vec::new();
        }
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
            let Some(service) = self
                .services
                .get(&(target.namespace.as_str(), target.name.as_str()))
            else {
                problem(format!(
                    "takeOver: Service {}/{} does not exist",
                    target.namespace, target.name
                ));
                continue;
            };
            let vips = cluster_ips(service);
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
        if let Some(service) = self.vip_services.get(&(namespace, name)) {
            let ips = cluster_ips(service);
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
            let backing = &backing.kube_service;
            let priority = u32::try_from(priority).unwrap_or(u32::MAX);
            let (cluster, slices, port_name) = if self.is_local(backing) {
                let key = (backing.namespace.as_str(), backing.name.as_str());
                let Some(service) = self.services.get(&key) else {
                    problem(format!(
                        "backingServices[{priority}]: Service {}/{} does not exist in this cluster",
                        backing.namespace, backing.name
                    ));
                    continue;
                };
                let Some(port_name) = service_port_name(service, spec.port.number) else {
                    problem(format!(
                        "backingServices[{priority}]: Service {}/{} has no port {}",
                        backing.namespace, backing.name, spec.port.number
                    ));
                    continue;
                };
                let slices = self.local_slices.get(&key);
                (self.cluster.to_owned(), slices, port_name)
            } else {
                let cluster = backing.cluster_name.as_deref().unwrap_or_default();
                let key = (cluster, backing.namespace.as_str(), backing.name.as_str());
                let slices = self.mirrored_slices.get(&key);
                (
                    cluster.to_owned(),
                    slices,
                    labels::port_name(spec.port.number),
                )
            };
            for slice in slices.into_iter().flatten() {
                let Some(port) = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|port| port.name.as_deref().unwrap_or_default() == port_name)
                    .and_then(|port| port.port)
                    .and_then(|port| u16::try_from(port).ok())
                    .filter(|port| *port != 0)
                else {
                    continue;
                };
                let region = if self.is_local(backing) {
                    node.region.clone()
                } else {
                    label(&slice.metadata.labels, labels::REGION)
                        .unwrap_or_default()
                        .to_owned()
                };
                for endpoint in slice.endpoints.iter().flatten() {
                    let Some(address) = endpoint
                        .addresses
                        .first()
                        .and_then(|address| address.parse::<IpAddr>().ok())
                    else {
                        continue;
                    };
                    let chosen = Chosen {
                        address,
                        port,
                        locality: locality(
                            region.clone(),
                            endpoint.zone.clone().unwrap_or_default(),
                        ),
                        priority,
                        cluster: cluster.clone(),
                    };
                    match condition(endpoint) {
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
        chosen.retain(|endpoint| seen.insert((endpoint.address, endpoint.port)));
        chosen
    }
}

enum Condition {
    Ready,
    Terminating,
    Out,
}

fn condition(endpoint: &WatchedEndpoint) -> Condition {
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if ready && !terminating {
        Condition::Ready
    } else if serving {
        Condition::Terminating
    } else {
        Condition::Out
    }
}

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

fn cluster_ips(service: &WatchedService) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    // `clusterIPs` lists `clusterIP` first when both are set; older objects may have
    // only the latter. "None" (headless) parses to nothing.
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
    {
        if let Ok(ip) = ip.parse() {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    ips
}

/// The name of `service`'s port `number`, which its EndpointSlices use ("" when unnamed).
fn service_port_name(service: &WatchedService, number: u16) -> Option<String> {
    service
        .spec
        .as_ref()?
        .ports
        .iter()
        .flatten()
        .find(|port| port.port == i32::from(number))
        .map(|port| port.name.clone().unwrap_or_default())
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
            let served = endpoints.is_empty()
                || endpoints
                    .iter()
                    .any(|e| e.address.is_ipv4() == vip.is_ipv4());
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
        let mut model = Model::default();
        let first = model.build(&inventory);
        assert_eq!(first.derived, 3);
        assert_eq!(first.config.services.len(), 3);

        // Nothing changed: everything is reused, and is what a fresh build gives.
        let again = model.build(&inventory);
        assert_eq!(again.derived, 0);
        assert_eq!(again.config, build(&inventory).config);

        // One slice changes: only its FailoverService is derived again.
        inventory.slices[1] = versioned_slice("svc1", "2", false);
        let changed = model.build(&inventory);
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
        assert_eq!(model.build(&inventory).derived, 3);

        // A backing Service that goes away is seen, and a FailoverService that goes is
        // forgotten.
        inventory.services.remove(2);
        let gone = model.build(&inventory);
        assert_eq!(gone.derived, 1);
        assert_eq!(gone.config, build(&inventory).config);
        inventory.failover_services.remove(0);
        let fewer = model.build(&inventory);
        assert_eq!((fewer.derived, fewer.config.services.len()), (0, 2));
        assert_eq!(fewer.config, build(&inventory).config);
    }

    #[test]
    fn objects_without_a_version_are_never_reused() {
        let mut inventory = versioned_inventory(2);
        let mut slice = (*inventory.slices[0]).clone();
        slice.metadata.resource_version = None;
        inventory.slices[0] = Arc::new(slice);
        let mut model = Model::default();
        assert_eq!(model.build(&inventory).derived, 2);
        assert_eq!(model.build(&inventory).derived, 1);
    }
}
