//! Passive health: the outcomes of real connections + the time → which backends are
//! ejected, and when they come back.
//!
//! This is Envoy's consecutive-failure outlier detection with Istio's field names, run
//! on one timer per backend instead of a periodic sweep. One [`OutlierDetector`] serves
//! one service: the caller feeds it connection outcomes ([`OutlierDetector::observe`]),
//! wakes it at [`OutlierDetector::next_deadline`] ([`OutlierDetector::advance`]) and keeps
//! ejected backends out of the kernel table ([`OutlierDetector::is_ejected`]).
//!
//! Semantics, as in Envoy's `source/common/upstream/outlier_detection_impl.cc`:
//! - `consecutive_failures` failed connects in a row, of any [`FailureKind`], eject a
//!   backend; a success resets the count. Reaching the threshold resets it too, whether
//!   the ejection happened or the cap refused it, so a refused backend is tried again
//!   only after another run of failures.
//! - Each ejection lasts `min(base_ejection_time × multiplier, max_ejection_time)`. The
//!   multiplier grows by one per ejection and shrinks by one per `interval` the backend
//!   spends not ejected, never below 0 (Envoy's `eject_time_backoff_`).
//! - A backend is restored when its ejection time has passed, with its failure count at
//!   0 so that a few new failures do not eject it again at once.
//! - While ejected, observations change nothing: the ejection runs its course (in Envoy
//!   only an active health check cuts it short; here that is [`OutlierDetector::restore`]).
//! - `max_ejection_percent` caps the ejected share of each locality tier, counted after
//!   the ejection: a backend is ejected only if `ejected + 1 <= floor(percent × tier
//!   size / 100)`. That is Envoy since envoyproxy/envoy#27909 (2023), where a cluster
//!   smaller than `100 / percent` ejects nobody unless `always_eject_one_host` (#34796,
//!   off by default) is set; before it, Envoy compared the share *before* the ejection,
//!   so it always allowed one and could overshoot (2 of 3 hosts at 50%, #26877). detour
//!   has no "always one" switch; its default of 100% makes it unnecessary.
//!
//! Differences from Envoy, all deliberate:
//! - restoration and multiplier decay run on each backend's own deadline, so a backend
//!   comes back at exactly `ejected_until` rather than at the first sweep after it;
//!   `interval` only paces the decay, the first step one `interval` after restoration;
//! - the multiplier stops growing at the first value whose ejection time reaches
//!   `max_ejection_time` (Envoy lets it go one step further), so every decay step after a
//!   long outage shortens the next ejection;
//! - the cap is per tier, not per cluster, and defaults to 100% (see
//!   [`EjectionSettings::max_ejection_percent`]);
//! - no ejection-time jitter (Envoy's `max_ejection_time_jitter`, which defaults to 0).
//!
//! Invariants:
//! - no ejection made by [`OutlierDetector::observe`] takes a tier past its cap; a tier
//!   that shrinks through [`OutlierDetector::set_backends`] keeps the ejections it has
//!   until they end;
//! - a backend is ejected from its [`Event::Ejected`] until its [`Event::Restored`]; even
//!   past `ejected_until` it stays ejected until [`OutlierDetector::advance`] reports the
//!   restoration, so the caller's kernel table and this module never disagree;
//! - after `advance(now)`, [`OutlierDetector::next_deadline`] is `None` or later than
//!   `now`: all work due by `now` is done;
//! - events come out in key order, so a run is reproducible.
//!
//! Pure: no I/O, no clock (time comes in as an argument), no randomness.

use std::fmt;
use std::time::{Duration, Instant};

use litemap::LiteMap;
use serde::Serialize;

/// The longest duration a policy accepts, so that no deadline can overflow an
/// [`Instant`].
pub const MAX_POLICY_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Why a set of [`EjectionSettings`] is refused. Field names are Istio's, as a user
/// writes them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutlierError {
    #[error("outlierDetection.interval must be greater than 0")]
    ZeroInterval,
    #[error("outlierDetection.baseEjectionTime must be greater than 0")]
    ZeroBaseEjectionTime,
    #[error(
        "outlierDetection.maxEjectionTime ({max:?}) must be at least baseEjectionTime ({base:?})"
    )]
    MaxBelowBase { base: Duration, max: Duration },
    #[error("outlierDetection.{field} ({value:?}) must be at most {MAX_POLICY_DURATION:?}")]
    TooLong {
        field: &'static str,
        value: Duration,
    },
    #[error("outlierDetection.maxEjectionPercent ({0}) must be between 0 and 100")]
    MaxEjectionPercentOutOfRange(u32),
    #[error("outlierDetection.minHealthPercent ({0}) must be between 0 and 100")]
    PanicThresholdOutOfRange(u32),
}

/// What a user configures, before validation. [`Default`] gives Envoy's and Istio's
/// defaults except where noted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionSettings {
    /// Failed connects in a row that eject a backend; 0 turns passive ejection off.
    /// Istio's `consecutiveErrors`, `consecutive5xxErrors` and
    /// `consecutiveLocalOriginFailures`, Envoy's `consecutive_5xx` and
    /// `consecutive_local_origin_failure` all mean this at L4, where every failure is a
    /// failed connection. Default 5.
    pub consecutive_failures: u32,
    /// How often a backend that is not ejected loses one step of its ejection
    /// multiplier. Envoy's sweep interval; detour has no sweep. Default 10s.
    pub interval: Duration,
    /// The first ejection's length, and the step by which later ones grow. Default 30s.
    pub base_ejection_time: Duration,
    /// The longest an ejection lasts, however often the backend failed. At least
    /// `base_ejection_time`. Default 300s.
    pub max_ejection_time: Duration,
    /// The largest share of a locality tier that may be ejected at once, 0..=100; 0
    /// turns ejection off.
    ///
    /// Default 100, not Envoy's and Istio's 10: their cap counts the whole cluster, and
    /// with 10% a pool of fewer than ten backends can eject none of them (or only one,
    /// in Envoy before 2023). A dead backend then keeps its traffic, and a dead primary
    /// tier never fails over, which is why failover setups (Gloo's among them) have to
    /// set 100%. Here the cap applies per tier, and when every backend of a tier is
    /// ejected, selection moves to the next tier, which is the point of failover.
    pub max_ejection_percent: u32,
    /// Envoy's `healthy_panic_threshold`, Istio's `minHealthPercent`: a tier whose share
    /// of usable backends is below it sends to all of its backends, while the tiers
    /// together are short of capacity; see [`crate::selection::Balance`]. 0..=100; 0
    /// turns it off.
    ///
    /// Default 0, as in Istio ("not typically applicable in k8s environments with few
    /// pods per service"), not Envoy's 50: with 50, three dead backends out of four
    /// would get three connections in four instead of being left out.
    /// Selection never black-holes a service anyway: with no usable backend at all it
    /// uses every backend whatever this says.
    pub panic_threshold_percent: u32,
}

impl Default for EjectionSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 100,
            panic_threshold_percent: 0,
        }
    }
}

/// Validated [`EjectionSettings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    settings: EjectionSettings,
    /// The multiplier's ceiling: the first one whose ejection reaches the maximum.
    max_multiplier: u32,
}

impl EjectionPolicy {
    pub fn try_new(settings: EjectionSettings) -> Result<Self, OutlierError> {
        let EjectionSettings {
            interval,
            base_ejection_time: base,
            max_ejection_time: max,
            max_ejection_percent,
            panic_threshold_percent,
            ..
        } = settings;
        if interval.is_zero() {
            return Err(OutlierError::ZeroInterval);
        }
        if base.is_zero() {
            return Err(OutlierError::ZeroBaseEjectionTime);
        }
        if max < base {
            return Err(OutlierError::MaxBelowBase { base, max });
        }
        for (field, value) in [("interval", interval), ("maxEjectionTime", max)] {
            if value > MAX_POLICY_DURATION {
                return Err(OutlierError::TooLong { field, value });
            }
        }
        if max_ejection_percent > 100 {
            return Err(OutlierError::MaxEjectionPercentOutOfRange(
                max_ejection_percent,
            ));
        }
        if panic_threshold_percent > 100 {
            return Err(OutlierError::PanicThresholdOutOfRange(
                panic_threshold_percent,
            ));
        }
        let max_multiplier = max.as_nanos().div_ceil(base.as_nanos());
        Ok(Self {
            settings,
            max_multiplier: u32::try_from(max_multiplier).unwrap_or(u32::MAX),
        })
    }

    pub fn settings(&self) -> &EjectionSettings {
        &self.settings
    }

    /// How long an ejection with this multiplier lasts.
    pub fn ejection_time(&self, multiplier: u32) -> Duration {
        self.settings
            .base_ejection_time
            .saturating_mul(multiplier)
            .min(self.settings.max_ejection_time)
    }

    /// How many backends of a tier of `tier_size` may be ejected at once.
    pub fn max_ejected(&self, tier_size: usize) -> usize {
        let allowed = u128::from(self.settings.max_ejection_percent) * tier_size as u128 / 100;
        // Never more than tier_size, so it fits.
        usize::try_from(allowed).unwrap_or(tier_size)
    }
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self::try_new(EjectionSettings::default()).expect("the defaults are valid")
    }
}

/// How a connection to a backend failed, as the kernel saw it. All kinds count alike;
/// the kind is for logs, metrics and the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Reset during the handshake: nothing listens.
    Refused,
    /// Reset during the handshake by something other than a closed port.
    Reset,
    /// The handshake did not complete in time: a black hole.
    Timeout,
    /// Reset after the connection was established.
    ResetAfterEstablished,
    /// Connected, and the TLS handshake the originator started failed or timed out
    /// (a wrong certificate, a server that does not speak TLS).
    Tls,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::ResetAfterEstablished => "reset-after-established",
            Self::Tls => "tls-handshake",
        })
    }
}

/// One connection's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure(FailureKind),
}

/// Why a backend that reached the threshold was not ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// `max_ejected` backends of its tier are ejected already.
    CapReached {
        tier: usize,
        ejected: usize,
        max_ejected: usize,
    },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CapReached {
                tier,
                ejected,
                max_ejected,
            } => write!(
                f,
                "maxEjectionPercent reached in tier {tier} ({ejected} of at most {max_ejected} ejected)"
            ),
        }
    }
}

/// A change the caller acts on (the kernel table) or reports (logs, `detour events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<K> {
    Ejected {
        key: K,
        until: Instant,
        /// How many times this backend has been ejected, this one included.
        ejection_count: u32,
        /// The failure that completed the run.
        kind: FailureKind,
    },
    Restored {
        key: K,
    },
    /// The backend reached the threshold but stays in; its count starts over.
    EjectionSkipped {
        key: K,
        kind: FailureKind,
        reason: SkipReason,
    },
}

/// What the CLI shows about one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendOutlierState {
    pub tier: usize,
    /// `Some` while ejected. It can be in the past until [`OutlierDetector::advance`]
    /// restores the backend.
    pub ejected_until: Option<Instant>,
    pub ejections_total: u32,
    /// Failures in the current run; 0 while ejected or after a success.
    pub consecutive_failures: u32,
    /// One up per ejection (up to the step that reaches the max), one down per
    /// `interval` out of ejection: an ejection now would last `base_ejection_time ×
    /// (multiplier + 1)`, capped.
    pub multiplier: u32,
}

impl BackendOutlierState {
    pub fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// The ejection time left at `now`; zero when not ejected or already due.
    pub fn time_left(&self, now: Instant) -> Duration {
        self.ejected_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
    }
}

/// 40 bytes: at 100,000 backends every byte here is 100 KB.
#[derive(Debug, Clone)]
struct Backend {
    tier: u32,
    consecutive_failures: u32,
    ejections_total: u32,
    multiplier: u32,
    /// While `ejected`, when the ejection ends (it can be in the past until
    /// [`OutlierDetector::advance`]). Otherwise when the multiplier next loses a step:
    /// `Some` exactly when the multiplier is above 0. One field for both, as a backend
    /// is never ejected and decaying at once.
    deadline: Option<Instant>,
    ejected: bool,
}

impl Backend {
    fn new(tier: usize) -> Self {
        Self {
            tier: tier_u32(tier),
            consecutive_failures: 0,
            ejections_total: 0,
            multiplier: 0,
            deadline: None,
            ejected: false,
        }
    }

    fn ejected_until(&self) -> Option<Instant> {
        self.deadline.filter(|_| self.ejected)
    }

    fn next_decay(&self) -> Option<Instant> {
        self.deadline.filter(|_| !self.ejected)
    }

    /// Applies every decay step due by `now`, however late the caller is.
    fn decay(&mut self, now: Instant, interval: Duration) {
        let Some(due) = self.next_decay().filter(|due| *due <= now) else {
            return;
        };
        let late = now.duration_since(due).as_nanos() / interval.as_nanos();
        let steps = u32::try_from(late.saturating_add(1)).unwrap_or(u32::MAX);
        self.multiplier = self.multiplier.saturating_sub(steps);
        // The new deadline is at most `now + interval`, so it cannot overflow.
        self.deadline = (self.multiplier > 0).then(|| due + interval * steps);
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn state(&self) -> BackendOutlierState {
        BackendOutlierState {
            tier: self.tier as usize,
            ejected_until: self.ejected_until(),
            ejections_total: self.ejections_total,
            consecutive_failures: self.consecutive_failures,
            multiplier: self.multiplier,
        }
    }
}

/// A tier number as stored: tiers are a handful, so the cast never saturates in use.
fn tier_u32(tier: usize) -> u32 {
    u32::try_from(tier).unwrap_or(u32::MAX)
}

/// Outlier state of one service's backends. See the module docs for the rules.
///
/// The backends are a sorted vector (`LiteMap`), exactly as long as the set: a service
/// has some ten backends, and a B-tree's node has room for eleven whatever it holds.
#[derive(Debug, Clone)]
pub struct OutlierDetector<K> {
    policy: EjectionPolicy,
    backends: LiteMap<K, Backend>,
}

impl<K: Ord + Clone> OutlierDetector<K> {
    pub fn new(policy: EjectionPolicy) -> Self {
        Self {
            policy,
            backends: LiteMap::new(),
        }
    }

    pub fn policy(&self) -> &EjectionPolicy {
        &self.policy
    }

    /// Replaces the set of backends, each with its locality tier. Backends that stay keep
    /// their state, ejection included, and take their new tier; new ones start clean;
    /// the others are forgotten without an event (the caller removes them anyway). A key
    /// given twice takes its last tier.
    pub fn set_backends(&mut self, backends: impl IntoIterator<Item = (K, usize)>) {
        // Sorted first, so the new map is built by appends, not by inserts that shift;
        // stable, so the last of a repeated key is the last of its run.
        let mut wanted: Vec<(K, usize)> = backends.into_iter().collect();
        wanted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut old = std::mem::take(&mut self.backends);
        let mut new = LiteMap::with_capacity(wanted.len());
        let mut wanted = wanted.into_iter().peekable();
        while let Some((key, tier)) = wanted.next() {
            if wanted.peek().is_some_and(|(next, _)| *next == key) {
                continue;
            }
            let mut backend = old.remove(&key).unwrap_or_else(|| Backend::new(tier));
            backend.tier = tier_u32(tier);
            new.insert(key, backend);
        }
        self.backends = new;
    }

    /// Records one connection's outcome at `now`. Returns what changed, if anything.
    /// Outcomes for unknown backends (a report racing a removal) are ignored.
    pub fn observe(&mut self, key: &K, outcome: Outcome, now: Instant) -> Option<Event<K>> {
        let interval = self.policy.settings.interval;
        let threshold = self.policy.settings.consecutive_failures;
        let backend = self.backends.get_mut(key)?;
        if backend.ejected {
            return None;
        }
        // The multiplier an ejection now would start from must not depend on how
        // recently the caller ran `advance`.
        backend.decay(now, interval);
        let kind = match outcome {
            Outcome::Success => {
                backend.consecutive_failures = 0;
                return None;
            }
            Outcome::Failure(kind) => kind,
        };
        backend.consecutive_failures = backend.consecutive_failures.saturating_add(1);
        if threshold == 0 || backend.consecutive_failures < threshold {
            return None;
        }
        backend.consecutive_failures = 0;
        let tier = backend.tier;

        let (mut size, mut ejected) = (0, 0);
        for other in self.backends.values().filter(|other| other.tier == tier) {
            size += 1;
            ejected += usize::from(other.ejected);
        }
        let max_ejected = self.policy.max_ejected(size);
        if ejected >= max_ejected {
            return Some(Event::EjectionSkipped {
                key: key.clone(),
                kind,
                reason: SkipReason::CapReached {
                    tier: tier as usize,
                    ejected,
                    max_ejected,
                },
            });
        }

        let backend = self.backends.get_mut(key)?;
        backend.multiplier = backend
            .multiplier
            .saturating_add(1)
            .min(self.policy.max_multiplier);
        backend.ejections_total = backend.ejections_total.saturating_add(1);
        let until = now + self.policy.ejection_time(backend.multiplier);
        backend.deadline = Some(until);
        backend.ejected = true;
        Some(Event::Ejected {
            key: key.clone(),
            until,
            ejection_count: backend.ejections_total,
            kind,
        })
    }

    /// Ends an ejection early, for a backend an active health check found healthy
    /// (Envoy's `successful_active_health_check_uneject_host`, on by default there).
    /// The multiplier is kept and starts decaying from `now`. `None` if not ejected.
    pub fn restore(&mut self, key: &K, now: Instant) -> Option<Event<K>> {
        let interval = self.policy.settings.interval;
        let backend = self.backends.get_mut(key)?;
        backend.ejected_until()?;
        Self::end_ejection(backend, now, interval);
        Some(Event::Restored { key: key.clone() })
    }

    /// The next time [`advance`](Self::advance) has work: an ejection ending or a
    /// multiplier step decaying. `None` when there is nothing to wait for.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.backends.values().filter_map(Backend::deadline).min()
    }

    /// Restores every backend whose ejection ended by `now` and decays multipliers.
    /// Restorations are reported in key order.
    pub fn advance(&mut self, now: Instant) -> Vec<Event<K>> {
        let interval = self.policy.settings.interval;
        let mut events = Vec::new();
        for (key, backend) in &mut self.backends {
            if let Some(until) = backend.ejected_until().filter(|until| *until <= now) {
                // Decay counts from the end of the ejection, not from when the caller
                // got round to it.
                Self::end_ejection(backend, until, interval);
                events.push(Event::Restored { key: key.clone() });
            }
            backend.decay(now, interval);
        }
        events
    }

    fn end_ejection(backend: &mut Backend, at: Instant, interval: Duration) {
        backend.ejected = false;
        backend.consecutive_failures = 0;
        backend.deadline = (backend.multiplier > 0).then(|| at + interval);
    }

    pub fn is_ejected(&self, key: &K) -> bool {
        self.backends
            .get(key)
            .is_some_and(|backend| backend.ejected)
    }

    /// `None` for a backend not in the set.
    pub fn state(&self, key: &K) -> Option<BackendOutlierState> {
        self.backends.get(key).map(Backend::state)
    }

    /// Every backend's state, in key order.
    pub fn states(&self) -> impl Iterator<Item = (&K, BackendOutlierState)> {
        self.backends
            .iter()
            .map(|(key, backend)| (key, backend.state()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use FailureKind::{Refused, Timeout};
    use Outcome::{Failure, Success};

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// base 30s, max 100s: ejections last 30s, 60s, 90s, then 100s. Interval 10s.
    fn policy(consecutive_failures: u32, max_ejection_percent: u32) -> EjectionPolicy {
        EjectionPolicy::try_new(EjectionSettings {
            consecutive_failures,
            interval: secs(10),
            base_ejection_time: secs(30),
            max_ejection_time: secs(100),
            max_ejection_percent,
            panic_threshold_percent: 0,
        })
        .unwrap()
    }

    fn detector(
        policy: EjectionPolicy,
        backends: &[(&'static str, usize)],
    ) -> OutlierDetector<&'static str> {
        let mut detector = OutlierDetector::new(policy);
        detector.set_backends(backends.iter().copied());
        detector
    }

    fn ejected(key: &'static str, until: Instant, ejection_count: u32) -> Event<&'static str> {
        Event::Ejected {
            key,
            until,
            ejection_count,
            kind: Refused,
        }
    }

    fn multiplier(detector: &OutlierDetector<&'static str>, key: &'static str) -> u32 {
        detector.state(&key).unwrap().multiplier
    }

    #[test]
    fn a_backends_state_stays_40_bytes() {
        // Kept per backend of every service: 100,000 of them at the scale detour aims
        // at.
        assert_eq!(std::mem::size_of::<Backend>(), 40);
    }

    #[test]
    fn one_failure_ejects_with_a_threshold_of_one() {
        let t0 = Instant::now();
        let mut d = detector(policy(1, 100), &[("a", 0), ("b", 0)]);
        assert_eq!(
            d.observe(&"a", Failure(Refused), t0),
            Some(ejected("a", t0 + secs(30), 1))
        );
        assert!(d.is_ejected(&"a"));
        assert!(!d.is_ejected(&"b"));
    }

    #[test]
    fn only_consecutive_failures_count_and_a_success_starts_over() {
        let t0 = Instant::now();
        let mut d = detector(policy(3, 100), &[("a", 0)]);
        assert_eq!(d.observe(&"a", Failure(Refused), t0), None);
        assert_eq!(d.observe(&"a", Failure(Timeout), t0), None);
        assert_eq!(d.state(&"a").unwrap().consecutive_failures, 2);
        assert_eq!(d.observe(&"a", Success, t0), None);
        assert_eq!(d.state(&"a").unwrap().consecutive_failures, 0);
        assert_eq!(d.observe(&"a", Failure(Timeout), t0), None);
        assert_eq!(d.observe(&"a", Failure(Timeout), t0), None);
        assert!(!d.is_ejected(&"a"));
        assert_eq!(
            d.observe(&"a", Failure(Refused), t0),
            Some(ejected("a", t0 + secs(30), 1)),
            "the failure that completes the run is the one reported"
        );
        let state = d.state(&"a").unwrap();
        assert_eq!(state.consecutive_failures, 0);
        assert_eq!(state.ejections_total, 1);
    }

    #[test]
    fn ejection_time_grows_by_base_up_to_max() {
        let mut now = Instant::now();
        let mut d = detector(policy(1, 100), &[("a", 0)]);
        let mut lengths = Vec::new();
        for count in 1..=6 {
            let Some(Event::Ejected {
                until,
                ejection_count,
                ..
            }) = d.observe(&"a", Failure(Refused), now)
            else {
                panic!("ejection {count} did not happen");
            };
            assert_eq!(ejection_count, count);
            lengths.push((until - now).as_secs());
            assert_eq!(d.advance(until), vec![Event::Restored { key: "a" }]);
            // Fails again the moment it is back, before any decay.
            now = until;
        }
        assert_eq!(lengths, [30, 60, 90, 100, 100, 100]);
        // The multiplier stopped at the first step that reached the max.
        assert_eq!(multiplier(&d, "a"), 4);
    }

    #[test]
    fn the_multiplier_decays_one_step_per_interval_out_of_ejection() {
        let mut now = Instant::now();
        let mut d = detector(policy(1, 100), &[("a", 0)]);
        for _ in 0..3 {
            d.observe(&"a", Failure(Refused), now);
            now = d.state(&"a").unwrap().ejected_until.unwrap();
            d.advance(now);
        }
        let back = now;
        assert_eq!(multiplier(&d, "a"), 3);
        assert_eq!(d.next_deadline(), Some(back + secs(10)));
        d.advance(back + secs(10) - Duration::from_nanos(1));
        assert_eq!(multiplier(&d, "a"), 3);
        d.advance(back + secs(10));
        assert_eq!(multiplier(&d, "a"), 2);
        assert_eq!(d.next_deadline(), Some(back + secs(20)));
        // A late wake-up catches up on every step it missed, and no more.
        d.advance(back + secs(25));
        assert_eq!(multiplier(&d, "a"), 1);
        assert_eq!(d.next_deadline(), Some(back + secs(30)));
        d.advance(back + secs(30));
        assert_eq!(multiplier(&d, "a"), 0);
        assert_eq!(d.next_deadline(), None);
        // Fully decayed: the next ejection is as short as the first.
        let now = back + secs(31);
        assert_eq!(
            d.observe(&"a", Failure(Refused), now),
            Some(ejected("a", now + secs(30), 4))
        );
    }

    #[test]
    fn decay_does_not_wait_for_advance() {
        let t0 = Instant::now();
        let mut d = detector(policy(1, 100), &[("a", 0)]);
        d.observe(&"a", Failure(Refused), t0);
        d.advance(t0 + secs(30));
        d.observe(&"a", Failure(Refused), t0 + secs(30));
        d.advance(t0 + secs(90));
        assert_eq!(multiplier(&d, "a"), 2);
        // Two intervals later, without an `advance` in between.
        let now = t0 + secs(110);
        assert_eq!(
            d.observe(&"a", Failure(Refused), now),
            Some(ejected("a", now + secs(30), 3))
        );
        assert_eq!(multiplier(&d, "a"), 1);
    }

    #[test]
    fn restoration_happens_exactly_at_ejected_until() {
        let t0 = Instant::now();
        let until = t0 + secs(30);
        let mut d = detector(policy(2, 100), &[("a", 0)]);
        d.observe(&"a", Failure(Refused), t0);
        d.observe(&"a", Failure(Refused), t0);
        assert_eq!(d.next_deadline(), Some(until));
        assert_eq!(d.state(&"a").unwrap().time_left(t0 + secs(20)), secs(10));

        // Failures and successes while ejected change nothing.
        assert_eq!(d.observe(&"a", Failure(Refused), t0 + secs(1)), None);
        assert_eq!(d.observe(&"a", Success, t0 + secs(1)), None);
        assert_eq!(d.state(&"a").unwrap().ejected_until, Some(until));

        assert_eq!(d.advance(until - Duration::from_nanos(1)), vec![]);
        assert!(d.is_ejected(&"a"));
        assert_eq!(d.advance(until), vec![Event::Restored { key: "a" }]);
        let state = d.state(&"a").unwrap();
        assert!(!state.is_ejected());
        assert_eq!(state.time_left(until), Duration::ZERO);
        assert_eq!(d.advance(until), vec![], "restored once");

        // The count starts over: one more failure is not enough.
        assert_eq!(d.observe(&"a", Failure(Refused), until), None);
        assert!(!d.is_ejected(&"a"));
    }

    #[test]
    fn a_late_advance_still_restores_and_decays_from_ejected_until() {
        let t0 = Instant::now();
        let mut d = detector(policy(1, 100), &[("a", 0)]);
        d.observe(&"a", Failure(Refused), t0);
        // Past `until` but not yet advanced: still ejected, as the kernel table is.
        assert!(d.is_ejected(&"a"));
        assert_eq!(d.advance(t0 + secs(45)), vec![Event::Restored { key: "a" }]);
        assert_eq!(multiplier(&d, "a"), 0, "restored at 30s, decayed at 40s");
    }

    #[test]
    fn an_active_check_can_end_an_ejection_early() {
        let t0 = Instant::now();
        let mut d = detector(policy(1, 100), &[("a", 0), ("b", 0)]);
        d.observe(&"a", Failure(Refused), t0);
        assert_eq!(
            d.restore(&"a", t0 + secs(5)),
            Some(Event::Restored { key: "a" })
        );
        assert!(!d.is_ejected(&"a"));
        assert_eq!(
            d.next_deadline(),
            Some(t0 + secs(15)),
            "decay counts from the restore"
        );
        assert_eq!(d.restore(&"a", t0 + secs(6)), None);
        assert_eq!(d.restore(&"b", t0), None);
        assert_eq!(d.restore(&"nobody", t0), None);
    }

    #[test]
    fn the_cap_applies_per_tier() {
        let t0 = Instant::now();
        let mut d = detector(
            policy(1, 50),
            &[("a", 0), ("b", 0), ("c", 1), ("d", 1), ("solo", 2)],
        );
        assert_eq!(
            d.observe(&"a", Failure(Refused), t0),
            Some(ejected("a", t0 + secs(30), 1))
        );
        assert_eq!(
            d.observe(&"b", Failure(Timeout), t0),
            Some(Event::EjectionSkipped {
                key: "b",
                kind: Timeout,
                reason: SkipReason::CapReached {
                    tier: 0,
                    ejected: 1,
                    max_ejected: 1
                },
            })
        );
        assert!(!d.is_ejected(&"b"));
        assert_eq!(d.state(&"b").unwrap().consecutive_failures, 0);
        // Another tier has its own budget.
        assert_eq!(
            d.observe(&"c", Failure(Refused), t0),
            Some(ejected("c", t0 + secs(30), 1))
        );
        // 50% of one backend is none.
        assert!(matches!(
            d.observe(&"solo", Failure(Refused), t0),
            Some(Event::EjectionSkipped {
                reason: SkipReason::CapReached { max_ejected: 0, .. },
                ..
            })
        ));
        // Once `a` is back, `b` may go.
        d.advance(t0 + secs(30));
        assert_eq!(
            d.observe(&"b", Failure(Refused), t0 + secs(30)),
            Some(ejected("b", t0 + secs(60), 1))
        );
    }

    #[test]
    fn by_default_a_whole_tier_can_be_ejected() {
        let t0 = Instant::now();
        let policy = EjectionPolicy::try_new(EjectionSettings {
            consecutive_failures: 1,
            ..EjectionSettings::default()
        })
        .unwrap();
        let mut d = detector(policy, &[("a", 0), ("b", 0), ("c", 0), ("standby", 1)]);
        for key in ["a", "b", "c"] {
            assert!(matches!(
                d.observe(&key, Failure(Refused), t0),
                Some(Event::Ejected { .. })
            ));
        }
        assert!(!d.is_ejected(&"standby"));
    }

    #[test]
    fn zero_turns_ejection_off() {
        let t0 = Instant::now();
        let mut d = detector(policy(0, 100), &[("a", 0)]);
        for _ in 0..100 {
            assert_eq!(d.observe(&"a", Failure(Refused), t0), None);
        }
        let mut d = detector(policy(1, 0), &[("a", 0), ("b", 0)]);
        assert!(matches!(
            d.observe(&"a", Failure(Refused), t0),
            Some(Event::EjectionSkipped { .. })
        ));
        assert!(!d.is_ejected(&"a"));
    }

    #[test]
    fn set_backends_keeps_state_of_kept_backends_and_forgets_the_rest() {
        let t0 = Instant::now();
        let mut d = detector(policy(2, 100), &[("a", 0), ("b", 0)]);
        d.observe(&"a", Failure(Refused), t0);
        d.observe(&"a", Failure(Refused), t0);
        d.observe(&"b", Failure(Refused), t0);

        d.set_backends([("a", 1), ("c", 0), ("c", 2)]);
        let a = d.state(&"a").unwrap();
        assert_eq!(
            (a.tier, a.ejected_until, a.ejections_total),
            (1, Some(t0 + secs(30)), 1)
        );
        assert_eq!(d.state(&"b"), None);
        assert_eq!(d.observe(&"b", Failure(Refused), t0), None);
        let c = d.state(&"c").unwrap();
        assert_eq!(
            (c.tier, c.ejected_until, c.consecutive_failures),
            (2, None, 0)
        );

        // Coming back, `b` starts clean: its earlier failure is forgotten.
        d.set_backends([("a", 1), ("b", 0), ("c", 2)]);
        assert_eq!(d.observe(&"b", Failure(Refused), t0), None);
        assert!(!d.is_ejected(&"b"));
        let keys: Vec<_> = d.states().map(|(key, _)| *key).collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }

    #[test]
    fn next_deadline_is_the_earliest_restoration_or_decay() {
        let t0 = Instant::now();
        let mut d = detector(policy(1, 100), &[("a", 0), ("b", 0), ("c", 0)]);
        assert_eq!(d.next_deadline(), None);
        d.observe(&"b", Failure(Refused), t0 + secs(5));
        d.observe(&"a", Failure(Refused), t0);
        assert_eq!(d.next_deadline(), Some(t0 + secs(30)));

        assert_eq!(d.advance(t0 + secs(30)), vec![Event::Restored { key: "a" }]);
        assert_eq!(d.next_deadline(), Some(t0 + secs(35)), "b's restoration");
        assert_eq!(d.advance(t0 + secs(35)), vec![Event::Restored { key: "b" }]);
        assert_eq!(d.next_deadline(), Some(t0 + secs(40)), "a's decay");
        assert_eq!(d.advance(t0 + secs(40)), vec![]);
        assert_eq!(d.next_deadline(), Some(t0 + secs(45)), "b's decay");
        d.advance(t0 + secs(45));
        assert_eq!(d.next_deadline(), None);

        // Simultaneous restorations come out in key order.
        d.observe(&"c", Failure(Refused), t0 + secs(50));
        d.observe(&"a", Failure(Refused), t0 + secs(50));
        assert_eq!(
            d.advance(t0 + secs(80)),
            vec![Event::Restored { key: "a" }, Event::Restored { key: "c" }]
        );
    }

    #[test]
    fn policies_are_validated_with_the_field_at_fault() {
        let valid = EjectionSettings::default();
        let check = |settings: EjectionSettings| EjectionPolicy::try_new(settings).map(|_| ());
        assert_eq!(check(valid), Ok(()));
        assert_eq!(
            EjectionPolicy::default().settings().max_ejection_percent,
            100
        );
        assert_eq!(
            EjectionPolicy::default().settings().panic_threshold_percent,
            0
        );
        assert_eq!(
            check(EjectionSettings {
                max_ejection_time: valid.base_ejection_time,
                max_ejection_percent: 100,
                panic_threshold_percent: 100,
                ..valid
            }),
            Ok(())
        );

        assert_eq!(
            check(EjectionSettings {
                interval: Duration::ZERO,
                ..valid
            }),
            Err(OutlierError::ZeroInterval)
        );
        assert_eq!(
            check(EjectionSettings {
                base_ejection_time: Duration::ZERO,
                ..valid
            }),
            Err(OutlierError::ZeroBaseEjectionTime)
        );
        let below = check(EjectionSettings {
            base_ejection_time: secs(60),
            max_ejection_time: secs(59),
            ..valid
        })
        .unwrap_err();
        assert_eq!(
            below,
            OutlierError::MaxBelowBase {
                base: secs(60),
                max: secs(59)
            }
        );
        assert_eq!(
            below.to_string(),
            "outlierDetection.maxEjectionTime (59s) must be at least baseEjectionTime (60s)"
        );
        assert_eq!(
            check(EjectionSettings {
                max_ejection_time: MAX_POLICY_DURATION + secs(1),
                ..valid
            }),
            Err(OutlierError::TooLong {
                field: "maxEjectionTime",
                value: MAX_POLICY_DURATION + secs(1)
            })
        );
        assert!(matches!(
            check(EjectionSettings {
                interval: Duration::MAX,
                ..valid
            }),
            Err(OutlierError::TooLong {
                field: "interval",
                ..
            })
        ));
        assert_eq!(
            check(EjectionSettings {
                max_ejection_percent: 101,
                ..valid
            }),
            Err(OutlierError::MaxEjectionPercentOutOfRange(101))
        );
        assert_eq!(
            check(EjectionSettings {
                panic_threshold_percent: 101,
                ..valid
            }),
            Err(OutlierError::PanicThresholdOutOfRange(101))
        );
    }

    #[test]
    fn events_read_well_in_logs() {
        assert_eq!(
            FailureKind::ResetAfterEstablished.to_string(),
            "reset-after-established"
        );
        let reason = SkipReason::CapReached {
            tier: 0,
            ejected: 1,
            max_ejected: 1,
        };
        assert_eq!(
            reason.to_string(),
            "maxEjectionPercent reached in tier 0 (1 of at most 1 ejected)"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Observe { backend: usize, success: bool },
            Advance { by_ms: u64 },
            Restore { backend: usize },
        }

        const BACKENDS: usize = 7;

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0..BACKENDS, prop::bool::weighted(0.3))
                    .prop_map(|(backend, success)| Op::Observe { backend, success }),
                3 => (0u64..40_000).prop_map(|by_ms| Op::Advance { by_ms }),
                1 => (0..BACKENDS).prop_map(|backend| Op::Restore { backend }),
            ]
        }

        proptest! {
            #[test]
            fn no_tier_goes_past_its_cap_and_no_work_is_left_behind(
                tiers in prop::collection::vec(0usize..3, BACKENDS),
                percent in 0u32..=100,
                consecutive in 1u32..4,
                ops in prop::collection::vec(op(), 1..200),
            ) {
                let policy = policy(consecutive, percent);
                let mut d = OutlierDetector::new(policy);
                d.set_backends(tiers.iter().copied().enumerate());
                let mut now = Instant::now();
                for op in ops {
                    match op {
                        Op::Observe { backend, success } => {
                            let outcome = if success { Success } else { Failure(Refused) };
                            if let Some(Event::Ejected { until, .. }) = d.observe(&backend, outcome, now) {
                                let length = until - now;
                                prop_assert!(length >= secs(30) && length <= secs(100));
                            }
                        }
                        Op::Advance { by_ms } => {
                            now += Duration::from_millis(by_ms);
                            d.advance(now);
                            prop_assert!(d.next_deadline().is_none_or(|deadline| deadline > now));
                        }
                        Op::Restore { backend } => {
                            d.restore(&backend, now);
                        }
                    }
                    for tier in 0..3 {
                        let members: Vec<_> = d.states().filter(|(_, s)| s.tier == tier).collect();
                        let ejected = members.iter().filter(|(_, s)| s.is_ejected()).count();
                        prop_assert!(ejected <= policy.max_ejected(members.len()));
                    }
                    for (_, state) in d.states() {
                        prop_assert!(state.multiplier <= 4);
                        prop_assert!(state.is_ejected() || state.consecutive_failures < consecutive);
                    }
                }
            }
        }
    }
}
