//! The crossing-initiation watchdog: a pure, clock-free decision of which freshly added peers
//! to re-add because their first handshake never completed.
//!
//! When two nodes learn of each other at nearly the same moment, each may send a handshake
//! initiation that crosses the other's on the wire. Each side then consumes the other's
//! initiation as a responder and rejects the response to its own (both Linux and wireguard-go
//! accept a response only while their own initiation is outstanding), so no session is
//! confirmed until WireGuard retries after its 5-second rekey timeout. BENCHMARKS.md
//! ("crossing initiations") measures this on wireguard-go and shows that removing and
//! re-adding the peer on one side repairs it at once.
//!
//! [`HandshakeWatchdog`] keeps, per freshly added peer, when it was added. Only the side
//! whose own public key is the smaller one watches a peer, so exactly one of two nodes acts.
//! [`HandshakeWatchdog::poll`] is given the time and the devices' peer counters and returns
//! the peers to re-add: those without a completed handshake [`HandshakeWatchdog::timeout`]
//! after they were added, each at most once per add. Time is a [`Duration`] since any fixed
//! origin the caller chooses (a monotonic clock); the module never reads a clock.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use wgmesh_core::PublicKey;
//! use wgmesh_netlink::PeerStats;
//! use wgmesh_netlink::watchdog::HandshakeWatchdog;
//!
//! let own = PublicKey::from_bytes([1; 32])?;
//! let peer = PublicKey::from_bytes([2; 32])?;
//! let mut w = HandshakeWatchdog::new(Duration::from_secs(1));
//! assert!(w.watch("wg0", &own, &peer, Duration::ZERO)); // smaller key: this side acts
//! let stalled = [PeerStats::new("wg0", peer, None, 0, 148)];
//! assert!(w.poll(Duration::from_millis(500), &stalled).is_empty()); // not yet
//! let readd = w.poll(Duration::from_millis(1000), &stalled);
//! assert_eq!(readd.len(), 1);
//! assert!(w.poll(Duration::from_secs(9), &stalled).is_empty()); // at most once
//! # let _ = SystemTime::now();
//! # Ok::<(), wgmesh_core::KeyError>(())
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use wgmesh_core::PublicKey;

use crate::state::PeerStats;

/// How long a freshly added peer may go without a completed handshake before it is re-added
/// (the experiment repaired crossing initiations with a re-add 1 s after the first packets).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// A peer to remove and add again, as planned.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Readd {
    /// The interface that has the peer.
    pub interface: String,
    /// The peer's key.
    pub public_key: PublicKey,
}

/// Which freshly added peers to re-add; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct HandshakeWatchdog {
    timeout: Duration,
    /// (interface, peer) → when it was added.
    watched: BTreeMap<(String, PublicKey), Duration>,
}

impl Default for HandshakeWatchdog {
    fn default() -> Self {
        Self::new(DEFAULT_TIMEOUT)
    }
}

/// Whether the node with key `own` is the one of the pair that acts: the smaller key.
pub fn acts(own: &PublicKey, peer: &PublicKey) -> bool {
    own < peer
}

impl HandshakeWatchdog {
    /// A watchdog that re-adds a peer without a handshake `timeout` after it was added.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            watched: BTreeMap::new(),
        }
    }

    /// The timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Records that `peer` was added to `interface` at `now`, if this side acts for the pair
    /// (its key `own` is the smaller one). Returns whether it is watched. Adding a peer again
    /// (a later delta) starts a new watch with a new allowance of one re-add.
    pub fn watch(
        &mut self,
        interface: &str,
        own: &PublicKey,
        peer: &PublicKey,
        now: Duration,
    ) -> bool {
        if !acts(own, peer) {
            return false;
        }
        self.watched.insert((interface.to_owned(), *peer), now);
        true
    }

    /// Stops watching a peer (it was removed).
    pub fn forget(&mut self, interface: &str, peer: &PublicKey) {
        self.watched.remove(&(interface.to_owned(), *peer));
    }

    /// Stops watching every peer of an interface (it was removed).
    pub fn forget_interface(&mut self, interface: &str) {
        self.watched.retain(|(i, _), _| i != interface);
    }

    /// The number of peers watched.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    /// Whether no peer is watched (nothing to poll).
    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }

    /// When the next watched peer times out, if any: the latest time to call [`Self::poll`].
    pub fn next_deadline(&self) -> Option<Duration> {
        self.watched.values().min().map(|t| *t + self.timeout)
    }

    /// Decides at `now`, from the devices' peer counters `stats`: a watched peer with a
    /// completed handshake is done; one that no device lists any more is dropped; one whose
    /// timeout passed without a handshake is returned, once, and no longer watched.
    pub fn poll(&mut self, now: Duration, stats: &[PeerStats]) -> Vec<Readd> {
        let mut out = Vec::new();
        self.watched.retain(|(interface, key), added| {
            let Some(s) = stats
                .iter()
                .find(|s| s.interface == *interface && s.public_key == *key)
            else {
                return false; // gone from the device
            };
            if s.last_handshake.is_some() {
                return false; // a session exists
            }
            if now.saturating_sub(*added) >= self.timeout {
                out.push(Readd {
                    interface: interface.clone(),
                    public_key: *key,
                });
                return false; // at most once
            }
            true
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn pk(b: u8) -> PublicKey {
        PublicKey::from_bytes([b; 32]).unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn stalled(i: &str, k: PublicKey) -> PeerStats {
        PeerStats::new(i, k, None, 0, 148)
    }

    fn done(i: &str, k: PublicKey) -> PeerStats {
        PeerStats::new(i, k, Some(SystemTime::UNIX_EPOCH), 92, 148)
    }

    #[test]
    fn only_the_smaller_key_acts_and_exactly_one_side_does() {
        let (a, b) = (pk(3), pk(7));
        let mut wa = HandshakeWatchdog::default();
        let mut wb = HandshakeWatchdog::default();
        assert!(wa.watch("wg0", &a, &b, ms(0)));
        assert!(!wb.watch("wg0", &b, &a, ms(0)), "the larger key never acts");
        assert!(wb.is_empty());
        assert_eq!(wb.poll(ms(5000), &[stalled("wg0", a)]), vec![]);
        assert_eq!(
            wa.poll(ms(5000), &[stalled("wg0", b)]),
            vec![Readd {
                interface: "wg0".into(),
                public_key: b
            }]
        );
        // A node never peers with itself, but equal keys must not make both act.
        assert!(!acts(&a, &a));
    }

    #[test]
    fn a_peer_that_handshakes_in_time_is_left_alone() {
        let mut w = HandshakeWatchdog::new(ms(1000));
        w.watch("wg0", &pk(1), &pk(2), ms(100));
        assert!(w.poll(ms(600), &[stalled("wg0", pk(2))]).is_empty());
        assert!(w.poll(ms(900), &[done("wg0", pk(2))]).is_empty());
        assert!(w.is_empty(), "done: no longer watched");
        assert!(w.poll(ms(10_000), &[stalled("wg0", pk(2))]).is_empty());
    }

    #[test]
    fn re_added_at_most_once_per_add_and_exactly_at_the_timeout() {
        let mut w = HandshakeWatchdog::new(ms(1000));
        w.watch("wg0", &pk(1), &pk(2), ms(100));
        assert_eq!(w.next_deadline(), Some(ms(1100)));
        assert!(w.poll(ms(1099), &[stalled("wg0", pk(2))]).is_empty());
        assert_eq!(w.poll(ms(1100), &[stalled("wg0", pk(2))]).len(), 1);
        for t in [1200, 5000, 60_000] {
            assert!(w.poll(ms(t), &[stalled("wg0", pk(2))]).is_empty());
        }
        assert_eq!(w.next_deadline(), None);
        // A later delta adding it again starts a new watch.
        w.watch("wg0", &pk(1), &pk(2), ms(70_000));
        assert_eq!(w.poll(ms(71_000), &[stalled("wg0", pk(2))]).len(), 1);
    }

    #[test]
    fn peers_gone_from_the_device_or_forgotten_are_dropped() {
        let mut w = HandshakeWatchdog::new(ms(1000));
        w.watch("wg0", &pk(1), &pk(2), ms(0));
        w.watch("wg0", &pk(1), &pk(3), ms(0));
        w.watch("wg1", &pk(1), &pk(4), ms(0));
        w.forget("wg0", &pk(3));
        assert_eq!(w.len(), 2);
        // wg0's peer 2 no longer listed: dropped, not re-added.
        let r = w.poll(ms(2000), &[stalled("wg1", pk(4))]);
        assert_eq!(
            r,
            vec![Readd {
                interface: "wg1".into(),
                public_key: pk(4)
            }]
        );
        w.watch("wg1", &pk(1), &pk(5), ms(0));
        w.forget_interface("wg1");
        assert!(w.is_empty());
    }

    #[test]
    fn the_same_key_on_two_interfaces_is_two_watches() {
        let mut w = HandshakeWatchdog::new(ms(1000));
        w.watch("wg0", &pk(1), &pk(2), ms(0));
        w.watch("wg0v6", &pk(1), &pk(2), ms(0));
        let r = w.poll(ms(1000), &[done("wg0", pk(2)), stalled("wg0v6", pk(2))]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].interface, "wg0v6");
    }

    #[test]
    fn a_clock_going_backwards_never_triggers() {
        let mut w = HandshakeWatchdog::new(ms(1000));
        w.watch("wg0", &pk(1), &pk(2), ms(5000));
        assert!(w.poll(ms(10), &[stalled("wg0", pk(2))]).is_empty());
        assert_eq!(w.len(), 1);
    }
}
