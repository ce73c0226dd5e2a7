//! The KVM virtual machine: VM file descriptor, irqchip, vCPU threads.

pub mod cpu;
pub mod interrupt;
pub mod vcpu;

use std::sync::Arc;

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};

/// Where KVM puts the TSS and identity-map pages it needs on Intel: three pages just
/// below the top 4 GiB, outside RAM and outside the PCI window.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// xAPIC IDs are 8 bits and 0xff is the broadcast ID; the MADT uses 8-bit IDs too.
pub const MAX_XAPIC_VCPUS: usize = 254;

/// Refuses guest RAM larger than the host's: its pages would be charged as the guest
/// touches them, and the OOM killer would end the VM long after it started.
pub fn check_memory_fits_host(size_mib: u64) -> Result<(), VmError> {
    let info = nix::sys::sysinfo::sysinfo().ok();
    let host_mib = info.map_or(u64::MAX, |i| i.ram_total() >> 20);
    if size_mib > host_mib {
        return Err(VmError::TooMuchMemory {
            asked_mib: size_mib,
            host_mib,
        });
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm; is KVM enabled in the kernel (kvm_intel/kvm_amd) and are we root or in group kvm?"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error(
        "{asked} vCPUs asked for, but at most {max} are possible here (KVM's limit, and 254 xAPIC IDs)"
    )]
    TooManyVcpus { asked: u16, max: usize },
    #[error("{asked_mib} MiB of guest memory asked for, but this host has only {host_mib} MiB")]
    TooMuchMemory { asked_mib: u64, host_mib: u64 },
    #[error("KVM cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Why the guest stopped, as devices and vCPUs report it to the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// The i8042 reset line.
    Reset,
    /// A byte written to the debug-exit port.
    DebugExit(u8),
    /// Triple fault, failed entry, KVM internal error.
    Crashed(String),
}

/// How devices and vCPUs tell the VMM that the guest stopped.
pub type ExitNotifier = Arc<dyn Fn(GuestExit) + Send + Sync>;

/// Opens KVM and creates a VM with the in-kernel irqchip and PIT, ready for `vcpus`.
pub fn create_vm(vcpus: u16) -> Result<(Kvm, Arc<VmFd>), VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let max = kvm.get_max_vcpus().min(MAX_XAPIC_VCPUS);
    if vcpus as usize > max {
        return Err(VmError::TooManyVcpus { asked: vcpus, max });
    }
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("set the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("set the identity map address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
    Ok((kvm, Arc::new(vm)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_vcpus_than_possible_are_refused() {
        let max = Kvm::new().unwrap().get_max_vcpus().min(MAX_XAPIC_VCPUS);
        let asked = (max + 1) as u16;
        assert!(matches!(
            create_vm(asked),
            Err(VmError::TooManyVcpus { .. })
        ));
        assert!(create_vm(max as u16).is_ok());
    }

    #[test]
    fn memory_beyond_the_host_is_refused() {
        assert!(check_memory_fits_host(64).is_ok());
        let err = check_memory_fits_host(1 << 30).unwrap_err();
        assert!(err.to_string().contains("this host has only"), "{err}");
    }
}
