//! Scenario tests of the full planner: the design's AKS cluster, and each rule of the mesh
//! on a cluster made to show it.

use ipnet::IpNet;
use wgmesh_core::diagnostics::{Diagnostic, PlainReason, diagnose};
use wgmesh_core::spec::parse_cluster;
use wgmesh_core::{Cluster, Family, NodePlan, PrivateKey, RouteType, plan_node, render};

const AKS: &str = include_str!("../../examples/clusters/aks-azure-cni.json");
const K1: &str = "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=";
const K2: &str = "bbcKpAY+Q9VpmIRLT+yPaaOALxqnonxBuk5LRlvKClA=";
const K3: &str = "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=";
const K4: &str = "lDWQTjn07Ve0LXsUpK+8QpVnt+LEsDBTad9yiHJu0Ww=";

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn routes(plan: &NodePlan, kind: RouteType) -> Vec<String> {
    plan.routes
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.destination.to_string())
        .collect()
}

fn plan(cluster: &Cluster, node: &str) -> NodePlan {
    plan_node(cluster, node).unwrap()
}

#[test]
fn the_design_cluster() {
    let cluster = parse_cluster(AKS).unwrap();
    let p = plan(&cluster, "aks-nodepool1-19852467-vmss000001");
    let wg = &p.interfaces[0];
    assert_eq!(
        (wg.name.as_str(), wg.listen_port, wg.firewall_mark, wg.mtu),
        ("wireguard.cali", 51820, 0x100000, 1440)
    );
    assert_eq!(wg.public_key.unwrap().to_string(), K2);
    // The design's `wg show`: node IPs and pod IPs of each peer.
    let peer64 = wg
        .peers
        .iter()
        .find(|p| p.public_key.to_string() == K3)
        .unwrap();
    assert_eq!(peer64.endpoint.to_string(), "10.240.0.64:51820");
    assert_eq!(
        peer64.allowed_ips,
        nets(&["10.240.0.64/32", "10.240.0.65/32", "10.240.0.66/32"])
    );
    let peer4 = wg
        .peers
        .iter()
        .find(|p| p.public_key.to_string() == K1)
        .unwrap();
    assert_eq!(peer4.endpoint.to_string(), "10.240.0.4:51820");
    assert_eq!(
        peer4.allowed_ips,
        nets(&["10.240.0.4/32", "10.240.0.5/32", "10.240.0.6/32"])
    );
    assert_eq!(
        routes(&p, RouteType::Throw),
        ["10.240.0.35/32", "10.240.0.36/32", "10.240.0.37/32"]
    );
    assert_eq!(routes(&p, RouteType::Unicast).len(), 6);
    assert!(p.routes.iter().all(|r| r.table == 1));
    assert_eq!(p.rules.len(), 1);
    let rule = &p.rules[0];
    assert_eq!(
        (
            rule.priority,
            rule.table,
            rule.firewall_mark,
            rule.firewall_mask,
            rule.invert
        ),
        (99, 1, 0x100000, 0x100000, true)
    );
    assert_eq!(p.sysctls[0].key, "net.ipv4.conf.all.src_valid_mark");
    let marking = p.marking.as_ref().unwrap();
    assert!(
        !marking.mark_output,
        "host encryption: host traffic goes through the tunnel"
    );
    assert_eq!(marking.skip_interfaces, ["lo", "wireguard.cali"]);
    assert_eq!(marking.skip_interface_prefixes, ["cali"]);
}

#[test]
fn json_field_names_are_the_contract() {
    let cluster = parse_cluster(AKS).unwrap();
    let p = plan(&cluster, "aks-nodepool1-19852467-vmss000001");
    let v: serde_json::Value = serde_json::to_value(&p).unwrap();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&v),
        [
            "interfaces",
            "marking",
            "node",
            "routes",
            "rules",
            "sysctls"
        ]
    );
    let iface = &v["interfaces"][0];
    assert_eq!(
        keys(iface),
        [
            "family",
            "firewall_mark",
            "listen_port",
            "mtu",
            "name",
            "peers",
            "public_key"
        ]
    );
    assert_eq!(iface["family"], "ipv4");
    assert_eq!(
        keys(&iface["peers"][0]),
        [
            "allowed_ips",
            "endpoint",
            "node",
            "persistent_keepalive",
            "public_key"
        ]
    );
    assert_eq!(
        iface["peers"][0]["persistent_keepalive"],
        serde_json::Value::Null
    );
    let unicast = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "unicast")
        .unwrap();
    assert_eq!(
        keys(unicast),
        ["destination", "device", "family", "table", "type"]
    );
    let throw = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "throw")
        .unwrap();
    assert_eq!(keys(throw), ["destination", "family", "table", "type"]);
    assert_eq!(
        keys(&v["rules"][0]),
        [
            "family",
            "firewall_mark",
            "firewall_mask",
            "invert",
            "priority",
            "table"
        ]
    );
    assert_eq!(
        v["sysctls"][0],
        serde_json::json!({"key": "net.ipv4.conf.all.src_valid_mark", "value": "1"})
    );
    // And it reads back.
    let back: NodePlan = serde_json::from_value(v).unwrap();
    assert_eq!(back, p);
}

fn cluster(mesh: &str, nodes: &str) -> Cluster {
    parse_cluster(&format!(r#"{{"mesh": {{{mesh}}}, "nodes": [{nodes}]}}"#)).unwrap()
}

fn wg_node(name: &str, addr: &str, key: &str, extra: &str) -> String {
    format!(
        r#"{{"name": "{name}", "addresses": ["{addr}"], "wireguard": {{"public_key": "{key}"}}{extra}}}"#
    )
}

#[test]
fn duplicate_keys_exclude_both_claimants_until_cleared() {
    let nodes = [
        wg_node("a", "10.0.0.1", K1, r#", "pod_cidrs": ["10.1.0.0/24"]"#),
        wg_node("b", "10.0.0.2", K2, r#", "pod_cidrs": ["10.2.0.0/24"]"#),
        wg_node("c", "10.0.0.3", K2, r#", "pod_cidrs": ["10.3.0.0/24"]"#),
    ]
    .join(",");
    let c = cluster("", &nodes);
    let a = plan(&c, "a");
    assert!(a.interfaces[0].peers.is_empty());
    assert_eq!(
        routes(&a, RouteType::Throw),
        ["10.1.0.0/24", "10.2.0.0/24", "10.3.0.0/24"]
    );
    // b itself is excluded: an interface to hold its key, but no peers, routes or rule.
    let b = plan(&c, "b");
    assert_eq!(b.interfaces.len(), 1);
    assert!(
        b.interfaces[0].peers.is_empty()
            && b.routes.is_empty()
            && b.rules.is_empty()
            && b.marking.is_none()
    );
    let found = diagnose(&c);
    assert!(
        found
            .iter()
            .any(|d| matches!(d, Diagnostic::DuplicateKey { nodes, .. } if nodes == &["b", "c"]))
    );
    assert!(found.iter().any(|d| matches!(d, Diagnostic::Plain { node, reason: PlainReason::DuplicatePublicKey, .. } if node == "c")));
    // c rotates its key: both come back.
    let nodes = nodes.replacen(
        &format!(r#""name": "c", "addresses": ["10.0.0.3"], "wireguard": {{"public_key": "{K2}""#),
        &format!(r#""name": "c", "addresses": ["10.0.0.3"], "wireguard": {{"public_key": "{K3}""#),
        1,
    );
    let a = plan(&cluster("", &nodes), "a");
    assert_eq!(a.interfaces[0].peers.len(), 2);
    assert_eq!(
        routes(&a, RouteType::Unicast),
        ["10.2.0.0/24", "10.3.0.0/24"]
    );
}

#[test]
fn plain_nodes_get_throw_routes_and_no_peer() {
    let nodes = [
        wg_node("a", "10.0.0.1", K1, r#", "pod_cidrs": ["10.1.0.0/24"]"#),
        r#"{"name": "legacy", "addresses": ["10.0.0.9"], "pod_cidrs": ["10.9.0.0/24"], "workload_ips": ["10.1.0.77"]}"#.to_owned(),
        r#"{"name": "off", "addresses": ["10.0.0.8"], "wireguard": {"enabled": false, "public_key": "lDWQTjn07Ve0LXsUpK+8QpVnt+LEsDBTad9yiHJu0Ww="}, "pod_cidrs": ["10.8.0.0/24"]}"#.to_owned(),
    ]
    .join(",");
    let c = cluster(r#""host_encryption": true"#, &nodes);
    let a = plan(&c, "a");
    assert!(a.interfaces[0].peers.is_empty());
    // The plain node's block, its borrowed address inside a's block, and its host address.
    let throws = routes(&a, RouteType::Throw);
    for d in [
        "10.9.0.0/24",
        "10.1.0.77/32",
        "10.0.0.9/32",
        "10.8.0.0/24",
        "10.0.0.8/32",
    ] {
        assert!(throws.contains(&d.to_owned()), "{d} in {throws:?}");
    }
    assert!(plan(&c, "legacy").is_empty());
    assert!(plan(&c, "off").is_empty());
}

#[test]
fn borrowed_addresses_follow_the_pod() {
    let nodes = [
        wg_node(
            "a",
            "10.0.0.1",
            K1,
            r#", "pod_cidrs": ["10.1.0.0/24"], "workload_ips": ["10.1.0.2"]"#,
        ),
        wg_node(
            "b",
            "10.0.0.2",
            K2,
            r#", "pod_cidrs": ["10.2.0.0/24"], "workload_ips": ["10.1.0.9", "10.2.0.3"]"#,
        ),
        wg_node("c", "10.0.0.3", K3, r#", "pod_cidrs": ["10.3.0.0/24"]"#),
    ]
    .join(",");
    let c = cluster("", &nodes);
    // On c: a's block via a, the borrowed /32 via b (longest prefix wins in both lookups).
    let pc = plan(&c, "c");
    let peer = |p: &NodePlan, n: &str| {
        p.interfaces[0]
            .peers
            .iter()
            .find(|x| x.node == n)
            .unwrap()
            .allowed_ips
            .clone()
    };
    assert_eq!(peer(&pc, "a"), nets(&["10.1.0.0/24"]));
    assert_eq!(peer(&pc, "b"), nets(&["10.1.0.9/32", "10.2.0.0/24"]));
    // On a (the block's owner): its block is local (throw), the borrowed /32 goes to b.
    let pa = plan(&c, "a");
    assert!(routes(&pa, RouteType::Throw).contains(&"10.1.0.0/24".to_owned()));
    assert!(routes(&pa, RouteType::Unicast).contains(&"10.1.0.9/32".to_owned()));
    // On b: the borrowed address is local (throw); 10.2.0.3 is inside its own block (no /32).
    let pb = plan(&c, "b");
    assert_eq!(
        routes(&pb, RouteType::Throw),
        ["10.1.0.9/32", "10.2.0.0/24"]
    );
}

#[test]
fn a_destination_claimed_twice_is_nobodys() {
    let nodes = [
        wg_node("a", "10.0.0.1", K1, r#", "workload_ips": ["10.5.0.5"]"#),
        wg_node(
            "b",
            "10.0.0.2",
            K2,
            r#", "workload_ips": ["10.5.0.5", "10.5.0.6"]"#,
        ),
        wg_node("c", "10.0.0.3", K3, ""),
    ]
    .join(",");
    let c = cluster(r#""route_source": "workload_ips""#, &nodes);
    for n in ["a", "b", "c"] {
        let p = plan(&c, n);
        assert!(
            routes(&p, RouteType::Throw).contains(&"10.5.0.5/32".to_owned()),
            "{n}"
        );
        assert!(
            p.interfaces[0]
                .peers
                .iter()
                .all(|peer| !peer.allowed_ips.contains(&"10.5.0.5/32".parse().unwrap()))
        );
    }
    assert!(
        diagnose(&c)
            .iter()
            .any(|d| matches!(d, Diagnostic::Clash { nodes, .. } if nodes == &["a", "b"]))
    );
}

#[test]
fn disabled_mesh_or_node_plans_nothing() {
    let nodes = [
        wg_node("a", "10.0.0.1", K1, ""),
        wg_node("b", "10.0.0.2", K2, ""),
    ]
    .join(",");
    let c = cluster(r#""enabled": false"#, &nodes);
    assert_eq!(plan(&c, "a"), NodePlan::empty("a"));
    assert!(render::text(&plan(&c, "a")).contains("no mesh"));
    assert!(plan_node(&c, "zzz").is_err());
}

#[test]
fn dual_stack() {
    let nodes = format!(
        r#"{{"name": "a", "addresses": ["10.0.0.1", "fd00::1"], "wireguard": {{"public_key": "{K1}", "public_key_v6": "{K3}"}}, "pod_cidrs": ["10.1.0.0/24", "fd01::/64"]}},
           {{"name": "b", "addresses": ["fd00::2", "10.0.0.2"], "wireguard": {{"public_key": "{K2}", "public_key_v6": "{K4}"}}, "pod_cidrs": ["10.2.0.0/24", "fd02::/64"]}},
           {{"name": "v4only", "addresses": ["10.0.0.3"], "wireguard": {{"public_key": "{K3}"}}, "pod_cidrs": ["10.3.0.0/24"]}}"#
    );
    let c = cluster(r#""routing_table": 7"#, &nodes);
    let p = plan(&c, "a");
    assert_eq!(p.interfaces.len(), 2);
    let v6 = p.interface(Family::V6).unwrap();
    assert_eq!(
        (v6.name.as_str(), v6.listen_port, v6.mtu),
        ("wg-v6.cali", 51821, 1420)
    );
    assert_eq!(v6.public_key.unwrap().to_string(), K3);
    assert_eq!(v6.peers.len(), 1);
    assert_eq!(v6.peers[0].endpoint.to_string(), "[fd00::2]:51821");
    assert_eq!(v6.peers[0].public_key.to_string(), K4);
    assert_eq!(v6.peers[0].allowed_ips, nets(&["fd02::/64"]));
    // The IPv4 key K3 of v4only is not the IPv6 key K3 of a: keys clash only within a family.
    let v4 = p.interface(Family::V4).unwrap();
    assert_eq!(v4.peers.len(), 2);
    assert_eq!(p.rules.len(), 2);
    assert!(p.rules.iter().all(|r| r.table == 7));
    assert!(p.routes.iter().all(|r| r.table == 7));
    // v4only gets no IPv6 interface.
    assert_eq!(plan(&c, "v4only").interfaces.len(), 1);
}

#[test]
fn mtu_is_the_smallest_underlay_minus_overhead() {
    let nodes = |a: u32, b: u32| {
        format!(
            r#"{{"name": "a", "addresses": ["10.0.0.1", "fd00::1"], "underlay_mtu": {a}, "wireguard": {{"public_key": "{K1}", "public_key_v6": "{K3}"}}}},
               {{"name": "b", "addresses": ["10.0.0.2", "fd00::2"], "underlay_mtu": {b}, "wireguard": {{"public_key": "{K2}", "public_key_v6": "{K4}"}}}},
               {{"name": "plain", "addresses": ["10.0.0.3"], "underlay_mtu": 1000}}"#
        )
    };
    let c = cluster("", &nodes(9000, 1500));
    let p = plan(&c, "a");
    assert_eq!(
        p.interface(Family::V4).unwrap().mtu,
        1440,
        "a jumbo node must not outgrow its peers"
    );
    assert_eq!(p.interface(Family::V6).unwrap().mtu, 1420);
    let p = plan(&cluster("", &nodes(9000, 9000)), "a");
    assert_eq!(
        p.interface(Family::V4).unwrap().mtu,
        8940,
        "plain nodes do not count"
    );
    let p = plan(&cluster(r#""mtu": 1400"#, &nodes(9000, 1500)), "b");
    assert_eq!(p.interface(Family::V4).unwrap().mtu, 1400);
    assert!(
        parse_cluster(&format!(
            r#"{{"mesh": {{"mtu": 1200}}, "nodes": [{}]}}"#,
            nodes(1500, 1500)
        ))
        .is_err(),
        "IPv6 needs 1280"
    );
}

#[test]
fn a_node_without_a_key_yet_has_an_interface_and_nothing_else() {
    let nodes = [
        r#"{"name": "new", "addresses": ["10.0.0.1"], "wireguard": {"enabled": true}}"#.to_owned(),
        wg_node("b", "10.0.0.2", K2, r#", "pod_cidrs": ["10.2.0.0/24"]"#),
    ]
    .join(",");
    let c = cluster("", &nodes);
    let p = plan(&c, "new");
    assert_eq!(p.interfaces.len(), 1);
    assert!(p.interfaces[0].public_key.is_none());
    assert!(p.interfaces[0].peers.is_empty() && p.routes.is_empty() && p.rules.is_empty());
    // And its peers treat it as plain until it publishes one.
    let b = plan(&c, "b");
    assert!(b.interfaces[0].peers.is_empty());
}

#[test]
fn host_encryption_decides_the_marking() {
    let nodes = [
        wg_node("a", "10.0.0.1", K1, ""),
        wg_node("b", "10.0.0.2", K2, ""),
    ]
    .join(",");
    let off = plan(&cluster(r#""persistent_keepalive": 25"#, &nodes), "a");
    assert!(
        off.marking.as_ref().unwrap().mark_output,
        "host traffic stays plain"
    );
    assert!(
        off.interfaces[0].peers[0].allowed_ips.is_empty(),
        "node addresses only with host encryption"
    );
    assert_eq!(off.interfaces[0].peers[0].persistent_keepalive, Some(25));
    let on = plan(&cluster(r#""host_encryption": true"#, &nodes), "a");
    assert!(!on.marking.as_ref().unwrap().mark_output);
    assert_eq!(
        on.interfaces[0].peers[0].allowed_ips,
        nets(&["10.0.0.2/32"])
    );
    let script = on.marking.unwrap().nft_script();
    assert!(
        script.contains("type filter hook prerouting priority raw"),
        "{script}"
    );
    assert!(script.contains("iifname \"cali*\" return"));
    assert!(!script.contains("chain output"));
}

#[test]
fn setconf_and_text() {
    let c = parse_cluster(AKS).unwrap();
    let p = plan(&c, "aks-nodepool1-19852467-vmss000001");
    let key = PrivateKey::generate();
    let conf = render::setconf(&p.interfaces[0], Some(&key));
    let expected_peer = format!(
        "\n# aks-nodepool1-19852467-vmss000002\n[Peer]\nPublicKey = {K3}\nEndpoint = 10.240.0.64:51820\nAllowedIPs = 10.240.0.64/32, 10.240.0.65/32, 10.240.0.66/32\n"
    );
    assert!(conf.contains(&expected_peer), "{}", conf.as_str());
    assert!(conf.contains(&format!("PrivateKey = {}\n", key.to_base64().as_str())));
    let without = render::setconf(&p.interfaces[0], None);
    assert!(!without.contains("PrivateKey"));
    let text = render::text(&p);
    assert!(text.contains("private key: (hidden)"));
    assert!(!text.contains(key.to_base64().as_str()));
    assert!(text.contains("fwmark: 0x100000"));
    assert!(text.contains("99:\tnot from all fwmark 0x100000/0x100000 lookup 1"));
    assert!(text.contains("throw 10.240.0.36/32 table 1"));
    assert!(text.contains("10.240.0.65/32 dev wireguard.cali table 1 scope link"));
}

#[test]
fn plans_do_not_depend_on_node_order() {
    let c = parse_cluster(AKS).unwrap();
    let (mesh, mut nodes) = c.clone().into_parts();
    nodes.reverse();
    let r = Cluster::new(mesh, nodes).unwrap();
    for n in c.nodes() {
        assert_eq!(plan(&c, &n.name), plan(&r, &n.name));
    }
}
