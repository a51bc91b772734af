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
//! | [`graph`] | the mesh as a picture (DOT, SVG): node states and the simulator's verdict per pair |
//!
//! ## Trust
//!
//! Whatever a node or its pods publish — addresses, blocks, workload addresses, keys, the
//! underlay MTU — is a claim, not a fact. [`claims`] settles the claims of all nodes together:
//! special and outside addresses, oversized prefixes and claims over another node's address
//! or inside its block are refused; a prefix two nodes claim belongs to nobody; what one
//! node may claim is capped; an underlay MTU below the floor is ignored. A refusal costs only
//! the node that made the claim, and [`diagnostics`] names every node a refusal, a dispute
//! or a duplicate key involves, so nothing is downgraded silently. Text input is bounded
//! before it is parsed ([`spec::ParseLimits`]), and errors echo at most a few dozen bytes of
//! a value ([`error::elide`]).
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
pub mod graph;
pub mod incremental;
pub mod key;
pub mod model;
mod netfmt;
pub mod plan;
pub mod render;
pub mod sim;
pub mod spec;

pub use delta::{PlanDelta, diff};
pub use incremental::{Event, IncrementalPlanner};

pub use error::{Error, Location, Problem};

pub use key::{KeyError, PrivateKey, PublicKey};
pub use model::{Cluster, Family, MeshConfig, Node, NodeWireGuard, Phase, RouteSource};
pub use plan::{
    InterfacePlan, Marking, NodePlan, PLAN_SCHEMA_VERSION, PeerPlan, Route, RouteType, Rule,
    StrictFilter, Sysctl, plan_all, plan_node,
};
