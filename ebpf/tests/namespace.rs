//! The eBPF switch between real veth endpoints (root, real kernel): each test builds its own
//! topology of namespaces (`ferrovirt_tests::netns_topology`) with host ends in the root
//! namespace, loads the datapath into a pin directory of its own and attaches it, then sends
//! real traffic (ping, iperf3, TCP connects, hand-built frames on packet sockets). Everything
//! is detached, unpinned and deleted on drop, even when an assertion fails.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use ferrovirt_ebpf::{
    Counters, Datapath, DatapathConfig, EndpointConfig, NetworkConfig, NetworkId, PolicyRule,
    Protocol, UplinkMode,
};
use ferrovirt_tests::frames::{self, ETHERTYPE_ARP};
use ferrovirt_tests::iperf3::{Iperf3Server, run_client};
use ferrovirt_tests::netns_topology::{
    Endpoint, NS_IFNAME, NetnsTopology, TopologySpec, UplinkSpec,
};
use ferrovirt_tests::{BpfPinDir, PacketSocket};

const NET: NetworkId = 1;
const PING_COUNT: u32 = 3;
/// How long a frame that should not arrive gets to arrive anyway.
const SILENCE: Duration = Duration::from_millis(1500);

/// A /24 of its own per test, so a leak between parallel tests could not look like success.
fn subnet(test: u8) -> impl Fn(u8) -> Ipv4Addr {
    move |host| Ipv4Addr::new(10, 200, test, host)
}

/// The datapath loaded into a test's own pin directory; detached and unpinned on drop.
/// Declare it after the topology so it drops first.
struct EbpfSwitch {
    datapath: Option<Datapath>,
    _pins: BpfPinDir,
}

impl EbpfSwitch {
    fn load() -> EbpfSwitch {
        let pins = BpfPinDir::create("ferrovirt-test").unwrap_or_else(|e| panic!("{e}"));
        let config = DatapathConfig {
            pin_dir: pins.path().to_path_buf(),
        };
        let datapath = Datapath::open_or_load(&config).unwrap_or_else(|e| panic!("{e}"));
        EbpfSwitch {
            datapath: Some(datapath),
            _pins: pins,
        }
    }

    /// One untagged network with every endpoint of `topo` on it (MAC and address
    /// enforced), and its uplink in `mode` if it has one. The first endpoint's program is a
    /// cls_bpf filter, as ferrovirt-cni attaches it; the others' are TCX links.
    fn flat(topo: &NetnsTopology, mode: UplinkMode) -> EbpfSwitch {
        let switch = EbpfSwitch::load();
        switch
            .dp()
            .add_network(NET, &NetworkConfig { vlan: None })
            .unwrap();
        for (i, e) in topo.endpoints().iter().enumerate() {
            if i == 0 {
                switch.attach_as_filter(e, NET);
            } else {
                switch.attach(e, NET, None);
            }
        }
        if let Some(uplink) = topo.uplink() {
            switch
                .dp()
                .attach_uplink(uplink.host_if(), NET, mode)
                .unwrap();
        }
        switch
    }

    fn dp(&self) -> &Datapath {
        self.datapath.as_ref().expect("present until drop")
    }

    fn attach(&self, e: &Endpoint, network: NetworkId, policy: Option<u32>) {
        self.dp()
            .attach_endpoint(e.host_if(), &endpoint_config(e, network, policy))
            .unwrap_or_else(|err| panic!("attach {}: {}", e.host_if(), chain(&err)));
    }

    fn attach_as_filter(&self, e: &Endpoint, network: NetworkId) {
        self.dp()
            .attach_endpoint_filter(e.host_if(), &endpoint_config(e, network, None))
            .unwrap_or_else(|err| panic!("attach {}: {}", e.host_if(), chain(&err)));
    }

    fn counters(&self, ifname: &str) -> Counters {
        self.dp()
            .counters(ifname)
            .unwrap_or_else(|e| panic!("counters of {ifname}: {e}"))
    }
}

fn endpoint_config(e: &Endpoint, network: NetworkId, policy: Option<u32>) -> EndpointConfig {
    EndpointConfig {
        network,
        mac: e.mac(),
        addresses: vec![IpAddr::V4(e.address())],
        policy,
    }
}

impl Drop for EbpfSwitch {
    fn drop(&mut self) {
        if let Some(datapath) = self.datapath.take()
            && let Err(e) = datapath.destroy()
        {
            eprintln!("destroying the test datapath: {e}");
        }
    }
}

/// An error with its causes, for assertion messages.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

fn topology(spec: &TopologySpec) -> NetnsTopology {
    NetnsTopology::create(spec).unwrap_or_else(|e| panic!("{e}"))
}

fn assert_ping(from: &Endpoint, to: Ipv4Addr) {
    let out = from.ping(to, PING_COUNT).unwrap();
    assert!(
        out.status.success(),
        "{} -> {to}: {}",
        from.address(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn assert_no_ping(from: &Endpoint, to: Ipv4Addr) {
    let out = from.ping(to, 2).unwrap();
    assert!(
        !out.status.success(),
        "{} reached {to}: {}",
        from.address(),
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn vms_and_the_peer_ping_each_other_through_the_ebpf_switch() {
    let ip = subnet(1);
    let spec = TopologySpec::endpoints(&[ip(1), ip(2), ip(3)]).with_uplink(UplinkSpec {
        peer_address: Some((ip(254), 24)),
    });
    let topo = topology(&spec);
    let switch = EbpfSwitch::flat(&topo, UplinkMode::Tc);
    let (a, b, c) = (topo.endpoint(0), topo.endpoint(1), topo.endpoint(2));
    let uplink = topo.uplink().unwrap();

    assert_ping(a, b.address());
    assert_ping(b, c.address());
    assert_ping(c, ip(254));
    let out = uplink.ping(a.address(), PING_COUNT).unwrap();
    assert!(out.status.success(), "peer -> a: {out:?}");

    // Only the switch joins the host ends, so its counters saw every echo.
    let ca = switch.counters(a.host_if());
    assert!(ca.tx_packets >= 2 * u64::from(PING_COUNT), "{ca:?}");
    assert!(ca.rx_packets >= 2 * u64::from(PING_COUNT), "{ca:?}");
    let cc = switch.counters(c.host_if());
    assert!(cc.tx_packets >= 2 * u64::from(PING_COUNT), "{cc:?}");
    let cu = switch.counters(uplink.host_if());
    assert!(
        cu.tx_packets >= u64::from(PING_COUNT),
        "from the peer: {cu:?}"
    );
    assert!(
        cu.rx_packets >= 2 * u64::from(PING_COUNT),
        "to the peer: {cu:?}"
    );
    for counters in [ca, cc, cu] {
        assert_eq!(
            counters.drop_spoof_mac + counters.drop_spoof_ip + counters.drop_spoof_arp,
            0,
            "{counters:?}"
        );
    }
}

#[test]
fn iperf3_between_vms_runs_through_the_ebpf_switch_with_offloads_on() {
    let ip = subnet(2);
    // A TC redirect between veths carries CHECKSUM_PARTIAL and GSO skbs as they are (only
    // the XDP uplink needs offloads off), so the endpoints keep theirs, as VMs would.
    let mut spec = TopologySpec::endpoints(&[ip(1), ip(2)]);
    spec.offloads_off = false;
    let topo = topology(&spec);
    let switch = EbpfSwitch::flat(&topo, UplinkMode::Tc);
    let (a, b) = (topo.endpoint(0), topo.endpoint(1));
    let server = Iperf3Server::start(b.netns(), b.address()).unwrap_or_else(|e| panic!("{e}"));
    let report = run_client(a.netns(), &server, 2, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.received_bits_per_second > 1e6, "{report:?}");
    let sent = switch.counters(a.host_if());
    let received = switch.counters(b.host_if());
    // At least two seconds at the measured rate went through the programs.
    let bytes = (report.received_bits_per_second / 8.0) as u64;
    assert!(received.rx_bytes >= bytes, "{received:?} for {report:?}");
    assert!(sent.tx_bytes >= bytes, "{sent:?} for {report:?}");
}

#[test]
fn a_vm_that_changes_its_mac_is_blocked_and_counted() {
    let ip = subnet(3);
    let topo = topology(&TopologySpec::endpoints(&[ip(1), ip(2)]));
    let switch = EbpfSwitch::flat(&topo, UplinkMode::Tc);
    let (a, b) = (topo.endpoint(0), topo.endpoint(1));
    assert_ping(a, b.address());

    let ns = a.netns().name();
    ferrovirt_tests::names::ip(&[
        "-n",
        ns,
        "link",
        "set",
        NS_IFNAME,
        "address",
        "02:fe:aa:bb:cc:dd",
    ])
    .unwrap();
    ferrovirt_tests::names::ip(&["-n", ns, "neigh", "flush", "dev", NS_IFNAME]).unwrap();
    let before = b.counters().unwrap().rx_packets;
    assert_no_ping(a, b.address());
    assert_eq!(
        b.counters().unwrap().rx_packets,
        before,
        "b heard the spoofer"
    );
    let c = switch.counters(a.host_if());
    assert!(c.drop_spoof_mac >= 1, "{c:?}");
}

#[test]
fn a_vm_that_sends_from_an_address_it_was_not_given_is_blocked_and_counted() {
    let ip = subnet(4);
    let topo = topology(&TopologySpec::endpoints(&[ip(1), ip(2)]));
    let switch = EbpfSwitch::flat(&topo, UplinkMode::Tc);
    let (a, b) = (topo.endpoint(0), topo.endpoint(1));
    // Resolves b's MAC first, so what follows is IP, not ARP.
    assert_ping(a, b.address());

    let stolen = ip(99);
    let cidr = format!("{stolen}/24");
    ferrovirt_tests::names::ip(&[
        "-n",
        a.netns().name(),
        "addr",
        "add",
        &cidr,
        "dev",
        NS_IFNAME,
    ])
    .unwrap();
    let out = a
        .netns()
        .run(
            "ping",
            &[
                "-n",
                "-q",
                "-c",
                "2",
                "-W",
                "1",
                "-I",
                &stolen.to_string(),
                &b.address().to_string(),
            ],
        )
        .unwrap();
    assert!(
        !out.status.success(),
        "the spoofed ping got answers: {out:?}"
    );
    let c = switch.counters(a.host_if());
    assert!(c.drop_spoof_ip >= 2, "{c:?}");

    // An ARP reply that claims b's address for a is dropped as ARP spoofing.
    let socket = PacketSocket::open(a.netns().name(), NS_IFNAME).unwrap();
    let claim = frames::arp_reply(a.mac(), b.address(), b.mac(), b.address());
    socket.send(&claim).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let c = switch.counters(a.host_if());
    assert!(c.drop_spoof_arp >= 1, "{c:?}");
}

#[test]
fn vlan_networks_on_one_uplink_do_not_leak_into_each_other() {
    const RED: NetworkId = 1;
    const BLUE: NetworkId = 2;
    let ip = subnet(5);
    // One subnet for both networks: only the switch keeps them apart.
    let spec = TopologySpec::endpoints(&[ip(1), ip(2), ip(3)]).with_uplink(UplinkSpec::default());
    let topo = topology(&spec);
    let (red_a, red_b, blue) = (topo.endpoint(0), topo.endpoint(1), topo.endpoint(2));
    let uplink = topo.uplink().unwrap();
    let switch = EbpfSwitch::load();
    let dp = switch.dp();
    dp.add_network(RED, &NetworkConfig { vlan: Some(100) })
        .unwrap();
    dp.add_network(BLUE, &NetworkConfig { vlan: Some(200) })
        .unwrap();
    switch.attach(red_a, RED, None);
    switch.attach(red_b, RED, None);
    switch.attach(blue, BLUE, None);
    dp.attach_uplink(uplink.host_if(), RED, UplinkMode::Tc)
        .unwrap();
    dp.attach_uplink(uplink.host_if(), BLUE, UplinkMode::Tc)
        .unwrap();
    // The kernel here has no 802.1Q module for VLAN sub-interfaces: a packet socket on the
    // peer's end speaks tagged frames itself.
    let peer = PacketSocket::open(uplink.peer_netns().name(), NS_IFNAME).unwrap();
    let peer_ip = ip(254);

    // Within red: works, and red's broadcast reaches the peer tagged 100 only.
    let blue_before = blue.counters().unwrap().rx_packets;
    assert_ping(red_a, red_b.address());
    // Red to blue: red's ARP broadcast never reaches blue.
    assert_no_ping(red_a, blue.address());
    assert_eq!(
        blue.counters().unwrap().rx_packets,
        blue_before,
        "blue heard red"
    );
    // The peer's socket queued what reached the uplink meanwhile: red's ARP broadcasts,
    // every one tagged 100.
    let tags: Vec<Option<u16>> = peer
        .collect_matching(Duration::from_millis(300), |f| {
            !f.outgoing && is_arp_from(f, red_a.mac())
        })
        .iter()
        .map(vlan_of)
        .collect();
    assert!(
        !tags.is_empty(),
        "red's broadcasts never reached the uplink"
    );
    assert!(
        tags.iter().all(|&t| t == Some(100)),
        "red on the uplink: {tags:?}"
    );

    // The peer reaches each network only on its own VLAN (the reply proves the tag was
    // popped on the way in and pushed on the way out).
    let ask = |vlan: u16, target: Ipv4Addr| {
        let request = frames::arp_request(uplink.peer_mac(), peer_ip, target);
        peer.send(&frames::with_vlan(&request, vlan)).unwrap();
        peer.receive_frame_matching(SILENCE, |f| {
            !f.outgoing
                && frames::parse_arp(&frames::strip_vlan(&f.data).1)
                    .is_some_and(|a| a.is_reply && a.sender_ip == target)
        })
        .map(|f| vlan_of(&f))
    };
    assert_eq!(
        ask(100, red_b.address()),
        Some(Some(100)),
        "red answers on 100"
    );
    assert_eq!(
        ask(200, blue.address()),
        Some(Some(200)),
        "blue answers on 200"
    );
    assert_eq!(
        ask(200, red_b.address()),
        None,
        "red answered on blue's VLAN"
    );
    // A broadcast on 100 reaches red's endpoints only.
    let blue_before = blue.counters().unwrap().rx_packets;
    assert_eq!(
        ask(100, blue.address()),
        None,
        "blue answered on red's VLAN"
    );
    assert_eq!(
        blue.counters().unwrap().rx_packets,
        blue_before,
        "blue heard red's VLAN"
    );
}

fn is_arp_from(frame: &ferrovirt_tests::packet_socket::ReceivedFrame, mac: [u8; 6]) -> bool {
    let (_, untagged) = frames::strip_vlan(&frame.data);
    frames::ethertype(&untagged) == Some(ETHERTYPE_ARP)
        && frames::parse_arp(&untagged).is_some_and(|a| a.sender_mac == mac)
}

/// The frame's VLAN, whether the kernel moved the tag out of the bytes or left it in.
fn vlan_of(frame: &ferrovirt_tests::packet_socket::ReceivedFrame) -> Option<u16> {
    frame.vlan.or_else(|| frames::strip_vlan(&frame.data).0)
}

#[test]
fn a_policy_that_allows_one_port_blocks_the_others() {
    const ALLOWED: u16 = 8080;
    const BLOCKED: u16 = 8081;
    const POLICY: u32 = 7;
    let ip = subnet(6);
    let topo = topology(&TopologySpec::endpoints(&[ip(1), ip(2)]));
    let (a, b) = (topo.endpoint(0), topo.endpoint(1));
    let switch = EbpfSwitch::load();
    let dp = switch.dp();
    dp.add_network(NET, &NetworkConfig { vlan: None }).unwrap();
    dp.set_policy(
        POLICY,
        &[PolicyRule {
            addr: IpAddr::V4(b.address()),
            prefix_len: 32,
            protocol: Protocol::Tcp,
            ports: Some(ALLOWED..=ALLOWED),
        }],
    )
    .unwrap();
    switch.attach(a, NET, Some(POLICY));
    switch.attach(b, NET, None);

    let b_address = b.address();
    let listeners: Vec<TcpListener> = [ALLOWED, BLOCKED]
        .iter()
        .map(|&port| {
            b.netns()
                .run_in(move || TcpListener::bind((b_address, port)))
                .unwrap()
                .unwrap()
        })
        .collect();
    let connect = |port: u16| {
        let target = SocketAddr::from((b.address(), port));
        a.netns()
            .run_in(move || TcpStream::connect_timeout(&target, Duration::from_secs(2)))
            .unwrap()
    };
    assert!(connect(ALLOWED).is_ok(), "the allowed port");
    let blocked = connect(BLOCKED);
    assert!(blocked.is_err(), "the other port answered: {blocked:?}");
    assert_no_ping(a, b.address());
    let c = switch.counters(a.host_if());
    assert!(c.drop_policy >= 2, "{c:?}");
    drop(listeners);
}

#[test]
fn xdp_uplink_delivers_unicast_from_the_peer() {
    let ip = subnet(7);
    let spec = TopologySpec::endpoints(&[ip(1), ip(2)]).with_uplink(UplinkSpec {
        peer_address: Some((ip(254), 24)),
    });
    let topo = topology(&spec);
    let switch = EbpfSwitch::flat(&topo, UplinkMode::Xdp);
    let (a, uplink) = (topo.endpoint(0), topo.uplink().unwrap());
    let link = std::process::Command::new("ip")
        .args(["-d", "link", "show", "dev", uplink.host_if()])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("xdp"), "no XDP program on the uplink: {link}");

    let out = uplink.ping(a.address(), PING_COUNT).unwrap();
    assert!(out.status.success(), "peer -> a over XDP: {out:?}");
    // TCP from the peer through the XDP redirect (checksums survive with offloads off).
    let server = Iperf3Server::start(a.netns(), a.address()).unwrap_or_else(|e| panic!("{e}"));
    let report = run_client(uplink.peer_netns(), &server, 1, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.received_bits_per_second > 1e6, "{report:?}");
    let cu = switch.counters(uplink.host_if());
    assert!(cu.tx_packets >= u64::from(PING_COUNT), "{cu:?}");
    let xdp_redirects = xdp_redirects(uplink.host_if());
    assert!(
        xdp_redirects >= u64::from(PING_COUNT),
        "the unicast went the TC way: {xdp_redirects} XDP redirects"
    );
}

/// The veth's XDP redirect count (`ethtool -S`: rx_queue_N_xdp_redirect, summed).
fn xdp_redirects(ifname: &str) -> u64 {
    let out = std::process::Command::new("ethtool")
        .args(["-S", ifname])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.ends_with("xdp_redirect"))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}
