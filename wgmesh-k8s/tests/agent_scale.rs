//! The scale benchmark's harness (`benches/agent_scale.rs`) at a small scale, so that it
//! cannot rot: 50 nodes × 20 pods, a second of churn, a burst of 5 nodes, a one-second
//! outage, a resync every 2 s. Asserts that every phase converges, not how fast (figures are
//! the benchmark's).

#[path = "../benches/agent_scale/harness.rs"]
mod harness;

#[test]
fn the_scale_harness_converges_at_a_small_scale() {
    let params = harness::Params::smoke();
    let report = harness::run(&params, &mut |line| eprintln!("{line}"));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // Every other node is a peer on both interfaces; every pod and node address a route.
    assert_eq!(report.first_peers, 2 * (params.nodes - 1));
    assert!(report.first_routes >= (params.nodes - 1) * (params.pods + 1));
    for churn in &report.churn {
        assert!(churn.events > 0, "no address change measured: {churn:?}");
        assert_eq!(churn.unresolved, 0, "{churn:?}");
    }
    assert!(report.burst.is_some(), "the new nodes never became peers");
    assert!(
        report.reconverged.is_some(),
        "no convergence after the outage"
    );
    assert!(
        report.outage_requests > 0,
        "the agent did not retry during the outage"
    );
    // A resync every 2 s: some ran on their own thread, beside the deltas; the kernel held
    // the plan (no drift here), so they had nothing to repair.
    assert!(report.background_resyncs > 0, "no background resync ran");
    assert_eq!(report.background_operations, 0);
}
