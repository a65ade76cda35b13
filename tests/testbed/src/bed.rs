//! One agent's private node: a child cgroup, a bpffs pin directory and a temp dir, and the
//! `detour agent` attached to them. The set-up the demo, the benchmarks and the
//! end-to-end tests share, so that each of them gets the same guards in the same order.
//!
//! Invariants:
//! - field order is drop order: the agent stops first, then the pins go (detaching the
//!   programs), then the cgroup (killing any client left in it), then the temp dir with
//!   the config, the agent's socket and its log;
//! - the agent always runs with this bed's cgroup, pins, socket and log (see
//!   [`crate::Agent`]), never the machine's;
//! - the config is written as a config management tool would (a temporary file renamed
//!   over it), so an agent never reads a half-written file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{require_root, Agent, AgentOptions, Cgroup, PinDir, TempDir};

/// A cgroup, pins and a temp dir for one agent, and the agent once started.
pub struct AgentBed {
    pub agent: Option<Agent>,
    pub pins: PinDir,
    pub cgroup: Cgroup,
    pub dir: TempDir,
    binary: PathBuf,
}

impl AgentBed {
    /// A fresh bed for the `detour` at `binary`; needs root.
    pub fn new(binary: impl Into<PathBuf>) -> Result<Self> {
        require_root("an agent bed (it attaches eBPF programs to a test cgroup)")?;
        Ok(Self {
            agent: None,
            pins: PinDir::new()?,
            cgroup: Cgroup::new()?,
            dir: TempDir::new()?,
            binary: binary.into(),
        })
    }

    /// Where the agent reads its config: `detour.yaml` in the temp dir.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("detour.yaml")
    }

    /// Writes the config: a temporary file renamed over it.
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        let tmp = self.dir.join("detour.yaml.tmp");
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    /// The agent's options in this bed, with `--config` [`AgentBed::config_path`].
    pub fn options(&self) -> AgentOptions {
        AgentOptions {
            binary: self.binary.clone(),
            config: self.config_path(),
            cgroup: self.cgroup.path().to_owned(),
            bpffs: self.pins.path().to_owned(),
            socket: self.dir.join("detour.sock"),
            log: self.log_path(),
        }
    }

    /// Starts the agent with `options` and further `args`, and waits (at most `ready`)
    /// until it answers; it replaces (and so stops) an agent started before.
    pub fn start_agent_with(
        &mut self,
        options: AgentOptions,
        args: &[&str],
        ready: Duration,
    ) -> Result<&mut Agent> {
        let mut agent = Agent::start_with_args(options, args)?;
        agent.wait_ready(ready)?;
        Ok(self.agent.insert(agent))
    }

    /// Starts the agent on this bed's config ([`AgentBed::options`]).
    pub fn start_agent(&mut self, args: &[&str], ready: Duration) -> Result<&mut Agent> {
        self.start_agent_with(self.options(), args, ready)
    }

    /// The running agent.
    ///
    /// # Panics
    /// If none was started: a test's own mistake.
    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent started")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The agent's log so far (appended across restarts); empty before it starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The `detour` binary the bed runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }
}
