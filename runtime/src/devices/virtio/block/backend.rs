//! One vhost-user connection to a virtio-blk backend: the handshake at connect time, and
//! handing the guest's rings to the backend (and taking them back).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::BlockError;
use super::watchdog::Watchdog;
use crate::devices::virtio::pci::MAX_QUEUES;
use crate::memory::GuestMemoryAtomic;

/// struct virtio_blk_config up to and including the write-zeroes fields (virtio 1.2
/// §5.2.4); secure-erase and zoned fields follow, and their features are not offered.
pub(super) const CONFIG_SIZE: usize = 60;
/// Offset of `num_queues` in the configuration space.
const CONFIG_NUM_QUEUES: usize = 34;
/// Offset of `writeback` (VIRTIO_BLK_F_CONFIG_WCE).
const CONFIG_WRITEBACK: usize = 32;

/// Feature bits passed from the backend to the guest: the virtio-blk features whose
/// configuration fields fit [`CONFIG_SIZE`], and the split-ring features the transport
/// handles. No packed rings and no ACCESS_PLATFORM: the transport has neither.
pub(super) const GUEST_FEATURES: u64 = 1 << VIRTIO_BLK_F_SIZE_MAX
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_GEOMETRY
    | 1 << VIRTIO_BLK_F_RO
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_TOPOLOGY
    | 1 << VIRTIO_BLK_F_CONFIG_WCE
    | 1 << VIRTIO_BLK_F_MQ
    | 1 << VIRTIO_BLK_F_DISCARD
    | 1 << VIRTIO_BLK_F_WRITE_ZEROES
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_RING_F_EVENT_IDX;

/// How long one exchange with the backend (the handshake, starting or stopping the rings, a
/// config write) may take: the 3 s in [`BlockError::Unresponsive`]. A backend that accepts
/// and never answers would otherwise block the caller (a vCPU thread writing the status
/// register, or the monitor) forever. The `vhost` crate retries EAGAIN, so a socket timeout
/// cannot do this; a [`Watchdog`] shuts the socket down instead.
pub(super) const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// Protocol features this frontend uses when the backend has them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// One queue as the driver set it up, with the eventfds the backend waits on and signals.
pub(super) struct Ring {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where the backend starts reading the avail ring (VHOST_USER_SET_VRING_BASE).
    pub next_avail: u16,
    /// The queue's ioeventfd: KVM signals it on every guest notification.
    pub kick: EventFd,
    /// The queue's MSI-X irqfd (or an unread eventfd when the driver gave no vector).
    pub call: EventFd,
}

/// The region where the backend records requests in flight, so that a restarted backend
/// can resubmit them (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
pub(super) struct Inflight {
    file: File,
    info: VhostUserInflight,
}

/// Everything the backend needs to run the guest's queues; kept across reconnects.
pub(super) struct Rings {
    pub mem: GuestMemoryAtomic,
    /// Features the driver accepted.
    pub features: u64,
    pub queues: Vec<Ring>,
    pub inflight: Option<Inflight>,
}

impl Rings {
    /// Sets every ring's start to the used index in guest memory: after a backend crash,
    /// requests it took but never answered are taken again (the backend resubmits them
    /// from the inflight region when it has one; reads and writes are idempotent).
    pub fn rewind_to_used(&mut self) {
        let mem = self.mem.memory();
        for ring in &mut self.queues {
            // virtio 1.2 §2.7.8: struct virtq_used { le16 flags; le16 idx; ... }.
            match mem.read_obj::<u16>(GuestAddress(ring.used.wrapping_add(2))) {
                Ok(idx) => ring.next_avail = u16::from_le(idx),
                Err(e) => tracing::warn!(queue = ring.index, "cannot read the used index: {e}"),
            }
        }
    }
}

/// A connected, negotiated vhost-user-blk backend.
pub(super) struct Backend {
    socket: PathBuf,
    frontend: Frontend,
    /// Virtio features the backend offers (GET_FEATURES).
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_count: usize,
    config: [u8; CONFIG_SIZE],
    /// Shuts the socket down when an exchange takes longer than [`REPLY_TIMEOUT`].
    watchdog: Arc<Watchdog>,
}

impl Backend {
    /// Connects to `socket` and negotiates: owner, features, protocol features, queue
    /// count and configuration space.
    pub fn connect(socket: &Path) -> Result<Backend, BlockError> {
        let frontend = Frontend::connect(socket, 1).map_err(|source| BlockError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
        let watchdog = Arc::new(
            Watchdog::spawn(frontend.as_raw_fd(), REPLY_TIMEOUT).map_err(BlockError::Watchdog)?,
        );
        let mut backend = Backend {
            socket: socket.to_owned(),
            frontend,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            queue_count: 1,
            config: [0; CONFIG_SIZE],
            watchdog,
        };
        let watch = backend.watchdog.clone();
        watch.bounded(|| backend.negotiate())?;
        Ok(backend)
    }

    fn handshake_error(&self, step: &'static str) -> impl FnOnce(vhost::Error) -> BlockError {
        let socket = self.socket.clone();
        let watchdog = self.watchdog.clone();
        move |source| {
            if watchdog.fired() {
                BlockError::Unresponsive { socket, step }
            } else {
                BlockError::Handshake {
                    socket,
                    step,
                    source,
                }
            }
        }
    }

    /// Gives up on this connection: shuts the socket down, so the monitor (which polls a
    /// duplicate of it) sees a hang-up and redials.
    pub fn abandon(&self) {
        let how = nix::sys::socket::Shutdown::Both;
        if let Err(e) = nix::sys::socket::shutdown(self.frontend.as_raw_fd(), how) {
            tracing::warn!("cannot shut down the vhost-user-blk socket: {e}");
        }
    }

    fn negotiate(&mut self) -> Result<(), BlockError> {
        self.frontend
            .set_owner()
            .map_err(self.handshake_error("SET_OWNER"))?;
        self.features = self
            .frontend
            .get_features()
            .map_err(self.handshake_error("GET_FEATURES"))?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(BlockError::NoConfig(self.socket.clone()));
        }
        let offered = self
            .frontend
            .get_protocol_features()
            .map_err(self.handshake_error("GET_PROTOCOL_FEATURES"))?;
        self.protocol = offered & wanted_protocol_features();
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(BlockError::NoConfig(self.socket.clone()));
        }
        self.frontend
            .set_protocol_features(self.protocol)
            .map_err(self.handshake_error("SET_PROTOCOL_FEATURES"))?;
        if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request is acknowledged, so a refusal is an error here instead
            // of a silent stall.
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_queues = if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            self.frontend
                .get_queue_num()
                .map_err(self.handshake_error("GET_QUEUE_NUM"))?
        } else {
            1
        };
        let (_, config) = self
            .frontend
            .get_config(
                0,
                CONFIG_SIZE as u32,
                VhostUserConfigFlags::empty(),
                &[0; CONFIG_SIZE],
            )
            .map_err(self.handshake_error("GET_CONFIG"))?;
        // get_config checked that the reply has exactly the size asked for.
        self.config.copy_from_slice(&config[..CONFIG_SIZE]);

        let config_queues = if self.features & 1 << VIRTIO_BLK_F_MQ != 0 {
            let at = CONFIG_NUM_QUEUES;
            u64::from(u16::from_le_bytes([self.config[at], self.config[at + 1]]))
        } else {
            1
        };
        self.queue_count = config_queues
            .min(backend_queues)
            .clamp(1, MAX_QUEUES as u64) as usize;
        // The guest sees exactly the queues the device has.
        self.config[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2]
            .copy_from_slice(&(self.queue_count as u16).to_le_bytes());
        tracing::debug!(
            socket = %self.socket.display(),
            features = format_args!("{:#x}", self.features),
            protocol = ?self.protocol,
            queues = self.queue_count,
            "vhost-user-blk backend connected"
        );
        Ok(())
    }

    /// Feature bits for the guest (the transport adds VIRTIO_F_VERSION_1).
    pub fn guest_features(&self) -> u64 {
        self.features & GUEST_FEATURES
    }

    pub fn queue_count(&self) -> usize {
        self.queue_count
    }

    pub fn config(&self) -> &[u8; CONFIG_SIZE] {
        &self.config
    }

    /// The socket's fd, to watch for the backend hanging up.
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// Forwards a driver's write of the `writeback` byte (the only writable field).
    pub fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        let watch = self.watchdog.clone();
        watch.bounded(|| self.forward_config_write(offset, data))
    }

    fn forward_config_write(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        let writable = offset == CONFIG_WRITEBACK as u64
            && data.len() == 1
            && self.features & 1 << VIRTIO_BLK_F_CONFIG_WCE != 0;
        if !writable {
            tracing::debug!(
                offset,
                len = data.len(),
                "ignoring a read-only config write"
            );
            return Ok(());
        }
        self.frontend
            .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
            .map_err(self.handshake_error("SET_CONFIG"))?;
        self.config[CONFIG_WRITEBACK] = data[0];
        Ok(())
    }

    /// Hands the rings to the backend: features, memory table, then each ring's size,
    /// addresses (in this process's address space, as vhost-user wants), start index, and
    /// eventfds; finally enables the rings.
    pub fn start(&mut self, rings: &mut Rings) -> Result<(), BlockError> {
        let watch = self.watchdog.clone();
        watch.bounded(|| self.hand_over_rings(rings))
    }

    fn hand_over_rings(&mut self, rings: &mut Rings) -> Result<(), BlockError> {
        let mut features = rings.features & (self.features | GUEST_FEATURES | 1 << 32);
        features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features)
            .map_err(self.handshake_error("SET_FEATURES"))?;
        self.set_inflight(rings);

        let mem = rings.mem.memory();
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| BlockError::NotSharedMemory)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.handshake_error("SET_MEM_TABLE"))?;

        for ring in &rings.queues {
            let i = usize::from(ring.index);
            let host = |addr: u64| {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| BlockError::RingOutsideMemory(ring.index))
            };
            let addresses = VringConfigData {
                queue_max_size: super::QUEUE_SIZE,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: host(ring.desc)?,
                used_ring_addr: host(ring.used)?,
                avail_ring_addr: host(ring.avail)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, ring.size)
                .map_err(self.handshake_error("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &addresses)
                .map_err(self.handshake_error("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, ring.next_avail)
                .map_err(self.handshake_error("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &ring.call)
                .map_err(self.handshake_error("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &ring.kick)
                .map_err(self.handshake_error("SET_VRING_KICK"))?;
        }
        for ring in &rings.queues {
            self.frontend
                .set_vring_enable(usize::from(ring.index), true)
                .map_err(self.handshake_error("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Shares the inflight region with the backend, creating it on the first start.
    /// Without one, reconnecting still works from the used index.
    fn set_inflight(&mut self, rings: &mut Rings) {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return;
        }
        if rings.inflight.is_none() {
            let ask = VhostUserInflight::new(0, 0, self.queue_count as u16, super::QUEUE_SIZE);
            match self.frontend.get_inflight_fd(&ask) {
                Ok((info, file)) => rings.inflight = Some(Inflight { file, info }),
                Err(e) => {
                    tracing::warn!("vhost-user-blk backend has no inflight region: {e}");
                    return;
                }
            }
        }
        if let Some(inflight) = &rings.inflight
            && let Err(e) = self
                .frontend
                .set_inflight_fd(&inflight.info, inflight.file.as_raw_fd())
        {
            tracing::warn!("vhost-user-blk backend refused the inflight region: {e}");
        }
    }

    /// Stops every ring (VHOST_USER_GET_VRING_BASE) and records where each stopped.
    pub fn stop(&mut self, rings: &mut Rings) -> Result<(), BlockError> {
        let watch = self.watchdog.clone();
        watch.bounded(|| self.take_back_rings(rings))
    }

    fn take_back_rings(&mut self, rings: &mut Rings) -> Result<(), BlockError> {
        let mut result = Ok(());
        for ring in &mut rings.queues {
            let i = usize::from(ring.index);
            if let Err(e) = self.frontend.set_vring_enable(i, false) {
                result = Err(self.handshake_error("SET_VRING_ENABLE")(e));
            }
            match self.frontend.get_vring_base(i) {
                Ok(base) => ring.next_avail = base as u16,
                Err(e) => result = Err(self.handshake_error("GET_VRING_BASE")(e)),
            }
        }
        result
    }
}
