//! Reconnecting to a backend that went away: a thread watches the socket for a hang-up,
//! then knocks on the socket path until a backend answers, negotiates again, lets the
//! device check it, and hands it the running rings from the last used index (and the
//! inflight region, when the device asked for one). The guest sees a pause in I/O, not an
//! error.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::connection::Connection;
use super::frontend::Shared;
use super::{VhostUserError, VhostUserMetrics};

/// Time between connection attempts while the backend is away.
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// The watching thread; dropping it stops and joins it.
pub(super) struct Monitor {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    pub fn spawn(shared: Arc<Shared>) -> Result<Monitor, VhostUserError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(VhostUserError::EventFd)?;
        let thread_stop = stop.try_clone().map_err(VhostUserError::EventFd)?;
        let thread = std::thread::Builder::new()
            .name(shared.spec.kind.into())
            .spawn(move || watch(&shared, &thread_stop))
            .map_err(VhostUserError::Spawn)?;
        Ok(Monitor {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            tracing::error!("cannot stop the vhost-user monitor: {e}");
            return;
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the vhost-user monitor panicked");
        }
    }
}

/// What a wait ended with.
enum Woken {
    Stop,
    HangUp,
    Timeout,
}

/// Waits for `stop`, or a hang-up of `socket`, or `timeout`.
fn wait(stop: &EventFd, socket: Option<BorrowedFd<'_>>, timeout: PollTimeout) -> Woken {
    // SAFETY: the eventfd outlives this call (it is borrowed for its whole duration).
    let stop_fd = unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) };
    let mut fds = vec![PollFd::new(stop_fd, PollFlags::POLLIN)];
    if let Some(socket) = socket {
        // Replies to requests are POLLIN and not asked for; only the peer's end is.
        fds.push(PollFd::new(
            socket,
            PollFlags::from_bits_retain(libc::POLLRDHUP),
        ));
    }
    loop {
        match poll(&mut fds, timeout) {
            Ok(0) => return Woken::Timeout,
            Ok(_) => {
                if fds[0].any().unwrap_or(false) {
                    return Woken::Stop;
                }
                return Woken::HangUp;
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!("vhost-user monitor cannot poll, stopping: {e}");
                return Woken::Stop;
            }
        }
    }
}

fn watch(shared: &Shared, stop: &EventFd) {
    let kind = shared.spec.kind;
    loop {
        // Our own reference to the socket, so the wait does not race with the device
        // dropping the connection.
        let socket: Option<OwnedFd> = {
            let session = shared.lock();
            session.connection.as_ref().and_then(|c| {
                // SAFETY: the fd belongs to the connection's socket, alive while we hold
                // the lock.
                let fd = unsafe { BorrowedFd::borrow_raw(c.socket_fd()) };
                fd.try_clone_to_owned().ok()
            })
        };
        if let Some(socket) = &socket {
            match wait(stop, Some(socket.as_fd()), PollTimeout::NONE) {
                Woken::Stop => return,
                Woken::Timeout => continue,
                Woken::HangUp => {
                    shared.lock().connection = None;
                    VhostUserMetrics::add(&shared.metrics.disconnects, 1);
                    shared.hooks.connection_changed(false);
                    tracing::warn!(
                        socket = %shared.socket.display(),
                        "{kind} backend hung up; reconnecting"
                    );
                }
            }
        }
        drop(socket);
        if !reconnect(shared, stop) {
            return;
        }
    }
}

/// Knocks until a backend answers, fits the device and takes the rings; false if told to
/// stop.
fn reconnect(shared: &Shared, stop: &EventFd) -> bool {
    let kind = shared.spec.kind;
    let retry = PollTimeout::try_from(RETRY_INTERVAL).unwrap_or(PollTimeout::MAX);
    // A backend that does not fit is refused every RETRY_INTERVAL until it is replaced;
    // it is counted and logged once per outage, not ten times a second.
    let mut refused = false;
    loop {
        if let Woken::Stop = wait(stop, None, retry) {
            return false;
        }
        let mut connection = match Connection::connect(&shared.socket, &shared.spec) {
            Ok(connection) => connection,
            Err(e) => {
                tracing::debug!("{kind} backend not back yet: {e}");
                continue;
            }
        };
        if let Err(e) = shared.hooks.check(&connection) {
            if !refused {
                VhostUserMetrics::add(&shared.metrics.backend_errors, 1);
                tracing::warn!("refusing the new {kind} backend: {e}");
            }
            refused = true;
            continue;
        }
        let mut session = shared.lock();
        if let Some(rings) = session.rings.as_mut() {
            // Buffers the dead backend took but never returned are taken again; with an
            // inflight region, the new backend resubmits what it finds there instead.
            rings.rewind_to_used();
            if let Err(e) = shared.start(&mut connection, rings) {
                VhostUserMetrics::add(&shared.metrics.backend_errors, 1);
                tracing::warn!("the reconnected {kind} backend refused the rings: {e}");
                continue;
            }
            // Buffers the guest made available while no backend was there (and those the
            // last one took and never returned) must not wait for the guest's next kick,
            // which may never come. A spurious notification is harmless (virtio 1.2 §2.9).
            for ring in rings.queues.iter().filter(|r| r.enabled) {
                if let Err(e) = ring.kick.write(1) {
                    tracing::warn!(
                        queue = ring.index,
                        "cannot kick the reconnected {kind} backend: {e}"
                    );
                }
            }
        }
        session.connection = Some(connection);
        drop(session);
        VhostUserMetrics::add(&shared.metrics.reconnects, 1);
        shared.hooks.connection_changed(true);
        tracing::info!(socket = %shared.socket.display(), "{kind} backend reconnected");
        return true;
    }
}
