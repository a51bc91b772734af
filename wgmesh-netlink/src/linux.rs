//! The real host: rtnetlink for links, routes and rules, generic netlink (kernel WireGuard)
//! or the userspace socket (wireguard-go, boringtun) for devices, nf_tables for the marking,
//! `/proc/sys` for sysctls.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_NETFILTER, NETLINK_ROUTE};
use wgmesh_core::{Family, PrivateKey, PublicKey};
use zeroize::Zeroizing;

use crate::error::{EOPNOTSUPP, Error, Result};
use crate::keys::KeyRing;
use crate::nft;
use crate::op::{KICK_KEEPALIVE, Operation};
use crate::reconcile::Dataplane;
use crate::socket::{NlSocket, Request};
use crate::state::{ActualDevice, ActualState, LinkKind, Ownership, PeerStats};
use crate::uapi;
use crate::wire::{self, DeviceUpdate, PeerUpdate};

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

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            other => Err(format!(
                "unknown backend {other:?}; expected auto, kernel or userspace"
            )),
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
            max_message: wire::DEFAULT_MAX_MESSAGE,
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

enum Wg {
    Kernel { family: u16 },
    Userspace,
}

/// The host's dataplane. Open it with [`Linux::open`]; needs `CAP_NET_ADMIN`.
pub struct Linux {
    rt: NlSocket,
    genl: Option<NlSocket>,
    nft: NlSocket,
    wg: Wg,
    config: LinuxConfig,
    decision: String,
    remove_flag: Option<bool>,
    messages: usize,
    /// Interface indexes of owned links, from the last read or lookup; dropped whenever a
    /// run creates or deletes a link.
    ifindex: HashMap<String, u32>,
}

impl fmt::Debug for Linux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Linux")
            .field("backend", &self.decision)
            .field("messages", &self.messages)
            .finish()
    }
}

/// `ECHILD`: no child to wait for.
const ECHILD: i32 = 10;

fn kernel_err(doing: impl Into<String>, errno: i32) -> Error {
    Error::kernel(doing, errno)
}

fn wg_family(genl: &mut NlSocket) -> Result<std::result::Result<u16, i32>> {
    let seq = genl.seqs(1);
    let out = genl
        .transact(
            &[Request {
                bytes: wire::genl_get_family("wireguard", seq),
                answered: true,
            }],
            None,
        )
        .map_err(|e| Error::io("resolve generic netlink family wireguard", e))?;
    Ok(match out.into_iter().next() {
        Some(Ok(replies)) => match replies.first() {
            Some(p) => Ok(wire::parse_family_id(p)
                .map_err(|d| Error::decode("resolve generic netlink family wireguard", d))?),
            None => Err(crate::error::ENOENT),
        },
        Some(Err(errno)) => Err(errno),
        None => Err(crate::error::ENOENT),
    })
}

impl Linux {
    /// Opens the netlink sockets and picks the WireGuard implementation. With
    /// [`Backend::Auto`], the kernel is used when its generic netlink family `wireguard`
    /// resolves (the kernel loads the module on demand), else userspace;
    /// [`Linux::backend_description`] says which and why.
    pub fn open(config: LinuxConfig) -> Result<Self> {
        let open = |p, what: &str| {
            NlSocket::new(p, config.netlink_timeout)
                .map_err(|e| Error::io(format!("open {what} netlink socket"), e))
        };
        let rt = open(NETLINK_ROUTE, "rtnetlink")?;
        let nft = open(NETLINK_NETFILTER, "nf_tables")?;
        let mut genl = open(NETLINK_GENERIC, "generic")?;
        let family = wg_family(&mut genl)?;
        let (wg, decision, genl) = match (config.backend, family) {
            (Backend::Kernel | Backend::Auto, Ok(id)) => (
                Wg::Kernel { family: id },
                format!(
                    "kernel WireGuard (generic netlink family {id}){}",
                    if config.backend == Backend::Auto {
                        "; chosen by auto"
                    } else {
                        ""
                    }
                ),
                Some(genl),
            ),
            (Backend::Kernel, Err(_)) => {
                return Err(Error::NoKernelWireGuard {
                    doing: "open the kernel backend".into(),
                });
            }
            (Backend::Auto, Err(errno)) => (
                Wg::Userspace,
                format!(
                    "userspace WireGuard ({}): auto found no kernel WireGuard (generic netlink family lookup: errno {errno})",
                    config.userspace_program.display()
                ),
                None,
            ),
            (Backend::Userspace, _) => (
                Wg::Userspace,
                format!(
                    "userspace WireGuard ({})",
                    config.userspace_program.display()
                ),
                None,
            ),
        };
        Ok(Self {
            rt,
            genl,
            nft,
            wg,
            config,
            decision,
            remove_flag: None,
            messages: 0,
            ifindex: HashMap::new(),
        })
    }

    /// Which implementation is driven, and why.
    pub fn backend_description(&self) -> &str {
        &self.decision
    }

    /// Whether the kernel implementation is driven.
    pub fn is_kernel(&self) -> bool {
        matches!(self.wg, Wg::Kernel { .. })
    }

    /// Messages sent so far (netlink messages, userspace requests, sysctl writes).
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// Whether this WireGuard can remove single allowed IPs (kernel: `WGALLOWEDIP_F_REMOVE_ME`,
    /// Linux 6.12+; probed once with a throwaway peer on `ifname`). Userspace: never used.
    pub fn remove_flag_supported(&mut self, ifname: &str) -> Result<bool> {
        if let Some(v) = self.remove_flag {
            return Ok(v);
        }
        let Wg::Kernel { family } = self.wg else {
            return Ok(false);
        };
        let probe = throwaway_key();
        let mut p = PeerUpdate::new(probe);
        // 0.0.0.0/32 is no pod's or node's address, so no real peer holds it.
        p.allowed_ips = vec![("0.0.0.0/32".parse().unwrap_or_default(), true)];
        let dev = DeviceUpdate {
            ifname: ifname.to_owned(),
            peers: vec![p],
            ..Default::default()
        };
        // Kernels without the flag validate attributes strictly and refuse the unknown one
        // (EINVAL), after having created the peer; kernels with it remove nothing.
        let probed = self.genl_set(family, &dev, "probe per-IP allowed-IP removal");
        let read = match &probed {
            Ok(()) => self.kernel_device(family, ifname)?,
            Err(e) if e.errno() == Some(crate::error::EINVAL) => None,
            Err(_) => None,
        };
        let mut rm = PeerUpdate::new(probe);
        rm.remove = true;
        let dev = DeviceUpdate {
            ifname: ifname.to_owned(),
            peers: vec![rm],
            ..Default::default()
        };
        self.genl_set(family, &dev, "remove the probe peer")?;
        match probed {
            Err(e) if e.errno() != Some(crate::error::EINVAL) => return Err(e),
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

    fn genl_set(&mut self, family: u16, dev: &DeviceUpdate, doing: &str) -> Result<()> {
        let genl = self
            .genl
            .as_mut()
            .ok_or_else(|| Error::Invalid("no generic netlink socket".into()))?;
        let msgs = wire::wg_set_messages(family, dev, genl.seqs(0), self.config.max_message)
            .map_err(Error::Invalid)?;
        let seq = genl.seqs(msgs.len());
        let msgs = wire::wg_set_messages(family, dev, seq, self.config.max_message)
            .map_err(Error::Invalid)?;
        let reqs: Vec<Request> = msgs
            .iter()
            .map(|m| Request {
                bytes: m.to_vec(),
                answered: true,
            })
            .collect();
        self.messages += reqs.len();
        let out = genl
            .transact(&reqs, None)
            .map_err(|e| Error::io(doing, e))?;
        for mut r in reqs {
            zeroize::Zeroize::zeroize(&mut r.bytes);
        }
        for o in out {
            if let Err(errno) = o {
                return Err(kernel_err(doing, errno));
            }
        }
        Ok(())
    }

    fn kernel_device(&mut self, family: u16, ifname: &str) -> Result<Option<ActualDevice>> {
        let mut dev = ActualDevice::default();
        let found = self.kernel_dump(family, ifname, "", |p| wire::merge_wg_device(p, &mut dev))?;
        Ok(found.then_some(dev))
    }

    fn kernel_stats(&mut self, family: u16, ifname: &str) -> Result<Vec<PeerStats>> {
        let mut stats = BTreeMap::new();
        self.kernel_dump(family, ifname, " counters", |p| {
            wire::merge_wg_stats(p, ifname, &mut stats)
        })?;
        Ok(stats.into_values().collect())
    }

    /// Dumps a WireGuard device and hands each part to `merge` (then wipes it: it holds the
    /// private key). `Ok(false)` when there is no such device.
    fn kernel_dump(
        &mut self,
        family: u16,
        ifname: &str,
        what: &str,
        mut merge: impl FnMut(&[u8]) -> std::result::Result<(), String>,
    ) -> Result<bool> {
        let doing = format!("read WireGuard device {ifname}{what}");
        let genl = self
            .genl
            .as_mut()
            .ok_or_else(|| Error::Invalid("no generic netlink socket".into()))?;
        let seq = genl.seqs(1);
        let out = genl
            .transact(
                &[Request {
                    bytes: wire::wg_get(family, ifname, seq),
                    answered: true,
                }],
                None,
            )
            .map_err(|e| Error::io(&doing, e))?;
        match out.into_iter().next() {
            Some(Ok(parts)) => {
                let mut result = Ok(());
                for mut p in parts {
                    if result.is_ok() {
                        result = merge(&p);
                    }
                    zeroize::Zeroize::zeroize(&mut p);
                }
                result.map_err(|d| Error::decode(&doing, d))?;
                Ok(true)
            }
            Some(Err(errno)) if errno == crate::error::ENODEV || errno == crate::error::ENOENT => {
                Ok(false)
            }
            Some(Err(errno)) => Err(kernel_err(doing, errno)),
            None => Ok(false),
        }
    }

    fn rt_transact(
        &mut self,
        reqs: Vec<Request>,
        doing: &str,
    ) -> Result<Vec<crate::socket::Outcome>> {
        self.messages += reqs.iter().filter(|r| r.answered).count();
        self.rt
            .transact(&reqs, None)
            .map_err(|e| Error::io(doing, e))
    }

    fn read_links(&mut self, names: &[String]) -> Result<HashMap<String, crate::ActualLink>> {
        let seq = self.rt.seqs(names.len());
        let reqs = names
            .iter()
            .enumerate()
            .map(|(i, n)| Request {
                bytes: wire::link_get(n, seq + i as u32),
                answered: true,
            })
            .collect();
        let out = self.rt_transact(reqs, "read links")?;
        let mut links = HashMap::new();
        for (name, o) in names.iter().zip(out) {
            match o {
                Ok(replies) => {
                    for p in replies {
                        let (n, l) = wire::parse_link(&p)
                            .map_err(|d| Error::decode(format!("read link {name}"), d))?;
                        if &n == name {
                            links.insert(n, l);
                        }
                    }
                }
                Err(errno) if errno == crate::error::ENODEV => {}
                Err(errno) => return Err(kernel_err(format!("read link {name}"), errno)),
            }
        }
        Ok(links)
    }

    fn read_nft(&mut self, table: &str) -> Result<Vec<nft::NftTable>> {
        let doing = format!("read nftables tables {table}");
        let mut tables = Vec::new();
        for family in nft::FAMILIES {
            let seq = self.nft.seqs(1);
            let reqs = [Request {
                bytes: nft::get_request(family, nft::NFT_MSG_GETTABLE, Some(table), seq),
                answered: true,
            }];
            let mut o = self
                .nft
                .transact(&reqs, None)
                .map_err(|e| Error::io(&doing, e))?;
            match o.pop() {
                Some(Ok(replies)) => {
                    if let Some(p) = replies.first() {
                        let (_, _, flags) =
                            nft::decode_table(p).map_err(|d| Error::decode(&doing, d))?;
                        tables.push(nft::NftTable {
                            family,
                            name: table.to_owned(),
                            flags,
                            chains: Vec::new(),
                        });
                    }
                }
                Some(Err(errno)) if errno == crate::error::ENOENT => {}
                // A kernel without nf_tables has no table of ours.
                Some(Err(errno)) if errno == 93 || errno == crate::error::EOPNOTSUPP => {}
                Some(Err(errno)) => return Err(kernel_err(doing, errno)),
                None => {}
            }
        }
        if tables.is_empty() {
            return Ok(tables);
        }
        // One dump at a time per socket; dumps of family 0 cover every family.
        for cmd in [nft::NFT_MSG_GETCHAIN, nft::NFT_MSG_GETRULE] {
            let seq = self.nft.seqs(1);
            let reqs = [Request {
                bytes: nft::get_request(0, cmd, None, seq),
                answered: true,
            }];
            let mut o = self
                .nft
                .transact(&reqs, None)
                .map_err(|e| Error::io(&doing, e))?;
            let replies = match o.pop() {
                Some(Ok(r)) => r,
                Some(Err(errno)) => return Err(kernel_err(doing, errno)),
                None => Vec::new(),
            };
            for p in replies {
                if cmd == nft::NFT_MSG_GETCHAIN {
                    let (fam, tbl, c) =
                        nft::decode_chain(&p).map_err(|d| Error::decode(&doing, d))?;
                    if let Some(t) = tables.iter_mut().find(|t| t.family == fam && tbl == table) {
                        t.chains.push(c);
                    }
                } else {
                    let (fam, tbl, chain, exprs) =
                        nft::decode_rule(&p).map_err(|d| Error::decode(&doing, d))?;
                    if let Some(c) = tables
                        .iter_mut()
                        .find(|t| t.family == fam && tbl == table)
                        .and_then(|t| t.chains.iter_mut().find(|c| c.name == chain))
                    {
                        c.rules.push(exprs);
                    }
                }
            }
        }
        Ok(tables)
    }

    fn sysctl_path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.split('.').any(|c| {
                c.is_empty()
                    || c == ".."
                    || !c
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            })
        {
            return Err(Error::Invalid(format!("invalid sysctl key {key:?}")));
        }
        Ok(self.config.proc_sys.join(key.replace('.', "/")))
    }

    fn link_index(&mut self, name: &str) -> Result<u32> {
        if let Some(i) = self.ifindex.get(name) {
            return Ok(*i);
        }
        let links = self.read_links(&[name.to_owned()])?;
        let i = links
            .get(name)
            .map(|l| l.index)
            .ok_or_else(|| kernel_err(format!("find link {name}"), crate::error::ENODEV))?;
        self.ifindex.insert(name.to_owned(), i);
        Ok(i)
    }

    fn start_daemon(&mut self, ifname: &str, mtu: u32) -> Result<()> {
        let doing = format!("start {} {ifname}", self.config.userspace_program.display());
        let sock = uapi::socket_path(&self.config.socket_dir, ifname);
        // The daemon forks into the background; its banner and errors are kept for the
        // error message only.
        let out = match Command::new(&self.config.userspace_program)
            .arg(ifname)
            .env_remove("WG_PROCESS_FOREGROUND")
            .stdin(std::process::Stdio::null())
            .output()
        {
            Ok(out) => Some(out),
            // An init process (an agent that is its container's PID 1) may have reaped the
            // launcher before its status was read; the socket below tells whether it worked.
            Err(e) if e.raw_os_error() == Some(ECHILD) => None,
            Err(e) => return Err(Error::io(&doing, e)),
        };
        if let Some(out) = out.filter(|o| !o.status.success()) {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(Error::Io {
                doing: doing.clone(),
                source: std::io::Error::other(format!("exited with {}: {last}", out.status)),
            });
        }
        let start = Instant::now();
        while uapi::get(&self.config.socket_dir, ifname)
            .ok()
            .flatten()
            .is_none()
        {
            if start.elapsed() > self.config.daemon_timeout {
                return Err(Error::Io {
                    doing,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no socket at {}", sock.display()),
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let seq = self.rt.seqs(1);
        let out = self.rt_transact(
            vec![Request {
                bytes: wire::link_set(ifname, Some(mtu), true, seq),
                answered: true,
            }],
            &doing,
        )?;
        if let Some(Err(errno)) = out.into_iter().next() {
            return Err(kernel_err(format!("set link {ifname} mtu {mtu} up"), errno));
        }
        Ok(())
    }

    /// The device update that carries out one WireGuard operation (for removal of allowed
    /// IPs without the per-IP flag: two updates, through a throwaway peer).
    fn wg_updates(&mut self, op: &Operation, keys: &KeyRing) -> Result<Vec<DeviceUpdate>> {
        let dev = |ifname: &str| DeviceUpdate {
            ifname: ifname.to_owned(),
            ..Default::default()
        };
        Ok(match op {
            Operation::ConfigureDevice {
                interface,
                set_private_key,
                listen_port,
                firewall_mark,
            } => {
                let mut d = dev(interface);
                if let Some(f) = set_private_key {
                    let k: &PrivateKey = keys.private_key(*f).ok_or_else(|| {
                        Error::Invalid(format!("no {f} private key in the key ring"))
                    })?;
                    d.private_key = Some(Zeroizing::new(*k.as_bytes()));
                }
                d.listen_port = *listen_port;
                d.firewall_mark = *firewall_mark;
                vec![d]
            }
            Operation::RemovePeer {
                interface,
                public_key,
            } => {
                let mut p = PeerUpdate::new(*public_key);
                p.remove = true;
                let mut d = dev(interface);
                d.peers.push(p);
                vec![d]
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
                let mut d = dev(interface);
                d.peers.push(p);
                vec![d]
            }
            Operation::StartHandshake {
                interface,
                public_key,
            } => {
                // Two updates of the peer: the keepalive goes 0 → on (the kernel and
                // wireguard-go send a keepalive, hence a handshake initiation, when it is
                // switched on while the device is up), then back off. Over UAPI they are two
                // peer sections of one request; wireguard-go acts on each section's end.
                [KICK_KEEPALIVE, 0]
                    .into_iter()
                    .map(|k| {
                        let mut p = PeerUpdate::new(*public_key);
                        p.persistent_keepalive = Some(k);
                        let mut d = dev(interface);
                        d.peers.push(p);
                        d
                    })
                    .collect()
            }
            Operation::RemoveAllowedIps {
                interface,
                public_key,
                allowed_ips,
            } => {
                if self.remove_flag_supported(interface)? {
                    let mut p = PeerUpdate::new(*public_key);
                    p.update_only = true;
                    p.allowed_ips = allowed_ips.iter().map(|i| (*i, true)).collect();
                    let mut d = dev(interface);
                    d.peers.push(p);
                    vec![d]
                } else {
                    // Adding an allowed IP to another peer moves it; then drop that peer.
                    let t = throwaway_key();
                    let mut p = PeerUpdate::new(t);
                    p.allowed_ips = allowed_ips.iter().map(|i| (*i, false)).collect();
                    let mut rm = PeerUpdate::new(t);
                    rm.remove = true;
                    let mut a = dev(interface);
                    a.peers.push(p);
                    let mut b = dev(interface);
                    b.peers.push(rm);
                    vec![a, b]
                }
            }
            _ => Vec::new(),
        })
    }

    /// Executes one run of operations of the same channel, pipelined. Returns the index
    /// (within `ops`) and error of the first failure.
    fn run(
        &mut self,
        ops: &[Operation],
        keys: &KeyRing,
    ) -> std::result::Result<(), (usize, Error)> {
        let Some(first) = ops.first() else {
            return Ok(());
        };
        match channel(first, &self.wg) {
            Channel::Rt => {
                let mut reqs = Vec::new();
                let mut owner = Vec::new();
                for (i, op) in ops.iter().enumerate() {
                    let seq = self.rt.seqs(1);
                    let bytes = match op {
                        Operation::CreateLink {
                            interface,
                            kind,
                            mtu,
                        } => wire::link_create(interface, kind.as_str(), *mtu, seq),
                        Operation::DeleteLink { interface } => wire::link_delete(interface, seq),
                        Operation::SetMtu { interface, mtu } => {
                            wire::link_set(interface, Some(*mtu), false, seq)
                        }
                        Operation::SetUp { interface } => {
                            wire::link_set(interface, None, true, seq)
                        }
                        Operation::AddRoute { route } => {
                            let oif = match &route.device {
                                Some(d) if route.kind == wgmesh_core::RouteType::Unicast => {
                                    Some(self.link_index(d).map_err(|e| (i, e))?)
                                }
                                _ => None,
                            };
                            wire::route_replace(route, oif, seq)
                        }
                        Operation::DeleteRoute { route } => wire::route_delete(route, seq),
                        Operation::AddRule { rule } => wire::rule_add(rule, seq),
                        Operation::DuplicateRule { rule } => wire::rule_add_duplicate(rule, seq),
                        Operation::DeleteRule { rule } => wire::rule_delete(rule, seq),
                        _ => {
                            return Err((
                                i,
                                Error::Invalid(format!("not an rtnetlink operation: {op}")),
                            ));
                        }
                    };
                    reqs.push(Request {
                        bytes,
                        answered: true,
                    });
                    owner.push(i);
                }
                let out = self.rt_transact(reqs, "rtnetlink").map_err(|e| (0, e))?;
                for (o, i) in out.into_iter().zip(owner) {
                    if let Err(errno) = o {
                        let op = &ops[i];
                        if errno == EOPNOTSUPP && matches!(op, Operation::CreateLink { .. }) {
                            return Err((
                                i,
                                Error::NoKernelWireGuard {
                                    doing: op.to_string(),
                                },
                            ));
                        }
                        return Err((i, kernel_err(op.to_string(), errno)));
                    }
                }
                Ok(())
            }
            Channel::Genl(family) => {
                let mut reqs = Vec::new();
                let mut owner = Vec::new();
                for (i, op) in ops.iter().enumerate() {
                    let updates = self.wg_updates(op, keys).map_err(|e| (i, e))?;
                    let genl = self
                        .genl
                        .as_mut()
                        .ok_or((i, Error::Invalid("no generic netlink socket".into())))?;
                    for d in &updates {
                        let n = wire::wg_set_messages(family, d, 0, self.config.max_message)
                            .map_err(|e| (i, Error::Invalid(e)))?
                            .len();
                        let seq = genl.seqs(n);
                        for m in wire::wg_set_messages(family, d, seq, self.config.max_message)
                            .map_err(|e| (i, Error::Invalid(e)))?
                        {
                            reqs.push(Request {
                                bytes: m.to_vec(),
                                answered: true,
                            });
                            owner.push(i);
                        }
                    }
                }
                self.messages += reqs.len();
                let genl = self
                    .genl
                    .as_mut()
                    .ok_or((0, Error::Invalid("no generic netlink socket".into())))?;
                let out = genl
                    .transact(&reqs, None)
                    .map_err(|e| (0, Error::io("WireGuard generic netlink", e)))?;
                for mut r in reqs {
                    zeroize::Zeroize::zeroize(&mut r.bytes);
                }
                for (o, i) in out.into_iter().zip(owner) {
                    if let Err(errno) = o {
                        return Err((i, kernel_err(ops[i].to_string(), errno)));
                    }
                }
                Ok(())
            }
            Channel::Uapi => {
                for (i, op) in ops.iter().enumerate() {
                    if let Operation::CreateLink { interface, mtu, .. } = op {
                        self.start_daemon(interface, *mtu).map_err(|e| (i, e))?;
                        continue;
                    }
                    let updates = self.wg_updates(op, keys).map_err(|e| (i, e))?;
                    // One request: a throwaway peer is added and removed in one transaction.
                    let mut text = Zeroizing::new(String::new());
                    for (j, d) in updates.iter().enumerate() {
                        let r = uapi::set_request(d);
                        let body = if j == 0 {
                            r.as_str()
                        } else {
                            r.strip_prefix("set=1\n").unwrap_or(&r)
                        };
                        text.push_str(body.strip_suffix('\n').unwrap_or(body));
                    }
                    text.push('\n');
                    let ifname = op.interface().unwrap_or_default().to_owned();
                    self.messages += 1;
                    uapi::set(&self.config.socket_dir, &ifname, &text, &op.to_string())
                        .map_err(|e| (i, e))?;
                }
                Ok(())
            }
            Channel::Sysctl => {
                for (i, op) in ops.iter().enumerate() {
                    if let Operation::SetSysctl { key, value } = op {
                        let path = self.sysctl_path(key).map_err(|e| (i, e))?;
                        self.messages += 1;
                        std::fs::write(&path, format!("{value}\n"))
                            .map_err(|e| (i, Error::io(op.to_string(), e)))?;
                    }
                }
                Ok(())
            }
            Channel::Nft => {
                for (i, op) in ops.iter().enumerate() {
                    let (name, tables): (&str, &[nft::NftTable]) = match op {
                        Operation::SetMarking { tables } => (
                            tables.first().map(|t| t.name.as_str()).unwrap_or_default(),
                            tables,
                        ),
                        Operation::DeleteMarking { table } => (table.as_str(), &[]),
                        _ => continue,
                    };
                    let n = nft::replace_batch(name, tables, 0).len();
                    let seq = self.nft.seqs(n + 1);
                    let batch = nft::replace_batch(name, tables, seq);
                    let mut reqs: Vec<Request> = batch
                        .into_iter()
                        .enumerate()
                        .map(|(j, bytes)| Request {
                            bytes,
                            answered: j != 0 && j != n - 1,
                        })
                        .collect();
                    // A barrier in its own send: once it is answered, the batch is done.
                    reqs.push(Request {
                        bytes: nft::get_request(0, nft::NFT_MSG_GETGEN, Some(""), seq + n as u32),
                        answered: true,
                    });
                    self.messages += n;
                    let out = self
                        .nft
                        .transact(&reqs, Some(&[0..n, n..n + 1]))
                        .map_err(|e| (i, Error::io(op.to_string(), e)))?;
                    for o in out.into_iter().take(n) {
                        if let Err(errno) = o {
                            return Err((i, kernel_err(op.to_string(), errno)));
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

fn throwaway_key() -> PublicKey {
    PrivateKey::generate().public_key()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Rt,
    Genl(u16),
    Uapi,
    Sysctl,
    Nft,
}

fn channel(op: &Operation, wg: &Wg) -> Channel {
    let dev = match wg {
        Wg::Kernel { family } => Channel::Genl(*family),
        Wg::Userspace => Channel::Uapi,
    };
    match op {
        Operation::CreateLink { .. } if matches!(wg, Wg::Userspace) => Channel::Uapi,
        Operation::CreateLink { .. }
        | Operation::DeleteLink { .. }
        | Operation::SetMtu { .. }
        | Operation::SetUp { .. }
        | Operation::AddRoute { .. }
        | Operation::DeleteRoute { .. }
        | Operation::AddRule { .. }
        | Operation::DuplicateRule { .. }
        | Operation::DeleteRule { .. } => Channel::Rt,
        Operation::ConfigureDevice { .. }
        | Operation::RemovePeer { .. }
        | Operation::SetPeer { .. }
        | Operation::StartHandshake { .. }
        | Operation::RemoveAllowedIps { .. } => dev,
        Operation::SetSysctl { .. } => Channel::Sysctl,
        _ => Channel::Nft,
    }
}

/// Whether an operation changes which links exist (later runs must look indexes up anew).
fn changes_links(op: &Operation) -> bool {
    matches!(
        op,
        Operation::CreateLink { .. } | Operation::DeleteLink { .. }
    )
}

impl Dataplane for Linux {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        let mut s = ActualState::default();
        let links = self.read_links(&own.interfaces)?;
        self.ifindex = links.iter().map(|(n, l)| (n.clone(), l.index)).collect();
        let by_index: HashMap<u32, String> =
            links.iter().map(|(n, l)| (l.index, n.clone())).collect();
        for (name, l) in &links {
            let dev = match self.wg {
                Wg::Kernel { family } if l.kind.as_deref() == Some("wireguard") => {
                    self.kernel_device(family, name)?
                }
                Wg::Userspace if l.kind.as_deref() == Some("tun") => {
                    uapi::get(&self.config.socket_dir, name)?
                }
                _ => None,
            };
            if let Some(d) = dev {
                s.devices.insert(name.clone(), d);
            }
        }
        s.links = links.into_iter().collect();
        // One dump at a time per socket (the kernel answers EBUSY otherwise).
        let mut out = Vec::new();
        for (i, (family, rule)) in [
            (Family::V4, false),
            (Family::V6, false),
            (Family::V4, true),
            (Family::V6, true),
        ]
        .into_iter()
        .enumerate()
        {
            let seq = self.rt.seqs(1);
            let bytes = if rule {
                wire::rule_dump(family, seq)
            } else {
                wire::route_dump(family, seq)
            };
            let what = if i < 2 { "dump routes" } else { "dump rules" };
            let mut o = self.rt_transact(
                vec![Request {
                    bytes,
                    answered: true,
                }],
                what,
            )?;
            out.push(o.pop().unwrap_or(Ok(Vec::new())));
        }
        for (i, o) in out.into_iter().enumerate() {
            let what = if i < 2 { "dump routes" } else { "dump rules" };
            let replies = match o {
                Ok(r) => r,
                // A kernel without IPv6 has no IPv6 routes or rules.
                Err(errno) if errno == crate::error::EOPNOTSUPP || errno == 97 => continue,
                Err(errno) => return Err(kernel_err(what, errno)),
            };
            for p in replies {
                if i < 2 {
                    if let Some(mut r) =
                        wire::parse_route(&p, own.table).map_err(|d| Error::decode(what, d))?
                    {
                        r.device = r.oif.and_then(|x| by_index.get(&x).cloned());
                        s.routes.push(r);
                    }
                } else if let Some(r) =
                    wire::parse_rule(&p, own.table).map_err(|d| Error::decode(what, d))?
                {
                    s.rules.push(r);
                }
            }
        }
        for key in sysctls {
            let path = self.sysctl_path(key)?;
            match std::fs::read_to_string(&path) {
                Ok(v) => {
                    s.sysctls.insert(key.clone(), v.trim().to_owned());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("read sysctl {key}"), e)),
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
            let ch = channel(&ops[start], &self.wg);
            let mut end = start + 1;
            if !changes_links(&ops[start]) {
                while end < ops.len()
                    && channel(&ops[end], &self.wg) == ch
                    && !changes_links(&ops[end])
                {
                    end += 1;
                }
            }
            if changes_links(&ops[start]) {
                self.ifindex.clear();
            }
            if let Err((i, e)) = self.run(&ops[start..end], keys) {
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
            Wg::Kernel { .. } => LinkKind::Wireguard,
            Wg::Userspace => LinkKind::Tun,
        }
    }

    fn peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>> {
        let mut out = Vec::new();
        for name in &own.interfaces {
            match self.wg {
                Wg::Kernel { family } => match self.kernel_stats(family, name) {
                    Ok(s) => out.extend(s),
                    // A link of that name that is not a WireGuard device has no peers.
                    Err(e) if e.errno() == Some(EOPNOTSUPP) => {}
                    Err(e) => return Err(e),
                },
                Wg::Userspace => {
                    out.extend(uapi::get_stats(&self.config.socket_dir, name)?.unwrap_or_default())
                }
            }
        }
        Ok(out)
    }
}
