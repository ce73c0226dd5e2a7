//! The whole network path, end to end: test guest → ferrovirt-vmm's virtio-net (vhost-user-net
//! frontend) → ferrovirt-vhost-net → a TAP in a private netns, and back. Every test boots its
//! own guest(s) with their own backend(s); the namespace end is 10.0.0.1.

use std::net::{SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferrovirt_tests::names::ip;
use ferrovirt_tests::qemu_net::{GUEST_IP, GUEST_MAC, NetTopology};
use ferrovirt_tests::{
    CleanupGuard, NetNs, ScratchDir, Tap, VhostNetBackend, VmmProcess, testguest,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const ECHO_PORT: u16 = 7777;

fn net_flag(socket: &Path, mac: &str) -> String {
    format!("socket={},mac={mac}", socket.display())
}

/// A test guest running `cmdline` with one interface on `socket`.
fn boot_guest(name: &str, cmdline: &str, socket: &Path, mac: &str) -> VmmProcess {
    let args = [
        "--kernel".to_string(),
        testguest().display().to_string(),
        "--cmdline".into(),
        cmdline.into(),
        "--memory".into(),
        "64".into(),
        "--net".into(),
        net_flag(socket, mac),
    ];
    VmmProcess::spawn(name, &args).unwrap_or_else(|e| panic!("{e}"))
}

fn wait_for_line(vmm: &mut VmmProcess, line: &str) {
    if let Err(e) = vmm.wait_for_output(line, BOOT_TIMEOUT) {
        panic!(
            "{e}\nserial:\n{}\nstderr:\n{}",
            vmm.serial_output(),
            vmm.stderr_output()
        );
    }
}

fn assert_passed(vmm: &mut VmmProcess, scenario: &str) {
    let status = vmm.wait_timeout(EXIT_TIMEOUT).unwrap();
    let (out, err) = (vmm.serial_output(), vmm.stderr_output());
    assert_eq!(status.code(), Some(0), "serial:\n{out}\nstderr:\n{err}");
    assert!(
        out.lines()
            .any(|l| l.trim_end() == format!("testguest: PASS {scenario}")),
        "no PASS line:\n{out}"
    );
}

/// One guest running the responder behind ferrovirt-vhost-net on the topology's TAP.
struct Responder {
    topology: NetTopology,
    backend: Option<VhostNetBackend>,
    vmm: VmmProcess,
    socket: PathBuf,
    _dir: ScratchDir,
}

impl Responder {
    fn start(name: &str) -> Responder {
        let dir = ScratchDir::new(name).unwrap();
        let topology = NetTopology::create().unwrap_or_else(|e| panic!("{e}"));
        let socket = dir.join("net0.sock");
        let backend = start_backend(&socket, &topology);
        let cmdline = format!("scenario=net-responder ip={GUEST_IP}");
        let mut vmm = boot_guest(name, &cmdline, &socket, GUEST_MAC);
        wait_for_line(&mut vmm, "net-responder listening");
        Responder {
            topology,
            backend: Some(backend),
            vmm,
            socket,
            _dir: dir,
        }
    }

    fn client(&self) -> UdpSocket {
        let socket = self
            .topology
            .udp_socket(0)
            .unwrap_or_else(|e| panic!("{e}"));
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket
    }

    fn diagnostics(&self) -> String {
        format!(
            "serial:\n{}\nvmm stderr:\n{}\nbackend stderr:\n{}",
            self.vmm.serial_output(),
            self.vmm.stderr_output(),
            self.backend
                .as_ref()
                .map(|b| b.stderr())
                .unwrap_or_default()
        )
    }
}

fn start_backend(socket: &Path, topology: &NetTopology) -> VhostNetBackend {
    VhostNetBackend::start(socket, &["--tap", topology.tap(), "--netns", topology.ns()])
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Sends `payload` until its echo comes back (other replies are skipped: repeats of earlier
/// datagrams, or a frame the guest had queued when its backend died, which the VMM's replay of
/// the TX ring from the used index may send again: delivery is at least once).
fn echo_eventually(socket: &UdpSocket, payload: &[u8], deadline: Instant) -> bool {
    while Instant::now() < deadline {
        socket
            .send_to(payload, SocketAddrV4::new(GUEST_IP, ECHO_PORT))
            .unwrap();
        let mut buf = vec![0u8; 2048];
        while let Ok((n, _)) = socket.recv_from(&mut buf) {
            if buf[..n] == *payload {
                return true;
            }
        }
    }
    false
}

/// Sends `payload` to the echo port and returns the reply, if one came.
fn try_echo(socket: &UdpSocket, payload: &[u8]) -> Option<Vec<u8>> {
    socket
        .send_to(payload, SocketAddrV4::new(GUEST_IP, ECHO_PORT))
        .ok()?;
    let mut buf = vec![0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn payload(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

#[test]
fn guest_answers_ping_and_udp_echo_through_vhost_net() {
    let mut r = Responder::start("net-echo");
    let ping = r
        .topology
        .run(
            "ping",
            &["-c", "3", "-i", "0.2", "-W", "2", &GUEST_IP.to_string()],
        )
        .unwrap();
    assert!(
        ping.status.success(),
        "ping failed: {}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        r.diagnostics()
    );

    let client = r.client();
    for (i, len) in [1usize, 64, 512, 1472].into_iter().enumerate() {
        let sent = payload(len, i as u8);
        let reply = try_echo(&client, &sent)
            .unwrap_or_else(|| panic!("no echo of {len} bytes\n{}", r.diagnostics()));
        assert_eq!(reply, sent, "echo of {len} bytes differs");
    }
    assert_eq!(try_echo(&client, b"quit").as_deref(), Some(&b"quit"[..]));
    assert_passed(&mut r.vmm, "net-responder");

    let metrics = r.backend.as_ref().unwrap().metrics_json().unwrap();
    let metrics: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    // 3 pings + 5 datagrams each way at least (plus ARP).
    assert!(metrics["tx_packets"].as_u64() >= Some(8), "{metrics}");
    assert!(metrics["rx_packets"].as_u64() >= Some(8), "{metrics}");
}

#[test]
fn echo_resumes_after_the_backend_is_killed_and_restarted() {
    let mut r = Responder::start("net-restart");
    let client = r.client();
    let before = payload(100, 1);
    assert_eq!(
        try_echo(&client, &before),
        Some(before.clone()),
        "{}",
        r.diagnostics()
    );

    r.backend.take().unwrap().crash().unwrap();
    r.backend = Some(start_backend(&r.socket, &r.topology));

    // The VMM re-dials within a second or so; the guest is not reset and keeps its rings.
    // Datagrams sent while the backend is away are retried, so stale echoes may arrive late.
    let deadline = Instant::now() + Duration::from_secs(20);
    for after in [payload(200, 2), b"quit".to_vec()] {
        assert!(
            echo_eventually(&client, &after, deadline),
            "no echo of {} bytes after the restart\n{}",
            after.len(),
            r.diagnostics()
        );
    }
    assert_passed(&mut r.vmm, "net-responder");
    assert!(
        r.vmm
            .serial_output()
            .contains("testguest: PASS net-responder"),
        "the guest ran through the restart without a reset"
    );
}

/// Two TAPs joined by a bridge inside one namespace.
struct Bridged {
    ns: NetNs,
    taps: Vec<Tap>,
    _in_ns: Vec<CleanupGuard>,
}

impl Bridged {
    fn create(count: usize) -> Bridged {
        let ns = NetNs::create("vmvm").unwrap();
        let ns_name = ns.name().to_string();
        ip(&["-n", &ns_name, "link", "add", "br0", "type", "bridge"]).unwrap();
        ip(&["-n", &ns_name, "link", "set", "br0", "up"]).unwrap();
        let mut taps = Vec::new();
        let mut in_ns = Vec::new();
        for _ in 0..count {
            let tap = Tap::create("vmtap", false).unwrap();
            let name = tap.name().to_string();
            ip(&["link", "set", &name, "netns", &ns_name]).unwrap();
            let ns_for_guard = ns_name.clone();
            in_ns.push(CleanupGuard::new(name.clone(), move |tap| {
                let _ = ip(&["-n", &ns_for_guard, "link", "del", tap]);
            }));
            ip(&["-n", &ns_name, "link", "set", &name, "master", "br0"]).unwrap();
            // A TAP holds up to txqueuelen frames for its reader; with room for the whole
            // burst, no frame is dropped while the receiving guest recycles its buffers.
            ip(&["-n", &ns_name, "link", "set", &name, "txqueuelen", "10000"]).unwrap();
            ip(&["-n", &ns_name, "link", "set", &name, "up"]).unwrap();
            taps.push(tap);
        }
        Bridged {
            ns,
            taps,
            _in_ns: in_ns,
        }
    }
}

#[test]
fn two_guests_exchange_frames_through_their_backends() {
    const FRAMES: u32 = 2000;
    let dir = ScratchDir::new("net-vm2vm").unwrap();
    let bridged = Bridged::create(2);
    let (mac_a, mac_b) = ("52:54:00:00:0a:01", "52:54:00:00:0b:01");
    let sockets = [dir.join("a.sock"), dir.join("b.sock")];
    let _backends: Vec<VhostNetBackend> = sockets
        .iter()
        .zip(&bridged.taps)
        .map(|(socket, tap)| {
            VhostNetBackend::start(socket, &["--tap", tap.name(), "--netns", bridged.ns.name()])
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();

    let mut receiver = boot_guest(
        "net-vm-b",
        &format!("scenario=net-recv ip=10.0.0.3 count={FRAMES} seconds=20"),
        &sockets[1],
        mac_b,
    );
    wait_for_line(&mut receiver, "net-recv listening");
    let mut sender = boot_guest(
        "net-vm-a",
        &format!(
            "scenario=net-send ip=10.0.0.2 dst_ip=10.0.0.3 dst_mac={mac_b} \
             count={FRAMES} size=1514"
        ),
        &sockets[0],
        mac_a,
    );
    assert_passed(&mut sender, "net-send");
    assert_passed(&mut receiver, "net-recv");
    let out = receiver.serial_output();
    assert!(
        out.contains(&format!("received={FRAMES}")) && out.contains("bad=0"),
        "{out}"
    );
}
