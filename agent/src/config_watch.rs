//! When the standalone config file is safe to read: a file is applied whole or not at
//! all, never half-written.
//!
//! A file can change in two ways, and they call for different trust:
//! - **replaced** by a rename (`mv new detour.yaml`, Kubernetes' ConfigMap volumes,
//!   most configuration tools): the new file was complete before it appeared, so it is
//!   read as soon as it is seen;
//! - **written in place** (`cat > detour.yaml`, many editors): the file passes through
//!   every intermediate state, a truncated one first. With inotify the watcher knows a
//!   writer is at work from `IN_MODIFY` until `IN_CLOSE_WRITE`, and never reads in
//!   between, however long the writer pauses; after the close it waits `settle` more.
//!   Without inotify (or after its queue overflowed) it falls back to polling the
//!   file's stamp and reads only once the stamp has stood still for `settle`.
//!
//! What is read must still parse and validate, or it is rejected and the running state
//! keeps serving. A torn file can parse, though: a file cut after its first service is
//! a valid file with fewer services. So a change that came from an in-place write (or
//! from polling) and **removes** anything — a service, a VIP, a port or an endpoint —
//! is applied only after the file has stood still for `removal_hold` too. Additions and
//! edits apply after `settle`. An explicit `SIGHUP` reads and applies at once: it says
//! the writer is done. The one case this cannot catch is a writer that closes the file
//! mid-document, pauses longer than `removal_hold`, and leaves a prefix that parses and
//! removes nothing (e.g. cut inside a service's optional settings): so the documented
//! way to write the file is an atomic rename.
//!
//! [`WriteTracker`] is the decision logic, pure and driven by the caller's clock; the
//! inotify plumbing around it is in [`Watcher`].

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::warn;

use crate::config::Config;
use crate::desired;

/// How long a file must stand still before it is read, and before a read that removes
/// something is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettlePolicy {
    pub settle: Duration,
    pub removal_hold: Duration,
}

/// What the watcher saw happen to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileEvent {
    /// Bytes were written in place (`IN_MODIFY`, which a truncation also raises).
    Modified,
    /// A writer closed the file after writing (`IN_CLOSE_WRITE`).
    WriteClosed,
    /// The file (or the directory entry it resolves through) was replaced by a rename
    /// or created anew.
    Replaced,
    /// Something changed that the watcher could not see precisely: the poll saw a new
    /// stamp, or inotify's queue overflowed.
    Unknown,
}

/// How far the contents of a read can be trusted to be what the writer meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Appeared whole by a rename, or the operator said so (`SIGHUP`): apply it.
    Complete,
    /// Written in place or seen by polling: apply it, but hold removals until the file
    /// has stood still for `removal_hold`.
    InPlace,
}

/// What the caller should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing changed since the last read.
    Idle,
    /// A writer has the file open, or it changed less than `settle` ago: ask again at
    /// this time (or on the next event).
    WaitUntil(Option<Instant>),
    /// Read and parse it now.
    Read(Trust),
}

/// The decision logic: which events happened since the last read, and when.
///
/// Invariant: a file is never read between an `IN_MODIFY` and the `IN_CLOSE_WRITE` that
/// ends it, nor less than `settle` after its last change.
#[derive(Debug, Clone)]
pub struct WriteTracker {
    policy: SettlePolicy,
    /// Something changed since the last read.
    dirty: bool,
    /// A writer modified the file and has not closed it yet.
    writing: bool,
    /// Since the last read, every change was a whole-file replacement.
    only_replaced: bool,
    /// When the file last changed in any way.
    last_change: Option<Instant>,
}

impl WriteTracker {
    #[must_use]
    pub fn new(policy: SettlePolicy) -> Self {
        Self {
            policy,
            dirty: false,
            writing: false,
            only_replaced: true,
            last_change: None,
        }
    }

    pub fn observe(&mut self, event: FileEvent, now: Instant) {
        self.last_change = Some(now);
        match event {
            FileEvent::Modified => {
                self.dirty = true;
                self.writing = true;
                self.only_replaced = false;
            }
            FileEvent::WriteClosed => {
                self.dirty = true;
                self.writing = false;
                self.only_replaced = false;
            }
            FileEvent::Replaced => {
                // A rename over the path ends whatever was being written to the old
                // file: the path now names a different, complete file.
                self.dirty = true;
                self.writing = false;
            }
            FileEvent::Unknown => {
                self.dirty = true;
                self.only_replaced = false;
            }
        }
    }

    /// Whether a writer holds the file open mid-write, for logs and the API.
    #[must_use]
    pub fn writing(&self) -> bool {
        self.writing
    }

    #[must_use]
    pub fn decide(&self, now: Instant) -> Decision {
        if !self.dirty {
            return Decision::Idle;
        }
        if self.writing {
            return Decision::WaitUntil(None);
        }
        if self.only_replaced {
            return Decision::Read(Trust::Complete);
        }
        let since = self.last_change.unwrap_or(now);
        let ready_at = since + self.policy.settle;
        if now < ready_at {
            return Decision::WaitUntil(Some(ready_at));
        }
        Decision::Read(Trust::InPlace)
    }

    /// The caller read the file: later events start a new change.
    pub fn read_done(&mut self) {
        self.dirty = false;
        self.only_replaced = true;
    }

    /// When a removal read at `InPlace` trust may be applied: `removal_hold` after the
    /// file's last change. `None` when it may be applied now.
    #[must_use]
    pub fn removal_wait(&self, now: Instant) -> Option<Instant> {
        let at = self.last_change? + self.policy.removal_hold;
        (now < at).then_some(at)
    }
}

/// inotify on the config file and on its directory, turned into [`FileEvent`]s.
///
/// The directory watch sees renames and creations (a rename over the file, or
/// Kubernetes swapping the `..data` link of a ConfigMap volume); the file watch follows
/// symlinks to the file itself and sees in-place writes. After a replacement the file
/// watch is added again, for the new inode.
pub struct Watcher {
    inotify: inotify::Inotify,
    path: PathBuf,
}

impl Watcher {
    /// Starts watching `path`'s directory and the file itself.
    ///
    /// # Errors
    /// inotify is unavailable or out of watches; the caller then polls instead.
    pub fn new(path: &Path) -> std::io::Result<Self> {
        use inotify::{Inotify, WatchMask};
        let inotify = Inotify::init()?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        inotify.watches().add(
            &dir,
            WatchMask::CREATE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::DELETE
                | WatchMask::ONLYDIR,
        )?;
        watch_file(&mut inotify.watches(), path);
        Ok(Self {
            inotify,
            path: path.to_owned(),
        })
    }

    /// Turns inotify's events into [`FileEvent`]s on `events` until the receiver is
    /// dropped.
    ///
    /// # Errors
    /// The event stream could not be created.
    pub fn spawn(
        self,
        events: mpsc::Sender<FileEvent>,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use inotify::EventMask;
        use tokio_stream::StreamExt as _;
        let Self { inotify, path } = self;
        let mut watches = inotify.watches();
        let mut stream = inotify.into_event_stream(vec![0u8; 4096])?;
        Ok(tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        warn!(%error, "config file watch failed; polling only");
                        return;
                    }
                };
                let mask = event.mask;
                let kind = if mask.contains(EventMask::Q_OVERFLOW) {
                    FileEvent::Unknown
                } else if mask.contains(EventMask::MODIFY) {
                    FileEvent::Modified
                } else if mask.contains(EventMask::CLOSE_WRITE) {
                    FileEvent::WriteClosed
                } else if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                    // Any name: a ConfigMap volume swaps `..data`, not the file's own
                    // entry. A rename of an unrelated file costs one compare of texts.
                    watch_file(&mut watches, &path);
                    FileEvent::Replaced
                } else {
                    // Deleted or moved away: nothing to read until it returns.
                    continue;
                };
                if events.send(kind).await.is_err() {
                    return;
                }
            }
        }))
    }
}

/// Watches the file itself (through symlinks) for in-place writes. A missing file
/// (between a delete and a create) is fine: the directory watch reports its return, and
/// this is called again then.
fn watch_file(watches: &mut inotify::Watches, path: &Path) {
    use inotify::WatchMask;
    let _ = watches.add(
        path,
        WatchMask::MODIFY | WatchMask::CLOSE_WRITE | WatchMask::DELETE_SELF,
    );
}

/// What a new configuration changes against the running one, found in one pass over
/// both: which services to re-sync and re-plan, which backends lose their connections,
/// and whether the change removes anything (which an in-place write must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigChange {
    /// Services added, removed or edited, by name.
    pub services: BTreeSet<String>,
    /// Every (service, target) the new configuration drops, whole services included.
    pub removed_targets: Vec<(String, SocketAddr)>,
    /// What it takes away, named for the log: a removed service as a whole, else its
    /// removed frontends, then its removed endpoints. Empty when it only adds or edits.
    pub removals: Vec<String>,
}

impl ConfigChange {
    #[must_use]
    pub fn between(old: &Config, new: &Config) -> Self {
        let names = new.services.iter().chain(&old.services);
        Self::among(old, new, names.map(|service| service.name.as_str()))
    }

    /// [`ConfigChange::between`], for configurations known to differ in the services
    /// `names` at most (the Kubernetes model says which it re-derived): costs those
    /// services, not a pass over all of them.
    #[must_use]
    pub fn among<'a>(old: &Config, new: &Config, names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut change = Self::default();
        for name in names {
            let (before, after) = (old.service(name), new.service(name));
            match (before, after) {
                (None, None) => continue,
                // A service both sides share (the Kubernetes source reuses what did not
                // change) is the same by pointer, without a deep comparison.
                (Some(a), Some(b)) if std::ptr::eq(a, b) || a == b => continue,
                _ => {}
            }
            if !change.services.insert(name.to_owned()) {
                continue;
            }
            let Some(before) = before else {
                continue;
            };
            let kept_targets: HashSet<SocketAddr> = after
                .map(|k| desired::targets(k).collect())
                .unwrap_or_default();
            let dropped: Vec<SocketAddr> = desired::targets(before)
                .filter(|t| !kept_targets.contains(t))
                .collect();
            let Some(after) = after else {
                change.removals.push(format!("service {name}"));
                change
                    .removed_targets
                    .extend(dropped.into_iter().map(|t| (name.to_owned(), t)));
                continue;
            };
            let kept_frontends: HashSet<SocketAddr> = frontends(after).collect();
            change.removals.extend(
                frontends(before)
                    .filter(|f| !kept_frontends.contains(f))
                    .map(|f| format!("{name} frontend {f}")),
            );
            change
                .removals
                .extend(dropped.iter().map(|t| format!("{name} endpoint {t}")));
            change
                .removed_targets
                .extend(dropped.into_iter().map(|t| (name.to_owned(), t)));
        }
        change
    }
}

fn frontends(service: &crate::config::ServiceConfig) -> impl Iterator<Item = SocketAddr> + '_ {
    service.vips.iter().flat_map(move |vip| {
        service
            .ports
            .iter()
            .map(move |port| SocketAddr::new(*vip, port.number))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: SettlePolicy = SettlePolicy {
        settle: Duration::from_millis(200),
        removal_hold: Duration::from_secs(5),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn config(yaml: &str) -> Config {
        crate::config::parse(yaml).unwrap()
    }

    const THREE: &str = "
services:
  - name: a
    vips: [127.200.0.1]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.1.1}, {address: 127.0.1.2}]
  - name: b
    vips: [127.200.0.2]
    ports: [{number: 80}, {number: 81}]
    endpoints: [{address: 127.0.2.1}]
  - name: c
    vips: [127.200.0.3]
    ports: [{number: 80}]
    endpoints: [{address: 127.0.3.1}]
";

    #[test]
    fn a_truncated_file_removes_and_says_what() {
        let full = config(THREE);
        // Cut after the first service, as a writer pausing mid-file leaves it.
        let cut = config(&THREE[..THREE.find("  - name: b").unwrap()]);
        assert_eq!(
            ConfigChange::between(&full, &cut).removals,
            ["service b", "service c"]
        );
        // Cut inside the first service's endpoint list.
        let cut = config(
            "services:\n  - name: a\n    vips: [127.200.0.1]\n    ports: [{number: 80}]\n    endpoints: [{address: 127.0.1.1}]\n  - name: b\n    vips: [127.200.0.2]\n    ports: [{number: 80}]\n    endpoints: [{address: 127.0.2.1}]\n  - name: c\n    vips: [127.200.0.3]\n    ports: [{number: 80}]\n    endpoints: [{address: 127.0.3.1}]\n",
        );
        assert_eq!(
            ConfigChange::between(&full, &cut).removals,
            [
                "a endpoint 127.0.1.2:80",
                "b frontend 127.200.0.2:81",
                "b endpoint 127.0.2.1:81"
            ]
        );
    }

    #[test]
    fn additions_and_edits_remove_nothing() {
        let full = config(THREE);
        let more = config(&THREE.replace(
            "{address: 127.0.1.2}]",
            "{address: 127.0.1.2}, {address: 127.0.1.3, weight: 5}]",
        ));
        assert!(ConfigChange::between(&full, &more).removals.is_empty());
        assert!(ConfigChange::between(&full, &full).removals.is_empty());
        assert_eq!(
            ConfigChange::between(&more, &full).removals,
            ["a endpoint 127.0.1.3:80"]
        );
    }

    #[test]
    fn nothing_happened_nothing_to_read() {
        let tracker = WriteTracker::new(POLICY);
        assert_eq!(tracker.decide(Instant::now()), Decision::Idle);
    }

    #[test]
    fn an_open_writer_is_never_read_however_long_it_pauses() {
        let t0 = Instant::now();
        let mut tracker = WriteTracker::new(POLICY);
        tracker.observe(FileEvent::Modified, t0); // truncate
        tracker.observe(FileEvent::Modified, t0 + ms(1)); // first service
        for pause in [ms(700), Duration::from_secs(60), Duration::from_secs(3600)] {
            assert_eq!(
                tracker.decide(t0 + pause),
                Decision::WaitUntil(None),
                "{pause:?}"
            );
        }
        tracker.observe(FileEvent::Modified, t0 + ms(3_600_000)); // the rest
        tracker.observe(FileEvent::WriteClosed, t0 + ms(3_600_001));
        let closed = t0 + ms(3_600_001);
        assert_eq!(
            tracker.decide(closed + ms(10)),
            Decision::WaitUntil(Some(closed + POLICY.settle))
        );
        assert_eq!(
            tracker.decide(closed + POLICY.settle),
            Decision::Read(Trust::InPlace)
        );
    }

    #[test]
    fn a_rename_is_read_at_once_and_trusted() {
        let t0 = Instant::now();
        let mut tracker = WriteTracker::new(POLICY);
        tracker.observe(FileEvent::Replaced, t0);
        assert_eq!(tracker.decide(t0), Decision::Read(Trust::Complete));
        tracker.read_done();
        assert_eq!(tracker.decide(t0 + ms(1)), Decision::Idle);
    }

    #[test]
    fn a_rename_over_a_file_being_written_ends_that_write() {
        let t0 = Instant::now();
        let mut tracker = WriteTracker::new(POLICY);
        tracker.observe(FileEvent::Modified, t0);
        tracker.observe(FileEvent::Replaced, t0 + ms(5));
        // Not `Complete`: the in-place write before it was seen since the last read,
        // so removals are still held.
        assert_eq!(
            tracker.decide(t0 + ms(5) + POLICY.settle),
            Decision::Read(Trust::InPlace)
        );
    }

    #[test]
    fn polling_waits_for_the_stamp_to_stand_still() {
        let t0 = Instant::now();
        let mut tracker = WriteTracker::new(POLICY);
        tracker.observe(FileEvent::Unknown, t0);
        assert_eq!(
            tracker.decide(t0 + ms(100)),
            Decision::WaitUntil(Some(t0 + POLICY.settle))
        );
        tracker.observe(FileEvent::Unknown, t0 + ms(150));
        assert_eq!(
            tracker.decide(t0 + ms(300)),
            Decision::WaitUntil(Some(t0 + ms(150) + POLICY.settle))
        );
        assert_eq!(tracker.decide(t0 + ms(350)), Decision::Read(Trust::InPlace));
    }

    #[test]
    fn removals_wait_for_the_hold_after_the_last_change() {
        let t0 = Instant::now();
        let mut tracker = WriteTracker::new(POLICY);
        tracker.observe(FileEvent::WriteClosed, t0);
        assert_eq!(
            tracker.removal_wait(t0 + ms(300)),
            Some(t0 + POLICY.removal_hold)
        );
        assert_eq!(tracker.removal_wait(t0 + POLICY.removal_hold), None);
        // A new write restarts the hold.
        tracker.observe(FileEvent::Modified, t0 + ms(4000));
        tracker.observe(FileEvent::WriteClosed, t0 + ms(4001));
        assert_eq!(
            tracker.removal_wait(t0 + POLICY.removal_hold),
            Some(t0 + ms(4001) + POLICY.removal_hold)
        );
    }
}
