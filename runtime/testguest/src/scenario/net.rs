//! `net-responder`, `net-send`, `net-recv`: drive the first virtio-net device (1af4:1041)
//! with the polling driver in `virtio::net`.
//!
//! * `net-responder ip=A [count=N] [seconds=S]` answers ARP requests for A, ICMP echo
//!   requests and UDP datagrams to any port (echoed back with addresses and ports swapped).
//!   It ends after N replies, after S seconds, or on a UDP payload of exactly `quit`.
//! * `net-send dst_mac=M dst_ip=A ip=A count=N size=S [port=P] [batch=B] [wait_ms=W]` sends
//!   N UDP frames of S bytes with the pattern payload, one notification per batch.
//! * `net-recv ip=A count=N [port=P] [seconds=S]` receives and verifies them.
//!
//! Pattern payload of frame `seq` (0, 1, ...): bytes 0..8 are `seq` little-endian, byte
//! `i` >= 8 is `pattern_byte(seq, i)`. README.md gives the formula for host-side checks.

use super::{ScenarioError, check_failed, param};
use crate::console::Ascii;
use crate::dma::Scratch;
use crate::packet::{
    self, Frame, IpDisplay, Ipv4, Mac, MacDisplay, UDP_OVERHEAD, UdpEnds, parse_ip, parse_mac,
};
use crate::pci::{self, MmioAllocator};
use crate::say;
use crate::start_info::{self, StartInfo};
use crate::tsc::{self, Deadline};
use crate::virtio::net::{
    F_MRG_RXBUF, MAX_FRAME, NetDevice, NetError, Received, SCRATCH_BYTES, TX_TIMEOUT_US,
};
use crate::virtio::{VIRTIO_ID_NET, VIRTIO_PCI_VENDOR, modern_pci_device_id};

/// The MAC used when the device does not offer VIRTIO_NET_F_MAC (locally administered).
const FALLBACK_MAC: Mac = [0x02, 0xfe, 0x00, 0x00, 0x00, 0x02];
const DEFAULT_PORT: u64 = 5001;
const DEFAULT_BATCH: u64 = 64;
const DEFAULT_RECV_SECONDS: u64 = 60;
/// The smallest `net-send` frame: headers plus the 8-byte sequence number.
const MIN_SEND_SIZE: usize = UDP_OVERHEAD + 8;
/// The largest: a standard 1500-byte MTU frame.
const MAX_SEND_SIZE: usize = 1514;
const QUIT: &[u8] = b"quit";
/// Frames up to this size are received (merged from several buffers with MRG_RXBUF):
/// a 9000-byte MTU plus the Ethernet header and a VLAN tag. Replies must fit one transmit
/// buffer (`MAX_FRAME`); larger requests are received, checked and ignored.
const RX_FRAME_MAX: usize = 9018;

impl From<NetError> for ScenarioError {
    fn from(e: NetError) -> Self {
        Self::Net(e)
    }
}

/// Byte `i` (>= 8) of the payload of frame `seq`.
pub fn pattern_byte(seq: u64, i: usize) -> u8 {
    (seq.wrapping_mul(7) as usize)
        .wrapping_add(i.wrapping_mul(13))
        .wrapping_add(i >> 8) as u8
}

fn fill_pattern(payload: &mut [u8], seq: u64) {
    payload[..8].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in payload.iter_mut().enumerate().skip(8) {
        *b = pattern_byte(seq, i);
    }
}

/// The sequence number of a pattern payload, if every byte matches the pattern.
fn check_pattern(payload: &[u8]) -> Option<u64> {
    let seq = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    payload
        .iter()
        .enumerate()
        .skip(8)
        .all(|(i, &b)| b == pattern_byte(seq, i))
        .then_some(seq)
}

fn ip_param(cmdline: &[u8], key: &str) -> Result<Ipv4, ScenarioError> {
    let value = start_info::cmdline_param(cmdline, key)
        .ok_or_else(|| check_failed!("{key}=A.B.C.D is required"))?;
    parse_ip(value).ok_or_else(|| check_failed!("{key}={} is not an IPv4 address", Ascii(value)))
}

fn mac_param(cmdline: &[u8], key: &str) -> Result<Mac, ScenarioError> {
    let value = start_info::cmdline_param(cmdline, key)
        .ok_or_else(|| check_failed!("{key}=aa:bb:cc:dd:ee:ff is required"))?;
    parse_mac(value).ok_or_else(|| check_failed!("{key}={} is not a MAC address", Ascii(value)))
}

fn port_param(cmdline: &[u8], key: &str, default: u64) -> Result<u16, ScenarioError> {
    let port = param(cmdline, key, default)?;
    u16::try_from(port).map_err(|_| check_failed!("{key}={port} is not a UDP port"))
}

/// Finds and opens the first virtio-net device and prints its description line.
fn open(info: &StartInfo) -> Result<NetDevice, ScenarioError> {
    let mut scratch = Scratch::claim(info).ok_or_else(|| {
        check_failed!(
            "no RAM above the image for virtio-net buffers (memory map missing, too small, or a boot module in the way)"
        )
    })?;
    let devices = pci::enumerate_bus0();
    let device_id = modern_pci_device_id(VIRTIO_ID_NET);
    let pci_dev = devices.find(VIRTIO_PCI_VENDOR, device_id).ok_or_else(|| {
        check_failed!(
            "no virtio-net ({VIRTIO_PCI_VENDOR:04x}:{device_id:04x}) on bus 0; give the VM one (QEMU: -device virtio-net-pci,disable-legacy=on)"
        )
    })?;
    if scratch.available() < SCRATCH_BYTES {
        return Err(check_failed!(
            "virtio-net needs {SCRATCH_BYTES} bytes of RAM above the image, {} are free; give the VM more memory",
            scratch.available()
        ));
    }
    let mut alloc = MmioAllocator::avoiding(&devices);
    let dev = NetDevice::open(pci_dev, &mut alloc, &mut scratch, FALLBACK_MAC)?;
    let link = match dev.link_up() {
        Some(true) => "up",
        Some(false) => "down",
        None => "-",
    };
    say!(
        "net device={} mac={} features={:#x} offered={:#x} mrg_rxbuf={} queue_size={} max_pairs={} link={}",
        dev.device().address,
        MacDisplay(dev.mac),
        dev.features,
        dev.offered,
        u8::from(dev.has(F_MRG_RXBUF)),
        dev.queue_size,
        dev.max_pairs,
        link
    );
    Ok(dev)
}

/// Driver counters, printed at the end of every scenario.
fn say_stats(name: &str, dev: &NetDevice) {
    say!(
        "{name} stats rx_frames={} rx_merged={} rx_notifies={} tx_frames={} tx_notifies={}",
        dev.rx.frames,
        dev.rx.merged,
        dev.rx.notifies,
        dev.tx.frames,
        dev.tx.notifies
    );
}

#[derive(Default)]
struct Counts {
    arp: u64,
    icmp: u64,
    udp: u64,
    ignored: u64,
    /// Requests to us whose reply would not fit one transmit buffer (counted in `ignored`).
    too_large: u64,
    /// Why the last ignored frame was ignored.
    last_ignored: &'static str,
}

impl Counts {
    fn ignore(&mut self, why: &'static str) {
        self.ignored += 1;
        self.last_ignored = why;
    }

    fn replies(&self) -> u64 {
        self.arp + self.icmp + self.udp
    }
}

/// Answers an ARP request for `ip`; false if it was for another address.
fn answer_arp(dev: &mut NetDevice, ip: Ipv4, frame: &Frame<'_>) -> Result<bool, ScenarioError> {
    let Frame::ArpRequest {
        sender_mac,
        sender_ip,
        target_ip,
    } = *frame
    else {
        return Ok(false);
    };
    if target_ip != ip {
        return Ok(false);
    }
    let mac = dev.mac;
    dev.tx.send(packet::ARP_FRAME, |b| {
        packet::write_arp_reply(b, mac, ip, sender_mac, sender_ip);
    })?;
    Ok(true)
}

pub fn run_responder(info: &StartInfo) -> Result<(), ScenarioError> {
    let c = info.cmdline();
    let ip = ip_param(c, "ip")?;
    let count = param(c, "count", 0)?;
    let seconds = param(c, "seconds", 0)?;
    let mut dev = open(info)?;
    let deadline = (seconds > 0).then(|| Deadline::after_us(seconds.saturating_mul(1_000_000)));
    say!(
        "net-responder listening ip={} count={count} seconds={seconds}",
        IpDisplay(ip)
    );
    let mut counts = Counts::default();
    let mut ip_id: u16 = 0;
    let mut frame = [0u8; RX_FRAME_MAX];
    let end = 'run: loop {
        while let Some(received) = dev.rx.receive(&mut frame)? {
            let Received::Frame(len) = received else {
                counts.ignore("oversized");
                continue;
            };
            let parsed = packet::parse(&frame[..len]);
            match parsed {
                Frame::ArpRequest { .. } => {
                    if answer_arp(&mut dev, ip, &parsed)? {
                        counts.arp += 1;
                    } else {
                        counts.ignore("arp for another address");
                    }
                }
                Frame::EchoRequest { dst_ip, icmp, .. }
                    if dst_ip == ip && packet::echo_reply_len(icmp) > MAX_FRAME =>
                {
                    counts.ignore("too large to echo");
                    counts.too_large += 1;
                }
                Frame::Udp {
                    dst_ip, payload, ..
                } if dst_ip == ip && UDP_OVERHEAD + payload.len() > MAX_FRAME => {
                    counts.ignore("too large to echo");
                    counts.too_large += 1;
                }
                Frame::EchoRequest {
                    src_mac,
                    src_ip,
                    dst_ip,
                    icmp,
                } if dst_ip == ip => {
                    ip_id = ip_id.wrapping_add(1);
                    let mac = dev.mac;
                    dev.tx.send(packet::echo_reply_len(icmp), |b| {
                        packet::write_echo_reply(b, mac, ip, src_mac, src_ip, icmp, ip_id);
                    })?;
                    counts.icmp += 1;
                }
                Frame::Udp {
                    src_mac,
                    src_ip,
                    dst_ip,
                    src_port,
                    dst_port,
                    payload,
                } if dst_ip == ip => {
                    ip_id = ip_id.wrapping_add(1);
                    let ends = UdpEnds {
                        src_mac: dev.mac,
                        dst_mac: src_mac,
                        src_ip: ip,
                        dst_ip: src_ip,
                        src_port: dst_port,
                        dst_port: src_port,
                    };
                    dev.tx.send(UDP_OVERHEAD + payload.len(), |b| {
                        packet::write_udp(b, &ends, payload.len(), ip_id, |p| {
                            p.copy_from_slice(payload)
                        });
                    })?;
                    counts.udp += 1;
                    if payload == QUIT {
                        break 'run "quit";
                    }
                }
                Frame::Other(why) => counts.ignore(why),
                _ => counts.ignore("not to our address"),
            }
            if count > 0 && counts.replies() >= count {
                break 'run "count";
            }
        }
        dev.rx.kick();
        dev.tx.flush();
        if deadline.is_some_and(|d| d.passed()) {
            break "seconds";
        }
        core::hint::spin_loop();
    };
    // The last replies (the `quit` echo) must leave before the VM ends.
    dev.tx.wait_idle(TX_TIMEOUT_US)?;
    say!("net-responder arp={}", counts.arp);
    say!("net-responder icmp={}", counts.icmp);
    say!("net-responder udp={}", counts.udp);
    say!(
        "net-responder ignored={} too_large={} last_ignored=\"{}\"",
        counts.ignored,
        counts.too_large,
        counts.last_ignored
    );
    say!("net-responder end={end} replies={}", counts.replies());
    say_stats("net-responder", &dev);
    dev.reset()?;
    Ok(())
}

pub fn run_send(info: &StartInfo) -> Result<(), ScenarioError> {
    let c = info.cmdline();
    let dst_mac = mac_param(c, "dst_mac")?;
    let dst_ip = ip_param(c, "dst_ip")?;
    let ip = ip_param(c, "ip")?;
    let count = param(c, "count", 0)?;
    let size = param(c, "size", 0)? as usize;
    let port = port_param(c, "port", DEFAULT_PORT)?;
    let batch = param(c, "batch", DEFAULT_BATCH)?;
    let wait_ms = param(c, "wait_ms", 0)?;
    if !(MIN_SEND_SIZE..=MAX_SEND_SIZE).contains(&size) || count == 0 || batch == 0 {
        return Err(check_failed!(
            "need count >= 1, batch >= 1 and {MIN_SEND_SIZE} <= size <= {MAX_SEND_SIZE} (size={size} count={count} batch={batch})"
        ));
    }
    let mut dev = open(info)?;
    let ends = UdpEnds {
        src_mac: dev.mac,
        dst_mac,
        src_ip: ip,
        dst_ip,
        src_port: port,
        dst_port: port,
    };
    let payload_len = size - UDP_OVERHEAD;
    say!(
        "net-send to={} mac={} port={port} count={count} size={size} batch={batch}",
        IpDisplay(dst_ip),
        MacDisplay(dst_mac)
    );
    tsc::delay_us(wait_ms.saturating_mul(1000));
    let start = tsc::now();
    let mut seq = 0;
    while seq < count {
        let end = count.min(seq + batch);
        while seq < end {
            dev.tx.send(size, |b| {
                packet::write_udp(b, &ends, payload_len, seq as u16, |p| fill_pattern(p, seq));
            })?;
            seq += 1;
        }
        dev.tx.flush();
    }
    dev.tx.wait_idle(TX_TIMEOUT_US)?;
    let ticks = tsc::now().wrapping_sub(start);
    say!(
        "net-send sent={count} bytes={} tsc_ticks={ticks} us={}",
        count * size as u64,
        ticks / tsc::ticks_per_us()
    );
    say_stats("net-send", &dev);
    dev.reset()?;
    Ok(())
}

#[derive(Default)]
struct RecvCounts {
    received: u64,
    good: u64,
    bad: u64,
    out_of_order: u64,
    arp: u64,
    ignored: u64,
}

pub fn run_recv(info: &StartInfo) -> Result<(), ScenarioError> {
    let c = info.cmdline();
    let ip = ip_param(c, "ip")?;
    let count = param(c, "count", 0)?;
    let port = port_param(c, "port", 0)?;
    let seconds = param(c, "seconds", DEFAULT_RECV_SECONDS)?;
    if count == 0 {
        return Err(check_failed!("count=N (N >= 1) is required"));
    }
    let mut dev = open(info)?;
    say!(
        "net-recv listening ip={} port={port} count={count} seconds={seconds}",
        IpDisplay(ip)
    );
    let deadline = Deadline::after_us(seconds.saturating_mul(1_000_000));
    let mut n = RecvCounts::default();
    let mut next_seq = 0u64;
    let mut first_tsc = None;
    let mut last_tsc = 0;
    let mut frame = [0u8; RX_FRAME_MAX];
    'run: while n.good < count {
        while let Some(received) = dev.rx.receive(&mut frame)? {
            let Received::Frame(len) = received else {
                n.ignored += 1;
                continue;
            };
            let parsed = packet::parse(&frame[..len]);
            match parsed {
                Frame::ArpRequest { .. } => {
                    if answer_arp(&mut dev, ip, &parsed)? {
                        n.arp += 1;
                    } else {
                        n.ignored += 1;
                    }
                }
                Frame::Udp {
                    dst_ip,
                    dst_port,
                    payload,
                    ..
                } if dst_ip == ip && (port == 0 || dst_port == port) => {
                    n.received += 1;
                    last_tsc = tsc::now();
                    first_tsc.get_or_insert(last_tsc);
                    match check_pattern(payload) {
                        None => n.bad += 1,
                        Some(seq) if seq < next_seq => n.out_of_order += 1,
                        Some(seq) => {
                            n.good += 1;
                            next_seq = seq + 1;
                        }
                    }
                    if n.good >= count {
                        break 'run;
                    }
                }
                _ => n.ignored += 1,
            }
        }
        dev.rx.kick();
        dev.tx.flush();
        if deadline.passed() {
            break;
        }
        core::hint::spin_loop();
    }
    let _ = dev.tx.wait_idle(TX_TIMEOUT_US);
    let ticks = first_tsc.map_or(0, |f| last_tsc.wrapping_sub(f));
    say!(
        "net-recv received={} good={} bad={} out_of_order={} lost={} arp={} ignored={}",
        n.received,
        n.good,
        n.bad,
        n.out_of_order,
        next_seq - n.good,
        n.arp,
        n.ignored
    );
    say!(
        "net-recv tsc_ticks={ticks} us={}",
        ticks / tsc::ticks_per_us()
    );
    say_stats("net-recv", &dev);
    dev.reset()?;
    if n.good < count {
        return Err(check_failed!(
            "{} good frame(s) of {count} ({} bad, {} out of order) within {seconds} s",
            n.good,
            n.bad,
            n.out_of_order
        ));
    }
    Ok(())
}
