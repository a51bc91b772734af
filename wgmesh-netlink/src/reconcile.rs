//! The reconciler: read → pure diff → execute, over any [`Dataplane`].

use std::time::{Duration, Instant};

use serde::Serialize;
use wgmesh_core::{NodePlan, PlanDelta};

use crate::diff::{DiffOptions, check_ownership, delta_operations, diff};
use crate::error::{Error, Result};
use crate::keys::KeyRing;
use crate::marking::StrictDrops;
use crate::op::Operation;
use crate::state::{ActualState, LinkKind, Ownership, PeerStats};

/// Where operations are carried out: [`crate::Linux`] over the host's kernel (or, with the
/// `testing` feature, over the message-level fake kernel `testing::FakeKernel`), or a wrapper
/// around another dataplane (`testing::FailingDataplane` injects faults,
/// `testing::Recording` keeps what was executed).
pub trait Dataplane {
    /// Reads the state of every object that `own` names (and the sysctls in `sysctls`).
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState>;

    /// Executes `ops` in order. On failure, the operations before the failed one have been
    /// carried out; the error is an [`Error::Operation`] with its index. Returns the number
    /// of messages sent (netlink messages, UAPI requests, sysctl writes).
    fn execute(&mut self, ops: &[Operation], keys: &KeyRing) -> Result<usize>;

    /// The kind of link this dataplane's WireGuard devices are.
    fn link_kind(&self) -> LinkKind;

    /// The traffic counters of every peer of the WireGuard devices with the interface names
    /// `own` names (devices that do not exist have none). Reads only the devices: no routes,
    /// rules or nftables, so it is cheap enough for a metrics scrape.
    fn peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>>;

    /// Strict mode's drop counters in the nftables table `own` names: `None` when the table
    /// has no strict filter (or the dataplane has no tables). Reads only that table.
    fn strict_drops(&mut self, own: &Ownership) -> Result<Option<StrictDrops>> {
        let _ = own;
        Ok(None)
    }
}

impl<D: Dataplane + ?Sized> Dataplane for Box<D> {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        (**self).read(own, sysctls)
    }
    fn execute(&mut self, ops: &[Operation], keys: &KeyRing) -> Result<usize> {
        (**self).execute(ops, keys)
    }
    fn link_kind(&self) -> LinkKind {
        (**self).link_kind()
    }
    fn peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>> {
        (**self).peer_stats(own)
    }
    fn strict_drops(&mut self, own: &Ownership) -> Result<Option<StrictDrops>> {
        (**self).strict_drops(own)
    }
}

impl<D: Dataplane + ?Sized> Dataplane for &mut D {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        (**self).read(own, sysctls)
    }
    fn execute(&mut self, ops: &[Operation], keys: &KeyRing) -> Result<usize> {
        (**self).execute(ops, keys)
    }
    fn link_kind(&self) -> LinkKind {
        (**self).link_kind()
    }
    fn peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>> {
        (**self).peer_stats(own)
    }
    fn strict_drops(&mut self, own: &Ownership) -> Result<Option<StrictDrops>> {
        (**self).strict_drops(own)
    }
}

/// What one reconcile or delta application did.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// The operations performed (or, for a dry run, that would be).
    pub operations: Vec<Operation>,
    /// Messages sent to the kernel or daemon.
    pub messages: usize,
    /// Whether this was a dry run (nothing changed).
    pub dry_run: bool,
    /// Time spent, in microseconds.
    pub micros: u64,
    /// Things worth a look that are not errors (a key that differs from the published one…).
    pub warnings: Vec<String>,
}

impl Report {
    /// Whether nothing had to change.
    pub fn is_noop(&self) -> bool {
        self.operations.is_empty()
    }

    /// Time spent.
    pub fn duration(&self) -> Duration {
        Duration::from_micros(self.micros)
    }
}

/// Keeps a node's dataplane equal to its plan.
///
/// ```
/// use wgmesh_netlink::{Linux, Reconciler, Ownership, KeyRing, testing::FakeKernel};
/// use wgmesh_core::{plan_node, spec::parse_cluster, PrivateKey};
/// let key = PrivateKey::from_base64("aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=")?;
/// let cluster = parse_cluster(r#"{"nodes":[
///   {"name":"a","addresses":["10.0.0.1"],"pod_cidrs":["10.65.0.0/26"],
///    "wireguard":{"public_key":"lDWQTjn07Ve0LXsUpK+8QpVnt+LEsDBTad9yiHJu0Ww="}},
///   {"name":"b","addresses":["10.0.0.2"],"pod_cidrs":["10.65.0.64/26"],
///    "wireguard":{"public_key":"/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
/// let plan = plan_node(&cluster, "a")?;
/// let kernel = Linux::with_kernel(FakeKernel::new(), Default::default())?;
/// let mut r = Reconciler::new(kernel, Ownership::from_mesh(cluster.mesh()), KeyRing::single(key));
/// assert!(!r.reconcile(&plan)?.is_noop());
/// assert!(r.reconcile(&plan)?.is_noop()); // idempotent
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Reconciler<D> {
    dataplane: D,
    ownership: Ownership,
    keys: KeyRing,
    current: Option<NodePlan>,
    dirty: bool,
}

impl<D: Dataplane> Reconciler<D> {
    /// A reconciler of the objects `ownership` names, programming `keys`.
    pub fn new(dataplane: D, ownership: Ownership, keys: KeyRing) -> Self {
        Self {
            dataplane,
            ownership,
            keys,
            current: None,
            dirty: true,
        }
    }

    /// The dataplane.
    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// The dataplane, mutably (tests drift it).
    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dataplane
    }

    /// What wgmesh owns.
    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    /// The plan last applied (by [`Self::reconcile`] or [`Self::apply_delta`]).
    pub fn current_plan(&self) -> Option<&NodePlan> {
        self.current.as_ref()
    }

    /// Whether the dataplane may differ from [`Self::current_plan`] (never reconciled, or a
    /// run failed): call [`Self::resync`].
    pub fn needs_resync(&self) -> bool {
        self.dirty
    }

    fn options(&self) -> DiffOptions {
        DiffOptions::new(self.dataplane.link_kind(), self.keys.public_keys())
    }

    fn warnings(&self, plan: &NodePlan) -> Vec<String> {
        plan.interfaces
            .iter()
            .filter_map(|i| {
                let ours = self.keys.public_key(i.family)?;
                let published = i.public_key?;
                (ours != published).then(|| {
                    format!(
                        "{}: the private key's public key {ours} differs from the published {published}; peers will not accept this node until it is republished",
                        i.name
                    )
                })
            })
            .collect()
    }

    /// Reads the dataplane and returns what [`Self::reconcile`] would do, changing nothing.
    /// A link under one of the mesh's (or the plan's) interface names that wgmesh did not
    /// make is refused ([`check_ownership`]: [`Error::ForeignLink`]), here and in
    /// [`Self::dry_run`] and [`Self::reconcile`].
    pub fn plan_operations(&mut self, plan: &NodePlan) -> Result<Vec<Operation>> {
        let sysctls: Vec<String> = plan.sysctls.iter().map(|s| s.key.clone()).collect();
        let actual = self.dataplane.read(&self.ownership, &sysctls)?;
        // Before touching anything: nobody else may use wgmesh's mark, table or priority.
        if let Some(rule) = plan.rules.first()
            && let Some(collision) = crate::neighbours::collisions(
                rule.firewall_mark,
                rule.priority,
                rule.table,
                &actual.foreign_rules,
            )
            .into_iter()
            .next()
        {
            return Err(Error::Collision { collision });
        }
        check_ownership(
            &actual,
            &self.ownership,
            plan.interfaces.iter().map(|i| i.name.as_str()),
        )?;
        Ok(diff(plan, &actual, &self.ownership, &self.options()).into_operations())
    }

    /// Reports what a reconcile would do without doing it.
    pub fn dry_run(&mut self, plan: &NodePlan) -> Result<Report> {
        let start = Instant::now();
        let operations = self.plan_operations(plan)?;
        Ok(Report {
            operations,
            messages: 0,
            dry_run: true,
            micros: start.elapsed().as_micros() as u64,
            warnings: self.warnings(plan),
        })
    }

    /// Makes the dataplane match `plan`: read, diff, execute. A second call with the same plan
    /// performs no operation. An empty plan removes everything wgmesh owns.
    pub fn reconcile(&mut self, plan: &NodePlan) -> Result<Report> {
        let start = Instant::now();
        self.dirty = true;
        let operations = self.plan_operations(plan)?;
        let messages = if operations.is_empty() {
            0
        } else {
            self.dataplane.execute(&operations, &self.keys)?
        };
        self.current = Some(plan.clone());
        self.dirty = false;
        Ok(Report {
            operations,
            messages,
            dry_run: false,
            micros: start.elapsed().as_micros() as u64,
            warnings: self.warnings(plan),
        })
    }

    /// Applies a delta made against [`Self::current_plan`] without reading the dataplane
    /// (the incremental path). The current plan then includes the delta, also when executing
    /// failed; after a failure, [`Self::needs_resync`] is true and [`Self::resync`] repairs.
    pub fn apply_delta(&mut self, delta: &PlanDelta) -> Result<Report> {
        let start = Instant::now();
        let options = self.options();
        let Some(current) = self.current.as_mut() else {
            return Err(Error::NoBasePlan);
        };
        let operations = delta_operations(current, delta, &options).into_operations();
        let result = if operations.is_empty() {
            Ok(0)
        } else {
            self.dataplane.execute(&operations, &self.keys)
        };
        // Fold the delta in place (no copy of a big plan), whatever happened.
        current.apply_delta(delta);
        match result {
            Ok(messages) => Ok(Report {
                operations,
                messages,
                dry_run: false,
                micros: start.elapsed().as_micros() as u64,
                warnings: Vec::new(),
            }),
            Err(e) => {
                self.dirty = true;
                Err(e)
            }
        }
    }

    /// A full reconcile against the current plan (the one deltas were folded into): repairs
    /// drift and failed runs. Does nothing (no read) before the first plan.
    pub fn resync(&mut self) -> Result<Report> {
        match self.current.clone() {
            Some(plan) => self.reconcile(&plan),
            None => Ok(Report::default()),
        }
    }

    /// The traffic counters of every peer of wgmesh's WireGuard devices (latest handshake,
    /// bytes received and sent), read from the devices alone: no reconcile, no diff.
    pub fn peer_stats(&mut self) -> Result<Vec<PeerStats>> {
        self.dataplane.peer_stats(&self.ownership)
    }

    /// Strict mode's drop counters (packets dropped by the ingress filter, per family), read
    /// from wgmesh's nftables table alone; `None` when strict mode's filter is not installed.
    pub fn strict_drops(&mut self) -> Result<Option<StrictDrops>> {
        self.dataplane.strict_drops(&self.ownership)
    }

    /// Gives the dataplane back.
    pub fn into_dataplane(self) -> D {
        self.dataplane
    }
}
