//! A tiny HTTP/1.1 backend that can be stopped and started again, and a minimal client.
//!
//! [`HttpBackend`] stands in for a real service endpoint: every request gets `200` with
//! the body `"<name>\n"`, so a client sees which backend served it. Invariants:
//! - while stopped, nothing listens on the address, so connects are *refused* (the
//!   failure detour must react to) — not accepted and then dropped;
//! - stopping is bounded, and connections already accepted are shut down (the accept
//!   loop is [`crate::acceptor`]'s);
//! - a restart binds the very same address (`SO_REUSEADDR`), in the same network
//!   namespace it was first started in.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// How long a connection may take to send its request head. Long: tests hold idle
/// connections open through an ejection, and under an emulated kernel (`cargo xtask
/// test-kernels`, ~15× slower) 2 s ran out first and the backend's own close ended the
/// connection the test waited to see destroyed. A stalled client costs only its thread,
/// and `stop` closes every accepted connection anyway.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head read; anything longer is answered anyway and closed.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// State shared between the backend handle and its threads.
#[derive(Debug)]
struct Shared {
    requests: AtomicU64,
    /// The status every response carries; 200 unless a test says otherwise.
    status: std::sync::atomic::AtomicU16,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            status: std::sync::atomic::AtomicU16::new(200),
        }
    }
}

/// A stoppable HTTP/1.1 server that answers every request with `200 "<name>\n"` (or
/// another status, see [`HttpBackend::set_status`]).
#[derive(Debug)]
pub struct HttpBackend {
    name: String,
    addr: SocketAddr,
    netns: Option<PathBuf>,
    shared: Arc<Shared>,
    running: Option<crate::acceptor::Acceptor>,
}

impl HttpBackend {
    /// Binds `addr` in the current network namespace and starts serving.
    ///
    /// Port 0 picks a free port; [`HttpBackend::addr`] tells which, and restarts reuse it.
    pub fn start_at(name: &str, addr: SocketAddr) -> Result<Self> {
        Self::start_with(name, addr, None)
    }

    /// Binds `addr` inside `netns` and starts serving.
    pub fn start_in(netns: &crate::Netns, name: &str, addr: SocketAddr) -> Result<Self> {
        Self::start_with(name, addr, Some(netns.path()))
    }

    fn start_with(name: &str, addr: SocketAddr, netns: Option<PathBuf>) -> Result<Self> {
        let mut backend = Self {
            name: name.to_owned(),
            addr,
            netns,
            shared: Arc::default(),
            running: None,
        };
        backend.start()?;
        Ok(backend)
    }

    /// The backend's name (its response body, without the newline).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on (while running).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far, over all start/stop cycles.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Answers every later request with `status` (the body stays the name), as a backend
    /// that is up but failing does.
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::Relaxed);
    }

    /// Whether it is listening.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Binds the address again and serves; a no-op while running.
    pub fn start(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let addr = self.addr;
        let listener = match &self.netns {
            None => crate::acceptor::bind(addr)?,
            Some(path) => crate::netns::run_in_netns(path, || crate::acceptor::bind(addr))??,
        };
        self.addr = listener.local_addr()?;
        let (shared, body) = (self.shared.clone(), format!("{}\n", self.name));
        self.running = Some(crate::acceptor::Acceptor::start(
            listener,
            format!("http-{}", self.addr),
            move |conn| serve(conn, &shared, &body),
        )?);
        Ok(())
    }

    /// Closes the listener (new connects are refused) and every accepted connection.
    ///
    /// Returns once the listener is closed; a no-op while stopped.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(mut conn: TcpStream, shared: &Shared, body: &str) {
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = conn.set_write_timeout(Some(REQUEST_TIMEOUT));
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let status = shared.status.load(Ordering::Relaxed);
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes());
    let _ = conn.shutdown(Shutdown::Write);
}

/// A response read by [`http_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code, e.g. 200.
    pub status: u16,
    /// Everything after the header block.
    pub body: String,
    /// `getpeername()` of the connection: through a VIP, the VIP (detour's promise).
    pub peer: SocketAddr,
}

/// `GET /` on `addr` with `Connection: close`; returns the status and body.
///
/// `timeout` bounds the connect and each read and write. Connect failures keep their
/// [`io::Error`] as the root cause, so callers can tell "connection refused" apart.
pub fn http_request(addr: SocketAddr, timeout: Duration) -> Result<HttpResponse> {
    let conn = TcpStream::connect_timeout(&addr, timeout)?;
    http_request_on(conn, addr, timeout)
}

/// `GET /` on `conn`, a connection already made to `addr` (the request's `Host`).
pub fn http_request_on(
    mut conn: TcpStream,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<HttpResponse> {
    let peer = conn.peer_addr()?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let host = match addr {
        SocketAddr::V4(_) => addr.to_string(),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    };
    // One write, one segment: `write!` on an unbuffered stream sends each formatted piece
    // separately, and a server that reads once and closes would then reset the connection
    // on the unread rest (the flaky `non_200_is_an_error_for_http_get` of issue 10).
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: detour-testbed\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let (status, body) = parse_response(&raw)?;
    Ok(HttpResponse { status, body, peer })
}

/// `GET /` on `addr`; the body of a `200` response, an error otherwise.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let response = http_request(addr, timeout)?;
    if response.status != 200 {
        bail!("GET http://{addr}/: status {}", response.status);
    }
    Ok(response.body)
}

/// The status and body of a raw response.
fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(
            io::Error::new(io::ErrorKind::UnexpectedEof, "incomplete HTTP response").into(),
        );
    };
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code
            .parse()
            .with_context(|| format!("bad status line {status_line:?}"))?,
        _ => bail!("bad status line {status_line:?}"),
    };
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;
    use std::time::Instant;

    use super::*;

    fn loopback_any_port() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn serves_its_name_and_counts_requests() {
        let backend = HttpBackend::start_at("alpha", loopback_any_port()).unwrap();
        assert_ne!(backend.addr().port(), 0);
        for _ in 0..3 {
            assert_eq!(
                http_get(backend.addr(), Duration::from_secs(2)).unwrap(),
                "alpha\n"
            );
        }
        assert_eq!(backend.requests(), 3);
    }

    #[test]
    fn stopped_backend_refuses_and_restarted_one_serves_again() {
        let mut backend = HttpBackend::start_at("beta", loopback_any_port()).unwrap();
        let addr = backend.addr();
        http_get(addr, Duration::from_secs(2)).unwrap();

        let start = Instant::now();
        backend.stop();
        assert!(
            start.elapsed() < Duration::from_millis(200),
            "stop took {:?}",
            start.elapsed()
        );
        assert!(!backend.is_running());
        let err = http_get(addr, Duration::from_secs(2)).unwrap_err();
        let io = err
            .downcast_ref::<io::Error>()
            .expect("an io::Error root cause");
        assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused, "{err:#}");

        backend.start().unwrap();
        assert_eq!(backend.addr(), addr, "restart must bind the same address");
        assert_eq!(http_get(addr, Duration::from_secs(2)).unwrap(), "beta\n");
        assert_eq!(backend.requests(), 2);
    }

    #[test]
    fn stop_closes_accepted_connections() {
        let mut backend = HttpBackend::start_at("gamma", loopback_any_port()).unwrap();
        // Connected but no request sent yet: the server thread is waiting to read.
        let mut idle = TcpStream::connect(backend.addr()).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        thread::sleep(Duration::from_millis(50));
        backend.stop();
        let mut buf = [0u8; 16];
        let start = Instant::now();
        // EOF or a reset is the server closing; a timeout is it not closing.
        match idle.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected EOF or a reset after stop, got {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn parses_responses() {
        let (status, body) =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nX: y\r\n\r\nno").unwrap();
        assert_eq!((status, body.as_str()), (503, "no"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn non_200_is_an_error_for_http_get() {
        let listener = TcpListener::bind(loopback_any_port()).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // Read the whole request head before answering: closing with unread data
            // would make the kernel send RST, and the client would see a reset, not 404.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "client closed before sending its request head");
                head.extend_from_slice(&buf[..n]);
            }
            conn.write_all(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n")
                .unwrap();
        });
        let err = http_get(addr, Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("404"), "{err:#}");
        server.join().unwrap();
    }
}
