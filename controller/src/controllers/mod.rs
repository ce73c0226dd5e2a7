//! The reconcilers: VirtualMachine → VirtualMachineInstance, VirtualMachineInstance → launcher
//! pod and phase, VirtualMachineInstanceMigration → target pod and phase.
//!
//! Status is written with server-side apply under the field manager [`MANAGER`], holding only
//! the fields the controller owns. The node agent applies, under its own manager, the fields it
//! owns on a VMI: `phase: Running` (from Scheduled) and the final phases it observes,
//! `interfaces`, and the `Ready` and `AgentConnected` conditions. The controller never moves a
//! VMI back from Running and keeps the agent's phase-transition entries when it appends its own.

pub mod migration;
pub mod preset;
pub mod vm;
pub mod vmi;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::launcher::LauncherConfig;
use crate::server::Health;

/// The field manager of every write the controller makes.
pub const MANAGER: &str = "ferrovirt-controller";
/// The finalizer that lets the controller stop a VM or VMI before it disappears.
pub const FINALIZER: &str = "ferrovirt.io/controller";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {name} has no namespace; ferrovirt's kinds are namespaced")]
    NoNamespace { kind: &'static str, name: String },
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot build the launcher pod: {0}")]
    Launcher(#[from] crate::launcher::Error),
    #[error("cannot build a JSON patch: {0}")]
    Patch(String),
}

impl Error {
    /// The API server refused a write made against an older version of the object.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(e)) if e.code == 409)
    }

    /// A short label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::NoNamespace { .. } => "no_namespace",
            Error::Kube(_) => "kube",
            Error::Launcher(_) => "launcher",
            Error::Patch(_) => "patch",
        }
    }
}

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub health: Arc<Health>,
    pub recorder: Recorder,
    pub launcher: LauncherConfig,
}

impl Context {
    /// Publishes an event about `obj`; a failure to publish is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish an event");
        }
    }
}

/// The namespace of a namespaced object.
pub fn namespace<K: Resource>(obj: &K, kind: &'static str) -> Result<String, Error> {
    obj.meta()
        .namespace
        .clone()
        .ok_or_else(|| Error::NoNamespace {
            kind,
            name: obj.meta().name.clone().unwrap_or_default(),
        })
}

pub fn now() -> Time {
    Time(Timestamp::now())
}

/// Adds [`FINALIZER`] to `obj` unless it has it; the object's new resourceVersion when it did.
pub async fn ensure_finalizer<K>(api: &Api<K>, obj: &K) -> Result<Option<String>, Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    if obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(None);
    }
    let patch = if obj.finalizers().is_empty() {
        json!([{"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
    } else {
        json!([{"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}])
    };
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(|e| Error::Patch(e.to_string()))?;
    let patched = api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await?;
    Ok(patched.resource_version())
}

/// Removes [`FINALIZER`] from `obj` (guarded by its resourceVersion: a stale copy fails and is retried).
pub async fn remove_finalizer<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(index) = obj.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let patch = json!([
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")}
    ]);
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(|e| Error::Patch(e.to_string()))?;
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Server-side applies `status` to `obj`'s status subresource under [`MANAGER`].
pub async fn apply_status<K, S>(api: &Api<K>, obj: &K, status: &S) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    apply_status_as(api, obj, status, MANAGER, None).await
}

/// Server-side applies `status` to `obj`'s status subresource under `manager`. With
/// `resource_version`, only if the object is still at that version (else a 409 conflict), so
/// a status computed from what the controller read never overwrites what the node agent wrote
/// in between.
pub async fn apply_status_as<K, S>(
    api: &Api<K>,
    obj: &K,
    status: &S,
    manager: &str,
    resource_version: Option<&str>,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let mut body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Some(rv) = resource_version {
        body["metadata"] = json!({ "resourceVersion": rv });
    }
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

/// `obj` as the API server has it now: the watch cache can lag behind the controller's own
/// writes, and acting on a stale copy would repeat or undo a step. `None`: it is gone.
pub async fn fresh<K>(client: &Client, obj: &K, kind: &'static str) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let ns = namespace(obj, kind)?;
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    Ok(api.get_opt(&obj.name_any()).await?)
}

/// True when `child` is controlled by the object with `uid`.
pub fn controlled_by<K: Resource>(child: &K, uid: Option<&str>) -> bool {
    let Some(uid) = uid else { return false };
    child.meta().owner_references.as_ref().is_some_and(|refs| {
        refs.iter()
            .any(|r| r.controller == Some(true) && r.uid == uid)
    })
}

/// Runs a reconciler with metrics: counts, durations and errors by `kind`.
pub async fn measured<F>(ctx: &Context, kind: &'static str, f: F) -> Result<Action, Error>
where
    F: Future<Output = Result<Action, Error>>,
{
    let start = Instant::now();
    let result = f.await;
    let error = result.as_ref().err().map(Error::metric_label);
    ctx.health.metrics.reconciled(kind, start.elapsed(), error);
    result
}

/// Requeue after an error: soon, but not in a hot loop.
pub fn error_policy<K>(obj: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action
where
    K: Resource,
{
    tracing::warn!(name = obj.meta().name.as_deref().unwrap_or(""), %error, "reconcile failed; retrying");
    match error {
        Error::Kube(kube::Error::Api(e)) if e.code == 409 => {
            Action::requeue(Duration::from_millis(200))
        }
        _ => Action::requeue(Duration::from_secs(5)),
    }
}
