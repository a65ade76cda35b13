//! detour: node-level failover for Kubernetes services, without a proxy.
//!
//! Data flows one way: `config` (what the operator asked for, read only when
//! `config_watch` says the file is whole) and `health` (what probes
//! observe) feed `desired`, which asks `selection` (pure) which backends should serve
//! each VIP:port; `reconcile` writes those tables into the BPF maps through `dataplane`,
//! the only module that touches aya. The binary's runtime runs that loop; `api` and `cli`
//! let a person on the node see what it is doing (`explain` says why each backend is or
//! is not in a table), and `metrics` lets Prometheus see it; both count services and
//! endpoints through `report`, one computation. `dns` prints the CoreDNS
//! configuration that resolves FailoverService hostnames.
//!
//! Passive health: the kernel reports what happens to the connections it rewrote;
//! `passive` turns those reports into per-service `outlier` (pure) ejections, and
//! `sockdiag` destroys the sockets still connected to a backend once it leaves.
pub mod api;
pub mod cli;
pub mod config;
pub mod config_watch;
pub mod controller;
pub mod dataplane;
pub mod desired;
pub mod dns;
pub mod explain;
pub mod health;
pub mod intern;
pub mod metrics;
pub mod nameserver;
pub mod originator;
pub mod outlier;
pub mod passive;
pub mod plan_cache;
pub mod reconcile;
pub mod report;
pub mod selection;
pub mod sockdiag;
pub mod sources;
