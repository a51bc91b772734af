//! Apply [`wgmesh_core`] plans to a Linux kernel over netlink.
//!
//! This crate is being built; see the repository's issues.

pub use wgmesh_core;
