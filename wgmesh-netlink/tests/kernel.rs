//! The executor against the message-level fake kernel: what the bytes on the wire do —
//! pipelining and the receive buffer, refusals at every message and the kernel's
//! explanations, the two kernels' allowed-IP quirks, split dumps of big devices. No
//! privileges needed.

use std::collections::BTreeSet;

use ipnet::IpNet;
use wgmesh_core::{
    Cluster, Event, Family, IncrementalPlanner, MeshConfig, NodePlan, Rule, plan_node,
};
use wgmesh_netlink::testing::{FakeKernel, KernelVersion};
use wgmesh_netlink::{
    Backend, Dataplane, Error, Linux, LinuxConfig, Operation, Ownership, Reconciler,
};

#[path = "common/big.rs"]
mod big;
mod common;
use big::big_cluster;
use common::{four_nodes, ring};

fn linux(kernel: FakeKernel) -> Linux<FakeKernel> {
    Linux::with_kernel(kernel, LinuxConfig::with_backend(Backend::Kernel))
        .expect("the fake kernel resolves the wireguard family")
}

fn own() -> Ownership {
    Ownership::from_mesh(&MeshConfig::default())
}

fn small() -> Cluster {
    four_nodes(r#""host_encryption": true, "persistent_keepalive": 25"#)
}

/// Applies `plan` from scratch, reads the device back through the kernel's (split) dumps and
/// checks every peer and allowed IP; a second reconcile does nothing.
fn apply_and_read_back(kernel: FakeKernel, plan: &NodePlan) -> Linux<FakeKernel> {
    let mut r = Reconciler::new(linux(kernel), own(), ring());
    r.reconcile(plan).unwrap();
    let s = r.dataplane_mut().read(&own(), &[]).unwrap();
    let i = &plan.interfaces[0];
    let dev = &s.devices[&i.name];
    assert_eq!(dev.peers.len(), i.peers.len());
    for p in &i.peers {
        let want: BTreeSet<IpNet> = p.allowed_ips.iter().copied().collect();
        assert_eq!(dev.peers[&p.public_key].allowed_ips, want);
    }
    assert_eq!(
        s.routes.len(),
        plan.routes.iter().filter(|r| r.table == 1).count()
    );
    assert!(r.reconcile(plan).unwrap().is_noop());
    r.into_dataplane()
}

#[test]
fn five_thousand_peers_apply_and_read_back_through_split_dumps() {
    let plan = plan_node(&big_cluster(5_000, 1), "a").unwrap();
    let mut k = FakeKernel::new();
    // Small dump messages, as a 4 KiB receive buffer gets them: many parts.
    k.dump_message_size = 4096;
    let l = apply_and_read_back(k, &plan);
    assert!(l.kernel().messages_received() > 5_000);
}

#[test]
fn one_peer_with_100k_allowed_ips_applies_and_reads_back() {
    let plan = plan_node(&big_cluster(2, 100_000), "a").unwrap();
    let mut k = FakeKernel::new();
    k.dump_message_size = 4096;
    // The peer's allowed IPs span hundreds of dump messages, each continuing the peer with
    // its key and more IPs.
    apply_and_read_back(k, &plan);
}

#[test]
fn pipelining_packs_many_messages_per_datagram_and_bounds_unread_answers() {
    let plan = plan_node(&big_cluster(400, 5), "a").unwrap();
    let mut r = Reconciler::new(linux(FakeKernel::new()), own(), ring());
    let report = r.reconcile(&plan).unwrap();
    let k = r.dataplane().kernel();
    assert!(report.messages > 400, "{}", report.messages);
    // 32 acknowledged requests per datagram at most, and no more than 64 in flight: the
    // socket never holds more than 64 acknowledgements (36 bytes each, capped) unread.
    let per_datagram = k.messages_received() as f64 / k.datagrams_received() as f64;
    assert!(
        per_datagram > 10.0,
        "{per_datagram:.1} messages per datagram"
    );
    assert!(
        k.most_unread() <= 64 * 36,
        "{} bytes unread",
        k.most_unread()
    );
}

/// The dataplane over a fresh fake kernel, executing `chunk` requests at a time.
fn linux_in_pieces(chunk: usize) -> Linux<FakeKernel> {
    let mut config = LinuxConfig::with_backend(Backend::Kernel);
    config.execute_chunk = chunk;
    Linux::with_kernel(FakeKernel::new(), config).unwrap()
}

/// Everything the fake kernel holds of wgmesh's objects, comparable.
fn kernel_state(k: &FakeKernel) -> String {
    let devices: Vec<String> = k
        .devices
        .iter()
        .map(|(name, d)| format!("{name} {:?} {:?}", d.public_key(), d.peers))
        .collect();
    format!(
        "{:?}\n{devices:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        k.links, k.routes, k.rules, k.sysctls, k.nft
    )
}

/// A change of hundreds of operations executed in pieces of 16, 7 and 1 requests leaves
/// the kernel exactly as executing it in one piece does (each phase lowered and sent whole,
/// as before pieces), with the same messages — in more datagrams, since each piece's
/// answers are awaited before the next is sent.
#[test]
fn a_change_executed_in_pieces_leaves_the_kernel_as_one_piece_does() {
    let plan = plan_node(&big_cluster(300, 200), "a").unwrap();
    assert!(plan.routes.len() > 400, "{}", plan.routes.len());
    let run = |chunk: usize| {
        let mut r = Reconciler::new(linux_in_pieces(chunk), own(), ring());
        let report = r.reconcile(&plan).unwrap();
        assert!(r.reconcile(&plan).unwrap().is_noop(), "chunk {chunk}");
        let k = r.dataplane().kernel();
        (
            kernel_state(k),
            report.messages,
            k.messages_received(),
            k.datagrams_received(),
        )
    };
    let whole = run(usize::MAX);
    assert!(whole.0.contains("Unicast") || !plan.routes.is_empty());
    for chunk in [16, 7, 1] {
        let pieces = run(chunk);
        assert_eq!(pieces.0, whole.0, "chunk {chunk}: another kernel state");
        assert_eq!(pieces.1, whole.1, "chunk {chunk}: messages reported");
        assert_eq!(pieces.2, whole.2, "chunk {chunk}: messages received");
        assert!(
            pieces.3 > whole.3 + plan.routes.len() / chunk / 2,
            "chunk {chunk}: {} datagrams, {} in one piece: not executed in pieces",
            pieces.3,
            whole.3
        );
    }
}

/// A refusal in a later piece of a big change: the error names the refused route and its
/// place; the pieces before it were carried out, the pieces after it never sent (nor the
/// policy rule, which comes after every route: traffic never enters a half-made table);
/// the next reconcile repairs to the state of an apply in one piece.
#[test]
fn a_refusal_in_a_later_piece_is_named_and_the_next_reconcile_repairs() {
    let plan = plan_node(&big_cluster(300, 200), "a").unwrap();
    let whole = {
        let mut r = Reconciler::new(linux_in_pieces(usize::MAX), own(), ring());
        r.reconcile(&plan).unwrap();
        kernel_state(r.dataplane().kernel())
    };
    let chunk = 16;
    let mut r = Reconciler::new(linux_in_pieces(chunk), own(), ring());
    let ops = r.dry_run(&plan).unwrap().operations;
    let first_route = ops
        .iter()
        .position(|o| matches!(o, Operation::AddRoute { .. }))
        .unwrap();
    // Past the links, devices and peers: a route message well inside the routes.
    let route_messages = plan.routes.len();
    let peers = plan.interfaces[0].peers.len();
    let n = peers + route_messages / 2;
    r.dataplane_mut()
        .kernel_mut()
        .refuse_request(n, 22, Some("injected by the test"));
    let e = r.reconcile(&plan).unwrap_err();
    let Error::Operation {
        index,
        total,
        operation,
        ..
    } = &e
    else {
        panic!("not an operation error: {e}");
    };
    assert_eq!(*total, ops.len());
    assert_eq!(operation, &ops[*index].to_string());
    assert!(operation.starts_with("replace route"), "{e}");
    assert_eq!(e.root().errno(), Some(22), "{e}");
    assert_eq!(e.kernel_message(), Some("injected by the test"));
    let k = r.dataplane().kernel();
    assert!(!k.refusal_pending());
    let routes = k.routes.len();
    let before = index - first_route;
    // The routes before the refused one are there (earlier pieces, and the refused
    // piece's pipelined messages); the later pieces were not sent.
    assert!(
        before > 2 * chunk,
        "refused route {before} is not in a later piece"
    );
    assert!(
        routes >= before,
        "{routes} routes, {before} before the refused one"
    );
    assert!(
        routes < before + chunk,
        "{routes} routes: pieces after the refused one were sent"
    );
    let mesh_table = plan.rules[0].table;
    assert!(
        k.rules.iter().all(|r| r.table != mesh_table),
        "the rule was added after a failed route"
    );
    assert!(r.needs_resync());
    r.reconcile(&plan).unwrap();
    assert!(r.reconcile(&plan).unwrap().is_noop());
    assert_eq!(kernel_state(r.dataplane().kernel()), whole);
}

#[test]
fn an_overflowing_receive_buffer_is_an_error_not_a_hang() {
    let plan = plan_node(&big_cluster(400, 5), "a").unwrap();
    let mut k = FakeKernel::new();
    // Smaller than a window of acknowledgements: the kernel drops answers (ENOBUFS).
    k.receive_buffer = 1000;
    let mut r = Reconciler::new(linux(k), own(), ring());
    let e = r.reconcile(&plan).unwrap_err();
    assert_eq!(e.errno(), Some(105), "{e}");
    // With room again, the next reconcile repairs.
    r.dataplane_mut().kernel_mut().receive_buffer = 4 << 20;
    r.reconcile(&plan).unwrap();
    assert!(r.reconcile(&plan).unwrap().is_noop());
}

/// Every request of a fresh apply, refused in turn (`EINVAL` with an explanation): the
/// error names the operation and carries the kernel's words, and the next reconcile
/// converges — also when the refused message sat in the middle of a pipelined datagram
/// whose later messages the kernel did apply.
#[test]
fn a_refusal_at_every_message_is_repaired_by_the_next_reconcile() {
    let plan = plan_node(&small(), "a").unwrap();
    let total = {
        let mut r = Reconciler::new(linux(FakeKernel::new()), own(), ring());
        let before = r.dataplane().kernel().messages_received();
        r.reconcile(&plan).unwrap();
        r.dataplane().kernel().messages_received() - before
    };
    assert!(total > 20, "{total}");
    let mut refused_all = false;
    for n in 0..total {
        let mut r = Reconciler::new(linux(FakeKernel::new()), own(), ring());
        r.dataplane_mut()
            .kernel_mut()
            .refuse_request(n, 22, Some("injected by the test"));
        match r.reconcile(&plan) {
            Err(e) => {
                assert_eq!(e.root().errno(), Some(22), "n={n}: {e}");
                assert_eq!(e.kernel_message(), Some("injected by the test"), "n={n}");
                assert!(
                    e.to_string()
                        .contains("the kernel says: injected by the test")
                );
                assert!(!r.dataplane().kernel().refusal_pending());
            }
            // Past the last request: the two nf_tables batch delimiters are not refused.
            Ok(_) => {
                assert!(r.dataplane().kernel().refusal_pending(), "n={n}: unnoticed");
                assert!(n >= total - 2, "n={n} of {total}");
                refused_all = true;
                continue;
            }
        }
        r.reconcile(&plan).unwrap();
        assert!(r.reconcile(&plan).unwrap().is_noop(), "n={n}");
    }
    assert!(refused_all);
}

fn workload_ip_removal(version: KernelVersion) -> (usize, Option<bool>, Linux<FakeKernel>) {
    let c = four_nodes(r#""route_source": "workload_ips""#);
    let mut planner = IncrementalPlanner::new(&c, "a");
    let mut r = Reconciler::new(
        linux(FakeKernel::new().with_version(version)),
        own(),
        ring(),
    );
    r.reconcile(&planner.plan()).unwrap();
    let b = c.node("b").unwrap().clone();
    let mut messages = 0;
    for ip in ["10.66.0.1", "10.66.0.2"] {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        let d = planner
            .apply(Event::WorkloadIpAdded {
                node: "b".into(),
                ip,
            })
            .unwrap();
        r.apply_delta(&d).unwrap();
        let d = planner
            .apply(Event::WorkloadIpRemoved {
                node: "b".into(),
                ip,
            })
            .unwrap();
        let report = r.apply_delta(&d).unwrap();
        assert!(
            report
                .operations
                .iter()
                .any(|o| matches!(o, Operation::RemoveAllowedIps { .. })),
            "{:#?}",
            report.operations
        );
        // The second removal: after the capability was probed.
        messages = report.messages;
    }
    assert!(r.resync().unwrap().is_noop());
    let state = r.dataplane_mut().read(&own(), &[]).unwrap();
    let dev = &state.devices["wireguard.cali"];
    let peer = &dev.peers[&b.wireguard.as_ref().unwrap().key(Family::V4).unwrap()];
    assert!(!peer.allowed_ips.contains(&"10.66.0.2/32".parse().unwrap()));
    assert!(peer.allowed_ips.contains(&"10.65.0.5/32".parse().unwrap()));
    assert_eq!(dev.peers.len(), 2, "no throwaway peer is left");
    (
        messages,
        state.remove_allowed_ip_supported,
        r.into_dataplane(),
    )
}

#[test]
fn linux_6_12_removes_an_allowed_ip_in_one_message_and_6_1_through_a_throwaway_peer() {
    // One route delete and one peer update on 6.12…
    let (m, supported, _) = workload_ip_removal(KernelVersion::Linux6_12);
    assert_eq!((m, supported), (2, Some(true)));
    // …and on 6.1, which refuses the per-IP flag, the IP moves to a throwaway peer that is
    // removed right after: two peer updates.
    let (m, supported, _) = workload_ip_removal(KernelVersion::Linux6_1);
    assert_eq!((m, supported), (3, Some(false)));
}

#[test]
fn kernel_errors_name_the_operation() {
    let mut l = linux(FakeKernel::new());
    l.kernel_mut().add_link("wg0", Some("dummy"), 1500, true);
    let e = l
        .execute(
            &[Operation::CreateLink {
                interface: "wg0".into(),
                kind: wgmesh_netlink::LinkKind::Wireguard,
                mtu: 1420,
            }],
            &ring(),
        )
        .unwrap_err();
    assert_eq!(e.root().errno(), Some(17), "{e}");
    assert!(e.to_string().contains("create link wg0"), "{e}");
    let rule = Rule {
        family: Family::V6,
        priority: 7,
        table: 7,
        firewall_mark: 1,
        firewall_mask: 1,
        invert: false,
    };
    let e = l
        .execute(
            &[
                Operation::AddRule { rule: rule.clone() },
                Operation::AddRule { rule },
            ],
            &ring(),
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::Operation { index: 1, .. }) && e.root().errno() == Some(17),
        "{e}"
    );
}

#[test]
fn without_the_wireguard_module_auto_picks_userspace_and_kernel_is_refused() {
    let mut k = FakeKernel::new();
    k.wireguard = false;
    let e = Linux::with_kernel(k.clone(), LinuxConfig::with_backend(Backend::Kernel)).unwrap_err();
    assert!(matches!(e, Error::NoKernelWireGuard { .. }), "{e}");
    let l = Linux::with_kernel(k, LinuxConfig::with_backend(Backend::Auto)).unwrap();
    assert!(!l.is_kernel());
    assert!(
        l.backend_description()
            .contains("auto found no kernel WireGuard (generic netlink family lookup: errno 2)"),
        "{}",
        l.backend_description()
    );
}

/// A kernel that keeps a copy of every nf_tables request and counts the bytes of every
/// answer.
struct Spy {
    kernel: FakeKernel,
    nft_requests: Vec<netlink_packet_netfilter::NetfilterMessage>,
    received: usize,
}

impl wgmesh_netlink::KernelIo for Spy {
    fn send(&mut self, protocol: wgmesh_netlink::Protocol, datagram: &[u8]) -> std::io::Result<()> {
        if protocol == wgmesh_netlink::Protocol::Netfilter {
            let mut rest = datagram;
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
                let m = netlink_packet_core::NetlinkMessage::<
                    netlink_packet_netfilter::NetfilterMessage,
                >::deserialize(&rest[..len])
                .unwrap();
                if let netlink_packet_core::NetlinkPayload::InnerMessage(n) = m.payload {
                    self.nft_requests.push(n);
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
        self.kernel.send(protocol, datagram)
    }

    fn recv(
        &mut self,
        protocol: wgmesh_netlink::Protocol,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        self.kernel.recv(protocol, buf)?;
        self.received += buf.len();
        Ok(())
    }

    fn read_sysctl(&mut self, key: &str) -> std::io::Result<Option<String>> {
        self.kernel.read_sysctl(key)
    }

    fn write_sysctl(&mut self, key: &str, value: &str) -> std::io::Result<()> {
        self.kernel.write_sysctl(key, value)
    }
}

/// Issue 11, section 5: a reconcile read the whole nftables ruleset, so a foreign table of
/// 50,000 rules made every no-op apply cost seconds. Now every nf_tables dump names a family
/// and every rule dump wgmesh's table: a no-op reconcile receives the same bytes with or
/// whether a foreign table in the same family holds 10 rules or 5,000 (its chain is in the
/// chain dump: Linux filters those by family only).
#[test]
fn a_reconcile_reads_only_wgmeshs_nftables_tables() {
    use netlink_packet_netfilter::NetfilterMessageInner;
    use netlink_packet_netfilter::nftables::{NfTablesMessage, RuleAttribute};
    use wgmesh_netlink::marking::{Expr, NftChain, NftTable};
    let plan = plan_node(&small(), "a").unwrap();
    let mut received = Vec::new();
    for foreign_rules in [10, 5_000] {
        let mut k = FakeKernel::new();
        {
            let rule = vec![Expr::Verdict { code: 1 }];
            k.nft.insert(
                (1, "other".into()),
                NftTable {
                    family: 1,
                    name: "other".into(),
                    flags: 0,
                    chains: vec![NftChain {
                        name: "c".into(),
                        kind: None,
                        hook: None,
                        priority: None,
                        policy: None,
                        rules: vec![rule; foreign_rules],
                    }],
                    sets: Vec::new(),
                },
            );
        }
        let spy = Spy {
            kernel: k,
            nft_requests: Vec::new(),
            received: 0,
        };
        let l = Linux::with_kernel(spy, LinuxConfig::with_backend(Backend::Kernel)).unwrap();
        let mut r = Reconciler::new(l, own(), ring());
        r.reconcile(&plan).unwrap();
        let spy = r.dataplane_mut().kernel_mut();
        spy.nft_requests.clear();
        spy.received = 0;
        assert!(r.reconcile(&plan).unwrap().is_noop());
        let spy = r.dataplane().kernel();
        let dumps: Vec<_> = spy
            .nft_requests
            .iter()
            .filter_map(|m| match &m.inner {
                NetfilterMessageInner::NfTables(n) => Some((u8::from(m.header.family), n)),
                _ => None,
            })
            .filter(|(_, n)| {
                matches!(
                    n,
                    NfTablesMessage::GetChain(_) | NfTablesMessage::GetRule(_)
                )
            })
            .collect();
        assert!(!dumps.is_empty(), "wgmesh's tables were not read");
        for (family, n) in dumps {
            assert_ne!(family, 0, "a dump of every family: {n:?}");
            if let NfTablesMessage::GetRule(q) = n {
                assert!(
                    q.attributes
                        .iter()
                        .any(|a| matches!(a, RuleAttribute::Table(t) if t == "wgmesh")),
                    "a rule dump of every table: {q:?}"
                );
            }
        }
        received.push(spy.received);
    }
    assert_eq!(
        received[0], received[1],
        "bytes received per no-op reconcile"
    );
}
