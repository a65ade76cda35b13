//! Installing `deploy/` as it ships into a test cluster, and acting as one of the
//! ServiceAccounts it creates: what the deploy test and the first-seed scenario share,
//! so that both run the controller and the agent with exactly the rights users grant.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::{json, Value};

use super::Cluster;

/// Every object under `deploy/crds` and `deploy/manifests` (the chart rendered), in the
/// order they install: Namespaces first, then by file and position.
pub fn objects(deploy: &Path) -> Result<Vec<(PathBuf, Value)>> {
    let mut out = Vec::new();
    for dir in ["crds", "manifests"] {
        for path in yaml_files(&deploy.join(dir))? {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            out.extend(
                docs.into_iter()
                    .filter(|d| !d.is_null())
                    .map(|d| (path.clone(), d)),
            );
        }
    }
    out.sort_by_key(|(_, doc)| doc["kind"] != "Namespace");
    Ok(out)
}

/// The `.yaml` files directly in `dir`, sorted.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
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

/// Applies every object of `deploy` (see [`objects`]) through `client`: a server-side
/// dry run with strict field validation first, then for real, by server-side apply as
/// `field_manager`.
pub async fn install(client: &kube::Client, deploy: &Path, field_manager: &str) -> Result<()> {
    for (path, doc) in objects(deploy)? {
        let api_version = doc["apiVersion"].as_str().unwrap_or_default();
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, doc["kind"].as_str().unwrap_or_default());
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
        let object: DynamicObject = serde_json::from_value(doc.clone())?;
        let name = object.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                object.metadata.namespace.as_deref().unwrap_or("default"),
                &resource,
            ),
        };
        let what = format!("{} {name} from {}", gvk.kind, path.display());
        let params = PatchParams::apply(field_manager).validation_strict();
        api.patch(&name, &params.clone().dry_run(), &Patch::Apply(&object))
            .await
            .with_context(|| format!("{what}: server-side dry run"))?;
        api.patch(&name, &params, &Patch::Apply(&object))
            .await
            .with_context(|| format!("{what}: apply"))?;
    }
    Ok(())
}

/// A kubeconfig for `cluster` that authenticates as ServiceAccount `namespace/account`,
/// with an hour's token from the TokenRequest API.
pub async fn kubeconfig_as(cluster: &Cluster, namespace: &str, account: &str) -> Result<String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.client(), namespace);
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 3600},
    }))?;
    let token = accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("a token for {namespace}/{account}"))?
        .status
        .context("TokenRequest without status")?
        .token;
    let mut kubeconfig: Value = serde_json::from_str(&cluster.kubeconfig_contents()?)?;
    kubeconfig["users"][0]["user"] = json!({"token": token});
    Ok(serde_json::to_string_pretty(&kubeconfig)?)
}
