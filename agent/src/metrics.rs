//! Prometheus metrics: a [`Snapshot`] of counters and gauges → the text exposition format
//! (0.0.4) → a minimal HTTP/1.1 server that answers `GET /metrics`.
//!
//! The agent fills a [`Snapshot`] on each scrape from whatever state it keeps; this module
//! knows nothing of that state, so [`render`] is a pure function and is tested as one.
//! [`serve`] is the I/O edge: it calls the caller's render future once per scrape.
//!
//! Invariants:
//! - label sets are bounded by construction: series exist only for the configured
//!   services and backends (and the fixed `kind`/`result` values), never for peers,
//!   clients or error strings, so the number of series follows the configuration, not the
//!   traffic. A removed backend's series disappear with it (Prometheus marks them stale);
//! - each metric family is written as one contiguous group behind its `# HELP` and
//!   `# TYPE` lines, as the format requires; the family is written (with no samples) even
//!   when the snapshot has nothing for it, so its documentation is always discoverable;
//! - series follow the order of `Snapshot::backends` and `Snapshot::services`; the caller
//!   keeps (service, backend) pairs and services unique, as duplicates are invalid
//!   exposition;
//! - label values are escaped (`\` → `\\`, `"` → `\"`, newline → `\n`), so a configured
//!   name can never break the output;
//! - the server never lets one client stall another or the agent: every connection runs in
//!   its own task, at most [`MAX_CONNECTIONS`] at a time, and reading the request head is
//!   bounded in size ([`MAX_REQUEST_HEAD`]) and time ([`REQUEST_HEAD_TIMEOUT`]), writing
//!   the response in time ([`RESPONSE_TIMEOUT`]). Errors are logged and end only the
//!   connection they happened on.

use std::fmt::{self, Display, Write as _};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Largest request head (request line and headers) the server reads; a longer one is
/// answered with 431. A scrape's head is a few hundred bytes.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// How long a client has to send its whole request head; then it gets 408 and is closed.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client has to take the whole response.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// Everything one scrape exposes. Counters are totals since the agent started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub backends: Vec<BackendMetrics>,
    pub services: Vec<ServiceMetrics>,
    /// Events the kernel dropped because the ring buffer was full.
    pub events_dropped: u64,
    pub events_received: u64,
    /// Seconds from a change (config, health, ejection) to the maps being written.
    pub reconcile: Histogram,
    pub config_reloads_ok: u64,
    pub config_reloads_failed: u64,
    pub sockets_destroyed: u64,
    /// The kernel's fast path: connects whose first pick was suspect and that went to
    /// another table member, to the standby set, or (all suspect) to the first pick.
    pub fast_path_avoided: u64,
    pub fast_path_standby: u64,
    pub fast_path_all_suspect: u64,
}

/// One configured service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceMetrics {
    pub service: String,
    /// Name of the best tier currently serving.
    pub tier: String,
    pub panic: bool,
    pub backends_in_table: u64,
}

/// One backend of one configured service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendMetrics {
    pub service: String,
    /// `ip:port`.
    pub backend: String,
    pub locality: String,
    pub connects: u64,
    pub established: u64,
    pub failures_refused: u64,
    pub failures_timeout: u64,
    pub failures_reset: u64,
    pub ejections: u64,
    pub ejected: bool,
    /// `None` when the service has no active health check.
    pub healthy: Option<bool>,
    pub in_table: bool,
}

/// Upper bounds of [`Histogram`]'s buckets: 100 µs to 10 s in 1–2.5–5 steps, which covers
/// a map write (well under a millisecond) up to a reconcile stuck behind a slow API.
pub const HISTOGRAM_BUCKETS: [Duration; 16] = [
    Duration::from_micros(100),
    Duration::from_micros(250),
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_micros(2_500),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_millis(2_500),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

/// A latency histogram with the fixed [`HISTOGRAM_BUCKETS`]. The agent keeps one and
/// clones it into each [`Snapshot`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last slot holds those above the
    /// largest bound.
    counts: [u64; HISTOGRAM_BUCKETS.len() + 1],
    sum: Duration,
    count: u64,
}

impl Histogram {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one observation. Bounds are inclusive, as Prometheus' `le` says.
    pub fn observe(&mut self, value: Duration) {
        let bucket = HISTOGRAM_BUCKETS.partition_point(|bound| *bound < value);
        self.counts[bucket] += 1;
        self.sum = self.sum.saturating_add(value);
        self.count += 1;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the observations.
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// `(upper bound, observations ≤ bound)` for each finite bucket, in increasing order;
    /// the `+Inf` bucket is [`Histogram::count`].
    pub fn cumulative(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        HISTOGRAM_BUCKETS
            .iter()
            .zip(&self.counts)
            .scan(0u64, |total, (bound, n)| {
                *total += n;
                Some((*bound, *total))
            })
    }
}

/// The snapshot in the text exposition format 0.0.4, ending with a newline.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = Exposition::default();
    let backends = &snapshot.backends;

    out.family(
        "detour_backend_connects_total",
        "counter",
        "Connections to the backend that the agent's programs saw being attempted.",
    );
    for b in backends {
        out.sample(
            "detour_backend_connects_total",
            &backend_labels(b),
            b.connects,
        );
    }
    out.family(
        "detour_backend_established_total",
        "counter",
        "Connections to the backend that were established.",
    );
    for b in backends {
        out.sample(
            "detour_backend_established_total",
            &backend_labels(b),
            b.established,
        );
    }
    out.family(
        "detour_backend_failures_total",
        "counter",
        "Connections to the backend that failed, by kind: refused, timeout or reset.",
    );
    for b in backends {
        let [service, backend, locality] = backend_labels(b);
        for (kind, n) in [
            ("refused", b.failures_refused),
            ("timeout", b.failures_timeout),
            ("reset", b.failures_reset),
        ] {
            let labels = [service, backend, locality, ("kind", kind)];
            out.sample("detour_backend_failures_total", &labels, n);
        }
    }
    out.family(
        "detour_backend_ejections_total",
        "counter",
        "Times outlier detection ejected the backend.",
    );
    for b in backends {
        out.sample(
            "detour_backend_ejections_total",
            &backend_labels(b),
            b.ejections,
        );
    }
    out.family(
        "detour_backend_ejected",
        "gauge",
        "1 while outlier detection keeps the backend ejected, else 0.",
    );
    for b in backends {
        out.sample(
            "detour_backend_ejected",
            &backend_labels(b),
            u8::from(b.ejected),
        );
    }
    out.family(
        "detour_backend_healthy",
        "gauge",
        "1 if the active health check passes, 0 if it fails; absent when not checked.",
    );
    for b in backends {
        if let Some(healthy) = b.healthy {
            out.sample(
                "detour_backend_healthy",
                &backend_labels(b),
                u8::from(healthy),
            );
        }
    }
    out.family(
        "detour_backend_in_table",
        "gauge",
        "1 if the backend is in the service's kernel table, else 0.",
    );
    for b in backends {
        out.sample(
            "detour_backend_in_table",
            &backend_labels(b),
            u8::from(b.in_table),
        );
    }

    let services = &snapshot.services;
    out.family(
        "detour_service_panic",
        "gauge",
        "1 while the service is in panic mode (too few usable backends; all are used), else 0.",
    );
    for s in services {
        let labels = [("service", s.service.as_str())];
        out.sample("detour_service_panic", &labels, u8::from(s.panic));
    }
    out.family(
        "detour_service_backends_in_table",
        "gauge",
        "Backends in the service's kernel table.",
    );
    for s in services {
        let labels = [("service", s.service.as_str())];
        out.sample(
            "detour_service_backends_in_table",
            &labels,
            s.backends_in_table,
        );
    }
    out.family(
        "detour_service_tier_info",
        "gauge",
        "Always 1; the tier label names the best tier currently serving the service.",
    );
    for s in services {
        let labels = [("service", s.service.as_str()), ("tier", s.tier.as_str())];
        out.sample("detour_service_tier_info", &labels, 1);
    }

    out.family(
        "detour_events_received_total",
        "counter",
        "Connection events read from the kernel ring buffer.",
    );
    out.sample(
        "detour_events_received_total",
        &[],
        snapshot.events_received,
    );
    out.family(
        "detour_events_dropped_total",
        "counter",
        "Connection events the kernel dropped because the ring buffer was full.",
    );
    out.sample("detour_events_dropped_total", &[], snapshot.events_dropped);

    let reconcile = &snapshot.reconcile;
    out.family(
        "detour_reconcile_duration_seconds",
        "histogram",
        "Seconds from a change (config, health, ejection) to the BPF maps being written.",
    );
    for (bound, n) in reconcile.cumulative() {
        let le = bound.as_secs_f64().to_string();
        let labels = [("le", le.as_str())];
        out.sample("detour_reconcile_duration_seconds_bucket", &labels, n);
    }
    let labels = [("le", "+Inf")];
    out.sample(
        "detour_reconcile_duration_seconds_bucket",
        &labels,
        reconcile.count(),
    );
    let sum = reconcile.sum().as_secs_f64();
    out.sample("detour_reconcile_duration_seconds_sum", &[], sum);
    out.sample(
        "detour_reconcile_duration_seconds_count",
        &[],
        reconcile.count(),
    );

    out.family(
        "detour_config_reloads_total",
        "counter",
        "Configuration reloads, by result: ok or error.",
    );
    let labels = [("result", "ok")];
    out.sample(
        "detour_config_reloads_total",
        &labels,
        snapshot.config_reloads_ok,
    );
    let labels = [("result", "error")];
    out.sample(
        "detour_config_reloads_total",
        &labels,
        snapshot.config_reloads_failed,
    );
    out.family(
        "detour_sockets_destroyed_total",
        "counter",
        "Client sockets the agent destroyed because their backend left the table.",
    );
    out.sample(
        "detour_sockets_destroyed_total",
        &[],
        snapshot.sockets_destroyed,
    );
    out.family(
        "detour_fast_path_connects_total",
        "counter",
        "Connects whose random pick the kernel found suspect, by where they went: another table member, the standby set, or the pick anyway (all suspect).",
    );
    for (path, value) in [
        ("avoided", snapshot.fast_path_avoided),
        ("standby", snapshot.fast_path_standby),
        ("all-suspect", snapshot.fast_path_all_suspect),
    ] {
        out.sample("detour_fast_path_connects_total", &[("path", path)], value);
    }

    out.text
}

fn backend_labels(b: &BackendMetrics) -> [(&'static str, &str); 3] {
    [
        ("service", b.service.as_str()),
        ("backend", b.backend.as_str()),
        ("locality", b.locality.as_str()),
    ]
}

/// The text being built; writing to a `String` cannot fail, so these helpers drop the
/// `fmt::Result`.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", LabelValue(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// A label value escaped as the exposition format requires.
struct LabelValue<'a>(&'a str);

impl Display for LabelValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Serves `GET /metrics` (and `HEAD`) on `listener` until the task running it is dropped.
///
/// `render` is called once per scrape and its future produces the body, normally
/// [`render`] of a snapshot built from the agent's state. It is a closure returning a
/// future, rather than a `String`, so that the snapshot can be taken under an async lock:
///
/// ```no_run
/// use std::sync::Arc;
/// use detour_agent::metrics::{self, Snapshot};
///
/// # async fn example() -> std::io::Result<()> {
/// let state = Arc::new(tokio::sync::Mutex::new(Snapshot::default()));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// tokio::spawn(metrics::serve(listener, move || {
///     let state = state.clone();
///     async move { metrics::render(&*state.lock().await) }
/// }));
/// # Ok(())
/// # }
/// ```
///
/// Other paths get 404, other methods 405, a malformed request 400, an HTTP version
/// other than 1.0 or 1.1 505, a request head larger than [`MAX_REQUEST_HEAD`] 431, a
/// client slower than [`REQUEST_HEAD_TIMEOUT`] 408. Every response closes the connection.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    serve_with(listener, Arc::new(render), Limits::default()).await
}

/// The server's bounds; only tests change them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_head: usize,
    head_timeout: Duration,
    response_timeout: Duration,
    /// How long to keep reading (and discarding) after the response, so that unread
    /// request bytes do not make the kernel reset the connection before the client has
    /// read the response.
    linger: Duration,
    max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head: MAX_REQUEST_HEAD,
            head_timeout: REQUEST_HEAD_TIMEOUT,
            response_timeout: RESPONSE_TIMEOUT,
            linger: Duration::from_secs(1),
            max_connections: MAX_CONNECTIONS,
        }
    }
}

async fn serve_with<F, Fut>(listener: TcpListener, render: Arc<F>, limits: Limits)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // Taking a slot before accepting leaves excess clients in the kernel's backlog
        // instead of in memory here.
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually out of file descriptors; pausing lets some close instead of
                // spinning on the error.
                warn!(%error, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            if let Err(error) = handle(stream, peer, &*render, limits).await {
                debug!(%peer, %error, "metrics: connection failed");
            }
            drop(slot);
        });
    }
}

/// What a request asks for, once its head is read and parsed.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    Error(Status),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    HeadTooLarge,
    VersionNotSupported,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::RequestTimeout => "408 Request Timeout",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::VersionNotSupported => "505 HTTP Version Not Supported",
        }
    }
}

async fn handle<F, Fut>(
    mut stream: TcpStream,
    peer: SocketAddr,
    render: &F,
    limits: Limits,
) -> io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let route =
        match tokio::time::timeout(limits.head_timeout, read_head(&mut stream, limits.max_head))
            .await
        {
            Ok(Ok(Some(head))) => route(&head),
            Ok(Ok(None)) => Route::Error(Status::HeadTooLarge),
            Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                // Closed before a whole request: a port probe, nothing to answer.
                debug!(%peer, "metrics: connection closed before a request");
                return Ok(());
            }
            Ok(Err(error)) => return Err(error),
            Err(_elapsed) => Route::Error(Status::RequestTimeout),
        };

    let response = match route {
        Route::Metrics { head_only } => {
            let body = render().await;
            response(Status::Ok, CONTENT_TYPE, &body, head_only)
        }
        Route::Error(status) => {
            debug!(%peer, status = status.line(), "metrics: request refused");
            let body = format!("{}\n", status.line());
            response(status, "text/plain; charset=utf-8", &body, false)
        }
    };
    tokio::time::timeout(limits.response_timeout, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_elapsed| io::Error::new(io::ErrorKind::TimedOut, "writing the response"))??;

    // The client may still be sending (an oversized head, a body we never read); closing
    // with unread bytes would reset the connection and could discard the response before
    // the client reads it. Drain for a bounded time and amount instead.
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    let _ = tokio::time::timeout(limits.linger, async {
        while drained < 64 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    Ok(())
}

/// Reads up to the blank line that ends the request head. `Ok(None)` when the head does
/// not fit in `max` bytes; `UnexpectedEof` when the client closes first.
async fn read_head(stream: &mut TcpStream, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; max];
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Only the new bytes and the two before them can complete the blank line, so a
        // client trickling bytes costs linear, not quadratic, time.
        let from = filled.saturating_sub(2);
        filled += n;
        if let Some(end) = head_end(&buf[..filled], from) {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if filled == max {
            return Ok(None);
        }
    }
}

/// Where the head ends, searching from `from`: after the first empty line. Bare LF line
/// ends are accepted, as RFC 9112 §2.2 allows.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find_map(|i| match &buf[i..] {
        [b'\n', b'\n', ..] => Some(i + 2),
        [b'\n', b'\r', b'\n', ..] => Some(i + 3),
        _ => None,
    })
}

/// Parses the request head (without the request body, which is never read).
fn route(head: &[u8]) -> Route {
    let Ok(head) = std::str::from_utf8(head) else {
        return Route::Error(Status::BadRequest);
    };
    let mut lines = head.lines();
    let Some(request_line) = lines.next() else {
        return Route::Error(Status::BadRequest);
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Error(Status::BadRequest);
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(method) || !target.starts_with('/') {
        return Route::Error(Status::BadRequest);
    }
    match version.strip_prefix("HTTP/") {
        Some("1.0" | "1.1") => {}
        Some(v) if v.len() == 3 && v.as_bytes()[1] == b'.' => {
            return Route::Error(Status::VersionNotSupported)
        }
        _ => return Route::Error(Status::BadRequest),
    }
    for line in lines.take_while(|l| !l.is_empty()) {
        // A field line is `name: value`; a line starting with whitespace would be the
        // obsolete line folding, which RFC 9112 §5.2 lets a server reject.
        match line.split_once(':') {
            Some((name, _value)) if token(name) => {}
            _ => return Route::Error(Status::BadRequest),
        }
    }

    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    if path != "/metrics" {
        return Route::Error(Status::NotFound);
    }
    match method {
        "GET" => Route::Metrics { head_only: false },
        "HEAD" => Route::Metrics { head_only: true },
        _ => Route::Error(Status::MethodNotAllowed),
    }
}

fn response(status: Status, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        status.line(),
        body.len(),
    );
    if status == Status::MethodNotAllowed {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    let mut response = head.into_bytes();
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(service: &str, backend: &str, locality: &str) -> BackendMetrics {
        BackendMetrics {
            service: service.into(),
            backend: backend.into(),
            locality: locality.into(),
            ..BackendMetrics::default()
        }
    }

    fn small_snapshot() -> Snapshot {
        let mut reconcile = Histogram::new();
        reconcile.observe(Duration::from_micros(300));
        reconcile.observe(Duration::from_millis(2));
        Snapshot {
            backends: vec![
                BackendMetrics {
                    connects: 10,
                    established: 7,
                    failures_refused: 1,
                    failures_timeout: 2,
                    failures_reset: 0,
                    ejections: 1,
                    ejected: true,
                    healthy: Some(false),
                    in_table: false,
                    ..backend("web", "10.0.0.1:80", "eu/a")
                },
                BackendMetrics {
                    connects: 3,
                    established: 3,
                    healthy: None,
                    in_table: true,
                    ..backend("web", "10.0.0.2:80", "eu/b")
                },
            ],
            services: vec![ServiceMetrics {
                service: "web".into(),
                tier: "same-region".into(),
                panic: false,
                backends_in_table: 1,
            }],
            events_dropped: 4,
            events_received: 100,
            reconcile,
            config_reloads_ok: 2,
            config_reloads_failed: 1,
            sockets_destroyed: 5,
            fast_path_avoided: 6,
            fast_path_standby: 7,
            fast_path_all_suspect: 8,
        }
    }

    #[test]
    fn renders_a_small_snapshot_exactly() {
        let expected = r#"# HELP detour_backend_connects_total Connections to the backend that the agent's programs saw being attempted.
# TYPE detour_backend_connects_total counter
detour_backend_connects_total{service="web",backend="10.0.0.1:80",locality="eu/a"} 10
detour_backend_connects_total{service="web",backend="10.0.0.2:80",locality="eu/b"} 3
# HELP detour_backend_established_total Connections to the backend that were established.
# TYPE detour_backend_established_total counter
detour_backend_established_total{service="web",backend="10.0.0.1:80",locality="eu/a"} 7
detour_backend_established_total{service="web",backend="10.0.0.2:80",locality="eu/b"} 3
# HELP detour_backend_failures_total Connections to the backend that failed, by kind: refused, timeout or reset.
# TYPE detour_backend_failures_total counter
detour_backend_failures_total{service="web",backend="10.0.0.1:80",locality="eu/a",kind="refused"} 1
detour_backend_failures_total{service="web",backend="10.0.0.1:80",locality="eu/a",kind="timeout"} 2
detour_backend_failures_total{service="web",backend="10.0.0.1:80",locality="eu/a",kind="reset"} 0
detour_backend_failures_total{service="web",backend="10.0.0.2:80",locality="eu/b",kind="refused"} 0
detour_backend_failures_total{service="web",backend="10.0.0.2:80",locality="eu/b",kind="timeout"} 0
detour_backend_failures_total{service="web",backend="10.0.0.2:80",locality="eu/b",kind="reset"} 0
# HELP detour_backend_ejections_total Times outlier detection ejected the backend.
# TYPE detour_backend_ejections_total counter
detour_backend_ejections_total{service="web",backend="10.0.0.1:80",locality="eu/a"} 1
detour_backend_ejections_total{service="web",backend="10.0.0.2:80",locality="eu/b"} 0
# HELP detour_backend_ejected 1 while outlier detection keeps the backend ejected, else 0.
# TYPE detour_backend_ejected gauge
detour_backend_ejected{service="web",backend="10.0.0.1:80",locality="eu/a"} 1
detour_backend_ejected{service="web",backend="10.0.0.2:80",locality="eu/b"} 0
# HELP detour_backend_healthy 1 if the active health check passes, 0 if it fails; absent when not checked.
# TYPE detour_backend_healthy gauge
detour_backend_healthy{service="web",backend="10.0.0.1:80",locality="eu/a"} 0
# HELP detour_backend_in_table 1 if the backend is in the service's kernel table, else 0.
# TYPE detour_backend_in_table gauge
detour_backend_in_table{service="web",backend="10.0.0.1:80",locality="eu/a"} 0
detour_backend_in_table{service="web",backend="10.0.0.2:80",locality="eu/b"} 1
# HELP detour_service_panic 1 while the service is in panic mode (too few usable backends; all are used), else 0.
# TYPE detour_service_panic gauge
detour_service_panic{service="web"} 0
# HELP detour_service_backends_in_table Backends in the service's kernel table.
# TYPE detour_service_backends_in_table gauge
detour_service_backends_in_table{service="web"} 1
# HELP detour_service_tier_info Always 1; the tier label names the best tier currently serving the service.
# TYPE detour_service_tier_info gauge
detour_service_tier_info{service="web",tier="same-region"} 1
# HELP detour_events_received_total Connection events read from the kernel ring buffer.
# TYPE detour_events_received_total counter
detour_events_received_total 100
# HELP detour_events_dropped_total Connection events the kernel dropped because the ring buffer was full.
# TYPE detour_events_dropped_total counter
detour_events_dropped_total 4
# HELP detour_reconcile_duration_seconds Seconds from a change (config, health, ejection) to the BPF maps being written.
# TYPE detour_reconcile_duration_seconds histogram
detour_reconcile_duration_seconds_bucket{le="0.0001"} 0
detour_reconcile_duration_seconds_bucket{le="0.00025"} 0
detour_reconcile_duration_seconds_bucket{le="0.0005"} 1
detour_reconcile_duration_seconds_bucket{le="0.001"} 1
detour_reconcile_duration_seconds_bucket{le="0.0025"} 2
detour_reconcile_duration_seconds_bucket{le="0.005"} 2
detour_reconcile_duration_seconds_bucket{le="0.01"} 2
detour_reconcile_duration_seconds_bucket{le="0.025"} 2
detour_reconcile_duration_seconds_bucket{le="0.05"} 2
detour_reconcile_duration_seconds_bucket{le="0.1"} 2
detour_reconcile_duration_seconds_bucket{le="0.25"} 2
detour_reconcile_duration_seconds_bucket{le="0.5"} 2
detour_reconcile_duration_seconds_bucket{le="1"} 2
detour_reconcile_duration_seconds_bucket{le="2.5"} 2
detour_reconcile_duration_seconds_bucket{le="5"} 2
detour_reconcile_duration_seconds_bucket{le="10"} 2
detour_reconcile_duration_seconds_bucket{le="+Inf"} 2
detour_reconcile_duration_seconds_sum 0.0023
detour_reconcile_duration_seconds_count 2
# HELP detour_config_reloads_total Configuration reloads, by result: ok or error.
# TYPE detour_config_reloads_total counter
detour_config_reloads_total{result="ok"} 2
detour_config_reloads_total{result="error"} 1
# HELP detour_sockets_destroyed_total Client sockets the agent destroyed because their backend left the table.
# TYPE detour_sockets_destroyed_total counter
detour_sockets_destroyed_total 5
# HELP detour_fast_path_connects_total Connects whose random pick the kernel found suspect, by where they went: another table member, the standby set, or the pick anyway (all suspect).
# TYPE detour_fast_path_connects_total counter
detour_fast_path_connects_total{path="avoided"} 6
detour_fast_path_connects_total{path="standby"} 7
detour_fast_path_connects_total{path="all-suspect"} 8
"#;
        let rendered = render(&small_snapshot());
        for (i, (got, want)) in rendered.lines().zip(expected.lines()).enumerate() {
            assert_eq!(got, want, "line {}", i + 1);
        }
        assert_eq!(rendered.lines().count(), expected.lines().count());
        assert_eq!(
            rendered, expected,
            "same lines, so only the final newline differs"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let snapshot = Snapshot {
            services: vec![ServiceMetrics {
                service: "a\\b\"c\nd".into(),
                tier: "failover[0]:x\"y".into(),
                ..ServiceMetrics::default()
            }],
            ..Snapshot::default()
        };
        let rendered = render(&snapshot);
        assert!(
            rendered.contains(
                r#"detour_service_tier_info{service="a\\b\"c\nd",tier="failover[0]:x\"y"} 1"#
            ),
            "{rendered}"
        );
        // The newline in the name did not split the sample.
        assert!(rendered
            .lines()
            .all(|l| l.starts_with('#') || parse_sample(l).is_some()));
    }

    #[test]
    fn families_without_samples_still_carry_their_documentation() {
        let rendered = render(&Snapshot::default());
        for name in [
            "detour_backend_connects_total",
            "detour_backend_healthy",
            "detour_service_tier_info",
        ] {
            assert!(rendered.contains(&format!("# TYPE {name} ")), "{name}");
            assert!(
                !rendered
                    .lines()
                    .any(|l| l.starts_with(&format!("{name}{{"))),
                "{name}"
            );
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        let mut h = Histogram::new();
        h.observe(Duration::ZERO);
        h.observe(Duration::from_micros(100)); // exactly on a bound: counts in it
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(3));
        h.observe(Duration::from_secs(60)); // above every bound: only in +Inf
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum(), Duration::from_micros(63_000_201));
        let buckets: Vec<_> = h.cumulative().collect();
        assert_eq!(buckets.len(), HISTOGRAM_BUCKETS.len());
        assert_eq!(buckets[0], (Duration::from_micros(100), 2));
        assert_eq!(buckets[1], (Duration::from_micros(250), 3));
        assert_eq!(buckets[13], (Duration::from_millis(2_500), 3));
        assert_eq!(buckets[14], (Duration::from_secs(5), 4));
        assert_eq!(buckets[15], (Duration::from_secs(10), 4));
        assert!(buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));

        let rendered = render(&Snapshot {
            reconcile: h,
            ..Snapshot::default()
        });
        for line in [
            r#"detour_reconcile_duration_seconds_bucket{le="0.0001"} 2"#,
            r#"detour_reconcile_duration_seconds_bucket{le="10"} 4"#,
            r#"detour_reconcile_duration_seconds_bucket{le="+Inf"} 5"#,
            "detour_reconcile_duration_seconds_sum 63.000201",
            "detour_reconcile_duration_seconds_count 5",
        ] {
            assert!(rendered.lines().any(|l| l == line), "{line} in\n{rendered}");
        }
    }

    #[test]
    fn histogram_sum_saturates_instead_of_panicking() {
        let mut h = Histogram::new();
        h.observe(Duration::MAX);
        h.observe(Duration::MAX);
        assert_eq!(h.sum(), Duration::MAX);
        assert_eq!(h.count(), 2);
    }

    #[test]
    fn routes_requests() {
        let get = |head: &str| route(head.as_bytes());
        let metrics = Route::Metrics { head_only: false };
        assert_eq!(get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), metrics);
        assert_eq!(get("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), metrics);
        assert_eq!(get("GET /metrics HTTP/1.1\nHost: x\n\n"), metrics);
        assert_eq!(
            get("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        let error = |status| Route::Error(status);
        assert_eq!(get("GET / HTTP/1.1\r\n\r\n"), error(Status::NotFound));
        assert_eq!(
            get("GET /metricsx HTTP/1.1\r\n\r\n"),
            error(Status::NotFound)
        );
        assert_eq!(
            get("POST /metrics HTTP/1.1\r\n\r\n"),
            error(Status::MethodNotAllowed)
        );
        assert_eq!(
            get("GET /metrics HTTP/2.0\r\n\r\n"),
            error(Status::VersionNotSupported)
        );
        for bad in [
            "\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 x\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET /metrics SPDY/3\r\n\r\n",
            "G(T /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        ] {
            assert_eq!(get(bad), error(Status::BadRequest), "{bad:?}");
        }
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nX: \xff\r\n\r\n"),
            error(Status::BadRequest)
        );
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody", 0), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nbody", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\r\n\n", 0), Some(22));
        // The search resumes two bytes before the previous end of the buffer.
        let head = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(head_end(head, head.len() - 1 - 2), Some(18));
    }

    /// `name{labels} value` with valid names, quoted and escaped label values and a
    /// number; returns the name.
    fn parse_sample(line: &str) -> Option<&str> {
        let is_name = |s: &str| {
            let mut bytes = s.bytes();
            bytes
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        };
        let name_end = line.find(['{', ' '])?;
        let name = &line[..name_end];
        if !is_name(name) {
            return None;
        }
        let mut rest = &line[name_end..];
        if let Some(mut labels) = rest.strip_prefix('{') {
            loop {
                let (label, value) = labels.split_once("=\"")?;
                if !is_name(label) {
                    return None;
                }
                // Find the closing quote, skipping escapes.
                let mut chars = value.char_indices();
                let close = loop {
                    match chars.next()? {
                        (_, '\\') => match chars.next()? {
                            (_, '\\' | '"' | 'n') => {}
                            _ => return None,
                        },
                        (_, '\n') => return None,
                        (i, '"') => break i,
                        _ => {}
                    }
                };
                labels = &value[close + 1..];
                if let Some(more) = labels.strip_prefix(',') {
                    labels = more;
                } else {
                    rest = labels.strip_prefix('}')?;
                    break;
                }
            }
        }
        let value = rest.strip_prefix(' ')?;
        match value {
            "+Inf" | "-Inf" | "NaN" => Some(name),
            v => v.parse::<f64>().ok().map(|_| name),
        }
    }

    async fn start(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = || async { render(&small_snapshot()) };
        tokio::spawn(serve_with(listener, Arc::new(body), limits));
        addr
    }

    /// Sends `request` raw and reads until the server closes: (status code, headers, body).
    async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
            .await
            .expect("the server closes the connection")
            .unwrap();
        let response = String::from_utf8(response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("a whole head");
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        (status, head.to_owned(), body.to_owned())
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let addr = start(Limits::default()).await;
        let (status, head, body) = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(header(&head, "content-type"), Some(CONTENT_TYPE));
        assert_eq!(header(&head, "connection"), Some("close"));
        assert_eq!(
            header(&head, "content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(body, render(&small_snapshot()));
        let mut samples = 0;
        for line in body.lines() {
            if line.starts_with('#') {
                continue;
            }
            assert!(parse_sample(line).is_some(), "not a sample: {line:?}");
            samples += 1;
        }
        assert_eq!(samples, 47);

        let (status, head, body) = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 200);
        assert!(body.is_empty());
        assert_ne!(header(&head, "content-length"), Some("0"));
    }

    #[tokio::test]
    async fn serves_a_request_trickled_byte_by_byte() {
        let addr = start(Limits::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" {
            stream.write_all(&[*byte]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"));
    }

    #[tokio::test]
    async fn answers_other_paths_methods_and_malformed_requests_with_errors() {
        let addr = start(Limits::default()).await;
        let (status, _, _) = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status, 404);
        let (status, head, _) = exchange(addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status, 405);
        assert_eq!(header(&head, "allow"), Some("GET, HEAD"));
        let (status, _, _) = exchange(addr, b"hello\r\n\r\n").await;
        assert_eq!(status, 400);
    }

    #[tokio::test]
    async fn refuses_an_oversized_head_and_closes() {
        let addr = start(Limits::default()).await;
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
        request.resize(request.len() + 2 * MAX_REQUEST_HEAD, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        // `exchange` returns only once the server has closed the connection.
        let (status, head, _) = exchange(addr, &request).await;
        assert_eq!(status, 431);
        assert_eq!(header(&head, "connection"), Some("close"));
    }

    #[tokio::test]
    async fn a_slow_client_times_out_without_blocking_others() {
        let limits = Limits {
            head_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let addr = start(limits).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();

        // Another scrape is served while the slow one is waiting.
        let (status, _, _) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 200);

        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut response))
            .await
            .expect("the server closes the slow connection")
            .unwrap();
        assert!(response.starts_with(b"HTTP/1.1 408 "), "{response:?}");
    }
}
