//! Real Kubernetes control planes on 127.0.0.1, one per simulated cluster, so that
//! detour's Kubernetes code is tested against the real wire protocol (watches, 410s,
//! server-side apply, CRD validation) rather than a model of it.
//!
//! A [`Cluster`] is its own etcd (own data directory, free ports) and kube-apiserver (own
//! CA and serving certificate for 127.0.0.1, own admin token, own service-account keys,
//! its own /24 of 198.18.0.0/15 as service CIDR), and, when asked for, a
//! kube-controller-manager (garbage collection, namespace deletion). The binaries come
//! from `KUBEBUILDER_ASSETS` (see [`assets_dir`]).
//!
//! Invariants:
//! - a `Cluster` is a guard: dropping it kills and reaps its processes, then removes its
//!   directory (certificates, etcd data, logs), pass or fail; processes are also tied to
//!   the test process (see `child.rs`), so even an aborted test run leaves none behind;
//! - clusters share nothing: ports, keys, tokens, data and service CIDRs are per cluster
//!   (service CIDRs are distinct within a process and, by mixing in the pid, very likely
//!   across processes), so several run side by side;
//! - every wait is bounded ([`ClusterOptions::ready_timeout`]), and an error from
//!   starting quotes the tail of each process's log;
//! - the API server can be killed and started again on the same port with the same
//!   flags and keys ([`Cluster::stop_apiserver`], [`Cluster::start_apiserver`]): its
//!   state is in etcd, which keeps running, and clients built before keep working.
//!
//! Where those binaries are missing, [`fake::FakeCluster`] serves the same API surface
//! from an in-process fake over HTTP, and [`AnyCluster`] runs a scenario written once
//! over either ([`ServerKind::from_env`] picks; [`FAKE_ENV`] forces the fake).
//!
//! Safety: the service CIDR is where ClusterIPs come from. Nothing here connects to one,
//! but a test that does (through detour) should set
//! [`ClusterOptions::blackhole_service_cidr`] or run its client in a network namespace
//! without a default route, so that a connect detour does not rewrite cannot leave the
//! machine.

mod assets;
mod child;
pub mod deploy;
mod etcd;
pub mod fake;
mod pki;
mod route;
pub mod scale;

pub use assets::{assets_dir, ASSETS_ENV, MISSING_HINT};

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::TempDir;
use child::ControlProcess;
use route::BlackholeRoute;

/// How often a wait for readiness asks again.
const POLL: Duration = Duration::from_millis(100);
/// Deadline for one `/readyz` request.
const READYZ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a start whose ports were taken meanwhile is retried with fresh ports.
const PORT_ATTEMPTS: u32 = 3;
/// The controllers kube-controller-manager runs: all but one OpenShift addition that
/// wants OpenShift's APIs (see ../shared/k8s/README.md).
const CONTROLLERS: &str = "*,-service-ca-certificate-publisher-controller";

/// What a [`Cluster`] runs besides etcd and kube-apiserver, and how long it may take.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Also run kube-controller-manager: owner-reference garbage collection, namespace
    /// deletion, service-account tokens. Costs ~125 MiB; off by default.
    pub controller_manager: bool,
    /// The API server's watch cache (`--watch-cache`, on by default). Off, every watch is
    /// served by etcd itself, so once etcd is compacted a watch that resumes from an older
    /// resourceVersion gets 410 Gone at once; on, only resourceVersions older than the
    /// cache's window do.
    pub watch_cache: bool,
    /// Add a blackhole route for the service CIDR while the cluster lives (needs root).
    pub blackhole_service_cidr: bool,
    /// Bound on each wait for readiness (etcd healthy, `/readyz` ok).
    pub ready_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            controller_manager: false,
            watch_cache: true,
            blackhole_service_cidr: false,
            // Seen: 2-3 s on an idle 2-core machine; generous for a loaded one.
            ready_timeout: Duration::from_secs(90),
        }
    }
}

/// One simulated Kubernetes cluster on 127.0.0.1; everything stops and is removed on drop.
pub struct Cluster {
    name: String,
    // Field order is drop order: the controller manager and the API server go before
    // etcd, every process before the directory they write into.
    controller_manager: Option<ControlProcess>,
    apiserver: ControlProcess,
    etcd: ControlProcess,
    _blackhole: Option<BlackholeRoute>,
    etcd_addr: SocketAddr,
    api_port: u16,
    service_cidr: String,
    admin_token: String,
    kubeconfig: PathBuf,
    config: kube::Config,
    client: kube::Client,
    kubectl: PathBuf,
    ready_timeout: Duration,
    dir: TempDir,
}

impl Cluster {
    /// Starts etcd and kube-apiserver for the cluster `name` and waits until `/readyz`
    /// answers `ok`.
    ///
    /// `name` names the kubeconfig's cluster and context and appears in errors; it need
    /// not be unique.
    pub async fn start(name: &str) -> Result<Self> {
        Self::start_with(name, ClusterOptions::default()).await
    }

    /// [`Cluster::start`] with options.
    pub async fn start_with(name: &str, opts: ClusterOptions) -> Result<Self> {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            match Self::try_start(name, &opts).await {
                // Free ports are picked by binding port 0 and closing; another process
                // may take one before etcd or the API server binds it.
                Err(e)
                    if attempt < PORT_ATTEMPTS
                        && format!("{e:#}").contains("address already in use") =>
                {
                    eprintln!("k8s testbed: cluster {name}: a port was taken meanwhile, retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e.context(format!("starting Kubernetes cluster {name}"))),
                Ok(cluster) => {
                    eprintln!(
                        "k8s testbed: cluster {name} ready at {} in {:.1?} (service CIDR {})",
                        cluster.server_url(),
                        started.elapsed(),
                        cluster.service_cidr
                    );
                    return Ok(cluster);
                }
            }
        }
    }

    /// Starts one cluster per `(name, options)` concurrently; fails if any fails (the
    /// others are then stopped again).
    pub async fn start_all(specs: &[(&str, ClusterOptions)]) -> Result<Vec<Self>> {
        futures::future::try_join_all(
            specs
                .iter()
                .map(|(name, opts)| Self::start_with(name, opts.clone())),
        )
        .await
    }

    async fn try_start(name: &str, opts: &ClusterOptions) -> Result<Self> {
        let assets = assets_dir()?;
        let etcd_bin = assets::binary(&assets, "etcd")?;
        let apiserver_bin = assets::binary(&assets, "kube-apiserver")?;
        let controller_manager_bin = opts
            .controller_manager
            .then(|| assets::binary(&assets, "kube-controller-manager"))
            .transpose()?;
        let dir = TempDir::new()?;
        let pki = pki::generate(name)?;
        let service_cidr = next_service_cidr();
        let write = |file: &str, contents: &str| -> Result<PathBuf> {
            let path = dir.join(file);
            std::fs::write(&path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let ca = write("ca.crt", &pki.ca_cert)?;
        let serving_cert = write("apiserver.crt", &pki.serving_cert)?;
        let serving_key = write("apiserver.key", &pki.serving_key)?;
        let sa_key = write("sa.key", &pki.service_account_key)?;
        let sa_pub = write("sa.pub", &pki.service_account_pub)?;
        let tokens = write(
            "tokens.csv",
            &format!("{},admin,admin,system:masters\n", pki.admin_token),
        )?;
        let [etcd_port, peer_port, api_port] = free_ports()?;
        let etcd_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, etcd_port));
        let deadline = Instant::now() + opts.ready_timeout;

        let etcd_url = format!("http://{etcd_addr}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = ControlProcess::spawn(
            "etcd",
            etcd_bin,
            args([
                "--name".into(),
                name.into(),
                "--data-dir".into(),
                dir.join("etcd").into(),
                "--listen-client-urls".into(),
                etcd_url.clone().into(),
                "--advertise-client-urls".into(),
                etcd_url.clone().into(),
                "--listen-peer-urls".into(),
                peer_url.clone().into(),
                "--initial-advertise-peer-urls".into(),
                peer_url.clone().into(),
                "--initial-cluster".into(),
                format!("{name}={peer_url}").into(),
                "--initial-cluster-state".into(),
                "new".into(),
                // Less disk work: tests never need the old WAL files.
                "--unsafe-no-fsync".into(),
            ]),
            dir.join("etcd.log"),
        )?;
        while !etcd::healthy(etcd_addr).await {
            if let Some(status) = etcd.exited() {
                bail!(
                    "etcd exited ({status}) before it was healthy\n{}",
                    etcd.log_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd at {etcd_addr} not healthy within {:?}\n{}",
                    opts.ready_timeout,
                    etcd.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }

        let mut apiserver_args = args([
            "--etcd-servers".into(),
            etcd_url.into(),
            "--bind-address".into(),
            "127.0.0.1".into(),
            "--advertise-address".into(),
            "127.0.0.1".into(),
            "--secure-port".into(),
            api_port.to_string().into(),
            "--tls-cert-file".into(),
            serving_cert.into(),
            "--tls-private-key-file".into(),
            serving_key.into(),
            "--client-ca-file".into(),
            ca.clone().into(),
            "--token-auth-file".into(),
            tokens.into(),
            "--service-account-key-file".into(),
            sa_pub.into(),
            "--service-account-signing-key-file".into(),
            sa_key.clone().into(),
            "--service-account-issuer".into(),
            "https://kubernetes.default.svc.cluster.local".into(),
            "--service-cluster-ip-range".into(),
            service_cidr.clone().into(),
            "--authorization-mode".into(),
            "Node,RBAC".into(),
            "--cert-dir".into(),
            dir.join("generated").into(),
            // With 127.0.0.1 as advertise address the API server's own Endpoints writes
            // are refused as loopback; nothing here needs them.
            "--endpoint-reconciler-type".into(),
            "none".into(),
            "--profiling=false".into(),
        ]);
        if !opts.watch_cache {
            apiserver_args.push("--watch-cache=false".into());
        }
        let mut apiserver = ControlProcess::spawn(
            "kube-apiserver",
            apiserver_bin,
            apiserver_args,
            dir.join("kube-apiserver.log"),
        )?;

        let server_url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig_json = kubeconfig_for(name, &server_url, &pki.ca_cert, &pki.admin_token);
        let kubeconfig = write(
            "kubeconfig",
            &serde_json::to_string_pretty(&kubeconfig_json)?,
        )?;
        let config = client_config(&kubeconfig).await?;
        let client =
            kube::Client::try_from(config.clone()).context("building a client for the cluster")?;
        wait_ready(
            &client,
            &mut apiserver,
            &mut etcd,
            deadline,
            opts.ready_timeout,
        )
        .await?;

        let controller_manager = match controller_manager_bin {
            Some(bin) => Some(ControlProcess::spawn(
                "kube-controller-manager",
                bin,
                args([
                    "--kubeconfig".into(),
                    kubeconfig.clone().into(),
                    "--controllers".into(),
                    CONTROLLERS.into(),
                    "--leader-elect=false".into(),
                    // No serving port: nothing asks it anything, and it cannot clash.
                    "--secure-port".into(),
                    "0".into(),
                    "--service-account-private-key-file".into(),
                    sa_key.into(),
                    "--root-ca-file".into(),
                    ca.into(),
                    "--service-cluster-ip-range".into(),
                    service_cidr.clone().into(),
                    "--cluster-name".into(),
                    name.into(),
                ]),
                dir.join("kube-controller-manager.log"),
            )?),
            None => None,
        };
        let blackhole = opts
            .blackhole_service_cidr
            .then(|| BlackholeRoute::add(&service_cidr))
            .transpose()?;
        let kubectl = assets.join("kubectl");
        Ok(Self {
            name: name.into(),
            controller_manager,
            apiserver,
            etcd,
            _blackhole: blackhole,
            etcd_addr,
            api_port,
            service_cidr,
            admin_token: pki.admin_token,
            kubeconfig,
            config,
            client,
            kubectl: if kubectl.is_file() {
                kubectl
            } else {
                "kubectl".into()
            },
            ready_timeout: opts.ready_timeout,
            dir,
        })
    }

    /// The name given to [`Cluster::start`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A client authenticated as the cluster's admin (`system:masters`).
    ///
    /// Built in the runtime that started the cluster; for another runtime, build one
    /// from [`Cluster::config`].
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The admin client's configuration (server URL, CA, bearer token), to build other
    /// clients from — e.g. with another identity.
    pub fn config(&self) -> kube::Config {
        self.config.clone()
    }

    /// `https://127.0.0.1:PORT`; stays the same across API server restarts.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// A self-contained kubeconfig file (CA and token inline) for the admin: for kubectl,
    /// and as the content of "remote cluster" Secrets.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The kubeconfig file's contents (JSON, which every kubeconfig reader accepts).
    pub fn kubeconfig_contents(&self) -> Result<String> {
        std::fs::read_to_string(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))
    }

    /// The admin's bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The service CIDR ClusterIPs come from, e.g. `198.18.7.0/24`.
    pub fn service_cidr(&self) -> &str {
        &self.service_cidr
    }

    /// The cluster's private directory (logs, certificates, etcd data); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `kubectl --kubeconfig <this cluster's>`; kubectl from `KUBEBUILDER_ASSETS` if it is
    /// there (envtest ships one), else from `PATH`.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// Kills the API server (SIGKILL, like a crash) and reaps it; etcd keeps running.
    /// Clients then fail to connect until [`Cluster::start_apiserver`].
    pub fn stop_apiserver(&mut self) -> Result<()> {
        self.apiserver.stop()
    }

    /// Starts the API server again, on the same port with the same flags and keys, and
    /// waits for `/readyz`. A no-op wait when it was not stopped.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        self.apiserver.start()?;
        let deadline = Instant::now() + self.ready_timeout;
        wait_ready(
            &self.client,
            &mut self.apiserver,
            &mut self.etcd,
            deadline,
            self.ready_timeout,
        )
        .await
        .with_context(|| format!("restarting the API server of cluster {}", self.name))
    }

    /// Whether the API server process is running (started and not exited).
    pub fn apiserver_running(&mut self) -> bool {
        self.apiserver.pid().is_some() && self.apiserver.exited().is_none()
    }

    /// etcd's current revision: the newest resourceVersion the API server can hand out.
    pub async fn etcd_revision(&self) -> Result<i64> {
        etcd::revision(self.etcd_addr).await
    }

    /// Compacts etcd at its current revision, which it returns: every older
    /// resourceVersion is gone, so a watch resuming from one gets 410 Gone (at once
    /// without the watch cache, see [`ClusterOptions::watch_cache`]).
    pub async fn compact_etcd(&self) -> Result<i64> {
        let revision = self.etcd_revision().await?;
        etcd::compact(self.etcd_addr, revision).await?;
        Ok(revision)
    }

    /// The tail of every process's log, for a failing test's message.
    pub fn logs(&self) -> String {
        [
            Some(&self.etcd),
            Some(&self.apiserver),
            self.controller_manager.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(ControlProcess::log_tail)
        .collect::<Vec<_>>()
        .join("\n")
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("server", &self.server_url())
            .field("etcd", &self.etcd_addr)
            .field("service_cidr", &self.service_cidr)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// Set to `1` to run the scenarios written over [`AnyCluster`] against the fake API
/// server even where the real binaries are found (CI runs both).
pub const FAKE_ENV: &str = "DETOUR_K8S_FAKE";

/// Which API server a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// etcd + kube-apiserver from `KUBEBUILDER_ASSETS` ([`Cluster`]).
    Real,
    /// The in-repo fake API server ([`fake::FakeCluster`]).
    Fake,
}

impl ServerKind {
    /// The fake when [`FAKE_ENV`] is `1` or no real binaries are found, else the real one.
    pub fn from_env() -> Self {
        if std::env::var(FAKE_ENV).is_ok_and(|v| v == "1") || assets_dir().is_err() {
            Self::Fake
        } else {
            Self::Real
        }
    }
}

/// A cluster on either API server, with the surface the scenarios use, so that each
/// scenario is written once and runs over both.
#[derive(Debug)]
pub enum AnyCluster {
    // Boxed: both are large, and the enum is moved around.
    Real(Box<Cluster>),
    Fake(Box<fake::FakeCluster>),
}

impl AnyCluster {
    /// Starts a cluster on the server [`ServerKind::from_env`] picks.
    pub async fn start(name: &str, options: ClusterOptions) -> Result<Self> {
        Self::start_on(ServerKind::from_env(), name, options).await
    }

    /// Starts a cluster on the given server; for the fake, `options` mean what
    /// [`fake::FakeOptions::from`] says.
    pub async fn start_on(kind: ServerKind, name: &str, options: ClusterOptions) -> Result<Self> {
        Ok(match kind {
            ServerKind::Real => Self::Real(Box::new(Cluster::start_with(name, options).await?)),
            ServerKind::Fake => Self::Fake(Box::new(
                fake::FakeCluster::start_with(name, (&options).into()).await?,
            )),
        })
    }

    pub fn kind(&self) -> ServerKind {
        match self {
            Self::Real(_) => ServerKind::Real,
            Self::Fake(_) => ServerKind::Fake,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Real(c) => c.name(),
            Self::Fake(c) => c.name(),
        }
    }

    pub fn client(&self) -> kube::Client {
        match self {
            Self::Real(c) => c.client(),
            Self::Fake(c) => c.client(),
        }
    }

    pub fn config(&self) -> kube::Config {
        match self {
            Self::Real(c) => c.config(),
            Self::Fake(c) => c.config(),
        }
    }

    pub fn server_url(&self) -> String {
        match self {
            Self::Real(c) => c.server_url(),
            Self::Fake(c) => c.server_url(),
        }
    }

    pub fn kubeconfig_path(&self) -> &Path {
        match self {
            Self::Real(c) => c.kubeconfig_path(),
            Self::Fake(c) => c.kubeconfig_path(),
        }
    }

    pub fn kubeconfig_contents(&self) -> Result<String> {
        match self {
            Self::Real(c) => c.kubeconfig_contents(),
            Self::Fake(c) => c.kubeconfig_contents(),
        }
    }

    pub fn service_cidr(&self) -> &str {
        match self {
            Self::Real(c) => c.service_cidr(),
            Self::Fake(c) => c.service_cidr(),
        }
    }

    pub fn stop_apiserver(&mut self) -> Result<()> {
        match self {
            Self::Real(c) => c.stop_apiserver(),
            Self::Fake(c) => c.stop_apiserver(),
        }
    }

    pub async fn start_apiserver(&mut self) -> Result<()> {
        match self {
            Self::Real(c) => c.start_apiserver().await,
            Self::Fake(c) => c.start_apiserver().await,
        }
    }

    pub fn apiserver_running(&mut self) -> bool {
        match self {
            Self::Real(c) => c.apiserver_running(),
            Self::Fake(c) => c.apiserver_running(),
        }
    }

    pub async fn etcd_revision(&self) -> Result<i64> {
        match self {
            Self::Real(c) => c.etcd_revision().await,
            Self::Fake(c) => c.etcd_revision().await,
        }
    }

    pub async fn compact_etcd(&self) -> Result<i64> {
        match self {
            Self::Real(c) => c.compact_etcd().await,
            Self::Fake(c) => c.compact_etcd().await,
        }
    }

    pub fn logs(&self) -> String {
        match self {
            Self::Real(c) => c.logs(),
            Self::Fake(c) => c.logs(),
        }
    }
}

/// Waits until `/readyz` answers `ok`, failing early (with logs) when a process exits.
async fn wait_ready(
    client: &kube::Client,
    apiserver: &mut ControlProcess,
    etcd: &mut ControlProcess,
    deadline: Instant,
    timeout: Duration,
) -> Result<()> {
    loop {
        if let Some((who, status)) = apiserver
            .exited()
            .map(|s| ("kube-apiserver", s))
            .or_else(|| etcd.exited().map(|s| ("etcd", s)))
        {
            bail!(
                "{who} exited ({status}) before /readyz was ok\n{}\n{}",
                etcd.log_tail(),
                apiserver.log_tail()
            );
        }
        let request = http::Request::get("/readyz").body(Vec::new())?;
        let last = match tokio::time::timeout(READYZ_TIMEOUT, client.request_text(request)).await {
            Ok(Ok(body)) if body.trim() == "ok" => return Ok(()),
            Ok(Ok(body)) => format!("answer {body:?}"),
            Ok(Err(e)) => format!("{e}"),
            Err(_) => format!("no answer within {READYZ_TIMEOUT:?}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "kube-apiserver not ready within {timeout:?} (last /readyz: {last})\n{}\n{}",
                etcd.log_tail(),
                apiserver.log_tail()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The admin kubeconfig: one cluster, one user, one context, all named `name`.
fn kubeconfig_for(name: &str, server: &str, ca_pem: &str, token: &str) -> serde_json::Value {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": name,
            "cluster": {"server": server, "certificate-authority-data": ca_data},
        }],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    })
}

/// Reads the kubeconfig back the way kube's users do, so the file itself is what works.
async fn client_config(kubeconfig: &Path) -> Result<kube::Config> {
    let parsed = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading {}", kubeconfig.display()))
}

/// Three distinct free ports on 127.0.0.1 (all bound at once, so they differ).
fn free_ports() -> Result<[u16; 3]> {
    let listeners = (0..3)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free ports on 127.0.0.1")?;
    let port = |i: usize| -> Result<u16> { Ok(listeners[i].local_addr()?.port()) };
    Ok([port(0)?, port(1)?, port(2)?])
}

/// The next cluster's service CIDR: slot `pid * 8 + n` of the 512 /24s in 198.18.0.0/15.
fn next_service_cidr() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    service_cidr_for(std::process::id().wrapping_mul(8).wrapping_add(n))
}

/// The /24 number `slot % 512` of 198.18.0.0/15 (reserved for benchmarking: no real
/// network uses it).
fn service_cidr_for(slot: u32) -> String {
    let slot = slot % 512;
    format!("198.{}.{}.0/24", 18 + slot / 256, slot % 256)
}

fn args<const N: usize>(list: [OsString; N]) -> Vec<OsString> {
    list.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_cidrs_cover_the_benchmarking_range_only() {
        assert_eq!(service_cidr_for(0), "198.18.0.0/24");
        assert_eq!(service_cidr_for(255), "198.18.255.0/24");
        assert_eq!(service_cidr_for(256), "198.19.0.0/24");
        assert_eq!(service_cidr_for(511), "198.19.255.0/24");
        assert_eq!(service_cidr_for(512), "198.18.0.0/24");
        let (a, b) = (next_service_cidr(), next_service_cidr());
        assert_ne!(a, b);
    }

    #[test]
    fn kubeconfig_names_server_ca_and_token() {
        let json = kubeconfig_for("kind2", "https://127.0.0.1:6443", "PEM", "tok");
        let parsed: Kubeconfig = serde_json::from_value(json).unwrap();
        assert_eq!(parsed.current_context.as_deref(), Some("kind2"));
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("UEVN"));
    }

    #[test]
    fn free_ports_differ() {
        let [a, b, c] = free_ports().unwrap();
        assert!(a != b && b != c && a != c);
    }
}
