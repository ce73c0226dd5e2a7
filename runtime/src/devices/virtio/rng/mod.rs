//! virtio-rng (device ID 4): random bytes from a host file into device-writable guest
//! buffers, served by one worker thread per activated device.

mod device;
mod metrics;
mod worker;

pub use device::Rng;
pub use metrics::RngMetrics;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot open the entropy source {path:?}; does it exist and is it readable?")]
    OpenSource {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot duplicate the entropy source file descriptor for the worker")]
    CloneSource(#[source] std::io::Error),
    #[error("cannot start the virtio-rng worker thread")]
    Worker(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use virtio_bindings::virtio_ring::{
        VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::testing::*;

    const QUEUE_AT: u64 = 0x1_0000;
    const BUFFERS: u64 = 0x10_0000;
    const CODE: u64 = 0x1000;
    const APIC_VECTOR: u8 = 0x45;
    const ALL_OK: u8 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

    fn count(c: &AtomicU64) -> u64 {
        RngMetrics::get(c)
    }

    /// Publishes `heads` in the avail ring.
    fn offer(q: &DriverQueue<'_>, heads: &[u16]) {
        let start = q.avail.idx().load();
        for (i, head) in heads.iter().enumerate() {
            let slot = (usize::from(start) + i) % 16;
            q.avail.ring().ref_at(slot).unwrap().store(*head);
        }
        q.avail.idx().store(start.wrapping_add(heads.len() as u16));
    }

    /// Drives the device to DRIVER_OK with queue 0 (16 entries) on vector 1.
    fn start(d: &TestDriver, q: &DriverQueue<'_>, features: u64) {
        d.route_vector(1, APIC_VECTOR);
        assert!(d.negotiate(features));
        d.setup_queue(0, 16, q.rings, 1);
        d.set_status(ALL_OK);
        assert_eq!(d.status(), ALL_OK);
    }

    fn rng() -> (Box<Rng>, Arc<RngMetrics>) {
        let rng = Rng::new(Rng::DEFAULT_SOURCE).unwrap();
        let metrics = rng.metrics();
        (Box::new(rng), metrics)
    }

    use std::sync::Arc;

    #[test]
    fn a_guest_kick_is_answered_with_random_bytes_and_an_msi() {
        let (rng, metrics) = rng();
        let mut d = TestDriver::new(rng);
        let guest = d.guest();
        let q = DriverQueue::new(&guest, QUEUE_AT, 16);
        q.desc
            .store(0, desc(BUFFERS, 64, VRING_DESC_F_WRITE, 0))
            .unwrap();
        offer(&q, &[0]);
        // As Linux does: with VIRTIO_RING_F_EVENT_IDX.
        start(&d, &q, VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(count(&metrics.activations), 1);

        // The guest writes the queue's notify address: KVM's ioeventfd takes it, the
        // vCPU goes on to the port write without a trip to userspace.
        let mut code = vec![0xa3]; // mov [moffs32], eax
        code.extend_from_slice(&((d.bar0 + NOTIFY) as u32).to_le_bytes());
        code.extend_from_slice(&[0xe6, 0xf4]); // out 0xf4, al
        guest.write_slice(&code, GuestAddress(CODE)).unwrap();
        assert_eq!(d.vm.run_protected(CODE), "io-out 0xf4");

        assert!(d.wait_for(|| q.used.idx().load() == 1), "no used entry");
        let used = q.used.ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 64));
        let mut bytes = [0u8; 64];
        guest.read_slice(&mut bytes, GuestAddress(BUFFERS)).unwrap();
        assert!(
            bytes.iter().any(|b| *b != 0),
            "the buffer holds random bytes"
        );
        assert!(d.vm.wait_lapic_irr(APIC_VECTOR), "queue vector delivered");
        let avail_event: u16 = guest
            .read_obj(GuestAddress(q.rings[2] + 4 + 8 * 16))
            .unwrap();
        assert_eq!(
            avail_event, 1,
            "the device asks to be kicked for entry 1 on"
        );
        assert_eq!(d.read(ISR, 1), 1, "queue interrupt in the ISR");
        assert_eq!(count(&metrics.requests), 1);
        assert_eq!(count(&metrics.bytes), 64);
        assert_eq!(count(&metrics.errors), 0);
    }

    #[test]
    fn hostile_descriptors_are_answered_without_panic() {
        let (rng, metrics) = rng();
        let d = TestDriver::new(rng);
        let guest = d.guest();
        let q = DriverQueue::new(&guest, QUEUE_AT, 16);
        let table = &q.desc;
        // 0: device-readable. 1: outside guest memory. 2: runs past the end of RAM.
        // 3 -> 4: a readable descriptor chained to a writable one.
        table.store(0, desc(BUFFERS, 32, 0, 0)).unwrap();
        table
            .store(1, desc(MEM_SIZE + 0x1000, 32, VRING_DESC_F_WRITE, 0))
            .unwrap();
        table
            .store(2, desc(MEM_SIZE - 16, 64, VRING_DESC_F_WRITE, 0))
            .unwrap();
        table
            .store(3, desc(BUFFERS, 8, VRING_DESC_F_NEXT, 4))
            .unwrap();
        table
            .store(4, desc(BUFFERS + 8, 8, VRING_DESC_F_WRITE, 0))
            .unwrap();
        // 200 is no descriptor of a 16-entry queue.
        offer(&q, &[0, 1, 2, 3, 200]);
        start(&d, &q, VERSION_1);
        // Kick through the MMIO bus: the path taken when no ioeventfd is registered.
        d.write(NOTIFY, 2, 0);

        assert!(d.wait_for(|| q.used.idx().load() == 4), "answers missing");
        let lens: Vec<(u32, u32)> = (0..4)
            .map(|i| q.used.ring().ref_at(i).unwrap().load())
            .map(|e| (e.id(), e.len()))
            .collect();
        assert_eq!(lens, vec![(0, 0), (1, 0), (2, 16), (3, 8)]);
        assert!(d.wait_for(|| count(&metrics.errors) == 4));
        assert_eq!(count(&metrics.requests), 4);
        assert_eq!(count(&metrics.bytes), 24);
    }

    #[test]
    fn an_avail_index_too_far_ahead_does_not_spin_the_worker() {
        let (rng, metrics) = rng();
        let d = TestDriver::new(rng);
        let guest = d.guest();
        let q = DriverQueue::new(&guest, QUEUE_AT, 16);
        start(&d, &q, VERSION_1);
        q.avail.idx().store(100);
        d.write(NOTIFY, 2, 0);
        assert!(d.wait_for(|| count(&metrics.errors) == 1));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            count(&metrics.errors),
            1,
            "one error per kick, no busy loop"
        );
        d.set_status(0);
        assert_eq!(d.status(), 0, "the worker still stops");
    }

    #[test]
    fn reset_stops_the_worker_and_a_new_driver_starts_clean() {
        let (rng, metrics) = rng();
        let d = TestDriver::new(rng);
        let guest = d.guest();
        let q = DriverQueue::new(&guest, QUEUE_AT, 16);
        q.desc
            .store(0, desc(BUFFERS, 16, VRING_DESC_F_WRITE, 0))
            .unwrap();
        start(&d, &q, VERSION_1);
        d.set_status(0);
        assert_eq!(d.status(), 0);
        offer(&q, &[0]);
        d.write(NOTIFY, 2, 0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            q.used.idx().load(),
            0,
            "a reset device does not serve requests"
        );

        // The same rings again: used and avail indices restart from 0.
        q.avail.idx().store(0);
        offer(&q, &[0]);
        start(&d, &q, VERSION_1);
        d.write(NOTIFY, 2, 0);
        assert!(d.wait_for(|| q.used.idx().load() == 1));
        assert_eq!(count(&metrics.activations), 2);
        assert_eq!(count(&metrics.requests), 1);
    }

    #[test]
    fn a_missing_entropy_source_is_a_clear_error() {
        let err = Rng::new("/nonexistent/entropy").err().unwrap();
        assert!(matches!(err, RngError::OpenSource { ref path, .. } if path.ends_with("entropy")));
        assert!(err.to_string().contains("/nonexistent/entropy"));
    }
}
