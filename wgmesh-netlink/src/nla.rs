//! A small netlink attribute writer and reader used for the nf_tables messages (whose nested,
//! big-endian attributes no netlink-packet-* crate models) and for message framing.

use netlink_packet_core::{NLA_F_NESTED, NLA_TYPE_MASK, NlaBuffer, NlasIterator};

/// Appends netlink attributes (type-length-value, 4-byte aligned) to a buffer.
#[derive(Debug, Default)]
pub(crate) struct NlaWriter {
    pub(crate) buf: Vec<u8>,
}

impl NlaWriter {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
        self
    }

    pub(crate) fn put_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(kind, &v)
    }

    pub(crate) fn put_be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_be_bytes())
    }

    pub(crate) fn nest(&mut self, kind: u16, f: impl FnOnce(&mut NlaWriter)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        f(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.pad();
        self
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }
}

/// Iterates `(type without flags, value)` over the attributes in `buf`.
pub(crate) fn attrs(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), String>> {
    NlasIterator::new(buf).map(|r| {
        r.map(|nla: NlaBuffer<&[u8]>| {
            let kind = nla.kind() & NLA_TYPE_MASK;
            let len = usize::from(nla.length()).saturating_sub(4);
            let inner: &[u8] = nla.into_inner();
            (kind, &inner[4..4 + len])
        })
        .map_err(|e| e.to_string())
    })
}

pub(crate) fn be32(v: &[u8]) -> Result<u32, String> {
    v.get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| format!("expected 4 bytes, got {}", v.len()))
}

/// A 32-bit attribute value in host byte order (rtnetlink's); `None` when it is shorter.
pub(crate) fn ne32(v: &[u8]) -> Option<u32> {
    v.get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

pub(crate) fn cstr(v: &[u8]) -> String {
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// Frames a netlink message: header (length, type, flags, seq, port 0) + payload.
pub(crate) fn frame(message_type: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = 16 + payload.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&message_type.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(payload);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_pads_and_nests() {
        let mut w = NlaWriter::new();
        w.put_str(1, "ab").nest(2, |w| {
            w.put_be32(1, 0x0102_0304);
        });
        assert_eq!(
            w.buf,
            [
                7, 0, 1, 0, b'a', b'b', 0, 0, // "ab\0" + 1 pad
                12, 0, 2, 0x80, 8, 0, 1, 0, 1, 2, 3, 4
            ]
        );
        let got: Vec<(u16, Vec<u8>)> = attrs(&w.buf)
            .map(|r| r.map(|(k, v)| (k, v.to_vec())))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got[0], (1, b"ab\0".to_vec()));
        assert_eq!(got[1].0, 2);
        assert_eq!(be32(&got[1].1[4..]).unwrap(), 0x0102_0304);
    }
}
