//! The agent's watches on its own cluster: FailoverServices, Services, EndpointSlices
//! (the cluster's own and those `detour controller` mirrors) and its own Node. Each
//! change becomes a new model ([`model::build`]) handed to the agent's loop.
//!
//! Invariants (fail-static):
//! - nothing is handed over before every watch has listed once: until then the agent
//!   keeps serving what its pinned maps hold (an agent restarted while its API server is
//!   down keeps serving);
//! - the stores are kube-runtime reflectors, which swap in a relisted set only when the
//!   list is complete (`InitDone`), so a relist (a 410 after etcd compaction, a
//!   reconnect) never empties a table in between: what is still missing once the new
//!   list is complete is removed, nothing else;
//! - a watch that fails keeps its last state and retries with client-go's backoff
//!   (800 ms doubling to 30 s, with jitter); the datapath and health checks carry on;
//! - the agent writes nothing to the API server: what only a node knows goes to its
//!   metrics and CLI.
//!
//! Each model reuses what did not change (see [`Model`]): an EndpointSlice change
//! re-derives only the FailoverServices that read that slice.
//!
//! Changes are coalesced: whatever arrived while a model was being built or handed over
//! goes into the next one, and the hand-over channel holds one model, so a slow agent
//! loop sees the latest state, never a queue of stale ones.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client, Resource};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::failover_service::FailoverService;
use super::model::{Built, Inventory, Model};
use super::objects::{slim_metadata, WatchedService, WatchedSlice};

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

/// Which watch an event came from, and whether it completed a list.
#[derive(Debug, Clone, Copy)]
struct Seen {
    watch: usize,
    listed: bool,
    changed: bool,
}

const WATCHES: [&str; 4] = ["failoverservices", "services", "endpointslices", "node"];

/// Starts the watches; models go to `updates` until it is closed.
pub fn spawn(client: Client, options: Options, updates: mpsc::Sender<Update>) -> JoinHandle<()> {
    tokio::spawn(run(client, options, updates))
}

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    index: usize,
) -> (Store<K>, BoxStream<'static, Option<Seen>>)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        // Stored for as long as the object lives, on every node: only what is read.
        .modify(|object| slim_metadata(object.meta_mut()))
        .reflect(writer)
        .map(move |event| match event {
            Ok(watcher::Event::InitDone) => Some(Seen {
                watch: index,
                listed: true,
                changed: true,
            }),
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Some(Seen {
                watch: index,
                listed: false,
                changed: true,
            }),
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
            Err(error) => {
                warn!(watch = WATCHES[index], %error, "watch failed; keeping the last state and retrying");
                None
            }
        })
        .boxed();
    (reader, stream)
}

async fn run(client: Client, options: Options, updates: mpsc::Sender<Update>) {
    let started = Instant::now();
    // Listed from the API server's watch cache (resourceVersion=0), not etcd: every
    // node's agent lists these, as kube-proxy does.
    let cached = || watcher::Config::default().any_semantic();
    let (failover_services, a) = watch(Api::<FailoverService>::all(client.clone()), cached(), 0);
    let (services, b) = watch(Api::<WatchedService>::all(client.clone()), cached(), 1);
    let (slices, c) = watch(Api::<WatchedSlice>::all(client.clone()), cached(), 2);
    let (nodes, d) = watch(
        Api::<Node>::all(client),
        cached().fields(&format!("metadata.name={}", options.node_name)),
        3,
    );
    let mut events: SelectAll<_> = futures::stream::select_all([a, b, c, d]);
    let mut listed = [false; WATCHES.len()];
    let mut first_sync = true;
    let mut changed = false;
    let mut model = Model::default();
    while let Some(seen) = events.next().await {
        let mut note = |seen: Option<Seen>| {
            if let Some(seen) = seen {
                listed[seen.watch] |= seen.listed;
                changed |= seen.changed;
            }
        };
        note(seen);
        // Everything already delivered goes into this model.
        while let Some(Some(seen)) = events.next().now_or_never() {
            note(seen);
        }
        if !changed || !listed.iter().all(|done| *done) {
            continue;
        }
        changed = false;
        let inventory = Inventory {
            cluster: options.cluster.clone(),
            node_labels: nodes
                .state()
                .first()
                .and_then(|node| node.metadata.labels.clone())
                .unwrap_or_else(BTreeMap::new),
            failover_services: failover_services.state(),
            services: services.state(),
            slices: slices.state(),
        };
        let built = model.build(&inventory);
        let first = first_sync.then(|| started.elapsed());
        if first_sync {
            info!(
                failover_services = inventory.failover_services.len(),
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
