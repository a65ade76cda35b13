//! Prometheus metrics: a [`Snapshot`] of counters and gauges → the Prometheus text
//! exposition format 0.0.4, written by `prometheus-client` → an HTTP/1.1 server (hyper)
//! that answers `GET /metrics`.
//!
//! The agent fills a [`Snapshot`] on each scrape from whatever state it keeps; this module
//! knows nothing of that state, so [`render`] is a pure function and is tested as one.
//! [`serve`] is the I/O edge: it calls the caller's render future once per scrape.
//!
//! The snapshot is encoded by a `prometheus-client` [`Collector`] rather than kept in its
//! live `Counter`/`Family` types: the agent's state (per-CPU kernel counters, outlier and
//! selection state) is the source of truth and is read on each scrape, so there is nothing
//! to keep in sync between scrapes. The text format 0.0.4 (not OpenMetrics) is served
//! because its metadata names equal the series names (`# TYPE detour_x_total counter`),
//! so the exposition is the one detour always served; counters are registered without
//! the `_total` suffix and `prometheus-client` appends it, so the series names users
//! scrape are unchanged.
//!
//! Invariants:
//! - label sets are bounded by construction: series exist only for the configured
//!   services and backends (and the fixed `kind`/`result`/`path` values), never for
//!   peers, clients or error strings, so the number of series follows the configuration,
//!   not the traffic. A removed backend's series disappear with it (Prometheus marks them
//!   stale);
//! - each metric family is written as one contiguous group behind its `# HELP` and
//!   `# TYPE` lines, as the format requires; the family is written (with no samples) even
//!   when the snapshot has nothing for it, so its documentation is always discoverable;
//! - series follow the order of `Snapshot::addresses`, `Snapshot::backends` and
//!   `Snapshot::services`; the caller keeps addresses, (service, backend) pairs and
//!   services unique, as duplicates are invalid exposition (the agent builds them with
//!   `report`, which guarantees it);
//! - label values are escaped by the encoder (`\` → `\\`, `"` → `\"`, newline → `\n`), so
//!   a configured name can never break the output;
//! - the server never lets one client stall another or the agent: every connection runs in
//!   its own task, at most [`MAX_CONNECTIONS`] at a time (the rest wait in the kernel's
//!   backlog); hyper reads the request head into at most [`MAX_REQUEST_HEAD`] bytes
//!   (431 past it) within [`REQUEST_HEAD_TIMEOUT`] (408 past it), and a whole connection
//!   lives at most [`REQUEST_HEAD_TIMEOUT`] + [`RESPONSE_TIMEOUT`]. One request per
//!   connection (no keep-alive), so an idle client holds no slot. Accept errors (such as
//!   running out of file descriptors) back off, doubling up to a second. Errors are logged
//!   and end only the connection they happened on.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// The `Content-Type` of the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Largest request head (request line and headers) the server reads; a longer one is
/// answered with 431. A scrape's head is a few hundred bytes; this is also the smallest
/// read buffer hyper accepts.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// How long a client has to send its whole request head; then it gets 408 and is closed.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client has, after its head, to take the whole response.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// Pause after the first failed `accept`; it doubles on each further failure in a row.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Everything one scrape exposes. Counters are totals since the agent started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// What the kernel counted per backend address, over every service that has it.
    pub addresses: Vec<AddressMetrics>,
    pub backends: Vec<BackendMetrics>,
    pub services: Vec<ServiceMetrics>,
    /// Events the kernel dropped because the ring buffer was full.
    pub events_dropped: u64,
    pub events_received: u64,
    /// Seconds each apply took: re-planning what a change touched and writing the maps.
    pub reconcile: Histogram,
    pub config_reloads_ok: u64,
    pub config_reloads_failed: u64,
    pub sockets_destroyed: u64,
    /// The kernel's fast path: connects whose first pick was suspect and that went to
    /// another table member, to the standby set, or (all suspect) to the first pick.
    pub fast_path_avoided: u64,
    pub fast_path_standby: u64,
    pub fast_path_all_suspect: u64,
    /// Services the BPF maps have no room for, one entry per limit (all three, zeros
    /// included, so an alert has a series to watch).
    pub services_over_limit: Vec<LimitMetrics>,
    /// Each probed kernel piece by its key, and whether detour uses it (1) or it is
    /// missing (0).
    pub kernel_features: Vec<(String, bool)>,
    /// Backends whose per-backend series were left out (`--metrics-backend-limit`).
    pub backends_omitted: u64,
    /// Every DNS name endpoints are given by.
    pub names: Vec<NameMetrics>,
    /// DNS lookups that failed or answered no address, since the agent started.
    pub dns_lookup_failures: u64,
    /// The TLS originator's counters.
    pub originator: crate::originator::StatsView,
    /// SYN steering's counters; `None` when steering could not start.
    pub steering: Option<SteerMetrics>,
}

/// SYN steering, from the kernel's control array and the agent's last sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SteerMetrics {
    /// Stalled handshakes steered to another backend (a flow steered twice counts twice).
    pub steered: u64,
    pub table_full: u64,
    pub no_candidate: u64,
    pub late_dropped: u64,
    pub unseen: u64,
    pub collisions: u64,
    /// Resets refusing a handshake, held back so that the flow is steered instead.
    pub refusals_held: u64,
    /// ICMP errors about a steered flow's packets to its new backend, translated.
    pub icmp_translated: u64,
    /// Entries in the translation table (closed flows in their grace included).
    pub entries: u64,
    /// `--max-steered-flows`.
    pub capacity: u64,
    /// Live steered flows.
    pub live: u64,
}

/// One DNS name endpoints are given by (`resolution: DNS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameMetrics {
    pub name: String,
    /// Addresses it serves now (the last good answer's).
    pub addresses: u64,
    /// Its last lookup failed: the last good addresses (or none) serve.
    pub failing: bool,
}

/// Services that hit one map limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitMetrics {
    /// The flag that sets the limit: `max-services`, `max-backends` or `max-slots`.
    pub limit: String,
    /// Services with nothing in the maps.
    pub refused: u64,
    /// Running services whose new state has no room (they keep their previous tables).
    pub not_updated: u64,
}

/// One configured service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceMetrics {
    pub service: String,
    /// Each frontend (`VIP:port`) with the name of the best tier currently serving it:
    /// the frontends of one service can be in different tiers (an IPv4 and an IPv6 VIP
    /// reach different endpoints).
    pub tiers: Vec<(String, String)>,
    /// Whether any tier of any of its frontends is in panic mode: it serves every
    /// endpoint, usable or not (nothing is usable, or under `minHealthPercent`).
    pub panic: bool,
    pub backends_in_table: u64,
}

/// The kernel's counters of one backend address. The kernel keeps them by backend, and
/// a backend (`ip:port`) is one whatever services have it, so they are labelled by
/// `backend` alone: a per-service label would show a shared backend's totals once per
/// service, as if each had them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressMetrics {
    /// `ip:port`.
    pub backend: String,
    pub connects: u64,
    pub established: u64,
    pub failures_refused: u64,
    pub failures_timeout: u64,
    /// Established connections the backend reset.
    pub failures_reset: u64,
    /// Established connections this node ended without a close (an application abort,
    /// a TCP timeout): no backend failure.
    pub aborts: u64,
}

/// One backend of one configured service: what the agent decided about it for that
/// service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendMetrics {
    pub service: String,
    /// `ip:port`.
    pub backend: String,
    pub locality: String,
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

/// The snapshot in the Prometheus text exposition format 0.0.4, ending with a newline.
pub fn render(snapshot: &Snapshot) -> String {
    let mut registry = Registry::default();
    // A collector must be `'static`; the clone is a few strings per backend, small next to
    // the text it becomes.
    registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry)
        .expect("encoding into a String fails only if the writer does, and a String's cannot");
    text
}

/// Encodes one [`Snapshot`] when the registry is encoded.
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let snapshot = &self.0;
        let backends = &snapshot.backends;
        let addresses = &snapshot.addresses;
        let e = &mut encoder;

        counters(
            e,
            "detour_backend_connects",
            "Connects the kernel rewrote to the backend address, through any service.",
            addresses.iter().map(|a| (address_labels(a), a.connects)),
        )?;
        counters(
            e,
            "detour_backend_established",
            "Connections to the backend address that were established.",
            addresses.iter().map(|a| (address_labels(a), a.established)),
        )?;
        counters(
            e,
            "detour_backend_failures",
            "Connections to the backend address that failed, by kind: refused (handshake refused or reset), timeout (SYN unanswered) or reset (established, then reset by the backend).",
            addresses.iter().flat_map(|a| {
                [
                    ("refused", a.failures_refused),
                    ("timeout", a.failures_timeout),
                    ("reset", a.failures_reset),
                ]
                .map(|(kind, n)| ([("backend", a.backend.as_str()), ("kind", kind)], n))
            }),
        )?;
        counters(
            e,
            "detour_backend_aborts",
            "Established connections to the backend address that this node ended without a close: an application abort (SO_LINGER 0, unread data) or a TCP timeout. Not a backend failure.",
            addresses.iter().map(|a| (address_labels(a), a.aborts)),
        )?;
        counters(
            e,
            "detour_backend_ejections",
            "Times outlier detection ejected the backend.",
            backends.iter().map(|b| (backend_labels(b), b.ejections)),
        )?;
        gauges(
            e,
            "detour_backend_ejected",
            "1 while outlier detection keeps the backend ejected, else 0.",
            backends
                .iter()
                .map(|b| (backend_labels(b), i64::from(b.ejected))),
        )?;
        gauges(
            e,
            "detour_backend_healthy",
            "1 if the active health check passes, 0 if it fails; absent when not checked.",
            backends
                .iter()
                .filter_map(|b| Some((backend_labels(b), i64::from(b.healthy?)))),
        )?;
        gauges(
            e,
            "detour_backend_in_table",
            "1 if the backend is in the service's kernel table, else 0.",
            backends
                .iter()
                .map(|b| (backend_labels(b), i64::from(b.in_table))),
        )?;

        let services = &snapshot.services;
        gauges(
            e,
            "detour_service_panic",
            "1 while the service is in panic mode (too few usable backends; all are used), else 0.",
            services
                .iter()
                .map(|s| (service_labels(s), i64::from(s.panic))),
        )?;
        gauges(
            e,
            "detour_service_backends_in_table",
            "Distinct backends (ip:port) in the service's kernel tables, over all its VIPs and ports.",
            services
                .iter()
                .map(|s| (service_labels(s), saturating_i64(s.backends_in_table))),
        )?;
        // An info metric: `prometheus-client` appends `_info` and writes the value 1.
        let mut family = e.encode_descriptor(
            "detour_service_tier",
            "Always 1, one series per frontend (VIP:port) of a service; the tier label names \
             the best tier currently serving that frontend.",
            None,
            MetricType::Info,
        )?;
        for s in services {
            for (frontend, tier) in &s.tiers {
                family.encode_info(&[
                    ("service", s.service.as_str()),
                    ("frontend", frontend.as_str()),
                    ("tier", tier.as_str()),
                ])?;
            }
        }

        counter(
            e,
            "detour_events_received",
            "Connection events read from the kernel ring buffer.",
            snapshot.events_received,
        )?;
        counter(
            e,
            "detour_events_dropped",
            "Connection events the kernel dropped because the ring buffer was full.",
            snapshot.events_dropped,
        )?;

        let reconcile = &snapshot.reconcile;
        let mut family = e.encode_descriptor(
            "detour_reconcile_duration",
            "Seconds an apply takes: re-planning the services a change touched (config, health, ejection) and writing the BPF maps.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        // Per-bucket (not cumulative) counts: the encoder accumulates them and adds the
        // `+Inf` bucket from the total count.
        let buckets: Vec<(f64, u64)> = HISTOGRAM_BUCKETS
            .iter()
            .zip(&reconcile.counts)
            .map(|(bound, n)| (bound.as_secs_f64(), *n))
            .collect();
        family.encode_histogram::<NoLabelSet>(
            reconcile.sum.as_secs_f64(),
            reconcile.count,
            &buckets,
            None,
        )?;

        counters(
            e,
            "detour_config_reloads",
            "Configuration reloads, by result: ok or error.",
            [
                ([("result", "ok")], snapshot.config_reloads_ok),
                ([("result", "error")], snapshot.config_reloads_failed),
            ],
        )?;
        counter(
            e,
            "detour_sockets_destroyed",
            "Client sockets the agent destroyed because their backend left the table.",
            snapshot.sockets_destroyed,
        )?;
        counters(
            e,
            "detour_fast_path_connects",
            "Connects whose random pick the kernel found suspect, by where they went: another table member, the standby set, or the pick anyway (all suspect).",
            [
                ("avoided", snapshot.fast_path_avoided),
                ("standby", snapshot.fast_path_standby),
                ("all-suspect", snapshot.fast_path_all_suspect),
            ]
            .map(|(path, n)| ([("path", path)], n)),
        )?;
        {
            let omitted = ConstGauge::new(saturating_i64(snapshot.backends_omitted));
            omitted.encode(e.encode_descriptor(
                "detour_metrics_backends_omitted",
                "Backends (service, address) whose per-backend series this scrape leaves out: more than --metrics-backend-limit of them (detour endpoints shows them all); 0 when every one is exported.",
                None,
                MetricType::Gauge,
            )?)?;
        }
        gauges(
            e,
            "detour_kernel_feature",
            "Each kernel piece detour probed at start: 1 when present and used, 0 when missing (an optional one is then off; `detour kernel` says what that costs).",
            snapshot
                .kernel_features
                .iter()
                .map(|(feature, on)| ([("feature", feature.as_str())], i64::from(*on))),
        )?;
        gauges(
            e,
            "detour_dns_name_addresses",
            "Addresses each DNS name an endpoint is given by serves now: its last good answer's (0 until it has resolved once).",
            snapshot
                .names
                .iter()
                .map(|n| ([("name", n.name.as_str())], saturating_i64(n.addresses))),
        )?;
        gauges(
            e,
            "detour_dns_name_failing",
            "1 while the last lookup of the DNS name failed or answered no address: its last good addresses keep serving (detour names shows the error).",
            snapshot
                .names
                .iter()
                .map(|n| ([("name", n.name.as_str())], i64::from(n.failing))),
        )?;
        counter(
            e,
            "detour_dns_lookup_failures",
            "DNS lookups of endpoint names that failed or answered no address.",
            snapshot.dns_lookup_failures,
        )?;
        if let Some(steer) = &snapshot.steering {
            counter(
                e,
                "detour_steer_steered",
                "Handshakes whose SYN went unanswered for the handshake timeout and that were steered to another backend (a flow steered twice counts twice).",
                steer.steered,
            )?;
            counter(
                e,
                "detour_steer_no_candidate",
                "Stalled handshakes left alone: no other backend qualified (untried, not suspect, same address family).",
                steer.no_candidate,
            )?;
            counter(
                e,
                "detour_steer_table_full",
                "Stalled handshakes not steered because the translation table was full (--max-steered-flows); they fail as without steering.",
                steer.table_full,
            )?;
            counter(
                e,
                "detour_steer_unseen",
                "Steerings undone because the steering program never saw the flow: it leaves by a device not in --steer-devices.",
                steer.unseen,
            )?;
            counter(
                e,
                "detour_steer_collisions",
                "Steerings undone at their first packet because the new 4-tuple was already a socket's at this host; the flow is steered elsewhere at its next timeout.",
                steer.collisions,
            )?;
            counter(
                e,
                "detour_steer_refusals_held",
                "Resets refusing a rewritten connect that were held back (dropped) because another backend could take the flow; it is steered at its handshake timeout instead of failing.",
                steer.refusals_held,
            )?;
            counter(
                e,
                "detour_steer_icmp_translated",
                "ICMP errors (unreachable, fragmentation needed / packet too big, time exceeded) about a steered flow's packets to its new backend, translated so that its socket takes them.",
                steer.icmp_translated,
            )?;
            counter(
                e,
                "detour_steer_late_dropped",
                "Packets from the backend a flow was steered away from (a late SYN-ACK), and ICMP errors about the flow's packets to it, dropped.",
                steer.late_dropped,
            )?;
            gauge(
                e,
                "detour_steer_flows",
                "Steered flows now open.",
                saturating_i64(steer.live),
            )?;
            gauge(
                e,
                "detour_steer_table_entries",
                "Entries in the translation table, closed flows in their 60 s grace included.",
                saturating_i64(steer.entries),
            )?;
            gauge(
                e,
                "detour_steer_table_capacity",
                "Entries the translation table holds (--max-steered-flows).",
                saturating_i64(steer.capacity),
            )?;
        }
        let tls = &snapshot.originator;
        gauge(
            e,
            "detour_tls_listeners",
            "Frontends of services with `tls` that the TLS originator listens for.",
            saturating_i64(tls.listeners as u64),
        )?;
        gauge(
            e,
            "detour_tls_connections",
            "Connections the TLS originator relays now (at most --tls-max-connections).",
            saturating_i64(tls.active as u64),
        )?;
        counter(
            e,
            "detour_tls_connections_accepted",
            "Connections applications made to services with `tls`, accepted by the originator.",
            tls.accepted,
        )?;
        counter(
            e,
            "detour_tls_connections_relayed",
            "Accepted connections relayed to a backend: its TCP and TLS handshakes completed.",
            tls.relayed,
        )?;
        counter(
            e,
            "detour_tls_attempts_failed",
            "Backend attempts that failed (TCP connect or TLS handshake); each counts for outlier detection, and the connection tries the next backend.",
            tls.attempts_failed,
        )?;
        counters(
            e,
            "detour_tls_connections_reset",
            "Accepted connections the originator reset: every backend tried failed or there was none (no-backend), or --tls-max-connections were open (over-limit).",
            [
                ([("reason", "no-backend")], tls.gave_up),
                ([("reason", "over-limit")], tls.over_limit),
            ],
        )?;
        counters(
            e,
            "detour_tls_bytes",
            "Bytes the originator relayed, of connections that have ended: up (application to backend) and down.",
            [
                ([("direction", "up")], tls.bytes_up),
                ([("direction", "down")], tls.bytes_down),
            ],
        )?;
        let over = &snapshot.services_over_limit;
        gauges(
            e,
            "detour_services_refused",
            "Services not programmed because the BPF maps have no room for them, by the limit they hit (the agent's --max-services, --max-backends, --max-slots).",
            over.iter()
                .map(|l| ([("limit", l.limit.as_str())], saturating_i64(l.refused))),
        )?;
        gauges(
            e,
            "detour_services_not_updated",
            "Running services whose new state has no room in the BPF maps, by the limit they hit; they keep their previous tables.",
            over.iter()
                .map(|l| ([("limit", l.limit.as_str())], saturating_i64(l.not_updated))),
        )
    }
}

/// A counter family; `name` is without `_total`, which the encoder appends.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter without labels; `name` is without `_total`, which the encoder appends.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, i64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Gauges are signed in `prometheus-client`; a count past `i64::MAX` cannot happen, and
/// saturating keeps it from turning negative if it ever did.
fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn service_labels(s: &ServiceMetrics) -> [(&'static str, &str); 1] {
    [("service", s.service.as_str())]
}

fn address_labels(a: &AddressMetrics) -> [(&'static str, &str); 1] {
    [("backend", a.backend.as_str())]
}

fn backend_labels(b: &BackendMetrics) -> [(&'static str, &str); 3] {
    [
        ("service", b.service.as_str()),
        ("backend", b.backend.as_str()),
        ("locality", b.locality.as_str()),
    ]
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
/// Other paths get 404, other methods 405, a malformed request 400 (hyper's parser
/// decides what is malformed), a request head larger than [`MAX_REQUEST_HEAD`] 431, a
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
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // Taking a slot before accepting leaves excess clients in the kernel's backlog
        // instead of in memory here.
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(error) => {
                // Usually out of file descriptors; pausing lets some close instead of
                // spinning on the error.
                warn!(%error, ?backoff, "metrics: accept failed; pausing");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            handle(stream, peer, render, limits).await;
            drop(slot);
        });
    }
}

/// Serves one request on `stream` with hyper, then closes it.
async fn handle<F, Fut>(mut stream: TcpStream, peer: SocketAddr, render: Arc<F>, limits: Limits)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let render = Arc::clone(&render);
        async move { Ok::<_, Infallible>(respond(&request, &*render).await) }
    });
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(limits.max_head)
        .keep_alive(false);
    // hyper borrows the stream, so that it is still ours afterwards to answer a timed-out
    // head and to drain.
    let connection = http.serve_connection(TokioIo::new(&mut stream), service);
    let deadline = limits.head_timeout + limits.response_timeout;
    match tokio::time::timeout(deadline, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) if error.is_timeout() => {
            // hyper closes without a word when the head is late; a status says why.
            debug!(%peer, "metrics: request head not received in time");
            let written = tokio::time::timeout(limits.response_timeout, async {
                stream.write_all(REQUEST_TIMEOUT_RESPONSE).await?;
                stream.shutdown().await
            })
            .await;
            if let Ok(Err(error)) = written {
                debug!(%peer, %error, "metrics: writing the 408 failed");
            }
        }
        Ok(Err(error)) => debug!(%peer, %error, "metrics: connection failed"),
        Err(_elapsed) => {
            debug!(%peer, ?deadline, "metrics: connection outlived its deadline; closing");
            return;
        }
    }

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
}

/// What the server sends when a client's head is late; hyper sends nothing then.
const REQUEST_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 20\r\n\
connection: close\r\n\
\r\n\
408 Request Timeout\n";

/// The response to one parsed request.
async fn respond<F, Fut>(request: &Request<Incoming>, render: &F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    // Origin form (`/metrics`) and absolute form (`http://host/metrics`) carry a path;
    // authority form (`host:port`) and asterisk form (`*`) do not, and are not for us.
    let path = request.uri().path();
    if !path.starts_with('/') {
        return error(StatusCode::BAD_REQUEST);
    }
    if path != "/metrics" {
        return error(StatusCode::NOT_FOUND);
    }
    match *request.method() {
        // hyper leaves the body out for HEAD and keeps its length.
        Method::GET | Method::HEAD => Response::builder()
            .header(header::CONTENT_TYPE, CONTENT_TYPE)
            .header(header::CONNECTION, "close")
            .body(Full::new(Bytes::from(render().await)))
            .expect("a response from valid parts"),
        _ => {
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED);
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            response
        }
    }
}

fn error(status: StatusCode) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONNECTION, "close")
        .body(Full::new(Bytes::from(format!("{status}\n"))))
        .expect("a response from valid parts")
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
            addresses: vec![
                AddressMetrics {
                    backend: "10.0.0.1:80".into(),
                    connects: 10,
                    established: 7,
                    failures_refused: 1,
                    failures_timeout: 2,
                    failures_reset: 0,
                    aborts: 4,
                },
                AddressMetrics {
                    backend: "10.0.0.2:80".into(),
                    connects: 3,
                    established: 3,
                    ..AddressMetrics::default()
                },
            ],
            backends: vec![
                BackendMetrics {
                    ejections: 1,
                    ejected: true,
                    healthy: Some(false),
                    in_table: false,
                    ..backend("web", "10.0.0.1:80", "eu/a")
                },
                BackendMetrics {
                    healthy: None,
                    in_table: true,
                    ..backend("web", "10.0.0.2:80", "eu/b")
                },
            ],
            services: vec![ServiceMetrics {
                service: "web".into(),
                tiers: vec![
                    ("127.200.0.1:80".into(), "same-region".into()),
                    ("[fd00::1]:80".into(), "failover[0]:us-west".into()),
                ],
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
            services_over_limit: vec![
                LimitMetrics {
                    limit: "max-services".into(),
                    refused: 2,
                    not_updated: 0,
                },
                LimitMetrics {
                    limit: "max-slots".into(),
                    refused: 0,
                    not_updated: 1,
                },
            ],
            kernel_features: vec![
                ("socket_destroy".into(), true),
                ("syn_linear_timeouts".into(), false),
            ],
            backends_omitted: 0,
            names: vec![NameMetrics {
                name: "east.example".into(),
                addresses: 2,
                failing: true,
            }],
            dns_lookup_failures: 3,
            originator: crate::originator::StatsView {
                listeners: 1,
                active: 2,
                accepted: 10,
                relayed: 8,
                attempts_failed: 3,
                gave_up: 1,
                over_limit: 1,
                reports_dropped: 0,
                bytes_up: 100,
                bytes_down: 2000,
            },
            steering: None,
        }
    }

    #[test]
    fn steering_series_appear_only_where_steering_runs() {
        let off = render(&small_snapshot());
        assert!(!off.contains("detour_steer_"), "{off}");
        let mut snapshot = small_snapshot();
        snapshot.steering = Some(SteerMetrics {
            steered: 7,
            unseen: 1,
            entries: 3,
            capacity: 16_384,
            live: 2,
            ..SteerMetrics::default()
        });
        let on = render(&snapshot);
        for line in [
            "detour_steer_steered_total 7",
            "detour_steer_unseen_total 1",
            "detour_steer_table_full_total 0",
            "detour_steer_flows 2",
            "detour_steer_table_entries 3",
            "detour_steer_table_capacity 16384",
        ] {
            assert!(on.lines().any(|l| l == line), "{line} missing in\n{on}");
        }
    }

    #[test]
    fn renders_a_small_snapshot_exactly() {
        let expected = r#"# HELP detour_backend_connects_total Connects the kernel rewrote to the backend address, through any service.
# TYPE detour_backend_connects_total counter
detour_backend_connects_total{backend="10.0.0.1:80"} 10
detour_backend_connects_total{backend="10.0.0.2:80"} 3
# HELP detour_backend_established_total Connections to the backend address that were established.
# TYPE detour_backend_established_total counter
detour_backend_established_total{backend="10.0.0.1:80"} 7
detour_backend_established_total{backend="10.0.0.2:80"} 3
# HELP detour_backend_failures_total Connections to the backend address that failed, by kind: refused (handshake refused or reset), timeout (SYN unanswered) or reset (established, then reset by the backend).
# TYPE detour_backend_failures_total counter
detour_backend_failures_total{backend="10.0.0.1:80",kind="refused"} 1
detour_backend_failures_total{backend="10.0.0.1:80",kind="timeout"} 2
detour_backend_failures_total{backend="10.0.0.1:80",kind="reset"} 0
detour_backend_failures_total{backend="10.0.0.2:80",kind="refused"} 0
detour_backend_failures_total{backend="10.0.0.2:80",kind="timeout"} 0
detour_backend_failures_total{backend="10.0.0.2:80",kind="reset"} 0
# HELP detour_backend_aborts_total Established connections to the backend address that this node ended without a close: an application abort (SO_LINGER 0, unread data) or a TCP timeout. Not a backend failure.
# TYPE detour_backend_aborts_total counter
detour_backend_aborts_total{backend="10.0.0.1:80"} 4
detour_backend_aborts_total{backend="10.0.0.2:80"} 0
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
# HELP detour_service_backends_in_table Distinct backends (ip:port) in the service's kernel tables, over all its VIPs and ports.
# TYPE detour_service_backends_in_table gauge
detour_service_backends_in_table{service="web"} 1
# HELP detour_service_tier_info Always 1, one series per frontend (VIP:port) of a service; the tier label names the best tier currently serving that frontend.
# TYPE detour_service_tier_info gauge
detour_service_tier_info{service="web",frontend="127.200.0.1:80",tier="same-region"} 1
detour_service_tier_info{service="web",frontend="[fd00::1]:80",tier="failover[0]:us-west"} 1
# HELP detour_events_received_total Connection events read from the kernel ring buffer.
# TYPE detour_events_received_total counter
detour_events_received_total 100
# HELP detour_events_dropped_total Connection events the kernel dropped because the ring buffer was full.
# TYPE detour_events_dropped_total counter
detour_events_dropped_total 4
# HELP detour_reconcile_duration_seconds Seconds an apply takes: re-planning the services a change touched (config, health, ejection) and writing the BPF maps.
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
# HELP detour_metrics_backends_omitted Backends (service, address) whose per-backend series this scrape leaves out: more than --metrics-backend-limit of them (detour endpoints shows them all); 0 when every one is exported.
# TYPE detour_metrics_backends_omitted gauge
detour_metrics_backends_omitted 0
# HELP detour_kernel_feature Each kernel piece detour probed at start: 1 when present and used, 0 when missing (an optional one is then off; `detour kernel` says what that costs).
# TYPE detour_kernel_feature gauge
detour_kernel_feature{feature="socket_destroy"} 1
detour_kernel_feature{feature="syn_linear_timeouts"} 0
# HELP detour_dns_name_addresses Addresses each DNS name an endpoint is given by serves now: its last good answer's (0 until it has resolved once).
# TYPE detour_dns_name_addresses gauge
detour_dns_name_addresses{name="east.example"} 2
# HELP detour_dns_name_failing 1 while the last lookup of the DNS name failed or answered no address: its last good addresses keep serving (detour names shows the error).
# TYPE detour_dns_name_failing gauge
detour_dns_name_failing{name="east.example"} 1
# HELP detour_dns_lookup_failures_total DNS lookups of endpoint names that failed or answered no address.
# TYPE detour_dns_lookup_failures_total counter
detour_dns_lookup_failures_total 3
# HELP detour_tls_listeners Frontends of services with `tls` that the TLS originator listens for.
# TYPE detour_tls_listeners gauge
detour_tls_listeners 1
# HELP detour_tls_connections Connections the TLS originator relays now (at most --tls-max-connections).
# TYPE detour_tls_connections gauge
detour_tls_connections 2
# HELP detour_tls_connections_accepted_total Connections applications made to services with `tls`, accepted by the originator.
# TYPE detour_tls_connections_accepted_total counter
detour_tls_connections_accepted_total 10
# HELP detour_tls_connections_relayed_total Accepted connections relayed to a backend: its TCP and TLS handshakes completed.
# TYPE detour_tls_connections_relayed_total counter
detour_tls_connections_relayed_total 8
# HELP detour_tls_attempts_failed_total Backend attempts that failed (TCP connect or TLS handshake); each counts for outlier detection, and the connection tries the next backend.
# TYPE detour_tls_attempts_failed_total counter
detour_tls_attempts_failed_total 3
# HELP detour_tls_connections_reset_total Accepted connections the originator reset: every backend tried failed or there was none (no-backend), or --tls-max-connections were open (over-limit).
# TYPE detour_tls_connections_reset_total counter
detour_tls_connections_reset_total{reason="no-backend"} 1
detour_tls_connections_reset_total{reason="over-limit"} 1
# HELP detour_tls_bytes_total Bytes the originator relayed, of connections that have ended: up (application to backend) and down.
# TYPE detour_tls_bytes_total counter
detour_tls_bytes_total{direction="up"} 100
detour_tls_bytes_total{direction="down"} 2000
# HELP detour_services_refused Services not programmed because the BPF maps have no room for them, by the limit they hit (the agent's --max-services, --max-backends, --max-slots).
# TYPE detour_services_refused gauge
detour_services_refused{limit="max-services"} 2
detour_services_refused{limit="max-slots"} 0
# HELP detour_services_not_updated Running services whose new state has no room in the BPF maps, by the limit they hit; they keep their previous tables.
# TYPE detour_services_not_updated gauge
detour_services_not_updated{limit="max-services"} 0
detour_services_not_updated{limit="max-slots"} 1
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
                tiers: vec![("127.0.0.1:80".into(), "failover[0]:x\"y".into())],
                ..ServiceMetrics::default()
            }],
            ..Snapshot::default()
        };
        let rendered = render(&snapshot);
        assert!(
            rendered.contains(
                r#"detour_service_tier_info{service="a\\b\"c\nd",frontend="127.0.0.1:80",tier="failover[0]:x\"y"} 1"#
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
            .or_else(|| head.strip_prefix("HTTP/1.0 "))
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
        // 50 (one tier line per frontend: two; one aborts line per address: two), the
        // omitted-backends gauge, the two kernel features, the two families of services over a map limit (2 samples
        // each here), the three DNS families (one name), the TLS originator's (nine samples).
        assert_eq!(samples, 50 + 1 + 2 + 4 + 3 + 9);

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
    #[tokio::test]
    async fn routes_requests() {
        let addr = start(Limits::default()).await;
        let get = |request: &'static str| async move { exchange(addr, request.as_bytes()).await.0 };
        assert_eq!(get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await, 200);
        assert_eq!(get("GET /metrics?x=1 HTTP/1.0\r\n\r\n").await, 200);
        assert_eq!(get("GET /metrics HTTP/1.1\nHost: x\n\n").await, 200);
        assert_eq!(
            get("GET http://x/metrics HTTP/1.1\r\nHost: x\r\n\r\n").await,
            200
        );
        assert_eq!(get("HEAD /metrics HTTP/1.1\r\n\r\n").await, 200);
        assert_eq!(get("GET / HTTP/1.1\r\n\r\n").await, 404);
        assert_eq!(get("GET /metricsx HTTP/1.1\r\n\r\n").await, 404);
        assert_eq!(get("POST /metrics HTTP/1.1\r\n\r\n").await, 405);
        assert_eq!(get("DELETE /metrics HTTP/1.1\r\n\r\n").await, 405);
        for bad in [
            "GET /metrics\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 x\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET /metrics SPDY/3\r\n\r\n",
            "G(T /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET /metrics HTTP/2.0\r\n\r\n",
        ] {
            assert_eq!(get(bad).await, 400, "{bad:?}");
        }
    }

    /// Prometheus' own scrape request, answered over TCP and read by a Prometheus text
    /// parser: every sample line is understood, with its type, labels and value.
    #[tokio::test]
    async fn a_scrape_parses_as_prometheus_text_with_the_snapshot_values() {
        use prometheus_parse::{Scrape, Value};

        let addr = start(Limits::default()).await;
        let (status, head, body) = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nUser-Agent: Prometheus/3.0.0\r\n\
              Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1\r\n\
              X-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(header(&head, "content-type"), Some(CONTENT_TYPE));
        let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();

        // The parser skips lines it cannot read, so first check that it read them all:
        // the histogram's 17 bucket lines become one sample, its _sum and _count one each.
        let sample_lines = body.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(sample_lines, 50 + 1 + 2 + 4 + 3 + 9);
        assert_eq!(scrape.samples.len(), 50 + 1 + 2 + 4 + 3 + 9 - 17 + 1);
        assert_eq!(
            scrape.docs.len(),
            17 + 2 + 2 + 3 + 7,
            "{:?}",
            scrape.docs.keys()
        );
        assert_eq!(
            scrape.docs["detour_backend_ejections_total"],
            "Times outlier detection ejected the backend."
        );

        let find = |metric: &str, labels: &[(&str, &str)]| {
            let found: Vec<_> = scrape
                .samples
                .iter()
                .filter(|s| {
                    s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .collect();
            assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
            found[0].value.clone()
        };
        let a = [
            ("service", "web"),
            ("backend", "10.0.0.1:80"),
            ("locality", "eu/a"),
        ];
        let b = [
            ("service", "web"),
            ("backend", "10.0.0.2:80"),
            ("locality", "eu/b"),
        ];
        // The kernel's counters are per address: labelled by the backend alone.
        assert_eq!(
            find("detour_backend_connects_total", &[a[1]]),
            Value::Counter(10.0)
        );
        assert_eq!(
            find("detour_backend_connects_total", &[b[1]]),
            Value::Counter(3.0)
        );
        assert_eq!(
            find("detour_backend_established_total", &[a[1]]),
            Value::Counter(7.0)
        );
        assert_eq!(
            find(
                "detour_backend_failures_total",
                &[a[1], ("kind", "timeout")]
            ),
            Value::Counter(2.0)
        );
        assert_eq!(
            find("detour_backend_aborts_total", &[a[1]]),
            Value::Counter(4.0)
        );
        assert!(scrape
            .samples
            .iter()
            .filter(|s| s.metric == "detour_backend_connects_total")
            .all(|s| !s.labels.contains_key("service")));
        assert_eq!(find("detour_backend_ejected", &a), Value::Gauge(1.0));
        assert_eq!(find("detour_backend_ejected", &b), Value::Gauge(0.0));
        assert_eq!(find("detour_backend_healthy", &a), Value::Gauge(0.0));
        assert!(!scrape
            .samples
            .iter()
            .any(|s| s.metric == "detour_backend_healthy"
                && s.labels.get("backend") == b[1].1.into()));
        assert_eq!(find("detour_backend_in_table", &b), Value::Gauge(1.0));
        assert_eq!(
            find("detour_services_refused", &[("limit", "max-services")]),
            Value::Gauge(2.0)
        );
        assert_eq!(
            find("detour_services_not_updated", &[("limit", "max-slots")]),
            Value::Gauge(1.0)
        );
        let web = [("service", "web")];
        assert_eq!(
            find("detour_service_backends_in_table", &web),
            Value::Gauge(1.0)
        );
        assert_eq!(
            find(
                "detour_service_tier_info",
                &[("frontend", "127.200.0.1:80"), ("tier", "same-region")]
            ),
            Value::Gauge(1.0)
        );
        assert_eq!(
            find(
                "detour_service_tier_info",
                &[
                    ("frontend", "[fd00::1]:80"),
                    ("tier", "failover[0]:us-west")
                ]
            ),
            Value::Gauge(1.0)
        );
        assert_eq!(
            find("detour_events_received_total", &[]),
            Value::Counter(100.0)
        );
        assert_eq!(
            find("detour_config_reloads_total", &[("result", "error")]),
            Value::Counter(1.0)
        );
        assert_eq!(
            find(
                "detour_fast_path_connects_total",
                &[("path", "all-suspect")]
            ),
            Value::Counter(8.0)
        );

        let Value::Histogram(buckets) = find("detour_reconcile_duration_seconds", &[]) else {
            panic!("the reconcile duration is a histogram");
        };
        let buckets: Vec<(f64, f64)> = buckets.iter().map(|b| (b.less_than, b.count)).collect();
        assert_eq!(buckets.len(), HISTOGRAM_BUCKETS.len() + 1);
        assert_eq!(buckets[1], (0.00025, 0.0));
        assert_eq!(buckets[2], (0.0005, 1.0));
        assert_eq!(buckets[4], (0.0025, 2.0));
        assert_eq!(buckets[16], (f64::INFINITY, 2.0));
        let value = |metric: &str| match find(metric, &[]) {
            Value::Untyped(v) | Value::Gauge(v) | Value::Counter(v) => v,
            other => panic!("{metric}: {other:?}"),
        };
        assert_eq!(value("detour_reconcile_duration_seconds_sum"), 0.0023);
        assert_eq!(value("detour_reconcile_duration_seconds_count"), 2.0);
    }

    #[tokio::test]
    async fn connections_past_the_limit_wait_and_are_then_served() {
        let limits = Limits {
            head_timeout: Duration::from_millis(300),
            max_connections: 1,
            ..Limits::default()
        };
        let addr = start(limits).await;
        // Holds the only slot until its head times out.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;

        let started = std::time::Instant::now();
        let (status, _, _) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 200);
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "served while the slot was taken: {:?}",
            started.elapsed()
        );
        let mut response = Vec::new();
        slow.read_to_end(&mut response).await.unwrap();
        assert!(response.starts_with(b"HTTP/1.1 408 "), "{response:?}");
    }
}
