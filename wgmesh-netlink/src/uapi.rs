//! The cross-platform userspace configuration protocol (wireguard-go, boringtun) on
//! `/var/run/wireguard/<iface>.sock`: pure request builders and reply parsers, and the little
//! IO around them. Keys are hex in this protocol.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use wgmesh_core::{PrivateKey, PublicKey};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::state::ActualDevice;
use crate::wire::DeviceUpdate;

/// The `set=1` request for a device update (`allowed_ip` lines only add: the protocol has no
/// per-IP removal, so removal uses a throwaway peer; see [`crate::Linux`]). Ends with the
/// empty line that closes a request.
///
/// ```
/// use wgmesh_netlink::{uapi::set_request, wire::{DeviceUpdate, PeerUpdate}};
/// use wgmesh_core::PublicKey;
/// let key: PublicKey = "/r0PzTX6F0ZrW9ExPQE8zou2rh1vb20IU6SrXMiKImw=".parse()?;
/// let mut peer = PeerUpdate::new(key);
/// peer.endpoint = Some("[fd00::2]:51821".parse()?);
/// peer.allowed_ips = vec![("fd10::/120".parse()?, false)];
/// let dev = DeviceUpdate { listen_port: Some(51821), peers: vec![peer], ..Default::default() };
/// let text = set_request(&dev);
/// assert_eq!(text.as_str(), format!("set=1\nlisten_port=51821\npublic_key={}\nendpoint=[fd00::2]:51821\nallowed_ip=fd10::/120\n\n", key.to_hex()));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn set_request(dev: &DeviceUpdate) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::from("set=1\n"));
    if let Some(k) = &dev.private_key {
        if let Ok(k) = PrivateKey::from_bytes(**k) {
            s.push_str("private_key=");
            s.push_str(&k.to_hex());
            s.push('\n');
        }
    }
    if let Some(p) = dev.listen_port {
        s.push_str(&format!("listen_port={p}\n"));
    }
    if let Some(m) = dev.firewall_mark {
        s.push_str(&format!("fwmark={m}\n"));
    }
    for p in &dev.peers {
        s.push_str(&format!("public_key={}\n", p.public_key.to_hex()));
        if p.remove {
            s.push_str("remove=true\n");
            continue;
        }
        if p.update_only {
            s.push_str("update_only=true\n");
        }
        if let Some(e) = p.endpoint {
            s.push_str(&format!("endpoint={e}\n"));
        }
        if let Some(k) = p.persistent_keepalive {
            s.push_str(&format!("persistent_keepalive_interval={k}\n"));
        }
        for (ip, _) in &p.allowed_ips {
            s.push_str(&format!("allowed_ip={ip}\n"));
        }
    }
    s.push('\n');
    s
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Parses the reply to `get=1` (up to and including `errno=N`). Returns the device, or the
/// errno when it is not 0.
pub fn parse_get(text: &str) -> std::result::Result<ActualDevice, String> {
    let mut dev = ActualDevice::default();
    let mut peer: Option<PublicKey> = None;
    let mut errno = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let bad = || format!("bad {k} line");
        match k {
            "private_key" => {
                let bytes = Zeroizing::new(unhex(v).ok_or_else(bad)?);
                dev.public_key = PrivateKey::from_bytes(*bytes).ok().map(|k| k.public_key());
            }
            "listen_port" => dev.listen_port = v.parse().map_err(|_| bad())?,
            "fwmark" => dev.firewall_mark = v.parse().map_err(|_| bad())?,
            "public_key" => {
                let key = PublicKey::from_bytes(unhex(v).ok_or_else(bad)?).map_err(|_| bad())?;
                dev.peers.entry(key).or_default();
                peer = Some(key);
            }
            "endpoint" => {
                if let Some(p) = peer.and_then(|k| dev.peers.get_mut(&k)) {
                    p.endpoint = Some(v.parse().map_err(|_| bad())?);
                }
            }
            "persistent_keepalive_interval" => {
                if let Some(p) = peer.and_then(|k| dev.peers.get_mut(&k)) {
                    p.persistent_keepalive = v.parse().map_err(|_| bad())?;
                }
            }
            "allowed_ip" => {
                if let Some(p) = peer.and_then(|k| dev.peers.get_mut(&k)) {
                    let net: IpNet = v.parse().map_err(|_| bad())?;
                    p.allowed_ips.insert(net.trunc());
                }
            }
            "errno" => errno = Some(v.parse::<i32>().map_err(|_| bad())?),
            _ => {}
        }
    }
    match errno {
        Some(0) => Ok(dev),
        Some(e) => Err(format!("errno={e}")),
        None => Err("reply without errno".into()),
    }
}

/// The socket path of an interface.
pub fn socket_path(dir: &Path, ifname: &str) -> std::path::PathBuf {
    dir.join(format!("{ifname}.sock"))
}

fn transact(path: &Path, request: &str, doing: &str) -> Result<Zeroizing<String>> {
    let mut s = UnixStream::connect(path)
        .map_err(|e| Error::io(format!("{doing}: connect {}", path.display()), e))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    s.write_all(request.as_bytes())
        .map_err(|e| Error::io(format!("{doing}: write {}", path.display()), e))?;
    let mut r = BufReader::new(s);
    let mut out = Zeroizing::new(String::new());
    let mut line = Zeroizing::new(String::new());
    loop {
        line.clear();
        let n = r
            .read_line(&mut line)
            .map_err(|e| Error::io(format!("{doing}: read {}", path.display()), e))?;
        if n == 0 || line.as_str() == "\n" {
            break;
        }
        out.push_str(&line);
    }
    Ok(out)
}

/// Reads a device's configuration; `Ok(None)` when there is no socket (no device).
pub fn get(dir: &Path, ifname: &str) -> Result<Option<ActualDevice>> {
    let path = socket_path(dir, ifname);
    if !path.exists() {
        return Ok(None);
    }
    let doing = format!("read userspace WireGuard device {ifname}");
    let reply = match transact(&path, "get=1\n\n", &doing) {
        Ok(r) => r,
        // A stale socket of a daemon that is gone: no device.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    parse_get(&reply).map(Some).map_err(|d| {
        match d.strip_prefix("errno=").and_then(|e| e.parse().ok()) {
            Some(errno) => Error::Userspace { doing, errno },
            None => Error::decode(doing, d),
        }
    })
}

/// Sends a `set=1` request.
pub fn set(dir: &Path, ifname: &str, request: &str, doing: &str) -> Result<()> {
    let path = socket_path(dir, ifname);
    let reply = transact(&path, request, doing)?;
    let errno = reply
        .lines()
        .find_map(|l| l.strip_prefix("errno="))
        .and_then(|e| e.trim().parse::<i32>().ok())
        .ok_or_else(|| Error::decode(doing, "reply without errno"))?;
    if errno != 0 {
        return Err(Error::Userspace {
            doing: doing.to_owned(),
            errno,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PeerUpdate;

    #[test]
    fn get_reply_round_trip() {
        let priv_hex = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
        let pub_hex = "b85996fecc9c7f1fc6d2572a76eda11d59bcb20be8e543b15ce4bd85a8e75a33";
        let text = format!(
            "private_key={priv_hex}\nlisten_port=51820\nfwmark=1048576\npublic_key={pub_hex}\nendpoint=[fd00::2]:51821\n\
             last_handshake_time_sec=0\npersistent_keepalive_interval=25\nallowed_ip=10.65.0.0/26\nallowed_ip=fd10::/120\n\
             protocol_version=1\nerrno=0\n"
        );
        let d = parse_get(&text).unwrap();
        assert_eq!((d.listen_port, d.firewall_mark), (51820, 1048576));
        assert!(d.public_key.is_some());
        let p = d.peers.values().next().unwrap();
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(p.persistent_keepalive, 25);
        assert_eq!(p.endpoint, Some("[fd00::2]:51821".parse().unwrap()));
        assert_eq!(parse_get("errno=19\n"), Err("errno=19".into()));
        assert!(parse_get("listen_port=x\nerrno=0\n").is_err());
        assert!(parse_get("").is_err());
    }

    #[test]
    fn set_request_hides_nothing_it_should_not_and_removes_peers() {
        let key = PrivateKey::from_base64("aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=").unwrap();
        let mut rm = PeerUpdate::new(key.public_key());
        rm.remove = true;
        let dev = DeviceUpdate {
            private_key: Some(Zeroizing::new(*key.as_bytes())),
            firewall_mark: Some(0x100000),
            peers: vec![rm],
            ..Default::default()
        };
        let s = set_request(&dev);
        assert!(s.starts_with(&format!(
            "set=1\nprivate_key={}\nfwmark=1048576\n",
            key.to_hex().as_str()
        )));
        assert!(s.ends_with("remove=true\n\n"));
        assert!(!format!("{dev:?}").contains(key.to_hex().as_str()));
    }
}
