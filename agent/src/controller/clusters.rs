//! The remote clusters `detour controller` reads: named by Secrets in its namespace
//! labelled [`labels::REMOTE_CLUSTER_SECRET`]`=true`, each data key a cluster name and
//! its value a kubeconfig (as Istio's remote secrets), and one connection per cluster
//! that watches its Nodes and the Services the FailoverServices name there.
//!
//! Invariants:
//! - a cluster name is an RFC 1123 label other than the local cluster's, named by one
//!   Secret: when two Secrets name the same cluster, the older Secret (then the first by
//!   name) keeps it and the other's entry is refused with a log;
//! - a kubeconfig is identified by its sha256: an unchanged Secret changes nothing;
//! - a changed kubeconfig starts a new connection beside the old one, which keeps serving
//!   until the new one has listed everything it watches (then the old one is dropped);
//!   the first connection to a cluster serves once it has synced, or after the initial
//!   sync bound, whatever has synced by then (the rest stays as it was: fail-static);
//! - a cluster whose Secret entry is gone has no connection: its mirrors are deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use sha2::{Digest as _, Sha256};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use super::mirror::{Locality, MirrorKey};
use super::watch::{watch, Watched};
use crate::sources::kubernetes::labels;

/// One remote cluster's entry, as its Secret gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteEntry {
    /// The Secret it comes from.
    pub secret: String,
    /// The kubeconfig (YAML or JSON).
    pub kubeconfig: String,
    /// sha256 of `kubeconfig`.
    pub digest: [u8; 32],
}

/// An entry of a remote-cluster Secret that is not used, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refusal {
    pub secret: String,
    pub cluster: String,
    pub reason: String,
}

/// The clusters `secrets` name, and the entries refused. `secrets` in any order.
#[must_use]
pub fn remote_entries(
    secrets: &[Arc<Secret>],
    local_cluster: &str,
) -> (BTreeMap<String, RemoteEntry>, Vec<Refusal>) {
    let mut secrets: Vec<&Secret> = secrets.iter().map(AsRef::as_ref).collect();
    // Older first: a Secret added later cannot take a cluster over.
    secrets.sort_by(|a, b| {
        let created = |s: &Secret| s.metadata.creation_timestamp.clone().map(|t| t.0);
        created(a)
            .cmp(&created(b))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    let mut entries: BTreeMap<String, RemoteEntry> = BTreeMap::new();
    let mut refused = Vec::new();
    for secret in secrets {
        let name = secret.metadata.name.clone().unwrap_or_default();
        for (cluster, value) in secret.data.iter().flatten() {
            let refuse = |reason: String| Refusal {
                secret: name.clone(),
                cluster: cluster.clone(),
                reason,
            };
            if !is_dns_label(cluster) {
                refused.push(refuse("the cluster name is not an RFC 1123 label".into()));
            } else if cluster == local_cluster {
                refused.push(refuse("it names the local cluster (--cluster-name)".into()));
            } else if let Some(first) = entries.get(cluster) {
                refused.push(refuse(format!(
                    "cluster already named by Secret {}",
                    first.secret
                )));
            } else {
                match String::from_utf8(value.0.clone()) {
                    Ok(kubeconfig) => {
                        entries.insert(
                            cluster.clone(),
                            RemoteEntry {
                                secret: name.clone(),
                                digest: Sha256::digest(kubeconfig.as_bytes()).into(),
                                kubeconfig,
                            },
                        );
                    }
                    Err(_) => refused.push(refuse("the kubeconfig is not UTF-8".into())),
                }
            }
        }
    }
    refused.sort();
    (entries, refused)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Builds a client from a kubeconfig's current context.
async fn client_for(kubeconfig: &str) -> anyhow::Result<kube::Client> {
    let parsed = Kubeconfig::from_yaml(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// The watches of one remote Service: the Service itself and its EndpointSlices.
pub struct ServiceWatch {
    pub service: Watched<Service>,
    pub slices: Watched<EndpointSlice>,
}

impl ServiceWatch {
    fn start(client: &kube::Client, key: &MirrorKey, wake: &Arc<Notify>) -> Self {
        let services: Api<Service> = Api::namespaced(client.clone(), &key.namespace);
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &key.namespace);
        Self {
            service: Watched::spawn(
                format!("{key} Service"),
                watch(
                    services,
                    watcher::Config::default().fields(&format!("metadata.name={}", key.service)),
                ),
                Arc::clone(wake),
            ),
            slices: Watched::spawn(
                format!("{key} EndpointSlices"),
                watch(
                    slices,
                    watcher::Config::default().labels(&format!(
                        "{}={}",
                        labels::KUBE_SERVICE_NAME,
                        key.service
                    )),
                ),
                Arc::clone(wake),
            ),
        }
    }

    /// Both lists complete.
    pub fn synced(&self) -> bool {
        self.service.synced() && self.slices.synced()
    }
}

/// One client of a remote cluster and what it watches there.
pub struct Connection {
    digest: [u8; 32],
    client: kube::Client,
    started: Instant,
    nodes: Watched<PartialObjectMeta<Node>>,
    services: BTreeMap<MirrorKey, ServiceWatch>,
}

impl Connection {
    fn start(cluster: &str, digest: [u8; 32], client: kube::Client, wake: &Arc<Notify>) -> Self {
        // Metadata only: the labels are all that is read.
        let nodes: Api<PartialObjectMeta<Node>> = Api::all(client.clone());
        Self {
            digest,
            started: Instant::now(),
            nodes: Watched::spawn(
                format!("{cluster} Nodes"),
                watch(nodes, watcher::Config::default()),
                Arc::clone(wake),
            ),
            client,
            services: BTreeMap::new(),
        }
    }

    /// Watches exactly `wanted` (keys of this cluster).
    fn watch_services(&mut self, wanted: &BTreeSet<MirrorKey>, wake: &Arc<Notify>) {
        self.services.retain(|key, _| wanted.contains(key));
        for key in wanted {
            if !self.services.contains_key(key) {
                let watch = ServiceWatch::start(&self.client, key, wake);
                self.services.insert(key.clone(), watch);
            }
        }
    }

    /// Nodes and every Service listed.
    fn synced(&self) -> bool {
        self.nodes.synced() && self.services.values().all(ServiceWatch::synced)
    }

    /// The Service watch of `key`, once it has listed.
    pub fn synced_service(&self, key: &MirrorKey) -> Option<&ServiceWatch> {
        self.services.get(key).filter(|w| w.synced())
    }

    /// The (region, zone) of a node of this cluster.
    pub fn node_locality(&self, node: &str) -> Option<Locality> {
        let node = self
            .nodes
            .store()
            .get(&kube::runtime::reflector::ObjectRef::new(node))?;
        Some(labels::node_locality(
            node.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
        ))
    }
}

/// One remote cluster: the connection that serves, and one being brought up.
#[derive(Default)]
pub struct Remote {
    /// The connection whose view is mirrored.
    pub active: Option<Connection>,
    candidate: Option<Connection>,
    /// A kubeconfig that could not be used, so that it is not retried on every pass.
    failed: Option<[u8; 32]>,
    warned_slow: bool,
}

/// Every remote cluster, kept in step with the Secrets and the FailoverServices.
pub struct Clusters {
    pub remotes: BTreeMap<String, Remote>,
    refused: Vec<Refusal>,
    initial_sync: Duration,
    wake: Arc<Notify>,
}

impl Clusters {
    pub fn new(initial_sync: Duration, wake: Arc<Notify>) -> Self {
        Self {
            remotes: BTreeMap::new(),
            refused: Vec::new(),
            initial_sync,
            wake,
        }
    }

    /// Entries refused at the last [`Clusters::update`].
    pub fn refused(&self) -> &[Refusal] {
        &self.refused
    }

    /// Brings the connections in step with `entries` (from [`remote_entries`]) and the
    /// remote Services `wanted`; promotes connections that have synced.
    pub async fn update(
        &mut self,
        entries: BTreeMap<String, RemoteEntry>,
        refused: Vec<Refusal>,
        wanted: &BTreeSet<MirrorKey>,
    ) {
        if refused != self.refused {
            for r in refused.iter().filter(|r| !self.refused.contains(r)) {
                warn!(secret = %r.secret, cluster = %r.cluster, reason = %r.reason, "remote cluster entry refused");
            }
            self.refused = refused;
        }
        let gone: Vec<String> = self
            .remotes
            .keys()
            .filter(|c| !entries.contains_key(*c))
            .cloned()
            .collect();
        for cluster in gone {
            info!(%cluster, "remote cluster removed: its Secret entry is gone");
            self.remotes.remove(&cluster);
        }
        for (cluster, entry) in entries {
            let remote = self.remotes.entry(cluster.clone()).or_default();
            let current = remote
                .candidate
                .as_ref()
                .or(remote.active.as_ref())
                .map(|c| c.digest);
            if current != Some(entry.digest) && remote.failed != Some(entry.digest) {
                match client_for(&entry.kubeconfig).await {
                    Ok(client) => {
                        info!(%cluster, secret = %entry.secret, rotation = remote.active.is_some(), "connecting to remote cluster");
                        remote.candidate = Some(Connection::start(
                            &cluster,
                            entry.digest,
                            client,
                            &self.wake,
                        ));
                        remote.failed = None;
                        remote.warned_slow = false;
                    }
                    Err(error) => {
                        warn!(%cluster, secret = %entry.secret, error = %format!("{error:#}"), "remote cluster kubeconfig unusable; keeping the current connection if any");
                        remote.failed = Some(entry.digest);
                    }
                }
            }
            let of_cluster: BTreeSet<MirrorKey> = wanted
                .iter()
                .filter(|k| k.cluster == cluster)
                .cloned()
                .collect();
            for connection in [&mut remote.active, &mut remote.candidate]
                .into_iter()
                .flatten()
            {
                connection.watch_services(&of_cluster, &self.wake);
            }
            if let Some(candidate) = &remote.candidate {
                let late = candidate.started.elapsed() >= self.initial_sync;
                if candidate.synced() || (late && remote.active.is_none()) {
                    if !candidate.synced() {
                        warn!(%cluster, bound = ?self.initial_sync, "remote cluster not synced within the initial sync bound; serving what has synced");
                    }
                    info!(%cluster, "remote cluster connection synced and serving");
                    remote.active = remote.candidate.take();
                } else if late && !remote.warned_slow {
                    warn!(%cluster, bound = ?self.initial_sync, "new credentials not synced within the bound; the old connection keeps serving");
                    remote.warned_slow = true;
                }
            }
        }
    }

    /// When the next pass is due to check the initial sync bound of a pending
    /// connection, if any is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.remotes
            .values()
            .filter_map(|r| r.candidate.as_ref())
            .map(|c| c.started + self.initial_sync)
            .filter(|d| *d > Instant::now())
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::ByteString;

    fn secret(name: &str, age_s: i64, data: &[(&str, &str)]) -> Arc<Secret> {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_000_000 - age_s).unwrap(),
        ));
        s.data = Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        );
        Arc::new(s)
    }

    #[test]
    fn the_older_secret_keeps_a_duplicated_cluster_and_bad_names_are_refused() {
        let secrets = [
            secret("newer", 10, &[("kind2", "B"), ("kind3", "C")]),
            secret(
                "older",
                20,
                &[("kind2", "A"), ("kind1", "X"), ("Kind_4", "Y")],
            ),
        ];
        let (entries, refused) = remote_entries(&secrets, "kind1");
        assert_eq!(entries.keys().collect::<Vec<_>>(), ["kind2", "kind3"]);
        assert_eq!(entries["kind2"].secret, "older");
        assert_eq!(entries["kind2"].kubeconfig, "A");
        let reasons: Vec<_> = refused
            .iter()
            .map(|r| (r.secret.as_str(), r.cluster.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [("newer", "kind2"), ("older", "Kind_4"), ("older", "kind1")]
        );
        assert!(refused[0].reason.contains("older"), "{refused:?}");
    }

    #[test]
    fn the_digest_follows_the_content_only() {
        let a = remote_entries(&[secret("s", 1, &[("kind2", "A")])], "kind1").0;
        let b = remote_entries(&[secret("t", 5, &[("kind2", "A")])], "kind1").0;
        let c = remote_entries(&[secret("s", 1, &[("kind2", "A2")])], "kind1").0;
        assert_eq!(a["kind2"].digest, b["kind2"].digest);
        assert_ne!(a["kind2"].digest, c["kind2"].digest);
    }
}
