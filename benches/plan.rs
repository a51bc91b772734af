//! Planning at scale: the full plan of one node in a 5,000-node cluster with 110 workload
//! addresses per node and host encryption (555,000 destinations), and one incremental
//! workload-address change in that cluster.
//!
//! `cargo bench --bench plan` — figures and machine in BENCHMARKS.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use wgmesh::core::{Event, IncrementalPlanner, plan_node};

#[path = "support/synthetic.rs"]
mod synthetic;

const NODES: usize = 5_000;
const PODS: usize = 110;

fn full_plan(c: &mut Criterion) {
    let cluster = synthetic::cluster(NODES, PODS);
    let local = synthetic::name(NODES / 2);
    let mut group = c.benchmark_group("plan");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("full plan, 5000 nodes x 110 pods, host encryption", |b| {
        b.iter(|| black_box(plan_node(black_box(&cluster), &local).expect("plan")))
    });
    group.finish();
}

fn incremental(c: &mut Criterion) {
    let cluster = synthetic::cluster(NODES, PODS);
    let local = synthetic::name(NODES / 2);
    let mut planner = IncrementalPlanner::new(&cluster, &local);
    let mut group = c.benchmark_group("incremental");
    // Pod addresses 200..250 of every node are free; cycle through them.
    let free: Vec<(String, std::net::IpAddr)> = (0..NODES)
        .step_by(7)
        .flat_map(|i| (200..240).map(move |k| (synthetic::name(i), synthetic::pod_addr(i, k))))
        .collect();
    let mut next = 0usize;
    group.bench_function("workload ip added", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (node, ip) = free[next % free.len()].clone();
                next += 1;
                let start = Instant::now();
                let delta = planner
                    .apply(Event::WorkloadIpAdded {
                        node: node.clone(),
                        ip,
                    })
                    .expect("add");
                total += start.elapsed();
                black_box(delta);
                planner
                    .apply(Event::WorkloadIpRemoved { node, ip })
                    .expect("remove");
            }
            total
        })
    });
    group.bench_function("workload ip removed", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (node, ip) = free[next % free.len()].clone();
                next += 1;
                planner
                    .apply(Event::WorkloadIpAdded {
                        node: node.clone(),
                        ip,
                    })
                    .expect("add");
                let start = Instant::now();
                let delta = planner
                    .apply(Event::WorkloadIpRemoved { node, ip })
                    .expect("remove");
                total += start.elapsed();
                black_box(delta);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, full_plan, incremental);
criterion_main!(benches);
