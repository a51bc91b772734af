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
use crate::model::{Cluster, DEFAULT_UNDERLAY_MTU, MeshConfig, Node, NodeWireGuard, RouteSource};

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
            return Err(Error::Invalid {
                location: Location::NodeIndex(index),
                field: "name".into(),
                value: None,
                problem: Problem::Empty,
            });
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

/// Parses a cluster description in JSON or YAML (JSON if it starts with `{`) and validates it.
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
    let is_json = text.trim_start().starts_with('{');
    let syntax = |path: String, message: String| {
        let (location, field) = locate(text, is_json, &path);
        Error::Invalid {
            location,
            field,
            value: None,
            problem: Problem::Syntax(message),
        }
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
