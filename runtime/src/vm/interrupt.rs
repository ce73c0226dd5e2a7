//! Interrupt routing: legacy IOAPIC lines and MSI vectors, delivered by KVM irqfds.
//!
//! KVM replaces the whole GSI routing table on every `KVM_SET_GSI_ROUTING`, so this
//! module keeps the table and re-sends it when an MSI route changes. Each MSI vector has
//! its own GSI and irqfd: a device (or a vhost-user backend holding the same eventfd)
//! raises the vector by writing the eventfd, without a trip through the VMM.
//!
//! A masked vector's eventfd is detached from KVM rather than left without a route: what
//! a backend writes meanwhile stays counted in the eventfd, and KVM delivers it when the
//! vector is unmasked and the irqfd attached again (it polls the eventfd on KVM_IRQFD).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// GSIs below this are the IOAPIC's pins; MSI vectors get GSIs from here on.
pub const IOAPIC_PINS: u32 = 24;
/// KVM_MAX_IRQ_ROUTES on x86 is 4096.
const MAX_GSI: u32 = 4095;

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("out of interrupt routes: KVM allows {MAX_GSI} GSIs; remove devices or MSI-X vectors")]
    NoFreeGsi,
    #[error("cannot create the eventfd for an interrupt")]
    EventFd(#[source] std::io::Error),
    #[error("KVM refused to attach or detach the irqfd of GSI {gsi}")]
    RegisterIrqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused the interrupt routing table")]
    SetRouting(#[source] kvm_ioctls::Error),
    #[error("cannot build the interrupt routing table")]
    RoutingTable,
    #[error("MSI vector {0} does not exist on this device")]
    NoSuchVector(u16),
    #[error("cannot raise interrupt")]
    Trigger(#[source] std::io::Error),
}

/// An MSI message as the guest programs it into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
}

/// The VM's interrupt routes. One per VM, shared by every device.
pub struct InterruptRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

struct RouterState {
    next_gsi: u32,
    routes: BTreeMap<u32, kvm_irq_routing_entry>,
}

impl InterruptRouter {
    /// Takes over routing from KVM's defaults (which it must reproduce: a new table
    /// replaces them) for a VM whose in-kernel irqchip exists already.
    pub fn new(vm: Arc<VmFd>) -> Result<Arc<InterruptRouter>, InterruptError> {
        let mut routes = BTreeMap::new();
        for gsi in 0..IOAPIC_PINS {
            // KVM's default table routes the 16 ISA lines to the PICs and all 24 to the
            // IOAPIC; we keep the IOAPIC routes and the PIC ones, as its default does.
            let mut entries = vec![irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi)];
            if gsi < 8 {
                entries.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            // Several entries per GSI are allowed; key by (gsi, chip) in a flat map.
            for (i, e) in entries.into_iter().enumerate() {
                routes.insert(route_key(gsi, i as u32), e);
            }
        }
        let router = Arc::new(InterruptRouter {
            vm,
            state: Mutex::new(RouterState {
                next_gsi: IOAPIC_PINS,
                routes,
            }),
        });
        router.commit(&router.lock())?;
        Ok(router)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        // A panic while holding this lock leaves the table consistent (every change is a
        // single insert or remove), so poisoning carries no information here.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, state: &RouterState) -> Result<(), InterruptError> {
        let mut table =
            KvmIrqRouting::new(state.routes.len()).map_err(|_| InterruptError::RoutingTable)?;
        for (slot, entry) in table.as_mut_slice().iter_mut().zip(state.routes.values()) {
            *slot = *entry;
        }
        self.vm
            .set_gsi_routing(&table)
            .map_err(InterruptError::SetRouting)
    }

    /// An eventfd that raises IOAPIC pin `pin` (edge-triggered) when written.
    pub fn legacy_irqfd(&self, pin: u32) -> Result<EventFd, InterruptError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        self.vm
            .register_irqfd(&evt, pin)
            .map_err(|source| InterruptError::RegisterIrqfd { gsi: pin, source })?;
        Ok(evt)
    }

    /// Allocates `count` MSI vectors, each with its own GSI and irqfd, initially masked.
    pub fn create_msi_group(
        self: &Arc<Self>,
        count: u16,
    ) -> Result<Arc<MsiInterruptGroup>, InterruptError> {
        let mut vectors = Vec::with_capacity(count as usize);
        let mut state = self.lock();
        for _ in 0..count {
            if state.next_gsi > MAX_GSI {
                return Err(InterruptError::NoFreeGsi);
            }
            let gsi = state.next_gsi;
            state.next_gsi += 1;
            let irqfd = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            // Attached to KVM when first unmasked.
            vectors.push(MsiVector {
                gsi,
                irqfd,
                attached: Mutex::new(false),
            });
        }
        Ok(Arc::new(MsiInterruptGroup {
            router: self.clone(),
            vectors,
        }))
    }

    fn set_msi_route(&self, gsi: u32, route: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut state = self.lock();
        let key = route_key(gsi, 0);
        let changed = match route {
            Some(msg) => {
                let entry = msi_entry(gsi, msg);
                let old = state.routes.insert(key, entry);
                old.is_none_or(|o| !same_msi(&o, &entry))
            }
            None => state.routes.remove(&key).is_some(),
        };
        if changed {
            self.commit(&state)?;
        }
        Ok(())
    }
}

struct MsiVector {
    gsi: u32,
    irqfd: EventFd,
    /// Whether the irqfd is registered with KVM (only while the vector is unmasked).
    attached: Mutex<bool>,
}

/// The MSI vectors of one device (its MSI-X table).
pub struct MsiInterruptGroup {
    router: Arc<InterruptRouter>,
    vectors: Vec<MsiVector>,
}

impl MsiInterruptGroup {
    pub fn len(&self) -> u16 {
        self.vectors.len() as u16
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The eventfd that raises `vector`: hand it to a worker thread or a vhost-user
    /// backend (VHOST_USER_SET_VRING_CALL) so it can interrupt the guest directly.
    pub fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(vector as usize).map(|v| &v.irqfd)
    }

    /// Raises `vector` now.
    pub fn trigger(&self, vector: u16) -> Result<(), InterruptError> {
        self.notifier(vector)
            .ok_or(InterruptError::NoSuchVector(vector))?
            .write(1)
            .map_err(InterruptError::Trigger)
    }

    /// Points `vector` at `msg`, or holds its interrupts back while `masked`: they stay
    /// counted in the eventfd and are delivered when it is unmasked.
    pub fn update(&self, vector: u16, msg: MsiMessage, masked: bool) -> Result<(), InterruptError> {
        let v = self
            .vectors
            .get(vector as usize)
            .ok_or(InterruptError::NoSuchVector(vector))?;
        let mut attached = v.attached.lock().unwrap_or_else(|e| e.into_inner());
        let vm = &self.router.vm;
        if masked {
            if *attached {
                vm.unregister_irqfd(&v.irqfd, v.gsi)
                    .map_err(|source| InterruptError::RegisterIrqfd { gsi: v.gsi, source })?;
                *attached = false;
            }
            return self.router.set_msi_route(v.gsi, None);
        }
        // Route first: attaching injects at once if the eventfd was written while masked.
        self.router.set_msi_route(v.gsi, Some(msg))?;
        if !*attached {
            vm.register_irqfd(&v.irqfd, v.gsi)
                .map_err(|source| InterruptError::RegisterIrqfd { gsi: v.gsi, source })?;
            *attached = true;
        }
        Ok(())
    }
}

impl Drop for MsiInterruptGroup {
    fn drop(&mut self) {
        for v in &self.vectors {
            let attached = *v.attached.lock().unwrap_or_else(|e| e.into_inner());
            if attached && let Err(e) = self.router.vm.unregister_irqfd(&v.irqfd, v.gsi) {
                tracing::warn!(gsi = v.gsi, "cannot unregister irqfd: {e}");
            }
            if let Err(e) = self.router.set_msi_route(v.gsi, None) {
                tracing::warn!(gsi = v.gsi, "cannot remove MSI route: {e}");
            }
        }
    }
}

/// Routes are keyed by GSI, with room for the two chips a legacy line is wired to.
fn route_key(gsi: u32, index: u32) -> u32 {
    gsi * 2 + index
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.addr_lo;
    e.u.msi.address_hi = msg.addr_hi;
    e.u.msi.data = msg.data;
    e
}

fn same_msi(a: &kvm_irq_routing_entry, b: &kvm_irq_routing_entry) -> bool {
    // SAFETY: both entries are MSI entries built by `msi_entry`, so `u.msi` is the
    // initialised member of the union.
    unsafe {
        a.type_ == b.type_
            && a.u.msi.address_lo == b.u.msi.address_lo
            && a.u.msi.address_hi == b.u.msi.address_hi
            && a.u.msi.data == b.u.msi.data
    }
}
