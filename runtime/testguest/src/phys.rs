//! Access to guest-physical memory and MMIO through the boot identity map.
//!
//! The boot page tables map every address below 4 GiB 1:1 with user access, so a physical
//! address in that range is a valid pointer in ring 3. Accesses are volatile: firmware
//! tables are read once, MMIO registers and DMA rings must not be cached or merged.

/// End of the identity map built in `boot`.
pub const IDENTITY_MAP_END: u64 = 1 << 32;

fn checked<T>(addr: u64) -> *mut T {
    let size = core::mem::size_of::<T>() as u64;
    assert!(
        is_mapped(addr, size) && addr.is_multiple_of(core::mem::align_of::<T>() as u64),
        "physical address unaligned or outside the identity map"
    );
    addr as *mut T
}

/// Whether `len` bytes at `addr` lie in the identity map (and `addr` is not null).
pub fn is_mapped(addr: u64, len: u64) -> bool {
    addr != 0
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= IDENTITY_MAP_END)
}

/// Reads a plain integer (or `#[repr(C)]` struct of integers) from physical memory.
///
/// Panics if the address is null or not identity-mapped.
pub fn read<T: Copy>(addr: u64) -> T {
    let ptr = checked::<T>(addr);
    // SAFETY: `ptr` is non-null, aligned and mapped (checked above); callers use integer
    // types, for which every bit pattern is valid.
    unsafe { ptr.read_volatile() }
}

/// Writes a plain integer to physical memory or an MMIO register.
///
/// Panics if the address is null or not identity-mapped.
pub fn write<T: Copy>(addr: u64, value: T) {
    let ptr = checked::<T>(addr);
    // SAFETY: non-null, aligned and mapped (checked above). Callers only write MMIO registers or
    // memory handed to them by firmware, which no Rust object occupies.
    unsafe { ptr.write_volatile(value) }
}

/// Reads one byte; used for unaligned firmware tables.
pub fn read_u8(addr: u64) -> u8 {
    read::<u8>(addr)
}

/// Little-endian, possibly unaligned 16/32/64-bit reads of firmware tables.
pub fn read_le16(addr: u64) -> u16 {
    u16::from_le_bytes([read_u8(addr), read_u8(addr + 1)])
}

pub fn read_le32(addr: u64) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = read_u8(addr + i as u64);
    }
    u32::from_le_bytes(bytes)
}

pub fn read_le64(addr: u64) -> u64 {
    u64::from(read_le32(addr)) | (u64::from(read_le32(addr + 4)) << 32)
}

/// Byte sum of a firmware table (ACPI checksums make it zero).
pub fn byte_sum(addr: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |sum, i| sum.wrapping_add(read_u8(addr + i)))
}
