//! Counters of the backend: requests by type, bytes moved, and errors by reason.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::request::{RejectReason, RequestType};

/// Counters shared by all queue workers of one backend. Relaxed atomics: they are statistics,
/// not synchronisation.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; RequestType::COUNT],
    rejected: [AtomicU64; RejectReason::COUNT],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    io_errors: AtomicU64,
    queue_errors: AtomicU64,
    io_submits: AtomicU64,
    io_ops_submitted: AtomicU64,
    resubmitted: AtomicU64,
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Requests seen, indexed by [`RequestType::index`].
    pub requests: [u64; RequestType::COUNT],
    /// Requests refused before any I/O, indexed by [`RejectReason::index`].
    pub rejected: [u64; RejectReason::COUNT],
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests whose I/O the kernel failed (or completed short).
    pub io_errors: u64,
    /// Virtqueues the guest broke (bad avail index, ...), so the worker stopped reading them.
    pub queue_errors: u64,
    /// io_uring_enter calls that submitted operations: one per batch of available chains.
    pub io_submits: u64,
    /// Operations those calls submitted.
    pub io_ops_submitted: u64,
    /// Requests a previous backend had taken and not answered, found in the inflight region
    /// and submitted again.
    pub resubmitted: u64,
}

impl MetricsSnapshot {
    pub fn requests_of(&self, kind: RequestType) -> u64 {
        self.requests[kind.index()]
    }

    pub fn rejected_for(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }

    pub fn total_rejected(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

impl Metrics {
    pub fn count_request(&self, kind: RequestType) {
        self.requests[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_rejected(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_bytes_read(&self, bytes: u64) {
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_bytes_written(&self, bytes: u64) {
        self.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn count_io_error(&self) {
        self.io_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_queue_error(&self) {
        self.queue_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_submit(&self, ops: usize) {
        self.io_submits.fetch_add(1, Ordering::Relaxed);
        self.io_ops_submitted
            .fetch_add(ops as u64, Ordering::Relaxed);
    }

    pub fn count_resubmitted(&self) {
        self.resubmitted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            requests: std::array::from_fn(|i| self.requests[i].load(Ordering::Relaxed)),
            rejected: std::array::from_fn(|i| self.rejected[i].load(Ordering::Relaxed)),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            io_errors: self.io_errors.load(Ordering::Relaxed),
            queue_errors: self.queue_errors.load(Ordering::Relaxed),
            io_submits: self.io_submits.load(Ordering::Relaxed),
            io_ops_submitted: self.io_ops_submitted.load(Ordering::Relaxed),
            resubmitted: self.resubmitted.load(Ordering::Relaxed),
        }
    }
}
