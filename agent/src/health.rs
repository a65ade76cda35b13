//! Active health checks: probes → observations → a health verdict per target.
//!
//! [`HealthTracker`] is the pure part (thresholds, no clock, no I/O). [`spawn_probe`]
//! is the I/O part: one tokio task per (service, target) that probes on an interval with
//! jitter and a timeout — a TCP connect, an HTTP/1.1 GET whose status must be one of the
//! expected ones, or a gRPC `grpc.health.v1.Health/Check` that must answer SERVING — and
//! reports *changes* of verdict on a channel, plus every passing probe while the target
//! is ejected (its [`EjectedFlag`] is set), so that a passing check ends an ejection as
//! in Envoy (`successful_active_health_check_uneject_host`) without a message per probe
//! the rest of the time.
//!
//! Invariants:
//! - a target starts `Unknown`, which selection treats as usable, so a new endpoint or a
//!   restarted agent never black-holes a service while waiting for the first probe; the
//!   first probe runs at once;
//! - a verdict flips only after `unhealthy_threshold` consecutive failures or
//!   `healthy_threshold` consecutive successes;
//! - probes connect to backend addresses, never to VIPs, so the connect programs never
//!   rewrite them; every target of every tier is probed at the full rate, so a failover
//!   tier is known good before it is needed;
//! - a backend's answer is read within the probe's timeout and within fixed sizes: at
//!   most [`MAX_STATUS_LINE`] bytes of an HTTP status line (nothing after it is read), a
//!   gRPC header list of at most [`MAX_GRPC_HEADER_LIST`] bytes and a gRPC body of at
//!   most [`MAX_GRPC_BODY`] bytes. Past a bound the probe fails with
//!   [`ProbeError::TooLarge`]: a misbehaving backend costs a failed probe, never memory
//!   without end.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{GrpcCheck, HttpCheck};
use tokio::task::JoinHandle;

/// The longest HTTP status line a probe reads, line ending included.
pub const MAX_STATUS_LINE: usize = 4096;
/// The largest gRPC response body (all DATA frames) a probe accepts; a health response
/// is a handful of bytes.
pub const MAX_GRPC_BODY: usize = 64 * 1024;
/// The largest header list (headers or trailers, as HTTP/2 counts it) a gRPC probe
/// accepts; advertised to the server, which should not send more.
pub const MAX_GRPC_HEADER_LIST: u32 = 16 * 1024;

/// What the checks say about a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    /// Not probed yet; usable.
    Unknown,
    Healthy,
    Unhealthy,
    /// Health checking is disabled for the service; usable.
    Unchecked,
}

impl Health {
    /// Whether selection may put the target in a table.
    pub fn usable(self) -> bool {
        !matches!(self, Health::Unhealthy)
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Unknown => "UNKNOWN",
            Health::Healthy => "HEALTHY",
            Health::Unhealthy => "UNHEALTHY",
            Health::Unchecked => "UNCHECKED",
        })
    }
}

/// Thresholds of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub healthy: u32,
    pub unhealthy: u32,
}

/// Consecutive-result counting for one target.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    thresholds: Thresholds,
    health: Health,
    successes: u32,
    failures: u32,
}

impl HealthTracker {
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            health: Health::Unknown,
            successes: 0,
            failures: 0,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Records one probe result; returns the new verdict if it changed.
    pub fn observe(&mut self, success: bool) -> Option<Health> {
        let before = self.health;
        if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            // From Unknown one success is enough: the target was already usable.
            if self.successes >= self.thresholds.healthy || before == Health::Unknown {
                self.health = Health::Healthy;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.thresholds.unhealthy {
                self.health = Health::Unhealthy;
            }
        }
        (self.health != before).then_some(self.health)
    }
}

/// A change of verdict, or a passing probe of an ejected target, sent by a probe task.
#[derive(Debug, Clone)]
pub struct HealthChange {
    pub service: String,
    pub target: SocketAddr,
    pub health: Health,
    /// Whether the probe that sent this passed; a passing probe ends an outlier ejection.
    pub passed: bool,
    /// Why the last probe failed, for logs and the CLI.
    pub last_error: Option<String>,
}

/// Whether a target is ejected by outlier detection right now: set and cleared by the
/// agent, read by the target's probe task, which then reports every passing probe.
#[derive(Debug, Clone, Default)]
pub struct EjectedFlag(Arc<AtomicBool>);

impl EjectedFlag {
    pub fn set(&self, ejected: bool) {
        self.0.store(ejected, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What one probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    Tcp,
    /// A TCP connect and a TLS handshake, as the originator makes them: `name` is the
    /// server name asked for (the service's `sni`, else the endpoint's DNS name, else
    /// its address).
    Tls {
        tls: crate::config::TlsOrigination,
        name: Option<String>,
    },
    Http(HttpCheck),
    Grpc(GrpcCheck),
}

/// How one target is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub interval: Duration,
    pub timeout: Duration,
    pub thresholds: Thresholds,
    pub kind: ProbeKind,
}

/// The delay before the next probe: the interval plus up to 10% of random jitter, so
/// probes of many targets configured alike do not fire in lockstep.
pub fn next_delay(interval: Duration, unit_random: f64) -> Duration {
    interval + interval.mul_f64(0.1 * unit_random.clamp(0.0, 1.0))
}

/// Starts probing `target`; the task ends when the receiver is dropped or the handle is
/// aborted. It reports changes of verdict, and every passing probe while `ejected` is set.
pub fn spawn_probe(
    service: String,
    target: SocketAddr,
    spec: ProbeSpec,
    changes: mpsc::Sender<HealthChange>,
    ejected: EjectedFlag,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tracker = HealthTracker::new(spec.thresholds);
        loop {
            let result = match &spec.kind {
                ProbeKind::Tcp => tcp_probe(target, spec.timeout).await,
                ProbeKind::Tls { tls, name } => {
                    tls_probe(target, tls, name.as_deref(), spec.timeout).await
                }
                ProbeKind::Http(check) => http_probe(target, check, spec.timeout).await,
                ProbeKind::Grpc(check) => grpc_probe(target, check, spec.timeout).await,
            };
            let last_error = result.as_ref().err().map(ToString::to_string);
            let passed = result.is_ok();
            let changed = tracker.observe(passed);
            if let Some(health) = changed {
                tracing::info!(%service, %target, %health, error = last_error.as_deref(), "health changed");
            }
            if changed.is_some() || (passed && ejected.get()) {
                let change = HealthChange {
                    service: service.clone(),
                    target,
                    health: tracker.health(),
                    passed,
                    last_error,
                };
                if changes.send(change).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(next_delay(spec.interval, rand::random::<f64>())).await;
        }
    })
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("no complete response within {0:?}")]
    ResponseTimeout(Duration),
    #[error("request failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("response is not HTTP/1.x: {0:?}")]
    NotHttp(String),
    #[error("{what} is longer than {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    #[error("status {0} is not an expected status")]
    Status(u16),
    #[error("HTTP/2: {0}")]
    H2(#[source] h2::Error),
    #[error("gRPC call failed: grpc-status {code}{}", message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    GrpcStatus {
        code: String,
        message: Option<String>,
    },
    #[error("gRPC health response is malformed: {0}")]
    GrpcMalformed(&'static str),
    #[error("service reports {0}")]
    NotServing(ServingStatus),
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingStatus {
    Unknown,
    Serving,
    NotServing,
    ServiceUnknown,
    Other(u64),
}

impl fmt::Display for ServingStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServingStatus::Unknown => f.write_str("UNKNOWN"),
            ServingStatus::Serving => f.write_str("SERVING"),
            ServingStatus::NotServing => f.write_str("NOT_SERVING"),
            ServingStatus::ServiceUnknown => f.write_str("SERVICE_UNKNOWN"),
            ServingStatus::Other(n) => write!(f, "status {n}"),
        }
    }
}

/// A gRPC message frame holding `HealthCheckRequest { service }` (field 1, a string).
pub fn grpc_health_request(service: &str) -> Vec<u8> {
    let mut message = Vec::new();
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        push_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8]; // not compressed
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    frame
}

fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn read_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The status in a gRPC frame holding `HealthCheckResponse { status }` (field 1, enum).
/// Unknown fields are skipped, as protobuf requires.
pub fn grpc_health_status(frame: &[u8]) -> Result<ServingStatus, ProbeError> {
    let malformed = ProbeError::GrpcMalformed;
    let (&compressed, rest) = frame.split_first().ok_or(malformed("empty body"))?;
    if compressed != 0 {
        return Err(malformed("compressed message (none was asked for)"));
    }
    let len = rest
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(malformed("short frame header"))?;
    let mut message = 4usize
        .checked_add(len)
        .and_then(|end| rest.get(4..end))
        .ok_or(malformed("short message"))?;
    let mut status = 0; // proto3 default: UNKNOWN
    while !message.is_empty() {
        let key = read_varint(&mut message).ok_or(malformed("bad field key"))?;
        match key & 7 {
            0 => {
                let value = read_varint(&mut message).ok_or(malformed("bad varint"))?;
                if key >> 3 == 1 {
                    status = value;
                }
            }
            2 => {
                let n = read_varint(&mut message).ok_or(malformed("bad length"))? as usize;
                message = message.get(n..).ok_or(malformed("short field"))?;
            }
            1 => message = message.get(8..).ok_or(malformed("short field"))?,
            5 => message = message.get(4..).ok_or(malformed("short field"))?,
            _ => return Err(malformed("unsupported wire type")),
        }
    }
    Ok(match status {
        0 => ServingStatus::Unknown,
        1 => ServingStatus::Serving,
        2 => ServingStatus::NotServing,
        3 => ServingStatus::ServiceUnknown,
        n => ServingStatus::Other(n),
    })
}

/// One gRPC health check (`grpc.health.v1.Health/Check` over h2c): within `timeout`,
/// the call succeeds with grpc-status 0 and the service reports SERVING.
pub async fn grpc_probe(
    target: SocketAddr,
    check: &GrpcCheck,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let started = tokio::time::Instant::now();
    let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(ProbeError::Connect(e)),
        Err(_) => return Err(ProbeError::Timeout(timeout)),
    };
    let call = async {
        let (client, connection) = h2::client::Builder::new()
            .enable_push(false)
            .max_header_list_size(MAX_GRPC_HEADER_LIST)
            .initial_window_size(MAX_GRPC_BODY as u32)
            .handshake::<_, bytes::Bytes>(stream)
            .await
            .map_err(ProbeError::H2)?;
        // The connection task ends with the call: aborted below, or on its own when the
        // client is dropped.
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let result = async {
            let mut client = client.ready().await.map_err(ProbeError::H2)?;
            let request = http::Request::builder()
                .method("POST")
                .uri(format!(
                    "http://{}/grpc.health.v1.Health/Check",
                    check.authority
                ))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("user-agent", "detour-health-check")
                .body(())
                .map_err(|_| ProbeError::GrpcMalformed("authority is not a valid URI part"))?;
            let (response, mut send) = client
                .send_request(request, false)
                .map_err(ProbeError::H2)?;
            send.send_data(grpc_health_request(&check.service).into(), true)
                .map_err(ProbeError::H2)?;
            let response = response.await.map_err(ProbeError::H2)?;
            if response.status() != http::StatusCode::OK {
                return Err(ProbeError::Status(response.status().as_u16()));
            }
            let headers = response.headers().clone();
            let mut body = response.into_body();
            let mut frame = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.map_err(ProbeError::H2)?;
                if frame.len() + chunk.len() > MAX_GRPC_BODY {
                    return Err(ProbeError::TooLarge {
                        what: "gRPC response body",
                        limit: MAX_GRPC_BODY,
                    });
                }
                let _ = body.flow_control().release_capacity(chunk.len());
                frame.extend_from_slice(&chunk);
            }
            // A trailers-only response carries grpc-status in the headers.
            let trailers = body.trailers().await.map_err(ProbeError::H2)?;
            let meta = trailers.as_ref().unwrap_or(&headers);
            let code = meta
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("missing")
                .to_string();
            if code != "0" {
                let message = meta
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                return Err(ProbeError::GrpcStatus { code, message });
            }
            match grpc_health_status(&frame)? {
                ServingStatus::Serving => Ok(()),
                other => Err(ProbeError::NotServing(other)),
            }
        }
        .await;
        driver.abort();
        result
    };
    let remaining = timeout.saturating_sub(started.elapsed());
    tokio::time::timeout(remaining, call)
        .await
        .map_err(|_| ProbeError::ResponseTimeout(timeout))?
}

/// One HTTP/1.1 check: within `timeout`, connect, `GET path` with the check's Host, and
/// read a status line (at most [`MAX_STATUS_LINE`] bytes) whose status is expected.
/// Headers and body are not read.
pub async fn http_probe(
    target: SocketAddr,
    check: &HttpCheck,
    timeout: Duration,
) -> Result<(), ProbeError> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let started = tokio::time::Instant::now();
    let mut stream =
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ProbeError::Connect(e)),
            Err(_) => return Err(ProbeError::Timeout(timeout)),
        };
    let exchange = async {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: detour-health-check\r\nConnection: close\r\n\r\n",
            check.path, check.host
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(ProbeError::Io)?;
        let mut line = Vec::new();
        // One byte past the bound tells a line at the bound from a longer one.
        tokio::io::BufReader::new(&mut stream)
            .take(MAX_STATUS_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .map_err(ProbeError::Io)?;
        status_of(&line)
    };
    let remaining = timeout.saturating_sub(started.elapsed());
    let status = tokio::time::timeout(remaining, exchange)
        .await
        .map_err(|_| ProbeError::ResponseTimeout(timeout))??;
    if check.expects(status) {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}

/// The status of the first line of a response, given at most [`MAX_STATUS_LINE`] + 1
/// bytes of it (all that [`http_probe`] reads): longer is [`ProbeError::TooLarge`],
/// bytes that are not text or not a status line are [`ProbeError::NotHttp`].
pub fn status_of(head: &[u8]) -> Result<u16, ProbeError> {
    // Without a newline the server closed mid-line (judge what came) or the line is
    // longer than the bound.
    let line = match head.iter().position(|&b| b == b'\n') {
        Some(end) => &head[..=end],
        None => head,
    };
    if line.len() > MAX_STATUS_LINE {
        return Err(ProbeError::TooLarge {
            what: "HTTP status line",
            limit: MAX_STATUS_LINE,
        });
    }
    parse_status_line(&String::from_utf8_lossy(line))
}

/// The status of an `HTTP/1.x NNN reason` line.
pub fn parse_status_line(line: &str) -> Result<u16, ProbeError> {
    let bad = || ProbeError::NotHttp(line.trim_end().chars().take(80).collect());
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next().ok_or_else(bad)?;
    if !version.starts_with("HTTP/1.") {
        return Err(bad());
    }
    let status = parts.next().ok_or_else(bad)?;
    if status.len() != 3 || !status.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    status.parse().map_err(|_| bad())
}

/// One TCP check: the handshake completes within `timeout`.
pub async fn tcp_probe(target: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(ProbeError::Connect(e)),
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

/// A TCP connect and a TLS handshake with `target`, all within `timeout`. The client
/// configuration is built for each probe (a CA file read each time): a probe every
/// second or so costs little, and a rotated CA file is seen at once.
pub async fn tls_probe(
    target: SocketAddr,
    tls: &crate::config::TlsOrigination,
    name: Option<&str>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let config = crate::originator::tls::client_config(tls)
        .map_err(|e| ProbeError::Tls(format!("{e:#}")))?;
    let name = crate::originator::tls::server_name(None, name, target);
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(target)
            .await
            .map_err(ProbeError::Connect)?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| ProbeError::Tls(format!("handshake with {}: {e}", name.to_str())))?;
        Ok(())
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(healthy: u32, unhealthy: u32) -> HealthTracker {
        HealthTracker::new(Thresholds { healthy, unhealthy })
    }

    #[test]
    fn unknown_is_usable_and_first_success_confirms() {
        let mut t = tracker(3, 2);
        assert!(t.health().usable());
        assert_eq!(t.observe(true), Some(Health::Healthy));
    }

    #[test]
    fn unhealthy_after_threshold_consecutive_failures() {
        let mut t = tracker(1, 3);
        t.observe(true);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        // A success in between resets the count.
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(Health::Unhealthy));
        assert!(!t.health().usable());
    }

    #[test]
    fn healthy_again_after_threshold_consecutive_successes() {
        let mut t = tracker(2, 1);
        assert_eq!(t.observe(false), Some(Health::Unhealthy));
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(Health::Healthy));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let i = Duration::from_secs(1);
        assert_eq!(next_delay(i, 0.0), i);
        assert_eq!(next_delay(i, 1.0), Duration::from_millis(1100));
        assert_eq!(next_delay(i, 7.0), Duration::from_millis(1100));
    }

    #[tokio::test]
    async fn tcp_probe_sees_listening_and_refusing_ports() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        assert!(tcp_probe(open, Duration::from_secs(1)).await.is_ok());
        drop(listener);
        let err = tcp_probe(open, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect(_)), "{err}");
    }

    #[test]
    fn status_lines_are_parsed_strictly() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK\r\n").unwrap(), 200);
        assert_eq!(
            parse_status_line("HTTP/1.0 503 Service Unavailable\r\n").unwrap(),
            503
        );
        assert_eq!(parse_status_line("HTTP/1.1 204\r\n").unwrap(), 204);
        for bad in [
            "",
            "SSH-2.0-OpenSSH\r\n",
            "HTTP/2 200\r\n",
            "HTTP/1.1 20\r\n",
            "HTTP/1.1 abc\r\n",
            "HTTP/1.1 +20\r\n",
        ] {
            assert!(
                matches!(parse_status_line(bad), Err(ProbeError::NotHttp(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn status_lines_are_bounded() {
        let mut at_bound = b"HTTP/1.1 200 ".to_vec();
        at_bound.resize(MAX_STATUS_LINE - 2, b'x');
        at_bound.extend_from_slice(b"\r\n");
        assert_eq!(status_of(&at_bound).unwrap(), 200);
        let mut over = at_bound.clone();
        over.insert(13, b'x');
        for head in [over, vec![b'H'; MAX_STATUS_LINE + 1]] {
            let err = status_of(&head).unwrap_err();
            assert!(
                matches!(
                    err,
                    ProbeError::TooLarge {
                        limit: MAX_STATUS_LINE,
                        ..
                    }
                ),
                "{err}"
            );
            assert_eq!(
                err.to_string(),
                "HTTP status line is longer than 4096 bytes"
            );
        }
        // A server that closes mid-line is judged on what it sent; bytes that are not
        // text are not HTTP.
        assert_eq!(status_of(b"HTTP/1.1 204").unwrap(), 204);
        assert!(matches!(
            status_of(b"HTTP/1.1 \xff\xfe\r\n"),
            Err(ProbeError::NotHttp(_))
        ));
        // What follows the line is not looked at.
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\nX: \xff").unwrap(), 200);
    }

    /// A server that accepts one connection and writes `prefix` then `filler` in a loop
    /// until the peer goes away: an endless status line or body.
    async fn endless_server(prefix: &'static [u8], filler: u8) -> SocketAddr {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let chunk = vec![filler; 16 * 1024];
            if s.write_all(prefix).await.is_err() {
                return;
            }
            // Bounded anyway, so a test that goes wrong cannot fill the disk or hang.
            for _ in 0..(1 << 16) {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_endless_status_line_fails_the_probe_promptly() {
        let timeout = Duration::from_secs(10);
        for prefix in [&b"HTTP/1.1 200 "[..], &b""[..]] {
            let addr = endless_server(prefix, b'A').await;
            let started = std::time::Instant::now();
            let err = http_probe(addr, &check(std::iter::once(200..201).collect()), timeout)
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    ProbeError::TooLarge {
                        what: "HTTP status line",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "took {:?}: the bound, not the timeout, must end it",
                started.elapsed()
            );
        }
    }

    /// A gRPC server over h2c that answers one call with response headers and then DATA
    /// frames without end, or with `header_bytes` of headers.
    async fn hostile_grpc_server(header_bytes: usize) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            let Some(Ok((_request, mut respond))) = conn.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
            });
            let mut response = http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc");
            if header_bytes > 0 {
                response = response.header("x-filler", "a".repeat(header_bytes));
            }
            let Ok(mut send) = respond.send_response(response.body(()).unwrap(), false) else {
                return;
            };
            // A valid frame header announcing a huge message, then its endless bytes.
            let _ = send.send_data(vec![0, 0x7f, 0xff, 0xff, 0xff].into(), false);
            for _ in 0..(1 << 16) {
                send.reserve_capacity(16 * 1024);
                match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(n)) => {
                        if send.send_data(vec![0x08; n].into(), false).is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_endless_grpc_body_fails_the_probe_promptly() {
        let addr = hostile_grpc_server(0).await;
        let started = std::time::Instant::now();
        let err = grpc_probe(addr, &grpc_check(), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "gRPC response body is longer than 65536 bytes"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn oversized_grpc_headers_fail_the_probe_promptly() {
        let addr = hostile_grpc_server(1 << 20).await;
        let started = std::time::Instant::now();
        let err = grpc_probe(addr, &grpc_check(), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::H2(_)), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    /// A one-shot HTTP server answering every request with `status`, recording the
    /// request head it received.
    async fn http_server(status: u16) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
            s.write_all(reply.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (addr, task)
    }

    fn check(statuses: Vec<std::ops::Range<u16>>) -> HttpCheck {
        HttpCheck {
            path: "/healthz".into(),
            host: "mydb.com".into(),
            expected_statuses: statuses,
        }
    }

    #[tokio::test]
    async fn http_probe_sends_path_and_host_and_checks_the_status() {
        let (addr, server) = http_server(204).await;
        http_probe(
            addr,
            &check(std::iter::once(200..300).collect()),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        let head = server.await.unwrap();
        assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nHost: mydb.com\r\n"), "{head}");

        let (addr, _server) = http_server(503).await;
        let err = http_probe(
            addr,
            &check(std::iter::once(200..201).collect()),
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProbeError::Status(503)), "{err}");
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts (the kernel completes the handshake) but never answers.
        let err = http_probe(
            addr,
            &check(std::iter::once(200..201).collect()),
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProbeError::ResponseTimeout(_)), "{err}");
        drop(listener);
    }

    #[test]
    fn grpc_health_messages_round_trip_the_wire_format() {
        // HealthCheckRequest{service: "mydb"}: frame header, then 0x0a 0x04 "mydb".
        assert_eq!(
            grpc_health_request("mydb"),
            [0, 0, 0, 0, 6, 0x0a, 4, b'm', b'y', b'd', b'b']
        );
        assert_eq!(grpc_health_request(""), [0, 0, 0, 0, 0]);
        let response = |fields: &[u8]| {
            let mut f = vec![0];
            f.extend_from_slice(&(fields.len() as u32).to_be_bytes());
            f.extend_from_slice(fields);
            f
        };
        assert_eq!(
            grpc_health_status(&response(&[0x08, 1])).unwrap(),
            ServingStatus::Serving
        );
        assert_eq!(
            grpc_health_status(&response(&[0x08, 2])).unwrap(),
            ServingStatus::NotServing
        );
        // proto3 leaves a default (UNKNOWN) out; unknown fields are skipped.
        assert_eq!(
            grpc_health_status(&response(&[])).unwrap(),
            ServingStatus::Unknown
        );
        assert_eq!(
            grpc_health_status(&response(&[0x12, 2, b'h', b'i', 0x08, 1])).unwrap(),
            ServingStatus::Serving
        );
        assert!(grpc_health_status(&[]).is_err());
        assert!(grpc_health_status(&[1, 0, 0, 0, 0]).is_err());
        assert!(grpc_health_status(&response(&[0x08])).is_err());
    }

    /// A gRPC health server over h2c answering every Check with `status`, or with
    /// grpc-status `code` when it is not "0"; returns the request's :path and body.
    async fn grpc_server(
        status: u8,
        code: &'static str,
    ) -> (SocketAddr, tokio::task::JoinHandle<(String, Vec<u8>)>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            let served = tokio::spawn(async move {
                let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
            });
            let path = request.uri().path().to_string();
            let mut body = request.into_body();
            let mut received = Vec::new();
            while let Some(chunk) = body.data().await {
                received.extend_from_slice(&chunk.unwrap());
            }
            let response = http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let mut send = respond.send_response(response, false).unwrap();
            if code == "0" {
                let frame = vec![0, 0, 0, 0, 2, 0x08, status];
                send.send_data(frame.into(), false).unwrap();
            }
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", code.parse().unwrap());
            send.send_trailers(trailers).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            served.abort();
            (path, received)
        });
        (addr, task)
    }

    fn grpc_check() -> GrpcCheck {
        GrpcCheck {
            service: "mydb".into(),
            authority: "mydb.com".into(),
        }
    }

    #[tokio::test]
    async fn grpc_probe_needs_serving() {
        let (addr, server) = grpc_server(1, "0").await;
        grpc_probe(addr, &grpc_check(), Duration::from_secs(2))
            .await
            .unwrap();
        let (path, body) = server.await.unwrap();
        assert_eq!(path, "/grpc.health.v1.Health/Check");
        assert_eq!(body, grpc_health_request("mydb"));

        let (addr, _server) = grpc_server(2, "0").await;
        let err = grpc_probe(addr, &grpc_check(), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "service reports NOT_SERVING");

        // grpc-status 12: UNIMPLEMENTED, a server without the health service.
        let (addr, _server) = grpc_server(0, "12").await;
        let err = grpc_probe(addr, &grpc_check(), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "gRPC call failed: grpc-status 12");
    }

    #[tokio::test]
    async fn grpc_probe_fails_on_a_server_that_does_not_speak_http2() {
        let (addr, _server) = http_server(200).await;
        let err = grpc_probe(addr, &grpc_check(), Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProbeError::H2(_) | ProbeError::ResponseTimeout(_)),
            "{err}"
        );
    }

    fn fast_tcp_spec() -> ProbeSpec {
        ProbeSpec {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            thresholds: Thresholds {
                healthy: 1,
                unhealthy: 2,
            },
            kind: ProbeKind::Tcp,
        }
    }

    /// The next report, or a failure after 10 s (probes run every 20 ms).
    async fn next(rx: &mut mpsc::Receiver<HealthChange>) -> HealthChange {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a report within 10 s")
            .expect("the probe task is running")
    }

    /// Accepts `n` more probe connections on `listener`, at most 10 s in all.
    async fn accept_probes(listener: &tokio::net::TcpListener, n: usize) {
        for i in 0..n {
            tokio::time::timeout(Duration::from_secs(10), listener.accept())
                .await
                .unwrap_or_else(|_| panic!("probe {i} of {n} within 10 s"))
                .unwrap();
        }
    }

    #[tokio::test]
    async fn probe_task_reports_changes_only() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let task = spawn_probe(
            "svc".into(),
            target,
            fast_tcp_spec(),
            tx,
            EjectedFlag::default(),
        );
        let first = next(&mut rx).await;
        assert_eq!((first.health, first.passed), (Health::Healthy, true));
        // Passing probes while nothing is ejected report nothing: counted, not timed.
        // Probes run one after another, so by the time the 6th has connected, the four
        // after the first have passed, and any report of theirs is in the channel.
        accept_probes(&listener, 6).await;
        assert!(rx.try_recv().is_err(), "no report while the verdict holds");
        drop(listener);
        let second = next(&mut rx).await;
        assert_eq!((second.health, second.passed), (Health::Unhealthy, false));
        assert!(second.last_error.is_some());
        task.abort();
    }

    #[tokio::test]
    async fn probe_task_reports_every_pass_while_the_target_is_ejected() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let ejected = EjectedFlag::default();
        let task = spawn_probe("svc".into(), target, fast_tcp_spec(), tx, ejected.clone());
        assert_eq!(next(&mut rx).await.health, Health::Healthy);
        ejected.set(true);
        for _ in 0..3 {
            let report = next(&mut rx).await;
            assert_eq!((report.health, report.passed), (Health::Healthy, true));
        }
        ejected.set(false);
        // Drain what was sent before the flag was read as cleared, then: silence.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            rx.try_recv().is_err(),
            "no report once the ejection is over"
        );
        task.abort();
    }
}
