//! # wgmesh
//!
//! WireGuard encryption of a Kubernetes cluster as a single intent: "encrypt this cluster".
//! This facade re-exports the wgmesh crates behind features:
//!
//! | feature | crate | what it does |
//! |---|---|---|
//! | `core` (default) | [`core`] (`wgmesh-core`) | pure computation: model, keys, plans, incremental updates, simulator |
//! | `netlink` | `netlink` (`wgmesh-netlink`) | reads and programs a Linux kernel over netlink |
//! | `k8s` | `k8s` (`wgmesh-k8s`) | the Kubernetes adapter and reference node agent (pick a Kubernetes version feature of `k8s-openapi` in your application) |
//!
//! ```
//! use wgmesh::core::{plan_node, spec::parse_cluster};
//! let cluster = parse_cluster(r#"{"nodes": [{"name": "a"}]}"#)?;
//! assert!(plan_node(&cluster, "a")?.is_empty()); // no WireGuard on "a": nothing to program
//! # Ok::<(), wgmesh::core::Error>(())
//! ```
//!
//! With `netlink`, one node's plan programmed on this host (as root), as README's embedding
//! example does with the crates themselves:
//!
//! ```no_run
//! # #[cfg(feature = "netlink")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use wgmesh::core::{plan_node, spec::parse_cluster};
//! use wgmesh::netlink::{KeyRing, Linux, LinuxConfig, Ownership, Reconciler, keys};
//!
//! let cluster = parse_cluster(&std::fs::read_to_string("cluster.json")?)?;
//! let plan = plan_node(&cluster, "node-a")?;
//! let (key, _) = keys::load_or_generate(keys::DEFAULT_PRIVATE_KEY_FILE.as_ref())?;
//! let linux = Linux::open(LinuxConfig::default())?; // kernel WireGuard, else wireguard-go
//! let mut node = Reconciler::new(linux, Ownership::from_mesh(cluster.mesh()), KeyRing::single(key));
//! let report = node.reconcile(&plan)?; // a second call performs 0 operations
//! println!("{} operations", report.operations.len());
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "netlink"))]
//! # fn main() {}
//! ```
//!
//! The binaries `wgmesh` (feature `cli`) and `wgmesh-agent` (feature `agent`) are this
//! package's too: `cargo install --locked --path . --all-features`.

#![forbid(unsafe_code)]

#[cfg(feature = "core")]
pub use wgmesh_core as core;

#[cfg(feature = "netlink")]
pub use wgmesh_netlink as netlink;

#[cfg(feature = "k8s")]
pub use wgmesh_k8s as k8s;
