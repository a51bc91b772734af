//! The agent runs the dataplane's crossing-initiation watchdog: a node joining after the
//! initial sync is watched by the side with the smaller key and re-added once when no
//! handshake completes; the larger-key side never acts.

mod common;

use std::time::Duration;

use common::*;
use wgmesh_core::{MeshConfig, PublicKey};
use wgmesh_netlink::watchdog::{HandshakeWatchdog, acts};

fn ops(d: &mut Driver<Fake>) -> Vec<String> {
    let k = d.agent.dataplane_mut().reconciler_mut().dataplane_mut();
    let ops = k.recorded().iter().map(ToString::to_string).collect();
    k.clear_recorded();
    ops
}

/// A key for node "c" on the wanted side of the agent's own key.
fn c_key(agent_acts: bool) -> PublicKey {
    let own = private(1).public_key();
    (3..=60)
        .map(public)
        .find(|k| acts(&own, k) == agent_acts)
        .expect("test keys on both sides")
}

fn c_joins(agent_acts: bool) -> (Driver<Fake>, PublicKey) {
    let mut d = netlink_agent(MeshConfig::default(), private(1));
    start_two_nodes(&mut d);
    d.agent
        .dataplane_mut()
        .reconciler_mut()
        .set_watchdog(HandshakeWatchdog::new(Duration::ZERO));
    ops(&mut d);
    let c = c_key(agent_acts);
    d.node(wg_node("c", "10.0.0.3", &["10.65.0.128/26"], Some(c)));
    d.run_for(Duration::from_secs(2));
    (d, c)
}

#[test]
fn the_smaller_key_side_re_adds_a_joined_peer_once() {
    let (mut d, c) = c_joins(true);
    let done = ops(&mut d);
    let b64 = c.to_base64();
    let removes = done
        .iter()
        .filter(|o| o.starts_with("remove peer") && o.contains(&b64))
        .count();
    assert_eq!(removes, 1, "{done:#?}");
    let sets = done
        .iter()
        .filter(|o| o.starts_with("set peer") && o.contains(&b64))
        .count();
    assert_eq!(sets, 2, "added by the delta, then re-added: {done:#?}");
    assert!(d.agent.dataplane().reconciler().watchdog().is_empty());
    d.run_for(Duration::from_secs(10));
    assert!(
        !ops(&mut d).iter().any(|o| o.starts_with("remove peer")),
        "at most once"
    );
}

#[test]
fn the_larger_key_side_never_acts() {
    let (mut d, c) = c_joins(false);
    let ops = ops(&mut d);
    assert!(
        !ops.iter().any(|o| o.starts_with("remove peer")),
        "{ops:#?}"
    );
    assert!(ops.iter().any(|o| o.contains(&c.to_base64())));
}
