//! The switch's forwarding state in the maps: networks (VLAN, uplink, flood members),
//! endpoints (MAC, addresses, policy) with their FDB entries, and uplinks.
//!
//! Callers hold the pin directory's lock: every function here reads, modifies and writes
//! entries that another process may change too.

use std::net::IpAddr;

use crate::maps::{
    self, EP_CHECK_IP, FvAddrKey, FvEndpoint, FvFdbKey, FvNetwork, FvUplinkKey, MAX_MEMBERS, Maps,
    MapsError, lookup, remove_result, update_error,
};
use crate::policy::PolicyId;

/// A network id; 0 is invalid.
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
    /// The only source addresses it may send; empty: no IP anti-spoofing for this endpoint.
    pub addresses: Vec<IpAddr>,
    /// Its egress allow-list; None: everything allowed.
    pub policy: Option<PolicyId>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    #[error("network id 0 is invalid; use ids from 1")]
    InvalidNetworkId,
    #[error("network {0} does not exist; add it with add_network first")]
    UnknownNetwork(NetworkId),
    #[error("VLAN {0} is out of range; 802.1Q VLAN ids are 1..=4094")]
    BadVlan(u16),
    #[error("policy id 0 is invalid; use None for no policy or ids from 1")]
    InvalidPolicyId,
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
    if id == 0 {
        Err(ForwardingError::InvalidNetworkId)
    } else {
        Ok(())
    }
}

fn network(maps: &Maps, id: NetworkId) -> Result<FvNetwork, ForwardingError> {
    check_network_id(id)?;
    lookup("fv_networks", &maps.networks, &id)?.ok_or(ForwardingError::UnknownNetwork(id))
}

fn write_network(maps: &mut Maps, id: NetworkId, network: &FvNetwork) -> Result<(), MapsError> {
    maps.networks
        .insert(id, network, 0)
        .map_err(update_error("fv_networks"))
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
    let mut net = lookup("fv_networks", &maps.networks, &id)?.unwrap_or_default();
    if net.uplink != 0 && net.vlan != vlan {
        claim_uplink_key(maps, uplink_key(net.uplink, vlan), id)?;
        release_uplink_key(maps, uplink_key(net.uplink, net.vlan), id)?;
    }
    net.vlan = vlan;
    Ok(write_network(maps, id, &net)?)
}

/// Creates network `id` without a VLAN unless it exists (whose settings are kept); whether
/// it was created.
pub(crate) fn ensure_network(maps: &mut Maps, id: NetworkId) -> Result<bool, ForwardingError> {
    check_network_id(id)?;
    if lookup("fv_networks", &maps.networks, &id)?.is_some() {
        return Ok(false);
    }
    write_network(maps, id, &FvNetwork::default())?;
    Ok(true)
}

/// Removes network `id` if no endpoint is on it; returns its uplink if no other network
/// uses that uplink any more (its programs can be detached).
pub(crate) fn remove_network(
    maps: &mut Maps,
    id: NetworkId,
) -> Result<Option<u32>, ForwardingError> {
    check_network_id(id)?;
    let Some(net) = lookup("fv_networks", &maps.networks, &id)? else {
        return Ok(None);
    };
    if net.member_count > 0 {
        return Err(ForwardingError::NetworkInUse {
            network: id,
            members: net.members().len(),
        });
    }
    let unused_uplink = if net.uplink != 0 {
        remove_uplink(maps, net.uplink, id)?.then_some(net.uplink)
    } else {
        None
    };
    remove_result("fv_networks", maps.networks.remove(&id))?;
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
    let previous = net.uplink;
    net.uplink = ifindex;
    write_network(maps, network, &net)?;
    maps.create_counters(ifindex)?;
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
    if let Some(mut net) = lookup("fv_networks", &maps.networks, &network)?
        && net.uplink == ifindex
    {
        release_uplink_key(maps, uplink_key(ifindex, net.vlan), network)?;
        net.uplink = 0;
        write_network(maps, network, &net)?;
    }
    Ok(forget_uplink_if_unused(maps, ifindex)?)
}

/// Removes the counters of an uplink no network uses; true if it was unused.
fn forget_uplink_if_unused(maps: &mut Maps, ifindex: u32) -> Result<bool, MapsError> {
    if uplink_in_use(maps, ifindex)? {
        return Ok(false);
    }
    remove_result("fv_counters", maps.counters.remove(&ifindex))?;
    Ok(true)
}

/// Fills the maps for the endpoint on `ifindex`: its entry, FDB entry, addresses, flood
/// membership and counters. Running it again with another config moves the endpoint.
pub(crate) fn configure_endpoint(
    maps: &mut Maps,
    ifindex: u32,
    config: &EndpointConfig,
) -> Result<(), ForwardingError> {
    if config.policy == Some(0) {
        return Err(ForwardingError::InvalidPolicyId);
    }
    if config.mac[0] & 1 != 0 || config.mac == [0; 6] {
        return Err(ForwardingError::BadMac(config.mac));
    }
    let mut net = network(maps, config.network)?;
    let fdb_key = FvFdbKey {
        network: config.network,
        mac: config.mac,
        pad: 0,
    };
    check_mac_free(maps, &fdb_key, ifindex)?;
    if !net.add_member(ifindex) {
        return Err(ForwardingError::NetworkFull(config.network));
    }
    let old = lookup("fv_endpoints", &maps.endpoints, &ifindex)?;
    let endpoint = FvEndpoint {
        mac: config.mac,
        flags: if config.addresses.is_empty() {
            0
        } else {
            EP_CHECK_IP
        },
        network: config.network,
        policy: config.policy.unwrap_or(0),
    };
    maps.create_counters(ifindex)?;
    write_addresses(maps, ifindex, &config.addresses)?;
    maps.endpoints
        .insert(ifindex, endpoint, 0)
        .map_err(update_error("fv_endpoints"))?;
    maps.fdb
        .insert(fdb_key, ifindex, 0)
        .map_err(update_error("fv_fdb"))?;
    write_network(maps, config.network, &net)?;
    if let Some(old) = old {
        forget_old_placement(maps, ifindex, &old, &endpoint)?;
    }
    Ok(())
}

/// Refuses a MAC another live endpoint of the network owns.
fn check_mac_free(maps: &Maps, fdb_key: &FvFdbKey, ifindex: u32) -> Result<(), ForwardingError> {
    match lookup("fv_fdb", &maps.fdb, fdb_key)? {
        Some(owner)
            if owner != ifindex && lookup("fv_endpoints", &maps.endpoints, &owner)?.is_some() =>
        {
            Err(ForwardingError::MacInUse {
                mac: fdb_key.mac,
                network: fdb_key.network,
                owner,
            })
        }
        _ => Ok(()),
    }
}

/// After an endpoint was reconfigured: drops its FDB entry and membership where it was.
fn forget_old_placement(
    maps: &mut Maps,
    ifindex: u32,
    old: &FvEndpoint,
    new: &FvEndpoint,
) -> Result<(), MapsError> {
    if old.network != new.network || old.mac != new.mac {
        remove_fdb_entry(maps, ifindex, old)?;
    }
    if old.network != new.network {
        remove_member(maps, ifindex, old.network)?;
    }
    Ok(())
}

fn remove_fdb_entry(maps: &mut Maps, ifindex: u32, endpoint: &FvEndpoint) -> Result<(), MapsError> {
    let key = FvFdbKey {
        network: endpoint.network,
        mac: endpoint.mac,
        pad: 0,
    };
    if lookup("fv_fdb", &maps.fdb, &key)? == Some(ifindex) {
        remove_result("fv_fdb", maps.fdb.remove(&key))?;
    }
    Ok(())
}

fn remove_member(maps: &mut Maps, ifindex: u32, network: NetworkId) -> Result<(), MapsError> {
    if let Some(mut net) = lookup("fv_networks", &maps.networks, &network)? {
        net.remove_member(ifindex);
        write_network(maps, network, &net)?;
    }
    Ok(())
}

/// Makes fv_addrs hold exactly `addresses` for `ifindex`: new ones first, then stale ones
/// removed, so an address kept across a reconfiguration never disappears.
fn write_addresses(maps: &mut Maps, ifindex: u32, addresses: &[IpAddr]) -> Result<(), MapsError> {
    let wanted: Vec<FvAddrKey> = addresses
        .iter()
        .map(|&addr| FvAddrKey::new(ifindex, addr))
        .collect();
    for key in &wanted {
        maps.addrs
            .insert(key, 1, 0)
            .map_err(update_error("fv_addrs"))?;
    }
    for key in maps::keys("fv_addrs", &maps.addrs)? {
        if key.ifindex == ifindex && !wanted.contains(&key) {
            remove_result("fv_addrs", maps.addrs.remove(&key))?;
        }
    }
    Ok(())
}

/// Removes every entry of the endpoint on `ifindex`: FDB, addresses, membership, counters
/// and the endpoint itself. Nothing to remove is fine.
pub(crate) fn remove_endpoint(maps: &mut Maps, ifindex: u32) -> Result<(), MapsError> {
    if let Some(endpoint) = lookup("fv_endpoints", &maps.endpoints, &ifindex)? {
        remove_fdb_entry(maps, ifindex, &endpoint)?;
        remove_member(maps, ifindex, endpoint.network)?;
    }
    write_addresses(maps, ifindex, &[])?;
    remove_result("fv_endpoints", maps.endpoints.remove(&ifindex))?;
    remove_result("fv_counters", maps.counters.remove(&ifindex))
}

/// The ifindexes of every endpoint and every uplink in the maps.
pub(crate) fn attached_ifindexes(maps: &Maps) -> Result<(Vec<u32>, Vec<u32>), MapsError> {
    let endpoints = maps::keys("fv_endpoints", &maps.endpoints)?;
    let mut uplinks: Vec<u32> = maps::keys("fv_uplinks", &maps.uplinks)?
        .iter()
        .map(|key| key.ifindex)
        .collect();
    uplinks.sort_unstable();
    uplinks.dedup();
    Ok((endpoints, uplinks))
}
