//! The pure heart of the crate: what to do to make the actual state match a plan.
//!
//! [`diff`] compares a [`NodePlan`] with an [`ActualState`] and returns a [`ChangeSet`];
//! [`delta_operations`] turns a [`PlanDelta`] into one without reading anything (the
//! incremental path). Neither does IO, and neither orders anything: the change set runs its
//! operations in the order of [`Phase`], stated once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;

use ipnet::IpNet;
use wgmesh_core::{
    Family, InterfacePlan, NodePlan, PlanDelta, PublicKey, Route, RouteType, Rule,
    delta::MarkingDelta,
};

use crate::marking;
use crate::op::{AllowedIpsRemoval, ChangeSet, Operation, PeerChange, Phase};
use crate::state::{
    ActualRoute, ActualRouteKind, ActualRule, ActualState, LinkKind, Ownership, RawRule,
};

/// What the diff needs besides the plan and the state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiffOptions {
    /// The kind of link the backend's devices are.
    pub link_kind: LinkKind,
    /// The public keys of the private keys to program, per family (IPv4, IPv6). `None`
    /// leaves that family's device key alone.
    pub public_keys: [Option<PublicKey>; 2],
}

impl Default for DiffOptions {
    fn default() -> Self {
        Self {
            link_kind: LinkKind::Wireguard,
            public_keys: [None, None],
        }
    }
}

impl DiffOptions {
    /// Options for a backend whose links are of `kind`, with these keys.
    pub fn new(link_kind: LinkKind, public_keys: [Option<PublicKey>; 2]) -> Self {
        Self {
            link_kind,
            public_keys,
        }
    }
}

/// The metric wgmesh gives its routes: 0 for IPv4, and the kernel's default 1024 for IPv6
/// (`IP6_RT_PRIO_USER`), so that reading back gives what was written.
pub fn route_metric(family: Family) -> u32 {
    match family {
        Family::V4 => 0,
        Family::V6 => 1024,
    }
}

fn rule_matches(a: &ActualRule, r: &Rule) -> bool {
    a.family == r.family
        && a.priority == r.priority
        && a.table == r.table
        && a.firewall_mark == Some(r.firewall_mark)
        && a.firewall_mask == Some(r.firewall_mask)
        && a.invert == r.invert
        && a.action == 1
        && !a.other_selectors
}

/// Whether the kernel may take `rule` for the one a delete request for `request` names. It
/// deletes the first rule, in list order, that matches every field the request carries: a
/// request echoes `request`'s dump when it has one (so it carries its selectors), else its
/// modelled fields; unset priority, mark, mask, action or table are wildcards, and flags
/// (`not`) are not compared. Selectors are compared by the whole dump (a close
/// approximation: two rules with the same selectors and different dumps are taken for
/// different). Used by the diff.
pub(crate) fn delete_would_take(request: &ActualRule, rule: &ActualRule) -> bool {
    let set = |v: Option<u32>| v.filter(|v| *v != 0);
    request.family == rule.family
        && (request.action == 0 || request.action == rule.action)
        && (request.table == 0 || request.table == rule.table)
        && (request.priority == 0 || request.priority == rule.priority)
        && set(request.firewall_mark).is_none_or(|m| rule.firewall_mark == Some(m))
        && set(request.firewall_mask).is_none_or(|m| rule.firewall_mask == Some(m))
        && (request.raw.is_empty()
            || !request.other_selectors
            || (rule.other_selectors && rule.raw == request.raw))
}

fn route_matches(a: &ActualRoute, r: &Route) -> bool {
    a.kind == ActualRouteKind::from(r.kind)
        && a.gateway.is_none()
        && a.tos == 0
        && a.metric == route_metric(r.family)
        && match r.kind {
            RouteType::Unicast => a.device.is_some() && a.device == r.device,
            // The kernel hangs IPv6 throw routes on `lo`; which device a throw has is moot.
            RouteType::Throw | RouteType::Blackhole => true,
        }
}

fn same_endpoint(a: Option<SocketAddr>, b: SocketAddr) -> bool {
    a.is_some_and(|a| a.ip() == b.ip() && a.port() == b.port())
}

/// Refuses a state in which a link with one of wgmesh's interface names (or a planned one) is
/// not wgmesh's ([`ActualLink::foreign`](crate::ActualLink::foreign)): `eth0`, a veth, `lo`,
/// somebody's own WireGuard link. [`Reconciler`](crate::Reconciler) calls it before
/// [`diff`], so neither a dry run nor a reconcile plans anything against such a host. Pure.
///
/// ```
/// use wgmesh_netlink::{check_ownership, ActualLink, ActualState, Error, Ownership};
/// let own = Ownership::from_mesh(&wgmesh_core::MeshConfig::default());
/// let mut actual = ActualState::default();
/// actual.links.insert("wireguard.cali".into(), ActualLink {
///     index: 2, kind: Some("veth".into()), mtu: 1500, up: true, alias: None, addresses: vec![],
/// });
/// let e = check_ownership(&actual, &own, ["wireguard.cali"]).unwrap_err();
/// assert!(matches!(&e, Error::ForeignLink { interface, .. } if interface == "wireguard.cali"));
/// assert!(e.to_string().contains("\"veth\" link"));
/// ```
pub fn check_ownership<'a>(
    actual: &ActualState,
    own: &'a Ownership,
    planned: impl IntoIterator<Item = &'a str>,
) -> crate::Result<()> {
    let mut names: BTreeSet<&str> = own.interfaces.iter().map(String::as_str).collect();
    names.extend(planned);
    for name in names {
        if let Some(reason) = foreign(actual, name) {
            return Err(crate::Error::ForeignLink {
                interface: name.to_owned(),
                reason,
            });
        }
    }
    Ok(())
}

/// Why the link `name` is not wgmesh's (`None`: it is, or there is none). A WireGuard or TUN
/// device without the marker whose device is blank — no private key, no peer, no mark, no
/// address — is taken for one wgmesh made and could not mark (the marking request failed, or
/// the agent stopped between the two): it is remade, so a run that fails there is repaired
/// by the next. Such a device carries no traffic, so remaking it costs nobody anything.
fn foreign(actual: &ActualState, name: &str) -> Option<crate::ForeignLink> {
    let reason = actual.links.get(name)?.foreign()?;
    let blank = actual
        .devices
        .get(name)
        .is_some_and(|d| d.public_key.is_none() && d.peers.is_empty() && d.firewall_mark == 0);
    match reason {
        crate::ForeignLink::Unmarked { .. } if blank => None,
        other => Some(other),
    }
}

/// The operations that make `actual` match `plan`, in execution order. Pure.
///
/// Links that are not wgmesh's ([`check_ownership`]) get no operation at all.
///
/// Owned objects that the plan does not want are removed: links with the owned interface
/// names, routes of the mesh table, rules that point at it, the nftables table. Everything
/// else is left alone (it is not even in `actual`).
///
/// ```
/// use wgmesh_netlink::{diff, ActualState, DiffOptions, Ownership, Operation};
/// use wgmesh_core::{plan_node, spec::parse_cluster};
/// let cluster = parse_cluster(r#"{"nodes":[
///   {"name":"a","addresses":["10.0.0.1"],"pod_cidrs":["10.65.0.0/26"],
///    "wireguard":{"public_key":"QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
///   {"name":"b","addresses":["10.0.0.2"],"pod_cidrs":["10.65.0.64/26"],
///    "wireguard":{"public_key":"/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
/// let plan = plan_node(&cluster, "a")?;
/// let own = Ownership::from_mesh(cluster.mesh());
/// let ops = diff(&plan, &ActualState::default(), &own, &DiffOptions::default()).into_operations();
/// assert!(matches!(ops[0], Operation::CreateLink { .. }));
/// assert!(matches!(ops.last(), Some(Operation::AddRule { .. })));
/// // Nothing to remove from an empty host when the plan is empty:
/// let empty = wgmesh_core::NodePlan::empty("a");
/// assert!(diff(&empty, &ActualState::default(), &own, &DiffOptions::default()).is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn diff(
    plan: &NodePlan,
    actual: &ActualState,
    own: &Ownership,
    opts: &DiffOptions,
) -> ChangeSet {
    diff_with_routes(plan, PlannedRoutes::new(&plan.routes), actual, own, opts)
}

/// A plan's routes as the kernel's are compared with them: which planned route each kernel
/// route is, and which planned routes the kernel has. The kernel's routes can be offered
/// while they are read ([`Self::take`], [`crate::Dataplane::read_with`]), so that the
/// routes that are as planned — all of them, in a steady state — are never held.
pub(crate) struct PlannedRoutes<'a> {
    routes: &'a [Route],
    /// A plan's routes are sorted by destination: a binary search finds a key's.
    sorted: bool,
    /// For routes not sorted: the index of each key's route, made at the first lookup
    /// (560,000 routes at 5,000 nodes × 110 pods: 35 MB).
    map: Option<HashMap<(Family, IpNet), usize>>,
    /// Which planned routes the kernel has, by index (a set of their keys took 20–30 MB).
    kept: Vec<bool>,
}

impl<'a> PlannedRoutes<'a> {
    pub(crate) fn new(routes: &'a [Route]) -> Self {
        Self {
            routes,
            sorted: routes.is_sorted_by_key(|r| r.destination),
            map: None,
            kept: vec![false; routes.len()],
        }
    }

    /// The index of the planned route of a key: the last of that family among the routes
    /// to that destination.
    fn desired(&mut self, family: Family, destination: IpNet) -> Option<usize> {
        let routes = self.routes;
        if self.sorted {
            let end = routes.partition_point(|r| r.destination <= destination);
            return (0..end)
                .rev()
                .take_while(|&i| routes[i].destination == destination)
                .find(|&i| routes[i].family == family);
        }
        let map = self.map.get_or_insert_with(|| {
            (routes.iter().enumerate())
                .map(|(i, r)| ((r.family, r.destination), i))
                .collect()
        });
        map.get(&(family, destination)).copied()
    }

    /// Takes a kernel route that is the planned route of its key, as planned, and the first
    /// such: `true` when it needs nothing done and need not be kept. A route with an output
    /// device other than the planned one is left to the diff (its device may be going).
    pub(crate) fn take(&mut self, a: &ActualRoute) -> bool {
        let Some(i) = self.desired(a.family, a.destination) else {
            return false;
        };
        let r = &self.routes[i];
        let taken = !self.kept[i]
            && route_matches(a, r)
            && (a.oif.is_none() || (a.device.is_some() && a.device == r.device));
        self.kept[i] |= taken;
        taken
    }
}

/// [`diff`] of `plan` with `routes` in place of `plan.routes` (a background resync shares
/// the reconciler's routes instead of copying them into its snapshot of the plan), some of
/// the kernel's routes maybe taken already ([`PlannedRoutes::take`]) and not in `actual`.
pub(crate) fn diff_with_routes(
    plan: &NodePlan,
    mut table: PlannedRoutes<'_>,
    actual: &ActualState,
    own: &Ownership,
    opts: &DiffOptions,
) -> ChangeSet {
    let mut ops = ChangeSet::new();
    let planned: BTreeMap<&str, &InterfacePlan> = plan
        .interfaces
        .iter()
        .map(|i| (i.name.as_str(), i))
        .collect();
    let mut names: BTreeSet<&str> = own.interfaces.iter().map(String::as_str).collect();
    names.extend(planned.keys().copied());

    // Links that go away (not planned, or of the wrong kind / not a working device). A link
    // that is not wgmesh's is never touched (see `check_ownership`).
    let mut gone: HashSet<&str> = HashSet::new();
    let foreign: HashSet<&str> = names
        .iter()
        .copied()
        .filter(|n| foreign(actual, n).is_some())
        .collect();
    for name in &names {
        let Some(link) = actual.links.get(*name).filter(|_| !foreign.contains(name)) else {
            continue;
        };
        // Of the wrong kind, not a working device, or one wgmesh could not mark.
        let wrong = link.kind.as_deref() != Some(opts.link_kind.as_str())
            || !actual.devices.contains_key(*name)
            || link.alias.as_deref() != Some(crate::LINK_MARKER);
        if !planned.contains_key(name) || wrong {
            ops.push(Operation::DeleteLink {
                interface: (*name).to_owned(),
            });
            gone.insert(name);
        }
    }
    let gone_index: HashSet<u32> = gone
        .iter()
        .filter_map(|n| actual.links.get(*n).map(|l| l.index))
        .collect();

    // Rules. The kernel deletes the first rule of its list (the dump's order) that a delete
    // request matches, and a request echoes the dumped rule, so it names every selector the
    // rule has; but what a rule lacks is a wildcard in its request, and `not` is never
    // compared. An unwanted rule whose request would take a kept rule listed before it (a
    // stray `lookup 1 pref 99` without selectors, or one that differs only by `not`) is
    // handled by adding a copy of the kept rule first — the kernel lists it after the
    // unwanted one — and deleting the original with it: each request then takes the rule it
    // names, and the table never lacks its rule.
    let mut kept_as: Vec<Option<usize>> = Vec::with_capacity(actual.rules.len());
    let mut matched = vec![false; plan.rules.len()];
    for a in &actual.rules {
        let i = plan
            .rules
            .iter()
            .enumerate()
            .position(|(i, r)| !matched[i] && rule_matches(a, r));
        if let Some(i) = i {
            matched[i] = true;
        }
        kept_as.push(i);
    }
    let mut refresh = vec![false; actual.rules.len()];
    for (i, a) in actual.rules.iter().enumerate() {
        // A duplicate of a planned rule may take either copy: the same rule stays.
        if kept_as[i].is_some() || plan.rules.iter().any(|r| rule_matches(a, r)) {
            continue;
        }
        for (j, k) in actual.rules[..i].iter().enumerate() {
            if kept_as[j].is_some() && delete_would_take(a, k) {
                refresh[j] = true;
            }
        }
    }
    for (i, a) in actual.rules.iter().enumerate() {
        match kept_as[i] {
            Some(r) if refresh[i] => ops.push(Operation::DuplicateRule {
                rule: plan.rules[r].clone(),
            }),
            Some(_) => continue,
            None => {}
        }
        ops.push(Operation::DeleteRule { rule: a.clone() });
    }
    for (r, m) in plan.rules.iter().zip(&matched) {
        if !m {
            ops.push(Operation::AddRule { rule: r.clone() });
        }
    }

    // Routes. Those taken while read whose device goes now are not kept: the kernel
    // removes them with their link (a route taken has the planned device, if any).
    let routes = table.routes;
    if !gone.is_empty() {
        for (r, k) in routes.iter().zip(table.kept.iter_mut()) {
            if r.device.as_deref().is_some_and(|d| gone.contains(d)) {
                *k = false;
            }
        }
    }
    for a in &actual.routes {
        if a.oif.is_some_and(|i| gone_index.contains(&i)) {
            continue; // the kernel removes it with its link
        }
        match table.desired(a.family, a.destination) {
            Some(i) if !table.kept[i] && route_matches(a, &routes[i]) => table.kept[i] = true,
            // Same key as the wanted route: replaced in place by AddRoute, no gap.
            Some(i) if a.metric == route_metric(a.family) && a.tos == 0 && !table.kept[i] => {}
            _ => ops.push(Operation::DeleteRoute {
                route: Box::new(a.clone()),
            }),
        }
    }
    // A planned route that another of its key shadows is kept with that one.
    let mut kept = std::mem::take(&mut table.kept);
    match &table.map {
        Some(map) => {
            for (i, r) in routes.iter().enumerate() {
                if let Some(&j) = map.get(&(r.family, r.destination)) {
                    kept[i] = kept[j];
                }
            }
        }
        None if table.sorted => {
            let mut last: [Option<usize>; 2] = [None; 2];
            for i in (0..routes.len()).rev() {
                if routes.get(i + 1).map(|r| r.destination) != Some(routes[i].destination) {
                    last = [None; 2];
                }
                match last[routes[i].family.index()] {
                    Some(j) => kept[i] = kept[j],
                    None => last[routes[i].family.index()] = Some(i),
                }
            }
        }
        None => {} // nothing looked up: nothing kept
    }
    let missing = kept.iter().filter(|k| !**k).count();
    ops.reserve(Phase::Routes, missing);
    ops.extend(
        (routes.iter().zip(&kept))
            .filter(|(_, k)| !**k)
            .map(|(r, _)| Operation::AddRoute { route: r.clone() }),
    );

    // Links, devices and peers of planned interfaces.
    for (name, p) in &planned {
        if foreign.contains(name) {
            continue;
        }
        let key = opts.public_keys[p.family.index()];
        let existing = actual
            .links
            .get(*name)
            .filter(|_| !gone.contains(name))
            .zip(actual.devices.get(*name));
        let Some((link, dev)) = existing else {
            ops.push(Operation::CreateLink {
                interface: (*name).to_owned(),
                kind: opts.link_kind,
                mtu: p.mtu,
            });
            ops.push(Operation::ConfigureDevice {
                interface: (*name).to_owned(),
                set_private_key: key.map(|_| p.family),
                listen_port: Some(p.listen_port),
                firewall_mark: Some(p.firewall_mark),
            });
            for peer in &p.peers {
                ops.push(Operation::from(PeerChange {
                    interface: (*name).to_owned(),
                    public_key: peer.public_key,
                    endpoint: Some(peer.endpoint),
                    persistent_keepalive: Some(peer.persistent_keepalive.unwrap_or(0)),
                    allowed_ips: peer.allowed_ips.clone(),
                }));
            }
            continue;
        };
        if link.mtu != p.mtu {
            ops.push(Operation::SetMtu {
                interface: (*name).to_owned(),
                mtu: p.mtu,
            });
        }
        if !link.up {
            ops.push(Operation::SetUp {
                interface: (*name).to_owned(),
            });
        }
        let set_key = key.filter(|k| dev.public_key != Some(*k)).map(|_| p.family);
        let port = (dev.listen_port != p.listen_port).then_some(p.listen_port);
        let mark = (dev.firewall_mark != p.firewall_mark).then_some(p.firewall_mark);
        if set_key.is_some() || port.is_some() || mark.is_some() {
            ops.push(Operation::ConfigureDevice {
                interface: (*name).to_owned(),
                set_private_key: set_key,
                listen_port: port,
                firewall_mark: mark,
            });
        }
        let wanted: BTreeMap<PublicKey, &wgmesh_core::PeerPlan> =
            p.peers.iter().map(|q| (q.public_key, q)).collect();
        for k in dev.peers.keys() {
            if !wanted.contains_key(k) {
                ops.push(Operation::RemovePeer {
                    interface: (*name).to_owned(),
                    public_key: *k,
                });
            }
        }
        // Allowed IPs that some peer gains: those move by themselves.
        let mut gained: HashSet<IpNet> = HashSet::new();
        let mut removals = Vec::new();
        for (k, q) in &wanted {
            let keepalive = q.persistent_keepalive.unwrap_or(0);
            match dev.peers.get(k) {
                None => {
                    gained.extend(q.allowed_ips.iter().copied());
                    ops.push(Operation::from(PeerChange {
                        interface: (*name).to_owned(),
                        public_key: *k,
                        endpoint: Some(q.endpoint),
                        persistent_keepalive: Some(keepalive),
                        allowed_ips: q.allowed_ips.clone(),
                    }));
                }
                Some(a) => {
                    let add: Vec<IpNet> = q
                        .allowed_ips
                        .iter()
                        .filter(|ip| !a.allowed_ips.contains(ip))
                        .copied()
                        .collect();
                    let want: BTreeSet<&IpNet> = q.allowed_ips.iter().collect();
                    let remove: Vec<IpNet> = a
                        .allowed_ips
                        .iter()
                        .filter(|ip| !want.contains(ip))
                        .copied()
                        .collect();
                    let endpoint = (!same_endpoint(a.endpoint, q.endpoint)).then_some(q.endpoint);
                    let ka = (a.persistent_keepalive != keepalive).then_some(keepalive);
                    gained.extend(add.iter().copied());
                    if !add.is_empty() || endpoint.is_some() || ka.is_some() {
                        ops.push(Operation::from(PeerChange {
                            interface: (*name).to_owned(),
                            public_key: *k,
                            endpoint,
                            persistent_keepalive: ka,
                            allowed_ips: add,
                        }));
                    }
                    if !remove.is_empty() {
                        removals.push((*k, remove));
                    }
                }
            }
        }
        for (k, remove) in removals {
            let remove: Vec<IpNet> = remove
                .into_iter()
                .filter(|ip| !gained.contains(ip))
                .collect();
            if !remove.is_empty() {
                ops.push(Operation::from(AllowedIpsRemoval {
                    interface: (*name).to_owned(),
                    public_key: k,
                    allowed_ips: remove,
                }));
            }
        }
    }

    // Sysctls and marking.
    ops.extend(
        plan.sysctls
            .iter()
            .filter(|s| actual.sysctls.get(&s.key).map(|v| v.trim()) != Some(s.value.trim()))
            .map(|s| Operation::SetSysctl {
                key: s.key.clone(),
                value: s.value.clone(),
            }),
    );
    let wanted_marking = plan.marking.as_ref().map(marking::compile);
    match &wanted_marking {
        Some(w) if *w != marking::without_counts(&actual.marking) => {
            ops.push(Operation::SetMarking { tables: w.clone() })
        }
        None if !actual.marking.is_empty() => ops.push(Operation::DeleteMarking {
            table: own.nft_table.clone(),
        }),
        _ => {}
    }

    ops
}

/// The wanted rule as it would be read back.
pub(crate) fn actual_rule(r: &Rule) -> ActualRule {
    ActualRule {
        family: r.family,
        priority: r.priority,
        table: r.table,
        firewall_mark: Some(r.firewall_mark),
        firewall_mask: Some(r.firewall_mask),
        invert: r.invert,
        action: 1,
        other_selectors: false,
        raw: RawRule::default(),
    }
}

/// The wanted route as it would be read back (without interface index).
pub(crate) fn actual_route(r: &Route) -> ActualRoute {
    ActualRoute {
        family: r.family,
        table: r.table,
        destination: r.destination,
        kind: r.kind.into(),
        device: r.device.clone(),
        oif: None,
        gateway: None,
        metric: route_metric(r.family),
        tos: 0,
    }
}

/// The operations that carry out `delta`, made against `old` (the plan the dataplane is
/// believed to match), without reading the dataplane. For one workload IP that appears, this
/// is one [`Operation::SetPeer`] and one [`Operation::AddRoute`].
///
/// A peer added to an interface that already exists (a node joined, or a node's key changed:
/// add-new, which takes the old entry's allowed IPs, then remove-old) is followed by [`Operation::StartHandshake`] when its planned
/// keepalive is off, so its first handshake starts now rather than with the first packet
/// (and a handshake the peer rejected a moment ago, because it did not know this node's key
/// yet, is not left to WireGuard's 5-second retry). Peers of an interface the delta creates
/// get none, and neither does a full [`diff`](crate::diff()): a whole device's initial peers
/// would all handshake at once. The keepalive ends as planned.
///
/// ```
/// use wgmesh_netlink::{delta_operations, DiffOptions, Operation};
/// use wgmesh_core::{Event, IncrementalPlanner, spec::parse_cluster};
/// let cluster = parse_cluster(r#"{"mesh":{"route_source":"workload_ips"},"nodes":[
///   {"name":"a","addresses":["10.0.0.1"],
///    "wireguard":{"public_key":"QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
///   {"name":"b","addresses":["10.0.0.2"],
///    "wireguard":{"public_key":"/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
/// let mut planner = IncrementalPlanner::new(&cluster, "a");
/// let old = planner.plan();
/// let delta = planner.apply(Event::WorkloadIpAdded { node: "b".into(), ip: "10.0.0.20".parse()? })?;
/// let ops = delta_operations(&old, &delta, &DiffOptions::default()).into_operations();
/// assert_eq!(ops.len(), 2);
/// assert!(matches!(ops[0], Operation::SetPeer { .. }));
/// assert!(matches!(ops[1], Operation::AddRoute { .. }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn delta_operations(old: &NodePlan, d: &PlanDelta, opts: &DiffOptions) -> ChangeSet {
    let mut ops = ChangeSet::new();
    for r in &d.rules_removed {
        ops.push(Operation::DeleteRule {
            rule: actual_rule(r),
        });
    }
    let added: HashSet<(Family, IpNet)> = d
        .routes_added
        .iter()
        .map(|r| (r.family, r.destination))
        .collect();
    for r in &d.routes_removed {
        if !added.contains(&(r.family, r.destination)) {
            let mut a = actual_route(r);
            if d.interfaces_removed
                .iter()
                .any(|i| Some(i.name.as_str()) == r.device.as_deref())
            {
                continue; // goes with its link
            }
            a.device = r.device.clone();
            ops.push(Operation::DeleteRoute { route: Box::new(a) });
        }
    }
    for i in &d.interfaces_removed {
        ops.push(Operation::DeleteLink {
            interface: i.name.clone(),
        });
    }
    for i in &d.interfaces_added {
        ops.push(Operation::CreateLink {
            interface: i.name.clone(),
            kind: opts.link_kind,
            mtu: i.mtu,
        });
        ops.push(Operation::ConfigureDevice {
            interface: i.name.clone(),
            set_private_key: opts.public_keys[i.family.index()].map(|_| i.family),
            listen_port: Some(i.listen_port),
            firewall_mark: Some(i.firewall_mark),
        });
    }
    for i in &d.interfaces_changed {
        let before = old.interface(i.family);
        if before.is_none_or(|b| b.mtu != i.mtu) {
            ops.push(Operation::SetMtu {
                interface: i.name.clone(),
                mtu: i.mtu,
            });
        }
        let port = before
            .is_none_or(|b| b.listen_port != i.listen_port)
            .then_some(i.listen_port);
        let mark = before
            .is_none_or(|b| b.firewall_mark != i.firewall_mark)
            .then_some(i.firewall_mark);
        if port.is_some() || mark.is_some() {
            ops.push(Operation::ConfigureDevice {
                interface: i.name.clone(),
                set_private_key: None,
                listen_port: port,
                firewall_mark: mark,
            });
        }
    }
    for p in &d.peers_removed {
        ops.push(Operation::RemovePeer {
            interface: p.interface.clone(),
            public_key: p.public_key,
        });
    }
    let mut gained: HashSet<(&str, IpNet)> = HashSet::new();
    // Devices this delta creates: their peers are the whole device's initial configuration,
    // so no handshake is started for them (thousands at once on a big cluster).
    let created: HashSet<&str> = d.interfaces_added.iter().map(|i| i.name.as_str()).collect();
    for p in &d.peers_added {
        gained.extend(
            p.peer
                .allowed_ips
                .iter()
                .map(|ip| (p.interface.as_str(), *ip)),
        );
        let keepalive = p.peer.persistent_keepalive.unwrap_or(0);
        ops.push(Operation::from(PeerChange {
            interface: p.interface.clone(),
            public_key: p.peer.public_key,
            endpoint: Some(p.peer.endpoint),
            persistent_keepalive: Some(keepalive),
            allowed_ips: p.peer.allowed_ips.clone(),
        }));
        // A peer added to a running device (a node joined, a key changed) handshakes at
        // once. With a planned keepalive, setting it above already does that.
        if keepalive == 0 && !created.contains(p.interface.as_str()) {
            ops.push(Operation::StartHandshake {
                interface: p.interface.clone(),
                public_key: p.peer.public_key,
            });
        }
    }
    for u in &d.peers_updated {
        gained.extend(
            u.allowed_ips_added
                .iter()
                .map(|ip| (u.interface.as_str(), *ip)),
        );
        let before = old
            .interface(u.family)
            .and_then(|i| i.peers.iter().find(|p| p.public_key == u.public_key));
        let endpoint = before
            .is_none_or(|b| b.endpoint != u.endpoint)
            .then_some(u.endpoint);
        let ka = before
            .is_none_or(|b| b.persistent_keepalive != u.persistent_keepalive)
            .then_some(u.persistent_keepalive.unwrap_or(0));
        if !u.allowed_ips_added.is_empty() || endpoint.is_some() || ka.is_some() {
            ops.push(Operation::from(PeerChange {
                interface: u.interface.clone(),
                public_key: u.public_key,
                endpoint,
                persistent_keepalive: ka,
                allowed_ips: u.allowed_ips_added.clone(),
            }));
        }
    }
    for u in &d.peers_updated {
        let remove: Vec<IpNet> = u
            .allowed_ips_removed
            .iter()
            .filter(|ip| !gained.contains(&(u.interface.as_str(), **ip)))
            .copied()
            .collect();
        if !remove.is_empty() {
            ops.push(Operation::from(AllowedIpsRemoval {
                interface: u.interface.clone(),
                public_key: u.public_key,
                allowed_ips: remove,
            }));
        }
    }
    for r in &d.routes_added {
        ops.push(Operation::AddRoute { route: r.clone() });
    }
    for s in &d.sysctls_added {
        ops.push(Operation::SetSysctl {
            key: s.key.clone(),
            value: s.value.clone(),
        });
    }
    if let MarkingDelta::Set(m) = &d.marking {
        ops.push(Operation::SetMarking {
            tables: marking::compile(m),
        });
    }
    for r in &d.rules_added {
        ops.push(Operation::AddRule { rule: r.clone() });
    }
    if let MarkingDelta::Removed = &d.marking {
        if let Some(m) = &old.marking {
            ops.push(Operation::DeleteMarking {
                table: m.table.clone(),
            });
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ActualRouteKind;
    use wgmesh_core::plan_node;

    /// The kernel's routes looked up by binary search in the plan's sorted routes give the
    /// operations a map of them gives (routes not sorted take the map): kept, replaced (a
    /// throw where a unicast is planned), deleted (a stray destination, another metric, a
    /// second copy), added (one missing).
    #[test]
    fn routes_found_by_binary_search_diff_as_by_map() {
        let node = |n: u8, v4: &str, v6: Option<&str>| {
            let mut cidrs: Vec<IpNet> = vec![v4.parse().unwrap()];
            cidrs.extend(v6.map(|c| c.parse::<IpNet>().unwrap()));
            wgmesh_core::Node::new(format!("n{n}"))
                .with_addresses([std::net::IpAddr::from([10, 0, 0, n])])
                .with_pod_cidrs(cidrs)
                .with_wireguard(wgmesh_core::NodeWireGuard::new(
                    Some(wgmesh_core::PrivateKey::generate().public_key()),
                    None,
                ))
        };
        let mut mesh = wgmesh_core::MeshConfig::default();
        mesh.host_encryption = true;
        let cluster = wgmesh_core::Cluster::new(
            mesh,
            vec![
                node(1, "10.65.0.0/26", Some("fd65::/64")),
                node(2, "10.65.0.64/26", Some("fd65:0:0:1::/64")),
                node(3, "10.65.0.128/26", None),
                node(4, "10.65.0.192/26", None),
            ],
        )
        .unwrap();
        let plan = plan_node(&cluster, "n1").unwrap();
        assert!(plan.routes.len() >= 6, "{:?}", plan.routes);
        assert!(plan.routes.is_sorted_by_key(|r| r.destination));
        let mut actual = ActualState {
            routes: plan.routes.iter().map(actual_route).collect(),
            ..ActualState::default()
        };
        actual.routes.remove(1); // missing: added
        actual.routes[0].kind = match actual.routes[0].kind {
            ActualRouteKind::Throw => ActualRouteKind::Unicast,
            _ => ActualRouteKind::Throw,
        }; // replaced
        let mut stray = actual.routes[2].clone();
        stray.destination = "192.168.7.0/24".parse().unwrap();
        stray.family = Family::V4;
        let mut other_metric = actual.routes[3].clone();
        other_metric.metric += 7;
        let copy = actual.routes[4].clone();
        actual.routes.extend([stray, other_metric, copy]);
        let own = Ownership::from_mesh(cluster.mesh());
        let opts = DiffOptions::default();
        let ops = |routes: &[Route]| {
            let planned = PlannedRoutes::new(routes);
            let mut o: Vec<String> = diff_with_routes(&plan, planned, &actual, &own, &opts)
                .iter()
                .filter(|o| {
                    matches!(
                        o,
                        Operation::AddRoute { .. } | Operation::DeleteRoute { .. }
                    )
                })
                .map(|o| o.to_string())
                .collect();
            o.sort();
            o
        };
        let mut unsorted = plan.routes.clone();
        unsorted.reverse();
        let by_search = ops(&plan.routes);
        assert_eq!(by_search, ops(&unsorted));
        // 2 added or replaced; 3 deleted.
        assert_eq!(
            by_search
                .iter()
                .filter(|o| o.starts_with("replace"))
                .count(),
            2,
            "{by_search:#?}"
        );
        assert_eq!(
            by_search.iter().filter(|o| o.starts_with("delete")).count(),
            3,
            "{by_search:#?}"
        );
        // A planned route that a later one of its key shadows goes with that one: kept (no
        // add) when the kernel has the later one, in sorted and unsorted routes alike.
        let kept = &plan.routes[5];
        let shadowed = |routes: &[Route]| {
            let at = routes.iter().position(|r| r == kept).unwrap();
            let mut copy = kept.clone();
            copy.kind = match kept.kind {
                RouteType::Throw => RouteType::Blackhole,
                _ => RouteType::Throw,
            };
            let mut routes = routes.to_vec();
            routes.insert(at, copy);
            routes
        };
        assert_eq!(ops(&shadowed(&plan.routes)), by_search);
        assert_eq!(ops(&shadowed(&unsorted)), by_search);
        // Shadowing the planned route instead replaces the kernel's: both of the key are
        // added, and the kernel's second copy is replaced in place with its first.
        let mut last = plan.routes.clone();
        let at = last.iter().position(|r| r == kept).unwrap();
        last.insert(at + 1, shadowed(&plan.routes)[at].clone());
        let replaced = ops(&last);
        assert_eq!(replaced.len(), by_search.len() + 1, "{replaced:#?}");
    }
}
