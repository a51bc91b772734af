//! The `wgmesh` binary as a process, with only its arguments counting (no fallbacks from the
//! environment the tests run in), and the recorded AKS fixtures its Kubernetes sources read.
#![allow(dead_code, unreachable_pub)]

use std::process::{Command, Output};

/// `kubectl get nodes -o json` of the AKS cluster with Azure CNI.
pub const NODES: &str = "wgmesh-k8s/tests/fixtures/aks-azure-cni-nodes.json";
/// `kubectl get pods -o json` of the same cluster.
pub const PODS: &str = "wgmesh-k8s/tests/fixtures/aks-azure-cni-pods.json";
/// The agent's configuration as deployed.
pub const CONFIG: &str = "deploy/agent.yaml";

/// Runs `wgmesh ARGS` in the repository's root.
pub fn wgmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgmesh"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("KUBECONFIG")
        .env_remove("WGMESH_CLUSTER")
        .env_remove("NODE_NAME")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap()
}
