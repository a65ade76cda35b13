//! Istio's YAML, as written: a file that is a stream of documents may hold
//! `networking.istio.io` `ServiceEntry` and `DestinationRule` objects (v1, v1beta1,
//! v1alpha3), beside at most one detour document (`node`, and `services` if any). Each
//! ServiceEntry is one service; the DestinationRule whose `host` is one of its `hosts`
//! gives its `trafficPolicy`.
//!
//! The mapping onto the model is by field, and a field detour does not implement is
//! refused with its path and why, never ignored:
//! - ServiceEntry `hosts`, `addresses` (the VIPs; none: one is allocated), `ports`
//!   (`number`, `name`, `protocol`, `targetPort`), `resolution` (`STATIC`, `DNS`),
//!   `location` (either: detour treats both alike), `endpoints` (`address`, `ports`,
//!   `locality`, `weight`, `labels`);
//! - DestinationRule `host`, `trafficPolicy.loadBalancer.localityLbSetting`, `.simple`
//!   (`ROUND_ROBIN`, `RANDOM`, `UNSPECIFIED`: detour spreads new connections by weight
//!   at connect time, which is what these come to there), `trafficPolicy.outlierDetection`,
//!   `trafficPolicy.tls` (`mode` `SIMPLE` or `DISABLE`, `sni`, `caCertificates`).
//!
//! Each object becomes a service in the file's schema (JSON) and is read and checked by
//! the code that reads the file's own services, so both give the same errors; an error
//! about an object is then given the object's own path (`ServiceEntry/mydb.spec.
//! endpoints[0].ports`) and its line in the file.
//!
//! Invariants: the documents of a stream are split at lines that start with `---` (a
//! document marker is one wherever it stands, YAML 1.2 §9.1), each keeps its lines'
//! numbers in the file; a host belongs to one ServiceEntry, and a DestinationRule names
//! exactly one of them.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{
    line_of, syntax_error, yaml_options, ConfigError, ConfigErrorKind, ParseOptions, RawConfig,
    RawService, Validator,
};
use crate::config::Config;

/// The API versions of `networking.istio.io` whose ServiceEntry and DestinationRule
/// have the fields read here.
const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Whether `yaml` is a stream of documents or an Istio object, rather than one detour
/// document: a line that starts a document, or a top-level `apiVersion` or `kind`.
pub(super) fn is_stream(yaml: &str) -> bool {
    yaml.lines().any(|line| {
        is_marker(line, "---") || line.starts_with("apiVersion:") || line.starts_with("kind:")
    })
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// One document of the stream: its text, in which the markers are blanked so that every
/// column stays where it was, and the file line its first line is.
struct Document {
    text: String,
    first_line: usize,
}

impl Document {
    /// `error` with its line moved from the document's numbering to the file's.
    fn in_file(&self, mut error: ConfigError) -> ConfigError {
        error.line = error.line.map(|line| line + self.first_line - 1);
        error
    }

    fn is_empty(&self) -> bool {
        self.text.lines().all(|line| {
            let line = line.trim();
            line.is_empty() || line.starts_with('#')
        })
    }
}

fn split(yaml: &str) -> Vec<Document> {
    let mut documents = vec![Document {
        text: String::new(),
        first_line: 1,
    }];
    for (index, line) in yaml.split_inclusive('\n').enumerate() {
        let starts = is_marker(line, "---");
        if starts {
            documents.push(Document {
                text: String::new(),
                first_line: index + 1,
            });
        }
        let text = &mut documents.last_mut().expect("one at least").text;
        if starts || is_marker(line, "...") {
            text.push_str("   ");
            text.push_str(&line[3..]);
        } else {
            text.push_str(line);
        }
    }
    documents.retain(|d| !d.is_empty());
    documents
}

/// An Istio object of the stream, read into JSON.
struct Object {
    kind: &'static str,
    name: String,
    spec: Map<String, Value>,
    document: usize,
}

impl Object {
    fn id(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// The error for `path` (below the object, e.g. `spec.hosts`) of `object`, with its line.
fn at(
    documents: &[Document],
    document: usize,
    object: &str,
    path: &str,
    kind: ConfigErrorKind,
) -> ConfigError {
    let doc = &documents[document];
    let steps = steps_of(path);
    let line = line_of(&doc.text, &steps).map(|line| line + doc.first_line - 1);
    ConfigError {
        path: match (object.is_empty(), path.is_empty()) {
            (_, true) => object.to_owned(),
            (true, false) => path.to_owned(),
            (false, false) => format!("{object}.{path}"),
        },
        line,
        kind,
    }
}

fn refused(field: &str, reason: &str) -> ConfigErrorKind {
    ConfigErrorKind::Decode {
        message: format!("{field} is not supported by detour: {reason}"),
    }
}

fn decode(message: impl Into<String>) -> ConfigErrorKind {
    ConfigErrorKind::Decode {
        message: message.into(),
    }
}

/// A step of a path found at run time (an error's), for [`line_of`].
enum PathStep {
    Key(String),
    Index(usize),
}

impl super::TargetStep for PathStep {
    fn matches(&self, step: &super::Step) -> bool {
        match (step, self) {
            (super::Step::Key(key), Self::Key(wanted)) => key == wanted,
            (super::Step::Index(index), Self::Index(wanted)) => index == wanted,
            _ => false,
        }
    }
}

/// A path as written (`spec.endpoints[0].ports`) as the steps [`line_of`] walks.
fn steps_of(path: &str) -> Vec<PathStep> {
    let mut steps = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            steps.push(PathStep::Key(key.to_owned()));
        }
        while let (Some(open), Some(close)) = (rest.find('['), rest.find(']')) {
            if let Ok(index) = rest[open + 1..close].parse() {
                steps.push(PathStep::Index(index));
            }
            rest = &rest[close + 1..];
        }
    }
    steps
}

/// Reads a stream of detour and Istio documents.
pub(super) fn parse_stream(yaml: &str, options: &ParseOptions) -> Result<Config, ConfigError> {
    let documents = split(yaml);
    if documents.is_empty() {
        return Err(ConfigError {
            path: String::new(),
            line: None,
            kind: ConfigErrorKind::Empty,
        });
    }
    let mut native: Option<(usize, RawConfig)> = None;
    let mut objects: Vec<Object> = Vec::new();
    for (index, document) in documents.iter().enumerate() {
        let mut error_path = None;
        let value: Value = serde_saphyr::with_deserializer_from_str_with_options(
            &document.text,
            yaml_options(),
            |de| {
                serde_path_to_error::deserialize(de).map_err(|error| {
                    error_path = Some(error.path().clone());
                    error.into_inner()
                })
            },
        )
        .map_err(|error| {
            document.in_file(syntax_error(&document.text, error_path.as_ref(), &error))
        })?;
        let Value::Object(mut fields) = value else {
            return Err(document.in_file(ConfigError {
                path: String::new(),
                line: Some(1),
                kind: decode(
                    "a document must be a mapping: a detour configuration or an Istio object",
                ),
            }));
        };
        if !fields.contains_key("kind") && !fields.contains_key("apiVersion") {
            if let Some((first, _)) = native {
                return Err(document.in_file(ConfigError {
                    path: String::new(),
                    line: Some(1),
                    kind: decode(format!(
                        "a second detour document (the first starts at line {}): keep `node` \
                         and `services` in one",
                        documents[first].first_line
                    )),
                }));
            }
            let raw = super::raw_config(&document.text).map_err(|e| document.in_file(e))?;
            native = Some((index, raw));
            continue;
        }
        objects.push(object(&documents, index, &mut fields)?);
    }
    let (native_index, raw) = match native {
        Some((index, raw)) => (Some(index), raw),
        None => (
            None,
            RawConfig {
                node: None,
                services: None,
            },
        ),
    };
    let mut services = raw.services.unwrap_or_default();
    let native_count = services.len();
    // Which object each service after the file's own came from.
    let mut origins: Vec<(usize, Option<usize>)> = Vec::new();
    let rules = destination_rules(&documents, &objects)?;
    for (at, entry) in objects.iter().enumerate() {
        if entry.kind != "ServiceEntry" {
            continue;
        }
        let rule = hosts_of(&entry.spec)
            .iter()
            .find_map(|host| rules.get(host.as_str()).copied());
        let service = service_json(entry, rule.map(|r| &objects[r]));
        let raw_service: RawService =
            serde_path_to_error::deserialize(service).map_err(|error| {
                let path = error.path().to_string();
                let kind = decode(error.into_inner().to_string());
                object_error(&documents, &objects, at, rule, &path, kind)
            })?;
        services.push(raw_service);
        origins.push((at, rule));
    }
    if services.is_empty() {
        return Err(ConfigError {
            path: "services".to_owned(),
            line: None,
            kind: ConfigErrorKind::MissingServices,
        });
    }
    let native_text = native_index.map_or("", |i| documents[i].text.as_str());
    let validator = Validator {
        yaml: native_text,
        vip_range: options.vip_range,
    };
    validator
        .config(RawConfig {
            node: raw.node,
            services: Some(services),
        })
        .map_err(|error| {
            // `services[N]...`: the file's own, or an object's.
            let index = error
                .path
                .strip_prefix("services[")
                .and_then(|rest| rest.split_once(']'))
                .and_then(|(n, rest)| Some((n.parse::<usize>().ok()?, rest)));
            match index {
                Some((n, rest)) if n >= native_count => {
                    let (entry, rule) = origins[n - native_count];
                    let rest = rest.strip_prefix('.').unwrap_or(rest);
                    object_error(&documents, &objects, entry, rule, rest, error.kind)
                }
                _ => match native_index {
                    Some(i) => documents[i].in_file(error),
                    None => error,
                },
            }
        })
}

/// An error at `path` of the service made of ServiceEntry `entry` and DestinationRule
/// `rule`, given the path and line of the object field it came from.
fn object_error(
    documents: &[Document],
    objects: &[Object],
    entry: usize,
    rule: Option<usize>,
    path: &str,
    kind: ConfigErrorKind,
) -> ConfigError {
    let (field, rest) = match path.find(['.', '[']) {
        Some(at) => path.split_at(at),
        None => (path, ""),
    };
    let (object, path) = match (field, rule) {
        ("localityLbSetting", Some(rule)) => (
            rule,
            format!("spec.trafficPolicy.loadBalancer.localityLbSetting{rest}"),
        ),
        ("outlierDetection", Some(rule)) => {
            (rule, format!("spec.trafficPolicy.outlierDetection{rest}"))
        }
        ("tls", Some(rule)) => (rule, format!("spec.trafficPolicy.tls{rest}")),
        ("vips", _) => (entry, format!("spec.addresses{rest}")),
        ("name", _) => (entry, "metadata.name".to_owned()),
        ("", _) => (entry, "spec".to_owned()),
        (_, _) => (entry, format!("spec.{path}")),
    };
    let object_ref = &objects[object];
    at(
        documents,
        object_ref.document,
        &object_ref.id(),
        &path,
        kind,
    )
}

/// Checks an Istio object's frame (`apiVersion`, `kind`, `metadata.name`, `spec`) and
/// the fields detour refuses; the rest is checked as a service.
fn object(
    documents: &[Document],
    index: usize,
    fields: &mut Map<String, Value>,
) -> Result<Object, ConfigError> {
    let error = |path: &str, kind| at(documents, index, "", path, kind);
    let text = |value: Option<&Value>| value.and_then(Value::as_str).map(str::to_owned);
    let api_version = text(fields.get("apiVersion")).unwrap_or_default();
    if !API_VERSIONS.contains(&api_version.as_str()) {
        return Err(error(
            "apiVersion",
            decode(format!(
                "apiVersion {api_version:?} is not one detour reads: {}",
                API_VERSIONS.join(", ")
            )),
        ));
    }
    let kind = match text(fields.get("kind")).as_deref() {
        Some("ServiceEntry") => "ServiceEntry",
        Some("DestinationRule") => "DestinationRule",
        other => {
            return Err(error(
                "kind",
                decode(format!(
                    "kind {:?} is not read by detour: a file holds ServiceEntry and \
                     DestinationRule objects beside its own document",
                    other.unwrap_or("")
                )),
            ))
        }
    };
    let name = fields
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Err(error("metadata", decode("metadata.name is missing")));
    };
    let name = match fields
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(namespace) => format!("{name}.{namespace}"),
        None => name,
    };
    let id = format!("{kind}/{name}");
    let error = |path: &str, kind| at(documents, index, &id, path, kind);
    if let Some(key) = fields
        .keys()
        .find(|k| !["apiVersion", "kind", "metadata", "spec", "status"].contains(&k.as_str()))
    {
        return Err(error(key, decode(format!("unknown field `{key}`"))));
    }
    let Some(Value::Object(spec)) = fields.remove("spec") else {
        return Err(error("spec", decode("spec is missing or not a mapping")));
    };
    let object = Object {
        kind,
        name,
        spec,
        document: index,
    };
    let refusals: &[(&str, &str)] = match kind {
        "ServiceEntry" => &[
            ("spec.exportTo", "every service the agent reads serves the whole node"),
            ("spec.workloadSelector", "endpoints from Kubernetes workloads come from a FailoverService"),
            ("spec.subjectAltNames", "detour checks the certificate against the server name (SNI), not a list of alternative names"),
        ],
        _ => &[
            ("spec.subsets", "detour fails over between endpoints, not subsets"),
            ("spec.exportTo", "every service the agent reads serves the whole node"),
            ("spec.workloadSelector", "a rule applies to every connection on the node"),
            ("spec.trafficPolicy.connectionPool", "detour adds no proxy to hold a pool in"),
            ("spec.trafficPolicy.portLevelSettings", "the policy is per service, for every port"),
            ("spec.trafficPolicy.tunnel", "detour connects to endpoints directly"),
            ("spec.trafficPolicy.proxyProtocol", "detour adds no proxy to send it"),
            ("spec.trafficPolicy.loadBalancer.consistentHash", "a backend is picked per connection at random, by weight"),
            ("spec.trafficPolicy.loadBalancer.warmupDurationSecs", "a backend takes its share at once"),
            ("spec.trafficPolicy.loadBalancer.localityLbSetting.distribute", "detour fills tiers in order (failover), it does not split traffic by weight across localities"),
        ],
    };
    for (path, reason) in refusals {
        if lookup(&object.spec, path.trim_start_matches("spec.")).is_some() {
            return Err(error(
                path,
                refused(path.rsplit('.').next().unwrap_or(path), reason),
            ));
        }
    }
    let known: &[(&str, &[&str])] = match kind {
        "ServiceEntry" => &[(
            "",
            &[
                "hosts",
                "addresses",
                "ports",
                "resolution",
                "endpoints",
                "location",
            ],
        )],
        _ => &[
            ("", &["host", "trafficPolicy"]),
            (
                "trafficPolicy",
                &["loadBalancer", "outlierDetection", "tls"],
            ),
            (
                "trafficPolicy.loadBalancer",
                &["simple", "localityLbSetting"],
            ),
        ],
    };
    for (under, keys) in known {
        let fields = if under.is_empty() {
            Some(&object.spec)
        } else {
            lookup(&object.spec, under).and_then(Value::as_object)
        };
        if let Some(key) = fields.and_then(|f| f.keys().find(|k| !keys.contains(&k.as_str()))) {
            let path = if under.is_empty() {
                format!("spec.{key}")
            } else {
                format!("spec.{under}.{key}")
            };
            return Err(error(
                &path,
                decode(format!(
                    "unknown field `{key}`, expected one of `{}`",
                    keys.join("`, `")
                )),
            ));
        }
    }
    if kind == "ServiceEntry" {
        for (i, endpoint) in object
            .spec
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            for (field, reason) in [
                (
                    "network",
                    "every endpoint is reached directly from the node",
                ),
                ("serviceAccount", "detour does not originate mTLS"),
            ] {
                if endpoint.get(field).is_some() {
                    let path = format!("spec.endpoints[{i}].{field}");
                    return Err(error(&path, refused(field, reason)));
                }
            }
        }
        match object.spec.get("location").map(|l| l.as_str()) {
            None | Some(Some("MESH_EXTERNAL" | "MESH_INTERNAL")) => {}
            Some(_) => {
                return Err(error(
                    "spec.location",
                    decode("location must be MESH_EXTERNAL or MESH_INTERNAL"),
                ))
            }
        }
    } else {
        match lookup(&object.spec, "trafficPolicy.loadBalancer.simple").map(|s| s.as_str()) {
            None | Some(Some("ROUND_ROBIN" | "RANDOM" | "UNSPECIFIED")) => {}
            Some(other) => {
                return Err(error(
                    "spec.trafficPolicy.loadBalancer.simple",
                    refused(
                        &format!("simple {}", other.unwrap_or("?")),
                        "detour picks a backend per connection at random, by weight \
                         (ROUND_ROBIN, RANDOM and UNSPECIFIED come to that at connect time)",
                    ),
                ))
            }
        }
        if !object.spec.get("host").is_some_and(Value::is_string) {
            return Err(error("spec.host", decode("host is missing")));
        }
    }
    Ok(object)
}

fn lookup<'a>(spec: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut value = spec.get(parts.next()?)?;
    for part in parts {
        value = value.get(part)?;
    }
    Some(value)
}

fn hosts_of(spec: &Map<String, Value>) -> Vec<String> {
    spec.get("hosts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .collect()
}

/// Each DestinationRule by the host it names, checked to be one ServiceEntry's.
fn destination_rules(
    documents: &[Document],
    objects: &[Object],
) -> Result<HashMap<String, usize>, ConfigError> {
    let hosts: HashMap<String, usize> = objects
        .iter()
        .enumerate()
        .filter(|(_, o)| o.kind == "ServiceEntry")
        .flat_map(|(at, o)| hosts_of(&o.spec).into_iter().map(move |h| (h, at)))
        .collect();
    let mut rules: HashMap<String, usize> = HashMap::new();
    for (at, rule) in objects.iter().enumerate() {
        if rule.kind != "DestinationRule" {
            continue;
        }
        let host = rule.spec["host"]
            .as_str()
            .unwrap_or_default()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let error = |kind| at_error(documents, rule, "spec.host", kind);
        let Some(&entry) = hosts.get(&host) else {
            return Err(error(decode(format!(
                "host {host:?} is not a host of any ServiceEntry in this file"
            ))));
        };
        if let Some(other) = hosts_of(&objects[entry].spec)
            .iter()
            .find_map(|h| rules.get(h))
        {
            return Err(error(decode(format!(
                "{} already gives {}'s traffic policy",
                objects[*other].id(),
                objects[entry].id()
            ))));
        }
        rules.insert(host, at);
    }
    Ok(rules)
}

fn at_error(
    documents: &[Document],
    object: &Object,
    path: &str,
    kind: ConfigErrorKind,
) -> ConfigError {
    at(documents, object.document, &object.id(), path, kind)
}

/// The service, in the file's schema, that ServiceEntry `entry` and its rule give.
fn service_json(entry: &Object, rule: Option<&Object>) -> Value {
    let mut service = Map::new();
    service.insert("name".into(), json!(entry.name));
    for (from, to) in [
        ("hosts", "hosts"),
        ("addresses", "vips"),
        ("ports", "ports"),
        ("resolution", "resolution"),
        ("endpoints", "endpoints"),
    ] {
        if let Some(value) = entry.spec.get(from) {
            service.insert(to.into(), value.clone());
        }
    }
    if let Some(rule) = rule {
        if let Some(Value::Object(policy)) = rule.spec.get("trafficPolicy") {
            if let Some(setting) = policy
                .get("loadBalancer")
                .and_then(|lb| lb.get("localityLbSetting"))
            {
                service.insert("localityLbSetting".into(), setting.clone());
            }
            if let Some(outlier) = policy.get("outlierDetection") {
                service.insert("outlierDetection".into(), outlier.clone());
            }
            if let Some(tls) = policy.get("tls") {
                service.insert("tls".into(), tls.clone());
            }
        }
    }
    Value::Object(service)
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use std::time::Duration;

    const SEED: &str = include_str!("../../../docs/examples/seed-dns.yaml");
    const SEED_PORT_81: &str = include_str!("../../../docs/examples/seed-dns-port81.yaml");
    const SEED_HTTPS: &str = include_str!("../../../docs/examples/seed-https.yaml");

    fn refused(yaml: &str) -> String {
        match parse(yaml) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn the_seeds_documents_load_as_written() {
        let config = parse(SEED).unwrap();
        assert_eq!(config.services.len(), 1);
        let mydb = &config.services[0];
        assert_eq!(mydb.name, "external-svc-dns");
        assert_eq!(mydb.hosts, ["mydb.com"]);
        assert_eq!(mydb.vips.len(), 1, "allocated: {:?}", mydb.vips);
        assert_eq!(mydb.ports[0].number, 80);
        assert_eq!(mydb.ports[0].name, "http");
        assert!(mydb.endpoints.is_empty());
        let names: Vec<&str> = mydb.named_endpoints.iter().map(|n| &*n.hostname).collect();
        assert_eq!(
            names,
            [
                "dynamodb.us-east-1.amazonaws.com",
                "dynamodb.us-west-1.amazonaws.com"
            ]
        );
        assert_eq!(
            mydb.named_endpoints[0].template.locality.to_string(),
            "us-east1"
        );
        assert_eq!(
            mydb.named_endpoints[0].template.port_for(&mydb.ports[0]),
            80
        );
        let settings = mydb.outlier_detection.policy.settings();
        assert_eq!(settings.consecutive_failures, 1);
        assert_eq!(settings.interval, Duration::from_secs(15));
        assert_eq!(settings.base_ejection_time, Duration::from_secs(60));
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());

        let bad_port = parse(SEED_PORT_81).unwrap();
        let east = &bad_port.services[0].named_endpoints[0];
        assert_eq!(east.template.port_for(&bad_port.services[0].ports[0]), 81);
    }

    #[test]
    fn the_https_variant_originates_tls() {
        let config = parse(SEED_HTTPS).unwrap();
        let mydb = &config.services[0];
        assert_eq!(mydb.tls, Some(crate::config::TlsOrigination::default()));
        assert_eq!(mydb.ports[0].target_port, Some(443));
        let with = |tls: &str| SEED_HTTPS.replace("      mode: SIMPLE\n", tls);
        let sni = parse(&with(
            "      mode: SIMPLE\n      sni: db.example\n      caCertificates: /etc/db/ca.pem\n",
        ))
        .unwrap();
        assert_eq!(
            sni.services[0].tls,
            Some(crate::config::TlsOrigination {
                sni: Some("db.example".into()),
                ca_certificates: Some("/etc/db/ca.pem".into()),
            })
        );
        assert_eq!(
            parse(&with("      mode: DISABLE\n")).unwrap().services[0].tls,
            None
        );
        assert_eq!(
            refused(&with("      mode: MUTUAL\n")),
            "DestinationRule/mydynamodb.spec.trafficPolicy.tls.mode (line 30): MUTUAL is not \
             supported: detour verifies the server's certificate but presents none of its own \
             (use SIMPLE)"
        );
        assert_eq!(
            refused(&with(
                "      mode: SIMPLE\n      insecureSkipVerify: true\n"
            )),
            "DestinationRule/mydynamodb.spec.trafficPolicy.tls.insecureSkipVerify (line 31): \
             unknown field `insecureSkipVerify`, expected one of `mode`, `sni`, `caCertificates`"
        );
        assert_eq!(
            refused(&with("      mode: SIMPLE\n      caCertificates: ca.pem\n")),
            "DestinationRule/mydynamodb.spec.trafficPolicy.tls.caCertificates (line 31): \
             \"ca.pem\" is not an absolute path: give the CA file's full path"
        );
    }

    #[test]
    fn a_detour_document_beside_them_gives_the_node_and_more_services() {
        let yaml = format!(
            "node: {{locality: us-east1}}\nservices:\n- name: local\n  vips: [10.9.0.9]\n  ports: [{{number: 80}}]\n  endpoints: [{{address: 127.0.0.1}}]\n---\n{}",
            SEED
        );
        let config = parse(&yaml).unwrap();
        assert_eq!(config.node.locality.to_string(), "us-east1");
        let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["local", "external-svc-dns"]);
        assert_eq!(config.services[1].named_endpoints.len(), 2);
        // A second detour document is one too many.
        let two = format!("node: {{locality: a}}\n---\nnode: {{locality: b}}\n---\n{SEED}");
        assert_eq!(
            refused(&two),
            "line 2: a second detour document (the first starts at line 1): keep `node` and \
             `services` in one"
        );
    }

    #[test]
    fn the_destination_rule_gives_the_locality_policy() {
        let https = SEED_HTTPS.replace("    tls:\n      mode: SIMPLE\n", "");
        let config = parse(&https).unwrap();
        let mydb = &config.services[0];
        assert_eq!(mydb.ports[0].target_port, Some(443));
        assert_eq!(mydb.locality_lb.failover.len(), 1);
        assert_eq!(mydb.locality_lb.failover[0].from.to_string(), "us-east1");
        assert_eq!(mydb.locality_lb.failover[0].to.to_string(), "us-west");
        assert!(matches!(mydb.named_endpoints.len(), 2));
        assert_eq!(
            crate::config::parse(&SEED.replace("resolution: DNS", "resolution: STATIC"))
                .unwrap_err()
                .to_string(),
            "ServiceEntry/external-svc-dns.spec.endpoints[0].address (line 19): \
             \"dynamodb.us-east-1.amazonaws.com\" is a DNS name, and this service's resolution \
             is STATIC (IP addresses only): set `resolution: DNS` on the service to resolve it"
        );
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
    }

    #[test]
    fn what_detour_does_not_do_is_refused_with_its_path_and_why() {
        let cases = [
            (
                SEED.replace("  location: MESH_EXTERNAL\n", "  location: MESH_EXTERNAL\n  exportTo: [\".\"]\n"),
                "ServiceEntry/external-svc-dns.spec.exportTo (line 13): exportTo is not \
                 supported by detour: every service the agent reads serves the whole node",
            ),
            (
                SEED.replace("    locality: us-west\n", "    locality: us-west\n    network: n2\n"),
                "ServiceEntry/external-svc-dns.spec.endpoints[1].network (line 25): network is \
                 not supported by detour: every endpoint is reached directly from the node",
            ),
            (
                SEED.replace("  trafficPolicy:\n", "  subsets: [{name: v1}]\n  trafficPolicy:\n"),
                "DestinationRule/mydynamodb.spec.subsets (line 34): subsets is not supported by \
                 detour: detour fails over between endpoints, not subsets",
            ),
            (
                SEED.replace("  trafficPolicy:\n", "  trafficPolicy:\n    loadBalancer: {simple: LEAST_REQUEST}\n"),
                "DestinationRule/mydynamodb.spec.trafficPolicy.loadBalancer.simple (line 35): \
                 simple LEAST_REQUEST is not supported by detour: detour picks a backend per \
                 connection at random, by weight (ROUND_ROBIN, RANDOM and UNSPECIFIED come to \
                 that at connect time)",
            ),
            (
                SEED.replace("      interval: 15s\n", "      interval: 15s\n      consecutiveGatewayErrors: 2\n"),
                "DestinationRule/mydynamodb.spec.trafficPolicy.outlierDetection.\
                 consecutiveGatewayErrors (line 38): consecutiveGatewayErrors counts HTTP \
                 502/503/504 responses, which detour, working at connect time, cannot see; use \
                 consecutiveErrors, which counts failed connections",
            ),
            (
                SEED.replace("  host: mydb.com\n", "  host: other.com\n"),
                "DestinationRule/mydynamodb.spec.host (line 33): host \"other.com\" is not a host \
                 of any ServiceEntry in this file",
            ),
            (
                SEED.replace("kind: DestinationRule", "kind: VirtualService"),
                "kind (line 29): kind \"VirtualService\" is not read by detour: a file holds \
                 ServiceEntry and DestinationRule objects beside its own document",
            ),
            (
                SEED.replace("apiVersion: networking.istio.io/v1beta1\nkind: Dest", "apiVersion: networking.istio.io/v2\nkind: Dest"),
                "apiVersion (line 28): apiVersion \"networking.istio.io/v2\" is not one detour \
                 reads: networking.istio.io/v1, networking.istio.io/v1beta1, \
                 networking.istio.io/v1alpha3",
            ),
            (
                SEED.replace("    protocol: HTTP\n", "    protocol: HTTP\n    color: red\n"),
                "ServiceEntry/external-svc-dns.spec.ports[0].color (line 17): unknown field `color`, \
                 expected one of `number`, `name`, `targetPort`, `protocol`",
            ),
            (
                SEED.replace("      http: 80\n  - address: dynamodb.us-west-1", "      http: 0\n  - address: dynamodb.us-west-1"),
                "ServiceEntry/external-svc-dns.spec.endpoints[0].ports.http (line 22): invalid \
                 value: integer `0`, expected a port number from 1 to 65535",
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(refused(&yaml), want, "{yaml}");
        }
    }
}
