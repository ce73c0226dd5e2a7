//! The test guest's virtio-net driver and network scenarios against a reference device:
//! QEMU's virtio-net-pci on a TAP in a private network namespace. Every test boots its own
//! guest; the namespace end is 10.0.0.1, the guest 10.0.0.2.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use ferrovirt_tests::ScratchDir;
use ferrovirt_tests::qemu_net::{
    GUEST_IP, GUEST_MAC, GuestExit, HOST_IP, HOST_MAC, NetTopology, QemuNetGuest, QemuNetOptions,
    QemuNetdev, check_pattern_payload, pattern_payload,
};

/// SeaBIOS alone takes about 4.5 s, more while other builds share the CPUs.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
const ECHO_PORT: u16 = 7777;

fn responder(options: QemuNetOptions) -> (NetTopology, QemuNetGuest) {
    let topology =
        NetTopology::create_with_tap(options.queue_pairs > 1).unwrap_or_else(|e| panic!("{e}"));
    let mut guest = QemuNetGuest::start(
        &topology,
        &format!("scenario=net-responder ip={GUEST_IP}"),
        options,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    guest
        .wait_for_line("net-responder listening", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    (topology, guest)
}

fn client_socket(topology: &NetTopology) -> UdpSocket {
    let socket = topology.udp_socket(0).unwrap_or_else(|e| panic!("{e}"));
    socket.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    socket
}

/// Sends `payload` to the responder's echo port and returns what came back and from where.
fn echo(socket: &UdpSocket, payload: &[u8]) -> (Vec<u8>, SocketAddr) {
    socket
        .send_to(payload, SocketAddrV4::new(GUEST_IP, ECHO_PORT))
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, from) = socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no echo of a {}-byte datagram: {e}", payload.len()));
    buf.truncate(n);
    (buf, from)
}

/// Ends the responder with `quit` (which is echoed too) and returns how the guest ended.
fn quit(socket: &UdpSocket, guest: QemuNetGuest) -> GuestExit {
    let (reply, _) = echo(socket, b"quit");
    assert_eq!(reply, b"quit");
    guest.wait_exit(EXIT_TIMEOUT).unwrap()
}

fn assert_line(exit: &GuestExit, line: &str) {
    assert!(
        exit.serial.lines().any(|l| l.trim_end() == line),
        "no line {line:?} in the serial output:\n{}",
        exit.serial
    );
}

fn assert_passed(exit: &GuestExit, scenario: &str) {
    assert!(
        exit.passed(scenario),
        "guest did not PASS {scenario} (debug-exit {:?}):\n{}\nstderr:\n{}",
        exit.debug_exit,
        exit.serial,
        exit.stderr
    );
}

/// Payloads whose bytes differ from one datagram to the next.
fn varied_payload(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) ^ (i >> 8) as u8)
        .collect()
}

#[test]
fn responder_answers_arp_and_three_pings_then_quits_with_pass() {
    let (topology, guest) = responder(QemuNetOptions::default());
    let ping = topology
        .run("ping", &["-c", "3", "-W", "2", &GUEST_IP.to_string()])
        .expect("cannot run ping: apt-get install iputils-ping (scripts/setup.sh)");
    assert!(
        ping.status.success(),
        "ping failed:\n{}\n{}\nserial:\n{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr),
        guest.serial()
    );
    let socket = client_socket(&topology);
    let exit = quit(&socket, guest);
    assert_passed(&exit, "net-responder");
    assert_line(&exit, "testguest: net-responder icmp=3");
    assert_line(&exit, "testguest: net-responder udp=1");
    assert_line(&exit, "testguest: net-responder end=quit replies=5");
    // One ARP request from the namespace resolved the guest for ping and the socket.
    assert_line(&exit, "testguest: net-responder arp=1");
}

#[test]
fn responder_echoes_udp_payloads_unchanged_with_addresses_and_ports_swapped() {
    let (topology, guest) = responder(QemuNetOptions::default());
    let socket = client_socket(&topology);
    let local = socket.local_addr().unwrap();
    assert_eq!(local.ip(), HOST_IP);
    // 1472 bytes is the largest payload of a 1500-byte MTU frame.
    let sizes = [1, 18, 64, 511, 1024, 1472];
    for (i, &len) in sizes.iter().enumerate() {
        let payload = varied_payload(len, i as u8);
        let (reply, from) = echo(&socket, &payload);
        assert_eq!(from, SocketAddr::V4(SocketAddrV4::new(GUEST_IP, ECHO_PORT)));
        assert!(reply == payload, "echo of {len} bytes differs");
    }
    let exit = quit(&socket, guest);
    assert_passed(&exit, "net-responder");
    assert_line(
        &exit,
        &format!("testguest: net-responder udp={}", sizes.len() + 1),
    );
    assert!(
        exit.serial
            .contains(&format!("net device=00:01.0 mac={GUEST_MAC}")),
        "the guest must use the MAC from the device config:\n{}",
        exit.serial
    );
}

#[test]
fn responder_works_without_merged_rx_buffers() {
    let (topology, guest) = responder(QemuNetOptions {
        mrg_rxbuf: false,
        ..QemuNetOptions::default()
    });
    let socket = client_socket(&topology);
    for (i, len) in [1472, 3, 800].into_iter().enumerate() {
        let payload = varied_payload(len, 0x40 + i as u8);
        let (reply, _) = echo(&socket, &payload);
        assert!(reply == payload, "echo of {len} bytes differs");
    }
    let exit = quit(&socket, guest);
    assert_passed(&exit, "net-responder");
    assert!(
        exit.serial.contains(" mrg_rxbuf=0 "),
        "MRG_RXBUF was negotiated though the device did not offer it:\n{}",
        exit.serial
    );
    assert_line(&exit, "testguest: net-responder udp=4");
}

#[test]
fn responder_uses_pair_zero_of_a_multiqueue_device() {
    let (topology, guest) = responder(QemuNetOptions {
        queue_pairs: 2,
        ..QemuNetOptions::default()
    });
    let socket = client_socket(&topology);
    for salt in 0..8 {
        let payload = varied_payload(200 + 100 * usize::from(salt), salt);
        assert!(echo(&socket, &payload).0 == payload);
    }
    let exit = quit(&socket, guest);
    assert_passed(&exit, "net-responder");
    assert!(
        exit.serial.contains(" max_pairs=2 "),
        "the device offered MQ with 2 pairs:\n{}",
        exit.serial
    );
    assert_line(&exit, "testguest: net-responder udp=9");
}

#[test]
fn responder_reassembles_a_frame_merged_from_several_rx_buffers() {
    let (topology, guest) = responder(QemuNetOptions::default());
    // A 3000-byte datagram is one 3042-byte frame on a 4000-byte MTU link: more than one
    // 2048-byte receive buffer, so the device merges (num_buffers = 2). Its UDP checksum
    // only verifies if the guest put the pieces back together; the reply would not fit one
    // transmit buffer, so it is counted as too large.
    topology.set_mtu(4000).unwrap_or_else(|e| panic!("{e}"));
    let socket = client_socket(&topology);
    let small = varied_payload(100, 1);
    assert!(echo(&socket, &small).0 == small);
    socket
        .send_to(
            &varied_payload(3000, 2),
            SocketAddrV4::new(GUEST_IP, ECHO_PORT),
        )
        .unwrap();
    // Frames arrive in order: this echo comes back after the large frame was handled.
    assert!(echo(&socket, &small).0 == small);
    let exit = quit(&socket, guest);
    assert_passed(&exit, "net-responder");
    assert!(
        exit.serial.contains(" too_large=1 ") && exit.serial.contains(" rx_merged=1 "),
        "the 3042-byte frame was not received whole:\n{}",
        exit.serial
    );
    assert_line(&exit, "testguest: net-responder udp=3");
}

#[test]
fn responder_ends_with_pass_after_count_replies() {
    let topology = NetTopology::create().unwrap_or_else(|e| panic!("{e}"));
    // The ARP reply counts: it, then two echoes make three.
    let mut guest = QemuNetGuest::start(
        &topology,
        &format!("scenario=net-responder ip={GUEST_IP} count=3"),
        QemuNetOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    guest
        .wait_for_line("net-responder listening", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let socket = client_socket(&topology);
    for salt in 0..2 {
        let payload = varied_payload(100, salt);
        assert!(echo(&socket, &payload).0 == payload);
    }
    let exit = guest.wait_exit(EXIT_TIMEOUT).unwrap();
    assert_passed(&exit, "net-responder");
    assert_line(&exit, "testguest: net-responder end=count replies=3");
}

#[test]
fn responder_ends_with_pass_after_seconds_without_traffic() {
    let topology = NetTopology::create().unwrap_or_else(|e| panic!("{e}"));
    let guest = QemuNetGuest::start(
        &topology,
        &format!("scenario=net-responder ip={GUEST_IP} seconds=1"),
        QemuNetOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let exit = guest.wait_exit(BOOT_TIMEOUT).unwrap();
    assert_passed(&exit, "net-responder");
    assert!(
        exit.serial.contains("net-responder end=seconds replies="),
        "{}",
        exit.serial
    );
}

#[test]
fn net_send_delivers_every_frame_intact_and_in_order_to_a_netns_socket() {
    const COUNT: u64 = 1000;
    const SIZE: usize = 1000;
    const PORT: u16 = 5001;
    let topology = NetTopology::create().unwrap_or_else(|e| panic!("{e}"));
    let socket = topology.udp_socket(PORT).unwrap_or_else(|e| panic!("{e}"));
    let guest = QemuNetGuest::start(
        &topology,
        &format!(
            "scenario=net-send dst_mac={HOST_MAC} dst_ip={HOST_IP} ip={GUEST_IP} count={COUNT} size={SIZE} port={PORT}"
        ),
        QemuNetOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let exit = guest.wait_exit(BOOT_TIMEOUT).unwrap();
    assert_passed(&exit, "net-send");
    assert!(
        exit.serial.contains(&format!(
            "net-send sent={COUNT} bytes={}",
            COUNT * SIZE as u64
        )),
        "{}",
        exit.serial
    );
    // Every datagram is queued in the socket by now (the guest waited for the device to
    // use them all before it exited).
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let mut seen = Vec::new();
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        assert_eq!(from, SocketAddr::V4(SocketAddrV4::new(GUEST_IP, PORT)));
        assert_eq!(n, SIZE - 42, "UDP payload of a {SIZE}-byte frame");
        let seq = check_pattern_payload(&buf[..n])
            .unwrap_or_else(|| panic!("datagram {} has a corrupt payload", seen.len()));
        seen.push(seq);
    }
    assert_eq!(
        seen,
        (0..COUNT).collect::<Vec<_>>(),
        "lost or reordered frames"
    );
}

#[test]
fn net_recv_passes_on_intact_frames_and_counts_a_corrupt_one_as_bad() {
    const COUNT: u64 = 300;
    const PORT: u16 = 5002;
    let topology = NetTopology::create().unwrap_or_else(|e| panic!("{e}"));
    let mut guest = QemuNetGuest::start(
        &topology,
        &format!("scenario=net-recv ip={GUEST_IP} count={COUNT} port={PORT} seconds=20"),
        QemuNetOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    guest
        .wait_for_line("net-recv listening", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let socket = topology.udp_socket(0).unwrap_or_else(|e| panic!("{e}"));
    let to = SocketAddrV4::new(GUEST_IP, PORT);
    let send = |seq: u64| {
        let len = 8 + (seq as usize * 37) % 1400;
        socket.send_to(&pattern_payload(seq, len), to).unwrap();
    };
    // The kernel holds only a few datagrams while it resolves the guest's MAC: send the
    // first one alone and go on once the guest has answered the ARP request.
    send(0);
    wait_for_guest_neighbor(&topology);
    for seq in 1..COUNT {
        if seq == COUNT / 2 {
            let mut corrupt = pattern_payload(seq, 600);
            corrupt[300] ^= 0x80;
            socket.send_to(&corrupt, to).unwrap();
        }
        send(seq);
        // Small bursts: the namespace's side must not overrun the TAP's queue.
        if seq % 32 == 31 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let exit = guest.wait_exit(EXIT_TIMEOUT).unwrap();
    assert_passed(&exit, "net-recv");
    assert!(exit.serial.contains(" arp=1 "), "{}", exit.serial);
    assert!(
        exit.serial.contains(&format!(
            "net-recv received={} good={COUNT} bad=1 out_of_order=0 lost=0",
            COUNT + 1
        )),
        "{}",
        exit.serial
    );
}

/// Waits until the namespace has resolved the guest's MAC (the guest answered ARP).
fn wait_for_guest_neighbor(topology: &NetTopology) {
    let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
    loop {
        let out = topology
            .run("ip", &["neigh", "show", &GUEST_IP.to_string()])
            .unwrap();
        let neigh = String::from_utf8_lossy(&out.stdout).into_owned();
        if neigh.contains(&format!("lladdr {GUEST_MAC}")) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not answer ARP within {REPLY_TIMEOUT:?}: {neigh}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn net_send_to_net_recv_between_two_guests_wired_back_to_back() {
    const COUNT: u64 = 2000;
    const SENDER_MAC: &str = "52:54:00:12:34:57";
    let dir = ScratchDir::new("net-vm2vm").unwrap();
    let (recv_sock, send_sock) = (dir.join("recv.sock"), dir.join("send.sock"));
    let mut receiver = QemuNetGuest::start(
        QemuNetdev::UnixDgram {
            local: &recv_sock,
            remote: &send_sock,
        },
        &format!("scenario=net-recv ip={GUEST_IP} count={COUNT} port=5001 seconds=30"),
        QemuNetOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    receiver
        .wait_for_line("net-recv listening", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let sender = QemuNetGuest::start(
        QemuNetdev::UnixDgram {
            local: &send_sock,
            remote: &recv_sock,
        },
        &format!(
            "scenario=net-send dst_mac={GUEST_MAC} dst_ip={GUEST_IP} ip=10.0.0.3 count={COUNT} size=1514 port=5001"
        ),
        QemuNetOptions {
            mac: SENDER_MAC,
            ..QemuNetOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let sent = sender.wait_exit(BOOT_TIMEOUT).unwrap();
    assert_passed(&sent, "net-send");
    let received = receiver.wait_exit(EXIT_TIMEOUT).unwrap();
    assert_passed(&received, "net-recv");
    assert!(
        received.serial.contains(&format!(
            "net-recv received={COUNT} good={COUNT} bad=0 out_of_order=0 lost=0"
        )),
        "{}",
        received.serial
    );
}
