//! The agent with Kubernetes as its source (`detour agent --kubernetes`), against a real
//! control plane (etcd + kube-apiserver from `KUBEBUILDER_ASSETS`): the CRD as it ships
//! in `deploy/`, a FailoverService that takes over an existing Service's ClusterIP, its
//! EndpointSlice changing under it, and the API server going away.
//!
//! The cluster's service CIDR is black-holed on this machine, so a connect detour did not
//! rewrite fails rather than leave it. Backends listen in a network namespace the test
//! creates, on addresses of its own veth pair: the API server refuses loopback addresses
//! in EndpointSlices.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use detour_testbed::k8s::{Cluster, ClusterOptions};
use detour_testbed::{Agent, AgentOptions, HttpBackend, Netns};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use crate::world::World;

/// Bound on anything the agent or the control plane does by itself.
const EVENTUAL: Duration = Duration::from_secs(30);

const CRD: &str = include_str!("../../deploy/crds/failoverservice.yaml");

/// Polls `check` until it gives `Some`, at most `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last = format!(": last error {error:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}{last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The answers of `count` requests to `target` from the test's cgroup, by backend name.
fn answers(world: &World, target: &str, count: u32) -> Result<BTreeMap<String, u32>> {
    world.answers(target, count)
}

async fn until_answers(world: &World, target: &str, only: &[&str]) -> Result<()> {
    let expected: Vec<String> = only.iter().map(ToString::to_string).collect();
    eventually(
        &format!("{target} answered only by {only:?}"),
        EVENTUAL,
        || async {
            let seen = answers(world, target, 10)?;
            let names: Vec<String> = seen.keys().cloned().collect();
            Ok((names == expected).then_some(()))
        },
    )
    .await
}

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

async fn apply_slice(cluster: &Cluster, ready_a: bool) -> Result<()> {
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

async fn scenario() -> Result<()> {
    let mut world = World::new()?;
    let netns = Netns::new()?;
    let veth = netns.veth("10.231.77.1/24", "10.231.77.2/24")?;
    netns.ip(&["addr", "add", "10.231.77.3/24", "dev", veth.peer_name()])?;
    for (name, address) in [("a", "10.231.77.2:8080"), ("b", "10.231.77.3:8080")] {
        let backend = HttpBackend::start_in(&netns, name, address.parse()?)?;
        world.backends.insert(name.to_owned(), backend);
    }

    let mut cluster = Cluster::start_with(
        "kind1",
        ClusterOptions {
            blackhole_service_cidr: true,
            ..ClusterOptions::default()
        },
    )
    .await?;
    let client = cluster.client();
    // The CRD exactly as it ships.
    let crd: CustomResourceDefinition =
        serde_saphyr::from_str(CRD).context("parsing deploy/crds/failoverservice.yaml")?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await?;
    eventually("the FailoverService CRD Established", EVENTUAL, || async {
        let crd = crds.get("failoverservices.failover.detour.io").await?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        Ok(conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(()))
    })
    .await?;

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
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("failover.detour.io", "v1alpha1", "FailoverService"),
        "failoverservices",
    );
    let failover_services: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &resource);
    let fos = DynamicObject::new("reviews-failover", &resource).data(json!({"spec": {
        "hostname": "reviews-failover.default.global",
        "port": {"number": 9080, "protocol": "http"},
        "backingServices": [{"kubeService": {"name": "reviews", "namespace": "default"}}],
        "healthCheck": {"interval": "200ms", "timeout": "100ms"},
        "takeOver": [{"service": {"name": "reviews", "namespace": "default"}, "ports": [9080]}],
    }}));
    failover_services
        .create(&PostParams::default(), &fos)
        .await
        .context("creating the FailoverService")?;

    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    let agent = Agent::start_with_args(
        AgentOptions {
            binary: env!("CARGO_BIN_EXE_detour").into(),
            config: "".into(),
            cgroup: world.cgroup.path().to_owned(),
            bpffs: world.pins.path().to_owned(),
            socket: world.dir.join("detour.sock"),
            log: world.dir.join("agent.log"),
        },
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            "node-a",
            "--cluster-name",
            "kind1",
        ],
    )?;
    let agent = world.agent.insert(agent);
    agent.wait_ready(EVENTUAL)?;

    // Callers of plain `reviews` get the failover: the same-zone backend takes all.
    let target = format!("{cluster_ip}:9080");
    until_answers(&world, &target, &["a"])
        .await
        .with_context(|| world.log())?;
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
    until_answers(&world, &target, &["b"])
        .await
        .with_context(|| world.log())?;

    // The API server goes away: the datapath carries on with what it has, and an agent
    // restarted meanwhile serves from its pins.
    cluster.stop_apiserver()?;
    let seen = answers(&world, &target, 20)?;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["b"], "{seen:?}");
    world.agent().restart()?;
    world.agent().wait_ready(EVENTUAL)?;
    let seen = answers(&world, &target, 20)?;
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["b"],
        "{seen:?}{}",
        world.log()
    );

    // It comes back: the agent resyncs and follows a change made after.
    cluster.start_apiserver().await?;
    apply_slice(&cluster, true).await?;
    until_answers(&world, &target, &["a"])
        .await
        .with_context(|| world.log())?;
    Ok(())
}

/// The Kubernetes source end to end on one cluster: take-over, EndpointSlice changes,
/// locality from the Node, and fail-static through an API server outage and an agent
/// restart during it.
#[test]
fn a_failover_service_takes_over_a_service_and_rides_out_the_api_server() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(scenario())
}
