//! `FailoverService.status` as the controller computes it: the conditions Accepted,
//! ResolvedRefs and Programmed (as in the Gateway API), the VIP, and the endpoints per
//! cluster and tier, as discovered.
//!
//! Invariants:
//! - pure: the same inputs and previous status give the same status, and a condition
//!   keeps its `lastTransitionTime` while its status stays the same, so the controller
//!   can compare and write only on change;
//! - a FailoverService's status depends on its own spec and the objects it names, plus
//!   one cross-object rule ([`conflicts`]): two FailoverServices claiming the same
//!   hostname and port, or virtual IP and port, cannot both be served; the older keeps
//!   it, so a new bad object never takes anything from a working one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt as _;

use crate::sources::kubernetes::failover_service::{condition, ServiceRef, TierEndpoints};
use crate::sources::kubernetes::objects::WatchedSlice;
use crate::sources::kubernetes::{labels, FailoverService, FailoverServiceStatus};

/// What the controller knows of one backing service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// A Service in the local cluster that exists (the agents read its slices), with
    /// its endpoint counts.
    Local {
        ready: u32,
        serving_terminating: u32,
    },
    /// A remote Service that exists, with its endpoint counts.
    Remote {
        ready: u32,
        serving_terminating: u32,
    },
    /// The Service does not exist in its cluster.
    NotFound,
    /// No remote-cluster Secret names the cluster.
    ClusterUnknown,
    /// The cluster's connection has not listed the Service yet (or is unreachable since
    /// before its first list): its mirrors are left as they were.
    NotSynced,
    /// An endpoint outside Kubernetes (`external`): every agent resolves and checks it
    /// itself, so the controller has nothing to mirror or count.
    External,
}

/// Why a FailoverService is not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: &'static str,
    pub message: String,
}

/// FailoverServices that lose a conflict with an older one, by (namespace, name).
#[must_use]
pub fn conflicts(all: &[std::sync::Arc<FailoverService>]) -> BTreeMap<(String, String), Refused> {
    let mut sorted: Vec<&FailoverService> = all.iter().map(AsRef::as_ref).collect();
    sorted.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .then_with(|| a.namespace().cmp(&b.namespace()))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    let mut hostnames: BTreeMap<(&str, u16), &FailoverService> = BTreeMap::new();
    let mut vips: BTreeMap<(&str, u16), &FailoverService> = BTreeMap::new();
    let mut refused = BTreeMap::new();
    let id =
        |f: &FailoverService| format!("{}/{}", f.namespace().unwrap_or_default(), f.name_any());
    for fos in sorted {
        let port = fos.spec.port.number;
        let key = (fos.namespace().unwrap_or_default(), fos.name_any());
        if let Some(first) = hostnames.get(&(fos.spec.hostname.as_str(), port)) {
            refused.insert(
                key,
                Refused {
                    reason: "HostnameConflict",
                    message: format!(
                        "hostname {} port {port} is already served by FailoverService {}",
                        fos.spec.hostname,
                        id(first)
                    ),
                },
            );
            continue;
        }
        if let Some(vip) = fos.spec.virtual_ip.as_deref() {
            if let Some(first) = vips.get(&(vip, port)) {
                refused.insert(
                    key,
                    Refused {
                        reason: "VirtualIPConflict",
                        message: format!(
                            "virtualIP {vip} port {port} is already served by FailoverService {}",
                            id(first)
                        ),
                    },
                );
                continue;
            }
            vips.insert((vip, port), fos);
        }
        hostnames.insert((fos.spec.hostname.as_str(), port), fos);
    }
    refused
}

/// Everything the status of one FailoverService is made of.
pub struct Inputs<'a> {
    pub fos: &'a FailoverService,
    /// `Some` when the FailoverService is not accepted.
    pub refused: Option<&'a Refused>,
    /// One entry per `spec.backingServices`, in order: (cluster, state).
    pub backends: Vec<(String, BackendState)>,
    /// The virtual IP, once known.
    pub virtual_ip: Option<String>,
    /// Mirror writes of its remote Services failed at the last pass.
    pub write_failed: bool,
    pub now: Time,
}

/// The status to write.
#[must_use]
pub fn status(inputs: &Inputs<'_>) -> FailoverServiceStatus {
    let fos = inputs.fos;
    let generation = fos.metadata.generation;
    let previous = fos.status.as_ref();
    let make = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let last_transition_time = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .map_or_else(|| inputs.now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time,
        }
    };

    let accepted = match inputs.refused {
        None => make(
            condition::ACCEPTED,
            true,
            "Accepted",
            "the spec is valid".into(),
        ),
        Some(r) => make(condition::ACCEPTED, false, r.reason, r.message.clone()),
    };

    let mut problems = Vec::new();
    let mut first_reason = None;
    for (tier, ((cluster, state), backing)) in inputs
        .backends
        .iter()
        .zip(&fos.spec.backing_services)
        .enumerate()
    {
        let Some(svc) = &backing.kube_service else {
            continue;
        };
        let (reason, what) = match state {
            BackendState::Local { .. } | BackendState::Remote { .. } | BackendState::External => {
                continue
            }
            BackendState::NotFound => ("BackendNotFound", "the Service does not exist"),
            BackendState::ClusterUnknown => (
                "ClusterUnknown",
                "no remote-cluster Secret names this cluster",
            ),
            BackendState::NotSynced => (
                "ClusterNotSynced",
                "the cluster has not been listed yet (unreachable?); its endpoints are kept as they were",
            ),
        };
        first_reason.get_or_insert(reason);
        problems.push(format!(
            "backingServices[{tier}] {cluster}/{}/{}: {what}",
            svc.namespace, svc.name
        ));
    }
    let resolved = match first_reason {
        None => make(
            condition::RESOLVED_REFS,
            true,
            "ResolvedRefs",
            "every backing Service exists".into(),
        ),
        Some(reason) => make(condition::RESOLVED_REFS, false, reason, problems.join("; ")),
    };

    let programmed = if inputs.refused.is_some() {
        make(
            condition::PROGRAMMED,
            false,
            "Invalid",
            "not accepted: nothing is programmed".into(),
        )
    } else if inputs.virtual_ip.is_none() {
        make(
            condition::PROGRAMMED,
            false,
            "AddressNotAssigned",
            "waiting for the VIP Service's ClusterIP".into(),
        )
    } else if let Some((cluster, _)) = inputs
        .backends
        .iter()
        .find(|(_, state)| *state == BackendState::NotSynced)
    {
        make(
            condition::PROGRAMMED,
            false,
            "Pending",
            format!("waiting for the first list of cluster {cluster}"),
        )
    } else if inputs.write_failed {
        make(
            condition::PROGRAMMED,
            false,
            "WriteFailed",
            "writing the mirrored EndpointSlices failed; retrying".into(),
        )
    } else {
        make(
            condition::PROGRAMMED,
            true,
            "Programmed",
            "the VIP is assigned and the endpoints are published".into(),
        )
    };

    let endpoints = inputs
        .backends
        .iter()
        .zip(&fos.spec.backing_services)
        .enumerate()
        .filter_map(|(tier, ((cluster, state), backing))| match state {
            BackendState::Local {
                ready,
                serving_terminating,
            }
            | BackendState::Remote {
                ready,
                serving_terminating,
            } => Some(TierEndpoints {
                cluster: cluster.clone(),
                tier: u32::try_from(tier).unwrap_or(u32::MAX),
                service: backing.kube_service.as_ref().map(|s| ServiceRef {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                })?,
                ready: *ready,
                serving_terminating: *serving_terminating,
            }),
            _ => None,
        })
        .collect();

    FailoverServiceStatus {
        conditions: vec![accepted, resolved, programmed],
        observed_generation: generation,
        virtual_ip: inputs.virtual_ip.clone(),
        endpoints,
    }
}

/// The ready and the serving-but-terminating endpoints of the local Service
/// `namespace/name`, over its EndpointSlices (as the API reads conditions: an unset
/// `ready` means ready). An address listed by two slices while one is being rewritten
/// counts once.
#[must_use]
pub fn count_local(slices: &[Arc<WatchedSlice>], namespace: &str, name: &str) -> (u32, u32) {
    let mut ready = BTreeSet::new();
    let mut serving_terminating = BTreeSet::new();
    for slice in slices {
        let meta = &slice.metadata;
        let labelled = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(labels::KUBE_SERVICE_NAME))
            .is_some_and(|service| service == name);
        if !labelled || meta.namespace.as_deref() != Some(namespace) {
            continue;
        }
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let c = endpoint.conditions.clone().unwrap_or_default();
            if c.ready != Some(false) {
                ready.insert(address.clone());
            } else if c.serving == Some(true) && c.terminating == Some(true) {
                serving_terminating.insert(address.clone());
            }
        }
    }
    let count = |set: BTreeSet<String>| u32::try_from(set.len()).unwrap_or(u32::MAX);
    (count(ready), count(serving_terminating))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn fos(name: &str, age_s: i64, hostname: &str, vip: Option<&str>) -> FailoverService {
        let mut spec = json!({
            "hostname": hostname,
            "port": {"number": 9080},
            "backingServices": [
                {"kubeService": {"name": "reviews", "namespace": "default", "clusterName": "kind2"}},
                {"kubeService": {"name": "reviews", "namespace": "default"}},
            ],
        });
        if let Some(vip) = vip {
            spec["virtualIP"] = json!(vip);
        }
        let ts = k8s_openapi::jiff::Timestamp::from_second(1_000_000 - age_s).unwrap();
        serde_json::from_value(json!({
            "apiVersion": "failover.detour.io/v1alpha1",
            "kind": "FailoverService",
            "metadata": {"name": name, "namespace": "default", "generation": 3,
                         "creationTimestamp": ts.to_string()},
            "spec": spec,
        }))
        .unwrap()
    }

    fn time(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap())
    }

    fn cond<'a>(s: &'a FailoverServiceStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn the_older_failover_service_keeps_a_contested_hostname_or_vip() {
        let all = [
            Arc::new(fos("new", 1, "r.global", None)),
            Arc::new(fos("old", 9, "r.global", None)),
            Arc::new(fos("a", 5, "a.global", Some("10.0.0.1"))),
            Arc::new(fos("b", 4, "b.global", Some("10.0.0.1"))),
        ];
        let refused = conflicts(&all);
        let keys: Vec<_> = refused.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(keys, ["b", "new"]);
        assert_eq!(
            refused[&("default".into(), "new".into())].reason,
            "HostnameConflict"
        );
        assert!(refused[&("default".into(), "new".into())]
            .message
            .contains("default/old"));
        assert_eq!(
            refused[&("default".into(), "b".into())].reason,
            "VirtualIPConflict"
        );
    }

    #[test]
    fn conditions_say_what_is_missing_and_keep_their_transition_time() {
        let mut f = fos("r", 1, "r.global", None);
        let inputs = Inputs {
            fos: &f,
            refused: None,
            backends: vec![
                ("kind9".into(), BackendState::ClusterUnknown),
                (
                    "kind1".into(),
                    BackendState::Local {
                        ready: 2,
                        serving_terminating: 0,
                    },
                ),
            ],
            virtual_ip: None,
            write_failed: false,
            now: time(100),
        };
        let s = status(&inputs);
        assert_eq!(cond(&s, condition::ACCEPTED).status, "True");
        let refs = cond(&s, condition::RESOLVED_REFS);
        assert_eq!(
            (refs.status.as_str(), refs.reason.as_str()),
            ("False", "ClusterUnknown")
        );
        assert!(
            refs.message
                .contains("backingServices[0] kind9/default/reviews"),
            "{}",
            refs.message
        );
        assert_eq!(cond(&s, condition::PROGRAMMED).reason, "AddressNotAssigned");
        assert_eq!(refs.observed_generation, Some(3));

        // Later, resolved and with a VIP: ResolvedRefs and Programmed flip, Accepted
        // keeps its time.
        f.status = Some(s.clone());
        let inputs = Inputs {
            fos: &f,
            refused: None,
            backends: vec![
                (
                    "kind2".into(),
                    BackendState::Remote {
                        ready: 2,
                        serving_terminating: 1,
                    },
                ),
                (
                    "kind1".into(),
                    BackendState::Local {
                        ready: 2,
                        serving_terminating: 0,
                    },
                ),
            ],
            virtual_ip: Some("198.18.0.10".into()),
            write_failed: false,
            now: time(200),
        };
        let t = status(&inputs);
        assert_eq!(
            cond(&t, condition::ACCEPTED).last_transition_time,
            time(100)
        );
        assert_eq!(
            cond(&t, condition::RESOLVED_REFS).last_transition_time,
            time(200)
        );
        assert_eq!(cond(&t, condition::PROGRAMMED).status, "True");
        assert_eq!(t.virtual_ip.as_deref(), Some("198.18.0.10"));
        let tiers: Vec<(&str, u32, u32, u32)> = t
            .endpoints
            .iter()
            .map(|e| (e.cluster.as_str(), e.tier, e.ready, e.serving_terminating))
            .collect();
        assert_eq!(tiers, [("kind2", 0, 2, 1), ("kind1", 1, 2, 0)]);
        // A backend not listed yet: not programmed.
        let pending = Inputs {
            fos: &f,
            refused: None,
            backends: vec![("kind2".into(), BackendState::NotSynced)],
            virtual_ip: Some("198.18.0.10".into()),
            write_failed: false,
            now: time(200),
        };
        let p = status(&pending);
        assert_eq!(cond(&p, condition::PROGRAMMED).reason, "Pending");
        assert_eq!(
            cond(&p, condition::RESOLVED_REFS).reason,
            "ClusterNotSynced"
        );
        // Same inputs again: the same status (so nothing is written).
        let backends = inputs.backends.clone();
        f.status = Some(t.clone());
        let inputs = Inputs {
            fos: &f,
            refused: None,
            backends,
            virtual_ip: Some("198.18.0.10".into()),
            write_failed: false,
            now: time(300),
        };
        assert_eq!(status(&inputs), t);
    }

    #[test]
    fn local_counts_read_the_services_slices_once_per_address() {
        let slice = |name: &str, service: &str, namespace: &str, endpoints: serde_json::Value| {
            Arc::new(
                serde_json::from_value::<WatchedSlice>(serde_json::json!({
                    "metadata": {"name": name, "namespace": namespace,
                                 "labels": {labels::KUBE_SERVICE_NAME: service}},
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                }))
                .unwrap(),
            )
        };
        let slices = [
            slice(
                "reviews-a",
                "reviews",
                "default",
                serde_json::json!([
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.2"]},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                    {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": false}},
                ]),
            ),
            // The same pod listed by a second slice while the first is rewritten.
            slice(
                "reviews-b",
                "reviews",
                "default",
                serde_json::json!([
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                ]),
            ),
            slice(
                "reviews-c",
                "reviews",
                "other",
                serde_json::json!([
                    {"addresses": ["10.0.0.9"]},
                ]),
            ),
            slice(
                "ratings-a",
                "ratings",
                "default",
                serde_json::json!([
                    {"addresses": ["10.0.0.8"]},
                ]),
            ),
        ];
        assert_eq!(count_local(&slices, "default", "reviews"), (2, 1));
        assert_eq!(count_local(&slices, "default", "nothing"), (0, 0));
    }
}
