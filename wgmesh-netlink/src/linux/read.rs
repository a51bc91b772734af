//! The read side: what the host has of wgmesh's objects, from rtnetlink, WireGuard and
//! nf_tables dumps (or the userspace socket), parsed with the same crates' types.

use std::collections::{BTreeMap, HashMap};

use netlink_packet_generic::GenlMessage;
use netlink_packet_netfilter::NetfilterMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_wireguard::WireguardMessage;
use wgmesh_core::Family;

use super::{Driver, Linux, parse};
use crate::error::{EAFNOSUPPORT, ENODEV, ENOENT, EOPNOTSUPP, EPROTONOSUPPORT, Error, Result};
use crate::exec::Answer;
use crate::io::KernelIo;
use crate::lower::{self};
use crate::marking::{Expr, FAMILIES, NftSet, NftTable};
use crate::state::{ActualDevice, ActualLink, ActualRoute, ActualState, Ownership, PeerStats};
use crate::wire::Protocol;
use crate::wire::genl::{self, Wg};
use crate::wire::nft::{self, NftRequest};
use crate::wire::route::{self, RtRequest};

impl<K: KernelIo> Linux<K> {
    /// A kernel WireGuard device's configuration (`None`: no such device).
    pub(super) fn kernel_device(
        &mut self,
        family_id: u16,
        ifname: &str,
    ) -> Result<Option<ActualDevice>> {
        let mut dev = ActualDevice::default();
        let found = self.wg_dump(family_id, ifname, "", |m| genl::merge_device(m, &mut dev))?;
        Ok(found.then_some(dev))
    }

    /// A kernel WireGuard device's peer counters.
    fn kernel_stats(&mut self, family_id: u16, ifname: &str) -> Result<Vec<PeerStats>> {
        let mut stats = BTreeMap::new();
        self.wg_dump(family_id, ifname, " counters", |m| {
            genl::merge_stats(m, ifname, &mut stats)
        })?;
        Ok(stats.into_values().collect())
    }

    /// Dumps a WireGuard device and hands each part to `merge` (which wipes its private
    /// key) as it arrives. `Ok(false)` when there is no such device.
    fn wg_dump(
        &mut self,
        family_id: u16,
        ifname: &str,
        what: &str,
        mut merge: impl FnMut(&mut WireguardMessage) -> std::result::Result<(), crate::DecodeError>,
    ) -> Result<bool> {
        let doing = format!("read WireGuard device {ifname}{what}");
        let (flags, m) = genl::wg_get(ifname);
        let req = self.pipeline.message(
            Protocol::Generic,
            flags,
            &Wg {
                family_id,
                message: &m,
            },
        );
        let out = self.transact_each(Protocol::Generic, &[req], &doing, &mut |_, p| {
            let mut parsed: GenlMessage<WireguardMessage> = parse(p, "WG_CMD_GET_DEVICE", &doing)?;
            merge(&mut parsed.payload).map_err(|e| Error::decode(&doing, e))
        });
        // The replies were parsed straight from the receive buffer: it held the key.
        self.pipeline.wipe_buffer();
        match out?.pop() {
            Some(Ok(())) => Ok(true),
            Some(Err(r)) if r.errno == ENODEV || r.errno == ENOENT => Ok(false),
            Some(Err(r)) => Err(r.error(doing)),
            None => Ok(false),
        }
    }

    /// The links of these names that exist (one `RTM_GETLINK` each, pipelined).
    pub(super) fn read_links(&mut self, names: &[String]) -> Result<HashMap<String, ActualLink>> {
        let reqs: Vec<RtRequest> = names.iter().map(|n| route::link_get(n)).collect();
        let out = self.rt(&reqs, "read links")?;
        let mut links = HashMap::new();
        for (name, answer) in names.iter().zip(out) {
            let doing = format!("read link {name}");
            match answer {
                Ok(replies) => {
                    for r in replies {
                        let RouteNetlinkMessage::NewLink(m) = parse(&r, "RTM_NEWLINK", &doing)?
                        else {
                            continue;
                        };
                        let (n, l) = route::parse_link(&m).map_err(|e| Error::decode(&doing, e))?;
                        if &n == name {
                            links.insert(n, l);
                        }
                    }
                }
                Err(r) if r.errno == ENODEV => {}
                Err(r) => return Err(r.error(doing)),
            }
        }
        if !links.is_empty() {
            // Whether a link is wgmesh's depends on its addresses too (it has none).
            let by_index: HashMap<u32, String> =
                links.iter().map(|(n, l)| (l.index, n.clone())).collect();
            let doing = "dump addresses";
            self.dump(route::address_dump(), doing, &mut |r| {
                let RouteNetlinkMessage::NewAddress(m) = parse(r, "RTM_NEWADDR", doing)? else {
                    return Ok(());
                };
                if let Some((index, net)) =
                    route::parse_address(&m).map_err(|e| Error::decode(doing, e))?
                {
                    if let Some(l) = by_index.get(&index).and_then(|n| links.get_mut(n)) {
                        l.addresses.push(net);
                    }
                }
                Ok(())
            })?;
        }
        Ok(links)
    }

    /// One rtnetlink dump, each reply handed to `each` as it arrives (`Ok(false)`: the
    /// family is not there, e.g. no IPv6).
    fn dump(
        &mut self,
        req: RtRequest,
        doing: &str,
        each: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<bool> {
        let (flags, m) = req;
        let req = self.pipeline.message(Protocol::Route, flags, &m);
        self.messages += 1;
        match self
            .transact_each(Protocol::Route, &[req], doing, &mut |_, r| each(r))?
            .pop()
        {
            Some(Ok(())) => Ok(true),
            // A kernel without IPv6 has no IPv6 routes or rules.
            Some(Err(r)) if r.errno == EOPNOTSUPP || r.errno == EAFNOSUPPORT => Ok(false),
            Some(Err(r)) => Err(r.error(doing)),
            None => Ok(false),
        }
    }

    /// One nf_tables request and its answer.
    fn nft(&mut self, req: NftRequest, doing: &str) -> Result<Answer> {
        let (flags, m) = req;
        let out = self.pipeline.message(Protocol::Netfilter, flags, &m);
        Ok(self
            .transact(Protocol::Netfilter, &[out], None, doing)?
            .pop()
            .unwrap_or(Ok(Vec::new())))
    }

    /// wgmesh's nftables tables named `table`, with their chains and rules.
    pub(super) fn read_nft(&mut self, table: &str) -> Result<Vec<NftTable>> {
        let doing = format!("read nftables tables {table}");
        let mut tables = Vec::new();
        for family in FAMILIES {
            match self.nft(nft::get_table(family, table), &doing)? {
                Ok(replies) => {
                    if let Some(r) = replies.first() {
                        let m: NetfilterMessage = parse(r, "NEWTABLE", &doing)?;
                        let (_, _, flags) =
                            nft::decode_table(&m).map_err(|e| Error::decode(&doing, e))?;
                        tables.push(NftTable {
                            family,
                            name: table.to_owned(),
                            flags,
                            chains: Vec::new(),
                            sets: Vec::new(),
                        });
                    }
                }
                Err(r) if r.errno == ENOENT => {}
                // A kernel without nf_tables has no table of ours.
                Err(r) if r.errno == EPROTONOSUPPORT || r.errno == EOPNOTSUPP => {}
                Err(r) => return Err(r.error(doing)),
            }
        }
        // Only wgmesh's tables: chains of their families (Linux filters chain dumps by family
        // only), rules of their table (filtered by the kernel). One dump at a time per socket.
        let families: Vec<u8> = tables.iter().map(|t| t.family).collect();
        for family in families {
            let replies = self
                .nft(nft::dump_chains(family, table), &doing)?
                .map_err(|r| r.error(&doing))?;
            for r in replies {
                let m: NetfilterMessage = parse(&r, "NEWCHAIN", &doing)?;
                let (fam, tbl, c) = nft::decode_chain(&m).map_err(|e| Error::decode(&doing, e))?;
                if let Some(t) = tables.iter_mut().find(|t| t.family == fam && tbl == table) {
                    t.chains.push(c);
                }
            }
            let replies = self
                .nft(nft::dump_rules(family, table), &doing)?
                .map_err(|r| r.error(&doing))?;
            for r in replies {
                let m: NetfilterMessage = parse(&r, "NEWRULE", &doing)?;
                let (fam, tbl, chain, exprs) =
                    nft::decode_rule(&m).map_err(|e| Error::decode(&doing, e))?;
                if let Some(c) = tables
                    .iter_mut()
                    .find(|t| t.family == fam && tbl == table)
                    .and_then(|t| t.chains.iter_mut().find(|c| c.name == chain))
                {
                    c.rules.push(exprs);
                }
            }
            // Sets only when a rule looks one up: a table without sets reads as before.
            let Some(t) = tables.iter_mut().find(|t| t.family == family) else {
                continue;
            };
            let looks_up = t
                .chains
                .iter()
                .flat_map(|c| c.rules.iter().flatten())
                .any(|e| matches!(e, Expr::Lookup { .. }));
            if looks_up {
                t.sets = self.read_sets(family, table, &doing)?;
            }
        }
        Ok(tables)
    }

    /// The sets of one table with their elements, sets by name and elements by key (the
    /// order [`crate::marking::compile`] makes).
    fn read_sets(&mut self, family: u8, table: &str, doing: &str) -> Result<Vec<NftSet>> {
        let replies = self
            .nft(nft::dump_sets(family, table), doing)?
            .map_err(|r| r.error(doing))?;
        let mut sets = Vec::new();
        for r in replies {
            let m: NetfilterMessage = parse(&r, "NEWSET", doing)?;
            let (fam, tbl, set) = nft::decode_set(&m).map_err(|e| Error::decode(doing, e))?;
            if fam == family && tbl == table {
                sets.push(set);
            }
        }
        sets.sort_by(|a, b| a.name.cmp(&b.name));
        for set in &mut sets {
            let replies = self
                .nft(nft::dump_set_elements(family, table, &set.name), doing)?
                .map_err(|r| r.error(doing))?;
            for r in replies {
                // Straight from the bytes: the crate's parser is quadratic in a page's
                // elements.
                let elements =
                    nft::set_elements_from_bytes(&r).map_err(|e| Error::decode(doing, e))?;
                set.elements.extend(elements);
            }
            set.elements.sort();
        }
        Ok(sets)
    }

    /// A sysctl's value (`None`: there is no such sysctl).
    fn read_sysctl(&mut self, key: &str) -> Result<Option<String>> {
        lower::check_sysctl_key(key)?;
        self.io
            .read_sysctl(key)
            .map_err(|e| Error::io(format!("read sysctl {key}"), e))
    }

    /// What the host has of what `own` names (and the sysctls in `sysctls`), but the routes
    /// that `take` takes as they are read.
    pub(super) fn read_state(
        &mut self,
        own: &Ownership,
        sysctls: &[String],
        take: &mut dyn FnMut(&ActualRoute) -> bool,
    ) -> Result<ActualState> {
        let mut s = ActualState::default();
        let links = self.read_links(&own.interfaces)?;
        self.ifindex = links.iter().map(|(n, l)| (n.clone(), l.index)).collect();
        // Shared by the routes of a device (hundreds of thousands on a big cluster's node).
        let by_index: HashMap<u32, std::sync::Arc<str>> = links
            .iter()
            .map(|(n, l)| (l.index, std::sync::Arc::from(n.as_str())))
            .collect();
        // In name order: the same state is read with the same requests in the same order.
        let links: BTreeMap<String, ActualLink> = links.into_iter().collect();
        for (name, l) in &links {
            let dev = match &self.wg {
                Driver::Kernel { family_id } if l.kind.as_deref() == Some("wireguard") => {
                    let family_id = *family_id;
                    self.kernel_device(family_id, name)?
                }
                Driver::Userspace(u) if l.kind.as_deref() == Some("tun") => u.get(name)?,
                _ => None,
            };
            if let Some(d) = dev {
                s.devices.insert(name.clone(), d);
            }
        }
        s.links = links;
        // One dump at a time per socket (the kernel answers EBUSY otherwise).
        for family in [Family::V4, Family::V6] {
            // Parsed as the dump comes: 560,000 routes at 5,000 nodes × 110 pods.
            let doing = "dump routes";
            self.dump(route::route_dump(family), doing, &mut |r| {
                if let RouteNetlinkMessage::NewRoute(m) = parse(r, "RTM_NEWROUTE", doing)?
                    && let Some(mut route) =
                        route::parse_route(&m, own.table).map_err(|e| Error::decode(doing, e))?
                {
                    route.device = route.oif.and_then(|x| by_index.get(&x).cloned());
                    if !take(&route) {
                        s.routes.push(route);
                    }
                }
                Ok(())
            })?;
            let doing = "dump rules";
            self.dump(route::rule_dump(family), doing, &mut |r| {
                if let RouteNetlinkMessage::NewRule(m) = parse(r, "RTM_NEWRULE", doing)? {
                    match route::parse_rule(&m, own.table) {
                        Some(rule) => s.rules.push(rule),
                        None => s.foreign_rules.extend(route::parse_foreign_rule(&m)),
                    }
                }
                Ok(())
            })?;
        }
        for key in sysctls {
            if let Some(v) = self.read_sysctl(key)? {
                s.sysctls.insert(key.clone(), v);
            }
        }
        s.marking = self.read_nft(&own.nft_table)?;
        s.remove_allowed_ip_supported = self.remove_flag;
        Ok(s)
    }

    /// The counters of the peers of the devices `own` names.
    pub(super) fn read_peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>> {
        let mut out = Vec::new();
        for name in &own.interfaces {
            match &self.wg {
                Driver::Kernel { family_id } => match self.kernel_stats(*family_id, name) {
                    Ok(s) => out.extend(s),
                    // A link of that name that is not a WireGuard device has no peers.
                    Err(e) if e.errno() == Some(EOPNOTSUPP) => {}
                    Err(e) => return Err(e),
                },
                Driver::Userspace(u) => out.extend(u.get_stats(name)?.unwrap_or_default()),
            }
        }
        Ok(out)
    }
}
