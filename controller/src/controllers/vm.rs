//! VirtualMachine → VirtualMachineInstance, by run strategy; the VM's printable status.
//!
//! The VMI has the VM's name and is controlled by it. `fvctl start|stop|restart` change the run
//! strategy as virtctl does; for `Manual` (and to start a stopped `RerunOnFailure`/`Once` VM)
//! they leave a one-shot request in the [`STATE_CHANGE`] annotation that this reconciler
//! carries out and then removes.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{
    Context, Error, apply_status, controlled_by, ensure_finalizer, measured, namespace,
    remove_finalizer,
};
use crate::crd::status::{
    Condition, ConditionStatus, PrintableStatus, VmiPhase, condition, set_condition,
};
use crate::crd::vm::{RunStrategy, VirtualMachineStatus};
use crate::crd::{VirtualMachine, VirtualMachineInstance};

/// One-shot start/stop request for a VM: `Start` or `Stop`.
pub const STATE_CHANGE: &str = "ferrovirt.io/state-change-request";

/// A start or stop request left by `fvctl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Start,
    Stop,
}

impl Request {
    pub fn parse(value: &str) -> Option<Request> {
        match value {
            "Start" => Some(Request::Start),
            "Stop" => Some(Request::Stop),
            _ => None,
        }
    }
}

/// The VMI as the decision needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmiState {
    pub phase: VmiPhase,
    pub deleting: bool,
}

/// What to do about the VMI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Delete,
    Wait,
}

/// The run-strategy table (KubeVirt's semantics). `request` is consumed when the step it asks
/// for is taken or already true.
pub fn decide(strategy: RunStrategy, vmi: Option<VmiState>, request: Option<Request>) -> Step {
    if vmi.is_some_and(|v| v.deleting) {
        return Step::Wait;
    }
    let finished = vmi.map(|v| v.phase.is_final());
    match (request, vmi) {
        (Some(Request::Stop), Some(_)) => return Step::Delete,
        (Some(Request::Start), None) => return Step::Create,
        // A start request for a VMI that has finished: remove it, then create a new one.
        (Some(Request::Start), Some(v)) if v.phase.is_final() => return Step::Delete,
        _ => {}
    }
    match strategy {
        RunStrategy::Halted => match vmi {
            Some(_) => Step::Delete,
            None => Step::Wait,
        },
        RunStrategy::Always => match finished {
            None => Step::Create,
            Some(true) => Step::Delete,
            Some(false) => Step::Wait,
        },
        RunStrategy::RerunOnFailure => match vmi {
            None => Step::Create,
            Some(v) if v.phase == VmiPhase::Failed => Step::Delete,
            Some(_) => Step::Wait,
        },
        // Once: created when the VM first runs; a finished VMI stays as the record of that run.
        RunStrategy::Once => match vmi {
            None => Step::Create,
            Some(_) => Step::Wait,
        },
        RunStrategy::Manual => Step::Wait,
    }
}

/// Whether `request` has been carried out, given the VMI now.
fn request_done(request: Request, vmi: Option<VmiState>) -> bool {
    match request {
        Request::Stop => vmi.is_none(),
        Request::Start => vmi.is_some_and(|v| !v.deleting && !v.phase.is_final()),
    }
}

/// The printable status and conditions of a VM whose VMI is `vmi`.
pub fn status(
    vm: &VirtualMachine,
    strategy: RunStrategy,
    vmi: Option<&VirtualMachineInstance>,
    next: Step,
) -> VirtualMachineStatus {
    let deleting_vm = vm.meta().deletion_timestamp.is_some();
    let vmi_status = vmi.and_then(|v| v.status.as_ref());
    let unschedulable = vmi_status
        .and_then(|s| condition(&s.conditions, "PodScheduled"))
        .filter(|c| {
            c.status == ConditionStatus::False && c.reason.as_deref() == Some("Unschedulable")
        });
    let printable = match vmi {
        _ if deleting_vm => PrintableStatus::Terminating,
        None => match next {
            Step::Create => PrintableStatus::Starting,
            _ => PrintableStatus::Stopped,
        },
        Some(v) if v.meta().deletion_timestamp.is_some() => PrintableStatus::Stopping,
        Some(_) if unschedulable.is_some() => PrintableStatus::ErrorUnschedulable,
        Some(v) => match v.phase() {
            VmiPhase::Pending | VmiPhase::Scheduling | VmiPhase::Scheduled => {
                PrintableStatus::Starting
            }
            VmiPhase::Running => PrintableStatus::Running,
            VmiPhase::Succeeded | VmiPhase::Failed
                if next == Step::Delete && strategy != RunStrategy::Halted =>
            {
                PrintableStatus::Starting
            }
            VmiPhase::Succeeded | VmiPhase::Failed => PrintableStatus::Stopped,
            VmiPhase::Unknown => PrintableStatus::Unknown,
        },
    };
    let ready = vmi.is_some_and(|v| v.is_ready());
    let mut conditions = Vec::new();
    let ready_condition = match vmi {
        None => Condition::new(
            "Ready",
            ConditionStatus::False,
            "VMINotExists",
            "the VM has no VMI",
        ),
        Some(_) if ready => Condition::new(
            "Ready",
            ConditionStatus::True,
            "VMIReady",
            "the VMI is ready",
        ),
        Some(v) => Condition::new(
            "Ready",
            ConditionStatus::False,
            "VMINotReady",
            format!("the VMI is {}", v.phase().as_str()),
        ),
    };
    conditions.push(ready_condition);
    if let Some(c) = unschedulable {
        conditions.push(Condition {
            last_transition_time: None,
            ..c.clone()
        });
    }
    VirtualMachineStatus {
        printable_status: Some(printable),
        ready,
        created: vmi.is_some(),
        conditions,
    }
}

/// The VMI a VM creates: its name, the template's labels and annotations, controlled by the VM.
pub fn vmi_for(vm: &VirtualMachine) -> VirtualMachineInstance {
    let template = &vm.spec.template;
    let meta = template.metadata.clone().unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert(
        "ferrovirt.io/vm".into(),
        vm.name_any().chars().take(63).collect(),
    );
    VirtualMachineInstance {
        metadata: ObjectMeta {
            name: Some(vm.name_any()),
            namespace: vm.namespace(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: vm.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    measured(&ctx, "vm", async {
        match super::fresh(&ctx.client, &*vm, "VirtualMachine").await? {
            Some(vm) => reconcile_inner(&vm, &ctx).await,
            None => Ok(Action::await_change()),
        }
    })
    .await
}

async fn reconcile_inner(vm: &VirtualMachine, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace(vm, "VirtualMachine")?;
    let name = vm.name_any();
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let found = vmis.get_opt(&name).await?;
    let vmi = found
        .as_ref()
        .filter(|v| controlled_by(*v, vm.uid().as_deref()));
    if found.is_some() && vmi.is_none() {
        ctx.event(vm, EventType::Warning, "FailedCreate", "CreateVMI",
            format!("a VirtualMachineInstance named {name} exists and is not this VM's; delete or rename it")).await;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let state = vmi.map(|v| VmiState {
        phase: v.phase(),
        deleting: v.meta().deletion_timestamp.is_some(),
    });
    let strategy = vm.spec.effective_run_strategy();

    if vm.meta().deletion_timestamp.is_some() {
        if let Some(v) = vmi {
            if !state.is_some_and(|s| s.deleting) {
                delete_vmi(ctx, vm, &vmis, v, "the VM is being deleted").await?;
            }
            apply_status(&vms, vm, &status(vm, strategy, vmi, Step::Wait)).await?;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        remove_finalizer(&vms, vm).await?;
        return Ok(Action::await_change());
    }
    ensure_finalizer(&vms, vm).await?;

    let request = vm
        .annotations()
        .get(STATE_CHANGE)
        .and_then(|r| Request::parse(r));
    let step = decide(strategy, state, request);
    match step {
        Step::Create => {
            let new = vmi_for(vm);
            match vmis
                .create(
                    &PostParams {
                        field_manager: Some(super::MANAGER.into()),
                        ..Default::default()
                    },
                    &new,
                )
                .await
            {
                Ok(_) => {
                    ctx.event(
                        vm,
                        EventType::Normal,
                        "SuccessfulCreate",
                        "CreateVMI",
                        format!("created VirtualMachineInstance {name}"),
                    )
                    .await;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    ctx.event(
                        vm,
                        EventType::Warning,
                        "FailedCreate",
                        "CreateVMI",
                        format!("cannot create VirtualMachineInstance {name}: {e}"),
                    )
                    .await;
                    return Err(e.into());
                }
            }
        }
        Step::Delete => {
            if let Some(v) = vmi {
                let why = match (request, strategy) {
                    (Some(Request::Stop), _) => "stop requested",
                    (Some(Request::Start), _) => "restarting a finished VMI on request",
                    (_, RunStrategy::Halted) => "runStrategy is Halted",
                    (_, RunStrategy::Always) => "runStrategy Always restarts a finished VMI",
                    _ => "runStrategy RerunOnFailure restarts a failed VMI",
                };
                delete_vmi(ctx, vm, &vmis, v, why).await?;
            }
        }
        Step::Wait => {}
    }
    if let Some(r) = request
        && request_done(r, state)
    {
        let patch = json!({"metadata": {"annotations": {STATE_CHANGE: null}}});
        vms.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    let new_status = status(vm, strategy, vmi, step);
    if vm.status.as_ref().map(|s| strip_times(s.clone())) != Some(strip_times(new_status.clone())) {
        apply_status(&vms, vm, &with_times(new_status, vm.status.as_ref())).await?;
    }
    Ok(match step {
        Step::Wait => Action::requeue(Duration::from_secs(300)),
        _ => Action::requeue(Duration::from_secs(1)),
    })
}

/// Conditions carry transition times; compare statuses without them.
fn strip_times(mut s: VirtualMachineStatus) -> VirtualMachineStatus {
    for c in &mut s.conditions {
        c.last_transition_time = None;
        c.last_probe_time = None;
    }
    s
}

/// Stamps transition times on `new`'s conditions through [`set_condition`], which keeps the old
/// time where the status holds.
fn with_times(
    mut new: VirtualMachineStatus,
    old: Option<&VirtualMachineStatus>,
) -> VirtualMachineStatus {
    let now = super::now();
    let mut merged = old.map(|s| s.conditions.clone()).unwrap_or_default();
    merged.retain(|o| new.conditions.iter().any(|c| c.type_ == o.type_));
    for c in std::mem::take(&mut new.conditions) {
        set_condition(&mut merged, c, &now);
    }
    new.conditions = merged;
    new
}

async fn delete_vmi(
    ctx: &Context,
    vm: &VirtualMachine,
    vmis: &Api<VirtualMachineInstance>,
    vmi: &VirtualMachineInstance,
    why: &str,
) -> Result<(), Error> {
    let name = vmi.name_any();
    let params = DeleteParams {
        preconditions: vmi.uid().map(|uid| kube::api::Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..Default::default()
    };
    match vmis.delete(&name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    ctx.event(
        vm,
        EventType::Normal,
        "SuccessfulDelete",
        "DeleteVMI",
        format!("stopping VirtualMachineInstance {name}: {why}"),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmi(phase: VmiPhase) -> Option<VmiState> {
        Some(VmiState {
            phase,
            deleting: false,
        })
    }

    #[test]
    fn run_strategy_table() {
        use RunStrategy::*;
        use Step::*;
        use VmiPhase::*;
        let cases = [
            (Always, None, None, Create),
            (Always, vmi(Running), None, Wait),
            (Always, vmi(Succeeded), None, Delete),
            (Always, vmi(Failed), None, Delete),
            (RerunOnFailure, None, None, Create),
            (RerunOnFailure, vmi(Failed), None, Delete),
            (RerunOnFailure, vmi(Succeeded), None, Wait),
            (Once, None, None, Create),
            (Once, vmi(Failed), None, Wait),
            (Once, vmi(Succeeded), None, Wait),
            (Halted, None, None, Wait),
            (Halted, vmi(Running), None, Delete),
            (Manual, None, None, Wait),
            (Manual, vmi(Failed), None, Wait),
            (Manual, None, Some(Request::Start), Create),
            (Manual, vmi(Running), Some(Request::Stop), Delete),
            (Manual, vmi(Succeeded), Some(Request::Start), Delete),
            (Manual, vmi(Running), Some(Request::Start), Wait),
            (
                Always,
                Some(VmiState {
                    phase: Failed,
                    deleting: true,
                }),
                None,
                Wait,
            ),
        ];
        for (strategy, state, request, want) in cases {
            assert_eq!(
                decide(strategy, state, request),
                want,
                "{strategy:?} {state:?} {request:?}"
            );
        }
    }

    #[test]
    fn requests_are_done_when_their_effect_holds() {
        assert!(request_done(Request::Stop, None));
        assert!(!request_done(Request::Stop, vmi(VmiPhase::Running)));
        assert!(request_done(Request::Start, vmi(VmiPhase::Scheduling)));
        assert!(!request_done(Request::Start, vmi(VmiPhase::Succeeded)));
        assert!(!request_done(Request::Start, None));
    }

    fn vm(yaml: &str) -> VirtualMachine {
        serde_yaml::from_str(yaml).expect("parse")
    }

    const VM: &str = r#"
apiVersion: ferrovirt.io/v1alpha1
kind: VirtualMachine
metadata: {name: db, namespace: prod, uid: 11111111-2222-4333-8444-555555555555}
spec:
  runStrategy: Always
  template:
    metadata: {labels: {app: db}, annotations: {note: x}}
    spec: {domain: {memory: {guest: 1Gi}}}
"#;

    #[test]
    fn the_vmi_takes_the_template_and_is_controlled_by_the_vm() {
        let vm = vm(VM);
        let vmi = vmi_for(&vm);
        assert_eq!(vmi.name_any(), "db");
        assert_eq!(vmi.namespace().as_deref(), Some("prod"));
        assert_eq!(vmi.labels()["app"], "db");
        assert_eq!(vmi.labels()["ferrovirt.io/vm"], "db");
        assert_eq!(vmi.annotations()["note"], "x");
        assert!(controlled_by(
            &vmi,
            Some("11111111-2222-4333-8444-555555555555")
        ));
        assert_eq!(vmi.spec, vm.spec.template.spec);
    }

    #[test]
    fn printable_status_follows_the_vmi() {
        let vm = vm(VM);
        let s = status(&vm, RunStrategy::Halted, None, Step::Wait);
        assert_eq!(
            (s.printable_status, s.created, s.ready),
            (Some(PrintableStatus::Stopped), false, false)
        );
        let s = status(&vm, RunStrategy::Always, None, Step::Create);
        assert_eq!(s.printable_status, Some(PrintableStatus::Starting));
        let mut v = vmi_for(&vm);
        v.status = Some(crate::crd::vmi::VirtualMachineInstanceStatus {
            phase: Some(VmiPhase::Running),
            conditions: vec![Condition::new(
                "Ready",
                ConditionStatus::True,
                "GuestReady",
                "",
            )],
            ..Default::default()
        });
        let s = status(&vm, RunStrategy::Always, Some(&v), Step::Wait);
        assert_eq!(
            (s.printable_status, s.created, s.ready),
            (Some(PrintableStatus::Running), true, true)
        );
        v.status = Some(crate::crd::vmi::VirtualMachineInstanceStatus {
            phase: Some(VmiPhase::Scheduling),
            conditions: vec![Condition::new(
                "PodScheduled",
                ConditionStatus::False,
                "Unschedulable",
                "0/1 nodes are available",
            )],
            ..Default::default()
        });
        let s = status(&vm, RunStrategy::Always, Some(&v), Step::Wait);
        assert_eq!(
            s.printable_status,
            Some(PrintableStatus::ErrorUnschedulable)
        );
        assert!(s.conditions.iter().any(|c| c.type_ == "PodScheduled"));
    }
}
