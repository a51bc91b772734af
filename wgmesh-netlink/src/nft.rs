//! wgmesh's nftables table: a typed model, compiled from the plan's [`Marking`], encoded as
//! nf_tables netlink messages and decoded from the kernel's dumps.
//!
//! The table is always replaced whole in one nf_tables transaction (`NEWTABLE`, `DELTABLE`,
//! `NEWTABLE`, chains, rules between `BATCH_BEGIN` and `BATCH_END`): the kernel applies all of
//! it or none, so there is never a moment without marking, and the first `NEWTABLE` makes the
//! delete succeed whether or not the table existed.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use wgmesh_core::Marking;

use crate::nla::{NlaWriter, attrs, be32, cstr, frame};

/// `NFPROTO_INET`.
pub const NFPROTO_INET: u8 = 1;
/// `NFPROTO_ARP`.
pub const NFPROTO_ARP: u8 = 3;
/// The nftables families wgmesh's tables live in (`inet`, and `arp` for ARP marking).
pub const FAMILIES: [u8; 2] = [NFPROTO_INET, NFPROTO_ARP];

/// The `nft` name of a family number.
pub fn family_name(family: u8) -> &'static str {
    match family {
        NFPROTO_INET => "inet",
        NFPROTO_ARP => "arp",
        2 => "ip",
        10 => "ip6",
        5 => "netdev",
        7 => "bridge",
        _ => "unknown",
    }
}
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
pub(crate) const NFT_MSG_GETTABLE: u16 = 1;
pub(crate) const NFT_MSG_DELTABLE: u16 = 2;
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(crate) const NFT_MSG_GETCHAIN: u16 = 4;
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;
pub(crate) const NFT_MSG_GETRULE: u16 = 7;
pub(crate) const NFT_MSG_GETGEN: u16 = 16;

const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
pub(crate) const NLM_F_DUMP: u16 = 0x300;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

/// `NFT_META_MARK`.
pub const META_MARK: u32 = 3;
/// `NFT_META_IIFNAME`.
pub const META_IIFNAME: u32 = 6;
/// `NFT_META_NFPROTO`.
pub const META_NFPROTO: u32 = 15;
/// `NFT_META_L4PROTO`.
pub const META_L4PROTO: u32 = 16;
/// `NFT_REG_VERDICT`.
pub const REG_VERDICT: u32 = 0;
/// `NFT_REG_1`.
pub const REG_1: u32 = 1;
/// `NFT_RETURN`.
pub const VERDICT_RETURN: i32 = -5;
/// `NF_INET_PRE_ROUTING`.
pub const HOOK_PREROUTING: u32 = 0;
/// `NF_ARP_IN`.
pub const HOOK_ARP_INPUT: u32 = 0;
/// `NF_INET_LOCAL_OUT`.
pub const HOOK_OUTPUT: u32 = 3;
/// `NF_IP_PRI_RAW`.
pub const PRIORITY_RAW: i32 = -300;
/// `NF_IP_PRI_MANGLE`.
pub const PRIORITY_MANGLE: i32 = -150;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const IFNAMSIZ: usize = 16;

/// An nftables table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftTable {
    /// Family (`NFPROTO_INET` = 1, `NFPROTO_ARP` = 3).
    pub family: u8,
    /// Table name.
    pub name: String,
    /// Table flags (`NFT_TABLE_F_DORMANT` = 1 disables it).
    pub flags: u32,
    /// Chains, in order.
    pub chains: Vec<NftChain>,
}

/// A base chain with its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftChain {
    /// Chain name.
    pub name: String,
    /// Chain type (`filter`, `route`, `nat`); `None` for a regular chain.
    pub kind: Option<String>,
    /// Netfilter hook number, for base chains.
    pub hook: Option<u32>,
    /// Priority, for base chains.
    pub priority: Option<i32>,
    /// Policy verdict code (1 = accept), for base chains.
    pub policy: Option<u32>,
    /// Rules, in order; each rule a list of expressions.
    pub rules: Vec<Vec<Expr>>,
}

/// One nf_tables expression, in the subset wgmesh uses; anything else decodes as `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "expr", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Expr {
    /// Load a meta key into a register.
    Meta {
        /// `NFT_META_*`.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// Set a meta key from a register.
    MetaSet {
        /// `NFT_META_*`.
        key: u32,
        /// Source register.
        sreg: u32,
    },
    /// Compare a register with data.
    Cmp {
        /// Source register.
        sreg: u32,
        /// `NFT_CMP_*`.
        op: u32,
        /// The data compared.
        data: Vec<u8>,
    },
    /// `dreg = (sreg & mask) ^ xor`.
    Bitwise {
        /// Source register.
        sreg: u32,
        /// Destination register.
        dreg: u32,
        /// Length in bytes.
        len: u32,
        /// Mask.
        mask: Vec<u8>,
        /// Xor.
        xor: Vec<u8>,
    },
    /// Load packet bytes into a register.
    Payload {
        /// Destination register.
        dreg: u32,
        /// `NFT_PAYLOAD_*_HEADER`.
        base: u32,
        /// Offset.
        offset: u32,
        /// Length.
        len: u32,
    },
    /// A verdict.
    Verdict {
        /// Verdict code (`NFT_RETURN` = -5, …).
        code: i32,
    },
    /// An expression wgmesh does not generate.
    Other {
        /// Its name.
        name: String,
    },
}

fn mark_rule(mark: u32) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: META_MARK,
            dreg: REG_1,
        },
        Expr::Bitwise {
            sreg: REG_1,
            dreg: REG_1,
            len: 4,
            mask: (!mark).to_ne_bytes().to_vec(),
            xor: mark.to_ne_bytes().to_vec(),
        },
        Expr::MetaSet {
            key: META_MARK,
            sreg: REG_1,
        },
    ]
}

fn iifname_return(data: Vec<u8>) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: META_IIFNAME,
            dreg: REG_1,
        },
        Expr::Cmp {
            sreg: REG_1,
            op: NFT_CMP_EQ,
            data,
        },
        Expr::Verdict {
            code: VERDICT_RETURN,
        },
    ]
}

fn cmp(data: Vec<u8>) -> Expr {
    Expr::Cmp {
        sreg: REG_1,
        op: NFT_CMP_EQ,
        data,
    }
}

fn endpoint_rule(ep: &SocketAddr, destination: bool, mark: u32) -> Vec<Expr> {
    let (proto, addr, off) = match ep.ip() {
        IpAddr::V4(a) => (2u8, a.octets().to_vec(), if destination { 16 } else { 12 }),
        IpAddr::V6(a) => (10u8, a.octets().to_vec(), if destination { 24 } else { 8 }),
    };
    let alen = addr.len() as u32;
    let mut v = vec![
        Expr::Meta {
            key: META_NFPROTO,
            dreg: REG_1,
        },
        cmp(vec![proto]),
        Expr::Meta {
            key: META_L4PROTO,
            dreg: REG_1,
        },
        cmp(vec![6]),
        Expr::Payload {
            dreg: REG_1,
            base: NFT_PAYLOAD_NETWORK_HEADER,
            offset: off,
            len: alen,
        },
        cmp(addr),
        Expr::Payload {
            dreg: REG_1,
            base: NFT_PAYLOAD_TRANSPORT_HEADER,
            offset: if destination { 2 } else { 0 },
            len: 2,
        },
        cmp(ep.port().to_be_bytes().to_vec()),
    ];
    v.extend(mark_rule(mark));
    v
}

/// Compiles a plan's marking into the tables it describes (see [`Marking::nft_script`]):
/// the `inet` table, and the `arp` table when ARP is marked too.
///
/// ```
/// use wgmesh_netlink::nft::compile;
/// use wgmesh_core::Marking;
/// let m = Marking { table: "wgmesh".into(), firewall_mark: 0x100000,
///     skip_interfaces: vec!["lo".into()], skip_interface_prefixes: vec!["cali".into()],
///     mark_arp: true, mark_output: true, plain_tcp_endpoints: vec![] };
/// let t = compile(&m);
/// assert_eq!(t.len(), 2); // inet and arp
/// assert_eq!(t[0].chains.len(), 2);
/// assert_eq!(t[0].chains[0].rules.len(), 3); // lo, cali*, mark
/// ```
pub fn compile(m: &Marking) -> Vec<NftTable> {
    let input_rules = || {
        let mut pre = Vec::new();
        for name in &m.skip_interfaces {
            let mut data = name.as_bytes().to_vec();
            data.resize(IFNAMSIZ, 0);
            pre.push(iifname_return(data));
        }
        for prefix in &m.skip_interface_prefixes {
            pre.push(iifname_return(prefix.as_bytes().to_vec()));
        }
        pre.push(mark_rule(m.firewall_mark));
        pre
    };
    let pre = input_rules();
    let mut chains = vec![NftChain {
        name: "prerouting".into(),
        kind: Some("filter".into()),
        hook: Some(HOOK_PREROUTING),
        priority: Some(PRIORITY_RAW),
        policy: Some(1),
        rules: pre,
    }];
    if m.mark_output || !m.plain_tcp_endpoints.is_empty() {
        let rules = if m.mark_output {
            vec![mark_rule(m.firewall_mark)]
        } else {
            m.plain_tcp_endpoints
                .iter()
                .flat_map(|ep| {
                    [
                        endpoint_rule(ep, true, m.firewall_mark),
                        endpoint_rule(ep, false, m.firewall_mark),
                    ]
                })
                .collect()
        };
        chains.push(NftChain {
            name: "output".into(),
            kind: Some("route".into()),
            hook: Some(HOOK_OUTPUT),
            priority: Some(PRIORITY_MANGLE),
            policy: Some(1),
            rules,
        });
    }
    let mut tables = vec![NftTable {
        family: NFPROTO_INET,
        name: m.table.clone(),
        flags: 0,
        chains,
    }];
    if m.mark_arp {
        tables.push(NftTable {
            family: NFPROTO_ARP,
            name: m.table.clone(),
            flags: 0,
            chains: vec![NftChain {
                name: "input".into(),
                kind: Some("filter".into()),
                hook: Some(HOOK_ARP_INPUT),
                priority: Some(0),
                policy: Some(1),
                rules: input_rules(),
            }],
        });
    }
    tables
}

fn nfgen(family: u8, res_id: u16) -> [u8; 4] {
    let r = res_id.to_be_bytes();
    [family, 0, r[0], r[1]]
}

fn msg(family: u8, cmd: u16, flags: u16, seq: u32, body: &NlaWriter) -> Vec<u8> {
    let mut payload = nfgen(family, 0).to_vec();
    payload.extend_from_slice(&body.buf);
    frame((NFNL_SUBSYS_NFTABLES << 8) | cmd, flags, seq, &payload)
}

fn encode_expr(w: &mut NlaWriter, e: &Expr) {
    let (name, data): (&str, NlaWriter) = match e {
        Expr::Meta { key, dreg } => {
            let mut d = NlaWriter::new();
            d.put_be32(2, *key).put_be32(1, *dreg);
            ("meta", d)
        }
        Expr::MetaSet { key, sreg } => {
            let mut d = NlaWriter::new();
            d.put_be32(2, *key).put_be32(3, *sreg);
            ("meta", d)
        }
        Expr::Cmp { sreg, op, data } => {
            let mut d = NlaWriter::new();
            d.put_be32(1, *sreg).put_be32(2, *op).nest(3, |w| {
                w.put(NFTA_DATA_VALUE, data);
            });
            ("cmp", d)
        }
        Expr::Bitwise {
            sreg,
            dreg,
            len,
            mask,
            xor,
        } => {
            let mut d = NlaWriter::new();
            d.put_be32(1, *sreg)
                .put_be32(2, *dreg)
                .put_be32(3, *len)
                .nest(4, |w| {
                    w.put(NFTA_DATA_VALUE, mask);
                })
                .nest(5, |w| {
                    w.put(NFTA_DATA_VALUE, xor);
                });
            ("bitwise", d)
        }
        Expr::Payload {
            dreg,
            base,
            offset,
            len,
        } => {
            let mut d = NlaWriter::new();
            d.put_be32(1, *dreg)
                .put_be32(2, *base)
                .put_be32(3, *offset)
                .put_be32(4, *len);
            ("payload", d)
        }
        Expr::Verdict { code } => {
            let mut d = NlaWriter::new();
            d.put_be32(1, REG_VERDICT).nest(2, |w| {
                w.nest(NFTA_DATA_VERDICT, |w| {
                    w.put_be32(NFTA_VERDICT_CODE, *code as u32);
                });
            });
            ("immediate", d)
        }
        Expr::Other { name } => (name.as_str(), NlaWriter::new()),
    };
    w.nest(NFTA_LIST_ELEM, |w| {
        w.put_str(NFTA_EXPR_NAME, name);
        w.nest(NFTA_EXPR_DATA, |w| w.buf.extend_from_slice(&data.buf));
    });
}

/// The nf_tables transaction that replaces wgmesh's tables named `name` (in every family of
/// [`FAMILIES`]) with `tables` (none: only delete them), as netlink messages with sequence
/// numbers from `seq`. Every message but the batch delimiters asks for an acknowledgement.
pub fn replace_batch(name: &str, tables: &[NftTable], seq: u32) -> Vec<Vec<u8>> {
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    let mut s = seq;
    let mut next = || {
        s += 1;
        s - 1
    };
    let mut out = Vec::new();
    out.push(frame(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        next(),
        &nfgen(0, NFNL_SUBSYS_NFTABLES),
    ));
    for family in FAMILIES {
        // Create (if missing) then delete: the delete succeeds whether or not it existed.
        let mut tbl = NlaWriter::new();
        tbl.put_str(NFTA_TABLE_NAME, name)
            .put_be32(NFTA_TABLE_FLAGS, 0);
        out.push(msg(
            family,
            NFT_MSG_NEWTABLE,
            ack | NLM_F_CREATE,
            next(),
            &tbl,
        ));
        let mut del = NlaWriter::new();
        del.put_str(NFTA_TABLE_NAME, name);
        out.push(msg(family, NFT_MSG_DELTABLE, ack, next(), &del));
    }
    for t in tables {
        let mut tbl = NlaWriter::new();
        tbl.put_str(NFTA_TABLE_NAME, &t.name)
            .put_be32(NFTA_TABLE_FLAGS, t.flags);
        out.push(msg(
            t.family,
            NFT_MSG_NEWTABLE,
            ack | NLM_F_CREATE,
            next(),
            &tbl,
        ));
        for c in &t.chains {
            let mut w = NlaWriter::new();
            w.put_str(NFTA_CHAIN_TABLE, &t.name)
                .put_str(NFTA_CHAIN_NAME, &c.name);
            if let (Some(hook), Some(prio)) = (c.hook, c.priority) {
                w.nest(NFTA_CHAIN_HOOK, |w| {
                    w.put_be32(NFTA_HOOK_HOOKNUM, hook)
                        .put_be32(NFTA_HOOK_PRIORITY, prio as u32);
                });
            }
            if let Some(p) = c.policy {
                w.put_be32(NFTA_CHAIN_POLICY, p);
            }
            if let Some(k) = &c.kind {
                w.put_str(NFTA_CHAIN_TYPE, k);
            }
            out.push(msg(
                t.family,
                NFT_MSG_NEWCHAIN,
                ack | NLM_F_CREATE,
                next(),
                &w,
            ));
            for r in &c.rules {
                let mut w = NlaWriter::new();
                w.put_str(NFTA_RULE_TABLE, &t.name)
                    .put_str(NFTA_RULE_CHAIN, &c.name)
                    .nest(NFTA_RULE_EXPRESSIONS, |w| {
                        for e in r {
                            encode_expr(w, e);
                        }
                    });
                out.push(msg(
                    t.family,
                    NFT_MSG_NEWRULE,
                    ack | NLM_F_CREATE | NLM_F_APPEND,
                    next(),
                    &w,
                ));
            }
        }
    }
    out.push(frame(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        next(),
        &nfgen(0, NFNL_SUBSYS_NFTABLES),
    ));
    out
}

/// A `GET*` request: a dump of every family (`family` 0), or (with a name) one table.
pub(crate) fn get_request(family: u8, cmd: u16, table: Option<&str>, seq: u32) -> Vec<u8> {
    let mut w = NlaWriter::new();
    let flags = match table {
        Some(name) => {
            w.put_str(NFTA_TABLE_NAME, name);
            NLM_F_REQUEST | NLM_F_ACK
        }
        None => NLM_F_REQUEST | NLM_F_DUMP,
    };
    msg(family, cmd, flags, seq, &w)
}

/// The message type of an nf_tables command.
#[cfg(test)]
pub(crate) fn msg_type(cmd: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | cmd
}

type R<T> = Result<T, String>;

/// Decodes a `NEWTABLE` payload (after the netlink header): `(family, name, flags)`.
pub(crate) fn decode_table(p: &[u8]) -> R<(u8, String, u32)> {
    let family = *p.first().ok_or("short nfgenmsg")?;
    let (mut name, mut flags) = (String::new(), 0);
    for a in attrs(p.get(4..).ok_or("short nfgenmsg")?) {
        let (k, v) = a?;
        match k {
            NFTA_TABLE_NAME => name = cstr(v),
            NFTA_TABLE_FLAGS => flags = be32(v)?,
            _ => {}
        }
    }
    Ok((family, name, flags))
}

/// Decodes a `NEWCHAIN` payload: `(family, table, chain without rules)`.
pub(crate) fn decode_chain(p: &[u8]) -> R<(u8, String, NftChain)> {
    let family = *p.first().ok_or("short nfgenmsg")?;
    let mut table = String::new();
    let mut c = NftChain {
        name: String::new(),
        kind: None,
        hook: None,
        priority: None,
        policy: None,
        rules: Vec::new(),
    };
    for a in attrs(p.get(4..).ok_or("short nfgenmsg")?) {
        let (k, v) = a?;
        match k {
            NFTA_CHAIN_TABLE => table = cstr(v),
            NFTA_CHAIN_NAME => c.name = cstr(v),
            NFTA_CHAIN_TYPE => c.kind = Some(cstr(v)),
            NFTA_CHAIN_POLICY => c.policy = Some(be32(v)?),
            NFTA_CHAIN_HOOK => {
                for h in attrs(v) {
                    let (hk, hv) = h?;
                    match hk {
                        NFTA_HOOK_HOOKNUM => c.hook = Some(be32(hv)?),
                        NFTA_HOOK_PRIORITY => c.priority = Some(be32(hv)? as i32),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok((family, table, c))
}

fn data_value(v: &[u8]) -> R<Vec<u8>> {
    for a in attrs(v) {
        let (k, v) = a?;
        if k == NFTA_DATA_VALUE {
            return Ok(v.to_vec());
        }
    }
    Err("data without a value".into())
}

fn decode_expr(v: &[u8]) -> R<Expr> {
    let mut name = String::new();
    let mut data: &[u8] = &[];
    for a in attrs(v) {
        let (k, v) = a?;
        match k {
            NFTA_EXPR_NAME => name = cstr(v),
            NFTA_EXPR_DATA => data = v,
            _ => {}
        }
    }
    let mut f: [Option<&[u8]>; 8] = [None; 8];
    for a in attrs(data) {
        let (k, v) = a?;
        if let Some(slot) = f.get_mut(usize::from(k)) {
            *slot = Some(v);
        }
    }
    let u = |i: usize| -> R<u32> {
        be32(f[i].ok_or_else(|| format!("{name}: missing attribute {i}"))?)
    };
    Ok(match name.as_str() {
        "meta" if f[1].is_some() => Expr::Meta {
            key: u(2)?,
            dreg: u(1)?,
        },
        "meta" => Expr::MetaSet {
            key: u(2)?,
            sreg: u(3)?,
        },
        "cmp" => Expr::Cmp {
            sreg: u(1)?,
            op: u(2)?,
            data: data_value(f[3].ok_or("cmp without data")?)?,
        },
        // NFTA_BITWISE_OP (6), when present, must be NFT_BITWISE_BOOL (0).
        "bitwise" if f[6].is_none_or(|v| be32(v) == Ok(0)) => Expr::Bitwise {
            sreg: u(1)?,
            dreg: u(2)?,
            len: u(3)?,
            mask: data_value(f[4].ok_or("bitwise without mask")?)?,
            xor: data_value(f[5].ok_or("bitwise without xor")?)?,
        },
        "payload" if f[5].is_none() => Expr::Payload {
            dreg: u(1)?,
            base: u(2)?,
            offset: u(3)?,
            len: u(4)?,
        },
        "immediate" if u(1)? == REG_VERDICT => {
            let mut code = None;
            for a in attrs(f[2].ok_or("immediate without data")?) {
                let (k, v) = a?;
                if k == NFTA_DATA_VERDICT {
                    for a in attrs(v) {
                        let (k, v) = a?;
                        if k == NFTA_VERDICT_CODE {
                            code = Some(be32(v)? as i32);
                        }
                    }
                }
            }
            Expr::Verdict {
                code: code.ok_or("verdict without code")?,
            }
        }
        _ => Expr::Other { name },
    })
}

/// Decodes a `NEWRULE` payload: `(family, table, chain, expressions)`.
pub(crate) fn decode_rule(p: &[u8]) -> R<(u8, String, String, Vec<Expr>)> {
    let family = *p.first().ok_or("short nfgenmsg")?;
    let (mut table, mut chain, mut exprs) = (String::new(), String::new(), Vec::new());
    for a in attrs(p.get(4..).ok_or("short nfgenmsg")?) {
        let (k, v) = a?;
        match k {
            NFTA_RULE_TABLE => table = cstr(v),
            NFTA_RULE_CHAIN => chain = cstr(v),
            NFTA_RULE_EXPRESSIONS => {
                for e in attrs(v) {
                    let (_, ev) = e?;
                    exprs.push(decode_expr(ev)?);
                }
            }
            _ => {}
        }
    }
    Ok((family, table, chain, exprs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marking(output: bool, eps: Vec<SocketAddr>) -> Marking {
        Marking {
            table: "wgmesh".into(),
            firewall_mark: 0x100000,
            skip_interfaces: vec!["lo".into(), "wireguard.cali".into()],
            skip_interface_prefixes: vec!["cali".into()],
            mark_arp: true,
            mark_output: output,
            plain_tcp_endpoints: eps,
        }
    }

    #[test]
    fn rules_round_trip_through_the_encoding() {
        let t = compile(&marking(
            false,
            vec![
                "10.0.0.1:6443".parse().unwrap(),
                "[fd00::1]:443".parse().unwrap(),
            ],
        ));
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].chains[0].rules.len(), 4); // arp: lo, wireguard.cali, cali*, mark
        let t = &t[..1];
        let msgs = replace_batch("wgmesh", t, 100);
        // begin, 2 x (newtable, deltable), newtable, 2 chains, 4 + 4 rules, end
        let rules: Vec<&Vec<u8>> = msgs
            .iter()
            .filter(|m| u16::from_ne_bytes([m[4], m[5]]) == msg_type(NFT_MSG_NEWRULE))
            .collect();
        assert_eq!(rules.len(), 4 + 4);
        let mut decoded = Vec::new();
        for r in rules {
            let (fam, table, chain, exprs) = decode_rule(&r[16..]).unwrap();
            assert_eq!((fam, table.as_str()), (NFPROTO_INET, "wgmesh"));
            decoded.push((chain, exprs));
        }
        let want: Vec<(String, Vec<Expr>)> = t[0]
            .chains
            .iter()
            .flat_map(|c| c.rules.iter().map(|r| (c.name.clone(), r.clone())))
            .collect();
        assert_eq!(decoded, want);
        let chains: Vec<NftChain> = msgs
            .iter()
            .filter(|m| u16::from_ne_bytes([m[4], m[5]]) == msg_type(NFT_MSG_NEWCHAIN))
            .map(|m| decode_chain(&m[16..]).unwrap().2)
            .collect();
        assert_eq!(chains[0].priority, Some(PRIORITY_RAW));
        assert_eq!(chains[1].kind.as_deref(), Some("route"));
        assert_eq!(msgs.len(), 1 + 5 + 2 + 8 + 1);
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(
                u32::from_ne_bytes([m[8], m[9], m[10], m[11]]),
                100 + i as u32
            );
            assert_eq!(
                u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
                m.len()
            );
        }
    }

    #[test]
    fn output_chain_only_when_needed() {
        let mut m = marking(false, vec![]);
        assert_eq!(compile(&m)[0].chains.len(), 1);
        m.mark_output = true;
        assert_eq!(compile(&m)[0].chains[1].rules, vec![mark_rule(0x100000)]);
        m.mark_arp = false;
        assert_eq!(compile(&m).len(), 1);
    }

    /// Golden bytes: the mark rule `meta mark set meta mark | 0x100000`, as `nft --debug=netlink`
    /// shows it: `[ meta load mark => reg 1 ] [ bitwise reg 1 = ( reg 1 & 0xffefffff ) ^
    /// 0x00100000 ] [ meta set mark with reg 1 ]` (on a little-endian host).
    #[test]
    #[cfg(target_endian = "little")]
    fn mark_rule_golden_bytes() {
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
                rules: vec![mark_rule(0x100000)],
            }],
        };
        let msgs = replace_batch("t", &[t], 1);
        let rule = &msgs[7];
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
        assert_eq!(rule, &want);
    }

    #[test]
    fn unknown_expressions_decode_as_other() {
        let mut w = NlaWriter::new();
        encode_expr(
            &mut w,
            &Expr::Other {
                name: "counter".into(),
            },
        );
        let (_, v) = attrs(&w.buf).next().unwrap().unwrap();
        assert_eq!(
            decode_expr(v).unwrap(),
            Expr::Other {
                name: "counter".into()
            }
        );
        assert!(decode_rule(&[]).is_err());
        assert!(decode_rule(&[1, 0, 0, 0, 200, 0, 1]).is_err());
    }
}
