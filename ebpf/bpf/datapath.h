/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The ferrovirt datapath's maps and their value layouts. `ebpf/src/maps.rs` mirrors every
 * struct here with #[repr(C)]; the layout test in that module checks the sizes against the
 * BTF of the compiled object, so the two cannot drift apart silently.
 *
 * All integers are host byte order except MAC and IP addresses, which are kept as they
 * appear on the wire.
 */
#ifndef FERROVIRT_DATAPATH_H
#define FERROVIRT_DATAPATH_H

#include <linux/types.h>

/* Endpoints (VM NICs) one network can flood to; a bounded loop in the programs walks them. */
#define FV_MAX_MEMBERS 64
/* Allow rules one policy can attach to one CIDR (after the loader merged covering CIDRs). */
#define FV_MAX_RULES 16

#define FV_MAX_ENDPOINTS 4096
#define FV_MAX_NETWORKS 1024
#define FV_MAX_FDB 16384
#define FV_MAX_ADDRS 16384
#define FV_MAX_POLICY_PREFIXES 16384
#define FV_MAX_UPLINKS 1024

/* fv_endpoint.flags */
#define FV_EP_CHECK_IP (1 << 0) /* source IPs (and ARP/NDP claims) must be in fv_addrs */

/* Key of fv_endpoints and fv_counters: the ifindex of the VM's TAP (or the uplink). */

struct fv_endpoint {
	__u8 mac[6];	  /* the only source MAC this endpoint may send */
	__u16 flags;	  /* FV_EP_* */
	__u32 network;	  /* network id, key of fv_networks */
	__u32 policy;	  /* policy id in fv_policy; 0: no policy, everything allowed */
};

struct fv_network {
	__u32 uplink;	      /* ifindex of the uplink; 0: no uplink, unknown unicast dropped */
	__u16 vlan;	      /* 802.1Q VLAN id on the uplink; 0: untagged */
	__u16 member_count;   /* valid entries of members[] */
	__u32 members[FV_MAX_MEMBERS]; /* endpoint ifindexes, for broadcast and multicast */
};

struct fv_fdb_key {
	__u32 network;
	__u8 mac[6];
	__u16 pad;
};

struct fv_uplink_key {
	__u32 ifindex;
	__u32 vlan; /* 0: untagged frames */
};

#define FV_FAMILY_IPV4 4
#define FV_FAMILY_IPV6 6

/* An address an endpoint was given; IPv4 uses the first 4 bytes of addr, the rest zero. */
struct fv_addr_key {
	__u32 ifindex;
	__u32 family;
	__u8 addr[16];
};

/* LPM trie key: prefixlen covers policy and family (64 bits) plus the CIDR's length. */
struct fv_policy_key {
	__u32 prefixlen;
	__u32 policy;
	__u32 family;
	__u8 addr[16];
};

#define FV_PROTO_ANY 0

struct fv_rule {
	__u8 proto;	/* IPPROTO_*; FV_PROTO_ANY matches every protocol */
	__u8 pad;
	__u16 port_min; /* destination port range, inclusive; 0..65535 for any */
	__u16 port_max;
	__u16 pad2;
};

struct fv_rules {
	__u32 count;
	struct fv_rule rules[FV_MAX_RULES];
};

/* Per-CPU counters of one endpoint or uplink, from the endpoint's point of view:
 * tx is what it sent into the datapath, rx what the datapath delivered to it. */
struct fv_counters {
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 drop_spoof_mac;
	__u64 drop_spoof_ip;
	__u64 drop_spoof_arp; /* ARP and NDP claims, and router advertisements from a VM */
	__u64 drop_policy;    /* policy, and 802.1Q frames from a VM */
	__u64 drop_no_route;
};

#endif
