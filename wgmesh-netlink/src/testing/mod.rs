//! Test doubles (cargo feature `testing`): [`FakeKernel`], a kernel in memory that takes the
//! very bytes the executor sends and answers as Linux does, and two wrappers around any
//! [`Dataplane`] — [`FailingDataplane`] fails the k-th operation, [`Recording`] keeps what was
//! executed.
//!
//! They are public so that other crates (the Kubernetes agent's scenario tests) can run whole
//! reconciles without a kernel. Not for production builds.
//!
//! ```
//! use wgmesh_netlink::{Linux, Reconciler, Ownership, KeyRing, Operation};
//! use wgmesh_netlink::testing::{FakeKernel, FailingDataplane, Recording};
//! use wgmesh_core::{plan_node, spec::parse_cluster};
//! let cluster = parse_cluster(r#"{"nodes":[
//!   {"name":"a","addresses":["10.0.0.1"],"pod_cidrs":["10.65.0.0/26"],
//!    "wireguard":{"public_key":"QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}}]}"#)?;
//! let plan = plan_node(&cluster, "a")?;
//! let own = Ownership::from_mesh(cluster.mesh());
//! // Fail the third operation; the next reconcile converges.
//! let kernel = Linux::with_kernel(FakeKernel::new(), Default::default())?;
//! let mut r = Reconciler::new(FailingDataplane::new(Recording::new(kernel), 2), own, KeyRing::none());
//! assert!(r.reconcile(&plan).is_err());
//! r.reconcile(&plan)?;
//! assert!(r.reconcile(&plan)?.is_noop());
//! let recorded: &[Operation] = r.dataplane().inner().recorded();
//! assert!(!recorded.is_empty());
//! // The fake kernel received real netlink messages.
//! assert!(r.dataplane().inner().inner().kernel().messages_received() > recorded.len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod kernel;

pub use kernel::{FakeDevice, FakeKernel, FakeRule, KernelVersion, RouteKey, route_key};

use crate::error::{Error, Result};
use crate::keys::KeyRing;
use crate::op::Operation;
use crate::reconcile::Dataplane;
use crate::state::{ActualRoute, ActualRouteKind, ActualState, LinkKind, Ownership, PeerStats};

/// Wraps a dataplane and fails its k-th operation (counted from 0 over the wrapper's
/// lifetime): the operations before it are executed, that one and the rest of its run are
/// not. Reads pass through. Works over the real kernel as well as over [`FakeKernel`].
#[derive(Debug)]
pub struct FailingDataplane<D> {
    inner: D,
    fail_at: Option<usize>,
    seen: usize,
}

impl<D: Dataplane> FailingDataplane<D> {
    /// Fails operation number `k` (0-based, counted across runs).
    pub fn new(inner: D, k: usize) -> Self {
        Self {
            inner,
            fail_at: Some(k),
            seen: 0,
        }
    }

    /// The wrapped dataplane.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The wrapped dataplane, mutably.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.inner
    }

    /// The wrapped dataplane, given back.
    pub fn into_inner(self) -> D {
        self.inner
    }

    /// Whether the fault has fired.
    pub fn fired(&self) -> bool {
        self.fail_at.is_none()
    }
}

impl<D: Dataplane> Dataplane for FailingDataplane<D> {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        self.inner.read(own, sysctls)
    }

    fn read_with(
        &mut self,
        own: &Ownership,
        sysctls: &[String],
        take: &mut dyn FnMut(&crate::ActualRoute) -> bool,
    ) -> Result<ActualState> {
        self.inner.read_with(own, sysctls, take)
    }

    fn execute(&mut self, ops: &[Operation], keys: &KeyRing) -> Result<usize> {
        match self.fail_at {
            Some(k) if k < self.seen + ops.len() => {
                let local = k - self.seen;
                self.fail_at = None;
                self.seen += local + 1;
                if local > 0 {
                    self.inner.execute(&ops[..local], keys)?;
                }
                Err(Error::Operation {
                    index: local,
                    total: ops.len(),
                    operation: ops[local].to_string(),
                    source: Box::new(Error::Injected {
                        doing: ops[local].to_string(),
                    }),
                })
            }
            _ => {
                self.seen += ops.len();
                self.inner.execute(ops, keys)
            }
        }
    }

    fn link_kind(&self) -> LinkKind {
        self.inner.link_kind()
    }

    fn peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>> {
        self.inner.peer_stats(own)
    }

    fn strict_drops(&mut self, own: &Ownership) -> Result<Option<crate::marking::StrictDrops>> {
        self.inner.strict_drops(own)
    }

    fn open_reader(&mut self) -> Option<Result<Box<dyn Dataplane + Send>>> {
        self.inner.open_reader()
    }
}

/// Wraps a dataplane and records every operation it carried out, in order (of a run that
/// failed, those before the failed one).
#[derive(Debug)]
pub struct Recording<D> {
    inner: D,
    recorded: Vec<Operation>,
}

impl<D: Dataplane> Recording<D> {
    /// Records what `inner` executes.
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            recorded: Vec::new(),
        }
    }

    /// Every operation executed so far, in order.
    pub fn recorded(&self) -> &[Operation] {
        &self.recorded
    }

    /// Forgets the recorded operations.
    pub fn clear_recorded(&mut self) {
        self.recorded.clear();
    }

    /// The wrapped dataplane.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The wrapped dataplane, mutably.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.inner
    }
}

impl<D: Dataplane> Dataplane for Recording<D> {
    fn read(&mut self, own: &Ownership, sysctls: &[String]) -> Result<ActualState> {
        self.inner.read(own, sysctls)
    }

    fn read_with(
        &mut self,
        own: &Ownership,
        sysctls: &[String],
        take: &mut dyn FnMut(&crate::ActualRoute) -> bool,
    ) -> Result<ActualState> {
        self.inner.read_with(own, sysctls, take)
    }

    fn execute(&mut self, ops: &[Operation], keys: &KeyRing) -> Result<usize> {
        match self.inner.execute(ops, keys) {
            Ok(n) => {
                self.recorded.extend_from_slice(ops);
                Ok(n)
            }
            Err(e) => {
                let done = match &e {
                    Error::Operation { index, .. } => *index,
                    _ => 0,
                };
                self.recorded.extend_from_slice(&ops[..done.min(ops.len())]);
                Err(e)
            }
        }
    }

    fn link_kind(&self) -> LinkKind {
        self.inner.link_kind()
    }

    fn peer_stats(&mut self, own: &Ownership) -> Result<Vec<PeerStats>> {
        self.inner.peer_stats(own)
    }

    fn strict_drops(&mut self, own: &Ownership) -> Result<Option<crate::marking::StrictDrops>> {
        self.inner.strict_drops(own)
    }

    fn open_reader(&mut self) -> Option<Result<Box<dyn Dataplane + Send>>> {
        self.inner.open_reader()
    }
}

/// A [`FakeKernel`] that several handles share, each with sockets of its own, like processes
/// on one host: [`KernelIo::open_another`](crate::KernelIo::open_another) gives another
/// handle (another thread may use it), and [`SharedKernel::kernel`] reaches the kernel itself
/// (tests drift it). Each request's acknowledgements and replies are taken from the kernel at
/// once and queued on the handle that sent it. A dump of routes or WireGuard peers is made a
/// page at a time as the handle reads it, the kernel locked for that page only, as Linux
/// does: another handle's requests run between the pages (a delta is not held up by a
/// background read of 560,000 routes), and later pages show their effects.
///
/// ```
/// use wgmesh_netlink::{KernelIo, Linux, Dataplane, Ownership, testing::{FakeKernel, SharedKernel}};
/// let shared = SharedKernel::new(FakeKernel::new());
/// let mut linux = Linux::with_kernel(shared.handle(), Default::default())?;
/// let mut reader = linux.open_reader().expect("a second handle")?;
/// let own = Ownership::from_mesh(&wgmesh_core::MeshConfig::default());
/// std::thread::spawn(move || reader.read(&own, &[])).join().unwrap()?;
/// assert!(shared.kernel().messages_received() > 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SharedKernel {
    kernel: std::sync::Arc<std::sync::Mutex<FakeKernel>>,
    answers: [std::collections::VecDeque<std::io::Result<Vec<u8>>>; 3],
    /// Each socket's unread dump, kept here between its pages.
    dumps: [Option<kernel::Dump>; 3],
}

impl SharedKernel {
    /// The first handle on `kernel`.
    pub fn new(kernel: FakeKernel) -> Self {
        Self {
            kernel: std::sync::Arc::new(std::sync::Mutex::new(kernel)),
            answers: Default::default(),
            dumps: Default::default(),
        }
    }

    /// Another handle on the same kernel, with empty sockets (what
    /// [`KernelIo::open_another`](crate::KernelIo::open_another) gives, unboxed).
    pub fn handle(&self) -> Self {
        Self {
            kernel: self.kernel.clone(),
            answers: Default::default(),
            dumps: Default::default(),
        }
    }

    /// The kernel (locked while the guard lives).
    pub fn kernel(&self) -> std::sync::MutexGuard<'_, FakeKernel> {
        self.kernel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl crate::KernelIo for SharedKernel {
    fn send(&mut self, protocol: crate::Protocol, datagram: &[u8]) -> std::io::Result<()> {
        let mut kernel = self
            .kernel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // This socket's unread dump is the kernel's while it handles the request (a second
        // dump meanwhile is refused, `EBUSY`); a new dump is taken out with it.
        let i = protocol.index();
        kernel.put_dump(protocol, self.dumps[i].take());
        let sent = kernel.send(protocol, datagram);
        self.dumps[i] = kernel.take_dump(protocol);
        sent?;
        while let Some(answer) = kernel.recv_queued(protocol) {
            self.answers[i].push_back(answer);
        }
        Ok(())
    }

    fn recv(&mut self, protocol: crate::Protocol, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let i = protocol.index();
        let next = match self.answers[i].pop_front() {
            Some(answer) => Some(answer),
            None if self.dumps[i].is_some() => {
                // One page, made now; the kernel is unlocked again before it is read.
                let kernel = self
                    .kernel
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                kernel.next_page(&mut self.dumps[i]).map(Ok)
            }
            None => None,
        };
        match next {
            Some(Ok(d)) => {
                *buf = d;
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the fake kernel has nothing to say",
            )),
        }
    }

    fn read_sysctl(&mut self, key: &str) -> std::io::Result<Option<String>> {
        self.kernel().read_sysctl(key)
    }

    fn write_sysctl(&mut self, key: &str, value: &str) -> std::io::Result<()> {
        self.kernel().write_sysctl(key, value)
    }

    fn open_another(&mut self) -> Option<std::io::Result<Box<dyn crate::KernelIo + Send>>> {
        Some(Ok(Box::new(self.handle())))
    }
}

/// A route the way [`FakeKernel`] stores it, for tests that drift state.
pub fn route(
    family: wgmesh_core::Family,
    table: u32,
    destination: ipnet::IpNet,
    kind: ActualRouteKind,
    oif: Option<u32>,
) -> ActualRoute {
    ActualRoute {
        family,
        table,
        destination,
        kind,
        device: None,
        oif,
        gateway: None,
        metric: crate::diff::route_metric(family),
        tos: 0,
    }
}
