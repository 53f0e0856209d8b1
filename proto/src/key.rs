//! Keys: node public/private keys (X25519) and the region mesh key.
//!
//! Text forms follow Tailscale: `nodekey:<64 hex>` for public keys, `privkey:<64 hex>` for private
//! keys; the mesh key is 64 bare hex chars. Public keys are raw 32-byte arrays that need no
//! validation, so they are cheap to hash and compare on the packet path.

use std::fmt;
use std::str::FromStr;

use crate::consts::KEY_LEN;

/// Why a key failed to parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyParseError {
    /// The text lacked the expected `prefix:`.
    #[error("key must start with {0:?}")]
    MissingPrefix(&'static str),
    /// The hex part was not 64 hex characters.
    #[error("key must be 64 hex characters")]
    BadHex,
}

fn parse_hex32(s: &str) -> Result<[u8; KEY_LEN], KeyParseError> {
    let mut out = [0u8; KEY_LEN];
    if s.len() != 2 * KEY_LEN {
        return Err(KeyParseError::BadHex);
    }
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyParseError::BadHex)?;
    Ok(out)
}

/// A node's (or a DERP server's) X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodePublic(pub [u8; KEY_LEN]);

impl NodePublic {
    /// Text prefix used by Tailscale.
    pub const PREFIX: &'static str = "nodekey:";

    /// Builds a key from a 32-byte slice; `None` if the length is wrong.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Lowercase hex without prefix (the `Derp-Public-Key` header form).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A short form for logs: `[abcde]`, like Tailscale's ShortString.
    pub fn short(&self) -> String {
        format!("[{}]", &hex::encode(&self.0[..3])[..5])
    }

    /// Parses 64 hex chars with no prefix.
    pub fn from_hex(s: &str) -> Result<Self, KeyParseError> {
        parse_hex32(s).map(Self)
    }
}

impl fmt::Display for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, hex::encode(self.0))
    }
}

impl fmt::Debug for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePublic({})", self.short())
    }
}

impl FromStr for NodePublic {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix(Self::PREFIX).ok_or(KeyParseError::MissingPrefix(Self::PREFIX))?;
        parse_hex32(hex).map(Self)
    }
}

/// A node's (or a DERP server's) X25519 private key. The scalar is clamped by the box code.
#[derive(Clone)]
pub struct NodePrivate {
    secret: crypto_box::SecretKey,
    public: NodePublic,
}

impl NodePrivate {
    /// Text prefix used by Tailscale.
    pub const PREFIX: &'static str = "privkey:";

    /// A fresh random key from the OS RNG.
    pub fn generate() -> Self {
        Self::from_bytes(rand::random())
    }

    /// Wraps raw private key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let secret = crypto_box::SecretKey::from(bytes);
        let public = NodePublic(*secret.public_key().as_bytes());
        Self { secret, public }
    }

    /// The raw private key bytes (as given; unclamped).
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.secret.to_bytes()
    }

    /// The matching public key.
    pub fn public(&self) -> NodePublic {
        self.public
    }

    /// The key in `privkey:<hex>` form, as stored in derper's key file.
    pub fn to_text(&self) -> String {
        format!("{}{}", Self::PREFIX, hex::encode(self.to_bytes()))
    }

    pub(crate) fn box_secret(&self) -> &crypto_box::SecretKey {
        &self.secret
    }
}

impl fmt::Debug for NodePrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePrivate(public={})", self.public.short())
    }
}

impl FromStr for NodePrivate {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix(Self::PREFIX).ok_or(KeyParseError::MissingPrefix(Self::PREFIX))?;
        parse_hex32(hex).map(Self::from_bytes)
    }
}

/// The 32-byte pre-shared key that lets servers of one region mesh (spec §1.2, §3).
#[derive(Clone, Copy)]
pub struct MeshKey([u8; KEY_LEN]);

impl MeshKey {
    /// Wraps raw bytes.
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        Self(b)
    }

    /// Parses the file/wire form: whitespace trimmed, exactly 64 hex chars.
    pub fn parse(s: &str) -> Result<Self, KeyParseError> {
        parse_hex32(s.trim()).map(Self)
    }

    /// A random key (for generating new regions).
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// Lowercase hex, the JSON and file form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Constant-time equality, so a probing client learns nothing from timing.
    pub fn ct_eq(&self, other: &MeshKey) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vector_public_keys() {
        let s = NodePrivate::from_bytes([0x11; 32]);
        assert_eq!(s.public().to_hex(), "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13");
        let c = NodePrivate::from_bytes([0x22; 32]);
        assert_eq!(c.public().to_hex(), "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20");
    }

    #[test]
    fn text_round_trip() {
        let k = NodePrivate::generate();
        let back: NodePrivate = k.to_text().parse().unwrap();
        assert_eq!(back.public(), k.public());
        let p: NodePublic = k.public().to_string().parse().unwrap();
        assert_eq!(p, k.public());
        assert_eq!("nodekey:zz".parse::<NodePublic>(), Err(KeyParseError::BadHex));
        assert_eq!("abc".parse::<NodePublic>(), Err(KeyParseError::MissingPrefix("nodekey:")));
    }

    #[test]
    fn mesh_key_parse() {
        let k = MeshKey::parse(&format!("  {}\n", "ab".repeat(32))).unwrap();
        assert!(k.ct_eq(&MeshKey::from_bytes([0xab; 32])));
        assert!(MeshKey::parse("abcd").is_err());
    }
}
