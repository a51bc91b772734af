//! Joining and leaving in phases (`Phase`): what each phase plans, on the node itself and on
//! its peers; that a node's phase — its own claim, untrusted — changes nothing about how the
//! other nodes' destinations are routed, in strict mode too; and that every step of a
//! make-before-break join or leave keeps every flow delivered (the simulator walks the
//! mixed states in which some agents applied a step and others not yet).

mod common;

use std::collections::BTreeMap;

use common::*;
use ipnet::IpNet;
use proptest::prelude::*;
use wgmesh_core::sim::{Outcome, Simulator, Source};
use wgmesh_core::spec::parse_cluster;
use wgmesh_core::{
    Cluster, Event, Family, IncrementalPlanner, Node, NodePlan, Phase, RouteType, diff, plan_all,
    plan_node,
};

const A: &str = "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=";
const B: &str = "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=";
const C: &str = "hKl+HNs4U8n0NjPMK8t6ZGwADTIR6GEnnA5aHWLJhVQ=";

/// Three encrypting nodes with a /24 and a pod each (c in the given phase); host encryption
/// on.
fn three(strict: bool, c_phase: &str) -> Cluster {
    parse_cluster(&format!(
        r#"{{"mesh": {{"host_encryption": true, "strict_mode": {strict},
                       "cluster_cidrs": ["10.65.0.0/16", "10.0.0.0/24"]}}, "nodes": [
          {{"name": "a", "addresses": ["10.0.0.1"], "pod_cidrs": ["10.65.1.0/24"], "workload_ips": ["10.65.1.5"], "wireguard": {{"public_key": "{A}"}}}},
          {{"name": "b", "addresses": ["10.0.0.2"], "pod_cidrs": ["10.65.2.0/24"], "workload_ips": ["10.65.2.5"], "wireguard": {{"public_key": "{B}"}}}},
          {{"name": "c", "addresses": ["10.0.0.3"], "pod_cidrs": ["10.65.3.0/24"], "workload_ips": ["10.65.3.5"], "wireguard": {{"public_key": "{C}", "phase": "{c_phase}"}}}}]}}"#
    ))
    .unwrap()
}

fn route(plan: &NodePlan, dest: &str) -> Option<RouteType> {
    let dest: IpNet = dest.parse().unwrap();
    plan.routes
        .iter()
        .find(|r| r.destination == dest)
        .map(|r| r.kind)
}

fn allowed(plan: &NodePlan, peer: &str) -> Option<Vec<IpNet>> {
    plan.interfaces[0]
        .peers
        .iter()
        .find(|p| p.node == peer)
        .map(|p| p.allowed_ips.clone())
}

#[test]
fn the_phases_table() {
    for strict in [false, true] {
        let active = three(strict, "active");
        for (phase, own_routes) in [
            ("leaving", RouteType::Unicast),
            ("joining", RouteType::Throw),
        ] {
            let cluster = three(strict, phase);
            // The peers: c stays a peer with the same allowed IPs, routed plain.
            let a = plan_node(&cluster, "a").unwrap();
            let a_active = plan_node(&active, "a").unwrap();
            assert_eq!(allowed(&a, "c"), allowed(&a_active, "c"), "{phase}");
            assert_eq!(route(&a, "10.65.3.0/24"), Some(RouteType::Throw), "{phase}");
            assert_eq!(route(&a, "10.0.0.3/32"), Some(RouteType::Throw), "{phase}");
            // ... and the rest of a's plan is what it was.
            assert_eq!(route(&a, "10.65.2.0/24"), Some(RouteType::Unicast));
            assert_eq!(allowed(&a, "b"), allowed(&a_active, "b"));
            assert_eq!(a.marking, a_active.marking, "{phase}");
            // The node itself keeps every peer; leaving it still encrypts, joining it routes
            // plain.
            let c = plan_node(&cluster, "c").unwrap();
            let c_active = plan_node(&active, "c").unwrap();
            assert_eq!(c.interfaces, c_active.interfaces, "{phase}");
            assert_eq!(route(&c, "10.65.1.0/24"), Some(own_routes), "{phase}");
            assert_eq!(route(&c, "10.0.0.2/32"), Some(own_routes), "{phase}");
            // In strict mode a leaving node has no ingress filter: its peers' plaintext to it
            // must arrive. A joining one keeps its filter, which has nothing to drop: it
            // routes nothing into the tunnel.
            let filter = c.marking.as_ref().unwrap().strict.is_some();
            assert_eq!(
                filter,
                strict && phase == "joining",
                "{phase}, strict {strict}"
            );
            assert!(!c.must_arrive_encrypted("10.65.1.5".parse().unwrap()));
        }
    }
}

#[test]
fn the_wireguard_interface_checks_the_reverse_path_loosely() {
    let plan = plan_node(&three(false, "active"), "a").unwrap();
    let keys: Vec<(&str, &str)> = plan
        .sysctls
        .iter()
        .map(|s| (s.key.as_str(), s.value.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("net.ipv4.conf.all.src_valid_mark", "1"),
            ("net.ipv4.conf.wireguard/cali.rp_filter", "2"),
        ]
    );
}

#[test]
fn the_phase_reads_and_writes_and_a_bad_one_is_refused() {
    let cluster = three(false, "leaving");
    assert_eq!(cluster.node("c").unwrap().phase(), Phase::Leaving);
    let json = serde_json::to_string(cluster.node("c").unwrap()).unwrap();
    assert!(json.contains(r#""phase":"leaving""#), "{json}");
    let active = serde_json::to_string(three(false, "active").node("c").unwrap()).unwrap();
    assert!(!active.contains("phase"), "{active}");
    let bad = parse_cluster(
        r#"{"nodes": [{"name": "a", "wireguard": {"public_key": null, "phase": "gone"}}]}"#,
    );
    assert!(bad.is_err());
}

/// The steps of a leave and of a join, as the e2e harness (and an agent) runs them: each
/// step is applied by the changing node first, then by the others in any order, and in
/// every mixed state every flow between the nodes' hosts and pods is delivered (encrypted
/// or plain, never dropped). The join's `joining` is the node's own view; its peers see it
/// active from the start.
#[test]
fn every_mixed_state_of_a_leave_and_a_join_delivers_every_flow() {
    let state = |phase: &str| match phase {
        "off" => {
            let mut c = three(false, "active");
            let mut n = c.node("c").unwrap().clone();
            n.wireguard.as_mut().unwrap().enabled = false;
            c.upsert_node(n).unwrap();
            c
        }
        p => three(false, p),
    };
    // Per step: (c's view before, the peers' view before, c's after, the peers' after).
    let steps = [
        ("active", "active", "leaving", "leaving"),
        ("leaving", "leaving", "off", "off"),
        ("off", "off", "joining", "active"),
        ("joining", "active", "active", "active"),
    ];
    for (cb, pb, ca, pa) in steps {
        // c (bit 2) applies first; a and b follow in either order.
        for mask in [0u8, 0b100, 0b101, 0b110, 0b111] {
            let plans: Vec<NodePlan> = ["a", "b", "c"]
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let applied = mask & (1 << i) != 0;
                    let view = match (*n == "c", applied) {
                        (true, false) => cb,
                        (true, true) => ca,
                        (false, false) => pb,
                        (false, true) => pa,
                    };
                    plan_node(&state(view), n).unwrap()
                })
                .collect();
            let sim = Simulator::new(&state(pa), plans);
            let hosts = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
            let pods = ["10.65.1.5", "10.65.2.5", "10.65.3.5"];
            for (i, from) in ["a", "b", "c"].iter().enumerate() {
                for (j, to) in hosts.iter().chain(&pods).enumerate() {
                    if i == j % 3 {
                        continue;
                    }
                    let to = to.parse().unwrap();
                    for source in [
                        Source::Host((*from).into(), Family::V4),
                        Source::Pod(pods[i].parse().unwrap()),
                    ] {
                        let trace = sim.trace(source.clone(), to);
                        assert!(
                            matches!(trace.outcome, Outcome::Encrypted | Outcome::Plain),
                            "step {cb}/{pb} → {ca}/{pa}, mask {mask:03b}: {source:?} → {to}: {}\n{:#?}",
                            trace.outcome,
                            trace.hops
                        );
                    }
                }
            }
        }
    }
}

/// The check above can fail: without the phases (WireGuard disabled on c at once), the
/// state in which c's peers applied and c did not yet drops c's encrypted packets.
#[test]
fn without_phases_a_mixed_state_drops() {
    let mut off = three(false, "active");
    let mut n = off.node("c").unwrap().clone();
    n.wireguard.as_mut().unwrap().enabled = false;
    off.upsert_node(n).unwrap();
    let plans = vec![
        plan_node(&off, "a").unwrap(),
        plan_node(&off, "b").unwrap(),
        plan_node(&three(false, "active"), "c").unwrap(),
    ];
    let sim = Simulator::new(&off, plans);
    let trace = sim.trace(
        Source::Pod("10.65.3.5".parse().unwrap()),
        "10.65.1.5".parse().unwrap(),
    );
    assert!(
        matches!(trace.outcome, Outcome::Dropped(_)),
        "{}",
        trace.outcome
    );
}

/// A node's routes by destination.
fn kinds(plan: &NodePlan) -> BTreeMap<IpNet, RouteType> {
    plan.routes
        .iter()
        .map(|r| (r.destination, r.kind))
        .collect()
}

proptest! {
    #![proptest_config(proptest_config())]

    /// A hostile node that marks itself joining or leaving can do to the other nodes' plans
    /// no more than it could by disabling WireGuard: every route is as it was, or as it
    /// would be with the node explicitly plain; every other peer is unchanged, and its own
    /// peer entry keeps its allowed IPs (its encrypted packets are still accepted). In strict
    /// mode and out.
    #[test]
    fn a_phase_changes_nothing_about_other_nodes_destinations(
        shape in cluster_shape(),
        trust in trust_shape(),
        strict in any::<bool>(),
        h in 0usize..MAX_NODES,
        leaving in any::<bool>(),
    ) {
        let base = build(&shape);
        let mut mesh = base.mesh().clone();
        mesh.strict_mode = strict;
        trust.apply(&mut mesh);
        let mut nodes: Vec<Node> = base.nodes().to_vec();
        for n in &mut nodes {
            if let Some(wg) = n.wireguard.as_mut() {
                wg.phase = Phase::Active;
            }
        }
        let Ok(active) = Cluster::new(mesh.clone(), nodes.clone()) else { return Ok(()) };
        let h = h % nodes.len();
        let Some(wg) = nodes[h].wireguard.as_mut() else { return Ok(()) };
        wg.phase = if leaving { Phase::Leaving } else { Phase::Joining };
        let phased = Cluster::new(mesh.clone(), nodes.clone()).unwrap();
        let mut off = nodes.clone();
        if let Some(wg) = off[h].wireguard.as_mut() {
            wg.enabled = false;
            wg.phase = Phase::Active;
        }
        let disabled = Cluster::new(mesh, off).unwrap();
        let hn = &nodes[h].name;
        let plans = plan_all(&active).into_iter().zip(plan_all(&phased)).zip(plan_all(&disabled));
        for ((before, after), off) in plans {
            if before.node == *hn {
                continue;
            }
            let (b, a, o) = (kinds(&before), kinds(&after), kinds(&off));
            prop_assert_eq!(b.keys().collect::<Vec<_>>(), a.keys().collect::<Vec<_>>());
            for (dest, kind) in &a {
                prop_assert!(
                    b.get(dest) == Some(kind) || o.get(dest) == Some(kind),
                    "on {}: {} is {:?}, was {:?}, {:?} with {} plain", before.node, dest, kind, b.get(dest), o.get(dest), hn
                );
            }
            prop_assert_eq!(&before.marking, &after.marking);
            prop_assert_eq!(&before.sysctls, &after.sysctls);
            for (bi, ai) in before.interfaces.iter().zip(&after.interfaces) {
                prop_assert_eq!(&bi.peers, &ai.peers, "peers of {}", before.node);
            }
        }
    }

    /// The incremental planner walks a node through its phases (and back), with the full
    /// plan and the delta checked at every step, on every node of the cluster.
    #[test]
    fn phase_steps_are_incremental_on_every_node(
        shape in cluster_shape(),
        h in 0usize..MAX_NODES,
        steps in proptest::collection::vec(0u8..4, 1..6),
    ) {
        let cluster = build(&shape);
        let h = name(h % cluster.nodes().len());
        for local in cluster.nodes() {
            let mut planner = IncrementalPlanner::new(&cluster, &local.name);
            let mut before = planner.plan();
            for step in &steps {
                let mut node = planner.cluster().unwrap().node(&h).unwrap().clone();
                let Some(wg) = node.wireguard.as_mut() else { break };
                if *step == 3 {
                    wg.enabled = !wg.enabled;
                } else {
                    wg.phase = phase(*step);
                }
                let delta = planner.apply(Event::NodeUpserted(node)).unwrap();
                let after = planner.plan();
                prop_assert_eq!(&after, &plan_node(&planner.cluster().unwrap(), &local.name).unwrap());
                prop_assert_eq!(&delta, &diff(&before, &after));
                before = after;
            }
        }
    }
}
