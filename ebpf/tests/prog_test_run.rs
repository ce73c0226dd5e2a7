//! The datapath's programs, one behaviour per test, the Cilium way: build a frame, run the
//! program with BPF_PROG_TEST_RUN, assert the verdict, the frame it leaves and the counters.
//!
//! Endpoints and uplinks have made-up ifindexes here (TC programs only read them from the
//! context); XDP needs a real ingress device, so its uplink is `lo` (ifindex 1), and flooding
//! clones to real veths. Needs root and bpffs at /sys/fs/bpf.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::TestDatapath;
use ferrovirt_ebpf::{
    Counters, DatapathError, EndpointConfig, ForwardingError, NetworkConfig, NetworkId,
    PolicyError, PolicyRule, Program, Protocol, TestRunInput, TestRunOutput,
};
use ferrovirt_tests::frames::*;
use ferrovirt_tests::names::{CleanupGuard, ip, unique_name};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const NET: NetworkId = 1;
const VLAN_NET: NetworkId = 2;
const VLAN: u16 = 100;
const NO_UPLINK_NET: NetworkId = 3;

// Made-up ifindexes, far above any real interface's.
const EP_A: u32 = 900_001;
const EP_B: u32 = 900_002;
const EP_V: u32 = 900_003; // on VLAN_NET
const EP_LONE: u32 = 900_004; // on NO_UPLINK_NET
const UPLINK: u32 = 900_100;
/// `lo`: the XDP test uplink, which must exist.
const LO: u32 = 1;

const MAC_A: Mac = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: Mac = [0x02, 0, 0, 0, 0, 0x0b];
const MAC_V: Mac = [0x02, 0, 0, 0, 0, 0x0c];
const MAC_LONE: Mac = [0x02, 0, 0, 0, 0, 0x0d];
/// A host behind the uplink, unknown to the FDB.
const MAC_PEER: Mac = [0x02, 0, 0, 0, 0, 0x99];

const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const IP_PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 99);
const IP6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x0a);
const IP6_PEER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99);
const LINK_LOCAL_A: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0xff, 0xfe00, 0x0a);

fn endpoint(network: NetworkId, mac: Mac, addresses: &[IpAddr]) -> EndpointConfig {
    EndpointConfig {
        network,
        mac,
        addresses: addresses.to_vec(),
        policy: None,
    }
}

fn endpoint_a(policy: Option<u32>) -> EndpointConfig {
    EndpointConfig {
        policy,
        ..endpoint(NET, MAC_A, &[IP_A.into(), IP6_A.into()])
    }
}

/// NET (untagged, uplink UPLINK) with endpoints A and B; VLAN_NET (VLAN 100, uplink UPLINK)
/// with endpoint V; NO_UPLINK_NET with endpoint LONE.
fn switch() -> TestDatapath {
    let dp = TestDatapath::load();
    dp.add_network(NET, &NetworkConfig { vlan: None }).unwrap();
    dp.add_network(VLAN_NET, &NetworkConfig { vlan: Some(VLAN) })
        .unwrap();
    dp.add_network(NO_UPLINK_NET, &NetworkConfig::default())
        .unwrap();
    dp.configure_endpoint_maps(EP_A, &endpoint_a(None)).unwrap();
    dp.configure_endpoint_maps(EP_B, &endpoint(NET, MAC_B, &[IP_B.into()]))
        .unwrap();
    dp.configure_endpoint_maps(EP_V, &endpoint(VLAN_NET, MAC_V, &[]))
        .unwrap();
    dp.configure_endpoint_maps(EP_LONE, &endpoint(NO_UPLINK_NET, MAC_LONE, &[]))
        .unwrap();
    dp.configure_uplink_maps(UPLINK, NET).unwrap();
    dp.configure_uplink_maps(UPLINK, VLAN_NET).unwrap();
    dp
}

fn run(dp: &TestDatapath, program: Program, ingress_ifindex: u32, frame: &[u8]) -> TestRunOutput {
    let input = TestRunInput {
        frame,
        ingress_ifindex,
        repeat: 1,
    };
    dp.test_run(program, &input).expect("BPF_PROG_TEST_RUN")
}

fn from_endpoint(dp: &TestDatapath, ifindex: u32, frame: &[u8]) -> TestRunOutput {
    run(dp, Program::FromEndpoint, ifindex, frame)
}

fn counters(dp: &TestDatapath, ifindex: u32) -> Counters {
    dp.counters_by_ifindex(ifindex).expect("counters")
}

fn ipv4_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: (u8, Vec<u8>),
) -> Vec<u8> {
    ethernet(
        dst_mac,
        src_mac,
        ETHERTYPE_IPV4,
        &ipv4(src, dst, l4.0, &l4.1),
    )
}

fn ipv6_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    l4: (u8, Vec<u8>),
) -> Vec<u8> {
    ethernet(
        dst_mac,
        src_mac,
        ETHERTYPE_IPV6,
        &ipv6(src, dst, l4.0, &l4.1),
    )
}

fn tcp_to(port: u16) -> (u8, Vec<u8>) {
    (IPPROTO_TCP, tcp_syn(40000, port))
}

fn udp_to(port: u16) -> (u8, Vec<u8>) {
    (IPPROTO_UDP, udp(40000, port, b"x"))
}

fn icmpv6(message: Vec<u8>) -> (u8, Vec<u8>) {
    (IPPROTO_ICMPV6, message)
}

/// A's TCP SYN to `dst` port `port` through the uplink.
fn a_tcp_to(dst: Ipv4Addr, port: u16) -> Vec<u8> {
    ipv4_frame(MAC_A, MAC_PEER, IP_A, dst, tcp_to(port))
}

/// Runs fv_from_endpoint on `frame` from `ifindex`; asserts it was dropped and counted
/// under exactly `reason`.
fn assert_drops(dp: &TestDatapath, ifindex: u32, frame: &[u8], reason: fn(&Counters) -> u64) {
    let out = from_endpoint(dp, ifindex, frame);
    assert_eq!(out.verdict, TC_ACT_SHOT, "dropped");
    let c = counters(dp, ifindex);
    assert_eq!(reason(&c), 1, "counted under its reason: {c:?}");
    let all_drops =
        c.drop_spoof_mac + c.drop_spoof_ip + c.drop_spoof_arp + c.drop_policy + c.drop_no_route;
    assert_eq!(all_drops, 1, "and no other: {c:?}");
}

/// Runs fv_from_endpoint on `frame` from `ifindex`; asserts it went to the uplink untouched
/// (unknown unicast, or broadcast, on an untagged network).
fn assert_sends_to_uplink(dp: &TestDatapath, ifindex: u32, frame: &[u8]) {
    let out = from_endpoint(dp, ifindex, frame);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "redirected to the uplink");
    assert_eq!(out.frame, frame, "untouched on an untagged network");
    assert_eq!(counters(dp, UPLINK).rx_packets, 1, "the uplink received it");
}

// ---- allowed traffic ------------------------------------------------------------------

#[test]
fn allowed_ipv4_from_endpoint_goes_to_the_uplink_and_is_counted() {
    let dp = switch();
    let frame = a_tcp_to(IP_PEER, 80);
    assert_sends_to_uplink(&dp, EP_A, &frame);
    let a = counters(&dp, EP_A);
    assert_eq!((a.tx_packets, a.tx_bytes), (1, frame.len() as u64));
    assert_eq!(counters(&dp, UPLINK).rx_bytes, frame.len() as u64);
}

#[test]
fn allowed_ipv6_from_endpoint_goes_to_the_uplink() {
    let dp = switch();
    let frame = ipv6_frame(MAC_A, MAC_PEER, IP6_A, IP6_PEER, tcp_to(443));
    assert_sends_to_uplink(&dp, EP_A, &frame);
}

#[test]
fn ipv6_from_a_link_local_source_is_allowed() {
    let dp = switch();
    let frame = ipv6_frame(MAC_A, MAC_PEER, LINK_LOCAL_A, IP6_PEER, udp_to(53));
    assert_sends_to_uplink(&dp, EP_A, &frame);
}

#[test]
fn arp_request_for_own_address_is_flooded_and_sent_to_the_uplink() {
    let dp = switch();
    let frame = ethernet(
        BROADCAST,
        MAC_A,
        ETHERTYPE_ARP,
        &arp(1, MAC_A, IP_A, [0; 6], IP_PEER),
    );
    assert_sends_to_uplink(&dp, EP_A, &frame);
    assert_eq!(counters(&dp, EP_A).drop_spoof_arp, 0);
}

#[test]
fn dhcp_discover_from_unspecified_address_is_allowed() {
    let dp = switch();
    let frame = ipv4_frame(
        MAC_A,
        BROADCAST,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        (IPPROTO_UDP, udp(68, 67, b"discover")),
    );
    assert_sends_to_uplink(&dp, EP_A, &frame);
}

#[test]
fn duplicate_address_detection_from_unspecified_address_is_allowed() {
    let dp = switch();
    let ns = neighbor_solicitation(IP6_A, None);
    let frame = ipv6_frame(
        MAC_A,
        solicited_node_mac(IP6_A),
        Ipv6Addr::UNSPECIFIED,
        solicited_node_addr(IP6_A),
        icmpv6(ns),
    );
    assert_sends_to_uplink(&dp, EP_A, &frame);
}

#[test]
fn endpoint_without_addresses_may_send_from_any_ip() {
    let dp = switch();
    let frame = ipv4_frame(
        MAC_V,
        MAC_PEER,
        Ipv4Addr::new(192, 0, 2, 1),
        IP_PEER,
        tcp_to(80),
    );
    let out = from_endpoint(&dp, EP_V, &frame);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
}

// ---- anti-spoofing --------------------------------------------------------------------

#[test]
fn frame_with_spoofed_source_mac_is_dropped() {
    let dp = switch();
    let frame = ipv4_frame(MAC_B, MAC_PEER, IP_A, IP_PEER, tcp_to(80));
    assert_drops(&dp, EP_A, &frame, |c| c.drop_spoof_mac);
    assert_eq!(counters(&dp, UPLINK).rx_packets, 0);
}

#[test]
fn ipv4_with_spoofed_source_is_dropped() {
    let dp = switch();
    let spoofed = ipv4_frame(MAC_A, MAC_PEER, IP_B, IP_PEER, tcp_to(80));
    assert_drops(&dp, EP_A, &spoofed, |c| c.drop_spoof_ip);
}

#[test]
fn ipv6_with_spoofed_source_is_dropped() {
    let dp = switch();
    let spoofed = ipv6_frame(MAC_A, MAC_PEER, IP6_PEER, IP6_A, tcp_to(80));
    assert_drops(&dp, EP_A, &spoofed, |c| c.drop_spoof_ip);
}

#[test]
fn udp_from_unspecified_address_to_other_than_dhcp_is_dropped() {
    let dp = switch();
    let frame = ipv4_frame(
        MAC_A,
        BROADCAST,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        udp_to(53),
    );
    assert_drops(&dp, EP_A, &frame, |c| c.drop_spoof_ip);
}

#[test]
fn arp_claiming_another_ip_is_dropped() {
    let dp = switch();
    let frame = ethernet(
        BROADCAST,
        MAC_A,
        ETHERTYPE_ARP,
        &arp(2, MAC_A, IP_B, [0; 6], IP_PEER),
    );
    assert_drops(&dp, EP_A, &frame, |c| c.drop_spoof_arp);
}

#[test]
fn arp_with_another_sender_mac_is_dropped() {
    let dp = switch();
    let frame = ethernet(
        BROADCAST,
        MAC_A,
        ETHERTYPE_ARP,
        &arp(1, MAC_B, IP_A, [0; 6], IP_PEER),
    );
    assert_drops(&dp, EP_A, &frame, |c| c.drop_spoof_arp);
}

#[test]
fn neighbor_advertisement_for_a_foreign_target_is_dropped() {
    let dp = switch();
    let na = neighbor_advertisement(IP6_PEER, Some(MAC_A));
    let frame = ipv6_frame(MAC_A, MAC_PEER, IP6_A, IP6_PEER, icmpv6(na));
    assert_drops(&dp, EP_A, &frame, |c| c.drop_spoof_arp);
}

#[test]
fn neighbor_advertisement_with_a_foreign_target_link_layer_address_is_dropped() {
    let dp = switch();
    let na = neighbor_advertisement(IP6_A, Some(MAC_B));
    let frame = ipv6_frame(MAC_A, MAC_PEER, IP6_A, IP6_PEER, icmpv6(na));
    assert_drops(&dp, EP_A, &frame, |c| c.drop_spoof_arp);
}

#[test]
fn neighbor_advertisement_for_own_address_is_allowed() {
    let dp = switch();
    let na = neighbor_advertisement(IP6_A, Some(MAC_A));
    let frame = ipv6_frame(MAC_A, MAC_PEER, IP6_A, IP6_PEER, icmpv6(na));
    assert_sends_to_uplink(&dp, EP_A, &frame);
}

#[test]
fn router_advertisement_from_a_vm_is_dropped() {
    let dp = switch();
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let frame = ipv6_frame(
        MAC_A,
        [0x33, 0x33, 0, 0, 0, 1],
        LINK_LOCAL_A,
        all_nodes,
        icmpv6(router_advertisement()),
    );
    assert_drops(&dp, EP_A, &frame, |c| c.drop_spoof_arp);
}

#[test]
fn vlan_tagged_frame_from_a_vm_is_dropped() {
    let dp = switch();
    let frame = with_vlan(&a_tcp_to(IP_PEER, 80), VLAN);
    assert_drops(&dp, EP_A, &frame, |c| c.drop_policy);
}

#[test]
fn frame_on_an_unknown_tap_is_dropped() {
    let dp = switch();
    let out = from_endpoint(&dp, 900_999, &a_tcp_to(IP_PEER, 80));
    assert_eq!(out.verdict, TC_ACT_SHOT);
}

#[test]
fn reconfiguring_an_endpoint_replaces_its_mac_and_addresses() {
    let dp = switch();
    let new_mac = [0x02, 0, 0, 0, 0, 0x1a];
    let new_ip = Ipv4Addr::new(10, 0, 0, 20);
    dp.configure_endpoint_maps(EP_A, &endpoint(NET, new_mac, &[new_ip.into()]))
        .unwrap();
    let old_source = ipv4_frame(new_mac, MAC_PEER, IP_A, IP_PEER, tcp_to(80));
    assert_drops(&dp, EP_A, &old_source, |c| c.drop_spoof_ip);
    let new_source = ipv4_frame(new_mac, MAC_PEER, new_ip, IP_PEER, tcp_to(80));
    assert_eq!(
        from_endpoint(&dp, EP_A, &new_source).verdict,
        TC_ACT_REDIRECT
    );
    // B's frame to A's old MAC is unknown unicast now: the uplink, not A.
    let to_old_mac = ipv4_frame(MAC_B, MAC_A, IP_B, IP_A, tcp_to(80));
    assert_eq!(
        from_endpoint(&dp, EP_B, &to_old_mac).verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(counters(&dp, EP_A).rx_packets, 0);
    assert_eq!(counters(&dp, UPLINK).rx_packets, 2);
}

// ---- policy ---------------------------------------------------------------------------

fn allow(
    cidr: &str,
    protocol: Protocol,
    ports: Option<std::ops::RangeInclusive<u16>>,
) -> PolicyRule {
    let (addr, len) = cidr.split_once('/').expect("CIDR");
    PolicyRule {
        addr: addr.parse().expect("address"),
        prefix_len: len.parse().expect("prefix length"),
        protocol,
        ports,
    }
}

/// The switch with A under policy 7 = `rules`.
fn switch_with_policy(rules: &[PolicyRule]) -> TestDatapath {
    let dp = switch();
    dp.set_policy(7, rules).unwrap();
    dp.configure_endpoint_maps(EP_A, &endpoint_a(Some(7)))
        .unwrap();
    dp
}

#[test]
fn policy_allows_a_matching_cidr_protocol_and_port() {
    let dp = switch_with_policy(&[allow("10.1.0.0/16", Protocol::Tcp, Some(80..=88))]);
    let frame = a_tcp_to(Ipv4Addr::new(10, 1, 2, 3), 88);
    assert_sends_to_uplink(&dp, EP_A, &frame);
}

#[test]
fn policy_denies_another_port_protocol_or_cidr() {
    let dp = switch_with_policy(&[allow("10.1.0.0/16", Protocol::Tcp, Some(80..=88))]);
    let denied = [
        a_tcp_to(Ipv4Addr::new(10, 1, 2, 3), 89),
        ipv4_frame(
            MAC_A,
            MAC_PEER,
            IP_A,
            Ipv4Addr::new(10, 1, 2, 3),
            udp_to(80),
        ),
        a_tcp_to(Ipv4Addr::new(10, 2, 0, 1), 80),
    ];
    for frame in &denied {
        assert_eq!(from_endpoint(&dp, EP_A, frame).verdict, TC_ACT_SHOT);
    }
    assert_eq!(counters(&dp, EP_A).drop_policy, denied.len() as u64);
    assert_eq!(counters(&dp, UPLINK).rx_packets, 0);
}

#[test]
fn a_packet_is_allowed_by_any_rule_whose_cidr_holds_it() {
    // 10.1.2.3 is in the /16 and in the /8: TCP 80 is allowed by the /8's rule.
    let dp = switch_with_policy(&[
        allow("10.0.0.0/8", Protocol::Tcp, Some(80..=80)),
        allow("10.1.0.0/16", Protocol::Udp, Some(53..=53)),
    ]);
    let in_slash16 = Ipv4Addr::new(10, 1, 2, 3);
    assert_eq!(
        from_endpoint(&dp, EP_A, &a_tcp_to(in_slash16, 80)).verdict,
        TC_ACT_REDIRECT
    );
    let dns = ipv4_frame(MAC_A, MAC_PEER, IP_A, in_slash16, udp_to(53));
    assert_eq!(from_endpoint(&dp, EP_A, &dns).verdict, TC_ACT_REDIRECT);
    let dns_outside = ipv4_frame(
        MAC_A,
        MAC_PEER,
        IP_A,
        Ipv4Addr::new(10, 2, 0, 1),
        udp_to(53),
    );
    assert_eq!(from_endpoint(&dp, EP_A, &dns_outside).verdict, TC_ACT_SHOT);
    assert_eq!(counters(&dp, EP_A).drop_policy, 1);
}

#[test]
fn policy_applies_to_ipv6_destinations() {
    let dp = switch_with_policy(&[allow("fd00::/64", Protocol::Tcp, Some(443..=443))]);
    let https = ipv6_frame(MAC_A, MAC_PEER, IP6_A, IP6_PEER, tcp_to(443));
    assert_eq!(from_endpoint(&dp, EP_A, &https).verdict, TC_ACT_REDIRECT);
    let ssh = ipv6_frame(MAC_A, MAC_PEER, IP6_A, IP6_PEER, tcp_to(22));
    assert_eq!(from_endpoint(&dp, EP_A, &ssh).verdict, TC_ACT_SHOT);
}

#[test]
fn ipv4_rules_do_not_match_ipv6_packets_and_ipv6_rules_not_ipv4_ones() {
    let dp = switch_with_policy(&[
        allow("0.0.0.0/0", Protocol::Tcp, Some(443..=443)),
        allow("fd00::/64", Protocol::Udp, Some(53..=53)),
    ]);
    let v4_https = a_tcp_to(IP_PEER, 443);
    let v6_dns = ipv6_frame(MAC_A, MAC_PEER, IP6_A, IP6_PEER, udp_to(53));
    assert_eq!(from_endpoint(&dp, EP_A, &v4_https).verdict, TC_ACT_REDIRECT);
    assert_eq!(from_endpoint(&dp, EP_A, &v6_dns).verdict, TC_ACT_REDIRECT);
    let v6_https = ipv6_frame(MAC_A, MAC_PEER, IP6_A, IP6_PEER, tcp_to(443));
    let v4_dns = ipv4_frame(MAC_A, MAC_PEER, IP_A, IP_PEER, udp_to(53));
    for frame in [&v6_https, &v4_dns] {
        assert_eq!(from_endpoint(&dp, EP_A, frame).verdict, TC_ACT_SHOT);
    }
    assert_eq!(counters(&dp, EP_A).drop_policy, 2);
}

#[test]
fn without_a_policy_everything_is_allowed() {
    let dp = switch();
    for frame in [
        a_tcp_to(Ipv4Addr::new(192, 0, 2, 1), 22),
        ipv4_frame(MAC_A, MAC_PEER, IP_A, Ipv4Addr::new(8, 8, 8, 8), udp_to(53)),
    ] {
        assert_eq!(from_endpoint(&dp, EP_A, &frame).verdict, TC_ACT_REDIRECT);
    }
    assert_eq!(counters(&dp, EP_A).drop_policy, 0);
}

#[test]
fn an_empty_policy_denies_all_ip_but_not_arp_or_neighbor_discovery() {
    let dp = switch_with_policy(&[]);
    assert_drops(&dp, EP_A, &a_tcp_to(IP_PEER, 80), |c| c.drop_policy);
    let arp_request = ethernet(
        BROADCAST,
        MAC_A,
        ETHERTYPE_ARP,
        &arp(1, MAC_A, IP_A, [0; 6], IP_PEER),
    );
    assert_eq!(
        from_endpoint(&dp, EP_A, &arp_request).verdict,
        TC_ACT_REDIRECT
    );
    let ns = neighbor_solicitation(IP6_PEER, Some(MAC_A));
    let solicit = ipv6_frame(
        MAC_A,
        solicited_node_mac(IP6_PEER),
        IP6_A,
        solicited_node_addr(IP6_PEER),
        icmpv6(ns),
    );
    assert_eq!(from_endpoint(&dp, EP_A, &solicit).verdict, TC_ACT_REDIRECT);
}

#[test]
fn removing_a_policy_in_use_denies_all() {
    let dp = switch_with_policy(&[allow("0.0.0.0/0", Protocol::Any, None)]);
    assert_eq!(
        from_endpoint(&dp, EP_A, &a_tcp_to(IP_PEER, 80)).verdict,
        TC_ACT_REDIRECT
    );
    dp.remove_policy(7).unwrap();
    assert_eq!(
        from_endpoint(&dp, EP_A, &a_tcp_to(IP_PEER, 80)).verdict,
        TC_ACT_SHOT
    );
}

// ---- forwarding from endpoints --------------------------------------------------------

#[test]
fn unicast_to_a_local_endpoint_is_redirected_to_it() {
    let dp = switch();
    let frame = ipv4_frame(MAC_A, MAC_B, IP_A, IP_B, tcp_to(80));
    let out = from_endpoint(&dp, EP_A, &frame);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(out.frame, frame);
    let b = counters(&dp, EP_B);
    assert_eq!((b.rx_packets, b.rx_bytes), (1, frame.len() as u64));
    assert_eq!(
        counters(&dp, UPLINK).rx_packets,
        0,
        "not sent to the uplink"
    );
}

#[test]
fn ids_and_address_lists_beyond_the_maps_are_refused_with_the_limit() {
    let dp = switch();
    let err = dp.add_network(1024, &NetworkConfig::default()).unwrap_err();
    assert!(err.to_string().contains("1..=1023"), "{err}");
    let err = dp.set_policy(1024, &[]).unwrap_err();
    assert!(
        matches!(err, DatapathError::Policy(PolicyError::InvalidId(1024))),
        "{err}"
    );
    let err = dp
        .configure_endpoint_maps(EP_A, &endpoint_a(Some(5000)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            DatapathError::Forwarding(ForwardingError::InvalidPolicyId(5000))
        ),
        "{err}"
    );
    let five: Vec<IpAddr> = (1..=5).map(|i| Ipv4Addr::new(10, 0, 0, i).into()).collect();
    let err = dp
        .configure_endpoint_maps(EP_A, &endpoint(NET, MAC_A, &five))
        .unwrap_err();
    assert!(err.to_string().contains("5 IPv4 addresses"), "{err}");
    // A refused change leaves the endpoint as it was.
    let frame = a_tcp_to(IP_PEER, 80);
    assert_sends_to_uplink(&dp, EP_A, &frame);
}

#[test]
fn every_endpoint_of_a_full_network_gets_its_unicast_even_with_colliding_macs() {
    let dp = switch();
    // A and B are members already; 254 more fill the network (FV_MAX_MEMBERS). Their MACs
    // differ in the last two bytes only, so many start their FDB probe in the same bucket.
    let others: Vec<(u32, Mac)> = (0..254u8)
        .map(|i| (910_000 + u32::from(i), [0x02, 0, 0, 0, i % 3, i]))
        .collect();
    for &(ifindex, mac) in &others {
        dp.configure_endpoint_maps(ifindex, &endpoint(NET, mac, &[]))
            .unwrap();
    }
    let full = dp.configure_endpoint_maps(999_999, &endpoint(NET, [0x02, 9, 9, 9, 9, 9], &[]));
    assert!(
        matches!(
            full,
            Err(DatapathError::Forwarding(ForwardingError::NetworkFull(NET)))
        ),
        "{full:?}"
    );
    for &(ifindex, mac) in &others {
        let frame = ipv4_frame(MAC_A, mac, IP_A, IP_PEER, udp_to(9));
        assert_eq!(from_endpoint(&dp, EP_A, &frame).verdict, TC_ACT_REDIRECT);
        assert_eq!(counters(&dp, ifindex).rx_packets, 1, "{mac:02x?}");
    }
    assert_eq!(
        counters(&dp, UPLINK).rx_packets,
        0,
        "none went to the uplink"
    );
    // One moves to another network: its MAC is unknown unicast here now (to the uplink),
    // and the FDB rebuilt without it still finds every other member.
    let (moved, moved_mac) = others[0];
    dp.configure_endpoint_maps(moved, &endpoint(NO_UPLINK_NET, moved_mac, &[]))
        .unwrap();
    let frame = ipv4_frame(MAC_A, moved_mac, IP_A, IP_PEER, udp_to(9));
    assert_sends_to_uplink(&dp, EP_A, &frame);
    for &(ifindex, mac) in &others[1..] {
        let frame = ipv4_frame(MAC_A, mac, IP_A, IP_PEER, udp_to(9));
        assert_eq!(from_endpoint(&dp, EP_A, &frame).verdict, TC_ACT_REDIRECT);
        assert_eq!(counters(&dp, ifindex).rx_packets, 2, "{mac:02x?}");
    }
    assert_eq!(counters(&dp, moved).rx_packets, 1);
}

#[test]
fn unicast_to_an_endpoint_of_another_network_goes_to_the_uplink_instead() {
    let dp = switch();
    let frame = ipv4_frame(MAC_A, MAC_V, IP_A, IP_PEER, tcp_to(80));
    assert_sends_to_uplink(&dp, EP_A, &frame);
    assert_eq!(counters(&dp, EP_V).rx_packets, 0);
}

#[test]
fn unknown_unicast_without_an_uplink_is_dropped_as_no_route() {
    let dp = switch();
    let frame = ipv4_frame(MAC_LONE, MAC_PEER, IP_PEER, IP_A, tcp_to(80));
    assert_drops(&dp, EP_LONE, &frame, |c| c.drop_no_route);
}

#[test]
fn frame_from_a_vlan_network_goes_to_the_uplink() {
    let dp = switch();
    let frame = ipv4_frame(MAC_V, MAC_PEER, IP_A, IP_PEER, tcp_to(80));
    let out = from_endpoint(&dp, EP_V, &frame);
    // bpf_skb_vlan_push puts the tag into the skb's metadata, which BPF_PROG_TEST_RUN does
    // not return: the output frame is unchanged. The namespace tests see the tag on the wire.
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let uplink = counters(&dp, UPLINK);
    assert_eq!(
        (uplink.rx_packets, uplink.rx_bytes),
        (1, frame.len() as u64)
    );
}

// ---- from the uplink (TC) -------------------------------------------------------------

fn from_uplink(dp: &TestDatapath, frame: &[u8]) -> TestRunOutput {
    run(dp, Program::FromUplink, UPLINK, frame)
}

#[test]
fn uplink_frame_tagged_for_a_network_is_untagged_and_redirected_to_its_endpoint() {
    let dp = switch();
    let untagged = ipv4_frame(MAC_PEER, MAC_V, IP_PEER, IP_A, tcp_to(80));
    let out = from_uplink(&dp, &with_vlan(&untagged, VLAN));
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(out.frame, untagged, "the tag is popped");
    let v = counters(&dp, EP_V);
    assert_eq!((v.rx_packets, v.rx_bytes), (1, untagged.len() as u64));
    assert_eq!(counters(&dp, UPLINK).tx_packets, 1);
}

#[test]
fn untagged_uplink_frame_is_redirected_to_the_untagged_networks_endpoint() {
    let dp = switch();
    let frame = ipv4_frame(MAC_PEER, MAC_A, IP_PEER, IP_A, tcp_to(80));
    let out = from_uplink(&dp, &frame);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(out.frame, frame);
    assert_eq!(counters(&dp, EP_A).rx_packets, 1);
}

#[test]
fn uplink_frame_tagged_for_another_vlan_passes_to_the_host_untouched() {
    let dp = switch();
    let frame = with_vlan(&ipv4_frame(MAC_PEER, MAC_V, IP_PEER, IP_A, tcp_to(80)), 200);
    let out = from_uplink(&dp, &frame);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.frame, frame);
    assert_eq!(counters(&dp, EP_V).rx_packets, 0);
}

#[test]
fn uplink_frame_tagged_for_a_network_but_to_another_networks_mac_passes_to_the_host() {
    let dp = switch();
    // MAC_A is on the untagged network, not VLAN 100's: no leaking across networks.
    let frame = with_vlan(
        &ipv4_frame(MAC_PEER, MAC_A, IP_PEER, IP_A, tcp_to(80)),
        VLAN,
    );
    let out = from_uplink(&dp, &frame);
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(out.frame, frame);
    assert_eq!(counters(&dp, EP_A).rx_packets, 0);
}

// ---- from the uplink (XDP) ------------------------------------------------------------

fn from_uplink_xdp(dp: &TestDatapath, frame: &[u8]) -> TestRunOutput {
    run(dp, Program::XdpFromUplink, LO, frame)
}

/// The switch with `lo` as VLAN_NET's uplink.
fn switch_with_lo_uplink() -> TestDatapath {
    let dp = switch();
    dp.configure_uplink_maps(LO, VLAN_NET).unwrap();
    dp
}

#[test]
fn xdp_pops_the_networks_tag_and_redirects_to_the_endpoint() {
    let dp = switch_with_lo_uplink();
    let untagged = ipv4_frame(MAC_PEER, MAC_V, IP_PEER, IP_A, tcp_to(80));
    let out = from_uplink_xdp(&dp, &with_vlan(&untagged, VLAN));
    assert_eq!(out.verdict, XDP_REDIRECT);
    assert_eq!(out.frame, untagged, "the tag is popped");
    assert_eq!(counters(&dp, EP_V).rx_bytes, untagged.len() as u64);
    assert_eq!(counters(&dp, LO).tx_packets, 1);
}

#[test]
fn xdp_passes_broadcast_to_the_tc_program() {
    let dp = switch_with_lo_uplink();
    let frame = with_vlan(
        &ethernet(
            BROADCAST,
            MAC_PEER,
            ETHERTYPE_ARP,
            &arp(1, MAC_PEER, IP_PEER, [0; 6], IP_A),
        ),
        VLAN,
    );
    let out = from_uplink_xdp(&dp, &frame);
    assert_eq!(out.verdict, XDP_PASS);
    assert_eq!(out.frame, frame);
}

#[test]
fn xdp_passes_unknown_unicast_and_other_vlans() {
    let dp = switch_with_lo_uplink();
    let to_host = with_vlan(
        &ipv4_frame(MAC_PEER, MAC_PEER, IP_PEER, IP_A, tcp_to(80)),
        VLAN,
    );
    let other_vlan = with_vlan(&ipv4_frame(MAC_PEER, MAC_V, IP_PEER, IP_A, tcp_to(80)), 200);
    for frame in [to_host, other_vlan] {
        let out = from_uplink_xdp(&dp, &frame);
        assert_eq!(out.verdict, XDP_PASS);
        assert_eq!(out.frame, frame);
    }
    assert_eq!(counters(&dp, EP_V).rx_packets, 0);
}

// ---- flooding -------------------------------------------------------------------------

/// One end of a veth pair (both up, so it has carrier and transmits), deleted with its
/// peer on Drop: a real ifindex for bpf_clone_redirect. (A TAP without a reader has no
/// carrier and drops; this kernel has no dummy links.)
struct Member {
    guard: CleanupGuard,
    ifindex: u32,
}

impl Member {
    fn create() -> Member {
        let name = unique_name("fvm");
        let peer = unique_name("fvp");
        ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]).expect("add a veth");
        let guard = CleanupGuard::new(name, |name| {
            let _ = ip(&["link", "del", name]);
        });
        for end in [guard.name(), &peer] {
            ip(&["link", "set", end, "up"]).expect("ip link set up");
        }
        // Until linkwatch has run (asynchronously, after the carrier came on) the device still
        // has the noop qdisc, which drops what bpf_clone_redirect hands it; linkwatch sets
        // operstate in the same step, so "up" means the real qdisc is attached.
        let operstate = format!("/sys/class/net/{}/operstate", guard.name());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_to_string(&operstate)
            .unwrap_or_default()
            .trim()
            != "up"
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{} never came up",
                guard.name()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let ifindex = std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", guard.name()))
            .expect("ifindex")
            .trim()
            .parse()
            .expect("numeric ifindex");
        Member { guard, ifindex }
    }
}

/// NET plus two endpoints on real veths.
fn switch_with_tap_members() -> (TestDatapath, [Member; 2]) {
    let dp = switch();
    let members = [Member::create(), Member::create()];
    for (i, member) in members.iter().enumerate() {
        let mac = [0x02, 0, 0, 0, 1, i as u8];
        dp.configure_endpoint_maps(member.ifindex, &endpoint(NET, mac, &[]))
            .unwrap();
    }
    (dp, members)
}

#[test]
fn broadcast_from_an_endpoint_is_cloned_to_every_member_and_sent_to_the_uplink() {
    let (dp, members) = switch_with_tap_members();
    let frame = ethernet(
        BROADCAST,
        MAC_A,
        ETHERTYPE_ARP,
        &arp(1, MAC_A, IP_A, [0; 6], IP_PEER),
    );
    let out = from_endpoint(&dp, EP_A, &frame);
    assert_eq!(
        out.verdict, TC_ACT_REDIRECT,
        "the original goes to the uplink"
    );
    for member in &members {
        let c = counters(&dp, member.ifindex);
        assert_eq!(
            (c.rx_packets, c.rx_bytes),
            (1, frame.len() as u64),
            "{}",
            member.guard.name()
        );
    }
    assert_eq!(
        counters(&dp, EP_A).rx_packets,
        0,
        "no copy back to the sender"
    );
    assert_eq!(
        counters(&dp, EP_V).rx_packets,
        0,
        "no copy into another network"
    );
    assert_eq!(counters(&dp, UPLINK).rx_packets, 1);
}

#[test]
fn broadcast_from_the_uplink_is_cloned_to_every_member_and_passed_to_the_host() {
    let (dp, members) = switch_with_tap_members();
    let frame = ethernet(
        BROADCAST,
        MAC_PEER,
        ETHERTYPE_ARP,
        &arp(1, MAC_PEER, IP_PEER, [0; 6], IP_A),
    );
    let out = from_uplink(&dp, &frame);
    assert_eq!(out.verdict, TC_ACT_OK, "the host sees it too");
    assert_eq!(out.frame, frame);
    for member in &members {
        assert_eq!(
            counters(&dp, member.ifindex).rx_packets,
            1,
            "{}",
            member.guard.name()
        );
    }
    assert_eq!(counters(&dp, UPLINK).tx_packets, 1);
}

// ---- map layouts ----------------------------------------------------------------------

#[test]
fn rust_mirrors_match_the_key_and_value_sizes_of_the_loaded_maps() {
    use aya::maps::MapInfo;
    use ferrovirt_ebpf::maps::*;

    let dp = TestDatapath::load();
    let u32_size = size_of::<u32>();
    let expected = [
        ("fv_port_slots", u32_size, u32_size),
        ("fv_port_slots_high", u32_size, u32_size),
        ("fv_ports", u32_size, size_of::<FvPort>()),
        ("fv_port_alloc", u32_size, size_of::<FvPortAlloc>()),
        ("fv_networks", u32_size, size_of::<FvNetwork>()),
        ("fv_policies", u32_size, size_of::<FvPolicy>()),
        ("fv_uplinks", size_of::<FvUplinkKey>(), u32_size),
        ("fv_counters", u32_size, size_of::<Counters>()),
    ];
    for (name, key_size, value_size) in expected {
        // The kernel took these sizes from the object's BTF (__type(key/value, ...)).
        let info = MapInfo::from_pin(dp.config().pin_dir.join(name)).expect(name);
        assert_eq!(info.key_size() as usize, key_size, "{name} key");
        assert_eq!(info.value_size() as usize, value_size, "{name} value");
    }
}
