//! A test certificate authority and a TLS backend, for the agent's TLS origination.
//!
//! [`TestCa`] issues server certificates for the names a test chooses (so a test can
//! give a backend a certificate for the wrong name); [`TlsBackend`] serves HTTP/1.1 over
//! TLS with one of them: every request gets `200 "<name>\n"`, or, for `GET /bytes/N`,
//! `N` bytes (the benchmark's bulk transfer). Invariants, as [`crate::HttpBackend`]'s:
//! - while stopped nothing listens, so connects are refused;
//! - stopping is bounded (the accept loop polls its flag every [`ACCEPT_POLL`]) and shuts
//!   accepted connections down;
//! - a restart binds the same address.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const ACCEPT_POLL: Duration = Duration::from_millis(20);
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
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// A stoppable HTTPS/1.1 server (see the module doc).
pub struct TlsBackend {
    name: String,
    addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
    running: Option<Running>,
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

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Binds the address again and serves; a no-op while running.
    pub fn start(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(self.addr),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket
            .bind(&self.addr.into())
            .with_context(|| format!("binding {}", self.addr))?;
        socket.listen(1024)?;
        let listener: TcpListener = socket.into();
        listener.set_nonblocking(true)?;
        self.addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, shared, config) = (stop.clone(), self.shared.clone(), self.config.clone());
            let body = format!("{}\n", self.name);
            thread::Builder::new()
                .name(format!("tls-{}", self.addr))
                .spawn(move || accept_loop(&listener, &stop, &shared, &config, &body))?
        };
        self.running = Some(Running { stop, thread });
        Ok(())
    }

    /// Closes the listener and every accepted connection; bounded.
    pub fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.stop.store(true, Ordering::SeqCst);
        let _ = running.thread.join();
        let conns = std::mem::take(
            &mut *self
                .shared
                .conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for conn in conns.values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    shared: &Arc<Shared>,
    config: &Arc<rustls::ServerConfig>,
    body: &str,
) {
    while !stop.load(Ordering::SeqCst) {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(_) => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let _ = conn.set_nonblocking(false);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = conn.try_clone() {
            shared
                .conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, clone);
        }
        let (shared, config, body) = (shared.clone(), config.clone(), body.to_owned());
        let _ = thread::Builder::new().spawn(move || {
            serve(conn, &shared, config, &body);
            shared
                .conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
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
