//! The design's flows, proven on real packets.
//!
//! For each flow the table shows three verdicts that must agree:
//! - **expected**, from the design's rules ([`expected`]): same node → local; a node without
//!   WireGuard at either end → plain; host traffic → encrypted iff host encryption; pods on
//!   two WireGuard nodes → encrypted;
//! - **simulated**, from wgmesh-core's packet-path simulator over the same cluster, and, when
//!   `WGMESH_WHY` names a `wgmesh` binary (scripts/test-e2e.sh sets it), the operator's
//!   `wgmesh why` over the same cluster written to a file (echo flows);
//! - **observed**, from real packets: echo requests sent through the kernel, replies counted,
//!   and the nftables counters of every node's underlay ([`crate::count`]) read.
//!
//! Observed is *encrypted* when no plaintext of the flow crossed any underlay and WireGuard
//! data messages left and reached both ends at least once per request and reply; *plain* when
//! the flow's packets crossed in plaintext both ways and no WireGuard data message was sent;
//! *local* when nothing of it touched any underlay. Don't-fragment probes send packets of
//! exactly the mesh MTU (must be delivered) and one byte more (must be refused by the sending
//! kernel with `EMSGSIZE`, and nothing may leave).

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use wgmesh_core::sim::{Outcome, Simulator, Source};
use wgmesh_core::{Cluster as Model, Family, NodePlan, RouteType};

use crate::cluster::Cluster;
use crate::count::{self, Counts};
use crate::ns::Netns;
use crate::traffic::Pinger;
use crate::{Error, Result};

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A pod, by name.
    Pod(String),
    /// A node's host network stack, by node name.
    Host(String),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod(p) => write!(f, "pod {p}"),
            Self::Host(n) => write!(f, "host {n}"),
        }
    }
}

/// What a flow sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Echo requests of 84 bytes.
    Echo,
    /// Echo requests of exactly the mesh MTU, DF set.
    DfAtMtu,
    /// Echo requests of the mesh MTU plus one byte, DF set.
    DfOverMtu,
}

/// How a flow crosses (or does not cross) the underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Never left the node.
    Local,
    /// Only WireGuard on the wire.
    Encrypted,
    /// Plaintext on the wire.
    Plain,
    /// Refused by the sender's kernel (`EMSGSIZE`), nothing sent.
    Refused,
    /// Not delivered, and nothing of it crossed the underlay (strict mode's blackholes).
    Dropped,
    /// Not delivered, or a mix that matches none of the above.
    Other(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => f.write_str("local"),
            Self::Encrypted => f.write_str("encrypted"),
            Self::Plain => f.write_str("plain"),
            Self::Refused => f.write_str("refused (EMSGSIZE)"),
            Self::Dropped => f.write_str("dropped"),
            Self::Other(s) => f.write_str(s),
        }
    }
}

/// A flow to check.
#[derive(Debug, Clone)]
pub struct Flow {
    /// Where it starts.
    pub src: End,
    /// Where it goes.
    pub dst: End,
    /// Its family.
    pub family: Family,
    /// What is sent.
    pub probe: Probe,
}

/// One line of the flows table.
#[derive(Debug, Clone)]
pub struct Row {
    /// The flow.
    pub flow: Flow,
    /// `src → dst` with addresses.
    pub label: String,
    /// What the source node's plan does with it.
    pub path: String,
    /// The design's verdict.
    pub expected: Verdict,
    /// The simulator's verdict (`None` when it cannot tell: a node outside the cluster).
    pub simulated: Option<Verdict>,
    /// `wgmesh why`'s verdict (`None`: `WGMESH_WHY` unset, a probe it does not judge, or a
    /// node outside the cluster).
    pub why: Option<Verdict>,
    /// What the packets showed.
    pub observed: Verdict,
    /// Requests sent / replies received / refused locally.
    pub echo: (u32, u32, u32),
    /// Flow packets that left any node in plaintext; WireGuard data messages that left any node.
    pub wire: (u64, u64),
    /// Whether all three agree and everything was delivered.
    pub pass: bool,
}

/// Requests per flow.
pub const COUNT: u16 = 4;

/// The standard flows of the layout, for one family (with host DF probes under host
/// encryption).
pub fn standard(family: Family, host_encryption: bool) -> Vec<Flow> {
    let pod = |p: &str| End::Pod(p.to_owned());
    let host = |n: &str| End::Host(n.to_owned());
    let mut out = vec![
        (pod("p1a"), pod("p1b"), Probe::Echo),
        (pod("p1a"), pod("p2"), Probe::Echo),
        (pod("p2"), pod("p1a"), Probe::Echo),
        (pod("p3"), pod("p2"), Probe::Echo),
        (host("n1"), host("n2"), Probe::Echo),
        (host("n1"), pod("p2"), Probe::Echo),
        (pod("p2"), host("n1"), Probe::Echo),
        (pod("p1a"), pod("p4"), Probe::Echo),
        (pod("p4"), pod("p2"), Probe::Echo),
        (host("n4"), pod("p1a"), Probe::Echo),
        (host("n1"), host("n4"), Probe::Echo),
        (pod("p1a"), pod("p2"), Probe::DfAtMtu),
        (pod("p1a"), pod("p2"), Probe::DfOverMtu),
    ];
    if host_encryption {
        out.push((host("n1"), pod("p3"), Probe::DfAtMtu));
        out.push((host("n1"), pod("p3"), Probe::DfOverMtu));
    }
    out.into_iter()
        .map(|(src, dst, probe)| Flow {
            src,
            dst,
            family,
            probe,
        })
        .collect()
}

/// Whether a node takes part in a family's mesh (the design's rule): WireGuard enabled, a
/// key no other node publishes, an address of the family.
fn takes_part(model: &Model, node: &str, family: Family) -> bool {
    model.mesh().enabled
        && model.node(node).is_some_and(|n| {
            n.wireguard_enabled()
                && n.address(family).is_some()
                && n.key(family).is_some_and(|k| {
                    !model
                        .nodes()
                        .iter()
                        .any(|o| o.name != n.name && o.key(family) == Some(k))
                })
        })
}

/// Whether the model gives `ip` to `node` (one of its addresses, workload addresses or blocks).
fn claims(model: &Model, node: &str, ip: IpAddr) -> bool {
    model.node(node).is_some_and(|n| {
        n.addresses.contains(&ip)
            || n.workload_ips.contains(&ip)
            || n.pod_cidrs.iter().any(|c| c.contains(&ip))
    })
}

/// The design's verdict for a flow between two ends on these nodes.
///
/// A probe one byte over the mesh MTU is refused by the sender when its path has the mesh MTU:
/// always from a pod (its routes carry the mesh MTU), and from a host when the packet would go
/// through the tunnel; a host's plaintext path has the underlay's MTU, so there it is delivered.
///
/// In strict mode (`mesh.strict_mode`) a flow that would go plain because an end does not take
/// part is dropped instead, unless every such end is explicitly plain (or it is host traffic
/// without host encryption); a destination the model does not know yet (a pod not learned)
/// inside `cluster_cidrs` is dropped.
pub fn expected(model: &Model, flow: &Flow, src_node: &str, dst_node: &str) -> Verdict {
    expected_to(model, flow, src_node, dst_node, None)
}

/// [`expected`], knowing the destination address (so that a destination the model does not
/// give to its node, a pod not learned yet, is judged as such).
fn expected_to(
    model: &Model,
    flow: &Flow,
    src_node: &str,
    dst_node: &str,
    dst_ip: Option<IpAddr>,
) -> Verdict {
    let mesh = model.mesh();
    let unknown = src_node != dst_node
        && model.node(dst_node).is_some()
        && dst_ip.is_some_and(|ip| !claims(model, dst_node, ip));
    let base = match dst_ip {
        Some(ip) if unknown => {
            if mesh.strict_mode && mesh.cluster_cidrs.iter().any(|c| c.contains(&ip)) {
                Verdict::Dropped
            } else {
                // Out in plaintext; not a flow the suites check.
                Verdict::Plain
            }
        }
        _ => expected_echo(model, flow, src_node, dst_node),
    };
    if base == Verdict::Dropped {
        return base;
    }
    if flow.probe == Probe::DfOverMtu
        && (matches!(flow.src, End::Pod(_)) || base == Verdict::Encrypted)
    {
        return Verdict::Refused;
    }
    base
}

fn expected_echo(model: &Model, flow: &Flow, src_node: &str, dst_node: &str) -> Verdict {
    if src_node == dst_node {
        return Verdict::Local;
    }
    let host = matches!(flow.src, End::Host(_)) || matches!(flow.dst, End::Host(_));
    let f = flow.family;
    if !takes_part(model, src_node, f) || !takes_part(model, dst_node, f) {
        let mesh = model.mesh();
        // Strict mode: the operator's opt-out (`wireguard.enabled: false`).
        let plain_end = |n: &str| model.node(n).is_some_and(|n| n.explicitly_plain());
        let host_plain = host && !mesh.host_encryption;
        // Explicitly plain ends are reached in plaintext by everyone (their claims are thrown,
        // and they run no mesh); otherwise an end that should encrypt but cannot is dropped.
        if mesh.strict_mode
            && mesh.enabled
            && !host_plain
            && !plain_end(src_node)
            && !plain_end(dst_node)
        {
            return Verdict::Dropped;
        }
        return Verdict::Plain;
    }
    if host && !model.mesh().host_encryption {
        Verdict::Plain
    } else {
        Verdict::Encrypted
    }
}

/// The simulator's verdict; `None` for refused probes and when a node is outside the cluster
/// (the simulator only knows the cluster's nodes).
fn simulated(model: &Model, flow: &Flow, r: &Resolved<'_>) -> Option<Verdict> {
    let (dst, src_ip, src_node) = (r.dst_ip, r.src_ip, &r.src_node);
    if model.node(src_node).is_none() || model.node(&r.dst_node).is_none() {
        return None;
    }
    let source = match &flow.src {
        End::Pod(_) => Source::Pod(src_ip),
        End::Host(n) => Source::Host(n.clone(), flow.family),
    };
    let sim = Simulator::from_cluster(model);
    let verdict = match sim.trace(source, dst).outcome {
        Outcome::Local => Verdict::Local,
        Outcome::Encrypted => Verdict::Encrypted,
        Outcome::Plain => Verdict::Plain,
        Outcome::Dropped(_) => Verdict::Dropped,
    };
    // The simulator has no MTUs: a probe over the mesh MTU is refused where the simulated
    // path has the mesh MTU (a pod's routes; the tunnel).
    if flow.probe == Probe::DfOverMtu
        && (matches!(flow.src, End::Pod(_)) || verdict == Verdict::Encrypted)
    {
        return Some(Verdict::Refused);
    }
    Some(verdict)
}

/// `wgmesh why`'s verdict for an echo flow, from the binary `WGMESH_WHY` names, over `model`
/// written to a file; `None` without it, for probes it does not judge (MTU), and for nodes
/// outside the cluster.
fn why(model: &Model, flow: &Flow, r: &Resolved<'_>) -> Result<Option<Verdict>> {
    let Some(bin) = std::env::var_os("WGMESH_WHY") else {
        return Ok(None);
    };
    if flow.probe != Probe::Echo
        || model.node(&r.src_node).is_none()
        || model.node(&r.dst_node).is_none()
    {
        return Ok(None);
    }
    let file = std::env::temp_dir().join(format!("wgmesh-e2e-why-{}.json", std::process::id()));
    let text =
        serde_json::to_string(model).map_err(|e| Error::new(format!("cluster as JSON: {e}")))?;
    std::fs::write(&file, text).map_err(|e| Error::new(format!("{}: {e}", file.display())))?;
    let src = match &flow.src {
        End::Pod(_) => r.src_ip.to_string(),
        End::Host(n) => n.clone(),
    };
    let out = std::process::Command::new(&bin)
        .args(["why", &src, &r.dst_ip.to_string(), "--cluster"])
        .arg(&file)
        .args(["--format", "json", "--family", flow.family.as_str()])
        .output()
        .map_err(|e| Error::new(format!("WGMESH_WHY {}: {e}", bin.to_string_lossy())))?;
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        return Err(Error::new(format!(
            "wgmesh why {src} {}: {}",
            r.dst_ip,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::new(format!("wgmesh why's answer: {e}")))?;
    Ok(Some(match answer["verdict"].as_str() {
        Some("local") => Verdict::Local,
        Some("encrypted") => Verdict::Encrypted,
        Some("plain") => Verdict::Plain,
        Some("dropped") => Verdict::Dropped,
        other => Verdict::Other(format!("why: {other:?} {}", answer["reason"])),
    }))
}

/// What the source node's plan does with a packet to `dst`.
fn path(plan: &NodePlan, flow: &Flow, dst: IpAddr, local: bool) -> String {
    let last = if local { "veth" } else { "eth0" };
    let marked = plan.marking.as_ref().is_some_and(|m| match flow.src {
        End::Host(_) => m.marks_output(dst),
        _ => m.marks_destination(dst),
    });
    if marked {
        return format!("marked → main → {last}");
    }
    let route = plan
        .routes
        .iter()
        .filter(|r| r.destination.contains(&dst))
        .max_by_key(|r| r.destination.prefix_len());
    match route {
        Some(r) if r.kind == RouteType::Unicast => {
            format!("table {} → {}", r.table, r.device.as_deref().unwrap_or("?"))
        }
        Some(r) if r.kind == RouteType::Blackhole => format!("table {} blackhole", r.table),
        Some(r) => format!("table {} throw → main → {last}", r.table),
        None => format!("main → {last}"),
    }
}

struct Resolved<'a> {
    src_ns: &'a Netns,
    src_node: String,
    src_ip: IpAddr,
    dst_node: String,
    dst_ip: IpAddr,
}

fn resolve<'a>(cluster: &'a Cluster, flow: &Flow) -> Result<Resolved<'a>> {
    let f = flow.family;
    let no_addr = |e: &End| Error::new(format!("{e} has no {} address", f.as_str()));
    let (src_ns, src_node, src_ip) = match &flow.src {
        End::Pod(p) => {
            let spec = cluster.pod(p)?;
            (
                cluster.pod_ns(p)?,
                spec.node.clone(),
                spec.address(f).ok_or_else(|| no_addr(&flow.src))?,
            )
        }
        End::Host(n) => (
            cluster.node_ns(n)?,
            n.clone(),
            cluster
                .node(n)?
                .address(f)
                .ok_or_else(|| no_addr(&flow.src))?,
        ),
    };
    let (dst_node, dst_ip) = match &flow.dst {
        End::Pod(p) => {
            let spec = cluster.pod(p)?;
            (
                spec.node.clone(),
                spec.address(f).ok_or_else(|| no_addr(&flow.dst))?,
            )
        }
        End::Host(n) => (
            n.clone(),
            cluster
                .node(n)?
                .address(f)
                .ok_or_else(|| no_addr(&flow.dst))?,
        ),
    };
    Ok(Resolved {
        src_ns,
        src_node,
        src_ip,
        dst_node,
        dst_ip,
    })
}

/// How long to wait for each echo reply: generous under emulation (handshakes take seconds
/// under TCG), but every reply must come.
pub fn reply_timeout() -> Duration {
    if std::env::var_os("WGMESH_IN_VM").is_some() {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(3)
    }
}

/// How long a flow expected to be dropped waits for replies that should never come (all its
/// requests sent together): longer than a reply takes on a working path here.
///
/// Short: a leak would not go unnoticed for want of waiting, because the verdict *dropped*
/// also needs the underlay counters to show nothing of the flow, and a packet that leaves
/// does so within milliseconds (the counters are read after the wait).
pub fn drop_timeout() -> Duration {
    if std::env::var_os("WGMESH_IN_VM").is_some() {
        Duration::from_millis(1500)
    } else {
        Duration::from_millis(500)
    }
}

/// Runs one flow and returns its row.
pub fn run(cluster: &Cluster, flow: &Flow) -> Result<Row> {
    let t0 = std::time::Instant::now();
    let r = resolve(cluster, flow)?;
    let model = cluster.model()?;
    let expected = expected_to(&model, flow, &r.src_node, &r.dst_node, Some(r.dst_ip));
    let simulated = simulated(&model, flow, &r);
    let why = why(&model, flow, &r)?;
    let plan = cluster.plan(&r.src_node)?;
    let path = path(&plan, flow, r.dst_ip, r.src_node == r.dst_node);
    let nodes = cluster.node_names();
    let node_ns = nodes
        .iter()
        .map(|n| cluster.node_ns(n))
        .collect::<Result<Vec<_>>>()?;
    count::arm_all(&node_ns, r.src_ip, r.dst_ip)?;
    let mtu = cluster.mtu(flow.family) as usize;
    let (df, len) = match flow.probe {
        Probe::Echo => (false, 84),
        Probe::DfAtMtu => (true, mtu),
        Probe::DfOverMtu => (true, mtu + 1),
    };
    let t1 = t0.elapsed();
    let pinger = Pinger::open(r.src_ns, r.dst_ip, df)?;
    let stats = if expected == Verdict::Dropped {
        // Nothing should come back: send the requests together and wait once, so that a
        // dropped flow costs one timeout, not one per request.
        pinger.burst(r.dst_ip, COUNT, len, drop_timeout())
    } else {
        pinger.ping(r.dst_ip, COUNT, len, reply_timeout())
    };
    let counts: Vec<(String, Counts)> = nodes
        .iter()
        .cloned()
        .zip(count::take_all(&node_ns)?)
        .collect();
    if std::env::var_os("WGMESH_E2E_TIMING").is_some() {
        eprintln!(
            "flow {:?}: setup {t1:?}, total {:?}",
            flow.dst,
            t0.elapsed()
        );
    }
    let get = |name: &str| {
        counts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    };
    let (src, dst) = (get(&r.src_node), get(&r.dst_node));
    let plain_total: u64 = counts.iter().map(|(_, c)| c.plain()).sum();
    let plain_out: u64 = counts.iter().map(|(_, c)| c.plain_out).sum();
    let wg_out: u64 = counts.iter().map(|(_, c)| c.wg_data_out).sum();
    let n = u64::from(COUNT);
    let delivered = stats.sent == u32::from(COUNT) && stats.received == stats.sent;
    let observed = if stats.received == 0
        && stats.too_big == 0
        && plain_total == 0
        && wg_out == 0
        && (stats.sent > 0 || !stats.errors.is_empty())
    {
        // Nothing came back and nothing of it crossed any underlay: dropped at the source
        // (a blackhole route: forwarded packets vanish, local sends fail with EINVAL).
        Verdict::Dropped
    } else if stats.too_big > 0 || stats.sent == 0 {
        if stats.too_big == u32::from(COUNT) && stats.sent == 0 && plain_total == 0 && wg_out == 0 {
            Verdict::Refused
        } else {
            Verdict::Other(format!(
                "partly refused: sent {} refused {} errors {:?}, on the wire {plain_total} / {wg_out}",
                stats.sent, stats.too_big, stats.errors
            ))
        }
    } else if !delivered {
        Verdict::Other(format!(
            "not delivered: {}/{} replies, refused {}, errors {:?}",
            stats.received, COUNT, stats.too_big, stats.errors
        ))
    } else if plain_total == 0 && wg_out == 0 {
        Verdict::Local
    } else if plain_total == 0
        && src.wg_data_out >= n
        && dst.wg_data_in >= n
        && dst.wg_data_out >= n
        && src.wg_data_in >= n
    {
        Verdict::Encrypted
    } else if wg_out == 0
        && src.plain_out >= n
        && dst.plain_in >= n
        && dst.plain_out >= n
        && src.plain_in >= n
    {
        Verdict::Plain
    } else {
        Verdict::Other(format!(
            "mixed: src {src:?} dst {dst:?}, plaintext {plain_total}, wg {wg_out}"
        ))
    };
    let pass = observed == expected
        && simulated.as_ref().is_none_or(|s| *s == expected)
        && why.as_ref().is_none_or(|w| *w == expected);
    let suffix = match flow.probe {
        Probe::Echo => String::new(),
        Probe::DfAtMtu => format!(", DF {len} B"),
        Probe::DfOverMtu => format!(", DF {len} B"),
    };
    Ok(Row {
        label: format!(
            "{} → {} ({} → {}{suffix})",
            flow.src, flow.dst, r.src_ip, r.dst_ip
        ),
        flow: flow.clone(),
        path,
        expected,
        simulated,
        why,
        observed,
        echo: (stats.sent, stats.received, stats.too_big),
        wire: (plain_out, wg_out),
        pass,
    })
}

/// Runs flows and returns their rows.
pub fn run_all(cluster: &Cluster, flows: &[Flow]) -> Result<Vec<Row>> {
    flows.iter().map(|f| run(cluster, f)).collect()
}

/// The rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| flow | path (source node's plan) | expected | simulated | `wgmesh why` | observed | echo sent/replies | on the wire: plaintext / WireGuard data | pass |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {}/{} | {} / {} | {} |\n",
            r.label,
            r.path,
            r.expected,
            r.simulated
                .as_ref()
                .map_or("–".to_owned(), ToString::to_string),
            r.why.as_ref().map_or("–".to_owned(), ToString::to_string),
            r.observed,
            r.echo.0,
            r.echo.1,
            r.wire.0,
            r.wire.1,
            if r.pass { "✓" } else { "✗ FAIL" }
        ));
    }
    s
}

/// The failed rows, as an error listing them; `Ok` when all passed.
pub fn check(rows: &[Row]) -> Result<()> {
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| {
            format!(
                "{}: expected {}, simulated {}, why {}, observed {}",
                r.label,
                r.expected,
                r.simulated
                    .as_ref()
                    .map_or("–".to_owned(), ToString::to_string),
                r.why.as_ref().map_or("–".to_owned(), ToString::to_string),
                r.observed
            )
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::new(format!(
            "{} of {} flows failed:\n  {}",
            failed.len(),
            rows.len(),
            failed.join("\n  ")
        )))
    }
}
