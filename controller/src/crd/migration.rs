//! `VirtualMachineInstanceMigration`: a request to move a running VMI to another node.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::{Condition, PhaseTransition};

/// The spec of a migration.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "ferrovirt.io",
    version = "v1alpha1",
    kind = "VirtualMachineInstanceMigration",
    plural = "virtualmachineinstancemigrations",
    singular = "virtualmachineinstancemigration",
    shortname = "vmim",
    shortname = "vmims",
    category = "all",
    category = "ferrovirt",
    namespaced,
    status = "VirtualMachineInstanceMigrationStatus",
    doc = "A request to live-migrate a running VirtualMachineInstance to another node.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "VMI", type_ = "string", json_path = ".spec.vmiName"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineInstanceMigrationSpec {
    /// The VMI to migrate, in the migration's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub vmi_name: String,
}

/// The phases of a migration, KubeVirt's names.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationPhase {
    /// Accepted; nothing done yet.
    Pending,
    /// The target launcher pod exists and waits for a node.
    Scheduling,
    /// The target pod runs on a node.
    Scheduled,
    /// The target VMM is being prepared to receive the guest.
    PreparingTarget,
    /// The target is ready to receive.
    TargetReady,
    /// Guest state is being transferred.
    Running,
    /// The VMI runs on the target node.
    Succeeded,
    /// The migration ended without moving the VMI; status.reason says why.
    Failed,
}

impl MigrationPhase {
    pub fn is_final(self) -> bool {
        matches!(self, MigrationPhase::Succeeded | MigrationPhase::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Pending => "Pending",
            MigrationPhase::Scheduling => "Scheduling",
            MigrationPhase::Scheduled => "Scheduled",
            MigrationPhase::PreparingTarget => "PreparingTarget",
            MigrationPhase::TargetReady => "TargetReady",
            MigrationPhase::Running => "Running",
            MigrationPhase::Succeeded => "Succeeded",
            MigrationPhase::Failed => "Failed",
        }
    }
}

/// What the controller reports about a migration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineInstanceMigrationStatus {
    /// Where the migration is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// When each phase was entered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase_transition_timestamps: Vec<PhaseTransition<MigrationPhase>>,
    /// Conditions of the migration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Why the migration failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The target launcher pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pod: Option<String>,
}

impl VirtualMachineInstanceMigration {
    pub fn phase(&self) -> MigrationPhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or(MigrationPhase::Pending)
    }
}
