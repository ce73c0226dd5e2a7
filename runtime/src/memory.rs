//! Guest RAM: memfd-backed, MAP_SHARED, so vhost-user backends can map the same pages.
//!
//! One memfd holds all of the guest's RAM. Below 4 GiB the RAM stops at the 32-bit PCI
//! hole (layout::MMIO32_START); the rest of the file is mapped from 4 GiB up.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion,
    GuestUsize,
};

use crate::layout::{MMIO32_START, RAM_64BIT_START};

/// Guest memory as every device sees it. Dirty-page tracking for migration will change
/// the bitmap type here, and only here.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<()>;
/// Guest memory behind an atomic handle, so hotplug can swap the region set under
/// running devices.
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<GuestMemoryMmap>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the memfd for guest RAM")]
    Memfd(#[source] nix::Error),
    #[error(
        "cannot create a hugetlb memfd; reserve 2 MiB pages first (echo N > /proc/sys/vm/nr_hugepages)"
    )]
    HugetlbMemfd(#[source] nix::Error),
    #[error(
        "cannot size guest RAM to {size} bytes; is there enough memory (or hugepages) on the host?"
    )]
    Resize {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("KVM refused guest memory slot {slot}")]
    SetMemoryRegion {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest RAM size {0} bytes is not a whole number of {1}-byte pages")]
    Unaligned(u64, u64),
}

const HUGEPAGE_SIZE: u64 = 2 << 20;

/// The RAM ranges of a guest of `size` bytes: (guest address, length), in order.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO32_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO32_START),
            (GuestAddress(RAM_64BIT_START), size - MMIO32_START),
        ]
    }
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    pub memory: GuestMemoryAtomic,
    /// The file every region maps; vhost-user backends receive it with VHOST_USER_SET_MEM_TABLE.
    pub file: Arc<File>,
    pub size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM in a memfd and maps it into this process.
    pub fn new(size: u64, hugepages: bool) -> Result<GuestRam, MemoryError> {
        let page = if hugepages { HUGEPAGE_SIZE } else { 4096 };
        if size == 0 || !size.is_multiple_of(page) {
            return Err(MemoryError::Unaligned(size, page));
        }
        let mut flags = nix::sys::memfd::MFdFlags::MFD_CLOEXEC;
        if hugepages {
            flags |= nix::sys::memfd::MFdFlags::MFD_HUGETLB;
        }
        let fd: OwnedFd =
            nix::sys::memfd::memfd_create(c"ferrovirt-guest-ram", flags).map_err(|e| {
                if hugepages {
                    MemoryError::HugetlbMemfd(e)
                } else {
                    MemoryError::Memfd(e)
                }
            })?;
        let file = Arc::new(File::from(fd));
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;

        let mut offset = 0u64;
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(addr, len)| {
                let range = (
                    addr,
                    len as usize,
                    Some(FileOffset::from_arc(file.clone(), offset)),
                );
                offset += len;
                range
            })
            .collect();
        let mmap = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
        Ok(GuestRam {
            memory: GuestMemoryAtomic::new(mmap),
            file,
            size,
        })
    }

    /// Tells KVM about every region, one slot each.
    pub fn register_with(&self, vm: &VmFd) -> Result<(), MemoryError> {
        let mem = self.memory.memory();
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| MemoryError::SetMemoryRegion {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len() as GuestUsize,
                userspace_addr: host as u64,
            };
            // SAFETY: the region's mapping lives in `self.memory`, which the VM's owner keeps
            // alive for as long as the VM fd exists (the Vm struct holds both and drops the
            // VM first), and the range is exactly the mapping's length.
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(|source| MemoryError::SetMemoryRegion { slot, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn ram_above_the_pci_hole_moves_to_4g() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO32_START));
        assert_eq!(
            r[1],
            (GuestAddress(RAM_64BIT_START), (4 << 30) - MMIO32_START)
        );
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
    }

    #[test]
    fn guest_writes_land_in_the_shared_memfd() {
        use std::io::{Read, Seek};
        let ram = GuestRam::new(16 << 20, false).unwrap();
        ram.memory
            .memory()
            .write_slice(b"ferrovirt", GuestAddress(0x1000))
            .unwrap();
        let mut f = ram.file.as_ref();
        f.seek(std::io::SeekFrom::Start(0x1000)).unwrap();
        let mut buf = [0u8; 9];
        f.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ferrovirt");
    }

    #[test]
    fn unaligned_sizes_are_refused() {
        assert!(matches!(
            GuestRam::new(4097, false),
            Err(MemoryError::Unaligned(..))
        ));
    }
}
