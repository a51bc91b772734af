//! Builds a small cluster in network namespaces, meshes it with wgmesh (plans from wgmesh-core,
//! applied by wgmesh-netlink), sends real packets along every flow of the design and prints
//! what crossed each node's underlay. Tears everything down at the end, on failure and on
//! Ctrl-C. Needs root.
//!
//! ```text
//! sudo cargo run --example netns-demo
//! sudo cargo run --example netns-demo -- --route-source cidr_blocks --host-encryption off
//! sudo cargo run --example netns-demo -- --backend userspace --no-ipv6 --hold 30
//! ```
//!
//! Bad arguments exit with code 2 and one line; a failed flow exits with 1.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wgmesh::core::{Family, RouteSource};
use wgmesh_e2e::apply::WgImpl;
use wgmesh_e2e::cluster::{Cluster, Options, ipv6_available};
use wgmesh_e2e::flows;
use wgmesh_e2e::netlink::NetlinkFactory;

const USAGE: &str = "usage: netns-demo [--route-source workload_ips|cidr_blocks] \
[--host-encryption on|off] [--backend auto|kernel|userspace] [--no-ipv6] [--hold SECONDS]";

struct Args {
    route_source: RouteSource,
    host_encryption: bool,
    backend: Option<WgImpl>,
    ipv6: bool,
    hold: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        route_source: RouteSource::WorkloadIps,
        host_encryption: true,
        backend: None,
        ipv6: ipv6_available(),
        hold: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value; {USAGE}"));
        match arg.as_str() {
            "--route-source" => {
                args.route_source = match value("--route-source")?.as_str() {
                    "workload_ips" => RouteSource::WorkloadIps,
                    "cidr_blocks" => RouteSource::CidrBlocks,
                    other => {
                        return Err(format!(
                            "--route-source {other:?}: expected workload_ips or cidr_blocks"
                        ));
                    }
                }
            }
            "--host-encryption" => {
                args.host_encryption = match value("--host-encryption")?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => {
                        return Err(format!("--host-encryption {other:?}: expected on or off"));
                    }
                }
            }
            "--backend" => {
                args.backend = match value("--backend")?.as_str() {
                    "auto" => None,
                    other => Some(
                        other
                            .parse::<WgImpl>()
                            .map_err(|e| format!("--backend: {e}"))?,
                    ),
                }
            }
            "--no-ipv6" => args.ipv6 = false,
            "--hold" => {
                let v = value("--hold")?;
                let secs: u64 = v
                    .parse()
                    .map_err(|_| format!("--hold {v:?}: expected a number of seconds"))?;
                args.hold = Duration::from_secs(secs);
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !wgmesh_e2e::is_root() {
        eprintln!("error: netns-demo creates network namespaces and needs root");
        return ExitCode::from(1);
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> wgmesh_e2e::Result<bool> {
    let (factory, why) = match args.backend {
        Some(wg) => (NetlinkFactory::new(wg), format!("{} (chosen)", wg.as_str())),
        None => NetlinkFactory::auto()?,
    };
    let opts = Options {
        route_source: args.route_source,
        host_encryption: args.host_encryption,
        ipv6: args.ipv6,
        strict_mode: None,
    };
    println!(
        "wgmesh netns-demo: 4 nodes (n4 without WireGuard), route source {}, host encryption {}, WireGuard: {why}",
        args.route_source.as_str(),
        if args.host_encryption { "on" } else { "off" },
    );
    let start = Instant::now();
    let cluster = Cluster::start(opts, Arc::new(factory))?;
    let waited = cluster.wait_mesh(Duration::from_secs(60))?;
    println!(
        "cluster built and every node reconciled in {:.1} s; handshakes done {:.1} s later\n",
        (start.elapsed() - waited).as_secs_f64(),
        waited.as_secs_f64()
    );
    let mut list = flows::standard(Family::V4, args.host_encryption);
    if args.ipv6 {
        list.extend(flows::standard(Family::V6, args.host_encryption));
    }
    let rows = flows::run_all(&cluster, &list)?;
    print!("{}", flows::table(&rows));
    let ok = match flows::check(&rows) {
        Ok(()) => {
            println!("\nall {} flows as designed", rows.len());
            true
        }
        Err(e) => {
            println!("\n{e}");
            false
        }
    };
    if !args.hold.is_zero() {
        println!(
            "holding the cluster for {} s (namespaces: {})",
            args.hold.as_secs(),
            cluster.namespaces().join(" ")
        );
        std::thread::sleep(args.hold);
    }
    let names = cluster.namespaces();
    drop(cluster);
    let left: Vec<String> = wgmesh_e2e::ns::existing()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    if left.is_empty() {
        println!(
            "torn down: {} namespaces (and their links and daemons) removed",
            names.len()
        );
        Ok(ok)
    } else {
        Err(wgmesh_e2e::Error::new(format!(
            "namespaces left behind: {}",
            left.join(" ")
        )))
    }
}
