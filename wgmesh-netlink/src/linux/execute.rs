//! The execution side: a change set runs phase by phase — what lowering needs that only the
//! kernel knows is looked up first (interface indexes, the per-IP removal capability, probed
//! once), then the phase is lowered purely and its requests are sent and answered.

use super::{Driver, Linux};
use crate::error::{EINVAL, EOPNOTSUPP, Error, Result};
use crate::exec::Outgoing;
use crate::io::KernelIo;
use crate::keys::KeyRing;
use crate::lower::{self, Capabilities, Keys, Request, WG_SET_FLAGS, WireGuard};
use crate::op::{Operation, Phase};
use crate::userspace::Userspace;
use crate::wire::Protocol;
use crate::wire::genl::{self, DeviceUpdate, Wg};
use crate::wire::nft::{self, NftRequest};

impl<K: KernelIo> Linux<K> {
    /// Whether this WireGuard can remove single allowed IPs (kernel: `WGALLOWEDIP_F_REMOVE_ME`,
    /// Linux 6.12+; probed once with a throwaway peer on `ifname`). Userspace: never used.
    pub fn remove_flag_supported(&mut self, ifname: &str) -> Result<bool> {
        if let Some(v) = self.remove_flag {
            return Ok(v);
        }
        let Driver::Kernel { family_id } = self.wg else {
            return Ok(false);
        };
        let probe = self.throwaway;
        let [add, remove] = lower::remove_flag_probe(ifname, probe);
        let probed = self.genl_set(family_id, &add, "probe per-IP allowed-IP removal");
        let read = match &probed {
            Ok(()) => self.kernel_device(family_id, ifname)?.0,
            Err(_) => None,
        };
        self.genl_set(family_id, &remove, "remove the probe peer")?;
        match probed {
            // Kernels without the flag refuse the unknown attribute.
            Err(e) if e.errno() != Some(EINVAL) => return Err(e),
            _ => {}
        }
        let supported = read
            .and_then(|d| d.peers.get(&probe).map(|p| p.allowed_ips.is_empty()))
            .unwrap_or(false);
        log::info!(
            "WireGuard per-IP allowed-IP removal: {}",
            if supported {
                "supported"
            } else {
                "not supported; removing via a throwaway peer"
            }
        );
        self.remove_flag = Some(supported);
        Ok(supported)
    }

    fn genl_set(&mut self, family_id: u16, dev: &DeviceUpdate, doing: &str) -> Result<()> {
        let msgs = genl::set_messages(dev, self.config.max_message)?;
        let out: Vec<Outgoing> = msgs
            .iter()
            .map(|m| {
                self.pipeline.message(
                    Protocol::Generic,
                    WG_SET_FLAGS,
                    &Wg {
                        family_id,
                        message: &m.0,
                    },
                )
            })
            .collect();
        self.messages += out.len();
        for a in self.transact(Protocol::Generic, &out, None, doing)? {
            a.map_err(|r| r.error(doing))?;
        }
        Ok(())
    }

    /// Looks up the indexes of the links that unicast routes of `ops` leave through.
    fn resolve_indexes(&mut self, ops: &[Operation]) -> Result<()> {
        // Distinct names first: every route of a first apply names the same device (a
        // name per route, 560,000 at 5,000 nodes × 110 pods, was 17 MB of the apply).
        let missing: std::collections::BTreeSet<&str> = ops
            .iter()
            .filter_map(lower::needs_index)
            .filter(|d| !self.ifindex.contains_key(*d))
            .collect();
        let missing: Vec<String> = missing.into_iter().map(str::to_owned).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let found = self.read_links(&missing)?;
        self.ifindex
            .extend(found.into_iter().map(|(n, l)| (n, l.index)));
        Ok(())
    }

    fn capabilities(&self, remove_allowed_ip: bool) -> Capabilities {
        Capabilities {
            wireguard: match self.wg {
                Driver::Kernel { family_id } => WireGuard::Kernel {
                    family_id,
                    remove_allowed_ip,
                },
                Driver::Userspace(_) => WireGuard::Userspace,
            },
            max_message: self.config.max_message,
        }
    }

    /// Executes the operations of one phase. Returns the index (within `ops`) and error of
    /// the first failure.
    fn run_phase(
        &mut self,
        ops: &[Operation],
        keys: &KeyRing,
    ) -> std::result::Result<(), (usize, Error)> {
        // What lowering needs that only the kernel knows: link indexes, the probe.
        self.resolve_indexes(ops).map_err(|e| (0, e))?;
        let removes = ops
            .iter()
            .position(|o| matches!(o, Operation::RemoveAllowedIps { .. }));
        let remove_allowed_ip = match removes {
            Some(i) => {
                let ifname = ops[i].interface().unwrap_or_default().to_owned();
                self.remove_flag_supported(&ifname).map_err(|e| (i, e))?
            }
            None => false,
        };
        let caps = self.capabilities(remove_allowed_ip);
        let keys = Keys {
            ring: keys,
            throwaway: self.throwaway,
        };
        let changes_links = matches!(
            ops.first().map(Operation::phase),
            Some(Phase::LinkDeletes | Phase::Links)
        );
        // Lowered and sent a piece at a time, each piece's answers checked before the next
        // is made: the messages of one piece at most exist at once (at 5,000 nodes × 110
        // pods, a first apply's 560,000 route messages, made all at once, were half the
        // agent's peak heap). A failure stops the phase there: the operations before the
        // failed one have been carried out, none after its piece has been sent.
        let links = self.ifindex.clone();
        let mut result = Ok(());
        for piece in lower::chunks(ops, &caps, &keys, &links, self.config.execute_chunk) {
            result = piece.and_then(|lowered| self.send_lowered(ops, lowered));
            if result.is_err() {
                break;
            }
        }
        if changes_links {
            self.ifindex.clear();
        }
        result
    }

    /// Sends lowered requests in order: consecutive rtnetlink or WireGuard messages together,
    /// pipelined; the others one by one. Every answer has been checked when it returns.
    fn send_lowered(
        &mut self,
        ops: &[Operation],
        lowered: Vec<(usize, Request)>,
    ) -> std::result::Result<(), (usize, Error)> {
        let doing = |i: usize| ops[i].to_string();
        let mut run: Vec<(usize, Outgoing)> = Vec::new();
        let mut run_protocol = Protocol::Route;
        for (i, r) in lowered {
            let (protocol, out) = match r {
                Request::Route((flags, m)) => (
                    Protocol::Route,
                    self.pipeline.message(Protocol::Route, flags, &m),
                ),
                Request::Wireguard { family_id, message } => (
                    Protocol::Generic,
                    self.pipeline.message(
                        Protocol::Generic,
                        WG_SET_FLAGS,
                        &Wg {
                            family_id,
                            message: &message.0,
                        },
                    ),
                ),
                Request::Nft(batch) => {
                    self.flush(ops, run_protocol, &mut run)?;
                    self.send_batch(&batch, &doing(i)).map_err(|e| (i, e))?;
                    continue;
                }
                Request::Uapi { interface, text } => {
                    self.flush(ops, run_protocol, &mut run)?;
                    self.messages += 1;
                    self.userspace(i, ops)?
                        .set(&interface, &text, &doing(i))
                        .map_err(|e| (i, e))?;
                    continue;
                }
                Request::StartDaemon { interface } => {
                    self.flush(ops, run_protocol, &mut run)?;
                    self.userspace(i, ops)?
                        .start(&interface)
                        .map_err(|e| (i, e))?;
                    continue;
                }
                Request::Sysctl { key, value } => {
                    self.flush(ops, run_protocol, &mut run)?;
                    self.messages += 1;
                    self.io
                        .write_sysctl(&key, &value)
                        .map_err(|e| (i, Error::io(doing(i), e)))?;
                    continue;
                }
            };
            if protocol != run_protocol {
                self.flush(ops, run_protocol, &mut run)?;
                run_protocol = protocol;
            }
            run.push((i, out));
        }
        self.flush(ops, run_protocol, &mut run)
    }

    fn userspace(
        &self,
        i: usize,
        ops: &[Operation],
    ) -> std::result::Result<&Userspace, (usize, Error)> {
        match &self.wg {
            Driver::Userspace(u) => Ok(u),
            Driver::Kernel { .. } => Err((
                i,
                Error::NoKernelWireGuard {
                    doing: ops[i].to_string(),
                },
            )),
        }
    }

    /// Sends a run of pipelined messages of one protocol and checks every answer.
    fn flush(
        &mut self,
        ops: &[Operation],
        protocol: Protocol,
        run: &mut Vec<(usize, Outgoing)>,
    ) -> std::result::Result<(), (usize, Error)> {
        let Some(&(first, _)) = run.first() else {
            return Ok(());
        };
        let (owners, reqs): (Vec<usize>, Vec<Outgoing>) = std::mem::take(run).into_iter().unzip();
        self.messages += reqs.iter().filter(|o| o.answered).count();
        let what = match protocol {
            Protocol::Route => "rtnetlink",
            Protocol::Generic => "WireGuard generic netlink",
            Protocol::Netfilter => "nf_tables",
        };
        let out = self
            .transact(protocol, &reqs, None, what)
            .map_err(|e| (first, e))?;
        for (i, a) in owners.into_iter().zip(out) {
            if let Err(r) = a {
                if r.errno == EOPNOTSUPP && matches!(ops[i], Operation::CreateLink { .. }) {
                    return Err((
                        i,
                        Error::NoKernelWireGuard {
                            doing: ops[i].to_string(),
                        },
                    ));
                }
                return Err((i, r.error(ops[i].to_string())));
            }
        }
        Ok(())
    }

    /// One nf_tables transaction, then a `GETGEN` barrier in its own datagram: once it is
    /// answered, the batch is done.
    fn send_batch(&mut self, batch: &[NftRequest], doing: &str) -> Result<()> {
        let n = batch.len();
        let mut reqs: Vec<Outgoing> = batch
            .iter()
            .map(|(flags, m)| self.pipeline.message(Protocol::Netfilter, *flags, m))
            .collect();
        let (flags, gen_msg) = nft::get_gen();
        reqs.push(self.pipeline.message(Protocol::Netfilter, flags, &gen_msg));
        self.messages += n;
        let out = self.transact(Protocol::Netfilter, &reqs, Some(&[0..n, n..n + 1]), doing)?;
        // The batch's answers, then the barrier's.
        for a in out {
            a.map_err(|r| r.error(doing))?;
        }
        Ok(())
    }

    /// Executes `ops` phase by phase; the messages sent.
    pub(super) fn execute_ops(&mut self, ops: &[Operation], keys: &KeyRing) -> Result<usize> {
        let before = self.messages;
        let mut start = 0;
        while start < ops.len() {
            let phase = ops[start].phase();
            let end = start
                + ops[start..]
                    .iter()
                    .take_while(|o| o.phase() == phase)
                    .count();
            if let Err((i, e)) = self.run_phase(&ops[start..end], keys) {
                return Err(Error::Operation {
                    index: start + i,
                    total: ops.len(),
                    operation: ops[start + i].to_string(),
                    source: Box::new(e),
                });
            }
            start = end;
        }
        Ok(self.messages - before)
    }
}
