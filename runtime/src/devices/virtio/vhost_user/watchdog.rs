//! Bounds how long one exchange with a vhost-user backend may take: a thread that shuts the
//! socket down (so the blocked recvmsg returns end-of-file and the monitor sees a hang-up)
//! when an armed deadline passes.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    deadline: Option<Instant>,
    fired: bool,
    stop: bool,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One per connection; dropping it stops and joins its thread.
pub(super) struct Watchdog {
    inner: Arc<Inner>,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Watches the socket `fd` (duplicated, so it outlives the caller's handle).
    pub fn spawn(fd: RawFd, timeout: Duration) -> std::io::Result<Watchdog> {
        // SAFETY: the caller's socket is open for the duration of this call.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let thread_inner = inner.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-watch".into())
            .spawn(move || watch(&thread_inner, &socket))?;
        Ok(Watchdog {
            inner,
            timeout,
            thread: Some(thread),
        })
    }

    /// Runs `exchange` with the deadline armed. Inside another bounded exchange (a device
    /// hook sending its own requests while the rings are handed over) the outer deadline
    /// stays, so the whole exchange is bounded, not each part.
    pub fn bounded<T>(&self, exchange: impl FnOnce() -> T) -> T {
        let outermost = {
            let mut state = self.inner.lock();
            let outermost = state.deadline.is_none();
            if outermost {
                state.deadline = Some(Instant::now() + self.timeout);
            }
            outermost
        };
        if !outermost {
            return exchange();
        }
        self.inner.changed.notify_all();
        let result = exchange();
        self.inner.lock().deadline = None;
        self.inner.changed.notify_all();
        result
    }

    /// Whether a deadline passed and the socket was shut down.
    pub fn fired(&self) -> bool {
        self.inner.lock().fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.inner.lock().stop = true;
        self.inner.changed.notify_all();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the vhost-user watchdog panicked");
        }
    }
}

fn watch(inner: &Inner, socket: &OwnedFd) {
    let mut state = inner.lock();
    loop {
        if state.stop {
            return;
        }
        state = match state.deadline {
            None => inner.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    state.fired = true;
                    state.deadline = None;
                    let how = nix::sys::socket::Shutdown::Both;
                    if let Err(e) = nix::sys::socket::shutdown(socket.as_raw_fd(), how) {
                        tracing::warn!("cannot shut down an unresponsive vhost-user socket: {e}");
                    }
                    continue;
                }
                inner
                    .changed
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn an_exchange_past_its_deadline_ends_with_the_socket_shut_down() {
        let (ours, _peer) = UnixStream::pair().unwrap();
        let dog = Watchdog::spawn(ours.as_raw_fd(), Duration::from_millis(100)).unwrap();
        let started = Instant::now();
        let got = dog.bounded(|| (&ours).read(&mut [0u8; 8]).unwrap());
        assert_eq!(got, 0, "end of file after the shutdown");
        assert!(dog.fired());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn an_exchange_within_its_deadline_leaves_the_socket_alone() {
        let (ours, peer) = UnixStream::pair().unwrap();
        let dog = Watchdog::spawn(ours.as_raw_fd(), Duration::from_millis(200)).unwrap();
        std::io::Write::write_all(&mut &peer, b"x").unwrap();
        dog.bounded(|| (&ours).read(&mut [0u8; 1]).unwrap());
        std::thread::sleep(Duration::from_millis(400));
        assert!(!dog.fired());
        std::io::Write::write_all(&mut &peer, b"y").unwrap();
        assert_eq!((&ours).read(&mut [0u8; 1]).unwrap(), 1);
    }

    #[test]
    fn a_nested_exchange_keeps_the_outer_deadline() {
        let (ours, _peer) = UnixStream::pair().unwrap();
        let dog = Watchdog::spawn(ours.as_raw_fd(), Duration::from_millis(300)).unwrap();
        let started = Instant::now();
        let got = dog.bounded(|| {
            // The inner exchange ends well before the deadline and must not disarm it.
            dog.bounded(|| std::thread::sleep(Duration::from_millis(50)));
            (&ours).read(&mut [0u8; 8]).unwrap()
        });
        assert_eq!(got, 0, "end of file after the shutdown");
        assert!(dog.fired());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
