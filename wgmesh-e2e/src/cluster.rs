//! The cluster: an underlay bridge, nodes, pods, and a wgmesh agent per node.
//!
//! ```text
//!   bridge namespace: br0 ── n1 ── n2 ── n3 ── n4           (veth ports; 10.240.0.0/24, fd00:240::/64)
//!                            │     │     │     │
//!   node namespaces:        eth0  eth0  eth0  eth0          strict rp_filter, forwarding on
//!                          cali*  cali* cali* cali*         one veth per pod, /32 (/128) route to it
//!                            │     │     │     │
//!   pod namespaces:         eth0 … (default via 169.254.1.1 / fe80::1, permanent neighbour)
//! ```
//!
//! Two layouts, one per route source:
//! - [`RouteSource::WorkloadIps`] (Azure CNI): pods take addresses from the node subnet, and
//!   every node's main table routes each other node's pods as /32 (/128) via that node;
//! - [`RouteSource::CidrBlocks`]: each node owns a block (10.65.N.0/26, fd00:65:N::/122) that
//!   the other nodes route via it; a pod whose address lies outside its node's block
//!   (borrowed) is routed as a /32 (/128) via its node.
//!
//! Node `n4` runs no WireGuard. Each node's agent is a [`Worker`] in the node's namespace
//! holding an [`IncrementalPlanner`] and a [`NodeApplier`]: [`Cluster::change`] feeds events to
//! every agent and applies the resulting deltas.
//!
//! A pod's routes carry the mesh MTU of their family (what a CNI does with the WireGuard
//! interface's MTU), so a pod refuses locally what the tunnel could not carry.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use wgmesh_core::{
    Cluster as Model, Event, Family, IncrementalPlanner, MeshConfig, Node, NodePlan, NodeWireGuard,
    Phase, PrivateKey, PublicKey, RouteSource, plan_node,
};

use wgmesh_netlink::keys;

use crate::apply::{Applied, ApplierFactory, NodeApplier, NodeContext, WgImpl};
use crate::count;
use crate::ns::{self, Netns, Worker};
use crate::{Error, Result};

/// How long a join in phases waits for the joining node's handshakes before it switches the
/// node to active (TCG makes a first handshake take seconds).
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);

/// What cluster to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where each node's destinations come from (also picks the address layout).
    pub route_source: RouteSource,
    /// Encrypt host traffic too.
    pub host_encryption: bool,
    /// Give nodes and pods IPv6 addresses too (dual stack).
    pub ipv6: bool,
    /// `None`: today's cluster. `Some(on)`: the strict-mode layout, with `mesh.strict_mode`
    /// set to `on` — `mesh.cluster_cidrs` lists the layout's ranges ([`cluster_cidrs`]), node
    /// `n4` is explicitly plain (`wireguard.enabled: false`, the operator's opt-out), and
    /// `n2`'s IPv4 address on [`CONTROL_PLANE_PORT`] is a control-plane endpoint.
    pub strict_mode: Option<bool>,
}

impl Options {
    /// IPv4 and, where this kernel has IPv6, IPv6.
    pub fn new(route_source: RouteSource, host_encryption: bool) -> Self {
        Self {
            route_source,
            host_encryption,
            ipv6: ipv6_available(),
            strict_mode: None,
        }
    }

    /// The strict-mode layout (see [`Options::strict_mode`]), strict mode on or off.
    pub fn strict(mut self, on: bool) -> Self {
        self.strict_mode = Some(on);
        self
    }
}

/// The TCP port of the control-plane endpoint of the strict-mode layout (on `n2`).
pub const CONTROL_PLANE_PORT: u16 = 6443;

/// The ranges that hold the layout's cluster addresses: the node subnet (which holds the pods
/// too under [`RouteSource::WorkloadIps`], as on AKS) and, under
/// [`RouteSource::CidrBlocks`], the pod pool.
pub fn cluster_cidrs(opts: &Options) -> Vec<IpNet> {
    let mut out = vec!["10.240.0.0/24"];
    if opts.ipv6 {
        out.push("fd00:240::/64");
    }
    if opts.route_source == RouteSource::CidrBlocks {
        out.push("10.65.0.0/16");
        if opts.ipv6 {
            out.push("fd00:65::/48");
        }
    }
    out.iter().filter_map(|c| c.parse().ok()).collect()
}

/// Whether this kernel has IPv6.
pub fn ipv6_available() -> bool {
    Path::new("/proc/sys/net/ipv6").exists()
}

/// A node of the layout.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Its name (`n1`…).
    pub name: String,
    /// Its underlay addresses (IPv4 first).
    pub addresses: Vec<IpAddr>,
    /// Whether it runs WireGuard.
    pub wireguard: bool,
    /// Its IPAM blocks (CIDR-block layout).
    pub blocks: Vec<IpNet>,
}

/// A pod of the layout.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Its name (`p1a`…).
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Its addresses (IPv4 first).
    pub addresses: Vec<IpAddr>,
}

impl PodSpec {
    /// Its address of a family.
    pub fn address(&self, family: Family) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| Family::of(a) == family)
    }
}

impl NodeSpec {
    /// Its address of a family.
    pub fn address(&self, family: Family) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| Family::of(a) == family)
    }
}

/// The underlay address of node `i` (1-based) in the last octet / group.
const NODE_HOST: [u8; 4] = [4, 35, 64, 90];

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 240, 0, last))
}

/// The IPv6 twin of `10.240.0.<last>`: `fd00:240::<last>`, the same digits read as hex.
fn v6(last: u8) -> IpAddr {
    let group = u16::from_str_radix(&last.to_string(), 16).unwrap_or(u16::from(last));
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, group))
}

/// Addresses of a pod in the layout: `k`-th pod address of node `i` (1-based).
pub fn pod_addresses(route_source: RouteSource, ipv6: bool, i: u8, k: u8) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if route_source != RouteSource::CidrBlocks {
        let last = NODE_HOST[usize::from(i - 1)] + k;
        out.push(v4(last));
        if ipv6 {
            out.push(v6(last));
        }
    } else {
        out.push(IpAddr::V4(Ipv4Addr::new(10, 65, i, 1 + k)));
        if ipv6 {
            let (i, k) = (u16::from(i), u16::from(k));
            out.push(IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                0x65,
                i,
                0,
                0,
                0,
                0,
                1 + k,
            )));
        }
    }
    out
}

/// The standard layout: nodes `n1`–`n3` with WireGuard, `n4` without; pods `p1a`, `p1b` on
/// `n1` and `p2`, `p3`, `p4` on the others.
pub fn layout(opts: &Options) -> (Vec<NodeSpec>, Vec<PodSpec>) {
    let mut nodes = Vec::new();
    let mut pods = Vec::new();
    for i in 1..=4u8 {
        let host = NODE_HOST[usize::from(i - 1)];
        let mut addresses = vec![v4(host)];
        if opts.ipv6 {
            addresses.push(v6(host));
        }
        let mut blocks = Vec::new();
        if opts.route_source == RouteSource::CidrBlocks {
            blocks
                .push(IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 65, i, 0)), 26).unwrap_or_default());
            if opts.ipv6 {
                blocks.push(
                    IpNet::new(
                        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x65, u16::from(i), 0, 0, 0, 0, 0)),
                        122,
                    )
                    .unwrap_or_default(),
                );
            }
        }
        let name = format!("n{i}");
        nodes.push(NodeSpec {
            name: name.clone(),
            addresses,
            wireguard: i != 4,
            blocks,
        });
        let names: &[&str] = if i == 1 { &["p1a", "p1b"] } else { &[""] };
        for (k, pod) in names.iter().enumerate() {
            let pod = if pod.is_empty() {
                format!("p{i}")
            } else {
                (*pod).to_owned()
            };
            pods.push(PodSpec {
                name: pod,
                node: name.clone(),
                addresses: pod_addresses(opts.route_source, opts.ipv6, i, k as u8 + 1),
            });
        }
    }
    (nodes, pods)
}

/// Where an agent restart interrupts a scheduled rotation ([`Cluster::rotate_scheduled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationRestart {
    /// No restart.
    None,
    /// After the next key was kept on disk, before the switch.
    AfterKeepingNextKey,
    /// After the switch (the key file replaced, the device's key set), before the new key
    /// was published.
    AfterSwitch,
}

/// A rotation's wait between keeping its next key and switching to it (the agent's: the
/// announcement's echo plus `key_rotation_settle_seconds`, 10 s by default; peers ignore the
/// announcement, so only the time under ping grows with it).
pub const ROTATION_SETTLE: Duration = Duration::from_millis(200);

/// The time between a node's key switch and its peers learning the new key (the API round
/// trip: publication, then each peer's watch), as in `scripts/experiments/rotation-order.sh`
/// (`DELAY`, 50–200 ms there). The switched node's packets to its peers wait in WireGuard's
/// staging queue meanwhile (up to 128 per peer). `WGMESH_E2E_PUBLISH_DELAY_MS` overrides it
/// ([`publish_delay`]).
pub const PUBLISH_DELAY: Duration = Duration::from_millis(200);

/// [`PUBLISH_DELAY`], or `WGMESH_E2E_PUBLISH_DELAY_MS` when set to a number.
pub fn publish_delay() -> Duration {
    std::env::var("WGMESH_E2E_PUBLISH_DELAY_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(PUBLISH_DELAY, Duration::from_millis)
}

/// A node's private keys, one per family.
struct NodeKeys {
    files: [PathBuf; 2],
    public: [PublicKey; 2],
}

fn write_key(path: &Path) -> Result<PublicKey> {
    let key = PrivateKey::generate();
    let text = key.to_base64();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n", &*text))
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::new(format!("writing key {}: {e}", path.display())))?;
    Ok(key.public_key())
}

impl NodeKeys {
    fn generate(dir: &Path, node: &str) -> Result<Self> {
        let files = [
            dir.join(format!("{node}.v4.key")),
            dir.join(format!("{node}.v6.key")),
        ];
        let public = [write_key(&files[0])?, write_key(&files[1])?];
        Ok(Self { files, public })
    }

    fn rotate(&mut self) -> Result<()> {
        self.public = [write_key(&self.files[0])?, write_key(&self.files[1])?];
        Ok(())
    }
}

/// One node's agent: its planner and its applier, on a thread in its namespace.
pub struct AgentState {
    planner: IncrementalPlanner,
    applier: Box<dyn NodeApplier>,
}

/// A node worker's periodic work: the applier's tick; what it repaired goes to the log (the
/// change tables count stalls, the log says which repair ran).
fn agent_tick(a: &mut AgentState) {
    match a.applier.tick() {
        Ok(repaired) => {
            for p in repaired {
                eprintln!(
                    "wgmesh-e2e: {}: watchdog re-added peer {p} (no handshake 1 s after it was added)",
                    a.planner.plan().node
                );
            }
        }
        Err(e) => eprintln!("wgmesh-e2e: {}: watchdog: {e}", a.planner.plan().node),
    }
}

struct NodeRt {
    spec: NodeSpec,
    ns: Netns,
    /// Fabric routes of the main table: destination → via.
    fabric: BTreeMap<IpNet, IpAddr>,
}

struct PodRt {
    spec: PodSpec,
    ns: Netns,
    host_if: String,
}

/// A running cluster. Dropping it removes every namespace, link and daemon it made.
pub struct Cluster {
    // Field order is drop order: agents (sockets, daemons) before the namespaces.
    agents: BTreeMap<String, Worker<AgentState>>,
    pods: BTreeMap<String, PodRt>,
    nodes: BTreeMap<String, NodeRt>,
    _bridge: Netns,
    key_dir: PathBuf,
    keys: BTreeMap<String, NodeKeys>,
    /// The cluster model as the control plane sees it (canonical interface names).
    model: IncrementalPlanner,
    opts: Options,
    factory: Arc<dyn ApplierFactory>,
    tag: String,
    pod_seq: u32,
    mtu: [u32; 2],
}

fn cluster_tag() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    format!("c{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The mesh as node `node`'s agent sees it. With userspace WireGuard every node's devices get
/// names of their own: wireguard-go's configuration socket `/var/run/wireguard/NAME.sock` is a
/// file-system path shared by all namespaces, so two namespaces cannot both have a
/// `wireguard.cali`. The names are local to a node (peers never see them), so this is the
/// same mesh; the kernel runs keep Calico's names.
pub fn node_mesh(mesh: &MeshConfig, wg: WgImpl, tag: &str, node: &str) -> MeshConfig {
    let mut m = mesh.clone();
    if wg == WgImpl::Userspace {
        let pid = std::process::id() % 1000;
        m.interface_name = format!("wg{pid}{tag}{node}");
        m.interface_name_v6 = format!("wg{pid}{tag}{node}6");
    }
    m
}

fn with_mesh(model: &Model, mesh: MeshConfig) -> Result<Model> {
    let (_, nodes) = model.clone().into_parts();
    Model::new(mesh, nodes).map_err(Error::from)
}

impl Cluster {
    /// Builds the standard layout for `opts`, starts an agent per node with appliers from
    /// `factory`, and applies every node's full plan.
    pub fn start(opts: Options, factory: Arc<dyn ApplierFactory>) -> Result<Self> {
        ns::install_signal_handler()?;
        ns::sweep_stale();
        let (nodes, pods) = layout(&opts);
        let tag = cluster_tag();
        let key_dir = std::env::temp_dir().join(format!("wgmesh-e2e-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&key_dir)
            .and_then(|()| {
                std::fs::set_permissions(&key_dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| Error::new(format!("{}: {e}", key_dir.display())))?;
        let bridge = Netns::create(&ns::unique_name(&tag, "br"))?;
        let mut cluster = Self {
            agents: BTreeMap::new(),
            pods: BTreeMap::new(),
            nodes: BTreeMap::new(),
            _bridge: bridge,
            key_dir,
            keys: BTreeMap::new(),
            model: IncrementalPlanner::new(&Model::new(MeshConfig::default(), Vec::new())?, ""),
            opts,
            factory,
            tag,
            pod_seq: 0,
            mtu: [0; 2],
        };
        cluster.build(nodes, pods)?;
        Ok(cluster)
    }

    fn build(&mut self, nodes: Vec<NodeSpec>, pods: Vec<PodSpec>) -> Result<()> {
        let mut mesh = MeshConfig::default();
        mesh.route_source = self.opts.route_source;
        mesh.host_encryption = self.opts.host_encryption;
        if let Some(on) = self.opts.strict_mode {
            mesh.strict_mode = on;
            mesh.cluster_cidrs = cluster_cidrs(&self.opts);
            if let Some(IpAddr::V4(cp)) = nodes
                .iter()
                .find(|n| n.name == "n2")
                .and_then(|n| n.address(Family::V4))
            {
                mesh.control_plane_endpoints = vec![std::net::SocketAddr::new(
                    IpAddr::V4(cp),
                    CONTROL_PLANE_PORT,
                )];
            }
        }
        for n in &nodes {
            if n.wireguard {
                self.keys
                    .insert(n.name.clone(), NodeKeys::generate(&self.key_dir, &n.name)?);
            }
        }
        let model_nodes = nodes
            .iter()
            .map(|n| self.model_node(n, &pods))
            .collect::<Vec<_>>();
        let model = Model::new(mesh, model_nodes)?;
        self.model = IncrementalPlanner::new(&model, "");
        // The mesh MTU of each family, as the CNI would read it from the WireGuard interface.
        for n in &nodes {
            let plan = plan_node(&model, &n.name)?;
            for iface in &plan.interfaces {
                self.mtu[iface.family.index()] = iface.mtu;
            }
        }
        for spec in nodes {
            self.add_node_ns(spec)?;
        }
        for pod in pods {
            self.add_pod_ns(pod)?;
        }
        self.sync_fabric()?;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in &names {
            self.start_agent(name)?;
        }
        for name in &names {
            self.reconcile(name)?;
        }
        Ok(())
    }

    fn model_node(&self, n: &NodeSpec, pods: &[PodSpec]) -> Node {
        let mut node = Node::new(n.name.clone())
            .with_addresses(n.addresses.iter().copied())
            .with_pod_cidrs(n.blocks.iter().copied())
            .with_workload_ips(
                pods.iter()
                    .filter(|p| p.node == n.name)
                    .flat_map(|p| p.addresses.iter().copied()),
            );
        if let Some(keys) = self.keys.get(&n.name) {
            node = node.with_wireguard(NodeWireGuard::new(
                Some(keys.public[0]),
                Some(keys.public[1]),
            ));
        } else if self.opts.strict_mode.is_some() {
            // The strict layout's node without WireGuard is the operator's opt-out.
            let mut wg = NodeWireGuard::new(None, None);
            wg.enabled = false;
            node = node.with_wireguard(wg);
        }
        node
    }

    fn add_node_ns(&mut self, spec: NodeSpec) -> Result<()> {
        let ns = Netns::create(&ns::unique_name(&self.tag, &spec.name))?;
        ns.sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "1"),
            ("net.ipv4.conf.default.rp_filter", "1"),
        ])?;
        if self.opts.ipv6 {
            ns.sysctls(&[("net.ipv6.conf.all.forwarding", "1")])?;
        }
        let bridge = self._bridge.name().to_owned();
        if self._bridge.ip(&["link", "show", "br0"]).is_err() {
            self._bridge
                .ip_batch("link add br0 type bridge\nlink set br0 up\n")?;
        }
        ns::run(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &spec.name,
                "netns",
                &bridge,
            ],
            None,
        )?;
        self._bridge
            .ip(&["link", "set", &spec.name, "master", "br0", "up"])?;
        let mut script = String::new();
        for a in &spec.addresses {
            let len = if a.is_ipv4() { 24 } else { 64 };
            script.push_str(&format!("address add {a}/{len} dev eth0\n"));
        }
        script.push_str("link set eth0 up\n");
        ns.ip_batch(&script)?;
        ns.sysctls(&[("net.ipv4.conf.eth0.rp_filter", "1")])?;
        let ports: Vec<u16> = vec![self.mesh().listen_port, self.mesh().listen_port_v6];
        count::install(&ns, &ports)?;
        self.nodes.insert(
            spec.name.clone(),
            NodeRt {
                spec,
                ns,
                fabric: BTreeMap::new(),
            },
        );
        Ok(())
    }

    fn add_pod_ns(&mut self, spec: PodSpec) -> Result<()> {
        let node = self
            .nodes
            .get(&spec.node)
            .ok_or_else(|| Error::new(format!("pod {}: no node {}", spec.name, spec.node)))?;
        self.pod_seq += 1;
        let host_if = format!("cali{}{}", spec.name, self.pod_seq);
        let ns = Netns::create(&ns::unique_name(&self.tag, &spec.name))?;
        ns::run(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &host_if,
                "netns",
                node.ns.name(),
            ],
            None,
        )?;
        node.ns.ip(&["link", "set", &host_if, "up"])?;
        let mac = link_mac(&node.ns, &host_if)?;
        let mut script = String::new();
        let mut node_script = String::new();
        for a in &spec.addresses {
            if a.is_ipv4() {
                script.push_str(&format!(
                    "address add {a}/32 dev eth0\nlink set eth0 up\n\
                     route add 169.254.1.1 dev eth0 scope link\n\
                     route add default via 169.254.1.1 dev eth0 mtu {}\n\
                     neigh replace 169.254.1.1 lladdr {mac} dev eth0 nud permanent\n",
                    self.mtu[0].max(576)
                ));
                node_script.push_str(&format!("route add {a}/32 dev {host_if} scope link\n"));
            } else {
                script.push_str(&format!(
                    "address add {a}/128 dev eth0 nodad\nlink set eth0 up\n\
                     route add default via fe80::1 dev eth0 mtu {}\n\
                     neigh replace fe80::1 lladdr {mac} dev eth0 nud permanent\n",
                    self.mtu[1].max(1280)
                ));
                node_script.push_str(&format!("route add {a}/128 dev {host_if}\n"));
            }
        }
        ns.ip_batch(&script)?;
        node.ns.ip_batch(&node_script)?;
        self.pods
            .insert(spec.name.clone(), PodRt { spec, ns, host_if });
        Ok(())
    }

    /// The main-table routes of every node, from where pods and blocks are now.
    fn sync_fabric(&mut self) -> Result<()> {
        let mut owner: Vec<(IpNet, String)> = Vec::new();
        for n in self.nodes.values() {
            for b in &n.spec.blocks {
                owner.push((*b, n.spec.name.clone()));
            }
        }
        for p in self.pods.values() {
            let node = &self.nodes[&p.spec.node];
            for a in &p.spec.addresses {
                let covered = node.spec.blocks.iter().any(|b| b.contains(a));
                if !covered {
                    owner.push((wgmesh_core::model::host_net(*a), p.spec.node.clone()));
                }
            }
        }
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let mut want = BTreeMap::new();
            for (dest, node) in &owner {
                if *node == name {
                    continue;
                }
                if let Some(via) = self.nodes[node].spec.address(Family::of_net(dest)) {
                    want.insert(*dest, via);
                }
            }
            let rt = self
                .nodes
                .get_mut(&name)
                .ok_or_else(|| Error::new("node vanished"))?;
            let mut script = String::new();
            for (dest, via) in &rt.fabric {
                if want.get(dest) != Some(via) {
                    script.push_str(&format!("route del {dest} via {via} dev eth0\n"));
                }
            }
            for (dest, via) in &want {
                if rt.fabric.get(dest) != Some(via) {
                    script.push_str(&format!("route add {dest} via {via} dev eth0\n"));
                }
            }
            if !script.is_empty() {
                rt.ns.ip_batch(&script)?;
            }
            rt.fabric = want;
        }
        Ok(())
    }

    fn start_agent(&mut self, name: &str) -> Result<()> {
        let ctx = self.context(name)?;
        let node_model = with_mesh(&self.model.cluster()?, ctx.mesh.clone())?;
        let factory = self.factory.clone();
        let node_name = name.to_owned();
        let ns = &self.nodes[name].ns;
        let worker = Worker::start_ticking(
            ns,
            move || {
                let applier = factory.open(&ctx)?;
                Ok(AgentState {
                    planner: IncrementalPlanner::new(&node_model, &node_name),
                    applier,
                })
            },
            Some((crate::apply::TICK, agent_tick)),
        )?;
        self.agents.insert(name.to_owned(), worker);
        Ok(())
    }

    fn context(&self, name: &str) -> Result<NodeContext> {
        let mesh = node_mesh(self.mesh(), self.factory.wg(), &self.tag, name);
        if self.factory.wg() == WgImpl::Userspace {
            for iface in [&mesh.interface_name, &mesh.interface_name_v6] {
                ns::register_socket(Path::new(ns::WG_SOCKET_DIR).join(format!("{iface}.sock")));
            }
        }
        let key_files = match self.keys.get(name) {
            Some(k) => k.files.clone(),
            None => [
                self.key_dir.join(format!("{name}.v4.key")),
                self.key_dir.join(format!("{name}.v6.key")),
            ],
        };
        Ok(NodeContext {
            node: name.to_owned(),
            mesh,
            key_files,
        })
    }

    fn agent(&self, name: &str) -> Result<&Worker<AgentState>> {
        self.agents
            .get(name)
            .ok_or_else(|| Error::new(format!("no agent for node {name}")))
    }

    /// Full reconcile of one node with its planner's current plan.
    pub fn reconcile(&self, name: &str) -> Result<Applied> {
        self.agent(name)?
            .call(|a| {
                let plan = a.planner.plan();
                a.applier.reconcile(&plan)
            })?
            .map_err(|e| e.context(format!("reconcile of {name}")))
    }

    /// Reconciles a node to an arbitrary plan, behind its planner's back (tests use it to
    /// break a node on purpose and check that the harness notices).
    pub fn force_plan(&self, name: &str, plan: NodePlan) -> Result<Applied> {
        self.agent(name)?
            .call(move |a| a.applier.reconcile(&plan))?
            .map_err(|e| e.context(format!("forced plan on {name}")))
    }

    /// Full reconcile of every node; returns the operations performed per node.
    pub fn reconcile_all(&self) -> Result<BTreeMap<String, usize>> {
        let mut out = BTreeMap::new();
        for name in self.agents.keys() {
            out.insert(name.clone(), self.reconcile(name)?.operations);
        }
        Ok(out)
    }

    /// The plan a node's agent holds now.
    pub fn plan(&self, name: &str) -> Result<NodePlan> {
        self.agent(name)?.call(|a| a.planner.plan())
    }

    /// Feeds `events` to the control-plane model and to every agent (in node order), and
    /// applies each delta with the applier's incremental path. Checks that every agent's
    /// plan still equals a full recompute. Returns the operations performed.
    pub fn change(&mut self, events: &[Event]) -> Result<usize> {
        let before = self.participants()?;
        for ev in events {
            self.model.apply(ev.clone())?;
        }
        let after = self.participants()?;
        let mut total = 0;
        let names = self.order(events, &before, &after);
        for name in names {
            total += self.apply_on(&name, events)?;
        }
        Ok(total)
    }

    /// One step of a phased change: feeds `events` to the control-plane model and to every
    /// agent, node `node`'s agent first (`first`) or last, the others in name order.
    fn step(&mut self, events: &[Event], node: &str, first: bool) -> Result<usize> {
        let mut total = 0;
        if first && self.agents.contains_key(node) {
            total += self.apply_on(node, events)?;
        }
        total += self.step_others(events, node)?;
        if !first && self.agents.contains_key(node) {
            total += self.apply_on(node, events)?;
        }
        Ok(total)
    }

    /// Feeds `events` to the control-plane model and to every agent but node `node`'s.
    fn step_others(&mut self, events: &[Event], node: &str) -> Result<usize> {
        for ev in events {
            self.model.apply(ev.clone())?;
        }
        let names: Vec<String> = self.agents.keys().filter(|n| *n != node).cloned().collect();
        let mut total = 0;
        for name in names {
            total += self.apply_on(&name, events)?;
        }
        Ok(total)
    }

    /// Node `name`'s agent applies `events` (its planner, then the delta through its
    /// applier's incremental path) and checks that its plan equals a full recompute of its
    /// planner's cluster. The control-plane model is not touched: a node's own view (its
    /// joining phase) goes through here alone.
    fn apply_on(&self, name: &str, events: &[Event]) -> Result<usize> {
        let wg = self.factory.wg();
        let own: Vec<Event> = events
            .iter()
            .map(|ev| match ev {
                Event::MeshChanged(m) => Event::MeshChanged(node_mesh(m, wg, &self.tag, name)),
                other => other.clone(),
            })
            .collect();
        let n = name.to_owned();
        self.agent(name)?.call(move |a| -> Result<usize> {
            let mut ops = 0;
            for ev in own {
                let delta = a.planner.apply(ev)?;
                if !delta.is_empty() {
                    ops += a.applier.apply_delta(&delta)?.operations;
                }
            }
            let model = a.planner.cluster()?;
            let full = if model.node(&n).is_some() {
                plan_node(&model, &n)?
            } else {
                NodePlan::empty(n.clone())
            };
            if full != a.planner.plan() {
                return Err(Error::new(format!(
                    "node {n}: incremental plan differs from a full recompute"
                )));
            }
            Ok(ops)
        })?
    }

    /// The order in which agents apply a change. A node that joins the mesh (its WireGuard is
    /// enabled, it is added) goes first, so its device and peers exist when the others start
    /// sending to it; a node that leaves goes last, so the others stop encrypting to it before
    /// its device disappears; the others follow in name order. Either wrong order costs real
    /// packets: a handshake initiation that reaches a node without the device (or without the
    /// sender's key) is only retried after WireGuard's 5-second rekey timeout (see
    /// BENCHMARKS.md). `WGMESH_E2E_ORDER=changed-first|changed-last` overrides this, to
    /// measure it.
    fn order(
        &self,
        events: &[Event],
        before: &BTreeSet<String>,
        after: &BTreeSet<String>,
    ) -> Vec<String> {
        let named: BTreeSet<String> = events
            .iter()
            .filter_map(|e| match e {
                Event::NodeUpserted(n) => Some(n.name.clone()),
                Event::NodeRemoved { node }
                | Event::PublicKeyChanged { node, .. }
                | Event::WorkloadIpAdded { node, .. }
                | Event::WorkloadIpRemoved { node, .. }
                | Event::BlockAdded { node, .. }
                | Event::BlockRemoved { node, .. } => Some(node.clone()),
                _ => None,
            })
            .collect();
        let mode = std::env::var("WGMESH_E2E_ORDER").unwrap_or_default();
        let rank = |n: &String| -> u8 {
            if !named.contains(n) {
                return 1;
            }
            let leaving = before.contains(n) && !after.contains(n);
            match mode.as_str() {
                "changed-first" => 0,
                "changed-last" => 2,
                _ if leaving => 2,
                _ => 0,
            }
        };
        let mut names: Vec<String> = self.agents.keys().cloned().collect();
        names.sort_by_key(|n| (rank(n), n.clone()));
        names
    }

    /// The nodes that take part in the mesh (either family) in the control plane's model.
    fn participants(&self) -> Result<BTreeSet<String>> {
        let model = self.model()?;
        Ok(model
            .nodes()
            .iter()
            .filter(|n| {
                model.mesh().enabled
                    && n.wireguard_enabled()
                    && Family::ALL.iter().any(|f| n.key(*f).is_some())
            })
            .map(|n| n.name.clone())
            .collect())
    }

    /// Rotates a node's keys: new key files, its agent restarted on them (a full reconcile
    /// programs the new private key), then every agent learns the new public keys.
    pub fn rotate_keys(&mut self, name: &str) -> Result<usize> {
        let keys = self
            .keys
            .get_mut(name)
            .ok_or_else(|| Error::new(format!("node {name} has no keys")))?;
        keys.rotate()?;
        let public = keys.public;
        let events = [
            Event::PublicKeyChanged {
                node: name.to_owned(),
                family: Family::V4,
                public_key: Some(public[0]),
            },
            Event::PublicKeyChanged {
                node: name.to_owned(),
                family: Family::V6,
                public_key: Some(public[1]),
            },
        ];
        // The node's own agent restarts with the new key and is reconciled first.
        self.agents.remove(name);
        for ev in &events {
            self.model.apply(ev.clone())?;
        }
        self.start_agent(name)?;
        let mut ops = self.reconcile(name)?.operations;
        let others: Vec<String> = self.agents.keys().filter(|n| *n != name).cloned().collect();
        for other in others {
            let evs = events.to_vec();
            ops += self.agent(&other)?.call(move |a| -> Result<usize> {
                let mut ops = 0;
                for ev in evs {
                    let delta = a.planner.apply(ev)?;
                    ops += a.applier.apply_delta(&delta)?.operations;
                }
                Ok(ops)
            })??;
        }
        Ok(ops)
    }

    /// A node's agent restarted: its worker (planner, applier) dropped and started again on
    /// the control plane's model and the node's key files, then a full reconcile, as the agent
    /// does at start. The devices (and wireguard-go's daemons) stay, as they do when the agent's
    /// process restarts. Returns the operations the reconcile performed.
    pub fn restart_agent(&mut self, name: &str) -> Result<usize> {
        self.agents.remove(name);
        self.start_agent(name)?;
        Ok(self.reconcile(name)?.operations)
    }

    /// One scheduled key rotation of node `name`, in the agent's order
    /// (`wgmesh_k8s::rotation`, BENCHMARKS.md "The kernel half, and which order loses least"):
    ///
    /// 1. the next key is made and kept on disk beside each key file (`PATH.next`, mode 0600:
    ///    `wgmesh_netlink::keys::write_key`, as `NetlinkDataplane::create_next_key` does);
    /// 2. it is announced and the node waits for the echo plus the settle time
    ///    ([`ROTATION_SETTLE`], scaled down). Peers ignore announcements (only the bound on
    ///    concurrent rotations reads them, which the agent's scenario tests cover), so nothing
    ///    here reaches a dataplane;
    /// 3. the switch: [`NodeApplier::switch_to_next_keys`] (one `rename` per file, the new
    ///    private key on the device by a full reconcile);
    /// 4. after [`publish_delay`] (the API round trip: publication, the peers' watch) every
    ///    agent learns the new public keys and applies its delta: the peers add the new entry
    ///    (which takes the allowed IPs), kick a handshake, and remove the old entry.
    ///
    /// `restart` restarts the node's agent at one point between those steps; the restarted
    /// agent finishes the rotation from the files. Returns the operations performed.
    ///
    /// wgmesh-e2e does not call the agent itself (`wgmesh-k8s` would bring kube, k8s-openapi
    /// with a Kubernetes version feature, and tokio into the test binary that runs in the VM):
    /// it drives the same wgmesh-netlink key-file functions and reconciler calls in the same
    /// order.
    pub fn rotate_scheduled(&mut self, name: &str, restart: RotationRestart) -> Result<usize> {
        let files = self
            .keys
            .get(name)
            .ok_or_else(|| Error::new(format!("node {name} has no keys")))?
            .files
            .clone();
        let mut ops = 0;
        for f in &files {
            keys::write_key(&keys::next_key_path(f), &PrivateKey::generate())
                .map_err(|e| Error::new(format!("node {name}: keeping the next key: {e}")))?;
        }
        if restart == RotationRestart::AfterKeepingNextKey {
            ops += self.restart_agent(name)?;
        }
        std::thread::sleep(ROTATION_SETTLE);
        ops += self
            .agent(name)?
            .call(|a| {
                let plan = a.planner.plan();
                a.applier.switch_to_next_keys(&plan)
            })?
            .map_err(|e| e.context(format!("key switch of {name}")))?
            .operations;
        for f in &files {
            if keys::next_key_path(f).exists() {
                return Err(Error::new(format!(
                    "node {name}: {} still there after the switch",
                    keys::next_key_path(f).display()
                )));
            }
        }
        if restart == RotationRestart::AfterSwitch {
            ops += self.restart_agent(name)?;
        }
        std::thread::sleep(publish_delay());
        let public = self.agent(name)?.call(|a| a.applier.public_keys())?;
        let [Some(v4), Some(v6)] = public else {
            return Err(Error::new(format!(
                "node {name}: no key to publish after the switch"
            )));
        };
        let entry = self
            .keys
            .get_mut(name)
            .ok_or_else(|| Error::new(format!("node {name} has no keys")))?;
        if entry.public.contains(&v4) || entry.public.contains(&v6) {
            return Err(Error::new(format!(
                "node {name}: the switch left an old key in place"
            )));
        }
        entry.public = [v4, v6];
        let events: Vec<Event> = Family::ALL
            .iter()
            .map(|f| Event::PublicKeyChanged {
                node: name.to_owned(),
                family: *f,
                public_key: Some([v4, v6][f.index()]),
            })
            .collect();
        ops += self.change(&events)?;
        Ok(ops)
    }

    /// Adds a pod to a node: namespace, veth, routes, fabric; then the mesh learns it.
    pub fn add_pod(&mut self, name: &str, node: &str, addresses: Vec<IpAddr>) -> Result<usize> {
        self.add_pod_unannounced(name, node, addresses)?;
        self.announce_pod(name)
    }

    /// Adds a pod to a node (namespace, veth, routes, fabric) without telling the mesh: the
    /// window before its address is known everywhere.
    pub fn add_pod_unannounced(
        &mut self,
        name: &str,
        node: &str,
        addresses: Vec<IpAddr>,
    ) -> Result<()> {
        self.add_pod_ns(PodSpec {
            name: name.to_owned(),
            node: node.to_owned(),
            addresses,
        })?;
        self.sync_fabric()
    }

    /// The mesh learns a pod's addresses (what [`Self::add_pod`] does after the pod exists).
    pub fn announce_pod(&mut self, name: &str) -> Result<usize> {
        let pod = self.pod(name)?;
        let events: Vec<Event> = pod
            .addresses
            .iter()
            .map(|ip| Event::WorkloadIpAdded {
                node: pod.node.clone(),
                ip: *ip,
            })
            .collect();
        self.change(&events)
    }

    /// Publishes these public keys for a node (`None`: the key annotation removed), as the
    /// control plane would; its private keys stay as they are.
    pub fn publish_keys(&mut self, name: &str, keys: [Option<PublicKey>; 2]) -> Result<usize> {
        let events: Vec<Event> = Family::ALL
            .iter()
            .map(|f| Event::PublicKeyChanged {
                node: name.to_owned(),
                family: *f,
                public_key: keys[f.index()],
            })
            .collect();
        self.change(&events)
    }

    /// Switches strict mode on or off on the running cluster.
    pub fn set_strict_mode(&mut self, on: bool) -> Result<usize> {
        let mut mesh = self.mesh().clone();
        mesh.strict_mode = on;
        self.change(&[Event::MeshChanged(mesh)])
    }

    /// A node's strict-mode ingress drop counters `[IPv4, IPv6]`, read by its applier from
    /// wgmesh's own nftables table (what `wgmesh_strict_dropped_packets_total` is built
    /// from); `None` when the filter is not installed.
    pub fn strict_drops(&self, name: &str) -> Result<Option<[u64; 2]>> {
        self.agent(name)?.call(|a| a.applier.strict_drops())?
    }

    /// Removes a pod: the mesh forgets it, then its namespace and routes go.
    pub fn remove_pod(&mut self, name: &str) -> Result<usize> {
        let pod = self
            .pods
            .get(name)
            .ok_or_else(|| Error::new(format!("no pod {name}")))?;
        let events: Vec<Event> = pod
            .spec
            .addresses
            .iter()
            .map(|ip| Event::WorkloadIpRemoved {
                node: pod.spec.node.clone(),
                ip: *ip,
            })
            .collect();
        let ops = self.change(&events)?;
        if let Some(pod) = self.pods.remove(name) {
            let node = &self.nodes[&pod.spec.node];
            let _ = node.ns.ip(&["link", "del", &pod.host_if]);
            drop(pod);
        }
        self.sync_fabric()?;
        Ok(ops)
    }

    /// Moves a pod to another node, keeping its addresses (the pod is deleted and a new one
    /// gets its addresses there; under `cidr_blocks` they become borrowed addresses).
    pub fn move_pod(&mut self, name: &str, to: &str) -> Result<usize> {
        let old = self
            .pods
            .remove(name)
            .ok_or_else(|| Error::new(format!("no pod {name}")))?;
        let from = old.spec.node.clone();
        let addresses = old.spec.addresses.clone();
        if let Some(node) = self.nodes.get(&from) {
            let _ = node.ns.ip(&["link", "del", &old.host_if]);
        }
        drop(old);
        // The fabric forgets the address before the new pod's route claims it on its node.
        self.sync_fabric()?;
        self.add_pod_ns(PodSpec {
            name: name.to_owned(),
            node: to.to_owned(),
            addresses: addresses.clone(),
        })?;
        self.sync_fabric()?;
        let mut events: Vec<Event> = addresses
            .iter()
            .map(|ip| Event::WorkloadIpRemoved {
                node: from.clone(),
                ip: *ip,
            })
            .collect();
        events.extend(addresses.iter().map(|ip| Event::WorkloadIpAdded {
            node: to.to_owned(),
            ip: *ip,
        }));
        self.change(&events)
    }

    /// The node as the control plane publishes it now: its layout, its pods, its keys; with
    /// WireGuard enabled or not.
    pub fn published_node(&self, name: &str, wireguard: bool) -> Result<Node> {
        let spec = self.node(name)?;
        let pods: Vec<PodSpec> = self.pods.values().map(|p| p.spec.clone()).collect();
        let mut node = self.model_node(spec, &pods);
        if !wireguard {
            if let Some(wg) = node.wireguard.as_mut() {
                wg.enabled = false;
            }
        }
        Ok(node)
    }

    /// The node as published, in a phase.
    fn phased_node(&self, name: &str, phase: Phase) -> Result<Node> {
        let mut node = self.published_node(name, true)?;
        if let Some(wg) = node.wireguard.as_mut() {
            wg.phase = phase;
        }
        Ok(node)
    }

    /// The first step of a leave (make-before-break), as the Kubernetes agent runs it: the
    /// node is published `leaving`, its own agent applies first (it keeps encrypting; in
    /// strict mode its ingress filter goes, so its peers' plaintext arrives), then its peers
    /// (they send to it plain by marking and keep it as a peer and its routes, so its
    /// encrypted packets still pass their reverse-path check). The caller then drops the
    /// node, its own agent first: it goes from encrypting straight to plain.
    fn leave(&mut self, name: &str) -> Result<usize> {
        let leaving = self.phased_node(name, Phase::Leaving)?;
        self.step(&[Event::NodeUpserted(leaving)], name, true)
    }

    /// A join in phases (make-before-break): the node is published `joining`, its own agent
    /// first (device, every peer and route; all of its traffic marked, so sent plain), then
    /// its peers (they add it as a peer, which starts a handshake, and send to it plain by
    /// marking); once the node has a handshake with every peer (or after `HANDSHAKE_WAIT`,
    /// logged), `node` (the node active) is applied, its own agent first (it encrypts; its
    /// peers accept, and the reverse-path check passes since their routes to it stay in the
    /// tunnel), then its peers (they encrypt to it).
    fn join(&mut self, name: &str, node: Node) -> Result<usize> {
        let mut joining = node.clone();
        if let Some(wg) = joining.wireguard.as_mut() {
            wg.phase = Phase::Joining;
        }
        let mut ops = self.step(&[Event::NodeUpserted(joining)], name, true)?;
        self.wait_handshakes(name, HANDSHAKE_WAIT);
        ops += self.step(&[Event::NodeUpserted(node)], name, true)?;
        Ok(ops)
    }

    /// Waits until node `name`'s WireGuard devices have a handshake with every peer, up to
    /// `timeout` (then goes on, with a line on stderr: the join still works, its first
    /// encrypted packets wait in WireGuard's queue for the handshake).
    fn wait_handshakes(&self, name: &str, timeout: Duration) {
        let Ok(ns) = self.node_ns(name) else { return };
        let mesh = node_mesh(self.mesh(), self.factory.wg(), &self.tag, name);
        let start = Instant::now();
        loop {
            // Each device the node has (a family without an address has none).
            let done = [&mesh.interface_name, &mesh.interface_name_v6]
                .iter()
                .filter_map(|iface| {
                    ns.exec("wg", &["show", iface.as_str(), "latest-handshakes"], None)
                        .ok()
                })
                .all(|text| {
                    text.lines()
                        .all(|l| l.split_whitespace().nth(1).is_some_and(|t| t != "0"))
                });
            if done {
                return;
            }
            if start.elapsed() > timeout {
                eprintln!(
                    "wgmesh-e2e: {name}: no handshake with every peer {timeout:?} into the join; switching anyway"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Turns WireGuard off or on for a node (the node stays in the cluster), in phases
    /// (make-before-break): off is the leave steps (`leave`), then WireGuard disabled, the node first
    /// (it drops its device and routes), then its peers (they drop it as a peer); on is
    /// the join steps (`join`).
    pub fn set_wireguard(&mut self, name: &str, enabled: bool) -> Result<usize> {
        let node = self.published_node(name, enabled)?;
        if enabled {
            return self.join(name, node);
        }
        let mut ops = self.leave(name)?;
        ops += self.step(&[Event::NodeUpserted(node)], name, true)?;
        Ok(ops)
    }

    /// Removes a node from the cluster (its namespace and pods stay, outside the mesh), in
    /// phases: the leave steps (`leave`), then the node removed, its own agent first.
    pub fn remove_node(&mut self, name: &str) -> Result<usize> {
        let mut ops = self.leave(name)?;
        ops += self.step(
            &[Event::NodeRemoved {
                node: name.to_owned(),
            }],
            name,
            true,
        )?;
        Ok(ops)
    }

    /// Removes a node abruptly, with no phase: every agent learns at once that it is gone
    /// (in the order of [`Self::change`]: the node's own agent last), as when a Node object
    /// is deleted.
    pub fn delete_node(&mut self, name: &str) -> Result<usize> {
        self.change(&[Event::NodeRemoved {
            node: name.to_owned(),
        }])
    }

    /// Adds a removed node back, as it was, in phases (the join steps (`join`)).
    pub fn readd_node(&mut self, name: &str) -> Result<usize> {
        let node = self.published_node(name, true)?;
        self.join(name, node)
    }

    /// The control plane's model now.
    pub fn model(&self) -> Result<Model> {
        Ok(self.model.cluster()?)
    }

    /// The mesh settings (canonical names).
    pub fn mesh(&self) -> &MeshConfig {
        self.model.mesh()
    }

    /// A node's WireGuard public keys (None for a node without WireGuard).
    pub fn public_keys(&self, name: &str) -> Option<[PublicKey; 2]> {
        self.keys.get(name).map(|k| k.public)
    }

    /// The cluster's options.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The WireGuard implementation the nodes run.
    pub fn wg(&self) -> WgImpl {
        self.factory.wg()
    }

    /// The mesh MTU of a family (as given to pods).
    pub fn mtu(&self, family: Family) -> u32 {
        self.mtu[family.index()]
    }

    /// Node names.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// A node's layout.
    pub fn node(&self, name: &str) -> Result<&NodeSpec> {
        self.nodes
            .get(name)
            .map(|n| &n.spec)
            .ok_or_else(|| Error::new(format!("no node {name}")))
    }

    /// A node's namespace.
    pub fn node_ns(&self, name: &str) -> Result<&Netns> {
        self.nodes
            .get(name)
            .map(|n| &n.ns)
            .ok_or_else(|| Error::new(format!("no node {name}")))
    }

    /// A pod's layout.
    pub fn pod(&self, name: &str) -> Result<&PodSpec> {
        self.pods
            .get(name)
            .map(|p| &p.spec)
            .ok_or_else(|| Error::new(format!("no pod {name}")))
    }

    /// A pod's namespace.
    pub fn pod_ns(&self, name: &str) -> Result<&Netns> {
        self.pods
            .get(name)
            .map(|p| &p.ns)
            .ok_or_else(|| Error::new(format!("no pod {name}")))
    }

    /// Pod names.
    pub fn pod_names(&self) -> Vec<String> {
        self.pods.keys().cloned().collect()
    }

    /// The names of every namespace of this cluster.
    pub fn namespaces(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .nodes
            .values()
            .map(|n| n.ns.name().to_owned())
            .chain(self.pods.values().map(|p| p.ns.name().to_owned()))
            .collect();
        out.push(self._bridge.name().to_owned());
        out
    }

    /// Pids of processes in node namespaces (the userspace WireGuard daemons).
    pub fn daemon_pids(&self) -> Vec<i32> {
        self.nodes.values().flat_map(|n| n.ns.pids()).collect()
    }

    /// What `wg(8)` shows on every node with an agent: latest handshakes, endpoints and
    /// transfer counters per peer (public keys only), for the log of a stall.
    pub fn wireguard_state(&self) -> String {
        let mut out = String::new();
        for name in self.agents.keys() {
            let Ok(ns) = self.node_ns(name) else { continue };
            for what in ["latest-handshakes", "endpoints", "transfer"] {
                match ns.exec("wg", &["show", "all", what], None) {
                    Ok(text) => {
                        for line in text.lines() {
                            out.push_str(&format!("  {name} {what}: {line}\n"));
                        }
                    }
                    Err(e) => out.push_str(&format!("  {name} {what}: {e}\n")),
                }
            }
        }
        out
    }

    /// Waits until every pair of pods on different WireGuard nodes can reach each other
    /// (handshakes done), up to `timeout` per pair.
    pub fn wait_mesh(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let model = self.model()?;
        let wg_nodes: BTreeSet<String> = model
            .nodes()
            .iter()
            .filter(|n| n.wireguard_enabled())
            .map(|n| n.name.clone())
            .collect();
        for a in self.pods.values() {
            for b in self.pods.values() {
                if a.spec.node == b.spec.node
                    || !wg_nodes.contains(&a.spec.node)
                    || !wg_nodes.contains(&b.spec.node)
                {
                    continue;
                }
                for dst in &b.spec.addresses {
                    crate::traffic::wait_reachable(&a.ns, *dst, timeout)?;
                }
            }
        }
        Ok(start.elapsed())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        self.pods.clear();
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.key_dir);
    }
}

fn link_mac(ns: &Netns, ifname: &str) -> Result<String> {
    let out = ns.ip(&["-o", "link", "show", ifname])?;
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "link/ether" {
            return words
                .next()
                .map(str::to_owned)
                .ok_or_else(|| Error::new("no MAC"));
        }
    }
    Err(Error::new(format!("{ifname}: no link/ether in `{out}`")))
}
