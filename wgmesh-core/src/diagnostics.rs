//! Why the mesh looks the way it does: nodes that stay plain and why, keys claimed twice,
//! prefixes claimed by several nodes, claims refused by the trust rules ([`crate::claims`]),
//! claims over a node's limits, and MTUs that a node published but the mesh does not follow.
//!
//! None of these is an error — the planner handles each safely (plain nodes, disputed and
//! refused prefixes get throw routes and stay reachable in plaintext) — but an operator must
//! know: each finding names every node it is about ([`Diagnostic::nodes`]), so an agent can
//! log it once, count it by [`Diagnostic::kind`] and raise an event on each node.

use std::collections::HashMap;
use std::fmt;

use ipnet::IpNet;
use serde::Serialize;

use crate::claims::{ClaimField, Ledger, Refusal, over_limit, static_refusal};
use crate::key::PublicKey;
use crate::model::{Cluster, Family};
use crate::plan::takes_part;

/// Why a node does not take part in a family's mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PlainReason {
    /// WireGuard is not enabled on the node.
    WireGuardDisabled,
    /// The node has published no key for the family.
    NoPublicKey,
    /// Another node claims the same key.
    DuplicatePublicKey,
    /// The node has no address of the family.
    NoAddress,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Diagnostic {
    /// A node is plain in a family: traffic with it is not encrypted.
    Plain {
        /// The node.
        node: String,
        /// The family.
        family: Family,
        /// Why.
        reason: PlainReason,
    },
    /// Several nodes publish one key; all of them stay plain until that clears.
    DuplicateKey {
        /// The family.
        family: Family,
        /// The key.
        public_key: PublicKey,
        /// The nodes, sorted.
        nodes: Vec<String>,
    },
    /// Several nodes claim one prefix (as an address, a block or a workload address); it
    /// belongs to nobody and is routed in plaintext (throw) everywhere.
    Clash {
        /// The prefix.
        destination: IpNet,
        /// The nodes, sorted.
        nodes: Vec<String>,
    },
    /// A node's claim is refused: it is on none of its peers, and its prefix is routed in
    /// plaintext (throw) everywhere.
    Refused {
        /// The node that made the claim.
        node: String,
        /// The field the claim comes from.
        field: ClaimField,
        /// The claim.
        claim: IpNet,
        /// Why; it names the other node when the claim collides with one.
        reason: Refusal,
    },
    /// A node lists more values in a field than count; the rest are ignored.
    OverLimit {
        /// The node.
        node: String,
        /// The field.
        field: ClaimField,
        /// How many distinct values it lists.
        listed: usize,
        /// How many count.
        limit: usize,
    },
    /// A node that takes part publishes an underlay MTU below the floor: the automatic MTU of
    /// the other nodes ignores it (the node itself still fits its own underlay).
    MtuBelowFloor {
        /// The node.
        node: String,
        /// The family.
        family: Family,
        /// Its underlay MTU.
        underlay_mtu: u32,
        /// The smallest underlay MTU that counts.
        floor: u32,
    },
    /// The fixed `mesh.mtu` does not fit a node's underlay: its tunnelled packets of full size
    /// will not get through.
    MtuAboveUnderlay {
        /// The node.
        node: String,
        /// The family.
        family: Family,
        /// The fixed MTU.
        mtu: u32,
        /// The node's underlay MTU.
        underlay_mtu: u32,
    },
    /// A family has no `cluster_cidrs`: nodes may claim any address that no other rule
    /// refuses, so a node can pull traffic for outside addresses into its tunnel.
    NoClusterCidrs {
        /// The family.
        family: Family,
    },
    /// Strict mode drops traffic (blackhole routes) that the default mode would send in
    /// plaintext.
    StrictBlackhole {
        /// The family.
        family: Family,
        /// What is dropped, and why.
        target: Blackholed,
    },
}

/// What strict mode blackholes, and why (see [`Diagnostic::StrictBlackhole`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "what", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Blackholed {
    /// Every destination of a node that should encrypt but does not take part.
    Node {
        /// The node.
        node: String,
        /// Why it does not take part.
        reason: PlainReason,
    },
    /// A prefix that several nodes claim.
    Clash {
        /// The prefix.
        destination: IpNet,
        /// The nodes, sorted.
        nodes: Vec<String>,
    },
    /// A refused claim on cluster space that collides with another node's.
    Refused {
        /// The node that made the claim.
        node: String,
        /// The claim.
        claim: IpNet,
    },
    /// The addresses of a `cluster_cidrs` range that no node claims, until one does.
    UnknownClusterSpace {
        /// The range.
        cidr: IpNet,
    },
}

impl Diagnostic {
    /// A stable name of the finding's kind (its `kind` in JSON), for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Plain { .. } => "plain",
            Self::DuplicateKey { .. } => "duplicate_key",
            Self::Clash { .. } => "clash",
            Self::Refused { .. } => "refused",
            Self::OverLimit { .. } => "over_limit",
            Self::MtuBelowFloor { .. } => "mtu_below_floor",
            Self::MtuAboveUnderlay { .. } => "mtu_above_underlay",
            Self::NoClusterCidrs { .. } => "no_cluster_cidrs",
            Self::StrictBlackhole { .. } => "strict_blackhole",
        }
    }

    /// Every node the finding is about: for a collision, the node that made the claim first,
    /// then the others. Empty for findings about the mesh settings.
    ///
    /// ```
    /// use wgmesh_core::{diagnostics::diagnose, spec::parse_cluster};
    /// let cluster = parse_cluster(r#"{"nodes": [
    ///   {"name": "a", "addresses": ["10.0.0.1"]},
    ///   {"name": "b", "addresses": ["10.0.0.2"], "workload_ips": ["10.0.0.1"]}]}"#)?;
    /// let refused = diagnose(&cluster).into_iter().find(|d| d.kind() == "refused").unwrap();
    /// assert_eq!(refused.nodes(), ["b", "a"]);
    /// assert_eq!(
    ///     refused.to_string(),
    ///     r#"node "b": workload_ips 10.0.0.1/32 refused: it covers 10.0.0.1, an address of node "a""#
    /// );
    /// # Ok::<(), wgmesh_core::Error>(())
    /// ```
    pub fn nodes(&self) -> Vec<&str> {
        match self {
            Self::Plain { node, .. }
            | Self::OverLimit { node, .. }
            | Self::MtuBelowFloor { node, .. }
            | Self::MtuAboveUnderlay { node, .. } => vec![node],
            Self::DuplicateKey { nodes, .. } | Self::Clash { nodes, .. } => {
                nodes.iter().map(String::as_str).collect()
            }
            Self::Refused { node, reason, .. } => std::iter::once(node.as_str())
                .chain(reason.other_node())
                .collect(),
            Self::NoClusterCidrs { .. } => Vec::new(),
            Self::StrictBlackhole { target, .. } => match target {
                Blackholed::Node { node, .. } | Blackholed::Refused { node, .. } => vec![node],
                Blackholed::Clash { nodes, .. } => nodes.iter().map(String::as_str).collect(),
                Blackholed::UnknownClusterSpace { .. } => Vec::new(),
            },
        }
    }

    /// Whether the finding is about a node's claims colliding with another node's (a key, a
    /// prefix, or a refusal that names another node).
    pub fn is_collision(&self) -> bool {
        match self {
            Self::DuplicateKey { .. } | Self::Clash { .. } => true,
            Self::Refused { reason, .. } => reason.other_node().is_some(),
            _ => false,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plain {
                node,
                family,
                reason,
            } => {
                let why = match reason {
                    PlainReason::WireGuardDisabled => "WireGuard is not enabled on it",
                    PlainReason::NoPublicKey => "it has published no key",
                    PlainReason::DuplicatePublicKey => "another node publishes the same key",
                    PlainReason::NoAddress => "it has no address of this family",
                };
                write!(f, "node {node:?} is plain in {family}: {why}")
            }
            Self::DuplicateKey {
                family,
                public_key,
                nodes,
            } => write!(
                f,
                "{family} key {public_key} is published by {}: all stay plain until it is unique",
                nodes.join(", ")
            ),
            Self::Clash { destination, nodes } => write!(
                f,
                "{destination} is claimed by {}: routed in plaintext until one node has it",
                nodes.join(", ")
            ),
            Self::Refused {
                node,
                field,
                claim,
                reason,
            } => write!(f, "node {node:?}: {field} {claim} refused: {reason}"),
            Self::OverLimit {
                node,
                field,
                listed,
                limit,
            } => write!(
                f,
                "node {node:?} lists {listed} {field}: only {limit} count ({})",
                field.limit_setting()
            ),
            Self::MtuBelowFloor {
                node,
                family,
                underlay_mtu,
                floor,
            } => write!(
                f,
                "node {node:?} publishes an underlay MTU of {underlay_mtu}, below {floor}: the {family} mesh MTU ignores it (mtu_floor)"
            ),
            Self::MtuAboveUnderlay {
                node,
                family,
                mtu,
                underlay_mtu,
            } => write!(
                f,
                "mesh.mtu {mtu} does not fit the {family} underlay MTU {underlay_mtu} of node {node:?} (the tunnel adds {} bytes)",
                family.wireguard_overhead()
            ),
            Self::StrictBlackhole { family, target } => match target {
                Blackholed::Node { node, reason } => write!(
                    f,
                    "strict mode drops {family} traffic to node {node:?} (blackhole): it should encrypt but {}",
                    match reason {
                        PlainReason::WireGuardDisabled =>
                            "it has no WireGuard settings (only wireguard.enabled: false opts out)",
                        PlainReason::NoPublicKey => "it has published no key",
                        PlainReason::DuplicatePublicKey => "another node publishes the same key",
                        PlainReason::NoAddress => "it has no address of this family",
                    }
                ),
                Blackholed::Clash { destination, nodes } => write!(
                    f,
                    "strict mode drops traffic to {destination} (blackhole): it is claimed by {}",
                    nodes.join(", ")
                ),
                Blackholed::Refused { node, claim } => write!(
                    f,
                    "strict mode drops traffic to {claim} (blackhole): node {node:?} claims it and is refused"
                ),
                Blackholed::UnknownClusterSpace { cidr } => write!(
                    f,
                    "strict mode drops traffic to addresses of {cidr} that no node claims (blackhole), until one does"
                ),
            },
            Self::NoClusterCidrs { family } => write!(
                f,
                "mesh.cluster_cidrs has no {family} range: a node can claim any outside {family} address, and pull its traffic into the node's tunnel"
            ),
        }
    }
}

/// Everything worth telling an operator about a cluster, in a stable order. With the mesh
/// disabled every node is plain, and that is not repeated per node.
///
/// ```
/// use wgmesh_core::{diagnostics::diagnose, spec::parse_cluster};
/// let cluster = parse_cluster(r#"{"nodes":[{"name":"a","addresses":["10.0.0.1"]}]}"#)?;
/// let found = diagnose(&cluster);
/// assert_eq!(found[0].to_string(), r#"node "a" is plain in ipv4: WireGuard is not enabled on it"#);
/// # Ok::<(), wgmesh_core::Error>(())
/// ```
pub fn diagnose(cluster: &Cluster) -> Vec<Diagnostic> {
    let mesh = cluster.mesh();
    let mut out = Vec::new();
    for family in Family::ALL {
        let mut keys: HashMap<PublicKey, Vec<String>> = HashMap::new();
        for n in cluster.nodes() {
            if let Some(k) = n.key(family) {
                keys.entry(k).or_default().push(n.name.clone());
            }
        }
        let mut dups: Vec<(PublicKey, Vec<String>)> =
            keys.into_iter().filter(|(_, v)| v.len() > 1).collect();
        for (_, nodes) in &mut dups {
            nodes.sort();
        }
        dups.sort_by(|a, b| a.1.cmp(&b.1));
        for n in cluster.nodes() {
            // A family is worth a word for a node that has an address or a key in it.
            if !mesh.enabled || (n.address(family).is_none() && n.key(family).is_none()) {
                continue;
            }
            let reason = if !n.wireguard_enabled() {
                PlainReason::WireGuardDisabled
            } else if n.key(family).is_none() {
                PlainReason::NoPublicKey
            } else if dups.iter().any(|(k, _)| Some(*k) == n.key(family)) {
                PlainReason::DuplicatePublicKey
            } else if n.address(family).is_none() {
                PlainReason::NoAddress
            } else {
                continue;
            };
            out.push(Diagnostic::Plain {
                node: n.name.clone(),
                family,
                reason,
            });
        }
        out.extend(
            dups.into_iter()
                .map(|(public_key, nodes)| Diagnostic::DuplicateKey {
                    family,
                    public_key,
                    nodes,
                }),
        );
    }
    if !mesh.enabled {
        return out;
    }
    let nodes = cluster.nodes();
    let name = |i: usize| nodes[i].name.clone();
    for n in nodes {
        for field in [
            ClaimField::Addresses,
            ClaimField::PodCidrs,
            ClaimField::WorkloadIps,
        ] {
            if let Some((listed, limit)) = over_limit(mesh, n, field) {
                out.push(Diagnostic::OverLimit {
                    node: n.name.clone(),
                    field,
                    listed,
                    limit,
                });
            }
        }
    }
    for family in Family::ALL {
        if !mesh.restricts(family) && nodes.iter().any(|n| n.address(family).is_some()) {
            out.push(Diagnostic::NoClusterCidrs { family });
        }
        let ledger = Ledger::new(mesh, nodes, family);
        let mut refused = Vec::new();
        let mut clashes = Vec::new();
        for group in ledger.entries.chunk_by(|a, b| a.prefix == b.prefix) {
            let mut accepted: Vec<String> = Vec::new();
            for e in group {
                match ledger.refusal(mesh, e, name) {
                    Some(reason) => refused.push(Diagnostic::Refused {
                        node: name(e.node),
                        field: Ledger::field(e),
                        claim: e.prefix,
                        reason,
                    }),
                    None => accepted.push(name(e.node)),
                }
            }
            if accepted.len() > 1 {
                accepted.sort();
                clashes.push(Diagnostic::Clash {
                    destination: group[0].prefix,
                    nodes: accepted,
                });
            }
        }
        out.extend(clashes);
        out.extend(refused);
        let mut keys: HashMap<PublicKey, usize> = HashMap::new();
        for n in nodes {
            if let Some(k) = n.key(family) {
                *keys.entry(k).or_default() += 1;
            }
        }
        let part = |n: &crate::Node| {
            let claims = n.key(family).map_or(0, |k| keys[&k]);
            takes_part(mesh, n, family, claims)
        };
        let floor = mesh.underlay_mtu_floor(family);
        for n in nodes.iter().filter(|n| part(n)) {
            match mesh.mtu {
                None if n.underlay_mtu < floor => out.push(Diagnostic::MtuBelowFloor {
                    node: n.name.clone(),
                    family,
                    underlay_mtu: n.underlay_mtu,
                    floor,
                }),
                Some(mtu) if mtu + family.wireguard_overhead() > n.underlay_mtu => {
                    out.push(Diagnostic::MtuAboveUnderlay {
                        node: n.name.clone(),
                        family,
                        mtu,
                        underlay_mtu: n.underlay_mtu,
                    });
                }
                _ => {}
            }
        }
    }
    if mesh.strict_mode {
        let strict = strict_findings(cluster, &out);
        out.extend(strict);
    }
    out
}

/// What strict mode blackholes, from the other findings (the rules of
/// [`crate::plan`]'s strict mode).
fn strict_findings(cluster: &Cluster, found: &[Diagnostic]) -> Vec<Diagnostic> {
    let mesh = cluster.mesh();
    let plain = |name: &str| cluster.node(name).is_some_and(|n| n.plain_by_choice());
    let node_address = |net: &IpNet| {
        net.prefix_len() == Family::of_net(net).host_prefix_len()
            && cluster
                .nodes()
                .iter()
                .any(|n| n.addresses.contains(&net.addr()))
    };
    let mut out = Vec::new();
    for d in found {
        let (family, target) = match d {
            Diagnostic::Plain {
                node,
                family,
                reason,
            } if !plain(node) => (
                *family,
                Blackholed::Node {
                    node: node.clone(),
                    reason: *reason,
                },
            ),
            Diagnostic::Clash { destination, nodes }
                if !nodes.iter().all(|n| plain(n))
                    && (mesh.host_encryption || !node_address(destination)) =>
            {
                (
                    Family::of_net(destination),
                    Blackholed::Clash {
                        destination: *destination,
                        nodes: nodes.clone(),
                    },
                )
            }
            Diagnostic::Refused { node, claim, .. }
                if static_refusal(mesh, claim).is_none()
                    && (mesh.host_encryption || !node_address(claim)) =>
            {
                (
                    Family::of_net(claim),
                    Blackholed::Refused {
                        node: node.clone(),
                        claim: *claim,
                    },
                )
            }
            _ => continue,
        };
        out.push(Diagnostic::StrictBlackhole { family, target });
    }
    out.extend(
        mesh.cluster_cidrs
            .iter()
            .map(|cidr| Diagnostic::StrictBlackhole {
                family: Family::of_net(cidr),
                target: Blackholed::UnknownClusterSpace { cidr: *cidr },
            }),
    );
    out
}
