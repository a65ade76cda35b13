//! What one remote Service's endpoints look like once mirrored into the local cluster:
//! the EndpointSlices `detour controller` writes, as `sources::kubernetes::labels`
//! documents them for the agents.
//!
//! Invariants:
//! - pure: the same Service, slices and node localities give the same slices, in the
//!   same order, with the same names (so a write happens only when something changed);
//! - endpoints keep their conditions (ready, serving, terminating), addresses and zone
//!   (the endpoint's own, else its node's); `nodeName`, `targetRef` and hints, which
//!   mean nothing in the local cluster, are dropped;
//! - slices are grouped by region (from the endpoint's node), address family and port
//!   mapping, at most [`MAX_ENDPOINTS`] endpoints each; an address that two remote slices
//!   both list (during a remote update) is mirrored once, preferring a ready copy;
//! - a port is named [`labels::port_name`]`(Service port)` and carries the endpoint's
//!   port (the target port), matched through the Service's port names as the
//!   EndpointSlice controller names them; a Service port no slice port matches is left
//!   out, and FQDN slices are not mirrored (agents dial addresses).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::names;
use crate::sources::kubernetes::labels;

/// Most endpoints in one slice (the EndpointSlice API's own limit).
pub const MAX_ENDPOINTS: usize = 1000;

/// One remote Service: the unit that is mirrored, once, however many FailoverServices
/// name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MirrorKey {
    /// The remote cluster (a key of a remote-cluster Secret).
    pub cluster: String,
    /// The Service's namespace there.
    pub namespace: String,
    /// The Service's name there.
    pub service: String,
}

impl MirrorKey {
    /// The key a mirrored slice's labels name, if they name one.
    #[must_use]
    pub fn of_mirror(slice: &EndpointSlice) -> Option<Self> {
        let labels = slice.metadata.labels.as_ref()?;
        Some(Self {
            cluster: labels.get(labels::CLUSTER)?.clone(),
            namespace: labels.get(labels::SERVICE_NAMESPACE)?.clone(),
            service: labels.get(labels::SERVICE_NAME)?.clone(),
        })
    }
}

impl std::fmt::Display for MirrorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.namespace, self.service)
    }
}

/// A node's (region, zone); empty strings where unknown.
pub type Locality = (String, String);

/// The mirrored slices of one remote Service, and its endpoint counts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mirror {
    /// The slices to write, sorted by name.
    pub slices: Vec<EndpointSlice>,
    /// Endpoints that are ready (an unset `ready` counts as ready, as the API says).
    pub ready: u32,
    /// Endpoints serving while terminating, and not ready.
    pub serving_terminating: u32,
}

/// The mirror of `key`'s Service in `mirror_namespace`: `service` is the remote Service
/// (`None` when it does not exist, which mirrors nothing), `slices` its EndpointSlices,
/// `node_locality` the (region, zone) of a remote node by name.
pub fn mirror<'a>(
    key: &MirrorKey,
    mirror_namespace: &str,
    service: Option<&Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node_locality: impl Fn(&str) -> Option<Locality>,
) -> Mirror {
    let Some(service_ports) = service
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.ports.as_ref())
    else {
        return Mirror::default();
    };
    let mut slices: Vec<&EndpointSlice> = slices.into_iter().collect();
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    // (region, address type, mirrored ports) → endpoints by their addresses.
    type Group = (String, String, Vec<(String, i32, String)>);
    let mut groups: BTreeMap<Group, BTreeMap<Vec<String>, Endpoint>> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let slice_ports = slice.ports.as_deref().unwrap_or_default();
        let mut ports: Vec<(String, i32, String)> = service_ports
            .iter()
            .filter_map(|sp| {
                let number = u16::try_from(sp.port).ok()?;
                let wanted = sp.name.as_deref().unwrap_or_default();
                let p = slice_ports
                    .iter()
                    .find(|p| p.name.as_deref().unwrap_or_default() == wanted)?;
                let protocol = p
                    .protocol
                    .clone()
                    .or_else(|| sp.protocol.clone())
                    .unwrap_or_else(|| "TCP".to_owned());
                Some((labels::port_name(number), p.port?, protocol))
            })
            .collect();
        if ports.is_empty() {
            continue;
        }
        ports.sort();
        for endpoint in slice.endpoints.as_deref().unwrap_or_default() {
            if endpoint.addresses.is_empty() {
                continue;
            }
            let (region, node_zone) = endpoint
                .node_name
                .as_deref()
                .and_then(&node_locality)
                .unwrap_or_default();
            let zone = endpoint
                .zone
                .clone()
                .filter(|z| !z.is_empty())
                .or_else(|| (!node_zone.is_empty()).then_some(node_zone));
            let mirrored = Endpoint {
                addresses: endpoint.addresses.clone(),
                conditions: Some(endpoint.conditions.clone().unwrap_or_default()),
                zone,
                ..Endpoint::default()
            };
            let group = groups
                .entry((region, slice.address_type.clone(), ports.clone()))
                .or_default();
            match group.get(&endpoint.addresses) {
                Some(existing) if is_ready(existing) => {}
                _ => {
                    group.insert(endpoint.addresses.clone(), mirrored);
                }
            }
        }
    }

    let mut per_region: BTreeMap<&str, usize> = BTreeMap::new();
    for (region, _, _) in groups.keys() {
        *per_region.entry(region).or_default() += 1;
    }
    let mut out = Mirror::default();
    for ((region, address_type, ports), endpoints) in &groups {
        let base = if region.is_empty() { "none" } else { region };
        let group_name = if per_region[region.as_str()] == 1 {
            base.to_owned()
        } else {
            format!(
                "{base}-{}",
                names::short_hash(&format!("{address_type}{ports:?}"))
            )
        };
        let endpoints: Vec<&Endpoint> = endpoints.values().collect();
        out.ready += count(&endpoints, is_ready);
        out.serving_terminating += count(&endpoints, is_serving_terminating);
        for (i, chunk) in endpoints.chunks(MAX_ENDPOINTS).enumerate() {
            let group = if i == 0 {
                group_name.clone()
            } else {
                format!("{group_name}-{i}")
            };
            out.slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(names::mirror_slice(
                        &key.cluster,
                        &key.namespace,
                        &key.service,
                        &group,
                    )),
                    namespace: Some(mirror_namespace.to_owned()),
                    labels: Some(mirror_labels(key, region)),
                    ..ObjectMeta::default()
                },
                address_type: address_type.clone(),
                endpoints: Some(chunk.iter().map(|e| (*e).clone()).collect()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, port, protocol)| EndpointPort {
                            name: Some(name.clone()),
                            port: Some(*port),
                            protocol: Some(protocol.clone()),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            });
        }
    }
    out.slices
        .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    out
}

/// The labels of a mirrored slice of `key` in `region` (none when unknown).
#[must_use]
pub fn mirror_labels(key: &MirrorKey, region: &str) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = [
        (labels::MANAGED_BY, labels::CONTROLLER),
        (labels::CLUSTER, key.cluster.as_str()),
        (labels::SERVICE_NAMESPACE, key.namespace.as_str()),
        (labels::SERVICE_NAME, key.service.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if !region.is_empty() {
        labels.insert(labels::REGION.to_owned(), region.to_owned());
    }
    labels
}

fn conditions(e: &Endpoint) -> EndpointConditions {
    e.conditions.clone().unwrap_or_default()
}

/// Ready as the API reads it: an unset `ready` means ready.
fn is_ready(e: &Endpoint) -> bool {
    conditions(e).ready != Some(false)
}

fn is_serving_terminating(e: &Endpoint) -> bool {
    let c = conditions(e);
    !is_ready(e) && c.serving == Some(true) && c.terminating == Some(true)
}

fn count(endpoints: &[&Endpoint], f: fn(&Endpoint) -> bool) -> u32 {
    u32::try_from(endpoints.iter().filter(|e| f(e)).count()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> MirrorKey {
        MirrorKey {
            cluster: "kind2".into(),
            namespace: "default".into(),
            service: "reviews".into(),
        }
    }

    fn service() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "reviews", "namespace": "default"},
            "spec": {"ports": [
                {"name": "http", "port": 9080, "targetPort": 8080, "protocol": "TCP"},
                {"name": "admin", "port": 9090, "targetPort": "admin"},
            ]},
        }))
        .unwrap()
    }

    fn slice(name: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "reviews"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "admin", "port": 7000, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn nodes(name: &str) -> Option<Locality> {
        match name {
            "n1" => Some(("us-east1".into(), "us-east1-b".into())),
            "n2" => Some(("us-west1".into(), "us-west1-a".into())),
            _ => None,
        }
    }

    #[test]
    fn endpoints_are_grouped_by_region_with_ports_renamed_and_node_details_dropped() {
        let s = slice(
            "reviews-abc",
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "nodeName": "n1",
                 "targetRef": {"kind": "Pod", "name": "p1"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true,
                 "terminating": true}, "nodeName": "n2", "zone": "own-zone"},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true}},
            ]),
        );
        let m = mirror(&key(), "detour-system", Some(&service()), [&s], nodes);
        assert_eq!((m.ready, m.serving_terminating), (2, 1));
        let names: Vec<_> = m
            .slices
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "detour-kind2-default-reviews-none",
                "detour-kind2-default-reviews-us-east1",
                "detour-kind2-default-reviews-us-west1",
            ]
        );
        let east = &m.slices[1];
        let labels = east.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[labels::REGION], "us-east1");
        assert_eq!(labels[labels::MANAGED_BY], labels::CONTROLLER);
        assert_eq!(labels[labels::CLUSTER], "kind2");
        assert!(!labels.contains_key(labels::KUBE_SERVICE_NAME));
        assert_eq!(east.metadata.namespace.as_deref(), Some("detour-system"));
        let ep = &east.endpoints.as_ref().unwrap()[0];
        assert_eq!(ep.zone.as_deref(), Some("us-east1-b"));
        assert!(ep.node_name.is_none() && ep.target_ref.is_none());
        let ports: Vec<_> = east
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.port.unwrap()))
            .collect();
        assert_eq!(
            ports,
            [("port-9080".into(), 8080), ("port-9090".into(), 7000)]
        );
        // The endpoint's own zone wins over its node's.
        let west = &m.slices[2].endpoints.as_ref().unwrap()[0];
        assert_eq!(west.zone.as_deref(), Some("own-zone"));
        assert_eq!(west.conditions.as_ref().unwrap().terminating, Some(true));
        // No region: no region label.
        let none = m.slices[0].metadata.labels.as_ref().unwrap();
        assert!(!none.contains_key(labels::REGION));
    }

    #[test]
    fn no_service_mirrors_nothing_and_the_same_input_gives_the_same_output() {
        let s = slice("a", json!([{"addresses": ["10.0.0.1"]}]));
        assert_eq!(mirror(&key(), "ns", None, [&s], nodes), Mirror::default());
        let t = slice("b", json!([{"addresses": ["10.0.0.9"]}]));
        let one = mirror(&key(), "ns", Some(&service()), [&s, &t], nodes);
        let two = mirror(&key(), "ns", Some(&service()), [&t, &s], nodes);
        assert_eq!(one, two);
    }

    #[test]
    fn an_address_in_two_slices_is_mirrored_once_preferring_ready() {
        let a = slice(
            "a",
            json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}]),
        );
        let b = slice(
            "b",
            json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false}}]),
        );
        let m = mirror(&key(), "ns", Some(&service()), [&a, &b], nodes);
        let eps = m.slices[0].endpoints.as_ref().unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(m.ready, 1);
    }

    #[test]
    fn different_target_ports_in_one_region_get_distinct_slices() {
        let a = slice("a", json!([{"addresses": ["10.0.0.1"], "nodeName": "n1"}]));
        let mut b = slice("b", json!([{"addresses": ["10.0.0.2"], "nodeName": "n1"}]));
        b.ports.as_mut().unwrap()[0].port = Some(8081);
        let m = mirror(&key(), "ns", Some(&service()), [&a, &b], nodes);
        assert_eq!(m.slices.len(), 2);
        let names: Vec<_> = m
            .slices
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_ne!(names[0], names[1]);
        assert!(names
            .iter()
            .all(|n| n.starts_with("detour-kind2-default-reviews-us-east1-")));
    }

    #[test]
    fn large_groups_are_split_at_the_api_limit() {
        let endpoints: Vec<_> = (0..2500)
            .map(|i| json!({"addresses": [format!("10.1.{}.{}", i / 250, i % 250)]}))
            .collect();
        let s = slice("a", json!(endpoints));
        let m = mirror(&key(), "ns", Some(&service()), [&s], nodes);
        let sizes: Vec<_> = m
            .slices
            .iter()
            .map(|s| s.endpoints.as_ref().unwrap().len())
            .collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        assert_eq!(m.ready, 2500);
    }

    #[test]
    fn unmatched_ports_and_fqdn_slices_are_left_out() {
        let mut s = slice("a", json!([{"addresses": ["10.0.0.1"]}]));
        s.ports = Some(vec![EndpointPort {
            name: Some("other".into()),
            port: Some(1),
            ..EndpointPort::default()
        }]);
        assert!(mirror(&key(), "ns", Some(&service()), [&s], nodes)
            .slices
            .is_empty());
        let mut f = slice("f", json!([{"addresses": ["reviews.example.com"]}]));
        f.address_type = "FQDN".into();
        assert!(mirror(&key(), "ns", Some(&service()), [&f], nodes)
            .slices
            .is_empty());
    }
}
