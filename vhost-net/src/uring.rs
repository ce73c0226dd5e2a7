//! The io_uring of one queue pair: the TAP queue as registered file 0, TX frames written from
//! guest memory with writev, and RX reads kept armed into host buffers.
//!
//! RX uses *registered buffers* (IORING_REGISTER_BUFFERS + READ_FIXED), one read per buffer:
//! each buffer is owned by exactly one armed read or by one frame waiting for guest RX chains,
//! so the worker knows which frame is in which buffer and can stop reading simply by not
//! re-arming (the backpressure the guest needs when it has no RX buffers). Registration spares
//! the kernel pinning and mapping the pages on every read. A provided-buffer ring would let the
//! kernel pick buffers, which only pays off with many more reads in flight than frames waiting.
//!
//! Completions are announced on an eventfd registered with the ring, which the worker's
//! vhost-user-backend event loop watches.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, types};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Bytes of one RX buffer: a vnet header and the largest GSO frame, rounded to pages.
pub const RX_BUFFER_SIZE: usize = 17 * 4096;
/// User data bit of RX reads; the rest is the buffer index.
const RX_TAG: u64 = 1 << 63;
const CANCEL_TAG: u64 = 1 << 62;
const TAP: types::Fixed = types::Fixed(0);

#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("cannot create an io_uring; is io_uring enabled (sysctl kernel.io_uring_disabled)?")]
    CreateRing(#[source] std::io::Error),
    #[error("cannot register the TAP queue with the io_uring")]
    RegisterFile(#[source] std::io::Error),
    #[error("cannot register the RX buffers with the io_uring (RLIMIT_MEMLOCK?)")]
    RegisterBuffers(#[source] std::io::Error),
    #[error("cannot create or register the completion eventfd")]
    CompletionEventFd(#[source] std::io::Error),
    #[error("io_uring_enter failed")]
    Submit(#[source] std::io::Error),
}

/// A finished operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The write of the TX chain pushed with `tag`: bytes written or a negative errno.
    Tx { tag: u64, result: i32 },
    /// The read into RX buffer `buffer`: bytes read (header included) or a negative errno.
    Rx { buffer: usize, result: i32 },
}

/// A TX write the kernel owns; its iovec array must live until it completes.
struct TxOp {
    tag: u64,
    _iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovec array is never read through by this process, only kept alive for the
// kernel; the guest buffers it points to are pinned by the caller of `push_tx`.
unsafe impl Send for TxOp {}

pub struct TapRing {
    ring: IoUring,
    completion: EventFd,
    rx_memory: Vec<u8>,
    rx_count: usize,
    rx_armed: Vec<bool>,
    tx: Vec<Option<TxOp>>,
    tx_free: Vec<usize>,
    in_flight: usize,
    /// SQEs queued since the last submit.
    queued: usize,
}

impl TapRing {
    /// A ring on `tap` with `rx_buffers` registered RX buffers and room for `entries` SQEs.
    pub fn new(tap: &File, rx_buffers: usize, entries: u32) -> Result<Self, UringError> {
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .build(entries)
            .map_err(UringError::CreateRing)?;
        ring.submitter()
            .register_files(&[tap.as_raw_fd()])
            .map_err(UringError::RegisterFile)?;
        let mut rx_memory = vec![0u8; rx_buffers * RX_BUFFER_SIZE];
        let iovecs: Vec<libc::iovec> = rx_memory
            .chunks_exact_mut(RX_BUFFER_SIZE)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the buffers live in `rx_memory`, which is never resized and outlives the
        // ring (the ring is dropped first: see `Drop`, which also waits for every read).
        unsafe { ring.submitter().register_buffers(&iovecs) }
            .map_err(UringError::RegisterBuffers)?;
        let completion = EventFd::new(EFD_NONBLOCK).map_err(UringError::CompletionEventFd)?;
        ring.submitter()
            .register_eventfd(completion.as_raw_fd())
            .map_err(UringError::CompletionEventFd)?;
        Ok(Self {
            ring,
            completion,
            rx_memory,
            rx_count: rx_buffers,
            rx_armed: vec![false; rx_buffers],
            tx: Vec::new(),
            tx_free: Vec::new(),
            in_flight: 0,
            queued: 0,
        })
    }

    /// Readable when completions were posted.
    pub fn completion_fd(&self) -> RawFd {
        self.completion.as_raw_fd()
    }

    /// Clears the completion eventfd; call before reaping so later completions wake us again.
    pub fn clear_completion_event(&self) {
        // A non-blocking eventfd read only fails with EAGAIN when it was not signalled.
        let _ = self.completion.read();
    }

    pub fn rx_buffers(&self) -> usize {
        self.rx_count
    }

    pub fn rx_armed(&self, buffer: usize) -> bool {
        self.rx_armed.get(buffer).copied().unwrap_or(false)
    }

    /// The first `len` bytes of RX buffer `buffer` (what a completed read put there).
    pub fn rx_data(&self, buffer: usize, len: usize) -> &[u8] {
        let start = buffer * RX_BUFFER_SIZE;
        &self.rx_memory[start..start + len.min(RX_BUFFER_SIZE)]
    }

    /// TX writes not yet completed.
    pub fn tx_in_flight(&self) -> usize {
        self.tx.iter().filter(|t| t.is_some()).count()
    }

    /// Queues a read of one frame into RX buffer `buffer`.
    pub fn arm_rx(&mut self, buffer: usize) -> Result<(), UringError> {
        if buffer >= self.rx_count || self.rx_armed[buffer] {
            return Ok(());
        }
        let ptr = self.rx_memory[buffer * RX_BUFFER_SIZE..].as_mut_ptr();
        let entry = opcode::ReadFixed::new(TAP, ptr, RX_BUFFER_SIZE as u32, buffer as u16)
            .build()
            .user_data(RX_TAG | buffer as u64);
        self.rx_armed[buffer] = true;
        // SAFETY: the buffer is registered buffer `buffer`, owned by `self` and marked armed so
        // nothing reads it before its completion is reaped.
        unsafe { self.push(&entry) }
    }

    /// Queues a write of a frame (vnet header included) from guest buffers, to complete with
    /// `tag`. Nothing reaches the kernel before [`Self::submit`] unless the queue is full.
    ///
    /// # Safety
    /// The buffers the iovecs point to must stay mapped and unchanged until the completion for
    /// `tag` is returned by [`Self::reap`].
    pub unsafe fn push_tx(&mut self, tag: u64, iovecs: Vec<libc::iovec>) -> Result<(), UringError> {
        let slot = match self.tx_free.pop() {
            Some(slot) => slot,
            None => {
                self.tx.push(None);
                self.tx.len() - 1
            }
        };
        let entry = opcode::Writev::new(TAP, iovecs.as_ptr(), iovecs.len() as u32)
            .build()
            .user_data(slot as u64);
        self.tx[slot] = Some(TxOp {
            tag,
            _iovecs: iovecs,
        });
        // SAFETY: the iovec array is owned by `self.tx[slot]` until its completion is reaped;
        // the caller keeps the buffers valid.
        unsafe { self.push(&entry) }
    }

    /// # Safety
    /// Every buffer `entry` refers to must stay valid until its completion is reaped.
    unsafe fn push(&mut self, entry: &io_uring::squeue::Entry) -> Result<(), UringError> {
        self.in_flight += 1;
        self.queued += 1;
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Hands every queued operation to the kernel with one io_uring_enter; returns how many.
    pub fn submit(&mut self) -> Result<usize, UringError> {
        if self.ring.submission().is_empty() {
            return Ok(0);
        }
        self.ring.submit().map_err(UringError::Submit)?;
        Ok(std::mem::take(&mut self.queued))
    }

    /// Submits and blocks until something completes.
    pub fn submit_and_wait_one(&mut self) -> Result<(), UringError> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {
                self.queued = 0;
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(UringError::Submit(e)),
        }
    }

    /// Calls `f` for each finished operation.
    pub fn reap(&mut self, mut f: impl FnMut(Completion)) {
        while let Some(cqe) = self.ring.completion().next() {
            let data = cqe.user_data();
            if data == CANCEL_TAG {
                continue;
            }
            self.in_flight = self.in_flight.saturating_sub(1);
            if data & RX_TAG != 0 {
                let buffer = (data & !RX_TAG) as usize;
                if let Some(armed) = self.rx_armed.get_mut(buffer) {
                    *armed = false;
                    f(Completion::Rx {
                        buffer,
                        result: cqe.result(),
                    });
                }
                continue;
            }
            let slot = data as usize;
            let Some(op) = self.tx.get_mut(slot).and_then(Option::take) else {
                tracing::error!(slot, "io_uring completion for an unknown TX slot");
                continue;
            };
            self.tx_free.push(slot);
            f(Completion::Tx {
                tag: op.tag,
                result: cqe.result(),
            });
        }
    }
}

impl Drop for TapRing {
    /// Armed reads would write into `rx_memory` and TX writes read guest memory after we are
    /// gone: cancel everything and wait for the kernel to let go.
    fn drop(&mut self) {
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        // SAFETY: a cancel request refers to no buffer.
        let _ = unsafe { self.ring.submission().push(&cancel) };
        while self.in_flight > 0 {
            if self.submit_and_wait_one().is_err() {
                tracing::error!(in_flight = self.in_flight, "cannot drain the io_uring");
                // Leak the RX buffers rather than let the kernel write into freed memory.
                std::mem::forget(std::mem::take(&mut self.rx_memory));
                return;
            }
            self.reap(|_| {});
        }
    }
}
