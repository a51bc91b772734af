//! Sending and receiving: many messages per datagram, at most [`WINDOW`] acknowledgements in
//! flight (so the socket's receive buffer never overflows), answers matched to requests by
//! sequence number. Nothing here knows what the messages mean.

use std::collections::HashMap;
use std::ops::Range;

use netlink_packet_core::NetlinkSerializable;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{DecodeError, Error, Result};
use crate::io::KernelIo;
use crate::wire::ack::{AckRepr, ErrorPacket};
use crate::wire::{self, NLM_F_ACK, NLM_F_DUMP, NLMSG_DONE, NLMSG_ERROR, Protocol};

/// How many acknowledged requests may be in flight at once.
pub(crate) const WINDOW: usize = 64;
/// How many bytes one datagram carries at most (when requests are not grouped explicitly).
pub(crate) const SEND_CHUNK: usize = 64 * 1024;

/// One message to send, its sequence number set.
pub(crate) struct Outgoing {
    /// The whole message (may hold a private key: wiped on drop).
    pub(crate) bytes: Zeroizing<Vec<u8>>,
    /// Whether the kernel answers it (`NLM_F_ACK` or a dump).
    pub(crate) answered: bool,
    seq: u32,
}

#[cfg(test)]
impl Outgoing {
    /// A message serialized elsewhere, with its flags and sequence number.
    pub(crate) fn raw(bytes: Vec<u8>, flags: u16, seq: u32) -> Self {
        Self {
            bytes: Zeroizing::new(bytes),
            answered: flags & (NLM_F_ACK | NLM_F_DUMP) != 0,
            seq,
        }
    }
}

/// The kernel's refusal of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The positive errno.
    pub(crate) errno: i32,
    /// The kernel's explanation, when it sent one.
    pub(crate) message: Option<String>,
}

impl Refusal {
    /// The refusal as an error of what was being done.
    pub(crate) fn error(&self, doing: impl Into<String>) -> Error {
        let e = Error::kernel(doing, self.errno);
        match &self.message {
            Some(m) => e.with_kernel_message(m.clone()),
            None => e,
        }
    }
}

/// The answer to one request: its reply messages (whole, header included), or the refusal.
pub(crate) type Answer = std::result::Result<Vec<Vec<u8>>, Refusal>;

/// How one request ended, its replies handed out as they came
/// ([`Pipeline::transact_each`]): acknowledged (or not answered), or refused.
pub(crate) type Outcome = std::result::Result<(), Refusal>;

/// Sequence numbers, per protocol, and the receive buffer.
#[derive(Debug)]
pub(crate) struct Pipeline {
    next_seq: [u32; 3],
    buf: Vec<u8>,
    /// Messages sent so far.
    pub(crate) sent: usize,
    /// Whether a reply came marked `NLM_F_DUMP_INTR` since [`Self::take_interrupted`].
    interrupted: bool,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self {
            next_seq: [1; 3],
            buf: Vec::new(),
            sent: 0,
            interrupted: false,
        }
    }
}

impl Pipeline {
    /// Serializes `payload` with the next sequence number of `protocol`.
    pub(crate) fn message<I: NetlinkSerializable + ?Sized>(
        &mut self,
        protocol: Protocol,
        flags: u16,
        payload: &I,
    ) -> Outgoing {
        let slot = &mut self.next_seq[protocol.index()];
        let seq = *slot;
        *slot = slot.wrapping_add(1).max(1);
        Outgoing {
            bytes: Zeroizing::new(wire::serialize(payload, flags, seq)),
            answered: flags & (NLM_F_ACK | NLM_F_DUMP) != 0,
            seq,
        }
    }

    /// Sends the requests, in order, and collects every answer. `groups` says which requests
    /// must share one datagram (an nf_tables batch); `None` packs them freely. A request the
    /// kernel does not answer gets `Ok` with no replies.
    pub(crate) fn transact<K: KernelIo + ?Sized>(
        &mut self,
        io: &mut K,
        protocol: Protocol,
        reqs: &[Outgoing],
        groups: Option<&[Range<usize>]>,
        doing: &str,
    ) -> Result<Vec<Answer>> {
        let mut partial: Vec<Vec<Vec<u8>>> = vec![Vec::new(); reqs.len()];
        let outcomes = self.transact_each(io, protocol, reqs, groups, doing, &mut |i, m| {
            partial[i].push(m.to_vec());
            Ok(())
        })?;
        Ok(outcomes
            .into_iter()
            .zip(partial)
            .map(|(o, p)| o.map(|()| p))
            .collect())
    }

    /// [`Self::transact`], handing each reply message to `each` (with the index of its
    /// request) as it arrives instead of keeping it: a dump of 560,000 routes kept as
    /// messages took 70–85 MB before the first was parsed. After an error of `each`, the
    /// rest of the replies are received and dropped (a socket whose dump was left unread
    /// refuses the next one with `EBUSY`), and the error is returned. A request's replies
    /// come before its outcome: a refused request may have had some.
    pub(crate) fn transact_each<K: KernelIo + ?Sized>(
        &mut self,
        io: &mut K,
        protocol: Protocol,
        reqs: &[Outgoing],
        groups: Option<&[Range<usize>]>,
        doing: &str,
        each: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<Vec<Outcome>> {
        let index: HashMap<u32, usize> = reqs.iter().enumerate().map(|(i, r)| (r.seq, i)).collect();
        let mut state = Collect {
            index: &index,
            answered: reqs.iter().map(|r| r.answered).collect(),
            outcomes: (0..reqs.len()).map(|_| None).collect(),
            outstanding: 0,
            each,
            failed: None,
        };
        let packed;
        let groups = match groups {
            Some(g) => g,
            None => {
                packed = pack(reqs);
                &packed
            }
        };
        let mut out = Zeroizing::new(Vec::with_capacity(SEND_CHUNK));
        for g in groups {
            let answered = reqs[g.clone()].iter().filter(|r| r.answered).count();
            while state.outstanding > 0 && state.outstanding + answered > WINDOW {
                self.receive(io, protocol, &mut state, doing)?;
            }
            out.clear();
            for r in &reqs[g.clone()] {
                out.extend_from_slice(&r.bytes);
                state.outstanding += usize::from(r.answered);
            }
            io.send(protocol, &out)
                .map_err(|e| Error::io(doing.to_owned(), e))?;
            self.sent += g.len();
        }
        out.zeroize();
        // The kernel answers one socket's requests in order: once the last answered request
        // has its outcome, every earlier one has been processed.
        if let Some(last) = reqs.iter().rposition(|r| r.answered) {
            while state.outcomes[last].is_none() {
                self.receive(io, protocol, &mut state, doing)?;
            }
        }
        if let Some(e) = state.failed {
            return Err(e);
        }
        Ok(state
            .outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Ok(())))
            .collect())
    }

    /// Whether a dump's reply came marked `NLM_F_DUMP_INTR` (what was dumped changed during
    /// the dump, which may have missed entries) since the last call.
    pub(crate) fn take_interrupted(&mut self) -> bool {
        std::mem::take(&mut self.interrupted)
    }

    /// Wipes the receive buffer (it may hold a device's private key, read back).
    pub(crate) fn wipe_buffer(&mut self) {
        self.buf.zeroize();
    }

    fn receive<K: KernelIo + ?Sized>(
        &mut self,
        io: &mut K,
        protocol: Protocol,
        st: &mut Collect<'_>,
        doing: &str,
    ) -> Result<()> {
        io.recv(protocol, &mut self.buf)
            .map_err(|e| Error::io(doing.to_owned(), e))?;
        for (h, m) in wire::messages(&self.buf) {
            let Some(&i) = st.index.get(&h.seq) else {
                continue; // a late answer to an earlier run
            };
            if st.outcomes[i].is_some() {
                continue;
            }
            self.interrupted |= h.flags & wire::NLM_F_DUMP_INTR != 0;
            let payload = &m[wire::HEADER_LEN..];
            let end = match h.message_type {
                NLMSG_ERROR => {
                    Some(ErrorPacket::new_error(payload, h.flags).and_then(|p| AckRepr::parse(&p)))
                }
                NLMSG_DONE => Some(AckRepr::parse(&ErrorPacket::new_done(payload, h.flags))),
                _ => None,
            };
            match end {
                Some(ack) => {
                    let ack = ack.map_err(|e: DecodeError| Error::decode(doing.to_owned(), e))?;
                    st.outcomes[i] = Some(if ack.code == 0 {
                        Ok(())
                    } else {
                        Err(Refusal {
                            errno: ack.code.saturating_abs(),
                            message: ack.message,
                        })
                    });
                    if st.answered[i] {
                        st.outstanding = st.outstanding.saturating_sub(1);
                    }
                }
                None if st.failed.is_none() => {
                    if let Err(e) = (st.each)(i, m) {
                        st.failed = Some(e);
                    }
                }
                None => {}
            }
        }
        Ok(())
    }
}

struct Collect<'a> {
    index: &'a HashMap<u32, usize>,
    answered: Vec<bool>,
    outcomes: Vec<Option<Outcome>>,
    outstanding: usize,
    each: &'a mut dyn FnMut(usize, &[u8]) -> Result<()>,
    /// The first error of `each`: the replies after it are dropped.
    failed: Option<Error>,
}

/// Groups requests into datagrams of at most [`SEND_CHUNK`] bytes and half a window of
/// answered requests each.
fn pack(reqs: &[Outgoing]) -> Vec<Range<usize>> {
    let mut g = Vec::new();
    let (mut start, mut bytes, mut answered) = (0, 0, 0);
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
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Sockets;
    use std::time::Duration;

    /// A bare `NLMSG_NOOP`: the kernel answers it only when `NLM_F_ACK` asks it to.
    struct Noop;

    impl NetlinkSerializable for Noop {
        fn message_type(&self) -> u16 {
            1
        }
        fn buffer_len(&self) -> usize {
            0
        }
        fn serialize(&self, _: &mut [u8]) {}
    }

    #[test]
    fn a_kernel_that_never_answers_times_out_and_the_socket_stays_usable() {
        let timeout = Duration::from_millis(200);
        // In a thread, so that a socket without the timeout fails the test instead of hanging.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = Sockets::open(Some(timeout), "/proc/sys").expect("netlink sockets");
            let mut p = Pipeline::default();
            // Waiting for an answer the kernel will never send: no ack asked, yet marked
            // answered.
            let mut silent = p.message(Protocol::Route, wire::NLM_F_REQUEST, &Noop);
            silent.answered = true;
            let started = std::time::Instant::now();
            let first = p.transact(&mut s, Protocol::Route, &[silent], None, "noop");
            let waited = started.elapsed();
            // The same socket goes on answering requests that do get an answer.
            let reqs = [
                p.message(Protocol::Route, wire::NLM_F_REQUEST | NLM_F_ACK, &Noop),
                p.message(Protocol::Route, wire::NLM_F_REQUEST | NLM_F_ACK, &Noop),
            ];
            let then = p.transact(&mut s, Protocol::Route, &reqs, None, "noop");
            let _ = tx.send((
                first.map_err(|e| e.to_string()),
                waited,
                then.map_err(|e| e.to_string()),
            ));
        });
        let (first, waited, then) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the wait for an answer that never comes must end");
        let err = first.expect_err("no answer comes");
        assert!(err.contains("no answer from the kernel"), "{err}");
        assert!(waited >= timeout, "{waited:?}");
        assert_eq!(then.unwrap(), [Ok(vec![]), Ok(vec![])]);
    }

    /// A dump whose replies are handed out as they come, and whose reader fails on the
    /// first: the error comes back, the rest of the dump is drained (the kernel would refuse
    /// the next dump with `EBUSY` otherwise), and the next dump reads every route.
    #[test]
    fn a_failed_reader_drains_its_dump() {
        use crate::state::{ActualRoute, ActualRouteKind};
        use crate::testing::FakeKernel;
        use wgmesh_core::Family;
        let mut kernel = FakeKernel::new();
        for i in 0..5_000u32 {
            kernel.add_route(ActualRoute {
                family: Family::V4,
                table: 1,
                destination: ipnet::IpNet::new(
                    std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
                    32,
                )
                .unwrap(),
                kind: ActualRouteKind::Throw,
                device: None,
                oif: None,
                gateway: None,
                metric: 0,
                tos: 0,
            });
        }
        let mut p = Pipeline::default();
        let dump = |p: &mut Pipeline, kernel: &mut FakeKernel, fail: bool| {
            let (flags, m) = crate::wire::route::route_dump(Family::V4);
            let req = p.message(Protocol::Route, flags, &m);
            let mut seen = 0;
            let out = p.transact_each(
                kernel,
                Protocol::Route,
                &[req],
                None,
                "dump",
                &mut |_, _| {
                    seen += 1;
                    match fail {
                        true => Err(Error::io("read", std::io::Error::other("refused"))),
                        false => Ok(()),
                    }
                },
            );
            (out.map_err(|e| e.to_string()), seen)
        };
        let (failed, seen) = dump(&mut p, &mut kernel, true);
        assert!(failed.unwrap_err().contains("refused"));
        assert_eq!(seen, 1);
        let (out, seen) = dump(&mut p, &mut kernel, false);
        assert_eq!(out.unwrap(), [Ok(())]);
        assert_eq!(seen, 5_000);
    }

    #[test]
    fn packing_respects_the_chunk_and_the_window() {
        let mut p = Pipeline::default();
        let reqs: Vec<Outgoing> = (0..100)
            .map(|_| p.message(Protocol::Route, wire::NLM_F_REQUEST | NLM_F_ACK, &Noop))
            .collect();
        let g = pack(&reqs);
        assert_eq!(g.len(), 4, "{g:?}"); // 32 answered requests per datagram
        assert!(g.iter().all(|r| r.len() <= WINDOW / 2));
        assert_eq!(g.last().map(|r| r.end), Some(100));
    }
}
