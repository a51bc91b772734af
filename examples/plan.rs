//! The plan of every node of a cluster, with `wgmesh-core` as a library: parse the cluster,
//! report what it would exclude and why, plan each node, print the plans.
//!
//! ```text
//! cargo run --example plan                      # the design's 3-node AKS + Azure CNI cluster
//! cargo run --example plan -- cluster.yaml      # a cluster of your own (JSON or YAML)
//! ```
//!
//! The operator's command line, with one node, JSON and `wg setconf` output, is
//! `wgmesh plan` (the `wgmesh` binary). Bad input exits with code 2 and one line.

use std::process::ExitCode;

use wgmesh::core::diagnostics::diagnose;
use wgmesh::core::{plan_all, render, spec::parse_cluster};

const SAMPLE: &str = include_str!("clusters/aks-azure-cni.json");

fn main() -> ExitCode {
    let text = match std::env::args_os().nth(1) {
        None => SAMPLE.to_owned(),
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", path.to_string_lossy());
                return ExitCode::from(2);
            }
        },
    };
    let cluster = match parse_cluster(&text) {
        Ok(cluster) => cluster,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for finding in diagnose(&cluster) {
        println!("finding: {finding}");
    }
    for plan in plan_all(&cluster) {
        println!("{}", render::text(&plan));
    }
    ExitCode::SUCCESS
}
