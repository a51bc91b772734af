//! rtnetlink links, routes and rules, as `netlink-packet-route` messages, and their
//! translation to and from wgmesh's model ([`ActualLink`], [`ActualRoute`], [`ActualRule`]).

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType as RtType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use wgmesh_core::{Family, Route, RouteType, Rule};

use super::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST};
use crate::diff::route_metric;
use crate::error::DecodeError;
use crate::state::{ActualLink, ActualRoute, ActualRouteKind, ActualRule, LinkKind, RawRule};

/// An rtnetlink request: the message and its header flags.
pub(crate) type RtRequest = (u16, RouteNetlinkMessage);

const ACKED: u16 = NLM_F_REQUEST | NLM_F_ACK;

/// The address family of a wgmesh family.
pub(crate) fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn family_of(af: AddressFamily) -> Option<Family> {
    match af {
        AddressFamily::Inet => Some(Family::V4),
        AddressFamily::Inet6 => Some(Family::V6),
        _ => None,
    }
}

fn link_by_name(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    m
}

/// `RTM_GETLINK` of one link by name (answered by `RTM_NEWLINK` then an ack, or `ENODEV`).
pub(crate) fn link_get(name: &str) -> RtRequest {
    (ACKED, RouteNetlinkMessage::GetLink(link_by_name(name)))
}

/// `RTM_NEWLINK` creating a link of `kind`, with this MTU, up.
pub(crate) fn link_create(name: &str, kind: LinkKind, mtu: u32) -> RtRequest {
    let mut m = link_by_name(name);
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    m.attributes.push(LinkAttribute::Mtu(mtu));
    m.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(match kind {
            LinkKind::Wireguard => InfoKind::Wireguard,
            LinkKind::Tun => InfoKind::Tun,
        })]));
    (
        ACKED | NLM_F_CREATE | NLM_F_EXCL,
        RouteNetlinkMessage::NewLink(m),
    )
}

/// `RTM_NEWLINK` marking a link wgmesh just made as its own (`IFLA_IFALIAS`; Linux takes an
/// alias only on an existing link, not in the request that creates it).
pub(crate) fn link_mark(name: &str) -> RtRequest {
    let mut m = link_by_name(name);
    m.attributes
        .push(LinkAttribute::IfAlias(crate::state::LINK_MARKER.to_owned()));
    (ACKED, RouteNetlinkMessage::NewLink(m))
}

/// `RTM_NEWLINK` changing an existing link (found by name): MTU and/or up.
pub(crate) fn link_set(name: &str, mtu: Option<u32>, up: bool) -> RtRequest {
    let mut m = link_by_name(name);
    if up {
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
    }
    if let Some(mtu) = mtu {
        m.attributes.push(LinkAttribute::Mtu(mtu));
    }
    (ACKED, RouteNetlinkMessage::NewLink(m))
}

/// `RTM_DELLINK` of a link by name.
pub(crate) fn link_delete(name: &str) -> RtRequest {
    (ACKED, RouteNetlinkMessage::DelLink(link_by_name(name)))
}

/// A link as wgmesh models it: `(name, link)`.
pub(crate) fn parse_link(m: &LinkMessage) -> Result<(String, ActualLink), DecodeError> {
    let mut name = None;
    let (mut mtu, mut kind, mut alias) = (0, None, None);
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::IfAlias(a) if !a.is_empty() => alias = Some(a.clone()),
            LinkAttribute::Mtu(v) => mtu = *v,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    let name = name.ok_or(DecodeError::Missing {
        what: "RTM_NEWLINK",
        missing: "IFLA_IFNAME",
    })?;
    Ok((
        name,
        ActualLink {
            index: m.header.index,
            kind,
            mtu,
            up: m.header.flags.contains(LinkFlags::Up),
            alias,
            addresses: Vec::new(),
        },
    ))
}

/// `RTM_GETADDR` dump of every address of both families.
pub(crate) fn address_dump() -> RtRequest {
    (
        NLM_F_REQUEST | NLM_F_DUMP,
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
    )
}

/// An address as `(interface index, prefix)`; `None` for IPv6 link-local addresses (the
/// kernel's own) and families other than IPv4 and IPv6.
pub(crate) fn parse_address(m: &AddressMessage) -> Result<Option<(u32, IpNet)>, DecodeError> {
    if family_of(m.header.family).is_none() {
        return Ok(None);
    }
    // A point-to-point address has its own side in IFA_LOCAL and the peer in IFA_ADDRESS.
    let mut address = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => address = Some(*ip),
            AddressAttribute::Address(ip) if address.is_none() => address = Some(*ip),
            _ => {}
        }
    }
    let ip = address.ok_or(DecodeError::Missing {
        what: "RTM_NEWADDR",
        missing: "IFA_ADDRESS",
    })?;
    if let IpAddr::V6(v6) = ip {
        if v6.is_unicast_link_local() {
            return Ok(None);
        }
    }
    let net = IpNet::new(ip, m.header.prefix_len)
        .map_err(|e| DecodeError::invalid("RTM_NEWADDR prefix length", e))?;
    Ok(Some((m.header.index, net)))
}

/// `RTM_GETROUTE` dump of a family (every table; filtered when parsed).
pub(crate) fn route_dump(family: Family) -> RtRequest {
    let mut m = RouteMessage::default();
    m.header.address_family = address_family(family);
    (NLM_F_REQUEST | NLM_F_DUMP, RouteNetlinkMessage::GetRoute(m))
}

/// A route message naming a route by destination, table and metric (and output device).
fn route_message(
    family: Family,
    destination: &IpNet,
    table: u32,
    metric: u32,
    oif: Option<u32>,
) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = address_family(family);
    m.header.destination_prefix_length = destination.prefix_len();
    // Tables above 255 live in RTA_TABLE only; the header says RT_TABLE_UNSPEC.
    m.header.table = u8::try_from(table).unwrap_or(0);
    m.attributes = vec![
        RouteAttribute::Destination(RouteAddress::from(destination.network())),
        RouteAttribute::Table(table),
        RouteAttribute::Priority(metric),
    ];
    m.attributes.extend(oif.map(RouteAttribute::Oif));
    m
}

/// `RTM_NEWROUTE` with `NLM_F_REPLACE`: add the route, or replace the one with the same
/// destination, table, TOS and metric in place. `oif` is the output device of a unicast
/// route.
pub(crate) fn route_replace(route: &Route, oif: Option<u32>) -> RtRequest {
    let mut m = route_message(
        route.family,
        &route.destination,
        route.table,
        route_metric(route.family),
        oif,
    );
    m.header.protocol = RouteProtocol::Static;
    (m.header.scope, m.header.kind) = match (route.kind, route.family) {
        (RouteType::Unicast, Family::V4) => (RouteScope::Link, RtType::Unicast),
        (RouteType::Unicast, Family::V6) => (RouteScope::Universe, RtType::Unicast),
        (RouteType::Throw, _) => (RouteScope::Universe, RtType::Throw),
        (RouteType::Blackhole, _) => (RouteScope::Universe, RtType::BlackHole),
    };
    (
        ACKED | NLM_F_CREATE | NLM_F_REPLACE,
        RouteNetlinkMessage::NewRoute(m),
    )
}

/// `RTM_DELROUTE` of exactly this route.
pub(crate) fn route_delete(route: &ActualRoute) -> RtRequest {
    let mut m = route_message(
        route.family,
        &route.destination,
        route.table,
        route.metric,
        route.oif,
    );
    m.header.tos = route.tos;
    m.header.scope = RouteScope::NoWhere;
    m.header.kind = match route.kind {
        ActualRouteKind::Unicast => RtType::Unicast,
        ActualRouteKind::Throw => RtType::Throw,
        ActualRouteKind::Blackhole => RtType::BlackHole,
        ActualRouteKind::Other(n) => RtType::from(n),
    };
    (ACKED, RouteNetlinkMessage::DelRoute(m))
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn unspecified(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::from([0u8; 4]),
        Family::V6 => IpAddr::from([0u8; 16]),
    }
}

/// A route of table `table` as wgmesh models it; `None` for routes of other tables or
/// families.
pub(crate) fn parse_route(
    m: &RouteMessage,
    table: u32,
) -> Result<Option<ActualRoute>, DecodeError> {
    let Some(family) = family_of(m.header.address_family) else {
        return Ok(None);
    };
    let mut tbl = u32::from(m.header.table);
    let (mut dst, mut oif, mut gateway, mut metric) = (None, None, None, 0);
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => tbl = *t,
            RouteAttribute::Destination(d) => dst = ip_of(d),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            // A multipath or `via` route is never one of wgmesh's: mark it with a gateway.
            RouteAttribute::MultiPath(_) | RouteAttribute::Via(_) => {
                gateway = Some(unspecified(family))
            }
            _ => {}
        }
    }
    if tbl != table {
        return Ok(None);
    }
    let destination = IpNet::new(
        dst.unwrap_or(unspecified(family)),
        m.header.destination_prefix_length,
    )
    .map_err(|e| DecodeError::invalid("RTM_NEWROUTE destination", e))?;
    Ok(Some(ActualRoute {
        family,
        table: tbl,
        destination,
        kind: match m.header.kind {
            RtType::Unicast => ActualRouteKind::Unicast,
            RtType::Throw => ActualRouteKind::Throw,
            RtType::BlackHole => ActualRouteKind::Blackhole,
            other => ActualRouteKind::Other(u8::from(other)),
        },
        device: None,
        oif,
        gateway,
        metric,
        tos: m.header.tos,
    }))
}

/// `RTM_GETRULE` dump of a family.
pub(crate) fn rule_dump(family: Family) -> RtRequest {
    let mut m = RuleMessage::default();
    m.header.family = address_family(family);
    (NLM_F_REQUEST | NLM_F_DUMP, RouteNetlinkMessage::GetRule(m))
}

/// `RTM_NEWRULE`, action "to table" set explicitly. `exclusive` adds `NLM_F_EXCL` (the
/// kernel ignores `NLM_F_REPLACE` for rules); without it Linux adds the rule even when an
/// identical one exists, after every rule of the same priority.
pub(crate) fn rule_add(rule: &Rule, exclusive: bool) -> RtRequest {
    let mut m = RuleMessage::default();
    m.header.family = address_family(rule.family);
    m.header.table = u8::try_from(rule.table).unwrap_or(0);
    m.header.action = RuleAction::ToTable;
    if rule.invert {
        m.header.flags = RuleFlags::Invert;
    }
    m.attributes = vec![
        RuleAttribute::Priority(rule.priority),
        RuleAttribute::FwMark(rule.firewall_mark),
        RuleAttribute::FwMask(rule.firewall_mask),
        RuleAttribute::Table(rule.table),
    ];
    let excl = if exclusive { NLM_F_EXCL } else { 0 };
    (ACKED | NLM_F_CREATE | excl, RouteNetlinkMessage::NewRule(m))
}

/// `RTM_DELRULE` of a rule as found: its dump sent back when there is one ([`RawRule`]: so
/// every selector it has is named), else its modelled fields.
pub(crate) fn rule_delete(rule: &ActualRule) -> RtRequest {
    if let Some(m) = rule.raw.message() {
        return (ACKED, RouteNetlinkMessage::DelRule(m.clone()));
    }
    let mut m = RuleMessage::default();
    m.header.family = address_family(rule.family);
    m.header.table = u8::try_from(rule.table).unwrap_or(0);
    m.header.action = RuleAction::from(rule.action);
    if rule.invert {
        m.header.flags = RuleFlags::Invert;
    }
    m.attributes.push(RuleAttribute::Priority(rule.priority));
    if let Some(v) = rule.firewall_mark {
        m.attributes.push(RuleAttribute::FwMark(v));
    }
    if let Some(v) = rule.firewall_mask {
        m.attributes.push(RuleAttribute::FwMask(v));
    }
    m.attributes.push(RuleAttribute::Table(rule.table));
    (ACKED, RouteNetlinkMessage::DelRule(m))
}

/// A rule pointing at `table` as wgmesh models it, keeping its dump; `None` for rules of other
/// tables or families.
pub(crate) fn parse_rule(m: &RuleMessage, table: u32) -> Option<ActualRule> {
    let family = family_of(m.header.family)?;
    let h = &m.header;
    let mut r = ActualRule {
        family,
        priority: 0,
        table: u32::from(h.table),
        firewall_mark: None,
        firewall_mask: None,
        invert: h.flags.contains(RuleFlags::Invert),
        action: u8::from(h.action),
        other_selectors: h.dst_len != 0 || h.src_len != 0 || h.tos != 0,
        raw: RawRule::default(),
    };
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => r.priority = *p,
            RuleAttribute::FwMark(v) => r.firewall_mark = Some(*v),
            RuleAttribute::FwMask(v) => r.firewall_mask = Some(*v),
            RuleAttribute::Table(t) => r.table = *t,
            // What selects packets: addresses, interfaces, tunnel id, l3mdev, uid range, ip
            // protocol, port ranges. wgmesh's rules have none.
            RuleAttribute::Destination(_)
            | RuleAttribute::Source(_)
            | RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::TunId(_)
            | RuleAttribute::L3MDev(_)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_) => r.other_selectors = true,
            _ => {}
        }
    }
    if r.table != table {
        return None;
    }
    r.raw = RawRule::new(m.clone());
    Some(r)
}

/// Any rule, whatever table it points at (a foreign one: its raw form is not kept).
pub(crate) fn parse_foreign_rule(m: &RuleMessage) -> Option<ActualRule> {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    let mut r = parse_rule(m, table)?;
    r.raw = RawRule::default();
    Some(r)
}
