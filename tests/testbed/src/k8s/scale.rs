//! The objects of the control-plane benchmark at scale (`cargo xtask bench-kubernetes`,
//! and `cargo bench -p detour-agent --bench kubernetes_memory`, which holds the same
//! objects in-process): per service a headless Service, its EndpointSlice, the two
//! slices `detour controller` would mirror from two remote clusters, and a
//! FailoverService over all three clusters, as JSON an API server accepts.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

/// Where the services, their slices and FailoverServices live.
pub const NAMESPACE: &str = "bench";
/// Where `detour controller` would write mirrored slices (its own namespace).
pub const MIRROR_NAMESPACE: &str = "detour-system";
/// The agent's own cluster (`--cluster-name`).
pub const LOCAL_CLUSTER: &str = "kind1";
/// The simulated remote clusters and their regions, in failover order.
pub const REMOTE_CLUSTERS: [(&str, &str); 2] = [("kind2", "us-west1"), ("kind3", "europe-west1")];
pub const REGION: &str = "us-east1";
pub const ZONE: &str = "us-east1-b";
/// The FailoverService whose endpoint moves; the agent names it `NAME.NAMESPACE`.
pub const BENCH: &str = "bench";
pub const BENCH_VIP: Ipv4Addr = Ipv4Addr::new(127, 234, 0, 1);
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 9000;

/// `bench`: a Service and a FailoverService whose only backing service is it, in this
/// cluster; its slice is applied (and moved) separately, see [`bench_slice`].
pub fn bench_objects() -> Vec<Value> {
    vec![
        headless_service(BENCH),
        failover_service(BENCH, BENCH_VIP, &[LOCAL_CLUSTER]),
    ]
}

/// `bench`'s EndpointSlice with its one endpoint at `address`.
pub fn bench_slice(address: Ipv4Addr) -> Value {
    local_slice(BENCH, &[address])
}

/// Filler `i` (1-based; `bench` is service 0): a Service, its local slice, the two
/// mirrored slices, and a FailoverService naming all three clusters. Endpoint `k` of
/// the service goes to cluster `k % 3`; a cluster dealt none gets no slice.
pub fn filler_objects(i: u32, endpoints: u32) -> Vec<Value> {
    let name = filler_name(i);
    let mut by_cluster: [Vec<Ipv4Addr>; 3] = Default::default();
    for k in 0..endpoints {
        by_cluster[(k % 3) as usize].push(endpoint_address((i - 1) * endpoints + k));
    }
    let mut objects = vec![headless_service(&name)];
    if !by_cluster[0].is_empty() {
        objects.push(local_slice(&name, &by_cluster[0]));
    }
    for ((cluster, region), addresses) in REMOTE_CLUSTERS.iter().zip(&by_cluster[1..]) {
        if !addresses.is_empty() {
            objects.push(mirrored_slice(cluster, region, &name, addresses));
        }
    }
    let clusters = [LOCAL_CLUSTER, REMOTE_CLUSTERS[0].0, REMOTE_CLUSTERS[1].0];
    objects.push(failover_service(&name, filler_vip(i - 1), &clusters));
    objects
}

pub fn filler_name(i: u32) -> String {
    format!("svc-{i:05}")
}

/// Filler `j`'s VIP (0-based): 127.235.0.0/16.
pub fn filler_vip(j: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 235, 0, 0)) + j)
}

/// Filler endpoint `g` (0-based over all fillers): 10.200.0.0/14, never contacted.
pub fn endpoint_address(g: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + g)
}

/// A headless Service with port 80 (`http`) to target port 9000.
pub fn headless_service(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "clusterIP": "None",
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}],
        },
    })
}

pub fn ready(address: Ipv4Addr) -> Value {
    json!({
        "addresses": [address.to_string()],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "zone": ZONE,
    })
}

/// The cluster's own slice of Service `name`, as the EndpointSlice controller writes it
/// (named after the Service here, as there is one).
pub fn local_slice(name: &str, addresses: &[Ipv4Addr]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": addresses.iter().copied().map(ready).collect::<Vec<_>>(),
    })
}

/// The slice `detour controller` mirrors from `cluster` (in `region`) for Service
/// `name`: see `agent/src/controller/mirror.rs` and `sources/kubernetes/labels.rs`.
pub fn mirrored_slice(cluster: &str, region: &str, name: &str, addresses: &[Ipv4Addr]) -> Value {
    let remote_zone = format!("{region}-a");
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|address| {
            json!({
                "addresses": [address.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "zone": remote_zone,
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("detour-{cluster}-{NAMESPACE}-{name}-{region}"),
            "namespace": MIRROR_NAMESPACE,
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "controller.failover.detour.io",
                "failover.detour.io/cluster": cluster,
                "failover.detour.io/service-namespace": NAMESPACE,
                "failover.detour.io/service-name": name,
                "topology.kubernetes.io/region": region,
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": format!("port-{SERVICE_PORT}"), "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// A FailoverService on `vip`:80 backed by Service `name` in each of `clusters`, in
/// that order, health checks off.
pub fn failover_service(name: &str, vip: Ipv4Addr, clusters: &[&str]) -> Value {
    let backing: Vec<Value> = clusters
        .iter()
        .map(|cluster| {
            json!({"kubeService": {"name": name, "namespace": NAMESPACE, "clusterName": cluster}})
        })
        .collect();
    json!({
        "apiVersion": "failover.detour.io/v1alpha1",
        "kind": "FailoverService",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "hostname": format!("{name}.{NAMESPACE}.global"),
            "port": {"number": SERVICE_PORT, "protocol": "tcp"},
            "virtualIP": vip.to_string(),
            "backingServices": backing,
            "healthCheck": {"disabled": true},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_their_ranges_and_differ() {
        assert_eq!(filler_vip(0), Ipv4Addr::new(127, 235, 0, 0));
        assert_eq!(filler_vip(59_999), Ipv4Addr::new(127, 235, 234, 95));
        assert_eq!(endpoint_address(0), Ipv4Addr::new(10, 200, 0, 0));
        assert_eq!(endpoint_address(256), Ipv4Addr::new(10, 200, 1, 0));
        let last = endpoint_address(200_000 - 1);
        assert!(last < Ipv4Addr::new(10, 204, 0, 0), "{last}");
    }

    #[test]
    fn a_filler_s_endpoints_are_dealt_over_three_clusters() {
        let objects = filler_objects(2, 10);
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "Service",
                "EndpointSlice",
                "EndpointSlice",
                "EndpointSlice",
                "FailoverService"
            ]
        );
        let count = |o: &Value| o["endpoints"].as_array().unwrap().len();
        assert_eq!(
            [count(&objects[1]), count(&objects[2]), count(&objects[3])],
            [4, 3, 3]
        );
        // Filler 2's endpoints follow filler 1's ten.
        assert_eq!(objects[1]["endpoints"][0]["addresses"][0], "10.200.0.10");
        let mirrored = &objects[2]["metadata"];
        assert_eq!(mirrored["namespace"], MIRROR_NAMESPACE);
        assert_eq!(mirrored["name"], "detour-kind2-bench-svc-00002-us-west1");
        assert_eq!(mirrored["labels"]["failover.detour.io/cluster"], "kind2");
        assert_eq!(objects[2]["ports"][0]["name"], "port-80");
        let spec = &objects[4]["spec"];
        assert_eq!(spec["virtualIP"], "127.235.0.1");
        assert_eq!(
            spec["backingServices"][2]["kubeService"]["clusterName"],
            "kind3"
        );
        // One endpoint: only the local cluster gets a slice.
        assert_eq!(filler_objects(1, 1).len(), 3);
    }

    #[test]
    fn every_object_names_its_kind() {
        for object in bench_objects().iter().chain(&filler_objects(1, 3)) {
            assert!(object["apiVersion"].is_string() && object["kind"].is_string());
        }
    }
}
