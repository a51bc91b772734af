//! The boundary between the agent and whatever programs the node: the [`Dataplane`] trait, and
//! two implementations that program nothing — the [`RecordingDataplane`] for tests and the
//! [`LoggingDataplane`] for dry runs. The real one, over `wgmesh-netlink`, is
//! [`crate::netlink::NetlinkDataplane`]. All of them speak the core's [`PlanDelta`] and
//! `wgmesh-netlink`'s typed [`Operation`]s: the ones that program nothing count and record the
//! very operations `wgmesh_netlink::delta_operations` would hand the kernel.
//!
//! The agent drives a dataplane with full plans ([`Dataplane::reconcile`]: make the node match,
//! whatever it has) and with deltas against the plan last applied ([`Dataplane::apply_delta`]:
//! the incremental path). A failed call is followed by a full reconcile, so an implementation
//! may leave a half-applied state behind.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use wgmesh_core::{Family, NodePlan, PlanDelta, PublicKey, diff};
use wgmesh_netlink::{DiffOptions, LinkKind, Operation, delta_operations};

/// A dataplane failure. The message never contains key material.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct DataplaneError {
    context: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl DataplaneError {
    /// Wraps an error with what was being done.
    pub fn new(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// What one call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApplyReport {
    /// Operations carried out (0: the node already matched).
    pub operations: usize,
    /// Things worth a look that are not errors.
    pub warnings: Vec<String>,
}

impl ApplyReport {
    /// A report of `operations` operations.
    pub fn new(operations: usize) -> Self {
        Self {
            operations,
            warnings: Vec::new(),
        }
    }
}

/// Traffic counters of one peer, for metrics: `wgmesh-netlink`'s, as its devices report them.
pub use wgmesh_netlink::PeerStats;

/// What programs the node.
///
/// ```
/// use wgmesh_core::{Family, NodePlan, PlanDelta, PublicKey};
/// use wgmesh_k8s::dataplane::{ApplyReport, Dataplane, DataplaneError};
/// /// Counts plans, programs nothing.
/// struct Counter(usize);
/// impl Dataplane for Counter {
///     fn public_key(&self, _: Family) -> Option<PublicKey> { None }
///     fn reconcile(&mut self, _: &NodePlan) -> Result<ApplyReport, DataplaneError> {
///         self.0 += 1;
///         Ok(ApplyReport::default())
///     }
///     fn apply_delta(&mut self, _: &PlanDelta) -> Result<ApplyReport, DataplaneError> {
///         self.0 += 1;
///         Ok(ApplyReport::default())
///     }
/// }
/// let mut d = Counter(0);
/// d.reconcile(&NodePlan::empty("a"))?;
/// assert_eq!(d.0, 1);
/// assert_eq!(d.peer_stats()?, None); // no counters unless implemented
/// # Ok::<(), DataplaneError>(())
/// ```
pub trait Dataplane {
    /// The public key of the private key this dataplane programs into a family's interface:
    /// what the node must publish.
    fn public_key(&self, family: Family) -> Option<PublicKey>;

    /// Makes the node match `plan`, whatever it has now (reads, compares, applies). An empty
    /// plan removes everything the mesh owns.
    fn reconcile(&mut self, plan: &NodePlan) -> Result<ApplyReport, DataplaneError>;

    /// [`Self::reconcile`] of a plan the caller no longer needs, which a dataplane that keeps
    /// the plan it applied can keep without a copy (at 5,000 nodes × 110 pods, one plan of
    /// 560,000 routes less at the agent's peak). By default: `reconcile(&plan)`.
    fn reconcile_owned(&mut self, plan: NodePlan) -> Result<ApplyReport, DataplaneError> {
        self.reconcile(&plan)
    }

    /// Applies a delta computed against the plan last applied (by `reconcile` or earlier
    /// deltas), without reading the node.
    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<ApplyReport, DataplaneError>;

    /// Per-peer counters, if this dataplane can read them (`None` when it cannot).
    fn peer_stats(&mut self) -> Result<Option<Vec<PeerStats>>, DataplaneError> {
        Ok(None)
    }

    /// Strict mode's drop counters, if this dataplane can read them and the filter is
    /// installed (`None` otherwise).
    fn strict_drops(
        &mut self,
    ) -> Result<Option<wgmesh_netlink::marking::StrictDrops>, DataplaneError> {
        Ok(None)
    }

    /// How long until [`Self::check_handshakes`] is due (zero when overdue), or `None` when
    /// nothing waits for it. The netlink dataplane's crossing-initiation watchdog
    /// (`wgmesh_netlink::watchdog`) watches the peers its deltas added.
    fn next_handshake_check(&self) -> Option<Duration> {
        None
    }

    /// Re-adds, once, each peer a delta added that has completed no handshake in time, on
    /// the side of the pair whose key is the smaller (`wgmesh_netlink::watchdog`).
    fn check_handshakes(&mut self) -> Result<ApplyReport, DataplaneError> {
        Ok(ApplyReport::default())
    }

    /// Begins a resync whose long part — reading the node and comparing it with the plan
    /// last applied — runs on another thread ([`BackgroundResync::run`]) while
    /// [`Self::apply_delta`] keeps working; its outcome goes to [`Self::finish_resync`].
    /// `None` (the default): this dataplane cannot, and the agent resyncs with
    /// [`Self::reconcile`].
    fn begin_resync(&mut self) -> Option<Result<BackgroundResync, DataplaneError>> {
        None
    }

    /// Ends a resync begun by [`Self::begin_resync`]: applies the repairs it found, except
    /// on what a delta changed since it began (the delta is newer).
    fn finish_resync(&mut self, outcome: ResyncOutcome) -> Result<ApplyReport, DataplaneError> {
        let _ = outcome;
        Err(DataplaneError::new(
            "resync",
            "this dataplane has no background resync",
        ))
    }

    // Key rotation (`crate::rotation`). A dataplane that cannot rotate keeps the defaults:
    // the agent then never starts one.

    /// When the current private key was made (its file's modification time), if known.
    fn key_since(&self) -> Option<SystemTime> {
        None
    }

    /// The public key of the next private key, if one is kept (made by
    /// [`Self::create_next_key`] and not yet switched to, also across restarts).
    fn next_public_key(&self) -> Option<PublicKey> {
        None
    }

    /// Makes a next private key and keeps it (on disk, mode 0600) before returning its public
    /// key; `Ok(None)` when this dataplane cannot rotate keys.
    fn create_next_key(&mut self) -> Result<Option<PublicKey>, DataplaneError> {
        Ok(None)
    }

    /// Gives the next key up (its file removed).
    fn discard_next_key(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }

    /// Makes the next key the current one (on disk first); the next [`Self::reconcile`]
    /// programs it into the devices, and [`Self::public_key`] returns it from now on.
    fn switch_to_next_key(&mut self) -> Result<(), DataplaneError> {
        Err(DataplaneError::new(
            "key rotation",
            "this dataplane cannot rotate keys",
        ))
    }
}

impl<D: Dataplane + ?Sized> Dataplane for Box<D> {
    fn public_key(&self, family: Family) -> Option<PublicKey> {
        (**self).public_key(family)
    }
    fn reconcile(&mut self, plan: &NodePlan) -> Result<ApplyReport, DataplaneError> {
        (**self).reconcile(plan)
    }
    fn reconcile_owned(&mut self, plan: NodePlan) -> Result<ApplyReport, DataplaneError> {
        (**self).reconcile_owned(plan)
    }
    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<ApplyReport, DataplaneError> {
        (**self).apply_delta(delta)
    }
    fn peer_stats(&mut self) -> Result<Option<Vec<PeerStats>>, DataplaneError> {
        (**self).peer_stats()
    }
    fn strict_drops(
        &mut self,
    ) -> Result<Option<wgmesh_netlink::marking::StrictDrops>, DataplaneError> {
        (**self).strict_drops()
    }

    fn next_handshake_check(&self) -> Option<Duration> {
        (**self).next_handshake_check()
    }
    fn check_handshakes(&mut self) -> Result<ApplyReport, DataplaneError> {
        (**self).check_handshakes()
    }
    fn begin_resync(&mut self) -> Option<Result<BackgroundResync, DataplaneError>> {
        (**self).begin_resync()
    }
    fn finish_resync(&mut self, outcome: ResyncOutcome) -> Result<ApplyReport, DataplaneError> {
        (**self).finish_resync(outcome)
    }
    fn key_since(&self) -> Option<SystemTime> {
        (**self).key_since()
    }
    fn next_public_key(&self) -> Option<PublicKey> {
        (**self).next_public_key()
    }
    fn create_next_key(&mut self) -> Result<Option<PublicKey>, DataplaneError> {
        (**self).create_next_key()
    }
    fn discard_next_key(&mut self) -> Result<(), DataplaneError> {
        (**self).discard_next_key()
    }
    fn switch_to_next_key(&mut self) -> Result<(), DataplaneError> {
        (**self).switch_to_next_key()
    }
}

/// The long part of a resync, to run on another thread ([`Dataplane::begin_resync`]).
///
/// ```
/// use wgmesh_k8s::dataplane::{BackgroundResync, ResyncOutcome};
/// let job = BackgroundResync::new(|| ResyncOutcome::new(42_u32));
/// let outcome = std::thread::spawn(move || job.run()).join().unwrap();
/// assert_eq!(outcome.downcast::<u32>(), Some(42));
/// ```
pub struct BackgroundResync(Box<dyn FnOnce() -> ResyncOutcome + Send>);

impl BackgroundResync {
    /// A job that runs `f`.
    pub fn new(f: impl FnOnce() -> ResyncOutcome + Send + 'static) -> Self {
        Self(Box::new(f))
    }

    /// Runs the job (blocking: it reads the node).
    pub fn run(self) -> ResyncOutcome {
        (self.0)()
    }
}

impl std::fmt::Debug for BackgroundResync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackgroundResync")
    }
}

/// What a [`BackgroundResync`] found, for the dataplane that began it
/// ([`Dataplane::finish_resync`]); opaque to the agent.
pub struct ResyncOutcome(Box<dyn std::any::Any + Send>);

impl ResyncOutcome {
    /// Wraps what the dataplane's job found.
    pub fn new<T: std::any::Any + Send>(found: T) -> Self {
        Self(Box::new(found))
    }

    /// What the job found, if it is a `T`.
    pub fn downcast<T: std::any::Any>(self) -> Option<T> {
        self.0.downcast::<T>().ok().map(|b| *b)
    }
}

impl std::fmt::Debug for ResyncOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResyncOutcome")
    }
}

/// The key files of a [`RecordingDataplane`], in memory, shared between clones: a test
/// "restarts" the agent by building a new dataplane on the same disk. Only public keys are
/// kept (the recording dataplane programs nothing).
///
/// ```
/// use std::time::SystemTime;
/// use wgmesh_core::Family;
/// use wgmesh_k8s::dataplane::{Dataplane, KeyDisk, RecordingDataplane};
/// let disk = KeyDisk::new(SystemTime::UNIX_EPOCH);
/// let mut d = RecordingDataplane::with_key_disk(disk.clone());
/// let next = d.create_next_key()?.unwrap();
/// // A restart finds the next key where the first process left it.
/// let mut again = RecordingDataplane::with_key_disk(disk.clone());
/// assert_eq!(again.next_public_key(), Some(next));
/// again.switch_to_next_key()?;
/// assert_eq!(again.public_key(Family::V4), Some(next));
/// assert_eq!(disk.next(), None);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct KeyDisk(Arc<Mutex<KeyDiskState>>);

#[derive(Debug, Default)]
struct KeyDiskState {
    current: Option<PublicKey>,
    next: Option<PublicKey>,
    since: Option<SystemTime>,
    fail_writes: usize,
    clock: Option<SystemTime>,
}

impl KeyDisk {
    /// A disk with a fresh current key made at `since`.
    pub fn new(since: SystemTime) -> Self {
        let disk = Self::default();
        {
            let mut d = disk.lock();
            d.current = Some(wgmesh_core::PrivateKey::generate().public_key());
            d.since = Some(since);
        }
        disk
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyDiskState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current key.
    pub fn current(&self) -> Option<PublicKey> {
        self.lock().current
    }

    /// The next key, if one is kept.
    pub fn next(&self) -> Option<PublicKey> {
        self.lock().next
    }

    /// Makes the next `n` writes (next key made, switch) fail.
    pub fn fail_writes(&self, n: usize) {
        self.lock().fail_writes = n;
    }

    /// The time a switch records as the new key's birth (default: `SystemTime::now()`).
    pub fn set_clock(&self, now: SystemTime) {
        self.lock().clock = Some(now);
    }

    fn write(&self) -> Result<std::sync::MutexGuard<'_, KeyDiskState>, DataplaneError> {
        let mut d = self.lock();
        if d.fail_writes > 0 {
            d.fail_writes -= 1;
            return Err(DataplaneError::new("key disk", "injected write failure"));
        }
        Ok(d)
    }
}

/// The operations that carry out `delta` on a node that has `node`, as `wgmesh-netlink`
/// executes them (kernel WireGuard links, these public keys), in execution order.
///
/// ```
/// use wgmesh_core::{diff, plan_node, spec::parse_cluster, NodePlan};
/// use wgmesh_k8s::dataplane::operations;
/// use wgmesh_netlink::Operation;
/// let cluster = parse_cluster(r#"{"nodes": [
///   {"name": "a", "addresses": ["10.0.0.1"], "pod_cidrs": ["10.65.0.0/26"],
///    "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
///   {"name": "b", "addresses": ["10.0.0.2"], "pod_cidrs": ["10.65.0.64/26"],
///    "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
/// let plan = plan_node(&cluster, "a")?;
/// let empty = NodePlan::empty("a");
/// let ops = operations(&empty, &diff(&empty, &plan), [None, None]);
/// assert!(matches!(&ops[0], Operation::CreateLink { interface, mtu: 1440, .. } if interface == "wireguard.cali"));
/// assert!(matches!(ops.last(), Some(Operation::AddRule { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn operations(
    node: &NodePlan,
    delta: &PlanDelta,
    keys: [Option<PublicKey>; 2],
) -> Vec<Operation> {
    delta_operations(node, delta, &DiffOptions::new(LinkKind::Wireguard, keys)).into_operations()
}

/// One call the agent made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Call {
    /// A full reconcile to this plan.
    Reconcile(NodePlan),
    /// A delta.
    Delta(PlanDelta),
}

/// A dataplane that programs nothing and records everything: the calls, the plan the node
/// would have, and the `wgmesh-netlink` operations that took it there. Faults can be injected.
///
/// ```
/// use wgmesh_core::{NodePlan, PublicKey, Family};
/// use wgmesh_k8s::dataplane::{Dataplane, RecordingDataplane};
/// let key: PublicKey = "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=".parse()?;
/// let mut d = RecordingDataplane::new(Some(key), None);
/// assert_eq!(d.public_key(Family::V4), Some(key));
/// d.fail_next(1);
/// assert!(d.reconcile(&NodePlan::empty("a")).is_err());
/// assert!(d.reconcile(&NodePlan::empty("a")).is_ok());
/// assert_eq!(d.calls().len(), 2); // failed calls are recorded too
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct RecordingDataplane {
    keys: [Option<PublicKey>; 2],
    calls: Vec<Call>,
    ops: Vec<Operation>,
    node: NodePlan,
    failures: VecDeque<bool>,
    stats: Option<Vec<PeerStats>>,
    disk: Option<KeyDisk>,
}

impl RecordingDataplane {
    /// A dataplane whose interfaces use these keys.
    pub fn new(key: Option<PublicKey>, key_v6: Option<PublicKey>) -> Self {
        Self {
            keys: [key, key_v6],
            ..Self::default()
        }
    }

    /// A dataplane that uses the current key of `disk` for both families and can rotate it.
    pub fn with_key_disk(disk: KeyDisk) -> Self {
        let key = disk.current();
        Self {
            keys: [key, key],
            disk: Some(disk),
            ..Self::default()
        }
    }

    /// Makes the next `n` calls fail (after recording them; a failed call changes nothing).
    pub fn fail_next(&mut self, n: usize) {
        self.failures.extend(std::iter::repeat_n(true, n));
    }

    /// How many of the failures [`Self::fail_next`] asked for are still to come.
    pub fn failures_to_come(&self) -> usize {
        self.failures.iter().filter(|f| **f).count()
    }

    /// Replaces the keys (a node that lost its key file and made a new one).
    pub fn set_keys(&mut self, key: Option<PublicKey>, key_v6: Option<PublicKey>) {
        self.keys = [key, key_v6];
    }

    /// Sets the counters [`Dataplane::peer_stats`] returns.
    pub fn set_stats(&mut self, stats: Option<Vec<PeerStats>>) {
        self.stats = stats;
    }

    /// Every call, in order.
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    /// Every operation performed by successful calls, in order.
    pub fn ops(&self) -> &[Operation] {
        &self.ops
    }

    /// Forgets calls and operations (the node state stays).
    pub fn clear(&mut self) {
        self.calls.clear();
        self.ops.clear();
    }

    /// What the node has now.
    pub fn node(&self) -> &NodePlan {
        &self.node
    }

    /// Changes the node behind the agent's back (drift), as an administrator might.
    pub fn node_mut(&mut self) -> &mut NodePlan {
        &mut self.node
    }

    fn fail(&mut self) -> Result<(), DataplaneError> {
        if self.failures.pop_front().unwrap_or(false) {
            return Err(DataplaneError::new(
                "recording dataplane",
                "injected failure",
            ));
        }
        Ok(())
    }
}

impl Dataplane for RecordingDataplane {
    fn public_key(&self, family: Family) -> Option<PublicKey> {
        self.keys[family.index()]
    }

    fn reconcile(&mut self, plan: &NodePlan) -> Result<ApplyReport, DataplaneError> {
        self.calls.push(Call::Reconcile(plan.clone()));
        self.fail()?;
        let delta = diff(&self.node, plan);
        let ops = operations(&self.node, &delta, self.keys);
        let n = ops.len();
        self.ops.extend(ops);
        self.node = plan.clone();
        Ok(ApplyReport::new(n))
    }

    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<ApplyReport, DataplaneError> {
        self.calls.push(Call::Delta(delta.clone()));
        self.fail()?;
        let ops = operations(&self.node, delta, self.keys);
        let n = ops.len();
        self.ops.extend(ops);
        self.node.apply_delta(delta);
        Ok(ApplyReport::new(n))
    }

    fn peer_stats(&mut self) -> Result<Option<Vec<PeerStats>>, DataplaneError> {
        Ok(self.stats.clone())
    }

    fn key_since(&self) -> Option<SystemTime> {
        self.disk.as_ref().and_then(|d| d.lock().since)
    }

    fn next_public_key(&self) -> Option<PublicKey> {
        self.disk.as_ref().and_then(KeyDisk::next)
    }

    fn create_next_key(&mut self) -> Result<Option<PublicKey>, DataplaneError> {
        let Some(disk) = &self.disk else {
            return Ok(None);
        };
        let key = wgmesh_core::PrivateKey::generate().public_key();
        disk.write()?.next = Some(key);
        Ok(Some(key))
    }

    fn discard_next_key(&mut self) -> Result<(), DataplaneError> {
        if let Some(disk) = &self.disk {
            disk.write()?.next = None;
        }
        Ok(())
    }

    /// Records the switch as one `set device ... private-key` per interface of the node.
    fn switch_to_next_key(&mut self) -> Result<(), DataplaneError> {
        let Some(disk) = &self.disk else {
            return Err(DataplaneError::new("key rotation", "no key disk"));
        };
        let key = {
            let mut d = disk.write()?;
            let Some(next) = d.next.take() else {
                return Err(DataplaneError::new("key rotation", "no next key"));
            };
            d.current = Some(next);
            d.since = Some(d.clock.unwrap_or_else(SystemTime::now));
            next
        };
        self.keys = [Some(key), Some(key)];
        for i in &self.node.interfaces {
            self.ops.push(Operation::ConfigureDevice {
                interface: i.name.clone(),
                set_private_key: Some(i.family),
                listen_port: None,
                firewall_mark: None,
            });
        }
        Ok(())
    }
}

/// A dataplane that programs nothing and logs each plan's summary: for `--dry-run`, and for
/// running the agent where nothing may be changed.
#[derive(Debug, Clone, Default)]
pub struct LoggingDataplane {
    keys: [Option<PublicKey>; 2],
    current: NodePlan,
}

impl LoggingDataplane {
    /// A dry-run dataplane that would program these keys.
    pub fn new(key: Option<PublicKey>, key_v6: Option<PublicKey>) -> Self {
        Self {
            keys: [key, key_v6],
            current: NodePlan::default(),
        }
    }
}

impl Dataplane for LoggingDataplane {
    fn public_key(&self, family: Family) -> Option<PublicKey> {
        self.keys[family.index()]
    }

    fn reconcile(&mut self, plan: &NodePlan) -> Result<ApplyReport, DataplaneError> {
        let delta = diff(&self.current, plan);
        let n = operations(&self.current, &delta, self.keys).len();
        tracing::info!(dry_run = true, operations = n, summary = %delta.summary(), "would reconcile");
        self.current = plan.clone();
        Ok(ApplyReport::new(n))
    }

    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<ApplyReport, DataplaneError> {
        let n = operations(&self.current, delta, self.keys).len();
        tracing::info!(dry_run = true, operations = n, summary = %delta.summary(), "would apply delta");
        self.current.apply_delta(delta);
        Ok(ApplyReport::new(n))
    }
}
