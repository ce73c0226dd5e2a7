//! MSI-X (PCI 3.0 §6.8.2): the capability, the vector table and the pending-bit array.
//!
//! Each table entry drives one vector of an [`MsiInterruptGroup`]: an unmasked entry has
//! a KVM MSI route and its irqfd raises the interrupt in the kernel; a masked one's irqfd
//! is detached. Vectors raised through [`Msix::trigger`] while masked (or while MSI-X or
//! the whole function is masked) set their pending bit and are delivered on unmask, as
//! the spec requires. An external writer of the irqfd (a vhost-user backend) bypasses the
//! pending bit, but its writes while masked stay in the eventfd and KVM delivers them on
//! unmask.

use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::PciError;
use crate::vm::interrupt::{InterruptError, MsiInterruptGroup, MsiMessage};

pub const MSIX_CAP_ID: u8 = 0x11;
pub const MSIX_TABLE_ENTRY_BYTES: u64 = 16;
/// The PBA is read in qwords, one bit per vector.
pub const MSIX_PBA_ENTRY_BYTES: u64 = 8;
const MAX_VECTORS: usize = 2048;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CONTROL_MASKED: u32 = 1;
/// Offset of the message control word inside the capability.
pub const MSIX_CONTROL_OFFSET: usize = 2;
/// Guest-writable bits of the message control word.
pub const MSIX_CONTROL_WRITABLE: u16 = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;

#[derive(Clone, Copy, Default)]
struct Entry {
    msg: MsiMessage,
    masked: bool,
}

struct MsixState {
    enabled: bool,
    function_masked: bool,
    entries: Vec<Entry>,
    pending: Vec<bool>,
}

impl MsixState {
    fn masked(&self, vector: usize) -> bool {
        !self.enabled || self.function_masked || self.entries[vector].masked
    }
}

pub struct Msix {
    group: Arc<MsiInterruptGroup>,
    state: Mutex<MsixState>,
}

impl Msix {
    /// One table entry per vector of `group`, all masked, MSI-X disabled (reset state).
    pub fn new(group: Arc<MsiInterruptGroup>) -> Result<Arc<Msix>, PciError> {
        let n = usize::from(group.len());
        if n == 0 || n > MAX_VECTORS {
            return Err(PciError::InvalidMsixVectorCount(n));
        }
        Ok(Arc::new(Msix {
            group,
            state: Mutex::new(MsixState {
                enabled: false,
                function_masked: false,
                entries: vec![
                    Entry {
                        masked: true,
                        ..Entry::default()
                    };
                    n
                ],
                pending: vec![false; n],
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, MsixState> {
        // Every update leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn num_vectors(&self) -> u16 {
        self.group.len()
    }

    /// Bytes of the table for `vectors` vectors.
    pub fn table_bytes(vectors: u16) -> u64 {
        u64::from(vectors) * MSIX_TABLE_ENTRY_BYTES
    }

    /// Bytes of the pending-bit array for `vectors` vectors.
    pub fn pba_bytes(vectors: u16) -> u64 {
        u64::from(vectors).div_ceil(64) * MSIX_PBA_ENTRY_BYTES
    }

    /// The capability body for [`PciConfiguration::add_capability`]: the table and the
    /// PBA at the given offsets (8-byte aligned) of BARs `table_bar` and `pba_bar`.
    ///
    /// [`PciConfiguration::add_capability`]: super::PciConfiguration::add_capability
    pub fn capability(
        vectors: u16,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> [u8; 12] {
        let mut cap = [0u8; 12];
        cap[0] = MSIX_CAP_ID;
        cap[2..4].copy_from_slice(&(vectors.saturating_sub(1) & 0x7ff).to_le_bytes());
        cap[4..8].copy_from_slice(&(table_offset | u32::from(table_bar & 7)).to_le_bytes());
        cap[8..12].copy_from_slice(&(pba_offset | u32::from(pba_bar & 7)).to_le_bytes());
        cap
    }

    /// Applies the message control word the guest wrote (enable, function mask).
    pub fn set_control(&self, control: u16) {
        let mut state = self.lock();
        let before: Vec<bool> = (0..state.entries.len()).map(|v| state.masked(v)).collect();
        state.enabled = control & CONTROL_ENABLE != 0;
        state.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for (v, was_masked) in before.into_iter().enumerate() {
            if was_masked != state.masked(v) {
                self.sync_vector(&mut state, v);
            }
        }
    }

    /// Reads the table; the guest reads dwords or qwords, naturally aligned.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let state = self.lock();
        if !aligned_dword_or_qword(offset, data.len()) {
            tracing::debug!(offset, len = data.len(), "ignoring bad MSI-X table read");
            data.fill(0);
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let value = usize::try_from(at / MSIX_TABLE_ENTRY_BYTES)
                .ok()
                .and_then(|v| state.entries.get(v))
                .map_or(0, |e| match at % MSIX_TABLE_ENTRY_BYTES {
                    0 => e.msg.addr_lo,
                    4 => e.msg.addr_hi,
                    8 => e.msg.data,
                    _ => u32::from(e.masked) * VECTOR_CONTROL_MASKED,
                });
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Writes the table and updates the KVM route of every entry that changed.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        if !aligned_dword_or_qword(offset, data.len()) {
            tracing::debug!(offset, len = data.len(), "ignoring bad MSI-X table write");
            return;
        }
        let mut state = self.lock();
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            let Some(v) = usize::try_from(at / MSIX_TABLE_ENTRY_BYTES)
                .ok()
                .filter(|v| *v < state.entries.len())
            else {
                tracing::debug!(offset = at, "ignoring MSI-X write past the table");
                continue;
            };
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let was_masked = state.masked(v);
            let old = state.entries[v];
            let entry = &mut state.entries[v];
            match at % MSIX_TABLE_ENTRY_BYTES {
                0 => entry.msg.addr_lo = value,
                4 => entry.msg.addr_hi = value,
                8 => entry.msg.data = value,
                _ => entry.masked = value & VECTOR_CONTROL_MASKED != 0,
            }
            let changed = old.msg != state.entries[v].msg || was_masked != state.masked(v);
            if changed && !(was_masked && state.masked(v)) {
                self.sync_vector(&mut state, v);
            }
        }
    }

    /// Reads the pending-bit array (read-only for the guest).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let state = self.lock();
        if !aligned_dword_or_qword(offset, data.len()) {
            tracing::debug!(offset, len = data.len(), "ignoring bad MSI-X PBA read");
            data.fill(0);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| state.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }

    /// Raises `vector`, or marks it pending while it is masked.
    pub fn trigger(&self, vector: u16) -> Result<(), InterruptError> {
        let mut state = self.lock();
        let v = usize::from(vector);
        if v >= state.entries.len() {
            return Err(InterruptError::NoSuchVector(vector));
        }
        if state.masked(v) {
            state.pending[v] = true;
            return Ok(());
        }
        // Written under the lock so that a concurrent mask cannot slip in between the
        // check and the write and lose the interrupt.
        self.group.trigger(vector)
    }

    /// The irqfd of `vector`, for a backend that raises it without the VMM.
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.group.notifier(vector)
    }

    /// Points KVM at the entry's current message (or removes the route while masked),
    /// then delivers an interrupt that became pending while masked.
    fn sync_vector(&self, state: &mut MsixState, v: usize) {
        let masked = state.masked(v);
        let vector = v as u16;
        if let Err(e) = self.group.update(vector, state.entries[v].msg, masked) {
            tracing::warn!(vector, "cannot update the MSI route: {e}");
            return;
        }
        if !masked
            && std::mem::take(&mut state.pending[v])
            && let Err(e) = self.group.trigger(vector)
        {
            tracing::warn!(vector, "cannot deliver a pending MSI-X vector: {e}");
        }
    }
}

fn aligned_dword_or_qword(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset.is_multiple_of(len as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::testing::TestVm;

    fn program(msix: &Msix, v: u64, apic_vector: u8, masked: bool) {
        let base = v * MSIX_TABLE_ENTRY_BYTES;
        msix.write_table(base, &0xfee0_0000u32.to_le_bytes());
        msix.write_table(base + 4, &0u32.to_le_bytes());
        msix.write_table(base + 8, &u32::from(apic_vector).to_le_bytes());
        msix.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn table_reads_back_what_the_guest_wrote() {
        let vm = TestVm::new();
        let msix = Msix::new(vm.router.create_msi_group(3).unwrap()).unwrap();
        program(&msix, 2, 0x41, true);
        let mut entry = [0u8; 16];
        msix.read_table(32, &mut entry[..8]);
        msix.read_table(40, &mut entry[8..]);
        assert_eq!(&entry[..4], &0xfee0_0000u32.to_le_bytes());
        assert_eq!(entry[8], 0x41);
        assert_eq!(entry[12], 1);
        let mut bad = [0xaau8; 2];
        msix.read_table(0, &mut bad);
        assert_eq!(bad, [0, 0]);
        msix.write_table(3, &[1, 2, 3, 4]);
        msix.write_table(48, &[1, 2, 3, 4]);
        assert_eq!(
            Msix::capability(3, 0, 0x4000, 0, 0x6000),
            [0x11, 0, 2, 0, 0, 0x40, 0, 0, 0, 0x60, 0, 0]
        );
    }

    #[test]
    fn masked_vector_is_pending_and_delivered_on_unmask() {
        let vm = TestVm::new();
        let msix = Msix::new(vm.router.create_msi_group(2).unwrap()).unwrap();
        msix.set_control(CONTROL_ENABLE);
        program(&msix, 1, 0x52, true);
        msix.trigger(1).unwrap();
        let mut pba = [0u8; 8];
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert!(
            !vm.lapic_irr_has(0x52),
            "a masked vector must not reach the CPU"
        );

        msix.write_table(16 + 12, &0u32.to_le_bytes());
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(
            vm.wait_lapic_irr(0x52),
            "the pending vector is delivered on unmask"
        );
        assert!(matches!(
            msix.trigger(2),
            Err(InterruptError::NoSuchVector(2))
        ));
    }

    #[test]
    fn irqfd_writes_while_masked_are_held_and_delivered_on_unmask() {
        // A vhost-user backend writes the irqfd directly, bypassing the pending bit.
        let vm = TestVm::new();
        let msix = Msix::new(vm.router.create_msi_group(1).unwrap()).unwrap();
        msix.set_control(CONTROL_ENABLE);
        program(&msix, 0, 0x58, true);
        msix.irqfd(0).unwrap().write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            !vm.lapic_irr_has(0x58),
            "a masked vector must not reach the CPU"
        );

        msix.write_table(12, &0u32.to_le_bytes());
        assert!(
            vm.wait_lapic_irr(0x58),
            "the interrupt written while masked is delivered on unmask"
        );
    }

    #[test]
    fn function_mask_and_disable_hold_back_interrupts() {
        let vm = TestVm::new();
        let msix = Msix::new(vm.router.create_msi_group(1).unwrap()).unwrap();
        program(&msix, 0, 0x63, false);
        msix.trigger(0).unwrap();
        msix.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        msix.trigger(0).unwrap();
        assert!(!vm.lapic_irr_has(0x63));
        msix.set_control(CONTROL_ENABLE);
        assert!(vm.wait_lapic_irr(0x63));
    }
}
