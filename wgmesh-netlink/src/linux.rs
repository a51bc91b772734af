//! The [`Linux`] dataplane: reads what the host has of wgmesh's objects, and executes
//! operations phase by phase — lower each phase purely ([`crate::lower`]), then only send and
//! receive ([`crate::exec`]). The kernel behind it is a [`KernelIo`]: the host's
//! [`Sockets`], or the message-level fake kernel of the `testing` feature.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::GenlCtrl;
use netlink_packet_netfilter::NetfilterMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_wireguard::WireguardMessage;
use wgmesh_core::{Family, PrivateKey, PublicKey};

use crate::error::{
    EAFNOSUPPORT, EINVAL, ENODEV, ENOENT, EOPNOTSUPP, EPROTONOSUPPORT, Error, Result,
};
use crate::exec::{Answer, Outgoing, Pipeline};
use crate::io::{KernelIo, Sockets};
use crate::keys::KeyRing;
use crate::lower::{self, Capabilities, Keys, Request, WG_SET_FLAGS, WireGuard};
use crate::marking::{FAMILIES, NftTable};
use crate::op::{Operation, Phase};
use crate::reconcile::Dataplane;
use crate::state::{ActualDevice, ActualLink, ActualState, LinkKind, Ownership, PeerStats};
use crate::userspace::Userspace;
use crate::wire::genl::{self, DEFAULT_MAX_MESSAGE, DeviceUpdate, Wg};
use crate::wire::nft::{self, NftRequest};
use crate::wire::route::{self, RtRequest};
use crate::wire::{self, Protocol};

/// Which WireGuard implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// The kernel's when it has WireGuard, else userspace.
    #[default]
    Auto,
    /// Kernel WireGuard over generic netlink.
    Kernel,
    /// A userspace implementation over its configuration socket.
    Userspace,
}

/// A backend name that is not `auto`, `kernel` or `userspace`.
///
/// ```
/// use wgmesh_netlink::Backend;
/// assert_eq!("kernel".parse::<Backend>().unwrap(), Backend::Kernel);
/// let e = "kern".parse::<Backend>().unwrap_err();
/// assert_eq!(e.to_string(), r#"unknown backend "kern"; expected auto, kernel or userspace"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backend {0:?}; expected auto, kernel or userspace")]
pub struct ParseBackendError(String);

/// The message, for callers that report errors as text.
impl From<ParseBackendError> for String {
    fn from(e: ParseBackendError) -> Self {
        e.to_string()
    }
}

impl std::str::FromStr for Backend {
    type Err = ParseBackendError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseBackendError> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            other => Err(ParseBackendError(other.to_owned())),
        }
    }
}

/// Settings of the [`Linux`] dataplane.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LinuxConfig {
    /// Which implementation.
    pub backend: Backend,
    /// The userspace implementation started when a device is missing (run as `PROGRAM IFNAME`).
    pub userspace_program: PathBuf,
    /// Where userspace implementations put their sockets.
    pub socket_dir: PathBuf,
    /// The largest WireGuard netlink message.
    pub max_message: usize,
    /// Where sysctls are written.
    pub proc_sys: PathBuf,
    /// How long to wait for a started userspace daemon's socket.
    pub daemon_timeout: Duration,
    /// How long one wait for the kernel's next netlink answer may last before the operation
    /// fails (`None`: forever). A kernel that never answers then costs the agent one failed
    /// reconcile, not a hung process. Late answers are recognised and dropped.
    pub netlink_timeout: Option<Duration>,
}

impl Default for LinuxConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            userspace_program: PathBuf::from(
                std::env::var_os("WG_USERSPACE_IMPLEMENTATION").unwrap_or("wireguard-go".into()),
            ),
            socket_dir: PathBuf::from("/var/run/wireguard"),
            max_message: DEFAULT_MAX_MESSAGE,
            proc_sys: PathBuf::from("/proc/sys"),
            daemon_timeout: Duration::from_secs(20),
            netlink_timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl LinuxConfig {
    /// The default settings with this backend.
    pub fn with_backend(backend: Backend) -> Self {
        Self {
            backend,
            ..Self::default()
        }
    }
}

enum Driver {
    Kernel { family_id: u16 },
    Userspace(Userspace),
}

/// The host's dataplane. Open it with [`Linux::open`] (needs `CAP_NET_ADMIN`); tests run the
/// same code over the fake kernel with [`Linux::with_kernel`].
pub struct Linux<K = Sockets> {
    io: K,
    wg: Driver,
    config: LinuxConfig,
    decision: String,
    /// Whether the kernel removes single allowed IPs: probed once, when first needed.
    remove_flag: Option<bool>,
    pipeline: Pipeline,
    messages: usize,
    /// Interface indexes of owned links, from the last read or lookup; dropped whenever a
    /// phase creates or deletes links.
    ifindex: HashMap<String, u32>,
    /// The key of the throwaway peer (allowed-IP removals without the per-IP flag, and the
    /// probe of that flag): random, no real peer's.
    throwaway: PublicKey,
}

impl<K> fmt::Debug for Linux<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Linux")
            .field("backend", &self.decision)
            .field("messages", &self.messages)
            .finish_non_exhaustive()
    }
}

fn parse<I: netlink_packet_core::NetlinkDeserializable>(
    bytes: &[u8],
    what: &'static str,
    doing: &str,
) -> Result<I> {
    wire::parse::<I>(bytes, what)
        .map(|(_, m)| m)
        .map_err(|e| Error::decode(doing, e))
}

impl Linux<Sockets> {
    /// Opens the netlink sockets and picks the WireGuard implementation. With
    /// [`Backend::Auto`], the kernel is used when its generic netlink family `wireguard`
    /// resolves (the kernel loads the module on demand), else userspace;
    /// [`Linux::backend_description`] says which and why.
    pub fn open(config: LinuxConfig) -> Result<Self> {
        let io = Sockets::open(config.netlink_timeout, config.proc_sys.clone())
            .map_err(|e| Error::io("open the netlink sockets", e))?;
        Self::with_kernel(io, config)
    }
}

impl<K: KernelIo> Linux<K> {
    /// The dataplane over `kernel`, with the WireGuard implementation picked as
    /// [`Linux::open`] picks it.
    pub fn with_kernel(kernel: K, config: LinuxConfig) -> Result<Self> {
        let mut l = Self {
            io: kernel,
            wg: Driver::Kernel { family_id: 0 },
            config,
            decision: String::new(),
            remove_flag: None,
            pipeline: Pipeline::default(),
            messages: 0,
            ifindex: HashMap::new(),
            throwaway: PrivateKey::generate().public_key(),
        };
        let family = l.wireguard_family()?;
        let userspace = || {
            Driver::Userspace(Userspace {
                program: l.config.userspace_program.clone(),
                socket_dir: l.config.socket_dir.clone(),
                daemon_timeout: l.config.daemon_timeout,
                reply_timeout: l.config.netlink_timeout.unwrap_or(Duration::from_secs(30)),
            })
        };
        let program = l.config.userspace_program.display().to_string();
        let (wg, decision) = match (l.config.backend, family) {
            (Backend::Kernel | Backend::Auto, Ok(id)) => (
                Driver::Kernel { family_id: id },
                format!(
                    "kernel WireGuard (generic netlink family {id}){}",
                    if l.config.backend == Backend::Auto {
                        "; chosen by auto"
                    } else {
                        ""
                    }
                ),
            ),
            (Backend::Kernel, Err(_)) => {
                return Err(Error::NoKernelWireGuard {
                    doing: "open the kernel backend".into(),
                });
            }
            (Backend::Auto, Err(errno)) => (
                userspace(),
                format!(
                    "userspace WireGuard ({program}): auto found no kernel WireGuard (generic netlink family lookup: errno {errno})"
                ),
            ),
            (Backend::Userspace, _) => (userspace(), format!("userspace WireGuard ({program})")),
        };
        l.wg = wg;
        l.decision = decision;
        Ok(l)
    }

    /// The generic netlink family id of `wireguard`, or the errno of the lookup.
    fn wireguard_family(&mut self) -> Result<std::result::Result<u16, i32>> {
        let doing = "resolve generic netlink family wireguard";
        let (flags, m) = genl::get_family("wireguard");
        let req = self.pipeline.message(Protocol::Generic, flags, &m);
        let mut out = self.transact(Protocol::Generic, &[req], None, doing)?;
        match out.pop() {
            Some(Ok(replies)) => match replies.first() {
                Some(r) => {
                    let m: GenlMessage<GenlCtrl> = parse(r, "CTRL_CMD_NEWFAMILY", doing)?;
                    Ok(Ok(genl::family_id(&m).map_err(|e| Error::decode(doing, e))?))
                }
                None => Ok(Err(ENOENT)),
            },
            Some(Err(r)) => Ok(Err(r.errno)),
            None => Ok(Err(ENOENT)),
        }
    }

    /// Which implementation is driven, and why.
    pub fn backend_description(&self) -> &str {
        &self.decision
    }

    /// Whether the kernel implementation is driven.
    pub fn is_kernel(&self) -> bool {
        matches!(self.wg, Driver::Kernel { .. })
    }

    /// Messages sent so far (netlink messages, userspace requests, sysctl writes).
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// The kernel behind the dataplane.
    pub fn kernel(&self) -> &K {
        &self.io
    }

    /// The kernel behind the dataplane, mutably (tests drift the fake kernel through it).
    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.io
    }

    fn transact(
        &mut self,
        protocol: Protocol,
        reqs: &[Outgoing],
        groups: Option<&[std::ops::Range<usize>]>,
        doing: &str,
    ) -> Result<Vec<Answer>> {
        self.pipeline
            .transact(&mut self.io, protocol, reqs, groups, doing)
    }

    fn rt(&mut self, reqs: &[RtRequest], doing: &str) -> Result<Vec<Answer>> {
        let out: Vec<Outgoing> = reqs
            .iter()
            .map(|(flags, m)| self.pipeline.message(Protocol::Route, *flags, m))
            .collect();
        self.messages += out.iter().filter(|o| o.answered).count();
        self.transact(Protocol::Route, &out, None, doing)
    }

    /// Whether this WireGuard can remove single allowed IPs (kernel: `WGALLOWEDIP_F_REMOVE_ME`,
    /// Linux 6.12+; probed once with a throwaway peer on `ifname`). Userspace: never used.
    pub fn remove_flag_supported(&mut self, ifname: &str) -> Result<bool> {
        if let Some(v) = self.remove_flag {
            return Ok(v);
        }
        let Driver::Kernel { family_id } = self.wg else {
            return Ok(false);
        };
        let probe = self.throwaway;
        let [add, remove] = lower::remove_flag_probe(ifname, probe);
        let probed = self.genl_set(family_id, &add, "probe per-IP allowed-IP removal");
        let read = match &probed {
            Ok(()) => self.kernel_device(family_id, ifname)?,
            Err(_) => None,
        };
        self.genl_set(family_id, &remove, "remove the probe peer")?;
        match probed {
            // Kernels without the flag refuse the unknown attribute.
            Err(e) if e.errno() != Some(EINVAL) => return Err(e),
            _ => {}
        }
        let supported = read
            .and_then(|d| d.peers.get(&probe).map(|p| p.allowed_ips.is_empty()))
            .unwrap_or(false);
        log::info!(
            "WireGuard per-IP allowed-IP removal: {}",
            if supported {
                "supported"
            } else {
                "not supported; removing via a throwaway peer"
            }
        );
        self.remove_flag = Some(supported);
        Ok(supported)
    }

    fn genl_set(&mut self, family_id: u16, dev: &DeviceUpdate, doing: &str) -> Result<()> {
        let msgs = genl::set_messages(dev, self.config.max_message)?;
        let out: Vec<Outgoing> = msgs
            .iter()
            .map(|m| {
                self.pipeline.message(
                    Protocol::Generic,
                    WG_SET_FLAGS,
                    &Wg {
                        family_id,
                        message: &m.0,
                    },
                )
            })
            .collect();
        self.messages += out.len();
        for a in self.transact(Protocol::Generic, &out, None, doing)? {
            a.map_err(|r| r.error(doing))?;
        }
        Ok(())
    }

    fn kernel_device(&mut self, family_id: u16, ifname: &str) -> Result<Option<ActualDevice>> {
        let mut dev = ActualDevice::default();
        let found = self.wg_dump(family_id, ifname, "", |m| genl::merge_device(m, &mut dev))?;
        Ok(found.then_some(dev))
    }

    fn kernel_stats(&mut self, family_id: u16, ifname: &str) -> Result<Vec<PeerStats>> {
        let mut stats = BTreeMap::new();
        self.wg_dump(family_id, ifname, " counters", |m| {
            genl::merge_stats(m, ifname, &mut stats)
        })?;
        Ok(stats.into_values().collect())
    }

    /// Dumps a WireGuard device and hands each part to `merge` (which wipes its private
    /// key). `Ok(false)` when there is no such device.
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
        let mut out = self.transact(Protocol::Generic, &[req], None, &doing)?;
        match out.pop() {
            Some(Ok(parts)) => {
                for mut p in parts {
                    let parsed: std::result::Result<GenlMessage<WireguardMessage>, Error> =
                        parse(&p, "WG_CMD_GET_DEVICE", &doing);
                    zeroize::Zeroize::zeroize(&mut p);
                    let mut parsed = parsed?;
                    merge(&mut parsed.payload).map_err(|e| Error::decode(&doing, e))?;
                }
                Ok(true)
            }
            Some(Err(r)) if r.errno == ENODEV || r.errno == ENOENT => Ok(false),
            Some(Err(r)) => Err(r.error(doing)),
            None => Ok(false),
        }
    }

    fn read_links(&mut self, names: &[String]) -> Result<HashMap<String, ActualLink>> {
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
        Ok(links)
    }

    fn dump(&mut self, req: RtRequest, doing: &str) -> Result<Option<Vec<Vec<u8>>>> {
        match self.rt(&[req], doing)?.pop() {
            Some(Ok(replies)) => Ok(Some(replies)),
            // A kernel without IPv6 has no IPv6 routes or rules.
            Some(Err(r)) if r.errno == EOPNOTSUPP || r.errno == EAFNOSUPPORT => Ok(None),
            Some(Err(r)) => Err(r.error(doing)),
            None => Ok(None),
        }
    }

    fn nft(&mut self, req: NftRequest, doing: &str) -> Result<Answer> {
        let (flags, m) = req;
        let out = self.pipeline.message(Protocol::Netfilter, flags, &m);
        Ok(self
            .transact(Protocol::Netfilter, &[out], None, doing)?
            .pop()
            .unwrap_or(Ok(Vec::new())))
    }

    fn read_nft(&mut self, table: &str) -> Result<Vec<NftTable>> {
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
                        });
                    }
                }
                Err(r) if r.errno == ENOENT => {}
                // A kernel without nf_tables has no table of ours.
                Err(r) if r.errno == EPROTONOSUPPORT || r.errno == EOPNOTSUPP => {}
                Err(r) => return Err(r.error(doing)),
            }
        }
        if tables.is_empty() {
            return Ok(tables);
        }
        // One dump at a time per socket; dumps of family 0 cover every family.
        let replies = self
            .nft(nft::dump_chains(), &doing)?
            .map_err(|r| r.error(&doing))?;
        for r in replies {
            let m: NetfilterMessage = parse(&r, "NEWCHAIN", &doing)?;
            let (fam, tbl, c) = nft::decode_chain(&m).map_err(|e| Error::decode(&doing, e))?;
            if let Some(t) = tables.iter_mut().find(|t| t.family == fam && tbl == table) {
                t.chains.push(c);
            }
        }
        let replies = self
            .nft(nft::dump_rules(), &doing)?
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
        Ok(tables)
    }

    /// Looks up the indexes of the links that unicast routes of `ops` leave through.
    fn resolve_indexes(&mut self, ops: &[Operation]) -> Result<()> {
        let mut missing: Vec<String> = ops
            .iter()
            .filter_map(lower::needs_index)
            .filter(|d| !self.ifindex.contains_key(*d))
            .map(str::to_owned)
            .collect();
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let found = self.read_links(&missing)?;
        self.ifindex
            .extend(found.into_iter().map(|(n, l)| (n, l.index)));
        Ok(())
    }

    fn capabilities(&self, remove_allowed_ip: bool) -> Capabilities {
        Capabilities {
            wireguard: match self.wg {
                Driver::Kernel { family_id } => WireGuard::Kernel {
                    family_id,
                    remove_allowed_ip,
                },
                Driver::Userspace(_) => WireGuard::Userspace,
            },
            max_message: self.config.max_message,
        }
    }

    /// Executes the operations of one phase. Returns the index (within `ops`) and error of
    /// the first failure.
    fn run_phase(
        &mut self,
        ops: &[Operation],
        keys: &KeyRing,
    ) -> std::result::Result<(), (usize, Error)> {
        // What lowering needs that only the kernel knows: link indexes, the probe.
        self.resolve_indexes(ops).map_err(|e| (0, e))?;
        let removes = ops
            .iter()
            .position(|o| matches!(o, Operation::RemoveAllowedIps { .. }));
        let remove_allowed_ip = match removes {
            Some(i) => {
                let ifname = ops[i].interface().unwrap_or_default().to_owned();
                self.remove_flag_supported(&ifname).map_err(|e| (i, e))?
            }
            None => false,
        };
        let caps = self.capabilities(remove_allowed_ip);
        let keys = Keys {
            ring: keys,
            throwaway: self.throwaway,
        };
        let mut lowered: Vec<(usize, Request)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            for r in lower::lower(op, &caps, &keys, &self.ifindex).map_err(|e| (i, e))? {
                lowered.push((i, r));
            }
        }
        let changes_links = matches!(
            ops.first().map(Operation::phase),
            Some(Phase::LinkDeletes | Phase::Links)
        );
        let result = self.send_lowered(ops, lowered);
        if changes_links {
            self.ifindex.clear();
        }
        result
    }

    /// Sends lowered requests in order: consecutive rtnetlink or WireGuard messages together,
    /// pipelined; the others one by one.
    fn send_lowered(
        &mut self,
        ops: &[Operation],
        lowered: Vec<(usize, Request)>,
    ) -> std::result::Result<(), (usize, Error)> {
        let doing = |i: usize| ops[i].to_string();
        let mut run: Vec<(usize, Outgoing)> = Vec::new();
        let mut run_protocol = Protocol::Route;
        for (i, r) in lowered {
            let (protocol, out) = match r {
                Request::Route((flags, m)) => (
                    Protocol::Route,
                    self.pipeline.message(Protocol::Route, flags, &m),
                ),
                Request::Wireguard { family_id, message } => (
                    Protocol::Generic,
                    self.pipeline.message(
                        Protocol::Generic,
                        WG_SET_FLAGS,
                        &Wg {
                            family_id,
                            message: &message.0,
                        },
                    ),
                ),
                Request::Nft(batch) => {
                    self.flush(ops, run_protocol, &mut run)?;
                    self.send_batch(&batch, &doing(i)).map_err(|e| (i, e))?;
                    continue;
                }
                Request::Uapi { interface, text } => {
                    self.flush(ops, run_protocol, &mut run)?;
                    self.messages += 1;
                    self.userspace(i, ops)?
                        .set(&interface, &text, &doing(i))
                        .map_err(|e| (i, e))?;
                    continue;
                }
                Request::StartDaemon { interface } => {
                    self.flush(ops, run_protocol, &mut run)?;
                    self.userspace(i, ops)?
                        .start(&interface)
                        .map_err(|e| (i, e))?;
                    continue;
                }
                Request::Sysctl { key, value } => {
                    self.flush(ops, run_protocol, &mut run)?;
                    self.messages += 1;
                    self.io
                        .write_sysctl(&key, &value)
                        .map_err(|e| (i, Error::io(doing(i), e)))?;
                    continue;
                }
            };
            if protocol != run_protocol {
                self.flush(ops, run_protocol, &mut run)?;
                run_protocol = protocol;
            }
            run.push((i, out));
        }
        self.flush(ops, run_protocol, &mut run)
    }

    fn userspace(
        &self,
        i: usize,
        ops: &[Operation],
    ) -> std::result::Result<&Userspace, (usize, Error)> {
        match &self.wg {
            Driver::Userspace(u) => Ok(u),
            Driver::Kernel { .. } => Err((
                i,
                Error::NoKernelWireGuard {
                    doing: ops[i].to_string(),
                },
            )),
        }
    }

    /// Sends a run of pipelined messages of one protocol and checks every answer.
    fn flush(
        &mut self,
        ops: &[Operation],
        protocol: Protocol,
        run: &mut Vec<(usize, Outgoing)>,
    ) -> std::result::Result<(), (usize, Error)> {
        let Some(&(first, _)) = run.first() else {
            return Ok(());
        };
        let (owners, reqs): (Vec<usize>, Vec<Outgoing>) = std::mem::take(run).into_iter().unzip();
        self.messages += reqs.iter().filter(|o| o.answered).count();
        let what = match protocol {
            Protocol::Route => "rtnetlink",
            Protocol::Generic => "WireGuard generic netlink",
            Protocol::Netfilter => "nf_tables",
        };
        let out = self
            .transact(protocol, &reqs, None, what)
            .map_err(|e| (first, e))?;
        for (i, a) in owners.into_iter().zip(out) {
            if let Err(r) = a {
                if r.errno == EOPNOTSUPP && matches!(ops[i], Operation::CreateLink { .. }) {
                    return Err((
                        i,
                        Error::NoKernelWireGuard {
                            doing: ops[i].to_string(),
                        },
                    ));
                }
                return Err((i, r.error(ops[i].to_string())));
            }
        }
        Ok(())
    }

    /// One nf_tables transaction, then a `GETGEN` barrier in its own datagram: once it is
    /// answered, the batch is done.
    fn send_batch(&mut self, batch: &[NftRequest], doing: &str) -> Result<()> {
        let n = batch.len();
        let mut reqs: Vec<Outgoing> = batch
            .iter()
            .map(|(flags, m)| self.pipeline.message(Protocol::Netfilter, *flags, m))
            .collect();
        let (flags, gen_msg) = nft::get_gen();
        reqs.push(self.pipeline.message(Protocol::Netfilter, flags, &gen_msg));
        self.messages += n;
        let out = self.transact(Protocol::Netfilter, &reqs, Some(&[0..n, n..n + 1]), doing)?;
        // The batch's answers, then the barrier's.
        for a in out {
            a.map_err(|r| r.error(doing))?;
        }
        Ok(())
    }

    fn read_sysctl(&mut self, key: &str) -> Result<Option<String>> {
        lower::check_sysctl_key(key)?;
        self.io
            .read_sysctl(key)
            .map_err(|e| Error::io(format!("read sysctl {key}"), e))
    }
}

impl<K: KernelIo> Dataplane for Linux<K> {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        let mut s = ActualState::default();
        let links = self.read_links(&own.interfaces)?;
        self.ifindex = links.iter().map(|(n, l)| (n.clone(), l.index)).collect();
        let by_index: HashMap<u32, String> =
            links.iter().map(|(n, l)| (l.index, n.clone())).collect();
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
        s.links = links.into_iter().collect();
        // One dump at a time per socket (the kernel answers EBUSY otherwise).
        for family in [Family::V4, Family::V6] {
            for r in self
                .dump(route::route_dump(family), "dump routes")?
                .unwrap_or_default()
            {
                let m = parse(&r, "RTM_NEWROUTE", "dump routes")?;
                let RouteNetlinkMessage::NewRoute(m) = m else {
                    continue;
                };
                if let Some(mut route) = route::parse_route(&m, own.table)
                    .map_err(|e| Error::decode("dump routes", e))?
                {
                    route.device = route.oif.and_then(|x| by_index.get(&x).cloned());
                    s.routes.push(route);
                }
            }
            for r in self
                .dump(route::rule_dump(family), "dump rules")?
                .unwrap_or_default()
            {
                if let RouteNetlinkMessage::NewRule(m) = parse(&r, "RTM_NEWRULE", "dump rules")? {
                    s.rules.extend(route::parse_rule(&m, own.table));
                }
            }
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

    fn execute(&mut self, ops: &[Operation], keys: &KeyRing) -> Result<usize> {
        let before = self.messages;
        let mut start = 0;
        while start < ops.len() {
            let phase = ops[start].phase();
            let end = start
                + ops[start..]
                    .iter()
                    .take_while(|o| o.phase() == phase)
                    .count();
            if let Err((i, e)) = self.run_phase(&ops[start..end], keys) {
                return Err(Error::Operation {
                    index: start + i,
                    total: ops.len(),
                    operation: ops[start + i].to_string(),
                    source: Box::new(e),
                });
            }
            start = end;
        }
        Ok(self.messages - before)
    }

    fn link_kind(&self) -> LinkKind {
        match self.wg {
            Driver::Kernel { .. } => LinkKind::Wireguard,
            Driver::Userspace(_) => LinkKind::Tun,
        }
    }

    fn peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>> {
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
