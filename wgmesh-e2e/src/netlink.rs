//! The seam filled by wgmesh-netlink: each node's applier is a `Reconciler` over the `Linux`
//! dataplane opened inside the node's namespace, with the node's private keys loaded from its
//! key files (`keys::load`, which refuses files that others can read).
//!
//! Kernel WireGuard is driven over generic netlink; userspace WireGuard through wireguard-go's
//! configuration socket, the daemon being started by the dataplane itself (from the node's
//! worker thread, so it runs in the node's namespace).

use std::path::PathBuf;

use wgmesh_core::{NodePlan, PlanDelta, PrivateKey, PublicKey};
use wgmesh_netlink::{
    Backend, KeyRing, Linux, LinuxConfig, Operation, Ownership, Reconciler, Report, keys,
};

use crate::apply::{Applied, ApplierFactory, NodeApplier, NodeContext, WgImpl};
use crate::{Error, Result};

/// Opens a wgmesh-netlink reconciler per node.
#[derive(Debug, Clone, Copy)]
pub struct NetlinkFactory {
    wg: WgImpl,
}

impl NetlinkFactory {
    /// Appliers that drive this WireGuard implementation.
    pub fn new(wg: WgImpl) -> Self {
        Self { wg }
    }

    /// What wgmesh-netlink's `auto` picks on this host: the kernel when it has WireGuard, else
    /// userspace; with its reason.
    pub fn auto() -> Result<(Self, String)> {
        let linux = Linux::open(LinuxConfig::with_backend(Backend::Auto))
            .map_err(|e| Error::new(format!("opening the dataplane: {e}")))?;
        let wg = if linux.is_kernel() {
            WgImpl::Kernel
        } else {
            WgImpl::Userspace
        };
        Ok((Self::new(wg), linux.backend_description().to_owned()))
    }

    /// The implementation to test: `WGMESH_E2E_BACKEND` (`kernel` or `userspace`) when set;
    /// else `kernel` inside the VM harness (`WGMESH_IN_VM=1`) and `userspace` elsewhere.
    pub fn from_env() -> Result<Self> {
        let wg = match std::env::var("WGMESH_E2E_BACKEND") {
            Ok(s) => s.parse::<WgImpl>().map_err(Error::new)?,
            Err(_) if std::env::var_os("WGMESH_IN_VM").is_some() => WgImpl::Kernel,
            Err(_) => WgImpl::Userspace,
        };
        Ok(Self::new(wg))
    }
}

struct NetlinkApplier {
    reconciler: Reconciler<Linux>,
    /// Whether [`NodeApplier::tick`] runs the crossing-initiation watchdog
    /// (`WGMESH_E2E_WATCHDOG=off` turns it off, to measure without it).
    watchdog: bool,
    /// The node's key files `[IPv4, IPv6]` (rotation promotes `PATH.next` over them).
    key_files: [PathBuf; 2],
}

/// The key in `path`, if the file exists (a node without WireGuard has none).
fn load_key(node: &str, path: &std::path::Path) -> Result<Option<PrivateKey>> {
    if !path.exists() {
        return Ok(None);
    }
    keys::load(path)
        .map(Some)
        .map_err(|e| Error::new(format!("node {node}: {e}")))
}

/// Whether the agents run the crossing-initiation watchdog: yes unless
/// `WGMESH_E2E_WATCHDOG=off` (BENCHMARKS.md measures the change table both ways).
pub fn watchdog_enabled() -> bool {
    std::env::var("WGMESH_E2E_WATCHDOG").map_or(true, |v| v != "off")
}

fn applied(report: &Report) -> Applied {
    Applied {
        operations: report.operations.len(),
        messages: report.messages,
    }
}

impl NodeApplier for NetlinkApplier {
    fn reconcile(&mut self, plan: &NodePlan) -> Result<Applied> {
        self.reconciler
            .reconcile(plan)
            .map(|r| applied(&r))
            .map_err(|e| Error::new(e.to_string()))
    }

    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<Applied> {
        self.reconciler
            .apply_delta(delta)
            .map(|r| applied(&r))
            .map_err(|e| Error::new(e.to_string()))
    }

    fn describe(&self) -> String {
        self.reconciler.dataplane().backend_description().to_owned()
    }

    fn public_keys(&self) -> [Option<PublicKey>; 2] {
        self.reconciler.public_keys()
    }

    fn switch_to_next_keys(&mut self, plan: &NodePlan) -> Result<Applied> {
        let node = plan.node.clone();
        let mut ring = [None, None];
        for (slot, path) in ring.iter_mut().zip(&self.key_files) {
            let next = keys::next_key_path(path);
            *slot = if next.exists() {
                Some(
                    keys::promote(&next, path)
                        .map_err(|e| Error::new(format!("node {node}: key rotation: {e}")))?,
                )
            } else {
                load_key(&node, path)?
            };
        }
        let [v4, v6] = ring;
        self.reconciler.set_keys(KeyRing::per_family(v4, v6));
        self.reconcile(plan)
    }

    fn strict_drops(&mut self) -> Result<Option<[u64; 2]>> {
        self.reconciler
            .strict_drops()
            .map(|d| d.map(|d| [d.ingress_v4, d.ingress_v6]))
            .map_err(|e| Error::new(e.to_string()))
    }

    fn tick(&mut self) -> Result<Vec<String>> {
        if !self.watchdog || self.reconciler.next_handshake_check().is_none() {
            return Ok(Vec::new());
        }
        let report = self
            .reconciler
            .check_handshakes()
            .map_err(|e| Error::new(e.to_string()))?;
        Ok(report
            .operations
            .iter()
            .filter_map(|o| match o {
                Operation::RemovePeer {
                    interface,
                    public_key,
                } => Some(format!("{interface} {public_key}")),
                _ => None,
            })
            .collect())
    }
}

impl ApplierFactory for NetlinkFactory {
    fn wg(&self) -> WgImpl {
        self.wg
    }

    fn open(&self, ctx: &NodeContext) -> Result<Box<dyn NodeApplier>> {
        let backend = match self.wg {
            WgImpl::Kernel => Backend::Kernel,
            WgImpl::Userspace => Backend::Userspace,
        };
        let linux = Linux::open(LinuxConfig::with_backend(backend))
            .map_err(|e| Error::new(format!("node {}: opening the dataplane: {e}", ctx.node)))?;
        let load = |i: usize| load_key(&ctx.node, &ctx.key_files[i]);
        let ring = KeyRing::per_family(load(0)?, load(1)?);
        Ok(Box::new(NetlinkApplier {
            reconciler: Reconciler::new(linux, Ownership::from_mesh(&ctx.mesh), ring),
            watchdog: watchdog_enabled(),
            key_files: ctx.key_files.clone(),
        }))
    }
}
