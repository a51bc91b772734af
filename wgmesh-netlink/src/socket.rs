//! A blocking netlink socket (over `netlink-sys`) that pipelines requests: it sends many
//! messages per `sendmsg`, keeps a bounded number of acknowledgements outstanding (so the
//! socket's receive buffer never overflows), and matches replies to requests by sequence
//! number.

use std::collections::HashMap;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr};

use crate::wire::{NLMSG_DONE, NLMSG_ERROR};

/// How many acknowledged requests may be in flight at once.
const WINDOW: usize = 64;
/// How many bytes one `sendmsg` carries at most (when requests are not grouped explicitly).
const SEND_CHUNK: usize = 64 * 1024;
const RECV_BUF: usize = 1 << 20;

/// The outcome of one request: its reply messages (payloads after the netlink header), or the
/// errno the kernel answered.
pub(crate) type Outcome = Result<Vec<Vec<u8>>, i32>;

/// One request: a complete message (its sequence number already set) and whether the kernel
/// will answer it (with `NLM_F_ACK` or as a dump/get).
pub(crate) struct Request {
    pub(crate) bytes: Vec<u8>,
    pub(crate) answered: bool,
}

fn seq_of(m: &[u8]) -> u32 {
    u32::from_ne_bytes([m[8], m[9], m[10], m[11]])
}

pub(crate) struct NlSocket {
    sock: Socket,
    next_seq: u32,
    buf: Vec<u8>,
    /// Messages sent since creation (statistics).
    pub(crate) sent: usize,
}

impl NlSocket {
    /// A socket whose every wait for an answer ends after `timeout` (`None`: never) with an
    /// error of kind [`std::io::ErrorKind::TimedOut`]. Answers that arrive later are told
    /// apart by their sequence numbers and dropped, so the socket stays usable.
    pub(crate) fn new(protocol: isize, timeout: Option<Duration>) -> std::io::Result<Self> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        rustix::net::sockopt::set_socket_timeout(
            &sock,
            rustix::net::sockopt::Timeout::Recv,
            timeout,
        )?;
        let _ = sock.set_rx_buf_sz(4 * RECV_BUF);
        let _ = sock.set_ext_ack(true);
        // Errors need not echo the whole request back.
        let _ = sock.set_cap_ack(true);
        Ok(Self {
            sock,
            next_seq: 1,
            buf: Vec::with_capacity(RECV_BUF),
            sent: 0,
        })
    }

    /// Reserves `n` consecutive sequence numbers.
    pub(crate) fn seqs(&mut self, n: usize) -> u32 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(n as u32).max(1);
        s
    }

    /// Sends the requests, in order, and collects every answer. `groups` says which requests
    /// must share one `sendmsg` (an nf_tables batch); `None` packs them freely.
    pub(crate) fn transact(
        &mut self,
        reqs: &[Request],
        groups: Option<&[std::ops::Range<usize>]>,
    ) -> std::io::Result<Vec<Outcome>> {
        let index: HashMap<u32, usize> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| (seq_of(&r.bytes), i))
            .collect();
        let mut outcomes: Vec<Option<Outcome>> = (0..reqs.len()).map(|_| None).collect();
        let mut partial: Vec<Vec<Vec<u8>>> = vec![Vec::new(); reqs.len()];
        let mut outstanding = 0usize;
        let answered: Vec<bool> = reqs.iter().map(|r| r.answered).collect();
        let owned_groups: Vec<std::ops::Range<usize>>;
        let groups = match groups {
            Some(g) => g,
            None => {
                let mut g = Vec::new();
                let mut start = 0;
                let mut bytes = 0;
                let mut answered = 0;
                for (i, r) in reqs.iter().enumerate() {
                    if i > start && (bytes + r.bytes.len() > SEND_CHUNK || answered >= WINDOW / 2) {
                        g.push(start..i);
                        start = i;
                        bytes = 0;
                        answered = 0;
                    }
                    bytes += r.bytes.len();
                    answered += usize::from(r.answered);
                }
                if start < reqs.len() {
                    g.push(start..reqs.len());
                }
                owned_groups = g;
                &owned_groups
            }
        };
        let mut out = Vec::with_capacity(SEND_CHUNK);
        for g in groups {
            while outstanding >= WINDOW {
                self.receive(
                    &index,
                    &answered,
                    &mut outcomes,
                    &mut partial,
                    &mut outstanding,
                )?;
            }
            out.clear();
            for r in &reqs[g.clone()] {
                out.extend_from_slice(&r.bytes);
                outstanding += usize::from(r.answered);
            }
            self.sock.send(&out, 0)?;
            self.sent += g.len();
        }
        // Wipe what may hold a private key.
        zeroize::Zeroize::zeroize(&mut out);
        // The kernel answers one socket's requests in order: once the last answered request
        // has its outcome, every earlier one has been processed.
        if let Some(last) = reqs.iter().rposition(|r| r.answered) {
            while outcomes[last].is_none() {
                self.receive(
                    &index,
                    &answered,
                    &mut outcomes,
                    &mut partial,
                    &mut outstanding,
                )?;
            }
        }
        Ok(outcomes
            .into_iter()
            .zip(partial)
            .map(|(o, p)| o.unwrap_or(Ok(p)))
            .collect())
    }

    fn receive(
        &mut self,
        index: &HashMap<u32, usize>,
        answered: &[bool],
        outcomes: &mut [Option<Outcome>],
        partial: &mut [Vec<Vec<u8>>],
        outstanding: &mut usize,
    ) -> std::io::Result<()> {
        self.buf.clear();
        if let Err(e) = self.sock.recv(&mut self.buf, 0) {
            // SO_RCVTIMEO expired: EAGAIN, which says nothing of a timeout.
            return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer from the kernel within the netlink timeout",
                )
            } else {
                e
            });
        }
        let mut off = 0;
        while off + 16 <= self.buf.len() {
            let b = &self.buf[off..];
            let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if len < 16 || len > b.len() {
                break;
            }
            let ty = u16::from_ne_bytes([b[4], b[5]]);
            let seq = seq_of(b);
            let payload = &b[16..len];
            off += (len + 3) & !3;
            let Some(&i) = index.get(&seq) else {
                continue; // a late answer to an earlier run
            };
            if outcomes[i].is_some() {
                continue;
            }
            match ty {
                NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or(-libc_eproto());
                    outcomes[i] = Some(if code == 0 {
                        Ok(std::mem::take(&mut partial[i]))
                    } else {
                        Err(-code)
                    });
                    if answered[i] {
                        *outstanding = outstanding.saturating_sub(1);
                    }
                }
                NLMSG_DONE => {
                    let code = payload
                        .get(..4)
                        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or(0);
                    outcomes[i] = Some(if code < 0 {
                        Err(-code)
                    } else {
                        Ok(std::mem::take(&mut partial[i]))
                    });
                    if answered[i] {
                        *outstanding = outstanding.saturating_sub(1);
                    }
                }
                _ => partial[i].push(payload.to_vec()),
            }
        }
        Ok(())
    }
}

fn libc_eproto() -> i32 {
    71
}

#[cfg(test)]
mod tests {
    use super::*;

    const NLMSG_NOOP: u16 = 1;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;

    /// A bare `NLMSG_NOOP`: the kernel answers it only when `NLM_F_ACK` asks it to.
    fn noop(seq: u32, ack: bool) -> Request {
        let flags = NLM_F_REQUEST | if ack { NLM_F_ACK } else { 0 };
        let mut bytes = Vec::with_capacity(16);
        bytes.extend_from_slice(&16u32.to_ne_bytes());
        bytes.extend_from_slice(&NLMSG_NOOP.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        Request {
            bytes,
            answered: true,
        }
    }

    #[test]
    fn a_kernel_that_never_answers_times_out_and_the_socket_stays_usable() {
        let timeout = Duration::from_millis(200);
        // In a thread, so that a socket without the timeout fails the test instead of hanging.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = NlSocket::new(netlink_sys::protocols::NETLINK_ROUTE, Some(timeout))
                .expect("an rtnetlink socket");
            // Waiting for an answer the kernel will never send.
            let seq = s.seqs(1);
            let started = std::time::Instant::now();
            let first = s.transact(&[noop(seq, false)], None);
            let waited = started.elapsed();
            // The same socket goes on answering requests that do get an answer.
            let seq = s.seqs(2);
            let then = s.transact(&[noop(seq, true), noop(seq + 1, true)], None);
            let _ = tx.send((first, waited, then));
        });
        let (first, waited, then) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the wait for an answer that never comes must end");
        let err = first.expect_err("no answer comes");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(waited >= timeout, "{waited:?}");
        assert_eq!(then.unwrap(), [Ok(vec![]), Ok(vec![])]);
    }
}
