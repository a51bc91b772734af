//! Golden bytes: what wgmesh sends, byte for byte, and what Linux sends back, parsed and
//! re-emitted byte for byte. The recorded messages come from Linux 6.1 in the VM of
//! `scripts/vm` (see `testdata/`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{Emitable, Parseable};
use netlink_packet_generic::GenlMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::rule::RuleMessage;
use netlink_packet_wireguard::{WireguardAttribute, WireguardMessage, WireguardPeerAttribute};
use wgmesh_core::{Family, PublicKey, Route, RouteType, Rule};
use zeroize::Zeroizing;

use super::genl::{self, DEFAULT_MAX_MESSAGE, DeviceUpdate, PeerUpdate, Wg};
use super::route::{self, RtRequest};
use super::{nft, parse, serialize};
use crate::marking::{Expr, NFPROTO_INET, NftChain, NftTable};
use crate::state::{ActualDevice, ActualRouteKind, PeerStats, RawRule};

pub(crate) fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Lines of hex in a test data file (comments and blank lines skipped).
pub(crate) fn recorded(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| unhex(l.trim()))
        .collect()
}

fn hdr(m: &[u8]) -> (u32, u16, u16, u32) {
    (
        u32::from_ne_bytes([m[0], m[1], m[2], m[3]]),
        u16::from_ne_bytes([m[4], m[5]]),
        u16::from_ne_bytes([m[6], m[7]]),
        u32::from_ne_bytes([m[8], m[9], m[10], m[11]]),
    )
}

fn rt(req: &RtRequest, seq: u32) -> Vec<u8> {
    serialize(&req.1, req.0, seq)
}

fn rt_parse(m: &[u8]) -> RouteNetlinkMessage {
    parse::<RouteNetlinkMessage>(m, "test").unwrap().1
}

fn pk(i: u8) -> PublicKey {
    wgmesh_core::PrivateKey::from_bytes([i; 32])
        .unwrap()
        .public_key()
}

/// `ip route replace 10.65.0.0/26 dev <ifindex 7> table 1 scope link proto static`.
#[test]
#[cfg(target_endian = "little")]
fn route_replace_golden() {
    let r = Route {
        family: Family::V4,
        table: 1,
        destination: "10.65.0.0/26".parse().unwrap(),
        kind: RouteType::Unicast,
        device: Some("wg".into()),
    };
    let m = rt(&route::route_replace(&r, Some(7)), 9);
    let want: Vec<u8> = [
        &[60, 0, 0, 0, 24, 0, 0x05, 0x05, 9, 0, 0, 0, 0, 0, 0, 0][..],
        &[2, 26, 0, 0, 1, 4, 253, 1, 0, 0, 0, 0], // rtmsg
        &[8, 0, 1, 0, 10, 65, 0, 0],              // RTA_DST
        &[8, 0, 15, 0, 1, 0, 0, 0],               // RTA_TABLE
        &[8, 0, 6, 0, 0, 0, 0, 0],                // RTA_PRIORITY 0
        &[8, 0, 4, 0, 7, 0, 0, 0],                // RTA_OIF
    ]
    .concat();
    assert_eq!(m, want);
    let RouteNetlinkMessage::NewRoute(p) = rt_parse(&m) else {
        panic!("not a route")
    };
    let parsed = route::parse_route(&p, 1).unwrap().unwrap();
    assert_eq!(parsed.destination, r.destination);
    assert_eq!(
        (parsed.kind, parsed.oif, parsed.metric),
        (ActualRouteKind::Unicast, Some(7), 0)
    );
    assert_eq!(route::parse_route(&p, 2).unwrap(), None);
}

/// `ip -6 route replace throw fd10::/120 table 1000 proto static`: the header's table byte
/// is 0, `RTA_TABLE` says 1000.
#[test]
#[cfg(target_endian = "little")]
fn throw_route_in_a_big_table_uses_rta_table() {
    let r = Route {
        family: Family::V6,
        table: 1000,
        destination: "fd10::/120".parse().unwrap(),
        kind: RouteType::Throw,
        device: None,
    };
    let m = rt(&route::route_replace(&r, None), 1);
    let want: Vec<u8> = [
        &[64, 0, 0, 0, 24, 0, 0x05, 0x05, 1, 0, 0, 0, 0, 0, 0, 0][..],
        &[10, 120, 0, 0, 0, 4, 0, 9, 0, 0, 0, 0], // rtmsg: throw, table byte 0
        &[
            20, 0, 1, 0, 0xfd, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
        &[8, 0, 15, 0, 0xe8, 3, 0, 0], // RTA_TABLE 1000
        &[8, 0, 6, 0, 0, 4, 0, 0],     // RTA_PRIORITY 1024
    ]
    .concat();
    assert_eq!(m, want);
    let RouteNetlinkMessage::NewRoute(p) = rt_parse(&m) else {
        panic!("not a route")
    };
    let p = route::parse_route(&p, 1000).unwrap().unwrap();
    assert_eq!(
        (p.kind, p.metric, p.table),
        (ActualRouteKind::Throw, 1024, 1000)
    );
    let d = rt(&route::route_delete(&p), 2);
    assert_eq!(hdr(&d).1, 25); // RTM_DELROUTE
    let RouteNetlinkMessage::DelRoute(back) = rt_parse(&d) else {
        panic!("not a route delete")
    };
    let back = route::parse_route(&back, 1000).unwrap().unwrap();
    assert_eq!((back.destination, back.kind), (p.destination, p.kind));
}

/// `ip rule add pref 99 not fwmark 0x100000/0x100000 lookup 1`.
#[test]
#[cfg(target_endian = "little")]
fn rule_add_golden() {
    let r = Rule {
        family: Family::V4,
        priority: 99,
        table: 1,
        firewall_mark: 0x100000,
        firewall_mask: 0x100000,
        invert: true,
    };
    let m = rt(&route::rule_add(&r, true), 3);
    let want: Vec<u8> = [
        &[60, 0, 0, 0, 32, 0, 0x05, 0x06, 3, 0, 0, 0, 0, 0, 0, 0][..],
        &[2, 0, 0, 0, 1, 0, 0, 1, 2, 0, 0, 0], // fib_rule_hdr: to table, invert
        &[8, 0, 6, 0, 99, 0, 0, 0],            // FRA_PRIORITY
        &[8, 0, 10, 0, 0, 0, 0x10, 0],         // FRA_FWMARK
        &[8, 0, 16, 0, 0, 0, 0x10, 0],         // FRA_FWMASK
        &[8, 0, 15, 0, 1, 0, 0, 0],            // FRA_TABLE
    ]
    .concat();
    assert_eq!(m, want);
    let RouteNetlinkMessage::NewRule(p) = rt_parse(&m) else {
        panic!("not a rule")
    };
    let a = route::parse_rule(&p, 1).unwrap();
    assert!(a.same_fields(&crate::diff::actual_rule(&r)));
    assert!(route::parse_rule(&p, 2).is_none());
    // The delete of the parsed rule sends it back as it was.
    let d = rt(&route::rule_delete(&a), 4);
    assert_eq!(&d[16..], &m[16..]);
    // The copy differs only in the flags: no NLM_F_EXCL.
    let c = rt(&route::rule_add(&r, false), 3);
    assert_eq!(hdr(&c), (60, 32, 0x405, 3));
    assert_eq!(&c[8..], &m[8..]);
}

/// Rules pointing at table 1 as Linux 6.1 dumps them (payloads after the netlink header).
pub(crate) const RECORDED_RULES: [(&str, &str); 2] = [
    (
        "02000000010000010200000008000f000100000008000e00ffffffff0500150000000000080006006300000008000a00000010000800100000001000",
        "02000800010000010000000008000f000100000008000e00ffffffff05001500000000000800060063000000080002000a000000",
    ),
    (
        "0a000000010000010200000008000f000100000008000e00ffffffff0500150000000000080006006300000008000a00000010000800100000001000",
        "0a000800010000010000000008000f000100000008000e00ffffffff0500150000000000080006006300000014000200fd000000000000000000000000000000",
    ),
];

/// Recorded in the VM after `ip rule add not fwmark 0x100000/0x100000 table 1 priority 99`
/// and `ip rule add from 10.0.0.0/8 table 1 priority 99` (IPv6: `from fd00::/8`): the dumps
/// parse and re-emit byte for byte, and the delete of the hand-made rule echoes its dump,
/// `FRA_SRC` included, so the kernel cannot take wgmesh's rule of the same priority for it.
#[test]
#[cfg(target_endian = "little")]
fn recorded_rules_parse_re_emit_and_delete_by_their_dump() {
    for (ours, stray) in RECORDED_RULES {
        let (ours, stray) = (unhex(ours), unhex(stray));
        for bytes in [&ours, &stray] {
            let m = RuleMessage::parse(&bytes[..]).unwrap();
            let mut back = vec![0; m.buffer_len()];
            m.emit(&mut back);
            assert_eq!(&back, bytes, "re-emitted byte for byte");
        }
        let k = route::parse_rule(&RuleMessage::parse(&ours[..]).unwrap(), 1).unwrap();
        let u = route::parse_rule(&RuleMessage::parse(&stray[..]).unwrap(), 1).unwrap();
        let family = k.family;
        let planned = Rule {
            family,
            priority: 99,
            table: 1,
            firewall_mark: 0x100000,
            firewall_mask: 0x100000,
            invert: true,
        };
        assert!(k.same_fields(&crate::diff::actual_rule(&planned)));
        assert_ne!(k, crate::diff::actual_rule(&planned), "the dump is kept");
        assert!(u.other_selectors && !u.invert && u.firewall_mark.is_none());
        assert_eq!((u.priority, u.table, u.action), (99, 1, 1));
        // The delete request is the dump itself.
        let d = rt(&route::rule_delete(&u), 7);
        assert_eq!(hdr(&d), (16 + stray.len() as u32, 33, 5, 7));
        assert_eq!(&d[16..], &stray[..]);
        assert!(!crate::diff::delete_would_take(&u, &k), "{family}");
        assert!(crate::diff::delete_would_take(&u, &u));
        // Built from the modelled fields alone, it names no source: the kernel would take
        // wgmesh's rule, listed first.
        let mut bare = u.clone();
        bare.raw = RawRule::default();
        let RouteNetlinkMessage::DelRule(d) = rt_parse(&rt(&route::rule_delete(&bare), 7)) else {
            panic!("not a rule delete")
        };
        assert!(!route::parse_rule(&d, 1).unwrap().other_selectors);
        assert!(crate::diff::delete_would_take(&bare, &k), "{family}");
    }
}

#[test]
#[cfg(target_endian = "little")]
fn link_create_golden() {
    let m = rt(
        &route::link_create("wg0", crate::state::LinkKind::Wireguard, 1420),
        5,
    );
    let want: Vec<u8> = [
        &[68, 0, 0, 0, 16, 0, 0x05, 0x06, 5, 0, 0, 0, 0, 0, 0, 0][..],
        &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], // ifinfomsg, IFF_UP
        &[8, 0, 3, 0, b'w', b'g', b'0', 0],                // IFLA_IFNAME
        &[8, 0, 4, 0, 0x8c, 0x05, 0, 0],                   // IFLA_MTU 1420
        &[20, 0, 18, 0],                                   // IFLA_LINKINFO { KIND
        &[14, 0, 1, 0],
        b"wireguard\0\0\0", // "wireguard" }
    ]
    .concat();
    assert_eq!(m, want);
    let RouteNetlinkMessage::NewLink(l) = rt_parse(&m) else {
        panic!("not a link")
    };
    let (name, l) = route::parse_link(&l).unwrap();
    assert_eq!(
        (name.as_str(), l.kind.as_deref(), l.mtu, l.up),
        ("wg0", Some("wireguard"), 1420, true)
    );
}

fn wg_bytes(m: &WireguardMessage, family_id: u16, flags: u16, seq: u32) -> Vec<u8> {
    serialize(
        &Wg {
            family_id,
            message: m,
        },
        flags,
        seq,
    )
}

fn wg_parse(m: &[u8]) -> WireguardMessage {
    parse::<GenlMessage<WireguardMessage>>(m, "test")
        .unwrap()
        .1
        .payload
}

/// A peer with one allowed IP, as wg(8) sends it (`wg set wg0 peer K endpoint
/// 10.0.0.2:51820 persistent-keepalive 25 allowed-ips 10.65.0.0/26`), family id 21.
#[test]
#[cfg(target_endian = "little")]
fn wg_set_golden() {
    let mut p = PeerUpdate::new(pk(2));
    p.endpoint = Some("10.0.0.2:51820".parse().unwrap());
    p.persistent_keepalive = Some(25);
    p.allowed_ips = vec![("10.65.0.0/26".parse().unwrap(), false)];
    let d = DeviceUpdate::peer("wg0", p);
    let msgs = genl::set_messages(&d, DEFAULT_MAX_MESSAGE).unwrap();
    assert_eq!(msgs.len(), 1);
    let m = wg_bytes(&msgs[0].0, 21, 5, 1);
    let key = pk(2);
    let want: Vec<u8> = [
        &[132, 0, 0, 0, 21, 0, 0x05, 0x00, 1, 0, 0, 0, 0, 0, 0, 0][..],
        &[1, 1, 0, 0],                      // WG_CMD_SET_DEVICE, version 1
        &[8, 0, 2, 0, b'w', b'g', b'0', 0], // WGDEVICE_A_IFNAME
        &[104, 0, 8, 0x80],                 // WGDEVICE_A_PEERS
        &[100, 0, 0, 0x80],                 // peer 0
        &[36, 0, 1, 0],                     // WGPEER_A_PUBLIC_KEY
        key.as_bytes(),
        &[
            20, 0, 4, 0, 2, 0, 0xca, 0x6c, 10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0,
        ], // endpoint
        &[6, 0, 5, 0, 25, 0, 0, 0],  // keepalive
        &[32, 0, 9, 0x80],           // WGPEER_A_ALLOWEDIPS
        &[28, 0, 0, 0x80],           // allowed ip 0
        &[6, 0, 1, 0, 2, 0, 0, 0],   // family AF_INET
        &[8, 0, 2, 0, 10, 65, 0, 0], // address
        &[5, 0, 3, 0, 26, 0, 0, 0],  // cidr
    ]
    .concat();
    assert_eq!(&m[..], &want[..]);
    // Read back through the dump parser.
    let mut dev = ActualDevice::default();
    genl::merge_device(&mut wg_parse(&m), &mut dev).unwrap();
    let peer = &dev.peers[&pk(2)];
    assert_eq!(peer.persistent_keepalive, 25);
    assert_eq!(peer.endpoint, Some("10.0.0.2:51820".parse().unwrap()));
    assert_eq!(peer.allowed_ips.len(), 1);
}

fn clamped(v: u8) -> wgmesh_core::PrivateKey {
    let mut b = [v; 32];
    b[0] &= 248;
    b[31] = (b[31] & 127) | 64;
    wgmesh_core::PrivateKey::from_bytes(b).unwrap()
}

/// The parts of a device dump recorded from Linux 6.1 (see the file's header), as whole
/// messages (the recording kept payloads: a netlink header of family 21 is put back).
pub(crate) fn recorded_dump() -> Vec<Vec<u8>> {
    recorded(include_str!("../../testdata/kernel-wg-get-device.hex"))
        .into_iter()
        .map(|p| {
            let mut m = Vec::with_capacity(16 + p.len());
            m.extend_from_slice(&(16 + p.len() as u32).to_ne_bytes());
            m.extend_from_slice(&21u16.to_ne_bytes());
            m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
            m.extend_from_slice(&[0; 8]);
            m.extend_from_slice(&p);
            m
        })
        .collect()
}

/// The read-only peer attributes of a real kernel dump, byte for byte, and what they parse
/// to: peer B's counters (in its first part only) survive the second part, which carries only
/// its key and more allowed IPs; peer C never had a handshake. Each part re-emits byte for
/// byte.
#[test]
#[cfg(target_endian = "little")]
fn recorded_kernel_dump_parses_re_emits_and_merges() {
    let parts = recorded_dump();
    assert_eq!(parts.len(), 2, "the dump spans two messages");
    let (b, c) = (clamped(0x10).public_key(), clamped(0x18).public_key());
    // Peer B's first part, at offset 116 of the payload: key, preshared key, then the
    // read-only attributes as Linux emits them.
    let p = &parts[0][16..];
    assert_eq!(&p[116..120], &[36, 0, 1, 0]);
    assert_eq!(&p[120..152], b.as_bytes());
    let golden: Vec<u8> = [
        &[20, 0, 6, 0][..], // WGPEER_A_LAST_HANDSHAKE_TIME, __kernel_timespec
        &[0xe2, 0x6c, 0x07, 0x6b, 0, 0, 0, 0], // tv_sec 1795648738
        &[0xf1, 0x77, 0xc4, 0x21, 0, 0, 0, 0], // tv_nsec 566523889
        &[6, 0, 5, 0, 0, 0, 0, 0], // WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL 0
        &[12, 0, 8, 0, 0x14, 0x02, 0, 0, 0, 0, 0, 0], // WGPEER_A_TX_BYTES 532
        &[12, 0, 7, 0, 0xdc, 0x01, 0, 0, 0, 0, 0, 0], // WGPEER_A_RX_BYTES 476
    ]
    .concat();
    assert_eq!(&p[188..188 + golden.len()], &golden[..]);

    let mut dev = ActualDevice::default();
    let mut stats = BTreeMap::new();
    for m in &parts {
        let mut parsed = parse::<GenlMessage<WireguardMessage>>(m, "test").unwrap().1;
        // Byte for byte back (before the private key is wiped).
        let mut back = vec![0; parsed.buffer_len()];
        parsed.emit(&mut back);
        assert_eq!(&back[..], &m[16..]);
        genl::merge_stats(&mut parsed.payload.clone(), "wg0", &mut stats).unwrap();
        genl::merge_device(&mut parsed.payload, &mut dev).unwrap();
        // The private key is wiped once read.
        assert!(
            parsed
                .payload
                .attributes
                .iter()
                .all(|a| !matches!(a, WireguardAttribute::PrivateKey(k) if *k != [0; 32]))
        );
    }
    assert_eq!(dev.public_key, Some(clamped(0x08).public_key()));
    assert_eq!((dev.listen_port, dev.firewall_mark), (51820, 0x100000));
    assert_eq!(dev.peers.len(), 2);
    assert_eq!(dev.peers[&b].allowed_ips.len(), 151);
    assert_eq!(dev.peers[&c].allowed_ips.len(), 1);
    let at = std::time::UNIX_EPOCH + std::time::Duration::new(1_795_648_738, 566_523_889);
    assert_eq!(stats.values().cloned().collect::<Vec<_>>(), {
        let mut want = vec![
            PeerStats::new("wg0", b, Some(at), 476, 532),
            PeerStats::zero("wg0", c),
        ];
        want.sort_by_key(|s| s.public_key);
        want
    });
    // The second part alone knows B only by key: no counters, so merging it after the first
    // leaves them (checked above), and on its own it reports zero.
    let mut second = BTreeMap::new();
    genl::merge_stats(&mut wg_parse(&parts[1]), "wg0", &mut second).unwrap();
    assert_eq!(second[&b], PeerStats::zero("wg0", b));
}

fn big(n_peers: usize, ips_per_peer: usize) -> DeviceUpdate {
    let peers = (0..n_peers)
        .map(|i| {
            let mut p = PeerUpdate::new(
                wgmesh_core::PrivateKey::from_bytes({
                    let mut b = [1u8; 32];
                    b[1..9].copy_from_slice(&(i as u64 + 1).to_le_bytes());
                    b
                })
                .unwrap()
                .public_key(),
            );
            p.endpoint = Some("10.0.0.2:51820".parse().unwrap());
            p.allowed_ips = (0..ips_per_peer)
                .map(|j| {
                    let n = (i * ips_per_peer + j) as u32;
                    (
                        IpNet::new(IpAddr::from((0x0a00_0000 + n).to_be_bytes()), 32).unwrap(),
                        false,
                    )
                })
                .collect();
            p
        })
        .collect();
    DeviceUpdate {
        ifname: "wg0".into(),
        private_key: Some(Zeroizing::new([7; 32])),
        listen_port: Some(51820),
        firewall_mark: Some(0x100000),
        peers,
    }
}

fn check_split(d: &DeviceUpdate, max: usize) -> usize {
    let msgs = genl::set_messages(d, max).unwrap();
    let mut back = ActualDevice::default();
    for (i, m) in msgs.iter().enumerate() {
        let bytes = wg_bytes(&m.0, 30, 5, 100 + i as u32);
        let (len, ty, _, seq) = hdr(&bytes);
        assert_eq!(len as usize, bytes.len());
        assert!(bytes.len() <= max, "message {i} is {} bytes", bytes.len());
        assert_eq!((ty, seq), (30, 100 + i as u32));
        let mut parsed = wg_parse(&bytes);
        // Device settings only in the first message; continuation chunks are key + IPs.
        let has_settings = parsed.attributes.iter().any(|a| {
            matches!(
                a,
                WireguardAttribute::PrivateKey(_) | WireguardAttribute::ListenPort(_)
            )
        });
        assert_eq!(has_settings, i == 0);
        genl::merge_device(&mut parsed, &mut back).unwrap();
    }
    assert_eq!(back.peers.len(), d.peers.len());
    for p in &d.peers {
        assert_eq!(
            back.peers[&p.public_key].allowed_ips.len(),
            p.allowed_ips.len()
        );
    }
    msgs.len()
}

#[test]
fn splits_one_huge_peer_and_many_peers() {
    let n = check_split(&big(1, 100_000), DEFAULT_MAX_MESSAGE);
    assert!(n >= 100_000 * 28 / DEFAULT_MAX_MESSAGE, "{n}");
    check_split(&big(5_000, 2), DEFAULT_MAX_MESSAGE);
    check_split(&big(300, 50), 8192);
    check_split(&big(3, 3), 200);
    assert!(matches!(
        genl::set_messages(&big(1, 1), 100),
        Err(crate::Error::MessageTooSmall { max_message: 100 })
    ));
}

#[test]
fn continuation_chunks_carry_only_key_and_ips() {
    let mut d = big(1, 5_000);
    d.peers[0].update_only = true;
    d.peers[0].persistent_keepalive = Some(5);
    let msgs = genl::set_messages(&d, 8192).unwrap();
    assert!(msgs.len() > 2);
    for (i, m) in msgs.iter().enumerate() {
        for a in &m.0.attributes {
            if let WireguardAttribute::Peers(peers) = a {
                for p in peers {
                    let flags =
                        p.0.iter()
                            .any(|x| matches!(x, WireguardPeerAttribute::Flags(_)));
                    let ep =
                        p.0.iter()
                            .any(|x| matches!(x, WireguardPeerAttribute::Endpoint(_)));
                    assert_eq!((flags, ep), (i == 0, i == 0), "message {i}");
                }
            }
        }
    }
}

#[test]
fn set_messages_wipe_their_private_key_when_dropped() {
    let d = big(1, 1);
    let mut m = genl::set_messages(&d, DEFAULT_MAX_MESSAGE)
        .unwrap()
        .remove(0);
    let key = |m: &genl::WgSet| {
        m.0.attributes.iter().find_map(|a| match a {
            WireguardAttribute::PrivateKey(k) => Some(*k),
            _ => None,
        })
    };
    assert_eq!(key(&m), Some([7; 32]));
    // What Drop runs.
    m.wipe();
    assert_eq!(key(&m), Some([0; 32]));
    // Debug never shows the key.
    let m = genl::set_messages(&d, DEFAULT_MAX_MESSAGE)
        .unwrap()
        .remove(0);
    assert!(!format!("{m:?} {d:?}").contains("7, 7"));
}

/// The mark rule `meta mark set meta mark | 0x100000`, as `nft --debug=netlink` shows it:
/// `[ meta load mark => reg 1 ] [ bitwise reg 1 = ( reg 1 & 0xffefffff ) ^ 0x00100000 ]
/// [ meta set mark with reg 1 ]` (on a little-endian host), byte for byte as the hand
/// encoder wrote it before netlink-packet-netfilter.
#[test]
#[cfg(target_endian = "little")]
fn mark_rule_golden_bytes() {
    let mark = 0x100000u32;
    let rule = vec![
        Expr::Meta { key: 3, dreg: 1 },
        Expr::Bitwise {
            sreg: 1,
            dreg: 1,
            len: 4,
            mask: (!mark).to_ne_bytes().to_vec(),
            xor: mark.to_ne_bytes().to_vec(),
        },
        Expr::MetaSet { key: 3, sreg: 1 },
    ];
    let t = NftTable {
        family: NFPROTO_INET,
        name: "t".into(),
        flags: 0,
        chains: vec![NftChain {
            name: "c".into(),
            kind: None,
            hook: None,
            priority: None,
            policy: None,
            rules: vec![rule.clone()],
        }],
        sets: Vec::new(),
    };
    let batch = nft::replace_batch("t", &[t]);
    let (flags, m) = &batch[7];
    let bytes = serialize(m, *flags, 8);
    let want: Vec<u8> = [
        // nlmsghdr: len 180, type 0x0a06 NEWRULE, flags REQUEST|ACK|CREATE|APPEND, seq 8
        &[180, 0, 0, 0, 0x06, 0x0a, 0x05, 0x0c, 8, 0, 0, 0, 0, 0, 0, 0][..],
        &[1, 0, 0, 0],                // nfgenmsg: inet, v0, res 0
        &[6, 0, 1, 0, b't', 0, 0, 0], // NFTA_RULE_TABLE "t"
        &[6, 0, 2, 0, b'c', 0, 0, 0], // NFTA_RULE_CHAIN "c"
        &[144, 0, 4, 0x80],           // NFTA_RULE_EXPRESSIONS
        &[36, 0, 1, 0x80],            // elem: meta load
        &[9, 0, 1, 0, b'm', b'e', b't', b'a', 0, 0, 0, 0],
        &[
            20, 0, 2, 0x80, 8, 0, 2, 0, 0, 0, 0, 3, 8, 0, 1, 0, 0, 0, 0, 1,
        ],
        &[68, 0, 1, 0x80], // elem: bitwise
        &[12, 0, 1, 0, b'b', b'i', b't', b'w', b'i', b's', b'e', 0],
        &[
            52, 0, 2, 0x80, 8, 0, 1, 0, 0, 0, 0, 1, 8, 0, 2, 0, 0, 0, 0, 1,
        ],
        &[8, 0, 3, 0, 0, 0, 0, 4], // len 4, inside the data nest
        &[12, 0, 4, 0x80, 8, 0, 1, 0, 0xff, 0xff, 0xef, 0xff],
        &[12, 0, 5, 0x80, 8, 0, 1, 0, 0x00, 0x00, 0x10, 0x00],
        &[36, 0, 1, 0x80], // elem: meta set
        &[9, 0, 1, 0, b'm', b'e', b't', b'a', 0, 0, 0, 0],
        &[
            20, 0, 2, 0x80, 8, 0, 2, 0, 0, 0, 0, 3, 8, 0, 3, 0, 0, 0, 0, 1,
        ],
    ]
    .concat();
    assert_eq!(bytes, want);
    let (fam, table, chain, exprs) = nft::decode_rule(m).unwrap();
    assert_eq!(
        (fam, table.as_str(), chain.as_str()),
        (NFPROTO_INET, "t", "c")
    );
    assert_eq!(exprs, rule);
}

/// A batch of the compiled marking decodes back into the tables it came from: the plain
/// marking, with destinations sent plain (IPv4 and IPv6, host and wider prefixes) and strict
/// mode's exemptions for them, and while the node joins.
#[test]
fn marking_batches_round_trip() {
    let plain = wgmesh_core::Marking {
        plain_destinations: ["10.0.0.3/32", "10.65.3.0/24", "fd10::3/128", "fd65:3::/64"]
            .iter()
            .map(|d| d.parse().unwrap())
            .collect(),
        strict: Some(wgmesh_core::StrictFilter {
            interface_v4: Some("wireguard.cali".into()),
            exempt_udp_ports: vec![51820],
            ..Default::default()
        }),
        ..marking()
    };
    let joining = wgmesh_core::Marking {
        plain_all: true,
        ..marking()
    };
    // 3,000 pod IPs of a phased node: the elements span several messages.
    let many = wgmesh_core::Marking {
        plain_destinations: (0..3000u32)
            .map(|i| {
                let a = std::net::Ipv4Addr::from(0x0a41_0000 + 2 * i);
                IpNet::from(IpAddr::V4(a))
            })
            .chain((0..3000u128).map(|i| {
                let a = std::net::Ipv6Addr::from((0xfd10u128 << 112) + 2 * i);
                IpNet::from(IpAddr::V6(a))
            }))
            .collect(),
        ..marking()
    };
    for m in [marking(), plain, joining, many] {
        marking_round_trip(&m);
    }
}

fn marking() -> wgmesh_core::Marking {
    wgmesh_core::Marking {
        table: "wgmesh".into(),
        firewall_mark: 0x100000,
        skip_interfaces: vec!["lo".into(), "wireguard.cali".into()],
        skip_interface_prefixes: vec!["cali".into()],
        mark_arp: true,
        mark_output: false,
        plain_tcp_endpoints: vec![
            "10.0.0.1:6443".parse().unwrap(),
            "[fd00::1]:443".parse().unwrap(),
        ],
        strict: None,
        plain_destinations: vec![],
        plain_all: false,
    }
}

fn marking_round_trip(m: &wgmesh_core::Marking) {
    let tables = crate::marking::compile(m);
    let batch = nft::replace_batch("wgmesh", &tables);
    // begin, 2 x (newtable, deltable), then per table: newtable, chains, rules; end
    let rules: usize = tables
        .iter()
        .map(|t| t.chains.iter().map(|c| c.rules.len()).sum::<usize>())
        .sum();
    let chains: usize = tables.iter().map(|t| t.chains.len()).sum();
    // Each set: NEWSET, then its elements in NEWSETELEMs of at most ELEMENTS_PER_MESSAGE.
    let sets: usize = tables
        .iter()
        .flat_map(|t| &t.sets)
        .map(|s| 1 + s.elements.len().div_ceil(nft::ELEMENTS_PER_MESSAGE))
        .sum();
    assert_eq!(
        batch.len(),
        1 + 4 + tables.len() + sets + chains + rules + 1
    );
    let mut back: Vec<NftTable> = Vec::new();
    for (_, msg) in &batch[5..batch.len() - 1] {
        // Through bytes and back, as the kernel would receive it.
        let bytes = serialize(msg, 0, 1);
        // An attribute's length is 16 bits: a message that fits has every attribute fit.
        assert!(bytes.len() <= usize::from(u16::MAX), "{}", bytes.len());
        let (_, msg) = parse::<netlink_packet_netfilter::NetfilterMessage>(&bytes, "test").unwrap();
        if let Ok((family, name, flags)) = nft::decode_table(&msg) {
            back.push(NftTable {
                family,
                name,
                flags,
                chains: Vec::new(),
                sets: Vec::new(),
            });
        } else if let Ok((_, _, c)) = nft::decode_chain(&msg) {
            back.last_mut().unwrap().chains.push(c);
        } else if let Ok((_, table, set)) = nft::decode_set(&msg) {
            let t = back.last_mut().unwrap();
            assert_eq!(t.name, table);
            assert!(
                t.chains.is_empty(),
                "sets come before the rules that use them"
            );
            t.sets.push(set);
        } else if let Ok((_, _, set, elements)) = nft::decode_set_elements(&msg) {
            // The reader's walk of the bytes finds the same elements.
            assert_eq!(nft::set_elements_from_bytes(&bytes).unwrap(), elements);
            let s = back.last_mut().unwrap().sets.last_mut().unwrap();
            assert_eq!(s.name, set);
            s.elements.extend(elements);
        } else {
            let (_, _, chain, exprs) = nft::decode_rule(&msg).unwrap();
            let t = back.last_mut().unwrap();
            assert_eq!(t.chains.last().unwrap().name, chain);
            t.chains.last_mut().unwrap().rules.push(exprs);
        }
    }
    assert_eq!(back, tables);
}

#[test]
fn parsers_refuse_garbage_without_panicking() {
    for bytes in [
        &[][..],
        &[1, 2, 3],
        &[20, 0, 0, 0, 24, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0],
        &[
            40, 0, 0, 0, 24, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            255, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    ] {
        let _ = parse::<RouteNetlinkMessage>(bytes, "garbage");
        let _ = parse::<GenlMessage<WireguardMessage>>(bytes, "garbage");
        let _ = parse::<netlink_packet_netfilter::NetfilterMessage>(bytes, "garbage");
        let _ = super::messages(bytes).count();
    }
    assert!(parse::<RouteNetlinkMessage>(&[1, 2, 3], "garbage").is_err());
}

/// Strict mode's `fib saddr oifname` and `counter` expressions, which the netfilter crate does
/// not model: their attributes as the kernel's uapi numbers them (`NFTA_FIB_DREG` 1,
/// `_RESULT` 2, `_FLAGS` 3; `NFTA_COUNTER_BYTES` 1, `_PACKETS` 2; big-endian), and back.
#[test]
fn fib_and_counter_expressions_encode_as_the_uapi_says() {
    use crate::marking::{Expr, FIB_F_SADDR, FIB_RESULT_OIFNAME, NFPROTO_INET};
    let rule = vec![
        Expr::Fib {
            flags: FIB_F_SADDR,
            result: FIB_RESULT_OIFNAME,
            dreg: 1,
        },
        Expr::Counter {
            packets: 0,
            bytes: 0,
        },
    ];
    let m = nft::new_rule(NFPROTO_INET, "t", "c", &rule);
    let bytes = serialize(&m, 0x0c05, 8);
    let want: Vec<u8> = [
        // nlmsghdr: len 124, NEWRULE, REQUEST|ACK|CREATE|APPEND, seq 8
        &[124, 0, 0, 0, 0x06, 0x0a, 0x05, 0x0c, 8, 0, 0, 0, 0, 0, 0, 0][..],
        &[1, 0, 0, 0],
        &[6, 0, 1, 0, b't', 0, 0, 0],
        &[6, 0, 2, 0, b'c', 0, 0, 0],
        &[88, 0, 4, 0x80], // NFTA_RULE_EXPRESSIONS
        &[40, 0, 1, 0x80], // elem: fib
        &[8, 0, 1, 0, b'f', b'i', b'b', 0],
        &[28, 0, 2, 0x80],
        &[8, 0, 1, 0, 0, 0, 0, 1], // dreg 1
        &[8, 0, 2, 0, 0, 0, 0, 2], // result OIFNAME
        &[8, 0, 3, 0, 0, 0, 0, 1], // flags SADDR
        &[44, 0, 1, 0x80],         // elem: counter
        &[12, 0, 1, 0, b'c', b'o', b'u', b'n', b't', b'e', b'r', 0],
        &[28, 0, 2, 0x80],
        &[12, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], // bytes
        &[12, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0], // packets
    ]
    .concat();
    assert_eq!(bytes, want);
    assert_eq!(nft::decode_rule(&m).unwrap().3, rule);
    // A dump's counts come back.
    let counted = vec![Expr::Counter {
        packets: 7,
        bytes: 1 << 40,
    }];
    let m = nft::new_rule(NFPROTO_INET, "t", "c", &counted);
    assert_eq!(nft::decode_rule(&m).unwrap().3, counted);
}

/// The figure of BENCHMARKS.md ("Phases: plain destinations as interval sets"): messages and
/// bytes of the batch that installs 11,000 plain /32s (100 phased nodes of 110 pod IPs), as
/// interval sets now and as one rule per prefix and chain before, and the time to compile
/// and encode it. `cargo test -p wgmesh-netlink --lib plain_destination_batch_size --
/// --ignored --nocapture`.
#[test]
#[ignore = "a measurement for BENCHMARKS.md, not a check"]
fn plain_destination_batch_size() {
    use crate::marking::{Expr, REG_1};
    let prefixes: Vec<IpNet> = (0..11_000u32)
        .map(|i| IpNet::from(IpAddr::V4(std::net::Ipv4Addr::from(0x0a41_0000 + 3 * i))))
        .collect();
    let m = wgmesh_core::Marking {
        plain_destinations: prefixes.clone(),
        plain_tcp_endpoints: vec![],
        ..marking()
    };
    let bytes_of = |batch: &[nft::NftRequest]| -> usize {
        batch
            .iter()
            .map(|(_, msg)| serialize(msg, 0, 1).len())
            .sum()
    };
    let start = std::time::Instant::now();
    let tables = crate::marking::compile(&m);
    let batch = nft::replace_batch("wgmesh", &tables);
    let bytes = bytes_of(&batch);
    let after = start.elapsed();
    let start = std::time::Instant::now();
    let mut decoded = 0;
    for (_, msg) in &batch {
        let bytes = serialize(msg, 0, 1);
        let (_, msg) = parse::<netlink_packet_netfilter::NetfilterMessage>(&bytes, "test").unwrap();
        if let Ok((_, _, _, e)) = nft::decode_set_elements(&msg) {
            decoded += e.len();
        }
    }
    let parsed = start.elapsed();
    let start = std::time::Instant::now();
    let mut walked = 0;
    for (_, msg) in &batch {
        if let netlink_packet_netfilter::NetfilterMessageInner::NfTables(
            netlink_packet_netfilter::nftables::NfTablesMessage::NewSetElement(_),
        ) = &msg.inner
        {
            walked += nft::set_elements_from_bytes(&serialize(msg, 0, 1))
                .unwrap()
                .len();
        }
    }
    println!(
        "read back {decoded} elements: crate parser {parsed:?}, byte walk {walked} in {:?}",
        start.elapsed()
    );
    // Before: one rule per prefix in prerouting and in output (family, address, mark).
    let start = std::time::Instant::now();
    let mut old = crate::marking::compile(&wgmesh_core::Marking {
        plain_destinations: vec![],
        ..m.clone()
    });
    let mark = |net: &IpNet| {
        let IpNet::V4(n) = net else { unreachable!() };
        vec![
            Expr::Meta {
                key: 15,
                dreg: REG_1,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: 0,
                data: vec![2],
            },
            Expr::Payload {
                dreg: REG_1,
                base: 1,
                offset: 16,
                len: 4,
            },
            Expr::Cmp {
                sreg: REG_1,
                op: 0,
                data: n.addr().octets().to_vec(),
            },
            Expr::Meta {
                key: 3,
                dreg: REG_1,
            },
            Expr::Bitwise {
                sreg: REG_1,
                dreg: REG_1,
                len: 4,
                mask: (!0x100000u32).to_ne_bytes().to_vec(),
                xor: 0x100000u32.to_ne_bytes().to_vec(),
            },
            Expr::MetaSet {
                key: 3,
                sreg: REG_1,
            },
        ]
    };
    let rules: Vec<Vec<Expr>> = prefixes.iter().map(mark).collect();
    old[0].chains[0].rules.splice(2..2, rules.clone());
    old[0].chains.push(crate::marking::NftChain {
        name: "output".into(),
        kind: Some("route".into()),
        hook: Some(3),
        priority: Some(-150),
        policy: Some(1),
        rules,
    });
    let old_batch = nft::replace_batch("wgmesh", &old);
    let old_bytes = bytes_of(&old_batch);
    let before = start.elapsed();
    println!(
        "11,000 plain /32s: sets {} messages, {} bytes, {:?}; rules per prefix {} messages, {} bytes, {:?}",
        batch.len(),
        bytes,
        after,
        old_batch.len(),
        old_bytes,
        before
    );
    assert!(bytes < old_bytes);
}
