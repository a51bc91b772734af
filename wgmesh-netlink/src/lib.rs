//! # wgmesh-netlink
//!
//! Makes a Linux host look like a [`wgmesh_core::NodePlan`], and keeps it so: it reads what
//! the host has of the objects wgmesh owns, computes the difference with a pure function, and
//! executes only that, over netlink (rtnetlink, generic netlink for WireGuard, nf_tables) or,
//! for userspace WireGuard, over the cross-platform configuration socket. It never runs `ip`,
//! `wg` or `nft`.
//!
//! ```text
//!  Ownership ─► Dataplane::read ─► ActualState ─┐
//!  NodePlan ────────────────────────────────────┴─► diff ───────────┐
//!  (old NodePlan, PlanDelta) ─────────────────────► delta_operations ┴─► ChangeSet
//!                                                                          │ phases, in Phase order
//!   Capabilities (probed once) ─┐                                          ▼
//!   KeyRing, throwaway key ─────┼────────────────────────────────────► lower (pure)
//!   interface indexes ──────────┘                                          │ typed netlink messages
//!                                                                          ▼
//!                                                      executor: sequence numbers, pipelining,
//!                                                      acks and extended-ack errors ─► KernelIo
//!                                                      (Sockets on the host; testing::FakeKernel)
//! ```
//!
//! | item | role |
//! |---|---|
//! | [`Reconciler`] | `reconcile(&plan)`, `apply_delta(&delta)`, `resync()`, `dry_run(&plan)`, `peer_stats()` |
//! | [`Ownership`] | what wgmesh may touch, from the [`MeshConfig`](wgmesh_core::MeshConfig) |
//! | [`diff()`], [`delta_operations`] | pure: state + plan (or delta) → [`ChangeSet`] |
//! | [`ChangeSet`], [`Phase`], [`Operation`] | typed, phased, serializable, secret-free changes; the order stated once |
//! | [`Dataplane`] | where changes run: [`Linux`], or a wrapper (`testing::FailingDataplane`, `testing::Recording`) |
//! | [`Linux`] | reads, lowers each phase to typed messages, sends and receives through a [`KernelIo`] |
//! | [`KernelIo`] | the IO boundary: [`Sockets`] (the host), `testing::FakeKernel` (feature `testing`) |
//! | [`marking`] | wgmesh's nftables tables as a typed model |
//! | [`keys`] | key ring and the 0600 key file |
//!
//! Messages are the rust-netlink crates' types (`netlink-packet-route`, `-generic`,
//! `-wireguard`, `-netfilter`, all on `netlink-packet-core` 0.9); only the extended-ack
//! trailer of the kernel's answers has a small hand codec. Those modules are private: the
//! public surface is operations, states and dataplanes.
//!
//! The synchronous core suits a controller loop; async callers run it in `spawn_blocking`.

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod diff;
pub mod error;
mod exec;
mod io;
pub mod keys;
mod linux;
mod lower;
pub mod marking;
pub mod neighbours;
pub mod op;
pub mod reconcile;
pub mod state;
#[cfg(feature = "testing")]
pub mod testing;
mod uapi;
mod userspace;
pub mod watchdog;
mod wire;

pub use diff::{DiffOptions, check_ownership, delta_operations, diff, route_metric};
pub use error::{DecodeError, Error, Result};
pub use io::{KernelIo, Sockets};
pub use keys::KeyRing;
pub use linux::{Backend, Linux, LinuxConfig, ParseBackendError};
pub use op::{AllowedIpsRemoval, ChangeSet, Operation, PeerChange, Phase};
pub use reconcile::{Dataplane, Reconciler, Report, ResyncFound, ResyncJob};
pub use state::{
    ActualDevice, ActualLink, ActualPeer, ActualRoute, ActualRouteKind, ActualRule, ActualState,
    ForeignLink, LINK_MARKER, LinkKind, Ownership, PeerStats, RawRule,
};
pub use watchdog::HandshakeWatchdog;
pub use wgmesh_core;
pub use wire::Protocol;
