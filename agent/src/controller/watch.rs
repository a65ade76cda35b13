//! One watched set of objects for the controller: a kube-runtime reflector fed by a
//! watcher (client-go's backoff), in its own task, that wakes the reconcile loop on each
//! change.
//!
//! Invariants:
//! - fail-static: while the API server is unreachable the store keeps its last content,
//!   and the watcher retries with backoff;
//! - a relist (410 Gone, or a new connection) never shows a partial list: the reflector
//!   swaps its store only at `InitDone`, and the reconcile loop is woken only then, not
//!   on `Init`/`InitApply`;
//! - [`Watched::synced`] turns true at the first complete list and stays true;
//! - dropping a `Watched` stops its watch.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::Resource;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// A reflector's store, whether it has listed once, and the task that feeds it.
pub struct Watched<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    synced: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl<K> Watched<K>
where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    /// Feeds a new store from `events` (a watcher stream, with backoff) and wakes `wake`
    /// on each change; `what` names the watch in logs.
    pub fn spawn<S>(what: String, events: S, wake: Arc<Notify>) -> Self
    where
        S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    {
        let (store, writer) = reflector::store();
        let synced = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&synced);
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(reflector::reflector(writer, events));
            let mut failing = false;
            while let Some(event) = events.next().await {
                match event {
                    Ok(Event::Init | Event::InitApply(_)) => {}
                    Ok(event) => {
                        if failing {
                            debug!(watch = %what, "watch recovered");
                            failing = false;
                        }
                        if matches!(event, Event::InitDone) && !flag.swap(true, Ordering::AcqRel) {
                            debug!(watch = %what, "first list complete");
                        }
                        wake.notify_one();
                    }
                    Err(error) => {
                        // Logged once per outage; the watcher's backoff paces the retries.
                        if !failing {
                            warn!(watch = %what, %error, "watch failed; keeping the last state and retrying");
                            failing = true;
                        }
                    }
                }
            }
        });
        Self {
            store,
            synced,
            task,
        }
    }

    /// The objects as last listed and watched.
    pub fn store(&self) -> &Store<K> {
        &self.store
    }

    /// Whether the first complete list has arrived.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

impl<K: Resource + 'static> Drop for Watched<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A watcher over `api` with `config` and client-go's backoff, as [`Watched::spawn`] takes.
pub fn watch<K>(
    api: kube::Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + serde::de::DeserializeOwned + Debug + Send + 'static,
{
    use kube::runtime::WatchStreamExt as _;
    watcher::watcher(api, config).default_backoff()
}
