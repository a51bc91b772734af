//! Random clusters for the property tests: small shapes that proptest shrinks well, built
//! into clusters with unique addresses, borrowed workload addresses, plain nodes, duplicate
//! keys, dual stack and every mesh option that changes routing.

#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;
use wgmesh_core::{
    Cluster, Family, MeshConfig, Node, NodeWireGuard, Phase, PublicKey, RouteSource,
};

/// Up to this many nodes; names come from a fixed pool so removed nodes can come back.
pub const MAX_NODES: usize = 6;

pub fn key(i: u8) -> PublicKey {
    PublicKey::from_bytes([i.wrapping_add(1); 32]).unwrap()
}

#[derive(Debug, Clone)]
pub struct NodeShape {
    /// 0: no WireGuard settings; 1: present but disabled; 2..: enabled.
    pub wg: u8,
    /// Index into a pool of 12 keys (small, so that duplicates happen).
    pub key: Option<u8>,
    pub key6: Option<u8>,
    pub v6: bool,
    pub mtu: u32,
    /// Own pods (index in own block) and borrowed pods (index into another node's block).
    pub own_pods: Vec<u8>,
    pub borrowed: Vec<(u8, u8)>,
    pub v6_pods: Vec<u8>,
    pub extra_block: bool,
    /// 0: active (most of the time), 1: joining, 2: leaving (only with WireGuard settings).
    pub phase: u8,
}

#[derive(Debug, Clone)]
pub struct ClusterShape {
    pub nodes: Vec<NodeShape>,
    pub workload_ips: bool,
    pub host_encryption: bool,
    pub keepalive: Option<u16>,
    pub fixed_mtu: Option<u32>,
}

impl ClusterShape {
    /// `n` nodes, all with WireGuard and distinct keys, IPv4 only, 1500-byte underlay, and
    /// `pods` own workload addresses each.
    pub fn uniform(n: u8, pods: &[u8], workload_ips: bool, host_encryption: bool) -> Self {
        Self {
            nodes: (0..n)
                .map(|i| NodeShape {
                    wg: 2,
                    key: Some(i),
                    key6: None,
                    v6: false,
                    mtu: 1500,
                    own_pods: pods.to_vec(),
                    borrowed: vec![],
                    v6_pods: vec![],
                    extra_block: false,
                    phase: 0,
                })
                .collect(),
            workload_ips,
            host_encryption,
            keepalive: None,
            fixed_mtu: None,
        }
    }
}

pub fn node_shape() -> impl Strategy<Value = NodeShape> {
    (
        0u8..6,
        proptest::option::weighted(0.9, 0u8..12),
        proptest::option::weighted(0.8, 0u8..12),
        any::<bool>(),
        prop_oneof![Just(1500u32), Just(1400), Just(9000), Just(1420)],
        proptest::collection::vec(0u8..60, 0..4),
        proptest::collection::vec((0u8..8, 0u8..4), 0..3),
        proptest::collection::vec(0u8..60, 0..3),
        any::<bool>(),
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
    )
        .prop_map(
            |(wg, key, key6, v6, mtu, own_pods, borrowed, v6_pods, extra_block, phase)| NodeShape {
                wg,
                key,
                key6,
                v6,
                mtu,
                own_pods,
                borrowed,
                v6_pods,
                extra_block,
                phase,
            },
        )
}

pub fn cluster_shape() -> impl Strategy<Value = ClusterShape> {
    (
        proptest::collection::vec(node_shape(), 1..=MAX_NODES),
        any::<bool>(),
        any::<bool>(),
        proptest::option::weighted(0.2, 1u16..60),
        proptest::option::weighted(0.1, prop_oneof![Just(1300u32), Just(1380)]),
    )
        .prop_map(
            |(nodes, workload_ips, host_encryption, keepalive, fixed_mtu)| ClusterShape {
                nodes,
                workload_ips,
                host_encryption,
                keepalive,
                fixed_mtu,
            },
        )
}

/// The phase a shape's number stands for.
pub fn phase(p: u8) -> Phase {
    match p {
        1 => Phase::Joining,
        2 => Phase::Leaving,
        _ => Phase::Active,
    }
}

/// The type of a plan's route to `dest`, if it has one.
pub fn route(plan: &wgmesh_core::NodePlan, dest: &str) -> Option<wgmesh_core::RouteType> {
    let dest: IpNet = dest.parse().unwrap();
    plan.routes
        .iter()
        .find(|r| r.destination == dest)
        .map(|r| r.kind)
}

pub fn name(i: usize) -> String {
    format!("node-{i}")
}

pub fn mesh(shape: &ClusterShape) -> MeshConfig {
    let mut mesh = MeshConfig::default();
    mesh.route_source = if shape.workload_ips {
        RouteSource::WorkloadIps
    } else {
        RouteSource::CidrBlocks
    };
    mesh.host_encryption = shape.host_encryption;
    mesh.persistent_keepalive = shape.keepalive;
    mesh.mtu = shape.fixed_mtu;
    mesh
}

/// Node `i`'s IPv4 block is 10.i.0.0/24 (and 10.i.1.0/24 with `extra_block`); its IPv6
/// block fd10:i::/64. Own pods are 10.i.0.(2+k); the pod that node `i` borrows from node
/// `j` with index `k` is 10.j.0.(100 + 4i + k), so no address is used twice.
pub fn node(i: usize, shape: &NodeShape, n: usize) -> Node {
    let mut node = Node::new(name(i)).with_underlay_mtu(shape.mtu);
    node.addresses
        .push(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1 + i as u8)));
    if shape.v6 {
        node.addresses.push(IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            0,
            1 + i as u16,
        )));
    }
    if shape.v6 && shape.mtu < 1360 {
        node.underlay_mtu = 1500;
    }
    node.wireguard = match shape.wg {
        0 => None,
        1 => {
            let mut wg = NodeWireGuard::new(shape.key.map(key), None);
            wg.enabled = false;
            Some(wg)
        }
        _ => Some(NodeWireGuard::new(
            shape.key.map(key),
            shape.key6.map(|k| key(k + 100)),
        )),
    };
    if let Some(wg) = node.wireguard.as_mut() {
        wg.phase = phase(shape.phase);
    }
    node.pod_cidrs
        .push(format!("10.{i}.0.0/24").parse().unwrap());
    if shape.extra_block {
        node.pod_cidrs
            .push(format!("10.{i}.1.0/24").parse().unwrap());
    }
    if shape.v6 {
        node.pod_cidrs
            .push(format!("fd10:{i}::/64").parse::<IpNet>().unwrap());
    }
    let mut pods: Vec<IpAddr> = shape
        .own_pods
        .iter()
        .map(|k| IpAddr::V4(Ipv4Addr::new(10, i as u8, 0, 2 + k)))
        .collect();
    for (j, k) in &shape.borrowed {
        let j = *j as usize % n.max(1);
        if j != i {
            pods.push(IpAddr::V4(Ipv4Addr::new(
                10,
                j as u8,
                0,
                100 + 4 * i as u8 + k,
            )));
        }
    }
    if shape.v6 {
        pods.extend(shape.v6_pods.iter().map(|k| {
            IpAddr::V6(Ipv6Addr::new(
                0xfd10,
                i as u16,
                0,
                0,
                0,
                0,
                0,
                2 + u16::from(*k),
            ))
        }));
    }
    pods.sort();
    pods.dedup();
    node.workload_ips = pods;
    node
}

pub fn build(shape: &ClusterShape) -> Cluster {
    let n = shape.nodes.len();
    let nodes = shape
        .nodes
        .iter()
        .enumerate()
        .map(|(i, s)| node(i, s, n))
        .collect();
    Cluster::new(mesh(shape), nodes).unwrap()
}

/// Whether traffic from node `a` to node `b` goes through the tunnel: both take part, `a` is
/// not joining and `b` is neither joining nor leaving (the phases' table on
/// `wgmesh_core::Phase`); otherwise it goes plain, and `b` still accepts it.
pub fn encrypts(cluster: &Cluster, a: &Node, b: &Node, family: Family) -> bool {
    takes_part(cluster, a, family)
        && takes_part(cluster, b, family)
        && a.phase() != Phase::Joining
        && b.phase() == Phase::Active
}

/// Whether a node takes part in a family: computed here from first principles, not by the
/// planner under test.
pub fn takes_part(cluster: &Cluster, node: &Node, family: Family) -> bool {
    let Some(k) = node.key(family) else {
        return false;
    };
    cluster.mesh().enabled
        && node.address(family).is_some()
        && cluster
            .nodes()
            .iter()
            .filter(|n| n.key(family) == Some(k))
            .count()
            == 1
}

/// The trust settings a test may vary: which `cluster_cidrs`, minimum prefix lengths,
/// per-node limits (small ones, so that they bite), and the MTU floor.
#[derive(Debug, Clone)]
pub struct TrustShape {
    /// 0: none; 1: the test clusters' IPv4 ranges; 2: only 10.0.0.0/13 (node addresses and
    /// nodes 8 and up outside); 3: both families' ranges.
    pub cidrs: u8,
    pub min_prefix: Option<(u8, u8)>,
    pub limits: Option<(usize, usize, usize)>,
    pub mtu_floor: u32,
}

/// Any trust settings, including ones that refuse or cut the nodes' own claims.
pub fn trust_shape() -> impl Strategy<Value = TrustShape> {
    trust_with((16u8..=26, 48u8..=96), (1usize..3, 1usize..3, 1usize..5))
}

/// Trust settings with prefix bounds and limits drawn from these.
pub fn trust_with(
    min_prefix: impl Strategy<Value = (u8, u8)>,
    limits: impl Strategy<Value = (usize, usize, usize)>,
) -> impl Strategy<Value = TrustShape> {
    (
        0u8..4,
        proptest::option::weighted(0.3, min_prefix),
        proptest::option::weighted(0.3, limits),
        prop_oneof![Just(1280u32), Just(576), Just(1400)],
    )
        .prop_map(|(cidrs, min_prefix, limits, mtu_floor)| TrustShape {
            cidrs,
            min_prefix,
            limits,
            mtu_floor,
        })
}

/// At least 256 cases, more with `PROPTEST_CASES`.
pub fn proptest_config() -> ProptestConfig {
    ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256)
            .max(256),
    )
}

impl TrustShape {
    pub fn apply(&self, mesh: &mut MeshConfig) {
        let nets = |list: &[&str]| list.iter().map(|s| s.parse().unwrap()).collect();
        mesh.cluster_cidrs = match self.cidrs {
            0 => Vec::new(),
            1 => nets(&["10.0.0.0/8", "192.168.0.0/16"]),
            2 => nets(&["10.0.0.0/13"]),
            _ => nets(&["10.0.0.0/8", "192.168.0.0/16", "fd00::/8"]),
        };
        if let Some((v4, v6)) = self.min_prefix {
            mesh.min_prefix_len = v4;
            mesh.min_prefix_len_v6 = v6;
        }
        if let Some((a, b, w)) = self.limits {
            mesh.max_node_addresses = a;
            mesh.max_node_pod_cidrs = b;
            mesh.max_node_workload_ips = w;
        }
        mesh.mtu_floor = self.mtu_floor;
    }
}

/// Workload addresses a hostile node reports, about victim node `v`.
pub const HOSTILE_PODS: u8 = 13;

pub fn hostile_pod(p: u8, v: usize) -> IpAddr {
    let v8 = v as u8;
    let ip = match p {
        0 => format!("192.168.0.{}", 1 + v),
        1 => format!("10.{v8}.0.2"),
        2 => "8.8.8.8".into(),
        3 => "169.254.169.254".into(),
        4 => "168.63.129.16".into(),
        5 => "127.0.0.1".into(),
        6 => "224.0.0.1".into(),
        7 => "255.255.255.255".into(),
        8 => "0.0.0.0".into(),
        9 => format!("fd00::{:x}", 1 + v),
        10 => "fe80::1".into(),
        11 => format!("10.{v8}.0.200"),
        _ => "10.200.0.1".into(),
    };
    ip.parse().unwrap()
}

/// Blocks a hostile node claims, about victim node `v`.
pub const HOSTILE_BLOCKS: u8 = 12;

pub fn hostile_block(p: u8, v: usize) -> IpNet {
    let net = match p {
        0 => "0.0.0.0/0".to_owned(),
        1 => "10.0.0.0/8".into(),
        2 => format!("10.{v}.0.0/25"),
        3 => format!("10.{v}.0.0/24"),
        4 => format!("10.{v}.0.0/23"),
        5 => "192.168.0.0/24".into(),
        6 => "169.254.0.0/16".into(),
        7 => "10.0.0.0/12".into(),
        8 => format!("fd10:{v:x}::/80"),
        9 => "fd10::/32".into(),
        10 => format!("fd10:{v:x}::/64"),
        _ => format!("10.{v}.0.5/32"),
    };
    net.parse::<IpNet>().unwrap().trunc()
}

/// Addresses a hostile node publishes as its own, about victim node `v`.
pub const HOSTILE_ADDRESSES: u8 = 6;

pub fn hostile_address(p: u8, v: usize) -> IpAddr {
    let ip = match p {
        0 => format!("192.168.0.{}", 1 + v),
        1 => format!("10.{v}.0.2"),
        2 => "169.254.169.254".into(),
        3 => format!("10.{v}.0.77"),
        4 => format!("fd00::{:x}", 1 + v),
        _ => "8.8.8.8".into(),
    };
    ip.parse().unwrap()
}
