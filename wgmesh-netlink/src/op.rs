//! Operations, the smallest changes the executor knows how to make, and the [`ChangeSet`] that
//! holds them in the one order they must run in ([`Phase`]). [`crate::diff()`] and
//! [`crate::delta_operations`] produce change sets; a [`Dataplane`](crate::Dataplane)
//! executes their operations. Operations serialize to JSON for reports and never carry a
//! private key (only whether to set it).

use std::fmt;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wgmesh_core::{Family, PublicKey, Route, Rule};

use crate::marking::NftTable;
use crate::state::{ActualRoute, ActualRule, LinkKind};

/// The persistent keepalive (seconds) that [`Operation::StartHandshake`] switches on for an
/// instant. Any non-zero value starts the handshake; should the switch back fail, a peer left
/// with this one is corrected by the next full reconcile.
pub const KICK_KEEPALIVE: u16 = 25;

/// One change to the dataplane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Operation {
    /// Create the WireGuard link (kernel) or start the userspace daemon, with this MTU, up.
    CreateLink {
        /// Interface name.
        interface: String,
        /// The link kind the backend creates.
        kind: LinkKind,
        /// MTU.
        mtu: u32,
    },
    /// Delete a link (one of wgmesh's names; wrong kind, or no longer planned).
    DeleteLink {
        /// Interface name.
        interface: String,
    },
    /// Set a link's MTU.
    SetMtu {
        /// Interface name.
        interface: String,
        /// MTU.
        mtu: u32,
    },
    /// Bring a link up.
    SetUp {
        /// Interface name.
        interface: String,
    },
    /// Set device settings; `None` leaves a setting as it is.
    ConfigureDevice {
        /// Interface name.
        interface: String,
        /// Set the private key of this family (from the key ring; never serialized).
        set_private_key: Option<Family>,
        /// Listening port.
        listen_port: Option<u16>,
        /// Firewall mark.
        firewall_mark: Option<u32>,
    },
    /// Remove a peer.
    RemovePeer {
        /// Interface name.
        interface: String,
        /// The peer's key.
        public_key: PublicKey,
    },
    /// Create or update a peer, adding allowed IPs (an allowed IP held by another peer of the
    /// device moves to this one). Nothing is cleared first. Boxed, as the other large
    /// variants: an operation list holds one route operation per destination (560,000 on a
    /// node of a 5,000 × 110 cluster), each as large as the largest variant.
    SetPeer(Box<PeerChange>),
    /// Make WireGuard send a handshake initiation to a peer now, leaving its persistent
    /// keepalive off: switch the keepalive on ([`KICK_KEEPALIVE`] seconds), which makes both
    /// the kernel and wireguard-go send a keepalive — so, without a session, a handshake
    /// initiation — at once, then off again in the same execution. Emitted by
    /// [`delta_operations`](crate::delta_operations) after a peer whose planned keepalive is
    /// off is added to a device that already runs (a node joining, a key change), so the
    /// first handshake does not wait for traffic, and a rejected one is not stuck behind
    /// WireGuard's 5-second retry. Never on a device created by the same run.
    StartHandshake {
        /// Interface name.
        interface: String,
        /// The peer's key.
        public_key: PublicKey,
    },
    /// Remove some allowed IPs from a peer, leaving the others in place.
    RemoveAllowedIps(Box<AllowedIpsRemoval>),
    /// Add or replace a route of the mesh table.
    AddRoute {
        /// The route.
        route: Route,
    },
    /// Delete a route of the mesh table, exactly as found.
    DeleteRoute {
        /// The route (boxed: see [`Operation::SetPeer`]).
        route: Box<ActualRoute>,
    },
    /// Add the policy rule.
    AddRule {
        /// The rule.
        rule: Rule,
    },
    /// Add the policy rule again although an identical one exists (no `NLM_F_EXCL`): Linux
    /// lists the copy after every rule of the same priority. The diff does this before
    /// deleting the original together with an unwanted rule listed after it whose delete
    /// request would otherwise take the original (see [`crate::diff()`]), so the table never
    /// lacks its rule.
    DuplicateRule {
        /// The rule.
        rule: Rule,
    },
    /// Delete a rule that points at the mesh table, exactly as found.
    DeleteRule {
        /// The rule.
        rule: ActualRule,
    },
    /// Write a sysctl.
    SetSysctl {
        /// Dotted key.
        key: String,
        /// Value.
        value: String,
    },
    /// Replace wgmesh's nftables tables with these, atomically (one transaction).
    SetMarking {
        /// The whole tables.
        tables: Vec<NftTable>,
    },
    /// Delete wgmesh's nftables tables (every family).
    DeleteMarking {
        /// Table name.
        table: String,
    },
}

/// What [`Operation::SetPeer`] sets: a peer, created or updated, with allowed IPs added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PeerChange {
    /// Interface name.
    pub interface: String,
    /// The peer's key.
    pub public_key: PublicKey,
    /// Endpoint to set, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// Keepalive to set (0 turns it off), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
    /// Allowed IPs to add.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<IpNet>,
}

impl PeerChange {
    /// A change of the peer `public_key` of `interface` that sets nothing yet.
    ///
    /// ```
    /// use wgmesh_netlink::{Operation, PeerChange};
    /// let key = wgmesh_core::PrivateKey::generate().public_key();
    /// let mut change = PeerChange::new("wg0", key);
    /// change.allowed_ips.push("10.0.0.2/32".parse()?);
    /// let op = Operation::from(change);
    /// assert_eq!(op.interface(), Some("wg0"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(interface: impl Into<String>, public_key: PublicKey) -> Self {
        Self {
            interface: interface.into(),
            public_key,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: Vec::new(),
        }
    }
}

impl From<PeerChange> for Operation {
    fn from(change: PeerChange) -> Self {
        Self::SetPeer(Box::new(change))
    }
}

/// What [`Operation::RemoveAllowedIps`] removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AllowedIpsRemoval {
    /// Interface name.
    pub interface: String,
    /// The peer's key.
    pub public_key: PublicKey,
    /// Allowed IPs to remove.
    pub allowed_ips: Vec<IpNet>,
}

impl AllowedIpsRemoval {
    /// Removes `allowed_ips` from the peer `public_key` of `interface`.
    pub fn new(
        interface: impl Into<String>,
        public_key: PublicKey,
        allowed_ips: Vec<IpNet>,
    ) -> Self {
        Self {
            interface: interface.into(),
            public_key,
            allowed_ips,
        }
    }
}

impl From<AllowedIpsRemoval> for Operation {
    fn from(removal: AllowedIpsRemoval) -> Self {
        Self::RemoveAllowedIps(Box::new(removal))
    }
}

impl Operation {
    /// The interface this operation acts on, if any.
    pub fn interface(&self) -> Option<&str> {
        match self {
            Self::CreateLink { interface, .. }
            | Self::DeleteLink { interface }
            | Self::SetMtu { interface, .. }
            | Self::SetUp { interface }
            | Self::ConfigureDevice { interface, .. }
            | Self::RemovePeer { interface, .. }
            | Self::StartHandshake { interface, .. } => Some(interface),
            Self::SetPeer(p) => Some(&p.interface),
            Self::RemoveAllowedIps(r) => Some(&r.interface),
            Self::AddRoute { .. }
            | Self::DeleteRoute { .. }
            | Self::AddRule { .. }
            | Self::DuplicateRule { .. }
            | Self::DeleteRule { .. }
            | Self::SetSysctl { .. }
            | Self::SetMarking { .. }
            | Self::DeleteMarking { .. } => None,
        }
    }

    /// The peer this operation acts on, as (interface, key), if it acts on one.
    pub fn peer(&self) -> Option<(&str, &PublicKey)> {
        match self {
            Self::RemovePeer {
                interface,
                public_key,
            }
            | Self::StartHandshake {
                interface,
                public_key,
            } => Some((interface, public_key)),
            Self::SetPeer(p) => Some((&p.interface, &p.public_key)),
            Self::RemoveAllowedIps(r) => Some((&r.interface, &r.public_key)),
            _ => None,
        }
    }

    /// The phase this operation belongs to: where it runs in a [`ChangeSet`].
    pub fn phase(&self) -> Phase {
        match self {
            Self::DuplicateRule { .. } => Phase::RuleCopies,
            Self::DeleteRule { .. } => Phase::RuleDeletes,
            Self::DeleteRoute { .. } => Phase::RouteDeletes,
            Self::DeleteLink { .. } => Phase::LinkDeletes,
            Self::CreateLink { .. } | Self::SetMtu { .. } | Self::SetUp { .. } => Phase::Links,
            Self::ConfigureDevice { .. } => Phase::Devices,
            Self::RemovePeer { .. } => Phase::PeerRemovals,
            Self::SetPeer(_) | Self::StartHandshake { .. } => Phase::Peers,
            Self::RemoveAllowedIps(_) => Phase::AllowedIpRemovals,
            Self::AddRoute { .. } => Phase::Routes,
            Self::SetSysctl { .. } => Phase::Sysctls,
            Self::SetMarking { .. } => Phase::Marking,
            Self::AddRule { .. } => Phase::RuleAdds,
            Self::DeleteMarking { .. } => Phase::MarkingDeletes,
        }
    }
}

/// The phases of a change, in the order they run. This order is stated here and nowhere
/// else: [`ChangeSet`] sorts operations by it, whoever builds the set.
///
/// Rules that point at the mesh table go first when they must go (so traffic stops entering
/// the table before it changes) and come last when they are added (so traffic enters only a
/// complete table, as Calico does); routes are deleted before links; links are made before
/// devices are configured; peers are added before others are removed (a key change is
/// add-new, which takes the allowed IPs from the old entry in the same message, then
/// remove-old: removing first left a moment in which the peer's addresses had no peer, and
/// WireGuard refused packets to them with `ENOKEY`); allowed IPs are added before others are
/// removed (an allowed IP that moves between peers is simply added to its new peer: WireGuard
/// moves it, with no gap); routes
/// are replaced in place; the marking exists before the rule that depends on it, and goes
/// after it.
///
/// ```
/// use wgmesh_netlink::Phase;
/// assert!(Phase::RuleDeletes < Phase::Links && Phase::Links < Phase::Peers);
/// assert_eq!(Phase::ALL.first(), Some(&Phase::RuleCopies));
/// assert_eq!(Phase::ALL.last(), Some(&Phase::MarkingDeletes));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Copies of kept rules, added before a stray rule whose delete request would take the
    /// original ([`Operation::DuplicateRule`]).
    RuleCopies,
    /// Rules pointing at the mesh table that go.
    RuleDeletes,
    /// Routes of the mesh table that go.
    RouteDeletes,
    /// Links that go (wrong kind, or no longer planned).
    LinkDeletes,
    /// Links made or changed (MTU, up).
    Links,
    /// Device settings (key, port, fwmark).
    Devices,
    /// Peers added or changed, and handshakes started.
    Peers,
    /// Allowed IPs removed from kept peers.
    AllowedIpRemovals,
    /// Peers that go: after the peers that take their allowed IPs, so those move from one
    /// peer to the other in the kernel's table with no moment where nobody holds them.
    PeerRemovals,
    /// Routes added or replaced.
    Routes,
    /// Sysctls written.
    Sysctls,
    /// The nftables marking replaced.
    Marking,
    /// Rules added.
    RuleAdds,
    /// The nftables marking removed.
    MarkingDeletes,
}

impl Phase {
    /// Every phase, in execution order.
    pub const ALL: [Phase; 14] = [
        Phase::RuleCopies,
        Phase::RuleDeletes,
        Phase::RouteDeletes,
        Phase::LinkDeletes,
        Phase::Links,
        Phase::Devices,
        Phase::Peers,
        Phase::AllowedIpRemovals,
        Phase::PeerRemovals,
        Phase::Routes,
        Phase::Sysctls,
        Phase::Marking,
        Phase::RuleAdds,
        Phase::MarkingDeletes,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// A typed, phased change: operations grouped by [`Phase`], in the order of
/// [`Phase::ALL`] and, within a phase, in the order they were pushed (a handshake start
/// follows the peer it kicks).
///
/// ```
/// use wgmesh_netlink::{ChangeSet, Operation, Phase};
/// let mut c = ChangeSet::new();
/// c.push(Operation::SetUp { interface: "wg0".into() });
/// c.push(Operation::DeleteLink { interface: "wg1".into() });
/// assert_eq!(c.len(), 2);
/// // Pushed second, runs first: deletes come before links are set up.
/// assert_eq!(c.iter().next().map(Operation::phase), Some(Phase::LinkDeletes));
/// assert_eq!(c.phase(Phase::Links).len(), 1);
/// let ops: Vec<Operation> = c.into_operations();
/// assert!(matches!(ops[0], Operation::DeleteLink { .. }));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    phases: [Vec<Operation>; 14],
}

impl ChangeSet {
    /// An empty change.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an operation at the end of its phase.
    pub fn push(&mut self, op: Operation) {
        self.phases[op.phase().index()].push(op);
    }

    /// The operations of one phase, in push order.
    pub fn phase(&self, phase: Phase) -> &[Operation] {
        &self.phases[phase.index()]
    }

    /// How many operations there are.
    pub fn len(&self) -> usize {
        self.phases.iter().map(Vec::len).sum()
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.phases.iter().all(Vec::is_empty)
    }

    /// The operations in execution order.
    pub fn iter(&self) -> impl Iterator<Item = &Operation> {
        self.phases.iter().flatten()
    }

    /// Room for `additional` more operations of `phase` (a diff that knows how many routes
    /// it adds reserves them, instead of doubling the phase's list as it grows).
    pub(crate) fn reserve(&mut self, phase: Phase, additional: usize) {
        self.phases[phase.index()].reserve_exact(additional);
    }

    /// The operations in execution order, as a list.
    ///
    /// The largest phase's list becomes the result (grown in place, the other phases moved
    /// into it), so a big change is never held twice: a first apply at 5,000 nodes × 110
    /// pods is 560,000 route operations, and copying them into a new list held both.
    pub fn into_operations(mut self) -> Vec<Operation> {
        let total = self.len();
        let largest = (0..self.phases.len())
            .max_by_key(|&i| self.phases[i].len())
            .unwrap_or(0);
        let mut out = std::mem::take(&mut self.phases[largest]);
        out.reserve_exact(total - out.len());
        let before: Vec<Operation> = self.phases[..largest]
            .iter_mut()
            .flat_map(std::mem::take)
            .collect();
        out.splice(0..0, before);
        for p in &mut self.phases[largest + 1..] {
            out.append(p);
        }
        out
    }
}

impl Extend<Operation> for ChangeSet {
    fn extend<T: IntoIterator<Item = Operation>>(&mut self, iter: T) {
        for op in iter {
            self.push(op);
        }
    }
}

impl FromIterator<Operation> for ChangeSet {
    fn from_iter<T: IntoIterator<Item = Operation>>(iter: T) -> Self {
        let mut c = Self::new();
        c.extend(iter);
        c
    }
}

fn list(ips: &[IpNet]) -> String {
    const SHOWN: usize = 4;
    let mut s: Vec<String> = ips.iter().take(SHOWN).map(ToString::to_string).collect();
    if ips.len() > SHOWN {
        s.push(format!("… ({} in all)", ips.len()));
    }
    s.join(",")
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateLink {
                interface,
                kind,
                mtu,
            } => write!(
                f,
                "create link {interface} type {} mtu {mtu} up",
                kind.as_str()
            ),
            Self::DeleteLink { interface } => write!(f, "delete link {interface}"),
            Self::SetMtu { interface, mtu } => write!(f, "set link {interface} mtu {mtu}"),
            Self::SetUp { interface } => write!(f, "set link {interface} up"),
            Self::ConfigureDevice {
                interface,
                set_private_key,
                listen_port,
                firewall_mark,
            } => {
                write!(f, "set device {interface}")?;
                if let Some(family) = set_private_key {
                    write!(f, " private-key ({family} key, hidden)")?;
                }
                if let Some(p) = listen_port {
                    write!(f, " listen-port {p}")?;
                }
                if let Some(m) = firewall_mark {
                    write!(f, " fwmark {m:#x}")?;
                }
                Ok(())
            }
            Self::RemovePeer {
                interface,
                public_key,
            } => write!(f, "remove peer {public_key} from {interface}"),
            Self::SetPeer(p) => {
                let PeerChange {
                    interface,
                    public_key,
                    endpoint,
                    persistent_keepalive,
                    allowed_ips,
                } = &**p;
                write!(f, "set peer {public_key} on {interface}")?;
                if let Some(e) = endpoint {
                    write!(f, " endpoint {e}")?;
                }
                if let Some(k) = persistent_keepalive {
                    write!(f, " persistent-keepalive {k}")?;
                }
                if !allowed_ips.is_empty() {
                    write!(f, " add allowed-ips {}", list(allowed_ips))?;
                }
                Ok(())
            }
            Self::StartHandshake {
                interface,
                public_key,
            } => write!(
                f,
                "start handshake with peer {public_key} on {interface} (persistent-keepalive {KICK_KEEPALIVE}, then off)"
            ),
            Self::RemoveAllowedIps(r) => write!(
                f,
                "remove allowed-ips {} from peer {} on {}",
                list(&r.allowed_ips),
                r.public_key,
                r.interface
            ),
            Self::AddRoute { route } => write!(f, "replace route {route}"),
            Self::DeleteRoute { route } => {
                write!(f, "delete route ")?;
                match route.kind {
                    crate::state::ActualRouteKind::Throw => write!(f, "throw ")?,
                    crate::state::ActualRouteKind::Blackhole => write!(f, "blackhole ")?,
                    crate::state::ActualRouteKind::Other(n) => write!(f, "type {n} ")?,
                    crate::state::ActualRouteKind::Unicast => {}
                }
                write!(f, "{}", route.destination)?;
                if let Some(d) = &route.device {
                    write!(f, " dev {d}")?;
                }
                write!(f, " table {} metric {}", route.table, route.metric)
            }
            Self::AddRule { rule } => write!(f, "add rule {rule}"),
            Self::DuplicateRule { rule } => write!(f, "add rule {rule} (a second copy)"),
            Self::DeleteRule { rule } => {
                write!(f, "delete rule {} pref {}", rule.family, rule.priority)?;
                if rule.invert {
                    write!(f, " not")?;
                }
                if let Some(m) = rule.firewall_mark {
                    write!(f, " fwmark {m:#x}")?;
                    if let Some(k) = rule.firewall_mask {
                        write!(f, "/{k:#x}")?;
                    }
                }
                write!(f, " lookup {}", rule.table)?;
                if rule.other_selectors {
                    write!(f, " (and other selectors)")?;
                }
                Ok(())
            }
            Self::SetSysctl { key, value } => write!(f, "sysctl {key}={value}"),
            Self::SetMarking { tables } => {
                write!(f, "replace nftables")?;
                for (i, t) in tables.iter().enumerate() {
                    write!(
                        f,
                        "{} table {} {} ({} chains, {} rules)",
                        if i > 0 { "," } else { "" },
                        crate::marking::family_name(t.family),
                        t.name,
                        t.chains.len(),
                        t.chains.iter().map(|c| c.rules.len()).sum::<usize>()
                    )?;
                }
                Ok(())
            }
            Self::DeleteMarking { table } => write!(f, "delete nftables tables {table}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A first apply at 5,000 nodes × 110 pods holds 560,000 route operations at once, each
    /// as large as the largest variant: the large variants are boxed so that a route
    /// operation costs what a route does plus the tag (120 bytes before, 67 MB in all).
    #[test]
    fn an_operation_is_not_much_larger_than_a_route() {
        let op = std::mem::size_of::<Operation>();
        let route = std::mem::size_of::<Route>();
        assert!(op <= 64, "Operation is {op} bytes");
        assert!(op <= route + 24, "Operation {op} bytes, Route {route}");
    }

    #[test]
    fn boxed_variants_serialize_as_before() {
        let key = wgmesh_core::PrivateKey::generate().public_key();
        let mut change = PeerChange::new("wg0", key);
        change.persistent_keepalive = Some(0);
        change.allowed_ips.push("10.0.0.2/32".parse().unwrap());
        let op = Operation::from(change);
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(json["op"], "set_peer");
        assert_eq!(json["interface"], "wg0");
        assert_eq!(json["persistent_keepalive"], 0);
        assert_eq!(json["allowed_ips"][0], "10.0.0.2/32");
        assert_eq!(serde_json::from_value::<Operation>(json).unwrap(), op);
        let rm = Operation::from(AllowedIpsRemoval::new(
            "wg0",
            key,
            vec!["10.0.0.3/32".parse().unwrap()],
        ));
        let json = serde_json::to_value(&rm).unwrap();
        assert_eq!(json["op"], "remove_allowed_ips");
        assert_eq!(serde_json::from_value::<Operation>(json).unwrap(), rm);
        assert_eq!(rm.peer(), Some(("wg0", &key)));
    }

    fn up(i: usize) -> Operation {
        Operation::SetUp {
            interface: format!("wg{i}"),
        }
    }

    fn delete(i: usize) -> Operation {
        Operation::DeleteLink {
            interface: format!("old{i}"),
        }
    }

    fn sysctl(i: usize) -> Operation {
        Operation::SetSysctl {
            key: format!("net.x{i}"),
            value: "1".into(),
        }
    }

    /// The list is the operations in execution order whichever phase is the largest (its
    /// list is reused): before, between and after the others.
    #[test]
    fn the_list_is_the_execution_order_whichever_phase_is_largest() {
        for (deletes, ups, sysctls) in [(9, 2, 3), (2, 9, 3), (2, 3, 9), (0, 5, 0), (0, 0, 0)] {
            let mut c = ChangeSet::new();
            for i in 0..sysctls {
                c.push(sysctl(i));
            }
            for i in 0..ups {
                c.push(up(i));
            }
            for i in 0..deletes {
                c.push(delete(i));
            }
            c.reserve(Phase::Links, 100);
            let want: Vec<Operation> = c.iter().cloned().collect();
            assert_eq!(want.len(), deletes + ups + sysctls);
            assert_eq!(c.into_operations(), want, "{deletes} {ups} {sysctls}");
        }
    }
}
