//! `FailoverService` (`failover.detour.io/v1alpha1`): one hostname and port, served by
//! an ordered list of Kubernetes Services across clusters, with the failover policy that
//! chooses among their endpoints.
//!
//! The spec reads one-to-one with Service Mesh Hub's / Gloo Mesh's `FailoverService`
//! (`hostname`, `port {number, protocol}`, `backingServices[].kubeService {name,
//! namespace, clusterName}` where list order is failover order), with Istio's
//! `localityLbSetting` (`failover[] {from, to}`, `failoverPriority`) and
//! `outlierDetection` field names, the standalone file's `healthCheck`, and `takeOver`:
//! existing Services whose callers get the failover behaviour (SMH's `trafficShift`).
//! Where the standalone YAML file has the same field, its name, meaning and default are
//! the file's (README, "Configuration"); the file's `failoverOrder` is
//! `backingServices`' order here. Defaults are applied when the resource is mapped into the service
//! model, not by the schema, so what the apiserver stores is what the user wrote.
//!
//! Invariants:
//! - the CRD (`deploy/crds/failoverservice.yaml`) is generated from these types by
//!   [`crd_yaml`] (`cargo xtask crd`); a unit test fails when the file is stale;
//! - every rule the schema can state is in it as a CEL rule (`x-kubernetes-validations`),
//!   so the apiserver refuses a bad object at write time, and the unit tests run those
//!   same rules client-side (kube's `cel` feature). Rules that need other objects
//!   (does the Service exist, is the VIP taken) are the controller's, reported as
//!   conditions;
//! - anything the schema admits deserializes into these types: durations are checked
//!   against the subset of Go's syntax that [`kube::core::Duration`] reads, and free-form
//!   values (addresses) stay strings. One object that failed to deserialize would fail a
//!   whole watcher list and stall every other FailoverService;
//! - unknown fields are not refused here (the apiserver prunes them, and an older agent
//!   must still read objects written for a newer schema);
//! - every string has a `maxLength` and every list a `maxItems`, so the apiserver's CEL
//!   cost estimate stays within its budget;
//! - status is written only by the leader-elected controller, with server-side apply:
//!   `conditions` is a list-map keyed by `type`, `endpoints` one keyed by `cluster` and
//!   `tier`, so one field manager can own each entry.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::{Duration, Message, Rule};
use kube::{CustomResource, CustomResourceExt as _, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::outlier::EjectionSettings;

/// The API group of detour's custom resources.
pub const GROUP: &str = "failover.detour.io";

/// Condition types of `FailoverService.status.conditions`, as in the Gateway API.
pub mod condition {
    /// The spec is valid and detour will act on it.
    pub const ACCEPTED: &str = "Accepted";
    /// Every backing Service and taken-over Service exists in its cluster.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// The VIP is allocated and the endpoints are published for the agents.
    pub const PROGRAMMED: &str = "Programmed";
}

/// Most backing services a FailoverService lists (failover tiers beyond a handful are
/// not a design anyone runs; the bound keeps CEL's cost estimate small).
pub const MAX_BACKING_SERVICES: usize = 16;

/// One hostname and port served by an ordered list of Services, across clusters.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats `type_ = \"string\"`; they are different columns"
)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "failover.detour.io",
    version = "v1alpha1",
    kind = "FailoverService",
    namespaced,
    shortname = "fos",
    doc = "A hostname and port served by an ordered list of Services across clusters, with detour's failover policy.",
    category = "detour",
    status = "FailoverServiceStatus",
    derive = "PartialEq",
    printcolumn(name = "Hostname", type_ = "string", json_path = ".spec.hostname"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.port.number"),
    printcolumn(name = "VIP", type_ = "string", json_path = ".status.virtualIP"),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_integer_formats)]
pub struct FailoverServiceSpec {
    /// The name callers use, e.g. `reviews-failover.default.global`. Cluster DNS resolves
    /// it to the virtual IP once the CoreDNS snippet from `detour dns coredns` is applied.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(format!(
        "size(self) <= 253 && self.matches('{DNS_SUBDOMAIN}')"
    ))
    .message("must be a lowercase DNS name (RFC 1123), like reviews-failover.default.global"))]
    pub hostname: String,

    /// More names callers use (Istio's ServiceEntry `hosts`, e.g. `mydb.com`):
    /// `detour dns coredns` makes each resolve to the virtual IP, as `hostname` does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 253)))]
    #[x_kube(
        validation = Rule::new(format!("self.all(h, h.matches('{DNS_SUBDOMAIN}'))"))
            .message("hosts must be lowercase DNS names (RFC 1123), like mydb.com; no wildcards"),
        validation = Rule::new("self.all(a, self.exists_one(b, b == a))")
            .message("each host may be listed only once")
    )]
    pub hosts: Vec<String>,

    /// The port callers connect to on the virtual IP.
    pub port: ServicePort,

    /// The Services that serve the hostname, in failover order: the first is preferred,
    /// the next takes over when it has no usable endpoint (as in Gloo Mesh).
    #[schemars(length(max = MAX_BACKING_SERVICES))]
    #[x_kube(
        validation = Rule::new("size(self) >= 1")
            .message("at least one backing service is required, in failover order"),
        validation = Rule::new("self.all(a, self.exists_one(b, b == a))")
            .message("each backing service may be listed only once")
    )]
    pub backing_services: Vec<BackingService>,

    // This and the next two are boxed: usually absent, they were 392 of a spec's 496
    // bytes, held by every agent for every FailoverService. The schema is the same.
    /// Locality-aware failover among the endpoints (Istio's `localityLbSetting`, plus
    /// detour's `spill` and `overprovisioningFactor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb_setting: Option<Box<LocalityLbSetting>>,

    /// Passive health: what the kernel sees of real connections (Istio's names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<Box<OutlierDetection>>,

    /// Active health checks of every endpoint. Default: a TCP check every second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Box<HealthCheck>>,

    /// Destroy open connections to a backend that is ejected, failing or removed.
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminate_connections: Option<bool>,

    /// The virtual IP to serve. Default: the ClusterIP of a selectorless Service the
    /// controller creates for this FailoverService.
    #[serde(default, rename = "virtualIP", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new(
        "isIP(self) && (ip(self).isGlobalUnicast() || ip(self).isLoopback())"
    )
    .message("must be an IPv4 or IPv6 unicast address, like 10.96.0.42"))]
    pub virtual_ip: Option<String>,

    /// Existing Services whose callers get this failover: connections to their
    /// ClusterIP(s) on the listed ports are sent to this FailoverService's backends.
    /// Their other ports are untouched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.service == a.service))")
        .message("each Service may be taken over only once"))]
    pub take_over: Vec<TakeOver>,

    /// Originate TLS to the endpoints (DestinationRule's `trafficPolicy.tls`): callers
    /// speak plain bytes to the virtual IP, and the agent's originator connects to the
    /// backends with TLS. A proxy hop, only for this FailoverService.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Box<ClientTls>>,
}

/// DestinationRule's `ClientTLSSettings`, the part detour does.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    /// `SIMPLE`: verify the server's certificate, present none; `DISABLE`: no TLS.
    pub mode: TlsMode,
    /// The server name sent and checked. Default: the endpoint's DNS name, else its
    /// address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(format!("self.matches('{DNS_SUBDOMAIN}')"))
        .message("must be a lowercase DNS name (RFC 1123)"))]
    pub sni: Option<String>,
    /// A PEM file of the certificate authorities, as the agent's container sees it (an
    /// absolute path: mount it from a ConfigMap or Secret). Default: the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')")
        .message("must be an absolute path, as the agent's container sees the file"))]
    pub ca_certificates: Option<String>,
}

/// The TLS modes detour implements.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Disable,
    Simple,
}

/// The port of the failover hostname.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ServicePort {
    /// The port number callers connect to.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535")
        .message("must be a port number in 1..=65535"))]
    pub number: u16,
    /// What the port carries, as in Service Mesh Hub. detour rewrites connects and
    /// treats every protocol alike. Default tcp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// The protocol a port carries, spelled as in Service Mesh Hub's `FailoverService`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Tls,
    Http,
    Https,
    Http2,
    Grpc,
}

/// One backing service: a Kubernetes Service in one of the clusters, or an endpoint
/// outside Kubernetes (a wrapper, as in Gloo Mesh).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.kubeService) != has(self.external)")
    .message("a backing service is exactly one of kubeService and external"))]
pub struct BackingService {
    /// A Kubernetes Service in one of the clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_service: Option<KubeServiceRef>,
    /// An endpoint outside Kubernetes, by address or DNS name (Istio's ServiceEntry
    /// endpoint with `resolution: DNS`): every agent resolves the name itself and
    /// serves each address it resolves to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalEndpoint>,
}

/// An endpoint outside Kubernetes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ExternalEndpoint {
    /// An IP address, or a DNS name resolved at its records' TTL (e.g.
    /// `dynamodb.us-east-1.amazonaws.com`).
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(format!(
        "isIP(self) || self.matches('{DNS_SUBDOMAIN}')"
    ))
    .message("must be an IP address or a lowercase DNS name (RFC 1123)"))]
    pub address: String,
    /// The port it serves. Default: the FailoverService's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535")
        .message("must be a port number in 1..=65535"))]
    pub port: Option<u16>,
    /// Its locality (`region[/zone[/subzone]]`), for the locality tiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = locality_rule())]
    pub locality: Option<String>,
}

/// A Service in a cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubeServiceRef {
    /// The Service's name.
    #[schemars(length(max = 63))]
    #[x_kube(validation = dns_label_rule(DNS_1035_LABEL, "a Service name (RFC 1035 label)"))]
    pub name: String,
    /// The Service's namespace.
    #[schemars(length(max = 63))]
    #[x_kube(validation = dns_label_rule(DNS_1123_LABEL, "a namespace (RFC 1123 label)"))]
    pub namespace: String,
    /// The cluster the Service is in: the key of its kubeconfig in a detour remote-cluster
    /// Secret. Default: the cluster this FailoverService is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    #[x_kube(validation = dns_label_rule(
        DNS_1123_LABEL,
        "a cluster name (RFC 1123 label, as it labels mirrored EndpointSlices)"
    ))]
    pub cluster_name: Option<String>,
}

/// A Service in this FailoverService's cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    /// The Service's name.
    #[schemars(length(max = 63))]
    #[x_kube(validation = dns_label_rule(DNS_1035_LABEL, "a Service name (RFC 1035 label)"))]
    pub name: String,
    /// The Service's namespace.
    #[schemars(length(max = 63))]
    #[x_kube(validation = dns_label_rule(DNS_1123_LABEL, "a namespace (RFC 1123 label)"))]
    pub namespace: String,
}

/// An existing Service whose callers are taken over (SMH's `trafficShift`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TakeOver {
    /// The Service whose ClusterIP(s) detour rewrites.
    pub service: ServiceRef,
    /// Its ports to take over; connections to its other ports are left alone.
    #[schemars(length(max = 16))]
    #[x_kube(
        validation = Rule::new("size(self) >= 1").message("name at least one port to take over"),
        validation = Rule::new("self.all(p, p >= 1 && p <= 65535)")
            .message("ports must be in 1..=65535"),
        validation = Rule::new("self.all(a, self.exists_one(b, b == a))")
            .message("each port may be listed only once")
    )]
    pub ports: Vec<u16>,
}

/// Istio's `localityLbSetting`, plus detour's `spill` and `overprovisioningFactor`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.overprovisioningFactor) || !has(self.spill) || self.spill == 'gradual'"
)
.message("overprovisioningFactor only applies to spill: gradual, but spill is strict: remove one of them")
.field_path(".overprovisioningFactor"))]
pub struct LocalityLbSetting {
    /// Where to go when the node's region has no usable endpoint (Istio).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub failover: Vec<FailoverRule>,
    /// Endpoint labels, most important first: endpoints that match the node on more of
    /// them are preferred (Istio's `failoverPriority`; `label` or `label=value`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(max = 317)))]
    #[x_kube(
        validation = Rule::new("self.all(l, size(l) >= 1)").message("labels must not be empty"),
        validation = Rule::new("self.all(a, self.exists_one(b, b == a))")
            .message("each label may be listed only once")
    )]
    pub failover_priority: Vec<String>,
    /// How traffic leaves a tier that is losing endpoints. Default gradual. (The CRD
    /// shows [`Spill`]'s own description here: schemars prefers it.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill: Option<Spill>,
    /// Envoy's overprovisioning factor in percent, with `spill: gradual`: a tier keeps
    /// `min(100%, factor × usable share)` of the traffic. Default 140.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 100")
        .message("overprovisioningFactor is in percent and at least 100 (140 means 1.4)"))]
    pub overprovisioning_factor: Option<u32>,
}

/// Istio's failover rule: from a region to another.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.from != self.to").message("from and to must differ"))]
pub struct FailoverRule {
    /// The node's locality this rule applies to (`region[/zone[/subzone]]`).
    #[schemars(length(max = 253))]
    #[x_kube(validation = locality_rule())]
    pub from: String,
    /// Where its traffic goes when its own locality has nothing usable.
    #[schemars(length(max = 253))]
    #[x_kube(validation = locality_rule())]
    pub to: String,
}

/// How traffic leaves a locality tier that is losing endpoints. Default gradual.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Spill {
    /// A tier keeps all traffic while it has any usable endpoint.
    Strict,
    /// A tier keeps a share of traffic in proportion to its usable endpoints (Envoy).
    Gradual,
}

/// Istio's `outlierDetection`, plus detour's `handshakeTimeout`. detour sees failed
/// connects, not responses, so the three consecutive-error fields mean the same thing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(
        "[has(self.consecutiveErrors), has(self.consecutive5xxErrors), \
         has(self.consecutiveLocalOriginFailures)].filter(x, x).size() <= 1"
    )
    .message("give at most one of consecutiveErrors, consecutive5xxErrors and consecutiveLocalOriginFailures: at L4 they all count failed connects"),
    validation = base_within_max_rule()
)]
pub struct OutlierDetection {
    /// Failed connects in a row that eject a backend. Default 5; 0 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_errors: Option<u32>,
    /// Istio's name for the same count.
    #[serde(
        default,
        rename = "consecutive5xxErrors",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx_errors: Option<u32>,
    /// Istio's name for the same count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failures: Option<u32>,
    /// An ejection multiplier step decays per interval. Default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_rule("0s", false, MAX_POLICY_DURATION))]
    pub interval: Option<Duration>,
    /// The first ejection; each next one is base × n. Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_rule("0s", false, MAX_POLICY_DURATION))]
    pub base_ejection_time: Option<Duration>,
    /// The longest ejection. Default 300s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_rule("0s", false, MAX_POLICY_DURATION))]
    pub max_ejection_time: Option<Duration>,
    /// The largest share of a locality tier ejected at once, in percent. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = percent_rule())]
    pub max_ejection_percent: Option<u32>,
    /// A locality tier with a smaller share of usable backends sends to all of them,
    /// while the tiers together are short (Envoy's panic threshold, per priority), in
    /// percent. Default 0 (off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = percent_rule())]
    pub min_health_percent: Option<u32>,
    /// detour: how long the first SYN of a rewritten connect may go unanswered before it
    /// counts as failed. 10ms..=10s; default 100ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_rule("10ms", true, "10s"))]
    pub handshake_timeout: Option<Duration>,
}

/// Active health checks, as in the standalone file: at most one of `tcp` (the default),
/// `http`, `grpc` or `disabled: true`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(
        "[has(self.tcp), has(self.http), has(self.grpc), \
         has(self.disabled) && self.disabled].filter(x, x).size() <= 1"
    )
    .message("give at most one of tcp, http, grpc and disabled: true"),
    validation = Rule::new(
        "!has(self.timeout) || \
         duration(self.timeout) <= duration(has(self.interval) ? self.interval : '1s')"
    )
    .message("timeout must not be longer than the interval (default 1s)")
    .field_path(".timeout")
)]
pub struct HealthCheck {
    /// Time between checks, plus up to 10% jitter. At least 10ms; default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_rule("10ms", true, MAX_POLICY_DURATION))]
    pub interval: Option<Duration>,
    /// How long one check may take; at most the interval. Default 500ms, or the
    /// interval when that is shorter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_rule("0s", false, MAX_POLICY_DURATION))]
    pub timeout: Option<Duration>,
    /// Passing checks in a row that make an unhealthy endpoint healthy. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("must be at least 1"))]
    pub healthy_threshold: Option<u32>,
    /// Failing checks in a row that make an endpoint unhealthy. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("must be at least 1"))]
    pub unhealthy_threshold: Option<u32>,
    /// The handshake completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheck>,
    /// GET a path; the status must be in one of the ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
    /// grpc.health.v1 Check must say SERVING (h2c).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcHealthCheck>,
    /// No active checks for this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

/// `tcp: {}`: no settings yet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct TcpHealthCheck {}

/// An HTTP/1.1 GET.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpHealthCheck {
    /// The request path. Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self.matches('^/[!-~]*$')")
        .message("must start with / and hold no spaces"))]
    pub path: Option<String>,
    /// The Host header. Default: the hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("size(self) >= 1").message("must not be empty"))]
    pub host: Option<String>,
    /// Statuses that pass, as `[start, end)` ranges (Envoy). Default `[200, 201)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub expected_statuses: Option<Vec<StatusRange>>,
}

/// Envoy's `{start, end}` with `end` exclusive.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.start >= 100 && self.start < self.end && self.end <= 600")
    .message("a status range [start, end) must be non-empty and within 100..=599 (end is exclusive, as in Envoy)"))]
pub struct StatusRange {
    pub start: u16,
    pub end: u16,
}

/// A grpc.health.v1 check.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcHealthCheck {
    /// The service to ask about. Default "" (the whole server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub service_name: Option<String>,
    /// The :authority. Default: the hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("size(self) >= 1").message("must not be empty"))]
    pub authority: Option<String>,
}

/// What the controller observed. Written only by the leader-elected controller, with
/// server-side apply and only when it changes; agents never write it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_integer_formats)]
pub struct FailoverServiceStatus {
    /// `Accepted`, `ResolvedRefs` and `Programmed` (see [`condition`]), each with the
    /// generation it describes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The virtual IP the agents serve for the hostname.
    #[serde(default, rename = "virtualIP", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 45))]
    pub virtual_ip: Option<String>,
    /// Endpoint counts per cluster and failover tier, as discovered (not as each node
    /// sees their health: that is in the agents' metrics and CLI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["cluster".into(), "tier".into()]))]
    pub endpoints: Vec<TierEndpoints>,
}

/// The endpoints of one backing service, as discovered.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TierEndpoints {
    /// The cluster the endpoints are in.
    #[schemars(length(max = 63))]
    pub cluster: String,
    /// The backing service's position in `spec.backingServices`: 0 is preferred.
    pub tier: u32,
    /// The backing Service.
    pub service: ServiceRef,
    /// Ready endpoints.
    pub ready: u32,
    /// Serving but terminating endpoints, used only when nothing else is left.
    pub serving_terminating: u32,
}

/// Why the CRD could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("writing the FailoverService CRD as YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
}

/// The first lines of `deploy/crds/failoverservice.yaml`.
const CRD_HEADER: &str = "\
# Generated by `cargo xtask crd` from agent/src/sources/kubernetes/failover_service.rs.
# Do not edit: change the types and run `cargo xtask crd` again.
";

/// The FailoverService CRD as YAML, exactly as `deploy/crds/failoverservice.yaml` holds
/// it.
pub fn crd_yaml() -> Result<String, CrdError> {
    let body = serde_saphyr::to_string(&FailoverService::crd())?;
    Ok(format!("{CRD_HEADER}---\n{body}"))
}

// ---------------------------------------------------------------------------------
// Rules shared by several fields. Regular expressions are RE2 (the apiserver's) and
// also valid for the `regex` crate kube-cel uses; `[.]` avoids escaping a dot twice.

/// RFC 1123 subdomain: lowercase labels joined by dots.
const DNS_SUBDOMAIN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// RFC 1123 label: namespaces, cluster names.
const DNS_1123_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// RFC 1035 label: Service names (they must start with a letter).
const DNS_1035_LABEL: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";
/// Go durations as `kube::core::Duration` reads them: `10s`, `1.5s`, `2m30s`, `500ms`.
/// Go also takes `µs` and a sign; neither is admitted, so no admitted value fails to
/// deserialize.
const GO_DURATION: &str = "^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$";
/// `crate::outlier::MAX_POLICY_DURATION` (365 days) in Go's syntax.
const MAX_POLICY_DURATION: &str = "8760h";

fn dns_label_rule(pattern: &str, what: &str) -> Rule {
    Rule::new(format!("size(self) <= 63 && self.matches('{pattern}')")).message(Message::Message(
        format!("must be {what}: lowercase letters, digits and '-', at most 63"),
    ))
}

fn locality_rule() -> Rule {
    Rule::new("self.matches('^[^/]+(/[^/]+){0,2}$')")
        .message("must be a locality: region, region/zone or region/zone/subzone")
}

fn percent_rule() -> Rule {
    Rule::new("self <= 100").message("must be a percentage in 0..=100")
}

/// A duration in Go's syntax above `min` (or at least it, when `inclusive`) and at most
/// `max`. `&&` stops at the pattern, so a malformed value gets this message and not an
/// evaluation error.
fn duration_rule(min: &str, inclusive: bool, max: &str) -> Rule {
    let (op, bound) = if inclusive {
        (">=", "at least")
    } else {
        (">", "greater than")
    };
    Rule::new(format!(
        "self.matches('{GO_DURATION}') && duration(self) {op} duration('{min}') \
         && duration(self) <= duration('{max}')"
    ))
    .message(Message::Message(format!(
        "must be a duration like 10s, 500ms or 2m, {bound} {min} and at most {max}"
    )))
}

/// `baseEjectionTime <= maxEjectionTime`, each at its default when not given (the
/// outlier module's defaults, so the rule and the agent agree).
fn base_within_max_rule() -> Rule {
    let defaults = EjectionSettings::default();
    let base = go_duration(defaults.base_ejection_time);
    let max = go_duration(defaults.max_ejection_time);
    Rule::new(format!(
        "duration(has(self.baseEjectionTime) ? self.baseEjectionTime : '{base}') <= \
         duration(has(self.maxEjectionTime) ? self.maxEjectionTime : '{max}')"
    ))
    .message(Message::Message(format!(
        "baseEjectionTime (default {}) must not be longer than maxEjectionTime (default {})",
        humantime::format_duration(defaults.base_ejection_time),
        humantime::format_duration(defaults.max_ejection_time)
    )))
    .field_path(".maxEjectionTime")
}

/// schemars names Rust's unsigned types (`uint16`, `uint32`), formats the apiserver does
/// not know and warns about on every apply of the CRD; the signed format wide enough for
/// each says the same to it (the bounds are in `minimum`/`maximum` and the CEL rules).
fn kubernetes_integer_formats(schema: &mut schemars::Schema) {
    schemars::transform::transform_subschemas(&mut kubernetes_integer_formats, schema);
    if let Some(format) = schema.get_mut("format") {
        match format.as_str() {
            Some("uint8" | "uint16") => *format = "int32".into(),
            Some("uint32") => *format = "int64".into(),
            _ => {}
        }
    }
}

/// `d` in Go's syntax, in whole seconds where it is whole seconds.
fn go_duration(d: std::time::Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::cel::{ValidationErrors, Validator};
    use serde_json::{json, Value};

    /// The first seed's FailoverService, adapted: `meshes` is Service Mesh Hub's (detour
    /// has none), the outlier settings of its `mgmt-reviews-outlier` TrafficPolicy move
    /// into the resource, and its `reviews-shift-failover` trafficShift becomes
    /// `takeOver`.
    const SEED: &str = r#"
apiVersion: failover.detour.io/v1alpha1
kind: FailoverService
metadata:
  name: reviews-failover
  namespace: service-mesh-hub
spec:
  hostname: reviews-failover.default.global
  port:
    number: 9080
    protocol: http
  backingServices:
  - kubeService:
      name: reviews
      namespace: default
      clusterName: kind2
  - kubeService:
      name: reviews
      namespace: default
      clusterName: kind3
  outlierDetection:
    consecutiveErrors: 1
    interval: 10s
    baseEjectionTime: 2m
  takeOver:
  - service:
      name: reviews
      namespace: default
    ports: [9080]
"#;

    /// Every field set, to valid values.
    const FULL: &str = r#"
apiVersion: failover.detour.io/v1alpha1
kind: FailoverService
metadata:
  name: mydb
  namespace: default
spec:
  hostname: mydb.com
  port: {number: 5432, protocol: tcp}
  backingServices:
  - kubeService: {name: mydb, namespace: db, clusterName: us-east}
  - kubeService: {name: mydb, namespace: db}
  localityLbSetting:
    failover:
    - {from: us-east1, to: us-west}
    failoverPriority: [topology.kubernetes.io/region, "topology.istio.io/network=net1"]
    spill: gradual
    overprovisioningFactor: 140
  outlierDetection:
    consecutive5xxErrors: 3
    interval: 1m30s
    baseEjectionTime: 1.5s
    maxEjectionTime: 5m
    maxEjectionPercent: 100
    minHealthPercent: 0
    handshakeTimeout: 100ms
  healthCheck:
    interval: 2s
    timeout: 2s
    healthyThreshold: 1
    unhealthyThreshold: 2
    http:
      path: /healthz
      host: mydb.com
      expectedStatuses: [{start: 200, end: 300}, {start: 404, end: 405}]
  terminateConnections: false
  virtualIP: fd00::42
  takeOver:
  - service: {name: mydb, namespace: db}
    ports: [5432, 5433]
  - service: {name: mydb-ro, namespace: db}
    ports: [5432]
"#;

    fn yaml(text: &str) -> Value {
        serde_saphyr::from_str(text).expect("test YAML parses")
    }

    /// The CRD's schema, as the apiserver gets it.
    fn schema() -> Value {
        let crd = FailoverService::crd();
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("the derived CRD has an openAPIV3Schema");
        serde_json::to_value(schema).expect("the schema serializes")
    }

    /// Runs the CRD's CEL rules on `object` as the apiserver would on a create.
    fn cel(object: &Value) -> Result<(), ValidationErrors> {
        Validator::new().validate(&schema(), object, None)
    }

    /// `object` with the value at `pointer` (`/spec/port/number`) replaced, or removed
    /// when `value` is null (a list item is only replaced); missing parents are
    /// created.
    fn with(object: &Value, pointer: &str, value: Value) -> Value {
        let mut object = object.clone();
        let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
        let mut node = &mut object;
        for part in parent.split('/').skip(1) {
            node = match node {
                Value::Array(items) => &mut items[part.parse::<usize>().expect("an index")],
                Value::Object(map) => map.entry(part).or_insert_with(|| json!({})),
                other => panic!("{pointer}: cannot descend into {other}"),
            };
        }
        if let Value::Array(items) = node {
            items[key.parse::<usize>().expect("an index")] = value;
            return object;
        }
        let map = node.as_object_mut().expect("the parent is a mapping");
        if value.is_null() {
            map.remove(key);
        } else {
            map.insert(key.to_owned(), value);
        }
        object
    }

    #[test]
    fn deploy_holds_the_crd_these_types_generate() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/crds/failoverservice.yaml"
        );
        let generated = crd_yaml().expect("the CRD renders");
        let on_disk = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}; run `cargo xtask crd` to write it"));
        assert!(
            on_disk == generated,
            "{path} is stale: the FailoverService types changed. Run `cargo xtask crd` and \
             commit the result."
        );
        // The file is what `kubectl apply` reads: it must be the same CRD again.
        let parsed: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_saphyr::from_str(&on_disk).expect("the CRD file parses");
        assert_eq!(parsed, FailoverService::crd());
    }

    #[test]
    fn crd_names_scope_status_and_list_maps() {
        let crd = FailoverService::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("failoverservices.failover.detour.io")
        );
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "FailoverService");
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&["fos".to_owned()][..])
        );
        let version = &crd.spec.versions[0];
        assert_eq!(
            (version.name.as_str(), version.served, version.storage),
            ("v1alpha1", true, true)
        );
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "status is a subresource, so the controller's writes never touch the spec"
        );
        let status = &schema()["properties"]["status"]["properties"];
        assert_eq!(status["conditions"]["x-kubernetes-list-type"], "map");
        assert_eq!(
            status["conditions"]["x-kubernetes-list-map-keys"],
            json!(["type"])
        );
        assert_eq!(status["endpoints"]["x-kubernetes-list-type"], "map");
        assert_eq!(
            status["endpoints"]["x-kubernetes-list-map-keys"],
            json!(["cluster", "tier"])
        );
        // List-map keys must be required, or server-side apply refuses the entries.
        assert_eq!(
            status["endpoints"]["items"]["required"],
            json!(["cluster", "ready", "service", "servingTerminating", "tier"])
        );
    }

    /// The apiserver refuses a CRD whose CEL rules it estimates too costly, and it
    /// estimates from `maxLength` and `maxItems`: without them a string or list counts
    /// as big as a whole request.
    #[test]
    fn every_string_and_list_is_bounded() {
        fn walk(schema: &Value, path: &str, unbounded: &mut Vec<String>) {
            let bounded = match schema["type"].as_str() {
                Some("string")
                    if schema.get("enum").is_none() && schema.get("format").is_none() =>
                {
                    schema.get("maxLength").is_some()
                }
                Some("array") => schema.get("maxItems").is_some(),
                _ => true,
            };
            if !bounded {
                unbounded.push(path.to_owned());
            }
            if let Some(properties) = schema["properties"].as_object() {
                for (name, property) in properties {
                    // k8s-openapi's Condition: no CEL rule reaches it.
                    if path == ".status" && name == "conditions" {
                        continue;
                    }
                    walk(property, &format!("{path}.{name}"), unbounded);
                }
            }
            if let Some(items) = schema.get("items") {
                walk(items, &format!("{path}[]"), unbounded);
            }
        }
        let schema = schema();
        let mut unbounded = Vec::new();
        for root in ["spec", "status"] {
            walk(
                &schema["properties"][root],
                &format!(".{root}"),
                &mut unbounded,
            );
        }
        assert!(
            unbounded.is_empty(),
            "no maxLength or maxItems: {unbounded:?}"
        );
        // And the walk does look: the spec has strings and lists.
        assert_eq!(
            schema["properties"]["spec"]["properties"]["hostname"]["maxLength"],
            253
        );
    }

    #[test]
    fn the_seed_parses_into_the_type_and_passes_its_rules() {
        let fos: FailoverService = serde_saphyr::from_str(SEED).expect("the seed parses");
        assert_eq!(fos.metadata.name.as_deref(), Some("reviews-failover"));
        assert_eq!(fos.metadata.namespace.as_deref(), Some("service-mesh-hub"));
        let spec = &fos.spec;
        assert_eq!(spec.hostname, "reviews-failover.default.global");
        assert_eq!(
            spec.port,
            ServicePort {
                number: 9080,
                protocol: Some(Protocol::Http)
            }
        );
        // Order is failover order: kind2 first, then kind3.
        let clusters: Vec<_> = spec
            .backing_services
            .iter()
            .map(|b| {
                let s = b.kube_service.as_ref().expect("a kubeService");
                (
                    s.name.as_str(),
                    s.namespace.as_str(),
                    s.cluster_name.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            clusters,
            [
                ("reviews", "default", Some("kind2")),
                ("reviews", "default", Some("kind3"))
            ]
        );
        let outlier = spec.outlier_detection.as_ref().expect("outlierDetection");
        assert_eq!(outlier.consecutive_errors, Some(1));
        assert_eq!(
            outlier.interval.map(std::time::Duration::from),
            Some(std::time::Duration::from_secs(10))
        );
        assert_eq!(
            outlier.base_ejection_time.map(std::time::Duration::from),
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(
            spec.take_over,
            [TakeOver {
                service: ServiceRef {
                    name: "reviews".into(),
                    namespace: "default".into()
                },
                ports: vec![9080],
            }]
        );
        assert_eq!(spec.health_check, None);
        assert_eq!(fos.status, None);

        kube::core::cel::validate_cel(&fos).expect("the seed passes the CRD's rules");
        // What the type writes back reads the same.
        let again: FailoverService =
            serde_json::from_value(serde_json::to_value(&fos).unwrap()).unwrap();
        assert_eq!(again, fos);
    }

    #[test]
    fn every_field_set_parses_and_passes() {
        let fos: FailoverService = serde_saphyr::from_str(FULL).expect("FULL parses");
        kube::core::cel::validate_cel(&fos).expect("FULL passes the CRD's rules");
        let locality = fos.spec.locality_lb_setting.as_ref().unwrap();
        assert_eq!(locality.spill, Some(Spill::Gradual));
        assert_eq!(locality.failover[0].to, "us-west");
        let check = fos.spec.health_check.as_ref().unwrap();
        let http = check.http.as_ref().unwrap();
        assert_eq!(
            http.expected_statuses.as_deref(),
            Some(
                &[
                    StatusRange {
                        start: 200,
                        end: 300
                    },
                    StatusRange {
                        start: 404,
                        end: 405
                    }
                ][..]
            )
        );
        assert_eq!(fos.spec.virtual_ip.as_deref(), Some("fd00::42"));
        assert_eq!(fos.spec.terminate_connections, Some(false));
        // Absent clusterName means this cluster.
        assert_eq!(
            fos.spec.backing_services[1]
                .kube_service
                .as_ref()
                .map(|s| s.cluster_name.clone()),
            Some(None)
        );
    }

    #[test]
    fn valid_variants_pass() {
        let full = yaml(FULL);
        let cases = [
            ("/spec/virtualIP", json!("10.96.0.42")),
            ("/spec/virtualIP", json!("127.200.0.1")),
            ("/spec/port/number", json!(1)),
            ("/spec/port/number", json!(65535)),
            ("/spec/hostname", json!("a")),
            ("/spec/outlierDetection/interval", json!("2h45m10.5s")),
            ("/spec/outlierDetection/handshakeTimeout", json!("10ms")),
            ("/spec/outlierDetection/handshakeTimeout", json!("10s")),
            // Exactly the defaults' bound: base 30s (default) == max 30s.
            ("/spec/outlierDetection/baseEjectionTime", Value::Null),
            ("/spec/outlierDetection/maxEjectionTime", json!("30s")),
            // 0 turns consecutive-error ejection off.
            ("/spec/outlierDetection/consecutive5xxErrors", json!(0)),
            // With no kind at all, tcp is the default (as in the standalone file).
            ("/spec/healthCheck/http", Value::Null),
            ("/spec/healthCheck/disabled", json!(false)),
            ("/spec/localityLbSetting/overprovisioningFactor", json!(100)),
            (
                "/spec/localityLbSetting/failover/0/from",
                json!("us-east1/b/c"),
            ),
            ("/spec/takeOver/0/ports", json!([1, 65535])),
            ("/spec/hosts", json!(["mydb.com", "db.example.org"])),
            (
                "/spec/tls",
                json!({"mode": "SIMPLE", "sni": "db.example.org", "caCertificates": "/etc/detour/ca.pem"}),
            ),
            ("/spec/tls", json!({"mode": "DISABLE"})),
            (
                "/spec/backingServices/1",
                json!({"external": {"address": "dynamodb.us-west-1.amazonaws.com", "port": 443, "locality": "us-west"}}),
            ),
            (
                "/spec/backingServices/1",
                json!({"external": {"address": "fd00::7"}}),
            ),
        ];
        for (pointer, value) in cases {
            let object = with(&full, pointer, value.clone());
            if let Err(errors) = cel(&object) {
                panic!("{pointer} = {value}: refused: {errors:?}");
            }
        }
        // With spill omitted (gradual by default), a factor is fine.
        let object = with(&full, "/spec/localityLbSetting/spill", Value::Null);
        cel(&object).expect("a factor without spill");
        let no_http = with(&full, "/spec/healthCheck/http", Value::Null);
        let object = with(
            &no_http,
            "/spec/healthCheck/grpc",
            json!({"serviceName": "r.v1"}),
        );
        cel(&object).expect("a grpc check");
        let object = with(&no_http, "/spec/healthCheck/disabled", json!(true));
        cel(&object).expect("checks disabled");
    }

    /// Each case: where, the bad value, where the error points and what it says.
    #[test]
    fn invalid_objects_are_refused_with_the_rule_that_failed() {
        let full = yaml(FULL);
        let two_kinds = with(&full, "/spec/healthCheck/tcp", json!({}));
        let cases: &[(&Value, &str, Value, &str, &str)] = &[
            (
                &full,
                "/spec/backingServices",
                json!([]),
                "spec.backingServices",
                "at least one backing service",
            ),
            (
                &full,
                "/spec/backingServices/1",
                json!({}),
                "spec.backingServices[1]",
                "exactly one of kubeService and external",
            ),
            (
                &full,
                "/spec/backingServices/1",
                json!({"external": {"address": "db.example.org"}, "kubeService": {"name": "a", "namespace": "b"}}),
                "spec.backingServices[1]",
                "exactly one of kubeService and external",
            ),
            (
                &full,
                "/spec/backingServices/1",
                json!({"external": {"address": "Not A Name"}}),
                "spec.backingServices[1].external.address",
                "IP address or a lowercase DNS name",
            ),
            (
                &full,
                "/spec/backingServices/1",
                json!({"external": {"address": "db.example.org", "port": 0}}),
                "spec.backingServices[1].external.port",
                "1..=65535",
            ),
            (
                &full,
                "/spec/hosts",
                json!(["*.mydb.com"]),
                "spec.hosts",
                "no wildcards",
            ),
            (
                &full,
                "/spec/hosts",
                json!(["mydb.com", "mydb.com"]),
                "spec.hosts",
                "listed only once",
            ),
            (
                &full,
                "/spec/tls",
                json!({"mode": "SIMPLE", "caCertificates": "ca.pem"}),
                "spec.tls.caCertificates",
                "absolute path",
            ),
            (
                &full,
                "/spec/tls",
                json!({"mode": "SIMPLE", "sni": "Bad Name"}),
                "spec.tls.sni",
                "lowercase DNS name",
            ),
            (
                &full,
                "/spec/backingServices/1/kubeService/clusterName",
                json!("us-east"),
                "spec.backingServices",
                "listed only once",
            ),
            (
                &full,
                "/spec/backingServices/0/kubeService/name",
                json!("1mydb"),
                "spec.backingServices[0].kubeService.name",
                "Service name",
            ),
            (
                &full,
                "/spec/backingServices/0/kubeService/namespace",
                json!("DB"),
                "spec.backingServices[0].kubeService.namespace",
                "namespace",
            ),
            (
                &full,
                "/spec/backingServices/0/kubeService/clusterName",
                json!("us_east"),
                "spec.backingServices[0].kubeService.clusterName",
                "cluster name",
            ),
            (
                &full,
                "/spec/hostname",
                json!("MyDB.com"),
                "spec.hostname",
                "lowercase DNS name",
            ),
            (
                &full,
                "/spec/hostname",
                json!("-mydb.com"),
                "spec.hostname",
                "lowercase DNS name",
            ),
            (
                &full,
                "/spec/hostname",
                json!("mydb..com"),
                "spec.hostname",
                "lowercase DNS name",
            ),
            (
                &full,
                "/spec/port/number",
                json!(0),
                "spec.port.number",
                "1..=65535",
            ),
            (
                &full,
                "/spec/port/number",
                json!(70000),
                "spec.port.number",
                "1..=65535",
            ),
            (
                &full,
                "/spec/virtualIP",
                json!("mydb.com"),
                "spec.virtualIP",
                "unicast address",
            ),
            (
                &full,
                "/spec/virtualIP",
                json!("0.0.0.0"),
                "spec.virtualIP",
                "unicast address",
            ),
            (
                &full,
                "/spec/virtualIP",
                json!("224.0.0.1"),
                "spec.virtualIP",
                "unicast address",
            ),
            (
                &full,
                "/spec/virtualIP",
                json!("ff02::1"),
                "spec.virtualIP",
                "unicast address",
            ),
            (
                &full,
                "/spec/localityLbSetting/failover/0/to",
                json!("us-east1"),
                "spec.localityLbSetting.failover[0]",
                "from and to must differ",
            ),
            (
                &full,
                "/spec/localityLbSetting/failover/0/to",
                json!("a/b/c/d"),
                "spec.localityLbSetting.failover[0].to",
                "locality",
            ),
            (
                &full,
                "/spec/localityLbSetting/failover/0/from",
                json!(""),
                "spec.localityLbSetting.failover[0].from",
                "locality",
            ),
            (
                &full,
                "/spec/localityLbSetting/failoverPriority",
                json!(["a", "a"]),
                "spec.localityLbSetting.failoverPriority",
                "only once",
            ),
            (
                &full,
                "/spec/localityLbSetting/failoverPriority",
                json!([""]),
                "spec.localityLbSetting.failoverPriority",
                "must not be empty",
            ),
            (
                &full,
                "/spec/localityLbSetting/spill",
                json!("strict"),
                "spec.localityLbSetting",
                "only applies to spill: gradual",
            ),
            (
                &full,
                "/spec/localityLbSetting/overprovisioningFactor",
                json!(99),
                "spec.localityLbSetting.overprovisioningFactor",
                "at least 100",
            ),
            (
                &full,
                "/spec/outlierDetection/consecutiveErrors",
                json!(1),
                "spec.outlierDetection",
                "at most one of consecutiveErrors",
            ),
            (
                &full,
                "/spec/outlierDetection/baseEjectionTime",
                json!("6m"),
                "spec.outlierDetection",
                "must not be longer than maxEjectionTime",
            ),
            // Only base given, past the default maximum (300s).
            (
                &with(&full, "/spec/outlierDetection/maxEjectionTime", Value::Null),
                "/spec/outlierDetection/baseEjectionTime",
                json!("301s"),
                "spec.outlierDetection",
                "must not be longer than maxEjectionTime",
            ),
            // Only max given, below the default base (30s).
            (
                &with(
                    &full,
                    "/spec/outlierDetection/baseEjectionTime",
                    Value::Null,
                ),
                "/spec/outlierDetection/maxEjectionTime",
                json!("29s"),
                "spec.outlierDetection",
                "must not be longer than maxEjectionTime",
            ),
            (
                &full,
                "/spec/outlierDetection/maxEjectionPercent",
                json!(101),
                "spec.outlierDetection.maxEjectionPercent",
                "0..=100",
            ),
            (
                &full,
                "/spec/outlierDetection/minHealthPercent",
                json!(150),
                "spec.outlierDetection.minHealthPercent",
                "0..=100",
            ),
            (
                &full,
                "/spec/outlierDetection/interval",
                json!("10"),
                "spec.outlierDetection.interval",
                "like 10s",
            ),
            (
                &full,
                "/spec/outlierDetection/interval",
                json!("0s"),
                "spec.outlierDetection.interval",
                "greater than 0s",
            ),
            (
                &full,
                "/spec/outlierDetection/interval",
                json!("-1s"),
                "spec.outlierDetection.interval",
                "like 10s",
            ),
            (
                &full,
                "/spec/outlierDetection/interval",
                json!("1d"),
                "spec.outlierDetection.interval",
                "like 10s",
            ),
            (
                &full,
                "/spec/outlierDetection/interval",
                json!("8761h"),
                "spec.outlierDetection.interval",
                "at most 8760h",
            ),
            (
                &full,
                "/spec/outlierDetection/handshakeTimeout",
                json!("5ms"),
                "spec.outlierDetection.handshakeTimeout",
                "at least 10ms",
            ),
            (
                &full,
                "/spec/outlierDetection/handshakeTimeout",
                json!("11s"),
                "spec.outlierDetection.handshakeTimeout",
                "at most 10s",
            ),
            (
                &two_kinds,
                "/spec/healthCheck/grpc",
                json!({}),
                "spec.healthCheck",
                "at most one of tcp, http, grpc",
            ),
            (
                &full,
                "/spec/healthCheck/tcp",
                json!({}),
                "spec.healthCheck",
                "at most one of tcp, http, grpc",
            ),
            (
                &full,
                "/spec/healthCheck/disabled",
                json!(true),
                "spec.healthCheck",
                "at most one of tcp, http, grpc",
            ),
            (
                &full,
                "/spec/healthCheck/timeout",
                json!("3s"),
                "spec.healthCheck",
                "timeout must not be longer than the interval",
            ),
            // Only timeout given, past the default interval (1s).
            (
                &with(&full, "/spec/healthCheck/interval", Value::Null),
                "/spec/healthCheck/timeout",
                json!("1500ms"),
                "spec.healthCheck",
                "timeout must not be longer than the interval",
            ),
            (
                &full,
                "/spec/healthCheck/interval",
                json!("5ms"),
                "spec.healthCheck.interval",
                "at least 10ms",
            ),
            (
                &full,
                "/spec/healthCheck/healthyThreshold",
                json!(0),
                "spec.healthCheck.healthyThreshold",
                "at least 1",
            ),
            (
                &full,
                "/spec/healthCheck/unhealthyThreshold",
                json!(0),
                "spec.healthCheck.unhealthyThreshold",
                "at least 1",
            ),
            (
                &full,
                "/spec/healthCheck/http/path",
                json!("healthz"),
                "spec.healthCheck.http.path",
                "must start with /",
            ),
            (
                &full,
                "/spec/healthCheck/http/path",
                json!("/health z"),
                "spec.healthCheck.http.path",
                "must start with /",
            ),
            (
                &full,
                "/spec/healthCheck/http/host",
                json!(""),
                "spec.healthCheck.http.host",
                "must not be empty",
            ),
            (
                &full,
                "/spec/healthCheck/http/expectedStatuses/1/end",
                json!(404),
                "spec.healthCheck.http.expectedStatuses[1]",
                "non-empty",
            ),
            (
                &full,
                "/spec/healthCheck/http/expectedStatuses/1/end",
                json!(601),
                "spec.healthCheck.http.expectedStatuses[1]",
                "within 100..=599",
            ),
            (
                &full,
                "/spec/healthCheck/http/expectedStatuses/0/start",
                json!(99),
                "spec.healthCheck.http.expectedStatuses[0]",
                "within 100..=599",
            ),
            (
                &full,
                "/spec/takeOver/0/ports",
                json!([]),
                "spec.takeOver[0].ports",
                "at least one port",
            ),
            (
                &full,
                "/spec/takeOver/0/ports",
                json!([0]),
                "spec.takeOver[0].ports",
                "1..=65535",
            ),
            (
                &full,
                "/spec/takeOver/0/ports",
                json!([80, 80]),
                "spec.takeOver[0].ports",
                "only once",
            ),
            (
                &full,
                "/spec/takeOver/1/service/name",
                json!("mydb"),
                "spec.takeOver",
                "taken over only once",
            ),
            (
                &full,
                "/spec/takeOver/0/service/name",
                json!("my.db"),
                "spec.takeOver[0].service.name",
                "Service name",
            ),
        ];
        for (base, pointer, value, path, message) in cases {
            let object = with(base, pointer, value.clone());
            let Err(errors) = cel(&object) else {
                panic!("{pointer} = {value}: accepted, expected {message:?} at {path}");
            };
            assert!(
                errors
                    .iter()
                    .any(|e| e.field_path.starts_with(path) && e.message.contains(message)),
                "{pointer} = {value}: expected {message:?} at {path}, got {errors:#?}"
            );
        }
    }
}
