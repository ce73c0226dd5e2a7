//! A real KVM VM for device tests: in-kernel irqchip, one vCPU whose local APIC accepts
//! interrupts, and the VM's interrupt router. Delivered MSIs show up in the APIC's IRR.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;

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

    /// Makes `mem` (one region at guest address 0) the VM's RAM.
    pub fn map_memory(&self, mem: &GuestMemoryMmap) {
        let host = mem.get_host_address(GuestAddress(0)).expect("RAM at 0");
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: mem.last_addr().0 + 1,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the range is a single mapping owned by `mem`. Tests keep `mem` alive as
        // long as the VM runs; were it unmapped first, guest accesses would fault inside
        // KVM rather than touch other memory of this process.
        unsafe { self.vm.set_user_memory_region(region) }.expect("map guest RAM");
    }

    /// Runs vCPU 0 from `entry` in 32-bit protected mode with flat segments until it
    /// exits to userspace; describes the exit ("io-out 0xf4", "mmio-write 0x...").
    pub fn run_protected(&mut self, entry: u64) -> String {
        let flat = |selector, type_| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let mut sregs = self.vcpu.get_sregs().expect("get sregs");
        sregs.cs = flat(0x8, 0xb);
        let data = flat(0x10, 0x3);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.cr0 |= 1;
        self.vcpu.set_sregs(&sregs).expect("set sregs");
        let mut regs = self.vcpu.get_regs().expect("get regs");
        regs.rip = entry;
        regs.rflags = 2;
        self.vcpu.set_regs(&regs).expect("set regs");
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) => format!("io-out {port:#x}"),
            Ok(VcpuExit::MmioWrite(addr, _)) => format!("mmio-write {addr:#x}"),
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("error {e}"),
        }
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
