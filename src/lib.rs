//! # wgmesh
//!
//! WireGuard encryption of a Kubernetes cluster as a single intent: "encrypt this cluster".
//! This facade re-exports the wgmesh crates behind features:
//!
//! | feature | crate | what it does |
//! |---|---|---|
//! | `core` (default) | [`core`] (`wgmesh-core`) | pure computation: model, keys, plans, incremental updates, simulator |
//! | `netlink` | `netlink` (`wgmesh-netlink`) | reads and programs a Linux kernel over netlink |
//! | `k8s` | `k8s` (`wgmesh-k8s`) | the Kubernetes adapter and reference node agent |
//!
//! ```
//! use wgmesh::core::{plan_node, spec::parse_cluster};
//! let cluster = parse_cluster(r#"{"nodes": [{"name": "a"}]}"#)?;
//! assert!(plan_node(&cluster, "a")?.is_empty()); // no WireGuard on "a": nothing to program
//! # Ok::<(), wgmesh::core::Error>(())
//! ```

#![forbid(unsafe_code)]

#[cfg(feature = "core")]
pub use wgmesh_core as core;

#[cfg(feature = "netlink")]
pub use wgmesh_netlink as netlink;

#[cfg(feature = "k8s")]
pub use wgmesh_k8s as k8s;
