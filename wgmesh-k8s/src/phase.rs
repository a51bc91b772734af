//! Leaving and joining the mesh in phases through the API: the marker
//! [`PHASE_ANNOTATION`](crate::adapter::PHASE_ANNOTATION) (`wgmesh.io/phase: leaving|joining`)
//! on a node's own Node, and the bounded grace every agent gives it.
//!
//! # The grace
//!
//! A node's phase is its own, untrusted claim ([`wgmesh_core::Phase`]): while it stands, its
//! peers route traffic to it plain. So every agent honours another node's marker only for
//! [`PhaseSettings::grace`], counted on its own clock from the moment it first saw the marker
//! ([`PhaseClocks`], over [`crate::marker`]); after that the node is taken as active again,
//! a warning names it once and `wgmesh_phase_markers_expired_total` counts it. One clock
//! serves both phases (both make traffic to the node plain). Withdrawing the marker and
//! publishing it again does not restart the clock, nor does switching between `leaving` and
//! `joining`, nor a new key; only a marker absent for [`REARM_FACTOR`] graces (or the Node
//! deleted, or this agent restarted) does. A node that joins again within that time after a
//! leave therefore joins without a phase (as before phases existed). A hostile node thus
//! gets at most one grace of plaintext toward its own pods per eleven graces, never more,
//! never toward anyone else's.
//!
//! **Strict mode has no phases**: it drops rather than send plaintext, so with
//! `strict_mode` agents honour no marker and publish none; nodes join and leave at once.
//!
//! # The agent's own sequence
//!
//! - **Leaving** (the agent runs with `enabled: false` while its key is published): publish
//!   `leaving` with the keys kept; keep the device; once the marker is back through the
//!   watch, wait [`PhaseSettings::settle`] (peers now route to it plain and still accept its
//!   encrypted packets); then drop the device, routes and rules, and withdraw the keys and
//!   the marker in one publication.
//! - **Joining** (no wgmesh key published yet): publish the key with `joining`; peers add the
//!   node as a peer but route plain; once the marker is back, wait the settle time, then
//!   remove the marker (everyone encrypts).
//! - **A crash in any phase**: the marker is on the Node, so the restarted agent resumes:
//!   it waits the settle time again from when it sees it, and finishes. The settle time is
//!   shorter than the grace, and the grace bounds what peers do anyway.
//!
//! ```
//! use std::time::Duration;
//! use wgmesh_k8s::phase::PhaseSettings;
//! let s = PhaseSettings::default();
//! assert_eq!(s.grace, Duration::from_secs(60));
//! assert!(s.settle < s.grace);
//! ```

use std::time::{Duration, Instant};

use wgmesh_core::Phase;

use crate::marker::{MarkerClocks, Standing};

/// How long a phase marker is honoured by default: 60 s.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// How long a node waits by default after its marker came back through its watch: 10 s.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(10);
/// A phase marker absent for this many graces starts a new clock when it is published again.
pub const REARM_FACTOR: u32 = 10;

/// How nodes leave and join in phases.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PhaseSettings {
    /// How long another node's phase marker is honoured, from the moment this agent first
    /// saw it.
    pub grace: Duration,
    /// How long this node waits in a phase after its marker came back through its watch
    /// (shorter than the grace).
    pub settle: Duration,
}

impl Default for PhaseSettings {
    fn default() -> Self {
        Self {
            grace: DEFAULT_GRACE,
            settle: DEFAULT_SETTLE,
        }
    }
}

/// When this agent first saw each node's phase marker, so that a marker held too long stops
/// being honoured. One clock per node for both phases: a node that switches from `leaving`
/// to `joining` (both route its destinations plain) gets no second grace.
///
/// ```
/// use std::time::{Duration, Instant};
/// use wgmesh_core::Phase;
/// use wgmesh_k8s::phase::{PhaseClocks, Verdict};
/// let mut clocks = PhaseClocks::default();
/// let (t0, grace) = (Instant::now(), Duration::from_secs(60));
/// assert_eq!(clocks.observe("b", Phase::Leaving, t0, grace), Verdict::Honoured);
/// assert_eq!(clocks.observe("b", Phase::Active, t0 + grace / 2, grace), Verdict::Honoured);
/// // Published again: the clock ran on, and the grace is over.
/// assert_eq!(clocks.observe("b", Phase::Leaving, t0 + grace, grace), Verdict::NewlyExpired);
/// assert_eq!(clocks.observe("b", Phase::Leaving, t0 + grace, grace), Verdict::Expired);
/// ```
#[derive(Debug, Clone, Default)]
pub struct PhaseClocks {
    clocks: MarkerClocks<()>,
}

/// Whether a node's phase claim is honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Active (nothing to honour), or within the grace.
    Honoured,
    /// Past the grace, for the first time (warn and count once).
    NewlyExpired,
    /// Past the grace.
    Expired,
}

impl Verdict {
    /// Whether the claim is honoured.
    pub fn honoured(self) -> bool {
        self == Self::Honoured
    }
}

impl PhaseClocks {
    /// Notes the phase `node` claims at `now` and says whether it is honoured.
    pub fn observe(
        &mut self,
        node: &str,
        claimed: Phase,
        now: Instant,
        grace: Duration,
    ) -> Verdict {
        let rearm = Some(grace.saturating_mul(REARM_FACTOR));
        self.clocks
            .observe(node, (), claimed != Phase::Active, now, rearm);
        self.verdict(node, claimed, now, grace)
    }

    /// Whether `node`'s claim of `claimed` is honoured at `now` (without noting anything).
    pub fn verdict(
        &mut self,
        node: &str,
        claimed: Phase,
        now: Instant,
        grace: Duration,
    ) -> Verdict {
        if claimed == Phase::Active {
            return Verdict::Honoured;
        }
        match self.clocks.standing(node, now, grace) {
            Standing::NewlyOver => Verdict::NewlyExpired,
            Standing::Over => Verdict::Expired,
            _ => Verdict::Honoured,
        }
    }

    /// Forgets a node (deleted).
    pub fn forget(&mut self, node: &str) {
        self.clocks.forget(node);
    }

    /// When the next standing marker's grace ends, after `now`.
    pub fn next_expiry(&self, now: Instant, grace: Duration) -> Option<Instant> {
        self.clocks.next_expiry(now, grace)
    }

    /// The nodes with a standing marker, by name.
    pub fn standing_nodes(&self) -> Vec<String> {
        self.clocks.standing_nodes().map(str::to_owned).collect()
    }
}
