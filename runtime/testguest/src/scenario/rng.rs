//! `rng`: drive a virtio-rng device (modern PCI transport, one virtqueue) for 64 bytes,
//! with queue interrupts on MSI-X vector 0 → LAPIC vector 0x40, and prove the interrupt
//! arrived by finding the vector pending in the LAPIC IRR (interrupts stay masked).

use super::{ScenarioError, check_failed};
use crate::acpi;
use crate::console::Hex;
use crate::dma::{self, DmaCell};
use crate::lapic::LocalApic;
use crate::pci::{self, MmioAllocator};
use crate::say;
use crate::start_info::StartInfo;
use crate::tsc;
use crate::virtio::pci::VirtioPci;
use crate::virtio::queue::{Buffer, QueueMemory, SplitQueue};
use crate::virtio::{NO_VECTOR, VIRTIO_ID_RNG, VIRTIO_PCI_VENDOR, modern_pci_device_id};

const REQUEST_BYTES: usize = 64;
const QUEUE_ENTRIES: usize = 8;
const MSIX_ENTRY: u16 = 0;
const LAPIC_VECTOR: u8 = 0x40;
const USED_TIMEOUT_US: u64 = 2_000_000;
const IRR_TIMEOUT_US: u64 = 1_000_000;

static QUEUE: DmaCell<QueueMemory<QUEUE_ENTRIES>> = DmaCell::new(QueueMemory::new());
static BUFFER: DmaCell<[u8; REQUEST_BYTES]> = DmaCell::new([0; REQUEST_BYTES]);

pub fn run(info: &StartInfo) -> Result<(), ScenarioError> {
    let devices = pci::enumerate_bus0();
    let device_id = modern_pci_device_id(VIRTIO_ID_RNG);
    let dev = devices.find(VIRTIO_PCI_VENDOR, device_id).ok_or_else(|| {
        check_failed!(
            "no virtio-rng-pci ({VIRTIO_PCI_VENDOR:04x}:{device_id:04x}) on bus 0; give the VM one (QEMU: -device virtio-rng-pci,disable-legacy=on)"
        )
    })?;
    let lapic_base = acpi::find_rsdp(info.rsdp_paddr)
        .and_then(acpi::madt_cpus)
        .map_or(acpi::DEFAULT_LAPIC_ADDRESS, |c| c.lapic_address);
    let lapic = LocalApic::new(lapic_base);
    lapic.enable();
    let apic_id = lapic.id();
    if lapic.irr_pending(LAPIC_VECTOR) {
        return Err(check_failed!(
            "vector {LAPIC_VECTOR:#x} is pending before the device was set up"
        ));
    }

    let mut alloc = MmioAllocator::avoiding(&devices);
    let virtio = VirtioPci::probe(dev, &mut alloc)?;
    let msix = *virtio
        .msix()
        .ok_or_else(|| check_failed!("virtio-rng has no MSI-X capability"))?;
    msix.enable_masked();
    msix.route(MSIX_ENTRY, apic_id, LAPIC_VECTOR)?;

    let features = virtio.initialize(0)?;
    virtio.set_config_vector(NO_VECTOR)?;
    let queue_mem = QUEUE
        .take()
        .ok_or_else(|| check_failed!("rng queue memory already in use"))?;
    let buffer = BUFFER
        .take()
        .ok_or_else(|| check_failed!("rng buffer already in use"))?;
    let mut queue = SplitQueue::new(queue_mem, virtio.queue_max_size(0));
    let notifier = virtio.setup_queue(0, &queue, MSIX_ENTRY)?;
    virtio.driver_ok()?;
    msix.unmask_function();
    say!(
        "rng device={} features={features:#x} queue_size={} msix_entries={}",
        dev.address,
        queue.size(),
        msix.table_size()
    );

    // The device may return fewer bytes than asked; ask again for the rest.
    let base = dma::phys_addr(buffer);
    let mut filled = 0usize;
    while filled < REQUEST_BYTES {
        let want = REQUEST_BYTES - filled;
        queue.push(&[Buffer {
            addr: base + filled as u64,
            len: want as u32,
            device_writable: true,
        }])?;
        virtio.notify(&notifier);
        let mut used = None;
        if !tsc::poll_until(USED_TIMEOUT_US, || {
            used = queue.pop_used();
            used.is_some()
        }) {
            virtio.fail();
            return Err(check_failed!(
                "no used buffer after {} ms ({filled} bytes so far)",
                USED_TIMEOUT_US / 1000
            ));
        }
        let len = used.map_or(0, |u| u.len as usize);
        if len == 0 {
            return Err(check_failed!("device returned an empty buffer"));
        }
        filled += len.min(want);
    }
    let mut bytes = [0u8; REQUEST_BYTES];
    for (i, b) in bytes.iter_mut().enumerate() {
        // SAFETY: `buffer` is our claimed 64-byte DMA buffer and the device is done with
        // it (all chains were returned); volatile because a device wrote it.
        *b = unsafe { buffer.as_ptr().cast::<u8>().add(i).read_volatile() };
    }
    say!("rng bytes={}", Hex(&bytes));
    if bytes.iter().all(|&b| b == 0) {
        return Err(check_failed!(
            "the device returned {REQUEST_BYTES} zero bytes"
        ));
    }
    if !tsc::poll_until(IRR_TIMEOUT_US, || lapic.irr_pending(LAPIC_VECTOR)) {
        return Err(check_failed!(
            "LAPIC vector {LAPIC_VECTOR:#x} never became pending: the MSI-X message (entry {MSIX_ENTRY}, APIC {apic_id}) was not delivered"
        ));
    }
    say!("rng msix=delivered");
    let isr = virtio.read_isr();
    virtio.reset()?;
    msix.disable();
    say!("rng isr={isr:#x} device reset");
    Ok(())
}
