//! The cluster as the agent knows it, kept from watch events, and the core [`Event`]s each
//! change means.
//!
//! [`ClusterView`] holds every converted node and every pod's workload addresses. Each change
//! (a Node or Pod applied or deleted, or a whole relist after a watch restart) returns the
//! smallest list of core events that brings an [`IncrementalPlanner`](wgmesh_core::IncrementalPlanner)
//! fed with them to the same state: a key rotation is one `PublicKeyChanged`, a pod is one
//! `WorkloadIpAdded` per address, and a node status heartbeat is nothing at all.
//!
//! It also derives the API server endpoints that must stay outside the tunnel (the mesh's
//! `control_plane_endpoints`) from the control-plane nodes' addresses, and reports a
//! `MeshChanged` when they change.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node as K8sNode, Pod};
use wgmesh_core::{Cluster, Event, Family, MeshConfig, Node, Phase};

use crate::adapter::{
    AdapterOptions, AdapterWarning, NodeInfo, PodWorkload, fit_to_mesh, node_info, pod_key,
    pod_workload,
};

/// Where the API server endpoints that stay outside the tunnel come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ControlPlaneEndpoints {
    /// Endpoints always included: configured ones and the address the agent's client uses.
    pub fixed: Vec<SocketAddr>,
    /// With a port, every `InternalIP` of every control-plane node with that port is included
    /// (kubeadm's API servers listen on the control-plane nodes, port 6443).
    pub node_port: Option<u16>,
}

impl ControlPlaneEndpoints {
    /// Fixed endpoints and, optionally, the control-plane nodes' addresses on `node_port`.
    pub fn new(fixed: Vec<SocketAddr>, node_port: Option<u16>) -> Self {
        Self { fixed, node_port }
    }
}

/// What one change brought: core events for the planner and warnings for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Changes {
    /// Events, in the order to apply them.
    pub events: Vec<Event>,
    /// New warnings (a warning repeated by a later update of the same object is not repeated).
    pub warnings: Vec<AdapterWarning>,
}

impl Changes {
    /// Appends `other`'s events and warnings.
    pub fn extend(&mut self, other: Changes) {
        self.events.extend(other.events);
        self.warnings.extend(other.warnings);
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.warnings.is_empty()
    }
}

/// What one pod contributes, compact: 550,000 of them at 5,000 nodes × 110 pods, in a table
/// of a power of two entries (2^20 there), so each byte of an entry is a megabyte. The
/// node's name is held once ([`NodeNames`]); a pod names it by index.
#[derive(Debug, Clone)]
struct PodEntry {
    /// The pod's node, by its index in [`ClusterView::pod_nodes`].
    node: u32,
    /// The last relist that listed this pod ([`ClusterView::stage_pod`]; 0: none).
    listed: u32,
    ips: Box<[IpAddr]>,
}

/// The node names pods name, each allocated once, by index.
#[derive(Debug, Clone, Default)]
struct NodeNames {
    names: Vec<Option<Arc<str>>>,
    ids: HashMap<Arc<str>, u32>,
    free: Vec<u32>,
}

impl NodeNames {
    /// The index of `name`, made if it has none.
    fn intern(&mut self, name: String) -> u32 {
        if let Some(&id) = self.ids.get(name.as_str()) {
            return id;
        }
        let name: Arc<str> = name.into();
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = Some(name.clone());
                id
            }
            None => {
                // More distinct names than pods cannot be: the index fits.
                let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
                self.names.push(Some(name.clone()));
                id
            }
        };
        self.ids.insert(name, id);
        id
    }

    /// The name with index `id` (empty for an index not given out).
    fn name(&self, id: u32) -> Arc<str> {
        self.names
            .get(id as usize)
            .cloned()
            .flatten()
            .unwrap_or_else(|| Arc::from(""))
    }

    /// Frees every index that no entry of `pods` uses (when no staged entry holds one).
    fn retain_used<'a>(&mut self, pods: impl Iterator<Item = &'a PodEntry>) {
        let mut used = vec![false; self.names.len()];
        for e in pods {
            if let Some(u) = used.get_mut(e.node as usize) {
                *u = true;
            }
        }
        for (id, used) in used.into_iter().enumerate() {
            if !used && let Some(name) = self.names[id].take() {
                self.ids.remove(&name);
                self.free.push(id as u32);
            }
        }
    }
}

/// What a listed pod contributes, and what was wrong with it.
type Staged = (Option<PodEntry>, Vec<AdapterWarning>);

/// The cluster as known from the API server.
///
/// ```
/// use k8s_openapi::api::core::v1::{Node, Pod};
/// use wgmesh_core::{Event, MeshConfig};
/// use wgmesh_k8s::adapter::AdapterOptions;
/// use wgmesh_k8s::view::{ClusterView, ControlPlaneEndpoints};
/// let mut view = ClusterView::new(MeshConfig::default(), AdapterOptions::default(),
///                                 ControlPlaneEndpoints::default(), true);
/// let node: Node = serde_json::from_value(serde_json::json!({
///     "metadata": {"name": "a"},
///     "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}))?;
/// assert!(matches!(view.apply_node(&node).events[..], [Event::NodeUpserted(_)]));
/// assert!(view.apply_node(&node).events.is_empty()); // nothing changed
/// let pod: Pod = serde_json::from_value(serde_json::json!({
///     "metadata": {"name": "p", "namespace": "default"},
///     "spec": {"nodeName": "a", "containers": []},
///     "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.7"}]}}))?;
/// assert_eq!(view.apply_pod(&pod).events,
///            [Event::WorkloadIpAdded { node: "a".into(), ip: "10.0.0.7".parse()? }]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClusterView {
    base_mesh: MeshConfig,
    mesh: MeshConfig,
    options: AdapterOptions,
    control_plane: ControlPlaneEndpoints,
    track_pods: bool,
    nodes: HashMap<String, NodeInfo>,
    node_warnings: HashMap<String, Vec<AdapterWarning>>,
    pods: HashMap<Box<str>, PodEntry>,
    /// The node names pods name, each allocated once (pruned after each relist).
    pod_nodes: NodeNames,
    pod_warnings: HashMap<String, Vec<AdapterWarning>>,
    /// A relist in progress: what each listed pod contributes, kept in compact form (the
    /// agent keeps no copy of the Pod objects themselves).
    staged: Option<HashMap<String, Staged>>,
    /// A relist in progress that takes effect pod by pod, without events
    /// ([`Self::begin_pod_relist_without_events`]): the warnings it has found so far.
    applying: Option<Vec<AdapterWarning>>,
    /// The relist in progress (or the last): pods it lists unchanged are marked with it
    /// instead of being staged.
    relist: u32,
    /// Workload addresses per node, with the number of pods holding each (an address can be
    /// held by a terminating pod and its successor for a moment).
    workload: HashMap<String, HashMap<IpAddr, u32>>,
    /// Nodes whose phase claim is no longer honoured (its grace is over): taken as active.
    overruled: HashSet<String>,
}

impl ClusterView {
    /// An empty view. `mesh` are the configured settings (its `control_plane_endpoints` are
    /// kept and extended with the derived ones); with `track_pods`, pods' addresses are kept
    /// as workload addresses.
    pub fn new(
        mesh: MeshConfig,
        options: AdapterOptions,
        control_plane: ControlPlaneEndpoints,
        track_pods: bool,
    ) -> Self {
        let mut view = Self {
            mesh: mesh.clone(),
            base_mesh: mesh,
            options,
            control_plane,
            track_pods,
            nodes: HashMap::new(),
            node_warnings: HashMap::new(),
            pods: HashMap::new(),
            pod_nodes: NodeNames::default(),
            pod_warnings: HashMap::new(),
            staged: None,
            applying: None,
            relist: 0,
            workload: HashMap::new(),
            overruled: HashSet::new(),
        };
        view.mesh = view.derive_mesh();
        view
    }

    /// The mesh settings in effect: the configured ones with the derived API server endpoints.
    pub fn mesh(&self) -> &MeshConfig {
        &self.mesh
    }

    /// Whether pods are tracked.
    pub fn tracks_pods(&self) -> bool {
        self.track_pods
    }

    /// A node as converted.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// Every node as converted, in no particular order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Number of pods holding workload addresses.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// The workload addresses of a node, sorted.
    pub fn workload_ips(&self, node: &str) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .workload
            .get(node)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        ips.sort_unstable();
        ips
    }

    fn full_node(&self, info: &NodeInfo) -> Node {
        let mut node = info.node.clone();
        node.workload_ips = self.workload_ips(&node.name);
        node
    }

    /// The whole cluster (nodes sorted by name), for a fresh planner.
    pub fn cluster(&self) -> Result<Cluster, wgmesh_core::Error> {
        let mut names: Vec<&String> = self.nodes.keys().collect();
        names.sort_unstable();
        let nodes = names
            .into_iter()
            .map(|n| self.full_node(&self.nodes[n]))
            .collect();
        Cluster::new(self.mesh.clone(), nodes)
    }

    fn derive_mesh(&self) -> MeshConfig {
        let mut endpoints: BTreeSet<SocketAddr> = self
            .base_mesh
            .control_plane_endpoints
            .iter()
            .chain(&self.control_plane.fixed)
            .copied()
            .collect();
        if let Some(port) = self.control_plane.node_port {
            for info in self.nodes.values().filter(|i| i.control_plane) {
                endpoints.extend(
                    info.node
                        .addresses
                        .iter()
                        .map(|a| SocketAddr::new(*a, port)),
                );
            }
        }
        let mut mesh = self.base_mesh.clone();
        mesh.control_plane_endpoints = endpoints.into_iter().collect();
        mesh
    }

    fn refresh_mesh(&mut self, changes: &mut Changes) {
        let mesh = self.derive_mesh();
        if mesh != self.mesh {
            self.mesh = mesh.clone();
            changes.events.push(Event::MeshChanged(mesh));
        }
    }

    /// A Node was added or modified.
    pub fn apply_node(&mut self, k8s: &K8sNode) -> Changes {
        let mut changes = Changes::default();
        let mut warnings = Vec::new();
        let Some(mut info) = node_info(k8s, &self.options, &mut warnings) else {
            changes.warnings = warnings;
            return changes;
        };
        fit_to_mesh(&self.mesh, &mut info.node, &mut warnings);
        let name = info.node.name.clone();
        if self.overruled.contains(&name)
            && let Some(w) = info.node.wireguard.as_mut()
        {
            w.phase = Phase::Active;
        }
        if self.node_warnings.get(&name) != Some(&warnings) {
            if !warnings.is_empty() {
                changes.warnings = warnings.clone();
            }
            self.node_warnings.insert(name.clone(), warnings);
        }
        let old = self.nodes.get(&name);
        let cp_changed = match old {
            None => info.control_plane,
            Some(o) => {
                o.control_plane != info.control_plane
                    || (info.control_plane && o.node.addresses != info.node.addresses)
            }
        };
        match old {
            None => changes
                .events
                .push(Event::NodeUpserted(self.full_node(&info))),
            Some(old) if old.node == info.node => {}
            Some(old) => {
                let (o, n) = (&old.node, &info.node);
                if o.addresses != n.addresses
                    || o.underlay_mtu != n.underlay_mtu
                    || o.wireguard.as_ref().map(|w| w.enabled)
                        != n.wireguard.as_ref().map(|w| w.enabled)
                    || o.phase() != n.phase()
                {
                    changes
                        .events
                        .push(Event::NodeUpserted(self.full_node(&info)));
                } else {
                    for family in Family::ALL {
                        if o.key(family) != n.key(family) {
                            changes.events.push(Event::PublicKeyChanged {
                                node: name.clone(),
                                family,
                                public_key: n.key(family),
                            });
                        }
                    }
                    for cidr in o.pod_cidrs.iter().filter(|c| !n.pod_cidrs.contains(c)) {
                        changes.events.push(Event::BlockRemoved {
                            node: name.clone(),
                            cidr: *cidr,
                        });
                    }
                    for cidr in n.pod_cidrs.iter().filter(|c| !o.pod_cidrs.contains(c)) {
                        changes.events.push(Event::BlockAdded {
                            node: name.clone(),
                            cidr: *cidr,
                        });
                    }
                }
            }
        }
        self.nodes.insert(name, info);
        if cp_changed {
            self.refresh_mesh(&mut changes);
        }
        changes
    }

    /// Whether `node`'s phase claim ([`NodeInfo::claimed_phase`]) is honoured (the agent
    /// decides, from its grace clocks, [`crate::phase`]); a node not honoured is taken as
    /// active. Returns the event when the node's phase changes by it.
    pub fn honour_phase(&mut self, node: &str, honoured: bool) -> Changes {
        let mut changes = Changes::default();
        if honoured {
            self.overruled.remove(node);
        } else {
            self.overruled.insert(node.to_owned());
        }
        let Some(info) = self.nodes.get_mut(node) else {
            return changes;
        };
        let claimed = info.claimed_phase;
        if let Some(w) = info.node.wireguard.as_mut().filter(|w| w.enabled) {
            let phase = if honoured { claimed } else { Phase::Active };
            if w.phase != phase {
                w.phase = phase;
                let full = self.full_node(&self.nodes[node]);
                changes.events.push(Event::NodeUpserted(full));
            }
        }
        changes
    }

    /// Turns the mesh on or off in the view (the agent holds it on while its node leaves in
    /// phases, then turns it off); returns the `MeshChanged` event if it changed.
    pub fn set_enabled(&mut self, enabled: bool) -> Changes {
        let mut changes = Changes::default();
        if self.base_mesh.enabled != enabled {
            self.base_mesh.enabled = enabled;
            self.refresh_mesh(&mut changes);
        }
        changes
    }

    /// A Node was deleted. Its pods' addresses are kept until the pods go (they come back
    /// with the node, if it returns first).
    pub fn delete_node(&mut self, name: &str) -> Changes {
        let mut changes = Changes::default();
        self.node_warnings.remove(name);
        if let Some(old) = self.nodes.remove(name) {
            changes.events.push(Event::NodeRemoved {
                node: name.to_owned(),
            });
            if old.control_plane {
                self.refresh_mesh(&mut changes);
            }
        }
        changes
    }

    /// Replaces every node (a relist after a watch restart): nodes not listed are deleted.
    pub fn replace_nodes<'a>(&mut self, list: impl IntoIterator<Item = &'a K8sNode>) -> Changes {
        let mut changes = Changes::default();
        let list: Vec<&K8sNode> = list.into_iter().collect();
        let listed: BTreeSet<&str> = list
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !listed.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            changes.extend(self.delete_node(&name));
        }
        for node in list {
            changes.extend(self.apply_node(node));
        }
        changes
    }

    fn add_ip(&mut self, node: &str, ip: IpAddr, changes: &mut Changes) {
        // No new string for a node already there (every pod but the first of a node).
        let ips = match self.workload.get_mut(node) {
            Some(ips) => ips,
            None => self.workload.entry(node.to_owned()).or_default(),
        };
        let count = ips.entry(ip).or_default();
        *count += 1;
        if *count == 1 && self.nodes.contains_key(node) {
            changes.events.push(Event::WorkloadIpAdded {
                node: node.to_owned(),
                ip,
            });
        }
    }

    fn remove_ip(&mut self, node: &str, ip: IpAddr, changes: &mut Changes) {
        let Some(ips) = self.workload.get_mut(node) else {
            return;
        };
        let Some(count) = ips.get_mut(&ip) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            ips.remove(&ip);
            if ips.is_empty() {
                self.workload.remove(node);
            }
            if self.nodes.contains_key(node) {
                changes.events.push(Event::WorkloadIpRemoved {
                    node: node.to_owned(),
                    ip,
                });
            }
        }
    }

    fn set_pod(&mut self, key: String, entry: Option<PodEntry>) -> Changes {
        let mut changes = Changes::default();
        // Unchanged (most pods of a relist): nothing moved, copied or hashed again.
        if let (Some(o), Some(n)) = (self.pods.get_mut(key.as_str()), &entry)
            && o.node == n.node
            && o.ips == n.ips
        {
            // A relist's mark (0 is none: a relist's number never is).
            if n.listed != 0 {
                o.listed = n.listed;
            }
            return changes;
        }
        let old = self.pods.remove(key.as_str());
        // Add before removing: an address that stays (a pod that gains its IPv6 address)
        // never drops to zero.
        if let Some(n) = &entry {
            let node = self.pod_nodes.name(n.node);
            for ip in n.ips.iter() {
                self.add_ip(&node, *ip, &mut changes);
            }
        }
        if let Some(o) = &old {
            let node = self.pod_nodes.name(o.node);
            for ip in o.ips.iter() {
                self.remove_ip(&node, *ip, &mut changes);
            }
        }
        if let Some(n) = entry {
            self.pods.insert(key.into_boxed_str(), n);
        }
        changes
    }

    fn entry(&mut self, pod: &Pod) -> (Option<PodEntry>, Vec<AdapterWarning>) {
        let mut warnings = Vec::new();
        let entry = match pod_workload(pod, &mut warnings) {
            PodWorkload::Ips { node, ips } => Some(PodEntry {
                node: self.pod_nodes.intern(node),
                ips: ips.into_boxed_slice(),
                listed: 0,
            }),
            PodWorkload::Excluded(_) => None,
        };
        (entry, warnings)
    }

    /// A Pod was added or modified.
    pub fn apply_pod(&mut self, pod: &Pod) -> Changes {
        if !self.track_pods {
            return Changes::default();
        }
        let (entry, warnings) = self.entry(pod);
        self.set_pod_with_warnings(pod_key(pod), entry, warnings)
    }

    fn set_pod_with_warnings(
        &mut self,
        key: String,
        entry: Option<PodEntry>,
        warnings: Vec<AdapterWarning>,
    ) -> Changes {
        let stored = self.pod_warnings.get(&key);
        let new_warnings = if warnings.is_empty() {
            if stored.is_some() {
                self.pod_warnings.remove(&key);
            }
            Vec::new()
        } else if stored != Some(&warnings) {
            self.pod_warnings.insert(key.clone(), warnings.clone());
            warnings
        } else {
            Vec::new()
        };
        let mut changes = self.set_pod(key, entry);
        changes.warnings = new_warnings;
        changes
    }

    /// A Pod was deleted.
    pub fn delete_pod(&mut self, pod: &Pod) -> Changes {
        if !self.track_pods {
            return Changes::default();
        }
        let key = pod_key(pod);
        self.pod_warnings.remove(&key);
        self.set_pod(key, None)
    }

    /// Replaces every pod (a relist after a watch restart): pods not listed are deleted.
    pub fn replace_pods<'a>(&mut self, list: impl IntoIterator<Item = &'a Pod>) -> Changes {
        self.begin_pod_relist();
        for pod in list {
            self.stage_pod(pod);
        }
        self.finish_pod_relist()
    }

    /// A relist of the pods begins (kube-runtime's `Init`): pods are staged with
    /// [`Self::stage_pod`] and replace the known ones at [`Self::finish_pod_relist`]. Only
    /// what each pod contributes is kept (node and addresses), never the object.
    pub fn begin_pod_relist(&mut self) {
        self.relist = self.relist.wrapping_add(1).max(1);
        self.staged = self.track_pods.then(HashMap::new);
        self.applying = None;
    }

    /// [`Self::begin_pod_relist`] for a caller that plans from the whole view once the relist
    /// is complete (the agent before its first plan): each pod takes effect as it is staged,
    /// and the relist's finish gives its warnings but no events, whichever finish is called.
    /// The view then never holds the listed pods twice, and the work of taking them in is
    /// done while the list is still being read. The view reached is the one
    /// [`Self::finish_pod_relist_without_events`] reaches.
    pub fn begin_pod_relist_without_events(&mut self) {
        self.relist = self.relist.wrapping_add(1).max(1);
        self.staged = None;
        self.applying = self.track_pods.then(Vec::new);
    }

    /// One pod of the relist in progress (kube-runtime's `InitApply`); without
    /// [`Self::begin_pod_relist`], one begins. A pod the view already has as listed (same
    /// node, addresses and warnings) is only marked as listed: a relist of an unchanged
    /// cluster stages nothing (at 5,000 nodes × 110 pods, a second copy of 550,000 pods
    /// while the relist lasted).
    pub fn stage_pod(&mut self, pod: &Pod) {
        if !self.track_pods {
            return;
        }
        if self.staged.is_none() && self.applying.is_none() {
            self.begin_pod_relist();
        }
        let (entry, warnings) = self.entry(pod);
        let key = pod_key(pod);
        let same_warnings = match self.pod_warnings.get(&key) {
            Some(stored) => *stored == warnings,
            None => warnings.is_empty(),
        };
        if same_warnings {
            match (self.pods.get_mut(key.as_str()), &entry) {
                (Some(o), Some(n)) if o.node == n.node && o.ips == n.ips => {
                    o.listed = self.relist;
                    return;
                }
                // Not in the view and still not: nothing to do at the end either.
                (None, None) => return,
                _ => {}
            }
        }
        if self.applying.is_some() {
            let entry = entry.map(|e| PodEntry {
                listed: self.relist,
                ..e
            });
            let found = self.set_pod_with_warnings(key, entry, warnings).warnings;
            if let Some(applying) = &mut self.applying {
                applying.extend(found);
            }
        } else if let Some(staged) = &mut self.staged {
            staged.insert(key, (entry, warnings));
        }
    }

    /// The relist is complete (kube-runtime's `InitDone`): the staged pods replace the known
    /// ones; pods not listed are deleted.
    pub fn finish_pod_relist(&mut self) -> Changes {
        self.finish_relist(true)
    }

    /// [`Self::finish_pod_relist`] for a caller that will plan from the whole view anyway
    /// (the agent before its first plan, or about to rebuild its planner): the same view and
    /// warnings, no events. At 5,000 nodes × 110 pods a first relist's events are 550,000
    /// `WorkloadIpAdded`, 270 MB at the agent's peak of memory, for a planner that does
    /// not exist yet.
    pub fn finish_pod_relist_without_events(&mut self) -> Changes {
        self.finish_relist(false)
    }

    fn finish_relist(&mut self, events: bool) -> Changes {
        let mut changes = Changes::default();
        if let Some(warnings) = self.applying.take() {
            // Listed pods are in already, marked with this relist: the others are gone.
            let relist = self.relist;
            let gone: Vec<String> = self
                .pods
                .iter()
                .filter(|(_, e)| e.listed != relist)
                .map(|(k, _)| k.to_string())
                .collect();
            for key in gone {
                self.pod_warnings.remove(&key);
                self.set_pod(key, None);
            }
            self.pod_nodes.retain_used(self.pods.values());
            changes.warnings = warnings;
            return changes;
        }
        let Some(listed) = self.staged.take() else {
            return changes;
        };
        // Grown once, not doubled (with both tables alive) as 550,000 pods go in.
        self.pods
            .reserve(listed.len().saturating_sub(self.pods.len()));
        let add = |changes: &mut Changes, c: Changes| {
            if events {
                changes.extend(c);
            } else {
                changes.warnings.extend(c.warnings);
            }
        };
        let relist = self.relist;
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(k, e)| e.listed != relist && !listed.contains_key(&***k))
            .map(|(k, _)| k.to_string())
            .collect();
        for key in gone {
            self.pod_warnings.remove(&key);
            let c = self.set_pod(key, None);
            add(&mut changes, c);
        }
        for (key, (entry, warnings)) in listed {
            let c = self.set_pod_with_warnings(key, entry, warnings);
            add(&mut changes, c);
        }
        // Names no pod holds any more.
        self.pod_nodes.retain_used(self.pods.values());
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str) -> K8sNode {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}))
        .unwrap()
    }

    fn pod(name: &str, node: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]}}))
        .unwrap()
    }

    fn view() -> ClusterView {
        let mut v = ClusterView::new(
            MeshConfig::default(),
            AdapterOptions::default(),
            ControlPlaneEndpoints::default(),
            true,
        );
        v.apply_node(&node("a", "10.0.0.1"));
        v.apply_node(&node("b", "10.0.0.2"));
        v
    }

    /// Events or warnings as sorted text (a map's order differs between two views).
    fn sorted<T: std::fmt::Debug>(items: &[T]) -> Vec<String> {
        let mut text: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
        text.sort();
        text
    }

    fn relist(v: &mut ClusterView, pods: &[Pod], events: bool) -> Changes {
        v.begin_pod_relist();
        for p in pods {
            v.stage_pod(p);
        }
        if events {
            v.finish_pod_relist()
        } else {
            v.finish_pod_relist_without_events()
        }
    }

    /// A relist of pods the view has unchanged stages nothing; a pod not listed again is
    /// deleted, a changed one updated, a new one added; a pod's warning stays (and is not
    /// reported again) when it is listed unchanged, and goes when it is listed without it.
    #[test]
    fn a_relist_stages_only_what_changed() {
        let mut v = view();
        let first = [
            pod("p1", "a", "10.1.0.1"),
            pod("p2", "b", "10.1.0.2"),
            pod("p3", "b", "not an address"),
            pod("p4", "a", "10.1.0.4"),
        ];
        let c = relist(&mut v, &first, true);
        assert_eq!(c.events.len(), 3);
        assert_eq!(c.warnings.len(), 1);
        v.begin_pod_relist();
        for p in &first[..3] {
            v.stage_pod(p);
        }
        assert_eq!(
            v.staged.as_ref().map(HashMap::len),
            Some(0),
            "unchanged pods staged"
        );
        v.stage_pod(&pod("p5", "b", "10.1.0.5"));
        v.stage_pod(&pod("p1", "a", "10.1.0.9"));
        assert_eq!(v.staged.as_ref().map(HashMap::len), Some(2));
        let c = v.finish_pod_relist();
        let mut events: Vec<String> = c.events.iter().map(|e| format!("{e:?}")).collect();
        events.sort();
        assert_eq!(
            events,
            [
                r#"WorkloadIpAdded { node: "a", ip: 10.1.0.9 }"#,
                r#"WorkloadIpAdded { node: "b", ip: 10.1.0.5 }"#,
                r#"WorkloadIpRemoved { node: "a", ip: 10.1.0.1 }"#,
                r#"WorkloadIpRemoved { node: "a", ip: 10.1.0.4 }"#,
            ]
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(v.pod_count(), 3);
        assert_eq!(v.pod_warnings.len(), 1, "p3's warning kept");
        // p3 fixed: its warning goes; nothing else changes.
        let fixed = [
            pod("p1", "a", "10.1.0.9"),
            pod("p2", "b", "10.1.0.2"),
            pod("p3", "b", "10.1.0.3"),
            pod("p5", "b", "10.1.0.5"),
        ];
        let c = relist(&mut v, &fixed, true);
        assert_eq!(c.events.len(), 1, "{:?}", c.events);
        assert!(v.pod_warnings.is_empty());
        assert!(relist(&mut v, &fixed, true).is_empty());
        assert_eq!(v.pod_count(), 4);
    }

    /// A relist finished without events leaves the view a relist with events leaves, with
    /// the same warnings; later changes give the same events on both.
    #[test]
    fn a_relist_without_events_makes_the_same_view() {
        let first = [
            pod("p1", "a", "10.1.0.1"),
            pod("p2", "b", "10.1.0.2"),
            pod("p3", "b", "not an address"),
        ];
        let (mut loud, mut quiet) = (view(), view());
        let l = relist(&mut loud, &first, true);
        let q = relist(&mut quiet, &first, false);
        assert_eq!(l.events.len(), 2, "{:?}", l.events);
        assert!(q.events.is_empty(), "{:?}", q.events);
        assert!(!l.warnings.is_empty());
        assert_eq!(format!("{:?}", q.warnings), format!("{:?}", l.warnings));
        assert_eq!(quiet.pod_count(), loud.pod_count());
        assert_eq!(
            quiet.cluster().unwrap().nodes(),
            loud.cluster().unwrap().nodes()
        );
        let second = [pod("p1", "a", "10.1.0.9"), pod("p4", "a", "10.1.0.4")];
        let l = relist(&mut loud, &second, true);
        let q = relist(&mut quiet, &second, true);
        // The same events (in the staged map's order, which differs between two maps).
        assert_eq!(sorted(&l.events), sorted(&q.events));
        assert_eq!(l.events.len(), 4, "{:?}", l.events);
    }

    /// A relist that takes effect pod by pod (the agent's first) reaches the view and the
    /// warnings a staged relist reaches, without events: pods new, changed, unchanged and
    /// gone, and a pod whose warnings alone change (its mark must not be lost with them).
    #[test]
    fn a_relist_applied_pod_by_pod_makes_the_same_view() {
        let two_ips = |second: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p6", "namespace": "default"},
                "spec": {"nodeName": "b", "containers": []},
                "status": {"phase": "Running",
                           "podIPs": [{"ip": "10.1.0.6"}, {"ip": second}]}}))
            .unwrap()
        };
        let lists = [
            vec![
                pod("p1", "a", "10.1.0.1"),
                pod("p2", "b", "10.1.0.2"),
                pod("p3", "b", "not an address"),
                pod("p4", "a", "10.1.0.4"),
                two_ips("bad"),
            ],
            vec![
                pod("p1", "a", "10.1.0.9"),
                pod("p2", "b", "10.1.0.2"),
                pod("p3", "b", "10.1.0.3"),
                pod("p5", "c", "10.1.0.5"),
                two_ips("10.1.0.6"),
            ],
            vec![pod("p2", "b", "10.1.0.2"), two_ips("10.1.0.6")],
        ];
        let (mut staged, mut applied) = (view(), view());
        // p3's first address is not one: it holds none.
        for (list, held) in lists.iter().zip([4, 5, 2]) {
            let s = relist(&mut staged, list, false);
            applied.begin_pod_relist_without_events();
            for p in list {
                applied.stage_pod(p);
            }
            let a = applied.finish_pod_relist();
            assert!(a.events.is_empty(), "{:?}", a.events);
            assert_eq!(sorted(&a.warnings), sorted(&s.warnings));
            let pods = |v: &ClusterView| {
                let mut p: Vec<String> = v
                    .pods
                    .iter()
                    .map(|(k, e)| format!("{k} {} {:?}", v.pod_nodes.name(e.node), e.ips))
                    .collect();
                p.sort();
                p
            };
            assert_eq!(pods(&applied), pods(&staged));
            assert_eq!(applied.pods.len(), held, "{:?}", pods(&applied));
            assert_eq!(applied.pod_warnings, staged.pod_warnings);
            let mut names: Vec<&Arc<str>> = applied.pod_nodes.ids.keys().collect();
            names.sort();
            let mut theirs: Vec<&Arc<str>> = staged.pod_nodes.ids.keys().collect();
            theirs.sort();
            assert_eq!(names, theirs);
            assert_eq!(
                applied.cluster().unwrap().nodes(),
                staged.cluster().unwrap().nodes()
            );
        }
        // A staged relist after it gives the events it gives after a staged one.
        let next = [pod("p2", "b", "10.1.0.7")];
        let s = relist(&mut staged, &next, true);
        let a = relist(&mut applied, &next, true);
        assert_eq!(sorted(&a.events), sorted(&s.events));
        assert_eq!(a.events.len(), 3, "{:?}", a.events);
    }

    /// A node name no pod names after a relist gives its index back; a pod of another node
    /// that takes the index later is that node's, and the first node's pods are not.
    #[test]
    fn a_node_name_index_is_reused_only_when_no_pod_names_it() {
        let mut v = view();
        relist(
            &mut v,
            &[pod("p1", "a", "10.1.0.1"), pod("p2", "b", "10.1.0.2")],
            true,
        );
        let b = v.pod_nodes.ids["b"];
        // b's only pod goes: b's index is free after the relist.
        relist(&mut v, &[pod("p1", "a", "10.1.0.1")], true);
        assert!(!v.pod_nodes.ids.contains_key("b"));
        assert_eq!(v.pod_nodes.free, [b]);
        // A pod of c takes the index; a pod of b comes back with another.
        let c = v.apply_pod(&pod("p3", "c", "10.1.0.3"));
        assert_eq!(v.pod_nodes.ids["c"], b);
        assert!(c.events.is_empty(), "c is not a node: {:?}", c.events);
        let back = v.apply_pod(&pod("p4", "b", "10.1.0.4"));
        assert_ne!(v.pod_nodes.ids["b"], b);
        assert_eq!(
            back.events,
            [Event::WorkloadIpAdded {
                node: "b".into(),
                ip: "10.1.0.4".parse().unwrap()
            }]
        );
        assert_eq!(v.workload_ips("b"), ["10.1.0.4".parse::<IpAddr>().unwrap()]);
        assert_eq!(v.workload_ips("c"), ["10.1.0.3".parse::<IpAddr>().unwrap()]);
        // p3 moves from c to a: the event names a, and c's address goes.
        let moved = v.apply_pod(&pod("p3", "a", "10.1.0.3"));
        assert_eq!(
            moved.events,
            [Event::WorkloadIpAdded {
                node: "a".into(),
                ip: "10.1.0.3".parse().unwrap()
            }]
        );
        assert!(v.workload_ips("c").is_empty());
        // Every name in use resolves to itself.
        for (name, id) in &v.pod_nodes.ids {
            assert_eq!(&*v.pod_nodes.name(*id), &**name);
        }
    }
}
