//! Plans as text: `wg show` style with `ip route` / `ip rule` lines, and `wg setconf` files.

use std::fmt::Write as _;

use zeroize::Zeroizing;

use crate::key::PrivateKey;
use crate::plan::{InterfacePlan, NodePlan};

/// The plan as a person reads it: each interface in `wg show` style (the private key shown as
/// `(hidden)`), then the mesh table in `ip route` style, the rules in `ip rule` style, the
/// sysctls and the nftables table.
///
/// ```
/// use wgmesh_core::{render::text, NodePlan};
/// assert!(text(&NodePlan::empty("n1")).contains("no mesh"));
/// ```
pub fn text(plan: &NodePlan) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "node: {}", plan.node);
    if plan.is_empty() {
        s.push_str(
            "  (no mesh: nothing to program; anything left from earlier plans is removed)\n",
        );
        return s;
    }
    for iface in &plan.interfaces {
        s.push('\n');
        interface_text(&mut s, iface);
    }
    let _ = writeln!(s, "\nroutes:");
    if plan.routes.is_empty() {
        s.push_str("  (none)\n");
    }
    for route in &plan.routes {
        let _ = writeln!(
            s,
            "  {}{route}",
            if route.family == crate::Family::V6 {
                "-6 "
            } else {
                ""
            }
        );
    }
    let _ = writeln!(s, "\nrules:");
    if plan.rules.is_empty() {
        s.push_str("  (none)\n");
    }
    for rule in &plan.rules {
        let _ = writeln!(
            s,
            "  {}{rule}",
            if rule.family == crate::Family::V6 {
                "-6 "
            } else {
                ""
            }
        );
    }
    if !plan.sysctls.is_empty() {
        let _ = writeln!(s, "\nsysctls:");
        for sysctl in &plan.sysctls {
            let _ = writeln!(s, "  {} = {}", sysctl.key, sysctl.value);
        }
    }
    if let Some(marking) = &plan.marking {
        let _ = writeln!(s, "\nnftables:");
        for line in marking.nft_script().lines() {
            let _ = writeln!(s, "  {}", line.replace('\t', "  "));
        }
    }
    s
}

fn interface_text(s: &mut String, iface: &InterfacePlan) {
    let _ = writeln!(s, "interface: {}", iface.name);
    match &iface.public_key {
        Some(k) => {
            let _ = writeln!(s, "  public key: {k}");
        }
        None => s.push_str("  public key: (none published yet)\n"),
    }
    s.push_str("  private key: (hidden)\n");
    let _ = writeln!(s, "  listening port: {}", iface.listen_port);
    let _ = writeln!(s, "  fwmark: {:#x}", iface.firewall_mark);
    let _ = writeln!(s, "  mtu: {}", iface.mtu);
    if iface.peers.is_empty() {
        s.push_str("  (no peers)\n");
    }
    for peer in &iface.peers {
        let _ = writeln!(s, "\npeer: {}", peer.public_key);
        let _ = writeln!(s, "  node: {}", peer.node);
        let _ = writeln!(s, "  endpoint: {}", peer.endpoint);
        let ips: Vec<String> = peer.allowed_ips.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(
            s,
            "  allowed ips: {}",
            if ips.is_empty() {
                "(none)".to_owned()
            } else {
                ips.join(", ")
            }
        );
        if let Some(k) = peer.persistent_keepalive {
            let _ = writeln!(s, "  persistent keepalive: every {k} seconds");
        }
    }
}

/// One interface in the `wg setconf` / `wg syncconf` format. With `private_key`, the file
/// holds it (the string is zeroized on drop); without, the `PrivateKey` line is left out and
/// `wg setconf` keeps the device's key.
///
/// ```
/// use wgmesh_core::{plan_node, render::setconf, spec::parse_cluster, PrivateKey};
/// let cluster = parse_cluster(r#"{"nodes":[{"name":"a","addresses":["10.0.0.1"],
///   "wireguard":{"public_key":"QfUXYghyJWDcy+xLW0o+xJVsQhurVNdqtbstTsdOp20="}}]}"#)?;
/// let plan = plan_node(&cluster, "a")?;
/// let key = PrivateKey::generate();
/// let conf = setconf(&plan.interfaces[0], Some(&key));
/// assert!(conf.starts_with("[Interface]\nPrivateKey = "));
/// assert!(conf.contains("ListenPort = 51820\nFwMark = 0x100000\n"));
/// # Ok::<(), wgmesh_core::Error>(())
/// ```
pub fn setconf(iface: &InterfacePlan, private_key: Option<&PrivateKey>) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(256 + iface.peers.len() * 160));
    s.push_str("[Interface]\n");
    if let Some(key) = private_key {
        s.push_str("PrivateKey = ");
        s.push_str(&key.to_base64());
        s.push('\n');
    }
    let _ = writeln!(s, "ListenPort = {}", iface.listen_port);
    let _ = writeln!(s, "FwMark = {:#x}", iface.firewall_mark);
    for peer in &iface.peers {
        let _ = writeln!(s, "\n# {}\n[Peer]", peer.node);
        let _ = writeln!(s, "PublicKey = {}", peer.public_key);
        let _ = writeln!(s, "Endpoint = {}", peer.endpoint);
        if !peer.allowed_ips.is_empty() {
            let ips: Vec<String> = peer.allowed_ips.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(s, "AllowedIPs = {}", ips.join(", "));
        }
        if let Some(k) = peer.persistent_keepalive {
            let _ = writeln!(s, "PersistentKeepalive = {k}");
        }
    }
    s
}
