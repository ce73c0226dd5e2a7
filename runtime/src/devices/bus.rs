//! Address buses: which device answers a guest port or MMIO access.
//!
//! vCPU threads look up a device on every exit, while the guest may move a PCI BAR (and
//! so re-map a device) from inside one of those exits. A bus is therefore an immutable
//! snapshot behind `Arc`: readers clone the `Arc` and drop the lock before calling the
//! device, and a change builds a new snapshot and swaps it in. No device call ever runs
//! under the bus lock, so a device may change the bus it is called from.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// A device on a bus. `base` is where the device's range starts, `offset` is the access
/// address minus `base`. Devices use interior mutability: several vCPUs may call at once.
pub trait BusDevice: Send + Sync {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&self, base: u64, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} is empty or wraps around the address space")]
    InvalidRange { base: u64, len: u64 },
    #[error("no device at {0:#x}")]
    NoDevice(u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// One immutable set of device ranges.
#[derive(Clone, Default)]
pub struct BusMap {
    ranges: BTreeMap<u64, Entry>,
}

impl BusMap {
    /// The device whose range holds `addr`, with the base of that range.
    pub fn lookup(&self, addr: u64) -> Option<(u64, &Arc<dyn BusDevice>)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((base, &entry.device))
    }

    fn insert(&mut self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_below = self.lookup(base).is_some();
        let overlaps_above = self.ranges.range(base..end).next().is_some();
        if overlaps_below || overlaps_above {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }
}

/// A bus shared by all vCPUs (one for port I/O, one for MMIO).
#[derive(Default)]
pub struct Bus {
    map: RwLock<Arc<BusMap>>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// The current snapshot. Cheap: one `Arc` clone under a read lock.
    pub fn snapshot(&self) -> Arc<BusMap> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update<T>(&self, f: impl FnOnce(&mut BusMap) -> Result<T, BusError>) -> Result<T, BusError> {
        let mut guard = self.map.write().unwrap_or_else(|e| e.into_inner());
        let mut next = BusMap::clone(&guard);
        let out = f(&mut next)?;
        *guard = Arc::new(next);
        Ok(out)
    }

    pub fn insert(&self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        self.update(|m| m.insert(base, len, device))
    }

    pub fn remove(&self, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        self.update(|m| {
            m.ranges
                .remove(&base)
                .map(|e| e.device)
                .ok_or(BusError::NoDevice(base))
        })
    }

    /// Moves the range starting at `old_base` to `new_base` in one step (a BAR write).
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        self.update(|m| {
            let entry = m
                .ranges
                .remove(&old_base)
                .ok_or(BusError::NoDevice(old_base))?;
            m.insert(new_base, entry.len, entry.device)
        })
    }

    /// Dispatches a read; returns false when no device answers (the caller fills 0xff).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let map = self.snapshot();
        match map.lookup(addr) {
            Some((base, dev)) => {
                dev.read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device answers.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let map = self.snapshot();
        match map.lookup(addr) {
            Some((base, dev)) => {
                dev.write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u64, Vec<u8>)>>);
    impl BusDevice for Recorder {
        fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, base: u64, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_offsets() {
        let bus = Bus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(0x1000, 0x10, dev.clone()).unwrap();
        let mut buf = [0u8; 2];
        assert!(bus.read(0x1004, &mut buf));
        assert_eq!(buf, [4, 4]);
        assert!(bus.write(0x100f, &[7]));
        assert!(!bus.write(0x1010, &[7]), "one past the end must miss");
        assert!(!bus.read(0xfff, &mut buf));
        assert_eq!(*dev.0.lock().unwrap(), vec![(0x1000, 0xf, vec![7])]);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let bus = Bus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(0x1000, 0x10, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x100f, 1, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xff8, 0x10, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev.clone()),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(0x1010, 0x10, dev).unwrap();
    }

    #[test]
    fn a_device_may_relocate_itself_during_an_access() {
        struct Mover(Arc<Bus>);
        impl BusDevice for Mover {
            fn read(&self, _: u64, _: u64, _: &mut [u8]) {}
            fn write(&self, base: u64, _: u64, _: &[u8]) {
                self.0.relocate(base, 0x8000).unwrap();
            }
        }
        let bus = Arc::new(Bus::new());
        bus.insert(0x2000, 0x100, Arc::new(Mover(bus.clone())))
            .unwrap();
        assert!(bus.write(0x2000, &[1]));
        assert!(!bus.write(0x2000, &[1]));
        assert!(bus.snapshot().lookup(0x80ff).is_some());
    }
}
