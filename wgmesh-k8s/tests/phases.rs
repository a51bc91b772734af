//! Leaving and joining in phases through the API (issue 13): the `wgmesh.io/phase` marker
//! on other nodes, honoured for a bounded grace on this agent's clock, and this node's own
//! sequences (join, leave on request or with `enabled: false`), with a crash in every phase.
//! The state machine runs on a simulated clock over the recording dataplane; the API server
//! is the driver's copy of the Nodes (publications come back through the watch).

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Node as K8sNode;
use wgmesh_core::{Cluster, MeshConfig, NodePlan, Phase, RouteType, plan_node};
use wgmesh_k8s::agent::{Agent, AgentSettings};
use wgmesh_k8s::dataplane::RecordingDataplane;
use wgmesh_k8s::metrics::Metrics;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
const PHASE: &str = "wgmesh.io/phase";

fn nodes(a_key: Option<u8>) -> Vec<K8sNode> {
    vec![
        wg_node("a", "10.0.0.1", &["10.65.0.0/26"], a_key.map(public)),
        wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2))),
        wg_node("c", "10.0.0.3", &["10.65.0.128/26"], Some(public(3))),
    ]
}

fn with_phase(n: K8sNode, phase: Option<&str>) -> K8sNode {
    annotate(n, PHASE, phase)
}

fn agent_with(mesh: MeshConfig, dataplane: RecordingDataplane) -> Driver {
    Driver::new(Agent::new(
        AgentSettings::new("a", mesh),
        dataplane,
        Metrics::new(),
    ))
}

fn started(mesh: MeshConfig, list: &[K8sNode]) -> Driver {
    let mut d = agent_with(mesh, RecordingDataplane::new(Some(public(1)), None));
    d.start_with(list, &[]);
    d.run_for(10 * MS);
    d
}

/// How a plan sends traffic to `cidr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Into the tunnel (a unicast route, packets not marked).
    Encrypted,
    /// Plain: a throw route, or a route into the tunnel whose packets are marked (a phased
    /// node's destination, or everything while this node joins).
    Plain,
}

/// How a plan sends traffic to `cidr` (its route and the marking of its first address).
fn route(plan: &NodePlan, cidr: &str) -> Path {
    let net: ipnet::IpNet = cidr.parse().unwrap();
    let kind = plan
        .routes
        .iter()
        .find(|r| r.destination == net)
        .unwrap_or_else(|| panic!("no route to {net}: {plan:?}"))
        .kind;
    let marked = plan
        .marking
        .as_ref()
        .is_some_and(|m| m.marks_destination(net.network()));
    match kind {
        RouteType::Unicast if !marked => Path::Encrypted,
        RouteType::Unicast | RouteType::Throw => Path::Plain,
        other => panic!("route to {net} is {other:?}: {plan:?}"),
    }
}

fn plan_with(d: &Driver, node: &str, phase: Phase) -> NodePlan {
    let cluster = d.agent.view().cluster().unwrap();
    let list = cluster
        .nodes()
        .iter()
        .cloned()
        .map(|mut n| {
            if n.name == node {
                n.wireguard.as_mut().unwrap().phase = phase;
            }
            n
        })
        .collect();
    plan_node(&Cluster::new(cluster.mesh().clone(), list).unwrap(), "a").unwrap()
}

/// What the node has programmed.
fn on_node(d: &Driver) -> NodePlan {
    d.agent.dataplane().node().clone()
}

fn phase_of(d: &Driver, node: &str) -> Phase {
    d.agent
        .view()
        .cluster()
        .unwrap()
        .node(node)
        .unwrap()
        .phase()
}

fn annotation(d: &Driver, node: &str, key: &str) -> Option<String> {
    d.nodes[node]
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key).cloned())
}

// -------------------------------------------------------------------------------------------
// Other nodes' markers, and the grace.

#[test]
fn a_leaving_peer_is_routed_plain_for_the_grace_only() {
    let mut d = started(MeshConfig::default(), &nodes(Some(1)));
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Encrypted);
    let b = nodes(Some(1))[1].clone();
    d.node(with_phase(b.clone(), Some("leaving")));
    d.run_for(200 * MS);
    // Plain to b, b still a peer with its allowed IPs (its encrypted packets are accepted).
    let plan = on_node(&d);
    assert_eq!(route(&plan, "10.65.0.64/26"), Path::Plain);
    let peer = plan.interfaces[0]
        .peers
        .iter()
        .find(|p| p.node == "b")
        .unwrap();
    assert_eq!(peer.allowed_ips, ["10.65.0.64/26".parse().unwrap()]);
    assert_eq!(
        route(&plan, "10.65.0.128/26"),
        Path::Encrypted,
        "c untouched"
    );
    // Still honoured just before the grace (60 s from the first sight) ends...
    d.run_for(59 * S);
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Plain);
    assert_eq!(d.agent.metrics().expired_phase_markers(), 0);
    // ... and no longer after it: b is active again, said once.
    d.run_for(S);
    assert_eq!(phase_of(&d, "b"), Phase::Active);
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Encrypted);
    assert_eq!(d.agent.metrics().expired_phase_markers(), 1);
    assert!(
        d.agent
            .metrics()
            .render()
            .contains("wgmesh_phase_markers_expired_total 1\n")
    );
    // Withdrawn and published again: the clock ran on, the marker stays ignored.
    d.node(with_phase(b.clone(), None));
    d.run_for(10 * S);
    d.node(with_phase(b.clone(), Some("leaving")));
    d.run_for(S);
    assert_eq!(phase_of(&d, "b"), Phase::Active);
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Encrypted);
    // A new key does not restart it either.
    let rekeyed = wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(22)));
    d.node(with_phase(rekeyed.clone(), Some("leaving")));
    d.run_for(S);
    assert_eq!(phase_of(&d, "b"), Phase::Active);
    assert_eq!(d.agent.metrics().expired_phase_markers(), 1, "said once");
    // Absent for ten graces, a marker is a new one.
    d.node(with_phase(rekeyed.clone(), None));
    d.run_for(600 * S);
    d.node(with_phase(rekeyed, Some("leaving")));
    d.run_for(200 * MS);
    assert_eq!(phase_of(&d, "b"), Phase::Leaving);
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Plain);
}

#[test]
fn a_joining_peer_is_a_peer_routed_plain_until_its_marker_goes() {
    let mut list = nodes(Some(1));
    let c = list[2].clone();
    list[2] = with_phase(c.clone(), Some("joining"));
    let mut d = started(MeshConfig::default(), &list);
    let plan = on_node(&d);
    assert!(plan.interfaces[0].peers.iter().any(|p| p.node == "c"));
    assert_eq!(route(&plan, "10.65.0.128/26"), Path::Plain);
    assert_eq!(plan, plan_with(&d, "c", Phase::Joining));
    d.run_for(10 * S);
    d.node(c);
    d.run_for(200 * MS);
    assert_eq!(route(&on_node(&d), "10.65.0.128/26"), Path::Encrypted);
    assert_eq!(d.agent.metrics().expired_phase_markers(), 0);
}

#[test]
fn strict_mode_honours_no_phase_marker_and_publishes_none() {
    let mut mesh = MeshConfig::default();
    mesh.strict_mode = true;
    let mut d = started(mesh.clone(), &nodes(Some(1)));
    let active = plan_with(&d, "b", Phase::Active);
    assert_eq!(on_node(&d), active);
    // A leaving (or joining) node would be sent plain; strict mode drops rather than send
    // plaintext, so b stays in the tunnel however it plays with its marker.
    let b = nodes(Some(1))[1].clone();
    for (i, phase) in [
        Some("leaving"),
        None,
        Some("joining"),
        Some("leaving"),
        None,
    ]
    .into_iter()
    .enumerate()
    {
        d.node(with_phase(b.clone(), phase));
        d.run_for(5 * S);
        assert_eq!(phase_of(&d, "b"), Phase::Active, "step {i}: {phase:?}");
        assert_eq!(on_node(&d), active, "step {i}: {phase:?}");
        assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Encrypted);
    }
    assert_eq!(d.agent.metrics().expired_phase_markers(), 0);
    // Its own join: the key alone, no joining marker, everything into the tunnel at once.
    let mut d = Driver::new(Agent::new(
        AgentSettings::new("a", mesh),
        RecordingDataplane::new(Some(public(1)), None),
        Metrics::new(),
    ));
    d.start_with(&nodes(None), &[]);
    d.run_for(200 * MS);
    assert_eq!(d.publications.len(), 1);
    let p = &d.publications[0].1;
    assert_eq!(p.apply.get(PHASE), None);
    assert_eq!(
        p.apply.get("wgmesh.io/public-key"),
        Some(&public(1).to_base64())
    );
    assert_eq!(phase_of(&d, "a"), Phase::Active);
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Encrypted);
    // Its own leave: at once, no leaving marker; the device goes, then the key.
    d.run_for(20 * S);
    let before = d.publications.len();
    d.agent.on_leave_request(true, d.now);
    d.run_for(200 * MS);
    assert!(on_node(&d).is_empty());
    assert_eq!(d.publications.len(), before + 1);
    let p = &d.publications[before].1;
    assert_eq!(p.apply.get(PHASE), None);
    assert_eq!(p.remove, ["wgmesh.io/public-key"]);
}

#[test]
fn a_malformed_marker_is_a_warning_naming_the_node_and_the_node_is_active() {
    let mut list = nodes(Some(1));
    let junk = format!("Leaving\u{1b}[2J{}", "x".repeat(10_000));
    list[1] = with_phase(list[1].clone(), Some(&junk));
    let mut warnings = Vec::new();
    let info = wgmesh_k8s::adapter::node_info(
        &list[1],
        &wgmesh_k8s::adapter::AdapterOptions::default(),
        &mut warnings,
    )
    .unwrap();
    assert_eq!(info.node.phase(), Phase::Active);
    assert_eq!(warnings.len(), 1);
    let text = warnings[0].to_string();
    assert!(
        text.starts_with("node \"b\": annotation wgmesh.io/phase = "),
        "{text}"
    );
    assert!(text.len() < 300 && !text.contains('\u{1b}'), "{text}");
    for bad in ["", " leaving", "LEAVING", "active", "left"] {
        let n = with_phase(list[2].clone(), Some(bad));
        let mut w = Vec::new();
        let info = wgmesh_k8s::adapter::node_info(
            &n,
            &wgmesh_k8s::adapter::AdapterOptions::default(),
            &mut w,
        )
        .unwrap();
        assert_eq!(info.node.phase(), Phase::Active, "{bad:?}");
        assert_eq!(w.len(), 1, "{bad:?}");
    }
    let d = started(MeshConfig::default(), &list);
    assert_eq!(phase_of(&d, "b"), Phase::Active);
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Encrypted);
}

#[test]
fn two_nodes_in_phases_at_once() {
    let mut d = started(MeshConfig::default(), &nodes(Some(1)));
    let list = nodes(Some(1));
    d.node(with_phase(list[1].clone(), Some("leaving")));
    d.run_for(20 * S);
    d.node(with_phase(list[2].clone(), Some("joining")));
    d.run_for(200 * MS);
    let plan = on_node(&d);
    assert_eq!(route(&plan, "10.65.0.64/26"), Path::Plain);
    assert_eq!(route(&plan, "10.65.0.128/26"), Path::Plain);
    assert_eq!(plan.interfaces[0].peers.len(), 2);
    // Each on its own clock: b's grace ends first...
    d.run_for(40 * S);
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Encrypted);
    assert_eq!(route(&on_node(&d), "10.65.0.128/26"), Path::Plain);
    // ... then c's.
    d.run_for(20 * S);
    assert_eq!(route(&on_node(&d), "10.65.0.128/26"), Path::Encrypted);
    assert_eq!(d.agent.metrics().expired_phase_markers(), 2);
}

// -------------------------------------------------------------------------------------------
// This node's own sequences.

#[test]
fn a_node_without_a_published_key_joins_in_phases() {
    // A settle time unlike the echo timeout (10 s), which holds a next publication anyway.
    let mut settings = AgentSettings::new("a", MeshConfig::default());
    settings.phase.settle = 20 * S;
    let mut d = Driver::new(Agent::new(
        settings,
        RecordingDataplane::new(Some(public(1)), None),
        Metrics::new(),
    ));
    d.start_with(&nodes(None), &[]);
    d.run_for(200 * MS);
    // The key with the joining marker, in one publication.
    assert_eq!(d.publications.len(), 1);
    let p = &d.publications[0].1;
    assert_eq!(p.apply.get(PHASE).map(String::as_str), Some("joining"));
    assert_eq!(
        p.apply.get("wgmesh.io/public-key"),
        Some(&public(1).to_base64())
    );
    // Back through the watch: the node's own view is joining (device and peers, routes
    // plain), which is what its peers see too.
    assert_eq!(phase_of(&d, "a"), Phase::Joining);
    let plan = on_node(&d);
    assert_eq!(plan.interfaces[0].peers.len(), 2);
    assert_eq!(route(&plan, "10.65.0.64/26"), Path::Plain);
    d.run_for(19 * S);
    assert_eq!(d.publications.len(), 1);
    assert_eq!(annotation(&d, "a", PHASE).as_deref(), Some("joining"));
    // After the settle time the marker goes; the key stays; everything into the tunnel.
    d.run_for(S);
    assert_eq!(d.publications.len(), 2);
    assert_eq!(d.publications[1].1.remove, [PHASE]);
    assert_eq!(annotation(&d, "a", PHASE), None);
    assert_eq!(
        annotation(&d, "a", "wgmesh.io/public-key"),
        Some(public(1).to_base64())
    );
    assert_eq!(phase_of(&d, "a"), Phase::Active);
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Encrypted);
    d.run_for(120 * S);
    assert_eq!(d.publications.len(), 2, "nothing more");
    assert!(
        d.agent
            .take_notices()
            .iter()
            .any(|n| n.reason == "JoinedMesh")
    );
}

#[test]
fn a_node_with_its_key_published_does_not_join_again_on_restart() {
    let d = started(MeshConfig::default(), &nodes(Some(1)));
    assert!(d.publications.is_empty());
    assert_eq!(phase_of(&d, "a"), Phase::Active);
}

#[test]
fn a_node_leaves_on_request_and_joins_again() {
    let mut d = started(MeshConfig::default(), &nodes(Some(1)));
    let programmed = on_node(&d);
    assert!(!programmed.is_empty());
    d.agent.on_leave_request(true, d.now);
    d.run_for(200 * MS);
    assert_eq!(d.publications.len(), 1);
    let p = &d.publications[0].1;
    assert_eq!(p.apply.get(PHASE).map(String::as_str), Some("leaving"));
    assert_eq!(
        p.apply.get("wgmesh.io/public-key"),
        Some(&public(1).to_base64())
    );
    assert_eq!(phase_of(&d, "a"), Phase::Leaving);
    assert!(
        !on_node(&d).is_empty(),
        "the device stays while peers switch"
    );
    d.run_for(9 * S);
    assert!(!on_node(&d).is_empty());
    d.run_for(S);
    assert!(on_node(&d).is_empty());
    assert_eq!(d.publications.len(), 2);
    assert_eq!(d.publications[1].1.remove, ["wgmesh.io/public-key", PHASE]);
    assert_eq!(annotation(&d, "a", "wgmesh.io/public-key"), None);
    d.run_for(120 * S);
    assert!(on_node(&d).is_empty());
    assert_eq!(d.publications.len(), 2);
    // Taken back: the node joins again in phases.
    d.agent.on_leave_request(false, d.now);
    d.run_for(200 * MS);
    assert_eq!(d.publications.len(), 3);
    assert_eq!(
        d.publications[2].1.apply.get(PHASE).map(String::as_str),
        Some("joining")
    );
    assert!(!on_node(&d).is_empty());
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Plain);
    d.run_for(10 * S);
    assert_eq!(annotation(&d, "a", PHASE), None);
    assert_eq!(on_node(&d), programmed);
}

#[test]
fn a_leave_whose_marker_never_comes_back_ends_after_the_grace() {
    let mut d = started(MeshConfig::default(), &nodes(Some(1)));
    d.echo = false;
    d.agent.on_leave_request(true, d.now);
    d.run_for(59 * S);
    assert!(!on_node(&d).is_empty());
    d.run_for(2 * S);
    assert!(on_node(&d).is_empty(), "never stuck");
}

/// The API server's Nodes after `a` published `phase` with its key (a crash right after).
fn published(phase: Option<&str>, key: bool) -> Vec<K8sNode> {
    let mut list = nodes(key.then_some(1));
    list[0] = with_phase(list[0].clone(), phase);
    list
}

#[test]
fn a_crash_in_every_phase_resumes_or_finishes() {
    let mut disabled = MeshConfig::default();
    disabled.enabled = false;

    // Joining, crashed after the marker was published: the restarted agent keeps it for the
    // settle time, then removes it.
    let mut d = started(MeshConfig::default(), &published(Some("joining"), true));
    assert!(d.publications.is_empty(), "already published");
    assert_eq!(phase_of(&d, "a"), Phase::Joining);
    d.run_for(9 * S);
    assert_eq!(annotation(&d, "a", PHASE).as_deref(), Some("joining"));
    d.run_for(S + 200 * MS);
    assert_eq!(annotation(&d, "a", PHASE), None);
    assert_eq!(phase_of(&d, "a"), Phase::Active);
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Encrypted);

    // Leaving, crashed after the marker: the device is still there; the restarted agent
    // keeps it for the settle time, then drops it and withdraws.
    let before = started(MeshConfig::default(), &nodes(Some(1)));
    let device = before.agent.dataplane().clone();
    let mut d = agent_with(disabled.clone(), device);
    d.start_with(&published(Some("leaving"), true), &[]);
    d.run_for(200 * MS);
    assert!(!on_node(&d).is_empty());
    assert!(d.publications.is_empty(), "the marker is already there");
    d.run_for(10 * S);
    assert!(on_node(&d).is_empty());
    assert_eq!(annotation(&d, "a", PHASE), None);
    assert_eq!(annotation(&d, "a", "wgmesh.io/public-key"), None);

    // Leaving, crashed after the device went but before the withdrawal: the restarted agent
    // programs it again for the settle time (peers accept both forms), then finishes.
    let mut d = agent_with(
        disabled.clone(),
        RecordingDataplane::new(Some(public(1)), None),
    );
    d.start_with(&published(Some("leaving"), true), &[]);
    d.run_for(10 * S + 200 * MS);
    assert!(on_node(&d).is_empty());
    assert_eq!(annotation(&d, "a", "wgmesh.io/public-key"), None);
    assert_eq!(annotation(&d, "a", PHASE), None);

    // Left, crashed after the withdrawal: nothing to do, nothing published, nothing programmed.
    let mut d = agent_with(disabled, RecordingDataplane::new(Some(public(1)), None));
    d.start_with(&published(None, false), &[]);
    d.run_for(30 * S);
    assert!(on_node(&d).is_empty());
    assert!(d.publications.is_empty());

    // A leave requested on disk survives the restart: the agent never joins first.
    let mut d = agent_with(
        MeshConfig::default(),
        RecordingDataplane::new(Some(public(1)), None),
    );
    d.agent.on_leave_request(true, d.now);
    d.start_with(&nodes(Some(1)), &[]);
    d.run_for(200 * MS);
    assert_eq!(
        d.publications[0].1.apply.get(PHASE).map(String::as_str),
        Some("leaving")
    );
    d.run_for(10 * S);
    assert!(on_node(&d).is_empty());
    assert_eq!(annotation(&d, "a", "wgmesh.io/public-key"), None);
}

#[test]
fn the_node_leaves_while_a_peer_leaves_too() {
    let mut list = nodes(Some(1));
    list[1] = with_phase(list[1].clone(), Some("leaving"));
    let mut d = started(MeshConfig::default(), &list);
    assert_eq!(route(&on_node(&d), "10.65.0.64/26"), Path::Plain);
    d.agent.on_leave_request(true, d.now);
    d.run_for(200 * MS);
    assert_eq!(phase_of(&d, "a"), Phase::Leaving);
    assert_eq!(phase_of(&d, "b"), Phase::Leaving);
    d.run_for(10 * S);
    assert!(on_node(&d).is_empty());
    assert_eq!(annotation(&d, "a", "wgmesh.io/public-key"), None);
}
