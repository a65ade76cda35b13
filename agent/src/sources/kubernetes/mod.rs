//! The Kubernetes source of the service model: the `FailoverService` custom resource
//! ([`failover_service`]), the names shared with `detour controller` ([`labels`]), the
//! agent's watches of its own cluster ([`watch`]), what they hold filed for lookup with who
//! reads what ([`index`]), and the pure mapping of that into the same `Config` the
//! standalone file gives ([`model`]), over slim views of the Services and EndpointSlices
//! it watches ([`objects`]). The pipeline: watch events → index → model → the agent's
//! loop.
//!
//! Invariant: the resource types are the API as users write it (`failover.detour.io/v1alpha1`)
//! and as the apiserver stores it; only `watch` touches a cluster, and it only reads. The CRD in
//! `deploy/crds/` is generated from these types (`cargo xtask crd`), and a unit test
//! fails when it is stale.
pub mod failover_service;
pub mod index;
pub mod labels;
pub mod model;
pub mod objects;
pub mod watch;

pub use failover_service::{FailoverService, FailoverServiceSpec, FailoverServiceStatus};
