//! # wgmesh-k8s
//!
//! The Kubernetes adapter and reference node agent of wgmesh: one agent per node (a
//! DaemonSet) learns the cluster from the API server, publishes its node's WireGuard public
//! key on its Node object, and keeps the node's mesh equal to the plan of
//! [`wgmesh_core`] as nodes and pods come and go.
//!
//! ```text
//!  API server ──list/watch──► kube-runtime watcher ──► reflector store (Node, Pod caches)
//!                                                          │
//!                              adapter (Node → core Node, Pod → workload addresses)
//!                                                          ▼
//!                              ClusterView ──core Events──► IncrementalPlanner ──PlanDelta──┐
//!                                                                                            ▼
//!   timers: debounce, resync (90 s), publication backoff ──► Agent ──► bootstrap guard ──► Dataplane
//!                                                            │                     (wgmesh-netlink)
//!              Node annotations ◄── server-side apply ◄──────┘
//! ```
//!
//! | module | what it holds |
//! |---|---|
//! | [`adapter`] | pure conversions: Nodes and Pods to the core's [`Cluster`](wgmesh_core::Cluster) |
//! | [`view`] | the cluster as known, and the core events each watch event means |
//! | [`agent`] | the agent's logic as a clock-free state machine ([`agent::Agent`]) |
//! | [`bootstrap`] | how a node always regains the API server under host encryption |
//! | [`dataplane`] | the [`dataplane::Dataplane`] boundary, a recording and a logging implementation |
//! | [`netlink`] | the real dataplane: `wgmesh-netlink`'s reconciler behind that boundary |
//! | [`publish`] | the key publication requests (server-side apply, merge patch) |
//! | [`rotation`] | scheduled key rotation: its order, settings and pure decisions |
//! | [`phase`] | leaving and joining in phases: the `wgmesh.io/phase` marker and its bounded grace |
//! | [`marker`] | how long another node's marker has stood, on this agent's clock |
//! | [`status`] | what the node reports: the `WireGuardMeshReady` condition, Events |
//! | [`snapshot`] | the cluster as the agents would see it, from one read (previews, diagnostics) |
//! | [`run`] | the thin async shell: watchers, timers, publications |
//! | [`config`] | the configuration file |
//! | [`daemon`] | the whole agent process: dataplane from the configuration, endpoints, the loop |
//! | [`metrics`], [`http`] | Prometheus metrics, `/healthz`, `/readyz` on `127.0.0.1:9469` |
//! | [`logging`] | structured logs (`tracing`), JSON by default |
//!
//! ## Example: the state machine, fed by hand
//!
//! ```
//! use std::time::{Duration, Instant};
//! use kube::runtime::watcher::Event;
//! use wgmesh_core::{MeshConfig, PublicKey};
//! use wgmesh_k8s::agent::{Agent, AgentSettings};
//! use wgmesh_k8s::dataplane::RecordingDataplane;
//! use wgmesh_k8s::metrics::Metrics;
//!
//! let ours: PublicKey = "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20=".parse()?;
//! let node = |name: &str, ip: &str, cidr: &str, key: &str| serde_json::from_value(serde_json::json!({
//!     "metadata": {"name": name, "annotations": {"wgmesh.io/public-key": key}},
//!     "spec": {"podCIDRs": [cidr]},
//!     "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})).unwrap();
//! let mut agent = Agent::new(AgentSettings::new("a", MeshConfig::default()),
//!                            RecordingDataplane::new(Some(ours), None), Metrics::new());
//! let now = Instant::now();
//! agent.on_nodes(Event::Init, now);
//! agent.on_nodes(Event::InitApply(node("a", "10.0.0.1", "10.65.0.0/26", &ours.to_base64())), now);
//! agent.on_nodes(Event::InitApply(node("b", "10.0.0.2", "10.65.0.64/26",
//!                                      "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=")), now);
//! agent.on_nodes(Event::InitDone, now);
//! assert_eq!(agent.poll(now), None); // the published key is ours: nothing to publish
//! let peers = &agent.dataplane().node().interfaces[0].peers;
//! assert_eq!(peers[0].node, "b");
//! assert_eq!(peers[0].allowed_ips, ["10.65.0.64/26".parse()?]);
//! // A pod-CIDR change is a delta, applied after the debounce.
//! agent.on_nodes(Event::Apply(node("b", "10.0.0.2", "10.65.1.0/26",
//!                                  "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=")), now);
//! agent.poll(now + Duration::from_millis(150));
//! assert_eq!(agent.dataplane().node().interfaces[0].peers[0].allowed_ips, ["10.65.1.0/26".parse()?]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## What was tested, and against what
//!
//! No Kubernetes API server runs on the machines this was built and tested on (no package,
//! no container engine), so **nothing here has been run against a real cluster**. Instead:
//!
//! - recorded-shape `kubectl get -o json` fixtures (AKS with Azure CNI, kubeadm, dual stack),
//!   written for the tests, are converted and checked field by field;
//! - the async shell runs against a mock API server — a `tower` service behind a real
//!   [`kube::Client`] — that serves lists and watch streams (resource versions, replay,
//!   `410 Gone`, field selectors), applies patches, records every request and injects
//!   failures; and the `agent` example runs as a process against a loopback HTTP server
//!   through a kubeconfig;
//! - the state machine runs through scenario and property tests on a simulated clock, over a
//!   recording dataplane and over `wgmesh-netlink`'s reconciler with its in-memory fake
//!   kernel (asserting the netlink operations).
//!
//! What only a real cluster would show: the API server's exact server-side-apply field
//! ownership and conflict behaviour, watch bookmarks and streaming lists, RBAC enforcement,
//! kubelet probes, and the packet path on real nodes (the bootstrap is checked with the
//! core's packet-path simulator, not with real packets).

// One exception, in `daemon`: glibc's `mallopt`, to cap malloc's arenas.
#![deny(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod adapter;
pub mod agent;
pub mod bootstrap;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod http;
pub mod logging;
pub mod marker;
pub mod metrics;
pub mod netlink;
pub mod phase;
pub mod publish;
pub mod rotation;
pub mod run;
pub mod snapshot;
pub mod status;
pub mod view;

/// The Kubernetes client this crate is built on (for callers that build their own).
pub use kube;
/// The async runtime the agent runs on.
pub use tokio;
/// The logging facade the agent logs through.
pub use tracing;
pub use wgmesh_core;
pub use wgmesh_netlink;
