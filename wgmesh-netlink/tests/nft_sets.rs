//! The phases' interval sets (`plain4`, `plain6`) against the host's nf_tables, without
//! WireGuard: applied over netlink, listed by `nft`, read back equal to what was compiled
//! (so a second reconcile sends nothing), and packets to and from the prefixes marked.
//!
//! `#[ignore]`d: it needs root and a throwaway network namespace. Run it as
//! `unshare -n cargo test -p wgmesh-netlink --test nft_sets -- --ignored`
//! (`scripts/test-netlink.sh` runs it too); there, a missing environment fails the test.

use std::process::Command;

use ipnet::IpNet;
use wgmesh_core::{Marking, MeshConfig};
use wgmesh_netlink::marking::{compile, without_counts};
use wgmesh_netlink::{Backend, Dataplane, KeyRing, Linux, LinuxConfig, Operation, Ownership};

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

fn marking(plain: &[&str]) -> Marking {
    Marking {
        table: Ownership::from_mesh(&MeshConfig::default()).nft_table,
        firewall_mark: 0x100000,
        skip_interfaces: vec!["lo".into()],
        skip_interface_prefixes: vec!["cali".into()],
        mark_arp: false,
        mark_output: false,
        plain_tcp_endpoints: vec![],
        strict: Some(wgmesh_core::StrictFilter {
            interface_v4: Some("wireguard.cali".into()),
            ..Default::default()
        }),
        plain_destinations: plain.iter().map(|p| p.parse::<IpNet>().unwrap()).collect(),
        plain_all: false,
    }
}

/// Packets counted by the probe table's rule `n` (0: marked, 1: not marked).
fn probe_counts() -> (u64, u64) {
    let out = sh("nft list chain inet probe out");
    let counts: Vec<u64> = out
        .lines()
        .filter_map(|l| l.split("counter packets ").nth(1))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    (counts[0], counts[1])
}

/// Whether one ping to `addr` (routed out of a veth) leaves marked.
fn marked(addr: &str) -> bool {
    let before = probe_counts();
    let _ = Command::new("ping")
        .args(["-c", "1", "-W", "0.2", addr])
        .output();
    let after = probe_counts();
    assert_ne!(before, after, "no packet to {addr} was counted");
    after.0 > before.0
}

#[test]
#[ignore = "needs root in a throwaway network namespace: unshare -n cargo test --test nft_sets -- --ignored"]
fn plain_destinations_are_interval_sets_marked_and_read_back() {
    assert_eq!(sh("id -u").trim(), "0", "needs root");
    let own = Ownership::from_mesh(&MeshConfig::default());
    let mut linux =
        Linux::open(LinuxConfig::with_backend(Backend::Userspace)).expect("open netlink");
    let plain = [
        "10.65.3.0/24",
        "10.65.3.7/32", // inside the /24
        "10.65.4.0/25",
        "10.65.4.128/25", // adjacent: one range with the one before
        "10.66.0.9/32",
        "255.255.255.255/32", // the top of the address space: no end element
        "fd10::3/128",
        "fd10::/120",
        "ffff::/16", // the top of the IPv6 space
    ];
    let m = marking(&plain);
    let tables = compile(&m);
    assert_eq!(tables[0].sets.len(), 2);
    linux
        .execute(
            &[Operation::SetMarking {
                tables: tables.clone(),
            }],
            &KeyRing::none(),
        )
        .expect("apply the marking");
    let listed = sh(&format!("nft list table inet {}", m.table));
    for want in [
        "set plain4",
        "flags interval",
        // The /24 and the two /25 after it are adjacent: one range.
        "10.65.3.0-10.65.4.255",
        "10.66.0.9",
        "255.255.255.255",
        "fd10::/120",
        "ffff::/16",
        "ip daddr @plain4 meta mark set meta mark | 0x00100000",
        "ip6 daddr @plain6 meta mark set meta mark | 0x00100000",
        "ip saddr @plain4 return",
        "ip6 saddr @plain6 return",
    ] {
        assert!(listed.contains(want), "{want} in\n{listed}");
    }
    assert!(!listed.contains("10.65.3.7"), "{listed}");
    // Read back as compiled: the diff (which compares exactly this) sends nothing.
    let actual = linux.read(&own, &[]).expect("read back");
    assert_eq!(without_counts(&actual.marking), tables);

    // Packets: a veth routes everything; a probe table after wgmesh's counts
    // the output packets marked and not.
    sh(
        "ip link del probe0 2>/dev/null; ip link add probe0 type veth peer name probe1 && ip link set probe1 up && ip link set probe0 up && ip link set lo up \
        && ip addr add 192.0.2.1/24 dev probe0 && ip -6 addr add 2001:db8::1/64 dev probe0 nodad \
        && ip route add default dev probe0 && ip -6 route add default dev probe0",
    );
    sh(
        "nft add table inet probe && nft add chain inet probe out '{ type filter hook output priority 100; }' \
        && nft add rule inet probe out oifname probe0 meta mark and 0x100000 == 0x100000 counter \
        && nft add rule inet probe out oifname probe0 meta mark and 0x100000 == 0 counter",
    );
    // wgmesh marks output only with an output chain: with plain destinations it has one.
    for (addr, want) in [
        ("10.65.3.1", true),
        ("10.65.3.255", true),
        ("10.65.4.200", true),
        ("10.65.5.0", false),
        ("10.66.0.9", true),
        ("10.66.0.10", false),
        ("10.65.2.255", false),
        ("fd10::3", true),
        ("fd10::ff", true),
        ("fd10::100", false),
        ("ffff::1", true),
        ("fffe::1", false),
    ] {
        assert_eq!(marked(addr), want, "{addr}");
    }

    // A change of the sets is read back too; removing every destination drops the sets.
    let m2 = marking(&["10.65.3.0/24", "0.0.0.0/0"]);
    let tables2 = compile(&m2);
    linux
        .execute(
            &[Operation::SetMarking {
                tables: tables2.clone(),
            }],
            &KeyRing::none(),
        )
        .expect("apply the second marking");
    assert_eq!(
        without_counts(&linux.read(&own, &[]).unwrap().marking),
        tables2
    );
    assert!(marked("10.99.0.1"));
    assert!(!marked("2001:db8::2"));
    let m3 = marking(&[]);
    linux
        .execute(
            &[Operation::SetMarking {
                tables: compile(&m3),
            }],
            &KeyRing::none(),
        )
        .expect("apply the third marking");
    let listed = sh(&format!("nft list table inet {}", m.table));
    assert!(!listed.contains("set plain"), "{listed}");
    assert_eq!(
        without_counts(&linux.read(&own, &[]).unwrap().marking),
        compile(&m3)
    );

    // The `nft -f` script of the same marking loads and lists the same elements.
    sh("nft delete table inet probe");
    sh(&format!("nft delete table inet {}", m.table));
    let path = std::env::temp_dir().join("wgmesh-nft-sets-test.nft");
    std::fs::write(&path, m.nft_script()).unwrap();
    sh(&format!("nft -f {}", path.display()));
    let _ = std::fs::remove_file(&path);
    let scripted = sh(&format!("nft list set inet {} plain4", m.table));
    for want in ["10.65.3.0-10.65.4.255", "10.66.0.9", "255.255.255.255"] {
        assert!(scripted.contains(want), "{want} in\n{scripted}");
    }
    sh(&format!("nft delete table inet {}", m.table));
}

/// The figure of BENCHMARKS.md ("Phases: plain destinations as interval sets"), on the host
/// kernel: 11,000 plain /32s applied as sets and as one rule per prefix and chain (how wgmesh
/// marked them before), each timed over netlink (apply, then a read-back) and by the cost of
/// locally sent UDP packets to an address in none of them (every rule evaluated).
/// `unshare -n cargo test -p wgmesh-netlink --test nft_sets -- --ignored --nocapture measure`
#[test]
#[ignore = "a measurement for BENCHMARKS.md: root in a throwaway network namespace"]
fn measure_eleven_thousand_plain_destinations() {
    use wgmesh_netlink::marking::{Expr, NftChain};
    assert_eq!(sh("id -u").trim(), "0", "needs root");
    let own = Ownership::from_mesh(&MeshConfig::default());
    let mut linux =
        Linux::open(LinuxConfig::with_backend(Backend::Userspace)).expect("open netlink");
    let prefixes: Vec<String> = (0..11_000u32)
        .map(|i| format!("{}/32", std::net::Ipv4Addr::from(0x0a41_0000 + 3 * i)))
        .collect();
    let refs: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    let mut m = marking(&refs);
    m.strict = None;
    let sets = compile(&m);
    let mut rules_per_prefix = compile(&marking(&[]));
    rules_per_prefix[0].chains.truncate(1);
    rules_per_prefix[0].sets.clear();
    let rule = |a: &str| {
        let a: std::net::Ipv4Addr = a.trim_end_matches("/32").parse().unwrap();
        vec![
            Expr::Meta { key: 15, dreg: 1 },
            Expr::Cmp {
                sreg: 1,
                op: 0,
                data: vec![2],
            },
            Expr::Payload {
                dreg: 1,
                base: 1,
                offset: 16,
                len: 4,
            },
            Expr::Cmp {
                sreg: 1,
                op: 0,
                data: a.octets().to_vec(),
            },
            Expr::Meta { key: 3, dreg: 1 },
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                len: 4,
                mask: (!0x100000u32).to_ne_bytes().to_vec(),
                xor: 0x100000u32.to_ne_bytes().to_vec(),
            },
            Expr::MetaSet { key: 3, sreg: 1 },
        ]
    };
    let rules: Vec<Vec<Expr>> = prefixes.iter().map(|a| rule(a)).collect();
    rules_per_prefix[0].chains[0]
        .rules
        .splice(1..1, rules.clone());
    rules_per_prefix[0].chains.push(NftChain {
        name: "output".into(),
        kind: Some("route".into()),
        hook: Some(3),
        priority: Some(-150),
        policy: Some(1),
        rules,
    });
    sh(
        "ip link del probe0 2>/dev/null; ip link add probe0 type veth peer name probe1 && ip link set probe1 up \
        && ip link set probe0 up && ip link set lo up && ip addr add 192.0.2.1/24 dev probe0 \
        && ip route add default dev probe0 \
        && ip neigh add 10.200.0.1 lladdr 02:00:00:00:00:01 dev probe0 nud permanent",
    );
    for (label, tables) in [("sets", &sets), ("rules per prefix", &rules_per_prefix)] {
        let _ = linux.execute(
            &[Operation::DeleteMarking {
                table: m.table.clone(),
            }],
            &KeyRing::none(),
        );
        let start = std::time::Instant::now();
        let applied = linux.execute(
            &[Operation::SetMarking {
                tables: tables.clone(),
            }],
            &KeyRing::none(),
        );
        let apply = start.elapsed();
        if let Err(e) = applied {
            // Rules per prefix: the batch (8 MB, 22,019 acknowledged messages) may not go in.
            println!("11,000 plain /32s as {label}: apply failed after {apply:?}: {e}");
            continue;
        }
        let start = std::time::Instant::now();
        let back = linux.read(&own, &[]).expect("read back");
        let read = start.elapsed();
        if label == "rules per prefix" {
            // Read back without a lookup: the rules are there, the sets are not read.
            assert_eq!(back.marking[0].chains[1].rules.len(), 11_000);
        } else {
            assert_eq!(without_counts(&back.marking), *tables);
        }
        let send = sh("python3 -c '
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = 20000
t = time.perf_counter()
for _ in range(n):
    s.sendto(b\"x\", (\"10.200.0.1\", 9))
print((time.perf_counter() - t) / n * 1e6)
'");
        println!(
            "11,000 plain /32s as {label}: apply {apply:?}, read back {read:?}, \
             {:.1} us per UDP packet sent to an address in none of them",
            send.trim().parse::<f64>().unwrap()
        );
    }
}
