//! The boundary between the agent and whatever programs the node: the [`Dataplane`] trait, a
//! plan-level operation list ([`Op`]), and two implementations that program nothing — the
//! [`RecordingDataplane`] for tests and the [`LoggingDataplane`] for dry runs. The real one,
//! over `wgmesh-netlink`, is [`crate::netlink::NetlinkDataplane`].
//!
//! The agent drives a dataplane with full plans ([`Dataplane::reconcile`]: make the node match,
//! whatever it has) and with deltas against the plan last applied ([`Dataplane::apply_delta`]:
//! the incremental path). A failed call is followed by a full reconcile, so an implementation
//! may leave a half-applied state behind.

use std::collections::VecDeque;
use std::fmt;

use ipnet::IpNet;
use serde::Serialize;
use wgmesh_core::delta::MarkingDelta;
use wgmesh_core::{Family, Marking, NodePlan, PlanDelta, PublicKey, Route, Rule, Sysctl, diff};

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

    /// Applies a delta computed against the plan last applied (by `reconcile` or earlier
    /// deltas), without reading the node.
    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<ApplyReport, DataplaneError>;

    /// Per-peer counters, if this dataplane can read them (`None` when it cannot).
    fn peer_stats(&mut self) -> Result<Option<Vec<PeerStats>>, DataplaneError> {
        Ok(None)
    }
}

impl<D: Dataplane + ?Sized> Dataplane for Box<D> {
    fn public_key(&self, family: Family) -> Option<PublicKey> {
        (**self).public_key(family)
    }
    fn reconcile(&mut self, plan: &NodePlan) -> Result<ApplyReport, DataplaneError> {
        (**self).reconcile(plan)
    }
    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<ApplyReport, DataplaneError> {
        (**self).apply_delta(delta)
    }
    fn peer_stats(&mut self) -> Result<Option<Vec<PeerStats>>, DataplaneError> {
        (**self).peer_stats()
    }
}

/// One plan-level operation: what a delta asks of the node, one object at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Op {
    /// Remove a WireGuard interface.
    RemoveInterface {
        /// Its name.
        name: String,
    },
    /// Create a WireGuard interface with these settings.
    AddInterface {
        /// Its name.
        name: String,
        /// Port, fwmark and MTU, as `port/mark/mtu`.
        settings: String,
    },
    /// Change an interface's port, fwmark or MTU.
    SetInterface {
        /// Its name.
        name: String,
        /// `port/mark/mtu`.
        settings: String,
    },
    /// Remove a peer.
    RemovePeer {
        /// The interface.
        interface: String,
        /// The node it stood for.
        node: String,
        /// Its key.
        public_key: PublicKey,
    },
    /// Add a peer.
    AddPeer {
        /// The interface.
        interface: String,
        /// The node.
        node: String,
        /// Its key.
        public_key: PublicKey,
        /// Its endpoint.
        endpoint: String,
        /// Its allowed IPs.
        allowed_ips: Vec<IpNet>,
    },
    /// Change a peer in place.
    UpdatePeer {
        /// The interface.
        interface: String,
        /// The node.
        node: String,
        /// Its key.
        public_key: PublicKey,
        /// Allowed IPs added.
        allowed_ips_added: Vec<IpNet>,
        /// Allowed IPs removed.
        allowed_ips_removed: Vec<IpNet>,
    },
    /// Remove a route (`ip route` syntax).
    RemoveRoute {
        /// The route.
        route: String,
    },
    /// Add a route (`ip route` syntax).
    AddRoute {
        /// The route.
        route: String,
    },
    /// Remove a rule (`ip rule` syntax).
    RemoveRule {
        /// The rule.
        rule: String,
    },
    /// Add a rule (`ip rule` syntax).
    AddRule {
        /// The rule.
        rule: String,
    },
    /// Set a sysctl.
    SetSysctl {
        /// `key=value`.
        sysctl: String,
    },
    /// Stop requiring a sysctl.
    UnsetSysctl {
        /// `key=value`.
        sysctl: String,
    },
    /// Program the packet marking.
    SetMarking {
        /// Whether locally generated packets are marked (host traffic outside the tunnel).
        mark_output: bool,
        /// API server endpoints whose TCP traffic is marked.
        plain_tcp_endpoints: Vec<String>,
    },
    /// Remove the packet marking.
    RemoveMarking,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RemoveInterface { name } => write!(f, "link del {name}"),
            Self::AddInterface { name, settings } => write!(f, "link add {name} {settings}"),
            Self::SetInterface { name, settings } => write!(f, "link set {name} {settings}"),
            Self::RemovePeer {
                interface, node, ..
            } => write!(f, "peer del {interface} {node}"),
            Self::AddPeer {
                interface,
                node,
                endpoint,
                allowed_ips,
                ..
            } => write!(
                f,
                "peer add {interface} {node} endpoint {endpoint} allowed {}",
                join(allowed_ips)
            ),
            Self::UpdatePeer {
                interface,
                node,
                allowed_ips_added,
                allowed_ips_removed,
                ..
            } => write!(
                f,
                "peer set {interface} {node} +[{}] -[{}]",
                join(allowed_ips_added),
                join(allowed_ips_removed)
            ),
            Self::RemoveRoute { route } => write!(f, "route del {route}"),
            Self::AddRoute { route } => write!(f, "route add {route}"),
            Self::RemoveRule { rule } => write!(f, "rule del {rule}"),
            Self::AddRule { rule } => write!(f, "rule add {rule}"),
            Self::SetSysctl { sysctl } => write!(f, "sysctl {sysctl}"),
            Self::UnsetSysctl { sysctl } => write!(f, "sysctl unset {sysctl}"),
            Self::SetMarking {
                mark_output,
                plain_tcp_endpoints,
            } => write!(
                f,
                "marking set output={mark_output} plain_tcp=[{}]",
                plain_tcp_endpoints.join(",")
            ),
            Self::RemoveMarking => f.write_str("marking del"),
        }
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn route_text(r: &Route) -> String {
    r.to_string()
}

fn rule_text(r: &Rule) -> String {
    format!("{} {}", r.family, r.to_string().replace('\t', " "))
}

fn sysctl_text(s: &Sysctl) -> String {
    format!("{}={}", s.key, s.value)
}

fn marking_op(m: &Marking) -> Op {
    Op::SetMarking {
        mark_output: m.mark_output,
        plain_tcp_endpoints: m
            .plain_tcp_endpoints
            .iter()
            .map(ToString::to_string)
            .collect(),
    }
}

/// The operations a delta asks for, in the order an applier should carry them out: removals
/// of rules, routes and peers first, then interfaces, peers, routes, rules, sysctls, marking.
///
/// ```
/// use wgmesh_core::{diff, plan_node, spec::parse_cluster, NodePlan};
/// use wgmesh_k8s::dataplane::ops;
/// let cluster = parse_cluster(r#"{"nodes": [
///   {"name": "a", "addresses": ["10.0.0.1"], "pod_cidrs": ["10.65.0.0/26"],
///    "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
///   {"name": "b", "addresses": ["10.0.0.2"], "pod_cidrs": ["10.65.0.64/26"],
///    "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
/// let plan = plan_node(&cluster, "a")?;
/// let text: Vec<String> = ops(&diff(&NodePlan::empty("a"), &plan)).iter().map(|o| o.to_string()).collect();
/// assert_eq!(text[0], "link add wireguard.cali 51820/0x100000/1440");
/// assert_eq!(text[1], "peer add wireguard.cali b endpoint 10.0.0.2:51820 allowed 10.65.0.64/26");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn ops(delta: &PlanDelta) -> Vec<Op> {
    let settings = |i: &wgmesh_core::InterfacePlan| {
        format!("{}/{:#x}/{}", i.listen_port, i.firewall_mark, i.mtu)
    };
    let mut out = Vec::new();
    out.extend(
        delta
            .rules_removed
            .iter()
            .map(|r| Op::RemoveRule { rule: rule_text(r) }),
    );
    out.extend(delta.routes_removed.iter().map(|r| Op::RemoveRoute {
        route: route_text(r),
    }));
    out.extend(delta.peers_removed.iter().map(|p| Op::RemovePeer {
        interface: p.interface.clone(),
        node: p.node.clone(),
        public_key: p.public_key,
    }));
    out.extend(
        delta
            .interfaces_removed
            .iter()
            .map(|i| Op::RemoveInterface {
                name: i.name.clone(),
            }),
    );
    out.extend(delta.interfaces_added.iter().map(|i| Op::AddInterface {
        name: i.name.clone(),
        settings: settings(i),
    }));
    out.extend(delta.interfaces_changed.iter().map(|i| Op::SetInterface {
        name: i.name.clone(),
        settings: settings(i),
    }));
    out.extend(delta.peers_added.iter().map(|p| Op::AddPeer {
        interface: p.interface.clone(),
        node: p.peer.node.clone(),
        public_key: p.peer.public_key,
        endpoint: p.peer.endpoint.to_string(),
        allowed_ips: p.peer.allowed_ips.clone(),
    }));
    out.extend(delta.peers_updated.iter().map(|p| Op::UpdatePeer {
        interface: p.interface.clone(),
        node: p.node.clone(),
        public_key: p.public_key,
        allowed_ips_added: p.allowed_ips_added.clone(),
        allowed_ips_removed: p.allowed_ips_removed.clone(),
    }));
    out.extend(delta.routes_added.iter().map(|r| Op::AddRoute {
        route: route_text(r),
    }));
    out.extend(
        delta
            .rules_added
            .iter()
            .map(|r| Op::AddRule { rule: rule_text(r) }),
    );
    out.extend(delta.sysctls_added.iter().map(|s| Op::SetSysctl {
        sysctl: sysctl_text(s),
    }));
    out.extend(delta.sysctls_removed.iter().map(|s| Op::UnsetSysctl {
        sysctl: sysctl_text(s),
    }));
    match &delta.marking {
        MarkingDelta::Unchanged => {}
        MarkingDelta::Set(m) => out.push(marking_op(m)),
        MarkingDelta::Removed => out.push(Op::RemoveMarking),
    }
    out
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
/// would have, and the operations that took it there. Faults can be injected.
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
    ops: Vec<Op>,
    node: NodePlan,
    failures: VecDeque<bool>,
    stats: Option<Vec<PeerStats>>,
}

impl RecordingDataplane {
    /// A dataplane whose interfaces use these keys.
    pub fn new(key: Option<PublicKey>, key_v6: Option<PublicKey>) -> Self {
        Self {
            keys: [key, key_v6],
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
    pub fn ops(&self) -> &[Op] {
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
        let ops = ops(&delta);
        let n = ops.len();
        self.ops.extend(ops);
        self.node = plan.clone();
        Ok(ApplyReport::new(n))
    }

    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<ApplyReport, DataplaneError> {
        self.calls.push(Call::Delta(delta.clone()));
        self.fail()?;
        let ops = ops(delta);
        let n = ops.len();
        self.ops.extend(ops);
        self.node.apply_delta(delta);
        Ok(ApplyReport::new(n))
    }

    fn peer_stats(&mut self) -> Result<Option<Vec<PeerStats>>, DataplaneError> {
        Ok(self.stats.clone())
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
        let n = ops(&delta).len();
        tracing::info!(dry_run = true, operations = n, summary = %delta.summary(), "would reconcile");
        self.current = plan.clone();
        Ok(ApplyReport::new(n))
    }

    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<ApplyReport, DataplaneError> {
        let n = ops(delta).len();
        tracing::info!(dry_run = true, operations = n, summary = %delta.summary(), "would apply delta");
        self.current.apply_delta(delta);
        Ok(ApplyReport::new(n))
    }
}
