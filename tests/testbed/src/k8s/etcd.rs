//! Talking to a test etcd directly, through its JSON gateway (`/v3/...`, `/health`):
//! its current revision, and compaction — what makes a watch that resumes from an older
//! resourceVersion fail with 410 Gone.
//!
//! A minimal HTTP/1.1 client (one request per connection, every step under a deadline):
//! the gateway is plain HTTP on 127.0.0.1 and these are the only three calls needed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Deadline for one request, connect to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether etcd at `addr` reports itself healthy (`GET /health`).
pub(crate) async fn healthy(addr: SocketAddr) -> bool {
    match request(addr, "GET", "/health", None).await {
        Ok(body) => {
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["health"] == "true")
        }
        Err(_) => false,
    }
}

/// The store's current revision (the newest resourceVersion the API server can hand out).
pub(crate) async fn revision(addr: SocketAddr) -> Result<i64> {
    let body = request(addr, "POST", "/v3/maintenance/status", Some("{}")).await?;
    let status: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("etcd status answer {body:?} is not JSON"))?;
    // grpc-gateway renders int64 as a string.
    let revision = &status["header"]["revision"];
    revision
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| revision.as_i64())
        .with_context(|| format!("no header.revision in etcd's status {body:?}"))
}

/// Compacts the store at `revision` (physically, so the old revisions are really gone
/// when this returns).
pub(crate) async fn compact(addr: SocketAddr, revision: i64) -> Result<()> {
    let body = format!(r#"{{"revision":"{revision}","physical":true}}"#);
    request(addr, "POST", "/v3/kv/compaction", Some(&body))
        .await
        .with_context(|| format!("compacting etcd at {addr} to revision {revision}"))?;
    Ok(())
}

/// One request; the body of a 200 answer, an error naming the status otherwise.
async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Result<String> {
    tokio::time::timeout(REQUEST_TIMEOUT, request_inner(addr, method, path, body))
        .await
        .with_context(|| {
            format!("{method} http://{addr}{path}: no answer within {REQUEST_TIMEOUT:?}")
        })?
        .with_context(|| format!("{method} http://{addr}{path}"))
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(format!("{head}{body}").as_bytes()).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let (status, body) = parse_response(&raw)?;
    if status != 200 {
        bail!("status {status}: {body}");
    }
    Ok(body)
}

/// Status and body of a complete HTTP/1.1 response (plain or chunked).
fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("incomplete HTTP response {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .with_context(|| format!("bad chunk header in {rest:?}"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after
            .get(..size)
            .with_context(|| format!("truncated chunk in {after:?}"))?;
        out.push_str(chunk);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, "{}".into()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "{\"a\":1}".into()));
        let err = b"HTTP/1.1 400 Bad Request\r\n\r\nnope";
        assert_eq!(parse_response(err).unwrap(), (400, "nope".into()));
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }
}
