// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * ferrovirt's VM network datapath: an L2 switch between VM TAPs and uplinks, with
 * anti-spoofing, VLANs, an egress allow-list policy and per-endpoint counters.
 *
 *   fv_from_endpoint     TC ingress on a VM's TAP (frames the VM sent)
 *   fv_from_uplink       TC ingress on an uplink
 *   fv_xdp_from_uplink   XDP on an uplink: known unicast straight to the VM's TAP, the rest
 *                        passed on to fv_from_uplink
 *
 * The control plane (ebpf/src) fills the maps; the programs never learn addresses, because
 * every VM's MAC and IPs are known when its endpoint is attached.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "datapath.h"


char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define ARRAY_MAP(name, entries, value_type)                                                   \
	struct {                                                                               \
		__uint(type, BPF_MAP_TYPE_ARRAY);                                              \
		__uint(max_entries, entries);                                                  \
		__type(key, __u32);                                                            \
		__type(value, value_type);                                                     \
		__uint(pinning, LIBBPF_PIN_BY_NAME);                                           \
	} name SEC(".maps")

/* ifindex -> slot in fv_ports and fv_counters (0: none), for ifindexes < FV_MAX_IFINDEX. */
ARRAY_MAP(fv_port_slots, FV_MAX_IFINDEX, __u32);

/* The same for larger ifindexes, which a long-lived node reaches (they only grow). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FV_MAX_PORTS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fv_port_slots_high SEC(".maps");

ARRAY_MAP(fv_ports, FV_MAX_PORTS, struct fv_port);
ARRAY_MAP(fv_port_alloc, 1, struct fv_port_alloc);
ARRAY_MAP(fv_networks, FV_MAX_NETWORKS, struct fv_network);
ARRAY_MAP(fv_policies, FV_MAX_POLICIES, struct fv_policy);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FV_MAX_UPLINKS);
	__type(key, struct fv_uplink_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fv_uplinks SEC(".maps");

/* The packet a policy decides on: fv_from_endpoint's parsing fills it, the policy scan
 * reads it. */
struct fv_flow {
	__u32 daddr[4]; /* wire order; IPv4 in daddr[0] */
	__u8 ipv6;
	__u8 proto;
	__u8 has_port;
	__u8 pad;
	__u16 dport;
	__u16 pad2;
};

/* One fv_flow per CPU. Kept in a map rather than on the stack, the flow is unknown to the
 * verifier, so every parsing path reaches the inlined policy scan in the same state and the
 * scan is verified once (measured: 69k instructions; 425k with the flow on the stack, where
 * each path's constants made a state of its own). Not pinned: each loaded object has its own. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fv_flow);
} fv_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FV_MAX_PORTS);
	__type(key, __u32);
	__type(value, struct fv_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fv_counters SEC(".maps");

#define ETH_P_8021Q_BE bpf_htons(ETH_P_8021Q)
#define VLAN_HLEN 4
#define VLAN_VID_MASK 0x0fff
/* Headers the TC programs read directly: Ethernet, an IPv6 header, and 32 bytes after it
 * (TCP/UDP ports, an NDP message and its first option). */
#define FV_PARSE_LEN (ETH_HLEN + sizeof(struct ipv6hdr) + 32)

enum fv_reason {
	FV_DROP_SPOOF_MAC,
	FV_DROP_SPOOF_IP,
	FV_DROP_SPOOF_ARP,
	FV_DROP_POLICY,
	FV_DROP_NO_ROUTE,
};

struct arp_eth_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 oper;
	__u8 sha[ETH_ALEN];
	__u8 spa[4];
	__u8 tha[ETH_ALEN];
	__u8 tpa[4];
} __attribute__((packed));

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

/* The slot of the port on `ifindex`; 0 when it is none of ours. */
static __always_inline __u32 port_slot(__u32 ifindex)
{
	__u32 *slot;

	if (ifindex < FV_MAX_IFINDEX)
		slot = bpf_map_lookup_elem(&fv_port_slots, &ifindex);
	else
		slot = bpf_map_lookup_elem(&fv_port_slots_high, &ifindex);
	return slot ? *slot : 0;
}

static __always_inline struct fv_counters *counters_of(__u32 slot)
{
	return bpf_map_lookup_elem(&fv_counters, &slot);
}

static __always_inline void count_rx(__u32 slot, __u32 len)
{
	struct fv_counters *c = counters_of(slot);

	if (c) {
		c->rx_packets++;
		c->rx_bytes += len;
	}
}

static __always_inline void count_drop(struct fv_counters *c, enum fv_reason reason)
{
	if (!c)
		return;
	switch (reason) {
	case FV_DROP_SPOOF_MAC:
		c->drop_spoof_mac++;
		break;
	case FV_DROP_SPOOF_IP:
		c->drop_spoof_ip++;
		break;
	case FV_DROP_SPOOF_ARP:
		c->drop_spoof_arp++;
		break;
	case FV_DROP_POLICY:
		c->drop_policy++;
		break;
	case FV_DROP_NO_ROUTE:
		c->drop_no_route++;
		break;
	}
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return *(const __u32 *)a == *(const __u32 *)b &&
	       *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

static __always_inline int ipv4_allowed(const struct fv_port *port, __be32 addr)
{
	int i;

#pragma unroll
	for (i = 0; i < FV_MAX_ADDRS; i++) {
		if (i >= port->addr4_count)
			break;
		if (port->addr4[i] == addr)
			return 1;
	}
	return 0;
}

/* fe80::/64: link-local addresses are not routed, and guests pick them themselves
 * (EUI-64 or stable-privacy), so they are always allowed as a source. */
static __always_inline int ipv6_link_local(const struct in6_addr *a)
{
	return a->in6_u.u6_addr32[0] == bpf_htonl(0xfe800000) && a->in6_u.u6_addr32[1] == 0;
}

static __always_inline int ipv6_unspecified(const struct in6_addr *a)
{
	return (a->in6_u.u6_addr32[0] | a->in6_u.u6_addr32[1] | a->in6_u.u6_addr32[2] |
		a->in6_u.u6_addr32[3]) == 0;
}

static __always_inline int ipv6_eq(const __u32 *a, const struct in6_addr *b)
{
	return ((a[0] ^ b->in6_u.u6_addr32[0]) | (a[1] ^ b->in6_u.u6_addr32[1]) |
		(a[2] ^ b->in6_u.u6_addr32[2]) | (a[3] ^ b->in6_u.u6_addr32[3])) == 0;
}

static __always_inline int ipv6_allowed(const struct fv_port *port, const struct in6_addr *a)
{
	int i;

	if (ipv6_link_local(a))
		return 1;
#pragma unroll
	for (i = 0; i < FV_MAX_ADDRS; i++) {
		if (i >= port->addr6_count)
			break;
		if (ipv6_eq(port->addr6[i], a))
			return 1;
	}
	return 0;
}

/*
 * Global functions (FV_SUBPROG) are verified once on their own instead of once for every
 * path that reaches them. Each costs a call per packet (~7 ns here), so only the flood
 * loop, which runs for broadcasts, is one.
 */
#define FV_SUBPROG __attribute__((noinline))

/* Whether the ports of rule `r` allow the flow. The flow's port fields are read from
 * memory each time: kept in registers, the verifier's branch on them would split every
 * later iteration's state in two (measured: 160k instructions to verify instead of 70k). */
static __always_inline int ports_allow(const struct fv_rule *r, const struct fv_flow *f)
{
	if (r->port_min == 0 && r->port_max == 0xffff)
		return 1;
	return f->has_port && f->dport >= r->port_min && f->dport <= r->port_max;
}

/* The endpoint's allow-list: some rule of the flow's family matches its protocol, holds
 * the destination in its CIDR and allows its port. IPv6 rules follow the IPv4 ones. Inlined
 * once, in fv_from_endpoint, on a flow the verifier knows nothing of (fv_scratch). */
static __always_inline int policy_allows(__u32 policy_id, const struct fv_flow *f)
{
	struct fv_policy *policy = bpf_map_lookup_elem(&fv_policies, &policy_id);
	__u32 d0, d1, d2, d3, start, end;
	__u8 proto;
	int i;

	if (!policy)
		return 0;
	d0 = f->daddr[0];
	d1 = f->daddr[1];
	d2 = f->daddr[2];
	d3 = f->daddr[3];
	proto = f->proto;
	if (!f->ipv6) {
		end = policy->ipv4_rules;
		for (i = 0; i < FV_MAX_POLICY_RULES; i++) {
			const struct fv_rule *r = &policy->rules[i];

			if (i >= end)
				break;
			if (r->proto != FV_PROTO_ANY && r->proto != proto)
				continue;
			if (((d0 ^ r->addr[0]) & r->mask[0]) == 0 &&
			    ports_allow(r, f))
				return 1;
		}
		return 0;
	}
	start = policy->ipv4_rules;
	end = policy->ipv6_rules;
	for (i = 0; i < FV_MAX_POLICY_RULES; i++) {
		/* The control plane keeps ipv4_rules + ipv6_rules <= FV_MAX_POLICY_RULES; the
		 * mask is for the verifier. */
		const struct fv_rule *r = &policy->rules[(start + i) & (FV_MAX_POLICY_RULES - 1)];

		if (i >= end)
			break;
		if (r->proto != FV_PROTO_ANY && r->proto != proto)
			continue;
		if ((((d0 ^ r->addr[0]) & r->mask[0]) | ((d1 ^ r->addr[1]) & r->mask[1]) |
		     ((d2 ^ r->addr[2]) & r->mask[2]) | ((d3 ^ r->addr[3]) & r->mask[3])) == 0 &&
		    ports_allow(r, f))
			return 1;
	}
	return 0;
}

/* Makes the first FV_PARSE_LEN bytes (or the whole frame) directly readable. */
static __always_inline void pull_headers(struct __sk_buff *skb)
{
	__u32 want = skb->len < FV_PARSE_LEN ? skb->len : FV_PARSE_LEN;

	if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, want);
}

/* Copies the frame to every other endpoint of the network. */
FV_SUBPROG int flood_members(struct __sk_buff *skb, const struct fv_network *net, __u32 from)
{
	__u32 len;
	int i;

	if (!skb || !net)
		return 0;
	len = skb->len;
	for (i = 0; i < FV_MAX_MEMBERS; i++) {
		const struct fv_member *m = &net->members[i];

		if (i >= net->member_count)
			break;
		if (m->ifindex == 0 || m->ifindex == from)
			continue;
		if (bpf_clone_redirect(skb, m->ifindex, 0) == 0)
			count_rx(m->slot, len);
	}
	return 0;
}

/* A MAC as one integer: bytes 0-3 little-endian in the low half, 4-5 above them. */
static __always_inline __u64 mac_key(const __u8 *mac)
{
	return *(const __u32 *)mac | ((__u64) * (const __u16 *)(mac + 4) << 32);
}

/* 1 + the members[] entry that owns the MAC, or 0: probes the FDB index from the MAC's
 * bucket (ebpf/src/maps.rs computes the same bucket) until an empty one, at most
 * FV_FDB_MAX_PROBES buckets. */
static __always_inline __u32 fdb_find(const struct fv_network *net, __u64 mac)
{
	__u32 bucket = (((__u32)(mac >> 16) ^ net->fdb_seed) * 2654435761u) >> (32 - FV_FDB_BUCKET_BITS);
	int i;

	/* A loop, not 16 copies: one or two probes run. */
#pragma clang loop unroll(disable)
	for (i = 0; i < FV_FDB_MAX_PROBES; i++) {
		__u32 entry = net->fdb[(bucket + i) & (FV_FDB_BUCKETS - 1)];
		const struct fv_member *m;

		if (entry == 0)
			return 0;
		m = &net->members[(entry - 1) & (FV_MAX_MEMBERS - 1)];
		if (m->ifindex != 0 && mac_key(m->mac) == mac)
			return entry;
	}
	return 0;
}

/* The local endpoint that owns `mac` on the network, or NULL. */
static __always_inline const struct fv_member *fdb_lookup(const struct fv_network *net,
							  const __u8 *mac)
{
	__u32 entry = fdb_find(net, mac_key(mac));

	if (!entry)
		return NULL;
	return &net->members[(entry - 1) & (FV_MAX_MEMBERS - 1)];
}

/* Hands a unicast frame to a local endpoint: a veth's peer directly (its ingress, in its
 * own namespace), anything else through its transmit path. */
static __always_inline int redirect_to(const struct fv_member *m)
{
	if (m->flags & FV_MEMBER_PEER)
		return bpf_redirect_peer(m->ifindex, 0);
	return bpf_redirect(m->ifindex, 0);
}

static __always_inline int to_uplink(struct __sk_buff *skb, const struct fv_network *net)
{
	__u32 len;

	if (net->vlan && bpf_skb_vlan_push(skb, ETH_P_8021Q_BE, net->vlan) != 0)
		return TC_ACT_SHOT;
	len = skb->len;
	count_rx(net->uplink_slot, len);
	return bpf_redirect(net->uplink, 0);
}

/* Anti-spoofing for one frame from an endpoint: 0 lets it through, a positive value is the
 * reason it is dropped (+1), FV_CHECK_POLICY means it passes once the endpoint's policy
 * allows `out`, which is filled. */
#define FV_CHECK_POLICY (-1)

static __always_inline int check_from_endpoint(struct __sk_buff *skb, const struct fv_port *ep,
					       struct fv_flow *out)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	int check_ip = ep->flags & FV_EP_CHECK_IP;

	if ((void *)(eth + 1) > data_end)
		return FV_DROP_POLICY + 1;
	if (!mac_eq(eth->h_source, ep->mac))
		return FV_DROP_SPOOF_MAC + 1;
	/* VMs send untagged frames; the network decides the VLAN. The receive path moves an
	 * 802.1Q tag into the skb (skb_vlan_untag) before TC ingress, so a tagged frame from a
	 * TAP shows up here as vlan_present with the inner EtherType in the header; the check
	 * of h_proto at the end catches the tag only where it stayed in the frame. */
	if (skb->vlan_present)
		return FV_DROP_POLICY + 1;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u16 dport = 0;
		int has_port = 0;

		if ((void *)(ip + 1) > data_end)
			return FV_DROP_POLICY + 1;
		if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) {
			/* Ports only in the first fragment; later ones match port-less rules. */
			if (!(ip->frag_off & bpf_htons(0x1fff))) {
				__u8 *l4 = (__u8 *)ip + ip->ihl * 4;

				if (ip->ihl >= 5 && (void *)(l4 + 4) <= data_end) {
					dport = bpf_ntohs(*(__be16 *)(l4 + 2));
					has_port = 1;
				}
			}
		}
		if (check_ip && !ipv4_allowed(ep, ip->saddr)) {
			/* DHCP: a client without an address asks from 0.0.0.0 to port 67. */
			if (!(ip->saddr == 0 && ip->protocol == IPPROTO_UDP && has_port && dport == 67))
				return FV_DROP_SPOOF_IP + 1;
		}
		if (ep->policy) {
			struct fv_flow flow = {
				.daddr = { ip->daddr },
				.proto = ip->protocol,
				.has_port = has_port,
				.dport = dport,
			};

			__builtin_memcpy(out, &flow, sizeof(flow));
			return FV_CHECK_POLICY;
		}
		return 0;
	}

	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		__u8 *l4 = (__u8 *)(ip6 + 1);
		__u16 dport = 0;
		int has_port = 0;
		int neighbor_discovery = 0;

		if ((void *)(ip6 + 1) > data_end)
			return FV_DROP_POLICY + 1;
		if (ip6->nexthdr == IPPROTO_ICMPV6 && (void *)(l4 + 1) <= data_end) {
			__u8 type = l4[0];

			/* A router advertisement from a VM would hijack its neighbours' routes. */
			if (type == 134)
				return FV_DROP_SPOOF_ARP + 1;
			/* Router and neighbour solicitations and advertisements are IPv6's ARP:
			 * like ARP they pass the policy, or no allowed IPv6 peer is reachable. */
			neighbor_discovery = type == 133 || type == 135 || type == 136;
			if (type == 135 || type == 136) {
				/* NS/NA: 8-byte header, target address, then the first option. The
				 * link-layer address it carries must be the endpoint's own. */
				struct in6_addr *target = (void *)(l4 + 8);
				__u8 *opt = l4 + 24;

				if ((void *)(opt + 8) <= data_end && (opt[0] == 1 || opt[0] == 2) &&
				    opt[1] == 1 && !mac_eq(opt + 2, ep->mac))
					return FV_DROP_SPOOF_ARP + 1;
				if (type == 136 && check_ip) {
					if ((void *)(target + 1) > data_end ||
					    !ipv6_allowed(ep, target))
						return FV_DROP_SPOOF_ARP + 1;
				}
			}
		}
		if (check_ip && !ipv6_allowed(ep, &ip6->saddr)) {
			/* Duplicate address detection and MLD come from :: before an address is
			 * configured. */
			if (!(ipv6_unspecified(&ip6->saddr) && ip6->nexthdr == IPPROTO_ICMPV6))
				return FV_DROP_SPOOF_IP + 1;
		}
		if ((ip6->nexthdr == IPPROTO_TCP || ip6->nexthdr == IPPROTO_UDP) &&
		    (void *)(l4 + 4) <= data_end) {
			dport = bpf_ntohs(*(__be16 *)(l4 + 2));
			has_port = 1;
		}
		if (ep->policy && !neighbor_discovery) {
			struct fv_flow flow = {
				.ipv6 = 1,
				.proto = ip6->nexthdr,
				.has_port = has_port,
				.dport = dport,
			};

			__builtin_memcpy(flow.daddr, &ip6->daddr, sizeof(flow.daddr));
			__builtin_memcpy(out, &flow, sizeof(flow));
			return FV_CHECK_POLICY;
		}
		return 0;
	}

	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		struct arp_eth_ipv4 *arp = (void *)(eth + 1);
		__be32 spa;

		if ((void *)(arp + 1) > data_end)
			return FV_DROP_SPOOF_ARP + 1;
		if (!mac_eq(arp->sha, ep->mac))
			return FV_DROP_SPOOF_ARP + 1;
		__builtin_memcpy(&spa, arp->spa, 4);
		/* 0.0.0.0 is an ARP probe (RFC 5227) and claims nothing. */
		if (check_ip && spa != 0 && !ipv4_allowed(ep, spa))
			return FV_DROP_SPOOF_ARP + 1;
		return 0;
	}

	/* A tag (or a second one) left in the frame. */
	if (eth->h_proto == ETH_P_8021Q_BE || eth->h_proto == bpf_htons(ETH_P_8021AD))
		return FV_DROP_POLICY + 1;
	return 0;
}

SEC("classifier")
int fv_from_endpoint(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ingress_ifindex;
	__u32 slot = port_slot(ifindex);
	const struct fv_member *dst;
	struct fv_network *net;
	struct fv_counters *c;
	struct fv_flow *flow;
	struct fv_port *ep;
	__u32 zero = 0;
	int verdict;

	ep = bpf_map_lookup_elem(&fv_ports, &slot);
	if (!ep || !(ep->flags & FV_PORT_ENDPOINT))
		/* Our program on a TAP we know nothing of: fail closed. */
		return TC_ACT_SHOT;
	c = counters_of(slot);
	if (c) {
		c->tx_packets++;
		c->tx_bytes += skb->len;
	}

	pull_headers(skb);
	flow = bpf_map_lookup_elem(&fv_scratch, &zero);
	if (!flow)
		return TC_ACT_SHOT;
	verdict = check_from_endpoint(skb, ep, flow);
	if (verdict == FV_CHECK_POLICY)
		verdict = policy_allows(ep->policy, flow) ? 0 : FV_DROP_POLICY + 1;
	if (verdict) {
		count_drop(c, verdict - 1);
		return TC_ACT_SHOT;
	}

	net = bpf_map_lookup_elem(&fv_networks, &ep->network);
	if (!net || !(net->flags & FV_NET_PRESENT)) {
		count_drop(c, FV_DROP_NO_ROUTE);
		return TC_ACT_SHOT;
	}

	{
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		struct ethhdr *eth = data;

		if ((void *)(eth + 1) > data_end)
			return TC_ACT_SHOT;
		if (eth->h_dest[0] & 1) {
			/* Broadcast and multicast: every other endpoint, then the uplink. */
			flood_members(skb, net, ifindex);
			if (!net->uplink)
				return TC_ACT_SHOT;
			return to_uplink(skb, net);
		}
		dst = fdb_lookup(net, eth->h_dest);
	}

	if (dst) {
		count_rx(dst->slot, skb->len);
		return redirect_to(dst);
	}
	if (net->uplink)
		return to_uplink(skb, net);
	count_drop(c, FV_DROP_NO_ROUTE);
	return TC_ACT_SHOT;
}

/* The network an uplink frame belongs to, by the uplink and its VLAN tag. */
static __always_inline struct fv_network *uplink_network(const struct fv_uplink_key *key)
{
	struct fv_network *net;
	__u32 *network;

	network = bpf_map_lookup_elem(&fv_uplinks, key);
	if (!network)
		return NULL;
	net = bpf_map_lookup_elem(&fv_networks, network);
	if (!net || !(net->flags & FV_NET_PRESENT))
		return NULL;
	return net;
}

SEC("classifier")
int fv_from_uplink(struct __sk_buff *skb)
{
	struct fv_uplink_key ukey = { .ifindex = skb->ingress_ifindex };
	const struct fv_member *dst = NULL;
	struct fv_network *net;
	struct fv_counters *c;
	__u64 mac;
	int multicast;

	pull_headers(skb);
	{
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		struct ethhdr *eth = data;

		if ((void *)(eth + 1) > data_end)
			return TC_ACT_OK;
		/* The stack usually moved the tag into the skb already; BPF_PROG_TEST_RUN and
		 * stacked tags leave it in the frame. */
		if (skb->vlan_present) {
			ukey.vlan = skb->vlan_tci & VLAN_VID_MASK;
		} else if (eth->h_proto == ETH_P_8021Q_BE) {
			struct vlan_hdr *vh = (void *)(eth + 1);

			if ((void *)(vh + 1) > data_end)
				return TC_ACT_OK;
			ukey.vlan = bpf_ntohs(vh->tci) & VLAN_VID_MASK;
		}
		multicast = eth->h_dest[0] & 1;
		mac = mac_key(eth->h_dest);
	}

	net = uplink_network(&ukey);
	if (!net)
		return TC_ACT_OK; /* not one of our networks: the host's own traffic */
	if (!multicast) {
		__u32 entry = fdb_find(net, mac);

		if (!entry)
			return TC_ACT_OK; /* for the host or nobody: as if we were not here */
		dst = &net->members[(entry - 1) & (FV_MAX_MEMBERS - 1)];
	}

	c = counters_of(net->uplink_slot);
	if (c) {
		c->tx_packets++;
		c->tx_bytes += skb->len;
	}
	if (ukey.vlan && bpf_skb_vlan_pop(skb) != 0)
		return TC_ACT_SHOT;

	if (dst) {
		count_rx(dst->slot, skb->len);
		return redirect_to(dst);
	}

	flood_members(skb, net, 0);
	/* The host sees broadcasts as it would without us, tag included. */
	if (ukey.vlan && bpf_skb_vlan_push(skb, ETH_P_8021Q_BE, ukey.vlan) != 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("xdp")
int fv_xdp_from_uplink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct fv_uplink_key ukey = { .ifindex = ctx->ingress_ifindex };
	struct ethhdr *eth = data;
	const struct fv_member *dst;
	struct fv_network *net;
	struct fv_counters *c;
	__u32 len;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	/* Broadcast and multicast need clones: fv_from_uplink floods them. */
	if (eth->h_dest[0] & 1)
		return XDP_PASS;
	if (eth->h_proto == ETH_P_8021Q_BE) {
		struct vlan_hdr *vh = (void *)(eth + 1);

		if ((void *)(vh + 1) > data_end)
			return XDP_PASS;
		ukey.vlan = bpf_ntohs(vh->tci) & VLAN_VID_MASK;
	}
	net = uplink_network(&ukey);
	if (!net)
		return XDP_PASS;
	dst = fdb_lookup(net, eth->h_dest);
	if (!dst)
		return XDP_PASS;

	len = data_end - data;
	c = counters_of(net->uplink_slot);
	if (c) {
		c->tx_packets++;
		c->tx_bytes += len;
	}
	if (ukey.vlan) {
		/* Pop the tag: move both MAC addresses 4 bytes up, then drop the first 4. */
		__u8 macs[2 * ETH_ALEN];

		if (data + VLAN_HLEN + 2 * ETH_ALEN > data_end)
			return XDP_DROP;
		__builtin_memcpy(macs, data, sizeof(macs));
		__builtin_memcpy(data + VLAN_HLEN, macs, sizeof(macs));
		if (bpf_xdp_adjust_head(ctx, VLAN_HLEN))
			return XDP_DROP;
		len -= VLAN_HLEN;
	}
	count_rx(dst->slot, len);
	return bpf_redirect(dst->ifindex, 0);
}
