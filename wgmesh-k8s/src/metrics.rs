//! Prometheus metrics and health of the agent, rendered in the text exposition format.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `wgmesh_build_info` | gauge, always 1 | `version`, `revision` |
//! | `wgmesh_peers` | gauge | `interface` |
//! | `wgmesh_peer_last_handshake_timestamp_seconds` | gauge: Unix time of the latest handshake (0: none yet) | `interface`, `node`, `public_key` |
//! | `wgmesh_peer_receive_bytes_total`, `wgmesh_peer_transmit_bytes_total` | counter | `interface`, `node`, `public_key` |
//! | `wgmesh_reconciles_total` | counter | `kind` (`full`, `delta`), `result` (`ok`, `error`) |
//! | `wgmesh_reconcile_duration_seconds` | histogram | `kind` |
//! | `wgmesh_errors_total` | counter | `source` (`dataplane`, `publish`, `watch_nodes`, `watch_pods`, `planner`, `status`) |
//! | `wgmesh_publishes_total` | counter | `result` |
//! | `wgmesh_key_age_seconds` | gauge | — (only with `key_rotation_interval`) |
//! | `wgmesh_key_rotations_total` | counter | `result` (`started`, `completed`, `deferred`, `collision`, `failed`) |
//! | `wgmesh_phase_markers_expired_total` | counter: other nodes' phase markers (`wgmesh.io/phase`) that outlived `phase_grace_seconds` and are ignored since (the warning names each node) | — |
//! | `wgmesh_key_rotation_stale_announcements_total` | counter: other nodes' next-key announcements that outlived `announcement_limit` and stopped counting toward the bound (the warning names each node) | — |
//! | `wgmesh_warnings_total` | counter | — |
//! | `wgmesh_findings` | gauge | `kind` (`refused`, `clash`, `duplicate_key`, `over_limit`, `mtu_below_floor`, …) |
//! | `wgmesh_refused_claims`, `wgmesh_disputed_prefixes` | gauge | — |
//! | `wgmesh_strict_dropped_packets_total` | counter: packets strict mode's ingress filter dropped (while it is installed) | `direction` (`ingress`), `family` (`ipv4`, `ipv6`) |
//! | `wgmesh_nodes`, `wgmesh_workload_pods` | gauge | — |
//! | `wgmesh_key_published` | gauge: 1 when the node's published keys are the ones it uses | — |
//! | `wgmesh_bootstrap_guard` | gauge: 1 while host traffic is kept outside the tunnel | — |
//! | `wgmesh_ready` | gauge | — |
//!
//! Peer counters appear only when the dataplane can read them, and only while per-peer series
//! are on ([`Metrics::set_per_peer`]; `metrics_per_peer` in the configuration): each agent
//! exports one series per peer, so a cluster of N nodes exports N² of them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use wgmesh_netlink::PeerStats;

/// Upper bounds of the reconcile duration histogram, in seconds.
pub const DURATION_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// How a plan reached the dataplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ApplyKind {
    /// A full reconcile.
    Full,
    /// A delta.
    Delta,
}

impl ApplyKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Delta => "delta",
        }
    }
}

/// One peer's counters, with the node it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerRow {
    /// The node behind the peer (empty if unknown).
    pub node: String,
    /// The counters the dataplane read.
    pub stats: PeerStats,
}

impl PeerRow {
    /// One peer's counters, labelled with its node.
    pub fn new(node: impl Into<String>, stats: PeerStats) -> Self {
        Self {
            node: node.into(),
            stats,
        }
    }
}

/// What the running program is, for `wgmesh_build_info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BuildInfo {
    /// The program's version.
    pub version: String,
    /// The commit it was built from (empty when unknown).
    pub revision: String,
}

impl BuildInfo {
    /// A program's version and commit.
    ///
    /// ```
    /// use wgmesh_k8s::metrics::{BuildInfo, Metrics};
    /// let metrics = Metrics::new();
    /// metrics.set_build_info(BuildInfo::new("0.1.0", "0123456789ab"));
    /// let text = metrics.render();
    /// assert!(text.contains("wgmesh_build_info{version=\"0.1.0\",revision=\"0123456789ab\"} 1\n"));
    /// ```
    pub fn new(version: impl Into<String>, revision: impl Into<String>) -> Self {
        Self {
            version: version.into(),
            revision: revision.into(),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; DURATION_BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// A summary of the agent's state, for `/readyz` and the gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentState {
    /// Nodes (and pods, when tracked) have been listed.
    pub synced: bool,
    /// The last dataplane call succeeded, and there was one.
    pub applied: bool,
    /// The node's published keys are the ones its dataplane uses.
    pub key_published: bool,
    /// Host traffic is kept outside the tunnel until the keys are confirmed.
    pub guarded: bool,
    /// The last error, if the agent is not healthy.
    pub last_error: Option<String>,
}

impl AgentState {
    /// Ready: synced and the dataplane matches the plan.
    pub fn ready(&self) -> bool {
        self.synced && self.applied
    }
}

#[derive(Debug, Default)]
struct Inner {
    build: BuildInfo,
    refused_claims: usize,
    disputed_prefixes: usize,
    findings: BTreeMap<&'static str, usize>,
    hide_peers: bool,
    peers: BTreeMap<String, usize>,
    peer_rows: Vec<PeerRow>,
    strict_drops: Option<wgmesh_netlink::marking::StrictDrops>,
    reconciles: BTreeMap<(ApplyKind, bool), u64>,
    durations: BTreeMap<ApplyKind, Histogram>,
    errors: BTreeMap<&'static str, u64>,
    publishes: BTreeMap<bool, u64>,
    key_age: Option<f64>,
    rotations: BTreeMap<&'static str, u64>,
    stale_announcements: u64,
    expired_phase_markers: u64,
    warnings: u64,
    nodes: usize,
    pods: usize,
    state: AgentState,
    heartbeat: Option<Instant>,
}

/// The agent's metrics; cheap to clone (shared).
///
/// ```
/// use std::time::SystemTime;
/// use wgmesh_k8s::metrics::{ApplyKind, Metrics};
/// let metrics = Metrics::new();
/// metrics.reconciled(ApplyKind::Delta, true, 0.002);
/// let text = metrics.render();
/// assert!(text.contains("wgmesh_reconciles_total{kind=\"delta\",result=\"ok\"} 1\n"));
/// assert!(text.contains("wgmesh_reconcile_duration_seconds_bucket{kind=\"delta\",le=\"0.005\"} 1\n"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets what `wgmesh_build_info` reports.
    pub fn set_build_info(&self, build: BuildInfo) {
        self.lock().build = build;
    }

    /// Turns the per-peer series on (the default) or off.
    pub fn set_per_peer(&self, on: bool) {
        self.lock().hide_peers = !on;
    }

    /// Counts a dataplane call and its duration.
    pub fn reconciled(&self, kind: ApplyKind, ok: bool, seconds: f64) {
        let mut m = self.lock();
        *m.reconciles.entry((kind, ok)).or_default() += 1;
        let h = m.durations.entry(kind).or_default();
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.buckets[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// Counts an error.
    pub fn error(&self, source: &'static str) {
        *self.lock().errors.entry(source).or_default() += 1;
    }

    /// Counts a publish of the node's annotations.
    pub fn published(&self, ok: bool) {
        *self.lock().publishes.entry(ok).or_default() += 1;
    }

    /// Sets the age of the node's private key in seconds (`None`: not exported).
    pub fn set_key_age(&self, seconds: Option<f64>) {
        self.lock().key_age = seconds;
    }

    /// Counts a step of a key rotation by result (`started`, `completed`, `deferred`,
    /// `collision`, `failed`).
    pub fn rotation(&self, result: &'static str) {
        *self.lock().rotations.entry(result).or_default() += 1;
    }

    /// Counts another node's announcement that outlived the rotation's announcement limit.
    pub fn stale_announcement(&self) {
        self.lock().stale_announcements += 1;
    }

    /// Counts a node's phase marker that outlived the phase grace.
    pub fn phase_marker_expired(&self) {
        self.lock().expired_phase_markers += 1;
    }

    /// How many phase markers outlived the grace.
    pub fn expired_phase_markers(&self) -> u64 {
        self.lock().expired_phase_markers
    }

    /// How many other nodes' announcements outlived the limit.
    pub fn stale_announcements(&self) -> u64 {
        self.lock().stale_announcements
    }

    /// How many rotation steps ended with `result`.
    pub fn rotations(&self, result: &str) -> u64 {
        self.lock().rotations.get(result).copied().unwrap_or(0)
    }

    /// Counts warnings about the cluster's objects.
    pub fn warned(&self, n: usize) {
        self.lock().warnings += n as u64;
    }

    /// Sets the claims the planner refuses and the prefixes it gives to nobody.
    pub fn set_claims(&self, refused: usize, disputed: usize) {
        let mut m = self.lock();
        m.refused_claims = refused;
        m.disputed_prefixes = disputed;
    }

    /// Sets the current findings, counted by kind.
    pub fn set_findings(&self, by_kind: BTreeMap<&'static str, usize>) {
        self.lock().findings = by_kind;
    }

    /// Sets the size of the known cluster.
    pub fn set_cluster(&self, nodes: usize, pods: usize) {
        let mut m = self.lock();
        m.nodes = nodes;
        m.pods = pods;
    }

    /// Sets the number of peers per interface.
    pub fn set_peers(&self, peers: impl IntoIterator<Item = (String, usize)>) {
        self.lock().peers = peers.into_iter().collect();
    }

    /// Sets strict mode's drop counters (`None`: strict mode's filter is not installed, and
    /// the series are not exported).
    pub fn set_strict_drops(&self, drops: Option<wgmesh_netlink::marking::StrictDrops>) {
        self.lock().strict_drops = drops;
    }

    /// Sets the per-peer counters.
    pub fn set_peer_rows(&self, rows: Vec<PeerRow>) {
        self.lock().peer_rows = rows;
    }

    /// Sets the agent's state.
    pub fn set_state(&self, state: AgentState) {
        self.lock().state = state;
    }

    /// The agent's state.
    pub fn state(&self) -> AgentState {
        self.lock().state.clone()
    }

    /// Records that the agent's loop ran at `at`.
    pub fn heartbeat(&self, at: Instant) {
        self.lock().heartbeat = Some(at);
    }

    /// Whether the agent's loop ran within `max_silence` of `now` (liveness).
    pub fn alive(&self, now: Instant, max_silence: Duration) -> bool {
        self.lock()
            .heartbeat
            .is_some_and(|h| now.saturating_duration_since(h) <= max_silence)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };

        head(
            &mut out,
            "wgmesh_build_info",
            "gauge",
            "The agent's version and the commit it was built from; always 1.",
        );
        let _ = writeln!(
            out,
            "wgmesh_build_info{{version=\"{}\",revision=\"{}\"}} 1",
            escape(&m.build.version),
            escape(&m.build.revision)
        );

        head(
            &mut out,
            "wgmesh_peers",
            "gauge",
            "WireGuard peers per interface in the applied plan.",
        );
        for (iface, n) in &m.peers {
            let _ = writeln!(out, "wgmesh_peers{{interface=\"{}\"}} {n}", escape(iface));
        }

        if !m.peer_rows.is_empty() && !m.hide_peers {
            let labels = |r: &PeerRow| {
                format!(
                    "interface=\"{}\",node=\"{}\",public_key=\"{}\"",
                    escape(&r.stats.interface),
                    escape(&r.node),
                    escape(&r.stats.public_key.to_base64())
                )
            };
            head(
                &mut out,
                "wgmesh_peer_last_handshake_timestamp_seconds",
                "gauge",
                "Unix time of the latest handshake with the peer (0: none yet).",
            );
            for r in &m.peer_rows {
                let at = r
                    .stats
                    .last_handshake
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map_or(0.0, |d| d.as_secs_f64());
                let _ = writeln!(
                    out,
                    "wgmesh_peer_last_handshake_timestamp_seconds{{{}}} {}",
                    labels(r),
                    float(at)
                );
            }
            head(
                &mut out,
                "wgmesh_peer_receive_bytes_total",
                "counter",
                "Bytes received from the peer.",
            );
            for r in &m.peer_rows {
                let _ = writeln!(
                    out,
                    "wgmesh_peer_receive_bytes_total{{{}}} {}",
                    labels(r),
                    r.stats.rx_bytes
                );
            }
            head(
                &mut out,
                "wgmesh_peer_transmit_bytes_total",
                "counter",
                "Bytes sent to the peer.",
            );
            for r in &m.peer_rows {
                let _ = writeln!(
                    out,
                    "wgmesh_peer_transmit_bytes_total{{{}}} {}",
                    labels(r),
                    r.stats.tx_bytes
                );
            }
        }

        head(
            &mut out,
            "wgmesh_reconciles_total",
            "counter",
            "Dataplane updates, by kind and result.",
        );
        for kind in [ApplyKind::Full, ApplyKind::Delta] {
            for ok in [true, false] {
                let n = m.reconciles.get(&(kind, ok)).copied().unwrap_or(0);
                let result = if ok { "ok" } else { "error" };
                let _ = writeln!(
                    out,
                    "wgmesh_reconciles_total{{kind=\"{}\",result=\"{result}\"}} {n}",
                    kind.as_str()
                );
            }
        }

        head(
            &mut out,
            "wgmesh_reconcile_duration_seconds",
            "histogram",
            "Time spent in dataplane updates.",
        );
        for (kind, h) in &m.durations {
            let k = kind.as_str();
            for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "wgmesh_reconcile_duration_seconds_bucket{{kind=\"{k}\",le=\"{}\"}} {}",
                    float(*bound),
                    h.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "wgmesh_reconcile_duration_seconds_bucket{{kind=\"{k}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "wgmesh_reconcile_duration_seconds_sum{{kind=\"{k}\"}} {}",
                float(h.sum)
            );
            let _ = writeln!(
                out,
                "wgmesh_reconcile_duration_seconds_count{{kind=\"{k}\"}} {}",
                h.count
            );
        }

        head(
            &mut out,
            "wgmesh_errors_total",
            "counter",
            "Errors, by where they happened.",
        );
        for source in [
            "dataplane",
            "publish",
            "watch_nodes",
            "watch_pods",
            "planner",
            "status",
        ] {
            let n = m.errors.get(source).copied().unwrap_or(0);
            let _ = writeln!(out, "wgmesh_errors_total{{source=\"{source}\"}} {n}");
        }

        head(
            &mut out,
            "wgmesh_publishes_total",
            "counter",
            "Updates of the node's key annotations, by result.",
        );
        for ok in [true, false] {
            let n = m.publishes.get(&ok).copied().unwrap_or(0);
            let result = if ok { "ok" } else { "error" };
            let _ = writeln!(out, "wgmesh_publishes_total{{result=\"{result}\"}} {n}");
        }

        if let Some(age) = m.key_age {
            head(
                &mut out,
                "wgmesh_key_age_seconds",
                "gauge",
                "Age of the node's WireGuard private key (key rotation on).",
            );
            let _ = writeln!(out, "wgmesh_key_age_seconds {}", float(age));
        }
        head(
            &mut out,
            "wgmesh_key_rotations_total",
            "counter",
            "Steps of scheduled key rotations, by result.",
        );
        for result in ["started", "completed", "deferred", "collision", "failed"] {
            let n = m.rotations.get(result).copied().unwrap_or(0);
            let _ = writeln!(out, "wgmesh_key_rotations_total{{result=\"{result}\"}} {n}");
        }
        head(
            &mut out,
            "wgmesh_key_rotation_stale_announcements_total",
            "counter",
            "Other nodes' next-key announcements that outlived the limit and stopped counting toward the bound.",
        );
        let _ = writeln!(
            out,
            "wgmesh_key_rotation_stale_announcements_total {}",
            m.stale_announcements
        );
        head(
            &mut out,
            "wgmesh_phase_markers_expired_total",
            "counter",
            "Nodes' phase markers (wgmesh.io/phase) that outlived the grace and are ignored since.",
        );
        let _ = writeln!(
            out,
            "wgmesh_phase_markers_expired_total {}",
            m.expired_phase_markers
        );

        head(
            &mut out,
            "wgmesh_findings",
            "gauge",
            "Current findings about the cluster (wgmesh_core::diagnostics), by kind.",
        );
        for (kind, n) in &m.findings {
            let _ = writeln!(out, "wgmesh_findings{{kind=\"{kind}\"}} {n}");
        }
        if let Some(d) = m.strict_drops {
            head(
                &mut out,
                "wgmesh_strict_dropped_packets_total",
                "counter",
                "Packets strict mode dropped instead of letting them in or out in plaintext.",
            );
            for (family, n) in [("ipv4", d.ingress_v4), ("ipv6", d.ingress_v6)] {
                let _ = writeln!(
                    out,
                    "wgmesh_strict_dropped_packets_total{{direction=\"ingress\",family=\"{family}\"}} {n}"
                );
            }
        }

        let gauges: [(&str, &str, &str, u64); 9] = [
            (
                "wgmesh_refused_claims",
                "gauge",
                "Claims of nodes and pods the trust rules refuse (on no peer, routed in plaintext).",
                m.refused_claims as u64,
            ),
            (
                "wgmesh_disputed_prefixes",
                "gauge",
                "Prefixes claimed by several nodes: nobody's, routed in plaintext.",
                m.disputed_prefixes as u64,
            ),
            (
                "wgmesh_warnings_total",
                "counter",
                "Unusable values found in Nodes and Pods (malformed keys, addresses, CIDRs).",
                m.warnings,
            ),
            ("wgmesh_nodes", "gauge", "Nodes known.", m.nodes as u64),
            (
                "wgmesh_workload_pods",
                "gauge",
                "Pods holding workload addresses.",
                m.pods as u64,
            ),
            (
                "wgmesh_key_published",
                "gauge",
                "1 when the node's published keys are the keys it uses.",
                u64::from(m.state.key_published),
            ),
            (
                "wgmesh_bootstrap_guard",
                "gauge",
                "1 while the node's own traffic is kept outside the tunnel until its keys are confirmed.",
                u64::from(m.state.guarded),
            ),
            (
                "wgmesh_synced",
                "gauge",
                "1 once Nodes (and Pods) have been listed.",
                u64::from(m.state.synced),
            ),
            (
                "wgmesh_ready",
                "gauge",
                "1 when synced and the dataplane matches the plan.",
                u64::from(m.state.ready()),
            ),
        ];
        for (name, kind, help, value) in gauges {
            head(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}
