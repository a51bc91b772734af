//! Scheduled key rotation: the settings and the pure decisions behind it (when a node's key is
//! due, how many nodes may rotate at once, whether a next key collides with another node's
//! key). The [`Agent`](crate::agent::Agent) drives it; the key files are the dataplane's
//! ([`Dataplane::create_next_key`](crate::dataplane::Dataplane::create_next_key) and
//! friends).
//!
//! # The order, and why
//!
//! Measured on both WireGuards (BENCHMARKS.md, "The kernel half, and which order loses
//! least"): a device answers only for its current private key; after it changes, its old
//! session survives receive-only; a peer that lists the next key *before* the switch accepts
//! the node's first initiation at once and then drops the node's packets on the new entry
//! (no allowed IPs) until it moves them, while a peer that learns the key *after* the switch
//! makes the node's WireGuard hold those packets (up to 128 per peer) until the peer adds
//! the new key and kicks a handshake. So a rotation goes:
//!
//! 1. **Make the next key and keep it on disk** (mode 0600, beside the key file) before
//!    anything is published: an agent restarted at any later point resumes with that key,
//!    never loses it, and never publishes a key it does not have.
//! 2. **Announce it**: the annotation [`NEXT_PUBLIC_KEY_ANNOTATION`]. Other agents count the
//!    nodes that announce one ([`rotating_nodes`]) and wait while `max_concurrent` do; a node
//!    whose next key another node already publishes gives it up and makes another
//!    ([`collides`]). An announcement counts for
//!    [`RotationSettings::announcement_limit`] from the moment this agent first saw it, on
//!    its own clock ([`Announcements`]): a node that announces and never switches holds the
//!    others back for that long at most.
//! 3. **Wait**: until the node's own watch shows the announcement (the API server has it, so
//!    every agent sees it about as soon), then `settle` more, so that nodes that announced at
//!    the same moment see each other; the later names beyond the bound give way
//!    ([`must_yield`]).
//! 4. **Switch**: the next key file becomes the key file (one `rename`), the device gets the
//!    new private key, and the node publishes it as its key and removes the announcement in
//!    the same publication. Peers replace the old entry when they read it (add-new with the
//!    allowed IPs, a handshake kick, remove-old).
//!
//! ```
//! use std::time::Duration;
//! use wgmesh_k8s::rotation::{RotationSettings, jitter};
//! let s = RotationSettings::every(Duration::from_secs(30 * 24 * 3600));
//! assert_eq!(s.max_concurrent, 1);
//! // Each node's rotation is spread over the first tenth of the interval after it is due.
//! let j = jitter(&s, "node-a");
//! assert!(j < s.interval.unwrap() / 10);
//! assert_eq!(j, jitter(&s, "node-a"));
//! assert_ne!(j, jitter(&s, "node-b"));
//! ```

use std::time::{Duration, Instant};

use wgmesh_core::{Family, PublicKey};

use crate::adapter::NodeInfo;
use crate::marker::{MarkerClocks, Standing};

/// The annotation that announces the key a node will switch to (base64, like
/// `wgmesh.io/public-key`); one key for both families, as the agent uses one key file.
pub const NEXT_PUBLIC_KEY_ANNOTATION: &str = "wgmesh.io/next-public-key";

/// How a node rotates its key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RotationSettings {
    /// How old a key may get (`None`: no scheduled rotation, the default).
    pub interval: Option<Duration>,
    /// At most this many nodes announce a next key at once (the bound counts them in the
    /// watch cache).
    pub max_concurrent: usize,
    /// How long a node waits after its announcement came back through its watch before it
    /// switches.
    pub settle: Duration,
    /// How long a node waits before it looks again, after it found the bound reached or a
    /// step failed.
    pub retry: Duration,
    /// How long another node's announcement counts toward `max_concurrent`, from the moment
    /// this agent first saw it, on this agent's clock ([`Announcements`]): a node that
    /// announces a next key and never switches stops blocking the others after that.
    pub announcement_limit: Duration,
}

/// [`RotationSettings::announcement_limit`] by default: 10 minutes, sixty times the default
/// settle time (a rotation holds its announcement for the echo, the settle time and one
/// publication).
pub const DEFAULT_ANNOUNCEMENT_LIMIT: Duration = Duration::from_secs(600);

impl Default for RotationSettings {
    fn default() -> Self {
        Self {
            interval: None,
            max_concurrent: 1,
            settle: Duration::from_secs(10),
            retry: Duration::from_secs(30),
            announcement_limit: DEFAULT_ANNOUNCEMENT_LIMIT,
        }
    }
}

impl RotationSettings {
    /// Rotation every `interval`, other settings default.
    pub fn every(interval: Duration) -> Self {
        Self {
            interval: Some(interval),
            ..Self::default()
        }
    }
}

/// A node's delay after its key is due: a fixed fraction (from its name) of a tenth of the
/// interval, so nodes whose keys were made together do not all rotate together.
pub fn jitter(settings: &RotationSettings, node: &str) -> Duration {
    let Some(interval) = settings.interval else {
        return Duration::ZERO;
    };
    // FNV-1a: stable across runs and builds (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let span = interval / 10;
    let fraction = (h >> 11) as f64 / (1u64 << 53) as f64;
    span.mul_f64(fraction)
}

/// The next key a node announces, if its annotation holds a valid key (anything else is
/// ignored: a node cannot make others wait with a bogus announcement any longer than with a
/// valid one).
pub fn announced(node: &NodeInfo) -> Option<PublicKey> {
    node.published
        .annotation(NEXT_PUBLIC_KEY_ANNOTATION)
        .and_then(|t| PublicKey::from_base64(t.trim()).ok())
}

/// The other nodes that announce a next key, sorted by name (without the time limit of
/// [`Announcements`], which the agent counts with).
pub fn rotating_nodes<'a>(nodes: impl Iterator<Item = &'a NodeInfo>, ours: &str) -> Vec<String> {
    let mut out: Vec<String> = nodes
        .filter(|n| n.node.name != ours && announced(n).is_some())
        .map(|n| n.node.name.clone())
        .collect();
    out.sort();
    out
}

/// When this agent first saw each other node announce a next key, on its own clock, so that
/// an announcement held too long stops counting toward the bound.
///
/// The clock of a node starts the first time this agent sees it announce (a watch event, or
/// the first count), and runs for as long as the node publishes the same current keys:
/// withdrawing the announcement and announcing again does not restart it; a completed
/// rotation (new current keys) or the node's deletion does. Untrusted input: a node's own
/// timestamps are never read.
///
/// ```
/// use std::time::{Duration, Instant};
/// use wgmesh_k8s::rotation::Announcements;
/// let mut a = Announcements::default();
/// let t0 = Instant::now();
/// // No node announces: nothing counts, nothing is stale.
/// let counted = a.counted(std::iter::empty(), "ours", t0, Duration::from_secs(600));
/// assert!(counted.rotating.is_empty() && counted.newly_stale.is_empty());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Announcements {
    seen: MarkerClocks<[Option<PublicKey>; 2]>,
}

/// What [`Announcements::counted`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counted {
    /// The other nodes whose announcement counts toward the bound, sorted by name.
    pub rotating: Vec<String>,
    /// The nodes whose announcement went past the limit since the last count (each once).
    pub newly_stale: Vec<String>,
}

fn current_keys(node: &NodeInfo) -> [Option<PublicKey>; 2] {
    [node.node.key(Family::V4), node.node.key(Family::V6)]
}

impl Announcements {
    /// Notes what `node` publishes at `now` (call it on every watch event of a node).
    pub fn observe(&mut self, node: &NodeInfo, now: Instant) {
        let marked = announced(node).is_some();
        self.seen
            .observe(&node.node.name, current_keys(node), marked, now, None);
    }

    /// Forgets a node (deleted).
    pub fn forget(&mut self, node: &str) {
        self.seen.forget(node);
    }

    /// When this agent first saw `node` announce (for its current keys), if it did.
    pub fn since(&self, node: &str) -> Option<Instant> {
        self.seen.since(node)
    }

    /// The other nodes that announce a next key and count toward the bound at `now`: those
    /// announcing for less than `limit` since this agent first saw them (sorted by name), and
    /// those that went past it since the last count.
    pub fn counted<'a>(
        &mut self,
        nodes: impl Iterator<Item = &'a NodeInfo>,
        ours: &str,
        now: Instant,
        limit: Duration,
    ) -> Counted {
        let mut out = Counted::default();
        for n in nodes {
            if n.node.name == ours || announced(n).is_none() {
                continue;
            }
            self.observe(n, now);
            match self.seen.standing(&n.node.name, now, limit) {
                Standing::Within => out.rotating.push(n.node.name.clone()),
                Standing::NewlyOver => out.newly_stale.push(n.node.name.clone()),
                _ => {}
            }
        }
        out.rotating.sort();
        out.newly_stale.sort();
        out
    }
}

/// Whether `ours` gives way: more nodes than `max` announce a next key and `ours` is not
/// among the first `max` names. Every agent decides the same from the same cache.
///
/// ```
/// use wgmesh_k8s::rotation::must_yield;
/// let others = vec!["b".to_owned(), "c".to_owned()];
/// assert!(!must_yield("a", &others, 1));
/// assert!(must_yield("d", &others, 1));
/// assert!(must_yield("d", &others, 2));
/// assert!(!must_yield("d", &others, 3));
/// ```
pub fn must_yield(ours: &str, others: &[String], max: usize) -> bool {
    others.len() + 1 > max && others.iter().filter(|o| o.as_str() < ours).count() >= max
}

/// The other nodes that publish `next` as a key (current, either family, or next). Switching
/// to it would make both nodes plain (a duplicate key), so the next key is given up.
pub fn collides<'a>(
    next: PublicKey,
    nodes: impl Iterator<Item = &'a NodeInfo>,
    ours: &str,
) -> Vec<String> {
    nodes
        .filter(|n| n.node.name != ours)
        .filter(|n| {
            Family::ALL
                .iter()
                .any(|f| n.published.has_key(*f, Some(next)) || n.node.key(*f) == Some(next))
                || announced(n) == Some(next)
        })
        .map(|n| n.node.name.clone())
        .collect()
}
