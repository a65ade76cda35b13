//! Privileged end-to-end tests: the real `detour` binary, the real kernel, real sockets.
//!
//! Each test builds its own world with the testbed's guards — a child cgroup the agent
//! attaches to, a bpffs pin directory, loopback HTTP backends, a temp dir for the config
//! and the agent's socket — and every guard removes what it made on drop, pass or fail.
//! Traffic stays on loopback (VIPs are 127.x or ::1 addresses, so even a connect detour
//! failed to rewrite stays on this machine).
//!
//! Connections must come from a process inside the test's cgroup. The test binary
//! re-executes itself for that: [`client::run_in`] spawns this binary into the cgroup
//! with only the `client_process` test selected and the client's instructions in an
//! environment variable; the client prints one JSON line per result.
//!
//! These tests need root; they fail (never skip) without it.

mod client;
mod config_file;
mod demo;
mod dns_names;
mod explain;
mod fail_open;
mod kernel;
mod kube;
mod kubernetes;
mod limits;
mod multicluster;
mod passive;
mod scenarios;
mod steering;
mod tls_origination;
mod upgrade;
mod world;
