//! Issue 11 in the adapter and the agent: what a node or a pod writes is bounded before it
//! costs anything, echoed cut to size, and a hostile claim is never silent (logged once,
//! counted, an Event on both Nodes).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use wgmesh_core::MeshConfig;
use wgmesh_k8s::adapter::{AdapterOptions, AdapterWarning, node_info, pod_workload};

#[test]
fn a_node_with_30000_addresses_costs_one_past_the_limit() {
    let mut addresses: Vec<serde_json::Value> = (0..30_000u32)
        .map(|i| json!({"type": "InternalIP", "address": format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)}))
        .collect();
    addresses
        .extend((0..30_000).map(|i| json!({"type": "InternalIP", "address": format!("junk-{i}")})));
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": "greedy"},
        "status": {"addresses": addresses}}))
    .unwrap();
    let mut warnings = Vec::new();
    let info = node_info(&node, &AdapterOptions::default(), &mut warnings).unwrap();
    assert_eq!(info.node.addresses.len(), 33, "the limit (32) and one more");
    assert!(
        warnings.is_empty(),
        "the junk after the limit is not even read"
    );
    // Junk first: four warnings and one that counts the rest.
    let mut junk_first: Vec<serde_json::Value> = (0..1000)
        .map(|i| json!({"type": "InternalIP", "address": format!("junk-{i}")}))
        .collect();
    junk_first.push(json!({"type": "InternalIP", "address": "10.0.0.1"}));
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": "junky"}, "status": {"addresses": junk_first}}))
    .unwrap();
    let mut warnings = Vec::new();
    let info = node_info(&node, &AdapterOptions::default(), &mut warnings).unwrap();
    assert_eq!(
        info.node.addresses,
        ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(warnings.len(), 5);
    assert_eq!(
        warnings[4].to_string(),
        "node \"junky\": 996 more unusable values of InternalIP; left out"
    );
}

#[test]
fn echoed_values_are_cut_to_size_and_one_line() {
    let huge = format!("{}\nforged log line", "x".repeat(1 << 20));
    let n = annotate(
        wg_node("a", "10.0.0.1", &[], None),
        "wgmesh.io/underlay-mtu",
        Some(&huge),
    );
    let mut warnings = Vec::new();
    node_info(&n, &AdapterOptions::default(), &mut warnings).unwrap();
    let line = warnings[0].to_string();
    assert!(line.len() < 300, "{} bytes", line.len());
    assert!(!line.contains('\n'), "{line}");
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"nodeName": "a"},
        "status": {"phase": "Running", "podIPs": (0..10_000).map(|i| json!({"ip": format!("10.1.{}.{}", i / 250, i % 250)})).collect::<Vec<_>>()}}))
    .unwrap();
    let mut warnings = Vec::new();
    match pod_workload(&pod, &mut warnings) {
        wgmesh_k8s::adapter::PodWorkload::Ips { ips, .. } => assert_eq!(ips.len(), 8),
        other => panic!("{other:?}"),
    }
    assert!(warnings.is_empty());
    let more = AdapterWarning::MoreInvalid {
        object: "pod default/p".into(),
        field: "podIPs",
        count: 3,
    };
    assert!(more.node().is_none());
    assert_eq!(
        more.to_string(),
        "pod default/p: 3 more unusable values of podIPs; left out"
    );
}

/// One hostile node claims another's address and an outside address: the agents refuse the
/// claims, count them, log the finding once, and raise it as an Event on both Nodes.
#[tokio::test(start_paused = true)]
async fn a_hostile_claim_is_counted_logged_once_and_raised_on_both_nodes() {
    use common::api::{Kind, MockApi};
    let api = MockApi::new();
    api.put(
        Kind::Node,
        wg_node("a", "10.0.0.1", &["10.65.0.0/26"], None),
    );
    api.put(
        Kind::Node,
        wg_node("b", "10.0.0.2", &["10.0.0.1/32"], Some(public(2))),
    );
    let mut mesh = MeshConfig::default();
    mesh.cluster_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    let settings = wgmesh_k8s::agent::AgentSettings::new("a", mesh);
    let dataplane = Shared::new(wgmesh_k8s::dataplane::RecordingDataplane::new(
        Some(public(1)),
        None,
    ));
    let metrics = wgmesh_k8s::metrics::Metrics::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(wgmesh_k8s::run::run(
        api.client(),
        settings,
        dataplane.clone(),
        metrics.clone(),
        async {
            let _ = rx.await;
        },
    ));
    eventually("the finding raised on both Nodes", || {
        api.event_reasons("a").contains(&"ClaimRefused".to_owned())
            && api.event_reasons("b").contains(&"ClaimRefused".to_owned())
    })
    .await;
    let text = metrics.render();
    assert!(text.contains("wgmesh_refused_claims 1\n"), "{text}");
    assert!(
        text.contains("wgmesh_findings{kind=\"refused\"} 1\n"),
        "{text}"
    );
    // The hostile block is on no peer.
    let plan = dataplane.lock().node().clone();
    assert!(
        plan.interfaces[0]
            .peers
            .iter()
            .all(|p| p.allowed_ips.is_empty()),
        "{plan:?}"
    );
    let event = api
        .events()
        .into_iter()
        .find(|e| e["reason"] == "ClaimRefused" && e["regarding"]["name"] == "b")
        .unwrap();
    assert_eq!(event["type"], "Warning");
    let note = event["note"].as_str().unwrap();
    assert!(note.contains("\"a\"") && note.contains("\"b\""), "{note}");
    // Nothing new after resyncs: the finding is not raised again (other Events, such as
    // the end of the node's join, may come).
    let refused = |api: &MockApi| {
        api.events()
            .iter()
            .filter(|e| e["reason"] == "ClaimRefused")
            .count()
    };
    let before = refused(&api);
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(refused(&api), before);
    let _ = tx.send(());
    handle.await.unwrap().unwrap();
}
