//! MAC addresses and IP prefixes as CNI writes them (`"02:00:00:00:00:01"`, `"10.1.0.5/24"`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressingError {
    #[error(
        "{0:?} is not a MAC address; write six hex pairs separated by colons (02:00:00:00:00:01)"
    )]
    BadMac(String),
    #[error(
        "{0:?} is a multicast MAC address; a NIC needs a unicast one (lowest bit of the first byte clear)"
    )]
    MulticastMac(String),
    #[error("{0:?} is not an IP prefix; write ADDRESS/LENGTH (10.1.0.5/24, fd00::5/64)")]
    BadPrefix(String),
    #[error("prefix length {len} is too long for {addr} (at most {max})")]
    PrefixTooLong { addr: IpAddr, len: u8, max: u8 },
}

/// A unicast Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// A locally administered unicast address whose last five bytes come from `seed`: the same
    /// seed gives the same address, so a VM keeps its MAC across ADDs of the same attachment.
    pub fn deterministic(seed: &[u8]) -> MacAddress {
        let hash = fnv1a64(seed).to_be_bytes();
        // 0x02: locally administered, unicast (IEEE 802 §8.2.2).
        MacAddress([0x02, hash[0], hash[1], hash[2], hash[3], hash[4]])
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

/// FNV-1a, 64 bit: a stable hash for names and MACs derived from container IDs (the standard
/// library's hashers are not stable across releases).
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl FromStr for MacAddress {
    type Err = AddressingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AddressingError::BadMac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out[0] & 1 == 1 {
            return Err(AddressingError::MulticastMac(s.to_owned()));
        }
        Ok(MacAddress(out))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An address with its prefix length, as in a CNI result's `ips[].address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl IpPrefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<IpPrefix, AddressingError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(AddressingError::PrefixTooLong { addr, len, max });
        }
        Ok(IpPrefix { addr, len })
    }
}

impl FromStr for IpPrefix {
    type Err = AddressingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AddressingError::BadPrefix(s.to_owned());
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        IpPrefix::new(addr, len)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

macro_rules! serde_as_string {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(MacAddress);
serde_as_string!(IpPrefix);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_garbage_and_multicast() {
        let mac: MacAddress = "02:AB:cd:00:11:ff".parse().unwrap();
        assert_eq!(mac.to_string(), "02:ab:cd:00:11:ff");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "zz:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert_eq!(
                bad.parse::<MacAddress>(),
                Err(AddressingError::BadMac(bad.into()))
            );
        }
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddress>(),
            Err(AddressingError::MulticastMac(_))
        ));
    }

    #[test]
    fn deterministic_mac_is_stable_local_and_unicast() {
        let a = MacAddress::deterministic(b"container-1/net1");
        assert_eq!(a, MacAddress::deterministic(b"container-1/net1"));
        assert_ne!(a, MacAddress::deterministic(b"container-2/net1"));
        assert_eq!(a.0[0], 0x02);
    }

    #[test]
    fn prefixes_parse_both_families_and_bound_the_length() {
        let p: IpPrefix = "10.1.0.5/24".parse().unwrap();
        assert_eq!(p.to_string(), "10.1.0.5/24");
        let p: IpPrefix = "fd00::5/64".parse().unwrap();
        assert_eq!(p.len, 64);
        assert!(matches!(
            "10.0.0.1/33".parse::<IpPrefix>(),
            Err(AddressingError::PrefixTooLong { .. })
        ));
        assert!(matches!(
            "10.0.0.1".parse::<IpPrefix>(),
            Err(AddressingError::BadPrefix(_))
        ));
    }
}
