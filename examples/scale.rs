//! Builds a synthetic cluster, plans one node, and prints sizes and timings: the peak-memory
//! benchmark runs it under `/usr/bin/time -v`.
//!
//! `cargo run --release --example scale -- [NODES] [PODS_PER_NODE]` (default 5000 110).

use std::process::ExitCode;
use std::time::Instant;

use wgmesh::core::{IncrementalPlanner, plan_node};

#[path = "../benches/support/synthetic.rs"]
mod synthetic;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let parse = |v: Option<String>, default: usize, what: &str| -> Result<usize, String> {
        v.map_or(Ok(default), |s| {
            s.parse()
                .map_err(|_| format!("{what} must be a number, got {s:?}"))
        })
    };
    let (nodes, pods) = match (
        parse(args.next(), 5000, "NODES"),
        parse(args.next(), 110, "PODS_PER_NODE"),
    ) {
        (Ok(n), Ok(p)) if n > 0 && p <= 250 => (n, p),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        _ => {
            eprintln!("error: need NODES > 0 and PODS_PER_NODE <= 250");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let cluster = synthetic::cluster(nodes, pods);
    let built = start.elapsed();
    let local = synthetic::name(nodes / 2);
    let start = Instant::now();
    let plan = match plan_node(&cluster, &local) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let planned = start.elapsed();
    let allowed: usize = plan
        .interfaces
        .iter()
        .flat_map(|i| &i.peers)
        .map(|p| p.allowed_ips.len())
        .sum();
    println!(
        "cluster: {nodes} nodes x {pods} pods, built in {built:?}; plan of {local}: {} peers, {allowed} allowed ips, {} routes, in {planned:?}",
        plan.interfaces.iter().map(|i| i.peers.len()).sum::<usize>(),
        plan.routes.len()
    );
    if std::env::var_os("WGMESH_SCALE_INCREMENTAL").is_some() {
        let start = Instant::now();
        let planner = IncrementalPlanner::new(&cluster, &local);
        println!("incremental planner built in {:?}", start.elapsed());
        drop(planner);
    }
    ExitCode::SUCCESS
}
