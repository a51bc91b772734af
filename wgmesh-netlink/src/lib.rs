//! # wgmesh-netlink
//!
//! Makes a Linux host look like a [`wgmesh_core::NodePlan`], and keeps it so: it reads what
//! the host has of the objects wgmesh owns, computes the difference with a pure function, and
//! executes only that, over netlink (rtnetlink, generic netlink for WireGuard, nf_tables) or,
//! for userspace WireGuard, over the cross-platform configuration socket. It never runs `ip`,
//! `wg` or `nft`.
//!
//! ```text
//!  Ownership ──► Dataplane::read ──► ActualState ─┐
//!  NodePlan ──────────────────────────────────────┴─► diff (pure) ─► [Operation] ─► Dataplane::execute
//!  PlanDelta ─► delta_operations (pure) ──────────────────────────────────────────┘
//! ```
//!
//! | item | role |
//! |---|---|
//! | [`Reconciler`] | `reconcile(&plan)`, `apply_delta(&delta)`, `resync()`, `dry_run(&plan)`, `peer_stats()` |
//! | [`Ownership`] | what wgmesh may touch, from the [`MeshConfig`](wgmesh_core::MeshConfig) |
//! | [`diff()`], [`delta_operations`] | pure: state + plan (or delta) → operations |
//! | [`Operation`] | serializable, secret-free operations |
//! | [`Dataplane`] | the transport: [`Linux`], [`testing::FakeKernel`], [`testing::FailingDataplane`] |
//! | [`Linux`] | the real host: kernel or userspace WireGuard ([`Backend`]) |
//! | [`keys`] | key ring and the 0600 key file |
//! | [`wire`], [`nft`], [`uapi`] | pure message builders and parsers (golden-byte tested) |
//!
//! The synchronous core suits a controller loop; async callers run it in `spawn_blocking`.

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod diff;
pub mod error;
pub mod keys;
mod linux;
pub mod nft;
mod nla;
pub mod op;
pub mod reconcile;
mod socket;
pub mod state;
pub mod testing;
pub mod uapi;
pub mod wire;

pub use diff::{DiffOptions, delta_operations, diff, route_metric};
pub use error::{Error, Result};
pub use keys::KeyRing;
pub use linux::{Backend, Linux, LinuxConfig};
pub use op::Operation;
pub use reconcile::{Dataplane, Reconciler, Report};
pub use state::{
    ActualDevice, ActualLink, ActualPeer, ActualRoute, ActualRouteKind, ActualRule, ActualState,
    LinkKind, Ownership, PeerStats, RawRule,
};
pub use wgmesh_core;
