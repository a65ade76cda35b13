//! One control-plane process (etcd, kube-apiserver, kube-controller-manager) under a guard.
//!
//! Invariants:
//! - stdout and stderr go to a log file, appended across restarts, whose tail every
//!   error about the process quotes;
//! - `Drop` and [`ControlProcess::stop`] kill it (SIGKILL: nothing it holds outlives the
//!   test, so there is nothing to shut down gracefully) and reap it, with a bounded wait;
//! - the processes are spawned from one long-lived thread with `PR_SET_PDEATHSIG`, so a
//!   test binary that dies without unwinding (killed by a timeout, aborted) takes them
//!   with it instead of leaving an etcd behind. (The death signal follows the spawning
//!   *thread*; test threads end with their test, the spawner thread only with the
//!   process.)

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process::wait_with_timeout;

/// How long a killed process may take to be reaped before `stop` gives up on it.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a log an error quotes.
const LOG_TAIL: u64 = 3000;

/// A control-plane process that can be killed and started again with the same arguments.
#[derive(Debug)]
pub(crate) struct ControlProcess {
    /// `etcd`, `kube-apiserver`, ...: what errors call it.
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    child: Option<Child>,
}

impl ControlProcess {
    /// Spawns `program args` with its output appended to `log`.
    pub fn spawn(
        name: &'static str,
        program: PathBuf,
        args: Vec<OsString>,
        log: PathBuf,
    ) -> Result<Self> {
        let mut process = Self {
            name,
            program,
            args,
            log,
            child: None,
        };
        process.start()?;
        Ok(process)
    }

    /// Starts the process again (same program, arguments and log); a no-op while it runs.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_tied_to_process(cmd)
            .with_context(|| format!("spawning {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the process and reaps it; a no-op when it is not running.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // An error only means it already exited; the wait below reaps it either way.
        let _ = child.kill();
        match wait_with_timeout(&mut child, REAP_TIMEOUT)? {
            Some(_) => Ok(()),
            None => anyhow::bail!(
                "{} (pid {}) was killed but had not exited after {REAP_TIMEOUT:?}",
                self.name,
                child.id()
            ),
        }
    }

    /// How it exited, if it was started and has exited since (it stays reaped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Its process id while it was started and not stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `--- NAME (LOG) ---` and the last few KiB of its log.
    pub fn log_tail(&self) -> String {
        let tail = read_tail(&self.log, LOG_TAIL)
            .unwrap_or_else(|e| format!("(cannot read the log: {e})"));
        format!("--- {} ({}) ---\n{}", self.name, self.log.display(), tail)
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("k8s testbed: {e:#}");
        }
    }
}

fn read_tail(path: &Path, max: u64) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from the spawner thread, with SIGKILL as its parent-death signal.
fn spawn_tied_to_process(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("k8s-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // The requester waits for this answer; if it is gone, so is the child's
                    // guard, and the child is killed when this process exits.
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the k8s-spawner thread");
        tx
    });
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and calls only prctl(2) and
    // getppid(2), both async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent as libc::pid_t {
                return Err(io::Error::other("the test process exited during spawn"));
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the k8s-spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the k8s-spawner thread dropped the request"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TempDir;

    /// Waits (bounded) until `log` says "started" `times` times.
    fn wait_started(log: &Path, times: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.matches("started").count() >= times {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "log: {text:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn stop_start_and_log_tail() {
        let dir = TempDir::new().unwrap();
        let log = dir.join("log");
        let mut p = ControlProcess::spawn(
            "sleeper",
            "sh".into(),
            vec!["-c".into(), "echo started; exec sleep 30".into()],
            log.clone(),
        )
        .unwrap();
        let pid = p.pid().unwrap();
        wait_started(&log, 1);
        assert!(p.exited().is_none());
        p.stop().unwrap();
        assert!(p.pid().is_none());
        // Reaped: the pid is gone or names someone else's process, never our zombie.
        assert!(pid_is_not_our_zombie(pid));
        p.start().unwrap();
        assert_ne!(p.pid(), None);
        wait_started(&log, 2);
        let pid = p.pid().unwrap();
        drop(p);
        assert!(pid_is_not_our_zombie(pid));
        assert_eq!(
            std::fs::read_to_string(&log)
                .unwrap()
                .matches("started")
                .count(),
            2
        );
    }

    #[test]
    fn an_exit_is_seen_and_the_tail_is_quoted() {
        let dir = TempDir::new().unwrap();
        let mut p = ControlProcess::spawn(
            "failer",
            "sh".into(),
            vec!["-c".into(), "echo boom >&2; exit 3".into()],
            dir.join("log"),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = p.exited() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(3));
        let tail = p.log_tail();
        assert!(tail.starts_with("--- failer ("), "{tail}");
        assert!(tail.contains("boom"), "{tail}");
    }

    fn pid_is_not_our_zombie(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(true)
    }
}
