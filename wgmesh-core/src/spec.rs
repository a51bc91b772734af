//! The cluster description as text: JSON or YAML, every field of `mesh` optional.
//!
//! ```json
//! { "mesh": { "route_source": "workload_ips", "host_encryption": true },
//!   "nodes": [ { "name": "node-a", "addresses": ["10.240.0.4"],
//!                "wireguard": { "enabled": true, "public_key": "<base64>" },
//!                "workload_ips": ["10.240.0.5", "10.240.0.6"] } ] }
//! ```
//!
//! The `*Spec` types hold values as written (strings and wide integers), so that
//! [`ClusterSpec::validate`] can say exactly which node and field is wrong, and with which
//! value. [`parse_cluster`] (feature `parse`) goes from text to a [`Cluster`] in one step.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Location, Problem};
use crate::key::PublicKey;
use crate::model::{
    Cluster, DEFAULT_UNDERLAY_MTU, Family, MAX_MTU, MAX_NODE_LIMIT, MeshConfig, Node,
    NodeWireGuard, RouteSource,
};

/// The whole description, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Mesh settings; all optional.
    #[serde(default)]
    pub mesh: MeshSpec,
    /// The nodes.
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
}

/// Mesh settings as written; `None` takes the default of [`MeshConfig::default`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // the fields mirror MeshConfig's
pub struct MeshSpec {
    pub enabled: Option<bool>,
    pub interface_name: Option<String>,
    pub interface_name_v6: Option<String>,
    pub listen_port: Option<i64>,
    pub listen_port_v6: Option<i64>,
    pub firewall_mark: Option<i64>,
    pub routing_table: Option<i64>,
    pub rule_priority: Option<i64>,
    pub route_source: Option<String>,
    pub host_encryption: Option<bool>,
    pub mtu: Option<i64>,
    pub persistent_keepalive: Option<i64>,
    pub workload_interface_prefix: Option<String>,
    #[serde(default)]
    pub control_plane_endpoints: Vec<String>,
    #[serde(default)]
    pub cluster_cidrs: Vec<String>,
    pub min_prefix_len: Option<i64>,
    pub min_prefix_len_v6: Option<i64>,
    pub mtu_floor: Option<i64>,
    pub max_node_addresses: Option<i64>,
    pub max_node_pod_cidrs: Option<i64>,
    pub max_node_workload_ips: Option<i64>,
    pub strict_mode: Option<bool>,
}

/// A node as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // the fields mirror Node's
pub struct NodeSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<String>,
    pub underlay_mtu: Option<i64>,
    pub wireguard: Option<WireGuardSpec>,
    #[serde(default)]
    pub pod_cidrs: Vec<String>,
    #[serde(default)]
    pub workload_ips: Vec<String>,
}

/// A node's WireGuard settings as written. An object without `enabled` is enabled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // the fields mirror NodeWireGuard's
pub struct WireGuardSpec {
    pub enabled: Option<bool>,
    pub public_key: Option<String>,
    pub public_key_v6: Option<String>,
    pub phase: Option<crate::model::Phase>,
}

fn ranged<T: TryFrom<i64>>(
    value: Option<i64>,
    default: T,
    min: i64,
    max: i64,
    err: impl Fn(Option<String>, Problem) -> Error,
) -> Result<T, Error> {
    match value {
        None => Ok(default),
        Some(v) if (min..=max).contains(&v) => {
            T::try_from(v).map_err(|_| err(Some(v.to_string()), Problem::OutOfRange { min, max }))
        }
        Some(v) => Err(err(Some(v.to_string()), Problem::OutOfRange { min, max })),
    }
}

fn limit(value: Option<i64>, default: usize, field: &'static str) -> Result<usize, Error> {
    ranged(
        value,
        default,
        1,
        MAX_NODE_LIMIT as i64,
        |value, problem| Error::mesh(field, value, problem),
    )
}

impl MeshSpec {
    /// Converts to typed settings and validates them.
    pub fn validate(&self) -> Result<MeshConfig, Error> {
        let d = MeshConfig::default();
        let mesh_err =
            |field: &'static str| move |value, problem| Error::mesh(field, value, problem);
        let route_source = match self.route_source.as_deref() {
            None => d.route_source,
            Some("cidr_blocks") => RouteSource::CidrBlocks,
            Some("workload_ips") => RouteSource::WorkloadIps,
            Some(other) => {
                return Err(Error::mesh(
                    "route_source",
                    Some(other.into()),
                    Problem::UnknownRouteSource,
                ));
            }
        };
        let keepalive: u16 = ranged(
            self.persistent_keepalive,
            0,
            0,
            65535,
            mesh_err("persistent_keepalive"),
        )?;
        let mtu = match self.mtu {
            None => None,
            Some(v) => Some(ranged(Some(v), 0, 1, u32::MAX.into(), mesh_err("mtu"))?),
        };
        let mesh = MeshConfig {
            enabled: self.enabled.unwrap_or(d.enabled),
            interface_name: self.interface_name.clone().unwrap_or(d.interface_name),
            interface_name_v6: self
                .interface_name_v6
                .clone()
                .unwrap_or(d.interface_name_v6),
            listen_port: ranged(
                self.listen_port,
                d.listen_port,
                1,
                65535,
                mesh_err("listen_port"),
            )?,
            listen_port_v6: ranged(
                self.listen_port_v6,
                d.listen_port_v6,
                1,
                65535,
                mesh_err("listen_port_v6"),
            )?,
            firewall_mark: ranged(
                self.firewall_mark,
                d.firewall_mark,
                1,
                u32::MAX.into(),
                mesh_err("firewall_mark"),
            )?,
            routing_table: ranged(
                self.routing_table,
                d.routing_table,
                1,
                u32::MAX.into(),
                mesh_err("routing_table"),
            )?,
            rule_priority: ranged(
                self.rule_priority,
                d.rule_priority,
                1,
                32765,
                mesh_err("rule_priority"),
            )?,
            route_source,
            host_encryption: self.host_encryption.unwrap_or(d.host_encryption),
            mtu,
            persistent_keepalive: (keepalive != 0).then_some(keepalive),
            workload_interface_prefix: self
                .workload_interface_prefix
                .clone()
                .unwrap_or(d.workload_interface_prefix),
            control_plane_endpoints: self
                .control_plane_endpoints
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    text.trim().parse::<SocketAddr>().map_err(|_| {
                        Error::mesh(
                            format!("control_plane_endpoints[{i}]"),
                            Some(text.clone()),
                            Problem::Syntax("not an address:port ([v6]:port for IPv6)".into()),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            cluster_cidrs: self
                .cluster_cidrs
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    text.trim().parse::<IpNet>().map_err(|_| {
                        Error::mesh(
                            format!("cluster_cidrs[{i}]"),
                            Some(text.clone()),
                            Problem::InvalidCidr,
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            min_prefix_len: ranged(
                self.min_prefix_len,
                d.min_prefix_len,
                1,
                32,
                mesh_err("min_prefix_len"),
            )?,
            min_prefix_len_v6: ranged(
                self.min_prefix_len_v6,
                d.min_prefix_len_v6,
                1,
                128,
                mesh_err("min_prefix_len_v6"),
            )?,
            mtu_floor: ranged(
                self.mtu_floor,
                d.mtu_floor,
                Family::V4.min_mtu().into(),
                MAX_MTU.into(),
                mesh_err("mtu_floor"),
            )?,
            max_node_addresses: limit(
                self.max_node_addresses,
                d.max_node_addresses,
                "max_node_addresses",
            )?,
            max_node_pod_cidrs: limit(
                self.max_node_pod_cidrs,
                d.max_node_pod_cidrs,
                "max_node_pod_cidrs",
            )?,
            max_node_workload_ips: limit(
                self.max_node_workload_ips,
                d.max_node_workload_ips,
                "max_node_workload_ips",
            )?,
            strict_mode: self.strict_mode.unwrap_or(d.strict_mode),
        };
        mesh.validate()?;
        Ok(mesh)
    }
}

impl NodeSpec {
    /// Converts to a typed node and validates it on its own. `index` is its place in `nodes`,
    /// used to name it when the name itself is missing.
    pub fn validate(&self, index: usize) -> Result<Node, Error> {
        if self.name.is_empty() {
            return Err(Error::invalid(
                Location::NodeIndex(index),
                "name",
                None,
                Problem::Empty,
            ));
        }
        let name = self.name.as_str();
        let ip = |field: &str, i: usize, text: &str| {
            text.trim().parse::<IpAddr>().map_err(|_| {
                Error::node(
                    name,
                    format!("{field}[{i}]"),
                    Some(text.into()),
                    Problem::InvalidIp,
                )
            })
        };
        let addresses = self
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| ip("addresses", i, a))
            .collect::<Result<Vec<_>, _>>()?;
        let workload_ips = self
            .workload_ips
            .iter()
            .enumerate()
            .map(|(i, a)| ip("workload_ips", i, a))
            .collect::<Result<Vec<_>, _>>()?;
        let pod_cidrs = self
            .pod_cidrs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.trim().parse::<IpNet>().map_err(|_| {
                    Error::node(
                        name,
                        format!("pod_cidrs[{i}]"),
                        Some(text.clone()),
                        Problem::InvalidCidr,
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key = |field: &str, text: &Option<String>| -> Result<Option<PublicKey>, Error> {
            match text.as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(t) => PublicKey::from_base64(t)
                    .map(Some)
                    .map_err(|e| Error::node(name, field, Some(t.into()), Problem::InvalidKey(e))),
            }
        };
        let wireguard = match &self.wireguard {
            None => None,
            Some(w) => Some(NodeWireGuard {
                enabled: w.enabled.unwrap_or(true),
                public_key: key("wireguard.public_key", &w.public_key)?,
                public_key_v6: key("wireguard.public_key_v6", &w.public_key_v6)?,
                phase: w.phase.unwrap_or_default(),
            }),
        };
        let underlay_mtu = ranged(
            self.underlay_mtu,
            DEFAULT_UNDERLAY_MTU,
            1,
            u32::MAX.into(),
            |value, problem| Error::node(name, "underlay_mtu", value, problem),
        )?;
        let node = Node {
            name: self.name.clone(),
            addresses,
            underlay_mtu,
            wireguard,
            pod_cidrs,
            workload_ips,
        };
        node.validate()?;
        Ok(node)
    }
}

impl ClusterSpec {
    /// Converts to a validated [`Cluster`].
    pub fn validate(&self) -> Result<Cluster, Error> {
        let mesh = self.mesh.validate()?;
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| n.validate(i))
            .collect::<Result<Vec<_>, _>>()?;
        Cluster::new(mesh, nodes)
    }
}

impl TryFrom<ClusterSpec> for Cluster {
    type Error = Error;
    fn try_from(spec: ClusterSpec) -> Result<Self, Error> {
        spec.validate()
    }
}

impl TryFrom<MeshSpec> for MeshConfig {
    type Error = Error;
    fn try_from(spec: MeshSpec) -> Result<Self, Error> {
        spec.validate()
    }
}

impl TryFrom<NodeSpec> for Node {
    type Error = Error;
    fn try_from(spec: NodeSpec) -> Result<Self, Error> {
        spec.validate(0)
    }
}

/// Bounds on a cluster description (or any other JSON/YAML text), checked before a parser
/// sees it: its size, and how deep its collections nest. Parsers of nested text take time
/// that grows faster than the text (a 200 KB YAML list nested 100,000 deep took over a
/// minute); the schema of a cluster nests five levels, so the default bound of
/// [`DEFAULT_MAX_DEPTH`] is far above any real description.
///
/// ```
/// use wgmesh_core::spec::ParseLimits;
/// let limits = ParseLimits::default();
/// assert!(limits.check("nodes: [{name: a}]").is_ok());
/// let deep = format!("nodes: {}{}", "[".repeat(100_000), "]".repeat(100_000));
/// assert_eq!(
///     limits.check(&deep).unwrap_err().to_string(),
///     "cluster: syntax: nested more than 32 levels deep"
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParseLimits {
    /// The largest text accepted, in bytes.
    pub max_bytes: usize,
    /// The deepest nesting of collections accepted.
    pub max_depth: usize,
}

/// Default [`ParseLimits::max_bytes`]: 64 MiB, six times a 5,000-node cluster with 110 pods
/// per node.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// Default [`ParseLimits::max_depth`].
pub const DEFAULT_MAX_DEPTH: usize = 32;

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

impl ParseLimits {
    /// Limits with these values.
    pub fn new(max_bytes: usize, max_depth: usize) -> Self {
        Self {
            max_bytes,
            max_depth,
        }
    }

    /// Checks the size and the nesting of JSON (text that starts with `{` or `[`) or YAML,
    /// in one pass over the text. YAML's nesting is estimated from indentation, compact
    /// sequence entries (`- - -`) and flow collections; the estimate never undercounts flow
    /// collections and compact entries, which is what runaway inputs use.
    pub fn check(&self, text: &str) -> Result<(), Error> {
        let document =
            |problem| Error::invalid(Location::Document(String::new()), "syntax", None, problem);
        if text.len() > self.max_bytes {
            return Err(document(Problem::TooLarge {
                size: text.len(),
                limit: self.max_bytes,
            }));
        }
        let trimmed = text.trim_start();
        let deep = if trimmed.starts_with('{') || trimmed.starts_with('[') {
            json_depth_exceeds(text, self.max_depth)
        } else {
            yaml_depth_exceeds(text, self.max_depth)
        };
        if deep {
            return Err(document(Problem::TooDeep {
                limit: self.max_depth,
            }));
        }
        Ok(())
    }
}

/// Whether JSON text nests arrays and objects deeper than `limit`.
fn json_depth_exceeds(text: &str, limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Whether YAML text (likely) nests deeper than `limit`: open indentation levels, plus
/// compact entries (`- `, `? `) at the start of a line, plus open flow collections.
fn yaml_depth_exceeds(text: &str, limit: usize) -> bool {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut quote: Option<u8> = None;
    let mut block_scalar: Option<usize> = None;
    for line in text.lines() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|b| **b == b' ').count();
        if let Some(parent) = block_scalar {
            if indent > parent || line.trim().is_empty() {
                continue;
            }
            block_scalar = None;
        }
        let mut i = indent;
        let mut depth = flow;
        if quote.is_none() && flow == 0 {
            if i >= bytes.len() || bytes[i] == b'#' {
                continue;
            }
            while indents.last().is_some_and(|l| *l >= indent) {
                indents.pop();
            }
            indents.push(indent);
            depth += indents.len();
            // Compact nesting: `- - - x` or `? - x`.
            while i < bytes.len()
                && matches!(bytes[i], b'-' | b'?')
                && bytes.get(i + 1).is_none_or(|b| *b == b' ' || *b == b'\t')
            {
                depth += 1;
                i += 1;
                while i < bytes.len() && matches!(bytes[i], b' ' | b'\t') {
                    i += 1;
                }
            }
        }
        if depth > limit {
            return true;
        }
        // Flow collections and quoted scalars; a bracket or quote opens one only where a
        // value starts, or anywhere inside a flow collection.
        let mut value_start = true;
        let mut last = 0u8;
        while i < bytes.len() {
            let b = bytes[i];
            i += 1;
            if let Some(q) = quote {
                if q == b'"' && b == b'\\' {
                    i += 1;
                } else if b == q {
                    if q == b'\'' && bytes.get(i) == Some(&b'\'') {
                        i += 1;
                    } else {
                        quote = None;
                        value_start = false;
                    }
                }
                continue;
            }
            match b {
                b'#' if last == 0 || last == b' ' || last == b'\t' => break,
                b'"' | b'\'' if value_start => quote = Some(b),
                b'[' | b'{' if value_start || flow > 0 => {
                    flow += 1;
                    if depth + 1 > limit || flow > limit {
                        return true;
                    }
                    depth += 1;
                }
                b']' | b'}' if flow > 0 => {
                    flow -= 1;
                    depth = depth.saturating_sub(1);
                }
                _ => {}
            }
            value_start = match b {
                b' ' | b'\t' => {
                    value_start || matches!(last, b':' | b'-' | b'?' | b',' | b'[' | b'{')
                }
                b',' | b'[' | b'{' => flow > 0,
                _ => false,
            };
            last = b;
        }
        // A block scalar (`|` or `>`, with indicators) takes the more indented lines after it.
        if quote.is_none() && flow == 0 {
            let code = line.split(" #").next().unwrap_or(line).trim_end();
            if let Some(head) = code.rsplit(' ').next()
                && (head.starts_with('|') || head.starts_with('>'))
                && head[1..]
                    .bytes()
                    .all(|b| matches!(b, b'+' | b'-' | b'0'..=b'9'))
            {
                block_scalar = Some(indent);
            }
        }
    }
    false
}

/// Reads at most `limit` bytes of UTF-8 text from `reader`: for command-line tools that read a
/// cluster or a configuration from a file or a pipe that may never end (`/dev/zero`). Reading
/// stops one byte past the limit.
///
/// ```
/// use wgmesh_core::spec::{ReadError, read_bounded};
/// assert_eq!(read_bounded(&b"nodes: []"[..], 100).unwrap(), "nodes: []");
/// let endless = std::io::repeat(0);
/// assert!(matches!(read_bounded(endless, 1 << 20), Err(ReadError::TooLarge { limit: 1048576 })));
/// ```
pub fn read_bounded<R: std::io::Read>(reader: R, limit: usize) -> Result<String, ReadError> {
    use std::io::Read as _;
    let mut buf = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut buf)
        .map_err(ReadError::Io)?;
    if buf.len() > limit {
        return Err(ReadError::TooLarge { limit });
    }
    String::from_utf8(buf).map_err(|e| ReadError::NotUtf8 {
        valid_up_to: e.utf8_error().valid_up_to(),
    })
}

/// Why [`read_bounded`] gave up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The input has more than `limit` bytes.
    #[error("more than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The input is not UTF-8 text.
    #[error("not UTF-8 text (invalid byte at offset {valid_up_to})")]
    NotUtf8 {
        /// Bytes of valid text before the first invalid one.
        valid_up_to: usize,
    },
    /// Reading failed.
    #[error("{0}")]
    Io(#[source] std::io::Error),
}

/// Parses a cluster description in JSON or YAML (JSON if it starts with `{`) and validates it,
/// within the default [`ParseLimits`].
///
/// Syntax and type errors name the path of the bad value (`nodes[1].underlay_mtu`); semantic
/// errors name the node and field.
///
/// ```
/// use wgmesh_core::spec::parse_cluster;
/// let cluster = parse_cluster("mesh: {route_source: workload_ips}\nnodes: [{name: a}]\n")?;
/// assert_eq!(cluster.nodes().len(), 1);
/// let err = parse_cluster(r#"{"mesh": {"route_source": "bgp"}}"#).unwrap_err();
/// assert!(err.to_string().starts_with("mesh: route_source = \"bgp\": unknown route source"));
/// # Ok::<(), wgmesh_core::Error>(())
/// ```
#[cfg(feature = "parse")]
pub fn parse_cluster(text: &str) -> Result<Cluster, Error> {
    parse_cluster_with(text, &ParseLimits::default())
}

/// [`parse_cluster`] within other limits.
#[cfg(feature = "parse")]
pub fn parse_cluster_with(text: &str, limits: &ParseLimits) -> Result<Cluster, Error> {
    limits.check(text)?;
    let is_json = text.trim_start().starts_with('{');
    let syntax = |path: String, message: String| {
        let (location, field) = locate(text, is_json, &path);
        Error::invalid(location, field, None, Problem::syntax(message))
    };
    let spec: ClusterSpec = if is_json {
        let mut de = serde_json::Deserializer::from_str(text);
        let spec = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| syntax(e.path().to_string(), e.inner().to_string()))?;
        de.end().map_err(|e| syntax(String::new(), e.to_string()))?;
        spec
    } else {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| syntax(e.path().to_string(), e.inner().to_string()))?
    };
    spec.validate()
}

/// Names the node of a syntax error at `nodes[i]…` when that node has a readable name.
#[cfg(feature = "parse")]
fn locate(text: &str, is_json: bool, path: &str) -> (Location, String) {
    let fallback = || (Location::Document(path.to_owned()), "syntax".to_owned());
    let Some(rest) = path.strip_prefix("nodes[") else {
        return match path.strip_prefix("mesh.") {
            Some(field) => (Location::Mesh, field.to_owned()),
            None => fallback(),
        };
    };
    let Some((index, field)) = rest.split_once(']') else {
        return fallback();
    };
    let Ok(index) = index.parse::<usize>() else {
        return fallback();
    };
    let name = if is_json {
        serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| {
                v.get("nodes")?
                    .get(index)?
                    .get("name")?
                    .as_str()
                    .map(str::to_owned)
            })
    } else {
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text)
            .ok()
            .and_then(|v| {
                v.get("nodes")?
                    .get(index)?
                    .get("name")?
                    .as_str()
                    .map(str::to_owned)
            })
    };
    let field = field.trim_start_matches('.');
    let field = if field.is_empty() { "syntax" } else { field };
    match name {
        Some(name) if !name.is_empty() => (Location::Node(name), field.to_owned()),
        _ => (Location::NodeIndex(index), field.to_owned()),
    }
}

#[cfg(all(test, feature = "parse"))]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_cluster(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = parse_cluster("{}").unwrap();
        assert_eq!(c.mesh(), &MeshConfig::default());
        assert!(c.nodes().is_empty());
        let c = parse_cluster("").unwrap_or_else(|_| parse_cluster("{}").unwrap());
        assert!(c.nodes().is_empty());
    }

    #[test]
    fn every_bad_input_names_node_and_field() {
        let cases = [
            (
                r#"{"nodes":[{"name":"a","addresses":["10.0.0.300"]}]}"#,
                r#"node "a": addresses[0] = "10.0.0.300": not an IP address"#,
            ),
            (
                r#"{"nodes":[{"name":"a","pod_cidrs":["10.0.0.0/33"]}]}"#,
                r#"node "a": pod_cidrs[0] = "10.0.0.0/33": not a CIDR"#,
            ),
            (
                r#"{"nodes":[{"name":"a","workload_ips":["x"]}]}"#,
                r#"node "a": workload_ips[0] = "x": not an IP address"#,
            ),
            (
                r#"{"nodes":[{"name":"a","wireguard":{"public_key":"abc"}}]}"#,
                r#"node "a": wireguard.public_key = "abc": invalid WireGuard key"#,
            ),
            (
                r#"{"mesh":{"listen_port":70000}}"#,
                r#"mesh: listen_port = "70000": must be between 1 and 65535"#,
            ),
            (
                r#"{"mesh":{"mtu":100}}"#,
                r#"mesh: mtu = "100": must be between 576"#,
            ),
            (
                r#"{"mesh":{"route_source":"magic"}}"#,
                r#"mesh: route_source = "magic": unknown route source"#,
            ),
            (
                r#"{"nodes":[{"name":"a"},{"name":"a"}]}"#,
                r#"nodes[1]: name = "a": duplicate node name (also nodes[0])"#,
            ),
            (
                r#"{"nodes":[{"name":"a","underlay_mtu":600,"addresses":["fd00::1"]}]}"#,
                r#"node "a": underlay_mtu = "600": must be between 1360"#,
            ),
            (
                r#"{"nodes":[{"addresses":[]}]}"#,
                "nodes[0]: name: must not be empty",
            ),
            (
                r#"{"nodes":[{"name":"a","adresses":[]}]}"#,
                r#"node "a": adresses: unknown field `adresses`"#,
            ),
            (
                r#"{"nodes":[{"name":"a","underlay_mtu":"big"}]}"#,
                r#"node "a": underlay_mtu: invalid type"#,
            ),
            (
                r#"{"mesh":{"routing_table":254}}"#,
                r#"mesh: routing_table = "254": 0, 253"#,
            ),
            (
                r#"{"mesh":{"firewall_mark":0}}"#,
                r#"mesh: firewall_mark = "0": must be between 1"#,
            ),
            (
                r#"{"mesh":{"interface_name":"this-name-is-too-long"}}"#,
                "mesh: interface_name = \"this-name-is-too-long\": invalid interface name",
            ),
            (
                r#"{"mesh":{"listen_port_v6":51820}}"#,
                r#"mesh: listen_port_v6 = "51820": must differ from listen_port"#,
            ),
            (
                r#"{"nodes":[{"name":"a"}]"#,
                "cluster: syntax: EOF while parsing",
            ),
            (
                "nodes: [ {name: a, addresses: [1.2.3.4.5]} ]",
                r#"node "a": addresses[0] = "1.2.3.4.5""#,
            ),
        ];
        for (input, expected) in cases {
            let got = err(input);
            assert!(
                got.starts_with(expected),
                "input {input}\n  got      {got}\n  expected {expected}…"
            );
            assert!(!got.contains('\n'), "one line: {got}");
        }
    }

    #[test]
    fn typed_cluster_round_trips_through_json() {
        let text = r#"{"mesh":{"host_encryption":true,"route_source":"workload_ips","persistent_keepalive":25},
          "nodes":[{"name":"a","addresses":["10.0.0.1","fd00::1"],"underlay_mtu":9000,
                    "wireguard":{"public_key":"bbcKpAY+Q9VpmIRLT+yPaaOALxqnonxBuk5LRlvKClA="},
                    "pod_cidrs":["10.65.0.0/26"],"workload_ips":["10.65.0.2"]}]}"#;
        let cluster = parse_cluster(text).unwrap();
        let json = serde_json::to_string(&cluster).unwrap();
        let back: Cluster = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cluster);
        assert!(cluster.nodes()[0].wireguard_enabled());
        assert_eq!(cluster.mesh().persistent_keepalive, Some(25));
    }
}
