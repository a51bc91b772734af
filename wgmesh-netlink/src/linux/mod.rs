//! The [`Linux`] dataplane: reads what the host has of wgmesh's objects (`read`), and executes
//! operations phase by phase — lower each phase purely ([`crate::lower`]), then only send and
//! receive ([`crate::exec`]) (`execute`). The kernel behind it is a [`KernelIo`]: the host's
//! [`Sockets`], or the message-level fake kernel of the `testing` feature.

mod execute;
mod read;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::GenlCtrl;
use wgmesh_core::{PrivateKey, PublicKey};

use crate::error::{ENOENT, Error, Result};
use crate::exec::{Answer, Outgoing, Pipeline};
use crate::io::{KernelIo, Sockets};
use crate::keys::KeyRing;
use crate::op::Operation;
use crate::reconcile::Dataplane;
use crate::state::{ActualState, LinkKind, Ownership, PeerStats};
use crate::userspace::Userspace;
use crate::wire::genl::{self, DEFAULT_MAX_MESSAGE};
use crate::wire::route::RtRequest;
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
    /// How many requests are lowered and sent at a time (at least one operation's): a
    /// change is executed in pieces of this many messages, each piece's answers checked
    /// before the next piece is made, so the memory an execution takes does not grow with
    /// the change (a first apply at 5,000 nodes × 110 pods is 560,000 route messages).
    /// Default 1,024.
    pub execute_chunk: usize,
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
            execute_chunk: crate::lower::DEFAULT_CHUNK,
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
    ///
    /// ```no_run
    /// use wgmesh_netlink::{Backend, Linux, LinuxConfig};
    /// let linux = Linux::open(LinuxConfig::with_backend(Backend::Auto))?;
    /// println!("{}", linux.backend_description());
    /// # Ok::<(), wgmesh_netlink::Error>(())
    /// ```
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

    fn transact_each(
        &mut self,
        protocol: Protocol,
        reqs: &[Outgoing],
        doing: &str,
        each: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<Vec<crate::exec::Outcome>> {
        self.pipeline
            .transact_each(&mut self.io, protocol, reqs, None, doing, each)
    }

    fn rt(&mut self, reqs: &[RtRequest], doing: &str) -> Result<Vec<Answer>> {
        let out: Vec<Outgoing> = reqs
            .iter()
            .map(|(flags, m)| self.pipeline.message(Protocol::Route, *flags, m))
            .collect();
        self.messages += out.iter().filter(|o| o.answered).count();
        self.transact(Protocol::Route, &out, None, doing)
    }
}

impl<K: KernelIo> Dataplane for Linux<K> {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        self.read_state(own, sysctls, &mut |_| false)
    }

    fn read_with(
        &mut self,
        own: &Ownership,
        sysctls: &[String],
        take: &mut dyn FnMut(&crate::ActualRoute) -> bool,
    ) -> Result<ActualState> {
        self.read_state(own, sysctls, take)
    }

    fn execute(&mut self, ops: &[Operation], keys: &KeyRing) -> Result<usize> {
        self.execute_ops(ops, keys)
    }

    fn link_kind(&self) -> LinkKind {
        match self.wg {
            Driver::Kernel { .. } => LinkKind::Wireguard,
            Driver::Userspace(_) => LinkKind::Tun,
        }
    }

    fn peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>> {
        self.read_peer_stats(own)
    }

    fn strict_drops(&mut self, own: &Ownership) -> Result<Option<crate::marking::StrictDrops>> {
        let tables = self.read_nft(&own.nft_table)?;
        Ok(crate::marking::strict_drops(&tables))
    }

    /// A second `Linux` over [`KernelIo::open_another`] (new sockets), with this one's
    /// configuration.
    fn open_reader(&mut self) -> Option<Result<Box<dyn Dataplane + Send>>> {
        let io = match self.io.open_another()? {
            Ok(io) => io,
            Err(e) => return Some(Err(Error::io("open a second set of netlink sockets", e))),
        };
        Some(
            Linux::with_kernel(io, self.config.clone())
                .map(|l| Box::new(l) as Box<dyn Dataplane + Send>),
        )
    }
}
