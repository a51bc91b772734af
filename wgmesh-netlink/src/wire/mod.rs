//! The netlink messages wgmesh sends and reads, built and parsed with the rust-netlink message
//! crates: `netlink-packet-route` (links, routes, rules), `netlink-packet-generic` (the
//! controller's family lookup), `netlink-packet-wireguard` (WireGuard devices) and
//! `netlink-packet-netfilter` (nf_tables), all on `netlink-packet-core` 0.9. The one message
//! no crate parses whole — an `NLMSG_ERROR` or `NLMSG_DONE` with extended-ack attributes — has
//! a small field-table codec in [`ack`]. No IO here; golden bytes recorded from Linux pin the
//! encodings.

pub(crate) mod ack;
#[cfg(test)]
mod capture;
pub(crate) mod genl;
pub(crate) mod nft;
pub(crate) mod route;
#[cfg(test)]
pub(crate) mod tests;

use netlink_packet_core::{
    Emitable, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};

use crate::error::DecodeError;

#[cfg(any(test, feature = "testing"))]
pub(crate) use netlink_packet_core::NLM_F_MULTIPART;
pub(crate) use netlink_packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NLMSG_DONE, NLMSG_ERROR,
};

/// `NLM_F_CAPPED` (on an `NLMSG_ERROR`: the request is echoed as its header only).
pub(crate) const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS` (on an `NLMSG_ERROR` or `NLMSG_DONE`: extended-ack attributes follow).
pub(crate) const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLM_F_DUMP_INTR` (on a dump's message: what is dumped changed during the dump, which may
/// have missed or repeated entries).
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;
/// The netlink header's size.
pub(crate) const HEADER_LEN: usize = 16;

/// The netlink protocols wgmesh speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Protocol {
    /// `NETLINK_ROUTE`: links, routes, rules.
    Route,
    /// `NETLINK_GENERIC`: the controller and WireGuard.
    Generic,
    /// `NETLINK_NETFILTER`: nf_tables.
    Netfilter,
}

impl Protocol {
    /// Every protocol.
    pub const ALL: [Protocol; 3] = [Protocol::Route, Protocol::Generic, Protocol::Netfilter];

    pub(crate) fn index(self) -> usize {
        match self {
            Self::Route => 0,
            Self::Generic => 1,
            Self::Netfilter => 2,
        }
    }
}

/// Serializes `payload` as one netlink message with these flags and sequence number (port
/// 0: the kernel), padded to the 4-byte alignment netlink messages keep in a datagram.
pub(crate) fn serialize<I: NetlinkSerializable + ?Sized>(
    payload: &I,
    flags: u16,
    seq: u32,
) -> Vec<u8> {
    let len = HEADER_LEN + payload.buffer_len();
    let mut buf = vec![0; (len + 3) & !3];
    let mut header = NetlinkHeader::default();
    header.length = len as u32;
    header.message_type = payload.message_type();
    header.flags = flags;
    header.sequence_number = seq;
    header.emit(&mut buf[..HEADER_LEN]);
    payload.serialize(&mut buf[HEADER_LEN..len]);
    buf
}

/// Parses one whole netlink message (header included) into `I`; `what` names it in errors.
pub(crate) fn parse<I: NetlinkDeserializable>(
    bytes: &[u8],
    what: &'static str,
) -> Result<(NetlinkHeader, I), DecodeError> {
    // The rust-netlink parsers index some attribute values without checking their length
    // (netlink-packet-netfilter 0.4's nested data of a `cmp` expression, found by the
    // `netlink` fuzz target): a malformed answer must be an error, not a panic.
    let m = std::panic::catch_unwind(|| NetlinkMessage::<I>::deserialize(bytes))
        .map_err(|panic| DecodeError::Invalid {
            what,
            detail: format!(
                "the message parser failed ({})",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic")
            ),
        })?
        .map_err(|e| DecodeError::message(what, e))?;
    match m.payload {
        NetlinkPayload::InnerMessage(i) => Ok((m.header, i)),
        _ => Err(DecodeError::Invalid {
            what,
            detail: format!("message type {} is not a reply", m.header.message_type),
        }),
    }
}

/// The header of one message at the start of `buf` (which may hold more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) length: usize,
    pub(crate) message_type: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
}

/// Reads the header of the first message in `buf`; `None` when `buf` holds no complete
/// message (a datagram's end, or garbage).
pub(crate) fn header(buf: &[u8]) -> Option<Header> {
    let b = NetlinkBuffer::new_checked(buf).ok()?;
    Some(Header {
        length: b.length() as usize,
        message_type: b.message_type(),
        flags: b.flags(),
        seq: b.sequence_number(),
    })
}

/// Splits a datagram into its messages (each whole, header included).
pub(crate) fn messages(datagram: &[u8]) -> impl Iterator<Item = (Header, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let rest = datagram.get(off..)?;
        let h = header(rest)?;
        let m = rest.get(..h.length)?;
        off += (h.length + 3) & !3;
        Some((h, m))
    })
}
