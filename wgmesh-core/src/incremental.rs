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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::claims::{
    ADDRESS, BLOCK, Cover, REFUSED, WORKLOAD, counted_addresses, is_host, prefix_of, settle,
    static_refusal,
};
use crate::delta::{PeerAdded, PeerRef, PeerUpdate, PlanDelta, diff};
use crate::diagnostics::{Diagnostic, diagnose};
use crate::error::{Error, Problem};
use crate::key::PublicKey;
use crate::model::{
    Cluster, Family, MeshConfig, Node, NodeWireGuard, Phase, RouteSource, check_node, host_net,
};
use crate::plan::{
    self, Decision, NodePlan, PeerPlan, Route, RouteType, allowed_on, counted_mtu, decide_claims,
    route_type, routed_phases, routes_active, strict_static, takes_part,
};

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

/// Who claims a prefix, with the flags of each claim ([`crate::claims`]). Most prefixes have
/// one claimant, stored inline.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Claim {
    One((Id, u8)),
    Many(Vec<(Id, u8)>),
}

impl Claim {
    fn as_slice(&self) -> &[(Id, u8)] {
        match self {
            Self::One(c) => std::slice::from_ref(c),
            Self::Many(v) => v,
        }
    }

    fn get(&self, id: Id) -> Option<u8> {
        self.as_slice().iter().find(|c| c.0 == id).map(|c| c.1)
    }
}

/// Whether a prefix is disputed: two or more claims that are not refused (a
/// [`Diagnostic::Clash`]).
fn disputed(claims: &[(Id, u8)]) -> bool {
    claims
        .iter()
        .filter(|c| c.1 & REFUSED == 0)
        .nth(1)
        .is_some()
}

/// Sets node `id`'s flags on `prefix` (0 removes its claim); whether the prefix was disputed
/// before, and is after.
fn set_claim(claims: &mut HashMap<IpNet, Claim>, prefix: IpNet, id: Id, flags: u8) -> (bool, bool) {
    use std::collections::hash_map::Entry;
    let mut o = match claims.entry(prefix) {
        Entry::Vacant(v) => {
            if flags != 0 {
                v.insert(Claim::One((id, flags)));
            }
            return (false, false);
        }
        Entry::Occupied(o) => o,
    };
    let before = disputed(o.get().as_slice());
    match o.get_mut() {
        Claim::One((x, f)) if *x == id => {
            if flags == 0 {
                o.remove();
                return (before, false);
            }
            *f = flags;
        }
        Claim::One(first) => {
            if flags != 0 {
                let first = *first;
                *o.get_mut() = Claim::Many(vec![first, (id, flags)]);
            }
        }
        Claim::Many(v) => {
            match v.iter().position(|c| c.0 == id) {
                Some(i) if flags == 0 => {
                    v.swap_remove(i);
                }
                Some(i) => v[i].1 = flags,
                None if flags != 0 => v.push((id, flags)),
                None => {}
            }
            if let [one] = v.as_slice() {
                let one = *one;
                *o.get_mut() = Claim::One(one);
            }
        }
    }
    (before, disputed(o.get().as_slice()))
}

/// A set whose smallest `limit` values count; the others wait, in order, for a counted one
/// to go. Every change says which values started or stopped counting (at most two).
#[derive(Debug, Clone)]
struct Capped<T> {
    kept: BTreeSet<T>,
    excess: BTreeSet<T>,
    limit: usize,
}

impl<T: Ord + Copy> Capped<T> {
    fn new(limit: usize) -> Self {
        Self {
            kept: BTreeSet::new(),
            excess: BTreeSet::new(),
            limit,
        }
    }

    fn contains(&self, v: &T) -> bool {
        self.kept.contains(v) || self.excess.contains(v)
    }

    fn counts(&self, v: &T) -> bool {
        self.kept.contains(v)
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.kept.iter().chain(&self.excess)
    }

    fn insert(&mut self, v: T) -> [Option<T>; 2] {
        if self.excess.is_empty() && self.kept.len() < self.limit {
            // Under the limit: one lookup.
            return [self.kept.insert(v).then_some(v), None];
        }
        if self.contains(&v) {
            return [None, None];
        }
        match self.kept.last().copied() {
            Some(max) if v < max => {
                self.kept.remove(&max);
                self.kept.insert(v);
                self.excess.insert(max);
                [Some(v), Some(max)]
            }
            _ => {
                self.excess.insert(v);
                [None, None]
            }
        }
    }

    /// Makes the set hold exactly `wanted`; returns every value that started or stopped
    /// counting, each once (what counts in the end is what the set says).
    fn sync(&mut self, wanted: &BTreeSet<T>) -> Vec<T> {
        let gone: Vec<T> = self
            .iter()
            .filter(|v| !wanted.contains(v))
            .copied()
            .collect();
        let mut changed: Vec<T> = Vec::new();
        for v in gone {
            changed.extend(self.remove(&v).into_iter().flatten());
        }
        for v in wanted {
            changed.extend(self.insert(*v).into_iter().flatten());
        }
        changed.sort_unstable();
        changed.dedup();
        changed
    }

    fn remove(&mut self, v: &T) -> [Option<T>; 2] {
        if (!self.excess.is_empty() && self.excess.remove(v)) || !self.kept.remove(v) {
            return [None, None];
        }
        match self.excess.pop_first() {
            Some(next) => {
                self.kept.insert(next);
                [Some(*v), Some(next)]
            }
            None => [Some(*v), None],
        }
    }
}

#[derive(Debug, Clone)]
struct NodeState {
    /// The node, with `workload_ips` always empty: those live in `workload`.
    node: Node,
    /// Its addresses that count, sorted.
    addrs: Vec<IpAddr>,
    /// Its distinct blocks; the smallest count.
    blocks: Capped<IpNet>,
    /// Its distinct workload addresses; the smallest count.
    workload: Capped<IpAddr>,
    /// What its own counted, accepted blocks cover, per family (`cidr_blocks` only).
    cover: [Cover; 2],
    part: [bool; 2],
}

impl NodeState {
    fn empty(name: &str, mesh: &MeshConfig) -> Self {
        let mut node = Node::new(name);
        node.underlay_mtu = 0;
        Self {
            node,
            addrs: Vec::new(),
            blocks: Capped::new(mesh.max_node_pod_cidrs),
            workload: Capped::new(mesh.max_node_workload_ips),
            cover: Default::default(),
            part: [false; 2],
        }
    }

    /// The fields through which the node claims `prefix`.
    fn fields(&self, mesh: &MeshConfig, prefix: &IpNet) -> u8 {
        let mut fields = 0;
        if is_host(prefix) {
            let a = prefix.addr();
            if self.addrs.binary_search(&a).is_ok() {
                fields |= ADDRESS;
            }
            if self.workload.counts(&a) {
                fields |= WORKLOAD;
            }
        }
        if mesh.route_source == RouteSource::CidrBlocks && self.blocks.counts(prefix) {
            fields |= BLOCK;
        }
        fields
    }

    /// Every prefix the node claims in a family, each once, in no particular order.
    fn prefixes(&self, mesh: &MeshConfig, family: Family) -> Vec<IpNet> {
        let in_family = |a: &&IpAddr| Family::of(a) == family;
        let mut out: Vec<IpNet> = self
            .addrs
            .iter()
            .filter(in_family)
            .chain(self.workload.kept.iter().filter(in_family))
            .map(|a| host_net(*a))
            .collect();
        if mesh.route_source == RouteSource::CidrBlocks {
            out.extend(
                self.blocks
                    .kept
                    .iter()
                    .filter(|b| Family::of_net(b) == family),
            );
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn to_node(&self) -> Node {
        let mut node = self.node.clone();
        node.workload_ips = self.workload.iter().copied().collect();
        node
    }
}

#[derive(Debug, Clone)]
struct FamilyState {
    keys: HashMap<PublicKey, Vec<Id>>,
    claims: HashMap<IpNet, Claim>,
    /// The counted addresses of every node.
    addrs: BTreeMap<IpAddr, Vec<Id>>,
    /// The counted, accepted blocks of every node (`cidr_blocks` only).
    blocks: BTreeMap<IpNet, Vec<Id>>,
    /// How many prefixes of each length `blocks` has.
    lens: Vec<u32>,
    /// Underlay MTUs of the nodes taking part, at or above the floor, with counts.
    mtus: BTreeMap<u32, usize>,
    /// Claims refused now.
    refused: usize,
    /// Prefixes disputed now.
    disputed: usize,
}

impl FamilyState {
    fn new(family: Family) -> Self {
        Self {
            keys: HashMap::new(),
            claims: HashMap::new(),
            addrs: BTreeMap::new(),
            blocks: BTreeMap::new(),
            lens: vec![0; usize::from(family.host_prefix_len()) + 1],
            mtus: BTreeMap::new(),
            refused: 0,
            disputed: 0,
        }
    }

    /// Whether `prefix` holds an address of a node other than `id` (rule 4).
    fn other_address(&self, prefix: &IpNet, id: Id) -> bool {
        let others = |owners: &Vec<Id>| owners.iter().any(|o| *o != id);
        if is_host(prefix) {
            return self.addrs.get(&prefix.addr()).is_some_and(others);
        }
        self.addrs
            .range(prefix.network()..=prefix.broadcast())
            .any(|(_, owners)| others(owners))
    }

    /// Whether an accepted block of a node other than `id` strictly contains `prefix` (rule 5).
    fn inside_other_block(&self, prefix: &IpNet, id: Id) -> bool {
        (0..prefix.prefix_len())
            .filter(|len| self.lens[usize::from(*len)] > 0)
            .filter_map(|len| prefix_of(prefix.network(), len))
            .any(|b| {
                self.blocks
                    .get(&b)
                    .is_some_and(|owners| owners.iter().any(|o| *o != id))
            })
    }
}

/// Adds `id` to the owners of `key` (once); whether `key` is new in the index.
fn index_add<K: Ord>(index: &mut BTreeMap<K, Vec<Id>>, key: K, id: Id) -> bool {
    use std::collections::btree_map::Entry;
    match index.entry(key) {
        Entry::Vacant(v) => {
            v.insert(vec![id]);
            true
        }
        Entry::Occupied(mut o) => {
            if !o.get().contains(&id) {
                o.get_mut().push(id);
            }
            false
        }
    }
}

fn index_remove<K: Ord>(index: &mut BTreeMap<K, Vec<Id>>, key: &K, id: Id) -> bool {
    let Some(owners) = index.get_mut(key) else {
        return false;
    };
    if let Some(i) = owners.iter().position(|o| *o == id) {
        owners.swap_remove(i);
    }
    let gone = owners.is_empty();
    if gone {
        index.remove(key);
    }
    gone
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
    /// The mesh's interface names, shared by every planned route ([`MeshConfig::devices`]).
    devices: [Arc<str>; 2],
    local: String,
    ids: HashMap<String, Id>,
    nodes: Vec<Option<NodeState>>,
    free: Vec<Id>,
    fams: [FamilyState; 2],
    /// The nodes that are joining or leaving (their destinations may be sent plain).
    phased: BTreeSet<Id>,
}

impl IncrementalPlanner {
    /// A planner for node `local`, starting from `cluster`. The local node may be missing;
    /// its plan is then empty until it appears.
    pub fn new(cluster: &Cluster, local: &str) -> Self {
        let mut planner = Self {
            mesh: cluster.mesh().clone(),
            devices: cluster.mesh().devices(),
            local: local.to_owned(),
            ids: HashMap::with_capacity(cluster.nodes().len()),
            nodes: Vec::with_capacity(cluster.nodes().len()),
            free: Vec::new(),
            fams: [FamilyState::new(Family::V4), FamilyState::new(Family::V6)],
            phased: BTreeSet::new(),
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

    /// How many claims the trust rules refuse now ([`crate::claims`]), both families
    /// together. Kept current by every event at no extra cost: a metric an agent can export
    /// after each event, and a cheap signal that [`IncrementalPlanner::findings`] changed.
    pub fn refused_claims(&self) -> usize {
        if !self.mesh.enabled {
            return 0;
        }
        self.fams.iter().map(|f| f.refused).sum()
    }

    /// How many prefixes several nodes claim now (each one a [`Diagnostic::Clash`]), both
    /// families together; kept current like [`IncrementalPlanner::refused_claims`].
    pub fn disputed_prefixes(&self) -> usize {
        if !self.mesh.enabled {
            return 0;
        }
        self.fams.iter().map(|f| f.disputed).sum()
    }

    /// Everything [`diagnose`] finds in the current cluster (time proportional to the
    /// cluster: call it when something changed, not after every event).
    pub fn findings(&self) -> Vec<Diagnostic> {
        self.cluster().map(|c| diagnose(&c)).unwrap_or_default()
    }

    /// The whole current plan (time proportional to the plan).
    pub fn plan(&self) -> NodePlan {
        let mut plan = self.header();
        if self.local_id().is_none() {
            return plan;
        }
        let statics = Family::ALL.map(|f| strict_static(&self.mesh, f));
        // Room for both families' routes at once: reserving per family would double the list
        // when the second family is reserved (560,000 routes at 5,000 nodes × 110 pods).
        let room = plan
            .interfaces
            .iter()
            .filter(|i| self.local_routes(i.family).is_some())
            .map(|i| self.fams[i.family.index()].claims.len() + statics[i.family.index()].len())
            .sum();
        let mut routes = Vec::with_capacity(room);
        for iface in &mut plan.interfaces {
            let family = iface.family;
            let f = family.index();
            if self.local_routes(family).is_none() {
                continue;
            }
            let fam = &self.fams[f];
            for dest in fam.claims.keys() {
                if let Some(route) = self.route(family, *dest, self.decision(family, dest)) {
                    routes.push(route);
                }
            }
            for (dest, _) in &statics[f] {
                if !fam.claims.contains_key(dest)
                    && let Some(route) = self.route(family, *dest, self.decision(family, dest))
                {
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
                Err(Error::unknown_node(node))
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
                    let empty = NodeState::empty(&node, &self.mesh).node;
                    self.update(j, id, empty, BTreeSet::new());
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
                let changed = self.state_mut(id).workload.insert(ip);
                for ip in changed.into_iter().flatten() {
                    self.refresh(j, id, host_net(ip));
                }
            }
            Event::WorkloadIpRemoved { node, ip } => {
                let id = self.ids[&node];
                let changed = self.state_mut(id).workload.remove(&ip);
                for ip in changed.into_iter().flatten() {
                    self.refresh(j, id, host_net(ip));
                }
            }
            Event::BlockAdded { node, cidr } => {
                let id = self.ids[&node];
                if !self.state(id).blocks.contains(&cidr) {
                    self.state_mut(id).node.pod_cidrs.push(cidr);
                    let changed = self.state_mut(id).blocks.insert(cidr);
                    let changed: Vec<IpNet> = changed.into_iter().flatten().collect();
                    self.blocks_changed(j, id, &changed);
                }
            }
            Event::BlockRemoved { node, cidr } => {
                let id = self.ids[&node];
                if self.state(id).blocks.contains(&cidr) {
                    self.state_mut(id).node.pod_cidrs.retain(|b| *b != cidr);
                    let changed = self.state_mut(id).blocks.remove(&cidr);
                    let changed: Vec<IpNet> = changed.into_iter().flatten().collect();
                    self.blocks_changed(j, id, &changed);
                }
            }
            Event::MeshChanged(mesh) => {
                let nodes: Vec<NodeState> = self.nodes.iter().flatten().cloned().collect();
                *self = Self {
                    devices: mesh.devices(),
                    mesh,
                    local: std::mem::take(&mut self.local),
                    ids: HashMap::with_capacity(nodes.len()),
                    nodes: Vec::with_capacity(nodes.len()),
                    free: Vec::new(),
                    fams: [FamilyState::new(Family::V4), FamilyState::new(Family::V6)],
                    phased: BTreeSet::new(),
                };
                for state in nodes {
                    self.upsert(j, state.to_node());
                }
            }
        }
    }

    fn upsert(&mut self, j: &mut Option<Journal>, mut node: Node) {
        let workload: BTreeSet<IpAddr> =
            std::mem::take(&mut node.workload_ips).into_iter().collect();
        let id = match self.ids.get(&node.name) {
            Some(id) => *id,
            None => {
                let state = Some(NodeState::empty(&node.name, &self.mesh));
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

    /// Moves node `id` to `node` (whose `workload_ips` is empty) with `workload`, step by
    /// step. Each step changes the node's state and the indexes, then refreshes every claim
    /// the change can affect, the node's own and the other nodes'.
    fn update(&mut self, j: &mut Option<Journal>, id: Id, node: Node, workload: BTreeSet<IpAddr>) {
        self.set_wireguard(j, id, node.wireguard.clone());
        // Addresses: endpoints, participation, host-encryption claims and rule 4.
        if self.state(id).node.addresses != node.addresses {
            for family in Family::ALL {
                if self.state(id).node.address(family) != node.address(family) {
                    self.touch_peer(j, family, id);
                }
            }
            let mut counted = counted_addresses(&self.mesh, &node);
            counted.sort_unstable();
            let state = self.state_mut(id);
            state.node.addresses.clone_from(&node.addresses);
            let old = std::mem::replace(&mut state.addrs, counted.clone());
            let missing = |from: &[IpAddr], other: &[IpAddr]| -> Vec<IpAddr> {
                from.iter()
                    .filter(|a| other.binary_search(a).is_err())
                    .copied()
                    .collect()
            };
            let (gone, new) = (missing(&old, &counted), missing(&counted, &old));
            for a in &gone {
                index_remove(&mut self.fams[Family::of(a).index()].addrs, a, id);
            }
            for a in &new {
                index_add(&mut self.fams[Family::of(a).index()].addrs, *a, id);
            }
            for a in gone.into_iter().chain(new) {
                self.refresh(j, id, host_net(a));
                self.refresh_around(j, id, a);
            }
            for family in Family::ALL {
                self.refresh_part(j, id, family);
            }
        }
        // Underlay MTU.
        if self.state(id).node.underlay_mtu != node.underlay_mtu {
            let before = [Family::V4, Family::V6].map(|f| self.counted_mtu(id, f));
            self.state_mut(id).node.underlay_mtu = node.underlay_mtu;
            for family in Family::ALL {
                let after = self.counted_mtu(id, family);
                self.move_mtu(family, before[family.index()], after);
            }
        }
        // Blocks.
        let wanted: BTreeSet<IpNet> = node.pod_cidrs.iter().copied().collect();
        let changed = self.state_mut(id).blocks.sync(&wanted);
        self.blocks_changed(j, id, &changed);
        // Keep the given order of blocks (it does not change any claim).
        self.state_mut(id)
            .node
            .pod_cidrs
            .clone_from(&node.pod_cidrs);
        // Workload addresses.
        for ip in self.state_mut(id).workload.sync(&workload) {
            self.refresh(j, id, host_net(ip));
        }
    }

    /// Blocks `changed` started or stopped counting for node `id`: the index of accepted
    /// blocks, the node's cover (rebuilt once), its workload addresses inside the blocks
    /// (covered or not), the other nodes' blocks inside them (rule 5), and the blocks' own
    /// claims.
    fn blocks_changed(&mut self, j: &mut Option<Journal>, id: Id, changed: &[IpNet]) {
        if changed.is_empty() || self.mesh.route_source != RouteSource::CidrBlocks {
            return;
        }
        let accepted: Vec<IpNet> = changed
            .iter()
            .filter(|b| static_refusal(&self.mesh, b).is_none())
            .copied()
            .collect();
        let mut families = [false; 2];
        for block in &accepted {
            let f = Family::of_net(block).index();
            families[f] = true;
            let counts = self.state(id).blocks.counts(block);
            let fam = &mut self.fams[f];
            let len = usize::from(block.prefix_len());
            if counts {
                if index_add(&mut fam.blocks, *block, id) {
                    fam.lens[len] += 1;
                }
            } else if index_remove(&mut fam.blocks, block, id) {
                fam.lens[len] -= 1;
            }
        }
        for family in Family::ALL.into_iter().filter(|f| families[f.index()]) {
            let cover = Cover::new(
                self.state(id)
                    .blocks
                    .kept
                    .iter()
                    .filter(|b| Family::of_net(b) == family)
                    .filter(|b| static_refusal(&self.mesh, b).is_none())
                    .copied(),
            );
            self.state_mut(id).cover[family.index()] = cover;
        }
        for block in accepted {
            let inside: Vec<IpAddr> = self
                .state(id)
                .workload
                .kept
                .range(block.network()..=block.broadcast())
                .copied()
                .collect();
            for ip in inside {
                self.refresh(j, id, host_net(ip));
            }
            let family = Family::of_net(&block);
            let top = IpNet::new(block.broadcast(), family.host_prefix_len()).unwrap_or(block);
            let nested: Vec<(Id, IpNet)> = self.fams[family.index()]
                .blocks
                .range(block..=top)
                .filter(|(b, _)| b.prefix_len() > block.prefix_len() && block.contains(*b))
                .flat_map(|(b, owners)| owners.iter().filter(|o| **o != id).map(|o| (*o, *b)))
                .collect();
            for (other, b) in nested {
                self.refresh(j, other, b);
            }
        }
        for block in changed {
            self.refresh(j, id, *block);
        }
    }

    /// Address `addr` of node `id` appeared or went: refreshes the other nodes' claims that
    /// cover it (rule 4): its host prefix, and the accepted blocks around it.
    fn refresh_around(&mut self, j: &mut Option<Journal>, id: Id, addr: IpAddr) {
        let family = Family::of(&addr);
        let fam = &self.fams[family.index()];
        let host = host_net(addr);
        let mut others: Vec<(Id, IpNet)> = fam
            .claims
            .get(&host)
            .map(|c| {
                c.as_slice()
                    .iter()
                    .filter(|c| c.0 != id)
                    .map(|c| (c.0, host))
                    .collect()
            })
            .unwrap_or_default();
        for len in (0..family.host_prefix_len()).filter(|l| fam.lens[usize::from(*l)] > 0) {
            let Some(b) = prefix_of(addr, len) else {
                continue;
            };
            if let Some(owners) = fam.blocks.get(&b) {
                others.extend(owners.iter().filter(|o| **o != id).map(|o| (*o, b)));
            }
        }
        for (other, prefix) in others {
            self.refresh(j, other, prefix);
        }
    }

    /// Recomputes node `id`'s claim on `prefix` and records it.
    fn refresh(&mut self, j: &mut Option<Journal>, id: Id, prefix: IpNet) {
        let new = self.compute(id, &prefix);
        let f = Family::of_net(&prefix).index();
        let old = self.fams[f]
            .claims
            .get(&prefix)
            .and_then(|c| c.get(id))
            .unwrap_or(0);
        if new == old {
            return;
        }
        self.touch_dest(j, prefix);
        let fam = &mut self.fams[f];
        if old & REFUSED != 0 {
            fam.refused -= 1;
        }
        if new & REFUSED != 0 {
            fam.refused += 1;
        }
        match set_claim(&mut fam.claims, prefix, id, new) {
            (false, true) => fam.disputed += 1,
            (true, false) => fam.disputed -= 1,
            _ => {}
        }
    }

    /// Node `id`'s claim on `prefix` as the rules settle it now (0: no claim).
    fn compute(&self, id: Id, prefix: &IpNet) -> u8 {
        let Some(state) = &self.nodes[id] else {
            return 0;
        };
        let fields = state.fields(&self.mesh, prefix);
        if fields == 0 {
            return 0;
        }
        let f = Family::of_net(prefix).index();
        let fam = &self.fams[f];
        let covered = fields & WORKLOAD != 0 && state.cover[f].contains(prefix.addr());
        settle(
            &self.mesh,
            prefix,
            fields,
            covered,
            || fam.other_address(prefix, id),
            || fam.inside_other_block(prefix, id),
        )
    }

    fn set_wireguard(&mut self, j: &mut Option<Journal>, id: Id, wg: Option<NodeWireGuard>) {
        if self.state(id).node.wireguard == wg {
            return;
        }
        let old = self.state(id).node.clone();
        let mut new = old.clone();
        new.wireguard = wg;
        let strict_plain = self.mesh.strict_mode && old.plain_by_choice() != new.plain_by_choice();
        if (strict_plain || old.phase() != new.phase()) && j.is_some() {
            // Whether a claim is blackholed depends on its claimant being explicitly plain
            // (or leaving); whether it is routed into the tunnel, on the claimant's phase.
            for family in Family::ALL {
                for dest in self.state(id).prefixes(&self.mesh, family) {
                    self.touch_dest(j, dest);
                }
            }
        }
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
        let active = new.phase() == Phase::Active;
        self.state_mut(id).node.wireguard = new.wireguard;
        if active {
            self.phased.remove(&id);
        } else {
            self.phased.insert(id);
        }
        for (family, other) in affected {
            self.refresh_part(j, other, family);
        }
    }

    /// The underlay MTU with which node `id` counts for the family's mesh MTU now.
    fn counted_mtu(&self, id: Id, family: Family) -> Option<u32> {
        let state = self.state(id);
        counted_mtu(&self.mesh, &state.node, family, state.part[family.index()])
    }

    fn move_mtu(&mut self, family: Family, before: Option<u32>, after: Option<u32>) {
        if before == after {
            return;
        }
        let mtus = &mut self.fams[family.index()].mtus;
        if let Some(m) = before {
            remove_mtu(mtus, m);
        }
        if let Some(m) = after {
            *mtus.entry(m).or_default() += 1;
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
            for dest in state.prefixes(&self.mesh, family) {
                self.touch_dest(j, dest);
            }
        }
        let before = self.counted_mtu(id, family);
        self.state_mut(id).part[f] = now;
        let after = self.counted_mtu(id, family);
        self.move_mtu(family, before, after);
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

    /// The local node, when it programs routes in a family (it takes part, or strict mode).
    fn local_routes(&self, family: Family) -> Option<Id> {
        let id = self.local_id()?;
        let state = self.state(id);
        routes_active(&self.mesh, &state.node, family, state.part[family.index()]).then_some(id)
    }

    /// How a destination is routed now; `None` when it has no route.
    fn decision(&self, family: Family, dest: &IpNet) -> Option<Decision<Id>> {
        self.local_routes(family)?;
        self.claim_decision(family, dest).or_else(|| {
            strict_static(&self.mesh, family)
                .into_iter()
                .find(|(p, _)| p == dest)
                .map(|(_, d)| match d {
                    Decision::Blackhole => Decision::Blackhole,
                    _ => Decision::Throw,
                })
        })
    }

    /// How the claims on a destination route it now; `None` when they give it no route.
    fn claim_decision(&self, family: Family, dest: &IpNet) -> Option<Decision<Id>> {
        let local = self.local_routes(family)?;
        let f = family.index();
        let claim = self.fams[f].claims.get(dest)?;
        decide_claims(
            &self.mesh,
            (local, self.state(local).part[f]),
            dest,
            claim.as_slice().iter().copied(),
            |n| self.state(n).part[f],
            |n| routed_phases(self.state(local).node.phase(), self.state(n).node.phase()),
            |n| self.state(n).node.plain_by_choice(),
        )
    }

    fn route(&self, family: Family, dest: IpNet, decision: Option<Decision<Id>>) -> Option<Route> {
        let kind = route_type(decision?);
        Some(Route {
            family,
            table: self.mesh.routing_table,
            destination: dest,
            kind,
            device: (kind == RouteType::Unicast).then(|| self.devices[family.index()].clone()),
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
            .prefixes(&self.mesh, family)
            .into_iter()
            .filter(|d| allowed_on(self.decision(family, d)) == Some(id))
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
        let active =
            Family::ALL.map(|f| routes_active(&self.mesh, &state.node, f, state.part[f.index()]));
        // The destinations sent plain: a phased node's, while it owns them and takes part.
        let mut plain = Vec::new();
        if state.node.phase() != Phase::Joining {
            for family in Family::ALL.into_iter().filter(|f| active[f.index()]) {
                for &id in &self.phased {
                    let Some(other) = &self.nodes[id] else {
                        continue;
                    };
                    plain.extend(
                        other
                            .prefixes(&self.mesh, family)
                            .into_iter()
                            .filter(|d| self.decision(family, d) == Some(Decision::Accept(id))),
                    );
                }
            }
            plain.sort_unstable();
            plain.dedup();
            if plain.iter().any(|p| p.prefix_len() < p.max_prefix_len()) {
                // Routed destinations inside a wide plain prefix keep their own route (time
                // proportional to the claims, only while a phased node has a block).
                let routed = Family::ALL
                    .into_iter()
                    .filter(|f| active[f.index()])
                    .flat_map(|f| {
                        let fam = &self.fams[f.index()];
                        fam.claims
                            .keys()
                            .copied()
                            .chain(strict_static(&self.mesh, f).into_iter().map(|(d, _)| d))
                            .filter(move |d| self.decision(f, d).is_some())
                    });
                plain = plan::carve_plain(plain, routed);
            }
        }
        plan::finish(&self.mesh, &mut plan, active, state.node.phase(), plain);
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
            let (was, is) = (allowed_on(before), allowed_on(after));
            if was == is {
                continue;
            }
            if let Some(id) = was
                && !settled.contains(&(family, id))
                && let Some(view) = self.peer_view(family, id)
            {
                staying
                    .entry((family, id))
                    .or_insert_with(|| self.peer_update(family, &view))
                    .allowed_ips_removed
                    .push(dest);
            }
            if let Some(id) = is
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
