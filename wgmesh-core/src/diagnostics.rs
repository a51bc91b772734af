//! Why the mesh looks the way it does: nodes that stay plain and why, keys claimed twice,
//! destinations claimed by several nodes, IPAM blocks that overlap.
//!
//! None of these is an error — the planner handles each safely (plain nodes and clashing
//! destinations get throw routes and stay reachable in plaintext) — but an operator wants to
//! know.

use std::collections::HashMap;
use std::fmt;

use ipnet::IpNet;
use serde::Serialize;

use crate::key::PublicKey;
use crate::model::{Cluster, Family};
use crate::plan::destinations;

/// Why a node does not take part in a family's mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    /// Several nodes claim one destination; it is routed in plaintext (throw) everywhere.
    Clash {
        /// The destination.
        destination: IpNet,
        /// The nodes, sorted.
        nodes: Vec<String>,
    },
    /// Two IPAM blocks overlap: longest-prefix match would send part of one to the other.
    OverlappingBlocks {
        /// The larger block and its node.
        outer: (String, IpNet),
        /// The block inside it and its node.
        inner: (String, IpNet),
    },
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
            Self::OverlappingBlocks { outer, inner } => write!(
                f,
                "block {} of node {:?} contains block {} of node {:?}",
                outer.1, outer.0, inner.1, inner.0
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
    let mut claims: HashMap<IpNet, Vec<String>> = HashMap::new();
    for n in cluster.nodes() {
        for family in Family::ALL {
            for d in destinations(mesh, n, family) {
                claims.entry(d).or_default().push(n.name.clone());
            }
        }
    }
    let mut clashes: Vec<(IpNet, Vec<String>)> =
        claims.into_iter().filter(|(_, v)| v.len() > 1).collect();
    clashes.sort();
    out.extend(clashes.into_iter().map(|(destination, mut nodes)| {
        nodes.sort();
        Diagnostic::Clash { destination, nodes }
    }));
    let mut blocks: Vec<(IpNet, &str)> = cluster
        .nodes()
        .iter()
        .flat_map(|n| n.pod_cidrs.iter().map(move |b| (*b, n.name.as_str())))
        .collect();
    blocks.sort();
    blocks.dedup();
    let mut open: Vec<(IpNet, &str)> = Vec::new();
    for (block, node) in blocks {
        while open.last().is_some_and(|(o, _)| !o.contains(&block)) {
            open.pop();
        }
        if let Some((outer, outer_node)) = open.last()
            && *outer != block
        {
            out.push(Diagnostic::OverlappingBlocks {
                outer: ((*outer_node).to_owned(), *outer),
                inner: (node.to_owned(), block),
            });
        }
        open.push((block, node));
    }
    out
}
