//! Traffic: ICMP echo over raw sockets (no ping(8) needed, so the same code runs on the host
//! and in the VM's busybox image), don't-fragment probes, and continuous pings that measure
//! loss while the cluster changes.
//!
//! A raw ICMP socket receives every ICMP packet of its namespace, so each [`Pinger`] uses its
//! own echo identifier and checks the replier's address.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketType, ipproto, recvfrom, sendto, socket, sockopt,
};

use crate::ns::Netns;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"wgmeshE2";

fn next_id() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(1);
    let base = (std::process::id() as u16).wrapping_mul(31);
    base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Bytes of IP and ICMP header in an echo packet: the payload of a packet of `ip_len` bytes is
/// `ip_len - header_len(family)`.
pub fn header_len(dst: IpAddr) -> usize {
    if dst.is_ipv4() { 20 + 8 } else { 40 + 8 }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What sending one echo request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The kernel took it.
    Ok,
    /// The kernel refused it locally: too big for the path with DF set (`EMSGSIZE`).
    TooBig,
    /// Another local error (`errno`).
    Error(i32),
}

/// An ICMP echo sender/receiver whose socket lives in one namespace.
#[derive(Debug)]
pub struct Pinger {
    fd: OwnedFd,
    id: u16,
    v4: bool,
}

impl Pinger {
    /// A raw ICMP (or ICMPv6) socket created in `ns`, for destinations of `dst`'s family;
    /// with `dont_fragment`, path MTU discovery is forced (DF set, oversize refused locally).
    pub fn open(ns: &Netns, dst: IpAddr, dont_fragment: bool) -> Result<Self> {
        let v4 = dst.is_ipv4();
        let fd = ns.run_in(move || -> Result<OwnedFd> {
            let fd = if v4 {
                socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::ICMP))
            } else {
                socket(AddressFamily::INET6, SocketType::RAW, Some(ipproto::ICMPV6))
            }
            .map_err(|e| Error::new(format!("raw ICMP socket: {e}")))?;
            if dont_fragment {
                if v4 {
                    sockopt::set_ip_mtu_discover(&fd, sockopt::Ipv4PathMtuDiscovery::DO)
                } else {
                    sockopt::set_ipv6_mtu_discover(&fd, sockopt::Ipv6PathMtuDiscovery::DO)
                }
                .map_err(|e| Error::new(format!("IP_MTU_DISCOVER: {e}")))?;
            }
            Ok(fd)
        })??;
        Ok(Self {
            fd,
            id: next_id(),
            v4,
        })
    }

    /// Binds the socket to a source address (one of its namespace's).
    pub fn bind(&self, src: IpAddr) -> Result<()> {
        rustix::net::bind(&self.fd, &SocketAddr::new(src, 0))
            .map_err(|e| Error::new(format!("binding to {src}: {e}")))
    }

    /// Sends echo request `seq` to `dst` as an IP packet of `ip_len` bytes in total.
    pub fn send(&self, dst: IpAddr, seq: u16, ip_len: usize) -> Sent {
        let payload = ip_len.saturating_sub(header_len(dst)).max(MAGIC.len());
        let mut pkt = vec![0u8; 8 + payload];
        pkt[0] = if self.v4 { 8 } else { 128 };
        pkt[4..6].copy_from_slice(&self.id.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        pkt[8..8 + MAGIC.len()].copy_from_slice(MAGIC);
        if self.v4 {
            let sum = checksum(&pkt);
            pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        } // ICMPv6: the kernel computes the checksum of raw ICMPv6 sockets.
        match sendto(&self.fd, &pkt, SendFlags::empty(), &SocketAddr::new(dst, 0)) {
            Ok(_) => Sent::Ok,
            Err(Errno::MSGSIZE) => Sent::TooBig,
            Err(e) => Sent::Error(e.raw_os_error()),
        }
    }

    /// Waits until `deadline` for an echo reply from `from` to this pinger; returns its sequence
    /// number.
    pub fn recv(&self, from: IpAddr, deadline: Instant) -> Option<u16> {
        let mut buf = [0u8; 65536];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let left = left.max(Duration::from_millis(1));
            sockopt::set_socket_timeout(&self.fd, sockopt::Timeout::Recv, Some(left)).ok()?;
            let (n, addr) = match recvfrom(&self.fd, &mut buf, RecvFlags::empty()) {
                Ok((n, _, addr)) => (n, addr),
                Err(Errno::AGAIN | Errno::INTR) => continue,
                Err(_) => return None,
            };
            let pkt = &buf[..n];
            let (src, icmp) = if self.v4 {
                if n < 20 {
                    continue;
                }
                let ihl = usize::from(pkt[0] & 0x0f) * 4;
                let src = IpAddr::from([pkt[12], pkt[13], pkt[14], pkt[15]]);
                (Some(src), pkt.get(ihl..).unwrap_or_default())
            } else {
                let src = addr
                    .and_then(|a| SocketAddr::try_from(a).ok())
                    .map(|a| a.ip());
                (src, pkt)
            };
            let reply_type = if self.v4 { 0 } else { 129 };
            if icmp.len() < 8 + MAGIC.len()
                || icmp[0] != reply_type
                || u16::from_be_bytes([icmp[4], icmp[5]]) != self.id
                || &icmp[8..8 + MAGIC.len()] != MAGIC
                || src != Some(from)
            {
                continue;
            }
            return Some(u16::from_be_bytes([icmp[6], icmp[7]]));
        }
    }

    /// Sends `count` echo requests of `ip_len` bytes, one at a time, each waiting up to
    /// `timeout` for its reply.
    pub fn ping(&self, dst: IpAddr, count: u16, ip_len: usize, timeout: Duration) -> PingStats {
        let mut stats = PingStats::default();
        for seq in 0..count {
            match self.send(dst, seq, ip_len) {
                Sent::Ok => stats.sent += 1,
                Sent::TooBig => {
                    stats.too_big += 1;
                    continue;
                }
                Sent::Error(e) => {
                    stats.errors.push(e);
                    continue;
                }
            }
            let deadline = Instant::now() + timeout;
            while let Some(got) = self.recv(dst, deadline) {
                if got == seq {
                    stats.received += 1;
                    break;
                }
            }
        }
        stats
    }
}

impl Pinger {
    /// Sends `count` echo requests of `ip_len` bytes back to back, then collects replies
    /// until `wait` has passed (for flows that should get none).
    pub fn burst(&self, dst: IpAddr, count: u16, ip_len: usize, wait: Duration) -> PingStats {
        let mut stats = PingStats::default();
        for seq in 0..count {
            match self.send(dst, seq, ip_len) {
                Sent::Ok => stats.sent += 1,
                Sent::TooBig => stats.too_big += 1,
                Sent::Error(e) => stats.errors.push(e),
            }
        }
        let deadline = Instant::now() + wait;
        let mut got = HashSet::new();
        while let Some(seq) = self.recv(dst, deadline) {
            if seq < count {
                got.insert(seq);
            }
        }
        stats.received = got.len() as u32;
        stats
    }
}

/// The result of a series of echo requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PingStats {
    /// Requests the kernel accepted.
    pub sent: u32,
    /// Replies received in time.
    pub received: u32,
    /// Requests refused locally with `EMSGSIZE`.
    pub too_big: u32,
    /// Other local errors (errno values).
    pub errors: Vec<i32>,
}

/// Pings `dst` from `ns` until a reply comes or `timeout` passes (waiting for handshakes and
/// routes to settle). Returns how long it took.
pub fn wait_reachable(ns: &Netns, dst: IpAddr, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let pinger = Pinger::open(ns, dst, false)?;
    let mut seq = 0u16;
    while start.elapsed() < timeout {
        let next = Instant::now() + Duration::from_millis(500);
        // Any reply proves reachability, also a late one to an earlier request (replies
        // queued behind a handshake arrive together).
        if pinger.send(dst, seq, 84) == Sent::Ok && pinger.recv(dst, next).is_some() {
            return Ok(start.elapsed());
        }
        // Never faster than one request per 500 ms, whatever recv returned.
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
        seq = seq.wrapping_add(1);
    }
    Err(Error::new(format!(
        "{dst} not reachable from {} within {timeout:?}",
        ns.name()
    )))
}

/// A ping that runs in the background at a fixed rate until stopped.
pub struct ContinuousPing {
    /// What it measures, for reports.
    pub label: String,
    stop: Arc<AtomicBool>,
    sender: Option<thread::JoinHandle<u32>>,
    receiver: Option<thread::JoinHandle<HashSet<u16>>>,
}

/// The outcome of a [`ContinuousPing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// What was measured.
    pub label: String,
    /// Requests sent.
    pub sent: u32,
    /// Requests never answered.
    pub lost: u32,
}

impl ContinuousPing {
    /// Starts pinging `dst` from `ns` every `interval`.
    pub fn start(label: &str, ns: &Netns, dst: IpAddr, interval: Duration) -> Result<Self> {
        let pinger = Arc::new(Pinger::open(ns, dst, false)?);
        let stop = Arc::new(AtomicBool::new(false));
        let done_sending = Arc::new(AtomicBool::new(false));
        let sender = {
            let (pinger, stop, done) = (pinger.clone(), stop.clone(), done_sending.clone());
            thread::spawn(move || {
                let mut seq: u16 = 0;
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) && seq < u16::MAX {
                    let _ = pinger.send(dst, seq, 84);
                    seq += 1;
                    next += interval;
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        thread::sleep(d);
                    }
                }
                done.store(true, Ordering::Relaxed);
                u32::from(seq)
            })
        };
        let receiver = {
            let done = done_sending;
            thread::spawn(move || {
                let mut got = HashSet::new();
                let mut grace_end: Option<Instant> = None;
                loop {
                    if done.load(Ordering::Relaxed) && grace_end.is_none() {
                        // Replies of the last requests may still be on their way.
                        grace_end = Some(Instant::now() + Duration::from_secs(2));
                    }
                    if grace_end.is_some_and(|g| Instant::now() >= g) {
                        break;
                    }
                    if let Some(seq) = pinger.recv(dst, Instant::now() + Duration::from_millis(50))
                    {
                        got.insert(seq);
                    }
                }
                got
            })
        };
        Ok(Self {
            label: label.to_owned(),
            stop,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Stops sending (without waiting); [`Self::stop`] then collects the result. Halting
    /// every stream first lets their 2-second waits for late replies run together.
    pub fn halt(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops sending, waits for late replies (2 s) and returns the loss.
    pub fn stop(mut self) -> Result<Loss> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .sender
            .take()
            .map(|h| h.join())
            .transpose()
            .map_err(|_| Error::new("ping sender panicked"))?
            .unwrap_or(0);
        let got = self
            .receiver
            .take()
            .map(|h| h.join())
            .transpose()
            .map_err(|_| Error::new("ping receiver panicked"))?
            .unwrap_or_default();
        let received = got.iter().filter(|s| u32::from(**s) < sent).count() as u32;
        Ok(Loss {
            label: self.label.clone(),
            sent,
            lost: sent - received,
        })
    }
}

impl Drop for ContinuousPing {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
    }
}
