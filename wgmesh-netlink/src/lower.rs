//! Lowering: one [`Operation`] to the typed messages that carry it out. A pure function of
//! the operation, the dataplane's [`Capabilities`] (probed once, by the executor), the key
//! material ([`Keys`]) and the interface indexes the executor has resolved; its match over
//! operations is exhaustive, so a new operation cannot compile into silence.

use std::collections::HashMap;

use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::keys::KeyRing;
use crate::op::{KICK_KEEPALIVE, Operation};
use crate::uapi;
use crate::wire::genl::{self, DeviceUpdate, PeerUpdate, WgSet};
use crate::wire::nft::{self, NftRequest};
use crate::wire::route::{self, RtRequest};
use crate::wire::{NLM_F_ACK, NLM_F_REQUEST};
use wgmesh_core::{PublicKey, RouteType};

/// Which WireGuard the dataplane drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireGuard {
    /// The kernel's, over generic netlink, with the family id the controller gave.
    Kernel {
        /// The generic netlink family id of `wireguard`.
        family_id: u16,
        /// Whether the kernel removes single allowed IPs (`WGALLOWEDIP_F_REMOVE_ME`,
        /// Linux 6.12+).
        remove_allowed_ip: bool,
    },
    /// A userspace implementation, over its configuration socket.
    Userspace,
}

/// What the dataplane can do, as far as lowering cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// The WireGuard implementation.
    pub(crate) wireguard: WireGuard,
    /// The largest WireGuard netlink message.
    pub(crate) max_message: usize,
}

/// The key material lowering may put in messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keys<'a> {
    /// The node's private keys.
    pub(crate) ring: &'a KeyRing,
    /// A key no real peer has, for the throwaway peer that carries allowed IPs away when the
    /// WireGuard implementation cannot remove one.
    pub(crate) throwaway: PublicKey,
}

/// One request, typed, before sequence numbers. Its `Debug` never shows a key.
pub(crate) enum Request {
    /// An rtnetlink message.
    Route(RtRequest),
    /// A `WG_CMD_SET_DEVICE` message (acknowledged).
    Wireguard {
        /// The family id to send it to.
        family_id: u16,
        /// The message; its private key is wiped on drop.
        message: WgSet,
    },
    /// One nf_tables transaction (batch delimiters included).
    Nft(Vec<NftRequest>),
    /// One `set=1` request to a userspace daemon.
    Uapi {
        /// The interface.
        interface: String,
        /// The request text (may hold a private key).
        text: Zeroizing<String>,
    },
    /// Start the userspace daemon of an interface and wait for its socket.
    StartDaemon {
        /// The interface.
        interface: String,
    },
    /// Write a sysctl.
    Sysctl {
        /// Dotted key (checked).
        key: String,
        /// Value.
        value: String,
    },
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Route(r) => f.debug_tuple("Route").field(r).finish(),
            Self::Wireguard { family_id, message } => f
                .debug_struct("Wireguard")
                .field("family_id", family_id)
                .field("message", message)
                .finish(),
            Self::Nft(b) => f.debug_tuple("Nft").field(b).finish(),
            Self::Uapi { interface, text } => f
                .debug_struct("Uapi")
                .field("interface", interface)
                .field("bytes", &text.len())
                .finish(),
            Self::StartDaemon { interface } => f
                .debug_struct("StartDaemon")
                .field("interface", interface)
                .finish(),
            Self::Sysctl { key, value } => f
                .debug_struct("Sysctl")
                .field("key", key)
                .field("value", value)
                .finish(),
        }
    }
}

/// The flags of a WireGuard set request.
pub(crate) const WG_SET_FLAGS: u16 = NLM_F_REQUEST | NLM_F_ACK;

/// Whether `key` is a dotted path of `[A-Za-z0-9_-]` components (no `..`, no empty part).
pub(crate) fn check_sysctl_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.split('.').any(|c| {
            c.is_empty()
                || !c
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        });
    if bad {
        return Err(Error::InvalidSysctlKey {
            key: key.to_owned(),
        });
    }
    Ok(())
}

/// Whether lowering `op` needs the interface index of a link (a unicast route's device).
pub(crate) fn needs_index(op: &Operation) -> Option<&str> {
    match op {
        Operation::AddRoute { route } => match route.kind {
            RouteType::Unicast => route.device.as_deref(),
            RouteType::Throw | RouteType::Blackhole => None,
        },
        Operation::CreateLink { .. }
        | Operation::DeleteLink { .. }
        | Operation::SetMtu { .. }
        | Operation::SetUp { .. }
        | Operation::ConfigureDevice { .. }
        | Operation::RemovePeer { .. }
        | Operation::SetPeer { .. }
        | Operation::StartHandshake { .. }
        | Operation::RemoveAllowedIps { .. }
        | Operation::DeleteRoute { .. }
        | Operation::AddRule { .. }
        | Operation::DuplicateRule { .. }
        | Operation::DeleteRule { .. }
        | Operation::SetSysctl { .. }
        | Operation::SetMarking { .. }
        | Operation::DeleteMarking { .. } => None,
    }
}

fn peer_update(interface: &str, peer: PeerUpdate) -> DeviceUpdate {
    DeviceUpdate::peer(interface, peer)
}

/// Two updates of the peer: the keepalive goes 0 → on (the kernel and wireguard-go send a
/// keepalive, hence a handshake initiation, when it is switched on while the device is up),
/// then back off. Over UAPI they are two peer sections of one request; wireguard-go acts on
/// each section's end.
fn kick(interface: &str, public_key: PublicKey) -> Vec<DeviceUpdate> {
    [KICK_KEEPALIVE, 0]
        .into_iter()
        .map(|k| {
            let mut p = PeerUpdate::new(public_key);
            p.persistent_keepalive = Some(k);
            peer_update(interface, p)
        })
        .collect()
}

fn remove_allowed_ips(
    interface: &str,
    public_key: PublicKey,
    allowed_ips: &[ipnet::IpNet],
    caps: &Capabilities,
    keys: &Keys<'_>,
) -> Vec<DeviceUpdate> {
    match caps.wireguard {
        WireGuard::Kernel {
            remove_allowed_ip: true,
            ..
        } => {
            let mut p = PeerUpdate::new(public_key);
            p.update_only = true;
            p.allowed_ips = allowed_ips.iter().map(|i| (*i, true)).collect();
            vec![peer_update(interface, p)]
        }
        // Adding an allowed IP to another peer moves it; then drop that peer. The IPs that
        // stay never leave their peer.
        WireGuard::Kernel { .. } | WireGuard::Userspace => {
            let mut p = PeerUpdate::new(keys.throwaway);
            p.allowed_ips = allowed_ips.iter().map(|i| (*i, false)).collect();
            let mut rm = PeerUpdate::new(keys.throwaway);
            rm.remove = true;
            vec![peer_update(interface, p), peer_update(interface, rm)]
        }
    }
}

/// The device updates carried out on the backend: split netlink messages for the kernel,
/// one `set=1` request for a userspace daemon.
fn wireguard(
    interface: &str,
    updates: &[DeviceUpdate],
    caps: &Capabilities,
) -> Result<Vec<Request>> {
    match caps.wireguard {
        WireGuard::Kernel { family_id, .. } => {
            let mut out = Vec::new();
            for d in updates {
                out.extend(
                    genl::set_messages(d, caps.max_message)?
                        .into_iter()
                        .map(|message| Request::Wireguard { family_id, message }),
                );
            }
            Ok(out)
        }
        WireGuard::Userspace => Ok(vec![Request::Uapi {
            interface: interface.to_owned(),
            text: uapi::set_request(updates),
        }]),
    }
}

/// The requests that carry out `op`. `links` holds the indexes of the links that unicast
/// routes leave through (see [`needs_index`]).
pub(crate) fn lower(
    op: &Operation,
    caps: &Capabilities,
    keys: &Keys<'_>,
    links: &HashMap<String, u32>,
) -> Result<Vec<Request>> {
    Ok(match op {
        Operation::CreateLink {
            interface,
            kind,
            mtu,
        } => match caps.wireguard {
            // Made, then marked as wgmesh's (see `LINK_MARKER`).
            WireGuard::Kernel { .. } => vec![
                Request::Route(route::link_create(interface, *kind, *mtu)),
                Request::Route(route::link_mark(interface)),
            ],
            // The daemon makes the TUN device; then it gets its MTU, goes up and is marked.
            WireGuard::Userspace => vec![
                Request::StartDaemon {
                    interface: interface.clone(),
                },
                Request::Route(route::link_set(interface, Some(*mtu), true)),
                Request::Route(route::link_mark(interface)),
            ],
        },
        Operation::DeleteLink { interface } => {
            vec![Request::Route(route::link_delete(interface))]
        }
        Operation::SetMtu { interface, mtu } => {
            vec![Request::Route(route::link_set(
                interface,
                Some(*mtu),
                false,
            ))]
        }
        Operation::SetUp { interface } => {
            vec![Request::Route(route::link_set(interface, None, true))]
        }
        Operation::AddRoute { route } => {
            let oif = match needs_index(op) {
                Some(dev) => Some(*links.get(dev).ok_or_else(|| Error::UnknownInterface {
                    interface: dev.to_owned(),
                })?),
                None => None,
            };
            vec![Request::Route(route::route_replace(route, oif))]
        }
        Operation::DeleteRoute { route } => vec![Request::Route(route::route_delete(route))],
        Operation::AddRule { rule } => vec![Request::Route(route::rule_add(rule, true))],
        Operation::DuplicateRule { rule } => vec![Request::Route(route::rule_add(rule, false))],
        Operation::DeleteRule { rule } => vec![Request::Route(route::rule_delete(rule))],
        Operation::SetSysctl { key, value } => {
            check_sysctl_key(key)?;
            vec![Request::Sysctl {
                key: key.clone(),
                value: value.clone(),
            }]
        }
        Operation::SetMarking { tables } => {
            let name = tables.first().map(|t| t.name.as_str()).unwrap_or_default();
            vec![Request::Nft(nft::replace_batch(name, tables))]
        }
        Operation::DeleteMarking { table } => vec![Request::Nft(nft::replace_batch(table, &[]))],
        Operation::ConfigureDevice {
            interface,
            set_private_key,
            listen_port,
            firewall_mark,
        } => {
            let mut d = DeviceUpdate::new(interface);
            if let Some(family) = set_private_key {
                let k = keys
                    .ring
                    .private_key(*family)
                    .ok_or(Error::MissingKey { family: *family })?;
                d.private_key = Some(Zeroizing::new(*k.as_bytes()));
            }
            d.listen_port = *listen_port;
            d.firewall_mark = *firewall_mark;
            wireguard(interface, &[d], caps)?
        }
        Operation::RemovePeer {
            interface,
            public_key,
        } => {
            let mut p = PeerUpdate::new(*public_key);
            p.remove = true;
            wireguard(interface, &[peer_update(interface, p)], caps)?
        }
        Operation::SetPeer(change) => {
            let mut p = PeerUpdate::new(change.public_key);
            p.endpoint = change.endpoint;
            p.persistent_keepalive = change.persistent_keepalive;
            p.allowed_ips = change.allowed_ips.iter().map(|i| (*i, false)).collect();
            let interface = &change.interface;
            wireguard(interface, &[peer_update(interface, p)], caps)?
        }
        Operation::StartHandshake {
            interface,
            public_key,
        } => wireguard(interface, &kick(interface, *public_key), caps)?,
        Operation::RemoveAllowedIps(r) => wireguard(
            &r.interface,
            &remove_allowed_ips(&r.interface, r.public_key, &r.allowed_ips, caps, keys),
            caps,
        )?,
    })
}

/// How many requests [`chunks`] lowers at a time by default: with a route's typed and
/// encoded message about 0.5 KB together, a chunk holds about 0.5 MB however big the change.
pub(crate) const DEFAULT_CHUNK: usize = 1024;

/// The requests of consecutive operations of `ops`, each tagged with the index (in `ops`) of
/// the operation it carries out, in pieces of at most `max_requests` requests (at least one
/// operation a piece: an operation's requests are never split). Lowering is lazy: the
/// executor sends a piece and drops it before the next is made, so a change of 560,000
/// routes never exists as 560,000 messages at once. Pure, like [`lower`]: the pieces joined
/// are `ops` lowered one by one.
///
/// An operation that cannot be lowered ends the pieces: the requests of the operations
/// before it come first, as a piece of their own, then its index and error.
pub(crate) fn chunks<'a>(
    ops: &'a [Operation],
    caps: &'a Capabilities,
    keys: &'a Keys<'a>,
    links: &'a HashMap<String, u32>,
    max_requests: usize,
) -> Chunks<'a> {
    Chunks {
        ops,
        caps,
        keys,
        links,
        max_requests: max_requests.max(1),
        next: 0,
        failed: None,
    }
}

/// The iterator of [`chunks`].
pub(crate) struct Chunks<'a> {
    ops: &'a [Operation],
    caps: &'a Capabilities,
    keys: &'a Keys<'a>,
    links: &'a HashMap<String, u32>,
    max_requests: usize,
    /// The next operation to lower.
    next: usize,
    /// A lowering error held back until the piece before it has been taken.
    failed: Option<(usize, Error)>,
}

impl Iterator for Chunks<'_> {
    type Item = std::result::Result<Vec<(usize, Request)>, (usize, Error)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(failed) = self.failed.take() {
            return Some(Err(failed));
        }
        let mut piece: Vec<(usize, Request)> = Vec::new();
        while self.next < self.ops.len() && piece.len() < self.max_requests {
            let i = self.next;
            self.next += 1;
            match lower(&self.ops[i], self.caps, self.keys, self.links) {
                Ok(reqs) => piece.extend(reqs.into_iter().map(|r| (i, r))),
                Err(e) => {
                    self.next = self.ops.len();
                    if piece.is_empty() {
                        return Some(Err((i, e)));
                    }
                    self.failed = Some((i, e));
                    break;
                }
            }
        }
        (!piece.is_empty()).then_some(Ok(piece))
    }
}

/// The two device updates that probe whether the kernel removes single allowed IPs: a
/// throwaway peer added with one allowed IP flagged for removal, then the peer removed.
/// Kernels without the flag refuse the unknown attribute (`EINVAL`) after creating the peer;
/// kernels with it leave the peer without allowed IPs.
pub(crate) fn remove_flag_probe(interface: &str, throwaway: PublicKey) -> [DeviceUpdate; 2] {
    let mut p = PeerUpdate::new(throwaway);
    // 0.0.0.0/32 is no pod's or node's address, so no real peer holds it.
    p.allowed_ips = vec![(
        ipnet::IpNet::V4(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::UNSPECIFIED, 32).unwrap_or_default(),
        ),
        true,
    )];
    let mut rm = PeerUpdate::new(throwaway);
    rm.remove = true;
    [
        DeviceUpdate::peer(interface, p),
        DeviceUpdate::peer(interface, rm),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marking::{FAMILIES, NftTable};
    use crate::op::{AllowedIpsRemoval, PeerChange};
    use crate::state::{ActualRoute, ActualRouteKind, ActualRule, RawRule};
    use wgmesh_core::{Family, PrivateKey, Route, Rule};

    const FAMILY_ID: u16 = 21;

    fn kernel(remove_allowed_ip: bool) -> Capabilities {
        Capabilities {
            wireguard: WireGuard::Kernel {
                family_id: FAMILY_ID,
                remove_allowed_ip,
            },
            max_message: crate::wire::genl::DEFAULT_MAX_MESSAGE,
        }
    }

    fn userspace() -> Capabilities {
        Capabilities {
            wireguard: WireGuard::Userspace,
            max_message: crate::wire::genl::DEFAULT_MAX_MESSAGE,
        }
    }

    fn pk(i: u8) -> PublicKey {
        PrivateKey::from_bytes([i; 32]).unwrap().public_key()
    }

    fn rule() -> Rule {
        Rule {
            family: Family::V4,
            priority: 99,
            table: 1,
            firewall_mark: 0x100000,
            firewall_mask: 0x100000,
            invert: true,
        }
    }

    /// One operation of every kind, and the position of its kind in this list: the match is
    /// exhaustive, so a new operation does not compile until it is lowered and listed here.
    fn every_operation() -> Vec<Operation> {
        let wg = || "wg0".to_owned();
        let ops = vec![
            Operation::CreateLink {
                interface: wg(),
                kind: crate::state::LinkKind::Wireguard,
                mtu: 1420,
            },
            Operation::DeleteLink { interface: wg() },
            Operation::SetMtu {
                interface: wg(),
                mtu: 1400,
            },
            Operation::SetUp { interface: wg() },
            Operation::ConfigureDevice {
                interface: wg(),
                set_private_key: Some(Family::V4),
                listen_port: Some(51820),
                firewall_mark: None,
            },
            Operation::RemovePeer {
                interface: wg(),
                public_key: pk(2),
            },
            Operation::from(PeerChange {
                interface: wg(),
                public_key: pk(2),
                endpoint: Some("10.0.0.2:51820".parse().unwrap()),
                persistent_keepalive: Some(0),
                allowed_ips: vec!["10.65.0.64/26".parse().unwrap()],
            }),
            Operation::StartHandshake {
                interface: wg(),
                public_key: pk(2),
            },
            Operation::from(AllowedIpsRemoval {
                interface: wg(),
                public_key: pk(2),
                allowed_ips: vec!["10.65.0.5/32".parse().unwrap()],
            }),
            Operation::AddRoute {
                route: Route {
                    family: Family::V4,
                    table: 1,
                    destination: "10.65.0.64/26".parse().unwrap(),
                    kind: RouteType::Unicast,
                    device: Some(wg().into()),
                },
            },
            Operation::DeleteRoute {
                route: Box::new(ActualRoute {
                    family: Family::V4,
                    table: 1,
                    destination: "10.65.0.64/26".parse().unwrap(),
                    kind: ActualRouteKind::Throw,
                    device: None,
                    oif: None,
                    gateway: None,
                    metric: 0,
                    tos: 0,
                }),
            },
            Operation::AddRule { rule: rule() },
            Operation::DuplicateRule { rule: rule() },
            Operation::DeleteRule {
                rule: ActualRule {
                    raw: RawRule::default(),
                    ..crate::diff::actual_rule(&rule())
                },
            },
            Operation::SetSysctl {
                key: "net.ipv4.conf.all.src_valid_mark".into(),
                value: "1".into(),
            },
            Operation::SetMarking {
                tables: vec![NftTable {
                    family: FAMILIES[0],
                    name: "wgmesh".into(),
                    flags: 0,
                    chains: Vec::new(),
                    sets: Vec::new(),
                }],
            },
            Operation::DeleteMarking {
                table: "wgmesh".into(),
            },
        ];
        let kind = |op: &Operation| match op {
            Operation::CreateLink { .. } => 0,
            Operation::DeleteLink { .. } => 1,
            Operation::SetMtu { .. } => 2,
            Operation::SetUp { .. } => 3,
            Operation::ConfigureDevice { .. } => 4,
            Operation::RemovePeer { .. } => 5,
            Operation::SetPeer { .. } => 6,
            Operation::StartHandshake { .. } => 7,
            Operation::RemoveAllowedIps { .. } => 8,
            Operation::AddRoute { .. } => 9,
            Operation::DeleteRoute { .. } => 10,
            Operation::AddRule { .. } => 11,
            Operation::DuplicateRule { .. } => 12,
            Operation::DeleteRule { .. } => 13,
            Operation::SetSysctl { .. } => 14,
            Operation::SetMarking { .. } => 15,
            Operation::DeleteMarking { .. } => 16,
        };
        assert!(ops.iter().map(kind).eq(0..17), "one of each kind, in order");
        ops
    }

    fn shape(r: &Request) -> String {
        match r {
            Request::Route((flags, m)) => format!("rt {:?} {flags:#x}", std::mem::discriminant(m)),
            Request::Wireguard { family_id, .. } => format!("wg {family_id}"),
            Request::Nft(batch) => format!("nft batch of {}", batch.len()),
            Request::Uapi { interface, .. } => format!("uapi {interface}"),
            Request::StartDaemon { interface } => format!("start {interface}"),
            Request::Sysctl { key, value } => format!("sysctl {key}={value}"),
        }
    }

    /// Every operation lowers, on both backends, to requests of the right transport, and
    /// none to nothing.
    #[test]
    fn every_operation_lowers_on_both_backends() {
        let ring = KeyRing::single(PrivateKey::from_bytes([1; 32]).unwrap());
        let keys = Keys {
            ring: &ring,
            throwaway: pk(9),
        };
        let links = HashMap::from([("wg0".to_owned(), 7)]);
        for caps in [kernel(false), kernel(true), userspace()] {
            for op in every_operation() {
                let reqs = lower(&op, &caps, &keys, &links).unwrap();
                assert!(!reqs.is_empty(), "{op} lowered to nothing");
                let wg_op = op.phase() == crate::op::Phase::Devices
                    || matches!(
                        op,
                        Operation::RemovePeer { .. }
                            | Operation::SetPeer { .. }
                            | Operation::StartHandshake { .. }
                            | Operation::RemoveAllowedIps { .. }
                    );
                for r in &reqs {
                    let s = shape(r);
                    match (wg_op, caps.wireguard) {
                        (true, WireGuard::Kernel { .. }) => assert_eq!(s, "wg 21", "{op}"),
                        (true, WireGuard::Userspace) => assert_eq!(s, "uapi wg0", "{op}"),
                        (false, _) => {
                            assert!(!s.starts_with("wg") && !s.starts_with("uapi"), "{op}: {s}")
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_handshake_start_is_two_updates_and_a_removal_depends_on_the_kernel() {
        let ring = KeyRing::none();
        let keys = Keys {
            ring: &ring,
            throwaway: pk(9),
        };
        let none = HashMap::new();
        let ops = every_operation();
        let count = |op: &Operation, caps| lower(op, &caps, &keys, &none).unwrap().len();
        assert_eq!(count(&ops[7], kernel(false)), 2, "keepalive on, then off");
        assert_eq!(
            count(&ops[7], userspace()),
            1,
            "two sections of one request"
        );
        // 6.12: one update with the per-IP flag; 6.1 and userspace: through the throwaway.
        assert_eq!(count(&ops[8], kernel(true)), 1);
        assert_eq!(count(&ops[8], kernel(false)), 2);
        let Request::Uapi { text, .. } = &lower(&ops[8], &userspace(), &keys, &none).unwrap()[0]
        else {
            panic!("not a UAPI request")
        };
        let t = pk(9).to_hex();
        assert!(
            text.contains(&format!(
                "public_key={t}\nallowed_ip=10.65.0.5/32\npublic_key={t}\nremove=true\n"
            )),
            "{}",
            text.as_str()
        );
        // The userspace daemon makes its own TUN device; the link is then set up.
        let shapes: Vec<String> = lower(&ops[0], &userspace(), &keys, &none)
            .unwrap()
            .iter()
            .map(shape)
            .collect();
        assert_eq!(shapes[0], "start wg0");
        assert!(shapes[1].starts_with("rt"));
    }

    #[test]
    fn what_lowering_cannot_do_is_a_typed_error() {
        let ring = KeyRing::none();
        let keys = Keys {
            ring: &ring,
            throwaway: pk(9),
        };
        let ops = every_operation();
        let none = HashMap::new();
        assert!(matches!(
            lower(&ops[4], &kernel(false), &keys, &none),
            Err(Error::MissingKey { family: Family::V4 })
        ));
        assert!(matches!(
            lower(&ops[9], &kernel(false), &keys, &none),
            Err(Error::UnknownInterface { interface }) if interface == "wg0"
        ));
        for key in ["", "net..x", "net/ipv4", "../../etc/passwd", "a.b c"] {
            let op = Operation::SetSysctl {
                key: key.into(),
                value: "1".into(),
            };
            assert!(
                matches!(
                    lower(&op, &kernel(false), &keys, &none),
                    Err(Error::InvalidSysctlKey { .. })
                ),
                "{key:?}"
            );
        }
        let mut small = kernel(false);
        small.max_message = 60;
        assert!(matches!(
            lower(&ops[6], &small, &keys, &none),
            Err(Error::MessageTooSmall { max_message: 60 })
        ));
    }

    #[test]
    fn requests_never_show_the_private_key() {
        let k = PrivateKey::from_bytes([1; 32]).unwrap();
        let ring = KeyRing::single(k.clone());
        let keys = Keys {
            ring: &ring,
            throwaway: pk(9),
        };
        let op = &every_operation()[4];
        for caps in [kernel(false), userspace()] {
            let reqs = lower(op, &caps, &keys, &HashMap::new()).unwrap();
            let shown = format!("{reqs:?}");
            assert!(!shown.contains(k.to_hex().as_str()), "{shown}");
            assert!(!shown.contains("1, 1, 1, 1"), "{shown}");
        }
    }

    /// Lowered in pieces, the operations give the requests they give one by one, in order
    /// and tagged with their operation; no piece is over the bound unless one operation
    /// alone is; an operation's requests are never split.
    #[test]
    fn pieces_joined_are_the_operations_lowered_one_by_one() {
        let ring = KeyRing::single(PrivateKey::from_bytes([1; 32]).unwrap());
        let keys = Keys {
            ring: &ring,
            throwaway: pk(9),
        };
        let links = HashMap::from([("wg0".to_owned(), 7)]);
        let mut ops = every_operation();
        ops.extend(every_operation());
        for caps in [kernel(false), kernel(true), userspace()] {
            let whole: Vec<(usize, String)> = ops
                .iter()
                .enumerate()
                .flat_map(|(i, op)| {
                    lower(op, &caps, &keys, &links)
                        .unwrap()
                        .into_iter()
                        .map(move |r| (i, format!("{r:?}")))
                })
                .collect();
            for max in [1, 2, 3, 5, 1000] {
                let pieces: Vec<Vec<(usize, Request)>> = chunks(&ops, &caps, &keys, &links, max)
                    .collect::<std::result::Result<_, _>>()
                    .unwrap();
                let joined: Vec<(usize, String)> = pieces
                    .iter()
                    .flatten()
                    .map(|(i, r)| (*i, format!("{r:?}")))
                    .collect();
                assert_eq!(joined, whole, "max {max}");
                for (n, p) in pieces.iter().enumerate() {
                    let first = p[0].0;
                    // Over the bound only by the requests of its last operation.
                    let before_last = p.iter().filter(|(i, _)| *i != p[p.len() - 1].0).count();
                    assert!(before_last < max, "max {max}: piece {n} has {}", p.len());
                    if n > 0 {
                        assert_ne!(pieces[n - 1].last().unwrap().0, first, "split operation");
                    }
                }
                if max == 1000 {
                    assert_eq!(pieces.len(), 1);
                }
            }
        }
    }

    /// An operation that cannot be lowered: the operations before it come as a piece, then
    /// its index and error, then nothing.
    #[test]
    fn a_lowering_error_ends_the_pieces_after_those_before_it() {
        let ring = KeyRing::none();
        let keys = Keys {
            ring: &ring,
            throwaway: pk(9),
        };
        let links = HashMap::from([("wg0".to_owned(), 7)]);
        let bad = Operation::SetSysctl {
            key: "../x".into(),
            value: "1".into(),
        };
        let ok = every_operation()[3].clone(); // set link wg0 up
        let ops = vec![ok.clone(), ok.clone(), ok.clone(), bad, ok];
        let caps = kernel(false);
        let got: Vec<_> = chunks(&ops, &caps, &keys, &links, 2).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].as_ref().unwrap().len(), 2);
        assert_eq!(got[1].as_ref().unwrap().len(), 1);
        assert!(
            matches!(&got[2], Err((3, Error::InvalidSysctlKey { .. }))),
            "{got:?}"
        );
        let got: Vec<_> = chunks(&ops[3..], &caps, &keys, &links, 2).collect();
        assert!(
            matches!(&got[..], [Err((0, Error::InvalidSysctlKey { .. }))]),
            "{got:?}"
        );
    }

    #[test]
    fn lowering_is_a_function_of_its_inputs() {
        let ring = KeyRing::single(PrivateKey::from_bytes([1; 32]).unwrap());
        let keys = Keys {
            ring: &ring,
            throwaway: pk(9),
        };
        let links = HashMap::from([("wg0".to_owned(), 7)]);
        for op in every_operation() {
            let a: Vec<String> = lower(&op, &kernel(false), &keys, &links)
                .unwrap()
                .iter()
                .map(|r| format!("{r:?}"))
                .collect();
            let b: Vec<String> = lower(&op, &kernel(false), &keys, &links)
                .unwrap()
                .iter()
                .map(|r| format!("{r:?}"))
                .collect();
            assert_eq!(a, b, "{op}");
        }
    }
}
