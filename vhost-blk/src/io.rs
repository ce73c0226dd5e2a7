//! The io_uring engine of one queue worker: one ring, the image as registered file 0, and an
//! eventfd the kernel signals when completions are posted.
//!
//! Requests are queued with [`IoEngine::push`] and handed to the kernel together by one
//! [`IoEngine::submit`] per batch; completions come back by tag through [`IoEngine::reap`].

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, types};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot create an io_uring; is io_uring enabled (sysctl kernel.io_uring_disabled)?")]
    CreateRing(#[source] std::io::Error),
    #[error("cannot register the image file with the io_uring")]
    RegisterFile(#[source] std::io::Error),
    #[error("cannot create or register the completion eventfd")]
    CompletionEventFd(#[source] std::io::Error),
    #[error("io_uring_enter failed")]
    Submit(#[source] std::io::Error),
    #[error("a request has {0} buffers, more than IOV_MAX")]
    TooManyBuffers(usize),
}

/// One operation on the image file.
#[derive(Debug)]
pub enum IoOp {
    /// Read into the buffers of `iovecs` from byte `offset`.
    Readv {
        offset: u64,
        iovecs: Vec<libc::iovec>,
    },
    /// Write the buffers of `iovecs` at byte `offset`.
    Writev {
        offset: u64,
        iovecs: Vec<libc::iovec>,
    },
    /// fdatasync(2).
    Flush,
    /// fallocate(2) with `mode` (punch hole or zero range, keeping the size).
    Fallocate { offset: u64, len: u64, mode: i32 },
}

/// An operation handed to the kernel; its iovec array must live until it completes.
struct InFlightOp {
    tag: u64,
    _iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovec array is only kept alive here, never read or written through by this
// process; the buffers it points to are owned by the guest and pinned by the caller (see `push`),
// so moving the array to another thread is sound.
unsafe impl Send for InFlightOp {}

const IMAGE: types::Fixed = types::Fixed(0);

pub struct IoEngine {
    ring: IoUring,
    completion: EventFd,
    ops: Vec<Option<InFlightOp>>,
    free: Vec<usize>,
    in_flight: usize,
}

impl IoEngine {
    /// A ring of `entries` submission slots on `image`.
    pub fn new(image: &File, entries: u32) -> Result<Self, IoError> {
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .build(entries)
            .map_err(IoError::CreateRing)?;
        ring.submitter()
            .register_files(&[image.as_raw_fd()])
            .map_err(IoError::RegisterFile)?;
        let completion = EventFd::new(EFD_NONBLOCK).map_err(IoError::CompletionEventFd)?;
        ring.submitter()
            .register_eventfd(completion.as_raw_fd())
            .map_err(IoError::CompletionEventFd)?;
        Ok(Self {
            ring,
            completion,
            ops: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        })
    }

    /// Readable when completions were posted; register it with the worker's event loop.
    pub fn completion_fd(&self) -> RawFd {
        self.completion.as_raw_fd()
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `op`, to complete with `tag`. Nothing reaches the kernel before [`Self::submit`],
    /// unless the submission queue is full, which submits what is queued first.
    ///
    /// # Safety
    /// The buffers the iovecs of `op` point to must stay mapped, and not be used by anyone else
    /// in a conflicting way, until the completion for `tag` is returned by [`Self::reap`].
    pub unsafe fn push(&mut self, tag: u64, op: IoOp) -> Result<(), IoError> {
        let (entry, iovecs) = match op {
            IoOp::Readv { offset, iovecs } => {
                let count = iov_count(&iovecs)?;
                let e = opcode::Readv::new(IMAGE, iovecs.as_ptr(), count)
                    .offset(offset)
                    .build();
                (e, iovecs)
            }
            IoOp::Writev { offset, iovecs } => {
                let count = iov_count(&iovecs)?;
                let e = opcode::Writev::new(IMAGE, iovecs.as_ptr(), count)
                    .offset(offset)
                    .build();
                (e, iovecs)
            }
            IoOp::Flush => (
                opcode::Fsync::new(IMAGE)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                Vec::new(),
            ),
            IoOp::Fallocate { offset, len, mode } => (
                opcode::Fallocate::new(IMAGE, len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
                Vec::new(),
            ),
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.ops.push(None);
                self.ops.len() - 1
            }
        };
        let entry = entry.user_data(slot as u64);
        self.ops[slot] = Some(InFlightOp {
            tag,
            _iovecs: iovecs,
        });
        self.in_flight += 1;
        loop {
            // SAFETY: the entry's iovec array is owned by `self.ops[slot]` until the completion
            // is reaped, and the caller guarantees the buffers it points to stay valid.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Hands every queued operation to the kernel with one io_uring_enter.
    pub fn submit(&mut self) -> Result<usize, IoError> {
        if self.ring.submission().is_empty() {
            return Ok(0);
        }
        self.ring.submit().map_err(IoError::Submit)
    }

    /// Submits what is queued and blocks until at least one operation completed.
    pub fn submit_and_wait_one(&mut self) -> Result<(), IoError> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(IoError::Submit(e)),
        }
    }

    /// Clears the completion eventfd before reaping, so a completion posted during the reap
    /// wakes the worker again.
    pub fn clear_completion_event(&self) {
        // A non-blocking eventfd read only fails with EAGAIN when it was not signalled.
        let _ = self.completion.read();
    }

    /// Calls `f(tag, result)` for each completed operation; `result` is the kernel's return value
    /// (bytes moved, or a negative errno).
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) {
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                return;
            };
            let slot = cqe.user_data() as usize;
            let Some(op) = self.ops.get_mut(slot).and_then(Option::take) else {
                tracing::error!(slot, "io_uring completion for an unknown slot");
                continue;
            };
            self.free.push(slot);
            self.in_flight -= 1;
            f(op.tag, cqe.result());
        }
    }
}

impl Drop for IoEngine {
    /// The kernel may still be moving data to or from buffers whose iovecs and mappings the
    /// owner is about to free: wait for every operation first.
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if self.submit_and_wait_one().is_err() {
                tracing::error!(
                    in_flight = self.in_flight,
                    "cannot wait for io_uring operations"
                );
                return;
            }
            self.reap(|_, _| {});
        }
    }
}

fn iov_count(iovecs: &[libc::iovec]) -> Result<u32, IoError> {
    match u32::try_from(iovecs.len()) {
        Ok(n) if n as usize <= libc::UIO_MAXIOV as usize => Ok(n),
        _ => Err(IoError::TooManyBuffers(iovecs.len())),
    }
}
