//! The client side of the end-to-end tests: a process inside the test's cgroup that
//! connects to VIPs and reports what it saw, one JSON line per result.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use detour_testbed::{Cgroup, LineStream};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

const SCRIPT_ENV: &str = "DETOUR_E2E_CLIENT_SCRIPT";
const LINE_PREFIX: &str = "DETOUR-CLIENT ";
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// What the client process does.
#[derive(Debug, Serialize, Deserialize)]
pub enum Script {
    /// `count` HTTP GETs, `interval` apart; one [`Get`] line each.
    Gets {
        target: SocketAddr,
        count: u32,
        interval_ms: u64,
    },
    /// Connect and close as fast as it can until `stop_file` exists, `max_connects`
    /// connects were made or `max_ms` passes, whichever comes first; one [`LoopSummary`]
    /// line at the end.
    ConnectLoop {
        target: SocketAddr,
        stop_file: PathBuf,
        max_connects: u64,
        max_ms: u64,
    },
    /// Open `count` connections and keep them all open, then one HTTP GET on each, in
    /// order; one [`Get`] line each (a failed connect is a `Get` with its error).
    Concurrent { target: SocketAddr, count: u32 },
    /// Connect once, create `ready_file`, then wait for the connection to end (or
    /// `max_ms` to pass); one [`HoldEnd`] line.
    Hold {
        target: SocketAddr,
        ready_file: PathBuf,
        max_ms: u64,
    },
    /// Connect once to an echo backend and exchange `bytes` both ways, then create
    /// `ready_file`, wait for `go_file` (at most `max_ms`) and exchange `bytes` more on
    /// the same connection; one [`EchoEnd`] line.
    Echo {
        target: SocketAddr,
        bytes: u64,
        ready_file: PathBuf,
        go_file: PathBuf,
        max_ms: u64,
    },
    /// Leave a TIME_WAIT from a local port to `direct` (connect without a VIP, close
    /// first), then one HTTP GET of `target` from that same local port; one [`Get`] line.
    GetFromATimeWaitPort {
        direct: SocketAddr,
        target: SocketAddr,
    },
    /// `count` HTTP GETs of `host`:`port`, `interval` apart, each resolving the name
    /// through the system resolver (getaddrinfo) first, with `resolv_conf` as its
    /// `/etc/resolv.conf` (bind-mounted in a mount namespace of the client's own); one
    /// [`Get`] line each.
    GetsByName {
        host: String,
        port: u16,
        count: u32,
        interval_ms: u64,
        resolv_conf: PathBuf,
    },
}

/// How a held connection ended.
#[derive(Debug, Serialize, Deserialize)]
pub struct HoldEnd {
    /// The error a blocking read returned, `None` for end-of-stream or the time limit.
    pub error: Option<String>,
    /// `io::ErrorKind` of `error`, as its `Debug` text (e.g. `ConnectionAborted`).
    pub kind: Option<String>,
    /// Whether the time limit ended it (nothing happened to the connection).
    pub timed_out: bool,
    /// From the connect until the connection ended.
    pub after_ms: u64,
}

/// How an [`Script::Echo`] exchange ended.
#[derive(Debug, Serialize, Deserialize)]
pub struct EchoEnd {
    /// `getpeername()` of the connection.
    pub peer: Option<SocketAddr>,
    /// Bytes that came back intact, both parts together.
    pub echoed: u64,
    /// What went wrong (the connect, a byte, the wait for `go_file`), `None` for success.
    pub error: Option<String>,
}

/// One HTTP GET as the application saw it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Get {
    pub body: Option<String>,
    pub error: Option<String>,
    /// `getpeername()` of the connected socket.
    pub peer: Option<SocketAddr>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LoopSummary {
    pub ok: u64,
    pub failed: u64,
    /// Of `failed`, connects refused (`ECONNREFUSED`): the ones that went to a backend
    /// that was not listening.
    pub refused: u64,
    /// Of `failed`, connects reset (`ECONNRESET`): their handshake had completed when the
    /// reset came, before `connect()` returned (a refused SYN is `ECONNREFUSED`).
    pub reset: u64,
    /// The first few errors, for the failure message.
    pub errors: Vec<String>,
}

/// One GET through the testbed's HTTP client; errors keep their cause chain.
fn get(target: SocketAddr) -> Get {
    Get::from(detour_testbed::http_request(target, IO_TIMEOUT))
}

impl From<Result<detour_testbed::HttpResponse>> for Get {
    fn from(result: Result<detour_testbed::HttpResponse>) -> Self {
        match result {
            Ok(r) => Get {
                body: Some(r.body.trim().to_string()),
                error: None,
                peer: Some(r.peer),
            },
            Err(e) => Get {
                body: None,
                error: Some(format!("{e:#}")),
                peer: None,
            },
        }
    }
}

fn emit<T: Serialize>(value: &T) {
    println!(
        "{LINE_PREFIX}{}",
        serde_json::to_string(value).expect("serializable")
    );
}

fn run_script(script: Script) {
    match script {
        Script::GetsByName {
            host,
            port,
            count,
            interval_ms,
            resolv_conf,
        } => {
            if let Err(e) = detour_testbed::use_resolv_conf(&resolv_conf) {
                emit(&Get::from(Err(e)));
                return;
            }
            for _ in 0..count {
                use std::net::ToSocketAddrs as _;
                let resolved = (host.as_str(), port)
                    .to_socket_addrs()
                    .with_context(|| format!("resolving {host}"))
                    .and_then(|mut a| a.next().with_context(|| format!("{host} has no address")));
                emit(&match resolved {
                    Ok(target) => get(target),
                    Err(e) => Get::from(Err(e)),
                });
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
        }
        Script::Gets {
            target,
            count,
            interval_ms,
        } => {
            for _ in 0..count {
                emit(&get(target));
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
        }
        Script::ConnectLoop {
            target,
            stop_file,
            max_connects,
            max_ms,
        } => {
            let deadline = Instant::now() + Duration::from_millis(max_ms);
            let mut summary = LoopSummary {
                ok: 0,
                failed: 0,
                refused: 0,
                reset: 0,
                errors: Vec::new(),
            };
            while summary.ok + summary.failed < max_connects
                && !stop_file.exists()
                && Instant::now() < deadline
            {
                match TcpStream::connect_timeout(&target, IO_TIMEOUT) {
                    Ok(_) => summary.ok += 1,
                    Err(e) => {
                        summary.failed += 1;
                        if e.kind() == std::io::ErrorKind::ConnectionRefused {
                            summary.refused += 1;
                        }
                        if e.kind() == std::io::ErrorKind::ConnectionReset {
                            summary.reset += 1;
                        }
                        if summary.errors.len() < 5 {
                            summary.errors.push(e.to_string());
                        }
                    }
                }
            }
            emit(&summary);
        }
        Script::Concurrent { target, count } => {
            let conns: Vec<_> = (0..count)
                .map(|_| TcpStream::connect_timeout(&target, IO_TIMEOUT))
                .collect();
            for conn in conns {
                let result = conn
                    .map_err(anyhow::Error::from)
                    .and_then(|c| detour_testbed::http_request_on(c, target, IO_TIMEOUT));
                emit(&Get::from(result));
            }
        }
        Script::Echo {
            target,
            bytes,
            ready_file,
            go_file,
            max_ms,
        } => emit(&echo(target, bytes, &ready_file, &go_file, max_ms)),
        Script::GetFromATimeWaitPort { direct, target } => {
            emit(&Get::from(get_from_a_time_wait_port(direct, target)));
        }
        Script::Hold {
            target,
            ready_file,
            max_ms,
        } => {
            let start = Instant::now();
            let end = match TcpStream::connect_timeout(&target, IO_TIMEOUT) {
                Err(e) => HoldEnd {
                    kind: Some(format!("{:?}", e.kind())),
                    error: Some(format!("connect: {e}")),
                    timed_out: false,
                    after_ms: 0,
                },
                Ok(mut stream) => {
                    let _ = std::fs::write(&ready_file, b"");
                    stream
                        .set_read_timeout(Some(Duration::from_millis(max_ms)))
                        .expect("a non-zero timeout");
                    let mut buf = [0u8; 64];
                    let result = stream.read(&mut buf);
                    let after_ms = start.elapsed().as_millis() as u64;
                    match result {
                        Ok(_) => HoldEnd {
                            error: None,
                            kind: None,
                            timed_out: false,
                            after_ms,
                        },
                        Err(e) => HoldEnd {
                            timed_out: matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ),
                            kind: Some(format!("{:?}", e.kind())),
                            error: Some(e.to_string()),
                            after_ms,
                        },
                    }
                }
            };
            emit(&end);
        }
    }
}

fn get_from_a_time_wait_port(
    direct: SocketAddr,
    target: SocketAddr,
) -> Result<detour_testbed::HttpResponse> {
    use socket2::{Domain, Socket, Type};
    let reusable = |local: SocketAddr| -> Result<Socket> {
        let socket = Socket::new(Domain::for_address(local), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket
            .bind(&local.into())
            .with_context(|| format!("binding {local}"))?;
        Ok(socket)
    };
    let any_port = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 0);
    let first = reusable(any_port)?;
    first
        .connect_timeout(&direct.into(), IO_TIMEOUT)
        .with_context(|| format!("connecting to {direct} directly"))?;
    let local = first
        .local_addr()?
        .as_socket()
        .context("a local address of the internet family")?;
    // Closing first (before the backend closes its side) leaves the TIME_WAIT here.
    first.shutdown(std::net::Shutdown::Write)?;
    first.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut TcpStream::from(first), &mut rest)?;
    let second = reusable(local)?;
    second
        .connect_timeout(&target.into(), IO_TIMEOUT)
        .with_context(|| format!("connecting to {target} from {local}"))?;
    detour_testbed::http_request_on(TcpStream::from(second), target, IO_TIMEOUT)
}

fn echo(target: SocketAddr, bytes: u64, ready_file: &Path, go_file: &Path, max_ms: u64) -> EchoEnd {
    let mut end = EchoEnd {
        peer: None,
        echoed: 0,
        error: None,
    };
    let result = (|| -> Result<()> {
        let conn = TcpStream::connect_timeout(&target, IO_TIMEOUT).context("connect")?;
        end.peer = conn.peer_addr().ok();
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.set_write_timeout(Some(Duration::from_secs(10)))?;
        detour_testbed::echo_exchange(&conn, 0, bytes).context("the first exchange")?;
        end.echoed = bytes;
        std::fs::write(ready_file, b"")?;
        let deadline = Instant::now() + Duration::from_millis(max_ms);
        while !go_file.exists() {
            anyhow::ensure!(Instant::now() < deadline, "no go file within {max_ms} ms");
            std::thread::sleep(Duration::from_millis(20));
        }
        detour_testbed::echo_exchange(&conn, bytes, bytes).context("the second exchange")?;
        end.echoed += bytes;
        Ok(())
    })();
    end.error = result.err().map(|e| format!("{e:#}"));
    end
}

/// Entry point of the re-executed test binary. Not a test of its own: the other tests
/// run it inside their cgroup with a script.
#[test]
#[ignore = "helper process: the end-to-end tests run it inside their cgroup"]
fn client_process() {
    let script = std::env::var(SCRIPT_ENV).expect("run by the end-to-end tests with a script");
    if let Some(netns) = std::env::var_os(NETNS_ENV) {
        // This thread runs the script: its sockets live in the test's namespace.
        let ns = std::fs::File::open(&netns).expect("the test's network namespace");
        // SAFETY: `ns` is an open namespace file.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
    run_script(serde_json::from_str(&script).expect("valid client script"));
}

/// The command that re-executes this test binary as the helper test `name` (an ignored
/// test that reads its instructions from the environment).
pub fn helper(name: &str) -> Result<Command> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    Ok(cmd)
}

/// Starts a client process inside `cgroup`.
pub fn spawn_in(cgroup: &Cgroup, script: &Script) -> Result<LineStream> {
    let mut cmd = helper("client::client_process")?;
    cmd.env(SCRIPT_ENV, serde_json::to_string(script)?);
    LineStream::spawn_in(cgroup, &mut cmd)
}

/// Where [`spawn_in_netns`] tells the client which network namespace to enter.
const NETNS_ENV: &str = "DETOUR_TEST_CLIENT_NETNS";

/// Starts a client process inside `cgroup`, its sockets in the network namespace
/// `netns` (a test's own, `/run/netns/NAME`).
pub fn spawn_in_netns(cgroup: &Cgroup, netns: &Path, script: &Script) -> Result<LineStream> {
    let mut cmd = helper("client::client_process")?;
    cmd.env(SCRIPT_ENV, serde_json::to_string(script)?);
    cmd.env(NETNS_ENV, netns);
    LineStream::spawn_in(cgroup, &mut cmd)
}

/// Waits (bounded) for a client to finish and returns its result lines.
pub fn results<T: DeserializeOwned>(client: LineStream, timeout: Duration) -> Result<Vec<T>> {
    let (status, lines) = client.wait(timeout).context("the client did not finish")?;
    // libtest prints "test client::client_process ... " on the same line as the first
    // output, so the prefix is searched for, not expected at the start.
    let lines: Vec<String> = lines
        .iter()
        .filter_map(|(_, l)| {
            l.find(LINE_PREFIX)
                .map(|at| l[at + LINE_PREFIX.len()..].to_string())
        })
        .collect();
    if !status.success() {
        bail!("client failed ({status}); it printed {lines:?}");
    }
    lines
        .iter()
        .map(|l| serde_json::from_str(l).with_context(|| format!("client line {l:?}")))
        .collect()
}

/// Runs `count` GETs against `target` from inside `cgroup`.
/// [`Script::GetsByName`] from inside `cgroup`.
pub fn gets_by_name(
    cgroup: &Cgroup,
    host: &str,
    port: u16,
    count: u32,
    interval_ms: u64,
    resolv_conf: &std::path::Path,
) -> Result<Vec<Get>> {
    let child = spawn_in(
        cgroup,
        &Script::GetsByName {
            host: host.to_owned(),
            port,
            count,
            interval_ms,
            resolv_conf: resolv_conf.to_owned(),
        },
    )?;
    // A lookup may take its two tries of a second each, then the GET its timeout.
    let each = interval_ms + 2_000 + 2 * IO_TIMEOUT.as_millis() as u64;
    results(
        child,
        Duration::from_millis(u64::from(count) * each + 10_000),
    )
}

pub fn gets(cgroup: &Cgroup, target: SocketAddr, count: u32, interval_ms: u64) -> Result<Vec<Get>> {
    let child = spawn_in(
        cgroup,
        &Script::Gets {
            target,
            count,
            interval_ms,
        },
    )?;
    results(
        child,
        Duration::from_millis(
            u64::from(count) * (interval_ms + 2 * IO_TIMEOUT.as_millis() as u64) + 10_000,
        ),
    )
}
