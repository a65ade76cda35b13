//! `detour dns coredns`: the CoreDNS configuration that makes each FailoverService's
//! `spec.hostname` (e.g. `reviews-failover.default.global`) and each of its `spec.hosts`
//! (e.g. `mydb.com`) resolve to its virtual IP, with stock CoreDNS plugins only. A host
//! is a hostname like any other below.
//!
//! - A FailoverService served through the controller's VIP Service (`<name>-failover`
//!   in its namespace, labelled [`labels::FAILOVER_SERVICE`]) gets a `rewrite name exact
//!   HOSTNAME SERVICE.NAMESPACE.svc.DOMAIN` line for the Corefile's existing `.:53`
//!   block. The `kubernetes` plugin of that block then answers with the Service's
//!   ClusterIP, and an `exact` rewrite also rewrites the answer's name back to the
//!   hostname (CoreDNS does that for `exact` rules by itself, so the line needs no
//!   `answer auto`, an option only newer releases parse). The hostname so follows the
//!   ClusterIP: the snippet needs regenerating only when FailoverServices or their
//!   hostnames change.
//! - A FailoverService with `spec.virtualIP` gets a line in a `hosts` block of a server
//!   block of its own, keyed by the hostnames themselves. Istio documented `.global`
//!   with a `global:53` server block forwarding to its own DNS server; a block keyed by a
//!   whole zone would answer every name under it, so one keyed by exactly the hostnames
//!   leaves the rest of their zones resolving as before.
//!
//! Invariants:
//! - [`render`] is pure and deterministic: lines sorted by hostname, whatever order the
//!   API server listed the objects in;
//! - one hostname, one answer: when FailoverServices share a hostname the oldest (by
//!   `creationTimestamp`, then namespace/name, the agent's own precedence) keeps it and
//!   the others are named in a warning;
//! - nothing read from the API server reaches the Corefile unchecked: a hostname that is
//!   not a lowercase DNS name or a `virtualIP` that is not an IP address is left out
//!   with a warning, so an object cannot inject configuration.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams};
use kube::ResourceExt as _;

use crate::config::is_dns_name;
use crate::controller::names;
use crate::sources::kubernetes::{labels, FailoverService};

/// `detour dns coredns` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct CorednsArgs {
    /// A kubeconfig for the cluster; default: in-cluster, else `$KUBECONFIG` or
    /// `~/.kube/config`.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The cluster's DNS domain (the kubelet's `--cluster-domain`).
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
}

/// What `detour dns coredns` prints: the snippet on stdout, the warnings on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snippet {
    pub text: String,
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("reading the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("finding the cluster's configuration (in-cluster or kubeconfig): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the cluster's client: {0}")]
    Client(#[source] kube::Error),
    #[error(
        "listing {what}: {source} (is the FailoverService CRD installed, and may you list them?)"
    )]
    List {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("--cluster-domain {0:?} is not a DNS name")]
    Domain(String),
}

/// Lists the cluster's FailoverServices and VIP Services and renders the snippet.
///
/// # Errors
/// When the cluster cannot be reached or listed, or the domain is not a DNS name.
pub async fn coredns(args: &CorednsArgs) -> Result<Snippet, DnsError> {
    if !is_dns_name(&args.cluster_domain) {
        return Err(DnsError::Domain(args.cluster_domain.clone()));
    }
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                DnsError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| DnsError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(config).map_err(DnsError::Client)?;
    let failover_services = Api::<FailoverService>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|source| DnsError::List {
            what: "FailoverServices",
            source,
        })?;
    let vip_services = Api::<Service>::all(client)
        .list(&ListParams::default().labels(labels::FAILOVER_SERVICE))
        .await
        .map_err(|source| DnsError::List {
            what: "the controller's VIP Services",
            source,
        })?;
    Ok(render(
        &failover_services.items,
        &vip_services.items,
        &args.cluster_domain,
    ))
}

/// What a hostname resolves to.
#[derive(Clone)]
enum Answer {
    /// An alias of this Service's cluster DNS name.
    Alias(String),
    Address(IpAddr),
}

/// The snippet for `failover_services`, with the VIP Services the controller created
/// (`vip_services`, any others ignored) in cluster domain `domain`. See the module doc.
#[must_use]
pub fn render(
    failover_services: &[FailoverService],
    vip_services: &[Service],
    domain: &str,
) -> Snippet {
    let mut warnings = Vec::new();
    // (namespace, FailoverService label value) → the VIP Service's name.
    let vip_names: BTreeMap<(String, String), String> = vip_services
        .iter()
        .filter_map(|service| {
            let owner = service.labels().get(labels::FAILOVER_SERVICE)?;
            Some((
                (service.namespace().unwrap_or_default(), owner.clone()),
                service.name_any(),
            ))
        })
        .collect();
    let mut ordered: Vec<&FailoverService> = failover_services.iter().collect();
    ordered.sort_by_key(|f| {
        (
            f.metadata.creation_timestamp.as_ref().map(|t| t.0),
            f.namespace().unwrap_or_default(),
            f.name_any(),
        )
    });
    // hostname → (answer, the FailoverService that has it).
    let mut answers: BTreeMap<String, (Answer, String)> = BTreeMap::new();
    for fos in ordered {
        let namespace = fos.namespace().unwrap_or_default();
        let name = fos.name_any();
        let id = format!("{namespace}/{name}");
        // `hostname`, then `hosts`: each a name of its own, kept by the oldest claim.
        let mut names = Vec::new();
        let written = std::iter::once(("hostname", &fos.spec.hostname))
            .chain(fos.spec.hosts.iter().map(|host| ("host", host)));
        for (field, written) in written {
            let name = written.trim_end_matches('.').to_owned();
            if !is_dns_name(&name) {
                warnings.push(format!(
                    "FailoverService {id}: {field} {written:?} is not a lowercase DNS name; \
                     left out"
                ));
            } else if let Some((_, owner)) = answers.get(&name) {
                warnings.push(format!(
                    "FailoverService {id}: {field} {name} is already {owner}'s (the older \
                     one keeps it); left out"
                ));
            } else if !names.contains(&name) {
                names.push(name);
            }
        }
        let Some(hostname) = names.first().cloned() else {
            continue;
        };
        let answer = match fos.spec.virtual_ip.as_deref() {
            Some(vip) => match vip.parse::<IpAddr>() {
                Ok(ip) => Answer::Address(ip),
                Err(_) => {
                    warnings.push(format!(
                        "FailoverService {id}: virtualIP {vip:?} is not an IP address; left out"
                    ));
                    continue;
                }
            },
            None => {
                let key = (namespace.clone(), names::label_value(&name));
                let service = vip_names.get(&key).cloned().unwrap_or_else(|| {
                    let expected = names::vip_service(&name);
                    warnings.push(format!(
                        "FailoverService {id}: its VIP Service {namespace}/{expected} does not \
                         exist yet (is `detour controller` running?); {hostname} resolves once \
                         it does"
                    ));
                    expected
                });
                Answer::Alias(format!("{service}.{namespace}.svc.{domain}"))
            }
        };
        for name in names {
            answers.insert(name, (answer.clone(), id.clone()));
        }
    }

    let mut text = String::from(
        "# CoreDNS configuration for detour FailoverServices, from `detour dns coredns`.\n\
         # Paste it into the Corefile of the coredns ConfigMap (kube-system); see detour's README.\n",
    );
    if answers.is_empty() {
        text.push_str("# No FailoverService has a hostname to serve.\n");
    }
    let aliases: Vec<(&String, &String, &String)> = answers
        .iter()
        .filter_map(|(hostname, (answer, id))| match answer {
            Answer::Alias(target) => Some((hostname, target, id)),
            Answer::Address(_) => None,
        })
        .collect();
    let addresses: Vec<(&String, &IpAddr, &String)> = answers
        .iter()
        .filter_map(|(hostname, (answer, id))| match answer {
            Answer::Address(ip) => Some((hostname, ip, id)),
            Answer::Alias(_) => None,
        })
        .collect();
    if !aliases.is_empty() {
        text.push_str(
            "\n# Inside the existing `.:53 { ... }` server block: each hostname is an alias of\n\
             # its FailoverService's VIP Service and follows that Service's ClusterIP.\n",
        );
        for (hostname, target, id) in aliases {
            let _ = writeln!(text, "rewrite name exact {hostname} {target}  # {id}");
        }
    }
    if !addresses.is_empty() {
        let zones: Vec<String> = addresses
            .iter()
            .map(|(hostname, _, _)| format!("{hostname}:53"))
            .collect();
        text.push_str(
            "\n# After that block, as a server block of its own: FailoverServices with\n\
             # spec.virtualIP. It answers for exactly these names.\n",
        );
        let _ = writeln!(text, "{} {{", zones.join(" "));
        text.push_str("    errors\n    hosts {\n");
        for (hostname, ip, id) in &addresses {
            let _ = writeln!(text, "        {ip} {hostname}  # {id}");
        }
        text.push_str("        ttl 30\n    }\n}\n");
    }
    Snippet { text, warnings }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fos(namespace: &str, name: &str, created: &str, spec: serde_json::Value) -> FailoverService {
        serde_json::from_value(json!({
            "apiVersion": "failover.detour.io/v1alpha1",
            "kind": "FailoverService",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
            "spec": spec,
        }))
        .unwrap()
    }

    fn spec(hostname: &str, vip: Option<&str>) -> serde_json::Value {
        let mut spec = json!({
            "hostname": hostname,
            "port": {"number": 9080},
            "backingServices": [{"kubeService": {"name": "reviews", "namespace": "default"}}],
        });
        if let Some(vip) = vip {
            spec["virtualIP"] = json!(vip);
        }
        spec
    }

    fn vip_service(namespace: &str, name: &str, owner: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {labels::FAILOVER_SERVICE: owner},
            },
        }))
        .unwrap()
    }

    #[test]
    fn vip_services_become_rewrites_and_virtual_ips_a_hosts_block() {
        let snippet = render(
            &[
                fos(
                    "default",
                    "reviews-failover",
                    "2026-11-30T07:00:00Z",
                    spec("reviews-failover.default.global", None),
                ),
                fos(
                    "shop",
                    "db",
                    "2026-11-30T07:00:01Z",
                    spec("db.shop.global", Some("10.96.200.7")),
                ),
                fos(
                    "shop",
                    "db6",
                    "2026-11-30T07:00:02Z",
                    spec("db6.shop.global", Some("fd00::7")),
                ),
            ],
            &[vip_service(
                "default",
                "reviews-failover-failover",
                "reviews-failover",
            )],
            "cluster.local",
        );
        assert_eq!(snippet.warnings, Vec::<String>::new());
        assert_eq!(
            snippet.text,
            "# CoreDNS configuration for detour FailoverServices, from `detour dns coredns`.\n\
             # Paste it into the Corefile of the coredns ConfigMap (kube-system); see detour's README.\n\
             \n\
             # Inside the existing `.:53 { ... }` server block: each hostname is an alias of\n\
             # its FailoverService's VIP Service and follows that Service's ClusterIP.\n\
             rewrite name exact reviews-failover.default.global reviews-failover-failover.default.svc.cluster.local  # default/reviews-failover\n\
             \n\
             # After that block, as a server block of its own: FailoverServices with\n\
             # spec.virtualIP. It answers for exactly these names.\n\
             db.shop.global:53 db6.shop.global:53 {\n    errors\n    hosts {\n\
             \x20       10.96.200.7 db.shop.global  # shop/db\n\
             \x20       fd00::7 db6.shop.global  # shop/db6\n\
             \x20       ttl 30\n    }\n}\n"
        );
    }

    #[test]
    fn the_older_keeps_a_shared_hostname_and_bad_values_are_left_out() {
        let snippet = render(
            &[
                // Listed newest first: order of the list does not matter, age does.
                fos(
                    "b",
                    "newer",
                    "2026-11-30T08:00:00Z",
                    spec("x.global", Some("10.0.0.2")),
                ),
                fos(
                    "a",
                    "older",
                    "2026-11-30T07:00:00Z",
                    spec("x.global", Some("10.0.0.1")),
                ),
                fos(
                    "a",
                    "evil",
                    "2026-11-30T07:00:00Z",
                    spec("y.global }\nforward . 1.2.3.4", None),
                ),
                fos(
                    "a",
                    "badip",
                    "2026-11-30T07:00:00Z",
                    spec("z.global", Some("not-an-ip")),
                ),
                fos("a", "nosvc", "2026-11-30T09:00:00Z", spec("w.global", None)),
            ],
            &[],
            "corp.example",
        );
        assert_eq!(
            snippet.warnings,
            [
                "FailoverService a/badip: virtualIP \"not-an-ip\" is not an IP address; left out",
                "FailoverService a/evil: hostname \"y.global }\\nforward . 1.2.3.4\" is not a lowercase DNS name; left out",
                "FailoverService b/newer: hostname x.global is already a/older's (the older one keeps it); left out",
                "FailoverService a/nosvc: its VIP Service a/nosvc-failover does not exist yet (is `detour controller` running?); w.global resolves once it does",
            ]
        );
        assert!(snippet.text.contains(
            "rewrite name exact w.global nosvc-failover.a.svc.corp.example  # a/nosvc\n"
        ));
        assert!(snippet
            .text
            .contains("        10.0.0.1 x.global  # a/older\n"));
        assert!(!snippet.text.contains("10.0.0.2"));
        assert!(!snippet.text.contains("forward"));
        assert!(!snippet.text.contains("z.global"));
    }

    #[test]
    fn hosts_resolve_like_the_hostname() {
        let mut with_hosts = spec("mydb.default.global", Some("10.96.200.9"));
        with_hosts["hosts"] = json!(["mydb.com", "x.global"]);
        let mut aliased = spec("cache.default.global", None);
        aliased["hosts"] = json!(["cache.example"]);
        let snippet = render(
            &[
                fos(
                    "a",
                    "older",
                    "2026-11-30T07:00:00Z",
                    spec("x.global", Some("10.0.0.1")),
                ),
                fos("default", "mydb", "2026-11-30T08:00:00Z", with_hosts),
                fos("default", "cache", "2026-11-30T08:00:01Z", aliased),
            ],
            &[vip_service("default", "cache-failover", "cache")],
            "cluster.local",
        );
        assert_eq!(
            snippet.warnings,
            ["FailoverService default/mydb: host x.global is already a/older's (the older one keeps it); left out"]
        );
        assert!(snippet
            .text
            .contains("        10.96.200.9 mydb.com  # default/mydb\n"));
        assert!(snippet
            .text
            .contains("        10.96.200.9 mydb.default.global  # default/mydb\n"));
        assert!(snippet
            .text
            .contains("mydb.com:53 mydb.default.global:53 x.global:53 {"));
        assert!(snippet.text.contains(
            "rewrite name exact cache.example cache-failover.default.svc.cluster.local  # default/cache\n"
        ));
    }

    #[test]
    fn nothing_to_serve_says_so() {
        let snippet = render(&[], &[], "cluster.local");
        assert!(snippet
            .text
            .ends_with("# No FailoverService has a hostname to serve.\n"));
        assert!(snippet.warnings.is_empty());
    }
}
