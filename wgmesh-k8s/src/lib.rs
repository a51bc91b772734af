//! The Kubernetes adapter and reference node agent for wgmesh.

#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod adapter;

pub use wgmesh_core;
