//! Status vocabulary shared by the kinds: phases, printable statuses and conditions, with
//! KubeVirt's names so dashboards and scripts written for KubeVirt read ours.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The lifecycle phase of a VMI.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum VmiPhase {
    /// Accepted; no launcher pod yet.
    Pending,
    /// The launcher pod exists and waits for a node.
    Scheduling,
    /// The launcher pod runs on a node; the VM is being started there.
    Scheduled,
    /// The node agent reports the guest running.
    Running,
    /// The guest stopped on its own or by request with exit status 0.
    Succeeded,
    /// The guest or its launcher failed.
    Failed,
    /// The VMI's state cannot be determined (its node is unreachable).
    Unknown,
}

impl VmiPhase {
    /// Succeeded and Failed are final: a VMI never leaves them.
    pub fn is_final(self) -> bool {
        matches!(self, VmiPhase::Succeeded | VmiPhase::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            VmiPhase::Pending => "Pending",
            VmiPhase::Scheduling => "Scheduling",
            VmiPhase::Scheduled => "Scheduled",
            VmiPhase::Running => "Running",
            VmiPhase::Succeeded => "Succeeded",
            VmiPhase::Failed => "Failed",
            VmiPhase::Unknown => "Unknown",
        }
    }
}

/// When a VMI or migration entered a phase.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition<P> {
    /// The phase entered.
    pub phase: P,
    /// When it was entered.
    pub phase_transition_timestamp: Time,
}

/// What `kubectl get vm` shows in its STATUS column.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrintableStatus {
    /// No VMI, and none is wanted.
    Stopped,
    /// A VMI is wanted and on its way (created, scheduling, starting on a node).
    Starting,
    /// The guest runs.
    Running,
    /// The VMI is being stopped.
    Stopping,
    /// The VM is being deleted.
    Terminating,
    /// The VMI is moving to another node.
    Migrating,
    /// The launcher pod cannot be placed on any node; the condition says why.
    ErrorUnschedulable,
    /// The VMI could not be created; the events say why.
    ErrorFailedCreate,
    /// The state cannot be determined.
    Unknown,
}

/// True, False or Unknown, as in every Kubernetes condition.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// A condition of a VM, VMI or migration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// What the condition is about: Ready, AgentConnected, PodScheduled, Synchronized, ...
    #[serde(rename = "type")]
    pub type_: String,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// One word, CamelCase, saying why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Details for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// When the condition was last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
}

impl Condition {
    pub fn new(
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Condition {
            type_: type_.to_owned(),
            status,
            reason: Some(reason.to_owned()),
            message: Some(message.into()),
            last_transition_time: None,
            last_probe_time: None,
        }
    }
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Finds the condition of `type_`.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Sets `new` in `conditions`, keeping `lastTransitionTime` when the status did not change and
/// stamping `now` when it did.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition, now: &Time) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            new.last_transition_time = if old.status == new.status {
                old.last_transition_time.clone()
            } else {
                Some(now.clone())
            };
            *old = new;
        }
        None => {
            new.last_transition_time = Some(now.clone());
            conditions.push(new);
        }
    }
}

/// Removes the condition of `type_`; true if there was one.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    before != conditions.len()
}
