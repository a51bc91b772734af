//! The targets and their checks.

use wgmesh_core::diagnostics::diagnose;
use wgmesh_core::spec::parse_cluster;
use wgmesh_core::{Cluster, IncrementalPlanner, plan_all, plan_node, render};

use wgmesh_netlink::{
    Backend, KernelIo, KeyRing, Linux, LinuxConfig, Ownership, Protocol, Reconciler,
};

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

/// The netlink answer parsers: everything the Linux dataplane reads from the kernel. The
/// input is the kernel's side of a conversation — datagrams, each as a little-endian `u16`
/// length and its bytes — that [`ScriptedKernel`] hands out in order, with the sequence
/// numbers set to those of the requests they answer (as Linux does, so the answers reach the
/// parsers instead of being dropped as late). Against it, the dataplane resolves the
/// WireGuard family, reconciles a four-node plan (link, address, route and rule dumps,
/// WireGuard device dumps over generic netlink, nf_tables tables, chains and rules, and the
/// acknowledgements of every change, extended acks included), then reads the peer counters.
/// For every input, each step returns a value or a typed error, never panics, and ends
/// when the conversation does.
pub const NETLINK: Target = Target {
    name: "netlink",
    dictionary: &[
        "\x00\x00",
        "\x7f\x7f",
        "\x02\x00",
        "\x03\x00",
        "\x10\x00",
        "\x14\x00",
        "\x18\x00",
        "\x1a\x00",
        "\x20\x00",
        "\x04\x00",
        "\x00\x7f",
        "\x00\x40",
        "\x02\x00\x00\x00",
        "\x7f\x7f\x7f\x7f",
        "\x00\x00\x00\x00",
        "\x01\x00\x00\x00",
        "\x08\x00\x01\x00",
        "\x08\x00\x02\x00",
        "\x04\x00\x03\x00",
        "wireguard\x00",
        "wgmesh\x00",
        "wireguard.cali\x00",
        "tun\x00",
    ],
    check: check_netlink,
};

/// A kernel whose answers are a script (see [`NETLINK`]); sysctls read as absent and are
/// written nowhere.
pub struct ScriptedKernel<'a> {
    script: &'a [u8],
    /// Per protocol, the sequence numbers of the requests still waiting for their end.
    waiting: [std::collections::VecDeque<u32>; 3],
}

impl<'a> ScriptedKernel<'a> {
    /// A kernel that answers with `script`.
    pub fn new(script: &'a [u8]) -> Self {
        Self {
            script,
            waiting: Default::default(),
        }
    }
}

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;

fn protocol_index(p: Protocol) -> usize {
    match p {
        Protocol::Route => 0,
        Protocol::Generic => 1,
        _ => 2,
    }
}

/// The netlink messages of a datagram: `(offset, length)` of each whole one.
fn messages(d: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while d.len() - at >= 16 {
        let len = u32::from_ne_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]) as usize;
        if len < 16 || len > d.len() - at {
            break;
        }
        out.push((at, len));
        at += len.next_multiple_of(4).min(d.len() - at);
    }
    out
}

impl KernelIo for ScriptedKernel<'_> {
    fn send(&mut self, protocol: Protocol, datagram: &[u8]) -> std::io::Result<()> {
        for (at, _) in messages(datagram) {
            let flags = u16::from_ne_bytes([datagram[at + 6], datagram[at + 7]]);
            let seq = u32::from_ne_bytes([
                datagram[at + 8],
                datagram[at + 9],
                datagram[at + 10],
                datagram[at + 11],
            ]);
            if flags & (NLM_F_ACK | NLM_F_DUMP) != 0 {
                self.waiting[protocol_index(protocol)].push_back(seq);
            }
        }
        Ok(())
    }

    fn recv(&mut self, protocol: Protocol, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let [a, b, rest @ ..] = self.script else {
            return Err(eof());
        };
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
        buf.clear();
        buf.extend_from_slice(&rest[..len]);
        self.script = &rest[len..];
        let waiting = &mut self.waiting[protocol_index(protocol)];
        for (at, _) in messages(buf) {
            let Some(&seq) = waiting.front() else { break };
            buf[at + 8..at + 12].copy_from_slice(&seq.to_ne_bytes());
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if kind == NLMSG_ERROR || kind == NLMSG_DONE {
                waiting.pop_front();
            }
        }
        Ok(())
    }

    fn read_sysctl(&mut self, _key: &str) -> std::io::Result<Option<String>> {
        Ok(None)
    }

    fn write_sysctl(&mut self, _key: &str, _value: &str) -> std::io::Result<()> {
        Ok(())
    }
}

/// The cluster the netlink target plans for: two WireGuard nodes and a plain one.
pub fn netlink_cluster() -> Cluster {
    parse_cluster(
        r#"{"mesh": {"host_encryption": true, "persistent_keepalive": 25},
        "nodes": [
          {"name": "a", "addresses": ["10.0.0.1", "fd00::1"], "pod_cidrs": ["10.65.0.0/26", "fd10::/120"],
           "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=",
                         "public_key_v6": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
          {"name": "b", "addresses": ["10.0.0.2", "fd00::2"], "pod_cidrs": ["10.65.0.64/26", "fd10::100/120"],
           "workload_ips": ["10.65.0.5"],
           "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=",
                         "public_key_v6": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}},
          {"name": "plain", "addresses": ["10.0.0.4"], "pod_cidrs": ["10.65.0.192/26"]}]}"#,
    )
    .expect("the netlink target's cluster parses")
}

/// The conversation of the netlink target, on any kernel: resolve the WireGuard family,
/// reconcile node `a`'s plan (twice), read the peer counters. Each step's error ends it.
pub fn netlink_conversation<K: KernelIo>(kernel: K) -> Result<(), wgmesh_netlink::Error> {
    let cluster = netlink_cluster();
    let plan = plan_node(&cluster, "a").expect("node a plans");
    let key = wgmesh_core::PrivateKey::from_bytes([0x48; 32]).expect("a valid key");
    let mut config = LinuxConfig::with_backend(Backend::Kernel);
    config.socket_dir = std::path::PathBuf::from("/nonexistent/wgmesh-fuzz");
    let linux = Linux::with_kernel(kernel, config)?;
    let mut r = Reconciler::new(
        linux,
        Ownership::from_mesh(cluster.mesh()),
        KeyRing::single(key),
    );
    r.reconcile(&plan)?;
    r.reconcile(&plan)?;
    r.peer_stats()?;
    Ok(())
}

fn check_netlink(input: &[u8]) -> Result<(), String> {
    match netlink_conversation(ScriptedKernel::new(input)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let message = e.to_string();
            if message.contains('\n') {
                return Err(format!("error on several lines: {message:.300}"));
            }
            Ok(())
        }
    }
}
