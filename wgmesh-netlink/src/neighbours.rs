//! Neighbours: other programs' policy rules that collide with wgmesh's mark bits, routing
//! table or rule priority. Tailscale, Cilium, Calico, NetBird and kube-proxy use well-known
//! ones; two programs that share a mark bit or a table break each other silently (a packet
//! marked by one skips or enters the other's table). wgmesh never takes them over: on a
//! collision [`Reconciler::reconcile`](crate::Reconciler::reconcile) refuses with one line
//! naming the other owner ([`crate::Error::Collision`]).
//!
//! [`collisions`] is pure: it looks at the rules the dataplane read (every rule of both
//! families that does not point at wgmesh's table, [`ActualState::foreign_rules`]) and at the
//! settings; kube-proxy's marks live in iptables, not in rules, so its bits are checked
//! against the settings alone.
//!
//! [`ActualState::foreign_rules`]: crate::state::ActualState::foreign_rules

use std::fmt;

use crate::state::ActualRule;

/// A program known to use policy-routing marks, tables or rule priorities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    /// Its name, as the refusal names it.
    pub name: &'static str,
    /// Routing tables it owns.
    pub tables: &'static [u32],
    /// Rule priorities it uses (inclusive range).
    pub priorities: (u32, u32),
    /// Mark bits it uses.
    pub mark_bits: u32,
}

/// The programs wgmesh recognises, with their defaults: Tailscale (marks under 0xff0000,
/// table 52, rules at 5210–5270), Cilium (marks under 0xf00, tables 200–202, 2004, 2005),
/// Calico (WireGuard table 1 at priority 99 with mark 0x100000 or 0x200000; Felix's marks
/// under 0xffff0000), NetBird (mark 0x1bd00, table 7120, rules at 105 and 110) and kube-proxy
/// (iptables marks 0x4000 and 0x8000).
pub const KNOWN: [Neighbour; 5] = [
    Neighbour {
        name: "Tailscale",
        tables: &[52],
        priorities: (5200, 5299),
        mark_bits: 0x00ff_0000,
    },
    Neighbour {
        name: "Cilium",
        tables: &[200, 201, 202, 2004, 2005],
        priorities: (9, 10),
        mark_bits: 0x0000_0f00,
    },
    Neighbour {
        name: "NetBird",
        tables: &[7120],
        priorities: (105, 110),
        mark_bits: 0x0001_bd00,
    },
    Neighbour {
        name: "Calico",
        tables: &[1],
        priorities: (99, 99),
        mark_bits: 0xffff_0000,
    },
    Neighbour {
        name: "kube-proxy",
        tables: &[],
        priorities: (0, 0),
        mark_bits: 0x0000_c000,
    },
];

/// What collides.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Collision {
    /// Another rule sits at wgmesh's rule priority.
    Priority {
        /// Who it probably belongs to ("another program" when unknown).
        owner: String,
        /// The priority.
        priority: u32,
        /// The other rule.
        rule: String,
    },
    /// Another rule compares mark bits that wgmesh sets.
    Mark {
        /// Who it probably belongs to.
        owner: String,
        /// The bits both use.
        bits: u32,
        /// The other rule.
        rule: String,
    },
    /// wgmesh's mark uses bits that a program outside the routing rules is known to use.
    KnownMark {
        /// The program.
        owner: String,
        /// The bits both use.
        bits: u32,
    },
}

impl Collision {
    /// The other owner's name.
    pub fn owner(&self) -> &str {
        match self {
            Self::Priority { owner, .. }
            | Self::Mark { owner, .. }
            | Self::KnownMark { owner, .. } => owner.as_str(),
        }
    }
}

impl fmt::Display for Collision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Priority {
                owner,
                priority,
                rule,
            } => write!(
                f,
                "rule priority {priority} is taken by {owner} (`{rule}`): set mesh.rule_priority to a free one"
            ),
            Self::Mark { owner, bits, rule } => write!(
                f,
                "fwmark bits {bits:#x} are used by {owner} (`{rule}`): set mesh.firewall_mark to bits nobody else uses"
            ),
            Self::KnownMark { owner, bits } => write!(
                f,
                "fwmark bits {bits:#x} are {owner}'s: set mesh.firewall_mark to bits nobody else uses"
            ),
        }
    }
}

fn describe(r: &ActualRule) -> String {
    let mut s = format!("{}: ", r.priority);
    if r.invert {
        s.push_str("not ");
    }
    s.push_str("from all");
    if let Some(m) = r.firewall_mark {
        s.push_str(&format!(" fwmark {m:#x}"));
        if let Some(mask) = r.firewall_mask {
            s.push_str(&format!("/{mask:#x}"));
        }
    }
    s.push_str(&format!(" lookup {}", r.table));
    s
}

/// Who a foreign rule probably belongs to: the program whose table or priority it has, else
/// every program whose mark bits it compares ("Tailscale or Calico").
fn owner_of(r: &ActualRule) -> String {
    let by = |n: &&Neighbour| {
        n.tables.contains(&r.table)
            || (n.priorities.0..=n.priorities.1).contains(&r.priority) && n.priorities != (0, 0)
    };
    if let Some(n) = KNOWN.iter().find(by) {
        return n.name.to_owned();
    }
    let bits = r.firewall_mask.or(r.firewall_mark).unwrap_or(0);
    let names: Vec<&str> = KNOWN
        .iter()
        .filter(|n| n.mark_bits & bits != 0)
        .map(|n| n.name)
        .collect();
    if names.is_empty() {
        "another program".to_owned()
    } else {
        names.join(" or ")
    }
}

/// Every collision between wgmesh's settings (its `mark`, rule `priority` and `table`) and
/// the foreign rules read from the host (rules that do not point at `table`), first those of
/// the settings alone. Empty when wgmesh may go ahead.
///
/// ```
/// use wgmesh_netlink::neighbours::collisions;
/// use wgmesh_netlink::state::ActualRule;
/// use wgmesh_core::Family;
/// // Tailscale's bypass rule: `5210: from all fwmark 0x80000/0xff0000 lookup main`.
/// let mut tailscale = ActualRule::lookup(Family::V4, 5210, 254);
/// tailscale.firewall_mark = Some(0x80000);
/// tailscale.firewall_mask = Some(0xff0000);
/// let found = collisions(0x100000, 99, 1, &[tailscale.clone()]);
/// assert_eq!(found[0].owner(), "Tailscale");
/// assert!(found[0].to_string().starts_with("fwmark bits 0x100000 are used by Tailscale"));
/// // Another mark bit is fine.
/// assert!(collisions(0x1000000, 99, 1, &[tailscale]).is_empty());
/// ```
pub fn collisions(mark: u32, priority: u32, table: u32, foreign: &[ActualRule]) -> Vec<Collision> {
    let mut out = Vec::new();
    for n in KNOWN.iter().filter(|n| n.tables.is_empty()) {
        if n.mark_bits & mark != 0 {
            out.push(Collision::KnownMark {
                owner: n.name.to_owned(),
                bits: n.mark_bits & mark,
            });
        }
    }
    for r in foreign.iter().filter(|r| r.table != table) {
        if r.priority == priority {
            out.push(Collision::Priority {
                owner: owner_of(r),
                priority,
                rule: describe(r),
            });
        }
        // A rule compares the bits of its mask (all of them without one).
        let compared = match (r.firewall_mark, r.firewall_mask) {
            (None, _) => 0,
            (Some(_), Some(mask)) => mask,
            (Some(_), None) => u32::MAX,
        };
        if compared & mark != 0 {
            out.push(Collision::Mark {
                owner: owner_of(r),
                bits: compared & mark,
                rule: describe(r),
            });
        }
    }
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use wgmesh_core::Family;

    use super::*;

    fn rule(priority: u32, table: u32, mark: Option<(u32, u32)>) -> ActualRule {
        let mut r = ActualRule::lookup(Family::V4, priority, table);
        if let Some((m, mask)) = mark {
            r.firewall_mark = Some(m);
            r.firewall_mask = Some(mask);
        }
        r
    }

    #[test]
    fn each_neighbour_is_named() {
        // wgmesh's defaults: mark 0x100000, priority 99, table 1.
        let cases = [
            (rule(5270, 52, None), None),
            (
                rule(5210, 254, Some((0x80000, 0xff0000))),
                Some("Tailscale"),
            ),
            (rule(9, 2004, Some((0x200, 0xf00))), None),
            (rule(99, 2004, None), Some("Cilium")),
            (rule(99, 7120, Some((0x1bd00, 0x1bd00))), Some("NetBird")),
            (rule(105, 7120, Some((0x1bd00, 0x1bd00))), None),
            (rule(99, 201, Some((0xe00, 0xf00))), Some("Cilium")),
            (rule(99, 7, None), Some("Calico")),
            (
                rule(300, 7, Some((0x100000, 0x100000))),
                Some("Tailscale or Calico"),
            ),
            (rule(32766, 254, None), None),
            (rule(0, 255, None), None),
        ];
        for (r, owner) in cases {
            let found = collisions(0x100000, 99, 1, std::slice::from_ref(&r));
            assert_eq!(
                found.first().map(Collision::owner),
                owner,
                "{r:?}: {found:?}"
            );
            assert!(found.len() <= 1 || owner.is_some());
        }
    }

    #[test]
    fn wgmeshs_own_table_and_kube_proxys_bits() {
        // Rules that point at wgmesh's table are wgmesh's (the diff deletes strays).
        assert!(collisions(0x100000, 99, 1, &[rule(99, 1, Some((0x100000, 0x100000)))]).is_empty());
        let found = collisions(0x4000, 99, 1, &[]);
        assert_eq!(
            found.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "fwmark bits 0x4000 are kube-proxy's: set mesh.firewall_mark to bits nobody else uses"
            ]
        );
        // A rule with a mark and no mask compares every bit.
        let mut r = rule(200, 9, None);
        r.firewall_mark = Some(0x1);
        assert_eq!(
            collisions(0x100000, 99, 1, &[r])[0].owner(),
            "another program"
        );
    }
}
