//! Regions written by hand, as a crashed backend would have left them.

use std::os::fd::FromRawFd;

use super::*;

const LIMITS: InflightLimits = InflightLimits {
    max_queues: 4,
    max_queue_size: 256,
};
const QUEUE_SIZE: u16 = 16;

/// A fresh region of two queues, its file (to write by hand) and the mapped area.
fn region() -> (File, Arc<InflightArea>) {
    let (file, info) = create_region(2, QUEUE_SIZE, &LIMITS).unwrap();
    let writer = file.try_clone().unwrap();
    let area = InflightArea::map(file, &info, &LIMITS).unwrap();
    (writer, Arc::new(area))
}

fn queue_base(queue: u16) -> u64 {
    (queue_region_len(QUEUE_SIZE) * usize::from(queue)) as u64
}

/// Marks `head` of queue 1 in flight with `counter`, as a backend that died would have.
fn mark(file: &File, head: u16, counter: u64) {
    let at = queue_base(1) + (QUEUE_HEADER_LEN + DESC_STATE_LEN * usize::from(head)) as u64;
    file.write_all_at(&[1], at).unwrap();
    file.write_all_at(&counter.to_le_bytes(), at + COUNTER as u64)
        .unwrap();
}

fn set_header(file: &File, last_batch_head: u16, used_idx: u16) {
    let base = queue_base(1);
    file.write_all_at(
        &last_batch_head.to_le_bytes(),
        base + LAST_BATCH_HEAD as u64,
    )
    .unwrap();
    file.write_all_at(&used_idx.to_le_bytes(), base + USED_IDX as u64)
        .unwrap();
}

fn inflight_byte(file: &File, head: u16) -> u8 {
    let at = queue_base(1) + (QUEUE_HEADER_LEN + DESC_STATE_LEN * usize::from(head)) as u64;
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    b[0]
}

#[test]
fn fresh_region_resubmits_nothing_and_continues_at_the_used_index() {
    let (_file, area) = region();
    let mut q = area.queue(0).unwrap();
    assert_eq!(
        q.recover(7, QUEUE_SIZE),
        Recovery {
            resubmit: vec![],
            next_avail: 7
        }
    );
}

#[test]
fn inflight_heads_are_resubmitted_in_counter_order_and_skipped_in_the_avail_ring() {
    let (file, area) = region();
    set_header(&file, 0, 40);
    mark(&file, 9, 12);
    mark(&file, 2, 10);
    mark(&file, 5, 11);
    let mut q = area.queue(1).unwrap();
    let r = q.recover(40, QUEUE_SIZE);
    assert_eq!(r.resubmit, vec![2, 5, 9]);
    assert_eq!(r.next_avail, 43);
    // Queue 0 is untouched by queue 1's state.
    assert!(
        area.queue(0)
            .unwrap()
            .recover(0, QUEUE_SIZE)
            .resubmit
            .is_empty()
    );
}

#[test]
fn a_batch_published_before_the_crash_cleared_its_marks_is_not_resubmitted() {
    // Crash after the used index became 41 and before head 5's mark was cleared and the
    // region's used_idx written: 5 was answered, 2 was not.
    let (file, area) = region();
    set_header(&file, 5, 40);
    mark(&file, 2, 1);
    mark(&file, 5, 2);
    let mut q = area.queue(1).unwrap();
    let r = q.recover(41, QUEUE_SIZE);
    assert_eq!(r.resubmit, vec![2]);
    assert_eq!(r.next_avail, 42);
    assert_eq!(inflight_byte(&file, 5), 0);
}

#[test]
fn a_batch_whose_used_index_was_not_published_is_resubmitted() {
    // Crash after last_batch_head was named and before the used index moved.
    let (file, area) = region();
    set_header(&file, 5, 40);
    mark(&file, 5, 2);
    let mut q = area.queue(1).unwrap();
    let r = q.recover(40, QUEUE_SIZE);
    assert_eq!(r.resubmit, vec![5]);
    assert_eq!(r.next_avail, 41);
}

#[test]
fn marks_beyond_the_ring_size_are_dropped() {
    let (file, area) = region();
    mark(&file, 3, 1);
    mark(&file, 12, 2);
    let mut q = area.queue(1).unwrap();
    let r = q.recover(0, 8);
    assert_eq!(r.resubmit, vec![3]);
    assert_eq!(r.next_avail, 1);
    assert_eq!(inflight_byte(&file, 12), 0);
}

#[test]
fn next_avail_wraps_around_the_u16_index() {
    let (file, area) = region();
    set_header(&file, 0, u16::MAX);
    mark(&file, 1, 1);
    mark(&file, 4, 2);
    let r = area.queue(1).unwrap().recover(u16::MAX, QUEUE_SIZE);
    assert_eq!(r.next_avail, 1);
}

#[test]
fn tracked_requests_survive_a_restart_and_new_ones_sort_after_them() {
    let (file, area) = region();
    let mut q = area.queue(1).unwrap();
    q.recover(0, QUEUE_SIZE);
    for head in [4, 1, 7] {
        q.begin(head);
    }
    // Head 1 answered as used entry 1.
    q.before_used(1);
    q.after_used(1, 1);
    drop(q);
    // A new backend maps the same file.
    let mut q = area.queue(1).unwrap();
    let r = q.recover(1, QUEUE_SIZE);
    assert_eq!(r.resubmit, vec![4, 7]);
    assert_eq!(r.next_avail, 3);
    assert_eq!(inflight_byte(&file, 1), 0);
    // A chain taken now is younger than the ones in flight before the restart.
    q.begin(0);
    q.begin(4);
    let r = area.queue(1).unwrap().recover(1, QUEUE_SIZE);
    assert_eq!(r.resubmit, vec![7, 0, 4]);
}

#[test]
fn out_of_range_heads_are_ignored_by_the_tracker() {
    let (_file, area) = region();
    let mut q = area.queue(1).unwrap();
    q.begin(QUEUE_SIZE);
    q.before_used(u16::MAX);
    q.after_used(u16::MAX, 1);
    let r = q.recover(1, QUEUE_SIZE);
    assert!(r.resubmit.is_empty());
    assert!(area.queue(2).is_none());
}

#[test]
fn geometry_beyond_the_limits_is_refused_before_allocating() {
    for (queues, size) in [(0, 16), (5, 16), (1, 0), (1, 257), (u16::MAX, u16::MAX)] {
        assert!(matches!(
            create_region(queues, size, &LIMITS),
            Err(InflightError::Geometry { .. })
        ));
    }
}

#[test]
fn a_region_smaller_than_its_queues_is_refused() {
    let (file, mut info) = create_region(2, QUEUE_SIZE, &LIMITS).unwrap();
    info.mmap_size -= 1;
    assert!(matches!(
        InflightArea::map(file.try_clone().unwrap(), &info, &LIMITS),
        Err(InflightError::TooSmall { .. })
    ));
    // Claiming more queues than the file holds.
    let (_, mut info) = create_region(2, QUEUE_SIZE, &LIMITS).unwrap();
    info.num_queues = 4;
    info.mmap_size = u64::MAX;
    assert!(matches!(
        InflightArea::map(file.try_clone().unwrap(), &info, &LIMITS),
        Err(InflightError::FileTooShort)
    ));
    info.num_queues = 2;
    info.mmap_offset = u64::MAX;
    assert!(matches!(
        InflightArea::map(file, &info, &LIMITS),
        Err(InflightError::FileTooShort)
    ));
}

#[test]
fn an_unsealed_file_is_refused() {
    // SAFETY: a NUL-terminated name; the fd is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(4096).unwrap();
    let info = VhostUserInflight::new(4096, 0, 1, QUEUE_SIZE);
    assert!(matches!(
        InflightArea::map(file, &info, &LIMITS),
        Err(InflightError::NotSealed)
    ));
}

#[test]
fn a_region_of_another_layout_version_is_refused() {
    let (file, info) = create_region(2, QUEUE_SIZE, &LIMITS).unwrap();
    file.write_all_at(&2u16.to_le_bytes(), queue_base(1) + VERSION as u64)
        .unwrap();
    assert!(matches!(
        InflightArea::map(file, &info, &LIMITS),
        Err(InflightError::Version(1, 2))
    ));
}

#[test]
fn created_regions_are_zeroed_sealed_and_aligned() {
    let (file, info) = create_region(3, 100, &LIMITS).unwrap();
    assert_eq!(info.mmap_offset, 0);
    assert_eq!(info.mmap_size, 3 * queue_region_len(100) as u64);
    assert_eq!(queue_region_len(100) % 64, 0);
    assert!(queue_region_len(100) >= 16 + 16 * 100);
    assert_eq!(file.metadata().unwrap().len(), info.mmap_size);
    assert!(file.set_len(1).is_err(), "the file can be shrunk");
}
