//! Pure checks of guest descriptor chains for the data queues: what a TX chain may carry to the
//! TAP, what an RX chain may receive, and how a frame is spread over RX chains. No I/O here, so
//! property tests can throw arbitrary chains at it.
//!
//! Every frame on a data queue starts with `struct virtio_net_hdr_v1` (virtio 1.2 §5.1.6: 12
//! bytes once VIRTIO_F_VERSION_1 is negotiated, `num_buffers` included even without
//! VIRTIO_NET_F_MRG_RXBUF).

use vm_memory::GuestAddress;

/// Bytes of `virtio_net_hdr_v1`; also the TAP's vnet header size (TUNSETVNETHDRSZ).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Offset of `gso_type` in the header.
pub const GSO_TYPE_OFFSET: usize = 1;
/// Ethernet header plus one VLAN tag: what a frame may add to the MTU.
pub const L2_OVERHEAD: usize = 18;
/// The largest GSO super-frame a guest may hand over with HOST_TSO4/6 (IP length is 16 bits).
pub const MAX_GSO_FRAME: usize = 65535 + L2_OVERHEAD;

/// Why a chain was returned to the guest without moving a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The chain holds fewer than the 12 bytes of the virtio-net header.
    HeaderTooShort,
    /// A TX frame longer than the MTU (or than a GSO frame can be).
    FrameTooLong,
    /// A descriptor points outside guest memory.
    OutsideMemory,
    /// A write-only descriptor on TX, or a read-only one on RX.
    WrongDirection,
    /// Without MRG_RXBUF, an RX chain too small for the frame.
    ChainTooSmall,
    /// The chain could not be walked (bad next index, loop, bad indirect table) or has more
    /// buffers than one writev takes.
    BadChain,
    /// The TAP refused the frame (for example a header with an invalid GSO type).
    TapError,
}

impl DropReason {
    pub const COUNT: usize = 7;
    pub const ALL: [DropReason; Self::COUNT] = [
        Self::HeaderTooShort,
        Self::FrameTooLong,
        Self::OutsideMemory,
        Self::WrongDirection,
        Self::ChainTooSmall,
        Self::BadChain,
        Self::TapError,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The metrics key.
    pub fn name(self) -> &'static str {
        match self {
            Self::HeaderTooShort => "header_too_short",
            Self::FrameTooLong => "frame_too_long",
            Self::OutsideMemory => "outside_memory",
            Self::WrongDirection => "wrong_direction",
            Self::ChainTooSmall => "chain_too_small",
            Self::BadChain => "bad_chain",
            Self::TapError => "tap_error",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One descriptor as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write_only: bool,
}

/// A guest buffer checked to lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A TX chain that may go to the TAP: header and frame, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxChain {
    pub segments: Vec<Segment>,
    /// Header plus frame bytes.
    pub len: usize,
}

/// An RX chain the device may write a frame (or part of one) into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxChain {
    pub head: u16,
    pub segments: Vec<Segment>,
    pub capacity: usize,
}

/// Most buffers one TX chain may have: one writev takes at most IOV_MAX.
pub const MAX_TX_SEGMENTS: usize = 1024;

/// Checks a TX chain's descriptors. `in_memory(addr, len)` says whether a range is guest memory.
/// The frame length is checked against the header by [`tx_frame_fits`] once the header is read.
pub fn parse_tx(
    descs: &[Desc],
    in_memory: impl Fn(u64, u32) -> bool,
) -> Result<TxChain, DropReason> {
    if descs.is_empty() || descs.len() > MAX_TX_SEGMENTS {
        return Err(DropReason::BadChain);
    }
    let mut segments = Vec::with_capacity(descs.len());
    let mut len = 0usize;
    for d in descs {
        // virtio 1.2 §2.7.4.2: the device must not write to a device-readable buffer, and a
        // driver putting a device-writable one in a TX chain is broken.
        if d.write_only {
            return Err(DropReason::WrongDirection);
        }
        if !in_memory(d.addr, d.len) {
            return Err(DropReason::OutsideMemory);
        }
        len += d.len as usize;
        if d.len > 0 {
            segments.push(Segment {
                addr: GuestAddress(d.addr),
                len: d.len,
            });
        }
    }
    if len < VNET_HDR_LEN {
        return Err(DropReason::HeaderTooShort);
    }
    Ok(TxChain { segments, len })
}

/// Whether a TX frame of `frame_len` bytes (header excluded) with header `gso_type` may go out:
/// at most MTU plus L2 header, or a GSO super-frame when the guest negotiated HOST_TSO.
pub fn tx_frame_fits(frame_len: usize, gso_type: u8, host_tso: bool, mtu: u16) -> bool {
    let gso = gso_type & !(virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_ECN as u8) != 0;
    let limit = if gso && host_tso {
        MAX_GSO_FRAME
    } else {
        usize::from(mtu) + L2_OVERHEAD
    };
    frame_len <= limit
}

/// Checks an RX chain's descriptors.
pub fn parse_rx(
    head: u16,
    descs: &[Desc],
    in_memory: impl Fn(u64, u32) -> bool,
) -> Result<RxChain, DropReason> {
    if descs.is_empty() {
        return Err(DropReason::BadChain);
    }
    let mut segments = Vec::with_capacity(descs.len());
    let mut capacity = 0usize;
    for d in descs {
        if !d.write_only {
            return Err(DropReason::WrongDirection);
        }
        if !in_memory(d.addr, d.len) {
            return Err(DropReason::OutsideMemory);
        }
        capacity += d.len as usize;
        if d.len > 0 {
            segments.push(Segment {
                addr: GuestAddress(d.addr),
                len: d.len,
            });
        }
    }
    // virtio 1.2 §5.1.6.3.1: every buffer must hold at least the header.
    if capacity < VNET_HDR_LEN {
        return Err(DropReason::HeaderTooShort);
    }
    Ok(RxChain {
        head,
        segments,
        capacity,
    })
}

/// How `total` bytes (header included) spread over chains of `capacities`, filling each in
/// turn: the byte count per chain used, or `None` when they do not hold it all. With
/// `mergeable` false only the first chain may be used.
pub fn spread_frame(total: usize, capacities: &[usize], mergeable: bool) -> Option<Vec<usize>> {
    let usable = if mergeable {
        capacities
    } else {
        &capacities[..capacities.len().min(1)]
    };
    let mut left = total;
    let mut out = Vec::new();
    for &c in usable {
        if left == 0 {
            break;
        }
        let n = c.min(left);
        out.push(n);
        left -= n;
    }
    (left == 0 && !out.is_empty()).then_some(out)
}

/// Copies `src` into `segments` from byte 0 with `write(bytes, addr)`; stops at the first error.
pub fn scatter<E>(
    src: &[u8],
    segments: &[Segment],
    mut write: impl FnMut(&[u8], GuestAddress) -> Result<(), E>,
) -> Result<usize, E> {
    let mut done = 0usize;
    for s in segments {
        if done == src.len() {
            break;
        }
        let n = (s.len as usize).min(src.len() - done);
        write(&src[done..done + n], s.addr)?;
        done += n;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MEM: u64 = 1 << 20;

    fn in_memory(addr: u64, len: u32) -> bool {
        addr.checked_add(u64::from(len))
            .is_some_and(|end| end <= MEM)
    }

    fn desc() -> impl Strategy<Value = Desc> {
        (
            prop_oneof![0..MEM, MEM - 64..MEM + 64, any::<u64>()],
            prop_oneof![0u32..32, 0u32..2048, any::<u32>()],
            any::<bool>(),
        )
            .prop_map(|(addr, len, write_only)| Desc {
                addr,
                len,
                write_only,
            })
    }

    #[test]
    fn a_tx_chain_shorter_than_the_header_is_dropped() {
        let d = [Desc {
            addr: 0,
            len: 11,
            write_only: false,
        }];
        assert_eq!(parse_tx(&d, in_memory), Err(DropReason::HeaderTooShort));
    }

    #[test]
    fn frames_over_the_mtu_fit_only_as_gso_with_host_tso() {
        assert!(tx_frame_fits(1518, 0, false, 1500));
        assert!(!tx_frame_fits(1519, 0, true, 1500));
        assert!(tx_frame_fits(60000, 1, true, 1500));
        assert!(!tx_frame_fits(60000, 1, false, 1500));
        assert!(!tx_frame_fits(MAX_GSO_FRAME + 1, 1, true, 1500));
    }

    proptest! {
        #[test]
        fn parse_tx_accepts_exactly_readable_in_memory_chains_with_a_header(
            descs in proptest::collection::vec(desc(), 0..8)
        ) {
            let result = parse_tx(&descs, in_memory);
            let expected = if descs.is_empty() {
                Err(DropReason::BadChain)
            } else if let Some(bad) = descs.iter().find(|d| d.write_only || !in_memory(d.addr, d.len)) {
                Err(if bad.write_only { DropReason::WrongDirection } else { DropReason::OutsideMemory })
            } else if descs.iter().map(|d| d.len as usize).sum::<usize>() < VNET_HDR_LEN {
                Err(DropReason::HeaderTooShort)
            } else {
                Ok(())
            };
            match (&result, expected) {
                (Ok(chain), Ok(())) => {
                    prop_assert_eq!(chain.len, descs.iter().map(|d| d.len as usize).sum::<usize>());
                    prop_assert_eq!(chain.len, chain.segments.iter().map(|s| s.len as usize).sum::<usize>());
                    for s in &chain.segments {
                        prop_assert!(in_memory(s.addr.0, s.len));
                    }
                }
                (Err(got), Err(want)) => prop_assert_eq!(*got, want),
                (got, want) => prop_assert!(false, "got {:?}, want {:?}", got, want),
            }
        }

        #[test]
        fn parse_rx_accepts_exactly_writable_in_memory_chains_with_room_for_a_header(
            descs in proptest::collection::vec(desc(), 0..8)
        ) {
            let result = parse_rx(7, &descs, in_memory);
            match result {
                Ok(chain) => {
                    prop_assert!(descs.iter().all(|d| d.write_only && in_memory(d.addr, d.len)));
                    prop_assert!(chain.capacity >= VNET_HDR_LEN);
                    prop_assert_eq!(chain.head, 7);
                    prop_assert_eq!(chain.capacity, chain.segments.iter().map(|s| s.len as usize).sum::<usize>());
                }
                Err(DropReason::WrongDirection) => prop_assert!(descs.iter().any(|d| !d.write_only)),
                Err(DropReason::OutsideMemory) => prop_assert!(descs.iter().any(|d| !in_memory(d.addr, d.len))),
                Err(DropReason::HeaderTooShort) => prop_assert!(descs.iter().map(|d| d.len as usize).sum::<usize>() < VNET_HDR_LEN),
                Err(DropReason::BadChain) => prop_assert!(descs.is_empty()),
                Err(other) => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        #[test]
        fn spread_frame_fills_chains_in_order_and_loses_no_byte(
            total in 1usize..200_000,
            capacities in proptest::collection::vec(12usize..70_000, 0..8),
            mergeable in any::<bool>(),
        ) {
            match spread_frame(total, &capacities, mergeable) {
                Some(parts) => {
                    prop_assert_eq!(parts.iter().sum::<usize>(), total);
                    prop_assert!(mergeable || parts.len() == 1);
                    for (i, (&p, &c)) in parts.iter().zip(&capacities).enumerate() {
                        prop_assert!(p <= c && p > 0);
                        if i + 1 < parts.len() {
                            prop_assert_eq!(p, c, "only the last chain is partly filled");
                        }
                    }
                }
                None => {
                    let room: usize = if mergeable {
                        capacities.iter().sum()
                    } else {
                        capacities.first().copied().unwrap_or(0)
                    };
                    prop_assert!(room < total);
                }
            }
        }

        #[test]
        fn scatter_copies_every_byte_in_order(
            data in proptest::collection::vec(any::<u8>(), 0..4096),
            lens in proptest::collection::vec(0u32..700, 0..10),
        ) {
            let mut at = 0u64;
            let segments: Vec<Segment> = lens.iter().map(|&len| {
                let s = Segment { addr: GuestAddress(at), len };
                at += u64::from(len);
                s
            }).collect();
            let mut out = vec![0u8; at as usize];
            let done = scatter::<()>(&data, &segments, |bytes, addr| {
                out[addr.0 as usize..addr.0 as usize + bytes.len()].copy_from_slice(bytes);
                Ok(())
            }).unwrap();
            prop_assert_eq!(done, data.len().min(at as usize));
            prop_assert_eq!(&out[..done], &data[..done]);
        }
    }
}
