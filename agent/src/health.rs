//! Active health checks: probes → observations → a health verdict per target.
//!
//! [`HealthTracker`] is the pure part (thresholds, no clock, no I/O). [`spawn_tcp_probe`]
//! is the I/O part: one tokio task per (service, target) that connects on an interval with
//! jitter and a timeout and reports *changes* of verdict on a channel.
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

/// How one target is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSpec {
    pub interval: Duration,
    pub timeout: Duration,
    pub thresholds: Thresholds,
}

/// The delay before the next probe: the interval plus up to 10% of random jitter, so
/// probes of many targets configured alike do not fire in lockstep.
pub fn next_delay(interval: Duration, unit_random: f64) -> Duration {
    interval + interval.mul_f64(0.1 * unit_random.clamp(0.0, 1.0))
}

/// Starts probing `target` over TCP; the task ends when the receiver is dropped or the
/// handle is aborted.
pub fn spawn_tcp_probe(
    service: String,
    target: SocketAddr,
    spec: ProbeSpec,
    changes: mpsc::Sender<HealthChange>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tracker = HealthTracker::new(spec.thresholds);
        loop {
            let result = tcp_probe(target, spec.timeout).await;
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
        };
        let task = spawn_tcp_probe("svc".into(), target, spec, tx);
        let first = rx.recv().await.unwrap();
        assert_eq!(first.health, Health::Healthy);
        drop(listener);
        let second = rx.recv().await.unwrap();
        assert_eq!(second.health, Health::Unhealthy);
        assert!(second.last_error.is_some());
        task.abort();
    }
}
