//! Regression tests for the adversarial review (issue 11): each reproduction of the issue,
//! run against the core, with what must happen now.

use std::net::IpAddr;

use ipnet::IpNet;
use wgmesh_core::claims::{AddressKind, ClaimField, Refusal};
use wgmesh_core::diagnostics::{Diagnostic, diagnose};
use wgmesh_core::error::Problem;
use wgmesh_core::spec::{ParseLimits, parse_cluster, parse_cluster_with, read_bounded};
use wgmesh_core::{
    Cluster, Error, Event, Family, IncrementalPlanner, KeyError, Node, NodePlan, RouteType,
    plan_all, plan_node,
};

const KA: &str = "kt6ZjwKW9PRldGLl4ReY9SLO7xixUhVBvWdLJAIAHX8=";
const KB: &str = "UyG4eT0x90K0Aweb284VnX6DI8NsUi697KJKUaNMqkw=";
const KC: &str = "hKl+HNs4U8n0NjPMK8t6ZGwADTIR6GEnnA5aHWLJhVQ=";

/// The issue's cluster: b reports node a's address and 8.8.8.8 as workload addresses.
const ISSUE: &str = r#"{"nodes":[{"name":"a","addresses":["10.0.0.1"],"wireguard":{"public_key":"kt6ZjwKW9PRldGLl4ReY9SLO7xixUhVBvWdLJAIAHX8="}},
 {"name":"b","addresses":["10.0.0.2"],"wireguard":{"public_key":"UyG4eT0x90K0Aweb284VnX6DI8NsUi697KJKUaNMqkw="},"workload_ips":["10.0.0.1","8.8.8.8"]},
 {"name":"c","addresses":["10.0.0.3"],"wireguard":{"public_key":"hKl+HNs4U8n0NjPMK8t6ZGwADTIR6GEnnA5aHWLJhVQ="}}]}"#;

fn with_mesh(text: &str, mesh: &str) -> String {
    text.replacen(
        "{\"nodes\"",
        &format!("{{\"mesh\": {{{mesh}}}, \"nodes\""),
        1,
    )
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// The peer of `node` in `plan`'s IPv4 interface.
fn allowed(plan: &NodePlan, node: &str) -> Vec<IpNet> {
    plan.interface(Family::V4)
        .unwrap()
        .peers
        .iter()
        .find(|p| p.node == node)
        .map(|p| p.allowed_ips.clone())
        .unwrap_or_default()
}

fn route(plan: &NodePlan, dest: &str) -> Option<RouteType> {
    plan.routes
        .iter()
        .find(|r| r.destination == net(dest))
        .map(|r| r.kind)
}

/// The nodes whose plans send `dest` into the tunnel to `to`: the longest route in the mesh
/// table is unicast, and the longest allowed IP is on `to`'s peer (what the kernel and
/// WireGuard do).
fn routed_to(cluster: &Cluster, dest: &str, to: &str) -> Vec<String> {
    let dest = net(dest);
    let longest = |nets: &mut dyn Iterator<Item = IpNet>| {
        nets.filter(|n| n.contains(&dest))
            .max_by_key(|n| n.prefix_len())
    };
    plan_all(cluster)
        .iter()
        .filter(|p| {
            let Some(best) = longest(&mut p.routes.iter().map(|r| r.destination)) else {
                return false;
            };
            let unicast = route(p, &best.to_string()) == Some(RouteType::Unicast);
            let peers = &p.interface(Family::of_net(&dest)).unwrap().peers;
            let peer = peers
                .iter()
                .flat_map(|q| q.allowed_ips.iter().map(move |a| (*a, q.node.as_str())))
                .filter(|(a, _)| a.contains(&dest))
                .max_by_key(|(a, _)| a.prefix_len());
            unicast && peer.is_some_and(|(_, n)| n == to)
        })
        .map(|p| p.node.clone())
        .collect()
}

fn refused<'a>(found: &'a [Diagnostic], node: &str, claim: &str) -> Option<&'a Refusal> {
    found.iter().find_map(|d| match d {
        Diagnostic::Refused {
            node: n,
            claim: c,
            reason,
            ..
        } if n == node && *c == net(claim) => Some(reason),
        _ => None,
    })
}

// §1 -----------------------------------------------------------------------------------------

#[test]
fn issue_reproduction_with_cluster_cidrs() {
    let cluster = parse_cluster(&with_mesh(ISSUE, r#""cluster_cidrs": ["10.0.0.0/16"]"#)).unwrap();
    let c = plan_node(&cluster, "c").unwrap();
    // Neither 8.8.8.8 nor a's address goes into the tunnel towards b.
    assert!(allowed(&c, "b").is_empty(), "{:?}", allowed(&c, "b"));
    assert_eq!(route(&c, "8.8.8.8/32"), Some(RouteType::Throw));
    assert_eq!(route(&c, "10.0.0.1/32"), Some(RouteType::Throw));
    // And both refusals are findings; the one about a's address names a and b.
    let found = diagnose(&cluster);
    assert_eq!(
        refused(&found, "b", "8.8.8.8/32"),
        Some(&Refusal::OutsideClusterCidrs)
    );
    let r = refused(&found, "b", "10.0.0.1/32").unwrap();
    assert_eq!(r.other_node(), Some("a"));
    let d = found
        .iter()
        .find(|d| d.kind() == "refused" && d.nodes() == ["b", "a"])
        .unwrap();
    assert_eq!(
        d.to_string(),
        r#"node "b": workload_ips 10.0.0.1/32 refused: it covers 10.0.0.1, an address of node "a""#
    );
    assert!(!found.iter().any(|d| d.kind() == "no_cluster_cidrs"));
}

#[test]
fn issue_reproduction_without_cluster_cidrs() {
    // Without cluster_cidrs, workload addresses are accepted as before — minus another node's
    // address — and the findings say that the family is unprotected.
    let cluster = parse_cluster(ISSUE).unwrap();
    let c = plan_node(&cluster, "c").unwrap();
    assert_eq!(allowed(&c, "b"), [net("8.8.8.8/32")]);
    assert_eq!(route(&c, "10.0.0.1/32"), Some(RouteType::Throw));
    let found = diagnose(&cluster);
    assert!(refused(&found, "b", "10.0.0.1/32").is_some());
    assert!(found.contains(&Diagnostic::NoClusterCidrs { family: Family::V4 }));
    assert!(
        found
            .iter()
            .find(|d| d.kind() == "no_cluster_cidrs")
            .unwrap()
            .to_string()
            .contains("cluster_cidrs has no ipv4 range")
    );
}

#[test]
fn metadata_and_platform_addresses_are_never_claimed() {
    for (ip, kind) in [
        ("169.254.169.254", AddressKind::LinkLocal),
        ("168.63.129.16", AddressKind::PlatformEndpoint),
        ("127.0.0.1", AddressKind::Loopback),
        ("224.0.0.251", AddressKind::Multicast),
        ("255.255.255.255", AddressKind::Broadcast),
        ("0.0.0.0", AddressKind::Unspecified),
    ] {
        let text = ISSUE.replace("8.8.8.8", ip);
        for mesh in [
            "",
            r#""route_source": "workload_ips", "host_encryption": true"#,
        ] {
            let cluster = parse_cluster(&with_mesh(&text, mesh)).unwrap();
            assert!(
                routed_to(&cluster, &format!("{ip}/32"), "b").is_empty(),
                "{ip} {mesh}"
            );
            assert_eq!(
                refused(&diagnose(&cluster), "b", &format!("{ip}/32")),
                Some(&Refusal::Special { kind }),
                "{ip}"
            );
        }
    }
}

#[test]
fn a_default_route_block_takes_nobodys_egress() {
    let text = ISSUE.replace(
        r#""workload_ips":["10.0.0.1","8.8.8.8"]"#,
        r#""pod_cidrs":["0.0.0.0/0", "10.2.0.0/24"]"#,
    );
    let cluster = parse_cluster(&text).unwrap();
    for plan in plan_all(&cluster) {
        for peer in &plan.interfaces[0].peers {
            assert!(!peer.allowed_ips.contains(&net("0.0.0.0/0")), "{plan:?}");
        }
        assert_ne!(route(&plan, "0.0.0.0/0"), Some(RouteType::Unicast));
    }
    // b's own block still works: the refusal drops the one claim, nothing else.
    assert_eq!(
        allowed(&plan_node(&cluster, "a").unwrap(), "b"),
        [net("10.2.0.0/24")]
    );
    assert_eq!(
        refused(&diagnose(&cluster), "b", "0.0.0.0/0"),
        Some(&Refusal::PrefixTooShort { min: 16 })
    );
    // The bound is configurable, but never down to /0.
    let relaxed = with_mesh(&text, r#""min_prefix_len": 1"#);
    let cluster = parse_cluster(&relaxed).unwrap();
    assert_eq!(
        refused(&diagnose(&cluster), "b", "0.0.0.0/0"),
        Some(&Refusal::PrefixTooShort { min: 1 })
    );
    let err = parse_cluster(&with_mesh(&text, r#""min_prefix_len": 0"#)).unwrap_err();
    assert!(
        err.to_string().starts_with("mesh: min_prefix_len = \"0\""),
        "{err}"
    );
    let err = parse_cluster(&with_mesh(&text, r#""cluster_cidrs": ["0.0.0.0/0"]"#)).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("mesh: cluster_cidrs[0] = \"0.0.0.0/0\""),
        "{err}"
    );
}

/// A three-node `cidr_blocks` cluster: a (10.1.0.0/24, pod 10.1.0.5), b (10.0.0.2 and
/// 10.2.0.0/24 unless `b` replaces them), c.
fn blocks_cluster(b: &str, mesh: &str) -> Cluster {
    let mut b_fields = String::new();
    if !b.contains("\"addresses\"") {
        b_fields.push_str(r#""addresses": ["10.0.0.2"], "#);
    }
    if !b.contains("\"pod_cidrs\"") {
        b_fields.push_str(r#""pod_cidrs": ["10.2.0.0/24"], "#);
    }
    parse_cluster(&format!(
        r#"{{"mesh": {{{mesh}}}, "nodes": [
        {{"name": "a", "addresses": ["10.0.0.1"], "pod_cidrs": ["10.1.0.0/24"], "workload_ips": ["10.1.0.5"],
          "wireguard": {{"public_key": "{KA}"}}}},
        {{"name": "b", {b_fields}
          "wireguard": {{"public_key": "{KB}"}}{b}}},
        {{"name": "c", "addresses": ["10.0.0.3"], "pod_cidrs": ["10.3.0.0/24"],
          "wireguard": {{"public_key": "{KC}"}}}}]}}"#
    ))
    .unwrap()
}

#[test]
fn copying_a_victims_pod_address_never_hijacks_it() {
    // Before: b's borrowed /32 beat a's block by longest prefix, silently.
    let cluster = blocks_cluster(r#", "workload_ips": ["10.1.0.5"]"#, "");
    assert!(routed_to(&cluster, "10.1.0.5/32", "b").is_empty());
    assert_eq!(
        route(&plan_node(&cluster, "c").unwrap(), "10.1.0.5/32"),
        Some(RouteType::Throw)
    );
    let found = diagnose(&cluster);
    assert!(found.contains(&Diagnostic::Clash {
        destination: net("10.1.0.5/32"),
        nodes: vec!["a".into(), "b".into()]
    }));
    // A free address of a's block is a borrow, as Calico's IPAM makes them.
    let cluster = blocks_cluster(r#", "workload_ips": ["10.1.0.9"]"#, "");
    assert_eq!(routed_to(&cluster, "10.1.0.9/32", "b"), ["a", "c"]);
    // workload_ips: the same copy is a clash naming both, never silent.
    let cluster = blocks_cluster(
        r#", "workload_ips": ["10.1.0.5"]"#,
        r#""route_source": "workload_ips""#,
    );
    assert!(routed_to(&cluster, "10.1.0.5/32", "b").is_empty());
    assert!(
        diagnose(&cluster)
            .iter()
            .any(|d| d.kind() == "clash" && d.nodes() == ["a", "b"])
    );
}

#[test]
fn copying_a_victims_address_or_key_is_never_silent() {
    // b publishes a's InternalIP as one of its own: with host encryption the address is
    // nobody's (plain) and the finding names both; b's own address still works.
    let cluster = blocks_cluster(
        r#", "addresses": ["10.0.0.2", "10.0.0.1"]"#,
        "\"host_encryption\": true",
    );
    let c = plan_node(&cluster, "c").unwrap();
    assert_eq!(route(&c, "10.0.0.1/32"), Some(RouteType::Throw));
    assert!(allowed(&c, "b").contains(&net("10.0.0.2/32")));
    assert!(diagnose(&cluster).contains(&Diagnostic::Clash {
        destination: net("10.0.0.1/32"),
        nodes: vec!["a".into(), "b".into()]
    }));
    // Without host encryption it is still a finding.
    let cluster = blocks_cluster(r#", "addresses": ["10.0.0.2", "10.0.0.1"]"#, "");
    assert!(
        diagnose(&cluster)
            .iter()
            .any(|d| d.kind() == "clash" && d.nodes() == ["a", "b"])
    );
    // b publishes a's key: both plain, one finding naming both.
    let cluster = parse_cluster(&ISSUE.replace(KB, KA)).unwrap();
    assert!(diagnose(&cluster).iter().any(|d| matches!(d,
        Diagnostic::DuplicateKey { nodes, .. } if nodes == &["a", "b"])));
}

#[test]
fn blocks_never_nest_across_nodes() {
    // Inside a's block: refused, and the part stays nobody's rather than b's.
    let cluster = blocks_cluster(r#", "pod_cidrs": ["10.2.0.0/24", "10.1.0.0/25"]"#, "");
    assert!(routed_to(&cluster, "10.1.0.0/25", "b").is_empty());
    assert!(routed_to(&cluster, "10.1.0.5/32", "b").is_empty());
    assert_eq!(
        refused(&diagnose(&cluster), "b", "10.1.0.0/25"),
        Some(&Refusal::InsideBlock {
            node: "a".into(),
            block: net("10.1.0.0/24")
        })
    );
    // Around a's block: a's block is refused (it may be the copy), so a's pods are plaintext,
    // and the finding names a and b. b gets the rest of its block, never a's part.
    let cluster = blocks_cluster(r#", "pod_cidrs": ["10.2.0.0/24", "10.0.0.0/16"]"#, "");
    let found = diagnose(&cluster);
    // The /16 also covers the nodes' addresses: refused for that.
    assert!(matches!(
        refused(&found, "b", "10.0.0.0/16"),
        Some(Refusal::OtherNodesAddress { .. })
    ));
    let cluster = blocks_cluster(r#", "pod_cidrs": ["10.2.0.0/24", "10.1.0.0/23"]"#, "");
    assert!(routed_to(&cluster, "10.1.0.5/32", "b").is_empty());
    assert_eq!(
        route(&plan_node(&cluster, "c").unwrap(), "10.1.0.0/24"),
        Some(RouteType::Throw)
    );
    assert_eq!(
        refused(&diagnose(&cluster), "a", "10.1.0.0/24"),
        Some(&Refusal::InsideBlock {
            node: "b".into(),
            block: net("10.1.0.0/23")
        })
    );
    // A block that holds another node's address is refused.
    let cluster = blocks_cluster(r#", "pod_cidrs": ["10.2.0.0/24", "10.0.0.0/24"]"#, "");
    assert!(routed_to(&cluster, "10.0.0.1/32", "b").is_empty());
    assert!(matches!(
        refused(&diagnose(&cluster), "b", "10.0.0.0/24"),
        Some(Refusal::OtherNodesAddress { node, .. }) if node == "a"
    ));
}

#[test]
fn a_refused_claim_costs_only_its_node() {
    let cluster = parse_cluster(&with_mesh(ISSUE, r#""cluster_cidrs": ["10.0.0.0/16"]"#)).unwrap();
    let plans = plan_all(&cluster);
    assert_eq!(plans.len(), 3, "every node's plan succeeds");
    // b still takes part, with its peers and everyone's routes.
    let a = plan_node(&cluster, "a").unwrap();
    assert_eq!(a.interfaces[0].peers.len(), 2);
    assert!(a.rules.len() == 1 && a.marking.is_some());
}

#[test]
fn incremental_refusals_and_counts() {
    let cluster = parse_cluster(&with_mesh(
        &ISSUE.replace(r#","workload_ips":["10.0.0.1","8.8.8.8"]"#, ""),
        r#""cluster_cidrs": ["10.0.0.0/16"]"#,
    ))
    .unwrap();
    let mut planner = IncrementalPlanner::new(&cluster, "c");
    assert_eq!(planner.refused_claims(), 0);
    for ip in ["8.8.8.8", "10.0.0.1", "169.254.169.254"] {
        let delta = planner
            .apply(Event::WorkloadIpAdded {
                node: "b".into(),
                ip: ip.parse().unwrap(),
            })
            .unwrap();
        assert!(delta.peers_updated.is_empty(), "{ip}: {delta:?}");
        assert_eq!(delta.routes_added[0].kind, RouteType::Throw);
    }
    assert_eq!(planner.refused_claims(), 3);
    assert_eq!(
        planner
            .findings()
            .iter()
            .filter(|d| d.kind() == "refused")
            .count(),
        3
    );
    // a's address moves away: b's claim on it is accepted now (a legitimate borrow).
    let a = cluster
        .node("a")
        .unwrap()
        .clone()
        .with_addresses(["10.0.0.9".parse().unwrap()]);
    let delta = planner.apply(Event::NodeUpserted(a)).unwrap();
    assert_eq!(planner.refused_claims(), 2);
    assert!(
        delta
            .peers_updated
            .iter()
            .any(|p| p.node == "b" && p.allowed_ips_added == [net("10.0.0.1/32")])
    );
}

// §2 -----------------------------------------------------------------------------------------

#[test]
fn one_tiny_underlay_mtu_does_not_shrink_the_mesh() {
    let text = ISSUE.replace(
        r#""name":"b","addresses":["10.0.0.2"]"#,
        r#""name":"b","addresses":["10.0.0.2"],"underlay_mtu":636"#,
    );
    let cluster = parse_cluster(&text).unwrap();
    for node in ["a", "c"] {
        assert_eq!(
            plan_node(&cluster, node).unwrap().interfaces[0].mtu,
            1440,
            "{node}"
        );
    }
    // b itself still fits its own underlay.
    assert_eq!(plan_node(&cluster, "b").unwrap().interfaces[0].mtu, 576);
    let found = diagnose(&cluster);
    assert!(found.contains(&Diagnostic::MtuBelowFloor {
        node: "b".into(),
        family: Family::V4,
        underlay_mtu: 636,
        floor: 1340
    }));
    // An operator who means it lowers the floor, and the mesh follows.
    let cluster = parse_cluster(&with_mesh(&text, r#""mtu_floor": 576"#)).unwrap();
    assert_eq!(plan_node(&cluster, "a").unwrap().interfaces[0].mtu, 576);
    // A legitimately smaller underlay above the floor still lowers everyone's MTU.
    let text = ISSUE.replace(
        r#""name":"b","addresses":["10.0.0.2"]"#,
        r#""name":"b","addresses":["10.0.0.2"],"underlay_mtu":1400"#,
    );
    let cluster = parse_cluster(&text).unwrap();
    assert_eq!(plan_node(&cluster, "a").unwrap().interfaces[0].mtu, 1340);
    // The incremental planner agrees.
    let mut planner = IncrementalPlanner::new(&cluster, "a");
    let b = cluster.node("b").unwrap().clone().with_underlay_mtu(636);
    let delta = planner.apply(Event::NodeUpserted(b)).unwrap();
    assert_eq!(delta.interfaces_changed[0].mtu, 1440);
}

#[test]
fn a_fixed_mtu_too_big_for_an_underlay_is_reported() {
    let text = ISSUE.replace(
        r#""name":"b","addresses":["10.0.0.2"]"#,
        r#""name":"b","addresses":["10.0.0.2"],"underlay_mtu":1400"#,
    );
    let cluster = parse_cluster(&with_mesh(&text, r#""mtu": 1420"#)).unwrap();
    let found = diagnose(&cluster);
    assert_eq!(
        found
            .iter()
            .filter(|d| d.kind() == "mtu_above_underlay")
            .count(),
        1
    );
    let d = found
        .iter()
        .find(|d| d.kind() == "mtu_above_underlay")
        .unwrap();
    assert_eq!(d.nodes(), ["b"]);
    assert!(d.to_string().contains("mesh.mtu 1420 does not fit"), "{d}");
    let ok = parse_cluster(&with_mesh(&text, r#""mtu": 1340"#)).unwrap();
    assert!(
        !diagnose(&ok)
            .iter()
            .any(|d| d.kind() == "mtu_above_underlay")
    );
}

// §3 -----------------------------------------------------------------------------------------

#[test]
fn interface_names_that_are_not_ours_are_refused() {
    for (mesh, field, problem) in [
        (r#""interface_name": "-up""#, "interface_name", "option"),
        (
            r#""interface_name_v6": "lo""#,
            "interface_name_v6",
            "not wgmesh's",
        ),
        (
            r#""interface_name": "all""#,
            "interface_name",
            "not wgmesh's",
        ),
        (r#""interface_name": "wg\"x""#, "interface_name", "quote"),
        (r#""interface_name": "wg\\x""#, "interface_name", "quote"),
        (r#""interface_name": "wg*""#, "interface_name", "quote"),
        (
            r#""interface_name": "wg x""#,
            "interface_name",
            "whitespace",
        ),
        (r#""interface_name": "a/b""#, "interface_name", "'/'"),
        (r#""interface_name": ".""#, "interface_name", "reserved"),
        (
            r#""interface_name": "sixteen-bytes-xx""#,
            "interface_name",
            "15 bytes",
        ),
        (r#""interface_name": """#, "interface_name", "empty"),
        (
            r#""workload_interface_prefix": "-c""#,
            "workload_interface_prefix",
            "option",
        ),
        (
            r#""interface_name": "wg0", "interface_name_v6": "wg0""#,
            "interface_name_v6",
            "differ",
        ),
    ] {
        let err = parse_cluster(&format!(r#"{{"mesh": {{{mesh}}}}}"#)).unwrap_err();
        assert_eq!(err.field(), Some(field), "{mesh}: {err}");
        assert!(err.to_string().contains(problem), "{mesh}: {err}");
        assert!(matches!(
            err,
            Error::Invalid {
                problem: Problem::InvalidInterfaceName(_) | Problem::Empty | Problem::MustDiffer(_),
                ..
            }
        ));
    }
}

// §5 -----------------------------------------------------------------------------------------

#[test]
fn what_one_node_may_claim_is_capped() {
    // 30,000 InternalIPs and 30,000 workload addresses: only the limits count, and the
    // findings say so.
    let mut b = Node::new("b").with_wireguard(wgmesh_core::NodeWireGuard::new(
        Some(KB.parse().unwrap()),
        None,
    ));
    b.addresses = (0..30_000u32)
        .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + 2 + i)))
        .collect();
    b.workload_ips = (0..30_000u32)
        .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a80_0000 + i)))
        .rev()
        .collect();
    let a = Node::new("a")
        .with_addresses(["10.255.0.1".parse().unwrap()])
        .with_wireguard(wgmesh_core::NodeWireGuard::new(
            Some(KA.parse().unwrap()),
            None,
        ));
    let mut mesh = wgmesh_core::MeshConfig::default();
    mesh.host_encryption = true;
    mesh.route_source = wgmesh_core::RouteSource::WorkloadIps;
    let cluster = Cluster::new(mesh.clone(), vec![a, b.clone()]).unwrap();
    let plan = plan_node(&cluster, "a").unwrap();
    let peer = &plan.interfaces[0].peers[0];
    assert_eq!(
        peer.allowed_ips.len(),
        mesh.max_node_addresses + mesh.max_node_workload_ips
    );
    // The smallest workload addresses count, whatever their order.
    assert!(peer.allowed_ips.contains(&net("10.128.0.0/32")));
    let found = diagnose(&cluster);
    for field in [ClaimField::Addresses, ClaimField::WorkloadIps] {
        assert!(
            found.iter().any(|d| matches!(d,
                Diagnostic::OverLimit { node, field: f, listed: 30_000, .. } if node == "b" && *f == field)),
            "{field}"
        );
    }
    // The incremental planner counts the same, and an address past the limit changes nothing.
    let mut planner = IncrementalPlanner::new(&cluster, "a");
    assert_eq!(planner.plan(), plan);
    let delta = planner
        .apply(Event::WorkloadIpAdded {
            node: "b".into(),
            ip: "10.200.0.1".parse().unwrap(),
        })
        .unwrap();
    assert!(delta.is_empty());
    // One smaller than every counted one goes in, and the largest counted one goes out.
    let delta = planner
        .apply(Event::WorkloadIpAdded {
            node: "b".into(),
            ip: "10.127.0.1".parse().unwrap(),
        })
        .unwrap();
    let update = &delta.peers_updated[0];
    assert_eq!(update.allowed_ips_added, [net("10.127.0.1/32")]);
    assert_eq!(update.allowed_ips_removed.len(), 1);
}

#[test]
fn echoed_values_are_bounded() {
    let huge = "x".repeat(1 << 20);
    for text in [
        format!(r#"{{"nodes": [{{"name": "a", "addresses": ["{huge}"]}}]}}"#),
        format!(r#"{{"nodes": [{{"name": "a", "wireguard": {{"public_key": "{huge}"}}}}]}}"#),
        format!(r#"{{"nodes": [{{"name": "{huge}"}}]}}"#),
        format!(r#"{{"mesh": {{"interface_name": "{huge}"}}}}"#),
        format!(r#"{{"nodes": [{{"name": "a", "underlay_mtu": "{huge}"}}]}}"#),
        format!("nodes: [{{name: a, underlay_mtu: {huge}}}]"),
        // Found by the fuzzer: multi-byte text, and a key with a newline in it.
        format!(
            r#"{{"nodes": [{{"name": "a", "{}": 1}}]}}"#,
            "\u{fffd}".repeat(1000)
        ),
        r#"{"nodes": [{"name": "a", "\nunderlay_mtu": 1}]}"#.to_owned(),
        "nodes: [{name: a, \"\\e[31mx\": 1}]".to_owned(),
        // Found by the fuzzer: a key of control characters, six bytes each once escaped, in
        // the path, the field and the parser's message at once.
        format!(
            r#"{{"no{}": 1, "nodes": [{{"name": "a"}}]}}"#,
            "\u{7f}".repeat(1000)
        ),
        format!(
            r#"{{"nodes": [{{"name": "a", "x{}": 1}}]}}"#,
            "\u{7f}".repeat(1000)
        ),
    ] {
        let err = parse_cluster(&text).unwrap_err().to_string();
        assert!(err.len() < 600, "{} bytes: {}", err.len(), &err[..200]);
        assert!(!err.contains('\n'));
    }
    assert!(
        plan_node(&parse_cluster("{}").unwrap(), &huge)
            .unwrap_err()
            .to_string()
            .len()
            < 200
    );
}

// §7 -----------------------------------------------------------------------------------------

#[test]
fn deep_and_large_input_is_refused_before_parsing() {
    // The issue's YAML: 100,000 levels in 200 KB took more than a minute.
    let yaml = format!("nodes: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let err = parse_cluster(&yaml).unwrap_err();
    assert!(matches!(
        err,
        Error::Invalid {
            problem: Problem::TooDeep { limit: 32 },
            ..
        }
    ));
    let json = format!(
        r#"{{"nodes": {}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(matches!(
        parse_cluster(&json).unwrap_err(),
        Error::Invalid {
            problem: Problem::TooDeep { .. },
            ..
        }
    ));
    // Block-style nesting, compact and by indentation.
    let compact = format!("nodes:\n{}x\n", "- ".repeat(40));
    assert!(matches!(
        parse_cluster(&compact).unwrap_err(),
        Error::Invalid {
            problem: Problem::TooDeep { .. },
            ..
        }
    ));
    let mut indented = String::from("nodes:\n");
    for i in 1..40 {
        indented.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
    }
    assert!(matches!(
        parse_cluster(&indented).unwrap_err(),
        Error::Invalid {
            problem: Problem::TooDeep { .. },
            ..
        }
    ));
    // Size.
    let limits = ParseLimits::new(1024, 32);
    let big = format!(r#"{{"nodes": [{{"name": "{}"}}]}}"#, "a".repeat(2000));
    assert_eq!(
        parse_cluster_with(&big, &limits).unwrap_err().to_string(),
        format!(
            "cluster: syntax: {} bytes is more than the limit of 1024",
            big.len()
        )
    );
    // Brackets inside strings, comments and block scalars do not count.
    let text = format!(
        "# {}\nnodes:\n  - name: \"{}\"\n    workload_ips: ['10.0.0.1'] # ]]]]\nmesh:\n  interface_name: wg0\n",
        "[".repeat(100),
        "[".repeat(100)
    );
    assert!(ParseLimits::default().check(&text).is_ok());
    let scalar = format!("mesh: {{}}\nnote: |\n  {}\nnodes: []\n", "[".repeat(100));
    assert!(ParseLimits::default().check(&scalar).is_ok());
    // Every example cluster of the repository passes.
    for text in [
        include_str!("../../examples/clusters/aks-azure-cni.json"),
        include_str!("../../examples/clusters/mixed-dual-stack.yaml"),
    ] {
        ParseLimits::default().check(text).unwrap();
        parse_cluster(text).unwrap();
    }
}

#[test]
fn endless_readers_are_cut_off() {
    let err = read_bounded(std::io::repeat(0), 4096).unwrap_err();
    assert_eq!(err.to_string(), "more than 4096 bytes");
    let err = read_bounded(&[0xff, 0xfe][..], 10).unwrap_err();
    assert!(err.to_string().starts_with("not UTF-8"), "{err}");
    assert_eq!(read_bounded(&b"{}"[..], 2).unwrap(), "{}");
}

#[test]
fn low_order_keys_are_refused_with_node_and_field() {
    // 1 (a point of order 4, little-endian) and p + 1 (the same point, unreduced).
    for key in [
        "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "7v///////////////////////////////////////38=",
        "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA=",
    ] {
        let err = parse_cluster(&ISSUE.replace(KC, key)).unwrap_err();
        assert_eq!(err.node_name(), Some("c"));
        assert_eq!(err.field(), Some("wireguard.public_key"));
        assert!(matches!(
            err,
            Error::Invalid {
                problem: Problem::InvalidKey(KeyError::LowOrder),
                ..
            }
        ));
    }
}

#[test]
fn nft_script_cannot_be_escaped_from() {
    let cluster = parse_cluster(ISSUE).unwrap();
    let mut marking = plan_node(&cluster, "a").unwrap().marking.unwrap();
    marking.skip_interfaces.push("x\" accept\n\\".into());
    let script = marking.nft_script();
    assert!(
        script.contains(r#"iifname "x\" accept\x0a\\" return"#),
        "{script}"
    );
    // Every quote in the script is either a delimiter or escaped.
    for line in script.lines() {
        let unescaped = line
            .replace("\\\\", "")
            .replace("\\\"", "")
            .matches('"')
            .count();
        assert!(unescaped % 2 == 0, "{line}");
    }
}
