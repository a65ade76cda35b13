//! The fake API server's HTTP side: kube-apiserver's REST paths over HTTP/1.1 (hyper),
//! in front of the [`Store`].
//!
//! Paths: `/api/v1/...` and `/apis/GROUP/VERSION/...`, each
//! `[namespaces/NS/]PLURAL[/NAME[/status]]`, plus `/readyz`, `/livez`, `/healthz` and
//! `/version`. Verbs: GET (one object, a list, or `?watch=true`), POST, PUT, PATCH
//! (`application/apply-patch+yaml`, `application/merge-patch+json`, and
//! `application/strategic-merge-patch+json` read as a merge patch), DELETE; `dryRun=All`
//! commits nothing. Errors are `Status` objects with kube-apiserver's codes and reasons.
//!
//! A watch is newline-delimited JSON events (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR).
//! Invariants: a BOOKMARK carries a resourceVersion no older than any event already sent
//! on that watch and no newer than one still to come (it is read under the store's lock
//! after taking every change queued for the watch); a watch from a compacted
//! resourceVersion gets one ERROR event with a 410 Expired Status, then the stream ends —
//! what kube-apiserver sends and what kube's watcher answers with a relist; a watch ends
//! after `timeoutSeconds`, and at once when the server stops (its connection is dropped).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::selector::{self, Filter};
use super::store::{ApiError, Change, Changes, ResourceType, Store, Target, Write};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How many requests [`Shared::requests`] remembers, for a failing test's message.
const REQUEST_LOG: usize = 200;
/// A watch without `timeoutSeconds` ends after this long (kube-apiserver picks 30-60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// What every connection shares: the store, the last requests, the settings.
pub struct Shared {
    pub store: Mutex<Store>,
    requests: Mutex<VecDeque<String>>,
    bookmark_interval: Duration,
}

impl Shared {
    pub fn new(store: Store, bookmark_interval: Duration) -> Self {
        Self {
            store: Mutex::new(store),
            requests: Mutex::new(VecDeque::new()),
            bookmark_interval,
        }
    }

    /// The store; a panic elsewhere while it was held does not hide it from the test.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The last requests, oldest first, one line each: `METHOD URI -> CODE`.
    pub fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn note(&self, line: String) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if requests.len() == REQUEST_LOG {
            requests.pop_front();
        }
        requests.push_back(line);
    }
}

/// One running server: its listener and its connections, dropped together (the
/// listener closes, every connection and watch is cut). `closed` goes last, so whoever
/// waits on it knows the port is free.
struct Serving {
    listener: TcpListener,
    connections: JoinSet<()>,
    _closed: std::sync::mpsc::SyncSender<()>,
}

/// Accepts connections on `listener` until the task is aborted; `closed` is dropped
/// (disconnecting its receiver) once the listener and every connection are gone.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    closed: std::sync::mpsc::SyncSender<()>,
) {
    let mut serving = Serving {
        listener,
        connections: JoinSet::new(),
        _closed: closed,
    };
    loop {
        let stream = match serving.listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                eprintln!("fake API server: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        serving.connections.spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(request, shared).await) }
            });
            // A connection ends when its client closes it; errors are the client's.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while serving.connections.try_join_next().is_some() {}
    }
}

/// Where a request goes inside the resource API.
#[derive(Debug, PartialEq, Eq)]
struct Route {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => {
            (Some(ns.to_string()), [&[*plural][..], tail].concat())
        }
        _ => (None, rest.to_vec()),
    };
    let (plural, name, subresource) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    Some(Route {
        group: group.into(),
        version: version.into(),
        namespace,
        plural: plural.into(),
        name: name.map(Into::into),
        subresource: subresource.map(Into::into),
    })
}

async fn handle(request: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let line = format!("{} {}", request.method(), request.uri());
    let response = match respond(request, &shared).await {
        Ok(response) => response,
        Err(error) => json_response(
            StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &error.status(),
        ),
    };
    shared.note(format!("{line} -> {}", response.status().as_u16()));
    response
}

async fn respond(
    request: Request<Incoming>,
    shared: &Arc<Shared>,
) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path().to_owned();
    match path.as_str() {
        "/readyz" | "/livez" | "/healthz" => return Ok(text_response("ok")),
        "/version" => {
            return Ok(json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "36", "gitVersion": "v1.36.0-detour-fake",
                        "platform": "linux/amd64"}),
            ))
        }
        _ => {}
    }
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let route = route(&path).ok_or_else(ApiError::no_resource)?;
    let rt = shared
        .store()
        .resource_type(&route.group, &route.version, &route.plural)
        .ok_or_else(ApiError::no_resource)?;
    let target = match route.subresource.as_deref() {
        None => Target::Object,
        Some("status") if rt.status => Target::Status,
        Some(_) => return Err(ApiError::no_resource()),
    };
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
    let namespace = route.namespace.as_deref();
    let method = request.method().clone();
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?
        .to_bytes();
    let ok = |object: Value| json_response(StatusCode::OK, &object);
    match (method, route.name.as_deref()) {
        (Method::GET, Some(name)) => Ok(ok(shared.store().get(&rt, namespace, name)?)),
        (Method::GET, None) => {
            let filter = filter(&query, namespace)?;
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                watch(shared, rt, filter, &query)
            } else {
                Ok(ok(shared.store().list(&rt, &filter)))
            }
        }
        (Method::POST, None) => {
            let object = shared
                .store()
                .create(&rt, namespace, parse_json(&body)?, dry_run)?;
            Ok(json_response(StatusCode::CREATED, &object))
        }
        (Method::PUT, Some(name)) => {
            let write = Write::Replace(parse_json(&body)?);
            Ok(ok(shared
                .store()
                .write(&rt, namespace, name, write, target, dry_run)?))
        }
        (Method::PATCH, Some(name)) => {
            let write = match content_type.as_str() {
                "application/apply-patch+yaml" => Write::Apply(parse_yaml(&body)?),
                "application/merge-patch+json" => Write::MergePatch(parse_json(&body)?),
                // Read as a JSON merge patch: the same for objects without lists, which
                // is all its users here send (kube-lease-manager's Lease renewals).
                "application/strategic-merge-patch+json" => Write::MergePatch(parse_json(&body)?),
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the fake API server takes apply and merge patches, not {other:?}"),
                    ))
                }
            };
            Ok(ok(shared
                .store()
                .write(&rt, namespace, name, write, target, dry_run)?))
        }
        (Method::DELETE, Some(name)) if target == Target::Object => {
            Ok(ok(shared.store().delete(&rt, namespace, name, dry_run)?))
        }
        (method, _) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        )),
    }
}

fn filter(query: &HashMap<String, String>, namespace: Option<&str>) -> Result<Filter, ApiError> {
    Ok(Filter {
        namespace: namespace.map(Into::into),
        labels: selector::parse_labels(query.get("labelSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?,
        fields: selector::parse_fields(query.get("fieldSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?,
    })
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

/// An apply patch: YAML, of which JSON (what kube sends) is a subset.
fn parse_yaml(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).or_else(|_| {
        let text = std::str::from_utf8(body)
            .map_err(|e| ApiError::bad_request(format!("the apply patch is not UTF-8: {e}")))?;
        serde_saphyr::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("the apply patch is not YAML: {e}")))
    })
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed_unsync())
        .expect("a static response builds")
}

fn text_response(text: &'static str) -> Response<Body> {
    Response::builder()
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from_static(text.as_bytes())).boxed_unsync())
        .expect("a static response builds")
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": event_type, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(rt: &ResourceType, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata}),
    )
}

/// One open watch, as the response body's stream state.
struct Watch {
    shared: Arc<Shared>,
    rt: ResourceType,
    filter: Filter,
    changes: Changes,
    pending: VecDeque<Bytes>,
    bookmarks: Option<tokio::time::Interval>,
    deadline: tokio::time::Instant,
}

impl Watch {
    fn push(&mut self, change: &Change) {
        if let Some(event_type) = change.event_type(&self.filter) {
            self.pending
                .push_back(event_line(event_type, &change.object));
        }
    }

    /// The next line to send, or `None` when the watch is over.
    async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(line);
            }
            tokio::select! {
                change = self.changes.recv() => self.push(&*change?),
                () = tick(&mut self.bookmarks) => {
                    let shared = self.shared.clone();
                    let store = shared.store();
                    // Under the lock nothing new is queued: every change up to `rv` is
                    // now in `pending`, ahead of the bookmark.
                    while let Ok(change) = self.changes.try_recv() {
                        self.push(&change);
                    }
                    let rv = store.resource_version();
                    drop(store);
                    self.pending.push_back(bookmark(&self.rt, rv, false));
                }
                () = tokio::time::sleep_until(self.deadline) => return None,
            }
        }
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn watch(
    shared: &Arc<Shared>,
    rt: ResourceType,
    filter: Filter,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let timeout =
        match query.get("timeoutSeconds") {
            Some(seconds) => Duration::from_secs(seconds.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid timeoutSeconds {seconds:?}"))
            })?),
            None => DEFAULT_WATCH_TIMEOUT,
        };
    let initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let mut store = shared.store();
    let (backlog, changes) = match store.watch(&rt, if initial_events { None } else { from }) {
        Ok(opened) => opened,
        Err(error) if error.code == 410 => {
            let line = event_line("ERROR", &error.status());
            return Ok(stream_response(futures::stream::iter([line])));
        }
        Err(error) => return Err(error),
    };
    let rv = store.resource_version();
    drop(store);
    let period = shared.bookmark_interval;
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true")
        .then(|| tokio::time::interval_at(tokio::time::Instant::now() + period, period));
    let mut watch = Watch {
        shared: shared.clone(),
        rt: rt.clone(),
        filter,
        changes,
        pending: VecDeque::new(),
        bookmarks,
        deadline: tokio::time::Instant::now() + timeout,
    };
    for change in &backlog {
        watch.push(change);
    }
    if initial_events {
        watch.pending.push_back(bookmark(&rt, rv, true));
    }
    let lines = futures::stream::unfold(watch, |mut watch| async move {
        let line = watch.next_line().await?;
        Some((line, watch))
    });
    Ok(stream_response(lines))
}

fn stream_response(lines: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response<Body> {
    use futures::StreamExt as _;
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(
            StreamBody::new(lines.map(|line| Ok::<_, Infallible>(Frame::data(line))))
                .boxed_unsync(),
        )
        .expect("a static response builds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_like_kube_apiserver() {
        let r = route("/api/v1/namespaces/default/services/reviews").unwrap();
        assert_eq!(
            (
                r.group.as_str(),
                r.namespace.as_deref(),
                r.plural.as_str(),
                r.name.as_deref()
            ),
            ("", Some("default"), "services", Some("reviews"))
        );
        let r = route("/api/v1/namespaces/default").unwrap();
        assert_eq!(
            (r.plural.as_str(), r.name.as_deref()),
            ("namespaces", Some("default"))
        );
        let r = route("/api/v1/namespaces/default/status").unwrap();
        assert_eq!(r.subresource.as_deref(), Some("status"));
        let r = route("/apis/failover.detour.io/v1alpha1/namespaces/ns/failoverservices/f/status")
            .unwrap();
        assert_eq!(
            (
                r.group.as_str(),
                r.version.as_str(),
                r.subresource.as_deref()
            ),
            ("failover.detour.io", "v1alpha1", Some("status"))
        );
        let r = route("/apis/discovery.k8s.io/v1/endpointslices").unwrap();
        assert_eq!((r.namespace, r.name), (None, None));
        assert_eq!(route("/metrics"), None);
        assert_eq!(route("/api/v1/a/b/c/d"), None);
    }
}
