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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FV_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct fv_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fv_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FV_MAX_NETWORKS);
	__type(key, __u32);
	__type(value, struct fv_network);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fv_networks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FV_MAX_FDB);
	__type(key, struct fv_fdb_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fv_fdb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FV_MAX_UPLINKS);
	__type(key, struct fv_uplink_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fv_uplinks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FV_MAX_ADDRS);
	__type(key, struct fv_addr_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fv_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, FV_MAX_POLICY_PREFIXES);
	__type(key, struct fv_policy_key);
	__type(value, struct fv_rules);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fv_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, FV_MAX_ENDPOINTS + FV_MAX_UPLINKS);
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

static __always_inline struct fv_counters *counters_of(__u32 ifindex)
{
	return bpf_map_lookup_elem(&fv_counters, &ifindex);
}

static __always_inline void count_rx(__u32 ifindex, __u32 len)
{
	struct fv_counters *c = counters_of(ifindex);

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

static __always_inline int ipv4_allowed(__u32 ifindex, __be32 addr)
{
	struct fv_addr_key key = { .ifindex = ifindex, .family = FV_FAMILY_IPV4 };

	__builtin_memcpy(key.addr, &addr, 4);
	return bpf_map_lookup_elem(&fv_addrs, &key) != NULL;
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

static __always_inline int ipv6_allowed(__u32 ifindex, const struct in6_addr *a)
{
	struct fv_addr_key key = { .ifindex = ifindex, .family = FV_FAMILY_IPV6 };

	if (ipv6_link_local(a))
		return 1;
	__builtin_memcpy(key.addr, a, 16);
	return bpf_map_lookup_elem(&fv_addrs, &key) != NULL;
}

/* The endpoint's allow-list: the longest CIDR that holds the destination (the loader has
 * merged every covering CIDR's rules into it), then a rule for the protocol and port. */
static __always_inline int policy_allows(__u32 policy, __u32 family, const void *daddr, __u8 proto,
					 int has_port, __u16 dport)
{
	struct fv_policy_key key = { .policy = policy, .family = family };
	struct fv_rules *rules;
	int i;

	if (family == FV_FAMILY_IPV4) {
		key.prefixlen = 64 + 32;
		__builtin_memcpy(key.addr, daddr, 4);
	} else {
		key.prefixlen = 64 + 128;
		__builtin_memcpy(key.addr, daddr, 16);
	}
	rules = bpf_map_lookup_elem(&fv_policy, &key);
	if (!rules)
		return 0;
#pragma unroll
	for (i = 0; i < FV_MAX_RULES; i++) {
		struct fv_rule *r = &rules->rules[i];

		if (i >= rules->count)
			break;
		if (r->proto != FV_PROTO_ANY && r->proto != proto)
			continue;
		if (r->port_min == 0 && r->port_max == 0xffff)
			return 1;
		if (has_port && dport >= r->port_min && dport <= r->port_max)
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
static __always_inline void flood_members(struct __sk_buff *skb, const struct fv_network *net,
					  __u32 from)
{
	__u32 len = skb->len;
	int i;

	for (i = 0; i < FV_MAX_MEMBERS; i++) {
		__u32 member;

		if (i >= net->member_count)
			break;
		member = net->members[i];
		if (member == 0 || member == from)
			continue;
		if (bpf_clone_redirect(skb, member, 0) == 0)
			count_rx(member, len);
	}
}

static __always_inline int to_uplink(struct __sk_buff *skb, const struct fv_network *net)
{
	__u32 len;

	if (net->vlan && bpf_skb_vlan_push(skb, ETH_P_8021Q_BE, net->vlan) != 0)
		return TC_ACT_SHOT;
	len = skb->len;
	count_rx(net->uplink, len);
	return bpf_redirect(net->uplink, 0);
}

/* Anti-spoofing and policy for one frame from an endpoint; 0 lets it through, otherwise
 * the reason it is dropped. */
static __always_inline int check_from_endpoint(struct __sk_buff *skb, __u32 ifindex,
					       const struct fv_endpoint *ep)
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
		if (check_ip && !ipv4_allowed(ifindex, ip->saddr)) {
			/* DHCP: a client without an address asks from 0.0.0.0 to port 67. */
			if (!(ip->saddr == 0 && ip->protocol == IPPROTO_UDP && has_port && dport == 67))
				return FV_DROP_SPOOF_IP + 1;
		}
		if (ep->policy &&
		    !policy_allows(ep->policy, FV_FAMILY_IPV4, &ip->daddr, ip->protocol, has_port, dport))
			return FV_DROP_POLICY + 1;
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
					    !ipv6_allowed(ifindex, target))
						return FV_DROP_SPOOF_ARP + 1;
				}
			}
		}
		if (check_ip && !ipv6_allowed(ifindex, &ip6->saddr)) {
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
		if (ep->policy && !neighbor_discovery &&
		    !policy_allows(ep->policy, FV_FAMILY_IPV6, &ip6->daddr, ip6->nexthdr, has_port,
				   dport))
			return FV_DROP_POLICY + 1;
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
		if (check_ip && spa != 0 && !ipv4_allowed(ifindex, spa))
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
	struct fv_endpoint *ep;
	struct fv_network *net;
	struct fv_counters *c;
	struct fv_fdb_key fdb = {};
	__u32 *dst;
	int verdict;

	ep = bpf_map_lookup_elem(&fv_endpoints, &ifindex);
	if (!ep)
		/* Our program on a TAP we know nothing of: fail closed. */
		return TC_ACT_SHOT;
	c = counters_of(ifindex);
	if (c) {
		c->tx_packets++;
		c->tx_bytes += skb->len;
	}

	pull_headers(skb);
	verdict = check_from_endpoint(skb, ifindex, ep);
	if (verdict) {
		count_drop(c, verdict - 1);
		return TC_ACT_SHOT;
	}

	net = bpf_map_lookup_elem(&fv_networks, &ep->network);
	if (!net) {
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
		fdb.network = ep->network;
		__builtin_memcpy(fdb.mac, eth->h_dest, ETH_ALEN);
	}

	dst = bpf_map_lookup_elem(&fv_fdb, &fdb);
	if (dst) {
		count_rx(*dst, skb->len);
		return bpf_redirect(*dst, 0);
	}
	if (net->uplink)
		return to_uplink(skb, net);
	count_drop(c, FV_DROP_NO_ROUTE);
	return TC_ACT_SHOT;
}

SEC("classifier")
int fv_from_uplink(struct __sk_buff *skb)
{
	struct fv_uplink_key ukey = { .ifindex = skb->ingress_ifindex };
	struct fv_fdb_key fdb = {};
	struct fv_network *net;
	struct fv_counters *c;
	__u32 *network, *dst;
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
		__builtin_memcpy(fdb.mac, eth->h_dest, ETH_ALEN);
	}

	network = bpf_map_lookup_elem(&fv_uplinks, &ukey);
	if (!network)
		return TC_ACT_OK; /* not one of our networks: the host's own traffic */
	net = bpf_map_lookup_elem(&fv_networks, network);
	if (!net)
		return TC_ACT_OK;
	fdb.network = *network;

	if (!multicast) {
		dst = bpf_map_lookup_elem(&fv_fdb, &fdb);
		if (!dst)
			return TC_ACT_OK; /* for the host or nobody: as if we were not here */
	}

	c = counters_of(ukey.ifindex);
	if (c) {
		c->tx_packets++;
		c->tx_bytes += skb->len;
	}
	if (ukey.vlan && bpf_skb_vlan_pop(skb) != 0)
		return TC_ACT_SHOT;

	if (!multicast) {
		count_rx(*dst, skb->len);
		return bpf_redirect(*dst, 0);
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
	struct fv_fdb_key fdb = {};
	struct fv_counters *c;
	__u32 *network, *dst;
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
	network = bpf_map_lookup_elem(&fv_uplinks, &ukey);
	if (!network)
		return XDP_PASS;
	fdb.network = *network;
	__builtin_memcpy(fdb.mac, eth->h_dest, ETH_ALEN);
	dst = bpf_map_lookup_elem(&fv_fdb, &fdb);
	if (!dst)
		return XDP_PASS;

	len = data_end - data;
	c = counters_of(ukey.ifindex);
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
	count_rx(*dst, len);
	return bpf_redirect(*dst, 0);
}
