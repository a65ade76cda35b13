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
//!   `in_table` are sets of targets, never sums over frontends;
//! - a service (the metrics' unit) lists every frontend's tier, is in panic when any
//!   tier of any frontend is, and counts the union of its ports' in-table targets;
//! - rows come in plan order (service by service, as the configuration lists them).
//!
//! Pure: no I/O. What the kernel's tables hold comes in as a function.

use std::collections::{BTreeSet, HashMap};
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
    /// Every target of the port.
    pub targets: BTreeSet<SocketAddr>,
    /// Targets not failing their active check and not ejected.
    pub usable: BTreeSet<SocketAddr>,
    /// Targets in the kernel table of at least one frontend.
    pub in_table: BTreeSet<SocketAddr>,
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

/// The service ports of `plans`, one row per (service, port).
pub fn ports<'a>(
    plans: impl IntoIterator<Item = &'a FrontendPlan>,
    in_table: impl Fn(&FrontendPlan, &PlannedEndpoint) -> bool,
) -> Vec<PortReport> {
    let mut rows: Vec<PortReport> = Vec::new();
    let mut row_of: HashMap<(&str, u16), usize> = HashMap::new();
    for plan in plans {
        let row = *row_of
            .entry((plan.service.as_str(), plan.port))
            .or_insert_with(|| {
                rows.push(PortReport {
                    service: plan.service.clone(),
                    port: plan.port,
                    ..PortReport::default()
                });
                rows.len() - 1
            });
        let r = &mut rows[row];
        r.frontends.push((plan.frontend, tier_name(plan)));
        r.panic |= plan.loads.iter().any(|load| load.panic);
        for e in &plan.endpoints {
            r.targets.insert(e.target);
            if e.health.usable() && !e.ejected {
                r.usable.insert(e.target);
            }
            if in_table(plan, e) {
                r.in_table.insert(e.target);
            }
        }
    }
    rows
}

/// One service, over all its ports and VIPs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceReport {
    pub service: String,
    /// Each frontend (`VIP:port`) and the best tier serving it.
    pub frontends: Vec<(SocketAddr, String)>,
    pub panic: bool,
    /// Targets in the kernel table of at least one frontend.
    pub in_table: BTreeSet<SocketAddr>,
}

/// The services of `ports`, one row per service.
#[must_use]
pub fn services(ports: &[PortReport]) -> Vec<ServiceReport> {
    let mut rows: Vec<ServiceReport> = Vec::new();
    for port in ports {
        // A service's ports are adjacent: plans go service by service.
        if rows.last().is_none_or(|r| r.service != port.service) {
            rows.push(ServiceReport {
                service: port.service.clone(),
                ..ServiceReport::default()
            });
        }
        let row = rows.last_mut().expect("pushed above");
        row.frontends.extend(port.frontends.iter().cloned());
        row.panic |= port.panic;
        row.in_table.extend(&port.in_table);
    }
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
        let ports = ports(&plans, |_, e| e.in_table);
        let counts: Vec<(&str, u16, usize, usize, usize, bool)> = ports
            .iter()
            .map(|p| {
                (
                    p.service.as_str(),
                    p.port,
                    p.targets.len(),
                    p.usable.len(),
                    p.in_table.len(),
                    p.panic,
                )
            })
            .collect();
        // Two VIPs: 2 targets, not 4. `thin`: one of three usable is under 50%, so
        // all three serve, in panic.
        assert_eq!(
            counts,
            [
                ("two-vips", 80, 2, 2, 2, false),
                ("two-ports", 80, 1, 1, 1, false),
                ("two-ports", 81, 1, 1, 1, false),
                ("thin", 80, 3, 1, 3, true),
            ]
        );
        assert_eq!(ports[0].tiers(), "other");
        let services = services(&ports);
        let rows: Vec<(&str, usize, usize, bool)> = services
            .iter()
            .map(|s| {
                (
                    s.service.as_str(),
                    s.frontends.len(),
                    s.in_table.len(),
                    s.panic,
                )
            })
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
}
