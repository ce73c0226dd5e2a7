//! Counters of the backend (frames and bytes each way, drops by reason) and the control socket
//! that serves them: a connection gets one JSON object and is closed.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::frame::DropReason;

/// Counters shared by all workers and connections. Relaxed atomics: statistics, not
/// synchronisation.
#[derive(Debug, Default)]
pub struct Metrics {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_dropped: [AtomicU64; DropReason::COUNT],
    tx_dropped: [AtomicU64; DropReason::COUNT],
    tx_submits: AtomicU64,
    connections: AtomicU64,
}

/// A point-in-time copy of [`Metrics`], as the control socket serves it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MetricsSnapshot {
    /// Frames delivered to guest RX chains, and their bytes (headers excluded).
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames the TAP accepted from guest TX chains, and their bytes (headers excluded).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Dropped RX chains or frames by [`DropReason::name`].
    pub rx_dropped: BTreeMap<String, u64>,
    /// Dropped TX chains by [`DropReason::name`].
    pub tx_dropped: BTreeMap<String, u64>,
    /// io_uring_enter calls that submitted TX writes: one per kick batch.
    pub tx_submits: u64,
    /// VMM connections served so far.
    pub connections: u64,
}

impl MetricsSnapshot {
    pub fn rx_dropped_for(&self, reason: DropReason) -> u64 {
        self.rx_dropped.get(reason.name()).copied().unwrap_or(0)
    }

    pub fn tx_dropped_for(&self, reason: DropReason) -> u64 {
        self.tx_dropped.get(reason.name()).copied().unwrap_or(0)
    }
}

impl Metrics {
    pub fn count_rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_rx_drop(&self, reason: DropReason) {
        self.rx_dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_tx_drop(&self, reason: DropReason) {
        self.tx_dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_tx_submit(&self) {
        self.tx_submits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let by_reason = |counters: &[AtomicU64; DropReason::COUNT]| {
            DropReason::ALL
                .iter()
                .map(|r| {
                    (
                        r.name().to_owned(),
                        counters[r.index()].load(Ordering::Relaxed),
                    )
                })
                .collect()
        };
        MetricsSnapshot {
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            rx_dropped: by_reason(&self.rx_dropped),
            tx_dropped: by_reason(&self.tx_dropped),
            tx_submits: self.tx_submits.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on the metrics socket {0:?}; does its directory exist?")]
    Listen(PathBuf, #[source] std::io::Error),
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

/// Serves `metrics` on `path` from a thread of its own, for the life of the process.
pub fn serve_metrics(path: &Path, metrics: Arc<Metrics>) -> Result<(), MetricsError> {
    // A socket file left by an earlier run is stale: we hold the vhost-user socket, so no other
    // instance serves this one.
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(path);
    }
    let listener =
        UnixListener::bind(path).map_err(|e| MetricsError::Listen(path.to_owned(), e))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let body = serde_json::to_vec(&metrics.snapshot()).unwrap_or_default();
                if let Err(e) = stream.write_all(&body) {
                    tracing::debug!(error = %e, "metrics client went away");
                }
            }
        })
        .map_err(MetricsError::Thread)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_metrics_socket_serves_one_json_object_per_connection() {
        let dir = ferrovirt_tests::ScratchDir::new("net-metrics").unwrap();
        let path = dir.join("m.sock");
        let metrics = Arc::new(Metrics::default());
        metrics.count_tx(100);
        metrics.count_rx_drop(DropReason::OutsideMemory);
        serve_metrics(&path, metrics.clone()).unwrap();
        for expected_tx in [1, 2] {
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            let snap: MetricsSnapshot = serde_json::from_str(&body).unwrap();
            assert_eq!(snap.tx_packets, expected_tx);
            assert_eq!(snap.rx_dropped_for(DropReason::OutsideMemory), 1);
            assert_eq!(snap.tx_dropped_for(DropReason::OutsideMemory), 0);
            metrics.count_tx(1);
        }
    }
}
