//! VirtualMachineInstance → launcher pod; the VMI's phase from its pod.
//!
//! Pending → Scheduling (pod created) → Scheduled (pod running on a node) → Running (reported
//! by the node agent) → Succeeded / Failed (the pod ended, or vanished). Deleting a VMI deletes
//! its pod with the VMI's grace period and removes the finalizer once the pod is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::{
    Context, Error, MANAGER, apply_status, apply_status_as, controlled_by, ensure_finalizer,
    measured, namespace, now, remove_finalizer,
};
use crate::crd::VirtualMachineInstance;
use crate::crd::status::{
    Condition, ConditionStatus, PhaseTransition, VmiPhase, remove_condition, set_condition,
};
use crate::crd::vmi::VirtualMachineInstanceStatus;
use crate::launcher;

/// The pod as the phase machine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    pub phase: String,
    pub node: Option<String>,
    /// The scheduler's reason when it cannot place the pod.
    pub unschedulable: Option<String>,
    /// Why the pod ended, when it did.
    pub ended: Option<String>,
    /// A container whose image the kubelet cannot pull (the launcher's, or a containerDisk
    /// volume's): the kubelet's reason and a message naming the image.
    pub image_pull: Option<(String, String)>,
}

/// The kubelet's waiting reasons for an image it cannot get.
const IMAGE_PULL_REASONS: [&str; 4] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
];

impl PodState {
    pub fn of(pod: &Pod) -> PodState {
        let status = pod.status.clone().unwrap_or_default();
        let unschedulable = status.conditions.as_ref().and_then(|cs| {
            cs.iter()
                .find(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
                .map(|c| {
                    c.message
                        .clone()
                        .unwrap_or_else(|| "no node fits the launcher pod".into())
                })
        });
        let ended = status.container_statuses.as_ref().and_then(|cs| {
            cs.iter().find_map(|c| {
                let t = c.state.as_ref()?.terminated.as_ref()?;
                Some(format!(
                    "the launcher's {} container exited with status {}{}",
                    c.name,
                    t.exit_code,
                    t.reason
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ))
            })
        });
        let image_pull = status
            .init_container_statuses
            .iter()
            .chain(status.container_statuses.iter())
            .flatten()
            .find_map(|c| {
                let waiting = c.state.as_ref()?.waiting.as_ref()?;
                let reason = waiting.reason.as_deref()?;
                IMAGE_PULL_REASONS.contains(&reason).then(|| {
                    let detail = waiting
                        .message
                        .as_ref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default();
                    let message = format!(
                        "the launcher's {} container cannot get its image {}{detail}",
                        c.name, c.image
                    );
                    (reason.to_owned(), message)
                })
            });
        PodState {
            phase: status.phase.unwrap_or_else(|| "Pending".into()),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            unschedulable,
            ended,
            image_pull,
        }
    }
}

/// The phase a VMI in `current` moves to given its pod (`None`: no pod). `Running` is the
/// agent's to set; the controller keeps it.
pub fn next_phase(current: VmiPhase, pod: Option<&PodState>) -> (VmiPhase, Option<String>) {
    if current.is_final() {
        return (current, None);
    }
    let Some(pod) = pod else {
        return match current {
            VmiPhase::Pending | VmiPhase::Scheduling => (current, None),
            _ => (
                VmiPhase::Failed,
                Some("the launcher pod disappeared".into()),
            ),
        };
    };
    match pod.phase.as_str() {
        "Succeeded" => (VmiPhase::Succeeded, pod.ended.clone()),
        "Failed" => (
            VmiPhase::Failed,
            Some(
                pod.ended
                    .clone()
                    .unwrap_or_else(|| "the launcher pod failed".into()),
            ),
        ),
        "Running" if current == VmiPhase::Running => (VmiPhase::Running, None),
        "Running" => (VmiPhase::Scheduled, None),
        "Unknown" => (
            VmiPhase::Unknown,
            Some("the launcher pod's node does not report".into()),
        ),
        _ => (VmiPhase::Scheduling, None),
    }
}

pub async fn reconcile(
    vmi: Arc<VirtualMachineInstance>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    measured(&ctx, "vmi", async {
        match super::fresh(&ctx.client, &*vmi, "VirtualMachineInstance").await? {
            Some(vmi) => reconcile_inner(&vmi, &ctx).await,
            None => Ok(Action::await_change()),
        }
    })
    .await
}

async fn reconcile_inner(vmi: &VirtualMachineInstance, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace(vmi, "VirtualMachineInstance")?;
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod_name = launcher::pod_name(&vmi.name_any());
    let found = pods.get_opt(&pod_name).await?;

    if vmi.meta().deletion_timestamp.is_some() {
        return cleanup(vmi, ctx, &vmis, &pods, found).await;
    }
    let resource_version = ensure_finalizer(&vmis, vmi)
        .await?
        .or_else(|| vmi.resource_version());

    // A pod of that name from an earlier VMI of the same name: remove it first.
    if let Some(pod) = found
        .as_ref()
        .filter(|p| !controlled_by(*p, vmi.uid().as_deref()))
    {
        if pod.meta().deletion_timestamp.is_none() {
            let _ = pods.delete(&pod_name, &DeleteParams::default()).await;
        }
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let mut pod = found;
    let current = vmi.phase();
    if current.is_final() {
        return Ok(Action::await_change());
    }

    if pod.is_none() && matches!(current, VmiPhase::Pending | VmiPhase::Scheduling) {
        if super::preset::apply(vmi, ctx, &vmis).await? {
            // The spec changed; the next reconcile sees it.
            return Ok(Action::requeue(Duration::from_millis(100)));
        }
        let inputs = pod_inputs(vmi, ctx, &ns).await?;
        if let Err((reason, missing)) = &inputs {
            let (reason, missing) = (*reason, missing.clone());
            let mut status = controller_status(vmi);
            set_condition(
                &mut status.conditions,
                Condition::new(
                    "Synchronized",
                    ConditionStatus::False,
                    reason,
                    missing.clone(),
                ),
                &now(),
            );
            status.phase = Some(VmiPhase::Pending);
            apply_status(&vmis, vmi, &status).await?;
            ctx.event(
                vmi,
                EventType::Warning,
                "FailedCreate",
                "CreatePod",
                missing,
            )
            .await;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
        let inputs = inputs.unwrap_or_default();
        let new = launcher::pod(vmi, &pod_name, "launcher", &ctx.launcher, &inputs)?;
        let params = PostParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        match pods.create(&params, &new).await {
            Ok(created) => {
                ctx.event(
                    vmi,
                    EventType::Normal,
                    "SuccessfulCreate",
                    "CreatePod",
                    format!("created launcher pod {pod_name}"),
                )
                .await;
                pod = Some(created);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            Err(e) => {
                ctx.event(
                    vmi,
                    EventType::Warning,
                    "FailedCreate",
                    "CreatePod",
                    format!("cannot create launcher pod {pod_name}: {e}"),
                )
                .await;
                return Err(e.into());
            }
        }
    }

    let pod_state = pod.as_ref().map(PodState::of);
    let (phase, reason) = next_phase(current, pod_state.as_ref());
    let mut status = controller_status(vmi);
    remove_condition(&mut status.conditions, "Synchronized");
    status.phase = Some(phase);
    status.launcher_pod = pod.as_ref().map(|p| p.name_any());
    if let Some(node) = pod_state.as_ref().and_then(|p| p.node.clone()) {
        status.node_name = Some(node);
    }
    if reason.is_some() {
        status.reason = reason.clone();
    }
    let stamp = now();
    if let Some((reason, message)) = pod_state.as_ref().and_then(|p| p.image_pull.clone()) {
        set_condition(
            &mut status.conditions,
            Condition::new("Synchronized", ConditionStatus::False, &reason, message),
            &stamp,
        );
    }
    match pod_state.as_ref().and_then(|p| p.unschedulable.clone()) {
        Some(why) => set_condition(
            &mut status.conditions,
            Condition::new("PodScheduled", ConditionStatus::False, "Unschedulable", why),
            &stamp,
        ),
        None if pod_state.as_ref().is_some_and(|p| p.node.is_some()) => set_condition(
            &mut status.conditions,
            Condition::new(
                "PodScheduled",
                ConditionStatus::True,
                "Scheduled",
                "the launcher pod is on a node",
            ),
            &stamp,
        ),
        None => {}
    }
    if phase != current || vmi.status.as_ref().and_then(|s| s.phase).is_none() {
        status.phase_transition_timestamps.push(PhaseTransition {
            phase,
            phase_transition_timestamp: stamp.clone(),
        });
        if let Some(created) = vmi.meta().creation_timestamp.as_ref() {
            let since = stamp.0.duration_since(created.0);
            ctx.health.metrics.phase_entered(
                phase.as_str(),
                Duration::try_from(since).unwrap_or_default(),
            );
        }
        phase_event(
            vmi,
            ctx,
            phase,
            status.node_name.as_deref(),
            reason.as_deref(),
        )
        .await;
    }
    if Some(&status) != vmi.status.as_ref() {
        // Guarded by the version read: the agent may have written Running meanwhile.
        match apply_status_as(&vmis, vmi, &status, MANAGER, resource_version.as_deref()).await {
            Err(e) if e.is_conflict() => return Ok(Action::requeue(Duration::from_millis(50))),
            other => other?,
        }
    }
    Ok(match phase {
        p if p.is_final() => Action::await_change(),
        _ => Action::requeue(Duration::from_secs(300)),
    })
}

/// The part of the status the controller owns, starting from what is there now.
fn controller_status(vmi: &VirtualMachineInstance) -> VirtualMachineInstanceStatus {
    let old = vmi.status.clone().unwrap_or_default();
    VirtualMachineInstanceStatus {
        node_name: old.node_name,
        reason: old.reason,
        launcher_pod: old.launcher_pod,
        migration_state: old.migration_state,
        ..VirtualMachineInstanceStatus::shared_part(vmi, &["PodScheduled", "Synchronized"])
    }
}

async fn phase_event(
    vmi: &VirtualMachineInstance,
    ctx: &Context,
    phase: VmiPhase,
    node: Option<&str>,
    reason: Option<&str>,
) {
    let (type_, why, note) = match phase {
        VmiPhase::Scheduled => (
            EventType::Normal,
            "Scheduled",
            format!("the launcher pod runs on node {}", node.unwrap_or("?")),
        ),
        VmiPhase::Succeeded => (
            EventType::Normal,
            "Stopped",
            format!(
                "the VMI stopped{}",
                reason.map(|r| format!(": {r}")).unwrap_or_default()
            ),
        ),
        VmiPhase::Failed => (
            EventType::Warning,
            "Failed",
            format!("the VMI failed: {}", reason.unwrap_or("unknown reason")),
        ),
        _ => return,
    };
    ctx.event(vmi, type_, why, "Phase", note).await;
}

/// Deletion: stop the pod with the VMI's grace period, then release the finalizer.
async fn cleanup(
    vmi: &VirtualMachineInstance,
    ctx: &Context,
    vmis: &Api<VirtualMachineInstance>,
    pods: &Api<Pod>,
    pod: Option<Pod>,
) -> Result<Action, Error> {
    let pod = pod.filter(|p| controlled_by(p, vmi.uid().as_deref()));
    if let Some(pod) = pod {
        if pod.meta().deletion_timestamp.is_none() {
            let grace = vmi.spec.termination_grace_period_seconds.unwrap_or(30);
            let params = DeleteParams {
                grace_period_seconds: u32::try_from(grace).ok(),
                ..Default::default()
            };
            match pods.delete(&pod.name_any(), &params).await {
                Ok(_) => ctx.event(vmi, EventType::Normal, "Stopping", "DeletePod",
                    format!("stopping the VM: deleting launcher pod {} with a {grace} s grace period", pod.name_any())).await,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        // The pod watch brings us back when it is gone.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    remove_finalizer(vmis, vmi).await?;
    Ok(Action::await_change())
}

/// The first `multus` network whose NetworkAttachmentDefinition does not exist, as a message.
/// What the launcher pod needs from other objects: the claims' volume modes and the device
/// resources of the networks; or the condition reason and message of one that is missing.
pub(super) async fn pod_inputs(
    vmi: &VirtualMachineInstance,
    ctx: &Context,
    ns: &str,
) -> Result<Result<launcher::PodInputs, (&'static str, String)>, Error> {
    let network_resources = match network_definitions(vmi, ctx, ns).await? {
        Ok(resources) => resources,
        Err(missing) => return Ok(Err(("NetworkAttachmentDefinitionNotFound", missing))),
    };
    let block_volumes = match claim_modes(vmi, ctx, ns).await? {
        Ok(block) => block,
        Err(missing) => return Ok(Err(("PersistentVolumeClaimNotFound", missing))),
    };
    Ok(Ok(launcher::PodInputs {
        block_volumes,
        network_resources,
    }))
}

/// The VMI's volumes whose PersistentVolumeClaim has `volumeMode: Block` (they become the
/// launcher's `volumeDevices`), or why a claim cannot be used.
async fn claim_modes(
    vmi: &VirtualMachineInstance,
    ctx: &Context,
    ns: &str,
) -> Result<Result<BTreeSet<String>, String>, Error> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let mut block = BTreeSet::new();
    for volume in &vmi.spec.volumes {
        let Some(source) = &volume.persistent_volume_claim else {
            continue;
        };
        let Some(claim) = claims.get_opt(&source.claim_name).await? else {
            return Ok(Err(format!(
                "volume {} names PersistentVolumeClaim {ns}/{}, which does not exist; create it",
                volume.name, source.claim_name
            )));
        };
        if claim.spec.and_then(|s| s.volume_mode).as_deref() == Some("Block") {
            block.insert(volume.name.clone());
        }
    }
    Ok(Ok(block))
}

/// The annotation of a NetworkAttachmentDefinition naming the device-plugin resource its
/// attachments need (an SR-IOV pool), as Multus and KubeVirt read it.
pub const RESOURCE_NAME_ANNOTATION: &str = "k8s.v1.cni.cncf.io/resourceName";

/// Resource name → how many of the VMI's Multus networks need one (from their definitions'
/// [`RESOURCE_NAME_ANNOTATION`]), or why a definition is missing.
async fn network_definitions(
    vmi: &VirtualMachineInstance,
    ctx: &Context,
    ns: &str,
) -> Result<Result<BTreeMap<String, u64>, String>, Error> {
    let mut resources = BTreeMap::new();
    let gvk = GroupVersionKind::gvk("k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "network-attachment-definitions");
    for net in &vmi.spec.networks {
        let Some(multus) = &net.multus else { continue };
        let (nad_ns, name) = multus
            .network_name
            .split_once('/')
            .unwrap_or((ns, multus.network_name.as_str()));
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), nad_ns, &resource);
        match api.get_opt(name).await {
            Ok(Some(nad)) => {
                if let Some(resource) = nad.annotations().get(RESOURCE_NAME_ANNOTATION) {
                    *resources.entry(resource.clone()).or_insert(0) += 1;
                }
            }
            Ok(None) | Err(kube::Error::Api(_)) => {
                return Ok(Err(format!(
                    "network {} names NetworkAttachmentDefinition {nad_ns}/{name}, which does not exist (create it, or check that Multus is installed)",
                    net.name
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Ok(resources))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str, node: Option<&str>) -> PodState {
        PodState {
            phase: phase.into(),
            node: node.map(Into::into),
            unschedulable: None,
            ended: None,
            image_pull: None,
        }
    }

    #[test]
    fn phases_follow_the_pod_and_never_go_back() {
        use VmiPhase::*;
        assert_eq!(next_phase(Pending, None).0, Pending);
        assert_eq!(
            next_phase(Scheduling, Some(&pod("Pending", None))).0,
            Scheduling
        );
        assert_eq!(
            next_phase(Scheduling, Some(&pod("Pending", Some("n1")))).0,
            Scheduling
        );
        assert_eq!(
            next_phase(Scheduling, Some(&pod("Running", Some("n1")))).0,
            Scheduled
        );
        assert_eq!(
            next_phase(Running, Some(&pod("Running", Some("n1")))).0,
            Running
        );
        assert_eq!(
            next_phase(Running, Some(&pod("Succeeded", Some("n1")))).0,
            Succeeded
        );
        let mut failed = pod("Failed", Some("n1"));
        failed.ended = Some("the launcher's compute container exited with status 3 (Error)".into());
        assert_eq!(
            next_phase(Scheduled, Some(&failed)),
            (Failed, failed.ended.clone())
        );
        assert_eq!(
            next_phase(Running, None),
            (Failed, Some("the launcher pod disappeared".into()))
        );
        assert_eq!(
            next_phase(Failed, Some(&pod("Running", Some("n1")))).0,
            Failed
        );
        assert_eq!(next_phase(Succeeded, None).0, Succeeded);
    }

    #[test]
    fn pod_state_reads_the_schedulers_reason_and_the_exit_status() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "compute"}]},
            "status": {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."}]
            }
        })).expect("pod");
        let s = PodState::of(&p);
        assert_eq!(
            s.unschedulable.as_deref(),
            Some("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.")
        );
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "compute"}], "nodeName": "localhost"},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "compute", "image": "i", "imageID": "",
                "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}]}
        })).expect("pod");
        let s = PodState::of(&p);
        assert_eq!(
            s.ended.as_deref(),
            Some("the launcher's compute container exited with status 3 (Error)")
        );
        assert_eq!(s.node.as_deref(), Some("localhost"));
        assert_eq!(s.image_pull, None);
    }

    #[test]
    fn pod_state_names_an_image_the_kubelet_cannot_pull() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "compute"}], "nodeName": "localhost"},
            "status": {"phase": "Pending",
                "initContainerStatuses": [{"name": "volume-0", "image": "registry.example/disk:1",
                    "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff",
                                          "message": "Back-off pulling image"}}}],
                "containerStatuses": [{"name": "compute", "image": "i", "imageID": "",
                    "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "PodInitializing"}}}]}
        }))
        .expect("pod");
        let (reason, message) = PodState::of(&p).image_pull.expect("an image problem");
        assert_eq!(reason, "ImagePullBackOff");
        assert_eq!(
            message,
            "the launcher's volume-0 container cannot get its image registry.example/disk:1: \
             Back-off pulling image"
        );
    }
}
