//! Shared helpers: Kubernetes objects in the shape the API server sends, deterministic keys,
//! and a driver that runs the agent's state machine on a simulated clock.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node as K8sNode, Pod};
use kube::runtime::watcher::Event as WatchEvent;
use serde_json::{Value, json};
use wgmesh_core::{PrivateKey, PublicKey};
use wgmesh_k8s::agent::{Agent, Publication};
use wgmesh_k8s::dataplane::{Call, Dataplane, RecordingDataplane};

/// A deterministic private key.
pub fn private(seed: u8) -> PrivateKey {
    let mut bytes = [seed; 32];
    bytes[0] = seed.wrapping_mul(7).wrapping_add(1);
    PrivateKey::from_bytes(bytes).unwrap()
}

/// Its public key.
pub fn public(seed: u8) -> PublicKey {
    private(seed).public_key()
}

/// A Node as the API server sends it.
pub fn node(
    name: &str,
    ips: &[&str],
    cidrs: &[&str],
    annotations: &[(&str, &str)],
    labels: &[(&str, &str)],
) -> K8sNode {
    let mut addresses: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": name}));
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    let mut labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    labels.insert("kubernetes.io/hostname", name);
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": annotations, "labels": labels,
                     "resourceVersion": "1", "uid": format!("uid-{name}")},
        "spec": {"podCIDRs": cidrs},
        "status": {"addresses": addresses,
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap()
}

/// A node with one address, optional blocks and a wgmesh key.
pub fn wg_node(name: &str, ip: &str, cidrs: &[&str], key: Option<PublicKey>) -> K8sNode {
    let text = key.map(|k| k.to_base64());
    let annotations: Vec<(&str, &str)> = match &text {
        Some(t) => vec![("wgmesh.io/public-key", t.as_str())],
        None => vec![],
    };
    node(name, &[ip], cidrs, &annotations, &[])
}

/// Sets (or with `None` removes) an annotation.
pub fn annotate(mut n: K8sNode, key: &str, value: Option<&str>) -> K8sNode {
    let map = n.metadata.annotations.get_or_insert_with(Default::default);
    match value {
        Some(v) => {
            map.insert(key.to_owned(), v.to_owned());
        }
        None => {
            map.remove(key);
        }
    }
    n
}

/// A Pod as the API server sends it.
pub fn pod(ns: &str, name: &str, node: &str, ips: &[&str], phase: &str) -> Pod {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    let mut status = json!({"phase": phase, "podIPs": pod_ips});
    if let Some(first) = ips.first() {
        status["podIP"] = json!(first);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "1", "uid": format!("uid-{ns}-{name}")},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "nginx"}]},
        "status": status
    }))
    .unwrap()
}

/// A host-network Pod.
pub fn host_pod(ns: &str, name: &str, node: &str, ip: &str) -> Pod {
    let mut p = pod(ns, name, node, &[ip], "Running");
    p.spec.as_mut().unwrap().host_network = Some(true);
    p
}

/// The events of a complete list: Init, InitApply for each, InitDone.
pub fn relist<K: Clone>(items: &[K]) -> Vec<WatchEvent<K>> {
    let mut v = vec![WatchEvent::Init];
    v.extend(items.iter().cloned().map(WatchEvent::InitApply));
    v.push(WatchEvent::InitDone);
    v
}

/// Drives an agent on a simulated clock, playing the API server for its own Node: a
/// publication is answered (successfully, unless told otherwise) and its effect comes back
/// through the Node watch, as on a real cluster.
pub struct Driver<D = RecordingDataplane> {
    pub agent: Agent<D>,
    pub now: Instant,
    pub start: Instant,
    /// The API server's copy of every Node.
    pub nodes: BTreeMap<String, K8sNode>,
    /// Publications the agent asked for, with the time (since start) they were asked.
    pub publications: Vec<(Duration, Publication)>,
    /// Fail the next N publications.
    pub fail_publications: usize,
    /// Whether the echo of a publication comes back through the watch.
    pub echo: bool,
}

impl<D: Dataplane> Driver<D> {
    pub fn new(agent: Agent<D>) -> Self {
        let now = Instant::now();
        Self {
            agent,
            now,
            start: now,
            nodes: BTreeMap::new(),
            publications: Vec::new(),
            fail_publications: 0,
            echo: true,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The initial list of Nodes (and Pods, when given).
    pub fn start_with(&mut self, nodes: &[K8sNode], pods: &[Pod]) {
        for n in nodes {
            self.nodes
                .insert(n.metadata.name.clone().unwrap(), n.clone());
        }
        for ev in relist(nodes) {
            self.agent.on_nodes(ev, self.now);
        }
        for ev in relist(pods) {
            self.agent.on_pods(ev, self.now);
        }
    }

    /// A Node is created or modified.
    pub fn node(&mut self, n: K8sNode) {
        self.nodes
            .insert(n.metadata.name.clone().unwrap(), n.clone());
        self.agent.on_nodes(WatchEvent::Apply(n), self.now);
    }

    /// A Node is deleted.
    pub fn delete_node(&mut self, name: &str) {
        if let Some(n) = self.nodes.remove(name) {
            self.agent.on_nodes(WatchEvent::Delete(n), self.now);
        }
    }

    pub fn pod(&mut self, p: Pod) {
        self.agent.on_pods(WatchEvent::Apply(p), self.now);
    }

    pub fn delete_pod(&mut self, p: Pod) {
        self.agent.on_pods(WatchEvent::Delete(p), self.now);
    }

    /// Runs the agent's timers until `d` has passed.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            if let Some(p) = self.agent.poll(self.now) {
                self.answer(p);
                continue;
            }
            match self.agent.next_wakeup(self.now) {
                Some(t) if t <= end => self.now = t.max(self.now),
                _ => break,
            }
        }
        self.now = end;
        if let Some(p) = self.agent.poll(self.now) {
            self.answer(p);
        }
    }

    fn answer(&mut self, p: Publication) {
        self.publications.push((self.elapsed(), p.clone()));
        if self.fail_publications > 0 {
            self.fail_publications -= 1;
            self.agent
                .on_published(Err("503 Service Unavailable".into()), self.now);
            return;
        }
        self.agent.on_published(Ok(()), self.now);
        if !self.echo {
            return;
        }
        if let Some(mut n) = self.nodes.get(&p.node).cloned() {
            for (k, v) in &p.apply {
                n = annotate(n, k, Some(v));
            }
            for k in &p.remove {
                n = annotate(n, k, None);
            }
            self.node(n);
        }
    }

    pub fn key(&self, family: wgmesh_core::Family) -> Option<PublicKey> {
        self.agent.dataplane().public_key(family)
    }
}

impl Driver<RecordingDataplane> {
    /// The calls made to the dataplane since the last `take_calls`.
    pub fn take_calls(&mut self) -> Vec<Call> {
        let calls = self.agent.dataplane().calls().to_vec();
        self.agent.dataplane_mut().clear();
        calls
    }

    /// The operations performed since the last `take_ops` (forgets calls too).
    pub fn take_ops(&mut self) -> Vec<String> {
        let ops = self
            .agent
            .dataplane()
            .ops()
            .iter()
            .map(ToString::to_string)
            .collect();
        self.agent.dataplane_mut().clear();
        ops
    }
}
pub mod api;

/// A recording dataplane the test keeps a handle on while the agent owns it.
#[derive(Clone, Default)]
pub struct Shared(pub std::sync::Arc<std::sync::Mutex<RecordingDataplane>>);

impl Shared {
    pub fn new(d: RecordingDataplane) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(d)))
    }
    pub fn lock(&self) -> std::sync::MutexGuard<'_, RecordingDataplane> {
        self.0.lock().unwrap()
    }
}

impl Dataplane for Shared {
    fn public_key(&self, family: wgmesh_core::Family) -> Option<PublicKey> {
        self.lock().public_key(family)
    }
    fn reconcile(
        &mut self,
        plan: &wgmesh_core::NodePlan,
    ) -> Result<wgmesh_k8s::dataplane::ApplyReport, wgmesh_k8s::dataplane::DataplaneError> {
        self.lock().reconcile(plan)
    }
    fn apply_delta(
        &mut self,
        delta: &wgmesh_core::PlanDelta,
    ) -> Result<wgmesh_k8s::dataplane::ApplyReport, wgmesh_k8s::dataplane::DataplaneError> {
        self.lock().apply_delta(delta)
    }
    fn peer_stats(
        &mut self,
    ) -> Result<Option<Vec<wgmesh_k8s::dataplane::PeerStats>>, wgmesh_k8s::dataplane::DataplaneError>
    {
        self.lock().peer_stats()
    }
}

/// Waits (in virtual time, when paused) until `f` holds.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..4000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The agent over wgmesh-netlink's reconciler on its message-level fake kernel, recording
/// the operations executed.
pub type Fake = wgmesh_k8s::netlink::NetlinkDataplane<
    wgmesh_netlink::testing::Recording<wgmesh_netlink::Linux<wgmesh_netlink::testing::FakeKernel>>,
>;

/// The Linux dataplane over a fresh fake kernel.
pub fn fake_linux() -> wgmesh_netlink::Linux<wgmesh_netlink::testing::FakeKernel> {
    wgmesh_netlink::Linux::with_kernel(
        wgmesh_netlink::testing::FakeKernel::new(),
        wgmesh_netlink::LinuxConfig::with_backend(wgmesh_netlink::Backend::Kernel),
    )
    .unwrap()
}

/// Agent "a" over the fake kernel, watching pods.
pub fn netlink_agent(mesh: wgmesh_core::MeshConfig, key: PrivateKey) -> Driver<Fake> {
    let dataplane = wgmesh_k8s::netlink::NetlinkDataplane::new(
        wgmesh_netlink::testing::Recording::new(fake_linux()),
        &mesh,
        wgmesh_netlink::KeyRing::single(key),
    );
    let mut settings = wgmesh_k8s::agent::AgentSettings::new("a", mesh);
    settings.watch_pods = true;
    Driver::new(Agent::new(
        settings,
        dataplane,
        wgmesh_k8s::metrics::Metrics::new(),
    ))
}

/// Two nodes, "a" (the agent's, published with `private(1)`) and "b", and 10 ms to settle.
pub fn start_two_nodes(d: &mut Driver<Fake>) {
    d.start_with(
        &[
            wg_node(
                "a",
                "10.0.0.1",
                &["10.65.0.0/26"],
                Some(private(1).public_key()),
            ),
            wg_node("b", "10.0.0.2", &["10.65.0.64/26"], Some(public(2))),
        ],
        &[],
    );
    d.run_for(Duration::from_millis(10));
}
