//! Egress allow-list policies and their compilation into fv_policy's LPM trie entries.
//!
//! The trie answers with the longest CIDR that holds a destination, and only that one, so
//! each CIDR's entry carries its own rules plus those of every shorter CIDR that covers it.
//! A policy with no rules has no entries: every lookup misses and everything is denied.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use aya::maps::lpm_trie::Key;

use crate::maps::{
    FAMILY_IPV4, FvPolicyKeyData, FvRule, FvRules, MAX_RULES, Maps, MapsError,
    POLICY_KEY_PREFIX_BITS, family_and_bytes, policy_keys, remove_result, update_error,
};

/// A policy id; 0 is invalid (it means "no policy" in the maps).
pub type PolicyId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    /// An IP protocol number (IPPROTO_*).
    Other(u8),
}

impl Protocol {
    /// The IP protocol number; 0 (FV_PROTO_ANY) for any.
    fn number(self) -> u8 {
        match self {
            Protocol::Any => 0,
            Protocol::Tcp => libc::IPPROTO_TCP as u8,
            Protocol::Udp => libc::IPPROTO_UDP as u8,
            Protocol::Icmp => libc::IPPROTO_ICMP as u8,
            Protocol::Icmpv6 => libc::IPPROTO_ICMPV6 as u8,
            Protocol::Other(number) => number,
        }
    }

    fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// Allows traffic to `addr/prefix_len` with `protocol`, to destination ports in `ports`
/// (None: any port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub protocol: Protocol,
    pub ports: Option<RangeInclusive<u16>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy id 0 is reserved for \"no policy\"; use ids from 1")]
    InvalidId,
    #[error(
        "prefix length {prefix_len} is too long for {addr}; IPv4 allows up to 32, IPv6 up to 128"
    )]
    BadPrefixLength { addr: IpAddr, prefix_len: u8 },
    #[error("port ranges need protocol Tcp or Udp (rule for {addr}/{prefix_len} has {protocol:?})")]
    PortsWithoutTransport {
        addr: IpAddr,
        prefix_len: u8,
        protocol: Protocol,
    },
    #[error("port range {start}..={end} is empty")]
    EmptyPortRange { start: u16, end: u16 },
    #[error(
        "{addr}/{prefix_len} has {count} rules after merging the CIDRs that cover it; at most {MAX_RULES} fit: merge rules or use fewer overlapping CIDRs"
    )]
    TooManyRules {
        addr: IpAddr,
        prefix_len: u8,
        count: usize,
    },
}

/// One CIDR of a policy: family, masked address bytes, prefix length in address bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Cidr {
    family: u32,
    addr: [u8; 16],
    prefix_len: u8,
}

impl Cidr {
    fn new(addr: IpAddr, prefix_len: u8) -> Result<Cidr, PolicyError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(PolicyError::BadPrefixLength { addr, prefix_len });
        }
        let (family, bytes) = family_and_bytes(addr);
        Ok(Cidr {
            family,
            addr: mask(bytes, prefix_len),
            prefix_len,
        })
    }

    /// True if every address of `other` is in `self`.
    fn covers(&self, other: &Cidr) -> bool {
        self.family == other.family
            && self.prefix_len <= other.prefix_len
            && mask(other.addr, self.prefix_len) == self.addr
    }

    fn ip(&self) -> IpAddr {
        if self.family == FAMILY_IPV4 {
            IpAddr::from([self.addr[0], self.addr[1], self.addr[2], self.addr[3]])
        } else {
            IpAddr::from(self.addr)
        }
    }
}

/// Keeps the first `prefix_len` bits of `bytes`.
fn mask(mut bytes: [u8; 16], prefix_len: u8) -> [u8; 16] {
    let prefix_len = usize::from(prefix_len);
    for (i, byte) in bytes.iter_mut().enumerate() {
        let kept_bits = prefix_len.saturating_sub(i * 8).min(8);
        *byte &= !(0xffu16 >> kept_bits) as u8;
    }
    bytes
}

fn compile_rule(rule: &PolicyRule) -> Result<FvRule, PolicyError> {
    let (port_min, port_max) = match &rule.ports {
        None => (0, u16::MAX),
        Some(_) if !rule.protocol.has_ports() => {
            return Err(PolicyError::PortsWithoutTransport {
                addr: rule.addr,
                prefix_len: rule.prefix_len,
                protocol: rule.protocol,
            });
        }
        Some(ports) if ports.start() > ports.end() => {
            return Err(PolicyError::EmptyPortRange {
                start: *ports.start(),
                end: *ports.end(),
            });
        }
        Some(ports) => (*ports.start(), *ports.end()),
    };
    Ok(FvRule {
        proto: rule.protocol.number(),
        port_min,
        port_max,
        ..FvRule::default()
    })
}

/// The fv_policy entries of policy `id`: one per distinct CIDR, holding the rules of every
/// CIDR that covers it (itself included), without duplicates.
pub(crate) fn compile_policy(
    id: PolicyId,
    rules: &[PolicyRule],
) -> Result<Vec<(Key<FvPolicyKeyData>, FvRules)>, PolicyError> {
    if id == 0 {
        return Err(PolicyError::InvalidId);
    }
    let mut by_cidr: BTreeMap<Cidr, Vec<FvRule>> = BTreeMap::new();
    for rule in rules {
        let cidr = Cidr::new(rule.addr, rule.prefix_len)?;
        let compiled = compile_rule(rule)?;
        let list = by_cidr.entry(cidr).or_default();
        if !list.contains(&compiled) {
            list.push(compiled);
        }
    }
    by_cidr
        .keys()
        .map(|cidr| {
            let mut merged: Vec<FvRule> = Vec::new();
            let covering = by_cidr.iter().filter(|(c, _)| c.covers(cidr));
            for rules in covering.map(|(_, rules)| rules) {
                for rule in rules {
                    if !merged.contains(rule) {
                        merged.push(*rule);
                    }
                }
            }
            policy_entry(id, cidr, &merged)
        })
        .collect()
}

fn policy_entry(
    id: PolicyId,
    cidr: &Cidr,
    rules: &[FvRule],
) -> Result<(Key<FvPolicyKeyData>, FvRules), PolicyError> {
    if rules.len() > MAX_RULES {
        return Err(PolicyError::TooManyRules {
            addr: cidr.ip(),
            prefix_len: cidr.prefix_len,
            count: rules.len(),
        });
    }
    let mut value = FvRules {
        count: rules.len() as u32,
        ..FvRules::default()
    };
    value.rules[..rules.len()].copy_from_slice(rules);
    let key = Key::new(
        POLICY_KEY_PREFIX_BITS + u32::from(cidr.prefix_len),
        FvPolicyKeyData {
            policy: id,
            family: cidr.family,
            addr: cidr.addr,
        },
    );
    Ok((key, value))
}

/// Replaces policy `id`'s entries in fv_policy with `entries`: the new ones are written
/// first, then the stale ones removed, so a CIDR in both never loses its rules.
pub(crate) fn write_policy(
    maps: &mut Maps,
    id: PolicyId,
    entries: &[(Key<FvPolicyKeyData>, FvRules)],
) -> Result<(), MapsError> {
    for (key, rules) in entries {
        maps.policy
            .insert(key, rules, 0)
            .map_err(update_error("fv_policy"))?;
    }
    let wanted: Vec<(u32, FvPolicyKeyData)> = entries
        .iter()
        .map(|(key, _)| (key.prefix_len(), key.data()))
        .collect();
    for key in policy_keys(&maps.policy)? {
        let data = key.data();
        if data.policy == id && !wanted.contains(&(key.prefix_len(), data)) {
            remove_result("fv_policy", maps.policy.remove(&key))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(cidr: &str, protocol: Protocol, ports: Option<RangeInclusive<u16>>) -> PolicyRule {
        let (addr, len) = cidr.split_once('/').unwrap();
        PolicyRule {
            addr: addr.parse().unwrap(),
            prefix_len: len.parse().unwrap(),
            protocol,
            ports,
        }
    }

    fn entries(rules: &[PolicyRule]) -> Vec<(u32, Vec<u8>, Vec<FvRule>)> {
        compile_policy(7, rules)
            .unwrap()
            .into_iter()
            .map(|(key, value)| {
                let data = key.data();
                assert_eq!(data.policy, 7);
                let rules = value.rules[..value.count as usize].to_vec();
                (key.prefix_len() - 64, data.addr.to_vec(), rules)
            })
            .collect()
    }

    #[test]
    fn a_longer_cidr_inherits_the_rules_of_the_cidrs_covering_it() {
        let compiled = entries(&[
            rule("10.0.0.0/8", Protocol::Tcp, Some(80..=80)),
            rule("10.1.0.0/16", Protocol::Udp, Some(53..=53)),
            rule("192.168.0.0/16", Protocol::Icmp, None),
        ]);
        assert_eq!(compiled.len(), 3);
        let slash16 = compiled.iter().find(|(len, _, _)| *len == 16).unwrap();
        assert_eq!(&slash16.1[..2], &[10, 1]);
        assert_eq!(slash16.2.len(), 2, "its own UDP rule and the /8's TCP rule");
        let slash8 = compiled.iter().find(|(len, _, _)| *len == 8).unwrap();
        assert_eq!(
            slash8.2.len(),
            1,
            "a covering CIDR does not get the longer one's rules"
        );
        let other = compiled.iter().find(|(_, addr, _)| addr[0] == 192).unwrap();
        assert_eq!(other.2.len(), 1, "a disjoint CIDR keeps only its own");
    }

    #[test]
    fn host_bits_are_masked_and_duplicates_merge() {
        let compiled = entries(&[
            rule("10.1.2.3/16", Protocol::Any, None),
            rule("10.1.0.0/16", Protocol::Any, None),
        ]);
        assert_eq!(compiled.len(), 1);
        assert_eq!(&compiled[0].1[..4], &[10, 1, 0, 0]);
        assert_eq!(compiled[0].2.len(), 1);
        assert_eq!(
            (compiled[0].2[0].port_min, compiled[0].2[0].port_max),
            (0, u16::MAX)
        );
    }

    #[test]
    fn ipv4_cidrs_do_not_cover_ipv6_ones() {
        let compiled = entries(&[
            rule("0.0.0.0/0", Protocol::Any, None),
            rule("fd00::/8", Protocol::Tcp, Some(443..=443)),
        ]);
        assert!(compiled.iter().all(|(_, _, rules)| rules.len() == 1));
    }

    #[test]
    fn empty_policy_compiles_to_nothing_which_denies_all() {
        assert!(compile_policy(1, &[]).unwrap().is_empty());
    }

    #[test]
    fn invalid_rules_are_refused_with_what_to_fix() {
        let too_long = rule("10.0.0.0/33", Protocol::Any, None);
        assert!(matches!(
            compile_policy(1, &[too_long]),
            Err(PolicyError::BadPrefixLength { .. })
        ));
        let icmp_ports = rule("10.0.0.0/8", Protocol::Icmp, Some(1..=2));
        assert!(matches!(
            compile_policy(1, &[icmp_ports]),
            Err(PolicyError::PortsWithoutTransport { .. })
        ));
        #[allow(clippy::reversed_empty_ranges)]
        let empty = rule("10.0.0.0/8", Protocol::Tcp, Some(9..=1));
        assert!(matches!(
            compile_policy(1, &[empty]),
            Err(PolicyError::EmptyPortRange { .. })
        ));
        assert!(matches!(
            compile_policy(0, &[]),
            Err(PolicyError::InvalidId)
        ));
        let many: Vec<_> = (1..=17)
            .map(|port| rule("10.0.0.0/8", Protocol::Tcp, Some(port..=port)))
            .collect();
        assert!(matches!(
            compile_policy(1, &many),
            Err(PolicyError::TooManyRules { count: 17, .. })
        ));
    }

    #[test]
    fn mask_keeps_prefix_bits_only() {
        let bytes = [0xff; 16];
        assert_eq!(mask(bytes, 0), [0; 16]);
        assert_eq!(&mask(bytes, 12)[..3], &[0xff, 0xf0, 0]);
        assert_eq!(mask(bytes, 128), bytes);
    }
}
