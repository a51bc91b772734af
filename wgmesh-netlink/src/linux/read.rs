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

/// How many times a WireGuard device is dumped at most while every dump is interrupted by a
/// change.
const WG_DUMP_ATTEMPTS: usize = 3;

impl<K: KernelIo> Linux<K> {
    /// A kernel WireGuard device's configuration (`None`: no such device).
    /// `true` with it: every dump of it was interrupted ([`Self::wg_read`]).
    pub(super) fn kernel_device(
        &mut self,
        family_id: u16,
        ifname: &str,
    ) -> Result<(Option<ActualDevice>, bool)> {
        self.wg_read(family_id, ifname, "", |m, dev: &mut ActualDevice| {
            genl::merge_device(m, dev)
        })
    }

    /// A kernel WireGuard device's peer counters.
    fn kernel_stats(&mut self, family_id: u16, ifname: &str) -> Result<Vec<PeerStats>> {
        let (stats, _) = self.wg_read(family_id, ifname, " counters", |m, stats| {
            genl::merge_stats(m, ifname, stats)
        })?;
        Ok(stats.unwrap_or_default().into_values().collect())
    }

    /// A WireGuard device dumped whole into a `T` (`None`: no such device), dumped again when
    /// the kernel marks the dump interrupted: a device that changes during its dump (a
    /// delta while a background resync reads 10,000 peers) may have been dumped with peers
    /// or allowed IPs missing, since Linux ends such a dump where the peer it was at went
    /// (`wg` dumps again too). A device that changes during every one of
    /// [`WG_DUMP_ATTEMPTS`] dumps (pods churning on a big node) is taken as the last dump
    /// read it, and `true` says so (a background resync leaves the device's peers alone
    /// then: [`crate::ResyncFound`]).
    fn wg_read<T: Default>(
        &mut self,
        family_id: u16,
        ifname: &str,
        what: &str,
        mut merge: impl FnMut(
            &mut WireguardMessage,
            &mut T,
        ) -> std::result::Result<(), crate::DecodeError>,
    ) -> Result<(Option<T>, bool)> {
        self.pipeline.take_interrupted();
        let mut attempt = 1;
        loop {
            let mut out = T::default();
            let found = self.wg_dump(family_id, ifname, what, |m| merge(m, &mut out))?;
            let interrupted = self.pipeline.take_interrupted();
            if !interrupted || attempt == WG_DUMP_ATTEMPTS {
                return Ok((found.then_some(out), interrupted));
            }
            attempt += 1;
        }
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
                    let (dev, interrupted) = self.kernel_device(family_id, name)?;
                    if interrupted {
                        s.interrupted.push(name.clone());
                    }
                    dev
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeKernel, SharedKernel};
    use crate::wire::Protocol;
    use crate::{Dataplane, KeyRing, Reconciler};

    type Change = Box<dyn FnMut(&mut FakeKernel) + Send>;

    /// The fake kernel, changed by `change` when the reader receives its `at`-th generic
    /// netlink datagram (and every one after it when `every`): a device changing under
    /// its dump.
    struct Meddler {
        inner: SharedKernel,
        recvs: usize,
        at: Option<usize>,
        every: bool,
        change: Change,
    }

    impl KernelIo for Meddler {
        fn send(&mut self, protocol: Protocol, datagram: &[u8]) -> std::io::Result<()> {
            self.inner.send(protocol, datagram)
        }
        fn recv(&mut self, protocol: Protocol, buf: &mut Vec<u8>) -> std::io::Result<()> {
            if protocol == Protocol::Generic
                && let Some(at) = self.at
            {
                self.recvs += 1;
                if self.recvs == at || (self.every && self.recvs > at) {
                    (self.change)(&mut self.inner.kernel());
                }
            }
            self.inner.recv(protocol, buf)
        }
        fn read_sysctl(&mut self, key: &str) -> std::io::Result<Option<String>> {
            self.inner.read_sysctl(key)
        }
        fn write_sysctl(&mut self, key: &str, value: &str) -> std::io::Result<()> {
            self.inner.write_sysctl(key, value)
        }
    }

    /// A device of 40 peers, dumped in pages of at most 1 KiB.
    fn kernel_with_peers() -> (SharedKernel, crate::Ownership, String) {
        let node = |n: u8| {
            wgmesh_core::Node::new(format!("n{n}"))
                .with_addresses([std::net::IpAddr::from([10, 0, 0, n])])
                .with_pod_cidrs([format!("10.65.{n}.0/24").parse().unwrap()])
                .with_wireguard(wgmesh_core::NodeWireGuard::new(
                    Some(wgmesh_core::PrivateKey::generate().public_key()),
                    None,
                ))
        };
        let cluster =
            wgmesh_core::Cluster::new(Default::default(), (1..=41).map(node).collect()).unwrap();
        let plan = wgmesh_core::plan_node(&cluster, "n1").unwrap();
        let mut fake = FakeKernel::new();
        fake.dump_message_size = 1024;
        let kernel = SharedKernel::new(fake);
        let own = crate::Ownership::from_mesh(cluster.mesh());
        let linux = Linux::with_kernel(kernel.handle(), Default::default()).unwrap();
        let keys = KeyRing::single(wgmesh_core::PrivateKey::generate());
        Reconciler::new(linux, own.clone(), keys)
            .reconcile(&plan)
            .unwrap();
        let name = plan.interfaces[0].name.clone();
        assert_eq!(kernel.kernel().devices[&name].peers.len(), 40);
        (kernel, own, name)
    }

    fn reader(kernel: &SharedKernel, at: usize, every: bool, change: Change) -> Linux<Meddler> {
        let mut l = Linux::with_kernel(
            Meddler {
                inner: kernel.handle(),
                recvs: 0,
                at: None,
                every,
                change,
            },
            Default::default(),
        )
        .unwrap();
        l.kernel_mut().at = Some(at); // after the family lookup
        l
    }

    /// A device that changes during its dump is dumped again (Linux marks such a dump
    /// `NLM_F_DUMP_INTR`, and ends it where the peer it was at went): the read is the
    /// device as it is after the change, not a mix, nor a dump cut short.
    #[test]
    fn a_device_changed_during_its_dump_is_dumped_again() {
        let (kernel, own, name) = kernel_with_peers();
        // All but two peers go while the second page is on its way.
        let n = name.clone();
        let mut l = reader(
            &kernel,
            2,
            false,
            Box::new(move |k: &mut FakeKernel| {
                let dev = k.devices.get_mut(&n).unwrap();
                let keep: Vec<_> = dev.peers.keys().take(2).copied().collect();
                dev.peers.retain(|key, _| keep.contains(key));
                dev.generation += 1;
            }),
        );
        let read = l.read(&own, &[]).unwrap();
        let fresh = Linux::with_kernel(kernel.handle(), Default::default())
            .unwrap()
            .read(&own, &[])
            .unwrap();
        assert_eq!(read.devices[&name].peers.len(), 2);
        assert_eq!(read.devices, fresh.devices);
        assert!(l.kernel_mut().recvs > 2, "not dumped again");

        // A change that leaves the dump's peer: the flag alone makes the reader dump again.
        let n = name.clone();
        let mut l = reader(
            &kernel,
            1,
            false,
            Box::new(move |k: &mut FakeKernel| {
                let dev = k.devices.get_mut(&n).unwrap();
                let last = dev.peers.values_mut().last().unwrap();
                last.allowed_ips.insert("192.168.77.0/24".parse().unwrap());
                dev.generation += 1;
            }),
        );
        let read = l.read(&own, &[]).unwrap();
        let peers = &read.devices[&name].peers;
        let last = peers.values().last().unwrap();
        assert!(
            last.allowed_ips
                .contains(&"192.168.77.0/24".parse().unwrap())
        );
    }

    /// A device that never stops changing is not read for ever: the third dump is taken as
    /// it is.
    #[test]
    fn a_device_that_keeps_changing_is_dumped_three_times() {
        let (kernel, own, name) = kernel_with_peers();
        let mut l = reader(
            &kernel,
            1,
            true,
            Box::new(move |k: &mut FakeKernel| {
                k.devices.get_mut(&name).unwrap().generation += 1;
            }),
        );
        let sent = l.pipeline.sent;
        let read = l.read(&own, &[]).unwrap();
        assert_eq!(
            read.devices.values().map(|d| d.peers.len()).sum::<usize>(),
            40
        );
        // Three device dumps (one request each) among the read's other requests.
        let dumps = l.pipeline.sent - sent;
        let once = {
            let mut l = reader(
                &kernel,
                usize::MAX,
                false,
                Box::new(|_: &mut FakeKernel| {}),
            );
            let sent = l.pipeline.sent;
            l.read(&own, &[]).unwrap();
            l.pipeline.sent - sent
        };
        assert_eq!(dumps, once + 2);
    }
}
