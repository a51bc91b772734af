//! The reference wgmesh node agent for Kubernetes: run one per node (a DaemonSet, see
//! `deploy/`). It watches Nodes (and Pods, for `workload_ips`), publishes this node's public
//! key on its Node, and keeps the node's WireGuard mesh equal to the plan.
//!
//! ```text
//! cargo run --features k8s --example agent -- --node-name "$(hostname)" --dry-run --log-format text
//! cargo run --features k8s --example agent -- --config /etc/wgmesh/agent.yaml   # as root
//! ```
//!
//! It programs the node through `wgmesh-netlink` (kernel WireGuard, or wireguard-go with
//! `--backend userspace` or when `auto` finds no kernel module); `--dry-run` only logs.
//!
//! Configuration: `wgmesh_k8s::config` (file and flags). Bad configuration exits with code 2
//! and one line naming the field.

use std::process::ExitCode;

use wgmesh::core::{PrivateKey, PublicKey};
use wgmesh::k8s::config::AgentConfig;
use wgmesh::k8s::dataplane::{Dataplane, LoggingDataplane};
use wgmesh::k8s::metrics::Metrics;
use wgmesh::k8s::netlink::NetlinkDataplane;
use wgmesh::k8s::wgmesh_netlink::keys::{KeyOrigin, load, load_or_generate};
use wgmesh::k8s::wgmesh_netlink::{KeyRing, Linux, LinuxConfig};
use wgmesh::k8s::{http, kube, logging, run, tokio, tracing};

const USAGE: &str =
    "usage: agent [--config FILE] [--node-name NAME] [--private-key-file PATH] [--dry-run]
             [--metrics-address ADDR|\"\"] [--log-format json|text] [--resync-seconds N]
             [--route-source cidr_blocks|workload_ips] [--host-encryption true|false]
             [--enabled true|false] [--calico-annotations true|false]
             [--watch-pods auto|true|false] [--control-plane-endpoint ADDR:PORT]...";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let config = match AgentConfig::from_args(&args, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(agent(config)),
        Err(e) => Err(format!("cannot start the runtime: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            ExitCode::FAILURE
        }
    }
}

/// The key this node uses in a dry run: an existing key file is read (it must be mode
/// 0600); a missing one is replaced by a key that is not saved.
fn dry_run_key(config: &AgentConfig) -> Result<PublicKey, String> {
    let path = &config.private_key_file;
    if path.exists() {
        return load(path)
            .map(|k| k.public_key())
            .map_err(|e| e.to_string());
    }
    tracing::warn!(path = %path.display(), "no key file; dry run with a key that is not saved");
    Ok(PrivateKey::generate().public_key())
}

/// What programs the node: the kernel over netlink, or (dry run) nothing but the log.
fn dataplane(config: &AgentConfig) -> Result<Box<dyn Dataplane + Send>, String> {
    if config.dry_run {
        let key = dry_run_key(config)?;
        return Ok(Box::new(LoggingDataplane::new(Some(key), Some(key))));
    }
    // The key survives reboots in its file (mode 0600), so peers keep knowing it.
    let (key, origin) = load_or_generate(&config.private_key_file).map_err(|e| e.to_string())?;
    if origin == KeyOrigin::Generated {
        tracing::info!(path = %config.private_key_file.display(), public_key = %key.public_key(), "generated a new private key");
    }
    let linux =
        Linux::open(LinuxConfig::with_backend(config.backend)).map_err(|e| e.to_string())?;
    tracing::info!(backend = linux.backend_description(), "dataplane");
    Ok(Box::new(NetlinkDataplane::new(
        linux,
        &config.settings.mesh,
        KeyRing::single(key),
    )))
}

async fn agent(config: AgentConfig) -> Result<(), String> {
    // As its container's PID 1 the agent inherits the wireguard-go daemons it starts (they
    // fork into the background) and reaps them when they end; elsewhere this returns at once.
    tokio::spawn(run::reap_orphans_if_init(std::time::Duration::from_secs(5)));
    let dataplane = dataplane(&config)?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot configure the API client: {e}"))?;
    let metrics = Metrics::new();
    if let Some(address) = config.metrics_address {
        let listener = http::bind(address)
            .await
            .map_err(|e| format!("metrics_address {address}: {e}"))?;
        let max_silence = config.settings.resync_interval * 3;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve(listener, metrics, max_silence).await {
                tracing::error!(error = %e, "health endpoint stopped");
            }
        });
        tracing::info!(%address, "health and metrics endpoint");
    }
    run::run(
        client,
        config.settings,
        dataplane,
        metrics,
        run::shutdown_signal(),
    )
    .await
    .map_err(|e| e.to_string())
}
