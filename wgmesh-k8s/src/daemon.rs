//! The whole agent process, as the `wgmesh-agent` binary runs it: the dataplane chosen by the
//! configuration (the kernel over netlink, or only logs in a dry run), the API client, the
//! health and metrics endpoints, and [`run::run`] until SIGTERM.
//!
//! An application that embeds the agent calls [`run_agent`] with a validated
//! [`AgentConfig`]; one that brings its own dataplane or client calls
//! [`run::run`] directly.

use std::time::Duration;

use wgmesh_core::{PrivateKey, PublicKey};
use wgmesh_netlink::keys::{KeyOrigin, load, load_or_generate};
use wgmesh_netlink::{Linux, LinuxConfig};

use crate::config::AgentConfig;
use crate::dataplane::{Dataplane, LoggingDataplane};
use crate::metrics::{BuildInfo, Metrics};
use crate::netlink::NetlinkDataplane;
use crate::{http, run};

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The private key file could not be read or written.
    #[error("private key file {path}: {source}")]
    Key {
        /// The file.
        path: String,
        /// Why.
        source: wgmesh_netlink::Error,
    },
    /// The node's network stack could not be opened.
    #[error("cannot open the dataplane: {0}")]
    Dataplane(wgmesh_netlink::Error),
    /// No API client could be configured (no kubeconfig, not in a cluster).
    #[error("cannot configure the API client: {0}")]
    Client(kube::Error),
    /// An endpoint could not listen.
    #[error("{field} {address}: {source}")]
    Listen {
        /// `health_address` or `metrics_address`.
        field: &'static str,
        /// The address.
        address: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The agent's loop stopped.
    #[error(transparent)]
    Run(#[from] run::RunError),
}

/// The key this node uses in a dry run: an existing key file is read (it must be mode
/// 0600); a missing one is replaced by a key that is not saved.
fn dry_run_key(config: &AgentConfig) -> Result<PublicKey, DaemonError> {
    let path = &config.private_key_file;
    if path.exists() {
        return load(path)
            .map(|k| k.public_key())
            .map_err(|source| DaemonError::Key {
                path: path.display().to_string(),
                source,
            });
    }
    tracing::warn!(path = %path.display(), "no key file; dry run with a key that is not saved");
    Ok(PrivateKey::generate().public_key())
}

/// What programs the node: the kernel over netlink, or (dry run) nothing but the log.
pub fn dataplane(config: &AgentConfig) -> Result<Box<dyn Dataplane + Send>, DaemonError> {
    if config.dry_run {
        let key = dry_run_key(config)?;
        return Ok(Box::new(LoggingDataplane::new(Some(key), Some(key))));
    }
    // The key survives reboots in its file (mode 0600), so peers keep knowing it.
    let (key, origin) =
        load_or_generate(&config.private_key_file).map_err(|source| DaemonError::Key {
            path: config.private_key_file.display().to_string(),
            source,
        })?;
    if origin == KeyOrigin::Generated {
        tracing::info!(path = %config.private_key_file.display(), public_key = %key.public_key(), "generated a new private key");
    }
    let linux =
        Linux::open(LinuxConfig::with_backend(config.backend)).map_err(DaemonError::Dataplane)?;
    tracing::info!(backend = linux.backend_description(), "dataplane");
    // The key file's dataplane can rotate the key (`key_rotation_interval`); a next key a
    // rotation left on disk is picked up here.
    drop(key);
    let d = NetlinkDataplane::with_key_file(linux, &config.settings.mesh, &config.private_key_file)
        .map_err(|source| DaemonError::Key {
            path: config.private_key_file.display().to_string(),
            source,
        })?;
    if let Some(next) = d.next_public_key() {
        tracing::info!(next_public_key = %next, "a key rotation is under way: resuming it");
    }
    Ok(Box::new(d))
}

/// How many malloc arenas [`limit_malloc_arenas`] allows.
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc at [`MALLOC_ARENAS`] arenas, unless the environment sets
/// `MALLOC_ARENA_MAX` (which then wins); `wgmesh-agent` calls it first thing, before any
/// thread starts. glibc gives threads arenas of their own, up to eight per core, and memory
/// freed in one arena is not reused by another: at 5,000 nodes × 110 pods the agent's
/// process peaked about 40 MB higher with the default (BENCHMARKS.md, "Seventh round").
/// Returns whether the cap was set: never with another C library (the image's static
/// `wgmesh-agent` allocates with mimalloc instead of musl's malloc).
///
/// ```
/// let capped = wgmesh_k8s::daemon::limit_malloc_arenas();
/// assert_eq!(capped, cfg!(all(target_os = "linux", target_env = "gnu"))
///     && std::env::var_os("MALLOC_ARENA_MAX").is_none());
/// ```
pub fn limit_malloc_arenas() -> bool {
    std::env::var_os("MALLOC_ARENA_MAX").is_none() && set_malloc_arena_max(MALLOC_ARENAS)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_malloc_arena_max(arenas: i32) -> bool {
    use std::ffi::c_int;
    /// glibc's `M_ARENA_MAX` (malloc.h).
    const M_ARENA_MAX: c_int = -8;
    unsafe extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    // SAFETY: mallopt takes two integers and changes only malloc's own settings, under
    // malloc's lock; it returns 1 on success.
    unsafe { mallopt(M_ARENA_MAX, arenas) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_malloc_arena_max(_arenas: i32) -> bool {
    false
}

/// Gives the memory the allocator holds free back to the system; returns whether it did
/// anything. By default glibc's `malloc_trim(0)` (every arena; nothing with another C
/// library); a process with another global allocator says how with [`set_memory_release`]
/// (the image's `wgmesh-agent`: mimalloc's `mi_collect`). [`crate::run::run`] calls it on
/// the resync's thread before and after each background resync: glibc kept what a
/// restart's first apply freed (its heap peaks 70 MB above what stays at 5,000 nodes × 110
/// pods), and the resync, on another thread, allocates from another arena, which cannot
/// reuse that — the process grew by each resync's own peak (BENCHMARKS.md, "Ninth round").
///
/// ```
/// wgmesh_k8s::daemon::release_free_memory();
/// ```
pub fn release_free_memory() -> bool {
    match MEMORY_RELEASE.get() {
        Some(release) => release(),
        None => trim_malloc(),
    }
}

static MEMORY_RELEASE: std::sync::OnceLock<fn() -> bool> = std::sync::OnceLock::new();

/// Sets what [`release_free_memory`] does, for a process whose global allocator is not the C
/// library's malloc. Only the first call counts: returns whether this one did.
///
/// ```
/// fn collect() -> bool {
///     false // e.g. mimalloc's `mi_collect(true)`
/// }
/// wgmesh_k8s::daemon::set_memory_release(collect);
/// assert!(!wgmesh_k8s::daemon::release_free_memory());
/// ```
pub fn set_memory_release(release: fn() -> bool) -> bool {
    MEMORY_RELEASE.set(release).is_ok()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_malloc() -> bool {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes a byte count and only releases free pages of malloc's own
    // arenas, under their locks; it returns 1 when it released any.
    unsafe { malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_malloc() -> bool {
    false
}

/// Runs the agent until SIGTERM or SIGINT: the whole process of `wgmesh-agent`, on the
/// current tokio runtime (multi-threaded: dataplane calls block).
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use wgmesh_k8s::config::ConfigSpec;
/// use wgmesh_k8s::metrics::BuildInfo;
/// let config = ConfigSpec::read("/etc/wgmesh/agent.yaml")?
///     .validate(|k| std::env::var(k).ok())?;
/// wgmesh_k8s::daemon::run_agent(config, BuildInfo::new("my-agent 1.2.3", "")).await?;
/// # Ok(()) }
/// ```
pub async fn run_agent(config: AgentConfig, build: BuildInfo) -> Result<(), DaemonError> {
    // As its container's PID 1 the agent inherits the wireguard-go daemons it starts (they
    // fork into the background) and reaps them when they end; elsewhere this returns at once.
    tokio::spawn(run::reap_orphans_if_init(Duration::from_secs(5)));
    let dataplane = dataplane(&config)?;
    let client = kube::Client::try_default()
        .await
        .map_err(DaemonError::Client)?;
    let metrics = Metrics::new();
    metrics.set_build_info(build);
    let max_silence = config.settings.resync_interval * 3;
    for (field, address, routes) in [
        ("health_address", config.health_address, http::Routes::All),
        (
            "metrics_address",
            config.metrics_address,
            http::Routes::MetricsOnly,
        ),
    ] {
        let Some(address) = address else { continue };
        let listener = http::bind(address)
            .await
            .map_err(|source| DaemonError::Listen {
                field,
                address,
                source,
            })?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            http::serve(listener, metrics, max_silence, routes).await;
        });
        tracing::info!(%address, endpoint = field, "listening");
    }
    run::run(
        client,
        config.settings,
        dataplane,
        metrics,
        run::shutdown_signal(),
    )
    .await?;
    Ok(())
}
