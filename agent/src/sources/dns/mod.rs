//! Endpoints by DNS name (`resolution: DNS`, Istio's): what each name resolved to, when
//! to ask again, and the service each source's model becomes once its names are
//! replaced by their addresses.
//!
//! Pure: no I/O, no clock (callers pass `now`). The lookups themselves are
//! [`lookup`]'s, through hickory-resolver; this module decides what they mean.
//!
//! Invariants:
//! - [`Names`] tracks exactly the names the running configuration uses
//!   ([`Names::track`]); a name no service uses any more is forgotten;
//! - a failed or empty answer never removes an address: the last good addresses keep
//!   serving ([`NameRecord::addresses`] only changes on an answer with addresses), and
//!   the failure is kept beside them for the CLI, metrics and events;
//! - a name is asked again at its answer's TTL, bounded to [`TtlBounds`]; after a failure,
//!   at the lower bound;
//! - [`expand`] gives each resolved address the named endpoint's ports, locality,
//!   labels, priority and cluster, and shares the endpoint's weight among its addresses
//!   (a name with four addresses of weight 1 weighs what one literal endpoint of weight 1
//!   does); only the VIPs' address families are used, and an address that is already an
//!   endpoint of the service (a literal, or another name's) is not added twice.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::config::{Config, EndpointConfig, ServiceConfig};

pub mod lookup;

/// How soon and how late a name is asked again, whatever its records' TTL says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlBounds {
    /// Also the wait after a failed lookup.
    pub min: Duration,
    pub max: Duration,
}

impl Default for TtlBounds {
    /// Envoy's default DNS refresh rate (5 s) as the floor; five minutes as the ceiling.
    fn default() -> Self {
        Self {
            min: Duration::from_secs(5),
            max: Duration::from_secs(300),
        }
    }
}

impl TtlBounds {
    fn clamp(self, ttl: Duration) -> Duration {
        ttl.clamp(self.min, self.max.max(self.min))
    }
}

/// What a lookup of a name answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub addresses: Vec<IpAddr>,
    /// The answer's remaining validity (its records' lowest TTL).
    pub ttl: Duration,
}

/// One tracked name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameRecord {
    /// Sorted, without repeats. `None` until the name has resolved once; after that,
    /// the last good answer's, kept through failures.
    pub addresses: Option<Arc<[IpAddr]>>,
    /// The last lookup's error, while the name has not resolved since.
    pub last_error: Option<String>,
    /// Failed lookups in a row.
    pub failures: u32,
    /// When the last good answer came, and the TTL it was kept for (bounded).
    pub resolved: Option<(Instant, Duration)>,
    /// When the name is due for its next lookup.
    pub next_at: Instant,
    /// A lookup is under way: not due again until it answers.
    pub in_flight: bool,
}

impl NameRecord {
    fn new(now: Instant) -> Self {
        Self {
            addresses: None,
            last_error: None,
            failures: 0,
            resolved: None,
            next_at: now,
            in_flight: false,
        }
    }

    /// `resolved`, `stale` (serving the last good addresses after a failure),
    /// `failed` (never resolved) or `pending` (never asked yet).
    #[must_use]
    pub fn state(&self) -> &'static str {
        match (&self.addresses, &self.last_error) {
            (Some(_), None) => "resolved",
            (Some(_), Some(_)) => "stale",
            (None, Some(_)) => "failed",
            (None, None) => "pending",
        }
    }
}

/// What [`Names::record`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The name is not tracked (no service uses it any more).
    Untracked,
    /// Same addresses as before; only the schedule moved.
    Unchanged,
    /// New addresses: the services using the name need expanding again.
    Changed,
    /// The lookup failed or answered nothing; `kept` addresses still serve (0 when the
    /// name never resolved).
    Failed { kept: usize },
}

/// Every name the running configuration uses, and what each resolved to.
#[derive(Debug, Clone, Default)]
pub struct Names {
    records: BTreeMap<Arc<str>, NameRecord>,
    bounds: TtlBounds,
}

impl Names {
    #[must_use]
    pub fn new(bounds: TtlBounds) -> Self {
        Self {
            records: BTreeMap::new(),
            bounds,
        }
    }

    /// Tracks the names `config` uses: new ones are due at once, ones no service uses
    /// any more are forgotten. Returns the new ones.
    pub fn track(&mut self, config: &Config, now: Instant) -> Vec<Arc<str>> {
        let used: HashSet<&Arc<str>> = config
            .services
            .iter()
            .flat_map(|service| &service.named_endpoints)
            .map(|named| &named.hostname)
            .collect();
        self.records.retain(|name, _| used.contains(name));
        let mut new = Vec::new();
        for name in used {
            if !self.records.contains_key(name) {
                self.records.insert(name.clone(), NameRecord::new(now));
                new.push(name.clone());
            }
        }
        new.sort();
        new
    }

    /// The names due for a lookup at `now`, marked as in flight.
    pub fn take_due(&mut self, now: Instant) -> Vec<Arc<str>> {
        self.records
            .iter_mut()
            .filter(|(_, record)| !record.in_flight && record.next_at <= now)
            .map(|(name, record)| {
                record.in_flight = true;
                name.clone()
            })
            .collect()
    }

    /// When the next lookup is due, if any name waits for one.
    #[must_use]
    pub fn next_due(&self) -> Option<Instant> {
        self.records
            .values()
            .filter(|record| !record.in_flight)
            .map(|record| record.next_at)
            .min()
    }

    /// Records a lookup's outcome at `now`.
    pub fn record(
        &mut self,
        name: &str,
        outcome: Result<Answer, String>,
        now: Instant,
    ) -> Recorded {
        let bounds = self.bounds;
        let Some(record) = self.records.get_mut(name) else {
            return Recorded::Untracked;
        };
        record.in_flight = false;
        let answer = outcome.and_then(|answer| {
            if answer.addresses.is_empty() {
                Err("the name has no addresses".to_owned())
            } else {
                Ok(answer)
            }
        });
        match answer {
            Ok(Answer { mut addresses, ttl }) => {
                addresses.sort_unstable();
                addresses.dedup();
                let ttl = bounds.clamp(ttl);
                record.resolved = Some((now, ttl));
                record.next_at = now + ttl;
                record.last_error = None;
                record.failures = 0;
                if record.addresses.as_deref() == Some(&addresses[..]) {
                    return Recorded::Unchanged;
                }
                record.addresses = Some(addresses.into());
                Recorded::Changed
            }
            Err(error) => {
                record.last_error = Some(error);
                record.failures = record.failures.saturating_add(1);
                record.next_at = now + bounds.min;
                Recorded::Failed {
                    kept: record.addresses.as_ref().map_or(0, |a| a.len()),
                }
            }
        }
    }

    #[must_use]
    pub fn get(&self, name: &str) -> Option<&NameRecord> {
        self.records.get(name)
    }

    /// Every tracked name, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &NameRecord)> {
        self.records.iter()
    }

    /// The addresses `name` serves now: none until it has resolved.
    #[must_use]
    pub fn addresses(&self, name: &str) -> &[IpAddr] {
        self.records
            .get(name)
            .and_then(|record| record.addresses.as_deref())
            .unwrap_or(&[])
    }
}

/// The most a service's weights are multiplied by so that each name's addresses share
/// its weight exactly: 1,000,000 (the highest weight) × 4,294 still fits a `u32`. Past
/// it the shares are rounded (at least 1 each).
const MAX_WEIGHT_SCALE: u64 = 4_294;

/// `service` with its named endpoints' addresses added to its endpoints, as `names`
/// resolved them. A service without named endpoints is returned as it is.
#[must_use]
pub fn expand(service: &ServiceConfig, names: &Names) -> ServiceConfig {
    let mut expanded = service.clone();
    if service.named_endpoints.is_empty() {
        return expanded;
    }
    let v4 = service.vips.iter().any(IpAddr::is_ipv4);
    let v6 = service.vips.iter().any(IpAddr::is_ipv6);
    let usable = |ip: &&IpAddr| if ip.is_ipv4() { v4 } else { v6 };
    let resolved: Vec<Vec<IpAddr>> = service
        .named_endpoints
        .iter()
        .map(|named| {
            names
                .addresses(&named.hostname)
                .iter()
                .filter(usable)
                .copied()
                .collect()
        })
        .collect();
    // The least common multiple of the address counts, so that weight × scale / count
    // is a whole number for every name.
    let scale = resolved
        .iter()
        .map(|addresses| addresses.len() as u64)
        .filter(|&count| count > 1)
        .fold(1_u64, |scale, count| {
            (scale / gcd(scale, count)).saturating_mul(count)
        })
        .min(MAX_WEIGHT_SCALE);
    let scaled = |weight: u32, count: u64| -> u32 {
        let share = u64::from(weight) * scale / count.max(1);
        u32::try_from(share.max(1)).unwrap_or(u32::MAX)
    };
    for endpoint in &mut expanded.endpoints {
        endpoint.weight = scaled(endpoint.weight, 1);
    }
    let backends = |endpoint: &EndpointConfig| -> SmallVec<[u16; 2]> {
        service.ports.iter().map(|p| endpoint.port_for(p)).collect()
    };
    let mut seen: HashSet<(IpAddr, SmallVec<[u16; 2]>)> = expanded
        .endpoints
        .iter()
        .map(|endpoint| (endpoint.address, backends(endpoint)))
        .collect();
    let added: usize = resolved.iter().map(Vec::len).sum();
    expanded.endpoints.reserve_exact(added);
    for (named, addresses) in service.named_endpoints.iter().zip(&resolved) {
        let weight = scaled(named.template.weight, addresses.len() as u64);
        for &address in addresses {
            let endpoint = EndpointConfig {
                address,
                weight,
                ..named.template.clone()
            };
            if seen.insert((address, backends(&endpoint))) {
                expanded.endpoints.push(endpoint);
            }
        }
    }
    expanded
}

/// `config` (as its source gave it) with every service that names endpoints by DNS
/// expanded with what `names` resolved; the others shared, not copied.
#[must_use]
pub fn expand_all(config: &Config, names: &Names) -> Config {
    let expanded: Vec<Arc<ServiceConfig>> = config
        .services
        .iter()
        .filter(|service| !service.named_endpoints.is_empty())
        .map(|service| Arc::new(expand(service, names)))
        .collect();
    config
        .with_replaced(&expanded)
        .expect("expanding names keeps every service's VIPs and ports")
}

/// The services of `source` with an endpoint named `name`, in file order.
pub fn services_using<'a>(
    source: &'a Config,
    name: &'a str,
) -> impl Iterator<Item = &'a ServiceConfig> + 'a {
    source
        .services
        .iter()
        .map(|service| &**service)
        .filter(move |service| service.named_endpoints.iter().any(|n| &*n.hostname == name))
}

/// The services of `source` that use `name`, expanded again, to replace theirs in the
/// running configuration.
#[must_use]
pub fn users_of(source: &Config, name: &str, names: &Names) -> Vec<Arc<ServiceConfig>> {
    services_using(source, name)
        .map(|service| Arc::new(expand(service, names)))
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    const YAML: &str = "
services:
- name: db
  vips: [10.9.0.1]
  ports: [{number: 80, name: http}]
  resolution: DNS
  endpoints:
  - {address: 127.0.0.9, locality: us-west1/us-west1-a}
  - {address: east.example, locality: us-east1/us-east1-b, weight: 3}
  - {address: west.example, locality: us-west1/us-west1-a, ports: {http: 8080}}
- name: plain
  vips: [10.9.0.2]
  ports: [{number: 80}]
  endpoints: [{address: 127.0.0.10}]
";

    fn answer(addresses: &[&str], ttl_secs: u64) -> Result<Answer, String> {
        Ok(Answer {
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            ttl: Duration::from_secs(ttl_secs),
        })
    }

    fn endpoints(service: &ServiceConfig) -> Vec<(String, u32, String)> {
        service
            .endpoints
            .iter()
            .map(|e| {
                let port = e.port_for(&service.ports[0]);
                (
                    format!("{}:{port}", e.address),
                    e.weight,
                    e.locality.to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn names_are_tracked_while_a_service_uses_them() {
        let config = config::parse(YAML).unwrap();
        let now = Instant::now();
        let mut names = Names::new(TtlBounds::default());
        let new = names.track(&config, now);
        assert_eq!(
            new,
            vec![Arc::from("east.example"), Arc::from("west.example")]
        );
        assert_eq!(names.get("east.example").unwrap().state(), "pending");
        assert_eq!(names.take_due(now).len(), 2);
        assert_eq!(names.take_due(now), Vec::<Arc<str>>::new(), "in flight");
        assert_eq!(names.next_due(), None);
        let without = config::parse(&YAML.replace("east.example", "127.0.0.11")).unwrap();
        assert_eq!(names.track(&without, now), Vec::<Arc<str>>::new());
        assert!(names.get("east.example").is_none());
        assert_eq!(
            names.record("east.example", answer(&["127.0.0.1"], 30), now),
            Recorded::Untracked
        );
    }

    #[test]
    fn a_failure_keeps_the_last_good_addresses_and_retries_at_the_floor() {
        let config = config::parse(YAML).unwrap();
        let t0 = Instant::now();
        let bounds = TtlBounds {
            min: Duration::from_secs(2),
            max: Duration::from_secs(60),
        };
        let mut names = Names::new(bounds);
        names.track(&config, t0);
        names.take_due(t0);
        assert_eq!(
            names.record("east.example", Err("timed out".into()), t0),
            Recorded::Failed { kept: 0 }
        );
        assert_eq!(names.get("east.example").unwrap().state(), "failed");
        assert_eq!(names.get("east.example").unwrap().next_at, t0 + bounds.min);
        let t1 = t0 + bounds.min;
        assert_eq!(names.take_due(t1), vec![Arc::from("east.example")]);
        assert_eq!(
            names.record(
                "east.example",
                answer(&["127.0.0.2", "127.0.0.1", "127.0.0.2"], 1),
                t1
            ),
            Recorded::Changed
        );
        let record = names.get("east.example").unwrap();
        assert_eq!(record.state(), "resolved");
        assert_eq!(
            names.addresses("east.example"),
            [
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "127.0.0.2".parse().unwrap()
            ]
        );
        // A TTL of 1 s is asked again at the floor; one of an hour at the ceiling.
        assert_eq!(record.next_at, t1 + bounds.min);
        names.take_due(t1 + bounds.min);
        assert_eq!(
            names.record(
                "east.example",
                answer(&["127.0.0.1", "127.0.0.2"], 3600),
                t1
            ),
            Recorded::Unchanged
        );
        assert_eq!(names.get("east.example").unwrap().next_at, t1 + bounds.max);
        // An empty answer is a failure too: the addresses stay.
        for outcome in [answer(&[], 30), Err("SERVFAIL".into())] {
            assert_eq!(
                names.record("east.example", outcome, t1),
                Recorded::Failed { kept: 2 }
            );
            assert_eq!(names.get("east.example").unwrap().state(), "stale");
            assert_eq!(names.addresses("east.example").len(), 2);
        }
        assert_eq!(names.get("east.example").unwrap().failures, 2);
    }

    #[test]
    fn expansion_shares_a_names_weight_among_its_addresses() {
        let config = config::parse(YAML).unwrap();
        let now = Instant::now();
        let mut names = Names::new(TtlBounds::default());
        names.track(&config, now);
        let db = config.service("db").unwrap();
        // Nothing resolved yet: only the literal endpoint.
        assert_eq!(
            endpoints(&expand(db, &names)),
            [("127.0.0.9:80".into(), 1, "us-west1/us-west1-a".into())]
        );
        names.record(
            "east.example",
            answer(&["127.0.1.1", "127.0.1.2", "::1"], 30),
            now,
        );
        names.record(
            "west.example",
            answer(&["127.0.2.1", "127.0.2.2", "127.0.2.3"], 30),
            now,
        );
        let expanded = expand(db, &names);
        // Scale lcm(2, 3) = 6: the literal 1 → 6; east's 3 over two addresses → 9 each;
        // west's 1 over three → 2 each. The IPv6 address has no IPv6 VIP to serve.
        assert_eq!(
            endpoints(&expanded),
            [
                ("127.0.0.9:80".into(), 6, "us-west1/us-west1-a".into()),
                ("127.0.1.1:80".into(), 9, "us-east1/us-east1-b".into()),
                ("127.0.1.2:80".into(), 9, "us-east1/us-east1-b".into()),
                ("127.0.2.1:8080".into(), 2, "us-west1/us-west1-a".into()),
                ("127.0.2.2:8080".into(), 2, "us-west1/us-west1-a".into()),
                ("127.0.2.3:8080".into(), 2, "us-west1/us-west1-a".into()),
            ]
        );
        assert_eq!(expanded.named_endpoints, db.named_endpoints);
        // Only services with names are rebuilt.
        let all = expand_all(&config, &names);
        assert!(Arc::ptr_eq(&all.services[1], &config.services[1]));
        assert_eq!(*all.services[0], expanded);
        assert_eq!(users_of(&config, "west.example", &names).len(), 1);
        assert!(users_of(&config, "other.example", &names).is_empty());
    }

    /// One service `db` of `endpoints` (a YAML flow list), resolving names, with its
    /// names tracked.
    fn tracked(endpoints: &str) -> (Config, Names, Instant) {
        let yaml = format!(
            "services:\n- name: db\n  vips: [10.9.0.1]\n  ports: [{{number: 80}}]\n  resolution: DNS\n  endpoints: {endpoints}\n"
        );
        let config = config::parse(&yaml).unwrap();
        let now = Instant::now();
        let mut names = Names::new(TtlBounds::default());
        names.track(&config, now);
        (config, names, now)
    }

    #[test]
    fn an_address_two_names_share_is_one_endpoint() {
        let (config, mut names, now) =
            tracked("[{address: 127.0.0.9}, {address: a.example}, {address: b.example}]");
        names.record("a.example", answer(&["127.0.0.9", "127.0.0.8"], 30), now);
        names.record("b.example", answer(&["127.0.0.8"], 30), now);
        let expanded = expand(config.service("db").unwrap(), &names);
        let addresses: Vec<String> = endpoints(&expanded).into_iter().map(|e| e.0).collect();
        assert_eq!(addresses, ["127.0.0.9:80", "127.0.0.8:80"]);
    }

    #[test]
    fn weights_past_the_exact_scale_are_rounded_not_lost() {
        let (config, mut names, now) = tracked(
            "[{address: a.example, weight: 1000000}, {address: b.example}, {address: c.example}]",
        );
        let many = |base: u8, n: u8| -> Vec<String> {
            (0..n).map(|i| format!("127.{base}.0.{}", i + 1)).collect()
        };
        let refs = |v: &[String]| -> Result<Answer, String> {
            Ok(Answer {
                addresses: v.iter().map(|a| a.parse().unwrap()).collect(),
                ttl: Duration::from_secs(30),
            })
        };
        // lcm(97, 89, 83) is far past the cap.
        names.record("a.example", refs(&many(1, 97)), now);
        names.record("b.example", refs(&many(2, 89)), now);
        names.record("c.example", refs(&many(3, 83)), now);
        let expanded = expand(config.service("db").unwrap(), &names);
        assert_eq!(expanded.endpoints.len(), 97 + 89 + 83);
        assert!(expanded.endpoints.iter().all(|e| e.weight >= 1));
        assert_eq!(
            expanded.endpoints[0].weight,
            (1_000_000 * MAX_WEIGHT_SCALE / 97) as u32
        );
    }
}
