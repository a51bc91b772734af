//! The difference between two plans of one node, in canonical form.
//!
//! [`diff`] computes it from two whole plans; the [`IncrementalPlanner`](crate::IncrementalPlanner)
//! produces the same value from one event, without looking at the rest of the cluster.
//! [`NodePlan::apply_delta`] turns the old plan into the new one.
//!
//! Canonical means: every list sorted (interfaces by family, peers by family then key, routes
//! by destination, sysctls by key), an interface whose name changes is removed and added, a
//! peer whose key changes is removed and added, a route whose type or device changes is
//! removed and added, and peers of an added or removed interface appear only in
//! `peers_added` (for added interfaces) or nowhere (for removed ones).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::key::PublicKey;
use crate::model::Family;
use crate::plan::{InterfacePlan, Marking, NodePlan, PeerPlan, Route, Rule, Sysctl};

/// A peer that goes away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRef {
    /// The interface that had it.
    pub interface: String,
    /// The interface's family.
    pub family: Family,
    /// The node it stood for.
    pub node: String,
    /// Its key.
    pub public_key: PublicKey,
}

/// A peer that appears, with everything it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAdded {
    /// The interface that gets it.
    pub interface: String,
    /// The interface's family.
    pub family: Family,
    /// The whole peer.
    #[serde(flatten)]
    pub peer: PeerPlan,
}

/// A peer that stays (same key) but changes: its settings are given whole, its allowed IPs as
/// a difference, so appliers never need to replace the whole list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerUpdate {
    /// The interface that has it.
    pub interface: String,
    /// The interface's family.
    pub family: Family,
    /// Its key.
    pub public_key: PublicKey,
    /// The node it stands for, now.
    pub node: String,
    /// Its endpoint, now.
    pub endpoint: SocketAddr,
    /// Its keepalive, now.
    pub persistent_keepalive: Option<u16>,
    /// Allowed IPs it gains, sorted.
    pub allowed_ips_added: Vec<IpNet>,
    /// Allowed IPs it loses, sorted.
    pub allowed_ips_removed: Vec<IpNet>,
}

/// What happens to the nftables marking.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkingDelta {
    /// Nothing.
    #[default]
    Unchanged,
    /// It becomes this (created or replaced; boxed: a marking is large, and most deltas
    /// leave it unchanged).
    Set(Box<Marking>),
    /// It goes away.
    Removed,
}

/// The difference between two plans of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanDelta {
    /// Interfaces that go away, with their peers (settings only; `peers` is empty).
    pub interfaces_removed: Vec<InterfacePlan>,
    /// Interfaces that appear (settings only; their peers are in `peers_added`).
    pub interfaces_added: Vec<InterfacePlan>,
    /// Interfaces whose port, mark, MTU or key change (new settings; `peers` is empty).
    pub interfaces_changed: Vec<InterfacePlan>,
    /// Peers that go away.
    pub peers_removed: Vec<PeerRef>,
    /// Peers that appear.
    pub peers_added: Vec<PeerAdded>,
    /// Peers that change.
    pub peers_updated: Vec<PeerUpdate>,
    /// Routes that go away.
    pub routes_removed: Vec<Route>,
    /// Routes that appear.
    pub routes_added: Vec<Route>,
    /// Rules that go away.
    pub rules_removed: Vec<Rule>,
    /// Rules that appear.
    pub rules_added: Vec<Rule>,
    /// Sysctls no longer required.
    pub sysctls_removed: Vec<Sysctl>,
    /// Sysctls newly required.
    pub sysctls_added: Vec<Sysctl>,
    /// The marking.
    pub marking: MarkingDelta,
}

impl PlanDelta {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Sorts every list into canonical order.
    pub(crate) fn canonicalize(&mut self) {
        self.interfaces_removed.sort_by_key(|i| i.family);
        self.interfaces_added.sort_by_key(|i| i.family);
        self.interfaces_changed.sort_by_key(|i| i.family);
        self.peers_removed.sort_by_key(|p| (p.family, p.public_key));
        self.peers_added
            .sort_by_key(|p| (p.family, p.peer.public_key));
        self.peers_updated.sort_by_key(|p| (p.family, p.public_key));
        for p in &mut self.peers_updated {
            p.allowed_ips_added.sort_unstable();
            p.allowed_ips_removed.sort_unstable();
        }
        for p in &mut self.peers_added {
            p.peer.allowed_ips.sort_unstable();
        }
        self.routes_removed.sort_by_key(|r| (r.destination, r.kind));
        self.routes_added.sort_by_key(|r| (r.destination, r.kind));
        self.rules_removed.sort_by_key(|r| r.family);
        self.rules_added.sort_by_key(|r| r.family);
        self.sysctls_removed.sort();
        self.sysctls_added.sort();
    }

    /// A one-line summary: counts of what changes.
    pub fn summary(&self) -> String {
        let allowed_added: usize = self
            .peers_updated
            .iter()
            .map(|p| p.allowed_ips_added.len())
            .sum();
        let allowed_removed: usize = self
            .peers_updated
            .iter()
            .map(|p| p.allowed_ips_removed.len())
            .sum();
        format!(
            "interfaces +{} -{} ~{}, peers +{} -{} ~{} (allowed ips +{allowed_added} -{allowed_removed}), routes +{} -{}, rules +{} -{}, sysctls +{} -{}, marking {}",
            self.interfaces_added.len(),
            self.interfaces_removed.len(),
            self.interfaces_changed.len(),
            self.peers_added.len(),
            self.peers_removed.len(),
            self.peers_updated.len(),
            self.routes_added.len(),
            self.routes_removed.len(),
            self.rules_added.len(),
            self.rules_removed.len(),
            self.sysctls_added.len(),
            self.sysctls_removed.len(),
            match self.marking {
                MarkingDelta::Unchanged => "unchanged",
                MarkingDelta::Set(_) => "set",
                MarkingDelta::Removed => "removed",
            }
        )
    }
}

fn settings(iface: &InterfacePlan) -> InterfacePlan {
    InterfacePlan {
        peers: Vec::new(),
        ..iface.clone()
    }
}

fn sorted_difference<T: Ord + Clone>(a: &[T], b: &[T]) -> Vec<T> {
    // a and b are sorted; returns a \ b.
    let mut out = Vec::new();
    let mut j = 0;
    for x in a {
        while j < b.len() && b[j] < *x {
            j += 1;
        }
        if j >= b.len() || b[j] != *x {
            out.push(x.clone());
        }
    }
    out
}

/// The canonical difference from `old` to `new`.
///
/// ```
/// use wgmesh_core::{diff, NodePlan};
/// let old = NodePlan::empty("a");
/// assert!(diff(&old, &old).is_empty());
/// ```
pub fn diff(old: &NodePlan, new: &NodePlan) -> PlanDelta {
    let mut d = PlanDelta::default();
    for family in Family::ALL {
        let (a, b) = (old.interface(family), new.interface(family));
        match (a, b) {
            (None, None) => {}
            (Some(a), None) => d.interfaces_removed.push(settings(a)),
            (None, Some(b)) => {
                d.interfaces_added.push(settings(b));
                add_all_peers(&mut d, b);
            }
            (Some(a), Some(b)) if a.name != b.name => {
                d.interfaces_removed.push(settings(a));
                d.interfaces_added.push(settings(b));
                add_all_peers(&mut d, b);
            }
            (Some(a), Some(b)) => {
                if settings(a) != settings(b) {
                    d.interfaces_changed.push(settings(b));
                }
                diff_peers(&mut d, a, b);
            }
        }
    }
    let old_routes: HashMap<(IpNet, u32), &Route> = old
        .routes
        .iter()
        .map(|r| ((r.destination, r.table), r))
        .collect();
    let new_routes: HashMap<(IpNet, u32), &Route> = new
        .routes
        .iter()
        .map(|r| ((r.destination, r.table), r))
        .collect();
    for (k, r) in &old_routes {
        if new_routes.get(k) != Some(r) {
            d.routes_removed.push((*r).clone());
        }
    }
    for (k, r) in &new_routes {
        if old_routes.get(k) != Some(r) {
            d.routes_added.push((*r).clone());
        }
    }
    (d.rules_removed, d.rules_added) = removed_and_added(&old.rules, &new.rules);
    (d.sysctls_removed, d.sysctls_added) = removed_and_added(&old.sysctls, &new.sysctls);
    d.marking = match (&old.marking, &new.marking) {
        (a, b) if a == b => MarkingDelta::Unchanged,
        (_, Some(m)) => MarkingDelta::Set(Box::new(m.clone())),
        (Some(_), None) => MarkingDelta::Removed,
        (None, None) => MarkingDelta::Unchanged,
    };
    d.canonicalize();
    d
}

/// The items of short lists that only `old` has, and those that only `new` has.
fn removed_and_added<T: PartialEq + Clone>(old: &[T], new: &[T]) -> (Vec<T>, Vec<T>) {
    let only = |a: &[T], b: &[T]| a.iter().filter(|x| !b.contains(x)).cloned().collect();
    (only(old, new), only(new, old))
}

/// The index of a peer in a list sorted by node name: by name first, else by key.
fn find_peer(peers: &[PeerPlan], node: &str, key: &PublicKey) -> Option<usize> {
    match peers.binary_search_by(|p| p.node.as_str().cmp(node)) {
        Ok(i) if peers[i].public_key == *key => Some(i),
        _ => peers.iter().position(|p| p.public_key == *key),
    }
}

/// Removes the items with keys in `removed` (sorted or not) from `v`, sorted by `key`, and
/// inserts `added`, keeping it sorted: by binary search for a few changes, by one pass for many.
fn patch_sorted<T, K: Ord + Copy>(
    v: &mut Vec<T>,
    removed: &[K],
    added: impl ExactSizeIterator<Item = T>,
    key: impl Fn(&T) -> K,
) {
    const FEW: usize = 32;
    if removed.len() + added.len() <= FEW {
        for k in removed {
            if let Ok(i) = v.binary_search_by(|x| key(x).cmp(k)) {
                v.remove(i);
            }
        }
        for item in added {
            let at = v.partition_point(|x| key(x) < key(&item));
            v.insert(at, item);
        }
    } else {
        let mut gone = removed.to_vec();
        gone.sort_unstable();
        v.retain(|x| gone.binary_search(&key(x)).is_err());
        v.extend(added);
        v.sort_by_key(|x| key(x));
    }
}

fn add_all_peers(d: &mut PlanDelta, iface: &InterfacePlan) {
    for peer in &iface.peers {
        d.peers_added.push(PeerAdded {
            interface: iface.name.clone(),
            family: iface.family,
            peer: peer.clone(),
        });
    }
}

fn diff_peers(d: &mut PlanDelta, a: &InterfacePlan, b: &InterfacePlan) {
    let old: BTreeMap<PublicKey, &PeerPlan> = a.peers.iter().map(|p| (p.public_key, p)).collect();
    let new: BTreeMap<PublicKey, &PeerPlan> = b.peers.iter().map(|p| (p.public_key, p)).collect();
    for (key, p) in &old {
        if !new.contains_key(key) {
            d.peers_removed.push(PeerRef {
                interface: a.name.clone(),
                family: a.family,
                node: p.node.clone(),
                public_key: *key,
            });
        }
    }
    for (key, q) in &new {
        match old.get(key) {
            None => d.peers_added.push(PeerAdded {
                interface: b.name.clone(),
                family: b.family,
                peer: (*q).clone(),
            }),
            Some(p) if p != q => d.peers_updated.push(PeerUpdate {
                interface: b.name.clone(),
                family: b.family,
                public_key: *key,
                node: q.node.clone(),
                endpoint: q.endpoint,
                persistent_keepalive: q.persistent_keepalive,
                allowed_ips_added: sorted_difference(&q.allowed_ips, &p.allowed_ips),
                allowed_ips_removed: sorted_difference(&p.allowed_ips, &q.allowed_ips),
            }),
            Some(_) => {}
        }
    }
}

impl NodePlan {
    /// Applies a delta made against this plan; afterwards the plan equals the new plan.
    ///
    /// ```
    /// use wgmesh_core::{diff, plan_node, spec::parse_cluster, NodePlan};
    /// let cluster = parse_cluster(r#"{"nodes":[{"name":"a","addresses":["10.0.0.1"],
    ///   "wireguard":{"public_key":"QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}}]}"#)?;
    /// let new = plan_node(&cluster, "a")?;
    /// let mut plan = NodePlan::empty("a");
    /// plan.apply_delta(&diff(&plan, &new));
    /// assert_eq!(plan, new);
    /// # Ok::<(), wgmesh_core::Error>(())
    /// ```
    pub fn apply_delta(&mut self, d: &PlanDelta) {
        self.apply_delta_except_routes(d);
        let removed: Vec<IpNet> = d.routes_removed.iter().map(|r| r.destination).collect();
        patch_sorted(
            &mut self.routes,
            &removed,
            d.routes_added.iter().cloned(),
            |r| r.destination,
        );
    }

    /// [`NodePlan::apply_delta`] but for the routes, which stay as they are: for a caller
    /// that keeps route changes aside and folds many at once (patching a sorted vector of
    /// 560,000 routes per change moves half of it).
    ///
    /// ```
    /// use wgmesh_core::{diff, plan_node, spec::parse_cluster, NodePlan};
    /// let cluster = parse_cluster(r#"{"nodes":[{"name":"a","addresses":["10.0.0.1"],
    ///   "wireguard":{"public_key":"QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}}]}"#)?;
    /// let new = plan_node(&cluster, "a")?;
    /// let mut plan = NodePlan::empty("a");
    /// plan.apply_delta_except_routes(&diff(&plan, &new));
    /// assert_eq!(plan.interfaces, new.interfaces);
    /// assert!(plan.routes.is_empty());
    /// # Ok::<(), wgmesh_core::Error>(())
    /// ```
    pub fn apply_delta_except_routes(&mut self, d: &PlanDelta) {
        self.interfaces.retain(|i| {
            !d.interfaces_removed
                .iter()
                .any(|r| r.family == i.family && r.name == i.name)
        });
        for changed in &d.interfaces_changed {
            if let Some(i) = self
                .interfaces
                .iter_mut()
                .find(|i| i.family == changed.family)
            {
                let peers = std::mem::take(&mut i.peers);
                *i = InterfacePlan {
                    peers,
                    ..changed.clone()
                };
            }
        }
        self.interfaces.extend(d.interfaces_added.iter().cloned());
        self.interfaces.sort_by_key(|i| i.family);
        for iface in &mut self.interfaces {
            let family = iface.family;
            let peers = &mut iface.peers;
            for r in d.peers_removed.iter().filter(|r| r.family == family) {
                if let Some(i) = find_peer(peers, &r.node, &r.public_key) {
                    peers.remove(i);
                }
            }
            for u in d.peers_updated.iter().filter(|u| u.family == family) {
                let Some(i) = find_peer(peers, &u.node, &u.public_key) else {
                    continue;
                };
                let p = &mut peers[i];
                let renamed = p.node != u.node;
                p.node.clone_from(&u.node);
                p.endpoint = u.endpoint;
                p.persistent_keepalive = u.persistent_keepalive;
                patch_sorted(
                    &mut p.allowed_ips,
                    &u.allowed_ips_removed,
                    u.allowed_ips_added.iter().copied(),
                    |ip| *ip,
                );
                if renamed {
                    peers.sort_by(|a, b| a.node.cmp(&b.node));
                }
            }
            for a in d.peers_added.iter().filter(|a| a.family == family) {
                let at = peers.partition_point(|p| p.node < a.peer.node);
                peers.insert(at, a.peer.clone());
            }
        }
        self.rules.retain(|r| !d.rules_removed.contains(r));
        self.rules.extend(d.rules_added.iter().cloned());
        self.rules.sort_by_key(|r| r.family);
        self.sysctls.retain(|s| !d.sysctls_removed.contains(s));
        self.sysctls.extend(d.sysctls_added.iter().cloned());
        self.sysctls.sort();
        match &d.marking {
            MarkingDelta::Unchanged => {}
            MarkingDelta::Set(m) => self.marking = Some(m.as_ref().clone()),
            MarkingDelta::Removed => self.marking = None,
        }
    }
}
