//! The mesh as a picture: which nodes take part, and whether the traffic between two nodes
//! is encrypted, plain or blocked — decided by the packet-path simulator ([`crate::sim`]), not
//! by reading the configuration.
//!
//! [`Graph::build`] walks, for every ordered pair of nodes and every family both have, one
//! packet between their pods (the first workload address of each; their hosts when a node
//! has none known) and keeps the outcome of both directions. [`Graph::to_dot`] writes
//! Graphviz DOT and [`Graph::to_svg`] draws the same graph as SVG, laid out on a circle, with
//! no external tool. Node names come from the cluster (untrusted): both writers escape them.
//!
//! ```
//! use wgmesh_core::{graph::{EdgeKind, Graph, NodeState}, spec::parse_cluster};
//! let cluster = parse_cluster(r#"{"mesh": {"route_source": "workload_ips"}, "nodes": [
//!   {"name": "a", "addresses": ["10.0.0.1"], "workload_ips": ["10.0.0.10"],
//!    "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
//!   {"name": "b", "addresses": ["10.0.0.2"], "workload_ips": ["10.0.0.20"],
//!    "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}},
//!   {"name": "c", "addresses": ["10.0.0.3"], "workload_ips": ["10.0.0.30"]}]}"#)?;
//! let graph = Graph::build(&cluster);
//! assert_eq!(graph.nodes[2].state, NodeState::Plain);
//! let kind = |x: &str, y: &str| graph.edges.iter().find(|e| e.a == x && e.b == y).unwrap().kind;
//! assert_eq!(kind("a", "b"), EdgeKind::Encrypted);
//! assert_eq!(kind("a", "c"), EdgeKind::Plain);
//! assert!(graph.to_svg().contains("<svg"));
//! # Ok::<(), wgmesh_core::Error>(())
//! ```

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use serde::Serialize;

use crate::diagnostics::{Diagnostic, PlainReason, diagnose};
use crate::model::{Cluster, Family, Node};
use crate::sim::{Outcome, Simulator, Source};

/// Where a node stands in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NodeState {
    /// It takes part in every family it has.
    Mesh,
    /// WireGuard is off on it (the operator's choice): reachable in plaintext.
    Plain,
    /// WireGuard is on, but in at least one family it cannot take part (no key, a duplicate
    /// key, no address); [`GraphNode::reasons`] says why.
    Excluded,
}

impl NodeState {
    /// `mesh`, `plain` or `excluded`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mesh => "mesh",
            Self::Plain => "plain",
            Self::Excluded => "excluded",
        }
    }

    /// The fill colour of the node in pictures.
    pub fn colour(self) -> &'static str {
        match self {
            Self::Mesh => "#a5d6a7",
            Self::Plain => "#e0e0e0",
            Self::Excluded => "#ffcc80",
        }
    }
}

/// What happens to traffic between two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EdgeKind {
    /// Both directions cross the underlay only inside WireGuard.
    Encrypted,
    /// Some direction is dropped and none is plain (strict mode blocks, or a fault).
    Blocked,
    /// Some direction crosses the underlay in plaintext.
    Plain,
}

impl EdgeKind {
    /// `encrypted`, `blocked` or `plain`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Encrypted => "encrypted",
            Self::Blocked => "blocked",
            Self::Plain => "plain",
        }
    }

    /// The stroke colour of the edge in pictures.
    pub fn colour(self) -> &'static str {
        match self {
            Self::Encrypted => "#2e7d32",
            Self::Blocked => "#616161",
            Self::Plain => "#c62828",
        }
    }

    fn of(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Encrypted | Outcome::Local => Self::Encrypted,
            Outcome::Plain => Self::Plain,
            Outcome::Dropped(_) => Self::Blocked,
        }
    }
}

impl fmt::Display for EdgeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node of the picture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GraphNode {
    /// The node's name.
    pub name: String,
    /// Its state.
    pub state: NodeState,
    /// Why it is plain or excluded, per family (`ipv4: no key`); empty in the mesh.
    pub reasons: Vec<String>,
}

/// The traffic between two nodes in one family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Edge {
    /// One node (the earlier in the cluster's order).
    pub a: String,
    /// The other.
    pub b: String,
    /// The family.
    pub family: Family,
    /// The worse of the two directions: plain, then blocked, then encrypted.
    pub kind: EdgeKind,
    /// What the simulator found from `a` to `b`.
    pub forward: String,
    /// What the simulator found from `b` to `a`.
    pub backward: String,
    /// Whether the packets walked were pod traffic (`false`: host to host, for a node with
    /// no known pod address).
    pub pods: bool,
}

/// The mesh as nodes and edges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Graph {
    /// Every node, in the cluster's order.
    pub nodes: Vec<GraphNode>,
    /// Every pair of nodes that share a family, per family.
    pub edges: Vec<Edge>,
}

fn reason_text(reason: PlainReason) -> &'static str {
    match reason {
        PlainReason::WireGuardDisabled => "WireGuard disabled",
        PlainReason::NoPublicKey => "no key",
        PlainReason::DuplicatePublicKey => "duplicate key",
        PlainReason::NoAddress => "no address",
    }
}

/// The endpoint of a representative packet on `node` in `family`: a pod when one is known.
fn endpoint(node: &Node, family: Family) -> Option<(Source, IpAddr, bool)> {
    match node.workload_ips.iter().find(|ip| Family::of(ip) == family) {
        Some(ip) => Some((Source::Pod(*ip), *ip, true)),
        None => node
            .address(family)
            .map(|a| (Source::Host(node.name.clone(), family), a, false)),
    }
}

impl Graph {
    /// The graph of `cluster` with every node's plan computed by [`crate::plan_all`].
    pub fn build(cluster: &Cluster) -> Self {
        Self::from_simulator(cluster, &Simulator::from_cluster(cluster))
    }

    /// The graph as `sim` (a cluster and its nodes' plans) sees it.
    pub fn from_simulator(cluster: &Cluster, sim: &Simulator) -> Self {
        let findings = diagnose(cluster);
        let nodes = cluster
            .nodes()
            .iter()
            .map(|n| {
                let mut reasons = Vec::new();
                let mut excluded = false;
                for d in &findings {
                    if let Diagnostic::Plain {
                        node,
                        family,
                        reason,
                    } = d
                        && *node == n.name
                    {
                        excluded |= *reason != PlainReason::WireGuardDisabled;
                        reasons.push(format!("{family}: {}", reason_text(*reason)));
                    }
                }
                let state = if !cluster.mesh().enabled || !n.wireguard_enabled() {
                    NodeState::Plain
                } else if excluded {
                    NodeState::Excluded
                } else {
                    NodeState::Mesh
                };
                GraphNode {
                    name: n.name.clone(),
                    state,
                    reasons,
                }
            })
            .collect();
        let mut edges = Vec::new();
        let all = cluster.nodes();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                for family in Family::ALL {
                    let (Some((from_a, at_a, pods_a)), Some((from_b, at_b, pods_b))) =
                        (endpoint(a, family), endpoint(b, family))
                    else {
                        continue;
                    };
                    let forward = sim.trace(from_a, at_b).outcome;
                    let backward = sim.trace(from_b, at_a).outcome;
                    edges.push(Edge {
                        a: a.name.clone(),
                        b: b.name.clone(),
                        family,
                        kind: EdgeKind::of(&forward).max(EdgeKind::of(&backward)),
                        forward: forward.to_string(),
                        backward: backward.to_string(),
                        pods: pods_a && pods_b,
                    });
                }
            }
        }
        Self { nodes, edges }
    }

    /// The graph in Graphviz's DOT language (`dot -Tsvg`), undirected, coloured as
    /// [`NodeState::colour`] and [`EdgeKind::colour`]; blocked edges are dashed.
    pub fn to_dot(&self) -> String {
        let mut out =
            String::from("graph wgmesh {\n  node [shape=box, style=\"rounded,filled\"];\n");
        for n in &self.nodes {
            let mut label = n.name.clone();
            for r in &n.reasons {
                label.push('\n');
                label.push_str(r);
            }
            let _ = writeln!(
                out,
                "  {} [label={}, fillcolor=\"{}\", wgmesh_state=\"{}\"];",
                dot_quote(&n.name),
                dot_quote(&label),
                n.state.colour(),
                n.state.as_str()
            );
        }
        for e in &self.edges {
            let style = if e.kind == EdgeKind::Blocked {
                ", style=dashed"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {} -- {} [label=\"{} {}\", color=\"{}\"{style}];",
                dot_quote(&e.a),
                dot_quote(&e.b),
                e.family,
                e.kind,
                e.kind.colour()
            );
        }
        out.push_str("}\n");
        out
    }

    /// The graph as a standalone SVG document: nodes on a circle, one line per edge and
    /// family (IPv6 edges slightly offset), a legend. Each node is a `<g class="node">` with
    /// `data-name` and `data-state`; each edge a `<line class="edge">` with `data-a`,
    /// `data-b`, `data-family` and `data-kind`, so that scripts (and tests) can read it back.
    pub fn to_svg(&self) -> String {
        let n = self.nodes.len().max(1);
        let (box_w, box_h) = (230.0, 44.0);
        // A circle on which neighbouring boxes do not touch.
        let radius = if n < 3 {
            150.0
        } else {
            ((box_w + 20.0) / (2.0 * (std::f64::consts::PI / n as f64).sin())).max(150.0)
        };
        let angle = |i: usize| {
            2.0 * std::f64::consts::PI * i as f64 / n as f64 - std::f64::consts::FRAC_PI_2
        };
        // The drawing's extent: the circle's points that are used, plus the boxes.
        let (mut top, mut bottom) = (f64::MAX, f64::MIN);
        for i in 0..n {
            let y = radius * angle(i).sin();
            top = top.min(y);
            bottom = bottom.max(y);
        }
        let margin = 20.0;
        let width = 2.0 * radius + box_w + 2.0 * margin;
        let centre_x = width / 2.0;
        let centre_y = margin + box_h / 2.0 - top;
        let size = centre_y + bottom + box_h / 2.0 + margin;
        let legend_h = 60.0;
        let place = |i: usize| {
            (
                centre_x + radius * angle(i).cos(),
                centre_y + radius * angle(i).sin(),
            )
        };
        let index = |name: &str| self.nodes.iter().position(|x| x.name == name);
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="sans-serif" font-size="12">"#,
            w = width,
            h = size + legend_h
        );
        out.push_str(
            "<title>wgmesh</title>\n<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n",
        );
        for e in &self.edges {
            let (Some(i), Some(j)) = (index(&e.a), index(&e.b)) else {
                continue;
            };
            let ((x1, y1), (x2, y2)) = (place(i), place(j));
            let shift = if e.family == Family::V6 { 4.0 } else { 0.0 };
            let dash = if e.kind == EdgeKind::Blocked {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let _ = writeln!(
                out,
                r#"<line class="edge" data-a="{}" data-b="{}" data-family="{}" data-kind="{}" x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2"{dash}><title>{} — {} ({}): {}</title></line>"#,
                xml(&e.a),
                xml(&e.b),
                e.family,
                e.kind,
                x1 + shift,
                y1 + shift,
                x2 + shift,
                y2 + shift,
                e.kind.colour(),
                xml(&e.a),
                xml(&e.b),
                e.family,
                e.kind
            );
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let (x, y) = place(i);
            let _ = writeln!(
                out,
                r##"<g class="node" data-name="{name}" data-state="{state}"><rect x="{:.1}" y="{:.1}" width="{box_w}" height="{box_h}" rx="8" fill="{fill}" stroke="#424242"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="10">{sub}</text></g>"##,
                x - box_w / 2.0,
                y - box_h / 2.0,
                y - 4.0,
                y + 12.0,
                name = xml(&node.name),
                state = node.state.as_str(),
                fill = node.state.colour(),
                label = xml(&shorten(&node.name, 30)),
                sub = xml(&shorten(
                    &if node.reasons.is_empty() {
                        node.state.as_str().to_owned()
                    } else {
                        node.reasons.join(", ")
                    },
                    34
                )),
            );
        }
        // The legend.
        let y0 = size + 10.0;
        let mut x = 20.0;
        for kind in [EdgeKind::Encrypted, EdgeKind::Plain, EdgeKind::Blocked] {
            let dash = if kind == EdgeKind::Blocked {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let _ = writeln!(
                out,
                r#"<g class="legend"><line x1="{x:.0}" y1="{y:.0}" x2="{x2:.0}" y2="{y:.0}" stroke="{}" stroke-width="2"{dash}/><text x="{tx:.0}" y="{ty:.0}">{}</text></g>"#,
                kind.colour(),
                kind.as_str(),
                y = y0 + 10.0,
                x2 = x + 30.0,
                tx = x + 36.0,
                ty = y0 + 14.0
            );
            x += 120.0;
        }
        let mut x = 20.0;
        for state in [NodeState::Mesh, NodeState::Plain, NodeState::Excluded] {
            let _ = writeln!(
                out,
                r##"<g class="legend"><rect x="{x:.0}" y="{y:.0}" width="30" height="16" rx="4" fill="{}" stroke="#424242"/><text x="{tx:.0}" y="{ty:.0}">{}</text></g>"##,
                state.colour(),
                state.as_str(),
                y = y0 + 30.0,
                tx = x + 36.0,
                ty = y0 + 43.0
            );
            x += 120.0;
        }
        out.push_str("</svg>\n");
        out
    }

    /// The names of the nodes in a state.
    pub fn nodes_in(&self, state: NodeState) -> BTreeSet<&str> {
        self.nodes
            .iter()
            .filter(|n| n.state == state)
            .map(|n| n.name.as_str())
            .collect()
    }
}

/// A DOT string literal.
fn dot_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Text and attribute values escaped for XML.
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 forbids most control characters, even escaped.
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters: when cut, the start and the end with an ellipsis between
/// (node names of one pool differ at the end).
fn shorten(text: &str, max: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= max {
        return text.to_owned();
    }
    let keep = max.saturating_sub(1);
    let head = keep / 2;
    let tail = keep - head;
    let mut s: String = chars[..head].iter().collect();
    s.push('…');
    s.extend(&chars[chars.len() - tail..]);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_markup_out_of_names() {
        assert_eq!(xml(r#"a<b>&"c'"#), "a&lt;b&gt;&amp;&quot;c&apos;");
        assert_eq!(dot_quote("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
        assert_eq!(shorten("abcdef", 4), "a…ef");
        assert_eq!(shorten("abc", 4), "abc");
    }
}
