//! The lookups themselves: hickory-resolver (the Hickory DNS project's resolver, which
//! gives each answer's TTL; the system's `getaddrinfo` does not), asking the node's
//! name servers (`/etc/resolv.conf`, and `/etc/hosts` first) or the ones `--dns-server`
//! names.
//!
//! Invariants:
//! - every lookup ends: the resolver's own timeout and attempts bound it, and
//!   [`LOOKUP_DEADLINE`] bounds the whole of it whatever the resolver does;
//! - the resolver keeps no cache of its own: the agent asks again when the TTL it was
//!   given ends (bounded by [`super::TtlBounds`]), and a cache would answer that with
//!   the same records for the rest of their TTL;
//! - one answer per lookup goes to the channel, `Ok` only with the addresses of both
//!   families the name has (A and AAAA are asked together).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tokio::sync::mpsc;

use super::Answer;

/// The longest one lookup may take, all tries and servers together.
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(15);

/// A lookup's answer, for the name asked.
pub type Outcome = (Arc<str>, Result<Answer, String>);

/// Looks names up in the background, one task per lookup.
#[derive(Clone)]
pub struct Lookups {
    resolver: TokioResolver,
}

impl Lookups {
    /// A resolver of `servers` (UDP, then TCP for a truncated answer), or of the node's
    /// own configuration when `servers` is empty.
    ///
    /// # Errors
    /// The node's resolver configuration cannot be read, or the resolver not built.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> anyhow::Result<Self> {
        let mut builder = if servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| {
                anyhow::anyhow!("reading the node's DNS configuration (/etc/resolv.conf): {e}")
            })?
        } else {
            let name_servers = servers
                .iter()
                .map(|server| {
                    let mut config = NameServerConfig::udp_and_tcp(server.ip());
                    for connection in &mut config.connections {
                        connection.port = server.port();
                    }
                    config
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(name_servers),
                TokioRuntimeProvider::default(),
            )
        };
        let options = builder.options_mut();
        options.cache_size = 0;
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.timeout = timeout;
        options.attempts = 2;
        let resolver = builder
            .build()
            .map_err(|e| anyhow::anyhow!("building the DNS resolver: {e}"))?;
        Ok(Self { resolver })
    }

    /// Looks `name` up in a task of its own; the answer goes to `answers`.
    pub fn spawn(&self, name: Arc<str>, answers: mpsc::Sender<Outcome>) {
        let resolver = self.resolver.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome =
                match tokio::time::timeout(LOOKUP_DEADLINE, resolver.lookup_ip(&*name)).await {
                    Err(_) => Err(format!("no answer within {LOOKUP_DEADLINE:?}")),
                    Ok(Err(error)) => Err(error.to_string()),
                    Ok(Ok(lookup)) => Ok(Answer {
                        addresses: lookup.iter().collect(),
                        ttl: lookup
                            .valid_until()
                            .saturating_duration_since(started.max(Instant::now())),
                    }),
                };
            let _ = answers.send((name, outcome)).await;
        });
    }
}
