//! The datapath's pinned maps: `#[repr(C)]` mirrors of the structs in bpf/datapath.h and
//! typed handles on the maps under the pin directory.

use std::net::IpAddr;
use std::path::Path;

use aya::Pod;
use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, MapData, MapError, PerCpuHashMap, PerCpuValues};

/// FV_MAX_MEMBERS: endpoints one network floods to.
pub(crate) const MAX_MEMBERS: usize = 64;
/// FV_MAX_RULES: rules of one CIDR of a policy, after covering CIDRs were merged in.
pub(crate) const MAX_RULES: usize = 16;
/// FV_EP_CHECK_IP: source addresses (and ARP/NDP claims) must be in fv_addrs.
pub(crate) const EP_CHECK_IP: u16 = 1 << 0;
pub(crate) const FAMILY_IPV4: u32 = 4;
pub(crate) const FAMILY_IPV6: u32 = 6;
/// The LPM key's prefix covers `policy` and `family` before the CIDR's own bits.
pub(crate) const POLICY_KEY_PREFIX_BITS: u32 = 64;

/// `struct fv_endpoint`: the value of fv_endpoints, keyed by the TAP's ifindex.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FvEndpoint {
    pub mac: [u8; 6],
    pub flags: u16,
    pub network: u32,
    pub policy: u32,
}

/// `struct fv_network`: the value of fv_networks, keyed by network id.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FvNetwork {
    pub uplink: u32,
    pub vlan: u16,
    pub member_count: u16,
    pub members: [u32; MAX_MEMBERS],
}

impl Default for FvNetwork {
    fn default() -> Self {
        FvNetwork {
            uplink: 0,
            vlan: 0,
            member_count: 0,
            members: [0; MAX_MEMBERS],
        }
    }
}

impl FvNetwork {
    pub fn members(&self) -> &[u32] {
        &self.members[..usize::from(self.member_count).min(MAX_MEMBERS)]
    }

    /// Adds `ifindex` unless it is a member already; false when the network is full.
    pub fn add_member(&mut self, ifindex: u32) -> bool {
        if self.members().contains(&ifindex) {
            return true;
        }
        let count = usize::from(self.member_count);
        if count >= MAX_MEMBERS {
            return false;
        }
        self.members[count] = ifindex;
        self.member_count += 1;
        true
    }

    /// Removes `ifindex`, moving the last member into its slot so members stay dense.
    pub fn remove_member(&mut self, ifindex: u32) {
        let count = self.members().len();
        if let Some(slot) = self.members().iter().position(|&m| m == ifindex) {
            self.members[slot] = self.members[count - 1];
            self.members[count - 1] = 0;
            self.member_count -= 1;
        }
    }
}

/// `struct fv_fdb_key`: (network, MAC) -> ifindex of the endpoint that owns the MAC.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FvFdbKey {
    pub network: u32,
    pub mac: [u8; 6],
    pub pad: u16,
}

/// `struct fv_uplink_key`: (uplink ifindex, VLAN id or 0) -> network id.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FvUplinkKey {
    pub ifindex: u32,
    pub vlan: u32,
}

/// `struct fv_addr_key`: an address an endpoint was given (IPv4 in the first 4 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FvAddrKey {
    pub ifindex: u32,
    pub family: u32,
    pub addr: [u8; 16],
}

impl FvAddrKey {
    pub fn new(ifindex: u32, addr: IpAddr) -> Self {
        let (family, addr) = family_and_bytes(addr);
        FvAddrKey {
            ifindex,
            family,
            addr,
        }
    }
}

/// `struct fv_policy_key` without its leading `prefixlen`, which aya's [`Key`] carries.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FvPolicyKeyData {
    pub policy: u32,
    pub family: u32,
    pub addr: [u8; 16],
}

/// `struct fv_rule`: one allowed protocol and destination port range.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FvRule {
    pub proto: u8,
    pub pad: u8,
    pub port_min: u16,
    pub port_max: u16,
    pub pad2: u16,
}

/// `struct fv_rules`: the value of fv_policy.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FvRules {
    pub count: u32,
    pub rules: [FvRule; MAX_RULES],
}

/// `struct fv_counters`: the counters of an endpoint or uplink, one CPU's in the map and
/// summed over CPUs by [`crate::Datapath::counters`]. From the endpoint's point of view: tx
/// is what it sent into the switch, rx what the switch delivered to it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drop_spoof_mac: u64,
    pub drop_spoof_ip: u64,
    pub drop_spoof_arp: u64,
    pub drop_policy: u64,
    pub drop_no_route: u64,
}

// SAFETY: each type is #[repr(C)], has only integer and integer-array fields, and its explicit
// `pad` fields leave no implicit padding (sizes checked in the tests below), so every bit
// pattern is a valid value and no uninitialised byte is ever copied to the kernel.
unsafe impl Pod for FvEndpoint {}
// SAFETY: as above.
unsafe impl Pod for FvNetwork {}
// SAFETY: as above.
unsafe impl Pod for FvFdbKey {}
// SAFETY: as above.
unsafe impl Pod for FvUplinkKey {}
// SAFETY: as above.
unsafe impl Pod for FvAddrKey {}
// SAFETY: as above.
unsafe impl Pod for FvPolicyKeyData {}
// SAFETY: as above.
unsafe impl Pod for FvRule {}
// SAFETY: as above.
unsafe impl Pod for FvRules {}
// SAFETY: as above.
unsafe impl Pod for Counters {}

/// The address family tag of fv_addr_key/fv_policy_key and the address as 16 wire-order
/// bytes (IPv4 in the first 4).
pub(crate) fn family_and_bytes(addr: IpAddr) -> (u32, [u8; 16]) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (FAMILY_IPV4, bytes)
        }
        IpAddr::V6(v6) => (FAMILY_IPV6, v6.octets()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error(
        "cannot open the pinned map {path}; is the datapath loaded (Datapath::open_or_load) and are we root?"
    )]
    OpenPinned {
        path: String,
        #[source]
        source: MapError,
    },
    #[error(
        "the pinned map {name} does not match this build's layout; a datapath of another version is loaded: \
         destroy its pin directory and load again"
    )]
    Layout {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the map {name} is full; remove unused endpoints, networks or policies")]
    Full { name: &'static str },
    #[error("cannot {operation} the map {name}")]
    Syscall {
        name: &'static str,
        operation: &'static str,
        #[source]
        source: MapError,
    },
}

/// Typed handles on the datapath's pinned maps.
pub(crate) struct Maps {
    pub endpoints: HashMap<MapData, u32, FvEndpoint>,
    pub networks: HashMap<MapData, u32, FvNetwork>,
    pub fdb: HashMap<MapData, FvFdbKey, u32>,
    pub uplinks: HashMap<MapData, FvUplinkKey, u32>,
    pub addrs: HashMap<MapData, FvAddrKey, u8>,
    pub policy: LpmTrie<MapData, FvPolicyKeyData, FvRules>,
    pub counters: PerCpuHashMap<MapData, u32, Counters>,
}

impl Maps {
    /// Opens every map pinned under `dir` (the pin directory, where LIBBPF_PIN_BY_NAME put them).
    pub fn open_pinned(dir: &Path) -> Result<Maps, MapsError> {
        Ok(Maps {
            endpoints: HashMap::try_from(open_map(dir, "fv_endpoints")?)
                .map_err(layout("fv_endpoints"))?,
            networks: HashMap::try_from(open_map(dir, "fv_networks")?)
                .map_err(layout("fv_networks"))?,
            fdb: HashMap::try_from(open_map(dir, "fv_fdb")?).map_err(layout("fv_fdb"))?,
            uplinks: HashMap::try_from(open_map(dir, "fv_uplinks")?)
                .map_err(layout("fv_uplinks"))?,
            addrs: HashMap::try_from(open_map(dir, "fv_addrs")?).map_err(layout("fv_addrs"))?,
            policy: LpmTrie::try_from(open_map(dir, "fv_policy")?).map_err(layout("fv_policy"))?,
            counters: PerCpuHashMap::try_from(open_map(dir, "fv_counters")?)
                .map_err(layout("fv_counters"))?,
        })
    }

    /// Creates the counters of `ifindex` (all zero) unless they exist.
    pub fn create_counters(&mut self, ifindex: u32) -> Result<(), MapsError> {
        if self.counters.get(&ifindex, 0).is_ok() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, error)| MapsError::Syscall {
            name: "fv_counters",
            operation: "size per-CPU values for",
            source: MapError::IoError(error),
        })?;
        let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(|error| {
            MapsError::Syscall {
                name: "fv_counters",
                operation: "size per-CPU values for",
                source: MapError::IoError(error),
            }
        })?;
        self.counters
            .insert(ifindex, zeros, 0)
            .map_err(update_error("fv_counters"))
    }

    /// The counters of `ifindex` summed over CPUs, or None if it has none.
    pub fn summed_counters(&self, ifindex: u32) -> Result<Option<Counters>, MapsError> {
        match self.counters.get(&ifindex, 0) {
            Ok(per_cpu) => Ok(Some(per_cpu.iter().fold(Counters::default(), add))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(MapsError::Syscall {
                name: "fv_counters",
                operation: "read",
                source,
            }),
        }
    }
}

fn add(sum: Counters, cpu: &Counters) -> Counters {
    Counters {
        rx_packets: sum.rx_packets + cpu.rx_packets,
        rx_bytes: sum.rx_bytes + cpu.rx_bytes,
        tx_packets: sum.tx_packets + cpu.tx_packets,
        tx_bytes: sum.tx_bytes + cpu.tx_bytes,
        drop_spoof_mac: sum.drop_spoof_mac + cpu.drop_spoof_mac,
        drop_spoof_ip: sum.drop_spoof_ip + cpu.drop_spoof_ip,
        drop_spoof_arp: sum.drop_spoof_arp + cpu.drop_spoof_arp,
        drop_policy: sum.drop_policy + cpu.drop_policy,
        drop_no_route: sum.drop_no_route + cpu.drop_no_route,
    }
}

fn open_map(dir: &Path, name: &'static str) -> Result<aya::maps::Map, MapsError> {
    let path = dir.join(name);
    let open_error = |source| MapsError::OpenPinned {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open_error)?;
    aya::maps::Map::from_map_data(data).map_err(layout(name))
}

fn layout(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Layout { name, source }
}

/// Maps an update's error: E2BIG from a hash map or LPM trie means it is full.
pub(crate) fn update_error(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| match &source {
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
            MapsError::Full { name }
        }
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOMEM) => {
            MapsError::Full { name }
        }
        _ => MapsError::Syscall {
            name,
            operation: "update",
            source,
        },
    }
}

/// Maps a removal's error; a key that is already gone is not one.
pub(crate) fn remove_result(
    name: &'static str,
    result: Result<(), MapError>,
) -> Result<(), MapsError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(MapsError::Syscall {
            name,
            operation: "remove from",
            source,
        }),
    }
}

/// Reads `key` from a map; a missing key is None.
pub(crate) fn lookup<K: Pod, V: Pod>(
    name: &'static str,
    map: &HashMap<MapData, K, V>,
    key: &K,
) -> Result<Option<V>, MapsError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(MapsError::Syscall {
            name,
            operation: "read",
            source,
        }),
    }
}

/// Every key of a map (snapshot; keys removed meanwhile are skipped).
pub(crate) fn keys<K: Pod, V: Pod>(
    name: &'static str,
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<K>, MapsError> {
    map.keys()
        .filter(|key| !matches!(key, Err(MapError::KeyNotFound)))
        .collect::<Result<Vec<K>, MapError>>()
        .map_err(|source| MapsError::Syscall {
            name,
            operation: "list the keys of",
            source,
        })
}

/// Every key of the policy trie.
pub(crate) fn policy_keys(
    map: &LpmTrie<MapData, FvPolicyKeyData, FvRules>,
) -> Result<Vec<Key<FvPolicyKeyData>>, MapsError> {
    map.keys()
        .filter(|key| !matches!(key, Err(MapError::KeyNotFound)))
        .collect::<Result<Vec<_>, MapError>>()
        .map_err(|source| MapsError::Syscall {
            name: "fv_policy",
            operation: "list the keys of",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The sizes of the structs in bpf/datapath.h as clang lays them out for the bpf target
    // (also checked against the loaded object's BTF in tests/prog_test_run.rs, which reads
    // every map's key and value size from the kernel).
    #[test]
    fn mirrors_have_the_sizes_of_the_c_structs() {
        assert_eq!(size_of::<FvEndpoint>(), 16);
        assert_eq!(size_of::<FvNetwork>(), 8 + 4 * MAX_MEMBERS);
        assert_eq!(size_of::<FvFdbKey>(), 12);
        assert_eq!(size_of::<FvUplinkKey>(), 8);
        assert_eq!(size_of::<FvAddrKey>(), 24);
        assert_eq!(size_of::<Key<FvPolicyKeyData>>(), 28);
        assert_eq!(size_of::<FvRule>(), 8);
        assert_eq!(size_of::<FvRules>(), 4 + 8 * MAX_RULES);
        assert_eq!(size_of::<Counters>(), 72);
    }

    #[test]
    fn network_members_stay_dense_when_one_leaves() {
        let mut net = FvNetwork::default();
        for ifindex in [10, 11, 12] {
            assert!(net.add_member(ifindex));
        }
        assert!(net.add_member(11), "adding twice is a no-op");
        net.remove_member(10);
        assert_eq!(net.members(), &[12, 11]);
        net.remove_member(99);
        assert_eq!(net.members(), &[12, 11]);
    }

    #[test]
    fn network_refuses_more_than_max_members() {
        let mut net = FvNetwork::default();
        for ifindex in 1..=MAX_MEMBERS as u32 {
            assert!(net.add_member(ifindex));
        }
        assert!(!net.add_member(1000));
        assert_eq!(net.members().len(), MAX_MEMBERS);
    }
}
