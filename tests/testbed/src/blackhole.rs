//! A backend that is a black hole, made by the kernel itself: a listener that never
//! accepts, with its accept queue (`listen(0)`: one connection) already full, so the
//! kernel drops every further SYN (`LISTENOVERFLOWS`) and a connect sees nothing at all,
//! exactly as with a backend that stopped answering. Unlike a link taken down, it needs
//! no device of its own: it works on a namespace's `lo` and next to live backends behind
//! the same veth.
//!
//! Invariant: [`BlackHole::start_in`] returns only once a connect to it went unanswered.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use socket2::{Domain, Socket, Type};

use crate::Netns;

/// The listener and the connection that fills its queue; both close on `Drop`.
#[derive(Debug)]
pub struct BlackHole {
    _listener: Socket,
    _filler: TcpStream,
}

impl BlackHole {
    /// A black hole at `addr` (an address of `ns`).
    pub fn start_in(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        ns.run_in(|| -> Result<Self> {
            let listener = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            listener.set_reuse_address(true)?;
            listener.bind(&addr.into())?;
            listener.listen(0)?;
            let filler = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .context("filling the black hole's accept queue")?;
            // A second connect must now go unanswered: that is the black hole.
            ensure!(
                TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
                "the full listener still answered a SYN"
            );
            Ok(Self {
                _listener: listener,
                _filler: filler,
            })
        })?
    }
}
