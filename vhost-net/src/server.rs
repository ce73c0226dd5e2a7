//! The listening socket and the connection loop: one vhost-user daemon per VMM connection, so a
//! VMM that reconnects (after its own or our restart) gets a fresh device on the same TAP.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{BackendError, NetBackend};
use crate::config::{BackendConfig, ConfigError};
use crate::metrics::{Metrics, MetricsError, serve_metrics};
use crate::tap::{Tap, TapError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
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
}

/// A bound vhost-user-net server over one TAP.
pub struct Server {
    config: BackendConfig,
    tap: Arc<Tap>,
    listener: Listener,
    socket: PathBuf,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Opens the TAP queues, then listens on `socket` (replacing a stale socket file) and, if
    /// configured, serves metrics.
    pub fn bind(config: BackendConfig, socket: &Path) -> Result<Self, ServeError> {
        claim_socket_path(socket)?;
        let tap = Tap::open(&config.tap, config.queue_pairs)?;
        let listener =
            Listener::new(socket, false).map_err(|e| ServeError::Listen(socket.to_owned(), e))?;
        let metrics = Arc::new(Metrics::default());
        if let Some(path) = &config.metrics_socket {
            serve_metrics(path, metrics.clone())?;
        }
        tracing::info!(
            tap = %tap.name, pairs = config.queue_pairs, socket = ?socket, "serving"
        );
        Ok(Self {
            config,
            tap: Arc::new(tap),
            listener,
            socket: socket.to_owned(),
            metrics,
        })
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The socket files this server created.
    pub fn sockets(&self) -> Vec<PathBuf> {
        let metrics = self.config.metrics_socket.clone();
        std::iter::once(self.socket.clone())
            .chain(metrics)
            .collect()
    }

    /// Accepts one VMM connection and serves it until the VMM disconnects.
    pub fn serve_connection(&mut self) -> Result<(), ServeError> {
        let backend = NetBackend::new(
            self.tap.clone(),
            self.config.queue_size,
            self.config.mtu,
            self.metrics.clone(),
        )?;
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new("ferrovirt-vhost-net".to_owned(), backend.clone(), memory)
                .map_err(|e| ServeError::Daemon(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        for (pair, handler) in handlers.iter().enumerate() {
            let fd = backend
                .completion_fd(pair)
                .ok_or_else(|| ServeError::Daemon(format!("no worker for pair {pair}")))?;
            handler
                .register_listener(fd, EventSet::IN, backend.completion_event_id())
                .map_err(|e| ServeError::RegisterCompletion(pair, e))?;
        }
        let served = daemon.start(&mut self.listener).and_then(|()| {
            self.metrics.count_connection();
            daemon.wait()
        });
        for handler in &handlers {
            handler.send_exit_event();
        }
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
    /// (ours, once bound: the vhost-user and metrics sockets), so a stopped backend leaves no
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
