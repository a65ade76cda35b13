//! `detour dns coredns` against a real control plane: the CRD installed, `detour
//! controller` running in-process to give a FailoverService its VIP Service, a second
//! FailoverService with `spec.virtualIP`, and the real `detour` binary listing them
//! through a kubeconfig, its output compared in full.
//!
//! The binaries come from `KUBEBUILDER_ASSETS` (`cargo xtask test` sets it). One cluster
//! (~330 MiB), bounded by [`EVENTUALLY`] per wait; it needs root as every testbed
//! cluster does (a blackhole route for its service CIDR).

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use detour_agent::controller::{Controller, ControllerArgs};
use detour_agent::sources::kubernetes::{labels, FailoverService};
use detour_testbed::k8s::Cluster;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::CustomResourceExt as _;
use serde_json::json;
use tokio::sync::watch;

const EVENTUALLY: Duration = Duration::from_secs(60);

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

/// Runs `detour dns coredns` with `args`; its stdout and stderr.
fn detour_dns(args: &[&str]) -> Result<(String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_detour"))
        .args(["dns", "coredns"])
        .args(args)
        .output()
        .context("running detour dns coredns")?;
    let stderr = String::from_utf8(out.stderr)?;
    if !out.status.success() {
        bail!("detour dns coredns failed ({}): {stderr}", out.status);
    }
    Ok((String::from_utf8(out.stdout)?, stderr))
}

#[tokio::test]
async fn coredns_snippet_names_the_vip_service_and_the_virtual_ip() -> Result<()> {
    let cluster = Cluster::start("kind1").await?;
    let client = cluster.client();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &FailoverService::crd())
        .await?;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "detour-system"}})),
        )
        .await?;
    Api::<Service>::default_namespaced(client.clone())
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "reviews"},
                "spec": {"ports": [{"name": "http", "port": 9080}]},
            })),
        )
        .await?;

    let (stop, stop_rx) = watch::channel(false);
    let controller = Controller::start(
        client.clone(),
        ControllerArgs {
            namespace: "detour-system".into(),
            cluster_name: "kind1".into(),
            kubeconfig: None,
            initial_sync_timeout: Duration::from_secs(30),
            lease_name: "detour-controller".into(),
            identity: Some("test".into()),
        },
    );
    let controller = tokio::spawn(async move {
        controller.run(stop_rx).await.expect("the controller runs");
    });

    let failover_services: Api<FailoverService> = Api::default_namespaced(client.clone());
    for (name, spec) in [
        (
            "reviews",
            json!({
                "hostname": "reviews-failover.default.global",
                "port": {"number": 9080},
                "backingServices": [{"kubeService": {"name": "reviews", "namespace": "default"}}],
            }),
        ),
        (
            "ratings",
            json!({
                "hostname": "ratings.example.internal",
                "port": {"number": 9080},
                "virtualIP": "10.96.200.7",
                "backingServices": [{"kubeService": {"name": "reviews", "namespace": "default"}}],
            }),
        ),
    ] {
        let fos: FailoverService = from_json(json!({
            "apiVersion": "failover.detour.io/v1alpha1", "kind": "FailoverService",
            "metadata": {"name": name},
            "spec": spec,
        }));
        // Serving a new CRD's type can lag behind its creation.
        eventually(&format!("FailoverService {name} created"), || async {
            failover_services
                .patch(name, &PatchParams::apply("test"), &Patch::Apply(&fos))
                .await?;
            Ok(Some(()))
        })
        .await?;
    }

    // The controller gives `reviews` (no virtualIP) its VIP Service; none for `ratings`.
    let services: Api<Service> = Api::default_namespaced(client.clone());
    let vip = eventually("the VIP Service of reviews", || async {
        Ok(services
            .list(&ListParams::default().labels(labels::FAILOVER_SERVICE))
            .await?
            .items
            .into_iter()
            .next())
    })
    .await?;
    assert_eq!(vip.metadata.name.as_deref(), Some("reviews-failover"));

    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    let (text, warnings) = detour_dns(&["--kubeconfig", &kubeconfig])?;
    assert_eq!(warnings, "");
    assert_eq!(
        text,
        "# CoreDNS configuration for detour FailoverServices, from `detour dns coredns`.
# Paste it into the Corefile of the coredns ConfigMap (kube-system); see detour's README.

# Inside the existing `.:53 { ... }` server block: each hostname is an alias of
# its FailoverService's VIP Service and follows that Service's ClusterIP.
rewrite name exact reviews-failover.default.global reviews-failover.default.svc.cluster.local  # default/reviews

# After that block, as a server block of its own: FailoverServices with
# spec.virtualIP. It answers for exactly these names.
ratings.example.internal:53 {
    errors
    hosts {
        10.96.200.7 ratings.example.internal  # default/ratings
        ttl 30
    }
}
"
    );
    // Another cluster domain changes only the rewrite's target.
    let (text, _) = detour_dns(&[
        "--kubeconfig",
        &kubeconfig,
        "--cluster-domain",
        "corp.example",
    ])?;
    assert!(text.contains(
        "rewrite name exact reviews-failover.default.global reviews-failover.default.svc.corp.example  # default/reviews\n"
    ));

    stop.send(true)?;
    tokio::time::timeout(Duration::from_secs(10), controller).await??;
    Ok(())
}
