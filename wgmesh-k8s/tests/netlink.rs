//! The agent over wgmesh-netlink's reconciler and its in-memory fake kernel: the scenarios
//! end in the netlink operations the kernel would receive, and the fake kernel ends equal to
//! the plan (a reconcile against it has nothing left to do).

mod common;

use std::time::Duration;

use common::*;
use wgmesh_core::{MeshConfig, NodePlan, RouteSource, plan_node};
use wgmesh_k8s::agent::{Agent, AgentSettings};
use wgmesh_k8s::bootstrap::guard_plan;
use wgmesh_k8s::metrics::Metrics;
use wgmesh_k8s::netlink::NetlinkDataplane;
use wgmesh_netlink::testing::FailingDataplane;
use wgmesh_netlink::{KeyRing, marking as nft};

const MS: Duration = Duration::from_millis(1);

fn ops(d: &mut Driver<Fake>) -> Vec<String> {
    let k = d.agent.dataplane_mut().reconciler_mut().dataplane_mut();
    let ops = k.recorded().iter().map(ToString::to_string).collect();
    k.clear_recorded();
    ops
}

fn kernel(d: &mut Driver<Fake>) -> &mut wgmesh_netlink::testing::FakeKernel {
    d.agent
        .dataplane_mut()
        .reconciler_mut()
        .dataplane_mut()
        .inner_mut()
        .kernel_mut()
}

fn expected(d: &Driver<Fake>) -> NodePlan {
    let cluster = d.agent.view().cluster().unwrap();
    let mut plan = plan_node(&cluster, "a").unwrap();
    if d.agent.guarded() {
        guard_plan(&mut plan);
    }
    plan
}

/// The fake kernel holds exactly the plan: a full reconcile would change nothing.
fn assert_kernel_matches<D: wgmesh_netlink::Dataplane>(
    d: &mut Driver<NetlinkDataplane<D>>,
    plan: &NodePlan,
) {
    let pending = d
        .agent
        .dataplane_mut()
        .reconciler_mut()
        .plan_operations(plan)
        .unwrap();
    assert!(
        pending.is_empty(),
        "kernel differs from the plan: {pending:#?}"
    );
}

#[test]
fn initial_sync_programs_the_kernel() {
    let mut d = netlink_agent(MeshConfig::default(), private(1));
    start_two_nodes(&mut d);
    let ops = ops(&mut d);
    let b = public(2).to_base64();
    assert_eq!(
        ops,
        [
            "create link wireguard.cali type wireguard mtu 1440 up".to_owned(),
            "set device wireguard.cali private-key (ipv4 key, hidden) listen-port 51820 fwmark 0x100000".to_owned(),
            format!("set peer {b} on wireguard.cali endpoint 10.0.0.2:51820 persistent-keepalive 0 add allowed-ips 10.65.0.64/26"),
            "replace route throw 10.65.0.0/26 table 1".to_owned(),
            "replace route 10.65.0.64/26 dev wireguard.cali table 1 scope link".to_owned(),
            "sysctl net.ipv4.conf.all.src_valid_mark=1".to_owned(),
            "replace nftables table inet wgmesh (2 chains, 5 rules), table arp wgmesh (1 chains, 4 rules)".to_owned(),
            "add rule 99:\tnot from all fwmark 0x100000/0x100000 lookup 1".to_owned(),
        ],
        "{ops:#?}"
    );
    let plan = expected(&d);
    assert_kernel_matches(&mut d, &plan);
}

#[test]
fn nodes_join_rotate_and_leave_pods_churn() {
    let mut mesh = MeshConfig::default();
    mesh.route_source = RouteSource::WorkloadIps;
    let mut d = netlink_agent(mesh, private(1));
    start_two_nodes(&mut d);
    ops(&mut d);
    let (b, c, c2) = (
        public(2).to_base64(),
        public(3).to_base64(),
        public(33).to_base64(),
    );

    // A node joins: its peer is added to the running device and its handshake started.
    d.node(wg_node("c", "10.0.0.3", &[], Some(public(3))));
    d.run_for(200 * MS);
    assert_eq!(
        ops(&mut d),
        [
            format!(
                "set peer {c} on wireguard.cali endpoint 10.0.0.3:51820 persistent-keepalive 0"
            ),
            format!(
                "start handshake with peer {c} on wireguard.cali (persistent-keepalive 25, then off)"
            ),
        ]
    );

    // A pod starts on b: one peer update and one route — two messages.
    d.pod(pod("default", "web-1", "b", &["10.0.0.20"], "Running"));
    d.run_for(200 * MS);
    assert_eq!(
        ops(&mut d),
        [
            format!("set peer {b} on wireguard.cali add allowed-ips 10.0.0.20/32"),
            "replace route 10.0.0.20/32 dev wireguard.cali table 1 scope link".to_owned(),
        ]
    );
    let plan = expected(&d);
    assert_kernel_matches(&mut d, &plan);

    // It finishes: the address goes.
    d.pod(pod("default", "web-1", "b", &["10.0.0.20"], "Succeeded"));
    d.run_for(200 * MS);
    let o = ops(&mut d);
    assert!(
        o.iter()
            .any(|o| o.starts_with("delete route 10.0.0.20/32 dev wireguard.cali table 1")),
        "{o:?}"
    );
    assert!(
        o.iter()
            .any(|o| o.contains("10.0.0.20/32") && o.contains(&b)),
        "{o:?}"
    );

    // c rotates its key: the new peer comes and handshakes at once, then the old one goes
    // (add-new first: an allowed IP moving to it never has no peer).
    d.node(wg_node("c", "10.0.0.3", &[], Some(public(33))));
    d.run_for(200 * MS);
    assert_eq!(
        ops(&mut d),
        [
            format!(
                "set peer {c2} on wireguard.cali endpoint 10.0.0.3:51820 persistent-keepalive 0"
            ),
            format!(
                "start handshake with peer {c2} on wireguard.cali (persistent-keepalive 25, then off)"
            ),
            format!("remove peer {c} from wireguard.cali"),
        ]
    );
    let k = kernel(&mut d);
    assert_eq!(
        k.handshakes_initiated(),
        [
            ("wireguard.cali".to_owned(), public(3)),
            ("wireguard.cali".to_owned(), public(33))
        ],
        "only the peers added to the running device, the initial sync's none"
    );

    // c leaves.
    d.delete_node("c");
    d.run_for(200 * MS);
    assert_eq!(
        ops(&mut d),
        [format!("remove peer {c2} from wireguard.cali")]
    );
    let plan = expected(&d);
    assert_kernel_matches(&mut d, &plan);

    // Quiet: the 90 s resync reads the kernel and finds nothing to do.
    d.run_for(Duration::from_secs(91));
    assert!(ops(&mut d).is_empty());
}

#[test]
fn a_new_key_after_a_reboot_is_guarded_then_published_then_applied() {
    let mut mesh = MeshConfig::default();
    mesh.host_encryption = true;
    let mut d = netlink_agent(mesh, private(21));
    d.echo = false;
    // The Node still publishes the old key (1); the key file now holds 21.
    start_two_nodes(&mut d);
    assert!(d.agent.guarded());
    let guarded = d
        .agent
        .dataplane_mut()
        .reconciler_mut()
        .current_plan()
        .unwrap()
        .clone();
    let marking = guarded.marking.as_ref().unwrap();
    assert!(marking.mark_output);
    let k = kernel(&mut d);
    let inet = &k.nft[&(nft::NFPROTO_INET, "wgmesh".to_owned())];
    assert_eq!(
        inet,
        &nft::compile(marking)[0],
        "the guarded marking is in the kernel"
    );
    assert!(
        inet.chains
            .iter()
            .any(|c| c.name == "output" && c.rules.len() == 1),
        "{inet:#?}"
    );
    // The device has the new key already (the published one is stale).
    assert_eq!(
        k.devices["wireguard.cali"].public_key(),
        Some(private(21).public_key())
    );
    assert_eq!(d.publications.len(), 1);
    ops(&mut d);

    // The echo: the guard is lifted, and only the marking changes in the kernel.
    d.node(wg_node(
        "a",
        "10.0.0.1",
        &["10.65.0.0/26"],
        Some(private(21).public_key()),
    ));
    d.run_for(10 * MS);
    assert!(!d.agent.guarded());
    let o = ops(&mut d);
    assert_eq!(o.len(), 1, "{o:?}");
    assert!(o[0].starts_with("replace nftables"));
    let plan = expected(&d);
    assert_kernel_matches(&mut d, &plan);
}

#[test]
fn a_fault_at_every_step_of_the_first_reconcile_is_repaired() {
    let plan_len = {
        let mut d = netlink_agent(MeshConfig::default(), private(1));
        start_two_nodes(&mut d);
        ops(&mut d).len()
    };
    for k in 0..plan_len {
        let mesh = MeshConfig::default();
        let dataplane = NetlinkDataplane::new(
            FailingDataplane::new(fake_linux(), k),
            &mesh,
            KeyRing::single(private(1)),
        );
        let mut d = Driver::new(Agent::new(
            AgentSettings::new("a", mesh),
            dataplane,
            Metrics::new(),
        ));
        d.start_with(
            &[
                wg_node(
                    "a",
                    "10.0.0.1",
                    &["10.65.0.0/26"],
                    Some(private(1).public_key()),
                ),
                wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2))),
            ],
            &[],
        );
        d.run_for(10 * MS);
        assert!(!d.agent.state().ready(), "k={k}: the fault shows");
        d.run_for(Duration::from_secs(2));
        assert!(d.agent.state().ready(), "k={k}: repaired after the backoff");
        assert!(
            d.agent.dataplane().reconciler().dataplane().fired(),
            "k={k}"
        );
        let cluster = d.agent.view().cluster().unwrap();
        let plan = plan_node(&cluster, "a").unwrap();
        assert_kernel_matches(&mut d, &plan);
    }
}

#[test]
fn peer_counters_come_from_the_devices_into_the_metrics() {
    use std::time::SystemTime;
    use wgmesh_netlink::PeerStats;
    let mut d = netlink_agent(MeshConfig::default(), private(1));
    start_two_nodes(&mut d);
    d.node(wg_node(
        "c",
        "10.0.0.3",
        &["10.65.0.128/26"],
        Some(public(3)),
    ));
    d.run_for(200 * MS);
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let k = kernel(&mut d);
    // b has had a handshake and traffic; c none yet; a peer that is not in the kernel (a
    // stale entry) reports nothing.
    k.set_peer_stats(PeerStats::new(
        "wireguard.cali",
        public(2),
        Some(at),
        4_096,
        1_024,
    ));
    k.set_peer_stats(PeerStats::new("wireguard.cali", public(9), Some(at), 1, 1));
    // The counters are read on the metrics interval, not with every reconcile.
    d.run_for(Duration::from_secs(16));
    let text = d.agent.metrics().render();
    let label = |node: &str, key: u8| {
        format!(
            "interface=\"wireguard.cali\",node=\"{node}\",public_key=\"{}\"",
            public(key).to_base64()
        )
    };
    let (b, c) = (label("b", 2), label("c", 3));
    for line in [
        format!("wgmesh_peer_last_handshake_timestamp_seconds{{{b}}} 1700000000\n"),
        format!("wgmesh_peer_receive_bytes_total{{{b}}} 4096\n"),
        format!("wgmesh_peer_transmit_bytes_total{{{b}}} 1024\n"),
        format!("wgmesh_peer_last_handshake_timestamp_seconds{{{c}}} 0\n"),
        format!("wgmesh_peer_receive_bytes_total{{{c}}} 0\n"),
        format!("wgmesh_peer_transmit_bytes_total{{{c}}} 0\n"),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains(&public(9).to_base64()), "{text}");
    // c rotates its key: the new peer starts from zero, the old one's series go.
    d.node(wg_node(
        "c",
        "10.0.0.3",
        &["10.65.0.128/26"],
        Some(public(33)),
    ));
    d.run_for(Duration::from_secs(16));
    let text = d.agent.metrics().render();
    assert!(!text.contains(&public(3).to_base64()), "{text}");
    assert!(
        text.contains(&format!(
            "wgmesh_peer_last_handshake_timestamp_seconds{{{}}} 0\n",
            label("c", 33)
        )),
        "{text}"
    );
}
