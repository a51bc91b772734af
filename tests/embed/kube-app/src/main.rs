//! A kube-rs application embedding `wgmesh-k8s` with its own Kubernetes version (1.35).
//!
//! `wgmesh-embed-kube-app demo`: converts Nodes built with this application's `k8s-openapi`
//! through `wgmesh_k8s::adapter`, feeds them to the agent's state machine over a recording
//! dataplane, and prints the plan it programmed.
//! `wgmesh-embed-kube-app run`: runs the whole reference agent (`daemon::run_agent`), dry, on
//! this application's tokio runtime; without a cluster it stops at the client with an error.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::Event;
use wgmesh_core::{MeshConfig, PrivateKey};
use wgmesh_k8s::adapter::{self, AdapterOptions};
use wgmesh_k8s::agent::{Agent, AgentSettings};
use wgmesh_k8s::config::ConfigSpec;
use wgmesh_k8s::dataplane::RecordingDataplane;
use wgmesh_k8s::metrics::{BuildInfo, Metrics};

fn kubernetes_version() -> &'static str {
    k8s_openapi::k8s_if_1_35! { return "1.35"; }
    #[allow(unreachable_code)]
    "not 1.35"
}

fn node(name: &str, ip: &str, cidr: &str, key: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(BTreeMap::from([(
                adapter::key_annotation(wgmesh_core::Family::V4).to_owned(),
                key.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidrs: Some(vec![cidr.to_owned()]),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".to_owned(),
                address: ip.to_owned(),
            }]),
            ..NodeStatus::default()
        }),
    }
}

fn demo() -> Result<(), String> {
    println!("kubernetes api: {}", kubernetes_version());
    let ours = PrivateKey::generate().public_key();
    let theirs = PrivateKey::generate().public_key();
    let a = node("a", "10.0.0.1", "10.65.0.0/26", &ours.to_base64());
    let b = node("b", "10.0.0.2", "10.65.0.64/26", &theirs.to_base64());

    let mut warnings = Vec::new();
    let info = adapter::node_info(&b, &AdapterOptions::default(), &mut warnings)
        .ok_or("node b was not converted")?;
    println!(
        "adapter: node {} addresses {:?} pod cidrs {:?} warnings {}",
        info.node.name,
        info.node.addresses,
        info.node.pod_cidrs,
        warnings.len()
    );

    let mut agent = Agent::new(
        AgentSettings::new("a", MeshConfig::default()),
        RecordingDataplane::new(Some(ours), None),
        Metrics::new(),
    );
    let now = Instant::now();
    agent.on_nodes(Event::Init, now);
    agent.on_nodes(Event::InitApply(a), now);
    agent.on_nodes(Event::InitApply(b), now);
    agent.on_nodes(Event::InitDone, now);
    agent.poll(now + Duration::from_secs(2));
    let plan = agent.dataplane().node();
    let iface = plan
        .interfaces
        .first()
        .ok_or("the agent programmed no interface")?;
    for peer in &iface.peers {
        let ips: Vec<String> = peer.allowed_ips.iter().map(|n| n.to_string()).collect();
        println!(
            "agent: interface {} peer {} key {} allowed ips {}",
            iface.name,
            peer.node,
            peer.public_key.to_base64(),
            ips.join(",")
        );
    }
    if iface.peers.len() != 1 || iface.peers[0].public_key != theirs {
        return Err(format!("expected one peer (b), got {:?}", iface.peers));
    }
    println!(
        "agent: {} routes, synced {}",
        plan.routes.len(),
        agent.synced()
    );
    Ok(())
}

fn run() -> Result<(), String> {
    // The application's own configuration file, in the agent's format.
    let key = std::env::temp_dir()
        .join(format!("wgmesh-embed-{}", std::process::id()))
        .join("private-key");
    let text = format!(
        "node_name: embedded\ndry_run: true\nhealth_address: \"\"\nprivate_key_file: {:?}\n",
        key.display().to_string()
    );
    let spec = ConfigSpec::parse(&text).map_err(|e| e.to_string())?;
    let config = spec
        .validate(|k| std::env::var(k).ok())
        .map_err(|e| e.to_string())?;
    let runtime = wgmesh_k8s::tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let build = BuildInfo::new("wgmesh-embed-kube-app 0.0.0", "");
    runtime
        .block_on(wgmesh_k8s::daemon::run_agent(config, build))
        .map_err(|e| format!("run_agent: {e}"))
}

fn main() -> ExitCode {
    let result = match std::env::args().nth(1).as_deref() {
        Some("demo") => demo(),
        Some("run") => run(),
        _ => {
            eprintln!("usage: wgmesh-embed-kube-app demo|run");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
