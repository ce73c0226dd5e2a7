//! The device-facing side: one backend connection and the running rings, shared between
//! the device (activate, reset, ring switches) and the reconnect monitor.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::connection::{Connection, Rings};
use super::reconnect::Monitor;
use super::{BackendHooks, FrontendSpec, VhostUserError, VhostUserMetrics};

/// The connection and the running rings.
pub(super) struct Session {
    /// `None` while the backend is gone and the monitor is knocking.
    pub connection: Option<Connection>,
    /// The driver's rings from DRIVER_OK until reset, handed to every new connection.
    pub rings: Option<Rings>,
}

pub(super) struct Shared {
    pub socket: PathBuf,
    pub spec: FrontendSpec,
    pub hooks: Arc<dyn BackendHooks>,
    pub session: Mutex<Session>,
    pub metrics: Arc<VhostUserMetrics>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Session> {
        // A panic elsewhere while holding the lock leaves consistent data: every field is
        // replaced whole.
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `rings` to a fresh connection: the device's features, then the rings.
    pub fn start(
        &self,
        connection: &mut Connection,
        rings: &mut Rings,
    ) -> Result<(), VhostUserError> {
        let features = self.hooks.backend_features(connection, rings.features);
        connection.start(rings, features, self.hooks.as_ref())
    }
}

impl Session {
    /// Counts a failed request to the backend; one that timed out disconnects it, so the
    /// monitor redials it and hands it the rings as after a crash.
    pub fn backend_failed(&mut self, metrics: &VhostUserMetrics, error: &VhostUserError) {
        VhostUserMetrics::add(&metrics.backend_errors, 1);
        tracing::warn!("{error}");
        if error.is_unresponsive()
            && let Some(connection) = self.connection.take()
        {
            connection.abandon();
        }
    }
}

/// A vhost-user backend behind a socket, reconnected when it dies. Dropping it stops the
/// monitor thread and closes the connection.
pub struct VhostUserFrontend {
    shared: Arc<Shared>,
    _monitor: Monitor,
}

impl VhostUserFrontend {
    /// Connects to the backend on `socket`, negotiates, lets `hooks` check it, and starts
    /// the monitor that reconnects when it hangs up.
    pub fn connect(
        socket: impl AsRef<Path>,
        spec: FrontendSpec,
        hooks: Arc<dyn BackendHooks>,
        metrics: Arc<VhostUserMetrics>,
    ) -> Result<VhostUserFrontend, VhostUserError> {
        let socket = socket.as_ref().to_path_buf();
        let connection = Connection::connect(&socket, &spec)?;
        hooks.check(&connection)?;
        let shared = Arc::new(Shared {
            socket,
            spec,
            hooks,
            session: Mutex::new(Session {
                connection: Some(connection),
                rings: None,
            }),
            metrics,
        });
        let monitor = Monitor::spawn(shared.clone())?;
        Ok(VhostUserFrontend {
            shared,
            _monitor: monitor,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    pub fn metrics(&self) -> Arc<VhostUserMetrics> {
        self.shared.metrics.clone()
    }

    /// Whether the backend is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().connection.is_some()
    }

    /// Runs `f` on the live connection; `None` while the backend is away.
    pub fn with_connection<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> Option<T> {
        self.shared.lock().connection.as_mut().map(f)
    }

    /// Runs the request `f` on the live connection, for a running device (a config
    /// write): a failure is counted and a backend that did not answer is disconnected and
    /// redialled. `None` while the backend is away.
    pub fn request<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, VhostUserError>,
    ) -> Option<Result<T, VhostUserError>> {
        let mut session = self.shared.lock();
        let result = f(session.connection.as_mut()?);
        if let Err(e) = &result {
            session.backend_failed(&self.shared.metrics, e);
        }
        Some(result)
    }

    /// A handle for switching rings on and off from another thread (a control queue).
    pub fn ring_control(&self) -> RingControl {
        RingControl {
            shared: self.shared.clone(),
        }
    }

    /// Hands the driver's rings to the backend (DRIVER_OK). Without a backend right now,
    /// or with one that stopped answering, they are kept and go to the next one the
    /// monitor finds.
    pub fn activate(&self, mut rings: Rings) -> Result<(), VhostUserError> {
        let mut session = self.shared.lock();
        session.rings = None;
        match session.connection.as_mut() {
            Some(connection) => {
                if let Err(e) = self.shared.start(connection, &mut rings) {
                    if !e.is_unresponsive() {
                        VhostUserMetrics::add(&self.shared.metrics.backend_errors, 1);
                        return Err(e);
                    }
                    // Like a backend that is away: the rings start when one answers.
                    session.backend_failed(&self.shared.metrics, &e);
                }
            }
            None => tracing::warn!(
                socket = %self.shared.socket.display(),
                "{} backend is disconnected; the rings start when it is back",
                self.shared.spec.kind
            ),
        }
        session.rings = Some(rings);
        VhostUserMetrics::add(&self.shared.metrics.activations, 1);
        Ok(())
    }

    /// Takes the rings back from the backend (device reset) and forgets them.
    pub fn reset(&self) {
        let mut session = self.shared.lock();
        let Some(mut rings) = session.rings.take() else {
            return;
        };
        if let Some(connection) = session.connection.as_mut()
            && let Err(e) = connection.stop(&mut rings)
        {
            tracing::warn!("cannot stop the {} rings", self.shared.spec.kind);
            session.backend_failed(&self.shared.metrics, &e);
        }
        // Dropping the rings drops the inflight region too: a new driver starts clean.
    }
}

/// Switches rings of the running device on and off; the state survives reconnects.
#[derive(Clone)]
pub struct RingControl {
    shared: Arc<Shared>,
}

impl RingControl {
    /// Which inflight region the running rings hold (its file's inode), if any.
    #[cfg(test)]
    pub fn inflight_region(&self) -> Option<u64> {
        self.shared.lock().rings.as_ref()?.inflight_inode()
    }

    /// Enables or disables backend ring `index`. Recorded even while the backend is away,
    /// and replayed when it comes back.
    pub fn set_ring_enabled(&self, index: u16, enabled: bool) -> Result<(), VhostUserError> {
        let mut session = self.shared.lock();
        let session = &mut *session;
        let Some(rings) = session.rings.as_mut() else {
            return Err(VhostUserError::UnknownRing(index));
        };
        let Some(ring) = rings.queues.iter_mut().find(|r| r.index == index) else {
            return Err(VhostUserError::UnknownRing(index));
        };
        ring.enabled = enabled;
        let Some(connection) = session.connection.as_mut() else {
            return Ok(());
        };
        let result = connection.set_ring_enabled(index, enabled);
        if let Err(e) = &result {
            session.backend_failed(&self.shared.metrics, e);
        }
        result
    }
}
