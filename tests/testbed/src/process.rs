//! Running helper processes (`ip`, the `detour` CLI) with a deadline, and writing the
//! scripts tests run as stand-ins.
//!
//! Invariant: no function here waits without a bound; a process that overstays its
//! deadline is killed and reaped before the error is returned, so no zombie is left.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How often a bounded wait looks at the child again.
const POLL: Duration = Duration::from_millis(5);

/// Waits up to `timeout` for `child` to exit; `None` when it is still running.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(POLL);
    }
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it after `timeout`.
///
/// Unlike [`Command::output`] this never hangs: a command still running at the deadline
/// is killed, reaped, and reported as an error. A non-zero exit is not an error here;
/// callers look at `status`.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = match wait_with_timeout(&mut child, timeout)? {
        Some(status) => status,
        None => {
            // Kill errors only mean it exited meanwhile; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs `cmd` like [`output_with_timeout`] and fails unless it exits successfully.
pub(crate) fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let output = output_with_timeout(cmd, timeout)?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            // A read error only truncates diagnostics; the exit status still tells.
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Writes an executable script at `path` without this process ever holding it open for
/// writing: `install` (another process) copies it from a draft. In a test binary, a
/// descriptor open for writing is copied into every child another test's thread forks,
/// until that child execs, and exec of a file open for writing fails with ETXTBSY (seen
/// as a spawn of a freshly written fake agent failing under load).
pub fn write_executable(path: &std::path::Path, text: &str) -> Result<()> {
    let draft = path.with_extension("draft");
    std::fs::write(&draft, text).with_context(|| format!("writing {}", draft.display()))?;
    let out = output_with_timeout(
        Command::new("install")
            .args(["-m", "755"])
            .arg(&draft)
            .arg(path),
        Duration::from_secs(10),
    )?;
    if !out.status.success() {
        bail!(
            "install {}: {}: {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_file(&draft).with_context(|| format!("removing {}", draft.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = output_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn kills_a_command_that_overstays() {
        let start = Instant::now();
        let err = output_with_timeout(Command::new("sleep").arg("10"), Duration::from_millis(100))
            .unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn run_checked_reports_stderr() {
        let err = run_checked(
            Command::new("sh").args(["-c", "echo boom >&2; exit 1"]),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
    }
}
