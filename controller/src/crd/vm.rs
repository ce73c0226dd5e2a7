//! `VirtualMachine`: a VM that persists across starts; the controller keeps a VMI for it
//! according to its run strategy.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::{Condition, PrintableStatus};
use super::vmi::VirtualMachineInstanceSpec;

/// The spec of a VM.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "ferrovirt.io",
    version = "v1alpha1",
    kind = "VirtualMachine",
    plural = "virtualmachines",
    singular = "virtualmachine",
    shortname = "vm",
    shortname = "vms",
    category = "all",
    category = "ferrovirt",
    namespaced,
    status = "VirtualMachineStatus",
    doc = "A virtual machine that persists across starts and stops; the controller runs a VirtualMachineInstance for it according to spec.runStrategy.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.printableStatus"
    ),
    printcolumn(name = "Ready", type_ = "boolean", json_path = ".status.ready")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.running) && has(self.runStrategy))")
        .message("set spec.runStrategy or the deprecated spec.running, not both (runStrategy: Always is running: true)")
)]
pub struct VirtualMachineSpec {
    /// Deprecated: true is runStrategy Always, false is Halted. Use runStrategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
    /// When a VMI runs: Always, RerunOnFailure, Manual, Halted or Once. Default Halted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_strategy: Option<RunStrategy>,
    /// The VMI the controller creates.
    pub template: VirtualMachineInstanceTemplate,
}

/// When the controller runs a VMI for a VM.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStrategy {
    /// Keep a VMI running: start it, and start a new one whenever it stops.
    Always,
    /// Start a VMI, and start a new one only when it fails.
    RerunOnFailure,
    /// Start and stop only on request (`fvctl start` / `fvctl stop`).
    Manual,
    /// No VMI: stop the one running.
    Halted,
    /// Run a VMI once; whether it succeeds or fails, it is not started again.
    Once,
}

impl RunStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStrategy::Always => "Always",
            RunStrategy::RerunOnFailure => "RerunOnFailure",
            RunStrategy::Manual => "Manual",
            RunStrategy::Halted => "Halted",
            RunStrategy::Once => "Once",
        }
    }
}

/// The VMI a VM runs: its metadata and spec.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineInstanceTemplate {
    /// Labels and annotations the VMI gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
    /// The VMI's spec.
    pub spec: VirtualMachineInstanceSpec,
}

/// Metadata a template gives the objects made from it. Other ObjectMeta fields are accepted
/// and ignored, as KubeVirt manifests carry `creationTimestamp: null` here.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct TemplateMetadata {
    /// Labels, matched by presets and selectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// What the controller reports about a VM.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// A one-word summary for `kubectl get vm`: Stopped, Starting, Running, Stopping, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub printable_status: Option<PrintableStatus>,
    /// The VM's VMI exists and is Ready.
    #[serde(default)]
    pub ready: bool,
    /// The VM's VMI exists.
    #[serde(default)]
    pub created: bool,
    /// Ready and Failure conditions, mirrored from the VMI and the controller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl VirtualMachineSpec {
    /// The run strategy in force: runStrategy, else the deprecated running (true → Always,
    /// false → Halted), else Halted — KubeVirt's reading.
    pub fn effective_run_strategy(&self) -> RunStrategy {
        match (self.run_strategy, self.running) {
            (Some(strategy), _) => strategy,
            (None, Some(true)) => RunStrategy::Always,
            (None, Some(false) | None) => RunStrategy::Halted,
        }
    }
}
