//! Returns requests to the used ring in the order the guest made them available, for
//! frontends that did not attach an inflight region (libblkio, or a VMM without
//! INFLIGHT_SHMFD); with a region, [`crate::inflight`] makes out-of-order completion safe.
//!
//! io_uring completes out of order; publishing in order keeps the used index an exact count of
//! a prefix of the available ring. A VMM that reconnects after this backend died restarts the
//! ring at the used index (what the runtime's vhost-user-blk frontend does), and then every
//! request taken but never answered is taken again, and none that was answered is: the
//! reconnect loses and repeats nothing (block reads and writes are idempotent).

use std::collections::BTreeMap;

/// Completions waiting for the requests made available before them.
#[derive(Debug, Default)]
pub struct CompletionOrder {
    next_sequence: u64,
    next_release: u64,
    waiting: BTreeMap<u64, UsedEntry>,
}

/// What goes into the used ring for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedEntry {
    pub head: u16,
    pub len: u32,
}

impl CompletionOrder {
    /// The sequence number of the next chain taken from the available ring.
    pub fn take(&mut self) -> u64 {
        let s = self.next_sequence;
        self.next_sequence += 1;
        s
    }

    /// Records that the request taken as `sequence` completed.
    pub fn complete(&mut self, sequence: u64, entry: UsedEntry) {
        self.waiting.insert(sequence, entry);
    }

    /// The entries that may be published now, in order.
    pub fn release(&mut self) -> impl Iterator<Item = UsedEntry> + '_ {
        std::iter::from_fn(move || {
            let entry = self.waiting.remove(&self.next_release)?;
            self.next_release += 1;
            Some(entry)
        })
    }

    /// Requests taken and not yet released.
    pub fn outstanding(&self) -> u64 {
        self.next_sequence - self.next_release
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever order completions arrive in, entries come out once each, in taken order,
        /// and never before every earlier request completed.
        #[test]
        fn releases_in_taken_order(order in Just((0u16..64).collect::<Vec<_>>()).prop_shuffle()) {
            let mut c = CompletionOrder::default();
            for _ in 0..order.len() {
                c.take();
            }
            let mut released = Vec::new();
            let mut completed = std::collections::BTreeSet::new();
            for &i in &order {
                c.complete(u64::from(i), UsedEntry { head: i, len: u32::from(i) });
                completed.insert(i);
                for e in c.release() {
                    released.push(e.head);
                }
                // Released is exactly the longest completed prefix.
                let prefix = (0u16..).take_while(|k| completed.contains(k)).count();
                prop_assert_eq!(released.len(), prefix);
            }
            prop_assert_eq!(released, (0u16..64).collect::<Vec<_>>());
            prop_assert_eq!(c.outstanding(), 0);
        }
    }
}
