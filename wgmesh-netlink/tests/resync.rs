//! The background resync (`Reconciler::begin_resync` → `ResyncJob::run` on another thread →
//! `Reconciler::finish_resync`) against the shared fake kernel: it repairs drift, and never
//! undoes a delta applied after its snapshot — before or after its read of the kernel.

use ipnet::IpNet;
use wgmesh_core::{Event, IncrementalPlanner, Node, NodeWireGuard, PlanDelta};
use wgmesh_netlink::testing::{FakeKernel, SharedKernel};
use wgmesh_netlink::{Backend, Linux, LinuxConfig, Ownership, Reconciler, ResyncJob};

mod common;
use common::{four_nodes, key, ring};

const WG: &str = "wireguard.cali";

/// Node `a`'s planner and reconciler, converged, over a kernel the test also holds.
fn node_a() -> (
    IncrementalPlanner,
    Reconciler<Linux<SharedKernel>>,
    SharedKernel,
) {
    let c = four_nodes("");
    let planner = IncrementalPlanner::new(&c, "a");
    let kernel = SharedKernel::new(FakeKernel::new());
    let linux = Linux::with_kernel(kernel.handle(), LinuxConfig::with_backend(Backend::Kernel))
        .expect("the fake kernel resolves the wireguard family");
    let mut r = Reconciler::new(linux, Ownership::from_mesh(c.mesh()), ring());
    r.reconcile(&planner.plan()).unwrap();
    (planner, r, kernel)
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn has_route(kernel: &SharedKernel, destination: IpNet) -> bool {
    kernel
        .kernel()
        .routes
        .values()
        .any(|r| r.destination == destination)
}

fn drop_route(kernel: &SharedKernel, destination: IpNet) {
    kernel
        .kernel()
        .routes
        .retain(|_, r| r.destination != destination);
    assert!(!has_route(kernel, destination));
}

fn has_peer(kernel: &SharedKernel, node_key: u8) -> bool {
    kernel.kernel().devices[WG]
        .peers
        .contains_key(&key(node_key).public_key())
}

fn d_joins(planner: &mut IncrementalPlanner) -> PlanDelta {
    let node = Node::new("d")
        .with_addresses(["10.0.0.5".parse().unwrap()])
        .with_pod_cidrs(["10.65.1.0/26".parse().unwrap()])
        .with_wireguard(NodeWireGuard::new(Some(key(4).public_key()), None));
    planner.apply(Event::NodeUpserted(node)).unwrap()
}

fn run_on_a_thread(job: ResyncJob) -> wgmesh_netlink::ResyncFound {
    std::thread::spawn(move || job.run()).join().unwrap()
}

#[test]
fn a_background_resync_repairs_drift() {
    let (planner, mut r, kernel) = node_a();
    let b = net("10.65.0.64/26");
    drop_route(&kernel, b);
    let job = r
        .begin_resync()
        .unwrap()
        .expect("the shared kernel has a second handle");
    let report = r.finish_resync(run_on_a_thread(job)).unwrap();
    assert_eq!(report.operations.len(), 1, "{:#?}", report.operations);
    assert_eq!(report.skipped, 0);
    assert!(has_route(&kernel, b));
    assert!(r.reconcile(&planner.plan()).unwrap().is_noop());
}

/// A node joins after the snapshot and before the read: the read sees its peer and routes,
/// the snapshot does not have them — a resync that executed its diff would remove them.
#[test]
fn a_delta_between_snapshot_and_read_is_not_undone() {
    let (mut planner, mut r, kernel) = node_a();
    let c = net("10.65.0.128/26");
    drop_route(&kernel, c); // drift, to be repaired meanwhile
    let job = r.begin_resync().unwrap().unwrap();
    r.apply_delta(&d_joins(&mut planner)).unwrap();
    let d = net("10.65.1.0/26");
    assert!(has_peer(&kernel, 4) && has_route(&kernel, d));
    let report = r.finish_resync(run_on_a_thread(job)).unwrap();
    assert!(
        report.skipped > 0,
        "the diff saw d's peer and route as extra"
    );
    assert!(
        has_peer(&kernel, 4),
        "the resync removed a peer a newer delta added"
    );
    assert!(
        has_route(&kernel, d),
        "the resync removed a route a newer delta added"
    );
    assert!(has_route(&kernel, c), "the drift was not repaired");
    assert!(r.reconcile(&planner.plan()).unwrap().is_noop());
}

/// A node leaves after the read: the snapshot and the read both have it, and one of its
/// allowed IPs had drifted away — a resync that executed its diff would set the peer of a
/// gone node again.
#[test]
fn a_delta_after_the_read_is_not_undone() {
    let (mut planner, mut r, kernel) = node_a();
    let b = net("10.65.0.64/26");
    let b_key = key(2).public_key();
    assert!(
        kernel
            .kernel()
            .devices
            .get_mut(WG)
            .unwrap()
            .peers
            .get_mut(&b_key)
            .unwrap()
            .allowed_ips
            .remove(&b)
    );
    let job = r.begin_resync().unwrap().unwrap();
    let found = run_on_a_thread(job);
    let delta = planner
        .apply(Event::NodeRemoved { node: "b".into() })
        .unwrap();
    r.apply_delta(&delta).unwrap();
    let report = r.finish_resync(found).unwrap();
    assert_eq!(report.skipped, 1, "{:#?}", report.operations);
    assert!(
        !has_peer(&kernel, 2),
        "the resync set the peer of a removed node again"
    );
    assert!(!has_route(&kernel, b));
    assert!(r.reconcile(&planner.plan()).unwrap().is_noop());
}

/// A full reconcile in between makes the background result stale: nothing of it runs.
#[test]
fn a_full_reconcile_in_between_supersedes_the_job() {
    let (mut planner, mut r, kernel) = node_a();
    let job = r.begin_resync().unwrap().unwrap();
    d_joins(&mut planner);
    r.reconcile(&planner.plan()).unwrap();
    let report = r.finish_resync(run_on_a_thread(job)).unwrap();
    assert!(report.is_noop());
    assert!(report.skipped > 0);
    assert!(has_peer(&kernel, 4));
}

/// The snapshot shares the plan's routes instead of copying them: the reconciler's plan,
/// read while a job holds them (a copy less the changed routes) and after the job (the
/// routes moved back, then patched), is still the planner's, routes included.
#[test]
fn the_plan_stays_whole_while_a_snapshot_shares_its_routes() {
    let (mut planner, mut r, _kernel) = node_a();
    let job = r.begin_resync().unwrap().unwrap();
    r.apply_delta(&d_joins(&mut planner)).unwrap();
    assert_eq!(
        r.current_plan(),
        Some(&planner.plan()),
        "while the job runs"
    );
    r.finish_resync(run_on_a_thread(job)).unwrap();

    let job = r.begin_resync().unwrap().unwrap();
    let found = run_on_a_thread(job);
    let delta = planner
        .apply(Event::NodeRemoved { node: "b".into() })
        .unwrap();
    assert!(!delta.routes_removed.is_empty());
    r.apply_delta(&delta).unwrap();
    r.finish_resync(found).unwrap();
    assert_eq!(r.current_plan(), Some(&planner.plan()), "after the job");
    assert!(r.reconcile(&planner.plan()).unwrap().is_noop());
}
