//! # wgmesh-core
//!
//! The pure computation of wgmesh: from one intent ("encrypt this cluster with WireGuard") and
//! the cluster's nodes, everything each node must program. No IO, no clock, no async, no
//! processes: values in, plans out. Appliers (`wgmesh-netlink`) and adapters (`wgmesh-k8s`)
//! live in their own crates.
//!
//! ## Layers
//!
//! | module | what it holds |
//! |---|---|
//! | [`key`] | WireGuard keys, interchangeable with `wg genkey` / `wg pubkey` |
//! | [`model`] | the validated cluster: [`MeshConfig`], [`Node`], [`Cluster`] |
//! | [`spec`] | the same as text (JSON/YAML) with errors that name node and field |
//! | [`plan`] | [`NodePlan`] and the full planner [`plan_node`] — the rules are documented there |
//! | [`delta`] | [`PlanDelta`]: the difference of two plans, and applying one to a plan |
//! | [`incremental`] | [`IncrementalPlanner`]: events in, deltas out, in time proportional to the change |
//! | [`render`] | `wg show`-style text and `wg setconf` files |
//! | [`claims`] | the trust rules: what a node may claim, and what happens to disputed claims |
//! | [`diagnostics`] | why a node is plain, which keys or prefixes clash, which claims are refused |
//! | [`sim`] | a packet-path simulator that checks plans against the design's promises |
//!
//! ## Example
//!
//! ```
//! use wgmesh_core::{plan_node, render, spec::parse_cluster};
//! let cluster = parse_cluster(r#"{
//!   "mesh": {"route_source": "workload_ips", "host_encryption": true},
//!   "nodes": [
//!     {"name": "a", "addresses": ["10.240.0.4"], "workload_ips": ["10.240.0.5"],
//!      "wireguard": {"public_key": "QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}},
//!     {"name": "b", "addresses": ["10.240.0.64"], "workload_ips": ["10.240.0.65"],
//!      "wireguard": {"public_key": "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw="}}]}"#)?;
//! let plan = plan_node(&cluster, "a")?;
//! let peer = &plan.interfaces[0].peers[0];
//! assert_eq!(peer.allowed_ips.len(), 2); // 10.240.0.64/32 (host encryption) and 10.240.0.65/32
//! println!("{}", render::text(&plan));
//! # Ok::<(), wgmesh_core::Error>(())
//! ```

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod claims;
pub mod delta;
pub mod diagnostics;
pub mod error;
pub mod incremental;
pub mod key;
pub mod model;
pub mod plan;
pub mod render;
pub mod sim;
pub mod spec;

pub use delta::{PlanDelta, diff};
pub use incremental::{Event, IncrementalPlanner};

pub use error::{Error, Location, Problem};

pub use key::{KeyError, PrivateKey, PublicKey};
pub use model::{Cluster, Family, MeshConfig, Node, NodeWireGuard, RouteSource};
pub use plan::{
    InterfacePlan, Marking, NodePlan, PeerPlan, Route, RouteType, Rule, Sysctl, plan_all, plan_node,
};
