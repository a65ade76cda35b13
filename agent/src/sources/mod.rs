//! Where detour learns which services to serve: the sources of the service model.
//!
//! Two sources describe the same thing (VIPs or a hostname, ports, endpoints with their
//! locality and cluster, the locality policy, health checking, outlier detection, spill
//! and connection termination):
//! - the standalone YAML file, read on a single machine (`crate::config`, which also
//!   holds the model's types and its validation);
//! - Kubernetes, where a `FailoverService` custom resource names the Services that back
//!   it ([`kubernetes`]); it writes each service in the file's schema and has
//!   `config::service_from_json` check it, so both give the same errors.
//!
//! Beside them, [`dns`] turns the endpoints a service names by DNS (`resolution: DNS`)
//! into addresses: the running configuration is a source's, with those names resolved.
//!
//! Invariant: a source only reads and checks what its own input can say; what a service
//! means (defaults, cross-field rules, the errors a user sees) is decided once, in the
//! service model both sources produce.
pub mod dns;
pub mod kubernetes;
