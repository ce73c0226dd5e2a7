//! The listening socket and the connection loop: one vhost-user daemon per VMM connection, so a
//! VMM that reconnects (after its own or our restart) gets a fresh device over the same image.
//!
//! The VMM's connection goes to a [`Relay`], which answers the inflight-region messages and
//! passes everything else to the daemon over a private socket: an abstract-namespace listener
//! with a random name (nothing on the file system to clean up), connected to before the daemon
//! accepts, so the daemon's one accept takes the relay's connection.

use std::io::Read;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{BackendError, BlkBackend};
use crate::config::{BackendConfig, ConfigError, Disk};
use crate::metrics::Metrics;
use crate::relay::{Relay, RelayError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("socket {0:?} is in use by a running process; stop it or pick another --socket")]
    SocketInUse(PathBuf),
    #[error("{0:?} exists and is not a socket; remove it or pick another --socket")]
    SocketPathNotSocket(PathBuf),
    #[error("cannot remove the stale socket {0:?}")]
    RemoveStaleSocket(PathBuf, #[source] std::io::Error),
    #[error("cannot listen on {0:?}; does its directory exist and is it writable?")]
    Listen(PathBuf, #[source] vhost::vhost_user::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot set up the signal handling thread")]
    Signals(#[source] std::io::Error),
    #[error("cannot register the io_uring completion eventfd with worker {0}")]
    RegisterCompletion(usize, #[source] std::io::Error),
    #[error("cannot accept a VMM connection")]
    Accept(#[source] vhost::vhost_user::Error),
    #[error("cannot set up the private socket between the relay and the daemon")]
    PrivateSocket(#[source] std::io::Error),
    #[error(transparent)]
    Relay(#[from] RelayError),
}

/// A bound vhost-user-blk server over one image.
pub struct Server {
    config: BackendConfig,
    disk: Disk,
    listener: Listener,
    socket: PathBuf,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Opens and checks the image, then listens on `socket` (replacing a stale socket file).
    pub fn bind(config: BackendConfig, socket: &Path) -> Result<Self, ServeError> {
        let disk = Disk::open(&config)?;
        claim_socket_path(socket)?;
        let listener =
            Listener::new(socket, false).map_err(|e| ServeError::Listen(socket.to_owned(), e))?;
        tracing::info!(
            image = ?config.image, size = disk.size, read_only = disk.read_only,
            queues = config.num_queues, socket = ?socket, "serving"
        );
        Ok(Self {
            config,
            disk,
            listener,
            socket: socket.to_owned(),
            metrics: Arc::new(Metrics::default()),
        })
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Accepts one VMM connection and serves it until the VMM disconnects.
    pub fn serve_connection(&mut self) -> Result<(), ServeError> {
        let backend = BlkBackend::new(
            &self.disk,
            self.config.num_queues,
            self.config.queue_size,
            self.config.serial.clone(),
            self.metrics.clone(),
        )?;
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new("ferrovirt-vhost-blk".to_owned(), backend.clone(), memory)
                .map_err(|e| ServeError::Daemon(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        for (queue, handler) in handlers.iter().enumerate() {
            let fd = backend
                .completion_fd(queue)
                .ok_or_else(|| ServeError::Daemon(format!("no worker for queue {queue}")))?;
            handler
                .register_listener(fd, EventSet::IN, backend.completion_event_id())
                .map_err(|e| ServeError::RegisterCompletion(queue, e))?;
        }
        let vmm = loop {
            match self.listener.accept() {
                Ok(Some(stream)) => break stream,
                Ok(None) => continue,
                Err(e) => return Err(ServeError::Accept(e)),
            }
        };
        let (mut private, daemon_side) = private_channel().map_err(ServeError::PrivateSocket)?;
        let relay = Relay::spawn(
            vmm,
            daemon_side,
            backend.inflight_limits(),
            backend.inflight_slot(),
        )?;
        let served = daemon.start(&mut private).and_then(|()| daemon.wait());
        drop(private);
        for handler in &handlers {
            handler.send_exit_event();
        }
        // The daemon's end is closed now, so both relay threads are finishing.
        relay.join();
        match served {
            Ok(()) => Ok(()),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => Ok(()),
            Err(e) => Err(ServeError::Daemon(e.to_string())),
        }
    }

    /// Serves connections one after another, forever (or one, with `once`).
    pub fn run(mut self, once: bool) -> Result<(), ServeError> {
        loop {
            match self.serve_connection() {
                Ok(()) => tracing::info!("VMM disconnected"),
                Err(e) => tracing::warn!(error = %e, "connection ended with an error"),
            }
            if once {
                return Ok(());
            }
        }
    }
}

/// A listener only this process knows the name of, and a connection to it waiting in its
/// backlog.
fn private_channel() -> std::io::Result<(Listener, UnixStream)> {
    let mut random = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let name: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let addr = SocketAddr::from_abstract_name(format!("ferrovirt-vhost-blk/{name}"))?;
    let listener = UnixListener::bind_addr(&addr)?;
    let stream = UnixStream::connect_addr(&addr)?;
    Ok((Listener::from(listener), stream))
}

/// SIGTERM, SIGINT and SIGHUP, blocked in the thread that created this and every thread it
/// starts later, so that one waiting thread takes them. Create it before any other thread.
pub struct TerminationSignals(SigSet);

impl TerminationSignals {
    pub fn block() -> Result<Self, ServeError> {
        let mut set = SigSet::empty();
        for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set.add(signal);
        }
        set.thread_block()
            .map_err(|e| ServeError::Signals(e.into()))?;
        Ok(Self(set))
    }

    /// Ends the process with status 128+N on one of the signals, after removing `sockets`
    /// (ours, once bound), so a stopped backend leaves no
    /// socket file behind.
    pub fn remove_on_signal(self, sockets: Vec<PathBuf>) -> Result<(), ServeError> {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let signal = self.0.wait().unwrap_or(Signal::SIGTERM);
                tracing::info!(?signal, "stopping");
                for socket in &sockets {
                    let _ = std::fs::remove_file(socket);
                }
                std::process::exit(128 + signal as i32);
            })
            .map(drop)
            .map_err(ServeError::Signals)
    }
}

/// Refuses a socket path a live server listens on or that is not a socket; removes a stale one.
fn claim_socket_path(socket: &Path) -> Result<(), ServeError> {
    let Ok(meta) = std::fs::symlink_metadata(socket) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::SocketPathNotSocket(socket.to_owned()));
    }
    if UnixStream::connect(socket).is_ok() {
        return Err(ServeError::SocketInUse(socket.to_owned()));
    }
    std::fs::remove_file(socket).map_err(|e| ServeError::RemoveStaleSocket(socket.to_owned(), e))
}
