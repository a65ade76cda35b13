//! TLS origination: the one place detour is a proxy. A service with `tls` asks detour to
//! speak TLS to its endpoints while applications speak plain bytes to its VIP (the
//! second seed's "Failover for HTTPS"). The kernel cannot encrypt, so for such a
//! frontend its table holds one slot, this module's listener for the frontend
//! ([`crate::desired::Via::Originator`]), and the connection takes one hop through the
//! agent:
//!
//! application ─plain─▶ VIP:port ─(connect rewritten)─▶ listener ─TLS─▶ backend
//!
//! For each accepted connection the originator takes the frontend's current plan (the
//! same tables, tiers, health and ejections the kernel would use), tries its backends in
//! [`pick::attempt_order`], and relays bytes both ways once one has completed the TCP and
//! TLS handshakes. Every attempt's outcome goes to the runtime as a [`Report`], which
//! feeds outlier detection exactly as the kernel's events do: a refused or timed-out
//! connect, and a failed TLS handshake (a wrong certificate is a failure), count against
//! the backend; a success after failures ends the run.
//!
//! Invariants:
//! - one listener per frontend of a service with `tls`, on `listen_ip` (loopback by
//!   default), at a port the kernel was told (an agent restart binds the port its pinned
//!   table names again when it can);
//! - at most `max_connections` relayed connections at once; past it, a new one is
//!   reset at once rather than queued, so memory is bounded: a connection holds two
//!   copy buffers of [`COPY_BUFFER_BYTES`] and rustls' own (at most one TLS record each
//!   way);
//! - a connection tries at most [`MAX_ATTEMPTS`] backends; when all fail it is reset, so
//!   the application sees the failure as the kernel path's ECONNREFUSED would show it;
//! - the originator never decides health: it reports outcomes and follows the plans the
//!   runtime gives it ([`Originator::set_routes`]).
//!
//! What it costs: a proxy hop only for services that ask for TLS (the others never pass
//! here), and an agent restart closes the connections relayed at the time; connects made
//! while no agent runs are refused (see the README's "TLS origination").

pub mod pick;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, warn};

use crate::desired::FrontendPlan;
use crate::outlier::{FailureKind, Outcome};

/// Backends one connection tries before it is given up.
pub const MAX_ATTEMPTS: usize = 3;
/// Each direction's copy buffer.
pub const COPY_BUFFER_BYTES: usize = 16 * 1024;
/// Reports waiting for the runtime; past it, reports are dropped and counted (the
/// runtime is behind; the kernel's ring buffer does the same).
const REPORT_QUEUE: usize = 4096;

/// One backend attempt's outcome, for outlier detection.
#[derive(Debug, Clone)]
pub struct Report {
    pub service: Arc<str>,
    pub target: SocketAddr,
    pub outcome: Outcome,
    /// What happened, for logs and `detour events`.
    pub detail: String,
}

/// What the originator needs to serve one frontend.
#[derive(Debug)]
pub struct Route {
    pub service: Arc<str>,
    pub tls: Arc<ClientConfig>,
    /// The plan's tables (shared with it, not copied).
    pub table: Arc<[SocketAddr]>,
    pub standby: Arc<[SocketAddr]>,
    /// The name each backend is asked for and checked against.
    pub names: HashMap<SocketAddr, ServerName<'static>>,
    /// How long a TCP connect to a backend may take.
    pub connect_timeout: Duration,
    /// How long the TLS handshake may take once connected.
    pub handshake_timeout: Duration,
}

impl Route {
    /// The route of `plan`, `name_of` giving each backend's server name.
    pub fn of(
        plan: &FrontendPlan,
        tls: Arc<ClientConfig>,
        name_of: impl Fn(SocketAddr) -> ServerName<'static>,
        connect_timeout: Duration,
        handshake_timeout: Duration,
    ) -> Self {
        Self {
            service: Arc::from(plan.service.as_str()),
            tls,
            table: plan.table.clone(),
            standby: plan.standby.clone(),
            names: plan
                .endpoints
                .iter()
                .map(|e| (e.target, name_of(e.target)))
                .collect(),
            connect_timeout,
            handshake_timeout,
        }
    }
}

/// Counters, read by metrics and the CLI.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted from applications.
    pub accepted: AtomicU64,
    /// Connections relayed to a backend (handshakes completed).
    pub relayed: AtomicU64,
    /// Backend attempts that failed (connect or TLS handshake).
    pub attempts_failed: AtomicU64,
    /// Connections reset because every backend tried failed, or there was none.
    pub gave_up: AtomicU64,
    /// Connections reset because `max_connections` were open.
    pub over_limit: AtomicU64,
    /// Reports dropped because the runtime was behind.
    pub reports_dropped: AtomicU64,
    /// Bytes from applications to backends, and back.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// What the originator did with one backend address, over every service that has it
/// (as the kernel's per-backend counters are): `detour endpoints` shows these for the
/// backends of services with `tls`, which the kernel never connects to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCounts {
    /// Attempts: TCP connects started.
    pub connects: u64,
    /// Attempts whose TCP and TLS handshakes completed.
    pub established: u64,
    /// Connects refused or reset.
    pub refused: u64,
    /// Connects that timed out.
    pub timeouts: u64,
    /// TLS handshakes that failed or timed out.
    pub tls_failures: u64,
}

/// A snapshot of [`Stats`] and the connections open now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsView {
    pub listeners: usize,
    pub active: usize,
    pub accepted: u64,
    pub relayed: u64,
    pub attempts_failed: u64,
    pub gave_up: u64,
    pub over_limit: u64,
    pub reports_dropped: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// The connections relayed to one backend, by id: each with its service and the handle
/// that ends its copy task.
type Relayed = HashMap<u64, (Arc<str>, AbortHandle)>;

/// State shared by the listeners' tasks.
struct Shared {
    routes: RwLock<HashMap<SocketAddr, Arc<Route>>>,
    /// Woken whenever routes are set: a connection accepted before its frontend's first
    /// route (an agent that just started listens before its first apply) waits for it.
    routed: tokio::sync::Notify,
    permits: Arc<Semaphore>,
    max_connections: usize,
    reports: mpsc::Sender<Report>,
    /// Backends whose last attempt failed, by service: only a success that ends a run
    /// is reported (as the kernel does).
    failing: Mutex<std::collections::HashSet<(Arc<str>, SocketAddr)>>,
    /// Relayed connections by backend, so a backend that leaves can have them closed.
    live: Mutex<HashMap<SocketAddr, Relayed>>,
    next_id: AtomicU64,
    stats: Stats,
    backends: Mutex<HashMap<SocketAddr, BackendCounts>>,
}

/// A frontend's listener and the task accepting on it (aborted when dropped).
struct Listener {
    address: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The originator: one listener per frontend that originates TLS.
pub struct Originator {
    listen_ip: IpAddr,
    listeners: HashMap<SocketAddr, Listener>,
    shared: Arc<Shared>,
}

impl Originator {
    /// An originator that listens on `listen_ip` and relays at most `max_connections`
    /// at once; the receiver gets its [`Report`]s.
    pub fn new(listen_ip: IpAddr, max_connections: usize) -> (Self, mpsc::Receiver<Report>) {
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        let shared = Arc::new(Shared {
            routes: RwLock::default(),
            routed: tokio::sync::Notify::new(),
            permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            reports: tx,
            failing: Mutex::default(),
            live: Mutex::default(),
            next_id: AtomicU64::new(0),
            stats: Stats::default(),
            backends: Mutex::default(),
        });
        (
            Self {
                listen_ip,
                listeners: HashMap::new(),
                shared,
            },
            rx,
        )
    }

    /// Where the listener of `frontend` is, if it has one.
    #[must_use]
    pub fn relay_of(&self, frontend: SocketAddr) -> Option<SocketAddr> {
        self.listeners.get(&frontend).map(|l| l.address)
    }

    /// Every frontend's listener.
    #[must_use]
    pub fn relays(&self) -> HashMap<SocketAddr, SocketAddr> {
        self.listeners
            .iter()
            .map(|(frontend, l)| (*frontend, l.address))
            .collect()
    }

    /// Makes the listeners those of `frontends`: new frontends get one (at the address
    /// `previous` names when it is on `listen_ip` and free, else at a new port), gone
    /// ones are closed with their routes. Returns the frontends whose listener could not
    /// be bound, with why; they have none (and their connects are left alone).
    pub fn sync(
        &mut self,
        frontends: &[SocketAddr],
        previous: impl Fn(SocketAddr) -> Option<SocketAddr>,
    ) -> Vec<(SocketAddr, anyhow::Error)> {
        self.listeners.retain(|f, _| frontends.contains(f));
        self.shared
            .routes
            .write()
            .expect("routes lock")
            .retain(|f, _| frontends.contains(f));
        let mut failed = Vec::new();
        for &frontend in frontends {
            if self.listeners.contains_key(&frontend) {
                continue;
            }
            let wanted = previous(frontend).filter(|a| a.ip() == self.listen_ip);
            let bound = wanted
                .and_then(|a| bind(a).ok())
                .map_or_else(|| bind(SocketAddr::new(self.listen_ip, 0)), Ok);
            match bound {
                Ok(listener) => {
                    let address = match listener.local_addr() {
                        Ok(a) => a,
                        Err(e) => {
                            failed.push((frontend, e.into()));
                            continue;
                        }
                    };
                    let task = tokio::spawn(serve(listener, frontend, self.shared.clone()));
                    debug!(%frontend, listener = %address, "TLS originator listening");
                    self.listeners.insert(frontend, Listener { address, task });
                }
                Err(e) => failed.push((frontend, e)),
            }
        }
        failed
    }

    /// Replaces the routes of `frontends` (a service's, after it was re-planned).
    pub fn set_routes(&self, routes: impl IntoIterator<Item = (SocketAddr, Route)>) {
        {
            let mut all = self.shared.routes.write().expect("routes lock");
            for (frontend, route) in routes {
                if self.listeners.contains_key(&frontend) {
                    all.insert(frontend, Arc::new(route));
                }
            }
        }
        self.shared.routed.notify_waiters();
    }

    /// Closes the connections relayed to `target` for `service`; returns how many.
    pub fn terminate(&self, service: &str, target: SocketAddr) -> usize {
        let mut live = self.shared.live.lock().expect("live lock");
        let Some(connections) = live.get_mut(&target) else {
            return 0;
        };
        let mut closed = 0;
        connections.retain(|_, (s, handle)| {
            if &**s == service {
                handle.abort();
                closed += 1;
                false
            } else {
                true
            }
        });
        if connections.is_empty() {
            live.remove(&target);
        }
        closed
    }

    /// The connections relayed to each backend now.
    #[must_use]
    pub fn active_by_backend(&self) -> HashMap<SocketAddr, usize> {
        self.shared
            .live
            .lock()
            .expect("live lock")
            .iter()
            .map(|(target, c)| (*target, c.len()))
            .collect()
    }

    /// What the originator did with `target`.
    #[must_use]
    pub fn backend_counts(&self, target: SocketAddr) -> BackendCounts {
        self.shared
            .backends
            .lock()
            .expect("backends lock")
            .get(&target)
            .copied()
            .unwrap_or_default()
    }

    #[must_use]
    pub fn stats(&self) -> StatsView {
        let s = &self.shared.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsView {
            listeners: self.listeners.len(),
            active: self.shared.max_connections - self.shared.permits.available_permits(),
            accepted: get(&s.accepted),
            relayed: get(&s.relayed),
            attempts_failed: get(&s.attempts_failed),
            gave_up: get(&s.gave_up),
            over_limit: get(&s.over_limit),
            reports_dropped: get(&s.reports_dropped),
            bytes_up: get(&s.bytes_up),
            bytes_down: get(&s.bytes_down),
        }
    }
}

fn bind(address: SocketAddr) -> Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("TLS originator socket")?;
    // A restarted agent takes its port back while the old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
    socket
        .bind(address)
        .with_context(|| format!("TLS originator bind {address}"))?;
    socket
        .listen(1024)
        .with_context(|| format!("TLS originator listen {address}"))
}

/// Accepts on one frontend's listener until aborted.
async fn serve(listener: TcpListener, frontend: SocketAddr, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning on the error.
                warn!(%frontend, %error, "TLS originator could not accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
            shared.stats.over_limit.fetch_add(1, Ordering::Relaxed);
            reset(client);
            continue;
        };
        tokio::spawn(relay(client, frontend, shared.clone(), permit));
    }
}

/// Closes `stream` with a RST, so the application sees a failed connection rather
/// than an orderly end of a reply it never got.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Why one attempt failed.
struct Failed {
    kind: FailureKind,
    detail: String,
}

async fn connect(
    route: &Route,
    target: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Failed> {
    let tcp = match tokio::time::timeout(route.connect_timeout, TcpStream::connect(target)).await {
        Err(_) => {
            return Err(Failed {
                kind: FailureKind::Timeout,
                detail: format!("TCP connect timed out after {:?}", route.connect_timeout),
            })
        }
        Ok(Err(e)) => {
            let kind = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                FailureKind::Refused
            } else {
                FailureKind::Reset
            };
            return Err(Failed {
                kind,
                detail: format!("TCP connect: {e}"),
            });
        }
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    let name = route
        .names
        .get(&target)
        .cloned()
        .unwrap_or_else(|| ServerName::IpAddress(target.ip().into()));
    let connector = tokio_rustls::TlsConnector::from(route.tls.clone());
    match tokio::time::timeout(
        route.handshake_timeout,
        connector.connect(name.clone(), tcp),
    )
    .await
    {
        Err(_) => Err(Failed {
            kind: FailureKind::Tls,
            detail: format!(
                "TLS handshake with {} timed out after {:?}",
                name.to_str(),
                route.handshake_timeout
            ),
        }),
        Ok(Err(e)) => Err(Failed {
            kind: FailureKind::Tls,
            detail: format!("TLS handshake with {}: {e}", name.to_str()),
        }),
        Ok(Ok(stream)) => Ok(stream),
    }
}

impl Shared {
    /// Counts one attempt's outcome for `target`.
    fn count(&self, target: SocketAddr, outcome: Outcome) {
        let mut backends = self.backends.lock().expect("backends lock");
        let counts = backends.entry(target).or_default();
        counts.connects += 1;
        match outcome {
            Outcome::Success => counts.established += 1,
            Outcome::Failure(FailureKind::Timeout) => counts.timeouts += 1,
            Outcome::Failure(FailureKind::Tls) => counts.tls_failures += 1,
            Outcome::Failure(_) => counts.refused += 1,
        }
    }

    fn report(&self, route: &Route, target: SocketAddr, outcome: Outcome, detail: String) {
        self.count(target, outcome);
        let key = (route.service.clone(), target);
        {
            let mut failing = self.failing.lock().expect("failing lock");
            let was_failing = match outcome {
                Outcome::Success => failing.remove(&key),
                Outcome::Failure(_) => {
                    failing.insert(key);
                    true
                }
            };
            if !was_failing {
                return;
            }
        }
        let report = Report {
            service: route.service.clone(),
            target,
            outcome,
            detail,
        };
        if self.reports.try_send(report).is_err() {
            self.stats.reports_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How long a connection accepted before its frontend has a route waits for one.
const ROUTE_WAIT: Duration = Duration::from_secs(2);

/// The route of `frontend`, waiting up to [`ROUTE_WAIT`] for its first.
async fn route_of(shared: &Shared, frontend: SocketAddr) -> Option<Arc<Route>> {
    let deadline = tokio::time::Instant::now() + ROUTE_WAIT;
    loop {
        // Registered before looking, so a route set in between still wakes it.
        let routed = shared.routed.notified();
        if let Some(route) = shared.routes.read().expect("routes lock").get(&frontend) {
            return Some(route.clone());
        }
        if tokio::time::timeout_at(deadline, routed).await.is_err() {
            return None;
        }
    }
}

/// Relays one application connection: picks, connects, copies, reports.
async fn relay(
    mut client: TcpStream,
    frontend: SocketAddr,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    let Some(route) = route_of(&shared, frontend).await else {
        shared.stats.gave_up.fetch_add(1, Ordering::Relaxed);
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let start = rand::random::<u32>() as usize;
    for target in pick::attempt_order(&route.table, &route.standby, start, MAX_ATTEMPTS) {
        match connect(&route, target).await {
            Err(failed) => {
                shared.stats.attempts_failed.fetch_add(1, Ordering::Relaxed);
                debug!(service = %route.service, backend = %target, detail = %failed.detail, "TLS origination attempt failed");
                shared.report(&route, target, Outcome::Failure(failed.kind), failed.detail);
            }
            Ok(mut upstream) => {
                shared.stats.relayed.fetch_add(1, Ordering::Relaxed);
                shared.report(
                    &route,
                    target,
                    Outcome::Success,
                    "TLS handshake completed".to_owned(),
                );
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let copy = tokio::spawn(async move {
                    let copied = tokio::io::copy_bidirectional_with_sizes(
                        &mut client,
                        &mut upstream,
                        COPY_BUFFER_BYTES,
                        COPY_BUFFER_BYTES,
                    )
                    .await;
                    // Best effort: tell the backend the stream ended (close_notify).
                    let _ = upstream.shutdown().await;
                    copied
                });
                shared
                    .live
                    .lock()
                    .expect("live lock")
                    .entry(target)
                    .or_default()
                    .insert(id, (route.service.clone(), copy.abort_handle()));
                if let Ok(Ok((up, down))) = copy.await {
                    shared.stats.bytes_up.fetch_add(up, Ordering::Relaxed);
                    shared.stats.bytes_down.fetch_add(down, Ordering::Relaxed);
                }
                let mut live = shared.live.lock().expect("live lock");
                if let Some(connections) = live.get_mut(&target) {
                    connections.remove(&id);
                    if connections.is_empty() {
                        live.remove(&target);
                    }
                }
                return;
            }
        }
    }
    shared.stats.gave_up.fetch_add(1, Ordering::Relaxed);
    reset(client);
}
