//! The validated cluster model: the mesh settings and the nodes.
//!
//! Values of these types are typed (addresses, CIDRs and keys are parsed), and a [`Cluster`]
//! can only be built through validation, so the planner never meets a name twice, a block
//! with host bits, or an MTU the tunnel cannot carry. The text form lives in [`crate::spec`].

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Problem};
use crate::key::PublicKey;

/// An IP family. Each family has its own WireGuard interface, peers, routes and rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    /// IPv4.
    #[serde(rename = "ipv4")]
    V4,
    /// IPv6.
    #[serde(rename = "ipv6")]
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// The family of a network.
    pub fn of_net(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Self::V4,
            IpNet::V6(_) => Self::V6,
        }
    }

    /// Bytes WireGuard adds to each packet when this family carries the tunnel:
    /// outer IP header (20 or 40) + UDP (8) + WireGuard data header (16) + authentication tag (16).
    pub fn wireguard_overhead(self) -> u32 {
        match self {
            Self::V4 => 60,
            Self::V6 => 80,
        }
    }

    /// The smallest MTU the family's inner packets may be given: 576 for IPv4 (the size every
    /// host must accept), 1280 for IPv6 (RFC 8200).
    pub fn min_mtu(self) -> u32 {
        match self {
            Self::V4 => 576,
            Self::V6 => 1280,
        }
    }

    /// The host prefix length: 32 or 128.
    pub fn host_prefix_len(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    /// `0` for IPv4 and `1` for IPv6, for per-family arrays.
    pub fn index(self) -> usize {
        match self {
            Self::V4 => 0,
            Self::V6 => 1,
        }
    }

    /// `"ipv4"` or `"ipv6"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The host prefix (`/32` or `/128`) of an address.
pub fn host_net(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// Where the destinations behind a node come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RouteSource {
    /// IPAM blocks affine to the node (`pod_cidrs`), plus a host route for each workload IP
    /// that lies outside the node's own blocks (a borrowed address).
    #[default]
    CidrBlocks,
    /// One host route per workload IP: Azure CNI and other CNIs that give pods addresses of
    /// the underlay network, without per-node blocks.
    WorkloadIps,
}

impl RouteSource {
    /// The text form: `cidr_blocks` or `workload_ips`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CidrBlocks => "cidr_blocks",
            Self::WorkloadIps => "workload_ips",
        }
    }
}

/// Cluster-wide mesh settings. [`MeshConfig::default`] gives Calico's defaults.
///
/// ```
/// use wgmesh_core::{MeshConfig, RouteSource};
/// let mut mesh = MeshConfig::default();
/// mesh.route_source = RouteSource::WorkloadIps;
/// mesh.host_encryption = true;
/// assert_eq!(mesh.interface_name, "wireguard.cali");
/// assert_eq!(mesh.firewall_mark, 0x100000);
/// mesh.validate()?;
/// # Ok::<(), wgmesh_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "crate::spec::MeshSpec")]
#[non_exhaustive]
pub struct MeshConfig {
    /// Whether the mesh exists at all. `false` plans nothing, so appliers remove everything.
    pub enabled: bool,
    /// The IPv4 WireGuard interface.
    pub interface_name: String,
    /// The IPv6 WireGuard interface.
    pub interface_name_v6: String,
    /// The UDP port of the IPv4 interface, on every node.
    pub listen_port: u16,
    /// The UDP port of the IPv6 interface, on every node.
    pub listen_port_v6: u16,
    /// The mark WireGuard puts on its own UDP packets; also the mask of the policy rule.
    pub firewall_mark: u32,
    /// The routing table that holds the mesh routes (same number in both families).
    pub routing_table: u32,
    /// The priority of the policy rule that sends unmarked traffic to the mesh table.
    pub rule_priority: u32,
    /// Where each node's destinations come from.
    pub route_source: RouteSource,
    /// Encrypt host-to-host traffic too (node addresses become allowed IPs).
    pub host_encryption: bool,
    /// A fixed MTU for the WireGuard interfaces; `None` computes it from the underlay.
    pub mtu: Option<u32>,
    /// WireGuard persistent keepalive, in seconds; `None` turns it off.
    pub persistent_keepalive: Option<u16>,
    /// Interfaces whose names start with this lead to local workloads (`cali` matches `cali*`).
    pub workload_interface_prefix: String,
    /// TCP endpoints (the Kubernetes API server) that host traffic always reaches outside the
    /// tunnel, in both directions, when host encryption is on. A node whose key its peers do
    /// not know yet (after a reboot that lost the key, say) can then still reach the API
    /// server to publish its new key; without this, the API server's replies would be
    /// encrypted to the old key and the node would be locked out. The API server's traffic
    /// is protected by TLS either way.
    pub control_plane_endpoints: Vec<SocketAddr>,
    /// The ranges that hold the cluster's addresses: the pod pools, plus the node subnet when
    /// host encryption is on (on AKS with Azure CNI, the VNet subnet holds both). In a family
    /// that has at least one range here, a node's claim outside them is refused (see
    /// [`crate::claims`]). A family without one accepts any address that is not refused for
    /// another reason, and [`crate::diagnostics`] reports that it is unprotected.
    pub cluster_cidrs: Vec<IpNet>,
    /// The shortest IPv4 prefix a node may claim (a block shorter than this is refused).
    pub min_prefix_len: u8,
    /// The shortest IPv6 prefix a node may claim.
    pub min_prefix_len_v6: u8,
    /// The smallest WireGuard MTU that a node's published underlay MTU may pull the mesh down
    /// to. A node whose underlay MTU minus the tunnel overhead is below it is an outlier: the
    /// automatic MTU of the other nodes ignores it, and a finding names it.
    pub mtu_floor: u32,
    /// At most this many addresses of a node count (the first ones, in the node's order).
    pub max_node_addresses: usize,
    /// At most this many IPAM blocks of a node count (the smallest ones).
    pub max_node_pod_cidrs: usize,
    /// At most this many workload addresses of a node count (the smallest ones).
    pub max_node_workload_ips: usize,
    /// Strict mode: rather drop than send in plaintext between WireGuard nodes. Every node
    /// that is not explicitly plain ([`Node::explicitly_plain`]) is expected to encrypt: the
    /// destinations of one that does not take part, and destinations claimed by several
    /// nodes, get blackhole routes instead of throw routes; unknown addresses inside
    /// `cluster_cidrs` are blackholed until a node claims them; and an ingress filter drops
    /// plaintext that arrives from the underlay with a participating peer's source (see
    /// [`crate::plan`]). Default `false` (Calico's behaviour: fall back to plaintext).
    pub strict_mode: bool,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interface_name: "wireguard.cali".into(),
            interface_name_v6: "wg-v6.cali".into(),
            listen_port: 51820,
            listen_port_v6: 51821,
            firewall_mark: 0x0010_0000,
            routing_table: 1,
            rule_priority: 99,
            route_source: RouteSource::CidrBlocks,
            host_encryption: false,
            mtu: None,
            persistent_keepalive: None,
            workload_interface_prefix: "cali".into(),
            control_plane_endpoints: Vec::new(),
            cluster_cidrs: Vec::new(),
            min_prefix_len: DEFAULT_MIN_PREFIX_LEN,
            min_prefix_len_v6: DEFAULT_MIN_PREFIX_LEN_V6,
            mtu_floor: DEFAULT_MTU_FLOOR,
            max_node_addresses: DEFAULT_MAX_NODE_ADDRESSES,
            max_node_pod_cidrs: DEFAULT_MAX_NODE_POD_CIDRS,
            max_node_workload_ips: DEFAULT_MAX_NODE_WORKLOAD_IPS,
            strict_mode: false,
        }
    }
}

/// Default [`MeshConfig::min_prefix_len`]: per-node IPv4 blocks are /24 (kubeadm), /26
/// (Calico) or longer; a /16 is already far more than one node's pods.
pub const DEFAULT_MIN_PREFIX_LEN: u8 = 16;
/// Default [`MeshConfig::min_prefix_len_v6`]: per-node IPv6 blocks are /64, /80 or /122.
pub const DEFAULT_MIN_PREFIX_LEN_V6: u8 = 48;
/// Default [`MeshConfig::mtu_floor`]: the IPv6 minimum MTU, so that by default no underlay
/// below 1340 (IPv4) or 1360 (IPv6) bytes lowers the mesh.
pub const DEFAULT_MTU_FLOOR: u32 = 1280;
/// Default [`MeshConfig::max_node_addresses`].
pub const DEFAULT_MAX_NODE_ADDRESSES: usize = 32;
/// Default [`MeshConfig::max_node_pod_cidrs`].
pub const DEFAULT_MAX_NODE_POD_CIDRS: usize = 256;
/// Default [`MeshConfig::max_node_workload_ips`]: room for dual-stack nodes with well over a
/// thousand pods.
pub const DEFAULT_MAX_NODE_WORKLOAD_IPS: usize = 4096;
/// Largest value accepted for the per-node limits.
pub const MAX_NODE_LIMIT: usize = 1 << 20;

/// Largest MTU accepted for a WireGuard interface: an IPv6 outer packet must still fit 65535.
pub const MAX_MTU: u32 = 65535 - 80;
/// Largest underlay MTU accepted.
pub const MAX_UNDERLAY_MTU: u32 = 65535;

impl MeshConfig {
    /// The interface name of a family.
    pub fn interface(&self, family: Family) -> &str {
        match family {
            Family::V4 => &self.interface_name,
            Family::V6 => &self.interface_name_v6,
        }
    }

    /// Both families' interface names, shared, by [`Family::index`]: what planned routes
    /// name as their device.
    pub(crate) fn devices(&self) -> [Arc<str>; 2] {
        Family::ALL.map(|f| Arc::from(self.interface(f)))
    }

    /// The listening port of a family's interface.
    pub fn port(&self, family: Family) -> u16 {
        match family {
            Family::V4 => self.listen_port,
            Family::V6 => self.listen_port_v6,
        }
    }

    /// The shortest prefix a node may claim in a family.
    pub fn min_prefix(&self, family: Family) -> u8 {
        match family {
            Family::V4 => self.min_prefix_len,
            Family::V6 => self.min_prefix_len_v6,
        }
    }

    /// The smallest underlay MTU that counts for the mesh MTU in a family: the MTU floor (at
    /// least the family's minimum) plus the tunnel overhead. 1340 for IPv4 and 1360 for IPv6
    /// by default.
    ///
    /// ```
    /// use wgmesh_core::{Family, MeshConfig};
    /// assert_eq!(MeshConfig::default().underlay_mtu_floor(Family::V4), 1340);
    /// assert_eq!(MeshConfig::default().underlay_mtu_floor(Family::V6), 1360);
    /// ```
    pub fn underlay_mtu_floor(&self, family: Family) -> u32 {
        self.mtu_floor.max(family.min_mtu()) + family.wireguard_overhead()
    }

    /// Whether a family's claims are limited to [`MeshConfig::cluster_cidrs`].
    pub fn restricts(&self, family: Family) -> bool {
        self.cluster_cidrs
            .iter()
            .any(|c| Family::of_net(c) == family)
    }

    /// Checks every setting on its own; [`Cluster::new`] also checks them against the nodes.
    pub fn validate(&self) -> Result<(), Error> {
        check_interface_name("interface_name", &self.interface_name, false)?;
        check_interface_name("interface_name_v6", &self.interface_name_v6, false)?;
        check_interface_name(
            "workload_interface_prefix",
            &self.workload_interface_prefix,
            true,
        )?;
        if self.interface_name == self.interface_name_v6 {
            return Err(Error::mesh(
                "interface_name_v6",
                Some(self.interface_name_v6.clone()),
                Problem::MustDiffer("interface_name"),
            ));
        }
        for (field, name) in [
            ("interface_name", &self.interface_name),
            ("interface_name_v6", &self.interface_name_v6),
        ] {
            if name.starts_with(&self.workload_interface_prefix) {
                return Err(Error::mesh(
                    field,
                    Some(name.clone()),
                    Problem::InvalidInterfaceName(
                        "starts with workload_interface_prefix, so it would be taken for a workload interface",
                    ),
                ));
            }
        }
        for (field, port) in [
            ("listen_port", self.listen_port),
            ("listen_port_v6", self.listen_port_v6),
        ] {
            if port == 0 {
                return Err(Error::mesh(
                    field,
                    Some("0".into()),
                    Problem::OutOfRange { min: 1, max: 65535 },
                ));
            }
        }
        if self.listen_port == self.listen_port_v6 {
            return Err(Error::mesh(
                "listen_port_v6",
                Some(self.listen_port_v6.to_string()),
                Problem::MustDiffer("listen_port (each WireGuard interface binds its own port)"),
            ));
        }
        if self.firewall_mark == 0 {
            return Err(Error::mesh(
                "firewall_mark",
                Some("0".into()),
                Problem::Reserved(
                    "0 means no mark; WireGuard's packets would loop into the mesh table",
                ),
            ));
        }
        match self.routing_table {
            0 | 253..=255 => {
                return Err(Error::mesh(
                    "routing_table",
                    Some(self.routing_table.to_string()),
                    Problem::Reserved(
                        "0, 253 (default), 254 (main) and 255 (local) are the kernel's tables",
                    ),
                ));
            }
            _ => {}
        }
        if !(1..=32765).contains(&self.rule_priority) {
            return Err(Error::mesh(
                "rule_priority",
                Some(self.rule_priority.to_string()),
                Problem::OutOfRange { min: 1, max: 32765 },
            ));
        }
        if let Some(mtu) = self.mtu
            && !(Family::V4.min_mtu()..=MAX_MTU).contains(&mtu)
        {
            return Err(Error::mesh(
                "mtu",
                Some(mtu.to_string()),
                Problem::OutOfRange {
                    min: Family::V4.min_mtu().into(),
                    max: MAX_MTU.into(),
                },
            ));
        }
        if self.persistent_keepalive == Some(0) {
            return Err(Error::mesh(
                "persistent_keepalive",
                Some("0".into()),
                Problem::OutOfRange { min: 1, max: 65535 },
            ));
        }
        for (i, cidr) in self.cluster_cidrs.iter().enumerate() {
            let field = || format!("cluster_cidrs[{i}]");
            if cidr.trunc() != *cidr {
                return Err(Error::mesh(
                    field(),
                    Some(cidr.to_string()),
                    Problem::HostBitsSet {
                        canonical: cidr.trunc().to_string(),
                    },
                ));
            }
            if cidr.prefix_len() == 0 {
                return Err(Error::mesh(
                    field(),
                    Some(cidr.to_string()),
                    Problem::Reserved(
                        "a /0 would accept every address; leave cluster_cidrs without this family instead",
                    ),
                ));
            }
        }
        in_range("min_prefix_len", self.min_prefix_len.into(), 1, 32)?;
        in_range("min_prefix_len_v6", self.min_prefix_len_v6.into(), 1, 128)?;
        in_range(
            "mtu_floor",
            self.mtu_floor.into(),
            Family::V4.min_mtu().into(),
            MAX_MTU.into(),
        )?;
        for (field, limit) in [
            ("max_node_addresses", self.max_node_addresses),
            ("max_node_pod_cidrs", self.max_node_pod_cidrs),
            ("max_node_workload_ips", self.max_node_workload_ips),
        ] {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            in_range(field, limit, 1, MAX_NODE_LIMIT as i64)?;
        }
        Ok(())
    }
}

/// `value` of mesh setting `field` is within `min..=max`.
fn in_range(field: &'static str, value: i64, min: i64, max: i64) -> Result<(), Error> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(Error::mesh(
        field,
        Some(value.to_string()),
        Problem::OutOfRange { min, max },
    ))
}

/// Names that exist on every host or that the kernel reserves in `/proc/sys/net/*/conf`.
const RESERVED_INTERFACE_NAMES: [&str; 3] = ["lo", "all", "default"];

/// Checks a Linux interface name (or, with `prefix`, the start of one) the way the kernel
/// does (1 to 15 bytes, no `/`, `:` or whitespace, not `.` or `..`), and refuses what would
/// be dangerous even though the kernel allows it: a leading `-` (it reaches wireguard-go and
/// ip(8) as an option), quotes, backslashes and `*` (they change the meaning of an nftables
/// match), control characters, and the names of links that wgmesh must never own.
fn check_interface_name(field: &'static str, name: &str, prefix: bool) -> Result<(), Error> {
    let problem = if name.is_empty() {
        Some(Problem::Empty)
    } else if name.len() > 15 {
        Some(Problem::InvalidInterfaceName("longer than 15 bytes"))
    } else if !prefix && (name == "." || name == "..") {
        Some(Problem::InvalidInterfaceName(
            "\".\" and \"..\" are reserved",
        ))
    } else if name.starts_with('-') {
        Some(Problem::InvalidInterfaceName(
            "starts with '-', so tools would read it as an option",
        ))
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some(Problem::InvalidInterfaceName(
            "contains '/', ':', whitespace or a control character",
        ))
    } else if name.chars().any(|c| matches!(c, '"' | '\\' | '*' | '\'')) {
        Some(Problem::InvalidInterfaceName(
            "contains a quote, a backslash or '*'",
        ))
    } else if !prefix && RESERVED_INTERFACE_NAMES.contains(&name) {
        Some(Problem::InvalidInterfaceName(
            "\"lo\", \"all\" and \"default\" are not wgmesh's to use",
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(Error::mesh(field, Some(name.to_owned()), problem)),
        None => Ok(()),
    }
}

/// Where a node stands in a make-before-break transition of the mesh: joining it, taking
/// part, or leaving it. While a node is joining or leaving, both sides accept both forms of
/// its traffic: its peers keep it as a peer (its allowed IPs included, so its encrypted
/// packets are accepted) and their routes into the tunnel, but send to it in plaintext: the
/// packets are marked ([`crate::Marking::plain_destinations`]), so the policy rule skips
/// the mesh table. The kept route is what lets its encrypted IPv4 packets pass the
/// reverse-path check meanwhile.
///
/// | phase | the node's own plan | its peers' plans |
/// |---|---|---|
/// | `Active` | device, peers, routes into the tunnel | it as a peer, its destinations routed into the tunnel |
/// | `Joining` | device, every peer and route, but every packet marked (sent plain, [`crate::Marking::plain_all`]); no strict ingress filter | it as a peer, its destinations marked (sent plain) |
/// | `Leaving` | unchanged (it still encrypts); strict mode's ingress filter off, so its peers' plaintext arrives | it as a peer, its destinations marked (sent plain) |
///
/// The sequence a node joins by: `Joining` as the node's own view (its agent plans itself
/// joining: device and peers, routes plain), then its peers add it (they see it `Active`,
/// or `Joining` when it is announced), then `Active` on the node too. It leaves by:
/// `Leaving` (the node first, then its peers), then the node's own view `Joining` (it
/// sends plain too), then it drops its device and routes (WireGuard disabled or the node
/// removed, on the node first), then its peers drop it. In every half state an encrypted
/// packet still routes back through the device it arrived on, so IPv4's reverse-path
/// check passes (a WireGuard device has no address, and Linux drops under any enabled
/// `rp_filter` a decrypted packet whose source routes elsewhere; README.md, "Joining and
/// leaving in phases").
///
/// A node's phase is its own claim and untrusted like the rest: it can only make traffic
/// *to that node* go plain, which the node could do anyway by disabling WireGuard; it never
/// changes how other nodes' destinations are routed, and in strict mode a leaving node
/// counts as explicitly plain only for its own destinations.
///
/// ```
/// use wgmesh_core::{Phase, spec::parse_cluster, plan_node, RouteType};
/// let cluster = parse_cluster(r#"{"mesh": {"route_source": "workload_ips"}, "nodes": [
///   {"name": "a", "addresses": ["10.0.0.1"], "workload_ips": ["10.0.0.10"],
///    "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
///   {"name": "b", "addresses": ["10.0.0.2"], "workload_ips": ["10.0.0.20"],
///    "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=",
///                  "phase": "leaving"}}]}"#)?;
/// assert_eq!(cluster.node("b").unwrap().phase(), Phase::Leaving);
/// let plan = plan_node(&cluster, "a")?;
/// // b stays a peer with its allowed IPs (its encrypted packets are accepted) ...
/// assert_eq!(plan.interfaces[0].peers[0].allowed_ips, ["10.0.0.20/32".parse()?]);
/// // ... and its route, but a sends to it in plaintext (the packets are marked).
/// assert_eq!(plan.routes[1].kind, RouteType::Unicast);
/// assert_eq!(plan.marking.unwrap().plain_destinations, ["10.0.0.20/32".parse()?]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Taking part: encrypted both ways.
    #[default]
    Active,
    /// Joining: the node programs its device and peers but still routes plain.
    Joining,
    /// Leaving: its peers route to it plain and still accept its encrypted packets.
    Leaving,
}

impl Phase {
    /// The phase's name as written in a cluster description (`active`, `joining`,
    /// `leaving`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Joining => "joining",
            Self::Leaving => "leaving",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's WireGuard settings. A node without them is plain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeWireGuard {
    /// Whether WireGuard runs on the node.
    pub enabled: bool,
    /// The public key of its IPv4 interface.
    pub public_key: Option<PublicKey>,
    /// The public key of its IPv6 interface.
    pub public_key_v6: Option<PublicKey>,
    /// Its phase in a join or a leave ([`Phase`]); `Active` outside one.
    #[serde(default, skip_serializing_if = "is_active")]
    pub phase: Phase,
}

fn is_active(phase: &Phase) -> bool {
    *phase == Phase::Active
}

impl NodeWireGuard {
    /// WireGuard enabled with these keys.
    pub fn new(public_key: Option<PublicKey>, public_key_v6: Option<PublicKey>) -> Self {
        Self {
            enabled: true,
            public_key,
            public_key_v6,
            phase: Phase::Active,
        }
    }

    /// The same settings in another phase.
    pub fn with_phase(mut self, phase: Phase) -> Self {
        self.phase = phase;
        self
    }

    /// The key of a family's interface.
    pub fn key(&self, family: Family) -> Option<PublicKey> {
        match family {
            Family::V4 => self.public_key,
            Family::V6 => self.public_key_v6,
        }
    }

    /// Sets the key of a family's interface.
    pub fn set_key(&mut self, family: Family, key: Option<PublicKey>) {
        match family {
            Family::V4 => self.public_key = key,
            Family::V6 => self.public_key_v6 = key,
        }
    }
}

/// Default underlay MTU of a node.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;

/// One node of the cluster.
///
/// ```
/// use wgmesh_core::{Node, NodeWireGuard, PublicKey};
/// let key: PublicKey = "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=".parse()?;
/// let node = Node::new("node-a")
///     .with_addresses(["10.240.0.4".parse()?])
///     .with_wireguard(NodeWireGuard::new(Some(key), None))
///     .with_workload_ips(["10.240.0.5".parse()?, "10.240.0.6".parse()?]);
/// node.validate()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "crate::spec::NodeSpec")]
#[non_exhaustive]
pub struct Node {
    /// The node's name; unique in the cluster.
    pub name: String,
    /// Underlay addresses; the first of each family is the WireGuard endpoint.
    pub addresses: Vec<IpAddr>,
    /// The MTU of the node's underlay network.
    pub underlay_mtu: u32,
    /// WireGuard on this node; `None` is plain.
    pub wireguard: Option<NodeWireGuard>,
    /// IPAM blocks affine to the node.
    pub pod_cidrs: Vec<IpNet>,
    /// Addresses of the workloads (pods) running on the node.
    pub workload_ips: Vec<IpAddr>,
}

impl Node {
    /// A plain node with no addresses and the default underlay MTU.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            addresses: Vec::new(),
            underlay_mtu: DEFAULT_UNDERLAY_MTU,
            wireguard: None,
            pod_cidrs: Vec::new(),
            workload_ips: Vec::new(),
        }
    }

    /// Sets the underlay addresses.
    pub fn with_addresses(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        self.addresses = addresses.into_iter().collect();
        self
    }

    /// Sets the WireGuard settings.
    pub fn with_wireguard(mut self, wireguard: NodeWireGuard) -> Self {
        self.wireguard = Some(wireguard);
        self
    }

    /// Sets the IPAM blocks.
    pub fn with_pod_cidrs(mut self, cidrs: impl IntoIterator<Item = IpNet>) -> Self {
        self.pod_cidrs = cidrs.into_iter().collect();
        self
    }

    /// Sets the workload addresses.
    pub fn with_workload_ips(mut self, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        self.workload_ips = ips.into_iter().collect();
        self
    }

    /// Sets the underlay MTU.
    pub fn with_underlay_mtu(mut self, mtu: u32) -> Self {
        self.underlay_mtu = mtu;
        self
    }

    /// The first address of a family: the node's WireGuard endpoint in that family.
    pub fn address(&self, family: Family) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| Family::of(a) == family)
    }

    /// Whether WireGuard is enabled on the node.
    pub fn wireguard_enabled(&self) -> bool {
        self.wireguard.as_ref().is_some_and(|w| w.enabled)
    }

    /// Whether the operator opted the node out of the mesh (`wireguard.enabled: false`): in
    /// strict mode it is the only kind of node that stays reachable in plaintext. A node
    /// without WireGuard settings at all is not explicitly plain.
    ///
    /// ```
    /// use wgmesh_core::{Node, NodeWireGuard};
    /// let mut node = Node::new("a");
    /// assert!(!node.explicitly_plain());
    /// let mut wireguard = NodeWireGuard::new(None, None);
    /// wireguard.enabled = false;
    /// node.wireguard = Some(wireguard);
    /// assert!(node.explicitly_plain());
    /// ```
    pub fn explicitly_plain(&self) -> bool {
        self.wireguard.as_ref().is_some_and(|w| !w.enabled)
    }

    /// The node's phase ([`Phase`]): `Active` for a node without WireGuard settings.
    pub fn phase(&self) -> Phase {
        self.wireguard.as_ref().map_or(Phase::Active, |w| w.phase)
    }

    /// Whether strict mode lets this node's destinations go plain: it is explicitly plain,
    /// or it is leaving the mesh.
    pub fn plain_by_choice(&self) -> bool {
        self.explicitly_plain() || self.phase() == Phase::Leaving
    }

    /// The published key of a family, if WireGuard is enabled.
    pub fn key(&self, family: Family) -> Option<PublicKey> {
        self.wireguard
            .as_ref()
            .filter(|w| w.enabled)
            .and_then(|w| w.key(family))
    }

    /// The smallest underlay MTU a node may declare, given its address families.
    pub fn min_underlay_mtu(&self) -> u32 {
        Family::ALL
            .iter()
            .filter(|f| self.address(**f).is_some())
            .map(|f| f.min_mtu() + f.wireguard_overhead())
            .max()
            .unwrap_or(Family::V4.min_mtu() + Family::V4.wireguard_overhead())
    }

    /// Checks the node on its own (name, MTU, blocks); [`Cluster::new`] checks it in context.
    pub fn validate(&self) -> Result<(), Error> {
        if self.name.is_empty() {
            return Err(Error::node(&self.name, "name", None, Problem::Empty));
        }
        if self.name.len() > 253 || self.name.chars().any(char::is_control) {
            return Err(Error::node(
                &self.name,
                "name",
                None,
                Problem::Syntax(
                    "a node name has at most 253 characters and no control characters".into(),
                ),
            ));
        }
        let min = self.min_underlay_mtu();
        if !(min..=MAX_UNDERLAY_MTU).contains(&self.underlay_mtu) {
            return Err(Error::node(
                &self.name,
                "underlay_mtu",
                Some(self.underlay_mtu.to_string()),
                Problem::Mtu(format!(
                    "must be between {min} and {MAX_UNDERLAY_MTU}: WireGuard needs 60 bytes over IPv4 and 80 over IPv6, and tunnelled packets need at least 576 (IPv4) or 1280 (IPv6)"
                )),
            ));
        }
        for (i, cidr) in self.pod_cidrs.iter().enumerate() {
            if cidr.trunc() != *cidr {
                return Err(Error::node(
                    &self.name,
                    format!("pod_cidrs[{i}]"),
                    Some(cidr.to_string()),
                    Problem::HostBitsSet {
                        canonical: cidr.trunc().to_string(),
                    },
                ));
            }
        }
        Ok(())
    }
}

/// A validated cluster: mesh settings and uniquely named, valid nodes.
///
/// ```
/// use wgmesh_core::{Cluster, MeshConfig, Node};
/// let cluster = Cluster::new(MeshConfig::default(), vec![Node::new("a"), Node::new("b")])?;
/// assert!(cluster.node("b").is_some());
/// assert!(Cluster::new(MeshConfig::default(), vec![Node::new("a"), Node::new("a")]).is_err());
/// # Ok::<(), wgmesh_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "crate::spec::ClusterSpec")]
pub struct Cluster {
    mesh: MeshConfig,
    nodes: Vec<Node>,
    #[serde(skip)]
    index: HashMap<String, usize>,
}

impl Cluster {
    /// Validates the mesh and every node, and checks that names are unique.
    pub fn new(mesh: MeshConfig, nodes: Vec<Node>) -> Result<Self, Error> {
        mesh.validate()?;
        let mut index = HashMap::with_capacity(nodes.len());
        for (i, node) in nodes.iter().enumerate() {
            check_node(&mesh, node)?;
            if let Some(first) = index.insert(node.name.clone(), i) {
                return Err(Error::invalid(
                    crate::error::Location::NodeIndex(i),
                    "name",
                    Some(node.name.clone()),
                    Problem::DuplicateName { first },
                ));
            }
        }
        Ok(Self { mesh, nodes, index })
    }

    /// The mesh settings.
    pub fn mesh(&self) -> &MeshConfig {
        &self.mesh
    }

    /// The nodes, in the order given.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node with this name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.index.get(name).map(|i| &self.nodes[*i])
    }

    /// Replaces the mesh settings, after validating them against the nodes.
    pub fn set_mesh(&mut self, mesh: MeshConfig) -> Result<(), Error> {
        mesh.validate()?;
        for node in &self.nodes {
            check_node(&mesh, node)?;
        }
        self.mesh = mesh;
        Ok(())
    }

    /// Adds a node or replaces the one with the same name.
    pub fn upsert_node(&mut self, node: Node) -> Result<(), Error> {
        check_node(&self.mesh, &node)?;
        match self.index.get(&node.name) {
            Some(i) => self.nodes[*i] = node,
            None => {
                self.index.insert(node.name.clone(), self.nodes.len());
                self.nodes.push(node);
            }
        }
        Ok(())
    }

    /// Removes a node; returns it if it was there.
    pub fn remove_node(&mut self, name: &str) -> Option<Node> {
        let i = self.index.remove(name)?;
        let node = self.nodes.swap_remove(i);
        if let Some(moved) = self.nodes.get(i) {
            self.index.insert(moved.name.clone(), i);
        }
        Some(node)
    }

    /// Takes the cluster apart.
    pub fn into_parts(self) -> (MeshConfig, Vec<Node>) {
        (self.mesh, self.nodes)
    }
}

/// Checks a node on its own and against the mesh settings.
pub(crate) fn check_node(mesh: &MeshConfig, node: &Node) -> Result<(), Error> {
    node.validate()?;
    if let Some(mtu) = mesh.mtu
        && mtu < Family::V6.min_mtu()
        && node.address(Family::V6).is_some()
    {
        return Err(Error::node(
            &node.name,
            "addresses",
            node.address(Family::V6).map(|a| a.to_string()),
            Problem::Mtu(format!(
                "mesh.mtu {mtu} is below 1280, the IPv6 minimum, and this node has an IPv6 address"
            )),
        ));
    }
    Ok(())
}
