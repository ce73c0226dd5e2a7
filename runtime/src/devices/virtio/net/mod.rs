//! virtio-net (device ID 1) served by a vhost-user-net backend (vhost-user spec; virtio 1.2
//! §5.1), as QEMU and Cloud Hypervisor do it: the VMM owns the configuration space (MAC,
//! link status, queue pairs, MTU) and answers the control queue itself; the backend gets
//! the data queues only (rx0, tx0, rx1, tx1, ...), shares guest memory and moves frames
//! through the rings with the queues' ioeventfds and irqfds. Frames never pass through the
//! VMM. Feature bits: what the backend offers of the data-path set, plus MAC, STATUS,
//! CTRL_VQ, MQ and MTU from the VMM. If the backend dies, the link goes down (status, with
//! a configuration change interrupt) while the shared vhost-user monitor reconnects and
//! restores the rings; then it comes back up.

mod control;
mod device;
mod metrics;

pub use device::{NetParams, VhostUserNet};
pub use metrics::NetMetrics;

use std::path::PathBuf;

use crate::devices::virtio::vhost_user::VhostUserError;

/// Entries per queue: QEMU's virtio-net default.
pub const QUEUE_SIZE: u16 = 256;
/// Pairs per device: 2 × pairs + the control queue fit the transport's queue limit.
pub const MAX_QUEUE_PAIRS: u16 = ((crate::devices::virtio::pci::MAX_QUEUES - 1) / 2) as u16;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    #[error("{0} queue pairs asked for; a virtio-net device here has 1..={MAX_QUEUE_PAIRS}")]
    QueuePairs(u16),
    #[error("the vhost-user-net backend at {} hung up during set-up; is it crashing?", .0.display())]
    Gone(PathBuf),
    #[error("cannot start the virtio-net control queue thread")]
    ControlWorker(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};

    use ferrovirt_tests::{NetNs, PacketSocket, ScratchDir, Testpmd};
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX,
        VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_ERR, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MQ, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::vhost_user::VhostUserMetrics;
    use crate::devices::virtio::{TYPE_NET, VirtioDevice};
    use crate::memory::GuestRam;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xfe, 0x01, 0x02];
    /// Queue rings: queue i at RINGS + i * 16 KiB.
    const RINGS: u64 = 0x10_0000;
    /// Frame buffers: buffer n at BUFFERS + n * 4 KiB.
    const BUFFERS: u64 = 0x20_0000;
    const RX_APIC_VECTOR: u8 = 0x61;
    const CONFIG_APIC_VECTOR: u8 = 0x62;
    /// The device configuration region in BAR 0, and `status` in it.
    const DEVICE_CONFIG: u64 = 0x2000;
    const LINK_STATUS: u64 = DEVICE_CONFIG + 6;
    const ALL_OK: u8 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    /// struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6): what precedes every frame.
    const NET_HDR: usize = 12;
    /// IEEE 802 "local experimental" EtherType: nothing else on the TAP uses it.
    const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

    /// testpmd in a fresh netns, its socket in a scratch directory.
    struct Backend {
        pmd: Option<Testpmd>,
        netns: NetNs,
        dir: ScratchDir,
    }

    impl Backend {
        fn start(label: &str, queue_pairs: u16) -> Backend {
            let netns = NetNs::create("vnet").expect("netns");
            let dir = ScratchDir::new(label).unwrap();
            let mut backend = Backend {
                pmd: None,
                netns,
                dir,
            };
            backend.restart(queue_pairs);
            backend
        }

        fn restart(&mut self, queue_pairs: u16) {
            let pmd = Testpmd::start(&self.netns, &self.socket(), queue_pairs)
                .unwrap_or_else(|e| panic!("{e}"));
            self.pmd = Some(pmd);
        }

        fn socket(&self) -> std::path::PathBuf {
            self.dir.join("net.sock")
        }

        fn tap(&self) -> PacketSocket {
            self.pmd.as_ref().unwrap().packet_socket().unwrap()
        }

        fn log(&self) -> String {
            self.pmd
                .as_ref()
                .map(|p| p.output_tail())
                .unwrap_or_default()
        }
    }

    fn params(queue_pairs: u16) -> NetParams {
        NetParams {
            mac: MAC,
            queue_pairs,
            mtu: Some(1400),
        }
    }

    /// A driver on a real KVM VM whose RAM is a memfd the backend can map.
    fn driver(device: VhostUserNet) -> (TestDriver, GuestRam) {
        TestDriver::with_shared_memory(Box::new(device))
    }

    fn buffer(n: u16) -> u64 {
        BUFFERS + u64::from(n) * 0x1000
    }

    /// Publishes descriptor chain `head` in the avail ring.
    fn offer(q: &DriverQueue<'_>, head: u16) {
        let idx = q.avail.idx().load();
        q.avail
            .ring()
            .ref_at(usize::from(idx) % 16)
            .unwrap()
            .store(head);
        q.avail.idx().store(idx.wrapping_add(1));
    }

    fn kick(d: &TestDriver, queue: u16) {
        d.write(NOTIFY + 4 * u64::from(queue), 2, u64::from(queue));
    }

    /// Negotiates `features`, sets up `queues` queues of 16 entries (queue i on MSI-X
    /// vector i + 1; configuration changes on vector 0; those and the first rx queue's
    /// vector routed) and sets DRIVER_OK.
    fn start<'a>(
        d: &TestDriver,
        guest: &'a crate::memory::GuestMemoryMmap,
        features: u64,
        queues: u16,
    ) -> Vec<DriverQueue<'a>> {
        d.route_vector(0, CONFIG_APIC_VECTOR);
        d.route_vector(1, RX_APIC_VECTOR);
        assert!(d.negotiate(features), "features {features:#x} refused");
        d.write(CONFIG_MSIX_VECTOR, 2, 0);
        let rings: Vec<_> = (0..queues)
            .map(|i| DriverQueue::new(guest, RINGS + u64::from(i) * 0x4000, 16))
            .collect();
        for (i, q) in rings.iter().enumerate() {
            d.setup_queue(i as u16, 16, q.rings, i as u16 + 1);
        }
        d.set_status(ALL_OK);
        assert_eq!(d.status(), ALL_OK, "DRIVER_OK accepted");
        rings
    }

    fn frame(dst: [u8; 6], src: [u8; 6], tag: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE);
        f.extend_from_slice(tag);
        f.resize(64, 0xa5);
        f
    }

    /// Puts `frame` behind a zeroed virtio-net header in buffer `n` and offers it on `tx`.
    fn transmit(d: &TestDriver, tx: &DriverQueue<'_>, n: u16, frame: &[u8]) {
        let mut packet = vec![0u8; NET_HDR];
        packet.extend_from_slice(frame);
        d.guest()
            .write_slice(&packet, GuestAddress(buffer(n)))
            .unwrap();
        tx.desc
            .store(n, desc(buffer(n), packet.len() as u32, 0, 0))
            .unwrap();
        offer(tx, n);
    }

    /// Offers `frame` on tx descriptors `from`, `from + 1`, ... (kicking each time) until the
    /// TAP sees it, at most 5 times 2 s; how many descriptors it used. testpmd can drop a frame
    /// while its ports come up (its vhost port counts it received, its TAP port sends nothing),
    /// which is the peer's start-up, not this device; the rx direction resends for the same
    /// reason.
    fn transmit_until_seen(
        d: &TestDriver,
        tx: &DriverQueue<'_>,
        from: u16,
        frame: &[u8],
        tap: &PacketSocket,
        backend: &Backend,
    ) -> u16 {
        for n in from..from + 5 {
            transmit(d, tx, n, frame);
            kick(d, 1);
            if tap
                .receive_matching(Duration::from_secs(2), |f| f == frame)
                .is_some()
            {
                return n - from + 1;
            }
        }
        panic!("the frame never reached the TAP:\n{}", backend.log());
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn count(c: &AtomicU64) -> u64 {
        NetMetrics::get(c)
    }

    fn connection_count(c: &AtomicU64) -> u64 {
        VhostUserMetrics::get(c)
    }

    #[test]
    fn the_vmm_owns_mac_status_queue_pairs_and_mtu() {
        let backend = Backend::start("net-config", 2);
        let net = VhostUserNet::new(backend.socket(), params(2)).unwrap();
        assert_eq!(net.device_type(), TYPE_NET);
        assert_eq!(
            net.queue_max_sizes(),
            &[super::QUEUE_SIZE; 5],
            "rx0 tx0 rx1 tx1 ctrl"
        );
        let mut config = [0u8; 12];
        net.read_config(0, &mut config);
        assert_eq!(config[..6], MAC);
        assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "LINK_UP");
        assert_eq!(u16::from_le_bytes([config[8], config[9]]), 2);
        assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1400);
        let features = net.features();
        for bit in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_MTU,
        ] {
            assert_ne!(features & 1 << bit, 0, "bit {bit} in {features:#x}");
        }
        assert_eq!(
            features & !(device::BACKEND_GUEST_FEATURES | device::VMM_FEATURES),
            0,
            "only features the VMM or the transport handle reach the guest"
        );
        assert_eq!(MAX_QUEUE_PAIRS, crate::config::MAX_NET_QUEUE_PAIRS);

        // One pair and no MTU: neither MQ nor MTU is offered.
        drop(net);
        let single = NetParams {
            mtu: None,
            ..params(1)
        };
        let net = VhostUserNet::new(backend.socket(), single).unwrap();
        assert_eq!(
            net.features() & (1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_MTU),
            0
        );
        assert_eq!(net.queue_max_sizes().len(), 3);
    }

    #[test]
    fn a_missing_socket_is_a_clear_error() {
        let dir = ScratchDir::new("net-missing").unwrap();
        let socket = dir.join("nobody.sock");
        let err = VhostUserNet::new(&socket, params(1))
            .err()
            .expect("no backend");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "cannot connect to vhost-user-net socket {}; is the backend running?",
                socket.display()
            )),
            "{msg}"
        );
    }

    #[test]
    fn a_backend_that_accepts_and_never_answers_is_a_timeout_not_a_hang() {
        let dir = ScratchDir::new("net-silent").unwrap();
        let socket = dir.join("silent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // Accepts, then keeps the connection open without reading or answering.
        let silent = std::thread::spawn(move || listener.accept().map(|(stream, _)| stream));
        let started = Instant::now();
        let err = VhostUserNet::new(&socket, params(1))
            .err()
            .expect("connected to a silent backend");
        assert!(
            matches!(&err, NetError::VhostUser(e) if e.is_unresponsive()),
            "{err}"
        );
        assert!(err.to_string().contains("did not answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(silent.join().unwrap());
    }

    #[test]
    fn a_backend_with_fewer_queues_than_pairs_needs_is_refused() {
        let backend = Backend::start("net-toofew", 1);
        let err = VhostUserNet::new(backend.socket(), params(MAX_QUEUE_PAIRS))
            .err()
            .expect("testpmd serves fewer than 254 queues");
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                NetError::VhostUser(VhostUserError::TooFewQueues { need: 254, .. })
            ),
            "{msg}"
        );
        assert!(msg.contains("the device needs 254"), "{msg}");
        assert!(matches!(
            VhostUserNet::new(backend.socket(), params(0)),
            Err(NetError::QueuePairs(0))
        ));
    }

    #[test]
    fn frames_cross_between_the_guest_rings_and_the_tap() {
        let backend = Backend::start("net-io", 1);
        let net = VhostUserNet::new(backend.socket(), params(1)).unwrap();
        let metrics = net.metrics();
        // Everything offered, as Linux takes it: EVENT_IDX, MRG_RXBUF and the offloads
        // testpmd's vhost PMD has (the 12-byte header stays the same).
        let features = VERSION_1 | net.features();
        let (d, _ram) = driver(net);
        let guest = d.guest();
        let tap = backend.tap();
        let [rx, tx, _ctrl] = &start(&d, &guest, features, 3)[..] else {
            unreachable!()
        };
        assert_eq!(connection_count(&metrics.connection.activations), 1);

        // Guest to TAP.
        let out = frame([0xff; 6], MAC, b"guest-to-tap");
        let sent = transmit_until_seen(&d, tx, 0, &out, &tap, &backend);
        assert!(
            d.wait_for(|| tx.used.idx().load() == sent),
            "the backend returned the tx buffer"
        );

        // TAP to guest: four receive buffers.
        for n in 0..4u16 {
            rx.desc
                .store(n, desc(buffer(8 + n), 2048, VRING_DESC_F_WRITE, 0))
                .unwrap();
            offer(rx, n);
        }
        kick(&d, 0);
        let inbound = frame(MAC, [0x02, 0, 0, 0, 0, 1], b"tap-to-guest");
        let mut found = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !found && Instant::now() < deadline {
            tap.send(&inbound).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            for i in 0..rx.used.idx().load().min(4) {
                let used = rx.used.ring().ref_at(usize::from(i)).unwrap().load();
                let mut got = vec![0u8; used.len() as usize];
                guest
                    .read_slice(&mut got, GuestAddress(buffer(8 + used.id() as u16)))
                    .unwrap();
                found |= got.get(NET_HDR..) == Some(inbound.as_slice());
            }
        }
        assert!(
            found,
            "the frame never reached an rx buffer:\n{}",
            backend.log()
        );
        assert!(
            d.vm.wait_lapic_irr(RX_APIC_VECTOR),
            "the backend raised the rx queue's MSI through its irqfd"
        );
        assert_eq!(connection_count(&metrics.connection.backend_errors), 0);

        // Reset takes the rings back (GET_VRING_BASE answers).
        d.set_status(0);
        assert_eq!(d.status(), 0);
        assert_eq!(count(&metrics.active_queue_pairs), 0);
        assert_eq!(connection_count(&metrics.connection.backend_errors), 0);
    }

    /// Writes control command `n` (header, data, ack: descriptors 3n..3n+2) and offers it.
    fn control(d: &TestDriver, q: &DriverQueue<'_>, n: u16, class: u32, cmd: u32, data: &[u8]) {
        let base = buffer(32 + n);
        let guest = d.guest();
        guest
            .write_slice(&[class as u8, cmd as u8], GuestAddress(base))
            .unwrap();
        guest.write_slice(data, GuestAddress(base + 16)).unwrap();
        guest.write_obj(0xeeu8, GuestAddress(base + 64)).unwrap();
        // Five commands fit the 16-entry table; each is answered before the next comes.
        let first = 3 * (n % 5);
        q.desc
            .store(first, desc(base, 2, VRING_DESC_F_NEXT, first + 1))
            .unwrap();
        q.desc
            .store(
                first + 1,
                desc(base + 16, data.len() as u32, VRING_DESC_F_NEXT, first + 2),
            )
            .unwrap();
        q.desc
            .store(first + 2, desc(base + 64, 1, VRING_DESC_F_WRITE, 0))
            .unwrap();
        offer(q, first);
    }

    fn ack(d: &TestDriver, q: &DriverQueue<'_>, count: u16, n: u16) -> u8 {
        assert!(
            d.wait_for(|| q.used.idx().load() == count),
            "control command {n} unanswered"
        );
        d.guest()
            .read_obj(GuestAddress(buffer(32 + n) + 64))
            .unwrap()
    }

    #[test]
    fn the_control_queue_switches_queue_pairs_and_refuses_bad_commands() {
        let backend = Backend::start("net-ctrl", 2);
        let net = VhostUserNet::new(backend.socket(), params(2)).unwrap();
        let metrics = net.metrics();
        let (d, _ram) = driver(net);
        let guest = d.guest();
        let features = VERSION_1 | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_MQ;
        let queues = start(&d, &guest, features, 5);
        let (ctrl, tx1) = (&queues[4], &queues[3]);
        assert_eq!(
            count(&metrics.active_queue_pairs),
            1,
            "pair 0 alone at first"
        );
        let (ok, err) = (VIRTIO_NET_OK as u8, VIRTIO_NET_ERR as u8);

        // The backend leaves pair 1 alone until the driver asks for it.
        let tap = backend.tap();
        let early = frame([0xff; 6], MAC, b"on-tx1");
        transmit(&d, tx1, 0, &early);
        kick(&d, 3);
        let seen = |f: &[u8]| f == early.as_slice();
        assert!(
            tap.receive_matching(Duration::from_millis(500), seen)
                .is_none(),
            "a disabled ring was served"
        );

        let cases: &[(u32, u32, &[u8], u8)] = &[
            (
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &2u16.to_le_bytes(),
                ok,
            ),
            (
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &3u16.to_le_bytes(),
                err,
            ),
            (
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &0u16.to_le_bytes(),
                err,
            ),
            (
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &[1],
                err,
            ),
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[1], ok),
            (0x42, 0, &[0], err),
        ];
        for (n, (class, cmd, data, want)) in cases.iter().enumerate() {
            let n = n as u16;
            control(&d, ctrl, n, *class, *cmd, data);
            kick(&d, 4);
            assert_eq!(ack(&d, ctrl, n + 1, n), *want, "command {n}");
            if n == 0 {
                assert_eq!(count(&metrics.active_queue_pairs), 2);
                assert!(
                    tap.receive_matching(Duration::from_secs(10), seen)
                        .is_some(),
                    "the backend serves tx1 once enabled:\n{}",
                    backend.log()
                );
            }
        }
        assert_eq!(
            count(&metrics.active_queue_pairs),
            2,
            "refusals changed nothing"
        );
        assert_eq!(count(&metrics.control_commands), 2);
        assert_eq!(count(&metrics.control_errors), 4);

        // Back to one pair: the backend stops rings 2 and 3 and acknowledges it.
        control(
            &d,
            ctrl,
            0,
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &1u16.to_le_bytes(),
        );
        kick(&d, 4);
        assert_eq!(ack(&d, ctrl, 7, 0), ok);
        assert_eq!(count(&metrics.active_queue_pairs), 1);
        let late = frame([0xff; 6], MAC, b"tx1-after-disable");
        transmit(&d, tx1, 1, &late);
        kick(&d, 3);
        assert!(
            tap.receive_matching(Duration::from_millis(500), |f| f == late.as_slice())
                .is_none(),
            "a ring switched off was still served"
        );
        assert_eq!(connection_count(&metrics.connection.backend_errors), 0);
    }

    #[test]
    fn hostile_control_chains_are_answered_without_panic() {
        let backend = Backend::start("net-hostile", 1);
        let net = VhostUserNet::new(backend.socket(), params(1)).unwrap();
        let metrics = net.metrics();
        let (d, _ram) = driver(net);
        let guest = d.guest();
        let queues = start(&d, &guest, VERSION_1 | 1 << VIRTIO_NET_F_CTRL_VQ, 3);
        let ctrl = &queues[2];
        let ack_at = buffer(40);
        let t = &ctrl.desc;
        // 0: no writable ack byte. 1 -> 2: a 16 KiB command. 3 -> 4: header outside RAM.
        // 5 -> 6 -> 7: readable after writable. 8: an empty chain of a writable byte.
        t.store(0, desc(buffer(41), 4, 0, 0)).unwrap();
        t.store(1, desc(buffer(41), 0x4000, VRING_DESC_F_NEXT, 2))
            .unwrap();
        t.store(2, desc(ack_at, 1, VRING_DESC_F_WRITE, 0)).unwrap();
        t.store(3, desc(MEM_SIZE + 0x1000, 2, VRING_DESC_F_NEXT, 4))
            .unwrap();
        t.store(4, desc(ack_at + 1, 1, VRING_DESC_F_WRITE, 0))
            .unwrap();
        t.store(5, desc(buffer(41), 2, VRING_DESC_F_NEXT, 6))
            .unwrap();
        t.store(
            6,
            desc(ack_at + 2, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 7),
        )
        .unwrap();
        t.store(7, desc(buffer(41), 2, 0, 0)).unwrap();
        t.store(8, desc(ack_at + 3, 1, VRING_DESC_F_WRITE, 0))
            .unwrap();
        guest.write_slice(&[0xee; 4], GuestAddress(ack_at)).unwrap();
        for head in [0, 1, 3, 5, 8] {
            offer(ctrl, head);
        }
        // 200 is no descriptor of a 16-entry queue.
        offer(ctrl, 200);
        kick(&d, 2);
        wait_until("every chain answered", || ctrl.used.idx().load() == 5);
        let mut acks = [0u8; 4];
        guest.read_slice(&mut acks, GuestAddress(ack_at)).unwrap();
        let err = VIRTIO_NET_ERR as u8;
        assert_eq!(acks, [err; 4]);
        let lens: Vec<u32> = (0..5)
            .map(|i| ctrl.used.ring().ref_at(i).unwrap().load().len())
            .collect();
        assert_eq!(lens, [0, 1, 1, 1, 1]);
        // Five bad chains, and head 200 (a chain without an ack byte, not returnable).
        assert_eq!(count(&metrics.control_errors), 6);
        assert_eq!(count(&metrics.control_commands), 0);

        // An avail index far ahead does not spin the thread, and reset still stops it.
        ctrl.avail.idx().store(1000);
        kick(&d, 2);
        wait_until("the stall counted", || count(&metrics.control_errors) == 7);
        d.set_status(0);
        assert_eq!(d.status(), 0);
    }

    #[test]
    fn frames_flow_again_after_the_backend_restarts() {
        let mut backend = Backend::start("net-restart", 1);
        let net = VhostUserNet::new(backend.socket(), params(1)).unwrap();
        let metrics = net.metrics();
        let rings = net.ring_control();
        let (d, _ram) = driver(net);
        let guest = d.guest();
        let queues = start(&d, &guest, VERSION_1, 3);
        let tx = &queues[1];
        assert_eq!(
            rings.inflight_region(),
            None,
            "virtio-net does not ask for INFLIGHT_SHMFD"
        );
        let first = frame([0xff; 6], MAC, b"before-crash");
        let tap = backend.tap();
        let sent = transmit_until_seen(&d, tx, 0, &first, &tap, &backend);
        drop(tap);

        assert_eq!(d.read(LINK_STATUS, 2), 1, "LINK_UP");
        assert!(!d.vm.lapic_irr_has(CONFIG_APIC_VECTOR));

        backend.pmd.take().unwrap().crash().unwrap();
        wait_until("hang-up noticed", || {
            connection_count(&metrics.connection.disconnects) == 1
        });
        assert_eq!(d.read(LINK_STATUS, 2), 0, "no backend, no link");
        assert!(
            d.vm.wait_lapic_irr(CONFIG_APIC_VECTOR),
            "the driver hears of the link change"
        );
        backend.restart(1);
        wait_until("reconnected", || {
            connection_count(&metrics.connection.reconnects) == 1
        });
        assert_eq!(d.read(LINK_STATUS, 2), 1, "link up again");
        // A new testpmd has a new TAP.
        let tap = backend.tap();
        let second = frame([0xff; 6], MAC, b"after-restart");
        // The new backend takes the rings over from where the old one left them.
        transmit_until_seen(&d, tx, sent, &second, &tap, &backend);
        assert_eq!(connection_count(&metrics.connection.backend_errors), 0);
    }

    /// Stops a process (SIGSTOP) and lets it go on (SIGCONT) on drop, so a failing test
    /// does not leave a frozen backend that ignores the harness's SIGTERM.
    struct Frozen(nix::unistd::Pid);

    impl Frozen {
        fn stop(pid: i32) -> Frozen {
            let pid = nix::unistd::Pid::from_raw(pid);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
            Frozen(pid)
        }
    }

    impl Drop for Frozen {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }

    #[test]
    fn driver_ok_returns_when_the_backend_stops_answering_and_the_rings_go_to_its_return() {
        let backend = Backend::start("net-frozen", 1);
        let net = VhostUserNet::new(backend.socket(), params(1)).unwrap();
        let metrics = net.metrics();
        let (d, _ram) = driver(net);
        let guest = d.guest();
        let frozen = Frozen::stop(backend.pmd.as_ref().unwrap().pid());
        // The vCPU's status write waits for the backend's acknowledgement, bounded by the
        // watchdog; DRIVER_OK is accepted and the rings wait for a backend that answers.
        let started = Instant::now();
        let queues = start(&d, &guest, VERSION_1, 3);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "DRIVER_OK took {took:?}");
        wait_until("the silent backend disconnected", || {
            connection_count(&metrics.connection.disconnects) == 1
        });
        assert!(connection_count(&metrics.connection.backend_errors) >= 1);
        assert_eq!(d.read(LINK_STATUS, 2), 0, "no answering backend, no link");

        drop(frozen);
        wait_until("reconnected", || {
            connection_count(&metrics.connection.reconnects) == 1
        });
        assert_eq!(d.read(LINK_STATUS, 2), 1, "link up again");
        let tap = backend.tap();
        let sent = frame([0xff; 6], MAC, b"after-thaw");
        transmit(&d, &queues[1], 0, &sent);
        kick(&d, 1);
        assert!(
            tap.receive_matching(Duration::from_secs(10), |f| f == sent.as_slice())
                .is_some(),
            "the thawed backend took the rings over:\n{}",
            backend.log()
        );
    }
}
