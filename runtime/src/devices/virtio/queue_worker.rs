//! A thread for a virtqueue the VMM serves itself (virtio-rng, the virtio-net control queue):
//! it sleeps until the guest kicks the queue's ioeventfd, then lets the device process the
//! queue, until the device drops the worker.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const KICK_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;

/// What a device does when its queue is kicked.
pub trait QueueHandler: Send + 'static {
    /// Serves every available request; called once per wake-up, with the kick consumed.
    fn process_queue(&mut self);
}

/// The running thread; dropping it stops and joins the thread.
pub struct QueueWorker {
    name: String,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl QueueWorker {
    /// Starts thread `name` serving `handler` on each `kick`.
    pub fn spawn(
        name: &str,
        mut handler: impl QueueHandler,
        kick: EventFd,
    ) -> std::io::Result<QueueWorker> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (kick.as_raw_fd(), KICK_TOKEN),
            (stop.as_raw_fd(), STOP_TOKEN),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let thread_stop = stop.try_clone()?;
        let thread_name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&thread_name, &mut handler, &epoll, &kick, &thread_stop))?;
        Ok(QueueWorker {
            name: name.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            // Without the signal the join below would hang: leave the thread behind.
            tracing::error!("cannot stop the {} thread: {e}", self.name);
            return;
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the {} thread panicked", self.name);
        }
    }
}

fn run(name: &str, handler: &mut impl QueueHandler, epoll: &Epoll, kick: &EventFd, stop: &EventFd) {
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("the {name} thread cannot wait for events, stopping: {e}");
                return;
            }
        };
        for event in &events[..n] {
            match event.data() {
                STOP_TOKEN => {
                    let _ = stop.read();
                    return;
                }
                KICK_TOKEN => {
                    // EAGAIN only if someone else drained it; the queue tells the truth.
                    let _ = kick.read();
                    handler.process_queue();
                }
                _ => {}
            }
        }
    }
}
