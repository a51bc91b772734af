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

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use wgmesh_core::{Family, MeshConfig, NodePlan, PlanDelta, PrivateKey, PublicKey};
use wgmesh_netlink::{KeyRing, Ownership, Reconciler, Report, keys};

use crate::dataplane::{
    ApplyReport, BackgroundResync, Dataplane, DataplaneError, PeerStats, ResyncOutcome,
};

/// A netlink dataplane (the host's kernel, or `wgmesh_netlink::testing::FakeKernel` behind
/// `Linux` in tests).
#[derive(Debug)]
pub struct NetlinkDataplane<D> {
    reconciler: Reconciler<D>,
    keys: [Option<PublicKey>; 2],
    key_file: Option<KeyFile>,
}

/// The key file of a rotating dataplane, and the next key kept beside it.
struct KeyFile {
    path: PathBuf,
    since: Option<SystemTime>,
    next: Option<PrivateKey>,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("path", &self.path)
            .field("next", &self.next.as_ref().map(PrivateKey::public_key))
            .finish()
    }
}

fn key_error(doing: &str, e: wgmesh_netlink::Error) -> DataplaneError {
    DataplaneError::new(format!("key rotation: {doing}"), e)
}

impl<D: wgmesh_netlink::Dataplane> NetlinkDataplane<D> {
    /// Programs what `mesh` owns on `dataplane`, with the private keys of `keys`.
    pub fn new(dataplane: D, mesh: &MeshConfig, keys: KeyRing) -> Self {
        let public = keys.public_keys();
        Self {
            reconciler: Reconciler::new(dataplane, Ownership::from_mesh(mesh), keys),
            keys: public,
            key_file: None,
        }
    }

    /// Programs the key in `path` (read, or made when absent, by
    /// [`wgmesh_netlink::keys::load_or_generate`]) for both families, and can rotate it: the
    /// next key lives in `PATH.next` ([`wgmesh_netlink::keys::next_key_path`], mode 0600) from
    /// the moment it is made until it replaces the key file with one `rename`. A next key
    /// left by an earlier run is picked up, so a rotation survives a restart.
    ///
    /// ```
    /// # use std::os::unix::fs::DirBuilderExt as _;
    /// # let dir = std::env::temp_dir().join(format!("wgmesh-doc-nl-{}", std::process::id()));
    /// # std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    /// use wgmesh_core::{Family, MeshConfig};
    /// use wgmesh_k8s::dataplane::Dataplane;
    /// use wgmesh_k8s::netlink::NetlinkDataplane;
    /// use wgmesh_netlink::{Linux, testing::FakeKernel};
    /// let path = dir.join("private-key");
    /// let kernel = || Linux::with_kernel(FakeKernel::new(), Default::default());
    /// let mut d = NetlinkDataplane::with_key_file(kernel()?, &MeshConfig::default(), &path)?;
    /// let next = d.create_next_key()?.unwrap();
    /// // A restart finds the next key; the switch makes it the key.
    /// let mut d = NetlinkDataplane::with_key_file(kernel()?, &MeshConfig::default(), &path)?;
    /// assert_eq!(d.next_public_key(), Some(next));
    /// d.switch_to_next_key()?;
    /// assert_eq!(d.public_key(Family::V4), Some(next));
    /// assert_eq!(wgmesh_netlink::keys::load(&path)?.public_key(), next);
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_key_file(
        dataplane: D,
        mesh: &MeshConfig,
        path: &Path,
    ) -> Result<Self, wgmesh_netlink::Error> {
        let (key, _) = keys::load_or_generate(path)?;
        let next_path = keys::next_key_path(path);
        let next = if next_path.exists() {
            Some(keys::load(&next_path)?)
        } else {
            None
        };
        let since = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut d = Self::new(dataplane, mesh, KeyRing::single(key));
        d.key_file = Some(KeyFile {
            path: path.to_owned(),
            since,
            next,
        });
        Ok(d)
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

    fn reconcile_owned(&mut self, plan: NodePlan) -> Result<ApplyReport, DataplaneError> {
        self.reconciler
            .reconcile_owned(plan)
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

    /// Reads and diffs through a second handle on the kernel (new netlink sockets):
    /// `wgmesh_netlink::Reconciler::begin_resync`.
    fn begin_resync(&mut self) -> Option<Result<BackgroundResync, DataplaneError>> {
        match self.reconciler.begin_resync() {
            Ok(Some(job)) => Some(Ok(BackgroundResync::new(move || {
                ResyncOutcome::new(job.run())
            }))),
            Ok(None) => None,
            Err(e) => Some(Err(DataplaneError::new("netlink resync", e))),
        }
    }

    fn finish_resync(&mut self, outcome: ResyncOutcome) -> Result<ApplyReport, DataplaneError> {
        let Some(found) = outcome.downcast::<wgmesh_netlink::ResyncFound>() else {
            return Err(DataplaneError::new(
                "netlink resync",
                "the outcome of another dataplane's resync",
            ));
        };
        let r = self
            .reconciler
            .finish_resync(found)
            .map_err(|e| DataplaneError::new("netlink resync", e))?;
        if r.skipped > 0 {
            tracing::debug!(
                skipped = r.skipped,
                "resync: left out repairs of what changed meanwhile (deltas, or a device changing under every dump)"
            );
        }
        Ok(report(r))
    }

    fn key_since(&self) -> Option<SystemTime> {
        self.key_file.as_ref().and_then(|k| k.since)
    }

    fn next_public_key(&self) -> Option<PublicKey> {
        self.key_file
            .as_ref()
            .and_then(|k| k.next.as_ref().map(PrivateKey::public_key))
    }

    fn create_next_key(&mut self) -> Result<Option<PublicKey>, DataplaneError> {
        let Some(file) = &mut self.key_file else {
            return Ok(None);
        };
        let key = PrivateKey::generate();
        keys::write_key(&keys::next_key_path(&file.path), &key)
            .map_err(|e| key_error("keep the next key", e))?;
        let public = key.public_key();
        file.next = Some(key);
        Ok(Some(public))
    }

    fn discard_next_key(&mut self) -> Result<(), DataplaneError> {
        if let Some(file) = &mut self.key_file {
            keys::remove_key(&keys::next_key_path(&file.path))
                .map_err(|e| key_error("remove the next key", e))?;
            file.next = None;
        }
        Ok(())
    }

    fn switch_to_next_key(&mut self) -> Result<(), DataplaneError> {
        let Some(file) = &mut self.key_file else {
            return Err(DataplaneError::new("key rotation", "no key file to rotate"));
        };
        let key = keys::promote(&keys::next_key_path(&file.path), &file.path)
            .map_err(|e| key_error("make the next key the key", e))?;
        file.next = None;
        file.since = std::fs::metadata(&file.path)
            .and_then(|m| m.modified())
            .ok();
        let ring = KeyRing::single(key);
        self.keys = ring.public_keys();
        self.reconciler.set_keys(ring);
        Ok(())
    }
}
