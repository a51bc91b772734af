//! The node agent's logic as a state machine: watch events and timer ticks in, dataplane
//! calls and key publications out. No IO of its own, no clock of its own (every input
//! carries `now`), so every behaviour is tested by feeding it events.
//!
//! ```text
//!  watcher::Event<Node> ─► reflector store ─► ClusterView ─► core Events ─► IncrementalPlanner
//!  watcher::Event<Pod>  ─► (relists staged  ─┘  (adapter)                         │ PlanDelta
//!                           as node + IPs)                                        ▼
//!   poll(now): debounce ─► guard (bootstrap) ─► Dataplane::apply_delta / reconcile
//!              resync timer ─► rebuild from the node store and the view ─► full reconcile
//!              publication ─► Publication (the async shell patches the Node) ─► on_published
//! ```
//!
//! [`crate::run`] is the thin async shell that connects it to the API server.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Node as K8sNode, Pod};
use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use tracing::{debug, error, info, warn};
use wgmesh_core::diagnostics::Diagnostic;
use wgmesh_core::{Family, IncrementalPlanner, MeshConfig, NodePlan, Phase, PlanDelta, PublicKey};

use crate::adapter::{
    AdapterOptions, NodeInfo, PHASE_ANNOTATION, UNDERLAY_MTU_ANNOTATION, key_annotation,
    parse_phase,
};
use crate::bootstrap::{KeyCheck, guard_delta, guard_plan, key_check};
use crate::dataplane::{BackgroundResync, Dataplane, DataplaneError, ResyncOutcome};
use crate::metrics::{AgentState, ApplyKind, Metrics, PeerRow};
use crate::phase::{PhaseClocks, PhaseSettings, Verdict};
use crate::rotation::{
    Announcements, NEXT_PUBLIC_KEY_ANNOTATION, RotationSettings, collides, jitter, must_yield,
};
use crate::status::{
    ConditionInputs, MeshCondition, Notice, NoticeKind, StatusUpdate, fresh_handshakes,
    mesh_condition, published_condition,
};
use crate::view::{Changes, ClusterView, ControlPlaneEndpoints};

/// Exponential backoff: no wait before the first attempt, then `initial`, doubling up to `max`.
///
/// ```
/// use std::time::Duration;
/// use wgmesh_k8s::agent::Backoff;
/// let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
/// assert_eq!(b.delay(0), Duration::ZERO);
/// assert_eq!(b.delay(1), Duration::from_secs(1));
/// assert_eq!(b.delay(3), Duration::from_secs(4));
/// assert_eq!(b.delay(30), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `initial` to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The wait after `failures` consecutive failures.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// [`Self::delay`] with a jitter of up to half of it, drawn from `seed` (the node's name)
    /// and `failures`: agents that fail together (an API server outage) retry apart, and one
    /// agent's schedule stays reproducible.
    ///
    /// ```
    /// use std::time::Duration;
    /// use wgmesh_k8s::agent::Backoff;
    /// let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    /// let d = b.jittered(3, "node-a");
    /// assert!(d > Duration::from_secs(2) && d <= Duration::from_secs(4));
    /// assert_eq!(d, b.jittered(3, "node-a"));
    /// assert_ne!(d, b.jittered(3, "node-b"));
    /// ```
    pub fn jittered(&self, failures: u32, seed: &str) -> Duration {
        let full = self.delay(failures);
        // FNV-1a over the seed and the attempt: no randomness source in the state machine.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes().chain(failures.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let fraction = (h >> 11) as f64 / (1u64 << 53) as f64;
        full.mul_f64(1.0 - fraction / 2.0)
    }
}

/// Everything the agent needs to know, with the core's and Calico's defaults.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AgentSettings {
    /// The name of this node's Node object.
    pub node_name: String,
    /// The mesh settings (the cluster-wide intent).
    pub mesh: MeshConfig,
    /// How Nodes and Pods are read.
    pub adapter: AdapterOptions,
    /// Whether Pods are watched (their addresses are workload addresses). Needed with
    /// `route_source: workload_ips`; with `cidr_blocks` it adds borrowed addresses.
    pub watch_pods: bool,
    /// API server endpoints kept outside the tunnel, besides `mesh.control_plane_endpoints`.
    pub control_plane: ControlPlaneEndpoints,
    /// Quiet time after the last change before a batch of changes is applied.
    pub debounce: Duration,
    /// Longest a change waits while changes keep coming (not less than `debounce`). By
    /// default the same as the debounce: under steady churn a batch is applied every
    /// `debounce`, and no change waits longer.
    pub max_delay: Duration,
    /// Interval of full resyncs (rebuild from the watch caches, full reconcile).
    pub resync_interval: Duration,
    /// Backoff of key publications that fail or keep being undone.
    pub publish_backoff: Backoff,
    /// How long a successful publication may take to come back through the watch before it
    /// is retried.
    pub echo_timeout: Duration,
    /// Backoff of failed dataplane calls.
    pub apply_backoff: Backoff,
    /// Interval of reading peer counters for metrics.
    pub stats_interval: Duration,
    /// More pending deltas than this, or than a quarter of the pods if that is more, are
    /// replaced by one full reconcile (which costs in proportion to the whole plan: at
    /// 550,000 pods, seconds, while 4,096 deltas cost a fraction of one).
    pub max_pending_deltas: usize,
    /// The underlay MTU to publish for this node (`None`: publish none; peers assume 1500).
    pub underlay_mtu: Option<u32>,
    /// Whether metrics carry per-peer series (handshake, bytes). Off, a cluster of N nodes
    /// exports N series per metric instead of N²; the Node condition still counts handshakes.
    pub per_peer_metrics: bool,
    /// Shortest time between two writes of the Node condition when its status changes.
    pub status_min_interval: Duration,
    /// Shortest time between two writes when only its reason or message changes.
    pub status_refresh_interval: Duration,
    /// Longest time between two writes (the heartbeat a reader can check).
    pub status_heartbeat: Duration,
    /// Scheduled key rotation (off unless an interval is set).
    pub rotation: RotationSettings,
    /// Leaving and joining in phases: the grace of other nodes' markers, this node's settle
    /// time ([`crate::phase`]).
    pub phase: PhaseSettings,
    /// A file whose presence asks this node to leave the mesh in phases (and whose absence
    /// to join it again): `wgmesh-agent leave` / `rejoin` write and remove it. The shell
    /// ([`crate::run`]) looks every few seconds; `None`: no such file.
    pub leave_file: Option<std::path::PathBuf>,
}

impl AgentSettings {
    /// Settings for node `node_name` with mesh `mesh` and every default: debounce 100 ms (and
    /// no change waits longer while changes keep coming; up to 4,096 pending deltas), resync
    /// every 90 s, publication backoff 1 s to 60 s, dataplane backoff 1 s to 30 s, pods
    /// watched iff the route source is `workload_ips`.
    pub fn new(node_name: impl Into<String>, mesh: MeshConfig) -> Self {
        let watch_pods = mesh.route_source == wgmesh_core::RouteSource::WorkloadIps;
        Self {
            node_name: node_name.into(),
            mesh,
            adapter: AdapterOptions::default(),
            watch_pods,
            control_plane: ControlPlaneEndpoints::default(),
            debounce: Duration::from_millis(100),
            max_delay: Duration::from_millis(100),
            resync_interval: Duration::from_secs(90),
            publish_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            echo_timeout: Duration::from_secs(10),
            apply_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
            stats_interval: Duration::from_secs(15),
            max_pending_deltas: 4096,
            underlay_mtu: None,
            per_peer_metrics: true,
            status_min_interval: Duration::from_secs(10),
            status_refresh_interval: Duration::from_secs(300),
            status_heartbeat: Duration::from_secs(600),
            rotation: RotationSettings::default(),
            phase: PhaseSettings::default(),
            leave_file: None,
        }
    }
}

/// Which watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resource {
    /// Nodes.
    Nodes,
    /// Pods.
    Pods,
}

/// A change of the node's own annotations for the shell to make.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Publication {
    /// The node.
    pub node: String,
    /// Annotations wgmesh wants, applied with server-side apply (field manager `wgmesh`,
    /// forced). Empty: no apply.
    pub apply: BTreeMap<String, String>,
    /// Key annotations to remove whoever set them (a JSON merge patch with `null`s).
    pub remove: Vec<String>,
}

/// Where the Node condition's writing stands.
#[derive(Debug, Default)]
struct StatusState {
    /// Taken by the shell with [`Agent::take_status_update`].
    outbox: Option<StatusUpdate>,
    in_flight: bool,
    /// What the Node carries (last written, or read from the watch at start).
    written: Option<MeshCondition>,
    since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    last_attempt: Option<Instant>,
    last_ok: Option<Instant>,
    failures: u32,
    /// When the agent first could write (its Node listed): the first write waits
    /// `status_min_interval` after it, so a starting node does not first report the
    /// moment before its key's echo.
    first_due: Option<Instant>,
}

/// The most Events kept for the shell; older ones are dropped (and counted).
const MAX_NOTICES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PublishState {
    Idle,
    InFlight,
    AwaitingEcho { until: Instant },
}

/// The agent's state machine over a dataplane `D`.
#[derive(Debug)]
pub struct Agent<D> {
    settings: AgentSettings,
    view: ClusterView,
    nodes: Writer<K8sNode>,
    nodes_synced: bool,
    pods_synced: bool,
    planner: Option<IncrementalPlanner>,
    rebuild: bool,
    pending: Vec<PlanDelta>,
    full: bool,
    dirty_since: Option<Instant>,
    last_change: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
    applied_guard: Option<bool>,
    applied_once: bool,
    last_error: Option<String>,
    next_resync: Option<Instant>,
    /// A resync whose reading and diffing the shell runs on another thread
    /// ([`Agent::take_background_resync`]), not yet taken.
    background: Option<BackgroundResync>,
    /// When the background resync under way began.
    resyncing_since: Option<Instant>,
    next_stats: Option<Instant>,
    publish: PublishState,
    publish_attempts: u32,
    next_publish: Option<Instant>,
    confirmed_since: Option<Instant>,
    publishing: Option<Publication>,
    notices: VecDeque<Notice>,
    status: StatusState,
    interfaces: Vec<(String, usize)>,
    /// Whether `interfaces` must be counted again from a whole plan (a delta added or
    /// removed an interface); peers added and removed by deltas are counted as they come.
    interfaces_stale: bool,
    fresh_handshakes: Option<usize>,
    wall_clock: fn() -> SystemTime,
    /// The findings known (each logged and raised once), and whether to look again.
    findings: HashSet<Diagnostic>,
    findings_stale: bool,
    claim_counts: (usize, usize),
    rotation: RotationState,
    /// The last key check with what it was computed from: it runs on every pass of the
    /// loop (`status_due`), and base64-decoding the published keys each time was 3.3 % of
    /// the agent's samples at 5,000 nodes.
    key_memo: std::sync::Mutex<Option<KeyMemo>>,
    /// When this agent first saw each node's phase marker (the grace).
    phases: PhaseClocks,
    /// This node's own leave or join in phases.
    own: OwnPhase,
    /// The operator asked this node to leave ([`AgentSettings::leave_file`]).
    leave_requested: bool,
    dataplane: D,
    metrics: Metrics,
}

/// What [`key_check`] was last given (the node's key annotations, which families it has an
/// address of, the dataplane's keys) and what it said.
#[derive(Debug)]
struct KeyMemo {
    published: [Option<String>; 2],
    addressed: [bool; 2],
    ours: [Option<PublicKey>; 2],
    check: KeyCheck,
}

impl KeyMemo {
    fn matches(&self, node: &NodeInfo, ours: [Option<PublicKey>; 2]) -> bool {
        self.ours == ours
            && Family::ALL.into_iter().all(|f| {
                self.published[f.index()].as_deref() == node.published.key(f)
                    && self.addressed[f.index()] == node.node.address(f).is_some()
            })
    }
}

/// Where this node's own leave or join in phases stands ([`crate::phase`]).
#[derive(Debug, Default)]
struct OwnPhase {
    /// The marker this node wants on its Node now.
    want: Option<Phase>,
    /// When this run began to want it.
    started: Option<Instant>,
    /// When this run first saw the wanted marker back through its watch.
    echoed: Option<Instant>,
    /// The sequence is over (joined, or left) for this run.
    done: bool,
    /// The mesh is held on in the view while the node leaves (`enabled: false`).
    holding: bool,
}

/// Where this node's key rotation stands (the key files themselves are the dataplane's).
#[derive(Debug, Default)]
struct RotationState {
    /// When the current key was made, on the agent's clock (from the key file's age at the
    /// first look, then the switch).
    key_born: Option<Instant>,
    /// When this run first saw the next key (made now or left by an earlier run).
    announced: Option<Instant>,
    /// No rotation step before this (bound reached, a step failed).
    retry_at: Option<Instant>,
    /// The dataplane cannot rotate keys; said once.
    unsupported: bool,
    /// When this agent first saw each other node's announcement (the bound's time limit).
    seen: Announcements,
}

impl<D: Dataplane> Agent<D> {
    /// An agent that has seen nothing yet.
    pub fn new(settings: AgentSettings, dataplane: D, metrics: Metrics) -> Self {
        // With the mesh off, the view holds it on until this node has left in phases (or
        // turns out to have nothing to leave).
        let holding = !settings.mesh.enabled;
        let mut mesh = settings.mesh.clone();
        mesh.enabled = true;
        let view = ClusterView::new(
            mesh,
            settings.adapter.clone(),
            settings.control_plane.clone(),
            settings.watch_pods,
        );
        let agent = Self {
            view,
            nodes: Writer::default(),
            nodes_synced: false,
            pods_synced: !settings.watch_pods,
            planner: None,
            rebuild: false,
            pending: Vec::new(),
            full: true,
            dirty_since: None,
            last_change: None,
            retry_at: None,
            failures: 0,
            applied_guard: None,
            applied_once: false,
            last_error: None,
            next_resync: None,
            background: None,
            resyncing_since: None,
            next_stats: None,
            publish: PublishState::Idle,
            publish_attempts: 0,
            next_publish: None,
            confirmed_since: None,
            publishing: None,
            notices: VecDeque::new(),
            status: StatusState::default(),
            interfaces: Vec::new(),
            interfaces_stale: false,
            fresh_handshakes: None,
            wall_clock: SystemTime::now,
            findings: HashSet::new(),
            findings_stale: false,
            claim_counts: (0, 0),
            key_memo: std::sync::Mutex::new(None),
            rotation: RotationState::default(),
            phases: PhaseClocks::default(),
            own: OwnPhase {
                holding,
                ..OwnPhase::default()
            },
            leave_requested: false,
            dataplane,
            metrics,
            settings,
        };
        agent.metrics.set_per_peer(agent.settings.per_peer_metrics);
        agent.update_state();
        agent
    }

    /// The settings.
    pub fn settings(&self) -> &AgentSettings {
        &self.settings
    }

    /// The dataplane.
    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// The dataplane, mutably (tests inject faults and drift).
    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dataplane
    }

    /// The cluster as known.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    /// The Node cache (a kube-runtime reflector store).
    pub fn nodes_store(&self) -> Store<K8sNode> {
        self.nodes.as_reader()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The node's plan as the planner has it now (before the bootstrap guard), once synced.
    pub fn plan(&self) -> Option<NodePlan> {
        self.planner.as_ref().map(IncrementalPlanner::plan)
    }

    /// Whether Nodes (and Pods, if watched) have been listed.
    pub fn synced(&self) -> bool {
        self.nodes_synced && self.pods_synced
    }

    /// Whether the mesh is on for this node: on in the settings, and no leave asked for.
    pub fn enabled(&self) -> bool {
        self.settings.mesh.enabled && !self.leave_requested
    }

    /// Whether the operator asks this node to leave the mesh (the shell reads
    /// [`AgentSettings::leave_file`]). A change starts a new sequence in phases: leaving
    /// (marker, settle, then the device goes and the key is withdrawn), or joining again.
    pub fn on_leave_request(&mut self, requested: bool, now: Instant) {
        if self.leave_requested == requested {
            return;
        }
        self.leave_requested = requested;
        let enabled = self.enabled();
        info!(node = %self.settings.node_name, leave_requested = requested, enabled, "leave request changed");
        self.own = OwnPhase {
            holding: !enabled,
            ..OwnPhase::default()
        };
        if enabled {
            let changes = self.view.set_enabled(true);
            self.feed(changes, now);
        }
    }

    fn our_keys(&self) -> [Option<PublicKey>; 2] {
        Family::ALL.map(|f| self.dataplane.public_key(f))
    }

    /// How the node's published keys compare with its own (`None` before the node is seen).
    pub fn key_check(&self) -> Option<KeyCheck> {
        let node = self.view.node(&self.settings.node_name)?;
        let ours = self.our_keys();
        let mut memo = self
            .key_memo
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = memo.as_ref().filter(|m| m.matches(node, ours)) {
            return Some(m.check.clone());
        }
        let check = key_check(node, ours);
        *memo = Some(KeyMemo {
            published: Family::ALL.map(|f| node.published.key(f).map(str::to_owned)),
            addressed: Family::ALL.map(|f| node.node.address(f).is_some()),
            ours,
            check: check.clone(),
        });
        Some(check)
    }

    /// Whether the bootstrap guard is on: host traffic stays outside the tunnel.
    pub fn guarded(&self) -> bool {
        self.view.mesh().enabled && !self.key_check().is_some_and(|k| k.confirmed())
    }

    fn update_state(&self) {
        self.metrics
            .set_cluster(self.view.node_count(), self.view.pod_count());
        self.metrics.set_state(AgentState {
            synced: self.synced(),
            applied: self.applied_once && self.failures == 0,
            key_published: self.key_check().is_some_and(|k| k.confirmed()),
            guarded: self.planner.is_some() && self.guarded(),
            last_error: self.last_error.clone(),
        });
    }

    // ---------------------------------------------------------------------------------------
    // Inputs.

    /// A Node watch event.
    pub fn on_nodes(&mut self, event: watcher::Event<K8sNode>, now: Instant) {
        self.nodes.apply_watcher_event(&event);
        let rotating = self.settings.rotation.interval.is_some();
        let changes = match event {
            watcher::Event::Apply(node) => {
                let mut changes = self.gate_phase(&node, now);
                changes.extend(self.view.apply_node(&node));
                if rotating
                    && let Some(info) = node
                        .metadata
                        .name
                        .as_deref()
                        .and_then(|n| self.view.node(n))
                {
                    self.rotation.seen.observe(info, now);
                }
                changes
            }
            watcher::Event::Delete(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                self.rotation.seen.forget(&name);
                self.phases.forget(&name);
                let mut changes = self.view.honour_phase(&name, true);
                changes.extend(self.view.delete_node(&name));
                changes
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => Changes::default(),
            watcher::Event::InitDone => {
                let list = self.nodes.as_reader().state();
                let mut changes = Changes::default();
                for node in &list {
                    changes.extend(self.gate_phase(node, now));
                }
                changes.extend(self.view.replace_nodes(list.iter().map(AsRef::as_ref)));
                if !self.nodes_synced {
                    info!(nodes = self.view.node_count(), "nodes listed");
                }
                self.nodes_synced = true;
                changes
            }
        };
        self.feed(changes, now);
    }

    /// Notes the phase another Node claims on the grace clocks and tells the view whether to
    /// honour it (before the view converts the Node, so an expired claim never gets in). This
    /// node's own marker is its agent's, always honoured: its sequence is bounded by the
    /// settle time. In strict mode no marker is honoured: a phase sends the node's traffic
    /// plain, and strict mode drops rather than send plaintext (membership changes there are
    /// break-before-make).
    fn gate_phase(&mut self, node: &K8sNode, now: Instant) -> Changes {
        let Some(name) = node.metadata.name.as_deref() else {
            return Changes::default();
        };
        if name == self.settings.node_name {
            return Changes::default();
        }
        if self.view.mesh().strict_mode {
            return self.view.honour_phase(name, false);
        }
        let claimed = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PHASE_ANNOTATION))
            .and_then(|t| parse_phase(t))
            .unwrap_or(Phase::Active);
        let grace = self.settings.phase.grace;
        let verdict = self.phases.observe(name, claimed, now, grace);
        self.said_expired(name, claimed, verdict);
        self.view.honour_phase(name, verdict.honoured())
    }

    fn said_expired(&mut self, node: &str, claimed: Phase, verdict: Verdict) {
        if verdict == Verdict::NewlyExpired {
            warn!(
                %node,
                phase = %claimed,
                grace_seconds = self.settings.phase.grace.as_secs(),
                "node has claimed a phase for longer than phase_grace_seconds; its wgmesh.io/phase marker is ignored and it is treated as active"
            );
            self.metrics.phase_marker_expired();
        }
    }

    /// Takes back the phase of every node whose marker has outlived the grace.
    fn expire_phases(&mut self, now: Instant) {
        let grace = self.settings.phase.grace;
        let mut changes = Changes::default();
        for name in self.phases.standing_nodes() {
            let Some(claimed) = self.view.node(&name).map(|i| i.claimed_phase) else {
                continue;
            };
            let verdict = self.phases.verdict(&name, claimed, now, grace);
            self.said_expired(&name, claimed, verdict);
            if !verdict.honoured() {
                changes.extend(self.view.honour_phase(&name, false));
            }
        }
        if !changes.is_empty() {
            self.feed(changes, now);
        }
    }

    /// A Pod watch event.
    pub fn on_pods(&mut self, event: watcher::Event<Pod>, now: Instant) {
        if !self.settings.watch_pods {
            return;
        }
        let changes = match event {
            watcher::Event::Apply(pod) => self.view.apply_pod(&pod),
            watcher::Event::Delete(pod) => self.view.delete_pod(&pod),
            watcher::Event::Init => {
                // The first relist: there is no planner before it ends (it is built from
                // the whole view), so the pods take effect as they come, without events.
                if self.pods_synced {
                    self.view.begin_pod_relist();
                } else {
                    self.view.begin_pod_relist_without_events();
                }
                Changes::default()
            }
            watcher::Event::InitApply(pod) => {
                self.view.stage_pod(&pod);
                Changes::default()
            }
            watcher::Event::InitDone => {
                // Without a planner (before the first plan) the events would be dropped:
                // the planner is built from the whole view.
                let changes = if self.planner.is_none() {
                    self.view.finish_pod_relist_without_events()
                } else {
                    self.view.finish_pod_relist()
                };
                if !self.pods_synced {
                    info!(pods = self.view.pod_count(), "pods listed");
                }
                self.pods_synced = true;
                changes
            }
        };
        self.feed(changes, now);
    }

    /// A watch failed (it retries by itself, with backoff).
    pub fn on_watch_error(&mut self, resource: Resource, error: &str, _now: Instant) {
        let source = match resource {
            Resource::Nodes => "watch_nodes",
            Resource::Pods => "watch_pods",
        };
        warn!(watch = source, error, "watch failed; retrying");
        self.metrics.error(source);
    }

    /// The outcome of the last [`Publication`].
    pub fn on_published(&mut self, result: Result<(), String>, now: Instant) {
        self.publish_attempts = self.publish_attempts.saturating_add(1);
        self.next_publish = Some(
            now + self
                .settings
                .publish_backoff
                .jittered(self.publish_attempts, &self.settings.node_name),
        );
        let publication = self.publishing.take();
        match result {
            Ok(()) => {
                info!(node = %self.settings.node_name, "published the node's WireGuard keys");
                self.metrics.published(true);
                self.publish = PublishState::AwaitingEcho {
                    until: now + self.settings.echo_timeout,
                };
                if let Some(p) = publication {
                    self.notice_publication(&p);
                }
            }
            Err(e) => {
                warn!(node = %self.settings.node_name, error = %e, retry_in = ?self.settings.publish_backoff.jittered(self.publish_attempts, &self.settings.node_name), "publishing the node's keys failed");
                self.metrics.published(false);
                self.metrics.error("publish");
                self.publish = PublishState::Idle;
                if self.publish_attempts == 1 {
                    self.notice(
                        NoticeKind::Warning,
                        "KeyPublishFailed",
                        format!("publishing the node's WireGuard key failed (retrying with backoff): {e}"),
                    );
                }
            }
        }
    }

    fn notice_publication(&mut self, p: &Publication) {
        let keys: Vec<String> = p
            .apply
            .iter()
            .filter(|(k, _)| Family::ALL.iter().any(|f| key_annotation(*f) == k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !keys.is_empty() {
            self.notice(
                NoticeKind::Normal,
                "KeyPublished",
                format!(
                    "published the node's WireGuard public key: {}",
                    keys.join(", ")
                ),
            );
        }
        if !p.remove.is_empty() {
            self.notice(
                NoticeKind::Normal,
                "KeyWithdrawn",
                format!(
                    "removed {} from the Node: peers stop encrypting to it",
                    p.remove.join(", ")
                ),
            );
        }
    }

    /// Queues an Event about this node.
    fn notice(&mut self, kind: NoticeKind, reason: &'static str, note: String) {
        let notice = Notice::new(self.settings.node_name.clone(), kind, reason, note);
        self.push_notice(notice);
    }

    fn push_notice(&mut self, notice: Notice) {
        if self.notices.len() >= MAX_NOTICES {
            self.notices.pop_front();
            debug!("too many Events waiting; dropped the oldest");
        }
        self.notices.push_back(notice);
    }

    /// The Events to send, oldest first (the shell sends them; the agent forgets them).
    pub fn take_notices(&mut self) -> Vec<Notice> {
        self.notices.drain(..).collect()
    }

    fn feed(&mut self, changes: Changes, now: Instant) {
        if !changes.warnings.is_empty() {
            self.metrics.warned(changes.warnings.len());
        }
        for w in &changes.warnings {
            warn!(node = w.node().unwrap_or(""), "{w}");
        }
        if let Some(planner) = &mut self.planner {
            for event in changes.events {
                match planner.apply(event) {
                    Ok(delta) if delta.is_empty() => {}
                    Ok(delta) => {
                        debug!(summary = %delta.summary(), "plan changed");
                        self.pending.push(delta);
                        self.dirty_since.get_or_insert(now);
                        self.last_change = Some(now);
                    }
                    Err(e) => {
                        error!(error = %e, "the planner refused an event; rebuilding it");
                        self.metrics.error("planner");
                        self.rebuild = true;
                    }
                }
            }
            // A full reconcile reads and diffs the whole plan (560,000 routes at 5,000 nodes ×
            // 110 pods: seconds); with a fixed 4,096, churn at 1,000 events/s during one such
            // reconcile overflowed into the next, and the next.
            let limit = self
                .settings
                .max_pending_deltas
                .max(self.view.pod_count() / 4);
            if self.pending.len() > limit {
                self.pending.clear();
                self.full = true;
            }
            let counts = (planner.refused_claims(), planner.disputed_prefixes());
            if counts != self.claim_counts {
                self.claim_counts = counts;
                self.findings_stale = true;
            }
        }
        self.update_state();
    }

    // ---------------------------------------------------------------------------------------
    // Timers.

    /// When [`Self::poll`] next has something to do, as seen at `now` (`None`: only an input
    /// can change that).
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if self.planner.is_none() && self.synced() {
            return Some(now);
        }
        if let Some(flush) = self.flush_at(now) {
            at(Some(flush));
        }
        at(self.next_resync);
        at(self.next_stats);
        at(self.dataplane.next_handshake_check().map(|d| now + d));
        at(self.status_due(now));
        at(self.rotation_due(now));
        at(self.phases.next_expiry(now, self.settings.phase.grace));
        at(self.own_phase_due(now));
        if self.publication().is_some() {
            match self.publish {
                PublishState::InFlight => {}
                // After the echo timeout the retry still waits for its backoff: waking at
                // `until` alone spun the loop once the backoff outgrew the echo timeout.
                PublishState::AwaitingEcho { until } => {
                    at(Some(until.max(self.next_publish.unwrap_or(until))))
                }
                PublishState::Idle => at(Some(self.next_publish.unwrap_or(now))),
            }
        } else if let Some(since) = self.confirmed_since
            && self.publish_attempts > 0
        {
            at(Some(since + self.settings.publish_backoff.max));
        }
        next
    }

    fn dirty(&self) -> bool {
        self.planner.is_some()
            && (self.rebuild
                || self.full
                || !self.pending.is_empty()
                || self.applied_guard != Some(self.guarded()))
    }

    fn flush_at(&self, now: Instant) -> Option<Instant> {
        if !self.dirty() {
            return None;
        }
        // The guard changes at once (and first, before any publication): turning it on
        // protects the node's way to the API server.
        if self.applied_guard.is_some() && self.applied_guard != Some(self.guarded()) {
            return Some(self.retry_at.map_or(now, |r| r.max(now)));
        }
        let at = match (self.dirty_since, self.last_change) {
            (Some(first), Some(last)) => {
                (last + self.settings.debounce).min(first + self.settings.max_delay)
            }
            _ => now,
        };
        Some(self.retry_at.map_or(at, |r| r.max(at)))
    }

    /// Does what is due at `now`; returns a publication for the shell to make, if one is due.
    pub fn poll(&mut self, now: Instant) -> Option<Publication> {
        self.metrics.heartbeat(now);
        self.expire_phases(now);
        self.step_phase(now);
        if self.planner.is_none() && self.synced() {
            self.rebuild_planner(now);
        }
        if self.planner.is_some() && self.next_resync.is_some_and(|t| now >= t) {
            self.resync(now);
        }
        if self.rebuild {
            self.rebuild_planner(now);
        }
        if self.flush_at(now).is_some_and(|t| now >= t) {
            self.flush(now);
        }
        if self.findings_stale {
            self.review_findings();
        }
        if self
            .dataplane
            .next_handshake_check()
            .is_some_and(|d| d.is_zero())
        {
            self.check_handshakes();
        }
        if self.next_stats.is_some_and(|t| now >= t) {
            self.refresh_stats();
            self.next_stats = Some(now + self.settings.stats_interval);
        }
        self.rotate(now);
        let publication = self.due_publication(now);
        self.schedule_status(now);
        self.update_state();
        publication
    }

    fn rebuild_planner(&mut self, now: Instant) {
        self.rebuild = false;
        match self.view.cluster() {
            Ok(cluster) => {
                let planner = IncrementalPlanner::new(&cluster, &self.settings.node_name);
                self.claim_counts = (planner.refused_claims(), planner.disputed_prefixes());
                self.planner = Some(planner);
                self.findings_stale = true;
                self.pending.clear();
                self.full = true;
                self.dirty_since = None;
                self.last_change = None;
                if self.next_resync.is_none() {
                    self.next_resync = Some(now + self.settings.resync_interval);
                    self.next_stats = Some(now + self.settings.stats_interval);
                }
            }
            Err(e) => {
                error!(error = %e, "the cluster is not valid; keeping the current plan");
                self.metrics.error("planner");
            }
        }
    }

    /// A full resync: the view's nodes are rebuilt from the Node reflector store (the watch
    /// cache), and the node is made to match the plan, which repairs drift on the node. Pods
    /// have no second cache: the view keeps only what each pod contributes (its node and
    /// addresses), not 550,000 Pod objects of a large cluster.
    ///
    /// When the view had not drifted and the dataplane can ([`Dataplane::begin_resync`]),
    /// the node is read and compared on another thread while deltas keep being applied
    /// (at 5,000 nodes × 110 pods that read and diff took 10–17 s of the event loop);
    /// otherwise the planner is rebuilt from the view and the whole plan reconciled here.
    fn resync(&mut self, now: Instant) {
        self.next_resync = Some(now + self.settings.resync_interval);
        let nodes = self.nodes.as_reader().state();
        let changes = self.view.replace_nodes(nodes.iter().map(AsRef::as_ref));
        if !changes.events.is_empty() {
            warn!(
                events = changes.events.len(),
                "the cluster view had drifted from the watch cache; rebuilt"
            );
        } else if self.resyncing_since.is_none()
            && !self.full
            && !self.rebuild
            && self.failures == 0
            && self.applied_guard == Some(self.guarded())
        {
            match self.dataplane.begin_resync() {
                Some(Ok(job)) => {
                    debug!("resync: reading the node on another thread");
                    self.background = Some(job);
                    self.resyncing_since = Some(now);
                    return;
                }
                Some(Err(e)) => {
                    warn!(error = %e, "cannot resync in the background; reconciling in full")
                }
                None => {}
            }
        }
        debug!("full resync");
        self.rebuild_planner(now);
        self.retry_at = None;
    }

    /// The long part of a background resync, for the shell to run on another thread; its
    /// outcome goes to [`Agent::on_resync_found`] (`None` if the job did not finish).
    pub fn take_background_resync(&mut self) -> Option<BackgroundResync> {
        self.background.take()
    }

    /// Applies what a background resync found (repairs, except on what deltas changed
    /// since it began). `None`: the job died; a full reconcile follows.
    pub fn on_resync_found(&mut self, outcome: Option<ResyncOutcome>, now: Instant) {
        let seconds = self
            .resyncing_since
            .take()
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        let result = match outcome {
            Some(outcome) => self.dataplane.finish_resync(outcome),
            None => Err(DataplaneError::new(
                "resync",
                "the resync job did not finish",
            )),
        };
        match result {
            Ok(report) => {
                self.metrics.reconciled(ApplyKind::Full, true, seconds);
                if report.operations > 0 {
                    warn!(
                        operations = report.operations,
                        "resync: the node had drifted from the plan; repaired"
                    );
                } else {
                    debug!(seconds, "resync: the node matches the plan");
                }
                for w in &report.warnings {
                    warn!("{w}");
                }
            }
            Err(e) => self.failed(ApplyKind::Full, seconds, &e.to_string(), now),
        }
    }

    fn flush(&mut self, now: Instant) {
        let Some(planner) = &self.planner else {
            return;
        };
        let guarded = self.guarded();
        let full = self.full || self.applied_guard != Some(guarded);
        self.dirty_since = None;
        self.last_change = None;
        if full {
            let mut plan = planner.plan();
            if guarded {
                guard_plan(&mut plan);
            }
            let interfaces: Vec<(String, usize)> = plan
                .interfaces
                .iter()
                .map(|i| (i.name.clone(), i.peers.len()))
                .collect();
            let routes = plan.routes.len();
            let started = Instant::now();
            // Handed over: the dataplane keeps it as the plan it applied, with no copy.
            let result = self.dataplane.reconcile_owned(plan);
            let seconds = started.elapsed().as_secs_f64();
            self.pending.clear();
            match result {
                Ok(report) => {
                    self.metrics.reconciled(ApplyKind::Full, true, seconds);
                    info!(
                        operations = report.operations,
                        peers = interfaces.iter().map(|(_, n)| n).sum::<usize>(),
                        routes,
                        guarded,
                        "reconciled the full plan"
                    );
                    for w in &report.warnings {
                        warn!("{w}");
                    }
                    self.interfaces = interfaces;
                    self.interfaces_stale = false;
                    self.metrics.set_peers(self.interfaces.iter().cloned());
                    if !self.applied_once {
                        let peers: usize = self.interfaces.iter().map(|(_, n)| n).sum();
                        self.notice(
                            NoticeKind::Normal,
                            "MeshApplied",
                            format!(
                                "programmed the mesh: {peers} peers, {routes} routes{}",
                                if guarded {
                                    "; the node's own traffic stays outside the tunnel until its key is confirmed"
                                } else {
                                    ""
                                }
                            ),
                        );
                    }
                    self.succeeded(guarded);
                }
                Err(e) => self.failed(ApplyKind::Full, seconds, &e.to_string(), now),
            }
        } else {
            let deltas = std::mem::take(&mut self.pending);
            for mut delta in deltas {
                if guarded {
                    guard_delta(&mut delta);
                }
                let started = Instant::now();
                let result = self.dataplane.apply_delta(&delta);
                let seconds = started.elapsed().as_secs_f64();
                match result {
                    Ok(report) => {
                        self.metrics.reconciled(ApplyKind::Delta, true, seconds);
                        self.count_peers(&delta);
                        debug!(
                            operations = report.operations,
                            summary = %delta.summary(),
                            "applied a delta"
                        );
                        self.succeeded(guarded);
                    }
                    Err(e) => {
                        self.failed(ApplyKind::Delta, seconds, &e.to_string(), now);
                        break;
                    }
                }
            }
        }
    }

    fn succeeded(&mut self, guarded: bool) {
        if self.failures > 0 {
            self.notice(
                NoticeKind::Normal,
                "ApplyRecovered",
                format!(
                    "the node matches the plan again after {} failed attempts",
                    self.failures
                ),
            );
        }
        self.full = false;
        self.failures = 0;
        self.retry_at = None;
        self.applied_guard = Some(guarded);
        self.applied_once = true;
        self.last_error = None;
    }

    fn failed(&mut self, kind: ApplyKind, seconds: f64, error: &str, now: Instant) {
        self.metrics.reconciled(kind, false, seconds);
        self.metrics.error("dataplane");
        self.failures = self.failures.saturating_add(1);
        if self.failures == 1 {
            self.notice(
                NoticeKind::Warning,
                "ApplyFailed",
                format!("programming the node failed (retrying with backoff): {error}"),
            );
        }
        let wait = self.settings.apply_backoff.delay(self.failures);
        warn!(error, retry_in = ?wait, "dataplane update failed; a full reconcile follows");
        self.full = true;
        self.pending.clear();
        self.retry_at = Some(now + wait);
        self.last_error = Some(error.to_owned());
        self.dirty_since.get_or_insert(now);
    }

    /// Looks at the cluster's findings again (after a change of refused or disputed claims,
    /// and at every rebuild): each new one is logged once; one that involves this node is
    /// raised as an Event on every node it names; all are counted by kind.
    fn review_findings(&mut self) {
        self.findings_stale = false;
        let Some(planner) = &self.planner else {
            return;
        };
        let (refused, disputed) = self.claim_counts;
        self.metrics.set_claims(refused, disputed);
        let current: HashSet<Diagnostic> = planner.findings().into_iter().collect();
        let mut by_kind: BTreeMap<&'static str, usize> = BTreeMap::new();
        for d in &current {
            *by_kind.entry(d.kind()).or_default() += 1;
        }
        self.metrics.set_findings(by_kind);
        let mut new: Vec<&Diagnostic> = current.difference(&self.findings).collect();
        new.sort_by_key(|d| d.to_string());
        let mut notices = Vec::new();
        for d in new {
            match d.kind() {
                "plain" => debug!(finding = %d, "cluster finding"),
                "no_cluster_cidrs" => warn!(
                    finding = %d,
                    "hijack protection needs mesh.cluster_cidrs: without it a node's claims to addresses outside the cluster are only refused when they are special or another node's"
                ),
                _ => warn!(finding = %d, nodes = ?d.nodes(), "cluster finding"),
            }
            let Some(reason) = event_reason(d) else {
                continue;
            };
            if d.nodes().contains(&self.settings.node_name.as_str()) {
                for node in d.nodes() {
                    notices.push(Notice::new(
                        node,
                        NoticeKind::Warning,
                        reason,
                        d.to_string(),
                    ));
                }
            }
        }
        for n in notices {
            self.push_notice(n);
        }
        self.findings = current;
    }

    /// The crossing-initiation watchdog's turn (see [`Dataplane::check_handshakes`]).
    fn check_handshakes(&mut self) {
        match self.dataplane.check_handshakes() {
            Ok(_) => {}
            Err(e) => {
                self.metrics.error("dataplane");
                warn!(error = %e, "handshake watchdog failed");
            }
        }
    }

    /// Keeps the peer count of each interface current through a delta (a whole plan is
    /// counted again only when interfaces come or go).
    fn count_peers(&mut self, delta: &PlanDelta) {
        if !delta.interfaces_added.is_empty() || !delta.interfaces_removed.is_empty() {
            self.interfaces_stale = true;
            return;
        }
        let mut count = |name: &str, change: isize| {
            if let Some((_, n)) = self.interfaces.iter_mut().find(|(i, _)| i == name) {
                *n = n.saturating_add_signed(change);
            } else {
                self.interfaces_stale = true;
            }
        };
        for p in &delta.peers_added {
            count(&p.interface, 1);
        }
        for p in &delta.peers_removed {
            count(&p.interface, -1);
        }
    }

    /// Reads the peers' counters (and strict mode's) for metrics and the Node condition.
    ///
    /// Proportional to the peers, not to the plan: at 5,000 nodes × 110 pods, building the
    /// whole plan here (560,000 routes) to count peers and name them stalled the event loop
    /// for about 0.9 s every `stats_interval`.
    fn refresh_stats(&mut self) {
        let Some(planner) = &self.planner else {
            return;
        };
        if self.interfaces_stale {
            self.interfaces = planner
                .plan()
                .interfaces
                .iter()
                .map(|i| (i.name.clone(), i.peers.len()))
                .collect();
            self.interfaces_stale = false;
        }
        self.metrics.set_peers(self.interfaces.iter().cloned());
        match self.dataplane.strict_drops() {
            Ok(drops) => self.metrics.set_strict_drops(drops),
            Err(e) => {
                self.metrics.set_strict_drops(None);
                warn!(error = %e, "reading strict mode's drop counters failed");
            }
        }
        match self.dataplane.peer_stats() {
            Ok(Some(stats)) => {
                self.fresh_handshakes = Some(fresh_handshakes(&stats, (self.wall_clock)()));
                // A peer is named by the node that publishes its key (no name when several
                // nodes publish it: the planner takes at most one of them as a peer).
                let mut owners: HashMap<PublicKey, Option<&str>> = HashMap::new();
                for info in self.view.nodes() {
                    let name = info.node.name.as_str();
                    for family in Family::ALL {
                        let Some(key) = info.node.wireguard.as_ref().and_then(|w| w.key(family))
                        else {
                            continue;
                        };
                        owners
                            .entry(key)
                            .and_modify(|o| {
                                if *o != Some(name) {
                                    *o = None;
                                }
                            })
                            .or_insert(Some(name));
                    }
                }
                let rows = stats
                    .iter()
                    .map(|s| {
                        let node = owners.get(&s.public_key).copied().flatten().unwrap_or("");
                        PeerRow::new(node.to_owned(), s.clone())
                    })
                    .collect();
                self.metrics.set_peer_rows(rows);
            }
            Ok(None) => self.fresh_handshakes = None,
            Err(e) => {
                self.fresh_handshakes = None;
                warn!(error = %e, "reading peer counters failed");
                self.metrics.error("dataplane");
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Scheduled key rotation (`crate::rotation`).

    /// When the current key is due for rotation, on the agent's clock.
    fn key_due(&mut self, now: Instant, interval: Duration) -> Instant {
        let wall = (self.wall_clock)();
        let since = self.dataplane.key_since();
        let born = *self.rotation.key_born.get_or_insert_with(|| {
            let age = since
                .and_then(|s| wall.duration_since(s).ok())
                .unwrap_or_default();
            now.checked_sub(age).unwrap_or(now)
        });
        self.due_after(born, interval)
    }

    /// When a key made at `born` is due: the interval plus this node's fixed jitter.
    fn due_after(&self, born: Instant, interval: Duration) -> Instant {
        born + interval + jitter(&self.settings.rotation, &self.settings.node_name)
    }

    /// The rotation interval, when this agent rotates at all (an interval is set, the
    /// dataplane can rotate keys, the mesh is on and planning has started).
    fn rotation_interval(&self) -> Option<Duration> {
        let interval = self.settings.rotation.interval?;
        let active = !self.rotation.unsupported && self.enabled() && self.planner.is_some();
        active.then_some(interval)
    }

    /// When [`Self::rotate`] next has something to do (`None`: only an input can change it:
    /// the echo of an announcement or of the key). Mirrors `rotate`'s conditions, so a due
    /// time always means progress.
    fn rotation_due(&self, now: Instant) -> Option<Instant> {
        let interval = self.rotation_interval()?;
        let info = self.view.node(&self.settings.node_name)?;
        if let Some(retry) = self.rotation.retry_at.filter(|t| *t > now) {
            return Some(retry);
        }
        match self.dataplane.next_public_key() {
            Some(next) => match self.rotation.announced {
                None => Some(now),
                Some(_) if crate::rotation::announced(info) != Some(next) => None,
                Some(since) => Some((since + self.settings.rotation.settle).max(now)),
            },
            None => {
                let Some(born) = self.rotation.key_born else {
                    return Some(now);
                };
                let due = self.due_after(born, interval);
                if due > now {
                    Some(due)
                } else if self.key_check().is_some_and(|k| k.confirmed()) {
                    Some(now)
                } else {
                    None
                }
            }
        }
    }

    /// The other nodes whose announcement counts toward the bound now; a node whose
    /// announcement this agent has seen for longer than `announcement_limit` does not, and is
    /// named once in a warning and counted in `wgmesh_key_rotation_stale_announcements_total`.
    fn rotating_others(&mut self, ours: &str, now: Instant) -> Vec<String> {
        let limit = self.settings.rotation.announcement_limit;
        let counted = self
            .rotation
            .seen
            .counted(self.view.nodes(), ours, now, limit);
        for node in &counted.newly_stale {
            warn!(
                %node,
                limit_seconds = limit.as_secs(),
                "key rotation: node has announced a next key for longer than the limit without switching; its announcement no longer counts toward key_rotation_max_concurrent"
            );
            self.metrics.stale_announcement();
        }
        counted.rotating
    }

    /// One step of the key rotation, if one is due: make and keep the next key, give it up
    /// (collision, bound), or switch to it once its announcement has come back and settled.
    fn rotate(&mut self, now: Instant) {
        let Some(interval) = self.rotation_interval() else {
            return;
        };
        let ours = self.settings.node_name.clone();
        let Some(info) = self.view.node(&ours) else {
            return;
        };
        let published_next = crate::rotation::announced(info);
        let due = self.key_due(now, interval);
        let born = self.rotation.key_born.unwrap_or(now);
        self.metrics
            .set_key_age(Some(now.saturating_duration_since(born).as_secs_f64()));
        if self.rotation.retry_at.is_some_and(|t| now < t) {
            return;
        }
        let max = self.settings.rotation.max_concurrent.max(1);
        let retry = now + self.settings.rotation.retry;
        let Some(next) = self.dataplane.next_public_key() else {
            self.rotation.announced = None;
            if now < due || !self.key_check().is_some_and(|k| k.confirmed()) {
                return;
            }
            let others = self.rotating_others(&ours, now);
            if others.len() >= max {
                debug!(rotating = ?others, max, "key rotation due; waiting while other nodes rotate");
                self.metrics.rotation("deferred");
                self.rotation.retry_at = Some(retry);
                return;
            }
            match self.dataplane.create_next_key() {
                Ok(Some(next)) => {
                    info!(next_public_key = %next, "key rotation: made the next key and kept it on disk; announcing it");
                    self.metrics.rotation("started");
                    self.rotation.announced = Some(now);
                }
                Ok(None) => {
                    warn!("key_rotation_interval is set, but this dataplane cannot rotate keys");
                    self.rotation.unsupported = true;
                }
                Err(e) => {
                    warn!(error = %e, "key rotation: could not keep a next key; retrying later");
                    self.metrics.rotation("failed");
                    self.metrics.error("rotation");
                    self.rotation.retry_at = Some(retry);
                }
            }
            return;
        };
        let since = *self.rotation.announced.get_or_insert(now);
        let clash = collides(next, self.view.nodes(), &ours);
        let others = self.rotating_others(&ours, now);
        let give_up = if !clash.is_empty() {
            warn!(nodes = ?clash, next_public_key = %next, "key rotation: another node publishes our next key; making another");
            self.metrics.rotation("collision");
            Some(now)
        } else if published_next == Some(next) && must_yield(&ours, &others, max) {
            info!(rotating = ?others, max, "key rotation: more nodes rotate than allowed; giving way");
            self.metrics.rotation("deferred");
            Some(retry)
        } else {
            None
        };
        if let Some(again) = give_up {
            match self.dataplane.discard_next_key() {
                Ok(()) => self.rotation.announced = None,
                Err(e) => {
                    warn!(error = %e, "key rotation: could not remove the next key");
                    self.metrics.error("rotation");
                }
            }
            self.rotation.retry_at = Some(again);
            return;
        }
        // Switch once the API server has the announcement (our watch shows it) and it has
        // settled, so every agent has seen it.
        if published_next != Some(next) || now < since + self.settings.rotation.settle {
            return;
        }
        match self.dataplane.switch_to_next_key() {
            Ok(()) => {
                info!(public_key = %next, "key rotation: switched to the next key; publishing it");
                self.metrics.rotation("completed");
                self.rotation.key_born = Some(now);
                self.rotation.announced = None;
                self.full = true;
            }
            Err(e) => {
                warn!(error = %e, "key rotation: could not switch to the next key; retrying later");
                self.metrics.rotation("failed");
                self.metrics.error("rotation");
                self.rotation.retry_at = Some(retry);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // This node's own leave or join in phases (`crate::phase`).

    /// Whether this node's phase marker, as the watch shows it, is `phase`, with the keys it
    /// publishes now (the echo of the publication that set it).
    fn own_marker_echoed(&self, phase: Phase) -> bool {
        self.view
            .node(&self.settings.node_name)
            .is_some_and(|info| {
                info.published.phase.as_deref().and_then(parse_phase) == Some(phase)
                    && Family::ALL.iter().all(|f| {
                        info.node.address(*f).is_none()
                            || self.dataplane.public_key(*f).is_none()
                            || info.published.has_key(*f, self.dataplane.public_key(*f))
                    })
            })
    }

    /// When [`Self::step_phase`] next has something to do (`None`: only an input).
    fn own_phase_due(&self, now: Instant) -> Option<Instant> {
        if self.own.done || !self.nodes_synced {
            return None;
        }
        let settle = self
            .own
            .echoed
            .map(|t| (t + self.settings.phase.settle).max(now));
        // A leave whose marker never comes back ends after the grace all the same.
        let give_up = self
            .own
            .started
            .filter(|_| self.own.want == Some(Phase::Leaving))
            .map(|t| (t + self.settings.phase.grace).max(now));
        settle.into_iter().chain(give_up).min()
    }

    /// One step of this node's own sequence: which marker it wants published, whether the
    /// settle time after its echo is over, and (leaving) when to let the mesh go.
    fn step_phase(&mut self, now: Instant) {
        if !self.nodes_synced {
            return;
        }
        let ours = self.settings.node_name.clone();
        let info = self.view.node(&ours);
        let marker = info
            .and_then(|i| i.published.phase.as_deref())
            .and_then(parse_phase);
        let published_keys = info.is_some_and(|i| {
            Family::ALL
                .iter()
                .any(|f| i.published.key(*f).is_some_and(|t| !t.trim().is_empty()))
        });
        let have_keys = Family::ALL
            .iter()
            .any(|f| self.dataplane.public_key(*f).is_some());
        let enabled = self.enabled();
        if !self.own.done {
            let phase = if enabled {
                Phase::Joining
            } else {
                Phase::Leaving
            };
            // Joining: no key published yet, or a join under way (an earlier run's marker).
            // Leaving: a key still published, or a leave under way.
            // Strict mode has no phases (see `gate_phase`): the node joins and leaves at once.
            let start = info.is_some()
                && have_keys
                && !self.view.mesh().strict_mode
                && if enabled {
                    !published_keys || marker == Some(Phase::Joining)
                } else {
                    published_keys || marker == Some(Phase::Leaving)
                };
            if self.own.want.is_none() && start {
                info!(node = %ours, %phase, settle_seconds = self.settings.phase.settle.as_secs(), "publishing the phase marker: {}", if enabled { "joining the mesh" } else { "leaving the mesh" });
                self.own.want = Some(phase);
                self.own.started = Some(now);
            }
            match self.own.want {
                None => self.own.done = true,
                Some(phase) => {
                    if self.own.echoed.is_none() && self.own_marker_echoed(phase) {
                        self.own.echoed = Some(now);
                    }
                    let settled = self
                        .own
                        .echoed
                        .is_some_and(|t| now >= t + self.settings.phase.settle);
                    let given_up = !settled
                        && phase == Phase::Leaving
                        && self
                            .own
                            .started
                            .is_some_and(|t| now >= t + self.settings.phase.grace);
                    if given_up {
                        warn!(node = %ours, grace_seconds = self.settings.phase.grace.as_secs(), "the leaving marker did not come back through the watch within the grace; leaving all the same");
                    }
                    if settled || given_up {
                        self.own.done = true;
                        self.own.want = None;
                        let (reason, note) = if enabled {
                            (
                                "JoinedMesh",
                                "joined the WireGuard mesh in phases: peers had the node's key for the settle time; removing the joining marker",
                            )
                        } else {
                            (
                                "LeftMesh",
                                "left the WireGuard mesh in phases: peers routed to the node plain for the settle time; dropping the device and withdrawing the key",
                            )
                        };
                        info!(node = %ours, "{note}");
                        self.notice(NoticeKind::Normal, reason, note.to_owned());
                    }
                }
            }
        }
        if self.own.done && self.own.holding {
            self.own.holding = false;
            let changes = self.view.set_enabled(false);
            self.feed(changes, now);
            // Drop the device now, in this poll, before the key is withdrawn (the publication
            // comes after the flush).
            self.dirty_since = None;
            self.last_change = None;
        }
    }

    // ---------------------------------------------------------------------------------------
    // Publication of the node's keys.

    /// What the node's annotations should be changed to, if anything (ignoring backoff).
    pub fn publication(&self) -> Option<Publication> {
        if !self.nodes_synced {
            return None;
        }
        // Never publish to a Node that is not there: server-side apply would create it.
        let info = self.view.node(&self.settings.node_name)?;
        let mut apply = BTreeMap::new();
        // While the node leaves in phases its keys stay published, with the marker.
        let leaving = self.own.want == Some(Phase::Leaving);
        if self.enabled() || leaving {
            for family in Family::ALL {
                if info.node.address(family).is_some()
                    && let Some(key) = self.dataplane.public_key(family)
                {
                    apply.insert(key_annotation(family).to_owned(), key.to_base64());
                }
            }
            if let Some(mtu) = self.settings.underlay_mtu {
                apply.insert(UNDERLAY_MTU_ANNOTATION.to_owned(), mtu.to_string());
            }
            if let Some(next) = self.dataplane.next_public_key()
                && !leaving
            {
                apply.insert(NEXT_PUBLIC_KEY_ANNOTATION.to_owned(), next.to_base64());
            }
            // A marker goes with a key only: a node that publishes none has no phase.
            if let Some(phase) = self.own.want
                && Family::ALL
                    .iter()
                    .any(|f| apply.contains_key(key_annotation(*f)))
            {
                apply.insert(PHASE_ANNOTATION.to_owned(), phase.as_str().to_owned());
            }
        }
        let remove: Vec<String> = Family::ALL
            .into_iter()
            .map(key_annotation)
            .chain([NEXT_PUBLIC_KEY_ANNOTATION, PHASE_ANNOTATION])
            .filter(|a| !apply.contains_key(*a))
            .filter(|a| info.published.annotation(a).is_some())
            .map(str::to_owned)
            .collect();
        let applied = apply
            .iter()
            .all(|(k, v)| info.published.annotation(k) == Some(v.as_str()));
        if applied && remove.is_empty() {
            return None;
        }
        Some(Publication {
            node: self.settings.node_name.clone(),
            apply,
            remove,
        })
    }

    fn due_publication(&mut self, now: Instant) -> Option<Publication> {
        let Some(publication) = self.publication() else {
            if self.publish != PublishState::InFlight {
                self.publish = PublishState::Idle;
            }
            let since = *self.confirmed_since.get_or_insert(now);
            if now >= since + self.settings.publish_backoff.max {
                self.publish_attempts = 0;
            }
            return None;
        };
        self.confirmed_since = None;
        match self.publish {
            PublishState::InFlight => return None,
            PublishState::AwaitingEcho { until } if now < until => return None,
            _ => {}
        }
        if self.next_publish.is_some_and(|t| now < t) {
            return None;
        }
        self.publish = PublishState::InFlight;
        self.publishing = Some(publication.clone());
        Some(publication)
    }

    // ---------------------------------------------------------------------------------------
    // The Node condition.

    /// Reads the wall clock from `clock` instead of the system's (for handshake ages; tests).
    pub fn set_wall_clock(&mut self, clock: fn() -> SystemTime) {
        self.wall_clock = clock;
    }

    /// The condition the node should carry now.
    pub fn condition(&self) -> MeshCondition {
        mesh_condition(&ConditionInputs {
            synced: self.synced() && self.planner.is_some(),
            enabled: self.enabled(),
            error: self.last_error.clone(),
            applied: self.applied_once,
            key_confirmed: self.key_check().is_some_and(|k| k.confirmed()),
            interfaces: self.interfaces.clone(),
            fresh_handshakes: self.fresh_handshakes,
        })
    }

    /// When the condition is next due to be written (`None`: not before an input changes).
    fn status_due(&self, now: Instant) -> Option<Instant> {
        let s = &self.status;
        if !self.nodes_synced || s.in_flight || s.outbox.is_some() {
            return None;
        }
        // Never write to a Node that is not there.
        self.view.node(&self.settings.node_name)?;
        let desired = self.condition();
        let earliest = |since: Option<Instant>, gap: Duration| since.map_or(now, |t| t + gap);
        let retry = s.last_attempt.map(|t| {
            t + self
                .settings
                .publish_backoff
                .jittered(s.failures, &self.settings.node_name)
        });
        let due = match &s.written {
            None => s.first_due.unwrap_or(now),
            Some(w) if w.status != desired.status => {
                earliest(s.last_attempt, self.settings.status_min_interval)
            }
            Some(w) if *w != desired => earliest(s.last_ok, self.settings.status_refresh_interval),
            Some(_) => earliest(s.last_ok, self.settings.status_heartbeat),
        };
        Some(retry.map_or(due, |r| due.max(r)))
    }

    fn schedule_status(&mut self, now: Instant) {
        if self.nodes_synced && self.status.first_due.is_none() {
            self.status.first_due = Some(now + self.settings.status_min_interval);
        }
        if self.status.written.is_none()
            && self.status.last_attempt.is_none()
            && let Some(node) =
                self.nodes
                    .as_reader()
                    .get(&kube::runtime::reflector::ObjectRef::new(
                        &self.settings.node_name,
                    ))
            && let Some(previous) = published_condition(&node)
        {
            // Written by an earlier run: a restart with nothing new writes nothing.
            self.status.written = Some(previous.condition);
            self.status.since = previous.since;
            self.status.last_ok = Some(now);
        }
        if self.status_due(now).is_none_or(|t| now < t) {
            return;
        }
        let condition = self.condition();
        let since = match &self.status.written {
            Some(w) if w.status == condition.status => self.status.since.clone(),
            _ => None,
        };
        self.status.in_flight = true;
        self.status.last_attempt = Some(now);
        self.status.outbox = Some(StatusUpdate::new(
            self.settings.node_name.clone(),
            condition,
            since,
        ));
    }

    /// The condition to write, if one is due (the shell writes it and reports with
    /// [`Self::on_status_written`]).
    pub fn take_status_update(&mut self) -> Option<StatusUpdate> {
        self.status.outbox.take()
    }

    /// The outcome of writing a [`StatusUpdate`]: the `lastTransitionTime` written, or why
    /// it failed.
    pub fn on_status_written(
        &mut self,
        update: &StatusUpdate,
        result: Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time, String>,
        now: Instant,
    ) {
        self.status.in_flight = false;
        match result {
            Ok(since) => {
                self.status.failures = 0;
                self.status.last_ok = Some(now);
                self.status.written = Some(update.condition.clone());
                self.status.since = Some(since);
            }
            Err(e) => {
                self.status.failures = self.status.failures.saturating_add(1);
                warn!(error = %e, "writing the node's WireGuardMeshReady condition failed");
                self.metrics.error("status");
            }
        }
    }

    /// A summary for health checks.
    pub fn state(&self) -> AgentState {
        self.metrics.state()
    }
}

/// The Event reason of a finding worth an Event (a claim refused, colliding, over its limit,
/// an MTU not followed); `None` for the others (plain nodes, missing cluster_cidrs).
fn event_reason(d: &Diagnostic) -> Option<&'static str> {
    Some(match d.kind() {
        "refused" => "ClaimRefused",
        "clash" => "ClaimConflict",
        "duplicate_key" => "DuplicateKey",
        "over_limit" => "ClaimsOverLimit",
        "mtu_below_floor" => "UnderlayMtuIgnored",
        "mtu_above_underlay" => "MtuAboveUnderlay",
        _ => return None,
    })
}
