//! The parts of the VMI spec (`VirtualMachineInstance.spec`, also `VirtualMachine.spec.template.spec`).
//!
//! Field names and nesting follow kubevirt.io/v1 for the subset ferrovirt supports, so a KubeVirt
//! manifest runs after changing only its `apiVersion`. The doc comments are the schema
//! descriptions `kubectl explain` prints. Validation that the API server enforces (CEL rules,
//! list-map keys, bounds) sits beside the fields it checks.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The virtual hardware of a VMI.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DomainSpec {
    /// vCPU topology. Default: 1 socket, 1 core, 1 thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    /// Guest memory. Either memory.guest or resources.requests.memory must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    /// Compute resources of the VMI's launcher pod; requests.memory doubles as the guest memory
    /// when memory.guest is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Disks, network interfaces and other devices.
    #[serde(default)]
    pub devices: Devices,
    /// What the guest boots: ferrovirt boots a kernel directly (no BIOS or UEFI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
}

/// The guest's boot firmware; ferrovirt has direct kernel boot only.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Firmware {
    /// Boot this kernel (and initrd) directly, with these arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_boot: Option<KernelBoot>,
}

/// Direct kernel boot.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KernelBoot {
    /// The kernel command line (for example `console=ttyS0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub kernel_args: Option<String>,
    /// Where the kernel and initrd files are.
    pub container: KernelBootContainer,
}

/// The files of a direct kernel boot.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KernelBootContainer {
    /// A container image holding kernelPath and initrdPath. Without one, the paths are files of
    /// the launcher image (it ships the ferrovirt test guest as
    /// /usr/share/ferrovirt/testguest) or, under `fvctl run`, of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// The kernel: an ELF vmlinux (PVH note or 64-bit entry) or a bzImage.
    #[schemars(length(min = 1, max = 4096))]
    pub kernel_path: String,
    /// The initrd, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub initrd_path: Option<String>,
    /// Always, Never or IfNotPresent, as for a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
}

/// vCPU topology; the guest gets sockets × cores × threads vCPUs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    /// Cores per socket. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub cores: Option<u32>,
    /// Sockets. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub sockets: Option<u32>,
    /// Threads per core. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8))]
    pub threads: Option<u32>,
    /// The most sockets CPU hotplug may grow the guest to. Default: sockets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_sockets: Option<u32>,
}

impl Cpu {
    /// vCPUs the guest starts with.
    pub fn vcpus(&self) -> u32 {
        self.sockets.unwrap_or(1) * self.cores.unwrap_or(1) * self.threads.unwrap_or(1)
    }
}

/// Guest memory.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// Memory the guest sees, at least 1Mi (for example 512Mi or 2Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('1Mi')) >= 0")
        .message("memory.guest must be a quantity of at least 1Mi, for example 512Mi or 2Gi"))]
    pub guest: Option<Quantity>,
    /// The most memory hotplug may grow the guest to. Default: guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_guest: Option<Quantity>,
}

/// Requests and limits of the launcher pod (as a container's resources).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.requests) || !('memory' in self.requests) || (isQuantity(string(self.requests['memory'])) && quantity(string(self.requests['memory'])).compareTo(quantity('1Mi')) >= 0)")
        .message("resources.requests.memory must be a quantity of at least 1Mi, for example 512Mi or 2Gi")
)]
pub struct ResourceRequirements {
    /// Minimum resources, by name (cpu, memory, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<BTreeMap<String, Quantity>>,
    /// Maximum resources, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<BTreeMap<String, Quantity>>,
}

/// Devices of the guest.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Devices {
    /// Disks, each backed by the volume of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub disks: Vec<Disk>,
    /// Network interfaces, each attached to the network of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub interfaces: Vec<Interface>,
    /// Adds a virtio-rng device fed from the host's entropy when present (`rng: {}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<Empty>,
    /// Attaches a serial console (reached with `fvctl console`). Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoattach_serial_console: Option<bool>,
}

/// An empty object, for settings whose presence is the setting (`rng: {}`, `bridge: {}`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Empty {}

/// A disk of the guest.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    /// The disk's name; a volume of the same name backs it.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Attach as a plain disk (the only kind ferrovirt has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskTarget>,
    /// Boot priority, lower first; disks without one come after those with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub boot_order: Option<u32>,
    /// Serial number the guest sees (virtio-blk GET_ID, at most 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 20))]
    pub serial: Option<String>,
}

/// How a disk is attached.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DiskTarget {
    /// The bus; ferrovirt attaches every disk as virtio-blk over vhost-user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<DiskBus>,
    /// The guest sees the disk read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
}

/// Disk buses ferrovirt supports.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    Virtio,
}

/// A network interface of the guest: exactly one binding method.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.bridge), has(self.masquerade), has(self.sriov), has(self.binding)].filter(x, x).size() == 1")
        .message("an interface takes exactly one binding method: bridge, masquerade, sriov or binding")
)]
pub struct Interface {
    /// The interface's name; the network of the same name is what it connects to.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// MAC address the guest sees (aa:bb:cc:dd:ee:ff). Default: generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$"))]
    pub mac_address: Option<String>,
    /// Connect the guest to the pod network on L2 (bridge binding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<Empty>,
    /// Connect the guest behind NAT on the pod's address (masquerade binding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<Empty>,
    /// Pass an SR-IOV VF through to the guest (the network names an SR-IOV resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sriov: Option<Empty>,
    /// A network binding plugin by name; `vhostuser` attaches a vhost-user-net NIC served by
    /// ferrovirt-vhost-net on the TAP ferrovirt-cni creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<PluginBinding>,
}

/// A network binding plugin.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PluginBinding {
    /// The plugin's name; ferrovirt knows `vhostuser`.
    #[x_kube(validation = Rule::new("self in ['vhostuser']").message("unknown network binding plugin; ferrovirt supports binding.name: vhostuser"))]
    #[schemars(length(max = 63))]
    pub name: String,
}

/// A network interfaces connect to: the pod network or a Multus NetworkAttachmentDefinition.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.pod), has(self.multus)].filter(x, x).size() == 1")
        .message("a network takes exactly one source: pod or multus")
)]
pub struct Network {
    /// The network's name, referenced by an interface.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The pod's own network (the cluster network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Empty>,
    /// A secondary network from a Multus NetworkAttachmentDefinition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multus: Option<MultusNetwork>,
}

/// A Multus network.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MultusNetwork {
    /// The NetworkAttachmentDefinition, as `name` (the VMI's namespace) or `namespace/name`.
    #[schemars(length(min = 1, max = 253))]
    pub network_name: String,
    /// Use this network as the pod's default network instead of the cluster network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
}

/// Where a disk's data comes from: exactly one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.containerDisk), has(self.persistentVolumeClaim), has(self.hostDisk), has(self.cloudInitNoCloud), has(self.emptyDisk)].filter(x, x).size() == 1")
        .message("a volume takes exactly one source: containerDisk, persistentVolumeClaim, hostDisk, cloudInitNoCloud or emptyDisk")
)]
pub struct Volume {
    /// The volume's name, referenced by a disk.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// A disk image shipped inside a container image (ephemeral: writes are lost on restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_disk: Option<ContainerDisk>,
    /// A PersistentVolumeClaim in the VMI's namespace (filesystem or block volume mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimSource>,
    /// A raw image file on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_disk: Option<HostDisk>,
    /// A NoCloud cloud-init disk generated from user data and network data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init_no_cloud: Option<CloudInitNoCloud>,
    /// A blank sparse disk that lives as long as the VMI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_disk: Option<EmptyDisk>,
}

/// A disk image inside a container image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerDisk {
    /// The container image holding the disk.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,
    /// Path of the disk image inside the container image. Default: the single file in /disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Always, Never or IfNotPresent, as for a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
}

/// When the node pulls an image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    Never,
    IfNotPresent,
}

/// A claim to mount as a disk.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PersistentVolumeClaimSource {
    /// The PersistentVolumeClaim's name in the VMI's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Attach the disk read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

/// A raw image file on the node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostDisk {
    /// Absolute path of the image on the node.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
    /// `Disk`: the file must exist; `DiskOrCreate`: created sparse with `capacity` if missing.
    #[serde(rename = "type")]
    pub type_: HostDiskType,
    /// Size of a file `DiskOrCreate` creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
}

/// Whether a host disk must exist.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HostDiskType {
    #[default]
    Disk,
    DiskOrCreate,
}

/// Cloud-init NoCloud data.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CloudInitNoCloud {
    /// user-data, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// user-data, base64-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_base64: Option<String>,
    /// network-config, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_data: Option<String>,
    /// network-config, base64-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_data_base64: Option<String>,
}

/// A blank disk.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDisk {
    /// The disk's size (for example 1Gi).
    pub capacity: Quantity,
}
