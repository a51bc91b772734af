//! The kernel's answers that end a request: `NLMSG_ERROR` (an acknowledgement, or a refusal
//! with its errno) and `NLMSG_DONE` (the end of a dump), with their extended-ack attributes.
//!
//! `netlink-packet-core` keeps everything after the error code as opaque bytes, so this is a
//! small hand codec in the Packet/Repr style: [`ErrorPacket`] reads fields in place through a
//! field table, [`AckRepr`] is the parsed form and emits itself back. The layout (Linux
//! `include/uapi/linux/netlink.h`):
//!
//! ```text
//! NLMSG_ERROR payload                      NLMSG_DONE payload
//! 0..4   error    (i32, -errno or 0)       0..4   error (i32, -errno or 0)
//! 4..20  request's nlmsghdr                4..    attributes (NLM_F_ACK_TLVS)
//! 20..   the rest of the request, unless the answer carries NLM_F_CAPPED
//! then   attributes, when the answer carries NLM_F_ACK_TLVS:
//!          NLMSGERR_ATTR_MSG (1)   the kernel's explanation, a C string
//!          NLMSGERR_ATTR_OFFS (2)  u32 offset of the offending attribute in the request
//! ```

#[cfg(any(test, feature = "testing"))]
use netlink_packet_core::{Emitable, Nla};
use netlink_packet_core::{NlaBuffer, NlasIterator, parse_string};

use super::{HEADER_LEN, NLM_F_ACK_TLVS, NLM_F_CAPPED};
use crate::error::DecodeError;

mod field {
    use std::ops::{Range, RangeFrom};
    /// The error code.
    pub(super) const CODE: Range<usize> = 0..4;
    /// The request's header (its first 16 bytes).
    pub(super) const REQUEST_HEADER: Range<usize> = 4..20;
    /// The request's length, inside its header.
    pub(super) const REQUEST_LENGTH: Range<usize> = 4..8;
    /// What follows the code in an `NLMSG_DONE`.
    pub(super) const DONE_ATTRIBUTES: RangeFrom<usize> = 4..;
}

const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

/// An `NLMSG_ERROR` or `NLMSG_DONE` payload, read in place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorPacket<T: AsRef<[u8]>> {
    buffer: T,
    flags: u16,
    done: bool,
}

impl<T: AsRef<[u8]>> ErrorPacket<T> {
    /// The payload of an `NLMSG_ERROR` whose netlink header had `flags`, checked to hold the
    /// fields those flags announce.
    pub(crate) fn new_error(buffer: T, flags: u16) -> Result<Self, DecodeError> {
        let p = Self {
            buffer,
            flags,
            done: false,
        };
        let len = p.buffer.as_ref().len();
        // An acknowledgement may echo nothing at all (old kernels); a refusal has the header.
        let need = if len > field::CODE.end {
            field::REQUEST_HEADER.end
        } else {
            field::CODE.end
        };
        if len < need || p.attributes_start() > len {
            return Err(DecodeError::Truncated {
                what: "nlmsgerr",
                len,
                need: need.max(p.attributes_start()),
            });
        }
        Ok(p)
    }

    /// The payload of an `NLMSG_DONE` whose netlink header had `flags`. The kernel may send
    /// an empty one (no code at all): that reads as 0.
    pub(crate) fn new_done(buffer: T, flags: u16) -> Self {
        Self {
            buffer,
            flags,
            done: true,
        }
    }

    /// The error code: 0 or a negative errno.
    pub(crate) fn code(&self) -> i32 {
        self.buffer
            .as_ref()
            .get(field::CODE)
            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn attributes_start(&self) -> usize {
        let b = self.buffer.as_ref();
        if self.done {
            return field::DONE_ATTRIBUTES.start;
        }
        if b.len() <= field::CODE.end {
            return b.len();
        }
        if self.flags & NLM_F_CAPPED != 0 {
            return field::REQUEST_HEADER.end;
        }
        // Not capped: the whole request is echoed; its length is in its header.
        let echoed = b
            .get(field::REQUEST_LENGTH)
            .map_or(0, |l| u32::from_ne_bytes([l[0], l[1], l[2], l[3]]) as usize);
        field::CODE.end + ((echoed.max(HEADER_LEN) + 3) & !3)
    }

    /// The extended-ack attributes (empty without `NLM_F_ACK_TLVS`).
    pub(crate) fn attributes(&self) -> &[u8] {
        if self.flags & NLM_F_ACK_TLVS == 0 {
            return &[];
        }
        self.buffer
            .as_ref()
            .get(self.attributes_start()..)
            .unwrap_or(&[])
    }
}

/// A parsed acknowledgement, refusal or end of dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AckRepr {
    /// 0, or the negative errno.
    pub(crate) code: i32,
    /// The request's header, as echoed (`NLMSG_ERROR` only).
    pub(crate) request_header: Option<[u8; HEADER_LEN]>,
    /// The kernel's explanation (`NLMSGERR_ATTR_MSG`).
    pub(crate) message: Option<String>,
    /// The offset of the offending attribute in the request (`NLMSGERR_ATTR_OFFS`).
    pub(crate) offset: Option<u32>,
}

#[cfg(any(test, feature = "testing"))]
enum AckAttr {
    Msg(String),
    Offs(u32),
}

#[cfg(any(test, feature = "testing"))]
impl Nla for AckAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Msg(s) => s.len() + 1,
            Self::Offs(_) => 4,
        }
    }
    fn kind(&self) -> u16 {
        match self {
            Self::Msg(_) => NLMSGERR_ATTR_MSG,
            Self::Offs(_) => NLMSGERR_ATTR_OFFS,
        }
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Msg(s) => {
                buffer[..s.len()].copy_from_slice(s.as_bytes());
                buffer[s.len()] = 0;
            }
            Self::Offs(o) => buffer[..4].copy_from_slice(&o.to_ne_bytes()),
        }
    }
}

impl AckRepr {
    /// Parses a checked packet.
    pub(crate) fn parse<T: AsRef<[u8]>>(p: &ErrorPacket<T>) -> Result<Self, DecodeError> {
        let mut r = Self {
            code: p.code(),
            request_header: None,
            message: None,
            offset: None,
        };
        if !p.done {
            r.request_header = p
                .buffer
                .as_ref()
                .get(field::REQUEST_HEADER)
                .and_then(|h| h.try_into().ok());
        }
        for nla in NlasIterator::new(p.attributes()) {
            let nla: NlaBuffer<&[u8]> = nla.map_err(|e| DecodeError::message("extended ack", e))?;
            match nla.kind() {
                NLMSGERR_ATTR_MSG => {
                    // A C string: up to its first NUL.
                    let v = nla.value();
                    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
                    r.message = Some(
                        parse_string(&v[..end])
                            .map_err(|e| DecodeError::message("NLMSGERR_ATTR_MSG", e))?,
                    )
                }
                NLMSGERR_ATTR_OFFS => {
                    let v = nla.value();
                    let b: [u8; 4] = v.get(..4).and_then(|b| b.try_into().ok()).ok_or(
                        DecodeError::Truncated {
                            what: "NLMSGERR_ATTR_OFFS",
                            len: v.len(),
                            need: 4,
                        },
                    )?;
                    r.offset = Some(u32::from_ne_bytes(b));
                }
                // Cookies, policies and missing-attribute hints: not used.
                _ => {}
            }
        }
        Ok(r)
    }
}

/// Writing answers: what the fake kernel sends.
#[cfg(any(test, feature = "testing"))]
impl AckRepr {
    fn attrs(&self) -> Vec<AckAttr> {
        let mut v = Vec::new();
        if let Some(m) = &self.message {
            v.push(AckAttr::Msg(m.clone()));
        }
        if let Some(o) = self.offset {
            v.push(AckAttr::Offs(o));
        }
        v
    }

    /// The netlink header flags an answer carrying this needs (`NLM_F_CAPPED` for an error,
    /// `NLM_F_ACK_TLVS` when it has attributes).
    pub(crate) fn flags(&self, done: bool) -> u16 {
        let tlvs = if self.message.is_some() || self.offset.is_some() {
            NLM_F_ACK_TLVS
        } else {
            0
        };
        if done { tlvs } else { NLM_F_CAPPED | tlvs }
    }

    /// The payload's length (`done`: as an `NLMSG_DONE`).
    pub(crate) fn buffer_len(&self, done: bool) -> usize {
        let fixed = if done {
            field::CODE.end
        } else {
            field::REQUEST_HEADER.end
        };
        fixed + self.attrs().as_slice().buffer_len()
    }

    /// Writes the payload (capped: the request's header only).
    pub(crate) fn emit(&self, buf: &mut [u8], done: bool) {
        buf[field::CODE].copy_from_slice(&self.code.to_ne_bytes());
        let start = if done {
            field::CODE.end
        } else {
            buf[field::REQUEST_HEADER].copy_from_slice(&self.request_header.unwrap_or_default());
            field::REQUEST_HEADER.end
        };
        self.attrs().as_slice().emit(&mut buf[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(r: &AckRepr, done: bool) -> AckRepr {
        let mut buf = vec![0; r.buffer_len(done)];
        r.emit(&mut buf, done);
        let p = if done {
            ErrorPacket::new_done(&buf[..], r.flags(true))
        } else {
            ErrorPacket::new_error(&buf[..], r.flags(false)).unwrap()
        };
        AckRepr::parse(&p).unwrap()
    }

    #[test]
    fn refusals_and_acks_round_trip() {
        let mut r = AckRepr {
            code: -22,
            request_header: Some([7; 16]),
            message: Some("Unknown device type".into()),
            offset: Some(36),
        };
        assert_eq!(round_trip(&r, false), r);
        r.request_header = None;
        assert_eq!(round_trip(&r, true), r);
        let ack = AckRepr {
            request_header: Some([1; 16]),
            ..Default::default()
        };
        assert_eq!(round_trip(&ack, false), ack);
        assert_eq!(ack.flags(false), NLM_F_CAPPED);
    }

    /// Without `NLM_F_CAPPED` the whole request is echoed; the attributes follow it.
    #[test]
    fn an_uncapped_refusal_skips_the_echoed_request() {
        let mut buf = (-17i32).to_ne_bytes().to_vec();
        let mut request = vec![0u8; 24];
        request[..4].copy_from_slice(&22u32.to_ne_bytes()); // 22 bytes, padded to 24
        buf.extend_from_slice(&request);
        buf.extend_from_slice(&[10, 0, 1, 0, b'n', b'o', b'p', b'e', b'!', 0, 0, 0]);
        let p = ErrorPacket::new_error(&buf[..], NLM_F_ACK_TLVS).unwrap();
        let r = AckRepr::parse(&p).unwrap();
        assert_eq!((r.code, r.message.as_deref()), (-17, Some("nope!")));
    }

    #[test]
    fn truncated_answers_are_typed_errors() {
        assert!(matches!(
            ErrorPacket::new_error(&[0xea, 0xff, 0xff, 0xff, 1][..], 0),
            Err(DecodeError::Truncated { need: 20, .. })
        ));
        // A bare ack of four zero bytes is fine.
        let p = ErrorPacket::new_error(&[0u8; 4][..], 0).unwrap();
        assert_eq!(AckRepr::parse(&p).unwrap().code, 0);
        // Attributes that do not parse.
        let mut buf = vec![0u8; 20];
        buf.extend_from_slice(&[200, 0, 1, 0]);
        let p = ErrorPacket::new_error(&buf[..], NLM_F_CAPPED | NLM_F_ACK_TLVS).unwrap();
        assert!(AckRepr::parse(&p).is_err());
        // An empty NLMSG_DONE reads as success.
        assert_eq!(ErrorPacket::new_done(&[][..], 0).code(), 0);
    }
}
