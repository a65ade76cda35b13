//! Rendering of the CLI's tables. Pure: views in, text out.
//!
//! Columns follow `istioctl proxy-config endpoints` where the concept is the same
//! (ENDPOINT, HEALTH for the active check, OUTLIER for passive ejection), and add what a
//! failover agent needs to explain itself: the endpoint's locality and tier, whether it
//! is in the kernel's table now, how many connects the kernel sent it, how many of them
//! failed, and how often it was ejected.

use crate::api::{EndpointView, EventView, ServiceView};

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

pub fn services_table(services: &[ServiceView]) -> String {
    if services.is_empty() {
        return "no services configured\n".into();
    }
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.vips.join(","),
                s.tier.clone(),
                format!("{}/{}", s.healthy, s.endpoints),
                s.in_table.to_string(),
                s.connects.to_string(),
                state_cell(s),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE", "VIP", "TIER", "HEALTHY", "IN-TABLE", "CONNECTS", "STATE",
        ],
        &rows,
    )
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
                e.tier.clone(),
                e.weight.to_string(),
                if e.in_table { "yes" } else { "no" }.into(),
                e.connects.to_string(),
                (e.refused + e.timeouts).to_string(),
                e.ejections.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ENDPOINT",
            "SERVICE",
            "HEALTH",
            "OUTLIER",
            "LOCALITY",
            "CLUSTER",
            "TIER",
            "WEIGHT",
            "IN-TABLE",
            "CONNECTS",
            "FAILURES",
            "EJECTIONS",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_table_reads_like_istioctl() {
        let rows = vec![
            EndpointView {
                service: "mydb".into(),
                port: 80,
                address: "127.0.1.1:8080".parse().unwrap(),
                locality: "us-east1/us-east1-b".into(),
                cluster: String::new(),
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
            },
            EndpointView {
                service: "mydb".into(),
                port: 80,
                address: "127.0.2.1:8080".parse().unwrap(),
                locality: "us-west".into(),
                cluster: "kind3".into(),
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
