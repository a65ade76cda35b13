//! A small in-repo Kubernetes API server, served over plain HTTP on 127.0.0.1 to a real
//! `kube::Client`, for machines without the real control-plane binaries
//! (`KUBEBUILDER_ASSETS`): the same scenarios run against it as against a real
//! [`Cluster`](super::Cluster) (see [`AnyCluster`](super::AnyCluster)).
//!
//! It serves a generic JSON object store ([`store`]) for the resources detour uses —
//! core/v1 Services, Nodes, Secrets, Namespaces, ConfigMaps; discovery.k8s.io/v1
//! EndpointSlices; coordination.k8s.io/v1 Leases; RBAC, apps and ServiceAccounts for
//! `deploy/`'s manifests — and for every CustomResourceDefinition created in it (so
//! FailoverServices exist once their CRD is installed, as on a real server). What it
//! implements of kube-apiserver: GET, LIST with label and field selectors and the list's
//! resourceVersion, WATCH from a resourceVersion with bookmarks, `timeoutSeconds` and
//! 410 Expired after [`FakeCluster::compact_etcd`], CREATE (409 AlreadyExists), PUT,
//! DELETE, merge patches and a simplified server-side apply, `/status` subresources,
//! `metadata.generation`, optimistic concurrency on a given resourceVersion, ClusterIPs.
//! What it leaves out is listed in [`store`]'s doc: above all, no schema or CEL validation
//! and no managedFields — scenarios about those run against the real server only.
//!
//! Invariants:
//! - a `FakeCluster` is a guard: its server runs on a runtime of its own (one thread), so
//!   a test blocking its own runtime never stalls the API server; dropping it stops the
//!   server and removes its directory;
//! - [`FakeCluster::stop_apiserver`] closes the listener and cuts every connection (as a
//!   killed kube-apiserver does) and returns once the port is free;
//!   [`FakeCluster::start_apiserver`] serves again on the same port with the objects and
//!   history kept (they live in the store, as a real server's live in etcd);
//! - one cluster's objects, port and service CIDR are its own.

mod selector;
mod server;
mod store;
#[cfg(test)]
mod tests;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::route::BlackholeRoute;
use super::ClusterOptions;
use crate::TempDir;
use server::Shared;
pub use store::Store;

/// How long [`FakeCluster::stop_apiserver`] waits for the listener and connections to go.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`FakeCluster::start_apiserver`] retries binding its port.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

/// How a [`FakeCluster`] behaves.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Add a blackhole route for the service CIDR while the cluster lives (needs root);
    /// as [`ClusterOptions::blackhole_service_cidr`].
    pub blackhole_service_cidr: bool,
    /// How often a watch that allows bookmarks gets one (kube-apiserver: about a minute;
    /// shorter here so that tests see them).
    pub bookmark_interval: Duration,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            blackhole_service_cidr: false,
            bookmark_interval: Duration::from_secs(2),
        }
    }
}

impl From<&ClusterOptions> for FakeOptions {
    /// What a real cluster's options mean for the fake: the blackhole route carries
    /// over; the watch cache and controller manager have no counterpart (the fake answers
    /// as kube-apiserver without a watch cache, and collects no garbage).
    fn from(options: &ClusterOptions) -> Self {
        Self {
            blackhole_service_cidr: options.blackhole_service_cidr,
            ..Self::default()
        }
    }
}

/// The running server: its task and the channel that disconnects when it is gone.
struct Running {
    task: tokio::task::JoinHandle<()>,
    closed: std::sync::mpsc::Receiver<()>,
}

/// One simulated cluster served by the in-process fake API server.
pub struct FakeCluster {
    name: String,
    running: Option<Running>,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    port: u16,
    service_cidr: String,
    kubeconfig: PathBuf,
    config: kube::Config,
    client: kube::Client,
    _blackhole: Option<BlackholeRoute>,
    dir: TempDir,
}

impl FakeCluster {
    /// Starts a fake API server for the cluster `name` (which names the kubeconfig's
    /// cluster and context) on a free port of 127.0.0.1.
    pub async fn start(name: &str) -> Result<Self> {
        Self::start_with(name, FakeOptions::default()).await
    }

    /// [`FakeCluster::start`] with options.
    pub async fn start_with(name: &str, options: FakeOptions) -> Result<Self> {
        let dir = TempDir::new()?;
        let service_cidr = super::next_service_cidr();
        let shared = Arc::new(Shared::new(
            Store::new(&service_cidr),
            options.bookmark_interval,
        ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("fake-apiserver-{name}"))
            .enable_all()
            .build()
            .context("building the fake API server's runtime")?;
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding the fake API server to 127.0.0.1")?;
        let port = listener.local_addr()?.port();
        let running = spawn(&runtime, listener, shared.clone())?;

        let server = format!("http://127.0.0.1:{port}");
        let kubeconfig = dir.join("kubeconfig");
        let contents = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": server}}],
            "users": [{"name": name, "user": {"token": "fake-admin"}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name,
        });
        std::fs::write(&kubeconfig, serde_json::to_string_pretty(&contents)?)
            .with_context(|| format!("writing {}", kubeconfig.display()))?;
        let config = super::client_config(&kubeconfig).await?;
        let client = kube::Client::try_from(config.clone())
            .context("building a client for the fake API server")?;
        let ready = http::Request::get("/readyz").body(Vec::new())?;
        let answer = client
            .request_text(ready)
            .await
            .with_context(|| format!("asking the fake API server at {server} for /readyz"))?;
        if answer != "ok" {
            bail!("the fake API server at {server} answered /readyz with {answer:?}");
        }
        let blackhole = options
            .blackhole_service_cidr
            .then(|| BlackholeRoute::add(&service_cidr))
            .transpose()?;
        eprintln!(
            "k8s testbed: fake cluster {name} ready at {server} (service CIDR {service_cidr})"
        );
        Ok(Self {
            name: name.into(),
            running: Some(running),
            shared,
            runtime: Some(runtime),
            port,
            service_cidr,
            kubeconfig,
            config,
            client,
            _blackhole: blackhole,
            dir,
        })
    }

    /// The name given to [`FakeCluster::start`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A client for the fake API server (which checks no credentials).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The client's configuration, to build other clients from.
    pub fn config(&self) -> kube::Config {
        self.config.clone()
    }

    /// `http://127.0.0.1:PORT`; stays the same across restarts.
    pub fn server_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig file naming the server's http URL: for the agent, and as the content
    /// of "remote cluster" Secrets.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The kubeconfig file's contents (JSON).
    pub fn kubeconfig_contents(&self) -> Result<String> {
        std::fs::read_to_string(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))
    }

    /// The service CIDR ClusterIPs come from, e.g. `198.18.7.0/24`.
    pub fn service_cidr(&self) -> &str {
        &self.service_cidr
    }

    /// The cluster's private directory (its kubeconfig); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The object store, to look at or change directly (e.g. to end every watch).
    pub fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        f(&mut self.shared.store())
    }

    /// Stops serving: the listener closes and every connection (every watch) is cut.
    /// Clients then fail to connect until [`FakeCluster::start_apiserver`].
    pub fn stop_apiserver(&mut self) -> Result<()> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        running.task.abort();
        match running.closed.recv_timeout(STOP_TIMEOUT) {
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Ok(()),
            _ => bail!(
                "the fake API server of cluster {} did not stop within {STOP_TIMEOUT:?}",
                self.name
            ),
        }
    }

    /// Serves again on the same port, with the objects and history kept. A no-op when
    /// it was not stopped.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = std::time::Instant::now() + REBIND_TIMEOUT;
        let listener = loop {
            match std::net::TcpListener::bind(address) {
                Ok(listener) => break listener,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!(
                        "k8s testbed: fake cluster {}: rebinding {address}: {e}; retrying",
                        self.name
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "restarting the fake API server of cluster {} on {address}",
                            self.name
                        )
                    })
                }
            }
        };
        let runtime = self
            .runtime
            .as_ref()
            .context("the fake cluster's runtime is gone")?;
        self.running = Some(spawn(runtime, listener, self.shared.clone())?);
        Ok(())
    }

    /// Whether the server is serving (not stopped).
    pub fn apiserver_running(&mut self) -> bool {
        self.running.is_some()
    }

    /// The newest resourceVersion handed out (the counterpart of etcd's revision).
    pub async fn etcd_revision(&self) -> Result<i64> {
        Ok(i64::try_from(self.shared.store().resource_version())?)
    }

    /// Forgets the history before the current resourceVersion, which it returns: a watch
    /// resuming from an older one gets 410 Expired (as from a real API server without a
    /// watch cache after etcd is compacted). Open watches go on, as they do on a real
    /// one; [`Store::end_watches`] ends them, so they resume.
    pub async fn compact_etcd(&self) -> Result<i64> {
        Ok(i64::try_from(self.shared.store().compact())?)
    }

    /// The last requests served (`METHOD URI -> CODE`), for a failing test's message.
    pub fn logs(&self) -> String {
        format!(
            "fake API server of cluster {} (resourceVersion {}), last requests:\n{}",
            self.name,
            self.shared.store().resource_version(),
            self.shared.requests().join("\n")
        )
    }
}

/// Serves `listener` on `runtime`.
fn spawn(
    runtime: &tokio::runtime::Runtime,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
) -> Result<Running> {
    listener.set_nonblocking(true)?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let (closed_tx, closed) = std::sync::mpsc::sync_channel(0);
    let task = runtime.spawn(server::serve(listener, shared, closed_tx));
    Ok(Running { task, closed })
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.task.abort();
        }
        // Dropping a runtime blocks, which is not allowed inside the test's runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for FakeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCluster")
            .field("name", &self.name)
            .field("server", &self.server_url())
            .field("service_cidr", &self.service_cidr)
            .finish_non_exhaustive()
    }
}
