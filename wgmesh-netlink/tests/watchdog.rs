//! The crossing-initiation watchdog through the reconciler, against the message-level fake
//! kernel: which side re-adds a freshly added peer, with which operations, and how often.

use std::time::{Duration, SystemTime};

use wgmesh_core::{Event, IncrementalPlanner, Node, NodeWireGuard, PlanDelta, PublicKey};
use wgmesh_netlink::testing::FakeKernel;
use wgmesh_netlink::watchdog::{HandshakeWatchdog, acts};
use wgmesh_netlink::{Backend, Linux, LinuxConfig, Operation, Ownership, PeerStats, Reconciler};

mod common;
use common::{four_nodes, key, ring};

type Fake = Linux<FakeKernel>;

const WG: &str = "wireguard.cali";

fn fake() -> Fake {
    Linux::with_kernel(
        FakeKernel::new(),
        LinuxConfig::with_backend(Backend::Kernel),
    )
    .expect("the fake kernel resolves the wireguard family")
}

/// Node `a`'s reconciler, converged, with a watchdog of `timeout`.
fn node_a(timeout: Duration) -> (IncrementalPlanner, Reconciler<Fake>) {
    let c = four_nodes(r#""persistent_keepalive": null"#);
    let planner = IncrementalPlanner::new(&c, "a");
    let mut r = Reconciler::new(fake(), Ownership::from_mesh(c.mesh()), ring());
    r.reconcile(&planner.plan()).unwrap();
    r.set_watchdog(HandshakeWatchdog::new(timeout));
    (planner, r)
}

/// A key for the joining node `d` that is larger (or smaller) than `a`'s IPv4 key.
fn joiner_key(larger: bool) -> PublicKey {
    let own = key(1).public_key();
    (4..=60)
        .map(|i| key(i).public_key())
        .find(|k| acts(&own, k) == larger)
        .expect("some test key on each side of a's")
}

fn d_joins(planner: &mut IncrementalPlanner, k: PublicKey) -> PlanDelta {
    let node = Node::new("d")
        .with_addresses(["10.0.0.5".parse().unwrap()])
        .with_pod_cidrs(["10.65.1.0/26".parse().unwrap()])
        .with_wireguard(NodeWireGuard::new(Some(k), None));
    planner.apply(Event::NodeUpserted(node)).unwrap()
}

#[test]
fn the_smaller_key_re_adds_a_peer_without_handshake_once() {
    let (mut planner, mut r) = node_a(Duration::ZERO);
    let d = joiner_key(true);
    let delta = d_joins(&mut planner, d);
    r.apply_delta(&delta).unwrap();
    assert_eq!(r.watchdog().len(), 1);
    r.dataplane_mut().kernel_mut().clear_handshakes_initiated();

    let ops = r.check_handshakes().unwrap().operations;
    assert_eq!(ops.len(), 3, "{ops:#?}");
    assert!(
        matches!(&ops[0], Operation::RemovePeer { interface, public_key } if interface == WG && *public_key == d)
    );
    assert!(
        matches!(&ops[1], Operation::SetPeer(p) if p.interface == WG && p.public_key == d && p.endpoint.is_some() && p.persistent_keepalive == Some(0) && !p.allowed_ips.is_empty())
    );
    assert!(
        matches!(&ops[2], Operation::StartHandshake { interface, public_key } if interface == WG && *public_key == d)
    );
    assert_eq!(
        r.dataplane().kernel().handshakes_initiated(),
        [(WG.to_owned(), d)]
    );
    // The device matches the plan again, and the peer is re-added at most once.
    assert!(r.resync().unwrap().is_noop());
    assert!(r.watchdog().is_empty());
    assert!(r.check_handshakes().unwrap().is_noop());
}

#[test]
fn the_larger_key_never_acts() {
    let (mut planner, mut r) = node_a(Duration::ZERO);
    let delta = d_joins(&mut planner, joiner_key(false));
    r.apply_delta(&delta).unwrap();
    assert!(r.watchdog().is_empty());
    assert_eq!(r.next_handshake_check(), None);
    assert!(r.check_handshakes().unwrap().is_noop());
}

#[test]
fn a_peer_that_handshakes_in_time_is_left_alone() {
    let (mut planner, mut r) = node_a(Duration::ZERO);
    let d = joiner_key(true);
    r.apply_delta(&d_joins(&mut planner, d)).unwrap();
    r.dataplane_mut()
        .kernel_mut()
        .set_peer_stats(PeerStats::new(WG, d, Some(SystemTime::now()), 92, 148));
    assert!(r.check_handshakes().unwrap().is_noop());
    assert!(r.watchdog().is_empty());
}

#[test]
fn nothing_happens_before_the_timeout() {
    let (mut planner, mut r) = node_a(Duration::from_secs(3600));
    let d = joiner_key(true);
    r.apply_delta(&d_joins(&mut planner, d)).unwrap();
    assert!(r.next_handshake_check().unwrap() > Duration::from_secs(3000));
    assert!(r.check_handshakes().unwrap().is_noop());
    assert_eq!(r.watchdog().len(), 1, "still watched");
}

#[test]
fn a_peer_removed_by_a_later_delta_is_forgotten() {
    let (mut planner, mut r) = node_a(Duration::ZERO);
    let d = joiner_key(true);
    r.apply_delta(&d_joins(&mut planner, d)).unwrap();
    let gone = planner
        .apply(Event::NodeRemoved { node: "d".into() })
        .unwrap();
    r.apply_delta(&gone).unwrap();
    assert!(r.watchdog().is_empty());
    assert!(r.check_handshakes().unwrap().is_noop());
}
