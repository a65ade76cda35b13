//! The Kubernetes source of the service model: the `FailoverService` custom resource
//! ([`failover_service`]), and (to come) the watchers that read it, the EndpointSlices of
//! the Services it names and the node's own locality. The standalone YAML file is the
//! other source; both are mapped into the same service model.
//!
//! Invariant: the types here are the API as users write it (`failover.detour.io/v1alpha1`)
//! and as the apiserver stores it; nothing here touches a cluster. The CRD in
//! `deploy/crds/` is generated from these types (`cargo xtask crd`), and a unit test
//! fails when it is stale.
pub mod failover_service;
pub mod labels;
pub mod model;
pub mod watch;

pub use failover_service::{FailoverService, FailoverServiceSpec, FailoverServiceStatus};
