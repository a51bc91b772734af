//! Scenario tests of the agent's state machine, driven through watch events on a simulated
//! clock: nodes join and leave, keys rotate, pods churn, annotations are tampered with, the
//! API and the dataplane fail and recover. Each ends in the expected plan and the expected
//! dataplane operations, recorded by the recording applier.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use wgmesh_core::sim::{Drop, Outcome, Simulator, Source};
use wgmesh_core::{
    Family, MeshConfig, NodePlan, RouteSource, RouteType, plan_node, spec::parse_cluster,
};
use wgmesh_k8s::agent::{Agent, AgentSettings};
use wgmesh_k8s::bootstrap::guard_plan;
use wgmesh_k8s::dataplane::{Call, RecordingDataplane};
use wgmesh_k8s::metrics::Metrics;
use wgmesh_k8s::view::ControlPlaneEndpoints;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

/// The key of test node `n`, as operations show it.
fn key(n: u8) -> String {
    public(n).to_string()
}

/// The IPv4 key a node of the cluster the agent sees publishes.
fn node_key(d: &Driver, node: &str) -> String {
    let cluster = d.agent.view().cluster().unwrap();
    let wg = cluster.node(node).unwrap().wireguard.as_ref().unwrap();
    wg.key(Family::V4).unwrap().to_string()
}

/// The plan the node must end with: the full planner's, over the cluster the API server has.
fn expected_plan(d: &Driver) -> NodePlan {
    let cluster = d.agent.view().cluster().unwrap();
    plan_node(&cluster, &d.agent.settings().node_name).unwrap()
}

/// The agent's incremental state agrees with a full recompute, and the node has it.
fn assert_converged(d: &Driver) {
    let plan = expected_plan(d);
    assert_eq!(d.agent.plan().as_ref(), Some(&plan), "planner = full plan");
    let mut on_node = plan.clone();
    if d.agent.guarded() {
        guard_plan(&mut on_node);
    }
    assert_eq!(d.agent.dataplane().node(), &on_node, "node = plan");
}

// -------------------------------------------------------------------------------------------
// A kubeadm-style cluster: pod CIDRs, no pods watched.

fn kubeadm(mesh: MeshConfig) -> Driver {
    let settings = AgentSettings::new("a", mesh);
    let dataplane = RecordingDataplane::new(Some(public(1)), Some(public(1)));
    let mut d = Driver::new(Agent::new(settings, dataplane, Metrics::new()));
    d.start_with(
        &[
            wg_node("a", "10.0.0.1", &["10.65.0.0/26"], Some(public(1))),
            wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2))),
            wg_node("c", "10.0.0.3", &["10.65.0.128/26"], Some(public(3))),
        ],
        &[],
    );
    d
}

#[test]
fn initial_sync_applies_the_full_plan_once() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    let calls = d.agent.dataplane().calls().to_vec();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(matches!(calls[0], Call::Reconcile(_)));
    let (b, c) = (key(2), key(3));
    // wgmesh-netlink's operations, in its execution order.
    assert_eq!(
        d.take_ops(),
        [
            "create link wireguard.cali type wireguard mtu 1440 up".to_owned(),
            "set device wireguard.cali private-key (ipv4 key, hidden) listen-port 51820 fwmark 0x100000".to_owned(),
            format!("set peer {b} on wireguard.cali endpoint 10.0.0.2:51820 persistent-keepalive 0 add allowed-ips 10.65.0.64/26"),
            format!("set peer {c} on wireguard.cali endpoint 10.0.0.3:51820 persistent-keepalive 0 add allowed-ips 10.65.0.128/26"),
            "replace route throw 10.65.0.0/26 table 1".to_owned(),
            "replace route 10.65.0.64/26 dev wireguard.cali table 1 scope link".to_owned(),
            "replace route 10.65.0.128/26 dev wireguard.cali table 1 scope link".to_owned(),
            "sysctl net.ipv4.conf.all.src_valid_mark=1".to_owned(),
            "replace nftables table inet wgmesh (2 chains, 5 rules), table arp wgmesh (1 chains, 4 rules)".to_owned(),
            "add rule 99:\tnot from all fwmark 0x100000/0x100000 lookup 1".to_owned(),
        ]
    );
    assert_converged(&d);
    // Published key matches: nothing to publish, not guarded, ready.
    assert!(d.publications.is_empty());
    assert!(!d.agent.guarded());
    assert!(d.agent.state().ready());
    // Quiet: nothing more happens until the resync.
    d.run_for(60 * S);
    assert!(d.take_calls().is_empty());
}

#[test]
fn nothing_is_applied_before_the_lists_are_complete() {
    let settings = AgentSettings::new("a", MeshConfig::default());
    let mut d = Driver::new(Agent::new(
        settings,
        RecordingDataplane::new(Some(public(1)), None),
        Metrics::new(),
    ));
    use kube::runtime::watcher::Event;
    d.agent.on_nodes(Event::Init, d.now);
    d.agent.on_nodes(
        Event::InitApply(wg_node("a", "10.0.0.1", &[], Some(public(1)))),
        d.now,
    );
    d.run_for(5 * S);
    assert!(d.take_calls().is_empty());
    assert!(!d.agent.state().synced);
    assert!(d.publications.is_empty(), "no publication before the list");
    d.agent.on_nodes(Event::InitDone, d.now);
    d.run_for(MS);
    assert_eq!(d.take_calls().len(), 1);
    assert!(d.agent.state().synced);
}

#[test]
fn a_node_joins_then_leaves() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    d.take_ops();
    d.node(wg_node(
        "d",
        "10.0.0.4",
        &["10.65.0.192/26"],
        Some(public(4)),
    ));
    d.run_for(50 * MS);
    assert!(d.take_calls().is_empty(), "debounced");
    d.run_for(60 * MS);
    assert_eq!(d.agent.dataplane().calls().len(), 1);
    assert!(matches!(d.agent.dataplane().calls()[0], Call::Delta(_)));
    let k = key(4);
    assert_eq!(
        d.take_ops(),
        [
            format!(
                "set peer {k} on wireguard.cali endpoint 10.0.0.4:51820 persistent-keepalive 0 add allowed-ips 10.65.0.192/26"
            ),
            format!(
                "start handshake with peer {k} on wireguard.cali (persistent-keepalive 25, then off)"
            ),
            "replace route 10.65.0.192/26 dev wireguard.cali table 1 scope link".to_owned(),
        ]
    );
    assert_converged(&d);

    d.delete_node("d");
    d.run_for(200 * MS);
    assert_eq!(
        d.take_ops(),
        [
            "delete route 10.65.0.192/26 dev wireguard.cali table 1 metric 0".to_owned(),
            format!("remove peer {k} from wireguard.cali"),
        ]
    );
    assert_converged(&d);
}

#[test]
fn a_peer_rotates_its_key() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    d.take_ops();
    d.node(wg_node(
        "b",
        "10.0.0.2",
        &["10.65.0.64/26"],
        Some(public(22)),
    ));
    d.run_for(200 * MS);
    let calls = d.agent.dataplane().calls().to_vec();
    let Call::Delta(delta) = &calls[0] else {
        panic!("{calls:?}")
    };
    assert_eq!(delta.peers_removed[0].public_key, public(2));
    assert_eq!(delta.peers_added[0].peer.public_key, public(22));
    let (old, new) = (key(2), key(22));
    assert_eq!(
        d.take_ops(),
        [
            format!(
                "set peer {new} on wireguard.cali endpoint 10.0.0.2:51820 persistent-keepalive 0 add allowed-ips 10.65.0.64/26"
            ),
            format!(
                "start handshake with peer {new} on wireguard.cali (persistent-keepalive 25, then off)"
            ),
            format!("remove peer {old} from wireguard.cali"),
        ],
        "add the new key (it takes the allowed IPs), then remove the old one; routes stay"
    );
    assert_converged(&d);
}

#[test]
fn node_heartbeats_change_nothing() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    d.take_calls();
    for i in 0..8 {
        let mut b = wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2)));
        b.metadata.resource_version = Some(format!("{}", 100 + i));
        b.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].last_heartbeat_time = None;
        d.node(b);
        d.run_for(10 * S);
    }
    assert!(d.take_calls().is_empty());
    // The resync's full reconcile finds nothing to do either.
    d.run_for(20 * S);
    let calls = d.take_calls();
    assert_eq!(calls.len(), 1);
    assert!(matches!(calls[0], Call::Reconcile(_)));
    assert!(d.agent.dataplane().ops().is_empty());
}

/// The peer counts of the metrics follow deltas (a peer removed, then added again) without a
/// full plan: read at the next stats refresh.
#[test]
fn peer_counts_follow_deltas() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    let peers = |d: &Driver| {
        let text = d.agent.metrics().render();
        text.lines()
            .find(|l| l.starts_with("wgmesh_peers{"))
            .map(str::to_owned)
            .unwrap_or_default()
    };
    d.run_for(20 * S);
    let before = peers(&d);
    assert!(before.ends_with(" 2"), "{before}");
    let b = wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2)));
    d.node(annotate(
        b.clone(),
        "wgmesh.io/public-key",
        Some("garbage!"),
    ));
    d.run_for(20 * S);
    assert!(peers(&d).ends_with(" 1"), "{}", peers(&d));
    d.node(b);
    d.run_for(20 * S);
    assert_eq!(peers(&d), before);
    assert!(
        d.take_calls()
            .iter()
            .filter(|c| matches!(c, Call::Delta(_)))
            .count()
            >= 2
    );
}

#[test]
fn a_tampered_peer_annotation_makes_it_plain_until_restored() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    d.take_ops();
    let b = wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2)));
    d.node(annotate(
        b.clone(),
        "wgmesh.io/public-key",
        Some("garbage!"),
    ));
    d.run_for(200 * MS);
    assert_eq!(
        d.take_ops(),
        [
            format!("remove peer {} from wireguard.cali", key(2)),
            "replace route throw 10.65.0.64/26 table 1".to_owned(),
        ],
        "b is plain: its block is thrown to the main table (the route replaced in place)"
    );
    let metrics = d.agent.metrics().render();
    assert!(metrics.contains("wgmesh_warnings_total 1\n"), "{metrics}");
    assert_converged(&d);
    // The same bad value again (a status update) is not warned about twice.
    d.node(annotate(
        b.clone(),
        "wgmesh.io/public-key",
        Some("garbage!"),
    ));
    let metrics = d.agent.metrics().render();
    assert!(metrics.contains("wgmesh_warnings_total 1\n"));

    d.node(b);
    d.run_for(200 * MS);
    let k = key(2);
    assert_eq!(
        d.take_ops(),
        [
            format!(
                "set peer {k} on wireguard.cali endpoint 10.0.0.2:51820 persistent-keepalive 0 add allowed-ips 10.65.0.64/26"
            ),
            format!(
                "start handshake with peer {k} on wireguard.cali (persistent-keepalive 25, then off)"
            ),
            "replace route 10.65.0.64/26 dev wireguard.cali table 1 scope link".to_owned(),
        ],
        "the throw route is replaced in place"
    );
    assert_converged(&d);
}

#[test]
fn a_duplicated_key_removes_both_claimants_until_it_clears() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    d.take_ops();
    // c publishes b's key.
    d.node(wg_node(
        "c",
        "10.0.0.3",
        &["10.65.0.128/26"],
        Some(public(2)),
    ));
    d.run_for(200 * MS);
    let plan = d.agent.plan().unwrap();
    assert!(plan.interfaces[0].peers.is_empty());
    assert!(plan.routes.iter().all(|r| r.kind == RouteType::Throw));
    assert_converged(&d);
    d.node(wg_node(
        "c",
        "10.0.0.3",
        &["10.65.0.128/26"],
        Some(public(3)),
    ));
    d.run_for(200 * MS);
    assert_eq!(d.agent.plan().unwrap().interfaces[0].peers.len(), 2);
    assert_converged(&d);
}

#[test]
fn a_block_moves_between_nodes() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    d.take_ops();
    d.node(wg_node("b", "10.0.0.2", &[], Some(public(2))));
    d.node(wg_node(
        "c",
        "10.0.0.3",
        &["10.65.0.128/26", "10.65.0.64/26"],
        Some(public(3)),
    ));
    d.run_for(200 * MS);
    let ops = d.take_ops();
    assert!(
        ops.contains(&format!(
            "set peer {} on wireguard.cali add allowed-ips 10.65.0.64/26",
            key(3)
        )),
        "{ops:?}"
    );
    assert_converged(&d);
    let plan = d.agent.plan().unwrap();
    let b = plan.interfaces[0]
        .peers
        .iter()
        .find(|p| p.node == "b")
        .unwrap();
    assert!(b.allowed_ips.is_empty());
}

// -------------------------------------------------------------------------------------------
// AKS with Azure CNI: workload addresses from pods, host encryption.

fn aks() -> Driver {
    aks_with(|_| {})
}

fn aks_with(tune: impl FnOnce(&mut AgentSettings)) -> Driver {
    #[derive(serde::Deserialize)]
    struct List<T> {
        items: Vec<T>,
    }
    let nodes: List<k8s_openapi::api::core::v1::Node> =
        serde_json::from_str(include_str!("fixtures/aks-azure-cni-nodes.json")).unwrap();
    let pods: List<k8s_openapi::api::core::v1::Pod> =
        serde_json::from_str(include_str!("fixtures/aks-azure-cni-pods.json")).unwrap();
    let mut mesh = MeshConfig::default();
    mesh.route_source = RouteSource::WorkloadIps;
    mesh.host_encryption = true;
    let mut settings = AgentSettings::new("aks-nodepool1-19852467-vmss000000", mesh);
    settings.control_plane =
        ControlPlaneEndpoints::new(vec!["10.0.0.1:443".parse().unwrap()], Some(6443));
    assert!(settings.watch_pods);
    tune(&mut settings);
    let key = "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="
        .parse()
        .unwrap();
    let dataplane = RecordingDataplane::new(Some(key), Some(key));
    let mut d = Driver::new(Agent::new(settings, dataplane, Metrics::new()));
    d.start_with(&nodes.items, &pods.items);
    d
}

const N1: &str = "aks-nodepool1-19852467-vmss000001";
const N2: &str = "aks-nodepool1-19852467-vmss000002";

#[test]
fn aks_initial_plan_equals_the_design_sample() {
    let mut d = aks();
    d.run_for(10 * MS);
    let mut sample =
        parse_cluster(include_str!("../../examples/clusters/aks-azure-cni.json")).unwrap();
    let mut mesh = sample.mesh().clone();
    mesh.control_plane_endpoints = vec!["10.0.0.1:443".parse().unwrap()];
    sample.set_mesh(mesh).unwrap();
    let plan = plan_node(&sample, "aks-nodepool1-19852467-vmss000000").unwrap();
    assert_eq!(d.agent.dataplane().node(), &plan);
    let marking = plan.marking.as_ref().unwrap();
    assert!(!marking.mark_output, "host encryption");
    assert_eq!(
        marking.plain_tcp_endpoints,
        ["10.0.0.1:443".parse::<SocketAddr>().unwrap()]
    );
    assert_converged(&d);
}

#[test]
fn pods_churn_in_debounced_batches() {
    let mut d = aks();
    d.run_for(10 * MS);
    d.take_ops();
    // Three pods start on node 1 within the 100 ms after the first: one batch, applied
    // 100 ms after the first.
    for (i, ip) in ["10.240.0.40", "10.240.0.41", "10.240.0.42"]
        .iter()
        .enumerate()
    {
        d.pod(pod("default", &format!("web-{i}"), N1, &[ip], "Running"));
        d.run_for(30 * MS);
    }
    assert!(d.agent.dataplane().calls().is_empty(), "still debouncing");
    d.run_for(20 * MS);
    let calls = d.take_calls();
    assert_eq!(calls.len(), 3, "one delta per event, applied together");
    assert!(calls.iter().all(|c| matches!(c, Call::Delta(_))));
    assert_converged(&d);
    let plan = d.agent.plan().unwrap();
    let peer = plan.interfaces[0]
        .peers
        .iter()
        .find(|p| p.node == N1)
        .unwrap();
    assert_eq!(peer.allowed_ips.len(), 6);

    // A pod finishes: its address goes. A host-network pod adds nothing.
    d.pod(pod("default", "web-1", N1, &["10.240.0.41"], "Succeeded"));
    d.pod(host_pod(
        "kube-system",
        "node-exporter-x",
        N1,
        "10.240.0.35",
    ));
    d.run_for(200 * MS);
    assert_eq!(
        d.take_ops(),
        [
            "delete route 10.240.0.41/32 dev wireguard.cali table 1 metric 0".to_owned(),
            format!(
                "remove allowed-ips 10.240.0.41/32 from peer {} on wireguard.cali",
                node_key(&d, N1)
            ),
        ]
    );
    // The finished pod is deleted later: nothing more.
    d.delete_pod(pod("default", "web-1", N1, &["10.240.0.41"], "Succeeded"));
    d.run_for(200 * MS);
    assert!(d.take_ops().is_empty());

    // An address handed from a terminating pod to a new one on the same node: no change;
    // it goes only when neither holds it.
    d.pod(pod("default", "web-new", N1, &["10.240.0.42"], "Running"));
    d.delete_pod(pod("default", "web-2", N1, &["10.240.0.42"], "Running"));
    d.run_for(200 * MS);
    assert!(d.take_ops().is_empty());
    d.delete_pod(pod("default", "web-new", N1, &["10.240.0.42"], "Running"));
    d.run_for(200 * MS);
    assert_eq!(d.take_ops().len(), 2);
    assert_converged(&d);

    // A pod on the local node: a throw route only.
    d.pod(pod(
        "default",
        "local-1",
        "aks-nodepool1-19852467-vmss000000",
        &["10.240.0.8"],
        "Running",
    ));
    d.run_for(200 * MS);
    assert_eq!(d.take_ops(), ["replace route throw 10.240.0.8/32 table 1"]);
    assert_converged(&d);
}

#[test]
fn a_continuous_burst_is_applied_within_max_delay() {
    // Longer than the debounce: a change every 50 ms never leaves 100 ms of quiet.
    let mut d = aks_with(|s| s.max_delay = 300 * MS);
    d.run_for(10 * MS);
    d.take_calls();
    let start = d.elapsed();
    let mut first_call = None;
    for i in 0..40u8 {
        d.pod(pod(
            "default",
            &format!("burst-{i}"),
            N2,
            &[&format!("10.240.0.{}", 100 + i)],
            "Running",
        ));
        d.run_for(50 * MS);
        if first_call.is_none() && !d.agent.dataplane().calls().is_empty() {
            first_call = Some(d.elapsed() - start);
        }
    }
    let first = first_call.expect("applied while the burst went on");
    let max_delay = d.agent.settings().max_delay;
    assert!(first <= max_delay + Duration::from_millis(50), "{first:?}");
    assert!(first >= max_delay - Duration::from_millis(50), "{first:?}");
    d.run_for(200 * MS);
    assert_converged(&d);
}

#[test]
fn too_many_pending_deltas_become_one_full_reconcile() {
    let mut d = aks_with(|s| s.max_pending_deltas = 256);
    d.run_for(10 * MS);
    d.take_calls();
    for i in 0..300u16 {
        d.pod(pod(
            "default",
            &format!("many-{i}"),
            N2,
            &[&format!("10.241.{}.{}", i / 250, i % 250 + 1)],
            "Running",
        ));
    }
    d.run_for(200 * MS);
    let calls = d.take_calls();
    assert_eq!(calls.len(), 1);
    assert!(matches!(calls[0], Call::Reconcile(_)));
    assert_converged(&d);
}

/// The limit grows with the cluster (a quarter of its pods): a full reconcile costs in
/// proportion to the whole plan, deltas in proportion to themselves.
#[test]
fn the_pending_delta_limit_grows_with_the_pods() {
    let mut d = aks_with(|s| s.max_pending_deltas = 2);
    d.run_for(10 * MS);
    for i in 0..40u16 {
        d.pod(pod(
            "default",
            &format!("base-{i}"),
            N2,
            &[&format!("10.241.0.{}", i + 1)],
            "Running",
        ));
        d.run_for(300 * MS);
    }
    d.take_calls();
    // More than 2 deltas pending, fewer than a quarter of the pods.
    for i in 0..5u16 {
        d.pod(pod(
            "default",
            &format!("more-{i}"),
            N2,
            &[&format!("10.241.1.{}", i + 1)],
            "Running",
        ));
    }
    d.run_for(200 * MS);
    let calls = d.take_calls();
    assert_eq!(calls.len(), 5, "{calls:?}");
    assert!(
        calls.iter().all(|c| matches!(c, Call::Delta(_))),
        "{calls:?}"
    );
    assert_converged(&d);
}

#[test]
fn control_plane_nodes_become_plain_tcp_endpoints() {
    let mut d = aks();
    d.run_for(10 * MS);
    d.take_ops();
    d.node(node(
        "cp-1",
        &["10.240.0.200"],
        &[],
        &[],
        &[("node-role.kubernetes.io/control-plane", "")],
    ));
    d.run_for(200 * MS);
    let marking = d.agent.dataplane().node().marking.clone().unwrap();
    assert_eq!(
        marking.plain_tcp_endpoints,
        [
            "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
            "10.240.0.200:6443".parse().unwrap()
        ]
    );
    // The marking, compiled to nftables: the output chain marks the two endpoints' TCP in
    // both directions.
    let ops = d.agent.dataplane().ops().to_vec();
    let tables = ops
        .iter()
        .find_map(|o| match o {
            wgmesh_netlink::Operation::SetMarking { tables } => Some(tables.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{ops:#?}"));
    assert_eq!(tables, wgmesh_netlink::marking::compile(&marking));
    assert_eq!(tables[0].chains[1].name, "output");
    assert_eq!(tables[0].chains[1].rules.len(), 4);
    assert_converged(&d);
}

// -------------------------------------------------------------------------------------------
// Failures and recovery.

#[test]
fn a_relist_after_an_outage_catches_up() {
    let mut d = aks();
    d.run_for(10 * MS);
    d.take_ops();
    d.agent.on_watch_error(
        wgmesh_k8s::agent::Resource::Nodes,
        "connection reset",
        d.now,
    );
    d.agent
        .on_watch_error(wgmesh_k8s::agent::Resource::Pods, "410 Gone", d.now);
    let n2 = node_key(&d, N2);
    // While the watches were down, node 2 was deleted and a pod started on node 1.
    let mut nodes: Vec<_> = d.nodes.values().cloned().collect();
    nodes.retain(|n| n.metadata.name.as_deref() != Some(N2));
    d.nodes.remove(N2);
    // The agent keeps no copy of the Pod objects: the relist is the recorded list again.
    #[derive(serde::Deserialize)]
    struct List {
        items: Vec<k8s_openapi::api::core::v1::Pod>,
    }
    let mut pods = serde_json::from_str::<List>(include_str!("fixtures/aks-azure-cni-pods.json"))
        .unwrap()
        .items;
    pods.push(pod("default", "late", N1, &["10.240.0.50"], "Running"));
    for ev in relist(&nodes) {
        d.agent.on_nodes(ev, d.now);
    }
    for ev in relist(&pods) {
        d.agent.on_pods(ev, d.now);
    }
    d.run_for(200 * MS);
    let ops = d.take_ops();
    assert!(
        ops.contains(&format!("remove peer {n2} from wireguard.cali")),
        "{ops:?}"
    );
    assert!(
        ops.contains(&"replace route 10.240.0.50/32 dev wireguard.cali table 1 scope link".into())
    );
    assert_converged(&d);
    let metrics = d.agent.metrics().render();
    assert!(metrics.contains("wgmesh_errors_total{source=\"watch_nodes\"} 1\n"));
    assert!(metrics.contains("wgmesh_errors_total{source=\"watch_pods\"} 1\n"));
}

#[test]
fn a_failed_dataplane_update_is_repaired_by_a_full_reconcile_after_backoff() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    d.take_calls();
    d.agent.dataplane_mut().fail_next(2);
    d.node(wg_node(
        "d",
        "10.0.0.4",
        &["10.65.0.192/26"],
        Some(public(4)),
    ));
    d.run_for(150 * MS);
    let calls = d.take_calls();
    assert_eq!(calls.len(), 1);
    assert!(matches!(calls[0], Call::Delta(_)));
    assert!(!d.agent.state().ready());
    // First retry after 1 s: a full reconcile, which fails again; the next after 2 s more.
    d.run_for(900 * MS);
    assert!(d.take_calls().is_empty());
    d.run_for(200 * MS);
    let calls = d.take_calls();
    assert_eq!(calls.len(), 1);
    assert!(matches!(calls[0], Call::Reconcile(_)));
    // (The second failure was at about 1.11 s; the next try is 2 s later.)
    d.run_for(1800 * MS);
    assert!(d.take_calls().is_empty());
    d.run_for(200 * MS);
    assert_eq!(d.take_calls().len(), 1);
    assert!(d.agent.state().ready());
    assert_converged(&d);
    let metrics = d.agent.metrics().render();
    assert!(metrics.contains("wgmesh_reconciles_total{kind=\"delta\",result=\"error\"} 1\n"));
    assert!(metrics.contains("wgmesh_reconciles_total{kind=\"full\",result=\"error\"} 1\n"));
    assert!(metrics.contains("wgmesh_reconciles_total{kind=\"full\",result=\"ok\"} 2\n"));
    assert!(metrics.contains("wgmesh_errors_total{source=\"dataplane\"} 2\n"));
}

#[test]
fn the_resync_timer_repairs_drift_every_90_seconds() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    d.take_ops();
    // Someone deletes a route and a peer by hand.
    let node = d.agent.dataplane_mut().node_mut();
    node.routes.retain(|r| r.kind == RouteType::Throw);
    node.interfaces[0].peers.pop();
    d.run_for(89 * S);
    assert!(d.take_calls().is_empty());
    d.run_for(2 * S);
    let ops = d.take_ops();
    // The peer (and its handshake started) and the two routes.
    assert_eq!(ops.len(), 4, "{ops:?}");
    assert!(
        ops.iter()
            .filter(|o| o.starts_with("replace route"))
            .count()
            == 2
    );
    assert!(ops.iter().any(|o| o.starts_with("set peer")));
    assert!(ops.iter().any(|o| o.starts_with("start handshake")));
    assert_converged(&d);
    // And again 90 s later (nothing to repair then).
    d.run_for(90 * S);
    let calls = d.take_calls();
    assert_eq!(calls.len(), 1);
    assert!(matches!(calls[0], Call::Reconcile(_)));
}

// -------------------------------------------------------------------------------------------
// Publishing the node's key.

#[test]
fn a_fresh_node_publishes_its_key_and_joins_on_the_echo() {
    let settings = AgentSettings::new("a", MeshConfig::default());
    let mut d = Driver::new(Agent::new(
        settings,
        RecordingDataplane::new(Some(public(1)), Some(public(1))),
        Metrics::new(),
    ));
    d.echo = false;
    d.start_with(
        &[
            wg_node("a", "10.0.0.1", &["10.65.0.0/26"], None),
            wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2))),
        ],
        &[],
    );
    d.run_for(10 * MS);
    // No key published yet: a is plain and programs nothing.
    assert!(d.agent.dataplane().node().is_empty());
    assert_eq!(d.publications.len(), 1);
    let p = &d.publications[0].1;
    assert_eq!(p.node, "a");
    assert_eq!(
        p.apply.get("wgmesh.io/public-key"),
        Some(&public(1).to_base64())
    );
    assert!(
        !p.apply.contains_key("wgmesh.io/public-key-v6"),
        "no IPv6 address, no IPv6 key"
    );
    assert!(p.remove.is_empty());
    // The echo arrives through the watch: a joins the mesh.
    let a = wg_node("a", "10.0.0.1", &["10.65.0.0/26"], Some(public(1)));
    d.node(a);
    d.run_for(200 * MS);
    assert_eq!(d.agent.dataplane().node().interfaces[0].peers.len(), 1);
    assert!(d.agent.key_check().unwrap().confirmed());
    assert_converged(&d);
}

#[test]
fn the_agent_never_publishes_to_a_node_that_is_not_there() {
    let settings = AgentSettings::new("ghost", MeshConfig::default());
    let mut d = Driver::new(Agent::new(
        settings,
        RecordingDataplane::new(Some(public(1)), None),
        Metrics::new(),
    ));
    d.start_with(&[wg_node("b", "10.0.0.2", &[], Some(public(2)))], &[]);
    d.run_for(30 * S);
    assert!(d.publications.is_empty());
    // The plan of a node that is not there is empty.
    assert!(d.agent.dataplane().node().is_empty());
}

#[test]
fn failed_publications_back_off_exponentially() {
    let settings = AgentSettings::new("a", MeshConfig::default());
    let mut d = Driver::new(Agent::new(
        settings,
        RecordingDataplane::new(Some(public(1)), None),
        Metrics::new(),
    ));
    d.fail_publications = 4;
    d.start_with(&[wg_node("a", "10.0.0.1", &[], None)], &[]);
    d.run_for(20 * S);
    let times: Vec<u64> = d
        .publications
        .iter()
        .map(|(t, _)| t.as_millis() as u64)
        .collect();
    // 1 s, 2 s, 4 s, 8 s apart, each less up to half of it (jitter).
    assert_eq!(times.len(), 5, "{times:?}");
    assert_eq!(times[0], 0);
    for (gap, full) in times
        .windows(2)
        .map(|w| w[1] - w[0])
        .zip([1000, 2000, 4000, 8000])
    {
        assert!(gap >= full / 2 && gap <= full, "{times:?}");
    }
    assert!(d.agent.key_check().unwrap().confirmed());
    let metrics = d.agent.metrics().render();
    assert!(metrics.contains("wgmesh_publishes_total{result=\"error\"} 4\n"));
    assert!(metrics.contains("wgmesh_publishes_total{result=\"ok\"} 1\n"));
    assert!(metrics.contains("wgmesh_key_published 1\n"));
}

#[test]
fn a_lost_echo_is_retried_after_the_echo_timeout() {
    let settings = AgentSettings::new("a", MeshConfig::default());
    let mut d = Driver::new(Agent::new(
        settings,
        RecordingDataplane::new(Some(public(1)), None),
        Metrics::new(),
    ));
    d.echo = false;
    d.start_with(&[wg_node("a", "10.0.0.1", &[], None)], &[]);
    d.run_for(9 * S);
    assert_eq!(d.publications.len(), 1);
    d.run_for(2 * S);
    assert_eq!(
        d.publications.len(),
        2,
        "republished after 10 s without echo"
    );
}

#[test]
fn a_tampered_own_annotation_is_republished_and_a_fight_backs_off() {
    let mut mesh = MeshConfig::default();
    mesh.host_encryption = true;
    let mut d = kubeadm(mesh);
    d.run_for(10 * MS);
    assert!(d.publications.is_empty());
    assert!(!d.agent.guarded());
    d.take_calls();
    // Someone overwrites a's key: a guards its host traffic and republishes at once.
    let tampered = wg_node("a", "10.0.0.1", &["10.65.0.0/26"], Some(public(9)));
    d.node(tampered.clone());
    d.run_for(MS);
    assert_eq!(d.publications.len(), 1);
    assert_eq!(
        d.publications[0].1.apply["wgmesh.io/public-key"],
        public(1).to_base64()
    );
    // The echo restored the key: unguarded again, and the node matches the plan.
    d.run_for(200 * MS);
    assert!(!d.agent.guarded());
    assert_converged(&d);
    let calls = d.take_calls();
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, Call::Reconcile(p) if p.marking.as_ref().unwrap().mark_output)),
        "guarded while tampered: {calls:?}"
    );

    // Someone keeps overwriting it: each republish waits longer (1 s, 2 s, 4 s …, each less
    // up to half of it: jitter, so that agents failing together retry apart).
    for _ in 0..5 {
        d.node(tampered.clone());
        let before = d.publications.len();
        while d.publications.len() == before {
            d.run_for(100 * MS);
        }
    }
    let times: Vec<u128> = d.publications.iter().map(|(t, _)| t.as_millis()).collect();
    let gaps: Vec<u128> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, full) in gaps.iter().zip([1000u128, 2000, 4000, 8000, 16000]) {
        assert!(*gap >= full / 2 && *gap <= full + 100, "{times:?}");
    }
    assert!(
        gaps.iter()
            .zip([1000u128, 2000, 4000, 8000, 16000])
            .any(|(g, f)| *g < f),
        "{times:?}"
    );
    // Left alone for a minute, the backoff resets.
    d.run_for(61 * S);
    d.node(tampered);
    let at = d.elapsed();
    d.run_for(MS);
    assert_eq!(d.publications.last().unwrap().0, at, "republished at once");
}

#[test]
fn disabling_wireguard_leaves_in_phases_then_clears_the_keys_and_removes_everything() {
    let mut d = kubeadm(MeshConfig::default());
    d.run_for(10 * MS);
    assert!(!d.agent.dataplane().node().is_empty());
    // The operator rolls out `enabled: false`: a new agent starts with it.
    let mut mesh = MeshConfig::default();
    mesh.enabled = false;
    let dataplane = d.agent.dataplane().clone();
    let mut d2 = Driver::new(Agent::new(
        AgentSettings::new("a", mesh),
        dataplane,
        Metrics::new(),
    ));
    let nodes: Vec<_> = d.nodes.values().cloned().collect();
    d2.start_with(&nodes, &[]);
    d2.take_ops();
    d2.run_for(200 * MS);
    // First the leaving marker, the key kept; the device stays (peers now route to the node
    // plain and still accept its encrypted packets).
    assert_eq!(d2.publications.len(), 1);
    let p = &d2.publications[0].1;
    assert_eq!(
        p.apply.get("wgmesh.io/phase").map(String::as_str),
        Some("leaving")
    );
    assert_eq!(
        p.apply.get("wgmesh.io/public-key"),
        Some(&public(1).to_base64())
    );
    assert!(p.remove.is_empty());
    assert!(!d2.agent.dataplane().node().is_empty());
    assert_eq!(
        d2.agent
            .view()
            .cluster()
            .unwrap()
            .node("a")
            .unwrap()
            .phase(),
        wgmesh_core::Phase::Leaving
    );
    assert!(!d2.take_ops().iter().any(|o| o.starts_with("delete link")));
    // Still there just before the settle time (10 s) is over...
    d2.run_for(9 * S);
    assert!(!d2.agent.dataplane().node().is_empty());
    assert_eq!(d2.publications.len(), 1);
    // ... gone after it, and only then are the key and the marker withdrawn.
    d2.run_for(S);
    assert!(d2.agent.dataplane().node().is_empty());
    let ops = d2.take_ops();
    assert!(
        ops.contains(&"delete link wireguard.cali".to_string()),
        "{ops:?}"
    );
    assert!(ops.contains(&"delete nftables tables wgmesh".to_string()));
    assert!(
        ops.iter()
            .any(|o| o.starts_with("delete rule ipv4 pref 99"))
    );
    assert_eq!(d2.publications.len(), 2);
    let p = &d2.publications[1].1;
    assert!(p.apply.is_empty());
    assert_eq!(p.remove, ["wgmesh.io/public-key", "wgmesh.io/phase"]);
    // After the echo the annotations are gone and nothing more is asked.
    d2.run_for(30 * S);
    assert_eq!(d2.publications.len(), 2);
    let annotations = d2.nodes["a"].metadata.annotations.clone().unwrap();
    assert_eq!(annotations.get("wgmesh.io/public-key"), None);
    assert_eq!(annotations.get("wgmesh.io/phase"), None);
    assert!(d2.agent.dataplane().node().is_empty());
}

#[test]
fn the_underlay_mtu_is_published_when_configured_and_read_by_peers() {
    let mut settings = AgentSettings::new("a", MeshConfig::default());
    settings.underlay_mtu = Some(9000);
    let mut d = Driver::new(Agent::new(
        settings,
        RecordingDataplane::new(Some(public(1)), None),
        Metrics::new(),
    ));
    d.start_with(
        &[
            wg_node("a", "10.0.0.1", &[], Some(public(1))),
            wg_node("b", "10.0.0.2", &[], Some(public(2))),
        ],
        &[],
    );
    d.run_for(200 * MS);
    assert_eq!(d.publications[0].1.apply["wgmesh.io/underlay-mtu"], "9000");
    // b stays at 1500, so a's MTU stays 1440; b moving to 9000 raises it to 8940.
    assert_eq!(d.agent.dataplane().node().interfaces[0].mtu, 1440);
    let b = annotate(
        wg_node("b", "10.0.0.2", &[], Some(public(2))),
        "wgmesh.io/underlay-mtu",
        Some("9000"),
    );
    d.node(b);
    d.run_for(200 * MS);
    assert_eq!(d.agent.dataplane().node().interfaces[0].mtu, 8940);
    assert_converged(&d);
}

// -------------------------------------------------------------------------------------------
// The host-encryption bootstrap.

/// A kubeadm cluster with host encryption whose API server runs on cp-1 (192.168.10.11:6443).
fn bootstrap_cluster(worker_key: u8) -> Vec<k8s_openapi::api::core::v1::Node> {
    vec![
        node(
            "cp-1",
            &["192.168.10.11"],
            &["10.244.0.0/24"],
            &[("wgmesh.io/public-key", &public(10).to_base64())],
            &[("node-role.kubernetes.io/control-plane", "")],
        ),
        wg_node(
            "worker-1",
            "192.168.10.21",
            &["10.244.1.0/24"],
            Some(public(worker_key)),
        ),
        wg_node(
            "worker-2",
            "192.168.10.22",
            &["10.244.2.0/24"],
            Some(public(12)),
        ),
    ]
}

fn host_encryption() -> MeshConfig {
    let mut mesh = MeshConfig::default();
    mesh.host_encryption = true;
    mesh
}

fn agent_for(name: &str, key: u8, control_plane: bool) -> Driver {
    let mut settings = AgentSettings::new(name, host_encryption());
    settings.control_plane = if control_plane {
        ControlPlaneEndpoints::new(vec!["10.96.0.1:443".parse().unwrap()], Some(6443))
    } else {
        ControlPlaneEndpoints::default()
    };
    Driver::new(Agent::new(
        settings,
        RecordingDataplane::new(Some(public(key)), Some(public(key))),
        Metrics::new(),
    ))
}

/// Walks the API request from worker-1's host to the API server on cp-1, and the reply.
/// The simulator has no TCP ports: a packet that matches the marking's API server
/// endpoints is modelled as a host packet of a node whose output marking is on.
fn api_round_trip(
    cluster: &wgmesh_core::Cluster,
    worker: &NodePlan,
    cp: &NodePlan,
    others: &[NodePlan],
) -> (Outcome, Outcome) {
    let api: SocketAddr = "192.168.10.11:6443".parse().unwrap();
    let for_api = |plan: &NodePlan, endpoint_on_this_side: bool| {
        let mut p = plan.clone();
        if let Some(m) = &mut p.marking
            && endpoint_on_this_side
            && m.plain_tcp_endpoints.contains(&api)
        {
            m.mark_output = true;
        }
        p
    };
    let plans = |w: NodePlan, c: NodePlan| {
        let mut v = vec![w, c];
        v.extend(others.iter().cloned());
        v
    };
    // Request: worker → api (the worker's output chain matches `daddr api`).
    let request = Simulator::new(cluster, plans(for_api(worker, true), cp.clone()))
        .trace(Source::Host("worker-1".into(), Family::V4), api.ip())
        .outcome;
    // Reply: api → worker (cp-1's output chain matches `saddr api`).
    let reply = Simulator::new(cluster, plans(worker.clone(), for_api(cp, true)))
        .trace(
            Source::Host("cp-1".into(), Family::V4),
            "192.168.10.21".parse().unwrap(),
        )
        .outcome;
    (request, reply)
}

/// The plan a node's device really has: its interfaces carry the key of its private key.
fn with_device_key(mut plan: NodePlan, key: u8) -> NodePlan {
    for i in &mut plan.interfaces {
        i.public_key = Some(public(key));
    }
    plan
}

#[test]
fn reboot_with_a_new_key_never_locks_the_node_out() {
    // cp-1's agent: a settled node that knows worker-1 by its old key (1).
    let mut cp = agent_for("cp-1", 10, true);
    cp.start_with(&bootstrap_cluster(1), &[]);
    cp.run_for(10 * MS);
    let cp_plan = cp.agent.dataplane().node().clone();
    assert!(
        cp_plan
            .marking
            .as_ref()
            .unwrap()
            .plain_tcp_endpoints
            .contains(&"192.168.10.11:6443".parse().unwrap()),
        "the API server's node keeps its replies out of the tunnel"
    );
    let mut w2 = agent_for("worker-2", 12, true);
    w2.start_with(&bootstrap_cluster(1), &[]);
    w2.run_for(10 * MS);
    let w2_plan = w2.agent.dataplane().node().clone();

    // worker-1 reboots with a new key (21) while its Node still publishes the old one.
    let mut w = agent_for("worker-1", 21, true);
    w.echo = false;
    w.start_with(&bootstrap_cluster(1), &[]);
    w.run_for(10 * MS);
    assert!(w.agent.guarded(), "published 1, uses 21: guarded");
    assert_eq!(
        w.agent.key_check(),
        Some(wgmesh_k8s::bootstrap::KeyCheck::Unconfirmed(vec![
            Family::V4
        ]))
    );
    let guarded = w.agent.dataplane().node().clone();
    assert!(
        guarded.marking.as_ref().unwrap().mark_output,
        "host traffic outside the tunnel"
    );
    // Pod traffic is still encrypted (forwarded packets are not marked): nothing leaks.
    assert!(!guarded.interfaces[0].peers.is_empty());
    assert_eq!(w.publications.len(), 1);
    assert_eq!(
        w.publications[0].1.apply["wgmesh.io/public-key"],
        public(21).to_base64()
    );

    let cluster = cp.agent.view().cluster().unwrap();
    let worker_device = with_device_key(guarded.clone(), 21);
    // Both directions reach the API server while peers still have the old key.
    let (request, reply) = api_round_trip(
        &cluster,
        &worker_device,
        &cp_plan,
        std::slice::from_ref(&w2_plan),
    );
    assert_eq!(request, Outcome::Plain);
    assert_eq!(reply, Outcome::Plain);
    // Control: without the endpoint marking on cp-1, the reply is encrypted to the old key
    // and lost — the deadlock this design prevents.
    let mut cp_unmarked = cp_plan.clone();
    cp_unmarked
        .marking
        .as_mut()
        .unwrap()
        .plain_tcp_endpoints
        .clear();
    let (_, reply) = api_round_trip(
        &cluster,
        &worker_device,
        &cp_unmarked,
        std::slice::from_ref(&w2_plan),
    );
    assert!(
        matches!(reply, Outcome::Dropped(Drop::StaleReceiverKey { .. })),
        "{reply:?}"
    );
    // Control: without the guard, worker-1's own request would be encrypted with the new
    // key to the API server's *node address* and rejected whenever the address the API
    // server is reached at is not in the endpoint list (here: marking removed on worker-1).
    let mut unguarded = with_device_key(w.agent.plan().unwrap(), 21);
    unguarded
        .marking
        .as_mut()
        .unwrap()
        .plain_tcp_endpoints
        .clear();
    let request = Simulator::new(&cluster, vec![unguarded, cp_plan.clone(), w2_plan.clone()])
        .trace(
            Source::Host("worker-1".into(), Family::V4),
            "192.168.10.11".parse().unwrap(),
        )
        .outcome;
    assert!(
        matches!(request, Outcome::Dropped(Drop::UnknownSender { .. })),
        "{request:?}"
    );
    let mut guarded_no_list = worker_device.clone();
    guarded_no_list
        .marking
        .as_mut()
        .unwrap()
        .plain_tcp_endpoints
        .clear();
    let request = Simulator::new(
        &cluster,
        vec![guarded_no_list, cp_plan.clone(), w2_plan.clone()],
    )
    .trace(
        Source::Host("worker-1".into(), Family::V4),
        "192.168.10.11".parse().unwrap(),
    )
    .outcome;
    assert_eq!(
        request,
        Outcome::Plain,
        "the guard alone gets the request out"
    );

    // The publication lands; every agent sees it through its watch.
    let new_worker = wg_node(
        "worker-1",
        "192.168.10.21",
        &["10.244.1.0/24"],
        Some(public(21)),
    );
    cp.node(new_worker.clone());
    cp.run_for(200 * MS);
    w2.node(new_worker.clone());
    w2.run_for(200 * MS);
    w.node(new_worker);
    w.run_for(200 * MS);
    assert!(!w.agent.guarded());
    assert_converged(&w);
    assert_converged(&cp);
    let final_plans = vec![
        w.agent.dataplane().node().clone(),
        cp.agent.dataplane().node().clone(),
        w2.agent.dataplane().node().clone(),
    ];
    let cluster = cp.agent.view().cluster().unwrap();
    // Host traffic is encrypted again, and the API server is still reached.
    let sim = Simulator::new(&cluster, final_plans.clone());
    assert_eq!(
        sim.trace(
            Source::Host("worker-1".into(), Family::V4),
            "192.168.10.22".parse().unwrap()
        )
        .outcome,
        Outcome::Encrypted
    );
    let (request, reply) = api_round_trip(
        &cluster,
        &final_plans[0],
        &final_plans[1],
        &final_plans[2..],
    );
    assert_eq!((request, reply), (Outcome::Plain, Outcome::Plain));
}

#[test]
fn a_restart_with_the_same_key_changes_nothing() {
    // The key file survived the reboot: the node is confirmed from the first event, the
    // first plan is the full one and nothing is published.
    let mut w = agent_for("worker-1", 1, true);
    w.start_with(&bootstrap_cluster(1), &[]);
    w.run_for(10 * MS);
    assert!(!w.agent.guarded());
    assert!(w.publications.is_empty());
    let calls = w.take_calls();
    assert_eq!(calls.len(), 1);
    let Call::Reconcile(plan) = &calls[0] else {
        panic!()
    };
    assert!(!plan.marking.as_ref().unwrap().mark_output);
}

#[test]
fn peer_counters_are_read_for_metrics_and_named_by_node() {
    use std::time::SystemTime;
    use wgmesh_k8s::dataplane::PeerStats;
    let mut d = kubeadm(MeshConfig::default());
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    d.agent.dataplane_mut().set_stats(Some(vec![
        PeerStats::new("wireguard.cali", public(2), Some(at), 100, 200),
        PeerStats::new("wireguard.cali", public(3), None, 0, 0),
    ]));
    d.run_for(10 * MS);
    let text = d.agent.metrics().render();
    assert!(
        text.contains("wgmesh_peers{interface=\"wireguard.cali\"} 2\n"),
        "{text}"
    );
    assert!(
        !text.contains("wgmesh_peer_receive_bytes_total"),
        "not read before the interval"
    );
    d.run_for(15 * S);
    let text = d.agent.metrics().render();
    let b = format!(
        "interface=\"wireguard.cali\",node=\"b\",public_key=\"{}\"",
        public(2).to_base64()
    );
    assert!(
        text.contains(&format!(
            "wgmesh_peer_last_handshake_timestamp_seconds{{{b}}} 1700000000\n"
        )),
        "{text}"
    );
    assert!(text.contains(&format!("wgmesh_peer_receive_bytes_total{{{b}}} 100\n")));
    assert!(text.contains(&format!("wgmesh_peer_transmit_bytes_total{{{b}}} 200\n")));
    let c = format!(
        "interface=\"wireguard.cali\",node=\"c\",public_key=\"{}\"",
        public(3).to_base64()
    );
    assert!(text.contains(&format!(
        "wgmesh_peer_last_handshake_timestamp_seconds{{{c}}} 0\n"
    )));
}
