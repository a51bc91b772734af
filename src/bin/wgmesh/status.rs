//! `wgmesh status`: is the mesh healthy?
//!
//! - On a node (`--node NAME`, or no Kubernetes source): this host's WireGuard peers — node
//!   name, endpoint, latest handshake age, bytes — and whether the kernel matches the node's
//!   plan (drift), read-only. Needs root for the kernel's WireGuard and nftables.
//! - Cluster-wide (`--kubeconfig` or `--from-kubectl` without `--node`): what each agent
//!   reports on its Node (the `WireGuardMeshReady` condition and its heartbeat), next to what
//!   the plan says each node should be: in the mesh, plain (and why), or excluded (and why).
//!
//! Exit codes: 0 healthy, 3 unhealthy (drift, a node that should be encrypted and is not or
//! has gone silent, a peer without a fresh handshake although keepalives are on), 1 the
//! check itself failed, 2 bad input.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::emit;
use crate::shared::{Failure, emit_json};
use crate::source::ClusterSource;

/// A handshake at most this old is fresh (WireGuard rekeys every 2 minutes under traffic).
const FRESH: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// A table and a summary line.
    Text,
    /// One JSON object.
    Json,
}

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    source: ClusterSource,
    /// This host's node name: check this host against its plan.
    #[arg(long, short, value_name = "NAME", env = "NODE_NAME")]
    node: Option<String>,
    /// Cluster-wide: a node whose agent has not written its condition for this long is
    /// stale (agents write at least every 10 minutes).
    #[arg(long, value_name = "SECONDS", default_value_t = 1260)]
    stale_after: u64,
    /// The output format.
    #[arg(long, short, value_enum, default_value_t = Format::Text)]
    format: Format,
    #[command(flatten)]
    live: crate::live::LiveArgs,
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    if args.node.is_none() && args.source.is_kubernetes() {
        #[cfg(feature = "agent")]
        return cluster::run(&args);
    }
    node::run(&args)
}

fn age(then: SystemTime, now: SystemTime) -> Option<Duration> {
    now.duration_since(then).ok()
}

/// `42s`, `3m05s`, `2h10m`, `4d`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d", s / 86400),
    }
}

fn finish<T: Serialize>(
    format: Format,
    report: &T,
    text: String,
    problems: usize,
) -> Result<(), Failure> {
    match format {
        Format::Json => emit_json(report)?,
        Format::Text => emit(&text)?,
    }
    if problems > 0 {
        Err(Failure::Unhealthy(format!("problems found: {problems}")))
    } else {
        Ok(())
    }
}

mod node {
    use std::collections::HashMap;

    use wgmesh::core::{Cluster, MeshConfig, PublicKey, plan_node};

    use super::*;

    #[derive(Debug, Serialize)]
    struct Peer {
        interface: String,
        public_key: String,
        /// The node whose key it is, per the plan.
        node: Option<String>,
        endpoint: Option<String>,
        /// Seconds since the latest handshake (`None`: never).
        handshake_age_seconds: Option<u64>,
        fresh: bool,
        rx_bytes: u64,
        tx_bytes: u64,
    }

    #[derive(Debug, Serialize)]
    struct Report {
        node: Option<String>,
        backend: String,
        peers: Vec<Peer>,
        fresh_handshakes: usize,
        /// What an apply would change; `None` without a plan to compare with.
        drift: Option<Vec<String>>,
        /// Planned peers the host does not have.
        missing_peers: Vec<String>,
        healthy: bool,
    }

    pub(super) fn run(args: &Args) -> Result<(), Failure> {
        let loaded = if args.source.is_given() {
            Some(args.source.load()?)
        } else {
            None
        };
        let cluster = match &loaded {
            Some(l) => l.cluster.clone(),
            None => Cluster::new(MeshConfig::default(), Vec::new())
                .map_err(|e| Failure::Input(e.to_string()))?,
        };
        let (drift, plan) = match (&loaded, &args.node) {
            (Some(_), Some(node)) => {
                let plan = plan_node(&cluster, node).map_err(|e| Failure::Input(e.to_string()))?;
                (true, Some(plan))
            }
            (Some(_), None) => {
                return Err(Failure::Input(
                    "status against a plan needs --node NAME (or NODE_NAME)".into(),
                ));
            }
            _ => (false, None),
        };
        let live = crate::live::read(&cluster, plan.as_ref(), &args.live)?;
        let now = SystemTime::now();
        let names: HashMap<PublicKey, String> = plan
            .iter()
            .flat_map(|p| p.interfaces.iter())
            .flat_map(|i| i.peers.iter())
            .map(|p| (p.public_key, p.node.clone()))
            .collect();
        let keepalive = cluster.mesh().persistent_keepalive.is_some_and(|k| k > 0);
        let peers: Vec<Peer> = live
            .stats
            .iter()
            .map(|s| {
                let handshake_age = s.last_handshake.and_then(|t| age(t, now));
                Peer {
                    interface: s.interface.clone(),
                    public_key: s.public_key.to_string(),
                    node: names.get(&s.public_key).cloned(),
                    endpoint: live
                        .endpoints
                        .get(&(s.interface.clone(), s.public_key))
                        .map(ToString::to_string),
                    handshake_age_seconds: handshake_age.map(|d| d.as_secs()),
                    fresh: handshake_age.is_some_and(|d| d <= FRESH),
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                }
            })
            .collect();
        let missing_peers: Vec<String> = plan
            .iter()
            .flat_map(|p| p.interfaces.iter())
            .flat_map(|i| {
                i.peers
                    .iter()
                    .filter(|p| {
                        !live
                            .stats
                            .iter()
                            .any(|s| s.interface == i.name && s.public_key == p.public_key)
                    })
                    .map(|p| format!("{} ({})", p.node, i.name))
            })
            .collect();
        let fresh = peers.iter().filter(|p| p.fresh).count();
        let stale_with_keepalive = if keepalive {
            peers.iter().filter(|p| !p.fresh).count()
        } else {
            0
        };
        let drift_ops = drift.then(|| live.drift.clone());
        let problems = drift_ops.as_ref().map_or(0, Vec::len) + stale_with_keepalive;
        let report = Report {
            node: args.node.clone(),
            backend: live.backend.clone(),
            peers,
            fresh_handshakes: fresh,
            drift: drift_ops,
            missing_peers,
            healthy: problems == 0,
        };
        let text = text(&report, keepalive);
        finish(args.format, &report, text, problems)
    }

    fn text(r: &Report, keepalive: bool) -> String {
        let mut out = format!("backend: {}\n", r.backend);
        let rows: Vec<[String; 6]> = r
            .peers
            .iter()
            .map(|p| {
                [
                    p.interface.clone(),
                    p.node.clone().unwrap_or_else(|| {
                        format!("{}…", p.public_key.chars().take(8).collect::<String>())
                    }),
                    p.endpoint.clone().unwrap_or_else(|| "-".into()),
                    p.handshake_age_seconds
                        .map(|s| format!("{} ago", human(Duration::from_secs(s))))
                        .unwrap_or_else(|| "never".into()),
                    p.rx_bytes.to_string(),
                    p.tx_bytes.to_string(),
                ]
            })
            .collect();
        let head = [
            "interface",
            "peer",
            "endpoint",
            "handshake",
            "rx bytes",
            "tx bytes",
        ]
        .map(str::to_owned);
        let mut w = head.clone().map(|h| h.chars().count());
        for row in &rows {
            for (i, cell) in row.iter().enumerate() {
                w[i] = w[i].max(cell.chars().count());
            }
        }
        for row in std::iter::once(&head).chain(&rows) {
            out.push_str(&format!(
                "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:>w4$}  {:>w5$}\n",
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3],
                w4 = w[4],
                w5 = w[5]
            ));
        }
        for m in &r.missing_peers {
            out.push_str(&format!("missing peer: {m}\n"));
        }
        match &r.drift {
            Some(d) => {
                for op in d {
                    out.push_str(&format!("drift: {op}\n"));
                }
            }
            None => out.push_str(
                "no plan to compare with: give --node and --cluster, --from-kubectl or --kubeconfig\n",
            ),
        }
        out.push_str(&format!(
            "{} peers, {} handshakes fresher than 3 minutes{}, drift: {}\n",
            r.peers.len(),
            r.fresh_handshakes,
            if keepalive {
                ""
            } else {
                " (no keepalive: idle peers do not handshake)"
            },
            r.drift
                .as_ref()
                .map_or("not checked".into(), |d| d.len().to_string())
        ));
        out
    }
}

#[cfg(feature = "agent")]
mod cluster {
    use wgmesh::core::graph::{Graph, NodeState};
    use wgmesh::k8s::status::ConditionStatus;

    use super::*;

    #[derive(Debug, Serialize)]
    struct NodeRow {
        node: String,
        /// What the plan says: `mesh`, `plain` or `excluded`.
        planned: &'static str,
        /// Why it is plain or excluded.
        reasons: Vec<String>,
        /// What its agent reports (`True`, `False`, `Unknown`; `None`: nothing written).
        reported: Option<&'static str>,
        reason: Option<&'static str>,
        message: Option<String>,
        /// Seconds since the agent last wrote its condition.
        heartbeat_age_seconds: Option<u64>,
        stale: bool,
        healthy: bool,
    }

    #[derive(Debug, Serialize)]
    struct Report {
        nodes: Vec<NodeRow>,
        encrypted: usize,
        plain: usize,
        unhealthy: usize,
        warnings: Vec<String>,
    }

    pub(super) fn run(args: &Args) -> Result<(), Failure> {
        let loaded = args.source.load()?;
        let graph = Graph::build(&loaded.cluster);
        let now = SystemTime::now();
        let now_secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let stale_after = args.stale_after;
        let rows: Vec<NodeRow> = graph
            .nodes
            .iter()
            .map(|n| {
                let published = loaded.conditions.get(&n.name);
                let heartbeat_age = published
                    .and_then(|p| p.heartbeat.as_ref())
                    .map(|t| u64::try_from(now_secs - t.0.as_second()).unwrap_or(0));
                let stale = published.is_some() && heartbeat_age.is_none_or(|a| a > stale_after);
                let status = published.map(|p| p.condition.status);
                let healthy = match n.state {
                    // The operator's opt-out: nothing is expected of its agent.
                    NodeState::Plain => true,
                    NodeState::Mesh => status == Some(ConditionStatus::True) && !stale,
                    _ => false,
                };
                NodeRow {
                    node: n.name.clone(),
                    planned: n.state.as_str(),
                    reasons: n.reasons.clone(),
                    reported: status.map(ConditionStatus::as_str),
                    reason: published.map(|p| p.condition.reason),
                    message: published.map(|p| p.condition.message.clone()),
                    heartbeat_age_seconds: heartbeat_age,
                    stale,
                    healthy,
                }
            })
            .collect();
        let unhealthy = rows.iter().filter(|r| !r.healthy).count();
        let report = Report {
            encrypted: rows
                .iter()
                .filter(|r| r.planned == "mesh" && r.reported == Some("True"))
                .count(),
            plain: rows.iter().filter(|r| r.planned == "plain").count(),
            unhealthy,
            nodes: rows,
            warnings: loaded.warnings.clone(),
        };
        let text = text(&report);
        finish(args.format, &report, text, unhealthy)
    }

    fn text(r: &Report) -> String {
        let w = r
            .nodes
            .iter()
            .map(|n| n.node.len())
            .max()
            .unwrap_or(0)
            .max(4);
        let mut out = format!(
            "{:<w$} {:<9} {:<8} {:<16} {:>10}  {}\n",
            "node", "planned", "reports", "reason", "heartbeat", "details"
        );
        for n in &r.nodes {
            let hb = match (n.heartbeat_age_seconds, n.stale) {
                (Some(s), false) => format!("{} ago", human(Duration::from_secs(s))),
                (Some(s), true) => format!("STALE {}", human(Duration::from_secs(s))),
                (None, _) => "-".into(),
            };
            let details = if n.reasons.is_empty() {
                n.message.clone().unwrap_or_default()
            } else {
                n.reasons.join(", ")
            };
            out.push_str(&format!(
                "{:<w$} {:<9} {:<8} {:<16} {:>10}  {}{}\n",
                n.node,
                n.planned,
                n.reported.unwrap_or("-"),
                n.reason.unwrap_or("-"),
                hb,
                details,
                if n.healthy { "" } else { "  [unhealthy]" }
            ));
        }
        for w in &r.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out.push_str(&format!(
            "{} nodes: {} encrypted, {} plain by choice, {} unhealthy\n",
            r.nodes.len(),
            r.encrypted,
            r.plain,
            r.unhealthy
        ));
        out
    }
}
