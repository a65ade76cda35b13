//! The plans of every service and the desired state built from them, kept between
//! applies so that a change re-plans only the services it touches: a health verdict,
//! an ejection or a one-service edit of the file costs one service's planning, not a
//! re-plan of 100,000.
//!
//! Invariants:
//! - `plans[i]` and `desired.services[i]` belong to the same service, and services are
//!   in config order (the reconciler admits services in that order when maps are full);
//! - a service's cached plan is the one [`desired::plan_service`] returns for the
//!   config, health and ejections the cache was last told about, with the relay of
//!   [`PlanCache::set_relays`] for a frontend that originates TLS: every change to any
//!   of them marks the service dirty (or everything, when the node's locality changes),
//!   and [`PlanCache::refresh`] re-plans exactly the dirty services;
//! - re-ordering after a reload moves cached entries, it never clones a table.
//!
//! Pure: no I/O; health and ejection come in as functions.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use crate::config::Config;
use crate::desired::{self, FrontendPlan};
use crate::health::Health;
use crate::reconcile::{Desired, DesiredService};

/// What must be re-planned at the next [`PlanCache::refresh`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dirty {
    /// Every service (first load, node locality changed).
    All,
    /// These services (by name); services no longer configured are dropped whatever
    /// this says.
    Services(BTreeSet<String>),
}

impl Default for Dirty {
    fn default() -> Self {
        Self::Services(BTreeSet::new())
    }
}

impl Dirty {
    pub fn mark(&mut self, service: &str) {
        if let Self::Services(set) = self {
            if !set.contains(service) {
                set.insert(service.to_owned());
            }
        }
    }

    pub fn mark_all(&mut self) {
        *self = Self::All;
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Services(set) if set.is_empty())
    }
}

/// Per-service plans and the reconciler's desired state, in config order.
#[derive(Debug, Default)]
pub struct PlanCache {
    plans: Vec<Vec<FrontendPlan>>,
    desired: Desired,
    position: HashMap<String, usize>,
    /// The config generation the order was last checked against: a refresh for the
    /// same configuration (a health flip) skips the O(services) order check.
    generation: Option<u64>,
    /// The originator's listener of each frontend that originates TLS
    /// ([`desired::Via::Originator`]).
    relays: HashMap<SocketAddr, SocketAddr>,
}

/// What a refresh re-planned: the services, in config order, and the plans their
/// frontends had before, for tier change events.
#[derive(Debug, Default)]
pub struct Refreshed {
    pub services: Vec<String>,
    pub previous: Vec<FrontendPlan>,
    /// Services were added, removed, re-ordered, or all re-planned: the change is not
    /// confined to the tables of the services listed.
    pub reshaped: bool,
}

impl Refreshed {
    /// When the change kept every service and each re-planned service's frontends (what
    /// the reconciler's scoped path needs), the endpoint targets the re-planned services
    /// named before and name no more; `None` otherwise. A health verdict or an ejection
    /// drops nothing; an EndpointSlice change drops the endpoints it removed.
    #[must_use]
    pub fn dropped_targets(&self, cache: &PlanCache) -> Option<Vec<SocketAddr>> {
        if self.reshaped {
            return None;
        }
        let mut dropped = BTreeSet::new();
        for name in &self.services {
            let before: Vec<&FrontendPlan> = self
                .previous
                .iter()
                .filter(|p| p.service == *name)
                .collect();
            let after = cache.service(name);
            let frontends_before: BTreeSet<SocketAddr> =
                before.iter().map(|p| p.frontend).collect();
            let frontends_after: BTreeSet<SocketAddr> = after.iter().map(|p| p.frontend).collect();
            if frontends_before != frontends_after {
                return None;
            }
            let targets_after: BTreeSet<SocketAddr> = after
                .iter()
                .flat_map(|p| p.endpoints.iter().map(|e| e.target))
                .collect();
            dropped.extend(
                before
                    .iter()
                    .flat_map(|p| p.endpoints.iter().map(|e| e.target))
                    .filter(|t| !targets_after.contains(t)),
            );
        }
        Some(dropped.into_iter().collect())
    }
}

impl PlanCache {
    /// Every frontend plan, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &FrontendPlan> {
        self.plans.iter().flatten()
    }

    /// The plans of one service.
    #[must_use]
    pub fn service(&self, name: &str) -> &[FrontendPlan] {
        self.position
            .get(name)
            .map_or(&[], |&at| self.plans[at].as_slice())
    }

    /// Where a service is in config order (its index in [`PlanCache::desired`]).
    #[must_use]
    pub fn position(&self, name: &str) -> Option<usize> {
        self.position.get(name).copied()
    }

    /// The desired state of every service, for the reconciler.
    #[must_use]
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Where the originator listens for each frontend that originates TLS. The caller
    /// marks the services whose listeners changed dirty, as for any other input.
    pub fn set_relays(&mut self, relays: HashMap<SocketAddr, SocketAddr>) {
        self.relays = relays;
    }

    /// Brings the cache in line with `config`: services are put in config order, those
    /// gone are dropped, new ones and the `dirty` ones are planned. `dirty` is left empty.
    /// `generation` names the configuration: the caller changes it whenever `config`
    /// is replaced, and only then is the order checked.
    pub fn refresh(
        &mut self,
        config: &Config,
        generation: u64,
        dirty: &mut Dirty,
        health: impl Fn(&str, SocketAddr) -> Health,
        ejected: impl Fn(&str, SocketAddr) -> bool,
    ) -> Refreshed {
        let (mut fresh, mut reshaped) = if self.generation == Some(generation) {
            (Vec::new(), false)
        } else {
            self.generation = Some(generation);
            self.reorder(config)
        };
        match std::mem::take(dirty) {
            Dirty::All => {
                fresh = (0..config.services.len()).collect();
                reshaped = true;
            }
            Dirty::Services(names) => {
                fresh.extend(names.iter().filter_map(|n| self.position.get(n).copied()));
                fresh.sort_unstable();
                fresh.dedup();
            }
        }
        let mut refreshed = Refreshed {
            reshaped,
            ..Refreshed::default()
        };
        for at in fresh {
            let service = &config.services[at];
            refreshed.services.push(service.name.clone());
            let mut plans = desired::plan_service(config, service, &health, &ejected);
            for plan in &mut plans {
                if let desired::Via::Originator { relay } = &mut plan.via {
                    *relay = self.relays.get(&plan.frontend).copied();
                }
            }
            self.desired.services[at] = desired::desired_service(&service.name, &plans);
            refreshed
                .previous
                .extend(std::mem::replace(&mut self.plans[at], plans));
        }
        refreshed
    }

    /// Puts cached services in `config`'s order and drops the rest; returns the
    /// positions of services that have no plan yet, and whether anything moved.
    fn reorder(&mut self, config: &Config) -> (Vec<usize>, bool) {
        let in_order = self.plans.len() == config.services.len()
            && config
                .services
                .iter()
                .enumerate()
                .all(|(at, s)| self.position.get(&s.name) == Some(&at));
        if in_order {
            return (Vec::new(), false);
        }
        let mut old_plans = std::mem::take(&mut self.plans);
        let mut old_desired = std::mem::take(&mut self.desired.services);
        let old_position = std::mem::take(&mut self.position);
        self.plans.reserve_exact(config.services.len());
        self.desired.services.reserve_exact(config.services.len());
        let mut unplanned = Vec::new();
        for (at, service) in config.services.iter().enumerate() {
            match old_position.get(&service.name) {
                Some(&was) => {
                    self.plans.push(std::mem::take(&mut old_plans[was]));
                    self.desired
                        .services
                        .push(std::mem::take(&mut old_desired[was]));
                }
                None => {
                    self.plans.push(Vec::new());
                    self.desired.services.push(DesiredService {
                        name: service.name.clone(),
                        ..DesiredService::default()
                    });
                    unplanned.push(at);
                }
            }
            self.position.insert(service.name.clone(), at);
        }
        (unplanned, true)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::config;

    fn config(yaml: &str) -> Config {
        config::parse(yaml).unwrap()
    }

    const TWO: &str = "
node: {locality: us-east1/us-east1-b}
services:
  - name: a
    vips: [127.200.0.1]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.1.1}, {address: 127.0.1.2}]
  - name: b
    vips: [127.200.0.2]
    ports: [{number: 80}, {number: 81}]
    endpoints: [{address: 127.0.2.1}]
";

    fn healthy(_: &str, _: SocketAddr) -> Health {
        Health::Healthy
    }

    fn never(_: &str, _: SocketAddr) -> bool {
        false
    }

    /// The cache always equals a full re-plan of the same inputs.
    fn assert_matches_full_plan(
        cache: &PlanCache,
        cfg: &Config,
        health: impl Fn(&str, SocketAddr) -> Health,
        ejected: impl Fn(&str, SocketAddr) -> bool,
    ) {
        let full = desired::plan(cfg, &health, &ejected);
        assert_eq!(cache.iter().cloned().collect::<Vec<_>>(), full);
        assert_eq!(cache.desired(), &desired::desired(&full));
    }

    #[test]
    fn a_first_refresh_plans_everything() {
        let cfg = config(TWO);
        let mut cache = PlanCache::default();
        let r = cache.refresh(&cfg, 0, &mut Dirty::All, healthy, never);
        assert_eq!(r.services, ["a", "b"]);
        assert_eq!(r.dropped_targets(&cache), None);
        assert!(r.previous.is_empty());
        assert_matches_full_plan(&cache, &cfg, healthy, never);
        assert_eq!(cache.service("b").len(), 2);
    }

    #[test]
    fn only_dirty_services_are_re_planned() {
        let cfg = config(TWO);
        let mut cache = PlanCache::default();
        cache.refresh(&cfg, 0, &mut Dirty::All, healthy, never);
        // 127.0.1.1 goes down; only `a` is marked.
        let down = |_: &str, t: SocketAddr| {
            if t.ip().to_string() == "127.0.1.1" {
                Health::Unhealthy
            } else {
                Health::Healthy
            }
        };
        let asked = Cell::new(0);
        let counting = |s: &str, t: SocketAddr| {
            asked.set(asked.get() + 1);
            down(s, t)
        };
        let mut dirty = Dirty::default();
        dirty.mark("a");
        let r = cache.refresh(&cfg, 0, &mut dirty, counting, never);
        assert_eq!(r.services, ["a"]);
        assert_eq!(asked.get(), 2, "only a's two endpoints were looked at");
        assert_eq!(r.previous.len(), 1);
        assert!(dirty.is_empty());
        assert_matches_full_plan(&cache, &cfg, down, never);
        assert_eq!(
            r.dropped_targets(&cache),
            Some(Vec::new()),
            "a health flip changes tables only"
        );
        // Nothing dirty: nothing planned.
        let r = cache.refresh(&cfg, 0, &mut Dirty::default(), down, never);
        assert!(r.services.is_empty());
    }

    #[test]
    fn a_reload_reorders_adds_and_drops_without_re_planning_the_rest() {
        let cfg = config(TWO);
        let mut cache = PlanCache::default();
        cache.refresh(&cfg, 0, &mut Dirty::All, healthy, never);
        // `b` first, `a` gone, `c` new.
        let next = config(
            "
node: {locality: us-east1/us-east1-b}
services:
  - name: b
    vips: [127.200.0.2]
    ports: [{number: 80}, {number: 81}]
    endpoints: [{address: 127.0.2.1}]
  - name: c
    vips: [127.200.0.3]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.3.1}]
",
        );
        let r = cache.refresh(&next, 1, &mut Dirty::default(), healthy, never);
        assert_eq!(r.services, ["c"], "only the new service is planned");
        assert_eq!(r.dropped_targets(&cache), None, "services came and went");
        assert_matches_full_plan(&cache, &next, healthy, never);
        assert!(cache.service("a").is_empty());
    }

    #[test]
    fn an_endpoint_change_keeps_the_frontends_and_names_what_it_dropped() {
        let cfg = config(TWO);
        let mut cache = PlanCache::default();
        cache.refresh(&cfg, 0, &mut Dirty::All, healthy, never);
        let moved = config(&TWO.replace("{address: 127.0.2.1}", "{address: 127.0.2.2}"));
        let mut dirty = Dirty::default();
        dirty.mark("b");
        let r = cache.refresh(&moved, 1, &mut dirty, healthy, never);
        assert_eq!(r.services, ["b"]);
        assert_eq!(
            r.dropped_targets(&cache),
            Some(vec![
                "127.0.2.1:80".parse().unwrap(),
                "127.0.2.1:81".parse().unwrap()
            ])
        );
        assert_eq!(cache.position("b"), Some(1));
        // A port more is a frontend more: not for the scoped path.
        let wider = config(&TWO.replace("{number: 81}", "{number: 81}, {number: 82}"));
        let mut dirty = Dirty::default();
        dirty.mark("b");
        let r = cache.refresh(&wider, 2, &mut dirty, healthy, never);
        assert_eq!(r.dropped_targets(&cache), None);
    }

    #[test]
    fn marking_all_wins_over_marks() {
        let mut dirty = Dirty::default();
        dirty.mark("a");
        dirty.mark_all();
        dirty.mark("b");
        assert_eq!(dirty, Dirty::All);
        assert!(!dirty.is_empty());
    }
}
