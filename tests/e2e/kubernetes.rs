//! The agent with Kubernetes as its source (`detour agent --kubernetes`): the CRD as it
//! ships in `deploy/`, a FailoverService that takes over an existing Service's ClusterIP,
//! its EndpointSlice changing under it, and the API server going away.
//!
//! The scenario is written once and runs twice: against a real control plane (etcd +
//! kube-apiserver from `KUBEBUILDER_ASSETS`) and against the in-repo fake API server
//! (`detour_testbed::k8s::fake`), which a machine without those binaries still has.
//!
//! The cluster's service CIDR is black-holed on this machine, so a connect detour did not
//! rewrite fails rather than leave it. Backends listen in a network namespace the test
//! creates, on addresses of its own veth pair: the API server refuses loopback addresses
//! in EndpointSlices.

use anyhow::{Context as _, Result};
use detour_testbed::k8s::{AnyCluster, ClusterOptions, ServerKind};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::kube::{create_failover_service, install_crd, EVENTUAL};
use crate::world::World;

fn slice(ready_a: bool) -> Result<EndpointSlice> {
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": "reviews-abcde",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "reviews"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.231.77.2"], "zone": "us-east1-b", "conditions": {"ready": ready_a}},
            {"addresses": ["10.231.77.3"], "zone": "us-east1-c", "conditions": {"ready": true}},
        ],
    }))?)
}

async fn apply_slice(cluster: &AnyCluster, ready_a: bool) -> Result<()> {
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client(), "default");
    slices
        .patch(
            "reviews-abcde",
            &PatchParams::apply("detour-e2e").force(),
            &Patch::Apply(slice(ready_a)?),
        )
        .await?;
    Ok(())
}

async fn scenario(server: ServerKind) -> Result<()> {
    let mut world = World::new()?;
    let _network = world.backends_in_netns("10.231.77", ["a", "b"])?;

    let mut cluster = AnyCluster::start_on(
        server,
        "kind1",
        ClusterOptions {
            blackhole_service_cidr: true,
            ..ClusterOptions::default()
        },
    )
    .await?;
    let client = cluster.client();
    install_crd(client.clone()).await?;

    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "node-a", "labels": {
                    "topology.kubernetes.io/region": "us-east1",
                    "topology.kubernetes.io/zone": "us-east1-b",
                }},
            }))?,
        )
        .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let reviews = services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "reviews"},
                "spec": {"ports": [
                    {"name": "http", "port": 9080, "targetPort": 8080},
                    {"name": "admin", "port": 9901},
                ]},
            }))?,
        )
        .await?;
    let cluster_ip = reviews
        .spec
        .and_then(|spec| spec.cluster_ip)
        .context("reviews has a ClusterIP")?;
    apply_slice(&cluster, true).await?;
    create_failover_service(
        client.clone(),
        "default",
        "reviews-failover",
        json!({
            "hostname": "reviews-failover.default.global",
            "port": {"number": 9080, "protocol": "http"},
            "backingServices": [{"kubeService": {"name": "reviews", "namespace": "default"}}],
            "healthCheck": {"interval": "200ms", "timeout": "100ms"},
            "takeOver": [{"service": {"name": "reviews", "namespace": "default"}, "ports": [9080]}],
        }),
    )
    .await?;

    world.start_kubernetes_agent(cluster.kubeconfig_path(), "node-a", "kind1")?;

    // Callers of plain `reviews` get the failover: the same-zone backend takes all.
    let target = format!("{cluster_ip}:9080");
    world.until_answers(&target, &["a"], EVENTUAL).await?;
    let services_view = world.agent().services_json()?;
    let names: Vec<&str> = services_view
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        names.contains(&"reviews-failover.default.takeover.reviews.default"),
        "{services_view:#}"
    );

    // The node's labels give its locality; the endpoints show their zone and cluster.
    let endpoints = world
        .agent()
        .endpoints_json(Some("reviews-failover.default.takeover.reviews.default"))?;
    let rows: Vec<String> = endpoints
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            format!(
                "{} {} {} {}",
                e["address"], e["locality"], e["cluster"], e["tier"]
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            r#""10.231.77.2:8080" "us-east1/us-east1-b" "kind1" "same-zone""#,
            r#""10.231.77.3:8080" "us-east1/us-east1-c" "kind1" "same-region""#,
        ],
        "{endpoints:#}"
    );

    // The EndpointSlice says `a` is not ready: traffic moves to the other zone.
    apply_slice(&cluster, false).await?;
    world.until_answers(&target, &["b"], EVENTUAL).await?;

    // The API server goes away: the datapath carries on with what it has, and an agent
    // restarted meanwhile serves from its pins.
    cluster.stop_apiserver()?;
    let seen = world.answers(&target, 20)?;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["b"], "{seen:?}");
    world.agent().restart()?;
    world.agent().wait_ready(EVENTUAL)?;
    let seen = world.answers(&target, 20)?;
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["b"],
        "{seen:?}{}",
        world.log()
    );

    // It comes back: the agent resyncs and follows a change made after.
    cluster.start_apiserver().await?;
    apply_slice(&cluster, true).await?;
    world.until_answers(&target, &["a"], EVENTUAL).await?;
    Ok(())
}

fn run(server: ServerKind) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(scenario(server))
}

/// The Kubernetes source end to end on one cluster: take-over, EndpointSlice changes,
/// locality from the Node, and fail-static through an API server outage and an agent
/// restart during it.
#[test]
fn a_failover_service_takes_over_a_service_and_rides_out_the_api_server() -> Result<()> {
    run(ServerKind::Real)
}

/// The same over the fake API server.
#[test]
fn a_failover_service_takes_over_a_service_and_rides_out_the_fake_api_server() -> Result<()> {
    run(ServerKind::Fake)
}
