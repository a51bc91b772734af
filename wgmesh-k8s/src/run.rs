//! The thin async shell around [`Agent`]: kube-runtime watchers for Nodes and Pods, a timer
//! for the agent's deadlines, and the writes it asks for: key publications, the Node
//! condition, Events.
//!
//! Everything that decides lives in [`Agent`]; this loop only moves events in and requests
//! out, so it is tested end to end against a mock API server (see the crate's tests).

use std::future::Future;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    Node as K8sNode, NodeSpec, NodeStatus, Pod, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::agent::{Agent, AgentSettings, Publication, Resource};
use crate::dataplane::{Dataplane, ResyncOutcome};
use crate::metrics::Metrics;
use crate::publish::publish;
use crate::status::{CONDITION_TYPE, Notice, StatusUpdate, send_notice, write_condition};

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

/// Keeps what the agent reads of a Node, and drops the rest (images, managed fields, other
/// conditions than wgmesh's own): the watch cache of a large cluster stays small.
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
    let conditions: Vec<_> = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ == CONDITION_TYPE)
        .collect();
    node.status = Some(NodeStatus {
        addresses: status.addresses,
        conditions: (!conditions.is_empty()).then_some(conditions),
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

/// A Pod as the agent reads it from its watch: the fields [`strip_pod`] keeps, and no others
/// (`metadata` keeps its name, namespace, uid, resource version and deletion time).
///
/// Deserializing a watch event into a full [`Pod`] builds every container, condition,
/// label and managed field of a 2.5 KB AKS Pod before [`strip_pod`] throws them away; this
/// type makes serde skip them instead (they are still read, never stored). The adapter
/// reads the same [`Pod`] as before ([`LeanPod::into_pod`]), so its checks of untrusted
/// fields do not change.
///
/// ```
/// use wgmesh_k8s::run::LeanPod;
/// let pod: LeanPod = serde_json::from_value(serde_json::json!({
///     "metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}},
///     "spec": {"nodeName": "node-a", "containers": [{"name": "web", "image": "nginx"}]},
///     "status": {"phase": "Running", "podIPs": [{"ip": "10.240.0.5"}]}}))?;
/// let pod = pod.into_pod();
/// assert_eq!(pod.metadata.name.as_deref(), Some("web-1"));
/// assert!(pod.metadata.labels.is_none());
/// assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("node-a"));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct LeanPod {
    #[serde(default, deserialize_with = "lean_meta")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<LeanPodSpec>,
    #[serde(default)]
    status: Option<LeanPodStatus>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPodSpec {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: Option<bool>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPodStatus {
    #[serde(default)]
    phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Option<Vec<PodIP>>,
}

fn lean_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        resource_version: Option<String>,
        #[serde(default)]
        deletion_timestamp: Option<Time>,
    }
    let m = <Option<Meta> as serde::Deserialize>::deserialize(d)?;
    Ok(m.map(|m| ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    })
    .unwrap_or_default())
}

impl LeanPod {
    /// The [`Pod`] the adapter reads: what [`strip_pod`] would have kept of the full object
    /// (of its metadata: name, namespace, uid, resource version, deletion time).
    pub fn into_pod(self) -> Pod {
        let spec = self.spec.unwrap_or_default();
        let status = self.status.unwrap_or_default();
        Pod {
            metadata: self.metadata,
            spec: Some(PodSpec {
                node_name: spec.node_name,
                host_network: spec.host_network,
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: status.phase,
                pod_ip: status.pod_ip,
                pod_ips: status.pod_ips,
                ..PodStatus::default()
            }),
        }
    }
}

impl kube::Resource for LeanPod {
    type DynamicType = ();
    type Scope = <Pod as kube::Resource>::Scope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        <Pod as kube::Resource>::kind(dt)
    }

    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        <Pod as kube::Resource>::group(dt)
    }

    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        <Pod as kube::Resource>::version(dt)
    }

    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        <Pod as kube::Resource>::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn into_pod_event(e: watcher::Event<LeanPod>) -> watcher::Event<Pod> {
    match e {
        watcher::Event::Apply(p) => watcher::Event::Apply(p.into_pod()),
        watcher::Event::Delete(p) => watcher::Event::Delete(p.into_pod()),
        watcher::Event::InitApply(p) => watcher::Event::InitApply(p.into_pod()),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

type Events<K> =
    std::pin::Pin<Box<dyn Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>>;

/// The longest wait between two attempts of a watch ([`WatchBackoff`]).
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The watches' retry delays: 0.8 s doubling up to [`WATCH_BACKOFF_MAX`], each shortened by
/// up to half (drawn from the node's name and the attempt: agents that lose the API server
/// together retry apart), from the start again after a success.
///
/// kube-runtime's default (client-go's) goes up to 30 s. After an API outage a watch then
/// waits up to 30 s to find the server back, and as long again after the `410 Gone` that
/// sends it to relist (an error: the backoff is not reset) — most of the 118 s re-convergence
/// measured after a 60 s outage at 5,000 nodes (BENCHMARKS.md).
///
/// ```
/// use std::time::Duration;
/// use wgmesh_k8s::run::{WATCH_BACKOFF_MAX, WatchBackoff};
/// let delays: Vec<Duration> = WatchBackoff::new("node-a").take(8).collect();
/// assert!(delays[0] <= Duration::from_millis(800));
/// assert!(delays.iter().all(|d| *d <= WATCH_BACKOFF_MAX && *d >= Duration::from_millis(400)));
/// assert!(delays[7] >= WATCH_BACKOFF_MAX / 2);
/// assert_ne!(delays, WatchBackoff::new("node-b").take(8).collect::<Vec<_>>());
/// ```
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    backoff: crate::agent::Backoff,
    seed: String,
    failures: u32,
}

impl WatchBackoff {
    /// The backoff of `node`'s watches.
    pub fn new(node: &str) -> Self {
        Self {
            backoff: crate::agent::Backoff::new(Duration::from_millis(800), WATCH_BACKOFF_MAX),
            seed: node.to_owned(),
            failures: 0,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        Some(self.backoff.jittered(self.failures, &self.seed))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

fn node_events(client: &Client, node: &str) -> Events<K8sNode> {
    let api: Api<K8sNode> = Api::all(client.clone());
    watcher(api, watcher::Config::default())
        .backoff(WatchBackoff::new(node))
        .map_ok(|e| e.modify(strip_node))
        .boxed()
}

fn pod_events(client: &Client, watch: bool, node: &str) -> Events<Pod> {
    if !watch {
        return futures::stream::pending().boxed();
    }
    // Read as `LeanPod`: serde skips what `strip_pod` would drop (see `LeanPod`).
    let api: Api<LeanPod> = Api::all(client.clone());
    watcher(api, watcher::Config::default().fields(POD_FIELD_SELECTOR))
        .backoff(WatchBackoff::new(node))
        .map_ok(into_pod_event)
        .boxed()
}

/// [`crate::daemon::release_free_memory`], timed: it holds each malloc arena's lock while
/// it walks it.
fn release_free_memory(when: &str) {
    let started = std::time::Instant::now();
    let released = crate::daemon::release_free_memory();
    let micros = started.elapsed().as_micros() as u64;
    debug!(
        released,
        micros, when, "gave free memory back to the system"
    );
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
    // Each watch is read on a task of its own, a batch ahead: the next list page is fetched
    // and parsed while the agent takes in the one before (at 5,000 nodes × 110 pods, a
    // restart's list is 1.4 GB of JSON; read in turn with the agent's work, it was most of
    // the time to the first apply).
    let mut nodes = ReadAhead::spawn(node_events(&client, &settings.node_name), BATCH);
    let mut pods = ReadAhead::spawn(
        pod_events(&client, settings.watch_pods, &settings.node_name),
        BATCH,
    );
    info!(
        node = %settings.node_name,
        watch_pods = settings.watch_pods,
        route_source = settings.mesh.route_source.as_str(),
        host_encryption = settings.mesh.host_encryption,
        enabled = settings.mesh.enabled,
        "agent starting"
    );
    let reporter = Reporter {
        controller: "wgmesh-agent".to_owned(),
        instance: Some(settings.node_name.clone()),
    };
    let notices = spawn_notices(Recorder::new(client.clone(), reporter));
    let leave_file = settings.leave_file.clone();
    let mut agent = Agent::new(settings, dataplane, metrics);
    // Read before the first step, so an agent restarted mid-leave never joins first.
    if let Some(path) = &leave_file {
        agent.on_leave_request(leave_requested(path), Instant::now().into_std());
    }
    let mut leave_check = tokio::time::interval(LEAVE_CHECK_INTERVAL);
    leave_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut publishing: Option<JoinHandle<Result<(), String>>> = None;
    let mut writing: Option<JoinHandle<(StatusUpdate, Result<Time, String>)>> = None;
    // A resync's reading and diffing, on a thread of the blocking pool (see
    // `Agent::take_background_resync`): events keep flowing meanwhile.
    let mut resyncing: Option<JoinHandle<ResyncOutcome>> = None;
    tokio::pin!(shutdown);
    loop {
        let now = Instant::now().into_std();
        if let Some(p) = blocking(|| agent.poll(now)) {
            publishing = Some(spawn_publish(client.clone(), p));
        }
        for notice in agent.take_notices() {
            if notices.try_send(notice).is_err() {
                debug!("the Event queue is full; an Event was dropped");
            }
        }
        if resyncing.is_none()
            && let Some(job) = agent.take_background_resync()
        {
            // Free memory goes back to the system before the job, from this thread (what
            // the last full apply freed: mimalloc collects the calling thread's heap), and
            // after it, from the job's (see `daemon::release_free_memory`).
            release_free_memory("before a resync");
            resyncing = Some(tokio::task::spawn_blocking(move || {
                let found = job.run();
                release_free_memory("after a resync");
                found
            }));
        }
        if writing.is_none()
            && let Some(update) = agent.take_status_update()
        {
            writing = Some(spawn_status(client.clone(), update));
        }
        let wake = agent
            .next_wakeup(Instant::now().into_std())
            .map(Instant::from_std);
        tokio::select! {
            batch = nodes.next_batch() => {
                let now = Instant::now().into_std();
                let Some(batch) = batch else {
                    return Err(RunError::WatchEnded("Node"));
                };
                for event in batch {
                    match event {
                        Ok(e) => agent.on_nodes(e, now),
                        Err(e) => agent.on_watch_error(Resource::Nodes, &e.to_string(), now),
                    }
                }
            }
            batch = pods.next_batch() => {
                let now = Instant::now().into_std();
                let Some(batch) = batch else {
                    return Err(RunError::WatchEnded("Pod"));
                };
                // One pass of the loop's bookkeeping per batch, not per pod.
                for event in batch {
                    match event {
                        Ok(e) => agent.on_pods(e, now),
                        Err(e) => agent.on_watch_error(Resource::Pods, &e.to_string(), now),
                    }
                }
            }
            result = finished(publishing.as_mut()) => {
                publishing = None;
                let result = result.unwrap_or_else(|e| Err(format!("publication task failed: {e}")));
                agent.on_published(result, Instant::now().into_std());
            }
            written = finished(writing.as_mut()) => {
                writing = None;
                if let Ok((update, result)) = written {
                    agent.on_status_written(&update, result, Instant::now().into_std());
                }
            }
            found = finished(resyncing.as_mut()) => {
                resyncing = None;
                let now = Instant::now().into_std();
                blocking(|| agent.on_resync_found(found.ok(), now));
            }
            _ = leave_check.tick(), if leave_file.is_some() => {
                if let Some(path) = &leave_file {
                    let requested = leave_requested(path);
                    agent.on_leave_request(requested, Instant::now().into_std());
                }
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

/// Events taken in one pass of the run loop when they are ready at once. Each pass polls
/// the agent (timers, the condition's schedule, the key check, the state gauges); once per
/// pod, that was 550,000 passes per relist at 5,000 nodes × 110 pods.
const BATCH: usize = 512;

/// How many batches a watch's task may hold ready beyond the one being handled (a list page
/// is 500 pods).
const READ_AHEAD: usize = 2;

/// A stream read on a task of its own, in batches of what is ready at once; the task ends
/// when the stream ends or this is dropped.
struct ReadAhead<T> {
    batches: mpsc::Receiver<Vec<T>>,
    task: JoinHandle<()>,
}

impl<T: Send + 'static> ReadAhead<T> {
    fn spawn<S>(mut stream: S, max: usize) -> Self
    where
        S: Stream<Item = T> + Unpin + Send + 'static,
    {
        let (tx, batches) = mpsc::channel(READ_AHEAD);
        let task = tokio::spawn(async move {
            while let Some(first) = stream.next().await {
                let mut batch = vec![first];
                let mut ended = false;
                while batch.len() < max.max(1) {
                    match stream.next().now_or_never() {
                        Some(Some(item)) => batch.push(item),
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                if tx.send(batch).await.is_err() || ended {
                    return;
                }
            }
        });
        Self { batches, task }
    }

    /// The next batch (never empty), or `None` once the stream has ended (cancel-safe).
    async fn next_batch(&mut self) -> Option<Vec<T>> {
        self.batches.recv().await
    }
}

impl<T> Drop for ReadAhead<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often the shell looks for [`AgentSettings::leave_file`].
pub const LEAVE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Whether the leave file is there (an unreadable directory counts as no request: the agent
/// never leaves by accident).
/// (One `stat`: not worth a thread of the blocking pool.)
fn leave_requested(path: &std::path::Path) -> bool {
    path.try_exists().unwrap_or(false)
}

/// The result of a task in flight, or never when there is none (for a `select!` branch).
async fn finished<T>(task: Option<&mut JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(h) => h.await,
        None => std::future::pending().await,
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

fn spawn_status(
    client: Client,
    update: StatusUpdate,
) -> JoinHandle<(StatusUpdate, Result<Time, String>)> {
    tokio::spawn(async move {
        let result =
            match tokio::time::timeout(PUBLISH_TIMEOUT, write_condition(client, &update)).await {
                Ok(Ok(since)) => Ok(since),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("timed out after {PUBLISH_TIMEOUT:?}")),
            };
        (update, result)
    })
}

/// How many Events may wait to be sent; more are dropped (they are rate-limited by the agent
/// already: one per change of state).
const NOTICE_QUEUE: usize = 64;

/// A task that sends Events one at a time, in order; a failure is logged and forgotten.
fn spawn_notices(recorder: Recorder) -> mpsc::Sender<Notice> {
    let (tx, mut rx) = mpsc::channel::<Notice>(NOTICE_QUEUE);
    tokio::spawn(async move {
        while let Some(notice) = rx.recv().await {
            match tokio::time::timeout(PUBLISH_TIMEOUT, send_notice(&recorder, &notice)).await {
                Ok(Ok(())) => debug!(reason = notice.reason, "sent an Event"),
                Ok(Err(e)) => warn!(reason = notice.reason, error = %e, "sending an Event failed"),
                Err(_) => warn!(reason = notice.reason, "sending an Event timed out"),
            }
        }
    });
    tx
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every item is handed out once, in order, in batches of at most `max` (taking one
    /// more than a batch holds lost it: 293 pod addresses of a 2,000-node relist); then the
    /// end.
    #[tokio::test]
    async fn read_ahead_loses_nothing() {
        let mut read = ReadAhead::spawn(futures::stream::iter(0..1_300), 512);
        let mut seen = Vec::new();
        while let Some(batch) = read.next_batch().await {
            assert!(!batch.is_empty() && batch.len() <= 512, "{}", batch.len());
            seen.extend(batch);
        }
        assert_eq!(seen, (0..1_300).collect::<Vec<_>>());
    }

    /// Only what is ready: what comes later is a batch of its own, and a stream that has
    /// not ended gives no end.
    #[tokio::test]
    async fn a_pending_stream_ends_the_batch() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut read = ReadAhead::spawn(rx, 512);
        tx.unbounded_send(7).unwrap();
        assert_eq!(read.next_batch().await, Some(vec![7]));
        tx.unbounded_send(8).unwrap();
        tx.unbounded_send(9).unwrap();
        assert_eq!(read.next_batch().await, Some(vec![8, 9]));
        let later = tokio::time::timeout(Duration::from_millis(50), read.next_batch()).await;
        assert!(later.is_err(), "{later:?}");
        drop(tx);
        assert_eq!(read.next_batch().await, None);
    }

    /// Dropping the reader ends its task (the watch's connection is not left open).
    #[tokio::test]
    async fn dropping_the_reader_ends_its_task() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<u32>();
        let read = ReadAhead::spawn(rx, 512);
        tokio::task::yield_now().await;
        drop(read);
        for _ in 0..100 {
            if tx.is_closed() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the task still holds the stream");
    }
}
