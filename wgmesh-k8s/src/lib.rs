//! The Kubernetes adapter and reference node agent for wgmesh.
//!
//! This crate is being built; see the repository's issues.

pub use wgmesh_core;
