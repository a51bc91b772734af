//! The agent end to end against a mock API server: a real `kube::Client` over a `tower`
//! service that serves list and watch streams and records every request. Checks the
//! requests the agent sends (method, path, query, content type, body) and its behaviour when
//! the API fails and recovers. Timers run on tokio's paused clock.

mod common;

use std::time::Duration;

use common::api::{Kind, MockApi};
use common::*;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use wgmesh_core::{MeshConfig, RouteSource};
use wgmesh_k8s::agent::AgentSettings;
use wgmesh_k8s::dataplane::{Call, RecordingDataplane};
use wgmesh_k8s::metrics::Metrics;
use wgmesh_k8s::run::{RunError, run};

struct Running {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), RunError>>,
    dataplane: Shared,
    metrics: Metrics,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap().unwrap();
    }
}

fn start(api: &MockApi, settings: AgentSettings, key: u8) -> Running {
    let dataplane = Shared::new(RecordingDataplane::new(
        Some(public(key)),
        Some(public(key)),
    ));
    let metrics = Metrics::new();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(run(
        api.client(),
        settings,
        dataplane.clone(),
        metrics.clone(),
        async {
            let _ = rx.await;
        },
    ));
    Running {
        stop: Some(tx),
        handle,
        dataplane,
        metrics,
    }
}

fn peers(r: &Running) -> usize {
    r.dataplane
        .lock()
        .node()
        .interfaces
        .first()
        .map_or(0, |i| i.peers.len())
}

#[tokio::test(start_paused = true)]
async fn lists_watches_and_publishes_its_key_with_server_side_apply() {
    let api = MockApi::new();
    api.put(
        Kind::Node,
        wg_node("a", "10.0.0.1", &["10.65.0.0/26"], None),
    );
    api.put(
        Kind::Node,
        wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2))),
    );
    let agent = start(&api, AgentSettings::new("a", MeshConfig::default()), 1);

    eventually("the key is published", || {
        api.annotation("a", "wgmesh.io/public-key") == Some(public(1).to_base64())
    })
    .await;
    let patches = api.patches();
    assert_eq!(patches.len(), 1);
    let p = &patches[0];
    assert_eq!(p.method, "PATCH");
    assert_eq!(p.path, "/api/v1/nodes/a");
    assert_eq!(
        p.query.get("fieldManager").map(String::as_str),
        Some("wgmesh")
    );
    assert_eq!(p.query.get("force").map(String::as_str), Some("true"));
    assert_eq!(
        p.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    // A first key joins in phases: with the joining marker.
    assert_eq!(
        p.body.as_ref().unwrap(),
        &json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "a", "annotations": {"wgmesh.io/public-key": public(1).to_base64(),
                                                          "wgmesh.io/phase": "joining"}}})
    );
    // The echo comes back through the watch and a joins the mesh with b.
    eventually("a peers with b", || peers(&agent) == 1).await;
    // After the settle time the marker goes (the key stays): an apply of the key, unchanged,
    // and a merge patch that removes the marker.
    eventually("the joining marker removed", || {
        api.annotation("a", "wgmesh.io/phase").is_none()
    })
    .await;
    let patches = api.patches();
    assert_eq!(patches.len(), 3);
    assert_eq!(
        patches[2].body.as_ref().unwrap(),
        &json!({"metadata": {"annotations": {"wgmesh.io/phase": null}}})
    );
    assert_eq!(
        api.annotation("a", "wgmesh.io/public-key"),
        Some(public(1).to_base64())
    );
    // List then watch, from the list's resource version, for Nodes only (cidr_blocks).
    let reqs = api.requests();
    let list = reqs
        .iter()
        .find(|r| r.method == "GET" && !r.is_watch())
        .unwrap();
    assert_eq!(list.path, "/api/v1/nodes");
    let watch = reqs.iter().find(|r| r.is_watch()).unwrap();
    assert_eq!(watch.path, "/api/v1/nodes");
    assert!(watch.query.contains_key("resourceVersion"));
    assert!(
        reqs.iter().all(|r| !r.path.starts_with("/api/v1/pods")),
        "no pod requests"
    );

    // A node joins, one changes its key, one leaves: through the watch.
    api.put(
        Kind::Node,
        wg_node("c", "10.0.0.3", &["10.65.0.128/26"], Some(public(3))),
    );
    eventually("c joins", || peers(&agent) == 2).await;
    api.put(
        Kind::Node,
        wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(22))),
    );
    eventually("b's new key", || {
        agent.dataplane.lock().node().interfaces[0]
            .peers
            .iter()
            .any(|p| p.public_key == public(22))
    })
    .await;
    api.delete(Kind::Node, "c");
    eventually("c leaves", || peers(&agent) == 1).await;
    assert!(agent.metrics.state().ready());
    assert_eq!(api.patches().len(), 3, "nothing more to publish");
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn republishes_when_the_annotation_is_changed_or_removed() {
    let api = MockApi::new();
    api.put(Kind::Node, wg_node("a", "10.0.0.1", &[], Some(public(1))));
    let agent = start(&api, AgentSettings::new("a", MeshConfig::default()), 1);
    eventually("synced", || agent.metrics.state().ready()).await;
    assert!(api.patches().is_empty(), "already published");

    // kubectl annotate --overwrite: another value.
    api.put(Kind::Node, wg_node("a", "10.0.0.1", &[], Some(public(9))));
    eventually("restored", || {
        api.annotation("a", "wgmesh.io/public-key") == Some(public(1).to_base64())
    })
    .await;
    // kubectl annotate wgmesh.io/public-key-: removed.
    tokio::time::sleep(Duration::from_secs(5)).await;
    api.put(Kind::Node, wg_node("a", "10.0.0.1", &[], None));
    eventually("restored again", || {
        api.annotation("a", "wgmesh.io/public-key") == Some(public(1).to_base64())
    })
    .await;
    let patches = api.patches();
    assert_eq!(patches.len(), 2);
    assert!(
        patches
            .iter()
            .all(|p| p.content_type.as_deref() == Some("application/apply-patch+yaml"))
    );
    agent.stop().await;
}

/// Node `a` carries a key; its agent starts with the mesh disabled and leaves in phases: the
/// leaving marker with the key, the settle time, then the key and the marker cleared.
async fn disabled_agent_clears_its_key() -> (MockApi, Running) {
    let api = MockApi::new();
    api.put(Kind::Node, wg_node("a", "10.0.0.1", &[], Some(public(1))));
    let mut mesh = MeshConfig::default();
    mesh.enabled = false;
    let agent = start(&api, AgentSettings::new("a", mesh), 1);
    eventually("cleared", || {
        api.annotation("a", "wgmesh.io/public-key").is_none()
    })
    .await;
    (api, agent)
}

#[tokio::test(start_paused = true)]
async fn clears_its_key_when_wireguard_is_disabled() {
    let (api, agent) = disabled_agent_clears_its_key().await;
    let patches = api.patches();
    assert_eq!(patches.len(), 2);
    assert_eq!(
        patches[0].body.as_ref().unwrap(),
        &json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "a", "annotations": {"wgmesh.io/public-key": public(1).to_base64(),
                                                          "wgmesh.io/phase": "leaving"}}})
    );
    let p = &patches[1];
    assert_eq!(p.path, "/api/v1/nodes/a");
    assert_eq!(
        p.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        p.query.get("fieldManager").map(String::as_str),
        Some("wgmesh")
    );
    assert_eq!(
        p.body.as_ref().unwrap(),
        &json!({"metadata": {"annotations": {"wgmesh.io/public-key": null, "wgmesh.io/phase": null}}})
    );
    eventually("empty plan applied", || agent.metrics.state().ready()).await;
    assert!(agent.dataplane.lock().node().is_empty());
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn api_errors_are_retried_and_the_agent_recovers() {
    let api = MockApi::new();
    api.put(Kind::Node, wg_node("a", "10.0.0.1", &[], None));
    api.put(Kind::Node, wg_node("b", "10.0.0.2", &[], Some(public(2))));
    // The first two lists fail (API server restarting), and the first two patches.
    api.fail("GET", "/api/v1/nodes", Some(false), 503, 2);
    api.fail("PATCH", "/api/v1/nodes/a", None, 500, 2);
    let agent = start(&api, AgentSettings::new("a", MeshConfig::default()), 1);
    eventually("published despite the failures", || {
        api.annotation("a", "wgmesh.io/public-key").is_some()
    })
    .await;
    let reqs = api.requests();
    let lists = reqs
        .iter()
        .filter(|r| r.method == "GET" && !r.is_watch())
        .count();
    assert_eq!(lists, 3, "two failed lists, then one that worked");
    assert_eq!(
        api.patches().len(),
        3,
        "two failed patches, then one that worked"
    );
    eventually("ready", || {
        agent.metrics.state().ready() && peers(&agent) == 1
    })
    .await;
    let text = agent.metrics.render();
    assert!(
        text.contains("wgmesh_errors_total{source=\"watch_nodes\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("wgmesh_publishes_total{result=\"error\"} 2\n"),
        "{text}"
    );

    // The watch expires (410 Gone): the agent relists and catches up with what changed.
    api.expire_watches();
    api.put(Kind::Node, wg_node("c", "10.0.0.3", &[], Some(public(3))));
    eventually("c after the relist", || peers(&agent) == 2).await;
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.is_watch())
        .count();
    assert!(lists >= 4, "relisted");

    // The connection drops: the watcher reconnects from its resource version.
    api.drop_watches();
    api.put(Kind::Node, wg_node("d", "10.0.0.4", &[], Some(public(4))));
    eventually("d after the reconnect", || peers(&agent) == 3).await;
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pods_are_watched_with_a_phase_selector_for_workload_addresses() {
    let api = MockApi::new();
    api.put(Kind::Node, wg_node("a", "10.240.0.4", &[], Some(public(1))));
    api.put(
        Kind::Node,
        wg_node("b", "10.240.0.64", &[], Some(public(2))),
    );
    api.put(
        Kind::Pod,
        pod("default", "web-1", "b", &["10.240.0.65"], "Running"),
    );
    api.put(
        Kind::Pod,
        pod("default", "job-1", "b", &["10.240.0.70"], "Succeeded"),
    );
    api.put(
        Kind::Pod,
        host_pod("kube-system", "kube-proxy-b", "b", "10.240.0.64"),
    );
    let mut mesh = MeshConfig::default();
    mesh.route_source = RouteSource::WorkloadIps;
    let agent = start(&api, AgentSettings::new("a", mesh), 1);
    let allowed = |agent: &Running| -> Vec<String> {
        agent
            .dataplane
            .lock()
            .node()
            .interfaces
            .first()
            .and_then(|i| i.peers.first())
            .map(|p| p.allowed_ips.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    };
    eventually("web-1's address", || allowed(&agent) == ["10.240.0.65/32"]).await;
    let reqs = api.requests();
    let pod_list = reqs
        .iter()
        .find(|r| r.path == "/api/v1/pods" && !r.is_watch())
        .unwrap();
    assert_eq!(
        pod_list.query.get("fieldSelector").map(String::as_str),
        Some("status.phase!=Succeeded,status.phase!=Failed")
    );
    // Pod churn through the watch.
    api.put(
        Kind::Pod,
        pod("default", "web-2", "b", &["10.240.0.66"], "Running"),
    );
    eventually("web-2", || allowed(&agent).len() == 2).await;
    // web-1 finishes: the selector turns it into a deletion.
    api.put(
        Kind::Pod,
        pod("default", "web-1", "b", &["10.240.0.65"], "Failed"),
    );
    eventually("web-1 gone", || allowed(&agent) == ["10.240.0.66/32"]).await;
    api.delete(Kind::Pod, "default/web-2");
    eventually("web-2 gone", || allowed(&agent).is_empty()).await;
    // Deltas, not full reconciles, carried the churn.
    let calls = agent.dataplane.lock().calls().to_vec();
    assert!(calls.iter().filter(|c| matches!(c, Call::Delta(_))).count() >= 3);
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn nothing_is_published_for_a_node_that_does_not_exist() {
    let api = MockApi::new();
    api.put(Kind::Node, wg_node("b", "10.0.0.2", &[], Some(public(2))));
    let agent = start(&api, AgentSettings::new("a", MeshConfig::default()), 1);
    eventually("synced", || agent.metrics.state().synced).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(api.patches().is_empty());
    // The node registers: now it publishes.
    api.put(Kind::Node, wg_node("a", "10.0.0.1", &[], None));
    eventually("published", || {
        api.annotation("a", "wgmesh.io/public-key").is_some()
    })
    .await;
    agent.stop().await;
}

/// The verbs the agent uses, from what the mock recorded, are exactly the verbs
/// `deploy/rbac.yaml` grants: nothing missing (the agent would fail), nothing extra.
#[tokio::test(start_paused = true)]
async fn the_agent_uses_exactly_the_verbs_rbac_grants() {
    use std::collections::{BTreeMap, BTreeSet};
    let used = |reqs: &[common::api::Recorded], out: &mut BTreeMap<String, BTreeSet<String>>| {
        for r in reqs {
            // core: /api/v1/RESOURCE[/NAME[/SUBRESOURCE]]; groups:
            // /apis/GROUP/VERSION/namespaces/NS/RESOURCE[/NAME]
            let rest = match r.path.strip_prefix("/apis/") {
                Some(p) => p.splitn(5, '/').nth(4).unwrap().to_owned(),
                None => r.path.trim_start_matches("/api/v1/").to_owned(),
            };
            let mut parts = rest.split('/');
            let mut resource = parts.next().unwrap().to_owned();
            let named = parts.next().is_some();
            if let Some(sub) = parts.next() {
                resource = format!("{resource}/{sub}");
            }
            let verb = match (r.method.as_str(), named, r.is_watch()) {
                ("GET", false, true) => "watch",
                ("GET", false, false) => "list",
                ("GET", true, _) => "get",
                ("PATCH", true, _) => "patch",
                ("POST", false, _) => "create",
                ("PUT", true, _) => "update",
                ("DELETE", _, _) => "delete",
                other => panic!("unexpected request {other:?} {}", r.path),
            };
            out.entry(resource).or_default().insert(verb.to_owned());
        }
    };
    let mut verbs = BTreeMap::new();
    // Publishing with pods watched, an API failure, a relist.
    let api = MockApi::new();
    api.put(Kind::Node, wg_node("a", "10.0.0.1", &[], None));
    api.put(
        Kind::Pod,
        pod("default", "p", "a", &["10.0.0.9"], "Running"),
    );
    let mut mesh = MeshConfig::default();
    mesh.route_source = RouteSource::WorkloadIps;
    let agent = start(&api, AgentSettings::new("a", mesh), 1);
    eventually("published", || {
        api.annotation("a", "wgmesh.io/public-key").is_some()
    })
    .await;
    api.expire_watches();
    api.put(Kind::Node, wg_node("b", "10.0.0.2", &[], Some(public(2))));
    eventually("b", || peers(&agent) == 1).await;
    // Someone removes the key: the agent publishes it again, and its second KeyPublished
    // Event counts up the first one's series (a patch).
    api.put(Kind::Node, wg_node("a", "10.0.0.1", &[], None));
    eventually("republished", || {
        api.annotation("a", "wgmesh.io/public-key").is_some()
            && api
                .event_reasons("a")
                .iter()
                .filter(|r| *r == "KeyPublished")
                .count()
                == 1
            && api
                .requests()
                .iter()
                .any(|r| r.method == "PATCH" && r.path.contains("/events/"))
    })
    .await;
    eventually("the condition written", || {
        api.condition("a", "WireGuardMeshReady").is_some()
    })
    .await;
    agent.stop().await;
    used(&api.requests(), &mut verbs);
    // Clearing when disabled.
    let (api, agent) = disabled_agent_clears_its_key().await;
    agent.stop().await;
    used(&api.requests(), &mut verbs);

    let rbac = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml"))
        .unwrap();
    let mut granted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&rbac) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"] != "ClusterRole" && v["kind"] != "Role" {
            continue;
        }
        for rule in v["rules"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                granted
                    .entry(r.as_str().unwrap().to_owned())
                    .or_default()
                    .extend(
                        rule["verbs"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|v| v.as_str().unwrap().to_owned()),
                    );
            }
        }
    }
    assert_eq!(verbs, granted);
}

/// What `kubectl describe node` shows: the WireGuardMeshReady condition, written with
/// server-side apply to the status subresource (the kubelet's conditions untouched), and
/// Events when something changes — and nothing written while nothing changes.
#[tokio::test(start_paused = true)]
async fn reports_on_its_node_with_a_condition_and_events() {
    let api = MockApi::new();
    api.put(
        Kind::Node,
        wg_node("a", "10.0.0.1", &["10.65.0.0/26"], None),
    );
    api.put(
        Kind::Node,
        wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2))),
    );
    let agent = start(&api, AgentSettings::new("a", MeshConfig::default()), 1);
    let status = |api: &MockApi| {
        api.condition("a", "WireGuardMeshReady").map(|c| {
            (
                c["status"].as_str().unwrap().to_owned(),
                c["reason"].as_str().unwrap().to_owned(),
            )
        })
    };
    eventually("ready on the Node", || {
        status(&api) == Some(("True".into(), "MeshReady".into()))
    })
    .await;
    let c = api.condition("a", "WireGuardMeshReady").unwrap();
    assert_eq!(
        c["message"],
        "1 peer (wireguard.cali 1), handshakes not readable"
    );
    assert!(c["lastHeartbeatTime"].is_string() && c["lastTransitionTime"].is_string());
    assert!(
        api.condition("a", "Ready").is_some(),
        "the kubelet's conditions stay"
    );
    let patch = api.status_patches().last().unwrap().clone();
    assert_eq!(patch.path, "/api/v1/nodes/a/status");
    assert_eq!(
        patch.query.get("fieldManager").map(String::as_str),
        Some("wgmesh")
    );
    assert_eq!(patch.query.get("force").map(String::as_str), Some("true"));
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    let body = patch.body.unwrap();
    assert_eq!(body["metadata"], json!({"name": "a"}));
    assert_eq!(body["status"]["conditions"].as_array().unwrap().len(), 1);
    let reasons = api.event_reasons("a");
    assert!(reasons.contains(&"KeyPublished".to_owned()), "{reasons:?}");
    assert!(reasons.contains(&"MeshApplied".to_owned()), "{reasons:?}");
    let event = api
        .events()
        .into_iter()
        .find(|e| e["reason"] == "MeshApplied")
        .unwrap();
    assert_eq!(event["type"], "Normal");
    assert_eq!(
        event["regarding"],
        json!({"apiVersion": "v1", "kind": "Node", "name": "a", "uid": "a"}),
        "named as the kubelet names Nodes, so kubectl describe node finds it"
    );
    assert_eq!(event["reportingController"], "wgmesh-agent");
    assert_eq!(event["reportingInstance"], "a");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.method == "POST"
                && r.path == "/apis/events.k8s.io/v1/namespaces/default/events"),
        "Events about Nodes go to the namespace default"
    );

    // Nothing changes for five minutes: nothing is written.
    let writes = api.status_patches().len();
    let events = api.events().len();
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(api.status_patches().len(), writes);
    assert_eq!(api.events().len(), events);
    // The heartbeat comes within ten.
    tokio::time::sleep(Duration::from_secs(300)).await;
    eventually("heartbeat", || api.status_patches().len() == writes + 1).await;

    // Programming fails for a minute (six attempts with backoff): False within seconds, one
    // Warning; then it recovers. (A failure shorter than the condition's 10 s minimum
    // interval shows only as Events.)
    agent.dataplane.lock().fail_next(6);
    api.put(
        Kind::Node,
        wg_node("c", "10.0.0.3", &["10.65.0.128/26"], Some(public(3))),
    );
    eventually("ApplyFailed on the Node", || {
        status(&api) == Some(("False".into(), "ApplyFailed".into()))
    })
    .await;
    eventually("recovered", || {
        status(&api) == Some(("True".into(), "MeshReady".into()))
    })
    .await;
    let reasons = api.event_reasons("a");
    assert_eq!(
        reasons.iter().filter(|r| *r == "ApplyFailed").count(),
        1,
        "one Warning per failing streak: {reasons:?}"
    );
    assert!(
        reasons.contains(&"ApplyRecovered".to_owned()),
        "{reasons:?}"
    );
    let failed = api
        .events()
        .into_iter()
        .find(|e| e["reason"] == "ApplyFailed")
        .unwrap();
    assert_eq!(failed["type"], "Warning");
    agent.stop().await;

    // A restarted agent finds its condition on the Node and writes nothing new.
    let writes = api.status_patches().len();
    let again = start(&api, AgentSettings::new("a", MeshConfig::default()), 1);
    eventually("ready again", || again.metrics.state().ready()).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(api.status_patches().len(), writes, "nothing new to say");
    again.stop().await;
}

/// The preview's read (`wgmesh plan --kubeconfig`): lists only, pods with the agent's phase
/// selector, pages followed; never a watch or a write.
#[tokio::test]
async fn a_snapshot_only_lists() {
    use wgmesh_k8s::snapshot::{list, snapshot};
    let api = MockApi::new();
    api.put(Kind::Node, wg_node("a", "10.0.0.1", &[], Some(public(1))));
    api.put(Kind::Node, wg_node("b", "10.0.0.2", &[], Some(public(2))));
    api.put(
        Kind::Pod,
        pod("default", "web", "b", &["10.0.0.9"], "Running"),
    );
    api.put(
        Kind::Pod,
        pod("default", "done", "b", &["10.0.0.10"], "Succeeded"),
    );
    let (nodes, pods) = list(&api.client(), true).await.unwrap();
    assert_eq!((nodes.len(), pods.len()), (2, 1));
    let mut mesh = MeshConfig::default();
    mesh.route_source = RouteSource::WorkloadIps;
    let s = snapshot(&AgentSettings::new("a", mesh), &nodes, &pods).unwrap();
    assert_eq!(
        s.cluster.nodes()[1].workload_ips,
        ["10.0.0.9".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(s.pod("default/web").unwrap().node, "b");
    let reqs = api.requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert_eq!(r.method, "GET");
        assert!(!r.is_watch());
        assert_eq!(r.query.get("limit").map(String::as_str), Some("500"));
    }
    assert_eq!(
        reqs[1].query.get("fieldSelector").map(String::as_str),
        Some("status.phase!=Succeeded,status.phase!=Failed")
    );
}
