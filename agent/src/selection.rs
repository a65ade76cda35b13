//! Which backends go in a service's table: health + locality policy → tier and members,
//! then members → a weighted slot table the kernel picks from in O(1).
//!
//! This is Istio/Envoy locality load balancing with strict spill: all traffic goes to
//! the best tier that has a usable endpoint, none to the tiers after it. Tiers, best
//! first: same zone, same region, each failover target in order, then everything else.
//!
//! Invariants:
//! - every endpoint belongs to exactly one tier, the best it qualifies for, and that
//!   tier depends only on localities and policy, never on health ([`tier_of`]);
//! - the chosen tier is the best one with a healthy endpoint of weight > 0, and its
//!   members are exactly those endpoints, in candidate order, with their weights;
//! - a service with endpoints is never black-holed: when none is usable, the tier is
//!   [`Tier::Panic`] and every endpoint is a member;
//! - [`slot_table`] is deterministic, never longer than `max_slots`, and gives every
//!   member with weight > 0 at least one slot as long as they fit.
//!
//! Pure: no I/O, no clock, no randomness.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

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
}

/// Where an endpoint stands in the failover order. Ordered best first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Same region and zone as the node.
    SameZone,
    /// Same region as the node, another zone.
    SameRegion,
    /// Matches the failover target at `position` in [`failover_targets`].
    Failover { position: usize, target: Locality },
    /// Anywhere else, including endpoints with no locality.
    Other,
    /// Not a locality: nothing was usable, so every endpoint is used.
    Panic,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SameZone => f.write_str("same-zone"),
            Self::SameRegion => f.write_str("same-region"),
            Self::Failover { position, target } => write!(f, "failover[{position}]:{target}"),
            Self::Other => f.write_str("other"),
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

/// The outcome for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection<K> {
    /// `None` when the service has no endpoints at all.
    pub tier: Option<Tier>,
    /// Key and weight of each member, in candidate order.
    pub members: Vec<(K, u32)>,
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
pub fn failover_targets(node: &Locality, policy: &LocalityLbSetting) -> Vec<Locality> {
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
    let mut targets: Vec<Locality> = Vec::new();
    for target in from_rules.chain(&policy.failover_order) {
        if !targets.contains(target) {
            targets.push(target.clone());
        }
    }
    targets
}

/// The tier `endpoint` belongs to when healthy (never [`Tier::Panic`]); what the CLI
/// shows to explain why a backend is or is not chosen.
#[must_use]
pub fn tier_of(node: &Locality, policy: &LocalityLbSetting, endpoint: &Locality) -> Tier {
    classify(node, policy, &failover_targets(node, policy), endpoint)
}

fn classify(
    node: &Locality,
    policy: &LocalityLbSetting,
    targets: &[Locality],
    endpoint: &Locality,
) -> Tier {
    if !policy.enabled {
        return Tier::Other;
    }
    let same_region = !node.region.is_empty() && endpoint.region == node.region;
    if same_region && !node.zone.is_empty() && endpoint.zone == node.zone {
        return Tier::SameZone;
    }
    if same_region {
        return Tier::SameRegion;
    }
    // Targets are never empty in a validated config; an empty one would match all.
    targets
        .iter()
        .position(|target| target.contains(endpoint))
        .map_or(Tier::Other, |position| Tier::Failover {
            position,
            target: targets[position].clone(),
        })
}

/// Chooses the tier and its members for one service. See the module invariants.
#[must_use]
pub fn select<K: Clone>(
    node: &Locality,
    policy: &LocalityLbSetting,
    candidates: &[Candidate<K>],
) -> Selection<K> {
    if candidates.is_empty() {
        return Selection {
            tier: None,
            members: Vec::new(),
        };
    }
    let targets = failover_targets(node, policy);
    let tiers: Vec<Tier> = candidates
        .iter()
        .map(|candidate| classify(node, policy, &targets, &candidate.locality))
        .collect();
    let usable = |candidate: &Candidate<K>| candidate.healthy && candidate.weight > 0;
    let best = candidates
        .iter()
        .zip(&tiers)
        .filter(|(candidate, _)| usable(candidate))
        .map(|(_, tier)| tier)
        .min()
        .cloned();
    let member = |candidate: &Candidate<K>| (candidate.key.clone(), candidate.weight);
    match best {
        Some(tier) => Selection {
            members: candidates
                .iter()
                .zip(&tiers)
                .filter(|(candidate, candidate_tier)| usable(candidate) && **candidate_tier == tier)
                .map(|(candidate, _)| member(candidate))
                .collect(),
            tier: Some(tier),
        },
        // Sending to backends that may be down beats refusing every connection.
        None => Selection {
            tier: Some(Tier::Panic),
            members: candidates.iter().map(member).collect(),
        },
    }
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
mod tests {
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
            assert_eq!(shown(&select(&node, &policy, &mydb(health))), expected);
        }
    }

    #[test]
    fn the_region_alone_is_same_region_not_same_zone() {
        let node = locality(NODE);
        let none = LocalityLbSetting::default();
        assert_eq!(
            tier_of(&node, &none, &locality("us-east1")),
            Tier::SameRegion
        );
        assert_eq!(
            tier_of(&node, &none, &locality("us-east1/us-east1-b/s1")),
            Tier::SameZone
        );
        assert_eq!(tier_of(&node, &none, &locality("")), Tier::Other);
        assert_eq!(
            tier_of(&locality("us-east1"), &none, &locality("us-east1")),
            Tier::SameRegion
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
            vec![
                locality("us-west"),
                locality("us-central"),
                locality("eu-west/eu-west-1a"),
                locality("eu-west"),
            ],
            "the eu-west rule does not apply to this node; us-west keeps its first place"
        );
        let tier = |at: &str| tier_of(&node, &policy, &locality(at)).to_string();
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
            shown(&select(&node, &policy, &candidates)),
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
            shown(&select(&node, &policy, &candidates)),
            "failover[0]:kind2 kind2-b"
        );
        let candidates = [up("kind3-a", "kind3"), down("kind2-a", "kind2")];
        assert_eq!(
            shown(&select(&node, &policy, &candidates)),
            "failover[1]:kind3 kind3-a"
        );
    }

    #[test]
    fn an_empty_node_locality_uses_only_failover_order() {
        let node = Locality::default();
        let policy = policy(&[("us-east1", "us-west")], &["eu-west"]);
        assert_eq!(failover_targets(&node, &policy), vec![locality("eu-west")]);
        let candidates = [
            up("east", "us-east1/us-east1-b"),
            up("west", "us-west"),
            up("nowhere", ""),
        ];
        assert_eq!(
            shown(&select(&node, &policy, &candidates)),
            "other east,west,nowhere"
        );
        assert_eq!(
            tier_of(&node, &policy, &locality("eu-west/a")).to_string(),
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
            shown(&select(&node, &policy, &candidates)),
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
        let selection = select(&node, &policy, &candidates);
        assert_eq!(selection.tier, Some(Tier::SameRegion));
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
        let selection = select(&node, &LocalityLbSetting::default(), &candidates);
        assert_eq!(selection.to_string(), "panic");
        assert_eq!(selection.members, vec![("a", 3), ("b", 0), ("c", 1)]);
        assert_eq!(
            slot_table(&selection.members, 4096),
            vec!["a", "a", "c", "a"]
        );
    }

    #[test]
    fn no_endpoints_selects_nothing() {
        let selection = select::<&str>(&locality(NODE), &LocalityLbSetting::default(), &[]);
        assert_eq!(selection.tier, None);
        assert!(selection.members.is_empty());
        assert_eq!(selection.to_string(), "none");
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

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn members() -> impl Strategy<Value = Vec<(usize, u32)>> {
            prop::collection::vec(prop_oneof![Just(0u32), 1u32..=10, 1u32..=1_000_000], 1..40)
                .prop_map(|weights| weights.into_iter().enumerate().collect())
        }

        proptest! {
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
