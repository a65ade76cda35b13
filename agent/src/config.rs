//! The standalone YAML configuration: the node's locality and labels and, per service, its VIPs,
//! ports, endpoints, locality failover policy, active health check, passive outlier
//! detection and what happens to open connections when a backend goes away.
//!
//! It is parsed and validated here, in one place, so the rest of the agent receives a
//! [`Config`] it can trust and never re-checks it on the hot path. This module only turns
//! a `&str` into a `Config`; reading the file happens elsewhere.
//!
//! Field names are Istio's where the concept is the same (`ServiceEntry.ports[].number`,
//! `name`, `targetPort`; `endpoints[].address`, `ports`, `weight`, `locality`, `labels`;
//! `DestinationRule...localityLbSetting.enabled`, `failover[].from/to`,
//! `failoverPriority` (matched against `node.labels`);
//! `DestinationRule...outlierDetection.consecutiveErrors`, `consecutive5xxErrors`,
//! `consecutiveLocalOriginFailures`, `interval`, `baseEjectionTime`, `maxEjectionTime`,
//! `maxEjectionPercent`, `minHealthPercent`), plus detour's own `failoverOrder` (an
//! ordered list, like Gloo's ordered `backingServices`), `localityLbSetting.spill` and
//! `overprovisioningFactor` (Envoy's), `outlierDetection.handshakeTimeout`,
//! `terminateConnections` and `healthCheck`. Unknown fields are rejected: a typo must not
//! silently do nothing. Istio outlier fields that only make sense for HTTP responses
//! (`consecutiveGatewayErrors`, `splitExternalLocalOriginErrors`) are refused with the
//! reason, because detour works at connect time and never sees a response.
//!
//! Invariants of every `Config` that [`parse`] returns:
//! - services keep their file order; names match `[a-z0-9]([-a-z0-9.]*[a-z0-9])?`,
//!   are at most 253 characters and are unique;
//! - a service has at least one VIP (one allocated from [`ParseOptions::vip_range`] when
//!   it gives only `hosts`) and one port; its VIPs, port numbers and port names are
//!   unique within it, and each VIP:port pair belongs to exactly one service; a host
//!   belongs to exactly one service;
//! - when a service has endpoints and names none by DNS, each VIP family (IPv4, IPv6)
//!   it uses has at least one endpoint of that family, because a connect() can only be
//!   rewritten within its own family (a name's families are known only once it resolves,
//!   and [`crate::sources::dns::expand`] keeps to the VIPs' families);
//! - no address is unspecified or multicast; an endpoint's address is a DNS name only
//!   with `resolution: DNS`; endpoint `ports` keys name ports of their service; weights
//!   are in `1..=1_000_000`; no two endpoints of a service are the same backend (same
//!   address, or the same name, and the same port for every service port);
//! - failover rules have non-empty, distinct `from` and `to`; `failoverOrder` entries
//!   are non-empty;
//! - health checks have `interval >= 10ms`, `0 < timeout <= interval`, thresholds `>= 1`;
//! - outlier detection is a valid [`EjectionPolicy`] (non-zero `interval` and
//!   `baseEjectionTime`, `baseEjectionTime <= maxEjectionTime`, durations at most
//!   [`crate::outlier::MAX_POLICY_DURATION`], percentages in `0..=100`), set from at most
//!   one of the three consecutive-failure fields, with `handshakeTimeout` in `10ms..=10s`;
//! - spill is `strict`, or `gradual` with an overprovisioning factor `>= 100` (percent);
//!   a factor is only accepted with `gradual`;
//! - `tls` is set only for `mode: SIMPLE` (`DISABLE` leaves it unset), its `sni` is a
//!   DNS name and its `caCertificates` an absolute path (the file is read when the
//!   service is applied, not here); a service with `tls` is checked by `tcp` (a TLS
//!   handshake, [`crate::health`]) or not at all.
//!
//! Every error names the field path (`services[1].vips[0]`) and, where the YAML has it,
//! the line. The YAML is read by serde-saphyr (serde_yaml is unmaintained), with
//! serde_path_to_error around it for the path. Checks on a single value run inside
//! deserialization, where serde-saphyr knows the position; checks across fields run
//! afterwards and find the line by walking the YAML's events once more with
//! granit-parser, the parser serde-saphyr itself uses (and re-exports), so the walk
//! reads the text exactly as the deserializer did. serde-saphyr's `Spanned<T>` would
//! give those lines too, but only by wrapping every raw field, and it points at a
//! value where errors here point at its key (`vips:`, not the list under it).
//!
//! Hostile text is bounded before it costs anything: at most [`MAX_DOCUMENT_BYTES`],
//! one document, nesting at most 32 deep (block or flow, so the stack is safe), and
//! alias expansion capped so that a "billion laughs" document is refused in well under
//! a second. The walk for lines only runs on text the deserializer accepted, and never
//! expands aliases.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use smallvec::SmallVec;

use crate::intern::intern;

mod istio;
use crate::outlier::{EjectionPolicy, EjectionSettings, OutlierError};
use crate::selection::{Spill, Tier};

/// The whole standalone configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub node: NodeConfig,
    /// In file order. Read-only once parsed: `by_name` indexes it. Shared, so that a
    /// source that rebuilds its model per change (Kubernetes) reuses what did not
    /// change, and a diff tells a reused service from an edited one by pointer.
    pub services: Vec<Arc<ServiceConfig>>,
    /// Position of each service in `services`, so that a lookup by name costs O(1):
    /// reloads and kernel events look services up by name, and a scan made them
    /// quadratic at 100,000 services. Shared between a configuration and the next one
    /// made by [`Config::with_replaced`], which names the same services in the same
    /// order.
    by_name: Arc<HashMap<String, usize>>,
    /// What parsing noticed and let pass (an allocated VIP that moved past a taken one),
    /// for [`Config::warnings`].
    notes: Vec<ConfigWarning>,
}

impl Config {
    /// The service with this name, if any.
    #[must_use]
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.by_name.get(name).map(|&at| &*self.services[at])
    }

    /// The priority `endpoint` of `service` is selected at: its own, refined by the
    /// service's `failoverPriority` when it has one. With N labels, an endpoint of
    /// priority p that matches the node on its first k labels is at `p × (N + 1) + N −
    /// k`: every priority keeps its place, and inside it the endpoints that match more
    /// labels come first, as Istio's priority levels do. Locality tiers still order the
    /// endpoints of one level. Validation keeps the result within [`MAX_PRIORITY`].
    #[must_use]
    pub fn priority_of(&self, service: &ServiceConfig, endpoint: &EndpointConfig) -> u32 {
        let labels = &service.locality_lb.failover_priority;
        if labels.is_empty() {
            return endpoint.priority;
        }
        let n = labels.len() as u32;
        let matched = labels
            .iter()
            .take_while(|label| {
                let Some(have) = endpoint_label(endpoint, &label.key) else {
                    return false;
                };
                match &label.value {
                    Some(value) => have == value,
                    None => node_label(&self.node, &label.key) == Some(have),
                }
            })
            .count() as u32;
        endpoint.priority * (n + 1) + (n - matched)
    }

    /// This configuration with each of `services` in place of the service of its name,
    /// when that is all that changes: every one of them replaces a service that has the
    /// same frontends (VIPs and port numbers), so no VIP:port changes hands and the
    /// names and their order stay. `None` otherwise (a new name, or frontends that
    /// differ): [`assemble`] decides then. Costs the replaced services, not a pass over
    /// every service's name, which is what a Kubernetes change needs at 10,000
    /// services.
    #[must_use]
    pub fn with_replaced(&self, services: &[Arc<ServiceConfig>]) -> Option<Self> {
        let mut next = self.clone();
        for service in services {
            let at = *self.by_name.get(&service.name)?;
            let old = &self.services[at];
            let ports = |s: &ServiceConfig| s.ports.iter().map(|p| p.number).collect::<Vec<_>>();
            if old.vips != service.vips || ports(old) != ports(service) {
                return None;
            }
            next.services[at] = service.clone();
        }
        Some(next)
    }

    /// The same configuration, its services marked as read from the file at `path`.
    #[must_use]
    pub fn defined_in(mut self, path: &std::path::Path) -> Self {
        let path = path.display().to_string();
        for service in &mut self.services {
            Arc::make_mut(service).origin = ServiceOrigin::File { path: path.clone() };
        }
        self
    }

    /// Things that are valid but probably not what the user meant, for the agent to log.
    #[must_use]
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let mut warnings = self.notes.clone();
        warnings.extend(self.warnings_of(self.services.iter().map(|s| &**s)));
        warnings
    }

    /// [`Config::warnings`] for `services` only (a source that rebuilds per change says
    /// only what is new).
    pub fn warnings_of<'a>(
        &'a self,
        services: impl Iterator<Item = &'a ServiceConfig>,
    ) -> Vec<ConfigWarning> {
        let mut warnings = Vec::new();
        for service in services {
            if service.endpoints.is_empty() && service.named_endpoints.is_empty() {
                warnings.push(ConfigWarning::NoEndpoints {
                    service: service.name.clone(),
                });
            }
            warnings.extend(self.tier_too_small_to_eject(service));
        }
        warnings
    }

    /// The best tier of `service` in which a `maxEjectionPercent` below 100 allows no
    /// ejection at all. 0% and `consecutiveErrors: 0` turn ejection off on purpose and
    /// are not reported.
    fn tier_too_small_to_eject(&self, service: &ServiceConfig) -> Option<ConfigWarning> {
        let settings = service.outlier_detection.policy.settings();
        let percent = settings.max_ejection_percent;
        if settings.consecutive_failures == 0 || percent == 0 || percent >= 100 {
            return None;
        }
        let mut tiers: BTreeMap<Tier, usize> = BTreeMap::new();
        for endpoint in &service.endpoints {
            let tier = crate::selection::tier_of(
                &self.node.locality,
                &service.locality_lb,
                &endpoint.locality,
                self.priority_of(service, endpoint),
            );
            *tiers.entry(tier).or_default() += 1;
        }
        tiers
            .into_iter()
            .find(|(_, size)| service.outlier_detection.policy.max_ejected(*size) == 0)
            .map(|(tier, tier_size)| ConfigWarning::TierTooSmallToEject {
                service: service.name.clone(),
                tier: tier.to_string(),
                tier_size,
                max_ejection_percent: percent,
            })
    }
}

/// A valid configuration that is probably not what the user meant.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigWarning {
    /// Nothing can be chosen for the service's VIPs until it has endpoints.
    NoEndpoints { service: String },
    /// `maxEjectionPercent` of `tier_size` rounds down to 0, so a failing backend of that
    /// tier is never ejected and the tier never fails over on passive signals.
    TierTooSmallToEject {
        service: String,
        /// The tier as selection names it, e.g. `same-zone` or `failover[0]:us-west`.
        tier: String,
        tier_size: usize,
        max_ejection_percent: u32,
    },
    /// The VIP a service's name hashes to in the VIP range was taken (by another
    /// service's VIP), so it got the next free one: it depends on the other service.
    VipCollision {
        service: String,
        wanted: IpAddr,
        allocated: IpAddr,
        taken_by: String,
    },
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoEndpoints { service } => write!(
                f,
                "service {service:?} has no endpoints: connections to its VIPs have no backend"
            ),
            Self::TierTooSmallToEject {
                service,
                tier,
                tier_size,
                max_ejection_percent,
            } => write!(
                f,
                "service {service:?}: outlierDetection.maxEjectionPercent {max_ejection_percent} \
                 of the {tier_size} endpoint(s) in tier {tier} allows no ejection, so a failing \
                 backend there keeps its connections; detour caps ejection per tier, and 100 \
                 (its default) lets the tier fail over"
            ),
            Self::VipCollision {
                service,
                wanted,
                allocated,
                taken_by,
            } => write!(
                f,
                "service {service:?}: its VIP would be {wanted}, which service {taken_by:?} \
                 has, so it is {allocated}; give one of them `vips` to keep both stable"
            ),
        }
    }
}

/// What the agent knows about the node it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Empty when the file has no `node`; then only `failoverOrder` orders backends.
    pub locality: Locality,
    /// The node's labels, which `failoverPriority` compares endpoints' labels with (the
    /// file's `node.labels`; a Kubernetes Node's own labels, and the cluster's name as
    /// [`well_known::CLUSTER`]).
    pub labels: BTreeMap<String, String>,
}

/// Labels that `failoverPriority` reads from an endpoint's (and the node's) locality
/// and cluster when the labels themselves do not set them: Istio's names.
pub mod well_known {
    pub const REGION: &str = "topology.kubernetes.io/region";
    pub const ZONE: &str = "topology.kubernetes.io/zone";
    pub const SUBZONE: &str = "topology.istio.io/subzone";
    pub const CLUSTER: &str = "topology.istio.io/cluster";
}

/// One failover service: the VIPs that connect() is rewritten from, and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    /// Where applications connect: the file's `vips`, or for a service that gives only
    /// `hosts`, one IPv4 address allocated from the VIP range ([`ParseOptions`]).
    pub vips: Vec<IpAddr>,
    /// DNS names applications use for the service (Istio's `hosts`): the agent's DNS
    /// server answers them with `vips`. Lowercase, unique across services.
    pub hosts: Vec<String>,
    pub ports: Vec<PortConfig>,
    /// May be empty: the service then has no backends (see [`Config::warnings`]).
    /// Endpoints given by IP address, and (once [`crate::sources::dns::expand`] has run)
    /// the addresses its [`named_endpoints`](Self::named_endpoints) resolved to.
    pub endpoints: Vec<EndpointConfig>,
    /// Endpoints given by DNS name (`resolution: DNS`), in file order. Never planned
    /// themselves: the DNS source resolves each name and adds one endpoint per address
    /// to `endpoints` ([`crate::sources::dns`]). Empty for every other service.
    pub named_endpoints: Vec<NamedEndpoint>,
    /// YAML `localityLbSetting`.
    pub locality_lb: LocalityLbSetting,
    /// YAML `healthCheck`.
    pub health_check: HealthCheckConfig,
    /// YAML `outlierDetection`; the defaults when absent, so passive ejection is on.
    pub outlier_detection: OutlierDetectionConfig,
    /// YAML `terminateConnections`, default true: when a backend is ejected, fails its
    /// active health check or is removed, connections detour made to it are destroyed so
    /// applications reconnect to a healthy backend.
    pub terminate_connections: bool,
    /// YAML `tls` (DestinationRule's `trafficPolicy.tls`): when set, detour originates
    /// TLS to the endpoints, and connects to the service's VIPs go through the agent's
    /// originator ([`crate::originator`]) instead of straight to a backend.
    pub tls: Option<TlsOrigination>,
    /// Where the service was defined, as its source says; informational (the CLI shows
    /// it), never read by selection. [`parse`] gives [`ServiceOrigin::File`] without a
    /// path, which [`Config::defined_in`] fills in.
    pub origin: ServiceOrigin,
}

/// TLS that detour originates to a service's endpoints (Istio's `ClientTLSSettings` with
/// `mode: SIMPLE`): the application speaks plain bytes to the VIP, the backends get TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOrigination {
    /// The server name sent (SNI) and checked in the backend's certificate. `None`: the
    /// endpoint's DNS name, or for an endpoint given by IP address, that address.
    pub sni: Option<String>,
    /// A PEM file of the certificate authorities that sign the backends' certificates
    /// (an absolute path, read when the service is applied); `None`: the node's system
    /// roots.
    pub ca_certificates: Option<std::path::PathBuf>,
}

/// The source a service comes from: carried as data on the model, so that the CLI
/// never has to guess it from the service's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ServiceOrigin {
    /// The standalone file; `path` is empty when whoever parsed the text did not say
    /// which file it was.
    #[serde(rename_all = "camelCase")]
    File { path: String },
    /// A `FailoverService`; `take_over` names the existing Service whose ClusterIPs this
    /// service serves, for the services made from its `takeOver` entries.
    #[serde(rename_all = "camelCase")]
    FailoverService {
        namespace: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        take_over: Option<ObjectName>,
    },
}

impl Default for ServiceOrigin {
    /// The file, unnamed: what [`parse`] gives.
    fn default() -> Self {
        Self::File {
            path: String::new(),
        }
    }
}

/// A Kubernetes object's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServiceOrigin {
    /// `file /etc/detour.yaml`, `fos default/reviews-failover`, or
    /// `fos default/reviews-failover, takeover of svc default/reviews`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path } if path.is_empty() => f.write_str("file"),
            Self::File { path } => write!(f, "file {path}"),
            Self::FailoverService {
                namespace,
                name,
                take_over,
            } => {
                write!(f, "fos {namespace}/{name}")?;
                match take_over {
                    Some(service) => write!(f, ", takeover of svc {service}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Passive health: Istio's `DestinationRule.trafficPolicy.outlierDetection` at L4, where
/// every failure is a failed connection.
///
/// Defaults are [`EjectionSettings::default`]: 5 failures in a row, `interval` 10s,
/// `baseEjectionTime` 30s, `maxEjectionTime` 300s, `maxEjectionPercent` 100,
/// `minHealthPercent` 0. `maxEjectionPercent` deliberately defaults to 100, not Istio's
/// 10: detour caps ejection per locality tier, and with 10% a tier of fewer than ten
/// backends could eject none and so never fail over (see
/// [`EjectionSettings::max_ejection_percent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetectionConfig {
    /// Validated ejection policy, built with [`EjectionPolicy::try_new`].
    pub policy: EjectionPolicy,
    /// detour's `handshakeTimeout`: a rewritten connection whose handshake has had no
    /// answer after this long counts as a `timeout` failure (the SYN is retransmitted
    /// then). Default 100ms, allowed `10ms..=10s`.
    pub handshake_timeout: Duration,
}

const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(100);
const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(10);
const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        Self {
            policy: EjectionPolicy::default(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// A service port, as in Istio's `ServiceEntry.ports[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// The port clients connect to on a VIP; never 0.
    pub number: u16,
    /// `port-<number>` when the YAML gives none; endpoints refer to ports by this name.
    pub name: String,
    /// The backend port when an endpoint does not name one; `number` when unset.
    pub target_port: Option<u16>,
    /// Istio's `protocol`. Detour works at L4, so this is informational today; it is
    /// accepted so that an Istio port definition reads unchanged.
    pub protocol: Option<Protocol>,
}

/// Istio's port protocols. Case-insensitive in YAML, as in Istio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    Http,
    Https,
    Grpc,
    GrpcWeb,
    Http2,
    Mongo,
    Tcp,
    Tls,
}

impl Protocol {
    const ALL: [(Self, &'static str); 8] = [
        (Self::Http, "HTTP"),
        (Self::Https, "HTTPS"),
        (Self::Grpc, "GRPC"),
        (Self::GrpcWeb, "GRPC-WEB"),
        (Self::Http2, "HTTP2"),
        (Self::Mongo, "MONGO"),
        (Self::Tcp, "TCP"),
        (Self::Tls, "TLS"),
    ];

    /// Istio's spelling, e.g. `GRPC-WEB`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(protocol, _)| *protocol == self)
            .map_or("", |(_, name)| name)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One backend of a service, as in Istio's `ServiceEntry.endpoints[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub address: IpAddr,
    /// Backend port by service port name ([`intern`]ed), in name order; overrides
    /// `targetPort` and `number`. Not a map: an endpoint names one port or a few, and at
    /// 100,000 endpoints a `BTreeMap` node each was 30 MB; one is held inline.
    pub ports: SmallVec<[(Arc<str>, u16); 1]>,
    /// Share of traffic within its tier, `1..=1_000_000`; 1 when unset.
    pub weight: u32,
    /// Empty when unset: such an endpoint is only ever in the `other` tier. Shared by the
    /// service's endpoints in the same locality (an `Arc` each: 8 bytes, not 48).
    pub locality: Arc<Locality>,
    /// `None` when it has none (nearly always, and in Kubernetes always): a map is 24
    /// bytes even empty, at 100,000 endpoints.
    pub labels: Option<Box<BTreeMap<String, String>>>,
    /// Envoy's priority: 0 (the default) is preferred; an endpoint of priority n serves
    /// only when the endpoints of every lower priority leave traffic over (as Envoy's
    /// priority levels, with locality tiers inside each). A FailoverService's backing
    /// services are priorities 0, 1, ... in their listed order. At most [`MAX_PRIORITY`].
    pub priority: u32,
    /// The cluster the endpoint runs in; empty when the source does not say (the file
    /// may, for what the CLI shows). Informational: selection never reads it.
    /// [`intern`]ed.
    pub cluster: Arc<str>,
}

/// An endpoint whose `address` is a DNS name: every address the name resolves to is an
/// endpoint like `template`, sharing its weight ([`crate::sources::dns::expand`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedEndpoint {
    /// Lowercase, as written otherwise (a trailing dot keeps the resolver's search list
    /// away from it, as in `/etc/resolv.conf`). [`intern`]ed.
    pub hostname: Arc<str>,
    /// Ports, weight, locality, labels, priority and cluster of every address the name
    /// resolves to. Its `address` is the unspecified IPv4 address and is never read:
    /// each resolved address replaces it.
    pub template: EndpointConfig,
}

/// The highest endpoint priority (Envoy has no bound; detour keeps tiers few).
pub const MAX_PRIORITY: u32 = 127;

impl EndpointConfig {
    /// The port to connect to on this endpoint for a connection to `port` on a VIP:
    /// the endpoint's own `ports[name]`, else the port's `targetPort`, else its number.
    #[must_use]
    pub fn port_for(&self, port: &PortConfig) -> u16 {
        self.ports
            .iter()
            .find(|(name, _)| **name == *port.name)
            .map(|(_, number)| *number)
            .or(port.target_port)
            .unwrap_or(port.number)
    }

    /// The backend this endpoint stands for, once per service port.
    fn backends<'a>(&'a self, ports: &'a [PortConfig]) -> impl Iterator<Item = u16> + 'a {
        ports.iter().map(|port| self.port_for(port))
    }
}

/// Where something runs: `region/zone/subzone`, each part possibly unset (empty).
///
/// Parsed from `"us-east1"`, `"us-east1/us-east1-b"` or `"r/z/s"`, and displayed back
/// in the same form. A set part never follows an unset one in a parsed `Locality`.
/// Ordering is lexicographic by region, zone, subzone, for stable output only.
///
/// The parts are [`intern`]ed where detour makes them (parsing, the Kubernetes
/// source): a locality is repeated by every endpoint in it, in every plan and tier, so
/// a clone is three reference-count increments and equal parts share one allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: Arc<str>,
    pub zone: Arc<str>,
    pub subzone: Arc<str>,
}

impl Default for Locality {
    /// No part set.
    fn default() -> Self {
        let empty = intern("");
        Self {
            region: empty.clone(),
            zone: empty.clone(),
            subzone: empty,
        }
    }
}

impl Locality {
    /// True when no part is set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }

    /// True when every set part of `self` equals the same part of `other`, so that
    /// `us-east1` contains `us-east1/us-east1-b`. This is how a failover rule's `from`
    /// matches the node and a failover target matches an endpoint. An empty locality
    /// contains every locality.
    #[must_use]
    pub fn contains(&self, other: &Locality) -> bool {
        [
            (&self.region, &other.region),
            (&self.zone, &other.zone),
            (&self.subzone, &other.subzone),
        ]
        .into_iter()
        .all(|(mine, theirs)| mine.is_empty() || mine == theirs)
    }
}

/// Why a string is not a locality.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalityParseError {
    #[error("locality {input:?} has more than 3 parts (expected region/zone/subzone)")]
    TooManyParts { input: String },
    #[error("locality {input:?} has an empty part (expected region, region/zone or region/zone/subzone)")]
    EmptyPart { input: String },
    #[error("locality {input:?} contains whitespace or a control character")]
    InvalidCharacter { input: String },
}

impl FromStr for Locality {
    type Err = LocalityParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Ok(Self::default());
        }
        let parts: Vec<&str> = input.split('/').collect();
        let owned = || input.to_owned();
        if parts.len() > 3 {
            return Err(LocalityParseError::TooManyParts { input: owned() });
        }
        if parts.iter().any(|part| part.is_empty()) {
            return Err(LocalityParseError::EmptyPart { input: owned() });
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(LocalityParseError::InvalidCharacter { input: owned() });
        }
        let part = |index: usize| intern(parts.get(index).copied().unwrap_or_default());
        Ok(Self {
            region: part(0),
            zone: part(1),
            subzone: part(2),
        })
    }
}

impl fmt::Display for Locality {
    /// Writes the parts up to the last set one, joined by `/`. A `Locality` built by hand
    /// with an unset part before a set one shows it as empty (`/zone`), which does not
    /// parse back: that is deliberate, so such a value stands out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = [&self.region, &self.zone, &self.subzone];
        let len = parts
            .iter()
            .rposition(|part| !part.is_empty())
            .map_or(0, |last| last + 1);
        for (index, part) in parts[..len].iter().enumerate() {
            if index > 0 {
                f.write_str("/")?;
            }
            f.write_str(part)?;
        }
        Ok(())
    }
}

impl Serialize for Locality {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Locality {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LocalityVisitor;
        impl Visitor<'_> for LocalityVisitor {
            type Value = Locality;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a locality like \"us-east1\" or \"us-east1/us-east1-b\"")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Locality, E> {
                value.parse().map_err(E::custom)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Locality, E> {
                Ok(Locality::default())
            }
        }
        deserializer.deserialize_str(LocalityVisitor)
    }
}

/// How endpoints are ordered by locality: Istio's `localityLbSetting`, plus
/// detour's `failoverOrder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityLbSetting {
    /// Istio's `enabled`: when false, locality is ignored and every endpoint is equal.
    pub enabled: bool,
    /// Istio's `failover: [{from, to}]`: rules whose `from` contains the node's locality
    /// name, in order, where to go after the node's own region.
    pub failover: Vec<FailoverRule>,
    /// Where to go next, in order, after the matching `failover` rules' targets.
    pub failover_order: Vec<Locality>,
    /// `spill: strict | gradual` with `overprovisioningFactor` (Envoy's, in percent:
    /// 140 = 1.4, at least 100, only with `gradual`); default gradual 140.
    pub spill: Spill,
    /// Istio's `failoverPriority`: labels, most important first. An endpoint that
    /// matches the node on the first k of N labels (and not on label k+1) is at level
    /// N - k inside its own priority (see [`Config::priority_of`]).
    pub failover_priority: Vec<PriorityLabel>,
}

/// One `failoverPriority` entry: `key` (the endpoint's value must equal the node's) or
/// `key=value` (the endpoint's value must be `value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityLabel {
    pub key: String,
    pub value: Option<String>,
}

impl Default for LocalityLbSetting {
    fn default() -> Self {
        Self {
            enabled: true,
            failover: Vec::new(),
            failover_order: Vec::new(),
            spill: Spill::default(),
            failover_priority: Vec::new(),
        }
    }
}

/// One Istio failover rule: from the node's locality `from`, fail over to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverRule {
    pub from: Locality,
    pub to: Locality,
}

/// Active health checking of a service's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Time between two checks of one endpoint; at least 10ms; default 1s.
    pub interval: Duration,
    /// How long one check may take; `0 < timeout <= interval`; default 500ms, or the
    /// interval when that is shorter.
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy endpoint healthy; default 1.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy endpoint unhealthy; default 2.
    pub unhealthy_threshold: u32,
    pub kind: HealthCheckKind,
}

const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
const MIN_INTERVAL: Duration = Duration::from_millis(10);

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            healthy_threshold: 1,
            unhealthy_threshold: 2,
            kind: HealthCheckKind::Tcp,
        }
    }
}

/// What an active health check does. YAML: `tcp: {}` (the default), `http: {...}` or
/// `disabled: true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// A TCP connect to the endpoint's port succeeds.
    Tcp,
    /// An HTTP/1.1 GET answers with an expected status.
    Http(HttpCheck),
    /// A gRPC `grpc.health.v1.Health/Check` answers SERVING.
    Grpc(GrpcCheck),
    /// No active checks: only what passive health sees of real connections counts.
    None,
}

/// An HTTP/1.1 check, as Envoy's `http_health_check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// Request path; starts with `/`; default `/`.
    pub path: String,
    /// `Host` header; default: the service's name.
    pub host: String,
    /// Status ranges `[start, end)` that count as healthy; default `[200, 201)`.
    pub expected_statuses: Vec<std::ops::Range<u16>>,
}

/// A gRPC health check, as Envoy's `grpc_health_check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCheck {
    /// `HealthCheckRequest.service`; empty (the default) asks about the server as a whole.
    pub service: String,
    /// `:authority` of the call; default: the service's name.
    pub authority: String,
}

impl HttpCheck {
    pub fn expects(&self, status: u16) -> bool {
        self.expected_statuses.iter().any(|r| r.contains(&status))
    }
}

/// A configuration that cannot be used, with where in the file the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{kind}", Where { path, line: *line })]
pub struct ConfigError {
    /// The field, as `services[1].vips[0]`; empty for the document itself.
    pub path: String,
    /// 1-based line of the field in the YAML, when it could be found.
    pub line: Option<usize>,
    pub kind: ConfigErrorKind,
}

/// Writes `path (line N): `, leaving out whichever part is unknown.
struct Where<'a> {
    path: &'a str,
    line: Option<usize>,
}

impl fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line) {
            (false, Some(line)) => write!(f, "{} (line {line}): ", self.path),
            (false, None) => write!(f, "{}: ", self.path),
            (true, Some(line)) => write!(f, "line {line}: "),
            (true, None) => Ok(()),
        }
    }
}

/// What is wrong, without where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// Malformed YAML, an unknown or missing field, a wrong type, or a value its own
    /// field refuses (a bad IP, locality, duration, weight, name or port); `message` is
    /// serde-saphyr's or the field check's text.
    #[error("{message}")]
    Decode { message: String },
    /// The document holds nothing: the most common torn write is a truncated file.
    #[error(
        "the configuration is empty (a file caught mid-write?); to remove every service, \
         write `services: []`"
    )]
    Empty,
    /// More text than [`MAX_DOCUMENT_BYTES`]; not parsed at all.
    #[error("the configuration is {bytes} bytes, more than the {limit} accepted")]
    TooLarge { bytes: usize, limit: usize },
    /// `services` is missing or null: a file cut off after `node:` or `services:`.
    #[error(
        "`services` is missing or empty (a file caught mid-write?); to remove every service, \
         write `services: []`"
    )]
    MissingServices,
    #[error("service name {name:?} is already used by services[{first}]")]
    DuplicateServiceName { name: String, first: usize },
    #[error("a service needs at least one VIP, or `hosts` for detour to allocate one")]
    NoVips,
    #[error("host {host:?} is already a host of service {service:?}")]
    HostInUse { host: String, service: String },
    /// An HTTP or gRPC check on a service whose endpoints speak TLS.
    #[error(
        "the service originates TLS (`tls`), and an HTTP or gRPC check would speak plain \
         text to its TLS port: use a `tcp` check, or none"
    )]
    PlainCheckOfTlsService,
    #[error(
        "detour allocates an IPv4 VIP for a service with `hosts` and no `vips`, and this \
         service's endpoints are all IPv6: give it `vips`"
    )]
    AllocatedVipWithoutIpv4Endpoint,
    #[error("no free address is left in the VIP range {range} for a service without `vips`")]
    VipRangeFull { range: ipnet::Ipv4Net },
    #[error("a service needs at least one port")]
    NoPorts,
    #[error("VIP {vip} is listed twice")]
    DuplicateVip { vip: IpAddr },
    #[error("VIP {vip} is already used by service {service:?}")]
    VipInUse { vip: SocketAddr, service: String },
    #[error("port number {number} is listed twice")]
    DuplicatePortNumber { number: u16 },
    #[error("port name {name:?} is listed twice")]
    DuplicatePortName { name: String },
    #[error("no port of this service is named {name:?} (ports: {})", known.join(", "))]
    UnknownPortName { name: String, known: Vec<String> },
    #[error(
        "VIP {vip} is {family} but no endpoint of this service is: \
         a connect() can only be rewritten to an address of its own family"
    )]
    NoEndpointOfVipFamily { vip: IpAddr, family: IpFamily },
    #[error("endpoint {address} is the same backend as endpoints[{first}]")]
    DuplicateEndpoint { address: IpAddr, first: usize },
    #[error("endpoint {hostname} is the same backend as endpoints[{first}]")]
    DuplicateNamedEndpoint { hostname: String, first: usize },
    /// A DNS name as an endpoint's address of a service that does not resolve names.
    #[error(
        "{hostname:?} is a DNS name, and this service's resolution is STATIC (IP addresses \
         only): set `resolution: DNS` on the service to resolve it"
    )]
    NameNeedsDnsResolution { hostname: String },
    #[error("{field} must not be empty")]
    EmptyLocality { field: &'static str },
    #[error("failover from {from} to the same locality does nothing")]
    FailoverToItself { from: Locality },
    #[error("label {key:?} is already failoverPriority[{first}]")]
    RepeatedPriorityLabel { key: String, first: usize },
    #[error(
        "{labels} labels under {priorities} priorities need {} levels; at most {} fit \
         (fewer labels, or fewer priorities)",
        priorities * (labels + 1), MAX_PRIORITY + 1
    )]
    FailoverPriorityTooDeep { labels: u32, priorities: u32 },
    #[error("timeout {} is longer than the interval {}", humantime::format_duration(*timeout), humantime::format_duration(*interval))]
    TimeoutExceedsInterval {
        timeout: Duration,
        interval: Duration,
    },
    #[error("tcp is set but disabled is true: keep one of them")]
    DisabledCheckConfigured,
    #[error("{first} and {second} are both set: a health check is one kind")]
    ConflictingCheckKinds {
        first: &'static str,
        second: &'static str,
    },
    #[error("path {path:?} must start with `/`")]
    BadHttpPath { path: String },
    #[error("status range [{start}, {end}) is empty or outside 100..=599 (end is exclusive, as in Envoy)")]
    BadStatusRange { start: u16, end: u16 },
    #[error(
        "{keep} and {remove} are both set, and both mean failed connections in a row here \
         (detour works at L4): keep {keep} and remove {remove}"
    )]
    ConflictingConsecutiveCounts {
        keep: &'static str,
        remove: &'static str,
    },
    /// An Istio `outlierDetection` field that needs to see HTTP responses.
    #[error("{field} {reason}")]
    UnsupportedOutlierField {
        field: &'static str,
        reason: &'static str,
    },
    /// Refused by [`EjectionPolicy::try_new`]; the text names the field, as Istio does.
    #[error(transparent)]
    Outlier(OutlierError),
    #[error("overprovisioningFactor only applies to spill: gradual, but spill is strict: remove one of them")]
    OverprovisioningWithStrictSpill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    fn of(address: &IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// Parses and validates a whole configuration.
///
/// An empty document, or one without a `services` list, is an error rather than "no
/// services": a file truncated by a torn write looks exactly like that, and applying it
/// would remove every service. Removing them all takes an explicit `services: []`.
///
/// # Errors
/// The first problem found, with its field path and line.
pub fn parse(yaml: &str) -> Result<Config, ConfigError> {
    parse_with(yaml, &ParseOptions::default())
}

/// What parsing takes from outside the file: the agent's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseOptions {
    /// Where VIPs of services with `hosts` and no `vips` come from (`--vip-range`).
    pub vip_range: ipnet::Ipv4Net,
}

/// Istio's range for addresses it allocates to ServiceEntries (240.240.0.0/16, in the
/// reserved 240.0.0.0/4): never a real host's address, and a connect() to it that
/// detour did not rewrite fails at once instead of reaching someone.
pub const DEFAULT_VIP_RANGE: &str = "240.240.0.0/16";

impl Default for ParseOptions {
    fn default() -> Self {
        Self {
            vip_range: DEFAULT_VIP_RANGE.parse().expect("a valid network"),
        }
    }
}

/// [`parse`], with `options`.
///
/// # Errors
/// The first problem found, with its field path and line.
pub fn parse_with(yaml: &str, options: &ParseOptions) -> Result<Config, ConfigError> {
    if yaml.len() > MAX_DOCUMENT_BYTES {
        return Err(ConfigError {
            path: String::new(),
            line: None,
            kind: ConfigErrorKind::TooLarge {
                bytes: yaml.len(),
                limit: MAX_DOCUMENT_BYTES,
            },
        });
    }
    if istio::is_stream(yaml) {
        return istio::parse_stream(yaml, options);
    }
    let raw = raw_config(yaml)?;
    if raw.services.is_none() {
        return Err(ConfigError {
            path: "services".to_owned(),
            line: line_of(yaml, &FieldPath::default().key("services").0),
            kind: ConfigErrorKind::MissingServices,
        });
    }
    Validator {
        yaml,
        vip_range: options.vip_range,
    }
    .config(raw)
}

/// One detour document, decoded but not yet checked across fields; an empty one is an
/// error ([`ConfigErrorKind::Empty`]).
fn raw_config(yaml: &str) -> Result<RawConfig, ConfigError> {
    // serde-saphyr lends its deserializer to a closure whose error must be its own, so
    // the path serde_path_to_error found is carried out beside it.
    let mut error_path = None;
    let raw: Option<RawConfig> =
        serde_saphyr::with_deserializer_from_str_with_options(yaml, yaml_options(), |de| {
            serde_path_to_error::deserialize(de).map_err(|error| {
                error_path = Some(error.path().clone());
                error.into_inner()
            })
        })
        .map_err(|error| syntax_error(yaml, error_path.as_ref(), &error))?;
    raw.ok_or(ConfigError {
        path: String::new(),
        line: None,
        kind: ConfigErrorKind::Empty,
    })
}

/// Checks one service written in the file's schema by another source (Kubernetes builds
/// one from a FailoverService and its EndpointSlices), with the code that checks the
/// file, so that both sources accept the same services and give the same errors. Paths
/// in errors are relative to the service (`endpoints[3].address`); there are no lines.
///
/// # Errors
/// The first problem found, as [`parse`] reports it for a service of the file.
pub fn service_from_json(value: serde_json::Value) -> Result<ServiceConfig, ConfigError> {
    let raw: RawService = serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        ConfigError {
            path: if path == "." { String::new() } else { path },
            line: None,
            kind: ConfigErrorKind::Decode {
                message: error.into_inner().to_string(),
            },
        }
    })?;
    Validator {
        yaml: "",
        vip_range: ParseOptions::default().vip_range,
    }
    .service(&FieldPath::default(), raw)
}

/// An endpoint's label `key`: its own labels first, then its locality and cluster under
/// their [`well_known`] names.
fn endpoint_label<'a>(endpoint: &'a EndpointConfig, key: &str) -> Option<&'a str> {
    if let Some(value) = endpoint.labels.as_ref().and_then(|labels| labels.get(key)) {
        return Some(value);
    }
    let derived = match key {
        well_known::REGION => &endpoint.locality.region,
        well_known::ZONE => &endpoint.locality.zone,
        well_known::SUBZONE => &endpoint.locality.subzone,
        well_known::CLUSTER => &endpoint.cluster,
        _ => return None,
    };
    Some(&**derived).filter(|v| !v.is_empty())
}

/// The node's label `key`: its labels first, then its locality.
fn node_label<'a>(node: &'a NodeConfig, key: &str) -> Option<&'a str> {
    if let Some(value) = node.labels.get(key) {
        return Some(value);
    }
    let derived = match key {
        well_known::REGION => &node.locality.region,
        well_known::ZONE => &node.locality.zone,
        well_known::SUBZONE => &node.locality.subzone,
        _ => return None,
    };
    Some(&**derived).filter(|v| !v.is_empty())
}

/// A [`Config`] from services checked one by one ([`service_from_json`]), in order of
/// precedence: a service whose name, or one of whose VIP:port pairs, an earlier service
/// already has is left out and returned with why, and the others are kept. This is the
/// Kubernetes rule (the oldest object wins, as Istio's ServiceEntries) where the file
/// refuses itself whole: one bad object must not take the others down.
#[must_use]
pub fn assemble(
    node: NodeConfig,
    candidates: Vec<Arc<ServiceConfig>>,
) -> (Config, Vec<(Arc<ServiceConfig>, ConfigError)>) {
    let mut services: Vec<Arc<ServiceConfig>> = Vec::with_capacity(candidates.len());
    let mut by_name: HashMap<String, usize> = HashMap::with_capacity(candidates.len());
    let mut owners: HashMap<SocketAddr, usize> = HashMap::new();
    let mut left_out = Vec::new();
    'next: for service in candidates {
        if let Some(&first) = by_name.get(&service.name) {
            let kind = ConfigErrorKind::DuplicateServiceName {
                name: service.name.clone(),
                first,
            };
            left_out.push((service, ConfigError::at("name", kind)));
            continue;
        }
        for (vip_index, vip) in service.vips.iter().enumerate() {
            for port in &service.ports {
                let socket = SocketAddr::new(*vip, port.number);
                if let Some(&owner) = owners.get(&socket) {
                    let kind = ConfigErrorKind::VipInUse {
                        vip: socket,
                        service: services[owner].name.clone(),
                    };
                    let error = ConfigError::at(&format!("vips[{vip_index}]"), kind);
                    left_out.push((service, error));
                    continue 'next;
                }
            }
        }
        let at = services.len();
        for vip in &service.vips {
            for port in &service.ports {
                owners.insert(SocketAddr::new(*vip, port.number), at);
            }
        }
        by_name.insert(service.name.clone(), at);
        services.push(service);
    }
    let config = Config {
        node,
        services,
        by_name: Arc::new(by_name),
        notes: Vec::new(),
    };
    (config, left_out)
}

impl ConfigError {
    fn at(path: &str, kind: ConfigErrorKind) -> Self {
        Self {
            path: path.to_owned(),
            line: None,
            kind,
        }
    }
}

/// The largest configuration accepted, in bytes, and the most the agent reads of the
/// file: 100,000 services with ten endpoints each take about 40 MiB, so this leaves room
/// while still bounding what a runaway generator can make the agent hold.
pub const MAX_DOCUMENT_BYTES: usize = 128 * 1024 * 1024;

/// Nesting the config never needs: its deepest field
/// (`services[].healthCheck.http.expectedStatuses[].start`) is six containers down.
const MAX_DEPTH: usize = 32;

/// Events that aliases may replay in all. Anchors are fine for sharing a health check
/// or an outlier policy among services (1,000 services sharing both replay about 25,000
/// events); a document that expands past this is an attack ("billion laughs": a few
/// hundred bytes that expand to billions of nodes).
const MAX_REPLAYED_EVENTS: usize = 50_000;

/// How serde-saphyr reads a config. Its budget is what keeps hostile YAML bounded: alias
/// expansion stops at [`MAX_REPLAYED_EVENTS`], nesting (block or flow) at [`MAX_DEPTH`]
/// before it can exhaust the stack, and a stream holds one document. The other counts
/// are far above what a config of [`MAX_DOCUMENT_BYTES`] holds legitimately.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_documents: 1,
            // About 30 events and 15 nodes per endpoint line: room for a document of
            // MAX_DOCUMENT_BYTES written densely, and still a bound.
            max_events: 60_000_000,
            max_nodes: 30_000_000,
            max_aliases: 10_000,
            max_anchors: 10_000,
            max_total_scalar_bytes: MAX_DOCUMENT_BYTES,
            // The `comments` feature is on explicitly: kube's client turns it on in any
            // build that links it, and its 64 MiB default would then refuse a file of
            // comments that a build without kube accepts.
            max_total_comment_bytes: MAX_DOCUMENT_BYTES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_REPLAYED_EVENTS,
            max_replay_stack_depth: MAX_DEPTH,
        },
        // Repeated keys reach the visitors: derived structs refuse a repeated field, and
        // `de_unique_map` a repeated label or port name, each pointing at its mapping.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
        // YAML 1.2 booleans only, as before: `enabled: no` is not silently false.
        strict_booleans: true,
        // The line and path are given apart; the text is the message alone.
        with_snippet: false,
    }
}

/// Turns a serde-saphyr error, with the path serde_path_to_error found, into a
/// `ConfigError` whose message holds neither the path nor the position, which are
/// shown apart.
///
/// `path` is `None` for errors the parser finds before serde does (malformed YAML, a
/// budget breach), which concern the document rather than a field.
fn syntax_error(
    yaml: &str,
    path: Option<&serde_path_to_error::Path>,
    error: &serde_saphyr::Error,
) -> ConfigError {
    let line = match (error.without_snippet(), path) {
        // serde-saphyr places a missing field where its mapping ends; point at where the
        // mapping starts, as every other error about a mapping does.
        (serde_saphyr::Error::SerdeMissingField { .. }, Some(path)) => {
            line_of(yaml, &path.iter().cloned().collect::<Vec<_>>())
        }
        _ => None,
    }
    .or_else(|| {
        error
            .location()
            .map(|location| location.line())
            .filter(|line| *line > 0)
            .and_then(|line| usize::try_from(line).ok())
    });
    let path = match path.map(ToString::to_string) {
        // "." is the root, "?" a key the parser never got to deliver.
        Some(path) if path != "." && path != "?" => path,
        _ => String::new(),
    };
    ConfigError {
        path,
        line,
        kind: ConfigErrorKind::Decode {
            message: decode_message(yaml, error),
        },
    }
}

/// The library's text for what is wrong, without "at line X, column Y", which
/// `ConfigError` adds itself. Control characters from the YAML are escaped, since the
/// text goes to logs and terminals.
fn decode_message(yaml: &str, error: &serde_saphyr::Error) -> String {
    use serde_saphyr::MessageFormatter as _;

    let mut error = error.without_snippet();
    // An error inside an alias's expansion: the message is the original error's.
    while let serde_saphyr::Error::AliasError { error: inner, .. } = error {
        error = inner.without_snippet();
    }
    let text = match error {
        // The library's own texts for these speak of its options and Rust types.
        serde_saphyr::Error::InvalidBooleanStrict { .. } => {
            "invalid boolean, expected true or false".into()
        }
        serde_saphyr::Error::NullIntoString { .. } => {
            "invalid type: null (an empty value), expected a string".into()
        }
        // serde's own wording, which quotes each name so that a list of camelCase
        // fields stays readable.
        serde_saphyr::Error::SerdeUnknownField {
            field, expected, ..
        } => format!("unknown field `{field}`, {}", one_of(expected, "fields")).into(),
        serde_saphyr::Error::SerdeUnknownVariant {
            variant, expected, ..
        } => format!(
            "unknown variant `{variant}`, {}",
            one_of(expected, "variants")
        )
        .into(),
        // The library names the parser event it wanted ("mapping start"); say it in the
        // user's terms, with what the YAML has there instead.
        serde_saphyr::Error::Unexpected { expected, location } => {
            let expected = match *expected {
                "mapping start" => "a mapping",
                "sequence start" => "a list",
                "string scalar" => "a string",
                other => other,
            };
            match node_at(yaml, *location) {
                Some(found) => format!("invalid type: {found}, expected {expected}").into(),
                None => format!("invalid type, expected {expected}").into(),
            }
        }
        serde_saphyr::Error::Budget { breach, .. } => budget_message(breach).into(),
        serde_saphyr::Error::AliasReplayLimitExceeded {
            total_replayed_events,
            ..
        } => format!(
            "aliases expand to more than {MAX_REPLAYED_EVENTS} YAML events \
             ({total_replayed_events} so far); refused as a \"billion laughs\" attack"
        )
        .into(),
        serde_saphyr::Error::ExternalMessage { source, .. }
            if matches!(
                &**source,
                serde_saphyr::ExternalMessageSource::Parser(scan)
                    if *scan.kind() == serde_saphyr::granit_parser::ErrorKind::RecursionLimitExceeded
            ) =>
        {
            format!("nested deeper than {MAX_DEPTH} levels").into()
        }
        _ => serde_saphyr::DefaultMessageFormatter.format_message(error),
    };
    let mut message = String::new();
    for c in text.chars() {
        if c.is_control() {
            message.extend(c.escape_default());
        } else {
            message.push(c);
        }
    }
    message
}

/// The limit that hostile or runaway YAML ran into, in the user's terms.
fn budget_message(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach;

    match breach {
        BudgetBreach::Depth { .. } => format!("nested deeper than {MAX_DEPTH} levels"),
        BudgetBreach::Documents { .. } => {
            "more than one YAML document: a config is a single document".to_owned()
        }
        other => format!("the YAML is over a limit set against hostile input: {other:?}"),
    }
}

/// What the YAML holds at `location`, as "sequence", "mapping" or "value \"text\"".
fn node_at(yaml: &str, location: serde_saphyr::Location) -> Option<String> {
    use serde_saphyr::granit_parser::{Event, Parser};

    let at = |span: &serde_saphyr::granit_parser::Span| {
        u64::try_from(span.start.line()).ok() == Some(location.line())
            && u64::try_from(span.start.col() + 1).ok() == Some(location.column())
    };
    Parser::new_from_str(yaml)
        .map_while(Result::ok)
        .find_map(|(event, span)| match event {
            _ if !at(&span) => None,
            Event::SequenceStart(..) => Some("sequence".to_owned()),
            Event::MappingStart(..) => Some("mapping".to_owned()),
            Event::Scalar(text, ..) => Some(format!("value {text:?}")),
            _ => None,
        })
}

/// "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, `c`", as serde says it.
fn one_of(names: &[&str], what: &str) -> String {
    match names {
        [] => format!("there are no {what}"),
        [name] => format!("expected `{name}`"),
        [first, second] => format!("expected `{first}` or `{second}`"),
        names => {
            let quoted: Vec<String> = names.iter().map(|name| format!("`{name}`")).collect();
            format!("expected one of {}", quoted.join(", "))
        }
    }
}

// ---------------------------------------------------------------------------------
// The YAML as written. Single-value checks live in the `de_*` functions so that
// serde-saphyr attaches the value's position; everything else is in `Validator`.

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `node` and `services`"
)]
struct RawConfig {
    #[serde(default)]
    node: Option<RawNode>,
    #[serde(default)]
    services: Option<Vec<RawService>>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `locality` and `labels`"
)]
struct RawNode {
    #[serde(default)]
    locality: Locality,
    #[serde(default, deserialize_with = "de_labels")]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service mapping (name, vips, ports, ...)",
    rename_all = "camelCase"
)]
struct RawService {
    #[serde(deserialize_with = "de_service_name")]
    name: String,
    #[serde(default, deserialize_with = "de_addresses")]
    vips: Vec<IpAddr>,
    #[serde(default, deserialize_with = "de_hosts")]
    hosts: Vec<String>,
    ports: Vec<RawPort>,
    #[serde(default, deserialize_with = "de_resolution")]
    resolution: Resolution,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default, rename = "localityLbSetting")]
    locality_lb: Option<RawLocalityLb>,
    #[serde(default)]
    health_check: Option<RawHealthCheck>,
    #[serde(default)]
    outlier_detection: Option<RawOutlierDetection>,
    #[serde(default = "default_true")]
    terminate_connections: bool,
    #[serde(default)]
    tls: Option<RawTls>,
}

/// Istio's `ClientTLSSettings`, the part detour does: `SIMPLE` (verify the server, send
/// no client certificate) or `DISABLE`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `mode`, `sni` and `caCertificates`",
    rename_all = "camelCase"
)]
struct RawTls {
    #[serde(deserialize_with = "de_tls_mode")]
    mode: bool,
    #[serde(default, deserialize_with = "de_sni")]
    sni: Option<String>,
    #[serde(default, deserialize_with = "de_ca_certificates")]
    ca_certificates: Option<std::path::PathBuf>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a port mapping (number, name, targetPort, protocol)",
    rename_all = "camelCase"
)]
struct RawPort {
    #[serde(deserialize_with = "de_port")]
    number: u16,
    #[serde(default, deserialize_with = "de_port_name")]
    name: Option<String>,
    #[serde(default, deserialize_with = "de_some_port")]
    target_port: Option<u16>,
    #[serde(default, deserialize_with = "de_protocol")]
    protocol: Option<Protocol>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an endpoint mapping (address, ports, weight, locality, labels, priority, cluster)"
)]
struct RawEndpoint {
    #[serde(deserialize_with = "de_endpoint_address")]
    address: RawAddress,
    #[serde(default, deserialize_with = "de_endpoint_ports")]
    ports: BTreeMap<String, u16>,
    #[serde(default = "default_weight", deserialize_with = "de_weight")]
    weight: u32,
    #[serde(default)]
    locality: Locality,
    #[serde(default, deserialize_with = "de_labels")]
    labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "de_priority")]
    priority: u32,
    #[serde(default, deserialize_with = "de_cluster")]
    cluster: String,
}

fn default_weight() -> u32 {
    1
}

/// How a service's endpoint addresses are read: Istio's `ServiceEntry.resolution`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Resolution {
    /// IP addresses only (the default).
    #[default]
    Static,
    /// An endpoint's address may be a DNS name, resolved and re-resolved at its TTL.
    Dns,
}

/// An endpoint's `address` as written: an IP address, or a DNS name (lowercased).
#[derive(Debug)]
enum RawAddress {
    Ip(IpAddr),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `enabled`, `failover`, `failoverOrder`, `failoverPriority`, `spill` and `overprovisioningFactor`",
    rename_all = "camelCase"
)]
struct RawLocalityLb {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    failover: Vec<RawFailoverRule>,
    #[serde(default)]
    failover_order: Vec<Locality>,
    #[serde(default)]
    failover_priority: Vec<String>,
    #[serde(default)]
    spill: Option<RawSpill>,
    #[serde(default, deserialize_with = "de_overprovisioning_factor")]
    overprovisioning_factor: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawSpill {
    Strict,
    Gradual,
}

/// Istio's `outlierDetection`, plus detour's `handshakeTimeout`. Everything is optional
/// so that validation knows what the user wrote, to point at it.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an outlierDetection mapping (consecutiveErrors, interval, baseEjectionTime, ...)",
    rename_all = "camelCase"
)]
struct RawOutlierDetection {
    #[serde(default, deserialize_with = "de_some_count")]
    consecutive_errors: Option<u32>,
    #[serde(
        default,
        rename = "consecutive5xxErrors",
        deserialize_with = "de_some_count"
    )]
    consecutive_5xx_errors: Option<u32>,
    #[serde(default, deserialize_with = "de_some_count")]
    consecutive_local_origin_failures: Option<u32>,
    /// Present at all (any value) is refused, with the reason.
    #[serde(default, deserialize_with = "de_present")]
    consecutive_gateway_errors: bool,
    #[serde(default, deserialize_with = "de_present")]
    split_external_local_origin_errors: bool,
    #[serde(default, deserialize_with = "de_policy_duration")]
    interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_policy_duration")]
    base_ejection_time: Option<Duration>,
    #[serde(default, deserialize_with = "de_policy_duration")]
    max_ejection_time: Option<Duration>,
    #[serde(default, deserialize_with = "de_some_percent")]
    max_ejection_percent: Option<u32>,
    #[serde(default, deserialize_with = "de_some_percent")]
    min_health_percent: Option<u32>,
    #[serde(default, deserialize_with = "de_handshake_timeout")]
    handshake_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with `from` and `to`")]
struct RawFailoverRule {
    from: Locality,
    to: Locality,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a healthCheck mapping (interval, timeout, thresholds, tcp, http, grpc or disabled)",
    rename_all = "camelCase"
)]
struct RawHealthCheck {
    #[serde(default = "default_interval", deserialize_with = "de_interval")]
    interval: Duration,
    #[serde(default, deserialize_with = "de_timeout")]
    timeout: Option<Duration>,
    #[serde(
        default = "default_healthy_threshold",
        deserialize_with = "de_threshold"
    )]
    healthy_threshold: u32,
    #[serde(
        default = "default_unhealthy_threshold",
        deserialize_with = "de_threshold"
    )]
    unhealthy_threshold: u32,
    #[serde(default)]
    tcp: Option<RawTcpCheck>,
    #[serde(default)]
    http: Option<RawHttpCheck>,
    #[serde(default)]
    grpc: Option<RawGrpcCheck>,
    #[serde(default)]
    disabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a grpc check mapping (serviceName, authority)",
    rename_all = "camelCase"
)]
struct RawGrpcCheck {
    #[serde(default)]
    service_name: String,
    #[serde(default)]
    authority: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an http check mapping (path, host, expectedStatuses)",
    rename_all = "camelCase"
)]
struct RawHttpCheck {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    expected_statuses: Option<Vec<RawStatusRange>>,
}

/// Envoy's `{start, end}` with `end` exclusive.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a status range `{start: 200, end: 300}`"
)]
struct RawStatusRange {
    start: u16,
    end: u16,
}

/// `tcp: {}` has no settings yet; `deny_unknown_fields` keeps it that way until it has.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an empty mapping: `tcp: {}`")]
struct RawTcpCheck {}

fn default_interval() -> Duration {
    DEFAULT_INTERVAL
}

fn default_healthy_threshold() -> u32 {
    HealthCheckConfig::default().healthy_threshold
}

fn default_unhealthy_threshold() -> u32 {
    HealthCheckConfig::default().unhealthy_threshold
}

// ---------------------------------------------------------------------------------
// Single-value checks. Each runs inside a Visitor so that serde-saphyr reports the
// line of the offending value rather than of the enclosing mapping.

/// An unsigned integer in `MIN..=MAX`.
struct RangeVisitor<const MIN: u64, const MAX: u64> {
    what: &'static str,
}

impl<const MIN: u64, const MAX: u64> Visitor<'_> for RangeVisitor<MIN, MAX> {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} from {MIN} to {MAX}", self.what)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        if (MIN..=MAX).contains(&value) {
            Ok(value)
        } else {
            Err(E::invalid_value(Unexpected::Unsigned(value), &self))
        }
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        match u64::try_from(value) {
            Ok(value) => self.visit_u64(value),
            Err(_) => Err(E::invalid_type(Unexpected::Signed(value), &self)),
        }
    }
}

fn de_ranged<'de, D, T, const MIN: u64, const MAX: u64>(
    deserializer: D,
    what: &'static str,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    // `deserialize_any`, not `deserialize_u64`: serde-saphyr parses the latter itself and
    // reports a bare "invalid u64", where the visitor names the value and the range.
    let value = deserializer.deserialize_any(RangeVisitor::<MIN, MAX> { what })?;
    // MAX is chosen to fit T at every call site, so this cannot fail.
    T::try_from(value).map_err(|_| de::Error::custom(format!("{what} {value} is too large")))
}

fn de_port<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    de_ranged::<D, u16, 1, 65535>(deserializer, "a port number")
}

fn de_some_port<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u16>, D::Error> {
    de_port(deserializer).map(Some)
}

fn de_weight<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    de_ranged::<D, u32, 1, 1_000_000>(deserializer, "a weight")
}

fn de_priority<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    de_ranged::<D, u32, 0, { MAX_PRIORITY as u64 }>(deserializer, "a priority")
}

/// A cluster name: an RFC 1123 label, as Kubernetes names clusters in kubeconfigs and
/// detour labels mirrored EndpointSlices.
fn de_cluster<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    deserializer.deserialize_str(StrVisitor {
        what: "a cluster name",
        check: |value| {
            let bytes = value.as_bytes();
            let edge_ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
            if !bytes.is_empty()
                && bytes.len() <= 63
                && bytes.first().is_some_and(edge_ok)
                && bytes.last().is_some_and(edge_ok)
                && bytes.iter().all(|c| edge_ok(c) || *c == b'-')
            {
                Ok(value.to_owned())
            } else {
                Err(format!(
                    "invalid cluster name {value:?}: use at most 63 lowercase letters, \
                     digits and '-', starting and ending with a letter or digit"
                ))
            }
        },
    })
}

fn de_threshold<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    de_ranged::<D, u32, 1, { u32::MAX as u64 }>(deserializer, "a count")
}

/// A count where 0 means "off".
fn de_some_count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    de_ranged::<D, u32, 0, { u32::MAX as u64 }>(deserializer, "a count").map(Some)
}

fn de_some_percent<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    de_ranged::<D, u32, 0, 100>(deserializer, "a percentage").map(Some)
}

fn de_overprovisioning_factor<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    de_ranged::<D, u32, 100, { u32::MAX as u64 }>(
        deserializer,
        "an overprovisioning factor in percent (140 = 1.4)",
    )
    .map(Some)
}

/// True for any value, so that validation can refuse the field by name and line.
fn de_present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(deserializer).map(|_| true)
}

/// A string that passes `check`, which returns why not.
struct StrVisitor<T> {
    what: &'static str,
    check: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for StrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        (self.check)(value).map_err(E::custom)
    }
}

fn de_service_name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    deserializer.deserialize_str(StrVisitor {
        what: "a service name",
        check: |value| {
            if is_service_name(value) {
                Ok(value.to_owned())
            } else {
                Err(format!(
                    "invalid service name {value:?}: use at most 253 lowercase letters, \
                     digits, '-' and '.', starting and ending with a letter or digit"
                ))
            }
        },
    })
}

fn is_service_name(name: &str) -> bool {
    let inner_ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.';
    let edge_ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes.first().is_some_and(edge_ok)
        && bytes.last().is_some_and(edge_ok)
        && bytes.iter().copied().all(inner_ok)
}

fn de_port_name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    deserializer.deserialize_str(StrVisitor {
        what: "a port name",
        check: |value| {
            if value.is_empty() {
                Err("port name must not be empty".to_owned())
            } else {
                Ok(Some(value.to_owned()))
            }
        },
    })
}

fn de_protocol<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Protocol>, D::Error> {
    deserializer.deserialize_str(StrVisitor {
        what: "a protocol",
        check: |value| {
            Protocol::ALL
                .iter()
                .find(|(_, name)| name.eq_ignore_ascii_case(value))
                .map(|(protocol, _)| Some(*protocol))
                .ok_or_else(|| {
                    let names: Vec<&str> = Protocol::ALL.iter().map(|(_, name)| *name).collect();
                    format!(
                        "unknown protocol {value:?}, expected one of {}",
                        names.join(", ")
                    )
                })
        },
    })
}

fn parse_address(value: &str) -> Result<IpAddr, String> {
    let address: IpAddr = value
        .parse()
        .map_err(|_| format!("{value:?} is not an IP address"))?;
    if address.is_unspecified() || address.is_multicast() {
        return Err(format!(
            "{address} is an unspecified or multicast address, not a host"
        ));
    }
    Ok(address)
}

/// An IP address checked like [`parse_address`], or else a DNS name (RFC 1123, any
/// case, an optional trailing dot), lowercased.
fn parse_endpoint_address(value: &str) -> Result<RawAddress, String> {
    if value.parse::<IpAddr>().is_ok() {
        return parse_address(value).map(RawAddress::Ip);
    }
    let name = value.to_ascii_lowercase();
    if is_dns_name(name.strip_suffix('.').unwrap_or(&name)) {
        Ok(RawAddress::Name(name))
    } else {
        Err(format!("{value:?} is neither an IP address nor a DNS name"))
    }
}

fn de_endpoint_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<RawAddress, D::Error> {
    deserializer.deserialize_str(StrVisitor {
        what: "an IP address or a DNS name",
        check: parse_endpoint_address,
    })
}

/// A lowercase DNS name of RFC 1123 labels, without a trailing dot.
#[must_use]
pub fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `hosts`: DNS names, lowercased; a wildcard is refused with why.
fn de_hosts<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct Host(String);
    impl<'de> Deserialize<'de> for Host {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer
                .deserialize_str(StrVisitor {
                    what: "a DNS name",
                    check: |value: &str| {
                        let name = value.trim_end_matches('.').to_ascii_lowercase();
                        if name.starts_with('*') {
                            Err(format!(
                                "{value:?} is a wildcard: detour answers DNS for exact names \
                                 only (one name, one service's VIPs)"
                            ))
                        } else if is_dns_name(&name) {
                            Ok(name)
                        } else {
                            Err(format!("{value:?} is not a DNS name"))
                        }
                    },
                })
                .map(Host)
        }
    }
    let hosts: Vec<Host> = Deserialize::deserialize(deserializer)?;
    Ok(hosts.into_iter().map(|Host(name)| name).collect())
}

/// Istio's `resolution` values: `STATIC` and `DNS`; the other two are refused with why.
fn de_resolution<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Resolution, D::Error> {
    deserializer.deserialize_str(StrVisitor {
        what: "STATIC or DNS",
        check: |value: &str| match value {
            "STATIC" => Ok(Resolution::Static),
            "DNS" => Ok(Resolution::Dns),
            "NONE" => Err(
                "NONE (connect to whatever address the application asked for) \
                 leaves nothing to fail over to: use STATIC or DNS"
                    .to_owned(),
            ),
            "DNS_ROUND_ROBIN" => Err("DNS_ROUND_ROBIN (one address of a name at a time) is \
                 not supported: DNS uses every address a name resolves to, which fails over \
                 between them"
                .to_owned()),
            other => Err(format!(
                "unknown resolution {other:?}: expected STATIC or DNS"
            )),
        },
    })
}

/// `tls.mode`: true for SIMPLE (originate TLS), false for DISABLE.
fn de_tls_mode<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    deserializer.deserialize_str(StrVisitor {
        what: "SIMPLE or DISABLE",
        check: |value: &str| match value {
            "SIMPLE" => Ok(true),
            "DISABLE" => Ok(false),
            "MUTUAL" | "ISTIO_MUTUAL" => Err(format!(
                "{value} is not supported: detour verifies the server's certificate but \
                 presents none of its own (use SIMPLE)"
            )),
            other => Err(format!(
                "unknown TLS mode {other:?}: expected SIMPLE or DISABLE"
            )),
        },
    })
}

/// `tls.sni`: a DNS name, lowercased.
fn de_sni<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    deserializer
        .deserialize_str(StrVisitor {
            what: "a DNS name",
            check: |value: &str| {
                let name = value.trim_end_matches('.').to_ascii_lowercase();
                if is_dns_name(&name) {
                    Ok(name)
                } else {
                    Err(format!("{value:?} is not a DNS name"))
                }
            },
        })
        .map(Some)
}

/// `tls.caCertificates`: an absolute path (the agent's working directory is nobody's
/// business); the file itself is read when the service is applied.
fn de_ca_certificates<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<std::path::PathBuf>, D::Error> {
    deserializer
        .deserialize_str(StrVisitor {
            what: "an absolute path to a PEM file",
            check: |value: &str| {
                let path = std::path::Path::new(value);
                if path.is_absolute() {
                    Ok(path.to_path_buf())
                } else {
                    Err(format!(
                        "{value:?} is not an absolute path: give the CA file's full path"
                    ))
                }
            },
        })
        .map(Some)
}

fn de_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<IpAddr, D::Error> {
    deserializer.deserialize_str(StrVisitor {
        what: "an IP address",
        check: parse_address,
    })
}

/// A list of addresses, each checked like [`de_address`].
fn de_addresses<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpAddr>, D::Error> {
    struct Address(IpAddr);
    impl<'de> Deserialize<'de> for Address {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            de_address(deserializer).map(Address)
        }
    }
    let addresses: Vec<Address> = Deserialize::deserialize(deserializer)?;
    Ok(addresses.into_iter().map(|Address(ip)| ip).collect())
}

/// A duration in `minimum..=maximum`.
fn de_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
    minimum: Duration,
    maximum: Duration,
) -> Result<Duration, D::Error> {
    struct DurationVisitor {
        minimum: Duration,
        maximum: Duration,
    }
    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration with a unit, like \"10s\", \"500ms\" or \"2m\"")
        }
        fn visit_str<E: de::Error>(self, value: &str) -> Result<Duration, E> {
            let duration = humantime::parse_duration(value)
                .map_err(|error| E::custom(format!("invalid duration {value:?}: {error}")))?;
            if duration < self.minimum {
                return Err(E::custom(format!(
                    "{value:?} is too short: the minimum is {}",
                    humantime::format_duration(self.minimum)
                )));
            }
            if duration > self.maximum {
                return Err(E::custom(format!(
                    "{value:?} is too long: the maximum is {}",
                    humantime::format_duration(self.maximum)
                )));
            }
            Ok(duration)
        }
    }
    deserializer.deserialize_str(DurationVisitor { minimum, maximum })
}

fn de_interval<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    de_duration(deserializer, MIN_INTERVAL, Duration::MAX)
}

fn de_timeout<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    // The smallest duration humantime can express; "0s" is rejected.
    de_duration(deserializer, Duration::from_nanos(1), Duration::MAX).map(Some)
}

/// Any duration: `EjectionPolicy::try_new` is the one judge of outlier durations, and
/// validation points its verdict at the field.
fn de_policy_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(deserializer, Duration::ZERO, Duration::MAX).map(Some)
}

fn de_handshake_timeout<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(deserializer, MIN_HANDSHAKE_TIMEOUT, MAX_HANDSHAKE_TIMEOUT).map(Some)
}

/// A mapping whose keys are unique. A map type would keep the last of two equal keys,
/// and a silently ignored entry is exactly what `deny_unknown_fields` is there to stop.
/// serde-saphyr passes repeated keys through to here (`DuplicateKeyPolicy::PassThrough`)
/// so that the error names the mapping, as it did before.
fn de_unique_map<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct UniqueMap<V>(PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueMap<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if entries.contains_key(&key) {
                    return Err(de::Error::custom(format!("{key:?} is listed twice")));
                }
                let value = map.next_value()?;
                entries.insert(key, value);
            }
            Ok(entries)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
    }
    deserializer.deserialize_map(UniqueMap(PhantomData))
}

fn de_endpoint_ports<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, u16>, D::Error> {
    /// A port number inside the `ports` mapping, checked like `number`.
    struct Port(u16);
    impl<'de> Deserialize<'de> for Port {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            de_port(deserializer).map(Port)
        }
    }
    let ports: BTreeMap<String, Port> = de_unique_map(deserializer)?;
    Ok(ports
        .into_iter()
        .map(|(name, Port(port))| (name, port))
        .collect())
}

fn de_labels<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    de_unique_map(deserializer)
}

// ---------------------------------------------------------------------------------
// Checks across fields, and turning the raw YAML into the public types.

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(&'static str),
    Index(usize),
}

/// A field path, built while walking the config; shown like serde_path_to_error does.
#[derive(Debug, Clone, Default)]
struct FieldPath(Vec<Segment>);

impl FieldPath {
    fn key(&self, key: &'static str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key));
        path
    }

    fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if position == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

struct Validator<'a> {
    yaml: &'a str,
    vip_range: ipnet::Ipv4Net,
}

impl Validator<'_> {
    fn error(&self, path: &FieldPath, kind: ConfigErrorKind) -> ConfigError {
        ConfigError {
            path: path.to_string(),
            line: line_of(self.yaml, &path.0),
            kind,
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let (locality, labels) = raw
            .node
            .map(|node| (node.locality, node.labels))
            .unwrap_or_default();
        let node = NodeConfig { locality, labels };
        let root = FieldPath::default().key("services");
        let raw_services = raw.services.unwrap_or_default();
        let mut services: Vec<ServiceConfig> = Vec::with_capacity(raw_services.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        for (index, raw_service) in raw_services.into_iter().enumerate() {
            let path = root.index(index);
            if let Some(&first) = names.get(&raw_service.name) {
                return Err(self.error(
                    &path.key("name"),
                    ConfigErrorKind::DuplicateServiceName {
                        name: raw_service.name,
                        first,
                    },
                ));
            }
            names.insert(raw_service.name.clone(), index);
            services.push(self.service(&path, raw_service)?);
        }
        let notes = self.allocate_vips(&root, &mut services)?;
        // Which service owns each VIP:port, and each host; checked across all services.
        let mut owners: HashMap<SocketAddr, usize> = HashMap::new();
        let mut hosts: HashMap<&str, usize> = HashMap::new();
        for (index, service) in services.iter().enumerate() {
            let path = root.index(index);
            for (vip_index, vip) in service.vips.iter().enumerate() {
                for port in &service.ports {
                    let socket = SocketAddr::new(*vip, port.number);
                    if let Some(&owner) = owners.get(&socket) {
                        return Err(self.error(
                            &path.key("vips").index(vip_index),
                            ConfigErrorKind::VipInUse {
                                vip: socket,
                                service: services[owner].name.clone(),
                            },
                        ));
                    }
                    owners.insert(socket, index);
                }
            }
            for (host_index, host) in service.hosts.iter().enumerate() {
                if let Some(&owner) = hosts.get(host.as_str()) {
                    return Err(self.error(
                        &path.key("hosts").index(host_index),
                        ConfigErrorKind::HostInUse {
                            host: host.clone(),
                            service: services[owner].name.clone(),
                        },
                    ));
                }
                hosts.insert(host, index);
            }
        }
        let by_name = services
            .iter()
            .enumerate()
            .map(|(at, service)| (service.name.clone(), at))
            .collect();
        Ok(Config {
            node,
            services: services.into_iter().map(Arc::new).collect(),
            by_name: Arc::new(by_name),
            notes,
        })
    }

    /// Gives each service with `hosts` and no `vips` one IPv4 VIP from the VIP range:
    /// the address its name hashes to (SHA-256, so every agent and every version agrees),
    /// or, when another service has that one, the next free one after it (a collision,
    /// returned as a warning). Services keep their file order, so the same file always
    /// gives the same VIPs.
    fn allocate_vips(
        &self,
        root: &FieldPath,
        services: &mut [ServiceConfig],
    ) -> Result<Vec<ConfigWarning>, ConfigError> {
        use sha2::Digest as _;
        let mut taken: HashMap<IpAddr, usize> = HashMap::new();
        for (index, service) in services.iter().enumerate() {
            for vip in &service.vips {
                taken.entry(*vip).or_insert(index);
            }
        }
        let range = self.vip_range.trunc();
        let first = u32::from(range.network());
        let size = 1_u64 << (32 - u32::from(range.prefix_len()));
        let mut notes = Vec::new();
        for index in 0..services.len() {
            if !services[index].vips.is_empty() {
                continue;
            }
            let digest = sha2::Sha256::digest(services[index].name.as_bytes());
            let hash = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
            let start = hash % size;
            // At most one step per address taken, and never more than the range has.
            let steps = (taken.len() as u64 + 1).min(size);
            let at = |step: u64| {
                let offset = u32::try_from((start + step) % size).expect("within the range");
                IpAddr::V4(std::net::Ipv4Addr::from(first + offset))
            };
            let Some(step) = (0..steps).find(|&step| !taken.contains_key(&at(step))) else {
                return Err(self.error(
                    &root.index(index).key("hosts"),
                    ConfigErrorKind::VipRangeFull { range },
                ));
            };
            let allocated = at(step);
            if step > 0 {
                notes.push(ConfigWarning::VipCollision {
                    service: services[index].name.clone(),
                    wanted: at(0),
                    allocated,
                    taken_by: services[taken[&at(0)]].name.clone(),
                });
            }
            taken.insert(allocated, index);
            services[index].vips.push(allocated);
        }
        Ok(notes)
    }

    fn service(&self, path: &FieldPath, raw: RawService) -> Result<ServiceConfig, ConfigError> {
        if raw.vips.is_empty() && raw.hosts.is_empty() {
            return Err(self.error(&path.key("vips"), ConfigErrorKind::NoVips));
        }
        for (index, host) in raw.hosts.iter().enumerate() {
            if raw.hosts[..index].contains(host) {
                return Err(self.error(
                    &path.key("hosts").index(index),
                    ConfigErrorKind::HostInUse {
                        host: host.clone(),
                        service: raw.name.clone(),
                    },
                ));
            }
        }
        let mut seen_vips = HashSet::new();
        for (index, vip) in raw.vips.iter().enumerate() {
            if !seen_vips.insert(*vip) {
                return Err(self.error(
                    &path.key("vips").index(index),
                    ConfigErrorKind::DuplicateVip { vip: *vip },
                ));
            }
        }
        let ports = self.ports(&path.key("ports"), raw.ports)?;
        let (endpoints, named_endpoints) = self.endpoints(
            &path.key("endpoints"),
            raw.endpoints,
            raw.resolution,
            &ports,
        )?;
        // What a name resolves to is only known at run time; the DNS source keeps each
        // VIP's family apart then (a family with no address is left alone).
        if !endpoints.is_empty() && named_endpoints.is_empty() {
            // The VIP detour allocates is IPv4.
            if raw.vips.is_empty() && !endpoints.iter().any(|e| e.address.is_ipv4()) {
                return Err(self.error(
                    &path.key("hosts"),
                    ConfigErrorKind::AllocatedVipWithoutIpv4Endpoint,
                ));
            }
            for (index, vip) in raw.vips.iter().enumerate() {
                let family = IpFamily::of(vip);
                if !endpoints
                    .iter()
                    .any(|endpoint| IpFamily::of(&endpoint.address) == family)
                {
                    return Err(self.error(
                        &path.key("vips").index(index),
                        ConfigErrorKind::NoEndpointOfVipFamily { vip: *vip, family },
                    ));
                }
            }
        }
        let locality_lb = match raw.locality_lb {
            Some(raw_lb) => self.locality_lb(&path.key("localityLbSetting"), raw_lb)?,
            None => LocalityLbSetting::default(),
        };
        if !locality_lb.failover_priority.is_empty() {
            let labels = locality_lb.failover_priority.len() as u32;
            let priorities = endpoints
                .iter()
                .chain(named_endpoints.iter().map(|named| &named.template))
                .map(|e| e.priority)
                .max()
                .unwrap_or(0)
                + 1;
            if priorities * (labels + 1) > MAX_PRIORITY + 1 {
                return Err(self.error(
                    &path.key("localityLbSetting").key("failoverPriority"),
                    ConfigErrorKind::FailoverPriorityTooDeep { labels, priorities },
                ));
            }
        }
        let health_check = match raw.health_check {
            Some(raw_check) => self.health_check(&path.key("healthCheck"), &raw.name, raw_check)?,
            None => HealthCheckConfig::default(),
        };
        let outlier_detection = match raw.outlier_detection {
            Some(raw_outlier) => {
                self.outlier_detection(&path.key("outlierDetection"), raw_outlier)?
            }
            None => OutlierDetectionConfig::default(),
        };
        let tls = raw.tls.filter(|t| t.mode).map(|t| TlsOrigination {
            sni: t.sni,
            ca_certificates: t.ca_certificates,
        });
        if tls.is_some()
            && !matches!(
                health_check.kind,
                HealthCheckKind::Tcp | HealthCheckKind::None
            )
        {
            return Err(self.error(
                &path.key("healthCheck"),
                ConfigErrorKind::PlainCheckOfTlsService,
            ));
        }
        Ok(ServiceConfig {
            name: raw.name,
            vips: raw.vips,
            hosts: raw.hosts,
            ports,
            endpoints,
            named_endpoints,
            locality_lb,
            health_check,
            outlier_detection,
            terminate_connections: raw.terminate_connections,
            tls,
            origin: ServiceOrigin::default(),
        })
    }

    fn ports(&self, path: &FieldPath, raw: Vec<RawPort>) -> Result<Vec<PortConfig>, ConfigError> {
        if raw.is_empty() {
            return Err(self.error(path, ConfigErrorKind::NoPorts));
        }
        let mut ports: Vec<PortConfig> = Vec::with_capacity(raw.len());
        for (index, raw_port) in raw.into_iter().enumerate() {
            let port_path = path.index(index);
            let named = raw_port.name.is_some();
            let name = raw_port
                .name
                .unwrap_or_else(|| format!("port-{}", raw_port.number));
            if ports.iter().any(|port| port.number == raw_port.number) {
                return Err(self.error(
                    &port_path.key("number"),
                    ConfigErrorKind::DuplicatePortNumber {
                        number: raw_port.number,
                    },
                ));
            }
            if ports.iter().any(|port| port.name == name) {
                // A defaulted name can only clash with an explicit one; point at
                // whichever of the two the user wrote.
                let field = if named { "name" } else { "number" };
                return Err(self.error(
                    &port_path.key(field),
                    ConfigErrorKind::DuplicatePortName { name },
                ));
            }
            ports.push(PortConfig {
                number: raw_port.number,
                name,
                target_port: raw_port.target_port,
                protocol: raw_port.protocol,
            });
        }
        Ok(ports)
    }

    /// The endpoints given by address, and those given by DNS name.
    fn endpoints(
        &self,
        path: &FieldPath,
        raw: Vec<RawEndpoint>,
        resolution: Resolution,
        ports: &[PortConfig],
    ) -> Result<(Vec<EndpointConfig>, Vec<NamedEndpoint>), ConfigError> {
        let literal = raw
            .iter()
            .filter(|e| matches!(e.address, RawAddress::Ip(_)))
            .count();
        let mut endpoints: Vec<EndpointConfig> = Vec::with_capacity(literal);
        let mut named: Vec<NamedEndpoint> = Vec::new();
        let mut localities: HashMap<Locality, Arc<Locality>> = HashMap::new();
        let mut seen: HashMap<(IpAddr, SmallVec<[u16; 2]>), usize> =
            HashMap::with_capacity(literal);
        let mut seen_names: HashMap<(Arc<str>, SmallVec<[u16; 2]>), usize> = HashMap::new();
        for (index, raw_endpoint) in raw.into_iter().enumerate() {
            let endpoint_path = path.index(index);
            if let Some(name) = raw_endpoint
                .ports
                .keys()
                .find(|name| !ports.iter().any(|port| &port.name == *name))
            {
                return Err(self.error(
                    &endpoint_path.key("ports"),
                    ConfigErrorKind::UnknownPortName {
                        name: name.clone(),
                        known: ports.iter().map(|port| port.name.clone()).collect(),
                    },
                ));
            }
            let (address, hostname) = match raw_endpoint.address {
                RawAddress::Ip(ip) => (ip, None),
                RawAddress::Name(name) if resolution == Resolution::Dns => (
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    Some(intern(&name)),
                ),
                RawAddress::Name(hostname) => {
                    return Err(self.error(
                        &endpoint_path.key("address"),
                        ConfigErrorKind::NameNeedsDnsResolution { hostname },
                    ));
                }
            };
            let endpoint = EndpointConfig {
                address,
                ports: raw_endpoint
                    .ports
                    .into_iter()
                    .map(|(name, number)| (intern(&name), number))
                    .collect(),
                weight: raw_endpoint.weight,
                locality: localities
                    .entry(raw_endpoint.locality)
                    .or_insert_with_key(|locality| Arc::new(locality.clone()))
                    .clone(),
                labels: (!raw_endpoint.labels.is_empty()).then(|| Box::new(raw_endpoint.labels)),
                priority: raw_endpoint.priority,
                cluster: intern(&raw_endpoint.cluster),
            };
            // An endpoint is a duplicate when its address and every port it serves are
            // another's: looked up, not scanned, so a service of 100,000 endpoints is
            // not 5·10⁹ comparisons.
            let backends: SmallVec<[u16; 2]> = endpoint.backends(ports).collect();
            if let Some(hostname) = hostname {
                match seen_names.entry((hostname.clone(), backends)) {
                    std::collections::hash_map::Entry::Occupied(first) => {
                        return Err(self.error(
                            &endpoint_path.key("address"),
                            ConfigErrorKind::DuplicateNamedEndpoint {
                                hostname: hostname.to_string(),
                                first: *first.get(),
                            },
                        ));
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(index);
                    }
                }
                named.push(NamedEndpoint {
                    hostname,
                    template: endpoint,
                });
                continue;
            }
            match seen.entry((endpoint.address, backends)) {
                std::collections::hash_map::Entry::Occupied(first) => {
                    return Err(self.error(
                        &endpoint_path.key("address"),
                        ConfigErrorKind::DuplicateEndpoint {
                            address: endpoint.address,
                            first: *first.get(),
                        },
                    ));
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(index);
                }
            }
            endpoints.push(endpoint);
        }
        Ok((endpoints, named))
    }

    fn locality_lb(
        &self,
        path: &FieldPath,
        raw: RawLocalityLb,
    ) -> Result<LocalityLbSetting, ConfigError> {
        let mut failover = Vec::with_capacity(raw.failover.len());
        for (index, rule) in raw.failover.into_iter().enumerate() {
            let rule_path = path.key("failover").index(index);
            for (field, locality) in [("from", &rule.from), ("to", &rule.to)] {
                if locality.is_empty() {
                    return Err(self.error(
                        &rule_path.key(field),
                        ConfigErrorKind::EmptyLocality { field },
                    ));
                }
            }
            if rule.from == rule.to {
                return Err(self.error(
                    &rule_path.key("to"),
                    ConfigErrorKind::FailoverToItself { from: rule.from },
                ));
            }
            failover.push(FailoverRule {
                from: rule.from,
                to: rule.to,
            });
        }
        if let Some(index) = raw.failover_order.iter().position(Locality::is_empty) {
            return Err(self.error(
                &path.key("failoverOrder").index(index),
                ConfigErrorKind::EmptyLocality {
                    field: "a failoverOrder entry",
                },
            ));
        }
        let spill = match (raw.spill, raw.overprovisioning_factor) {
            (Some(RawSpill::Strict), Some(_)) => {
                return Err(self.error(
                    &path.key("overprovisioningFactor"),
                    ConfigErrorKind::OverprovisioningWithStrictSpill,
                ));
            }
            (Some(RawSpill::Strict), None) => Spill::Strict,
            (Some(RawSpill::Gradual) | None, Some(overprovisioning_percent)) => Spill::Gradual {
                overprovisioning_percent,
            },
            (Some(RawSpill::Gradual) | None, None) => Spill::default(),
        };
        let mut failover_priority: Vec<PriorityLabel> = Vec::new();
        for (index, entry) in raw.failover_priority.into_iter().enumerate() {
            let entry_path = path.key("failoverPriority").index(index);
            let (key, value) = match entry.split_once('=') {
                Some((key, value)) => (key.to_owned(), Some(value.to_owned())),
                None => (entry.clone(), None),
            };
            if key.is_empty() {
                return Err(self.error(
                    &entry_path,
                    ConfigErrorKind::EmptyLocality {
                        field: "a failoverPriority label",
                    },
                ));
            }
            if let Some(first) = failover_priority.iter().position(|l| l.key == key) {
                return Err(self.error(
                    &entry_path,
                    ConfigErrorKind::RepeatedPriorityLabel { key, first },
                ));
            }
            failover_priority.push(PriorityLabel { key, value });
        }
        Ok(LocalityLbSetting {
            enabled: raw.enabled.unwrap_or(true),
            failover,
            failover_order: raw.failover_order,
            spill,
            failover_priority,
        })
    }

    fn outlier_detection(
        &self,
        path: &FieldPath,
        raw: RawOutlierDetection,
    ) -> Result<OutlierDetectionConfig, ConfigError> {
        let http_only = [
            (
                "consecutiveGatewayErrors",
                raw.consecutive_gateway_errors,
                "counts HTTP 502/503/504 responses, which detour, working at connect time, \
                 cannot see; use consecutiveErrors, which counts failed connections",
            ),
            (
                "splitExternalLocalOriginErrors",
                raw.split_external_local_origin_errors,
                "separates HTTP errors from connection failures, but detour, working at \
                 connect time, only sees connection failures; remove it and use \
                 consecutiveErrors",
            ),
        ];
        if let Some((field, _, reason)) = http_only.into_iter().find(|(_, set, _)| *set) {
            return Err(self.error(
                &path.key(field),
                ConfigErrorKind::UnsupportedOutlierField { field, reason },
            ));
        }
        let counts: Vec<(&'static str, u32)> = [
            ("consecutiveErrors", raw.consecutive_errors),
            ("consecutive5xxErrors", raw.consecutive_5xx_errors),
            (
                "consecutiveLocalOriginFailures",
                raw.consecutive_local_origin_failures,
            ),
        ]
        .into_iter()
        .filter_map(|(field, count)| count.map(|count| (field, count)))
        .collect();
        // Even equal values are refused: two spellings of one setting invite an edit to
        // one of them that silently does nothing.
        if let [(keep, _), (remove, _), ..] = counts[..] {
            return Err(self.error(
                &path.key(remove),
                ConfigErrorKind::ConflictingConsecutiveCounts { keep, remove },
            ));
        }
        let defaults = EjectionSettings::default();
        let settings = EjectionSettings {
            consecutive_failures: counts
                .first()
                .map_or(defaults.consecutive_failures, |(_, count)| *count),
            interval: raw.interval.unwrap_or(defaults.interval),
            base_ejection_time: raw
                .base_ejection_time
                .unwrap_or(defaults.base_ejection_time),
            max_ejection_time: raw.max_ejection_time.unwrap_or(defaults.max_ejection_time),
            max_ejection_percent: raw
                .max_ejection_percent
                .unwrap_or(defaults.max_ejection_percent),
            panic_threshold_percent: raw
                .min_health_percent
                .unwrap_or(defaults.panic_threshold_percent),
        };
        let policy = EjectionPolicy::try_new(settings).map_err(|error| {
            let field = match &error {
                OutlierError::ZeroInterval => "interval",
                OutlierError::ZeroBaseEjectionTime => "baseEjectionTime",
                // Point at whichever of the two the user wrote; a defaulted maximum is
                // the base's fault.
                OutlierError::MaxBelowBase { .. } if raw.max_ejection_time.is_none() => {
                    "baseEjectionTime"
                }
                OutlierError::MaxBelowBase { .. } => "maxEjectionTime",
                OutlierError::TooLong { field, .. } => *field,
                OutlierError::MaxEjectionPercentOutOfRange(_) => "maxEjectionPercent",
                OutlierError::PanicThresholdOutOfRange(_) => "minHealthPercent",
            };
            self.error(&path.key(field), ConfigErrorKind::Outlier(error))
        })?;
        Ok(OutlierDetectionConfig {
            policy,
            handshake_timeout: raw.handshake_timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT),
        })
    }

    fn health_check(
        &self,
        path: &FieldPath,
        service: &str,
        raw: RawHealthCheck,
    ) -> Result<HealthCheckConfig, ConfigError> {
        if raw.disabled && raw.tcp.is_some() {
            return Err(self.error(
                &path.key("disabled"),
                ConfigErrorKind::DisabledCheckConfigured,
            ));
        }
        let set: Vec<&'static str> = [
            ("tcp", raw.tcp.is_some()),
            ("http", raw.http.is_some()),
            ("grpc", raw.grpc.is_some()),
            ("disabled", raw.disabled),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        let conflict = (set.len() > 1).then(|| (set[0], set[1]));
        if let Some((first, second)) = conflict {
            return Err(self.error(
                &path.key(second),
                ConfigErrorKind::ConflictingCheckKinds { first, second },
            ));
        }
        // An unset timeout follows a short interval down rather than making the
        // interval alone invalid.
        let timeout = raw.timeout.unwrap_or(DEFAULT_TIMEOUT.min(raw.interval));
        if timeout > raw.interval {
            return Err(self.error(
                &path.key("timeout"),
                ConfigErrorKind::TimeoutExceedsInterval {
                    timeout,
                    interval: raw.interval,
                },
            ));
        }
        Ok(HealthCheckConfig {
            interval: raw.interval,
            timeout,
            healthy_threshold: raw.healthy_threshold,
            unhealthy_threshold: raw.unhealthy_threshold,
            kind: match (raw.disabled, raw.http, raw.grpc) {
                (true, _, _) => HealthCheckKind::None,
                (false, Some(http), _) => {
                    HealthCheckKind::Http(self.http_check(&path.key("http"), service, http)?)
                }
                (false, None, Some(grpc)) => HealthCheckKind::Grpc(GrpcCheck {
                    service: grpc.service_name,
                    authority: grpc.authority.unwrap_or_else(|| service.to_string()),
                }),
                (false, None, None) => HealthCheckKind::Tcp,
            },
        })
    }

    fn http_check(
        &self,
        path: &FieldPath,
        service: &str,
        raw: RawHttpCheck,
    ) -> Result<HttpCheck, ConfigError> {
        let request_path = raw.path.unwrap_or_else(|| "/".into());
        if !request_path.starts_with('/') || request_path.chars().any(char::is_whitespace) {
            return Err(self.error(
                &path.key("path"),
                ConfigErrorKind::BadHttpPath { path: request_path },
            ));
        }
        let expected_statuses = match raw.expected_statuses {
            None => std::iter::once(200..201).collect(),
            Some(ranges) => {
                let mut out = Vec::with_capacity(ranges.len());
                for (i, r) in ranges.into_iter().enumerate() {
                    if r.start < 100 || r.end > 600 || r.start >= r.end {
                        return Err(self.error(
                            &path.key("expectedStatuses").index(i),
                            ConfigErrorKind::BadStatusRange {
                                start: r.start,
                                end: r.end,
                            },
                        ));
                    }
                    out.push(r.start..r.end);
                }
                out
            }
        };
        Ok(HttpCheck {
            path: request_path,
            host: raw.host.unwrap_or_else(|| service.to_string()),
            expected_statuses,
        })
    }
}

// ---------------------------------------------------------------------------------
// Finding a field's line after the fact.

/// A container being walked, with what its next node will be.
enum Frame {
    Sequence {
        next_index: usize,
        pushed: bool,
    },
    Mapping {
        /// `None` while a key is expected; else the step its value will take.
        value_step: Option<Step>,
        pushed: bool,
    },
}

/// One step of a path found in the YAML; owned because keys come from the text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
    /// Inside or under a key that is not a string: never part of a config path.
    Opaque,
}

/// What a node is to its parent.
enum Role {
    Root,
    Item(Step),
    Key(Step),
    Value(Step),
}

/// A step of a path to look for: ours, or serde_path_to_error's for decode errors.
trait TargetStep {
    fn matches(&self, step: &Step) -> bool;
}

impl TargetStep for Segment {
    fn matches(&self, step: &Step) -> bool {
        match (step, self) {
            (Step::Key(key), Segment::Key(wanted)) => key == wanted,
            (Step::Index(index), Segment::Index(wanted)) => index == wanted,
            _ => false,
        }
    }
}

impl TargetStep for serde_path_to_error::Segment {
    fn matches(&self, step: &Step) -> bool {
        match (step, self) {
            (Step::Key(key), Self::Map { key: wanted }) => key == wanted,
            (Step::Index(index), Self::Seq { index: wanted }) => index == wanted,
            _ => false,
        }
    }
}

/// The 1-based line of the node at `target`: a mapping entry's key, or a sequence
/// item. When the node is absent (a defaulted field) it is the line of the deepest
/// ancestor that is present. `None` only when the YAML cannot be re-read, which
/// does not happen for text that serde-saphyr accepted: this is the same parser, and
/// the walk is linear in the events of a document the budget already bounded.
fn line_of<S: TargetStep>(yaml: &str, target: &[S]) -> Option<usize> {
    use serde_saphyr::granit_parser::{Event, Parser};

    let mut parser = Parser::new_from_str(yaml);
    let mut stack: Vec<Frame> = Vec::new();
    let mut path: Vec<Step> = Vec::new();
    // (depth, line) of the deepest prefix of `target` seen so far.
    let mut best: Option<(usize, usize)> = None;

    while let Some(Ok((event, span))) = parser.next() {
        let is_sequence = matches!(event, Event::SequenceStart(..));
        let is_container = is_sequence || matches!(event, Event::MappingStart(..));
        match event {
            Event::StreamEnd => break,
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(Frame::Sequence { pushed, .. } | Frame::Mapping { pushed, .. }) =
                    stack.pop()
                {
                    if pushed {
                        path.pop();
                    }
                }
                continue;
            }
            Event::Scalar(..)
            | Event::Alias(..)
            | Event::UnresolvedAlias(..)
            | Event::SequenceStart(..)
            | Event::MappingStart(..) => {}
            // Stream and document markers, and comment or anchor metadata: not nodes.
            _ => continue,
        }
        let mark = span.start;
        let role = match stack.last_mut() {
            None => Role::Root,
            Some(Frame::Sequence { next_index, .. }) => {
                *next_index += 1;
                Role::Item(Step::Index(*next_index - 1))
            }
            Some(Frame::Mapping { value_step, .. }) => match value_step.take() {
                Some(step) => Role::Value(step),
                None => {
                    let step = match &event {
                        Event::Scalar(key, ..) => Step::Key(key.to_string()),
                        _ => Step::Opaque,
                    };
                    *value_step = Some(step.clone());
                    Role::Key(step)
                }
            },
        };
        if let Role::Item(step) | Role::Key(step) = &role {
            let depth = path.len() + 1;
            let is_prefix = depth <= target.len()
                && path
                    .iter()
                    .chain(std::iter::once(step))
                    .zip(target)
                    .all(|(step, segment)| segment.matches(step));
            if is_prefix {
                if depth == target.len() {
                    return Some(mark.line());
                }
                if best.is_none_or(|(best_depth, _)| depth > best_depth) {
                    best = Some((depth, mark.line()));
                }
            }
        }
        if is_container {
            let step = match role {
                Role::Root => None,
                Role::Item(step) | Role::Value(step) => Some(step),
                Role::Key(_) => Some(Step::Opaque),
            };
            let pushed = step.is_some();
            path.extend(step);
            stack.push(if is_sequence {
                Frame::Sequence {
                    next_index: 0,
                    pushed,
                }
            } else {
                Frame::Mapping {
                    value_step: None,
                    pushed,
                }
            });
        }
    }
    best.map(|(_, line)| line)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strips the indentation common to all lines and the first line break, so YAML can
    /// be written inline and line 1 is the first line of text.
    fn yaml(text: &str) -> String {
        let text = text.strip_prefix('\n').unwrap_or(text);
        let indent = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| line.len() - line.trim_start().len())
            .min()
            .unwrap_or(0);
        text.lines()
            .map(|line| line.get(indent..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn parse_ok(text: &str) -> Config {
        match parse(&yaml(text)) {
            Ok(config) => config,
            Err(error) => panic!("expected a valid config, got: {error}"),
        }
    }

    /// What the user sees for a config that is refused.
    fn refused(text: &str) -> String {
        match parse(&yaml(text)) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn locality(text: &str) -> Locality {
        text.parse().unwrap()
    }

    const MYDB: &str = "
        node:
          locality: us-east1/us-east1-b
        services:
          - name: mydb
            vips: [127.200.0.1]
            ports:
              - number: 80
                name: http
                protocol: HTTP
            endpoints:
              - address: 127.0.1.1
                locality: us-east1
                ports:
                  http: 8080
              - address: 127.0.1.2
                locality: us-east1
              - address: 127.0.2.1
                locality: us-west
            localityLbSetting:
              enabled: true
              failover:
                - from: us-east1
                  to: us-west
    ";

    #[test]
    fn failover_priority_orders_endpoints_by_the_leading_labels_they_share_with_the_node() {
        let text = |priority: &str| {
            format!(
                "
node:
  locality: us-east1/us-east1-b
  labels: {{team: a}}
services:
  - name: db
    vips: [127.200.0.1]
    ports: [{{number: 80}}]
    localityLbSetting:
      failoverPriority: {priority}
    endpoints:
      - {{address: 127.0.1.1, locality: us-east1/us-east1-b, labels: {{team: a}}}}
      - {{address: 127.0.1.2, locality: us-east1/us-east1-c, labels: {{team: b}}}}
      - {{address: 127.0.1.3, locality: us-west1/us-west1-a, labels: {{team: a}}}}
      - {{address: 127.0.1.4, locality: us-east1/us-east1-b, labels: {{team: a}}, priority: 1}}
"
            )
        };
        let levels = |config: &Config| -> Vec<u32> {
            let service = &config.services[0];
            service
                .endpoints
                .iter()
                .map(|e| config.priority_of(service, e))
                .collect()
        };
        // Both labels, the region alone, neither (the team is not looked at once the
        // region differs), and the next priority's best.
        let config = parse_ok(&text("[topology.kubernetes.io/region, team]"));
        assert_eq!(levels(&config), [0, 1, 2, 3]);
        // `key=value` compares with the value, not the node's.
        let config = parse_ok(&text("[team=b]"));
        assert_eq!(levels(&config), [1, 0, 1, 3]);
        // Without failoverPriority, priorities are the endpoints' own.
        let config = parse_ok(&text("[]"));
        assert_eq!(levels(&config), [0, 0, 0, 1]);
        // And selection follows: the best level alone serves while it is healthy; with
        // it down, the next level (not the next zone of the same level) takes over.
        let config = parse_ok(&text("[topology.kubernetes.io/region, team]"));
        let table = |down: &str| -> Vec<String> {
            let plans = crate::desired::plan(
                &config,
                |_, t| {
                    if t.to_string() == down {
                        crate::health::Health::Unhealthy
                    } else {
                        crate::health::Health::Healthy
                    }
                },
                |_, _| false,
            );
            let mut table: Vec<String> = plans[0].table.iter().map(ToString::to_string).collect();
            table.dedup();
            table
        };
        assert_eq!(table("none"), ["127.0.1.1:80"]);
        assert_eq!(table("127.0.1.1:80"), ["127.0.1.2:80"]);
    }

    #[test]
    fn with_replaced_swaps_services_in_place_only_when_their_frontends_stay() {
        let config = parse_ok(
            "
services:
  - name: a
    vips: [127.200.0.1]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.1.1}]
  - name: b
    vips: [127.200.0.2]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.2.1}]
",
        );
        let mut b = (*config.services[1]).clone();
        b.endpoints[0].address = "127.0.2.9".parse().unwrap();
        let next = config.with_replaced(&[Arc::new(b.clone())]).unwrap();
        assert_eq!(next.service("b"), Some(&b));
        assert_eq!(next.service("a"), config.service("a"));
        assert_eq!(
            next.services.iter().map(|s| &s.name).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // Another VIP, another port, or a name it does not have: not in place.
        let mut moved = b.clone();
        moved.vips = vec!["127.200.0.1".parse().unwrap()];
        assert!(config.with_replaced(&[Arc::new(moved)]).is_none());
        let mut wider = b.clone();
        wider.ports[0].number = 81;
        assert!(config.with_replaced(&[Arc::new(wider)]).is_none());
        let mut renamed = b;
        renamed.name = "c".into();
        assert!(config.with_replaced(&[Arc::new(renamed)]).is_none());
    }

    #[test]
    fn endpoints_carry_a_priority_and_a_cluster_and_bad_ones_are_named() {
        let config = parse_ok(
            "
            services:
              - name: reviews
                vips: [10.96.0.10]
                ports: [{number: 9080}]
                endpoints:
                  - {address: 10.1.0.1, cluster: kind2}
                  - {address: 10.2.0.1, cluster: kind3, priority: 1}
            ",
        );
        let endpoints = &config.service("reviews").unwrap().endpoints;
        let seen: Vec<(u32, &str)> = endpoints
            .iter()
            .map(|e| (e.priority, &*e.cluster))
            .collect();
        assert_eq!(seen, [(0, "kind2"), (1, "kind3")]);
        let base = "
            services:
              - name: reviews
                vips: [10.96.0.10]
                ports: [{number: 9080}]
                endpoints:
                  - ";
        assert_eq!(
            refused(&format!("{base}{{address: 10.1.0.1, priority: 128}}")),
            "services[0].endpoints[0].priority (line 6): invalid value: integer `128`, expected a priority from 0 to 127"
        );
        assert!(
            refused(&format!("{base}{{address: 10.1.0.1, cluster: Kind_2}}")).starts_with(
                "services[0].endpoints[0].cluster (line 6): invalid cluster name \"Kind_2\""
            ),
        );
    }

    /// The Kubernetes source writes a service in the file's schema as JSON: it goes
    /// through the same checks, with the same errors (without lines).
    #[test]
    fn a_service_from_another_source_is_checked_like_the_file() {
        let service = service_from_json(serde_json::json!({
            "name": "reviews-failover.default",
            "vips": ["10.96.0.10"],
            "ports": [{"number": 9080, "name": "port-9080"}],
            "endpoints": [{"address": "10.1.0.1", "ports": {"port-9080": 9080}, "priority": 1}],
            "outlierDetection": {"consecutiveErrors": 1, "baseEjectionTime": "2m"},
        }))
        .unwrap();
        assert_eq!(service.endpoints[0].priority, 1);
        assert_eq!(
            service
                .outlier_detection
                .policy
                .settings()
                .base_ejection_time,
            Duration::from_secs(120)
        );
        let error = service_from_json(serde_json::json!({
            "name": "x", "vips": ["10.96.0.10"], "ports": [{"number": 9080}],
            "endpoints": [{"address": "10.1.0.1"}, {"address": "10.1.0.1"}],
        }))
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "endpoints[1].address: endpoint 10.1.0.1 is the same backend as endpoints[0]"
        );
        let error = service_from_json(serde_json::json!({
            "name": "x", "vips": ["10.96.0.10"], "ports": [{"number": 0}],
        }))
        .unwrap_err();
        assert_eq!(error.path, "ports[0].number");
    }

    #[test]
    fn a_duplicate_among_many_endpoints_names_the_first_and_other_ports_are_not_one() {
        // 5,000 endpoints, the last the same backend as endpoints[1234].
        let mut endpoints: Vec<serde_json::Value> = (0..5_000u32)
            .map(|i| serde_json::json!({"address": format!("10.2.{}.{}", i >> 8, i & 255)}))
            .collect();
        endpoints.push(serde_json::json!({"address": "10.2.4.210"}));
        let error = service_from_json(serde_json::json!({
            "name": "x", "vips": ["10.96.0.10"], "ports": [{"number": 80, "name": "http"}],
            "endpoints": endpoints,
        }))
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "endpoints[5000].address: endpoint 10.2.4.210 is the same backend as endpoints[1234]"
        );
        // The same address on another port is another backend.
        let service = service_from_json(serde_json::json!({
            "name": "x", "vips": ["10.96.0.10"], "ports": [{"number": 80, "name": "http"}],
            "endpoints": [{"address": "10.1.0.1"}, {"address": "10.1.0.1", "ports": {"http": 8080}}],
        }))
        .unwrap();
        assert_eq!(service.endpoints.len(), 2);
    }

    /// Assembly keeps what it can: a later service that reuses a name or a VIP:port is
    /// left out with the reason, and the others stay.
    #[test]
    fn assembly_leaves_out_later_services_that_collide() {
        let service = |name: &str, vip: &str| {
            service_from_json(serde_json::json!({
                "name": name, "vips": [vip], "ports": [{"number": 80}],
            }))
            .map(Arc::new)
            .unwrap()
        };
        let (config, left_out) = assemble(
            NodeConfig::default(),
            vec![
                service("a", "10.0.0.1"),
                service("b", "10.0.0.1"),
                service("a", "10.0.0.2"),
                service("c", "10.0.0.3"),
            ],
        );
        let kept: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(kept, ["a", "c"]);
        assert!(config.service("c").is_some());
        let why: Vec<String> = left_out
            .iter()
            .map(|(service, error)| format!("{}: {error}", service.name))
            .collect();
        assert_eq!(
            why,
            [
                "b: vips[0]: VIP 10.0.0.1:80 is already used by service \"a\"",
                "a: name: service name \"a\" is already used by services[0]",
            ]
        );
    }

    #[test]
    fn the_external_mydb_example_parses() {
        let config = parse_ok(MYDB);
        assert_eq!(config.node.locality, locality("us-east1/us-east1-b"));
        let mydb = config.service("mydb").unwrap();
        assert_eq!(mydb.vips, vec!["127.200.0.1".parse::<IpAddr>().unwrap()]);
        let http = &mydb.ports[0];
        assert_eq!(
            http,
            &PortConfig {
                number: 80,
                name: "http".into(),
                target_port: None,
                protocol: Some(Protocol::Http),
            }
        );
        let addresses: Vec<String> = mydb
            .endpoints
            .iter()
            .map(|endpoint| {
                format!(
                    "{}:{} {}",
                    endpoint.address,
                    endpoint.port_for(http),
                    endpoint.locality
                )
            })
            .collect();
        assert_eq!(
            addresses,
            [
                "127.0.1.1:8080 us-east1",
                "127.0.1.2:80 us-east1",
                "127.0.2.1:80 us-west"
            ]
        );
        assert_eq!(
            mydb.locality_lb,
            LocalityLbSetting {
                enabled: true,
                failover: vec![FailoverRule {
                    from: locality("us-east1"),
                    to: locality("us-west"),
                }],
                failover_order: vec![],
                spill: Spill::default(),
                failover_priority: vec![],
            }
        );
        assert_eq!(mydb.health_check, HealthCheckConfig::default());
        assert!(config.warnings().is_empty());
    }

    /// The seed's multi-cluster `reviews` failover (seeds/000), in the file's terms:
    /// the FailoverService's hostname and `port {number: 9080, protocol: http}`, its
    /// ordered backing services (`reviews` in kind2, then in kind3) as priorities 0 and 1
    /// with their clusters, and the TrafficPolicy's outlier detection (`consecutiveErrors:
    /// 1, interval: 10s, baseEjectionTime: 2m`) with the 100% ejection cap Service Mesh
    /// Hub sets. Plus what the file adds: weights, labels, an order inside a priority,
    /// and active checks.
    #[test]
    fn the_multi_cluster_reviews_example_parses() {
        let config = parse_ok(
            "
            services:
              - name: reviews-failover.default.global
                vips: [127.201.0.1, 'fd00::1']
                ports:
                  - number: 9080
                    name: http
                    protocol: http
                    targetPort: 9081
                endpoints:
                  # backingServices[0]: reviews.default in kind2 (v1, v2)
                  - {address: 127.0.3.1, locality: kind2, cluster: kind2, priority: 0, labels: {version: v1}}
                  - {address: 127.0.3.2, locality: kind2, cluster: kind2, priority: 0, labels: {version: v2}}
                  # backingServices[1]: reviews.default in kind3 (v1, v2, v3)
                  - {address: 127.0.4.1, locality: kind3, cluster: kind3, priority: 1, weight: 3, labels: {version: v1}}
                  - {address: 127.0.4.2, locality: kind3/zone-a, cluster: kind3, priority: 1}
                  - {address: '::1', locality: kind3, cluster: kind3, priority: 1}
                localityLbSetting:
                  failoverOrder: [kind2, kind3/zone-a]
                outlierDetection:
                  consecutiveErrors: 1
                  interval: 10s
                  baseEjectionTime: 2m
                healthCheck:
                  interval: 10s
                  timeout: 2s
                  healthyThreshold: 2
                  unhealthyThreshold: 3
                  tcp: {}
            ",
        );
        assert_eq!(config.node, NodeConfig::default());
        let reviews = &config.services[0];
        assert_eq!(reviews.name, "reviews-failover.default.global");
        assert_eq!(
            (reviews.ports[0].number, reviews.ports[0].protocol),
            (9080, Some(Protocol::Http))
        );
        assert_eq!(reviews.endpoints[0].port_for(&reviews.ports[0]), 9081);
        // The backing services' order: kind2 first, then kind3.
        let order: Vec<(String, u32, &str)> = reviews
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.priority, &*e.cluster))
            .collect();
        assert_eq!(
            order,
            [
                ("127.0.3.1".to_owned(), 0, "kind2"),
                ("127.0.3.2".to_owned(), 0, "kind2"),
                ("127.0.4.1".to_owned(), 1, "kind3"),
                ("127.0.4.2".to_owned(), 1, "kind3"),
                ("::1".to_owned(), 1, "kind3"),
            ]
        );
        let settings = reviews.outlier_detection.policy.settings();
        assert_eq!(
            (
                settings.consecutive_failures,
                settings.interval,
                settings.base_ejection_time,
                settings.max_ejection_percent,
            ),
            (1, Duration::from_secs(10), Duration::from_secs(120), 100)
        );
        assert_eq!(reviews.endpoints[2].weight, 3);
        assert_eq!(reviews.endpoints[0].weight, 1);
        assert_eq!(
            reviews.endpoints[2].labels.as_ref().unwrap()["version"],
            "v1"
        );
        assert_eq!(
            reviews.locality_lb.failover_order,
            vec![locality("kind2"), locality("kind3/zone-a")]
        );
        assert_eq!(
            reviews.health_check,
            HealthCheckConfig {
                interval: Duration::from_secs(10),
                timeout: Duration::from_secs(2),
                healthy_threshold: 2,
                unhealthy_threshold: 3,
                kind: HealthCheckKind::Tcp,
            }
        );
    }

    #[test]
    fn only_an_explicit_empty_list_removes_every_service() {
        for text in [
            "services: []",
            "node:\n  locality: us-east1\nservices: []\n",
        ] {
            assert_eq!(parse(text).unwrap().services, Vec::new(), "{text:?}");
        }
    }

    #[test]
    fn an_empty_or_truncated_document_is_an_error() {
        for text in ["", "  \n", "# nothing yet\n", "---\n"] {
            let error = parse(text).unwrap_err();
            assert_eq!(error.kind, ConfigErrorKind::Empty, "{text:?}");
            assert!(error.to_string().contains("services: []"), "{error}");
        }
        for text in [
            "node:\n  locality: us-east1/us-east1-b\n",
            "node:\n  locality: us-east1\nservices:\n",
            "services:",
        ] {
            let error = parse(text).unwrap_err();
            assert_eq!(error.kind, ConfigErrorKind::MissingServices, "{text:?}");
            assert_eq!(error.path, "services", "{text:?}");
        }
        // The line is given where the key is there to point at.
        let error = parse("node:\n  locality: us-east1\nservices:\n").unwrap_err();
        assert_eq!(error.line, Some(3), "{error}");
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let config = parse_ok(
            "
            services:
              - name: db
                vips: [127.200.0.1]
                ports: [{number: 5432}]
                endpoints: [{address: 127.0.0.2}]
                healthCheck: {}
            ",
        );
        let db = &config.services[0];
        assert_eq!(db.ports[0].name, "port-5432");
        assert_eq!(db.ports[0].target_port, None);
        assert_eq!(db.endpoints[0].port_for(&db.ports[0]), 5432);
        assert_eq!(db.endpoints[0].weight, 1);
        assert!(db.endpoints[0].locality.is_empty());
        assert_eq!(db.locality_lb, LocalityLbSetting::default());
        assert!(db.locality_lb.enabled);
        let check = &db.health_check;
        assert_eq!(check.interval, Duration::from_secs(1));
        assert_eq!(check.timeout, Duration::from_millis(500));
        assert_eq!((check.healthy_threshold, check.unhealthy_threshold), (1, 2));
        assert_eq!(check.kind, HealthCheckKind::Tcp);
    }

    #[test]
    fn a_service_without_endpoints_is_valid_and_reported() {
        let config = parse_ok(
            "
            services:
              - name: idle
                vips: [127.200.0.1]
                ports: [{number: 80}]
            ",
        );
        assert!(config.services[0].endpoints.is_empty());
        let warnings: Vec<String> = config.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            ["service \"idle\" has no endpoints: connections to its VIPs have no backend"]
        );
    }

    #[test]
    fn durations_take_units() {
        let check = |text: &str| {
            parse_ok(&format!(
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{{number: 80}}]
                    healthCheck: {text}
                "
            ))
            .services[0]
                .health_check
                .clone()
        };
        let minutes = check("{interval: 2m, timeout: 500ms}");
        assert_eq!(minutes.interval, Duration::from_secs(120));
        assert_eq!(minutes.timeout, Duration::from_millis(500));
        // An unset timeout follows a short interval down instead of exceeding it.
        let fast = check("{interval: 100ms}");
        assert_eq!(fast.timeout, Duration::from_millis(100));
        let fastest = check("{interval: 10ms, timeout: 10ms}");
        assert_eq!(fastest.interval, Duration::from_millis(10));
    }

    #[test]
    fn health_checks_can_be_disabled() {
        let config = parse_ok(
            "
            services:
              - name: db
                vips: [127.200.0.1]
                ports: [{number: 80}]
                healthCheck:
                  disabled: true
            ",
        );
        assert_eq!(config.services[0].health_check.kind, HealthCheckKind::None);
    }

    #[test]
    fn http_checks_default_like_envoy_and_take_path_host_and_statuses() {
        let config = parse_ok(
            "
            services:
              - name: mydb
                vips: [127.200.0.1]
                ports: [{number: 80}]
                healthCheck:
                  http: {}
              - name: other
                vips: [127.200.0.2]
                ports: [{number: 80}]
                healthCheck:
                  http:
                    path: /healthz
                    host: mydb.com
                    expectedStatuses: [{start: 200, end: 300}, {start: 404, end: 405}]
            ",
        );
        let HealthCheckKind::Http(default) = &config.services[0].health_check.kind else {
            panic!("expected an http check");
        };
        assert_eq!(default.path, "/");
        assert_eq!(default.host, "mydb");
        assert!(default.expects(200) && !default.expects(201) && !default.expects(503));
        let HealthCheckKind::Http(set) = &config.services[1].health_check.kind else {
            panic!("expected an http check");
        };
        assert_eq!(
            (set.path.as_str(), set.host.as_str()),
            ("/healthz", "mydb.com")
        );
        assert!(set.expects(204) && set.expects(404) && !set.expects(300) && !set.expects(503));
    }

    #[test]
    fn grpc_checks_name_the_service_and_default_the_authority() {
        let config = parse_ok(
            "
            services:
              - name: reviews
                vips: [127.200.0.1]
                ports: [{number: 9080}]
                healthCheck:
                  grpc: {serviceName: reviews.v1}
            ",
        );
        assert_eq!(
            config.services[0].health_check.kind,
            HealthCheckKind::Grpc(GrpcCheck {
                service: "reviews.v1".into(),
                authority: "reviews".into(),
            })
        );
        assert_eq!(
            refused(
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    healthCheck:
                      grpc: {}
                      disabled: true
                "
            ),
            "services[0].healthCheck.disabled (line 7): grpc and disabled are both set: a \
             health check is one kind"
        );
    }

    #[test]
    fn bad_http_checks_are_refused_with_field_and_line() {
        let cases = [
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    healthCheck:
                      tcp: {}
                      http: {}
                ",
                "services[0].healthCheck.http (line 7): tcp and http are both set: a health \
                 check is one kind",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    healthCheck:
                      http: {path: healthz}
                ",
                "services[0].healthCheck.http.path (line 6): path \"healthz\" must start with `/`",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    healthCheck:
                      http:
                        expectedStatuses:
                          - {start: 200, end: 300}
                          - {start: 300, end: 300}
                ",
                "services[0].healthCheck.http.expectedStatuses[1] (line 9): status range [300, \
                 300) is empty or outside 100..=599 (end is exclusive, as in Envoy)",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(refused(text), expected, "{text}");
        }
    }

    /// A service with one VIP, one port and one endpoint, followed by `extra` lines at
    /// the service's indentation; `extra` starts on line 6.
    fn service_with(extra: &str) -> String {
        format!(
            "services:\n  - name: db\n    vips: [127.200.0.1]\n    ports: [{{number: 80, name: http}}]\n    # the case under test:\n{}",
            yaml(extra)
                .lines()
                .map(|line| format!("    {line}\n"))
                .collect::<String>()
        )
    }

    #[test]
    fn unknown_fields_are_refused_where_they_are() {
        assert_eq!(
            refused("nodes: {locality: us-east1}"),
            "nodes (line 1): unknown field `nodes`, expected `node` or `services`"
        );
        assert_eq!(
            refused(&service_with(
                "
                healthCheck:
                  intervall: 5s
                "
            )),
            "services[0].healthCheck.intervall (line 7): unknown field `intervall`, expected one \
             of `interval`, `timeout`, `healthyThreshold`, `unhealthyThreshold`, `tcp`, `http`, `grpc`, `disabled`"
        );
        assert_eq!(
            refused(&service_with(
                "
                localityLbSetting:
                  failover:
                    - from: us-east1
                      too: us-west
                "
            )),
            "services[0].localityLbSetting.failover[0].too (line 9): unknown field `too`, \
             expected `from` or `to`"
        );
        assert_eq!(
            refused(&service_with("healthCheck: {tcp: {port: 81}}")),
            "services[0].healthCheck.tcp.port (line 6): unknown field `port`, there are no fields"
        );
    }

    #[test]
    fn a_service_with_hosts_and_no_vips_gets_a_stable_vip_from_the_range() {
        let yaml = "
services:
  - name: mydb
    hosts: [MyDB.com., db.example]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.0.9}]
  - name: other
    vips: [10.9.0.1]
    hosts: [other.example]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.0.10}]
";
        let options = ParseOptions {
            vip_range: "10.1.0.0/30".parse().unwrap(),
        };
        let config = parse_with(yaml, &options).unwrap();
        let mydb = config.service("mydb").unwrap();
        assert_eq!(mydb.hosts, ["mydb.com", "db.example"]);
        assert_eq!(mydb.vips.len(), 1);
        let vip = mydb.vips[0];
        assert!(
            ipnet::IpNet::from(options.vip_range).contains(&vip),
            "{vip}"
        );
        // The same name gets the same VIP, wherever it is in the file.
        let alone = parse_with(
            &yaml.replace("vips: [10.9.0.1]", "vips: [10.9.0.2]"),
            &options,
        )
        .unwrap();
        assert_eq!(alone.service("mydb").unwrap().vips, [vip]);
        // Whatever it hashes to, a VIP another service has is skipped, with a warning
        // naming both; a range with no room left is an error.
        let mut taken = yaml.to_owned();
        for (at, address) in ["10.1.0.0", "10.1.0.1", "10.1.0.2", "10.1.0.3"]
            .iter()
            .enumerate()
        {
            if vip.to_string() != *address {
                continue;
            }
            taken = yaml.replace("vips: [10.9.0.1]", &format!("vips: [{address}]"));
            let config = parse_with(&taken, &options).unwrap();
            let moved = config.service("mydb").unwrap().vips[0];
            assert_ne!(moved, vip);
            assert_eq!(
                config.warnings(),
                [ConfigWarning::VipCollision {
                    service: "mydb".into(),
                    wanted: vip,
                    allocated: moved,
                    taken_by: "other".into(),
                }],
                "{at}"
            );
        }
        let full = taken.replace(
            &format!("vips: [{vip}]"),
            "vips: [10.1.0.0, 10.1.0.1, 10.1.0.2, 10.1.0.3]",
        );
        assert_eq!(
            parse_with(&full, &options).unwrap_err().to_string(),
            "services[0].hosts (line 4): no free address is left in the VIP range 10.1.0.0/30 \
             for a service without `vips`"
        );
        // The default range is Istio's.
        let config = parse(yaml).unwrap();
        let default: ipnet::Ipv4Net = DEFAULT_VIP_RANGE.parse().unwrap();
        assert!(ipnet::IpNet::from(default).contains(&config.service("mydb").unwrap().vips[0]));
    }

    #[test]
    fn hosts_are_one_services_each_and_exact_names() {
        let two = "
services:
  - name: a
    hosts: [mydb.com]
    ports: [{number: 80}]
  - name: b
    vips: [10.0.0.2]
    hosts: [x.example, MYDB.com]
    ports: [{number: 80}]
";
        assert_eq!(
            parse(two).unwrap_err().to_string(),
            "services[1].hosts[1] (line 8): host \"mydb.com\" is already a host of service \"a\""
        );
        assert_eq!(
            refused(&service_with("hosts: [\"*.example.com\"]")),
            "services[0].hosts[0] (line 6): \"*.example.com\" is a wildcard: detour answers DNS \
             for exact names only (one name, one service's VIPs)"
        );
        assert_eq!(
            refused("services:\n  - name: db\n    ports: [{number: 80}]\n"),
            "services[0].vips (line 2): a service needs at least one VIP, or `hosts` for detour \
             to allocate one"
        );
        assert_eq!(
            refused(
                "services:\n  - name: db\n    hosts: [db.example]\n    ports: [{number: 80}]\n    endpoints: [{address: \"::1\"}]\n"
            ),
            "services[0].hosts (line 3): detour allocates an IPv4 VIP for a service with `hosts` \
             and no `vips`, and this service's endpoints are all IPv6: give it `vips`"
        );
    }

    #[test]
    fn bad_values_are_refused_with_field_and_line() {
        let cases = [
            (
                "endpoints: [{address: dynamodb.us-east-1.amazonaws.com}]",
                "services[0].endpoints[0].address (line 6): \"dynamodb.us-east-1.amazonaws.com\" \
                 is a DNS name, and this service's resolution is STATIC (IP addresses only): set \
                 `resolution: DNS` on the service to resolve it",
            ),
            (
                "resolution: DNS\nendpoints: [{address: \"-bad.example\"}]",
                "services[0].endpoints[0].address (line 7): \"-bad.example\" is neither an IP \
                 address nor a DNS name",
            ),
            (
                "resolution: DNS\nendpoints: [{address: A.example}, {address: a.example}]",
                "services[0].endpoints[1].address (line 7): endpoint a.example is the same \
                 backend as endpoints[0]",
            ),
            (
                "resolution: NONE",
                "services[0].resolution (line 6): NONE (connect to whatever address the \
                 application asked for) leaves nothing to fail over to: use STATIC or DNS",
            ),
            (
                "resolution: dns",
                "services[0].resolution (line 6): unknown resolution \"dns\": expected STATIC \
                 or DNS",
            ),
            (
                "endpoints:\n- address: 127.0.0.3\n  weight: 0",
                "services[0].endpoints[0].weight (line 8): invalid value: integer `0`, expected a \
                 weight from 1 to 1000000",
            ),
            (
                "endpoints:\n- address: 127.0.0.3\n  weight: 1000001",
                "services[0].endpoints[0].weight (line 8): invalid value: integer `1000001`, \
                 expected a weight from 1 to 1000000",
            ),
            (
                "endpoints:\n- address: 127.0.0.3\n  locality: us-east1//a",
                "services[0].endpoints[0].locality (line 8): locality \"us-east1//a\" has an \
                 empty part (expected region, region/zone or region/zone/subzone)",
            ),
            (
                "endpoints:\n- address: 127.0.0.3\n  ports: {http: 0}",
                "services[0].endpoints[0].ports.http (line 8): invalid value: integer `0`, \
                 expected a port number from 1 to 65535",
            ),
            (
                "endpoints:\n- address: 127.0.0.3\n  ports:\n    http: 81\n    http: 82",
                "services[0].endpoints[0].ports (line 9): \"http\" is listed twice",
            ),
            (
                "endpoints: [{address: 0.0.0.0}]",
                "services[0].endpoints[0].address (line 6): 0.0.0.0 is an unspecified or \
                 multicast address, not a host",
            ),
            (
                "healthCheck:\n  interval: 5ms",
                "services[0].healthCheck.interval (line 7): \"5ms\" is too short: the minimum is \
                 10ms",
            ),
            (
                "healthCheck:\n  interval: 10",
                "services[0].healthCheck.interval (line 7): invalid duration \"10\": time unit \
                 needed, for example 10sec or 10ms",
            ),
            (
                "healthCheck:\n  timeout: 0s",
                "services[0].healthCheck.timeout (line 7): \"0s\" is too short: the minimum is 1ns",
            ),
            (
                "healthCheck:\n  unhealthyThreshold: 0",
                "services[0].healthCheck.unhealthyThreshold (line 7): invalid value: integer \
                 `0`, expected a count from 1 to 4294967295",
            ),
            (
                "localityLbSetting:\n  failoverOrder: [us-west, a/b/c/d]",
                "services[0].localityLbSetting.failoverOrder[1] (line 7): locality \"a/b/c/d\" \
                 has more than 3 parts (expected region/zone/subzone)",
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(refused(&service_with(extra)), expected, "{extra}");
        }
    }

    #[test]
    fn bad_service_fields_are_refused_with_field_and_line() {
        assert_eq!(
            refused(
                "
                services:
                  - name: My_DB
                "
            ),
            "services[0].name (line 2): invalid service name \"My_DB\": use at most 253 \
             lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        );
        assert_eq!(
            refused(
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports:
                      - number: 70000
                "
            ),
            "services[0].ports[0].number (line 5): invalid value: integer `70000`, expected a \
             port number from 1 to 65535"
        );
        assert_eq!(
            refused(
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports:
                      - number: 80
                        protocol: UDP
                "
            ),
            "services[0].ports[0].protocol (line 6): unknown protocol \"UDP\", expected one of \
             HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, MONGO, TCP, TLS"
        );
        assert_eq!(
            refused(
                "
                services:
                  - name: db
                    ports: [{number: 80}]
                "
            ),
            "services[0].vips (line 2): a service needs at least one VIP, or `hosts` for detour \
             to allocate one"
        );
        assert_eq!(
            refused("services: [\n"),
            "services (line 1): unclosed bracket '['"
        );
        assert_eq!(
            refused("- a\n- b\n"),
            "line 1: invalid type: sequence, expected a mapping"
        );
    }

    #[test]
    fn checks_across_fields_name_the_field_and_line() {
        let cases = [
            (
                "
                services:
                  - name: db
                    vips: []
                    ports: [{number: 80}]
                ",
                "services[0].vips (line 3): a service needs at least one VIP, or `hosts` for \
                 detour to allocate one",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: []
                ",
                "services[0].ports (line 4): a service needs at least one port",
            ),
            (
                "
                services:
                  - name: db
                    vips:
                      - 127.200.0.1
                      - 127.200.0.1
                    ports: [{number: 80}]
                ",
                "services[0].vips[1] (line 5): VIP 127.200.0.1 is listed twice",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports:
                      - number: 80
                      - number: 80
                        name: web
                ",
                "services[0].ports[1].number (line 6): port number 80 is listed twice",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports:
                      - number: 80
                        name: web
                      - number: 81
                        name: web
                ",
                "services[0].ports[1].name (line 8): port name \"web\" is listed twice",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports:
                      - number: 80
                        name: port-81
                      - number: 81
                ",
                "services[0].ports[1].number (line 7): port name \"port-81\" is listed twice",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports:
                      - {number: 80, name: http}
                      - {number: 443, name: https}
                    endpoints:
                      - address: 127.0.0.2
                        ports: {htp: 8080}
                ",
                "services[0].endpoints[0].ports (line 9): no port of this service is named \
                 \"htp\" (ports: http, https)",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1, 'fd00::10']
                    ports: [{number: 80}]
                    endpoints:
                      - address: 127.0.0.2
                ",
                "services[0].vips[1] (line 3): VIP fd00::10 is IPv6 but no endpoint of this \
                 service is: a connect() can only be rewritten to an address of its own family",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80, name: http}]
                    endpoints:
                      - address: 127.0.0.2
                        ports: {http: 8080}
                      - address: 127.0.0.2
                        ports: {http: 8081}
                      - address: 127.0.0.2
                        ports: {http: 8080}
                ",
                "services[0].endpoints[2].address (line 10): endpoint 127.0.0.2 is the same \
                 backend as endpoints[0]",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    localityLbSetting:
                      failover:
                        - from: us-east1
                          to: us-east1
                ",
                "services[0].localityLbSetting.failover[0].to (line 8): failover from us-east1 \
                 to the same locality does nothing",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    localityLbSetting:
                      failover:
                        - from: ''
                          to: us-west
                ",
                "services[0].localityLbSetting.failover[0].from (line 7): from must not be empty",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    localityLbSetting:
                      failoverOrder:
                        - us-west
                        - ''
                ",
                "services[0].localityLbSetting.failoverOrder[1] (line 8): a failoverOrder entry \
                 must not be empty",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    localityLbSetting:
                      failoverPriority: [topology.kubernetes.io/region, =us-west]
                ",
                "services[0].localityLbSetting.failoverPriority[1] (line 6): a failoverPriority \
                 label must not be empty",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    localityLbSetting:
                      failoverPriority: [team, zone, team=a]
                ",
                "services[0].localityLbSetting.failoverPriority[2] (line 6): label \"team\" is \
                 already failoverPriority[0]",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    endpoints: [{address: 127.0.0.2, priority: 64}]
                    localityLbSetting:
                      failoverPriority: [team]
                ",
                "services[0].localityLbSetting.failoverPriority (line 7): 1 labels under 65 \
                 priorities need 130 levels; at most 128 fit (fewer labels, or fewer priorities)",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    healthCheck:
                      interval: 1s
                      timeout: 1500ms
                ",
                "services[0].healthCheck.timeout (line 7): timeout 1s 500ms is longer than the \
                 interval 1s",
            ),
            (
                "
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                    healthCheck:
                      tcp: {}
                      disabled: true
                ",
                "services[0].healthCheck.disabled (line 7): tcp is set but disabled is true: \
                 keep one of them",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(refused(text), expected, "{text}");
        }
    }

    /// The outlier settings of the single service in `service_with(extra)`.
    fn outlier_of(extra: &str) -> OutlierDetectionConfig {
        match parse(&service_with(extra)) {
            Ok(config) => config.services[0].outlier_detection.clone(),
            Err(error) => panic!("expected a valid config, got: {error}"),
        }
    }

    #[test]
    fn the_seed_outlier_detection_blocks_parse() {
        let config = parse_ok(
            "
            services:
              - name: mydb
                vips: [127.200.0.1]
                ports: [{number: 80}]
                outlierDetection:
                  consecutiveErrors: 1
                  interval: 10s
                  baseEjectionTime: 2m
              - name: reviews
                vips: [127.200.0.2]
                ports: [{number: 9080}]
                outlierDetection:
                  consecutive5xxErrors: 1
                  interval: 15s
                  baseEjectionTime: 1m
            ",
        );
        let settings = |index: usize| *config.services[index].outlier_detection.policy.settings();
        assert_eq!(
            settings(0),
            EjectionSettings {
                consecutive_failures: 1,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(120),
                ..EjectionSettings::default()
            }
        );
        assert_eq!(
            settings(1),
            EjectionSettings {
                consecutive_failures: 1,
                interval: Duration::from_secs(15),
                base_ejection_time: Duration::from_secs(60),
                ..EjectionSettings::default()
            }
        );
        for service in &config.services {
            assert_eq!(
                service.outlier_detection.handshake_timeout,
                Duration::from_millis(100)
            );
        }
    }

    #[test]
    fn outlier_detection_defaults_to_ejecting_after_five_failures() {
        let absent = parse_ok(
            "
            services:
              - name: db
                vips: [127.200.0.1]
                ports: [{number: 80}]
            ",
        );
        let db = &absent.services[0];
        assert_eq!(db.outlier_detection, OutlierDetectionConfig::default());
        assert_eq!(
            *db.outlier_detection.policy.settings(),
            EjectionSettings {
                consecutive_failures: 5,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_time: Duration::from_secs(300),
                max_ejection_percent: 100,
                panic_threshold_percent: 0,
            }
        );
        assert_eq!(
            db.outlier_detection.handshake_timeout,
            Duration::from_millis(100)
        );
        assert!(db.terminate_connections);
        assert_eq!(
            outlier_of("outlierDetection: {}"),
            OutlierDetectionConfig::default()
        );
    }

    #[test]
    fn every_outlier_field_is_read() {
        let outlier = outlier_of(
            "
            outlierDetection:
              consecutiveLocalOriginFailures: 3
              interval: 500ms
              baseEjectionTime: 15s
              maxEjectionTime: 15s
              maxEjectionPercent: 50
              minHealthPercent: 30
              handshakeTimeout: 250ms
            ",
        );
        assert_eq!(
            *outlier.policy.settings(),
            EjectionSettings {
                consecutive_failures: 3,
                interval: Duration::from_millis(500),
                base_ejection_time: Duration::from_secs(15),
                max_ejection_time: Duration::from_secs(15),
                max_ejection_percent: 50,
                panic_threshold_percent: 30,
            }
        );
        assert_eq!(outlier.handshake_timeout, Duration::from_millis(250));
        // 0 turns passive ejection off; it is not an error.
        let off = outlier_of("outlierDetection: {consecutive5xxErrors: 0}");
        assert_eq!(off.policy.settings().consecutive_failures, 0);
        for bound in ["10ms", "10s"] {
            let outlier = outlier_of(&format!("outlierDetection: {{handshakeTimeout: {bound}}}"));
            assert_eq!(
                outlier.handshake_timeout,
                humantime::parse_duration(bound).unwrap()
            );
        }
    }

    #[test]
    fn bad_outlier_detection_is_refused_with_field_and_line() {
        let cases = [
            (
                "outlierDetection:\n  consecutiveErrors: 1\n  consecutive5xxErrors: 1",
                "services[0].outlierDetection.consecutive5xxErrors (line 8): consecutiveErrors \
                 and consecutive5xxErrors are both set, and both mean failed connections in a \
                 row here (detour works at L4): keep consecutiveErrors and remove \
                 consecutive5xxErrors",
            ),
            (
                "outlierDetection:\n  consecutiveLocalOriginFailures: 2\n  consecutive5xxErrors: 3",
                "services[0].outlierDetection.consecutiveLocalOriginFailures (line 7): \
                 consecutive5xxErrors and consecutiveLocalOriginFailures are both set, and both \
                 mean failed connections in a row here (detour works at L4): keep \
                 consecutive5xxErrors and remove consecutiveLocalOriginFailures",
            ),
            (
                "outlierDetection:\n  consecutiveGatewayErrors: 3",
                "services[0].outlierDetection.consecutiveGatewayErrors (line 7): \
                 consecutiveGatewayErrors counts HTTP 502/503/504 responses, which detour, \
                 working at connect time, cannot see; use consecutiveErrors, which counts \
                 failed connections",
            ),
            (
                "outlierDetection:\n  consecutiveErrors: 2\n  splitExternalLocalOriginErrors: true",
                "services[0].outlierDetection.splitExternalLocalOriginErrors (line 8): \
                 splitExternalLocalOriginErrors separates HTTP errors from connection failures, \
                 but detour, working at connect time, only sees connection failures; remove it \
                 and use consecutiveErrors",
            ),
            (
                "outlierDetection:\n  interval: 0s",
                "services[0].outlierDetection.interval (line 7): outlierDetection.interval must \
                 be greater than 0",
            ),
            (
                "outlierDetection:\n  baseEjectionTime: 0s",
                "services[0].outlierDetection.baseEjectionTime (line 7): \
                 outlierDetection.baseEjectionTime must be greater than 0",
            ),
            (
                "outlierDetection:\n  baseEjectionTime: 1m\n  maxEjectionTime: 30s",
                "services[0].outlierDetection.maxEjectionTime (line 8): \
                 outlierDetection.maxEjectionTime (30s) must be at least baseEjectionTime (60s)",
            ),
            (
                // The maximum is the default 300s: the base is what the user wrote.
                "outlierDetection:\n  baseEjectionTime: 10m",
                "services[0].outlierDetection.baseEjectionTime (line 7): \
                 outlierDetection.maxEjectionTime (300s) must be at least baseEjectionTime \
                 (600s)",
            ),
            (
                "outlierDetection:\n  maxEjectionTime: 400days",
                "services[0].outlierDetection.maxEjectionTime (line 7): \
                 outlierDetection.maxEjectionTime (34560000s) must be at most 31536000s",
            ),
            (
                "outlierDetection:\n  interval: 10",
                "services[0].outlierDetection.interval (line 7): invalid duration \"10\": time \
                 unit needed, for example 10sec or 10ms",
            ),
            (
                "outlierDetection:\n  maxEjectionPercent: 101",
                "services[0].outlierDetection.maxEjectionPercent (line 7): invalid value: \
                 integer `101`, expected a percentage from 0 to 100",
            ),
            (
                "outlierDetection:\n  minHealthPercent: -1",
                "services[0].outlierDetection.minHealthPercent (line 7): invalid type: \
                 integer `-1`, expected a percentage from 0 to 100",
            ),
            (
                "outlierDetection:\n  consecutiveErrors: -1",
                "services[0].outlierDetection.consecutiveErrors (line 7): invalid type: \
                 integer `-1`, expected a count from 0 to 4294967295",
            ),
            (
                "outlierDetection:\n  handshakeTimeout: 5ms",
                "services[0].outlierDetection.handshakeTimeout (line 7): \"5ms\" is too short: \
                 the minimum is 10ms",
            ),
            (
                "outlierDetection:\n  handshakeTimeout: 11s",
                "services[0].outlierDetection.handshakeTimeout (line 7): \"11s\" is too long: \
                 the maximum is 10s",
            ),
            (
                "outlierDetection:\n  consecutiveErorrs: 1",
                "services[0].outlierDetection.consecutiveErorrs (line 7): unknown field \
                 `consecutiveErorrs`, expected one of `consecutiveErrors`, \
                 `consecutive5xxErrors`, `consecutiveLocalOriginFailures`, \
                 `consecutiveGatewayErrors`, `splitExternalLocalOriginErrors`, `interval`, \
                 `baseEjectionTime`, `maxEjectionTime`, `maxEjectionPercent`, \
                 `minHealthPercent`, `handshakeTimeout`",
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(refused(&service_with(extra)), expected, "{extra}");
        }
    }

    #[test]
    fn an_outlier_error_value_carries_the_policy_reason() {
        let error = parse(&service_with(
            "outlierDetection:\n  baseEjectionTime: 1m\n  maxEjectionTime: 30s",
        ))
        .unwrap_err();
        assert_eq!(error.path, "services[0].outlierDetection.maxEjectionTime");
        assert_eq!(error.line, Some(8));
        assert_eq!(
            error.kind,
            ConfigErrorKind::Outlier(OutlierError::MaxBelowBase {
                base: Duration::from_secs(60),
                max: Duration::from_secs(30),
            })
        );
    }

    #[test]
    fn spill_is_gradual_140_unless_told_otherwise() {
        let spill_of = |extra: &str| match parse(&service_with(extra)) {
            Ok(config) => config.services[0].locality_lb.spill,
            Err(error) => panic!("expected a valid config, got: {error}"),
        };
        let gradual = |overprovisioning_percent| Spill::Gradual {
            overprovisioning_percent,
        };
        assert_eq!(spill_of(""), gradual(140));
        assert_eq!(spill_of("localityLbSetting: {enabled: true}"), gradual(140));
        assert_eq!(
            spill_of("localityLbSetting: {spill: strict}"),
            Spill::Strict
        );
        assert_eq!(
            spill_of("localityLbSetting: {spill: gradual}"),
            gradual(140)
        );
        assert_eq!(
            spill_of("localityLbSetting: {spill: gradual, overprovisioningFactor: 200}"),
            gradual(200)
        );
        assert_eq!(
            spill_of("localityLbSetting: {overprovisioningFactor: 100}"),
            gradual(100)
        );
        assert_eq!(LocalityLbSetting::default().spill, gradual(140));
    }

    #[test]
    fn bad_spill_is_refused_with_field_and_line() {
        let cases = [
            (
                "localityLbSetting:\n  spill: strict\n  overprovisioningFactor: 140",
                "services[0].localityLbSetting.overprovisioningFactor (line 8): \
                 overprovisioningFactor only applies to spill: gradual, but spill is strict: \
                 remove one of them",
            ),
            (
                "localityLbSetting:\n  overprovisioningFactor: 99",
                "services[0].localityLbSetting.overprovisioningFactor (line 7): invalid value: \
                 integer `99`, expected an overprovisioning factor in percent (140 = 1.4) from \
                 100 to 4294967295",
            ),
            (
                "localityLbSetting:\n  spill: fast",
                "services[0].localityLbSetting.spill (line 7): unknown variant `fast`, expected \
                 `strict` or `gradual`",
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(refused(&service_with(extra)), expected, "{extra}");
        }
    }

    #[test]
    fn tls_origination_is_simple_or_off_and_checked_by_tcp_only() {
        let tls = |extra: &str| parse(&service_with(extra)).map(|c| c.services[0].tls.clone());
        assert_eq!(tls("endpoints: [{address: 127.0.0.1}]"), Ok(None));
        assert_eq!(
            tls("endpoints: [{address: 127.0.0.1}]\ntls: {mode: SIMPLE, sni: DB.Example.}"),
            Ok(Some(TlsOrigination {
                sni: Some("db.example".into()),
                ca_certificates: None,
            }))
        );
        assert_eq!(
            tls("endpoints: [{address: 127.0.0.1}]\ntls: {mode: DISABLE}"),
            Ok(None)
        );
        assert_eq!(
            refused(&service_with(
                "endpoints: [{address: 127.0.0.1}]\ntls: {sni: db}"
            )),
            "services[0].tls (line 7): missing field `mode`"
        );
        assert_eq!(
            refused(&service_with(
                "endpoints: [{address: 127.0.0.1}]\ntls: {mode: SIMPLE, sni: 'a b'}"
            )),
            "services[0].tls.sni (line 7): \"a b\" is not a DNS name"
        );
        assert_eq!(
            refused(&service_with(
                "endpoints: [{address: 127.0.0.1}]\ntls: {mode: SIMPLE}\nhealthCheck: {http: {}}"
            )),
            "services[0].healthCheck (line 8): the service originates TLS (`tls`), and an HTTP \
             or gRPC check would speak plain text to its TLS port: use a `tcp` check, or none"
        );
    }

    #[test]
    fn terminate_connections_defaults_to_true() {
        let terminate = |extra: &str| match parse(&service_with(extra)) {
            Ok(config) => config.services[0].terminate_connections,
            Err(error) => panic!("expected a valid config, got: {error}"),
        };
        assert!(terminate(""));
        assert!(terminate("terminateConnections: true"));
        assert!(!terminate("terminateConnections: false"));
        assert_eq!(
            refused(&service_with("terminateConnections: sometimes")),
            "services[0].terminateConnections (line 6): invalid boolean, expected true or false"
        );
    }

    #[test]
    fn a_percent_cap_that_ejects_nobody_in_a_tier_is_reported() {
        let warnings = |percent: &str| -> Vec<String> {
            parse_ok(&format!(
                "
                node:
                  locality: us-east1/b
                services:
                  - name: db
                    vips: [127.200.0.1]
                    ports: [{{number: 80}}]
                    endpoints:
                      - {{address: 127.0.1.1, locality: us-east1/b}}
                      - {{address: 127.0.1.2, locality: us-east1/b}}
                      - {{address: 127.0.2.1, locality: us-west}}
                    outlierDetection: {percent}
                "
            ))
            .warnings()
            .iter()
            .map(ToString::to_string)
            .collect()
        };
        // 50% of the two same-zone endpoints is one; of the lone `other` one, none.
        assert_eq!(
            warnings("{maxEjectionPercent: 50}"),
            [
                "service \"db\": outlierDetection.maxEjectionPercent 50 of the 1 endpoint(s) in \
              tier other allows no ejection, so a failing backend there keeps its \
              connections; detour caps ejection per tier, and 100 (its default) lets the tier \
              fail over"
            ]
        );
        assert!(warnings("{}").is_empty());
        // Ejection turned off on purpose is not a mistake.
        assert!(warnings("{maxEjectionPercent: 0}").is_empty());
        assert!(warnings("{maxEjectionPercent: 50, consecutiveErrors: 0}").is_empty());
    }

    #[test]
    fn names_and_vips_are_unique_across_services() {
        assert_eq!(
            refused(
                "
                services:
                  - name: mydb
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                  - name: mydb
                    vips: [127.200.0.2]
                    ports: [{number: 80}]
                "
            ),
            "services[1].name (line 5): service name \"mydb\" is already used by services[0]"
        );
        assert_eq!(
            refused(
                "
                services:
                  - name: mydb
                    vips: [127.200.0.1]
                    ports: [{number: 80}]
                  - name: cache
                    vips:
                      - 127.200.0.2
                      - 127.200.0.1
                    ports: [{number: 6379}, {number: 80}]
                "
            ),
            "services[1].vips[1] (line 8): VIP 127.200.0.1:80 is already used by service \"mydb\""
        );
        assert_eq!(
            refused(
                "
                services:
                  - {name: a, vips: ['fd00::1'], ports: [{number: 80}]}
                  - {name: b, vips: ['fd00::1'], ports: [{number: 80}]}
                "
            ),
            "services[1].vips[0] (line 3): VIP [fd00::1]:80 is already used by service \"a\""
        );
        // The same VIP on another port is another service's business.
        let config = parse_ok(
            "
            services:
              - {name: a, vips: [127.200.0.1], ports: [{number: 80}]}
              - {name: b, vips: [127.200.0.1], ports: [{number: 443}]}
            ",
        );
        assert_eq!(config.services.len(), 2);
    }

    #[test]
    fn the_yaml_library_s_errors_are_in_the_user_s_terms() {
        let service =
            "services:\n  - name: db\n    vips: [127.200.0.1]\n    ports: [{number: 80}]\n";
        let cases = [
            (
                service.replace("name: db", "name:"),
                "services[0].name (line 2): invalid type: null (an empty value), expected a string",
            ),
            (
                service.replace("[127.200.0.1]", "127.200.0.1"),
                "services[0].vips (line 3): invalid type: value \"127.200.0.1\", expected a list",
            ),
            (
                format!("{service}    healthCheck: 5s\n"),
                "services[0].healthCheck (line 5): invalid type: value \"5s\", expected a mapping",
            ),
            (
                format!("{service}    name: again\n"),
                "services[0] (line 2): duplicate field `name`",
            ),
            (
                format!("{service}---\nservices: []\n"),
                "line 5: a second detour document (the first starts at line 1): keep `node` and \
                 `services` in one",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(&text).unwrap_err().to_string(), expected, "{text}");
        }
    }

    /// A service whose `consecutiveGatewayErrors` holds `value`: the field takes any
    /// YAML at all (it is refused afterwards, by name), so whatever is there is read.
    fn service_holding(value: &str) -> String {
        format!(
            "services:\n  - name: db\n    vips: [127.200.0.1]\n    ports: [{{number: 80}}]\n    \
             outlierDetection:\n      consecutiveGatewayErrors: {value}\n"
        )
    }

    /// Parses `text`, which must be refused within five seconds, and returns the message.
    /// Unbounded, each case here would run for minutes or exhaust memory or the stack;
    /// bounded, it takes well under a second even in a debug build, so the margin is
    /// for a loaded machine, not for slack in the limits.
    fn refused_quickly(text: &str) -> String {
        let started = std::time::Instant::now();
        let result = parse(text);
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(5),
            "took {elapsed:?} to refuse {} bytes: {result:?}",
            text.len()
        );
        match result {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn the_field_that_takes_any_yaml_reads_an_ordinary_value() {
        // The hostile cases below go through this field; here it is shown to read what
        // it is given (and refuse it by name), so they test the budget, not a shortcut.
        let error = parse(&service_holding("[[1, 2], {a: b}]")).unwrap_err();
        assert_eq!(
            error.path,
            "services[0].outlierDetection.consecutiveGatewayErrors"
        );
        assert!(matches!(
            error.kind,
            ConfigErrorKind::UnsupportedOutlierField { .. }
        ));
    }

    #[test]
    fn a_billion_laughs_is_refused_quickly() {
        // Nine levels of nine aliases each: 9^9 (387 million) strings once expanded,
        // from under 400 bytes of text.
        let mut levels = vec!["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]".to_owned()];
        for level in 1..=9 {
            let aliases = vec![format!("*l{}", level - 1); 9].join(", ");
            levels.push(format!("&l{level} [{aliases}]"));
        }
        let text = service_holding(&format!("[{}]", levels.join(", ")));
        assert!(text.len() < 1024, "{} bytes", text.len());
        let message = refused_quickly(&text);
        assert!(
            message.contains(&format!(
                "aliases expand to more than {MAX_REPLAYED_EVENTS} YAML events"
            )),
            "{message}"
        );
    }

    #[test]
    fn nesting_ten_thousand_deep_is_refused_quickly() {
        let depth = 10_000;
        let flow = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let block = format!("\n{}{}1", " ".repeat(8), "- ".repeat(depth));
        for (style, value) in [("flow", flow), ("block", block)] {
            let message = refused_quickly(&service_holding(&value));
            assert!(
                message.ends_with(&format!("nested deeper than {MAX_DEPTH} levels")),
                "{style}: {message}"
            );
        }
    }

    #[test]
    fn a_document_over_the_size_limit_is_not_parsed() {
        let text = format!("{}\nservices: []\n", "#".repeat(MAX_DOCUMENT_BYTES));
        let error = refused_quickly(&text);
        assert_eq!(
            error,
            format!(
                "the configuration is {} bytes, more than the {MAX_DOCUMENT_BYTES} accepted",
                text.len()
            )
        );
        // At the limit it is parsed as usual.
        let padded = format!("services: []\n{}", "#".repeat(MAX_DOCUMENT_BYTES - 13));
        assert_eq!(padded.len(), MAX_DOCUMENT_BYTES);
        assert_eq!(parse(&padded).unwrap().services, Vec::new());
    }

    #[test]
    fn the_error_value_carries_path_line_and_kind() {
        let error = parse(&yaml(
            "
            services:
              - name: db
                vips: [127.200.0.1]
                ports: [{number: 80}]
                healthCheck: {interval: 1s, timeout: 2s}
            ",
        ))
        .unwrap_err();
        assert_eq!(error.path, "services[0].healthCheck.timeout");
        assert_eq!(error.line, Some(5));
        assert_eq!(
            error.kind,
            ConfigErrorKind::TimeoutExceedsInterval {
                timeout: Duration::from_secs(2),
                interval: Duration::from_secs(1),
            }
        );
    }

    #[test]
    fn line_of_finds_keys_items_and_falls_back_to_the_parent() {
        let text = yaml(
            "
            # a comment
            services:
              - name: a
                vips: [127.0.0.1,
                       127.0.0.2]
              -
                name: b
                healthCheck: {interval: 1s}
            ",
        );
        let path = |segments: &[Segment]| line_of(&text, segments);
        use Segment::{Index, Key};
        assert_eq!(path(&[Key("services")]), Some(2));
        assert_eq!(path(&[Key("services"), Index(0)]), Some(3));
        assert_eq!(
            path(&[Key("services"), Index(0), Key("vips"), Index(1)]),
            Some(5)
        );
        assert_eq!(path(&[Key("services"), Index(1), Key("name")]), Some(7));
        // Absent fields point at the nearest ancestor that is there.
        assert_eq!(
            path(&[
                Key("services"),
                Index(1),
                Key("healthCheck"),
                Key("timeout")
            ]),
            Some(8)
        );
        assert_eq!(path(&[Key("services"), Index(5)]), Some(2));
        assert_eq!(path(&[Key("node")]), None);
    }

    #[test]
    fn locality_parses_and_displays_the_same_text() {
        for text in ["", "us-east1", "us-east1/us-east1-b", "r/z/s"] {
            let parsed: Locality = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!(
            locality("us-east1/us-east1-b"),
            Locality {
                region: "us-east1".into(),
                zone: "us-east1-b".into(),
                subzone: "".into(),
            }
        );
        let refused = |text: &str| text.parse::<Locality>().unwrap_err().to_string();
        assert_eq!(
            refused("a//b"),
            "locality \"a//b\" has an empty part (expected region, region/zone or \
             region/zone/subzone)"
        );
        assert!(refused("a/").contains("empty part"));
        assert!(refused("/a").contains("empty part"));
        assert_eq!(
            refused("a/b/c/d"),
            "locality \"a/b/c/d\" has more than 3 parts (expected region/zone/subzone)"
        );
        assert!(refused("us east").contains("whitespace"));
        assert_eq!(
            serde_json::to_string(&locality("r/z")).unwrap(),
            "\"r/z\"",
            "serializes as its text"
        );
    }

    #[test]
    fn locality_containment_matches_set_parts_only() {
        assert!(locality("us-east1").contains(&locality("us-east1/us-east1-b")));
        assert!(locality("us-east1/b").contains(&locality("us-east1/b/s")));
        assert!(!locality("us-east1/b").contains(&locality("us-east1/c")));
        assert!(!locality("us-east1/b").contains(&locality("us-east1")));
        assert!(!locality("us-east1").contains(&Locality::default()));
        assert!(Locality::default().contains(&locality("anywhere")));
    }
}
