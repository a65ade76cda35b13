//! Fuzz targets for every parser of bytes from outside the agent that detour owns: the
//! configuration file (a detour document, or a stream with Istio's objects), the CLI
//! socket's request line, the HTTP probe's status line, the gRPC probe's response
//! message and the DNS queries the agent's name server answers.
//!
//! Each target is a plain function of bytes, so the same code runs under libFuzzer
//! (`cargo xtask fuzz`, the long run, through the `libfuzzer` feature's binaries) and
//! in `cargo test` (the short run in `tests/`: the seeds, every regression input, and
//! property-based generators with a fixed case count).
//!
//! Invariants checked on every input, beyond "no panic" (a panic is how a target
//! reports a failure): a parser either answers or says why not, and what it answers is
//! consistent with the input (a parsed request re-encodes to the same request, a status
//! has three digits, a serving status comes from a whole frame). Hangs and unbounded
//! allocations are caught by libFuzzer's `-timeout` and `-rss_limit_mb`/
//! `-malloc_limit_mb` in the long run.
//!
//! The kernel's connection events need no target: they are fixed-size `#[repr(C)]`
//! records of integers, copied only when the ring buffer item is at least that long,
//! and every bit pattern is a valid value.

use detour_agent::api;
use detour_agent::config;
use detour_agent::health::{self, ProbeError, ServingStatus, MAX_STATUS_LINE};
use detour_agent::nameserver;

/// A fuzz target: panics on an input that shows a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name of its libFuzzer binary and its seed directory.
pub const TARGETS: [(&str, Target); 5] = [
    ("config", config),
    ("api_request", api_request),
    ("http_status", http_status),
    ("grpc_response", grpc_response),
    ("dns_query", dns_query),
];

/// The agent's DNS server: a UDP message from any local process. An answer is a DNS
/// message with the query's id, and never longer than a UDP answer to a small zone.
pub fn dns_query(data: &[u8]) {
    let zone: nameserver::Zone = [
        ("mydb.com".to_owned(), vec!["240.240.0.7".parse().unwrap()]),
        (
            "db.example".to_owned(),
            vec!["fd00::1".parse().unwrap(), "10.0.0.1".parse().unwrap()],
        ),
    ]
    .into_iter()
    .collect();
    if let Some(reply) = nameserver::answer(&zone, data) {
        assert!(
            reply.len() >= 12,
            "a reply shorter than a header: {reply:?}"
        );
        assert_eq!(reply[..2], data[..2], "the reply keeps the query's id");
        assert!(reply[2] & 0x80 != 0, "the reply is a response");
        assert!(
            reply.len() <= 512 + data.len(),
            "{} bytes for a {}-byte query",
            reply.len(),
            data.len()
        );
    }
}

/// The configuration parser: YAML text, validated. Bytes that are not UTF-8 never reach
/// it (the agent reads the file as UTF-8 first).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = config::parse(text) {
        // Errors name a line inside the text (YAML breaks lines at \n, \r, \r\n,
        // NEL, LS and PS; one more for an error at the very end).
        if let Some(line) = e.line {
            let breaks = text
                .chars()
                .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
                .count();
            assert!(
                line >= 1 && line <= breaks + 2,
                "line {line} of a text with {breaks} line breaks: {e}"
            );
        }
    }
}

/// The CLI socket's request line (without its newline).
pub fn api_request(data: &[u8]) {
    match api::parse_request(data) {
        Ok(request) => {
            let line = serde_json::to_vec(&request).expect("a request encodes");
            assert_eq!(api::parse_request(&line).ok(), Some(request));
        }
        // The client is told why.
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The HTTP probe's status line, as many bytes as the probe reads of it.
pub fn http_status(data: &[u8]) {
    let head = &data[..data.len().min(MAX_STATUS_LINE + 1)];
    match health::status_of(head) {
        Ok(status) => assert!(status < 1000, "status {status}"),
        Err(ProbeError::TooLarge { .. }) => {
            assert!(head.len() > MAX_STATUS_LINE, "too large at {}", head.len())
        }
        Err(ProbeError::NotHttp(shown)) => assert!(shown.chars().count() <= 80),
        Err(other) => panic!("unexpected error {other}"),
    }
}

/// The gRPC probe's response body: one length-prefixed `HealthCheckResponse`.
pub fn grpc_response(data: &[u8]) {
    match health::grpc_health_status(data) {
        Ok(status) => {
            assert!(data.len() >= 5 && data[0] == 0, "accepted {data:?}");
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            assert!(data.len() >= 5 + len, "accepted a short message");
            if len == 0 {
                assert_eq!(status, ServingStatus::Unknown);
            }
        }
        Err(ProbeError::GrpcMalformed(_)) => {}
        Err(other) => panic!("unexpected error {other}"),
    }
}
