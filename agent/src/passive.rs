//! Passive health for every service: what the kernel saw of real connections → one
//! [`OutlierDetector`] per service → which backends are ejected and until when.
//!
//! The kernel (`sock_ops`) reports outcomes keyed by frontend id and backend id; the
//! runtime turns the ids into (service, backend address) and feeds them here. This
//! module decides; the runtime acts (tables, suspect marks, socket destruction).
//!
//! Invariants:
//! - a service's detector knows exactly the service's targets (every endpoint at every
//!   service port), each with its locality tier from [`selection::tier_of`], which
//!   depends on configuration only, never on health;
//! - a detector keeps its state across reloads while the service's ejection policy is
//!   unchanged; a changed policy starts the service over (its ejections end, and the
//!   caller's next plan puts those backends back);
//! - only handshake outcomes count: a reset after an established connection is counted
//!   by the kernel (`BackendStats::resets`) and never sent as an event, because it does
//!   not eject (Envoy's TCP outlier detection counts connect failures too, not how a
//!   connection ended); likewise a success is sent only when it ends a failure run;
//! - events arrive in batches and up to `EVENTS_POLL_MS` late, except those the kernel
//!   wakes the agent for (the first failure of a run and the one that reaches the
//!   kernel's threshold); order within a backend is kept, so a late success never
//!   overtakes the failures before it;
//! - a first SYN retransmission is not a failure: the kernel already avoids the backend,
//!   and only a second one (or the handshake failing) counts, so a listen queue that
//!   overflowed once does not eject a backend that answers the retransmitted SYN.
//!
//! Pure: no I/O, no clock (time comes in as an argument).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Instant;

use detour_ebpf::event_kind;

use crate::config::{Config, ServiceConfig};
use crate::desired;
use crate::outlier::{
    BackendOutlierState, EjectionPolicy, Event, FailureKind, Outcome, OutlierDetector,
};
use crate::plan_cache::Dirty;
use crate::selection::{self, Tier};

/// What a kernel event kind means for ejection: `None` for kinds that never eject.
pub fn outcome(kind: u32) -> Option<Outcome> {
    match kind {
        event_kind::ESTABLISHED => Some(Outcome::Success),
        event_kind::REFUSED => Some(Outcome::Failure(FailureKind::Refused)),
        event_kind::TIMEOUT => Some(Outcome::Failure(FailureKind::Timeout)),
        _ => None,
    }
}

/// A kernel event kind's name, as logs and `detour events` show it.
pub fn kind_name(kind: u32) -> &'static str {
    match kind {
        event_kind::ESTABLISHED => "recovered",
        event_kind::REFUSED => "refused",
        event_kind::TIMEOUT => "timeout",
        event_kind::RESET => "reset",
        event_kind::SYN_RETRANSMIT => "syn-retransmit",
        event_kind::STEERED => "steered",
        _ => "unknown",
    }
}

/// The ejection policy a service asks for.
fn policy(service: &ServiceConfig) -> EjectionPolicy {
    service.outlier_detection.policy
}

/// Outlier detectors of all services, by service name.
#[derive(Debug, Default)]
pub struct PassiveHealth {
    services: BTreeMap<String, OutlierDetector<SocketAddr>>,
}

impl PassiveHealth {
    /// Matches the detectors to `config`: services and targets added or removed, tiers
    /// updated, state kept where the policy did not change.
    pub fn sync(&mut self, config: &Config) {
        let names: BTreeSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        self.services
            .retain(|name, _| names.contains(name.as_str()));
        for service in &config.services {
            self.sync_service(config, service);
        }
    }

    /// [`PassiveHealth::sync`] for the services `scope` names only: a reload that
    /// touched one service re-syncs one detector.
    pub fn sync_scope(&mut self, config: &Config, scope: &Dirty) {
        let Dirty::Services(names) = scope else {
            return self.sync(config);
        };
        for name in names {
            match config.service(name) {
                None => {
                    self.services.remove(name);
                }
                Some(service) => self.sync_service(config, service),
            }
        }
    }

    fn sync_service(&mut self, config: &Config, service: &ServiceConfig) {
        let policy = policy(service);
        let detector = self
            .services
            .entry(service.name.clone())
            .or_insert_with(|| OutlierDetector::new(policy));
        if *detector.policy() != policy {
            *detector = OutlierDetector::new(policy);
        }
        detector.set_backends(tiered_targets(config, service));
    }

    /// Records one outcome; `None` for unknown services or backends, and when nothing
    /// changed.
    pub fn observe(
        &mut self,
        service: &str,
        backend: SocketAddr,
        outcome: Outcome,
        now: Instant,
    ) -> Option<Event<SocketAddr>> {
        self.services
            .get_mut(service)?
            .observe(&backend, outcome, now)
    }

    /// Ends an ejection early: an active health check found the backend healthy.
    pub fn restore(
        &mut self,
        service: &str,
        backend: SocketAddr,
        now: Instant,
    ) -> Option<Event<SocketAddr>> {
        self.services.get_mut(service)?.restore(&backend, now)
    }

    /// Restorations due by `now`, with their service.
    pub fn advance(&mut self, now: Instant) -> Vec<(String, Event<SocketAddr>)> {
        let mut events = Vec::new();
        for (name, detector) in &mut self.services {
            if detector.next_deadline().is_some_and(|due| due <= now) {
                events.extend(
                    detector
                        .advance(now)
                        .into_iter()
                        .map(|event| (name.clone(), event)),
                );
            }
        }
        events
    }

    /// When [`advance`](Self::advance) next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.services
            .values()
            .filter_map(OutlierDetector::next_deadline)
            .min()
    }

    pub fn is_ejected(&self, service: &str, backend: SocketAddr) -> bool {
        self.services
            .get(service)
            .is_some_and(|detector| detector.is_ejected(&backend))
    }

    /// Whether any service has `backend` ejected (the kernel's suspect mark is per
    /// backend address, shared by the services that use it).
    pub fn is_ejected_anywhere(&self, backend: SocketAddr) -> bool {
        self.services
            .values()
            .any(|detector| detector.is_ejected(&backend))
    }

    pub fn state(&self, service: &str, backend: SocketAddr) -> Option<BackendOutlierState> {
        self.services.get(service)?.state(&backend)
    }
}

/// Every target of `service` with the rank of its locality tier among the service's
/// tiers (0 = best).
fn tiered_targets(config: &Config, service: &ServiceConfig) -> Vec<(SocketAddr, usize)> {
    let node = &config.node.locality;
    let policy = &service.locality_lb;
    let tiers: Vec<Tier> = service
        .endpoints
        .iter()
        .map(|ep| {
            let priority = config.priority_of(service, ep);
            selection::tier_of(node, policy, &ep.locality, priority)
        })
        .collect();
    let ranks: Vec<&Tier> = tiers.iter().collect::<BTreeSet<_>>().into_iter().collect();
    let rank = |tier: &Tier| ranks.iter().position(|t| *t == tier).unwrap_or(0);
    let per_endpoint: Vec<usize> = tiers.iter().map(rank).collect();
    let endpoints_per_port = service.endpoints.len().max(1);
    desired::targets(service)
        .enumerate()
        .map(|(i, target)| (target, per_endpoint[i % endpoints_per_port]))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config;

    const CONFIG: &str = r#"
node:
  locality: us-east1/us-east1-b
services:
  - name: mydb
    vips: [127.210.0.1]
    ports: [{number: 80}]
    outlierDetection:
      consecutiveErrors: 2
      interval: 10s
      baseEjectionTime: 30s
    endpoints:
      - {address: 127.0.1.1, locality: us-east1/us-east1-b}
      - {address: 127.0.1.2, locality: us-east1/us-east1-b}
      - {address: 127.0.2.1, locality: us-west1/us-west1-a}
"#;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn passive(text: &str) -> (Config, PassiveHealth) {
        let config = config::parse(text).unwrap();
        let mut passive = PassiveHealth::default();
        passive.sync(&config);
        (config, passive)
    }

    #[test]
    fn kernel_kinds_map_to_outcomes() {
        assert_eq!(outcome(event_kind::ESTABLISHED), Some(Outcome::Success));
        assert_eq!(
            outcome(event_kind::REFUSED),
            Some(Outcome::Failure(FailureKind::Refused))
        );
        assert_eq!(
            outcome(event_kind::TIMEOUT),
            Some(Outcome::Failure(FailureKind::Timeout))
        );
        assert_eq!(outcome(event_kind::RESET), None);
        assert_eq!(outcome(event_kind::SYN_RETRANSMIT), None);
        assert_eq!(outcome(99), None);
    }

    #[test]
    fn failures_in_a_row_eject_and_the_deadline_restores() {
        let (_, mut p) = passive(CONFIG);
        let t0 = Instant::now();
        let dead = sa("127.0.1.1:80");
        let refused = Outcome::Failure(FailureKind::Refused);
        assert_eq!(p.observe("mydb", dead, refused, t0), None);
        let event = p.observe("mydb", dead, refused, t0);
        assert!(matches!(event, Some(Event::Ejected { key, .. }) if key == dead));
        assert!(p.is_ejected("mydb", dead));
        assert!(p.is_ejected_anywhere(dead));
        assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(30)));
        assert!(p.advance(t0 + Duration::from_secs(29)).is_empty());
        let restored = p.advance(t0 + Duration::from_secs(30));
        assert_eq!(
            restored,
            vec![("mydb".into(), Event::Restored { key: dead })]
        );
        assert!(!p.is_ejected("mydb", dead));
    }

    #[test]
    fn a_success_resets_the_run() {
        let (_, mut p) = passive(CONFIG);
        let t0 = Instant::now();
        let b = sa("127.0.1.2:80");
        let refused = Outcome::Failure(FailureKind::Refused);
        p.observe("mydb", b, refused, t0);
        p.observe("mydb", b, Outcome::Success, t0);
        assert_eq!(p.observe("mydb", b, refused, t0), None);
        assert!(!p.is_ejected("mydb", b));
    }

    #[test]
    fn unknown_services_and_backends_are_ignored() {
        let (_, mut p) = passive(CONFIG);
        let refused = Outcome::Failure(FailureKind::Refused);
        let now = Instant::now();
        assert_eq!(p.observe("nope", sa("127.0.1.1:80"), refused, now), None);
        assert_eq!(p.observe("mydb", sa("127.9.9.9:80"), refused, now), None);
    }

    #[test]
    fn tiers_come_from_locality_so_the_cap_is_per_tier() {
        // 50% of a tier of two may eject one; the lone us-west backend (its own tier of
        // one) may eject none at 50%.
        let text = CONFIG.replace(
            "baseEjectionTime: 30s",
            "baseEjectionTime: 30s\n      maxEjectionPercent: 50",
        );
        let (_, mut p) = passive(&text);
        let now = Instant::now();
        let refused = Outcome::Failure(FailureKind::Refused);
        for b in ["127.0.1.1:80", "127.0.1.2:80", "127.0.2.1:80"] {
            p.observe("mydb", sa(b), refused, now);
            p.observe("mydb", sa(b), refused, now);
        }
        assert!(p.is_ejected("mydb", sa("127.0.1.1:80")));
        assert!(!p.is_ejected("mydb", sa("127.0.1.2:80")));
        assert!(!p.is_ejected("mydb", sa("127.0.2.1:80")));
        let state = p.state("mydb", sa("127.0.2.1:80")).unwrap();
        assert_ne!(
            state.tier,
            p.state("mydb", sa("127.0.1.1:80")).unwrap().tier
        );
    }

    #[test]
    fn a_reload_keeps_ejections_unless_the_policy_changed() {
        let (config, mut p) = passive(CONFIG);
        let now = Instant::now();
        let dead = sa("127.0.1.1:80");
        let refused = Outcome::Failure(FailureKind::Refused);
        p.observe("mydb", dead, refused, now);
        p.observe("mydb", dead, refused, now);
        p.sync(&config);
        assert!(p.is_ejected("mydb", dead), "same policy: ejection kept");
        let changed =
            config::parse(&CONFIG.replace("baseEjectionTime: 30s", "baseEjectionTime: 1m"))
                .unwrap();
        p.sync(&changed);
        assert!(!p.is_ejected("mydb", dead), "new policy: state starts over");
    }

    #[test]
    fn active_check_success_ends_an_ejection() {
        let (_, mut p) = passive(CONFIG);
        let now = Instant::now();
        let dead = sa("127.0.1.1:80");
        let refused = Outcome::Failure(FailureKind::Refused);
        p.observe("mydb", dead, refused, now);
        p.observe("mydb", dead, refused, now);
        assert_eq!(
            p.restore("mydb", dead, now),
            Some(Event::Restored { key: dead })
        );
        assert!(!p.is_ejected("mydb", dead));
        assert_eq!(p.restore("mydb", dead, now), None);
    }
}
