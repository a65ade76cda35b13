//! What the agent reports about its services and endpoints, computed once from the plans
//! and the kernel's tables for every place that shows it: `detour services`,
//! `detour endpoints` and the metrics. Those only render these rows (adding per-row
//! facts such as kernel counters), so they cannot count differently.
//!
//! Invariants:
//! - an endpoint is one (service, target), a target being a backend `ip:port`, however
//!   many VIPs and service ports lead to it; it is in the table when any of the
//!   service's frontends has it in its kernel table, and it carries the first plan
//!   (VIP, port) that has it, in plan order;
//! - a service port counts each target once over all its VIPs: `targets`, `usable` and
//!   `in_table` count distinct targets, never sums over frontends;
//! - a service (the metrics' unit) lists every frontend's tier, is in panic when any
//!   tier of any frontend is, and counts the union of its ports' in-table targets;
//! - rows come in plan order (service by service, as the configuration lists them).
//!
//! Pure: no I/O. What the kernel's tables hold comes in as a function.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::desired::{FrontendPlan, PlannedEndpoint};

/// One endpoint of one service, over all the frontends that reach it.
#[derive(Debug, Clone, Copy)]
pub struct EndpointReport<'a> {
    /// The first plan (frontend) that has the endpoint: its service, service port and
    /// tier are the endpoint's.
    pub plan: &'a FrontendPlan,
    pub endpoint: &'a PlannedEndpoint,
    /// In the kernel table of any of the service's frontends.
    pub in_table: bool,
}

/// The endpoints of `plans` (of `service` only, when given), one per (service, target).
pub fn endpoints<'a>(
    plans: impl IntoIterator<Item = &'a FrontendPlan>,
    service: Option<&str>,
    in_table: impl Fn(&FrontendPlan, &PlannedEndpoint) -> bool,
) -> Vec<EndpointReport<'a>> {
    let mut rows: Vec<EndpointReport<'a>> = Vec::new();
    // Row of each target of the current service; plans are grouped by service.
    let mut row_of: HashMap<SocketAddr, usize> = HashMap::new();
    for plan in plans {
        if service.is_some_and(|s| s != plan.service) {
            continue;
        }
        if rows.last().is_none_or(|r| r.plan.service != plan.service) {
            row_of.clear();
        }
        for e in &plan.endpoints {
            let here = in_table(plan, e);
            match row_of.get(&e.target) {
                Some(&row) => rows[row].in_table |= here,
                None => {
                    row_of.insert(e.target, rows.len());
                    rows.push(EndpointReport {
                        plan,
                        endpoint: e,
                        in_table: here,
                    });
                }
            }
        }
    }
    rows
}

/// One port of one service, over all its VIPs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortReport {
    pub service: String,
    pub port: u16,
    /// Each frontend (`VIP:port`) and the best tier serving it (`none` without
    /// endpoints).
    pub frontends: Vec<(SocketAddr, String)>,
    /// Some tier of some frontend serves every endpoint, usable or not.
    pub panic: bool,
    /// Distinct targets of the port.
    pub targets: usize,
    /// Of those, the targets not failing their active check and not ejected.
    pub usable: usize,
    /// Of those, the targets in the kernel table of at least one frontend.
    pub in_table: usize,
    /// The kernel's connects, summed over the distinct targets.
    pub connects: u64,
}

impl PortReport {
    /// The frontends' tiers, each once, in frontend order, joined with `,`.
    #[must_use]
    pub fn tiers(&self) -> String {
        let mut tiers: Vec<&str> = Vec::new();
        for (_, tier) in &self.frontends {
            if !tiers.contains(&tier.as_str()) {
                tiers.push(tier);
            }
        }
        tiers.join(",")
    }
}

/// One target as one frontend of a service has it, for counting distinct targets.
#[derive(Clone, Copy)]
struct Seen {
    port: u16,
    target: SocketAddr,
    usable: bool,
    in_table: bool,
}

/// Calls `each` with the plans of one service at a time (they are adjacent: plans go
/// service by service) and a scratch list of every (port, target) they have, sorted by
/// port then target, duplicates merged (usable, in table: in any frontend). The scratch
/// is reused, so counting never holds more than one service's targets: at 100,000
/// endpoints, sets of every target were ~15 MiB per `detour services` or scrape.
fn by_service<'a>(
    plans: impl IntoIterator<Item = &'a FrontendPlan>,
    in_table: impl Fn(&FrontendPlan, &PlannedEndpoint) -> bool,
    mut each: impl FnMut(&[&'a FrontendPlan], &[Seen]),
) {
    let mut group: Vec<&'a FrontendPlan> = Vec::new();
    let mut seen: Vec<Seen> = Vec::new();
    let mut flush = |group: &mut Vec<&'a FrontendPlan>, seen: &mut Vec<Seen>| {
        if group.is_empty() {
            return;
        }
        seen.sort_unstable_by_key(|s| (s.port, s.target));
        seen.dedup_by(|later, kept| {
            let same = later.port == kept.port && later.target == kept.target;
            if same {
                kept.usable |= later.usable;
                kept.in_table |= later.in_table;
            }
            same
        });
        each(group, seen);
        group.clear();
        seen.clear();
    };
    for plan in plans {
        if group.last().is_some_and(|g| g.service != plan.service) {
            flush(&mut group, &mut seen);
        }
        group.push(plan);
        seen.extend(plan.endpoints.iter().map(|e| Seen {
            port: plan.port,
            target: e.target,
            usable: e.health.usable() && !e.ejected,
            in_table: in_table(plan, e),
        }));
    }
    flush(&mut group, &mut seen);
}

/// The service ports of `plans`, one row per (service, port), with `connects` of each
/// distinct target summed.
pub fn ports<'a>(
    plans: impl IntoIterator<Item = &'a FrontendPlan>,
    in_table: impl Fn(&FrontendPlan, &PlannedEndpoint) -> bool,
    connects: impl Fn(&SocketAddr) -> u64,
) -> Vec<PortReport> {
    let mut rows: Vec<PortReport> = Vec::new();
    by_service(plans, in_table, |group, seen| {
        let first = rows.len();
        for plan in group {
            let at = match rows[first..].iter().position(|r| r.port == plan.port) {
                Some(at) => first + at,
                None => {
                    rows.push(PortReport {
                        service: plan.service.clone(),
                        port: plan.port,
                        ..PortReport::default()
                    });
                    rows.len() - 1
                }
            };
            let r = &mut rows[at];
            r.frontends.push((plan.frontend, tier_name(plan)));
            r.panic |= plan.loads.iter().any(|load| load.panic);
        }
        for s in seen {
            let r = rows[first..]
                .iter_mut()
                .find(|r| r.port == s.port)
                .expect("every port seen has a row");
            r.targets += 1;
            r.usable += usize::from(s.usable);
            r.in_table += usize::from(s.in_table);
            r.connects += connects(&s.target);
        }
    });
    rows
}

/// One service, over all its ports and VIPs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceReport {
    pub service: String,
    /// Each frontend (`VIP:port`) and the best tier serving it.
    pub frontends: Vec<(SocketAddr, String)>,
    pub panic: bool,
    /// Distinct targets in the kernel table of at least one frontend.
    pub in_table: usize,
}

/// The services of `plans`, one row per service.
#[must_use]
pub fn services<'a>(
    plans: impl IntoIterator<Item = &'a FrontendPlan>,
    in_table: impl Fn(&FrontendPlan, &PlannedEndpoint) -> bool,
) -> Vec<ServiceReport> {
    let mut rows: Vec<ServiceReport> = Vec::new();
    let mut targets: Vec<SocketAddr> = Vec::new();
    by_service(plans, in_table, |group, seen| {
        // One address on two service ports is one backend.
        targets.clear();
        targets.extend(seen.iter().filter(|s| s.in_table).map(|s| s.target));
        targets.sort_unstable();
        targets.dedup();
        rows.push(ServiceReport {
            service: group[0].service.clone(),
            frontends: group
                .iter()
                .map(|plan| (plan.frontend, tier_name(plan)))
                .collect(),
            panic: group
                .iter()
                .any(|plan| plan.loads.iter().any(|load| load.panic)),
            in_table: targets.len(),
        });
    });
    rows
}

/// The name of the best tier serving `plan`'s frontend, `none` without endpoints.
#[must_use]
pub fn tier_name(plan: &FrontendPlan) -> String {
    plan.tier
        .as_ref()
        .map_or_else(|| "none".to_string(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::desired;
    use crate::health::Health;

    const SHARED: &str = "
services:
  - name: two-vips
    vips: [127.200.0.1, 127.200.0.2]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.1.1}, {address: 127.0.1.2}]
  - name: two-ports
    vips: [127.200.0.3]
    ports: [{number: 80, targetPort: 8080}, {number: 81, targetPort: 8080}]
    endpoints: [{address: 127.0.1.3}]
  - name: thin
    vips: [127.200.0.4]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.1.4}, {address: 127.0.1.5}, {address: 127.0.1.6}]
    outlierDetection: {minHealthPercent: 50}
";

    fn plans() -> Vec<FrontendPlan> {
        let config = config::parse(SHARED).unwrap();
        let one_of_thin_up = |service: &str, target: SocketAddr| {
            if service == "thin" && target.ip().to_string() != "127.0.1.4" {
                Health::Unhealthy
            } else {
                Health::Healthy
            }
        };
        desired::plan(&config, one_of_thin_up, |_, _| false)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_endpoint_behind_two_vips_or_two_ports_is_one_row() {
        let plans = plans();
        let rows = endpoints(&plans, None, |_, e| e.in_table);
        let keys: Vec<(&str, u16, String)> = rows
            .iter()
            .map(|r| {
                (
                    r.plan.service.as_str(),
                    r.plan.port,
                    r.endpoint.target.to_string(),
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("two-vips", 80, "127.0.1.1:80".to_owned()),
                ("two-vips", 80, "127.0.1.2:80".to_owned()),
                ("two-ports", 80, "127.0.1.3:8080".to_owned()),
                ("thin", 80, "127.0.1.4:80".to_owned()),
                ("thin", 80, "127.0.1.5:80".to_owned()),
                ("thin", 80, "127.0.1.6:80".to_owned()),
            ]
        );
        let only: Vec<SocketAddr> = endpoints(&plans, Some("two-ports"), |_, e| e.in_table)
            .iter()
            .map(|r| r.endpoint.target)
            .collect();
        assert_eq!(only, [sa("127.0.1.3:8080")]);
    }

    #[test]
    fn in_table_means_any_frontend_has_it() {
        let plans = plans();
        // Only the second VIP's kernel table has 127.0.1.1 (the first was left out).
        let rows = endpoints(&plans, Some("two-vips"), |plan, e| {
            e.target != sa("127.0.1.1:80") || plan.frontend == sa("127.200.0.2:80")
        });
        assert!(rows.iter().all(|r| r.in_table), "{rows:?}");
        let rows = endpoints(&plans, Some("two-vips"), |_, e| {
            e.target != sa("127.0.1.1:80")
        });
        assert!(!rows[0].in_table);
    }

    #[test]
    fn ports_and_services_count_each_target_once() {
        let plans = plans();
        let connects = |t: &SocketAddr| u64::from(t.ip().to_string().ends_with(".3")) * 7;
        let ports = ports(&plans, |_, e| e.in_table, connects);
        let counts: Vec<(&str, u16, usize, usize, usize, bool, u64)> = ports
            .iter()
            .map(|p| {
                (
                    p.service.as_str(),
                    p.port,
                    p.targets,
                    p.usable,
                    p.in_table,
                    p.panic,
                    p.connects,
                )
            })
            .collect();
        // Two VIPs: 2 targets, not 4. `thin`: one of three usable is under 50%, so
        // all three serve, in panic. Connects are summed once per distinct target.
        assert_eq!(
            counts,
            [
                ("two-vips", 80, 2, 2, 2, false, 0),
                ("two-ports", 80, 1, 1, 1, false, 7),
                ("two-ports", 81, 1, 1, 1, false, 7),
                ("thin", 80, 3, 1, 3, true, 0),
            ]
        );
        assert_eq!(ports[0].tiers(), "other");
        let services = services(&plans, |_, e| e.in_table);
        let rows: Vec<(&str, usize, usize, bool)> = services
            .iter()
            .map(|s| (s.service.as_str(), s.frontends.len(), s.in_table, s.panic))
            .collect();
        // One address on two service ports is one backend.
        assert_eq!(
            rows,
            [
                ("two-vips", 2, 2, false),
                ("two-ports", 2, 1, false),
                ("thin", 1, 3, true)
            ]
        );
    }

    #[test]
    fn a_target_in_one_vips_table_only_counts_in_table_once() {
        let plans = plans();
        // 127.0.1.1 is in the second VIP's table only; 127.0.1.2 in both.
        let in_table = |plan: &FrontendPlan, e: &PlannedEndpoint| {
            e.target != sa("127.0.1.1:80") || plan.frontend == sa("127.200.0.2:80")
        };
        let ports = ports(&plans, in_table, |_| 0);
        assert_eq!((ports[0].targets, ports[0].in_table), (2, 2));
        let none = |_: &FrontendPlan, e: &PlannedEndpoint| e.target != sa("127.0.1.1:80");
        let ports = self::ports(&plans, none, |_| 0);
        assert_eq!((ports[0].targets, ports[0].in_table), (2, 1));
        assert_eq!(services(&plans, none)[0].in_table, 1);
    }
}
