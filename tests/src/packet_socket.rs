//! AF_PACKET sockets on one interface of a network namespace: see every frame it sends and
//! receives (with the 802.1Q tag the kernel took out of the frame), write frames out of it one
//! at a time, or blast one frame in `sendmmsg` bursts for throughput benchmarks.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::names::run_in_netns;

/// linux/if_packet.h: `tp_status` bit saying `tp_vlan_tci` holds a tag.
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const VLAN_VID_MASK: u16 = 0x0fff;

/// One frame read from a [`PacketSocket`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFrame {
    /// The frame as the stack holds it: an 802.1Q tag the kernel parsed is not in here but
    /// in `vlan`.
    pub data: Vec<u8>,
    /// The VLAN id of the tag the frame carried on the wire.
    pub vlan: Option<u16>,
    /// The interface sent it (rather than received it).
    pub outgoing: bool,
}

/// An AF_PACKET socket bound to one interface of a network namespace.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// A socket that sees every frame the interface sends or receives (`ETH_P_ALL`) and can
    /// send. Opened from a thread that joins `netns` (setns only moves the calling thread);
    /// the socket stays in that namespace after the thread ends.
    pub fn open(netns: &str, interface: &str) -> io::Result<PacketSocket> {
        let socket = PacketSocket::open_with_protocol(netns, interface, libc::ETH_P_ALL as u16)?;
        socket.set_option(libc::SOL_PACKET, libc::PACKET_AUXDATA, 1)?;
        Ok(socket)
    }

    /// A socket that only sends: it receives nothing (protocol 0), and its frames bypass the
    /// qdisc, so a full device queue drops them instead of blocking the sender.
    pub fn open_sender(netns: &str, interface: &str) -> io::Result<PacketSocket> {
        let socket = PacketSocket::open_with_protocol(netns, interface, 0)?;
        socket.set_option(libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)?;
        Ok(socket)
    }

    fn open_with_protocol(
        netns: &str,
        interface: &str,
        ethertype: u16,
    ) -> io::Result<PacketSocket> {
        let netns_path = Path::new("/run/netns").join(netns);
        let interface = std::ffi::CString::new(interface).map_err(io::Error::other)?;
        run_in_netns(&netns_path, || -> io::Result<PacketSocket> {
            let protocol = ethertype.to_be();
            // SAFETY: plain socket(2); the result is checked and owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(protocol),
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: a NUL-terminated name; returns 0 when there is no such link.
            let index = unsafe { libc::if_nametoindex(interface.as_ptr()) };
            if index == 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: an all-zero sockaddr_ll is a valid value of this C struct.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = index as i32;
            // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(PacketSocket { fd })
        })?
    }

    fn set_option(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: setsockopt with a c_int value of the size passed.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends one whole Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: the buffer is valid for `frame.len()` bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `frame` in `sendmmsg` bursts of `burst` until `stop`; returns how many frames the
    /// kernel took. A full queue (EAGAIN, ENOBUFS) makes it yield and go on.
    pub fn send_bursts_until(
        &self,
        frame: &[u8],
        burst: usize,
        stop: &AtomicBool,
    ) -> io::Result<u64> {
        let mut iov = libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        };
        // SAFETY: an all-zero mmsghdr is a valid value of this C struct.
        let mut msgs: Vec<libc::mmsghdr> = (0..burst.max(1))
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for m in &mut msgs {
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: every message points at `iov`, which points at `frame`; both outlive
            // the call, and the kernel only reads them.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    msgs.len() as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                sent += n as u64;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINTR) => {
                    std::thread::yield_now()
                }
                _ => return Err(e),
            }
        }
        Ok(sent)
    }

    /// Reads frames until one satisfies `wanted` or `timeout` passes.
    pub fn receive_matching(
        &self,
        timeout: Duration,
        mut wanted: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        self.receive_frame_matching(timeout, |f| wanted(&f.data))
            .map(|f| f.data)
    }

    /// Reads frames, with their VLAN tag and direction, until one satisfies `wanted` or
    /// `timeout` passes.
    pub fn receive_frame_matching(
        &self,
        timeout: Duration,
        mut wanted: impl FnMut(&ReceivedFrame) -> bool,
    ) -> Option<ReceivedFrame> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, count 1.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if ready <= 0 {
                continue;
            }
            if let Some(frame) = self.receive_one(&mut buf)
                && wanted(&frame)
            {
                return Some(frame);
            }
        }
    }

    /// Every frame that arrives within `window` and satisfies `wanted`.
    pub fn collect_matching(
        &self,
        window: Duration,
        mut wanted: impl FnMut(&ReceivedFrame) -> bool,
    ) -> Vec<ReceivedFrame> {
        let deadline = Instant::now() + window;
        let mut frames = Vec::new();
        while let Some(f) = self.receive_frame_matching(
            deadline.saturating_duration_since(Instant::now()),
            &mut wanted,
        ) {
            frames.push(f);
        }
        frames
    }

    /// One non-blocking recvmsg with its PACKET_AUXDATA and source address.
    fn receive_one(&self, buf: &mut [u8]) -> Option<ReceivedFrame> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut control = [0u64; 16];
        // SAFETY: an all-zero sockaddr_ll and msghdr are valid values of these C structs.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut from).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: every pointer in `msg` is valid for the length given with it.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n <= 0 {
            return None;
        }
        let mut vlan = None;
        // SAFETY: `msg` was filled by recvmsg; the CMSG_* macros walk its control buffer
        // within msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is non-null and inside the control buffer (CMSG_FIRSTHDR/NXTHDR).
            let header = unsafe { &*cmsg };
            if header.cmsg_level == libc::SOL_PACKET && header.cmsg_type == libc::PACKET_AUXDATA {
                // SAFETY: the kernel put a tpacket_auxdata behind this header; read_unaligned
                // copes with the data's alignment.
                let aux: libc::tpacket_auxdata =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                if aux.tp_status & TP_STATUS_VLAN_VALID != 0 {
                    vlan = Some(aux.tp_vlan_tci & VLAN_VID_MASK);
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        Some(ReceivedFrame {
            data: buf[..n as usize].to_vec(),
            vlan,
            outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
        })
    }
}
