//! The incremental planner against the full planner: random clusters, random event
//! sequences — hostile claims and the trust settings included — and after every event the
//! incremental plan equals a full recompute, the returned delta equals the difference of the
//! two plans, and the counts of refused claims and disputed prefixes equal the findings'.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;
use proptest::prelude::*;
use wgmesh_core::diagnostics::diagnose;
use wgmesh_core::{Event, Family, IncrementalPlanner, NodePlan, diff, plan_node};

#[derive(Debug, Clone)]
enum Op {
    AddPod(u8, u8, u8),
    RemovePod(u8, u8),
    AddBlock(u8, u8),
    RemoveBlock(u8, u8),
    SetKey(u8, bool, Option<u8>),
    Remove(u8),
    Upsert(u8, NodeShape),
    Mesh(bool, bool, Option<u16>, TrustShape),
    /// A node reports a hostile workload address (pool index, victim).
    HostilePod(u8, u8, u8),
    /// A node claims a hostile block (pool index, victim).
    HostileBlock(u8, u8, u8),
    /// A node adds a hostile address (pool index, victim).
    HostileAddress(u8, u8, u8),
    /// A node publishes another underlay MTU.
    SetMtu(u8, u32),
    /// A node enters a phase (0 active, 1 joining, 2 leaving), or WireGuard is turned off
    /// on it (3): the steps of a make-before-break join or leave, in any order.
    SetPhase(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8, 0u8..8, any::<u8>()).prop_map(|(n, m, k)| Op::AddPod(n, m, k)),
        3 => (0u8..8, any::<u8>()).prop_map(|(n, k)| Op::RemovePod(n, k)),
        1 => (0u8..8, 0u8..4).prop_map(|(n, b)| Op::AddBlock(n, b)),
        1 => (0u8..8, any::<u8>()).prop_map(|(n, b)| Op::RemoveBlock(n, b)),
        2 => (0u8..8, any::<bool>(), proptest::option::weighted(0.8, 0u8..8)).prop_map(|(n, v6, k)| Op::SetKey(n, v6, k)),
        1 => (0u8..8).prop_map(Op::Remove),
        2 => (0u8..8, node_shape()).prop_map(|(n, s)| Op::Upsert(n, s)),
        1 => (any::<bool>(), any::<bool>(), proptest::option::weighted(0.3, 1u16..30), trust_shape()).prop_map(|(w, h, k, t)| Op::Mesh(w, h, k, t)),
        3 => (0u8..8, 0u8..HOSTILE_PODS, 0u8..8).prop_map(|(n, p, v)| Op::HostilePod(n, p, v)),
        2 => (0u8..8, 0u8..HOSTILE_BLOCKS, 0u8..8).prop_map(|(n, p, v)| Op::HostileBlock(n, p, v)),
        2 => (0u8..8, 0u8..HOSTILE_ADDRESSES, 0u8..8).prop_map(|(n, p, v)| Op::HostileAddress(n, p, v)),
        1 => (0u8..8, prop_oneof![Just(636u32), Just(1339), Just(1340), Just(1500), Just(9000)]).prop_map(|(n, m)| Op::SetMtu(n, m)),
        3 => (0u8..8, 0u8..4).prop_map(|(n, p)| Op::SetPhase(n, p)),
    ]
}

/// Turns an abstract op into an event against the planner's current cluster.
fn event(planner: &IncrementalPlanner, op: &Op) -> Option<Event> {
    let cluster = planner.cluster().unwrap();
    let nodes = cluster.nodes();
    let pick = |i: u8| nodes.get(i as usize % nodes.len().max(1));
    Some(match op {
        Op::AddPod(n, m, k) => {
            let node = pick(*n)?;
            // Anywhere in some node's first block: own, borrowed, or clashing with another pod.
            let ip = IpAddr::V4(Ipv4Addr::new(10, m % 8, 0, k % 64 + 2));
            Event::WorkloadIpAdded {
                node: node.name.clone(),
                ip,
            }
        }
        Op::RemovePod(n, k) => {
            let node = pick(*n)?;
            let ip = *node
                .workload_ips
                .get(*k as usize % node.workload_ips.len().max(1))?;
            Event::WorkloadIpRemoved {
                node: node.name.clone(),
                ip,
            }
        }
        Op::AddBlock(n, b) => {
            let node = pick(*n)?;
            let cidr = match b {
                0 => "10.7.0.0/24",
                1 => "10.6.0.0/25",
                2 => "10.5.0.0/16",
                _ => "fd10:9::/64",
            };
            Event::BlockAdded {
                node: node.name.clone(),
                cidr: cidr.parse().unwrap(),
            }
        }
        Op::RemoveBlock(n, b) => {
            let node = pick(*n)?;
            let cidr = *node
                .pod_cidrs
                .get(*b as usize % node.pod_cidrs.len().max(1))?;
            Event::BlockRemoved {
                node: node.name.clone(),
                cidr,
            }
        }
        Op::SetKey(n, v6, k) => {
            let node = pick(*n)?;
            let family = if *v6 { Family::V6 } else { Family::V4 };
            let k = k.map(|k| if *v6 { key(k + 100) } else { key(k) });
            Event::PublicKeyChanged {
                node: node.name.clone(),
                family,
                public_key: k,
            }
        }
        Op::Remove(n) => Event::NodeRemoved {
            node: name(*n as usize % MAX_NODES),
        },
        Op::Upsert(n, shape) => {
            let i = *n as usize % MAX_NODES;
            Event::NodeUpserted(node(i, shape, MAX_NODES))
        }
        Op::Mesh(w, h, k, t) => {
            let mut mesh = planner.mesh().clone();
            mesh.route_source = if *w {
                wgmesh_core::RouteSource::WorkloadIps
            } else {
                wgmesh_core::RouteSource::CidrBlocks
            };
            mesh.host_encryption = *h;
            mesh.persistent_keepalive = *k;
            t.apply(&mut mesh);
            Event::MeshChanged(mesh)
        }
        Op::HostilePod(n, p, v) => {
            let node = pick(*n)?;
            Event::WorkloadIpAdded {
                node: node.name.clone(),
                ip: hostile_pod(*p, *v as usize % MAX_NODES),
            }
        }
        Op::HostileBlock(n, p, v) => {
            let node = pick(*n)?;
            Event::BlockAdded {
                node: node.name.clone(),
                cidr: hostile_block(*p, *v as usize % MAX_NODES),
            }
        }
        Op::HostileAddress(n, p, v) => {
            let mut node = pick(*n)?.clone();
            node.addresses
                .push(hostile_address(*p, *v as usize % MAX_NODES));
            Event::NodeUpserted(node)
        }
        Op::SetMtu(n, mtu) => {
            let node = pick(*n)?.clone();
            Event::NodeUpserted(node.with_underlay_mtu(*mtu))
        }
        Op::SetPhase(n, p) => {
            let mut node = pick(*n)?.clone();
            let wg = node.wireguard.as_mut()?;
            if *p == 3 {
                wg.enabled = false;
            } else {
                wg.enabled = true;
                wg.phase = phase(*p);
            }
            Event::NodeUpserted(node)
        }
    })
}

fn full(planner: &IncrementalPlanner) -> NodePlan {
    let cluster = planner.cluster().unwrap();
    match cluster.node(planner.local()) {
        Some(_) => plan_node(&cluster, planner.local()).unwrap(),
        None => NodePlan::empty(planner.local()),
    }
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn incremental_equals_full_recompute(
        shape in cluster_shape(),
        local in 0usize..MAX_NODES,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        check_incremental(build(&shape), local, &ops)?;
    }

    /// The same in strict mode (blackholes, the ingress filter, unknown cluster space).
    #[test]
    fn incremental_equals_full_recompute_in_strict_mode(
        shape in cluster_shape(),
        trust in trust_shape(),
        local in 0usize..MAX_NODES,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let cluster = build(&shape);
        let mut mesh = cluster.mesh().clone();
        mesh.strict_mode = true;
        mesh.control_plane_endpoints = vec!["192.168.0.3:6443".parse().unwrap()];
        trust.apply(&mut mesh);
        let Ok(cluster) = wgmesh_core::Cluster::new(mesh, cluster.nodes().to_vec()) else {
            return Ok(());
        };
        check_incremental(cluster, local, &ops)?;
    }
}

fn check_incremental(
    cluster: wgmesh_core::Cluster,
    local: usize,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    {
        let local = name(local % cluster.nodes().len());
        let mut planner = IncrementalPlanner::new(&cluster, &local);
        let mut before = planner.plan();
        prop_assert_eq!(&before, &plan_node(&cluster, &local).unwrap());
        for op in ops {
            let Some(event) = event(&planner, op) else {
                continue;
            };
            let delta = match planner.apply(event.clone()) {
                Ok(delta) => delta,
                Err(e) => {
                    // Rejected events leave the state as it was.
                    prop_assert_eq!(&planner.plan(), &before, "rejected {:?}: {}", event, e);
                    continue;
                }
            };
            let after = planner.plan();
            prop_assert_eq!(&after, &full(&planner), "after {:?}", event);
            let refused = diagnose(&planner.cluster().unwrap())
                .iter()
                .filter(|d| d.kind() == "refused")
                .count();
            prop_assert_eq!(
                planner.refused_claims(),
                refused,
                "refused claims after {:?}",
                event
            );
            let clashes = diagnose(&planner.cluster().unwrap())
                .iter()
                .filter(|d| d.kind() == "clash")
                .count();
            prop_assert_eq!(
                planner.disputed_prefixes(),
                clashes,
                "disputes after {:?}",
                event
            );
            prop_assert_eq!(&delta, &diff(&before, &after), "delta of {:?}", event);
            let mut patched = before.clone();
            patched.apply_delta(&delta);
            prop_assert_eq!(&patched, &after);
            before = after;
        }
    }
    Ok(())
}

#[test]
fn one_workload_ip_is_one_route_and_one_allowed_ip() {
    let shape = ClusterShape::uniform(4, &[1, 2], true, true);
    let cluster = build(&shape);
    let mut planner = IncrementalPlanner::new(&cluster, "node-0");
    let ip: IpAddr = "10.2.0.50".parse().unwrap();
    let delta = planner
        .apply(Event::WorkloadIpAdded {
            node: "node-2".into(),
            ip,
        })
        .unwrap();
    assert_eq!(delta.routes_added.len(), 1);
    assert!(delta.routes_removed.is_empty());
    assert_eq!(delta.peers_updated.len(), 1);
    assert_eq!(delta.peers_updated[0].node, "node-2");
    assert_eq!(
        delta.peers_updated[0].allowed_ips_added,
        vec!["10.2.0.50/32".parse().unwrap()]
    );
    assert!(delta.peers_added.is_empty() && delta.peers_removed.is_empty());
    // Moving it to another node: one route stays (unicast → unicast), the allowed IP moves.
    planner
        .apply(Event::WorkloadIpRemoved {
            node: "node-2".into(),
            ip,
        })
        .unwrap();
    let delta = planner
        .apply(Event::WorkloadIpAdded {
            node: "node-3".into(),
            ip,
        })
        .unwrap();
    assert_eq!(delta.peers_updated[0].node, "node-3");
    // The local node's own pod: a throw route and nothing on any peer.
    let delta = planner
        .apply(Event::WorkloadIpAdded {
            node: "node-0".into(),
            ip: "10.0.0.77".parse().unwrap(),
        })
        .unwrap();
    assert_eq!(delta.routes_added[0].kind, wgmesh_core::RouteType::Throw);
    assert!(delta.peers_updated.is_empty());
    // Unknown node: a typed error naming it, and nothing changes.
    let err = planner
        .apply(Event::WorkloadIpAdded {
            node: "ghost".into(),
            ip,
        })
        .unwrap_err();
    assert_eq!(err.to_string(), r#"node "ghost" is not in the cluster"#);
}
