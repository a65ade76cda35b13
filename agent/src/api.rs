//! The node-local API between a running agent and the `detour` CLI: one JSON request
//! line, one JSON response line, over a Unix socket that only root can open. The one
//! exception is [`Request::Events`], answered with a stream of [`Response::Event`]
//! lines until the client goes away.
//!
//! Invariants: the socket file is created mode 0600 in a directory of mode 0700, so only
//! root reaches the agent; every request gets exactly one response line (or, for
//! `Events`, one line per event); an unknown request is answered with an error, never
//! with silence.
//!
//! Bounds ([`Limits`]): nothing a client sends is trusted, root or not (a buggy client
//! does what a hostile one would). A request line longer than
//! [`MAX_REQUEST_BYTES`] or not complete within [`REQUEST_TIMEOUT`] is answered with an
//! error and the connection is closed, having buffered at most the bound; at most
//! [`MAX_CONNECTIONS`] connections (event streams included) are served at once and a
//! client past that is told so and closed at once; an answer the client does not read
//! within [`WRITE_TIMEOUT`] is dropped; a failing `accept` (EMFILE, ENFILE, ENOBUFS…)
//! backs off up to [`MAX_ACCEPT_BACKOFF`] instead of spinning.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::config::ServiceOrigin;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/detour/detour.sock";

/// The longest request line the agent reads, newline excluded. Every request is a few
/// dozen bytes; a service name is bounded by the config, not by this.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// How long a client has, from accept, to send its whole request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an answer may wait for the client to read it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once, `detour events` streams included.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest pause between two failing `accept` calls.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The bounds [`serve`] applies to every connection (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub request_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: MAX_REQUEST_BYTES,
            request_timeout: REQUEST_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Services,
    Endpoints {
        service: Option<String>,
    },
    /// Stream events as they happen.
    Events,
    /// Why each endpoint of one service port is, or is not, in the kernel's table.
    /// `port` may be left out when the service has one port.
    Explain {
        service: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
    /// The DNS names endpoints are given by, and what each resolved to.
    Names,
}

/// One DNS name as `detour names` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NameView {
    pub name: String,
    /// The services with an endpoint of this name.
    pub services: Vec<String>,
    /// `resolved`; `stale` (the last lookup failed, the last good addresses serve);
    /// `failed` (never resolved: no address serves); `pending` (not answered yet).
    pub state: String,
    /// What the name serves now: the last good answer's addresses, sorted.
    pub addresses: Vec<IpAddr>,
    /// Seconds since the last good answer, and the TTL it was kept for (bounded by
    /// `--dns-min-ttl` and `--dns-max-ttl`).
    pub resolved_secs_ago: Option<u64>,
    pub ttl_secs: Option<u64>,
    /// When the name is asked again; `None` while a lookup is under way.
    pub next_lookup_in_ms: Option<u64>,
    /// Failed lookups in a row, and the last one's error.
    pub failures: u32,
    pub last_error: Option<String>,
}

/// One (service, port) as `detour services` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub port: u16,
    /// "ip:port" of every frontend of this service port.
    pub vips: Vec<String>,
    /// The active tier (`same-zone`, `same-region`, `failover[N]:LOCALITY`, `other`,
    /// `panic`, or `none` without endpoints); tiers of several VIP families are joined
    /// with `,` when they differ.
    pub tier: String,
    pub endpoints: usize,
    pub healthy: usize,
    pub in_table: usize,
    pub connects: u64,
    /// `OK`; `NOT-PROGRAMMED` when the BPF maps have no room for the service (nothing
    /// of it is in them, its VIPs are not rewritten); `NOT-UPDATED` when it runs but its
    /// new state has no room (its frontends keep their previous tables, a new frontend
    /// of it is left out). An agent older than this field answers without it (`""`).
    #[serde(default)]
    pub state: String,
    /// The limit reached, for a state other than `OK`: `max-backends (262144) reached`.
    #[serde(default)]
    pub limit: Option<String>,
    /// Where the service is defined: the file, or the FailoverService (and the Service
    /// it takes over). An agent older than this field answers without it (`None`).
    #[serde(default)]
    pub origin: Option<ServiceOrigin>,
    /// The DNS names the agent answers with the service's VIPs (`hosts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// For a service with `tls`, where the TLS originator listens for each frontend
    /// (`VIP:port>listener`), or `no-listener` for one it could not open; empty for a
    /// service the kernel connects straight to its backends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_relays: Vec<String>,
}

/// `detour explain`: one service port, frontend by frontend (VIP by VIP).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExplainView {
    pub service: String,
    pub port: u16,
    pub origin: ServiceOrigin,
    pub frontends: Vec<FrontendExplanation>,
}

/// One frontend (VIP:port) and the reasons behind its table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FrontendExplanation {
    pub frontend: SocketAddr,
    /// The best tier that receives traffic: `same-zone`, ..., `panic`, or `none`
    /// without endpoints.
    pub tier: String,
    /// No endpoint is usable, so every endpoint serves (never black-hole).
    pub panic: bool,
    /// The tiers that receive new connects, best first, with their percent.
    pub loads: Vec<TierLoad>,
    /// `strict`, or `gradual (overprovisioning 140%)`.
    pub spill: String,
    /// Slots of the table the kernel picks from, and of its standby table.
    pub slots: usize,
    pub standby_slots: usize,
    /// `OK`, `NOT-PROGRAMMED` or `NOT-UPDATED` with the limit, as in `detour services`.
    pub state: String,
    pub endpoints: Vec<EndpointExplanation>,
}

/// A tier that receives traffic and its percent of new connects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TierLoad {
    pub tier: String,
    pub percent: u32,
    /// The tier serves all of its endpoints, usable or not: fewer than
    /// `minHealthPercent` of them are usable while the tiers together are short.
    #[serde(default)]
    pub panic: bool,
}

/// One endpoint of a frontend: where it stands and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointExplanation {
    pub address: SocketAddr,
    pub locality: String,
    pub cluster: String,
    pub weight: u32,
    /// The tier the endpoint belongs to when healthy.
    pub tier: String,
    /// Whether that tier receives traffic now, and its percent when it does.
    pub tier_active: bool,
    pub tier_percent: u32,
    /// Active health: `passing`, `failing`, `unknown` (not probed yet) or `unchecked`.
    pub health: String,
    /// The last failed check's error, while failing.
    pub health_error: Option<String>,
    /// Outlier detection's ejection: time left, when it ends (RFC 3339, UTC) and the
    /// failure that caused it.
    pub ejected: bool,
    pub ejected_for_ms: Option<u64>,
    pub ejected_until: Option<String>,
    pub ejection_cause: Option<String>,
    /// The kernel avoids it now after failures (the agent has not ejected it).
    pub suspect: bool,
    /// `in-table`, `standby` (usable, its tier not active) or `out`.
    pub verdict: String,
    /// In the kernel's table now.
    pub in_table: bool,
    /// In the standby table the kernel falls back to when every member is suspect.
    pub standby: bool,
    /// Its fraction of the table's slots, in percent: the share of new connects it
    /// gets (`None` where the kernel keeps a table the agent did not plan just now).
    pub share_percent: Option<f64>,
    /// One line: why it is or is not in the table.
    pub reason: String,
}

/// One endpoint of a service port as `detour endpoints` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointView {
    pub service: String,
    pub port: u16,
    pub address: SocketAddr,
    pub locality: String,
    /// The cluster the endpoint runs in (Kubernetes: its backing service's cluster);
    /// empty when the source does not say.
    #[serde(default)]
    pub cluster: String,
    /// The DNS name the address was resolved from; empty for an endpoint given by
    /// address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    pub health: String,
    pub weight: u32,
    /// The tier this endpoint belongs to when healthy.
    pub tier: String,
    pub in_table: bool,
    /// Connects the kernel rewrote to this backend address (through any service).
    pub connects: u64,
    pub last_error: Option<String>,
    /// Passive health: `OK`, `EJECTED` (by outlier detection, see `ejected_for_ms`) or
    /// `SUSPECT` (the kernel avoids it after failures; the agent has not ejected it).
    pub outlier: String,
    /// Ejection time left, while ejected.
    pub ejected_for_ms: Option<u64>,
    /// Times outlier detection ejected this backend since the agent started.
    pub ejections: u32,
    /// Failed connects in the current run.
    pub consecutive_failures: u32,
    /// Kernel counters, like `connects`: handshakes completed, refused or reset, timed
    /// out (SYN unanswered), and established connections reset by the backend.
    pub established: u64,
    pub refused: u64,
    pub timeouts: u64,
    pub resets: u64,
    /// Established connections this node ended without a close: the application
    /// aborted them (`SO_LINGER` 0, unread data) or TCP timed out. Not a backend
    /// failure. An agent older than this field answers without it (0).
    #[serde(default)]
    pub aborts: u64,
    /// Flows of this service steered to this backend and still open (SYN steering: their
    /// first pick's SYN went unanswered). An agent older than this field answers
    /// without it (0).
    #[serde(default)]
    pub steered: u64,
}

/// Something that happened, as `detour events` streams it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventView {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `ejected`, `restored`, `ejection-skipped`, `tier-changed`, `health-changed`,
    /// `refused`, `timeout`, `steered` (a stalled handshake moved to this backend) (also `reset`: a handshake reset, from older pinned
    /// programs only), `recovered` (a connect succeeded after failures),
    /// `sockets-destroyed`, `lagged` (this stream missed events), `not-programmed` and
    /// `not-updated` (the BPF maps have no room for a service, or for its new state; see
    /// [`ServiceView::state`]), `programmed` (room was made for it).
    pub kind: String,
    pub service: String,
    pub backend: Option<SocketAddr>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Services(Vec<ServiceView>),
    Endpoints(Vec<EndpointView>),
    Event(EventView),
    Explain(ExplainView),
    Names(Vec<NameView>),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "cannot reach the agent at {path}: {source} (is `detour agent` running, and are you root?)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the agent at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent sent a response that is not valid: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Connects to the agent and sends one request line; the reply is read from the
/// returned half.
async fn send(
    socket: &Path,
    request: &Request,
) -> Result<tokio::net::unix::OwnedReadHalf, ApiError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ApiError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|source| io_err(socket, source))?;
    Ok(read)
}

fn io_err(socket: &Path, source: io::Error) -> ApiError {
    ApiError::Io {
        path: socket.to_owned(),
        source,
    }
}

/// Sends one request and waits for its response.
pub async fn call(socket: &Path, request: &Request) -> Result<Response, ApiError> {
    let timeout = Duration::from_secs(10);
    let exchange = async {
        let read = send(socket, request).await?;
        let mut reply = String::new();
        BufReader::new(read)
            .read_line(&mut reply)
            .await
            .map_err(|source| io_err(socket, source))?;
        Ok(serde_json::from_str(&reply)?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ApiError::Timeout(timeout))?
}

/// Sends [`Request::Events`] and hands every event to `on_event` until the agent goes
/// away (then `Ok`) or the connection fails.
pub async fn stream_events(
    socket: &Path,
    mut on_event: impl FnMut(EventView) -> io::Result<()>,
) -> Result<(), ApiError> {
    let io = |source| io_err(socket, source);
    let mut lines = BufReader::new(send(socket, &Request::Events).await?).lines();
    while let Some(line) = lines.next_line().await.map_err(io)? {
        match serde_json::from_str(&line)? {
            Response::Event(event) => on_event(event).map_err(io)?,
            Response::Error(e) => return Err(io(io::Error::other(e))),
            other => return Err(io(io::Error::other(format!("unexpected answer {other:?}")))),
        }
    }
    Ok(())
}

/// Binds the agent's socket: root-only, replacing a stale socket file.
pub fn bind(socket: &Path) -> Result<UnixListener, ApiError> {
    let err = |source| ApiError::Bind {
        path: socket.to_owned(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(socket).map_err(err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Reads one request line from a connection, reading at most `limits.max_request_bytes`
/// and a newline, within `limits.request_timeout`. `Ok(None)`: the client closed
/// without sending anything. `Err` carries the response to send instead; the caller
/// then closes the connection (what is left unread is never read).
pub async fn read_request<R: AsyncBufRead + Unpin>(
    read: &mut R,
    limits: &Limits,
) -> Result<Option<Request>, Response> {
    let mut line = Vec::new();
    // One byte past the bound tells "exactly at the bound" from "longer".
    let mut bounded = (&mut *read).take(limits.max_request_bytes as u64 + 1);
    let bounded = bounded.read_until(b'\n', &mut line);
    match tokio::time::timeout(limits.request_timeout, bounded).await {
        Err(_) => Err(Response::Error(format!(
            "no complete request line within {:?}",
            limits.request_timeout
        ))),
        Ok(Err(e)) => Err(Response::Error(format!("reading request: {e}"))),
        Ok(Ok(0)) => Ok(None),
        Ok(Ok(_)) => {
            let content = line.strip_suffix(b"\n").unwrap_or(&line);
            if content.len() > limits.max_request_bytes {
                return Err(Response::Error(format!(
                    "request line is longer than {} bytes",
                    limits.max_request_bytes
                )));
            }
            parse_request(content)
                .map(Some)
                .map_err(|e| Response::Error(format!("bad request: {e}")))
        }
    }
}

/// Parses one request line (without its newline). Total: any bytes give a request or
/// the JSON error that says why they are not one.
pub fn parse_request(line: &[u8]) -> Result<Request, serde_json::Error> {
    serde_json::from_slice(line)
}

/// Writes one response line.
pub async fn write_response(write: &mut OwnedWriteHalf, response: &Response) -> io::Result<()> {
    let mut line = serde_json::to_string(response).map_err(io::Error::other)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await
}

/// The pause after `failures` `accept` calls in a row have failed: 10 ms, doubling, at
/// most [`MAX_ACCEPT_BACKOFF`].
pub fn accept_backoff(failures: u32) -> Duration {
    let ms = 10u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    Duration::from_millis(ms).min(MAX_ACCEPT_BACKOFF)
}

/// Serves the socket until the task is aborted: every connection's request line is read
/// within `limits` and handed to `handle` with the connection's write half (`handle`
/// answers, or streams, and the connection closes when it returns). A request that is
/// not one is answered with the error here, and `handle` does not see it.
pub async fn serve<F, Fut>(listener: UnixListener, limits: Limits, handle: F)
where
    F: Fn(Request, OwnedWriteHalf) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = Arc::new(handle);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut failures = 0u32;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures = 0;
                stream
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let pause = accept_backoff(failures);
                tracing::warn!(%error, failures, pause_ms = pause.as_millis() as u64, "accepting an API connection failed; backing off");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Told without a task or a wait: the line fits any fresh socket's buffer,
            // and a client that cannot take it loses nothing it was promised.
            let busy = Response::Error(format!(
                "the agent is serving {} connections already; try again",
                limits.max_connections
            ));
            if let Ok(mut line) = serde_json::to_vec(&busy) {
                line.push(b'\n');
                let _ = stream.try_write(&line);
            }
            tracing::warn!(
                max = limits.max_connections,
                "API connection refused: too many at once"
            );
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            match read_request(&mut read, &limits).await {
                Ok(None) => {}
                Ok(Some(request)) => handle(request, write).await,
                Err(response) => {
                    let answer = write_response(&mut write, &response);
                    let _ = tokio::time::timeout(limits.write_timeout, answer).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Endpoints {
                service: Some("mydb".into())
            })
            .unwrap(),
            r#"{"request":"endpoints","service":"mydb"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Services).unwrap(),
            r#"{"request":"services"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Explain {
                service: "mydb".into(),
                port: Some(80)
            })
            .unwrap(),
            r#"{"request":"explain","service":"mydb","port":80}"#
        );
        assert_eq!(
            parse_request(br#"{"request":"explain","service":"mydb"}"#).unwrap(),
            Request::Explain {
                service: "mydb".into(),
                port: None
            }
        );
    }

    #[test]
    fn origins_read_as_json_objects() {
        let origin = ServiceOrigin::FailoverService {
            namespace: "default".into(),
            name: "reviews-failover".into(),
            take_over: Some(crate::config::ObjectName {
                namespace: "default".into(),
                name: "reviews".into(),
            }),
        };
        assert_eq!(
            serde_json::to_string(&origin).unwrap(),
            r#"{"kind":"failover-service","namespace":"default","name":"reviews-failover","takeOver":{"namespace":"default","name":"reviews"}}"#
        );
        let file = ServiceOrigin::File {
            path: "/etc/detour.yaml".into(),
        };
        assert_eq!(
            serde_json::to_string(&file).unwrap(),
            r#"{"kind":"file","path":"/etc/detour.yaml"}"#
        );
        // An older agent's answer has no origin.
        let old: ServiceView = serde_json::from_str(
            r#"{"name":"a","port":1,"vips":[],"tier":"none","endpoints":0,"healthy":0,"in_table":0,"connects":0}"#,
        )
        .unwrap();
        assert_eq!(old.origin, None);
    }

    /// Connects to `socket` from a thread whose user and group are `nobody` (65534):
    /// the raw syscalls change only the calling thread's credentials (glibc's wrappers
    /// would change every thread's), and the thread ends right after.
    fn connect_as_nobody(socket: &Path) -> io::Result<()> {
        let socket = socket.to_owned();
        std::thread::spawn(move || {
            const NOBODY: libc::c_long = 65534;
            // SAFETY: setresgid/setresuid take integers only; on success they affect
            // this thread alone, which touches nothing shared afterwards but the socket.
            let dropped = unsafe {
                libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY) == 0
                    && libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY) == 0
            };
            assert!(
                dropped,
                "dropping to nobody: {}",
                io::Error::last_os_error()
            );
            std::os::unix::net::UnixStream::connect(&socket).map(drop)
        })
        .join()
        .expect("the connecting thread")
    }

    #[tokio::test]
    async fn socket_is_root_only_and_round_trips() {
        // Telling "root only" from "anyone" takes a second user: root can be one.
        detour_testbed::require_root("checking who may open the agent's socket").unwrap();
        let tmp = detour_testbed::TempDir::new().unwrap();
        // Even a directory others may enter, and a stale socket file in the way.
        let dir = tmp.join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let listener = bind(&socket).unwrap();

        use std::os::unix::fs::MetadataExt;
        let (file, parent) = (
            std::fs::metadata(&socket).unwrap(),
            std::fs::metadata(&dir).unwrap(),
        );
        assert_eq!(file.mode() & 0o777, 0o600);
        assert_eq!(parent.mode() & 0o777, 0o700);
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!((file.uid(), parent.uid()), (me, me));
        // Another user is refused by the kernel, with the socket's own mode alone too.
        let err = connect_as_nobody(&socket).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = connect_as_nobody(&socket).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        // The control: the same user reaches a socket there that others may open, so
        // what refused it above was the agent socket's mode, not the path to it.
        let open = dir.join("open.sock");
        let _open = std::os::unix::net::UnixListener::bind(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        connect_as_nobody(&open).unwrap();

        // And the owner's requests are answered, over the socket bind made.
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let req = read_request(&mut read, &Limits::default())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(req, Request::Services);
            write_response(&mut write, &Response::Services(vec![]))
                .await
                .unwrap();
        });
        let resp = call(&socket, &Request::Services).await.unwrap();
        assert_eq!(resp, Response::Services(vec![]));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn missing_agent_is_a_clear_error() {
        let err = call(Path::new("/nonexistent/detour.sock"), &Request::Services)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("is `detour agent` running"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn request_lines_are_bounded_in_size() {
        let limits = Limits {
            max_request_bytes: 32,
            ..Limits::default()
        };
        // Exactly at the bound (padding is JSON whitespace) is a request.
        let mut line = br#"{"request":"services"}"#.to_vec();
        line.resize(32, b' ');
        line.push(b'\n');
        assert_eq!(
            read_request(&mut &line[..], &limits).await,
            Ok(Some(Request::Services))
        );
        // One byte more, with or without a newline ever coming, is an error that says so.
        let mut long = line.clone();
        long.insert(0, b' ');
        let endless = vec![b'a'; 1 << 20];
        for input in [&long[..], &endless[..]] {
            let mut reader = input;
            let err = read_request(&mut reader, &limits).await.unwrap_err();
            assert_eq!(
                err,
                Response::Error("request line is longer than 32 bytes".into())
            );
            // Read no further than the bound (and the one byte that proves it).
            assert_eq!(input.len() - reader.len(), 33);
        }
        // A last line without a newline is still read; nothing at all is no request.
        assert_eq!(
            read_request(&mut &br#"{"request":"services"}"#[..], &limits).await,
            Ok(Some(Request::Services))
        );
        assert_eq!(read_request(&mut &b""[..], &limits).await, Ok(None));
        let Err(Response::Error(e)) = read_request(&mut &b"\xff\xfe\n"[..], &limits).await else {
            panic!("bytes that are not JSON were accepted");
        };
        assert!(e.starts_with("bad request: "), "{e}");
    }

    #[test]
    fn accept_backoff_grows_and_is_capped() {
        assert_eq!(accept_backoff(1), Duration::from_millis(10));
        assert_eq!(accept_backoff(2), Duration::from_millis(20));
        assert_eq!(accept_backoff(5), Duration::from_millis(160));
        assert_eq!(accept_backoff(8), MAX_ACCEPT_BACKOFF);
        assert_eq!(accept_backoff(u32::MAX), MAX_ACCEPT_BACKOFF);
        assert!(accept_backoff(0) > Duration::ZERO, "never a busy loop");
    }

    /// A socket served with `limits`, answering `Services` with an empty list.
    struct Served {
        dir: PathBuf,
        socket: PathBuf,
        task: tokio::task::JoinHandle<()>,
    }

    impl Served {
        fn start(name: &str, limits: Limits) -> Self {
            let dir =
                std::env::temp_dir().join(format!("detour-api-{name}-{}", std::process::id()));
            let socket = dir.join("s.sock");
            let listener = bind(&socket).unwrap();
            let task = tokio::spawn(serve(listener, limits, |request, mut write| async move {
                assert_eq!(request, Request::Services);
                write_response(&mut write, &Response::Services(vec![]))
                    .await
                    .unwrap();
            }));
            Self { dir, socket, task }
        }

        /// Sends `bytes` on a new connection and returns everything the agent answers
        /// until it closes the connection. An agent that closes without reading all
        /// of a request makes the kernel report a reset after its answer: that counts
        /// as closed.
        async fn exchange(&self, bytes: &[u8]) -> String {
            use tokio::io::AsyncReadExt;
            let mut stream = UnixStream::connect(&self.socket).await.unwrap();
            // The agent may close before taking it all: that is the point.
            let _ = stream.write_all(bytes).await;
            let mut answer = Vec::new();
            let read = async {
                let mut chunk = [0u8; 4096];
                loop {
                    match stream.read(&mut chunk).await {
                        Ok(0) => break,
                        Ok(n) => answer.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                        Err(e) => panic!("reading the answer: {e}"),
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .expect("the agent closes the connection");
            String::from_utf8(answer).unwrap()
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.task.abort();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn an_endless_request_line_is_answered_and_closed() {
        let served = Served::start("endless", Limits::default());
        let answer = served.exchange(&vec![b'x'; 8 << 20]).await;
        let response: Response = serde_json::from_str(&answer).unwrap();
        assert_eq!(
            response,
            Response::Error(format!(
                "request line is longer than {MAX_REQUEST_BYTES} bytes"
            ))
        );
        // The socket still serves others.
        let answer = served.exchange(b"{\"request\":\"services\"}\n").await;
        assert_eq!(answer, "{\"services\":[]}\n");
    }

    #[tokio::test]
    async fn a_silent_client_is_timed_out() {
        let limits = Limits {
            request_timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let served = Served::start("silent", limits);
        let started = std::time::Instant::now();
        // Half a line, never finished.
        let answer = served.exchange(b"{\"request\":").await;
        assert_eq!(
            serde_json::from_str::<Response>(&answer).unwrap(),
            Response::Error("no complete request line within 100ms".into())
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_refused_with_a_reason() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let served = Served::start("cap", limits);
        // Two clients that hold their connections open without a request.
        let first = UnixStream::connect(&served.socket).await.unwrap();
        let _second = UnixStream::connect(&served.socket).await.unwrap();
        // Accepted in order, so the third is past the cap once the first two are taken;
        // retried in case the agent has not accepted them yet.
        let mut answer = String::new();
        for _ in 0..100 {
            answer = served.exchange(b"{\"request\":\"services\"}\n").await;
            if answer.contains("connections already") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            serde_json::from_str::<Response>(&answer).unwrap(),
            Response::Error("the agent is serving 2 connections already; try again".into())
        );
        // A client that leaves frees its place.
        drop(first);
        let mut answer = String::new();
        for _ in 0..100 {
            answer = served.exchange(b"{\"request\":\"services\"}\n").await;
            if answer == "{\"services\":[]}\n" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(answer, "{\"services\":[]}\n");
    }
}
