//! The reconciler: read → pure diff → execute, over any [`Dataplane`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::Serialize;
use wgmesh_core::{NodePlan, PlanDelta, PublicKey, Route};

use crate::diff::{
    DiffOptions, PlannedRoutes, check_ownership, delta_operations, diff_with_routes,
};
use crate::error::{Error, Result};
use crate::keys::KeyRing;
use crate::marking::StrictDrops;
use crate::op::{Operation, PeerChange};
use crate::state::{ActualState, LinkKind, Ownership, PeerStats};
use crate::watchdog::{HandshakeWatchdog, Readd};

/// Where operations are carried out: [`crate::Linux`] over the host's kernel (or, with the
/// `testing` feature, over the message-level fake kernel `testing::FakeKernel`), or a wrapper
/// around another dataplane (`testing::FailingDataplane` injects faults,
/// `testing::Recording` keeps what was executed).
pub trait Dataplane {
    /// Reads the state of every object that `own` names (and the sysctls in `sysctls`).
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState>;

    /// [`Self::read`], offering each route of the mesh table to `take` as it is read: the
    /// routes it takes (`true`) are left out of the state. The reconciler takes the routes
    /// that are as planned — all of them in a steady state, 560,000 at 5,000 nodes × 110
    /// pods — so that a reconcile holds only the drift. The default reads everything, then
    /// offers; [`crate::Linux`] offers each route as its message comes.
    ///
    /// ```
    /// use wgmesh_netlink::{Dataplane, Linux, Ownership, testing::FakeKernel};
    /// let mut l = Linux::with_kernel(FakeKernel::new(), Default::default())?;
    /// let own = Ownership::from_mesh(&Default::default());
    /// let mut offered = 0;
    /// let state = l.read_with(&own, &[], &mut |_| { offered += 1; true })?;
    /// assert!(state.routes.is_empty() && offered == 0); // an empty host
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    fn read_with(
        &mut self,
        own: &Ownership,
        sysctls: &[String],
        take: &mut dyn FnMut(&crate::ActualRoute) -> bool,
    ) -> Result<ActualState> {
        let mut state = self.read(own, sysctls)?;
        state.routes.retain(|r| !take(r));
        Ok(state)
    }

    /// Executes `ops` in order. On failure, the operations before the failed one have been
    /// carried out, and none after it except those already sent with it ([`crate::Linux`]
    /// sends a change in pieces of [`LinuxConfig::execute_chunk`](crate::LinuxConfig)
    /// requests, pipelined, and sends no piece after a failed one); the error is an
    /// [`Error::Operation`] with its index. Returns the number of messages sent (netlink
    /// messages, UAPI requests, sysctl writes).
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

    /// Another handle on the same dataplane, for [`Dataplane::read`] on another thread while
    /// this one keeps executing ([`Reconciler::begin_resync`]). `None` (the default): there
    /// is none, and resyncs read through this handle.
    fn open_reader(&mut self) -> Option<Result<Box<dyn Dataplane + Send>>> {
        None
    }
}

impl<D: Dataplane + ?Sized> Dataplane for Box<D> {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        (**self).read(own, sysctls)
    }
    fn read_with(
        &mut self,
        own: &Ownership,
        sysctls: &[String],
        take: &mut dyn FnMut(&crate::ActualRoute) -> bool,
    ) -> Result<ActualState> {
        (**self).read_with(own, sysctls, take)
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
    fn open_reader(&mut self) -> Option<Result<Box<dyn Dataplane + Send>>> {
        (**self).open_reader()
    }
}

impl<D: Dataplane + ?Sized> Dataplane for &mut D {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        (**self).read(own, sysctls)
    }
    fn read_with(
        &mut self,
        own: &Ownership,
        sysctls: &[String],
        take: &mut dyn FnMut(&crate::ActualRoute) -> bool,
    ) -> Result<ActualState> {
        (**self).read_with(own, sysctls, take)
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
    fn open_reader(&mut self) -> Option<Result<Box<dyn Dataplane + Send>>> {
        (**self).open_reader()
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
    /// Operations a background resync found but left out, because a delta changed their
    /// object after its snapshot ([`Reconciler::finish_resync`]).
    pub skipped: usize,
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
    /// `keys`' public keys, computed once per key ring (not per delta).
    public: [Option<PublicKey>; 2],
    current: Option<NodePlan>,
    /// Route changes of deltas not yet folded into `current.routes`: the route each
    /// destination now has (`None`: removed). A plan's routes are one sorted vector (560,000
    /// at 5,000 nodes × 110 pods); patching it in place moved half of it per route changed,
    /// which was most of the agent's CPU under pod churn. Folded in one pass every
    /// `fold_at` changes, and before the plan is read.
    routes_pending: HashMap<IpNet, Option<Route>>,
    /// While a background resync's snapshot may hold them: `current`'s routes (then
    /// `current.routes` is empty), shared with the snapshot instead of copied into it, so
    /// that taking it costs no copy of 560,000 routes on the event loop. Put back by the
    /// next fold, without a copy once the job has dropped its share.
    routes_shared: Option<Arc<Vec<Route>>>,
    dirty: bool,
    watchdog: HandshakeWatchdog,
    origin: Instant,
    /// Counts full reconciles and key changes: a background resync begun before the last
    /// one is stale.
    generation: u64,
    /// While a background resync is out: what changed on the dataplane since its snapshot.
    touched: Option<Touched>,
}

/// What deltas (and handshake repairs) changed since a background resync took its
/// snapshot: its operations on these objects are left out, never undoing a newer change.
#[derive(Debug, Default)]
struct Touched {
    routes: HashSet<IpNet>,
    peers: HashSet<(String, PublicKey)>,
    /// Something else changed (an interface, a rule, a sysctl, the marking) or an
    /// execution failed: the whole resync is dropped.
    all: bool,
}

impl Touched {
    fn record(&mut self, delta: &PlanDelta) {
        let d = delta;
        if !(d.interfaces_removed.is_empty()
            && d.interfaces_added.is_empty()
            && d.interfaces_changed.is_empty()
            && d.rules_removed.is_empty()
            && d.rules_added.is_empty()
            && d.sysctls_removed.is_empty()
            && d.sysctls_added.is_empty()
            && d.marking == Default::default())
        {
            self.all = true;
        }
        let routes = d.routes_removed.iter().chain(&d.routes_added);
        self.routes.extend(routes.map(|r| r.destination));
        let peers = (d.peers_removed.iter().map(|p| (&p.interface, p.public_key)))
            .chain(
                d.peers_added
                    .iter()
                    .map(|p| (&p.interface, p.peer.public_key)),
            )
            .chain(d.peers_updated.iter().map(|p| (&p.interface, p.public_key)));
        self.peers.extend(peers.map(|(i, k)| (i.clone(), k)));
    }

    /// Whether `op` acts on something changed since the snapshot.
    fn covers(&self, op: &Operation) -> bool {
        match op {
            Operation::AddRoute { route } => self.routes.contains(&route.destination),
            Operation::DeleteRoute { route } => self.routes.contains(&route.destination),
            op => op
                .peer()
                .is_some_and(|(i, k)| self.peers.contains(&(i.to_owned(), *k))),
        }
    }
}

/// The part of a resync that takes long — reading the dataplane and diffing it against a
/// snapshot of the plan — made to run on another thread while the reconciler keeps applying
/// deltas ([`Reconciler::begin_resync`]). [`ResyncJob::run`] gives what
/// [`Reconciler::finish_resync`] needs.
pub struct ResyncJob {
    reader: Box<dyn Dataplane + Send>,
    /// The snapshot, without its routes: they are `routes`, shared with the reconciler.
    plan: NodePlan,
    routes: Arc<Vec<Route>>,
    ownership: Ownership,
    options: DiffOptions,
    generation: u64,
    started: Instant,
}

impl std::fmt::Debug for ResyncJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResyncJob")
            .field("generation", &self.generation)
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

/// What a [`ResyncJob`] found: the operations that repair the dataplane as it was read,
/// against the plan as it was when the job began.
#[derive(Debug)]
pub struct ResyncFound {
    operations: Result<Vec<Operation>>,
    /// Devices whose every dump a change interrupted ([`ActualState::interrupted`]): their
    /// peers as read may lack some, so their peer repairs are left out.
    unsure: Vec<String>,
    generation: u64,
    started: Instant,
}

impl ResyncJob {
    /// Reads the dataplane through the second handle and diffs it against the snapshot.
    pub fn run(mut self) -> ResyncFound {
        let mut unsure = Vec::new();
        let operations = read_and_diff_noting(
            &mut *self.reader,
            &self.ownership,
            &self.options,
            &self.plan,
            &self.routes,
            &mut unsure,
        );
        let (generation, started) = (self.generation, self.started);
        // The reconciler takes its routes back without a copy once this share is gone.
        drop(self);
        ResyncFound {
            operations,
            unsure,
            generation,
            started,
        }
    }
}

/// `routes` with `pending` folded in (each destination there: its routes replaced by the
/// pending route, or removed), sorted by destination as a plan's routes are.
///
/// One merge of the sorted pending changes into the sorted routes: at 560,000 routes and
/// 35,000 changes it took 32–47 ms of the event loop as a hash lookup per route and a sort
/// (measured with timing spans in `begin_resync`, 5,000 nodes × 110 pods); routes not sorted
/// by destination take that old way.
fn fold(mut routes: Vec<Route>, pending: HashMap<IpNet, Option<Route>>) -> Vec<Route> {
    if !routes.is_sorted_by_key(|r| r.destination) {
        routes.retain(|r| !pending.contains_key(&r.destination));
        routes.extend(pending.into_values().flatten());
        routes.sort_by_key(|r| r.destination);
        return routes;
    }
    let mut changes: Vec<(IpNet, Option<Route>)> = pending.into_iter().collect();
    changes.sort_unstable_by_key(|(d, _)| *d);
    let mut out = Vec::with_capacity(routes.len() + changes.len());
    let mut changes = changes.into_iter().peekable();
    // The destination of the last change taken: its other old routes go too.
    let mut replaced: Option<IpNet> = None;
    for r in routes {
        while let Some((d, new)) = changes.next_if(|(d, _)| *d <= r.destination) {
            replaced = Some(d);
            out.extend(new);
        }
        if replaced != Some(r.destination) {
            out.push(r);
        }
    }
    out.extend(changes.filter_map(|(_, new)| new));
    out
}

fn read_and_diff<D: Dataplane + ?Sized>(
    dataplane: &mut D,
    ownership: &Ownership,
    options: &DiffOptions,
    plan: &NodePlan,
    routes: &[Route],
) -> Result<Vec<Operation>> {
    read_and_diff_noting(dataplane, ownership, options, plan, routes, &mut Vec::new())
}

/// [`read_and_diff`], noting in `interrupted` the devices whose every dump was interrupted.
fn read_and_diff_noting<D: Dataplane + ?Sized>(
    dataplane: &mut D,
    ownership: &Ownership,
    options: &DiffOptions,
    plan: &NodePlan,
    routes: &[Route],
    interrupted: &mut Vec<String>,
) -> Result<Vec<Operation>> {
    let sysctls: Vec<String> = plan.sysctls.iter().map(|s| s.key.clone()).collect();
    let mut table = PlannedRoutes::new(routes);
    let actual = dataplane.read_with(ownership, &sysctls, &mut |a| table.take(a))?;
    interrupted.clone_from(&actual.interrupted);
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
        ownership,
        plan.interfaces.iter().map(|i| i.name.as_str()),
    )?;
    Ok(diff_with_routes(plan, table, &actual, ownership, options).into_operations())
}

impl<D: Dataplane> Reconciler<D> {
    /// A reconciler of the objects `ownership` names, programming `keys`.
    pub fn new(dataplane: D, ownership: Ownership, keys: KeyRing) -> Self {
        Self {
            dataplane,
            ownership,
            public: keys.public_keys(),
            keys,
            current: None,
            routes_pending: HashMap::new(),
            routes_shared: None,
            dirty: true,
            watchdog: HandshakeWatchdog::default(),
            origin: Instant::now(),
            generation: 0,
            touched: None,
        }
    }

    /// Replaces the private keys (a key rotation): the next [`Self::reconcile`] programs them
    /// into the devices (`set device ... private-key`). The plan the dataplane is believed to
    /// match is forgotten, so that reconcile reads the devices first.
    ///
    /// ```
    /// use wgmesh_core::{Family, MeshConfig, PrivateKey};
    /// use wgmesh_netlink::{KeyRing, Linux, Ownership, Reconciler, testing::FakeKernel};
    /// let kernel = Linux::with_kernel(FakeKernel::new(), Default::default())?;
    /// let mut r = Reconciler::new(kernel, Ownership::from_mesh(&MeshConfig::default()), KeyRing::none());
    /// let key = PrivateKey::generate();
    /// let public = key.public_key();
    /// r.set_keys(KeyRing::single(key));
    /// assert_eq!(r.public_keys(), [Some(public), Some(public)]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_keys(&mut self, keys: KeyRing) {
        self.public = keys.public_keys();
        self.keys = keys;
        self.dirty = true;
        self.generation += 1;
    }

    /// The public keys of the private keys this reconciler programs, per family.
    pub fn public_keys(&self) -> [Option<PublicKey>; 2] {
        self.public
    }

    /// Replaces the crossing-initiation watchdog (for example one with another timeout);
    /// peers watched so far are forgotten. See [`Self::check_handshakes`].
    pub fn set_watchdog(&mut self, watchdog: HandshakeWatchdog) {
        self.watchdog = watchdog;
    }

    /// The crossing-initiation watchdog: the peers added by deltas that wait for a first
    /// handshake, on the side that acts for them.
    pub fn watchdog(&self) -> &HandshakeWatchdog {
        &self.watchdog
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
    pub fn current_plan(&mut self) -> Option<&NodePlan> {
        self.fold_routes();
        self.current.as_ref()
    }

    /// Folds the pending route changes into the current plan's routes: one merge of the
    /// sorted changes into them ([`fold`]).
    /// Routes shared with a resync's snapshot are put back first: moved when the job has
    /// dropped its share, else copied (less the changed ones) — the copy a snapshot used to
    /// make at once, now made only when the routes are needed while a job still runs.
    fn fold_routes(&mut self) {
        let pending = std::mem::take(&mut self.routes_pending);
        let Some(current) = self.current.as_mut() else {
            self.routes_shared = None;
            return;
        };
        if let Some(shared) = self.routes_shared.take() {
            current.routes = match Arc::try_unwrap(shared) {
                Ok(routes) => routes,
                Err(shared) => shared
                    .iter()
                    .filter(|r| !pending.contains_key(&r.destination))
                    .cloned()
                    .collect(),
            };
        }
        if pending.is_empty() {
            return;
        }
        current.routes = fold(std::mem::take(&mut current.routes), pending);
    }

    /// Takes the routes back from a finished resync's snapshot when nothing else holds
    /// them (a move, no copy); otherwise they stay shared until the next fold.
    fn unshare_routes(&mut self) {
        let Some(shared) = self.routes_shared.take() else {
            return;
        };
        match (Arc::try_unwrap(shared), self.current.as_mut()) {
            (Ok(routes), Some(current)) => current.routes = routes,
            (Ok(_), None) => {}
            (Err(shared), _) => self.routes_shared = Some(shared),
        }
    }

    /// How many routes the current plan has (before the pending changes).
    fn route_count(&self) -> usize {
        match (&self.routes_shared, &self.current) {
            (Some(shared), _) => shared.len(),
            (None, Some(current)) => current.routes.len(),
            (None, None) => 0,
        }
    }

    /// Whether the dataplane may differ from [`Self::current_plan`] (never reconciled, or a
    /// run failed): call [`Self::resync`].
    pub fn needs_resync(&self) -> bool {
        self.dirty
    }

    fn options(&self) -> DiffOptions {
        DiffOptions::new(self.dataplane.link_kind(), self.public)
    }

    fn warnings(&self, plan: &NodePlan) -> Vec<String> {
        plan.interfaces
            .iter()
            .filter_map(|i| {
                let ours = self.public[i.family.index()]?;
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
        let options = self.options();
        read_and_diff(
            &mut self.dataplane,
            &self.ownership,
            &options,
            plan,
            &plan.routes,
        )
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
            skipped: 0,
        })
    }

    /// Makes the dataplane match `plan`: read, diff, execute. A second call with the same plan
    /// performs no operation. An empty plan removes everything wgmesh owns.
    pub fn reconcile(&mut self, plan: &NodePlan) -> Result<Report> {
        self.reconcile_cow(std::borrow::Cow::Borrowed(plan))
    }

    /// [`Self::reconcile`] of a plan the caller no longer needs: it becomes the current plan
    /// as it is, where [`Self::reconcile`] keeps a copy (at 5,000 nodes × 110 pods a second
    /// plan of 560,000 routes alive at the agent's peak of memory).
    ///
    /// ```
    /// use wgmesh_netlink::{Linux, Reconciler, Ownership, KeyRing, testing::FakeKernel};
    /// use wgmesh_core::{plan_node, spec::parse_cluster};
    /// let cluster = parse_cluster(r#"{"nodes":[
    ///   {"name":"a","addresses":["10.0.0.1"],"pod_cidrs":["10.65.0.0/26"]},
    ///   {"name":"b","addresses":["10.0.0.2"],"pod_cidrs":["10.65.0.64/26"]}]}"#)?;
    /// let plan = plan_node(&cluster, "a")?;
    /// let kernel = Linux::with_kernel(FakeKernel::new(), Default::default())?;
    /// let mut r = Reconciler::new(kernel, Ownership::from_mesh(cluster.mesh()), KeyRing::none());
    /// r.reconcile_owned(plan.clone())?;
    /// assert_eq!(r.current_plan(), Some(&plan));
    /// assert!(r.reconcile(&plan)?.is_noop());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reconcile_owned(&mut self, plan: NodePlan) -> Result<Report> {
        self.reconcile_cow(std::borrow::Cow::Owned(plan))
    }

    fn reconcile_cow(&mut self, plan: std::borrow::Cow<'_, NodePlan>) -> Result<Report> {
        let start = Instant::now();
        self.dirty = true;
        self.generation += 1;
        let operations = self.plan_operations(&plan)?;
        let messages = if operations.is_empty() {
            0
        } else {
            self.dataplane.execute(&operations, &self.keys)?
        };
        let warnings = self.warnings(&plan);
        self.current = Some(plan.into_owned());
        self.routes_pending.clear();
        self.routes_shared = None;
        self.dirty = false;
        Ok(Report {
            operations,
            messages,
            dry_run: false,
            micros: start.elapsed().as_micros() as u64,
            warnings,
            skipped: 0,
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
        if let Some(touched) = &mut self.touched {
            touched.record(delta);
        }
        let result = if operations.is_empty() {
            Ok(0)
        } else {
            self.dataplane.execute(&operations, &self.keys)
        };
        // Fold the delta in place (no copy of a big plan), whatever happened; its routes
        // later, many at a time (see `routes_pending`).
        if delta.routes_added.is_empty() && delta.routes_removed.is_empty() {
            current.apply_delta(delta);
        } else {
            current.apply_delta_except_routes(delta);
            // In the order `NodePlan::apply_delta` patches: removals, then additions.
            for r in &delta.routes_removed {
                self.routes_pending.insert(r.destination, None);
            }
            for r in &delta.routes_added {
                self.routes_pending.insert(r.destination, Some(r.clone()));
            }
            let fold_at = (self.route_count() / 16).max(256);
            // While a resync's snapshot shares the routes, folding would copy them all:
            // wait for it to end, up to four times as many changes.
            let fold_at = if self.routes_shared.is_some() {
                fold_at * 4
            } else {
                fold_at
            };
            if self.routes_pending.len() >= fold_at {
                self.fold_routes();
            }
        }
        let now = self.origin.elapsed();
        for i in &delta.interfaces_removed {
            self.watchdog.forget_interface(&i.name);
        }
        for p in &delta.peers_removed {
            self.watchdog.forget(&p.interface, &p.public_key);
        }
        if result.is_ok() {
            for p in &delta.peers_added {
                if let Some(own) = options.public_keys[p.family.index()] {
                    self.watchdog
                        .watch(&p.interface, &own, &p.peer.public_key, now);
                }
            }
        }
        match result {
            Ok(messages) => Ok(Report {
                operations,
                messages,
                dry_run: false,
                micros: start.elapsed().as_micros() as u64,
                warnings: Vec::new(),
                skipped: 0,
            }),
            Err(e) => {
                self.dirty = true;
                if let Some(touched) = &mut self.touched {
                    touched.all = true;
                }
                Err(e)
            }
        }
    }

    /// Begins a resync that reads and diffs on another thread: takes a snapshot of the
    /// current plan and a second handle on the dataplane ([`Dataplane::open_reader`]). Run
    /// the job anywhere ([`ResyncJob::run`]) while deltas keep coming through
    /// [`Self::apply_delta`], then hand its result to [`Self::finish_resync`], which executes
    /// the repairs except those on objects a delta changed meanwhile.
    ///
    /// `Ok(None)`: there is no plan yet, the dataplane needs a resync on this handle
    /// ([`Self::needs_resync`]), or it has no second handle — call [`Self::resync`].
    ///
    /// ```
    /// use wgmesh_core::{plan_node, spec::parse_cluster, PrivateKey};
    /// use wgmesh_netlink::{KeyRing, Linux, Ownership, Reconciler, testing::{FakeKernel, SharedKernel}};
    /// let key = PrivateKey::from_base64("aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=")?;
    /// let cluster = parse_cluster(r#"{"nodes":[
    ///   {"name":"a","addresses":["10.0.0.1"],"pod_cidrs":["10.65.0.0/26"],
    ///    "wireguard":{"public_key":"lDWQTjn07Ve0LXsUpK+8QpVnt+LEsDBTad9yiHJu0Ww="}},
    ///   {"name":"b","addresses":["10.0.0.2"],"pod_cidrs":["10.65.0.64/26"],
    ///    "wireguard":{"public_key":"/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
    /// let plan = plan_node(&cluster, "a")?;
    /// assert!(!plan.routes.is_empty());
    /// let kernel = SharedKernel::new(FakeKernel::new());
    /// let linux = Linux::with_kernel(kernel.handle(), Default::default())?;
    /// let mut r = Reconciler::new(linux, Ownership::from_mesh(cluster.mesh()), KeyRing::single(key));
    /// r.reconcile(&plan)?;
    /// kernel.kernel().routes.clear(); // drift
    /// let job = r.begin_resync()?.expect("a second handle");
    /// let found = std::thread::spawn(move || job.run()).join().unwrap();
    /// assert!(!r.finish_resync(found)?.is_noop()); // repaired
    /// assert!(r.reconcile(&plan)?.is_noop());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn begin_resync(&mut self) -> Result<Option<ResyncJob>> {
        // A dataplane that may differ from the plan in ways deltas touch (a failed run, never
        // reconciled) gets the whole resync, on this handle.
        if self.current.is_none() || self.dirty {
            return Ok(None);
        }
        let Some(reader) = self.dataplane.open_reader() else {
            return Ok(None);
        };
        let reader = reader?;
        let Some(current) = self.current.as_mut() else {
            return Ok(None);
        };
        // The routes are shared, not copied (560,000 at 5,000 nodes × 110 pods: copying them
        // here held the event loop for up to 2 s); the rest of the plan is copied (3–7 ms).
        // The route changes not folded yet are not folded here either (that took 32–47 ms
        // of the loop, most of this call): the snapshot has the routes as they were before
        // them, so its repairs on their destinations are left out as a newer delta's are.
        let routes = match &self.routes_shared {
            Some(shared) => shared.clone(),
            None => {
                let routes = Arc::new(std::mem::take(&mut current.routes));
                self.routes_shared = Some(routes.clone());
                routes
            }
        };
        let plan = current.clone();
        self.generation += 1;
        self.touched = Some(Touched {
            routes: self.routes_pending.keys().copied().collect(),
            ..Touched::default()
        });
        Ok(Some(ResyncJob {
            reader,
            plan,
            routes,
            ownership: self.ownership.clone(),
            options: self.options(),
            generation: self.generation,
            started: Instant::now(),
        }))
    }

    /// Ends a resync begun by [`Self::begin_resync`]: executes the repairs it found, except
    /// those on a route or peer that a delta changed since its snapshot (the delta's change
    /// is newer; drift there is left to the next resync), and those on the peers of a device
    /// that changed during every dump of it (the read may lack peers: [`ActualState::interrupted`]). The whole result is dropped —
    /// nothing executed, [`Report::skipped`] counts it — when a full reconcile or a key
    /// change came in between, or a delta changed an interface, rule, sysctl or the marking,
    /// or an execution failed: then [`Self::needs_resync`] says whether to resync again.
    pub fn finish_resync(&mut self, found: ResyncFound) -> Result<Report> {
        self.unshare_routes();
        let touched = if found.generation == self.generation {
            self.touched.take()
        } else {
            None
        };
        let operations = found.operations?;
        let Some(touched) = touched.filter(|t| !t.all) else {
            return Ok(Report {
                skipped: operations.len(),
                micros: found.started.elapsed().as_micros() as u64,
                ..Report::default()
            });
        };
        let total = operations.len();
        let unsure = |op: &Operation| {
            op.peer()
                .is_some_and(|(i, _)| found.unsure.iter().any(|u| u == i))
        };
        let operations: Vec<Operation> = operations
            .into_iter()
            .filter(|op| !touched.covers(op) && !unsure(op))
            .collect();
        let skipped = total - operations.len();
        let messages = if operations.is_empty() {
            0
        } else {
            self.dirty = true;
            self.dataplane.execute(&operations, &self.keys)?
        };
        self.dirty = false;
        let warnings = match &self.current {
            Some(plan) => self.warnings(plan),
            None => Vec::new(),
        };
        Ok(Report {
            operations,
            messages,
            dry_run: false,
            micros: found.started.elapsed().as_micros() as u64,
            warnings,
            skipped,
        })
    }

    /// A full reconcile against the current plan (the one deltas were folded into): repairs
    /// drift and failed runs. Does nothing (no read) before the first plan.
    pub fn resync(&mut self) -> Result<Report> {
        self.fold_routes();
        match self.current.clone() {
            Some(plan) => self.reconcile_owned(plan),
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

    /// The crossing-initiation repair (see [`crate::watchdog`]): for every peer a delta added
    /// that has had no completed handshake for the watchdog's timeout, and for which this
    /// node acts (its key is the smaller), removes the peer and adds it again as planned,
    /// then starts a handshake (when its keepalive is off) — once per add. Call it about
    /// every 100 ms while [`Self::next_handshake_check`] is `Some`; with nothing watched it
    /// returns an empty report without touching the dataplane.
    pub fn check_handshakes(&mut self) -> Result<Report> {
        let now = self.origin.elapsed();
        self.check_handshakes_at(now)
    }

    /// How long until the watchdog's next deadline (zero when overdue), or `None` when no
    /// peer is watched.
    pub fn next_handshake_check(&self) -> Option<Duration> {
        let now = self.origin.elapsed();
        self.watchdog.next_deadline().map(|d| d.saturating_sub(now))
    }

    fn check_handshakes_at(&mut self, now: Duration) -> Result<Report> {
        let start = Instant::now();
        if self.watchdog.is_empty() {
            return Ok(Report::default());
        }
        let stats = match self.dataplane.peer_stats(&self.ownership) {
            Ok(s) => s,
            Err(e) => {
                // Give up on these peers rather than retry at once, again and again.
                self.watchdog = HandshakeWatchdog::new(self.watchdog.timeout());
                return Err(e);
            }
        };
        let readds = self.watchdog.poll(now, &stats);
        let operations = match &self.current {
            Some(plan) => readd_operations(plan, &readds),
            None => Vec::new(),
        };
        if let Some(touched) = &mut self.touched {
            for op in &operations {
                if matches!(op, Operation::RemovePeer { .. } | Operation::SetPeer(_))
                    && let Some((interface, public_key)) = op.peer()
                {
                    touched.peers.insert((interface.to_owned(), *public_key));
                }
            }
        }
        let messages = if operations.is_empty() {
            0
        } else {
            self.dataplane.execute(&operations, &self.keys)?
        };
        Ok(Report {
            operations,
            messages,
            dry_run: false,
            micros: start.elapsed().as_micros() as u64,
            warnings: Vec::new(),
            skipped: 0,
        })
    }

    /// Gives the dataplane back.
    pub fn into_dataplane(self) -> D {
        self.dataplane
    }
}

/// Remove, add as planned, start a handshake: the repair of each peer in `readds` that `plan`
/// still has.
fn readd_operations(plan: &NodePlan, readds: &[Readd]) -> Vec<Operation> {
    let mut ops = Vec::new();
    for r in readds {
        let Some(peer) = plan
            .interfaces
            .iter()
            .filter(|i| i.name == r.interface)
            .flat_map(|i| i.peers.iter())
            .find(|p| p.public_key == r.public_key)
        else {
            continue;
        };
        let keepalive = peer.persistent_keepalive.unwrap_or(0);
        ops.push(Operation::RemovePeer {
            interface: r.interface.clone(),
            public_key: r.public_key,
        });
        ops.push(Operation::from(PeerChange {
            interface: r.interface.clone(),
            public_key: r.public_key,
            endpoint: Some(peer.endpoint),
            persistent_keepalive: Some(keepalive),
            allowed_ips: peer.allowed_ips.clone(),
        }));
        if keepalive == 0 {
            ops.push(Operation::StartHandshake {
                interface: r.interface.clone(),
                public_key: r.public_key,
            });
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgmesh_core::{Event, Family, IncrementalPlanner, Node, RouteType, spec::parse_cluster};

    fn route(destination: &str, kind: RouteType) -> Route {
        let destination: IpNet = destination.parse().unwrap();
        let family = match destination {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        };
        Route {
            family,
            table: 1,
            destination,
            kind,
            device: None,
        }
    }

    /// What folding meant before the merge: drop the changed destinations, add the new
    /// routes, sort (stable) by destination.
    fn naive(mut routes: Vec<Route>, pending: &HashMap<IpNet, Option<Route>>) -> Vec<Route> {
        routes.retain(|r| !pending.contains_key(&r.destination));
        routes.extend(pending.values().flatten().cloned());
        routes.sort_by_key(|r| r.destination);
        routes
    }

    /// The merge gives what drop-add-sort gave: changes before the first route, between
    /// routes, on a destination with two routes, after the last, removals of the first and
    /// last and of a route not there, in both families; and for routes not sorted.
    #[test]
    fn folding_by_merge_is_folding_by_sort() {
        use RouteType::{Throw, Unicast};
        let routes = vec![
            route("10.0.0.0/24", Unicast),
            route("10.0.1.0/24", Unicast),
            route("10.0.2.0/24", Throw),
            route("10.0.2.0/24", Unicast),
            route("10.0.3.0/24", Unicast),
            route("10.0.5.0/24", Unicast),
            route("fd00::/64", Unicast),
            route("fd00:0:0:2::/64", Unicast),
        ];
        let change = |d: &str, k: Option<RouteType>| (d.parse().unwrap(), k.map(|k| route(d, k)));
        let pending: HashMap<IpNet, Option<Route>> = [
            change("9.0.0.0/8", Some(Unicast)),
            change("10.0.0.0/24", None),
            change("10.0.1.128/25", Some(Throw)),
            change("10.0.2.0/24", Some(Throw)),
            change("10.0.4.0/24", None),
            change("10.0.5.0/24", Some(Throw)),
            change("11.0.0.0/8", Some(Unicast)),
            change("fd00:0:0:1::/64", Some(Unicast)),
            change("fd00:0:0:2::/64", None),
            change("fe80::/10", Some(Throw)),
        ]
        .into_iter()
        .collect();
        let want = naive(routes.clone(), &pending);
        assert_eq!(fold(routes.clone(), pending.clone()), want);
        assert_eq!(want.len(), routes.len() - 5 + 7);
        assert_eq!(fold(routes.clone(), HashMap::new()), routes);
        assert_eq!(
            fold(Vec::new(), pending.clone()),
            naive(Vec::new(), &pending)
        );
        let mut unsorted = routes.clone();
        unsorted.reverse();
        assert_eq!(
            fold(unsorted.clone(), pending.clone()),
            naive(unsorted, &pending)
        );
    }

    /// The kernel's routes compared with the plan as they are read (those as planned never
    /// held, [`Dataplane::read_with`]) give the operations that reading them all and then
    /// diffing gives: with routes missing, of another kind, of another metric, stray, in
    /// sorted and unsorted plans; and with a link that goes, whose routes the kernel
    /// removes with it, so they are added again.
    #[test]
    fn routes_taken_while_read_diff_as_routes_read_whole() {
        use crate::diff::diff;
        use crate::state::ActualRouteKind;
        let node = |n: u8| {
            Node::new(format!("n{n}"))
                .with_addresses([std::net::IpAddr::from([10, 0, 0, n])])
                .with_pod_cidrs([format!("10.65.{n}.0/24").parse().unwrap()])
                .with_wireguard(wgmesh_core::NodeWireGuard::new(
                    Some(wgmesh_core::PrivateKey::generate().public_key()),
                    None,
                ))
        };
        let mut mesh = wgmesh_core::MeshConfig::default();
        mesh.host_encryption = true;
        let cluster = wgmesh_core::Cluster::new(mesh, (1..=6).map(node).collect()).unwrap();
        let plan = wgmesh_core::plan_node(&cluster, "n1").unwrap();
        let kernel = crate::testing::SharedKernel::new(crate::testing::FakeKernel::new());
        let linux = crate::Linux::with_kernel(kernel.handle(), Default::default()).unwrap();
        let own = Ownership::from_mesh(cluster.mesh());
        let mut r = Reconciler::new(
            linux,
            own.clone(),
            KeyRing::single(wgmesh_core::PrivateKey::generate()),
        );
        r.reconcile(&plan).unwrap();
        {
            let mut k = kernel.kernel();
            let keys: Vec<_> = (k.routes.iter())
                .filter(|(_, r)| r.table == own.table)
                .map(|(key, _)| *key)
                .collect();
            k.routes.remove(&keys[0]); // missing
            let r1 = k.routes.get_mut(&keys[1]).unwrap();
            r1.kind = match r1.kind {
                ActualRouteKind::Throw => ActualRouteKind::Blackhole,
                _ => ActualRouteKind::Throw,
            }; // another kind
            let mut other = k.routes[&keys[2]].clone();
            other.metric += 5;
            k.add_route(other); // another metric
            let mut stray = k.routes[&keys[3]].clone();
            stray.destination = "192.168.9.0/24".parse().unwrap();
            k.add_route(stray);
        }
        let sorted = |mut o: Vec<Operation>| {
            let mut o: Vec<String> = o.drain(..).map(|o| o.to_string()).collect();
            o.sort();
            o
        };
        let sysctls: Vec<String> = plan.sysctls.iter().map(|s| s.key.clone()).collect();
        let check = |r: &mut Reconciler<crate::Linux<crate::testing::SharedKernel>>,
                     routes: &[Route]| {
            let opts = r.options();
            let whole = r.dataplane_mut().read(&own, &sysctls).unwrap();
            let want = crate::diff::diff_with_routes(
                &plan,
                PlannedRoutes::new(routes),
                &whole,
                &own,
                &opts,
            );
            let got = read_and_diff(r.dataplane_mut(), &own, &opts, &plan, routes).unwrap();
            let (want, got) = (sorted(want.into_operations()), sorted(got));
            assert_eq!(got, want);
            got
        };
        let drift = check(&mut r, &plan.routes);
        assert_eq!(drift.len(), 4, "{drift:#?}"); // 1 added, 1 replaced, 2 deleted
        let mut unsorted = plan.routes.clone();
        unsorted.reverse();
        assert_eq!(check(&mut r, &unsorted), drift);
        assert_eq!(
            sorted(
                diff(
                    &plan,
                    &r.dataplane_mut().read(&own, &sysctls).unwrap(),
                    &own,
                    &r.options()
                )
                .into_operations()
            ),
            drift
        );
        // The IPv4 link goes (a TUN device where a kernel one is wanted): its unicast
        // routes come back.
        let v4 = plan.interfaces[0].name.clone();
        kernel.kernel().links.get_mut(&v4).unwrap().kind = Some("tun".into());
        let remade = check(&mut r, &plan.routes);
        let unicast = plan
            .routes
            .iter()
            .filter(|r| r.device.as_deref() == Some(v4.as_str()))
            .count();
        assert!(unicast >= 5, "{:#?}", plan.routes);
        let added = remade
            .iter()
            .filter(|o| o.contains(&format!("dev {v4}")))
            .count();
        assert!(added >= unicast, "{remade:#?}");
        assert_eq!(check(&mut r, &unsorted), remade);
    }

    /// The fake kernel, its WireGuard devices changing all the time (every generic netlink
    /// datagram received bumps their generation: every dump is interrupted).
    struct Busy(crate::testing::SharedKernel);

    impl crate::KernelIo for Busy {
        fn send(&mut self, p: crate::wire::Protocol, d: &[u8]) -> std::io::Result<()> {
            self.0.send(p, d)
        }
        fn recv(&mut self, p: crate::wire::Protocol, buf: &mut Vec<u8>) -> std::io::Result<()> {
            if p == crate::wire::Protocol::Generic {
                for d in self.0.kernel().devices.values_mut() {
                    d.generation += 1;
                }
            }
            self.0.recv(p, buf)
        }
        fn read_sysctl(&mut self, key: &str) -> std::io::Result<Option<String>> {
            self.0.read_sysctl(key)
        }
        fn write_sysctl(&mut self, key: &str, value: &str) -> std::io::Result<()> {
            self.0.write_sysctl(key, value)
        }
        fn open_another(&mut self) -> Option<std::io::Result<Box<dyn crate::KernelIo + Send>>> {
            Some(Ok(Box::new(Busy(self.0.handle()))))
        }
    }

    /// A background resync that could not read a device without a change interrupting it
    /// leaves that device's peers alone (its read may lack some), and repairs the rest; a
    /// full reconcile repairs the peer.
    #[test]
    fn a_resync_leaves_the_peers_of_a_device_it_could_not_read_whole() {
        let key = wgmesh_core::PrivateKey::generate();
        let cluster = parse_cluster(&format!(
            r#"{{"nodes":[
              {{"name":"a","addresses":["10.0.0.1"],"pod_cidrs":["10.65.0.0/26"],
               "wireguard":{{"public_key":"{}"}}}},
              {{"name":"b","addresses":["10.0.0.2"],"pod_cidrs":["10.65.0.64/26"],
               "wireguard":{{"public_key":"/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}}},
              {{"name":"c","addresses":["10.0.0.3"],"pod_cidrs":["10.65.0.128/26"],
               "wireguard":{{"public_key":"lDWQTjn07Ve0LXsUpK+8QpVnt+LEsDBTad9yiHJu0Ww="}}}}]}}"#,
            key.public_key()
        ))
        .unwrap();
        let plan = wgmesh_core::plan_node(&cluster, "a").unwrap();
        let kernel = crate::testing::SharedKernel::new(crate::testing::FakeKernel::new());
        let linux = crate::Linux::with_kernel(Busy(kernel.handle()), Default::default()).unwrap();
        let own = Ownership::from_mesh(cluster.mesh());
        let mut r = Reconciler::new(linux, own, KeyRing::single(key));
        r.reconcile(&plan).unwrap();
        let name = plan.interfaces[0].name.clone();
        let b_route: IpNet = "10.65.0.64/26".parse().unwrap();
        let peers = |k: &crate::testing::SharedKernel| k.kernel().devices[&name].peers.len();
        let has = |d: IpNet| kernel.kernel().routes.values().any(|r| r.destination == d);
        assert_eq!(peers(&kernel), 2);
        {
            let mut k = kernel.kernel();
            let dev = k.devices.get_mut(&name).unwrap();
            let first = *dev.peers.keys().next().unwrap();
            dev.peers.remove(&first);
            k.routes.retain(|_, r| r.destination != b_route);
        }
        let job = r.begin_resync().unwrap().expect("a second handle");
        let found = std::thread::spawn(move || job.run()).join().unwrap();
        let report = r.finish_resync(found).unwrap();
        assert!(has(b_route), "the route was not repaired");
        assert_eq!(peers(&kernel), 1, "{:#?}", report.operations);
        assert!(report.skipped >= 1, "{report:#?}");
        assert!(!r.reconcile(&plan).unwrap().is_noop());
        assert_eq!(peers(&kernel), 2);
    }

    /// A background resync begun while route changes of deltas wait to be folded leaves them
    /// waiting (no fold on the event loop), and its repairs leave their destinations alone:
    /// the snapshot has those routes as they were before the deltas, the kernel as after.
    #[test]
    fn a_resync_does_not_fold_and_does_not_undo_unfolded_changes() {
        let cluster = parse_cluster(
            r#"{"nodes":[
              {"name":"a","addresses":["10.0.0.1"],"pod_cidrs":["10.65.0.0/26"],
               "wireguard":{"public_key":"lDWQTjn07Ve0LXsUpK+8QpVnt+LEsDBTad9yiHJu0Ww="}},
              {"name":"b","addresses":["10.0.0.2"],"pod_cidrs":["10.65.0.64/26"],
               "wireguard":{"public_key":"/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#,
        )
        .unwrap();
        let mut planner = IncrementalPlanner::new(&cluster, "a");
        let kernel = crate::testing::SharedKernel::new(crate::testing::FakeKernel::new());
        let linux = crate::Linux::with_kernel(kernel.handle(), Default::default()).unwrap();
        let own = Ownership::from_mesh(cluster.mesh());
        let key =
            wgmesh_core::PrivateKey::from_base64("aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=")
                .unwrap();
        let mut r = Reconciler::new(linux, own, KeyRing::single(key));
        r.reconcile(&planner.plan()).unwrap();
        let c = Node::new("c")
            .with_addresses(["10.0.0.3".parse().unwrap()])
            .with_pod_cidrs(["10.65.0.128/26".parse().unwrap()])
            .with_wireguard(wgmesh_core::NodeWireGuard::new(
                Some(wgmesh_core::PrivateKey::generate().public_key()),
                None,
            ));
        let delta = planner.apply(Event::NodeUpserted(c)).unwrap();
        assert!(!delta.routes_added.is_empty());
        r.apply_delta(&delta).unwrap();
        let waiting = r.routes_pending.len();
        assert!(waiting > 0);
        let c_route: IpNet = "10.65.0.128/26".parse().unwrap();
        let b_route: IpNet = "10.65.0.64/26".parse().unwrap();
        let has = |d: IpNet| kernel.kernel().routes.values().any(|r| r.destination == d);
        assert!(has(c_route));
        kernel
            .kernel()
            .routes
            .retain(|_, r| r.destination != b_route); // drift
        let job = r.begin_resync().unwrap().unwrap();
        assert_eq!(r.routes_pending.len(), waiting, "folded on the loop");
        let found = std::thread::spawn(move || job.run()).join().unwrap();
        let report = r.finish_resync(found).unwrap();
        assert!(has(c_route), "the resync removed a route a delta had added");
        assert!(has(b_route), "the drift was not repaired");
        assert!(report.skipped > 0, "{:#?}", report.operations);
        assert_eq!(r.current_plan(), Some(&planner.plan()));
        assert!(r.reconcile(&planner.plan()).unwrap().is_noop());
    }
}
