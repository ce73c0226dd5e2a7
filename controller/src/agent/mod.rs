//! `ferrovirt-agent`, the per-node agent (virt-handler's job). It serves kubelet's device-plugin
//! API for `/dev/kvm` and SR-IOV VFs ([`device_plugin`]), and for every launcher pod on its
//! node it starts the VMI's backends inside the pod's cgroups, hands the launcher's VMM its
//! configuration and boots the VM, reports the VMI `Running` with its interfaces, and removes
//! every backend and socket when the pod ends. It keeps what it started in the VMI's host
//! directory, so a restarted agent adopts running VMs instead of starting them twice.
//!
//! It applies, under its own field manager [`MANAGER`], the VMI status fields the controller
//! leaves to it (see `controllers`): `phase: Running`, `interfaces`, `nodeName` and the `Ready`
//! and `AgentConnected` conditions, or a `Synchronized=False` condition saying why a VMI could
//! not be started (after which it stops the VMM, so the pod and the VMI fail).

pub mod cli;
pub mod device_plugin;
pub mod launch;
pub mod vmm_api;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use crate::controllers::{apply_status_as, now};
use crate::crd::status::PhaseTransition;
use crate::crd::status::set_condition;
use crate::crd::vmi::VirtualMachineInstanceStatus;
use crate::crd::{Condition, ConditionStatus, VirtualMachineInstance, VmiPhase};
use crate::launcher::{COMPUTE, LABEL_ROLE, LABEL_VMI_UID, container_disk_container};
use crate::node::process::Binaries;
use launch::{Children, Launch, Started, VolumeSources};

/// The field manager of the agent's status writes.
pub const MANAGER: &str = "ferrovirt-agent";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "launcher pod {0} has no {LABEL_VMI_UID} label; it was not made by ferrovirt-controller"
    )]
    NoUid(String),
    #[error("API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot write VMI status: {0}")]
    Status(#[from] crate::controllers::Error),
}

/// What the agent needs to know (its flags).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name.
    pub node: String,
    pub bin: Binaries,
    /// ferrovirt-cni's state directory (its records name each pod's TAPs).
    pub cni_state_dir: PathBuf,
    /// The node's per-VMI directories (`launcher::VMIS_HOST_DIR`).
    pub vmis_dir: PathBuf,
}

struct Ctx {
    client: Client,
    cfg: AgentConfig,
    children: Children,
    /// VMIs (by UID) whose Running status this agent process has written or seen.
    reported: Mutex<HashSet<String>>,
}

/// Runs the agent until `shutdown` completes. The VMs keep running: a restarted agent adopts
/// them.
pub async fn run(
    client: Client,
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let pods: Api<Pod> = Api::all(client.clone());
    let watch = watcher::Config::default()
        .fields(&format!("spec.nodeName={}", cfg.node))
        .labels(&format!("{LABEL_ROLE}=launcher"));
    let ctx = Arc::new(Ctx {
        client,
        cfg,
        children: Mutex::new(Vec::new()),
        reported: Mutex::new(HashSet::new()),
    });
    let controller = Controller::new(pods, watch);
    let store = controller.store();
    let sweeper = tokio::spawn(sweep(store, ctx.clone()));
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
    sweeper.abort();
}

fn error_policy(pod: Arc<Pod>, error: &Error, _: Arc<Ctx>) -> Action {
    if let Error::Status(e) = error
        && e.is_conflict()
    {
        // The controller wrote the VMI since we read it: read it again and retry at once.
        return Action::requeue(Duration::from_millis(50));
    }
    tracing::warn!(pod = %pod.name_any(), "{error}");
    Action::requeue(Duration::from_secs(2))
}

/// Where the pod is in its life, as far as the agent cares.
#[derive(Debug, PartialEq, Eq)]
enum PodStage {
    /// The compute container has not started yet.
    Waiting,
    /// The compute container runs (the VMM waits for its configuration or runs the VM).
    Running,
    /// The pod is being deleted or its container has ended.
    Ending,
}

fn stage(pod: &Pod) -> PodStage {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodStage::Ending;
    }
    let Some(status) = &pod.status else {
        return PodStage::Waiting;
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return PodStage::Ending;
    }
    let compute = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == COMPUTE)
        .and_then(|c| c.state.as_ref());
    match compute {
        Some(s) if s.terminated.is_some() => PodStage::Ending,
        Some(s) if s.running.is_some() => PodStage::Running,
        _ => PodStage::Waiting,
    }
}

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let uid = pod
        .labels()
        .get(LABEL_VMI_UID)
        .cloned()
        .ok_or_else(|| Error::NoUid(pod.name_any()))?;
    let dir = ctx.cfg.vmis_dir.join(&uid);
    let started = Started::load(&dir);
    match stage(&pod) {
        PodStage::Waiting => Ok(Action::await_change()),
        PodStage::Ending => {
            if started.as_ref().is_some_and(|s| s.vmm_alive(&dir)) {
                // The VMM is stopping the guest; its backends serve it until it is gone.
                return Ok(Action::requeue(Duration::from_millis(500)));
            }
            launch::teardown(&dir).await;
            report_stopped(&ctx, &pod, &uid).await?;
            forget(&ctx, &uid);
            Ok(Action::await_change())
        }
        PodStage::Running => match started {
            Some(started) if started.booted && started.vmm_alive(&dir) => {
                if !reported(&ctx, &uid) {
                    // Adopted after an agent restart: make sure the status says so.
                    let vmi = vmi_of(&ctx, &pod).await?;
                    if let Some(vmi) = vmi.filter(|v| v.uid().as_deref() == Some(uid.as_str())) {
                        report_running(&ctx, &vmi, &started).await?;
                    }
                }
                Ok(Action::await_change())
            }
            // A start that an earlier agent did not finish: finish it.
            Some(started) if started.vmm_alive(&dir) => start(&pod, &ctx, &uid, &dir).await,
            // The record outlived its VMM, which the kubelet has not noticed yet.
            Some(_) => Ok(Action::requeue(Duration::from_millis(500))),
            None => start(&pod, &ctx, &uid, &dir).await,
        },
    }
}

async fn start(pod: &Pod, ctx: &Ctx, uid: &str, dir: &std::path::Path) -> Result<Action, Error> {
    if !dir.join(launch::API_SOCKET).exists() {
        // The VMM is starting up; it creates its socket within milliseconds of the container
        // starting. A container that has run for a while without one is not our launcher:
        // look again only now and then.
        let young = container_started(pod)
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < Duration::from_secs(10));
        let wait = if young { 100 } else { 5000 };
        return Ok(Action::requeue(Duration::from_millis(wait)));
    }
    let Some(vmi) = vmi_of(ctx, pod)
        .await?
        .filter(|v| v.uid().as_deref() == Some(uid))
    else {
        return Ok(Action::await_change());
    };
    let volumes = VolumeSources {
        claim_sizes: claim_sizes(ctx, &vmi).await?,
        container_roots: container_roots(pod, &vmi),
    };
    let launch = Launch {
        bin: &ctx.cfg.bin,
        dir,
        cni_state_dir: &ctx.cfg.cni_state_dir,
        volumes: &volumes,
    };
    match launch.start(&vmi, &ctx.children).await {
        Ok(started) => {
            tracing::info!(vmi = %vmi.name_any(), pid = started.vmm_pid, "VM booted");
            report_running(ctx, &vmi, &started).await?;
            Ok(Action::await_change())
        }
        Err(e) => {
            tracing::warn!(vmi = %vmi.name_any(), "cannot start: {e}");
            report_failure(ctx, &vmi, &e.to_string()).await?;
            // Stop the VMM so the pod (and with it the VMI) fails; then clean up.
            if let Ok(pid) = vmm_api::peer_pid(&dir.join(launch::API_SOCKET)).await {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            launch::teardown(dir).await;
            Ok(Action::await_change())
        }
    }
}

/// Volume name → the capacity of its PersistentVolumeClaim (bound capacity, else the
/// request), in bytes; claims without one are left out.
async fn claim_sizes(
    ctx: &Ctx,
    vmi: &VirtualMachineInstance,
) -> Result<BTreeMap<String, u64>, Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &vmi.namespace().unwrap_or_default());
    let mut sizes = BTreeMap::new();
    for volume in &vmi.spec.volumes {
        let Some(source) = &volume.persistent_volume_claim else {
            continue;
        };
        let Some(claim) = api.get_opt(&source.claim_name).await? else {
            continue;
        };
        let bound = claim
            .status
            .and_then(|s| s.capacity)
            .and_then(|c| c.get("storage").cloned());
        let requested = claim
            .spec
            .and_then(|s| s.resources)
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").cloned());
        if let Some(bytes) = bound
            .or(requested)
            .and_then(|q| crate::quantity::to_bytes(&q.0).ok())
        {
            sizes.insert(volume.name.clone(), bytes & !((1 << 20) - 1));
        }
    }
    Ok(sizes)
}

/// Volume name → `/proc/PID/root` of its containerDisk container, for those that run.
fn container_roots(pod: &Pod, vmi: &VirtualMachineInstance) -> BTreeMap<String, PathBuf> {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref());
    let mut roots = BTreeMap::new();
    for (index, volume) in vmi.spec.volumes.iter().enumerate() {
        if volume.container_disk.is_none() {
            continue;
        }
        let name = container_disk_container(index);
        let id = statuses
            .into_iter()
            .flatten()
            .find(|s| s.name == name && s.state.as_ref().is_some_and(|s| s.running.is_some()))
            .and_then(|s| s.container_id.as_deref())
            .and_then(|id| id.split_once("://").map(|(_, id)| id.to_owned()));
        if let Some(pid) = id.as_deref().and_then(launch::container_pid) {
            roots.insert(
                volume.name.clone(),
                PathBuf::from(format!("/proc/{pid}/root")),
            );
        }
    }
    roots
}

/// When the compute container started running.
fn container_started(pod: &Pod) -> Option<std::time::SystemTime> {
    let started = pod
        .status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == COMPUTE)?
        .state
        .as_ref()?
        .running
        .as_ref()?
        .started_at
        .as_ref()?;
    let since_epoch = u64::try_from(started.0.as_second()).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(since_epoch))
}

async fn vmi_of(ctx: &Ctx, pod: &Pod) -> Result<Option<VirtualMachineInstance>, Error> {
    let Some(name) = pod.annotations().get("ferrovirt.io/vmi") else {
        return Ok(None);
    };
    let api: Api<VirtualMachineInstance> =
        Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    Ok(api.get_opt(name).await?)
}

fn reported(ctx: &Ctx, uid: &str) -> bool {
    ctx.reported
        .lock()
        .map(|r| r.contains(uid))
        .unwrap_or(false)
}

fn forget(ctx: &Ctx, uid: &str) {
    if let Ok(mut r) = ctx.reported.lock() {
        r.remove(uid);
    }
}

/// The agent's part of a VMI's status, starting from what is there now.
fn agent_status(vmi: &VirtualMachineInstance) -> VirtualMachineInstanceStatus {
    VirtualMachineInstanceStatus::shared_part(vmi, &["Ready", "AgentConnected"])
}

async fn report_running(
    ctx: &Ctx,
    vmi: &VirtualMachineInstance,
    started: &Started,
) -> Result<(), Error> {
    let mut status = agent_status(vmi);
    if status.phase.is_some_and(|p| p.is_final()) {
        return Ok(());
    }
    let stamp = now();
    if status.phase != Some(VmiPhase::Running) {
        status.phase = Some(VmiPhase::Running);
        status.phase_transition_timestamps.push(PhaseTransition {
            phase: VmiPhase::Running,
            phase_transition_timestamp: stamp.clone(),
        });
    }
    status.node_name = Some(ctx.cfg.node.clone());
    status.interfaces = started.interfaces.clone();
    for (type_, reason, message) in [
        ("Ready", "GuestRunning", "the VM's vCPUs run"),
        (
            "AgentConnected",
            "AgentConnected",
            "the node agent manages this VMI",
        ),
    ] {
        set_condition(
            &mut status.conditions,
            Condition::new(type_, ConditionStatus::True, reason, message),
            &stamp,
        );
    }
    let api: Api<VirtualMachineInstance> =
        Api::namespaced(ctx.client.clone(), &vmi.namespace().unwrap_or_default());
    apply_status_as(
        &api,
        vmi,
        &status,
        MANAGER,
        vmi.resource_version().as_deref(),
    )
    .await?;
    if let Some(uid) = vmi.uid()
        && let Ok(mut r) = ctx.reported.lock()
    {
        r.insert(uid);
    }
    Ok(())
}

/// `Ready=False` on a VMI whose VM has ended (the controller writes the final phase), when
/// the VMI is still there and says Ready.
async fn report_stopped(ctx: &Ctx, pod: &Pod, uid: &str) -> Result<(), Error> {
    let Some(vmi) = vmi_of(ctx, pod)
        .await?
        .filter(|v| v.uid().as_deref() == Some(uid) && v.metadata.deletion_timestamp.is_none())
    else {
        return Ok(());
    };
    let mut status = agent_status(&vmi);
    // The agent's other fields stay as they were (a field left out of an apply is dropped).
    if let Some(old) = &vmi.status {
        status.node_name = old.node_name.clone();
        status.interfaces = old.interfaces.clone();
    }
    let ready = |c: &Condition| c.type_ == "Ready" && c.status == ConditionStatus::True;
    if !status.conditions.iter().any(ready) {
        return Ok(());
    }
    set_condition(
        &mut status.conditions,
        Condition::new(
            "Ready",
            ConditionStatus::False,
            "VMStopped",
            "the VM has stopped and its node resources are released",
        ),
        &now(),
    );
    let api: Api<VirtualMachineInstance> =
        Api::namespaced(ctx.client.clone(), &vmi.namespace().unwrap_or_default());
    match apply_status_as(
        &api,
        &vmi,
        &status,
        MANAGER,
        vmi.resource_version().as_deref(),
    )
    .await
    {
        Err(crate::controllers::Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(()),
        other => Ok(other?),
    }
}

async fn report_failure(ctx: &Ctx, vmi: &VirtualMachineInstance, why: &str) -> Result<(), Error> {
    let mut status = agent_status(vmi);
    status.conditions.retain(|c| c.type_ != "Ready");
    set_condition(
        &mut status.conditions,
        Condition::new("Synchronized", ConditionStatus::False, "LaunchFailed", why),
        &now(),
    );
    status.reason = Some(why.to_owned());
    let api: Api<VirtualMachineInstance> =
        Api::namespaced(ctx.client.clone(), &vmi.namespace().unwrap_or_default());
    apply_status_as(&api, vmi, &status, MANAGER, None).await?;
    Ok(())
}

/// How old a VMI directory with nothing started in it must be before the sweep removes it.
const UNSTARTED_GRACE: Duration = Duration::from_secs(300);

/// Every 2 s: reaps ended backends, starts dead backends of running VMs again, and tears down
/// VMI directories whose launcher pod is gone
/// (deleted while the agent was away, or whose last event the controller dropped).
async fn sweep(store: Store<Pod>, ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        if let Ok(mut children) = ctx.children.lock() {
            children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        }
        // Not `wait_until_ready`: the controller's store never reports ready here. Before the
        // first list it is empty, which only delays restarts; teardowns check the VMM anyway.
        let live: HashSet<String> = store
            .state()
            .iter()
            .filter_map(|p| p.labels().get(LABEL_VMI_UID).cloned())
            .collect();
        let Ok(entries) = std::fs::read_dir(&ctx.cfg.vmis_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if live.contains(&uid) {
                let dir = entry.path();
                let respawned = tokio::task::block_in_place(|| {
                    launch::respawn_dead_backends(&dir, &ctx.children)
                });
                if let Err(e) = respawned {
                    tracing::warn!(vmi = %uid, "cannot restart a backend: {e}");
                }
                continue;
            }
            let dir = entry.path();
            let abandoned = match Started::load(&dir) {
                Some(started) => !started.vmm_alive(&dir),
                // Made by the kubelet for a pod that never got as far as its VMM: only once
                // surely not a pod starting up on another agent's cluster sharing this host.
                None => entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > UNSTARTED_GRACE),
            };
            if !abandoned {
                continue;
            }
            launch::teardown(&dir).await;
            forget(&ctx, &uid);
        }
    }
}
