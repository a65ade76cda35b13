//! The agent's watches against a scripted API server (tower-test's mock service behind a
//! real `kube::Client`): the edge cases neither kube-apiserver nor the fake produce on
//! demand — a 410 whose relist is held back while other changes arrive, a watch that
//! keeps failing to restart, a bookmark on its own.
//!
//! Each resource the agent watches has a queue of answers the test scripts (a list, an
//! open watch stream the test writes events to, an error); a request waits until its
//! answer is queued. Time is tokio's paused clock, so backoff is measured exactly and a
//! missing answer fails the test at its timeout instead of hanging it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc as frames;
use http::{Request, Response};
use http_body_util::StreamBody;
use hyper::body::Frame;
use kube::client::Body;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

use super::{spawn, Options, Update};

/// Bound on anything the watches do by themselves (paused time: costs nothing).
const WAIT: Duration = Duration::from_secs(120);

type Frames = frames::UnboundedReceiver<Result<Frame<Bytes>, Infallible>>;

/// The four watches of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    FailoverServices,
    Services,
    Slices,
    Nodes,
}

const KINDS: [Kind; 4] = [
    Kind::FailoverServices,
    Kind::Services,
    Kind::Slices,
    Kind::Nodes,
];

impl Kind {
    fn of(path: &str) -> Self {
        match path.rsplit('/').next().unwrap_or_default() {
            "failoverservices" => Self::FailoverServices,
            "services" => Self::Services,
            "endpointslices" => Self::Slices,
            "nodes" => Self::Nodes,
            other => panic!("the agent asked for an unexpected resource {other:?} ({path})"),
        }
    }
}

/// What the next request for a resource gets.
enum Answer {
    List(Value),
    /// An open watch stream; the test gets its writing end from [`Script::opened`].
    Watch,
    /// An error response with this HTTP code.
    Error(u16),
}

/// A request the agent made.
#[derive(Debug, Clone)]
struct Asked {
    kind: Kind,
    watch: bool,
    resource_version: Option<String>,
    at: Instant,
}

/// The writing end of an open watch.
struct Stream(frames::UnboundedSender<Result<Frame<Bytes>, Infallible>>);

impl Stream {
    fn send(&self, event_type: &str, object: Value) {
        let mut line = json!({"type": event_type, "object": object}).to_string();
        line.push('\n');
        self.0
            .unbounded_send(Ok(Frame::data(Bytes::from(line))))
            .expect("the agent keeps its watch open");
    }
}

struct Script {
    answers: HashMap<Kind, mpsc::UnboundedSender<Answer>>,
    opened: HashMap<Kind, mpsc::UnboundedReceiver<Stream>>,
    asked: mpsc::UnboundedReceiver<Asked>,
}

impl Script {
    /// A client whose requests the returned script answers.
    fn start() -> (Self, kube::Client) {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<Body>, Response<StreamBody<Frames>>>();
        let mut queues = HashMap::new();
        let mut answers = HashMap::new();
        let mut opened_rx = HashMap::new();
        let mut opened_tx = HashMap::new();
        for kind in KINDS {
            let (tx, rx) = mpsc::unbounded_channel();
            answers.insert(kind, tx);
            queues.insert(kind, Arc::new(Mutex::new(rx)));
            let (tx, rx) = mpsc::unbounded_channel();
            opened_tx.insert(kind, tx);
            opened_rx.insert(kind, rx);
        }
        let (asked_tx, asked) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let kind = Kind::of(request.uri().path());
                let query: HashMap<String, String> =
                    request.uri().query().map(query_pairs).unwrap_or_default();
                let _ = asked_tx.send(Asked {
                    kind,
                    watch: query.get("watch").is_some_and(|w| w == "true"),
                    resource_version: query.get("resourceVersion").cloned(),
                    at: Instant::now(),
                });
                let queue = queues[&kind].clone();
                let opened = opened_tx[&kind].clone();
                // Each request waits for its own answer; the other watches go on.
                tokio::spawn(async move {
                    let Some(answer) = queue.lock().await.recv().await else {
                        return;
                    };
                    let (status, body) = match answer {
                        Answer::List(list) => (200, whole(list)),
                        Answer::Error(code) => (
                            code,
                            whole(
                                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                         "code": code, "reason": "InternalError",
                                         "message": "scripted failure"}),
                            ),
                        ),
                        Answer::Watch => {
                            let (tx, rx) = frames::unbounded();
                            let _ = opened.send(Stream(tx));
                            (200, rx)
                        }
                    };
                    let response = Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(StreamBody::new(body))
                        .expect("a scripted response builds");
                    respond.send_response(response);
                });
            }
        });
        let client = kube::Client::new(service, "default");
        (
            Self {
                answers,
                opened: opened_rx,
                asked,
            },
            client,
        )
    }

    fn answer(&self, kind: Kind, answer: Answer) {
        self.answers[&kind]
            .send(answer)
            .expect("the script's dispatcher runs");
    }

    /// The next watch stream opened for `kind`.
    async fn opened(&mut self, kind: Kind) -> Stream {
        tokio::time::timeout(WAIT, self.opened.get_mut(&kind).expect("a kind").recv())
            .await
            .unwrap_or_else(|_| panic!("no {kind:?} watch opened within {WAIT:?}"))
            .expect("the script's dispatcher runs")
    }

    /// The next request for `kind` (requests for other kinds are passed over).
    async fn next_asked(&mut self, kind: Kind) -> Asked {
        tokio::time::timeout(WAIT, async {
            loop {
                let asked = self.asked.recv().await.expect("the dispatcher runs");
                if asked.kind == kind {
                    return asked;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind:?} request within {WAIT:?}"))
    }
}

/// `k=v&...`, undecoded: the values the tests read (watch, resourceVersion) need no
/// decoding.
fn query_pairs(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A body of one frame, then its end.
fn whole(value: Value) -> Frames {
    let (tx, rx) = frames::unbounded();
    tx.unbounded_send(Ok(Frame::data(Bytes::from(value.to_string()))))
        .expect("the receiver is here");
    rx
}

fn list(kind: &str, api_version: &str, rv: &str, items: Vec<Value>) -> Value {
    json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv}, "items": items})
}

fn failover_service() -> Value {
    json!({
        "apiVersion": "failover.detour.io/v1alpha1", "kind": "FailoverService",
        "metadata": {"name": "reviews-failover", "namespace": "default", "resourceVersion": "3",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "hostname": "reviews-failover.default.global",
            "port": {"number": 9080, "protocol": "http"},
            "backingServices": [{"kubeService": {"name": "reviews", "namespace": "default"}}],
            "virtualIP": "198.18.0.10",
        },
    })
}

fn service(rv: &str, label: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "default", "resourceVersion": rv,
                     "labels": {"touched": label}},
        "spec": {"clusterIP": "198.18.0.20", "clusterIPs": ["198.18.0.20"],
                 "ports": [{"name": "http", "port": 9080, "targetPort": 8080, "protocol": "TCP"}]},
    })
}

fn slice(rv: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "zone": "us-east1-b", "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "reviews-abcde", "namespace": "default", "resourceVersion": rv,
                     "labels": {"kubernetes.io/service-name": "reviews"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn node() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "resourceVersion": "5", "labels": {
            "topology.kubernetes.io/region": "us-east1",
            "topology.kubernetes.io/zone": "us-east1-b",
        }},
    })
}

/// Scripts the first list and watch of every resource (resourceVersion 10): one
/// FailoverService over `reviews`, whose slice has two endpoints.
fn script_initial_sync(script: &Script) {
    script.answer(
        Kind::FailoverServices,
        Answer::List(list(
            "FailoverServiceList",
            "failover.detour.io/v1alpha1",
            "10",
            vec![failover_service()],
        )),
    );
    script.answer(
        Kind::Services,
        Answer::List(list("ServiceList", "v1", "10", vec![service("4", "a")])),
    );
    script.answer(
        Kind::Slices,
        Answer::List(list(
            "EndpointSliceList",
            "discovery.k8s.io/v1",
            "10",
            vec![slice("6", &["10.1.0.2", "10.1.0.3"])],
        )),
    );
    script.answer(
        Kind::Nodes,
        Answer::List(list("NodeList", "v1", "10", vec![node()])),
    );
    for kind in KINDS {
        script.answer(kind, Answer::Watch);
    }
}

/// The endpoints of the model's `reviews-failover` service, sorted.
fn endpoints(update: &Update) -> Vec<String> {
    let service = update
        .built
        .config
        .services
        .iter()
        .find(|s| s.name.starts_with("reviews-failover"))
        .unwrap_or_else(|| panic!("no reviews-failover in {:?}", update.built));
    let mut addresses: Vec<String> = service
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    addresses.sort();
    addresses
}

async fn next_update(updates: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(WAIT, updates.recv())
        .await
        .unwrap_or_else(|_| panic!("no model within {WAIT:?}"))
        .expect("the watches run")
}

/// No model is handed over while the watches settle (paused time runs ahead).
async fn assert_no_update(updates: &mut mpsc::Receiver<Update>, why: &str) {
    tokio::time::sleep(Duration::from_secs(5)).await;
    if let Ok(update) = updates.try_recv() {
        panic!("{why}: got a model with {:?}", endpoints(&update));
    }
}

fn options() -> Options {
    Options {
        node_name: "node-a".into(),
        cluster: "kind1".into(),
    }
}

/// A 410 on the EndpointSlice watch after the first list: the watch relists, and until
/// the relist is complete every model handed over (another resource changed meanwhile)
/// still has the endpoints of before; once complete, only what is gone is removed.
#[tokio::test(start_paused = true)]
async fn a_410_relists_and_no_model_loses_objects_before_the_relist_completes() {
    let (mut script, client) = Script::start();
    script_initial_sync(&script);
    let (tx, mut updates) = mpsc::channel(1);
    let _watches = spawn(client, options(), tx);
    let first = next_update(&mut updates).await;
    assert!(first.first_sync.is_some());
    assert_eq!(endpoints(&first), ["10.1.0.2", "10.1.0.3"]);
    let slices = script.opened(Kind::Slices).await;
    let services = script.opened(Kind::Services).await;
    let listed = script.next_asked(Kind::Slices).await;
    let watching = script.next_asked(Kind::Slices).await;
    assert!(!listed.watch && watching.watch, "{listed:?} {watching:?}");

    slices.send(
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
               "reason": "Expired", "message": "too old resource version: 10 (20)"}),
    );
    drop(slices);
    // The relist's request arrives; its answer is held back.
    let relist = script.next_asked(Kind::Slices).await;
    assert!(!relist.watch, "a 410 relists: {relist:?}");
    services.send("MODIFIED", service("21", "b"));
    let during = next_update(&mut updates).await;
    assert_eq!(
        endpoints(&during),
        ["10.1.0.2", "10.1.0.3"],
        "a model built during the relist keeps what was listed before"
    );

    script.answer(
        Kind::Slices,
        Answer::List(list(
            "EndpointSliceList",
            "discovery.k8s.io/v1",
            "30",
            vec![slice("25", &["10.1.0.3", "10.1.0.4"])],
        )),
    );
    script.answer(Kind::Slices, Answer::Watch);
    let after = next_update(&mut updates).await;
    assert_eq!(after.first_sync, None);
    assert_eq!(endpoints(&after), ["10.1.0.3", "10.1.0.4"]);
    let asked = script.next_asked(Kind::Slices).await;
    assert!(asked.watch);
    assert_eq!(asked.resource_version.as_deref(), Some("30"));
}

/// A watch that ends early is resumed from its last resourceVersion (no relist); one
/// that then fails to start is retried with growing backoff (client-go's 800 ms
/// doubling); meanwhile no model is handed over and none is lost, and the resumed watch
/// carries on from the state kept.
#[tokio::test(start_paused = true)]
async fn a_failing_watch_is_retried_with_backoff_and_its_state_kept() {
    let (mut script, client) = Script::start();
    script_initial_sync(&script);
    let (tx, mut updates) = mpsc::channel(1);
    let _watches = spawn(client, options(), tx);
    let first = next_update(&mut updates).await;
    assert_eq!(endpoints(&first), ["10.1.0.2", "10.1.0.3"]);
    let slices = script.opened(Kind::Slices).await;
    slices.send(
        "MODIFIED",
        slice("12", &["10.1.0.2", "10.1.0.3", "10.1.0.5"]),
    );
    let changed = next_update(&mut updates).await;
    assert_eq!(endpoints(&changed), ["10.1.0.2", "10.1.0.3", "10.1.0.5"]);

    // Past the first list and watch: only what comes after the stream ends counts.
    let first_list = script.next_asked(Kind::Slices).await;
    assert!(!first_list.watch);
    let first_watch = script.next_asked(Kind::Slices).await;
    assert!(first_watch.watch);

    for _ in 0..3 {
        script.answer(Kind::Slices, Answer::Error(500));
    }
    drop(slices);
    let mut attempts = Vec::new();
    for _ in 0..4 {
        attempts.push(script.next_asked(Kind::Slices).await);
    }
    for asked in &attempts {
        assert!(asked.watch, "no relist: {asked:?}");
        assert_eq!(asked.resource_version.as_deref(), Some("12"), "{asked:?}");
    }
    // The first retry follows the stream's end at once; each failure then waits at
    // least 800 ms, doubling.
    for (i, pair) in attempts.windows(2).enumerate() {
        let gap = pair[1].at - pair[0].at;
        let least = Duration::from_millis(800) * 2u32.pow(i as u32);
        assert!(
            gap >= least,
            "retry {} after {gap:?}, expected ≥ {least:?}",
            i + 1
        );
    }
    assert_no_update(&mut updates, "a failing watch changes nothing").await;

    script.answer(Kind::Slices, Answer::Watch);
    let slices = script.opened(Kind::Slices).await;
    let services = script.opened(Kind::Services).await;
    services.send("MODIFIED", service("40", "b"));
    let kept = next_update(&mut updates).await;
    assert_eq!(endpoints(&kept), ["10.1.0.2", "10.1.0.3", "10.1.0.5"]);
    drop(slices);
}

/// A BOOKMARK only moves the resourceVersion a watch resumes from: no model for it.
#[tokio::test(start_paused = true)]
async fn a_bookmark_only_moves_the_resource_version() {
    let (mut script, client) = Script::start();
    script_initial_sync(&script);
    let (tx, mut updates) = mpsc::channel(1);
    let _watches = spawn(client, options(), tx);
    next_update(&mut updates).await;
    let services = script.opened(Kind::Services).await;
    let list = script.next_asked(Kind::Services).await;
    assert!(!list.watch);
    let watch = script.next_asked(Kind::Services).await;
    assert_eq!(watch.resource_version.as_deref(), Some("10"));

    services.send(
        "BOOKMARK",
        json!({"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "57"}}),
    );
    assert_no_update(&mut updates, "a bookmark is no change").await;

    script.answer(Kind::Services, Answer::Watch);
    drop(services);
    let resumed = script.next_asked(Kind::Services).await;
    assert!(resumed.watch);
    assert_eq!(resumed.resource_version.as_deref(), Some("57"));
    assert_no_update(&mut updates, "resuming is no change").await;
}
