//! The names that tie the agent and `detour controller` together: labels on the
//! EndpointSlices the controller mirrors from remote clusters, on the Secrets that name
//! those clusters, and on the Services it creates for virtual IPs.
//!
//! Invariant: these are the whole contract between the two. The controller writes
//! objects carrying them; the agent reads only what they select. A mirrored slice never
//! carries `kubernetes.io/service-name`, so kube-proxy and other consumers of the
//! cluster's own Services ignore it.
//!
//! A mirrored EndpointSlice (in the controller's namespace) holds the ready, serving and
//! terminating endpoints of one Service of one remote cluster, as that cluster's own
//! slices have them, with:
//! - [`MANAGED_BY`] = [`CONTROLLER`] (the standard `endpointslice.kubernetes.io/managed-by`);
//! - [`CLUSTER`], [`SERVICE_NAME`], [`SERVICE_NAMESPACE`]: where the endpoints come from;
//! - [`REGION`] (the standard `topology.kubernetes.io/region`) when the endpoints' nodes
//!   name one: the controller groups endpoints into slices by region, so that the zone of
//!   each endpoint (`endpoints[].zone`) and the slice's region make its locality;
//! - ports named [`port_name`]`(service port number)`, whose `port` is the endpoint's
//!   target port: the agent maps a FailoverService's `port.number` to the backend port
//!   without reading the remote Service.

/// `endpointslice.kubernetes.io/managed-by`, as the EndpointSlice controller sets it.
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY`] on slices the detour controller writes.
pub const CONTROLLER: &str = "controller.failover.detour.io";
/// The cluster a mirrored slice's endpoints are in (a key of a remote-cluster Secret).
pub const CLUSTER: &str = "failover.detour.io/cluster";
/// The name of the Service a mirrored slice's endpoints belong to, in [`CLUSTER`].
pub const SERVICE_NAME: &str = "failover.detour.io/service-name";
/// The namespace of that Service, in [`CLUSTER`].
pub const SERVICE_NAMESPACE: &str = "failover.detour.io/service-namespace";
/// The well-known region label, on Nodes and on mirrored slices.
pub const REGION: &str = "topology.kubernetes.io/region";
/// The well-known zone label, on Nodes.
pub const ZONE: &str = "topology.kubernetes.io/zone";
/// The legacy region label (Kubernetes before 1.17; the second seed uses it).
pub const LEGACY_REGION: &str = "failure-domain.beta.kubernetes.io/region";
/// The legacy zone label.
pub const LEGACY_ZONE: &str = "failure-domain.beta.kubernetes.io/zone";
/// The standard label tying an EndpointSlice to the Service it belongs to.
pub const KUBE_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// On a Secret in the controller's namespace: its data keys are cluster names, their
/// values kubeconfigs for those clusters (as Istio's `istio/multiCluster=true`).
pub const REMOTE_CLUSTER_SECRET: &str = "failover.detour.io/remote-cluster";
/// On the selectorless Service the controller creates for a FailoverService's virtual
/// IP: the FailoverService's name (the Service is in its namespace and owned by it).
pub const FAILOVER_SERVICE: &str = "failover.detour.io/failover-service";

/// The name of a mirrored slice's port for the remote Service's port `number`.
#[must_use]
pub fn port_name(number: u16) -> String {
    format!("port-{number}")
}

/// The (region, zone) a Node's labels give, preferring the current labels over the
/// legacy `failure-domain.beta.kubernetes.io/*` ones; empty strings where unset.
#[must_use]
pub fn node_locality(labels: &std::collections::BTreeMap<String, String>) -> (String, String) {
    let get = |current: &str, legacy: &str| {
        labels
            .get(current)
            .or_else(|| labels.get(legacy))
            .cloned()
            .unwrap_or_default()
    };
    (get(REGION, LEGACY_REGION), get(ZONE, LEGACY_ZONE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_labels_win_over_legacy_ones_and_legacy_ones_fill_in() {
        let labels = [
            (REGION, "us-east1"),
            (LEGACY_REGION, "old-region"),
            (LEGACY_ZONE, "us-east1-b"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            node_locality(&labels),
            ("us-east1".to_owned(), "us-east1-b".to_owned())
        );
        assert_eq!(
            node_locality(&Default::default()),
            (String::new(), String::new())
        );
    }
}
