//! The message-level fake kernel: it takes the bytes the executor sends on its three netlink
//! sockets and answers with the bytes Linux would send, from an in-memory model of links,
//! WireGuard devices, routes, rules, nftables tables and sysctls.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{Emitable, NetlinkHeader, NetlinkSerializable};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_netfilter::nftables::{
    GenAttribute, GenMessage, NfTablesMessage, RuleAttribute as NftRuleAttribute, SetAttribute,
    SetElementList, TableAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType as RtType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAllowedIpFlags,
    WireguardAttribute, WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags, WireguardTimeSpec,
};
use wgmesh_core::{Family, PrivateKey, PublicKey};

use crate::error::{EEXIST, EINVAL, ENODEV, ENOENT, EOPNOTSUPP, ESRCH};
use crate::io::KernelIo;
use crate::marking::{NftChain, NftSet, NftTable};
use crate::state::{ActualLink, ActualPeer, ActualRoute, ActualRouteKind, PeerStats};
use crate::wire::ack::AckRepr;
use crate::wire::genl::Wg;
use crate::wire::{
    self, HEADER_LEN, Header, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_MULTIPART, NLM_F_REPLACE, NLMSG_DONE, NLMSG_ERROR, Protocol, nft,
};

/// The generic netlink family id the fake kernel gives `wireguard` by default.
const WG_FAMILY_ID: u16 = 21;
/// `GENL_ID_CTRL`.
const GENL_ID_CTRL: u16 = 16;
/// `RT_TABLE_COMPAT`: the header's table byte of a rule or route in a table above 255.
const RT_TABLE_COMPAT: u8 = 252;
const RTPROT_KERNEL: u8 = 2;
const IFF_UP_BIT: LinkFlags = LinkFlags::Up;

/// What identifies a route in its table: family, table, destination, TOS and metric.
pub type RouteKey = (Family, u32, IpNet, u8, u32);

/// The key of a route.
pub fn route_key(r: &ActualRoute) -> RouteKey {
    (r.family, r.table, r.destination, r.tos, r.metric)
}

/// Which kernel's quirks the fake reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelVersion {
    /// Linux 6.1 (Debian 12, the VM's): no per-allowed-IP removal — an allowed IP carrying
    /// `WGALLOWEDIP_A_FLAGS` is refused with `EINVAL`, after the peer it belongs to was
    /// created or updated up to it.
    Linux6_1,
    /// Linux 6.12+: `WGALLOWEDIP_F_REMOVE_ME` removes one allowed IP from its peer.
    Linux6_12,
}

/// A WireGuard device of the fake kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FakeDevice {
    /// The private key, if set.
    pub private_key: Option<PrivateKey>,
    /// Listening port.
    pub listen_port: u16,
    /// Firewall mark.
    pub firewall_mark: u32,
    /// Peers by key.
    pub peers: BTreeMap<PublicKey, ActualPeer>,
    /// Counts the device's changes (WireGuard's `device_update_gen`): a dump during which it
    /// changes marks its later messages `NLM_F_DUMP_INTR`, and ends early if the peer it
    /// was at is gone, as Linux's does. Bumped by every `WG_CMD_SET_DEVICE`; a test that
    /// changes the device directly bumps it too.
    pub generation: u64,
}

impl FakeDevice {
    /// The public key of the device's private key.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.private_key.as_ref().map(PrivateKey::public_key)
    }
}

/// A policy rule as the fake kernel keeps it (`struct fib_rule`: a mark of 0 is no mark).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FakeRule {
    /// Family.
    pub family: Family,
    /// Priority (`pref`).
    pub priority: u32,
    /// Table.
    pub table: u32,
    /// Action (`FR_ACT_TO_TBL` = 1).
    pub action: u8,
    /// `not`.
    pub invert: bool,
    /// Mark (0: none).
    pub firewall_mark: u32,
    /// Mask (0 with a mark of 0: none).
    pub firewall_mask: u32,
    /// `from`, if the rule selects by source.
    pub source: Option<IpNet>,
    /// `iif`, if the rule selects by input interface.
    pub iif: Option<String>,
    /// The protocol that installed the rule (`RTPROT_*`).
    pub protocol: u8,
}

impl FakeRule {
    /// `pref PRIORITY lookup TABLE`, nothing else.
    pub fn lookup(family: Family, priority: u32, table: u32) -> Self {
        Self {
            family,
            priority,
            table,
            action: 1,
            invert: false,
            firewall_mark: 0,
            firewall_mask: 0,
            source: None,
            iif: None,
            protocol: 0,
        }
    }

    fn defaults() -> Vec<FakeRule> {
        let mut v = Vec::new();
        for family in [Family::V4, Family::V6] {
            for (priority, table) in [(0, 255), (32766, 254), (32767, 253)] {
                if family == Family::V6 && table == 253 {
                    continue;
                }
                let mut r = Self::lookup(family, priority, table);
                r.protocol = RTPROT_KERNEL;
                v.push(r);
            }
        }
        v
    }
}

/// One protocol's socket: the datagrams waiting to be read.
#[derive(Debug, Default, Clone)]
struct Socket {
    queue: VecDeque<Vec<u8>>,
    /// Bytes of acknowledgements and replies waiting (dumps are produced as they are read,
    /// as Linux does, and do not count).
    queued: usize,
    /// Set when the receive buffer overflowed: the next read fails with `ENOBUFS`.
    overrun: bool,
    /// The dump still to be read (a second dump meanwhile is `EBUSY`).
    dump: Option<Dump>,
}

/// A dump being read. Rules, addresses and nf_tables objects are made whole at the request;
/// routes and WireGuard peers — 560,000 of each at 5,000 nodes × 110 pods — a page (one
/// datagram) at a time as they are read, from where the last page stopped, as Linux resumes
/// `inet_dump_fib` and `wg_get_device_dump` from a cursor kept with the socket
/// (`cb->args`), taking its locks per page: requests of other sockets run between the
/// pages, and a page shows the state when it is made.
#[derive(Debug, Clone)]
pub(crate) enum Dump {
    /// Datagrams made at the request.
    Whole(VecDeque<Vec<u8>>),
    /// Routes after `after` (of `family`, or all).
    Routes {
        seq: u32,
        family: Option<Family>,
        after: Option<RouteKey>,
    },
    /// The peers of device `name` from `peer` on, the first `ips` allowed IPs of `peer`
    /// already sent.
    Device {
        seq: u32,
        name: String,
        peer: Option<PublicKey>,
        ips: usize,
        /// The device's generation when the dump began.
        generation: u64,
    },
}

/// An nf_tables transaction being received.
#[derive(Debug, Clone)]
struct Batch {
    tables: BTreeMap<(u8, String), NftTable>,
    answers: Vec<Vec<u8>>,
    failed: bool,
}

/// A kernel in memory that speaks netlink: rtnetlink (links, routes, rules), generic netlink
/// (the controller and WireGuard) and nf_tables, from the bytes the executor sends, with
/// Linux's semantics where wgmesh depends on them — acknowledgements and errno values
/// (`EEXIST`, `ENOENT`, `ENODEV`, `ESRCH`, `EINVAL`, `EOPNOTSUPP`, `EBUSY`), dumps split
/// over several messages and datagrams (a WireGuard peer over several messages, its counters
/// in its first part only), allowed IPs that move between peers, routes that die with their
/// link, rules kept in priority order whose delete takes the first rule the request matches,
/// all-or-nothing nf_tables batches, a bounded receive buffer (overrun: `ENOBUFS`), and the
/// quirks of the kernel it plays ([`KernelVersion`]).
///
/// Its state is public so tests can drift it as an administrator would.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FakeKernel {
    /// Every link, by name (owned or not); `lo` is index 1.
    pub links: BTreeMap<String, ActualLink>,
    /// WireGuard devices, by link name.
    pub devices: BTreeMap<String, FakeDevice>,
    /// Routes of every table, by [`route_key`] (`device` unused: routes leave through
    /// `oif`).
    pub routes: BTreeMap<RouteKey, ActualRoute>,
    /// Rules of both families, in the kernel's list order.
    pub rules: Vec<FakeRule>,
    /// Sysctls by dotted key; writing a key that is not here fails (`ENOENT`).
    pub sysctls: BTreeMap<String, String>,
    /// nftables tables, by (family, name).
    pub nft: BTreeMap<(u8, String), NftTable>,
    /// The kernel's quirks.
    pub version: KernelVersion,
    /// Whether the wireguard module is there (its generic netlink family resolves and
    /// `wireguard` links can be made).
    pub wireguard: bool,
    /// The generic netlink family id of `wireguard` (Linux gives ids in registration order).
    pub wireguard_family: u16,
    /// The largest message of a dump (Linux: up to 32 KiB for a big receive buffer).
    pub dump_message_size: usize,
    /// The socket receive buffer, in bytes of unread acknowledgements and replies.
    pub receive_buffer: usize,
    /// Whether an allowed IP's holder is found through an index instead of by searching
    /// every peer of the device (off by default). Searching is what a test that drifts
    /// `devices[..].peers[..].allowed_ips` directly needs, but it costs one search of every
    /// peer per allowed IP set: quadratic at 10,000 peers holding 550,000 allowed IPs. With
    /// the index on, the holder it names is checked before it is believed, but an allowed IP
    /// written into a peer directly (not through a message) is unknown to it: a peer
    /// that then takes it over through a message leaves the drifted copy in place, which
    /// Linux never shows. For benchmarks that only drive the kernel through messages.
    pub index_allowed_ips: bool,
    /// With `index_allowed_ips`: the peer each allowed IP was last given to, per device
    /// (entries whose peer or allowed IP is gone are stale and ignored).
    holders: HashMap<String, HashMap<IpNet, PublicKey>>,
    counters: BTreeMap<(String, PublicKey), PeerStats>,
    initiations: Vec<(String, PublicKey)>,
    sockets: [Socket; 3],
    batch: Option<Batch>,
    generation: u32,
    next_index: u32,
    received: usize,
    datagrams: usize,
    most_unread: usize,
    fault: Option<Fault>,
}

/// A refusal injected into the request stream.
#[derive(Debug, Clone)]
struct Fault {
    /// Requests to let through first.
    after: usize,
    errno: i32,
    message: Option<&'static str>,
}

impl Default for FakeKernel {
    fn default() -> Self {
        Self::new()
    }
}

fn err_header(m: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h.copy_from_slice(&m[..HEADER_LEN]);
    h
}

/// `m` with `NLM_F_MULTI` set, as every part of a dump has it.
fn multipart(mut m: Vec<u8>) -> Vec<u8> {
    let flags = u16::from_ne_bytes([m[6], m[7]]) | NLM_F_MULTIPART;
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m
}

fn end_message(message_type: u16, seq: u32, ack: &AckRepr) -> Vec<u8> {
    let done = message_type == NLMSG_DONE;
    let len = HEADER_LEN + ack.buffer_len(done);
    let mut buf = vec![0; len];
    let mut h = NetlinkHeader::default();
    h.length = len as u32;
    h.message_type = message_type;
    h.flags = ack.flags(done) | if done { NLM_F_MULTIPART } else { 0 };
    h.sequence_number = seq;
    h.emit(&mut buf[..HEADER_LEN]);
    ack.emit(&mut buf[HEADER_LEN..], done);
    buf
}

/// A refusal: errno and, when Linux says one, its explanation.
type Refused = (i32, Option<&'static str>);

fn refuse(errno: i32) -> Refused {
    (errno, None)
}

fn family_of(af: AddressFamily) -> Option<Family> {
    match af {
        AddressFamily::Inet => Some(Family::V4),
        AddressFamily::Inet6 => Some(Family::V6),
        _ => None,
    }
}

fn family_of_net(a: &IpNet) -> Family {
    match a {
        IpNet::V4(_) => Family::V4,
        IpNet::V6(_) => Family::V6,
    }
}

fn address_family(f: Family) -> AddressFamily {
    match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn unspecified(f: Family) -> IpAddr {
    match f {
        Family::V4 => IpAddr::from([0u8; 4]),
        Family::V6 => IpAddr::from([0u8; 16]),
    }
}

/// What a rule request names (`fib_nl2rule`): unset fields are 0 / `None`.
#[derive(Debug)]
struct RuleRequest {
    rule: FakeRule,
    has_priority: bool,
}

impl RuleRequest {
    fn parse(m: &RuleMessage) -> Result<Self, Refused> {
        let family = family_of(m.header.family).ok_or(refuse(EOPNOTSUPP))?;
        let mut r = FakeRule::lookup(family, 0, u32::from(m.header.table));
        r.action = u8::from(m.header.action);
        r.invert = m.header.flags.contains(RuleFlags::Invert);
        let (mut has_priority, mut mask) = (false, None);
        let mut src = None;
        for a in &m.attributes {
            match a {
                RuleAttribute::Priority(p) => {
                    r.priority = *p;
                    has_priority = true;
                }
                RuleAttribute::Table(t) => r.table = *t,
                RuleAttribute::FwMark(v) => r.firewall_mark = *v,
                RuleAttribute::FwMask(v) => mask = Some(*v),
                RuleAttribute::Source(a) => src = Some(*a),
                RuleAttribute::Iifname(n) => r.iif = Some(n.clone()),
                RuleAttribute::Protocol(p) => r.protocol = u8::from(*p),
                _ => {}
            }
        }
        // A mark without a mask matches all of it.
        r.firewall_mask = mask.unwrap_or(if r.firewall_mark != 0 { u32::MAX } else { 0 });
        if let Some(a) = src {
            r.source = Some(
                IpNet::new(a, m.header.src_len).map_err(|_| (EINVAL, Some("Invalid source")))?,
            );
        }
        Ok(Self {
            rule: r,
            has_priority,
        })
    }

    /// `rule_find`: whether a delete request takes `r` (unset fields are wildcards; `not` is
    /// not compared).
    fn takes(&self, r: &FakeRule) -> bool {
        let q = &self.rule;
        r.family == q.family
            && (q.action == 0 || r.action == q.action)
            && (q.table == 0 || r.table == q.table)
            && (!self.has_priority || r.priority == q.priority)
            && q.iif.as_ref().is_none_or(|i| r.iif.as_ref() == Some(i))
            && (q.firewall_mark == 0 || r.firewall_mark == q.firewall_mark)
            && (q.firewall_mask == 0 || r.firewall_mask == q.firewall_mask)
            && (q.protocol == 0 || r.protocol == q.protocol)
            && q.source.is_none_or(|s| r.source == Some(s))
    }

    /// `rule_exists`: an identical rule (all fields but `not`).
    fn exists(&self, r: &FakeRule) -> bool {
        let q = &self.rule;
        (
            r.family,
            r.action,
            r.table,
            r.priority,
            &r.iif,
            r.firewall_mark,
            r.firewall_mask,
            r.source,
        ) == (
            q.family,
            q.action,
            q.table,
            q.priority,
            &q.iif,
            q.firewall_mark,
            q.firewall_mask,
            q.source,
        )
    }
}

impl FakeKernel {
    /// An empty Linux 6.1 with the wireguard module, `lo` (index 1), the default rules and
    /// the sysctls wgmesh writes.
    pub fn new() -> Self {
        let mut k = Self {
            links: BTreeMap::new(),
            devices: BTreeMap::new(),
            routes: BTreeMap::new(),
            rules: FakeRule::defaults(),
            sysctls: BTreeMap::new(),
            nft: BTreeMap::new(),
            version: KernelVersion::Linux6_1,
            wireguard: true,
            wireguard_family: WG_FAMILY_ID,
            dump_message_size: 32 * 1024,
            receive_buffer: 4 << 20,
            index_allowed_ips: false,
            holders: HashMap::new(),
            counters: BTreeMap::new(),
            initiations: Vec::new(),
            sockets: Default::default(),
            batch: None,
            generation: 1,
            next_index: 1,
            received: 0,
            datagrams: 0,
            most_unread: 0,
            fault: None,
        };
        k.add_link("lo", None, 65536, true);
        k.sysctls
            .insert(wgmesh_core::plan::SRC_VALID_MARK.to_owned(), "0".to_owned());
        k
    }

    /// The same kernel with another version's quirks.
    pub fn with_version(mut self, version: KernelVersion) -> Self {
        self.version = version;
        self
    }

    /// Adds a link (a foreign one, or a drifted one of an owned name); returns its index. A
    /// `wireguard` link gets an empty device.
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
                alias: None,
                addresses: Vec::new(),
            },
        );
        if kind == Some("wireguard") {
            self.devices.insert(name.to_owned(), FakeDevice::default());
        }
        index
    }

    /// Adds (or replaces) a route, as `ip route replace` does.
    pub fn add_route(&mut self, route: ActualRoute) {
        self.routes.insert(route_key(&route), route);
    }

    /// Removes a link as `ip link del` does: its device, its routes and its peers' counters
    /// go with it.
    pub fn remove_link(&mut self, name: &str) -> Option<ActualLink> {
        let link = self.links.remove(name)?;
        self.devices.remove(name);
        self.counters.retain(|(i, _), _| i != name);
        self.routes.retain(|_, r| r.oif != Some(link.index));
        Some(link)
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
    /// order. (Initiations caused by traffic are not modelled.)
    pub fn handshakes_initiated(&self) -> &[(String, PublicKey)] {
        &self.initiations
    }

    /// Forgets the recorded handshake initiations.
    pub fn clear_handshakes_initiated(&mut self) {
        self.initiations.clear();
    }

    /// Refuses the request message that comes after `after` more (0: the next one; batch
    /// delimiters do not count) with `errno` and, if given, an extended-ack `message`,
    /// changing nothing for it. Messages before it, and after it in the same datagram, are
    /// processed as usual — as Linux does with a refusal in the middle of a pipeline.
    pub fn refuse_request(&mut self, after: usize, errno: i32, message: Option<&'static str>) {
        self.fault = Some(Fault {
            after,
            errno,
            message,
        });
    }

    /// Whether the injected refusal has not been used yet.
    pub fn refusal_pending(&self) -> bool {
        self.fault.is_some()
    }

    fn take_fault(&mut self) -> Option<Refused> {
        let f = self.fault.as_mut()?;
        if f.after > 0 {
            f.after -= 1;
            return None;
        }
        let f = self.fault.take()?;
        Some((f.errno, f.message))
    }

    fn is_delimiter(protocol: Protocol, h: &Header) -> bool {
        protocol == Protocol::Netfilter && (h.message_type == 0x10 || h.message_type == 0x11)
    }

    /// Netlink messages received so far (every protocol).
    pub fn messages_received(&self) -> usize {
        self.received
    }

    /// Datagrams (`sendmsg` calls) received so far.
    pub fn datagrams_received(&self) -> usize {
        self.datagrams
    }

    /// The most bytes of acknowledgements and replies that were ever waiting unread on one
    /// socket: what pipelining cost the receive buffer.
    pub fn most_unread(&self) -> usize {
        self.most_unread
    }

    fn name_of(&self, index: u32) -> Option<&str> {
        self.links
            .iter()
            .find(|(_, l)| l.index == index)
            .map(|(n, _)| n.as_str())
    }

    // -----------------------------------------------------------------------------------
    // Answers.

    fn push(&mut self, protocol: Protocol, datagram: Vec<u8>) {
        let s = &mut self.sockets[protocol.index()];
        if s.queued + datagram.len() > self.receive_buffer {
            s.overrun = true;
            return;
        }
        s.queued += datagram.len();
        self.most_unread = self.most_unread.max(s.queued);
        s.queue.push_back(datagram);
    }

    /// The acknowledgement (code 0, only when asked for) or the refusal of request `m`.
    fn answer(&mut self, protocol: Protocol, h: &Header, m: &[u8], result: Result<(), Refused>) {
        let (code, message) = match result {
            Ok(()) if h.flags & NLM_F_ACK == 0 => return,
            Ok(()) => (0, None),
            Err((errno, message)) => (-errno, message),
        };
        let ack = AckRepr {
            code,
            request_header: Some(err_header(m)),
            message: message.map(str::to_owned),
            offset: None,
        };
        let bytes = end_message(NLMSG_ERROR, h.seq, &ack);
        match &mut self.batch {
            Some(b) if protocol == Protocol::Netfilter => b.answers.push(bytes),
            _ => self.push(protocol, bytes),
        }
    }

    fn reply<I: NetlinkSerializable>(&mut self, protocol: Protocol, seq: u32, payload: &I) {
        let bytes = wire::serialize(payload, 0, seq);
        self.push(protocol, bytes);
    }

    /// A dump's messages, packed into datagrams, then `NLMSG_DONE`. A dump on a socket that
    /// has one unread already is refused with `EBUSY`, as Linux does.
    fn dump(&mut self, protocol: Protocol, seq: u32, messages: Vec<Vec<u8>>) {
        let mut datagrams = VecDeque::new();
        let mut cur: Vec<u8> = Vec::new();
        for m in messages {
            let m = multipart(m);
            if !cur.is_empty() && cur.len() + m.len() > self.dump_message_size {
                datagrams.push_back(std::mem::take(&mut cur));
            }
            cur.extend_from_slice(&m);
        }
        cur.extend(end_message(NLMSG_DONE, seq, &AckRepr::default()));
        datagrams.push_back(cur);
        self.sockets[protocol.index()].dump = Some(Dump::Whole(datagrams));
    }

    fn dump_busy(&self, protocol: Protocol) -> bool {
        self.sockets[protocol.index()].dump.is_some()
    }

    /// The dump unread on `protocol`'s socket, taken out of it (a [`super::SharedKernel`]
    /// handle keeps it between pages, with the kernel unlocked).
    pub(crate) fn take_dump(&mut self, protocol: Protocol) -> Option<Dump> {
        self.sockets[protocol.index()].dump.take()
    }

    /// Puts a dump taken by [`Self::take_dump`] back on `protocol`'s socket.
    pub(crate) fn put_dump(&mut self, protocol: Protocol, dump: Option<Dump>) {
        self.sockets[protocol.index()].dump = dump;
    }

    /// The next datagram of `dump`, made now from the kernel's state; `None` when `dump` is
    /// over (then it is cleared).
    pub(crate) fn next_page(&self, dump: &mut Option<Dump>) -> Option<Vec<u8>> {
        let (page, over) = match dump.as_mut()? {
            Dump::Whole(datagrams) => {
                let page = datagrams.pop_front();
                (page, datagrams.is_empty())
            }
            Dump::Routes { seq, family, after } => {
                let (page, over) = self.routes_page(*seq, *family, after);
                (Some(page), over)
            }
            Dump::Device {
                seq,
                name,
                peer,
                ips,
                generation,
            } => {
                let (page, over) = self.device_page(*seq, name, peer, ips, *generation);
                (Some(page), over)
            }
        };
        if over {
            *dump = None;
        }
        page
    }

    /// Queued acknowledgements and replies only, never a dump's page.
    pub(crate) fn recv_queued(&mut self, protocol: Protocol) -> Option<io::Result<Vec<u8>>> {
        let s = &mut self.sockets[protocol.index()];
        if std::mem::take(&mut s.overrun) {
            return Some(Err(io::Error::from_raw_os_error(105)));
        }
        let d = s.queue.pop_front()?;
        s.queued -= d.len();
        Some(Ok(d))
    }

    // -----------------------------------------------------------------------------------
    // rtnetlink.

    fn route_message(&mut self, h: &Header, m: &[u8]) {
        let msg = match wire::parse::<RouteNetlinkMessage>(m, "rtnetlink request") {
            Ok((_, msg)) => msg,
            Err(_) => return self.answer(Protocol::Route, h, m, Err(refuse(EINVAL))),
        };
        let dump = h.flags & NLM_F_DUMP == NLM_F_DUMP;
        if dump && self.dump_busy(Protocol::Route) {
            return self.answer(Protocol::Route, h, m, Err(refuse(16)));
        }
        let result = match msg {
            RouteNetlinkMessage::GetLink(l) => self.get_link(h, &l),
            RouteNetlinkMessage::NewLink(l) => self.new_link(h, &l),
            RouteNetlinkMessage::DelLink(l) => self.del_link(&l),
            RouteNetlinkMessage::GetRoute(r) if dump => {
                self.dump_routes(h, &r);
                return;
            }
            RouteNetlinkMessage::NewRoute(r) => self.new_route(h, &r),
            RouteNetlinkMessage::DelRoute(r) => self.del_route(&r),
            RouteNetlinkMessage::GetRule(r) if dump => {
                self.dump_rules(h, &r);
                return;
            }
            RouteNetlinkMessage::GetAddress(a) if dump => {
                self.dump_addresses(h, &a);
                return;
            }
            RouteNetlinkMessage::NewRule(r) => self.new_rule(h, &r),
            RouteNetlinkMessage::DelRule(r) => self.del_rule(&r),
            _ => Err(refuse(EOPNOTSUPP)),
        };
        self.answer(Protocol::Route, h, m, result);
    }

    fn link_name(l: &LinkMessage) -> Option<&str> {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.as_str()),
            _ => None,
        })
    }

    fn find_link(&self, l: &LinkMessage) -> Option<String> {
        match Self::link_name(l) {
            Some(n) => self.links.contains_key(n).then(|| n.to_owned()),
            None => self.name_of(l.header.index).map(str::to_owned),
        }
    }

    fn link_message(name: &str, l: &ActualLink) -> RouteNetlinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = l.index;
        if l.up {
            m.header.flags = IFF_UP_BIT;
        }
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        m.attributes.push(LinkAttribute::Mtu(l.mtu));
        if let Some(a) = &l.alias {
            m.attributes.push(LinkAttribute::IfAlias(a.clone()));
        }
        if let Some(k) = &l.kind {
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::from(k.as_str()),
                )]));
        }
        RouteNetlinkMessage::NewLink(m)
    }

    /// Every address of every link (of one family, or both for `AF_UNSPEC`), link by link.
    fn dump_addresses(&mut self, h: &Header, q: &AddressMessage) {
        let want = family_of(q.header.family);
        let messages = self
            .links
            .values()
            .flat_map(|l| l.addresses.iter().map(move |a| (l.index, a)))
            .filter(|(_, a)| want.is_none_or(|f| f == family_of_net(a)))
            .map(|(index, a)| {
                let mut m = AddressMessage::default();
                m.header.family = address_family(family_of_net(a));
                m.header.prefix_len = a.prefix_len();
                m.header.index = index;
                m.attributes.push(AddressAttribute::Address(a.addr()));
                if a.addr().is_ipv4() {
                    m.attributes.push(AddressAttribute::Local(a.addr()));
                }
                wire::serialize(&RouteNetlinkMessage::NewAddress(m), 0, h.seq)
            })
            .collect();
        self.dump(Protocol::Route, h.seq, messages);
    }

    fn get_link(&mut self, h: &Header, l: &LinkMessage) -> Result<(), Refused> {
        let name = self.find_link(l).ok_or(refuse(ENODEV))?;
        let m = Self::link_message(&name, &self.links[&name]);
        self.reply(Protocol::Route, h.seq, &m);
        Ok(())
    }

    fn new_link(&mut self, h: &Header, l: &LinkMessage) -> Result<(), Refused> {
        let mtu = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        let kind = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(k) => Some(k.to_string()),
                _ => None,
            }),
            _ => None,
        });
        let alias = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfAlias(a) => Some(a.clone()),
            _ => None,
        });
        let up_change = l.header.change_mask.contains(IFF_UP_BIT);
        let up = l.header.flags.contains(IFF_UP_BIT);
        if let Some(name) = self.find_link(l) {
            if h.flags & NLM_F_EXCL != 0 {
                return Err(refuse(EEXIST));
            }
            let link = self.links.get_mut(&name).ok_or(refuse(ENODEV))?;
            if let Some(m) = mtu {
                link.mtu = m;
            }
            if up_change {
                link.up = up;
            }
            // An empty alias removes it, as in Linux.
            if let Some(a) = alias {
                link.alias = (!a.is_empty()).then_some(a);
            }
            return Ok(());
        }
        if h.flags & NLM_F_CREATE == 0 {
            return Err(refuse(ENODEV));
        }
        let name = Self::link_name(l).ok_or(refuse(EINVAL))?.to_owned();
        let default_mtu = match kind.as_deref() {
            Some("wireguard") if self.wireguard => 1420,
            Some("dummy") => 1500,
            Some("tun") => {
                return Err((
                    EOPNOTSUPP,
                    Some("tun/tap creation via rtnetlink is not supported."),
                ));
            }
            _ => return Err((EOPNOTSUPP, Some("Unknown device type"))),
        };
        self.add_link(
            &name,
            kind.as_deref(),
            mtu.unwrap_or(default_mtu),
            up_change && up,
        );
        Ok(())
    }

    fn del_link(&mut self, l: &LinkMessage) -> Result<(), Refused> {
        let name = self.find_link(l).ok_or(refuse(ENODEV))?;
        self.remove_link(&name);
        Ok(())
    }

    fn parse_route(m: &RouteMessage) -> Result<ActualRoute, Refused> {
        let family = family_of(m.header.address_family).ok_or(refuse(EOPNOTSUPP))?;
        let mut r = ActualRoute {
            family,
            table: u32::from(m.header.table),
            destination: IpNet::new(unspecified(family), 0).map_err(|_| refuse(EINVAL))?,
            kind: match m.header.kind {
                RtType::Unicast => ActualRouteKind::Unicast,
                RtType::Throw => ActualRouteKind::Throw,
                RtType::BlackHole => ActualRouteKind::Blackhole,
                other => ActualRouteKind::Other(u8::from(other)),
            },
            device: None,
            oif: None,
            gateway: None,
            metric: crate::diff::route_metric(family),
            tos: m.header.tos,
        };
        let mut dst = unspecified(family);
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(d) => dst = ip(d).ok_or(refuse(EINVAL))?,
                RouteAttribute::Table(t) => r.table = *t,
                RouteAttribute::Priority(p) => r.metric = *p,
                RouteAttribute::Oif(i) => r.oif = Some(*i),
                RouteAttribute::Gateway(g) => r.gateway = ip(g),
                _ => {}
            }
        }
        r.destination = IpNet::new(dst, m.header.destination_prefix_length)
            .map_err(|_| (EINVAL, Some("Invalid prefix for given prefix length")))?
            .trunc();
        Ok(r)
    }

    fn new_route(&mut self, h: &Header, m: &RouteMessage) -> Result<(), Refused> {
        let mut r = Self::parse_route(m)?;
        if r.table == 0 {
            r.table = 254;
        }
        match r.kind {
            ActualRouteKind::Unicast => {
                let oif = r
                    .oif
                    .ok_or((EINVAL, Some("Device only routes require a device")))?;
                if self.name_of(oif).is_none() {
                    return Err(refuse(ENODEV));
                }
            }
            // IPv6 keeps routes that leave through no device on the loopback.
            _ if r.family == Family::V6 => r.oif = self.links.get("lo").map(|l| l.index),
            _ => r.oif = None,
        }
        let exists = self.routes.contains_key(&route_key(&r));
        match () {
            _ if exists && h.flags & NLM_F_REPLACE == 0 => return Err(refuse(EEXIST)),
            _ if !exists && h.flags & NLM_F_CREATE == 0 => return Err(refuse(ENOENT)),
            _ => self.add_route(r),
        }
        Ok(())
    }

    fn del_route(&mut self, m: &RouteMessage) -> Result<(), Refused> {
        let q = Self::parse_route(m)?;
        let any_kind = m.header.kind == RtType::Unspec;
        let takes = |r: &ActualRoute| {
            r.family == q.family
                && (q.table == 0 || r.table == q.table)
                && r.destination == q.destination
                && r.tos == q.tos
                // IPv4 takes a metric of 0 for any.
                && (r.metric == q.metric || (q.family == Family::V4 && q.metric == 0))
                && (any_kind || r.kind == q.kind)
                && q.oif.is_none_or(|o| r.oif == Some(o))
        };
        let found = if q.table == 0 {
            self.routes.iter().find(|(_, r)| takes(r))
        } else {
            let k = route_key(&q);
            self.routes
                .range((k.0, k.1, k.2, k.3, 0)..=(k.0, k.1, k.2, k.3, u32::MAX))
                .find(|(_, r)| takes(r))
        };
        let pos = *found.ok_or(refuse(ESRCH))?.0;
        self.routes.remove(&pos);
        Ok(())
    }

    fn route_reply(r: &ActualRoute) -> RouteNetlinkMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = address_family(r.family);
        m.header.destination_prefix_length = r.destination.prefix_len();
        m.header.tos = r.tos;
        m.header.table = u8::try_from(r.table).unwrap_or(RT_TABLE_COMPAT);
        m.header.protocol = RouteProtocol::Static;
        m.header.scope = match (r.kind, r.family) {
            (ActualRouteKind::Unicast, Family::V4) => RouteScope::Link,
            _ => RouteScope::Universe,
        };
        m.header.kind = match r.kind {
            ActualRouteKind::Unicast => RtType::Unicast,
            ActualRouteKind::Throw => RtType::Throw,
            ActualRouteKind::Blackhole => RtType::BlackHole,
            ActualRouteKind::Other(n) => RtType::from(n),
        };
        m.attributes.push(RouteAttribute::Table(r.table));
        if r.destination.prefix_len() > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(
                    r.destination.network(),
                )));
        }
        // IPv4 omits a zero metric; IPv6 always has one.
        if r.family == Family::V6 || r.metric != 0 {
            m.attributes.push(RouteAttribute::Priority(r.metric));
        }
        if let Some(g) = r.gateway {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(g)));
        }
        if let Some(o) = r.oif {
            m.attributes.push(RouteAttribute::Oif(o));
        }
        RouteNetlinkMessage::NewRoute(m)
    }

    fn dump_routes(&mut self, h: &Header, q: &RouteMessage) {
        self.sockets[Protocol::Route.index()].dump = Some(Dump::Routes {
            seq: h.seq,
            family: family_of(q.header.address_family),
            after: None,
        });
    }

    /// One datagram of a route dump: the routes after `after` that fit, then `NLMSG_DONE`
    /// when none is left (`true`).
    fn routes_page(
        &self,
        seq: u32,
        family: Option<Family>,
        after: &mut Option<RouteKey>,
    ) -> (Vec<u8>, bool) {
        use std::ops::Bound::{Excluded, Unbounded};
        let start = after.map_or(Unbounded, Excluded);
        let mut page = Vec::new();
        for (key, r) in self.routes.range((start, Unbounded)) {
            if family.is_some_and(|f| r.family != f) {
                continue;
            }
            let m = multipart(wire::serialize(&Self::route_reply(r), 0, seq));
            if !page.is_empty() && page.len() + m.len() > self.dump_message_size {
                return (page, false);
            }
            page.extend_from_slice(&m);
            *after = Some(*key);
        }
        page.extend(end_message(NLMSG_DONE, seq, &AckRepr::default()));
        (page, true)
    }

    fn new_rule(&mut self, h: &Header, m: &RuleMessage) -> Result<(), Refused> {
        let q = RuleRequest::parse(m)?;
        if h.flags & NLM_F_EXCL != 0 && self.rules.iter().any(|r| q.exists(r)) {
            return Err(refuse(EEXIST));
        }
        let rule = q.rule;
        // After the last rule of the family with the same or a lower priority.
        let pos = self
            .rules
            .iter()
            .rposition(|r| r.family == rule.family && r.priority <= rule.priority)
            .map_or_else(
                || {
                    self.rules
                        .iter()
                        .position(|r| r.family == rule.family)
                        .unwrap_or(self.rules.len())
                },
                |p| p + 1,
            );
        self.rules.insert(pos, rule);
        Ok(())
    }

    fn del_rule(&mut self, m: &RuleMessage) -> Result<(), Refused> {
        let q = RuleRequest::parse(m)?;
        let pos = self
            .rules
            .iter()
            .position(|r| q.takes(r))
            .ok_or(refuse(ENOENT))?;
        self.rules.remove(pos);
        Ok(())
    }

    /// A rule as `fib_nl_fill_rule` writes it.
    fn rule_reply(r: &FakeRule) -> RouteNetlinkMessage {
        let mut m = RuleMessage::default();
        m.header.family = address_family(r.family);
        m.header.src_len = r.source.map_or(0, |s| s.prefix_len());
        m.header.table = u8::try_from(r.table).unwrap_or(RT_TABLE_COMPAT);
        m.header.action = RuleAction::from(r.action);
        if r.invert {
            m.header.flags = RuleFlags::Invert;
        }
        let a = &mut m.attributes;
        a.push(RuleAttribute::Table(r.table));
        a.push(RuleAttribute::SuppressPrefixLen(u32::MAX));
        a.push(RuleAttribute::Protocol(RouteProtocol::from(r.protocol)));
        if let Some(i) = &r.iif {
            a.push(RuleAttribute::Iifname(i.clone()));
        }
        if r.priority != 0 {
            a.push(RuleAttribute::Priority(r.priority));
        }
        if r.firewall_mark != 0 {
            a.push(RuleAttribute::FwMark(r.firewall_mark));
        }
        if r.firewall_mark != 0 || r.firewall_mask != 0 {
            a.push(RuleAttribute::FwMask(r.firewall_mask));
        }
        if let Some(s) = r.source {
            a.push(RuleAttribute::Source(s.network()));
        }
        RouteNetlinkMessage::NewRule(m)
    }

    fn dump_rules(&mut self, h: &Header, q: &RuleMessage) {
        let family = family_of(q.header.family);
        let messages = self
            .rules
            .iter()
            .filter(|r| family.is_none_or(|f| r.family == f))
            .map(|r| wire::serialize(&Self::rule_reply(r), 0, h.seq))
            .collect();
        self.dump(Protocol::Route, h.seq, messages);
    }

    // -----------------------------------------------------------------------------------
    // Generic netlink.

    fn generic_message(&mut self, h: &Header, m: &[u8]) {
        let result = match h.message_type {
            GENL_ID_CTRL => match wire::parse::<GenlMessage<GenlCtrl>>(m, "controller request") {
                Ok((_, c)) => self.controller(h, &c.payload),
                Err(_) => Err(refuse(EINVAL)),
            },
            t if t == self.wireguard_family && self.wireguard => {
                match wire::parse::<GenlMessage<WireguardMessage>>(m, "WireGuard request") {
                    Ok((_, w)) => match w.payload.cmd {
                        WireguardCmd::GetDevice if h.flags & NLM_F_DUMP == NLM_F_DUMP => {
                            if self.dump_busy(Protocol::Generic) {
                                Err(refuse(16))
                            } else {
                                match self.dump_device(h, &w.payload) {
                                    Ok(()) => return,
                                    Err(e) => Err(e),
                                }
                            }
                        }
                        WireguardCmd::SetDevice => self.set_device(&w.payload),
                        _ => Err(refuse(EOPNOTSUPP)),
                    },
                    Err(_) => Err(refuse(EINVAL)),
                }
            }
            _ => Err(refuse(ENOENT)),
        };
        self.answer(Protocol::Generic, h, m, result);
    }

    fn controller(&mut self, h: &Header, c: &GenlCtrl) -> Result<(), Refused> {
        let name = c.nlas.iter().find_map(|a| match a {
            GenlCtrlAttrs::FamilyName(n) => Some(n.as_str()),
            _ => None,
        });
        if c.cmd != GenlCtrlCmd::GetFamily || name != Some("wireguard") || !self.wireguard {
            return Err(refuse(ENOENT));
        }
        let mut reply = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::NewFamily,
            nlas: vec![
                GenlCtrlAttrs::FamilyName("wireguard".into()),
                GenlCtrlAttrs::FamilyId(self.wireguard_family),
                GenlCtrlAttrs::Version(1),
                GenlCtrlAttrs::HdrSize(0),
                GenlCtrlAttrs::MaxAttr(8),
            ],
        });
        reply.finalize();
        self.reply(Protocol::Generic, h.seq, &reply);
        Ok(())
    }

    fn device_name(&self, w: &WireguardMessage) -> Result<String, Refused> {
        let name = w
            .attributes
            .iter()
            .find_map(|a| match a {
                WireguardAttribute::IfName(n) => Some(n.clone()),
                WireguardAttribute::IfIndex(i) => self.name_of(*i).map(str::to_owned),
                _ => None,
            })
            .ok_or(refuse(EINVAL))?;
        match self.links.get(&name) {
            None => Err(refuse(ENODEV)),
            Some(_) if !self.devices.contains_key(&name) => Err(refuse(EOPNOTSUPP)),
            Some(_) => Ok(name),
        }
    }

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

    fn set_device(&mut self, w: &WireguardMessage) -> Result<(), Refused> {
        let name = self.device_name(w)?;
        if let Some(dev) = self.devices.get_mut(&name) {
            dev.generation += 1;
        }
        for a in &w.attributes {
            let dev = self.devices.get_mut(&name).ok_or(refuse(ENODEV))?;
            match a {
                WireguardAttribute::PrivateKey(k) => {
                    dev.private_key = if *k == [0; 32] {
                        None
                    } else {
                        Some(PrivateKey::from_bytes(*k).map_err(|_| refuse(EINVAL))?)
                    };
                }
                WireguardAttribute::ListenPort(p) => dev.listen_port = *p,
                WireguardAttribute::Fwmark(m) => dev.firewall_mark = *m,
                WireguardAttribute::Peers(peers) => {
                    for p in peers {
                        self.set_peer(&name, p)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn set_peer(&mut self, name: &str, p: &WireguardPeer) -> Result<(), Refused> {
        let key =
            p.0.iter()
                .find_map(|a| match a {
                    WireguardPeerAttribute::PublicKey(k) => Some(*k),
                    _ => None,
                })
                .ok_or(refuse(EINVAL))?;
        let key = PublicKey::from_bytes(key).map_err(|_| refuse(EINVAL))?;
        let flags =
            p.0.iter()
                .find_map(|a| match a {
                    WireguardPeerAttribute::Flags(f) => Some(*f),
                    _ => None,
                })
                .unwrap_or(WireguardPeerFlags::empty());
        let dev = self.devices.get_mut(name).ok_or(refuse(ENODEV))?;
        if flags.contains(WireguardPeerFlags::RemoveMe) {
            dev.peers.remove(&key);
            self.counters.remove(&(name.to_owned(), key));
            return Ok(());
        }
        if let std::collections::btree_map::Entry::Vacant(v) = dev.peers.entry(key) {
            if flags.contains(WireguardPeerFlags::UpdateOnly) {
                return Ok(());
            }
            v.insert(ActualPeer::default());
        }
        for a in &p.0 {
            match a {
                WireguardPeerAttribute::Endpoint(e) => {
                    if let Some(peer) = self
                        .devices
                        .get_mut(name)
                        .and_then(|d| d.peers.get_mut(&key))
                    {
                        peer.endpoint = Some(*e);
                    }
                }
                WireguardPeerAttribute::PersistentKeepalive(k) => self.set_keepalive(name, key, *k),
                WireguardPeerAttribute::AllowedIps(ips) => {
                    for ip in ips {
                        self.set_allowed_ip(name, key, ip)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn set_allowed_ip(
        &mut self,
        name: &str,
        key: PublicKey,
        ip: &WireguardAllowedIp,
    ) -> Result<(), Refused> {
        let (mut addr, mut cidr, mut remove) = (None, None, None);
        for x in &ip.0 {
            match x {
                WireguardAllowedIpAttr::IpAddr(a) => addr = Some(*a),
                WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
                WireguardAllowedIpAttr::Flags(f) => {
                    remove = Some(f.contains(WireguardAllowedIpFlags::RemoveMe))
                }
                _ => {}
            }
        }
        // 6.1 parses allowed IPs strictly: the flags attribute is unknown there.
        if remove.is_some() && self.version == KernelVersion::Linux6_1 {
            return Err(refuse(EINVAL));
        }
        let net = IpNet::new(addr.ok_or(refuse(EINVAL))?, cidr.ok_or(refuse(EINVAL))?)
            .map_err(|_| refuse(EINVAL))?
            .trunc();
        let dev = self.devices.get_mut(name).ok_or(refuse(ENODEV))?;
        if remove == Some(true) {
            if let Some(p) = dev.peers.get_mut(&key) {
                p.allowed_ips.remove(&net);
            }
            return Ok(());
        }
        // An allowed IP belongs to one peer: adding it to this one moves it.
        if self.index_allowed_ips {
            let holders = self.holders.entry(name.to_owned()).or_default();
            if let Some(holder) = holders.get(&net)
                && *holder != key
                && let Some(p) = dev.peers.get_mut(holder)
            {
                p.allowed_ips.remove(&net);
            }
            if let Some(p) = dev.peers.get_mut(&key) {
                p.allowed_ips.insert(net);
                holders.insert(net, key);
            }
            return Ok(());
        }
        for (k, p) in dev.peers.iter_mut() {
            if *k != key {
                p.allowed_ips.remove(&net);
            }
        }
        if let Some(p) = dev.peers.get_mut(&key) {
            p.allowed_ips.insert(net);
        }
        Ok(())
    }

    fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
        WireguardAllowedIp(vec![
            WireguardAllowedIpAttr::Cidr(net.prefix_len()),
            WireguardAllowedIpAttr::Family(match net {
                IpNet::V4(_) => WireguardAddressFamily::Ipv4,
                IpNet::V6(_) => WireguardAddressFamily::Ipv6,
            }),
            WireguardAllowedIpAttr::IpAddr(net.network()),
        ])
    }

    /// A device dump as `wg_get_device_dump` writes it: every message starts with the
    /// device's attributes; a peer's first part has its key, preshared key, counters,
    /// keepalive, protocol version, endpoint and the allowed IPs that fit; the next message
    /// continues with only its key and more allowed IPs.
    fn dump_device(&mut self, h: &Header, w: &WireguardMessage) -> Result<(), Refused> {
        let name = self.device_name(w)?;
        let generation = self.devices.get(&name).map_or(0, |d| d.generation);
        self.sockets[Protocol::Generic.index()].dump = Some(Dump::Device {
            seq: h.seq,
            name,
            peer: None,
            ips: 0,
            generation,
        });
        Ok(())
    }

    /// One message (and datagram) of a device dump, from peer `peer` on with its first
    /// `ips` allowed IPs already sent; `true` when it ends the dump (`NLMSG_DONE` appended).
    /// A device removed between pages ends it.
    fn device_page(
        &self,
        seq: u32,
        name: &str,
        cursor: &mut Option<PublicKey>,
        sent: &mut usize,
        generation: u64,
    ) -> (Vec<u8>, bool) {
        let done = || end_message(NLMSG_DONE, seq, &AckRepr::default());
        let (Some(dev), Some(link)) = (self.devices.get(name), self.links.get(name)) else {
            return (done(), true);
        };
        let interrupted = dev.generation != generation;
        // Linux ends the dump where its peer went (the flag tells the reader to dump again).
        if interrupted && cursor.is_some_and(|k| !dev.peers.contains_key(&k)) {
            let mut end = done();
            let flags = u16::from_ne_bytes([end[6], end[7]]) | wire::NLM_F_DUMP_INTR;
            end[6..8].copy_from_slice(&flags.to_ne_bytes());
            return (end, true);
        }
        let mut head = vec![
            WireguardAttribute::ListenPort(dev.listen_port),
            WireguardAttribute::Fwmark(dev.firewall_mark),
            WireguardAttribute::IfIndex(link.index),
            WireguardAttribute::IfName(name.to_owned()),
        ];
        if let Some(k) = &dev.private_key {
            head.push(WireguardAttribute::PrivateKey(*k.as_bytes()));
            head.push(WireguardAttribute::PublicKey(*k.public_key().as_bytes()));
        }
        let head_len: usize =
            HEADER_LEN + 4 + head.iter().map(Emitable::buffer_len).sum::<usize>() + 4;
        let budget = self.dump_message_size;
        let family_id = self.wireguard_family;
        let mut peers: Vec<WireguardPeer> = Vec::new();
        let mut len = head_len;
        let flush = |peers: Vec<WireguardPeer>| {
            let mut attributes = head.clone();
            attributes.push(WireguardAttribute::Peers(peers));
            let m = WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes,
            };
            let intr = if interrupted {
                wire::NLM_F_DUMP_INTR
            } else {
                0
            };
            multipart(wire::serialize(
                &Wg {
                    family_id,
                    message: &m,
                },
                intr,
                seq,
            ))
        };
        let range = match *cursor {
            Some(k) => dev.peers.range(k..),
            None => dev.peers.range(..),
        };
        for (key, p) in range {
            // Allowed IPs of this peer that an earlier page carried.
            let skip = if *cursor == Some(*key) { *sent } else { 0 };
            let mut attrs = if skip > 0 {
                vec![WireguardPeerAttribute::PublicKey(*key.as_bytes())]
            } else {
                let stats = self.counters.get(&(name.to_owned(), *key));
                let (hs, rx, tx) =
                    stats.map_or((None, 0, 0), |s| (s.last_handshake, s.rx_bytes, s.tx_bytes));
                let since = hs
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .unwrap_or_default();
                let mut first = vec![
                    WireguardPeerAttribute::PublicKey(*key.as_bytes()),
                    WireguardPeerAttribute::PresharedKey([0; 32]),
                    WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                        seconds: since.as_secs() as i64,
                        nano_seconds: i64::from(since.subsec_nanos()),
                    }),
                    WireguardPeerAttribute::PersistentKeepalive(p.persistent_keepalive),
                    WireguardPeerAttribute::TxBytes(tx),
                    WireguardPeerAttribute::RxBytes(rx),
                    WireguardPeerAttribute::ProtocolVersion(1),
                ];
                if let Some(e) = p.endpoint {
                    first.push(WireguardPeerAttribute::Endpoint(e));
                }
                first
            };
            let peer_len = 4 + attrs.iter().map(Emitable::buffer_len).sum::<usize>() + 4;
            if len + peer_len > budget && !peers.is_empty() {
                (*cursor, *sent) = (Some(*key), skip);
                return (flush(peers), false);
            }
            len += peer_len;
            let mut ips = p.allowed_ips.iter().skip(skip).peekable();
            let mut taken = skip;
            let mut list = Vec::new();
            while let Some(net) = ips.peek() {
                let a = Self::allowed_ip(net);
                if len + a.buffer_len() > budget && !list.is_empty() {
                    break;
                }
                len += a.buffer_len();
                list.push(a);
                ips.next();
                taken += 1;
            }
            if !list.is_empty() {
                attrs.push(WireguardPeerAttribute::AllowedIps(list));
            }
            peers.push(WireguardPeer(attrs));
            if ips.peek().is_some() {
                // The rest of this peer's allowed IPs go in the next message.
                (*cursor, *sent) = (Some(*key), taken);
                return (flush(peers), false);
            }
        }
        let mut page = flush(peers);
        page.extend(done());
        (page, true)
    }

    // -----------------------------------------------------------------------------------
    // nf_tables.

    fn netfilter_message(&mut self, h: &Header, m: &[u8]) {
        let msg = match wire::parse::<NetfilterMessage>(m, "nf_tables request") {
            Ok((_, msg)) => msg,
            Err(_) => return self.answer(Protocol::Netfilter, h, m, Err(refuse(EINVAL))),
        };
        let result = match &msg.inner {
            NetfilterMessageInner::None(ControlMessage::BatchBegin) => {
                self.batch = Some(Batch {
                    tables: self.nft.clone(),
                    answers: Vec::new(),
                    failed: false,
                });
                return;
            }
            NetfilterMessageInner::None(ControlMessage::BatchEnd) => {
                if let Some(b) = self.batch.take() {
                    if !b.failed {
                        self.nft = b.tables;
                        self.generation += 1;
                    }
                    for a in b.answers {
                        self.push(Protocol::Netfilter, a);
                    }
                }
                return;
            }
            NetfilterMessageInner::NfTables(n) => {
                let family = u8::from(msg.header.family);
                if self.batch.is_some() {
                    let r = self.in_batch(h, family, n);
                    if let Some(b) = &mut self.batch {
                        b.failed |= r.is_err();
                    }
                    r
                } else {
                    self.outside_batch(h, family, n)
                }
            }
            _ => Err(refuse(EOPNOTSUPP)),
        };
        if let Ok(None) = result {
            return;
        }
        self.answer(Protocol::Netfilter, h, m, result.map(|_| ()));
    }

    fn table_name(attrs: &[TableAttribute]) -> Option<&str> {
        attrs.iter().find_map(|a| match a {
            TableAttribute::Name(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// A message of a batch; `Ok(Some(()))` is acknowledged when asked.
    fn in_batch(
        &mut self,
        h: &Header,
        family: u8,
        n: &NfTablesMessage,
    ) -> Result<Option<()>, Refused> {
        let Some(b) = &mut self.batch else {
            return Err(refuse(EINVAL));
        };
        let tables = &mut b.tables;
        match n {
            NfTablesMessage::NewTable(t) => {
                let name = Self::table_name(&t.attributes)
                    .ok_or(refuse(EINVAL))?
                    .to_owned();
                let flags = t.attributes.iter().find_map(|a| match a {
                    TableAttribute::Flags(f) => Some(f.bits()),
                    _ => None,
                });
                match tables.get_mut(&(family, name.clone())) {
                    Some(_) if h.flags & NLM_F_EXCL != 0 => return Err(refuse(EEXIST)),
                    Some(t) => t.flags = flags.unwrap_or(t.flags),
                    None => {
                        tables.insert(
                            (family, name.clone()),
                            NftTable {
                                family,
                                name,
                                flags: flags.unwrap_or(0),
                                chains: Vec::new(),
                                sets: Vec::new(),
                            },
                        );
                    }
                }
            }
            NfTablesMessage::DeleteTable(t) => {
                let name = Self::table_name(&t.attributes)
                    .ok_or(refuse(EINVAL))?
                    .to_owned();
                tables.remove(&(family, name)).ok_or(refuse(ENOENT))?;
            }
            NfTablesMessage::NewChain(_) | NfTablesMessage::NewRule(_) => {
                let msg =
                    NetfilterMessage::new(NetfilterHeader::new(family.into(), 0, 0), n.clone());
                if let NfTablesMessage::NewChain(_) = n {
                    let (_, table, chain) = nft::decode_chain(&msg).map_err(|_| refuse(EINVAL))?;
                    let t = tables.get_mut(&(family, table)).ok_or(refuse(ENOENT))?;
                    match t.chains.iter_mut().find(|c| c.name == chain.name) {
                        Some(_) if h.flags & NLM_F_EXCL != 0 => return Err(refuse(EEXIST)),
                        Some(c) => {
                            c.policy = chain.policy.or(c.policy);
                        }
                        None => t.chains.push(chain),
                    }
                } else {
                    let (_, table, chain, exprs) =
                        nft::decode_rule(&msg).map_err(|_| refuse(EINVAL))?;
                    let t = tables.get_mut(&(family, table)).ok_or(refuse(ENOENT))?;
                    let c = t
                        .chains
                        .iter_mut()
                        .find(|c| c.name == chain)
                        .ok_or(refuse(ENOENT))?;
                    if h.flags & NLM_F_APPEND != 0 {
                        c.rules.push(exprs);
                    } else {
                        c.rules.insert(0, exprs);
                    }
                }
            }
            NfTablesMessage::NewSet(_) => {
                let msg =
                    NetfilterMessage::new(NetfilterHeader::new(family.into(), 0, 0), n.clone());
                let (_, table, set) = nft::decode_set(&msg).map_err(|_| refuse(EINVAL))?;
                let t = tables.get_mut(&(family, table)).ok_or(refuse(ENOENT))?;
                match t.sets.iter().position(|s| s.name == set.name) {
                    Some(_) if h.flags & NLM_F_EXCL != 0 => return Err(refuse(EEXIST)),
                    Some(_) => {}
                    None => t.sets.push(set),
                }
            }
            NfTablesMessage::NewSetElement(_) => {
                let msg =
                    NetfilterMessage::new(NetfilterHeader::new(family.into(), 0, 0), n.clone());
                let (_, table, set, elements) =
                    nft::decode_set_elements(&msg).map_err(|_| refuse(EINVAL))?;
                let t = tables.get_mut(&(family, table)).ok_or(refuse(ENOENT))?;
                let s = t
                    .sets
                    .iter_mut()
                    .find(|s| s.name == set)
                    .ok_or(refuse(ENOENT))?;
                for e in elements {
                    // Linux refuses a key of the wrong length, and a key already there.
                    if e.key.len() != s.key_len as usize {
                        return Err(refuse(EINVAL));
                    }
                    if s.elements.iter().any(|x| x.key == e.key) {
                        return Err(refuse(EEXIST));
                    }
                    s.elements.push(e);
                }
                // Linux's interval sets dump in descending order.
                s.elements.sort_by(|a, b| b.cmp(a));
            }
            _ => return Err(refuse(EOPNOTSUPP)),
        }
        Ok(Some(()))
    }

    fn outside_batch(
        &mut self,
        h: &Header,
        family: u8,
        n: &NfTablesMessage,
    ) -> Result<Option<()>, Refused> {
        let dump = h.flags & NLM_F_DUMP == NLM_F_DUMP;
        if dump && self.dump_busy(Protocol::Netfilter) {
            return Err(refuse(16));
        }
        let of_family = |t: &NftTable| family == 0 || t.family == family;
        match n {
            NfTablesMessage::GetTable(t) if !dump => {
                let name = Self::table_name(&t.attributes).ok_or(refuse(EINVAL))?;
                let table = self
                    .nft
                    .get(&(family, name.to_owned()))
                    .ok_or(refuse(ENOENT))?;
                let reply = nft::new_table(table.family, &table.name, table.flags);
                self.reply(Protocol::Netfilter, h.seq, &reply);
            }
            NfTablesMessage::GetChain(_) if dump => {
                let messages = self
                    .nft
                    .values()
                    .filter(|t| of_family(t))
                    .flat_map(|t| {
                        t.chains.iter().map(move |c| {
                            let bare = NftChain {
                                rules: Vec::new(),
                                ..c.clone()
                            };
                            wire::serialize(&nft::new_chain(t.family, &t.name, &bare), 0, h.seq)
                        })
                    })
                    .collect();
                self.dump(Protocol::Netfilter, h.seq, messages);
                return Ok(None);
            }
            NfTablesMessage::GetRule(q) if dump => {
                // Linux filters rule dumps by table and chain when asked.
                let table = q.attributes.iter().find_map(|a| match a {
                    NftRuleAttribute::Table(t) => Some(t.as_str()),
                    _ => None,
                });
                let messages = self
                    .nft
                    .values()
                    .filter(|t| of_family(t) && table.is_none_or(|n| n == t.name))
                    .flat_map(|t| {
                        t.chains.iter().flat_map(move |c| {
                            c.rules.iter().map(move |r| {
                                wire::serialize(
                                    &nft::new_rule(t.family, &t.name, &c.name, r),
                                    0,
                                    h.seq,
                                )
                            })
                        })
                    })
                    .collect();
                self.dump(Protocol::Netfilter, h.seq, messages);
                return Ok(None);
            }
            NfTablesMessage::GetSet(q) if dump => {
                let table = q.attributes.iter().find_map(|a| match a {
                    SetAttribute::Table(t) => Some(t.as_str()),
                    _ => None,
                });
                let messages = self
                    .nft
                    .values()
                    .filter(|t| of_family(t) && table.is_none_or(|n| n == t.name))
                    .flat_map(|t| {
                        t.sets.iter().enumerate().map(move |(i, s)| {
                            let bare = NftSet {
                                elements: Vec::new(),
                                ..s.clone()
                            };
                            wire::serialize(
                                &nft::new_set(t.family, &t.name, &bare, i as u32 + 1),
                                0,
                                h.seq,
                            )
                        })
                    })
                    .collect();
                self.dump(Protocol::Netfilter, h.seq, messages);
                return Ok(None);
            }
            NfTablesMessage::GetSetElement(q) if dump => {
                let (mut table, mut set) = (None, None);
                for a in &q.attributes {
                    match a {
                        SetElementList::Table(t) => table = Some(t.clone()),
                        SetElementList::Set(s) => set = Some(s.clone()),
                        _ => {}
                    }
                }
                let (Some(table), Some(set)) = (table, set) else {
                    return Err(refuse(EINVAL));
                };
                let s = self
                    .nft
                    .get(&(family, table.clone()))
                    .and_then(|t| t.sets.iter().find(|s| s.name == set))
                    .ok_or(refuse(ENOENT))?;
                // Several messages, as Linux pages a large set.
                let messages = s
                    .elements
                    .chunks(100)
                    .map(|chunk| {
                        wire::serialize(
                            &nft::new_set_elements(family, &table, &set, chunk),
                            0,
                            h.seq,
                        )
                    })
                    .collect();
                self.dump(Protocol::Netfilter, h.seq, messages);
                return Ok(None);
            }
            NfTablesMessage::GetGen(_) => {
                let reply = NetfilterMessage::new(
                    NetfilterHeader::new(0.into(), 0, 0),
                    NfTablesMessage::NewGen(GenMessage {
                        attributes: vec![GenAttribute::Id(self.generation)],
                    }),
                );
                self.reply(Protocol::Netfilter, h.seq, &reply);
            }
            // Changes are made in batches only.
            _ => return Err(refuse(EOPNOTSUPP)),
        }
        Ok(Some(()))
    }
}

impl KernelIo for FakeKernel {
    fn send(&mut self, protocol: Protocol, datagram: &[u8]) -> io::Result<()> {
        self.datagrams += 1;
        for (h, m) in wire::messages(datagram) {
            self.received += 1;
            if !Self::is_delimiter(protocol, &h) {
                if let Some(refusal) = self.take_fault() {
                    if let (Protocol::Netfilter, Some(b)) = (protocol, &mut self.batch) {
                        b.failed = true;
                    }
                    self.answer(protocol, &h, m, Err(refusal));
                    continue;
                }
            }
            match protocol {
                Protocol::Route => self.route_message(&h, m),
                Protocol::Generic => self.generic_message(&h, m),
                Protocol::Netfilter => self.netfilter_message(&h, m),
            }
        }
        Ok(())
    }

    fn recv(&mut self, protocol: Protocol, buf: &mut Vec<u8>) -> io::Result<()> {
        let next = match self.recv_queued(protocol) {
            Some(d) => Some(d?),
            None => {
                let mut dump = self.take_dump(protocol);
                let page = self.next_page(&mut dump);
                self.put_dump(protocol, dump);
                page
            }
        };
        match next {
            Some(d) => {
                *buf = d;
                Ok(())
            }
            // A real socket would wait until its timeout.
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the fake kernel has nothing to say",
            )),
        }
    }

    fn read_sysctl(&mut self, key: &str) -> io::Result<Option<String>> {
        Ok(self.sysctls.get(key).cloned())
    }

    fn write_sysctl(&mut self, key: &str, value: &str) -> io::Result<()> {
        match self.sysctls.get_mut(key) {
            Some(v) => {
                *v = value.trim().to_owned();
                Ok(())
            }
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::{RECORDED_RULES, recorded_dump, unhex};
    use std::collections::BTreeMap;

    fn datagrams(k: &mut FakeKernel, protocol: Protocol) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while k.recv(protocol, &mut buf).is_ok() {
            out.push(std::mem::take(&mut buf));
        }
        out
    }

    fn replies(k: &mut FakeKernel, protocol: Protocol) -> Vec<Vec<u8>> {
        datagrams(k, protocol)
            .iter()
            .flat_map(|d| {
                wire::messages(d)
                    .filter(|(h, _)| h.message_type != NLMSG_DONE)
                    .map(|(_, m)| m.to_vec())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn clamped(v: u8) -> PrivateKey {
        let mut b = [v; 32];
        b[0] &= 248;
        b[31] = (b[31] & 127) | 64;
        PrivateKey::from_bytes(b).unwrap()
    }

    /// Every datagram a [`crate::testing::SharedKernel`] handle has to read.
    fn shared_datagrams(k: &mut crate::testing::SharedKernel, p: Protocol) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while k.recv(p, &mut buf).is_ok() {
            out.push(std::mem::take(&mut buf));
        }
        out
    }

    /// A route dump through a shared kernel is made page by page as it is read, the kernel
    /// unlocked between pages (as Linux does): another handle's request runs in between and
    /// shows on the later pages, and a second dump on the same socket is refused meanwhile.
    /// A dump made whole at the request (the earlier fake) misses the route added after it.
    #[test]
    fn shared_route_dumps_are_made_page_by_page() {
        let shared = crate::testing::SharedKernel::new(FakeKernel::new());
        let v4 = |i: u32| IpNet::new([10, (i / 256) as u8, (i % 256) as u8, 0].into(), 24).unwrap();
        let route =
            |net| crate::testing::route(Family::V4, 1000, net, ActualRouteKind::Unicast, Some(1));
        for i in 0..2000 {
            let r = route(v4(i));
            shared.kernel().routes.insert(route_key(&r), r);
        }
        let mut reader = shared.handle();
        let (flags, req) = crate::wire::route::route_dump(Family::V4);
        reader
            .send(Protocol::Route, &wire::serialize(&req, flags, 1))
            .unwrap();
        let mut first = Vec::new();
        reader.recv(Protocol::Route, &mut first).unwrap();
        let in_first = wire::messages(&first).count();
        assert!(
            in_first > 1 && in_first < 2000,
            "{in_first} routes on the first page"
        );
        // Busy: this socket has a dump unread.
        reader
            .send(Protocol::Route, &wire::serialize(&req, flags, 2))
            .unwrap();
        let mut busy = Vec::new();
        reader.recv(Protocol::Route, &mut busy).unwrap();
        let (h, m) = wire::messages(&busy).next().unwrap();
        assert_eq!(h.message_type, NLMSG_ERROR);
        assert_eq!(
            i32::from_ne_bytes(m[HEADER_LEN..HEADER_LEN + 4].try_into().unwrap()),
            -16
        );
        // Another handle's change between the pages: behind the dump's position (not seen,
        // as in Linux) and ahead of it (seen).
        let mut other = shared.handle();
        let (behind, ahead) = (route("10.0.0.128/25".parse().unwrap()), route(v4(4000)));
        {
            let mut k = shared.kernel();
            k.routes.insert(route_key(&behind), behind);
            k.routes.insert(route_key(&ahead), ahead);
        }
        let (flags, req) = crate::wire::route::rule_dump(Family::V4);
        other
            .send(Protocol::Route, &wire::serialize(&req, flags, 3))
            .unwrap();
        assert!(!shared_datagrams(&mut other, Protocol::Route).is_empty());
        let rest = shared_datagrams(&mut reader, Protocol::Route);
        let routes = std::iter::once(&first)
            .chain(&rest)
            .flat_map(|d| {
                wire::messages(d)
                    .map(|(h, _)| h.message_type)
                    .collect::<Vec<_>>()
            })
            .filter(|t| *t != NLMSG_DONE)
            .count();
        assert_eq!(
            routes, 2001,
            "the 2,000 routes and the one added ahead of the dump"
        );
        let done = wire::messages(rest.last().unwrap()).last().unwrap().0;
        assert_eq!(done.message_type, NLMSG_DONE);
        // The socket is free again.
        reader
            .send(Protocol::Route, &wire::serialize(&req, flags, 4))
            .unwrap();
        assert_eq!(shared_datagrams(&mut reader, Protocol::Route).len(), 1);
    }

    /// A WireGuard device dump through a shared kernel is made a message at a time as it is
    /// read, a peer's allowed IPs continued over several messages: merged, it is the device
    /// as it is when each page is made (a peer added between pages ahead of the dump shows).
    #[test]
    fn shared_device_dumps_are_made_page_by_page() {
        let mut k = FakeKernel::new();
        k.add_link("wg0", Some("wireguard"), 1420, true);
        k.dump_message_size = 1024;
        let mut keys: Vec<PublicKey> = (1..=4u8).map(|v| clamped(v).public_key()).collect();
        keys.sort();
        let dev = k.devices.get_mut("wg0").unwrap();
        for (n, key) in keys[..3].iter().enumerate() {
            let mut peer = ActualPeer::default();
            for i in 0..150u8 {
                peer.allowed_ips
                    .insert(IpNet::new([10, n as u8, i, 0].into(), 24).unwrap());
            }
            dev.peers.insert(*key, peer);
        }
        let family = k.wireguard_family;
        let shared = crate::testing::SharedKernel::new(k);
        let mut reader = shared.handle();
        let (flags, req) = crate::wire::genl::wg_get("wg0");
        let req = crate::wire::genl::Wg {
            family_id: family,
            message: &req,
        };
        reader
            .send(Protocol::Generic, &wire::serialize(&req, flags, 1))
            .unwrap();
        let mut first = Vec::new();
        reader.recv(Protocol::Generic, &mut first).unwrap();
        // The last key, added after the first page (which cannot hold three peers' 450
        // allowed IPs).
        let mut late = ActualPeer::default();
        late.allowed_ips.insert("10.9.0.0/24".parse().unwrap());
        shared
            .kernel()
            .devices
            .get_mut("wg0")
            .unwrap()
            .peers
            .insert(keys[3], late);
        let rest = shared_datagrams(&mut reader, Protocol::Generic);
        assert!(rest.len() >= 3, "{} more pages", rest.len());
        let mut dev = crate::state::ActualDevice::default();
        for d in std::iter::once(&first).chain(&rest) {
            for (h, m) in wire::messages(d) {
                if h.message_type == NLMSG_DONE {
                    continue;
                }
                let mut m = wire::parse::<GenlMessage<WireguardMessage>>(m, "dump")
                    .unwrap()
                    .1;
                crate::wire::genl::merge_device(&mut m.payload, &mut dev).unwrap();
            }
        }
        let got: Vec<(PublicKey, usize)> = dev
            .peers
            .iter()
            .map(|(k, p)| (*k, p.allowed_ips.len()))
            .collect();
        assert_eq!(
            got,
            [(keys[0], 150), (keys[1], 150), (keys[2], 150), (keys[3], 1)]
        );
    }

    /// The fake kernel dumps rules with the bytes Linux 6.1 dumped for the same rules.
    #[test]
    #[cfg(target_endian = "little")]
    fn rule_dumps_are_linuxs_bytes() {
        for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
            let mut k = FakeKernel::new();
            k.rules.clear();
            let mut ours = FakeRule::lookup(family, 99, 1);
            ours.invert = true;
            ours.firewall_mark = 0x100000;
            ours.firewall_mask = 0x100000;
            let mut stray = FakeRule::lookup(family, 99, 1);
            stray.source = Some(match family {
                Family::V4 => "10.0.0.0/8".parse().unwrap(),
                Family::V6 => "fd00::/8".parse().unwrap(),
            });
            k.rules = vec![ours, stray];
            let (flags, req) = crate::wire::route::rule_dump(family);
            k.send(Protocol::Route, &wire::serialize(&req, flags, 1))
                .unwrap();
            let got: Vec<Vec<u8>> = replies(&mut k, Protocol::Route)
                .iter()
                .map(|m| m[HEADER_LEN..].to_vec())
                .collect();
            let (a, b) = RECORDED_RULES[i];
            assert_eq!(got, [unhex(a), unhex(b)], "{family}");
        }
    }

    /// The fake kernel dumps the recorded device's configuration as Linux did: the same model
    /// once merged, the same device attributes and the same bytes for a peer's first part
    /// (key, preshared key, handshake, keepalive, counters, version, endpoint).
    #[test]
    #[cfg(target_endian = "little")]
    fn device_dumps_are_linuxs() {
        let mut k = FakeKernel::new();
        while k.next_index < 3 {
            k.add_link(&format!("dummy{}", k.next_index), Some("dummy"), 1500, true);
        }
        k.add_link("wg0", Some("wireguard"), 1420, true);
        let (b, c) = (clamped(0x10).public_key(), clamped(0x18).public_key());
        let dev = k.devices.get_mut("wg0").unwrap();
        dev.private_key = Some(clamped(0x08));
        dev.listen_port = 51820;
        dev.firewall_mark = 0x100000;
        let mut pb = ActualPeer {
            endpoint: Some("10.0.0.2:51820".parse().unwrap()),
            ..Default::default()
        };
        pb.allowed_ips.insert("10.65.0.64/26".parse().unwrap());
        for i in 1..=150u8 {
            pb.allowed_ips
                .insert(IpNet::new([10, 66, 0, i].into(), 32).unwrap());
        }
        let mut pc = ActualPeer {
            endpoint: Some("10.0.0.3:51820".parse().unwrap()),
            ..Default::default()
        };
        pc.allowed_ips.insert("10.65.0.128/26".parse().unwrap());
        dev.peers.insert(b, pb);
        dev.peers.insert(c, pc);
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(1_795_648_738, 566_523_889);
        k.set_peer_stats(PeerStats::new("wg0", b, Some(at), 476, 532));
        k.dump_message_size = 4096;

        let (flags, req) = crate::wire::genl::wg_get("wg0");
        let req = crate::wire::genl::Wg {
            family_id: WG_FAMILY_ID,
            message: &req,
        };
        k.send(Protocol::Generic, &wire::serialize(&req, flags, 1))
            .unwrap();
        let ours = replies(&mut k, Protocol::Generic);
        let theirs = recorded_dump();
        assert!(ours.len() >= 2, "split over several messages");
        let merge = |parts: &[Vec<u8>]| {
            let mut dev = crate::state::ActualDevice::default();
            let mut stats = BTreeMap::new();
            for p in parts {
                let mut m = wire::parse::<GenlMessage<WireguardMessage>>(p, "dump")
                    .unwrap()
                    .1;
                crate::wire::genl::merge_stats(&mut m.payload.clone(), "wg0", &mut stats).unwrap();
                crate::wire::genl::merge_device(&mut m.payload, &mut dev).unwrap();
            }
            (dev, stats)
        };
        assert_eq!(merge(&ours), merge(&theirs));
        // The genl header and the device's attributes (port, fwmark, index, name, keys: 104
        // bytes), and B's first part up to its allowed IPs, byte for byte.
        assert_eq!(
            &ours[0][HEADER_LEN..HEADER_LEN + 108],
            &theirs[0][HEADER_LEN..HEADER_LEN + 108]
        );
        let b_at = |m: &[u8]| m.windows(32).position(|w| w == b.as_bytes()).unwrap();
        let (o, t) = (b_at(&ours[0]), b_at(&theirs[0]));
        assert_eq!(&ours[0][o..o + 148], &theirs[0][t..t + 148]);
    }

    #[test]
    fn a_second_dump_before_the_first_is_read_is_ebusy() {
        let mut k = FakeKernel::new();
        let (flags, req) = crate::wire::route::rule_dump(Family::V4);
        k.send(Protocol::Route, &wire::serialize(&req, flags, 1))
            .unwrap();
        k.send(Protocol::Route, &wire::serialize(&req, flags, 2))
            .unwrap();
        let answers: Vec<(u16, u32)> = datagrams(&mut k, Protocol::Route)
            .iter()
            .flat_map(|d| {
                wire::messages(d)
                    .map(|(h, m)| {
                        let code = if h.message_type == NLMSG_ERROR {
                            i32::from_ne_bytes([m[16], m[17], m[18], m[19]])
                        } else {
                            0
                        };
                        (h.message_type, (h.seq << 8) | u32::from(code == -16))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        // The refusal of the second (seq 2, EBUSY) comes first: it is not part of the dump.
        assert_eq!(answers[0], (NLMSG_ERROR, (2 << 8) | 1));
        assert!(answers[1..].iter().all(|(_, s)| s >> 8 == 1));
        assert_eq!(answers.last().map(|a| a.0), Some(NLMSG_DONE));
    }
}
