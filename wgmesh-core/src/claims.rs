//! Who may claim what: the trust rules that stand between what nodes say about themselves and
//! what the mesh routes.
//!
//! Everything a node's own credentials can write — its addresses, its IPAM blocks, its pods'
//! addresses, its key, its underlay MTU — is untrusted. The planner reads each of them as a
//! *claim* and settles the claims of all nodes together, so that no node can pull another
//! node's traffic into its tunnel, and so that every node whose traffic a claim downgrades is
//! named by a finding ([`crate::diagnostics`]).
//!
//! # What a node claims
//!
//! Per family, a node claims each of its **addresses** (a host prefix; a destination only with
//! host encryption), each of its **blocks** (`cidr_blocks` only) and each of its **workload
//! addresses** (a host prefix; in `cidr_blocks`, one that lies inside one of the node's own
//! accepted blocks needs no route of its own, but still counts as the node's claim). Only the
//! first [`max_node_addresses`](MeshConfig::max_node_addresses) addresses, and the smallest
//! [`max_node_pod_cidrs`](MeshConfig::max_node_pod_cidrs) blocks and
//! [`max_node_workload_ips`](MeshConfig::max_node_workload_ips) workload addresses count; the
//! rest is ignored and reported, so one node's size never makes the others' work grow beyond
//! those bounds. A node's values beyond its limits, and its claims refused by rules 1–3, are
//! not its claims: they defend nothing, so limits and prefix lengths must fit the honest
//! nodes ([`crate::diagnostics`] names every node over a limit and every refused claim).
//!
//! # Refused claims
//!
//! A claim that would be routed is **refused** when
//!
//! 1. it covers an address that is never a mesh destination: unspecified (`0.0.0.0/8`, `::`),
//!    loopback, link-local (which holds the cloud metadata endpoint 169.254.169.254),
//!    multicast, the IPv4 broadcast address, or a cloud platform endpoint (Azure's
//!    168.63.129.16, AWS's `fd00:ec2::254`) — [`Refusal::Special`];
//! 2. it is shorter than [`min_prefix_len`](MeshConfig::min_prefix_len) /
//!    [`min_prefix_len_v6`](MeshConfig::min_prefix_len_v6) (never `/0`) —
//!    [`Refusal::PrefixTooShort`];
//! 3. the family has [`cluster_cidrs`](MeshConfig::cluster_cidrs) and the claim is not inside
//!    one of them — [`Refusal::OutsideClusterCidrs`];
//! 4. it is a block or a workload address that equals or contains an address of another node:
//!    the node address wins — [`Refusal::OtherNodesAddress`];
//! 5. it is a block that lies strictly inside another node's block (blocks never nest across
//!    nodes; single workload addresses may be borrowed from another node's block, as Calico's
//!    IPAM does) — [`Refusal::InsideBlock`].
//!
//! Rules 1–3 look at the claim alone; 4 and 5 compare it with the other nodes' addresses and
//! accepted blocks (those that pass 1–3), never with other refused claims, so a bogus claim
//! cannot knock out anyone else's.
//!
//! # Disputes
//!
//! A prefix that is claimed by more than one node, or whose only claim is refused, belongs to
//! nobody: it gets a **throw** route on every node and sits on no peer, so its traffic takes
//! the main table, in plaintext — it is never routed to any of the nodes that claim it, and a
//! less specific claim can never catch it. This is what happens to a node address that two
//! nodes publish, to a workload address that two nodes report, to a pod address that another
//! node reports as its own borrowed address, and — with host encryption — to a node address
//! that another node reports as a workload address (the workload claim is refused by rule 4,
//! and the address stays plain while it is disputed: the core cannot tell the owner apart
//! from a node that copied the address). A public key published by two nodes makes both
//! plain. Every one of these is a finding that names every node involved.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{Family, MeshConfig, Node, RouteSource, host_net};

/// A kind of address that no node may claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AddressKind {
    /// `0.0.0.0/8` or `::`.
    Unspecified,
    /// `127.0.0.0/8` or `::1`.
    Loopback,
    /// `169.254.0.0/16` (the cloud metadata endpoint) or `fe80::/10`.
    LinkLocal,
    /// `224.0.0.0/4` or `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// A cloud platform's endpoint: Azure's 168.63.129.16 (DNS, DHCP, health probes) or AWS's
    /// instance metadata service `fd00:ec2::254`.
    PlatformEndpoint,
}

impl AddressKind {
    /// A short name: `loopback`, `link-local`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::LinkLocal => "link-local",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::PlatformEndpoint => "cloud platform",
        }
    }
}

/// Which field of a node a claim comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClaimField {
    /// `addresses`.
    Addresses,
    /// `pod_cidrs`.
    PodCidrs,
    /// `workload_ips`.
    WorkloadIps,
}

impl ClaimField {
    /// The field's name in the cluster description.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Addresses => "addresses",
            Self::PodCidrs => "pod_cidrs",
            Self::WorkloadIps => "workload_ips",
        }
    }

    /// The setting that limits how many of the field's values count.
    pub fn limit_setting(self) -> &'static str {
        match self {
            Self::Addresses => "max_node_addresses",
            Self::PodCidrs => "max_node_pod_cidrs",
            Self::WorkloadIps => "max_node_workload_ips",
        }
    }

    fn of(flags: u8) -> Self {
        if flags & ADDRESS != 0 {
            Self::Addresses
        } else if flags & BLOCK != 0 {
            Self::PodCidrs
        } else {
            Self::WorkloadIps
        }
    }
}

impl fmt::Display for ClaimField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a claim was refused. The module documentation gives the rules in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Refusal {
    /// It covers addresses of this kind.
    Special {
        /// The kind.
        kind: AddressKind,
    },
    /// It is shorter than the family's minimum prefix length.
    PrefixTooShort {
        /// The minimum.
        min: u8,
    },
    /// It is not inside the family's `cluster_cidrs`.
    OutsideClusterCidrs,
    /// It covers an address of another node.
    OtherNodesAddress {
        /// That node.
        node: String,
        /// Its address.
        address: IpAddr,
    },
    /// It lies inside another node's block.
    InsideBlock {
        /// That node.
        node: String,
        /// Its block.
        block: IpNet,
    },
}

impl Refusal {
    /// The other node the refusal is about, if any.
    pub fn other_node(&self) -> Option<&str> {
        match self {
            Self::OtherNodesAddress { node, .. } | Self::InsideBlock { node, .. } => Some(node),
            _ => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Special { kind } => write!(f, "it covers {} addresses", kind.as_str()),
            Self::PrefixTooShort { min } => write!(f, "it is shorter than /{min}"),
            Self::OutsideClusterCidrs => f.write_str("it is outside cluster_cidrs"),
            Self::OtherNodesAddress { node, address } => {
                write!(f, "it covers {address}, an address of node {node:?}")
            }
            Self::InsideBlock { node, block } => {
                write!(f, "it lies inside block {block} of node {node:?}")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Claim flags, shared by the full and the incremental planner.

/// The prefix is one of the node's (counted) addresses.
pub(crate) const ADDRESS: u8 = 1;
/// The prefix is one of the node's (counted) blocks, in `cidr_blocks`.
pub(crate) const BLOCK: u8 = 2;
/// The prefix is the host prefix of one of the node's (counted) workload addresses.
pub(crate) const WORKLOAD: u8 = 4;
/// The claim asks for a route of its own.
pub(crate) const ROUTE: u8 = 8;
/// The claim asks for a route and is refused.
pub(crate) const REFUSED: u8 = 16;

/// Inclusive ranges of addresses that no node may claim.
const V4_SPECIAL: [(u32, u32, AddressKind); 6] = [
    v4_range(Ipv4Addr::new(0, 0, 0, 0), 8, AddressKind::Unspecified),
    v4_range(Ipv4Addr::new(127, 0, 0, 0), 8, AddressKind::Loopback),
    v4_range(Ipv4Addr::new(169, 254, 0, 0), 16, AddressKind::LinkLocal),
    v4_range(Ipv4Addr::new(224, 0, 0, 0), 4, AddressKind::Multicast),
    v4_range(
        Ipv4Addr::new(255, 255, 255, 255),
        32,
        AddressKind::Broadcast,
    ),
    v4_range(
        Ipv4Addr::new(168, 63, 129, 16),
        32,
        AddressKind::PlatformEndpoint,
    ),
];

const V6_SPECIAL: [(u128, u128, AddressKind); 5] = [
    v6_range(Ipv6Addr::UNSPECIFIED, 128, AddressKind::Unspecified),
    v6_range(Ipv6Addr::LOCALHOST, 128, AddressKind::Loopback),
    v6_range(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        AddressKind::LinkLocal,
    ),
    v6_range(
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        AddressKind::Multicast,
    ),
    v6_range(
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        128,
        AddressKind::PlatformEndpoint,
    ),
];

const fn v4_range(start: Ipv4Addr, len: u32, kind: AddressKind) -> (u32, u32, AddressKind) {
    let start = start.to_bits();
    let host = if len == 32 { 0 } else { u32::MAX >> len };
    (start, start | host, kind)
}

const fn v6_range(start: Ipv6Addr, len: u32, kind: AddressKind) -> (u128, u128, AddressKind) {
    let start = start.to_bits();
    let host = if len == 128 { 0 } else { u128::MAX >> len };
    (start, start | host, kind)
}

/// The first special range that `net` overlaps.
pub fn special(net: &IpNet) -> Option<AddressKind> {
    fn first<T: Ord>(lo: T, hi: T, table: &[(T, T, AddressKind)]) -> Option<AddressKind> {
        table
            .iter()
            .find(|(s, e, _)| lo <= *e && *s <= hi)
            .map(|r| r.2)
    }
    match net {
        IpNet::V4(n) => first(n.network().to_bits(), n.broadcast().to_bits(), &V4_SPECIAL),
        IpNet::V6(n) => first(n.network().to_bits(), n.broadcast().to_bits(), &V6_SPECIAL),
    }
}

/// Why a claim on `net` is refused on its own (rules 1–3), if it is.
///
/// ```
/// use wgmesh_core::{MeshConfig, claims::{Refusal, AddressKind, static_refusal}};
/// let mut mesh = MeshConfig::default();
/// let net = |s: &str| s.parse().unwrap();
/// assert_eq!(static_refusal(&mesh, &net("8.8.8.8/32")), None);
/// assert_eq!(static_refusal(&mesh, &net("0.0.0.0/0")), Some(Refusal::PrefixTooShort { min: 16 }));
/// assert_eq!(
///     static_refusal(&mesh, &net("169.254.169.254/32")),
///     Some(Refusal::Special { kind: AddressKind::LinkLocal })
/// );
/// mesh.cluster_cidrs = vec![net("10.0.0.0/8")];
/// assert_eq!(static_refusal(&mesh, &net("8.8.8.8/32")), Some(Refusal::OutsideClusterCidrs));
/// ```
pub fn static_refusal(mesh: &MeshConfig, net: &IpNet) -> Option<Refusal> {
    let family = Family::of_net(net);
    let min = mesh.min_prefix(family);
    if net.prefix_len() < min {
        return Some(Refusal::PrefixTooShort { min });
    }
    if let Some(kind) = special(net) {
        return Some(Refusal::Special { kind });
    }
    if mesh.restricts(family) && !mesh.cluster_cidrs.iter().any(|c| c.contains(net)) {
        return Some(Refusal::OutsideClusterCidrs);
    }
    None
}

/// The final flags of a claim with these fields: whether it asks for a route, and whether it
/// is refused. `covered` says whether a workload address lies inside one of the node's own
/// accepted blocks; `other_address` and `inside_other_block` answer rules 4 and 5 and are
/// only asked when they matter.
pub(crate) fn settle(
    mesh: &MeshConfig,
    prefix: &IpNet,
    fields: u8,
    covered: bool,
    other_address: impl FnOnce() -> bool,
    inside_other_block: impl FnOnce() -> bool,
) -> u8 {
    let route = (fields & ADDRESS != 0 && mesh.host_encryption)
        || fields & BLOCK != 0
        || (fields & WORKLOAD != 0 && !covered);
    if !route {
        return fields;
    }
    // A node's own address is never refused for covering itself; two nodes that publish one
    // address dispute it instead.
    let refused = static_refusal(mesh, prefix).is_some()
        || (fields & ADDRESS == 0
            && (other_address()
                || (fields & BLOCK != 0 && !is_host(prefix) && inside_other_block())));
    fields | ROUTE | if refused { REFUSED } else { 0 }
}

/// Who routes a prefix, from its claims (node, flags): `None` when no claim asks for a route;
/// `Some(Some(n))` when node `n` is its only claimant and is not refused; `Some(None)` when it
/// belongs to nobody (a throw route).
pub(crate) fn owner<N: Copy>(claims: impl IntoIterator<Item = (N, u8)>) -> Option<Option<N>> {
    let mut count = 0usize;
    let mut route = false;
    let mut sole = None;
    for (node, flags) in claims {
        count += 1;
        route |= flags & ROUTE != 0;
        if flags & (ROUTE | REFUSED) == ROUTE {
            sole = Some(node);
        }
    }
    route.then_some(if count == 1 { sole } else { None })
}

pub(crate) fn is_host(net: &IpNet) -> bool {
    net.prefix_len() == Family::of_net(net).host_prefix_len()
}

fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

fn from_u128(family: Family, bits: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from_bits(bits as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from_bits(bits)),
    }
}

fn bounds(net: &IpNet) -> (u128, u128) {
    (to_u128(net.network()), to_u128(net.broadcast()))
}

/// `addr` with the bits after `len` cleared, as a prefix of length `len`.
pub(crate) fn prefix_of(addr: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(addr, len).ok().map(|n| n.trunc())
}

// ---------------------------------------------------------------------------------------------
// Limits.

/// The addresses of a node that count, each once: its endpoints (the first address of each
/// family) always, then the others in the node's order up to `max_node_addresses` in all. An
/// endpoint must always count: it is where the node's peers send its tunnel, and an address
/// that does not count is not protected from other nodes' claims.
pub(crate) fn counted_addresses(mesh: &MeshConfig, node: &Node) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Family::ALL
        .iter()
        .filter_map(|f| node.address(*f))
        .collect();
    let mut seen: HashSet<IpAddr> = HashSet::new();
    if node.addresses.len() > 8 {
        seen.extend(out.iter().copied());
    }
    for a in &node.addresses {
        if out.len() >= mesh.max_node_addresses {
            break;
        }
        let new = if seen.is_empty() {
            !out.contains(a)
        } else {
            seen.insert(*a)
        };
        if new {
            out.push(*a);
        }
    }
    out
}

/// The smallest `limit` distinct values of `values`; the slice itself when it is not longer
/// than the limit (it may then hold duplicates).
pub(crate) fn smallest<T: Ord + Copy>(values: &[T], limit: usize) -> Cow<'_, [T]> {
    if values.len() <= limit {
        return Cow::Borrowed(values);
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    v.dedup();
    v.truncate(limit);
    Cow::Owned(v)
}

/// How many distinct values a node lists in a field and how many of them count, when not all
/// of them do.
pub(crate) fn over_limit(
    mesh: &MeshConfig,
    node: &Node,
    field: ClaimField,
) -> Option<(usize, usize)> {
    fn distinct<T: Ord + Copy>(v: &[T], limit: usize) -> Option<(usize, usize)> {
        if v.len() <= limit {
            return None;
        }
        let mut v = v.to_vec();
        v.sort_unstable();
        v.dedup();
        (v.len() > limit).then_some((v.len(), limit))
    }
    match field {
        ClaimField::Addresses => distinct(&node.addresses, counted_addresses(mesh, node).len()),
        ClaimField::PodCidrs => distinct(&node.pod_cidrs, mesh.max_node_pod_cidrs),
        ClaimField::WorkloadIps => distinct(&node.workload_ips, mesh.max_node_workload_ips),
    }
}

/// The addresses covered by a set of prefixes, as sorted disjoint ranges: whether an address
/// lies in any of them costs one binary search, however many there are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Cover(Vec<(u128, u128)>);

impl Cover {
    pub(crate) fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let mut ranges: Vec<(u128, u128)> = nets.into_iter().map(|n| bounds(&n)).collect();
        ranges.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match out.last_mut() {
                Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        Self(out)
    }

    pub(crate) fn contains(&self, addr: IpAddr) -> bool {
        let x = to_u128(addr);
        let i = self.0.partition_point(|r| r.0 <= x);
        i > 0 && self.0[i - 1].1 >= x
    }
}

// ---------------------------------------------------------------------------------------------
// The ledger of the full planner and the diagnostics.

/// One node's settled claim on one prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) prefix: IpNet,
    pub(crate) node: usize,
    pub(crate) flags: u8,
}

/// Every claim of every node in one family, settled, sorted by prefix then node, with the
/// indexes that rules 4 and 5 use.
pub(crate) struct Ledger {
    pub(crate) entries: Vec<Entry>,
    family: Family,
    /// Counted addresses of every node (as integers), sorted, each (address, node) once.
    addresses: Vec<(u128, usize)>,
    /// Accepted blocks (rules 1–3) and their nodes.
    blocks: HashMap<IpNet, Vec<usize>>,
    /// Which prefix lengths `blocks` has.
    lens: Vec<bool>,
}

impl Ledger {
    pub(crate) fn new(mesh: &MeshConfig, nodes: &[Node], family: Family) -> Self {
        let cidr = mesh.route_source == RouteSource::CidrBlocks;
        let in_family = |a: &IpAddr| Family::of(a) == family;
        let mut entries: Vec<Entry> = Vec::new();
        let mut addresses: Vec<(u128, usize)> = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            for a in counted_addresses(mesh, n).into_iter().filter(in_family) {
                entries.push(Entry {
                    prefix: host_net(a),
                    node: i,
                    flags: ADDRESS,
                });
                addresses.push((to_u128(a), i));
            }
            if cidr {
                let blocks = smallest(&n.pod_cidrs, mesh.max_node_pod_cidrs);
                entries.extend(
                    blocks
                        .iter()
                        .filter(|b| Family::of_net(b) == family)
                        .map(|b| Entry {
                            prefix: *b,
                            node: i,
                            flags: BLOCK,
                        }),
                );
            }
            let workload = smallest(&n.workload_ips, mesh.max_node_workload_ips);
            entries.extend(workload.iter().filter(|a| in_family(a)).map(|a| Entry {
                prefix: host_net(*a),
                node: i,
                flags: WORKLOAD,
            }));
        }
        entries.sort_unstable_by_key(|a| (a.prefix, a.node));
        entries.dedup_by(|next, kept| {
            let same = next.prefix == kept.prefix && next.node == kept.node;
            if same {
                kept.flags |= next.flags;
            }
            same
        });
        addresses.sort_unstable();
        addresses.dedup();
        let mut ledger = Self {
            entries,
            family,
            addresses,
            blocks: HashMap::new(),
            lens: vec![false; usize::from(family.host_prefix_len()) + 1],
        };
        let mut covers: Vec<Cover> = Vec::new();
        if cidr {
            let mut accepted: Vec<(usize, IpNet)> = Vec::new();
            for e in &ledger.entries {
                if e.flags & BLOCK != 0 && static_refusal(mesh, &e.prefix).is_none() {
                    ledger.blocks.entry(e.prefix).or_default().push(e.node);
                    ledger.lens[usize::from(e.prefix.prefix_len())] = true;
                    accepted.push((e.node, e.prefix));
                }
            }
            accepted.sort_unstable();
            covers = vec![Cover::default(); nodes.len()];
            for group in accepted.chunk_by(|a, b| a.0 == b.0) {
                covers[group[0].0] = Cover::new(group.iter().map(|g| g.1));
            }
        }
        let mut entries = std::mem::take(&mut ledger.entries);
        let mut cursor = 0;
        for e in &mut entries {
            let network = to_u128(e.prefix.network());
            while cursor < ledger.addresses.len() && ledger.addresses[cursor].0 < network {
                cursor += 1;
            }
            let covered = e.flags & WORKLOAD != 0
                && covers
                    .get(e.node)
                    .is_some_and(|c| c.contains(e.prefix.addr()));
            let (prefix, node) = (e.prefix, e.node);
            e.flags = settle(
                mesh,
                &prefix,
                e.flags,
                covered,
                || ledger.other_address_from(cursor, &prefix, node).is_some(),
                || ledger.enclosing_block(&prefix, node).is_some(),
            );
        }
        ledger.entries = entries;
        ledger
    }

    /// The first address in `prefix` of a node other than `node`, looking from `cursor` (the
    /// index of the first address not below the prefix). Only `node`'s own addresses are
    /// skipped, so this stops after at most its counted addresses.
    fn other_address_from(
        &self,
        cursor: usize,
        prefix: &IpNet,
        node: usize,
    ) -> Option<(IpAddr, usize)> {
        let last = to_u128(prefix.broadcast());
        let mut k = cursor;
        while let Some(&(a, n)) = self.addresses.get(k) {
            if a > last {
                return None;
            }
            if n != node {
                return Some((from_u128(self.family, a), n));
            }
            k += 1;
        }
        None
    }

    /// The longest accepted block of another node that strictly contains `prefix`, with the
    /// first such node.
    fn enclosing_block(&self, prefix: &IpNet, node: usize) -> Option<(IpNet, usize)> {
        (0..prefix.prefix_len())
            .rev()
            .filter(|len| self.lens[usize::from(*len)])
            .filter_map(|len| prefix_of(prefix.network(), len))
            .find_map(|b| {
                let owners = self.blocks.get(&b)?;
                owners.iter().find(|o| **o != node).map(|o| (b, *o))
            })
    }

    /// Why a refused entry is refused, naming other nodes by `name`.
    pub(crate) fn refusal(
        &self,
        mesh: &MeshConfig,
        entry: &Entry,
        name: impl Fn(usize) -> String,
    ) -> Option<Refusal> {
        if entry.flags & REFUSED == 0 {
            return None;
        }
        if let Some(r) = static_refusal(mesh, &entry.prefix) {
            return Some(r);
        }
        let network = to_u128(entry.prefix.network());
        let start = self.addresses.partition_point(|(a, _)| *a < network);
        if let Some((address, other)) = self.other_address_from(start, &entry.prefix, entry.node) {
            return Some(Refusal::OtherNodesAddress {
                node: name(other),
                address,
            });
        }
        self.enclosing_block(&entry.prefix, entry.node)
            .map(|(block, other)| Refusal::InsideBlock {
                node: name(other),
                block,
            })
    }

    /// The field a claim comes from.
    pub(crate) fn field(entry: &Entry) -> ClaimField {
        ClaimField::of(entry.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn special_ranges() {
        for (s, kind) in [
            ("0.0.0.0/32", Some(AddressKind::Unspecified)),
            ("127.0.0.1/32", Some(AddressKind::Loopback)),
            ("169.254.169.254/32", Some(AddressKind::LinkLocal)),
            ("224.0.0.1/32", Some(AddressKind::Multicast)),
            ("239.255.255.255/32", Some(AddressKind::Multicast)),
            ("255.255.255.255/32", Some(AddressKind::Broadcast)),
            ("168.63.129.16/32", Some(AddressKind::PlatformEndpoint)),
            ("168.63.129.0/24", Some(AddressKind::PlatformEndpoint)),
            ("169.0.0.0/8", Some(AddressKind::LinkLocal)),
            ("10.0.0.0/8", None),
            ("8.8.8.8/32", None),
            ("223.255.255.255/32", None),
            ("::/128", Some(AddressKind::Unspecified)),
            ("::1/128", Some(AddressKind::Loopback)),
            ("fe80::1/128", Some(AddressKind::LinkLocal)),
            ("febf::/16", Some(AddressKind::LinkLocal)),
            ("fec0::/16", None),
            ("ff02::1/128", Some(AddressKind::Multicast)),
            ("fd00:ec2::254/128", Some(AddressKind::PlatformEndpoint)),
            ("fd00::/64", None),
            ("::/0", Some(AddressKind::Unspecified)),
        ] {
            assert_eq!(special(&net(s)), kind, "{s}");
        }
    }

    #[test]
    fn cover_merges_and_finds() {
        let c = Cover::new([net("10.0.0.0/24"), net("10.0.0.128/25"), net("10.0.2.0/24")]);
        assert_eq!(c.0.len(), 2);
        for (a, inside) in [
            ("10.0.0.0", true),
            ("10.0.0.255", true),
            ("10.0.1.0", false),
            ("10.0.2.7", true),
            ("9.255.255.255", false),
            ("10.0.3.0", false),
        ] {
            assert_eq!(c.contains(a.parse().unwrap()), inside, "{a}");
        }
        assert!(!Cover::default().contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn owner_of_claims() {
        let route = ROUTE | WORKLOAD;
        assert_eq!(owner([(1, route)]), Some(Some(1)));
        assert_eq!(owner([(1, route | REFUSED)]), Some(None));
        assert_eq!(owner([(1, route), (2, WORKLOAD)]), Some(None));
        assert_eq!(owner([(1, WORKLOAD), (2, ADDRESS)]), None);
        assert_eq!(owner::<u8>([]), None);
    }
}
