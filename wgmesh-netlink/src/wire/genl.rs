//! Generic netlink: the controller's family lookup (`netlink-packet-generic`) and WireGuard
//! devices (`netlink-packet-wireguard`), including the splitting of big device updates the
//! way wg(8) does it, and the merging of multi-part dumps.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::SocketAddr;

use ipnet::IpNet;
use netlink_packet_core::{Emitable, NetlinkSerializable};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAllowedIpFlags,
    WireguardAttribute, WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};
use wgmesh_core::PublicKey;
use zeroize::{Zeroize, Zeroizing};

use super::{HEADER_LEN, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use crate::error::{DecodeError, Error};
use crate::state::{ActualDevice, PeerStats, handshake_time};

/// The controller's `CTRL_CMD_GETFAMILY` for a family name, with its header flags.
pub(crate) fn get_family(name: &str) -> (u16, GenlMessage<GenlCtrl>) {
    (
        NLM_F_REQUEST | NLM_F_ACK,
        GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(name.to_owned())],
        }),
    )
}

/// The family id in the controller's answer.
pub(crate) fn family_id(m: &GenlMessage<GenlCtrl>) -> Result<u16, DecodeError> {
    m.payload
        .nlas
        .iter()
        .find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .ok_or(DecodeError::Missing {
            what: "CTRL_CMD_NEWFAMILY",
            missing: "CTRL_ATTR_FAMILY_ID",
        })
}

/// A WireGuard message of the family `family_id`, serialized by reference (so a message
/// holding a private key is never copied before it is wiped).
pub(crate) struct Wg<'a> {
    pub(crate) family_id: u16,
    pub(crate) message: &'a WireguardMessage,
}

impl NetlinkSerializable for Wg<'_> {
    fn message_type(&self) -> u16 {
        self.family_id
    }

    fn buffer_len(&self) -> usize {
        GENL_HDR + self.message.buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        GenlHeader {
            cmd: self.message.command(),
            version: self.message.version(),
        }
        .emit(&mut buffer[..GENL_HDR]);
        self.message.emit(&mut buffer[GENL_HDR..]);
    }
}

/// `WG_CMD_GET_DEVICE` (a dump, as the kernel requires) of a device by name.
pub(crate) fn wg_get(ifname: &str) -> (u16, WireguardMessage) {
    (
        NLM_F_REQUEST | NLM_F_DUMP,
        WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(ifname.to_owned())],
        },
    )
}

/// Merges one message of a `WG_CMD_GET_DEVICE` dump into `dev`, peers by key (one peer may
/// span several messages). Private keys are read only to derive their public key and are
/// wiped at once; the peers' counters are skipped (see [`merge_stats`]).
pub(crate) fn merge_device(
    m: &mut WireguardMessage,
    dev: &mut ActualDevice,
) -> Result<(), DecodeError> {
    merge(m, Some(dev), None)
}

/// Merges the peers' counters (latest handshake, bytes received and sent) of one message of
/// a `WG_CMD_GET_DEVICE` dump of `interface` into `stats`, by key: the kernel puts them in a
/// peer's first part only, and a later part (more allowed IPs) leaves them as they are.
/// Private keys are wiped unread.
pub(crate) fn merge_stats(
    m: &mut WireguardMessage,
    interface: &str,
    stats: &mut BTreeMap<PublicKey, PeerStats>,
) -> Result<(), DecodeError> {
    merge(m, None, Some((interface, stats)))
}

type StatsSink<'a> = (&'a str, &'a mut BTreeMap<PublicKey, PeerStats>);

fn merge(
    m: &mut WireguardMessage,
    mut dev: Option<&mut ActualDevice>,
    mut stats: Option<StatsSink<'_>>,
) -> Result<(), DecodeError> {
    for a in &mut m.attributes {
        match a {
            WireguardAttribute::PrivateKey(k) => {
                let key = Zeroizing::new(*k);
                k.zeroize();
                match dev.as_deref_mut() {
                    Some(dev) if *key != [0; 32] => {
                        dev.public_key = wgmesh_core::PrivateKey::from_bytes(*key)
                            .ok()
                            .map(|k| k.public_key());
                    }
                    _ => {}
                }
            }
            WireguardAttribute::ListenPort(v) => {
                if let Some(dev) = dev.as_deref_mut() {
                    dev.listen_port = *v;
                }
            }
            WireguardAttribute::Fwmark(v) => {
                if let Some(dev) = dev.as_deref_mut() {
                    dev.firewall_mark = *v;
                }
            }
            WireguardAttribute::Peers(peers) => {
                for peer in peers.iter() {
                    let key = peer_key(peer)?;
                    if let Some(dev) = dev.as_deref_mut() {
                        merge_peer(peer, key, dev)?;
                    }
                    if let Some((interface, stats)) = stats.as_mut() {
                        merge_peer_stats(peer, key, interface, stats);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn peer_key(peer: &WireguardPeer) -> Result<PublicKey, DecodeError> {
    let key = peer
        .0
        .iter()
        .find_map(|a| match a {
            WireguardPeerAttribute::PublicKey(k) => Some(*k),
            _ => None,
        })
        .ok_or(DecodeError::Missing {
            what: "WireGuard peer",
            missing: "WGPEER_A_PUBLIC_KEY",
        })?;
    PublicKey::from_bytes(key).map_err(|e| DecodeError::invalid("WGPEER_A_PUBLIC_KEY", e))
}

fn merge_peer(
    peer: &WireguardPeer,
    key: PublicKey,
    dev: &mut ActualDevice,
) -> Result<(), DecodeError> {
    let entry = match dev.peers.entry(key) {
        Entry::Occupied(o) => o.into_mut(),
        Entry::Vacant(v) => v.insert(Default::default()),
    };
    for a in &peer.0 {
        match a {
            WireguardPeerAttribute::Endpoint(e) => {
                entry.endpoint = Some(SocketAddr::new(e.ip(), e.port()))
            }
            WireguardPeerAttribute::PersistentKeepalive(k) => entry.persistent_keepalive = *k,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let (mut addr, mut cidr) = (None, None);
                    for x in &ip.0 {
                        match x {
                            WireguardAllowedIpAttr::IpAddr(a) => addr = Some(*a),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
                            _ => {}
                        }
                    }
                    if let (Some(a), Some(c)) = (addr, cidr) {
                        entry.allowed_ips.insert(
                            IpNet::new(a, c)
                                .map_err(|e| DecodeError::invalid("WGALLOWEDIP_A_CIDR_MASK", e))?,
                        );
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn merge_peer_stats(
    peer: &WireguardPeer,
    key: PublicKey,
    interface: &str,
    stats: &mut BTreeMap<PublicKey, PeerStats>,
) {
    let entry = stats
        .entry(key)
        .or_insert_with(|| PeerStats::zero(interface, key));
    for a in &peer.0 {
        match a {
            WireguardPeerAttribute::LastHandshake(t) => {
                entry.last_handshake = handshake_time(t.seconds, t.nano_seconds)
            }
            WireguardPeerAttribute::RxBytes(n) => entry.rx_bytes = *n,
            WireguardPeerAttribute::TxBytes(n) => entry.tx_bytes = *n,
            _ => {}
        }
    }
}

/// One peer's part of a device update: what both the kernel and the userspace protocol can
/// say about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerUpdate {
    /// The peer's key.
    pub(crate) public_key: PublicKey,
    /// Remove the peer (`WGPEER_F_REMOVE_ME`).
    pub(crate) remove: bool,
    /// Only update an existing peer (`WGPEER_F_UPDATE_ONLY`).
    pub(crate) update_only: bool,
    /// Endpoint to set.
    pub(crate) endpoint: Option<SocketAddr>,
    /// Keepalive to set.
    pub(crate) persistent_keepalive: Option<u16>,
    /// Allowed IPs, each with the per-IP remove flag (`WGALLOWEDIP_F_REMOVE_ME`).
    pub(crate) allowed_ips: Vec<(IpNet, bool)>,
}

impl PeerUpdate {
    /// An update of `key` that changes nothing yet.
    pub(crate) fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: Vec::new(),
        }
    }
}

/// A device update (`WG_CMD_SET_DEVICE`, or one `set=1` request), before splitting.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct DeviceUpdate {
    /// Interface name.
    pub(crate) ifname: String,
    /// Private key to set (wiped on drop).
    pub(crate) private_key: Option<Zeroizing<[u8; 32]>>,
    /// Listening port.
    pub(crate) listen_port: Option<u16>,
    /// Firewall mark.
    pub(crate) firewall_mark: Option<u32>,
    /// Peers.
    pub(crate) peers: Vec<PeerUpdate>,
}

impl DeviceUpdate {
    /// An update of `ifname` that changes nothing yet.
    pub(crate) fn new(ifname: &str) -> Self {
        Self {
            ifname: ifname.to_owned(),
            ..Self::default()
        }
    }

    /// An update of one peer of `ifname`.
    pub(crate) fn peer(ifname: &str, peer: PeerUpdate) -> Self {
        let mut d = Self::new(ifname);
        d.peers.push(peer);
        d
    }
}

impl std::fmt::Debug for DeviceUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceUpdate")
            .field("ifname", &self.ifname)
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "(hidden)"),
            )
            .field("listen_port", &self.listen_port)
            .field("firewall_mark", &self.firewall_mark)
            .field("peers", &self.peers)
            .finish()
    }
}

/// A `WG_CMD_SET_DEVICE` message whose private key, if any, is wiped when it is dropped.
#[derive(PartialEq, Eq)]
pub(crate) struct WgSet(pub(crate) WireguardMessage);

impl WgSet {
    /// Zeroes the private key, if the message carries one.
    pub(crate) fn wipe(&mut self) {
        for a in &mut self.0.attributes {
            if let WireguardAttribute::PrivateKey(k) = a {
                k.zeroize();
            }
        }
    }
}

impl Drop for WgSet {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl std::fmt::Debug for WgSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WgSet({} bytes)", self.0.buffer_len())
    }
}

/// The largest `WG_CMD_SET_DEVICE` message wgmesh sends by default. The kernel reads a nested
/// attribute's length as 16 bits, so one message's peers must stay under 64 KiB; wg(8) packs
/// into pages, innernet into max(8 KiB, page size). 32 KiB keeps well inside every limit
/// while needing few round trips.
pub(crate) const DEFAULT_MAX_MESSAGE: usize = 32 * 1024;

fn allowed_ip_attr(ip: &IpNet, remove: bool) -> WireguardAllowedIp {
    let mut v = vec![
        WireguardAllowedIpAttr::Family(match ip {
            IpNet::V4(_) => WireguardAddressFamily::Ipv4,
            IpNet::V6(_) => WireguardAddressFamily::Ipv6,
        }),
        WireguardAllowedIpAttr::IpAddr(ip.network()),
        WireguardAllowedIpAttr::Cidr(ip.prefix_len()),
    ];
    if remove {
        v.push(WireguardAllowedIpAttr::Flags(
            WireguardAllowedIpFlags::RemoveMe,
        ));
    }
    WireguardAllowedIp(v)
}

const NLA_HDR: usize = 4;
const GENL_HDR: usize = 4;

/// Splits a device update into `WG_CMD_SET_DEVICE` messages of at most `max_message` bytes
/// (netlink header included): the device settings go only in the first message; a peer whose
/// allowed IPs do not fit continues in the next message with only its public key and more
/// allowed IPs (its flags, endpoint and keepalive only in its first chunk), as wg(8) does.
pub(crate) fn set_messages(dev: &DeviceUpdate, max_message: usize) -> Result<Vec<WgSet>, Error> {
    let ifname = WireguardAttribute::IfName(dev.ifname.clone());
    let base = HEADER_LEN + GENL_HDR + ifname.buffer_len() + NLA_HDR;
    let budget = max_message.min(65_535 + HEADER_LEN + GENL_HDR);
    let mut out = Vec::new();
    let mut first_attrs: Vec<WireguardAttribute> = Vec::new();
    if let Some(k) = &dev.private_key {
        first_attrs.push(WireguardAttribute::PrivateKey(**k));
    }
    if let Some(p) = dev.listen_port {
        first_attrs.push(WireguardAttribute::ListenPort(p));
    }
    if let Some(m) = dev.firewall_mark {
        first_attrs.push(WireguardAttribute::Fwmark(m));
    }
    let mut cur: Vec<WireguardPeer> = Vec::new();
    let mut cur_len = base + first_attrs.iter().map(Emitable::buffer_len).sum::<usize>();
    let flush = |peers: &mut Vec<WireguardPeer>,
                 first_attrs: &mut Vec<WireguardAttribute>,
                 out: &mut Vec<WgSet>| {
        let mut attributes = vec![WireguardAttribute::IfName(dev.ifname.clone())];
        attributes.append(first_attrs);
        if !peers.is_empty() {
            attributes.push(WireguardAttribute::Peers(std::mem::take(peers)));
        }
        out.push(WgSet(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        }));
    };
    for peer in &dev.peers {
        let mut ips = peer.allowed_ips.iter().peekable();
        let mut first_chunk = true;
        loop {
            let mut head = vec![WireguardPeerAttribute::PublicKey(
                *peer.public_key.as_bytes(),
            )];
            if first_chunk {
                let mut flags = WireguardPeerFlags::empty();
                if peer.remove {
                    flags |= WireguardPeerFlags::RemoveMe;
                }
                if peer.update_only {
                    flags |= WireguardPeerFlags::UpdateOnly;
                }
                if !flags.is_empty() {
                    head.push(WireguardPeerAttribute::Flags(flags));
                }
                if let Some(e) = peer.endpoint {
                    head.push(WireguardPeerAttribute::Endpoint(e));
                }
                if let Some(k) = peer.persistent_keepalive {
                    head.push(WireguardPeerAttribute::PersistentKeepalive(k));
                }
            }
            let head_len: usize =
                NLA_HDR + head.iter().map(Emitable::buffer_len).sum::<usize>() + NLA_HDR;
            let min_ip = ips
                .peek()
                .map(|(ip, rm)| allowed_ip_attr(ip, *rm).buffer_len() + NLA_HDR)
                .unwrap_or(0);
            if cur_len + head_len + min_ip > budget && !cur.is_empty() {
                flush(&mut cur, &mut first_attrs, &mut out);
                cur_len = base;
            }
            if cur_len + head_len + min_ip > budget {
                return Err(Error::MessageTooSmall { max_message });
            }
            cur_len += head_len;
            let mut list = Vec::new();
            while let Some((ip, rm)) = ips.peek() {
                let a = allowed_ip_attr(ip, *rm);
                let l = a.buffer_len();
                if cur_len + l > budget {
                    break;
                }
                cur_len += l;
                list.push(a);
                ips.next();
            }
            if !list.is_empty() {
                head.push(WireguardPeerAttribute::AllowedIps(list));
            } else {
                cur_len -= NLA_HDR;
            }
            cur.push(WireguardPeer(head));
            if ips.peek().is_none() {
                break;
            }
            flush(&mut cur, &mut first_attrs, &mut out);
            cur_len = base;
            first_chunk = false;
        }
    }
    if !cur.is_empty() || !first_attrs.is_empty() || out.is_empty() {
        flush(&mut cur, &mut first_attrs, &mut out);
    }
    Ok(out)
}
