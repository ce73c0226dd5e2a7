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

    /// Sends one request and collects its replies until the ACK (or DONE for a dump).
    fn request(
        &mut self,
        payload: RouteNetlinkMessage,
        flags: u16,
        op: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        let io_err = |source| NetlinkError::Io {
            op: op.to_owned(),
            source,
        };
        self.socket.send(&buf, 0).map_err(io_err)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(io_err)?;
            let mut offset = 0;
            while offset < data.len() {
                let message: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&data[offset..]).map_err(|e| {
                        NetlinkError::Decode {
                            op: op.to_owned(),
                            detail: e.to_string(),
                        }
                    })?;
                let length = message.header.length as usize;
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
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
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
}
