//! The seam between the harness and what programs a node: "apply this node's plan".
//!
//! The harness runs one worker thread per node inside the node's namespace; there it asks an
//! [`ApplierFactory`] for a [`NodeApplier`] and feeds it the node's plans and plan deltas. The
//! tests fill it with wgmesh-netlink's `Reconciler` over its `Linux` dataplane (kernel or
//! userspace WireGuard); anything else that can apply a `NodePlan` plugs in the same way.

use std::path::PathBuf;

use wgmesh_core::{MeshConfig, NodePlan, PlanDelta, PublicKey};

use crate::{Error, Result};

/// Which WireGuard implementation the nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgImpl {
    /// The kernel's (`ip link add … type wireguard`).
    Kernel,
    /// A userspace daemon (wireguard-go) behind a TUN device.
    Userspace,
}

impl WgImpl {
    /// `kernel` or `userspace`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        }
    }
}

impl std::str::FromStr for WgImpl {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            other => Err(format!(
                "unknown backend {other:?}; expected kernel or userspace"
            )),
        }
    }
}

/// What one node's applier is given.
#[derive(Debug, Clone)]
pub struct NodeContext {
    /// The node's name.
    pub node: String,
    /// The mesh settings as this node's agent sees them (its own interface names).
    pub mesh: MeshConfig,
    /// The node's private key files (IPv4 interface, IPv6 interface), mode 0600.
    pub key_files: [PathBuf; 2],
}

/// What applying did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Operations performed (0: the node already matched).
    pub operations: usize,
    /// Messages sent to the kernel or the userspace daemon.
    pub messages: usize,
}

/// Programs one node. Created and used on the node's worker thread, inside its namespace.
pub trait NodeApplier {
    /// Makes the node match `plan` (read, diff, apply).
    fn reconcile(&mut self, plan: &NodePlan) -> Result<Applied>;
    /// Applies a delta made against the plan last applied.
    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<Applied>;
    /// Which implementation it drives, and why.
    fn describe(&self) -> String;
    /// The agent's periodic work between changes, called about every [`TICK`] on the node's
    /// worker thread (the netlink applier: the crossing-initiation watchdog). Returns the
    /// peers it repaired; the default does nothing.
    fn tick(&mut self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// The public keys of the private keys it programs `[IPv4, IPv6]` (what the node's agent
    /// publishes); the default: none.
    fn public_keys(&self) -> [Option<PublicKey>; 2] {
        [None, None]
    }
    /// The switch of a scheduled key rotation, as the agent makes it
    /// (`wgmesh_k8s::netlink::NetlinkDataplane::switch_to_next_key`, then a full reconcile):
    /// each key file that has a next key beside it (`PATH.next`, kept by the harness with
    /// `wgmesh_netlink::keys::write_key` before the rotation was announced) is replaced by it
    /// with one `rename` (`keys::promote`, which reads the key from disk: a restarted applier
    /// finishes a rotation from the file), the applier's keys become the files' keys, and
    /// `plan` is reconciled, which gives the device its new private key. The default refuses.
    fn switch_to_next_keys(&mut self, plan: &NodePlan) -> Result<Applied> {
        let _ = plan;
        Err(Error::new(format!(
            "{} cannot rotate keys",
            self.describe()
        )))
    }
    /// Strict mode's ingress drop counters `[IPv4, IPv6]` as the dataplane reports them;
    /// `None` when the filter is not installed (the default: an applier without one).
    fn strict_drops(&mut self) -> Result<Option<[u64; 2]>> {
        Ok(None)
    }
}

/// How often a node's worker calls [`NodeApplier::tick`].
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Makes a [`NodeApplier`] per node.
pub trait ApplierFactory: Send + Sync {
    /// The WireGuard implementation its appliers drive.
    fn wg(&self) -> WgImpl;
    /// Opens an applier for a node; called on the node's worker thread, inside its namespace.
    fn open(&self, ctx: &NodeContext) -> Result<Box<dyn NodeApplier>>;
}
