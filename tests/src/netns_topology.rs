//! A switch topology of network namespaces for datapath tests and benchmarks:
//!
//! ```text
//!   VM netns 0 [eth0 MAC0 IP0] ── veth ── host end 0 ─┐
//!   VM netns 1 [eth0 MAC1 IP1] ── veth ── host end 1 ─┼─ the switch under test: eBPF
//!   ...                                               │  programs the caller attaches, or
//!   peer netns [eth0 (IP)]     ── veth ── uplink end ─┘  a Linux bridge made here
//! ```
//!
//! Host ends live in the root namespace under unique names (the default: the eBPF datapath
//! attaches by name from the calling thread's namespace, and its maps key by ifindex) or in
//! a private "switch" namespace (for a Linux bridge that must not see the root namespace's
//! br_netfilter settings). Every namespace and link is removed on `Drop`, even when setup
//! failed halfway.
//!
//! Offloads measured to matter on veth (issue 5):
//! - native XDP redirect into a veth delivers only when the receiving peer has GRO on (or an
//!   XDP program), so every VM end and the peer end get GRO on;
//! - TCP through an XDP redirect needs checksum and segmentation offload off on the sending
//!   ends (measured: with them on, iperf3 between the peer and a VM stalls in both
//!   directions once the uplink has XDP), so VM and peer ends get `tx off tso off gso off`
//!   unless the spec says otherwise. A TC redirect between veths carries CHECKSUM_PARTIAL
//!   and GSO skbs fine (measured: 14 Gbit/s VM to VM with offloads on).

use std::fs::File;
use std::io::{Read, Seek};
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};

use crate::frames::mac_to_string;
use crate::names::{CleanupGuard, NameError, NetNs, ip, unique_name};
use crate::testpmd::quiet_netns;

/// The name of the namespace-side end of every veth (each lives in its own namespace).
pub const NS_IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot create a namespace or link")]
    Names(#[from] NameError),
    #[error("`{command}` failed: {stderr}; install ethtool/procps and run as root")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the counters of {interface}")]
    Counters {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{interface} has no line in its namespace's /proc/net/dev; is it gone?")]
    NoCounters { interface: String },
}

/// Where the switch side (host ends, bridge) of a topology lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostSide {
    /// The root namespace: what the eBPF datapath attaches to from a test's own thread.
    #[default]
    Root,
    /// A private namespace with br_netfilter off (`bridge-nf-call-*tables=0`).
    Netns,
}

/// What joins the host ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Switch {
    /// Nothing: the caller attaches its own datapath (eBPF) to the host ends.
    #[default]
    External,
    /// A Linux bridge (STP off, forward delay 0) with every host end as a port.
    LinuxBridge,
}

/// One VM-like endpoint: its address inside its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointSpec {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

impl EndpointSpec {
    pub fn new(address: Ipv4Addr, prefix_len: u8) -> EndpointSpec {
        EndpointSpec {
            address,
            prefix_len,
        }
    }
}

/// The uplink's far end in the peer namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UplinkSpec {
    /// An untagged address on the peer's end; none leaves it unaddressed (packet sockets
    /// then speak for it, e.g. with 802.1Q tags).
    pub peer_address: Option<(Ipv4Addr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologySpec {
    pub endpoints: Vec<EndpointSpec>,
    pub uplink: Option<UplinkSpec>,
    pub host_side: HostSide,
    pub switch: Switch,
    /// `ethtool -K eth0 tx off tso off gso off` on VM and peer ends (see the module docs).
    pub offloads_off: bool,
}

impl TopologySpec {
    /// Endpoints at `addresses` (one /24 each) with no uplink, root host side, no switch.
    pub fn endpoints(addresses: &[Ipv4Addr]) -> TopologySpec {
        TopologySpec {
            endpoints: addresses
                .iter()
                .map(|&a| EndpointSpec::new(a, 24))
                .collect(),
            uplink: None,
            host_side: HostSide::Root,
            switch: Switch::External,
            offloads_off: true,
        }
    }

    pub fn with_uplink(mut self, uplink: UplinkSpec) -> TopologySpec {
        self.uplink = Some(uplink);
        self
    }

    pub fn with_linux_bridge(mut self) -> TopologySpec {
        self.switch = Switch::LinuxBridge;
        self.host_side = HostSide::Netns;
        self
    }
}

/// The MAC of endpoint `index`: locally administered, unique within a topology.
pub fn endpoint_mac(index: usize) -> [u8; 6] {
    [0x02, 0xfe, 0, 0, (index >> 8) as u8, index as u8 + 1]
}

/// The MAC of the peer's end of the uplink.
pub const PEER_MAC: [u8; 6] = [0x02, 0xfe, 0, 1, 0, 1];

/// Runs `ip` commands for the switch side, in the root namespace or the switch namespace.
#[derive(Debug, Clone)]
struct HostIp {
    netns: Option<String>,
}

impl HostIp {
    fn run(&self, args: &[&str]) -> Result<(), NameError> {
        match &self.netns {
            None => ip(args),
            Some(ns) => {
                let mut full = vec!["-n", ns.as_str()];
                full.extend_from_slice(args);
                ip(&full)
            }
        }
    }
}

/// One veth: its host end and the namespace holding the other end (`eth0`).
/// Field order is drop order: the link goes before its namespace.
#[derive(Debug)]
pub struct VethLink {
    link: CleanupGuard,
    ifindex: u32,
    mac: [u8; 6],
    netns: NetNs,
}

impl VethLink {
    fn create(
        host: &HostIp,
        host_prefix: &str,
        ns_prefix: &str,
        mac: [u8; 6],
        offloads_off: bool,
    ) -> Result<VethLink, TopologyError> {
        let netns = NetNs::create(ns_prefix)?;
        quiet_netns(&netns);
        let name = unique_name(host_prefix);
        host.run(&[
            "link",
            "add",
            &name,
            "type",
            "veth",
            "peer",
            "name",
            NS_IFNAME,
            "netns",
            netns.name(),
        ])?;
        let remover = host.clone();
        let link = CleanupGuard::new(name.clone(), move |name| {
            let _ = remover.run(&["link", "del", name]);
        });
        // No IPv6 on the host end: its router and neighbour solicitations would be frames
        // the switch has to carry and the tests have to sift through.
        host.run(&["link", "set", &name, "addrgenmode", "none"])?;
        host.run(&["link", "set", &name, "up"])?;
        let ns = netns.name();
        let mac_text = mac_to_string(mac);
        ip(&["-n", ns, "link", "set", NS_IFNAME, "address", &mac_text])?;
        ip(&["-n", ns, "link", "set", NS_IFNAME, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        let mut features = vec!["-K", NS_IFNAME, "gro", "on"];
        if offloads_off {
            features.extend(["tx", "off", "tso", "off", "gso", "off"]);
        }
        run_checked(netns.command("ethtool").args(&features))?;
        let ifindex = host_ifindex(host, &name)?;
        Ok(VethLink {
            link,
            ifindex,
            mac,
            netns,
        })
    }

    /// The host end's name, in the root or switch namespace.
    pub fn host_if(&self) -> &str {
        self.link.name()
    }

    /// The host end's ifindex (in its namespace).
    pub fn host_ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The namespace of the far end, whose interface is [`NS_IFNAME`].
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// The far end's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn add_address(&self, address: Ipv4Addr, prefix_len: u8) -> Result<(), TopologyError> {
        let cidr = format!("{address}/{prefix_len}");
        ip(&[
            "-n",
            self.netns.name(),
            "addr",
            "add",
            &cidr,
            "dev",
            NS_IFNAME,
        ])?;
        Ok(())
    }
}

/// A VM-like endpoint: a veth whose far end has a MAC and an address.
#[derive(Debug)]
pub struct Endpoint {
    link: VethLink,
    address: Ipv4Addr,
}

impl Endpoint {
    pub fn host_if(&self) -> &str {
        self.link.host_if()
    }

    pub fn host_ifindex(&self) -> u32 {
        self.link.host_ifindex()
    }

    pub fn netns(&self) -> &NetNs {
        self.link.netns()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.link.mac()
    }

    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// `ping -c COUNT -W 1 -i 0.2 TARGET` from inside the endpoint; whether every reply came.
    pub fn ping(&self, target: Ipv4Addr, count: u32) -> Result<Output, TopologyError> {
        ping_from(self.netns(), target, count)
    }

    /// The far end's counters (what the endpoint received and sent).
    pub fn counters(&self) -> Result<InterfaceCounters, TopologyError> {
        InterfaceCounters::read(Some(self.netns()), NS_IFNAME)
    }
}

/// The uplink: a veth whose far end is in the peer namespace.
#[derive(Debug)]
pub struct Uplink {
    link: VethLink,
    peer_address: Option<Ipv4Addr>,
}

impl Uplink {
    pub fn host_if(&self) -> &str {
        self.link.host_if()
    }

    pub fn host_ifindex(&self) -> u32 {
        self.link.host_ifindex()
    }

    pub fn peer_netns(&self) -> &NetNs {
        self.link.netns()
    }

    pub fn peer_mac(&self) -> [u8; 6] {
        self.link.mac()
    }

    pub fn peer_address(&self) -> Option<Ipv4Addr> {
        self.peer_address
    }

    pub fn ping(&self, target: Ipv4Addr, count: u32) -> Result<Output, TopologyError> {
        ping_from(self.peer_netns(), target, count)
    }
}

/// Endpoints and an optional uplink around a switch; see the module docs.
/// Field order is drop order: the bridge, then the links, then the switch namespace.
#[derive(Debug)]
pub struct NetnsTopology {
    bridge: Option<CleanupGuard>,
    endpoints: Vec<Endpoint>,
    uplink: Option<Uplink>,
    switch_netns: Option<NetNs>,
}

impl NetnsTopology {
    pub fn create(spec: &TopologySpec) -> Result<NetnsTopology, TopologyError> {
        let switch_netns = match spec.host_side {
            HostSide::Root => None,
            HostSide::Netns => {
                let ns = NetNs::create("fvsw")?;
                quiet_netns(&ns);
                for table in ["arptables", "iptables", "ip6tables"] {
                    let key = format!("net.bridge.bridge-nf-call-{table}=0");
                    // Absent without br_netfilter, which is what we want anyway.
                    let _ = ns.run("sysctl", &["-qw", &key]);
                }
                Some(ns)
            }
        };
        let host = HostIp {
            netns: switch_netns.as_ref().map(|ns| ns.name().to_string()),
        };
        let mut topology = NetnsTopology {
            bridge: None,
            endpoints: Vec::new(),
            uplink: None,
            switch_netns,
        };
        for (index, e) in spec.endpoints.iter().enumerate() {
            let link =
                VethLink::create(&host, "fvh", "fvvm", endpoint_mac(index), spec.offloads_off)?;
            link.add_address(e.address, e.prefix_len)?;
            topology.endpoints.push(Endpoint {
                link,
                address: e.address,
            });
        }
        if let Some(u) = &spec.uplink {
            let link = VethLink::create(&host, "fvu", "fvpeer", PEER_MAC, spec.offloads_off)?;
            if let Some((address, prefix_len)) = u.peer_address {
                link.add_address(address, prefix_len)?;
            }
            topology.uplink = Some(Uplink {
                link,
                peer_address: u.peer_address.map(|(a, _)| a),
            });
        }
        if spec.switch == Switch::LinuxBridge {
            let name = unique_name("fvbr");
            host.run(&[
                "link",
                "add",
                &name,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ])?;
            let remover = host.clone();
            topology.bridge = Some(CleanupGuard::new(name.clone(), move |name| {
                let _ = remover.run(&["link", "del", name]);
            }));
            host.run(&["link", "set", &name, "addrgenmode", "none"])?;
            let ports: Vec<String> = topology.host_ifs().map(str::to_string).collect();
            for port in &ports {
                host.run(&["link", "set", port, "master", &name])?;
            }
            host.run(&["link", "set", &name, "up"])?;
        }
        Ok(topology)
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn endpoint(&self, index: usize) -> &Endpoint {
        &self.endpoints[index]
    }

    pub fn uplink(&self) -> Option<&Uplink> {
        self.uplink.as_ref()
    }

    /// The bridge's name, for [`Switch::LinuxBridge`].
    pub fn bridge(&self) -> Option<&str> {
        self.bridge.as_ref().map(CleanupGuard::name)
    }

    /// The namespace of the host ends, for [`HostSide::Netns`].
    pub fn switch_netns(&self) -> Option<&NetNs> {
        self.switch_netns.as_ref()
    }

    /// Every host end: endpoints first, then the uplink.
    pub fn host_ifs(&self) -> impl Iterator<Item = &str> {
        self.endpoints
            .iter()
            .map(Endpoint::host_if)
            .chain(self.uplink.iter().map(Uplink::host_if))
    }
}

/// `ping -c COUNT -W 1 -i 0.2 TARGET` inside `netns`.
pub fn ping_from(netns: &NetNs, target: Ipv4Addr, count: u32) -> Result<Output, TopologyError> {
    let count = count.to_string();
    let target = target.to_string();
    let args = ["-n", "-q", "-c", &count, "-W", "1", "-i", "0.2", &target];
    netns
        .run("ping", &args)
        .map_err(|source| TopologyError::Spawn {
            command: format!("ping {}", args.join(" ")),
            source,
        })
}

fn run_checked(cmd: &mut Command) -> Result<(), TopologyError> {
    let command = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TopologyError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TopologyError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The ifindex of a host end, from `/sys/class/net` (root) or `ip -o link` (switch netns).
fn host_ifindex(host: &HostIp, name: &str) -> Result<u32, TopologyError> {
    let text =
        match &host.netns {
            None => std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).map_err(
                |source| TopologyError::Counters {
                    interface: name.to_string(),
                    source,
                },
            )?,
            Some(ns) => {
                let out = Command::new("ip")
                    .args(["-n", ns, "-o", "link", "show", "dev", name])
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|source| TopologyError::Spawn {
                        command: format!("ip -n {ns} -o link show dev {name}"),
                        source,
                    })?;
                String::from_utf8_lossy(&out.stdout)
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            }
        };
    text.trim().parse().map_err(|_| TopologyError::NoCounters {
        interface: name.to_string(),
    })
}

/// One interface's line of /proc/net/dev.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InterfaceCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

impl InterfaceCounters {
    /// `interface`'s counters in `netns` (`None`: this process's namespace).
    pub fn read(
        netns: Option<&NetNs>,
        interface: &str,
    ) -> Result<InterfaceCounters, TopologyError> {
        let mut file = ProcNetDev::open(netns, interface)?;
        file.read()
    }

    /// Parses `interface`'s line of /proc/net/dev's text.
    pub fn parse(proc_net_dev: &str, interface: &str) -> Option<InterfaceCounters> {
        proc_net_dev.lines().find_map(|line| {
            let (name, rest) = line.split_once(':')?;
            if name.trim() != interface {
                return None;
            }
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|f| f.parse().ok())
                .collect::<Option<_>>()?;
            // rx: bytes packets errs drop fifo frame compressed multicast; tx: the same.
            (v.len() >= 16).then(|| InterfaceCounters {
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_dropped: v[11],
            })
        })
    }
}

/// A namespace's /proc/net/dev, opened once from inside it (`/proc/thread-self/net` is the
/// opening thread's namespace) and re-read for one interface: cheap enough to read at the
/// edges of a timed window.
#[derive(Debug)]
pub struct ProcNetDev {
    file: File,
    interface: String,
}

impl ProcNetDev {
    pub fn open(netns: Option<&NetNs>, interface: &str) -> Result<ProcNetDev, TopologyError> {
        let open = || File::open("/proc/thread-self/net/dev");
        let file = match netns {
            None => open(),
            Some(ns) => ns.run_in(open).and_then(|r| r),
        }
        .map_err(|source| TopologyError::Counters {
            interface: interface.to_string(),
            source,
        })?;
        Ok(ProcNetDev {
            file,
            interface: interface.to_string(),
        })
    }

    pub fn read(&mut self) -> Result<InterfaceCounters, TopologyError> {
        let mut text = String::new();
        self.file
            .rewind()
            .and_then(|()| self.file.read_to_string(&mut text))
            .map_err(|source| TopologyError::Counters {
                interface: self.interface.clone(),
                source,
            })?;
        InterfaceCounters::parse(&text, &self.interface).ok_or_else(|| TopologyError::NoCounters {
            interface: self.interface.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, last)
    }

    #[test]
    fn counters_come_from_the_named_interface_line() {
        let text = "Inter-|   Receive                            |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets\n    \
            lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n \
            eth0: 6400000  100000    0    7    0     0          0         0      123       2    0    1    0     0       0          0\n";
        let c = InterfaceCounters::parse(text, "eth0").unwrap();
        assert_eq!(
            (c.rx_bytes, c.rx_packets, c.rx_dropped),
            (6_400_000, 100_000, 7)
        );
        assert_eq!((c.tx_bytes, c.tx_packets, c.tx_dropped), (123, 2, 1));
        assert_eq!(InterfaceCounters::parse(text, "eth"), None);
    }

    #[test]
    fn linux_bridge_topology_pings_between_endpoints_and_the_peer() {
        let spec = TopologySpec::endpoints(&[addr(1), addr(2)])
            .with_uplink(UplinkSpec {
                peer_address: Some((addr(254), 24)),
            })
            .with_linux_bridge();
        let topo = NetnsTopology::create(&spec).unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (topo.endpoint(0), topo.endpoint(1));
        let out = a.ping(b.address(), 2).unwrap();
        assert!(out.status.success(), "{out:?}");
        let uplink = topo.uplink().unwrap();
        let out = uplink.ping(a.address(), 2).unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(b.counters().unwrap().rx_packets >= 2);
        assert!(
            !std::path::Path::new("/sys/class/net")
                .join(a.host_if())
                .exists(),
            "host ends live in the switch namespace"
        );
    }

    #[test]
    fn iperf3_through_a_linux_bridge_reports_throughput() {
        let topo = NetnsTopology::create(
            &TopologySpec::endpoints(&[addr(1), addr(2)]).with_linux_bridge(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let server = crate::iperf3::Iperf3Server::start(topo.endpoint(1).netns(), addr(2))
            .unwrap_or_else(|e| panic!("{e}"));
        let report = crate::iperf3::run_client(topo.endpoint(0).netns(), &server, 1, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(report.received_bits_per_second > 1e6, "{report:?}");
    }

    #[test]
    fn without_a_switch_endpoints_cannot_reach_each_other() {
        let topo = NetnsTopology::create(&TopologySpec::endpoints(&[addr(1), addr(2)]))
            .unwrap_or_else(|e| panic!("{e}"));
        let out = topo.endpoint(0).ping(addr(2), 1).unwrap();
        assert!(!out.status.success(), "{out:?}");
        assert!(
            std::path::Path::new("/sys/class/net")
                .join(topo.endpoint(0).host_if())
                .exists()
        );
    }

    #[test]
    fn everything_is_removed_on_drop() {
        let spec = TopologySpec::endpoints(&[addr(1)])
            .with_uplink(UplinkSpec::default())
            .with_linux_bridge();
        let topo = NetnsTopology::create(&spec).unwrap_or_else(|e| panic!("{e}"));
        let namespaces: Vec<std::path::PathBuf> = topo
            .endpoints()
            .iter()
            .map(|e| e.netns().path())
            .chain([
                topo.uplink().unwrap().peer_netns().path(),
                topo.switch_netns().unwrap().path(),
            ])
            .collect();
        let root = NetnsTopology::create(&TopologySpec::endpoints(&[addr(1)])).unwrap();
        let root_link = std::path::Path::new("/sys/class/net").join(root.endpoint(0).host_if());
        assert!(namespaces.iter().all(|p| p.exists()));
        drop(topo);
        drop(root);
        for p in namespaces {
            assert!(!p.exists(), "{p:?} left behind");
        }
        assert!(!root_link.exists(), "{root_link:?} left behind");
    }
}
