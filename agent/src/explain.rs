//! `detour explain`: why each endpoint of a frontend is, or is not, in the kernel's table.
//!
//! The explanation is read off the [`FrontendPlan`] the agent built the table from —
//! the tiers and loads `selection::select` chose, each endpoint's tier, health,
//! ejection, membership and standby, and the slot table itself — so it can never
//! disagree with what the kernel was given. What the plan does not hold (the last
//! check's error, when an ejection ends and why, the kernel's own suspect mark, the
//! table the kernel kept when the maps were full) comes in as [`Observed`].
//!
//! Invariants:
//! - pure: no I/O; the clock is an argument ([`explain`]'s `now`), for `ejected_until`;
//! - an endpoint's verdict is `in-table` exactly when the kernel's table has it
//!   ([`Observed::in_kernel_table`]); otherwise `standby` when it is usable
//!   ([`desired::serviceable`], weight > 0) and `out` when it is not;
//! - `share_percent` is the endpoint's count of slots over the table's length — the
//!   fraction of new connects the kernel sends it — and `None` only where the kernel
//!   keeps a table other than the plan's (a frontend the maps had no room for);
//! - the reason names every cause that keeps an endpoint out, not just the first.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::api::{EndpointExplanation, FrontendExplanation, TierLoad};
use crate::config::ServiceConfig;
use crate::desired::{self, FrontendPlan, PlannedEndpoint};
use crate::health::Health;
use crate::selection::{Spill, Tier};

/// What the agent knows of one endpoint besides its plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The last failed active check's error (kept while the check fails).
    pub last_error: Option<String>,
    /// Outlier detection's ejection, while ejected.
    pub ejection: Option<Ejection>,
    /// The kernel avoids the backend on its own after failures.
    pub suspect: bool,
    /// The kernel's table has it now. The plan's membership, except for a frontend the
    /// maps had no room for, whose kernel table is an older one (or none).
    pub in_kernel_table: bool,
}

/// An ongoing ejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    pub time_left: Duration,
    /// The failure that completed the run and the ejection's number, e.g.
    /// `refused, ejection 2`; `None` when the agent did not see it (an older ejection).
    pub cause: Option<String>,
}

/// The frontend's standing beside its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendFacts {
    /// The service's spill (`localityLbSetting.spill`), which decided the loads.
    pub spill: Spill,
    /// `OK`, or `NOT-PROGRAMMED: …` / `NOT-UPDATED: …` when the maps had no room.
    pub state: String,
    /// The maps had no room for this frontend's new table: the kernel keeps another.
    pub left_out: bool,
}

/// Explains `plan`: one entry per endpoint, in the plan's order. `observed` answers for
/// each endpoint; `now` dates the end of ejections.
pub fn explain(
    service: &ServiceConfig,
    plan: &FrontendPlan,
    facts: &FrontendFacts,
    observed: impl Fn(&PlannedEndpoint) -> Observed,
    now: SystemTime,
) -> FrontendExplanation {
    let panic = plan.tier == Some(Tier::Panic);
    let endpoints = plan
        .endpoints
        .iter()
        .map(|e| endpoint(service, plan, facts, e, &observed(e), now))
        .collect();
    FrontendExplanation {
        frontend: plan.frontend,
        tier: plan
            .tier
            .as_ref()
            .map_or_else(|| "none".to_owned(), ToString::to_string),
        panic,
        loads: plan
            .loads
            .iter()
            .map(|load| TierLoad {
                tier: load.tier.to_string(),
                percent: load.percent,
                panic: load.panic && load.tier != Tier::Panic,
            })
            .collect(),
        spill: match facts.spill {
            Spill::Strict => "strict".to_owned(),
            Spill::Gradual {
                overprovisioning_percent,
            } => format!("gradual (overprovisioning {overprovisioning_percent}%)"),
        },
        slots: plan.table.len(),
        standby_slots: plan.standby.len(),
        state: facts.state.clone(),
        endpoints,
    }
}

fn endpoint(
    service: &ServiceConfig,
    plan: &FrontendPlan,
    facts: &FrontendFacts,
    e: &PlannedEndpoint,
    observed: &Observed,
    now: SystemTime,
) -> EndpointExplanation {
    let panic = plan.tier == Some(Tier::Panic);
    let tier_load = plan.loads.iter().find(|load| load.tier == e.tier);
    let tier_percent = tier_load.map(|load| load.percent);
    let tier_panic = tier_load.is_some_and(|load| load.panic);
    let usable = desired::serviceable(e.health, e.ejected) && e.weight > 0;
    let share_percent = (!facts.left_out).then(|| share(&plan.table, e.target));
    let health_error = (e.health == Health::Unhealthy)
        .then(|| observed.last_error.clone())
        .flatten();
    let ejection = observed.ejection.as_ref().filter(|_| e.ejected);

    // Why it cannot serve, every cause.
    let mut against: Vec<String> = Vec::new();
    if e.health == Health::Unhealthy {
        against.push(match &health_error {
            Some(error) => format!("health check failing ({error})"),
            None => "health check failing".to_owned(),
        });
    }
    if e.ejected {
        against.push(match ejection {
            Some(ejection) => format!(
                "ejected by outlier detection for {}s more{}",
                ejection.time_left.as_millis().div_ceil(1000),
                ejection
                    .cause
                    .as_ref()
                    .map(|cause| format!(" ({cause})"))
                    .unwrap_or_default()
            ),
            None => "ejected by outlier detection".to_owned(),
        });
    }
    if e.weight == 0 {
        against.push("weight 0".to_owned());
    }

    let verdict = if observed.in_kernel_table {
        "in-table"
    } else if usable {
        "standby"
    } else {
        "out"
    };
    let mut reason = if observed.in_kernel_table && panic {
        let mut reason =
            "in table: panic, no endpoint of the service is usable so every one serves".to_owned();
        if !against.is_empty() {
            reason.push_str(&format!(" (this one: {})", against.join("; ")));
        }
        reason
    } else if observed.in_kernel_table && tier_panic {
        let mut reason = format!(
            "in table: tier {} in panic, fewer than minHealthPercent of its endpoints are \
             usable so every one serves ({}% of new connects)",
            e.tier,
            tier_percent.unwrap_or(0)
        );
        if !against.is_empty() {
            reason.push_str(&format!(" (this one: {})", against.join("; ")));
        }
        reason
    } else if observed.in_kernel_table && !e.in_table {
        // Only a frontend the maps had no room for: the kernel serves an older table.
        format!(
            "in table: the kernel keeps its previous table ({}); the plan now has it out",
            facts.state
        )
    } else if observed.in_kernel_table {
        let percent = tier_percent.unwrap_or(0);
        if Some(&e.tier) == plan.tier.as_ref() {
            format!(
                "in table: tier {} active ({percent}% of new connects)",
                e.tier
            )
        } else {
            format!(
                "in table: tier {} takes {percent}% of new connects, spilled from {}",
                e.tier,
                plan.tier
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), ToString::to_string)
            )
        }
    } else if facts.left_out && e.in_table {
        format!(
            "not in table: the maps have no room for this frontend ({})",
            facts.state
        )
    } else if !against.is_empty() {
        format!("not in table: {}", against.join("; "))
    } else if tier_percent.is_none() {
        let mut reason = format!("standby: tier {} not active", e.tier);
        if e.standby {
            reason.push_str(
                "; in the kernel's standby table, used when every backend of the table is suspect",
            );
        }
        reason
    } else {
        // Usable and its tier active, yet not a member: the table ran out of slots.
        format!(
            "not in table: tier {} active but the table has no slot left for it ({} slots)",
            e.tier,
            plan.table.len()
        )
    };
    if observed.in_kernel_table && share_percent == Some(0.0) && !facts.left_out {
        reason.push_str("; but it has no slot (the table is full)");
    }
    if observed.suspect && !e.ejected {
        reason.push_str("; the kernel avoids it for now after failed connects (suspect)");
    }

    EndpointExplanation {
        address: e.target,
        locality: e.locality(service),
        cluster: e.cluster(service).to_owned(),
        weight: e.weight,
        tier: e.tier.to_string(),
        tier_active: tier_percent.is_some(),
        tier_percent: tier_percent.unwrap_or(0),
        health: match e.health {
            Health::Healthy => "passing",
            Health::Unhealthy => "failing",
            Health::Unknown => "unknown",
            Health::Unchecked => "unchecked",
        }
        .to_owned(),
        health_error,
        ejected: e.ejected,
        ejected_for_ms: ejection
            .map(|j| u64::try_from(j.time_left.as_millis()).unwrap_or(u64::MAX)),
        ejected_until: ejection
            .map(|j| humantime::format_rfc3339_seconds(now + j.time_left).to_string()),
        ejection_cause: ejection.and_then(|j| j.cause.clone()),
        suspect: observed.suspect,
        verdict: verdict.to_owned(),
        in_table: observed.in_kernel_table,
        standby: e.standby,
        share_percent,
        reason,
    }
}

/// `target`'s slots over the table's length, in percent (0 for an empty table).
fn share(table: &[SocketAddr], target: SocketAddr) -> f64 {
    if table.is_empty() {
        return 0.0;
    }
    let slots = table.iter().filter(|&&slot| slot == target).count();
    slots as f64 * 100.0 / table.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    const MYDB: &str = r#"
node: { locality: us-east1/us-east1-b }
services:
  - name: mydb
    vips: [127.200.0.1]
    ports: [{number: 80, name: http}]
    endpoints:
      - {address: 127.0.1.1, ports: {http: 8080}, locality: us-east1/us-east1-b}
      - {address: 127.0.1.2, ports: {http: 8080}, locality: us-east1/us-east1-b}
      - {address: 127.0.2.1, ports: {http: 8080}, locality: us-east1/us-east1-c}
      - {address: 127.0.3.1, ports: {http: 8080}, locality: us-west/us-west-1a}
    localityLbSetting: {failover: [{from: us-east1, to: us-west}]}
"#;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn facts() -> FrontendFacts {
        FrontendFacts {
            spill: Spill::default(),
            state: "OK".into(),
            left_out: false,
        }
    }

    /// Plans `MYDB` with `down` failing its check and `ejected` ejected, then explains
    /// it with the plan's own membership as the kernel's.
    fn explained(down: &[&str], ejected: &[&str]) -> FrontendExplanation {
        explained_in(MYDB, down, ejected)
    }

    /// [`explained`] for another configuration.
    fn explained_in(yaml: &str, down: &[&str], ejected: &[&str]) -> FrontendExplanation {
        let cfg = config::parse(yaml).unwrap();
        let plans = desired::plan(
            &cfg,
            |_, t| {
                if down.contains(&t.to_string().as_str()) {
                    Health::Unhealthy
                } else {
                    Health::Healthy
                }
            },
            |_, t| ejected.contains(&t.to_string().as_str()),
        );
        explain(
            &cfg.services[0],
            &plans[0],
            &facts(),
            |e| Observed {
                last_error: Some("connect failed: Connection refused (os error 111)".into()),
                ejection: e.ejected.then(|| Ejection {
                    time_left: Duration::from_millis(59_200),
                    cause: Some("refused, ejection 1".into()),
                }),
                suspect: false,
                in_kernel_table: e.in_table,
            },
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )
    }

    fn reasons(x: &FrontendExplanation) -> Vec<(String, String, String)> {
        x.endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.verdict.clone(), e.reason.clone()))
            .collect()
    }

    fn row(addr: &str, verdict: &str, reason: &str) -> (String, String, String) {
        (addr.into(), verdict.into(), reason.into())
    }

    #[test]
    fn tiers_under_min_health_percent_say_they_panic() {
        let yaml = format!("{MYDB}    outlierDetection: {{minHealthPercent: 60}}\n");
        // Half the zone and nothing else usable: every tier is under 60% and together
        // they are short, so all are in panic and loaded by their number of endpoints.
        let x = explained_in(
            &yaml,
            &["127.0.1.1:8080", "127.0.2.1:8080", "127.0.3.1:8080"],
            &[],
        );
        assert!(!x.panic, "something is usable");
        let loads: Vec<(&str, u32, bool)> = x
            .loads
            .iter()
            .map(|l| (l.tier.as_str(), l.percent, l.panic))
            .collect();
        assert_eq!(
            loads,
            [
                ("same-zone", 50, true),
                ("same-region", 25, true),
                ("failover[0]:us-west", 25, true)
            ]
        );
        let failing = "health check failing (connect failed: Connection refused (os error 111))";
        let in_panic = |tier: &str, percent: u32, this_one: Option<&str>| {
            format!(
                "in table: tier {tier} in panic, fewer than minHealthPercent of its endpoints \
                 are usable so every one serves ({percent}% of new connects){}",
                this_one
                    .map(|why| format!(" (this one: {why})"))
                    .unwrap_or_default()
            )
        };
        assert_eq!(
            reasons(&x),
            [
                row(
                    "127.0.1.1:8080",
                    "in-table",
                    &in_panic("same-zone", 50, Some(failing))
                ),
                row(
                    "127.0.1.2:8080",
                    "in-table",
                    &in_panic("same-zone", 50, None)
                ),
                row(
                    "127.0.2.1:8080",
                    "in-table",
                    &in_panic("same-region", 25, Some(failing))
                ),
                row(
                    "127.0.3.1:8080",
                    "in-table",
                    &in_panic("failover[0]:us-west", 25, Some(failing))
                ),
            ]
        );
    }

    #[test]
    fn a_healthy_zone_leaves_the_others_on_standby() {
        let x = explained(&[], &[]);
        assert_eq!(x.tier, "same-zone");
        assert!(!x.panic);
        assert_eq!(
            x.loads,
            [TierLoad {
                tier: "same-zone".into(),
                percent: 100,
                panic: false
            }]
        );
        assert_eq!(
            reasons(&x),
            [
                row("127.0.1.1:8080", "in-table", "in table: tier same-zone active (100% of new connects)"),
                row("127.0.1.2:8080", "in-table", "in table: tier same-zone active (100% of new connects)"),
                row(
                    "127.0.2.1:8080",
                    "standby",
                    "standby: tier same-region not active; in the kernel's standby table, used when every backend of the table is suspect"
                ),
                row("127.0.3.1:8080", "standby", "standby: tier failover[0]:us-west not active"),
            ]
        );
        let shares: Vec<Option<f64>> = x.endpoints.iter().map(|e| e.share_percent).collect();
        assert_eq!(shares, [Some(50.0), Some(50.0), Some(0.0), Some(0.0)]);
    }

    #[test]
    fn a_failing_check_and_an_ejection_say_why_and_the_next_tier_takes_the_spill() {
        let x = explained(&["127.0.1.1:8080"], &[]);
        // One of two same-zone endpoints usable: Envoy's 1.4 × 50% = 70% stay there.
        assert_eq!(
            x.loads,
            [
                TierLoad {
                    tier: "same-zone".into(),
                    percent: 70,
                    panic: false
                },
                TierLoad {
                    tier: "same-region".into(),
                    percent: 30,
                    panic: false
                }
            ]
        );
        assert_eq!(
            reasons(&x)[..3],
            [
                row(
                    "127.0.1.1:8080",
                    "out",
                    "not in table: health check failing (connect failed: Connection refused (os error 111))"
                ),
                row("127.0.1.2:8080", "in-table", "in table: tier same-zone active (70% of new connects)"),
                row(
                    "127.0.2.1:8080",
                    "in-table",
                    "in table: tier same-region takes 30% of new connects, spilled from same-zone"
                ),
            ]
        );
        let shares: Vec<Option<f64>> = x.endpoints.iter().map(|e| e.share_percent).collect();
        assert_eq!(shares, [Some(0.0), Some(70.0), Some(30.0), Some(0.0)]);
        assert_eq!(x.endpoints[0].health, "failing");
        assert!(x.endpoints[0].tier_active);
        assert_eq!(x.endpoints[0].tier_percent, 70);
        assert!(!x.endpoints[3].tier_active);

        let x = explained(&["127.0.1.1:8080"], &["127.0.1.1:8080", "127.0.1.2:8080"]);
        let first = &x.endpoints[0];
        assert_eq!(
            first.reason,
            "not in table: health check failing (connect failed: Connection refused (os error 111)); \
             ejected by outlier detection for 60s more (refused, ejection 1)"
        );
        assert_eq!(first.ejected_until.as_deref(), Some("2027-01-15T08:00:59Z"));
        assert_eq!(first.ejected_for_ms, Some(59_200));
        assert_eq!(x.tier, "same-region");
        assert_eq!(
            x.endpoints[2].reason,
            "in table: tier same-region active (100% of new connects)"
        );
    }

    #[test]
    fn panic_puts_every_endpoint_in_and_says_so() {
        let all = [
            "127.0.1.1:8080",
            "127.0.1.2:8080",
            "127.0.2.1:8080",
            "127.0.3.1:8080",
        ];
        let x = explained(&all, &[]);
        assert!(x.panic);
        assert_eq!(x.tier, "panic");
        for e in &x.endpoints {
            assert_eq!(e.verdict, "in-table");
            assert_eq!(e.share_percent, Some(25.0));
            assert!(
                e.reason.starts_with(
                    "in table: panic, no endpoint of the service is usable so every one serves (this one: health check failing"
                ),
                "{}",
                e.reason
            );
        }
    }

    #[test]
    fn a_frontend_left_out_of_full_maps_says_so_and_claims_no_share() {
        let cfg = config::parse(MYDB).unwrap();
        let plans = desired::plan(&cfg, |_, _| Health::Healthy, |_, _| false);
        let facts = FrontendFacts {
            left_out: true,
            state: "NOT-PROGRAMMED: max-backends (3) reached".into(),
            ..facts()
        };
        let x = explain(
            &cfg.services[0],
            &plans[0],
            &facts,
            |_| Observed::default(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            x.endpoints[0].reason,
            "not in table: the maps have no room for this frontend (NOT-PROGRAMMED: max-backends (3) reached)"
        );
        assert_eq!(x.endpoints[0].verdict, "standby");
        assert_eq!(x.endpoints[0].share_percent, None);
    }

    #[test]
    fn a_suspect_backend_is_flagged_even_in_the_table() {
        let cfg = config::parse(MYDB).unwrap();
        let plans = desired::plan(&cfg, |_, _| Health::Unknown, |_, _| false);
        let x = explain(
            &cfg.services[0],
            &plans[0],
            &facts(),
            |e| Observed {
                suspect: e.target == sa("127.0.1.1:8080"),
                in_kernel_table: e.in_table,
                ..Observed::default()
            },
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(x.endpoints[0].health, "unknown");
        assert_eq!(
            x.endpoints[0].reason,
            "in table: tier same-zone active (100% of new connects); the kernel avoids it for now after failed connects (suspect)"
        );
        assert_eq!(x.spill, "gradual (overprovisioning 140%)");
    }
}
