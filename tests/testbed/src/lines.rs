//! A child process whose output lines are collected as they arrive, each with the
//! `CLOCK_MONOTONIC` time it was read: the one way the demo, the benchmarks and the
//! tests run a client (often inside a test cgroup) and read what it saw.
//!
//! Invariants:
//! - the child is killed and reaped when the [`LineStream`] is dropped, so an early
//!   return never leaves it running (a child in a [`crate::Cgroup`] is also killed with
//!   the cgroup);
//! - every wait has a deadline: [`LineStream::wait`] kills the child at its deadline and
//!   says so;
//! - lines are kept in arrival order per pipe, with the time their reader thread read
//!   them; stdout and stderr are read by one thread each. A client spawned in a cgroup
//!   ([`LineStream::spawn_in`]) has its stdout collected and its stderr inherited, so its
//!   diagnostics reach the person running it and never mix with its results;
//! - [`LineStream::next_line`] hands out every line exactly once, in arrival order, for
//!   callers that act between lines; [`LineStream::lines`] and [`LineStream::since`] read
//!   them all, whatever was handed out.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{wait_with_timeout, Cgroup};

/// Now on `CLOCK_MONOTONIC`, in nanoseconds: the clock [`LineStream`] stamps lines with.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A child process (killed and reaped on `Drop`) whose stdout and stderr lines are kept,
/// each with the [`mono_ns`] time it arrived.
pub struct LineStream {
    child: Child,
    shared: Arc<Shared>,
    readers: Vec<thread::JoinHandle<()>>,
    /// How many lines [`LineStream::next_line`] has handed out.
    cursor: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Notified on every new line and every pipe that closes.
    changed: Condvar,
}

struct State {
    lines: Vec<(u64, String)>,
    open_pipes: usize,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LineStream {
    /// Spawns `command` with its stdout and stderr collected (stdin is null): a server
    /// or an agent whose every line matters.
    pub fn spawn(command: &mut Command) -> Result<Self> {
        command.stderr(Stdio::piped());
        Self::spawn_with(command, |command| {
            command
                .spawn()
                .with_context(|| format!("spawning {command:?}"))
        })
    }

    /// Spawns a client `command` inside `cgroup` (it is in there when it execs), with
    /// its stdout collected and its stderr inherited.
    pub fn spawn_in(cgroup: &Cgroup, command: &mut Command) -> Result<Self> {
        command.stderr(Stdio::inherit());
        Self::spawn_with(command, |command| cgroup.spawn(command))
    }

    fn spawn_with(
        command: &mut Command,
        spawn: impl FnOnce(&mut Command) -> Result<Child>,
    ) -> Result<Self> {
        command.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = spawn(command)?;
        let out = child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>);
        let err = child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>);
        let pipes: Vec<Box<dyn Read + Send>> = [out, err].into_iter().flatten().collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                lines: Vec::new(),
                open_pipes: pipes.len(),
            }),
            changed: Condvar::new(),
        });
        let readers = pipes
            .into_iter()
            .map(|pipe| {
                let shared = shared.clone();
                thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        shared.state().lines.push((mono_ns(), line));
                        shared.changed.notify_all();
                    }
                    shared.state().open_pipes -= 1;
                    shared.changed.notify_all();
                })
            })
            .collect();
        Ok(Self {
            child,
            shared,
            readers,
            cursor: 0,
        })
    }

    /// The next line not handed out yet, waiting for it until `deadline`. `Ok(None)`:
    /// the child closed its output and every line was handed out. Fails at the deadline.
    pub fn next_line(&mut self, deadline: Instant) -> Result<Option<(u64, String)>> {
        let mut state = self.shared.state();
        loop {
            if let Some(line) = state.lines.get(self.cursor) {
                self.cursor += 1;
                return Ok(Some(line.clone()));
            }
            if state.open_pipes == 0 {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(state);
                bail!(
                    "{} wrote nothing more before its deadline; its last lines:\n{}",
                    self.child.id(),
                    self.tail()
                );
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Lines that arrived at or after `since` ([`mono_ns`]).
    pub fn since(&self, since: u64) -> Vec<(u64, String)> {
        self.shared
            .state()
            .lines
            .iter()
            .filter(|(t, _)| *t >= since)
            .cloned()
            .collect()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<(u64, String)> {
        self.since(0)
    }

    /// The exit status, if the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The process id of the child.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child to exit and for its output to be read, at most `timeout`;
    /// at the deadline it is killed and this fails. Returns every line and the status.
    pub fn wait(mut self, timeout: Duration) -> Result<(ExitStatus, Vec<(u64, String)>)> {
        let Some(status) = wait_with_timeout(&mut self.child, timeout)? else {
            bail!(
                "{} did not finish within {timeout:?}; its last lines:\n{}",
                self.child.id(),
                self.tail()
            );
        };
        // The pipes close when the child (and anything that inherited them) exits.
        for reader in std::mem::take(&mut self.readers) {
            let _ = reader.join();
        }
        Ok((status, self.lines()))
    }

    /// The last lines, for error messages.
    pub fn tail(&self) -> String {
        let state = self.shared.state();
        let lines = &state.lines;
        let start = lines.len().saturating_sub(20);
        lines[start..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for LineStream {
    fn drop(&mut self) {
        // Errors only mean it already exited; wait() reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_both_pipes_arrive_stamped_in_order() {
        let before = mono_ns();
        let stream = LineStream::spawn(
            Command::new("sh").args(["-c", "echo one; echo two; echo err >&2; exit 3"]),
        )
        .unwrap();
        let (status, lines) = stream.wait(Duration::from_secs(10)).unwrap();
        assert_eq!(status.code(), Some(3));
        let mut text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        text.sort_unstable();
        assert_eq!(text, ["err", "one", "two"]);
        assert!(lines.iter().all(|(t, _)| *t >= before));
        let out: Vec<&(u64, String)> = lines.iter().filter(|(_, l)| l != "err").collect();
        assert!(out[0].0 <= out[1].0 && out[0].1 == "one");
    }

    #[test]
    fn next_line_hands_out_each_line_once_then_none() {
        let mut stream =
            LineStream::spawn(Command::new("sh").args(["-c", "echo a; echo b"])).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while let Some((_, line)) = stream.next_line(deadline).unwrap() {
            got.push(line);
        }
        assert_eq!(got, ["a", "b"]);
        assert_eq!(stream.lines().len(), 2);
        let mut silent = LineStream::spawn(Command::new("sleep").arg("30")).unwrap();
        let error = silent
            .next_line(Instant::now() + Duration::from_millis(200))
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("wrote nothing more"),
            "{error:#}"
        );
    }

    #[test]
    fn a_child_past_its_deadline_is_killed_and_named() {
        let stream =
            LineStream::spawn(Command::new("sh").args(["-c", "echo started; sleep 30"])).unwrap();
        let error = stream.wait(Duration::from_millis(300)).unwrap_err();
        assert!(format!("{error:#}").contains("did not finish within 300ms"));
    }
}
