//! Plans: everything one node must program, and the full planner that computes them.
//!
//! # The rules, in one place
//!
//! For each family the local node has an address of, and while the mesh and the node's
//! WireGuard are enabled, the node gets one interface. A node **takes part** in a family's
//! mesh when WireGuard is enabled on it, it has that family's key, no other node claims that
//! key, and it has an address of that family. Every other node is *plain*.
//!
//! A node's **destinations** are its blocks plus its borrowed workload addresses
//! (`cidr_blocks`), or one host prefix per workload address (`workload_ips`), plus its own
//! addresses when host encryption is on. None of them is taken on trust: each is a *claim*
//! that [`crate::claims`] settles against the mesh settings and every other node's claims.
//!
//! - A claim that covers a special address (loopback, link-local such as the metadata
//!   endpoint, multicast, unspecified, broadcast, a cloud platform endpoint), that is shorter
//!   than `min_prefix_len` / `min_prefix_len_v6`, that lies outside `cluster_cidrs` (in a
//!   family that has some), that equals or contains another node's address, or that is a
//!   block inside another node's block is **refused**.
//! - A prefix claimed by two or more nodes (an address, a block, a workload address — the
//!   addresses a node's own blocks cover count too), or whose only claim is refused, belongs
//!   to **nobody**: it gets a throw route everywhere and sits on no peer, so it can never be
//!   moved silently between peers (WireGuard would move it), never be taken by a less
//!   specific claim, and stays reachable in plaintext.
//! - Where the rightful owner is known — a node's address against another node's workload
//!   address or block — the other claim is refused and the owner keeps its address (with host
//!   encryption the address itself stays plain while it is disputed, since the core cannot
//!   tell an owner from a copier). Where it is not known, nobody gets the prefix. Either way
//!   [`crate::diagnostics::diagnose`] names every node involved: nothing is downgraded
//!   silently.
//! - Only the first `max_node_addresses` addresses and the smallest `max_node_pod_cidrs`
//!   blocks and `max_node_workload_ips` workload addresses of a node count, so the work for
//!   one node is bounded whatever it publishes.
//!
//! When the local node takes part, each destination gets a route in the mesh table: `dev
//! <interface>` and an allowed IP on the owner's peer if the owner takes part; `throw` if the
//! owner is the local node or plain, so the lookup falls back to the main table. A rule `not
//! fwmark M/M lookup T` sends everything WireGuard did not emit itself to that table.
//!
//! **Phases** ([`crate::Phase`]): a destination whose owner takes part but is joining or
//! leaving — or any destination, on a node that is joining — keeps its route into the tunnel
//! and stays an allowed IP of the owner's peer, but its packets are marked
//! ([`Marking::plain_destinations`], [`Marking::plain_all`]), so they skip the mesh table and
//! go plain, while WireGuard still accepts the owner's encrypted packets *and* their
//! reverse-path check passes: the source routes back into the tunnel (IPv4 drops a
//! decrypted packet whose source routes elsewhere, under any enabled `rp_filter`, since a
//! WireGuard device has no address). In strict mode a leaving node counts as explicitly
//! plain, and a joining or leaving node has no ingress filter.
//!
//! **Packet marking.** While the node takes part, an nftables table marks packets that arrive
//! from the underlay with the mesh mark, and `src_valid_mark` makes the reverse-path check use
//! it, so strict `rp_filter` does not drop the underlay's packets from addresses the mesh table
//! routes into the tunnel. Without host encryption, host traffic must stay plain (the peers do
//! not accept node addresses as sources), so locally generated packets are marked too and skip
//! the mesh table; their replies arrive plain and pass the reverse-path check by the same mark.
//!
//! **Strict mode** (`mesh.strict_mode`) would rather drop than send in plaintext between
//! nodes that should encrypt: every node except the explicitly plain ones
//! (`wireguard.enabled: false`, the operator's opt-out). On a node whose WireGuard is
//! enabled (it routes even before it takes part, so it never sends in plaintext while its
//! key is unknown):
//!
//! - the destinations of a node that does not take part (no key, a duplicate key, no
//!   address of the family — a malformed key never gets into the model, so it is no key), and
//!   a prefix claimed by several nodes or whose only claim collides with another node's, get
//!   **blackhole** routes instead of throw routes — except the local node's own, a node
//!   address without host encryption, a claim refused for lying outside the cluster (a
//!   special address, too short a prefix, outside `cluster_cidrs`: nobody can blackhole the
//!   world by claiming it), prefixes claimed only by explicitly plain nodes, and the
//!   control-plane endpoints;
//! - each of `cluster_cidrs` gets a blackhole route (addresses nobody has claimed yet, such as
//!   a new pod's), with throw routes for every node address inside (without host encryption)
//!   and for the control-plane endpoints: longest-prefix match keeps them reachable;
//! - the [`Marking`] carries a [`StrictFilter`]: plaintext from the underlay whose source the
//!   mesh table routes into the tunnel is dropped and counted.
//!
//! WireGuard's own UDP never meets a blackhole: it carries the device mark, and the rule
//! skips the mesh table for it. Host traffic to the control plane is marked too (all host
//! traffic without host encryption, the endpoints' TCP with it).
//!
//! **MTU.** WireGuard sends its UDP packets with DF set, so an inner packet that does not fit
//! the smallest underlay MTU on its path is dropped, not fragmented. The automatic MTU is
//! therefore the smallest underlay MTU among the nodes taking part (the local one included)
//! minus the tunnel overhead (60 bytes over IPv4, 80 over IPv6): a jumbo-frame node must not
//! send packets that a 1500-byte peer cannot carry. A node's underlay MTU is its own claim,
//! though: one below `mtu_floor` plus the overhead (1340 for IPv4, 1360 for IPv6 by default)
//! is ignored by every other node and reported, so one node cannot shrink everyone's MTU; it
//! still bounds the node's own interface.

//!
//! # Stability: a versioned wire schema
//!
//! [`NodePlan`] and [`crate::PlanDelta`] (and the structs inside them) are plain data with
//! public fields, meant to be built, matched and serialized by appliers and tools. Their
//! serde form is the **wgmesh plan schema, version [`PLAN_SCHEMA_VERSION`]**: a field added in
//! a minor release keeps the version (readers must ignore fields they do not know, and the
//! new field gets a serde default so that older documents still read); a field renamed,
//! removed or changed in meaning bumps the version, and is a major release of `wgmesh-core`. The Rust
//! structs follow the schema, so adding a field is also a Rust-level change for code that
//! builds them with struct literals: start from [`NodePlan::empty`] or `Default` and set
//! fields (`..Default::default()`). `tests/schema.rs` holds the schema's field list, so no
//! field changes unnoticed. Version 1 grew, compatibly: `marking.strict` and the route type
//! `blackhole`, which only strict mode's plans carry.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::claims::{ADDRESS, Ledger, REFUSED, owner, static_refusal};
use crate::error::Error;
use crate::key::PublicKey;
use crate::model::{Cluster, Family, MeshConfig, Node};

/// The nftables table that wgmesh owns.
pub const MARKING_TABLE: &str = "wgmesh";

/// The sysctl that makes the reverse-path check honour packet marks.
pub const SRC_VALID_MARK: &str = "net.ipv4.conf.all.src_valid_mark";

/// The version of the plan schema: the serde form of [`NodePlan`] and [`crate::PlanDelta`]
/// (see the module documentation).
pub const PLAN_SCHEMA_VERSION: u32 = 1;

/// Everything one node must program. Its serde form is the plan schema (version
/// [`PLAN_SCHEMA_VERSION`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    /// The node this plan is for.
    pub node: String,
    /// One WireGuard interface per family, IPv4 first.
    pub interfaces: Vec<InterfacePlan>,
    /// The mesh table, sorted by destination.
    pub routes: Vec<Route>,
    /// The policy rules, IPv4 first.
    pub rules: Vec<Rule>,
    /// Kernel settings, sorted by key.
    pub sysctls: Vec<Sysctl>,
    /// The packet marking (nftables) that keeps reverse-path filtering and host traffic right.
    pub marking: Option<Marking>,
}

impl NodePlan {
    /// A plan that programs nothing: appliers remove what earlier plans left.
    pub fn empty(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            ..Self::default()
        }
    }

    /// Whether the plan programs nothing.
    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty()
            && self.routes.is_empty()
            && self.rules.is_empty()
            && self.sysctls.is_empty()
            && self.marking.is_none()
    }

    /// The interface of a family.
    pub fn interface(&self, family: Family) -> Option<&InterfacePlan> {
        self.interfaces.iter().find(|i| i.family == family)
    }

    /// Whether strict mode's ingress filter drops a packet from `source` that arrives in
    /// plaintext from the underlay: the mesh table routes `source` into a WireGuard interface
    /// (longest prefix), so it may only arrive through the tunnel. Always `false` when strict
    /// mode is off.
    ///
    /// ```
    /// use wgmesh_core::{plan_node, spec::parse_cluster};
    /// let cluster = parse_cluster(r#"{"mesh": {"strict_mode": true}, "nodes": [
    ///   {"name": "a", "addresses": ["10.0.0.1"], "pod_cidrs": ["10.65.0.0/26"],
    ///    "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
    ///   {"name": "b", "addresses": ["10.0.0.2"], "pod_cidrs": ["10.65.0.64/26"],
    ///    "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
    /// let plan = plan_node(&cluster, "a")?;
    /// assert!(plan.must_arrive_encrypted("10.65.0.70".parse()?));
    /// assert!(!plan.must_arrive_encrypted("10.0.0.2".parse()?)); // no host encryption
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn must_arrive_encrypted(&self, source: std::net::IpAddr) -> bool {
        let Some(marking) = self.marking.as_ref().filter(|m| m.strict.is_some()) else {
            return false;
        };
        if marking
            .plain_destinations
            .iter()
            .any(|d| d.contains(&source))
        {
            return false;
        }
        self.routes
            .iter()
            .filter(|r| r.destination.contains(&source))
            .max_by_key(|r| r.destination.prefix_len())
            .is_some_and(|r| r.kind == RouteType::Unicast)
    }
}

/// One WireGuard interface of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfacePlan {
    /// Link name.
    pub name: String,
    /// The family of its peers' endpoints and allowed IPs.
    pub family: Family,
    /// UDP port.
    pub listen_port: u16,
    /// The mark on WireGuard's own packets.
    pub firewall_mark: u32,
    /// Link MTU.
    pub mtu: u32,
    /// The local node's published key for this interface, if it has one.
    pub public_key: Option<PublicKey>,
    /// Peers, sorted by node name.
    pub peers: Vec<PeerPlan>,
}

/// One peer of an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPlan {
    /// The node behind the peer.
    pub node: String,
    /// Its public key.
    pub public_key: PublicKey,
    /// Its first address of the family, with the mesh port.
    pub endpoint: SocketAddr,
    /// Its destinations, sorted.
    #[serde(serialize_with = "crate::netfmt::nets")]
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

/// The kind of a mesh-table route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteType {
    /// Into the WireGuard interface.
    Unicast,
    /// Back to the rule list, and so to the main table.
    Throw,
    /// Dropped (strict mode: rather drop than send in plaintext).
    Blackhole,
}

/// One route of the mesh table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Route {
    /// Family of the destination.
    pub family: Family,
    /// The mesh table.
    pub table: u32,
    /// The destination prefix.
    #[serde(serialize_with = "crate::netfmt::net")]
    pub destination: IpNet,
    /// Unicast into the tunnel, throw, or blackhole.
    #[serde(rename = "type")]
    pub kind: RouteType,
    /// The WireGuard interface, for unicast routes. Shared: a plan's unicast routes all name
    /// one of two interfaces, and a node of a big cluster plans hundreds of thousands of
    /// routes (`Arc::from("wg-v4")` or `"wg-v4".into()` makes one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Arc<str>>,
}

/// One policy rule: `not fwmark M/M lookup T` when `invert`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// Family of the rule.
    pub family: Family,
    /// Rule priority.
    pub priority: u32,
    /// The table it looks up.
    pub table: u32,
    /// The mark compared.
    pub firewall_mark: u32,
    /// The mask applied before comparing.
    pub firewall_mask: u32,
    /// Whether the match is inverted (`not`).
    pub invert: bool,
}

/// A kernel setting.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sysctl {
    /// The dotted key, as `sysctl` spells it.
    pub key: String,
    /// The value to write.
    pub value: String,
}

/// The packet marking of a node: nftables tables named `table` that wgmesh owns, one of family
/// `inet` and, with `mark_arp`, one of family `arp`.
///
/// The `inet` table's `prerouting` chain (filter, priority raw) returns for the loopback and
/// mesh interfaces, marks packets to the `plain_destinations` (everything with `plain_all`),
/// returns for the workload interfaces and ORs `firewall_mark` into the mark of every other
/// packet: those came from the underlay. The `arp` table's `input` chain does the same for ARP: the kernel
/// checks the sender of an ARP request against the routing table too (with the mark when
/// `src_valid_mark` is set), and under host encryption the sender's address is routed into
/// the tunnel, so strict `rp_filter` would drop every ARP request from a peer and nodes could
/// not resolve each other. With `mark_output`, the `inet` table's `output` chain (route,
/// priority mangle) ORs the mark into every locally generated packet, so host traffic skips the
/// mesh table. [`Marking::nft_script`] spells it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marking {
    /// The nftables table (family `inet`).
    pub table: String,
    /// The mark to set (ORed into the packet's mark).
    pub firewall_mark: u32,
    /// Input interfaces that are not underlay, by exact name.
    pub skip_interfaces: Vec<String>,
    /// Input interfaces that are not underlay, by name prefix.
    pub skip_interface_prefixes: Vec<String>,
    /// Mark ARP packets from the underlay too (the `arp` table).
    pub mark_arp: bool,
    /// Mark every locally generated packet (host traffic stays out of the tunnel).
    pub mark_output: bool,
    /// Mark locally generated TCP packets to and from these endpoints (the API server), so
    /// they stay out of the tunnel even with host encryption.
    pub plain_tcp_endpoints: Vec<SocketAddr>,
    /// Strict mode's ingress filter, when strict mode is on.
    #[serde(default)]
    pub strict: Option<StrictFilter>,
    /// Destinations routed into the tunnel whose packets are sent plain: the destinations of
    /// a participating node that is joining or leaving ([`crate::Phase`]). Packets to them
    /// are marked in `output` and in `prerouting` (forwarded ones included, from workload
    /// interfaces too, never from the loopback or mesh interfaces), so the rule skips the
    /// mesh table and the main table sends them over the underlay, while the mesh table's
    /// route into the tunnel still passes the reverse-path check of the node's encrypted
    /// packets. Sorted, IPv4 first.
    #[serde(default)]
    pub plain_destinations: Vec<IpNet>,
    /// The local node is joining: every packet is marked in `output` and in `prerouting`
    /// (except from the loopback and mesh interfaces), so all of its traffic goes plain
    /// while its routes stay in the tunnel.
    #[serde(default)]
    pub plain_all: bool,
}

/// Strict mode's ingress filter: a packet that arrives from the underlay (any interface the
/// marking does not skip: not loopback, not the mesh interfaces, not a workload interface)
/// is dropped and counted (one rule and counter per family, [`strict_counter`]) when the mesh table
/// routes its source into the family's WireGuard interface: its source lies inside a
/// participating peer's destinations, and no more specific route (a plain node's borrowed
/// address, say) makes an exception. The filter asks the routing tables (nftables `fib saddr
/// oifname`), so it follows the routes without a list of its own;
/// [`NodePlan::must_arrive_encrypted`] is the same check on the plan. WireGuard's own UDP (to
/// the listening ports), the control plane's TCP (to and from the endpoints) and, when the node
/// routes IPv6, neighbour solicitations and advertisements with hop limit 255 (link-local by
/// construction, never forwarded; a node's global address is their source, which host
/// encryption routes into the tunnel, so without the exemption neighbour discovery between
/// nodes fails and the IPv6 tunnel with it) are exempt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StrictFilter {
    /// The IPv4 WireGuard interface, when the node routes IPv4.
    pub interface_v4: Option<String>,
    /// The IPv6 WireGuard interface, when the node routes IPv6.
    pub interface_v6: Option<String>,
    /// UDP destination ports that are never dropped: the WireGuard listening ports.
    pub exempt_udp_ports: Vec<u16>,
    /// TCP endpoints whose packets are never dropped: the control plane, from it (its answers)
    /// and to it (on the node that is the endpoint, the requests other nodes send outside
    /// the tunnel).
    pub exempt_tcp_endpoints: Vec<SocketAddr>,
}

/// The name of strict mode's drop counter for a direction (`ingress` or `egress`) and a
/// family: its name in metrics and APIs (in the marking table it is the counter of the
/// family's drop rule).
///
/// ```
/// use wgmesh_core::{Family, plan::strict_counter};
/// assert_eq!(strict_counter("ingress", Family::V6), "strict_ingress_v6");
/// ```
pub fn strict_counter(direction: &str, family: Family) -> String {
    let f = match family {
        Family::V4 => "v4",
        Family::V6 => "v6",
    };
    format!("strict_{direction}_{f}")
}

impl Marking {
    /// Whether an input interface is underlay (its packets get the mark).
    pub fn marks_input(&self, interface: &str) -> bool {
        !self.skip_interfaces.iter().any(|n| n == interface)
            && !self
                .skip_interface_prefixes
                .iter()
                .any(|p| interface.starts_with(p.as_str()))
    }

    /// Whether a packet to `destination` is sent plain although the mesh table may route it
    /// into the tunnel: the local node is joining, or the destination is a phased node's.
    pub fn marks_destination(&self, destination: std::net::IpAddr) -> bool {
        self.plain_all
            || self
                .plain_destinations
                .iter()
                .any(|d| d.contains(&destination))
    }

    /// Whether the `prerouting` chain marks a packet to `destination` arriving on
    /// `interface`: never from the loopback or mesh interfaces (exact names), always for a
    /// destination sent plain ([`Marking::marks_destination`]), otherwise from the underlay.
    ///
    /// ```
    /// use wgmesh_core::Marking;
    /// let m = Marking { table: "wgmesh".into(), firewall_mark: 0x100000,
    ///     skip_interfaces: vec!["lo".into(), "wg0".into()],
    ///     skip_interface_prefixes: vec!["cali".into()], mark_arp: true, mark_output: false,
    ///     plain_tcp_endpoints: vec![], strict: None,
    ///     plain_destinations: vec!["10.65.3.0/24".parse()?], plain_all: false };
    /// assert!(m.marks_prerouting("cali1", "10.65.3.7".parse()?)); // to a leaving node
    /// assert!(!m.marks_prerouting("cali1", "10.65.2.7".parse()?));
    /// assert!(!m.marks_prerouting("wg0", "10.65.3.7".parse()?));
    /// assert!(m.marks_prerouting("eth0", "10.65.2.7".parse()?)); // underlay
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn marks_prerouting(&self, interface: &str, destination: std::net::IpAddr) -> bool {
        if self.skip_interfaces.iter().any(|n| n == interface) {
            return false;
        }
        self.marks_destination(destination) || self.marks_input(interface)
    }

    /// Whether the `output` chain marks a locally generated packet to `destination` (the
    /// control-plane endpoints' TCP aside).
    pub fn marks_output(&self, destination: std::net::IpAddr) -> bool {
        self.mark_output || self.marks_destination(destination)
    }

    /// Whether the `output` chain exists.
    pub fn has_output(&self) -> bool {
        self.mark_output
            || self.plain_all
            || !self.plain_tcp_endpoints.is_empty()
            || !self.plain_destinations.is_empty()
    }

    /// The tables as an `nft -f` script (for people and tests; appliers use netlink).
    ///
    /// Interface names are quoted with `"` and `\` escaped, and control characters written as
    /// `\xNN`, so that no name can end its string early: a name that nft cannot take makes
    /// the script fail to load (nft loads a script whole or not at all), never adds a rule.
    /// Validated meshes have no such names ([`MeshConfig::validate`]).
    ///
    /// ```
    /// use wgmesh_core::Marking;
    /// let marking = Marking {
    ///     table: "wgmesh".into(),
    ///     firewall_mark: 0x100000,
    ///     skip_interfaces: vec!["a\" accept; \\".into()],
    ///     skip_interface_prefixes: vec![],
    ///     mark_arp: false,
    ///     mark_output: false,
    ///     plain_tcp_endpoints: vec![],
    ///     strict: None,
    ///     plain_destinations: vec![],
    ///     plain_all: false,
    /// };
    /// assert!(marking.nft_script().contains(r#"iifname "a\" accept; \\" return"#));
    /// ```
    pub fn nft_script(&self) -> String {
        let mark = format!("meta mark set meta mark | {:#x}", self.firewall_mark);
        // The destinations sent plain live in one interval set per family (`plain4`,
        // `plain6`), looked up by one rule per chain and family.
        let families: Vec<(&str, &str)> = [("ip", "plain4"), ("ip6", "plain6")]
            .into_iter()
            .filter(|(ip, _)| {
                self.plain_destinations
                    .iter()
                    .any(|d| matches!(d, IpNet::V4(_)) == (*ip == "ip"))
            })
            .collect();
        let destinations = || {
            let mut s = String::new();
            for (ip, set) in &families {
                s.push_str(&format!("\t\t{ip} daddr @{set} {mark}\n"));
            }
            s
        };
        // `arp` marks every ARP packet from the underlay; `inet` also marks packets to the
        // destinations sent plain (or all, while joining) from the workload interfaces.
        let skips = |inet: bool| {
            let mut s = String::new();
            for name in &self.skip_interfaces {
                s.push_str(&format!("\t\tiifname \"{}\" return\n", nft_escape(name)));
            }
            if !(inet && self.plain_all) {
                if inet {
                    s.push_str(&destinations());
                }
                for prefix in &self.skip_interface_prefixes {
                    s.push_str(&format!("\t\tiifname \"{}*\" return\n", nft_escape(prefix)));
                }
            }
            s.push_str(&format!("\t\t{mark}\n\t}}\n"));
            s
        };
        let mut s = format!("table inet {} {{\n", self.table);
        for (ip, set) in &families {
            let (kind, v4) = if *ip == "ip" {
                ("ipv4_addr", true)
            } else {
                ("ipv6_addr", false)
            };
            // `auto-merge`: nft merges overlapping and adjacent prefixes (the kernel takes
            // disjoint intervals only).
            let elements: Vec<String> = self
                .plain_destinations
                .iter()
                .filter(|d| matches!(d, IpNet::V4(_)) == v4)
                .map(|d| nft_prefix(d).1)
                .collect();
            s.push_str(&format!(
                "\tset {set} {{\n\t\ttype {kind}\n\t\tflags interval\n\t\tauto-merge\n\t\telements = {{ {} }}\n\t}}\n",
                elements.join(", ")
            ));
        }
        s.push_str(
            "\tchain prerouting {\n\t\ttype filter hook prerouting priority raw; policy accept;\n",
        );
        s.push_str(&skips(true));
        if self.has_output() {
            s.push_str(
                "\tchain output {\n\t\ttype route hook output priority mangle; policy accept;\n",
            );
            if self.mark_output || self.plain_all {
                s.push_str(&format!("\t\t{mark}\n"));
            } else {
                for ep in &self.plain_tcp_endpoints {
                    let ip = if ep.is_ipv4() { "ip" } else { "ip6" };
                    let (a, p) = (ep.ip(), ep.port());
                    s.push_str(&format!("\t\t{ip} daddr {a} tcp dport {p} {mark}\n"));
                    s.push_str(&format!("\t\t{ip} saddr {a} tcp sport {p} {mark}\n"));
                }
                s.push_str(&destinations());
            }
            s.push_str("\t}\n");
        }
        if let Some(strict) = &self.strict {
            s.push_str(
                "\tchain strict_ingress {\n\t\ttype filter hook prerouting priority raw; policy accept;\n",
            );
            for name in &self.skip_interfaces {
                s.push_str(&format!("\t\tiifname \"{}\" return\n", nft_escape(name)));
            }
            for prefix in &self.skip_interface_prefixes {
                s.push_str(&format!("\t\tiifname \"{}*\" return\n", nft_escape(prefix)));
            }
            for port in &strict.exempt_udp_ports {
                s.push_str(&format!("\t\tudp dport {port} return\n"));
            }
            if strict.interface_v6.is_some() {
                for t in ["nd-neighbor-solicit", "nd-neighbor-advert"] {
                    s.push_str(&format!("\t\ticmpv6 type {t} ip6 hoplimit 255 return\n"));
                }
            }
            for ep in &strict.exempt_tcp_endpoints {
                let ip = if ep.is_ipv4() { "ip" } else { "ip6" };
                let (a, p) = (ep.ip(), ep.port());
                s.push_str(&format!("\t\t{ip} saddr {a} tcp sport {p} return\n"));
                s.push_str(&format!("\t\t{ip} daddr {a} tcp dport {p} return\n"));
            }
            for (ip, set) in &families {
                s.push_str(&format!("\t\t{ip} saddr @{set} return\n"));
            }
            for (proto, dev) in [
                ("ipv4", &strict.interface_v4),
                ("ipv6", &strict.interface_v6),
            ] {
                if let Some(dev) = dev {
                    s.push_str(&format!(
                        "\t\tmeta nfproto {proto} fib saddr oifname \"{}\" counter drop\n",
                        nft_escape(dev),
                    ));
                }
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
        if self.mark_arp {
            s.push_str(&format!("table arp {} {{\n", self.table));
            s.push_str(
                "\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n",
            );
            s.push_str(&skips(false));
            s.push_str("}\n");
        }
        s
    }
}

/// A prefix as nft writes it: its family's keyword, and a host prefix as a bare address.
fn nft_prefix(net: &IpNet) -> (&'static str, String) {
    let ip = if matches!(net, IpNet::V4(_)) {
        "ip"
    } else {
        "ip6"
    };
    if net.prefix_len() == net.max_prefix_len() {
        (ip, net.addr().to_string())
    } else {
        (ip, net.to_string())
    }
}

/// A name for use inside an nftables string: `"` and `\` escaped, control characters as
/// `\xNN`.
fn nft_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, &self.device) {
            (RouteType::Unicast, Some(dev)) => write!(
                f,
                "{} dev {dev} table {} scope link",
                self.destination, self.table
            ),
            (RouteType::Unicast, None) => write!(f, "{} table {}", self.destination, self.table),
            (RouteType::Throw, _) => write!(f, "throw {} table {}", self.destination, self.table),
            (RouteType::Blackhole, _) => {
                write!(f, "blackhole {} table {}", self.destination, self.table)
            }
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:\t{}from all fwmark {:#x}/{:#x} lookup {}",
            self.priority,
            if self.invert { "not " } else { "" },
            self.firewall_mark,
            self.firewall_mask,
            self.table
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Rules shared by the full and the incremental planner.

/// Whether a node takes part in a family's mesh, given how many nodes claim its key.
pub(crate) fn takes_part(
    mesh: &MeshConfig,
    node: &Node,
    family: Family,
    key_claims: usize,
) -> bool {
    mesh.enabled && node.key(family).is_some() && key_claims == 1 && node.address(family).is_some()
}

/// The endpoint of a node in a family.
pub(crate) fn endpoint(mesh: &MeshConfig, node: &Node, family: Family) -> Option<SocketAddr> {
    node.address(family)
        .map(|a| SocketAddr::new(a, mesh.port(family)))
}

/// A family's interface without peers.
pub(crate) fn interface(
    mesh: &MeshConfig,
    local: &Node,
    family: Family,
    min_peer_mtu: Option<u32>,
) -> InterfacePlan {
    let underlay = min_peer_mtu.map_or(local.underlay_mtu, |m| m.min(local.underlay_mtu));
    InterfacePlan {
        name: mesh.interface(family).to_owned(),
        family,
        listen_port: mesh.port(family),
        firewall_mark: mesh.firewall_mark,
        mtu: mesh
            .mtu
            .unwrap_or_else(|| underlay - family.wireguard_overhead()),
        public_key: local.key(family),
        peers: Vec::new(),
    }
}

/// The rule of a family.
pub(crate) fn rule(mesh: &MeshConfig, family: Family) -> Rule {
    Rule {
        family,
        priority: mesh.rule_priority,
        table: mesh.routing_table,
        firewall_mark: mesh.firewall_mark,
        firewall_mask: mesh.firewall_mark,
        invert: true,
    }
}

/// Whether the local node programs routes in a family: when it takes part, and in strict
/// mode whenever its WireGuard is enabled and it has an address of the family (it then
/// blackholes what it cannot encrypt, instead of sending it in plaintext).
pub(crate) fn routes_active(mesh: &MeshConfig, local: &Node, family: Family, part: bool) -> bool {
    part || (mesh.strict_mode
        && mesh.enabled
        && local.wireguard_enabled()
        && local.address(family).is_some())
}

/// Rules, sysctls and marking, given the interfaces, the families the local node routes, its
/// phase and the destinations it sends plain (a phased node's, [`Marking::plain_destinations`]).
/// A joining or leaving node has no strict ingress filter: its peers route to it in
/// plaintext ([`crate::Phase`]); a joining node marks all of its traffic.
pub(crate) fn finish(
    mesh: &MeshConfig,
    plan: &mut NodePlan,
    active: [bool; 2],
    phase: crate::model::Phase,
    plain_destinations: Vec<IpNet>,
) {
    let joining = phase == crate::model::Phase::Joining;
    plan.rules = Family::ALL
        .iter()
        .filter(|f| active[f.index()])
        .map(|f| rule(mesh, *f))
        .collect();
    plan.sysctls = if active[Family::V4.index()] {
        vec![Sysctl {
            key: SRC_VALID_MARK.into(),
            value: "1".into(),
        }]
    } else {
        Vec::new()
    };
    plan.marking = (active[0] || active[1]).then(|| Marking {
        table: MARKING_TABLE.into(),
        firewall_mark: mesh.firewall_mark,
        skip_interfaces: std::iter::once("lo".to_owned())
            .chain(plan.interfaces.iter().map(|i| i.name.clone()))
            .collect(),
        skip_interface_prefixes: vec![mesh.workload_interface_prefix.clone()],
        mark_arp: true,
        mark_output: !mesh.host_encryption,
        plain_tcp_endpoints: if mesh.host_encryption {
            mesh.control_plane_endpoints.clone()
        } else {
            Vec::new()
        },
        plain_destinations: if joining {
            Vec::new()
        } else {
            plain_destinations
        },
        plain_all: joining,
        strict: (mesh.strict_mode && phase == crate::model::Phase::Active).then(|| StrictFilter {
            interface_v4: plan
                .interface(Family::V4)
                .map(|i| i.name.clone())
                .filter(|_| active[0]),
            interface_v6: plan
                .interface(Family::V6)
                .map(|i| i.name.clone())
                .filter(|_| active[1]),
            exempt_udp_ports: plan.interfaces.iter().map(|i| i.listen_port).collect(),
            exempt_tcp_endpoints: mesh.control_plane_endpoints.clone(),
        }),
    });
}

/// The address space to send plain: the `plain` prefixes (sorted) minus every routed
/// destination strictly inside one of them that is not plain itself (`routed`): the mesh
/// table routes those by longest prefix, so marking them would override their own route
/// (another node's borrowed address inside a phased node's block, a refused nested block, a
/// blackhole). Each cut splits a prefix in halves, at most one prefix per bit. Sorted,
/// disjoint.
pub(crate) fn carve_plain(plain: Vec<IpNet>, routed: impl Iterator<Item = IpNet>) -> Vec<IpNet> {
    let wide: Vec<IpNet> = plain
        .iter()
        .filter(|p| p.prefix_len() < p.max_prefix_len())
        .copied()
        .collect();
    if wide.is_empty() {
        return plain;
    }
    let mut cuts: Vec<IpNet> = routed
        .filter(|r| {
            wide.iter()
                .any(|p| p != r && p.contains(r) && plain.binary_search(r).is_err())
        })
        .collect();
    if cuts.is_empty() {
        return plain;
    }
    cuts.sort_unstable();
    cuts.dedup();
    fn carve(p: IpNet, cuts: &[IpNet], out: &mut Vec<IpNet>) {
        let inside: Vec<IpNet> = cuts.iter().filter(|c| p.contains(*c)).copied().collect();
        if inside.is_empty() {
            out.push(p);
            return;
        }
        if inside.contains(&p) {
            return;
        }
        let Ok(halves) = p.subnets(p.prefix_len() + 1) else {
            return;
        };
        for half in halves {
            carve(half, &inside, out);
        }
    }
    let mut out = Vec::with_capacity(plain.len());
    for p in plain {
        carve(p, &cuts, &mut out);
    }
    out.sort_unstable();
    out
}

/// How a destination is routed, from the local node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision<N> {
    /// Into the tunnel, to this node's peer.
    Peer(N),
    /// Into the tunnel, to this node's peer, but the packets are marked and so sent
    /// plaintext through the main table ([`Marking::plain_destinations`]); the route keeps
    /// the reverse-path check of the peer's encrypted packets passing: the node, or the local
    /// node, is joining or leaving ([`crate::Phase`]).
    Accept(N),
    /// Back to the main table.
    Throw,
    /// Dropped (strict mode).
    Blackhole,
}

/// The underlay MTU with which a node counts for the mesh MTU of a family: its own, when it
/// takes part and is not below the floor ([`MeshConfig::underlay_mtu_floor`]).
pub(crate) fn counted_mtu(
    mesh: &MeshConfig,
    node: &Node,
    family: Family,
    part: bool,
) -> Option<u32> {
    (part && node.underlay_mtu >= mesh.underlay_mtu_floor(family)).then_some(node.underlay_mtu)
}

/// The routing decision for a destination with these claimants: `routed` says whether the
/// local node routes to a participating claimant through the tunnel (neither is joining or
/// leaving), otherwise the claimant's peer only accepts it.
pub(crate) fn decide<N: PartialEq + Copy>(
    local: N,
    sole_claimant: Option<N>,
    takes_part: impl Fn(N) -> bool,
    routed: impl Fn(N) -> bool,
) -> Decision<N> {
    match sole_claimant {
        Some(n) if n != local && takes_part(n) && routed(n) => Decision::Peer(n),
        Some(n) if n != local && takes_part(n) => Decision::Accept(n),
        _ => Decision::Throw,
    }
}

/// Whether the local node routes to a participating node through the tunnel: neither is in
/// a join or a leave that routes plain ([`crate::Phase`]). A leaving local node still does
/// (it keeps everything until it drops its device).
pub(crate) fn routed_phases(local: crate::model::Phase, remote: crate::model::Phase) -> bool {
    use crate::model::Phase;
    local != Phase::Joining && remote == Phase::Active
}

/// The routing decision for a destination from its claims `(node, flags)`; `None` when it gets
/// no route. `local_part` says whether the local node takes part (it then has peers).
///
/// Strict mode turns a throw into a blackhole when the destination is cluster space that an
/// encrypting node should have: it is not the local node's, not refused for being outside
/// the cluster (a special address, too short a prefix, outside `cluster_cidrs`: a hostile
/// claim must not blackhole the world), not a node address without host encryption, not
/// only claimed (unrefused) by explicitly plain (or leaving) nodes, and not a control-plane
/// endpoint. A destination whose sole owner takes part but is routed plain because of a
/// phase (`routed` false) is [`Decision::Accept`]: sent plain, never blackholed.
/// Without a claim that asks for a route, a node address inside `cluster_cidrs` gets a throw
/// route in strict mode: the exception to the blackholed unknown cluster space.
pub(crate) fn decide_claims<N: PartialEq + Copy>(
    mesh: &MeshConfig,
    (local, local_part): (N, bool),
    dest: &IpNet,
    claims: impl Iterator<Item = (N, u8)> + Clone,
    part: impl Fn(N) -> bool,
    routed: impl Fn(N) -> bool,
    plain: impl Fn(N) -> bool,
) -> Option<Decision<N>> {
    let Some(sole) = owner(claims.clone()) else {
        let address = claims.clone().any(|(_, f)| f & ADDRESS != 0);
        return (mesh.strict_mode && address && in_cluster_cidrs(mesh, dest))
            .then_some(Decision::Throw);
    };
    let decision = decide(local, sole, |n| local_part && part(n), routed);
    if !mesh.strict_mode || decision != Decision::Throw {
        return Some(decision);
    }
    let mut claims = claims;
    let throw = claims.clone().any(|(n, _)| n == local)
        || static_refusal(mesh, dest).is_some()
        || (!mesh.host_encryption && claims.clone().any(|(_, f)| f & ADDRESS != 0))
        || claims.all(|(n, f)| plain(n) && f & REFUSED == 0)
        || is_control_plane(mesh, dest);
    Some(if throw {
        Decision::Throw
    } else {
        Decision::Blackhole
    })
}

fn in_cluster_cidrs(mesh: &MeshConfig, dest: &IpNet) -> bool {
    mesh.cluster_cidrs.iter().any(|c| c.contains(dest))
}

fn is_control_plane(mesh: &MeshConfig, dest: &IpNet) -> bool {
    crate::claims::is_host(dest)
        && mesh
            .control_plane_endpoints
            .iter()
            .any(|e| e.ip() == dest.addr())
}

/// Strict mode's routes that come from the settings, not from claims: a throw route for each
/// control-plane endpoint and a blackhole for each of `cluster_cidrs` (unknown cluster space),
/// in a family; a claim's decision on the same prefix wins. Empty when strict mode is off.
pub(crate) fn strict_static(mesh: &MeshConfig, family: Family) -> Vec<(IpNet, Decision<()>)> {
    if !mesh.strict_mode {
        return Vec::new();
    }
    let mut out: Vec<(IpNet, Decision<()>)> = mesh
        .control_plane_endpoints
        .iter()
        .filter(|e| Family::of(&e.ip()) == family)
        .map(|e| (crate::model::host_net(e.ip()), Decision::Throw))
        .collect();
    for c in &mesh.cluster_cidrs {
        if Family::of_net(c) == family && !out.iter().any(|(p, _)| p == c) {
            out.push((*c, Decision::Blackhole));
        }
    }
    out.sort_unstable_by_key(|(p, _)| *p);
    out.dedup_by_key(|(p, _)| *p);
    out
}

// ---------------------------------------------------------------------------------------------
// The full planner.

/// Computes the plan of one node from the whole cluster.
///
/// ```
/// use wgmesh_core::{plan_node, spec::parse_cluster, RouteType};
/// let cluster = parse_cluster(r#"{
///   "mesh": {"route_source": "workload_ips"},
///   "nodes": [
///     {"name": "a", "addresses": ["10.0.0.1"], "workload_ips": ["10.0.0.10"],
///      "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
///     {"name": "b", "addresses": ["10.0.0.2"], "workload_ips": ["10.0.0.20"],
///      "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
/// let plan = plan_node(&cluster, "a")?;
/// let wg = &plan.interfaces[0];
/// assert_eq!(wg.mtu, 1440);
/// assert_eq!(wg.peers[0].endpoint.to_string(), "10.0.0.2:51820");
/// assert_eq!(wg.peers[0].allowed_ips, ["10.0.0.20/32".parse()?]);
/// assert_eq!(plan.routes[0].kind, RouteType::Throw); // 10.0.0.10, local
/// assert_eq!(plan.routes[1].kind, RouteType::Unicast); // 10.0.0.20, via b
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plan_node(cluster: &Cluster, node: &str) -> Result<NodePlan, Error> {
    let local = cluster
        .node(node)
        .ok_or_else(|| Error::unknown_node(node))?;
    let mesh = cluster.mesh();
    let mut plan = NodePlan::empty(node);
    if !mesh.enabled || !local.wireguard_enabled() {
        return Ok(plan);
    }
    let nodes = cluster.nodes();
    let local_idx = nodes
        .iter()
        .position(|n| n.name == node)
        .ok_or_else(|| Error::unknown_node(node))?;
    let mut active = [false; 2];
    let mut routes = Vec::new();
    let mut plain = Vec::new();
    for family in Family::ALL {
        if local.address(family).is_none() {
            continue;
        }
        let mut key_claims: HashMap<PublicKey, usize> = HashMap::new();
        for n in nodes {
            if let Some(k) = n.key(family) {
                *key_claims.entry(k).or_default() += 1;
            }
        }
        let part: Vec<bool> = nodes
            .iter()
            .map(|n| {
                let claims = n.key(family).map_or(0, |k| key_claims[&k]);
                takes_part(mesh, n, family, claims)
            })
            .collect();
        let min_mtu = nodes
            .iter()
            .zip(&part)
            .filter_map(|(n, p)| counted_mtu(mesh, n, family, *p))
            .min();
        let mut iface = interface(mesh, local, family, min_mtu);
        let local_part = part[local_idx];
        if !routes_active(mesh, local, family, local_part) {
            plan.interfaces.push(iface);
            continue;
        }
        active[family.index()] = true;
        let first = routes.len();

        // Every settled claim, sorted by prefix: the claims of one prefix are next to each
        // other, routes come out in order, and each peer's allowed IPs too.
        let ledger = Ledger::new(mesh, nodes, family);
        let mut allowed: Vec<Vec<IpNet>> = vec![Vec::new(); nodes.len()];
        routes.reserve(ledger.entries.len());
        for group in ledger.entries.chunk_by(|a, b| a.prefix == b.prefix) {
            let dest = group[0].prefix;
            let Some(decision) = decide_claims(
                mesh,
                (local_idx, local_part),
                &dest,
                group.iter().map(|e| (e.node, e.flags)),
                |n| part[n],
                |n| routed_phases(local.phase(), nodes[n].phase()),
                |n| nodes[n].plain_by_choice(),
            ) else {
                continue;
            };
            match decision {
                Decision::Peer(n) => {
                    allowed[n].push(dest);
                    routes.push((dest, RouteType::Unicast));
                }
                Decision::Accept(n) => {
                    allowed[n].push(dest);
                    plain.push(dest);
                    routes.push((dest, RouteType::Unicast));
                }
                Decision::Throw => routes.push((dest, RouteType::Throw)),
                Decision::Blackhole => routes.push((dest, RouteType::Blackhole)),
            }
        }
        let extra = strict_static(mesh, family);
        if !extra.is_empty() {
            let missing: Vec<(IpNet, RouteType)> = extra
                .into_iter()
                .filter(|(dest, _)| routes[first..].binary_search_by_key(dest, |r| r.0).is_err())
                .map(|(dest, decision)| (dest, route_type(decision)))
                .collect();
            routes.extend(missing);
            routes[first..].sort_unstable_by_key(|r| r.0);
        }
        if !local_part {
            plan.interfaces.push(iface);
            continue;
        }
        let keepalive = mesh.persistent_keepalive;
        for (i, n) in nodes.iter().enumerate() {
            if i == local_idx || !part[i] {
                continue;
            }
            let (Some(public_key), Some(endpoint)) = (n.key(family), endpoint(mesh, n, family))
            else {
                continue;
            };
            iface.peers.push(PeerPlan {
                node: n.name.clone(),
                public_key,
                endpoint,
                allowed_ips: std::mem::take(&mut allowed[i]),
                persistent_keepalive: keepalive,
            });
        }
        iface.peers.sort_unstable_by(|a, b| a.node.cmp(&b.node));
        plan.interfaces.push(iface);
    }
    // Each family's routes are sorted already, IPv4 before IPv6.
    let devices = mesh.devices();
    plan.routes = routes
        .into_iter()
        .map(|(destination, kind)| {
            let family = Family::of_net(&destination);
            Route {
                family,
                table: mesh.routing_table,
                destination,
                kind,
                device: (kind == RouteType::Unicast).then(|| devices[family.index()].clone()),
            }
        })
        .collect();
    let plain = carve_plain(plain, plan.routes.iter().map(|r| r.destination));
    finish(mesh, &mut plan, active, local.phase(), plain);
    Ok(plan)
}

/// The peer a decision puts the destination on as an allowed IP, if any.
pub(crate) fn allowed_on<N>(decision: Option<Decision<N>>) -> Option<N> {
    match decision {
        Some(Decision::Peer(n) | Decision::Accept(n)) => Some(n),
        _ => None,
    }
}

/// The route type of a decision.
pub(crate) fn route_type<N>(decision: Decision<N>) -> RouteType {
    match decision {
        Decision::Peer(_) | Decision::Accept(_) => RouteType::Unicast,
        Decision::Throw => RouteType::Throw,
        Decision::Blackhole => RouteType::Blackhole,
    }
}

/// Plans every node of the cluster, in the cluster's order.
pub fn plan_all(cluster: &Cluster) -> Vec<NodePlan> {
    cluster
        .nodes()
        .iter()
        .filter_map(|n| plan_node(cluster, &n.name).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The destinations sent plain are one interval set per family, looked up by one rule
    /// per chain and family (never one rule per prefix).
    #[test]
    fn the_script_puts_plain_destinations_in_interval_sets() {
        let mut m = Marking {
            table: "wgmesh".into(),
            firewall_mark: 0x100000,
            skip_interfaces: vec!["lo".into()],
            skip_interface_prefixes: vec![],
            mark_arp: false,
            mark_output: false,
            plain_tcp_endpoints: vec![],
            strict: Some(StrictFilter::default()),
            plain_destinations: ["10.0.0.2/32", "10.65.0.0/24", "10.65.1.0/24"]
                .iter()
                .map(|p| p.parse().unwrap())
                .collect(),
            plain_all: false,
        };
        let s = m.nft_script();
        assert!(
            s.contains(
                "\tset plain4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\tauto-merge\n\t\telements = { 10.0.0.2, 10.65.0.0/24, 10.65.1.0/24 }\n\t}\n"
            ),
            "{s}"
        );
        assert!(!s.contains("plain6"), "{s}");
        // prerouting, output and the strict chain's exemption
        assert_eq!(
            s.matches("ip daddr @plain4 meta mark set").count(),
            2,
            "{s}"
        );
        assert_eq!(s.matches("ip saddr @plain4 return").count(), 1, "{s}");
        assert!(!s.contains("10.65.0.0/24 meta"), "{s}");
        m.plain_destinations.push("fd10::/120".parse().unwrap());
        let s = m.nft_script();
        assert!(s.contains("type ipv6_addr"), "{s}");
        assert!(s.contains("ip6 daddr @plain6 meta mark set"), "{s}");
        m.plain_destinations.clear();
        assert!(!m.nft_script().contains("set plain"));
    }
}
