//! A test certificate authority and a TLS backend, for the agent's TLS origination.
//!
//! [`TestCa`] issues server certificates for the names a test chooses (so a test can
//! give a backend a certificate for the wrong name); [`TlsBackend`] serves HTTP/1.1 over
//! TLS with one of them: every request gets `200 "<name>\n"`, or, for `GET /bytes/N`,
//! `N` bytes (the benchmark's bulk transfer), as many requests per connection as the
//! client sends (keep-alive) until one says `Connection: close`. It counts the requests
//! it answered and the TLS handshakes it completed, full and resumed. Invariants, as
//! [`crate::HttpBackend`]'s:
//! - while stopped nothing listens, so connects are refused;
//! - a connection is accepted as soon as it arrives: the accept loop waits in poll(2) on
//!   the listener (`cargo xtask bench-tls` measures new connections through it; a loop
//!   that slept between attempts made each wait for its next turn);
//! - stopping is bounded and shuts accepted connections down (the accept loop is
//!   [`crate::acceptor`]'s, [`crate::HttpBackend`]'s too);
//! - a restart binds the same address.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// The most `GET /bytes/N` sends.
const MAX_BODY: u64 = 1 << 30;

/// A certificate authority of the test's own.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

/// A server certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("detour-test {name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().context("generating the CA key")?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self { params, key, pem })
    }

    /// The CA certificate, PEM: what the agent's `tls.caCertificates` file holds.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[&str]) -> Result<ServerCert> {
        let mut params =
            CertificateParams::new(names.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().context("generating a server key")?;
        let cert = params.signed_by(&key, &Issuer::from_params(&self.params, &self.key))?;
        Ok(ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[derive(Debug, Default)]
struct Shared {
    requests: AtomicU64,
    /// TLS handshakes completed: full ones, and ones that resumed a session.
    full_handshakes: AtomicU64,
    resumed_handshakes: AtomicU64,
}

/// A stoppable HTTPS/1.1 server (see the module doc).
pub struct TlsBackend {
    name: String,
    addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
    running: Option<crate::acceptor::Acceptor>,
}

impl TlsBackend {
    /// Binds `addr` and serves with `cert`.
    pub fn start_at(name: &str, addr: SocketAddr, cert: &ServerCert) -> Result<Self> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .context("the server certificate's PEM")?;
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
            .context("the server key's PEM")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the server certificate")?;
        let mut backend = Self {
            name: name.to_owned(),
            addr,
            config: Arc::new(config),
            shared: Arc::default(),
            running: None,
        };
        backend.start()?;
        Ok(backend)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far, over all start/stop cycles.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// TLS handshakes completed so far, over all start/stop cycles: `(full, resumed)`.
    pub fn handshakes(&self) -> (u64, u64) {
        (
            self.shared.full_handshakes.load(Ordering::Relaxed),
            self.shared.resumed_handshakes.load(Ordering::Relaxed),
        )
    }

    /// Binds the address again and serves; a no-op while running.
    pub fn start(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let listener = crate::acceptor::bind(self.addr)?;
        self.addr = listener.local_addr()?;
        let (shared, config) = (self.shared.clone(), self.config.clone());
        let body = format!("{}\n", self.name);
        self.running = Some(crate::acceptor::Acceptor::start(
            listener,
            format!("tls-{}", self.addr),
            move |conn| serve(conn, &shared, config.clone(), &body),
        )?);
        Ok(())
    }

    /// Closes the listener and every accepted connection; bounded.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves requests on one connection until the client closes it.
fn serve(mut conn: TcpStream, shared: &Shared, config: Arc<rustls::ServerConfig>, body: &str) {
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = conn.set_write_timeout(Some(REQUEST_TIMEOUT));
    let _ = conn.set_nodelay(true);
    let Ok(mut tls) = rustls::ServerConnection::new(config) else {
        return;
    };
    while tls.is_handshaking() {
        if tls.complete_io(&mut conn).is_err() {
            return;
        }
    }
    match tls.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => &shared.resumed_handshakes,
        _ => &shared.full_handshakes,
    }
    .fetch_add(1, Ordering::Relaxed);
    let mut stream = rustls::Stream::new(&mut tls, &mut conn);
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // One request head at a time (keep-alive: the next may follow).
        let end = loop {
            if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if head.len() > MAX_REQUEST_HEAD {
                return;
            }
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        };
        let request: Vec<u8> = head.drain(..end).collect();
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let line = String::from_utf8_lossy(&request);
        let size = line
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.strip_prefix("/bytes/"))
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| n.min(MAX_BODY));
        let close = line.to_ascii_lowercase().contains("connection: close");
        let written = match size {
            None => {
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes())
            }
            Some(n) => write_bytes(&mut stream, n),
        };
        if written.is_err() || close {
            break;
        }
    }
    stream.conn.send_close_notify();
    let _ = stream.flush();
    let _ = conn.shutdown(Shutdown::Write);
}

fn write_bytes(stream: &mut impl Write, n: u64) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
    );
    stream.write_all(head.as_bytes())?;
    let chunk = [b'x'; 16 * 1024];
    let mut left = n;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..take])?;
        left -= take as u64;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;
    use std::time::Instant;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

    use super::*;

    type Client = StreamOwned<ClientConnection, TcpStream>;

    fn connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> Client {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let name = ServerName::try_from("tls.test").unwrap();
        StreamOwned::new(ClientConnection::new(config.clone(), name).unwrap(), tcp)
    }

    /// Sends `GET path` and reads one response (head and `Content-Length` body).
    fn get(conn: &mut Client, path: &str, close: bool) -> (String, Vec<u8>) {
        let close = if close { "Connection: close\r\n" } else { "" };
        write!(conn, "GET {path} HTTP/1.1\r\nHost: tls.test\r\n{close}\r\n").unwrap();
        conn.flush().unwrap();
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            conn.read_exact(&mut byte).unwrap();
            raw.push(byte[0]);
        }
        let head = String::from_utf8(raw).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0; length];
        conn.read_exact(&mut body).unwrap();
        (head, body)
    }

    #[test]
    fn keeps_connections_alive_and_counts_requests_and_handshakes() {
        let ca = TestCa::new("tls-unit").unwrap();
        let cert = ca.issue(&["tls.test"]).unwrap();
        let mut backend =
            TlsBackend::start_at("delta", "127.0.0.1:0".parse().unwrap(), &cert).unwrap();
        let addr = backend.addr();
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
            roots.add(der.unwrap()).unwrap();
        }
        let config = Arc::new(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );

        // Three requests on one connection, the last one closing it.
        let mut conn = connect(addr, &config);
        for _ in 0..2 {
            let (head, body) = get(&mut conn, "/", false);
            assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
            assert_eq!(body, b"delta\n");
        }
        assert_eq!(get(&mut conn, "/bytes/100000", true).1, vec![b'x'; 100_000]);
        let mut rest = Vec::new();
        match conn.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty()),
            Err(e) => assert_eq!(e.kind(), ErrorKind::UnexpectedEof),
        }
        assert_eq!(backend.requests(), 3);
        assert_eq!(backend.handshakes(), (1, 0));
        // The same client configuration resumes the session.
        let mut conn = connect(addr, &config);
        assert_eq!(get(&mut conn, "/", true).1, b"delta\n");
        assert_eq!(backend.handshakes(), (1, 1));

        let start = Instant::now();
        backend.stop();
        assert!(
            start.elapsed() < Duration::from_millis(200),
            "stop took {:?}",
            start.elapsed()
        );
        let refused = TcpStream::connect(addr).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
        backend.start().unwrap();
        assert_eq!(backend.addr(), addr, "restart must bind the same address");
        let mut conn = connect(addr, &config);
        assert_eq!(get(&mut conn, "/", true).1, b"delta\n");
        assert_eq!(backend.requests(), 5);
    }
}
