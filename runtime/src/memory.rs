//! Guest RAM: memfd-backed, MAP_SHARED, so vhost-user backends can map the same pages.

/// Guest memory as every device sees it. Dirty-page tracking for migration will change
/// the bitmap type here, and only here.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<()>;
/// Guest memory behind an atomic handle, so hotplug can swap the region set under
/// running devices.
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<GuestMemoryMmap>;
