//! A message relay between the VMM's vhost-user connection and the vhost-user daemon, so the
//! backend can answer GET_INFLIGHT_FD and SET_INFLIGHT_FD, which vhost-user-backend 0.24
//! refuses (and whose handler type it does not export).
//!
//! The relay reads whole vhost-user messages (12-byte header, at most [`MAX_BODY`] bytes of
//! body, at most [`MAX_FDS`] SCM_RIGHTS descriptors) and writes them unchanged to the other
//! side, except the two inflight messages, which it answers itself and never forwards. It
//! carries only the control channel: guest memory, rings and eventfds are shared by the
//! messages and used directly, so the data path never passes through it.
//!
//! One thread per direction; when either side closes or sends something that is not a
//! vhost-user message, both connections are shut down, which ends the daemon's session as a
//! VMM hang-up would.
//!
//! After forwarding SET_VRING_KICK the relay kicks that eventfd once: a restarted backend
//! must look at its ring (and resubmit what its predecessor had in flight) without waiting for
//! the guest's next notification, which may never come if the guest is waiting for exactly
//! those requests. virtio 1.2 §2.9 lets a device see spurious notifications.

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{FrontendReq, VhostUserInflight};
use vm_memory::ByteValued;

use crate::inflight::{InflightArea, InflightError, InflightLimits, create_region};

/// vhost-user spec: a message's payload is at most 4096 bytes (MAX_MSG_SIZE in `vhost`).
pub const MAX_BODY: usize = 0x1000;
/// Descriptors one message may carry (the memory table's maximum, as in `vhost`).
pub const MAX_FDS: usize = 32;
const HEADER_LEN: usize = 12;
/// Header flags (vhost-user spec, "Header"): version in bits 0-1, reply, need-reply.
const VERSION_MASK: u32 = 0x3;
const VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// SET_VRING_KICK payload: the index, and this bit when no fd is sent.
const VRING_NOFD_MASK: u64 = 0x100;

/// The region SET_INFLIGHT_FD attached, shared with the queue workers.
pub type InflightSlot = Arc<Mutex<Option<Arc<InflightArea>>>>;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot read from the vhost-user peer")]
    Read(#[source] std::io::Error),
    #[error("cannot write to the vhost-user peer")]
    Write(#[source] std::io::Error),
    #[error("a message has {0} body bytes, more than the {MAX_BODY} vhost-user allows")]
    BodyTooLarge(u32),
    #[error("a message header has version {0}, not 1")]
    Version(u32),
    #[error("a message carried more than {MAX_FDS} file descriptors")]
    TooManyFds,
    #[error("the peer closed the connection in the middle of a message")]
    Truncated,
    #[error("cannot start a relay thread")]
    Spawn(#[source] std::io::Error),
}

/// One vhost-user message as it travels.
#[derive(Debug)]
pub struct Message {
    pub request: u32,
    pub flags: u32,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&self.request.to_le_bytes());
        h[4..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..12].copy_from_slice(&(self.body.len() as u32).to_le_bytes());
        h
    }

    fn reply_to(request: u32, body: Vec<u8>, fds: Vec<OwnedFd>) -> Self {
        Self {
            request,
            flags: VERSION_1 | FLAG_REPLY,
            body,
            fds,
        }
    }
}

/// Reads one message; `None` when the peer closed the connection between messages.
pub fn read_message(stream: &UnixStream) -> Result<Option<Message>, RelayError> {
    let mut header = [0u8; HEADER_LEN];
    let (got, fds) = recv_with_fds(stream, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    // Descriptors come with the first byte; the rest of a header split by the kernel follows.
    let mut rest = stream;
    rest.read_exact(&mut header[got..])
        .map_err(|_| RelayError::Truncated)?;
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    if flags & VERSION_MASK != VERSION_1 {
        return Err(RelayError::Version(flags & VERSION_MASK));
    }
    if size as usize > MAX_BODY {
        return Err(RelayError::BodyTooLarge(size));
    }
    let mut body = vec![0u8; size as usize];
    rest.read_exact(&mut body)
        .map_err(|_| RelayError::Truncated)?;
    Ok(Some(Message {
        request,
        flags,
        body,
        fds,
    }))
}

/// recvmsg(2) into `buf` with room for [`MAX_FDS`] descriptors. Descriptors received are
/// owned (and so closed) even when the message is refused for carrying too many.
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), RelayError> {
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; (MAX_FDS * 4 + 64) / 8];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr is a valid "no name, no buffers" value; fields set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `msg` points at `iov` (covering `buf`) and `control`, all alive and
        // writable for the duration of the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RelayError::Read(e));
        }
        let mut fds = Vec::new();
        // SAFETY: the kernel filled `msg.msg_control` with `msg_controllen` bytes of cmsgs;
        // CMSG_FIRSTHDR/NXTHDR stay within them and each SCM_RIGHTS payload is an array of
        // descriptors now installed in this process, which we take ownership of exactly once.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..payload / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
            return Err(RelayError::TooManyFds);
        }
        return Ok((n as usize, fds));
    }
}

/// Writes `message` whole, its descriptors attached to the first byte.
pub fn write_message(stream: &UnixStream, message: &Message) -> Result<(), RelayError> {
    let header = message.header();
    let raw: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = if raw.is_empty() {
        Vec::new()
    } else {
        vec![nix::sys::socket::ControlMessage::ScmRights(&raw)]
    };
    let iov = [IoSlice::new(&header), IoSlice::new(&message.body)];
    let sent = loop {
        match nix::sys::socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            &cmsgs,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(RelayError::Write(e.into())),
        }
    };
    let mut whole = Vec::with_capacity(HEADER_LEN + message.body.len());
    whole.extend_from_slice(&header);
    whole.extend_from_slice(&message.body);
    if sent < whole.len() {
        let mut rest = stream;
        rest.write_all(&whole[sent..]).map_err(RelayError::Write)?;
    }
    Ok(())
}

/// The two relay threads of one connection.
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` (the VMM) and `daemon` until either closes.
    pub fn spawn(
        frontend: UnixStream,
        daemon: UnixStream,
        limits: InflightLimits,
        slot: InflightSlot,
    ) -> Result<Self, RelayError> {
        let clone = |s: &UnixStream| s.try_clone().map_err(RelayError::Spawn);
        let to_frontend = Arc::new(Mutex::new(clone(&frontend)?));
        let (f1, d1) = (clone(&frontend)?, clone(&daemon)?);
        let (f2, d2) = (frontend, daemon);
        let replies = to_frontend.clone();
        let upstream = std::thread::Builder::new()
            .name("vhost-relay-up".into())
            .spawn(move || {
                if let Err(e) = relay_requests(&f1, &d1, &replies, &limits, &slot) {
                    tracing::warn!(error = %e, "closing the VMM connection");
                }
                hang_up(&f1, &d1);
            })
            .map_err(RelayError::Spawn)?;
        let downstream = std::thread::Builder::new()
            .name("vhost-relay-down".into())
            .spawn(move || {
                if let Err(e) = relay_replies(&d2, &to_frontend) {
                    tracing::warn!(error = %e, "closing the VMM connection");
                }
                hang_up(&f2, &d2);
            })
            .map_err(RelayError::Spawn)?;
        Ok(Self {
            threads: vec![upstream, downstream],
        })
    }

    /// Waits for both directions to end.
    pub fn join(self) {
        for t in self.threads {
            if t.join().is_err() {
                tracing::error!("a vhost-user relay thread panicked");
            }
        }
    }
}

fn hang_up(frontend: &UnixStream, daemon: &UnixStream) {
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = daemon.shutdown(Shutdown::Both);
}

fn send_to_frontend(to: &Mutex<UnixStream>, message: &Message) -> Result<(), RelayError> {
    // One writer at a time, so a reply of ours never lands inside one of the daemon's.
    let stream = to.lock().unwrap_or_else(PoisonError::into_inner);
    write_message(&stream, message)
}

/// VMM → daemon: forwards requests, answering the inflight ones.
fn relay_requests(
    frontend: &UnixStream,
    daemon: &UnixStream,
    to_frontend: &Mutex<UnixStream>,
    limits: &InflightLimits,
    slot: &InflightSlot,
) -> Result<(), RelayError> {
    let get = u32::from(FrontendReq::GET_INFLIGHT_FD);
    let set = u32::from(FrontendReq::SET_INFLIGHT_FD);
    let kick = u32::from(FrontendReq::SET_VRING_KICK);
    while let Some(message) = read_message(frontend)? {
        if message.request == get {
            let reply = answer_get_inflight(&message, limits);
            send_to_frontend(to_frontend, &reply)?;
        } else if message.request == set {
            let result = attach_inflight(message.body.as_slice(), message.fds, limits, slot);
            if message.flags & FLAG_NEED_REPLY != 0 {
                let status = u64::from(result.is_err());
                let ack = Message::reply_to(set, status.to_le_bytes().to_vec(), Vec::new());
                send_to_frontend(to_frontend, &ack)?;
            }
        } else {
            write_message(daemon, &message)?;
            if message.request == kick {
                kick_once(&message);
            }
        }
    }
    Ok(())
}

/// daemon → VMM: forwards replies.
fn relay_replies(daemon: &UnixStream, to_frontend: &Mutex<UnixStream>) -> Result<(), RelayError> {
    while let Some(message) = read_message(daemon)? {
        send_to_frontend(to_frontend, &message)?;
    }
    Ok(())
}

fn parse_inflight(body: &[u8]) -> Option<VhostUserInflight> {
    let mut info = VhostUserInflight::default();
    let dest = info.as_mut_slice();
    if body.len() != dest.len() {
        return None;
    }
    dest.copy_from_slice(body);
    Some(info)
}

/// GET_INFLIGHT_FD: a fresh zeroed region. A refused request is answered with an empty
/// description and no descriptor, which frontends report as an error.
fn answer_get_inflight(request: &Message, limits: &InflightLimits) -> Message {
    let get = u32::from(FrontendReq::GET_INFLIGHT_FD);
    let created = match parse_inflight(&request.body) {
        Some(ask) => create_region(ask.num_queues, ask.queue_size, limits),
        None => Err(InflightError::TooSmall {
            given: request.body.len() as u64,
            needed: std::mem::size_of::<VhostUserInflight>() as u64,
        }),
    };
    match created {
        Ok((file, info)) => {
            tracing::debug!(
                queues = info.num_queues,
                queue_size = info.queue_size,
                "created the inflight region"
            );
            Message::reply_to(get, info.as_slice().to_vec(), vec![OwnedFd::from(file)])
        }
        Err(e) => {
            tracing::warn!(error = %e, "refusing GET_INFLIGHT_FD");
            let empty = VhostUserInflight::default();
            Message::reply_to(get, empty.as_slice().to_vec(), Vec::new())
        }
    }
}

/// SET_INFLIGHT_FD: maps the frontend's region for the queues that start next.
fn attach_inflight(
    body: &[u8],
    mut fds: Vec<OwnedFd>,
    limits: &InflightLimits,
    slot: &InflightSlot,
) -> Result<(), ()> {
    let (Some(info), 1) = (parse_inflight(body), fds.len()) else {
        tracing::warn!(
            fds = fds.len(),
            body = body.len(),
            "malformed SET_INFLIGHT_FD"
        );
        return Err(());
    };
    let file = File::from(fds.remove(0));
    match InflightArea::map(file, &info, limits) {
        Ok(area) => {
            tracing::debug!(?area, "attached the inflight region");
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(area));
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "refusing SET_INFLIGHT_FD");
            Err(())
        }
    }
}

/// Signals the kick eventfd a SET_VRING_KICK carried (see the module comment).
fn kick_once(message: &Message) {
    let Some(payload) = message.body.get(..8) else {
        return;
    };
    let mut word = [0u8; 8];
    word.copy_from_slice(payload);
    if u64::from_le_bytes(word) & VRING_NOFD_MASK != 0 {
        return;
    }
    if let [fd] = message.fds.as_slice() {
        // An eventfd adds the 8-byte value to its counter; the daemon reads and resets it.
        let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
