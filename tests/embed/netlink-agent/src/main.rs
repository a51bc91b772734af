//! A node agent built on `wgmesh-netlink` alone.
//!
//! `wgmesh-embed-netlink-agent plan`: builds a three-node cluster in code, plans node `a`
//! with `wgmesh-core`, and prints what the plan holds (no privileges needed).
//! `wgmesh-embed-netlink-agent dry-run`: also opens this host's dataplane (`Linux`, needs
//! `CAP_NET_ADMIN`) and prints the operations a reconcile would execute, changing nothing.

use std::net::IpAddr;
use std::process::ExitCode;

use wgmesh_core::{Cluster, MeshConfig, Node, NodePlan, NodeWireGuard, PrivateKey, plan_node};
use wgmesh_netlink::{Backend, KeyRing, Linux, LinuxConfig, Ownership, Reconciler};

fn ip(text: &str) -> Result<IpAddr, String> {
    text.parse().map_err(|e| format!("{text}: {e}"))
}

/// The cluster as an agent would know it, with our key on node `a`.
fn cluster(ours: &PrivateKey) -> Result<Cluster, String> {
    let mut nodes = Vec::new();
    for (name, address, cidr, key) in [
        ("a", "10.0.0.1", "10.65.0.0/26", ours.public_key()),
        (
            "b",
            "10.0.0.2",
            "10.65.0.64/26",
            PrivateKey::generate().public_key(),
        ),
        (
            "c",
            "10.0.0.3",
            "10.65.0.128/26",
            PrivateKey::generate().public_key(),
        ),
    ] {
        nodes.push(
            Node::new(name)
                .with_addresses([ip(address)?])
                .with_pod_cidrs([cidr.parse().map_err(|e| format!("{cidr}: {e}"))?])
                .with_wireguard(NodeWireGuard::new(Some(key), None)),
        );
    }
    Cluster::new(MeshConfig::default(), nodes).map_err(|e| e.to_string())
}

fn print_plan(plan: &NodePlan) {
    for iface in &plan.interfaces {
        println!(
            "plan: interface {} mtu {} port {} peers {}",
            iface.name,
            iface.mtu,
            iface.listen_port,
            iface.peers.len()
        );
        for peer in &iface.peers {
            let ips: Vec<String> = peer.allowed_ips.iter().map(|n| n.to_string()).collect();
            println!(
                "plan: peer {} {} allowed ips {}",
                peer.node,
                peer.endpoint,
                ips.join(",")
            );
        }
    }
    println!(
        "plan: {} routes, {} rules, {} sysctls",
        plan.routes.len(),
        plan.rules.len(),
        plan.sysctls.len()
    );
}

fn main() -> ExitCode {
    let mode = std::env::args().nth(1);
    let dry_run = match mode.as_deref() {
        Some("plan") => false,
        Some("dry-run") => true,
        _ => {
            eprintln!("usage: wgmesh-embed-netlink-agent plan|dry-run");
            return ExitCode::from(2);
        }
    };
    let key = PrivateKey::generate();
    let result = cluster(&key).and_then(|cluster| {
        let plan = plan_node(&cluster, "a").map_err(|e| e.to_string())?;
        print_plan(&plan);
        let config = LinuxConfig::with_backend(Backend::Auto);
        println!(
            "dataplane: userspace program {}, sockets in {}",
            config.userspace_program.display(),
            config.socket_dir.display()
        );
        if !dry_run {
            return Ok(());
        }
        let linux = Linux::open(config).map_err(|e| e.to_string())?;
        println!("dataplane: {}", linux.backend_description());
        let mut reconciler = Reconciler::new(
            linux,
            Ownership::from_mesh(cluster.mesh()),
            KeyRing::single(key),
        );
        let report = reconciler.dry_run(&plan).map_err(|e| e.to_string())?;
        for op in &report.operations {
            println!("would: {op}");
        }
        println!("dry run: {} operations", report.operations.len());
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
