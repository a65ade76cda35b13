//! The short run of every fuzz target, part of `cargo test`: the committed seeds, every
//! regression input, then property-based generators (arbitrary bytes and structured
//! inputs near the valid ones) with a fixed number of cases. The long run is
//! `cargo xtask fuzz`.

use std::path::Path;

use detour_agent::health::{self, ServingStatus};
use detour_fuzz::{Target, TARGETS};
use proptest::prelude::*;

/// Runs `target` on every file of `dir` (if it exists); returns how many.
fn replay_dir(target: Target, dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let replay = std::panic::catch_unwind(|| target(&bytes));
        assert!(replay.is_ok(), "{} fails again", path.display());
        n += 1;
    }
    n
}

#[test]
fn seeds_and_regression_inputs_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, target) in TARGETS {
        let seeds = replay_dir(target, &root.join("seeds").join(name));
        assert!(seeds > 0, "no seeds for {name}");
        replay_dir(target, &root.join("regressions").join(name));
    }
}

/// A YAML scalar near what the config takes: names, addresses, ports, durations, or not.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9.-]{0,12}",
        Just("127.0.0.1".to_string()),
        Just("::1".to_string()),
        Just("[fd00::1]".to_string()),
        Just("999.1.1.1".to_string()),
        any::<u32>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[0-9]{1,6}(ms|s|m|h|us|ns|d)",
        Just("~".to_string()),
        Just("''".to_string()),
        Just("*a".to_string()),
        Just("&a x".to_string()),
        Just("!!binary aGk=".to_string()),
        "[ -~]{0,16}",
    ]
}

/// Keys the config knows, and some it does not.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "node", "locality", "services", "name", "vips", "ports", "number", "targetPort",
            "endpoints", "address", "weight", "localityLbSetting", "failover", "from", "to",
            "failoverOrder", "spill", "overprovisioningFactor", "healthCheck", "interval",
            "timeout", "unhealthyThreshold", "healthyThreshold", "tcp", "http", "path",
            "host", "expectedStatuses", "start", "end", "grpc", "serviceName", "authority",
            "disabled", "outlierDetection", "consecutiveErrors", "consecutive5xxErrors",
            "baseEjectionTime", "maxEjectionTime", "maxEjectionPercent", "minHealthPercent",
            "handshakeTimeout", "terminateConnections",
        ])
        .prop_map(str::to_string),
        1 => "[a-zA-Z<]{1,8}",
    ]
}

/// A YAML value of bounded depth, written in block or flow style.
fn value() -> impl Strategy<Value = String> {
    scalar().prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5)
                .prop_map(|items| format!("[{}]", items.join(", "))),
            prop::collection::vec((key(), inner), 0..6).prop_map(|fields| {
                let body: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                format!("{{{}}}", body.join(", "))
            }),
        ]
    })
}

/// A config document: top-level keys in block style over flow-style values.
fn document() -> impl Strategy<Value = String> {
    prop::collection::vec((key(), value()), 0..4).prop_map(|fields| {
        fields
            .iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect::<String>()
    })
}

/// A service the config may well accept, with values drawn near the edges.
fn service() -> impl Strategy<Value = String> {
    (
        "[a-z]{1,8}",
        prop::collection::vec(scalar(), 0..3),
        prop::collection::vec((any::<u32>(), "[a-z]{0,4}"), 0..3),
        prop::collection::vec((scalar(), any::<u16>()), 0..4),
        scalar(),
    )
        .prop_map(|(name, vips, ports, endpoints, interval)| {
            let ports: Vec<String> = ports
                .iter()
                .map(|(n, p)| format!("{{number: {n}, name: {p}}}"))
                .collect();
            let endpoints: Vec<String> = endpoints
                .iter()
                .map(|(a, w)| format!("{{address: {a}, weight: {w}}}"))
                .collect();
            format!(
                "  - name: {name}\n    vips: [{}]\n    ports: [{}]\n    endpoints: [{}]\n    healthCheck: {{interval: {interval}}}\n",
                vips.join(", "),
                ports.join(", "),
                endpoints.join(", ")
            )
        })
}

/// A protobuf field of `HealthCheckResponse` as (number, wire type, payload).
fn field() -> impl Strategy<Value = (u64, u8, u64, Vec<u8>)> {
    (
        prop_oneof![Just(1u64), 2..20u64, Just(u64::MAX >> 3)],
        prop::sample::select(vec![0u8, 1, 2, 5]),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..8),
    )
}

fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        for (_, target) in TARGETS {
            target(&data);
        }
    }

    /// Queries near valid ones: a header with any flags and counts, then a name of
    /// labels the zone has or not, any type and class, cut anywhere.
    #[test]
    fn dns_queries(
        header in prop::collection::vec(any::<u8>(), 12),
        labels in prop::collection::vec(prop_oneof![Just("mydb".to_string()), Just("com".to_string()), "[a-z]{0,5}"], 0..4),
        qtype in any::<u16>(),
        cut in any::<usize>(),
    ) {
        let mut query = header;
        // One question, a query.
        query[2] &= 0x7f;
        query[4] = 0;
        query[5] = 1;
        for label in &labels {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.push(0);
        query.extend_from_slice(&qtype.to_be_bytes());
        query.extend_from_slice(&[0, 1]);
        let cut = cut % (query.len() + 1);
        detour_fuzz::dns_query(&query[..cut.max(query.len().min(12))]);
        detour_fuzz::dns_query(&query);
    }

    #[test]
    fn config_documents(doc in document()) {
        detour_fuzz::config(doc.as_bytes());
    }

    #[test]
    fn config_services(node in scalar(), services in prop::collection::vec(service(), 0..4)) {
        let doc = format!("node: {{locality: {node}}}\nservices:\n{}", services.concat());
        detour_fuzz::config(doc.as_bytes());
    }

    #[test]
    fn request_lines(
        request in prop_oneof![
            prop::sample::select(vec!["services", "endpoints", "events"]).prop_map(str::to_string),
            "[ -~]{0,12}",
        ],
        service in prop_oneof![
            Just("null".to_string()),
            "[ -~]{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            any::<i64>().prop_map(|n| n.to_string()),
        ],
        extra in prop::option::of(("[a-z]{1,6}", any::<u32>())),
    ) {
        let mut line = format!(r#"{{"request":{},"service":{service}"#,
            serde_json::to_string(&request).unwrap());
        if let Some((k, v)) = extra {
            line.push_str(&format!(r#","{k}":{v}"#));
        }
        line.push('}');
        detour_fuzz::api_request(line.as_bytes());
    }

    #[test]
    fn status_lines(
        minor in prop::sample::select(vec!["0", "1", "9", "x", ""]),
        status in "[0-9+ -]{0,4}",
        reason in "[ -~]{0,20}",
        ending in prop::sample::select(vec!["\r\n", "\n", "", "\r"]),
    ) {
        let line = format!("HTTP/1.{minor} {status} {reason}{ending}");
        detour_fuzz::http_status(line.as_bytes());
        // Any HTTP/1.x version and reason: three digits are the status.
        if status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()) {
            prop_assert_eq!(health::status_of(line.as_bytes()).ok(), status.parse().ok());
        }
    }

    /// Well-formed responses of random fields: the status is the last field 1 varint,
    /// and cutting the frame anywhere is an error, never a panic.
    #[test]
    fn grpc_responses(fields in prop::collection::vec(field(), 0..6), cut in any::<usize>()) {
        let mut message = Vec::new();
        let mut expected = 0u64;
        for (number, wire, value, bytes) in &fields {
            push_varint(&mut message, number << 3 | u64::from(*wire));
            match wire {
                0 => {
                    push_varint(&mut message, *value);
                    if *number == 1 {
                        expected = *value;
                    }
                }
                1 => message.extend_from_slice(&value.to_le_bytes()),
                5 => message.extend_from_slice(&(*value as u32).to_le_bytes()),
                _ => {
                    push_varint(&mut message, bytes.len() as u64);
                    message.extend_from_slice(bytes);
                }
            }
        }
        let mut frame = vec![0];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(&message);
        let status = health::grpc_health_status(&frame).unwrap();
        let want = match expected {
            0 => ServingStatus::Unknown,
            1 => ServingStatus::Serving,
            2 => ServingStatus::NotServing,
            3 => ServingStatus::ServiceUnknown,
            n => ServingStatus::Other(n),
        };
        prop_assert_eq!(status, want);
        let cut = cut % frame.len();
        prop_assert!(health::grpc_health_status(&frame[..cut]).is_err());
        detour_fuzz::grpc_response(&frame[..cut]);
    }
}
