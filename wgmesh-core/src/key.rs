//! WireGuard keys: Curve25519 key pairs in the base64 text form of `wg genkey` / `wg pubkey`.
//!
//! [`PrivateKey`] never shows its bytes: `Debug` and `Display` print `(hidden)`, it has no
//! `Serialize` implementation, and its memory is zeroized on drop. Export it on purpose with
//! [`PrivateKey::to_base64`], which returns a [`Zeroizing`] string.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, Zeroizing};

/// The length of every WireGuard key, in bytes.
pub const KEY_LEN: usize = 32;

/// Why a key text was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not standard, padded base64.
    #[error("not valid base64")]
    Base64,
    /// The text decodes to the wrong number of bytes.
    #[error("decodes to {0} bytes, a WireGuard key has 32")]
    Length(usize),
    /// All 32 bytes are zero: WireGuard treats such a key as absent.
    #[error("the all-zero key is not a usable WireGuard key")]
    Zero,
    /// A public key that is a point of small order: every Diffie-Hellman with it gives the
    /// same (all-zero) result, so a handshake with it proves nothing.
    #[error("a point of small order is not a usable WireGuard public key")]
    LowOrder,
}

/// The u-coordinates of the points of small order on Curve25519, little-endian, with bit 255
/// clear (X25519 ignores that bit): 0, 1, the two points of order 8, and p − 1, p and p + 1
/// (p = 2^255 − 19; p and p + 1 are the unreduced forms of 0 and 1). The test
/// `low_order_points_give_no_shared_secret` checks every entry against X25519 itself.
const LOW_ORDER: [[u8; KEY_LEN]; 7] = [
    [0; KEY_LEN],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    high_ff(0xec),
    high_ff(0xed),
    high_ff(0xee),
];

/// `[first, 0xff, …, 0xff, 0x7f]`: p − 1, p or p + 1 for `first` = 0xec, 0xed, 0xee.
const fn high_ff(first: u8) -> [u8; KEY_LEN] {
    let mut b = [0xff; KEY_LEN];
    b[0] = first;
    b[KEY_LEN - 1] = 0x7f;
    b
}

/// Refuses the all-zero key and the points of small order.
fn check_public(bytes: &[u8; KEY_LEN]) -> Result<(), KeyError> {
    if *bytes == [0; KEY_LEN] {
        return Err(KeyError::Zero);
    }
    let mut masked = *bytes;
    masked[KEY_LEN - 1] &= 0x7f;
    if LOW_ORDER.contains(&masked) {
        return Err(KeyError::LowOrder);
    }
    Ok(())
}

fn decode(text: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let text = text.trim();
    // 32 bytes are 44 base64 characters; refuse anything much longer before decoding it.
    if text.len() > 64 {
        return Err(KeyError::Length(text.len() * 3 / 4));
    }
    let mut buf = Zeroizing::new([0u8; 48]);
    let n = STANDARD
        .decode_slice(text.as_bytes(), &mut buf[..])
        .map_err(|_| KeyError::Base64)?;
    if n != KEY_LEN {
        return Err(KeyError::Length(n));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(&buf[..KEY_LEN]);
    if key.iter().all(|b| *b == 0) {
        return Err(KeyError::Zero);
    }
    Ok(key)
}

/// A WireGuard public key (a Curve25519 point).
///
/// Its text form is the 44-character base64 of `wg pubkey`; it is what `Display`, `FromStr`
/// and serde use.
///
/// ```
/// use wgmesh_core::PublicKey;
/// let key: PublicKey = "bbcKpAY+Q9VpmIRLT+yPaaOALxqnonxBuk5LRlvKClA=".parse()?;
/// assert_eq!(key.to_string(), "bbcKpAY+Q9VpmIRLT+yPaaOALxqnonxBuk5LRlvKClA=");
/// # Ok::<(), wgmesh_core::KeyError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// Wraps raw key bytes. The all-zero key is refused (WireGuard reads it as "no key"), and
    /// so are the other points of small order ([`KeyError::LowOrder`]).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Result<Self, KeyError> {
        check_public(&bytes)?;
        Ok(Self(bytes))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Parses the base64 text of `wg pubkey`; refuses what [`PublicKey::from_bytes`] refuses.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        Self::from_bytes(*decode(text)?)
    }

    /// The base64 text of `wg pubkey`.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Lower-case hex, the form of the userspace configuration protocol.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::from_base64(&text).map_err(serde::de::Error::custom)
    }
}

/// A WireGuard private key (a Curve25519 scalar), zeroized on drop and never displayed.
///
/// Generated keys are clamped exactly as `wg genkey` clamps them, so their base64 text is
/// interchangeable with wg(8)'s.
///
/// ```
/// use wgmesh_core::PrivateKey;
/// let key = PrivateKey::from_base64("aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=")?;
/// assert_eq!(format!("{key:?}"), "PrivateKey((hidden))");
/// assert_eq!(key.public_key().to_string(), "lDWQTjn07Ve0LXsUpK+8QpVnt+LEsDBTad9yiHJu0Ww=");
/// # Ok::<(), wgmesh_core::KeyError>(())
/// ```
#[derive(Clone, zeroize::ZeroizeOnDrop)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// Wraps raw key bytes (not clamped: Curve25519 clamps when it multiplies, as wg(8) does).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Result<Self, KeyError> {
        let key = Self(bytes);
        if key.0 == [0; KEY_LEN] {
            return Err(KeyError::Zero);
        }
        Ok(key)
    }

    /// Parses the base64 text of `wg genkey`.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = decode(text)?;
        Ok(Self(*bytes))
    }

    /// Generates a key from the given cryptographic random number generator.
    pub fn generate_from_rng<R: rand_core::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        loop {
            rng.fill_bytes(&mut bytes[..]);
            clamp(&mut bytes);
            // Clamping sets bit 254, so the key cannot be zero; the loop is only a guard.
            if *bytes != [0; KEY_LEN] {
                return Self(*bytes);
            }
        }
    }

    /// Generates a key from the operating system's random source, as `wg genkey` does.
    #[cfg(feature = "getrandom")]
    pub fn generate() -> Self {
        let secret = x25519_dalek::StaticSecret::random();
        let mut bytes = Zeroizing::new(secret.to_bytes());
        clamp(&mut bytes);
        Self(*bytes)
    }

    /// The matching public key (`wg pubkey`).
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// The base64 text of `wg genkey`, in a string that is zeroized on drop.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0))
    }

    /// Lower-case hex for the userspace configuration protocol, zeroized on drop.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex(&self.0))
    }

    /// The raw bytes. Copy them only into memory that you zeroize.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

fn clamp(bytes: &mut [u8; KEY_LEN]) {
    bytes[0] &= 248;
    bytes[31] = (bytes[31] & 127) | 64;
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        // Constant time is not needed for equality of local keys, but avoid early exit anyway.
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for PrivateKey {}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey((hidden))")
    }
}

impl fmt::Display for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(hidden)")
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl Zeroize for PrivateKey {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    // RFC 7748, section 6.1.
    const ALICE_PRIVATE: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const ALICE_PUBLIC: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";
    const BOB_PRIVATE: &str = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb";
    const BOB_PUBLIC: &str = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f";

    #[test]
    fn rfc7748_vectors() {
        let alice = PrivateKey::from_bytes(unhex(ALICE_PRIVATE)).unwrap();
        assert_eq!(alice.public_key().to_hex(), ALICE_PUBLIC);
        let bob = PrivateKey::from_bytes(unhex(BOB_PRIVATE)).unwrap();
        assert_eq!(bob.public_key().to_hex(), BOB_PUBLIC);
    }

    // A pair made with `wg genkey | tee priv | wg pubkey` (wireguard-tools v1.0.20210914).
    const WG_PRIVATE: &str = "aLHd3L4af3PpZIWlPJgme7dpppYIulN7pMB7E0JCTHw=";
    const WG_PUBLIC: &str = "lDWQTjn07Ve0LXsUpK+8QpVnt+LEsDBTad9yiHJu0Ww=";

    #[test]
    fn wg_tools_pair() {
        let key = PrivateKey::from_base64(WG_PRIVATE).unwrap();
        assert_eq!(key.to_base64().as_str(), WG_PRIVATE);
        assert_eq!(key.public_key().to_base64(), WG_PUBLIC);
    }

    #[test]
    fn generated_keys_are_clamped_like_wg_genkey() {
        for _ in 0..64 {
            let key = PrivateKey::generate();
            let b = key.as_bytes();
            assert_eq!(b[0] & 7, 0);
            assert_eq!(b[31] & 128, 0);
            assert_eq!(b[31] & 64, 64);
            let text = key.to_base64();
            assert_eq!(text.len(), 44);
            assert_eq!(PrivateKey::from_base64(&text).unwrap(), key);
        }
        assert_ne!(PrivateKey::generate(), PrivateKey::generate());
    }

    #[test]
    fn private_key_never_shows() {
        let key = PrivateKey::from_base64(WG_PRIVATE).unwrap();
        assert!(!format!("{key:?}").contains(WG_PRIVATE));
        assert!(!format!("{key}").contains(WG_PRIVATE));
        assert!(!format!("{key:#?}").contains("aLHd"));
    }

    #[test]
    fn bad_key_text() {
        assert_eq!(PublicKey::from_base64("not base64!"), Err(KeyError::Base64));
        assert_eq!(PublicKey::from_base64("AAAA"), Err(KeyError::Length(3)));
        assert_eq!(
            PublicKey::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(KeyError::Zero)
        );
        assert!(PublicKey::from_base64(&"A".repeat(4000)).is_err());
        assert_eq!(
            PublicKey::from_base64(&STANDARD.encode([7u8; 36])),
            Err(KeyError::Length(36))
        );
        assert_eq!(
            PublicKey::from_base64(&format!("{WG_PUBLIC}AAAA")),
            Err(KeyError::Base64)
        );
    }

    #[test]
    fn low_order_points_give_no_shared_secret() {
        // Every listed point, with bit 255 clear or set, gives the all-zero shared secret for
        // any private key: the list is right. Real keys do not.
        let secret = x25519_dalek::StaticSecret::from(*PrivateKey::generate().as_bytes());
        for point in LOW_ORDER {
            for top in [0u8, 0x80] {
                let mut bytes = point;
                bytes[31] |= top;
                let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(bytes));
                assert!(!shared.was_contributory(), "{bytes:02x?}");
                let text = STANDARD.encode(bytes);
                let expected = if bytes == [0; 32] {
                    KeyError::Zero
                } else {
                    KeyError::LowOrder
                };
                assert_eq!(PublicKey::from_base64(&text), Err(expected.clone()));
                assert_eq!(PublicKey::from_bytes(bytes), Err(expected));
                assert!(serde_json::from_str::<PublicKey>(&format!("\"{text}\"")).is_err());
            }
        }
        for _ in 0..32 {
            let public = PrivateKey::generate().public_key();
            let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(*public.as_bytes()));
            assert!(shared.was_contributory());
            assert_eq!(PublicKey::from_bytes(*public.as_bytes()), Ok(public));
        }
        // A private key may have any bytes: the check is for public keys only.
        assert!(PrivateKey::from_bytes(LOW_ORDER[1]).is_ok());
    }

    #[test]
    fn public_key_serde_is_base64() {
        let key = PublicKey::from_base64(WG_PUBLIC).unwrap();
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, format!("\"{WG_PUBLIC}\""));
        let back: PublicKey = serde_json::from_str(&json).unwrap();
        assert_eq!(back, key);
        assert!(serde_json::from_str::<PublicKey>("\"xyz\"").is_err());
    }
}
