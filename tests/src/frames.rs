//! Ethernet frames built and read by hand, for tests and benchmarks that speak to a datapath
//! through packet sockets or BPF_PROG_TEST_RUN: ARP, IPv4 and IPv6 with UDP/TCP/ICMP, 802.1Q
//! tags, and the ICMPv6 messages of neighbour discovery.

use std::net::{Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const BROADCAST: [u8; 6] = [0xff; 6];
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
const ICMPV6_NEIGHBOR_SOLICITATION: u8 = 135;
const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
const NDP_OPTION_SOURCE_LL: u8 = 1;
const NDP_OPTION_TARGET_LL: u8 = 2;

/// An Ethernet header followed by `payload`.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `frame` with an 802.1Q tag for `vlan` after the MAC addresses.
pub fn with_vlan(frame: &[u8], vlan: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(frame.len() + 4);
    f.extend_from_slice(&frame[..12]);
    f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    f.extend_from_slice(&(vlan & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// The VLAN id of a tag still in the frame's bytes and the frame without it.
pub fn strip_vlan(frame: &[u8]) -> (Option<u16>, Vec<u8>) {
    if frame.len() >= ETH_HLEN + 4 && ethertype(frame) == Some(ETHERTYPE_VLAN) {
        let vid = u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff;
        let mut f = frame[..12].to_vec();
        f.extend_from_slice(&frame[16..]);
        (Some(vid), f)
    } else {
        (None, frame.to_vec())
    }
}

pub fn ethertype(frame: &[u8]) -> Option<u16> {
    frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

pub fn source_mac(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(6..12)?.try_into().ok()
}

pub fn destination_mac(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(..6)?.try_into().ok()
}

/// An Ethernet/IPv4 ARP message (no Ethernet header); `op` 1 is a request, 2 a reply.
pub fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    p.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    p.extend_from_slice(&[6, 4]);
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa.octets());
    p
}

/// A broadcast "who has `target`, tell `sender_ip`" from `sender_mac`.
pub fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let payload = arp(ARP_REQUEST, sender_mac, sender_ip, [0; 6], target);
    ethernet(BROADCAST, sender_mac, ETHERTYPE_ARP, &payload)
}

/// A unicast "`sender_ip` is at `sender_mac`" to `target_mac`/`target_ip`.
pub fn arp_reply(
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let payload = arp(ARP_REPLY, sender_mac, sender_ip, target_mac, target_ip);
    ethernet(target_mac, sender_mac, ETHERTYPE_ARP, &payload)
}

/// An ARP message's fields, read from an untagged frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    pub is_reply: bool,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

pub fn parse_arp(frame: &[u8]) -> Option<Arp> {
    if ethertype(frame)? != ETHERTYPE_ARP {
        return None;
    }
    let p = frame.get(ETH_HLEN..ETH_HLEN + 28)?;
    let ip = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    Some(Arp {
        is_reply: u16::from_be_bytes([p[6], p[7]]) == ARP_REPLY,
        sender_mac: p[8..14].try_into().ok()?,
        sender_ip: ip(&p[14..18]),
        target_ip: ip(&p[24..28]),
    })
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (20-byte header, checksum filled, DF set) around `l4`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let sum = internet_checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

/// An IPv6 packet (no extension headers) around `payload`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
    let payload_len = u16::try_from(payload.len()).expect("small test packet");
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&payload_len.to_be_bytes());
    packet.extend_from_slice(&[next_header, 64]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(payload);
    packet
}

/// A UDP datagram (checksum 0: none, as IPv4 allows) from `sport` to `dport`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + payload.len());
    d.extend_from_slice(&sport.to_be_bytes());
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    d
}

/// A TCP SYN from `sport` to `dport` (checksum left 0: for programs that only read ports).
pub fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// An Ethernet frame of exactly `len` bytes (at least 42) carrying IPv4/UDP from `src` to
/// `dst` with a zero-filled payload.
#[allow(clippy::too_many_arguments)]
pub fn udp_frame_of_len(
    len: usize,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let payload = vec![0u8; len.saturating_sub(ETH_HLEN + 20 + 8)];
    let packet = ipv4(src, dst, IPPROTO_UDP, &udp(sport, dport, &payload));
    ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, &packet)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_to_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An ICMPv6 neighbour discovery message: type, code 0, checksum, 4 bytes of flags, the
/// target, and a link-layer address option if given.
fn neighbor_message(kind: u8, target: Ipv6Addr, option: Option<(u8, Mac)>) -> Vec<u8> {
    let mut message = vec![kind, 0, 0, 0, 0, 0, 0, 0];
    message.extend_from_slice(&target.octets());
    if let Some((option_type, mac)) = option {
        message.extend_from_slice(&[option_type, 1]);
        message.extend_from_slice(&mac);
    }
    message
}

pub fn neighbor_solicitation(target: Ipv6Addr, source_ll: Option<Mac>) -> Vec<u8> {
    let option = source_ll.map(|mac| (NDP_OPTION_SOURCE_LL, mac));
    neighbor_message(ICMPV6_NEIGHBOR_SOLICITATION, target, option)
}

pub fn neighbor_advertisement(target: Ipv6Addr, target_ll: Option<Mac>) -> Vec<u8> {
    let option = target_ll.map(|mac| (NDP_OPTION_TARGET_LL, mac));
    neighbor_message(ICMPV6_NEIGHBOR_ADVERTISEMENT, target, option)
}

/// A router advertisement: hop limit, flags, lifetime, reachable and retransmit timers.
pub fn router_advertisement() -> Vec<u8> {
    let mut message = vec![ICMPV6_ROUTER_ADVERTISEMENT, 0, 0, 0, 64, 0, 0x07, 0x08];
    message.extend_from_slice(&[0; 8]);
    message
}

/// The solicited-node multicast MAC of `addr` (RFC 2464 §7: 33:33 + last 4 bytes of the
/// multicast group ff02::1:ffXX:XXXX).
pub fn solicited_node_mac(addr: Ipv6Addr) -> Mac {
    let o = addr.octets();
    [0x33, 0x33, 0xff, o[13], o[14], o[15]]
}

/// ff02::1:ffXX:XXXX for `addr`.
pub fn solicited_node_addr(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    #[test]
    fn arp_request_round_trips_through_the_parser() {
        let f = arp_request(A, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(f.len(), 42);
        assert_eq!(destination_mac(&f), Some(BROADCAST));
        let arp = parse_arp(&f).unwrap();
        assert!(!arp.is_reply);
        assert_eq!(arp.sender_mac, A);
        assert_eq!(arp.target_ip, Ipv4Addr::new(10, 0, 0, 2));
        let r = arp_reply(B, Ipv4Addr::new(10, 0, 0, 2), A, Ipv4Addr::new(10, 0, 0, 1));
        assert!(parse_arp(&r).unwrap().is_reply);
    }

    #[test]
    fn vlan_tag_is_inserted_after_the_macs_and_stripped_back() {
        let f = arp_request(A, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let tagged = with_vlan(&f, 100);
        assert_eq!(tagged.len(), f.len() + 4);
        assert_eq!(ethertype(&tagged), Some(ETHERTYPE_VLAN));
        assert_eq!(strip_vlan(&tagged), (Some(100), f.clone()));
        assert_eq!(strip_vlan(&f), (None, f));
    }

    #[test]
    fn udp_frame_has_the_asked_length_and_a_valid_ip_checksum() {
        let f = udp_frame_of_len(64, A, B, [10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 9, 9);
        assert_eq!(f.len(), 64);
        assert_eq!(internet_checksum(&f[ETH_HLEN..ETH_HLEN + 20]), 0);
        assert_eq!(f[ETH_HLEN + 9], IPPROTO_UDP);
        assert_eq!(mac_to_string(A), "02:00:00:00:00:01");
    }
}
