//! One test's private world: the testbed's [`AgentBed`] (cgroup, pin directory, temp
//! dir and the agent) and the test's backends, torn down in reverse order of need when
//! the test ends, pass or fail: the agent stops first (see `Drop`), then the backends
//! close, then the bed removes the pins (detaching the programs), the cgroup (killing any
//! client left in it) and the temp dir.
//!
//! A `World` dereferences to its bed, so `w.cgroup`, `w.pins` and `w.dir` are the bed's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use detour_testbed::{Agent, AgentBed, HttpBackend, LineStream, Netns, Veth};

use crate::client::{self, Get, LoopSummary, Script};

pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

// Field order is drop order, after `Drop` has stopped the agent: backends, then the bed.
pub struct World {
    pub backends: BTreeMap<String, HttpBackend>,
    pub bed: AgentBed,
}

impl std::ops::Deref for World {
    type Target = AgentBed;
    fn deref(&self) -> &AgentBed {
        &self.bed
    }
}

impl std::ops::DerefMut for World {
    fn deref_mut(&mut self) -> &mut AgentBed {
        &mut self.bed
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // The agent stops before the backends close, as it would leave a running node.
        drop(self.bed.agent.take());
    }
}

impl World {
    pub fn new() -> Result<Self> {
        Ok(Self {
            backends: BTreeMap::new(),
            bed: AgentBed::new(env!("CARGO_BIN_EXE_detour"))?,
        })
    }

    pub fn backend(&mut self, name: &str, addr: &str) -> Result<()> {
        let addr: SocketAddr = addr.parse()?;
        self.backends
            .insert(name.to_string(), HttpBackend::start_at(name, addr)?);
        Ok(())
    }

    /// Two HTTP backends named `names` in a new network namespace, at `NET.2:8080` and
    /// `NET.3:8080` on its end of a veth pair whose other end is `NET.1` (the API server
    /// refuses loopback addresses in EndpointSlices). The namespace and the veth pair
    /// live as long as the returned guards.
    pub fn backends_in_netns(&mut self, net: &str, names: [&str; 2]) -> Result<(Netns, Veth)> {
        let netns = Netns::new()?;
        let veth = netns.veth(&format!("{net}.1/24"), &format!("{net}.2/24"))?;
        netns.ip(&[
            "addr",
            "add",
            &format!("{net}.3/24"),
            "dev",
            veth.peer_name(),
        ])?;
        for (name, host) in names.into_iter().zip([2, 3]) {
            let address = format!("{net}.{host}:8080").parse()?;
            let backend = HttpBackend::start_in(&netns, name, address)?;
            self.backends.insert(name.to_owned(), backend);
        }
        Ok((netns, veth))
    }

    pub fn stop_backend(&mut self, name: &str) {
        self.backends.get_mut(name).expect("known backend").stop();
    }

    pub fn start_backend(&mut self, name: &str) -> Result<()> {
        self.backends.get_mut(name).expect("known backend").start()
    }

    pub fn set_status(&self, name: &str, status: u16) {
        self.backends
            .get(name)
            .expect("known backend")
            .set_status(status);
    }

    pub fn start_agent(&mut self) -> Result<&mut Agent> {
        self.bed.start_agent(&[], READY_TIMEOUT)
    }

    /// Starts the agent with Kubernetes as its source (no config file): `kubeconfig`
    /// for the API server, `node` and `cluster` as the DaemonSet would pass them.
    pub fn start_kubernetes_agent(
        &mut self,
        kubeconfig: &Path,
        node: &str,
        cluster: &str,
    ) -> Result<&mut Agent> {
        self.start_kubernetes_agent_with(kubeconfig, node, cluster, &[])
    }

    /// [`World::start_kubernetes_agent`] with `extra` arguments.
    pub fn start_kubernetes_agent_with(
        &mut self,
        kubeconfig: &Path,
        node: &str,
        cluster: &str,
        extra: &[&str],
    ) -> Result<&mut Agent> {
        let kubeconfig = kubeconfig.display().to_string();
        // No `--config`: the agent's source is Kubernetes.
        let mut options = self.bed.options();
        options.config = PathBuf::new();
        let mut args = vec![
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            node,
            "--cluster-name",
            cluster,
        ];
        args.extend_from_slice(extra);
        self.bed.start_agent_with(options, &args, READY_TIMEOUT)
    }

    pub fn gets(&self, vip: &str, count: u32) -> Result<Vec<Get>> {
        client::gets(&self.cgroup, vip.parse()?, count, 0)
    }

    /// Counts answers by body; errors count under "ERR".
    pub fn answers(&self, vip: &str, count: u32) -> Result<BTreeMap<String, u32>> {
        let mut by = BTreeMap::new();
        for g in self.gets(vip, count)? {
            *by.entry(g.body.unwrap_or_else(|| "ERR".into()))
                .or_insert(0) += 1;
        }
        Ok(by)
    }

    /// Waits until `count` requests to `target` are all answered by the backends named in
    /// `only` (and by each of them), at most `within`; fails with the agent's log.
    pub async fn until_answers(&self, target: &str, only: &[&str], within: Duration) -> Result<()> {
        let expected: Vec<String> = only.iter().map(ToString::to_string).collect();
        let mut last = BTreeMap::new();
        detour_testbed::eventually(
            &format!("{target} answered only by {only:?}"),
            within,
            || {
                let seen = self.answers(target, 10);
                let done = seen
                    .as_ref()
                    .is_ok_and(|seen| seen.keys().cloned().collect::<Vec<_>>() == expected);
                if let Ok(seen) = seen.as_ref() {
                    last = seen.clone();
                }
                async move { seen.map(|_| done.then_some(())) }
            },
        )
        .await
        .with_context(|| format!("last answers {last:?}\n{}", self.log()))
    }

    /// Polls 10 GETs at a time until `want` answers every one of them, at most `within`;
    /// fails with the last answers and the agent's log.
    pub fn wait_answered_by(&self, vip: &str, want: &str, within: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + within;
        let mut last = BTreeMap::new();
        while std::time::Instant::now() < deadline {
            let answers = self.answers(vip, 10)?;
            if answers.len() == 1 && answers.get(want) == Some(&10) {
                return Ok(());
            }
            last = answers;
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!(
            "{vip}: not answered by {want} alone within {within:?}; last {last:?}\n{}",
            self.log()
        )
    }

    /// Starts a connect loop against `vip` from inside the test's cgroup; stop it with
    /// [`World::finish_loop`].
    pub fn connect_loop(&self, vip: &str) -> Result<(LineStream, PathBuf)> {
        self.connect_loop_bounded(vip, u64::MAX, Duration::from_secs(60))
    }

    /// A [`World::connect_loop`] that also ends by itself after `max_connects` connects
    /// or `max_time`, whichever comes first.
    pub fn connect_loop_bounded(
        &self,
        vip: &str,
        max_connects: u64,
        max_time: Duration,
    ) -> Result<(LineStream, PathBuf)> {
        let stop = self
            .dir
            .join(&format!("stop-{}", detour_testbed::unique_name()));
        let child = client::spawn_in(
            &self.cgroup,
            &Script::ConnectLoop {
                target: vip.parse()?,
                stop_file: stop.clone(),
                max_connects,
                max_ms: u64::try_from(max_time.as_millis()).unwrap_or(u64::MAX),
            },
        )?;
        Ok((child, stop))
    }

    /// Stops a [`World::connect_loop`] and returns its summary.
    pub fn finish_loop(child: LineStream, stop: &Path) -> Result<LoopSummary> {
        std::fs::write(stop, b"")?;
        let mut lines: Vec<LoopSummary> = client::results(child, Duration::from_secs(15))?;
        lines
            .pop()
            .ok_or_else(|| anyhow::anyhow!("connect loop printed no summary"))
    }

    /// Waits (at most `timeout`, then kills it) for a [`World::connect_loop_bounded`] to
    /// end by itself and returns its summary.
    pub fn await_loop(child: LineStream, timeout: Duration) -> Result<LoopSummary> {
        client::results::<LoopSummary>(child, timeout)?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("connect loop printed no summary"))
    }

    /// Polls the agent's endpoints until `pred` holds, bounded by `timeout`.
    pub fn wait_endpoints(
        &mut self,
        service: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        self.agent().wait_endpoints(service, timeout, pred)
    }
}

/// The endpoint row for `address` in an endpoints JSON array.
pub fn endpoint<'a>(eps: &'a serde_json::Value, address: &str) -> Result<&'a serde_json::Value> {
    eps.as_array()
        .context("endpoints is an array")?
        .iter()
        .find(|e| e["address"] == address)
        .with_context(|| format!("no endpoint {address} in {eps:#}"))
}

/// The outcome ("Attached", "Adopted", "Replaced") each program had in one agent's log,
/// by program name, from its `program ready` lines.
/// `detour events -o json` collected in the background until [`Events::finish`].
pub struct Events {
    child: std::process::Child,
    lines: std::thread::JoinHandle<Vec<serde_json::Value>>,
}

impl Events {
    pub fn start(w: &World) -> Result<Self> {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_detour"))
            .args(["events", "-o", "json", "--socket"])
            .arg(w.dir.join("detour.sock"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .context("starting `detour events`")?;
        let stdout = child.stdout.take().context("events stdout")?;
        let lines = std::thread::spawn(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str(&l).ok())
                .collect()
        });
        // Let the stream subscribe before anything happens.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { child, lines })
    }

    pub fn finish(mut self) -> Result<Vec<serde_json::Value>> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines
            .join()
            .map_err(|_| anyhow::anyhow!("events reader panicked"))
    }
}

pub fn link_outcomes(log: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("program ready")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .map(|v| v.trim_matches('"').to_string())
        };
        if let (Some(program), Some(outcome)) = (field("program"), field("outcome")) {
            out.insert(program, outcome);
        }
    }
    out
}
