//! A synthetic cluster of the size the benchmarks use: Azure CNI style (`workload_ips`),
//! host encryption, every node with WireGuard and `pods` workload addresses.
//! Shared by `benches/plan.rs` and `examples/scale.rs` (keys differ above the clamped bits).

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};

use wgmesh::core::{Cluster, MeshConfig, Node, NodeWireGuard, PrivateKey, RouteSource};

/// Node `i`'s underlay address: 10.(i / 250).(i % 250).1 — pods follow it in the same /24.
pub(crate) fn node_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, (i / 250) as u8, (i % 250) as u8, 1))
}

/// Pod `k` of node `i`.
pub(crate) fn pod_addr(i: usize, k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        (i / 250) as u8,
        (i % 250) as u8,
        2 + k as u8,
    ))
}

pub(crate) fn name(i: usize) -> String {
    format!("aks-nodepool1-00000000-vmss{i:06}")
}

pub(crate) fn cluster(nodes: usize, pods: usize) -> Cluster {
    assert!(pods <= 250, "pods per node must fit a /24");
    let mut mesh = MeshConfig::default();
    mesh.route_source = RouteSource::WorkloadIps;
    mesh.host_encryption = true;
    let mut rng_seed = [7u8; 32];
    let nodes = (0..nodes)
        .map(|i| {
            rng_seed[1..9].copy_from_slice(&(i as u64).to_le_bytes());
            let key = PrivateKey::from_bytes(rng_seed)
                .expect("non-zero")
                .public_key();
            Node::new(name(i))
                .with_addresses([node_addr(i)])
                .with_wireguard(NodeWireGuard::new(Some(key), None))
                .with_workload_ips((0..pods).map(|k| pod_addr(i, k)))
        })
        .collect();
    Cluster::new(mesh, nodes).expect("valid synthetic cluster")
}
