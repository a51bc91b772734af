//! `wgmesh why SRC DST`: the path the simulator finds for one packet, hop by hop, with the
//! object that decided each step (the rule, the route and its table, the peer and the allowed
//! IP that matched, the mark), and the verdict: local, encrypted through a peer, plain, or
//! dropped.
//!
//! SRC and DST are pod names (`namespace/name`, from a Kubernetes source), node names, or
//! addresses. wgmesh's rules match no protocol or port, so `--proto` and `--port` are shown,
//! not used: the verdict holds for any of them.

use std::net::IpAddr;

use serde::Serialize;
use std::collections::BTreeMap;

use wgmesh::core::sim::{Outcome, Simulator, Source, Trace};
use wgmesh::core::{Cluster, Family, NodePlan, plan_node};

use crate::emit;
use crate::shared::{Failure, emit_json};
use crate::source::{ClusterSource, Loaded};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// The verdict and one line per hop.
    Text,
    /// One JSON object.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Proto {
    Tcp,
    Udp,
    Icmp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FamilyArg {
    Ipv4,
    Ipv6,
}

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Where the packet starts: a pod (`namespace/name`), a node (its host), or an address.
    #[arg(value_name = "SRC")]
    from: String,
    /// Where it goes: a pod, a node, or any address.
    #[arg(value_name = "DST")]
    to: String,
    #[command(flatten)]
    source: ClusterSource,
    /// The protocol (shown; wgmesh's rules match none).
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    proto: Proto,
    /// The destination port (shown; wgmesh's rules match none).
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// The family, when neither end is an address (default: IPv4 where both ends have it).
    #[arg(long, value_enum)]
    family: Option<FamilyArg>,
    /// The output format.
    #[arg(long, short, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Also compare this host's kernel state with the plan of `--node` and name any drift
    /// (exit code 3 when there is some).
    #[cfg(feature = "netlink")]
    #[arg(long)]
    live: bool,
    /// With `--live`: this host's node name (default: the node SRC is on).
    #[cfg(feature = "netlink")]
    #[arg(long, short, value_name = "NAME", env = "NODE_NAME", requires = "live")]
    node: Option<String>,
    #[cfg(feature = "netlink")]
    #[command(flatten)]
    live_args: crate::live::LiveArgs,
}

/// One end of the flow, resolved.
#[derive(Debug, Clone, Serialize)]
struct End {
    /// What was asked for.
    asked: String,
    /// `pod`, `node` (its host), or `address` (outside the cluster's pods and nodes).
    kind: &'static str,
    /// The address used.
    address: IpAddr,
    /// The node it is on, if any.
    node: Option<String>,
}

/// What an argument names, before a family is chosen.
enum Named {
    Pod { node: String, ips: Vec<IpAddr> },
    Node(String),
    Address(IpAddr),
}

fn name(loaded: &Loaded, text: &str) -> Result<Named, Failure> {
    let cluster = &loaded.cluster;
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(Named::Address(ip));
    }
    if text.contains('/') {
        if let Some(pod) = loaded.pods.get(text) {
            return Ok(Named::Pod {
                node: pod.node.clone(),
                ips: pod.ips.clone(),
            });
        }
        return Err(Failure::Input(if loaded.from_kubernetes {
            format!("no pod {text} with an address (namespace/name)")
        } else {
            format!("{text}: pod names need --from-kubectl or --kubeconfig")
        }));
    }
    if cluster.node(text).is_some() {
        return Ok(Named::Node(text.to_owned()));
    }
    Err(Failure::Input(format!(
        "{text} is no node, pod (namespace/name) or address"
    )))
}

fn families(named: &Named, loaded: &Loaded) -> Vec<Family> {
    match named {
        Named::Address(ip) => vec![Family::of(ip)],
        Named::Pod { ips, .. } => Family::ALL
            .into_iter()
            .filter(|f| ips.iter().any(|ip| Family::of(ip) == *f))
            .collect(),
        Named::Node(n) => Family::ALL
            .into_iter()
            .filter(|f| {
                loaded
                    .cluster
                    .node(n)
                    .is_some_and(|node| node.address(*f).is_some())
            })
            .collect(),
    }
}

fn resolve(named: &Named, asked: &str, family: Family, loaded: &Loaded) -> Result<End, Failure> {
    let missing = || Failure::Input(format!("{asked} has no {family} address"));
    Ok(match named {
        Named::Address(ip) => {
            let node = loaded
                .cluster
                .nodes()
                .iter()
                .find(|n| n.addresses.contains(ip) || n.workload_ips.contains(ip));
            let kind = match node {
                Some(n) if n.addresses.contains(ip) => "node",
                Some(_) => "pod",
                None => "address",
            };
            End {
                asked: asked.to_owned(),
                kind,
                address: *ip,
                node: node.map(|n| n.name.clone()),
            }
        }
        Named::Pod { node, ips } => End {
            asked: asked.to_owned(),
            kind: "pod",
            address: *ips
                .iter()
                .find(|ip| Family::of(ip) == family)
                .ok_or_else(missing)?,
            node: Some(node.clone()),
        },
        Named::Node(n) => End {
            asked: asked.to_owned(),
            kind: "node",
            address: loaded
                .cluster
                .node(n)
                .and_then(|node| node.address(family))
                .ok_or_else(missing)?,
            node: Some(n.clone()),
        },
    })
}

#[derive(Debug, Serialize)]
struct Answer {
    from: End,
    to: End,
    proto: Proto,
    port: Option<u16>,
    /// `local`, `encrypted`, `plain` or `dropped`.
    verdict: &'static str,
    /// For a drop: why.
    reason: Option<String>,
    /// Every WireGuard hop: the node that encrypted and the peer it encrypted to.
    tunnels: Vec<(String, String)>,
    hops: Vec<String>,
    /// With `--live`: what differs between this host and its plan.
    #[serde(skip_serializing_if = "Option::is_none")]
    drift: Option<Vec<String>>,
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let loaded = args.source.load()?;
    let (from, to) = (name(&loaded, &args.from)?, name(&loaded, &args.to)?);
    let shared: Vec<Family> = families(&from, &loaded)
        .into_iter()
        .filter(|f| families(&to, &loaded).contains(f))
        .collect();
    let family = match args.family {
        Some(FamilyArg::Ipv4) => Family::V4,
        Some(FamilyArg::Ipv6) => Family::V6,
        None => *shared.first().ok_or_else(|| {
            Failure::Input(format!(
                "{} and {} share no address family",
                args.from, args.to
            ))
        })?,
    };
    let from_end = resolve(&from, &args.from, family, &loaded)?;
    let to_end = resolve(&to, &args.to, family, &loaded)?;
    let start = match from_end.kind {
        "pod" => Source::Pod(from_end.address),
        "node" => Source::Host(from_end.node.clone().unwrap_or_default(), family),
        _ => {
            return Err(Failure::Input(format!(
                "{}: a packet starts at a pod or a node of the cluster",
                args.from
            )));
        }
    };
    let ends = [from_end.node.clone(), to_end.node.clone()];
    let trace = trace_planning_lazily(&loaded.cluster, &ends, start, to_end.address)
        .map_err(|e| Failure::Input(e.to_string()))?;
    let (verdict, reason) = match &trace.outcome {
        Outcome::Local => ("local", None),
        Outcome::Encrypted => ("encrypted", None),
        Outcome::Plain => ("plain", None),
        Outcome::Dropped(d) => ("dropped", Some(format!("{d:?}"))),
    };
    #[cfg(feature = "netlink")]
    let drift = if args.live {
        let node = args
            .node
            .clone()
            .or_else(|| from_end.node.clone())
            .ok_or_else(|| Failure::Input("--live needs --node NAME".to_owned()))?;
        Some(crate::live::check(&loaded.cluster, &node, &args.live_args)?.drift)
    } else {
        None
    };
    #[cfg(not(feature = "netlink"))]
    let drift: Option<Vec<String>> = None;
    let answer = Answer {
        from: from_end,
        to: to_end,
        proto: args.proto,
        port: args.port,
        verdict,
        reason,
        tunnels: trace.tunnels,
        hops: trace.hops,
        drift,
    };
    match args.format {
        Format::Json => emit_json(&answer)?,
        Format::Text => emit(&text(&answer))?,
    }
    match &answer.drift {
        Some(d) if !d.is_empty() => Err(Failure::Unhealthy(format!(
            "this host differs from its plan in {} operations",
            d.len()
        ))),
        _ => Ok(()),
    }
}

/// The simulator's trace with the plans of only the nodes the packet meets: the ends first,
/// then every node the trace names, until it names no new one. A packet meets at most a
/// sender and a receiver, so on a cluster of thousands of nodes this plans two or three of
/// them instead of all (a full plan of one node of 5,000 takes about 40 ms). A node without
/// a plan programs nothing, so a node the trace needs but lacks would change the answer; the
/// loop ends only when every node the trace names, by name or by an address, is planned
/// (a false match only plans one node more).
fn trace_planning_lazily(
    cluster: &Cluster,
    ends: &[Option<String>],
    start: Source,
    to: IpAddr,
) -> Result<Trace, wgmesh::core::Error> {
    let mut planned: BTreeMap<String, NodePlan> = BTreeMap::new();
    let mut wanted: Vec<String> = ends.iter().flatten().cloned().collect();
    loop {
        for name in wanted.drain(..) {
            if !planned.contains_key(&name) {
                planned.insert(name.clone(), plan_node(cluster, &name)?);
            }
        }
        let trace = Simulator::new(cluster, planned.values().cloned()).trace(start.clone(), to);
        let text = format!("{trace:?}");
        wanted = cluster
            .nodes()
            .iter()
            .filter(|n| {
                !planned.contains_key(&n.name)
                    && (text.contains(n.name.as_str())
                        || n.addresses.iter().any(|a| text.contains(&a.to_string())))
            })
            .map(|n| n.name.clone())
            .collect();
        if wanted.is_empty() {
            return Ok(trace);
        }
    }
}

fn describe(end: &End) -> String {
    let on = end
        .node
        .as_deref()
        .map(|n| format!(" on node {n}"))
        .unwrap_or_default();
    if end.kind == "node" && end.node.as_deref() == Some(end.asked.as_str()) {
        return format!("node {} ({})", end.asked, end.address);
    }
    if end.asked == end.address.to_string() {
        format!("{} ({}{on})", end.address, end.kind)
    } else {
        format!("{} ({} {}{on})", end.asked, end.kind, end.address)
    }
}

fn text(a: &Answer) -> String {
    let mut out = format!(
        "{} → {}, {}{}\n",
        describe(&a.from),
        describe(&a.to),
        serde_json::to_value(a.proto)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        a.port.map(|p| format!("/{p}")).unwrap_or_default()
    );
    let through: Vec<String> = a
        .tunnels
        .iter()
        .map(|(from, to)| format!("{from} → {to}"))
        .collect();
    match (a.verdict, &a.reason) {
        ("encrypted", _) => out.push_str(&format!(
            "verdict: encrypted (WireGuard {})\n",
            through.join(", ")
        )),
        ("dropped", Some(r)) => out.push_str(&format!("verdict: dropped ({r})\n")),
        (v, _) => out.push_str(&format!("verdict: {v}\n")),
    }
    for (i, hop) in a.hops.iter().enumerate() {
        out.push_str(&format!("  {:>2}. {hop}\n", i + 1));
    }
    if let Some(drift) = &a.drift {
        if drift.is_empty() {
            out.push_str("live: this host matches its plan\n");
        } else {
            out.push_str(&format!(
                "live: {} differences from the plan:\n",
                drift.len()
            ));
            for d in drift {
                out.push_str(&format!("  drift: {d}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgmesh::core::spec::parse_cluster;

    /// Planning only the nodes a packet meets gives the same trace as planning all of them,
    /// for every source (each pod and each host, per family) and every destination address of
    /// the clusters shipped as examples and of a hostile one (a duplicate key, a contested
    /// pod address, a peer whose endpoint another node owns, strict mode).
    #[test]
    fn lazy_planning_traces_like_the_full_simulator() {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut clusters: Vec<Cluster> = ["aks-azure-cni.json", "mixed-dual-stack.yaml"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(format!("{root}/examples/clusters/{f}"));
                parse_cluster(&text.unwrap()).unwrap()
            })
            .collect();
        for strict in [false, true] {
            clusters.push(
                parse_cluster(&format!(
                    r#"{{"mesh": {{"route_source": "workload_ips", "host_encryption": true,
                       "strict_mode": {strict}, "cluster_cidrs": ["10.0.0.0/16"]}},
                    "nodes": [
                  {{"name": "a", "addresses": ["10.0.0.1"], "workload_ips": ["10.0.1.1", "10.0.9.9"],
                    "wireguard": {{"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}}}},
                  {{"name": "b", "addresses": ["10.0.0.2"], "workload_ips": ["10.0.2.1", "10.0.9.9"],
                    "wireguard": {{"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}}},
                  {{"name": "c", "addresses": ["10.0.0.3"], "workload_ips": ["10.0.3.1"],
                    "wireguard": {{"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}}},
                  {{"name": "d", "addresses": ["10.0.0.4"], "workload_ips": ["10.0.4.1"],
                    "wireguard": {{"public_key": "bbcKpAY+Q9VpmIRLT+yPaaOALxqnonxBuk5LRlvKClA="}}}},
                  {{"name": "e", "addresses": ["10.0.0.5"], "workload_ips": ["10.0.5.1"]}}]}}"#
                ))
                .unwrap(),
            );
        }
        let mut compared = 0;
        for cluster in &clusters {
            let full = Simulator::from_cluster(cluster);
            let mut sources = Vec::new();
            let mut targets = Vec::new();
            for n in cluster.nodes() {
                for ip in &n.workload_ips {
                    sources.push((Source::Pod(*ip), Some(n.name.clone())));
                    targets.push(*ip);
                }
                for a in &n.addresses {
                    sources.push((
                        Source::Host(n.name.clone(), Family::of(a)),
                        Some(n.name.clone()),
                    ));
                    targets.push(*a);
                }
            }
            for (source, node) in &sources {
                for to in &targets {
                    let owner = cluster
                        .nodes()
                        .iter()
                        .find(|n| n.addresses.contains(to) || n.workload_ips.contains(to))
                        .map(|n| n.name.clone());
                    let lazy =
                        trace_planning_lazily(cluster, &[node.clone(), owner], source.clone(), *to)
                            .unwrap();
                    assert_eq!(lazy, full.trace(source.clone(), *to), "{source:?} → {to}");
                    compared += 1;
                }
            }
        }
        assert!(compared > 200, "{compared}");
    }
}
