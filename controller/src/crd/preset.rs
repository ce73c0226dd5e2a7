//! `VirtualMachineInstancePreset`: defaults applied to matching VMIs when they are created.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::spec::DomainSpec;

/// The spec of a preset.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "ferrovirt.io",
    version = "v1alpha1",
    kind = "VirtualMachineInstancePreset",
    plural = "virtualmachineinstancepresets",
    singular = "virtualmachineinstancepreset",
    shortname = "vmipreset",
    shortname = "vmipresets",
    category = "ferrovirt",
    namespaced,
    doc = "Defaults (CPU, memory, resources, devices) applied once to every new VirtualMachineInstance of the namespace whose labels match the selector. A setting the VMI already has differently is a conflict: the preset is not applied and an event says so."
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineInstancePresetSpec {
    /// Which VMIs get this preset, by their labels.
    pub selector: LabelSelector,
    /// The settings to apply; only what is set here is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<DomainSpec>,
}
