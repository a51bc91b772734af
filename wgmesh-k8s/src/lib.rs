//! The Kubernetes adapter and reference node agent for wgmesh.

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod adapter;
pub mod agent;
pub mod bootstrap;
pub mod dataplane;
pub mod http;
pub mod metrics;
pub mod publish;
pub mod run;
pub mod view;

pub use wgmesh_core;
