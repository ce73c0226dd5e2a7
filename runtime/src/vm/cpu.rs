//! x86_64 vCPU set-up: CPUID, MSRs, FPU, LAPIC and the registers of the boot entry.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::boot::EntryPoint;
use crate::layout::{BOOT_STACK_POINTER, GDT_START, PDE_START, PDPTE_START, PML4_START};
use crate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM cannot report its supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM refused {what} of vCPU {id}")]
    Set {
        what: &'static str,
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM set only {set} of {want} boot MSRs on vCPU {id}")]
    PartialMsrs { id: u8, set: usize, want: usize },
    #[error("cannot write boot page tables or GDT to guest memory")]
    WriteTables(#[source] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back: without it Linux maps RAM uncached.
const MTRR_ENABLE_DEFAULT_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;

/// The host's supported CPUID, fetched once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuError::SupportedCpuid)
}

/// Hypervisor timing leaf (VMware's convention, read by many guests): EAX = TSC kHz,
/// EBX = local APIC timer kHz. KVM's APIC timer counts nanoseconds: 1 GHz.
const CPUID_TIMING_LEAF: u32 = 0x4000_0010;
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_APIC_TIMER_KHZ: u32 = 1_000_000;

/// CPUID for vCPU `id`: the host's supported set, with this vCPU's APIC ID and topology,
/// and the TSC frequency when KVM knows it (so guests need not calibrate).
fn vcpu_cpuid(base: &CpuId, id: u8, vcpus: u8, tsc_khz: Option<u32>) -> CpuId {
    let mut cpuid = base.clone();
    if let Some(khz) = tsc_khz
        && let Some(signature) = cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == KVM_CPUID_SIGNATURE)
    {
        signature.eax = signature.eax.max(CPUID_TIMING_LEAF);
        let timing = kvm_cpuid_entry2 {
            function: CPUID_TIMING_LEAF,
            eax: khz,
            ebx: KVM_APIC_TIMER_KHZ,
            ..Default::default()
        };
        // A full table only loses this hint.
        let _ = cpuid.push(timing);
    }
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((vcpus as u32) << 16);
                entry.ecx |= CPUID_HYPERVISOR_BIT;
                // EDX bit 28 (HTT): the logical-processor count above is valid.
                entry.edx |= 1 << 28;
            }
            // Extended topology: EDX is the x2APIC ID of this logical processor.
            0xb | 0x1f => entry.edx = id as u32,
            _ => {}
        }
    }
    cpuid
}

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// Everything a vCPU needs before it runs, boot vCPU or not.
pub fn configure_vcpu(vcpu: &VcpuFd, id: u8, vcpus: u8, cpuid: &CpuId) -> Result<(), CpuError> {
    let set = |what| move |source| CpuError::Set { what, id, source };
    let tsc_khz = vcpu.get_tsc_khz().ok().filter(|&khz| khz != 0);
    vcpu.set_cpuid2(&vcpu_cpuid(cpuid, id, vcpus, tsc_khz))
        .map_err(set("CPUID"))?;

    let entries = [
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_DEFAULT_WB),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::PartialMsrs {
        id,
        set: 0,
        want: entries.len(),
    })?;
    let done = vcpu.set_msrs(&msrs).map_err(set("MSRs"))?;
    if done != entries.len() {
        return Err(CpuError::PartialMsrs {
            id,
            set: done,
            want: entries.len(),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(set("FPU"))?;

    // LINT0 delivers the PIC's ExtINT, LINT1 NMIs, as on a PC (MP spec §5.1).
    let mut lapic: kvm_lapic_state = vcpu.get_lapic().map_err(set("LAPIC (get)"))?;
    set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(set("LAPIC"))?;
    Ok(())
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
    let value = u32::from_le_bytes(bytes);
    // Delivery mode is bits 10:8.
    let value = (value & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *b as _;
    }
}

/// A flat segment for the entry state. `code64` selects a long-mode code segment.
fn flat_segment(selector: u16, code: bool, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: (!long) as u8,
        s: 1,
        l: long as u8,
        g: 1,
        ..Default::default()
    }
}

/// GDT descriptor for a flat segment (Intel SDM vol. 3, §3.4.5).
fn gdt_entry(flags: u64, access: u64) -> u64 {
    // base 0, limit 0xfffff, flags nibble at 52, access byte at 40.
    0x000f_0000_0000_ffff | (flags << 52) | (access << 40)
}

/// Sets the boot vCPU's registers for `entry`, writing the GDT (and page tables for a
/// 64-bit entry) into guest memory.
pub fn configure_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<(), CpuError> {
    let set = |what| {
        move |source| CpuError::Set {
            what,
            id: 0,
            source,
        }
    };
    let write = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(CpuError::WriteTables);
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(set("special registers (get)"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    let long = matches!(entry, EntryPoint::Linux64 { .. });
    // Null, code (0x08), data (0x10). Code is 32-bit for PVH, 64-bit otherwise.
    let gdt = [
        0u64,
        if long {
            gdt_entry(0xa, 0x9b)
        } else {
            gdt_entry(0xc, 0x9b)
        },
        gdt_entry(0xc, 0x93),
    ];
    for (i, e) in gdt.iter().enumerate() {
        write(mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64)))?;
    }
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.cs = flat_segment(0x08, true, long);
    let data = flat_segment(0x10, false, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;

    match entry {
        EntryPoint::Pvh { entry, start_info } => {
            // Xen PVH ABI: 32-bit protected mode, paging off, EBX = start_info.
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry.raw_value();
            regs.rbx = start_info.raw_value();
        }
        EntryPoint::Linux64 { entry, zero_page } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry.raw_value();
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = zero_page.raw_value();
        }
    }
    vcpu.set_sregs(&sregs).map_err(set("special registers"))?;
    vcpu.set_regs(&regs).map_err(set("registers"))?;
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages, as the 64-bit boot protocol requires
/// for the kernel, zero page and command line.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let write = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(CpuError::WriteTables)
    };
    write(PDPTE_START | 0x03, PML4_START)?;
    write(PDE_START | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        write((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_well_known_flat_descriptors() {
        assert_eq!(gdt_entry(0xa, 0x9b), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc, 0x9b), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc, 0x93), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_id() {
        let kvm = Kvm::new().unwrap();
        let base = supported_cpuid(&kvm).unwrap();
        let c = vcpu_cpuid(&base, 3, 4, Some(2_445_000));
        let leaf1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_ne!(leaf1.ecx & CPUID_HYPERVISOR_BIT, 0);
        let timing = c
            .as_slice()
            .iter()
            .find(|e| e.function == CPUID_TIMING_LEAF);
        assert_eq!(
            timing.map(|t| (t.eax, t.ebx)),
            Some((2_445_000, KVM_APIC_TIMER_KHZ))
        );
        let max = c
            .as_slice()
            .iter()
            .find(|e| e.function == KVM_CPUID_SIGNATURE);
        assert!(max.unwrap().eax >= CPUID_TIMING_LEAF);
    }
}
