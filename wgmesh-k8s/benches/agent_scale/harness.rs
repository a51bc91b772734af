//! The agent at cluster scale (issue 15): the agent library with its real async shell
//! (`wgmesh_k8s::run::run`: kube-runtime watchers, reflector stores, debounce, planner) over a
//! real `kube::Client`, against an in-process mock API server of `nodes` Nodes and
//! `nodes × pods` Pods shaped like the recorded AKS fixtures, programming wgmesh-netlink's
//! message-level fake kernel.
//!
//! The mock runs on a runtime of its own (one thread) so that its CPU time can be subtracted
//! from the process's; the agent runs on a two-thread runtime, as in `wgmesh-agent`.
//! Latency is measured from the moment the mock hands a watch event to the agent's stream to
//! the moment the dataplane call that sends the corresponding netlink messages returns (the
//! fake kernel has then taken and acknowledged every message).
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use ipnet::IpNet;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use wgmesh_core::{Family, MeshConfig, NodePlan, PlanDelta, PrivateKey, PublicKey, RouteSource};
use wgmesh_k8s::agent::AgentSettings;
use wgmesh_k8s::dataplane::{
    ApplyReport, BackgroundResync, Dataplane, DataplaneError, ResyncOutcome,
};
use wgmesh_k8s::metrics::Metrics;
use wgmesh_k8s::netlink::NetlinkDataplane;
use wgmesh_netlink::testing::{FakeKernel, SharedKernel};
use wgmesh_netlink::{Backend, KernelIo, KeyRing, Linux, LinuxConfig, Protocol, Sockets};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// IP slots per node (pods occupy `pods` of them; churn moves pods between them).
const SLOTS: usize = 128;
/// Watch events kept for replay; a watch from before them gets `410 Gone` (a relist).
const LOG_CAP: usize = 200_000;

// ---------------------------------------------------------------------------------------
// The cluster's shape

fn node_name(n: usize) -> String {
    format!("aks-nodepool1-19852467-vmss{n:06}")
}

fn node_v4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200 + (n / 256) as u8, (n % 256) as u8, 4)
}

/// Pod slot `s` of node `n`: 10.(64 + n / 256).(n % 256).(2 + s), in the node's pod CIDR.
pub fn pod_ip(n: usize, s: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 64 + (n / 256) as u8, (n % 256) as u8, 2 + s as u8)
}

/// Node `n`'s public key: distinct bytes (public keys are not checked against the curve).
fn node_key(n: usize) -> String {
    let mut b = [0x5au8; 32];
    b[..8].copy_from_slice(&(n as u64 + 1).to_le_bytes());
    PublicKey::from_bytes(b).unwrap().to_base64()
}

/// The agent's own private key (node 0 carries its public key: a restart, not a first boot).
pub fn agent_key() -> PrivateKey {
    PrivateKey::from_bytes([7u8; 32]).unwrap()
}

/// The mesh the agent runs: Azure CNI style, dual-stack nodes, host encryption.
pub fn mesh() -> MeshConfig {
    let mut mesh = MeshConfig::default();
    mesh.route_source = RouteSource::WorkloadIps;
    mesh.host_encryption = true;
    mesh.cluster_cidrs = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
    mesh
}

fn fixture(name: &str) -> Value {
    let text = match name {
        "nodes" => include_str!("../../tests/fixtures/aks-azure-cni-nodes.json"),
        _ => include_str!("../../tests/fixtures/aks-azure-cni-pods.json"),
    };
    let list: Value = serde_json::from_str(text).unwrap();
    list["items"][0].clone()
}

/// A recorded AKS Node, renamed and re-addressed: dual stack, both keys, both pod CIDRs.
fn node_object(template: &Value, n: usize, key: &str) -> Value {
    let mut node = template.clone();
    let name = node_name(n);
    node["metadata"]["name"] = json!(name);
    node["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{n:012}"));
    node["metadata"]["labels"]["kubernetes.io/hostname"] = json!(name);
    node["metadata"]["annotations"]["wgmesh.io/public-key"] = json!(key);
    node["metadata"]["annotations"]["wgmesh.io/public-key-v6"] = json!(key);
    node["spec"]["podCIDR"] = json!(format!("10.{}.{}.0/24", 64 + n / 256, n % 256));
    node["spec"]["podCIDRs"] = json!([
        format!("10.{}.{}.0/24", 64 + n / 256, n % 256),
        format!("fd00:10:244:{n:x}::/64")
    ]);
    node["status"]["addresses"] = json!([
        {"address": name, "type": "Hostname"},
        {"address": node_v4(n).to_string(), "type": "InternalIP"},
        {"address": format!("fd00:240::{n:x}"), "type": "InternalIP"},
    ]);
    node
}

/// A recorded AKS Pod serialized once with placeholders, then spliced per pod (the mock must
/// not be the bottleneck of a 550,000-pod list).
struct PodTemplate {
    parts: Vec<Vec<u8>>,
    slots: Vec<u8>,
}

impl PodTemplate {
    fn new() -> Self {
        let mut pod = fixture("pods");
        pod["metadata"]["name"] = json!("@N@");
        pod["metadata"]["namespace"] = json!("default");
        pod["metadata"]["uid"] = json!("@U@");
        pod["metadata"]["resourceVersion"] = json!("@R@");
        pod["spec"]["nodeName"] = json!("@H@");
        pod["status"]["podIP"] = json!("@I@");
        pod["status"]["podIPs"] = json!([{"ip": "@I@"}]);
        pod["status"]["hostIP"] = json!("@A@");
        pod["status"]["hostIPs"] = json!([{"ip": "@A@"}]);
        let text = serde_json::to_vec(&pod).unwrap();
        let (mut parts, mut slots, mut at) = (Vec::new(), Vec::new(), 0);
        let mut i = 0;
        while i + 2 < text.len() {
            if text[i] == b'@' && text[i + 2] == b'@' {
                parts.push(text[at..i].to_vec());
                slots.push(text[i + 1]);
                i += 3;
                at = i;
            } else {
                i += 1;
            }
        }
        parts.push(text[at..].to_vec());
        Self { parts, slots }
    }

    fn write(&self, out: &mut Vec<u8>, id: u32, n: usize, s: usize, rv: u64) {
        use std::io::Write;
        for (part, slot) in self.parts.iter().zip(&self.slots) {
            out.extend_from_slice(part);
            let _ = match slot {
                b'N' => write!(out, "p{id}"),
                b'U' => write!(out, "10000000-0000-4000-8000-{id:012}"),
                b'R' => write!(out, "{rv}"),
                b'H' => out.write_all(node_name(n).as_bytes()),
                b'I' => write!(out, "{}", pod_ip(n, s)),
                _ => write!(out, "{}", node_v4(n)),
            };
        }
        out.extend_from_slice(self.parts.last().unwrap());
    }
}

// ---------------------------------------------------------------------------------------
// Heap by part: the agent, the mock API server, the fake kernel

/// Live heap bytes by the part of the process that allocated them, when the bench installs
/// [`heap::Tagged`] as its global allocator (the smoke test does not: figures read zero).
///
/// Each allocation carries a 16-byte header with the part that made it (the thread's current
/// part: the mock's runtime threads are the mock, code inside the fake kernel's `send` and
/// `recv` is the kernel, everything else the agent), so a free is charged to the part that
/// allocated, wherever it happens. The headers themselves are not counted (but are in RSS).
pub mod heap {
    use std::alloc::{GlobalAlloc, Layout};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

    // The allocator under the tags: the one `wgmesh-agent` has on the same target (glibc's
    // malloc; mimalloc in the static musl build of the image).
    #[cfg(target_env = "musl")]
    use mimalloc::MiMalloc as Inner;
    #[cfg(not(target_env = "musl"))]
    use std::alloc::System as Inner;

    /// What `wgmesh-agent` gives `daemon::set_memory_release` on the same target.
    #[cfg(target_env = "musl")]
    #[allow(unsafe_code)]
    pub fn collect() -> bool {
        // SAFETY: mi_collect takes a flag and only frees and purges mimalloc's free memory.
        unsafe { libmimalloc_sys::mi_collect(true) };
        true
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Part {
        Agent = 0,
        Mock = 1,
        Kernel = 2,
        /// Inside the agent's dataplane calls (the reconciler: operations, netlink messages,
        /// route folds, a resync's read and diff), less the fake kernel's own.
        Dataplane = 3,
    }

    static INSTALLED: AtomicBool = AtomicBool::new(false);
    static LIVE: [AtomicIsize; 4] = [const { AtomicIsize::new(0) }; 4];
    static PEAK: [AtomicIsize; 4] = [const { AtomicIsize::new(0) }; 4];
    static TOTAL: AtomicIsize = AtomicIsize::new(0);
    static TOTAL_PEAK: AtomicIsize = AtomicIsize::new(0);
    /// The agent with its dataplane calls (parts 0 and 3): their peaks fall at different
    /// moments, so the sum of the two parts' peaks would overstate the agent's.
    static AGENT: AtomicIsize = AtomicIsize::new(0);
    static AGENT_PEAK: AtomicIsize = AtomicIsize::new(0);
    /// Live allocations by part: each carries a 16-byte tag (in RSS, not in the figures).
    static COUNT: [AtomicIsize; 4] = [const { AtomicIsize::new(0) }; 4];

    thread_local! {
        static CURRENT: Cell<u8> = const { Cell::new(0) };
    }

    /// Makes `part` the current thread's part; returns the previous one.
    pub fn enter(part: Part) -> u8 {
        CURRENT.with(|c| c.replace(part as u8))
    }

    /// Restores what [`enter`] returned.
    pub fn leave(previous: u8) {
        CURRENT.with(|c| c.set(previous));
    }

    /// [`enter`] until the guard is dropped.
    pub fn within(part: Part) -> Within {
        Within(enter(part))
    }

    pub struct Within(u8);

    /// `f` with `part` as the current thread's part.
    pub fn tagged<T>(part: Part, f: impl FnOnce() -> T) -> T {
        let _within = within(part);
        f()
    }

    impl Drop for Within {
        fn drop(&mut self) {
            leave(self.0);
        }
    }

    /// Whether the allocator is installed (the figures mean something).
    pub fn installed() -> bool {
        INSTALLED.load(Relaxed)
    }

    /// (live, peak since [`reset_peaks`]) in MB for agent, mock, kernel, dataplane, the
    /// total, and the agent with its dataplane calls.
    pub fn figures() -> [(f64, f64); 6] {
        let mb = |v: isize| v as f64 / (1024.0 * 1024.0);
        let part = |i: usize| (mb(LIVE[i].load(Relaxed)), mb(PEAK[i].load(Relaxed)));
        [
            part(0),
            part(1),
            part(2),
            part(3),
            (mb(TOTAL.load(Relaxed)), mb(TOTAL_PEAK.load(Relaxed))),
            (mb(AGENT.load(Relaxed)), mb(AGENT_PEAK.load(Relaxed))),
        ]
    }

    /// Live allocations by part: agent, mock, kernel, dataplane.
    pub fn counts() -> [isize; 4] {
        [0, 1, 2, 3].map(|i| COUNT[i].load(Relaxed))
    }

    pub fn reset_peaks() {
        for i in 0..4 {
            PEAK[i].store(LIVE[i].load(Relaxed), Relaxed);
        }
        TOTAL_PEAK.store(TOTAL.load(Relaxed), Relaxed);
        AGENT_PEAK.store(AGENT.load(Relaxed), Relaxed);
    }

    fn count(tag: u8, n: isize) {
        COUNT[usize::from(tag.min(3))].fetch_add(n, Relaxed);
    }

    fn account(tag: u8, bytes: isize) {
        let i = usize::from(tag.min(3));
        let live = LIVE[i].fetch_add(bytes, Relaxed) + bytes;
        PEAK[i].fetch_max(live, Relaxed);
        let total = TOTAL.fetch_add(bytes, Relaxed) + bytes;
        TOTAL_PEAK.fetch_max(total, Relaxed);
        if i == 0 || i == 3 {
            let agent = AGENT.fetch_add(bytes, Relaxed) + bytes;
            AGENT_PEAK.fetch_max(agent, Relaxed);
        }
    }

    const HEADER: usize = 16;

    fn outer(l: &Layout, size: usize) -> Option<(Layout, usize)> {
        let offset = l.align().max(HEADER);
        Layout::from_size_align(size.checked_add(offset)?, offset)
            .ok()
            .map(|o| (o, offset))
    }

    pub struct Tagged;

    // SAFETY: every block handed out is `offset` bytes into a block of `Inner` of the
    // outer layout, which is recomputed from the caller's layout at free and realloc; the
    // tag byte sits at the start of the outer block.
    #[allow(unsafe_code)]
    unsafe impl GlobalAlloc for Tagged {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            INSTALLED.store(true, Relaxed);
            let Some((o, offset)) = outer(&l, l.size()) else {
                return std::ptr::null_mut();
            };
            // SAFETY: `o` has a non-zero size.
            let base = unsafe { Inner.alloc(o) };
            if base.is_null() {
                return base;
            }
            let tag = CURRENT.try_with(Cell::get).unwrap_or(0);
            // SAFETY: the block is at least `offset` ≥ 16 bytes long.
            unsafe {
                base.write(tag);
                account(tag, l.size() as isize);
                count(tag, 1);
                base.add(offset)
            }
        }

        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            let Some((o, offset)) = outer(&l, l.size()) else {
                return;
            };
            // SAFETY: `p` came from `alloc` or `realloc` with this layout.
            unsafe {
                let base = p.sub(offset);
                account(*base, -(l.size() as isize));
                count(*base, -1);
                Inner.dealloc(base, o);
            }
        }

        unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
            let (Some((o, offset)), Some(_)) = (outer(&l, l.size()), outer(&l, new_size)) else {
                return std::ptr::null_mut();
            };
            // SAFETY: `p` came from `alloc` or `realloc` with layout `l`; the header moves
            // with the block.
            unsafe {
                let base = p.sub(offset);
                let tag = *base;
                let nb = Inner.realloc(base, o, new_size + offset);
                if nb.is_null() {
                    return nb;
                }
                account(tag, new_size as isize - l.size() as isize);
                nb.add(offset)
            }
        }
    }
}

/// The fake kernel with a stopwatch and the heap's `Kernel` tag around every call: what the
/// kernel itself costs, apart from the agent and wgmesh-netlink that drive it.
///
/// The kernel is shared ([`SharedKernel`]): the agent's background resync reads it through a
/// second handle on its own thread, timed alike.
pub struct TimedKernel<K = SharedKernel> {
    pub inner: K,
    pub spent: Arc<Mutex<Duration>>,
}

impl<K> TimedKernel<K> {
    fn timed<T>(&mut self, f: impl FnOnce(&mut K) -> T) -> T {
        let previous = heap::enter(heap::Part::Kernel);
        let start = Instant::now();
        let r = f(&mut self.inner);
        *self.spent.lock().unwrap() += start.elapsed();
        heap::leave(previous);
        r
    }
}

impl<K: KernelIo + Send + 'static> KernelIo for TimedKernel<K> {
    fn send(&mut self, protocol: Protocol, datagram: &[u8]) -> std::io::Result<()> {
        self.timed(|k| k.send(protocol, datagram))
    }
    fn recv(&mut self, protocol: Protocol, buf: &mut Vec<u8>) -> std::io::Result<()> {
        self.timed(|k| k.recv(protocol, buf))
    }
    fn read_sysctl(&mut self, key: &str) -> std::io::Result<Option<String>> {
        self.timed(|k| k.read_sysctl(key))
    }
    fn write_sysctl(&mut self, key: &str, value: &str) -> std::io::Result<()> {
        self.timed(|k| k.write_sysctl(key, value))
    }
    fn open_another(&mut self) -> Option<std::io::Result<Box<dyn KernelIo + Send>>> {
        let spent = self.spent.clone();
        self.inner.open_another().map(|r| {
            r.map(|inner| Box::new(TimedKernel { inner, spent }) as Box<dyn KernelIo + Send>)
        })
    }
}

// ---------------------------------------------------------------------------------------
// What the dataplane saw: the latency join

/// Events the mock emitted and the dataplane has not carried out yet, and what was measured.
#[derive(Default)]
pub struct Tracker {
    /// (pod IP, added) → emission times not yet carried out.
    outstanding: HashMap<(Ipv4Addr, bool), Vec<Instant>>,
    pub outstanding_count: usize,
    /// (emitted, carried out).
    pub latencies: Vec<(Instant, Instant)>,
    /// Public keys of nodes expected to become peers.
    pub want_peers: HashSet<PublicKey>,
    pub peers_done_at: Option<Instant>,
    /// Full reconciles: (start, end, peers, routes).
    pub reconciles: Vec<(Instant, Instant, usize, usize)>,
    /// Background resyncs: (begun, finished, operations).
    pub background: Vec<(Instant, Instant, usize)>,
    begun: Option<Instant>,
    /// The longest time a background resync held the event loop: its beginning (the plan's
    /// snapshot) and its end (the repairs), each.
    pub background_loop_max: Duration,
    /// Resolve outstanding events by the dataplane's plan after deltas (the relist after
    /// the outage), and when that was last done.
    pub resolve_by_plan: bool,
    checked_plan: Option<Instant>,
    pub deltas: usize,
    pub errors: Vec<String>,
}

impl Tracker {
    fn emitted(&mut self, ip: Ipv4Addr, added: bool, at: Instant) {
        // A later event for the same address supersedes an earlier one not carried out yet.
        if let Some(v) = self.outstanding.remove(&(ip, !added)) {
            self.outstanding_count -= v.len();
        }
        self.outstanding.entry((ip, added)).or_default().push(at);
        self.outstanding_count += 1;
    }

    fn done(&mut self, ip: Ipv4Addr, added: bool, at: Instant) {
        if let Some(v) = self.outstanding.remove(&(ip, added)) {
            self.outstanding_count -= v.len();
            self.latencies.extend(v.into_iter().map(|t| (t, at)));
        }
    }

    /// Everything outstanding that a plan holding the addresses `present` reflects is
    /// carried out at `at`.
    fn resolve(&mut self, present: &HashSet<Ipv4Addr>, at: Instant) {
        let keys: Vec<(Ipv4Addr, bool)> = self.outstanding.keys().copied().collect();
        for (ip, added) in keys {
            if present.contains(&ip) == added {
                self.done(ip, added, at);
            }
        }
    }

    fn peer_done(&mut self, key: &PublicKey, at: Instant) {
        if self.want_peers.remove(key) && self.want_peers.is_empty() {
            self.peers_done_at = Some(at);
        }
    }
}

fn host_v4(net: &IpNet) -> Option<Ipv4Addr> {
    match net {
        IpNet::V4(n) if n.prefix_len() == 32 => Some(n.addr()),
        _ => None,
    }
}

/// The real netlink dataplane over the fake kernel, with the measuring hook around it.
pub struct Timed<K = SharedKernel> {
    inner: NetlinkDataplane<Linux<TimedKernel<K>>>,
    tracker: Arc<Mutex<Tracker>>,
    foreground_resync: bool,
}

/// What a full reconcile of `plan` ended: its time, and the events and peers it carried out.
fn record_reconcile(
    tracker: &Mutex<Tracker>,
    plan: &NodePlan,
    start: Instant,
    end: Instant,
    r: Result<ApplyReport, DataplaneError>,
) -> Result<ApplyReport, DataplaneError> {
    // The measuring is the harness's, not the agent's.
    let _harness = heap::within(heap::Part::Mock);
    let mut t = tracker.lock().unwrap();
    if let Err(e) = &r {
        t.errors.push(e.to_string());
        return r;
    }
    let peers = plan.interfaces.iter().map(|i| i.peers.len()).sum();
    t.reconciles.push((start, end, peers, plan.routes.len()));
    // Everything outstanding that the plan now reflects is carried out.
    if t.outstanding_count > 0 {
        let present: HashSet<Ipv4Addr> = plan
            .routes
            .iter()
            .filter_map(|r| host_v4(&r.destination))
            .collect();
        t.resolve(&present, end);
    }
    if !t.want_peers.is_empty() {
        for p in plan.interfaces.iter().flat_map(|i| &i.peers) {
            t.peer_done(&p.public_key, end);
        }
    }
    r
}

impl<K: KernelIo + Send + 'static> Dataplane for Timed<K> {
    fn public_key(&self, family: Family) -> Option<PublicKey> {
        self.inner.public_key(family)
    }

    fn reconcile(&mut self, plan: &NodePlan) -> Result<ApplyReport, DataplaneError> {
        let start = Instant::now();
        let r = heap::tagged(heap::Part::Dataplane, || self.inner.reconcile(plan));
        let end = Instant::now();
        record_reconcile(&self.tracker, plan, start, end, r)
    }

    fn reconcile_owned(&mut self, plan: NodePlan) -> Result<ApplyReport, DataplaneError> {
        // The agent hands its plan over; the harness reads it after the apply, from the
        // reconciler (folded, so the same plan).
        let start = Instant::now();
        let r = heap::tagged(heap::Part::Dataplane, || self.inner.reconcile_owned(plan));
        let end = Instant::now();
        if let Err(e) = &r {
            let _harness = heap::within(heap::Part::Mock);
            self.tracker.lock().unwrap().errors.push(e.to_string());
            return r;
        }
        match self.inner.reconciler_mut().current_plan() {
            Some(plan) => record_reconcile(&self.tracker, plan, start, end, r),
            None => r,
        }
    }

    fn begin_resync(&mut self) -> Option<Result<BackgroundResync, DataplaneError>> {
        if self.foreground_resync {
            return None;
        }
        let start = Instant::now();
        let r = heap::tagged(heap::Part::Dataplane, || self.inner.begin_resync()).map(|r| {
            r.map(|job| {
                BackgroundResync::new(move || heap::tagged(heap::Part::Dataplane, || job.run()))
            })
        });
        let held = start.elapsed();
        let _harness = heap::within(heap::Part::Mock);
        let mut t = self.tracker.lock().unwrap();
        t.begun = Some(start);
        t.background_loop_max = t.background_loop_max.max(held);
        r
    }

    fn finish_resync(&mut self, outcome: ResyncOutcome) -> Result<ApplyReport, DataplaneError> {
        let start = Instant::now();
        let r = heap::tagged(heap::Part::Dataplane, || self.inner.finish_resync(outcome));
        let end = Instant::now();
        let _harness = heap::within(heap::Part::Mock);
        let mut t = self.tracker.lock().unwrap();
        t.background_loop_max = t.background_loop_max.max(end - start);
        match &r {
            Err(e) => t.errors.push(e.to_string()),
            Ok(report) => {
                let begun = t.begun.take().unwrap_or(end);
                t.background.push((begun, end, report.operations));
            }
        }
        r
    }

    fn apply_delta(&mut self, delta: &PlanDelta) -> Result<ApplyReport, DataplaneError> {
        let r = heap::tagged(heap::Part::Dataplane, || self.inner.apply_delta(delta));
        let end = Instant::now();
        let _harness = heap::within(heap::Part::Mock);
        let mut t = self.tracker.lock().unwrap();
        if let Err(e) = &r {
            t.errors.push(e.to_string());
            return r;
        }
        t.deltas += 1;
        for route in &delta.routes_added {
            if let Some(ip) = host_v4(&route.destination) {
                t.done(ip, true, end);
            }
        }
        for route in &delta.routes_removed {
            if let Some(ip) = host_v4(&route.destination) {
                t.done(ip, false, end);
            }
        }
        for p in &delta.peers_added {
            t.peer_done(&p.peer.public_key, end);
        }
        // After an outage, events that cancel out (a pod deleted and another created in its
        // slot, with its address) reach the agent as no change at all: resolved by the plan
        // the dataplane holds, at most twice a second.
        if t.resolve_by_plan
            && t.outstanding_count > 0
            && t.checked_plan
                .is_none_or(|c| end - c > Duration::from_millis(500))
        {
            t.checked_plan = Some(end);
            drop(t);
            let present: HashSet<Ipv4Addr> = match self.inner.reconciler_mut().current_plan() {
                Some(plan) => plan
                    .routes
                    .iter()
                    .filter_map(|r| host_v4(&r.destination))
                    .collect(),
                None => HashSet::new(),
            };
            let mut t = self.tracker.lock().unwrap();
            t.resolve(&present, end);
        }
        r
    }
}

// ---------------------------------------------------------------------------------------
// The mock API server

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Node,
    Pod,
}

#[derive(Clone)]
enum Obj {
    Node(Arc<Value>),
    Pod { id: u32, node: u32, slot: u8 },
}

struct Watcher {
    kind: Kind,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// One request as the mock saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub watch: bool,
    pub status: u16,
}

struct State {
    rv: u64,
    nodes: Vec<Arc<Value>>,
    /// Per node, per IP slot: the pod there.
    slots: Vec<[Option<u32>; SLOTS]>,
    next_pod: u32,
    log: VecDeque<(u64, Kind, &'static str, Obj)>,
    /// The oldest resource version a watch may start from.
    log_floor: u64,
    watchers: Vec<Watcher>,
    requests: Vec<Recorded>,
    down: bool,
    rng: u64,
    template: PodTemplate,
    node_template: Value,
    tracker: Arc<Mutex<Tracker>>,
}

impl State {
    fn rand(&mut self, below: usize) -> usize {
        // xorshift64*: deterministic runs.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % below
    }

    fn line(&self, event: &str, obj: &Obj, rv: u64) -> Bytes {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(b"{\"type\":\"");
        out.extend_from_slice(event.as_bytes());
        out.extend_from_slice(b"\",\"object\":");
        self.write_obj(&mut out, obj, rv);
        out.extend_from_slice(b"}\n");
        Bytes::from(out)
    }

    fn write_obj(&self, out: &mut Vec<u8>, obj: &Obj, rv: u64) {
        match obj {
            Obj::Node(v) => serde_json::to_writer(&mut *out, &**v).unwrap(),
            Obj::Pod { id, node, slot } => {
                self.template
                    .write(out, *id, *node as usize, *slot as usize, rv)
            }
        }
    }

    fn emit(&mut self, kind: Kind, event: &'static str, obj: Obj) {
        self.rv += 1;
        let rv = self.rv;
        if !self.watchers.is_empty() {
            let line = self.line(event, &obj, rv);
            self.watchers
                .retain(|w| w.kind != kind || w.tx.send(line.clone()).is_ok());
        }
        self.log.push_back((rv, kind, event, obj));
        if self.log.len() > LOG_CAP {
            self.log.pop_front();
            self.log_floor = self.log.front().map_or(self.rv, |e| e.0 - 1);
        }
    }

    /// One pod event: a creation, a deletion or an IP move, in turn.
    fn churn_one(&mut self, turn: u64) {
        let now = Instant::now();
        // A node with a slot of each kind the turn needs (a free one to add, a pod to delete
        // or move): after enough churn a node can be full or empty, and picking a slot there
        // never ended.
        let (free, held) = match turn % 3 {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        let n = loop {
            let n = self.rand(self.slots.len());
            let slots = &self.slots[n];
            if (!free || slots.iter().any(Option::is_none))
                && (!held || slots.iter().any(Option::is_some))
            {
                break n;
            }
        };
        let pick = |st: &mut Self, occupied: bool| loop {
            let s = st.rand(SLOTS);
            if st.slots[n][s].is_some() == occupied {
                return s;
            }
        };
        match turn % 3 {
            0 => {
                let s = pick(self, false);
                let id = self.next_pod;
                self.next_pod += 1;
                self.slots[n][s] = Some(id);
                self.tracker
                    .lock()
                    .unwrap()
                    .emitted(pod_ip(n, s), true, now);
                let obj = Obj::Pod {
                    id,
                    node: n as u32,
                    slot: s as u8,
                };
                self.emit(Kind::Pod, "ADDED", obj);
            }
            1 => {
                let s = pick(self, true);
                let id = self.slots[n][s].take().unwrap();
                self.tracker
                    .lock()
                    .unwrap()
                    .emitted(pod_ip(n, s), false, now);
                let obj = Obj::Pod {
                    id,
                    node: n as u32,
                    slot: s as u8,
                };
                self.emit(Kind::Pod, "DELETED", obj);
            }
            _ => {
                let from = pick(self, true);
                let to = pick(self, false);
                let id = self.slots[n][from].take().unwrap();
                self.slots[n][to] = Some(id);
                {
                    let mut t = self.tracker.lock().unwrap();
                    t.emitted(pod_ip(n, from), false, now);
                    t.emitted(pod_ip(n, to), true, now);
                }
                let obj = Obj::Pod {
                    id,
                    node: n as u32,
                    slot: to as u8,
                };
                self.emit(Kind::Pod, "MODIFIED", obj);
            }
        }
    }

    fn add_node(&mut self, pods: usize) {
        let n = self.nodes.len();
        let key = node_key(n);
        let node = Arc::new(node_object(&self.node_template, n, &key));
        self.nodes.push(node.clone());
        self.slots.push([None; SLOTS]);
        self.tracker
            .lock()
            .unwrap()
            .want_peers
            .insert(PublicKey::from_base64(&key).unwrap());
        self.emit(Kind::Node, "ADDED", Obj::Node(node));
        for s in 0..pods {
            let id = self.next_pod;
            self.next_pod += 1;
            self.slots[n][s] = Some(id);
            let obj = Obj::Pod {
                id,
                node: n as u32,
                slot: s as u8,
            };
            self.emit(Kind::Pod, "ADDED", obj);
        }
    }

    /// A page of a list: `limit` objects from `offset` (node index, or node × SLOTS + slot).
    fn list(&self, kind: Kind, limit: usize, token: Option<&str>) -> Vec<u8> {
        let (rv, mut at) = token
            .and_then(|t| t.split_once('-'))
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .unwrap_or((self.rv, 0usize));
        let mut out = Vec::with_capacity(limit * 3000);
        let list_kind = if kind == Kind::Node {
            "NodeList"
        } else {
            "PodList"
        };
        out.extend_from_slice(
            format!("{{\"kind\":\"{list_kind}\",\"apiVersion\":\"v1\",\"items\":[").as_bytes(),
        );
        let mut count = 0;
        let end = match kind {
            Kind::Node => self.nodes.len(),
            Kind::Pod => self.slots.len() * SLOTS,
        };
        while at < end && count < limit {
            let obj = match kind {
                Kind::Node => Some(Obj::Node(self.nodes[at].clone())),
                Kind::Pod => self.slots[at / SLOTS][at % SLOTS].map(|id| Obj::Pod {
                    id,
                    node: (at / SLOTS) as u32,
                    slot: (at % SLOTS) as u8,
                }),
            };
            at += 1;
            if let Some(obj) = obj {
                if count > 0 {
                    out.push(b',');
                }
                self.write_obj(&mut out, &obj, rv);
                count += 1;
            }
        }
        let more = match kind {
            Kind::Node => at < end,
            Kind::Pod => (at..end).any(|i| self.slots[i / SLOTS][i % SLOTS].is_some()),
        };
        let cont = if more {
            format!(",\"continue\":\"{rv}-{at}\"")
        } else {
            String::new()
        };
        out.extend_from_slice(
            format!("],\"metadata\":{{\"resourceVersion\":\"{rv}\"{cont}}}}}").as_bytes(),
        );
        out
    }
}

/// The mock API server. Cloning shares it.
#[derive(Clone)]
pub struct MockApi {
    state: Arc<Mutex<State>>,
    runtime: tokio::runtime::Handle,
}

fn full(code: u16, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(
            Full::new(body.into())
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .unwrap()
}

fn status(code: u16, reason: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": reason, "reason": reason, "code": code});
    full(code, serde_json::to_vec(&body).unwrap())
}

fn query_map(query: &str) -> HashMap<&str, &str> {
    query.split('&').filter_map(|p| p.split_once('=')).collect()
}

impl MockApi {
    /// A cluster of `nodes` nodes with `pods` pods each, on the runtime of `runtime`.
    pub fn new(nodes: usize, pods: usize, runtime: tokio::runtime::Handle) -> Self {
        assert!(pods <= SLOTS);
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let node_template = fixture("nodes");
        let agent_public = agent_key().public_key().to_base64();
        let node_list = (0..nodes)
            .map(|n| {
                let key = if n == 0 {
                    agent_public.clone()
                } else {
                    node_key(n)
                };
                Arc::new(node_object(&node_template, n, &key))
            })
            .collect();
        let mut next_pod = 0;
        let slots = (0..nodes)
            .map(|_| {
                let mut s = [None; SLOTS];
                for slot in s.iter_mut().take(pods) {
                    *slot = Some(next_pod);
                    next_pod += 1;
                }
                s
            })
            .collect();
        let state = State {
            rv: 1000,
            nodes: node_list,
            slots,
            next_pod,
            log: VecDeque::new(),
            log_floor: 1000,
            watchers: Vec::new(),
            requests: Vec::new(),
            down: false,
            rng: 0x9E37_79B9_7F4A_7C15,
            template: PodTemplate::new(),
            node_template,
            tracker,
        };
        Self {
            state: Arc::new(Mutex::new(state)),
            runtime,
        }
    }

    pub fn tracker(&self) -> Arc<Mutex<Tracker>> {
        self.state.lock().unwrap().tracker.clone()
    }

    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn watchers(&self) -> usize {
        self.state.lock().unwrap().watchers.len()
    }

    /// The API server goes down (every request fails with 503, watches end) or comes back;
    /// coming back, its watch cache has been compacted: watches resume with `410 Gone`.
    pub fn set_down(&self, down: bool) {
        let mut s = self.state.lock().unwrap();
        s.down = down;
        if down {
            s.watchers.clear();
        } else {
            s.log.clear();
            s.log_floor = s.rv;
        }
    }

    /// `count` pod events (creations, deletions, IP moves in turn) spread evenly over one
    /// second's ticks at `rate` per second, until `until`.
    pub async fn churn(&self, rate: usize, until: Instant) {
        let tick = Duration::from_millis(5);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let start = Instant::now();
        let mut sent = 0u64;
        while Instant::now() < until {
            interval.tick().await;
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            let mut s = self.state.lock().unwrap();
            while sent < due {
                s.churn_one(sent);
                sent += 1;
            }
        }
    }

    /// A node pool of `count` nodes joins at once, with `pods` pods each.
    pub fn burst(&self, count: usize, pods: usize) {
        let mut s = self.state.lock().unwrap();
        for _ in 0..count {
            s.add_node(pods);
        }
    }

    fn handle(&self, method: String, path: String, query: String, body: Bytes) -> Response<Body> {
        let q = query_map(&query);
        let watch = q.get("watch") == Some(&"true");
        let mut s = self.state.lock().unwrap();
        let code = |s: &mut State, code: u16| {
            s.requests.push(Recorded {
                at: Instant::now(),
                method: method.clone(),
                path: path.clone(),
                watch,
                status: code,
            });
        };
        if s.down {
            code(&mut s, 503);
            return status(503, "ServiceUnavailable");
        }
        let kind = match path.as_str() {
            "/api/v1/nodes" => Some(Kind::Node),
            "/api/v1/pods" => Some(Kind::Pod),
            _ => None,
        };
        match (method.as_str(), kind) {
            ("GET", Some(kind)) if !watch => {
                code(&mut s, 200);
                let limit = q
                    .get("limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(usize::MAX);
                let token = q.get("continue").copied();
                let body = s.list(kind, limit, token);
                drop(s);
                full(200, body)
            }
            ("GET", Some(kind)) => {
                let since: u64 = q
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                code(&mut s, 200);
                let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                if since < s.log_floor {
                    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                        "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                        "message": "too old resource version"}});
                    let mut line = serde_json::to_vec(&gone).unwrap();
                    line.push(b'\n');
                    let _ = tx.send(Bytes::from(line));
                    drop(tx);
                } else {
                    for (rv, k, ev, obj) in &s.log {
                        if *k == kind && *rv > since {
                            let _ = tx.send(s.line(ev, obj, *rv));
                        }
                    }
                    s.watchers.push(Watcher { kind, tx });
                }
                let timeout: u64 = q
                    .get("timeoutSeconds")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(290);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
                let stream = futures::stream::unfold(rx, move |mut rx| async move {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(b)) => Some((Ok::<_, Infallible>(Frame::data(b)), rx)),
                        _ => None,
                    }
                });
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(stream).boxed_unsync())
                    .unwrap()
            }
            ("PATCH", None) if path.starts_with("/api/v1/nodes/") => {
                code(&mut s, 200);
                let name = path.trim_start_matches("/api/v1/nodes/");
                let (name, status_sub) = match name.strip_suffix("/status") {
                    Some(n) => (n.to_owned(), true),
                    None => (name.to_owned(), false),
                };
                let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let Some(i) = s
                    .nodes
                    .iter()
                    .position(|n| n["metadata"]["name"] == name.as_str())
                else {
                    return status(404, "NotFound");
                };
                let mut node = (*s.nodes[i]).clone();
                if status_sub {
                    node["status"]["conditions"] = patch["status"]["conditions"].clone();
                } else if let Some(ann) = patch["metadata"]["annotations"].as_object() {
                    for (k, v) in ann {
                        node["metadata"]["annotations"][k] = v.clone();
                    }
                }
                let node = Arc::new(node);
                s.nodes[i] = node.clone();
                s.emit(Kind::Node, "MODIFIED", Obj::Node(node.clone()));
                full(200, serde_json::to_vec(&*node).unwrap())
            }
            ("POST", None) if path.ends_with("/events") => {
                code(&mut s, 201);
                full(201, body)
            }
            _ => {
                code(&mut s, 404);
                status(404, "NotFound")
            }
        }
    }
}

impl tower::Service<Request<kube::client::Body>> for MockApi {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let api = self.clone();
        let (parts, body) = req.into_parts();
        let method = parts.method.to_string();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        // The mock's work runs on its own runtime (its CPU is not the agent's).
        let task = self.runtime.spawn(async move {
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            api.handle(method, path, query, body)
        });
        Box::pin(async move { Ok(task.await.unwrap_or_else(|_| status(500, "InternalError"))) })
    }
}

// ---------------------------------------------------------------------------------------
// The mock API server in a process of its own

/// Serves the mock API server over HTTP/1.1 on 127.0.0.1 (a port of the system's choice,
/// printed as `listening PORT` on stdout) until stdin closes: the bench binary run with
/// `--serve-mock`, by [`MockProcess::spawn`].
pub fn serve_mock(nodes: usize, pods: usize) {
    use std::io::{Read, Write};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mock")
        .enable_all()
        .build()
        .unwrap();
    let api = MockApi::new(nodes, pods, rt.handle().clone());
    // The parent's end of our stdin closes when it is done (or dies): so do we.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read(&mut [0u8; 1]);
        std::process::exit(0);
    });
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening {port}");
        let _ = out.flush();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let api = api.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let api = api.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            Ok::<_, Infallible>(api.handle(
                                parts.method.to_string(),
                                parts.uri.path().to_owned(),
                                parts.uri.query().unwrap_or("").to_owned(),
                                body,
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// A child process of this binary that serves the agent (the mock, the fake kernel): its
/// stdin is a pipe whose closing ends it, and its first line of output says it is ready.
/// Dropping it ends the child.
pub struct ServingChild {
    child: std::process::Child,
}

impl ServingChild {
    /// Starts `command` and reads its first line of output.
    fn spawn(mut command: std::process::Command) -> std::io::Result<(Self, String)> {
        use std::io::BufRead;
        let mut child = Self {
            child: command
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()?,
        };
        let mut line = String::new();
        if let Some(out) = child.child.stdout.take() {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        Ok((child, line))
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// (current RSS, peak RSS) of the child, in MB.
    pub fn rss_mb(&self) -> (f64, f64) {
        status_rss_mb(&format!("/proc/{}/status", self.child.id()))
    }
}

impl Drop for ServingChild {
    fn drop(&mut self) {
        // Closing its stdin ends it; kill in case it does not listen.
        drop(self.child.stdin.take());
        std::thread::sleep(Duration::from_millis(100));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mock API server in a child process (this binary with `--serve-mock`), reached over
/// HTTP on 127.0.0.1. Dropping it ends the child.
pub struct MockProcess {
    child: ServingChild,
    port: u16,
}

impl MockProcess {
    /// In the network namespace `netns` when given (the agent's, with the wireguard-go
    /// dataplane: its 127.0.0.1 is the namespace's).
    pub fn spawn(nodes: usize, pods: usize, netns: Option<&str>) -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut command = match netns {
            Some(name) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", name]).arg(exe);
                c
            }
            None => std::process::Command::new(exe),
        };
        command
            .args(["--serve-mock", "--nodes", &nodes.to_string()])
            .args(["--pods", &pods.to_string()]);
        let (child, line) = ServingChild::spawn(command)?;
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok());
        match port {
            Some(port) => Ok(Self { child, port }),
            None => Err(std::io::Error::other(format!(
                "no port from the mock's process: {line:?}"
            ))),
        }
    }

    pub fn client(&self) -> kube::Client {
        let url = format!("http://127.0.0.1:{}", self.port);
        let config = kube::Config::new(url.parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// (current RSS, peak RSS) of the mock's process, in MB.
    pub fn rss_mb(&self) -> (f64, f64) {
        self.child.rss_mb()
    }
}

/// The fake kernel the bench programs: only messages change it here, so its allowed-IP
/// index is sound (the search it replaces is quadratic at this scale).
pub fn bench_kernel() -> FakeKernel {
    let mut kernel = FakeKernel::new();
    kernel.index_allowed_ips = true;
    kernel
}

/// The fake kernel in a child process (this binary with `--serve-kernel`), served over a
/// Unix socket: each connection is a handle of its own ([`SharedKernel::handle`]), as each
/// `KernelIo` of the agent's process is.
pub struct KernelProcess {
    child: ServingChild,
    path: std::path::PathBuf,
}

impl KernelProcess {
    pub fn spawn() -> std::io::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("wgmesh-scale-kernel-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut command = std::process::Command::new(std::env::current_exe()?);
        command.arg("--serve-kernel").arg(&path);
        let (child, line) = ServingChild::spawn(command)?;
        if line.trim() != "listening" {
            return Err(std::io::Error::other(format!(
                "the fake kernel's process did not start: {line:?}"
            )));
        }
        Ok(Self { child, path })
    }

    pub fn connect(&self) -> std::io::Result<RemoteKernel> {
        RemoteKernel::connect(&self.path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (current RSS, peak RSS) of the kernel's process, in MB.
    pub fn rss_mb(&self) -> (f64, f64) {
        self.child.rss_mb()
    }
}

impl Drop for KernelProcess {
    fn drop(&mut self) {
        // The child ends after this (its field is dropped next); its socket goes now.
        let _ = std::fs::remove_file(&self.path);
    }
}

const KERNEL_SEND: u8 = 0;
const KERNEL_RECV: u8 = 1;
const KERNEL_READ_SYSCTL: u8 = 2;
const KERNEL_WRITE_SYSCTL: u8 = 3;

/// A [`KernelIo`] whose kernel is in [`KernelProcess`]: each call is one request and one
/// answer on the socket. Request: call (1 byte), protocol (1), length (4, LE), bytes.
/// Answer: 0 and bytes, 1 (none), or 2 and an error (OS error number or -1, kind, message).
pub struct RemoteKernel {
    stream: std::os::unix::net::UnixStream,
    path: std::path::PathBuf,
    /// Answers fetched ahead, per protocol: a receive takes up to [`KERNEL_RECV_AHEAD`]
    /// (one round trip for a piece's acknowledgements, not one per message).
    ahead: [VecDeque<Vec<u8>>; 3],
}

/// How many datagrams one receive request fetches at most.
const KERNEL_RECV_AHEAD: usize = 256;

impl RemoteKernel {
    pub fn connect(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self {
            stream: std::os::unix::net::UnixStream::connect(path)?,
            path: path.to_owned(),
            ahead: Default::default(),
        })
    }

    fn call(
        &mut self,
        call: u8,
        protocol: Protocol,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> std::io::Result<bool> {
        use std::io::{Read, Write};
        let index = Protocol::ALL
            .iter()
            .position(|q| *q == protocol)
            .unwrap_or(0) as u8;
        let mut head = [call, index, 0, 0, 0, 0];
        head[2..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.stream.write_all(&head)?;
        self.stream.write_all(payload)?;
        let mut status = [0u8; 5];
        self.stream.read_exact(&mut status)?;
        let len = u32::from_le_bytes(status[1..].try_into().unwrap()) as usize;
        out.clear();
        out.resize(len, 0);
        self.stream.read_exact(out)?;
        match status[0] {
            0 => Ok(true),
            1 => Ok(false),
            _ => Err(decode_error(out)),
        }
    }
}

fn encode_error(e: &std::io::Error) -> Vec<u8> {
    let mut out = e.raw_os_error().unwrap_or(-1).to_le_bytes().to_vec();
    out.push(u8::from(e.kind() == std::io::ErrorKind::TimedOut));
    out.extend_from_slice(e.to_string().as_bytes());
    out
}

fn decode_error(b: &[u8]) -> std::io::Error {
    if b.len() < 5 {
        return std::io::Error::other("a malformed error from the fake kernel's process");
    }
    let errno = i32::from_le_bytes(b[..4].try_into().unwrap());
    if errno >= 0 {
        return std::io::Error::from_raw_os_error(errno);
    }
    let message = String::from_utf8_lossy(&b[5..]).into_owned();
    if b[4] == 1 {
        std::io::Error::new(std::io::ErrorKind::TimedOut, message)
    } else {
        std::io::Error::other(message)
    }
}

impl KernelIo for RemoteKernel {
    fn send(&mut self, protocol: Protocol, datagram: &[u8]) -> std::io::Result<()> {
        self.call(KERNEL_SEND, protocol, datagram, &mut Vec::new())
            .map(drop)
    }
    fn recv(&mut self, protocol: Protocol, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let i = Protocol::ALL
            .iter()
            .position(|q| *q == protocol)
            .unwrap_or(0);
        if self.ahead[i].is_empty() {
            let mut all = Vec::new();
            self.call(KERNEL_RECV, protocol, &[], &mut all)?;
            let mut rest = &all[..];
            while rest.len() >= 4 {
                let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                self.ahead[i].push_back(rest[4..4 + len].to_vec());
                rest = &rest[4 + len..];
            }
        }
        match self.ahead[i].pop_front() {
            Some(d) => {
                *buf = d;
                Ok(())
            }
            None => Err(std::io::Error::other(
                "an empty answer from the fake kernel's process",
            )),
        }
    }
    fn read_sysctl(&mut self, key: &str) -> std::io::Result<Option<String>> {
        let mut out = Vec::new();
        let found = self.call(
            KERNEL_READ_SYSCTL,
            Protocol::Route,
            key.as_bytes(),
            &mut out,
        )?;
        Ok(found.then(|| String::from_utf8_lossy(&out).into_owned()))
    }
    fn write_sysctl(&mut self, key: &str, value: &str) -> std::io::Result<()> {
        let payload = [key.as_bytes(), b"\0", value.as_bytes()].concat();
        self.call(
            KERNEL_WRITE_SYSCTL,
            Protocol::Route,
            &payload,
            &mut Vec::new(),
        )
        .map(drop)
    }
    fn open_another(&mut self) -> Option<std::io::Result<Box<dyn KernelIo + Send>>> {
        Some(Self::connect(&self.path).map(|k| Box::new(k) as Box<dyn KernelIo + Send>))
    }
}

/// The child's side of [`KernelProcess`]: the bench's fake kernel, a thread per connection.
pub fn serve_kernel(path: &std::path::Path) {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    // The parent's end of our stdin closes when it is done (or dies): so do we.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read(&mut [0u8; 1]);
        std::process::exit(0);
    });
    let shared = SharedKernel::new(bench_kernel());
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening");
    let _ = out.flush();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut kernel = shared.handle();
        std::thread::spawn(move || {
            let mut payload = Vec::new();
            let mut answer = Vec::new();
            let mut held: [Option<std::io::Error>; 3] = Default::default();
            loop {
                let mut head = [0u8; 6];
                if stream.read_exact(&mut head).is_err() {
                    return;
                }
                let len = u32::from_le_bytes(head[2..].try_into().unwrap()) as usize;
                payload.resize(len, 0);
                if stream.read_exact(&mut payload).is_err() {
                    return;
                }
                let protocol = Protocol::ALL[usize::from(head[1]).min(2)];
                answer.clear();
                let result: std::io::Result<bool> = match head[0] {
                    KERNEL_SEND => kernel.send(protocol, &payload).map(|()| true),
                    // Up to KERNEL_RECV_AHEAD datagrams, each with its length; the error
                    // when there is none (TimedOut: nothing to say).
                    // A failure after some datagrams is kept for the next request.
                    KERNEL_RECV => match held[usize::from(head[1]).min(2)].take() {
                        Some(e) => Err(e),
                        None => {
                            let mut one = Vec::new();
                            let mut got = Ok(true);
                            for n in 0..KERNEL_RECV_AHEAD {
                                match kernel.recv(protocol, &mut one) {
                                    Ok(()) => {
                                        answer.extend_from_slice(&(one.len() as u32).to_le_bytes());
                                        answer.extend_from_slice(&one);
                                    }
                                    Err(e) if n == 0 => got = Err(e),
                                    Err(e) if e.kind() != std::io::ErrorKind::TimedOut => {
                                        held[usize::from(head[1]).min(2)] = Some(e);
                                        break;
                                    }
                                    Err(_) => break,
                                }
                                if got.is_err() {
                                    break;
                                }
                            }
                            got
                        }
                    },
                    KERNEL_READ_SYSCTL => kernel
                        .read_sysctl(&String::from_utf8_lossy(&payload))
                        .map(|v| v.map(|v| answer.extend_from_slice(v.as_bytes())).is_some()),
                    _ => {
                        let text = String::from_utf8_lossy(&payload).into_owned();
                        let (key, value) = text.split_once('\0').unwrap_or((&text, ""));
                        kernel.write_sysctl(key, value).map(|()| true)
                    }
                };
                let status = match result {
                    Ok(true) => 0u8,
                    Ok(false) => 1,
                    Err(e) => {
                        answer = encode_error(&e);
                        2
                    }
                };
                let mut head = [status, 0, 0, 0, 0];
                head[1..].copy_from_slice(&(answer.len() as u32).to_le_bytes());
                if stream
                    .write_all(&head)
                    .and_then(|()| stream.write_all(&answer))
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------------------
// The wireguard-go dataplane

/// Why the wireguard-go dataplane cannot run here, if it cannot.
fn wireguard_go_missing() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("the wireguard-go dataplane needs root (network namespaces)".into());
    }
    let found = std::process::Command::new("wireguard-go")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        return Some("wireguard-go is not installed (apt-get install wireguard-go)".into());
    }
    let ip = std::process::Command::new("ip").arg("-V").output();
    if !ip.is_ok_and(|o| o.status.success()) {
        return Some("ip (iproute2) is not installed".into());
    }
    None
}

/// Why the kernel WireGuard dataplane cannot run here, if it cannot.
fn kernel_wireguard_missing() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("the kernel WireGuard dataplane needs root (network namespaces)".into());
    }
    let ip = std::process::Command::new("ip").arg("-V").output();
    if !ip.is_ok_and(|o| o.status.success()) {
        return Some("ip (iproute2) is not installed".into());
    }
    // Made and removed in the host's namespace: the module loads on demand.
    let name = format!("wgk{}", std::process::id());
    let added = std::process::Command::new("ip")
        .args(["link", "add", &name, "type", "wireguard"])
        .output();
    if !added.is_ok_and(|o| o.status.success()) {
        return Some(
            "this kernel has no WireGuard (run it in the VM: scripts/bench-kernel-vm.sh)".into(),
        );
    }
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &name])
        .output();
    None
}

/// A network namespace of the bench's own, with the names of the two WireGuard devices the
/// agent makes in it (unique per process: wireguard-go's socket
/// `/var/run/wireguard/NAME.sock` is not per namespace). Deleted on drop, which removes the
/// devices, and with them the daemons.
pub struct Netns {
    pub name: String,
    pub file: Arc<std::fs::File>,
    pub ifnames: [String; 2],
}

impl Netns {
    fn create() -> Result<Self, String> {
        let pid = std::process::id();
        let name = format!("wgmesh-scale-{pid}");
        let out = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("ip netns add {name}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let netns = Self {
            file: Arc::new(
                std::fs::File::open(format!("/var/run/netns/{name}"))
                    .map_err(|e| format!("/var/run/netns/{name}: {e}"))?,
            ),
            name,
            ifnames: [format!("wgs{pid}"), format!("wgt{pid}")],
        };
        // Loopback up, as on a node.
        let _ = std::process::Command::new("ip")
            .args(["-n", &netns.name, "link", "set", "lo", "up"])
            .output();
        Ok(netns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        // The daemons exit when their devices go; their sockets may stay behind.
        std::thread::sleep(Duration::from_millis(500));
        for i in &self.ifnames {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{i}.sock"));
        }
    }
}

fn enter_netns(file: &std::fs::File) -> std::io::Result<()> {
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(std::io::Error::from)
}

/// The wireguard-go daemons of these devices (`wireguard-go IFNAME` exactly): how many, and
/// their summed RSS, now and peak, in MB.
fn daemons_rss_mb(ifnames: &[String; 2]) -> (usize, f64, f64) {
    let mut found = (0, 0.0, 0.0);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let pid = entry.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_daemon = args.len() >= 2
            && args[0].ends_with(b"wireguard-go")
            && ifnames.iter().any(|i| args[1] == i.as_bytes());
        if is_daemon {
            let (rss, peak) = status_rss_mb(&format!("/proc/{pid}/status"));
            found = (found.0 + 1, found.1 + rss, found.2 + peak);
        }
    }
    found
}

// ---------------------------------------------------------------------------------------
// Process measurements

/// CPU seconds (user + system) of the threads in `tids`, from /proc.
pub fn threads_cpu(tids: &[i32]) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    tids.iter()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / tick
}

/// CPU seconds (user + system) of the whole process.
pub fn process_cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / 100.0
}

/// (current RSS, peak RSS) of the process, in MB.
pub fn rss_mb() -> (f64, f64) {
    status_rss_mb("/proc/self/status")
}

/// (VmRSS, VmHWM) of a `/proc/PID/status`, in MB.
fn status_rss_mb(path: &str) -> (f64, f64) {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak RSS to the current RSS (Linux ≥ 4.0).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

// ---------------------------------------------------------------------------------------
// The run

/// What to run.
#[derive(Clone, Debug)]
pub struct Params {
    pub nodes: usize,
    pub pods: usize,
    pub rates: Vec<usize>,
    pub churn_secs: u64,
    pub burst: usize,
    pub outage_secs: u64,
    pub outage_rate: usize,
    pub steady_secs: u64,
    /// The agent's resync interval (`None`: its default, 90 s).
    pub resync_secs: Option<u64>,
    /// The agent's `max_delay` (`None`: its default).
    pub max_delay_ms: Option<u64>,
    /// Resync on the event loop (a full reconcile), as before the background resync: the
    /// dataplane offers no `begin_resync`.
    pub foreground_resync: bool,
    /// Give up waiting for a convergence after this long.
    pub patience: Duration,
    /// Stop after the restart's first full apply (its time and memory only).
    pub restart_only: bool,
    /// With `restart_only`: keep the agent running this long after the first full apply
    /// (its background resyncs, every `resync_secs`), and report the peak RSS and heap over
    /// that time alone.
    pub hold_secs: u64,
    /// Run the mock API server in a process of its own (with `restart_only`): the agent's
    /// process then holds only the agent and the fake kernel.
    pub mock_process: bool,
    /// Run the fake kernel in a process of its own too (with `restart_only`), reached over a
    /// Unix socket ([`RemoteKernel`]): the measured process then holds only the agent (and
    /// this allocator's tags).
    pub kernel_process: bool,
    /// The dataplane: wireguard-go devices and the host's rtnetlink in a network namespace
    /// of their own, instead of the fake kernel (needs root and wireguard-go).
    pub wireguard_go: bool,
    /// The dataplane: kernel WireGuard devices and rtnetlink in a network namespace of their
    /// own (needs root and the wireguard module: the VM of `scripts/vm`).
    pub kernel_wireguard: bool,
}

impl Params {
    pub fn full() -> Self {
        Self {
            nodes: 5000,
            pods: 110,
            rates: vec![100, 1000, 5000],
            churn_secs: 30,
            burst: 100,
            outage_secs: 60,
            outage_rate: 100,
            steady_secs: 120,
            resync_secs: None,
            max_delay_ms: None,
            foreground_resync: false,
            patience: Duration::from_secs(120),
            restart_only: false,
            hold_secs: 0,
            mock_process: false,
            kernel_process: false,
            wireguard_go: false,
            kernel_wireguard: false,
        }
    }

    pub fn smoke() -> Self {
        Self {
            nodes: 50,
            pods: 20,
            rates: vec![200],
            churn_secs: 1,
            burst: 5,
            outage_secs: 1,
            outage_rate: 50,
            steady_secs: 1,
            // Resyncs during every phase: they run beside the deltas.
            resync_secs: Some(2),
            max_delay_ms: None,
            foreground_resync: false,
            patience: Duration::from_secs(60),
            restart_only: false,
            hold_secs: 0,
            mock_process: false,
            kernel_process: false,
            wireguard_go: false,
            kernel_wireguard: false,
        }
    }
}

#[derive(Debug, Default)]
pub struct ChurnFigures {
    pub rate: usize,
    pub events: usize,
    pub agent_cpu: f64,
    /// Of `agent_cpu`, the share spent inside the fake kernel (wall time in its calls, per
    /// second).
    pub kernel_cpu: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub unresolved: usize,
    pub queue_max: usize,
    pub queue_mean: f64,
    pub reconciles: usize,
    /// The longest full reconcile during the phase.
    pub longest_reconcile: Duration,
    /// Background resyncs finished during the phase, and the longest (begun → finished).
    pub background: usize,
    pub longest_background: Duration,
    pub deltas: usize,
}

#[derive(Debug, Default)]
pub struct Report {
    pub mock_rss_mb: f64,
    pub restart: Duration,
    pub first_peers: usize,
    pub first_routes: usize,
    pub restart_rss_peak_mb: f64,
    /// Time spent inside the fake kernel until the first full apply.
    pub restart_kernel_time: Duration,
    /// `heap::figures()` at the first full apply.
    pub restart_heap: [(f64, f64); 6],
    /// The agent's memory sampled until the first full apply.
    pub restart_sampled: AgentMemory,
    /// The same over the outage and the relists that end it.
    pub relist_heap: [(f64, f64); 6],
    pub relist_rss_peak_mb: f64,
    pub churn: Vec<ChurnFigures>,
    pub burst: Option<Duration>,
    pub steady_requests: usize,
    pub steady_secs: f64,
    pub outage_requests: usize,
    pub outage_request_offsets: Vec<(f64, String)>,
    pub reconverged: Option<Duration>,
    pub recovery_requests: usize,
    pub peak_rss_mb: f64,
    /// Background resyncs finished over the whole run, and how many operations they
    /// executed in all (repairs).
    pub background_resyncs: usize,
    pub background_operations: usize,
    pub errors: Vec<String>,
    /// Why the run did not happen (the wireguard-go dataplane without root or wireguard-go).
    pub skipped: Option<String>,
    /// The wireguard-go daemons' RSS after the first full apply, now and peak, MB.
    pub daemons_rss_mb: (f64, f64),
}

/// The agent's memory, sampled (every 5 ms while the harness waits for the restart): the
/// process's RSS less the live heap of the mock API server and the fake kernel — what is left
/// is charged to the agent: its heap, and the allocator's overhead and the 16-byte tags of
/// every part, code, stacks (so it overstates the agent) — and the agent's own heap, each at
/// its largest and when.
#[derive(Debug, Default, Clone, Copy)]
pub struct AgentMemory {
    /// Process RSS less the live heap of the mock and the fake kernel, MB.
    pub rss_less_others_mb: f64,
    pub rss_less_others_at: Duration,
    /// The process RSS at that moment, MB.
    pub rss_then_mb: f64,
    /// The 16-byte tags of the live allocations of the agent (with its dataplane calls)
    /// and of the fake kernel at that moment, MB (in RSS, not in the heap figures).
    pub agent_tags_mb: f64,
    pub kernel_tags_mb: f64,
    /// The agent's heap (with its dataplane calls), MB.
    pub heap_mb: f64,
    pub heap_at: Duration,
    /// Of the agent's heap: inside its dataplane calls, at their largest, MB.
    pub dataplane_mb: f64,
    pub dataplane_at: Duration,
}

impl AgentMemory {
    fn sample(&mut self, since: Instant) {
        if !heap::installed() {
            return;
        }
        let at = since.elapsed();
        let f = heap::figures();
        let rss = rss_mb().0;
        let less = rss - f[1].0 - f[2].0;
        if less > self.rss_less_others_mb {
            let c = heap::counts();
            let mb = |n: isize| (n * 16) as f64 / (1024.0 * 1024.0);
            self.rss_less_others_mb = less;
            self.rss_less_others_at = at;
            self.rss_then_mb = rss;
            self.agent_tags_mb = mb(c[0] + c[3]);
            self.kernel_tags_mb = mb(c[2]);
        }
        if f[5].0 > self.heap_mb {
            self.heap_mb = f[5].0;
            self.heap_at = at;
        }
        if f[3].0 > self.dataplane_mb {
            self.dataplane_mb = f[3].0;
            self.dataplane_at = at;
        }
    }
}

async fn wait_for(patience: Duration, mut done: impl FnMut() -> bool) -> bool {
    let give_up = Instant::now() + patience;
    while !done() {
        if Instant::now() > give_up {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Runs every phase; `log` gets one line per phase as it finishes.
pub fn run(p: &Params, log: &mut dyn FnMut(&str)) -> Report {
    // As `wgmesh-agent` does before its threads start (`MALLOC_ARENA_MAX` set: that instead).
    let capped = wgmesh_k8s::daemon::limit_malloc_arenas();
    #[cfg(target_env = "musl")]
    wgmesh_k8s::daemon::set_memory_release(heap::collect);
    log(&format!(
        "malloc arenas: {}",
        if capped {
            format!(
                "at most {} (as wgmesh-agent)",
                wgmesh_k8s::daemon::MALLOC_ARENAS
            )
        } else {
            match std::env::var("MALLOC_ARENA_MAX") {
                Ok(v) => format!("MALLOC_ARENA_MAX={v}"),
                Err(_) => "the C library's own".into(),
            }
        }
    ));
    let mock_tids = Arc::new(Mutex::new(Vec::new()));
    let t = mock_tids.clone();
    let mock_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mock")
        .on_thread_start(move || {
            heap::enter(heap::Part::Mock);
            t.lock()
                .unwrap()
                .push(rustix::thread::gettid().as_raw_nonzero().get())
        })
        .enable_all()
        .build()
        .unwrap();
    let mut report = Report::default();
    // The wireguard-go dataplane: every thread of the agent's runtime enters a network
    // namespace of the bench's own (netlink sockets, sysctls and the daemons it starts
    // belong to the namespace of the thread that makes them).
    let netns = if p.wireguard_go || p.kernel_wireguard {
        let missing = match p.wireguard_go {
            true => wireguard_go_missing(),
            false => kernel_wireguard_missing(),
        };
        if let Some(why) = missing {
            report.skipped = Some(why);
            return report;
        }
        match Netns::create() {
            Ok(n) => Some(n),
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        }
    } else {
        None
    };
    let ns_file = netns.as_ref().map(|n| n.file.clone());
    let agent_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agent")
        .on_thread_start(move || {
            if let Some(f) = &ns_file {
                enter_netns(f).expect("setns into the bench's network namespace");
            }
        })
        .enable_all()
        .build()
        .unwrap();
    if (p.mock_process || p.kernel_process) && !p.restart_only {
        report.errors.push(
            "--mock-process and --kernel-process measure the restart only: add --restart-only"
                .into(),
        );
        return report;
    }
    if p.kernel_process && (p.wireguard_go || p.kernel_wireguard) {
        report
            .errors
            .push("--kernel-process is for the fake kernel, not a real dataplane".into());
        return report;
    }
    let main_part = heap::enter(heap::Part::Mock);
    let (api, mut child) = if p.mock_process {
        match MockProcess::spawn(p.nodes, p.pods, netns.as_ref().map(|n| n.name.as_str())) {
            Ok(c) => (None, Some(c)),
            Err(e) => {
                report.errors.push(format!("the mock's process: {e}"));
                return report;
            }
        }
    } else {
        (
            Some(MockApi::new(p.nodes, p.pods, mock_rt.handle().clone())),
            None,
        )
    };
    heap::leave(main_part);
    let tracker = match &api {
        Some(api) => api.tracker(),
        None => Arc::new(Mutex::new(Tracker::default())),
    };
    report.mock_rss_mb = rss_mb().0;
    reset_peak_rss();
    heap::reset_peaks();
    let agent_cpu = {
        let mock_tids = mock_tids.clone();
        let main_start = process_cpu();
        move || process_cpu() - main_start - threads_cpu(&mock_tids.lock().unwrap())
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let kernel_time = Arc::new(Mutex::new(Duration::ZERO));
    let mesh = match &netns {
        Some(n) => {
            let mut m = mesh();
            m.interface_name = n.ifnames[0].clone();
            m.interface_name_v6 = n.ifnames[1].clone();
            m
        }
        None => mesh(),
    };
    let mut kernel_child: Option<KernelProcess> = None;
    let (io, backend): (Box<dyn KernelIo + Send>, Backend) = match &netns {
        None if p.kernel_process => match KernelProcess::spawn() {
            Ok(k) => {
                let io = k.connect();
                kernel_child = Some(k);
                match io {
                    Ok(io) => (Box::new(io), Backend::Kernel),
                    Err(e) => {
                        report
                            .errors
                            .push(format!("the fake kernel's process: {e}"));
                        return report;
                    }
                }
            }
            Err(e) => {
                report
                    .errors
                    .push(format!("the fake kernel's process: {e}"));
                return report;
            }
        },
        None => (Box::new(SharedKernel::new(bench_kernel())), Backend::Kernel),
        Some(_) => {
            // Opened on one of the agent's threads: in the namespace.
            let opened = agent_rt.block_on(async {
                tokio::task::spawn_blocking(|| {
                    Sockets::open(Some(Duration::from_secs(30)), "/proc/sys")
                })
                .await
            });
            match opened {
                Ok(Ok(s)) if p.kernel_wireguard => (Box::new(s), Backend::Kernel),
                Ok(Ok(s)) => (Box::new(s), Backend::Userspace),
                Ok(Err(e)) => {
                    report.errors.push(format!("netlink sockets: {e}"));
                    return report;
                }
                Err(e) => {
                    report.errors.push(format!("netlink sockets: {e}"));
                    return report;
                }
            }
        }
    };
    log(&format!(
        "dataplane: {}",
        match &netns {
            Some(n) => format!(
                "{} devices {} and {} and rtnetlink in network namespace {} (figures \"inside the fake kernel\" are the time inside netlink send and receive calls)",
                if p.kernel_wireguard {
                    "kernel WireGuard"
                } else {
                    "wireguard-go"
                },
                n.ifnames[0],
                n.ifnames[1],
                n.name
            ),
            None if p.kernel_process => format!(
                "the message-level fake kernel, in a process of its own (pid {}; figures \"inside the fake kernel\" are the time inside calls to it over a Unix socket)",
                kernel_child.as_ref().map_or(0, KernelProcess::pid)
            ),
            None => "the message-level fake kernel".into(),
        }
    ));
    let dataplane = Timed {
        inner: NetlinkDataplane::new(
            Linux::with_kernel(
                TimedKernel {
                    inner: io,
                    spent: kernel_time.clone(),
                },
                LinuxConfig::with_backend(backend),
            )
            .unwrap(),
            &mesh,
            KeyRing::single(agent_key()),
        ),
        tracker: tracker.clone(),
        foreground_resync: p.foreground_resync,
    };
    let mut settings = AgentSettings::new(node_name(0), mesh.clone());
    settings.watch_pods = true;
    if let Some(ms) = p.max_delay_ms {
        settings.max_delay = Duration::from_millis(ms).max(settings.debounce);
    }
    if let Some(s) = p.resync_secs {
        settings.resync_interval = Duration::from_secs(s);
    }
    let client = {
        let _guard = agent_rt.enter();
        match (&api, &child) {
            (Some(api), _) => api.client(),
            (None, Some(child)) => child.client(),
            (None, None) => unreachable!("a mock in the process or in another"),
        }
    };

    // Restart to first full apply.
    let start = Instant::now();
    let agent = agent_rt.spawn(wgmesh_k8s::run::run(
        client,
        settings,
        dataplane,
        Metrics::new(),
        async {
            let _ = stop_rx.await;
        },
    ));
    let expected_peers = 2 * (p.nodes - 1);
    let expected_routes = (p.nodes - 1) * (p.pods + 1);
    let mut sampled = AgentMemory::default();
    let ok = agent_rt.block_on(wait_for(p.patience * 2, || {
        sampled.sample(start);
        tracker
            .lock()
            .unwrap()
            .reconciles
            .iter()
            .any(|r| r.2 >= expected_peers && r.3 >= expected_routes)
    }));
    report.restart_sampled = sampled;
    {
        let t = tracker.lock().unwrap();
        if let Some(r) = t.reconciles.iter().find(|r| r.2 >= expected_peers) {
            report.restart = r.1 - start;
            report.first_peers = r.2;
            report.first_routes = r.3;
        } else {
            report.errors.push(format!(
                "no full apply within {:?} (ok {ok})",
                p.patience * 2
            ));
        }
    }
    report.restart_rss_peak_mb = rss_mb().1;
    report.restart_kernel_time = *kernel_time.lock().unwrap();
    report.restart_heap = heap::figures();
    log(&format!(
        "restart → first full apply: {:.2} s, {} peers, {} routes, of which {:.2} s inside the fake kernel; peak RSS {:.0} MB (mock {:.0} MB before the agent)",
        report.restart.as_secs_f64(),
        report.first_peers,
        report.first_routes,
        report.restart_kernel_time.as_secs_f64(),
        report.restart_rss_peak_mb,
        report.mock_rss_mb
    ));
    if heap::installed() {
        let [_, m, k, d, t, a] = report.restart_heap;
        log(&format!(
            "heap by part (live / peak MB): agent {:.0} / {:.0} (of it in dataplane calls {:.0} / {:.0}), fake kernel {:.0} / {:.0}, mock and harness {:.0} / {:.0}; all {:.0} / {:.0}",
            a.0, a.1, d.0, d.1, k.0, k.1, m.0, m.1, t.0, t.1
        ));
        let s = report.restart_sampled;
        log(&format!(
            "sampled every 5 ms until the first full apply: process RSS less the live heap of mock and fake kernel at most {:.0} MB (at {:.2} s, RSS {:.0} MB then; the allocator's 16-byte tags then: agent {:.0} MB, fake kernel {:.0} MB); agent heap at most {:.0} MB (at {:.2} s), in dataplane calls at most {:.0} MB (at {:.2} s)",
            s.rss_less_others_mb,
            s.rss_less_others_at.as_secs_f64(),
            s.rss_then_mb,
            s.agent_tags_mb,
            s.kernel_tags_mb,
            s.heap_mb,
            s.heap_at.as_secs_f64(),
            s.dataplane_mb,
            s.dataplane_at.as_secs_f64()
        ));
    }
    if let Some(api) = &api {
        // Where the restart's time went: the lists (requests as the mock received them),
        // then the agent's own work up to the first full apply.
        let lists = |path: &str| -> (usize, f64, f64) {
            let at: Vec<f64> = api
                .requests()
                .iter()
                .filter(|r| r.path == path && !r.watch && r.at >= start)
                .map(|r| (r.at - start).as_secs_f64())
                .collect();
            (
                at.len(),
                at.first().copied().unwrap_or(0.0),
                at.last().copied().unwrap_or(0.0),
            )
        };
        let (n, n0, n1) = lists("/api/v1/nodes");
        let (p0, p1, p2) = lists("/api/v1/pods");
        log(&format!(
            "restart timeline: {n} node list pages requested from {n0:.2} s to {n1:.2} s, {p0} pod list pages from {p1:.2} s to {p2:.2} s, first full apply done at {:.2} s",
            report.restart.as_secs_f64()
        ));
    }
    if let Some(n) = netns.as_ref().filter(|_| p.wireguard_go) {
        let (count, rss, peak) = daemons_rss_mb(&n.ifnames);
        report.daemons_rss_mb = (rss, peak);
        log(&format!(
            "wireguard-go ({count} daemons, not counted above): RSS {rss:.0} MB, peak {peak:.0} MB"
        ));
    }
    if let Some(child) = &mut child {
        let rss = child.rss_mb();
        log(&format!(
            "the mock API server's process (not counted above): RSS {:.0} MB, peak {:.0} MB",
            rss.0, rss.1
        ));
    }
    if let Some(k) = &kernel_child {
        let rss = k.rss_mb();
        log(&format!(
            "the fake kernel's process (not counted above): RSS {:.0} MB, peak {:.0} MB",
            rss.0, rss.1
        ));
    }
    if p.restart_only && p.hold_secs > 0 {
        // The steady state after the restart: RSS and heap peaks over the hold alone.
        let begun = tracker.lock().unwrap().background.len();
        reset_peak_rss();
        heap::reset_peaks();
        std::thread::sleep(Duration::from_secs(p.hold_secs));
        let resyncs = tracker.lock().unwrap().background.len() - begun;
        let (rss, peak) = rss_mb();
        let [_, _, _, d, _, a] = heap::figures();
        log(&format!(
            "held {} s after the first full apply ({resyncs} background resyncs done): RSS {rss:.0} MB, peak {peak:.0} MB over the hold; agent heap live / peak {:.0} / {:.0} MB (in dataplane calls {:.0} / {:.0})",
            p.hold_secs, a.0, a.1, d.0, d.1
        ));
        report.restart_rss_peak_mb = report.restart_rss_peak_mb.max(peak);
    }
    if p.restart_only {
        let _ = stop_tx.send(());
        let _ = agent_rt.block_on(agent);
        agent_rt.shutdown_background();
        mock_rt.shutdown_background();
        report.peak_rss_mb = report.restart_rss_peak_mb;
        report
            .errors
            .extend(tracker.lock().unwrap().errors.iter().cloned());
        drop(child);
        drop(kernel_child);
        return report;
    }
    let Some(api) = api else {
        unreachable!("a mock in another process measures the restart only")
    };
    // Let the start settle (status write, Events).
    std::thread::sleep(Duration::from_secs(2));

    // Steady churn at each rate.
    for &rate in &p.rates {
        let (r0, d0, b0) = {
            let mut t = tracker.lock().unwrap();
            t.latencies.clear();
            (t.reconciles.len(), t.deltas, t.background.len())
        };
        let cpu0 = agent_cpu();
        let k0 = *kernel_time.lock().unwrap();
        let begin = Instant::now();
        let until = begin + Duration::from_secs(p.churn_secs);
        let churner = {
            let api = api.clone();
            mock_rt.spawn(async move { api.churn(rate, until).await })
        };
        let mut samples = Vec::new();
        while !churner.is_finished() {
            samples.push(tracker.lock().unwrap().outstanding_count);
            std::thread::sleep(Duration::from_millis(10));
        }
        let wall = begin.elapsed().as_secs_f64();
        let cpu = agent_cpu() - cpu0;
        let kernel = (*kernel_time.lock().unwrap() - k0).as_secs_f64();
        // Drain: what was sent gets carried out.
        agent_rt.block_on(wait_for(p.patience, || {
            tracker.lock().unwrap().outstanding_count == 0
        }));
        let t = tracker.lock().unwrap();
        let mut lat: Vec<Duration> = t
            .latencies
            .iter()
            .map(|(a, b)| b.saturating_duration_since(*a))
            .collect();
        lat.sort();
        let f = ChurnFigures {
            rate,
            events: lat.len(),
            agent_cpu: cpu / wall,
            kernel_cpu: kernel / wall,
            p50: percentile(&lat, 0.5),
            p99: percentile(&lat, 0.99),
            max: lat.last().copied().unwrap_or_default(),
            unresolved: t.outstanding_count,
            queue_max: samples.iter().copied().max().unwrap_or(0),
            queue_mean: samples.iter().sum::<usize>() as f64 / samples.len().max(1) as f64,
            reconciles: t.reconciles.len() - r0,
            longest_reconcile: t.reconciles[r0..]
                .iter()
                .map(|r| r.1 - r.0)
                .max()
                .unwrap_or_default(),
            background: t.background.len() - b0,
            longest_background: t.background[b0..]
                .iter()
                .map(|r| r.1 - r.0)
                .max()
                .unwrap_or_default(),
            deltas: t.deltas - d0,
        };
        log(&format!(
            "churn {rate}/s for {wall:.0} s: agent CPU {:.2} cores ({:.2} in the fake kernel), event → netlink p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} address changes, {} unresolved); queue max {}, mean {:.1}; {} full reconciles (longest {:.0} ms), {} background resyncs (longest {:.0} ms), {} deltas",
            f.agent_cpu,
            f.kernel_cpu,
            ms(f.p50),
            ms(f.p99),
            ms(f.max),
            f.events,
            f.unresolved,
            f.queue_max,
            f.queue_mean,
            f.reconciles,
            ms(f.longest_reconcile),
            f.background,
            ms(f.longest_background),
            f.deltas
        ));
        report.churn.push(f);
    }

    // A node pool joins.
    if p.burst > 0 {
        let begin = Instant::now();
        api.burst(p.burst, p.pods);
        let done = agent_rt.block_on(wait_for(p.patience, || {
            tracker.lock().unwrap().peers_done_at.is_some()
        }));
        report.burst = done.then(|| tracker.lock().unwrap().peers_done_at.unwrap() - begin);
        log(&format!(
            "burst of {} nodes ({} pods): all peers after {:?}",
            p.burst,
            p.burst * p.pods,
            report.burst
        ));
        // Their pods settle.
        agent_rt.block_on(wait_for(p.patience, || {
            tracker.lock().unwrap().outstanding_count == 0
        }));
    }

    // Steady state: no churn; what the agent asks of the API server.
    let n0 = api.requests().len();
    let begin = Instant::now();
    std::thread::sleep(Duration::from_secs(p.steady_secs));
    report.steady_secs = begin.elapsed().as_secs_f64();
    report.steady_requests = api.requests().len() - n0;
    log(&format!(
        "steady state: {} requests in {:.0} s ({:.0} per hour at that rate)",
        report.steady_requests,
        report.steady_secs,
        report.steady_requests as f64 * 3600.0 / report.steady_secs
    ));

    // The outage: the API server is down, the cluster keeps changing; then relists.
    reset_peak_rss();
    heap::reset_peaks();
    let n0 = api.requests().len();
    let down_at = Instant::now();
    api.set_down(true);
    let until = down_at + Duration::from_secs(p.outage_secs);
    let churner = {
        let api = api.clone();
        let rate = p.outage_rate;
        mock_rt.spawn(async move { api.churn(rate, until).await })
    };
    while !churner.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let back_at = Instant::now();
    tracker.lock().unwrap().resolve_by_plan = true;
    api.set_down(false);
    let converged = agent_rt.block_on(wait_for(p.patience, || {
        tracker.lock().unwrap().outstanding_count == 0
    }));
    let requests = api.requests();
    let during: Vec<&Recorded> = requests[n0..].iter().filter(|r| r.at < back_at).collect();
    report.outage_requests = during.len();
    report.outage_request_offsets = during
        .iter()
        .map(|r| {
            (
                (r.at - down_at).as_secs_f64(),
                format!(
                    "{} {}{}",
                    r.method,
                    r.path,
                    if r.watch { " watch" } else { "" }
                ),
            )
        })
        .collect();
    if converged {
        let t = tracker.lock().unwrap();
        let last = t.latencies.iter().map(|l| l.1).max().unwrap_or(back_at);
        report.reconverged = Some(last.saturating_duration_since(back_at));
    }
    tracker.lock().unwrap().resolve_by_plan = false;
    report.relist_rss_peak_mb = rss_mb().1;
    report.relist_heap = heap::figures();
    if heap::installed() {
        let [_, m, k, d, t, a] = report.relist_heap;
        log(&format!(
            "outage and relists: peak RSS {:.0} MB; heap by part (live / peak MB): agent {:.0} / {:.0} (of it in dataplane calls {:.0} / {:.0}), fake kernel {:.0} / {:.0}, mock and harness {:.0} / {:.0}; all {:.0} / {:.0}",
            report.relist_rss_peak_mb, a.0, a.1, d.0, d.1, k.0, k.1, m.0, m.1, t.0, t.1
        ));
    }
    {
        // When each watch came back, and how long its relist took.
        let after: Vec<&Recorded> = requests[n0..].iter().filter(|r| r.at >= back_at).collect();
        let mut lines = Vec::new();
        for path in ["/api/v1/nodes", "/api/v1/pods"] {
            let mine: Vec<&&Recorded> = after.iter().filter(|r| r.path == path).collect();
            let watches: Vec<String> = mine
                .iter()
                .filter(|r| r.watch)
                .take(4)
                .map(|r| format!("{:.1}", (r.at - back_at).as_secs_f64()))
                .collect();
            let lists: Vec<f64> = mine
                .iter()
                .filter(|r| !r.watch)
                .map(|r| (r.at - back_at).as_secs_f64())
                .collect();
            lines.push(format!(
                "{path}: watches at {} s; {} list pages from {:.1} s to {:.1} s",
                watches.join(", "),
                lists.len(),
                lists.first().copied().unwrap_or(0.0),
                lists.last().copied().unwrap_or(0.0)
            ));
        }
        log(&format!("after the outage: {}", lines.join("; ")));
    }
    let after = back_at + report.reconverged.unwrap_or(p.patience);
    report.recovery_requests = requests[n0..]
        .iter()
        .filter(|r| r.at >= back_at && r.at <= after)
        .count();
    log(&format!(
        "outage {} s: {} requests while down ({}); re-converged {:?} after it ended, with {} requests",
        p.outage_secs,
        report.outage_requests,
        report
            .outage_request_offsets
            .iter()
            .map(|(t, w)| format!("{t:.1}s {w}"))
            .collect::<Vec<_>>()
            .join(", "),
        report.reconverged,
        report.recovery_requests
    ));

    report.peak_rss_mb = rss_mb().1.max(report.restart_rss_peak_mb);
    {
        let t = tracker.lock().unwrap();
        report.errors.extend(t.errors.iter().cloned());
        report.background_resyncs = t.background.len();
        report.background_operations = t.background.iter().map(|b| b.2).sum();
    }
    log(&format!(
        "background resyncs: {}, {} operations in all; the longest hold of the event loop (snapshot or repairs) {:.0} ms",
        report.background_resyncs,
        report.background_operations,
        ms(tracker.lock().unwrap().background_loop_max)
    ));
    if let Some(n) = netns.as_ref().filter(|_| p.wireguard_go) {
        let (count, rss, peak) = daemons_rss_mb(&n.ifnames);
        log(&format!(
            "wireguard-go at the end ({count} daemons): RSS {rss:.0} MB, peak {peak:.0} MB"
        ));
    }
    let _ = stop_tx.send(());
    let _ = agent_rt.block_on(agent);
    agent_rt.shutdown_background();
    mock_rt.shutdown_background();
    drop(netns);
    report
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
