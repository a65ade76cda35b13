//! What the Kubernetes scenarios share: the CRD installed exactly as `deploy/` ships it,
//! FailoverServices written as users write them (untyped JSON, so the schema and its
//! CEL rules judge them, not our Rust types), and `detour controller` run as a child
//! process the way its Deployment runs it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};
use detour_testbed::eventually;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;

/// Bound on anything the agent, the controller or the control plane does by itself.
pub const EVENTUAL: Duration = Duration::from_secs(40);

const CRD: &str = include_str!("../../deploy/crds/failoverservice.yaml");

/// A typed object from JSON, as a manifest would give it.
pub fn object<T: serde::de::DeserializeOwned>(value: Value) -> Result<T> {
    Ok(serde_json::from_value(value)?)
}

/// Creates the FailoverService CRD from `deploy/crds/` and waits until it is served.
pub async fn install_crd(client: kube::Client) -> Result<()> {
    let crd: CustomResourceDefinition =
        serde_saphyr::from_str(CRD).context("parsing deploy/crds/failoverservice.yaml")?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &crd)
        .await?;
    crd_established(client).await
}

/// Waits until the FailoverService CRD is served.
pub async fn crd_established(client: kube::Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    eventually("the FailoverService CRD Established", EVENTUAL, || async {
        let crd = crds.get("failoverservices.failover.detour.io").await?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        Ok(conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(()))
    })
    .await
}

/// The FailoverService resource, untyped.
pub fn failover_service_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("failover.detour.io", "v1alpha1", "FailoverService"),
        "failoverservices",
    )
}

/// Creates FailoverService `name` in `namespace` with `spec`.
pub async fn create_failover_service(
    client: kube::Client,
    namespace: &str,
    name: &str,
    spec: Value,
) -> Result<()> {
    let resource = failover_service_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &resource);
    let object = DynamicObject::new(name, &resource).data(serde_json::json!({ "spec": spec }));
    api.create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating FailoverService {namespace}/{name}"))?;
    Ok(())
}

/// `detour controller` for `cluster_name`, its log in `log`; killed and reaped on drop.
pub struct Controller(Child);

impl Controller {
    pub fn start(kubeconfig: &Path, cluster_name: &str, log: &Path) -> Result<Self> {
        let log = std::fs::File::create(log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_detour"))
            .args(["controller", "--namespace", "detour-system"])
            .args(["--cluster-name", cluster_name])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting detour controller")?;
        Ok(Self(child))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
