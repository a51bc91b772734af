//! Prefixes written as text without going through `core::fmt` piece by piece.
//!
//! A plan of one node of a large Azure CNI cluster holds hundreds of thousands of prefixes
//! (allowed IPs and routes). `ipnet` serializes each with `collect_str`, which makes a
//! JSON serializer escape and buffer every octet and dot separately; profiled on
//! `wgmesh plan --format json` (2,500 nodes × 60 workload IPs), that was half of the
//! process's time. Here an IPv4 prefix is written into a stack buffer by hand and handed to
//! the serializer as one string; the text is the same as `Display`'s.

use std::fmt::Write as _;

use ipnet::IpNet;
use serde::{Serialize, Serializer};

/// The longest text of a prefix: a full IPv6 address with an embedded IPv4 tail and `/128`.
const MAX: usize = 64;

/// A prefix's text on the stack.
pub(crate) struct NetText {
    buf: [u8; MAX],
    len: usize,
}

impl NetText {
    pub(crate) fn new(net: &IpNet) -> Self {
        let mut t = Self {
            buf: [0; MAX],
            len: 0,
        };
        match net {
            IpNet::V4(n) => {
                for (i, octet) in n.addr().octets().into_iter().enumerate() {
                    if i > 0 {
                        t.push(b'.');
                    }
                    t.number(octet);
                }
                t.push(b'/');
                t.number(n.prefix_len());
            }
            // IPv6's rules (the longest run of zeros, embedded IPv4) stay with `Display`.
            IpNet::V6(_) => {
                let _ = write!(t, "{net}");
            }
        }
        t
    }

    fn push(&mut self, b: u8) {
        if self.len < MAX {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn number(&mut self, n: u8) {
        if n >= 100 {
            self.push(b'0' + n / 100);
        }
        if n >= 10 {
            self.push(b'0' + n / 10 % 10);
        }
        self.push(b'0' + n % 10);
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII is ever written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl std::fmt::Write for NetText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.len + s.len() > MAX {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
        self.len += s.len();
        Ok(())
    }
}

/// Serializes a prefix as `ipnet` does, in one string for text formats.
pub(crate) fn net<S: Serializer>(net: &IpNet, serializer: S) -> Result<S::Ok, S::Error> {
    if serializer.is_human_readable() {
        serializer.serialize_str(NetText::new(net).as_str())
    } else {
        net.serialize(serializer)
    }
}

struct AsText<'a>(&'a IpNet);

impl Serialize for AsText<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        net(self.0, serializer)
    }
}

/// Serializes a list of prefixes, each as [`net`] does.
pub(crate) fn nets<S: Serializer>(nets: &[IpNet], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(nets.iter().map(AsText))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_is_displays() {
        for text in [
            "0.0.0.0/0",
            "10.0.0.1/32",
            "10.240.100.255/32",
            "192.168.1.0/24",
            "255.255.255.255/32",
            "1.2.3.4/8",
            "fd00:10:244::/64",
            "::/0",
            "2001:db8::1/128",
            "::ffff:10.0.0.1/128",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
        ] {
            let net: IpNet = text.parse().unwrap();
            assert_eq!(NetText::new(&net).as_str(), net.to_string());
        }
    }

    #[test]
    fn every_ipv4_octet_and_length_is_written_as_display_writes_it() {
        for octet in 0..=255u8 {
            for len in [0u8, 7, 32] {
                let addr = std::net::Ipv4Addr::new(octet, 255 - octet, octet / 3, 9);
                let net = IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap());
                assert_eq!(NetText::new(&net).as_str(), net.to_string());
            }
        }
    }
}
