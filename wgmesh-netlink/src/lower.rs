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

/// One request, typed, before sequence numbers.
#[derive(Debug)]
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
        Operation::AddRoute { route } if route.kind == RouteType::Unicast => {
            route.device.as_deref()
        }
        _ => None,
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
            WireGuard::Kernel { .. } => {
                vec![Request::Route(route::link_create(interface, *kind, *mtu))]
            }
            // The daemon makes the TUN device; then it gets its MTU and goes up.
            WireGuard::Userspace => vec![
                Request::StartDaemon {
                    interface: interface.clone(),
                },
                Request::Route(route::link_set(interface, Some(*mtu), true)),
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
        Operation::SetPeer {
            interface,
            public_key,
            endpoint,
            persistent_keepalive,
            allowed_ips,
        } => {
            let mut p = PeerUpdate::new(*public_key);
            p.endpoint = *endpoint;
            p.persistent_keepalive = *persistent_keepalive;
            p.allowed_ips = allowed_ips.iter().map(|i| (*i, false)).collect();
            wireguard(interface, &[peer_update(interface, p)], caps)?
        }
        Operation::StartHandshake {
            interface,
            public_key,
        } => wireguard(interface, &kick(interface, *public_key), caps)?,
        Operation::RemoveAllowedIps {
            interface,
            public_key,
            allowed_ips,
        } => wireguard(
            interface,
            &remove_allowed_ips(interface, *public_key, allowed_ips, caps, keys),
            caps,
        )?,
    })
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
