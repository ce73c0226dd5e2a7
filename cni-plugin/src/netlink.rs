//! A small blocking rtnetlink client: links (look up, rename, move between namespaces, MTU,
//! MAC, up/down, delete), addresses, routes and SR-IOV VF attributes on a PF.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkFlags, LinkMessage, LinkVfInfo,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::addressing::{IpPrefix, MacAddress};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket (are we root?)")]
    Open(#[source] io::Error),
    #[error("netlink I/O failed during {op}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} failed")]
    Kernel {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot decode the kernel's netlink reply to {op}: {detail}")]
    Decode { op: String, detail: String },
    #[error("cannot enter the network namespace to open a netlink socket there")]
    EnterNetns(#[source] io::Error),
    #[error("cannot start the thread that opens a netlink socket in another namespace")]
    Thread(#[source] io::Error),
}

impl NetlinkError {
    /// The errno the kernel answered with, if this is a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// What we read of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<MacAddress>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// SR-IOV VF attributes, when asked for and the link is a PF.
    pub vfs: Vec<LinkVfInfo>,
}

/// Changes to one link, applied by one RTM_SETLINK.
#[derive(Debug, Default)]
pub struct LinkChange<'a> {
    pub name: Option<&'a str>,
    pub mac: Option<MacAddress>,
    pub mtu: Option<u32>,
    pub up: Option<bool>,
    /// Moves the link into the namespace of this file (a /proc/*/ns/net or /run/netns/* file).
    pub netns: Option<&'a File>,
}

/// One rtnetlink socket, bound to the namespace it was opened in.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Open)?;
        socket.bind_auto().map_err(NetlinkError::Open)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Open)?;
        Ok(Netlink {
            socket,
            sequence: 0,
        })
    }

    /// A socket in the namespace of `netns`: a short-lived thread enters it and opens the
    /// socket, which stays bound to that namespace while our own threads never leave ours.
    pub fn open_in(netns: &File) -> Result<Netlink, NetlinkError> {
        let netns = netns.try_clone().map_err(NetlinkError::EnterNetns)?;
        std::thread::Builder::new()
            .name("netns-netlink".into())
            .spawn(move || {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetlinkError::EnterNetns(e.into()))?;
                Netlink::open()
            })
            .map_err(NetlinkError::Thread)?
            .join()
            .unwrap_or_else(|_| {
                Err(NetlinkError::Thread(io::Error::other(
                    "the netns thread panicked",
                )))
            })
    }

    /// The link called `name`, or `None` when there is none.
    pub fn link(&mut self, name: &str, with_vfs: bool) -> Result<Option<Link>, NetlinkError> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        self.get_link(message, with_vfs, &format!("looking up link {name:?}"))
    }

    /// The link with index `index`, or `None` when there is none.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        self.get_link(message, false, &format!("looking up link #{index}"))
    }

    fn get_link(
        &mut self,
        mut message: LinkMessage,
        with_vfs: bool,
        op: &str,
    ) -> Result<Option<Link>, NetlinkError> {
        if with_vfs {
            message
                .attributes
                .push(LinkAttribute::ExtMask(vec![LinkExtentMask::Vf]));
        }
        match self.request(RouteNetlinkMessage::GetLink(message), 0, op) {
            Ok(replies) => Ok(replies.into_iter().find_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(parse_link(link)),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Applies `change` to link `index`. Renaming needs the link down; the caller orders that.
    pub fn set_link(&mut self, index: u32, change: &LinkChange<'_>) -> Result<(), NetlinkError> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        if let Some(up) = change.up {
            message.header.change_mask = LinkFlags::Up;
            if up {
                message.header.flags = LinkFlags::Up;
            }
        }
        if let Some(name) = change.name {
            message
                .attributes
                .push(LinkAttribute::IfName(name.to_owned()));
        }
        if let Some(mac) = change.mac {
            message
                .attributes
                .push(LinkAttribute::Address(mac.octets().to_vec()));
        }
        if let Some(mtu) = change.mtu {
            message.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(netns) = change.netns {
            message
                .attributes
                .push(LinkAttribute::NetNsFd(netns.as_raw_fd()));
        }
        self.request(
            RouteNetlinkMessage::SetLink(message),
            0,
            &format!("changing link #{index} ({change:?})"),
        )
        .map(|_| ())
    }

    /// Sets one VF's attributes through its PF (`ip link set PF vf N ...`).
    pub fn set_vf(&mut self, pf_index: u32, vf: LinkVfInfo) -> Result<(), NetlinkError> {
        let op = format!("setting VF attributes {vf:?} on PF #{pf_index}");
        let mut message = LinkMessage::default();
        message.header.index = pf_index;
        message.attributes.push(LinkAttribute::VfInfoList(vec![vf]));
        self.request(RouteNetlinkMessage::SetLink(message), 0, &op)
            .map(|_| ())
    }

    /// Deletes link `index` and returns once the kernel has unlisted it: its name and index
    /// are free and it is gone from every listing (the RTM_DELLINK notification). The rest of
    /// the unregistration, RCU barriers that take ~20 ms on a small VM, finishes in a forked
    /// child that nobody waits for, so a CNI DEL does not sit through it. A link that is
    /// already gone is fine.
    pub fn delete_link_unlisted(&mut self, index: u32) -> Result<(), NetlinkError> {
        let op = format!("deleting link #{index}");
        let io_err = |source| NetlinkError::Io {
            op: op.clone(),
            source,
        };
        // Subscribed before the delete is sent, so its notification cannot be missed.
        let mut monitor = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Open)?;
        monitor
            .bind(&SocketAddr::new(0, libc::RTMGRP_LINK as u32))
            .map_err(NetlinkError::Open)?;
        monitor.set_non_blocking(true).map_err(NetlinkError::Open)?;
        let mut message = LinkMessage::default();
        message.header.index = index;
        let (request, _) = self.encode(RouteNetlinkMessage::DelLink(message), 0);
        let devnull = File::options()
            .write(true)
            .open("/dev/null")
            .map_err(io_err)?;
        // SAFETY: the child runs `delete_in_child`, which makes only async-signal-safe system
        // calls on memory that fork copied (`request`), never allocating or taking a lock
        // another thread of ours may have held at the fork; it ends in `_exit`.
        let child = match unsafe { nix::unistd::fork() }.map_err(|e| io_err(e.into()))? {
            nix::unistd::ForkResult::Child => delete_in_child(&request, devnull.as_raw_fd()),
            nix::unistd::ForkResult::Parent { child } => child,
        };
        drop(devnull);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
            match waitpid(child, Some(WaitPidFlag::WNOHANG)).map_err(|e| io_err(e.into()))? {
                WaitStatus::Exited(_, 0 | libc::ENODEV) => return Ok(()),
                WaitStatus::Exited(_, code) if code < CHILD_FAILED => {
                    return Err(NetlinkError::Kernel {
                        op,
                        source: io::Error::from_raw_os_error(code),
                    });
                }
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    return Err(io_err(io::Error::other(
                        "the child process sending the request failed",
                    )));
                }
                _ => {}
            }
            if std::time::Instant::now() > deadline {
                return Err(io_err(io::Error::from(io::ErrorKind::TimedOut)));
            }
            let mut poll = libc::pollfd {
                fd: monitor.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut poll, 1, 20) } > 0 && self.unlisted(&mut monitor, index)? {
                return Ok(());
            }
        }
    }

    /// Deletes link `index` and waits for the kernel to finish unregistering it, for a caller
    /// that must leave no process behind; gone already is fine.
    pub fn delete_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        match self.request(
            RouteNetlinkMessage::DelLink(message),
            0,
            &format!("deleting link #{index}"),
        ) {
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Reads what `monitor` has queued: true when it says link `index` was deleted. When the
    /// queue overflowed (notifications were dropped), asks the kernel instead.
    fn unlisted(&mut self, monitor: &mut Socket, index: u32) -> Result<bool, NetlinkError> {
        loop {
            match monitor.recv_from_full() {
                Ok((data, _)) => {
                    let deleted = messages(&data).any(|bytes| {
                        matches!(
                            NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes),
                            Ok(NetlinkMessage {
                                payload: NetlinkPayload::InnerMessage(
                                    RouteNetlinkMessage::DelLink(link)
                                ),
                                ..
                            }) if link.header.index == index
                        )
                    });
                    if deleted {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Ok(self.link_by_index(index)?.is_none());
                }
                Err(source) => {
                    return Err(NetlinkError::Io {
                        op: "reading link notifications".into(),
                        source,
                    });
                }
            }
        }
    }

    /// Adds `prefix` to link `index`; an address already there is fine.
    pub fn add_address(&mut self, index: u32, prefix: IpPrefix) -> Result<(), NetlinkError> {
        let mut message = AddressMessage::default();
        message.header.family = family(prefix.addr);
        message.header.prefix_len = prefix.len;
        message.header.index = index;
        message
            .attributes
            .push(AddressAttribute::Local(prefix.addr));
        message
            .attributes
            .push(AddressAttribute::Address(prefix.addr));
        match self.request(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("adding address {prefix} to link #{index}"),
        ) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// The addresses of link `index` (both families).
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpPrefix>, NetlinkError> {
        let replies = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
            "listing addresses",
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    let addr = a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(addr) => Some(*addr),
                        _ => None,
                    })?;
                    IpPrefix::new(addr, a.header.prefix_len).ok()
                }
                _ => None,
            })
            .collect())
    }

    /// Adds a route to `dst` through link `index` (and `gateway`, if any) to the main table.
    pub fn add_route(
        &mut self,
        index: u32,
        dst: IpPrefix,
        gateway: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let mut message = RouteMessage::default();
        message.header.address_family = family(dst.addr);
        message.header.destination_prefix_length = dst.len;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Boot;
        message.header.kind = RouteType::Unicast;
        message.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if dst.len > 0 {
            message
                .attributes
                .push(RouteAttribute::Destination(RouteAddress::from(dst.addr)));
        }
        if let Some(gw) = gateway {
            message
                .attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        message.attributes.push(RouteAttribute::Oif(index));
        match self.request(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("adding route {dst} via {gateway:?} on link #{index}"),
        ) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// One request with the ACK flag, as bytes, and its sequence number.
    fn encode(&mut self, payload: RouteNetlinkMessage, flags: u16) -> (Vec<u8>, u32) {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        (buf, self.sequence)
    }

    /// Sends one request and collects its replies until the ACK (or DONE for a dump).
    fn request(
        &mut self,
        payload: RouteNetlinkMessage,
        flags: u16,
        op: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let (buf, sequence) = self.encode(payload, flags);
        let io_err = |source| NetlinkError::Io {
            op: op.to_owned(),
            source,
        };
        self.socket.send(&buf, 0).map_err(io_err)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(io_err)?;
            for bytes in messages(&data) {
                let message: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(bytes).map_err(|e| NetlinkError::Decode {
                        op: op.to_owned(),
                        detail: e.to_string(),
                    })?;
                if message.header.sequence_number == sequence {
                    match message.payload {
                        NetlinkPayload::Error(error) if error.code.is_some() => {
                            return Err(NetlinkError::Kernel {
                                op: op.to_owned(),
                                source: error.to_io(),
                            });
                        }
                        // The ACK (an error message with code 0) ends a request; a dump
                        // ends with DONE (the kernel sends no ACK after a dump).
                        NetlinkPayload::Error(_) => return Ok(replies),
                        NetlinkPayload::Done(_) if dump => return Ok(replies),
                        NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Exit status of [`delete_in_child`] when it failed before the kernel answered; lower
/// statuses are the kernel's errno.
const CHILD_FAILED: i32 = 255;

/// The forked child of [`Netlink::delete_link_unlisted`]: sends `request` on a new rtnetlink
/// socket and exits with the kernel's errno (0 for the ACK). It first points stdin, stdout
/// and stderr at `devnull` and closes every other descriptor, so it holds neither the
/// runtime's result pipe (which the runtime reads to EOF) nor any lock file of ours.
fn delete_in_child(request: &[u8], devnull: std::os::fd::RawFd) -> ! {
    // SAFETY: plain system calls on descriptors and buffers that live in this process;
    // all of them are async-signal-safe, as a child forked from threads requires.
    unsafe {
        for fd in 0..3 {
            libc::dup2(devnull, fd);
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        if fd < 0
            || libc::sendto(
                fd,
                request.as_ptr().cast(),
                request.len(),
                0,
                (&raw const kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            ) < 0
        {
            libc::_exit(CHILD_FAILED);
        }
        // The answer is an NLMSG_ERROR: a 16-byte header, then the negated errno.
        let mut reply = [0u8; 512];
        let n = libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0);
        if n < 20 {
            libc::_exit(CHILD_FAILED);
        }
        let error = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
        libc::_exit(
            error
                .checked_neg()
                .map_or(CHILD_FAILED, |e| e.clamp(0, CHILD_FAILED)),
        )
    }
}

/// The netlink messages in one datagram, each as its bytes (headers give the lengths,
/// messages are 4-byte aligned). A header whose length is impossible ends the split with the
/// rest as one last piece, which then fails to parse where parsing matters.
fn messages(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let length = rest
            .get(..4)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
        if length < 16 || length > rest.len() {
            return Some(std::mem::take(&mut rest));
        }
        let (message, tail) = rest.split_at(length);
        rest = tail
            .get(length.next_multiple_of(4) - length..)
            .unwrap_or(&[]);
        Some(message)
    })
}

fn family(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn parse_link(message: LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mac: None,
        mtu: None,
        up: message.header.flags.contains(LinkFlags::Up),
        vfs: Vec::new(),
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Address(bytes) => {
                link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddress)
            }
            LinkAttribute::Mtu(mtu) => link.mtu = Some(mtu),
            LinkAttribute::VfInfoList(vfs) => link.vfs = vfs,
            _ => {}
        }
    }
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_and_a_missing_link_is_none() {
        let mut nl = Netlink::open().unwrap();
        let lo = nl.link("lo", false).unwrap().unwrap();
        assert_eq!(lo.index, 1);
        assert_eq!(nl.link_by_index(1).unwrap().unwrap().name, "lo");
        assert!(nl.link("fv-no-such-if", false).unwrap().is_none());
        let addrs = nl.addresses(1).unwrap();
        assert!(
            addrs.iter().any(|a| a.to_string() == "127.0.0.1/8"),
            "{addrs:?}"
        );
    }

    /// Runs `f` on a thread of its own in a new, empty network namespace.
    fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    f()
                })
                .join()
                .unwrap()
        })
    }

    #[test]
    fn deleted_links_are_gone_when_the_calls_return_and_refusals_are_reported() {
        in_new_netns(|| {
            let spec = crate::tap::TapSpec {
                queues: 2,
                owner: None,
                group: None,
            };
            crate::tap::create_tap("fvdel0", spec).unwrap();
            let mut nl = Netlink::open().unwrap();
            let tap = nl.link("fvdel0", false).unwrap().unwrap();
            nl.delete_link_unlisted(tap.index).unwrap();
            assert_eq!(nl.link("fvdel0", false).unwrap(), None);
            assert_eq!(nl.link_by_index(tap.index).unwrap(), None);
            // Gone already: fine, like DEL twice.
            nl.delete_link_unlisted(tap.index).unwrap();
            // The kernel refuses to delete loopback; its errno comes back from the child.
            let e = nl.delete_link_unlisted(1).unwrap_err();
            assert_eq!(e.errno(), Some(libc::EOPNOTSUPP), "{e}");
            assert!(nl.link("lo", false).unwrap().is_some());
            // The waiting delete too.
            crate::tap::create_tap("fvdel1", spec).unwrap();
            let tap = nl.link("fvdel1", false).unwrap().unwrap();
            nl.delete_link(tap.index).unwrap();
            assert_eq!(nl.link("fvdel1", false).unwrap(), None);
            nl.delete_link(tap.index).unwrap();
        });
    }

    #[test]
    fn messages_are_split_by_their_headers_and_a_bad_length_ends_the_split() {
        let mut data = Vec::new();
        for (length, fill) in [(18u32, 1u8), (16, 2)] {
            data.extend(length.to_ne_bytes());
            data.resize(data.len() + length as usize - 4, fill);
            data.resize(data.len().next_multiple_of(4), 0);
        }
        let split: Vec<_> = messages(&data).map(<[u8]>::len).collect();
        assert_eq!(split, [18, 16]);
        // A length past the end: the rest is one piece, for the parser to refuse.
        data.extend(100u32.to_ne_bytes());
        data.extend([0; 12]);
        let split: Vec<_> = messages(&data).map(<[u8]>::len).collect();
        assert_eq!(split, [18, 16, 16]);
        assert!(NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[36..]).is_err());
    }
}
