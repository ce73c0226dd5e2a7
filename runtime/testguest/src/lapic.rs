//! The local xAPIC, driven through its MMIO page from ring 3 (the boot map gives it a
//! user mapping). Used for the BSP's APIC ID, software enable, INIT/SIPI IPIs, and reading
//! the IRR to prove an MSI arrived while interrupts stay masked (IF=0).

use crate::phys;
use crate::tsc;

const REG_ID: u64 = 0x20;
const REG_SVR: u64 = 0xf0;
const REG_IRR0: u64 = 0x200;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
/// SVR: APIC software enable, spurious vector 0xFF.
const SVR_ENABLE: u32 = 0x100 | 0xff;
/// ICR delivery status (send pending).
const ICR_PENDING: u32 = 1 << 12;
const ICR_INIT_ASSERT: u32 = 0x0000_4500;
const ICR_STARTUP: u32 = 0x0000_4600;
const ICR_IDLE_TIMEOUT_US: u64 = 100_000;

#[derive(Debug, Clone, Copy)]
pub struct LocalApic {
    base: u64,
}

impl LocalApic {
    /// `base` is the MADT's Local APIC address (normally 0xFEE00000).
    pub fn new(base: u64) -> Self {
        Self { base }
    }

    fn read(&self, reg: u64) -> u32 {
        phys::read::<u32>(self.base + reg)
    }

    fn write(&self, reg: u64, value: u32) {
        phys::write::<u32>(self.base + reg, value)
    }

    /// This CPU's xAPIC ID.
    pub fn id(&self) -> u32 {
        self.read(REG_ID) >> 24
    }

    /// Software-enables the APIC; until then it drops fixed interrupts (incl. MSIs).
    pub fn enable(&self) {
        self.write(REG_SVR, SVR_ENABLE);
    }

    /// Whether `vector` is pending in the interrupt request register.
    pub fn irr_pending(&self, vector: u8) -> bool {
        let reg = REG_IRR0 + u64::from(vector / 32) * 0x10;
        self.read(reg) & (1 << (vector % 32)) != 0
    }

    fn send_ipi(&self, apic_id: u32, icr_low: u32) -> bool {
        self.write(REG_ICR_HIGH, apic_id << 24);
        self.write(REG_ICR_LOW, icr_low);
        tsc::poll_until(ICR_IDLE_TIMEOUT_US, || {
            self.read(REG_ICR_LOW) & ICR_PENDING == 0
        })
    }

    /// INIT (level assert) to one CPU; false if the IPI stayed pending.
    pub fn send_init(&self, apic_id: u32) -> bool {
        self.send_ipi(apic_id, ICR_INIT_ASSERT)
    }

    /// Start-up IPI: the CPU begins in real mode at `vector << 12`.
    pub fn send_startup(&self, apic_id: u32, vector: u8) -> bool {
        self.send_ipi(apic_id, ICR_STARTUP | u32::from(vector))
    }
}
