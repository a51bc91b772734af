//! Benchmarks on a real kernel (run inside the qemu VM by `scripts/test-netlink.sh`):
//! wgmesh's initial apply of 2,000 peers × 50 allowed IPs with their routes against
//! `wg setconf` + `ip -batch` (+ `nft -f` and the sysctl) of the identical configuration, and
//! one workload-IP change against `wg syncconf`. Prints `BENCH name=value` lines.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use wgmesh_core::{
    Cluster, Event, IncrementalPlanner, MeshConfig, Node, NodePlan, NodeWireGuard, PrivateKey,
    RouteSource, RouteType, render,
};
use wgmesh_netlink::{Backend, KeyRing, Linux, LinuxConfig, Ownership, Reconciler};

fn sh(cmd: &str) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "`{cmd}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn key(i: u64) -> PrivateKey {
    let mut b = [0u8; 32];
    b[1..9].copy_from_slice(&(i + 1).to_le_bytes());
    b[31] = 0x40;
    PrivateKey::from_bytes(b).unwrap()
}

fn cluster(peers: u32, ips: u32) -> Cluster {
    let mut mesh = MeshConfig::default();
    mesh.route_source = RouteSource::WorkloadIps;
    let mut nodes = vec![
        Node::new("local")
            .with_addresses([IpAddr::from(Ipv4Addr::new(10, 0, 0, 1))])
            .with_wireguard(NodeWireGuard::new(Some(key(0).public_key()), None)),
    ];
    for i in 0..peers {
        let base = 0x6400_0000 + i * 64;
        nodes.push(
            Node::new(format!("n{i:04}"))
                .with_addresses([IpAddr::from(Ipv4Addr::from(0x0a01_0000 + i))])
                .with_wireguard(NodeWireGuard::new(
                    Some(key(u64::from(i) + 1).public_key()),
                    None,
                ))
                .with_workload_ips((0..ips).map(|j| IpAddr::from(Ipv4Addr::from(base + j)))),
        );
    }
    Cluster::new(mesh, nodes).unwrap()
}

fn teardown(own: &Ownership) {
    let mut r = Reconciler::new(
        Linux::open(LinuxConfig::with_backend(Backend::Kernel)).unwrap(),
        own.clone(),
        KeyRing::none(),
    );
    r.reconcile(&NodePlan::empty("local")).unwrap();
}

fn baseline_files(plan: &NodePlan, dir: &std::path::Path) {
    let i = &plan.interfaces[0];
    let mut wg = std::fs::File::create(dir.join("wg.conf")).unwrap();
    wg.write_all(render::setconf(i, Some(&key(0))).as_bytes())
        .unwrap();
    let mut link = std::fs::File::create(dir.join("link.batch")).unwrap();
    writeln!(link, "link add {} type wireguard", i.name).unwrap();
    writeln!(link, "link set {} mtu {} up", i.name, i.mtu).unwrap();
    // The marker wgmesh sets on the links it makes: without it the tools' link is somebody
    // else's, and wgmesh refuses to touch it (ForeignLink).
    writeln!(
        link,
        "link set {} alias {}",
        i.name,
        wgmesh_netlink::LINK_MARKER
    )
    .unwrap();
    let mut b = std::fs::File::create(dir.join("routes.batch")).unwrap();
    for r in &plan.routes {
        match r.kind {
            RouteType::Unicast => writeln!(
                b,
                "route replace {} dev {} table {} proto static scope link",
                r.destination,
                r.device.as_deref().unwrap_or_default(),
                r.table
            ),
            RouteType::Throw => {
                writeln!(
                    b,
                    "route replace throw {} table {} proto static",
                    r.destination, r.table
                )
            }
            RouteType::Blackhole => {
                writeln!(
                    b,
                    "route replace blackhole {} table {} proto static",
                    r.destination, r.table
                )
            }
        }
        .unwrap();
    }
    for r in &plan.rules {
        writeln!(
            b,
            "{}rule add pref {} not fwmark {:#x}/{:#x} lookup {}",
            if r.family == wgmesh_core::Family::V6 {
                "-6 "
            } else {
                ""
            },
            r.priority,
            r.firewall_mark,
            r.firewall_mask,
            r.table
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("nft.conf"),
        plan.marking.as_ref().unwrap().nft_script(),
    )
    .unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore = "needs root and kernel WireGuard: runs in the VM by scripts/test-netlink.sh"]
fn bench_initial_apply_and_one_workload_ip() {
    assert_eq!(
        std::env::var("WGMESH_IN_VM").as_deref(),
        Ok("1"),
        "run in the VM (scripts/test-netlink.sh)"
    );
    let peers: u32 = std::env::var("WGMESH_BENCH_PEERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let ips: u32 = std::env::var("WGMESH_BENCH_IPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let c = cluster(peers, ips);
    let own = Ownership::from_mesh(c.mesh());
    let mut planner = IncrementalPlanner::new(&c, "local");
    let plan = planner.plan();
    assert_eq!(plan.interfaces[0].peers.len(), peers as usize);
    let dir = std::env::temp_dir().join("wgmesh-bench");
    std::fs::create_dir_all(&dir).unwrap();
    baseline_files(&plan, &dir);
    teardown(&own);
    sh("echo 0 > /proc/sys/net/ipv4/conf/all/src_valid_mark");

    // Baseline: the tools, on the identical configuration.
    let d = dir.display();
    let t = Instant::now();
    sh(&format!(
        "ip -batch {d}/link.batch && wg setconf wireguard.cali {d}/wg.conf && ip -batch {d}/routes.batch && nft -f {d}/nft.conf && echo 1 > /proc/sys/net/ipv4/conf/all/src_valid_mark"
    ));
    let tools = t.elapsed();
    // The tools' result is exactly the plan: wgmesh finds nothing to do.
    let mut r = Reconciler::new(
        Linux::open(LinuxConfig::with_backend(Backend::Kernel)).unwrap(),
        own.clone(),
        KeyRing::single(key(0)),
    );
    let check = r.reconcile(&plan).unwrap();
    assert!(
        check.is_noop(),
        "tools and wgmesh disagree: {:#?}",
        &check.operations[..check.operations.len().min(5)]
    );
    drop(r);
    teardown(&own);
    sh("echo 0 > /proc/sys/net/ipv4/conf/all/src_valid_mark");

    // wgmesh: read, diff, execute.
    let mut r = Reconciler::new(
        Linux::open(LinuxConfig::with_backend(Backend::Kernel)).unwrap(),
        own.clone(),
        KeyRing::single(key(0)),
    );
    let t = Instant::now();
    let report = r.reconcile(&plan).unwrap();
    let ours = t.elapsed();
    let t = Instant::now();
    assert!(r.reconcile(&plan).unwrap().is_noop());
    let noop = t.elapsed();
    println!(
        "BENCH peers={peers} allowed_ips_per_peer={ips} routes={}",
        plan.routes.len()
    );
    println!("BENCH initial_tools_ms={:.0}", tools.as_secs_f64() * 1e3);
    println!(
        "BENCH initial_wgmesh_ms={:.0} operations={} messages={}",
        ours.as_secs_f64() * 1e3,
        report.operations.len(),
        report.messages
    );
    println!(
        "BENCH initial_ratio={:.2}",
        ours.as_secs_f64() / tools.as_secs_f64()
    );
    println!(
        "BENCH second_reconcile_noop_ms={:.0}",
        noop.as_secs_f64() * 1e3
    );

    // One workload IP appears on a peer, five times.
    let mut ours = Vec::new();
    let mut msgs = Vec::new();
    let mut tools = Vec::new();
    let mut tools_sync = Vec::new();
    for n in 0..5u32 {
        let ip = IpAddr::from(Ipv4Addr::from(0x6e00_0000 + n));
        let d_ = planner
            .apply(Event::WorkloadIpAdded {
                node: format!("n{:04}", n * 7),
                ip,
            })
            .unwrap();
        let t = Instant::now();
        let rep = r.apply_delta(&d_).unwrap();
        ours.push(t.elapsed());
        msgs.push(rep.messages);
        assert_eq!(rep.operations.len(), 2);
        // Baseline: wg syncconf of the changed configuration (+ the route with ip).
        let ip2 = IpAddr::from(Ipv4Addr::from(0x6f00_0000 + n));
        let d2 = planner
            .apply(Event::WorkloadIpAdded {
                node: format!("n{:04}", n * 7 + 1),
                ip: ip2,
            })
            .unwrap();
        assert!(!d2.is_empty());
        let changed2 = planner.plan();
        std::fs::write(
            dir.join("wg3.conf"),
            render::setconf(&changed2.interfaces[0], Some(&key(0))).as_bytes(),
        )
        .unwrap();
        let t = Instant::now();
        sh(&format!(
            "wg syncconf wireguard.cali {}/wg3.conf",
            dir.display()
        ));
        tools_sync.push(t.elapsed());
        sh(&format!(
            "ip route replace {ip2}/32 dev wireguard.cali table 1 proto static scope link"
        ));
        tools.push(t.elapsed());
        // The tools did exactly that change: a full reconcile to the new plan finds nothing.
        let check = r.reconcile(&changed2).unwrap();
        assert!(check.is_noop(), "{:#?}", check.operations);
    }
    println!(
        "BENCH delta_messages={:?} delta_wgmesh_median_us={:.0}",
        msgs,
        median(ours.clone()).as_secs_f64() * 1e6
    );
    println!(
        "BENCH delta_wg_syncconf_median_us={:.0} delta_wg_syncconf_plus_ip_route_median_us={:.0}",
        median(tools_sync).as_secs_f64() * 1e6,
        median(tools).as_secs_f64() * 1e6
    );
    assert!(msgs.iter().all(|m| *m == 2), "{msgs:?}");
    teardown(&own);
}
