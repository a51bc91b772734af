//! `wgmesh-netlink` as a library: one node's plan, compared with what this host has, as the
//! operations that would make them equal (a dry run: nothing is changed). `wgmesh apply` is
//! the operator's command that also applies them.
//!
//! ```text
//! sudo cargo run --features netlink --example apply -- examples/clusters/aks-azure-cni.json \
//!     aks-nodepool1-19852467-vmss000000
//! ```

use std::process::ExitCode;

use wgmesh::core::{PrivateKey, plan_node, spec::parse_cluster};
use wgmesh::netlink::{KeyRing, Linux, LinuxConfig, Ownership, Reconciler};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cluster, node] = &args[..] else {
        eprintln!("usage: apply CLUSTER_FILE NODE");
        return ExitCode::from(2);
    };
    let planned = std::fs::read_to_string(cluster)
        .map_err(|e| e.to_string())
        .and_then(|text| parse_cluster(&text).map_err(|e| e.to_string()))
        .and_then(|c| {
            plan_node(&c, node)
                .map(|p| (c, p))
                .map_err(|e| e.to_string())
        });
    let (cluster, plan) = match planned {
        Ok(planned) => planned,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // A throwaway key: a dry run only compares; `wgmesh apply` keeps the node's key in a file.
    let keys = KeyRing::single(PrivateKey::generate());
    let result = Linux::open(LinuxConfig::default()).and_then(|linux| {
        let mut reconciler = Reconciler::new(linux, Ownership::from_mesh(cluster.mesh()), keys);
        reconciler.dry_run(&plan)
    });
    match result {
        Ok(report) => {
            for op in &report.operations {
                println!("would: {op}");
            }
            println!("{} operations", report.operations.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
