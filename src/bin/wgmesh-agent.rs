//! `wgmesh-agent`: the node agent, one per node (the DaemonSet in `deploy/`). It watches Nodes
//! (and Pods, for `workload_ips`), publishes this node's public key on its Node, keeps the
//! node's WireGuard mesh equal to the plan, and reports on its Node (Events and the
//! `WireGuardMeshReady` condition).
//!
//! Configuration: a file (`--config`), then flags and `WGMESH_*` / `NODE_NAME` environment
//! variables over it (`wgmesh_k8s::config`). Bad configuration exits with code 2 and one line
//! naming the field; `--check-config` prints the configuration in effect and exits.
//!
//! `wgmesh-agent leave` asks the agent running on this node to leave the mesh in phases (it
//! writes the leave file, `leave` beside the key file, which survives restarts);
//! `wgmesh-agent rejoin` takes that back. Both use the same configuration as the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use wgmesh::k8s::config::{ConfigSpec, LogFormat, WatchPods};
use wgmesh::k8s::metrics::BuildInfo;
use wgmesh::k8s::{daemon, logging, tokio, tracing};

mod shared;

/// The static (musl) build's allocator, the image's: with musl's own malloc a restart at
/// 5,000 nodes × 110 pods took 1.5-2 times as long as with glibc's (BENCHMARKS.md, "Eighth round").
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What `daemon::release_free_memory` does with mimalloc: without it, the agent's process
/// stayed 150 MB above its live heap after background resyncs (BENCHMARKS.md, "Ninth round").
#[cfg(target_env = "musl")]
#[allow(unsafe_code)]
fn mimalloc_collect() -> bool {
    // SAFETY: mi_collect takes a flag and only frees and purges mimalloc's own free memory
    // (the calling thread's heap, abandoned pages, the arenas' purgeable ranges).
    unsafe { libmimalloc_sys::mi_collect(true) };
    true
}

use shared::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    True,
    False,
}

impl From<Switch> for bool {
    fn from(s: Switch) -> bool {
        s == Switch::True
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Pods {
    Auto,
    True,
    False,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Json,
    Text,
}

/// The wgmesh node agent: keeps this node's WireGuard mesh equal to the cluster's plan.
///
/// Flags and environment variables override the configuration file.
#[derive(Debug, Parser)]
#[command(name = "wgmesh-agent", version = shared::VERSION)]
struct Args {
    /// The configuration file (YAML or JSON).
    #[arg(long, short, value_name = "FILE", env = "WGMESH_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,
    /// The private key file (mode 0600; generated when absent).
    #[arg(long, value_name = "PATH", env = "WGMESH_PRIVATE_KEY_FILE")]
    private_key_file: Option<String>,
    /// Which WireGuard: the kernel's, wireguard-go, or the kernel's when it has it.
    #[arg(long, value_name = "auto|kernel|userspace", env = "WGMESH_BACKEND")]
    backend: Option<String>,
    /// Log plans, program nothing.
    #[arg(long, env = "WGMESH_DRY_RUN")]
    dry_run: bool,
    /// The host's endpoint (/healthz, /readyz, /metrics); "" turns it off.
    #[arg(long, value_name = "ADDR:PORT", env = "WGMESH_HEALTH_ADDRESS")]
    health_address: Option<String>,
    /// The endpoint for Prometheus (/metrics only); "" turns it off.
    #[arg(long, value_name = "ADDR:PORT", env = "WGMESH_METRICS_ADDRESS")]
    metrics_address: Option<String>,
    /// Per-peer metric series (they grow with the square of the cluster).
    #[arg(
        long,
        value_enum,
        value_name = "true|false",
        env = "WGMESH_METRICS_PER_PEER"
    )]
    metrics_per_peer: Option<Switch>,
    /// The log format.
    #[arg(long, value_enum, env = "WGMESH_LOG_FORMAT")]
    log_format: Option<Format>,
    /// Seconds between full resyncs.
    #[arg(long, value_name = "N", env = "WGMESH_RESYNC_SECONDS")]
    resync_seconds: Option<i64>,
    /// Where destinations come from: cidr_blocks or workload_ips (Azure CNI).
    #[arg(long, value_name = "SOURCE", env = "WGMESH_ROUTE_SOURCE")]
    route_source: Option<String>,
    /// Encrypt host-to-host traffic too.
    #[arg(
        long,
        value_enum,
        value_name = "true|false",
        env = "WGMESH_HOST_ENCRYPTION"
    )]
    host_encryption: Option<Switch>,
    /// The mesh on (false: remove everything wgmesh programmed, publish no key).
    #[arg(long, value_enum, value_name = "true|false", env = "WGMESH_ENABLED")]
    enabled: Option<Switch>,
    /// Also read Calico's key annotations.
    #[arg(
        long,
        value_enum,
        value_name = "true|false",
        env = "WGMESH_CALICO_ANNOTATIONS"
    )]
    calico_annotations: Option<Switch>,
    /// Watch Pods: auto (iff workload_ips), true or false.
    #[arg(long, value_enum, env = "WGMESH_WATCH_PODS")]
    watch_pods: Option<Pods>,
    /// An API server endpoint kept outside the tunnel (repeatable; comma-separated in the
    /// environment).
    #[arg(
        long = "control-plane-endpoint",
        value_name = "ADDR:PORT",
        env = "WGMESH_CONTROL_PLANE_ENDPOINTS",
        value_delimiter = ','
    )]
    control_plane_endpoints: Vec<String>,
    /// Rotate the node's key this often ("30d", "12h", "90m"; at least one minute). Off unless
    /// set.
    #[arg(long, value_name = "DURATION", env = "WGMESH_KEY_ROTATION_INTERVAL")]
    key_rotation_interval: Option<String>,
    /// At most this many nodes announce a next key at once.
    #[arg(long, value_name = "N", env = "WGMESH_KEY_ROTATION_MAX_CONCURRENT")]
    key_rotation_max_concurrent: Option<i64>,
    /// Seconds to wait after the announcement came back before switching keys.
    #[arg(long, value_name = "N", env = "WGMESH_KEY_ROTATION_SETTLE_SECONDS")]
    key_rotation_settle_seconds: Option<i64>,
    /// Seconds another node's next-key announcement counts toward the bound after this agent
    /// first saw it (at least the settle time and 60).
    #[arg(
        long,
        value_name = "N",
        env = "WGMESH_KEY_ROTATION_ANNOUNCEMENT_LIMIT_SECONDS"
    )]
    key_rotation_announcement_limit_seconds: Option<i64>,
    /// Seconds another node's wgmesh.io/phase marker (leaving, joining) is honoured after
    /// this agent first saw it.
    #[arg(long, value_name = "N", env = "WGMESH_PHASE_GRACE_SECONDS")]
    phase_grace_seconds: Option<i64>,
    /// Seconds this node waits in a phase (leaving, joining) after its marker came back,
    /// less than the grace.
    #[arg(long, value_name = "N", env = "WGMESH_PHASE_SETTLE_SECONDS")]
    phase_settle_seconds: Option<i64>,
    /// The file whose presence makes this node leave the mesh (default: `leave` beside the
    /// private key file).
    #[arg(long, value_name = "PATH", env = "WGMESH_LEAVE_FILE")]
    leave_file: Option<String>,
    /// Print the configuration in effect (file, flags and environment merged) and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// One-shot commands for the operator, run on the node (`kubectl exec` into the agent's
/// pod there); without one, the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
enum Cmd {
    /// Make the agent on this node leave the mesh in phases: it publishes the leaving marker,
    /// waits the settle time while peers route to it plain, then removes its interface,
    /// routes and rules and withdraws its key. Writes the leave file; lasts across restarts.
    Leave,
    /// Take a leave back: the agent joins the mesh again in phases (removes the leave file).
    Rejoin,
}

impl Args {
    /// The file's configuration with the flags and environment laid over it.
    fn spec(&self) -> Result<ConfigSpec, Failure> {
        let mut spec = match &self.config {
            Some(path) => ConfigSpec::parse(&shared::read_input(path, "configuration file")?)
                .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?,
            None => ConfigSpec::default(),
        };
        let set = |slot: &mut Option<String>, v: &Option<String>| {
            if v.is_some() {
                slot.clone_from(v);
            }
        };
        set(&mut spec.node_name, &self.node_name);
        set(&mut spec.private_key_file, &self.private_key_file);
        set(&mut spec.backend, &self.backend);
        set(&mut spec.health_address, &self.health_address);
        set(&mut spec.metrics_address, &self.metrics_address);
        set(&mut spec.mesh.route_source, &self.route_source);
        set(&mut spec.key_rotation_interval, &self.key_rotation_interval);
        set(&mut spec.leave_file, &self.leave_file);
        if let Some(v) = self.phase_grace_seconds {
            spec.phase_grace_seconds = Some(v);
        }
        if let Some(v) = self.phase_settle_seconds {
            spec.phase_settle_seconds = Some(v);
        }
        if let Some(v) = self.key_rotation_max_concurrent {
            spec.key_rotation_max_concurrent = Some(v);
        }
        if let Some(v) = self.key_rotation_settle_seconds {
            spec.key_rotation_settle_seconds = Some(v);
        }
        if let Some(v) = self.key_rotation_announcement_limit_seconds {
            spec.key_rotation_announcement_limit_seconds = Some(v);
        }
        if self.dry_run {
            spec.dry_run = Some(true);
        }
        if let Some(v) = self.metrics_per_peer {
            spec.metrics_per_peer = Some(v.into());
        }
        if let Some(v) = self.host_encryption {
            spec.mesh.host_encryption = Some(v.into());
        }
        if let Some(v) = self.enabled {
            spec.mesh.enabled = Some(v.into());
        }
        if let Some(v) = self.calico_annotations {
            spec.calico_annotations = Some(v.into());
        }
        if let Some(v) = self.resync_seconds {
            spec.resync_seconds = Some(v);
        }
        if let Some(f) = self.log_format {
            spec.log_format = Some(match f {
                Format::Json => LogFormat::Json,
                Format::Text => LogFormat::Text,
            });
        }
        if let Some(p) = self.watch_pods {
            spec.watch_pods = Some(match p {
                Pods::Auto => WatchPods::Auto,
                Pods::True => WatchPods::Always,
                Pods::False => WatchPods::Never,
            });
        }
        spec.mesh
            .control_plane_endpoints
            .extend(self.control_plane_endpoints.iter().cloned());
        Ok(spec)
    }
}

/// Writes (leave) or removes (rejoin) the leave file, and says what the agent will do.
fn leave_request(cmd: Cmd, path: Option<&std::path::Path>) -> Result<(), Failure> {
    let path = path.ok_or_else(|| Failure::Input("no leave_file configured".to_owned()))?;
    let failed = |e: std::io::Error| Failure::Runtime(format!("{}: {e}", path.display()));
    match cmd {
        Cmd::Leave => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map_err(failed)?;
            writeln!(
                f,
                "leave requested by `wgmesh-agent leave`; `wgmesh-agent rejoin` takes it back"
            )
            .map_err(failed)?;
            println!(
                "{}: the agent leaves the mesh in phases within a few seconds (leaving marker, settle time, then the interface goes and the key is withdrawn)",
                path.display()
            );
        }
        Cmd::Rejoin => {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed(e)),
            }
            println!(
                "{}: removed; the agent joins the mesh again in phases",
                path.display()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Args = match shared::parse_args() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let spec = match args.spec() {
        Ok(s) => s,
        Err(f) => return f.report(),
    };
    let config = match spec.validate(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => return Failure::Input(e.to_string()).report(),
    };
    if args.check_config {
        return match shared::emit_json(&spec) {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => f.report(),
        };
    }
    if let Some(cmd) = args.command {
        return match leave_request(cmd, config.settings.leave_file.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => f.report(),
        };
    }
    logging::init(config.log_format);
    // Before the runtime's threads start (each could get a malloc arena of its own).
    let capped = daemon::limit_malloc_arenas();
    tracing::debug!(capped, arenas = daemon::MALLOC_ARENAS, "malloc arenas");
    #[cfg(target_env = "musl")]
    daemon::set_memory_release(mimalloc_collect);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let build = BuildInfo::new(env!("CARGO_PKG_VERSION"), env!("WGMESH_REVISION"));
    let result = match runtime {
        Ok(rt) => rt
            .block_on(daemon::run_agent(config, build))
            .map_err(|e| e.to_string()),
        Err(e) => Err(format!("cannot start the runtime: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            ExitCode::FAILURE
        }
    }
}
