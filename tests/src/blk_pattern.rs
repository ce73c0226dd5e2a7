//! The test guest's virtio-blk data pattern (runtime/testguest/README.md, "Block
//! scenarios"), so host-side tests can check an image byte for byte.

pub const SECTOR: usize = 512;

/// The 512 bytes the guest writes to `sector` with `seed`.
pub fn sector_bytes(seed: u64, sector: u64) -> [u8; SECTOR] {
    let mut out = [0u8; SECTOR];
    for (w, chunk) in out.chunks_exact_mut(8).enumerate() {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ sector.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
            ^ w as u64;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// The first sector in `sectors` of `image` that does not hold the pattern.
pub fn first_mismatch(image: &[u8], seed: u64, sectors: std::ops::Range<u64>) -> Option<u64> {
    sectors.into_iter().find(|&s| {
        let at = s as usize * SECTOR;
        image.get(at..at + SECTOR) != Some(&sector_bytes(seed, s)[..])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_guest_tools_reference_values() {
        // From runtime/testguest/tools/blk_pattern.py for seed 1, sector 0, words 0 and 1.
        let reference = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import sys; sys.path.insert(0, sys.argv[1]); import blk_pattern as p; \
                 print(p.sector_bytes(1, 0).hex(), p.sector_bytes(7, 12345).hex())",
            )
            .arg(crate::repo_root().join("runtime/testguest/tools"))
            .output()
            .expect("python3");
        let text = String::from_utf8(reference.stdout).unwrap();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let ours = format!(
            "{} {}\n",
            hex(&sector_bytes(1, 0)),
            hex(&sector_bytes(7, 12345))
        );
        assert_eq!(text, ours);
    }
}
