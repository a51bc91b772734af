//! The reconciler against a real Linux host: kernel WireGuard (inside the qemu VM) or
//! wireguard-go (in a network namespace on the host), cross-checked with `wg`, `ip` and `nft`
//! as oracles.
//!
//! Every test here is `#[ignore]`d: it needs root, a throwaway network namespace or VM, and
//! `WGMESH_TEST_BACKEND=kernel|userspace`. `scripts/test-netlink.sh` runs them with
//! `--ignored --test-threads=1`; there, a missing environment fails the test.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;

use ipnet::IpNet;
use proptest::prelude::*;
use wgmesh_core::{
    Cluster, Event, Family, IncrementalPlanner, MeshConfig, NodePlan, RouteType, plan_node,
};
use wgmesh_netlink::testing::FailingDataplane;
use wgmesh_netlink::{Backend, Dataplane, Linux, LinuxConfig, Operation, Ownership, Reconciler};

static LOCK: Mutex<()> = Mutex::new(());

#[path = "common/big.rs"]
mod big;
mod common;
use big::big_cluster;
use common::{four_nodes, key, ring};

fn backend() -> Backend {
    assert_eq!(
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
        b"0\n",
        "these tests need root (run scripts/test-netlink.sh)"
    );
    match std::env::var("WGMESH_TEST_BACKEND").as_deref() {
        Ok("kernel") => Backend::Kernel,
        Ok("userspace") => Backend::Userspace,
        other => panic!(
            "WGMESH_TEST_BACKEND must be kernel or userspace (got {other:?}); run scripts/test-netlink.sh"
        ),
    }
}

fn open() -> Linux {
    let b = backend();
    let l = Linux::open(LinuxConfig::with_backend(b)).expect("open the Linux dataplane");
    assert_eq!(
        l.is_kernel(),
        b == Backend::Kernel,
        "{}",
        l.backend_description()
    );
    l
}

fn sh(cmd: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh_ok(cmd: &str) {
    let _ = Command::new("bash").arg("-c").arg(cmd).output();
}

fn cluster(host_encryption: bool) -> Cluster {
    four_nodes(&format!(
        r#""host_encryption": {host_encryption}, "persistent_keepalive": 25,
            "control_plane_endpoints": ["10.0.0.9:6443"]"#
    ))
}

fn own() -> Ownership {
    Ownership::from_mesh(&MeshConfig::default())
}

/// Removes whatever an earlier test left.
fn reset() {
    let mut r = Reconciler::new(open(), own(), ring());
    r.reconcile(&NodePlan::empty("a")).expect("tear down");
    for l in ["wg-foreign", "dummy-foreign"] {
        sh_ok(&format!("ip link del {l}"));
    }
    sh_ok("while ip rule del pref 99 table 2 2>/dev/null; do :; done");
    sh_ok("while ip rule del pref 98 table 2 2>/dev/null; do :; done");
    sh_ok("while ip rule del pref 5210 table 254 2>/dev/null; do :; done");
    sh_ok("nft delete table inet other; nft delete table ip wgmesh; ip route flush table 2");
}

/// Cross-checks the host against the plan with `wg`, `ip` and `nft`.
fn check_with_tools(plan: &NodePlan) {
    for name in ["wireguard.cali", "wg-v6.cali"] {
        let Some(i) = plan.interfaces.iter().find(|i| i.name == name) else {
            let links = sh("ip -o link show");
            assert!(
                !links.contains(&format!(" {name}:")),
                "{name} should not exist: {links}"
            );
            continue;
        };
        let conf = sh(&format!("wg showconf {name}"));
        let mut peers: Vec<(String, BTreeSet<String>, String, String)> = Vec::new();
        let (mut port, mut mark, mut private) = (String::new(), String::new(), String::new());
        for line in conf.lines() {
            let Some((k, v)) = line.split_once(" = ") else {
                if line == "[Peer]" {
                    peers.push(Default::default());
                }
                continue;
            };
            match (k, peers.last_mut()) {
                ("ListenPort", None) => port = v.into(),
                ("FwMark", None) => mark = v.into(),
                ("PrivateKey", None) => private = v.into(),
                ("PublicKey", Some(p)) => p.0 = v.into(),
                ("AllowedIPs", Some(p)) => p.1 = v.split(", ").map(str::to_owned).collect(),
                ("Endpoint", Some(p)) => p.2 = v.into(),
                ("PersistentKeepalive", Some(p)) => p.3 = v.into(),
                _ => {}
            }
        }
        assert_eq!(port, i.listen_port.to_string(), "{name} port");
        assert_eq!(mark, format!("{:#x}", i.firewall_mark), "{name} fwmark");
        let want_key = ring().private_key(i.family).unwrap().to_base64();
        assert!(private == want_key.as_str(), "{name}: wrong private key");
        assert_eq!(peers.len(), i.peers.len(), "{name} peers: {conf}");
        for p in &i.peers {
            let got = peers
                .iter()
                .find(|g| g.0 == p.public_key.to_string())
                .unwrap_or_else(|| panic!("{name}: peer {} missing", p.public_key));
            let want: BTreeSet<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
            assert_eq!(got.1, want, "{name} allowed ips");
            assert_eq!(got.2, p.endpoint.to_string());
            assert_eq!(
                got.3,
                p.persistent_keepalive
                    .map(|k| k.to_string())
                    .unwrap_or_else(|| "off".into())
                    .replace("off", "")
            );
        }
        let link = sh(&format!("ip -o link show {name}"));
        assert!(link.contains(&format!("mtu {} ", i.mtu)), "{link}");
        assert!(link.contains(",UP"), "{link}");
    }
    for (flag, family, host) in [("-4", Family::V4, 32), ("-6", Family::V6, 128)] {
        let table = sh(&format!("ip {flag} route show table 1"));
        let mut got: BTreeSet<(String, String)> = BTreeSet::new();
        for line in table.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            let (kind, dst, rest) = if w[0] == "throw" || w[0] == "blackhole" {
                (w[0], w[1], &w[2..])
            } else {
                ("unicast", w[0], &w[1..])
            };
            let dst = if dst.contains('/') {
                dst.to_owned()
            } else {
                format!("{dst}/{host}")
            };
            let dev = rest
                .iter()
                .position(|x| *x == "dev")
                .map(|i| rest[i + 1])
                .unwrap_or("");
            got.insert((
                dst,
                if kind == "throw" || kind == "blackhole" {
                    kind.into()
                } else {
                    dev.to_owned()
                },
            ));
        }
        let want: BTreeSet<(String, String)> = plan
            .routes
            .iter()
            .filter(|r| r.family == family)
            .map(|r| {
                (
                    r.destination.to_string(),
                    match r.kind {
                        RouteType::Throw => "throw".to_owned(),
                        RouteType::Blackhole => "blackhole".to_owned(),
                        RouteType::Unicast => r.device.as_deref().unwrap_or_default().to_owned(),
                    },
                )
            })
            .collect();
        assert_eq!(got, want, "ip {flag} route show table 1");
        let rules: Vec<String> = sh(&format!("ip {flag} rule show"))
            .lines()
            .filter(|l| l.contains("lookup 1 ") || l.ends_with("lookup 1"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let want: Vec<String> = plan
            .rules
            .iter()
            .filter(|r| r.family == family)
            .map(|r| {
                format!(
                    "{}: not from all fwmark {:#x}/{:#x} lookup {}",
                    r.priority, r.firewall_mark, r.firewall_mask, r.table
                )
            })
            .collect();
        assert_eq!(rules, want, "ip {flag} rule");
    }
    let ruleset = sh("nft list ruleset");
    match &plan.marking {
        None => assert!(
            !ruleset.contains("table inet wgmesh") && !ruleset.contains("table arp wgmesh"),
            "{ruleset}"
        ),
        Some(m) => {
            // Counters list what they counted: compare without the counts.
            let uncounted = |l: &str| match l.find("counter packets ") {
                Some(i) => {
                    let rest = &l[i..];
                    let end = rest.find(" bytes ").map_or(rest.len(), |b| {
                        let after = &rest[b + 7..];
                        b + 7 + after.find(' ').unwrap_or(after.len())
                    });
                    format!("{}counter{}", &l[..i], &rest[end..])
                }
                None => l.to_owned(),
            };
            let listed: BTreeSet<String> = ruleset.lines().map(|l| uncounted(l.trim())).collect();
            // A set's elements list as nft wraps and merges them (checked by the read-back,
            // which compares them exactly), and `auto-merge` is nft's, not the kernel's.
            let listed_as_is = |l: &&str| {
                let l = l.trim();
                !(l == "auto-merge" || l.starts_with("elements = "))
            };
            for line in m.nft_script().lines().filter(listed_as_is) {
                let line = line.trim().replace(
                    &format!("| {:#x}", m.firewall_mark),
                    &format!("| {:#010x}", m.firewall_mark),
                );
                assert!(listed.contains(&line), "nft lacks {line:?}:\n{ruleset}");
            }
        }
    }
    for s in &plan.sysctls {
        let v = std::fs::read_to_string(format!("/proc/sys/{}", s.key.replace('.', "/"))).unwrap();
        assert_eq!(v.trim(), s.value);
    }
}

fn converge(r: &mut Reconciler<Linux>, plan: &NodePlan) {
    r.reconcile(plan).expect("reconcile");
    check_with_tools(plan);
    let again = r.reconcile(plan).expect("second reconcile");
    assert!(again.is_noop(), "second run did {:#?}", again.operations);
}

#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn create_configure_read_back_and_tear_down() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    for he in [false, true] {
        let plan = plan_node(&cluster(he), "a").unwrap();
        let mut r = Reconciler::new(open(), own(), ring());
        let report = r.reconcile(&plan).unwrap();
        let created = report
            .operations
            .iter()
            .filter(|o| matches!(o, Operation::CreateLink { .. }))
            .count();
        // The first plan creates both links; the second one changes them in place.
        assert_eq!(created, if he { 0 } else { 2 }, "{:#?}", report.operations);
        check_with_tools(&plan);
        assert!(r.reconcile(&plan).unwrap().is_noop());
    }
    let mut r = Reconciler::new(open(), own(), ring());
    let off = NodePlan::empty("a");
    r.reconcile(&off).unwrap();
    check_with_tools(&off);
    assert!(r.reconcile(&off).unwrap().is_noop());
}

/// The background resync reads through netlink sockets of its own (`open_reader`) on another
/// thread, and its repairs go through the reconciler's: the mesh table flushed behind its
/// back comes back.
#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn a_background_resync_reads_through_sockets_of_its_own_and_repairs() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let plan = plan_node(&cluster(true), "a").unwrap();
    let mut r = Reconciler::new(open(), own(), ring());
    converge(&mut r, &plan);
    sh_ok("ip route flush table 1; ip -6 route flush table 1");
    let job = r
        .begin_resync()
        .unwrap()
        .expect("Linux over sockets has a second handle");
    let found = std::thread::spawn(move || job.run()).join().unwrap();
    let report = r.finish_resync(found).unwrap();
    assert!(
        !report.is_noop(),
        "the flushed routes were not found missing"
    );
    check_with_tools(&plan);
    assert!(r.reconcile(&plan).unwrap().is_noop());
    r.reconcile(&NodePlan::empty("a")).unwrap();
}

/// A neighbour on wgmesh's mark bits (Tailscale's bypass rule, as Tailscale installs it) is
/// refused with one line naming it, before anything changes.
#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn a_neighbour_on_wgmeshs_mark_bits_is_refused() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    sh("ip rule add pref 5210 fwmark 0x80000/0xff0000 lookup main");
    let before = sh("ip link show; ip rule show; ip route show table 1");
    let plan = plan_node(&cluster(false), "a").unwrap();
    let mut r = Reconciler::new(open(), own(), ring());
    let e = r.reconcile(&plan).unwrap_err().to_string();
    assert!(
        e.starts_with("fwmark bits 0x100000 are used by Tailscale (`5210: from all fwmark 0x80000/0xff0000 lookup 254`)"),
        "{e}"
    );
    assert_eq!(
        sh("ip link show; ip rule show; ip route show table 1"),
        before
    );
    reset();
}

/// Strict mode on a real kernel: blackhole routes in both families, the ingress filter
/// (`fib saddr oifname`, counted per family) in wgmesh's table, its counters read back, and
/// off again.
#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn strict_mode_blackholes_and_filters_and_counts() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let strict = four_nodes(
        r#""strict_mode": true, "cluster_cidrs": ["10.65.0.0/16", "10.0.0.0/24", "fd10::/64"],
            "control_plane_endpoints": ["10.0.0.9:6443"]"#,
    );
    let plan = plan_node(&strict, "a").unwrap();
    for family in [Family::V4, Family::V6] {
        assert!(
            plan.routes
                .iter()
                .any(|r| r.family == family && r.kind == RouteType::Blackhole),
            "{family}"
        );
    }
    let mut r = Reconciler::new(open(), own(), ring());
    converge(&mut r, &plan);
    let table = sh("ip route show table 1; ip -6 route show table 1");
    assert!(table.contains("blackhole 10.65.0.192/26"), "{table}");
    assert!(table.contains("blackhole fd10::/64"), "{table}");
    let nft = sh("nft list table inet wgmesh");
    assert!(
        nft.contains(
            r#"meta nfproto ipv6 fib saddr oifname "wg-v6.cali" counter packets 0 bytes 0 drop"#
        ),
        "{nft}"
    );
    assert_eq!(
        r.strict_drops().unwrap(),
        Some(wgmesh_netlink::marking::StrictDrops::default())
    );
    let off = plan_node(&cluster(false), "a").unwrap();
    converge(&mut r, &off);
    assert_eq!(r.strict_drops().unwrap(), None);
    r.reconcile(&NodePlan::empty("a")).unwrap();
}

/// Phases on a real kernel: a leaving peer's destinations keep their routes into the
/// tunnel and are marked instead (prerouting and output rules looking the prefixes up in an
/// interval set per family, strict mode's exemption by source), read back as compiled (a
/// second reconcile is a no-op); the local node joining marks everything; back to active
/// removes the rules and the sets.
#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn phased_destinations_are_marked_and_read_back() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let base = four_nodes(
        r#""host_encryption": true, "strict_mode": true,
            "cluster_cidrs": ["10.65.0.0/16", "10.0.0.0/24", "fd10::/64", "fd00::/64"]"#,
    );
    let phased = |node: &str, phase: wgmesh_core::Phase| {
        let mut c = base.clone();
        let mut n = c.node(node).unwrap().clone();
        n.wireguard.as_mut().unwrap().phase = phase;
        c.upsert_node(n).unwrap();
        c
    };
    let mut r = Reconciler::new(open(), own(), ring());
    let leaving = plan_node(&phased("b", wgmesh_core::Phase::Leaving), "a").unwrap();
    converge(&mut r, &leaving);
    let table = sh("ip route show table 1; ip -6 route show table 1");
    assert!(
        table.contains("10.65.0.64/26 dev wireguard.cali"),
        "{table}"
    );
    assert!(table.contains("fd10::100/120 dev wg-v6.cali"), "{table}");
    let nft = sh("nft list table inet wgmesh");
    // One interval set per family holds the destinations; one rule per chain looks it up.
    let sets = sh("nft list set inet wgmesh plain4; nft list set inet wgmesh plain6");
    for want in [
        "10.65.0.64/26",
        "10.0.0.2",
        "fd10::100/120",
        "flags interval",
    ] {
        assert!(sets.contains(want), "{want} in\n{sets}");
    }
    for want in [
        "ip daddr @plain4 meta mark set meta mark | 0x00100000",
        "ip6 daddr @plain6 meta mark set meta mark | 0x00100000",
        "ip saddr @plain4 return",
    ] {
        assert!(nft.contains(want), "{want} in\n{nft}");
    }
    let joining = plan_node(&phased("a", wgmesh_core::Phase::Joining), "a").unwrap();
    assert!(joining.marking.as_ref().unwrap().plain_all);
    converge(&mut r, &joining);
    let nft = sh("nft list table inet wgmesh");
    assert!(!nft.contains("daddr"), "{nft}");
    assert!(!nft.contains("strict_ingress"), "{nft}");
    converge(&mut r, &plan_node(&base, "a").unwrap());
    let nft = sh("nft list table inet wgmesh");
    assert!(!nft.contains("10.65.0.64/26"), "{nft}");
    assert!(!nft.contains("@plain4"), "{nft}");
    r.reconcile(&NodePlan::empty("a")).unwrap();
}

#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn foreign_objects_are_untouched() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    if backend() == Backend::Kernel {
        sh(
            "ip link add wg-foreign type wireguard && wg set wg-foreign listen-port 4000 private-key <(echo aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=) peer /r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw= allowed-ips 10.65.0.64/26",
        );
    }
    sh(
        "ip link add dummy-foreign type veth peer name dummy-foreign2 && ip link set dummy-foreign up",
    );
    sh(
        "ip route add 10.203.0.0/16 dev dummy-foreign && ip route add throw 10.65.0.0/26 table 2 && ip route add 10.202.0.0/16 dev dummy-foreign table 2",
    );
    // Shares neither wgmesh's priority nor its mark bits (a rule that does is refused).
    sh("ip rule add pref 98 fwmark 0x1/0x1 lookup 2");
    sh(
        "nft add table inet other && nft add chain inet other c '{ type filter hook input priority 0; }' && nft add table ip wgmesh",
    );
    let snapshot = || {
        sh(
            "ip -d link show dummy-foreign | head -1; ip route show table main; ip route show table 2; ip rule show; ip -6 rule show; nft list table inet other; nft list table ip wgmesh; wg showconf wg-foreign 2>/dev/null || true",
        )
    };
    let before = snapshot();
    let plan = plan_node(&cluster(true), "a").unwrap();
    let mut r = Reconciler::new(open(), own(), ring());
    r.reconcile(&plan).unwrap();
    check_with_tools(&plan);
    let during = snapshot();
    // The only differences: our rule and links appear; nothing foreign changed.
    for line in before.lines() {
        assert!(during.contains(line), "changed while applying: {line}");
    }
    r.reconcile(&NodePlan::empty("a")).unwrap();
    assert_eq!(snapshot(), before);
    reset();
}

/// Issue 11, section 3: a link with the mesh's interface name that wgmesh did not make — a
/// veth with an address, a TUN device without wgmesh's marker, a marked one somebody gave an
/// address — is refused by a dry run and a reconcile (full or empty plan) with an error that
/// names it, and stays exactly as it was.
#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn links_wgmesh_did_not_create_are_refused_and_untouched() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let cases = [
        (
            "dummy-foreign",
            "ip link add dummy-foreign type veth peer name dummy-foreign2 && ip addr add 10.203.0.1/24 dev dummy-foreign && ip link set dummy-foreign up",
            "\"veth\" link",
        ),
        (
            "wg-foreign",
            "ip tuntap add wg-foreign mode tun",
            "does not carry wgmesh's marker",
        ),
        (
            "wg-foreign",
            "ip tuntap add wg-foreign mode tun && ip link set wg-foreign alias wgmesh && ip addr add 10.204.0.1/24 dev wg-foreign",
            "addresses wgmesh did not put there (10.204.0.1/24)",
        ),
    ];
    for (name, make, why) in cases {
        sh(make);
        let snapshot = || {
            sh(&format!(
                "ip -d link show {name} | grep -v 'link/'; ip addr show dev {name}; ip rule show; nft list ruleset"
            ))
        };
        let before = snapshot();
        let cluster = four_nodes(&format!(r#""interface_name": "{name}""#));
        let plan = plan_node(&cluster, "a").unwrap();
        let mut r = Reconciler::new(open(), Ownership::from_mesh(cluster.mesh()), ring());
        for e in [
            r.dry_run(&plan).unwrap_err(),
            r.reconcile(&plan).unwrap_err(),
            r.reconcile(&NodePlan::empty("a")).unwrap_err(),
        ] {
            let text = e.to_string();
            assert!(
                matches!(&e, wgmesh_netlink::Error::ForeignLink { interface, .. } if interface == name),
                "{text}"
            );
            assert!(text.contains(why), "{text}");
        }
        assert_eq!(snapshot(), before, "{name} changed");
        sh_ok(&format!("ip link del {name}"));
    }
    reset();
}

/// Issue 11, section 5: a foreign nftables table of 5,000 rules (`WGMESH_FOREIGN_RULES`) is
/// neither read nor changed
/// by a no-op reconcile (wgmesh dumps only its own tables' rules). The time of the no-op
/// reconcile is printed (a measure, not an assertion; BENCHMARKS.md).
#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn a_big_foreign_nftables_table_is_not_read() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let plan = plan_node(&cluster(true), "a").unwrap();
    let mut r = Reconciler::new(open(), own(), ring());
    r.reconcile(&plan).unwrap();
    let noop = |r: &mut Reconciler<Linux>| {
        let runs = 20;
        let start = std::time::Instant::now();
        for _ in 0..runs {
            assert!(r.reconcile(&plan).unwrap().is_noop());
        }
        start.elapsed() / runs
    };
    let without = noop(&mut r);
    // WGMESH_FOREIGN_RULES sets the size for a measurement (BENCHMARKS.md).
    let rules: u32 = std::env::var("WGMESH_FOREIGN_RULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let mut script = String::from("add table inet other\nadd chain inet other c\n");
    for i in 0..rules {
        script.push_str(&format!(
            "add rule inet other c ip daddr 10.{}.{}.1 counter\n",
            i / 256,
            i % 256
        ));
    }
    let path = std::env::temp_dir().join("wgmesh-foreign-rules.nft");
    std::fs::write(&path, script).unwrap();
    sh(&format!("nft -f {}", path.display()));
    let before = sh("nft list table inet other | sha256sum");
    let with = noop(&mut r);
    assert_eq!(sh("nft list table inet other | sha256sum"), before);
    assert_eq!(
        sh("nft list table inet other | grep -c counter").trim(),
        rules.to_string()
    );
    println!(
        "no-op reconcile: {without:?} without, {with:?} with a foreign table of {rules} rules ({})",
        r.dataplane().backend_description()
    );
    let _ = std::fs::remove_file(path);
    reset();
}

#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn a_hand_made_rule_beside_wgmeshs_goes_in_one_reconcile_and_wgmeshs_stays() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let plan = plan_node(&cluster(true), "a").unwrap();
    let mut r = Reconciler::new(open(), own(), ring());
    converge(&mut r, &plan);
    // Each is listed after wgmesh's rule of the same priority. The first three have selectors
    // (a delete naming only priority and table would take wgmesh's rule); the last has none
    // and no mark, so even its exact delete request matches wgmesh's rule, listed first.
    // (One that differs from wgmesh's only by `not` cannot be made with `ip rule add`, which
    // asks for NLM_F_EXCL: Linux finds it identical. The fake kernel's test covers it.)
    for stray in [
        "ip rule add from 10.0.0.0/8 table 1 priority 99",
        "ip -6 rule add from fd00::/8 table 1 priority 99",
        "ip rule add iif lo table 1 priority 99",
        "ip rule add table 1 priority 99",
    ] {
        sh(stray);
        let report = r.reconcile(&plan).unwrap();
        // Exactly the plan's rules remain (check_with_tools compares `ip rule` line by line).
        check_with_tools(&plan);
        let again = r.reconcile(&plan).unwrap();
        assert!(
            again.is_noop(),
            "{stray}: second run did {:#?}",
            again.operations
        );
        eprintln!(
            "{stray}: {:?}",
            report
                .operations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        );
    }
    reset();
}

#[derive(Debug, Clone)]
enum Drift {
    Port(u16),
    Mark(u32),
    Mtu(u32),
    Down,
    Key,
    ForeignPeer,
    ExtraIp(u8),
    MissingIp,
    StaleRoute(u8),
    Blackhole,
    MissingRoute,
    RuleGone,
    RuleDup,
    RuleChanged,
    NftGone,
    NftAltered,
    LinkGone,
    WrongType,
    Sysctl,
}

fn drift() -> impl Strategy<Value = Drift> {
    prop_oneof![
        (1024u16..60000).prop_map(Drift::Port),
        (1u32..0xffff).prop_map(Drift::Mark),
        (1280u32..1400).prop_map(Drift::Mtu),
        Just(Drift::Down),
        Just(Drift::Key),
        Just(Drift::ForeignPeer),
        any::<u8>().prop_map(Drift::ExtraIp),
        Just(Drift::MissingIp),
        any::<u8>().prop_map(Drift::StaleRoute),
        Just(Drift::Blackhole),
        Just(Drift::MissingRoute),
        Just(Drift::RuleGone),
        Just(Drift::RuleDup),
        Just(Drift::RuleChanged),
        Just(Drift::NftGone),
        Just(Drift::NftAltered),
        Just(Drift::LinkGone),
        Just(Drift::WrongType),
        Just(Drift::Sysctl),
    ]
}

fn apply_drift(d: &Drift) {
    let i = "wireguard.cali";
    let b = key(2).public_key();
    let cmd = match d {
        Drift::Port(p) => format!("wg set {i} listen-port {p}"),
        Drift::Mark(m) => format!("wg set {i} fwmark {m:#x}"),
        Drift::Mtu(m) => format!("ip link set {i} mtu {m}"),
        Drift::Down => format!("ip link set {i} down"),
        Drift::Key => format!(
            "wg set {i} private-key <(echo {})",
            key(77).to_base64().as_str()
        ),
        Drift::ForeignPeer => format!(
            "wg set {i} peer {} allowed-ips 10.99.0.0/24",
            key(78).public_key()
        ),
        Drift::ExtraIp(n) => format!(
            "wg set {i} peer {b} allowed-ips 10.65.0.64/26,10.65.0.5/32,10.0.0.2/32,10.210.{n}.0/24"
        ),
        Drift::MissingIp => format!("wg set {i} peer {b} allowed-ips 10.65.0.64/26"),
        Drift::StaleRoute(n) => format!("ip route add throw 10.211.{n}.0/24 table 1"),
        Drift::Blackhole => "ip route replace blackhole 10.65.0.64/26 table 1".into(),
        Drift::MissingRoute => "ip route del 10.65.0.64/26 table 1".into(),
        Drift::RuleGone => "ip rule del pref 99 table 1".into(),
        Drift::RuleDup => "ip rule add pref 99 not fwmark 0x100000/0x100000 lookup 1".into(),
        Drift::RuleChanged => {
            "ip rule del pref 99 table 1 && ip rule add pref 99 fwmark 0x100000 lookup 1".into()
        }
        Drift::NftGone => "nft delete table inet wgmesh".into(),
        Drift::NftAltered => "nft add rule inet wgmesh prerouting counter".into(),
        Drift::LinkGone => format!("ip link del {i}"),
        // wgmesh's own link of the other kind (a TUN device it made for wireguard-go, or,
        // on the userspace backend, one whose daemon is gone): replaced.
        Drift::WrongType => {
            format!("ip link del {i}; ip tuntap add {i} mode tun && ip link set {i} alias wgmesh")
        }
        Drift::Sysctl => "echo 0 > /proc/sys/net/ipv4/conf/all/src_valid_mark".into(),
    };
    // A drift may not apply after an earlier one (the link is gone): that is fine.
    sh_ok(&cmd);
}

fn drift_cases() -> u32 {
    std::env::var("WGMESH_DRIFT_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: drift_cases(), max_shrink_iters: 8, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    #[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
    fn converges_from_random_drift(drifts in proptest::collection::vec(drift(), 1..5), he in any::<bool>()) {
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let plan = plan_node(&cluster(he), "a").unwrap();
        let mut r = Reconciler::new(open(), own(), ring());
        r.reconcile(&plan).unwrap();
        for d in &drifts {
            apply_drift(d);
        }
        converge(&mut r, &plan);
    }
}

#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn a_fault_at_every_operation_is_repaired_by_the_next_reconcile() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let plan = plan_node(&cluster(true), "a").unwrap();
    let off = NodePlan::empty("a");
    let count = || {
        sh("echo 0 > /proc/sys/net/ipv4/conf/all/src_valid_mark");
        let mut l = open();
        let sysctls: Vec<String> = plan.sysctls.iter().map(|s| s.key.clone()).collect();
        let actual = l.read(&own(), &sysctls).unwrap();
        let opts = wgmesh_netlink::DiffOptions::new(l.link_kind(), ring().public_keys());
        wgmesh_netlink::diff(&plan, &actual, &own(), &opts).len()
    };
    let n = count();
    assert!(n >= 15, "{n}");
    for k in 0..n {
        assert_eq!(count(), n, "every round starts from the same state");
        eprintln!("fault at operation {k} of {n}");
        let mut r = Reconciler::new(FailingDataplane::new(open(), k), own(), ring());
        let e = r.reconcile(&plan).unwrap_err();
        assert!(
            matches!(e, wgmesh_netlink::Error::Operation { index, .. } if index == k),
            "k={k}: {e}"
        );
        r.reconcile(&plan).unwrap();
        check_with_tools(&plan);
        assert!(r.reconcile(&plan).unwrap().is_noop(), "k={k}");
        // Tearing down, with a fault at the same position.
        let mut r = Reconciler::new(FailingDataplane::new(open(), k), own(), ring());
        let _ = r.reconcile(&off);
        r.reconcile(&off).unwrap();
        check_with_tools(&off);
    }
}

#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn one_workload_ip_is_one_peer_update_and_one_route_and_removal_keeps_the_rest() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let c = cluster(false);
    let mut planner = IncrementalPlanner::new(&c, "a");
    let mut r = Reconciler::new(open(), own(), ring());
    r.reconcile(&planner.plan()).unwrap();
    let d = planner
        .apply(Event::WorkloadIpAdded {
            node: "b".into(),
            ip: "10.77.0.9".parse().unwrap(),
        })
        .unwrap();
    let report = r.apply_delta(&d).unwrap();
    assert_eq!(report.operations.len(), 2, "{:#?}", report.operations);
    assert_eq!(report.messages, 2, "one peer update and one route");
    check_with_tools(&planner.plan());
    assert!(r.resync().unwrap().is_noop());
    // Removal: only that IP goes; the peer and its other IPs stay.
    let d = planner
        .apply(Event::WorkloadIpRemoved {
            node: "b".into(),
            ip: "10.77.0.9".parse().unwrap(),
        })
        .unwrap();
    let report = r.apply_delta(&d).unwrap();
    assert!(
        report
            .operations
            .iter()
            .any(|o| matches!(o, Operation::RemoveAllowedIps { .. }))
    );
    assert!(
        !report
            .operations
            .iter()
            .any(|o| matches!(o, Operation::RemovePeer { .. }))
    );
    check_with_tools(&planner.plan());
    assert!(r.resync().unwrap().is_noop());
    let state = r.dataplane_mut().read(&own(), &[]).unwrap();
    eprintln!(
        "per-IP allowed-IP removal supported: {:?}",
        state.remove_allowed_ip_supported
    );
    // An IP that moves between peers is only added to its new peer.
    let d = planner
        .apply(Event::WorkloadIpAdded {
            node: "c".into(),
            ip: "10.65.0.5".parse().unwrap(),
        })
        .unwrap();
    let _ = d;
    reset();
}

/// Node b's side of a tunnel: a second network namespace joined to this one by a veth pair
/// (10.0.0.1 here, 10.0.0.2 there), with a WireGuard device made by `ip` and `wg` (kernel) or
/// wireguard-go (userspace) holding b's key and a as its peer. Removed on drop, also when the
/// test panics.
struct PeerNamespace {
    name: String,
}

const PEER_DEVICE: &str = "wgm-peer";

impl PeerNamespace {
    fn start(backend: Backend) -> Self {
        let ns = Self {
            name: format!("wgmesh-peer-{}", std::process::id()),
        };
        let n = &ns.name;
        sh(&format!(
            "ip netns add {n} && ip -n {n} link set lo up && \
             ip link add wgm-ul type veth peer name wgm-ul netns {n} && \
             ip addr add 10.0.0.1/24 dev wgm-ul && ip link set wgm-ul up && \
             ip -n {n} addr add 10.0.0.2/24 dev wgm-ul && ip -n {n} link set wgm-ul up"
        ));
        match backend {
            Backend::Kernel => sh(&format!("ip -n {n} link add {PEER_DEVICE} type wireguard")),
            _ => sh(&format!("ip netns exec {n} wireguard-go {PEER_DEVICE}")),
        };
        sh(&format!(
            "ip netns exec {n} wg set {PEER_DEVICE} listen-port 51820 private-key <(echo {}) \
               peer {} endpoint 10.0.0.1:51820 allowed-ips 10.65.0.0/26 && \
             ip -n {n} addr add 10.65.0.65/32 dev {PEER_DEVICE} && ip -n {n} link set {PEER_DEVICE} up && \
             ip -n {n} route add 10.65.0.0/26 dev {PEER_DEVICE}",
            key(2).to_base64().as_str(),
            key(1).public_key()
        ));
        ns
    }
}

impl Drop for PeerNamespace {
    fn drop(&mut self) {
        let n = &self.name;
        sh_ok(&format!(
            "for p in $(ip netns pids {n}); do kill $p; done; sleep 0.3; ip netns del {n}; \
             ip link del wgm-ul; ip addr del 10.65.0.1/32 dev lo; rm -f /var/run/wireguard/{PEER_DEVICE}.sock"
        ));
    }
}

fn handshake_seconds(wg_show_latest: &str, peer: &wgmesh_core::PublicKey) -> Option<u64> {
    wg_show_latest.lines().find_map(|l| {
        let (k, t) = l.split_once('\t')?;
        (k == peer.to_string()).then(|| t.trim().parse().ok())?
    })
}

#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn peer_counters_show_the_handshake_and_traffic_of_the_right_peer() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let b_key = key(2).public_key();
    let peer = PeerNamespace::start(backend());
    // Host encryption on: this host's own traffic to b's pods is tunnelled (not marked).
    let plan = plan_node(&cluster(true), "a").unwrap();
    let mut r = Reconciler::new(open(), own(), ring());
    r.reconcile(&plan).unwrap();
    // Before any traffic: every planned peer is there, none has had a handshake or received
    // a byte.
    let planned: BTreeSet<(String, wgmesh_core::PublicKey)> = plan
        .interfaces
        .iter()
        .flat_map(|i| i.peers.iter().map(|p| (i.name.clone(), p.public_key)))
        .collect();
    let before = r.peer_stats().unwrap();
    let listed: BTreeSet<(String, wgmesh_core::PublicKey)> = before
        .iter()
        .map(|s| (s.interface.clone(), s.public_key))
        .collect();
    assert_eq!(listed, planned, "{before:#?}");
    let start = std::time::SystemTime::now();
    sh("ip addr add 10.65.0.1/32 dev lo");
    // Handshakes under emulation can take seconds: wait for the first answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !Command::new("ping")
        .args(["-c", "1", "-W", "2", "-I", "10.65.0.1", "10.65.0.65"])
        .output()
        .expect("run ping (scripts/test-netlink.sh installs iputils-ping)")
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no answer through the tunnel to b; {}",
            sh("wg show all; ip route show table 1; ip rule")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    sh("ping -c 3 -W 2 -I 10.65.0.1 10.65.0.65");
    let stats = r.peer_stats().unwrap();
    let now = std::time::SystemTime::now();
    eprintln!("{stats:#?}");
    let of = |iface: &str, k: &wgmesh_core::PublicKey| {
        stats
            .iter()
            .find(|s| s.interface == iface && s.public_key == *k)
            .unwrap_or_else(|| panic!("no counters for {k} on {iface}: {stats:#?}"))
    };
    let b = of("wireguard.cali", &b_key);
    let at = b.last_handshake.expect("b had a handshake");
    assert!(
        at >= start - std::time::Duration::from_secs(1) && at <= now,
        "handshake at {at:?}, test ran {start:?}..{now:?}"
    );
    // Four echo requests and replies at least, each in a WireGuard data message.
    assert!(b.rx_bytes >= 4 * 84 && b.tx_bytes >= 4 * 84, "{b:?}");
    // The others never reached anyone: no handshake, nothing received.
    for s in stats
        .iter()
        .filter(|s| !(s.interface == "wireguard.cali" && s.public_key == b_key))
    {
        assert_eq!((s.last_handshake, s.rx_bytes), (None, 0), "{s:?}");
    }
    // The same as wg(8) reads them (read after ours: bytes can only have grown).
    let latest = sh("wg show wireguard.cali latest-handshakes");
    let secs = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(handshake_seconds(&latest, &b_key), Some(secs), "{latest}");
    let transfer = sh("wg show wireguard.cali transfer");
    let line = transfer
        .lines()
        .find(|l| l.starts_with(&b_key.to_string()))
        .unwrap_or_else(|| panic!("{transfer}"));
    let n: Vec<u64> = line
        .split('\t')
        .skip(1)
        .map(|v| v.trim().parse().unwrap())
        .collect();
    assert!(
        n[0] >= b.rx_bytes && n[1] >= b.tx_bytes,
        "wg: {line}; ours: {b:?}"
    );
    // Counters are observations: the diff ignores them.
    assert!(r.reconcile(&plan).unwrap().is_noop());
    drop(peer);
    reset();
}

/// The latest handshake with `peer` on `interface`, as the dataplane reports it.
fn handshake_of(
    r: &mut Reconciler<Linux>,
    interface: &str,
    peer: &wgmesh_core::PublicKey,
) -> Option<std::time::SystemTime> {
    r.peer_stats()
        .unwrap()
        .into_iter()
        .find(|s| s.interface == interface && s.public_key == *peer)
        .and_then(|s| s.last_handshake)
}

#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn a_peer_added_to_a_running_device_handshakes_without_traffic() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let b_key = key(2).public_key();
    let wg = "wireguard.cali";
    let peer = PeerNamespace::start(backend());
    // Persistent keepalive off, host encryption off: nothing but a kick makes a handshake.
    let mut c = cluster(false);
    let mut mesh = c.mesh().clone();
    mesh.persistent_keepalive = None;
    c = Cluster::new(mesh, c.nodes().to_vec()).unwrap();
    let mut planner = IncrementalPlanner::new(&c, "a");
    let mut r = Reconciler::new(open(), own(), ring());
    r.reconcile(&planner.plan()).unwrap();
    // The initial configuration of the whole device starts no handshake.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(handshake_of(&mut r, wg, &b_key), None);
    // b leaves and comes back (as on a key change, its peer is removed and added).
    let b_node = c.node("b").unwrap().clone();
    let d = planner
        .apply(Event::NodeRemoved { node: "b".into() })
        .unwrap();
    r.apply_delta(&d).unwrap();
    let start = std::time::SystemTime::now();
    let d = planner.apply(Event::NodeUpserted(b_node)).unwrap();
    let report = r.apply_delta(&d).unwrap();
    assert!(
        report.operations.iter().any(|o| matches!(o, Operation::StartHandshake { interface, public_key } if interface == wg && *public_key == b_key)),
        "{:#?}",
        report.operations
    );
    // No packet is sent to b, yet the handshake completes (under emulation: allow time).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let at = loop {
        if let Some(at) = handshake_of(&mut r, wg, &b_key) {
            break at;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no handshake with b: {}",
            sh("wg show all")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(at >= start - std::time::Duration::from_secs(1), "{at:?}");
    // And the keepalive is the plan's: off (wg showconf shows none).
    check_with_tools(&planner.plan());
    assert!(r.resync().unwrap().is_noop());
    drop(peer);
    reset();
}

fn check_large(plan: &NodePlan) {
    let mut l = open();
    let s = l.read(&own(), &[]).unwrap();
    let dev = &s.devices["wireguard.cali"];
    let i = &plan.interfaces[0];
    assert_eq!(dev.peers.len(), i.peers.len());
    for p in &i.peers {
        let want: BTreeSet<IpNet> = p.allowed_ips.iter().copied().collect();
        assert_eq!(dev.peers[&p.public_key].allowed_ips, want);
    }
    let n_ips: usize = i.peers.iter().map(|p| p.allowed_ips.len()).sum();
    let wg_lines = sh(
        "wg show wireguard.cali allowed-ips | tr '\\t ' '\\n\\n' | grep -cE '^[0-9a-f:.]+/[0-9]+$'",
    );
    assert_eq!(wg_lines.trim(), n_ips.to_string(), "wg show allowed-ips");
    let routes = sh("ip route show table 1 | wc -l");
    assert_eq!(routes.trim(), plan.routes.len().to_string());
}

/// Applies `big_cluster(nodes, ips_per_node)`'s plan from scratch, checks it against wg(8) and
/// ip(8), and checks that a second reconcile does nothing.
fn apply_large(label: &str, nodes: usize, ips_per_node: usize) {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    reset();
    let plan = plan_node(&big_cluster(nodes, ips_per_node), "a").unwrap();
    let mut r = Reconciler::new(open(), own(), ring());
    let t = std::time::Instant::now();
    let report = r.reconcile(&plan).unwrap();
    eprintln!(
        "{label}: {} operations, {} messages, {:?}",
        report.operations.len(),
        report.messages,
        t.elapsed()
    );
    check_large(&plan);
    assert!(r.reconcile(&plan).unwrap().is_noop());
    reset();
}

#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn five_thousand_peers_apply_and_read_back() {
    apply_large("5000 peers", 5_000, 1);
}

#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn one_peer_with_100k_allowed_ips_applies_and_reads_back() {
    apply_large("100k allowed IPs", 2, 100_000);
}

#[test]
#[ignore = "needs root and kernel WireGuard (VM) or wireguard-go (netns); run by scripts/test-netlink.sh"]
fn auto_backend_says_what_it_picked() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let b = backend();
    let l = Linux::open(LinuxConfig::with_backend(Backend::Auto)).unwrap();
    let d = l.backend_description().to_owned();
    eprintln!("auto: {d}");
    let kernel_has_wg = std::env::var("WGMESH_TEST_KERNEL_HAS_WIREGUARD").ok();
    match kernel_has_wg.as_deref() {
        Some("1") => assert!(l.is_kernel() && d.contains("auto"), "{d}"),
        Some("0") => assert!(
            !l.is_kernel() && d.contains("auto found no kernel WireGuard"),
            "{d}"
        ),
        _ => panic!("WGMESH_TEST_KERNEL_HAS_WIREGUARD must be 0 or 1 (backend {b:?})"),
    }
}
