//! The targets and their checks.

use wgmesh_core::diagnostics::diagnose;
use wgmesh_core::spec::parse_cluster;
use wgmesh_core::{Cluster, IncrementalPlanner, plan_all, plan_node, render};

use crate::Target;

/// The cluster description parser (`spec::parse_cluster`, JSON and YAML) and everything that
/// reads what it accepts. For every input:
///
/// - an error is one line of at most 1,024 bytes (values are echoed elided);
/// - an accepted cluster plans every node, and the incremental planner of its first and last
///   node starts from the same plan, with the same counts of refused claims and disputed
///   prefixes as the findings;
/// - findings and the text rendering are produced, one line per finding;
/// - the cluster written back as JSON parses to the same cluster.
pub const CLUSTER: Target = Target {
    name: "cluster",
    dictionary: &[
        "{",
        "}",
        "[",
        "]",
        "\"",
        ":",
        ",",
        "\n",
        "  ",
        "- ",
        "---\n",
        "? ",
        "&a ",
        "*a",
        "<<: *a",
        "!!binary ",
        "|\n",
        ">-\n",
        "#",
        "'",
        "\\u0000",
        "\\\"",
        "null",
        "true",
        "false",
        "~",
        "-1",
        "0",
        "1e999",
        "18446744073709551616",
        "65535",
        "636",
        "1280",
        "9000",
        "\"nodes\"",
        "\"mesh\"",
        "\"name\"",
        "\"addresses\"",
        "\"pod_cidrs\"",
        "\"workload_ips\"",
        "\"wireguard\"",
        "\"public_key\"",
        "\"public_key_v6\"",
        "\"enabled\"",
        "\"underlay_mtu\"",
        "\"cluster_cidrs\"",
        "\"route_source\"",
        "\"workload_ips\"",
        "\"cidr_blocks\"",
        "\"host_encryption\"",
        "\"mtu\"",
        "\"mtu_floor\"",
        "\"min_prefix_len\"",
        "\"min_prefix_len_v6\"",
        "\"max_node_addresses\"",
        "\"max_node_pod_cidrs\"",
        "\"max_node_workload_ips\"",
        "\"interface_name\"",
        "\"interface_name_v6\"",
        "\"workload_interface_prefix\"",
        "\"control_plane_endpoints\"",
        "\"persistent_keepalive\"",
        "\"listen_port\"",
        "\"firewall_mark\"",
        "\"routing_table\"",
        "\"10.0.0.1\"",
        "\"10.0.0.2\"",
        "\"10.1.0.0/24\"",
        "\"10.1.0.0/25\"",
        "\"0.0.0.0/0\"",
        "\"::/0\"",
        "\"fe80::1\"",
        "\"fd00::1\"",
        "\"fd10::/64\"",
        "\"169.254.169.254\"",
        "\"168.63.129.16\"",
        "\"8.8.8.8\"",
        "\"255.255.255.255\"",
        "\"10.0.0.1:6443\"",
        "\"QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=\"",
        "\"AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"",
        "\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"",
    ],
    check: check_cluster,
};

fn check_cluster(input: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(input);
    let cluster = match parse_cluster(&text) {
        Ok(cluster) => cluster,
        Err(e) => {
            let message = e.to_string();
            if message.contains('\n') || message.len() > 1024 {
                return Err(format!(
                    "error of {} bytes on {} lines: {:.300}",
                    message.len(),
                    message.lines().count(),
                    message
                ));
            }
            return Ok(());
        }
    };
    let plans = plan_all(&cluster);
    if plans.len() != cluster.nodes().len() {
        return Err(format!(
            "{} plans for {} nodes",
            plans.len(),
            cluster.nodes().len()
        ));
    }
    let findings = diagnose(&cluster);
    for f in &findings {
        if f.to_string().contains('\n') {
            return Err(format!("finding on several lines: {f}"));
        }
    }
    let count = |kind: &str| findings.iter().filter(|d| d.kind() == kind).count();
    let (refused, clashes) = (count("refused"), count("clash"));
    let nodes = cluster.nodes();
    for node in nodes.first().into_iter().chain(nodes.last()) {
        let planner = IncrementalPlanner::new(&cluster, &node.name);
        let full = plan_node(&cluster, &node.name).map_err(|e| e.to_string())?;
        if planner.plan() != full {
            return Err(format!("incremental plan of {} differs", node.name));
        }
        let counts = (planner.refused_claims(), planner.disputed_prefixes());
        if cluster.mesh().enabled && counts != (refused, clashes) {
            return Err(format!(
                "planner counts {counts:?} (refused, disputed), findings ({refused}, {clashes})"
            ));
        }
    }
    for plan in &plans {
        let _ = render::text(plan);
    }
    round_trip(&cluster)
}

/// The typed cluster written as JSON reads back the same.
fn round_trip(cluster: &Cluster) -> Result<(), String> {
    let json = wgmesh_core_json(cluster)?;
    match parse_cluster(&json) {
        Ok(back) if back == *cluster => Ok(()),
        Ok(_) => Err(format!("JSON round trip changed the cluster: {json:.300}")),
        Err(e) => Err(format!("JSON round trip failed: {e}: {json:.300}")),
    }
}

fn wgmesh_core_json(cluster: &Cluster) -> Result<String, String> {
    serde_json::to_string(cluster).map_err(|e| e.to_string())
}
