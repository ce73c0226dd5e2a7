//! `VirtualMachineInstance`: one running (or about to run) guest, executed by one launcher pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::spec::{DomainSpec, Network, Volume};
use super::status::{Condition, PhaseTransition, VmiPhase};

/// The spec of a VMI (shared with `VirtualMachine.spec.template.spec`): what the guest is and how
/// it is connected.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "ferrovirt.io",
    version = "v1alpha1",
    kind = "VirtualMachineInstance",
    plural = "virtualmachineinstances",
    singular = "virtualmachineinstance",
    shortname = "vmi",
    shortname = "vmis",
    category = "all",
    category = "ferrovirt",
    namespaced,
    status = "VirtualMachineInstanceStatus",
    doc = "A running virtual machine: the guest, its launcher pod and its devices. Usually created by a VirtualMachine.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "IP",
        type_ = "string",
        json_path = ".status.interfaces[0].ipAddress"
    ),
    printcolumn(name = "NodeName", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.domain.devices.disks) || self.domain.devices.disks.all(d, has(self.volumes) && self.volumes.exists(v, v.name == d.name))")
        .message("every disk in spec.domain.devices.disks needs a volume of the same name in spec.volumes"),
    validation = Rule::new("!has(self.domain.devices.interfaces) || self.domain.devices.interfaces.all(i, has(self.networks) && self.networks.exists(n, n.name == i.name))")
        .message("every interface in spec.domain.devices.interfaces needs a network of the same name in spec.networks"),
    validation = Rule::new("(has(self.domain.memory) && has(self.domain.memory.guest)) || (has(self.domain.resources) && has(self.domain.resources.requests) && 'memory' in self.domain.resources.requests)")
        .message("set the guest's memory: spec.domain.memory.guest or spec.domain.resources.requests.memory (for example 512Mi)")
)]
pub struct VirtualMachineInstanceSpec {
    /// The virtual hardware: CPU, memory, resources and devices.
    pub domain: DomainSpec,
    /// Networks the interfaces in domain.devices.interfaces attach to, matched by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub networks: Vec<Network>,
    /// Volumes the disks in domain.devices.disks are backed by, matched by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub volumes: Vec<Volume>,
    /// Node labels the VMI's launcher pod must match to be scheduled on a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Scheduling constraints of the launcher pod (the same as a pod's affinity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Taints the launcher pod tolerates (the same as a pod's tolerations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Seconds the guest gets to shut down after a stop request before it is killed. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub termination_grace_period_seconds: Option<i64>,
}

/// What the controller and the node agent report about a VMI.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineInstanceStatus {
    /// Where the VMI is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VmiPhase>,
    /// When each phase was entered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase_transition_timestamps: Vec<PhaseTransition<VmiPhase>>,
    /// Ready, AgentConnected, PodScheduled, Synchronized (False with the reason when the
    /// launcher pod cannot be made or its images pulled, or the VM cannot be started).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The guest's network interfaces as the node agent sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceStatus>,
    /// The node the VMI runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Why the VMI is in its phase, when that is not obvious (for example why it failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The launcher pod running this VMI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher_pod: Option<String>,
    /// The last migration of this VMI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_state: Option<MigrationState>,
}

impl VirtualMachineInstanceStatus {
    /// The phase, its history and the conditions of `types` from `vmi`'s status: what a writer
    /// of part of the status (the controller, the node agent) starts its own part from.
    pub fn shared_part(vmi: &VirtualMachineInstance, types: &[&str]) -> Self {
        let old = vmi.status.clone().unwrap_or_default();
        VirtualMachineInstanceStatus {
            phase: old.phase,
            phase_transition_timestamps: old.phase_transition_timestamps,
            conditions: old
                .conditions
                .into_iter()
                .filter(|c| types.contains(&c.type_.as_str()))
                .collect(),
            ..Default::default()
        }
    }
}

/// A guest network interface.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// The interface's name in spec.domain.devices.interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its first IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// All its IP addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    /// Its MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Its name inside the guest, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<String>,
}

/// The state of the last migration of a VMI.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationState {
    /// The VirtualMachineInstanceMigration's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_name: Option<String>,
    /// The node the VMI runs on before the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// The node it moves to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// The target launcher pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pod: Option<String>,
    /// When the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_timestamp: Option<Time>,
    /// It ended, successfully or not.
    #[serde(default)]
    pub completed: bool,
    /// It ended without moving the VMI.
    #[serde(default)]
    pub failed: bool,
}

impl VirtualMachineInstance {
    /// The phase, Pending when none is recorded yet.
    pub fn phase(&self) -> VmiPhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or(VmiPhase::Pending)
    }
    /// The Ready condition holds.
    pub fn is_ready(&self) -> bool {
        self.status.as_ref().is_some_and(|s| {
            super::status::condition(&s.conditions, "Ready").is_some_and(Condition::is_true)
        })
    }
}
