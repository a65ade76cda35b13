//! A `detour agent` process under test, and its node-local CLI.
//!
//! Invariants:
//! - the agent always runs with an explicit `--cgroup`, `--bpffs` and `--socket`, so it
//!   never touches the machine's root cgroup, the default pin path or the default socket;
//! - its stdout and stderr go to a log file (appended across restarts) that every error
//!   from here quotes the tail of, so a failing test shows why the agent failed;
//! - `Drop` stops it (SIGTERM, then SIGKILL after a grace period) and reaps it. Pins stay:
//!   removing them is [`crate::PinDir`]'s job.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::{output_with_timeout, wait_with_timeout};

/// How long `Drop` and `restart()` give the agent to exit on SIGTERM.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Deadline for one CLI invocation; above the CLI's own 10 s deadline for an answer, so
/// its error message, not ours, is what a test sees.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of the log an error quotes.
const LOG_TAIL: usize = 4096;
/// Deadline for each step of one `/metrics` read.
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an [`Agent`] finds its binary and puts its state.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The `detour` binary.
    pub binary: PathBuf,
    /// The YAML config file (`--config`); an empty path passes none, for an agent whose
    /// source is in its further arguments (`--kubernetes ...`).
    pub config: PathBuf,
    /// The cgroup to attach to (`--cgroup`).
    pub cgroup: PathBuf,
    /// The bpffs directory to pin in (`--bpffs`).
    pub bpffs: PathBuf,
    /// The API socket (`--socket`).
    pub socket: PathBuf,
    /// Where the agent's stdout and stderr go.
    pub log: PathBuf,
}

/// A running `detour agent`; stopped on `Drop`.
#[derive(Debug)]
pub struct Agent {
    opts: AgentOptions,
    /// Further `detour agent` arguments, kept across restarts.
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl Agent {
    /// Spawns the agent; see [`Agent::wait_ready`] for when it is usable.
    pub fn start(opts: AgentOptions) -> Result<Self> {
        Self::start_with_args(opts, &[])
    }

    /// Spawns the agent with further arguments after the ones [`AgentOptions`] gives
    /// (e.g. `["--max-services", "2"]`); restarts keep them.
    pub fn start_with_args(opts: AgentOptions, extra_args: &[&str]) -> Result<Self> {
        let mut agent = Self {
            opts,
            extra_args: extra_args.iter().map(ToString::to_string).collect(),
            child: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.opts.log)
            .with_context(|| format!("opening {}", self.opts.log.display()))?;
        let o = &self.opts;
        let mut cmd = Command::new(&o.binary);
        cmd.arg("agent");
        if !o.config.as_os_str().is_empty() {
            cmd.arg("--config").arg(&o.config);
        }
        cmd.arg("--cgroup")
            .arg(&o.cgroup)
            .arg("--bpffs")
            .arg(&o.bpffs)
            .arg("--socket")
            .arg(&o.socket)
            // Tests run side by side: each agent takes a free port (see `metrics_address`).
            .arg("--metrics-address")
            .arg("127.0.0.1:0");
        // Nor may they share the DNS server's port 53: off unless a test asks for it.
        if !self.extra_args.iter().any(|a| a == "--dns-listen") {
            cmd.arg("--dns-listen").arg("off");
        }
        // Nor touch the machine's own devices: steering attaches only where a test says
        // (`--steer-netns` into its own namespace).
        if !self.extra_args.iter().any(|a| a == "--steer-devices") {
            cmd.arg("--steer-devices").arg("none");
        }
        cmd.args(&self.extra_args)
            // The log is a file: colour codes would only make it harder to read.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?);
        Ok(())
    }

    /// Where the agent serves `/metrics`, from the line it logs once it listens.
    pub fn metrics_address(&self) -> Result<std::net::SocketAddr> {
        let log = std::fs::read_to_string(&self.opts.log)
            .with_context(|| format!("reading {}", self.opts.log.display()))?;
        let marker = "metrics listening address=";
        let line = log
            .lines()
            .rev()
            .find_map(|l| l.split_once(marker).map(|(_, rest)| rest.to_string()))
            .context("the agent has not logged its metrics address")?;
        let addr = line.split_whitespace().next().unwrap_or_default();
        addr.parse()
            .with_context(|| format!("metrics address {addr:?} in the agent log"))
    }

    /// One `GET /metrics`: the exposition text (the body). Each connect, read and write
    /// waits at most [`METRICS_TIMEOUT`].
    pub fn metrics(&self) -> Result<String> {
        use std::io::{Read, Write};
        let addr = self.metrics_address()?;
        let mut conn = std::net::TcpStream::connect_timeout(&addr, METRICS_TIMEOUT)
            .with_context(|| format!("connecting to the agent's /metrics at {addr}"))?;
        conn.set_read_timeout(Some(METRICS_TIMEOUT))?;
        conn.set_write_timeout(Some(METRICS_TIMEOUT))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: detour\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)
            .context("reading the agent's /metrics")?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("the agent's /metrics answered without a header block")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("the agent's /metrics answered {head:?}");
        }
        Ok(body.to_owned())
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The options it was started with.
    pub fn options(&self) -> &AgentOptions {
        &self.opts
    }

    /// Polls `detour services -o json` until it answers, failing after `timeout` or as
    /// soon as the agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "agent exited ({status}) before it was ready{}",
                        self.log_tail()
                    );
                }
            } else {
                bail!("agent is not running");
            }
            if self.opts.socket.exists() {
                match self.services_json() {
                    Ok(_) => return Ok(()),
                    Err(e) => last_err = Some(e),
                }
            }
            if Instant::now() >= deadline {
                let why = last_err.map_or_else(
                    || format!("{} never appeared", self.opts.socket.display()),
                    |e| format!("{e:#}"),
                );
                bail!(
                    "agent not ready after {timeout:?}: {why}{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGHUP: the agent re-reads its config.
    pub fn reload(&self) -> Result<()> {
        self.signal(libc::SIGHUP)
    }

    /// Kills the agent with SIGKILL (a crash, as far as it is concerned) and reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // Fails only if it already exited; wait() reaps it either way.
            let _ = child.kill();
            child.wait().context("reaping the agent")?;
        }
        Ok(())
    }

    /// Stops the agent (SIGTERM, SIGKILL after a grace period) if it runs, and starts it
    /// again with the same options. Call [`Agent::wait_ready`] afterwards.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// SIGTERM, then SIGKILL if it has not exited within a grace period.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our unreaped
            // child, so it cannot have been recycled.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if wait_with_timeout(&mut child, TERM_GRACE)?.is_none() {
            let _ = child.kill();
            child.wait().context("reaping the agent")?;
        }
        Ok(())
    }

    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let child = self.child.as_ref().context("agent is not running")?;
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: as in `stop`.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling the agent");
        }
        Ok(())
    }

    /// Runs `detour <args..> --socket <socket>` and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.opts.binary);
        cmd.args(args).arg("--socket").arg(&self.opts.socket);
        let out = output_with_timeout(&mut cmd, CLI_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8(out.stdout).context("CLI output is not UTF-8")
    }

    /// `detour services -o json`.
    pub fn services_json(&self) -> Result<serde_json::Value> {
        parse_json(&self.cli(&["services", "-o", "json"])?)
    }

    /// `detour endpoints [service] -o json`.
    pub fn endpoints_json(&self, service: Option<&str>) -> Result<serde_json::Value> {
        let mut args = vec!["endpoints"];
        args.extend(service);
        args.extend(["-o", "json"]);
        parse_json(&self.cli(&args)?)
    }

    /// Polls `detour endpoints SERVICE -o json` until `pred` holds of the answer, every
    /// 50 ms for at most `timeout`; returns the answer that satisfied it. Fails with the
    /// last answer (or CLI error) when the time is up.
    pub fn wait_endpoints(
        &self,
        service: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.endpoints_json(Some(service));
            if let Ok(eps) = &last {
                if pred(eps) {
                    return last;
                }
            }
            if Instant::now() > deadline {
                let now = match last {
                    Ok(eps) => format!("endpoints now: {eps:#}"),
                    Err(e) => format!("last error: {e:#}"),
                };
                bail!("{service}: condition not met within {timeout:?}; {now}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last few KiB of the agent's log, formatted to append to an error message.
    pub fn log_tail(&self) -> String {
        log_tail(&self.opts.log)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("detour-testbed: stopping the agent: {e:#}");
        }
    }
}

fn parse_json(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).with_context(|| format!("CLI printed invalid JSON: {text:?}"))
}

fn log_tail(path: &Path) -> String {
    let Ok(log) = std::fs::read(path) else {
        return String::new();
    };
    let start = log.len().saturating_sub(LOG_TAIL);
    let tail = String::from_utf8_lossy(&log[start..]);
    format!(
        "\n--- agent log {} (tail) ---\n{}",
        path.display(),
        tail.trim_end()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TempDir;

    /// A stand-in for the `detour` binary: a shell script that implements just enough of
    /// the contract (`agent` writes its socket path; `services` prints JSON if it exists).
    fn fake_detour(dir: &TempDir) -> PathBuf {
        let path = dir.join("fake-detour");
        write_script(
            &path,
            r#"#!/bin/sh
cmd=$1; shift
sock=""
while [ $# -gt 0 ]; do
  case $1 in --socket) sock=$2; shift;; esac
  shift
done
case $cmd in
  agent) echo "starting" >&2; trap 'echo reloaded >&2' HUP; touch "$sock";
         while true; do sleep 0.05; done ;;
  services) test -e "$sock" && echo '[{"name":"mydb","healthy":1}]' ;;
  endpoints) test -e "$sock" && echo '[]' ;;
esac
"#,
        );
        path
    }

    fn write_script(path: &Path, text: &str) {
        crate::write_executable(path, text).unwrap();
    }

    fn options(dir: &TempDir, binary: PathBuf) -> AgentOptions {
        AgentOptions {
            binary,
            config: dir.join("config.yaml"),
            cgroup: dir.join("cgroup"),
            bpffs: dir.join("bpffs"),
            socket: dir.join("detour.sock"),
            log: dir.join("agent.log"),
        }
    }

    #[test]
    fn lifecycle_against_a_fake_binary() {
        let dir = TempDir::new().unwrap();
        let mut agent = Agent::start(options(&dir, fake_detour(&dir))).unwrap();
        agent.wait_ready(Duration::from_secs(5)).unwrap();
        assert_eq!(agent.services_json().unwrap()[0]["name"], "mydb");
        assert!(agent.endpoints_json(Some("mydb")).unwrap().is_array());
        agent.reload().unwrap();

        let first = agent.pid().unwrap();
        agent.kill9().unwrap();
        assert!(agent.pid().is_none());
        agent.restart().unwrap();
        assert_ne!(agent.pid().unwrap(), first);
        agent.wait_ready(Duration::from_secs(5)).unwrap();
        thread::sleep(Duration::from_millis(100));
        drop(agent);
        let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
        assert_eq!(log.matches("starting").count(), 2, "{log}");
    }

    #[test]
    fn extra_args_are_passed_on_every_start() {
        let dir = TempDir::new().unwrap();
        let script = dir.join("args");
        write_script(&script, "#!/bin/sh\necho \"args: $*\" >&2\nexit 3\n");
        let mut agent =
            Agent::start_with_args(options(&dir, script), &["--max-slots", "8"]).unwrap();
        assert!(agent.wait_ready(Duration::from_secs(5)).is_err());
        agent.restart().unwrap();
        assert!(agent.wait_ready(Duration::from_secs(5)).is_err());
        let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
        assert_eq!(
            log.matches("127.0.0.1:0 --dns-listen off --steer-devices none --max-slots 8")
                .count(),
            2,
            "{log}"
        );
    }

    #[test]
    fn early_exit_is_reported_with_the_log() {
        let dir = TempDir::new().unwrap();
        let script = dir.join("dies");
        write_script(&script, "#!/bin/sh\necho 'no such map' >&2\nexit 3\n");
        let mut agent = Agent::start(options(&dir, script)).unwrap();
        let err = agent.wait_ready(Duration::from_secs(5)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("exited") && msg.contains("no such map"),
            "{msg}"
        );
    }
}
