//! The thin async shell around [`Agent`]: kube-runtime watchers for Nodes and Pods, a timer
//! for the agent's deadlines, and the publications it asks for.
//!
//! Everything that decides lives in [`Agent`]; this loop only moves events in and requests
//! out, so it is tested end to end against a mock API server (see the crate's tests).

use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node as K8sNode, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::agent::{Agent, AgentSettings, Publication, Resource};
use crate::dataplane::Dataplane;
use crate::metrics::Metrics;
use crate::publish::publish;

/// How long one publication may take.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// The field selector of the Pod watch: finished pods are not sent (and a pod that finishes
/// is sent as deleted).
pub const POD_FIELD_SELECTOR: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A watch stream ended, which kube-runtime's watchers never do on their own.
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
}

/// Keeps what the agent reads of a Node, and drops the rest (images, conditions, managed
/// fields): the watch cache of a large cluster stays small.
pub fn strip_node(node: &mut K8sNode) {
    node.metadata.managed_fields = None;
    node.metadata.owner_references = None;
    let spec = node.spec.take().unwrap_or_default();
    node.spec = Some(NodeSpec {
        pod_cidr: spec.pod_cidr,
        pod_cidrs: spec.pod_cidrs,
        ..NodeSpec::default()
    });
    let status = node.status.take().unwrap_or_default();
    node.status = Some(NodeStatus {
        addresses: status.addresses,
        ..NodeStatus::default()
    });
}

/// Keeps what the agent reads of a Pod (node, host network, phase, addresses).
pub fn strip_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.owner_references = None;
    pod.metadata.labels = None;
    pod.metadata.annotations = None;
    let spec = pod.spec.take().unwrap_or_default();
    pod.spec = Some(PodSpec {
        node_name: spec.node_name,
        host_network: spec.host_network,
        ..PodSpec::default()
    });
    let status = pod.status.take().unwrap_or_default();
    pod.status = Some(PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..PodStatus::default()
    });
}

type Events<K> =
    std::pin::Pin<Box<dyn Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>>;

fn node_events(client: &Client) -> Events<K8sNode> {
    let api: Api<K8sNode> = Api::all(client.clone());
    watcher(api, watcher::Config::default())
        .default_backoff()
        .map_ok(|e| e.modify(strip_node))
        .boxed()
}

fn pod_events(client: &Client, watch: bool) -> Events<Pod> {
    if !watch {
        return futures::stream::pending().boxed();
    }
    let api: Api<Pod> = Api::all(client.clone());
    watcher(api, watcher::Config::default().fields(POD_FIELD_SELECTOR))
        .default_backoff()
        .map_ok(|e| e.modify(strip_pod))
        .boxed()
}

/// Runs `f` where blocking is allowed: dataplane calls are synchronous (netlink), so on a
/// multi-threaded runtime the worker hands its other tasks off first.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Runs the agent until `shutdown` completes (or a watch ends).
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use wgmesh_core::MeshConfig;
/// use wgmesh_k8s::{agent::AgentSettings, dataplane::LoggingDataplane, metrics::Metrics, run::run};
/// let client = kube::Client::try_default().await?;
/// let settings = AgentSettings::new("node-a", MeshConfig::default());
/// let key = wgmesh_core::PrivateKey::generate().public_key();
/// run(client, settings, LoggingDataplane::new(Some(key), None), Metrics::new(),
///     std::future::pending()).await?;
/// # Ok(()) }
/// ```
pub async fn run<D>(
    client: Client,
    settings: AgentSettings,
    dataplane: D,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError>
where
    D: Dataplane + Send + 'static,
{
    let mut nodes = node_events(&client);
    let mut pods = pod_events(&client, settings.watch_pods);
    info!(
        node = %settings.node_name,
        watch_pods = settings.watch_pods,
        route_source = settings.mesh.route_source.as_str(),
        host_encryption = settings.mesh.host_encryption,
        enabled = settings.mesh.enabled,
        "agent starting"
    );
    let mut agent = Agent::new(settings, dataplane, metrics);
    let mut publishing: Option<JoinHandle<Result<(), String>>> = None;
    tokio::pin!(shutdown);
    loop {
        let now = Instant::now().into_std();
        if let Some(p) = blocking(|| agent.poll(now)) {
            publishing = Some(spawn_publish(client.clone(), p));
        }
        let wake = agent
            .next_wakeup(Instant::now().into_std())
            .map(Instant::from_std);
        tokio::select! {
            event = nodes.next() => {
                let now = Instant::now().into_std();
                match event {
                    Some(Ok(e)) => agent.on_nodes(e, now),
                    Some(Err(e)) => agent.on_watch_error(Resource::Nodes, &e.to_string(), now),
                    None => return Err(RunError::WatchEnded("Node")),
                }
            }
            event = pods.next() => {
                let now = Instant::now().into_std();
                match event {
                    Some(Ok(e)) => agent.on_pods(e, now),
                    Some(Err(e)) => agent.on_watch_error(Resource::Pods, &e.to_string(), now),
                    None => return Err(RunError::WatchEnded("Pod")),
                }
            }
            result = async {
                match publishing.as_mut() {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            } => {
                publishing = None;
                let result = result.unwrap_or_else(|e| Err(format!("publication task failed: {e}")));
                agent.on_published(result, Instant::now().into_std());
            }
            () = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {}
            () = &mut shutdown => {
                info!("agent stopping");
                if let Some(h) = publishing {
                    h.abort();
                }
                return Ok(());
            }
        }
    }
}

fn spawn_publish(client: Client, publication: Publication) -> JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish(client, &publication)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                warn!(node = %publication.node, error = %e, "publication failed");
                Err(e.to_string())
            }
            Err(_) => Err(format!("publication timed out after {PUBLISH_TIMEOUT:?}")),
        }
    })
}

/// Completes on SIGTERM (what the kubelet sends) or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM"),
                _ = int.recv() => info!("SIGINT"),
            }
        }
        _ => {
            warn!("cannot listen for signals; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

/// Reaps every child process that has exited, without blocking; returns their pids.
///
/// Only for a process that owns all its children's exits (PID 1): a child whose exit status
/// someone else waits for (a `std::process::Command`) may be reaped here first.
pub fn reap_exited_children() -> Vec<i32> {
    let mut reaped = Vec::new();
    // `Ok(None)`: children remain, none has exited; `Err`: no children (ECHILD).
    while let Ok(Some((pid, _))) =
        rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG)
    {
        reaped.push(pid.as_raw_nonzero().get());
    }
    reaped
}

/// When the agent is its container's PID 1, reaps exited children every `interval`, forever;
/// otherwise returns at once.
///
/// PID 1 inherits every orphan of its PID namespace, and userspace WireGuard daemons are
/// orphans by design: `wireguard-go IFNAME` forks the daemon into the background and exits.
/// A daemon that ends (its interface deleted) then stays a zombie until PID 1 waits for it.
/// `wgmesh-netlink` tolerates its own launcher being reaped here first (it waits for the
/// daemon's socket, not for the launcher's status).
pub async fn reap_orphans_if_init(interval: Duration) {
    if !rustix::process::getpid().is_init() {
        return;
    }
    info!(?interval, "running as PID 1: reaping orphaned children");
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for pid in reap_exited_children() {
            tracing::debug!(pid, "reaped an exited child");
        }
    }
}
