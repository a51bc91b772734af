//! The Kubernetes adapter and reference node agent for wgmesh.

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod adapter;
pub mod agent;
pub mod bootstrap;
pub mod config;
pub mod dataplane;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod publish;
pub mod run;
pub mod view;

/// The Kubernetes client this crate is built on (for callers that build their own).
pub use kube;
/// The async runtime the agent runs on.
pub use tokio;
/// The logging facade the agent logs through.
pub use tracing;
pub use wgmesh_core;
