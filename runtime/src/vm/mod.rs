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

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm; is KVM enabled in the kernel (kvm_intel/kvm_amd) and are we root or in group kvm?"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("{asked} vCPUs asked for, but this host's KVM allows at most {max}")]
    TooManyVcpus { asked: u8, max: usize },
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
pub fn create_vm(vcpus: u8) -> Result<(Kvm, Arc<VmFd>), VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let max = kvm.get_max_vcpus();
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
    fn more_vcpus_than_kvm_allows_are_refused() {
        let max = Kvm::new().unwrap().get_max_vcpus();
        if max >= u8::MAX as usize {
            // This host's KVM allows more than a u8 can ask for; the check cannot trip.
            return;
        }
        let asked = (max + 1) as u8;
        assert!(matches!(
            create_vm(asked),
            Err(VmError::TooManyVcpus { .. })
        ));
    }
}
