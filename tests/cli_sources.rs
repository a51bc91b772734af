//! `wgmesh plan` from Kubernetes objects instead of a cluster file: `kubectl get -o json`
//! output (`--from-kubectl`) and a live API server, read-only (`--kubeconfig`), through the
//! agent's own adapter with the agent's configuration (`--agent-config`).

use serde_json::{Value, json};

#[path = "support/cli.rs"]
mod cli;
#[path = "support/loopback_api.rs"]
mod loopback_api;

use cli::{CONFIG, NODES, PODS, wgmesh};

const NODE: &str = "aks-nodepool1-19852467-vmss000000";

fn json_plan(args: &[&str]) -> Value {
    let out = wgmesh(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn allowed(plan: &Value) -> Vec<String> {
    let mut ips: Vec<String> = plan["interfaces"][0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["allowed_ips"].as_array().unwrap().clone())
        .map(|ip| ip.as_str().unwrap().to_owned())
        .collect();
    ips.sort();
    ips
}

#[test]
fn kubectl_output_gives_the_plan_the_agent_would_program() {
    let plan = json_plan(&[
        "plan",
        "--from-kubectl",
        NODES,
        PODS,
        "--agent-config",
        CONFIG,
        "--node",
        NODE,
        "--format",
        "json",
    ]);
    assert_eq!(plan["node"], NODE);
    // Azure CNI with host encryption: every other node's address and pod addresses
    // (host-network pods excluded: they are the node's own address).
    assert_eq!(
        allowed(&plan),
        [
            "10.240.0.35/32",
            "10.240.0.36/32",
            "10.240.0.37/32",
            "10.240.0.64/32",
            "10.240.0.65/32",
            "10.240.0.66/32"
        ]
    );
    // Without the agent's configuration, the defaults: cidr_blocks, no pods, no host
    // encryption; the AKS nodes have no pod CIDRs, so the peers allow nothing.
    let default = json_plan(&[
        "plan",
        "--from-kubectl",
        NODES,
        PODS,
        "--node",
        NODE,
        "--format",
        "json",
    ]);
    assert!(allowed(&default).is_empty(), "{default}");
    // Text output names what the adapter left out and why.
    let out = wgmesh(&[
        "plan",
        "--from-kubectl",
        NODES,
        PODS,
        "--agent-config",
        CONFIG,
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("interface: wireguard.cali").count(),
        3,
        "{text}"
    );
}

#[test]
fn bad_kubernetes_input_exits_2_with_one_line() {
    let dir = std::env::temp_dir().join(format!("wgmesh-sources-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.json");
    std::fs::write(&junk, "{ not json").unwrap();
    let bad_node = dir.join("bad-node.json");
    std::fs::write(
        &bad_node,
        r#"{"kind": "Node", "apiVersion": "v1", "metadata": {"name": 7}}"#,
    )
    .unwrap();
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["plan", "--from-kubectl", junk.to_str().unwrap()],
            "not JSON",
        ),
        (
            vec!["plan", "--from-kubectl", bad_node.to_str().unwrap()],
            "items[0] (a Node)",
        ),
        (
            vec!["plan", "--cluster", "x.json", "--from-kubectl", NODES],
            "cannot be used with",
        ),
        (
            vec!["plan", "--kubeconfig", "/nonexistent/kubeconfig"],
            "kubeconfig /nonexistent/kubeconfig",
        ),
    ];
    for (args, needle) in cases {
        let out = wgmesh(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A live cluster: the same plan as from kubectl's output of the same objects, and nothing
/// but lists sent (no watch, no write).
#[test]
fn a_live_cluster_is_only_listed() {
    let items = |file: &str| -> Vec<Value> {
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["items"]
            .as_array()
            .unwrap()
            .clone()
    };
    let (_runtime, api, port) = loopback_api::start(items(NODES));
    let dir = std::env::temp_dir().join(format!("wgmesh-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = loopback_api::kubeconfig(&dir, port);
    // cidr_blocks: only Nodes are listed.
    let live = json_plan(&[
        "plan",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--node",
        NODE,
        "--format",
        "json",
    ]);
    let offline = json_plan(&[
        "plan",
        "--from-kubectl",
        NODES,
        "--node",
        NODE,
        "--format",
        "json",
    ]);
    assert_eq!(live, offline);
    let requests = api.lock().unwrap().requests.clone();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!requests.is_empty());
    for (method, target) in &requests {
        assert_eq!(method, "GET", "{target}: read-only");
        assert!(target.starts_with("/api/v1/nodes?"), "{target}");
        assert!(
            !target.contains("watch=true"),
            "{target}: a list, not a watch"
        );
    }
    assert_eq!(json!(live["node"]), json!(NODE));
}
