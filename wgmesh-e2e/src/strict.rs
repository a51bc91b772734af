//! Strict mode on real packets: what the flows table cannot send.
//!
//! - [`spoof`]: plaintext injected on the underlay under a peer's pod address. The peer node
//!   sends echo requests with its pod's source address straight out of its underlay interface
//!   (the address on its loopback meanwhile, the requests given the mesh mark by a table of
//!   this harness so that they skip the mesh table, as an attacker on the underlay would
//!   send them) and listens for the replies; the receiver's underlay counts what arrived; the
//!   receiver's applier reads strict mode's drop counter.
//! - [`control_plane`]: a TCP exchange from one node's host to a control-plane endpoint,
//!   counted on the underlay (plaintext, or WireGuard between the two hosts).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use wgmesh_core::Family;

use crate::cluster::Cluster;
use crate::count;
use crate::traffic::Pinger;
use crate::{Error, Result};

/// The harness's marking table on a spoofing node.
const SPOOF_TABLE: &str = "wgmesh_e2e_spoof";

/// What spoofed plaintext did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spoof {
    /// Requests sent.
    pub sent: u32,
    /// Replies that reached the pod whose address was spoofed (the request was delivered).
    pub delivered: u32,
    /// Spoofed packets counted on the receiving node's underlay (they did arrive).
    pub arrived: u64,
    /// Increase of the receiver's strict ingress drop counter of the family; `None` when
    /// the receiver has no strict filter.
    pub counted: Option<u64>,
}

/// Sends `count` echo requests from `from_pod`'s node, with `from_pod`'s address as source,
/// in plaintext on the underlay to `to_pod`: the address is put on the node's loopback for
/// the time of the test (so the node's socket may send from it and would receive the
/// replies), and a table of this harness gives the requests the mesh mark, so that they
/// skip the mesh table and leave on the underlay as an attacker there would send them.
pub fn spoof(
    cluster: &Cluster,
    from_pod: &str,
    to_pod: &str,
    family: Family,
    count: u16,
) -> Result<Spoof> {
    let from = cluster.pod(from_pod)?.clone();
    let to = cluster.pod(to_pod)?.clone();
    let no_addr = |p: &str| Error::new(format!("pod {p} has no {} address", family.as_str()));
    let src = from.address(family).ok_or_else(|| no_addr(from_pod))?;
    let dst = to.address(family).ok_or_else(|| no_addr(to_pod))?;
    let sender_ns = cluster.node_ns(&from.node)?;
    let receiver_ns = cluster.node_ns(&to.node)?;
    let (ip, len, nodad) = if src.is_ipv4() {
        ("ip", 32, "")
    } else {
        ("ip6", 128, " nodad")
    };
    let mark = cluster.mesh().firewall_mark;
    sender_ns.ip_batch(&format!("address add {src}/{len} dev lo{nodad}\n"))?;
    let result = (|| -> Result<Spoof> {
        sender_ns.exec(
            "nft",
            &["-f", "-"],
            Some(&format!(
                "table inet {SPOOF_TABLE} {{\n\tchain output {{\n\t\ttype route hook output priority mangle; policy accept;\n\
                 \t\t{ip} saddr {src} {ip} daddr {dst} meta mark set meta mark | {mark:#x}\n\t}}\n}}\n"
            )),
        )?;
        let spoofer = Pinger::open(sender_ns, dst, false)?;
        spoofer.bind(src)?;
        count::arm(receiver_ns, src, dst)?;
        let before = cluster.strict_drops(&to.node)?;
        let stats = spoofer.burst(dst, count, 84, crate::flows::drop_timeout());
        let arrived = count::take(receiver_ns)?.plain_in;
        let after = cluster.strict_drops(&to.node)?;
        let counted = match (before, after) {
            (Some(b), Some(a)) => Some(a[family.index()].saturating_sub(b[family.index()])),
            _ => None,
        };
        Ok(Spoof {
            sent: stats.sent,
            delivered: stats.received,
            arrived,
            counted,
        })
    })();
    let _ = sender_ns.exec("nft", &["delete", "table", "inet", SPOOF_TABLE], None);
    let removed = sender_ns.ip_batch(&format!("address del {src}/{len} dev lo\n"));
    let spoof = result?;
    removed?;
    Ok(spoof)
}

/// What a TCP exchange with a control-plane endpoint did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlane {
    /// Whether the client sent a line and read the server's answer.
    pub answered: bool,
    /// What went wrong, when it did not.
    pub error: Option<String>,
    /// Packets of the exchange that left the client's node in plaintext.
    pub plain_out: u64,
    /// Packets of the exchange that reached the server's node in plaintext.
    pub plain_in: u64,
    /// WireGuard data messages that left the client's node meanwhile.
    pub wg_data_out: u64,
    /// Increase of the server node's strict ingress drop counter of the family (`None`: no
    /// strict filter there).
    pub server_drops: Option<u64>,
}

/// Node `client`'s host connects to `endpoint` (a listener in node `server`'s namespace),
/// sends a line and reads the answer, counted on both underlays.
pub fn control_plane(
    cluster: &Cluster,
    client: &str,
    server: &str,
    endpoint: SocketAddr,
) -> Result<ControlPlane> {
    let client_ns = cluster.node_ns(client)?;
    let server_ns = cluster.node_ns(server)?;
    let client_ip = cluster
        .node(client)?
        .address(Family::of(&endpoint.ip()))
        .ok_or_else(|| Error::new(format!("node {client} has no address for {endpoint}")))?;
    let timeout = crate::flows::reply_timeout();
    let listener = server_ns
        .run_in(move || TcpListener::bind(endpoint))?
        .map_err(|e| Error::new(format!("listening on {endpoint}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::new(format!("{endpoint}: {e}")))?;
    count::arm(client_ns, client_ip, endpoint.ip())?;
    count::arm(server_ns, client_ip, endpoint.ip())?;
    let family = Family::of(&endpoint.ip());
    let before = cluster.strict_drops(server)?;
    let server_thread = std::thread::spawn(move || -> std::io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false)?;
                    conn.set_read_timeout(Some(timeout))?;
                    let mut buf = [0u8; 5];
                    conn.read_exact(&mut buf)?;
                    return conn.write_all(b"pong\n");
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    });
    let exchange = client_ns.run_in(move || -> std::io::Result<()> {
        let mut conn = TcpStream::connect_timeout(&endpoint, timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.write_all(b"ping\n")?;
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf)?;
        if &buf == b"pong\n" {
            Ok(())
        } else {
            Err(std::io::Error::other("unexpected answer"))
        }
    })?;
    let served = server_thread
        .join()
        .map_err(|_| Error::new("control-plane server panicked"))?;
    let c = count::take(client_ns)?;
    let s = count::take(server_ns)?;
    let server_drops = match (before, cluster.strict_drops(server)?) {
        (Some(b), Some(a)) => Some(a[family.index()].saturating_sub(b[family.index()])),
        _ => None,
    };
    let error = match (&exchange, &served) {
        (Ok(()), Ok(())) => None,
        (Err(e), _) => Some(format!("client: {e}")),
        (_, Err(e)) => Some(format!("server: {e}")),
    };
    Ok(ControlPlane {
        answered: error.is_none(),
        error,
        plain_out: c.plain_out,
        plain_in: s.plain_in,
        wg_data_out: c.wg_data_out,
        server_drops,
    })
}

/// One line of the strict-mode table.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// What was seen.
    pub seen: String,
    /// Whether it is what strict mode (or its absence) must do.
    pub pass: bool,
}

/// The checks as a Markdown table.
pub fn table(checks: &[Check]) -> String {
    let mut s = String::from("| check | seen | pass |\n|---|---|---|\n");
    for c in checks {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            c.name,
            c.seen,
            if c.pass { "✓" } else { "✗ FAIL" }
        ));
    }
    s
}

/// The IP of a family of a node (for endpoints).
pub fn node_ip(cluster: &Cluster, node: &str, family: Family) -> Result<IpAddr> {
    cluster
        .node(node)?
        .address(family)
        .ok_or_else(|| Error::new(format!("node {node} has no {} address", family.as_str())))
}
