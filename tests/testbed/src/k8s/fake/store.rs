//! The fake API server's object store: JSON objects per resource, one global
//! resourceVersion counter, the history of changes that watches resume from, and the
//! defaults and bookkeeping kube-apiserver adds on writes.
//!
//! Invariants:
//! - every committed change takes the next resourceVersion, is recorded in the history
//!   and is handed to every open watch of its resource in that order, all under one
//!   lock (the caller's), so a watch sees each change once and in order;
//! - a write that changes nothing (same object apart from its resourceVersion) commits
//!   nothing: no new resourceVersion, no event — as kube-apiserver skips no-op updates;
//! - `compact(R)` forgets the history before R, as etcd does; a watch that would resume
//!   from before R is refused with 410 Expired, which kube's watcher answers by relisting;
//! - `metadata.generation` starts at 1 and goes up by one whenever anything outside
//!   `metadata` and `status` changes; uid and creationTimestamp never change;
//! - resources with a status subresource keep their status on writes to the object and
//!   change only their status on writes to `/status`.
//!
//! Simplifications (stated, so a test does not rely on them): no schema validation,
//! admission or defaulting beyond Service ClusterIPs and ports; no managedFields, so a
//! server-side apply merges the applied fields into the object (JSON merge patch) and
//! never removes fields a manager stopped applying, and `force` is never needed; no
//! garbage collection of `ownerReferences` (they are stored) and no finalizers (deletes
//! are immediate); deleting a Namespace deletes what is in it at once; lists ignore
//! `limit` (one page, which the API allows); the history grows until compacted.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::selector::Filter;

/// A resource the fake serves: where it lives in the API and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    pub version: String,
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
    /// Has a `/status` subresource.
    pub status: bool,
}

impl ResourceType {
    fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced,
            status: false,
        }
    }

    fn with_status(mut self) -> Self {
        self.status = true;
        self
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn collection(&self) -> Collection {
        Collection {
            group: self.group.clone(),
            plural: self.plural.clone(),
        }
    }
}

/// The built-in resources: what detour's agent, controller and tests use, plus what
/// `deploy/` creates.
fn builtins() -> Vec<ResourceType> {
    let core = |plural, kind, namespaced| ResourceType::new("", "v1", plural, kind, namespaced);
    vec![
        core("namespaces", "Namespace", false).with_status(),
        core("nodes", "Node", false),
        core("services", "Service", true).with_status(),
        core("secrets", "Secret", true),
        core("configmaps", "ConfigMap", true),
        core("serviceaccounts", "ServiceAccount", true),
        core("events", "Event", true),
        ResourceType::new(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
        ),
        ResourceType::new("coordination.k8s.io", "v1", "leases", "Lease", true),
        ResourceType::new("events.k8s.io", "v1", "events", "Event", true),
        ResourceType::new("apps", "v1", "deployments", "Deployment", true).with_status(),
        ResourceType::new("apps", "v1", "daemonsets", "DaemonSet", true).with_status(),
        ResourceType::new("rbac.authorization.k8s.io", "v1", "roles", "Role", true),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
        ),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
        ),
        ResourceType::new(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
        ),
        ResourceType::new(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        )
        .with_status(),
    ]
}

/// Objects of one resource, whatever version they are asked for in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Collection {
    group: String,
    plural: String,
}

/// An error as kube-apiserver answers it: an HTTP code and a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn not_found(what: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{what} \"{name}\" not found"))
    }

    /// The resource type itself is unknown (no such path).
    pub fn no_resource() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// A watch from a resourceVersion older than the last compaction.
    pub fn expired(from: u64, compacted: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {from} ({compacted})"),
        )
    }

    /// The `Status` object kube's client reads errors from.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

type Result<T> = std::result::Result<T, ApiError>;

/// What a committed change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One committed change, as the history keeps it and watches receive it.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    collection: Collection,
    /// The object before a modification (for selectors it stopped or started matching).
    previous: Option<Value>,
    /// The object after the change; for a deletion, its last state (with the deletion's
    /// resourceVersion).
    pub object: Value,
    kind: ChangeKind,
}

impl Change {
    /// The watch event type a watch with `filter` sees for this change, if any: an object
    /// that starts matching is ADDED, one that stops matching is DELETED, as
    /// kube-apiserver's filtered watches report them.
    pub fn event_type(&self, filter: &Filter) -> Option<&'static str> {
        let now = filter.matches(&self.object);
        let before = self.previous.as_ref().is_some_and(|p| filter.matches(p));
        match (self.kind, before, now) {
            (ChangeKind::Added, _, true) => Some("ADDED"),
            (ChangeKind::Deleted, _, true) => Some("DELETED"),
            (ChangeKind::Modified, true, true) => Some("MODIFIED"),
            (ChangeKind::Modified, false, true) => Some("ADDED"),
            (ChangeKind::Modified, true, false) => Some("DELETED"),
            _ => None,
        }
    }
}

/// How an existing object is written.
#[derive(Debug, Clone)]
pub enum Write {
    /// PUT: the body replaces the object.
    Replace(Value),
    /// `application/merge-patch+json` (RFC 7386).
    MergePatch(Value),
    /// `application/apply-patch+yaml`: server-side apply, simplified (see the module doc);
    /// creates the object when it is missing.
    Apply(Value),
}

/// Where a write goes: the object or its `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Object,
    Status,
}

/// Where an open watch receives the changes committed after it opened.
pub type Changes = mpsc::UnboundedReceiver<Arc<Change>>;

struct Watcher {
    collection: Collection,
    tx: mpsc::UnboundedSender<Arc<Change>>,
}

/// Namespaces that exist in a new cluster, as in a real one.
const INITIAL_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];
/// The first ClusterIP host number handed out (a real cluster's `.1` is the `kubernetes`
/// Service).
const FIRST_SERVICE_HOST: u8 = 10;

pub struct Store {
    rv: u64,
    compacted: u64,
    types: Vec<ResourceType>,
    objects: BTreeMap<Collection, BTreeMap<(String, String), Value>>,
    history: VecDeque<Arc<Change>>,
    watchers: Vec<Watcher>,
    next_uid: u64,
    /// The service CIDR's first three octets (it is a /24).
    service_net: [u8; 3],
    service_hosts: BTreeSet<u8>,
}

impl Store {
    /// An empty cluster (its initial namespaces only) handing out ClusterIPs from
    /// `service_cidr`, a /24 such as `198.18.7.0/24`.
    pub fn new(service_cidr: &str) -> Self {
        let octets: Vec<u8> = service_cidr
            .split(['.', '/'])
            .take(3)
            .map(|o| o.parse().expect("service CIDR is a dotted /24"))
            .collect();
        let mut store = Self {
            rv: 0,
            compacted: 0,
            types: builtins(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            watchers: Vec::new(),
            next_uid: 0,
            service_net: [octets[0], octets[1], octets[2]],
            service_hosts: BTreeSet::new(),
        };
        let namespaces = store
            .resource_type("", "v1", "namespaces")
            .expect("namespaces are built in");
        for name in INITIAL_NAMESPACES {
            store
                .create(
                    &namespaces,
                    None,
                    json!({"metadata": {"name": name}}),
                    false,
                )
                .expect("a new store takes its initial namespaces");
        }
        store
    }

    /// The newest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// The resource served at `group/version/plural`, built in or from a CRD.
    pub fn resource_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    fn key(rt: &ResourceType, namespace: Option<&str>, name: &str) -> Result<(String, String)> {
        match (rt.namespaced, namespace) {
            (true, Some(ns)) => Ok((ns.to_owned(), name.to_owned())),
            (false, None) => Ok((String::new(), name.to_owned())),
            _ => Err(ApiError::no_resource()),
        }
    }

    pub fn get(&self, rt: &ResourceType, namespace: Option<&str>, name: &str) -> Result<Value> {
        let key = Self::key(rt, namespace, name)?;
        self.objects
            .get(&rt.collection())
            .and_then(|objects| objects.get(&key))
            .map(|object| with_type(object, rt))
            .ok_or_else(|| ApiError::not_found(&rt.plural, name))
    }

    /// A `…List` of the objects `filter` selects, with the list's resourceVersion.
    pub fn list(&self, rt: &ResourceType, filter: &Filter) -> Value {
        let items: Vec<Value> = self
            .objects
            .get(&rt.collection())
            .into_iter()
            .flat_map(|objects| objects.values())
            .filter(|object| filter.matches(object))
            .map(|object| with_type(object, rt))
            .collect();
        json!({
            "kind": format!("{}List", rt.kind),
            "apiVersion": rt.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        })
    }

    /// Opens a watch of `rt`: the changes after `from` (or, without `from` or with `0`,
    /// the current objects as ADDED), then every change as it is committed. Refused with
    /// 410 Expired when `from` is older than the last compaction.
    pub fn watch(
        &mut self,
        rt: &ResourceType,
        from: Option<u64>,
    ) -> Result<(Vec<Arc<Change>>, Changes)> {
        let collection = rt.collection();
        let backlog = match from {
            None | Some(0) => self
                .objects
                .get(&collection)
                .into_iter()
                .flat_map(|objects| objects.values())
                .map(|object| {
                    Arc::new(Change {
                        rv: rv_of(object),
                        collection: collection.clone(),
                        previous: None,
                        object: object.clone(),
                        kind: ChangeKind::Added,
                    })
                })
                .collect(),
            // etcd keeps the compaction's own revision: a watch from R-1 (starting at
            // revision R) still works, one from R-2 does not.
            Some(from) if from + 1 < self.compacted => {
                return Err(ApiError::expired(from, self.compacted))
            }
            Some(from) => self
                .history
                .iter()
                .filter(|change| change.rv > from && change.collection == collection)
                .cloned()
                .collect(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(Watcher { collection, tx });
        Ok((backlog, rx))
    }

    /// Forgets the history before the current resourceVersion, which it returns: a watch
    /// resuming from an older one gets 410 Expired.
    pub fn compact(&mut self) -> u64 {
        self.compacted = self.rv;
        let compacted = self.compacted;
        self.history.retain(|change| change.rv >= compacted);
        compacted
    }

    /// Ends every open watch, as a server does when a watch times out: kube's watcher
    /// then resumes from the last resourceVersion it saw (and relists on 410).
    pub fn end_watches(&mut self) {
        self.watchers.clear();
    }

    pub fn create(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        body: Value,
        dry_run: bool,
    ) -> Result<Value> {
        let mut object = checked_body(rt, body)?;
        let meta = object["metadata"].as_object_mut().expect("checked_body");
        if meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
        {
            let prefix = meta
                .get("generateName")
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    ApiError::new(
                        422,
                        "Invalid",
                        "metadata.name: Required value: name or generateName is required",
                    )
                })?
                .to_owned();
            meta.insert(
                "name".into(),
                json!(format!("{prefix}{:05x}", self.next_uid)),
            );
        }
        let name = meta["name"].as_str().unwrap_or_default().to_owned();
        match (
            rt.namespaced,
            namespace,
            meta.get("namespace").and_then(Value::as_str),
        ) {
            (true, Some(url), Some(body)) if url != body => {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({body}) does not match the \
                     namespace sent on the request ({url})"
                )))
            }
            (true, Some(url), _) => {
                meta.insert("namespace".into(), json!(url));
            }
            (false, None, _) => {
                meta.remove("namespace");
            }
            _ => return Err(ApiError::no_resource()),
        }
        if let Some(ns) = namespace {
            let namespaces = self
                .resource_type("", "v1", "namespaces")
                .expect("built in");
            if self.get(&namespaces, None, ns).is_err() {
                return Err(ApiError::not_found("namespaces", ns));
            }
        }
        let key = Self::key(rt, namespace, &name)?;
        if self
            .objects
            .get(&rt.collection())
            .is_some_and(|o| o.contains_key(&key))
        {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", rt.plural),
            ));
        }
        self.next_uid += 1;
        meta.remove("resourceVersion");
        meta.insert(
            "uid".into(),
            json!(format!(
                "{:08x}-0000-4000-8000-{:012x}",
                std::process::id(),
                self.next_uid
            )),
        );
        meta.insert("creationTimestamp".into(), now());
        meta.insert("generation".into(), json!(1));
        if rt.status {
            object.as_object_mut().expect("object").remove("status");
        }
        self.defaults(rt, &mut object, None, dry_run)?;
        self.commit(rt, key, None, object, dry_run)
    }

    pub fn write(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        write: Write,
        target: Target,
        dry_run: bool,
    ) -> Result<Value> {
        let key = Self::key(rt, namespace, name)?;
        let existing = self
            .objects
            .get(&rt.collection())
            .and_then(|objects| objects.get(&key))
            .cloned();
        let Some(existing) = existing else {
            return match write {
                Write::Apply(patch) if target == Target::Object => {
                    let patch = checked_apply(rt, name, patch)?;
                    self.create(rt, namespace, patch, dry_run)
                }
                _ => Err(ApiError::not_found(&rt.plural, name)),
            };
        };
        let desired = match write {
            Write::Replace(body) => {
                let body = checked_body(rt, body)?;
                let body_name = body["metadata"]["name"].as_str().unwrap_or_default();
                if body_name != name {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({body_name}) does not match the name on \
                         the URL ({name})"
                    )));
                }
                check_precondition(&existing, &body, name)?;
                body
            }
            Write::MergePatch(patch) => {
                check_precondition(&existing, &patch, name)?;
                let mut merged = existing.clone();
                json_patch::merge(&mut merged, &patch);
                merged
            }
            Write::Apply(patch) => {
                let patch = checked_apply(rt, name, patch)?;
                let mut merged = existing.clone();
                json_patch::merge(&mut merged, &patch);
                merged
            }
        };
        let mut object = match target {
            Target::Status => {
                let mut object = existing.clone();
                set_or_remove(&mut object, "status", desired.get("status"));
                object
            }
            Target::Object => {
                let mut object = desired;
                if !object.is_object() {
                    return Err(ApiError::bad_request("the body is not a JSON object"));
                }
                if !object["metadata"].is_object() {
                    object["metadata"] = json!({});
                }
                for field in [
                    "name",
                    "namespace",
                    "uid",
                    "creationTimestamp",
                    "generation",
                ] {
                    set_or_remove(
                        &mut object["metadata"],
                        field,
                        existing["metadata"].get(field),
                    );
                }
                if rt.status {
                    set_or_remove(&mut object, "status", existing.get("status"));
                }
                object
            }
        };
        object["apiVersion"] = json!(rt.api_version());
        object["kind"] = json!(rt.kind);
        self.defaults(rt, &mut object, Some(&existing), dry_run)?;
        if spec_of(&object) != spec_of(&existing) {
            let generation = existing["metadata"]["generation"].as_i64().unwrap_or(0);
            object["metadata"]["generation"] = json!(generation + 1);
        }
        self.commit(rt, key, Some(existing), object, dry_run)
    }

    pub fn delete(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        dry_run: bool,
    ) -> Result<Value> {
        let key = Self::key(rt, namespace, name)?;
        let collection = rt.collection();
        if !self
            .objects
            .get(&collection)
            .is_some_and(|o| o.contains_key(&key))
        {
            return Err(ApiError::not_found(&rt.plural, name));
        }
        if dry_run {
            return self.get(rt, namespace, name);
        }
        // What a deleted Namespace held, and the objects of a deleted CRD's resource, go
        // first: nothing is left behind that could not be reached any more.
        if rt.plural == "namespaces" && rt.group.is_empty() {
            let held: Vec<(Collection, (String, String))> = self
                .objects
                .iter()
                .flat_map(|(collection, objects)| {
                    objects
                        .keys()
                        .filter(|(ns, _)| ns == name)
                        .map(move |key| (collection.clone(), key.clone()))
                })
                .collect();
            for (collection, key) in held {
                self.remove(collection, key);
            }
        }
        if rt.plural == "customresourcedefinitions" {
            let crd = self.objects[&collection][&key].clone();
            let served: Vec<ResourceType> = crd_types(&crd);
            if let Some(first) = served.first() {
                let gone = first.collection();
                let keys: Vec<_> = self
                    .objects
                    .get(&gone)
                    .map(|objects| objects.keys().cloned().collect())
                    .unwrap_or_default();
                for key in keys {
                    self.remove(gone.clone(), key);
                }
            }
            self.types.retain(|t| !served.contains(t));
        }
        Ok(self.remove(collection, key))
    }

    /// Removes one object, committing its deletion; returns its last state.
    fn remove(&mut self, collection: Collection, key: (String, String)) -> Value {
        let mut object = self
            .objects
            .get_mut(&collection)
            .and_then(|objects| objects.remove(&key))
            .expect("removing an object that exists");
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if collection.group.is_empty() && collection.plural == "services" {
            if let Some(host) = self.service_host(&object["spec"]["clusterIP"]) {
                self.service_hosts.remove(&host);
            }
        }
        self.publish(Change {
            rv: self.rv,
            collection,
            previous: None,
            object: object.clone(),
            kind: ChangeKind::Deleted,
        });
        object
    }

    /// Stores `object` under the next resourceVersion, unless it is what is stored.
    fn commit(
        &mut self,
        rt: &ResourceType,
        key: (String, String),
        previous: Option<Value>,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Value> {
        if let Some(previous) = &previous {
            let mut unchanged = object.clone();
            unchanged["metadata"]["resourceVersion"] =
                previous["metadata"]["resourceVersion"].clone();
            if &unchanged == previous {
                return Ok(with_type(previous, rt));
            }
        }
        if dry_run {
            object["metadata"]["resourceVersion"] = json!((self.rv + 1).to_string());
            return Ok(with_type(&object, rt));
        }
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let object = with_type(&object, rt);
        if rt.plural == "customresourcedefinitions" && previous.is_none() {
            self.types.extend(crd_types(&object));
        }
        self.objects
            .entry(rt.collection())
            .or_default()
            .insert(key, object.clone());
        let kind = if previous.is_some() {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        self.publish(Change {
            rv: self.rv,
            collection: rt.collection(),
            previous,
            object: object.clone(),
            kind,
        });
        Ok(object)
    }

    fn publish(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push_back(change.clone());
        // A watch whose receiver is gone (its client left) is dropped here.
        self.watchers.retain(|watcher| {
            watcher.collection != change.collection || watcher.tx.send(change.clone()).is_ok()
        });
    }

    /// What kube-apiserver fills in on writes, for the resources where tests see it.
    fn defaults(
        &mut self,
        rt: &ResourceType,
        object: &mut Value,
        existing: Option<&Value>,
        dry_run: bool,
    ) -> Result<()> {
        match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "services") => self.service_defaults(object, existing, dry_run),
            ("", "namespaces") => {
                object["status"] = json!({"phase": "Active"});
                Ok(())
            }
            ("apiextensions.k8s.io", "customresourcedefinitions") if existing.is_none() => {
                let spec = &object["spec"];
                if crd_types(object).is_empty() {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "spec: a CustomResourceDefinition needs spec.group, spec.names.plural, \
                         spec.names.kind, spec.scope and a served version",
                    ));
                }
                // The fake serves a CRD's resource as soon as it exists: Established.
                object["status"] = json!({
                    "acceptedNames": spec["names"],
                    "storedVersions": spec["versions"].as_array().into_iter().flatten()
                        .filter(|v| v["storage"] == json!(true)).map(|v| v["name"].clone())
                        .collect::<Vec<_>>(),
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                         "message": "no conflicts found", "lastTransitionTime": now()},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                         "message": "the initial names have been accepted", "lastTransitionTime": now()},
                    ],
                });
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A Service's type, ClusterIP (kept from `existing`, else the lowest free one of the
    /// service CIDR), IP families and port protocol and targetPort.
    fn service_defaults(
        &mut self,
        object: &mut Value,
        existing: Option<&Value>,
        dry_run: bool,
    ) -> Result<()> {
        if !object["spec"].is_object() {
            object["spec"] = json!({});
        }
        let spec = &mut object["spec"];
        if spec["type"].as_str().unwrap_or_default().is_empty() {
            spec["type"] = json!("ClusterIP");
        }
        if spec["sessionAffinity"].is_null() {
            spec["sessionAffinity"] = json!("None");
        }
        for port in spec["ports"].as_array_mut().into_iter().flatten() {
            if port["protocol"].is_null() {
                port["protocol"] = json!("TCP");
            }
            if port["targetPort"].is_null() {
                port["targetPort"] = port["port"].clone();
            }
        }
        if spec["type"] == json!("ExternalName") {
            return Ok(());
        }
        let kept = existing.map(|e| e["spec"]["clusterIP"].clone());
        let ip = match spec["clusterIP"].as_str().filter(|ip| !ip.is_empty()) {
            Some(ip) => ip.to_owned(),
            None => match kept.as_ref().and_then(Value::as_str) {
                Some(ip) => ip.to_owned(),
                None => {
                    let host = (FIRST_SERVICE_HOST..=254)
                        .find(|h| !self.service_hosts.contains(h))
                        .ok_or_else(|| {
                            ApiError::new(
                                500,
                                "InternalError",
                                "the fake API server's service CIDR is full",
                            )
                        })?;
                    let [a, b, c] = self.service_net;
                    format!("{a}.{b}.{c}.{host}")
                }
            },
        };
        if let Some(host) = self.service_host(&json!(ip)) {
            if !dry_run {
                self.service_hosts.insert(host);
            }
        }
        let spec = &mut object["spec"];
        spec["clusterIP"] = json!(ip);
        spec["clusterIPs"] = json!([ip]);
        if ip != "None" {
            spec["ipFamilies"] = json!(["IPv4"]);
            spec["ipFamilyPolicy"] = json!("SingleStack");
        }
        Ok(())
    }

    /// The host number of a ClusterIP inside this store's service CIDR.
    fn service_host(&self, ip: &Value) -> Option<u8> {
        let ip: std::net::Ipv4Addr = ip.as_str()?.parse().ok()?;
        let [a, b, c, host] = ip.octets();
        ([a, b, c] == self.service_net).then_some(host)
    }
}

/// The resourceVersion an object carries, as a number.
pub fn rv_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

/// The resources a CRD serves, one per served version.
fn crd_types(crd: &Value) -> Vec<ResourceType> {
    let spec = &crd["spec"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let (group, plural, kind) = (
        text(&spec["group"]),
        text(&spec["names"]["plural"]),
        text(&spec["names"]["kind"]),
    );
    if group.is_empty() || plural.is_empty() || kind.is_empty() {
        return Vec::new();
    }
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Vec::new(),
    };
    spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"] == json!(true))
        .map(|v| ResourceType {
            group: group.clone(),
            version: text(&v["name"]),
            plural: plural.clone(),
            kind: kind.clone(),
            namespaced,
            status: v["subresources"]["status"].is_object(),
        })
        .collect()
}

/// The body of a create or replace: an object with `metadata`, of this resource's kind.
fn checked_body(rt: &ResourceType, body: Value) -> Result<Value> {
    let mut body = match body {
        Value::Object(map) => Value::Object(map),
        _ => return Err(ApiError::bad_request("the body is not a JSON object")),
    };
    // A Secret's `stringData` is write-only: the API server stores it in `data`,
    // base64-encoded, over any key of the same name.
    if rt.kind == "Secret" {
        if let Some(Value::Object(strings)) =
            body.as_object_mut().and_then(|b| b.remove("stringData"))
        {
            use base64::Engine as _;
            if !body["data"].is_object() {
                body["data"] = Value::Object(Map::new());
            }
            for (key, value) in strings {
                let text = value.as_str().unwrap_or_default();
                body["data"][key] =
                    Value::String(base64::engine::general_purpose::STANDARD.encode(text));
            }
        }
    }
    for (field, expected) in [("apiVersion", rt.api_version()), ("kind", rt.kind.clone())] {
        match body.get(field).and_then(Value::as_str) {
            Some(given) if !given.is_empty() && given != expected => {
                return Err(ApiError::bad_request(format!(
                    "{field} {given:?} does not match the URL's resource ({expected})"
                )))
            }
            _ => body[field] = json!(expected),
        }
    }
    if !body["metadata"].is_object() {
        body["metadata"] = Value::Object(Map::new());
    }
    Ok(body)
}

/// A server-side apply body: it must name its apiVersion and kind; a name, if given,
/// must be the URL's (the real API server fills in a missing one, as kube-lease-manager's
/// Lease patches rely on).
fn checked_apply(rt: &ResourceType, name: &str, patch: Value) -> Result<Value> {
    for field in ["apiVersion", "kind"] {
        if patch
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
        {
            return Err(ApiError::bad_request(format!(
                "invalid object type: an apply patch needs {field}"
            )));
        }
    }
    let mut patch = checked_body(rt, patch)?;
    if patch["metadata"].get("name").is_none_or(Value::is_null) {
        patch["metadata"]["name"] = Value::String(name.to_owned());
    }
    match patch["metadata"]["name"].as_str() {
        Some(given) if given == name => Ok(patch),
        given => Err(ApiError::bad_request(format!(
            "metadata.name {given:?} of the apply patch does not match the URL's name {name:?}"
        ))),
    }
}

/// A write naming a resourceVersion applies only to that version (optimistic
/// concurrency): 409 Conflict otherwise.
fn check_precondition(existing: &Value, body: &Value, name: &str) -> Result<()> {
    match body["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() && rv != existing["metadata"]["resourceVersion"] => {
            Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again"
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// Everything outside `metadata` and `status` (and the type): what `generation` counts.
fn spec_of(object: &Value) -> Map<String, Value> {
    object
        .as_object()
        .map(|map| {
            map.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn set_or_remove(object: &mut Value, field: &str, value: Option<&Value>) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    match value {
        Some(value) if !value.is_null() => {
            map.insert(field.to_owned(), value.clone());
        }
        _ => {
            map.remove(field);
        }
    }
}

/// `object` with this resource's `apiVersion` and `kind` (asked for in another served
/// version, it says that version).
fn with_type(object: &Value, rt: &ResourceType) -> Value {
    let mut object = object.clone();
    object["apiVersion"] = json!(rt.api_version());
    object["kind"] = json!(rt.kind);
    object
}

fn now() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).expect("a time serializes")
}
