//! Egress allow-list policies and their compilation into fv_policies entries.
//!
//! A policy is a list of rules, each a destination CIDR, a protocol and a port range; a
//! packet is allowed when some rule matches it. The program scans the rules of the packet's
//! family (IPv4 rules come first in the entry, then IPv6 ones); with at most
//! [`MAX_POLICY_RULES`] of them that is cheaper than a trie lookup, which is a function call.
//! A policy with no rules denies everything.

use std::net::IpAddr;
use std::ops::RangeInclusive;

use crate::maps::{FvPolicy, FvRule, MAX_POLICIES, MAX_POLICY_RULES, Maps, MapsError};

/// A policy id, 1..=1023; 0 means "no policy" in the maps.
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
    #[error(
        "policy id {0} is out of range; 0 is reserved for \"no policy\": use ids 1..={max}",
        max = MAX_POLICIES - 1
    )]
    InvalidId(PolicyId),
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
        "the policy has {count} distinct rules; at most {MAX_POLICY_RULES} fit: merge rules (wider CIDRs or port ranges)"
    )]
    TooManyRules { count: usize },
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

/// The compiled rule: masked CIDR and its mask, protocol number and port range.
fn compile_rule(rule: &PolicyRule) -> Result<FvRule, PolicyError> {
    let (bytes, max) = match rule.addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (bytes, 32)
        }
        IpAddr::V6(v6) => (v6.octets(), 128),
    };
    if rule.prefix_len > max {
        return Err(PolicyError::BadPrefixLength {
            addr: rule.addr,
            prefix_len: rule.prefix_len,
        });
    }
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
        addr: mask(bytes, rule.prefix_len),
        mask: mask([0xff; 16], rule.prefix_len),
        proto: rule.protocol.number(),
        port_min,
        port_max,
        ..FvRule::default()
    })
}

/// The fv_policies entry of policy `id`: its distinct rules, IPv4 ones first.
pub(crate) fn compile_policy(id: PolicyId, rules: &[PolicyRule]) -> Result<FvPolicy, PolicyError> {
    if !(1..MAX_POLICIES).contains(&id) {
        return Err(PolicyError::InvalidId(id));
    }
    let mut ipv4 = Vec::new();
    let mut ipv6 = Vec::new();
    for rule in rules {
        let compiled = compile_rule(rule)?;
        let list = if rule.addr.is_ipv4() {
            &mut ipv4
        } else {
            &mut ipv6
        };
        if !list.contains(&compiled) {
            list.push(compiled);
        }
    }
    let count = ipv4.len() + ipv6.len();
    if count > MAX_POLICY_RULES {
        return Err(PolicyError::TooManyRules { count });
    }
    let mut policy = FvPolicy {
        ipv4_rules: ipv4.len() as u16,
        ipv6_rules: ipv6.len() as u16,
        ..FvPolicy::default()
    };
    for (slot, rule) in policy.rules.iter_mut().zip(ipv4.iter().chain(&ipv6)) {
        *slot = *rule;
    }
    Ok(policy)
}

/// Replaces policy `id`'s entry (one array update: a program sees the old rules or the new).
pub(crate) fn write_policy(
    maps: &mut Maps,
    id: PolicyId,
    policy: &FvPolicy,
) -> Result<(), MapsError> {
    maps.write_policy(id, policy)
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

    #[test]
    fn ipv4_rules_come_first_and_duplicates_merge() {
        let policy = compile_policy(
            7,
            &[
                rule("fd00::/8", Protocol::Tcp, Some(443..=443)),
                rule("10.1.2.3/16", Protocol::Any, None),
                rule("10.1.0.0/16", Protocol::Any, None),
                rule("192.168.0.0/16", Protocol::Udp, Some(53..=53)),
            ],
        )
        .unwrap();
        assert_eq!((policy.ipv4_rules, policy.ipv6_rules), (2, 1));
        let first = policy.rules[0];
        assert_eq!(&first.addr[..4], &[10, 1, 0, 0], "host bits masked");
        assert_eq!(&first.mask[..4], &[0xff, 0xff, 0, 0]);
        assert_eq!((first.port_min, first.port_max), (0, u16::MAX));
        assert_eq!(policy.rules[1].proto, libc::IPPROTO_UDP as u8);
        assert_eq!(policy.rules[2].addr[0], 0xfd);
        assert_eq!(&policy.rules[2].mask[..2], &[0xff, 0]);
        assert_eq!(policy.rules[3], FvRule::default(), "the rest stays zero");
    }

    #[test]
    fn empty_policy_has_no_rules_which_denies_all() {
        let policy = compile_policy(1, &[]).unwrap();
        assert_eq!((policy.ipv4_rules, policy.ipv6_rules), (0, 0));
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
        for id in [0, MAX_POLICIES] {
            assert!(matches!(
                compile_policy(id, &[]),
                Err(PolicyError::InvalidId(_))
            ));
        }
        let many: Vec<_> = (1..=MAX_POLICY_RULES as u16 + 1)
            .map(|port| rule("10.0.0.0/8", Protocol::Tcp, Some(port..=port)))
            .collect();
        assert!(matches!(
            compile_policy(1, &many),
            Err(PolicyError::TooManyRules { count: 65 })
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
