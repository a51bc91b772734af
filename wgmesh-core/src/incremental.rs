//! The incremental planner: one node's plan, kept current event by event.
//!
//! Big clusters change one pod at a time. [`IncrementalPlanner::apply`] takes one [`Event`]
//! and returns the [`PlanDelta`] it causes, in time proportional to the change: a workload
//! address costs a few hash-map operations whatever the size of the cluster; a node that
//! joins, leaves or changes its key costs its own destinations. Only changes to the mesh
//! settings and to the local node's WireGuard settings or addresses, which can change every
//! route, recompute the whole plan (and return the difference).
//!
//! The delta is exactly [`diff`] of the plans before and after the event; the
//! property tests of this crate replay random event sequences and check that, and that
//! [`IncrementalPlanner::plan`] equals [`plan_node`](crate::plan_node) after every step.
//!
//! ```
//! use wgmesh_core::{Event, IncrementalPlanner, spec::parse_cluster};
//! let cluster = parse_cluster(r#"{"mesh": {"route_source": "workload_ips"}, "nodes": [
//!   {"name": "a", "addresses": ["10.0.0.1"],
//!    "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
//!   {"name": "b", "addresses": ["10.0.0.2"],
//!    "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
//! let mut planner = IncrementalPlanner::new(&cluster, "a");
//! let delta = planner.apply(Event::WorkloadIpAdded { node: "b".into(), ip: "10.0.0.20".parse().unwrap() })?;
//! assert_eq!(delta.routes_added.len(), 1);
//! assert_eq!(delta.peers_updated[0].allowed_ips_added, ["10.0.0.20/32".parse().unwrap()]);
//! # Ok::<(), wgmesh_core::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::delta::{PeerAdded, PeerRef, PeerUpdate, PlanDelta, diff};
use crate::error::{Error, Problem};
use crate::key::PublicKey;
use crate::model::{
    Cluster, Family, MeshConfig, Node, NodeWireGuard, RouteSource, check_node, host_net,
};
use crate::plan::{self, Decision, NodePlan, PeerPlan, Route, RouteType, decide, takes_part};

/// A change to the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A node appears, or changes in any way (replaced whole).
    NodeUpserted(Node),
    /// A node goes away. Unknown names are ignored.
    NodeRemoved {
        /// Its name.
        node: String,
    },
    /// A node publishes, changes or withdraws the key of a family. A node without WireGuard
    /// settings that gets a key has WireGuard enabled.
    PublicKeyChanged {
        /// The node.
        node: String,
        /// The family of the key.
        family: Family,
        /// The new key; `None` withdraws it.
        public_key: Option<PublicKey>,
    },
    /// A workload address appears on a node.
    WorkloadIpAdded {
        /// The node.
        node: String,
        /// The address.
        ip: IpAddr,
    },
    /// A workload address goes away from a node. Unknown addresses are ignored.
    WorkloadIpRemoved {
        /// The node.
        node: String,
        /// The address.
        ip: IpAddr,
    },
    /// An IPAM block becomes affine to a node.
    BlockAdded {
        /// The node.
        node: String,
        /// The block (no host bits).
        cidr: IpNet,
    },
    /// A block is no longer affine to a node. Unknown blocks are ignored.
    BlockRemoved {
        /// The node.
        node: String,
        /// The block.
        cidr: IpNet,
    },
    /// The mesh settings change (this recomputes the whole plan).
    MeshChanged(MeshConfig),
}

type Id = usize;

/// Who claims a destination. Clashes are rare, so one claimant is stored inline.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Claim {
    One(Id),
    Many(Vec<Id>),
}

#[derive(Debug, Clone)]
struct NodeState {
    /// The node, with `workload_ips` always empty: those live in `workload`.
    node: Node,
    workload: HashSet<IpAddr>,
    part: [bool; 2],
}

impl NodeState {
    fn empty(name: &str) -> Self {
        let mut node = Node::new(name);
        node.underlay_mtu = 0;
        Self {
            node,
            workload: HashSet::new(),
            part: [false; 2],
        }
    }

    fn covered(&self, ip: &IpAddr) -> bool {
        self.node.pod_cidrs.iter().any(|b| b.contains(ip))
    }

    /// Whether `dest` is one of the node's destinations.
    fn claims(&self, mesh: &MeshConfig, dest: &IpNet) -> bool {
        let host = dest.prefix_len() == Family::of_net(dest).host_prefix_len();
        if mesh.host_encryption && host && self.node.addresses.contains(&dest.addr()) {
            return true;
        }
        match mesh.route_source {
            RouteSource::CidrBlocks => {
                self.node.pod_cidrs.contains(dest)
                    || (host && self.workload.contains(&dest.addr()) && !self.covered(&dest.addr()))
            }
            RouteSource::WorkloadIps => host && self.workload.contains(&dest.addr()),
        }
    }

    /// Every destination in a family.
    fn destinations(&self, mesh: &MeshConfig, family: Family) -> Vec<IpNet> {
        let mut node = self.node.clone();
        node.workload_ips = self.workload.iter().copied().collect();
        plan::destinations(mesh, &node, family)
    }

    fn to_node(&self) -> Node {
        let mut node = self.node.clone();
        let mut ips: Vec<IpAddr> = self.workload.iter().copied().collect();
        ips.sort_unstable();
        node.workload_ips = ips;
        node
    }
}

#[derive(Debug, Clone, Default)]
struct FamilyState {
    keys: HashMap<PublicKey, Vec<Id>>,
    claims: HashMap<IpNet, Claim>,
    /// Underlay MTUs of the nodes taking part, with counts.
    mtus: BTreeMap<u32, usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerView {
    node: String,
    key: PublicKey,
    endpoint: SocketAddr,
}

/// The state before an event, recorded the first time each thing is touched.
#[derive(Default)]
struct Journal {
    dests: HashMap<IpNet, Option<Decision<Id>>>,
    peers: HashMap<(Family, Id), Option<PeerView>>,
}

/// The plan of one node, kept current by events.
#[derive(Debug, Clone)]
pub struct IncrementalPlanner {
    mesh: MeshConfig,
    local: String,
    ids: HashMap<String, Id>,
    nodes: Vec<Option<NodeState>>,
    free: Vec<Id>,
    fams: [FamilyState; 2],
}

impl IncrementalPlanner {
    /// A planner for node `local`, starting from `cluster`. The local node may be missing;
    /// its plan is then empty until it appears.
    pub fn new(cluster: &Cluster, local: &str) -> Self {
        let mut planner = Self {
            mesh: cluster.mesh().clone(),
            local: local.to_owned(),
            ids: HashMap::with_capacity(cluster.nodes().len()),
            nodes: Vec::with_capacity(cluster.nodes().len()),
            free: Vec::new(),
            fams: Default::default(),
        };
        let mut journal = None;
        for node in cluster.nodes() {
            planner.upsert(&mut journal, node.clone());
        }
        planner
    }

    /// The name of the local node.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The mesh settings.
    pub fn mesh(&self) -> &MeshConfig {
        &self.mesh
    }

    /// The current cluster, rebuilt from the planner's state (nodes sorted by name).
    pub fn cluster(&self) -> Result<Cluster, Error> {
        let mut nodes: Vec<Node> = self
            .nodes
            .iter()
            .flatten()
            .map(NodeState::to_node)
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Cluster::new(self.mesh.clone(), nodes)
    }

    /// The whole current plan (time proportional to the plan).
    pub fn plan(&self) -> NodePlan {
        let mut plan = self.header();
        let Some(local) = self.local_id() else {
            return plan;
        };
        let mut routes = Vec::new();
        for iface in &mut plan.interfaces {
            let family = iface.family;
            let f = family.index();
            if !self.state(local).part[f] {
                continue;
            }
            let fam = &self.fams[f];
            routes.reserve(fam.claims.len());
            for dest in fam.claims.keys() {
                if let Some(route) = self.route(family, *dest, self.decision(family, dest)) {
                    routes.push(route);
                }
            }
            for (id, state) in self.nodes.iter().enumerate() {
                let Some(state) = state else { continue };
                if let Some(peer) = self.peer_plan(family, id, state) {
                    iface.peers.push(peer);
                }
            }
            iface.peers.sort_unstable_by(|a, b| a.node.cmp(&b.node));
        }
        routes.sort_unstable_by_key(|r| r.destination);
        plan.routes = routes;
        plan
    }

    /// Applies one event and returns what changed in the plan. On error nothing changes.
    pub fn apply(&mut self, event: Event) -> Result<PlanDelta, Error> {
        self.validate(&event)?;
        if self.needs_full(&event) {
            let before = self.plan();
            let mut journal = None;
            self.dispatch(&mut journal, event);
            return Ok(diff(&before, &self.plan()));
        }
        let header = self.header();
        let mut journal = Some(Journal::default());
        self.dispatch(&mut journal, event);
        let journal = journal.unwrap_or_default();
        Ok(self.delta(header, journal))
    }

    // -----------------------------------------------------------------------------------
    // Validation and dispatch.

    fn validate(&self, event: &Event) -> Result<(), Error> {
        let known = |node: &str| {
            if self.ids.contains_key(node) {
                Ok(())
            } else {
                Err(Error::UnknownNode(node.to_owned()))
            }
        };
        match event {
            Event::NodeUpserted(node) => check_node(&self.mesh, node),
            Event::NodeRemoved { .. } => Ok(()),
            Event::PublicKeyChanged { node, .. }
            | Event::WorkloadIpAdded { node, .. }
            | Event::WorkloadIpRemoved { node, .. }
            | Event::BlockRemoved { node, .. } => known(node),
            Event::BlockAdded { node, cidr } => {
                known(node)?;
                if cidr.trunc() != *cidr {
                    return Err(Error::node(
                        node,
                        "pod_cidrs",
                        Some(cidr.to_string()),
                        Problem::HostBitsSet {
                            canonical: cidr.trunc().to_string(),
                        },
                    ));
                }
                Ok(())
            }
            Event::MeshChanged(mesh) => {
                mesh.validate()?;
                for state in self.nodes.iter().flatten() {
                    check_node(mesh, &state.node)?;
                }
                Ok(())
            }
        }
    }

    /// Whether the event can change the local node's interfaces or participation: then the
    /// whole plan may change, and it is recomputed.
    fn needs_full(&self, event: &Event) -> bool {
        let local = self.local_id().map(|id| &self.state(id).node);
        let clashes_with_local = |node: &Node| {
            local.is_some_and(|l| {
                Family::ALL
                    .iter()
                    .any(|f| l.key(*f).is_some() && l.key(*f) == node.key(*f))
            })
        };
        let existing = |name: &str| self.ids.get(name).map(|id| &self.state(*id).node);
        match event {
            Event::MeshChanged(_) => true,
            Event::NodeUpserted(node) if node.name == self.local => match local {
                None => true,
                Some(l) => l.wireguard != node.wireguard || l.addresses != node.addresses,
            },
            Event::NodeUpserted(node) => {
                clashes_with_local(node) || existing(&node.name).is_some_and(clashes_with_local)
            }
            Event::NodeRemoved { node } => {
                *node == self.local || existing(node).is_some_and(clashes_with_local)
            }
            Event::PublicKeyChanged {
                node,
                family,
                public_key,
            } => {
                *node == self.local
                    || local.is_some_and(|l| {
                        let lk = l.key(*family);
                        lk.is_some()
                            && (lk == *public_key
                                || existing(node).is_some_and(|n| n.key(*family) == lk))
                    })
            }
            _ => false,
        }
    }

    fn dispatch(&mut self, j: &mut Option<Journal>, event: Event) {
        match event {
            Event::NodeUpserted(node) => self.upsert(j, node),
            Event::NodeRemoved { node } => {
                if let Some(&id) = self.ids.get(&node) {
                    let empty = NodeState::empty(&node).node;
                    self.update(j, id, empty, HashSet::new());
                    self.ids.remove(&node);
                    self.nodes[id] = None;
                    self.free.push(id);
                }
            }
            Event::PublicKeyChanged {
                node,
                family,
                public_key,
            } => {
                let id = self.ids[&node];
                let mut wg = self.state(id).node.wireguard.clone();
                match (&mut wg, public_key) {
                    (Some(w), key) => w.set_key(family, key),
                    (None, None) => {}
                    (None, Some(key)) => {
                        let mut w = NodeWireGuard::new(None, None);
                        w.set_key(family, Some(key));
                        wg = Some(w);
                    }
                }
                self.set_wireguard(j, id, wg);
            }
            Event::WorkloadIpAdded { node, ip } => {
                let id = self.ids[&node];
                self.edit_dests(j, id, &[host_net(ip)], |s| {
                    s.workload.insert(ip);
                });
            }
            Event::WorkloadIpRemoved { node, ip } => {
                let id = self.ids[&node];
                self.edit_dests(j, id, &[host_net(ip)], |s| {
                    s.workload.remove(&ip);
                });
            }
            Event::BlockAdded { node, cidr } => {
                let id = self.ids[&node];
                if !self.state(id).node.pod_cidrs.contains(&cidr) {
                    let affected = self.block_affects(id, cidr);
                    self.edit_dests(j, id, &affected, |s| s.node.pod_cidrs.push(cidr));
                }
            }
            Event::BlockRemoved { node, cidr } => {
                let id = self.ids[&node];
                if self.state(id).node.pod_cidrs.contains(&cidr) {
                    let affected = self.block_affects(id, cidr);
                    self.edit_dests(j, id, &affected, |s| {
                        s.node.pod_cidrs.retain(|b| *b != cidr)
                    });
                }
            }
            Event::MeshChanged(mesh) => {
                let nodes: Vec<NodeState> = self.nodes.iter().flatten().cloned().collect();
                *self = Self {
                    mesh,
                    local: std::mem::take(&mut self.local),
                    ids: HashMap::with_capacity(nodes.len()),
                    nodes: Vec::with_capacity(nodes.len()),
                    free: Vec::new(),
                    fams: Default::default(),
                };
                for state in nodes {
                    self.upsert(j, state.to_node());
                }
            }
        }
    }

    /// The block itself and the node's workload addresses inside it.
    fn block_affects(&self, id: Id, cidr: IpNet) -> Vec<IpNet> {
        let mut affected = vec![cidr];
        affected.extend(
            self.state(id)
                .workload
                .iter()
                .filter(|ip| cidr.contains(*ip))
                .map(|ip| host_net(*ip)),
        );
        affected
    }

    fn upsert(&mut self, j: &mut Option<Journal>, mut node: Node) {
        let workload: HashSet<IpAddr> =
            std::mem::take(&mut node.workload_ips).into_iter().collect();
        let id = match self.ids.get(&node.name) {
            Some(id) => *id,
            None => {
                let state = Some(NodeState::empty(&node.name));
                let id = match self.free.pop() {
                    Some(id) => {
                        self.nodes[id] = state;
                        id
                    }
                    None => {
                        self.nodes.push(state);
                        self.nodes.len() - 1
                    }
                };
                self.ids.insert(node.name.clone(), id);
                id
            }
        };
        self.update(j, id, node, workload);
    }

    /// Moves node `id` to `node` (whose `workload_ips` is empty) with `workload`, step by step.
    fn update(&mut self, j: &mut Option<Journal>, id: Id, node: Node, workload: HashSet<IpAddr>) {
        self.set_wireguard(j, id, node.wireguard.clone());
        // Addresses: host-encryption destinations, endpoints and participation.
        if self.state(id).node.addresses != node.addresses {
            for family in Family::ALL {
                if self.state(id).node.address(family) != node.address(family) {
                    self.touch_peer(j, family, id);
                }
            }
            let affected: Vec<IpNet> = self
                .state(id)
                .node
                .addresses
                .iter()
                .chain(&node.addresses)
                .map(|a| host_net(*a))
                .collect();
            let addresses = node.addresses.clone();
            self.edit_dests(j, id, &affected, |s| s.node.addresses = addresses);
            for family in Family::ALL {
                self.refresh_part(j, id, family);
            }
        }
        // Underlay MTU.
        let old_mtu = self.state(id).node.underlay_mtu;
        if old_mtu != node.underlay_mtu {
            for family in Family::ALL {
                if self.state(id).part[family.index()] {
                    let mtus = &mut self.fams[family.index()].mtus;
                    remove_mtu(mtus, old_mtu);
                    *mtus.entry(node.underlay_mtu).or_default() += 1;
                }
            }
            self.state_mut(id).node.underlay_mtu = node.underlay_mtu;
        }
        // Blocks.
        let old_blocks = self.state(id).node.pod_cidrs.clone();
        for b in old_blocks.iter().filter(|b| !node.pod_cidrs.contains(b)) {
            let affected = self.block_affects(id, *b);
            self.edit_dests(j, id, &affected, |s| s.node.pod_cidrs.retain(|x| x != b));
        }
        for b in &node.pod_cidrs {
            if !self.state(id).node.pod_cidrs.contains(b) {
                let affected = self.block_affects(id, *b);
                self.edit_dests(j, id, &affected, |s| s.node.pod_cidrs.push(*b));
            }
        }
        // Keep the given order of blocks (it does not change any destination).
        self.state_mut(id)
            .node
            .pod_cidrs
            .clone_from(&node.pod_cidrs);
        // Workload addresses.
        let gone: Vec<IpAddr> = self
            .state(id)
            .workload
            .iter()
            .filter(|ip| !workload.contains(ip))
            .copied()
            .collect();
        for ip in gone {
            self.edit_dests(j, id, &[host_net(ip)], |s| {
                s.workload.remove(&ip);
            });
        }
        for ip in workload {
            if !self.state(id).workload.contains(&ip) {
                self.edit_dests(j, id, &[host_net(ip)], |s| {
                    s.workload.insert(ip);
                });
            }
        }
    }

    fn set_wireguard(&mut self, j: &mut Option<Journal>, id: Id, wg: Option<NodeWireGuard>) {
        if self.state(id).node.wireguard == wg {
            return;
        }
        let old = self.state(id).node.clone();
        let mut new = old.clone();
        new.wireguard = wg;
        let mut affected: Vec<(Family, Id)> = vec![(Family::V4, id), (Family::V6, id)];
        for family in Family::ALL {
            let (ok, nk) = (old.key(family), new.key(family));
            if ok == nk {
                continue;
            }
            self.touch_peer(j, family, id);
            let keys = &mut self.fams[family.index()].keys;
            if let Some(k) = ok
                && let Some(list) = keys.get_mut(&k)
            {
                list.retain(|x| *x != id);
                affected.extend(list.iter().map(|x| (family, *x)));
                if list.is_empty() {
                    keys.remove(&k);
                }
            }
            if let Some(k) = nk {
                let list = keys.entry(k).or_default();
                affected.extend(list.iter().map(|x| (family, *x)));
                list.push(id);
            }
        }
        self.state_mut(id).node.wireguard = new.wireguard;
        for (family, other) in affected {
            self.refresh_part(j, other, family);
        }
    }

    /// Recomputes whether node `id` takes part in `family`, and follows the consequences.
    fn refresh_part(&mut self, j: &mut Option<Journal>, id: Id, family: Family) {
        let f = family.index();
        let state = self.state(id);
        let claims = state
            .node
            .key(family)
            .and_then(|k| self.fams[f].keys.get(&k))
            .map_or(0, Vec::len);
        let now = takes_part(&self.mesh, &state.node, family, claims);
        if now == state.part[f] {
            return;
        }
        self.touch_peer(j, family, id);
        if j.is_some() {
            for dest in state.destinations(&self.mesh, family) {
                self.touch_dest(j, dest);
            }
        }
        let mtu = self.state(id).node.underlay_mtu;
        let mtus = &mut self.fams[f].mtus;
        if now {
            *mtus.entry(mtu).or_default() += 1;
        } else {
            remove_mtu(mtus, mtu);
        }
        self.state_mut(id).part[f] = now;
    }

    /// Changes node `id` with `edit`, then updates the claims of the `affected` destinations
    /// whose membership changed.
    fn edit_dests(
        &mut self,
        j: &mut Option<Journal>,
        id: Id,
        affected: &[IpNet],
        edit: impl FnOnce(&mut NodeState),
    ) {
        let before: Vec<bool> = affected
            .iter()
            .map(|d| self.state(id).claims(&self.mesh, d))
            .collect();
        edit(self.state_mut(id));
        for (dest, was) in affected.iter().zip(before) {
            let is = self.state(id).claims(&self.mesh, dest);
            if was == is {
                continue;
            }
            self.touch_dest(j, *dest);
            let f = Family::of_net(dest).index();
            if is {
                self.add_claim(f, *dest, id);
            } else {
                self.remove_claim(f, *dest, id);
            }
        }
    }

    fn add_claim(&mut self, f: usize, dest: IpNet, id: Id) {
        let claims = &mut self.fams[f].claims;
        match claims.get_mut(&dest) {
            None => {
                claims.insert(dest, Claim::One(id));
            }
            Some(Claim::One(first)) => {
                let first = *first;
                claims.insert(dest, Claim::Many(vec![first, id]));
            }
            Some(Claim::Many(ids)) => ids.push(id),
        }
    }

    fn remove_claim(&mut self, f: usize, dest: IpNet, id: Id) {
        let claims = &mut self.fams[f].claims;
        match claims.get_mut(&dest) {
            Some(Claim::One(_)) | None => {
                claims.remove(&dest);
            }
            Some(Claim::Many(ids)) => {
                ids.retain(|x| *x != id);
                if let [one] = ids.as_slice() {
                    let one = *one;
                    claims.insert(dest, Claim::One(one));
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Derived state.

    fn local_id(&self) -> Option<Id> {
        self.ids.get(&self.local).copied()
    }

    fn state(&self, id: Id) -> &NodeState {
        match &self.nodes[id] {
            Some(s) => s,
            None => unreachable_state(),
        }
    }

    fn state_mut(&mut self, id: Id) -> &mut NodeState {
        match &mut self.nodes[id] {
            Some(s) => s,
            None => unreachable_state(),
        }
    }

    fn local_part(&self, family: Family) -> Option<Id> {
        self.local_id()
            .filter(|id| self.state(*id).part[family.index()])
    }

    /// How a destination is routed now; `None` when it has no route.
    fn decision(&self, family: Family, dest: &IpNet) -> Option<Decision<Id>> {
        let local = self.local_part(family)?;
        let claim = self.fams[family.index()].claims.get(dest)?;
        let sole = match claim {
            Claim::One(id) => Some(*id),
            Claim::Many(_) => None,
        };
        Some(decide(local, sole, |n| self.state(n).part[family.index()]))
    }

    fn route(&self, family: Family, dest: IpNet, decision: Option<Decision<Id>>) -> Option<Route> {
        let kind = match decision? {
            Decision::Peer(_) => RouteType::Unicast,
            Decision::Throw => RouteType::Throw,
        };
        Some(Route {
            family,
            table: self.mesh.routing_table,
            destination: dest,
            kind,
            device: (kind == RouteType::Unicast).then(|| self.mesh.interface(family).to_owned()),
        })
    }

    fn peer_view(&self, family: Family, id: Id) -> Option<PeerView> {
        let local = self.local_part(family)?;
        let state = self.nodes[id].as_ref()?;
        if id == local || !state.part[family.index()] {
            return None;
        }
        Some(PeerView {
            node: state.node.name.clone(),
            key: state.node.key(family)?,
            endpoint: plan::endpoint(&self.mesh, &state.node, family)?,
        })
    }

    fn peer_plan(&self, family: Family, id: Id, state: &NodeState) -> Option<PeerPlan> {
        let view = self.peer_view(family, id)?;
        let mut allowed_ips: Vec<IpNet> = state
            .destinations(&self.mesh, family)
            .into_iter()
            .filter(|d| self.decision(family, d) == Some(Decision::Peer(id)))
            .collect();
        allowed_ips.sort_unstable();
        Some(PeerPlan {
            node: state.node.name.clone(),
            public_key: view.key,
            endpoint: view.endpoint,
            allowed_ips,
            persistent_keepalive: self.mesh.persistent_keepalive,
        })
    }

    /// Interfaces (without peers), rules, sysctls and marking: everything but peers and routes.
    fn header(&self) -> NodePlan {
        let mut plan = NodePlan::empty(&self.local);
        let Some(local) = self.local_id() else {
            return plan;
        };
        let state = self.state(local);
        if !self.mesh.enabled || !state.node.wireguard_enabled() {
            return plan;
        }
        for family in Family::ALL {
            if state.node.address(family).is_none() {
                continue;
            }
            let min = self.fams[family.index()].mtus.keys().next().copied();
            plan.interfaces
                .push(plan::interface(&self.mesh, &state.node, family, min));
        }
        plan::finish(&self.mesh, &mut plan, state.part);
        plan
    }

    fn touch_dest(&self, j: &mut Option<Journal>, dest: IpNet) {
        if let Some(j) = j
            && !j.dests.contains_key(&dest)
        {
            j.dests
                .insert(dest, self.decision(Family::of_net(&dest), &dest));
        }
    }

    fn touch_peer(&self, j: &mut Option<Journal>, family: Family, id: Id) {
        if let Some(j) = j
            && !j.peers.contains_key(&(family, id))
        {
            j.peers.insert((family, id), self.peer_view(family, id));
        }
    }

    /// Builds the delta from the journal (the state before) and the current state.
    fn delta(&self, header: NodePlan, journal: Journal) -> PlanDelta {
        let mut d = diff(&header, &self.header());
        // Peers: which stay with the same key (their allowed IPs change by difference).
        let mut staying: HashMap<(Family, Id), PeerUpdate> = HashMap::new();
        let mut settled: HashSet<(Family, Id)> = HashSet::new();
        for (&(family, id), before) in &journal.peers {
            let after = self.peer_view(family, id);
            let iface = self.mesh.interface(family).to_owned();
            match (before, &after) {
                (Some(b), Some(a)) if b.key == a.key => {
                    if b != a {
                        staying.insert((family, id), self.peer_update(family, a));
                    }
                    continue;
                }
                (None, None) => continue,
                _ => {}
            }
            settled.insert((family, id));
            if let Some(b) = before {
                d.peers_removed.push(PeerRef {
                    interface: iface.clone(),
                    family,
                    node: b.node.clone(),
                    public_key: b.key,
                });
            }
            if after.is_some()
                && let Some(state) = &self.nodes[id]
                && let Some(peer) = self.peer_plan(family, id, state)
            {
                d.peers_added.push(PeerAdded {
                    interface: iface,
                    family,
                    peer,
                });
            }
        }
        // Destinations: routes, and allowed IPs of peers that stay.
        for (dest, before) in journal.dests {
            let family = Family::of_net(&dest);
            let after = self.decision(family, &dest);
            if before == after {
                continue;
            }
            let (rb, ra) = (
                self.route(family, dest, before),
                self.route(family, dest, after),
            );
            if rb != ra {
                d.routes_removed.extend(rb);
                d.routes_added.extend(ra);
            }
            if let Some(Decision::Peer(id)) = before
                && !settled.contains(&(family, id))
                && let Some(view) = self.peer_view(family, id)
            {
                staying
                    .entry((family, id))
                    .or_insert_with(|| self.peer_update(family, &view))
                    .allowed_ips_removed
                    .push(dest);
            }
            if let Some(Decision::Peer(id)) = after
                && !settled.contains(&(family, id))
                && let Some(view) = self.peer_view(family, id)
            {
                staying
                    .entry((family, id))
                    .or_insert_with(|| self.peer_update(family, &view))
                    .allowed_ips_added
                    .push(dest);
            }
        }
        d.peers_updated.extend(staying.into_values());
        d.canonicalize();
        d
    }

    fn peer_update(&self, family: Family, view: &PeerView) -> PeerUpdate {
        PeerUpdate {
            interface: self.mesh.interface(family).to_owned(),
            family,
            public_key: view.key,
            node: view.node.clone(),
            endpoint: view.endpoint,
            persistent_keepalive: self.mesh.persistent_keepalive,
            allowed_ips_added: Vec::new(),
            allowed_ips_removed: Vec::new(),
        }
    }
}

fn remove_mtu(mtus: &mut BTreeMap<u32, usize>, mtu: u32) {
    if let Some(count) = mtus.get_mut(&mtu) {
        *count -= 1;
        if *count == 0 {
            mtus.remove(&mtu);
        }
    }
}

#[cold]
fn unreachable_state() -> ! {
    // Ids are only handed out for occupied slots and dropped with them.
    unreachable!("wgmesh: incremental planner used a freed node slot")
}
