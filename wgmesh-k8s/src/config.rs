//! The agent's configuration: a file (YAML or JSON) with the core's defaults for the mesh (its
//! `mesh` section is the core's [`MeshSpec`]). The `wgmesh-agent` binary lays its flags and
//! `WGMESH_*` environment variables over the file's values (see `wgmesh-agent --help`) and then
//! calls [`ConfigSpec::validate`].
//!
//! ```yaml
//! node_name: null                  # default: the NODE_NAME environment variable
//! mesh:                            # wgmesh-core's mesh settings; every field optional
//!   route_source: workload_ips
//!   host_encryption: true
//!   control_plane_endpoints: ["10.0.0.100:6443"]
//!   strict_mode: false             # true: drop rather than send plaintext between WireGuard
//!                                  # nodes (opt a node out with the label
//!                                  # node-restriction.kubernetes.io/wgmesh-plain)
//! private_key_file: /var/lib/wgmesh/private-key
//! calico_annotations: false        # also read projectcalico.org/WireguardPublicKey(V6)
//! watch_pods: auto                 # auto (iff route_source is workload_ips) | true | false
//! control_plane:
//!   service: true                  # keep KUBERNETES_SERVICE_HOST:PORT outside the tunnel
//!   node_label: node-role.kubernetes.io/control-plane   # null: derive nothing from nodes
//!   port: 6443                     # the API server's port on control-plane nodes
//! underlay_mtu: null               # publish this node's underlay MTU
//! debounce_ms: 100
//! max_delay_ms: 100               # at most this long while changes keep coming (default: debounce_ms)
//! resync_seconds: 90
//! publish_backoff_max_seconds: 60
//! health_address: 127.0.0.1:9469   # /healthz, /readyz and /metrics for the host; "" turns it off
//! metrics_address: ""              # /metrics only, for Prometheus (the DaemonSet: 0.0.0.0:9470)
//! metrics_per_peer: true           # per-peer series (they grow with the square of the cluster)
//! log_format: json                 # json | text
//! dry_run: false                   # log plans, program nothing
//! backend: auto                    # WireGuard: auto | kernel | userspace (wireguard-go)
//! key_rotation_interval: null      # rotate the node's key this often: "30d", "12h", "90m"
//!                                  # (s, m, h, d; at least 1m); null: never (the default)
//! key_rotation_max_concurrent: 1   # at most this many nodes announce a next key at once
//! key_rotation_settle_seconds: 10  # wait after the announcement came back, then switch
//! key_rotation_announcement_limit_seconds: 600  # another node's announcement counts toward
//!                                  # the bound this long after this agent first saw it
//!                                  # (at least the settle time and 60 s)
//! phase_grace_seconds: 60          # another node's wgmesh.io/phase marker (leaving, joining)
//!                                  # is honoured this long after this agent first saw it
//! phase_settle_seconds: 10         # this node waits this long in a phase after its marker
//!                                  # came back (less than the grace)
//! leave_file: null                 # default: "leave" beside private_key_file; present, the
//!                                  # node leaves the mesh in phases (`wgmesh-agent leave`)
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wgmesh_core::RouteSource;
use wgmesh_core::spec::MeshSpec;

use crate::adapter::{AdapterOptions, CONTROL_PLANE_LABEL};
use crate::agent::{AgentSettings, Backoff};
use crate::http::DEFAULT_HEALTH_ADDRESS;
use crate::view::ControlPlaneEndpoints;

/// Where the private key lives by default (a hostPath volume in the DaemonSet): the same path
/// as the `wgmesh apply` CLI's, so a node has one identity.
pub use wgmesh_netlink::keys::DEFAULT_PRIVATE_KEY_FILE;

/// A configuration problem, naming the field (or flag) and the value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not valid YAML/JSON of the right shape.
    #[error("config: {path}: {message}")]
    Syntax {
        /// The path of the bad value (`mesh.listen_port`).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value is not acceptable.
    #[error("config: {field} = {value:?}: {problem}")]
    Invalid {
        /// The field or flag.
        field: String,
        /// The value.
        value: String,
        /// What is wrong.
        problem: String,
    },
    /// The mesh settings are not valid.
    #[error("config: {0}")]
    Mesh(#[from] wgmesh_core::Error),
}

/// `watch_pods`: automatic, or forced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WatchPods {
    /// Watch pods iff the route source is `workload_ips`.
    #[default]
    Auto,
    /// Always (adds borrowed addresses with `cidr_blocks`).
    #[serde(rename = "true")]
    Always,
    /// Never.
    #[serde(rename = "false")]
    Never,
}

/// The log format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// The `control_plane` section as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // documented on `ConfigSpec`
pub struct ControlPlaneSpec {
    pub service: Option<bool>,
    /// `Some(None)` (written `null`) turns the derivation off.
    #[serde(default, with = "double_option")]
    pub node_label: Option<Option<String>>,
    pub port: Option<i64>,
}

mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        v: &Option<Option<String>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(d).map(Some)
    }
}

/// The configuration file as written; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // the module documentation describes every field
pub struct ConfigSpec {
    pub node_name: Option<String>,
    #[serde(default)]
    pub mesh: MeshSpec,
    pub private_key_file: Option<String>,
    pub calico_annotations: Option<bool>,
    pub watch_pods: Option<WatchPods>,
    #[serde(default)]
    pub control_plane: ControlPlaneSpec,
    pub underlay_mtu: Option<i64>,
    pub debounce_ms: Option<i64>,
    pub max_delay_ms: Option<i64>,
    pub resync_seconds: Option<i64>,
    pub publish_backoff_max_seconds: Option<i64>,
    pub health_address: Option<String>,
    pub metrics_address: Option<String>,
    pub metrics_per_peer: Option<bool>,
    pub log_format: Option<LogFormat>,
    pub dry_run: Option<bool>,
    pub backend: Option<String>,
    pub key_rotation_interval: Option<String>,
    pub key_rotation_max_concurrent: Option<i64>,
    pub key_rotation_settle_seconds: Option<i64>,
    pub key_rotation_announcement_limit_seconds: Option<i64>,
    pub phase_grace_seconds: Option<i64>,
    pub phase_settle_seconds: Option<i64>,
    pub leave_file: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AgentConfig {
    /// What the agent's state machine needs.
    pub settings: AgentSettings,
    /// The private key file (mode 0600; generated when absent).
    pub private_key_file: PathBuf,
    /// The host's endpoint: `/healthz`, `/readyz`, `/metrics` (`None`: off).
    pub health_address: Option<SocketAddr>,
    /// The endpoint for Prometheus: `/metrics` only (`None`: off).
    pub metrics_address: Option<SocketAddr>,
    /// The log format.
    pub log_format: LogFormat,
    /// Log plans, program nothing.
    pub dry_run: bool,
    /// Which WireGuard implementation to drive.
    pub backend: wgmesh_netlink::Backend,
}

fn invalid(field: &str, value: impl ToString, problem: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        value: value.to_string(),
        problem: problem.to_owned(),
    }
}

/// An endpoint's address: absent means `default`, `""` means off.
fn address(
    field: &str,
    value: Option<&str>,
    default: Option<&str>,
) -> Result<Option<SocketAddr>, ConfigError> {
    match value.map(str::trim).or(default) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| invalid(field, text, "not an address:port")),
    }
}

fn ranged(
    field: &str,
    v: Option<i64>,
    default: u64,
    min: i64,
    max: i64,
) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(v) if (min..=max).contains(&v) => Ok(v as u64),
        Some(v) => Err(invalid(
            field,
            v,
            &format!("must be between {min} and {max}"),
        )),
    }
}

/// `key_rotation_interval`: a number and a unit (`s`, `m`, `h`, `d`), at least one minute and
/// at most ten years.
///
/// ```
/// use std::time::Duration;
/// use wgmesh_k8s::config::rotation_interval;
/// assert_eq!(rotation_interval("30d")?, Duration::from_secs(30 * 86_400));
/// assert_eq!(rotation_interval(" 90m ")?, Duration::from_secs(5400));
/// assert!(rotation_interval("30").is_err());
/// assert!(rotation_interval("10s").is_err());
/// # Ok::<(), wgmesh_k8s::config::ConfigError>(())
/// ```
pub fn rotation_interval(text: &str) -> Result<Duration, ConfigError> {
    const FIELD: &str = "key_rotation_interval";
    let t = text.trim();
    let bad = |problem: &str| invalid(FIELD, t, problem);
    let unit = t
        .chars()
        .last()
        .ok_or_else(|| bad("empty; write a number and a unit (s, m, h, d), or null"))?;
    let scale: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad("needs a unit: s, m, h or d (\"30d\")")),
    };
    let n: u64 = t[..t.len() - 1]
        .trim()
        .parse()
        .map_err(|_| bad("not a whole number followed by a unit (\"30d\")"))?;
    let secs = n
        .checked_mul(scale)
        .filter(|s| (60..=10 * 365 * 86_400).contains(s))
        .ok_or_else(|| bad("must be between 1m and 3650d"))?;
    Ok(Duration::from_secs(secs))
}

impl ConfigSpec {
    /// Parses YAML or JSON (JSON is YAML), naming the path of a bad value.
    ///
    /// ```
    /// use wgmesh_k8s::config::ConfigSpec;
    /// let spec = ConfigSpec::parse("mesh: {route_source: workload_ips}\nresync_seconds: 30\n")?;
    /// assert_eq!(spec.resync_seconds, Some(30));
    /// let err = ConfigSpec::parse("mesh: {listen_port: many}").unwrap_err();
    /// assert!(err.to_string().starts_with("config: mesh.listen_port: invalid type"), "{err}");
    /// # Ok::<(), wgmesh_k8s::config::ConfigError>(())
    /// ```
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        // Size and nesting are bounded before the YAML parser sees the text (a file nested
        // 100,000 deep would otherwise take minutes).
        wgmesh_core::spec::ParseLimits::default()
            .check(text)
            .map_err(|e| ConfigError::Syntax {
                path: ".".to_owned(),
                message: e.to_string(),
            })?;
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let message = e.inner().to_string();
            // The YAML library sometimes names the path itself.
            let message = message
                .strip_prefix(&format!("{path}: "))
                .map(str::to_owned)
                .unwrap_or(message);
            ConfigError::Syntax { path, message }
        })
    }

    /// Reads and parses a file.
    pub fn read(path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Validates everything. `env` reads environment variables (`NODE_NAME`,
    /// `KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`).
    pub fn validate(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        let mesh = self.mesh.validate()?;
        let node_name = match self.node_name.clone().or_else(|| env("NODE_NAME")) {
            Some(n) if !n.trim().is_empty() => n.trim().to_owned(),
            _ => {
                return Err(invalid(
                    "node_name",
                    "",
                    "set node_name, --node-name or NODE_NAME (the downward API's spec.nodeName)",
                ));
            }
        };
        let mut settings = AgentSettings::new(node_name, mesh);
        settings.watch_pods = match self.watch_pods.unwrap_or_default() {
            WatchPods::Auto => settings.mesh.route_source == RouteSource::WorkloadIps,
            WatchPods::Always => true,
            WatchPods::Never => {
                if settings.mesh.route_source == RouteSource::WorkloadIps {
                    return Err(invalid(
                        "watch_pods",
                        "false",
                        "route_source workload_ips takes its destinations from pods",
                    ));
                }
                false
            }
        };
        let label = match &self.control_plane.node_label {
            None => Some(CONTROL_PLANE_LABEL.to_owned()),
            Some(l) => l.clone().filter(|l| !l.is_empty()),
        };
        settings.adapter = AdapterOptions::default()
            .with_calico_annotations(self.calico_annotations.unwrap_or(false))
            .with_control_plane_label(label.clone())
            .with_limits_of(&settings.mesh);
        let port = ranged(
            "control_plane.port",
            self.control_plane.port,
            6443,
            1,
            65535,
        )? as u16;
        let mut fixed = Vec::new();
        if self.control_plane.service.unwrap_or(true)
            && let (Some(host), Some(p)) = (
                env("KUBERNETES_SERVICE_HOST"),
                env("KUBERNETES_SERVICE_PORT"),
            )
        {
            let ip: IpAddr = host
                .trim()
                .parse()
                .map_err(|_| invalid("KUBERNETES_SERVICE_HOST", &host, "not an IP address"))?;
            let p: u16 = p
                .trim()
                .parse()
                .map_err(|_| invalid("KUBERNETES_SERVICE_PORT", &p, "not a port"))?;
            fixed.push(SocketAddr::new(ip, p));
        }
        settings.control_plane = ControlPlaneEndpoints::new(fixed, label.map(|_| port));
        settings.debounce =
            Duration::from_millis(ranged("debounce_ms", self.debounce_ms, 100, 0, 60_000)?);
        // By default a change waits at most the debounce (a batch every debounce_ms while
        // changes keep coming).
        let debounce_ms = settings.debounce.as_millis() as u64;
        settings.max_delay = Duration::from_millis(ranged(
            "max_delay_ms",
            self.max_delay_ms,
            debounce_ms,
            0,
            600_000,
        )?);
        if settings.max_delay < settings.debounce {
            return Err(invalid(
                "max_delay_ms",
                settings.max_delay.as_millis(),
                "must not be less than debounce_ms",
            ));
        }
        settings.resync_interval = Duration::from_secs(ranged(
            "resync_seconds",
            self.resync_seconds,
            90,
            5,
            86_400,
        )?);
        let max = ranged(
            "publish_backoff_max_seconds",
            self.publish_backoff_max_seconds,
            60,
            1,
            3600,
        )?;
        settings.publish_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(max));
        if let Some(text) = self.key_rotation_interval.as_deref() {
            settings.rotation.interval = Some(rotation_interval(text)?);
        }
        settings.rotation.max_concurrent = ranged(
            "key_rotation_max_concurrent",
            self.key_rotation_max_concurrent,
            1,
            1,
            10_000,
        )? as usize;
        settings.rotation.settle = Duration::from_secs(ranged(
            "key_rotation_settle_seconds",
            self.key_rotation_settle_seconds,
            10,
            0,
            3600,
        )?);
        settings.rotation.announcement_limit = Duration::from_secs(ranged(
            "key_rotation_announcement_limit_seconds",
            self.key_rotation_announcement_limit_seconds,
            crate::rotation::DEFAULT_ANNOUNCEMENT_LIMIT
                .as_secs()
                .max(settings.rotation.settle.as_secs()),
            settings.rotation.settle.as_secs().max(60) as i64,
            7 * 86_400,
        )?);
        settings.underlay_mtu = match self.underlay_mtu {
            None => None,
            Some(v) => {
                let min = i64::from(wgmesh_core::Family::V4.min_mtu() + 60);
                Some(ranged("underlay_mtu", Some(v), 0, min, 65535)? as u32)
            }
        };
        settings.phase.grace = Duration::from_secs(ranged(
            "phase_grace_seconds",
            self.phase_grace_seconds,
            crate::phase::DEFAULT_GRACE.as_secs(),
            10,
            3600,
        )?);
        let grace = settings.phase.grace.as_secs();
        settings.phase.settle = Duration::from_secs(ranged(
            "phase_settle_seconds",
            self.phase_settle_seconds,
            crate::phase::DEFAULT_SETTLE.as_secs().min(grace / 2),
            0,
            grace as i64 - 1,
        )?);
        let health_address = address(
            "health_address",
            self.health_address.as_deref(),
            Some(DEFAULT_HEALTH_ADDRESS),
        )?;
        let metrics_address = address("metrics_address", self.metrics_address.as_deref(), None)?;
        settings.per_peer_metrics = self.metrics_per_peer.unwrap_or(true);
        let private_key_file = PathBuf::from(
            self.private_key_file
                .clone()
                .unwrap_or_else(|| DEFAULT_PRIVATE_KEY_FILE.to_owned()),
        );
        if private_key_file.as_os_str().is_empty() {
            return Err(invalid("private_key_file", "", "must not be empty"));
        }
        let leave_file = match self.leave_file.as_deref() {
            Some("") => return Err(invalid("leave_file", "", "must not be empty")),
            Some(path) => PathBuf::from(path),
            None => private_key_file.with_file_name("leave"),
        };
        settings.leave_file = Some(leave_file);
        let backend = match self.backend.as_deref() {
            None => wgmesh_netlink::Backend::Auto,
            Some(text) => text
                .parse()
                .map_err(|e: wgmesh_netlink::ParseBackendError| {
                    invalid("backend", text, &e.to_string())
                })?,
        };
        Ok(AgentConfig {
            backend,
            settings,
            private_key_file,
            health_address,
            metrics_address,
            log_format: self.log_format.unwrap_or_default(),
            dry_run: self.dry_run.unwrap_or(false),
        })
    }
}
