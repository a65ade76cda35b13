//! The agent's own, slim views of the objects it watches in every namespace: Services
//! and EndpointSlices, with only the fields the model reads.
//!
//! Every node's agent holds every Service and EndpointSlice of its cluster, so what one
//! of them costs is paid cluster-size times per node. k8s-openapi's full types keep
//! everything the API server sends (an `Endpoint` alone has a `targetRef`, `nodeName`,
//! `hints`, `deprecatedTopology`, ...); these types are deserialized straight from the
//! same JSON and drop the rest at parse time. They inherit their `Resource` identity
//! (group, version, kind, plural) from the k8s-openapi types, so `Api<WatchedService>`
//! talks to the real `services` endpoint.
//!
//! Invariants:
//! - field names and shapes are the API's (`clusterIPs`, `endpoints[].conditions`), so
//!   a test object written as a manifest deserializes into either type alike;
//! - [`slim_metadata`] keeps what the index and the model need (name, namespace,
//!   labels, resourceVersion, uid, creationTimestamp) and drops the rest (managedFields
//!   above all, which is often bigger than the object).

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Serialize};

use super::failover_service::{FailoverService, FailoverServiceStatus};

/// A Service, as the model reads it.
#[derive(Resource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[resource(inherit = "Service")]
pub struct WatchedService {
    pub metadata: ObjectMeta,
    pub spec: Option<WatchedServiceSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WatchedServiceSpec {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Option<Vec<WatchedServicePort>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct WatchedServicePort {
    pub name: Option<String>,
    pub port: i32,
}

/// An EndpointSlice, as the model reads it.
#[derive(Resource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[resource(inherit = "EndpointSlice")]
#[serde(rename_all = "camelCase")]
pub struct WatchedSlice {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    pub ports: Option<Vec<EndpointPort>>,
    pub endpoints: Option<Vec<WatchedEndpoint>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct WatchedEndpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    pub zone: Option<String>,
}

/// Keeps of a FailoverService's status only what the model reads: the virtual IP the
/// controller allocated. The conditions and per-cluster endpoint counts are the
/// controller's report, rewritten as backends come and go; every agent would otherwise
/// hold them for every FailoverService.
pub fn slim_failover_service(fos: &mut FailoverService) {
    slim_metadata(&mut fos.metadata);
    fos.status = fos
        .status
        .take()
        .and_then(|status| status.virtual_ip)
        .map(|virtual_ip| FailoverServiceStatus {
            virtual_ip: Some(virtual_ip),
            ..FailoverServiceStatus::default()
        });
}

/// Drops what no reader of a watched object needs from its metadata.
pub fn slim_metadata(metadata: &mut ObjectMeta) {
    let ObjectMeta {
        name,
        namespace,
        labels,
        resource_version,
        uid,
        creation_timestamp,
        generation,
        ..
    } = std::mem::take(metadata);
    *metadata = ObjectMeta {
        name,
        namespace,
        labels,
        resource_version,
        uid,
        creation_timestamp,
        generation,
        ..ObjectMeta::default()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_slim_types_are_the_apis_services_and_endpointslices() {
        assert_eq!(WatchedService::plural(&()), Service::plural(&()));
        assert_eq!(WatchedService::api_version(&()), Service::api_version(&()));
        assert_eq!(WatchedSlice::plural(&()), EndpointSlice::plural(&()));
        assert_eq!(WatchedSlice::group(&()), EndpointSlice::group(&()));
    }

    #[test]
    fn a_full_endpointslice_keeps_what_the_model_reads_and_drops_the_rest() {
        let manifest = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "reviews-abcde", "namespace": "default", "resourceVersion": "42",
                "labels": {"kubernetes.io/service-name": "reviews"},
                "annotations": {"a": "b"},
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:endpoints": {}}}],
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{
                "addresses": ["10.0.0.1"], "zone": "us-east1-b", "nodeName": "n1",
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "name": "reviews-1", "namespace": "default"},
                "hints": {"forZones": [{"name": "us-east1-b"}]},
            }],
        });
        let mut slice: WatchedSlice = serde_json::from_value(manifest).unwrap();
        slim_metadata(&mut slice.metadata);
        assert_eq!(
            serde_json::to_value(&slice).unwrap(),
            json!({
                "metadata": {
                    "name": "reviews-abcde", "namespace": "default", "resourceVersion": "42",
                    "labels": {"kubernetes.io/service-name": "reviews"},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{
                    "addresses": ["10.0.0.1"], "zone": "us-east1-b",
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                }],
            })
        );
    }

    #[test]
    fn a_failover_services_status_keeps_only_its_virtual_ip() {
        let mut fos: FailoverService = serde_json::from_value(json!({
            "apiVersion": "failover.detour.io/v1alpha1",
            "kind": "FailoverService",
            "metadata": {"name": "reviews", "namespace": "default", "resourceVersion": "7",
                         "annotations": {"a": "b"}},
            "spec": {"hostname": "reviews.default.global", "port": {"number": 9080},
                     "backingServices": [{"kubeService": {"name": "reviews", "namespace": "default"}}]},
            "status": {
                "virtualIP": "10.96.0.42", "observedGeneration": 3,
                "conditions": [{"type": "Accepted", "status": "True", "reason": "Valid",
                                "message": "ok", "lastTransitionTime": "2026-11-30T07:00:00Z",
                                "observedGeneration": 3}],
                "endpoints": [{"cluster": "kind2", "tier": 0, "ready": 3, "servingTerminating": 0,
                               "service": {"name": "reviews", "namespace": "default"}}],
            },
        }))
        .unwrap();
        assert!(!fos.status.as_ref().unwrap().conditions.is_empty());
        slim_failover_service(&mut fos);
        assert_eq!(
            fos.status,
            Some(FailoverServiceStatus {
                virtual_ip: Some("10.96.0.42".into()),
                ..FailoverServiceStatus::default()
            })
        );
        assert_eq!(fos.metadata.annotations, None);
        assert_eq!(fos.spec.hostname, "reviews.default.global");

        let mut without: FailoverService = fos.clone();
        without.status.as_mut().unwrap().virtual_ip = None;
        slim_failover_service(&mut without);
        assert_eq!(without.status, None);
    }
}
