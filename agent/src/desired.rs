//! Desired state: the configured services plus what the health checks say → one plan per
//! frontend (VIP:port): its tiers and their loads, its members, and the slot tables the
//! kernel will serve: the primary table and the standby table it falls back to.
//!
//! Pure: no I/O, no clock. Invariants:
//! - every (VIP, port) of every service is one frontend with its own tables;
//! - a frontend's candidates are the service's endpoints of the VIP's address family, at
//!   the port the endpoint serves for that service port (`EndpointConfig::port_for`);
//! - the tables are `selection::slot_table` of `selection::select`'s members and standby
//!   members ([`slot_tables`]), so weights, tiers, spill and panic routing come from
//!   `selection` alone;
//! - the primary and standby tables together never exceed `MAX_SLOTS`;
//! - a frontend of a service that originates TLS ([`Via::Originator`]) gives the kernel
//!   a table of one slot, the originator's listener, or none while it has no listener:
//!   the kernel never sends such a connect straight to a backend.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use detour_ebpf::MAX_SLOTS;
use litemap::LiteMap;

use crate::config::{Config, EndpointConfig, Locality, ServiceConfig};
use crate::health::Health;
use crate::reconcile::{Desired, DesiredService, Passive, Table};
use crate::selection::{self, Balance, Candidate, Load, Selection, Tier};

/// The most slots a standby table may take; the primary table gets what is left of
/// `MAX_SLOTS`. A standby table only has to carry the first connections after a whole
/// tier dies, so a coarser weight resolution is fine there.
pub const MAX_STANDBY_SLOTS: usize = 256;

/// One endpoint of a frontend as the plan sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedEndpoint {
    pub target: SocketAddr,
    /// Its position in its service's `endpoints`, where its locality and cluster are
    /// (see [`PlannedEndpoint::config`]): a plan holds no copy of them, as at 100,000
    /// endpoints two strings each were a fifth of the plans' memory.
    pub endpoint: usize,
    pub weight: u32,
    pub health: Health,
    /// Ejected by passive health (outlier detection).
    pub ejected: bool,
    /// The tier the endpoint belongs to when healthy.
    pub tier: Tier,
    pub in_table: bool,
    /// In the standby table (never also in the primary table).
    pub standby: bool,
}

impl PlannedEndpoint {
    /// The endpoint's configuration, from the service it was planned from (`None` if
    /// `service` is another one, or a newer version with fewer endpoints).
    #[must_use]
    pub fn config<'a>(&self, service: &'a ServiceConfig) -> Option<&'a EndpointConfig> {
        service.endpoints.get(self.endpoint)
    }

    /// Its locality as text (`region/zone/subzone`), "" when unknown.
    #[must_use]
    pub fn locality(&self, service: &ServiceConfig) -> String {
        self.config(service)
            .map(|e| e.locality.to_string())
            .unwrap_or_default()
    }

    /// The cluster it runs in, "" when its source does not say.
    #[must_use]
    pub fn cluster<'a>(&self, service: &'a ServiceConfig) -> &'a str {
        self.config(service).map_or("", |e| &e.cluster)
    }
}

/// The plan of one frontend.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontendPlan {
    pub service: String,
    pub port: u16,
    pub frontend: SocketAddr,
    /// The best tier that receives traffic; `None` when the frontend has no endpoints.
    pub tier: Option<Tier>,
    /// The tiers that receive traffic, best first, with their percent (summing to 100)
    /// and whether they are in panic.
    pub loads: Vec<Load>,
    pub endpoints: Vec<PlannedEndpoint>,
    /// Shared with the reconciler's [`Table`] made from this plan.
    pub table: Arc<[SocketAddr]>,
    /// What the kernel picks from when every backend of `table` is suspect.
    pub standby: Arc<[SocketAddr]>,
    /// The kernel's passive-health parameters for this frontend.
    pub passive: Passive,
    /// How connects to the frontend reach the plan's backends.
    pub via: Via,
}

/// How connects to a frontend reach its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The kernel rewrites each connect to a backend of `table` (or `standby`).
    Kernel,
    /// The service originates TLS: the kernel rewrites connects to the agent's
    /// originator listening at `relay`, which picks from `table` and `standby` itself
    /// ([`crate::originator`]). `None` while the originator has no listener for the
    /// frontend: the kernel then leaves connects alone rather than send the application's
    /// plain bytes to a TLS port.
    Originator { relay: Option<SocketAddr> },
}

impl Via {
    /// What a service's frontends start as, before any relay is known.
    #[must_use]
    pub fn of(service: &ServiceConfig) -> Self {
        if service.tls.is_some() {
            Self::Originator { relay: None }
        } else {
            Self::Kernel
        }
    }
}

/// Whether selection may serve an endpoint with this active `health` that outlier
/// detection has or has not `ejected`: what [`plan_service`] hands selection as
/// `Candidate::healthy` (selection adds its own rule, weight > 0). `explain` reads the
/// same function, so its reasons are the plan's.
#[must_use]
pub fn serviceable(health: Health, ejected: bool) -> bool {
    health.usable() && !ejected
}

/// The kernel's passive-health parameters of a service.
pub fn passive_params(service: &ServiceConfig) -> Passive {
    let od = &service.outlier_detection;
    let settings = od.policy.settings();
    // The kernel marks suspect only what the agent could eject.
    let ejects = settings.consecutive_failures > 0 && settings.max_ejection_percent > 0;
    let ms = |d: std::time::Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    Passive {
        fail_threshold: if ejects {
            settings.consecutive_failures
        } else {
            0
        },
        suspect_ms: ms(settings.base_ejection_time),
        handshake_timeout_ms: ms(od.handshake_timeout),
    }
}

/// The primary and standby slot tables of a selection. The standby table is built first,
/// capped at [`MAX_STANDBY_SLOTS`]; the primary table is capped at `MAX_SLOTS` minus the
/// standby table's length, so the two together never exceed `MAX_SLOTS`.
#[must_use]
pub fn slot_tables<K: Clone>(selected: &Selection<K>) -> (Vec<K>, Vec<K>) {
    let standby = selection::slot_table(&selected.standby, MAX_STANDBY_SLOTS);
    let table = selection::slot_table(&selected.members, MAX_SLOTS as usize - standby.len());
    (table, standby)
}

/// The targets a service's endpoints are reached at, one per (endpoint, port) pair.
pub fn targets(service: &ServiceConfig) -> impl Iterator<Item = SocketAddr> + '_ {
    service.ports.iter().flat_map(move |port| {
        service
            .endpoints
            .iter()
            .map(move |ep| SocketAddr::new(ep.address, ep.port_for(port)))
    })
}

/// Plans every frontend of `config`; `health` (active checks) and `ejected` (outlier
/// detection) answer for (service, target). A target is usable when its active health
/// is usable and it is not ejected.
pub fn plan(
    config: &Config,
    health: impl Fn(&str, SocketAddr) -> Health,
    ejected: impl Fn(&str, SocketAddr) -> bool,
) -> Vec<FrontendPlan> {
    config
        .services
        .iter()
        .flat_map(|service| plan_service(config, service, &health, &ejected))
        .collect()
}

/// Plans the frontends of one service of `config` (its VIPs × ports, VIP-major within
/// a port), as [`plan`] does for all of them: a change to one service re-plans only it.
pub fn plan_service(
    config: &Config,
    service: &ServiceConfig,
    health: impl Fn(&str, SocketAddr) -> Health,
    ejected: impl Fn(&str, SocketAddr) -> bool,
) -> Vec<FrontendPlan> {
    // Exactly one plan per (port, VIP): a `Vec` grown by pushing holds room for four
    // (~500 bytes spare per service at 10,000 services of one frontend).
    let mut plans = Vec::with_capacity(service.ports.len() * service.vips.len());
    {
        let passive = passive_params(service);
        let balance = Balance {
            spill: service.locality_lb.spill,
            panic_threshold_percent: service
                .outlier_detection
                .policy
                .settings()
                .panic_threshold_percent,
        };
        for port in &service.ports {
            for vip in &service.vips {
                let same_family = |ip: &IpAddr| ip.is_ipv4() == vip.is_ipv4();
                let endpoints: Vec<(usize, &EndpointConfig)> = service
                    .endpoints
                    .iter()
                    .enumerate()
                    .filter(|(_, ep)| same_family(&ep.address))
                    .collect();
                // One health lookup per endpoint: the plan is rebuilt on every change.
                let healths: Vec<(SocketAddr, (Health, bool))> = endpoints
                    .iter()
                    .map(|(_, ep)| {
                        let target = SocketAddr::new(ep.address, ep.port_for(port));
                        let verdict = (
                            health(&service.name, target),
                            ejected(&service.name, target),
                        );
                        (target, verdict)
                    })
                    .collect();
                let candidates: Vec<Candidate<SocketAddr>> = endpoints
                    .iter()
                    .zip(&healths)
                    .map(|((_, ep), (target, (h, ejected)))| Candidate {
                        key: *target,
                        locality: Locality::clone(&ep.locality),
                        weight: ep.weight,
                        healthy: serviceable(*h, *ejected),
                        priority: config.priority_of(service, ep),
                    })
                    .collect();
                let selected = selection::select(
                    &config.node.locality,
                    &service.locality_lb,
                    balance,
                    &candidates,
                );
                let (table, standby) = slot_tables(&selected);
                let members: HashSet<SocketAddr> =
                    selected.members.iter().map(|(k, _)| *k).collect();
                let standbys: HashSet<SocketAddr> =
                    selected.standby.iter().map(|(k, _)| *k).collect();
                let planned = endpoints
                    .iter()
                    .zip(healths)
                    .map(
                        |((endpoint, ep), (target, (health, ejected)))| PlannedEndpoint {
                            target,
                            endpoint: *endpoint,
                            weight: ep.weight,
                            health,
                            ejected,
                            tier: selection::tier_of(
                                &config.node.locality,
                                &service.locality_lb,
                                &ep.locality,
                                config.priority_of(service, ep),
                            ),
                            in_table: members.contains(&target),
                            standby: standbys.contains(&target),
                        },
                    )
                    .collect();
                plans.push(FrontendPlan {
                    service: service.name.clone(),
                    port: port.number,
                    frontend: SocketAddr::new(*vip, port.number),
                    tier: selected.tier,
                    loads: selected.loads,
                    endpoints: planned,
                    table: table.into(),
                    standby: standby.into(),
                    passive,
                    via: Via::of(service),
                });
            }
        }
    }
    plans
}

/// What the reconciler should make the kernel serve: the plans grouped by service, in
/// the order of `plans` (the configuration's, which decides who gets the room when the
/// maps are full); each service with its frontends' tables and all its endpoints as
/// configured backends.
pub fn desired(plans: &[FrontendPlan]) -> Desired {
    // A service's plans are adjacent (`plan` goes service by service).
    let services = plans
        .chunk_by(|a, b| a.service == b.service)
        .map(|plans| desired_service(&plans[0].service, plans))
        .collect();
    Desired { services }
}

/// What one service's plans ask of the reconciler: [`desired`] for a single service.
#[must_use]
pub fn desired_service(name: &str, plans: &[FrontendPlan]) -> DesiredService {
    let mut service = DesiredService {
        name: name.to_owned(),
        // One table per plan, no spare room.
        tables: LiteMap::with_capacity(plans.len()),
        ..DesiredService::default()
    };
    for p in plans {
        add_plan(&mut service, p);
    }
    service
}

fn add_plan(service: &mut DesiredService, p: &FrontendPlan) {
    match p.via {
        Via::Kernel => {
            service.tables.insert(
                p.frontend,
                Table {
                    slots: p.table.clone(),
                    standby: p.standby.clone(),
                    passive: p.passive,
                },
            );
            service.add_backends(p.endpoints.iter().map(|e| e.target));
        }
        // The kernel only ever sends these connects to the originator; it judges no
        // backend of its own (no passive parameters), the originator reports outcomes.
        Via::Originator { relay } => {
            let relay: Vec<SocketAddr> = relay.into_iter().collect();
            service.add_backends(relay.iter().copied());
            service.tables.insert(p.frontend, Table::plain(relay));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::selection::LocalityTier;

    /// Plans with active health only: nothing ejected.
    fn plan_h(cfg: &Config, health: impl Fn(&str, SocketAddr) -> Health) -> Vec<FrontendPlan> {
        plan(cfg, health, |_, _| false)
    }

    const MYDB: &str = r#"
node: { locality: us-east1/us-east1-b }
services:
  - name: mydb
    vips: [127.200.0.1]
    ports: [{number: 80, name: http}]
    endpoints:
      - {address: 127.0.1.1, ports: {http: 8080}, locality: us-east1/us-east1-b}
      - {address: 127.0.1.2, ports: {http: 8080}, locality: us-east1/us-east1-c, weight: 3}
      - {address: 127.0.2.1, ports: {http: 8080}, locality: us-west/us-west-1a}
    localityLbSetting: {failover: [{from: us-east1, to: us-west}]}
"#;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn plans_follow_zone_then_region_then_failover() {
        let cfg = config::parse(MYDB).unwrap();
        let all_up = plan_h(&cfg, |_, _| Health::Healthy);
        assert_eq!(all_up.len(), 1);
        assert_eq!(all_up[0].frontend, sa("127.200.0.1:80"));
        assert_eq!(all_up[0].tier, Some(Tier::Local(LocalityTier::SameZone)));
        assert_eq!(all_up[0].table.to_vec(), vec![sa("127.0.1.1:8080")]);
        // The weight-3 endpoint alone needs one slot.
        assert_eq!(all_up[0].standby.to_vec(), vec![sa("127.0.1.2:8080")]);
        assert_eq!(
            all_up[0].loads,
            vec![Load {
                tier: Tier::Local(LocalityTier::SameZone),
                percent: 100,
                panic: false
            }]
        );
        assert!(all_up[0].endpoints[1].standby && !all_up[0].endpoints[1].in_table);

        let zone_down = plan_h(&cfg, |_, t| {
            if t == sa("127.0.1.1:8080") {
                Health::Unhealthy
            } else {
                Health::Healthy
            }
        });
        assert_eq!(
            zone_down[0].tier,
            Some(Tier::Local(LocalityTier::SameRegion))
        );
        assert_eq!(zone_down[0].table.to_vec(), vec![sa("127.0.1.2:8080")]);
        assert_eq!(zone_down[0].standby.to_vec(), vec![sa("127.0.2.1:8080")]);

        let east_down = plan_h(&cfg, |_, t| {
            if t.ip().to_string().starts_with("127.0.1.") {
                Health::Unhealthy
            } else {
                Health::Healthy
            }
        });
        assert!(matches!(
            east_down[0].tier,
            Some(Tier::Local(LocalityTier::Failover { position: 0, .. }))
        ));
        assert_eq!(east_down[0].table.to_vec(), vec![sa("127.0.2.1:8080")]);
        assert!(east_down[0].standby.is_empty());
        let west = &east_down[0].endpoints[2];
        assert!(west.in_table);
        assert!(!east_down[0].endpoints[0].in_table);

        let all_down = plan_h(&cfg, |_, _| Health::Unhealthy);
        assert_eq!(all_down[0].tier, Some(Tier::Panic));
        // Panic keeps every endpoint, weights included (3 slots for weight 3).
        assert_eq!(all_down[0].table.len(), 5);
        assert!(all_down[0].standby.is_empty());
        assert!(all_down[0].endpoints.iter().all(|e| !e.standby));
    }

    #[test]
    fn standby_and_primary_tables_share_max_slots() {
        let selected = Selection {
            tier: Some(Tier::Local(LocalityTier::SameZone)),
            loads: vec![Load {
                tier: Tier::Local(LocalityTier::SameZone),
                percent: 100,
                panic: false,
            }],
            members: (0..5000).map(|key| (key, 1)).collect(),
            standby: (5000..5300).map(|key| (key, 1)).collect(),
        };
        let (table, standby) = slot_tables(&selected);
        assert_eq!(standby.len(), MAX_STANDBY_SLOTS);
        assert_eq!(table.len(), MAX_SLOTS as usize - MAX_STANDBY_SLOTS);
        // A small standby table leaves the rest to the primary.
        let selected = Selection {
            standby: vec![(9999, 7)],
            ..selected
        };
        let (table, standby) = slot_tables(&selected);
        assert_eq!((table.len(), standby), (MAX_SLOTS as usize - 1, vec![9999]));
    }

    mod properties {
        use super::super::*;
        use crate::selection::tests::properties::{candidates, node, policy, spill};
        use proptest::prelude::*;

        proptest! {
            /// Each loaded tier's share of the primary table is its load, to within the
            /// table's resolution. Largest-remainder apportionment puts each member
            /// within one slot of its quota of the `budget` slots it had (raising a
            /// member to one slot takes less than a slot from the others in all), and
            /// reducing by the gcd keeps the shares; so a tier is off by less than N
            /// slots of `budget` (N members), plus the weights' own rounding to parts
            /// per million (2N ppm, see selection's properties). Tables that fit
            /// `budget` are exact but for that rounding.
            #[test]
            fn tables_carry_each_tier_its_load(candidates in candidates(), spill in spill()) {
                let (node, policy) = (node(), policy());
                let selected = selection::select(&node, &policy, spill, &candidates);
                let (table, standby) = slot_tables(&selected);
                prop_assert!(table.len() + standby.len() <= MAX_SLOTS as usize);
                prop_assert!(standby.len() <= MAX_STANDBY_SLOTS);
                prop_assert_eq!(table.is_empty(), candidates.is_empty());
                prop_assert!(table.iter().all(|key| !standby.contains(key)));
                if selected.tier == Some(Tier::Panic) {
                    return Ok(());
                }
                let budget = (MAX_SLOTS as usize - standby.len()) as f64;
                let n = selected.members.len() as f64;
                let tier = |key: usize| selection::tier_of(&node, &policy, &candidates[key].locality, 0);
                for Load { tier: loaded, percent: load, .. } in &selected.loads {
                    let slots = table.iter().filter(|&&key| tier(key) == *loaded).count();
                    let share = slots as f64 / table.len() as f64;
                    let error = (share - f64::from(*load) / 100.0).abs();
                    prop_assert!(error < n / budget + 2.0 * n / 1e6,
                        "{} has {} of {} slots for a load of {}%", loaded, slots, table.len(), load);
                }
            }
        }
    }

    #[test]
    fn unknown_health_is_served() {
        let cfg = config::parse(MYDB).unwrap();
        let plans = plan_h(&cfg, |_, _| Health::Unknown);
        assert_eq!(plans[0].tier, Some(Tier::Local(LocalityTier::SameZone)));
    }

    #[test]
    fn each_vip_family_gets_its_own_endpoints() {
        let cfg = config::parse(
            r#"
services:
  - name: dual
    vips: [127.200.0.9, "fd00::9"]
    ports: [{number: 443, name: https, targetPort: 8443}]
    endpoints:
      - {address: 127.0.9.1}
      - {address: "fd00::91"}
"#,
        )
        .unwrap();
        let d = desired(&plan_h(&cfg, |_, _| Health::Healthy));
        let t: std::collections::BTreeMap<_, _> = d
            .services
            .iter()
            .flat_map(|s| &s.tables)
            .map(|(k, v)| (*k, v.slots.to_vec()))
            .collect();
        let t = &t;
        assert_eq!(t[&sa("127.200.0.9:443")], vec![sa("127.0.9.1:8443")]);
        assert_eq!(t[&sa("[fd00::9]:443")], vec![sa("[fd00::91]:8443")]);
    }

    #[test]
    fn desired_groups_frontends_by_service_in_config_order() {
        // Admission goes by this order when the maps are full: the file's, not the
        // addresses'.
        let cfg = config::parse(
            r#"
services:
  - name: zeta
    vips: [127.200.0.9, 127.200.0.8]
    ports: [{number: 80}, {number: 81}]
    endpoints: [{address: 127.0.9.1}]
  - name: alpha
    vips: [127.200.0.1]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.1.1}, {address: 127.0.1.2}]
"#,
        )
        .unwrap();
        let d = desired(&plan_h(&cfg, |_, _| Health::Healthy));
        let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha"]);
        assert_eq!(d.services[0].tables.len(), 4);
        assert_eq!(
            d.services[1].backends.to_vec(),
            [sa("127.0.1.1:80"), sa("127.0.1.2:80")]
        );
    }

    #[test]
    fn empty_config_plans_nothing() {
        let cfg = config::parse("services: []").unwrap();
        assert!(plan_h(&cfg, |_, _| Health::Healthy).is_empty());
    }
}
