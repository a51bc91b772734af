//! What wgmesh owns on a host ([`Ownership`]) and what a host has ([`ActualState`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wgmesh_core::{Family, MeshConfig, PublicKey, RouteType, plan::MARKING_TABLE};

use netlink_packet_route::rule::RuleMessage;

use crate::marking::NftTable;

/// Everything wgmesh may touch on a host, derived from the mesh settings (not from a plan, so
/// an empty plan still says what to remove).
///
/// wgmesh owns the links of its interface names, every route of its table (both families),
/// every rule that points at its table, and its nftables table (family `inet`). It never
/// touches other links, tables or rules.
///
/// ```
/// use wgmesh_netlink::Ownership;
/// let own = Ownership::from_mesh(&wgmesh_core::MeshConfig::default());
/// assert_eq!(own.interfaces, ["wireguard.cali", "wg-v6.cali"]);
/// assert_eq!((own.table, own.rule_priority, own.nft_table.as_str()), (1, 99, "wgmesh"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Ownership {
    /// WireGuard interface names (IPv4's first).
    pub interfaces: Vec<String>,
    /// The mesh routing table, in both families.
    pub table: u32,
    /// The priority of wgmesh's rules.
    pub rule_priority: u32,
    /// The mark of the rules and devices.
    pub firewall_mark: u32,
    /// The name of the nftables tables (families `inet` and `arp`).
    pub nft_table: String,
}

impl Ownership {
    /// What the mesh with these settings owns. It does not depend on `enabled`: a disabled
    /// mesh still owns (and so removes) its objects.
    pub fn from_mesh(mesh: &MeshConfig) -> Self {
        Self {
            interfaces: vec![
                mesh.interface(Family::V4).to_owned(),
                mesh.interface(Family::V6).to_owned(),
            ],
            table: mesh.routing_table,
            rule_priority: mesh.rule_priority,
            firewall_mark: mesh.firewall_mark,
            nft_table: MARKING_TABLE.to_owned(),
        }
    }

    /// Whether `name` is one of wgmesh's interfaces.
    pub fn owns_interface(&self, name: &str) -> bool {
        self.interfaces.iter().any(|i| i == name)
    }
}

/// The kind of link a backend's WireGuard devices are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LinkKind {
    /// A kernel WireGuard link (`ip link add … type wireguard`).
    Wireguard,
    /// A TUN device driven by a userspace implementation (wireguard-go, boringtun).
    Tun,
}

impl LinkKind {
    /// The rtnetlink `IFLA_INFO_KIND` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wireguard => "wireguard",
            Self::Tun => "tun",
        }
    }
}

/// The alias (`IFLA_IFALIAS`, `ip link set NAME alias …`) wgmesh gives every link it creates.
/// It lives in the kernel with the link, so it survives agent restarts: a link with one of
/// wgmesh's names is wgmesh's only if it carries it (see [`ActualLink::foreign`]).
pub const LINK_MARKER: &str = "wgmesh";

/// A link with one of wgmesh's interface names, as found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActualLink {
    /// Interface index.
    pub index: u32,
    /// `IFLA_INFO_KIND` (`wireguard`, `tun`, `dummy`, …); `None` for kindless links.
    pub kind: Option<String>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// `IFLA_IFALIAS`, when set ([`LINK_MARKER`] on the links wgmesh made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// The link's addresses, except IPv6 link-local ones (the kernel gives those itself).
    /// wgmesh never puts an address on its links.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpNet>,
}

impl ActualLink {
    /// Why this link, found under one of wgmesh's names, is not wgmesh's (`None`: it is).
    ///
    /// A link is wgmesh's only if it is a WireGuard device or a TUN device (userspace
    /// WireGuard), carries [`LINK_MARKER`] as its alias, and has no address. Anything else —
    /// `eth0`, a veth, `lo`, somebody's own WireGuard link — is never deleted or changed.
    /// (One exception, decided with the device's configuration by
    /// [`check_ownership`](crate::check_ownership): an unmarked device that is blank — no
    /// private key, no peer — is one wgmesh made and could not mark, and is remade.)
    ///
    /// ```
    /// use wgmesh_netlink::{ActualLink, ForeignLink, LINK_MARKER};
    /// let mut link = ActualLink {
    ///     index: 2, kind: Some("veth".into()), mtu: 1500, up: true,
    ///     alias: None, addresses: vec!["10.0.0.1/24".parse()?],
    /// };
    /// assert!(matches!(link.foreign(), Some(ForeignLink::NotWireGuard { .. })));
    /// link.kind = Some("wireguard".into());
    /// assert!(matches!(link.foreign(), Some(ForeignLink::Unmarked { .. })));
    /// link.alias = Some(LINK_MARKER.into());
    /// assert!(matches!(link.foreign(), Some(ForeignLink::HasAddresses { .. })));
    /// link.addresses.clear();
    /// assert!(link.foreign().is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn foreign(&self) -> Option<ForeignLink> {
        if !matches!(self.kind.as_deref(), Some("wireguard" | "tun")) {
            return Some(ForeignLink::NotWireGuard {
                kind: self.kind.clone(),
            });
        }
        if self.alias.as_deref() != Some(LINK_MARKER) {
            return Some(ForeignLink::Unmarked {
                alias: self.alias.clone(),
            });
        }
        if !self.addresses.is_empty() {
            return Some(ForeignLink::HasAddresses {
                addresses: self.addresses.clone(),
            });
        }
        None
    }
}

/// Why a link with one of wgmesh's names is not wgmesh's ([`ActualLink::foreign`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ForeignLink {
    /// Neither a WireGuard nor a TUN device.
    NotWireGuard {
        /// Its `IFLA_INFO_KIND` (`None`: a kindless link such as a physical NIC or `lo`).
        kind: Option<String>,
    },
    /// A WireGuard or TUN device that wgmesh did not create: it lacks [`LINK_MARKER`].
    Unmarked {
        /// The alias it has instead.
        alias: Option<String>,
    },
    /// A device carrying wgmesh's marker that somebody gave addresses.
    HasAddresses {
        /// The addresses (IPv6 link-local ones left out).
        addresses: Vec<IpNet>,
    },
}

impl std::fmt::Display for ForeignLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotWireGuard { kind: Some(k) } => {
                write!(f, "it is a {k:?} link, not a WireGuard or TUN device")
            }
            Self::NotWireGuard { kind: None } => {
                f.write_str("it is a kindless link (a NIC or lo), not a WireGuard or TUN device")
            }
            Self::Unmarked { alias } => write!(
                f,
                "it does not carry wgmesh's marker (alias {LINK_MARKER:?}; it has {}): wgmesh did not create it",
                match alias {
                    Some(a) => format!("{:?}", crate::error::cut(a)),
                    None => "none".to_owned(),
                }
            ),
            Self::HasAddresses { addresses } => {
                write!(f, "it has addresses wgmesh did not put there (")?;
                for (i, a) in addresses.iter().take(4).enumerate() {
                    write!(f, "{}{a}", if i > 0 { ", " } else { "" })?;
                }
                if addresses.len() > 4 {
                    write!(f, ", and {} more", addresses.len() - 4)?;
                }
                f.write_str(")")
            }
        }
    }
}

/// A WireGuard device's configuration, as found. Private keys are never kept: only the public
/// key derived from the device's private key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActualDevice {
    /// The public key of the device's private key (`None` when it has none).
    pub public_key: Option<PublicKey>,
    /// Listening port (0: none or random).
    pub listen_port: u16,
    /// Firewall mark (0: none).
    pub firewall_mark: u32,
    /// Peers by public key.
    pub peers: BTreeMap<PublicKey, ActualPeer>,
}

/// A peer of a device, as found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActualPeer {
    /// Endpoint, if set.
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive in seconds (0: off).
    pub persistent_keepalive: u16,
    /// Allowed IPs.
    pub allowed_ips: BTreeSet<IpNet>,
}

/// Traffic counters of one peer, as the WireGuard implementation reports them.
///
/// Observations, not configuration: they are read on their own by
/// [`Dataplane::peer_stats`](crate::Dataplane::peer_stats) (a device dump, nothing else) and
/// never enter [`ActualState`] or the diff, so a reconcile neither pays for them nor reacts to
/// them. A peer that is removed and added again (a key change) starts from zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PeerStats {
    /// The interface.
    pub interface: String,
    /// The peer's key.
    pub public_key: PublicKey,
    /// When the latest handshake completed (`None`: never).
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

impl PeerStats {
    /// Counters of one peer.
    pub fn new(
        interface: impl Into<String>,
        public_key: PublicKey,
        last_handshake: Option<SystemTime>,
        rx_bytes: u64,
        tx_bytes: u64,
    ) -> Self {
        Self {
            interface: interface.into(),
            public_key,
            last_handshake,
            rx_bytes,
            tx_bytes,
        }
    }

    /// A peer with no handshake and no traffic yet.
    pub fn zero(interface: impl Into<String>, public_key: PublicKey) -> Self {
        Self::new(interface, public_key, None, 0, 0)
    }
}

/// The time WireGuard reports as a latest handshake (seconds and nanoseconds since the Unix
/// epoch; both 0 means never, as do out-of-range values).
pub(crate) fn handshake_time(seconds: i64, nanos: i64) -> Option<SystemTime> {
    let seconds = u64::try_from(seconds).ok()?;
    let nanos = u32::try_from(nanos).ok().filter(|n| *n < 1_000_000_000)?;
    if seconds == 0 && nanos == 0 {
        return None;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// The kind of a route found in the mesh table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ActualRouteKind {
    /// `RTN_UNICAST`.
    Unicast,
    /// `RTN_THROW`.
    Throw,
    /// `RTN_BLACKHOLE` (strict mode).
    Blackhole,
    /// Anything else (prohibit, unreachable, …), by its `RTN_*` number.
    Other(u8),
}

impl From<RouteType> for ActualRouteKind {
    fn from(t: RouteType) -> Self {
        match t {
            RouteType::Unicast => Self::Unicast,
            RouteType::Throw => Self::Throw,
            RouteType::Blackhole => Self::Blackhole,
        }
    }
}

/// A route of the mesh table, as found (enough to delete exactly it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ActualRoute {
    /// Family.
    pub family: Family,
    /// The table (always the mesh table when read).
    pub table: u32,
    /// Destination prefix.
    pub destination: IpNet,
    /// Route type.
    pub kind: ActualRouteKind,
    /// Output device name, when it has one and the device is known (shared by the routes
    /// of one device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Arc<str>>,
    /// Output interface index, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oif: Option<u32>,
    /// Gateway, when it has one (wgmesh's routes never do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Metric (`RTA_PRIORITY`).
    pub metric: u32,
    /// Type of service.
    pub tos: u8,
}

/// A policy rule that points at the mesh table, as found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActualRule {
    /// Family.
    pub family: Family,
    /// Priority.
    pub priority: u32,
    /// Table.
    pub table: u32,
    /// Mark compared (`None` when the rule has no fwmark match).
    pub firewall_mark: Option<u32>,
    /// Mask (`None` when not given).
    pub firewall_mask: Option<u32>,
    /// `not` (`FIB_RULE_INVERT`).
    pub invert: bool,
    /// The rule's action number (`FR_ACT_TO_TBL` = 1 for a proper lookup rule).
    pub action: u8,
    /// Whether the rule matches on anything else (source, destination, interfaces, …):
    /// wgmesh's rules never do.
    pub other_selectors: bool,
    /// The rule exactly as the kernel dumped it, which deleting it sends back (see
    /// [`RawRule`]). Not serialized.
    #[serde(skip)]
    pub raw: RawRule,
}

impl ActualRule {
    /// A plain lookup rule (`from all lookup TABLE`) at a priority, without marks: a start
    /// for building the rules another program has.
    ///
    /// ```
    /// use wgmesh_netlink::state::ActualRule;
    /// let r = ActualRule::lookup(wgmesh_core::Family::V4, 5210, 52);
    /// assert_eq!((r.priority, r.table, r.firewall_mark), (5210, 52, None));
    /// ```
    pub fn lookup(family: Family, priority: u32, table: u32) -> Self {
        Self {
            family,
            priority,
            table,
            firewall_mark: None,
            firewall_mask: None,
            invert: false,
            action: 1,
            other_selectors: false,
            raw: RawRule::default(),
        }
    }

    /// Whether the modelled fields (everything but [`ActualRule::raw`]) are equal: the same
    /// rule read twice, or read and planned.
    pub fn same_fields(&self, other: &ActualRule) -> bool {
        (
            self.family,
            self.priority,
            self.table,
            self.firewall_mark,
            self.firewall_mask,
            self.invert,
            self.action,
            self.other_selectors,
        ) == (
            other.family,
            other.priority,
            other.table,
            other.firewall_mark,
            other.firewall_mask,
            other.invert,
            other.action,
            other.other_selectors,
        )
    }
}

/// A policy rule's `RTM_NEWRULE` message as dumped: its `fib_rule_hdr` and every attribute,
/// parsed by `netlink-packet-route`.
///
/// The kernel deletes the first rule, in list order, that matches every selector a delete
/// request carries, and treats the selectors a request leaves out as wildcards. A request
/// built from [`ActualRule`]'s fields alone would name a hand-made `from 10.0.0.0/8 lookup 1
/// pref 99` only by priority and table, and could delete wgmesh's own rule of the same
/// priority instead. Sending the dump back (as `ip rule flush` does) names every selector the
/// rule has. It is how the rule was read: it is not serialized, and it is empty for a rule
/// that was not read from a kernel. Two raw rules are equal when their messages are.
///
/// ```
/// use wgmesh_netlink::RawRule;
/// assert!(RawRule::default().is_empty());
/// assert_eq!(RawRule::default(), RawRule::default());
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RawRule(Option<Box<RuleMessage>>);

impl RawRule {
    pub(crate) fn new(message: RuleMessage) -> Self {
        Self(Some(Box::new(message)))
    }

    pub(crate) fn message(&self) -> Option<&RuleMessage> {
        self.0.as_deref()
    }

    /// Whether there is no dump (the rule was not read from a kernel).
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl std::fmt::Debug for RawRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(m) => write!(f, "RawRule({} attributes)", m.attributes.len()),
            None => f.write_str("RawRule(none)"),
        }
    }
}

/// What a host has of the objects wgmesh owns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ActualState {
    /// Links with owned names, by name.
    pub links: BTreeMap<String, ActualLink>,
    /// WireGuard configuration of owned links that are WireGuard devices, by name.
    pub devices: BTreeMap<String, ActualDevice>,
    /// Every route of the mesh table, both families.
    pub routes: Vec<ActualRoute>,
    /// Every rule that points at the mesh table, both families.
    pub rules: Vec<ActualRule>,
    /// Every other rule, both families: other programs' (read to detect collisions with
    /// wgmesh's mark, table and priority, [`crate::neighbours`]; never changed).
    #[serde(default)]
    pub foreign_rules: Vec<ActualRule>,
    /// Current values of the sysctls asked about (the plan's).
    pub sysctls: BTreeMap<String, String>,
    /// wgmesh's nftables tables that exist (`inet`, `arp`), in family order.
    pub marking: Vec<NftTable>,
    /// Whether the WireGuard implementation can remove single allowed IPs
    /// (`WGALLOWEDIP_F_REMOVE_ME`, Linux 6.12+ / wireguard-go); informational.
    #[serde(default)]
    pub remove_allowed_ip_supported: Option<bool>,
    /// WireGuard devices that changed during every dump of them (Linux marks such a dump
    /// `NLM_F_DUMP_INTR` and may end it early): their peers as read may lack some.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interrupted: Vec<String>,
}
