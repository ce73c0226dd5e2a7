//! The datapath's pinned maps: `#[repr(C)]` mirrors of the structs in bpf/datapath.h and
//! typed handles on the maps under the pin directory.
//!
//! The programs read arrays on the per-packet path, and arrays are updated in place, so a
//! program may see an entry half written. Updates here are ordered so that such a read at
//! worst misses (a frame dropped or sent to the uplink while an endpoint comes or goes),
//! never delivers to the wrong port: a port's entry is complete before its ifindex maps to
//! it, a network's FDB index only points at members whose MAC the program compares, and a
//! freed member entry is zero before it is used again.

use std::net::IpAddr;
use std::path::Path;

use aya::Pod;
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues};

/// FV_MAX_MEMBERS: endpoints of one network on this node (its FDB and flood list).
pub(crate) const MAX_MEMBERS: usize = 256;
/// FV_FDB_BUCKETS: buckets of a network's FDB index (2^FV_FDB_BUCKET_BITS).
pub(crate) const FDB_BUCKETS: usize = 512;
const FDB_BUCKET_BITS: u32 = 9;
/// FV_FDB_MAX_PROBES: every MAC sits within this many buckets of its own.
pub(crate) const FDB_MAX_PROBES: usize = 16;
/// Seeds tried before a set of MACs is declared unplaceable (each fails with a chance far
/// below 1e-6 for a full network of random MACs).
const FDB_SEED_TRIES: u32 = 64;
/// FV_MAX_PORTS: slots for endpoints and uplinks; slot 0 is never used.
pub(crate) const MAX_PORTS: u32 = 8192;
/// FV_MAX_IFINDEX: ifindexes below it find their slot in fv_port_slots, others in
/// fv_port_slots_high.
pub(crate) const MAX_IFINDEX: u32 = 65536;
/// FV_MAX_NETWORKS: network ids are 1..MAX_NETWORKS.
pub(crate) const MAX_NETWORKS: u32 = 1024;
/// FV_MAX_POLICIES: policy ids are 1..MAX_POLICIES.
pub(crate) const MAX_POLICIES: u32 = 1024;
/// FV_MAX_POLICY_RULES: rules of one policy.
pub(crate) const MAX_POLICY_RULES: usize = 64;
/// FV_MAX_ADDRS: source addresses of one endpoint, per family.
pub(crate) const MAX_ADDRS: usize = 4;
/// FV_PORT_ENDPOINT: the slot is a VM NIC's.
pub(crate) const PORT_ENDPOINT: u16 = 1 << 0;
/// FV_PORT_UPLINK: the slot is an uplink's (its counters).
pub(crate) const PORT_UPLINK: u16 = 1 << 1;
/// FV_EP_CHECK_IP: source addresses (and ARP/NDP claims) must be the port's.
pub(crate) const EP_CHECK_IP: u16 = 1 << 2;
/// FV_NET_PRESENT: the network exists.
pub(crate) const NET_PRESENT: u16 = 1 << 0;

/// `struct fv_port`: the value of fv_ports, indexed by slot.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FvPort {
    pub mac: [u8; 6],
    pub flags: u16,
    pub ifindex: u32,
    pub network: u32,
    pub policy: u32,
    pub addr4_count: u8,
    pub addr6_count: u8,
    pub pad: u16,
    pub addr4: [[u8; 4]; MAX_ADDRS],
    pub addr6: [[u8; 16]; MAX_ADDRS],
}

impl FvPort {
    /// The addresses the port may send from, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let v4 = self.addr4[..usize::from(self.addr4_count).min(MAX_ADDRS)]
            .iter()
            .map(|&a| IpAddr::from(a));
        let v6 = self.addr6[..usize::from(self.addr6_count).min(MAX_ADDRS)]
            .iter()
            .map(|&a| IpAddr::from(a));
        v4.chain(v6).collect()
    }
}

/// FV_MEMBER_PEER: the member is a veth whose peer is in another namespace.
pub(crate) const MEMBER_PEER: u16 = 1 << 0;

/// `struct fv_member`: one endpoint of a network, FDB entry and flood target.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FvMember {
    pub mac: [u8; 6],
    /// FV_MEMBER_*.
    pub flags: u16,
    /// 0: a free entry.
    pub ifindex: u32,
    pub slot: u32,
}

/// `struct fv_network`: the value of fv_networks, indexed by network id.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FvNetwork {
    pub uplink: u32,
    pub uplink_slot: u32,
    pub vlan: u16,
    pub member_count: u16,
    pub flags: u16,
    pub pad: u16,
    pub fdb_seed: u32,
    pub pad2: u32,
    pub members: [FvMember; MAX_MEMBERS],
    pub fdb: [u16; FDB_BUCKETS],
}

impl Default for FvNetwork {
    fn default() -> Self {
        FvNetwork {
            uplink: 0,
            uplink_slot: 0,
            vlan: 0,
            member_count: 0,
            flags: 0,
            pad: 0,
            fdb_seed: 0,
            pad2: 0,
            members: [FvMember::default(); MAX_MEMBERS],
            fdb: [0; FDB_BUCKETS],
        }
    }
}

/// The FDB bucket a MAC's probe starts at, as `fdb_find` in datapath.c computes it: MAC
/// bytes 2..6 as a little-endian u32, xor the network's seed, times 2654435761, the top
/// FV_FDB_BUCKET_BITS bits.
pub(crate) fn fdb_bucket(mac: &[u8; 6], seed: u32) -> usize {
    let low = u32::from_le_bytes([mac[2], mac[3], mac[4], mac[5]]) ^ seed;
    (low.wrapping_mul(2_654_435_761) >> (32 - FDB_BUCKET_BITS)) as usize
}

impl FvNetwork {
    pub fn present(&self) -> bool {
        self.flags & NET_PRESENT != 0
    }

    /// The endpoints on the network.
    pub fn members(&self) -> impl Iterator<Item = &FvMember> {
        self.members[..usize::from(self.member_count).min(MAX_MEMBERS)]
            .iter()
            .filter(|m| m.ifindex != 0)
    }

    /// The endpoint that owns `mac`, as the programs find it.
    pub fn lookup(&self, mac: &[u8; 6]) -> Option<&FvMember> {
        let start = fdb_bucket(mac, self.fdb_seed);
        for probe in 0..FDB_MAX_PROBES {
            let entry = usize::from(self.fdb[(start + probe) % FDB_BUCKETS]);
            let member = &self.members[entry.checked_sub(1)? % MAX_MEMBERS];
            if member.ifindex != 0 && member.mac == *mac {
                return Some(member);
            }
        }
        None
    }

    /// Makes `ifindex` a member with `mac`, `slot` and `flags` (FV_MEMBER_*); false when
    /// the network is full (or, beyond any real chance, its MACs fit no FDB seed).
    pub fn add_member(&mut self, mac: [u8; 6], ifindex: u32, slot: u32, flags: u16) -> bool {
        let count = usize::from(self.member_count);
        let entry = self.members[..count]
            .iter()
            .position(|m| m.ifindex == ifindex)
            .or_else(|| self.members[..count].iter().position(|m| m.ifindex == 0));
        let index = match entry {
            Some(index) => index,
            None if count < MAX_MEMBERS => {
                self.member_count += 1;
                count
            }
            None => return false,
        };
        let previous = self.members[index];
        self.members[index] = FvMember {
            mac,
            flags,
            ifindex,
            slot,
        };
        if self.rebuild_fdb() {
            return true;
        }
        // The index and seed were left as they were, which still fit the old members.
        self.members[index] = previous;
        if index == count {
            self.member_count -= 1;
        }
        false
    }

    /// Frees `ifindex`'s entry (others keep theirs, so a program never reads one entry
    /// turn into another).
    pub fn remove_member(&mut self, ifindex: u32) {
        let count = usize::from(self.member_count);
        for member in &mut self.members[..count] {
            if member.ifindex == ifindex {
                *member = FvMember::default();
            }
        }
        while self.member_count > 0 && self.members[usize::from(self.member_count) - 1].ifindex == 0
        {
            self.member_count -= 1;
        }
        // Fewer MACs fit the seed that fit more; should they not, the old index stays, whose
        // entry for the freed member now finds an empty one (a miss).
        self.rebuild_fdb();
    }

    /// Rebuilds the FDB index from the members: linear probing in FDB_BUCKETS buckets (at
    /// most half full), every MAC within FDB_MAX_PROBES of its bucket. Keeps the seed while
    /// it works, else tries others; false if none does.
    fn rebuild_fdb(&mut self) -> bool {
        let current = self.fdb_seed;
        let candidates = std::iter::once(current)
            .chain((1..=FDB_SEED_TRIES).map(|k| current ^ k.wrapping_mul(0x9e37_79b9)));
        for seed in candidates {
            if let Some(fdb) = self.fdb_with_seed(seed) {
                self.fdb_seed = seed;
                self.fdb = fdb;
                return true;
            }
        }
        false
    }

    fn fdb_with_seed(&self, seed: u32) -> Option<[u16; FDB_BUCKETS]> {
        let mut fdb = [0u16; FDB_BUCKETS];
        let count = usize::from(self.member_count).min(MAX_MEMBERS);
        for (index, member) in self.members[..count].iter().enumerate() {
            if member.ifindex == 0 {
                continue;
            }
            let start = fdb_bucket(&member.mac, seed);
            let probe = (0..FDB_MAX_PROBES).find(|p| fdb[(start + p) % FDB_BUCKETS] == 0)?;
            fdb[(start + probe) % FDB_BUCKETS] = index as u16 + 1;
        }
        Some(fdb)
    }
}

/// `struct fv_uplink_key`: (uplink ifindex, VLAN id or 0) -> network id.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FvUplinkKey {
    pub ifindex: u32,
    pub vlan: u32,
}

/// `struct fv_rule`: one allowed destination CIDR, protocol and port range.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FvRule {
    pub addr: [u8; 16],
    pub mask: [u8; 16],
    pub proto: u8,
    pub pad: u8,
    pub port_min: u16,
    pub port_max: u16,
    pub pad2: u16,
}

/// `struct fv_policy`: the value of fv_policies, indexed by policy id.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FvPolicy {
    pub ipv4_rules: u16,
    pub ipv6_rules: u16,
    pub pad: u32,
    pub rules: [FvRule; MAX_POLICY_RULES],
}

impl Default for FvPolicy {
    fn default() -> Self {
        FvPolicy {
            ipv4_rules: 0,
            ipv6_rules: 0,
            pad: 0,
            rules: [FvRule::default(); MAX_POLICY_RULES],
        }
    }
}

/// `struct fv_port_alloc`: the slots in use, one bit each.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FvPortAlloc {
    pub used: [u64; MAX_PORTS as usize / 64],
}

impl Default for FvPortAlloc {
    fn default() -> Self {
        FvPortAlloc {
            used: [0; MAX_PORTS as usize / 64],
        }
    }
}

impl FvPortAlloc {
    pub fn is_used(&self, slot: u32) -> bool {
        self.used[slot as usize / 64] & (1 << (slot % 64)) != 0
    }

    pub fn set(&mut self, slot: u32, used: bool) {
        let bit = 1u64 << (slot % 64);
        let word = &mut self.used[slot as usize / 64];
        *word = if used { *word | bit } else { *word & !bit };
    }

    /// The lowest free slot (never 0), or None when all are used.
    pub fn first_free(&self) -> Option<u32> {
        (1..MAX_PORTS).find(|&slot| !self.is_used(slot))
    }

    pub fn used_slots(&self) -> impl Iterator<Item = u32> + '_ {
        (1..MAX_PORTS).filter(|&slot| self.is_used(slot))
    }
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
unsafe impl Pod for FvPort {}
// SAFETY: as above.
unsafe impl Pod for FvMember {}
// SAFETY: as above.
unsafe impl Pod for FvNetwork {}
// SAFETY: as above.
unsafe impl Pod for FvUplinkKey {}
// SAFETY: as above.
unsafe impl Pod for FvRule {}
// SAFETY: as above.
unsafe impl Pod for FvPolicy {}
// SAFETY: as above.
unsafe impl Pod for FvPortAlloc {}
// SAFETY: as above.
unsafe impl Pod for Counters {}

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
    pub port_slots: Array<MapData, u32>,
    pub port_slots_high: HashMap<MapData, u32, u32>,
    pub ports: Array<MapData, FvPort>,
    pub port_alloc: Array<MapData, FvPortAlloc>,
    pub networks: Array<MapData, FvNetwork>,
    pub policies: Array<MapData, FvPolicy>,
    pub uplinks: HashMap<MapData, FvUplinkKey, u32>,
    pub counters: PerCpuArray<MapData, Counters>,
}

impl Maps {
    /// Opens every map pinned under `dir` (the pin directory, where LIBBPF_PIN_BY_NAME put them).
    pub fn open_pinned(dir: &Path) -> Result<Maps, MapsError> {
        Ok(Maps {
            port_slots: Array::try_from(open_map(dir, "fv_port_slots")?)
                .map_err(layout("fv_port_slots"))?,
            port_slots_high: HashMap::try_from(open_map(dir, "fv_port_slots_high")?)
                .map_err(layout("fv_port_slots_high"))?,
            ports: Array::try_from(open_map(dir, "fv_ports")?).map_err(layout("fv_ports"))?,
            port_alloc: Array::try_from(open_map(dir, "fv_port_alloc")?)
                .map_err(layout("fv_port_alloc"))?,
            networks: Array::try_from(open_map(dir, "fv_networks")?)
                .map_err(layout("fv_networks"))?,
            policies: Array::try_from(open_map(dir, "fv_policies")?)
                .map_err(layout("fv_policies"))?,
            uplinks: HashMap::try_from(open_map(dir, "fv_uplinks")?)
                .map_err(layout("fv_uplinks"))?,
            counters: PerCpuArray::try_from(open_map(dir, "fv_counters")?)
                .map_err(layout("fv_counters"))?,
        })
    }

    /// The slot of the port on `ifindex`, if it has one.
    pub fn slot_of(&self, ifindex: u32) -> Result<Option<u32>, MapsError> {
        let slot = if ifindex < MAX_IFINDEX {
            get("fv_port_slots", &self.port_slots, ifindex)?
        } else {
            lookup("fv_port_slots_high", &self.port_slots_high, &ifindex)?.unwrap_or(0)
        };
        Ok((slot != 0).then_some(slot))
    }

    /// Points `ifindex` at `slot` (0: at nothing).
    fn map_slot(&mut self, ifindex: u32, slot: u32) -> Result<(), MapsError> {
        if ifindex < MAX_IFINDEX {
            set("fv_port_slots", &mut self.port_slots, ifindex, slot)
        } else if slot == 0 {
            remove_result("fv_port_slots_high", self.port_slots_high.remove(&ifindex))
        } else {
            self.port_slots_high
                .insert(ifindex, slot, 0)
                .map_err(update_error("fv_port_slots_high"))
        }
    }

    /// The port in `slot`.
    pub fn port(&self, slot: u32) -> Result<FvPort, MapsError> {
        get("fv_ports", &self.ports, slot)
    }

    /// The port on `ifindex` with its slot, if it has one.
    pub fn port_of(&self, ifindex: u32) -> Result<Option<(u32, FvPort)>, MapsError> {
        match self.slot_of(ifindex)? {
            Some(slot) => Ok(Some((slot, self.port(slot)?))),
            None => Ok(None),
        }
    }

    /// Writes the port of `port.ifindex`: in its slot, or in a new one (counters zeroed)
    /// that the ifindex points at once the port is written. Returns the slot.
    pub fn write_port(&mut self, port: &FvPort) -> Result<u32, MapsError> {
        if let Some(slot) = self.slot_of(port.ifindex)? {
            set("fv_ports", &mut self.ports, slot, *port)?;
            return Ok(slot);
        }
        let mut alloc = self.port_alloc()?;
        let slot = alloc
            .first_free()
            .ok_or(MapsError::Full { name: "fv_ports" })?;
        alloc.set(slot, true);
        set("fv_port_alloc", &mut self.port_alloc, 0, alloc)?;
        self.zero_counters(slot)?;
        set("fv_ports", &mut self.ports, slot, *port)?;
        self.map_slot(port.ifindex, slot)?;
        Ok(slot)
    }

    /// Frees the slot of `ifindex`: unmapped first, then cleared, then free.
    pub fn remove_port(&mut self, ifindex: u32) -> Result<(), MapsError> {
        let Some(slot) = self.slot_of(ifindex)? else {
            return Ok(());
        };
        self.map_slot(ifindex, 0)?;
        set("fv_ports", &mut self.ports, slot, FvPort::default())?;
        let mut alloc = self.port_alloc()?;
        alloc.set(slot, false);
        set("fv_port_alloc", &mut self.port_alloc, 0, alloc)
    }

    fn port_alloc(&self) -> Result<FvPortAlloc, MapsError> {
        get("fv_port_alloc", &self.port_alloc, 0)
    }

    /// Every port in use.
    pub fn ports_in_use(&self) -> Result<Vec<FvPort>, MapsError> {
        let alloc = self.port_alloc()?;
        alloc.used_slots().map(|slot| self.port(slot)).collect()
    }

    /// Network `id` as stored (absent networks are all zero).
    pub fn network(&self, id: u32) -> Result<FvNetwork, MapsError> {
        get("fv_networks", &self.networks, id)
    }

    pub fn write_network(&mut self, id: u32, network: &FvNetwork) -> Result<(), MapsError> {
        set("fv_networks", &mut self.networks, id, *network)
    }

    pub fn write_policy(&mut self, id: u32, policy: &FvPolicy) -> Result<(), MapsError> {
        set("fv_policies", &mut self.policies, id, *policy)
    }

    fn zero_counters(&mut self, slot: u32) -> Result<(), MapsError> {
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
            .set(slot, zeros, 0)
            .map_err(update_error("fv_counters"))
    }

    /// The counters of the port on `ifindex` summed over CPUs, or None if it has none.
    pub fn summed_counters(&self, ifindex: u32) -> Result<Option<Counters>, MapsError> {
        let Some(slot) = self.slot_of(ifindex)? else {
            return Ok(None);
        };
        let per_cpu = self
            .counters
            .get(&slot, 0)
            .map_err(|source| MapsError::Syscall {
                name: "fv_counters",
                operation: "read",
                source,
            })?;
        Ok(Some(per_cpu.iter().fold(Counters::default(), add)))
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

/// Maps an update's error: E2BIG (or ENOMEM) from a hash map means it is full.
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

/// Reads entry `index` of an array map.
fn get<V: Pod>(name: &'static str, map: &Array<MapData, V>, index: u32) -> Result<V, MapsError> {
    map.get(&index, 0).map_err(|source| MapsError::Syscall {
        name,
        operation: "read",
        source,
    })
}

/// Writes entry `index` of an array map.
fn set<V: Pod>(
    name: &'static str,
    map: &mut Array<MapData, V>,
    index: u32,
    value: V,
) -> Result<(), MapsError> {
    map.set(index, value, 0)
        .map_err(|source| MapsError::Syscall {
            name,
            operation: "update",
            source,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    // The sizes of the structs in bpf/datapath.h as clang lays them out for the bpf target
    // (also checked against the loaded object's BTF in tests/prog_test_run.rs, which reads
    // every map's key and value size from the kernel).
    #[test]
    fn mirrors_have_the_sizes_of_the_c_structs() {
        assert_eq!(size_of::<FvPort>(), 24 + 4 * MAX_ADDRS + 16 * MAX_ADDRS);
        assert_eq!(size_of::<FvMember>(), 16);
        assert_eq!(
            size_of::<FvNetwork>(),
            24 + 16 * MAX_MEMBERS + 2 * FDB_BUCKETS
        );
        assert_eq!(size_of::<FvUplinkKey>(), 8);
        assert_eq!(size_of::<FvRule>(), 40);
        assert_eq!(size_of::<FvPolicy>(), 8 + 40 * MAX_POLICY_RULES);
        assert_eq!(size_of::<FvPortAlloc>(), MAX_PORTS as usize / 8);
        assert_eq!(size_of::<Counters>(), 72);
    }

    fn mac(last: u8) -> [u8; 6] {
        [0x02, 0, 0, 0, 0, last]
    }

    #[test]
    fn a_freed_member_entry_stays_put_and_is_reused() {
        let mut net = FvNetwork::default();
        for i in 1..=3 {
            assert!(net.add_member(mac(i), 10 + u32::from(i), u32::from(i), 0));
        }
        assert!(net.add_member(mac(2), 12, 2, 0), "adding twice is a no-op");
        assert_eq!(net.member_count, 3);
        net.remove_member(11);
        let ifindexes: Vec<u32> = net.members().map(|m| m.ifindex).collect();
        assert_eq!(ifindexes, [12, 13], "the others kept their entries");
        assert_eq!(net.members[0], FvMember::default());
        assert!(net.add_member(mac(4), 14, 4, 0));
        assert_eq!(net.members[0].ifindex, 14, "the free entry is reused");
        net.remove_member(13);
        assert_eq!(net.member_count, 2, "trailing free entries are dropped");
        net.remove_member(99);
        assert_eq!(net.members().count(), 2);
    }

    #[test]
    fn the_fdb_finds_every_member_and_nothing_else() {
        let mut net = FvNetwork::default();
        // MACs that differ in the last two bytes only, many with one starting bucket.
        let mac_of = |i: usize| [0x02, 0xaa, 0, 0, (i / 16) as u8, (i % 16) as u8];
        for i in 0..MAX_MEMBERS {
            assert!(net.add_member(mac_of(i), 100 + i as u32, 1, 0), "{i}");
        }
        assert!(!net.add_member(mac(0xee), 999, 1, 0), "full");
        for i in 0..MAX_MEMBERS {
            let found = net.lookup(&mac_of(i)).expect("member");
            assert_eq!(found.ifindex, 100 + i as u32);
        }
        assert!(net.lookup(&mac(0xee)).is_none());
        net.remove_member(100);
        assert!(net.lookup(&mac_of(0)).is_none());
        assert!(net.lookup(&mac_of(MAX_MEMBERS - 1)).is_some());
    }

    #[test]
    fn macs_that_crowd_one_seeds_buckets_move_the_network_to_another_seed() {
        let mut net = FvNetwork::default();
        // MACs whose starting bucket under seed 0 is the same: more than FDB_MAX_PROBES of
        // them cannot be placed without a new seed.
        let mut crowd = Vec::new();
        let mut low = 0u32;
        while crowd.len() < FDB_MAX_PROBES + 4 {
            let bytes = low.to_le_bytes();
            let mac = [0x02, 0, bytes[0], bytes[1], bytes[2], bytes[3]];
            if fdb_bucket(&mac, 0) == 7 {
                crowd.push(mac);
            }
            low += 1;
        }
        for (i, mac) in crowd.iter().enumerate() {
            assert!(net.add_member(*mac, 10 + i as u32, 1, 0));
        }
        assert_ne!(net.fdb_seed, 0, "the seed changed");
        for (i, mac) in crowd.iter().enumerate() {
            assert_eq!(net.lookup(mac).expect("placed").ifindex, 10 + i as u32);
        }
    }

    #[test]
    fn the_fdb_bucket_is_the_programs_hash() {
        // fdb_find in datapath.c: ((u32)(mac_key >> 16) ^ seed) * 2654435761, top 9 bits;
        // mac_key holds bytes 0..4 little-endian and 4..6 above them.
        assert_eq!(fdb_bucket(&[0, 0, 0, 0, 0, 0], 0), 0);
        let one = 2_654_435_761u32 >> 23;
        assert_eq!(fdb_bucket(&[9, 9, 1, 0, 0, 0], 0), one as usize);
        assert_eq!(fdb_bucket(&[9, 9, 0, 0, 0, 0], 1), one as usize);
        let top = 0x0100_0000u32.wrapping_mul(2_654_435_761) >> 23;
        assert_eq!(fdb_bucket(&[9, 9, 0, 0, 0, 1], 0), top as usize);
        assert!(fdb_bucket(&[0xff; 6], u32::MAX) < FDB_BUCKETS);
    }

    #[test]
    fn port_alloc_hands_out_the_lowest_free_slot_from_one() {
        let mut alloc = FvPortAlloc::default();
        assert_eq!(alloc.first_free(), Some(1));
        alloc.set(1, true);
        alloc.set(2, true);
        assert_eq!(alloc.first_free(), Some(3));
        alloc.set(1, false);
        assert_eq!(alloc.first_free(), Some(1));
        for slot in 1..MAX_PORTS {
            alloc.set(slot, true);
        }
        assert_eq!(alloc.first_free(), None);
        assert_eq!(alloc.used_slots().count(), MAX_PORTS as usize - 1);
    }
}
