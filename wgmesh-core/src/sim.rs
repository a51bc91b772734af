//! A packet-path simulator: the design's picture, checked against plans.
//!
//! Given a cluster and the plans of its nodes, [`Simulator::trace`] walks one packet the way a
//! Linux node would: marking (nftables, from the plan), the local table, the policy rules and
//! the mesh table (from the plan), the main table (the CNI's routes, modelled from the
//! cluster: own addresses are local, own pods sit behind their workload interface, everything
//! else is reached over the underlay), strict reverse-path filtering honouring
//! `src_valid_mark`, WireGuard's peer selection by longest prefix, the underlay, the
//! receiver's key lookup and cryptokey check, and delivery. It classifies the packet as
//! [`Outcome::Local`], [`Outcome::Encrypted`], [`Outcome::Plain`] or dropped, with the reason
//! and every hop.
//!
//! Model limits: one underlay interface per node; the underlay delivers any address to the
//! node that owns it (when nodes claim one address, to the first of them in the cluster's
//! order, its addresses before its workloads); IPv6 has no kernel reverse-path filter (as on
//! Linux); marks do not survive WireGuard decapsulation (WireGuard scrubs the packet).
//!
//! ```
//! use wgmesh_core::{sim::{Outcome, Simulator, Source}, spec::parse_cluster};
//! let cluster = parse_cluster(r#"{"mesh": {"route_source": "workload_ips"}, "nodes": [
//!   {"name": "a", "addresses": ["10.0.0.1"], "workload_ips": ["10.0.0.10", "10.0.0.11"],
//!    "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
//!   {"name": "b", "addresses": ["10.0.0.2"], "workload_ips": ["10.0.0.20"],
//!    "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
//! let sim = Simulator::from_cluster(&cluster);
//! let pod = |ip: &str| Source::Pod(ip.parse().unwrap());
//! assert_eq!(sim.trace(pod("10.0.0.10"), "10.0.0.20".parse().unwrap()).outcome, Outcome::Encrypted);
//! assert_eq!(sim.trace(pod("10.0.0.10"), "10.0.0.11".parse().unwrap()).outcome, Outcome::Local);
//! # Ok::<(), wgmesh_core::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::model::{Cluster, Family};
use crate::plan::{InterfacePlan, NodePlan, PeerPlan, RouteType, SRC_VALID_MARK, plan_all};

/// Where a packet starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A pod, by address (the node that runs it is found from the cluster).
    Pod(IpAddr),
    /// A node's host network stack, with the node's first address of the family as source.
    Host(String, Family),
}

/// How a packet ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered without leaving the node.
    Local,
    /// Delivered, and it crossed the underlay only inside WireGuard.
    Encrypted,
    /// Delivered, and it crossed the underlay in plaintext.
    Plain,
    /// Not delivered.
    Dropped(Drop),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Drop {
    /// The source is not a pod or node of the cluster.
    UnknownSource,
    /// No route to the destination on this node.
    NoRoute {
        /// The node.
        node: String,
    },
    /// Routed into WireGuard, but no peer allows the destination (WireGuard answers
    /// "required key not available").
    NoPeer {
        /// The node.
        node: String,
    },
    /// WireGuard's own packet was routed back into the tunnel.
    Loop {
        /// The node.
        node: String,
    },
    /// Nothing listens on the endpoint's port (or the endpoint is not a node).
    NoListener {
        /// The endpoint.
        endpoint: SocketAddr,
    },
    /// The sender encrypted to a key the receiver's interface does not have (the receiver's
    /// key changed and the sender has not learned it yet), so the handshake fails.
    StaleReceiverKey {
        /// The receiving node.
        node: String,
    },
    /// The receiver has no peer with the sender's key, so the handshake fails.
    UnknownSender {
        /// The receiving node.
        node: String,
    },
    /// The receiver's peer for the sender does not allow the inner source address.
    SourceNotAllowed {
        /// The receiving node.
        node: String,
        /// The inner source.
        source: IpAddr,
    },
    /// Strict reverse-path filtering dropped it.
    ReversePath {
        /// The node.
        node: String,
        /// The interface it arrived on.
        interface: String,
        /// The source that failed the check.
        source: IpAddr,
    },
    /// The next hop never answered ARP: strict reverse-path filtering dropped the request
    /// because the sender's address routes elsewhere (into the tunnel).
    Arp {
        /// The node that dropped the ARP request.
        node: String,
        /// The sender it could not answer.
        sender: IpAddr,
    },
    /// It reached a node that neither owns nor can forward the destination.
    NotDeliverable {
        /// The node.
        node: String,
    },
    /// A blackhole route of the mesh table dropped it (strict mode).
    Blackhole {
        /// The node.
        node: String,
        /// The route's destination.
        destination: IpNet,
    },
    /// Strict mode's ingress filter dropped it: it arrived in plaintext from the underlay
    /// with a participating peer's source.
    StrictIngress {
        /// The receiving node.
        node: String,
        /// The source.
        source: IpAddr,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => f.write_str("local"),
            Self::Encrypted => f.write_str("encrypted"),
            Self::Plain => f.write_str("plain"),
            Self::Dropped(d) => write!(f, "dropped: {d:?}"),
        }
    }
}

/// The result of a trace: the outcome and a line per step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// How it ended.
    pub outcome: Outcome,
    /// What happened, step by step.
    pub hops: Vec<String>,
    /// Every WireGuard hop: the node that encrypted the packet and the peer (node name) it
    /// encrypted it to, in order.
    pub tunnels: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Iface {
    Underlay,
    Mesh(String),
    Workload(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    Blackhole(IpNet),
    Local,
    Workload(IpAddr),
    Underlay(usize),
    Dev(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Host(usize),
    Pod(usize),
}

/// The simulator: a cluster and the plan of every node.
#[derive(Debug, Clone)]
pub struct Simulator {
    cluster: Cluster,
    plans: Vec<NodePlan>,
    owners: HashMap<IpAddr, Owner>,
}

struct Walk<'a> {
    sim: &'a Simulator,
    hops: Vec<String>,
    tunnels: Vec<(String, String)>,
}

impl Simulator {
    /// A simulator for these plans (nodes without a plan program nothing).
    pub fn new(cluster: &Cluster, plans: impl IntoIterator<Item = NodePlan>) -> Self {
        let mut by_name: HashMap<String, NodePlan> =
            plans.into_iter().map(|p| (p.node.clone(), p)).collect();
        let plans = cluster
            .nodes()
            .iter()
            .map(|n| {
                by_name
                    .remove(&n.name)
                    .unwrap_or_else(|| NodePlan::empty(&n.name))
            })
            .collect();
        let mut owners = HashMap::new();
        for (i, n) in cluster.nodes().iter().enumerate() {
            for a in &n.addresses {
                owners.entry(*a).or_insert(Owner::Host(i));
            }
            for a in &n.workload_ips {
                owners.entry(*a).or_insert(Owner::Pod(i));
            }
        }
        Self {
            cluster: cluster.clone(),
            plans,
            owners,
        }
    }

    /// A simulator with every node's plan computed by [`plan_all`].
    pub fn from_cluster(cluster: &Cluster) -> Self {
        Self::new(cluster, plan_all(cluster))
    }

    /// Walks one plaintext packet that node `from` puts on the underlay with any source (a
    /// spoofed one, say) toward the node that owns `to`, as an attacker on the underlay
    /// would; the receiver's filters decide. `None` when `from` is unknown or nobody owns
    /// `to`.
    ///
    /// ```
    /// use wgmesh_core::{sim::{Drop, Outcome, Simulator}, spec::parse_cluster};
    /// let cluster = parse_cluster(r#"{"mesh": {"strict_mode": true}, "nodes": [
    ///   {"name": "a", "addresses": ["10.0.0.1"], "workload_ips": ["10.65.0.1"], "pod_cidrs": ["10.65.0.0/26"],
    ///    "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
    ///   {"name": "b", "addresses": ["10.0.0.2"], "pod_cidrs": ["10.65.0.64/26"],
    ///    "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}},
    ///   {"name": "x", "addresses": ["10.0.0.9"]}]}"#)?;
    /// let sim = Simulator::from_cluster(&cluster);
    /// // x forges b's pod address: a drops it.
    /// let trace = sim.inject("x", "10.65.0.70".parse()?, "10.65.0.1".parse()?).unwrap();
    /// assert!(matches!(trace.outcome, Outcome::Dropped(Drop::StrictIngress { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn inject(&self, from: &str, src: IpAddr, to: IpAddr) -> Option<Trace> {
        let node = self.cluster.nodes().iter().position(|n| n.name == from)?;
        let (Owner::Host(target) | Owner::Pod(target)) = *self.owners.get(&to)?;
        let mut walk = Walk {
            sim: self,
            hops: Vec::new(),
            tunnels: Vec::new(),
        };
        walk.hop(node, format!("plaintext {src} → {to} put on the underlay"));
        let outcome = walk.receive_plain(target, src, to);
        Some(Trace {
            outcome,
            hops: walk.hops,
            tunnels: walk.tunnels,
        })
    }

    /// Walks one packet from `from` to `to`.
    pub fn trace(&self, from: Source, to: IpAddr) -> Trace {
        let mut walk = Walk {
            sim: self,
            hops: Vec::new(),
            tunnels: Vec::new(),
        };
        let outcome = walk.send(from, to);
        Trace {
            outcome,
            hops: walk.hops,
            tunnels: walk.tunnels,
        }
    }

    fn name(&self, node: usize) -> &str {
        &self.cluster.nodes()[node].name
    }
}

fn lpm<'a, T>(items: impl Iterator<Item = (&'a IpNet, T)>, addr: &IpAddr) -> Option<(IpNet, T)> {
    items
        .filter(|(net, _)| net.contains(addr))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(net, t)| (*net, t))
}

impl Walk<'_> {
    fn hop(&mut self, node: usize, text: String) {
        let line = format!("{}: {text}", self.sim.name(node));
        self.hops.push(line);
    }

    fn iface_name(&self, iface: &Iface) -> String {
        match iface {
            Iface::Underlay => "eth0".into(),
            Iface::Mesh(name) => name.clone(),
            Iface::Workload(ip) => {
                format!(
                    "{}{}",
                    self.sim.cluster.mesh().workload_interface_prefix,
                    ip
                )
            }
        }
    }

    /// The prerouting chain of the node's nftables table, for a packet to `dst`.
    fn prerouting_mark(&self, node: usize, iface: &Iface, dst: IpAddr, mark: u32) -> u32 {
        let Some(marking) = &self.sim.plans[node].marking else {
            return mark;
        };
        if marking.marks_prerouting(&self.iface_name(iface), dst) {
            mark | marking.firewall_mark
        } else {
            mark
        }
    }

    /// Before `from` sends anything to its underlay neighbour `to`, it resolves it with ARP
    /// (IPv4; IPv6 neighbour discovery has no reverse-path check). The request carries
    /// `from`'s address, and `to` answers only if that address passes its reverse-path check.
    fn arp_ok(&mut self, from: usize, to: usize, family: Family) -> Result<(), Outcome> {
        if family == Family::V6 {
            return Ok(());
        }
        let Some(sender) = self.sim.cluster.nodes()[from].address(Family::V4) else {
            return Ok(());
        };
        let mark = match &self.sim.plans[to].marking {
            Some(m) if m.mark_arp && m.marks_input(&self.iface_name(&Iface::Underlay)) => {
                m.firewall_mark
            }
            _ => 0,
        };
        if self.rpf_ok(to, sender, &Iface::Underlay, mark) {
            Ok(())
        } else {
            Err(Outcome::Dropped(Drop::Arp {
                node: self.sim.name(to).to_owned(),
                sender,
            }))
        }
    }

    /// The routing decision of `node` for `dst`: local table, plan rules and tables, main.
    fn lookup(&mut self, node: usize, dst: IpAddr, mark: u32) -> Option<Next> {
        let n = &self.sim.cluster.nodes()[node];
        if n.addresses.contains(&dst) {
            return Some(Next::Local);
        }
        let plan = &self.sim.plans[node];
        let family = Family::of(&dst);
        let mut rules: Vec<_> = plan.rules.iter().filter(|r| r.family == family).collect();
        rules.sort_by_key(|r| r.priority);
        for rule in rules {
            let matched = ((mark & rule.firewall_mask) == rule.firewall_mark) != rule.invert;
            if !matched {
                continue;
            }
            let routes = plan
                .routes
                .iter()
                .filter(|r| r.table == rule.table && r.family == family)
                .map(|r| (&r.destination, r));
            match lpm(routes, &dst) {
                Some((net, r)) if r.kind == RouteType::Unicast => {
                    let dev = r.device.as_deref().unwrap_or_default().to_owned();
                    self.hop(
                        node,
                        format!(
                            "rule {} → table {}: {net} dev {dev}",
                            rule.priority, rule.table
                        ),
                    );
                    return Some(Next::Dev(dev));
                }
                Some((net, r)) if r.kind == RouteType::Blackhole => {
                    self.hop(
                        node,
                        format!(
                            "rule {} → table {}: blackhole {net}",
                            rule.priority, rule.table
                        ),
                    );
                    return Some(Next::Blackhole(net));
                }
                Some((net, _)) => {
                    self.hop(
                        node,
                        format!("rule {} → table {}: throw {net}", rule.priority, rule.table),
                    );
                }
                None => {}
            }
        }
        if n.workload_ips.contains(&dst) {
            return Some(Next::Workload(dst));
        }
        match self.sim.owners.get(&dst) {
            Some(Owner::Host(o) | Owner::Pod(o)) if *o != node => Some(Next::Underlay(*o)),
            _ => None,
        }
    }

    /// Whether strict mode's ingress filter of `node` drops a plaintext packet from `src`
    /// arriving from the underlay (not WireGuard's UDP, which is exempt).
    fn strict_drops(&self, node: usize, src: IpAddr) -> bool {
        let plan = &self.sim.plans[node];
        let underlay = self.iface_name(&Iface::Underlay);
        plan.marking
            .as_ref()
            .is_some_and(|m| m.strict.is_some() && m.marks_input(&underlay))
            && plan.must_arrive_encrypted(src)
    }

    /// Strict reverse-path filtering of `src` arriving on `iface` (IPv4 only, as in Linux).
    fn rpf_ok(&mut self, node: usize, src: IpAddr, iface: &Iface, mark: u32) -> bool {
        if Family::of(&src) == Family::V6 {
            return true;
        }
        let valid_mark = self.sim.plans[node]
            .sysctls
            .iter()
            .any(|s| s.key == SRC_VALID_MARK && s.value == "1");
        let mark = if valid_mark { mark } else { 0 };
        let before = self.hops.len();
        let back = self.lookup(node, src, mark);
        // The reverse lookup's steps are the check's, not the packet's path.
        for hop in &mut self.hops[before..] {
            if let Some((name, rest)) = hop.split_once(": ") {
                *hop = format!("{name}: reverse-path check of {src}: {rest}");
            }
        }
        match (back, iface) {
            (Some(Next::Dev(d)), Iface::Mesh(m)) => d == *m,
            (Some(Next::Workload(ip)), Iface::Workload(w)) => ip == *w,
            (Some(Next::Underlay(_)), Iface::Underlay) => true,
            _ => false,
        }
    }

    fn rpf_drop(&self, node: usize, src: IpAddr, iface: &Iface) -> Outcome {
        Outcome::Dropped(Drop::ReversePath {
            node: self.sim.name(node).to_owned(),
            interface: self.iface_name(iface),
            source: src,
        })
    }

    fn send(&mut self, from: Source, dst: IpAddr) -> Outcome {
        let (node, src, mark) = match from {
            Source::Pod(ip) => {
                let Some(Owner::Pod(node)) = self.sim.owners.get(&ip).copied() else {
                    return Outcome::Dropped(Drop::UnknownSource);
                };
                let iface = Iface::Workload(ip);
                self.hop(
                    node,
                    format!("pod {ip} → {dst} arrives on {}", self.iface_name(&iface)),
                );
                let mark = self.prerouting_mark(node, &iface, dst, 0);
                if mark != 0 {
                    self.hop(
                        node,
                        format!("prerouting marked {mark:#x}: {dst} is sent plain (a phase)"),
                    );
                }
                if !self.rpf_ok(node, ip, &iface, mark) {
                    return self.rpf_drop(node, ip, &iface);
                }
                (node, ip, mark)
            }
            Source::Host(name, family) => {
                let Some(node) = self.sim.cluster.nodes().iter().position(|n| n.name == name)
                else {
                    return Outcome::Dropped(Drop::UnknownSource);
                };
                let Some(src) = self.sim.cluster.nodes()[node].address(family) else {
                    return Outcome::Dropped(Drop::UnknownSource);
                };
                let mut mark = 0;
                if let Some(m) = &self.sim.plans[node].marking
                    && m.marks_output(dst)
                {
                    mark |= m.firewall_mark;
                    self.hop(node, format!("host {src} → {dst}: output marked {mark:#x}"));
                } else {
                    self.hop(node, format!("host {src} → {dst}"));
                }
                (node, src, mark)
            }
        };
        self.forward(node, src, dst, mark)
    }

    /// Routes a packet that is on `node` (arrived, or generated) and follows it to the end.
    fn forward(&mut self, node: usize, src: IpAddr, dst: IpAddr, mark: u32) -> Outcome {
        let name = self.sim.name(node).to_owned();
        match self.lookup(node, dst, mark) {
            None => Outcome::Dropped(Drop::NoRoute { node: name }),
            Some(Next::Blackhole(destination)) => Outcome::Dropped(Drop::Blackhole {
                node: name,
                destination,
            }),
            Some(Next::Local) => {
                self.hop(node, format!("delivered to the host ({dst})"));
                Outcome::Local
            }
            Some(Next::Workload(ip)) => {
                self.hop(node, format!("delivered to pod {ip}"));
                Outcome::Local
            }
            Some(Next::Underlay(to)) => {
                if let Err(dropped) = self.arp_ok(node, to, Family::of(&dst)) {
                    return dropped;
                }
                self.hop(
                    node,
                    format!(
                        "main table: plaintext on the underlay to {}",
                        self.sim.name(to)
                    ),
                );
                self.receive_plain(to, src, dst)
            }
            Some(Next::Dev(dev)) => self.encrypt(node, &dev, src, dst),
        }
    }

    fn receive_plain(&mut self, node: usize, src: IpAddr, dst: IpAddr) -> Outcome {
        if self.strict_drops(node, src) {
            self.hop(
                node,
                format!("strict ingress filter: {src} must arrive encrypted"),
            );
            return Outcome::Dropped(Drop::StrictIngress {
                node: self.sim.name(node).to_owned(),
                source: src,
            });
        }
        let mark = self.prerouting_mark(node, &Iface::Underlay, dst, 0);
        if !self.rpf_ok(node, src, &Iface::Underlay, mark) {
            return self.rpf_drop(node, src, &Iface::Underlay);
        }
        match self.lookup(node, dst, mark) {
            Some(Next::Local) => {
                self.hop(node, format!("delivered to the host ({dst})"));
                Outcome::Plain
            }
            Some(Next::Workload(ip)) => {
                self.hop(node, format!("delivered to pod {ip}"));
                Outcome::Plain
            }
            _ => Outcome::Dropped(Drop::NotDeliverable {
                node: self.sim.name(node).to_owned(),
            }),
        }
    }

    fn encrypt(&mut self, node: usize, dev: &str, src: IpAddr, dst: IpAddr) -> Outcome {
        let name = self.sim.name(node).to_owned();
        let Some(iface) = self.sim.plans[node]
            .interfaces
            .iter()
            .find(|i| i.name == dev)
        else {
            return Outcome::Dropped(Drop::NoRoute { node: name });
        };
        let peers = iface
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().map(move |net| (net, p)));
        let Some((net, peer)) = lpm(peers, &dst) else {
            return Outcome::Dropped(Drop::NoPeer { node: name });
        };
        self.hop(
            node,
            format!(
                "{dev}: peer {} (allowed {net}) at {}",
                peer.node, peer.endpoint
            ),
        );
        self.tunnels.push((name.clone(), peer.node.clone()));
        let family = iface.family;
        let Some(outer_src) = self.sim.cluster.nodes()[node].address(family) else {
            return Outcome::Dropped(Drop::NoRoute { node: name });
        };
        let sender_key = iface.public_key;
        // WireGuard's own packet carries the device mark.
        let to = match self.lookup(node, peer.endpoint.ip(), iface.firewall_mark) {
            Some(Next::Underlay(to)) => to,
            Some(Next::Dev(_)) => return Outcome::Dropped(Drop::Loop { node: name }),
            _ => {
                return Outcome::Dropped(Drop::NoListener {
                    endpoint: peer.endpoint,
                });
            }
        };
        if let Err(dropped) = self.arp_ok(node, to, family) {
            return dropped;
        }
        self.hop(
            node,
            format!(
                "udp {outer_src} → {} on the underlay, encrypted",
                peer.endpoint
            ),
        );
        self.receive_wireguard(
            to,
            outer_src,
            peer.endpoint,
            (sender_key, peer.public_key),
            src,
            dst,
        )
    }

    fn receive_wireguard(
        &mut self,
        node: usize,
        outer_src: IpAddr,
        endpoint: SocketAddr,
        (sender_key, receiver_key): (Option<crate::PublicKey>, crate::PublicKey),
        src: IpAddr,
        dst: IpAddr,
    ) -> Outcome {
        let name = self.sim.name(node).to_owned();
        let mark = self.prerouting_mark(node, &Iface::Underlay, endpoint.ip(), 0);
        if !self.rpf_ok(node, outer_src, &Iface::Underlay, mark) {
            return self.rpf_drop(node, outer_src, &Iface::Underlay);
        }
        let family = Family::of(&endpoint.ip());
        let Some(iface): Option<&InterfacePlan> = self.sim.plans[node]
            .interfaces
            .iter()
            .find(|i| i.listen_port == endpoint.port() && i.family == family)
        else {
            return Outcome::Dropped(Drop::NoListener { endpoint });
        };
        // The handshake is encrypted to the key the sender has for the receiver: it must be
        // the receiver interface's own key.
        if iface.public_key != Some(receiver_key) {
            return Outcome::Dropped(Drop::StaleReceiverKey { node: name });
        }
        let Some(peer): Option<&PeerPlan> =
            sender_key.and_then(|k| iface.peers.iter().find(|p| p.public_key == k))
        else {
            return Outcome::Dropped(Drop::UnknownSender { node: name });
        };
        let allowed = iface
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().map(move |net| (net, p)));
        match lpm(allowed, &src) {
            Some((_, p)) if p.public_key == peer.public_key => {}
            _ => {
                return Outcome::Dropped(Drop::SourceNotAllowed {
                    node: name,
                    source: src,
                });
            }
        }
        let mesh = Iface::Mesh(iface.name.clone());
        self.hop(
            node,
            format!(
                "{}: decrypted from peer {}, source {src} allowed",
                iface.name, peer.node
            ),
        );
        // Decapsulated packets start with a clean mark and arrive on the mesh interface.
        let mark = self.prerouting_mark(node, &mesh, dst, 0);
        if !self.rpf_ok(node, src, &mesh, mark) {
            return self.rpf_drop(node, src, &mesh);
        }
        match self.lookup(node, dst, mark) {
            Some(Next::Local) => {
                self.hop(node, format!("delivered to the host ({dst})"));
                Outcome::Encrypted
            }
            Some(Next::Workload(ip)) => {
                self.hop(node, format!("delivered to pod {ip}"));
                Outcome::Encrypted
            }
            _ => Outcome::Dropped(Drop::NotDeliverable { node: name }),
        }
    }
}
