//! Active health checks: probes → observations → a health verdict per target.
//!
//! [`HealthTracker`] is the pure part (thresholds, no clock, no I/O). [`spawn_tcp_probe`]
//! is the I/O part: one tokio task per (service, target) that probes on an interval with
//! jitter and a timeout — a TCP connect, or an HTTP/1.1 GET whose status must be one of
//! the expected ones — and reports *changes* of verdict on a channel.
//!
//! Invariants:
//! - a target starts `Unknown`, which selection treats as usable, so a new endpoint or a
//!   restarted agent never black-holes a service while waiting for the first probe; the
//!   first probe runs at once;
//! - a verdict flips only after `unhealthy_threshold` consecutive failures or
//!   `healthy_threshold` consecutive successes;
//! - probes connect to backend addresses, never to VIPs, so the connect programs never
//!   rewrite them; every target of every tier is probed at the full rate, so a failover
//!   tier is known good before it is needed.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::HttpCheck;
use tokio::task::JoinHandle;

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

/// A change of verdict, sent by a probe task.
#[derive(Debug, Clone)]
pub struct HealthChange {
    pub service: String,
    pub target: SocketAddr,
    pub health: Health,
    /// Why the last probe failed, for logs and the CLI.
    pub last_error: Option<String>,
}

/// What one probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    Tcp,
    Http(HttpCheck),
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
/// aborted.
pub fn spawn_probe(
    service: String,
    target: SocketAddr,
    spec: ProbeSpec,
    changes: mpsc::Sender<HealthChange>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tracker = HealthTracker::new(spec.thresholds);
        loop {
            let result = match &spec.kind {
                ProbeKind::Tcp => tcp_probe(target, spec.timeout).await,
                ProbeKind::Http(check) => http_probe(target, check, spec.timeout).await,
            };
            let last_error = result.as_ref().err().map(ToString::to_string);
            if let Some(health) = tracker.observe(result.is_ok()) {
                tracing::info!(%service, %target, %health, error = last_error.as_deref(), "health changed");
                let change = HealthChange {
                    service: service.clone(),
                    target,
                    health,
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
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("no complete response within {0:?}")]
    ResponseTimeout(Duration),
    #[error("request failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("response is not HTTP/1.x: {0:?}")]
    NotHttp(String),
    #[error("status {0} is not an expected status")]
    Status(u16),
}

/// One HTTP/1.1 check: within `timeout`, connect, `GET path` with the check's Host, and
/// read a status line whose status is expected. The body is not read.
pub async fn http_probe(
    target: SocketAddr,
    check: &HttpCheck,
    timeout: Duration,
) -> Result<(), ProbeError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
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
        let mut line = String::new();
        tokio::io::BufReader::new(&mut stream)
            .read_line(&mut line)
            .await
            .map_err(ProbeError::Io)?;
        parse_status_line(&line)
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

/// The status of an `HTTP/1.x NNN reason` line.
pub fn parse_status_line(line: &str) -> Result<u16, ProbeError> {
    let bad = || ProbeError::NotHttp(line.trim_end().chars().take(80).collect());
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next().ok_or_else(bad)?;
    if !version.starts_with("HTTP/1.") {
        return Err(bad());
    }
    let status = parts.next().ok_or_else(bad)?;
    if status.len() != 3 {
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
        ] {
            assert!(
                matches!(parse_status_line(bad), Err(ProbeError::NotHttp(_))),
                "{bad:?}"
            );
        }
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

    #[tokio::test]
    async fn probe_task_reports_changes_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let spec = ProbeSpec {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            thresholds: Thresholds {
                healthy: 1,
                unhealthy: 2,
            },
            kind: ProbeKind::Tcp,
        };
        let task = spawn_probe("svc".into(), target, spec, tx);
        let first = rx.recv().await.unwrap();
        assert_eq!(first.health, Health::Healthy);
        drop(listener);
        let second = rx.recv().await.unwrap();
        assert_eq!(second.health, Health::Unhealthy);
        assert!(second.last_error.is_some());
        task.abort();
    }
}
