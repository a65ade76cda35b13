//! A gRPC health server (`grpc.health.v1.Health/Check` over h2c) whose answer a test
//! sets: SERVING or NOT_SERVING. It runs its own single-threaded runtime on a thread, so
//! synchronous tests can use it; `Drop` stops it and closes the listener.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use tokio::sync::oneshot;

const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;

#[derive(Debug)]
pub struct GrpcHealthBackend {
    addr: SocketAddr,
    status: Arc<AtomicU8>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GrpcHealthBackend {
    /// Binds `addr` and answers every health check with SERVING until told otherwise.
    pub fn start_at(addr: SocketAddr) -> Result<Self> {
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let status = Arc::new(AtomicU8::new(SERVING));
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = {
            let status = status.clone();
            std::thread::Builder::new()
                .name(format!("grpc-health-{addr}"))
                .spawn(move || runtime.block_on(serve(listener, status, stopped)))?
        };
        Ok(Self {
            addr,
            status,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What later checks are answered with.
    pub fn set_serving(&self, serving: bool) {
        let status = if serving { SERVING } else { NOT_SERVING };
        self.status.store(status, Ordering::Relaxed);
    }
}

impl Drop for GrpcHealthBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    status: Arc<AtomicU8>,
    mut stopped: oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                let Ok((socket, _)) = accepted else { continue };
                tokio::spawn(connection(socket, status.clone()));
            }
        }
    }
}

async fn connection(socket: tokio::net::TcpStream, status: Arc<AtomicU8>) {
    let Ok(mut conn) = h2::server::handshake(socket).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = conn.accept().await {
        let mut body = request.into_body();
        // The request (`HealthCheckRequest`) is read and ignored: one status for all.
        while let Some(Ok(_)) = body.data().await {}
        let Ok(response) = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(())
        else {
            return;
        };
        let Ok(mut send) = respond.send_response(response, false) else {
            return;
        };
        let frame = vec![0, 0, 0, 0, 2, 0x08, status.load(Ordering::Relaxed)];
        let _ = send.send_data(frame.into(), false);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let _ = send.send_trailers(trailers);
    }
}
