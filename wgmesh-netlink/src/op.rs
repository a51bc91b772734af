//! Operations: the smallest changes the executor knows how to make. [`crate::diff()`]
//! produces them; a [`Dataplane`](crate::Dataplane) executes them. They serialize to JSON
//! for reports and never carry a private key (only whether to set it).

use std::fmt;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wgmesh_core::{Family, PublicKey, Route, Rule};

use crate::nft::NftTable;
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
    /// device moves to this one). Nothing is cleared first.
    SetPeer {
        /// Interface name.
        interface: String,
        /// The peer's key.
        public_key: PublicKey,
        /// Endpoint to set, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<SocketAddr>,
        /// Keepalive to set (0 turns it off), if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        persistent_keepalive: Option<u16>,
        /// Allowed IPs to add.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allowed_ips: Vec<IpNet>,
    },
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
    RemoveAllowedIps {
        /// Interface name.
        interface: String,
        /// The peer's key.
        public_key: PublicKey,
        /// Allowed IPs to remove.
        allowed_ips: Vec<IpNet>,
    },
    /// Add or replace a route of the mesh table.
    AddRoute {
        /// The route.
        route: Route,
    },
    /// Delete a route of the mesh table, exactly as found.
    DeleteRoute {
        /// The route.
        route: ActualRoute,
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
            | Self::SetPeer { interface, .. }
            | Self::StartHandshake { interface, .. }
            | Self::RemoveAllowedIps { interface, .. } => Some(interface),
            _ => None,
        }
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
            Self::SetPeer {
                interface,
                public_key,
                endpoint,
                persistent_keepalive,
                allowed_ips,
            } => {
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
            Self::RemoveAllowedIps {
                interface,
                public_key,
                allowed_ips,
            } => write!(
                f,
                "remove allowed-ips {} from peer {public_key} on {interface}",
                list(allowed_ips)
            ),
            Self::AddRoute { route } => write!(f, "replace route {route}"),
            Self::DeleteRoute { route } => {
                write!(f, "delete route ")?;
                match route.kind {
                    crate::state::ActualRouteKind::Throw => write!(f, "throw ")?,
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
                        crate::nft::family_name(t.family),
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
