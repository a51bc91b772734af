//! nf_tables messages (`netlink-packet-netfilter`): wgmesh's tables ([`NftTable`]) encoded as
//! one batch that replaces them, the requests that read them back, and the kernel's dumps
//! decoded into the same model. The crate covers everything wgmesh needs here — tables with
//! flags, base chains with hook, priority, policy and type, rules of `meta`, `cmp`,
//! `bitwise`, `payload` and `immediate` expressions, batch delimiters, the generation
//! barrier — so there is no hand codec for nf_tables.

use netlink_packet_core::{DefaultNla, Nla};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions,
    GenMessage, Hook, HookNumber, Immediate, ListAttribute, Lookup, Meta, MetaKey, NfTablesMessage,
    Operator, Payload, Register, RuleAttribute, RuleMessage, SetAttribute, SetElementAttribute,
    SetElementFlags, SetElementList, SetElementMessage, SetFlags, SetMessage, TableAttribute,
    TableFlags, TableMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};

use super::{NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST};
use crate::error::DecodeError;
use crate::marking::{Expr, FAMILIES, NftChain, NftSet, NftTable, REG_VERDICT, SetElement};

/// An nf_tables request: header flags and message.
pub(crate) type NftRequest = (u16, NetfilterMessage);

/// `NFNL_SUBSYS_NFTABLES`, the resource id of a batch's delimiters.
const NFNL_SUBSYS_NFTABLES: u16 = 10;

const ACKED: u16 = NLM_F_REQUEST | NLM_F_ACK;

fn message(family: u8, inner: NfTablesMessage) -> NetfilterMessage {
    NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::from(family), 0, 0),
        inner,
    )
}

fn delimiter(inner: ControlMessage) -> NetfilterMessage {
    NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        inner,
    )
}

fn be(data: &[u8]) -> DataAttribute {
    DataAttribute::Value(data.to_vec())
}

fn expression(e: &Expr) -> Expressions {
    match e {
        Expr::Meta { key, dreg } => Expressions::Meta(vec![
            Meta::Key(MetaKey::from(*key)),
            Meta::DestinationRegister(Register::from(*dreg)),
        ]),
        Expr::MetaSet { key, sreg } => Expressions::Meta(vec![
            Meta::Key(MetaKey::from(*key)),
            Meta::SourceRegister(Register::from(*sreg)),
        ]),
        Expr::Cmp { sreg, op, data } => Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::from(*sreg)),
            Cmp::Op(Operator::from(*op)),
            Cmp::Data(be(data)),
        ]),
        Expr::Bitwise {
            sreg,
            dreg,
            len,
            mask,
            xor,
        } => Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::from(*sreg)),
            Bitwise::DestinationRegister(Register::from(*dreg)),
            Bitwise::Length(*len),
            Bitwise::Mask(be(mask)),
            Bitwise::Xor(be(xor)),
        ]),
        Expr::Payload {
            dreg,
            base,
            offset,
            len,
        } => Expressions::Payload(vec![
            Payload::DestinationRegister(Register::from(*dreg)),
            Payload::Base(*base),
            Payload::Offset(*offset),
            Payload::Len(*len),
        ]),
        Expr::Lookup { sreg, set } => Expressions::Lookup(vec![
            Lookup::Set(set.clone()),
            Lookup::SourceRegister(Register::from(*sreg)),
        ]),
        Expr::Verdict { code } => Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Verdict),
            Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
                Verdict::from(*code as u32),
            )])),
        ]),
        // The crate has no fib or counter expression: their attributes, as the kernel's
        // uapi spells them (`NFTA_FIB_*`, `NFTA_COUNTER_*`, big-endian).
        Expr::Fib {
            flags,
            result,
            dreg,
        } => Expressions::Other {
            expression_type: "fib".into(),
            attributes: vec![
                DefaultNla::new(NFTA_FIB_DREG, dreg.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_FIB_RESULT, result.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_FIB_FLAGS, flags.to_be_bytes().to_vec()),
            ],
        },
        Expr::Counter { packets, bytes } => Expressions::Other {
            expression_type: "counter".into(),
            attributes: vec![
                DefaultNla::new(NFTA_COUNTER_BYTES, bytes.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_COUNTER_PACKETS, packets.to_be_bytes().to_vec()),
            ],
        },
        Expr::Other { name } => Expressions::Other {
            expression_type: name.clone(),
            attributes: Vec::new(),
        },
    }
}

const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// A big-endian integer attribute of `attrs`.
fn be_attr<const N: usize>(attrs: &[DefaultNla], kind: u16) -> Option<[u8; N]> {
    attrs.iter().find(|a| a.kind() == kind).and_then(|a| {
        let mut buf = vec![0u8; a.value_len()];
        a.emit_value(&mut buf);
        buf.try_into().ok()
    })
}

/// `NEWTABLE` (with `NLM_F_CREATE`: an existing table is left as it is, flags aside).
pub(crate) fn new_table(family: u8, name: &str, flags: u32) -> NetfilterMessage {
    message(
        family,
        NfTablesMessage::NewTable(TableMessage {
            attributes: vec![
                TableAttribute::Name(name.to_owned()),
                TableAttribute::Flags(TableFlags::from_bits_retain(flags)),
            ],
        }),
    )
}

/// `NEWCHAIN` of a chain of table `table`, without its rules.
pub(crate) fn new_chain(family: u8, table: &str, c: &NftChain) -> NetfilterMessage {
    let mut attributes = vec![
        ChainAttribute::Table(table.to_owned()),
        ChainAttribute::Name(c.name.clone()),
    ];
    if let (Some(hook), Some(prio)) = (c.hook, c.priority) {
        attributes.push(ChainAttribute::Hook(vec![
            Hook::Number(HookNumber::Other(hook)),
            Hook::Priority(prio as u32),
        ]));
    }
    if let Some(p) = c.policy {
        attributes.push(ChainAttribute::Policy(p));
    }
    if let Some(k) = &c.kind {
        attributes.push(ChainAttribute::Type(k.clone()));
    }
    message(
        family,
        NfTablesMessage::NewChain(ChainMessage { attributes }),
    )
}

/// `NEWRULE` appending a rule of these expressions to a chain.
pub(crate) fn new_rule(family: u8, table: &str, chain: &str, exprs: &[Expr]) -> NetfilterMessage {
    message(
        family,
        NfTablesMessage::NewRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(table.to_owned()),
                RuleAttribute::Chain(chain.to_owned()),
                RuleAttribute::Expressions(
                    exprs
                        .iter()
                        .map(|e| ListAttribute::from(expression(e)))
                        .collect(),
                ),
            ],
        }),
    )
}

/// `NEWSET` of a set of table `table`, without its elements; `id` names it in the
/// transaction (the kernel requires one).
pub(crate) fn new_set(family: u8, table: &str, set: &NftSet, id: u32) -> NetfilterMessage {
    message(
        family,
        NfTablesMessage::NewSet(SetMessage {
            attributes: vec![
                SetAttribute::Table(table.to_owned()),
                SetAttribute::Name(set.name.clone()),
                SetAttribute::Flags(SetFlags::from_bits_retain(set.flags)),
                SetAttribute::KeyType(set.key_type),
                SetAttribute::KeyLen(set.key_len),
                SetAttribute::Id(id),
            ],
        }),
    )
}

/// Elements per `NEWSETELEM`: their list is one attribute, whose length must fit 16 bits
/// (an IPv6 end element takes 36 bytes).
pub(crate) const ELEMENTS_PER_MESSAGE: usize = 1024;

/// `NEWSETELEM` adding these elements to a set.
pub(crate) fn new_set_elements(
    family: u8,
    table: &str,
    set: &str,
    elements: &[SetElement],
) -> NetfilterMessage {
    let list = elements
        .iter()
        .map(|e| {
            let mut attrs = vec![SetElementAttribute::Key(be(&e.key))];
            if e.end {
                attrs.push(SetElementAttribute::Flags(SetElementFlags::IntervalEnd));
            }
            ListAttribute::Element(attrs)
        })
        .collect();
    message(
        family,
        NfTablesMessage::NewSetElement(SetElementMessage {
            attributes: vec![
                SetElementList::Table(table.to_owned()),
                SetElementList::Set(set.to_owned()),
                SetElementList::Elements(list),
            ],
        }),
    )
}

/// The nf_tables transaction that replaces wgmesh's tables named `name` (in every family of
/// [`FAMILIES`]) with `tables` (none: only delete them). Every message but the batch
/// delimiters asks for an acknowledgement.
pub(crate) fn replace_batch(name: &str, tables: &[NftTable]) -> Vec<NftRequest> {
    let create = ACKED | NLM_F_CREATE;
    let mut out = vec![(NLM_F_REQUEST, delimiter(ControlMessage::BatchBegin))];
    for family in FAMILIES {
        // Create (if missing) then delete: the delete succeeds whether or not it existed.
        out.push((create, new_table(family, name, 0)));
        out.push((
            ACKED,
            message(
                family,
                NfTablesMessage::DeleteTable(TableMessage {
                    attributes: vec![TableAttribute::Name(name.to_owned())],
                }),
            ),
        ));
    }
    for t in tables {
        out.push((create, new_table(t.family, &t.name, t.flags)));
        for (i, set) in t.sets.iter().enumerate() {
            out.push((create, new_set(t.family, &t.name, set, i as u32 + 1)));
            for chunk in set.elements.chunks(ELEMENTS_PER_MESSAGE) {
                out.push((
                    create,
                    new_set_elements(t.family, &t.name, &set.name, chunk),
                ));
            }
        }
        for c in &t.chains {
            out.push((create, new_chain(t.family, &t.name, c)));
            for r in &c.rules {
                out.push((
                    create | NLM_F_APPEND,
                    new_rule(t.family, &t.name, &c.name, r),
                ));
            }
        }
    }
    out.push((NLM_F_REQUEST, delimiter(ControlMessage::BatchEnd)));
    out
}

/// `GETTABLE` of one table (answered by `NEWTABLE` then an ack, or `ENOENT`).
pub(crate) fn get_table(family: u8, name: &str) -> NftRequest {
    (
        ACKED,
        message(
            family,
            NfTablesMessage::GetTable(TableMessage {
                attributes: vec![TableAttribute::Name(name.to_owned())],
            }),
        ),
    )
}

/// A dump of the chains of one family. Linux does not filter chain dumps by table (the
/// table attribute is ignored), only by family: the caller keeps its table's chains.
pub(crate) fn dump_chains(family: u8, table: &str) -> NftRequest {
    (
        NLM_F_REQUEST | NLM_F_DUMP,
        message(
            family,
            NfTablesMessage::GetChain(ChainMessage {
                attributes: vec![ChainAttribute::Table(table.to_owned())],
            }),
        ),
    )
}

/// A dump of the rules of one table (Linux filters rule dumps by family and by
/// `NFTA_RULE_TABLE`): a foreign table's rules are never sent.
pub(crate) fn dump_rules(family: u8, table: &str) -> NftRequest {
    (
        NLM_F_REQUEST | NLM_F_DUMP,
        message(
            family,
            NfTablesMessage::GetRule(RuleMessage {
                attributes: vec![RuleAttribute::Table(table.to_owned())],
            }),
        ),
    )
}

/// A dump of the sets of one table (Linux filters set dumps by family and table).
pub(crate) fn dump_sets(family: u8, table: &str) -> NftRequest {
    (
        NLM_F_REQUEST | NLM_F_DUMP,
        message(
            family,
            NfTablesMessage::GetSet(SetMessage {
                attributes: vec![SetAttribute::Table(table.to_owned())],
            }),
        ),
    )
}

/// A dump of the elements of one set.
pub(crate) fn dump_set_elements(family: u8, table: &str, set: &str) -> NftRequest {
    (
        NLM_F_REQUEST | NLM_F_DUMP,
        message(
            family,
            NfTablesMessage::GetSetElement(SetElementMessage {
                attributes: vec![
                    SetElementList::Table(table.to_owned()),
                    SetElementList::Set(set.to_owned()),
                ],
            }),
        ),
    )
}

/// The whole-ruleset dumps (every chain, then every rule, of every family) that wgmesh sent
/// before it read its own tables only; the golden capture recorded them, and the fake kernel
/// still answers them as Linux did.
#[cfg(test)]
pub(crate) fn dump_ruleset() -> [NftRequest; 2] {
    let dump = NLM_F_REQUEST | NLM_F_DUMP;
    [
        (
            dump,
            message(
                0,
                NfTablesMessage::GetChain(ChainMessage {
                    attributes: Vec::new(),
                }),
            ),
        ),
        (
            dump,
            message(
                0,
                NfTablesMessage::GetRule(RuleMessage {
                    attributes: Vec::new(),
                }),
            ),
        ),
    ]
}

/// `GETGEN`: answered once every earlier message of the socket has been processed.
pub(crate) fn get_gen() -> NftRequest {
    (
        ACKED,
        message(
            0,
            NfTablesMessage::GetGen(GenMessage {
                attributes: Vec::new(),
            }),
        ),
    )
}

fn tables_message(m: &NetfilterMessage) -> Result<&NfTablesMessage, DecodeError> {
    match &m.inner {
        NetfilterMessageInner::NfTables(n) => Ok(n),
        _ => Err(DecodeError::invalid(
            "nf_tables answer",
            "not an nf_tables message",
        )),
    }
}

/// A `NEWTABLE` as `(family, name, flags)`.
pub(crate) fn decode_table(m: &NetfilterMessage) -> Result<(u8, String, u32), DecodeError> {
    let NfTablesMessage::NewTable(t) = tables_message(m)? else {
        return Err(DecodeError::invalid("nf_tables answer", "not a NEWTABLE"));
    };
    let (mut name, mut flags) = (None, 0);
    for a in &t.attributes {
        match a {
            TableAttribute::Name(n) => name = Some(n.clone()),
            TableAttribute::Flags(f) => flags = f.bits(),
            _ => {}
        }
    }
    let name = need(name, "NEWTABLE", "NFTA_TABLE_NAME")?;
    Ok((m.header.family.into(), name, flags))
}

/// A `NEWCHAIN` as `(family, table, chain without rules)`.
pub(crate) fn decode_chain(m: &NetfilterMessage) -> Result<(u8, String, NftChain), DecodeError> {
    let NfTablesMessage::NewChain(c) = tables_message(m)? else {
        return Err(DecodeError::invalid("nf_tables answer", "not a NEWCHAIN"));
    };
    let mut table = String::new();
    let mut chain = NftChain {
        name: String::new(),
        kind: None,
        hook: None,
        priority: None,
        policy: None,
        rules: Vec::new(),
    };
    for a in &c.attributes {
        match a {
            ChainAttribute::Table(t) => table = t.clone(),
            ChainAttribute::Name(n) => chain.name = n.clone(),
            ChainAttribute::Type(k) => chain.kind = Some(k.clone()),
            ChainAttribute::Policy(p) => chain.policy = Some(*p),
            ChainAttribute::Hook(hooks) => {
                for h in hooks {
                    match h {
                        Hook::Number(n) => chain.hook = Some(u32::from(*n)),
                        Hook::Priority(p) => chain.priority = Some(*p as i32),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok((m.header.family.into(), table, chain))
}

fn value(d: &DataAttribute, what: &'static str) -> Result<Vec<u8>, DecodeError> {
    match d {
        DataAttribute::Value(v) => Ok(v.clone()),
        _ => Err(DecodeError::Missing {
            what,
            missing: "NFTA_DATA_VALUE",
        }),
    }
}

/// A field an expression or message must have.
fn need<T>(v: Option<T>, what: &'static str, missing: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::Missing { what, missing })
}

fn register(
    r: Option<Register>,
    what: &'static str,
    missing: &'static str,
) -> Result<u32, DecodeError> {
    need(r, what, missing).map(u32::from)
}

fn decode_expr(name: &str, data: &Expressions) -> Result<Expr, DecodeError> {
    let other = || Expr::Other {
        name: name.to_owned(),
    };
    Ok(match data {
        Expressions::Meta(attrs) => {
            let (mut key, mut dreg, mut sreg) = (None, None, None);
            for a in attrs {
                match a {
                    Meta::Key(k) => key = Some(u32::from(*k)),
                    Meta::DestinationRegister(r) => dreg = Some(*r),
                    Meta::SourceRegister(r) => sreg = Some(*r),
                    _ => {}
                }
            }
            let key = need(key, "meta", "NFTA_META_KEY")?;
            match dreg {
                Some(d) => Expr::Meta {
                    key,
                    dreg: u32::from(d),
                },
                None => Expr::MetaSet {
                    key,
                    sreg: register(sreg, "meta", "NFTA_META_SREG")?,
                },
            }
        }
        Expressions::Cmp(attrs) => {
            let (mut sreg, mut op, mut d) = (None, None, None);
            for a in attrs {
                match a {
                    Cmp::SourceRegister(r) => sreg = Some(*r),
                    Cmp::Op(o) => op = Some(u32::from(*o)),
                    Cmp::Data(x) => d = Some(value(x, "cmp")?),
                    _ => {}
                }
            }
            Expr::Cmp {
                sreg: register(sreg, "cmp", "NFTA_CMP_SREG")?,
                op: need(op, "cmp", "NFTA_CMP_OP")?,
                data: need(d, "cmp", "NFTA_CMP_DATA")?,
            }
        }
        Expressions::Bitwise(attrs) => {
            let (mut sreg, mut dreg, mut len, mut mask, mut xor) = (None, None, None, None, None);
            for a in attrs {
                match a {
                    Bitwise::SourceRegister(r) => sreg = Some(*r),
                    Bitwise::DestinationRegister(r) => dreg = Some(*r),
                    Bitwise::Length(l) => len = Some(*l),
                    Bitwise::Mask(x) => mask = Some(value(x, "bitwise")?),
                    Bitwise::Xor(x) => xor = Some(value(x, "bitwise")?),
                    // Shifts (NFT_BITWISE_LSHIFT/RSHIFT) are not wgmesh's.
                    Bitwise::Op(op) if *op != 0 => return Ok(other()),
                    _ => {}
                }
            }
            Expr::Bitwise {
                sreg: register(sreg, "bitwise", "NFTA_BITWISE_SREG")?,
                dreg: register(dreg, "bitwise", "NFTA_BITWISE_DREG")?,
                len: need(len, "bitwise", "NFTA_BITWISE_LEN")?,
                mask: need(mask, "bitwise", "NFTA_BITWISE_MASK")?,
                xor: need(xor, "bitwise", "NFTA_BITWISE_XOR")?,
            }
        }
        Expressions::Payload(attrs) => {
            let (mut dreg, mut base, mut offset, mut len) = (None, None, None, None);
            for a in attrs {
                match a {
                    Payload::DestinationRegister(r) => dreg = Some(*r),
                    Payload::Base(b) => base = Some(*b),
                    Payload::Offset(o) => offset = Some(*o),
                    Payload::Len(l) => len = Some(*l),
                    // A payload write (`SREG`) is not wgmesh's.
                    Payload::SourceRegister(_) => return Ok(other()),
                    _ => {}
                }
            }
            Expr::Payload {
                dreg: register(dreg, "payload", "NFTA_PAYLOAD_DREG")?,
                base: need(base, "payload", "NFTA_PAYLOAD_BASE")?,
                offset: need(offset, "payload", "NFTA_PAYLOAD_OFFSET")?,
                len: need(len, "payload", "NFTA_PAYLOAD_LEN")?,
            }
        }
        Expressions::Lookup(attrs) => {
            let (mut set, mut sreg) = (None, None);
            for a in attrs {
                match a {
                    Lookup::Set(n) => set = Some(n.clone()),
                    Lookup::SourceRegister(r) => sreg = Some(*r),
                    // A map lookup or an inverted one (`!= @set`) is not wgmesh's.
                    Lookup::DestinationRegister(_) => return Ok(other()),
                    Lookup::Flags(f) if *f != 0 => return Ok(other()),
                    _ => {}
                }
            }
            Expr::Lookup {
                sreg: register(sreg, "lookup", "NFTA_LOOKUP_SREG")?,
                set: need(set, "lookup", "NFTA_LOOKUP_SET")?,
            }
        }
        Expressions::Immediate(attrs) => {
            let (mut dreg, mut code) = (None, None);
            for a in attrs {
                match a {
                    Immediate::DestinationRegister(r) => dreg = Some(u32::from(*r)),
                    Immediate::Data(DataAttribute::Verdict(v)) => {
                        for x in v {
                            if let VerdictAttribute::Code(c) = x {
                                code = Some(u32::from(*c) as i32);
                            }
                        }
                    }
                    _ => {}
                }
            }
            match (dreg, code) {
                (Some(REG_VERDICT), Some(code)) => Expr::Verdict { code },
                // Loads of data into a register are not wgmesh's.
                _ => other(),
            }
        }
        Expressions::Other {
            expression_type,
            attributes,
        } if expression_type == "fib" => {
            let get = |kind, missing| {
                need(be_attr::<4>(attributes, kind), "fib", missing).map(u32::from_be_bytes)
            };
            Expr::Fib {
                dreg: get(NFTA_FIB_DREG, "NFTA_FIB_DREG")?,
                result: get(NFTA_FIB_RESULT, "NFTA_FIB_RESULT")?,
                flags: get(NFTA_FIB_FLAGS, "NFTA_FIB_FLAGS")?,
            }
        }
        Expressions::Other {
            expression_type,
            attributes,
        } if expression_type == "counter" => Expr::Counter {
            bytes: be_attr::<8>(attributes, NFTA_COUNTER_BYTES).map_or(0, u64::from_be_bytes),
            packets: be_attr::<8>(attributes, NFTA_COUNTER_PACKETS).map_or(0, u64::from_be_bytes),
        },
        _ => other(),
    })
}

/// A `NEWRULE` as `(family, table, chain, expressions)`.
pub(crate) fn decode_rule(
    m: &NetfilterMessage,
) -> Result<(u8, String, String, Vec<Expr>), DecodeError> {
    let NfTablesMessage::NewRule(r) = tables_message(m)? else {
        return Err(DecodeError::invalid("nf_tables answer", "not a NEWRULE"));
    };
    let (mut table, mut chain, mut exprs) = (String::new(), String::new(), Vec::new());
    for a in &r.attributes {
        match a {
            RuleAttribute::Table(t) => table = t.clone(),
            RuleAttribute::Chain(c) => chain = c.clone(),
            RuleAttribute::Expressions(list) => {
                for elem in list {
                    let ListAttribute::Element(attrs) = elem else {
                        continue;
                    };
                    let mut name = String::new();
                    let mut data = None;
                    for x in attrs {
                        match x {
                            ExpressionAttribute::Name(n) => name = n.clone(),
                            ExpressionAttribute::Data(d) => data = Some(d),
                            _ => {}
                        }
                    }
                    exprs.push(match data {
                        Some(d) => decode_expr(&name, d)?,
                        None => Expr::Other { name },
                    });
                }
            }
            _ => {}
        }
    }
    Ok((m.header.family.into(), table, chain, exprs))
}

/// A `NEWSET` as `(family, table, set without elements)`.
pub(crate) fn decode_set(m: &NetfilterMessage) -> Result<(u8, String, NftSet), DecodeError> {
    let NfTablesMessage::NewSet(q) = tables_message(m)? else {
        return Err(DecodeError::invalid("nf_tables answer", "not a NEWSET"));
    };
    let mut table = String::new();
    let (mut name, mut key_len) = (None, None);
    let mut set = NftSet {
        name: String::new(),
        key_type: 0,
        key_len: 0,
        flags: 0,
        elements: Vec::new(),
    };
    for a in &q.attributes {
        match a {
            SetAttribute::Table(t) => table = t.clone(),
            SetAttribute::Name(n) => name = Some(n.clone()),
            SetAttribute::Flags(f) => set.flags = f.bits(),
            SetAttribute::KeyType(k) => set.key_type = *k,
            SetAttribute::KeyLen(l) => key_len = Some(*l),
            _ => {}
        }
    }
    set.name = need(name, "NEWSET", "NFTA_SET_NAME")?;
    set.key_len = need(key_len, "NEWSET", "NFTA_SET_KEY_LEN")?;
    Ok((m.header.family.into(), table, set))
}

/// A `NEWSETELEM` as `(family, table, set, elements)` (the fake kernel's parser; the reader
/// walks the dump's bytes itself, see `linux::read`).
#[cfg(any(test, feature = "testing"))]
pub(crate) fn decode_set_elements(
    m: &NetfilterMessage,
) -> Result<(u8, String, String, Vec<SetElement>), DecodeError> {
    let NfTablesMessage::NewSetElement(q) = tables_message(m)? else {
        return Err(DecodeError::invalid("nf_tables answer", "not a NEWSETELEM"));
    };
    let (mut table, mut set, mut elements) = (String::new(), String::new(), Vec::new());
    for a in &q.attributes {
        match a {
            SetElementList::Table(t) => table = t.clone(),
            SetElementList::Set(n) => set = n.clone(),
            SetElementList::Elements(list) => {
                for e in list {
                    let ListAttribute::Element(attrs) = e else {
                        continue;
                    };
                    let (mut key, mut end) = (None, false);
                    for x in attrs {
                        match x {
                            SetElementAttribute::Key(d) => key = Some(value(d, "set element")?),
                            SetElementAttribute::Flags(f) => {
                                end = f.contains(SetElementFlags::IntervalEnd)
                            }
                            _ => {}
                        }
                    }
                    elements.push(SetElement {
                        key: need(key, "set element", "NFTA_SET_ELEM_KEY")?,
                        end,
                    });
                }
            }
            _ => {}
        }
    }
    Ok((m.header.family.into(), table, set, elements))
}

/// The elements of a `NEWSETELEM` read straight from its bytes (the whole netlink message):
/// the crate's parser takes time quadratic in the elements of one message (11 s for a dump of
/// 22,000 in pages of about 1,000, debug build), this walk is linear. Only keys and the
/// interval-end flag are read.
pub(crate) fn set_elements_from_bytes(bytes: &[u8]) -> Result<Vec<SetElement>, DecodeError> {
    use netlink_packet_core::{NLA_TYPE_MASK, NlasIterator};
    const NLMSG_AND_NFGEN_HEADERS: usize = 16 + 4;
    const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
    const NFTA_SET_ELEM_KEY: u16 = 1;
    const NFTA_SET_ELEM_FLAGS: u16 = 3;
    const NFTA_DATA_VALUE: u16 = 1;
    let bad = |detail: &str| DecodeError::invalid("NEWSETELEM", detail);
    let len = bytes
        .get(..4)
        .map(|l| u32::from_ne_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .ok_or_else(|| bad("shorter than its header"))?;
    let attrs = bytes
        .get(NLMSG_AND_NFGEN_HEADERS..len)
        .ok_or_else(|| bad("length beyond the datagram"))?;
    let mut out = Vec::new();
    for list in NlasIterator::new(attrs) {
        let list = list.map_err(|_| bad("malformed attribute"))?;
        if list.kind() & NLA_TYPE_MASK != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for elem in NlasIterator::new(list.value()) {
            let elem = elem.map_err(|_| bad("malformed element"))?;
            let (mut key, mut end) = (None, false);
            for a in NlasIterator::new(elem.value()) {
                let a = a.map_err(|_| bad("malformed element attribute"))?;
                match a.kind() & NLA_TYPE_MASK {
                    NFTA_SET_ELEM_KEY => {
                        for d in NlasIterator::new(a.value()) {
                            let d = d.map_err(|_| bad("malformed key"))?;
                            if d.kind() & NLA_TYPE_MASK == NFTA_DATA_VALUE {
                                key = Some(d.value().to_vec());
                            }
                        }
                    }
                    NFTA_SET_ELEM_FLAGS => {
                        let v: [u8; 4] = a
                            .value()
                            .try_into()
                            .map_err(|_| bad("flags are not 4 bytes"))?;
                        end = u32::from_be_bytes(v) & 1 != 0;
                    }
                    _ => {}
                }
            }
            out.push(SetElement {
                key: need(key, "set element", "NFTA_SET_ELEM_KEY")?,
                end,
            });
        }
    }
    Ok(out)
}
