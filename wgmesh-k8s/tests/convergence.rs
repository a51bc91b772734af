//! Random watch-event sequences (nodes joining, leaving, changing keys, addresses and blocks;
//! pods starting, finishing and going; relists; dataplane faults; the node's own annotation
//! tampered with): after every step has settled, the agent's incremental plan equals a full
//! recompute over what the API server has, and the node has exactly that plan.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Node as K8sNode;
use proptest::prelude::*;
use wgmesh_core::{MeshConfig, RouteSource, plan_node};
use wgmesh_k8s::agent::{Agent, AgentSettings};
use wgmesh_k8s::bootstrap::guard_plan;
use wgmesh_k8s::dataplane::RecordingDataplane;
use wgmesh_k8s::metrics::Metrics;

#[derive(Debug, Clone)]
enum Step {
    /// Node `i` (0 is the local node) is created or modified.
    Node {
        i: usize,
        addr: u8,
        key: Option<u8>,
        garbage: bool,
        blocks: Vec<u8>,
    },
    DeleteNode(usize),
    Pod {
        name: u8,
        node: usize,
        ip: u8,
        finished: bool,
    },
    DeletePod(u8),
    RelistNodes,
    FailDataplane(usize),
    Wait(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..4usize, 1..4u8, proptest::option::of(1..6u8), proptest::bool::weighted(0.1), proptest::collection::vec(0..6u8, 0..3))
            .prop_map(|(i, addr, key, garbage, blocks)| Step::Node { i, addr, key, garbage, blocks }),
        1 => (1..4usize).prop_map(Step::DeleteNode),
        5 => (0..12u8, 0..4usize, 0..20u8, proptest::bool::weighted(0.2))
            .prop_map(|(name, node, ip, finished)| Step::Pod { name, node, ip, finished }),
        2 => (0..12u8).prop_map(Step::DeletePod),
        1 => Just(Step::RelistNodes),
        1 => (1..3usize).prop_map(Step::FailDataplane),
        2 => (0..3000u64).prop_map(Step::Wait),
    ]
}

fn name(i: usize) -> String {
    ["a", "b", "c", "d"][i].to_owned()
}

fn k8s_node(i: usize, addr: u8, key: Option<u8>, garbage: bool, blocks: &[u8]) -> K8sNode {
    let ip = format!("10.0.{i}.{addr}");
    let cidrs: Vec<String> = blocks.iter().map(|b| format!("10.65.{b}.0/24")).collect();
    let cidrs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
    let n = wg_node(&name(i), &ip, &cidrs, key.map(public));
    if garbage {
        annotate(n, "wgmesh.io/public-key", Some("tampered"))
    } else {
        n
    }
}

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256)
            .max(256),
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn incremental_agent_converges_to_the_full_plan(
        workload in proptest::bool::ANY,
        host_encryption in proptest::bool::ANY,
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let mut mesh = MeshConfig::default();
        mesh.host_encryption = host_encryption;
        if workload {
            mesh.route_source = RouteSource::WorkloadIps;
        }
        let mut settings = AgentSettings::new("a", mesh);
        settings.watch_pods = true;
        let dataplane = RecordingDataplane::new(Some(public(1)), None);
        let mut d = Driver::new(Agent::new(settings, dataplane, Metrics::new()));
        d.start_with(&[k8s_node(0, 1, Some(1), false, &[0]), k8s_node(1, 1, Some(2), false, &[1])], &[]);
        let mut pods = std::collections::BTreeMap::new();
        for s in steps {
            match s {
                Step::Node { i, addr, key, garbage, blocks } => d.node(k8s_node(i, addr, key, garbage, &blocks)),
                Step::DeleteNode(i) => d.delete_node(&name(i)),
                Step::Pod { name, node, ip, finished } => {
                    let p = pod("default", &format!("p{name}"), &self::name(node), &[&format!("10.65.{}.{ip}", node)], if finished { "Succeeded" } else { "Running" });
                    pods.insert(name, p.clone());
                    d.pod(p);
                }
                Step::DeletePod(name) => {
                    if let Some(p) = pods.remove(&name) {
                        d.delete_pod(p);
                    }
                }
                Step::RelistNodes => {
                    let nodes: Vec<K8sNode> = d.nodes.values().cloned().collect();
                    for ev in relist(&nodes) {
                        d.agent.on_nodes(ev, d.now);
                    }
                }
                Step::FailDataplane(n) => d.agent.dataplane_mut().fail_next(n),
                Step::Wait(ms) => d.run_for(Duration::from_millis(ms)),
            }
            // Let everything settle: publication echo, debounce, retries after faults (backing
            // off up to 30 s each: failures injected by steps that applied nothing pile up),
            // republications that keep being undone (up to 60 s).
            let budget = 200 + 30 * d.agent.dataplane().failures_to_come();
            d.run_for(Duration::from_secs(2));
            // A timer that fires at the window's end (a join's settle time, ending with the
            // marker's removal) leaves a delta in its debounce: wait it out too.
            let mut waited = 0;
            while waited < budget
                && (d.agent.key_check().is_some_and(|k| !k.confirmed())
                    || !d.agent.state().ready()
                    || d.agent.next_wakeup(d.now).is_some_and(|t| t < d.now + Duration::from_secs(1)))
            {
                d.run_for(Duration::from_secs(5));
                waited += 5;
            }
            let cluster = d.agent.view().cluster().unwrap();
            let full = plan_node(&cluster, "a").unwrap();
            let incremental = d.agent.plan();
            prop_assert_eq!(incremental.as_ref(), Some(&full));
            let mut on_node = full.clone();
            if d.agent.guarded() {
                guard_plan(&mut on_node);
            }
            prop_assert_eq!(d.agent.dataplane().node(), &on_node);
            // The local node's own annotation always ends as its key, unless it was deleted.
            if d.nodes.contains_key("a") {
                prop_assert!(d.agent.key_check().unwrap().confirmed());
                prop_assert!(!d.agent.guarded());
            }
        }
    }
}
