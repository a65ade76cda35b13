//! The accept loop the test backends share ([`crate::HttpBackend`],
//! [`crate::TlsBackend`]): a thread that accepts on a listener and serves each
//! connection on a thread of its own, and a bounded stop.
//!
//! Invariants:
//! - a new connection is accepted at once: the loop waits in poll(2) on the listener,
//!   for at most [`ACCEPT_POLL`] at a time, so it also sees the stop flag that often;
//! - [`Acceptor::stop`] returns once the listener has stopped listening (shut down, then
//!   closed; the loop owns it) and every connection still being served has been shut
//!   down, so a stopped backend refuses connects and holds none open.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};

/// Longest time the accept loop waits before looking at the stop flag.
pub(crate) const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Connections being served, so that a stop can shut them down.
#[derive(Debug, Default)]
struct Conns {
    open: Mutex<HashMap<u64, TcpStream>>,
    next: AtomicU64,
}

impl Conns {
    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running accept loop (see the module doc).
#[derive(Debug)]
pub(crate) struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    conns: Arc<Conns>,
}

impl Acceptor {
    /// Accepts on `listener` in a thread named `name`; each connection is handed, in
    /// blocking mode, to `serve` on a thread of its own.
    pub(crate) fn start(
        listener: TcpListener,
        name: String,
        serve: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Result<Self> {
        // Non-blocking: an accept after poll said "readable" never hangs on a
        // connection that was reset in between.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Conns::default());
        let thread = {
            let (stop, conns, serve) = (stop.clone(), conns.clone(), Arc::new(serve));
            thread::Builder::new()
                .name(name)
                .spawn(move || accept_loop(&listener, &stop, &conns, &serve))?
        };
        Ok(Self {
            stop,
            thread,
            conns,
        })
    }

    /// Closes the listener and shuts down every connection still being served.
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        // The accept loop owns the listener: once it returns, the socket is closed.
        let _ = self.thread.join();
        let open = std::mem::take(&mut *self.conns.open());
        for conn in open.values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    conns: &Arc<Conns>,
    serve: &Arc<impl Fn(TcpStream) + Send + Sync + 'static>,
) {
    while !stop.load(Ordering::SeqCst) {
        if !readable(listener, ACCEPT_POLL) {
            continue;
        }
        let Ok((conn, _peer)) = listener.accept() else {
            continue;
        };
        let _ = conn.set_nonblocking(false);
        let id = conns.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = conn.try_clone() {
            conns.open().insert(id, clone);
        }
        let (conns_for_thread, serve) = (conns.clone(), serve.clone());
        let spawned = thread::Builder::new().spawn(move || {
            serve(conn);
            conns_for_thread.open().remove(&id);
        });
        if spawned.is_err() {
            // Out of threads: drop the connection rather than the whole backend.
            conns.open().remove(&id);
        }
    }
    // Stop listening now, for every copy of the descriptor: a child process another
    // thread is spawning holds one until its exec, and while it does, a close here would
    // leave the socket listening — a connect would be accepted and then reset, not
    // refused (seen in CI as `stopped_backend_refuses_and_restarted_one_serves_again`
    // reading "connection reset"). shutdown(2) of a listener ends its listening state.
    let _ = socket2::SockRef::from(listener).shutdown(Shutdown::Both);
}

/// A listener on `addr` (`SO_REUSEADDR`, so a restart binds the same address at once;
/// IPv6 only for an IPv6 address).
pub(crate) fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Waits up to `timeout` for a connection to accept.
fn readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}
