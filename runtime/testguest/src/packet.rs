//! Ethernet frames carrying ARP (RFC 826) and IPv4 (RFC 791) with ICMP echo (RFC 792)
//! and UDP (RFC 768): parsing with every length and checksum checked, and building into
//! a caller's buffer. Just enough for the network scenarios; no options, no fragments.

use core::fmt;

pub type Mac = [u8; 6];
pub type Ipv4 = [u8; 4];

pub const ETH_HEADER: usize = 14;
const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const ICMP_HEADER: usize = 8;
const ARP_BODY: usize = 28;
/// Ethernet + IPv4 + UDP headers in front of a UDP payload.
pub const UDP_OVERHEAD: usize = ETH_HEADER + IPV4_HEADER + UDP_HEADER;
pub const ARP_FRAME: usize = ETH_HEADER + ARP_BODY;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const IP_FLAG_DF: u16 = 0x4000;
const IP_MF_AND_OFFSET: u16 = 0x3fff;
const TTL: u8 = 64;

/// What a received frame is, for the scenarios.
#[derive(Debug, Clone, Copy)]
pub enum Frame<'a> {
    ArpRequest {
        sender_mac: Mac,
        sender_ip: Ipv4,
        target_ip: Ipv4,
    },
    /// An ICMP echo request; `icmp` is the whole ICMP message (header and data).
    EchoRequest {
        src_mac: Mac,
        src_ip: Ipv4,
        dst_ip: Ipv4,
        icmp: &'a [u8],
    },
    Udp {
        src_mac: Mac,
        src_ip: Ipv4,
        dst_ip: Ipv4,
        src_port: u16,
        dst_port: u16,
        payload: &'a [u8],
    },
    /// Anything else, and why it is not one of the above.
    Other(&'static str),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn mac_at(b: &[u8], at: usize) -> Mac {
    let mut m = [0; 6];
    m.copy_from_slice(&b[at..at + 6]);
    m
}

fn ip_at(b: &[u8], at: usize) -> Ipv4 {
    let mut ip = [0; 4];
    ip.copy_from_slice(&b[at..at + 4]);
    ip
}

/// The 32-bit ones'-complement accumulation of `data` as big-endian 16-bit words (an odd
/// last byte is padded with zero), added to `sum`.
fn sum_words(data: &[u8], mut sum: u32) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    // Fold now and then so long data cannot overflow the 32 bits.
    (sum & 0xffff) + (sum >> 16)
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data, 0))
}

/// The ones'-complement sum of the IPv4 pseudo-header and `udp` (header and payload).
fn udp_sum(src: Ipv4, dst: Ipv4, udp: &[u8]) -> u16 {
    let mut sum = sum_words(&src, 0);
    sum = sum_words(&dst, sum);
    sum += u32::from(PROTO_UDP) + udp.len() as u32;
    fold(sum_words(udp, sum))
}

/// The UDP checksum for `udp` with its checksum field zero; an all-zero result is sent
/// as 0xffff (RFC 768: zero means "no checksum").
fn udp_checksum(src: Ipv4, dst: Ipv4, udp: &[u8]) -> u16 {
    let c = !udp_sum(src, dst, udp);
    if c == 0 { 0xffff } else { c }
}

/// Classifies `frame` (Ethernet, no FCS). Trailing padding after the IPv4 total length
/// is ignored; IPv4 header, ICMP and (non-zero) UDP checksums must be right.
pub fn parse(frame: &[u8]) -> Frame<'_> {
    if frame.len() < ETH_HEADER {
        return Frame::Other("runt");
    }
    let src_mac = mac_at(frame, 6);
    match be16(frame, 12) {
        ETHERTYPE_ARP => parse_arp(&frame[ETH_HEADER..]),
        ETHERTYPE_IPV4 => parse_ipv4(src_mac, &frame[ETH_HEADER..]),
        _ => Frame::Other("ethertype"),
    }
}

fn parse_arp(a: &[u8]) -> Frame<'_> {
    if a.len() < ARP_BODY
        || be16(a, 0) != ARP_HTYPE_ETHERNET
        || be16(a, 2) != ETHERTYPE_IPV4
        || a[4] != 6
        || a[5] != 4
    {
        return Frame::Other("arp format");
    }
    if be16(a, 6) != ARP_REQUEST {
        return Frame::Other("arp not a request");
    }
    Frame::ArpRequest {
        sender_mac: mac_at(a, 8),
        sender_ip: ip_at(a, 14),
        target_ip: ip_at(a, 24),
    }
}

fn parse_ipv4(src_mac: Mac, p: &[u8]) -> Frame<'_> {
    if p.len() < IPV4_HEADER || p[0] >> 4 != 4 {
        return Frame::Other("not ipv4");
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(be16(p, 2));
    if ihl < IPV4_HEADER || total < ihl || total > p.len() {
        return Frame::Other("ipv4 length");
    }
    if checksum(&p[..ihl]) != 0 {
        return Frame::Other("ipv4 checksum");
    }
    if be16(p, 6) & IP_MF_AND_OFFSET != 0 {
        return Frame::Other("ipv4 fragment");
    }
    let src_ip = ip_at(p, 12);
    let dst_ip = ip_at(p, 16);
    let body = &p[ihl..total];
    match p[9] {
        PROTO_ICMP => {
            if body.len() < ICMP_HEADER || checksum(body) != 0 {
                return Frame::Other("icmp length or checksum");
            }
            if body[0] != ICMP_ECHO_REQUEST || body[1] != 0 {
                return Frame::Other("icmp not an echo request");
            }
            Frame::EchoRequest {
                src_mac,
                src_ip,
                dst_ip,
                icmp: body,
            }
        }
        PROTO_UDP => {
            if body.len() < UDP_HEADER {
                return Frame::Other("udp length");
            }
            let len = usize::from(be16(body, 4));
            if len < UDP_HEADER || len > body.len() {
                return Frame::Other("udp length");
            }
            let udp = &body[..len];
            // With a correct checksum in place the sum is all ones (0 = no checksum).
            if be16(udp, 6) != 0 && udp_sum(src_ip, dst_ip, udp) != 0xffff {
                return Frame::Other("udp checksum");
            }
            Frame::Udp {
                src_mac,
                src_ip,
                dst_ip,
                src_port: be16(udp, 0),
                dst_port: be16(udp, 2),
                payload: &udp[UDP_HEADER..],
            }
        }
        _ => Frame::Other("ip protocol"),
    }
}

fn write_eth(b: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    b[0..6].copy_from_slice(&dst);
    b[6..12].copy_from_slice(&src);
    put16(b, 12, ethertype);
}

/// Writes an IPv4 header (DF, TTL 64, no options) for `payload_len` bytes of `proto`.
fn write_ipv4(b: &mut [u8], src: Ipv4, dst: Ipv4, proto: u8, payload_len: usize, id: u16) {
    b[0] = 0x45;
    b[1] = 0;
    put16(b, 2, (IPV4_HEADER + payload_len) as u16);
    put16(b, 4, id);
    put16(b, 6, IP_FLAG_DF);
    b[8] = TTL;
    b[9] = proto;
    put16(b, 10, 0);
    b[12..16].copy_from_slice(&src);
    b[16..20].copy_from_slice(&dst);
    let c = checksum(&b[..IPV4_HEADER]);
    put16(b, 10, c);
}

/// An ARP reply from `(mac, ip)` to `(to_mac, to_ip)`; `b` must hold `ARP_FRAME` bytes.
pub fn write_arp_reply(b: &mut [u8], mac: Mac, ip: Ipv4, to_mac: Mac, to_ip: Ipv4) -> usize {
    write_eth(b, to_mac, mac, ETHERTYPE_ARP);
    let a = &mut b[ETH_HEADER..ARP_FRAME];
    put16(a, 0, ARP_HTYPE_ETHERNET);
    put16(a, 2, ETHERTYPE_IPV4);
    a[4] = 6;
    a[5] = 4;
    put16(a, 6, ARP_REPLY);
    a[8..14].copy_from_slice(&mac);
    a[14..18].copy_from_slice(&ip);
    a[18..24].copy_from_slice(&to_mac);
    a[24..28].copy_from_slice(&to_ip);
    ARP_FRAME
}

/// Frame length of an echo reply to the ICMP message `request`.
pub fn echo_reply_len(request: &[u8]) -> usize {
    ETH_HEADER + IPV4_HEADER + request.len()
}

/// The echo reply to the ICMP echo request `request` (same identifier, sequence and
/// data); `b` must hold `echo_reply_len(request)` bytes.
#[allow(clippy::too_many_arguments)]
pub fn write_echo_reply(
    b: &mut [u8],
    mac: Mac,
    ip: Ipv4,
    to_mac: Mac,
    to_ip: Ipv4,
    request: &[u8],
    id: u16,
) -> usize {
    let len = echo_reply_len(request);
    write_eth(b, to_mac, mac, ETHERTYPE_IPV4);
    write_ipv4(
        &mut b[ETH_HEADER..],
        ip,
        to_ip,
        PROTO_ICMP,
        request.len(),
        id,
    );
    let icmp = &mut b[ETH_HEADER + IPV4_HEADER..len];
    icmp.copy_from_slice(request);
    icmp[0] = ICMP_ECHO_REPLY;
    icmp[1] = 0;
    put16(icmp, 2, 0);
    let c = checksum(icmp);
    put16(icmp, 2, c);
    len
}

/// Both ends of a UDP datagram.
#[derive(Debug, Clone, Copy)]
pub struct UdpEnds {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src_ip: Ipv4,
    pub dst_ip: Ipv4,
    pub src_port: u16,
    pub dst_port: u16,
}

/// A UDP datagram with a `payload_len`-byte payload that `fill` writes; `b` must hold
/// `UDP_OVERHEAD + payload_len` bytes. Returns the frame length.
pub fn write_udp(
    b: &mut [u8],
    ends: &UdpEnds,
    payload_len: usize,
    id: u16,
    fill: impl FnOnce(&mut [u8]),
) -> usize {
    let len = UDP_OVERHEAD + payload_len;
    write_eth(b, ends.dst_mac, ends.src_mac, ETHERTYPE_IPV4);
    let udp_len = UDP_HEADER + payload_len;
    write_ipv4(
        &mut b[ETH_HEADER..],
        ends.src_ip,
        ends.dst_ip,
        PROTO_UDP,
        udp_len,
        id,
    );
    let udp = &mut b[ETH_HEADER + IPV4_HEADER..len];
    put16(udp, 0, ends.src_port);
    put16(udp, 2, ends.dst_port);
    put16(udp, 4, udp_len as u16);
    put16(udp, 6, 0);
    fill(&mut udp[UDP_HEADER..]);
    let c = udp_checksum(ends.src_ip, ends.dst_ip, udp);
    put16(udp, 6, c);
    len
}

/// Displays a MAC as `aa:bb:cc:dd:ee:ff`.
pub struct MacDisplay(pub Mac);

impl fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Displays an IPv4 address as `a.b.c.d`.
pub struct IpDisplay(pub Ipv4);

impl fmt::Display for IpDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0;
        write!(f, "{}.{}.{}.{}", a[0], a[1], a[2], a[3])
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex, case-insensitive).
pub fn parse_mac(s: &[u8]) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(|&b| b == b':');
    for byte in &mut mac {
        let part = core::str::from_utf8(parts.next()?).ok()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parses a dotted-quad IPv4 address.
pub fn parse_ip(s: &[u8]) -> Option<Ipv4> {
    let mut ip = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for byte in &mut ip {
        let part = core::str::from_utf8(parts.next()?).ok()?;
        if part.is_empty() || part.len() > 3 {
            return None;
        }
        *byte = part.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}
