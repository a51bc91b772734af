//! `wgmesh plan`: what every node (or one) must program, as text, JSON or `wg setconf` files.

use std::path::PathBuf;

use serde::Serialize;
use wgmesh::core::diagnostics::diagnose;
use wgmesh::core::graph::Graph;
use wgmesh::core::{Cluster, NodePlan, PrivateKey, RouteType, plan_all, plan_node, render};

use crate::emit;
use crate::keys::read_secret;
use crate::shared::{Failure, emit_json};
use crate::source::{ClusterSource, Loaded};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// Readable text, with the findings (`wg show` style).
    Text,
    /// The plan as JSON: one object with `--node`, else an array.
    Json,
    /// `wg setconf` files, one per interface.
    Wg,
}

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    source: ClusterSource,
    /// Only this node (default: every node).
    #[arg(long, short, value_name = "NAME", conflicts_with = "all")]
    node: Option<String>,
    /// A summary per node (state, interfaces, peers, allowed IPs, routes) instead of the
    /// plans, and the findings.
    #[arg(long)]
    all: bool,
    /// The output format.
    #[arg(long, short, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// With `--format wg`: a private key file whose key goes into the files.
    #[arg(long, value_name = "FILE")]
    private_key: Option<PathBuf>,
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let Loaded {
        cluster, warnings, ..
    } = args.source.load()?;
    if args.all {
        return summary(&cluster, &warnings, args.format);
    }
    let names: Vec<&str> = match &args.node {
        Some(name) => vec![name.as_str()],
        None => cluster.nodes().iter().map(|n| n.name.as_str()).collect(),
    };
    let plans = names
        .iter()
        .map(|n| plan_node(&cluster, n))
        .collect::<Result<Vec<NodePlan>, _>>()
        .map_err(|e| Failure::Input(e.to_string()))?;
    let private_key =
        match &args.private_key {
            None => None,
            Some(path) => {
                let text = read_secret(path, "private key file")?;
                Some(PrivateKey::from_base64(text.trim()).map_err(|e| {
                    Failure::Input(format!("private key file {}: {e}", path.display()))
                })?)
            }
        };
    match args.format {
        Format::Json => match args.node {
            Some(_) => emit_json(&plans[0]),
            None => emit_json(&plans),
        },
        Format::Text => {
            let mut out = String::new();
            let findings: Vec<String> = warnings
                .iter()
                .cloned()
                .chain(diagnose(&cluster).iter().map(ToString::to_string))
                .collect();
            if !findings.is_empty() {
                out.push_str("findings:\n");
                for f in findings {
                    out.push_str(&format!("  {f}\n"));
                }
                out.push('\n');
            }
            for (i, plan) in plans.iter().enumerate() {
                if i > 0 {
                    out.push_str(&format!("\n{}\n\n", "=".repeat(72)));
                }
                out.push_str(&render::text(plan));
            }
            emit(&out)
        }
        Format::Wg => {
            // The files may hold the private key: wiped when dropped.
            let mut out = zeroize::Zeroizing::new(String::new());
            for plan in &plans {
                for iface in &plan.interfaces {
                    out.push_str(&format!("# node {}, interface {}\n", plan.node, iface.name));
                    if private_key.is_none() {
                        out.push_str(
                            "# PrivateKey omitted: pass --private-key FILE to include it\n",
                        );
                    }
                    out.push_str(&render::setconf(iface, private_key.as_ref()));
                    out.push('\n');
                }
            }
            emit(&out)
        }
    }
}

/// One node in `plan --all`.
#[derive(Debug, Serialize)]
struct Summary {
    node: String,
    /// `mesh`, `plain` or `excluded`.
    state: &'static str,
    /// Why it is plain or excluded.
    reasons: Vec<String>,
    /// `name/mtu` per interface.
    interfaces: Vec<String>,
    peers: usize,
    allowed_ips: usize,
    unicast_routes: usize,
    throw_routes: usize,
    other_routes: usize,
}

#[derive(Debug, Serialize)]
struct AllReport {
    nodes: Vec<Summary>,
    findings: Vec<wgmesh::core::diagnostics::Diagnostic>,
    warnings: Vec<String>,
}

fn summary(cluster: &Cluster, warnings: &[String], format: Format) -> Result<(), Failure> {
    let graph = Graph::build(cluster);
    let nodes: Vec<Summary> = plan_all(cluster)
        .into_iter()
        .zip(&graph.nodes)
        .map(|(plan, g)| {
            let count = |kind: RouteType| plan.routes.iter().filter(|r| r.kind == kind).count();
            let (unicast, throw) = (count(RouteType::Unicast), count(RouteType::Throw));
            Summary {
                state: g.state.as_str(),
                reasons: g.reasons.clone(),
                interfaces: plan
                    .interfaces
                    .iter()
                    .map(|i| format!("{}/{}", i.name, i.mtu))
                    .collect(),
                peers: plan.interfaces.iter().map(|i| i.peers.len()).sum(),
                allowed_ips: plan
                    .interfaces
                    .iter()
                    .flat_map(|i| &i.peers)
                    .map(|p| p.allowed_ips.len())
                    .sum(),
                unicast_routes: unicast,
                throw_routes: throw,
                other_routes: plan.routes.len() - unicast - throw,
                node: plan.node,
            }
        })
        .collect();
    let report = AllReport {
        nodes,
        findings: diagnose(cluster),
        warnings: warnings.to_vec(),
    };
    match format {
        Format::Json => emit_json(&report),
        Format::Wg => Err(Failure::Input("--all has text and json formats".into())),
        Format::Text => {
            let w = report
                .nodes
                .iter()
                .map(|n| n.node.len())
                .max()
                .unwrap_or(0)
                .max(4);
            let mut out = format!(
                "{:<w$} {:<9} {:>6} {:>11} {:>8} {:>6}  {:<24} {}\n",
                "node", "state", "peers", "allowed ips", "unicast", "throw", "interfaces", "why"
            );
            for n in &report.nodes {
                out.push_str(&format!(
                    "{:<w$} {:<9} {:>6} {:>11} {:>8} {:>6}  {:<24} {}\n",
                    n.node,
                    n.state,
                    n.peers,
                    n.allowed_ips,
                    n.unicast_routes,
                    n.throw_routes,
                    n.interfaces.join(","),
                    n.reasons.join(", ")
                ));
            }
            let count = |s: &str| report.nodes.iter().filter(|n| n.state == s).count();
            out.push_str(&format!(
                "{} nodes: {} in the mesh, {} plain, {} excluded\n",
                report.nodes.len(),
                count("mesh"),
                count("plain"),
                count("excluded")
            ));
            for w in &report.warnings {
                out.push_str(&format!("warning: {w}\n"));
            }
            for f in &report.findings {
                out.push_str(&format!("finding: {f}\n"));
            }
            emit(&out)
        }
    }
}
