//! A big mesh for the tests of big configurations (the fake kernel's and the real ones').

use wgmesh_core::{Cluster, MeshConfig, Node, NodeWireGuard, PrivateKey, RouteSource};

use crate::common::key;

/// Node `a` and `peers` other nodes, routed by workload IPs: the first with `ips_of_first`
/// of them (one peer with many allowed IPs), the others with one each.
pub(crate) fn big_cluster(peers: usize, ips_of_first: usize) -> Cluster {
    let mut mesh = MeshConfig::default();
    mesh.route_source = RouteSource::WorkloadIps;
    let mut nodes = vec![
        Node::new("a")
            .with_addresses(["10.0.0.1".parse().unwrap()])
            .with_wireguard(NodeWireGuard::new(Some(key(1).public_key()), None)),
    ];
    for i in 0..peers {
        let mut b = [0u8; 32];
        b[1..9].copy_from_slice(&(i as u64 + 100).to_le_bytes());
        b[31] = 0x40;
        let k = PrivateKey::from_bytes(b).unwrap().public_key();
        let n = i as u32 + 2;
        let ips: Vec<std::net::IpAddr> = if i == 0 {
            (0..ips_of_first as u32)
                .map(|j| std::net::Ipv4Addr::from(0x6400_0000 + j).into())
                .collect()
        } else {
            vec![std::net::Ipv4Addr::from(0x6500_0000 + n).into()]
        };
        nodes.push(
            Node::new(format!("n{i}"))
                .with_addresses([std::net::Ipv4Addr::from(0x0a00_0000 + n).into()])
                .with_wireguard(NodeWireGuard::new(Some(k), None))
                .with_workload_ips(ips),
        );
    }
    Cluster::new(mesh, nodes).unwrap()
}
