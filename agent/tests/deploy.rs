//! `deploy/` as it ships: the Helm chart, the plain manifests rendered from it, and what
//! they grant, checked against a real API server.
//!
//! - The chart's templates are plain value substitutions (`{{ .Values.a.b }}`,
//!   `{{ .Release.Namespace }}`; no functions, no control flow: no `helm` binary exists
//!   where this runs). [`render`] is that subset of Helm; `deploy/manifests/` must be the
//!   chart rendered with its default values. When a template or a value changes,
//!   regenerate with `DETOUR_WRITE_MANIFESTS=1 cargo test -p detour-agent --test deploy
//!   chart`.
//! - Every Kubernetes object under `deploy/` parses into its k8s-openapi type, with no
//!   field the type does not know (a misspelt field would otherwise be dropped quietly);
//!   an unknown kind fails.
//! - Against a real kube-apiserver (`KUBEBUILDER_ASSETS`, as the other Kubernetes tests):
//!   every object applies with a server-side dry run and strict field validation, then for
//!   real; the pods of the DaemonSet and the Deployment pass admission in the namespace as
//!   shipped (Pod Security, priority class, service account); SubjectAccessReviews show
//!   that each ServiceAccount may do what its binary does and not more; and the real
//!   `detour controller` binary, authenticated with its own ServiceAccount's token and
//!   reading a second cluster with the remote-reader's token, mirrors that cluster's
//!   endpoints, creates the VIP Service and writes status; the real agent, with the
//!   agent account's token, serves that FailoverService — the RBAC works, not only
//!   parses.
//! - The agent's capabilities (needs root, as the end-to-end tests): the real agent, run
//!   with exactly the DaemonSet's added capabilities (setpriv's bounding set) against a
//!   test cgroup, destroys the socket a client of another user in its own network
//!   namespace has to a removed backend; with any one of them left out it does not (or
//!   does not start) — a capability granted but not needed fails the test.
//!
//! Each cluster test is bounded by [`TEST_BOUND`]; every wait by [`EVENTUALLY`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use detour_testbed::k8s::Cluster;
use detour_testbed::{Agent, AgentOptions, Cgroup, PinDir, TempDir};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// The `deploy/` directory.
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// The chart, relative to [`DEPLOY`].
const CHART: &str = "helm/detour";
/// Where the rendered chart goes, relative to [`DEPLOY`].
const MANIFESTS: &str = "manifests";
/// The namespace the plain manifests are rendered for (`.Release.Namespace`).
const NAMESPACE: &str = "detour-system";
/// Set to write `deploy/manifests/` from the chart instead of comparing.
const WRITE_ENV: &str = "DETOUR_WRITE_MANIFESTS";
/// The first line of every generated manifest.
const GENERATED: &str = "# Generated from deploy/helm/detour/templates/";
const FIELD_MANAGER: &str = "detour-deploy-test";
const EVENTUALLY: Duration = Duration::from_secs(60);
const TEST_BOUND: Duration = Duration::from_secs(300);

// ---- the chart -------------------------------------------------------------------------

/// Why a template does not render.
#[derive(Debug, thiserror::Error)]
enum RenderError {
    #[error("line {line}: `{{{{` without a closing `}}}}`")]
    Unclosed { line: usize },
    #[error("line {line}: `{{{{{expr}}}}}` is not a plain value substitution (only `.Values.a.b` and `.Release.Namespace`: the chart must render without helm)")]
    NotASubstitution { line: usize, expr: String },
    #[error("line {line}: `{path}` is not in values.yaml")]
    Missing { line: usize, path: String },
    #[error("line {line}: `{path}` is a list or map; templates substitute scalars only")]
    NotScalar { line: usize, path: String },
}

/// Renders `template` as Helm would with `values`, for the substitution-only subset.
fn render(template: &str, values: &Value, namespace: &str) -> Result<String, RenderError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let line = template[..template.len() - rest.len() + start]
            .matches('\n')
            .count()
            + 1;
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(RenderError::Unclosed { line })?;
        let expr = after[..end].trim();
        let text = if expr == ".Release.Namespace" {
            namespace.to_owned()
        } else if let Some(path) = expr
            .strip_prefix(".Values.")
            .filter(|p| !p.is_empty() && p.split('.').all(is_identifier))
        {
            let found = path
                .split('.')
                .try_fold(values, |v, key| v.get(key))
                .ok_or_else(|| RenderError::Missing {
                    line,
                    path: expr.to_owned(),
                })?;
            match found {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Null | Value::Array(_) | Value::Object(_) => {
                    return Err(RenderError::NotScalar {
                        line,
                        path: expr.to_owned(),
                    })
                }
            }
        } else {
            return Err(RenderError::NotASubstitution {
                line,
                expr: after[..end].to_owned(),
            });
        };
        out.push_str(&text);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The chart's default values.
fn chart_values() -> Result<Value> {
    let path = Path::new(DEPLOY).join(CHART).join("values.yaml");
    let text = read(&path)?;
    serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `(manifest file name, rendered contents)` for every template, in name order.
fn rendered_chart() -> Result<Vec<(String, String)>> {
    let values = chart_values()?;
    let templates = Path::new(DEPLOY).join(CHART).join("templates");
    let mut out = Vec::new();
    for path in yaml_files(&templates)? {
        let name = file_name(&path);
        let body = render(&read(&path)?, &values, NAMESPACE)
            .with_context(|| format!("rendering {}", path.display()))?;
        out.push((
            name.clone(),
            format!(
                "{GENERATED}{name} with the chart's default values\n\
                 # by agent/tests/deploy.rs ({WRITE_ENV}=1 cargo test -p detour-agent --test deploy chart).\n\
                 # Do not edit: change the template or values.yaml and regenerate.\n{body}"
            ),
        ));
    }
    ensure!(!out.is_empty(), "no templates in {}", templates.display());
    Ok(out)
}

#[test]
fn chart_renders_to_the_plain_manifests() -> Result<()> {
    let dir = Path::new(DEPLOY).join(MANIFESTS);
    let rendered = rendered_chart()?;
    if std::env::var_os(WRITE_ENV).is_some() {
        for (name, contents) in &rendered {
            std::fs::write(dir.join(name), contents)
                .with_context(|| format!("writing {}", dir.join(name).display()))?;
        }
    }
    let mut stale = Vec::new();
    for (name, contents) in &rendered {
        if std::fs::read_to_string(dir.join(name)).ok().as_deref() != Some(contents.as_str()) {
            stale.push(name.clone());
        }
    }
    // A generated manifest whose template is gone is stale too.
    for path in yaml_files(&dir)? {
        let name = file_name(&path);
        if read(&path)?.starts_with(GENERATED) && !rendered.iter().any(|(n, _)| *n == name) {
            stale.push(format!("{name} (its template is gone: delete it)"));
        }
    }
    ensure!(
        stale.is_empty(),
        "deploy/manifests/ is not the chart rendered with its default values: {stale:?}; \
         run `{WRITE_ENV}=1 cargo test -p detour-agent --test deploy chart`"
    );
    // Helm installs the chart's crds/ as they are: the same CRD the types generate.
    let crd = read(&Path::new(DEPLOY).join("crds/failoverservice.yaml"))?;
    let chart_crd = read(
        &Path::new(DEPLOY)
            .join(CHART)
            .join("crds/failoverservice.yaml"),
    )?;
    ensure!(
        crd == chart_crd,
        "deploy/helm/detour/crds/failoverservice.yaml differs from deploy/crds/"
    );
    Ok(())
}

#[test]
fn render_substitutes_values_and_refuses_anything_else() {
    let values = json!({"a": {"b": "x", "n": 2, "t": true, "list": [1]}});
    assert_eq!(
        render(
            "k: {{ .Values.a.b }}/{{.Values.a.n}} {{ .Values.a.t }} ns={{ .Release.Namespace }}",
            &values,
            "ns1"
        )
        .unwrap(),
        "k: x/2 true ns=ns1"
    );
    for (template, wanted) in [
        ("{{ .Values.a.c }}", "not in values.yaml"),
        ("{{ .Values.a.list }}", "scalars only"),
        ("{{ toYaml .Values.a }}", "not a plain value substitution"),
        ("{{- if .Values.a.t }}", "not a plain value substitution"),
        ("x\n{{ .Values.a.b", "line 2"),
    ] {
        let error = render(template, &values, "ns1").unwrap_err().to_string();
        assert!(error.contains(wanted), "{template}: {error}");
    }
}

// ---- every object parses -----------------------------------------------------------------

/// Every YAML file under `deploy/` that holds Kubernetes objects: all but the chart's
/// own files (Chart.yaml, values.yaml) and its templates (checked rendered, above).
fn object_files() -> Result<Vec<PathBuf>> {
    let chart = Path::new(DEPLOY).join(CHART);
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::from(DEPLOY)];
    while let Some(dir) = dirs.pop() {
        if dir == chart.join("templates") {
            continue;
        }
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && path != chart.join("Chart.yaml")
                && path != chart.join("values.yaml")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The documents of a YAML file (empty ones, e.g. a comment before `---`, left out).
fn documents(path: &Path) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(&read(path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Parses `doc` into its k8s-openapi type; returns `apiVersion/kind name`.
fn parse_typed(doc: &Value) -> Result<String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let what = format!("{api_version}/{kind} {name}");
    match (api_version, kind) {
        ("v1", "Namespace") => roundtrip::<Namespace>(doc),
        ("v1", "ServiceAccount") => roundtrip::<ServiceAccount>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => roundtrip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            roundtrip::<ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => roundtrip::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => roundtrip::<RoleBinding>(doc),
        ("apps/v1", "DaemonSet") => roundtrip::<DaemonSet>(doc),
        ("apps/v1", "Deployment") => roundtrip::<Deployment>(doc),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            roundtrip::<CustomResourceDefinition>(doc)
        }
        _ => Err(anyhow!(
            "unknown kind: this test parses no {api_version}/{kind}; add its type"
        )),
    }
    .with_context(|| what.clone())?;
    ensure!(!name.is_empty(), "{what}: no metadata.name");
    Ok(what)
}

/// Deserializes `doc` as `T` (failing with the field's path) and serializes it back: a
/// field `T` does not know is missing from the result, and named.
fn roundtrip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<()> {
    let typed: T = serde_path_to_error::deserialize(doc.clone())
        .map_err(|e| anyhow!("at {}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&typed)?;
    match first_unknown(doc, &back, "") {
        Some(path) => bail!("{path}: not a field of this kind (misspelt or misplaced?)"),
        None => Ok(()),
    }
}

/// The path of the first value of `original` that `back` lacks or holds differently.
fn first_unknown(original: &Value, back: &Value, path: &str) -> Option<String> {
    match (original, back) {
        (Value::Object(o), Value::Object(b)) => o.iter().find_map(|(key, value)| {
            let path = format!("{path}.{key}");
            match b.get(key) {
                Some(other) => first_unknown(value, other, &path),
                None => Some(path),
            }
        }),
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            o.iter().zip(b).enumerate().find_map(|(i, (value, other))| {
                first_unknown(value, other, &format!("{path}[{i}]"))
            })
        }
        _ => (original != back).then(|| format!("{path} (read back as {back})")),
    }
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() -> Result<()> {
    let files = object_files()?;
    let mut kinds = BTreeMap::<String, usize>::new();
    for path in &files {
        for doc in documents(path)? {
            let what = parse_typed(&doc).with_context(|| path.display().to_string())?;
            let kind = what.split(' ').next().unwrap_or_default().to_owned();
            *kinds.entry(kind).or_default() += 1;
        }
    }
    // What deploy/ must hold, at least: the test fails if a manifest goes missing.
    for kind in [
        "v1/Namespace",
        "apiextensions.k8s.io/v1/CustomResourceDefinition",
        "apps/v1/DaemonSet",
        "apps/v1/Deployment",
        "v1/ServiceAccount",
        "rbac.authorization.k8s.io/v1/ClusterRole",
        "rbac.authorization.k8s.io/v1/ClusterRoleBinding",
        "rbac.authorization.k8s.io/v1/Role",
        "rbac.authorization.k8s.io/v1/RoleBinding",
    ] {
        ensure!(
            kinds.contains_key(kind),
            "no {kind} in deploy/ (files: {files:?})"
        );
    }
    Ok(())
}

#[test]
fn a_misspelt_field_and_an_unknown_kind_are_refused() {
    let typo = json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "namespce": "detour-system"},
    });
    let error = format!("{:#}", parse_typed(&typo).unwrap_err());
    assert!(error.contains(".metadata.namespce"), "{error}");
    let unknown = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
    let error = format!("{:#}", parse_typed(&unknown).unwrap_err());
    assert!(error.contains("unknown kind"), "{error}");
}

// ---- against a real API server -----------------------------------------------------------

/// Every object of `deploy/`, in the order `kubectl apply -f deploy/crds -f
/// deploy/manifests` takes them (the namespace first, by its file name).
/// Applies every object of `deploy/` to `cluster`: a server-side dry run with strict
/// field validation first, then for real (server-side apply).
async fn install(cluster: &Cluster) -> Result<()> {
    detour_testbed::k8s::deploy::install(&cluster.client(), Path::new(DEPLOY), FIELD_MANAGER).await
}

/// The pod template of the workload `kind/name` in `deploy/manifests`, as a Pod.
fn pod_of(kind: &str, name: &str, namespace: &str) -> Result<Pod> {
    let (_, doc) = detour_testbed::k8s::deploy::objects(Path::new(DEPLOY))?
        .into_iter()
        .find(|(_, d)| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| anyhow!("no {kind} {name} in deploy/manifests"))?;
    let mut template = doc["spec"]["template"].clone();
    template["metadata"]["name"] = json!(format!("{name}-admission-probe"));
    template["metadata"]["namespace"] = json!(namespace);
    Ok(serde_json::from_value(template)?)
}

/// Whether the admission chain accepts `pod` (a dry-run create): `Err` says why not.
async fn admits(cluster: &Cluster, pod: &Pod) -> Result<std::result::Result<(), String>> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match pods.create(&params, pod).await {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(status)) if status.code == 403 || status.code == 422 => {
            Ok(Err(status.message))
        }
        Err(e) => Err(e.into()),
    }
}

/// One access question: `verb` on `resource[/subresource]` (group `group`) in
/// `namespace` (`None`: cluster-wide), the object `name` if given.
#[derive(Debug, Clone, Copy)]
struct Access {
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: Option<&'static str>,
    name: Option<&'static str>,
}

const fn access(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: Option<&'static str>,
) -> Access {
    Access {
        verb,
        group,
        resource,
        namespace,
        name: None,
    }
}

const FOS: &str = "failover.detour.io";
const CORE: &str = "";
const DISCOVERY: &str = "discovery.k8s.io";
const LEASES: &str = "coordination.k8s.io";
const SYSTEM: Option<&str> = Some(NAMESPACE);
const APP_NS: Option<&str> = Some("default");

/// Asks the API server (SubjectAccessReview) whether `account` of [`NAMESPACE`] may.
async fn allowed(cluster: &Cluster, account: &str, access: Access) -> Result<bool> {
    let (resource, subresource) = access
        .resource
        .split_once('/')
        .map_or((access.resource, None), |(r, s)| (r, Some(s)));
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": format!("system:serviceaccount:{NAMESPACE}:{account}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{NAMESPACE}"), "system:authenticated"],
            "resourceAttributes": {
                "verb": access.verb,
                "group": access.group,
                "resource": resource,
                "subresource": subresource,
                "namespace": access.namespace,
                "name": access.name,
            },
        },
    }))?;
    let reviews: Api<SubjectAccessReview> = Api::all(cluster.client());
    let answer = reviews.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Checks every `(access, expected)` for `account`; fails naming each that differs.
async fn check_access(
    cluster: &Cluster,
    account: &str,
    expectations: &[(Access, bool)],
) -> Result<()> {
    let mut wrong = Vec::new();
    for &(access, expected) in expectations {
        if allowed(cluster, account, access).await? != expected {
            wrong.push(format!(
                "{} {}{} {} in {}: expected {}",
                access.verb,
                if access.group.is_empty() {
                    ""
                } else {
                    access.group
                },
                if access.group.is_empty() { "" } else { "/" },
                access.resource,
                access.namespace.unwrap_or("all namespaces"),
                if expected { "allowed" } else { "denied" },
            ));
        }
    }
    ensure!(wrong.is_empty(), "{account}: {wrong:#?}");
    Ok(())
}

fn verbs(
    verbs: &[&'static str],
    group: &'static str,
    resource: &'static str,
    namespace: Option<&'static str>,
    expected: bool,
) -> Vec<(Access, bool)> {
    verbs
        .iter()
        .map(|verb| (access(verb, group, resource, namespace), expected))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_applies_and_each_account_may_do_what_it_needs_and_no_more() -> Result<()> {
    bounded(async {
        let cluster = Cluster::start("kind1").await?;
        install(&cluster).await.with_context(|| cluster.logs())?;

        // The workloads' pods pass admission where they ship: Pod Security (the
        // namespace is `privileged`), the system priority classes, their accounts.
        for (kind, name) in [
            ("DaemonSet", "detour-agent"),
            ("Deployment", "detour-controller"),
        ] {
            if let Err(why) = admits(&cluster, &pod_of(kind, name, NAMESPACE)?).await? {
                bail!("{kind} {name}'s pod refused in {NAMESPACE}: {why}");
            }
        }
        // And the namespace's label is what lets the agent in: under `restricted` its
        // pod is refused for its host access, while the controller's passes.
        let namespaces: Api<Namespace> = Api::all(cluster.client());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "restricted",
                    "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}))?,
            )
            .await?;
        for account in ["detour-agent", "detour-controller"] {
            let accounts: Api<ServiceAccount> = Api::namespaced(cluster.client(), "restricted");
            accounts
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": account}}))?,
                )
                .await?;
        }
        let refused = admits(
            &cluster,
            &pod_of("DaemonSet", "detour-agent", "restricted")?,
        )
        .await?
        .err()
        .context("the agent's pod admitted under Pod Security `restricted`")?;
        for why in ["hostPID", "hostPath", "capabilities"] {
            ensure!(
                refused.contains(why),
                "refusal does not name {why}: {refused}"
            );
        }
        if let Err(why) = admits(
            &cluster,
            &pod_of("Deployment", "detour-controller", "restricted")?,
        )
        .await?
        {
            bail!("the controller's pod refused under Pod Security `restricted`: {why}");
        }

        // The agent reads, cluster-wide, what the datapath is made from; it writes
        // nothing and reads no Secret.
        let mut agent = Vec::new();
        for (group, resource) in [
            (FOS, "failoverservices"),
            (CORE, "services"),
            (DISCOVERY, "endpointslices"),
            (CORE, "nodes"),
        ] {
            agent.extend(verbs(&["list", "watch"], group, resource, None, true));
        }
        agent.extend(verbs(
            &["create", "patch", "update", "delete"],
            DISCOVERY,
            "endpointslices",
            APP_NS,
            false,
        ));
        agent.extend(verbs(
            &["create", "patch", "update", "delete"],
            DISCOVERY,
            "endpointslices",
            SYSTEM,
            false,
        ));
        agent.extend(verbs(
            &["create", "patch", "delete"],
            CORE,
            "services",
            APP_NS,
            false,
        ));
        agent.extend(verbs(
            &["patch"],
            FOS,
            "failoverservices/status",
            APP_NS,
            false,
        ));
        agent.extend(verbs(&["patch"], CORE, "nodes", None, false));
        agent.extend(verbs(&["get", "list"], CORE, "secrets", SYSTEM, false));
        agent.extend(verbs(&["create"], LEASES, "leases", SYSTEM, false));
        check_access(&cluster, "detour-agent", &agent).await?;

        // The controller: its writes, and nothing beyond them.
        let mut controller = Vec::new();
        controller.extend(verbs(
            &["list", "watch"],
            FOS,
            "failoverservices",
            None,
            true,
        ));
        controller.extend(verbs(
            &["patch"],
            FOS,
            "failoverservices/status",
            APP_NS,
            true,
        ));
        controller.extend(verbs(
            &["patch", "update", "delete"],
            FOS,
            "failoverservices",
            APP_NS,
            false,
        ));
        controller.extend(verbs(&["list", "watch"], CORE, "services", None, true));
        controller.extend(verbs(
            &["list", "watch"],
            DISCOVERY,
            "endpointslices",
            None,
            true,
        ));
        controller.extend(verbs(
            &["create", "patch", "delete"],
            CORE,
            "services",
            APP_NS,
            true,
        ));
        controller.extend(verbs(&["list", "watch"], CORE, "secrets", SYSTEM, true));
        controller.extend(verbs(
            &["get", "list", "watch"],
            CORE,
            "secrets",
            APP_NS,
            false,
        ));
        controller.extend(verbs(&["list"], CORE, "secrets", None, false));
        controller.extend(verbs(
            &["list", "watch", "create", "patch", "delete"],
            DISCOVERY,
            "endpointslices",
            SYSTEM,
            true,
        ));
        controller.extend(verbs(
            &["create", "patch", "delete"],
            DISCOVERY,
            "endpointslices",
            APP_NS,
            false,
        ));
        controller.extend(verbs(&["list"], CORE, "nodes", None, false));
        controller.extend(verbs(&["create"], LEASES, "leases", SYSTEM, true));
        controller.extend(verbs(&["create"], LEASES, "leases", APP_NS, false));
        for (name, expected) in [("detour-controller", true), ("another-lease", false)] {
            for verb in ["get", "patch"] {
                controller.push((
                    Access {
                        name: Some(name),
                        ..access(verb, LEASES, "leases", SYSTEM)
                    },
                    expected,
                ));
            }
        }
        check_access(&cluster, "detour-controller", &controller).await?;

        // What another cluster's controller reads here: Services, EndpointSlices, Nodes.
        let mut reader = Vec::new();
        for (group, resource) in [
            (CORE, "services"),
            (DISCOVERY, "endpointslices"),
            (CORE, "nodes"),
        ] {
            reader.extend(verbs(&["list", "watch"], group, resource, None, true));
            reader.extend(verbs(
                &["create", "patch", "delete"],
                group,
                resource,
                APP_NS,
                false,
            ));
        }
        reader.extend(verbs(&["get", "list"], CORE, "secrets", None, false));
        reader.extend(verbs(&["list"], FOS, "failoverservices", None, false));
        check_access(&cluster, "detour-remote-reader", &reader).await
    })
    .await
}

/// A kubeconfig for `cluster` that authenticates as `account` of [`NAMESPACE`].
async fn kubeconfig_as(cluster: &Cluster, account: &str) -> Result<String> {
    detour_testbed::k8s::deploy::kubeconfig_as(cluster, NAMESPACE, account).await
}

/// A child process killed and reaped on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_and_the_agent_work_with_the_accounts_deploy_grants() -> Result<()> {
    bounded(async {
        let clusters = Cluster::start_all(&[
            ("kind1", Default::default()),
            ("kind2", Default::default()),
        ])
        .await?;
        let [kind1, kind2] = <[Cluster; 2]>::try_from(clusters).expect("two clusters");
        // deploy/ as it ships, in both: kind1 runs the controller, kind2 grants the
        // remote reader.
        install(&kind1).await.context("kind1")?;
        install(&kind2).await.context("kind2")?;

        // kind2: `reviews` with one endpoint on a us-east1 node.
        let nodes: Api<Node> = Api::all(kind2.client());
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "n1",
                    "labels": {"topology.kubernetes.io/region": "us-east1"}}}))?,
            )
            .await?;
        let services: Api<Service> = Api::default_namespaced(kind2.client());
        services
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "reviews"},
                    "spec": {"ports": [{"name": "http", "port": 9080, "targetPort": 8080}]}}))?,
            )
            .await?;
        let slices: Api<EndpointSlice> = Api::default_namespaced(kind2.client());
        slices
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "reviews-abc", "labels": {"kubernetes.io/service-name": "reviews"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": ["10.2.0.1"], "conditions": {"ready": true}, "nodeName": "n1"}],
                }))?,
            )
            .await?;

        // kind1: the remote-cluster Secret, with the remote reader's token for kind2.
        let secrets: Api<Secret> = Api::namespaced(kind1.client(), NAMESPACE);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "remote-kind2",
                                 "labels": {"failover.detour.io/remote-cluster": "true"}},
                    "stringData": {"kind2": kubeconfig_as(&kind2, "detour-remote-reader").await?},
                }))?,
            )
            .await?;
        let fos = kube::core::ApiResource::from_gvk(&GroupVersionKind::gvk(FOS, "v1alpha1", "FailoverService"));
        let failover_services: Api<DynamicObject> =
            Api::namespaced_with(kind1.client(), "default", &fos);
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "failover.detour.io/v1alpha1", "kind": "FailoverService",
            "metadata": {"name": "reviews"},
            "spec": {
                "hostname": "reviews-failover.default.global",
                "port": {"number": 9080},
                "backingServices": [
                    {"kubeService": {"name": "reviews", "namespace": "default", "clusterName": "kind2"}},
                ],
            },
        }))?;
        eventually("the FailoverService created", || async {
            failover_services
                .patch("reviews", &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&object))
                .await?;
            Ok(Some(()))
        })
        .await?;

        // The real binary, as the Deployment runs it, with its ServiceAccount's token.
        let dir = TempDir::new()?;
        let kubeconfig = dir.join("controller.kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_as(&kind1, "detour-controller").await?)?;
        let log = dir.join("controller.log");
        let _controller = Running(
            Command::new(env!("CARGO_BIN_EXE_detour"))
                .args(["controller", "--namespace", NAMESPACE, "--cluster-name", "kind1"])
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["--lease-name", "detour-controller", "--identity", "deploy-test"])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .context("starting detour controller")?,
        );
        let log_tail = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };

        // Programmed: the remote Service listed through the reader's token, the mirror
        // and the VIP Service written, the status patched — each a grant at work.
        let programmed = eventually("FailoverService reviews Programmed", || async {
            let fos = failover_services.get("reviews").await?;
            let conditions = fos.data["status"]["conditions"].as_array().cloned().unwrap_or_default();
            Ok(conditions
                .iter()
                .any(|c| c["type"] == "Programmed" && c["status"] == "True")
                .then_some(fos))
        })
        .await
        .with_context(|| format!("controller log:\n{}", log_tail()))?;
        let vip = programmed.data["status"]["virtualIP"].as_str().unwrap_or_default().to_owned();
        let vip_services: Api<Service> = Api::default_namespaced(kind1.client());
        let vip_service = vip_services
            .get("reviews-failover")
            .await
            .with_context(|| format!("the VIP Service; controller log:\n{}", log_tail()))?;
        let cluster_ip = vip_service.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
        ensure!(!vip.is_empty() && vip == cluster_ip, "status VIP {vip:?}, Service ClusterIP {cluster_ip:?}");
        let mirrors: Api<EndpointSlice> = Api::namespaced(kind1.client(), NAMESPACE);
        let mirrored = mirrors
            .list(&kube::api::ListParams::default().labels("failover.detour.io/cluster=kind2"))
            .await?;
        let addresses: Vec<String> = mirrored
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten().flat_map(|e| e.addresses.clone()))
            .collect();
        ensure!(addresses == ["10.2.0.1"], "mirrored {addresses:?}");
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(kind1.client(), NAMESPACE);
        let holder = leases
            .get("detour-controller")
            .await?
            .spec
            .and_then(|s| s.holder_identity);
        ensure!(holder.as_deref() == Some("deploy-test"), "Lease held by {holder:?}");
        let text = std::fs::read_to_string(&log)?;
        ensure!(
            !text.contains("forbidden"),
            "the controller was refused something:\n{}",
            log_tail()
        );

        // The real agent, with the agent's token: every watch lists (nothing is served
        // before all four have), so the FailoverService reaches its maps. It attaches
        // to a cgroup of its own, never the machine's root.
        let cgroup = Cgroup::new()?;
        let pins = PinDir::new()?;
        let agent_kubeconfig = dir.join("agent.kubeconfig");
        std::fs::write(&agent_kubeconfig, kubeconfig_as(&kind1, "detour-agent").await?)?;
        let mut agent = Agent::start_with_args(
            AgentOptions {
                binary: env!("CARGO_BIN_EXE_detour").into(),
                config: "".into(),
                cgroup: cgroup.path().to_owned(),
                bpffs: pins.path().to_owned(),
                socket: dir.join("detour.sock"),
                log: dir.join("agent.log"),
            },
            &[
                "--kubernetes",
                "--kubeconfig",
                &agent_kubeconfig.display().to_string(),
                "--node-name",
                "node-a",
                "--cluster-name",
                "kind1",
            ],
        )?;
        agent.wait_ready(EVENTUALLY)?;
        eventually("the agent serving reviews.default on its VIP", || async {
            let services = agent.services_json()?;
            Ok(services
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["name"] == "reviews.default" && s["vips"] == json!([format!("{vip}:9080")]))
                .then_some(()))
        })
        .await
        .with_context(|| agent.log_tail())?;
        ensure!(
            !agent.log_tail().contains("forbidden"),
            "the agent was refused something:\n{}",
            agent.log_tail()
        );
        Ok(())
    })
    .await
}

// ---- the agent's capabilities --------------------------------------------------------------

/// The capabilities the agent's DaemonSet adds (after dropping ALL), as in the manifest.
fn daemonset_capabilities() -> Result<Vec<String>> {
    let (_, doc) = detour_testbed::k8s::deploy::objects(Path::new(DEPLOY))?
        .into_iter()
        .find(|(_, d)| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "detour-agent")
        .context("no DaemonSet detour-agent in deploy/manifests")?;
    let daemonset: DaemonSet = serde_json::from_value(doc)?;
    let container = daemonset
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().find(|c| c.name == "agent"))
        .context("the DaemonSet has no container `agent`")?;
    let capabilities = container
        .security_context
        .and_then(|s| s.capabilities)
        .context("the agent container sets no capabilities")?;
    ensure!(
        capabilities.drop == Some(vec!["ALL".to_owned()]),
        "the agent container must drop ALL capabilities, drops {:?}",
        capabilities.drop
    );
    Ok(capabilities.add.unwrap_or_default())
}

/// The VIP the client connects to, and the two backends' addresses, all inside the
/// test's network namespace (its veth's subnet): nothing leaves the machine.
const CAP_VIP: &str = "10.231.93.100";
const CAP_HOST: &str = "10.231.93.1/24";
const CAP_BACKEND_A: &str = "10.231.93.2";
const CAP_BACKEND_B: &str = "10.231.93.3";

/// A client in its own network namespace and in a test cgroup, running as another user
/// (65534), connected through the VIP to backend A, and an agent that is then told A is
/// removed: whether the agent destroys that socket, with the given capabilities only.
struct CapabilityBed {
    netns: detour_testbed::Netns,
    _veth: detour_testbed::Veth,
    cgroup: Cgroup,
    _backends: Vec<detour_testbed::HttpBackend>,
    dir: TempDir,
}

impl CapabilityBed {
    fn new() -> Result<Self> {
        let netns = detour_testbed::Netns::new()?;
        let veth = netns.veth(CAP_HOST, &format!("{CAP_BACKEND_A}/24"))?;
        netns.ip(&[
            "addr",
            "add",
            &format!("{CAP_BACKEND_B}/24"),
            "dev",
            veth.peer_name(),
        ])?;
        let backends = [("a", CAP_BACKEND_A), ("b", CAP_BACKEND_B)]
            .into_iter()
            .map(|(name, address)| {
                detour_testbed::HttpBackend::start_in(
                    &netns,
                    name,
                    format!("{address}:8080").parse()?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            netns,
            _veth: veth,
            cgroup: Cgroup::new()?,
            _backends: backends,
            dir: TempDir::new()?,
        })
    }

    fn write_config(&self, backend: &str) -> Result<PathBuf> {
        let path = self.dir.join("detour.yaml");
        let staging = self.dir.join("detour.yaml.tmp");
        std::fs::write(
            &staging,
            format!(
                "services:\n  - name: capabilities\n    vips: [{CAP_VIP}]\n    ports:\n      - number: 80\n        targetPort: 8080\n    endpoints:\n      - address: {backend}\n"
            ),
        )?;
        std::fs::rename(&staging, &path)?;
        Ok(path)
    }

    /// Runs the agent with exactly `capabilities` (setpriv's bounding set: it runs as
    /// root, as in the DaemonSet) and reports what became of the client's socket to the
    /// removed backend.
    fn run_with(&self, capabilities: &[String]) -> Result<Outcome> {
        let set: Vec<String> = capabilities
            .iter()
            .map(|c| format!("+{}", c.to_ascii_lowercase()))
            .collect();
        let wrapper = self.dir.join("detour-with-capabilities");
        // Not std::fs::write: see `write_executable` (ETXTBSY when another test forks).
        detour_testbed::write_executable(
            &wrapper,
            &format!(
                "#!/bin/sh\nexec setpriv --bounding-set=-all{}{} --inh-caps=-all -- {} \"$@\"\n",
                if set.is_empty() { "" } else { "," },
                set.join(","),
                env!("CARGO_BIN_EXE_detour")
            ),
        )?;
        let config = self.write_config(CAP_BACKEND_A)?;
        let pins = PinDir::new()?;
        let mut agent = Agent::start(AgentOptions {
            binary: wrapper,
            config: config.clone(),
            cgroup: self.cgroup.path().to_owned(),
            bpffs: pins.path().to_owned(),
            socket: self.dir.join("detour.sock"),
            log: self.dir.join(&format!("agent-{}.log", set.join(""))),
        })?;
        if let Err(error) = agent.wait_ready(Duration::from_secs(30)) {
            let why = format!("{error:#}");
            let last = why
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default();
            return Ok(Outcome::AgentFailed(last.to_owned()));
        }

        let out = self.dir.join("client.out");
        let err = self.dir.join("client.err");
        let mut client = self.netns.command("setpriv");
        client
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-c"])
            .arg(format!(
                "exec 3<>/dev/tcp/{CAP_VIP}/80 || exit 9; echo connected; read -t 15 -u 3 line; echo rc=$?"
            ))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?);
        let mut client = Running(self.cgroup.spawn(&mut client)?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&out)?.contains("connected") {
            ensure!(
                Instant::now() < deadline && client.0.try_wait()?.is_none(),
                "the client did not connect through the VIP: {}{}\n{}",
                std::fs::read_to_string(&out)?,
                std::fs::read_to_string(&err)?,
                agent.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // A removed backend's sockets are destroyed at once (terminateConnections).
        self.write_config(CAP_BACKEND_B)?;
        let exited = detour_testbed::wait_with_timeout(&mut client.0, Duration::from_secs(5))?;
        let errors = std::fs::read_to_string(&err)?;
        let destroyed = exited.is_some() && errors.contains("connection abort");
        // The agent logs once its destroys are done, which may be after the client saw
        // its socket go.
        let logged_by = Instant::now() + Duration::from_secs(5);
        while destroyed
            && !agent.log_tail().contains("sockets destroyed")
            && Instant::now() < logged_by
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if destroyed != agent.log_tail().contains("sockets destroyed") {
            bail!(
                "the client ({exited:?}, {errors:?}) and the agent's log disagree:\n{}",
                agent.log_tail()
            );
        }
        Ok(if destroyed {
            Outcome::Destroyed
        } else {
            Outcome::NotDestroyed
        })
    }
}

/// What became of the client's socket once its backend was removed.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Destroyed,
    NotDestroyed,
    /// The agent did not start (the last line of its error).
    AgentFailed(String),
}

/// Needs root (cgroup, network namespace, bpffs), as the end-to-end tests.
#[test]
fn the_daemonsets_capabilities_are_enough_and_each_is_needed() -> Result<()> {
    let granted = daemonset_capabilities()?;
    ensure!(!granted.is_empty(), "the agent is granted no capability");
    let bed = CapabilityBed::new()?;
    let outcome = bed.run_with(&granted)?;
    ensure!(
        outcome == Outcome::Destroyed,
        "with the DaemonSet's capabilities {granted:?}: {outcome:?}"
    );
    for left_out in &granted {
        let fewer: Vec<String> = granted.iter().filter(|c| *c != left_out).cloned().collect();
        let outcome = bed.run_with(&fewer)?;
        eprintln!("without {left_out}: {outcome:?}");
        ensure!(
            outcome != Outcome::Destroyed,
            "{left_out} is granted but not needed: the agent destroyed the socket with {fewer:?}"
        );
    }
    Ok(())
}

// ---- helpers -----------------------------------------------------------------------------

async fn bounded(test: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .context("the test did not finish in time")?
}

/// Polls `check` until it yields `Some`, for at most [`EVENTUALLY`].
async fn eventually<T, F, Fut>(what: &str, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    detour_testbed::eventually(what, EVENTUALLY, check).await
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The `*.yaml` files directly in `dir`, by name.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
