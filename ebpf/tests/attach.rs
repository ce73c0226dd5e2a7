//! Attaching to real interfaces: cls_bpf filters on endpoint TAPs, TCX links on uplink veths,
//! XDP on an uplink, pins that
//! outlive the Datapath handle, and the errors a caller can get. Needs root and bpffs.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use aya::Pod;
use aya::maps::{Array, Map, MapData};
use aya::programs::SchedClassifier;
use aya::programs::tc::TcAttachType;
use common::TestDatapath;
use ferrovirt_ebpf::maps::{FvNetwork, FvPort};
use ferrovirt_ebpf::{
    AttachError, Datapath, DatapathError, EndpointConfig, ForwardingError, NetworkConfig,
    UplinkMode,
};
use ferrovirt_tests::names::{CleanupGuard, Link, NetNs, Tap, ip, unique_name};

const NET: u32 = 1;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10));

fn endpoint() -> EndpointConfig {
    EndpointConfig {
        network: NET,
        mac: MAC,
        addresses: vec![IP],
        policy: None,
    }
}

fn switch() -> TestDatapath {
    let dp = TestDatapath::load();
    dp.add_network(NET, &NetworkConfig::default()).unwrap();
    dp
}

fn ifindex(ifname: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
        .expect("interface exists")
        .trim()
        .parse()
        .expect("numeric ifindex")
}

/// Ids of the programs on `ifname`'s TC ingress: its TCX links, then the BPF filters of its
/// clsact qdisc as `tc filter show` lists them.
fn ingress_programs(ifname: &str) -> Vec<u32> {
    let (_, programs) =
        SchedClassifier::query_tcx(ifname, TcAttachType::Ingress).expect("query TCX");
    let mut ids: Vec<u32> = programs.iter().map(|p| p.id()).collect();
    let out = Command::new("tc")
        .args(["filter", "show", "dev", ifname, "ingress"])
        .output()
        .expect("run tc");
    let filters = String::from_utf8_lossy(&out.stdout);
    let mut words = filters.split_whitespace();
    while let Some(word) = words.next() {
        if word == "id" {
            ids.push(words.next().and_then(|id| id.parse().ok()).expect("id N"));
        }
    }
    ids
}

/// True if `ip link` shows an XDP program (native or generic) on `ifname`.
fn has_xdp(ifname: &str) -> bool {
    let out = Command::new("ip")
        .args(["link", "show", "dev", ifname])
        .output()
        .expect("run ip");
    let first_line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    first_line.contains(" xdp")
}

fn pinned_array<V: Pod>(dp: &TestDatapath, name: &str) -> Array<MapData, V> {
    let data = MapData::from_pin(dp.config().pin_dir.join(name)).expect(name);
    Array::try_from(Map::from_map_data(data).expect(name)).expect(name)
}

/// The slot fv_port_slots gives `ifindex` (0: none).
fn slot_of(dp: &TestDatapath, ifindex: u32) -> u32 {
    let slots: Array<_, u32> = pinned_array(dp, "fv_port_slots");
    slots
        .get(&ifindex, 0)
        .expect("ifindex below FV_MAX_IFINDEX")
}

/// Asserts no map holds anything of the endpoint on `ifindex`.
fn assert_no_entries_of(dp: &TestDatapath, ifindex: u32) {
    assert_eq!(slot_of(dp, ifindex), 0, "the ifindex still maps to a slot");
    let ports: Array<_, FvPort> = pinned_array(dp, "fv_ports");
    assert!(
        ports
            .iter()
            .all(|port| port.expect("read").ifindex != ifindex),
        "port entry left"
    );
    let networks: Array<_, FvNetwork> = pinned_array(dp, "fv_networks");
    let net = networks.get(&NET, 0).expect("network stays");
    assert!(net.present(), "network stays");
    assert_eq!(net.members().count(), 0, "still a flood member");
    assert!(net.fdb.iter().all(|&e| e == 0), "FDB entry left");
    assert!(matches!(
        dp.counters_by_ifindex(ifindex),
        Err(DatapathError::NoCounters(_))
    ));
}

#[test]
fn attaching_an_endpoint_twice_leaves_one_program_on_its_ingress() {
    let dp = switch();
    let tap = Tap::create("fvat", false).unwrap();
    dp.attach_endpoint(tap.name(), &endpoint()).unwrap();
    let first = ingress_programs(tap.name());
    assert_eq!(first.len(), 1);
    dp.attach_endpoint(tap.name(), &endpoint()).unwrap();
    assert_eq!(
        ingress_programs(tap.name()),
        first,
        "the same single program"
    );
    assert_eq!(dp.counters(tap.name()).unwrap().tx_packets, 0);
}

#[test]
fn detaching_an_endpoint_removes_its_program_and_map_entries() {
    let dp = switch();
    let tap = Tap::create("fvdt", false).unwrap();
    dp.attach_endpoint(tap.name(), &endpoint()).unwrap();
    dp.detach_endpoint(tap.name()).unwrap();
    assert!(ingress_programs(tap.name()).is_empty());
    assert_no_entries_of(&dp, ifindex(tap.name()));
    dp.detach_endpoint(tap.name())
        .expect("detaching twice is fine");
}

#[test]
fn detaching_after_the_interface_is_gone_still_removes_map_entries() {
    let dp = switch();
    let tap = Tap::create("fvgo", false).unwrap();
    let name = tap.name().to_string();
    let tap_ifindex = ifindex(&name);
    dp.attach_endpoint(&name, &endpoint()).unwrap();
    drop(tap);
    dp.detach_endpoint(&name).unwrap();
    assert_no_entries_of(&dp, tap_ifindex);
}

#[test]
fn a_second_datapath_opened_from_the_pins_shares_maps_programs_and_links() {
    let dp = switch();
    let tap = Tap::create("fvre", false).unwrap();
    dp.attach_endpoint(tap.name(), &endpoint()).unwrap();
    let program = ingress_programs(tap.name());

    let second = Datapath::open_or_load(dp.config()).unwrap();
    second
        .counters(tap.name())
        .expect("sees the first one's counters");
    second.attach_endpoint(tap.name(), &endpoint()).unwrap();
    assert_eq!(
        ingress_programs(tap.name()),
        program,
        "the pinned program, not a second load"
    );
    second.detach_endpoint(tap.name()).unwrap();
    drop(second);
    assert!(ingress_programs(tap.name()).is_empty());
    assert_no_entries_of(&dp, ifindex(tap.name()));
}

#[test]
fn attached_programs_outlive_the_datapath_handle() {
    let dp = switch();
    let tap = Tap::create("fvol", false).unwrap();
    {
        let short_lived = Datapath::open_or_load(dp.config()).unwrap();
        short_lived
            .attach_endpoint(tap.name(), &endpoint())
            .unwrap();
    }
    assert_eq!(ingress_programs(tap.name()).len(), 1);
}

/// Ids of the programs of the cls_bpf filters on `ifname`'s clsact ingress alone.
fn filter_programs(ifname: &str) -> Vec<u32> {
    let (_, tcx) = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress).expect("query TCX");
    let tcx: Vec<u32> = tcx.iter().map(|p| p.id()).collect();
    ingress_programs(ifname)
        .into_iter()
        .filter(|id| !tcx.contains(id))
        .collect()
}

/// The names under the pin directory's `links/`.
fn link_pins(dp: &TestDatapath) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dp.config().pin_dir.join("links"))
        .expect("links dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_filter_endpoint_is_swapped_for_a_tcx_link_and_keeps_its_maps() {
    let dp = switch();
    let tap = Tap::create("fvfl", false).unwrap();
    let index = ifindex(tap.name());
    dp.attach_endpoint_filter(tap.name(), &endpoint()).unwrap();
    let filter = filter_programs(tap.name());
    assert_eq!(filter.len(), 1, "one filter");
    assert_eq!(ingress_programs(tap.name()), filter, "and no TCX link");
    assert_eq!(
        link_pins(&dp),
        [format!("endpoint-filter:{index}:{}", tap.name())]
    );
    dp.attach_endpoint_filter(tap.name(), &endpoint()).unwrap();
    assert_eq!(filter_programs(tap.name()), filter, "replaced, not stacked");

    assert!(dp.link_endpoint_filter(tap.name()).unwrap());
    assert!(filter_programs(tap.name()).is_empty(), "the filter is gone");
    assert_eq!(
        ingress_programs(tap.name()),
        filter,
        "the same program, linked"
    );
    assert_eq!(link_pins(&dp), [format!("endpoint:{index}:{}", tap.name())]);
    assert_ne!(slot_of(&dp, index), 0, "the endpoint stays");
    assert!(
        !dp.link_endpoint_filter(tap.name()).unwrap(),
        "nothing left to swap"
    );

    // A filter asked for over a link keeps the link: it would run first anyway.
    dp.attach_endpoint_filter(tap.name(), &endpoint()).unwrap();
    assert!(filter_programs(tap.name()).is_empty());
    assert_eq!(ingress_programs(tap.name()).len(), 1);
}

#[test]
fn detaching_a_filter_endpoint_leaves_no_filter_pin_or_entry() {
    let dp = switch();
    let tap = Tap::create("fvfd", false).unwrap();
    dp.attach_endpoint_filter(tap.name(), &endpoint()).unwrap();
    dp.detach_endpoint(tap.name()).unwrap();
    assert!(ingress_programs(tap.name()).is_empty());
    assert!(link_pins(&dp).is_empty(), "{:?}", link_pins(&dp));
    assert_no_entries_of(&dp, ifindex(tap.name()));

    // The same after the interface is gone: the record keeps the ifindex.
    let gone = Tap::create("fvfg", false).unwrap();
    let name = gone.name().to_string();
    let gone_index = ifindex(&name);
    dp.attach_endpoint_filter(&name, &endpoint()).unwrap();
    drop(gone);
    dp.detach_endpoint(&name).unwrap();
    assert!(link_pins(&dp).is_empty(), "{:?}", link_pins(&dp));
    assert_no_entries_of(&dp, gone_index);
}

/// A veth pair, both ends up; deleted on Drop.
fn veth() -> CleanupGuard {
    let name = unique_name("fvu");
    let peer = unique_name("fvq");
    ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]).unwrap();
    let guard = CleanupGuard::new(name, |name| {
        let _ = ip(&["link", "del", name]);
    });
    for end in [guard.name(), &peer] {
        ip(&["link", "set", end, "up"]).unwrap();
    }
    guard
}

#[test]
fn xdp_uplink_gets_xdp_and_tc_and_detaching_removes_both() {
    let dp = switch();
    let uplink = veth();
    dp.attach_uplink(uplink.name(), NET, UplinkMode::Xdp)
        .unwrap();
    dp.attach_uplink(uplink.name(), NET, UplinkMode::Xdp)
        .unwrap();
    assert_eq!(ingress_programs(uplink.name()).len(), 1);
    assert!(has_xdp(uplink.name()));
    dp.counters(uplink.name()).expect("uplink counters");

    dp.detach_uplink(uplink.name(), NET).unwrap();
    assert!(ingress_programs(uplink.name()).is_empty());
    assert!(!has_xdp(uplink.name()));
}

#[test]
fn switching_an_uplink_to_tc_mode_removes_its_xdp_program() {
    let dp = switch();
    let uplink = veth();
    dp.attach_uplink(uplink.name(), NET, UplinkMode::Xdp)
        .unwrap();
    dp.attach_uplink(uplink.name(), NET, UplinkMode::Tc)
        .unwrap();
    assert!(!has_xdp(uplink.name()));
    assert_eq!(ingress_programs(uplink.name()).len(), 1);
}

#[test]
fn an_uplink_shared_by_two_networks_stays_until_the_last_detaches() {
    let dp = switch();
    dp.add_network(2, &NetworkConfig { vlan: Some(100) })
        .unwrap();
    let uplink = veth();
    dp.attach_uplink(uplink.name(), NET, UplinkMode::Tc)
        .unwrap();
    dp.attach_uplink(uplink.name(), 2, UplinkMode::Tc).unwrap();
    dp.detach_uplink(uplink.name(), NET).unwrap();
    assert_eq!(ingress_programs(uplink.name()).len(), 1);
    dp.remove_network(2).unwrap();
    assert!(ingress_programs(uplink.name()).is_empty());
}

#[test]
fn destroy_detaches_everything() {
    let dp = switch();
    let tap = Tap::create("fvds", false).unwrap();
    let uplink = veth();
    dp.attach_endpoint(tap.name(), &endpoint()).unwrap();
    dp.attach_uplink(uplink.name(), NET, UplinkMode::Xdp)
        .unwrap();
    let pin_dir = dp.config().pin_dir.clone();
    drop(dp); // TestDatapath::drop calls destroy
    assert!(ingress_programs(tap.name()).is_empty());
    assert!(ingress_programs(uplink.name()).is_empty());
    assert!(!has_xdp(uplink.name()));
    assert!(!pin_dir.exists());
}

// ---- errors ---------------------------------------------------------------------------

#[test]
fn attaching_to_a_missing_interface_says_so() {
    let dp = switch();
    let err = dp.attach_endpoint("fvnosuchif0", &endpoint()).unwrap_err();
    assert!(
        matches!(err, DatapathError::Attach(AttachError::InterfaceMissing(ref name)) if name == "fvnosuchif0"),
        "{err}"
    );
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn attaching_to_an_unknown_network_says_so() {
    let dp = switch();
    let tap = Tap::create("fvun", false).unwrap();
    let config = EndpointConfig {
        network: 42,
        ..endpoint()
    };
    let err = dp.attach_endpoint(tap.name(), &config).unwrap_err();
    assert!(
        matches!(
            err,
            DatapathError::Forwarding(ForwardingError::UnknownNetwork(42))
        ),
        "{err}"
    );
    assert!(ingress_programs(tap.name()).is_empty(), "nothing attached");
}

#[test]
fn ensure_network_creates_a_missing_network_once_and_keeps_an_existing_vlan() {
    let dp = switch();
    let tap = Tap::create("fvens", false).unwrap();
    assert!(dp.ensure_network(43).unwrap());
    assert!(!dp.ensure_network(43).unwrap());
    let config = EndpointConfig {
        network: 43,
        ..endpoint()
    };
    dp.attach_endpoint(tap.name(), &config).unwrap();
    assert!(!ingress_programs(tap.name()).is_empty());
    dp.detach_endpoint(tap.name()).unwrap();
    // A network an operator set up is left as it is.
    dp.add_network(44, &NetworkConfig { vlan: Some(100) })
        .unwrap();
    assert!(!dp.ensure_network(44).unwrap());
    let err = dp.ensure_network(0).unwrap_err();
    assert!(
        matches!(
            err,
            DatapathError::Forwarding(ForwardingError::InvalidNetworkId(0))
        ),
        "{err}"
    );
}

#[test]
fn out_of_range_vlans_are_refused() {
    let dp = switch();
    for vlan in [0, 4095] {
        let err = dp
            .add_network(2, &NetworkConfig { vlan: Some(vlan) })
            .unwrap_err();
        assert!(
            matches!(err, DatapathError::Forwarding(ForwardingError::BadVlan(v)) if v == vlan),
            "{err}"
        );
    }
}

#[test]
fn a_network_with_endpoints_cannot_be_removed() {
    let dp = switch();
    dp.configure_endpoint_maps(900_001, &endpoint()).unwrap();
    let err = dp.remove_network(NET).unwrap_err();
    assert!(
        matches!(
            err,
            DatapathError::Forwarding(ForwardingError::NetworkInUse { members: 1, .. })
        ),
        "{err}"
    );
}

/// The flags of `ifindex`'s member entry on NET.
fn member_flags(dp: &TestDatapath, ifindex: u32) -> u16 {
    let networks: Array<_, FvNetwork> = pinned_array(dp, "fv_networks");
    let net = networks.get(&NET, 0).expect("network");
    let member = net.members().find(|m| m.ifindex == ifindex);
    member.expect("a member").flags
}

#[test]
fn only_a_veth_whose_peer_is_in_another_namespace_is_reached_through_its_peer() {
    const MEMBER_PEER: u16 = 1;
    let dp = switch();
    let ns = NetNs::create("fvpr").unwrap();
    let (into_ns, peer) = Link::veth("fvpr").unwrap();
    ip(&["link", "set", &peer, "netns", ns.name()]).unwrap();
    let (both_here, _peer_here) = Link::veth("fvpr").unwrap();
    let tap = Tap::create("fvpr", false).unwrap();
    let cases = [
        (into_ns.name(), MEMBER_PEER),
        (both_here.name(), 0),
        (tap.name(), 0),
    ];
    for (last, (ifname, flags)) in cases.into_iter().enumerate() {
        let config = EndpointConfig {
            mac: [0x02, 0, 0, 0, 1, last as u8],
            addresses: Vec::new(),
            ..endpoint()
        };
        dp.attach_endpoint_filter(ifname, &config).unwrap();
        assert_eq!(member_flags(&dp, ifindex(ifname)), flags, "{ifname}");
        dp.detach_endpoint(ifname).unwrap();
    }
}

#[test]
fn two_endpoints_cannot_claim_one_mac_on_a_network() {
    let dp = switch();
    dp.configure_endpoint_maps(900_001, &endpoint()).unwrap();
    let err = dp
        .configure_endpoint_maps(900_002, &endpoint())
        .unwrap_err();
    assert!(
        matches!(
            err,
            DatapathError::Forwarding(ForwardingError::MacInUse { owner: 900_001, .. })
        ),
        "{err}"
    );
}

#[test]
fn a_pin_dir_outside_bpffs_is_refused_with_the_mount_to_make() {
    let config = ferrovirt_ebpf::DatapathConfig {
        pin_dir: std::env::temp_dir().join(unique_name("fvnobpffs")),
    };
    let err = Datapath::open_or_load(&config).err().expect("not on bpffs");
    assert!(err.to_string().contains("mount -t bpf"), "{err}");
}
