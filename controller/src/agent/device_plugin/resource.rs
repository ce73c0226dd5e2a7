//! What the agent advertises: each resource's name, socket, device list and allocation, the
//! same shape for the kvm slots and every SR-IOV pool.

use super::api::{self, ContainerAllocateResponse, ContainerPreferredAllocationRequest};
use super::kvm::{self, KvmError, KvmSlots};
use super::sriov::{SriovError, SriovPool};

/// The domain of every extended resource the agent advertises.
pub const DOMAIN: &str = "devices.ferrovirt.io";

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Sriov(#[from] SriovError),
}

/// One extended resource, served by its own plugin socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Kvm(KvmSlots),
    Sriov(SriovPool),
}

impl Resource {
    /// The name after `devices.ferrovirt.io/`: `kvm`, `sriov-<pool>`.
    pub fn suffix(&self) -> String {
        match self {
            Resource::Kvm(_) => kvm::RESOURCE.to_owned(),
            Resource::Sriov(pool) => pool.resource(),
        }
    }

    /// The extended resource name pods request.
    pub fn name(&self) -> String {
        format!("{DOMAIN}/{}", self.suffix())
    }

    /// The plugin's socket in the device-plugin directory: `ferrovirt-<suffix>.sock`.
    pub fn socket_name(&self) -> String {
        format!("ferrovirt-{}.sock", self.suffix())
    }

    /// The devices now, with their health.
    pub fn devices(&self) -> Result<Vec<api::Device>, ResourceError> {
        match self {
            Resource::Kvm(slots) => Ok(slots.devices()),
            Resource::Sriov(pool) => Ok(pool.devices()?),
        }
    }

    /// What one container that was given `ids` gets.
    pub fn allocate(&self, ids: &[String]) -> Result<ContainerAllocateResponse, ResourceError> {
        match self {
            Resource::Kvm(slots) => Ok(slots.allocate(ids)?),
            Resource::Sriov(pool) => Ok(pool.allocate(ids)?),
        }
    }
}

/// The devices kubelet should pick for one container: those it must include, then the lowest
/// of the others, `allocation_size` in all. "Lowest" orders by length, then text, which is
/// numeric order for `kvm-N` and address order for PCI addresses (all 12 bytes).
pub fn preferred_allocation(request: &ContainerPreferredAllocationRequest) -> Vec<String> {
    let size = usize::try_from(request.allocation_size).unwrap_or(0);
    let mut chosen: Vec<String> = Vec::with_capacity(size);
    for id in &request.must_include_device_ids {
        if !chosen.contains(id) {
            chosen.push(id.clone());
        }
    }
    let mut rest: Vec<&String> = request
        .available_device_ids
        .iter()
        .filter(|id| !chosen.contains(id))
        .collect();
    rest.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    rest.dedup();
    let wanted = size.saturating_sub(chosen.len());
    chosen.extend(rest.into_iter().take(wanted).cloned());
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        available: &[&str],
        must: &[&str],
        size: i32,
    ) -> ContainerPreferredAllocationRequest {
        ContainerPreferredAllocationRequest {
            available_device_ids: available.iter().map(|s| s.to_string()).collect(),
            must_include_device_ids: must.iter().map(|s| s.to_string()).collect(),
            allocation_size: size,
        }
    }

    #[test]
    fn names_and_sockets_follow_the_resource() {
        let kvm = Resource::Kvm(KvmSlots::new(4));
        assert_eq!(kvm.name(), "devices.ferrovirt.io/kvm");
        assert_eq!(kvm.socket_name(), "ferrovirt-kvm.sock");
        let pool = Resource::Sriov(SriovPool {
            spec: "fast=ens1f0".parse().unwrap(),
            sysfs_root: "/sys".into(),
        });
        assert_eq!(pool.name(), "devices.ferrovirt.io/sriov-fast");
        assert_eq!(pool.socket_name(), "ferrovirt-sriov-fast.sock");
    }

    #[test]
    fn preferred_allocation_keeps_required_devices_then_takes_the_lowest() {
        let available = ["kvm-10", "kvm-2", "kvm-9", "kvm-0"];
        assert_eq!(
            preferred_allocation(&request(&available, &[], 3)),
            ["kvm-0", "kvm-2", "kvm-9"]
        );
        assert_eq!(
            preferred_allocation(&request(&available, &["kvm-10"], 2)),
            ["kvm-10", "kvm-0"]
        );
        let vfs = ["0000:01:00.3", "0000:01:00.1", "0000:01:00.2"];
        assert_eq!(
            preferred_allocation(&request(&vfs, &[], 2)),
            ["0000:01:00.1", "0000:01:00.2"]
        );
        // More than available: all of them; a nonsense size: only the required ones.
        assert_eq!(preferred_allocation(&request(&vfs, &[], 9)).len(), 3);
        assert_eq!(
            preferred_allocation(&request(&vfs, &["0000:01:00.3"], -1)),
            ["0000:01:00.3"]
        );
    }
}
