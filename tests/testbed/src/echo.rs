//! A TCP echo backend: every byte a connection sends comes back on it, until the client
//! closes its side. Tests use it to push long transfers both ways through a translated
//! (steered) flow and check that every byte arrives intact and in order.
//!
//! Invariants: the same as [`crate::HttpBackend`]'s (the accept loop is
//! [`crate::acceptor`]'s): dropping it closes the listener and every connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Result;

/// How long a connection may stay silent before the backend closes it. Long: tests hold
/// an echoed connection idle across an agent restart.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A running echo server.
#[derive(Debug)]
pub struct EchoBackend {
    addr: SocketAddr,
    running: Option<crate::acceptor::Acceptor>,
}

impl EchoBackend {
    /// Binds `addr` inside `netns` and starts echoing.
    pub fn start_in(netns: &crate::Netns, addr: SocketAddr) -> Result<Self> {
        let listener = netns.run_in(|| crate::acceptor::bind(addr))??;
        let addr = listener.local_addr()?;
        let running = crate::acceptor::Acceptor::start(listener, format!("echo-{addr}"), echo)?;
        Ok(Self {
            addr,
            running: Some(running),
        })
    }

    /// Binds `addr` in the current network namespace and starts echoing.
    pub fn start_at(addr: SocketAddr) -> Result<Self> {
        let listener = crate::acceptor::bind(addr)?;
        let addr = listener.local_addr()?;
        let running = crate::acceptor::Acceptor::start(listener, format!("echo-{addr}"), echo)?;
        Ok(Self {
            addr,
            running: Some(running),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

fn echo(mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IDLE_TIMEOUT));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// Sends `len` bytes of a pattern that depends on each byte's offset from `start` and
/// reads them back, concurrently (a writer thread), so neither side's buffers fill up.
/// An error names the first byte that came back wrong, or how far the transfer got.
pub fn echo_exchange(conn: &TcpStream, start: u64, len: u64) -> Result<()> {
    let mut writer = conn.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut chunk = vec![0u8; 32 * 1024];
        let mut sent = 0u64;
        while sent < len {
            let n = chunk
                .len()
                .min(usize::try_from(len - sent).unwrap_or(usize::MAX));
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern(start + sent + i as u64);
            }
            writer.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        Ok(())
    });
    let mut reader = conn;
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    let outcome = (|| -> Result<()> {
        while received < len {
            let want = buf
                .len()
                .min(usize::try_from(len - received).unwrap_or(usize::MAX));
            let n = reader.read(&mut buf[..want])?;
            anyhow::ensure!(n > 0, "the echo ended after {received} of {len} bytes");
            for (i, &b) in buf[..n].iter().enumerate() {
                let at = start + received + i as u64;
                anyhow::ensure!(
                    b == pattern(at),
                    "byte {at} came back as {b}, not {}",
                    pattern(at)
                );
            }
            received += n as u64;
        }
        Ok(())
    })();
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sending thread panicked"))?;
    outcome?;
    sent?;
    Ok(())
}

/// The byte at `offset` of an exchange: not periodic at any small power of two, so a
/// segment repeated, dropped or reordered shows up.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_a_long_exchange_intact_in_two_parts() {
        let backend = EchoBackend::start_at("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = TcpStream::connect(backend.addr()).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        echo_exchange(&conn, 0, 3 << 20).unwrap();
        echo_exchange(&conn, 3 << 20, 1 << 20).unwrap();
    }

    #[test]
    fn a_byte_that_comes_back_wrong_is_named() {
        // A server that answers every byte plus one: the first byte already differs.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = conn.read(&mut buf) {
                buf[..n].iter_mut().for_each(|b| *b = b.wrapping_add(1));
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let conn = TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let err = echo_exchange(&conn, 7, 1000).unwrap_err().to_string();
        assert!(err.starts_with("byte 7 came back as"), "{err}");
        drop(conn);
        server.join().unwrap();
    }
}
