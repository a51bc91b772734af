//! From Kubernetes objects to the core's model: Nodes to [`wgmesh_core::Node`]s, Pods to
//! workload addresses, and both lists to a [`Cluster`].
//!
//! Nothing here talks to the API server; these are pure functions over `k8s-openapi` values,
//! so they are tested against recorded `kubectl get … -o json` output.
//!
//! | Kubernetes | core |
//! |---|---|
//! | `metadata.name` | `name` |
//! | `status.addresses[type=InternalIP]`, both families, in order | `addresses` (the first of a family is the WireGuard endpoint) |
//! | `spec.podCIDRs` (or the older `spec.podCIDR`) | `pod_cidrs` (the blocks of `cidr_blocks`) |
//! | annotation `wgmesh.io/public-key` (`-v6`) | `wireguard.public_key` (`_v6`) |
//! | annotation `projectcalico.org/WireguardPublicKey` (`V6`), if enabled | the same, when wgmesh's is absent |
//! | annotation `wgmesh.io/underlay-mtu` | `underlay_mtu` (default 1500) |
//! | annotation `wgmesh.io/next-public-key` | not the core's: a key rotation under way ([`crate::rotation`]) |
//! | annotation `wgmesh.io/phase` (`leaving` or `joining`, exactly) | `wireguard.phase`, honoured for a bounded grace ([`crate::phase`]) |
//! | label `node-restriction.kubernetes.io/wgmesh-plain` (any value but `false`) | `wireguard.enabled: false`: explicitly plain, the opt-out of strict mode |
//! | Pods' `status.podIPs` by `spec.nodeName`, without host-network and finished pods | `workload_ips` |
//!
//! Bad values never fail a conversion: a malformed key annotation makes the node plain, a bad
//! address or CIDR is left out, and each case yields an [`AdapterWarning`] that names the node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node as K8sNode, Pod};
use wgmesh_core::error::{elide, one_line};
use wgmesh_core::model::DEFAULT_UNDERLAY_MTU;
use wgmesh_core::{Cluster, Family, MeshConfig, Node, NodeWireGuard, Phase, PublicKey};

/// The annotation that carries a node's IPv4 WireGuard public key (base64, as `wg pubkey`).
pub const PUBLIC_KEY_ANNOTATION: &str = "wgmesh.io/public-key";
/// The annotation that carries a node's IPv6 WireGuard public key.
pub const PUBLIC_KEY_V6_ANNOTATION: &str = "wgmesh.io/public-key-v6";
/// The annotation that carries the MTU of a node's underlay network (decimal).
pub const UNDERLAY_MTU_ANNOTATION: &str = "wgmesh.io/underlay-mtu";
/// Calico's annotation for a node's IPv4 WireGuard public key.
pub const CALICO_PUBLIC_KEY_ANNOTATION: &str = "projectcalico.org/WireguardPublicKey";
/// Calico's annotation for a node's IPv6 WireGuard public key.
pub const CALICO_PUBLIC_KEY_V6_ANNOTATION: &str = "projectcalico.org/WireguardPublicKeyV6";
/// The annotation that marks a node leaving or joining the mesh in phases
/// ([`wgmesh_core::Phase`]): exactly `leaving` or `joining`; absent means active. Each agent
/// honours another node's marker only for a bounded grace ([`crate::phase`]).
pub const PHASE_ANNOTATION: &str = "wgmesh.io/phase";
/// The label that makes a node explicitly plain (`wireguard.enabled: false`), the operator's
/// opt-out of strict mode. Its prefix is one that the NodeRestriction admission plugin keeps
/// kubelets from setting, so a node cannot opt itself out; any value but `false` counts.
pub const PLAIN_LABEL: &str = "node-restriction.kubernetes.io/wgmesh-plain";
/// The label kubeadm puts on control-plane nodes.
pub const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";

/// wgmesh's key annotation of a family.
pub fn key_annotation(family: Family) -> &'static str {
    match family {
        Family::V4 => PUBLIC_KEY_ANNOTATION,
        Family::V6 => PUBLIC_KEY_V6_ANNOTATION,
    }
}

/// Calico's key annotation of a family.
pub fn calico_key_annotation(family: Family) -> &'static str {
    match family {
        Family::V4 => CALICO_PUBLIC_KEY_ANNOTATION,
        Family::V6 => CALICO_PUBLIC_KEY_V6_ANNOTATION,
    }
}

/// How Kubernetes objects are read.
///
/// ```
/// use wgmesh_k8s::adapter::AdapterOptions;
/// let options = AdapterOptions::default().with_calico_annotations(true);
/// assert!(options.calico_annotations);
/// assert_eq!(options.control_plane_label.as_deref(), Some("node-role.kubernetes.io/control-plane"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdapterOptions {
    /// Also read Calico's key annotations (used when a node has no wgmesh key), so wgmesh can
    /// peer with nodes where Calico publishes the key, or take over from it.
    pub calico_annotations: bool,
    /// Nodes with this label are control-plane nodes (their API server endpoints are derived
    /// from their addresses). `None`: no node is.
    pub control_plane_label: Option<String>,
    /// The most `InternalIP`s read from one Node (the mesh's `max_node_addresses`). One more
    /// is kept, so the core reports the node as over its limit; the rest are not even parsed.
    pub max_addresses: usize,
    /// The most pod CIDRs read from one Node (the mesh's `max_node_pod_cidrs`), likewise.
    pub max_pod_cidrs: usize,
}

impl Default for AdapterOptions {
    fn default() -> Self {
        Self {
            calico_annotations: false,
            control_plane_label: Some(CONTROL_PLANE_LABEL.to_owned()),
            max_addresses: wgmesh_core::model::DEFAULT_MAX_NODE_ADDRESSES,
            max_pod_cidrs: wgmesh_core::model::DEFAULT_MAX_NODE_POD_CIDRS,
        }
    }
}

impl AdapterOptions {
    /// Sets [`Self::calico_annotations`].
    pub fn with_calico_annotations(mut self, on: bool) -> Self {
        self.calico_annotations = on;
        self
    }

    /// Sets [`Self::control_plane_label`].
    pub fn with_control_plane_label(mut self, label: Option<String>) -> Self {
        self.control_plane_label = label;
        self
    }

    /// Takes the per-node limits from the mesh settings.
    pub fn with_limits_of(mut self, mesh: &MeshConfig) -> Self {
        self.max_addresses = mesh.max_node_addresses;
        self.max_pod_cidrs = mesh.max_node_pod_cidrs;
        self
    }
}

/// The most warnings about one field of one object; one more says how many were left unsaid.
/// A hostile node's 30,000 junk addresses must not become 30,000 log lines on every agent.
pub const MAX_WARNINGS_PER_FIELD: usize = 4;

/// The most addresses read from one pod (one per family is what Kubernetes writes).
pub const MAX_POD_IPS: usize = 8;

/// Collects warnings about one field, at most [`MAX_WARNINGS_PER_FIELD`] of them.
struct Capped<'a> {
    warnings: &'a mut Vec<AdapterWarning>,
    written: usize,
    dropped: usize,
}

impl<'a> Capped<'a> {
    fn new(warnings: &'a mut Vec<AdapterWarning>) -> Self {
        Self {
            warnings,
            written: 0,
            dropped: 0,
        }
    }

    fn push(&mut self, w: impl FnOnce() -> AdapterWarning) {
        if self.written < MAX_WARNINGS_PER_FIELD {
            self.warnings.push(w());
            self.written += 1;
        } else {
            self.dropped += 1;
        }
    }

    fn finish(self, object: impl FnOnce() -> String, field: &'static str) {
        if self.dropped > 0 {
            self.warnings.push(AdapterWarning::MoreInvalid {
                object: object(),
                field,
                count: self.dropped,
            });
        }
    }
}

/// Something in a Kubernetes object that could not be used. Never fatal: the object is used
/// without it (a node with a malformed key is plain).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdapterWarning {
    /// A key annotation is not a WireGuard public key; the node is treated as plain.
    MalformedKey {
        /// The node.
        node: String,
        /// The annotation.
        annotation: String,
        /// Why it was refused.
        reason: String,
    },
    /// An `InternalIP` is not an IP address; it is left out.
    InvalidAddress {
        /// The node.
        node: String,
        /// The value.
        value: String,
    },
    /// A pod CIDR is not a CIDR, or has host bits set; it is left out.
    InvalidPodCidr {
        /// The node.
        node: String,
        /// The value.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// The underlay MTU annotation is not a usable MTU; the default is used.
    InvalidUnderlayMtu {
        /// The node.
        node: String,
        /// The value.
        value: String,
    },
    /// The node's IPv6 addresses are left out: the mesh's fixed MTU is below IPv6's minimum.
    Ipv6BelowMinimumMtu {
        /// The node.
        node: String,
        /// The mesh's MTU.
        mtu: u32,
    },
    /// A Node without a name (never sent by a real API server) is ignored.
    NodeWithoutName,
    /// A pod address is not an IP address; it is left out.
    InvalidPodIp {
        /// `namespace/name` of the pod.
        pod: String,
        /// The value.
        value: String,
    },
    /// The phase annotation is neither `leaving` nor `joining`; the node is taken as active.
    InvalidPhase {
        /// The node.
        node: String,
        /// The value.
        value: String,
    },
    /// More unusable values of one field than are worth a warning each.
    MoreInvalid {
        /// `node "name"` or `pod namespace/name`.
        object: String,
        /// The field.
        field: &'static str,
        /// How many more.
        count: usize,
    },
}

impl AdapterWarning {
    /// The node the warning is about, if it is about a node.
    pub fn node(&self) -> Option<&str> {
        match self {
            Self::MalformedKey { node, .. }
            | Self::InvalidAddress { node, .. }
            | Self::InvalidPodCidr { node, .. }
            | Self::InvalidUnderlayMtu { node, .. }
            | Self::InvalidPhase { node, .. }
            | Self::Ipv6BelowMinimumMtu { node, .. } => Some(node),
            Self::NodeWithoutName | Self::InvalidPodIp { .. } | Self::MoreInvalid { .. } => None,
        }
    }
}

impl fmt::Display for AdapterWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values come from the objects, written by nodes and pods: echoed cut and on one line.
        let cut = |text: &str| one_line(&elide(text)).into_owned();
        match self {
            Self::MalformedKey {
                node,
                annotation,
                reason,
            } => write!(
                f,
                "node {node:?}: annotation {annotation} is not a WireGuard public key ({reason}); the node is treated as plain"
            ),
            Self::InvalidAddress { node, value } => write!(
                f,
                "node {node:?}: InternalIP {:?} is not an IP address; left out",
                cut(value)
            ),
            Self::InvalidPodCidr {
                node,
                value,
                reason,
            } => write!(
                f,
                "node {node:?}: pod CIDR {:?} {reason}; left out",
                cut(value)
            ),
            Self::InvalidUnderlayMtu { node, value } => write!(
                f,
                "node {node:?}: annotation {UNDERLAY_MTU_ANNOTATION} = {:?} is not a usable MTU; using {DEFAULT_UNDERLAY_MTU}",
                cut(value)
            ),
            Self::InvalidPhase { node, value } => write!(
                f,
                "node {node:?}: annotation {PHASE_ANNOTATION} = {:?} is neither \"leaving\" nor \"joining\"; the node is taken as active",
                cut(value)
            ),
            Self::Ipv6BelowMinimumMtu { node, mtu } => write!(
                f,
                "node {node:?}: the mesh MTU {mtu} is below IPv6's minimum of 1280; its IPv6 addresses are left out"
            ),
            Self::NodeWithoutName => f.write_str("a Node without metadata.name is ignored"),
            Self::InvalidPodIp { pod, value } => {
                write!(
                    f,
                    "pod {pod}: pod IP {:?} is not an IP address; left out",
                    cut(value)
                )
            }
            Self::MoreInvalid {
                object,
                field,
                count,
            } => write!(
                f,
                "{object}: {count} more unusable values of {field}; left out"
            ),
        }
    }
}

/// The raw values of wgmesh's own annotations on a node, as the API server has them: what the
/// agent compares with what it wants published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// `wgmesh.io/public-key`.
    pub public_key: Option<String>,
    /// `wgmesh.io/public-key-v6`.
    pub public_key_v6: Option<String>,
    /// `wgmesh.io/underlay-mtu`.
    pub underlay_mtu: Option<String>,
    /// `wgmesh.io/next-public-key` (a key rotation under way; see [`crate::rotation`]).
    pub next_public_key: Option<String>,
    /// `wgmesh.io/phase` (a leave or a join under way; see [`crate::phase`]).
    pub phase: Option<String>,
}

impl Published {
    /// The raw key annotation of a family.
    pub fn key(&self, family: Family) -> Option<&str> {
        match family {
            Family::V4 => self.public_key.as_deref(),
            Family::V6 => self.public_key_v6.as_deref(),
        }
    }

    /// The raw value of one of wgmesh's annotations, by name.
    pub fn annotation(&self, name: &str) -> Option<&str> {
        match name {
            PUBLIC_KEY_ANNOTATION => self.public_key.as_deref(),
            PUBLIC_KEY_V6_ANNOTATION => self.public_key_v6.as_deref(),
            UNDERLAY_MTU_ANNOTATION => self.underlay_mtu.as_deref(),
            crate::rotation::NEXT_PUBLIC_KEY_ANNOTATION => self.next_public_key.as_deref(),
            PHASE_ANNOTATION => self.phase.as_deref(),
            _ => None,
        }
    }

    /// Whether the key annotation of a family holds exactly `key`.
    pub fn has_key(&self, family: Family, key: Option<PublicKey>) -> bool {
        match (self.key(family), key) {
            (None, None) => true,
            (Some(text), Some(key)) => PublicKey::from_base64(text.trim()).ok() == Some(key),
            _ => false,
        }
    }
}

/// A Node, converted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeInfo {
    /// The core's node, with no workload addresses (those come from Pods).
    pub node: Node,
    /// Whether the node carries the control-plane label.
    pub control_plane: bool,
    /// wgmesh's annotations as found.
    pub published: Published,
    /// The phase the node claims with [`PHASE_ANNOTATION`] (`Active` without a valid one),
    /// whether or not WireGuard is on. `node`'s own phase is this claim, which a
    /// [`ClusterView`](crate::view::ClusterView) may overrule once its grace is over.
    pub claimed_phase: Phase,
}

/// The phase a [`PHASE_ANNOTATION`] value claims: exactly `leaving` or `joining` (no
/// spaces, no other case); anything else is `Err` (the caller warns and takes `Active`).
///
/// ```
/// use wgmesh_core::Phase;
/// use wgmesh_k8s::adapter::parse_phase;
/// assert_eq!(parse_phase("leaving"), Some(Phase::Leaving));
/// assert_eq!(parse_phase("joining"), Some(Phase::Joining));
/// assert_eq!(parse_phase("Leaving"), None);
/// assert_eq!(parse_phase("active"), None);
/// ```
pub fn parse_phase(text: &str) -> Option<Phase> {
    match text {
        "leaving" => Some(Phase::Leaving),
        "joining" => Some(Phase::Joining),
        _ => None,
    }
}

fn annotation<'a>(node: &'a K8sNode, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Converts a Node. Returns `None` only for a Node without a name.
///
/// ```
/// use k8s_openapi::api::core::v1::Node;
/// use wgmesh_k8s::adapter::{AdapterOptions, node_info};
/// let node: Node = serde_json::from_value(serde_json::json!({
///     "metadata": {"name": "worker-1",
///                  "annotations": {"wgmesh.io/public-key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
///     "spec": {"podCIDRs": ["10.244.1.0/24"]},
///     "status": {"addresses": [{"type": "InternalIP", "address": "192.168.10.21"},
///                              {"type": "Hostname", "address": "worker-1"}]}}))?;
/// let mut warnings = Vec::new();
/// let info = node_info(&node, &AdapterOptions::default(), &mut warnings).unwrap();
/// assert_eq!(info.node.addresses, ["192.168.10.21".parse::<std::net::IpAddr>()?]);
/// assert_eq!(info.node.pod_cidrs, ["10.244.1.0/24".parse::<ipnet::IpNet>()?]);
/// assert!(info.node.wireguard_enabled());
/// assert!(warnings.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn node_info(
    k8s: &K8sNode,
    options: &AdapterOptions,
    warnings: &mut Vec<AdapterWarning>,
) -> Option<NodeInfo> {
    let Some(name) = k8s.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
        warnings.push(AdapterWarning::NodeWithoutName);
        return None;
    };
    let mut node = Node::new(name);

    // Addresses: InternalIPs of both families, in the order given, without repeats; one past
    // the limit at most (the core reports the node over it), the rest not even parsed.
    let mut seen = HashSet::new();
    let mut invalid = Capped::new(warnings);
    for addr in k8s
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
    {
        if node.addresses.len() > options.max_addresses {
            break;
        }
        match addr.address.trim().parse::<IpAddr>() {
            Ok(ip) if seen.insert(ip) => node.addresses.push(ip),
            Ok(_) => {}
            Err(_) => invalid.push(|| AdapterWarning::InvalidAddress {
                node: name.to_owned(),
                value: addr.address.clone(),
            }),
        }
    }
    invalid.finish(|| format!("node {name:?}"), "InternalIP");

    // Pod CIDRs: spec.podCIDRs, or the single spec.podCIDR of older clusters.
    let spec = k8s.spec.as_ref();
    let cidrs: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    let mut seen = HashSet::new();
    let mut invalid = Capped::new(warnings);
    for text in cidrs {
        if node.pod_cidrs.len() > options.max_pod_cidrs {
            break;
        }
        match text.trim().parse::<IpNet>() {
            Ok(net) if net.trunc() != net => invalid.push(|| AdapterWarning::InvalidPodCidr {
                node: name.to_owned(),
                value: text.clone(),
                reason: format!("has host bits set (the block would be {})", net.trunc()),
            }),
            Ok(net) if seen.insert(net) => node.pod_cidrs.push(net),
            Ok(_) => {}
            Err(_) => invalid.push(|| AdapterWarning::InvalidPodCidr {
                node: name.to_owned(),
                value: text.clone(),
                reason: "is not a CIDR".to_owned(),
            }),
        }
    }
    invalid.finish(|| format!("node {name:?}"), "podCIDRs");

    // Keys: wgmesh's annotation, else (if enabled) Calico's. Any malformed key in use makes
    // the whole node plain: a half-trusted node is not worth the confusion.
    let mut keys: [Option<PublicKey>; 2] = [None, None];
    let mut malformed = false;
    for family in Family::ALL {
        let own = annotation(k8s, key_annotation(family))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| (key_annotation(family), t));
        let calico = options
            .calico_annotations
            .then(|| annotation(k8s, calico_key_annotation(family)))
            .flatten()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| (calico_key_annotation(family), t));
        if let Some((which, text)) = own.or(calico) {
            match PublicKey::from_base64(text) {
                Ok(key) => keys[family.index()] = Some(key),
                Err(e) => {
                    malformed = true;
                    warnings.push(AdapterWarning::MalformedKey {
                        node: name.to_owned(),
                        annotation: which.to_owned(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    if !malformed && keys.iter().any(Option::is_some) {
        node.wireguard = Some(NodeWireGuard::new(keys[0], keys[1]));
    }
    let plain = k8s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(PLAIN_LABEL))
        .is_some_and(|v| v.trim() != "false");
    if plain {
        let mut wireguard = node
            .wireguard
            .take()
            .unwrap_or_else(|| NodeWireGuard::new(None, None));
        wireguard.enabled = false;
        node.wireguard = Some(wireguard);
    }

    // Phase: a claim honoured only with WireGuard on (a plain node has no phase).
    let claimed_phase = match annotation(k8s, PHASE_ANNOTATION) {
        None => Phase::Active,
        Some(text) => match parse_phase(text) {
            Some(phase) => phase,
            None => {
                warnings.push(AdapterWarning::InvalidPhase {
                    node: name.to_owned(),
                    value: text.to_owned(),
                });
                Phase::Active
            }
        },
    };
    if let Some(w) = node.wireguard.as_mut().filter(|w| w.enabled) {
        w.phase = claimed_phase;
    }

    // Underlay MTU.
    if let Some(text) = annotation(k8s, UNDERLAY_MTU_ANNOTATION) {
        let candidate = text
            .trim()
            .parse::<u32>()
            .ok()
            .map(|mtu| node.clone().with_underlay_mtu(mtu))
            .filter(|n| n.validate().is_ok());
        match candidate {
            Some(n) => node.underlay_mtu = n.underlay_mtu,
            None => warnings.push(AdapterWarning::InvalidUnderlayMtu {
                node: name.to_owned(),
                value: text.to_owned(),
            }),
        }
    }

    let control_plane = options.control_plane_label.as_ref().is_some_and(|label| {
        k8s.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(label))
    });
    let published = Published {
        public_key: annotation(k8s, PUBLIC_KEY_ANNOTATION).map(str::to_owned),
        public_key_v6: annotation(k8s, PUBLIC_KEY_V6_ANNOTATION).map(str::to_owned),
        underlay_mtu: annotation(k8s, UNDERLAY_MTU_ANNOTATION).map(str::to_owned),
        next_public_key: annotation(k8s, crate::rotation::NEXT_PUBLIC_KEY_ANNOTATION)
            .map(str::to_owned),
        phase: annotation(k8s, PHASE_ANNOTATION).map(str::to_owned),
    };
    Some(NodeInfo {
        node,
        control_plane,
        published,
        claimed_phase,
    })
}

/// Makes a converted node acceptable to a mesh: with a fixed MTU below 1280, IPv6 cannot be
/// carried, so the node's IPv6 addresses are left out (with a warning).
pub fn fit_to_mesh(mesh: &MeshConfig, node: &mut Node, warnings: &mut Vec<AdapterWarning>) {
    if let Some(mtu) = mesh.mtu
        && mtu < Family::V6.min_mtu()
        && node.address(Family::V6).is_some()
    {
        node.addresses.retain(|a| Family::of(a) == Family::V4);
        warnings.push(AdapterWarning::Ipv6BelowMinimumMtu {
            node: node.name.clone(),
            mtu,
        });
    }
}

/// Why a pod contributes no workload address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PodExclusion {
    /// It uses the node's network namespace: its addresses are the node's.
    HostNetwork,
    /// It has finished (`Succeeded` or `Failed`): its address is free again.
    Finished,
    /// It is not scheduled to a node yet.
    Unscheduled,
    /// It has no address yet.
    NoAddress,
}

/// What a pod contributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodWorkload {
    /// Workload addresses on a node.
    Ips {
        /// `spec.nodeName`.
        node: String,
        /// `status.podIPs` (or `status.podIP`), each once.
        ips: Vec<IpAddr>,
    },
    /// Nothing, and why.
    Excluded(PodExclusion),
}

/// `namespace/name` of a pod.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The workload addresses a pod contributes: `status.podIPs` on `spec.nodeName`, nothing for
/// host-network, finished, unscheduled and address-less pods. A pod that is terminating but
/// still running keeps its addresses: its connections drain until it is gone.
///
/// ```
/// use k8s_openapi::api::core::v1::Pod;
/// use wgmesh_k8s::adapter::{PodExclusion, PodWorkload, pod_workload};
/// let pod: Pod = serde_json::from_value(serde_json::json!({
///     "metadata": {"name": "web-1", "namespace": "default"},
///     "spec": {"nodeName": "node-a", "containers": []},
///     "status": {"phase": "Running", "podIPs": [{"ip": "10.240.0.5"}]}}))?;
/// let mut warnings = Vec::new();
/// assert_eq!(pod_workload(&pod, &mut warnings),
///            PodWorkload::Ips { node: "node-a".into(), ips: vec!["10.240.0.5".parse()?] });
/// let mut done = pod.clone();
/// done.status.as_mut().unwrap().phase = Some("Succeeded".into());
/// assert_eq!(pod_workload(&done, &mut warnings), PodWorkload::Excluded(PodExclusion::Finished));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn pod_workload(pod: &Pod, warnings: &mut Vec<AdapterWarning>) -> PodWorkload {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return PodWorkload::Excluded(PodExclusion::HostNetwork);
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return PodWorkload::Excluded(PodExclusion::Finished);
    }
    let Some(node) = spec
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
    else {
        return PodWorkload::Excluded(PodExclusion::Unscheduled);
    };
    let texts: Vec<&str> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.as_str()).collect(),
        _ => status
            .and_then(|s| s.pod_ip.as_deref())
            .into_iter()
            .collect(),
    };
    // Kubernetes writes one address per family; a status with thousands is read no further
    // than MAX_POD_IPS (the small list makes `contains` cheap).
    let mut ips = Vec::with_capacity(texts.len().min(MAX_POD_IPS));
    let mut invalid = Capped::new(warnings);
    for text in texts {
        if ips.len() >= MAX_POD_IPS {
            break;
        }
        match text.trim().parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => invalid.push(|| AdapterWarning::InvalidPodIp {
                pod: pod_key(pod),
                value: text.to_owned(),
            }),
        }
    }
    invalid.finish(|| format!("pod {}", pod_key(pod)), "podIPs");
    if ips.is_empty() {
        return PodWorkload::Excluded(PodExclusion::NoAddress);
    }
    PodWorkload::Ips {
        node: node.to_owned(),
        ips,
    }
}

/// A cluster converted from lists of Nodes and Pods, with everything worth a warning.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterInput {
    /// The cluster, nodes sorted by name, each node's workload addresses sorted.
    pub cluster: Cluster,
    /// The converted nodes, by name.
    pub nodes: BTreeMap<String, NodeInfo>,
    /// What could not be used.
    pub warnings: Vec<AdapterWarning>,
}

/// Converts lists of Nodes and Pods (pass no pods when workload addresses are not needed)
/// into the core's cluster for `mesh`.
///
/// Pods on nodes that are not in `nodes` are ignored (they appear when their node does).
///
/// ```
/// use wgmesh_k8s::adapter::{AdapterOptions, cluster_input};
/// use wgmesh_core::MeshConfig;
/// let input = cluster_input(&MeshConfig::default(), &[], &[], &AdapterOptions::default())?;
/// assert!(input.cluster.nodes().is_empty());
/// # Ok::<(), wgmesh_core::Error>(())
/// ```
pub fn cluster_input(
    mesh: &MeshConfig,
    nodes: &[K8sNode],
    pods: &[Pod],
    options: &AdapterOptions,
) -> Result<ClusterInput, wgmesh_core::Error> {
    let mut warnings = Vec::new();
    let mut infos: BTreeMap<String, NodeInfo> = BTreeMap::new();
    for k8s in nodes {
        if let Some(mut info) = node_info(k8s, options, &mut warnings) {
            fit_to_mesh(mesh, &mut info.node, &mut warnings);
            infos.insert(info.node.name.clone(), info);
        }
    }
    let mut workload: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for pod in pods {
        if let PodWorkload::Ips { node, ips } = pod_workload(pod, &mut warnings) {
            workload.entry(node).or_default().extend(ips);
        }
    }
    let list = infos
        .values()
        .map(|info| {
            let mut node = info.node.clone();
            let mut ips = workload.remove(&node.name).unwrap_or_default();
            ips.sort_unstable();
            ips.dedup();
            node.workload_ips = ips;
            node
        })
        .collect();
    let cluster = Cluster::new(mesh.clone(), list)?;
    Ok(ClusterInput {
        cluster,
        nodes: infos,
        warnings,
    })
}
