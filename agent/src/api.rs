//! The node-local API between a running agent and the `detour` CLI: one JSON request
//! line, one JSON response line, over a Unix socket that only root can open. The one
//! exception is [`Request::Events`], answered with a stream of [`Response::Event`]
//! lines until the client goes away.
//!
//! Invariants: the socket file is created mode 0600 in a directory of mode 0700, so only
//! root reaches the agent; every request gets exactly one response line (or, for
//! `Events`, one line per event); an unknown request is answered with an error, never
//! with silence.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/detour/detour.sock";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Services,
    Endpoints {
        service: Option<String>,
    },
    /// Stream events as they happen.
    Events,
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
}

/// One endpoint of a service port as `detour endpoints` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointView {
    pub service: String,
    pub port: u16,
    pub address: SocketAddr,
    pub locality: String,
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
    /// out (SYN unanswered), and established connections reset.
    pub established: u64,
    pub refused: u64,
    pub timeouts: u64,
    pub resets: u64,
}

/// Something that happened, as `detour events` streams it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventView {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `ejected`, `restored`, `ejection-skipped`, `tier-changed`, `health-changed`,
    /// `refused`, `timeout`, `reset`, `recovered` (a connect succeeded after failures),
    /// `sockets-destroyed`, `lagged` (this stream missed events), `not-programmed` and
    /// `not-updated` (the BPF maps have no room for a service, or for its new state; see
    /// [`ServiceView::state`]), `programmed` (room was made for it).
    pub kind: String,
    pub service: String,
    pub backend: Option<SocketAddr>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Services(Vec<ServiceView>),
    Endpoints(Vec<EndpointView>),
    Event(EventView),
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

/// Reads one request from a connection; `Err` carries the response to send instead.
pub async fn read_request(
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<Option<Request>, Response> {
    let mut line = String::new();
    match read.read_line(&mut line).await {
        Ok(0) => Ok(None),
        Ok(_) => serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| Response::Error(format!("bad request: {e}"))),
        Err(e) => Err(Response::Error(format!("reading request: {e}"))),
    }
}

/// Writes one response line.
pub async fn write_response(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> io::Result<()> {
    let mut line = serde_json::to_string(response).map_err(io::Error::other)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await
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
    }

    #[tokio::test]
    async fn socket_is_root_only_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("detour-api-test-{}", std::process::id()));
        let socket = dir.join("s.sock");
        let listener = bind(&socket).unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let req = read_request(&mut read).await.unwrap().unwrap();
            assert_eq!(req, Request::Services);
            write_response(&mut write, &Response::Services(vec![]))
                .await
                .unwrap();
        });
        let resp = call(&socket, &Request::Services).await.unwrap();
        assert_eq!(resp, Response::Services(vec![]));
        server.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
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
}
