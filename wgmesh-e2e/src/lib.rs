//! # wgmesh-e2e
//!
//! End-to-end harness: a real multi-node cluster in network namespaces, meshed by wgmesh,
//! proven on real packets counted on each node's underlay.
//!
//! | module | what it holds |
//! |---|---|
//! | [`ns`] | namespaces, threads inside them, guaranteed teardown (Drop, signals, stale sweep) |
//! | [`cluster`] | the underlay bridge, nodes, pods (both route sources, dual stack), one agent per node |
//! | [`apply`] | the seam "apply this node's plan": [`apply::ApplierFactory`], [`apply::NodeApplier`] |
//! | [`traffic`] | ICMP echo over raw sockets, don't-fragment probes, continuous pings with loss |
//! | [`netlink`] | the seam filled by wgmesh-netlink's `Reconciler` (kernel or userspace WireGuard) |
//! | [`count`] | nftables counters on each underlay: plaintext of the flow vs WireGuard data |
//! | [`flows`] | the design's flows: expected (design), simulated (wgmesh-core), observed (packets) |
//! | [`changes`] | cluster changes under continuous ping, with loss per change |
//! | [`strict`] | strict mode's checks beyond flows: spoofed plaintext, control-plane TCP |
//!
//! Everything here needs root (`CAP_NET_ADMIN`, `CAP_SYS_ADMIN` for `setns`).

#![forbid(unsafe_code)]

pub mod apply;
pub mod changes;
pub mod cluster;
pub mod count;
pub mod flows;
pub mod netlink;
pub mod ns;
pub mod strict;
pub mod traffic;

use std::fmt;

/// A harness failure: what was being done and why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }

    /// The same error, prefixed with what was being done.
    pub fn context(self, doing: impl fmt::Display) -> Self {
        Self(format!("{doing}: {}", self.0))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<wgmesh_core::Error> for Error {
    fn from(e: wgmesh_core::Error) -> Self {
        Self(e.to_string())
    }
}

/// The harness's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Whether this process runs as root (the harness needs it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
