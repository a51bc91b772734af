//! Packet counting on a node's underlay interface with nftables counters.
//!
//! Each node gets a table `inet wgmesh_e2e` of its own (wgmesh never touches it) whose chains
//! count, on `eth0`, in both directions:
//!
//! - `plain_*`: other packets whose source and destination are the flow under test, in either
//!   direction (the set `flow4`/`flow6`): the flow's packets in plaintext (WireGuard's own
//!   UDP between two hosts is matched first, so host↔host tunnels do not count as plaintext);
//! - `wg_data_*`: WireGuard transport-data messages that carry a packet (UDP to a mesh port,
//!   message type 4, longer than an empty keepalive);
//! - `wg_other_*`: every other packet to a mesh port (handshakes, cookies, keepalives).
//!
//! `nft` is the test oracle here: the code under test programs its own table over netlink.

use std::net::IpAddr;

use crate::ns::Netns;
use crate::{Error, Result};

/// The counting table.
pub const TABLE: &str = "wgmesh_e2e";

/// Counter values of one node's underlay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Flow packets out in plaintext.
    pub plain_out: u64,
    /// Flow packets in in plaintext.
    pub plain_in: u64,
    /// WireGuard data messages out.
    pub wg_data_out: u64,
    /// WireGuard data messages in.
    pub wg_data_in: u64,
    /// Other WireGuard messages out.
    pub wg_other_out: u64,
    /// Other WireGuard messages in.
    pub wg_other_in: u64,
}

impl Counts {
    /// Plaintext flow packets, both directions.
    pub fn plain(&self) -> u64 {
        self.plain_out + self.plain_in
    }

    /// WireGuard data messages, both directions.
    pub fn wg_data(&self) -> u64 {
        self.wg_data_out + self.wg_data_in
    }
}

/// Installs the counting table on `ns`'s `eth0` for the WireGuard `ports`.
pub fn install(ns: &Netns, ports: &[u16]) -> Result<()> {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let script = format!(
        r#"table inet {TABLE} {{
	set flow4 {{ type ipv4_addr . ipv4_addr; }}
	set flow6 {{ type ipv6_addr . ipv6_addr; }}
	counter plain_out {{ }}
	counter plain_in {{ }}
	counter wg_data_out {{ }}
	counter wg_data_in {{ }}
	counter wg_other_out {{ }}
	counter wg_other_in {{ }}
	chain egress {{
		type filter hook postrouting priority 300; policy accept;
		oifname != "eth0" return
		udp dport {{ {ports} }} @th,64,8 4 udp length > 40 counter name wg_data_out return
		udp dport {{ {ports} }} counter name wg_other_out return
		ip saddr . ip daddr @flow4 counter name plain_out
		ip6 saddr . ip6 daddr @flow6 counter name plain_out
	}}
	chain ingress {{
		type filter hook prerouting priority -400; policy accept;
		iifname != "eth0" return
		udp dport {{ {ports} }} @th,64,8 4 udp length > 40 counter name wg_data_in return
		udp dport {{ {ports} }} counter name wg_other_in return
		ip saddr . ip daddr @flow4 counter name plain_in
		ip6 saddr . ip6 daddr @flow6 counter name plain_in
	}}
}}
"#
    );
    ns.exec("nft", &["-f", "-"], Some(&script)).map(|_| ())
}

/// Sets the flow to count (`a`↔`b`) and zeroes the counters.
pub fn arm(ns: &Netns, a: IpAddr, b: IpAddr) -> Result<()> {
    let (set, other) = if a.is_ipv4() {
        ("flow4", "flow6")
    } else {
        ("flow6", "flow4")
    };
    let script = format!(
        "flush set inet {TABLE} {set}\nflush set inet {TABLE} {other}\n\
         add element inet {TABLE} {set} {{ {a} . {b}, {b} . {a} }}\n\
         reset counters table inet {TABLE}\n"
    );
    ns.exec("nft", &["-f", "-"], Some(&script)).map(|_| ())
}

/// Reads and zeroes the counters (one atomic `reset`, which prints the values it clears).
pub fn take(ns: &Netns) -> Result<Counts> {
    let out = ns.exec("nft", &["reset", "counters", "table", "inet", TABLE], None)?;
    parse(&out).ok_or_else(|| Error::new(format!("unexpected nft output in {}: {out}", ns.name())))
}

/// Parses the text of `nft list|reset counters`.
fn parse(text: &str) -> Option<Counts> {
    let mut counts = Counts::default();
    let mut current: Option<&str> = None;
    let mut seen = 0;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["counter", name, "{"] => current = Some(name),
            ["packets", n, "bytes", _] => {
                let n: u64 = n.parse().ok()?;
                let slot = match current? {
                    "plain_out" => &mut counts.plain_out,
                    "plain_in" => &mut counts.plain_in,
                    "wg_data_out" => &mut counts.wg_data_out,
                    "wg_data_in" => &mut counts.wg_data_in,
                    "wg_other_out" => &mut counts.wg_other_out,
                    "wg_other_in" => &mut counts.wg_other_in,
                    _ => continue,
                };
                *slot = n;
                seen += 1;
            }
            _ => {}
        }
    }
    (seen == 6).then_some(counts)
}

/// [`arm`] on several namespaces at once (one thread each).
pub fn arm_all(namespaces: &[&Netns], a: IpAddr, b: IpAddr) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = namespaces
            .iter()
            .map(|ns| s.spawn(move || arm(ns, a, b)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| Error::new("counter thread panicked"))?
        })
    })
}

/// [`take`] on several namespaces at once (one thread each), in order.
pub fn take_all(namespaces: &[&Netns]) -> Result<Vec<Counts>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = namespaces
            .iter()
            .map(|ns| s.spawn(move || take(ns)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| Error::new("counter thread panicked"))?
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reset_output() {
        let text = "table inet wgmesh_e2e {\n\tcounter plain_out {\n\t\tpackets 4 bytes 336\n\t}\n\
            \tcounter plain_in {\n\t\tpackets 3 bytes 1\n\t}\n\tcounter wg_data_out {\n\t\tpackets 7 bytes 2\n\t}\n\
            \tcounter wg_data_in {\n\t\tpackets 8 bytes 2\n\t}\n\tcounter wg_other_out {\n\t\tpackets 1 bytes 2\n\t}\n\
            \tcounter wg_other_in {\n\t\tpackets 2 bytes 2\n\t}\n}\n";
        let c = parse(text).unwrap();
        assert_eq!(
            (c.plain_out, c.plain_in, c.wg_data_out, c.wg_data_in),
            (4, 3, 7, 8)
        );
        assert_eq!((c.wg_other_out, c.wg_other_in), (1, 2));
        assert_eq!(parse("table inet wgmesh_e2e {\n}\n"), None);
    }
}
