//! One vhost-user connection: the handshake at connect time, and handing the guest's rings
//! to the backend (and taking them back).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend as _};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::watchdog::Watchdog;
use super::{BackendHooks, FrontendSpec, VhostUserError};
use crate::devices::virtio::{ActiveQueue, VirtioInterrupt};
use crate::memory::GuestMemoryAtomic;

/// How long one exchange with the backend (the handshake, starting or stopping the rings, a
/// config access, a ring switch) may take: the 3 s in [`VhostUserError::Unresponsive`]. A
/// backend that accepts and never answers would otherwise block the caller (a vCPU thread
/// writing the status register, or the monitor) forever. The `vhost` crate retries EAGAIN,
/// so a socket timeout cannot do this; a [`Watchdog`] shuts the socket down instead, and
/// the monitor sees a hang-up and redials.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// One queue as the driver set it up, with the eventfds the backend waits on and signals.
pub struct Ring {
    /// The backend's vring index.
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
    /// Whether the backend processes the ring (VHOST_USER_SET_VRING_ENABLE); kept across
    /// reconnects.
    pub enabled: bool,
}

impl Ring {
    /// The ring of an enabled queue, served by the backend's vring `index` (usually the
    /// queue's own index), with the queue's irqfd as call.
    pub fn from_queue(
        queue: ActiveQueue,
        index: u16,
        interrupt: &VirtioInterrupt,
        enabled: bool,
    ) -> Result<Ring, VhostUserError> {
        let call = match interrupt.queue_irqfd(queue.index) {
            Some(irqfd) => irqfd.try_clone(),
            // No vector: the driver polls; the backend signals an eventfd nobody reads.
            None => EventFd::new(EFD_NONBLOCK),
        }
        .map_err(VhostUserError::EventFd)?;
        Ok(Ring {
            index,
            size: queue.queue.size(),
            desc: queue.queue.desc_table(),
            avail: queue.queue.avail_ring(),
            used: queue.queue.used_ring(),
            next_avail: queue.queue.next_avail(),
            kick: queue.kick,
            call,
            enabled,
        })
    }
}

/// The region where the backend records requests in flight, so that a restarted backend
/// can resubmit them (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
struct Inflight {
    file: File,
    info: VhostUserInflight,
}

/// Everything the backend needs to run the guest's queues; kept across reconnects.
pub struct Rings {
    pub mem: GuestMemoryAtomic,
    /// Features the driver accepted.
    pub features: u64,
    pub queues: Vec<Ring>,
    /// Created on the first start when both sides use INFLIGHT_SHMFD; lives as long as
    /// the driver's rings, so every reconnected backend gets the same region.
    inflight: Option<Inflight>,
}

impl Rings {
    pub fn new(mem: GuestMemoryAtomic, features: u64, queues: Vec<Ring>) -> Rings {
        Rings {
            mem,
            features,
            queues,
            inflight: None,
        }
    }

    /// The inode of the inflight region's file, to tell regions apart in tests.
    #[cfg(test)]
    pub(super) fn inflight_inode(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let inflight = self.inflight.as_ref()?;
        inflight.file.metadata().ok().map(|m| m.ino())
    }

    /// Sets every ring's start to the used index in guest memory: after a backend crash,
    /// buffers it took but never returned are taken again (a backend with an inflight
    /// region resubmits what it had in flight from there).
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

/// A connected, negotiated vhost-user backend.
pub struct Connection {
    kind: &'static str,
    socket: PathBuf,
    frontend: Frontend,
    /// Virtio features the backend offers (GET_FEATURES).
    features: u64,
    protocol: VhostUserProtocolFeatures,
    /// Queues the backend serves (GET_QUEUE_NUM, or the spec's default without MQ).
    queue_count: u64,
    queue_size: u16,
    /// Shuts the socket down when an exchange takes longer than [`REPLY_TIMEOUT`].
    watchdog: Arc<Watchdog>,
}

impl Connection {
    /// Connects to `socket` and negotiates: owner, features, protocol features and queue
    /// count.
    pub fn connect(socket: &Path, spec: &FrontendSpec) -> Result<Connection, VhostUserError> {
        let frontend = Frontend::connect(socket, spec.default_queue_count).map_err(|source| {
            VhostUserError::Connect {
                kind: spec.kind,
                socket: socket.to_owned(),
                source,
            }
        })?;
        let watchdog = Arc::new(
            Watchdog::spawn(frontend.as_raw_fd(), REPLY_TIMEOUT)
                .map_err(VhostUserError::Watchdog)?,
        );
        let mut connection = Connection {
            kind: spec.kind,
            socket: socket.to_owned(),
            frontend,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            queue_count: spec.default_queue_count,
            queue_size: spec.queue_size,
            watchdog,
        };
        connection.bounded(|c| c.negotiate(spec))?;
        Ok(connection)
    }

    /// Runs one exchange with the backend under the watchdog.
    fn bounded<T>(&mut self, exchange: impl FnOnce(&mut Connection) -> T) -> T {
        let watchdog = self.watchdog.clone();
        watchdog.bounded(|| exchange(self))
    }

    /// Turns a vhost crate error at `step` into ours: [`VhostUserError::Unresponsive`] when
    /// the watchdog cut the exchange short.
    pub fn error(&self, step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
        let (kind, socket) = (self.kind, self.socket.clone());
        let unresponsive = self.watchdog.fired();
        move |source| {
            if unresponsive {
                VhostUserError::Unresponsive { kind, socket, step }
            } else {
                VhostUserError::Handshake {
                    kind,
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
            tracing::warn!("cannot shut down the {} socket: {e}", self.kind);
        }
    }

    fn negotiate(&mut self, spec: &FrontendSpec) -> Result<(), VhostUserError> {
        self.frontend.set_owner().map_err(self.error("SET_OWNER"))?;
        self.features = self
            .frontend
            .get_features()
            .map_err(self.error("GET_FEATURES"))?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::NoProtocolFeatures {
                kind: self.kind,
                socket: self.socket.clone(),
            });
        }
        let offered = self
            .frontend
            .get_protocol_features()
            .map_err(self.error("GET_PROTOCOL_FEATURES"))?;
        if !offered.contains(spec.required_protocol) {
            return Err(VhostUserError::MissingProtocolFeature {
                kind: self.kind,
                socket: self.socket.clone(),
                missing: spec.required_protocol - offered,
                reason: spec.required_protocol_reason,
            });
        }
        self.protocol = offered & (spec.wanted_protocol | spec.required_protocol);
        self.frontend
            .set_protocol_features(self.protocol)
            .map_err(self.error("SET_PROTOCOL_FEATURES"))?;
        if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request is acknowledged, so a refusal is an error here instead
            // of a silent stall.
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            self.queue_count = self
                .frontend
                .get_queue_num()
                .map_err(self.error("GET_QUEUE_NUM"))?;
        }
        tracing::debug!(
            kind = self.kind,
            socket = %self.socket.display(),
            features = format_args!("{:#x}", self.features),
            protocol = ?self.protocol,
            queues = self.queue_count,
            "vhost-user backend connected"
        );
        Ok(())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Virtio features the backend offers.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Protocol features both sides use.
    pub fn protocol(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Queues the backend serves.
    pub fn queue_count(&self) -> u64 {
        self.queue_count
    }

    /// The socket's fd, to watch for the backend hanging up.
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// The first `size` bytes of the backend's device configuration (GET_CONFIG; needs the
    /// CONFIG protocol feature).
    pub fn get_config(&mut self, size: usize) -> Result<Vec<u8>, VhostUserError> {
        self.bounded(|c| {
            let (_, config) = c
                .frontend
                .get_config(
                    0,
                    size as u32,
                    VhostUserConfigFlags::empty(),
                    &vec![0; size],
                )
                .map_err(c.error("GET_CONFIG"))?;
            Ok(config)
        })
    }

    /// Writes device configuration bytes to the backend (SET_CONFIG).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), VhostUserError> {
        self.bounded(|c| {
            c.frontend
                .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
                .map_err(c.error("SET_CONFIG"))
        })
    }

    /// Hands the rings to the backend: features, the inflight region, memory table, then each ring's size, addresses (in this process's address space, as
    /// vhost-user wants), start index and eventfds; finally enables the rings marked
    /// enabled.
    pub fn start(
        &mut self,
        rings: &mut Rings,
        backend_features: u64,
        hooks: &dyn BackendHooks,
    ) -> Result<(), VhostUserError> {
        self.bounded(|c| c.hand_over_rings(rings, backend_features, hooks))
    }

    fn hand_over_rings(
        &mut self,
        rings: &mut Rings,
        backend_features: u64,
        hooks: &dyn BackendHooks,
    ) -> Result<(), VhostUserError> {
        let features = backend_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features)
            .map_err(self.error("SET_FEATURES"))?;
        self.set_inflight(rings, hooks);

        let mem = rings.mem.memory();
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| VhostUserError::NotSharedMemory)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.error("SET_MEM_TABLE"))?;

        for ring in &rings.queues {
            let i = usize::from(ring.index);
            let host = |addr: u64| {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| VhostUserError::RingOutsideMemory(ring.index))
            };
            let addresses = VringConfigData {
                queue_max_size: self.queue_size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: host(ring.desc)?,
                used_ring_addr: host(ring.used)?,
                avail_ring_addr: host(ring.avail)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, ring.size)
                .map_err(self.error("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &addresses)
                .map_err(self.error("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, ring.next_avail)
                .map_err(self.error("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &ring.call)
                .map_err(self.error("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &ring.kick)
                .map_err(self.error("SET_VRING_KICK"))?;
        }
        for ring in &rings.queues {
            self.frontend
                .set_vring_enable(usize::from(ring.index), ring.enabled)
                .map_err(self.error("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Shares the inflight region with the backend, creating it on the first start. Only
    /// when both sides use INFLIGHT_SHMFD (the device asked for it in its spec). Without
    /// one, reconnecting still works from the used index, so a refusal is only logged.
    fn set_inflight(&mut self, rings: &mut Rings, hooks: &dyn BackendHooks) {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return;
        }
        if rings.inflight.is_none() {
            let queues = hooks.inflight_queue_count(self);
            let ask = VhostUserInflight::new(0, 0, queues, self.queue_size);
            match self.frontend.get_inflight_fd(&ask) {
                Ok((info, file)) => rings.inflight = Some(Inflight { file, info }),
                Err(e) => {
                    tracing::warn!("{} backend has no inflight region: {e}", self.kind);
                    return;
                }
            }
        }
        if let Some(inflight) = &rings.inflight
            && let Err(e) = self
                .frontend
                .set_inflight_fd(&inflight.info, inflight.file.as_raw_fd())
        {
            tracing::warn!("{} backend refused the inflight region: {e}", self.kind);
        }
    }

    /// Starts or stops the backend's processing of one ring.
    pub fn set_ring_enabled(&mut self, index: u16, enabled: bool) -> Result<(), VhostUserError> {
        self.bounded(|c| {
            c.frontend
                .set_vring_enable(usize::from(index), enabled)
                .map_err(c.error("SET_VRING_ENABLE"))
        })
    }

    /// Stops every ring (VHOST_USER_GET_VRING_BASE) and records where each stopped.
    pub fn stop(&mut self, rings: &mut Rings) -> Result<(), VhostUserError> {
        self.bounded(|c| c.take_back_rings(rings))
    }

    fn take_back_rings(&mut self, rings: &mut Rings) -> Result<(), VhostUserError> {
        let mut result = Ok(());
        for ring in &mut rings.queues {
            let i = usize::from(ring.index);
            if let Err(e) = self.frontend.set_vring_enable(i, false) {
                result = Err(self.error("SET_VRING_ENABLE")(e));
            }
            match self.frontend.get_vring_base(i) {
                Ok(base) => ring.next_avail = base as u16,
                Err(e) => result = Err(self.error("GET_VRING_BASE")(e)),
            }
        }
        result
    }
}
