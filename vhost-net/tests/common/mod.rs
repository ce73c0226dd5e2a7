//! What the vhost-net tests share: a TAP inside a per-test network namespace, an AF_PACKET
//! socket on it (the far end of the wire), and a virtio-net "driver" built on the harness's
//! vhost-user frontend.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use ferrovirt_tests::names::ip;
use ferrovirt_tests::vhost_user_frontend::{
    Buffer, GuestAddress, GuestMemory, SplitQueue, VhostUserConnection,
};
use ferrovirt_tests::{NetNs, unique_name};

pub const BINARY: &str = env!("CARGO_BIN_EXE_ferrovirt-vhost-net");
pub const ETHERTYPE: u16 = 0x88b5; // IEEE 802 local experimental
pub const VNET_HDR: usize = 12;
pub const QUEUE_SIZE: u16 = 256;
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const F_MRG_RXBUF: u32 = 15;
pub const F_MQ: u32 = 22;
pub const F_EVENT_IDX: u32 = 29;
pub const F_VERSION_1: u32 = 32;

/// A TAP in its own network namespace; both go when the namespace guard drops.
pub struct NsTap {
    pub ns: NetNs,
    pub name: String,
}

impl NsTap {
    pub fn create(multi_queue: bool) -> Self {
        let ns = NetNs::create("vn").unwrap_or_else(|e| panic!("{e}"));
        let name = unique_name("vtap");
        let mut args = vec![
            "-n",
            ns.name(),
            "tuntap",
            "add",
            "dev",
            &name,
            "mode",
            "tap",
        ];
        if multi_queue {
            args.push("multi_queue");
        }
        ip(&args).unwrap_or_else(|e| panic!("{e}"));
        // No IPv6 link-local address: nothing but the test's frames on the wire.
        ip(&[
            "-n",
            ns.name(),
            "link",
            "set",
            "dev",
            &name,
            "addrgenmode",
            "none",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        ip(&["-n", ns.name(), "link", "set", "dev", &name, "up"]).unwrap_or_else(|e| panic!("{e}"));
        Self { ns, name }
    }

    /// Flags for the backend: the TAP by name inside our namespace.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--tap".into(),
            self.name.clone(),
            "--netns".into(),
            self.ns.name().into(),
        ]
    }

    /// A packet socket on the TAP that keeps frames of our test ethertype.
    pub fn socket(&self) -> PacketSocket {
        self.socket_for(ETHERTYPE)
    }

    /// A packet socket on the TAP that keeps frames of `ethertype`.
    pub fn socket_for(&self, ethertype: u16) -> PacketSocket {
        let mut s = PacketSocket::open(&self.ns.path(), &self.name);
        s.ethertype = ethertype;
        s
    }
}

/// Runs `f` on a thread that entered the network namespace at `ns`.
pub fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = File::open(ns).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on an open namespace file; it affects this short-lived thread only.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .unwrap()
}

/// An AF_PACKET socket bound to the TAP inside its namespace: what goes out of the TAP
/// (the guest's TX) is received here, what is sent here goes to the guest.
pub struct PacketSocket {
    fd: OwnedFd,
    ethertype: u16,
}

impl PacketSocket {
    pub fn open(ns: &Path, ifname: &str) -> Self {
        let ifname = std::ffi::CString::new(ifname).unwrap();
        let fd = in_netns(ns, move || {
            // SAFETY: plain syscalls with valid arguments; the fd is checked and owned.
            unsafe {
                let ifindex = libc::if_nametoindex(ifname.as_ptr());
                assert!(ifindex > 0);
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                assert!(fd >= 0, "{}", std::io::Error::last_os_error());
                let fd = OwnedFd::from_raw_fd(fd);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = ifindex as i32;
                let r = libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
                fd
            }
        });
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO with a valid timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Self {
            fd,
            ethertype: ETHERTYPE,
        }
    }

    /// Sends one frame out of the TAP, toward the guest.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// Frames of the socket's ethertype that came in from the guest, until `count` or the timeout.
    pub fn receive(&self, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while out.len() < count && Instant::now() < deadline {
            // SAFETY: zeroed sockaddr_ll and a buffer valid for its length.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..n as usize];
            if frame.len() >= 14 && u16::from_be_bytes([frame[12], frame[13]]) == self.ethertype {
                out.push(frame.to_vec());
            }
        }
        out
    }
}

/// An Ethernet frame of our ethertype, `len` bytes, whose payload starts with `tag`.
pub fn frame(tag: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(18)];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&tag.to_be_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(31).wrapping_add(tag) as u8;
    }
    f
}

/// An IPv4/UDP frame (flows the TAP hashes to different queues), marked with our tag.
pub fn udp_frame(tag: u32, port: u16) -> Vec<u8> {
    let mut f = frame(tag, 80);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip.fill(0);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&66u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    f[34..36].copy_from_slice(&port.to_be_bytes());
    f[36..38].copy_from_slice(&4789u16.to_be_bytes());
    f[38..40].copy_from_slice(&46u16.to_be_bytes());
    f[42..46].copy_from_slice(&tag.to_be_bytes());
    f
}

/// A received RX frame: its header and frame bytes.
#[derive(Debug, Clone)]
pub struct RxFrame {
    pub header: Vec<u8>,
    pub frame: Vec<u8>,
    pub chains: usize,
}

impl RxFrame {
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.header[10], self.header[11]])
    }
}

/// The guest side of a virtio-net device with `pairs` queue pairs: rx0, tx0, rx1, tx1, ...
pub struct NetDriver {
    pub mem: GuestMemory,
    pub queues: Vec<SplitQueue>,
    /// The live connection; `None` between a disconnect and the next connect.
    pub conn: Option<VhostUserConnection>,
    pub features: u64,
    /// Where each outstanding RX chain's buffer is, per RX queue, by head.
    rx_buffers: Vec<HashMap<u16, (GuestAddress, u32)>>,
    /// RX chains the device returned with nothing written.
    pub returned_rx: usize,
}

pub fn default_features(mergeable: bool) -> u64 {
    let mut f = 1u64 << F_VERSION_1 | 1 << F_EVENT_IDX | 1 << F_MQ;
    if mergeable {
        f |= 1 << F_MRG_RXBUF;
    }
    f
}

impl NetDriver {
    pub fn connect(socket: &Path, pairs: usize, features: u64) -> Self {
        let mut mem = GuestMemory::new(64 << 20).unwrap();
        let queues: Vec<SplitQueue> = (0..pairs * 2)
            .map(|i| SplitQueue::new(&mut mem, i, QUEUE_SIZE).unwrap())
            .collect();
        let conn = Self::handshake(socket, &mem, &queues, features, None);
        Self {
            mem,
            queues,
            conn: Some(conn),
            features,
            rx_buffers: vec![HashMap::new(); pairs],
            returned_rx: 0,
        }
    }

    fn handshake(
        socket: &Path,
        mem: &GuestMemory,
        queues: &[SplitQueue],
        features: u64,
        bases: Option<Vec<u16>>,
    ) -> VhostUserConnection {
        let mut conn = VhostUserConnection::connect(socket, queues.len(), features).unwrap();
        assert_eq!(conn.queue_num(), Some(queues.len() as u64), "GET_QUEUE_NUM");
        conn.set_mem_table(mem).unwrap();
        for (i, q) in queues.iter().enumerate() {
            let base = bases.as_ref().map_or(0, |b| b[i]);
            conn.start_queue(mem, q, base).unwrap();
        }
        conn
    }

    pub fn conn(&self) -> &VhostUserConnection {
        self.conn.as_ref().expect("connected")
    }

    /// Closes the vhost-user connection, as a VMM that goes away.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Connects again (after a backend or VMM restart), each queue starting at its used index.
    /// The old connection goes first: the backend serves one VMM at a time.
    pub fn reconnect(&mut self, socket: &Path) {
        self.conn = None;
        let bases = self
            .queues
            .iter()
            .map(|q| q.used_index(&self.mem).unwrap())
            .collect();
        self.conn = Some(Self::handshake(
            socket,
            &self.mem,
            &self.queues,
            self.features,
            Some(bases),
        ));
    }

    pub fn tx(&mut self, pair: usize) -> &mut SplitQueue {
        &mut self.queues[2 * pair + 1]
    }

    /// Waits for `count` used TX entries on `pair`.
    pub fn wait_tx(
        &mut self,
        pair: usize,
        count: usize,
    ) -> Vec<ferrovirt_tests::vhost_user_frontend::UsedElement> {
        self.queues[2 * pair + 1]
            .wait_used(&self.mem, count, TIMEOUT)
            .unwrap()
    }

    /// Puts `frames` on TX queue `pair`, each as a header descriptor and a frame descriptor,
    /// published together with one kick.
    pub fn send(&mut self, pair: usize, frames: &[Vec<u8>]) {
        self.send_with_header(pair, &[0u8; VNET_HDR], frames);
    }

    /// Like [`Self::send`] with a given virtio-net header on every frame.
    pub fn send_with_header(&mut self, pair: usize, header: &[u8; VNET_HDR], frames: &[Vec<u8>]) {
        for f in frames {
            let hdr = self.mem.alloc(VNET_HDR as u64, 8).unwrap();
            let data = self.mem.alloc(f.len() as u64, 8).unwrap();
            self.mem.write(hdr, header).unwrap();
            self.mem.write(data, f).unwrap();
            let q = &mut self.queues[2 * pair + 1];
            q.add_chain(
                &self.mem,
                &[
                    Buffer::readable(hdr, VNET_HDR as u32),
                    Buffer::readable(data, f.len() as u32),
                ],
            )
            .unwrap();
        }
        let q = &mut self.queues[2 * pair + 1];
        q.publish(&self.mem).unwrap();
        q.kick().unwrap();
    }

    /// Puts raw descriptors (addr, len, flags) as one chain on queue `index` and kicks.
    pub fn add_raw(&mut self, index: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let q = &mut self.queues[index];
        let head = q.add_raw_chain(&self.mem, descs).unwrap();
        q.publish(&self.mem).unwrap();
        q.kick().unwrap();
        head
    }

    /// Gives RX queue `pair` `count` chains of `size` bytes each.
    pub fn post_rx(&mut self, pair: usize, count: usize, size: u32) {
        for _ in 0..count {
            let buf = self.mem.alloc(u64::from(size), 8).unwrap();
            let q = &mut self.queues[2 * pair];
            let head = q
                .add_chain(&self.mem, &[Buffer::writable(buf, size)])
                .unwrap();
            self.rx_buffers[pair].insert(head, (buf, size));
        }
        let q = &mut self.queues[2 * pair];
        q.publish(&self.mem).unwrap();
        q.kick().unwrap();
    }

    /// Waits for `count` frames on RX queue `pair` (merging chains as num_buffers says).
    pub fn receive(&mut self, pair: usize, count: usize, timeout: Duration) -> Vec<RxFrame> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        let mut used = std::collections::VecDeque::new();
        while frames.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let q = &mut self.queues[2 * pair];
            match q.wait_used(&self.mem, 1, left.min(Duration::from_millis(200))) {
                Ok(u) => used.extend(u),
                Err(_) => continue,
            }
            while let Some(first) = used.front().copied() {
                if first.len == 0 {
                    // A chain the device refused (hostile-chain tests) comes back empty.
                    used.pop_front();
                    self.rx_buffers[pair].remove(&first.head);
                    self.returned_rx += 1;
                    continue;
                }
                let (addr, _) = self.rx_buffers[pair][&first.head];
                let head_bytes = self.mem.read(addr, first.len as usize).unwrap();
                assert!(
                    head_bytes.len() >= VNET_HDR,
                    "used length {} < header",
                    first.len
                );
                let n = usize::from(u16::from_le_bytes([head_bytes[10], head_bytes[11]]));
                if used.len() < n.max(1) {
                    // The rest of a merged frame: published together, so this is a bug.
                    panic!("merged frame of {n} buffers published partially");
                }
                let mut bytes = head_bytes;
                used.pop_front();
                self.rx_buffers[pair].remove(&first.head);
                for _ in 1..n {
                    let e = used.pop_front().unwrap();
                    let (a, _) = self.rx_buffers[pair].remove(&e.head).unwrap();
                    bytes.extend(self.mem.read(a, e.len as usize).unwrap());
                }
                frames.push(RxFrame {
                    header: bytes[..VNET_HDR].to_vec(),
                    frame: bytes[VNET_HDR..].to_vec(),
                    chains: n.max(1),
                });
            }
        }
        frames
    }
}

/// The backend's counters from its metrics socket.
pub fn metrics(backend: &ferrovirt_tests::VhostNetBackend) -> ferrovirt_vhost_net::MetricsSnapshot {
    let json = backend.metrics_json().unwrap();
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

/// Starts the backend binary on `tap` with extra flags.
pub fn start_backend(
    dir: &ferrovirt_tests::ScratchDir,
    tap: &NsTap,
    extra: &[&str],
) -> ferrovirt_tests::VhostNetBackend {
    let socket = dir.join("net.sock");
    let mut flags: Vec<String> = tap.flags();
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    ferrovirt_tests::VhostNetBackend::start_binary(BINARY.as_ref(), &socket, &flags)
        .unwrap_or_else(|e| panic!("{e}"))
}
