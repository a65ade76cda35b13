//! What the agent's cluster holds, kept up to date from the watch events and filed the
//! way the model looks it up, with which FailoverServices read which objects.
//!
//! Why our own and not kube-runtime's reflector stores: a store answers "everything of a
//! kind", so each event meant indexing every Service and EndpointSlice again to find
//! what one FailoverService reads. At 10,000 FailoverServices (30,000 slices) that was
//! most of the ~200 ms from an EndpointSlice change to the agent's loop. Here an event
//! costs its own object: it is filed under its lookup key, and the FailoverServices that
//! read that key are marked touched, so the model re-derives those and reuses the rest.
//!
//! Invariants:
//! - every object is filed under the key the model looks it up by (`Input`); an object
//!   whose key changes (a slice relabelled, a Service that stops naming its
//!   FailoverService) is moved, and the readers of the old key and of the new one are
//!   both touched;
//! - every FailoverService is registered as a reader of each `Input` its spec names,
//!   whether or not that object exists yet, so an object that appears later touches it;
//! - what is touched accumulates until `Index::take_touched`; a change that affects
//!   everything (the node's labels) touches all;
//! - a relist ([`Index::replace_services`] and its siblings) removes what the new list no
//!   longer holds and files the rest, touching readers as single events would: the
//!   result is the same as starting from that list. A relist in progress is held
//!   staged ([`Index::stage_slice`]): in the compact form, never as whole objects;
//! - lookups take `&str` keys and allocate nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use smallvec::SmallVec;

use super::failover_service::{FailoverService, KubeServiceRef};
use super::labels;
use super::objects::{WatchedEndpoint, WatchedService, WatchedSlice};
use crate::intern::intern;

/// Hashed with foldhash: nothing here is keyed by what a client chose freely (names are
/// DNS labels an API server accepted), and these maps are on every event's path.
pub(super) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// A FailoverService by (namespace, name).
pub(super) type FailoverKey = (String, String);

/// A Service's slices by slice name: iteration is in name order, so a model never
/// depends on the order the watch delivered them in. A sorted `Vec`, not a `BTreeMap`:
/// a Service has one slice or a few, and a `BTreeMap` allocates a node for eleven.
#[derive(Debug, Default)]
pub(super) struct Slices(Vec<(String, StoredSlice)>);

impl Slices {
    fn insert(&mut self, name: String, slice: StoredSlice) {
        match self.0.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
            Ok(at) => self.0[at].1 = slice,
            Err(at) => {
                // Room for exactly one more: a Service has one slice or a few, and a
                // Vec's first growth makes room for four (416 bytes at 30,000 slices).
                self.0.reserve_exact(1);
                self.0.insert(at, (name, slice));
            }
        }
    }

    fn remove(&mut self, name: &str) {
        if let Ok(at) = self.0.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            self.0.remove(at);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In name order.
    pub(super) fn values(&self) -> impl Iterator<Item = &StoredSlice> {
        self.0.iter().map(|(_, slice)| slice)
    }
}

/// Namespace → name → value, looked up with borrowed names.
#[derive(Debug)]
pub(super) struct ByName<V>(FastMap<String, FastMap<String, V>>);

impl<V> Default for ByName<V> {
    fn default() -> Self {
        Self(FastMap::default())
    }
}

impl<V> ByName<V> {
    pub(super) fn get(&self, namespace: &str, name: &str) -> Option<&V> {
        self.0.get(namespace)?.get(name)
    }

    fn get_mut(&mut self, namespace: &str, name: &str) -> Option<&mut V> {
        self.0.get_mut(namespace)?.get_mut(name)
    }

    fn entry(&mut self, namespace: &str, name: &str) -> &mut V
    where
        V: Default,
    {
        if !self.0.contains_key(namespace) {
            self.0.insert(namespace.to_owned(), FastMap::default());
        }
        let names = self.0.get_mut(namespace).expect("inserted above");
        if !names.contains_key(name) {
            names.insert(name.to_owned(), V::default());
        }
        names.get_mut(name).expect("inserted above")
    }

    fn insert(&mut self, namespace: &str, name: &str, value: V) -> Option<V> {
        self.0
            .entry(namespace.to_owned())
            .or_default()
            .insert(name.to_owned(), value)
    }

    fn remove(&mut self, namespace: &str, name: &str) -> Option<V> {
        let names = self.0.get_mut(namespace)?;
        let value = names.remove(name);
        if names.is_empty() {
            self.0.remove(namespace);
        }
        value
    }

    /// Removes the entry if `empty` says it holds nothing any more.
    fn prune(&mut self, namespace: &str, name: &str, empty: impl Fn(&V) -> bool) {
        if self.get(namespace, name).is_some_and(empty) {
            self.remove(namespace, name);
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &str, &V)> {
        self.0.iter().flat_map(|(namespace, names)| {
            names
                .iter()
                .map(move |(name, value)| (namespace.as_str(), name.as_str(), value))
        })
    }

    fn keys(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|(namespace, name, _)| (namespace.to_owned(), name.to_owned()))
            .collect()
    }
}

/// What the index keeps of a Service: what the model reads of it, nothing more.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredService {
    /// The object's identity and version, hashed (see `version`).
    pub version: Option<u64>,
    /// `clusterIPs` (or `clusterIP`), parsed; empty when headless.
    pub cluster_ips: Vec<IpAddr>,
    /// Each port's name ("" when unnamed) and number.
    pub ports: Vec<(Arc<str>, i32)>,
}

/// What the index keeps of an EndpointSlice.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSlice {
    /// The object's identity and version, hashed (see `version`).
    pub version: Option<u64>,
    /// Its [`labels::REGION`] label (mirrored slices carry their cluster's region).
    pub region: Option<Arc<str>>,
    /// Each port's name ("" when unnamed) and number, when it is a usable one.
    pub ports: Vec<(Arc<str>, Option<u16>)>,
    /// The endpoints whose first address parses.
    pub endpoints: Vec<StoredEndpoint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredEndpoint {
    pub address: IpAddr,
    /// "" when the slice gives none.
    pub zone: Arc<str>,
    pub condition: Condition,
}

/// A Service ready to be filed: what a relist holds until it is complete, so that a
/// relist of every Service holds the compact form, not the objects.
#[derive(Debug)]
pub struct StagedService {
    namespace: String,
    name: String,
    /// The FailoverService it is the VIP Service of ([`labels::FAILOVER_SERVICE`]).
    owner: Option<String>,
    stored: Arc<StoredService>,
}

/// An EndpointSlice ready to be filed (see [`StagedService`]).
#[derive(Debug)]
pub struct StagedSlice {
    namespace: String,
    name: String,
    /// `None` for a slice the model reads nothing of.
    home: Option<Input>,
    stored: StoredSlice,
}

/// Whether an endpoint takes traffic, from its conditions as the API defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Ready (a missing `ready` counts as ready) and not terminating.
    Ready,
    /// Serving but terminating (or not ready): used only when nothing is ready.
    Terminating,
    Out,
}

impl Condition {
    fn of(endpoint: &WatchedEndpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        if ready && !terminating {
            Self::Ready
        } else if serving {
            Self::Terminating
        } else {
            Self::Out
        }
    }
}

/// A key's hash, for `Index::readers` and `Index::keys`.
fn hash(key: &impl std::hash::Hash) -> u64 {
    use std::hash::BuildHasher as _;
    foldhash::fast::FixedState::with_seed(0).hash_one(key)
}

/// An object's `uid` and `resourceVersion`, hashed: what tells two versions apart for
/// the model's fingerprints. `None` without a `resourceVersion` (never the case for
/// objects from an API server): such an object is never taken as unchanged.
pub(super) fn version(meta: &ObjectMeta) -> Option<u64> {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    let mut hasher = foldhash::fast::FixedState::with_seed(0).build_hasher();
    meta.uid.hash(&mut hasher);
    meta.resource_version.as_ref()?.hash(&mut hasher);
    Some(hasher.finish())
}

/// An object a FailoverService's services are derived from, by the key the model looks
/// it up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
///
/// Its names are [`intern`]ed: every slice's home is one, and a Service's slices in
/// three clusters name the same namespace and Service.
pub(super) enum Input {
    /// A Service of this cluster: a local backing Service or a take-over target.
    Service { namespace: Arc<str>, name: Arc<str> },
    /// The Service `detour controller` made for a FailoverService (labelled with it).
    VipService {
        namespace: Arc<str>,
        failover_service: Arc<str>,
    },
    /// This cluster's own slices of a Service.
    LocalSlices {
        namespace: Arc<str>,
        service: Arc<str>,
    },
    /// Slices mirrored from another cluster for a Service there.
    MirroredSlices {
        cluster: Arc<str>,
        namespace: Arc<str>,
        service: Arc<str>,
    },
}

/// Which FailoverServices an event touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Touched {
    All,
    These(FastSet<FailoverKey>),
}

impl Default for Touched {
    fn default() -> Self {
        Self::These(FastSet::default())
    }
}

/// The precedence of FailoverServices: age first (the older keeps a contested
/// VIP:port), then namespace and name.
pub(super) type Precedence = (Option<k8s_openapi::jiff::Timestamp>, FailoverKey);

fn precedence(fos: &FailoverService) -> Precedence {
    (
        fos.metadata.creation_timestamp.as_ref().map(|t| t.0),
        key_of(&fos.metadata),
    )
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> FailoverKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct Index {
    /// The name of the agent's own cluster: backing services with no `clusterName`, or
    /// this one, are read from the cluster's own EndpointSlices.
    pub(super) cluster: String,
    pub(super) node_labels: BTreeMap<String, String>,
    pub(super) failover_services: ByName<Arc<FailoverService>>,
    /// Every FailoverService in precedence order.
    pub(super) order: BTreeSet<Precedence>,
    services: ByName<Arc<StoredService>>,
    /// The FailoverService each Service names as its VIP Service's owner.
    owners: ByName<String>,
    /// Services labelled as a FailoverService's VIP Service, by (namespace,
    /// FailoverService), then by Service name.
    vip_services: ByName<BTreeMap<String, Arc<StoredService>>>,
    local_slices: ByName<Slices>,
    /// By cluster, then (namespace, Service).
    mirrored_slices: FastMap<String, ByName<Slices>>,
    /// Where each slice is filed, by the slice's (namespace, name).
    slice_homes: ByName<Input>,
    /// Which FailoverServices read an input: by a hash of the input, to hashes of
    /// the FailoverServices' keys (one entry per time a spec names the input). Hashes,
    /// not keys: at 10,000 FailoverServices the keys' strings were most of the index.
    /// Exact all the same: an input hash that collides touches the readers of both
    /// inputs (harmless: the model then finds their fingerprints unchanged), and a key
    /// hash resolves to every key that has it (`Index::keys`).
    readers: FastMap<u64, SmallVec<[u64; 1]>>,
    /// FailoverService keys by their hash.
    keys: FastMap<u64, SmallVec<[FailoverKey; 1]>>,
    touched: Touched,
}

impl Index {
    #[must_use]
    pub fn new(cluster: String) -> Self {
        Self {
            cluster,
            touched: Touched::All,
            ..Self::default()
        }
    }

    /// What was touched since the last call; nothing is touched afterwards.
    pub(super) fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched)
    }

    fn touch_readers(&mut self, input: &Input) {
        let Touched::These(touched) = &mut self.touched else {
            return;
        };
        let readers = self.readers.get(&hash(input)).into_iter().flatten();
        for key in readers.flat_map(|reader| self.keys.get(reader).into_iter().flatten()) {
            touched.insert(key.clone());
        }
    }

    fn touch(&mut self, key: &FailoverKey) {
        if let Touched::These(touched) = &mut self.touched {
            touched.insert(key.clone());
        }
    }

    /// The node's labels; a change touches every FailoverService (its locality is an
    /// input of each).
    pub fn set_node_labels(&mut self, labels: BTreeMap<String, String>) {
        if labels != self.node_labels {
            self.node_labels = labels;
            self.touched = Touched::All;
        }
    }

    pub(super) fn is_local(&self, backing: &KubeServiceRef) -> bool {
        backing
            .cluster_name
            .as_deref()
            .is_none_or(|cluster| cluster == self.cluster)
    }

    /// The objects `fos` reads, by how its spec names them.
    fn inputs(&self, fos: &FailoverService) -> Vec<Input> {
        let namespace = intern(fos.metadata.namespace.as_deref().unwrap_or_default());
        let mut inputs = vec![Input::VipService {
            namespace,
            failover_service: intern(fos.metadata.name.as_deref().unwrap_or_default()),
        }];
        for backing in &fos.spec.backing_services {
            // An external endpoint is read from the spec alone.
            let Some(backing) = &backing.kube_service else {
                continue;
            };
            let (namespace, name) = (intern(&backing.namespace), intern(&backing.name));
            if self.is_local(backing) {
                inputs.push(Input::Service {
                    namespace: namespace.clone(),
                    name: name.clone(),
                });
                inputs.push(Input::LocalSlices {
                    namespace,
                    service: name,
                });
            } else {
                inputs.push(Input::MirroredSlices {
                    cluster: intern(backing.cluster_name.as_deref().unwrap_or_default()),
                    namespace,
                    service: name,
                });
            }
        }
        for take_over in &fos.spec.take_over {
            inputs.push(Input::Service {
                namespace: intern(&take_over.service.namespace),
                name: intern(&take_over.service.name),
            });
        }
        inputs
    }

    fn register(&mut self, fos: &FailoverService, key: &FailoverKey) {
        let reader = hash(key);
        self.keys.entry(reader).or_default().push(key.clone());
        for input in self.inputs(fos) {
            self.readers.entry(hash(&input)).or_default().push(reader);
        }
    }

    fn unregister(&mut self, fos: &FailoverService, key: &FailoverKey) {
        let reader = hash(key);
        if let Some(keys) = self.keys.get_mut(&reader) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.keys.remove(&reader);
            }
        }
        for input in self.inputs(fos) {
            let input = hash(&input);
            if let Some(readers) = self.readers.get_mut(&input) {
                if let Some(at) = readers.iter().position(|r| *r == reader) {
                    readers.swap_remove(at);
                }
                if readers.is_empty() {
                    self.readers.remove(&input);
                }
            }
        }
    }

    pub fn apply_failover_service(&mut self, fos: Arc<FailoverService>) {
        let key = key_of(&fos.metadata);
        self.delete_failover_service(&key.0, &key.1);
        self.register(&fos, &key);
        self.order.insert(precedence(&fos));
        self.failover_services.insert(&key.0, &key.1, fos);
        self.touch(&key);
    }

    pub fn delete_failover_service(&mut self, namespace: &str, name: &str) {
        let Some(old) = self.failover_services.remove(namespace, name) else {
            return;
        };
        let key = key_of(&old.metadata);
        self.unregister(&old, &key);
        self.order.remove(&precedence(&old));
        self.touch(&key);
    }

    pub fn apply_service(&mut self, service: &WatchedService) {
        let staged = self.stage_service(service);
        self.put_service(staged);
    }

    /// What the index keeps of `service` (its strings interned here).
    pub fn stage_service(&mut self, service: &WatchedService) -> StagedService {
        let (namespace, name) = key_of(&service.metadata);
        let spec = service.spec.as_ref();
        // `clusterIPs` lists `clusterIP` first when both are set; older objects may have
        // only the latter. "None" (headless) parses to nothing.
        let mut cluster_ips: Vec<IpAddr> = Vec::new();
        for ip in spec
            .and_then(|s| s.cluster_ips.as_ref())
            .into_iter()
            .flatten()
            .chain(spec.and_then(|s| s.cluster_ip.as_ref()))
        {
            if let Ok(ip) = ip.parse() {
                if !cluster_ips.contains(&ip) {
                    cluster_ips.push(ip);
                }
            }
        }
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .map(|port| (intern(port.name.as_deref().unwrap_or_default()), port.port))
            .collect();
        StagedService {
            namespace,
            name,
            owner: label(&service.metadata.labels, labels::FAILOVER_SERVICE).map(str::to_owned),
            stored: Arc::new(StoredService {
                version: version(&service.metadata),
                cluster_ips,
                ports,
            }),
        }
    }

    fn put_service(&mut self, staged: StagedService) {
        let StagedService {
            namespace,
            name,
            owner,
            stored,
        } = staged;
        self.delete_service(&namespace, &name);
        if let Some(owner) = owner {
            self.vip_services
                .entry(&namespace, &owner)
                .insert(name.clone(), stored.clone());
            self.owners.insert(&namespace, &name, owner.clone());
            self.touch_readers(&Input::VipService {
                namespace: intern(&namespace),
                failover_service: intern(&owner),
            });
        }
        self.services.insert(&namespace, &name, stored);
        self.touch_readers(&Input::Service {
            namespace: intern(&namespace),
            name: intern(&name),
        });
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        if self.services.remove(namespace, name).is_none() {
            return;
        }
        if let Some(owner) = self.owners.remove(namespace, name) {
            if let Some(services) = self.vip_services.get_mut(namespace, &owner) {
                services.remove(name);
            }
            self.vip_services
                .prune(namespace, &owner, BTreeMap::is_empty);
            self.touch_readers(&Input::VipService {
                namespace: intern(namespace),
                failover_service: intern(&owner),
            });
        }
        self.touch_readers(&Input::Service {
            namespace: intern(namespace),
            name: intern(name),
        });
    }

    /// Where a slice is filed, from its labels: mirrored slices under the cluster,
    /// namespace and Service the controller labelled them with, the cluster's own under
    /// their namespace and `kubernetes.io/service-name`; `None` for a slice of neither
    /// kind (the model reads nothing of it).
    fn home(slice: &WatchedSlice) -> Option<Input> {
        let tags = &slice.metadata.labels;
        if label(tags, labels::MANAGED_BY) == Some(labels::CONTROLLER) {
            Some(Input::MirroredSlices {
                cluster: intern(label(tags, labels::CLUSTER)?),
                namespace: intern(label(tags, labels::SERVICE_NAMESPACE)?),
                service: intern(label(tags, labels::SERVICE_NAME)?),
            })
        } else {
            Some(Input::LocalSlices {
                namespace: intern(slice.metadata.namespace.as_deref().unwrap_or_default()),
                service: intern(label(tags, labels::KUBE_SERVICE_NAME)?),
            })
        }
    }

    fn slices_at(&mut self, home: &Input) -> Option<&mut Slices> {
        match home {
            Input::LocalSlices { namespace, service } => {
                Some(self.local_slices.entry(namespace, service))
            }
            Input::MirroredSlices {
                cluster,
                namespace,
                service,
            } => Some(
                self.mirrored_slices
                    .entry(cluster.to_string())
                    .or_default()
                    .entry(namespace, service),
            ),
            Input::Service { .. } | Input::VipService { .. } => None,
        }
    }

    fn prune_slices(&mut self, home: &Input) {
        match home {
            Input::LocalSlices { namespace, service } => {
                self.local_slices
                    .prune(namespace, service, Slices::is_empty);
            }
            Input::MirroredSlices {
                cluster,
                namespace,
                service,
            } => {
                if let Some(by_name) = self.mirrored_slices.get_mut(&**cluster) {
                    by_name.prune(namespace, service, Slices::is_empty);
                    if by_name.0.is_empty() {
                        self.mirrored_slices.remove(&**cluster);
                    }
                }
            }
            Input::Service { .. } | Input::VipService { .. } => {}
        }
    }

    pub fn apply_slice(&mut self, slice: &WatchedSlice) {
        let staged = self.stage_slice(slice);
        self.put_slice(staged);
    }

    /// What the index keeps of `slice` (its strings interned here).
    pub fn stage_slice(&mut self, slice: &WatchedSlice) -> StagedSlice {
        let (namespace, name) = key_of(&slice.metadata);
        StagedSlice {
            namespace,
            name,
            home: Self::home(slice),
            stored: self.stored_slice(slice),
        }
    }

    fn put_slice(&mut self, staged: StagedSlice) {
        let StagedSlice {
            namespace,
            name,
            home,
            stored,
        } = staged;
        self.delete_slice(&namespace, &name);
        let Some(home) = home else {
            return;
        };
        if let Some(slices) = self.slices_at(&home) {
            slices.insert(name.clone(), stored);
        }
        self.touch_readers(&home);
        self.slice_homes.insert(&namespace, &name, home);
    }

    fn stored_slice(&mut self, slice: &WatchedSlice) -> StoredSlice {
        let region = label(&slice.metadata.labels, labels::REGION).map(intern);
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|port| {
                let number = port
                    .port
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0);
                (intern(port.name.as_deref().unwrap_or_default()), number)
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .filter_map(|endpoint| {
                let address = endpoint.addresses.first()?.parse().ok()?;
                Some(StoredEndpoint {
                    address,
                    zone: intern(endpoint.zone.as_deref().unwrap_or_default()),
                    condition: Condition::of(endpoint),
                })
            })
            .collect();
        // Exactly as long as they are: collecting through `flatten` starts at room for
        // four, and there are 30,000 slices of some three endpoints at the benchmark.
        let (mut ports, mut endpoints): (Vec<_>, Vec<_>) = (ports, endpoints);
        ports.shrink_to_fit();
        endpoints.shrink_to_fit();
        StoredSlice {
            version: version(&slice.metadata),
            region,
            ports,
            endpoints,
        }
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let Some(home) = self.slice_homes.remove(namespace, name) else {
            return;
        };
        if let Some(slices) = self.slices_at(&home) {
            slices.remove(name);
        }
        self.prune_slices(&home);
        self.touch_readers(&home);
    }

    /// A relist of FailoverServices: see the module doc.
    pub fn replace_failover_services(&mut self, listed: Vec<Arc<FailoverService>>) {
        let kept: FastSet<FailoverKey> = listed.iter().map(|o| key_of(&o.metadata)).collect();
        for (namespace, name) in self.failover_services.keys() {
            if !kept.contains(&(namespace.clone(), name.clone())) {
                self.delete_failover_service(&namespace, &name);
            }
        }
        for fos in listed {
            self.apply_failover_service(fos);
        }
    }

    /// A relist of Services: see the module doc.
    pub fn replace_services(&mut self, listed: Vec<StagedService>) {
        let kept: FastSet<FailoverKey> = listed
            .iter()
            .map(|o| (o.namespace.clone(), o.name.clone()))
            .collect();
        for (namespace, name) in self.services.keys() {
            if !kept.contains(&(namespace.clone(), name.clone())) {
                self.delete_service(&namespace, &name);
            }
        }
        for service in listed {
            self.put_service(service);
        }
    }

    /// A relist of EndpointSlices: see the module doc.
    pub fn replace_slices(&mut self, listed: Vec<StagedSlice>) {
        let kept: FastSet<FailoverKey> = listed
            .iter()
            .map(|o| (o.namespace.clone(), o.name.clone()))
            .collect();
        for (namespace, name) in self.slice_homes.keys() {
            if !kept.contains(&(namespace.clone(), name.clone())) {
                self.delete_slice(&namespace, &name);
            }
        }
        for slice in listed {
            self.put_slice(slice);
        }
    }

    /// A Service of this cluster.
    pub(super) fn service(&self, namespace: &str, name: &str) -> Option<&StoredService> {
        self.services.get(namespace, name).map(AsRef::as_ref)
    }

    /// The Service the controller made for FailoverService `namespace/name`: the first
    /// by name if several claim it.
    pub(super) fn vip_service(&self, namespace: &str, name: &str) -> Option<&StoredService> {
        let services = self.vip_services.get(namespace, name)?;
        services.values().next().map(AsRef::as_ref)
    }

    /// The cluster's own slices of Service `namespace/service`, in name order.
    pub(super) fn local_slices(&self, namespace: &str, service: &str) -> Option<&Slices> {
        self.local_slices.get(namespace, service)
    }

    /// The slices mirrored from `cluster` for its Service `namespace/service`, in name
    /// order.
    pub(super) fn mirrored_slices(
        &self,
        cluster: &str,
        namespace: &str,
        service: &str,
    ) -> Option<&Slices> {
        self.mirrored_slices.get(cluster)?.get(namespace, service)
    }
}

pub(super) fn label<'a>(
    labels: &'a Option<BTreeMap<String, String>>,
    key: &str,
) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}
