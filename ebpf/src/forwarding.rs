//! The switch's forwarding state in the maps: networks (VLAN, uplink, flood members),
//! endpoints (MAC, addresses, policy) with their FDB entries, and uplinks.
//!
//! Callers hold the pin directory's lock: every function here reads, modifies and writes
//! entries that another process may change too.

use std::net::IpAddr;

use crate::maps::{
    self, EP_CHECK_IP, FvNetwork, FvPort, FvUplinkKey, MAX_ADDRS, MAX_MEMBERS, MAX_NETWORKS,
    MAX_POLICIES, MEMBER_PEER, Maps, MapsError, NET_PRESENT, PORT_ENDPOINT, PORT_UPLINK, lookup,
    remove_result, update_error,
};
use crate::policy::PolicyId;

/// A network id, 1..=1023 (the index of its entry in the maps).
pub type NetworkId = u32;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The 802.1Q VLAN id (1..=4094) of the network on its uplink; None: untagged.
    pub vlan: Option<u16>,
}

/// A VM NIC (TAP) on a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub network: NetworkId,
    /// The only source MAC the VM may send.
    pub mac: [u8; 6],
    /// The only source addresses it may send (at most 4 IPv4 and 4 IPv6); empty: no IP
    /// anti-spoofing for this endpoint.
    pub addresses: Vec<IpAddr>,
    /// Its egress allow-list; None: everything allowed.
    pub policy: Option<PolicyId>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    #[error("network id {0} is out of range; use ids 1..={max}", max = MAX_NETWORKS - 1)]
    InvalidNetworkId(NetworkId),
    #[error("network {0} does not exist; add it with add_network first")]
    UnknownNetwork(NetworkId),
    #[error("VLAN {0} is out of range; 802.1Q VLAN ids are 1..=4094")]
    BadVlan(u16),
    #[error(
        "policy id {0} is out of range; use None for no policy or ids 1..={max}",
        max = MAX_POLICIES - 1
    )]
    InvalidPolicyId(PolicyId),
    #[error(
        "the endpoint has {count} {family} addresses; at most {MAX_ADDRS} per family fit: give it fewer"
    )]
    TooManyAddresses { family: &'static str, count: usize },
    #[error("network {network} still has {members} endpoint(s); detach them first")]
    NetworkInUse { network: NetworkId, members: usize },
    #[error(
        "network {0} already has {MAX_MEMBERS} endpoints, the most one network floods to; use another network"
    )]
    NetworkFull(NetworkId),
    #[error("{} is not a unicast MAC; give the endpoint its NIC's MAC", format_mac(.0))]
    BadMac([u8; 6]),
    #[error(
        "MAC {} is already used by interface index {owner} on network {network}; detach that endpoint or pick another MAC",
        format_mac(.mac)
    )]
    MacInUse {
        mac: [u8; 6],
        network: NetworkId,
        owner: u32,
    },
    #[error(
        "interface index {ifindex} with VLAN {vlan} already carries network {network}; give the networks different VLANs"
    )]
    UplinkInUse {
        ifindex: u32,
        vlan: u16,
        network: NetworkId,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn check_network_id(id: NetworkId) -> Result<(), ForwardingError> {
    if (1..MAX_NETWORKS).contains(&id) {
        Ok(())
    } else {
        Err(ForwardingError::InvalidNetworkId(id))
    }
}

/// Network `id`, which must exist.
fn network(maps: &Maps, id: NetworkId) -> Result<FvNetwork, ForwardingError> {
    check_network_id(id)?;
    let net = maps.network(id)?;
    if net.present() {
        Ok(net)
    } else {
        Err(ForwardingError::UnknownNetwork(id))
    }
}

/// Network `id` if it exists.
fn existing_network(maps: &Maps, id: NetworkId) -> Result<Option<FvNetwork>, MapsError> {
    if !(1..MAX_NETWORKS).contains(&id) {
        return Ok(None);
    }
    let net = maps.network(id)?;
    Ok(net.present().then_some(net))
}

/// Creates network `id` or changes its VLAN, keeping its uplink and members.
pub(crate) fn add_network(
    maps: &mut Maps,
    id: NetworkId,
    config: &NetworkConfig,
) -> Result<(), ForwardingError> {
    check_network_id(id)?;
    let vlan = match config.vlan {
        None => 0,
        Some(vlan @ 1..=4094) => vlan,
        Some(vlan) => return Err(ForwardingError::BadVlan(vlan)),
    };
    let mut net = existing_network(maps, id)?.unwrap_or_default();
    if net.uplink != 0 && net.vlan != vlan {
        claim_uplink_key(maps, uplink_key(net.uplink, vlan), id)?;
        release_uplink_key(maps, uplink_key(net.uplink, net.vlan), id)?;
    }
    net.vlan = vlan;
    net.flags |= NET_PRESENT;
    Ok(maps.write_network(id, &net)?)
}

/// Creates network `id` without a VLAN unless it exists (whose settings are kept); whether
/// it was created.
pub(crate) fn ensure_network(maps: &mut Maps, id: NetworkId) -> Result<bool, ForwardingError> {
    check_network_id(id)?;
    if existing_network(maps, id)?.is_some() {
        return Ok(false);
    }
    let net = FvNetwork {
        flags: NET_PRESENT,
        ..FvNetwork::default()
    };
    maps.write_network(id, &net)?;
    Ok(true)
}

/// Removes network `id` if no endpoint is on it; returns its uplink if no other network
/// uses that uplink any more (its programs can be detached).
pub(crate) fn remove_network(
    maps: &mut Maps,
    id: NetworkId,
) -> Result<Option<u32>, ForwardingError> {
    check_network_id(id)?;
    let Some(net) = existing_network(maps, id)? else {
        return Ok(None);
    };
    let members = net.members().count();
    if members > 0 {
        return Err(ForwardingError::NetworkInUse {
            network: id,
            members,
        });
    }
    let unused_uplink = if net.uplink != 0 {
        remove_uplink(maps, net.uplink, id)?.then_some(net.uplink)
    } else {
        None
    };
    maps.write_network(id, &FvNetwork::default())?;
    Ok(unused_uplink)
}

fn uplink_key(ifindex: u32, vlan: u16) -> FvUplinkKey {
    FvUplinkKey {
        ifindex,
        vlan: u32::from(vlan),
    }
}

/// Maps (uplink, VLAN) to `network`, unless another network has it.
fn claim_uplink_key(
    maps: &mut Maps,
    key: FvUplinkKey,
    network: NetworkId,
) -> Result<(), ForwardingError> {
    match lookup("fv_uplinks", &maps.uplinks, &key)? {
        Some(other) if other != network => Err(ForwardingError::UplinkInUse {
            ifindex: key.ifindex,
            vlan: key.vlan as u16,
            network: other,
        }),
        _ => Ok(maps
            .uplinks
            .insert(key, network, 0)
            .map_err(update_error("fv_uplinks"))?),
    }
}

/// Removes the (uplink, VLAN) entry if it is `network`'s.
fn release_uplink_key(
    maps: &mut Maps,
    key: FvUplinkKey,
    network: NetworkId,
) -> Result<(), MapsError> {
    if lookup("fv_uplinks", &maps.uplinks, &key)? == Some(network) {
        remove_result("fv_uplinks", maps.uplinks.remove(&key))?;
    }
    Ok(())
}

fn uplink_in_use(maps: &Maps, ifindex: u32) -> Result<bool, MapsError> {
    Ok(maps::keys("fv_uplinks", &maps.uplinks)?
        .iter()
        .any(|key| key.ifindex == ifindex))
}

/// Makes `ifindex` the uplink of `network`; returns the network's previous uplink if no
/// network uses it any more.
pub(crate) fn configure_uplink(
    maps: &mut Maps,
    ifindex: u32,
    network: NetworkId,
) -> Result<Option<u32>, ForwardingError> {
    let mut net = self::network(maps, network)?;
    claim_uplink_key(maps, uplink_key(ifindex, net.vlan), network)?;
    let port = match maps.port_of(ifindex)? {
        Some((_, port)) => FvPort {
            flags: port.flags | PORT_UPLINK,
            ..port
        },
        None => FvPort {
            flags: PORT_UPLINK,
            ifindex,
            ..FvPort::default()
        },
    };
    let slot = maps.write_port(&port)?;
    let previous = net.uplink;
    net.uplink = ifindex;
    net.uplink_slot = slot;
    maps.write_network(network, &net)?;
    if previous == 0 || previous == ifindex {
        return Ok(None);
    }
    release_uplink_key(maps, uplink_key(previous, net.vlan), network)?;
    Ok(forget_uplink_if_unused(maps, previous)?.then_some(previous))
}

/// Takes `ifindex` away as `network`'s uplink; true if no network uses it any more.
pub(crate) fn remove_uplink(
    maps: &mut Maps,
    ifindex: u32,
    network: NetworkId,
) -> Result<bool, ForwardingError> {
    if let Some(mut net) = existing_network(maps, network)?
        && net.uplink == ifindex
    {
        release_uplink_key(maps, uplink_key(ifindex, net.vlan), network)?;
        net.uplink = 0;
        net.uplink_slot = 0;
        maps.write_network(network, &net)?;
    }
    Ok(forget_uplink_if_unused(maps, ifindex)?)
}

/// Frees the slot of an uplink no network uses; true if it was unused.
fn forget_uplink_if_unused(maps: &mut Maps, ifindex: u32) -> Result<bool, MapsError> {
    if uplink_in_use(maps, ifindex)? {
        return Ok(false);
    }
    if let Some((_, port)) = maps.port_of(ifindex)?
        && port.flags & PORT_UPLINK != 0
    {
        maps.remove_port(ifindex)?;
    }
    Ok(true)
}

/// The endpoint's port entry for `config`: MAC, network, policy and its addresses inline.
fn endpoint_port(ifindex: u32, config: &EndpointConfig) -> Result<FvPort, ForwardingError> {
    if config
        .policy
        .is_some_and(|id| !(1..MAX_POLICIES).contains(&id))
    {
        return Err(ForwardingError::InvalidPolicyId(config.policy.unwrap_or(0)));
    }
    if config.mac[0] & 1 != 0 || config.mac == [0; 6] {
        return Err(ForwardingError::BadMac(config.mac));
    }
    let mut port = FvPort {
        mac: config.mac,
        flags: PORT_ENDPOINT,
        ifindex,
        network: config.network,
        policy: config.policy.unwrap_or(0),
        ..FvPort::default()
    };
    if !config.addresses.is_empty() {
        port.flags |= EP_CHECK_IP;
    }
    let mut addresses = config.addresses.clone();
    addresses.sort_unstable();
    addresses.dedup();
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for address in addresses {
        match address {
            IpAddr::V4(a) => v4.push(a.octets()),
            IpAddr::V6(a) => v6.push(a.octets()),
        }
    }
    for (family, count) in [("IPv4", v4.len()), ("IPv6", v6.len())] {
        if count > MAX_ADDRS {
            return Err(ForwardingError::TooManyAddresses { family, count });
        }
    }
    port.addr4[..v4.len()].copy_from_slice(&v4);
    port.addr6[..v6.len()].copy_from_slice(&v6);
    port.addr4_count = v4.len() as u8;
    port.addr6_count = v6.len() as u8;
    Ok(port)
}

/// Fills the maps for the endpoint on `ifindex`: its port (MAC, addresses, policy,
/// counters) and its network's member and FDB entry (`peer`: a veth whose peer is in another
/// namespace, which frames reach by bpf_redirect_peer). Running it again with another
/// config moves the endpoint.
pub(crate) fn configure_endpoint(
    maps: &mut Maps,
    ifindex: u32,
    config: &EndpointConfig,
    peer: bool,
) -> Result<(), ForwardingError> {
    let port = endpoint_port(ifindex, config)?;
    let mut net = network(maps, config.network)?;
    if let Some(owner) = net.lookup(&config.mac)
        && owner.ifindex != ifindex
    {
        return Err(ForwardingError::MacInUse {
            mac: config.mac,
            network: config.network,
            owner: owner.ifindex,
        });
    }
    let joins = !net.members().any(|m| m.ifindex == ifindex);
    if joins && net.members().count() >= MAX_MEMBERS {
        return Err(ForwardingError::NetworkFull(config.network));
    }
    let old = maps
        .port_of(ifindex)?
        .filter(|(_, old)| old.flags & PORT_ENDPOINT != 0);
    let slot = maps.write_port(&port)?;
    let flags = if peer { MEMBER_PEER } else { 0 };
    if !net.add_member(config.mac, ifindex, slot, flags) {
        // No FDB seed placed this MAC set (beyond any real chance): undo a new port.
        if old.is_none() {
            maps.remove_port(ifindex)?;
        }
        return Err(ForwardingError::NetworkFull(config.network));
    }
    maps.write_network(config.network, &net)?;
    if let Some((_, old)) = old
        && old.network != config.network
    {
        remove_member(maps, ifindex, old.network)?;
    }
    Ok(())
}

fn remove_member(maps: &mut Maps, ifindex: u32, network: NetworkId) -> Result<(), MapsError> {
    if let Some(mut net) = existing_network(maps, network)? {
        net.remove_member(ifindex);
        maps.write_network(network, &net)?;
    }
    Ok(())
}

/// Removes every entry of the endpoint on `ifindex`: its network membership (FDB and
/// flooding), then its port and counters. Nothing to remove is fine.
pub(crate) fn remove_endpoint(maps: &mut Maps, ifindex: u32) -> Result<(), MapsError> {
    let Some((_, port)) = maps.port_of(ifindex)? else {
        return Ok(());
    };
    if port.flags & PORT_ENDPOINT == 0 {
        return Ok(());
    }
    remove_member(maps, ifindex, port.network)?;
    maps.remove_port(ifindex)
}

/// The ifindexes of every endpoint and every uplink in the maps.
pub(crate) fn attached_ifindexes(maps: &Maps) -> Result<(Vec<u32>, Vec<u32>), MapsError> {
    let ports = maps.ports_in_use()?;
    let with = |flag: u16| -> Vec<u32> {
        ports
            .iter()
            .filter(|p| p.flags & flag != 0)
            .map(|p| p.ifindex)
            .collect()
    };
    Ok((with(PORT_ENDPOINT), with(PORT_UPLINK)))
}
