//! Rendering of the CLI's tables. Pure: views in, text out.
//!
//! Columns follow `istioctl proxy-config endpoints` where the concept is the same
//! (ENDPOINT, HEALTH for the active check, OUTLIER for passive ejection), and add what a
//! failover agent needs to explain itself: the endpoint's locality and tier, whether it
//! is in the kernel's table now, how many connects the kernel sent it, how many of them
//! failed, and how often it was ejected.

use crate::api::{EndpointView, EventView, ExplainView, NameView, ServiceView};
use crate::dataplane::features::{self, Features, Need};

/// Left-aligned columns separated by two spaces, widths from the widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// One row per service port. SOURCE, before STATE (which stays last), says where the
/// service is defined (`file PATH`, `fos NAMESPACE/NAME`, `…, takeover of svc
/// NAMESPACE/NAME`); it is left out when no row knows (an agent older than the field).
pub fn services_table(services: &[ServiceView]) -> String {
    if services.is_empty() {
        return "no services configured\n".into();
    }
    let sourced = services.iter().any(|s| s.origin.is_some());
    let named = services.iter().any(|s| !s.hosts.is_empty());
    let originated = services.iter().any(|s| !s.tls_relays.is_empty());
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            let mut row = vec![s.name.clone()];
            if named {
                row.push(if s.hosts.is_empty() {
                    "-".to_owned()
                } else {
                    s.hosts.join(",")
                });
            }
            row.extend([
                s.vips.join(","),
                s.tier.clone(),
                format!("{}/{}", s.healthy, s.endpoints),
                s.in_table.to_string(),
                s.connects.to_string(),
            ]);
            if originated {
                row.push(if s.tls_relays.is_empty() {
                    "kernel".to_owned()
                } else {
                    let relays: Vec<&str> = s
                        .tls_relays
                        .iter()
                        .filter_map(|r| r.split_once('>').map(|(_, relay)| relay))
                        .collect();
                    format!("tls:{}", relays.join(","))
                });
            }
            if sourced {
                row.push(
                    s.origin
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), ToString::to_string),
                );
            }
            row.push(state_cell(s));
            row
        })
        .collect();
    let mut header = vec!["SERVICE"];
    if named {
        header.push("HOSTS");
    }
    header.extend(["VIP", "TIER", "HEALTHY", "IN-TABLE", "CONNECTS"]);
    if originated {
        header.push("VIA");
    }
    if sourced {
        header.push("SOURCE");
    }
    header.push("STATE");
    table(&header, &rows)
}

/// `detour explain`: per frontend, a line with its tiers and their loads, then one row
/// per endpoint ending in WHY, the one-line reason it is or is not in the table.
pub fn explain_table(view: &ExplainView) -> String {
    let mut out = format!("{}:{}  ({})\n", view.service, view.port, view.origin);
    if view.frontends.is_empty() {
        out.push_str("no frontends: the service has no VIP of this port\n");
    }
    for f in &view.frontends {
        let loads = if f.loads.is_empty() {
            "no endpoints".to_owned()
        } else {
            f.loads
                .iter()
                .map(|l| {
                    let panic = if l.panic {
                        " (panic: under minHealthPercent, every endpoint serves)"
                    } else {
                        ""
                    };
                    format!("{} {}%{panic}", l.tier, l.percent)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "\nVIP {}: {loads}; spill {}; {} slots, {} standby; {}{}\n",
            f.frontend,
            f.spill,
            f.slots,
            f.standby_slots,
            f.state,
            if f.panic {
                "; PANIC: nothing is usable, every endpoint serves"
            } else {
                ""
            }
        ));
        let rows: Vec<Vec<String>> = f
            .endpoints
            .iter()
            .map(|e| {
                vec![
                    e.address.to_string(),
                    if e.cluster.is_empty() {
                        "-".into()
                    } else {
                        e.cluster.clone()
                    },
                    if e.tier_active {
                        format!("{} ({}%)", e.tier, e.tier_percent)
                    } else {
                        e.tier.clone()
                    },
                    e.health.clone(),
                    match (&e.ejected_for_ms, e.suspect) {
                        (Some(ms), _) => format!("ejected {}s", ms.div_ceil(1000)),
                        (None, true) => "suspect".into(),
                        (None, false) => "ok".into(),
                    },
                    e.share_percent
                        .map_or_else(|| "-".to_owned(), |p| format!("{p:.1}%")),
                    e.reason.clone(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "ENDPOINT", "CLUSTER", "TIER", "HEALTH", "OUTLIER", "SHARE", "WHY",
            ],
            &rows,
        ));
    }
    out
}

/// `OK`, or e.g. `NOT-PROGRAMMED: max-backends (262144) reached`.
fn state_cell(s: &ServiceView) -> String {
    match (s.state.as_str(), &s.limit) {
        ("", _) => "-".into(),
        (state, Some(limit)) => format!("{state}: {limit}"),
        (state, None) => state.into(),
    }
}

pub fn endpoints_table(endpoints: &[EndpointView]) -> String {
    if endpoints.is_empty() {
        return "no endpoints\n".into();
    }
    let rows: Vec<Vec<String>> = endpoints
        .iter()
        .map(|e| {
            vec![
                e.address.to_string(),
                format!("{}:{}", e.service, e.port),
                e.health.clone(),
                outlier_cell(e),
                if e.locality.is_empty() {
                    "-".into()
                } else {
                    e.locality.clone()
                },
                if e.cluster.is_empty() {
                    "-".into()
                } else {
                    e.cluster.clone()
                },
                if e.hostname.is_empty() {
                    "-".into()
                } else {
                    e.hostname.clone()
                },
                e.tier.clone(),
                e.weight.to_string(),
                if e.in_table { "yes" } else { "no" }.into(),
                e.connects.to_string(),
                (e.refused + e.timeouts).to_string(),
                e.ejections.to_string(),
                e.steered.to_string(),
            ]
        })
        .collect();
    let mut headers = vec![
        "ENDPOINT",
        "SERVICE",
        "HEALTH",
        "OUTLIER",
        "LOCALITY",
        "CLUSTER",
        "NAME",
        "TIER",
        "WEIGHT",
        "IN-TABLE",
        "CONNECTS",
        "FAILURES",
        "EJECTIONS",
        "STEERED",
    ];
    // The DNS name column only where some endpoint came from a name, the steered flows
    // only where some flow is steered.
    let mut rows = rows;
    let mut drop_column = |name: &str| {
        let at = headers
            .iter()
            .position(|h| *h == name)
            .expect("listed above");
        headers.remove(at);
        for row in &mut rows {
            row.remove(at);
        }
    };
    if endpoints.iter().all(|e| e.hostname.is_empty()) {
        drop_column("NAME");
    }
    if endpoints.iter().all(|e| e.steered == 0) {
        drop_column("STEERED");
    }
    table(&headers, &rows)
}

/// `detour names`: one row per DNS name: its state, addresses, TTL, next lookup, the
/// services using it and the last error.
pub fn names_table(names: &[NameView]) -> String {
    if names.is_empty() {
        return "no DNS names (no service has `resolution: DNS` with a name)\n".into();
    }
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|n| {
            let addresses = n
                .addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            vec![
                n.name.clone(),
                n.state.to_uppercase(),
                if addresses.is_empty() {
                    "-".into()
                } else {
                    addresses
                },
                dash(n.ttl_secs.map(|t| format!("{t}s"))),
                dash(n.resolved_secs_ago.map(|t| format!("{t}s ago"))),
                n.next_lookup_in_ms
                    .map_or_else(|| "now".into(), |ms| format!("{}s", ms.div_ceil(1000))),
                n.services.join(","),
                dash(n.last_error.clone()),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "ADDRESSES",
            "TTL",
            "RESOLVED",
            "NEXT",
            "SERVICES",
            "LAST-ERROR",
        ],
        &rows,
    )
}

/// `OK`, `SUSPECT`, or `EJECTED` with the time left, rounded up to the second.
fn outlier_cell(e: &EndpointView) -> String {
    match e.ejected_for_ms {
        Some(ms) => format!("{} {}s", e.outlier, ms.div_ceil(1000)),
        None => e.outlier.clone(),
    }
}

/// One event as a line: time, kind, service, backend, detail.
pub fn event_line(e: &EventView) -> String {
    let backend = e.backend.map_or_else(|| "-".to_string(), |b| b.to_string());
    format!(
        "{}  {:<16}  {}  {}  {}\n",
        e.time, e.kind, e.service, backend, e.detail
    )
}

/// `detour kernel`: the kernel's version against the minimum, one row per probed piece,
/// then what the agent would refuse or turn off here, one line each.
pub fn kernel_table(kernel: &Features) -> String {
    let mut out = format!(
        "kernel {} (detour needs {}.{} or newer)\n",
        kernel.version_string(),
        features::MINIMUM.0,
        features::MINIMUM.1
    );
    let rows: Vec<Vec<String>> = kernel
        .pieces
        .iter()
        .map(|p| {
            let state = match p.present {
                Some(true) => "ok",
                Some(false) => "missing",
                None => "unknown",
            };
            let need = match p.need {
                Need::Required => "required",
                Need::Optional => "optional",
            };
            vec![
                p.name.to_owned(),
                state.to_owned(),
                need.to_owned(),
                p.used_for.to_owned(),
            ]
        })
        .collect();
    out.push_str(&table(&["PIECE", "STATE", "NEED", "USED FOR"], &rows));
    let verdict = features::verdict(kernel);
    for refusal in &verdict.refusals {
        out.push_str(&format!("refused: {refusal}\n"));
    }
    for warning in &verdict.warnings {
        out.push_str(&format!("off: {warning}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_table_lists_each_piece_and_says_what_is_off() {
        let kernel = Features {
            version: Some((5, 10, 223)),
            pieces: vec![
                features::socket_destroy(Ok(())),
                features::syn_linear_timeouts(None),
            ],
        };
        let text = kernel_table(&kernel);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "kernel 5.10.223 (detour needs 5.8 or newer)");
        assert!(lines[1].starts_with("PIECE"), "{text}");
        assert!(
            lines[2].starts_with("socket destruction (sock_diag SOCK_DESTROY)")
                && lines[2].contains("  ok  ")
                && lines[2].contains("optional"),
            "{text}"
        );
        assert!(lines[3].contains("  missing  "), "{text}");
        assert!(
            lines[4].starts_with(
                "off: linear SYN retransmission timeouts (tcp_syn_linear_timeouts) is missing \
                 (the kernel is older than 6.5): "
            ),
            "{text}"
        );
        assert_eq!(lines.len(), 5, "{text}");
    }

    #[test]
    fn endpoints_table_reads_like_istioctl() {
        let rows = vec![
            EndpointView {
                service: "mydb".into(),
                port: 80,
                address: "127.0.1.1:8080".parse().unwrap(),
                locality: "us-east1/us-east1-b".into(),
                cluster: String::new(),
                hostname: String::new(),
                health: "UNHEALTHY".into(),
                weight: 1,
                tier: "same-zone".into(),
                in_table: false,
                connects: 12,
                last_error: Some("connect failed: Connection refused".into()),
                outlier: "EJECTED".into(),
                ejected_for_ms: Some(28_100),
                ejections: 1,
                consecutive_failures: 0,
                established: 11,
                refused: 1,
                timeouts: 0,
                resets: 0,
                aborts: 0,
                steered: 0,
            },
            EndpointView {
                service: "mydb".into(),
                port: 80,
                address: "127.0.2.1:8080".parse().unwrap(),
                locality: "us-west".into(),
                cluster: "kind3".into(),
                hostname: String::new(),
                health: "HEALTHY".into(),
                weight: 1,
                tier: "failover[0]:us-west".into(),
                in_table: true,
                connects: 3,
                last_error: None,
                outlier: "OK".into(),
                ejected_for_ms: None,
                ejections: 0,
                consecutive_failures: 0,
                established: 3,
                refused: 0,
                timeouts: 0,
                resets: 0,
                aborts: 0,
                steered: 0,
            },
        ];
        let text = endpoints_table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ENDPOINT        SERVICE  HEALTH     OUTLIER"));
        assert!(lines[1].starts_with("127.0.1.1:8080  mydb:80  UNHEALTHY  EJECTED 29s"));
        assert!(lines[1].contains(" no "));
        assert!(lines[1].ends_with(" 12        1         1"), "{}", lines[1]);
        assert!(lines[2].contains("HEALTHY    OK "));
        assert!(
            lines[2].contains(" us-west              kind3    failover[0]:us-west "),
            "{}",
            lines[2]
        );
        assert!(
            lines[1].contains(" us-east1/us-east1-b  -        same-zone "),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].ends_with(" yes       3         0         0"),
            "{}",
            lines[2]
        );
        assert!(
            !lines[0].contains("NAME"),
            "no endpoint has a DNS name: {}",
            lines[0]
        );
        // An endpoint resolved from a name shows it, in a column of its own.
        let mut named = rows;
        named[1].hostname = "west.example".into();
        let text = endpoints_table(&named);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains(" CLUSTER  NAME          TIER "),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains(" -        -             same-zone "),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains(" kind3    west.example  failover[0]:us-west "),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn names_table_shows_what_serves_and_why() {
        let names = vec![
            NameView {
                name: "east.example".into(),
                services: vec!["mydb".into()],
                state: "stale".into(),
                addresses: vec!["127.0.1.1".parse().unwrap(), "127.0.1.2".parse().unwrap()],
                resolved_secs_ago: Some(12),
                ttl_secs: Some(5),
                next_lookup_in_ms: Some(1_200),
                failures: 2,
                last_error: Some("request timed out".into()),
            },
            NameView {
                name: "west.example".into(),
                services: vec!["mydb".into(), "other".into()],
                state: "pending".into(),
                addresses: vec![],
                resolved_secs_ago: None,
                ttl_secs: None,
                next_lookup_in_ms: None,
                failures: 0,
                last_error: None,
            },
        ];
        let text = names_table(&names);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("NAME          STATE    ADDRESSES            TTL  RESOLVED  NEXT"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("east.example  STALE    127.0.1.1,127.0.1.2  5s   12s ago   2s"),
            "{text}"
        );
        assert!(
            lines[1].ends_with("mydb        request timed out"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("west.example  PENDING  -                    -    -         now"),
            "{text}"
        );
        assert_eq!(
            names_table(&[]),
            "no DNS names (no service has `resolution: DNS` with a name)\n"
        );
    }

    #[test]
    fn services_table_names_what_does_not_fit() {
        let view = |name: &str, state: &str, limit: Option<&str>| ServiceView {
            name: name.into(),
            port: 80,
            vips: vec!["127.200.0.1:80".into()],
            tier: "same-zone".into(),
            endpoints: 2,
            healthy: 2,
            in_table: 2,
            connects: 7,
            state: state.into(),
            limit: limit.map(Into::into),
            origin: None,
            hosts: Vec::new(),
            tls_relays: Vec::new(),
        };
        let text = services_table(&[
            view("mydb", "OK", None),
            ServiceView {
                in_table: 0,
                connects: 0,
                ..view("big", "NOT-PROGRAMMED", Some("max-backends (3) reached"))
            },
            view("grown", "NOT-UPDATED", Some("max-slots (8) reached")),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "SERVICE  VIP             TIER       HEALTHY  IN-TABLE  CONNECTS  STATE"
        );
        assert!(lines[1].ends_with(" 7         OK"), "{}", lines[1]);
        assert!(
            lines[2].ends_with(" 0         0         NOT-PROGRAMMED: max-backends (3) reached"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].ends_with("NOT-UPDATED: max-slots (8) reached"),
            "{}",
            lines[3]
        );
        // Where a service has hosts, a HOSTS column says which names answer with it.
        let text = services_table(&[
            ServiceView {
                hosts: vec!["mydb.com".into()],
                ..view("mydb", "OK", None)
            },
            view("other", "OK", None),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SERVICE  HOSTS     VIP "), "{text}");
        assert!(
            lines[1].starts_with("mydb     mydb.com  127.200.0.1:80 "),
            "{text}"
        );
        assert!(
            lines[2].starts_with("other    -         127.200.0.1:80 "),
            "{text}"
        );
        // Where a service originates TLS, a VIA column says where its connects go.
        let text = services_table(&[
            ServiceView {
                tls_relays: vec!["127.200.0.1:80>127.0.0.1:40123".into()],
                ..view("mydb", "OK", None)
            },
            view("other", "OK", None),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("CONNECTS  VIA "), "{text}");
        assert!(lines[1].contains(" tls:127.0.0.1:40123 "), "{text}");
        assert!(lines[2].contains(" kernel "), "{text}");
    }

    #[test]
    fn services_table_says_where_each_service_is_defined() {
        use crate::config::{ObjectName, ServiceOrigin};
        let view = |name: &str, origin: ServiceOrigin| ServiceView {
            name: name.into(),
            port: 9080,
            vips: vec!["10.96.0.10:9080".into()],
            tier: "same-zone".into(),
            endpoints: 2,
            healthy: 2,
            in_table: 1,
            connects: 0,
            state: "OK".into(),
            limit: None,
            origin: Some(origin),
            hosts: Vec::new(),
            tls_relays: Vec::new(),
        };
        let fos = |take_over: Option<&str>| ServiceOrigin::FailoverService {
            namespace: "default".into(),
            name: "reviews-failover".into(),
            take_over: take_over.map(|name| ObjectName {
                namespace: "default".into(),
                name: name.into(),
            }),
        };
        let text = services_table(&[
            view("reviews-failover.default", fos(None)),
            view(
                "reviews-failover.default.takeover.reviews.default",
                fos(Some("reviews")),
            ),
            view(
                "mydb",
                ServiceOrigin::File {
                    path: "/etc/detour.yaml".into(),
                },
            ),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        // STATE stays last, where scripts (and the limits test) look for it.
        assert!(
            lines[0].contains("  CONNECTS  SOURCE  ") && lines[0].ends_with("  STATE"),
            "{}",
            lines[0]
        );
        let source_at = lines[0].find("SOURCE").unwrap();
        let state_at = lines[0].find("STATE").unwrap();
        let sources: Vec<(&str, &str)> = lines[1..]
            .iter()
            .map(|l| (l[source_at..state_at].trim_end(), &l[state_at..]))
            .collect();
        assert_eq!(
            sources,
            [
                ("fos default/reviews-failover", "OK"),
                (
                    "fos default/reviews-failover, takeover of svc default/reviews",
                    "OK"
                ),
                ("file /etc/detour.yaml", "OK"),
            ]
        );
    }

    #[test]
    fn explain_table_gives_each_endpoint_one_line_with_its_reason() {
        use crate::api::{EndpointExplanation, FrontendExplanation, TierLoad};
        let endpoint =
            |address: &str, tier: &str, percent: Option<u32>, share: f64, reason: &str| {
                EndpointExplanation {
                    address: address.parse().unwrap(),
                    locality: String::new(),
                    cluster: "kind2".into(),
                    weight: 1,
                    tier: tier.into(),
                    tier_active: percent.is_some(),
                    tier_percent: percent.unwrap_or(0),
                    health: "passing".into(),
                    health_error: None,
                    ejected: false,
                    ejected_for_ms: None,
                    ejected_until: None,
                    ejection_cause: None,
                    suspect: false,
                    verdict: "in-table".into(),
                    in_table: share > 0.0,
                    standby: false,
                    share_percent: Some(share),
                    reason: reason.into(),
                }
            };
        let view = ExplainView {
            service: "mydb".into(),
            port: 80,
            origin: crate::config::ServiceOrigin::File {
                path: "/etc/detour.yaml".into(),
            },
            frontends: vec![FrontendExplanation {
                frontend: "127.200.0.1:80".parse().unwrap(),
                tier: "same-zone".into(),
                panic: false,
                loads: vec![
                    TierLoad {
                        tier: "same-zone".into(),
                        percent: 70,
                        panic: false,
                    },
                    TierLoad {
                        tier: "same-region".into(),
                        percent: 30,
                        panic: false,
                    },
                ],
                spill: "gradual (overprovisioning 140%)".into(),
                slots: 10,
                standby_slots: 0,
                state: "OK".into(),
                endpoints: vec![
                    EndpointExplanation {
                        health: "failing".into(),
                        ejected_for_ms: Some(59_001),
                        verdict: "out".into(),
                        ..endpoint(
                            "127.0.1.1:8080",
                            "same-zone",
                            Some(70),
                            0.0,
                            "not in table: health check failing (refused)",
                        )
                    },
                    endpoint(
                        "127.0.2.1:8080",
                        "same-region",
                        Some(30),
                        100.0 / 3.0,
                        "in table: spilled",
                    ),
                ],
            }],
        };
        assert_eq!(
            explain_table(&view),
            "mydb:80  (file /etc/detour.yaml)\n\
             \n\
             VIP 127.200.0.1:80: same-zone 70%, same-region 30%; spill gradual (overprovisioning 140%); 10 slots, 0 standby; OK\n\
             ENDPOINT        CLUSTER  TIER               HEALTH   OUTLIER      SHARE  WHY\n\
             127.0.1.1:8080  kind2    same-zone (70%)    failing  ejected 60s  0.0%   not in table: health check failing (refused)\n\
             127.0.2.1:8080  kind2    same-region (30%)  passing  ok           33.3%  in table: spilled\n"
        );
    }

    #[test]
    fn event_lines_name_what_happened() {
        let line = event_line(&EventView {
            time: "2026-11-22T10:00:00.000Z".into(),
            kind: "ejected".into(),
            service: "mydb".into(),
            backend: Some("127.0.1.1:8080".parse().unwrap()),
            detail: "refused; ejection 1, for 30s".into(),
        });
        assert_eq!(
            line,
            "2026-11-22T10:00:00.000Z  ejected           mydb  127.0.1.1:8080  refused; ejection 1, for 30s\n"
        );
    }

    #[test]
    fn empty_tables_say_so() {
        assert_eq!(services_table(&[]), "no services configured\n");
        assert_eq!(endpoints_table(&[]), "no endpoints\n");
    }
}
