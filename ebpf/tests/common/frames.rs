//! Frame builders for BPF_PROG_TEST_RUN: Ethernet, 802.1Q, IPv4, IPv6, TCP, UDP, ARP and
//! the ICMPv6 messages of neighbour discovery. Only what the datapath reads is filled in
//! (checksums are left zero: the programs do not verify them).

use std::net::{Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const ETH_HLEN: usize = 14;
const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
const ICMPV6_NEIGHBOR_SOLICITATION: u8 = 135;
const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
const NDP_OPTION_SOURCE_LL: u8 = 1;
const NDP_OPTION_TARGET_LL: u8 = 2;

pub fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HLEN + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// `frame` with an 802.1Q tag (priority 0) for `vid` inserted after the MAC addresses.
pub fn vlan_tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    tagged.extend_from_slice(&vid.to_be_bytes());
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total_len = u16::try_from(20 + payload.len()).expect("small test packet");
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&total_len.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0, 0, 64, protocol, 0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(payload);
    packet
}

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

/// A TCP SYN header without options.
pub fn tcp(src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut segment = Vec::with_capacity(20);
    segment.extend_from_slice(&src_port.to_be_bytes());
    segment.extend_from_slice(&dst_port.to_be_bytes());
    segment.extend_from_slice(&[0; 8]); // sequence and acknowledgement numbers
    segment.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    segment
}

pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("small test datagram");
    let mut datagram = Vec::with_capacity(usize::from(len));
    datagram.extend_from_slice(&src_port.to_be_bytes());
    datagram.extend_from_slice(&dst_port.to_be_bytes());
    datagram.extend_from_slice(&len.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    datagram
}

/// An Ethernet/IPv4 ARP message; `oper` 1 is a request, 2 a reply.
pub fn arp(oper: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut message = vec![0, 1, 0x08, 0x00, 6, 4];
    message.extend_from_slice(&oper.to_be_bytes());
    message.extend_from_slice(&sha);
    message.extend_from_slice(&spa.octets());
    message.extend_from_slice(&tha);
    message.extend_from_slice(&tpa.octets());
    message
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
