//! A throw-away child cgroup (v2) to attach detour's programs to and run clients in.
//!
//! Invariants:
//! - the cgroup is always a fresh, uniquely named child of the cgroup v2 mount point found
//!   in `/proc/mounts`; the mount point itself (the machine's root cgroup) is never handed
//!   out, so nothing can be attached to it through this type;
//! - a process spawned through [`Cgroup::spawn`] joins the cgroup before it executes its
//!   first instruction of the new program, so every `connect()` it makes is seen by
//!   programs attached to the cgroup;
//! - `Drop` kills every process in the cgroup, waits (bounded) for it to empty and
//!   removes it. Programs attached to it are detached by the kernel with it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long `Drop` waits for killed processes to leave before giving up on `rmdir`.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A uniquely named child cgroup below the cgroup v2 mount point; removed on `Drop`.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/detour-test-<pid>-<n>`.
    pub fn new() -> Result<Self> {
        crate::require_root("creating a cgroup")?;
        let root = crate::mount_point_of("cgroup2")?
            .context("no cgroup2 filesystem in /proc/mounts; detour needs cgroup v2")?;
        let path = crate::create_unique_dir(&root).context("creating a cgroup")?;
        Ok(Self { path })
    }

    /// The cgroup's directory, e.g. `/sys/fs/cgroup/unified/detour-test-123-0`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Spawns `cmd` with the child already inside this cgroup when it execs.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        // Opened here, not in the child: between fork and exec only async-signal-safe
        // calls are allowed, and write(2) on an inherited descriptor is one. std opens
        // with O_CLOEXEC, so the program never sees this descriptor.
        let procs = self.procs_file()?;
        let fd = procs.as_raw_fd();
        // SAFETY: the closure only calls write(2) and reads errno, both async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // "0" means the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {cmd:?} into {}", self.path.display()))?;
        drop(procs);
        Ok(child)
    }

    /// The process ids currently in the cgroup.
    pub fn pids(&self) -> Result<Vec<libc::pid_t>> {
        let procs = std::fs::read_to_string(self.path.join("cgroup.procs"))
            .with_context(|| format!("reading {}/cgroup.procs", self.path.display()))?;
        Ok(procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    fn procs_file(&self) -> Result<File> {
        let path = self.path.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    /// Kills every process in the cgroup and waits until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        let kill_file = self.path.join("cgroup.kill");
        if kill_file.exists() {
            std::fs::write(&kill_file, "1")
                .with_context(|| format!("writing {}", kill_file.display()))?;
        } else {
            for pid in self.pids()? {
                // SAFETY: kill(2) has no memory-safety preconditions; ESRCH (already gone)
                // is fine.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "cgroup {} still holds {pids:?} {DRAIN_TIMEOUT:?} after SIGKILL",
                    self.path.display()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn remove(&self) -> Result<()> {
        self.kill_all()?;
        // rmdir can briefly see EBUSY while the last task finishes exiting.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", self.path.display()))
                }
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("detour-testbed: cleaning up cgroup: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_child_runs_inside_and_drop_cleans_up() {
        crate::require_root("the cgroup test").unwrap();
        let cg = Cgroup::new().unwrap();
        let path = cg.path().to_owned();
        assert_ne!(path, crate::mount_point_of("cgroup2").unwrap().unwrap());
        let mut child = cg
            .spawn(
                Command::new("sh")
                    .args(["-c", "grep ^0:: /proc/self/cgroup; exec sleep 30"])
                    .stdout(std::process::Stdio::piped()),
            )
            .unwrap();
        let mut line = String::new();
        io::BufRead::read_line(
            &mut io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(line.contains(name), "child is in {line:?}, not {name}");
        assert!(cg.pids().unwrap().contains(&(child.id() as libc::pid_t)));

        let start = Instant::now();
        drop(cg);
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(!path.exists(), "cgroup dir left behind");
        assert!(!child.wait().unwrap().success(), "child was not killed");
    }
}
