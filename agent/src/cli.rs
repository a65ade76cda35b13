//! Rendering of the CLI's tables. Pure: views in, text out.
//!
//! Columns follow `istioctl proxy-config endpoints` where the concept is the same
//! (ENDPOINT, HEALTH), and add what a failover agent needs to explain itself: the
//! endpoint's locality and tier, whether it is in the kernel's table now, and how many
//! connects the kernel sent it.

use crate::api::{EndpointView, ServiceView};

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
            ]
        })
        .collect();
    table(
        &["SERVICE", "VIP", "TIER", "HEALTHY", "IN-TABLE", "CONNECTS"],
        &rows,
    )
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
                if e.locality.is_empty() {
                    "-".into()
                } else {
                    e.locality.clone()
                },
                e.tier.clone(),
                e.weight.to_string(),
                if e.in_table { "yes" } else { "no" }.into(),
                e.connects.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ENDPOINT", "SERVICE", "HEALTH", "LOCALITY", "TIER", "WEIGHT", "IN-TABLE", "CONNECTS",
        ],
        &rows,
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
                health: "UNHEALTHY".into(),
                weight: 1,
                tier: "same-zone".into(),
                in_table: false,
                connects: 12,
                last_error: Some("connect failed: Connection refused".into()),
            },
            EndpointView {
                service: "mydb".into(),
                port: 80,
                address: "127.0.2.1:8080".parse().unwrap(),
                locality: "us-west".into(),
                health: "HEALTHY".into(),
                weight: 1,
                tier: "failover[0]:us-west".into(),
                in_table: true,
                connects: 3,
                last_error: None,
            },
        ];
        let text = endpoints_table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ENDPOINT        SERVICE  HEALTH"));
        assert!(lines[1].starts_with("127.0.1.1:8080  mydb:80  UNHEALTHY"));
        assert!(lines[1].contains(" no "));
        assert!(lines[2].contains("failover[0]:us-west"));
        assert!(lines[2].ends_with(" yes       3"));
    }

    #[test]
    fn empty_tables_say_so() {
        assert_eq!(services_table(&[]), "no services configured\n");
        assert_eq!(endpoints_table(&[]), "no endpoints\n");
    }
}
