//! `devices.ferrovirt.io/kvm`: N interchangeable slots that each grant a container `/dev/kvm`.
//! KVM itself has no per-VM device to hand out; the count only bounds how many VMs the
//! scheduler places on the node (KubeVirt advertises 110 the same way).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::api::{self, ContainerAllocateResponse, DeviceSpec};

/// The resource's name after the `devices.ferrovirt.io/` domain.
pub const RESOURCE: &str = "kvm";
/// Where KVM lives on the host and in the container.
pub const DEV_KVM: &str = "/dev/kvm";

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error(
        "{0} does not exist on this node (or is not a character device); load kvm_intel or kvm_amd and enable virtualization in the firmware"
    )]
    NoKvm(PathBuf),
    #[error("device {0:?} is not one of this node's kvm devices (kvm-0 .. kvm-{1})")]
    UnknownDevice(String, u32),
}

/// The kvm slots of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmSlots {
    /// How many pods may hold /dev/kvm at once.
    pub count: u32,
    /// `/dev/kvm`; another path in tests.
    pub device: PathBuf,
}

impl KvmSlots {
    pub fn new(count: u32) -> KvmSlots {
        KvmSlots {
            count,
            device: PathBuf::from(DEV_KVM),
        }
    }

    /// `kvm-0` .. `kvm-<count-1>`, all Healthy while the KVM device exists, all Unhealthy
    /// otherwise.
    pub fn devices(&self) -> Vec<api::Device> {
        let health = if is_char_device(&self.device) {
            api::HEALTHY
        } else {
            api::UNHEALTHY
        };
        (0..self.count)
            .map(|i| api::Device {
                id: slot_id(i),
                health: health.to_owned(),
                topology: None,
            })
            .collect()
    }

    /// One container's share: /dev/kvm read-write, however many slots it asked for.
    pub fn allocate(&self, ids: &[String]) -> Result<ContainerAllocateResponse, KvmError> {
        if let Some(unknown) = ids.iter().find(|id| self.slot_index(id).is_none()) {
            return Err(KvmError::UnknownDevice(
                unknown.clone(),
                self.count.saturating_sub(1),
            ));
        }
        if !is_char_device(&self.device) {
            return Err(KvmError::NoKvm(self.device.clone()));
        }
        let path = self.device.display().to_string();
        Ok(ContainerAllocateResponse {
            devices: vec![DeviceSpec {
                container_path: DEV_KVM.to_owned(),
                host_path: path,
                permissions: "rw".to_owned(),
            }],
            ..Default::default()
        })
    }

    /// The slot number of `kvm-<n>`, when it is one of ours.
    pub fn slot_index(&self, id: &str) -> Option<u32> {
        let n: u32 = id.strip_prefix("kvm-")?.parse().ok()?;
        // `kvm-01` would parse as 1 but is not an id we handed out.
        (n < self.count && slot_id(n) == id).then_some(n)
    }
}

fn slot_id(i: u32) -> String {
    format!("kvm-{i}")
}

fn is_char_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_numbered_and_healthy_while_the_device_exists() {
        // /dev/null stands in for /dev/kvm: a character device every host has.
        let slots = KvmSlots {
            count: 3,
            device: PathBuf::from("/dev/null"),
        };
        let devices = slots.devices();
        let ids: Vec<_> = devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["kvm-0", "kvm-1", "kvm-2"]);
        assert!(devices.iter().all(|d| d.health == api::HEALTHY));
        let granted = slots
            .allocate(&["kvm-2".into(), "kvm-0".into()])
            .expect("allocate");
        assert_eq!(
            granted.devices,
            [DeviceSpec {
                container_path: "/dev/kvm".into(),
                host_path: "/dev/null".into(),
                permissions: "rw".into(),
            }]
        );
        assert!(granted.envs.is_empty() && granted.mounts.is_empty());
    }

    #[test]
    fn a_missing_kvm_device_makes_every_slot_unhealthy_and_allocate_fail() {
        let slots = KvmSlots {
            count: 2,
            device: PathBuf::from("/nonexistent/kvm"),
        };
        assert!(slots.devices().iter().all(|d| d.health == api::UNHEALTHY));
        let err = slots.allocate(&["kvm-1".into()]).expect_err("no kvm");
        assert!(err.to_string().contains("kvm_intel"), "{err}");
        // A regular file is not KVM either.
        let slots = KvmSlots {
            count: 1,
            device: PathBuf::from(env!("CARGO_MANIFEST_PATH")),
        };
        assert!(matches!(
            slots.allocate(&["kvm-0".into()]),
            Err(KvmError::NoKvm(_))
        ));
    }

    #[test]
    fn only_ids_that_were_handed_out_are_accepted() {
        let slots = KvmSlots::new(2);
        assert_eq!(slots.slot_index("kvm-1"), Some(1));
        for bad in ["kvm-2", "kvm-01", "kvm--1", "kvm-", "gpu-0", ""] {
            assert_eq!(slots.slot_index(bad), None, "{bad}");
        }
        assert!(matches!(
            slots.allocate(&["kvm-0".into(), "kvm-7".into()]),
            Err(KvmError::UnknownDevice(id, 1)) if id == "kvm-7"
        ));
    }
}
