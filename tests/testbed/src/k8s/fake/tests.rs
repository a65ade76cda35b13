//! The fake API server through a real `kube::Client` (and kube-runtime's watcher): what
//! the scenarios rely on it to do as kube-apiserver does.

use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher;
use kube::ResourceExt as _;
use serde_json::{json, Value};

use super::{FakeCluster, FakeOptions};

const WAIT: Duration = Duration::from_secs(10);

fn config_map(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "data": {"k": "v"},
    }))
    .unwrap()
}

fn api_code(error: kube::Error) -> (u16, String) {
    match error {
        kube::Error::Api(status) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other}"),
    }
}

async fn names(api: &Api<ConfigMap>, params: &ListParams) -> Vec<String> {
    api.list(params)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| c.metadata.name.unwrap())
        .collect()
}

#[tokio::test]
async fn lists_select_by_label_and_field() {
    let cluster = FakeCluster::start("selectors").await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let pp = PostParams::default();
    api.create(
        &pp,
        &config_map("a", json!({"app": "reviews", "tier": "web"})),
    )
    .await
    .unwrap();
    api.create(&pp, &config_map("b", json!({"app": "ratings"})))
        .await
        .unwrap();
    api.create(&pp, &config_map("c", json!({}))).await.unwrap();

    let by = |labels: &str| ListParams::default().labels(labels);
    assert_eq!(names(&api, &by("app=reviews")).await, ["a"]);
    assert_eq!(names(&api, &by("app!=reviews")).await, ["b", "c"]);
    assert_eq!(names(&api, &by("app")).await, ["a", "b"]);
    assert_eq!(names(&api, &by("!app")).await, ["c"]);
    assert_eq!(names(&api, &by("app in (ratings,x)")).await, ["b"]);
    assert_eq!(names(&api, &by("app notin (ratings)")).await, ["a", "c"]);
    assert_eq!(
        names(&api, &ListParams::default().fields("metadata.name=b")).await,
        ["b"]
    );
    let all: Api<ConfigMap> = Api::all(cluster.client());
    assert_eq!(
        names(
            &all,
            &ListParams::default().fields("metadata.namespace=default")
        )
        .await,
        ["a", "b", "c"]
    );
    assert!(names(
        &all,
        &ListParams::default().fields("metadata.namespace=other")
    )
    .await
    .is_empty());

    // The list's resourceVersion is the newest one handed out.
    let list = api.list(&ListParams::default()).await.unwrap();
    let newest = api.get("c").await.unwrap().metadata.resource_version;
    assert_eq!(list.metadata.resource_version, newest);

    let (code, _) = api_code(api.list(&by("app in reviews")).await.unwrap_err());
    assert_eq!(code, 400);
}

#[tokio::test]
async fn writes_answer_with_kube_apiserver_codes() {
    let cluster = FakeCluster::start("codes").await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let pp = PostParams::default();
    let created = api.create(&pp, &config_map("a", json!({}))).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());

    let (code, reason) = api_code(
        api.create(&pp, &config_map("a", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
    let (code, reason) = api_code(api.get("missing").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    let (code, _) = api_code(
        api.delete("missing", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);
    let elsewhere: Api<ConfigMap> = Api::namespaced(cluster.client(), "nowhere");
    let (code, _) = api_code(
        elsewhere
            .create(&pp, &config_map("a", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404, "a namespace that does not exist takes nothing");

    // A replace naming an old resourceVersion conflicts; a current one goes through.
    let mut stale = created.clone();
    let mut changed = api.get("a").await.unwrap();
    changed.data = Some([("k".to_owned(), "w".to_owned())].into());
    let changed = api.replace("a", &pp, &changed).await.unwrap();
    stale.data = Some([("k".to_owned(), "x".to_owned())].into());
    let (code, reason) = api_code(api.replace("a", &pp, &stale).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(changed.metadata.generation, Some(2), "data changed");

    // A merge patch; one that changes nothing commits nothing.
    let patch = Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}}));
    let patched = api
        .patch("a", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(patched.labels().get("x").map(String::as_str), Some("1"));
    assert_eq!(patched.metadata.generation, Some(2), "metadata is not spec");
    let again = api
        .patch("a", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        patched.metadata.resource_version
    );

    api.delete("a", &DeleteParams::default()).await.unwrap();
    let (code, _) = api_code(api.get("a").await.unwrap_err());
    assert_eq!(code, 404);
}

#[tokio::test]
async fn server_side_apply_creates_then_merges_the_applied_fields() {
    let cluster = FakeCluster::start("apply").await.unwrap();
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let apply = |spec: Value, labels: Value| {
        Patch::Apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "reviews", "labels": labels},
            "spec": spec,
        }))
    };
    let pp = PatchParams::apply("test").force();
    let created = services
        .patch(
            "reviews",
            &pp,
            &apply(
                json!({"ports": [{"name": "http", "port": 9080}]}),
                json!({"a": "1"}),
            ),
        )
        .await
        .unwrap();
    let spec = created.spec.clone().unwrap();
    let ip = spec.cluster_ip.clone().unwrap();
    let prefix = cluster.service_cidr().trim_end_matches("0/24");
    assert!(ip.starts_with(prefix), "{ip} in {}", cluster.service_cidr());
    assert_eq!(spec.cluster_ips, Some(vec![ip.clone()]));
    let port = &spec.ports.unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9080))
    );

    // A second apply merges: the label it does not name stays, the ClusterIP is kept,
    // the spec change bumps the generation.
    let merged = services
        .patch(
            "reviews",
            &pp,
            &apply(
                json!({"ports": [{"name": "http", "port": 9081}]}),
                json!({"b": "2"}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(merged.labels().get("a").map(String::as_str), Some("1"));
    assert_eq!(merged.labels().get("b").map(String::as_str), Some("2"));
    assert_eq!(
        merged.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some(&*ip)
    );
    assert_eq!(merged.metadata.generation, Some(2));
    assert_eq!(merged.metadata.uid, created.metadata.uid);

    // The same apply again is a no-op: no new resourceVersion.
    let same = services
        .patch(
            "reviews",
            &pp,
            &apply(
                json!({"ports": [{"name": "http", "port": 9081}]}),
                json!({"b": "2"}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        merged.metadata.resource_version
    );

    // Status goes through /status only.
    let status = Patch::Apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews"},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}},
    }));
    let ignored = services.patch("reviews", &pp, &status).await.unwrap();
    assert!(ignored
        .status
        .is_none_or(|s| s.load_balancer.is_none_or(|lb| lb.ingress.is_none())));
    let written = services
        .patch_status("reviews", &pp, &status)
        .await
        .unwrap();
    assert_eq!(written.metadata.generation, Some(2), "status is not spec");
    assert!(written
        .status
        .unwrap()
        .load_balancer
        .unwrap()
        .ingress
        .is_some());

    let (code, _) = api_code(
        services
            .patch(
                "other",
                &pp,
                &Patch::Apply(json!({"metadata": {"name": "other"}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400, "an apply patch names its apiVersion and kind");
}

#[tokio::test]
async fn a_watch_from_before_a_compaction_gets_410_expired() {
    let cluster = FakeCluster::start("compact").await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let listed = api.list(&ListParams::default()).await.unwrap();
    let from = listed.metadata.resource_version.unwrap();
    let pp = PostParams::default();
    for name in ["a", "b", "c"] {
        api.create(&pp, &config_map(name, json!({}))).await.unwrap();
    }

    // Before compaction the watch replays what happened since `from`.
    let mut stream = api
        .watch(&WatchParams::default(), &from)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Added(c)) => assert_eq!(c.name_any(), "a"),
        other => panic!("expected ADDED a, got {other:?}"),
    }
    drop(stream);

    let compacted = cluster.compact_etcd().await.unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), &from)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        stream.try_next().await.unwrap().is_none(),
        "the stream ends"
    );

    // From the compaction's own revision it works.
    api.create(&pp, &config_map("d", json!({}))).await.unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), &compacted.to_string())
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Added(c)) => assert_eq!(c.name_any(), "d"),
        other => panic!("expected ADDED d, got {other:?}"),
    }
}

/// kube-runtime's watcher on a 410: it relists, and the relist has every object.
#[tokio::test]
async fn kubes_watcher_relists_after_410_and_sees_every_object() {
    let options = FakeOptions {
        // No bookmark moves the watcher's resourceVersion during the test.
        bookmark_interval: Duration::from_secs(3600),
        ..FakeOptions::default()
    };
    let cluster = FakeCluster::start_with("relist", options).await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let pp = PostParams::default();
    api.create(&pp, &config_map("watched-1", json!({"w": "y"})))
        .await
        .unwrap();
    let mut events = watcher(api.clone(), watcher::Config::default().labels("w=y")).boxed();
    let mut seen = Vec::new();
    while !seen.contains(&"InitDone".to_owned()) {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap();
        seen.push(describe(event));
    }
    assert_eq!(seen, ["Init", "InitApply(watched-1)", "InitDone"]);

    // Objects the watch does not select move the resourceVersion past it; a compaction
    // then leaves the watcher's resourceVersion behind, and ending the watch makes it
    // resume from there.
    for name in ["other-1", "other-2", "other-3"] {
        api.create(&pp, &config_map(name, json!({}))).await.unwrap();
    }
    api.create(&pp, &config_map("watched-2", json!({"w": "y"})))
        .await
        .unwrap();
    let next = tokio::time::timeout(WAIT, events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(describe(next), "Apply(watched-2)");
    for name in ["other-4", "other-5"] {
        api.create(&pp, &config_map(name, json!({}))).await.unwrap();
    }
    cluster.compact_etcd().await.unwrap();
    cluster.with_store(|store| store.end_watches());

    let mut seen = Vec::new();
    while !seen.contains(&"InitDone".to_owned()) {
        let event = tokio::time::timeout(WAIT, events.next()).await.unwrap();
        seen.push(describe(event.unwrap()));
    }
    assert_eq!(
        seen,
        [
            "error 410",
            "Init",
            "InitApply(watched-1)",
            "InitApply(watched-2)",
            "InitDone"
        ]
    );
}

fn describe(event: Result<watcher::Event<ConfigMap>, watcher::Error>) -> String {
    match event {
        Ok(watcher::Event::Init) => "Init".into(),
        Ok(watcher::Event::InitDone) => "InitDone".into(),
        Ok(watcher::Event::InitApply(c)) => format!("InitApply({})", c.name_any()),
        Ok(watcher::Event::Apply(c)) => format!("Apply({})", c.name_any()),
        Ok(watcher::Event::Delete(c)) => format!("Delete({})", c.name_any()),
        Err(watcher::Error::WatchError(status)) => format!("error {}", status.code),
        Err(other) => format!("error {other}"),
    }
}

#[tokio::test]
async fn watches_get_bookmarks_and_selector_transitions() {
    let options = FakeOptions {
        bookmark_interval: Duration::from_millis(200),
        ..FakeOptions::default()
    };
    let cluster = FakeCluster::start_with("bookmarks", options).await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let pp = PostParams::default();
    let from = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default().labels("w=y"), &from)
        .await
        .unwrap()
        .boxed();
    let unselected = api.create(&pp, &config_map("a", json!({}))).await.unwrap();
    let unselected_rv: u64 = unselected.resource_version().unwrap().parse().unwrap();
    // The object stops being selected: DELETED; selected again: ADDED.
    let label = |value: Value| Patch::Merge(json!({"metadata": {"labels": {"w": value}}}));
    let pm = PatchParams::default();
    api.patch("a", &pm, &label(json!("y"))).await.unwrap();
    api.patch("a", &pm, &label(Value::Null)).await.unwrap();

    let mut kinds = Vec::new();
    let mut bookmark_rv = 0;
    while bookmark_rv == 0 {
        match tokio::time::timeout(WAIT, stream.try_next())
            .await
            .unwrap()
            .unwrap()
        {
            Some(WatchEvent::Added(c)) => kinds.push(format!("ADDED {}", c.name_any())),
            Some(WatchEvent::Modified(c)) => kinds.push(format!("MODIFIED {}", c.name_any())),
            Some(WatchEvent::Deleted(c)) => kinds.push(format!("DELETED {}", c.name_any())),
            Some(WatchEvent::Bookmark(b)) => {
                bookmark_rv = b.metadata.resource_version.parse().unwrap()
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(kinds, ["ADDED a", "DELETED a"]);
    assert!(
        bookmark_rv > unselected_rv + 1,
        "{bookmark_rv} after every change"
    );
}

#[tokio::test]
async fn a_stopped_server_cuts_watches_and_keeps_its_objects() {
    let mut cluster = FakeCluster::start("outage").await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    api.create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        stream.try_next().await.unwrap(),
        Some(WatchEvent::Added(_))
    ));

    cluster.stop_apiserver().unwrap();
    let ended = tokio::time::timeout(WAIT, stream.next()).await.unwrap();
    assert!(!matches!(ended, Some(Ok(_))), "the watch is cut: {ended:?}");
    assert!(api.get("a").await.is_err(), "nothing answers while stopped");

    cluster.start_apiserver().await.unwrap();
    let a = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(a) = api.get("a").await {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(a.name_any(), "a");
    assert_eq!(
        cluster.server_url(),
        format!("http://127.0.0.1:{}", cluster.port)
    );
}

#[tokio::test]
async fn a_crd_makes_its_resource_served_with_a_status_subresource() {
    let cluster = FakeCluster::start("crd").await.unwrap();
    let crd: Value = serde_saphyr::from_str(include_str!(
        "../../../../../deploy/crds/failoverservice.yaml"
    ))
    .unwrap();
    let crds = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
    );
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("failover.detour.io", "v1alpha1", "FailoverService"),
        "failoverservices",
    );
    let fs: Api<DynamicObject> = Api::namespaced_with(cluster.client(), "default", &resource);
    let object = DynamicObject::new("reviews", &resource).data(json!({"spec": {"hostname": "h"}}));
    let (code, _) = api_code(
        fs.create(&PostParams::default(), &object)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404, "no CRD, no resource");

    let crd: DynamicObject = serde_json::from_value(crd).unwrap();
    let crd_api: Api<DynamicObject> = Api::all_with(cluster.client(), &crds);
    let created = crd_api.create(&PostParams::default(), &crd).await.unwrap();
    let established = created.data["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Established" && c["status"] == "True");
    assert!(established, "{:#}", created.data);

    let made = fs.create(&PostParams::default(), &object).await.unwrap();
    assert_eq!(made.metadata.generation, Some(1));
    let status = Patch::Apply(json!({
        "apiVersion": "failover.detour.io/v1alpha1", "kind": "FailoverService",
        "metadata": {"name": "reviews"}, "status": {"vip": "198.18.0.10"},
    }));
    let pp = PatchParams::apply("controller").force();
    let written = fs.patch_status("reviews", &pp, &status).await.unwrap();
    assert_eq!(written.data["status"]["vip"], "198.18.0.10");
    assert_eq!(written.data["spec"]["hostname"], "h");
    assert_eq!(written.metadata.generation, Some(1));
    let spec = Patch::Merge(json!({"spec": {"hostname": "g"}}));
    let changed = fs
        .patch("reviews", &PatchParams::default(), &spec)
        .await
        .unwrap();
    assert_eq!(changed.metadata.generation, Some(2));
    assert_eq!(changed.data["status"]["vip"], "198.18.0.10", "status kept");

    crd_api
        .delete(
            "failoverservices.failover.detour.io",
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    let (code, _) = api_code(fs.get("reviews").await.unwrap_err());
    assert_eq!(code, 404);
}
