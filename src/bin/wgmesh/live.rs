//! The kernel's actual state against a node's plan, read-only: what `status` and `why --live`
//! report as drift. A dry run of the reconciler: it reads links, devices, routes, rules,
//! sysctls and wgmesh's nftables tables, and lists what an apply would change; nothing is
//! changed and no key is generated.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use wgmesh::core::{Cluster, NodePlan, PublicKey, plan_node};
use wgmesh::netlink::keys::{DEFAULT_PRIVATE_KEY_FILE, load};
use wgmesh::netlink::{
    Backend, Dataplane as _, KeyRing, Linux, LinuxConfig, Ownership, PeerStats, Reconciler,
};

use crate::shared::Failure;

/// How to reach this host's dataplane.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LiveArgs {
    /// Which WireGuard to read: the kernel's, wireguard-go's, or the kernel's when it has it.
    #[arg(long, value_name = "auto|kernel|userspace", env = "WGMESH_BACKEND", default_value = "auto", value_parser = parse_backend)]
    pub(crate) backend: Backend,
    /// The node's private key file: with it, a device key that differs counts as drift.
    #[arg(long, value_name = "FILE", env = "WGMESH_PRIVATE_KEY_FILE", default_value = DEFAULT_PRIVATE_KEY_FILE)]
    pub(crate) private_key: PathBuf,
}

pub(crate) fn parse_backend(text: &str) -> Result<Backend, String> {
    text.parse().map_err(String::from)
}

/// What the host has, compared with the plan.
pub(crate) struct Live {
    /// Which WireGuard implementation was read.
    pub(crate) backend: String,
    /// What an apply would change, one line per operation; empty when the host matches (or
    /// when there was no plan to compare with).
    pub(crate) drift: Vec<String>,
    /// Every peer's counters.
    pub(crate) stats: Vec<PeerStats>,
    /// Every peer's endpoint, by interface and key.
    pub(crate) endpoints: HashMap<(String, PublicKey), SocketAddr>,
}

fn key_ring(path: &Path) -> KeyRing {
    // Unreadable (not root, absent): compare everything but the device's own key.
    load(path).map(KeyRing::single).unwrap_or_default()
}

/// Reads this host's WireGuard devices and, given a plan, what an apply of it would change.
pub(crate) fn read(
    cluster: &Cluster,
    plan: Option<&NodePlan>,
    args: &LiveArgs,
) -> Result<Live, Failure> {
    let failed = |e: wgmesh::netlink::Error| Failure::Runtime(e.to_string());
    let linux = Linux::open(LinuxConfig::with_backend(args.backend)).map_err(failed)?;
    let backend = linux.backend_description().to_owned();
    let own = Ownership::from_mesh(cluster.mesh());
    let mut r = Reconciler::new(linux, own.clone(), key_ring(&args.private_key));
    let drift = match plan {
        Some(plan) => r.dry_run(plan).map_err(failed)?.operations,
        None => Vec::new(),
    };
    let stats = r.peer_stats().map_err(failed)?;
    let state = r.dataplane_mut().read(&own, &[]).map_err(failed)?;
    let endpoints = state
        .devices
        .iter()
        .flat_map(|(name, d)| {
            d.peers
                .iter()
                .filter_map(move |(k, p)| Some(((name.clone(), *k), p.endpoint?)))
        })
        .collect();
    Ok(Live {
        backend,
        drift: drift.iter().map(ToString::to_string).collect(),
        stats,
        endpoints,
    })
}

/// Reads this host's state and compares it with `node`'s plan in `cluster`.
pub(crate) fn check(cluster: &Cluster, node: &str, args: &LiveArgs) -> Result<Live, Failure> {
    let plan = plan_node(cluster, node).map_err(|e| Failure::Input(e.to_string()))?;
    read(cluster, Some(&plan), args)
}
