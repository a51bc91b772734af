//! wgmesh's nftables tables as a typed model: compiled from the plan's [`Marking`], compared
//! with what the kernel has, carried by [`Operation::SetMarking`](crate::Operation). The
//! executor replaces the tables whole in one nf_tables transaction (`NEWTABLE`, `DELTABLE`,
//! `NEWTABLE`, chains, rules between `BATCH_BEGIN` and `BATCH_END`): the kernel applies all of
//! it or none, so there is never a moment without marking, and the first `NEWTABLE` makes the
//! delete succeed whether or not the table existed.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wgmesh_core::Marking;

/// `NFPROTO_INET`.
pub const NFPROTO_INET: u8 = 1;
/// `NFPROTO_ARP`.
pub const NFPROTO_ARP: u8 = 3;
/// The nftables families wgmesh's tables live in (`inet`, and `arp` for ARP marking).
pub const FAMILIES: [u8; 2] = [NFPROTO_INET, NFPROTO_ARP];

/// The `nft` name of a family number.
pub fn family_name(family: u8) -> &'static str {
    match family {
        NFPROTO_INET => "inet",
        NFPROTO_ARP => "arp",
        2 => "ip",
        10 => "ip6",
        5 => "netdev",
        7 => "bridge",
        _ => "unknown",
    }
}
/// `NFT_META_MARK`.
pub const META_MARK: u32 = 3;
/// `NFT_META_IIFNAME`.
pub const META_IIFNAME: u32 = 6;
/// `NFT_META_NFPROTO`.
pub const META_NFPROTO: u32 = 15;
/// `NFT_META_L4PROTO`.
pub const META_L4PROTO: u32 = 16;
/// `NFT_REG_VERDICT`.
pub const REG_VERDICT: u32 = 0;
/// `NFT_REG_1`.
pub const REG_1: u32 = 1;
/// `NFT_RETURN`.
pub const VERDICT_RETURN: i32 = -5;
/// `NF_DROP`.
pub const VERDICT_DROP: i32 = 0;
/// `NFTA_FIB_F_SADDR`: look the source address up.
pub const FIB_F_SADDR: u32 = 1;
/// `NFT_FIB_RESULT_OIFNAME`: the name of the output interface.
pub const FIB_RESULT_OIFNAME: u32 = 2;
/// The chain of strict mode's ingress filter.
pub const STRICT_CHAIN: &str = "strict_ingress";
/// `NF_INET_PRE_ROUTING`.
pub const HOOK_PREROUTING: u32 = 0;
/// `NF_ARP_IN`.
pub const HOOK_ARP_INPUT: u32 = 0;
/// `NF_INET_LOCAL_OUT`.
pub const HOOK_OUTPUT: u32 = 3;
/// `NF_IP_PRI_RAW`.
pub const PRIORITY_RAW: i32 = -300;
/// `NF_IP_PRI_MANGLE`.
pub const PRIORITY_MANGLE: i32 = -150;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const IFNAMSIZ: usize = 16;

/// An nftables table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftTable {
    /// Family (`NFPROTO_INET` = 1, `NFPROTO_ARP` = 3).
    pub family: u8,
    /// Table name.
    pub name: String,
    /// Table flags (`NFT_TABLE_F_DORMANT` = 1 disables it).
    pub flags: u32,
    /// Chains, in order.
    pub chains: Vec<NftChain>,
    /// Named sets, by name; each created before the chains whose rules look it up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<NftSet>,
}

/// `NFT_SET_INTERVAL`: the set holds ranges.
pub const SET_F_INTERVAL: u32 = 4;
/// nft's `ipv4_addr` data type (informational for the kernel, read by `nft list`).
pub const TYPE_IPV4_ADDR: u32 = 7;
/// nft's `ipv6_addr` data type.
pub const TYPE_IPV6_ADDR: u32 = 8;
/// The set of IPv4 destinations sent plain ([`Marking::plain_destinations`]).
pub const PLAIN_SET_V4: &str = "plain4";
/// The set of IPv6 destinations sent plain.
pub const PLAIN_SET_V6: &str = "plain6";

/// A named nftables set of addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftSet {
    /// Set name.
    pub name: String,
    /// Key data type ([`TYPE_IPV4_ADDR`], [`TYPE_IPV6_ADDR`]).
    pub key_type: u32,
    /// Key length in bytes.
    pub key_len: u32,
    /// `NFT_SET_*` flags ([`SET_F_INTERVAL`]).
    pub flags: u32,
    /// Elements, sorted by key: in an interval set, each range is a start element and an
    /// end element (`end`, the first address after the range) unless it reaches the top of
    /// the address space.
    pub elements: Vec<SetElement>,
}

/// One element of an [`NftSet`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SetElement {
    /// The key (an address, network byte order).
    pub key: Vec<u8>,
    /// `NFT_SET_ELEM_INTERVAL_END`: the first key after a range.
    pub end: bool,
}

/// A base chain with its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftChain {
    /// Chain name.
    pub name: String,
    /// Chain type (`filter`, `route`, `nat`); `None` for a regular chain.
    pub kind: Option<String>,
    /// Netfilter hook number, for base chains.
    pub hook: Option<u32>,
    /// Priority, for base chains.
    pub priority: Option<i32>,
    /// Policy verdict code (1 = accept), for base chains.
    pub policy: Option<u32>,
    /// Rules, in order; each rule a list of expressions.
    pub rules: Vec<Vec<Expr>>,
}

/// One nf_tables expression, in the subset wgmesh uses; anything else decodes as `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "expr", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Expr {
    /// Load a meta key into a register.
    Meta {
        /// `NFT_META_*`.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// Set a meta key from a register.
    MetaSet {
        /// `NFT_META_*`.
        key: u32,
        /// Source register.
        sreg: u32,
    },
    /// Compare a register with data.
    Cmp {
        /// Source register.
        sreg: u32,
        /// `NFT_CMP_*`.
        op: u32,
        /// The data compared.
        data: Vec<u8>,
    },
    /// `dreg = (sreg & mask) ^ xor`.
    Bitwise {
        /// Source register.
        sreg: u32,
        /// Destination register.
        dreg: u32,
        /// Length in bytes.
        len: u32,
        /// Mask.
        mask: Vec<u8>,
        /// Xor.
        xor: Vec<u8>,
    },
    /// Load packet bytes into a register.
    Payload {
        /// Destination register.
        dreg: u32,
        /// `NFT_PAYLOAD_*_HEADER`.
        base: u32,
        /// Offset.
        offset: u32,
        /// Length.
        len: u32,
    },
    /// A routing lookup (`fib`), its result into a register.
    Fib {
        /// `NFTA_FIB_F_*` flags.
        flags: u32,
        /// `NFT_FIB_RESULT_*`.
        result: u32,
        /// Destination register.
        dreg: u32,
    },
    /// An anonymous counter. Its values are what the kernel counted (zero when compiled);
    /// [`without_counts`] zeroes them to compare tables.
    Counter {
        /// Packets counted.
        packets: u64,
        /// Bytes counted.
        bytes: u64,
    },
    /// Look a register up in a named set (match when present).
    Lookup {
        /// Source register.
        sreg: u32,
        /// The set's name.
        set: String,
    },
    /// A verdict.
    Verdict {
        /// Verdict code (`NFT_RETURN` = -5, …).
        code: i32,
    },
    /// An expression wgmesh does not generate.
    Other {
        /// Its name.
        name: String,
    },
}

fn mark_rule(mark: u32) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: META_MARK,
            dreg: REG_1,
        },
        Expr::Bitwise {
            sreg: REG_1,
            dreg: REG_1,
            len: 4,
            mask: (!mark).to_ne_bytes().to_vec(),
            xor: mark.to_ne_bytes().to_vec(),
        },
        Expr::MetaSet {
            key: META_MARK,
            sreg: REG_1,
        },
    ]
}

fn iifname_return(data: Vec<u8>) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: META_IIFNAME,
            dreg: REG_1,
        },
        Expr::Cmp {
            sreg: REG_1,
            op: NFT_CMP_EQ,
            data,
        },
        Expr::Verdict {
            code: VERDICT_RETURN,
        },
    ]
}

fn cmp(data: Vec<u8>) -> Expr {
    Expr::Cmp {
        sreg: REG_1,
        op: NFT_CMP_EQ,
        data,
    }
}

fn endpoint_rule(ep: &SocketAddr, destination: bool, mark: u32) -> Vec<Expr> {
    let mut v = endpoint_match(ep, destination);
    v.extend(mark_rule(mark));
    v
}

/// TCP to (`destination`) or from an endpoint.
fn endpoint_match(ep: &SocketAddr, destination: bool) -> Vec<Expr> {
    let (proto, addr, off) = match ep.ip() {
        IpAddr::V4(a) => (2u8, a.octets().to_vec(), if destination { 16 } else { 12 }),
        IpAddr::V6(a) => (10u8, a.octets().to_vec(), if destination { 24 } else { 8 }),
    };
    let alen = addr.len() as u32;
    vec![
        Expr::Meta {
            key: META_NFPROTO,
            dreg: REG_1,
        },
        cmp(vec![proto]),
        Expr::Meta {
            key: META_L4PROTO,
            dreg: REG_1,
        },
        cmp(vec![6]),
        Expr::Payload {
            dreg: REG_1,
            base: NFT_PAYLOAD_NETWORK_HEADER,
            offset: off,
            len: alen,
        },
        cmp(addr),
        Expr::Payload {
            dreg: REG_1,
            base: NFT_PAYLOAD_TRANSPORT_HEADER,
            offset: if destination { 2 } else { 0 },
            len: 2,
        },
        cmp(ep.port().to_be_bytes().to_vec()),
    ]
}

/// The prefixes merged into disjoint ranges `[first, last]` of one family (`bits` 32 or
/// 128), sorted: overlapping and adjacent prefixes become one range (the kernel refuses
/// overlapping intervals).
fn ranges(prefixes: impl Iterator<Item = (u128, u8)>, bits: u8) -> Vec<(u128, u128)> {
    let mut r: Vec<(u128, u128)> = prefixes
        .map(|(addr, len)| {
            let host = bits - len.min(bits);
            let span: u128 = if host >= 128 {
                u128::MAX
            } else {
                (1u128 << host) - 1
            };
            let first = addr & !span;
            (first, first | span)
        })
        .collect();
    r.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(r.len());
    for (first, last) in r {
        match out.last_mut() {
            Some((_, l)) if first <= l.saturating_add(1) => *l = (*l).max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// The interval elements of a family's plain destinations (`bits` 32 or 128): a start
/// element per range, and an end element at the address after it unless the range ends at
/// the top of the address space (nothing to end there: the range is open).
pub fn interval_elements(prefixes: &[IpNet], bits: u8) -> Vec<SetElement> {
    let top = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    let key = |a: u128| -> Vec<u8> {
        if bits == 32 {
            (a as u32).to_be_bytes().to_vec()
        } else {
            a.to_be_bytes().to_vec()
        }
    };
    let of_family = prefixes.iter().filter_map(|p| match (p, bits) {
        (IpNet::V4(n), 32) => Some((u32::from(n.network()) as u128, n.prefix_len())),
        (IpNet::V6(n), 128) => Some((u128::from(n.network()), n.prefix_len())),
        _ => None,
    });
    let mut out = Vec::new();
    for (first, last) in ranges(of_family, bits) {
        out.push(SetElement {
            key: key(first),
            end: false,
        });
        if last < top {
            out.push(SetElement {
                key: key(last + 1),
                end: true,
            });
        }
    }
    out
}

/// The sets of the destinations sent plain, one per family that has some.
fn plain_sets(m: &Marking) -> Vec<NftSet> {
    [
        (PLAIN_SET_V4, TYPE_IPV4_ADDR, 32u8),
        (PLAIN_SET_V6, TYPE_IPV6_ADDR, 128u8),
    ]
    .into_iter()
    .filter_map(|(name, key_type, bits)| {
        let elements = interval_elements(&m.plain_destinations, bits);
        (!elements.is_empty()).then(|| NftSet {
            name: name.into(),
            key_type,
            key_len: u32::from(bits / 8),
            flags: SET_F_INTERVAL,
            elements,
        })
    })
    .collect()
}

/// Packets to (`destination`) or from an address in the family's set of plain
/// destinations: the family, the address, the lookup.
fn set_match(v6: bool, destination: bool) -> Vec<Expr> {
    let (proto, len, off, set) = match (v6, destination) {
        (false, true) => (2u8, 4, 16, PLAIN_SET_V4),
        (false, false) => (2u8, 4, 12, PLAIN_SET_V4),
        (true, true) => (10u8, 16, 24, PLAIN_SET_V6),
        (true, false) => (10u8, 16, 8, PLAIN_SET_V6),
    };
    vec![
        Expr::Meta {
            key: META_NFPROTO,
            dreg: REG_1,
        },
        cmp(vec![proto]),
        Expr::Payload {
            dreg: REG_1,
            base: NFT_PAYLOAD_NETWORK_HEADER,
            offset: off,
            len,
        },
        Expr::Lookup {
            sreg: REG_1,
            set: set.into(),
        },
    ]
}

/// The families (IPv6 or not) that have destinations sent plain.
fn plain_families(m: &Marking) -> Vec<bool> {
    [false, true]
        .into_iter()
        .filter(|v6| {
            m.plain_destinations
                .iter()
                .any(|d| d.addr().is_ipv6() == *v6)
        })
        .collect()
}

/// Marks packets to the destinations sent plain ([`Marking::plain_destinations`]): one rule
/// per family, a lookup in its set.
fn plain_destination_rules(m: &Marking) -> Vec<Vec<Expr>> {
    plain_families(m)
        .into_iter()
        .map(|v6| {
            let mut rule = set_match(v6, true);
            rule.extend(mark_rule(m.firewall_mark));
            rule
        })
        .collect()
}

fn verdict(code: i32) -> Expr {
    Expr::Verdict { code }
}

/// `iifname … return` for each interface that is not underlay (exact names, then prefixes).
fn skip_rules(m: &Marking) -> Vec<Vec<Expr>> {
    let mut rules = name_skip_rules(m);
    rules.extend(prefix_skip_rules(m));
    rules
}

/// `iifname … return` for the exact names (the loopback and mesh interfaces).
fn name_skip_rules(m: &Marking) -> Vec<Vec<Expr>> {
    m.skip_interfaces
        .iter()
        .map(|name| {
            let mut data = name.as_bytes().to_vec();
            data.resize(IFNAMSIZ, 0);
            iifname_return(data)
        })
        .collect()
}

/// `iifname … return` for the name prefixes (the workload interfaces).
fn prefix_skip_rules(m: &Marking) -> Vec<Vec<Expr>> {
    m.skip_interface_prefixes
        .iter()
        .map(|prefix| iifname_return(prefix.as_bytes().to_vec()))
        .collect()
}

/// ICMPv6 neighbour solicitation and advertisement: exempt from strict mode's ingress filter.
const NDP_EXEMPT_TYPES: [u8; 2] = [135, 136];

/// Strict mode's ingress filter (see [`wgmesh_core::StrictFilter`]): skip the interfaces that
/// are not underlay, WireGuard's UDP, IPv6 neighbour discovery and the control plane; then,
/// per family, drop and count
/// what the routing tables send back into the family's WireGuard interface.
fn strict_rules(m: &Marking, strict: &wgmesh_core::StrictFilter) -> Vec<Vec<Expr>> {
    let mut rules = skip_rules(m);
    for port in &strict.exempt_udp_ports {
        rules.push(vec![
            Expr::Meta {
                key: META_L4PROTO,
                dreg: REG_1,
            },
            cmp(vec![17]),
            Expr::Payload {
                dreg: REG_1,
                base: NFT_PAYLOAD_TRANSPORT_HEADER,
                offset: 2,
                len: 2,
            },
            cmp(port.to_be_bytes().to_vec()),
            verdict(VERDICT_RETURN),
        ]);
    }
    if strict.interface_v6.is_some() {
        // IPv6 neighbour discovery: solicitations and advertisements may carry a node's
        // global address as source (routed into the tunnel under host encryption); hop limit
        // 255 means they come from the link itself and are never forwarded.
        for icmp_type in NDP_EXEMPT_TYPES {
            rules.push(vec![
                Expr::Meta {
                    key: META_NFPROTO,
                    dreg: REG_1,
                },
                cmp(vec![10]),
                Expr::Meta {
                    key: META_L4PROTO,
                    dreg: REG_1,
                },
                cmp(vec![58]),
                Expr::Payload {
                    dreg: REG_1,
                    base: NFT_PAYLOAD_TRANSPORT_HEADER,
                    offset: 0,
                    len: 1,
                },
                cmp(vec![icmp_type]),
                Expr::Payload {
                    dreg: REG_1,
                    base: NFT_PAYLOAD_NETWORK_HEADER,
                    offset: 7,
                    len: 1,
                },
                cmp(vec![255]),
                verdict(VERDICT_RETURN),
            ]);
        }
    }
    for ep in &strict.exempt_tcp_endpoints {
        // From the endpoint (its answers to this node), and to it (this node is the
        // endpoint: an API server on a mesh node, reached in plaintext by the others).
        for to_endpoint in [false, true] {
            let mut rule = endpoint_match(ep, to_endpoint);
            rule.push(verdict(VERDICT_RETURN));
            rules.push(rule);
        }
    }
    // A joining or leaving node's plaintext: this node sends to it plain too.
    for v6 in plain_families(m) {
        let mut rule = set_match(v6, false);
        rule.push(verdict(VERDICT_RETURN));
        rules.push(rule);
    }
    for (proto, dev) in [(2u8, &strict.interface_v4), (10u8, &strict.interface_v6)] {
        let Some(dev) = dev else { continue };
        let mut name = dev.as_bytes().to_vec();
        name.resize(IFNAMSIZ, 0);
        rules.push(vec![
            Expr::Meta {
                key: META_NFPROTO,
                dreg: REG_1,
            },
            cmp(vec![proto]),
            Expr::Fib {
                flags: FIB_F_SADDR,
                result: FIB_RESULT_OIFNAME,
                dreg: REG_1,
            },
            cmp(name),
            Expr::Counter {
                packets: 0,
                bytes: 0,
            },
            verdict(VERDICT_DROP),
        ]);
    }
    rules
}

/// The tables with every counter at zero: what [`compile`] makes, so that counting never
/// looks like drift.
pub fn without_counts(tables: &[NftTable]) -> Vec<NftTable> {
    let mut tables = tables.to_vec();
    for e in tables
        .iter_mut()
        .flat_map(|t| t.chains.iter_mut())
        .flat_map(|c| c.rules.iter_mut())
        .flatten()
    {
        if let Expr::Counter { packets, bytes } = e {
            (*packets, *bytes) = (0, 0);
        }
    }
    tables
}

/// Packets dropped by strict mode's ingress filter, per family, as counted by the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StrictDrops {
    /// IPv4 packets dropped on ingress.
    pub ingress_v4: u64,
    /// IPv6 packets dropped on ingress.
    pub ingress_v6: u64,
}

/// Reads strict mode's drop counters from wgmesh's tables as read from the kernel.
///
/// ```
/// use wgmesh_netlink::marking::{compile, strict_drops, StrictDrops};
/// let mut m = wgmesh_core::Marking { table: "wgmesh".into(), firewall_mark: 0x100000,
///     skip_interfaces: vec!["lo".into()], skip_interface_prefixes: vec![],
///     mark_arp: false, mark_output: true, plain_tcp_endpoints: vec![], strict: None,
///     plain_destinations: vec![], plain_all: false };
/// assert_eq!(strict_drops(&compile(&m)), None);
/// let mut filter = wgmesh_core::StrictFilter::default();
/// filter.interface_v4 = Some("wg0".into());
/// m.strict = Some(filter);
/// assert_eq!(strict_drops(&compile(&m)), Some(StrictDrops::default()));
/// ```
pub fn strict_drops(tables: &[NftTable]) -> Option<StrictDrops> {
    let chain = tables
        .iter()
        .filter(|t| t.family == NFPROTO_INET)
        .flat_map(|t| &t.chains)
        .find(|c| c.name == STRICT_CHAIN)?;
    let mut drops = StrictDrops::default();
    for rule in &chain.rules {
        let proto = rule.windows(2).find_map(|w| match w {
            [
                Expr::Meta {
                    key: META_NFPROTO, ..
                },
                Expr::Cmp { data, .. },
            ] => data.first().copied(),
            _ => None,
        });
        let packets = rule.iter().find_map(|e| match e {
            Expr::Counter { packets, .. } => Some(*packets),
            _ => None,
        });
        match (proto, packets) {
            (Some(2), Some(p)) => drops.ingress_v4 += p,
            (Some(10), Some(p)) => drops.ingress_v6 += p,
            _ => {}
        }
    }
    Some(drops)
}

/// Compiles a plan's marking into the tables it describes (see [`Marking::nft_script`]):
/// the `inet` table, and the `arp` table when ARP is marked too.
///
/// ```
/// use wgmesh_netlink::marking::compile;
/// use wgmesh_core::Marking;
/// let m = Marking { table: "wgmesh".into(), firewall_mark: 0x100000,
///     skip_interfaces: vec!["lo".into()], skip_interface_prefixes: vec!["cali".into()],
///     mark_arp: true, mark_output: true, plain_tcp_endpoints: vec![], strict: None,
///     plain_destinations: vec![], plain_all: false };
/// let t = compile(&m);
/// assert_eq!(t.len(), 2); // inet and arp
/// assert_eq!(t[0].chains.len(), 2);
/// assert_eq!(t[0].chains[0].rules.len(), 3); // lo, cali*, mark
/// ```
pub fn compile(m: &Marking) -> Vec<NftTable> {
    let input_rules = || {
        let mut pre = skip_rules(m);
        pre.push(mark_rule(m.firewall_mark));
        pre
    };
    // `inet` prerouting: after the loopback and mesh interfaces, the destinations sent plain
    // (from any other interface, workload ones included; everything while joining), then the
    // workload interfaces, then the underlay.
    let mut pre = name_skip_rules(m);
    if !m.plain_all {
        pre.extend(plain_destination_rules(m));
        pre.extend(prefix_skip_rules(m));
    }
    pre.push(mark_rule(m.firewall_mark));
    let mut chains = vec![NftChain {
        name: "prerouting".into(),
        kind: Some("filter".into()),
        hook: Some(HOOK_PREROUTING),
        priority: Some(PRIORITY_RAW),
        policy: Some(1),
        rules: pre,
    }];
    if m.has_output() {
        let rules = if m.mark_output || m.plain_all {
            vec![mark_rule(m.firewall_mark)]
        } else {
            let mut rules: Vec<Vec<Expr>> = m
                .plain_tcp_endpoints
                .iter()
                .flat_map(|ep| {
                    [
                        endpoint_rule(ep, true, m.firewall_mark),
                        endpoint_rule(ep, false, m.firewall_mark),
                    ]
                })
                .collect();
            rules.extend(plain_destination_rules(m));
            rules
        };
        chains.push(NftChain {
            name: "output".into(),
            kind: Some("route".into()),
            hook: Some(HOOK_OUTPUT),
            priority: Some(PRIORITY_MANGLE),
            policy: Some(1),
            rules,
        });
    }
    if let Some(strict) = &m.strict {
        chains.push(NftChain {
            name: STRICT_CHAIN.into(),
            kind: Some("filter".into()),
            hook: Some(HOOK_PREROUTING),
            priority: Some(PRIORITY_RAW),
            policy: Some(1),
            rules: strict_rules(m, strict),
        });
    }
    let mut tables = vec![NftTable {
        family: NFPROTO_INET,
        name: m.table.clone(),
        flags: 0,
        chains,
        sets: plain_sets(m),
    }];
    if m.mark_arp {
        tables.push(NftTable {
            family: NFPROTO_ARP,
            name: m.table.clone(),
            flags: 0,
            chains: vec![NftChain {
                name: "input".into(),
                kind: Some("filter".into()),
                hook: Some(HOOK_ARP_INPUT),
                priority: Some(0),
                policy: Some(1),
                rules: input_rules(),
            }],
            sets: Vec::new(),
        });
    }
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marking(output: bool, eps: Vec<SocketAddr>) -> Marking {
        Marking {
            table: "wgmesh".into(),
            firewall_mark: 0x100000,
            skip_interfaces: vec!["lo".into(), "wireguard.cali".into()],
            skip_interface_prefixes: vec!["cali".into()],
            mark_arp: true,
            mark_output: output,
            plain_tcp_endpoints: eps,
            strict: None,
            plain_destinations: vec![],
            plain_all: false,
        }
    }

    #[test]
    fn output_chain_only_when_needed() {
        let mut m = marking(false, vec![]);
        assert_eq!(compile(&m)[0].chains.len(), 1);
        m.mark_output = true;
        assert_eq!(compile(&m)[0].chains[1].rules, vec![mark_rule(0x100000)]);
        m.mark_arp = false;
        assert_eq!(compile(&m).len(), 1);
    }

    /// Destinations sent plain: one set per family, looked up in prerouting after the
    /// loopback and mesh interfaces and before the workload interfaces' return, and in
    /// output; exempt from strict mode's filter by source; everything marked while joining.
    #[test]
    fn plain_destinations_are_marked_before_the_workload_interfaces_return() {
        let mut m = marking(false, vec![]);
        m.plain_destinations = vec![
            "10.65.3.0/24".parse().unwrap(),
            "fd10::3/128".parse().unwrap(),
            "10.65.3.7/32".parse().unwrap(),
        ];
        let t = compile(&m);
        let pre = &t[0].chains[0].rules;
        // lo, wireguard.cali, one rule per family, cali*, mark
        assert_eq!(pre.len(), 6);
        assert_eq!(pre[2][..4], set_match(false, true)[..]);
        assert!(pre[3].contains(&Expr::Lookup {
            sreg: REG_1,
            set: PLAIN_SET_V6.into()
        }));
        assert_eq!(pre[4], iifname_return(b"cali".to_vec()));
        assert_eq!(t[0].chains[1].name, "output");
        assert_eq!(t[0].chains[1].rules.len(), 2);
        let v4 = &t[0].sets[0];
        assert_eq!((v4.name.as_str(), v4.key_len, v4.flags), ("plain4", 4, 4));
        // The /32 inside the /24 is merged into it.
        assert_eq!(
            v4.elements,
            vec![
                SetElement {
                    key: vec![10, 65, 3, 0],
                    end: false
                },
                SetElement {
                    key: vec![10, 65, 4, 0],
                    end: true
                },
            ]
        );
        assert_eq!(t[0].sets[1].elements.len(), 2);
        // ARP is marked as before, and has no sets.
        assert_eq!(t[1].chains[0].rules.len(), 4);
        assert!(t[1].sets.is_empty());
        m.strict = Some(wgmesh_core::StrictFilter {
            interface_v4: Some("wireguard.cali".into()),
            ..Default::default()
        });
        let strict = &compile(&m)[0].chains[2].rules;
        let exempt = &strict[strict.len() - 2]; // the IPv6 one, before the drop
        assert_eq!(exempt.last(), Some(&verdict(VERDICT_RETURN)));
        assert!(exempt.contains(&Expr::Payload {
            dreg: REG_1,
            base: NFT_PAYLOAD_NETWORK_HEADER,
            offset: 8,
            len: 16,
        }));
        m.plain_all = true;
        let t = compile(&m);
        assert_eq!(t[0].chains[0].rules.len(), 3); // lo, wireguard.cali, mark
        assert_eq!(t[0].chains[1].rules, vec![mark_rule(0x100000)]);
        m.plain_destinations.clear();
        m.plain_all = false;
        assert!(compile(&m)[0].sets.is_empty());
    }

    fn el(key: &[u8], end: bool) -> SetElement {
        SetElement {
            key: key.to_vec(),
            end,
        }
    }

    /// Adjacent and overlapping prefixes are merged; a range that reaches the top of the
    /// address space has no end element; `0.0.0.0/0` and `::/0` are one open range.
    #[test]
    fn interval_elements_merge_and_mind_the_edges() {
        let p = |v: &[&str]| -> Vec<IpNet> { v.iter().map(|s| s.parse().unwrap()).collect() };
        assert_eq!(
            interval_elements(&p(&["10.0.0.0/25", "10.0.0.128/25", "10.0.1.0/32"]), 32),
            vec![el(&[10, 0, 0, 0], false), el(&[10, 0, 1, 1], true)]
        );
        assert_eq!(
            interval_elements(&p(&["10.0.0.0/24", "10.0.2.0/24", "fd00::/8"]), 32),
            vec![
                el(&[10, 0, 0, 0], false),
                el(&[10, 0, 1, 0], true),
                el(&[10, 0, 2, 0], false),
                el(&[10, 0, 3, 0], true),
            ]
        );
        assert_eq!(
            interval_elements(&p(&["255.255.255.255/32", "0.0.0.0/32"]), 32),
            vec![
                el(&[0, 0, 0, 0], false),
                el(&[0, 0, 0, 1], true),
                el(&[255; 4], false),
            ]
        );
        assert_eq!(
            interval_elements(&p(&["10.0.0.0/8", "0.0.0.0/0"]), 32),
            vec![el(&[0; 4], false)]
        );
        assert_eq!(
            interval_elements(&p(&["::/0", "fd00::1/128"]), 128),
            vec![el(&[0; 16], false)]
        );
        let mut end = [0u8; 16];
        end[15] = 2;
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(
            interval_elements(&p(&["::1/128"]), 128),
            vec![el(&one, false), el(&end, true)]
        );
        assert_eq!(
            interval_elements(&p(&["ffff::/16", "10.0.0.0/8"]), 128),
            vec![el(
                &[0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                false
            )]
        );
        assert!(interval_elements(&[], 128).is_empty());
    }

    #[test]
    fn endpoints_get_a_rule_per_direction() {
        let t = compile(&marking(
            false,
            vec![
                "10.0.0.1:6443".parse().unwrap(),
                "[fd00::1]:443".parse().unwrap(),
            ],
        ));
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].chains[0].rules.len(), 4); // arp: lo, wireguard.cali, cali*, mark
        assert_eq!(t[0].chains[1].rules.len(), 4); // 2 endpoints x 2 directions
        assert_eq!(t[0].chains[0].priority, Some(PRIORITY_RAW));
        assert_eq!(t[0].chains[1].kind.as_deref(), Some("route"));
    }
}
