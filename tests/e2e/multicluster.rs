//! The first seed, re-enacted with detour: `reviews` runs in clusters kind2 and kind3; a
//! FailoverService in kind2 lists kind2's `reviews` first and kind3's second and takes
//! over kind2's `reviews` ClusterIP. Callers of plain `reviews` (a client in the test's
//! cgroup) reach kind2's backend; when it stops answering they move to kind3, then come
//! back. `detour controller` mirrors kind3's endpoints into kind2 from a remote-cluster
//! Secret; the agent watches only kind2. Both run as the `detour` binary, as users run
//! them, against real control planes.
//!
//! On real servers `deploy/` is installed as it ships in both clusters and each
//! component runs with the rights it grants: the controller and the agent with their
//! ServiceAccounts' tokens, kind2's Secret with kind3's remote-reader token.
//!
//! Then the remote cluster misbehaves: its API server is killed (failover to kind3 still
//! works from what was mirrored, and a change made in kind3 after it returns reaches the
//! agent), and its Secret is deleted (kind3 leaves the agent's tables).

use anyhow::{Context as _, Result};
use std::path::Path;

use detour_testbed::eventually;
use detour_testbed::k8s::{deploy, AnyCluster, ClusterOptions, ServerKind};
use k8s_openapi::api::core::v1::{Namespace, Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use crate::kube::{
    crd_established, create_failover_service, failover_service_resource, install_crd, object,
    Controller, EVENTUAL,
};
use crate::world::World;

const TAKEN_OVER: &str = "reviews-failover.default.takeover.reviews.default";
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
const SYSTEM: &str = "detour-system";

/// The kubeconfigs each component runs with.
struct Accounts {
    controller: String,
    agent: String,
    /// What kind2's remote-cluster Secret holds for kind3.
    remote_reader: String,
}

/// kind3's `reviews` endpoints: the first always, a second (never dialled) on request.
fn kind3_slice(second: bool) -> Result<EndpointSlice> {
    let mut endpoints = vec![json!({
        "addresses": ["10.231.78.3"], "zone": "us-west1-a", "nodeName": "kind3-node",
        "conditions": {"ready": true},
    })];
    if second {
        endpoints.push(json!({
            "addresses": ["10.231.78.4"], "zone": "us-west1-a", "nodeName": "kind3-node",
            "conditions": {"ready": true},
        }));
    }
    slice(endpoints)
}

fn slice(endpoints: Vec<Value>) -> Result<EndpointSlice> {
    object(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "reviews-1", "labels": {"kubernetes.io/service-name": "reviews"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
}

async fn apply_slice(cluster: &AnyCluster, slice: &EndpointSlice) -> Result<()> {
    Api::<EndpointSlice>::namespaced(cluster.client(), "default")
        .patch(
            "reviews-1",
            &PatchParams::apply("detour-e2e").force(),
            &Patch::Apply(slice),
        )
        .await?;
    Ok(())
}

/// Waits until the account of `kubeconfig` may list Services cluster-wide.
async fn until_services_readable(kubeconfig: &str) -> Result<()> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::from_yaml(kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(config)?;
    let services: Api<Service> = Api::all(client);
    eventually("the account may list Services", EVENTUAL, || async {
        Ok(services
            .list(&kube::api::ListParams::default().limit(1))
            .await
            .ok()
            .map(|_| ()))
    })
    .await
}

/// `reviews` in `cluster`: a Service on 9080 (target 8080) with one ready endpoint at
/// `address` on a node of `region`/`zone`. Returns its ClusterIP.
async fn reviews(cluster: &AnyCluster, address: &str, region: &str, zone: &str) -> Result<String> {
    let client = cluster.client();
    let node = format!("{}-node", cluster.name());
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &object(json!({"metadata": {"name": node, "labels": {
                "topology.kubernetes.io/region": region,
                "topology.kubernetes.io/zone": zone,
            }}}))?,
        )
        .await?;
    let service: Service = Api::<Service>::namespaced(client, "default")
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "reviews"},
                "spec": {"ports": [{"name": "http", "port": 9080, "targetPort": 8080}]},
            }))?,
        )
        .await?;
    let endpoint = json!({
        "addresses": [address], "zone": zone, "nodeName": node,
        "conditions": {"ready": true},
    });
    apply_slice(cluster, &slice(vec![endpoint])?).await?;
    service
        .spec
        .and_then(|spec| spec.cluster_ip)
        .context("reviews has a ClusterIP")
}

/// The taken-over service's endpoints in the agent as "ADDRESS CLUSTER TIER" lines.
fn endpoint_rows(world: &mut World) -> Result<Vec<String>> {
    let endpoints = world.agent().endpoints_json(Some(TAKEN_OVER))?;
    Ok(endpoints
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            format!(
                "{} {} {}",
                e["address"].as_str().unwrap_or("?"),
                e["cluster"].as_str().unwrap_or("?"),
                e["tier"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

async fn until_endpoints(
    world: &mut World,
    controller_log: &std::path::Path,
    expected: &[&str],
) -> Result<()> {
    let mut last = Vec::new();
    let result = eventually(&format!("agent endpoints {expected:?}"), EVENTUAL, || {
        let rows = endpoint_rows(world);
        if let Ok(rows) = &rows {
            last.clone_from(rows);
        }
        async move { Ok((rows? == expected).then_some(())) }
    })
    .await;
    result.with_context(|| {
        format!(
            "last seen {last:?}\n{}\ncontroller:\n{}",
            world.log(),
            std::fs::read_to_string(controller_log).unwrap_or_default()
        )
    })
}

/// Connects the agent counted per endpoint of the taken-over service, by cluster.
fn connects_by_cluster(world: &mut World) -> Result<Vec<(String, u64)>> {
    let endpoints = world.agent().endpoints_json(Some(TAKEN_OVER))?;
    Ok(endpoints
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["cluster"].as_str().unwrap_or("?").to_owned(),
                e["connects"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

async fn scenario(server: ServerKind) -> Result<()> {
    let mut world = World::new()?;
    let _network = world.backends_in_netns("10.231.78", ["kind2", "kind3"])?;
    let blackholed = ClusterOptions {
        blackhole_service_cidr: true,
        ..ClusterOptions::default()
    };
    let kind2 = AnyCluster::start_on(server, "kind2", blackholed).await?;
    let mut kind3 = AnyCluster::start_on(server, "kind3", ClusterOptions::default()).await?;

    // On real servers, deploy/ as it ships in both clusters, and every component with the
    // rights it grants: the controller and the agent with their ServiceAccounts' tokens
    // in kind2, the remote reader's in the Secret for kind3. The fake has no RBAC or
    // tokens: the CRD and the namespace, and the admin's kubeconfig, there.
    let accounts = match (&kind2, &kind3) {
        (AnyCluster::Real(real2), AnyCluster::Real(real3)) => {
            for cluster in [real2, real3] {
                deploy::install(&cluster.client(), Path::new(DEPLOY), "detour-e2e").await?;
            }
            crd_established(kind2.client()).await?;
            let accounts = Accounts {
                controller: deploy::kubeconfig_as(real2, SYSTEM, "detour-controller").await?,
                agent: deploy::kubeconfig_as(real2, SYSTEM, "detour-agent").await?,
                remote_reader: deploy::kubeconfig_as(real3, SYSTEM, "detour-remote-reader").await?,
            };
            // The API server's RBAC cache follows new bindings a moment later: start
            // nothing before each account may read what it watches.
            for kubeconfig in [
                &accounts.controller,
                &accounts.agent,
                &accounts.remote_reader,
            ] {
                until_services_readable(kubeconfig).await?;
            }
            accounts
        }
        _ => {
            install_crd(kind2.client()).await?;
            Api::<Namespace>::all(kind2.client())
                .create(
                    &PostParams::default(),
                    &object(json!({"metadata": {"name": SYSTEM}}))?,
                )
                .await?;
            Accounts {
                controller: kind2.kubeconfig_contents()?,
                agent: kind2.kubeconfig_contents()?,
                remote_reader: kind3.kubeconfig_contents()?,
            }
        }
    };
    let cluster_ip = reviews(&kind2, "10.231.78.2", "us-east1", "us-east1-b").await?;
    reviews(&kind3, "10.231.78.3", "us-west1", "us-west1-a").await?;
    let secrets: Api<Secret> = Api::namespaced(kind2.client(), "detour-system");
    secrets
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "remote-kind3",
                             "labels": {"failover.detour.io/remote-cluster": "true"}},
                "stringData": {"kind3": accounts.remote_reader},
            }))?,
        )
        .await?;
    create_failover_service(
        kind2.client(),
        "default",
        "reviews-failover",
        json!({
            "hostname": "reviews-failover.default.global",
            "port": {"number": 9080, "protocol": "http"},
            "backingServices": [
                {"kubeService": {"name": "reviews", "namespace": "default", "clusterName": "kind2"}},
                {"kubeService": {"name": "reviews", "namespace": "default", "clusterName": "kind3"}},
            ],
            "healthCheck": {"interval": "200ms", "timeout": "100ms"},
            "outlierDetection": {"consecutiveErrors": 1, "interval": "10s", "baseEjectionTime": "2m"},
            "takeOver": [{"service": {"name": "reviews", "namespace": "default"}, "ports": [9080]}],
        }),
    )
    .await?;

    let controller_log = world.dir.join("controller.log");
    let controller_kubeconfig = world.dir.join("controller.kubeconfig");
    std::fs::write(&controller_kubeconfig, &accounts.controller)?;
    let _controller = Controller::start(&controller_kubeconfig, "kind2", &controller_log)?;
    let agent_kubeconfig = world.dir.join("agent.kubeconfig");
    std::fs::write(&agent_kubeconfig, &accounts.agent)?;
    world.start_kubernetes_agent(&agent_kubeconfig, "kind2-node", "kind2")?;

    // Both clusters' endpoints are known (kind3's through the controller's mirror), and
    // kind2's, first in the failover order, take the traffic.
    let target = format!("{cluster_ip}:9080");
    until_endpoints(
        &mut world,
        &controller_log,
        &[
            "10.231.78.2:8080 kind2 same-zone",
            "10.231.78.3:8080 kind3 priority[1]/other",
        ],
    )
    .await?;
    world.until_answers(&target, &["kind2"], EVENTUAL).await?;
    // The controller's status counts what it discovered per cluster and tier.
    let failover_services: Api<DynamicObject> =
        Api::namespaced_with(kind2.client(), "default", &failover_service_resource());
    eventually(
        "the FailoverService's status counts both tiers",
        EVENTUAL,
        || async {
            let fos = failover_services.get("reviews-failover").await?;
            let tiers: Vec<String> = fos.data["status"]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| format!("{} {} ready={}", e["cluster"], e["tier"], e["ready"]))
                .collect();
            Ok((tiers == [r#""kind2" 0 ready=1"#, r#""kind3" 1 ready=1"#]).then_some(()))
        },
    )
    .await?;

    // kind2's reviews stops answering: callers move to kind3, then come back (kind2 is
    // ejected for 2 minutes, but its first passing health check ends that).
    world.stop_backend("kind2");
    world.until_answers(&target, &["kind3"], EVENTUAL).await?;
    let connects = connects_by_cluster(&mut world)?;
    assert!(
        connects.iter().all(|(_, n)| *n > 0),
        "both clusters took connects: {connects:?}"
    );
    world.start_backend("kind2")?;
    world.until_answers(&target, &["kind2"], EVENTUAL).await?;

    // The rights deploy/ grants were enough: nothing was refused so far. (Past this
    // point kind3's API server restarts, and a restarting API server refuses requests
    // until its RBAC cache has synced.)
    let controller = std::fs::read_to_string(&controller_log)?;
    for (who, log) in [("agent", world.log()), ("controller", controller)] {
        assert!(
            !log.contains("forbidden"),
            "the {who} was refused something:\n{log}"
        );
    }
    // kind3's API server is killed: what was mirrored still serves the failover.
    kind3.stop_apiserver()?;
    world.stop_backend("kind2");
    world.until_answers(&target, &["kind3"], EVENTUAL).await?;
    world.start_backend("kind2")?;
    world.until_answers(&target, &["kind2"], EVENTUAL).await?;
    // It returns; a change made there after reaches the agent.
    kind3.start_apiserver().await?;
    apply_slice(&kind3, &kind3_slice(true)?).await?;
    until_endpoints(
        &mut world,
        &controller_log,
        &[
            "10.231.78.2:8080 kind2 same-zone",
            "10.231.78.3:8080 kind3 priority[1]/other",
            "10.231.78.4:8080 kind3 priority[1]/other",
        ],
    )
    .await?;

    // The remote cluster's Secret is deleted: kind3 leaves; kind2 keeps serving.
    secrets
        .delete("remote-kind3", &DeleteParams::default())
        .await?;
    until_endpoints(
        &mut world,
        &controller_log,
        &["10.231.78.2:8080 kind2 same-zone"],
    )
    .await?;
    world.until_answers(&target, &["kind2"], EVENTUAL).await?;
    Ok(())
}

/// The first seed end to end: ordered failover across two clusters for the callers of
/// a taken-over Service, visible per cluster, through a remote API server outage and
/// the remote cluster's removal.
#[test]
fn callers_of_reviews_fail_over_from_kind2_to_kind3_and_back() -> Result<()> {
    run(ServerKind::Real)
}

/// The same over the fake API server (no schema, CEL or garbage collection there; the
/// scenario needs none of them).
#[test]
fn callers_of_reviews_fail_over_from_kind2_to_kind3_and_back_on_the_fake_api_server() -> Result<()>
{
    run(ServerKind::Fake)
}

fn run(server: ServerKind) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(scenario(server))
}
