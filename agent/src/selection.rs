//! Which backends go in a service's table: health + locality policy → how much of the
//! traffic each tier takes and which endpoints serve it, then members → a weighted slot
//! table the kernel picks from in O(1).
//!
//! This is Istio/Envoy locality load balancing. Tiers, best first: same zone, same region,
//! each failover target in order, then everything else; they play the part of Envoy's
//! priorities. The service's [`Balance`] says how traffic moves down the tiers: strictly
//! (all of it to the best tier with a usable endpoint) or gradually (Envoy's priority
//! load, see [`Spill::Gradual`]), and when a tier gives up on health and serves all of
//! its endpoints (Envoy's panic threshold, see [`Balance::panic_threshold_percent`]). An
//! endpoint is usable when healthy with weight > 0.
//!
//! Invariants:
//! - every endpoint belongs to exactly one tier, the best it qualifies for, and that
//!   tier depends only on localities and policy, never on health ([`tier_of`]);
//! - `loads` lists the tiers that receive traffic, best first, with whole percents
//!   that sum to exactly 100. Strict: the best tier with a usable endpoint, 100.
//!   Gradual: Envoy's priority load over the tiers present (`priority_loads`), or
//!   strict when every tier's health rounds down to 0; in total panic (every tier in
//!   panic) Envoy's load by endpoint count instead (`total_panic_loads`). Outside
//!   total panic only tiers with a usable endpoint receive traffic;
//! - a tier is in panic when the tiers together are short (their normalised health,
//!   Envoy's, is below 100%) and its own share of usable endpoints is below the panic
//!   threshold; a panic threshold of 0 puts no tier in panic;
//! - `tier` is the first tier in `loads`;
//! - the members are, for each tier in `loads`, best first: its usable endpoints, or
//!   when the tier is in panic all of its endpoints of weight > 0, usable or not; in
//!   candidate order within a tier. With one tier in `loads` they keep the endpoints'
//!   weights; with several, a member's share of the total weight is its tier's load ×
//!   its weight / its tier's members' weight: exactly when the reduced integers fit in
//!   a `u32`, else to the nearest part per million (at least 1);
//! - the standby members are the usable endpoints, with their weights and in candidate
//!   order, of the first tier after the last tier in `loads` that has one; empty when
//!   there is none and in [`Tier::Panic`]. They are never members;
//! - a service with endpoints is never black-holed: when none is usable, the tier is
//!   [`Tier::Panic`] with load 100 and every endpoint is a member, whatever the panic
//!   threshold;
//! - [`slot_table`] is deterministic, never longer than `max_slots`, and gives every
//!   member with weight > 0 at least one slot as long as they fit.
//!
//! Pure: no I/O, no clock, no randomness.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::Arc;

use crate::config::{Locality, LocalityLbSetting};

/// One endpoint as selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<K> {
    /// Whatever the caller uses to name the backend; handed back in the result.
    pub key: K,
    pub locality: Locality,
    /// 0 means "send nothing while anything else is usable".
    pub weight: u32,
    pub healthy: bool,
    /// Envoy's priority (the endpoint's `priority`): 0 is best; see [`Tier::Priority`].
    pub priority: u32,
}

/// Where an endpoint stands in the failover order. Ordered best first: every locality
/// tier of priority 0, then each higher priority's, then panic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// An endpoint of priority 0 (the default), by its locality.
    Local(LocalityTier),
    /// An endpoint of priority `priority` > 0, in its locality tier `within`. Every
    /// tier of a lower priority comes first, as Envoy's priority levels: a
    /// FailoverService's second backing service serves only when its first leaves
    /// traffic over, whatever their localities.
    Priority { priority: u32, within: LocalityTier },
    /// Not a locality: nothing was usable, so every endpoint is used.
    Panic,
}

/// Where an endpoint stands by locality alone, best first. Its own type, so that a
/// priority tier holds one without a box and is never itself a priority or panic tier.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LocalityTier {
    /// Same region and zone as the node.
    SameZone,
    /// Same region as the node, another zone.
    SameRegion,
    /// Matches the failover target at `position` in [`failover_targets`].
    Failover {
        position: u32,
        target: Arc<Locality>,
    },
    /// Anywhere else, including endpoints with no locality.
    Other,
}

impl fmt::Display for LocalityTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SameZone => f.write_str("same-zone"),
            Self::SameRegion => f.write_str("same-region"),
            Self::Failover { position, target } => write!(f, "failover[{position}]:{target}"),
            Self::Other => f.write_str("other"),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(tier) => tier.fmt(f),
            Self::Priority { priority, within } => write!(f, "priority[{priority}]/{within}"),
            Self::Panic => f.write_str("panic"),
        }
    }
}

/// How traffic moves from one tier to the next as the better tier loses backends.
/// Chosen per service (`localityLbSetting.spill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spill {
    /// A tier takes all traffic until it has no usable backend left.
    Strict,
    /// Envoy's priority load: a tier keeps `min(100%, factor × usable share)` of the
    /// traffic and the rest spills to the next tiers. `overprovisioning_percent` is
    /// Envoy's `overprovisioning_factor` (140 = 1.4), at least 100.
    Gradual { overprovisioning_percent: u32 },
}

impl Default for Spill {
    /// Envoy's and Istio's default: gradual with a factor of 1.4.
    fn default() -> Self {
        Self::Gradual {
            overprovisioning_percent: 140,
        }
    }
}

/// How a service spreads its traffic over its tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Balance {
    /// How traffic moves from one tier to the next (`localityLbSetting.spill`).
    pub spill: Spill,
    /// Envoy's `healthy_panic_threshold`, Istio's `minHealthPercent`, 0..=100; 0 (the
    /// default) turns it off. A tier whose share of usable endpoints is strictly below
    /// it serves all of its endpoints, usable or not ([`Load::panic`]), but only while
    /// the tiers together are short: when the other tiers can take the traffic, a tier
    /// that is mostly down fails over instead, as in Envoy. "Short" is Envoy's
    /// normalised health below 100%: Σ min(100, ⌊factor × usable_i / endpoints_i⌋) over
    /// the tiers, factor the gradual spill's overprovisioning (1.0 when strict).
    ///
    /// When every tier is in panic, a gradual spill loads the tiers by their number of
    /// endpoints of weight > 0 (Envoy's "total panic"); a strict spill keeps all
    /// traffic on the best tier with a usable endpoint, now serving all of its
    /// endpoints.
    pub panic_threshold_percent: u32,
}

impl From<Spill> for Balance {
    /// `spill` with no panic threshold.
    fn from(spill: Spill) -> Self {
        Self {
            spill,
            panic_threshold_percent: 0,
        }
    }
}

/// One tier that receives traffic, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub tier: Tier,
    /// Percent of the service's traffic, 1..=100.
    pub percent: u32,
    /// The tier serves all of its endpoints of weight > 0, usable or not: it is in
    /// panic (see [`Balance::panic_threshold_percent`]), or it is [`Tier::Panic`].
    pub panic: bool,
}

/// The outcome for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection<K> {
    /// The best tier that receives traffic, [`Tier::Panic`] when nothing is usable, `None`
    /// when the service has no endpoints at all.
    pub tier: Option<Tier>,
    /// The tiers that receive traffic, best first, with their percent of it; the
    /// percents sum to 100 (empty when there are no endpoints).
    pub loads: Vec<Load>,
    /// Key and effective weight of each member: grouped by tier best first, in candidate
    /// order within a tier. See the module invariants for how weights are scaled.
    pub members: Vec<(K, u32)>,
    /// Key and weight of each usable endpoint of the next tier after those receiving
    /// traffic, for the kernel to fall back to when it finds every member suspect.
    pub standby: Vec<(K, u32)>,
}

impl<K> fmt::Display for Selection<K> {
    /// The tier's name, or `none` when there are no endpoints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tier {
            Some(tier) => tier.fmt(f),
            None => f.write_str("none"),
        }
    }
}

/// Where to go after the node's region, in order: the `to` of each `failover` rule whose
/// `from` contains the node's locality, then each `failoverOrder` entry. A target listed
/// twice keeps its first position. With locality LB disabled there are none.
#[must_use]
pub fn failover_targets(node: &Locality, policy: &LocalityLbSetting) -> Vec<Arc<Locality>> {
    if !policy.enabled {
        return Vec::new();
    }
    // A rule's `from` is never empty in a validated config; an empty node locality
    // therefore matches no rule, as it should.
    let from_rules = policy
        .failover
        .iter()
        .filter(|rule| !node.is_empty() && rule.from.contains(node))
        .map(|rule| &rule.to);
    let mut targets: Vec<Arc<Locality>> = Vec::new();
    for target in from_rules.chain(&policy.failover_order) {
        if !targets.iter().any(|t| **t == *target) {
            targets.push(Arc::new(target.clone()));
        }
    }
    targets
}

/// The tier `endpoint` belongs to when healthy (never [`Tier::Panic`]); what the CLI
/// shows to explain why a backend is or is not chosen.
#[must_use]
pub fn tier_of(
    node: &Locality,
    policy: &LocalityLbSetting,
    endpoint: &Locality,
    priority: u32,
) -> Tier {
    classify(
        node,
        policy,
        &failover_targets(node, policy),
        endpoint,
        priority,
    )
}

fn classify(
    node: &Locality,
    policy: &LocalityLbSetting,
    targets: &[Arc<Locality>],
    endpoint: &Locality,
    priority: u32,
) -> Tier {
    let within = classify_locality(node, policy, targets, endpoint);
    if priority == 0 {
        Tier::Local(within)
    } else {
        Tier::Priority { priority, within }
    }
}

fn classify_locality(
    node: &Locality,
    policy: &LocalityLbSetting,
    targets: &[Arc<Locality>],
    endpoint: &Locality,
) -> LocalityTier {
    if !policy.enabled {
        return LocalityTier::Other;
    }
    let same_region = !node.region.is_empty() && endpoint.region == node.region;
    if same_region && !node.zone.is_empty() && endpoint.zone == node.zone {
        return LocalityTier::SameZone;
    }
    if same_region {
        return LocalityTier::SameRegion;
    }
    // Targets are never empty in a validated config; an empty one would match all.
    targets
        .iter()
        .position(|target| target.contains(endpoint))
        .map_or(LocalityTier::Other, |position| LocalityTier::Failover {
            // At most a few targets: a failover list is written by hand.
            position: u32::try_from(position).unwrap_or(u32::MAX),
            target: targets[position].clone(),
        })
}

/// Chooses the tiers, their loads, members and standby for one service. See the module
/// invariants.
#[must_use]
pub fn select<K: Clone>(
    node: &Locality,
    policy: &LocalityLbSetting,
    balance: impl Into<Balance>,
    candidates: &[Candidate<K>],
) -> Selection<K> {
    let Balance {
        spill,
        panic_threshold_percent,
    } = balance.into();
    if candidates.is_empty() {
        return Selection {
            tier: None,
            loads: Vec::new(),
            members: Vec::new(),
            standby: Vec::new(),
        };
    }
    let targets = failover_targets(node, policy);
    let tiers: Vec<Tier> = candidates
        .iter()
        .map(|candidate| {
            classify(
                node,
                policy,
                &targets,
                &candidate.locality,
                candidate.priority,
            )
        })
        .collect();
    // The tiers present, best first; `level[c]` is candidate c's index into them.
    let mut present = tiers.clone();
    present.sort();
    present.dedup();
    let level: Vec<usize> = tiers
        .iter()
        .map(|tier| present.partition_point(|other| other < tier))
        .collect();
    let usable = |candidate: &Candidate<K>| candidate.healthy && candidate.weight > 0;
    let mut hosts = vec![0; present.len()];
    let mut usable_hosts = vec![0; present.len()];
    let mut weighted_hosts = vec![0; present.len()];
    for (candidate, &at) in candidates.iter().zip(&level) {
        hosts[at] += 1;
        usable_hosts[at] += u64::from(usable(candidate));
        weighted_hosts[at] += u64::from(candidate.weight > 0);
    }
    let member = |candidate: &Candidate<K>| (candidate.key.clone(), candidate.weight);
    let Some(best) = usable_hosts.iter().position(|&count| count > 0) else {
        // Sending to backends that may be down beats refusing every connection.
        return Selection {
            tier: Some(Tier::Panic),
            loads: vec![Load {
                tier: Tier::Panic,
                percent: 100,
                panic: true,
            }],
            members: candidates.iter().map(member).collect(),
            standby: Vec::new(),
        };
    };
    let overprovisioning_percent = match spill {
        Spill::Strict => 100,
        Spill::Gradual {
            overprovisioning_percent,
        } => overprovisioning_percent,
    };
    let health = tier_health(&hosts, &usable_hosts, overprovisioning_percent);
    let short = health.iter().sum::<u64>() < 100;
    let panic: Vec<bool> = hosts
        .iter()
        .zip(&usable_hosts)
        .map(|(&hosts, &usable)| short && usable * 100 < u64::from(panic_threshold_percent) * hosts)
        .collect();
    let strict = || {
        let mut strict = vec![0; present.len()];
        strict[best] = 100;
        strict
    };
    let loads = match spill {
        Spill::Strict => strict(),
        Spill::Gradual { .. } if panic.iter().all(|&p| p) => total_panic_loads(&weighted_hosts),
        Spill::Gradual { .. } => priority_loads(&health).unwrap_or_else(strict),
    };
    // Tier `at`'s usable endpoints, or with `all` every one of weight > 0.
    let endpoints_of = |at: usize, all: bool| -> Vec<(K, u32)> {
        candidates
            .iter()
            .zip(&level)
            .filter(|&(candidate, &of)| {
                of == at && (usable(candidate) || all && candidate.weight > 0)
            })
            .map(|(candidate, _)| member(candidate))
            .collect()
    };
    let members_of = |at: usize| endpoints_of(at, panic[at]);
    let loaded: Vec<usize> = (0..present.len()).filter(|&at| loads[at] > 0).collect();
    let members = match loaded[..] {
        [only] => members_of(only),
        _ => spread(
            loaded
                .iter()
                .map(|&at| (loads[at], members_of(at)))
                .collect(),
        ),
    };
    let after = loaded.last().map_or(present.len(), |&last| last + 1);
    let standby = (after..present.len())
        .find(|&at| usable_hosts[at] > 0)
        .map_or_else(Vec::new, |at| endpoints_of(at, false));
    Selection {
        tier: loaded.first().map(|&at| present[at].clone()),
        loads: loaded
            .iter()
            .map(|&at| Load {
                tier: present[at].clone(),
                percent: loads[at],
                panic: panic[at],
            })
            .collect(),
        members,
        standby,
    }
}

/// Envoy's health of each tier: min(100, ⌊factor × usable_i / hosts_i⌋), factor in
/// percent (140 = 1.4), counting endpoints, not weights; a weight-0 or unhealthy
/// endpoint is a host but not usable. Their sum, capped at 100, is Envoy's normalised
/// total health (`calculateNormalizedTotalAvailability`).
fn tier_health(hosts: &[u64], usable: &[u64], overprovisioning_percent: u32) -> Vec<u64> {
    hosts
        .iter()
        .zip(usable)
        .map(|(&hosts, &usable)| {
            (u64::from(overprovisioning_percent) * usable)
                .checked_div(hosts)
                .map_or(0, |health| health.min(100))
        })
        .collect()
}

/// Envoy's priority load over tiers best first, from their [`tier_health`], in whole
/// percents summing to 100, or `None` when every tier's health is 0. Follows Envoy's
/// `LoadBalancerBase::recalculatePerPriorityState` and `distributeLoad`
/// (`source/common/upstream/load_balancer_impl.cc`), integer arithmetic included:
///
/// - normalised = min(100, Σ health_i);
/// - load_i = min(remaining, ⌊health_i × 100 / normalised⌋), best tier first, so when
///   the tiers together are short of 100 each keeps its proportion of the traffic;
/// - what the floors leave over goes to the first tier with health > 0.
///
/// Envoy has no traffic to place at a total health of 0 and enters panic; detour still
/// has usable endpoints then (at most 1% of a large tier each), and the caller falls
/// back to strict rather than send traffic to endpoints it knows are down.
fn priority_loads(health: &[u64]) -> Option<Vec<u32>> {
    let normalised = health.iter().sum::<u64>().min(100);
    let first = health.iter().position(|&h| h > 0)?;
    let mut remaining = 100;
    let mut loads: Vec<u32> = health
        .iter()
        .map(|&h| {
            let load = remaining.min(h * 100 / normalised);
            remaining -= load;
            // At most 100, so the cast is exact.
            load as u32
        })
        .collect();
    loads[first] += remaining as u32;
    Some(loads)
}

/// Envoy's load when every tier is in panic (`recalculateLoadInTotalPanic`): each tier
/// ⌊100 × endpoints_i / Σ endpoints⌋ percent, what the floors leave over to the first
/// tier with an endpoint. detour counts endpoints of weight > 0 only (Envoy has no
/// weight 0): a drained endpoint takes nothing while another can. The caller has a
/// usable endpoint, so the sum is never 0.
fn total_panic_loads(weighted_hosts: &[u64]) -> Vec<u32> {
    let total = weighted_hosts.iter().sum::<u64>().max(1);
    // At most 100 each, so the casts are exact.
    let mut loads: Vec<u32> = weighted_hosts
        .iter()
        .map(|&hosts| (100 * hosts / total) as u32)
        .collect();
    let remaining = 100 - loads.iter().sum::<u32>();
    if let Some(first) = weighted_hosts.iter().position(|&hosts| hosts > 0) {
        loads[first] += remaining;
    }
    loads
}

/// Members of several tiers, each tier given as its load and its usable members, with
/// weights whose shares are load × weight / the tier's weight sum. Exact when those
/// integers, divided by their gcd, fit in a `u32`; else parts per million of the
/// traffic, rounded to nearest, at least 1 so that no member loses its slot.
fn spread<K>(tiers: Vec<(u32, Vec<(K, u32)>)>) -> Vec<(K, u32)> {
    let sums: Vec<u128> = tiers
        .iter()
        .map(|(_, members)| members.iter().map(|(_, w)| u128::from(*w)).sum())
        .collect();
    let weights = exact_weights(&tiers, &sums).unwrap_or_else(|| {
        tiers
            .iter()
            .zip(&sums)
            .flat_map(|((load, members), &sum)| {
                members.iter().map(move |(_, weight)| {
                    let ppm = u128::from(*load) * 10_000 * u128::from(*weight);
                    // ≤ 1_000_000 since weight ≤ sum and load ≤ 100.
                    ((2 * ppm + sum) / (2 * sum)).max(1) as u32
                })
            })
            .collect()
    });
    tiers
        .into_iter()
        .flat_map(|(_, members)| members)
        .zip(weights)
        .map(|((key, _), weight)| (key, weight))
        .collect()
}

/// load × weight × (lcm of the sums / the tier's sum), divided by the gcd of all; `None`
/// on overflow or when a result does not fit in a `u32`.
fn exact_weights<K>(tiers: &[(u32, Vec<(K, u32)>)], sums: &[u128]) -> Option<Vec<u32>> {
    let lcm = sums.iter().try_fold(1u128, |lcm, &sum| {
        (lcm / wide_gcd(lcm, sum)).checked_mul(sum)
    })?;
    let mut weights = Vec::new();
    for ((load, members), &sum) in tiers.iter().zip(sums) {
        let scale = (lcm / sum).checked_mul(u128::from(*load))?;
        for (_, weight) in members {
            weights.push(scale.checked_mul(u128::from(*weight))?);
        }
    }
    let divisor = weights.iter().copied().fold(0, wide_gcd).max(1);
    weights
        .into_iter()
        .map(|weight| u32::try_from(weight / divisor).ok())
        .collect()
}

fn wide_gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Expands members into a table of at most `max_slots` keys, for a uniform random
/// (or sequential) index to pick from.
///
/// - Each member's share of slots is as close as possible to its share of the total
///   weight: weights are divided by their gcd first (`[3, 1]` gives 4 slots, all-equal
///   weights one slot each); when that is still more than `max_slots`, slots are
///   apportioned by largest remainder, each member keeping at least one, and the
///   result is reduced by its gcd again.
/// - Members with weight 0 get no slot, unless every member has weight 0 (as in a
///   [`Tier::Panic`] of drained endpoints): then all count as equal, so the table is
///   only empty when `members` is or `max_slots` is 0.
/// - When more members have weight > 0 than `max_slots`, the first `max_slots` of them,
///   in the given order, get one slot each and the rest none: the kernel table has a
///   fixed size and candidate order is the caller's preference.
/// - Slots are interleaved, not grouped: at every prefix of the table each member's
///   count is within 1 of its exact share, so a sequential index spreads too.
/// - Same input, same table.
#[must_use]
pub fn slot_table<K: Clone>(members: &[(K, u32)], max_slots: usize) -> Vec<K> {
    let mut weighted: Vec<(&K, u64)> = members
        .iter()
        .filter(|(_, weight)| *weight > 0)
        .map(|(key, weight)| (key, u64::from(*weight)))
        .collect();
    if weighted.is_empty() {
        weighted = members.iter().map(|(key, _)| (key, 1)).collect();
    }
    weighted.truncate(max_slots);
    if weighted.is_empty() {
        return Vec::new();
    }
    let weights: Vec<u64> = weighted.iter().map(|(_, weight)| *weight).collect();
    let counts = reduce(&apportion(&reduce(&weights), max_slots as u64));
    interleave(&counts)
        .into_iter()
        .map(|index| weighted[index].0.clone())
        .collect()
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Divides every value by their greatest common divisor.
fn reduce(values: &[u64]) -> Vec<u64> {
    let divisor = values.iter().copied().fold(0, gcd).max(1);
    values.iter().map(|value| value / divisor).collect()
}

/// Slot counts summing to at most `total` (exactly `total` when the weights sum to more),
/// each at least 1, proportional to `weights` (all > 0, at most `total` of them).
fn apportion(weights: &[u64], total: u64) -> Vec<u64> {
    let sum: u64 = weights.iter().sum();
    if sum <= total {
        return weights.to_vec();
    }
    // Members whose quota falls below one slot are raised to one; that slot comes out
    // of everyone else's share, which may push another member below one, so repeat
    // until the floor holds. Each round fixes at least one member, so this ends.
    let mut fixed = vec![false; weights.len()];
    loop {
        let budget = total - fixed.iter().filter(|&&is_fixed| is_fixed).count() as u64;
        let free: Vec<usize> = (0..weights.len()).filter(|&i| !fixed[i]).collect();
        let free_sum: u64 = free.iter().map(|&i| weights[i]).sum();
        let mut counts = vec![1; weights.len()];
        // Exact quotas as integer part and remainder over `free_sum`, in u128 because
        // weight × budget can exceed u64 for huge tables.
        let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(free.len());
        let mut given = 0;
        for &i in &free {
            let scaled = u128::from(weights[i]) * u128::from(budget);
            let whole = scaled / u128::from(free_sum);
            counts[i] = whole as u64;
            given += counts[i];
            remainders.push((scaled % u128::from(free_sum), i));
        }
        // Largest remainder first; ties to the earlier member, for determinism.
        remainders.sort_by_key(|&(remainder, i)| (Reverse(remainder), i));
        for &(_, i) in remainders.iter().take((budget - given) as usize) {
            counts[i] += 1;
        }
        let starved: Vec<usize> = free.iter().copied().filter(|&i| counts[i] == 0).collect();
        if starved.is_empty() {
            return counts;
        }
        for i in starved {
            fixed[i] = true;
        }
    }
}

/// Orders `counts[i]` copies of each index `i` so that every prefix is as close to
/// proportional as possible.
///
/// Each copy is a unit job with a window: the k-th copy of `i` may go no earlier than
/// slot ⌊k·T/cᵢ⌋ and is due by ⌈(k+1)·T/cᵢ⌉ (T the table length). Filling slots in
/// order, earliest due date first, meets every window because the shares sum to one
/// (the Pfair result for one processor), which is what bounds each prefix's error
/// below one slot. Ties go to the copy released earlier, then the lower index.
fn interleave(counts: &[u64]) -> Vec<usize> {
    let total: u64 = counts.iter().sum();
    let release = |index: usize, k: u64| k * total / counts[index];
    let due = |index: usize, k: u64| ((k + 1) * total).div_ceil(counts[index]);
    // Copies not yet released: min-heap by release slot.
    let mut waiting: BinaryHeap<Reverse<(u64, usize)>> = counts
        .iter()
        .enumerate()
        .filter(|(_, &count)| count > 0)
        .map(|(index, _)| Reverse((0, index)))
        .collect();
    // Released copies: min-heap by (due, release, index).
    let mut ready: BinaryHeap<Reverse<(u64, u64, usize)>> = BinaryHeap::new();
    let mut placed = vec![0; counts.len()];
    let mut table = Vec::with_capacity(total as usize);
    for slot in 0..total {
        while let Some(&Reverse((released, index))) = waiting.peek() {
            // Nothing ready would leave a hole; the window argument says it cannot
            // happen, and taking the next release keeps the table full regardless.
            if released > slot && !ready.is_empty() {
                break;
            }
            waiting.pop();
            ready.push(Reverse((due(index, placed[index]), released, index)));
        }
        let Some(Reverse((_, _, index))) = ready.pop() else {
            break;
        };
        table.push(index);
        placed[index] += 1;
        if placed[index] < counts[index] {
            waiting.push(Reverse((release(index, placed[index]), index)));
        }
    }
    table
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::FailoverRule;

    fn locality(text: &str) -> Locality {
        text.parse().unwrap()
    }

    fn candidate(
        key: &'static str,
        at: &str,
        weight: u32,
        healthy: bool,
    ) -> Candidate<&'static str> {
        Candidate {
            key,
            locality: locality(at),
            weight,
            healthy,
            priority: 0,
        }
    }

    fn up(key: &'static str, at: &str) -> Candidate<&'static str> {
        candidate(key, at, 1, true)
    }

    fn down(key: &'static str, at: &str) -> Candidate<&'static str> {
        candidate(key, at, 1, false)
    }

    fn policy(failover: &[(&str, &str)], order: &[&str]) -> LocalityLbSetting {
        LocalityLbSetting {
            enabled: true,
            failover: failover
                .iter()
                .map(|(from, to)| FailoverRule {
                    from: locality(from),
                    to: locality(to),
                })
                .collect(),
            failover_order: order.iter().map(|text| locality(text)).collect(),
            ..LocalityLbSetting::default()
        }
    }

    /// What the CLI would print: the tier and the member keys.
    fn shown(selection: &Selection<&'static str>) -> String {
        let keys: Vec<&str> = selection.members.iter().map(|(key, _)| *key).collect();
        format!("{selection} {}", keys.join(","))
    }

    const NODE: &str = "us-east1/us-east1-b";

    /// The mydb example: two endpoints in us-east1, one in us-west, failover
    /// from us-east1 to us-west; plus one in another zone of us-east1 and one elsewhere.
    fn mydb(health: [bool; 5]) -> Vec<Candidate<&'static str>> {
        let at = [
            ("zone-b", "us-east1/us-east1-b"),
            ("zone-c", "us-east1/us-east1-c"),
            ("region", "us-east1"),
            ("west", "us-west/us-west-1a"),
            ("europe", "eu-west"),
        ];
        at.iter()
            .zip(health)
            .map(|(&(key, at), healthy)| candidate(key, at, 1, healthy))
            .collect()
    }

    #[test]
    fn tiers_spill_strictly_in_order() {
        let node = locality(NODE);
        let policy = policy(&[("us-east1", "us-west")], &[]);
        let cases = [
            ([true; 5], "same-zone zone-b"),
            ([false, true, true, true, true], "same-region zone-c,region"),
            (
                [false, false, false, true, true],
                "failover[0]:us-west west",
            ),
            ([false, false, false, false, true], "other europe"),
            ([false; 5], "panic zone-b,zone-c,region,west,europe"),
        ];
        for (health, expected) in cases {
            assert_eq!(
                shown(&select(&node, &policy, Spill::Strict, &mydb(health))),
                expected
            );
        }
    }

    /// A FailoverService's backing services are priorities: kind2's endpoints (priority
    /// 0, in another region) serve before kind3's (priority 1) even though kind3 has one
    /// in the node's own zone; within a priority, locality tiers still order endpoints.
    #[test]
    fn a_lower_priority_serves_first_whatever_the_localities() {
        let node = locality(NODE);
        let policy = policy(&[], &[]);
        let at = |key, place, priority, healthy| Candidate {
            priority,
            ..candidate(key, place, 1, healthy)
        };
        let cases = [
            ([true, true, true, true], "other kind2-a,kind2-b"),
            ([false, true, true, true], "other kind2-b"),
            (
                [false, false, true, true],
                "priority[1]/same-zone kind3-zone",
            ),
            ([false, false, false, true], "priority[1]/other kind3-far"),
            ([false; 4], "panic kind2-a,kind2-b,kind3-zone,kind3-far"),
        ];
        for (health, expected) in cases {
            let candidates = vec![
                at("kind2-a", "eu-west/a", 0, health[0]),
                at("kind2-b", "eu-west/b", 0, health[1]),
                at("kind3-zone", NODE, 1, health[2]),
                at("kind3-far", "ap-south", 1, health[3]),
            ];
            assert_eq!(
                shown(&select(&node, &policy, Spill::Strict, &candidates)),
                expected,
                "health {health:?}"
            );
        }
        // Gradual spill moves traffic across priorities as Envoy does: with one of two
        // kind2 endpoints left, kind2 keeps 70% and kind3's best tier takes the rest.
        let candidates = vec![
            at("kind2-a", "eu-west/a", 0, false),
            at("kind2-b", "eu-west/b", 0, true),
            at("kind3-zone", NODE, 1, true),
        ];
        let gradual = select(&node, &policy, Spill::default(), &candidates);
        let loads: Vec<String> = gradual
            .loads
            .iter()
            .map(|load| format!("{}={}", load.tier, load.percent))
            .collect();
        assert_eq!(loads, ["other=70", "priority[1]/same-zone=30"]);
    }

    #[test]
    fn the_region_alone_is_same_region_not_same_zone() {
        let node = locality(NODE);
        let none = LocalityLbSetting::default();
        assert_eq!(
            tier_of(&node, &none, &locality("us-east1"), 0),
            Tier::Local(LocalityTier::SameRegion)
        );
        assert_eq!(
            tier_of(&node, &none, &locality("us-east1/us-east1-b/s1"), 0),
            Tier::Local(LocalityTier::SameZone)
        );
        assert_eq!(
            tier_of(&node, &none, &locality(""), 0),
            Tier::Local(LocalityTier::Other)
        );
        assert_eq!(
            tier_of(&locality("us-east1"), &none, &locality("us-east1"), 0),
            Tier::Local(LocalityTier::SameRegion)
        );
    }

    #[test]
    fn failover_rules_then_failover_order_give_positions() {
        let node = locality(NODE);
        let policy = policy(
            &[
                ("us-east1", "us-west"),
                ("eu-west", "eu-north"),
                ("us-east1/us-east1-b", "us-central"),
            ],
            &["eu-west/eu-west-1a", "us-west", "eu-west"],
        );
        assert_eq!(
            failover_targets(&node, &policy),
            ["us-west", "us-central", "eu-west/eu-west-1a", "eu-west"]
                .map(|at| Arc::new(locality(at))),
            "the eu-west rule does not apply to this node; us-west keeps its first place"
        );
        let tier = |at: &str| tier_of(&node, &policy, &locality(at), 0).to_string();
        assert_eq!(tier("us-west/us-west-1b"), "failover[0]:us-west");
        assert_eq!(tier("us-central"), "failover[1]:us-central");
        assert_eq!(
            tier("eu-west/eu-west-1a/x"),
            "failover[2]:eu-west/eu-west-1a"
        );
        assert_eq!(tier("eu-west/eu-west-1b"), "failover[3]:eu-west");
        assert_eq!(tier("eu-north"), "other");
        let candidates = [
            up("north", "eu-north"),
            up("west-1b", "eu-west/eu-west-1b"),
            up("west-1a", "eu-west/eu-west-1a"),
        ];
        assert_eq!(
            shown(&select(&node, &policy, Spill::Strict, &candidates)),
            "failover[2]:eu-west/eu-west-1a west-1a"
        );
    }

    #[test]
    fn failover_order_alone_orders_clusters() {
        // Like ordered backingServices: kind2 first, then kind3, whatever the node.
        let policy = policy(&[], &["kind2", "kind3"]);
        let candidates = [
            up("kind3-a", "kind3"),
            down("kind2-a", "kind2"),
            up("kind2-b", "kind2"),
        ];
        let node = Locality::default();
        assert_eq!(
            shown(&select(&node, &policy, Spill::Strict, &candidates)),
            "failover[0]:kind2 kind2-b"
        );
        let candidates = [up("kind3-a", "kind3"), down("kind2-a", "kind2")];
        assert_eq!(
            shown(&select(&node, &policy, Spill::Strict, &candidates)),
            "failover[1]:kind3 kind3-a"
        );
    }

    #[test]
    fn an_empty_node_locality_uses_only_failover_order() {
        let node = Locality::default();
        let policy = policy(&[("us-east1", "us-west")], &["eu-west"]);
        assert_eq!(
            failover_targets(&node, &policy),
            vec![Arc::new(locality("eu-west"))]
        );
        let candidates = [
            up("east", "us-east1/us-east1-b"),
            up("west", "us-west"),
            up("nowhere", ""),
        ];
        assert_eq!(
            shown(&select(&node, &policy, Spill::Strict, &candidates)),
            "other east,west,nowhere"
        );
        assert_eq!(
            tier_of(&node, &policy, &locality("eu-west/a"), 0).to_string(),
            "failover[0]:eu-west"
        );
    }

    #[test]
    fn disabled_locality_lb_makes_every_endpoint_equal() {
        let node = locality(NODE);
        let mut policy = policy(&[("us-east1", "us-west")], &[]);
        policy.enabled = false;
        let candidates = [up("west", "us-west"), up("zone-b", NODE)];
        assert_eq!(
            shown(&select(&node, &policy, Spill::Strict, &candidates)),
            "other west,zone-b"
        );
    }

    #[test]
    fn weights_are_kept_and_zero_weights_are_skipped() {
        let node = locality(NODE);
        let policy = policy(&[], &[]);
        let candidates = [
            candidate("drained", NODE, 0, true),
            candidate("heavy", "us-east1/us-east1-c", 5, true),
            candidate("light", "us-east1", 2, true),
            candidate("down", "us-east1", 7, false),
        ];
        let selection = select(&node, &policy, Spill::Strict, &candidates);
        assert_eq!(selection.tier, Some(Tier::Local(LocalityTier::SameRegion)));
        assert_eq!(selection.members, vec![("heavy", 5), ("light", 2)]);
    }

    #[test]
    fn panic_keeps_every_endpoint_and_its_weight() {
        let node = locality(NODE);
        let candidates = [
            candidate("a", NODE, 3, false),
            candidate("b", "eu-west", 0, true),
            candidate("c", "", 1, false),
        ];
        let selection = select(
            &node,
            &LocalityLbSetting::default(),
            Spill::Strict,
            &candidates,
        );
        assert_eq!(selection.to_string(), "panic");
        assert_eq!(selection.members, vec![("a", 3), ("b", 0), ("c", 1)]);
        assert_eq!(
            slot_table(&selection.members, 4096),
            vec!["a", "a", "c", "a"]
        );
    }

    /// One zone of four endpoints and, when `region_up`, a region of four healthy ones;
    /// `zone_up` of the zone's endpoints healthy, a fifth drained one (weight 0) in it.
    fn zone_and_region(zone_up: usize, region_up: bool) -> Vec<Candidate<&'static str>> {
        let mut candidates: Vec<Candidate<&'static str>> = ["z1", "z2", "z3", "z4"]
            .iter()
            .enumerate()
            .map(|(i, key)| candidate(key, NODE, 1, i < zone_up))
            .collect();
        candidates.push(candidate("z-drained", NODE, 0, true));
        if region_up {
            for key in ["r1", "r2", "r3", "r4"] {
                candidates.push(up(key, "us-east1/us-east1-c"));
            }
        }
        candidates
    }

    fn with_threshold(spill: Spill, panic_threshold_percent: u32) -> Balance {
        Balance {
            spill,
            panic_threshold_percent,
        }
    }

    #[test]
    fn a_tier_under_the_panic_threshold_serves_all_its_endpoints_when_nothing_can_take_over() {
        let node = locality(NODE);
        let policy = policy(&[], &[]);
        // 2 of 5 endpoints usable (the drained one counts as an endpoint, not usable):
        // 40% < 50%. Nothing else to fail over to, so the zone panics; the drained
        // endpoint still gets nothing.
        for spill in [Spill::Strict, gradual(140)] {
            let selection = select(
                &node,
                &policy,
                with_threshold(spill, 50),
                &zone_and_region(2, false),
            );
            assert_eq!(loads(&selection), "same-zone=100%(panic)", "{spill:?}");
            assert_eq!(shown(&selection), "same-zone z1,z2,z3,z4", "{spill:?}");
        }
        // At the threshold is not under it (Envoy compares strictly).
        let mut candidates = zone_and_region(2, false);
        candidates.pop();
        let selection = select(
            &node,
            &policy,
            with_threshold(gradual(140), 50),
            &candidates,
        );
        assert_eq!(loads(&selection), "same-zone=100%");
        assert_eq!(shown(&selection), "same-zone z1,z2");
        // 0 turns it off.
        let selection = select(
            &node,
            &policy,
            with_threshold(gradual(140), 0),
            &zone_and_region(1, false),
        );
        assert_eq!(shown(&selection), "same-zone z1");
    }

    #[test]
    fn a_tier_under_the_panic_threshold_fails_over_while_the_next_can_take_the_traffic() {
        let node = locality(NODE);
        let policy = policy(&[], &[]);
        // Zone: 1 of 5 usable, 1.4 × 20% = 28; region 100: together not short.
        let selection = select(
            &node,
            &policy,
            with_threshold(gradual(140), 50),
            &zone_and_region(1, true),
        );
        assert_eq!(loads(&selection), "same-zone=28% same-region=72%");
        assert_eq!(shown(&selection), "same-zone z1,r1,r2,r3,r4");
        // Strict stays in the zone while anything there is usable, and does not panic.
        let selection = select(
            &node,
            &policy,
            with_threshold(Spill::Strict, 50),
            &zone_and_region(1, true),
        );
        assert_eq!(shown(&selection), "same-zone z1");
        assert_eq!(selection.standby.len(), 4);
    }

    #[test]
    fn every_tier_in_panic_loads_the_tiers_by_endpoint_count() {
        let node = locality(NODE);
        let policy = policy(&[], &[]);
        let mut candidates = zone_and_region(1, false);
        for (i, key) in ["r1", "r2", "r3", "r4", "r5", "r6", "r7"]
            .iter()
            .enumerate()
        {
            candidates.push(candidate(key, "us-east1/us-east1-c", 1, i == 0));
        }
        // Zone 1 of 5 usable (28), region 1 of 7 (20): short, both under 50%. Envoy's
        // total panic: load by endpoints, here those of weight > 0: 4 and 7 of 11.
        let selection = select(
            &node,
            &policy,
            with_threshold(gradual(140), 50),
            &candidates,
        );
        assert_eq!(
            loads(&selection),
            "same-zone=37%(panic) same-region=63%(panic)"
        );
        assert_eq!(selection.members.len(), 11);
        assert!(selection.standby.is_empty());
        // Strict keeps all of it on the best tier with a usable endpoint, which panics.
        let selection = select(
            &node,
            &policy,
            with_threshold(Spill::Strict, 50),
            &candidates,
        );
        assert_eq!(loads(&selection), "same-zone=100%(panic)");
        assert_eq!(shown(&selection), "same-zone z1,z2,z3,z4");
        assert_eq!(
            selection.standby.len(),
            1,
            "the region's one usable endpoint"
        );
    }

    #[test]
    fn no_endpoints_selects_nothing() {
        let selection = select::<&str>(
            &locality(NODE),
            &LocalityLbSetting::default(),
            Spill::Strict,
            &[],
        );
        assert_eq!(selection.tier, None);
        assert!(selection.members.is_empty());
        assert_eq!(selection.to_string(), "none");
        assert!(selection.loads.is_empty());
        assert!(selection.standby.is_empty());
    }

    fn gradual(overprovisioning_percent: u32) -> Spill {
        Spill::Gradual {
            overprovisioning_percent,
        }
    }

    /// Tier names and loads as the CLI might print them.
    fn loads(selection: &Selection<&'static str>) -> String {
        let loads: Vec<String> = selection
            .loads
            .iter()
            .map(|load| {
                let panic = if load.panic && load.tier != Tier::Panic {
                    "(panic)"
                } else {
                    ""
                };
                format!("{}={}%{panic}", load.tier, load.percent)
            })
            .collect();
        loads.join(" ")
    }

    #[test]
    fn strict_loads_one_tier_and_stands_by_with_the_next_usable_one() {
        let node = locality(NODE);
        let policy = policy(&[("us-east1", "us-west")], &[]);
        let selection = select(&node, &policy, Spill::Strict, &mydb([true; 5]));
        assert_eq!(loads(&selection), "same-zone=100%");
        assert_eq!(selection.standby, vec![("zone-c", 1), ("region", 1)]);
        let selection = select(
            &node,
            &policy,
            Spill::Strict,
            &mydb([false, true, true, true, true]),
        );
        assert_eq!(selection.standby, vec![("west", 1)]);
        // The same region has nothing usable, so us-west stands by for the zone.
        let selection = select(
            &node,
            &policy,
            Spill::Strict,
            &mydb([true, false, false, true, true]),
        );
        assert_eq!(shown(&selection), "same-zone zone-b");
        assert_eq!(selection.standby, vec![("west", 1)]);
        // The last tier has nothing after it.
        let selection = select(
            &node,
            &policy,
            Spill::Strict,
            &mydb([false, false, false, false, true]),
        );
        assert!(selection.standby.is_empty());
    }

    /// The seed: a node in us-east1, two endpoints there, one in us-west to fail over to.
    fn seed(second_east_healthy: bool) -> Vec<Candidate<&'static str>> {
        vec![
            up("east-1", "us-east1/us-east1-b"),
            candidate("east-2", "us-east1/us-east1-c", 1, second_east_healthy),
            up("west", "us-west/us-west-1a"),
        ]
    }

    #[test]
    fn gradual_spill_sends_what_a_tier_cannot_carry_to_the_next() {
        let node = locality("us-east1");
        let policy = policy(&[("us-east1", "us-west")], &[]);
        // One of two east endpoints left: health min(100, 1.4 × 50%) = 70%.
        let selection = select(&node, &policy, gradual(140), &seed(false));
        assert_eq!(loads(&selection), "same-region=70% failover[0]:us-west=30%");
        assert_eq!(selection.tier, Some(Tier::Local(LocalityTier::SameRegion)));
        assert_eq!(selection.members, vec![("east-1", 7), ("west", 3)]);
        assert!(selection.standby.is_empty());
        let table = slot_table(&selection.members, 4096);
        assert_eq!((counts(&table, "east-1"), counts(&table, "west")), (7, 3));

        let selection = select(&node, &policy, gradual(140), &seed(true));
        assert_eq!(loads(&selection), "same-region=100%");
        assert_eq!(selection.members, vec![("east-1", 1), ("east-2", 1)]);
        assert_eq!(selection.standby, vec![("west", 1)]);

        // Without overprovisioning a tier carries exactly its usable share.
        let selection = select(&node, &policy, gradual(100), &seed(false));
        assert_eq!(loads(&selection), "same-region=50% failover[0]:us-west=50%");
        assert_eq!(selection.members, vec![("east-1", 1), ("west", 1)]);
    }

    #[test]
    fn gradual_spill_normalises_when_all_tiers_together_are_short() {
        let node = locality(NODE);
        let policy = policy(&[("us-east1", "us-west")], &[]);
        let mut candidates = vec![up("zone", NODE), up("region", "us-east1/us-east1-c")];
        candidates.push(up("west", "us-west"));
        candidates.extend(std::iter::repeat_n(down("zone-down", NODE), 3));
        candidates.extend(std::iter::repeat_n(down("region-down", "us-east1"), 4));
        candidates.extend(std::iter::repeat_n(down("west-down", "us-west"), 9));
        // Health 35%, 28% and 14%: 77% in all. Loads ⌊35·100/77⌋ = 45, ⌊2800/77⌋ = 36,
        // ⌊1400/77⌋ = 18, and the 1 the floors leave goes to the first tier.
        let selection = select(&node, &policy, gradual(140), &candidates);
        assert_eq!(
            loads(&selection),
            "same-zone=46% same-region=36% failover[0]:us-west=18%"
        );
        assert_eq!(
            selection.members,
            vec![("zone", 23), ("region", 18), ("west", 9)]
        );
    }

    #[test]
    fn gradual_spill_shares_a_tier_by_weight_and_counts_hosts_not_weights() {
        let node = locality(NODE);
        let policy = policy(&[], &[]);
        let candidates = [
            candidate("heavy", NODE, 3, true),
            candidate("light", NODE, 1, true),
            candidate("down", NODE, 8, false),
            candidate("region", "us-east1", 5, true),
        ];
        // Health ⌊140 × 2/3⌋ = 93: heavy 93·3/4, light 93·1/4, region 7.
        let selection = select(&node, &policy, gradual(140), &candidates);
        assert_eq!(loads(&selection), "same-zone=93% same-region=7%");
        assert_eq!(
            selection.members,
            vec![("heavy", 279), ("light", 93), ("region", 28)]
        );
        // A drained endpoint counts as a host that cannot take traffic.
        let candidates = [
            up("zone", NODE),
            candidate("drained", NODE, 0, true),
            up("region", "us-east1"),
        ];
        let selection = select(&node, &policy, gradual(140), &candidates);
        assert_eq!(loads(&selection), "same-zone=70% same-region=30%");
        assert_eq!(selection.members, vec![("zone", 7), ("region", 3)]);
    }

    #[test]
    fn gradual_weights_fall_back_to_parts_per_million_when_exact_ones_do_not_fit() {
        let node = locality(NODE);
        let policy = policy(&[], &[]);
        let candidates = [
            candidate("zone", NODE, 4_000_000_000, true),
            down("zone-down", NODE),
            candidate("heavy", "us-east1", 3_999_999_999, true),
            candidate("light", "us-east1", 1, true),
        ];
        let selection = select(&node, &policy, gradual(140), &candidates);
        assert_eq!(loads(&selection), "same-zone=70% same-region=30%");
        // `light` would round to 0 ppm; it keeps 1 so that it keeps a slot.
        assert_eq!(
            selection.members,
            vec![("zone", 700_000), ("heavy", 300_000), ("light", 1)]
        );
    }

    #[test]
    fn gradual_spill_stands_by_with_the_tier_after_the_loaded_ones() {
        let node = locality(NODE);
        let policy = policy(&[("us-east1", "us-west")], &[]);
        let selection = select(
            &node,
            &policy,
            gradual(140),
            &mydb([false, true, true, true, true]),
        );
        assert_eq!(loads(&selection), "same-region=100%");
        assert_eq!(selection.standby, vec![("west", 1)]);
        let mut candidates = mydb([true; 5]);
        candidates.push(down("zone-b-down", NODE));
        candidates.push(down("west-down", "us-west"));
        let selection = select(&node, &policy, gradual(140), &candidates);
        assert_eq!(loads(&selection), "same-zone=70% same-region=30%");
        assert_eq!(selection.standby, vec![("west", 1)]);
        candidates[3].healthy = false;
        let selection = select(&node, &policy, gradual(140), &candidates);
        assert_eq!(selection.standby, vec![("europe", 1)]);
    }

    #[test]
    fn gradual_spill_falls_back_to_strict_when_every_health_rounds_to_zero() {
        let node = locality(NODE);
        let policy = policy(&[], &[]);
        // 1 of 141: ⌊140/141⌋ = 0, yet the endpoint is usable.
        let mut candidates = vec![up("last", NODE)];
        candidates.extend(std::iter::repeat_n(down("down", NODE), 140));
        candidates.push(down("region", "us-east1"));
        candidates.push(up("other", "eu-west"));
        let selection = select(&node, &policy, gradual(140), &candidates[..142]);
        assert_eq!(shown(&selection), "same-zone last");
        assert_eq!(loads(&selection), "same-zone=100%");
        // With a healthy tier elsewhere, Envoy gives the zone nothing, and so do we.
        let selection = select(&node, &policy, gradual(140), &candidates);
        assert_eq!(shown(&selection), "other other");
        assert!(selection.standby.is_empty());
    }

    #[test]
    fn panic_has_no_standby() {
        let node = locality(NODE);
        let policy = policy(&[("us-east1", "us-west")], &[]);
        for spill in [Spill::Strict, gradual(140)] {
            let selection = select(&node, &policy, spill, &mydb([false; 5]));
            assert_eq!(loads(&selection), "panic=100%");
            assert_eq!(selection.members.len(), 5);
            assert!(selection.standby.is_empty());
        }
    }

    #[test]
    fn slot_tables_divide_by_the_gcd() {
        assert_eq!(
            slot_table(&[("a", 1), ("b", 1), ("c", 1)], 4096),
            ["a", "b", "c"]
        );
        assert_eq!(
            slot_table(&[("a", 3), ("b", 1)], 4096),
            ["a", "a", "b", "a"]
        );
        assert_eq!(
            slot_table(&[("a", 300), ("b", 100)], 4096),
            ["a", "a", "b", "a"]
        );
        assert_eq!(
            slot_table(&[("a", 2), ("b", 4), ("c", 6)], 4096),
            ["c", "b", "c", "a", "b", "c"]
        );
        assert_eq!(slot_table(&[("only", 1_000_000)], 4096), ["only"]);
        assert!(slot_table::<&str>(&[], 4096).is_empty());
    }

    fn counts(table: &[&str], key: &str) -> usize {
        table.iter().filter(|slot| **slot == key).count()
    }

    #[test]
    fn slot_tables_scale_down_to_the_bound() {
        let table = slot_table(&[("a", 1_000_000), ("b", 999_999), ("c", 1)], 100);
        assert_eq!(table.len(), 100);
        assert_eq!(
            (
                counts(&table, "a"),
                counts(&table, "b"),
                counts(&table, "c")
            ),
            (50, 49, 1)
        );
        // Many light members each keep a slot, taken from the heavy one.
        let mut members = vec![("heavy", 1_000_000)];
        members.extend(std::iter::repeat_n(("light", 1), 9));
        let table = slot_table(&members, 10);
        assert_eq!(table.len(), 10);
        assert_eq!((counts(&table, "heavy"), counts(&table, "light")), (1, 9));
    }

    #[test]
    fn slot_tables_keep_the_first_members_when_there_are_too_many() {
        let members = [("zero", 0), ("a", 5), ("b", 1), ("c", 9)];
        assert_eq!(slot_table(&members, 2), ["a", "b"]);
        assert_eq!(slot_table(&members, 1), ["a"]);
        assert!(slot_table(&members, 0).is_empty());
    }

    #[test]
    fn slot_tables_interleave() {
        let table = slot_table(&[("a", 2), ("b", 1), ("c", 1)], 4096);
        assert_eq!(table, ["a", "b", "c", "a"]);
        let table = slot_table(&[("a", 1), ("b", 3)], 4096);
        assert_eq!(table, ["b", "b", "a", "b"]);
        // A heavy member among many light ones is spread, not bunched at one end.
        let mut members = vec![("heavy", 4)];
        members.extend(std::iter::repeat_n(("light", 1), 4));
        let table = slot_table(&members, 4096);
        assert_eq!(table.len(), 8);
        let heavy_first_half = counts(&table[..4], "heavy");
        assert_eq!(heavy_first_half, 2, "{table:?}");
    }

    pub(crate) mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn members() -> impl Strategy<Value = Vec<(usize, u32)>> {
            prop::collection::vec(prop_oneof![Just(0u32), 1u32..=10, 1u32..=1_000_000], 1..40)
                .prop_map(|weights| weights.into_iter().enumerate().collect())
        }

        const PLACES: [&str; 6] = [
            "us-east1/us-east1-b",
            "us-east1/us-east1-c",
            "us-east1",
            "us-west/us-west-1a",
            "eu-west",
            "",
        ];

        /// Candidates keyed by their index, spread over the tiers of [`PLACES`].
        pub(crate) fn candidates() -> impl Strategy<Value = Vec<Candidate<usize>>> {
            let one = (
                0..PLACES.len(),
                prop_oneof![Just(0u32), 1u32..=10, 1u32..=1_000_000, Just(u32::MAX)],
                prop::bool::weighted(0.7),
            );
            prop::collection::vec(one, 0..24).prop_map(|picks| {
                picks
                    .into_iter()
                    .enumerate()
                    .map(|(key, (place, weight, healthy))| Candidate {
                        key,
                        locality: PLACES[place].parse().unwrap(),
                        weight,
                        healthy,
                        priority: 0,
                    })
                    .collect()
            })
        }

        pub(crate) fn spill() -> impl Strategy<Value = Spill> {
            prop_oneof![
                Just(Spill::Strict),
                (100u32..=400).prop_map(|overprovisioning_percent| Spill::Gradual {
                    overprovisioning_percent
                }),
            ]
        }

        /// The mydb policy: from us-east1 fail over to us-west.
        pub(crate) fn policy() -> LocalityLbSetting {
            super::policy(&[("us-east1", "us-west")], &[])
        }

        pub(crate) fn node() -> Locality {
            super::NODE.parse().unwrap()
        }

        proptest! {
            #[test]
            fn selections_keep_the_invariants(
                candidates in candidates(),
                spill in spill(),
                threshold in prop_oneof![Just(0u32), 0u32..=100],
            ) {
                let (node, policy) = (node(), policy());
                let balance = Balance { spill, panic_threshold_percent: threshold };
                let selection = select(&node, &policy, balance, &candidates);
                let tier = |key: usize| tier_of(&node, &policy, &candidates[key].locality, 0);
                let usable = |c: &Candidate<usize>| c.healthy && c.weight > 0;
                if candidates.is_empty() {
                    prop_assert_eq!(selection.tier, None);
                    prop_assert!(selection.loads.is_empty() && selection.members.is_empty());
                    prop_assert!(selection.standby.is_empty());
                    return Ok(());
                }
                prop_assert_eq!(selection.loads.iter().map(|l| l.percent).sum::<u32>(), 100);
                prop_assert!(selection.loads.iter().all(|l| l.percent > 0));
                prop_assert!(selection.loads.windows(2).all(|w| w[0].tier < w[1].tier));
                prop_assert_eq!(selection.tier.as_ref(), Some(&selection.loads[0].tier));
                if !candidates.iter().any(usable) {
                    prop_assert_eq!(selection.tier, Some(Tier::Panic));
                    let all: Vec<(usize, u32)> = candidates.iter().map(|c| (c.key, c.weight)).collect();
                    prop_assert_eq!(selection.members, all);
                    prop_assert!(selection.standby.is_empty());
                    return Ok(());
                }
                let loaded: Vec<&Tier> = selection.loads.iter().map(|l| &l.tier).collect();
                let in_panic = |at: &Tier| selection.loads.iter().any(|l| l.tier == *at && l.panic);
                prop_assert!(threshold > 0 || selection.loads.iter().all(|l| !l.panic),
                    "a threshold of 0 puts no tier in panic");
                // A tier in panic is one below the threshold.
                for load in &selection.loads {
                    let of_tier = || candidates.iter().filter(|c| tier(c.key) == load.tier);
                    let (hosts, up) = (of_tier().count(), of_tier().filter(|c| usable(c)).count());
                    prop_assert!(!load.panic || up * 100 < threshold as usize * hosts,
                        "{} in panic with {} of {} usable", load.tier, up, hosts);
                }
                // Members: the usable endpoints of the loaded tiers (all of weight > 0 in a
                // tier in panic), by tier, then in order.
                let mut expected: Vec<usize> = candidates
                    .iter()
                    .filter(|c| loaded.contains(&&tier(c.key)))
                    .filter(|c| usable(c) || in_panic(&tier(c.key)) && c.weight > 0)
                    .map(|c| c.key)
                    .collect();
                expected.sort_by_key(|&key| tier(key));
                let keys: Vec<usize> = selection.members.iter().map(|(key, _)| *key).collect();
                prop_assert_eq!(keys, expected);
                prop_assert!(selection.members.iter().all(|(_, weight)| *weight > 0));
                if let [Load { percent: 100, .. }] = selection.loads[..] {
                    let own: Vec<(usize, u32)> = selection
                        .members
                        .iter()
                        .map(|(key, _)| (*key, candidates[*key].weight))
                        .collect();
                    prop_assert_eq!(&selection.members, &own, "one tier keeps its weights");
                }
                let best_usable = candidates.iter().filter(|c| usable(c)).map(|c| tier(c.key)).min();
                if spill == Spill::Strict {
                    prop_assert_eq!(selection.loads.len(), 1);
                    prop_assert_eq!(selection.tier, best_usable);
                }
                // Each tier's share of the weights is its load, to within the rounding to
                // parts per million: each member off by at most 1 ppm, the total by at
                // most one per member.
                let total: u64 = selection.members.iter().map(|(_, w)| u64::from(*w)).sum();
                let n = selection.members.len() as f64;
                for Load { tier: loaded, percent: load, .. } in &selection.loads {
                    let weight: u64 = selection
                        .members
                        .iter()
                        .filter(|(key, _)| tier(*key) == *loaded)
                        .map(|(_, w)| u64::from(*w))
                        .sum();
                    let share = weight as f64 / total as f64;
                    prop_assert!((share - f64::from(*load) / 100.0).abs() <= 2.0 * n / 1e6,
                        "{} has {} of the weight for a load of {}%", loaded, share, load);
                }
                // Standby: the first tier with a usable endpoint after the loaded ones.
                let last = loaded.last().copied().cloned();
                let next = candidates
                    .iter()
                    .filter(|c| usable(c) && Some(tier(c.key)) > last)
                    .map(|c| tier(c.key))
                    .min();
                let standby: Vec<(usize, u32)> = candidates
                    .iter()
                    .filter(|c| usable(c) && Some(tier(c.key)) == next)
                    .map(|c| (c.key, c.weight))
                    .collect();
                prop_assert_eq!(selection.standby, standby);
            }

            #[test]
            fn tables_respect_the_bound_and_the_shares(
                members in members(),
                max_slots in prop_oneof![1usize..64, 1usize..5000],
            ) {
                let table = slot_table(&members, max_slots);
                prop_assert!(table.len() <= max_slots);
                prop_assert_eq!(table.clone(), slot_table(&members, max_slots), "deterministic");
                let positive: Vec<(usize, u64)> = members
                    .iter()
                    .filter(|(_, weight)| *weight > 0)
                    .map(|(key, weight)| (*key, u64::from(*weight)))
                    .collect();
                prop_assert!(!table.is_empty(), "never empty for members");
                if positive.is_empty() || positive.len() > max_slots {
                    return Ok(());
                }
                let count = |key: usize| table.iter().filter(|slot| **slot == key).count() as u64;
                let total = table.len() as u64;
                let sum: u64 = positive.iter().map(|(_, weight)| weight).sum();
                for &(key, _) in &positive {
                    prop_assert!(count(key) >= 1, "member {} lost its slot", key);
                }
                for (key, _) in members.iter().filter(|(_, weight)| *weight == 0) {
                    prop_assert_eq!(count(*key), 0);
                }
                // Heavier never gets fewer slots.
                for &(a, weight_a) in &positive {
                    for &(b, weight_b) in &positive {
                        if weight_a > weight_b {
                            prop_assert!(count(a) >= count(b));
                        }
                    }
                }
                // Exact shares when the reduced weights fit; else within one slot of
                // the quota whenever no member's quota had to be raised to one.
                let divisor = positive.iter().fold(0, |acc, (_, weight)| gcd(acc, *weight));
                let budget = max_slots as u64;
                if sum / divisor <= budget {
                    for &(key, weight) in &positive {
                        prop_assert_eq!(count(key) * sum, weight * total);
                    }
                } else if positive.iter().all(|(_, weight)| weight * budget >= sum) {
                    prop_assert_eq!(budget % total, 0);
                    let scale = budget / total;
                    for &(key, weight) in &positive {
                        let given = u128::from(count(key) * scale) * u128::from(sum);
                        let quota = u128::from(weight) * u128::from(budget);
                        prop_assert!(given.abs_diff(quota) < u128::from(sum),
                            "member {} got {} slots of {}", key, count(key), total);
                    }
                }
            }

            #[test]
            fn every_prefix_is_within_one_slot_of_its_share(
                members in members(),
                max_slots in prop_oneof![1usize..64, 1usize..5000],
            ) {
                let table = slot_table(&members, max_slots);
                let total = table.len() as u64;
                let mut keys: Vec<usize> = table.clone();
                keys.sort_unstable();
                keys.dedup();
                for key in keys {
                    let share = table.iter().filter(|slot| **slot == key).count() as u64;
                    let mut seen = 0u64;
                    for (position, slot) in table.iter().enumerate() {
                        if *slot == key {
                            seen += 1;
                        }
                        let prefix = position as u64 + 1;
                        // |seen - prefix × share / total| < 1
                        prop_assert!((seen * total).abs_diff(prefix * share) < total,
                            "member {} has {} of the first {} slots, share {}/{}", key, seen, prefix, share, total);
                    }
                }
            }
        }
    }
}
