//! Frames between the harness's virtio-net driver and a real TAP in a per-test network
//! namespace, through the real backend process.

mod common;

use common::*;
use ferrovirt_tests::ScratchDir;
use ferrovirt_tests::vhost_user_frontend::Buffer;
use ferrovirt_vhost_net::DropReason;

fn tag_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes([frame[14], frame[15], frame[16], frame[17]])
}

#[test]
fn tx_frames_come_out_of_the_tap_byte_for_byte_in_one_submit_per_kick() {
    let dir = ScratchDir::new("net-tx").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &[]);
    let mut guest = NetDriver::connect(backend.socket(), 1, default_features(false));

    let frames: Vec<Vec<u8>> = (0..32).map(|i| frame(i, 60 + 43 * i as usize)).collect();
    guest.send(0, &frames);
    let got = wire.receive(frames.len(), TIMEOUT);
    assert_eq!(got, frames, "every frame, in order, unchanged");
    let used = guest.wait_tx(0, 32);
    assert_eq!(used.len(), 32);
    assert!(
        used.iter().all(|u| u.len == 0),
        "TX chains come back with length 0"
    );

    let m = metrics(&backend);
    assert_eq!(m.tx_packets, 32);
    assert_eq!(
        m.tx_bytes,
        frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert!(
        m.tx_submits <= 2,
        "{} submits for one kick of 32 frames",
        m.tx_submits
    );
}

#[test]
fn frames_sent_on_the_tap_arrive_in_rx_chains_with_a_vnet_header() {
    rx_round_trip(default_features(false));
}

#[test]
fn rx_and_tx_work_without_event_idx() {
    let features = default_features(false) & !(1 << F_EVENT_IDX);
    rx_round_trip(features);
}

fn rx_round_trip(features: u64) {
    let dir = ScratchDir::new("net-rx").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &[]);
    let mut guest = NetDriver::connect(backend.socket(), 1, features);
    assert_eq!(
        guest.conn().features() & (1 << F_EVENT_IDX),
        features & (1 << F_EVENT_IDX)
    );
    guest.post_rx(0, 64, 2048);

    let frames: Vec<Vec<u8>> = (0..20)
        .map(|i| frame(100 + i, 60 + 70 * i as usize))
        .collect();
    for f in &frames {
        wire.send(f);
    }
    let got = guest.receive(0, frames.len(), TIMEOUT);
    let ours: Vec<&RxFrame> = got.iter().filter(|r| r.frame.len() >= 18).collect();
    assert_eq!(ours.len(), frames.len());
    for (r, f) in ours.iter().zip(&frames) {
        assert_eq!(&r.frame, f);
        assert_eq!(&r.header[..10], &[0u8; 10], "no offload in the header");
        assert_eq!(r.num_buffers(), 1, "num_buffers is 1 without MRG_RXBUF");
    }
    assert_eq!(metrics(&backend).rx_packets, 20);
    let tx: Vec<Vec<u8>> = (0..3).map(|i| frame(150 + i, 90)).collect();
    guest.send(0, &tx);
    assert_eq!(wire.receive(3, TIMEOUT), tx);
}

#[test]
fn get_vring_base_gives_back_rx_chains_still_waiting_for_a_frame() {
    let dir = ScratchDir::new("net-base").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &[]);
    let mut guest = NetDriver::connect(backend.socket(), 1, default_features(true));
    // Two 256-byte chains cannot hold 12 + 1000 bytes: the backend holds them and waits.
    guest.post_rx(0, 2, 256);
    wire.send(&frame(1, 1000));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(guest.queues[0].used_index(&guest.mem).unwrap(), 0);
    let base = guest.conn.as_mut().unwrap().stop_queue(0).unwrap();
    assert_eq!(
        base, 0,
        "chains the device did not use are not past the base"
    );
}

#[test]
fn with_mrg_rxbuf_a_frame_spans_several_small_chains() {
    let dir = ScratchDir::new("net-mrg").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &[]);
    let mut guest = NetDriver::connect(backend.socket(), 1, default_features(true));
    assert!(guest.conn().has_feature(F_MRG_RXBUF));
    guest.post_rx(0, 64, 256);

    let big = frame(7, 1000);
    let small = frame(8, 100);
    wire.send(&big);
    wire.send(&small);
    let got = guest.receive(0, 2, TIMEOUT);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].frame, big);
    // 12 + 1000 bytes over 256-byte chains.
    assert_eq!(got[0].num_buffers(), 4);
    assert_eq!(got[0].chains, 4);
    assert_eq!(got[1].frame, small);
    assert_eq!(got[1].num_buffers(), 1);
}

#[test]
fn without_rx_buffers_frames_wait_in_the_backend_instead_of_being_dropped() {
    let dir = ScratchDir::new("net-wait").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &[]);
    let mut guest = NetDriver::connect(backend.socket(), 1, default_features(false));

    let frames: Vec<Vec<u8>> = (0..8).map(|i| frame(200 + i, 300)).collect();
    for f in &frames {
        wire.send(f);
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(metrics(&backend).rx_packets, 0);
    guest.post_rx(0, 16, 2048);
    let got = guest.receive(0, frames.len(), TIMEOUT);
    let got: Vec<Vec<u8>> = got.into_iter().map(|r| r.frame).collect();
    assert_eq!(got, frames);
    let m = metrics(&backend);
    assert_eq!(m.rx_dropped.values().sum::<u64>(), 0, "{m:?}");
}

#[test]
fn two_queue_pairs_carry_traffic_both_ways() {
    let dir = ScratchDir::new("net-mq").unwrap();
    let tap = NsTap::create(true);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &["--queue-pairs", "2"]);
    let mut guest = NetDriver::connect(backend.socket(), 2, default_features(true));
    guest.post_rx(0, 128, 2048);
    guest.post_rx(1, 128, 2048);

    let pair0: Vec<Vec<u8>> = (0..10).map(|i| frame(300 + i, 200)).collect();
    let pair1: Vec<Vec<u8>> = (0..10).map(|i| frame(400 + i, 200)).collect();
    guest.send(0, &pair0);
    guest.send(1, &pair1);
    let mut got: Vec<u32> = wire
        .receive(20, TIMEOUT)
        .iter()
        .map(|f| tag_of(f))
        .collect();
    got.sort_unstable();
    let mut want: Vec<u32> = (300..310).chain(400..410).collect();
    want.sort_unstable();
    assert_eq!(got, want, "both TX queues reach the TAP");

    // The TAP spreads flows over its queues by hash: 64 UDP flows land on both.
    let flows: Vec<Vec<u8>> = (0..64)
        .map(|i| udp_frame(500 + i, 10_000 + i as u16))
        .collect();
    for f in &flows {
        wire.send(f);
    }
    let deadline = std::time::Instant::now() + TIMEOUT;
    let (mut on0, mut on1) = (Vec::new(), Vec::new());
    while on0.len() + on1.len() < flows.len() && std::time::Instant::now() < deadline {
        on0.extend(guest.receive(0, 1, std::time::Duration::from_millis(100)));
        on1.extend(guest.receive(1, 1, std::time::Duration::from_millis(100)));
    }
    let udp_tags = |frames: &[RxFrame]| -> Vec<u32> {
        frames
            .iter()
            .filter(|r| r.frame.len() == 80 && r.frame[12..14] == [8, 0])
            .map(|r| u32::from_be_bytes(r.frame[42..46].try_into().unwrap()))
            .collect()
    };
    let (t0, t1) = (udp_tags(&on0), udp_tags(&on1));
    assert_eq!(t0.len() + t1.len(), 64, "every flow arrives once");
    assert!(
        !t0.is_empty() && !t1.is_empty(),
        "flows on both pairs: {} / {}",
        t0.len(),
        t1.len()
    );
}

#[test]
fn hostile_chains_are_counted_and_dropped_while_good_traffic_continues() {
    let dir = ScratchDir::new("net-hostile").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &["--mtu", "1500"]);
    let mut guest = NetDriver::connect(backend.socket(), 1, default_features(false));
    let beyond = guest.mem.size() + 4096;
    let buf = guest.mem.alloc(4096, 8).unwrap().0;
    guest
        .mem
        .write(
            ferrovirt_tests::vhost_user_frontend::GuestAddress(buf),
            &[0u8; 4096],
        )
        .unwrap();

    // TX: too short for the header, outside memory, device-writable, over the MTU.
    guest.add_raw(1, &[(buf, 8, 0)]);
    guest.add_raw(1, &[(buf, 12, 0), (beyond, 100, 0)]);
    guest.add_raw(1, &[(buf, 12, 0), (buf + 64, 100, 2)]);
    let mut long = vec![0u8; 12];
    long.extend(frame(9, 3000));
    let long_at = guest.mem.alloc(long.len() as u64, 8).unwrap();
    guest.mem.write(long_at, &long).unwrap();
    guest.add_raw(1, &[(long_at.0, long.len() as u32, 0)]);
    let good: Vec<Vec<u8>> = (0..5).map(|i| frame(600 + i, 500)).collect();
    guest.send(0, &good);
    assert_eq!(wire.receive(5, TIMEOUT), good, "good frames still flow");
    let used = guest.wait_tx(0, 9);
    assert_eq!(used.len(), 9, "dropped chains are returned too");

    // RX: read-only, too short, outside memory; then good chains.
    guest.add_raw(0, &[(buf, 2048, 0)]);
    guest.add_raw(0, &[(buf, 8, 2)]);
    guest.add_raw(0, &[(beyond, 2048, 2)]);
    guest.post_rx(0, 8, 2048);
    let f = frame(700, 400);
    wire.send(&f);
    let got = guest.receive(0, 1, TIMEOUT);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].frame, f);
    assert_eq!(guest.returned_rx, 3, "refused RX chains come back empty");

    let m = metrics(&backend);
    assert_eq!(m.tx_dropped_for(DropReason::HeaderTooShort), 1, "{m:?}");
    assert_eq!(m.tx_dropped_for(DropReason::OutsideMemory), 1, "{m:?}");
    assert_eq!(m.tx_dropped_for(DropReason::WrongDirection), 1, "{m:?}");
    assert_eq!(m.tx_dropped_for(DropReason::FrameTooLong), 1, "{m:?}");
    assert_eq!(m.tx_packets, 5);
    assert_eq!(m.rx_dropped_for(DropReason::WrongDirection), 1, "{m:?}");
    assert_eq!(m.rx_dropped_for(DropReason::HeaderTooShort), 1, "{m:?}");
    assert_eq!(m.rx_dropped_for(DropReason::OutsideMemory), 1, "{m:?}");
    assert!(
        !backend.stderr().contains("panicked"),
        "{}",
        backend.stderr()
    );
}

#[test]
fn traffic_resumes_after_the_backend_is_killed_and_restarted() {
    let dir = ScratchDir::new("net-restart").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &[]);
    let mut guest = NetDriver::connect(backend.socket(), 1, default_features(true));
    guest.post_rx(0, 32, 2048);
    let before: Vec<Vec<u8>> = (0..4).map(|i| frame(800 + i, 128)).collect();
    guest.send(0, &before);
    assert_eq!(wire.receive(4, TIMEOUT), before);
    guest.wait_tx(0, 4);

    backend.crash().unwrap();
    let backend = start_backend(&dir, &tap, &[]);
    guest.reconnect(backend.socket());

    let after: Vec<Vec<u8>> = (0..4).map(|i| frame(900 + i, 128)).collect();
    guest.send(0, &after);
    assert_eq!(wire.receive(4, TIMEOUT), after);
    let f = frame(950, 200);
    wire.send(&f);
    let got = guest.receive(0, 1, TIMEOUT);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].frame, f);
    assert_eq!(metrics(&backend).connections, 1);
}

#[test]
fn a_vmm_that_reconnects_gets_a_fresh_device_on_the_same_tap() {
    let dir = ScratchDir::new("net-vmm-reconnect").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &[]);
    let mut guest = NetDriver::connect(backend.socket(), 1, default_features(false));
    guest.post_rx(0, 8, 2048);
    guest.send(0, &[frame(1000, 100)]);
    assert_eq!(wire.receive(1, TIMEOUT).len(), 1);
    guest.wait_tx(0, 1);

    guest.reconnect(backend.socket());
    let f = frame(1001, 300);
    wire.send(&f);
    let got = guest.receive(0, 1, TIMEOUT);
    assert_eq!(
        got.len(),
        1,
        "RX chains posted before the reconnect are found again"
    );
    assert_eq!(got[0].frame, f);
    guest.send(0, &[frame(1002, 100)]);
    assert_eq!(wire.receive(1, TIMEOUT), vec![frame(1002, 100)]);
    assert_eq!(metrics(&backend).connections, 2);
}

/// `ethtool -k` of the TAP, inside its namespace.
fn tap_offloads(tap: &NsTap) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", tap.ns.name(), "ethtool", "-k", &tap.name])
        .output()
        .expect("run ethtool (apt-get install ethtool)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tap_offloads_follow_the_features_the_guest_negotiated() {
    const F_GUEST_CSUM: u32 = 1;
    const F_GUEST_TSO4: u32 = 7;
    const F_GUEST_TSO6: u32 = 8;
    let dir = ScratchDir::new("net-offload").unwrap();
    let tap = NsTap::create(false);
    let backend = start_backend(&dir, &tap, &[]);
    let mut guest = NetDriver::connect(backend.socket(), 1, default_features(false));
    let plain = tap_offloads(&tap);
    assert!(plain.contains("tx-tcp-segmentation: off"), "{plain}");
    assert!(plain.contains("tx-checksumming: off"), "{plain}");

    guest.disconnect();
    let offloads = 1 << F_GUEST_CSUM | 1 << F_GUEST_TSO4 | 1 << F_GUEST_TSO6;
    guest.features = default_features(false) | offloads;
    guest.reconnect(backend.socket());
    assert_eq!(guest.conn().features() & offloads, offloads);
    let on = tap_offloads(&tap);
    assert!(on.contains("tx-tcp-segmentation: on"), "{on}");
    assert!(on.contains("tx-checksumming: on"), "{on}");
}

/// An IPv4/TCP frame with `payload` bytes, checksum left to the device.
fn tcp_frame(payload: usize) -> Vec<u8> {
    let mut f = frame(0, 14 + 40 + payload);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip.fill(0);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let tcp = &mut f[34..54];
    tcp.fill(0);
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    f
}

#[test]
fn with_host_tso_a_gso_frame_over_the_mtu_goes_out_and_without_it_is_dropped() {
    const F_CSUM: u32 = 0;
    const F_HOST_TSO4: u32 = 11;
    let dir = ScratchDir::new("net-gso").unwrap();
    let tap = NsTap::create(false);
    let backend = start_backend(&dir, &tap, &[]);
    // virtio 1.2 §5.1.6.2: NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum_start, csum_offset.
    let mut header = [0u8; VNET_HDR];
    header[0] = 1;
    header[1] = 1;
    header[2..4].copy_from_slice(&54u16.to_le_bytes());
    header[4..6].copy_from_slice(&1448u16.to_le_bytes());
    header[6..8].copy_from_slice(&34u16.to_le_bytes());
    header[8..10].copy_from_slice(&16u16.to_le_bytes());
    let big = tcp_frame(4000);

    let mut plain = NetDriver::connect(backend.socket(), 1, default_features(false));
    plain.send_with_header(0, &header, std::slice::from_ref(&big));
    plain.wait_tx(0, 1);
    let m = metrics(&backend);
    assert_eq!(m.tx_dropped_for(DropReason::FrameTooLong), 1, "{m:?}");
    assert_eq!(m.tx_packets, 0);
    drop(plain);

    let tso = default_features(false) | 1 << F_CSUM | 1 << F_HOST_TSO4;
    let mut guest = NetDriver::connect(backend.socket(), 1, tso);
    assert_eq!(guest.conn().features() & tso, tso);
    let wire = tap.socket_for(0x0800);
    guest.send_with_header(0, &header, std::slice::from_ref(&big));
    guest.wait_tx(0, 1);
    let m = metrics(&backend);
    assert_eq!(m.tx_packets, 1, "{m:?}");
    assert_eq!(m.tx_bytes, big.len() as u64);
    let got = wire.receive(1, TIMEOUT);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].len(), big.len(), "the TAP took it as one GSO frame");
    assert_eq!(got[0][54..], big[54..], "payload intact");
}

#[test]
fn tx_frames_in_indirect_descriptor_tables_reach_the_tap() {
    const F_INDIRECT_DESC: u32 = 28;
    let dir = ScratchDir::new("net-indirect").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &[]);
    let features = default_features(false) | 1 << F_INDIRECT_DESC;
    let mut guest = NetDriver::connect(backend.socket(), 1, features);
    assert!(guest.conn().has_feature(F_INDIRECT_DESC));
    let f = frame(1100, 700);
    // Header, then the frame in three pieces, all through one indirect table.
    let hdr = guest.mem.alloc(VNET_HDR as u64, 8).unwrap();
    guest.mem.write(hdr, &[0u8; VNET_HDR]).unwrap();
    let mut buffers = vec![Buffer::readable(hdr, VNET_HDR as u32)];
    for piece in f.chunks(300) {
        let at = guest.mem.alloc(piece.len() as u64, 8).unwrap();
        guest.mem.write(at, piece).unwrap();
        buffers.push(Buffer::readable(at, piece.len() as u32));
    }
    let table = guest.mem.alloc(16 * buffers.len() as u64, 16).unwrap();
    let q = &mut guest.queues[1];
    q.add_indirect_chain(&guest.mem, table, &buffers).unwrap();
    q.publish(&guest.mem).unwrap();
    q.kick().unwrap();
    assert_eq!(wire.receive(1, TIMEOUT), vec![f]);
    guest.wait_tx(0, 1);
}

#[test]
fn tx_chains_are_returned_in_the_order_the_guest_made_them_available() {
    let dir = ScratchDir::new("net-order").unwrap();
    let tap = NsTap::create(false);
    let wire = tap.socket();
    let backend = start_backend(&dir, &tap, &[]);
    let mut guest = NetDriver::connect(backend.socket(), 1, default_features(false));
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(1200 + i, 200)).collect();
    let mut heads = Vec::new();
    for f in &frames {
        let at = guest.mem.alloc((VNET_HDR + f.len()) as u64, 8).unwrap();
        let mut bytes = vec![0u8; VNET_HDR];
        bytes.extend(f);
        guest.mem.write(at, &bytes).unwrap();
        let q = &mut guest.queues[1];
        heads.push(
            q.add_chain(&guest.mem, &[Buffer::readable(at, bytes.len() as u32)])
                .unwrap(),
        );
    }
    // A chain dropped at once, behind five the kernel is still writing.
    let short = guest.mem.alloc(8, 8).unwrap();
    let q = &mut guest.queues[1];
    heads.push(q.add_raw_chain(&guest.mem, &[(short.0, 8, 0)]).unwrap());
    q.publish(&guest.mem).unwrap();
    q.kick().unwrap();
    let used: Vec<u16> = guest.wait_tx(0, 6).iter().map(|u| u.head).collect();
    assert_eq!(used, heads, "used ring in avail order");
    assert_eq!(wire.receive(5, TIMEOUT), frames);
    assert_eq!(
        metrics(&backend).tx_dropped_for(DropReason::HeaderTooShort),
        1
    );
}
