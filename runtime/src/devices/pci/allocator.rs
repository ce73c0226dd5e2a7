//! First-fit address allocator for BARs inside an MMIO window.
//!
//! First fit from the bottom keeps the top of the window free for devices hotplugged
//! later, and freed ranges are reused.

use std::collections::BTreeMap;

pub struct AddressAllocator {
    start: u64,
    /// One past the last usable address.
    end: u64,
    /// Allocated ranges: base -> length.
    used: BTreeMap<u64, u64>,
}

impl AddressAllocator {
    /// Manages `start..start + size` (clamped to the end of the address space).
    pub fn new(start: u64, size: u64) -> AddressAllocator {
        AddressAllocator {
            start,
            end: start.saturating_add(size),
            used: BTreeMap::new(),
        }
    }

    /// The lowest free `size`-byte range aligned to `align` (a power of two).
    pub fn allocate(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        let mut candidate = align_up(self.start, align)?;
        for (&base, &len) in &self.used {
            if candidate.checked_add(size)? <= base {
                break;
            }
            candidate = candidate.max(align_up(base + len, align)?);
        }
        (candidate.checked_add(size)? <= self.end).then(|| {
            self.used.insert(candidate, size);
            candidate
        })
    }

    /// Marks `base..base + size` used; false if it leaves the window or overlaps.
    pub fn reserve(&mut self, base: u64, size: u64) -> bool {
        let Some(end) = base.checked_add(size) else {
            return false;
        };
        if size == 0 || base < self.start || end > self.end {
            return false;
        }
        let below = self
            .used
            .range(..=base)
            .next_back()
            .is_some_and(|(&b, &l)| b + l > base);
        let above = self.used.range(base..end).next().is_some();
        if below || above {
            return false;
        }
        self.used.insert(base, size);
        true
    }

    /// Releases the range allocated at `base`; false if there was none.
    pub fn free(&mut self, base: u64) -> bool {
        self.used.remove(&base).is_some()
    }
}

fn align_up(addr: u64, align: u64) -> Option<u64> {
    Some(addr.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_naturally_aligned_and_disjoint() {
        let mut a = AddressAllocator::new(0xc000_1000, 0x10_0000);
        let x = a.allocate(0x1000, 0x1000).unwrap();
        let y = a.allocate(0x8000, 0x8000).unwrap();
        let z = a.allocate(0x1000, 0x1000).unwrap();
        assert_eq!(x, 0xc000_1000);
        assert_eq!(y, 0xc000_8000);
        assert_eq!(z, 0xc000_2000, "first fit fills the alignment gap");
    }

    #[test]
    fn freed_ranges_are_reused_and_exhaustion_is_reported() {
        let mut a = AddressAllocator::new(0x1000, 0x5000);
        let x = a.allocate(0x2000, 0x2000).unwrap();
        assert_eq!(a.allocate(0x2000, 0x2000), Some(0x4000));
        assert_eq!(a.allocate(0x2000, 0x2000), None);
        assert!(a.free(x));
        assert!(!a.free(x));
        assert_eq!(a.allocate(0x2000, 0x2000), Some(x));
        assert_eq!(a.allocate(0, 16), None);
        assert_eq!(a.allocate(16, 3), None);
    }

    #[test]
    fn reservations_refuse_overlaps_and_ranges_outside_the_window() {
        let mut a = AddressAllocator::new(0x1000, 0x4000);
        assert!(a.reserve(0x2000, 0x1000));
        assert!(!a.reserve(0x2800, 0x1000));
        assert!(!a.reserve(0x1800, 0x1000));
        assert!(!a.reserve(0x4800, 0x1000));
        assert!(!a.reserve(u64::MAX, 2));
        assert!(a.reserve(0x3000, 0x1000));
        assert_eq!(a.allocate(0x1000, 0x1000), Some(0x1000));
        let mut edge = AddressAllocator::new(u64::MAX - 0xfff, u64::MAX);
        assert_eq!(edge.allocate(0x2000, 0x1000), None);
    }
}
