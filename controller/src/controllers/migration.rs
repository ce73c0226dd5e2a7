//! VirtualMachineInstanceMigration: Pending → Scheduling (target pod created, kept off the
//! source node) → Scheduled (target pod runs) → PreparingTarget → TargetReady → Running →
//! Succeeded, or Failed with a reason. Moving guest state is a later issue: a migration whose
//! target is ready ends Failed saying so, and one whose target cannot be placed ends Failed with
//! the scheduler's reason — a migration never hangs.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::vmi::PodState;
use super::{Context, Error, MANAGER, apply_status, measured, namespace, now};
use crate::crd::migration::VirtualMachineInstanceMigrationStatus;
use crate::crd::status::{PhaseTransition, VmiPhase};
use crate::crd::{MigrationPhase, VirtualMachineInstance, VirtualMachineInstanceMigration};
use crate::launcher;

/// How long a target pod may take to run before the migration fails.
pub const TARGET_TIMEOUT: Duration = Duration::from_secs(300);

/// The target pod's name for a migration.
pub fn target_pod_name(vmi: &str, migration_uid: &str) -> String {
    let suffix: String = migration_uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(5)
        .collect();
    let base = launcher::pod_name(vmi);
    let room = 253 - 8 - suffix.len();
    format!("{}-target-{suffix}", &base[..base.len().min(room)])
}

/// The next phase and, for Failed, why — from the VMI and the target pod.
pub fn next_phase(
    current: MigrationPhase,
    vmi: Option<(VmiPhase, Option<&str>)>,
    other_active: Option<&str>,
    target: Option<&PodState>,
    waited: Duration,
) -> (MigrationPhase, Option<String>) {
    use MigrationPhase::*;
    if current.is_final() {
        return (current, None);
    }
    let Some((vmi_phase, _node)) = vmi else {
        return (Failed, Some("the VMI does not exist".into()));
    };
    if vmi_phase != VmiPhase::Running {
        return (
            Failed,
            Some(format!(
                "the VMI is {}; only a Running VMI can migrate",
                vmi_phase.as_str()
            )),
        );
    }
    if let Some(other) = other_active {
        return (
            Failed,
            Some(format!("migration {other} of this VMI is in progress")),
        );
    }
    let Some(target) = target else {
        return match current {
            Pending => (Pending, None),
            _ => (Failed, Some("the target pod disappeared".into())),
        };
    };
    if let Some(why) = &target.unschedulable {
        return (Failed, Some(format!("no node can take the VMI: {why}")));
    }
    match target.phase.as_str() {
        "Running" => match current {
            Pending | Scheduling => (Scheduled, None),
            Scheduled => (PreparingTarget, None),
            _ => (
                Failed,
                Some(format!(
                    "the target pod runs on node {} but moving guest state is not implemented yet",
                    target.node.as_deref().unwrap_or("?")
                )),
            ),
        },
        "Failed" | "Succeeded" => (
            Failed,
            Some(
                target
                    .ended
                    .clone()
                    .unwrap_or_else(|| "the target pod ended".into()),
            ),
        ),
        _ if waited > TARGET_TIMEOUT => (
            Failed,
            Some(format!(
                "the target pod did not start within {} s",
                TARGET_TIMEOUT.as_secs()
            )),
        ),
        _ => (Scheduling, None),
    }
}

fn avoid_node(node: &str) -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_fields: Some(vec![NodeSelectorRequirement {
                        key: "metadata.name".into(),
                        operator: "NotIn".into(),
                        values: Some(vec![node.to_owned()]),
                    }]),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn reconcile(
    vmim: Arc<VirtualMachineInstanceMigration>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    measured(&ctx, "vmim", async {
        match super::fresh(&ctx.client, &*vmim, "VirtualMachineInstanceMigration").await? {
            Some(vmim) => reconcile_inner(&vmim, &ctx).await,
            None => Ok(Action::await_change()),
        }
    })
    .await
}

async fn reconcile_inner(
    vmim: &VirtualMachineInstanceMigration,
    ctx: &Context,
) -> Result<Action, Error> {
    let current = vmim.phase();
    if current.is_final() || vmim.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = namespace(vmim, "VirtualMachineInstanceMigration")?;
    let vmims: Api<VirtualMachineInstanceMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let vmi = vmis.get_opt(&vmim.spec.vmi_name).await?;
    let uid = vmim.uid().unwrap_or_default();
    let target_name = target_pod_name(&vmim.spec.vmi_name, &uid);
    let mut target = pods.get_opt(&target_name).await?;

    let others = vmims.list(&Default::default()).await?;
    let other_active = others
        .items
        .iter()
        .filter(|m| {
            m.spec.vmi_name == vmim.spec.vmi_name && m.uid() != vmim.uid() && !m.phase().is_final()
        })
        .filter(|m| {
            m.phase() != MigrationPhase::Pending
                || m.meta().creation_timestamp < vmim.meta().creation_timestamp
        })
        .map(|m| m.name_any())
        .next();

    let vmi_view = vmi.as_ref().map(|v| {
        (
            v.phase(),
            v.status.as_ref().and_then(|s| s.node_name.as_deref()),
        )
    });
    if current == MigrationPhase::Pending
        && target.is_none()
        && let (Some(v), Some((VmiPhase::Running, node)), None) =
            (vmi.as_ref(), vmi_view, other_active.as_ref())
    {
        let ns = v.namespace().unwrap_or_default();
        let inputs = super::vmi::pod_inputs(v, ctx, &ns)
            .await?
            .unwrap_or_default();
        let mut pod = launcher::pod(v, &target_name, "migration-target", &ctx.launcher, &inputs)?;
        if let (Some(spec), Some(node)) = (pod.spec.as_mut(), node) {
            spec.affinity = Some(avoid_node(node));
        }
        pod.metadata.owner_references = vmim.controller_owner_ref(&()).map(|r| vec![r]);
        let params = PostParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        match pods.create(&params, &pod).await {
            Ok(p) => target = Some(p),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let waited = vmim
        .meta()
        .creation_timestamp
        .as_ref()
        .and_then(|t| Duration::try_from(now().0.duration_since(t.0)).ok())
        .unwrap_or_default();
    let target_state = target.as_ref().map(PodState::of);
    let (phase, reason) = next_phase(
        current,
        vmi_view,
        other_active.as_deref(),
        target_state.as_ref(),
        waited,
    );
    if phase == current && vmim.status.as_ref().and_then(|s| s.phase).is_some() {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let mut status: VirtualMachineInstanceMigrationStatus = vmim.status.clone().unwrap_or_default();
    status.phase = Some(phase);
    status.phase_transition_timestamps.push(PhaseTransition {
        phase,
        phase_transition_timestamp: now(),
    });
    status.target_pod = target.as_ref().map(|p| p.name_any());
    if phase == MigrationPhase::Failed {
        status.reason = reason.clone();
        if target.is_some() {
            let _ = pods.delete(&target_name, &DeleteParams::default()).await;
        }
        ctx.event(
            vmim,
            EventType::Warning,
            "FailedMigration",
            "Migrate",
            format!(
                "migration of {} failed: {}",
                vmim.spec.vmi_name,
                reason.as_deref().unwrap_or("unknown reason")
            ),
        )
        .await;
    }
    apply_status(&vmims, vmim, &status).await?;
    Ok(if phase.is_final() {
        Action::await_change()
    } else {
        Action::requeue(Duration::from_secs(2))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str) -> PodState {
        PodState {
            phase: phase.into(),
            node: Some("n2".into()),
            unschedulable: None,
            ended: None,
            image_pull: None,
        }
    }

    #[test]
    fn a_migration_advances_or_fails_with_a_reason() {
        use MigrationPhase::*;
        let running = Some((VmiPhase::Running, Some("n1")));
        let d = Duration::from_secs(1);
        assert_eq!(next_phase(Pending, None, None, None, d).0, Failed);
        let (p, why) = next_phase(Pending, Some((VmiPhase::Scheduled, None)), None, None, d);
        assert_eq!(
            (p, why.as_deref()),
            (
                Failed,
                Some("the VMI is Scheduled; only a Running VMI can migrate")
            )
        );
        assert_eq!(next_phase(Pending, running, Some("m0"), None, d).0, Failed);
        assert_eq!(
            next_phase(Scheduling, running, None, Some(&pod("Pending")), d).0,
            Scheduling
        );
        assert_eq!(
            next_phase(Scheduling, running, None, Some(&pod("Running")), d).0,
            Scheduled
        );
        assert_eq!(
            next_phase(Scheduled, running, None, Some(&pod("Running")), d).0,
            PreparingTarget
        );
        assert_eq!(
            next_phase(PreparingTarget, running, None, Some(&pod("Running")), d).0,
            Failed
        );
        let mut stuck = pod("Pending");
        stuck.unschedulable = Some("0/1 nodes are available".into());
        let (p, why) = next_phase(Scheduling, running, None, Some(&stuck), d);
        assert_eq!(
            (p, why.as_deref()),
            (
                Failed,
                Some("no node can take the VMI: 0/1 nodes are available")
            )
        );
        assert_eq!(
            next_phase(
                Scheduling,
                running,
                None,
                Some(&pod("Pending")),
                TARGET_TIMEOUT * 2
            )
            .0,
            Failed
        );
        assert_eq!(next_phase(Failed, running, None, None, d).0, Failed);
    }

    #[test]
    fn target_pod_names_are_bounded_and_distinct_per_migration() {
        let a = target_pod_name("vm", "abcde-123");
        assert_eq!(a, "virt-launcher-vm-target-abcde");
        assert!(target_pod_name(&"x".repeat(300), "abcde").len() <= 253);
    }
}
