//! Turns an x86 bzImage back into the ELF vmlinux it wraps.
//!
//! Linux boot protocol 2.08+ (Documentation/arch/x86/boot.rst): the setup header at 0x1F1
//! gives `setup_sects`; `payload_offset`/`payload_length` (0x248/0x24C) locate the compressed
//! kernel inside the protected-mode part, which starts at `(setup_sects + 1) * 512`. The
//! payload is `vmlinux.bin` (a stripped ELF, followed by relocations) compressed with the
//! format the kernel config picked, and, for every format but gzip, followed by its
//! uncompressed size as a 32-bit little-endian number.

use std::io::Read;

/// The header magic "HdrS" at offset 0x202.
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
/// lz4 "legacy" frames (`lz4 -l`), the format the kernel's LZ4 option uses.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Blocks of the legacy format decompress to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// No vmlinux is this big; a larger size field is corruption.
const MAX_KERNEL: usize = 1 << 30;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BzImageError {
    #[error("not a bzImage: no \"HdrS\" setup header at 0x202")]
    NotBzImage,
    #[error("boot protocol {0:#06x} is older than 2.08 and has no payload fields")]
    ProtocolTooOld(u16),
    #[error("payload {offset:#x}+{length:#x} lies outside the {file_len}-byte image")]
    PayloadOutOfBounds {
        offset: usize,
        length: usize,
        file_len: usize,
    },
    #[error("payload is {0}-compressed; the harness decompresses gzip and lz4 only")]
    UnsupportedCompression(Compression),
    #[error("payload starts with {0:02x?}, which is no compression format known to Linux")]
    UnknownCompression(Vec<u8>),
    #[error("corrupt {format} payload: {reason}")]
    Corrupt { format: Compression, reason: String },
    #[error("the decompressed payload is not a 64-bit x86 ELF")]
    NotElf,
}

/// The formats `CONFIG_KERNEL_*` can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Bzip2,
    Lzma,
    Xz,
    Lzo,
    Lz4,
    Zstd,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Xz => "xz",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        };
        f.write_str(name)
    }
}

impl Compression {
    /// Recognizes a payload by its first bytes.
    pub fn detect(payload: &[u8]) -> Option<Compression> {
        let table: [(&[u8], Compression); 7] = [
            (&[0x1f, 0x8b], Compression::Gzip),
            (b"BZh", Compression::Bzip2),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
            (&LZ4_LEGACY_MAGIC.to_le_bytes(), Compression::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
        ];
        table
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|&(_, format)| format)
    }
}

/// The compressed kernel inside a bzImage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload<'a> {
    /// Offset of the payload from the start of the file.
    pub offset: usize,
    pub bytes: &'a [u8],
    pub compression: Option<Compression>,
}

/// Finds the compressed payload through the setup header.
pub fn locate_payload(image: &[u8]) -> Result<Payload<'_>, BzImageError> {
    if image.get(0x202..0x206) != Some(HDRS_MAGIC) {
        return Err(BzImageError::NotBzImage);
    }
    let version = u16_at(image, 0x206).ok_or(BzImageError::NotBzImage)?;
    if version < 0x0208 {
        return Err(BzImageError::ProtocolTooOld(version));
    }
    // boot.rst: "If this field is 0, the real value is 4."
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let payload_offset = u32_at(image, 0x248).ok_or(BzImageError::NotBzImage)? as usize;
    let length = u32_at(image, 0x24c).ok_or(BzImageError::NotBzImage)? as usize;
    let offset = (setup_sects + 1) * 512 + payload_offset;
    let bytes = offset
        .checked_add(length)
        .and_then(|end| image.get(offset..end))
        .ok_or(BzImageError::PayloadOutOfBounds {
            offset,
            length,
            file_len: image.len(),
        })?;
    Ok(Payload {
        offset,
        bytes,
        compression: Compression::detect(bytes),
    })
}

/// Decompresses the payload of a bzImage and checks that the result is an x86-64 ELF.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let payload = locate_payload(image)?;
    let elf = match payload.compression {
        Some(Compression::Gzip) => decompress_gzip(payload.bytes)?,
        Some(Compression::Lz4) => decompress_lz4_legacy(payload.bytes)?,
        Some(other) => return Err(BzImageError::UnsupportedCompression(other)),
        None => {
            let head = payload.bytes[..payload.bytes.len().min(8)].to_vec();
            return Err(BzImageError::UnknownCompression(head));
        }
    };
    if !is_x86_64_elf(&elf) {
        return Err(BzImageError::NotElf);
    }
    Ok(elf)
}

/// `\x7fELF`, 64-bit class, machine EM_X86_64.
pub fn is_x86_64_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF") && bytes.get(4) == Some(&2) && u16_at(bytes, 18) == Some(62)
}

/// Whether a 64-bit ELF carries the Xen `PHYS32_ENTRY` note that PVH boot enters through.
pub fn has_pvh_note(elf: &[u8]) -> bool {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    if !is_x86_64_elf(elf) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(elf, 0x20), u16_at(elf, 0x36), u16_at(elf, 0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let Some(ph) = usize::try_from(phoff)
            .ok()
            .and_then(|off| off.checked_add(i * usize::from(phentsize)))
        else {
            return false;
        };
        if u32_at(elf, ph) != Some(PT_NOTE) {
            return false;
        }
        let (Some(offset), Some(size)) = (u64_at(elf, ph + 8), u64_at(elf, ph + 32)) else {
            return false;
        };
        let notes = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, s)| elf.get(o..o.checked_add(s)?));
        notes
            .is_some_and(|notes| note_types(notes, b"Xen").any(|ty| ty == XEN_ELFNOTE_PHYS32_ENTRY))
    })
}

/// The types of the notes named `name` in a note segment (ELF notes are 4-byte aligned).
fn note_types<'a>(mut notes: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = u32> + 'a {
    std::iter::from_fn(move || {
        loop {
            let namesz = u32_at(notes, 0)? as usize;
            let descsz = u32_at(notes, 4)? as usize;
            let ty = u32_at(notes, 8)?;
            let name_end = 12usize.checked_add(namesz)?;
            let note_name = notes.get(12..name_end)?;
            let next = name_end.next_multiple_of(4).checked_add(descsz)?;
            notes = notes.get(next.next_multiple_of(4).min(notes.len())..)?;
            // The name includes its NUL terminator.
            if note_name.strip_suffix(&[0]) == Some(name) {
                return Some(ty);
            }
        }
    })
}

fn decompress_gzip(payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(payload)
        .take(MAX_KERNEL as u64)
        .read_to_end(&mut out)
        .map_err(|e| BzImageError::Corrupt {
            format: Compression::Gzip,
            reason: e.to_string(),
        })?;
    Ok(out)
}

/// The legacy lz4 format: magic, then blocks of `u32 compressed size` + data; the kernel build
/// appends the total uncompressed size after the last block.
fn decompress_lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |reason: String| BzImageError::Corrupt {
        format: Compression::Lz4,
        reason,
    };
    if payload.len() < 8 {
        return Err(corrupt("shorter than magic and size".into()));
    }
    let (frames, size_field) = payload.split_at(payload.len() - 4);
    let expected = u32_at(size_field, 0).unwrap_or_default() as usize;
    if expected > MAX_KERNEL {
        return Err(corrupt(format!("claims {expected} uncompressed bytes")));
    }
    let mut out = vec![0u8; 0];
    let mut rest = &frames[4..];
    while !rest.is_empty() {
        let block_len = u32_at(rest, 0)
            .ok_or_else(|| corrupt(format!("{} stray bytes after the last block", rest.len())))?;
        rest = &rest[4..];
        // Concatenated frames repeat the magic.
        if block_len == LZ4_LEGACY_MAGIC {
            continue;
        }
        let block = rest.get(..block_len as usize).ok_or_else(|| {
            corrupt(format!(
                "block of {block_len} bytes, {} bytes left",
                rest.len()
            ))
        })?;
        rest = &rest[block.len()..];
        let start = out.len();
        if start + LZ4_LEGACY_BLOCK > MAX_KERNEL {
            return Err(corrupt("decompresses to more than 1 GiB".into()));
        }
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| corrupt(e.to_string()))?;
        out.truncate(start + n);
    }
    if out.len() != expected {
        return Err(corrupt(format!(
            "decompressed to {} bytes, the size field says {expected}",
            out.len()
        )));
    }
    Ok(out)
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal x86-64 ELF header with one PT_NOTE segment holding a Xen PHYS32_ENTRY note.
    fn tiny_pvh_elf() -> Vec<u8> {
        let mut elf = vec![0u8; 0x40 + 0x38];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // little endian
        elf[18..20].copy_from_slice(&62u16.to_le_bytes());
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz "Xen\0"
        note.extend_from_slice(&4u32.to_le_bytes()); // descsz
        note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x100_0000u32.to_le_bytes());
        let ph = 0x40;
        elf[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        let note_off = elf.len() as u64;
        elf[ph + 8..ph + 16].copy_from_slice(&note_off.to_le_bytes());
        elf[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        elf.extend_from_slice(&note);
        // Some bulk so compression has something to do.
        elf.extend(std::iter::repeat_n(0x90u8, 100_000));
        elf
    }

    /// Wraps a payload in a bzImage-shaped file: setup sectors, header fields, payload.
    fn fake_bzimage(payload: &[u8], setup_sects: u8, payload_offset: u32) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            setup_sects as usize
        };
        let start = (sects + 1) * 512 + payload_offset as usize;
        let mut image = vec![0u8; start];
        image[0x1f1] = setup_sects;
        image[0x202..0x206].copy_from_slice(HDRS_MAGIC);
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0u8; 64]); // trailing setup data the kernel may carry
        image
    }

    fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let compressed = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            out.extend_from_slice(&compressed);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    #[test]
    fn lz4_payload_is_located_and_decompressed() {
        let elf = tiny_pvh_elf();
        let image = fake_bzimage(&lz4_legacy(&elf, 4096), 0, 0x2cc);
        let payload = locate_payload(&image).unwrap();
        assert_eq!(payload.offset, 5 * 512 + 0x2cc);
        assert_eq!(payload.compression, Some(Compression::Lz4));
        assert_eq!(extract_vmlinux(&image).unwrap(), elf);
    }

    #[test]
    fn gzip_payload_is_decompressed() {
        let elf = tiny_pvh_elf();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let image = fake_bzimage(&gz.finish().unwrap(), 31, 0);
        assert_eq!(extract_vmlinux(&image).unwrap(), elf);
    }

    #[test]
    fn truncated_lz4_payload_is_an_error_not_a_panic() {
        let elf = tiny_pvh_elf();
        let mut payload = lz4_legacy(&elf, 4096);
        let cut = payload.len() / 2;
        payload.drain(cut..payload.len() - 4);
        let err = extract_vmlinux(&fake_bzimage(&payload, 0, 0)).unwrap_err();
        assert!(matches!(err, BzImageError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn other_formats_are_named_in_the_error() {
        let image = fake_bzimage(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4], 0, 0);
        assert_eq!(
            extract_vmlinux(&image),
            Err(BzImageError::UnsupportedCompression(Compression::Zstd))
        );
        let image = fake_bzimage(b"plain old bytes", 0, 0);
        assert!(matches!(
            extract_vmlinux(&image),
            Err(BzImageError::UnknownCompression(_))
        ));
    }

    #[test]
    fn payload_fields_pointing_past_the_file_are_rejected() {
        let mut image = fake_bzimage(&[0x1f, 0x8b, 0, 0], 0, 0);
        image[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            locate_payload(&image),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
        assert_eq!(
            locate_payload(b"MZ not a kernel"),
            Err(BzImageError::NotBzImage)
        );
    }

    #[test]
    fn pvh_note_is_found_only_when_present() {
        let elf = tiny_pvh_elf();
        assert!(has_pvh_note(&elf));
        let mut other = elf.clone();
        let ty = 0x40 + 0x38 + 8;
        other[ty..ty + 4].copy_from_slice(&17u32.to_le_bytes());
        assert!(!has_pvh_note(&other));
        assert!(!has_pvh_note(b"\x7fELF"));
    }
}
