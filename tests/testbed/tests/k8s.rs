//! The Kubernetes test harness against real control planes: what later tests of detour's
//! Kubernetes sources rely on — clusters side by side and isolated, CRDs, selector-less
//! Services with EndpointSlices under a watch, an API server killed and started again,
//! and a watch forced to relist by an etcd compaction (410 Gone).
//!
//! The binaries come from `KUBEBUILDER_ASSETS` (`cargo xtask test` sets it); without them
//! these tests fail with a message saying how to get them. They need root (one adds a
//! blackhole route for its service CIDR), as the README's test command runs them. Each test starts at most two
//! clusters (~330 MiB and a burst of CPU each) and drops them, processes and files,
//! pass or fail.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use detour_testbed::eventually;
use detour_testbed::k8s::{Cluster, ClusterOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use serde_json::json;
use tokio::sync::mpsc;

/// Bound on waiting for something the control plane does by itself (a CRD established,
/// garbage collected, a watch event).
const EVENTUAL: Duration = Duration::from_secs(60);

fn config_map(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": labels.iter().copied().collect::<BTreeMap<_, _>>(),
        },
        "data": {"from": name},
    }))
    .unwrap()
}

#[tokio::test]
async fn two_clusters_run_side_by_side_and_are_isolated() -> Result<()> {
    let with_gc = ClusterOptions {
        controller_manager: true,
        ..ClusterOptions::default()
    };
    let started = Instant::now();
    let clusters =
        Cluster::start_all(&[("kind2", ClusterOptions::default()), ("kind3", with_gc)]).await?;
    eprintln!("two clusters up in {:.1?}", started.elapsed());
    let [kind2, kind3] = <[Cluster; 2]>::try_from(clusters).expect("two clusters");
    assert_ne!(kind2.server_url(), kind3.server_url());
    assert_ne!(kind2.service_cidr(), kind3.service_cidr());

    // Separate data: an object made in one is not in the other.
    let maps2: Api<ConfigMap> = Api::default_namespaced(kind2.client());
    let maps3: Api<ConfigMap> = Api::default_namespaced(kind3.client());
    maps2
        .create(&PostParams::default(), &config_map("only-in-kind2", &[]))
        .await?;
    assert!(maps2.get_opt("only-in-kind2").await?.is_some());
    assert!(maps3.get_opt("only-in-kind2").await?.is_none());

    // Separate credentials: kind2's admin token is refused by kind3.
    let mut foreign_token = kind3.config();
    foreign_token.auth_info.token = Some(kind2.admin_token().to_owned().into());
    let namespaces: Api<Namespace> = Api::all(kube::Client::try_from(foreign_token)?);
    match namespaces.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 401, "{status:?}"),
        other => bail!("kind3 answered a list with kind2's token: {other:?}"),
    }
    // Separate CAs: kind2's CA does not verify kind3's server.
    let mut foreign_ca = kind2.config();
    foreign_ca.cluster_url = kind3.server_url().parse()?;
    let namespaces: Api<Namespace> = Api::all(kube::Client::try_from(foreign_ca)?);
    let err = namespaces.list(&ListParams::default()).await.unwrap_err();
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "a request with the wrong CA reached the API: {err:?}"
    );

    // kubectl reads the kubeconfig file as written.
    let out = detour_testbed::output_with_timeout(
        kind2
            .kubectl()
            .args(["get", "configmap", "only-in-kind2", "-o", "name"]),
        Duration::from_secs(30),
    )?;
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configmap/only-in-kind2"
    );

    // kind3 runs the controller manager: a dependent is garbage-collected with its owner.
    let owner = maps3
        .create(&PostParams::default(), &config_map("owner", &[]))
        .await?;
    let mut dependent = config_map("dependent", &[]);
    dependent.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "owner".into(),
            uid: owner.uid().context("owner has no uid")?,
            ..Default::default()
        },
    ]);
    maps3.create(&PostParams::default(), &dependent).await?;
    maps3.delete("owner", &DeleteParams::background()).await?;
    eventually("the dependent garbage-collected", EVENTUAL, || async {
        Ok(maps3.get_opt("dependent").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| kind3.logs())?;
    Ok(())
}

#[tokio::test]
async fn a_crd_becomes_established_and_its_schema_is_enforced() -> Result<()> {
    let cluster = Cluster::start("crd").await?;
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "widgets.test.detour.dev"},
        "spec": {
            "group": "test.detour.dev",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "required": ["size"],
                        "properties": {"size": {"type": "integer", "minimum": 1}},
                    }},
                }},
            }],
        },
    }))?;
    crds.create(&PostParams::default(), &crd).await?;
    eventually("the CRD Established", EVENTUAL, || async {
        let crd = crds.get("widgets.test.detour.dev").await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        Ok(established.then_some(()))
    })
    .await?;

    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("test.detour.dev", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(cluster.client(), "default", &resource);
    // Serving the new type can lag a moment behind Established.
    eventually("a valid Widget created", EVENTUAL, || async {
        let widget = DynamicObject::new("good", &resource).data(json!({"spec": {"size": 3}}));
        Ok(Some(widgets.create(&PostParams::default(), &widget).await?))
    })
    .await?;
    assert_eq!(widgets.get("good").await?.data["spec"]["size"], 3);
    let bad = DynamicObject::new("bad", &resource).data(json!({"spec": {"size": 0}}));
    match widgets.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("spec.size"), "{status:?}");
        }
        other => bail!("a Widget with size 0 was not refused: {other:?}"),
    }
    Ok(())
}

/// What a watcher stream yielded, reduced to what the tests compare.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    Error(String),
}

/// Runs `watcher(api, config)` (with kube's default backoff) on a task, sending what it
/// yields; the task ends when the receiver is dropped.
fn watch<K>(api: Api<K>, config: watcher::Config) -> mpsc::UnboundedReceiver<Seen>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
        while let Some(item) = stream.next().await {
            let seen = match item {
                Ok(watcher::Event::Init) => Seen::Init,
                Ok(watcher::Event::InitApply(o)) => Seen::InitApply(o.name_any()),
                Ok(watcher::Event::InitDone) => Seen::InitDone,
                Ok(watcher::Event::Apply(o)) => Seen::Apply(o.name_any()),
                Ok(watcher::Event::Delete(o)) => Seen::Delete(o.name_any()),
                Err(e) => Seen::Error(format!("{e}")),
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    rx
}

/// Receives until `want` matches, failing after `within` with everything seen meanwhile.
async fn expect(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    within: Duration,
    what: &str,
    want: impl Fn(&Seen) -> bool,
) -> Result<Vec<Seen>> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => {
                let done = want(&item);
                seen.push(item);
                if done {
                    return Ok(seen);
                }
            }
            Ok(None) => bail!("the watcher ended before {what}; seen {seen:?}"),
            Err(_) => bail!("no {what} within {within:?}; seen {seen:?}"),
        }
    }
}

#[tokio::test]
async fn a_selectorless_service_and_its_endpointslice_are_watched() -> Result<()> {
    // ClusterIPs are handed out here, so their range gets a blackhole route (needs root).
    let cluster = Cluster::start_with(
        "watch",
        ClusterOptions {
            blackhole_service_cidr: true,
            ..ClusterOptions::default()
        },
    )
    .await?;
    assert!(
        blackhole_routes(cluster.service_cidr())?.contains("blackhole"),
        "no blackhole route for {}",
        cluster.service_cidr()
    );
    let slices: Api<EndpointSlice> = Api::default_namespaced(cluster.client());
    let mut events = watch(
        slices.clone(),
        watcher::Config::default().labels("kubernetes.io/service-name=reviews"),
    );
    expect(&mut events, EVENTUAL, "initial list", |s| {
        *s == Seen::InitDone
    })
    .await?;

    let services: Api<Service> = Api::default_namespaced(cluster.client());
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "reviews"},
        "spec": {"ports": [{"name": "http", "port": 9080, "protocol": "TCP"}]},
    }))?;
    let service = services.create(&PostParams::default(), &service).await?;
    let cluster_ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the Service got no ClusterIP")?;
    let prefix = cluster.service_cidr().trim_end_matches("0/24");
    assert!(
        cluster_ip.starts_with(prefix),
        "ClusterIP {cluster_ip} outside {}",
        cluster.service_cidr()
    );

    // Not a loopback address: the API server refuses those in EndpointSlices.
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {
            "name": "reviews-kind2",
            "labels": {"kubernetes.io/service-name": "reviews"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
        "endpoints": [{
            "addresses": ["198.51.100.10"],
            "conditions": {"ready": true},
            "zone": "us-east-1a",
        }],
    }))?;
    slices.create(&PostParams::default(), &slice).await?;
    expect(&mut events, EVENTUAL, "ADDED of reviews-kind2", |s| {
        *s == Seen::Apply("reviews-kind2".into())
    })
    .await?;
    let stored = slices.get("reviews-kind2").await?;
    assert_eq!(
        stored.endpoints.unwrap_or_default()[0].addresses,
        ["198.51.100.10"]
    );

    slices
        .delete("reviews-kind2", &DeleteParams::default())
        .await?;
    expect(&mut events, EVENTUAL, "DELETED of reviews-kind2", |s| {
        *s == Seen::Delete("reviews-kind2".into())
    })
    .await?;

    let cidr = cluster.service_cidr().to_owned();
    drop(cluster);
    assert_eq!(
        blackhole_routes(&cidr)?,
        "",
        "the route outlived the cluster"
    );
    Ok(())
}

/// `ip route show exact CIDR type blackhole`: empty when there is no such route.
fn blackhole_routes(cidr: &str) -> Result<String> {
    let out = detour_testbed::output_with_timeout(
        std::process::Command::new("ip").args([
            "route",
            "show",
            "exact",
            cidr,
            "type",
            "blackhole",
        ]),
        Duration::from_secs(10),
    )?;
    if !out.status.success() {
        bail!(
            "ip route show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::test]
async fn a_killed_apiserver_comes_back_with_its_objects() -> Result<()> {
    let mut cluster = Cluster::start("restart").await?;
    let maps: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    maps.create(&PostParams::default(), &config_map("survivor", &[]))
        .await?;

    cluster.stop_apiserver()?;
    assert!(!cluster.apiserver_running());
    let down = tokio::time::timeout(Duration::from_secs(30), maps.get("survivor")).await;
    assert!(
        matches!(down, Ok(Err(_))),
        "a get with the API server killed did not fail: {down:?}"
    );

    let restarted = Instant::now();
    cluster.start_apiserver().await?;
    eprintln!("API server ready again in {:.1?}", restarted.elapsed());
    assert!(cluster.apiserver_running());
    // The client made before the restart works again, and the object is still there.
    let survivor = maps.get("survivor").await?;
    assert_eq!(survivor.data.unwrap_or_default()["from"], "survivor");
    Ok(())
}

#[tokio::test]
async fn an_etcd_compaction_under_a_watch_makes_it_relist_and_carry_on() -> Result<()> {
    // Without the watch cache, a watch resuming below the compacted revision gets 410
    // from etcd itself, so no restart is needed to provoke it.
    let cluster = Cluster::start_with(
        "compact",
        ClusterOptions {
            watch_cache: false,
            ..ClusterOptions::default()
        },
    )
    .await?;
    let maps: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let watched = [("detour-test/watched", "yes")];
    let before = maps
        .create(&PostParams::default(), &config_map("before", &watched))
        .await?;
    // A short server-side timeout: the watch ends and resumes from the last
    // resourceVersion it saw every couple of seconds, as a long one does eventually.
    let mut events = watch(
        maps.clone(),
        watcher::Config::default()
            .labels("detour-test/watched=yes")
            .timeout(2),
    );
    expect(&mut events, EVENTUAL, "initial list", |s| {
        *s == Seen::InitDone
    })
    .await?;

    // Writes the watch does not see move the revision past the watch's resourceVersion;
    // compacting there leaves the watch nothing to resume from.
    for i in 0..3 {
        maps.create(
            &PostParams::default(),
            &config_map(&format!("unwatched-{i}"), &[]),
        )
        .await?;
    }
    let compacted = cluster.compact_etcd().await?;
    let before_rv: i64 = before
        .resource_version()
        .context("no resourceVersion")?
        .parse()?;
    assert!(
        compacted > before_rv,
        "compacted at {compacted}, watch at {before_rv}"
    );

    let seen = expect(
        &mut events,
        EVENTUAL,
        "410 Gone",
        |s| matches!(s, Seen::Error(e) if e.contains("410") || e.contains("too old")),
    )
    .await?;
    eprintln!("watch after compaction at revision {compacted}: {seen:?}");
    // kube's watcher relists: the full list again, with the object made before.
    let relist = expect(&mut events, EVENTUAL, "relist", |s| *s == Seen::InitDone).await?;
    assert!(relist.contains(&Seen::Init), "{relist:?}");
    assert!(
        relist.contains(&Seen::InitApply("before".into())),
        "{relist:?}"
    );
    // ... and keeps watching: a later change arrives.
    maps.create(&PostParams::default(), &config_map("after", &watched))
        .await?;
    expect(&mut events, EVENTUAL, "ADDED of after", |s| {
        *s == Seen::Apply("after".into())
    })
    .await?;
    Ok(())
}
