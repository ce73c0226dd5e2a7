//! A real KVM VM for device tests: in-kernel irqchip, one vCPU whose local APIC accepts
//! interrupts, and the VM's interrupt router. Delivered MSIs show up in the APIC's IRR.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::vm::interrupt::InterruptRouter;

const APIC_SPURIOUS_VECTOR: usize = 0xf0;
const APIC_SOFTWARE_ENABLE: u8 = 1 << 0; // bit 8 of the register, in its second byte
const APIC_IRR: usize = 0x200;

pub(crate) struct TestVm {
    pub vm: Arc<VmFd>,
    pub router: Arc<InterruptRouter>,
    vcpu: VcpuFd,
}

impl TestVm {
    pub fn new() -> TestVm {
        let kvm = Kvm::new().expect("tests need /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");
        vm.create_irq_chip().expect("create irqchip");
        let vm = Arc::new(vm);
        let vcpu = vm.create_vcpu(0).expect("create vCPU 0");
        let mut lapic = vcpu.get_lapic().expect("get LAPIC");
        lapic.regs[APIC_SPURIOUS_VECTOR + 1] |= APIC_SOFTWARE_ENABLE as std::os::raw::c_char;
        vcpu.set_lapic(&lapic).expect("set LAPIC");
        let router = InterruptRouter::new(vm.clone()).expect("interrupt router");
        TestVm { vm, router, vcpu }
    }

    /// Whether `vector` is requested at vCPU 0's local APIC.
    pub fn lapic_irr_has(&self, vector: u8) -> bool {
        let lapic = self.vcpu.get_lapic().expect("get LAPIC");
        let v = usize::from(vector);
        let byte = lapic.regs[APIC_IRR + (v / 32) * 0x10 + (v % 32) / 8] as u8;
        byte & (1 << (v % 8)) != 0
    }

    /// Waits up to 5 s for `vector` to arrive (irqfd injection may be asynchronous).
    pub fn wait_lapic_irr(&self, vector: u8) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.lapic_irr_has(vector) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}
