//! Strict mode (`mesh.strict_mode`): rather drop than send in plaintext between nodes that
//! should encrypt. A property over random clusters (keys missing, duplicated or malformed —
//! a malformed key never reaches the model, so it is a missing one here —, plain nodes,
//! copied pod addresses, host encryption on and off): the simulator never finds a plaintext
//! flow between two nodes that are not explicitly plain, and every flow to or from an
//! explicitly plain node is delivered. Plus the rules one by one.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;

use common::*;
use proptest::prelude::*;
use wgmesh_core::diagnostics::{Blackholed, Diagnostic, diagnose};
use wgmesh_core::sim::{Drop, Outcome, Simulator, Source};
use wgmesh_core::spec::parse_cluster;
use wgmesh_core::{Cluster, Family, Phase, RouteType, plan_node};

/// The test clusters' ranges: pods 10.0.0.0/8 and fd10::/16, nodes 192.168.0.0/24 and fd00::/64.
fn strict(shape: &ClusterShape, copies: &[(u8, u8, u8)]) -> Cluster {
    let base = build(shape);
    let mut mesh = base.mesh().clone();
    mesh.strict_mode = true;
    mesh.cluster_cidrs = ["10.0.0.0/8", "192.168.0.0/24", "fd10::/16", "fd00::/64"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let mut nodes = base.nodes().to_vec();
    let n = nodes.len();
    // Node `a` copies pod `k` of node `v`: a contested destination.
    for (a, v, k) in copies {
        let (a, v) = (*a as usize % n, *v as usize % n);
        if a == v || nodes[v].workload_ips.is_empty() {
            continue;
        }
        let ip = nodes[v].workload_ips[*k as usize % nodes[v].workload_ips.len()];
        if !nodes[a].workload_ips.contains(&ip) {
            nodes[a].workload_ips.push(ip);
        }
    }
    Cluster::new(mesh, nodes).unwrap()
}

/// Every endpoint with the node it belongs to: pods, and hosts (by family).
fn endpoints(cluster: &Cluster) -> Vec<(Source, IpAddr, usize, bool)> {
    let mut out = Vec::new();
    for (i, n) in cluster.nodes().iter().enumerate() {
        for ip in &n.workload_ips {
            out.push((Source::Pod(*ip), *ip, i, false));
        }
        for family in Family::ALL {
            if let Some(a) = n.address(family) {
                out.push((Source::Host(n.name.clone(), family), a, i, true));
            }
        }
    }
    out
}

/// How many nodes claim an address (as a node address or a workload address), from first
/// principles.
fn claimants(cluster: &Cluster) -> HashMap<IpAddr, usize> {
    let mut count = HashMap::new();
    for n in cluster.nodes() {
        let mut own: Vec<IpAddr> = n.addresses.iter().chain(&n.workload_ips).copied().collect();
        own.sort();
        own.dedup();
        for ip in own {
            *count.entry(ip).or_default() += 1;
        }
    }
    count
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn strict_mode_never_sends_plaintext_between_encrypting_nodes(
        shape in cluster_shape(),
        copies in proptest::collection::vec((0u8..8, 0u8..8, any::<u8>()), 0..3),
    ) {
        let cluster = strict(&shape, &copies);
        let sim = Simulator::from_cluster(&cluster);
        let nodes = cluster.nodes();
        let he = cluster.mesh().host_encryption;
        let claims = claimants(&cluster);
        let all = endpoints(&cluster);
        for (from, src, a, src_host) in &all {
            for (_, dst, b, dst_host) in &all {
                if a == b || Family::of(src) != Family::of(dst) {
                    continue;
                }
                let trace = sim.trace(from.clone(), *dst);
                // The simulator sends a contested pod address from its first owner.
                let a = &nodes
                    .iter()
                    .position(|n| n.addresses.contains(src) || n.workload_ips.contains(src))
                    .unwrap();
                if a == b {
                    continue;
                }
                let (pa, pb) = (nodes[*a].explicitly_plain(), nodes[*b].explicitly_plain());
                // A joining sender routes plain on purpose, and traffic to a joining or
                // leaving node goes plain (`Phase`): the node's own choice, checked below
                // to be delivered.
                let phased = nodes[*a].phase() == Phase::Joining || nodes[*b].phase() != Phase::Active;
                // Host traffic is plain by design without host encryption. A node without
                // WireGuard settings runs no wgmesh (nothing plans its side): what it sends
                // is out of reach, and what others send it is checked with it as receiver.
                let encrypted_class = he || (!*src_host && !*dst_host);
                // A node without an underlay address of the family plans no interface in
                // it (the simulator's underlay still carries its packets; a real one has no
                // address to send them from).
                let sender_runs_wgmesh = nodes[*a].wireguard.is_some()
                    && nodes[*a].address(Family::of(src)).is_some();
                if !pa && !pb && !phased && encrypted_class && sender_runs_wgmesh {
                    prop_assert!(
                        trace.outcome != Outcome::Plain,
                        "{} ({}) → {} ({}) went plain\n{:#?}",
                        src, nodes[*a].name, dst, nodes[*b].name, trace.hops
                    );
                }
                let uncontested = claims[src] == 1 && claims[dst] == 1;
                let family = Family::of(src);
                // A leaving sender still encrypts to peers that route it plain (the half
                // state of a leave, checked step by step in tests/phases.rs).
                let leaving_sender = nodes[*a].phase() == Phase::Leaving;
                if uncontested
                    && !leaving_sender
                    && encrypted_class
                    && encrypts(&cluster, &nodes[*a], &nodes[*b], family)
                {
                    // Strict mode breaks nothing that encrypts.
                    prop_assert_eq!(
                        &trace.outcome, &Outcome::Encrypted,
                        "{} ({}) → {} ({})\n{:#?}", src, nodes[*a].name, dst, nodes[*b].name, trace.hops
                    );
                }
                let both = takes_part(&cluster, &nodes[*a], family) && takes_part(&cluster, &nodes[*b], family);
                let leaving = nodes[*b].phase() == Phase::Leaving;
                if (pa || pb || leaving || (phased && both)) && uncontested && !leaving_sender {
                    prop_assert!(
                        matches!(trace.outcome, Outcome::Plain | Outcome::Encrypted),
                        "{} ({}) → {} ({}) with a plain node was not delivered: {}\n{:#?}",
                        src, nodes[*a].name, dst, nodes[*b].name, trace.outcome, trace.hops
                    );
                }
            }
        }
    }

    /// Plaintext put on the underlay with a participating peer's pod address as source never
    /// reaches a participating node.
    #[test]
    fn spoofed_plaintext_from_a_peer_pod_is_dropped(shape in cluster_shape()) {
        let cluster = strict(&shape, &[]);
        let sim = Simulator::from_cluster(&cluster);
        let nodes = cluster.nodes();
        let claims = claimants(&cluster);
        for (i, victim) in nodes.iter().enumerate() {
            for (j, receiver) in nodes.iter().enumerate() {
                if i == j {
                    continue;
                }
                for src in victim.workload_ips.iter().filter(|ip| claims[*ip] == 1) {
                    let family = Family::of(src);
                    // The receiver routes the victim into the tunnel (neither joins, the victim
                    // does not leave) and has its filter (it is not leaving itself).
                    if !encrypts(&cluster, receiver, victim, family) || receiver.phase() == Phase::Leaving {
                        continue;
                    }
                    for dst in receiver.workload_ips.iter().filter(|d| Family::of(d) == family && claims[*d] == 1) {
                        let trace = sim.inject(&victim.name, *src, *dst).unwrap();
                        prop_assert!(
                            matches!(trace.outcome, Outcome::Dropped(Drop::StrictIngress { .. })),
                            "spoofed {} → {}: {}", src, dst, trace.outcome
                        );
                    }
                }
            }
        }
    }
}

const A: &str = "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=";
const B: &str = "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=";
const C: &str = "hKl+HNs4U8n0NjPMK8t6ZGwADTIR6GEnnA5aHWLJhVQ=";

fn cluster(mesh: &str, nodes: &str) -> Cluster {
    parse_cluster(&format!(r#"{{"mesh": {mesh}, "nodes": [{nodes}]}}"#)).unwrap()
}

/// a and b encrypt; c has the given WireGuard settings; every node has a /24.
fn three(mesh: &str, c_wireguard: &str) -> Cluster {
    cluster(
        mesh,
        &format!(
            r#"{{"name": "a", "addresses": ["10.0.0.1"], "pod_cidrs": ["10.65.1.0/24"], "wireguard": {{"public_key": "{A}"}}}},
               {{"name": "b", "addresses": ["10.0.0.2"], "pod_cidrs": ["10.65.2.0/24"], "wireguard": {{"public_key": "{B}"}}}},
               {{"name": "c", "addresses": ["10.0.0.3"], "pod_cidrs": ["10.65.3.0/24"]{c_wireguard}}}"#
        ),
    )
}

#[test]
fn strict_mode_off_changes_nothing() {
    for c in ["", r#", "wireguard": {"enabled": false}"#] {
        let off = plan_node(&three("{}", c), "a").unwrap();
        let explicit = plan_node(&three(r#"{"strict_mode": false}"#, c), "a").unwrap();
        assert_eq!(off, explicit);
        assert_eq!(route(&off, "10.65.3.0/24"), Some(RouteType::Throw));
        assert!(off.marking.unwrap().strict.is_none());
    }
}

#[test]
fn a_node_without_a_key_is_blackholed_an_explicitly_plain_one_is_not() {
    let strict = r#"{"strict_mode": true}"#;
    for (c, expected) in [
        ("", RouteType::Blackhole),
        (r#", "wireguard": {}"#, RouteType::Blackhole),
        (r#", "wireguard": {"enabled": false}"#, RouteType::Throw),
        (
            &format!(r#", "wireguard": {{"public_key": "{A}"}}"#) as &str,
            RouteType::Blackhole,
        ),
    ] {
        let cluster = three(strict, c);
        let plan = plan_node(&cluster, "b").unwrap();
        assert_eq!(route(&plan, "10.65.3.0/24"), Some(expected), "c{c}");
        // The local node's own block is thrown, not blackholed.
        assert_eq!(route(&plan, "10.65.2.0/24"), Some(RouteType::Throw));
    }
    // With a's key copied by c, a is blackholed too (from b), and the finding says why.
    let cluster = three(
        strict,
        &format!(r#", "wireguard": {{"public_key": "{A}"}}"#),
    );
    let plan = plan_node(&cluster, "b").unwrap();
    assert_eq!(route(&plan, "10.65.1.0/24"), Some(RouteType::Blackhole));
    let found: Vec<String> = diagnose(&cluster).iter().map(|d| d.to_string()).collect();
    assert!(
        found.iter().any(|f| f
            == r#"strict mode drops ipv4 traffic to node "a" (blackhole): it should encrypt but another node publishes the same key"#),
        "{found:#?}"
    );
}

#[test]
fn node_addresses_are_blackholed_only_under_host_encryption() {
    let c = r#", "wireguard": {}"#;
    let plan = plan_node(&three(r#"{"strict_mode": true}"#, c), "a").unwrap();
    assert_eq!(route(&plan, "10.0.0.3/32"), None);
    let plan = plan_node(
        &three(r#"{"strict_mode": true, "host_encryption": true}"#, c),
        "a",
    )
    .unwrap();
    assert_eq!(route(&plan, "10.0.0.3/32"), Some(RouteType::Blackhole));
    assert_eq!(route(&plan, "10.0.0.2/32"), Some(RouteType::Unicast));
}

#[test]
fn unknown_cluster_space_is_blackholed_known_addresses_are_exceptions() {
    let mesh = r#"{"strict_mode": true, "cluster_cidrs": ["10.0.0.0/16", "10.65.0.0/16"],
                   "control_plane_endpoints": ["10.0.0.100:6443"]}"#;
    let cluster = three(mesh, r#", "wireguard": {"enabled": false}"#);
    let mut nodes = cluster.nodes().to_vec();
    nodes[0].workload_ips.push("10.65.1.5".parse().unwrap());
    let cluster = Cluster::new(cluster.mesh().clone(), nodes).unwrap();
    let plan = plan_node(&cluster, "a").unwrap();
    assert_eq!(route(&plan, "10.0.0.0/16"), Some(RouteType::Blackhole));
    assert_eq!(route(&plan, "10.65.0.0/16"), Some(RouteType::Blackhole));
    // Node addresses (no host encryption) and the control plane stay reachable.
    for n in ["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32", "10.0.0.100/32"] {
        assert_eq!(route(&plan, n), Some(RouteType::Throw), "{n}");
    }
    assert_eq!(route(&plan, "10.65.2.0/24"), Some(RouteType::Unicast));
    assert_eq!(route(&plan, "10.65.3.0/24"), Some(RouteType::Throw));
    let sim = Simulator::from_cluster(&cluster);
    let pod = |ip: &str| Source::Pod(ip.parse().unwrap());
    // A pod address nobody has claimed yet: dropped, not plain.
    let nobody = sim.trace(pod("10.65.1.5"), "10.65.9.9".parse().unwrap());
    assert!(
        matches!(nobody.outcome, Outcome::Dropped(Drop::Blackhole { .. })),
        "{:?}",
        nobody
    );
    assert!(
        nobody
            .hops
            .iter()
            .any(|h| h.contains("blackhole 10.65.0.0/16")),
        "{:#?}",
        nobody.hops
    );
    assert!(diagnose(&cluster).iter().any(|d| matches!(
        d,
        Diagnostic::StrictBlackhole {
            target: Blackholed::UnknownClusterSpace { .. },
            ..
        }
    )));
}

#[test]
fn a_contested_destination_is_blackholed_a_refused_outside_one_is_not() {
    let nodes = format!(
        r#"{{"name": "a", "addresses": ["10.0.0.1"], "workload_ips": ["10.65.0.1"], "wireguard": {{"public_key": "{A}"}}}},
           {{"name": "b", "addresses": ["10.0.0.2"], "workload_ips": ["10.65.0.2", "8.8.8.8"], "wireguard": {{"public_key": "{B}"}}}},
           {{"name": "c", "addresses": ["10.0.0.3"], "workload_ips": ["10.65.0.2", "8.8.8.8"], "wireguard": {{"public_key": "{C}"}}}}"#
    );
    let mesh =
        r#"{"strict_mode": true, "route_source": "workload_ips", "cluster_cidrs": ["10.0.0.0/8"]}"#;
    let cluster = cluster(mesh, &nodes);
    let plan = plan_node(&cluster, "a").unwrap();
    assert_eq!(route(&plan, "10.65.0.2/32"), Some(RouteType::Blackhole));
    assert_eq!(route(&plan, "8.8.8.8/32"), Some(RouteType::Throw));
    // The local node's own claim, even contested, is thrown on the local node.
    let plan_b = plan_node(&cluster, "b").unwrap();
    assert_eq!(route(&plan_b, "10.65.0.2/32"), Some(RouteType::Throw));
    let found: Vec<String> = diagnose(&cluster).iter().map(|d| d.to_string()).collect();
    assert!(
        found.contains(
            &"strict mode drops traffic to 10.65.0.2/32 (blackhole): it is claimed by b, c"
                .to_owned()
        ),
        "{found:#?}"
    );
    assert!(!found.iter().any(|f| f.contains("drops traffic to 8.8.8.8")));
}

#[test]
fn a_node_that_does_not_take_part_blackholes_instead_of_sending_plain() {
    let cluster = three(r#"{"strict_mode": true}"#, r#", "wireguard": {}"#);
    let plan = plan_node(&cluster, "c").unwrap();
    assert!(plan.interfaces[0].peers.is_empty());
    assert_eq!(plan.rules.len(), 1);
    assert_eq!(route(&plan, "10.65.1.0/24"), Some(RouteType::Blackhole));
    assert_eq!(route(&plan, "10.65.3.0/24"), Some(RouteType::Throw));
    // Without strict mode it programs nothing.
    let plan = plan_node(&three("{}", r#", "wireguard": {}"#), "c").unwrap();
    assert!(plan.routes.is_empty() && plan.rules.is_empty());
}

#[test]
fn the_ingress_filter_is_the_peers_destinations_with_exemptions() {
    let mesh = r#"{"strict_mode": true, "host_encryption": true, "control_plane_endpoints": ["10.0.0.100:6443"]}"#;
    let cluster = three(mesh, r#", "wireguard": {"enabled": false}"#);
    let plan = plan_node(&cluster, "a").unwrap();
    for (source, drop) in [
        ("10.0.0.2", true),
        ("10.65.2.9", true),
        ("10.0.0.3", false),
        ("10.65.3.9", false),
        ("10.65.1.9", false),
        ("8.8.8.8", false),
    ] {
        assert_eq!(
            plan.must_arrive_encrypted(source.parse().unwrap()),
            drop,
            "{source}"
        );
    }
    let marking = plan.marking.as_ref().unwrap();
    let filter = marking.strict.as_ref().unwrap();
    assert_eq!(filter.exempt_udp_ports, [51820]);
    assert_eq!(
        filter.exempt_tcp_endpoints,
        ["10.0.0.100:6443".parse().unwrap()]
    );
    let script = marking.nft_script();
    assert!(script.contains("udp dport 51820 return"), "{script}");
    // IPv4 only: no IPv6 filter, so no neighbour-discovery exemption either.
    assert!(!script.contains("icmpv6"), "{script}");
    let mut dual = marking.clone();
    if let Some(f) = dual.strict.as_mut() {
        f.interface_v6 = Some("wg-v6.cali".into());
    }
    let script = dual.nft_script();
    for t in ["nd-neighbor-solicit", "nd-neighbor-advert"] {
        assert!(
            script.contains(&format!("icmpv6 type {t} ip6 hoplimit 255 return")),
            "{script}"
        );
    }
    assert!(
        script.contains(r#"meta nfproto ipv4 fib saddr oifname "wireguard.cali" counter drop"#),
        "{script}"
    );
    // WireGuard from b still gets through (encrypted), and plain c's plaintext too.
    let sim = Simulator::from_cluster(&cluster);
    let host = |n: &str| Source::Host(n.into(), Family::V4);
    assert_eq!(
        sim.trace(host("b"), "10.0.0.1".parse().unwrap()).outcome,
        Outcome::Encrypted
    );
    assert_eq!(
        sim.trace(host("c"), "10.0.0.1".parse().unwrap()).outcome,
        Outcome::Plain
    );
    // b's address forged by c on the underlay is dropped by a.
    let forged = sim
        .inject(
            "c",
            "10.0.0.2".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
        )
        .unwrap();
    assert!(matches!(
        forged.outcome,
        Outcome::Dropped(Drop::StrictIngress { .. })
    ));
    // Without strict mode, no filter.
    assert!(
        !plan_node(&three("{}", ""), "a")
            .unwrap()
            .must_arrive_encrypted("10.65.2.9".parse().unwrap())
    );
}
