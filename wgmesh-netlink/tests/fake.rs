//! The reconciler against the message-level fake kernel: convergence, idempotency, ownership,
//! non-disruptive updates, fault injection and the incremental path. Every operation goes
//! through lowering, encoding, the executor's pipelining and the kernel's answers, as on a
//! host; no privileges needed.

use std::collections::BTreeSet;

use ipnet::IpNet;
use proptest::prelude::*;
use wgmesh_core::{
    Cluster, Event, Family, IncrementalPlanner, Node, NodePlan, NodeWireGuard, PlanDelta,
    PublicKey, plan_node,
};
use wgmesh_netlink::testing::{FailingDataplane, FakeKernel, FakeRule, route};
use wgmesh_netlink::{
    ActualPeer, ActualRouteKind, Backend, Dataplane, Error, ForeignLink, LINK_MARKER, Linux,
    LinuxConfig, Operation, Ownership, Reconciler,
};

mod common;
use common::{four_nodes, key, ring};

fn cluster(host_encryption: bool) -> Cluster {
    cluster_with(host_encryption, Some(25))
}

fn cluster_with(host_encryption: bool, keepalive: Option<u16>) -> Cluster {
    let keepalive = keepalive.map_or("null".to_owned(), |k| k.to_string());
    four_nodes(&format!(
        r#""host_encryption": {host_encryption}, "persistent_keepalive": {keepalive}"#
    ))
}

type Fake = Linux<FakeKernel>;

/// The Linux dataplane over a fake kernel (kernel WireGuard).
fn linux(kernel: FakeKernel) -> Fake {
    Linux::with_kernel(kernel, LinuxConfig::with_backend(Backend::Kernel))
        .expect("the fake kernel resolves the wireguard family")
}

fn fake() -> Fake {
    linux(FakeKernel::new())
}

fn setup(host_encryption: bool) -> (NodePlan, Reconciler<Fake>) {
    let c = cluster(host_encryption);
    let plan = plan_node(&c, "a").unwrap();
    let r = Reconciler::new(fake(), Ownership::from_mesh(c.mesh()), ring());
    (plan, r)
}

/// wgmesh's rule (table 1) in the fake kernel's list.
fn mesh_rule(k: &mut FakeKernel) -> &mut FakeRule {
    k.rules.iter_mut().find(|r| r.table == 1).unwrap()
}

/// An oracle independent of `diff`: the fake kernel's owned state says exactly the plan.
fn assert_matches_plan(k: &FakeKernel, plan: &NodePlan, own: &Ownership) {
    for name in &own.interfaces {
        match plan.interfaces.iter().find(|i| &i.name == name) {
            None => assert!(!k.links.contains_key(name), "{name} should be gone"),
            Some(i) => {
                let l = &k.links[name];
                assert_eq!(
                    (l.mtu, l.up, l.kind.as_deref()),
                    (i.mtu, true, Some("wireguard"))
                );
                let d = &k.devices[name];
                assert_eq!(d.listen_port, i.listen_port);
                assert_eq!(d.firewall_mark, i.firewall_mark);
                assert_eq!(d.public_key(), i.public_key);
                let want: BTreeSet<PublicKey> = i.peers.iter().map(|p| p.public_key).collect();
                let got: BTreeSet<PublicKey> = d.peers.keys().copied().collect();
                assert_eq!(got, want);
                for p in &i.peers {
                    let a = &d.peers[&p.public_key];
                    assert_eq!(a.endpoint, Some(p.endpoint));
                    assert_eq!(a.persistent_keepalive, p.persistent_keepalive.unwrap_or(0));
                    let want: BTreeSet<IpNet> = p.allowed_ips.iter().copied().collect();
                    assert_eq!(a.allowed_ips, want);
                }
            }
        }
    }
    let mut got: Vec<(IpNet, ActualRouteKind, Option<u32>)> = k
        .routes
        .values()
        .filter(|r| r.table == own.table)
        // Which device a throw route has is moot (Linux hangs IPv6 ones on `lo`).
        .map(|r| {
            (
                r.destination,
                r.kind,
                r.oif.filter(|_| r.kind == ActualRouteKind::Unicast),
            )
        })
        .collect();
    got.sort();
    let mut want: Vec<(IpNet, ActualRouteKind, Option<u32>)> = plan
        .routes
        .iter()
        .map(|r| {
            (
                r.destination,
                r.kind.into(),
                r.device.as_deref().map(|d| k.links[d].index),
            )
        })
        .collect();
    want.sort();
    assert_eq!(got, want);
    let rules: Vec<&FakeRule> = k.rules.iter().filter(|r| r.table == own.table).collect();
    assert_eq!(rules.len(), plan.rules.len());
    for (a, r) in rules.iter().zip(&plan.rules) {
        assert_eq!(
            (
                a.family,
                a.priority,
                a.firewall_mark,
                a.firewall_mask,
                a.invert,
                a.action,
                &a.source
            ),
            (
                r.family,
                r.priority,
                r.firewall_mark,
                r.firewall_mask,
                true,
                1,
                &None
            )
        );
    }
    for s in &plan.sysctls {
        assert_eq!(k.sysctls.get(&s.key), Some(&s.value));
    }
    // The fake keeps a set's elements in Linux's (descending) order: compare them sorted.
    let got: Vec<wgmesh_netlink::marking::NftTable> = k
        .nft
        .iter()
        .filter(|((_, n), _)| *n == own.nft_table)
        .map(|(_, t)| {
            let mut t = t.clone();
            t.sets.iter_mut().for_each(|s| s.elements.sort());
            t
        })
        .collect();
    let want = plan
        .marking
        .as_ref()
        .map(wgmesh_netlink::marking::compile)
        .unwrap_or_default();
    assert_eq!(got, want);
}

/// Adds a link carrying wgmesh's marker, as wgmesh makes them.
fn marked(k: &mut FakeKernel, name: &str, kind: Option<&str>) {
    k.add_link(name, kind, 1500, false);
    k.links.get_mut(name).unwrap().alias = Some(LINK_MARKER.into());
}

fn converge(r: &mut Reconciler<Fake>, plan: &NodePlan) {
    r.reconcile(plan).unwrap();
    let own = r.ownership().clone();
    assert_matches_plan(r.dataplane().kernel(), plan, &own);
    let again = r.reconcile(plan).unwrap();
    assert!(again.is_noop(), "second run did {:?}", again.operations);
}

#[test]
fn fresh_host_converges_and_second_run_is_a_noop() {
    for he in [false, true] {
        let (plan, mut r) = setup(he);
        assert_eq!(plan.interfaces.len(), 2);
        converge(&mut r, &plan);
    }
}

#[test]
fn empty_plan_removes_everything_owned_and_nothing_else() {
    let (plan, mut r) = setup(true);
    let k = r.dataplane_mut().kernel_mut();
    let foreign = k.add_link("wg-foreign", Some("wireguard"), 1420, true);
    k.add_route(route(
        Family::V4,
        254,
        "192.168.0.0/16".parse().unwrap(),
        ActualRouteKind::Unicast,
        Some(foreign),
    ));
    k.add_route(route(
        Family::V4,
        7,
        "10.65.0.0/26".parse().unwrap(),
        ActualRouteKind::Throw,
        None,
    ));
    // Another program's rule that shares neither wgmesh's priority nor its mark bits (one
    // that does is refused: a_neighbours_mark_or_priority_is_refused_naming_it).
    let mut other_rule = FakeRule::lookup(Family::V4, 98, 7);
    other_rule.firewall_mark = 0x1;
    other_rule.firewall_mask = 0x1;
    other_rule.invert = true;
    k.rules.insert(1, other_rule.clone());
    k.nft.insert(
        (1, "other".into()),
        wgmesh_netlink::marking::NftTable {
            family: 1,
            name: "other".into(),
            flags: 0,
            chains: vec![],
            sets: Vec::new(),
        },
    );
    let before = k.clone();
    converge(&mut r, &plan);
    let off = NodePlan::empty("a");
    let report = r.reconcile(&off).unwrap();
    // Rules go first, the marking last.
    assert!(matches!(report.operations[0], Operation::DeleteRule { .. }));
    assert!(matches!(
        report.operations.last(),
        Some(Operation::DeleteMarking { .. })
    ));
    let k = r.dataplane().kernel();
    assert_eq!(k.links, before.links);
    assert_eq!(k.routes, before.routes);
    assert_eq!(k.rules, before.rules);
    assert!(k.rules.contains(&other_rule));
    assert!(k.nft.contains_key(&(1, "other".into())) && k.nft.keys().all(|(_, n)| n != "wgmesh"));
    assert!(r.reconcile(&off).unwrap().is_noop());
}

#[test]
fn converges_from_each_named_drift() {
    let (plan, mut r) = setup(false);
    converge(&mut r, &plan);
    let name = "wireguard.cali".to_owned();
    type DriftFn = Box<dyn Fn(&mut FakeKernel)>;
    let drifts: Vec<(&str, DriftFn)> = vec![
        (
            "wrong port",
            Box::new(|k| k.devices.get_mut("wireguard.cali").unwrap().listen_port = 1),
        ),
        (
            "wrong fwmark",
            Box::new(|k| k.devices.get_mut("wireguard.cali").unwrap().firewall_mark = 7),
        ),
        (
            "wrong mtu",
            Box::new(|k| k.links.get_mut("wireguard.cali").unwrap().mtu = 1280),
        ),
        (
            "link down",
            Box::new(|k| k.links.get_mut("wireguard.cali").unwrap().up = false),
        ),
        (
            "wrong key",
            Box::new(|k| k.devices.get_mut("wireguard.cali").unwrap().private_key = Some(key(99))),
        ),
        (
            "foreign peer",
            Box::new(|k| {
                k.devices
                    .get_mut("wireguard.cali")
                    .unwrap()
                    .peers
                    .insert(key(98).public_key(), ActualPeer::default());
            }),
        ),
        (
            "extra allowed ip",
            Box::new(|k| {
                let d = k.devices.get_mut("wireguard.cali").unwrap();
                d.peers
                    .values_mut()
                    .next()
                    .unwrap()
                    .allowed_ips
                    .insert("10.99.0.0/24".parse().unwrap());
            }),
        ),
        (
            "missing allowed ip",
            Box::new(|k| {
                let d = k.devices.get_mut("wireguard.cali").unwrap();
                let p = d.peers.values_mut().next().unwrap();
                let first = *p.allowed_ips.iter().next().unwrap();
                p.allowed_ips.remove(&first);
            }),
        ),
        (
            "stale route",
            Box::new(|k| {
                k.add_route(route(
                    Family::V4,
                    1,
                    "10.98.0.0/24".parse().unwrap(),
                    ActualRouteKind::Throw,
                    None,
                ))
            }),
        ),
        (
            "blackhole route",
            Box::new(|k| {
                let r = k.routes.values_mut().find(|r| r.table == 1).unwrap();
                r.kind = ActualRouteKind::Blackhole;
                r.oif = None;
            }),
        ),
        (
            "missing route",
            Box::new(|k| {
                k.routes
                    .retain(|_, r| r.destination.to_string() != "10.65.0.64/26");
            }),
        ),
        (
            "missing rule",
            Box::new(|k| k.rules.retain(|r| r.table != 1)),
        ),
        (
            "changed rule",
            Box::new(|k| mesh_rule(k).firewall_mask = 0xffffffff),
        ),
        ("rule without action", Box::new(|k| mesh_rule(k).action = 0)),
        (
            "duplicated rule",
            Box::new(|k| {
                let i = k.rules.iter().position(|r| r.table == 1).unwrap();
                let r = k.rules[i].clone();
                k.rules.insert(i + 1, r);
            }),
        ),
        ("missing nft table", Box::new(|k| k.nft.clear())),
        (
            "altered nft table",
            Box::new(|k| {
                k.nft.get_mut(&(1, "wgmesh".into())).unwrap().chains.pop();
            }),
        ),
        (
            "dormant nft table",
            Box::new(|k| k.nft.get_mut(&(3, "wgmesh".into())).unwrap().flags = 1),
        ),
        (
            "sysctl off",
            Box::new(|k| {
                k.sysctls
                    .insert("net.ipv4.conf.all.src_valid_mark".into(), "0".into());
            }),
        ),
        (
            "link deleted",
            Box::new(|k| {
                k.remove_link("wireguard.cali").unwrap();
            }),
        ),
        (
            "wrong link type",
            Box::new(|k| {
                // wgmesh's own link of the other backend (a TUN device it made with
                // wireguard-go): replaced.
                k.remove_link("wireguard.cali").unwrap();
                marked(k, "wireguard.cali", Some("tun"));
            }),
        ),
    ];
    for (what, drift) in drifts {
        drift(r.dataplane_mut().kernel_mut());
        let report = r.reconcile(&plan).unwrap();
        assert!(!report.is_noop(), "{what}: drift not seen");
        let own = r.ownership().clone();
        assert_matches_plan(r.dataplane().kernel(), &plan, &own);
        assert!(
            r.reconcile(&plan).unwrap().is_noop(),
            "{what}: not idempotent"
        );
    }
    let _ = name;
}

#[test]
fn allowed_ip_changes_never_clear_or_remove_a_kept_peer() {
    let (plan, mut r) = setup(false);
    converge(&mut r, &plan);
    // b's workload IP moves to c, and c gains a block.
    let c = cluster(false);
    let mut nodes = c.nodes().to_vec();
    nodes[1].workload_ips.clear();
    nodes[2].workload_ips.push("10.65.0.5".parse().unwrap());
    nodes[2].pod_cidrs.push("10.66.0.0/26".parse().unwrap());
    let c2 = Cluster::new(c.mesh().clone(), nodes).unwrap();
    let plan2 = plan_node(&c2, "a").unwrap();
    let report = r.reconcile(&plan2).unwrap();
    for op in &report.operations {
        assert!(
            !matches!(
                op,
                Operation::RemovePeer { .. }
                    | Operation::CreateLink { .. }
                    | Operation::DeleteLink { .. }
            ),
            "disruptive: {op}"
        );
    }
    // The moved /32 is only added to its new peer (WireGuard moves it), never removed first.
    assert!(!report.operations.iter().any(|op| matches!(op,
        Operation::RemoveAllowedIps(r) if r.allowed_ips.contains(&"10.65.0.5/32".parse().unwrap()))));
    let own = r.ownership().clone();
    assert_matches_plan(r.dataplane().kernel(), &plan2, &own);
}

/// The fake kernel's allowed-IP index (for benchmarks) moves an allowed IP between peers as
/// the search over every peer does: the same messages leave the same devices.
#[test]
fn the_allowed_ip_index_moves_allowed_ips_as_the_search_does() {
    let c = cluster(false);
    let plan = plan_node(&c, "a").unwrap();
    let mut nodes = c.nodes().to_vec();
    nodes[1].workload_ips.clear();
    nodes[2].workload_ips.push("10.65.0.5".parse().unwrap());
    let plan2 = plan_node(&Cluster::new(c.mesh().clone(), nodes).unwrap(), "a").unwrap();
    let run = |index: bool| {
        let mut k = FakeKernel::new();
        k.index_allowed_ips = index;
        let mut r = Reconciler::new(linux(k), Ownership::from_mesh(c.mesh()), ring());
        converge(&mut r, &plan);
        // Back and forth: the address moves to c, then back to b.
        r.reconcile(&plan2).unwrap();
        let moved = r.dataplane().kernel().devices.clone();
        r.reconcile(&plan).unwrap();
        let own = r.ownership().clone();
        assert_matches_plan(r.dataplane().kernel(), &plan, &own);
        (moved, r.dataplane().kernel().devices.clone())
    };
    let (searched, indexed) = (run(false), run(true));
    assert_eq!(indexed, searched);
    let moved_to_c = indexed.0.values().any(|d| {
        d.peers
            .values()
            .filter(|p| p.allowed_ips.contains(&"10.65.0.5/32".parse().unwrap()))
            .count()
            == 1
    });
    assert!(moved_to_c, "the address is held by exactly one peer");
}

#[test]
fn key_change_is_add_new_then_remove_old() {
    let (plan, mut r) = setup(false);
    converge(&mut r, &plan);
    let c = cluster(false);
    let mut nodes = c.nodes().to_vec();
    nodes[1]
        .wireguard
        .as_mut()
        .unwrap()
        .set_key(Family::V4, Some(key(42).public_key()));
    let plan2 = plan_node(&Cluster::new(c.mesh().clone(), nodes).unwrap(), "a").unwrap();
    let ops = r.reconcile(&plan2).unwrap().operations;
    let rm = ops.iter().position(|o| matches!(o, Operation::RemovePeer { public_key, .. } if *public_key == key(2).public_key()));
    let add = ops
        .iter()
        .position(|o| matches!(o, Operation::SetPeer(p) if p.public_key == key(42).public_key()));
    // The new entry takes the allowed IPs first (WireGuard moves them), then the old goes:
    // at no moment does b's block have no peer.
    assert!(add.unwrap() < rm.unwrap(), "{ops:?}");
    let own = r.ownership().clone();
    assert_matches_plan(r.dataplane().kernel(), &plan2, &own);
}

fn planned_rule_present(k: &FakeKernel, plan: &NodePlan) -> bool {
    let r = &plan.rules[0];
    k.rules.iter().any(|a| {
        (
            a.family,
            a.priority,
            a.table,
            a.firewall_mark,
            a.firewall_mask,
            a.invert,
            a.action,
        ) == (
            r.family,
            r.priority,
            r.table,
            r.firewall_mark,
            r.firewall_mask,
            true,
            1,
        )
    })
}

/// Adds a rule the way `ip rule add` does (after the rules of the same priority).
fn add_rule(r: &mut Reconciler<Fake>, rule: FakeRule) {
    let k = r.dataplane_mut().kernel_mut();
    let pos = k
        .rules
        .iter()
        .rposition(|x| x.family == rule.family && x.priority <= rule.priority)
        .map_or(0, |p| p + 1);
    k.rules.insert(pos, rule);
}

#[test]
fn a_hand_made_rule_with_selectors_is_deleted_and_not_wgmeshs() {
    let (plan, mut r) = setup(false);
    converge(&mut r, &plan);
    // `ip rule add from 10.0.0.0/8 table 1 priority 99`, listed after wgmesh's rule.
    let mut stray = FakeRule::lookup(Family::V4, 99, 1);
    stray.source = Some("10.0.0.0/8".parse().unwrap());
    add_rule(&mut r, stray.clone());

    // What the kernel does with a request that names only priority and table: it takes the
    // first rule it matches, wgmesh's own (the request used to be built this way).
    let found = r
        .dataplane_mut()
        .read(&Ownership::from_mesh(&Default::default()), &[])
        .unwrap();
    let read = found
        .rules
        .iter()
        .find(|a| a.other_selectors)
        .unwrap()
        .clone();
    assert!(!read.raw.is_empty() && !read.invert && read.firewall_mark.is_none());
    let mut k = linux(r.dataplane().kernel().clone());
    let mut bare = read.clone();
    bare.raw = Default::default();
    k.execute(&[Operation::DeleteRule { rule: bare }], &ring())
        .unwrap();
    assert!(!planned_rule_present(k.kernel(), &plan));
    assert!(k.kernel().rules.contains(&stray));

    // Echoing the dump takes the stray rule: one reconcile converges, the second does nothing.
    let ops = r.reconcile(&plan).unwrap().operations;
    assert_eq!(ops, [Operation::DeleteRule { rule: read }]);
    let own = r.ownership().clone();
    assert_matches_plan(r.dataplane().kernel(), &plan, &own);
    assert!(!r.dataplane().kernel().rules.contains(&stray));
    assert!(r.reconcile(&plan).unwrap().is_noop());
}

#[test]
fn a_stray_rule_whose_delete_would_take_wgmeshs_is_removed_in_one_reconcile() {
    let (plan, mut r) = setup(false);
    converge(&mut r, &plan);
    let own = r.ownership().clone();
    let m = plan.rules[0].firewall_mark;
    // Without selectors, their delete requests match wgmesh's rule too: `ip rule add table 1
    // pref 99` (no mark: a wildcard) and the same rule as wgmesh's without `not` (never
    // compared).
    let mut marked = FakeRule::lookup(Family::V4, 99, 1);
    marked.firewall_mark = m;
    marked.firewall_mask = m;
    for stray in [FakeRule::lookup(Family::V4, 99, 1), marked] {
        add_rule(&mut r, stray.clone());
        let ops = r.plan_operations(&plan).unwrap();
        // A copy of wgmesh's rule is added (after the stray one), then the original and the
        // stray one are deleted; at no step is the table without wgmesh's rule.
        assert!(
            matches!(ops[0], Operation::DuplicateRule { .. }),
            "{ops:#?}"
        );
        assert_eq!(ops.len(), 3, "{ops:#?}");
        let mut k = linux(r.dataplane().kernel().clone());
        for op in &ops {
            k.execute(std::slice::from_ref(op), &ring()).unwrap();
            assert!(
                planned_rule_present(k.kernel(), &plan),
                "after {op}: {:#?}",
                k.kernel().rules
            );
        }
        r.reconcile(&plan).unwrap();
        assert_matches_plan(r.dataplane().kernel(), &plan, &own);
        assert!(!r.dataplane().kernel().rules.contains(&stray));
        assert!(r.reconcile(&plan).unwrap().is_noop());
    }
}

#[test]
fn fault_at_every_k_is_repaired_by_the_next_reconcile() {
    let (plan, _) = setup(true);
    let c = cluster(true);
    let own = Ownership::from_mesh(c.mesh());
    let total = {
        let mut k = fake();
        let ops = wgmesh_netlink::diff(
            &plan,
            &k.read(&own, &[]).unwrap(),
            &own,
            &Default::default(),
        );
        ops.len()
    };
    assert!(total > 10);
    for k in 0..total {
        let mut r = Reconciler::new(FailingDataplane::new(fake(), k), own.clone(), ring());
        let err = r.reconcile(&plan).unwrap_err();
        assert!(
            matches!(err, wgmesh_netlink::Error::Operation { index, .. } if index == k),
            "{err}"
        );
        assert!(r.needs_resync());
        r.reconcile(&plan).unwrap();
        assert_matches_plan(r.dataplane().inner().kernel(), &plan, &own);
        assert!(r.reconcile(&plan).unwrap().is_noop());
        // The same, tearing down.
        let mut r2 = Reconciler::new(
            FailingDataplane::new(linux(r.into_dataplane().into_inner().kernel().clone()), k),
            own.clone(),
            ring(),
        );
        let off = NodePlan::empty("a");
        let _ = r2.reconcile(&off);
        r2.reconcile(&off).unwrap();
        assert_matches_plan(r2.dataplane().inner().kernel(), &off, &own);
    }
}

#[test]
fn one_workload_ip_is_one_peer_update_and_one_route() {
    let c = cluster(false);
    let mut planner = IncrementalPlanner::new(&c, "a");
    let plan = planner.plan();
    let mut r = Reconciler::new(fake(), Ownership::from_mesh(c.mesh()), ring());
    r.reconcile(&plan).unwrap();
    let d = planner
        .apply(Event::WorkloadIpAdded {
            node: "c".into(),
            ip: "10.77.0.9".parse().unwrap(),
        })
        .unwrap();
    let report = r.apply_delta(&d).unwrap();
    assert_eq!(report.operations.len(), 2, "{:?}", report.operations);
    assert_eq!(report.messages, 2);
    assert!(
        matches!(&report.operations[0], Operation::SetPeer(p) if p.allowed_ips.len() == 1 && p.endpoint.is_none() && p.persistent_keepalive.is_none())
    );
    assert!(matches!(&report.operations[1], Operation::AddRoute { .. }));
    // Folding back: a resync finds nothing to do.
    assert!(r.resync().unwrap().is_noop());
}

/// The reconciler folds deltas' routes into its current plan many at a time: after more
/// changes than it keeps pending (several folds), and after a few (none yet), its plan is the
/// planner's, routes included, and a resync finds nothing to do.
#[test]
fn many_deltas_leave_the_current_plan_equal_to_the_planners() {
    let c = cluster(false);
    let mut planner = IncrementalPlanner::new(&c, "a");
    let mut r = Reconciler::new(fake(), Ownership::from_mesh(c.mesh()), ring());
    r.reconcile(&planner.plan()).unwrap();
    for round in 0..700u32 {
        // Workload addresses come to c and d... and go, and move between b and c.
        let ip: std::net::IpAddr = format!("10.77.{}.{}", round / 200, round % 200)
            .parse()
            .unwrap();
        let node = if round % 3 == 0 { "b" } else { "c" };
        let d = planner
            .apply(Event::WorkloadIpAdded {
                node: node.into(),
                ip,
            })
            .unwrap();
        r.apply_delta(&d).unwrap();
        if round % 5 == 0 {
            let d = planner
                .apply(Event::WorkloadIpRemoved {
                    node: node.into(),
                    ip,
                })
                .unwrap();
            r.apply_delta(&d).unwrap();
        }
        if round == 400 || round == 699 {
            assert_eq!(r.current_plan(), Some(&planner.plan()), "round {round}");
        }
    }
    let own = r.ownership().clone();
    assert_matches_plan(r.dataplane().kernel(), &planner.plan(), &own);
    assert!(r.resync().unwrap().is_noop());
}

/// Node `d` (IPv4 only, block 10.65.1.0/26) joins the mesh: its key and the planner's delta.
fn node_d_joins(planner: &mut IncrementalPlanner) -> (PublicKey, PlanDelta) {
    let d = key(4).public_key();
    let node = Node::new("d")
        .with_addresses(["10.0.0.5".parse().unwrap()])
        .with_pod_cidrs(["10.65.1.0/26".parse().unwrap()])
        .with_wireguard(NodeWireGuard::new(Some(d), None));
    (d, planner.apply(Event::NodeUpserted(node)).unwrap())
}

/// Operations of a kind, as (interface, key) pairs, in order.
fn kicks(ops: &[Operation]) -> Vec<(String, PublicKey)> {
    ops.iter()
        .filter_map(|o| match o {
            Operation::StartHandshake {
                interface,
                public_key,
            } => Some((interface.clone(), *public_key)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_peer_added_to_a_running_device_starts_its_handshake_at_once() {
    let c = cluster_with(false, None);
    let mut planner = IncrementalPlanner::new(&c, "a");
    let own = Ownership::from_mesh(c.mesh());
    let mut r = Reconciler::new(fake(), own.clone(), ring());
    let report = r.reconcile(&planner.plan()).unwrap();
    // A whole device's initial configuration starts no handshake.
    assert!(kicks(&report.operations).is_empty());
    assert!(r.dataplane().kernel().handshakes_initiated().is_empty());

    // A node joins: its peer is added to the running device, then kicked.
    let (d, delta) = node_d_joins(&mut planner);
    let ops = r.apply_delta(&delta).unwrap().operations;
    let wg = "wireguard.cali".to_owned();
    let set = ops
        .iter()
        .position(|o| matches!(o, Operation::SetPeer(p) if p.public_key == d && p.persistent_keepalive == Some(0)))
        .expect("d is added");
    assert!(
        matches!(&ops[set + 1], Operation::StartHandshake { interface, public_key } if *interface == wg && *public_key == d),
        "{ops:#?}"
    );
    assert_eq!(kicks(&ops), [(wg.clone(), d)]);
    assert_eq!(
        r.dataplane().kernel().handshakes_initiated(),
        [(wg.clone(), d)]
    );
    // Its keepalive is the plan's (off), and a full reconcile finds nothing to do.
    assert_matches_plan(r.dataplane().kernel(), &planner.plan(), &own);
    assert!(r.resync().unwrap().is_noop());
    // The operation is serializable and secret-free like the others.
    let json = serde_json::to_value(&ops[set + 1]).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"op": "start_handshake", "interface": wg, "public_key": d.to_string()})
    );
    assert_eq!(
        serde_json::from_value::<Operation>(json).unwrap(),
        ops[set + 1]
    );
    assert!(
        ops[set + 1]
            .to_string()
            .starts_with(&format!("start handshake with peer {d} on {wg}"))
    );

    // b's IPv4 key changes: add-new (kicked), then remove-old.
    r.dataplane_mut().kernel_mut().clear_handshakes_initiated();
    let b2 = key(42).public_key();
    let delta = planner
        .apply(Event::PublicKeyChanged {
            node: "b".into(),
            family: Family::V4,
            public_key: Some(b2),
        })
        .unwrap();
    let ops = r.apply_delta(&delta).unwrap().operations;
    let rm = ops
        .iter()
        .position(|o| matches!(o, Operation::RemovePeer { public_key, .. } if *public_key == key(2).public_key()));
    let kick = ops.iter().position(
        |o| matches!(o, Operation::StartHandshake { public_key, .. } if *public_key == b2),
    );
    assert!(kick.unwrap() < rm.unwrap(), "{ops:#?}");
    assert_eq!(kicks(&ops), [(wg.clone(), b2)]);
    assert_eq!(
        r.dataplane().kernel().handshakes_initiated(),
        [(wg.clone(), b2)]
    );
    assert_matches_plan(r.dataplane().kernel(), &planner.plan(), &own);
    assert!(r.resync().unwrap().is_noop());
}

#[test]
fn peers_of_a_device_the_delta_creates_are_not_kicked() {
    // a has no IPv6 address yet: no IPv6 device. When it gets one, the delta creates the
    // device with its peers, and none is kicked.
    let c = cluster_with(false, None);
    let full_a = c.nodes()[0].clone();
    let mut nodes = c.nodes().to_vec();
    nodes[0].addresses.retain(|a| a.is_ipv4());
    let c = Cluster::new(c.mesh().clone(), nodes).unwrap();
    let mut planner = IncrementalPlanner::new(&c, "a");
    let own = Ownership::from_mesh(c.mesh());
    let mut r = Reconciler::new(fake(), own.clone(), ring());
    r.reconcile(&planner.plan()).unwrap();
    assert!(!r.dataplane().kernel().links.contains_key("wg-v6.cali"));
    let delta = planner.apply(Event::NodeUpserted(full_a)).unwrap();
    let ops = r.apply_delta(&delta).unwrap().operations;
    assert!(ops.iter().any(
        |o| matches!(o, Operation::CreateLink { interface, .. } if interface == "wg-v6.cali")
    ));
    assert!(
        ops.iter()
            .any(|o| matches!(o, Operation::SetPeer(p) if p.interface == "wg-v6.cali"))
    );
    assert!(kicks(&ops).is_empty(), "{ops:#?}");
    assert!(r.dataplane().kernel().handshakes_initiated().is_empty());
    assert_matches_plan(r.dataplane().kernel(), &planner.plan(), &own);
    assert!(r.resync().unwrap().is_noop());
}

#[test]
fn with_a_planned_keepalive_setting_it_starts_the_handshake() {
    let c = cluster_with(false, Some(25));
    let mut planner = IncrementalPlanner::new(&c, "a");
    let own = Ownership::from_mesh(c.mesh());
    let mut r = Reconciler::new(fake(), own.clone(), ring());
    r.reconcile(&planner.plan()).unwrap();
    r.dataplane_mut().kernel_mut().clear_handshakes_initiated();
    let (d, delta) = node_d_joins(&mut planner);
    let ops = r.apply_delta(&delta).unwrap().operations;
    assert!(kicks(&ops).is_empty(), "{ops:#?}");
    assert_eq!(
        r.dataplane().kernel().handshakes_initiated(),
        [("wireguard.cali".to_owned(), d)]
    );
    assert_matches_plan(r.dataplane().kernel(), &planner.plan(), &own);
}

#[test]
fn apply_delta_needs_a_base_and_failures_ask_for_resync() {
    let c = cluster(false);
    let mut planner = IncrementalPlanner::new(&c, "a");
    let mut r = Reconciler::new(
        FailingDataplane::new(fake(), 1000),
        Ownership::from_mesh(c.mesh()),
        ring(),
    );
    let d = planner
        .apply(Event::WorkloadIpAdded {
            node: "c".into(),
            ip: "10.77.0.9".parse().unwrap(),
        })
        .unwrap();
    assert!(matches!(
        r.apply_delta(&d),
        Err(wgmesh_netlink::Error::NoBasePlan)
    ));
    r.reconcile(&planner.plan()).unwrap();
    let mut r = Reconciler::new(
        FailingDataplane::new(r.into_dataplane().into_inner(), 0),
        Ownership::from_mesh(c.mesh()),
        ring(),
    );
    r.reconcile(&planner.plan()).unwrap(); // no ops: nothing to fail
    let d = planner
        .apply(Event::WorkloadIpAdded {
            node: "c".into(),
            ip: "10.77.0.10".parse().unwrap(),
        })
        .unwrap();
    assert!(r.apply_delta(&d).is_err());
    assert!(r.needs_resync());
    assert!(!r.resync().unwrap().is_noop());
    assert!(r.resync().unwrap().is_noop());
}

#[derive(Debug, Clone)]
enum Drift {
    Port(u16),
    Mark(u32),
    Mtu(u32),
    Down,
    Key(u8),
    ForeignPeer(u8),
    ExtraIp(u8),
    MissingIp,
    StaleRoute(u8),
    MissingRoute(usize),
    RuleGone,
    RuleDup,
    RuleMask(u32),
    NftGone,
    NftDormant,
    LinkGone,
    WrongType,
    Sysctl,
}

fn drift_strategy() -> impl Strategy<Value = Drift> {
    prop_oneof![
        any::<u16>().prop_map(Drift::Port),
        any::<u32>().prop_map(Drift::Mark),
        (1280u32..9000).prop_map(Drift::Mtu),
        Just(Drift::Down),
        (50u8..60).prop_map(Drift::Key),
        (60u8..70).prop_map(Drift::ForeignPeer),
        any::<u8>().prop_map(Drift::ExtraIp),
        Just(Drift::MissingIp),
        any::<u8>().prop_map(Drift::StaleRoute),
        (0usize..20).prop_map(Drift::MissingRoute),
        Just(Drift::RuleGone),
        Just(Drift::RuleDup),
        any::<u32>().prop_map(Drift::RuleMask),
        Just(Drift::NftGone),
        Just(Drift::NftDormant),
        Just(Drift::LinkGone),
        Just(Drift::WrongType),
        Just(Drift::Sysctl),
    ]
}

fn apply_drift(k: &mut FakeKernel, d: &Drift) {
    let n = "wireguard.cali";
    let Some(dev) = k.devices.get_mut(n) else {
        return;
    };
    match d {
        Drift::Port(p) => dev.listen_port = *p,
        Drift::Mark(m) => dev.firewall_mark = *m,
        Drift::Key(i) => dev.private_key = Some(key(*i)),
        Drift::ForeignPeer(i) => {
            dev.peers
                .insert(key(*i).public_key(), ActualPeer::default());
        }
        Drift::ExtraIp(i) => {
            if let Some(p) = dev.peers.values_mut().next() {
                p.allowed_ips
                    .insert(format!("10.200.{i}.0/24").parse().unwrap());
            }
        }
        Drift::MissingIp => {
            if let Some(p) = dev.peers.values_mut().last() {
                let f = p.allowed_ips.iter().next().copied();
                if let Some(f) = f {
                    p.allowed_ips.remove(&f);
                }
            }
        }
        Drift::Mtu(m) => k.links.get_mut(n).unwrap().mtu = *m,
        Drift::Down => k.links.get_mut(n).unwrap().up = false,
        Drift::StaleRoute(i) => k.add_route(route(
            Family::V4,
            1,
            format!("10.201.{i}.0/24").parse().unwrap(),
            ActualRouteKind::Throw,
            None,
        )),
        Drift::MissingRoute(i) => {
            if let Some(key) = k.routes.keys().nth(*i).copied() {
                k.routes.remove(&key);
            }
        }
        Drift::RuleGone => k.rules.retain(|r| r.table != 1),
        Drift::RuleDup => {
            if let Some(i) = k.rules.iter().position(|r| r.table == 1) {
                let r = k.rules[i].clone();
                k.rules.insert(i + 1, r);
            }
        }
        Drift::RuleMask(m) => {
            if let Some(r) = k.rules.iter_mut().find(|r| r.table == 1) {
                r.firewall_mask = *m;
            }
        }
        Drift::NftGone => k.nft.clear(),
        Drift::NftDormant => {
            if let Some(t) = k.nft.get_mut(&(1, "wgmesh".into())) {
                t.flags = 1;
            }
        }
        Drift::LinkGone | Drift::WrongType => {
            k.remove_link(n).unwrap();
            if matches!(d, Drift::WrongType) {
                marked(k, n, Some("tun"));
            }
        }
        Drift::Sysctl => {
            k.sysctls
                .insert("net.ipv4.conf.all.src_valid_mark".into(), "0".into());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn converges_from_random_drift(drifts in proptest::collection::vec(drift_strategy(), 1..6), he in any::<bool>()) {
        let (plan, mut r) = setup(he);
        r.reconcile(&plan).unwrap();
        for d in &drifts {
            apply_drift(r.dataplane_mut().kernel_mut(), d);
        }
        converge(&mut r, &plan);
    }

    #[test]
    fn deltas_reach_the_same_state_as_full_reconciles(
        events in proptest::collection::vec((0usize..3, 0u8..40, any::<bool>()), 1..25)
    ) {
        let c = cluster(false);
        let mut planner = IncrementalPlanner::new(&c, "a");
        let mut r = Reconciler::new(fake(), Ownership::from_mesh(c.mesh()), ring());
        r.reconcile(&planner.plan()).unwrap();
        let names = ["a", "b", "c"];
        for (node, ip, add) in events {
            let ip: std::net::IpAddr = format!("10.80.0.{ip}").parse().unwrap();
            let ev = if add {
                Event::WorkloadIpAdded { node: names[node].into(), ip }
            } else {
                Event::WorkloadIpRemoved { node: names[node].into(), ip }
            };
            let d = planner.apply(ev).unwrap();
            r.apply_delta(&d).unwrap();
            let own = r.ownership().clone();
            assert_matches_plan(r.dataplane().kernel(), &planner.plan(), &own);
            prop_assert!(r.resync().unwrap().is_noop());
        }
    }
}

/// Issue 11, section 3: with `interface_name: eth0` (or the name of a veth, or of somebody's
/// own WireGuard link), a dry run planned `delete link eth0`. A link is wgmesh's only if it is
/// a WireGuard or TUN device carrying wgmesh's marker and no address: anything else is
/// refused with a typed error naming it and why, and nothing on the host changes — neither
/// for the plan nor for an empty plan (which removes only what wgmesh owns).
#[test]
fn links_wgmesh_did_not_create_are_refused_never_deleted() {
    type Setup = fn(&mut FakeKernel, &str);
    type Reason = fn(&ForeignLink) -> bool;
    let cases: [(&str, Setup, Reason); 5] = [
        (
            "eth0",
            |k, n| {
                k.add_link(n, None, 1500, true);
                k.links.get_mut(n).unwrap().addresses = vec!["10.0.0.1/24".parse().unwrap()];
            },
            |r| matches!(r, ForeignLink::NotWireGuard { kind: None }),
        ),
        (
            "veth0",
            |k, n| {
                k.add_link(n, Some("veth"), 1500, true);
            },
            |r| matches!(r, ForeignLink::NotWireGuard { kind: Some(k) } if k == "veth"),
        ),
        (
            "wg0",
            |k, n| {
                // Somebody's configured WireGuard link.
                k.add_link(n, Some("wireguard"), 1420, true);
                k.devices.get_mut(n).unwrap().private_key = Some(key(50));
            },
            |r| matches!(r, ForeignLink::Unmarked { alias: None }),
        ),
        (
            "wg1",
            |k, n| {
                k.add_link(n, Some("wireguard"), 1420, true);
                k.links.get_mut(n).unwrap().alias = Some("vpn".into());
                k.devices.get_mut(n).unwrap().firewall_mark = 7;
            },
            |r| matches!(r, ForeignLink::Unmarked { alias: Some(a) } if a == "vpn"),
        ),
        (
            "wg2",
            |k, n| {
                marked(k, n, Some("wireguard"));
                k.links.get_mut(n).unwrap().addresses = vec!["192.0.2.1/24".parse().unwrap()];
            },
            |r| matches!(r, ForeignLink::HasAddresses { addresses } if addresses.len() == 1),
        ),
    ];
    for (name, setup, reason) in cases {
        let cluster = four_nodes(&format!(r#""interface_name": "{name}""#));
        let plan = plan_node(&cluster, "a").unwrap();
        let mut k = FakeKernel::new();
        setup(&mut k, name);
        let before = k.clone();
        let mut r = Reconciler::new(linux(k), Ownership::from_mesh(cluster.mesh()), ring());
        let refused = |e: Error| match e {
            Error::ForeignLink {
                interface,
                reason: why,
            } => {
                assert_eq!(interface, name);
                assert!(reason(&why), "{name}: {why:?}");
                let text = Error::ForeignLink {
                    interface,
                    reason: why,
                }
                .to_string();
                assert!(
                    text.starts_with(&format!("interface {name}: refusing")),
                    "{text}"
                );
            }
            other => panic!("{name}: {other}"),
        };
        refused(r.dry_run(&plan).unwrap_err());
        refused(r.reconcile(&plan).unwrap_err());
        refused(r.reconcile(&NodePlan::empty("a")).unwrap_err());
        let k = r.dataplane().kernel();
        assert_eq!(k.links, before.links, "{name}: links changed");
        assert_eq!(k.routes, before.routes, "{name}: routes changed");
        assert_eq!(k.rules, before.rules, "{name}: rules changed");
        assert!(k.nft.is_empty(), "{name}: nftables changed");
        // `diff` alone (without the check) plans nothing against the link either.
        let actual = r
            .dataplane_mut()
            .read(&Ownership::from_mesh(cluster.mesh()), &[])
            .unwrap();
        let ops = wgmesh_netlink::diff(
            &plan,
            &actual,
            &Ownership::from_mesh(cluster.mesh()),
            &wgmesh_netlink::DiffOptions::default(),
        )
        .into_operations();
        assert!(
            ops.iter().all(|o| o.interface() != Some(name)),
            "{name}: {ops:?}"
        );
    }
}

/// The links wgmesh makes carry its marker, so a restarted agent (a new reconciler, nothing
/// remembered) still knows them as its own and removes them with an empty plan.
#[test]
fn links_wgmesh_made_are_marked_and_stay_its_own_across_restarts() {
    let (plan, mut r) = setup(true);
    converge(&mut r, &plan);
    let k = r.into_dataplane().kernel().clone();
    for i in &plan.interfaces {
        assert_eq!(k.links[&i.name].alias.as_deref(), Some(LINK_MARKER));
    }
    let mut r = Reconciler::new(linux(k), Ownership::from_mesh(cluster(true).mesh()), ring());
    assert!(r.reconcile(&plan).unwrap().is_noop());
    r.reconcile(&NodePlan::empty("a")).unwrap();
    let k = r.dataplane().kernel();
    assert!(
        plan.interfaces
            .iter()
            .all(|i| !k.links.contains_key(&i.name))
    );
}

/// A device wgmesh made but could not mark (the marking request was refused, or the agent
/// stopped right after creating it) is blank — no key, no peer — and is remade by the next
/// reconcile, marked; a blank device is all such a link can be, so nothing else is taken.
#[test]
fn a_blank_unmarked_device_is_one_wgmesh_could_not_mark_and_is_remade() {
    let (plan, mut r) = setup(true);
    let k = r.dataplane_mut().kernel_mut();
    k.add_link("wireguard.cali", Some("wireguard"), 1420, true);
    let index = k.links["wireguard.cali"].index;
    converge(&mut r, &plan);
    let link = &r.dataplane().kernel().links["wireguard.cali"];
    assert_eq!(link.alias.as_deref(), Some(LINK_MARKER));
    assert_ne!(link.index, index, "remade");
}

#[test]
fn strict_mode_blackholes_filters_and_its_counts_are_not_drift() {
    use wgmesh_netlink::marking::{Expr, STRICT_CHAIN, StrictDrops};
    let c = four_nodes(r#""strict_mode": true, "cluster_cidrs": ["10.65.0.0/16", "10.0.0.0/24"]"#);
    let plan = plan_node(&c, "a").unwrap();
    let mut r = Reconciler::new(fake(), Ownership::from_mesh(c.mesh()), ring());
    converge(&mut r, &plan);
    let k = r.dataplane().kernel();
    // The plain node without WireGuard settings and the unknown cluster space: blackholes.
    let blackholes: BTreeSet<String> = k
        .routes
        .values()
        .filter(|x| x.table == 1 && x.kind == ActualRouteKind::Blackhole)
        .map(|x| x.destination.to_string())
        .collect();
    assert!(blackholes.contains("10.65.0.192/26"), "{blackholes:?}");
    assert!(blackholes.contains("10.65.0.0/16"), "{blackholes:?}");
    assert_eq!(r.strict_drops().unwrap(), Some(StrictDrops::default()));
    // The kernel counts drops: they are read back, and they are not drift.
    for t in r.dataplane_mut().kernel_mut().nft.values_mut() {
        for chain in t.chains.iter_mut().filter(|c| c.name == STRICT_CHAIN) {
            for rule in &mut chain.rules {
                let v4 = rule.contains(&Expr::Cmp {
                    sreg: 1,
                    op: 0,
                    data: vec![2],
                });
                for e in rule.iter_mut() {
                    if let Expr::Counter { packets, bytes } = e {
                        (*packets, *bytes) = if v4 { (7, 420) } else { (3, 240) };
                    }
                }
            }
        }
    }
    assert_eq!(
        r.strict_drops().unwrap(),
        Some(StrictDrops {
            ingress_v4: 7,
            ingress_v6: 3
        })
    );
    let again = r.reconcile(&plan).unwrap();
    assert!(again.is_noop(), "{:?}", again.operations);
    // Strict mode off: the filter and the blackholes go.
    let off = plan_node(&four_nodes(""), "a").unwrap();
    converge(&mut r, &off);
    assert_eq!(r.strict_drops().unwrap(), None);
    assert!(
        !r.dataplane()
            .kernel()
            .routes
            .values()
            .any(|x| x.kind == ActualRouteKind::Blackhole)
    );
}

/// Another program's rule on wgmesh's mark bits (Tailscale's bypass rule) or priority:
/// wgmesh refuses with one line naming it and changes nothing; a rule that shares nothing is
/// no obstacle.
#[test]
fn a_neighbours_mark_or_priority_is_refused_naming_it() {
    let (plan, mut r) = setup(false);
    let mut tailscale = FakeRule::lookup(Family::V4, 5210, 254);
    tailscale.firewall_mark = 0x80000;
    tailscale.firewall_mask = 0xff0000;
    add_rule(&mut r, tailscale);
    let before = r.dataplane().kernel().links.len();
    let e = r.reconcile(&plan).unwrap_err();
    assert!(matches!(e, wgmesh_netlink::Error::Collision { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "fwmark bits 0x100000 are used by Tailscale (`5210: from all fwmark 0x80000/0xff0000 lookup 254`): set mesh.firewall_mark to bits nobody else uses; wgmesh changes nothing while it collides"
    );
    assert_eq!(r.dataplane().kernel().links.len(), before);
    // Cilium's proxy table at wgmesh's priority.
    let (plan, mut r) = setup(false);
    add_rule(&mut r, FakeRule::lookup(Family::V6, 99, 2005));
    let e = r.reconcile(&plan).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("rule priority 99 is taken by Cilium"),
        "{e}"
    );
    // A neighbour that shares nothing.
    let (plan, mut r) = setup(false);
    let mut other = FakeRule::lookup(Family::V4, 5210, 52);
    other.firewall_mark = 0x80000;
    other.firewall_mask = 0x80000;
    add_rule(&mut r, other);
    converge(&mut r, &plan);
}

/// A leaving peer's destinations: interval sets in the table, read back (a second reconcile
/// is a no-op), a lost element seen as drift and repaired, gone when the peer is active.
#[test]
fn phased_destinations_are_sets_read_back_and_repaired() {
    let base = cluster(true);
    let mut leaving = base.clone();
    let mut b = leaving.node("b").unwrap().clone();
    b.wireguard.as_mut().unwrap().phase = wgmesh_core::Phase::Leaving;
    leaving.upsert_node(b).unwrap();
    let plan = plan_node(&leaving, "a").unwrap();
    assert!(!plan.marking.as_ref().unwrap().plain_destinations.is_empty());
    let mut r = Reconciler::new(fake(), Ownership::from_mesh(base.mesh()), ring());
    converge(&mut r, &plan);
    let sets = |r: &Reconciler<Fake>| -> Vec<wgmesh_netlink::marking::NftSet> {
        r.dataplane()
            .kernel()
            .nft
            .values()
            .flat_map(|t| t.sets.clone())
            .collect()
    };
    let held = sets(&r);
    assert_eq!(held[0].name, "plain4");
    assert!(!held[0].elements.is_empty());
    // Drift: an element lost.
    for t in r.dataplane_mut().kernel_mut().nft.values_mut() {
        for s in &mut t.sets {
            s.elements.pop();
        }
    }
    assert!(!r.reconcile(&plan).unwrap().is_noop());
    assert!(r.reconcile(&plan).unwrap().is_noop());
    assert_eq!(sets(&r).len(), held.len());
    converge(&mut r, &plan_node(&base, "a").unwrap());
    assert!(sets(&r).is_empty());
}
