//! Test doubles built on the [`Dataplane`] abstraction: an in-memory kernel that records
//! every operation, and a wrapper that fails the k-th operation of any dataplane.
//!
//! They are public so that other crates (the Kubernetes agent's scenario tests) can run whole
//! reconciles without a kernel:
//!
//! ```
//! use wgmesh_netlink::{Reconciler, Ownership, KeyRing, Operation};
//! use wgmesh_netlink::testing::{FakeKernel, FailingDataplane};
//! use wgmesh_core::{plan_node, spec::parse_cluster};
//! let cluster = parse_cluster(r#"{"nodes":[
//!   {"name":"a","addresses":["10.0.0.1"],"pod_cidrs":["10.65.0.0/26"],
//!    "wireguard":{"public_key":"QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}}]}"#)?;
//! let plan = plan_node(&cluster, "a")?;
//! let own = Ownership::from_mesh(cluster.mesh());
//! // Fail the third operation; the next reconcile converges.
//! let mut r = Reconciler::new(FailingDataplane::new(FakeKernel::new(), 2), own, KeyRing::none());
//! assert!(r.reconcile(&plan).is_err());
//! r.reconcile(&plan)?;
//! assert!(r.reconcile(&plan)?.is_noop());
//! let recorded: &[Operation] = r.dataplane().inner().recorded();
//! assert!(!recorded.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;

use wgmesh_core::{PublicKey, RouteType};

use crate::diff::{actual_route, route_metric};
use crate::error::{EEXIST, ENODEV, ENOENT, ESRCH, Error, Result};
use crate::keys::KeyRing;
use crate::nft::NftTable;
use crate::op::Operation;
use crate::reconcile::Dataplane;
use crate::state::{
    ActualDevice, ActualLink, ActualRoute, ActualRouteKind, ActualRule, ActualState, LinkKind,
    Ownership, PeerStats,
};

/// An in-memory kernel with the semantics that matter to wgmesh: links with indexes, WireGuard
/// devices whose allowed IPs move between peers, routes of every table (replace semantics, and
/// removed with their link), rules of every table (duplicates allowed, kept in priority order,
/// and a delete takes the first rule the request matches, as in Linux), sysctls and nftables
/// tables. It records every operation executed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FakeKernel {
    /// Every link, by name (owned or not).
    pub links: BTreeMap<String, ActualLink>,
    /// WireGuard devices, by link name.
    pub devices: BTreeMap<String, ActualDevice>,
    /// Routes of every table.
    pub routes: Vec<ActualRoute>,
    /// Rules of every table.
    pub rules: Vec<ActualRule>,
    /// Sysctls.
    pub sysctls: BTreeMap<String, String>,
    /// nftables tables, by (family, name).
    pub nft: BTreeMap<(u8, String), NftTable>,
    /// The link kind [`Operation::CreateLink`] makes.
    pub kind: LinkKind,
    /// Traffic counters of peers, by (interface, key), as set by [`FakeKernel::set_peer_stats`];
    /// a peer without an entry reports none. Removing a peer or its link drops its counters.
    counters: BTreeMap<(String, PublicKey), PeerStats>,
    initiations: Vec<(String, PublicKey)>,
    next_index: u32,
    recorded: Vec<Operation>,
    messages: usize,
}

impl Default for FakeKernel {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeKernel {
    /// An empty kernel that makes kernel WireGuard links, with `lo` (index 1).
    pub fn new() -> Self {
        let mut k = Self {
            links: BTreeMap::new(),
            devices: BTreeMap::new(),
            routes: Vec::new(),
            rules: Vec::new(),
            sysctls: BTreeMap::new(),
            nft: BTreeMap::new(),
            kind: LinkKind::Wireguard,
            counters: BTreeMap::new(),
            initiations: Vec::new(),
            next_index: 1,
            recorded: Vec::new(),
            messages: 0,
        };
        k.add_link("lo", Some("loopback"), 65536, true);
        k
    }

    /// Adds a link (a foreign one, or a drifted one of an owned name); returns its index.
    pub fn add_link(&mut self, name: &str, kind: Option<&str>, mtu: u32, up: bool) -> u32 {
        let index = self.next_index;
        self.next_index += 1;
        self.links.insert(
            name.to_owned(),
            ActualLink {
                index,
                kind: kind.map(str::to_owned),
                mtu,
                up,
            },
        );
        if kind == Some(self.kind.as_str()) || kind == Some("wireguard") {
            self.devices
                .insert(name.to_owned(), ActualDevice::default());
        }
        index
    }

    /// Sets the counters a peer reports (its latest handshake, bytes received and sent), as
    /// traffic through a tunnel would. They are reported while the peer exists on that
    /// interface; a peer that is removed and added again starts from zero, as in Linux.
    pub fn set_peer_stats(&mut self, stats: PeerStats) {
        self.counters
            .insert((stats.interface.clone(), stats.public_key), stats);
    }

    /// The handshake initiations Linux would have sent at once because a peer's persistent
    /// keepalive was switched on (from 0) while its link was up, by (interface, key), in
    /// order: what [`Operation::SetPeer`] with a keepalive and [`Operation::StartHandshake`]
    /// cause. (Initiations caused by traffic are not modelled.)
    pub fn handshakes_initiated(&self) -> &[(String, PublicKey)] {
        &self.initiations
    }

    /// Forgets the recorded handshake initiations.
    pub fn clear_handshakes_initiated(&mut self) {
        self.initiations.clear();
    }

    /// Sets a peer's persistent keepalive as Linux does: switching it on while the link is up
    /// sends a keepalive at once, which starts a handshake.
    fn set_keepalive(&mut self, interface: &str, key: PublicKey, keepalive: u16) {
        let up = self.links.get(interface).is_some_and(|l| l.up);
        let Some(p) = self
            .devices
            .get_mut(interface)
            .and_then(|d| d.peers.get_mut(&key))
        else {
            return;
        };
        if p.persistent_keepalive == 0 && keepalive != 0 && up {
            self.initiations.push((interface.to_owned(), key));
        }
        p.persistent_keepalive = keepalive;
    }

    /// Every operation executed so far, in order.
    pub fn recorded(&self) -> &[Operation] {
        &self.recorded
    }

    /// Forgets the recorded operations.
    pub fn clear_recorded(&mut self) {
        self.recorded.clear();
    }

    /// Messages a real kernel would have been sent (one per operation here).
    pub fn messages(&self) -> usize {
        self.messages
    }

    fn index_of(&self, name: &str) -> Option<u32> {
        self.links.get(name).map(|l| l.index)
    }

    fn name_of(&self, index: u32) -> Option<String> {
        self.links
            .iter()
            .find(|(_, l)| l.index == index)
            .map(|(n, _)| n.clone())
    }

    fn device(&mut self, name: &str, doing: &str) -> Result<&mut ActualDevice> {
        self.devices
            .get_mut(name)
            .ok_or_else(|| Error::kernel(doing, ENODEV))
    }

    fn apply(&mut self, op: &Operation, keys: &KeyRing) -> Result<()> {
        let doing = op.to_string();
        match op {
            Operation::CreateLink {
                interface,
                kind,
                mtu,
            } => {
                if self.links.contains_key(interface) {
                    return Err(Error::kernel(doing, EEXIST));
                }
                self.add_link(interface, Some(kind.as_str()), *mtu, true);
                self.devices
                    .insert(interface.clone(), ActualDevice::default());
            }
            Operation::DeleteLink { interface } => {
                let link = self
                    .links
                    .remove(interface)
                    .ok_or_else(|| Error::kernel(&doing, ENODEV))?;
                self.devices.remove(interface);
                self.counters.retain(|(i, _), _| i != interface);
                self.routes.retain(|r| r.oif != Some(link.index));
            }
            Operation::SetMtu { interface, mtu } => {
                self.links
                    .get_mut(interface)
                    .ok_or_else(|| Error::kernel(&doing, ENODEV))?
                    .mtu = *mtu;
            }
            Operation::SetUp { interface } => {
                self.links
                    .get_mut(interface)
                    .ok_or_else(|| Error::kernel(&doing, ENODEV))?
                    .up = true;
            }
            Operation::ConfigureDevice {
                interface,
                set_private_key,
                listen_port,
                firewall_mark,
            } => {
                let public = set_private_key.and_then(|f| keys.public_key(f));
                let dev = self.device(interface, &doing)?;
                if set_private_key.is_some() {
                    dev.public_key = public;
                }
                if let Some(p) = listen_port {
                    dev.listen_port = *p;
                }
                if let Some(m) = firewall_mark {
                    dev.firewall_mark = *m;
                }
            }
            Operation::RemovePeer {
                interface,
                public_key,
            } => {
                self.device(interface, &doing)?.peers.remove(public_key);
                self.counters.remove(&(interface.clone(), *public_key));
            }
            Operation::SetPeer {
                interface,
                public_key,
                endpoint,
                persistent_keepalive,
                allowed_ips,
            } => {
                let dev = self.device(interface, &doing)?;
                for (k, p) in dev.peers.iter_mut() {
                    if k != public_key {
                        for ip in allowed_ips {
                            p.allowed_ips.remove(ip);
                        }
                    }
                }
                let p = dev.peers.entry(*public_key).or_default();
                if let Some(e) = endpoint {
                    p.endpoint = Some(*e);
                }
                p.allowed_ips.extend(allowed_ips.iter().copied());
                if let Some(k) = persistent_keepalive {
                    self.set_keepalive(interface, *public_key, *k);
                }
            }
            Operation::StartHandshake {
                interface,
                public_key,
            } => {
                // Two peer updates, as the real dataplanes send them (which create the peer
                // if it is missing, as an update without UPDATE_ONLY does).
                self.device(interface, &doing)?
                    .peers
                    .entry(*public_key)
                    .or_default();
                self.set_keepalive(interface, *public_key, crate::op::KICK_KEEPALIVE);
                self.set_keepalive(interface, *public_key, 0);
            }
            Operation::RemoveAllowedIps {
                interface,
                public_key,
                allowed_ips,
            } => {
                let dev = self.device(interface, &doing)?;
                if let Some(p) = dev.peers.get_mut(public_key) {
                    for ip in allowed_ips {
                        p.allowed_ips.remove(ip);
                    }
                }
            }
            Operation::AddRoute { route } => {
                let mut a = actual_route(route);
                if route.kind == RouteType::Unicast {
                    let dev = route.device.as_deref().unwrap_or_default();
                    a.oif = Some(
                        self.index_of(dev)
                            .ok_or_else(|| Error::kernel(&doing, ENODEV))?,
                    );
                }
                let metric = route_metric(route.family);
                self.routes.retain(|r| {
                    !(r.table == a.table
                        && r.family == a.family
                        && r.destination == a.destination
                        && r.tos == 0
                        && r.metric == metric)
                });
                self.routes.push(a);
            }
            Operation::DeleteRoute { route } => {
                let pos = self
                    .routes
                    .iter()
                    .position(|r| {
                        r.table == route.table
                            && r.family == route.family
                            && r.destination == route.destination
                            && r.kind == route.kind
                            && r.metric == route.metric
                            && r.tos == route.tos
                            && (route.oif.is_none() || r.oif == route.oif)
                    })
                    .ok_or_else(|| Error::kernel(&doing, ESRCH))?;
                self.routes.remove(pos);
            }
            Operation::AddRule { rule } | Operation::DuplicateRule { rule } => {
                // After the last rule of the family with the same or a lower priority.
                let a = crate::diff::actual_rule(rule);
                let pos = self
                    .rules
                    .iter()
                    .rposition(|r| r.family == a.family && r.priority <= a.priority)
                    .map_or(0, |p| p + 1);
                self.rules.insert(pos, a);
            }
            Operation::DeleteRule { rule } => {
                // The first rule the request matches, as Linux picks it (see
                // `delete_would_take`): not necessarily the one the caller meant.
                let pos = self
                    .rules
                    .iter()
                    .position(|r| crate::diff::delete_would_take(rule, r))
                    .ok_or_else(|| Error::kernel(&doing, ENOENT))?;
                self.rules.remove(pos);
            }
            Operation::SetSysctl { key, value } => {
                self.sysctls.insert(key.clone(), value.clone());
            }
            Operation::SetMarking { tables } => {
                for f in crate::nft::FAMILIES {
                    if let Some(t) = tables.first() {
                        self.nft.remove(&(f, t.name.clone()));
                    }
                }
                for t in tables {
                    self.nft.insert((t.family, t.name.clone()), t.clone());
                }
            }
            Operation::DeleteMarking { table } => {
                for f in crate::nft::FAMILIES {
                    self.nft.remove(&(f, table.clone()));
                }
            }
        }
        Ok(())
    }
}

impl Dataplane for FakeKernel {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        let mut s = ActualState::default();
        for name in &own.interfaces {
            if let Some(l) = self.links.get(name) {
                s.links.insert(name.clone(), l.clone());
            }
            if let Some(d) = self.devices.get(name) {
                s.devices.insert(name.clone(), d.clone());
            }
        }
        s.routes = self
            .routes
            .iter()
            .filter(|r| r.table == own.table)
            .map(|r| {
                let mut r = r.clone();
                r.device = r.oif.and_then(|i| self.name_of(i));
                r
            })
            .collect();
        s.rules = self
            .rules
            .iter()
            .filter(|r| r.table == own.table)
            .cloned()
            .collect();
        for k in sysctls {
            if let Some(v) = self.sysctls.get(k) {
                s.sysctls.insert(k.clone(), v.clone());
            }
        }
        s.marking = crate::nft::FAMILIES
            .iter()
            .filter_map(|f| self.nft.get(&(*f, own.nft_table.clone())).cloned())
            .collect();
        Ok(s)
    }

    fn execute(&mut self, ops: &[Operation], keys: &KeyRing) -> Result<usize> {
        for (index, op) in ops.iter().enumerate() {
            self.messages += 1;
            self.apply(op, keys).map_err(|e| Error::Operation {
                index,
                total: ops.len(),
                operation: op.to_string(),
                source: Box::new(e),
            })?;
            self.recorded.push(op.clone());
        }
        Ok(ops.len())
    }

    fn link_kind(&self) -> LinkKind {
        self.kind
    }

    fn peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>> {
        let mut out = Vec::new();
        for name in &own.interfaces {
            for key in self
                .devices
                .get(name)
                .into_iter()
                .flat_map(|d| d.peers.keys())
            {
                out.push(
                    self.counters
                        .get(&(name.clone(), *key))
                        .cloned()
                        .unwrap_or_else(|| PeerStats::zero(name.as_str(), *key)),
                );
            }
        }
        Ok(out)
    }
}

/// Wraps a dataplane and fails its k-th operation (counted from 0 over the wrapper's
/// lifetime): the operations before it are executed, that one and the rest of its run are
/// not. Reads pass through. Works over the real kernel as well as over [`FakeKernel`].
#[derive(Debug)]
pub struct FailingDataplane<D> {
    inner: D,
    fail_at: Option<usize>,
    seen: usize,
}

impl<D: Dataplane> FailingDataplane<D> {
    /// Fails operation number `k` (0-based, counted across runs).
    pub fn new(inner: D, k: usize) -> Self {
        Self {
            inner,
            fail_at: Some(k),
            seen: 0,
        }
    }

    /// The wrapped dataplane.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The wrapped dataplane, mutably.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.inner
    }

    /// The wrapped dataplane, given back.
    pub fn into_inner_for_test(self) -> D {
        self.inner
    }

    /// Whether the fault has fired.
    pub fn fired(&self) -> bool {
        self.fail_at.is_none()
    }
}

impl<D: Dataplane> Dataplane for FailingDataplane<D> {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        self.inner.read(own, sysctls)
    }

    fn execute(&mut self, ops: &[Operation], keys: &KeyRing) -> Result<usize> {
        match self.fail_at {
            Some(k) if k < self.seen + ops.len() => {
                let local = k - self.seen;
                self.fail_at = None;
                self.seen += local + 1;
                if local > 0 {
                    self.inner.execute(&ops[..local], keys)?;
                }
                Err(Error::Operation {
                    index: local,
                    total: ops.len(),
                    operation: ops[local].to_string(),
                    source: Box::new(Error::Injected {
                        doing: ops[local].to_string(),
                    }),
                })
            }
            _ => {
                self.seen += ops.len();
                self.inner.execute(ops, keys)
            }
        }
    }

    fn link_kind(&self) -> LinkKind {
        self.inner.link_kind()
    }

    fn peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>> {
        self.inner.peer_stats(own)
    }
}

/// An owned route the way [`FakeKernel`] stores it, for tests that drift state.
pub fn route(
    family: wgmesh_core::Family,
    table: u32,
    destination: ipnet::IpNet,
    kind: ActualRouteKind,
    oif: Option<u32>,
) -> ActualRoute {
    ActualRoute {
        family,
        table,
        destination,
        kind,
        device: None,
        oif,
        gateway: None,
        metric: route_metric(family),
        tos: 0,
    }
}
