//! The real dataplane: [`wgmesh_netlink::Reconciler`] behind the agent's [`Dataplane`] trait.
//!
//! The agent's full reconciles become `Reconciler::reconcile` (read, pure diff, execute) and
//! its deltas `Reconciler::apply_delta` (no read: one workload address is one peer update and
//! one route). The private keys stay in the reconciler's key ring; the agent only learns their
//! public keys, which it publishes.
//!
//! ```
//! use wgmesh_core::{MeshConfig, NodePlan, PrivateKey, Family};
//! use wgmesh_k8s::dataplane::Dataplane;
//! use wgmesh_k8s::netlink::NetlinkDataplane;
//! use wgmesh_netlink::{KeyRing, Linux, testing::FakeKernel};
//! let key = PrivateKey::from_base64("aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=")?;
//! let public = key.public_key();
//! let kernel = Linux::with_kernel(FakeKernel::new(), Default::default())?;
//! let mut d = NetlinkDataplane::new(kernel, &MeshConfig::default(), KeyRing::single(key));
//! assert_eq!(d.public_key(Family::V4), Some(public));
//! assert_eq!(d.reconcile(&NodePlan::empty("a"))?.operations, 0); // nothing to remove
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::time::Duration;

use wgmesh_core::{Family, MeshConfig, NodePlan, PlanDelta, PublicKey};
use wgmesh_netlink::{KeyRing, Ownership, Reconciler, Report};

use crate::dataplane::{ApplyReport, Dataplane, DataplaneError, PeerStats};

/// A netlink dataplane (the host's kernel, or `wgmesh_netlink::testing::FakeKernel` behind
/// `Linux` in tests).
#[derive(Debug)]
pub struct NetlinkDataplane<D> {
    reconciler: Reconciler<D>,
    keys: [Option<PublicKey>; 2],
}

impl<D: wgmesh_netlink::Dataplane> NetlinkDataplane<D> {
    /// Programs what `mesh` owns on `dataplane`, with the private keys of `keys`.
    pub fn new(dataplane: D, mesh: &MeshConfig, keys: KeyRing) -> Self {
        let public = keys.public_keys();
        Self {
            reconciler: Reconciler::new(dataplane, Ownership::from_mesh(mesh), keys),
            keys: public,
        }
    }

    /// The reconciler.
    pub fn reconciler(&self) -> &Reconciler<D> {
        &self.reconciler
    }

    /// The reconciler, mutably (tests drift the fake kernel through it).
    pub fn reconciler_mut(&mut self) -> &mut Reconciler<D> {
        &mut self.reconciler
    }
}

fn report(r: Report) -> ApplyReport {
    let mut out = ApplyReport::new(r.operations.len());
    out.warnings = r.warnings;
    for op in &r.operations {
        tracing::debug!(operation = %op, "netlink");
    }
    out
}

impl<D: wgmesh_netlink::Dataplane> Dataplane for NetlinkDataplane<D> {
    fn public_key(&self, family: Family) -> Option<PublicKey> {
        self.keys[family.index()]
    }

    fn reconcile(&mut self, plan: &NodePlan) -> Result<ApplyReport, DataplaneError> {
        self.reconciler
            .reconcile(plan)
            .map(report)
            .map_err(|e| DataplaneError::new("netlink reconcile", e))
    }

    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<ApplyReport, DataplaneError> {
        self.reconciler
            .apply_delta(delta)
            .map(report)
            .map_err(|e| DataplaneError::new("netlink delta", e))
    }

    /// Read from the WireGuard devices alone (a device dump per interface: no routes, rules
    /// or nftables).
    fn peer_stats(&mut self) -> Result<Option<Vec<PeerStats>>, DataplaneError> {
        self.reconciler
            .peer_stats()
            .map(Some)
            .map_err(|e| DataplaneError::new("netlink peer counters", e))
    }

    /// Read from wgmesh's nftables table alone.
    fn strict_drops(
        &mut self,
    ) -> Result<Option<wgmesh_netlink::marking::StrictDrops>, DataplaneError> {
        self.reconciler
            .strict_drops()
            .map_err(|e| DataplaneError::new("netlink strict drop counters", e))
    }

    fn next_handshake_check(&self) -> Option<Duration> {
        self.reconciler.next_handshake_check()
    }

    fn check_handshakes(&mut self) -> Result<ApplyReport, DataplaneError> {
        let r = self
            .reconciler
            .check_handshakes()
            .map_err(|e| DataplaneError::new("netlink handshake watchdog", e))?;
        for op in &r.operations {
            if let wgmesh_netlink::Operation::RemovePeer {
                interface,
                public_key,
            } = op
            {
                tracing::info!(%interface, peer = %public_key, "no handshake 1 s after the peer was added: re-added it (crossing initiations)");
            }
        }
        Ok(report(r))
    }
}
