//! The agent's watches on its own cluster: FailoverServices, Services, EndpointSlices
//! (the cluster's own and those `detour controller` mirrors) and its own Node. Each
//! change goes into the model's index and becomes a new model handed to the agent's loop.
//!
//! Invariants (fail-static):
//! - nothing is handed over before every watch has listed once: until then the agent
//!   keeps serving what its pinned maps hold (an agent restarted while its API server is
//!   down keeps serving);
//! - a relisted set is swapped in only when the list is complete (`InitDone`), as
//!   kube-runtime's reflectors do, so a relist (a 410 after etcd compaction, a
//!   reconnect) never empties a table in between: what is still missing once the new
//!   list is complete is removed, nothing else;
//! - a watch that fails keeps its last state and retries with client-go's backoff
//!   (800 ms doubling to 30 s, with jitter); the datapath and health checks carry on;
//! - the agent writes nothing to the API server: what only a node knows goes to its
//!   metrics and CLI.
//!
//! Each event goes to the model's [`Index`] as it arrives; a model then re-derives only
//! the FailoverServices that read what changed (see [`Model`]).
//!
//! Changes are coalesced: whatever arrived while a model was being built or handed over
//! goes into the next one, and the hand-over channel holds one model, so a slow agent
//! loop sees the latest state, never a queue of stale ones.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client, Resource};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::failover_service::FailoverService;
use super::index::{Index, StagedService, StagedSlice};
use super::model::{Built, Model};
use super::objects::{slim_failover_service, slim_metadata, WatchedService, WatchedSlice};

/// What the agent needs to know to watch.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's name (the Downward API's `spec.nodeName`): its labels give the
    /// node's locality.
    pub node_name: String,
    /// This cluster's name, as remote-cluster Secrets and `clusterName` call it.
    pub cluster: String,
}

/// A model, with how long the watches took to sync the first time (None afterwards).
#[derive(Debug)]
pub struct Update {
    pub built: Built,
    pub first_sync: Option<Duration>,
}

/// One event of one of the watches.
enum Seen {
    // Boxed: a Node and a FailoverService are large next to the slim types.
    FailoverService(Box<watcher::Event<FailoverService>>),
    Service(watcher::Event<WatchedService>),
    Slice(watcher::Event<WatchedSlice>),
    Node(Box<watcher::Event<Node>>),
}

const WATCHES: [&str; 4] = ["failoverservices", "services", "endpointslices", "node"];

/// A kind the index files: how an event of it lands there.
trait Indexed: Resource + Sized {
    /// What a relist holds of each object until it is complete.
    type Staged;
    fn stage(index: &mut Index, object: Self) -> Self::Staged;
    fn apply(index: &mut Index, object: Self);
    fn delete(index: &mut Index, object: &Self);
    fn replace(index: &mut Index, listed: Vec<Self::Staged>);
}

fn names(object: &impl Resource) -> (&str, &str) {
    let meta = object.meta();
    (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

impl Indexed for FailoverService {
    type Staged = Arc<Self>;
    fn stage(_: &mut Index, mut object: Self) -> Arc<Self> {
        slim_failover_service(&mut object);
        Arc::new(object)
    }
    fn apply(index: &mut Index, mut object: Self) {
        slim_failover_service(&mut object);
        index.apply_failover_service(Arc::new(object));
    }
    fn delete(index: &mut Index, object: &Self) {
        let (namespace, name) = names(object);
        index.delete_failover_service(namespace, name);
    }
    fn replace(index: &mut Index, listed: Vec<Arc<Self>>) {
        index.replace_failover_services(listed);
    }
}

impl Indexed for WatchedService {
    type Staged = StagedService;
    fn stage(index: &mut Index, object: Self) -> StagedService {
        index.stage_service(&object)
    }
    fn apply(index: &mut Index, object: Self) {
        index.apply_service(&object);
    }
    fn delete(index: &mut Index, object: &Self) {
        let (namespace, name) = names(object);
        index.delete_service(namespace, name);
    }
    fn replace(index: &mut Index, listed: Vec<StagedService>) {
        index.replace_services(listed);
    }
}

impl Indexed for WatchedSlice {
    type Staged = StagedSlice;
    fn stage(index: &mut Index, object: Self) -> StagedSlice {
        index.stage_slice(&object)
    }
    fn apply(index: &mut Index, object: Self) {
        index.apply_slice(&object);
    }
    fn delete(index: &mut Index, object: &Self) {
        let (namespace, name) = names(object);
        index.delete_slice(namespace, name);
    }
    fn replace(index: &mut Index, listed: Vec<StagedSlice>) {
        index.replace_slices(listed);
    }
}

/// One watch's progress: whether it has listed once, and the relist under way.
struct Progress<T> {
    listed: bool,
    /// What a relist brought so far (staged: see [`Indexed::Staged`]), held until it
    /// is complete (`InitDone`): only then does the index swap to it, so a relist
    /// never empties a table in between.
    relist: Option<Vec<T>>,
}

impl<T> Default for Progress<T> {
    fn default() -> Self {
        Self {
            listed: false,
            relist: None,
        }
    }
}

impl<T> Progress<T> {
    /// Takes one event, staging what a relist brings; returns a complete relist, or the
    /// object of a single change.
    fn take<K>(&mut self, event: watcher::Event<K>, stage: impl FnOnce(K) -> T) -> Step<K, T> {
        match event {
            watcher::Event::Init => {
                self.relist = Some(Vec::new());
                Step::Nothing
            }
            watcher::Event::InitApply(object) => {
                self.relist.get_or_insert_with(Vec::new).push(stage(object));
                Step::Nothing
            }
            watcher::Event::InitDone => {
                self.listed = true;
                Step::Listed(self.relist.take().unwrap_or_default())
            }
            watcher::Event::Apply(object) => Step::Apply(object),
            watcher::Event::Delete(object) => Step::Delete(object),
        }
    }

    /// Takes one event into `index`; returns whether something may have changed.
    fn index<K: Indexed<Staged = T>>(
        &mut self,
        event: watcher::Event<K>,
        index: &mut Index,
    ) -> bool {
        match self.take(event, |object| K::stage(index, object)) {
            Step::Nothing => false,
            Step::Listed(listed) => {
                K::replace(index, listed);
                true
            }
            Step::Apply(object) => {
                K::apply(index, object);
                true
            }
            Step::Delete(object) => {
                K::delete(index, &object);
                true
            }
        }
    }
}

enum Step<K, T> {
    Nothing,
    Listed(Vec<T>),
    Apply(K),
    Delete(K),
}

/// Starts the watches; models go to `updates` until it is closed.
pub fn spawn(client: Client, options: Options, updates: mpsc::Sender<Update>) -> JoinHandle<()> {
    tokio::spawn(run(client, options, updates))
}

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    index: usize,
    seen: fn(watcher::Event<K>) -> Seen,
) -> BoxStream<'static, Seen>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    watcher(api, config)
        .default_backoff()
        // Held for as long as the object lives, on every node: only what is read.
        .modify(|object| slim_metadata(object.meta_mut()))
        .filter_map(move |event| {
            futures::future::ready(match event {
                Ok(event) => Some(seen(event)),
                Err(error) => {
                    warn!(watch = WATCHES[index], %error, "watch failed; keeping the last state and retrying");
                    None
                }
            })
        })
        .boxed()
}

#[derive(Default)]
struct Watches {
    failover_services: Progress<Arc<FailoverService>>,
    services: Progress<StagedService>,
    slices: Progress<StagedSlice>,
    node: Progress<Node>,
}

impl Watches {
    fn listed(&self) -> bool {
        self.failover_services.listed
            && self.services.listed
            && self.slices.listed
            && self.node.listed
    }

    /// Takes one event into the model's index; returns whether something may have
    /// changed.
    fn index(&mut self, seen: Seen, index: &mut Index) -> bool {
        match seen {
            Seen::FailoverService(event) => self.failover_services.index(*event, index),
            Seen::Service(event) => self.services.index(event, index),
            Seen::Slice(event) => self.slices.index(event, index),
            Seen::Node(event) => {
                let labels = match self.node.take(*event, |node| node) {
                    Step::Nothing => return false,
                    Step::Listed(nodes) => nodes.first().and_then(|n| n.metadata.labels.clone()),
                    Step::Apply(node) => node.metadata.labels.clone(),
                    Step::Delete(_) => None,
                };
                index.set_node_labels(labels.unwrap_or_else(BTreeMap::new));
                true
            }
        }
    }
}

async fn run(client: Client, options: Options, updates: mpsc::Sender<Update>) {
    let started = Instant::now();
    // Listed from the API server's watch cache (resourceVersion=0), not etcd: every
    // node's agent lists these, as kube-proxy does.
    let cached = || watcher::Config::default().any_semantic();
    let mut events: SelectAll<_> = futures::stream::select_all([
        watch(
            Api::<FailoverService>::all(client.clone()),
            cached(),
            0,
            |event| Seen::FailoverService(Box::new(event)),
        ),
        watch(
            Api::<WatchedService>::all(client.clone()),
            cached(),
            1,
            Seen::Service,
        ),
        watch(
            Api::<WatchedSlice>::all(client.clone()),
            cached(),
            2,
            Seen::Slice,
        ),
        watch(
            Api::<Node>::all(client),
            cached().fields(&format!("metadata.name={}", options.node_name)),
            3,
            |event| Seen::Node(Box::new(event)),
        ),
    ]);
    let mut watches = Watches::default();
    let mut first_sync = true;
    let mut changed = false;
    let mut model = Model::new(options.cluster.clone());
    while let Some(seen) = events.next().await {
        changed |= watches.index(seen, model.index_mut());
        // Everything already delivered goes into this model.
        while let Some(Some(seen)) = events.next().now_or_never() {
            changed |= watches.index(seen, model.index_mut());
        }
        if !changed || !watches.listed() {
            continue;
        }
        changed = false;
        let built = model.build();
        let first = first_sync.then(|| started.elapsed());
        if first_sync {
            info!(
                failover_services = model.failover_services(),
                services = built.config.services.len(),
                problems = built.problems.len(),
                sync_ms = started.elapsed().as_millis(),
                "kubernetes: first sync complete"
            );
            first_sync = false;
        }
        let update = Update {
            built,
            first_sync: first,
        };
        if updates.send(update).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
#[path = "watch_tests.rs"]
mod tests;
