//! Fixtures shared by the reconciler's test binaries (the in-memory kernel and the real one).

use wgmesh_core::{Cluster, PrivateKey, spec::parse_cluster};
use wgmesh_netlink::KeyRing;

/// A test key, clamped as WireGuard stores private keys (so `wg showconf` shows it as is).
pub(crate) fn key(i: u8) -> PrivateKey {
    let mut b = [i; 32];
    b[0] &= 248;
    b[31] = (b[31] & 127) | 64;
    PrivateKey::from_bytes(b).unwrap()
}

/// Four nodes seen from `a`: dual-stack `a` and `b` (b with a borrowed workload IP), IPv4-only
/// `c`, and `plain` without WireGuard. `mesh` is the body of the `mesh` object.
pub(crate) fn four_nodes(mesh: &str) -> Cluster {
    let pk = |i: u8| key(i).public_key().to_string();
    parse_cluster(&format!(
        r#"{{"mesh": {{{mesh}}},
        "nodes": [
          {{"name": "a", "addresses": ["10.0.0.1", "fd00::1"], "pod_cidrs": ["10.65.0.0/26", "fd10::/120"],
            "wireguard": {{"public_key": "{}", "public_key_v6": "{}"}}}},
          {{"name": "b", "addresses": ["10.0.0.2", "fd00::2"], "pod_cidrs": ["10.65.0.64/26", "fd10::100/120"],
            "workload_ips": ["10.65.0.5"],
            "wireguard": {{"public_key": "{}", "public_key_v6": "{}"}}}},
          {{"name": "c", "addresses": ["10.0.0.3"], "pod_cidrs": ["10.65.0.128/26"],
            "wireguard": {{"public_key": "{}"}}}},
          {{"name": "plain", "addresses": ["10.0.0.4"], "pod_cidrs": ["10.65.0.192/26"]}}
        ]}}"#,
        pk(1),
        pk(11),
        pk(2),
        pk(12),
        pk(3)
    ))
    .unwrap()
}

/// Node `a`'s private keys, one per family.
pub(crate) fn ring() -> KeyRing {
    KeyRing::per_family(Some(key(1)), Some(key(11)))
}
