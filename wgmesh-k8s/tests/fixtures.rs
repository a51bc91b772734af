//! Recorded `kubectl get nodes -o json` / `kubectl get pods -A -o json` output of three kinds of
//! cluster → the core's cluster input, checked field by field.
//!
//! The fixtures were written for these tests in the shape kubectl prints (they are not
//! captures of a live cluster; see the crate's README).

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node as K8sNode, Pod};
use wgmesh_core::{
    Family, MeshConfig, Node, PublicKey, RouteSource, RouteType, plan_node, spec::parse_cluster,
};
use wgmesh_k8s::adapter::{
    AdapterOptions, AdapterWarning, ClusterInput, PodExclusion, PodWorkload, cluster_input,
    pod_workload,
};

/// `kubectl get … -o json` prints `"kind": "List"`, not `NodeList`: read the items only.
#[derive(serde::Deserialize)]
struct KubectlList<T> {
    kind: String,
    items: Vec<T>,
}

fn items<T: serde::de::DeserializeOwned>(text: &str) -> Vec<T> {
    let list: KubectlList<T> = serde_json::from_str(text).unwrap();
    assert_eq!(list.kind, "List");
    list.items
}

fn nodes(text: &str) -> Vec<K8sNode> {
    items(text)
}

fn pods(text: &str) -> Vec<Pod> {
    items(text)
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn key(text: &str) -> Option<PublicKey> {
    Some(text.parse().unwrap())
}

fn node<'a>(input: &'a ClusterInput, name: &str) -> &'a Node {
    input
        .cluster
        .node(name)
        .unwrap_or_else(|| panic!("{name} missing"))
}

const AKS_NODES: &str = include_str!("fixtures/aks-azure-cni-nodes.json");
const AKS_PODS: &str = include_str!("fixtures/aks-azure-cni-pods.json");
const KUBEADM_NODES: &str = include_str!("fixtures/kubeadm-nodes.json");
const KUBEADM_PODS: &str = include_str!("fixtures/kubeadm-pods.json");
const DS_NODES: &str = include_str!("fixtures/dual-stack-nodes.json");
const DS_PODS: &str = include_str!("fixtures/dual-stack-pods.json");

fn aks_mesh() -> MeshConfig {
    let mut mesh = MeshConfig::default();
    mesh.route_source = RouteSource::WorkloadIps;
    mesh.host_encryption = true;
    mesh
}

#[test]
fn aks_azure_cni_nodes_have_no_pod_cidrs_and_pods_have_vnet_addresses() {
    let input = cluster_input(
        &aks_mesh(),
        &nodes(AKS_NODES),
        &pods(AKS_PODS),
        &AdapterOptions::default(),
    )
    .unwrap();
    assert!(input.warnings.is_empty(), "{:?}", input.warnings);
    let expected = [
        (
            "aks-nodepool1-19852467-vmss000000",
            "10.240.0.4",
            "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=",
            ["10.240.0.5", "10.240.0.6"],
        ),
        (
            "aks-nodepool1-19852467-vmss000001",
            "10.240.0.35",
            "bbcKpAY+Q9VpmIRLT+yPaaOALxqnonxBuk5LRlvKClA=",
            ["10.240.0.36", "10.240.0.37"],
        ),
        (
            "aks-nodepool1-19852467-vmss000002",
            "10.240.0.64",
            "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=",
            ["10.240.0.65", "10.240.0.66"],
        ),
    ];
    assert_eq!(input.cluster.nodes().len(), 3);
    for (name, address, public_key, workload) in expected {
        let n = node(&input, name);
        assert_eq!(n.addresses, ips(&[address]), "{name}: addresses");
        assert!(
            n.pod_cidrs.is_empty(),
            "{name}: Azure CNI nodes have no pod CIDR"
        );
        assert_eq!(n.underlay_mtu, 1500, "{name}: underlay_mtu");
        let wg = n.wireguard.as_ref().expect("wireguard");
        assert!(wg.enabled);
        assert_eq!(wg.public_key, key(public_key), "{name}: public_key");
        assert_eq!(wg.public_key_v6, None, "{name}: public_key_v6");
        assert_eq!(n.workload_ips, ips(&workload), "{name}: workload_ips");
        assert!(!input.nodes[name].control_plane);
    }
}

#[test]
fn aks_pods_each_contribute_what_they_should() {
    let mut warnings = Vec::new();
    let got: Vec<(String, PodWorkload)> = pods(AKS_PODS)
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap(),
                pod_workload(p, &mut warnings),
            )
        })
        .collect();
    assert!(warnings.is_empty());
    let on = |node: &str, list: &[&str]| PodWorkload::Ips {
        node: format!("aks-nodepool1-19852467-vmss00000{node}"),
        ips: ips(list),
    };
    let excluded = PodWorkload::Excluded;
    let expected = [
        ("coredns-6f8b9d9f4b-7xk2p", on("0", &["10.240.0.5"])),
        ("metrics-server-7b685846d6-q8w4r", on("0", &["10.240.0.6"])),
        ("coredns-6f8b9d9f4b-m2vjd", on("1", &["10.240.0.36"])),
        ("web-7d4b9c8f5d-2hx9n", on("1", &["10.240.0.37"])),
        ("web-7d4b9c8f5d-kz6tb", on("2", &["10.240.0.65"])),
        // status.podIP only (no podIPs): still read.
        (
            "konnectivity-agent-5c9d8b7f6-xq4lp",
            on("2", &["10.240.0.66"]),
        ),
        ("kube-proxy-8qz7c", excluded(PodExclusion::HostNetwork)),
        ("kube-proxy-j5wfl", excluded(PodExclusion::HostNetwork)),
        ("kube-proxy-tv2xm", excluded(PodExclusion::HostNetwork)),
        ("azure-cns-4xg9k", excluded(PodExclusion::HostNetwork)),
        (
            "cloud-node-manager-b7r4s",
            excluded(PodExclusion::HostNetwork),
        ),
        ("wgmesh-agent-h4k8d", excluded(PodExclusion::HostNetwork)),
        (
            "db-migrate-28731540-5hxw2",
            excluded(PodExclusion::Finished),
        ),
        ("report-28731545-r9s2m", excluded(PodExclusion::Finished)),
        ("web-7d4b9c8f5d-p7c4v", excluded(PodExclusion::NoAddress)),
        (
            "batch-big-5f6d7c8b9-zz4qk",
            excluded(PodExclusion::Unscheduled),
        ),
    ];
    assert_eq!(got.len(), expected.len());
    for ((name, workload), (want_name, want)) in got.iter().zip(expected) {
        assert_eq!(name, want_name);
        assert_eq!(workload, &want, "{name}");
    }
}

/// The cluster read from the API equals the design's sample cluster file, and so does every
/// node's plan.
#[test]
fn aks_fixture_matches_the_design_sample_and_its_plans() {
    let input = cluster_input(
        &aks_mesh(),
        &nodes(AKS_NODES),
        &pods(AKS_PODS),
        &AdapterOptions::default(),
    )
    .unwrap();
    let sample = parse_cluster(include_str!("../../examples/clusters/aks-azure-cni.json")).unwrap();
    assert_eq!(input.cluster.mesh(), sample.mesh());
    assert_eq!(input.cluster.nodes(), sample.nodes());
    for n in sample.nodes() {
        let plan = plan_node(&input.cluster, &n.name).unwrap();
        assert_eq!(plan, plan_node(&sample, &n.name).unwrap());
        // Host encryption with workload IPs: each peer allows its node and its two pods.
        for peer in &plan.interfaces[0].peers {
            assert_eq!(peer.allowed_ips.len(), 3, "{}", peer.node);
        }
    }
}

#[test]
fn kubeadm_nodes_with_pod_cidrs_calico_keys_and_bad_annotations() {
    let mesh = MeshConfig::default();
    let ns = nodes(KUBEADM_NODES);
    let ps = pods(KUBEADM_PODS);
    let input = cluster_input(&mesh, &ns, &ps, &AdapterOptions::default()).unwrap();
    let names: Vec<&str> = input
        .cluster
        .nodes()
        .iter()
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["cp-1", "worker-1", "worker-2", "worker-3", "worker-4"]
    );

    let cp = node(&input, "cp-1");
    assert_eq!(cp.addresses, ips(&["192.168.10.11"]));
    assert_eq!(cp.pod_cidrs, nets(&["10.244.0.0/24"]));
    assert_eq!(
        cp.key(Family::V4),
        key("gMlQgui6nSldMge6dtOuVVfO2JGX8vQdIqZViG+C0mU=")
    );
    assert_eq!(cp.workload_ips, ips(&["10.244.0.2", "10.244.0.3"]));
    assert!(input.nodes["cp-1"].control_plane);

    // ExternalIP and Hostname are not endpoints; the MTU annotation is read.
    let w1 = node(&input, "worker-1");
    assert_eq!(w1.addresses, ips(&["192.168.10.21"]));
    assert_eq!(w1.underlay_mtu, 9000);
    assert_eq!(w1.pod_cidrs, nets(&["10.244.1.0/24"]));
    assert_eq!(w1.workload_ips, ips(&["10.244.1.5"]));
    assert!(!input.nodes["worker-1"].control_plane);

    // Only Calico's key: plain unless Calico's annotations are read. A terminating pod still
    // holds its address.
    let w2 = node(&input, "worker-2");
    assert_eq!(w2.wireguard, None);
    assert_eq!(w2.workload_ips, ips(&["10.244.2.7"]));

    // Malformed keys: plain, and named in a warning. A bad MTU annotation: the default.
    assert_eq!(node(&input, "worker-3").wireguard, None);
    assert_eq!(node(&input, "worker-4").wireguard, None);
    assert_eq!(node(&input, "worker-4").underlay_mtu, 1500);
    assert_eq!(input.warnings.len(), 3, "{:?}", input.warnings);
    let text: Vec<String> = input.warnings.iter().map(ToString::to_string).collect();
    assert!(
        text[0].starts_with(
            "node \"worker-3\": annotation wgmesh.io/public-key is not a WireGuard public key"
        ),
        "{}",
        text[0]
    );
    assert!(text[0].ends_with("the node is treated as plain"));
    assert!(
        matches!(&input.warnings[1], AdapterWarning::MalformedKey { node, .. } if node == "worker-4")
    );
    assert_eq!(
        input.warnings[2],
        AdapterWarning::InvalidUnderlayMtu {
            node: "worker-4".into(),
            value: "jumbo".into()
        }
    );
    for w in &input.warnings {
        assert!(w.node().is_some());
    }

    // Plans: cp-1 peers only with worker-1; the others are thrown to the main table.
    let plan = plan_node(&input.cluster, "cp-1").unwrap();
    let peers: Vec<&str> = plan.interfaces[0]
        .peers
        .iter()
        .map(|p| p.node.as_str())
        .collect();
    assert_eq!(peers, ["worker-1"]);
    assert_eq!(
        plan.interfaces[0].peers[0].allowed_ips,
        nets(&["10.244.1.0/24"])
    );
    assert_eq!(plan.interfaces[0].mtu, 1440);
    let throws: Vec<String> = plan
        .routes
        .iter()
        .filter(|r| r.kind == RouteType::Throw)
        .map(|r| r.destination.to_string())
        .collect();
    assert_eq!(
        throws,
        [
            "10.244.0.0/24",
            "10.244.2.0/24",
            "10.244.3.0/24",
            "10.244.4.0/24"
        ]
    );

    // With Calico's annotations read, worker-2 takes part with Calico's key.
    let input = cluster_input(
        &mesh,
        &ns,
        &ps,
        &AdapterOptions::default().with_calico_annotations(true),
    )
    .unwrap();
    assert_eq!(
        node(&input, "worker-2").key(Family::V4),
        key("vsWW8b75ncTTrfcq8VTI4ceJP4NNvziOrGqWZWedtfE=")
    );
    let plan = plan_node(&input.cluster, "cp-1").unwrap();
    assert_eq!(plan.interfaces[0].peers.len(), 2);
    // A malformed wgmesh key is not papered over by Calico's.
    assert_eq!(node(&input, "worker-3").wireguard, None);
}

#[test]
fn dual_stack_nodes_and_pods() {
    let mesh = MeshConfig::default();
    let input = cluster_input(
        &mesh,
        &nodes(DS_NODES),
        &pods(DS_PODS),
        &AdapterOptions::default(),
    )
    .unwrap();
    assert!(input.warnings.is_empty());
    let expected = [
        (
            "ds-cp-1",
            ["172.18.0.2", "fc00:f853:ccd:e793::2"],
            ["10.244.0.0/24", "fd00:10:244::/64"],
            ["10.244.0.3", "fd00:10:244::3"],
            "D9vEzzQzW7Q3ywmNRnSYRVvP8yEJI0iBXZxTrkXn6sg=",
            Some("pH25Lps9kp8yhXYFxqrYd5RpQt++nSmKv+5XLdvrXks="),
        ),
        (
            "ds-worker-1",
            ["172.18.0.3", "fc00:f853:ccd:e793::3"],
            ["10.244.1.0/24", "fd00:10:244:1::/64"],
            ["10.244.1.4", "fd00:10:244:1::4"],
            "GF3krxLoqNrLSUxr0Yp+LV15PkmxI0+Lf69Ru65FxfQ=",
            Some("B67bDKgGIFts8tTq5eVvOVFy+l7fFuhpPTsNa4bJSH4="),
        ),
        (
            "ds-worker-2",
            ["172.18.0.4", "fc00:f853:ccd:e793::4"],
            ["10.244.2.0/24", "fd00:10:244:2::/64"],
            ["10.244.2.9", "fd00:10:244:2::9"],
            "STWo8TaK2eIC58ovM18vQkipG+1iAAX4A8CdBc/R+Tw=",
            None,
        ),
    ];
    for (name, addresses, cidrs, workload, k4, k6) in expected {
        let n = node(&input, name);
        assert_eq!(n.addresses, ips(&addresses), "{name}");
        assert_eq!(n.pod_cidrs, nets(&cidrs), "{name}");
        assert_eq!(n.workload_ips, ips(&workload), "{name}");
        assert_eq!(n.key(Family::V4), key(k4), "{name}");
        assert_eq!(n.key(Family::V6), k6.and_then(key), "{name}");
    }
    let plan = plan_node(&input.cluster, "ds-cp-1").unwrap();
    assert_eq!(plan.interfaces.len(), 2);
    let v4 = plan.interface(Family::V4).unwrap();
    let v6 = plan.interface(Family::V6).unwrap();
    assert_eq!(v4.peers.len(), 2);
    assert_eq!(v6.peers.len(), 1, "ds-worker-2 has no IPv6 key");
    assert_eq!(
        v6.peers[0].endpoint.to_string(),
        "[fc00:f853:ccd:e793::3]:51821"
    );
    assert_eq!(v6.peers[0].allowed_ips, nets(&["fd00:10:244:1::/64"]));
    assert_eq!(v6.mtu, 1420);
}

#[test]
fn a_fixed_mtu_below_1280_leaves_ipv6_out_instead_of_failing() {
    let mut mesh = MeshConfig::default();
    mesh.mtu = Some(1200);
    let input = cluster_input(&mesh, &nodes(DS_NODES), &[], &AdapterOptions::default()).unwrap();
    assert_eq!(input.warnings.len(), 3);
    for n in input.cluster.nodes() {
        assert!(n.address(Family::V6).is_none());
    }
}

/// Strict mode on AKS with Azure CNI: the VNet subnet is `cluster_cidrs`; a node labelled
/// `node-restriction.kubernetes.io/wgmesh-plain` is explicitly plain and stays reachable in
/// plaintext, while a node whose key annotation was removed is blackholed, and so is the
/// unknown part of the subnet (a pod not seen yet).
#[test]
fn aks_strict_mode_with_a_plain_label_and_a_removed_key() {
    let mut k8s = nodes(AKS_NODES);
    k8s[1]
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(wgmesh_k8s::adapter::PLAIN_LABEL.into(), "true".into());
    k8s[2]
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .remove("wgmesh.io/public-key");
    let mut mesh = aks_mesh();
    mesh.strict_mode = true;
    mesh.cluster_cidrs = nets(&["10.240.0.0/16"]);
    let input = cluster_input(&mesh, &k8s, &pods(AKS_PODS), &AdapterOptions::default()).unwrap();
    let plain = node(&input, "aks-nodepool1-19852467-vmss000001");
    assert!(plain.explicitly_plain());
    assert!(!node(&input, "aks-nodepool1-19852467-vmss000002").explicitly_plain());
    let plan = plan_node(&input.cluster, "aks-nodepool1-19852467-vmss000000").unwrap();
    let kind = |dest: &str| {
        let dest: IpNet = dest.parse().unwrap();
        plan.routes
            .iter()
            .find(|r| r.destination == dest)
            .map(|r| r.kind)
    };
    assert_eq!(kind("10.240.0.36/32"), Some(RouteType::Throw));
    assert_eq!(kind("10.240.0.35/32"), Some(RouteType::Throw));
    assert_eq!(kind("10.240.0.65/32"), Some(RouteType::Blackhole));
    assert_eq!(kind("10.240.0.64/32"), Some(RouteType::Blackhole));
    assert_eq!(kind("10.240.0.0/16"), Some(RouteType::Blackhole));
    // `false` is no opt-out.
    let mut k8s = nodes(AKS_NODES);
    k8s[1]
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(wgmesh_k8s::adapter::PLAIN_LABEL.into(), "false".into());
    let input = cluster_input(&mesh, &k8s, &pods(AKS_PODS), &AdapterOptions::default()).unwrap();
    assert!(!node(&input, "aks-nodepool1-19852467-vmss000001").explicitly_plain());
}

/// The agent's watch reads Pods as `LeanPod` (serde skips what it does not keep): every
/// recorded pod, read that way, is the stripped full Pod, and the adapter makes the same of it.
#[test]
fn lean_pods_are_the_stripped_recorded_pods() {
    use wgmesh_k8s::run::{LeanPod, strip_pod};
    for text in [
        include_str!("fixtures/aks-azure-cni-pods.json"),
        include_str!("fixtures/kubeadm-pods.json"),
        include_str!("fixtures/dual-stack-pods.json"),
    ] {
        let full = pods(text);
        let lean: Vec<LeanPod> = items(text);
        assert_eq!(full.len(), lean.len());
        for (mut f, l) in full.into_iter().zip(lean) {
            let l = l.into_pod();
            strip_pod(&mut f);
            assert_eq!(l.spec, f.spec);
            assert_eq!(l.status, f.status);
            assert_eq!(
                (&l.metadata.name, &l.metadata.namespace, &l.metadata.uid),
                (&f.metadata.name, &f.metadata.namespace, &f.metadata.uid)
            );
            assert_eq!(l.metadata.resource_version, f.metadata.resource_version);
            assert_eq!(l.metadata.deletion_timestamp, f.metadata.deletion_timestamp);
            let (mut wl, mut wf) = (Vec::new(), Vec::new());
            assert_eq!(pod_workload(&l, &mut wl), pod_workload(&f, &mut wf));
            assert_eq!(wl, wf);
        }
    }
}
