//! How long another node's marker has stood, on this agent's own clock: the machinery behind
//! the time limit of next-key announcements ([`crate::rotation::Announcements`]) and the
//! grace of phase markers ([`crate::phase::PhaseClocks`]).
//!
//! A node's clock starts the first time this agent sees its marker and runs on while the
//! marker's *identity* stays the same (for an announcement, the node's current keys),
//! whether the marker is withdrawn meanwhile or not: withdrawing and publishing it again does
//! not restart it. A marker seen again with another identity starts a new clock; so does one
//! seen again after it was absent for at least `rearm`, when a rearm time is given. A node's
//! own timestamps are never read (untrusted input).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use wgmesh_k8s::marker::{MarkerClocks, Standing};
//! let mut clocks: MarkerClocks<()> = MarkerClocks::default();
//! let t0 = Instant::now();
//! let limit = Duration::from_secs(60);
//! clocks.observe("b", (), true, t0, None);
//! assert_eq!(clocks.standing("b", t0 + Duration::from_secs(59), limit), Standing::Within);
//! // Withdrawn and published again: the clock runs on.
//! clocks.observe("b", (), false, t0 + Duration::from_secs(10), None);
//! clocks.observe("b", (), true, t0 + Duration::from_secs(20), None);
//! assert_eq!(clocks.standing("b", t0 + limit, limit), Standing::NewlyOver);
//! assert_eq!(clocks.standing("b", t0 + limit, limit), Standing::Over);
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One clock per node name; `I` is what restarts it when it changes.
#[derive(Debug, Clone)]
pub struct MarkerClocks<I> {
    seen: BTreeMap<String, Seen<I>>,
}

impl<I> Default for MarkerClocks<I> {
    fn default() -> Self {
        Self {
            seen: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone)]
struct Seen<I> {
    identity: I,
    since: Instant,
    /// Since when the marker has been absent (`None`: it stands).
    absent_since: Option<Instant>,
    /// Said (logged, counted) once.
    over: bool,
}

/// Where a node's marker stands against a time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Standing {
    /// No clock runs for the node (never marked, or forgotten).
    Unseen,
    /// Within the limit.
    Within,
    /// Past the limit, for the first time asked (say it once).
    NewlyOver,
    /// Past the limit, already said.
    Over,
}

impl<I: PartialEq> MarkerClocks<I> {
    /// Notes whether `node` shows its marker at `now`, with `identity`. With `rearm`, a
    /// marker seen again after being absent for at least that long starts a new clock.
    pub fn observe(
        &mut self,
        node: &str,
        identity: I,
        marked: bool,
        now: Instant,
        rearm: Option<Duration>,
    ) {
        if let Some(seen) = self.seen.get_mut(node)
            && seen.identity == identity
        {
            if !marked {
                seen.absent_since.get_or_insert(now);
                return;
            }
            let rearmed = rearm.is_some_and(|r| {
                seen.absent_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= r)
            });
            if rearmed {
                seen.since = now;
                seen.over = false;
            }
            seen.absent_since = None;
            return;
        }
        if marked {
            self.seen.insert(
                node.to_owned(),
                Seen {
                    identity,
                    since: now,
                    absent_since: None,
                    over: false,
                },
            );
        } else {
            self.seen.remove(node);
        }
    }

    /// Forgets a node (deleted).
    pub fn forget(&mut self, node: &str) {
        self.seen.remove(node);
    }

    /// When this agent first saw `node`'s marker (for its current clock), if it did.
    pub fn since(&self, node: &str) -> Option<Instant> {
        self.seen.get(node).map(|s| s.since)
    }

    /// Where `node`'s clock stands at `now` against `limit` ([`Standing::NewlyOver`] once).
    pub fn standing(&mut self, node: &str, now: Instant, limit: Duration) -> Standing {
        let Some(seen) = self.seen.get_mut(node) else {
            return Standing::Unseen;
        };
        if now.saturating_duration_since(seen.since) < limit {
            Standing::Within
        } else if seen.over {
            Standing::Over
        } else {
            seen.over = true;
            Standing::NewlyOver
        }
    }

    /// The earliest moment after `now` at which a standing marker within `limit` goes past
    /// it (for the agent's timer).
    pub fn next_expiry(&self, now: Instant, limit: Duration) -> Option<Instant> {
        self.seen
            .values()
            .filter(|s| s.absent_since.is_none())
            .map(|s| s.since + limit)
            .filter(|t| *t > now)
            .min()
    }

    /// The nodes whose marker stands now (seen, not withdrawn since), by name.
    pub fn standing_nodes(&self) -> impl Iterator<Item = &str> {
        self.seen
            .iter()
            .filter(|(_, s)| s.absent_since.is_none())
            .map(|(n, _)| n.as_str())
    }
}
