//! The relay between two socket pairs: a test "VMM" on one end, a test "daemon" on the other.

use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use super::*;

const LIMITS: InflightLimits = InflightLimits {
    max_queues: 2,
    max_queue_size: 256,
};

struct Harness {
    vmm: UnixStream,
    daemon: UnixStream,
    slot: InflightSlot,
    relay: Option<Relay>,
}

impl Harness {
    fn new() -> Self {
        let (vmm, relay_vmm) = UnixStream::pair().unwrap();
        let (daemon, relay_daemon) = UnixStream::pair().unwrap();
        for s in [&vmm, &daemon] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let slot = InflightSlot::default();
        let relay = Relay::spawn(relay_vmm, relay_daemon, LIMITS, slot.clone()).unwrap();
        Self {
            vmm,
            daemon,
            slot,
            relay: Some(relay),
        }
    }

    /// Both relay threads end, and both peers see the connection closed.
    fn assert_closed(mut self) {
        self.relay.take().unwrap().join();
        // End of stream, or a reset when the relay left bytes unread.
        assert!(!matches!(read_message(&self.vmm), Ok(Some(_))));
        assert!(!matches!(read_message(&self.daemon), Ok(Some(_))));
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        hang_up(&self.vmm, &self.daemon);
        if let Some(relay) = self.relay.take() {
            relay.join();
        }
    }
}

fn request(code: FrontendReq, flags: u32, body: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
    Message {
        request: u32::from(code),
        flags: VERSION_1 | flags,
        body,
        fds,
    }
}

fn memfd_with(content: &[u8]) -> File {
    // SAFETY: a NUL-terminated name; the fd is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(c"relay-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.write_all_at(content, 0).unwrap();
    file
}

fn read_fd(fd: OwnedFd) -> Vec<u8> {
    let mut file = File::from(fd);
    file.seek(SeekFrom::Start(0)).unwrap();
    let mut out = Vec::new();
    file.read_to_end(&mut out).unwrap();
    out
}

#[test]
fn requests_and_their_fds_pass_through_unchanged() {
    let h = Harness::new();
    let body: Vec<u8> = (0..200u8).collect();
    let fds = vec![
        OwnedFd::from(memfd_with(b"region zero")),
        OwnedFd::from(memfd_with(b"region one")),
    ];
    let sent = request(
        FrontendReq::SET_MEM_TABLE,
        FLAG_NEED_REPLY,
        body.clone(),
        fds,
    );
    write_message(&h.vmm, &sent).unwrap();
    let got = read_message(&h.daemon).unwrap().unwrap();
    assert_eq!(got.request, u32::from(FrontendReq::SET_MEM_TABLE));
    assert_eq!(got.flags, VERSION_1 | FLAG_NEED_REPLY);
    assert_eq!(got.body, body);
    let contents: Vec<Vec<u8>> = got.fds.into_iter().map(read_fd).collect();
    assert_eq!(
        contents,
        vec![b"region zero".to_vec(), b"region one".to_vec()]
    );
}

#[test]
fn replies_pass_back_unchanged() {
    let h = Harness::new();
    let reply = Message::reply_to(
        u32::from(FrontendReq::GET_FEATURES),
        0x1234_5678u64.to_le_bytes().to_vec(),
        Vec::new(),
    );
    write_message(&h.daemon, &reply).unwrap();
    let got = read_message(&h.vmm).unwrap().unwrap();
    assert_eq!(got.request, u32::from(FrontendReq::GET_FEATURES));
    assert_eq!(got.flags, VERSION_1 | FLAG_REPLY);
    assert_eq!(got.body, 0x1234_5678u64.to_le_bytes());
}

#[test]
fn a_body_larger_than_the_protocol_allows_closes_both_sides() {
    let h = Harness::new();
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&u32::from(FrontendReq::SET_MEM_TABLE).to_le_bytes());
    header[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    (&h.vmm).write_all(&header).unwrap();
    h.assert_closed();
}

#[test]
fn a_header_of_another_version_closes_both_sides() {
    let h = Harness::new();
    let m = Message {
        request: 1,
        flags: 0x2,
        body: vec![],
        fds: vec![],
    };
    write_message(&h.vmm, &m).unwrap();
    h.assert_closed();
}

#[test]
fn a_message_cut_short_closes_both_sides() {
    let h = Harness::new();
    let mut header = [0u8; HEADER_LEN];
    header[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    header[8..12].copy_from_slice(&100u32.to_le_bytes());
    (&h.vmm).write_all(&header).unwrap();
    (&h.vmm).write_all(&[0u8; 10]).unwrap();
    h.vmm.shutdown(Shutdown::Write).unwrap();
    h.assert_closed();
}

#[test]
fn more_descriptors_than_a_message_may_carry_close_both_sides() {
    let h = Harness::new();
    let fds = (0..MAX_FDS + 8)
        .map(|_| OwnedFd::from(memfd_with(b"x")))
        .collect();
    write_message(
        &h.vmm,
        &request(FrontendReq::SET_MEM_TABLE, 0, vec![0; 8], fds),
    )
    .unwrap();
    h.assert_closed();
}

fn inflight_body(info: VhostUserInflight) -> Vec<u8> {
    info.as_slice().to_vec()
}

#[test]
fn get_inflight_fd_is_answered_by_the_relay_with_a_zeroed_region() {
    let h = Harness::new();
    let ask = VhostUserInflight::new(0, 0, 2, 128);
    write_message(
        &h.vmm,
        &request(FrontendReq::GET_INFLIGHT_FD, 0, inflight_body(ask), vec![]),
    )
    .unwrap();
    let reply = read_message(&h.vmm).unwrap().unwrap();
    assert_eq!(reply.request, u32::from(FrontendReq::GET_INFLIGHT_FD));
    assert_eq!(reply.flags, VERSION_1 | FLAG_REPLY);
    let info = parse_inflight(&reply.body).unwrap();
    assert_eq!({ info.num_queues }, 2);
    assert_eq!(
        { info.mmap_size },
        2 * crate::inflight::queue_region_len(128) as u64
    );
    let [fd] = <[OwnedFd; 1]>::try_from(reply.fds).unwrap();
    assert_eq!(File::from(fd).metadata().unwrap().len(), { info.mmap_size });
    // The daemon never saw it: the next thing it reads is the next request.
    write_message(
        &h.vmm,
        &request(FrontendReq::GET_FEATURES, 0, vec![], vec![]),
    )
    .unwrap();
    let next = read_message(&h.daemon).unwrap().unwrap();
    assert_eq!(next.request, u32::from(FrontendReq::GET_FEATURES));
}

#[test]
fn get_inflight_fd_beyond_the_limits_is_refused_without_a_descriptor() {
    let h = Harness::new();
    for ask in [
        inflight_body(VhostUserInflight::new(0, 0, u16::MAX, u16::MAX)),
        vec![1, 2, 3],
    ] {
        write_message(
            &h.vmm,
            &request(FrontendReq::GET_INFLIGHT_FD, 0, ask, vec![]),
        )
        .unwrap();
        let reply = read_message(&h.vmm).unwrap().unwrap();
        assert!(reply.fds.is_empty());
        assert_eq!({ parse_inflight(&reply.body).unwrap().mmap_size }, 0);
    }
}

#[test]
fn set_inflight_fd_attaches_the_region_and_acks() {
    let h = Harness::new();
    let (file, info) = create_region(2, 64, &LIMITS).unwrap();
    let set = request(
        FrontendReq::SET_INFLIGHT_FD,
        FLAG_NEED_REPLY,
        inflight_body(info),
        vec![OwnedFd::from(file)],
    );
    write_message(&h.vmm, &set).unwrap();
    let ack = read_message(&h.vmm).unwrap().unwrap();
    assert_eq!(ack.body, 0u64.to_le_bytes());
    let area = h.slot.lock().unwrap().clone().unwrap();
    assert_eq!(area.num_queues(), 2);
}

#[test]
fn set_inflight_fd_with_a_bad_region_is_nacked_and_attaches_nothing() {
    let h = Harness::new();
    let (file, info) = create_region(2, 64, &LIMITS).unwrap();
    let cases = [
        // No descriptor.
        (inflight_body(info), vec![]),
        // Two descriptors.
        (
            inflight_body(info),
            vec![
                OwnedFd::from(file.try_clone().unwrap()),
                OwnedFd::from(file.try_clone().unwrap()),
            ],
        ),
        // A size that does not fit the queues.
        (
            inflight_body(VhostUserInflight::new(16, 0, 2, 64)),
            vec![OwnedFd::from(file.try_clone().unwrap())],
        ),
        // Not an inflight description at all.
        (vec![0; 7], vec![OwnedFd::from(file.try_clone().unwrap())]),
    ];
    for (body, fds) in cases {
        write_message(
            &h.vmm,
            &request(FrontendReq::SET_INFLIGHT_FD, FLAG_NEED_REPLY, body, fds),
        )
        .unwrap();
        let ack = read_message(&h.vmm).unwrap().unwrap();
        assert_eq!(ack.body, 1u64.to_le_bytes());
    }
    assert!(h.slot.lock().unwrap().is_none());
}

#[test]
fn set_vring_kick_is_forwarded_and_the_eventfd_kicked_once() {
    let h = Harness::new();
    let kick = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    // SAFETY: dup of an open eventfd; the new descriptor is checked and then owned.
    let raw = unsafe { libc::dup(kick.as_raw_fd()) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    write_message(
        &h.vmm,
        &request(
            FrontendReq::SET_VRING_KICK,
            0,
            0u64.to_le_bytes().to_vec(),
            vec![fd],
        ),
    )
    .unwrap();
    let got = read_message(&h.daemon).unwrap().unwrap();
    assert_eq!(got.request, u32::from(FrontendReq::SET_VRING_KICK));
    assert_eq!(got.fds.len(), 1);
    // The relay kicks after forwarding: the kick may land a moment after the message.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let count = loop {
        match kick.read() {
            Ok(count) => break count,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(std::time::Instant::now() < deadline, "never kicked");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => panic!("read the kick eventfd: {e}"),
        }
    };
    assert_eq!(count, 1, "kicked once");
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(kick.read().is_err(), "kicked only once");
}

#[test]
fn the_daemon_hanging_up_closes_the_vmm_connection() {
    let h = Harness::new();
    h.daemon.shutdown(Shutdown::Both).unwrap();
    h.relay_vmm_sees_eof();
}

impl Harness {
    fn relay_vmm_sees_eof(&self) {
        assert!(read_message(&self.vmm).unwrap().is_none());
    }
}
