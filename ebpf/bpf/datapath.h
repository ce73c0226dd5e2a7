/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The ferrovirt datapath's maps and their value layouts. `ebpf/src/maps.rs` mirrors every
 * struct here with #[repr(C)]; the layout test in that module checks the sizes against the
 * BTF of the compiled object, so the two cannot drift apart silently.
 *
 * All integers are host byte order except MAC and IP addresses, which are kept as they
 * appear on the wire.
 *
 * The per-packet path reads arrays only (their lookups are inlined by the JIT; a hash
 * lookup is a function call, ~25 ns on a kernel with return-thunk mitigations): a port's
 * slot by ifindex, the port, its network (with the network's FDB inside), its policy and its
 * counters. Only an uplink's (ifindex, VLAN) -> network mapping and ifindexes beyond
 * FV_MAX_IFINDEX use a hash map.
 */
#ifndef FERROVIRT_DATAPATH_H
#define FERROVIRT_DATAPATH_H

#include <linux/types.h>

/* Endpoints (VM NICs) of one network on one node: its FDB and flood list. */
#define FV_MAX_MEMBERS 256
/* Buckets of a network's FDB index (open addressing, at most half full). */
#define FV_FDB_BUCKETS 512
#define FV_FDB_BUCKET_BITS 9
/* The control plane places every MAC within this many buckets of its own (choosing the
 * network's fdb_seed until they fit), so a lookup probes at most this many. */
#define FV_FDB_MAX_PROBES 16
/* Ports (endpoints and uplinks) on one node; slot 0 is never used. */
#define FV_MAX_PORTS 8192
/* Ifindexes below this find their slot in an array, the rest in fv_port_slots_high. */
#define FV_MAX_IFINDEX 65536
/* Network and policy ids are array indexes: 1..FV_MAX_NETWORKS-1, 1..FV_MAX_POLICIES-1. */
#define FV_MAX_NETWORKS 1024
#define FV_MAX_POLICIES 1024
/* Rules of one policy, IPv4 and IPv6 together. */
#define FV_MAX_POLICY_RULES 64
/* Addresses one endpoint may send from, per family. */
#define FV_MAX_ADDRS 4
#define FV_MAX_UPLINKS 1024

/* fv_port.flags */
#define FV_PORT_ENDPOINT (1 << 0) /* a VM NIC: fv_from_endpoint serves it */
#define FV_PORT_UPLINK (1 << 1)	  /* an uplink: the slot holds its counters */
#define FV_EP_CHECK_IP (1 << 2)	  /* source IPs (and ARP/NDP claims) must be the port's */

/* fv_ports[slot]: a VM NIC (or an uplink, which uses only flags and ifindex). */
struct fv_port {
	__u8 mac[6];	     /* the only source MAC this endpoint may send */
	__u16 flags;	     /* FV_PORT_*, FV_EP_* */
	__u32 ifindex;	     /* the interface the slot belongs to */
	__u32 network;	     /* network id, index of fv_networks */
	__u32 policy;	     /* policy id, index of fv_policies; 0: no policy, everything allowed */
	__u8 addr4_count;    /* valid entries of addr4[] */
	__u8 addr6_count;    /* valid entries of addr6[] */
	__u16 pad;
	__u32 addr4[FV_MAX_ADDRS];    /* wire order */
	__u32 addr6[FV_MAX_ADDRS][4]; /* wire order */
};

/* fv_member.flags */
#define FV_MEMBER_PEER (1 << 0) /* a veth whose peer is in another netns: bpf_redirect_peer */

/* One endpoint of a network: FDB entry and flood target. ifindex 0: a free entry. */
struct fv_member {
	__u8 mac[6];
	__u16 flags; /* FV_MEMBER_* */
	__u32 ifindex;
	__u32 slot;
};

/* fv_networks[id] */
#define FV_NET_PRESENT (1 << 0)

struct fv_network {
	__u32 uplink;	    /* ifindex of the uplink; 0: no uplink, unknown unicast dropped */
	__u32 uplink_slot;  /* its slot in fv_ports/fv_counters */
	__u16 vlan;	    /* 802.1Q VLAN id on the uplink; 0: untagged */
	__u16 member_count; /* entries of members[] in use or freed; the rest are zero */
	__u16 flags;	    /* FV_NET_* */
	__u16 pad;
	__u32 fdb_seed;	    /* mixed into the FDB's bucket hash */
	__u32 pad2;
	struct fv_member members[FV_MAX_MEMBERS];
	/* The FDB's index: 1 + the members[] entry of a MAC, probed linearly from the MAC's
	 * bucket (fdb_find); 0 ends a probe. */
	__u16 fdb[FV_FDB_BUCKETS];
};

struct fv_uplink_key {
	__u32 ifindex;
	__u32 vlan; /* 0: untagged frames */
};

#define FV_PROTO_ANY 0

/* One allow rule: destination CIDR (addr & mask == addr), protocol, destination ports. */
struct fv_rule {
	__u32 addr[4]; /* wire order; IPv4 in addr[0] */
	__u32 mask[4];
	__u8 proto;	/* IPPROTO_*; FV_PROTO_ANY matches every protocol */
	__u8 pad;
	__u16 port_min; /* destination port range, inclusive; 0..65535 for any */
	__u16 port_max;
	__u16 pad2;
};

/* fv_policies[id]: IPv4 rules first, then IPv6 rules. No rules: everything denied. */
struct fv_policy {
	__u16 ipv4_rules;
	__u16 ipv6_rules;
	__u32 pad;
	struct fv_rule rules[FV_MAX_POLICY_RULES];
};

/* The slots in use, one bit each (fv_port_alloc's only entry); only the control plane,
 * under the pin directory's lock, reads and writes it. */
struct fv_port_alloc {
	__u64 used[FV_MAX_PORTS / 64];
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
