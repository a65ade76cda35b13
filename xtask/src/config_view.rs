//! What the tasks' config tests read of a parsed config with one service of one port,
//! in comparable form: the demo's and `bench-failover`'s tests check the configs they
//! write with the agent's own parser through these, and compare with their constants.

use std::net::SocketAddr;
use std::time::Duration;

use detour_agent::config::{Config, HealthCheckKind, Locality, PortConfig, ServiceConfig};

/// The one service of a config, and its one port.
pub struct OneService<'a> {
    pub service: &'a ServiceConfig,
    pub port: &'a PortConfig,
}

impl<'a> OneService<'a> {
    /// Panics unless `config` has exactly one service with exactly one port.
    pub fn of(config: &'a Config) -> Self {
        let [service] = &config.services[..] else {
            panic!("one service: {:?}", config.services);
        };
        let [port] = &service.ports[..] else {
            panic!("one port: {:?}", service.ports);
        };
        Self { service, port }
    }

    /// Its frontends, `VIP:port`.
    pub fn vips(&self) -> Vec<String> {
        self.service
            .vips
            .iter()
            .map(|v| SocketAddr::new(*v, self.port.number).to_string())
            .collect()
    }

    /// Each endpoint as `ip:port` it is reached at, with what `locality` says of its
    /// locality.
    pub fn endpoints(&self, locality: impl Fn(&Locality) -> String) -> Vec<(String, String)> {
        self.service
            .endpoints
            .iter()
            .map(|e| {
                (
                    SocketAddr::new(e.address, e.port_for(self.port)).to_string(),
                    locality(&e.locality),
                )
            })
            .collect()
    }

    /// Its failover rules, `(from, to)`.
    pub fn failover_rules(&self) -> Vec<(String, String)> {
        self.service
            .locality_lb
            .failover
            .iter()
            .map(|r| (r.from.to_string(), r.to.to_string()))
            .collect()
    }

    /// Its active checks: interval, timeout, unhealthy and healthy thresholds, kind.
    pub fn checks(&self) -> (Duration, Duration, u32, u32, &'a HealthCheckKind) {
        let checks = &self.service.health_check;
        (
            checks.interval,
            checks.timeout,
            checks.unhealthy_threshold,
            checks.healthy_threshold,
            &checks.kind,
        )
    }
}
