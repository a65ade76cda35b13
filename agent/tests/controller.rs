//! `detour controller` against two clusters: a local kind1 (where the FailoverServices,
//! the remote-cluster Secret and the mirrors are) and a remote kind2 (where `reviews`
//! and its endpoints are). Each scenario is written once and runs twice: over real
//! control planes (etcd + kube-apiserver from `KUBEBUILDER_ASSETS`, which
//! `cargo xtask test` sets; ~330 MiB a cluster) as `NAME::real`, and over the in-repo
//! fake API server as `NAME::fake`. The one scenario the fake cannot stage (a credential
//! the API server refuses: the fake authenticates nobody) runs on the real one only.
//!
//! Each test runs the controller in-process and is bounded by [`TEST_BOUND`]; every
//! wait is bounded by [`EVENTUALLY`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use detour_agent::controller::{Controller, ControllerArgs};
use detour_agent::sources::kubernetes::failover_service::condition;
use detour_agent::sources::kubernetes::{labels, FailoverService};
use detour_testbed::k8s::{AnyCluster, ClusterOptions, ServerKind};
use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{CustomResourceExt as _, ResourceExt as _};
use serde_json::json;
use tokio::sync::watch;

const NAMESPACE: &str = "detour-system";
const EVENTUALLY: Duration = Duration::from_secs(60);
const TEST_BOUND: Duration = Duration::from_secs(300);
/// The mirror of kind2's `reviews` endpoints on nodes in us-east1.
const LEASE: &str = "detour-controller";
const EAST: &str = "detour-kind2-default-reviews-us-east1";

/// Polls `check` until it yields `Some`, for at most [`EVENTUALLY`].
async fn eventually<T, F, Fut>(what: &str, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    detour_testbed::eventually(what, EVENTUALLY, check).await
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

/// Two clusters, the CRD and namespace in kind1, `reviews` with two endpoints on a
/// us-east1 node and one on a node with no region in kind2, the Secret naming kind2 in
/// kind1, a FailoverService `reviews` (kind2 first, then kind1), and the controller.
struct Bed {
    kind1: AnyCluster,
    kind2: AnyCluster,
    stop: watch::Sender<bool>,
    controller: tokio::task::JoinHandle<()>,
}

/// What [`Bed::record_mirrors`] saw.
struct Recorder {
    seen: Arc<Mutex<Vec<(String, usize)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    fn stop(self) -> Vec<(String, usize)> {
        self.task.abort();
        self.seen.lock().unwrap().clone()
    }
}

impl Bed {
    async fn start(server: ServerKind) -> Result<Self> {
        Self::start_with_lease_held_for(server, None).await
    }

    /// [`Bed::start`], with the controller's Lease held by another replica for
    /// `seconds` first when given.
    async fn start_with_lease_held_for(server: ServerKind, seconds: Option<i32>) -> Result<Self> {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("detour_agent=debug,info")
            .try_init();
        let kind1 = AnyCluster::start_on(server, "kind1", ClusterOptions::default()).await?;
        // Without the watch cache, a watch resuming from a compacted revision gets
        // 410 Gone at once, so the restart test forces a relist.
        let kind2 = AnyCluster::start_on(
            server,
            "kind2",
            ClusterOptions {
                watch_cache: false,
                ..ClusterOptions::default()
            },
        )
        .await?;

        let crds: Api<CustomResourceDefinition> = Api::all(kind1.client());
        crds.create(&PostParams::default(), &FailoverService::crd())
            .await?;
        let namespaces: Api<Namespace> = Api::all(kind1.client());
        namespaces
            .create(
                &PostParams::default(),
                &from_json(json!({"metadata": {"name": NAMESPACE}})),
            )
            .await?;
        if let Some(seconds) = seconds {
            let leases: Api<Lease> = Api::namespaced(kind1.client(), NAMESPACE);
            leases
                .create(
                    &PostParams::default(),
                    &from_json(json!({
                        "metadata": {"name": LEASE},
                        "spec": {
                            "holderIdentity": "another-replica",
                            "leaseDurationSeconds": seconds,
                            "acquireTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                            "renewTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                        },
                    })),
                )
                .await?;
        }

        let nodes: Api<Node> = Api::all(kind2.client());
        for (name, labels) in [
            (
                "n1",
                json!({labels::REGION: "us-east1", labels::ZONE: "us-east1-b"}),
            ),
            // Legacy labels only, as the second seed's nodes have.
            (
                "n2",
                json!({labels::LEGACY_REGION: "us-west1", labels::LEGACY_ZONE: "us-west1-a"}),
            ),
            ("n3", json!({})),
        ] {
            nodes
                .create(
                    &PostParams::default(),
                    &from_json(json!({"metadata": {"name": name, "labels": labels}})),
                )
                .await?;
        }
        let services: Api<Service> = Api::default_namespaced(kind2.client());
        services
            .create(
                &PostParams::default(),
                &from_json(json!({
                    "metadata": {"name": "reviews"},
                    "spec": {"ports": [{"name": "http", "port": 9080, "targetPort": 8080}]},
                })),
            )
            .await?;
        let slices: Api<EndpointSlice> = Api::default_namespaced(kind2.client());
        slices
            .create(&PostParams::default(), &remote_slice(true))
            .await?;

        let bed = Self::with_controller(kind1, kind2);
        bed.put_secret().await?;
        bed.put_failover_service("reviews", "reviews-failover.default.global", "kind2")
            .await?;
        Ok(bed)
    }

    fn with_controller(kind1: AnyCluster, kind2: AnyCluster) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let args = ControllerArgs {
            namespace: NAMESPACE.into(),
            cluster_name: "kind1".into(),
            kubeconfig: None,
            initial_sync_timeout: Duration::from_secs(30),
            lease_name: LEASE.into(),
            identity: Some("test".into()),
        };
        let controller = Controller::start(kind1.client(), args);
        let controller = tokio::spawn(async move {
            controller.run(stop_rx).await.expect("the controller runs");
        });
        Self {
            kind1,
            kind2,
            stop,
            controller,
        }
    }

    async fn put_secret(&self) -> Result<()> {
        self.put_secret_with(&self.kind2.kubeconfig_contents()?)
            .await
    }

    async fn put_secret_with(&self, kubeconfig: &str) -> Result<()> {
        let secrets: Api<Secret> = Api::namespaced(self.kind1.client(), NAMESPACE);
        let secret: Secret = from_json(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "remote-kind2",
                         "labels": {labels::REMOTE_CLUSTER_SECRET: "true"}},
            "stringData": {"kind2": kubeconfig},
        }));
        secrets
            .patch(
                "remote-kind2",
                &PatchParams::apply("test").force(),
                &Patch::Apply(&secret),
            )
            .await?;
        Ok(())
    }

    async fn put_failover_service(&self, name: &str, hostname: &str, cluster: &str) -> Result<()> {
        let api: Api<FailoverService> = Api::default_namespaced(self.kind1.client());
        let fos: FailoverService = from_json(json!({
            "apiVersion": "failover.detour.io/v1alpha1", "kind": "FailoverService",
            "metadata": {"name": name},
            "spec": {
                "hostname": hostname,
                "port": {"number": 9080},
                "backingServices": [
                    {"kubeService": {"name": "reviews", "namespace": "default", "clusterName": cluster}},
                    {"kubeService": {"name": "reviews", "namespace": "default"}},
                ],
            },
        }));
        // Serving a new CRD's type can lag behind its creation.
        eventually(&format!("FailoverService {name} created"), || async {
            api.patch(name, &PatchParams::apply("test"), &Patch::Apply(&fos))
                .await?;
            Ok(Some(()))
        })
        .await
    }

    fn mirrors(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.kind1.client(), NAMESPACE)
    }

    fn remote_slices(&self) -> Api<EndpointSlice> {
        Api::default_namespaced(self.kind2.client())
    }

    /// The mirror `name` once `check` holds for it.
    async fn mirror_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&EndpointSlice) -> bool,
    ) -> Result<EndpointSlice> {
        let mirrors = self.mirrors();
        eventually(&format!("mirror {name}: {what}"), || async {
            Ok(mirrors.get_opt(name).await?.filter(|s| check(s)))
        })
        .await
    }

    async fn failover_service_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&FailoverService) -> bool,
    ) -> Result<FailoverService> {
        let api: Api<FailoverService> = Api::default_namespaced(self.kind1.client());
        eventually(&format!("FailoverService {name}: {what}"), || async {
            Ok(api.get_opt(name).await?.filter(|f| check(f)))
        })
        .await
    }

    /// Records every change the mirrors go through from now on, as a watcher sees them:
    /// `(name, endpoints)`, or `("deleted NAME", 0)`.
    fn record_mirrors(&self) -> Recorder {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let seen = Arc::clone(&seen);
            let events = watcher::watcher(self.mirrors(), watcher::Config::default());
            async move {
                let mut events = std::pin::pin!(events);
                while let Some(Ok(event)) = events.next().await {
                    let entry = match event {
                        watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                            (s.name_any(), s.endpoints.map_or(0, |e| e.len()))
                        }
                        watcher::Event::Delete(s) => (format!("deleted {}", s.name_any()), 0),
                        _ => continue,
                    };
                    seen.lock().unwrap().push(entry);
                }
            }
        });
        Recorder { seen, task }
    }

    async fn stop(self) -> Result<()> {
        self.stop.send(true)?;
        tokio::time::timeout(Duration::from_secs(20), self.controller)
            .await
            .context("the controller did not stop")??;
        Ok(())
    }
}

/// kind2's slice of `reviews`: 10.2.0.1 (n1, us-east1), 10.2.0.2 (n1, ready as given),
/// 10.2.0.3 (n2, legacy labels: us-west1), 10.2.0.4 (n3, no region).
fn remote_slice(second_ready: bool) -> EndpointSlice {
    from_json(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "reviews-abc",
                     "labels": {labels::KUBE_SERVICE_NAME: "reviews"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.2.0.1"], "conditions": {"ready": true}, "nodeName": "n1",
             "targetRef": {"kind": "Pod", "name": "reviews-1", "namespace": "default"}},
            {"addresses": ["10.2.0.2"], "conditions": {"ready": second_ready}, "nodeName": "n1"},
            {"addresses": ["10.2.0.3"], "conditions": {"ready": true}, "nodeName": "n2"},
            {"addresses": ["10.2.0.4"], "conditions": {"ready": true}, "nodeName": "n3"},
        ],
    }))
}

fn ready_of(slice: &EndpointSlice, address: &str) -> Option<bool> {
    slice
        .endpoints
        .iter()
        .flatten()
        .find(|e| e.addresses == [address])?
        .conditions
        .as_ref()?
        .ready
}

fn condition_of<'a>(fos: &'a FailoverService, type_: &str) -> Option<(&'a str, &'a str)> {
    let c = fos
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.as_str(), c.reason.as_str()))
}

async fn bounded(test: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .context("the test did not finish in time")?
}

async fn remote_endpoints_are_mirrored_by_region_and_follow_changes(
    server: ServerKind,
) -> Result<()> {
    bounded(async {
        let bed = Bed::start(server).await?;
        let east = bed
            .mirror_where(EAST, "two endpoints", |s| {
                s.endpoints.as_ref().is_some_and(|e| e.len() == 2)
            })
            .await?;
        let l = east.labels();
        let expected: BTreeMap<String, String> = [
            (labels::MANAGED_BY, labels::CONTROLLER),
            (labels::CLUSTER, "kind2"),
            (labels::SERVICE_NAME, "reviews"),
            (labels::SERVICE_NAMESPACE, "default"),
            (labels::REGION, "us-east1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(l, &expected);
        let ports: Vec<_> = east
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.port, p.protocol.clone()))
            .collect();
        assert_eq!(
            ports,
            [(
                Some(labels::port_name(9080)),
                Some(8080),
                Some("TCP".into())
            )]
        );
        let first = &east.endpoints.as_ref().unwrap()[0];
        assert_eq!(first.addresses, ["10.2.0.1"]);
        assert_eq!(first.zone.as_deref(), Some("us-east1-b"));
        assert!(first.node_name.is_none() && first.target_ref.is_none());
        assert_eq!(ready_of(&east, "10.2.0.2"), Some(true));

        // Legacy node labels give the region; no region, no label.
        let west = bed
            .mirror_where("detour-kind2-default-reviews-us-west1", "exists", |_| true)
            .await?;
        assert_eq!(west.labels()[labels::REGION], "us-west1");
        assert_eq!(
            west.endpoints.as_ref().unwrap()[0].zone.as_deref(),
            Some("us-west1-a")
        );
        let none = bed
            .mirror_where("detour-kind2-default-reviews-none", "exists", |_| true)
            .await?;
        assert!(!none.labels().contains_key(labels::REGION));

        // Nothing changed: nothing is written again, even when the remote Service is
        // touched in a way that does not change the mirror.
        let version = east.resource_version();
        let services: Api<Service> = Api::default_namespaced(bed.kind2.client());
        services
            .patch(
                "reviews",
                &PatchParams::apply("test"),
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "reviews", "labels": {"unrelated": "yes"}}})),
            )
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(bed.mirrors().get(EAST).await?.resource_version(), version);

        // A remote endpoint goes not ready: the mirror follows.
        let changed_at = Instant::now();
        bed.remote_slices()
            .replace("reviews-abc", &PostParams::default(), &{
                let mut s = remote_slice(false);
                s.metadata.resource_version = bed
                    .remote_slices()
                    .get("reviews-abc")
                    .await?
                    .resource_version();
                s
            })
            .await?;
        bed.mirror_where(EAST, "10.2.0.2 not ready", |s| {
            ready_of(s, "10.2.0.2") == Some(false)
        })
        .await?;
        eprintln!(
            "remote change to mirror: {:.0?} (get + replace + the 100 ms poll included)",
            changed_at.elapsed()
        );
        bed.stop().await
    })
    .await
}

async fn a_vip_service_is_owned_by_the_failover_service_and_status_reports_it(
    server: ServerKind,
) -> Result<()> {
    bounded(async {
        let bed = Bed::start(server).await?;
        let fos = bed
            .failover_service_where("reviews", "Programmed", |f| {
                condition_of(f, condition::PROGRAMMED) == Some(("True", "Programmed"))
            })
            .await?;
        let services: Api<Service> = Api::default_namespaced(bed.kind1.client());
        let vip = services.get("reviews-failover").await?;
        let owner = &vip.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("FailoverService", "reviews")
        );
        assert_eq!(Some(&owner.uid), fos.metadata.uid.as_ref());
        assert_eq!(owner.controller, Some(true));
        assert_eq!(vip.labels()[labels::FAILOVER_SERVICE], "reviews");
        let spec = vip.spec.as_ref().unwrap();
        assert!(spec.selector.is_none());
        assert_eq!(spec.ports.as_ref().unwrap()[0].port, 9080);
        let cluster_ip = spec.cluster_ip.clone().context("no ClusterIP")?;
        let status = fos.status.as_ref().unwrap();
        assert_eq!(status.virtual_ip.as_deref(), Some(cluster_ip.as_str()));
        assert_eq!(
            condition_of(&fos, condition::ACCEPTED),
            Some(("True", "Accepted"))
        );
        // kind1 has no Service `reviews`: the second backing service is unresolved.
        assert_eq!(
            condition_of(&fos, condition::RESOLVED_REFS),
            Some(("False", "BackendNotFound"))
        );
        assert_eq!(status.endpoints.len(), 1);
        let tier = &status.endpoints[0];
        assert_eq!(
            (tier.cluster.as_str(), tier.tier, tier.ready),
            ("kind2", 0, 4)
        );
        assert_eq!(status.observed_generation, fos.metadata.generation);

        // The local Service appears: ResolvedRefs turns true.
        services
            .create(
                &PostParams::default(),
                &from_json(json!({"metadata": {"name": "reviews"},
                    "spec": {"ports": [{"port": 9080}]}})),
            )
            .await?;
        bed.failover_service_where("reviews", "ResolvedRefs", |f| {
            condition_of(f, condition::RESOLVED_REFS) == Some(("True", "ResolvedRefs"))
        })
        .await?;
        bed.stop().await
    })
    .await
}

async fn deleting_the_secret_deletes_the_clusters_mirrors(server: ServerKind) -> Result<()> {
    bounded(async {
        let bed = Bed::start(server).await?;
        bed.mirror_where(EAST, "exists", |_| true).await?;
        let secrets: Api<Secret> = Api::namespaced(bed.kind1.client(), NAMESPACE);
        secrets
            .delete("remote-kind2", &DeleteParams::default())
            .await?;
        let mirrors = bed.mirrors();
        eventually("every mirror of kind2 deleted", || async {
            let left = mirrors
                .list(&ListParams::default().labels(&format!("{}=kind2", labels::CLUSTER)))
                .await?;
            Ok(left.items.is_empty().then_some(()))
        })
        .await?;
        bed.failover_service_where("reviews", "ClusterUnknown", |f| {
            condition_of(f, condition::RESOLVED_REFS) == Some(("False", "ClusterUnknown"))
        })
        .await?;
        bed.stop().await
    })
    .await
}

async fn mirrors_stay_while_the_remote_api_server_is_down_and_resume_after(
    server: ServerKind,
) -> Result<()> {
    bounded(async {
        let mut bed = Bed::start(server).await?;
        let before = bed
            .mirror_where(EAST, "10.2.0.2 ready", |s| {
                ready_of(s, "10.2.0.2") == Some(true)
            })
            .await?;
        let count = bed
            .mirrors()
            .list(&ListParams::default())
            .await?
            .items
            .len();
        let recorder = bed.record_mirrors();
        bed.kind2.stop_apiserver()?;
        // Long enough for the watches to fail and retry (backoff from 800 ms).
        tokio::time::sleep(Duration::from_secs(5)).await;
        let during = bed.mirrors().get(EAST).await?;
        assert_eq!(during.resource_version(), before.resource_version());
        assert_eq!(
            bed.mirrors()
                .list(&ListParams::default())
                .await?
                .items
                .len(),
            count
        );
        bed.kind2.start_apiserver().await?;
        // Changed at once after the restart, while the controller's watches are still
        // backing off: the change must be picked up when they reconnect.
        let slices = bed.remote_slices();
        let mut changed = remote_slice(false);
        changed.metadata.resource_version = slices.get("reviews-abc").await?.resource_version();
        slices
            .replace("reviews-abc", &PostParams::default(), &changed)
            .await?;
        // The controller's watches resume from revisions that are gone: 410, relist.
        bed.kind2.compact_etcd().await?;
        bed.mirror_where(EAST, "10.2.0.2 not ready after the restart", |s| {
            ready_of(s, "10.2.0.2") == Some(false)
        })
        .await?;
        let seen = recorder.stop();
        assert!(
            seen.iter()
                .all(|(name, endpoints)| *endpoints > 0 && !name.starts_with("deleted")),
            "a mirror was emptied or deleted on the way: {seen:?}"
        );
        assert!(seen.len() > count, "the recorder saw nothing: {seen:?}");
        bed.stop().await
    })
    .await
}

async fn a_failover_service_naming_an_unknown_cluster_does_not_disturb_another(
    server: ServerKind,
) -> Result<()> {
    bounded(async {
        let bed = Bed::start(server).await?;
        bed.put_failover_service("broken", "broken.default.global", "kind9")
            .await?;
        // Same hostname and port as `reviews`, created later (creation times are in
        // whole seconds): refused.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        bed.put_failover_service("copy", "reviews-failover.default.global", "kind2")
            .await?;
        bed.failover_service_where("broken", "ClusterUnknown", |f| {
            condition_of(f, condition::RESOLVED_REFS) == Some(("False", "ClusterUnknown"))
        })
        .await?;
        bed.failover_service_where("copy", "not accepted", |f| {
            condition_of(f, condition::ACCEPTED) == Some(("False", "HostnameConflict"))
        })
        .await?;
        let reviews = bed
            .failover_service_where("reviews", "Programmed", |f| {
                condition_of(f, condition::PROGRAMMED) == Some(("True", "Programmed"))
            })
            .await?;
        assert_eq!(
            condition_of(&reviews, condition::ACCEPTED),
            Some(("True", "Accepted"))
        );
        bed.mirror_where(EAST, "two endpoints", |s| {
            s.endpoints.as_ref().is_some_and(|e| e.len() == 2)
        })
        .await?;
        // The refused one gets no VIP Service; `broken` does.
        let services: Api<Service> = Api::default_namespaced(bed.kind1.client());
        assert!(services.get_opt("copy-failover").await?.is_none());
        assert!(services.get_opt("broken-failover").await?.is_some());
        bed.stop().await
    })
    .await
}

async fn a_rotated_credential_that_cannot_sync_leaves_the_old_one_serving(
    server: ServerKind,
) -> Result<()> {
    bounded(async {
        let bed = Bed::start(server).await?;
        bed.mirror_where(EAST, "exists", |_| true).await?;
        // The same cluster with a token kind2 refuses: the new connection never lists.
        let good = bed.kind2.kubeconfig_contents()?;
        let AnyCluster::Real(kind2) = &bed.kind2 else {
            anyhow::bail!("a refused credential needs the real API server");
        };
        let bad = good.replace(kind2.admin_token(), "not-a-valid-token");
        assert_ne!(good, bad);
        bed.put_secret_with(&bad).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let slices = bed.remote_slices();
        let mut changed = remote_slice(false);
        changed.metadata.resource_version = slices.get("reviews-abc").await?.resource_version();
        slices
            .replace("reviews-abc", &PostParams::default(), &changed)
            .await?;
        bed.mirror_where(
            EAST,
            "10.2.0.2 not ready, through the old credential",
            |s| ready_of(s, "10.2.0.2") == Some(false),
        )
        .await?;
        bed.stop().await
    })
    .await
}

/// A credential rotated to a new API server for kind2 (its endpoints moved with it):
/// the mirror switches to what the new one lists, and is never emptied on the way —
/// the old connection serves until the new one has synced.
async fn a_rotated_credential_switches_once_the_new_connection_has_synced(
    server: ServerKind,
) -> Result<()> {
    bounded(async {
        let bed = Bed::start(server).await?;
        bed.mirror_where(EAST, "10.2.0.1 mirrored", |s| {
            ready_of(s, "10.2.0.1") == Some(true)
        })
        .await?;
        let moved = AnyCluster::start_on(server, "kind2-moved", ClusterOptions::default()).await?;
        Api::<Node>::all(moved.client())
            .create(
                &PostParams::default(),
                &from_json(json!({"metadata": {"name": "n1", "labels":
                    {labels::REGION: "us-east1", labels::ZONE: "us-east1-b"}}})),
            )
            .await?;
        Api::<Service>::default_namespaced(moved.client())
            .create(
                &PostParams::default(),
                &from_json(json!({
                    "metadata": {"name": "reviews"},
                    "spec": {"ports": [{"name": "http", "port": 9080, "targetPort": 8080}]},
                })),
            )
            .await?;
        Api::<EndpointSlice>::default_namespaced(moved.client())
            .create(
                &PostParams::default(),
                &from_json(json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "reviews-xyz",
                                 "labels": {labels::KUBE_SERVICE_NAME: "reviews"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": ["10.7.0.1"], "conditions": {"ready": true},
                                   "nodeName": "n1"}],
                })),
            )
            .await?;

        let recorder = bed.record_mirrors();
        bed.put_secret_with(&moved.kubeconfig_contents()?).await?;
        bed.mirror_where(EAST, "only the new server's endpoint", |s| {
            s.endpoints
                .iter()
                .flatten()
                .map(|e| e.addresses.clone())
                .collect::<Vec<_>>()
                == [vec!["10.7.0.1".to_owned()]]
        })
        .await?;
        let seen: Vec<(String, usize)> = recorder
            .stop()
            .into_iter()
            .filter(|(name, _)| name.ends_with(EAST))
            .collect();
        assert!(
            seen.iter()
                .all(|(name, endpoints)| *endpoints > 0 && !name.starts_with("deleted")),
            "the us-east1 mirror was emptied or deleted on the way: {seen:?}"
        );
        bed.stop().await
    })
    .await
}

async fn only_the_leader_writes(server: ServerKind) -> Result<()> {
    bounded(async {
        // Another replica holds the Lease for 15 s (not renewed): until it expires this
        // controller watches but writes nothing; then it takes over.
        let held_since = Instant::now();
        let bed = Bed::start_with_lease_held_for(server, Some(15)).await?;
        tokio::time::sleep(Duration::from_secs(4).saturating_sub(held_since.elapsed())).await;
        assert!(
            held_since.elapsed() < Duration::from_secs(12),
            "set-up took too long to check anything: {:?}",
            held_since.elapsed()
        );
        assert!(bed
            .mirrors()
            .list(&ListParams::default())
            .await?
            .items
            .is_empty());
        let services: Api<Service> = Api::default_namespaced(bed.kind1.client());
        assert!(services.get_opt("reviews-failover").await?.is_none());
        let fos: Api<FailoverService> = Api::default_namespaced(bed.kind1.client());
        assert!(fos.get("reviews").await?.status.is_none());
        bed.mirror_where(EAST, "written once the Lease expired", |_| true)
            .await?;
        let took = held_since.elapsed();
        assert!(
            took >= Duration::from_secs(14),
            "written after {took:?}, before the Lease expired"
        );
        eprintln!("took over {took:.1?} after the other replica's last renewal (lease 15 s)");
        bed.stop().await
    })
    .await
}

/// One test per server for each scenario: `NAME::real` and `NAME::fake`.
macro_rules! on_both_servers {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn real() -> Result<()> {
                super::$scenario(ServerKind::Real).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fake() -> Result<()> {
                super::$scenario(ServerKind::Fake).await
            }
        }
    )*};
}

on_both_servers!(
    remote_endpoints_are_mirrored_by_region_and_follow_changes,
    a_vip_service_is_owned_by_the_failover_service_and_status_reports_it,
    deleting_the_secret_deletes_the_clusters_mirrors,
    mirrors_stay_while_the_remote_api_server_is_down_and_resume_after,
    a_failover_service_naming_an_unknown_cluster_does_not_disturb_another,
    a_rotated_credential_switches_once_the_new_connection_has_synced,
    only_the_leader_writes,
);

/// The fake API server authenticates nobody, so a refused credential needs the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_credential_that_cannot_sync_leaves_the_old_one_serving_real() -> Result<()> {
    a_rotated_credential_that_cannot_sync_leaves_the_old_one_serving(ServerKind::Real).await
}
