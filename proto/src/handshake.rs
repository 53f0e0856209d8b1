//! The DERP handshake: ServerKey, ClientInfo and ServerInfo (spec §1.3), as pure functions.
//!
//! ClientInfo and ServerInfo are JSON sealed with NaCl `crypto_box` (X25519 + XSalsa20-Poly1305),
//! laid out `nonce(24) ‖ tag(16) ‖ ciphertext`, byte-identical to Go's `nacl/box` with the nonce
//! prepended. JSON keys are matched case-insensitively, as Go's decoder does.

use bytes::{BufMut, Bytes, BytesMut};
use crypto_box::aead::Aead;
use crypto_box::{Nonce, PublicKey, SalsaBox};
use serde_json::{Map, Value};

use crate::consts::*;
use crate::frame::{put_header, FrameType};
use crate::key::{MeshKey, NodePrivate, NodePublic};

/// Handshake failures; each closes the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The payload is too short to hold what it must.
    #[error("{0} payload too short")]
    TooShort(&'static str),
    /// The NaCl box did not open with the expected keys.
    #[error("{0} box did not open")]
    BoxOpen(&'static str),
    /// The plaintext is not the JSON object expected.
    #[error("{what} JSON: {reason}")]
    Json {
        /// which message
        what: &'static str,
        /// what was wrong
        reason: String,
    },
}

/// The precomputed box between `ours` and `theirs`: one X25519 + HSalsa20. Reusing it for both
/// directions of a handshake halves its public-key cost.
fn shared_box(ours: &NodePrivate, theirs: &NodePublic) -> SalsaBox {
    SalsaBox::new(&PublicKey::from(theirs.0), ours.box_secret())
}

fn seal_in(b: &SalsaBox, nonce: [u8; NONCE_LEN], msg: &[u8]) -> Vec<u8> {
    let sealed = b.encrypt(Nonce::from_slice(&nonce), msg).expect("XSalsa20Poly1305 sealing cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

fn open_in(b: &SalsaBox, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN + BOX_OVERHEAD {
        return None;
    }
    b.decrypt(Nonce::from_slice(&sealed[..NONCE_LEN]), &sealed[NONCE_LEN..]).ok()
}

/// Seals `msg` from `from` to `to` with `nonce`: returns `nonce ‖ box`.
pub fn seal_with_nonce(from: &NodePrivate, to: &NodePublic, nonce: [u8; NONCE_LEN], msg: &[u8]) -> Vec<u8> {
    seal_in(&shared_box(from, to), nonce, msg)
}

/// Seals with a random nonce (Tailscale `SealTo`).
pub fn seal(from: &NodePrivate, to: &NodePublic, msg: &[u8]) -> Vec<u8> {
    seal_with_nonce(from, to, rand::random(), msg)
}

/// Opens `nonce ‖ box` sent by `from` to `to` (Tailscale `OpenFrom`).
pub fn open(to: &NodePrivate, from: &NodePublic, sealed: &[u8]) -> Option<Vec<u8>> {
    open_in(&shared_box(to, from), sealed)
}

/// The ServerKey frame: header ‖ Magic ‖ server public key (40-byte payload).
pub fn server_key_frame(server: &NodePublic) -> Bytes {
    let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN + MAGIC.len() + KEY_LEN);
    put_header(&mut b, FrameType::ServerKey, MAGIC.len() + KEY_LEN);
    b.put_slice(&MAGIC);
    b.put_slice(&server.0);
    b.freeze()
}

/// What a client says about itself in ClientInfo.
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    /// The region mesh key, when the client is a mesh peer.
    pub mesh_key: Option<MeshKey>,
    /// Protocol version the client speaks (2 today; 0 if omitted).
    pub version: i64,
    /// The client answers server Pings (the server ignores this).
    pub can_ack_pings: bool,
    /// The client is a prober (PeerPresent flag 0x04).
    pub is_prober: bool,
    /// Optional application name, for stats.
    pub app_name: Option<String>,
}

fn json_err(what: &'static str, reason: impl Into<String>) -> HandshakeError {
    HandshakeError::Json { what, reason: reason.into() }
}

fn object(what: &'static str, plain: &[u8]) -> Result<Map<String, Value>, HandshakeError> {
    match serde_json::from_slice::<Value>(plain) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(json_err(what, "not a JSON object")),
        Err(e) => Err(json_err(what, e.to_string())),
    }
}

/// Looks a field up case-insensitively (Go's `encoding/json` v1 behaviour). Go prefers an exact
/// match; when there is none, the last case-insensitive match wins, as Go decodes fields in order.
fn field<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.get(name).or_else(|| m.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v).next_back())
}

fn bool_field(what: &'static str, m: &Map<String, Value>, name: &str) -> Result<bool, HandshakeError> {
    match field(m, name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(json_err(what, format!("{name} is not a bool"))),
    }
}

fn int_field(what: &'static str, m: &Map<String, Value>, name: &str) -> Result<i64, HandshakeError> {
    match field(m, name) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => {
            n.as_i64().ok_or_else(|| json_err(what, format!("{name} is not an integer")))
        }
        Some(_) => Err(json_err(what, format!("{name} is not a number"))),
    }
}

impl ClientInfo {
    /// The JSON Go clients send, in Go's field order (`meshKey` and zero/false fields omitted
    /// exactly as Go's `omitempty` does).
    pub fn to_json(&self) -> String {
        let mut m = Map::new();
        if let Some(k) = &self.mesh_key {
            m.insert("meshKey".into(), Value::String(k.to_hex()));
        }
        if self.version != 0 {
            m.insert("version".into(), Value::from(self.version));
        }
        m.insert("CanAckPings".into(), Value::Bool(self.can_ack_pings));
        if self.is_prober {
            m.insert("IsProber".into(), Value::Bool(true));
        }
        if let Some(a) = self.app_name.as_ref().filter(|a| !a.is_empty()) {
            m.insert("AppName".into(), Value::String(a.clone()));
        }
        // serde_json's Map keeps insertion order only with `preserve_order`; build by hand.
        let mut s = String::from("{");
        let order = ["meshKey", "version", "CanAckPings", "IsProber", "AppName"];
        for k in order {
            if let Some(v) = m.get(k) {
                if s.len() > 1 {
                    s.push(',');
                }
                s.push_str(&format!("{}:{}", Value::String(k.into()), v));
            }
        }
        s.push('}');
        s
    }

    /// Parses ClientInfo JSON: keys case-insensitive, unknown fields ignored. A `meshKey` of
    /// `""` or `"none"` (ts_derp sends that) means no mesh key; any other value must be 64 hex.
    pub fn from_json(plain: &[u8]) -> Result<Self, HandshakeError> {
        const W: &str = "ClientInfo";
        let m = object(W, plain)?;
        let mesh_key = match field(&m, "meshKey") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() || s == "none" => None,
            Some(Value::String(s)) => {
                Some(MeshKey::parse(s).map_err(|_| json_err(W, "meshKey is not 32 bytes of hex"))?)
            }
            Some(_) => return Err(json_err(W, "meshKey is not a string")),
        };
        let app_name = match field(&m, "AppName") {
            Some(Value::String(s)) => Some(s.clone()),
            None | Some(Value::Null) => None,
            Some(_) => return Err(json_err(W, "AppName is not a string")),
        };
        Ok(Self {
            mesh_key,
            version: int_field(W, &m, "version")?,
            can_ack_pings: bool_field(W, &m, "CanAckPings")?,
            is_prober: bool_field(W, &m, "IsProber")?,
            app_name,
        })
    }
}

/// Builds the ClientInfo frame payload: `clientPub ‖ nonce ‖ box(json)`.
pub fn seal_client_info_with_nonce(
    client: &NodePrivate,
    server: &NodePublic,
    info: &ClientInfo,
    nonce: [u8; NONCE_LEN],
) -> Bytes {
    let sealed = seal_with_nonce(client, server, nonce, info.to_json().as_bytes());
    let mut b = BytesMut::with_capacity(KEY_LEN + sealed.len());
    b.put_slice(&client.public().0);
    b.put_slice(&sealed);
    b.freeze()
}

/// [`seal_client_info_with_nonce`] with a random nonce.
pub fn seal_client_info(client: &NodePrivate, server: &NodePublic, info: &ClientInfo) -> Bytes {
    seal_client_info_with_nonce(client, server, info, rand::random())
}

/// Server side: opens a ClientInfo payload, returning the claimed client key and its info.
pub fn open_client_info(
    server: &NodePrivate,
    payload: &[u8],
) -> Result<(NodePublic, ClientInfo), HandshakeError> {
    if payload.len() < KEY_LEN + NONCE_LEN {
        return Err(HandshakeError::TooShort("ClientInfo"));
    }
    let client = NodePublic::from_slice(&payload[..KEY_LEN]).expect("sliced to KEY_LEN");
    let plain = open(server, &client, &payload[KEY_LEN..]).ok_or(HandshakeError::BoxOpen("ClientInfo"))?;
    Ok((client, ClientInfo::from_json(&plain)?))
}

/// Server side in one key agreement: opens a ClientInfo payload and seals `reply` (the ServerInfo
/// to send if the client is admitted) with the same precomputed box. Derper does two X25519
/// operations per handshake here; this does one, which is most of a plain-HTTP handshake's CPU.
pub fn open_client_info_and_seal_reply(
    server: &NodePrivate,
    payload: &[u8],
    reply: &ServerInfo,
) -> Result<(NodePublic, ClientInfo, Bytes), HandshakeError> {
    if payload.len() < KEY_LEN + NONCE_LEN {
        return Err(HandshakeError::TooShort("ClientInfo"));
    }
    let client = NodePublic::from_slice(&payload[..KEY_LEN]).expect("sliced to KEY_LEN");
    let b = shared_box(server, &client);
    let plain = open_in(&b, &payload[KEY_LEN..]).ok_or(HandshakeError::BoxOpen("ClientInfo"))?;
    let info = ClientInfo::from_json(&plain)?;
    let sealed = seal_in(&b, rand::random(), reply.to_json().as_bytes());
    Ok((client, info, Bytes::from(sealed)))
}

/// What the server says in ServerInfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    /// Protocol version (2).
    pub version: i64,
    /// Optional client-side send throttle rate (derper never sets it).
    pub token_bucket_bytes_per_second: i64,
    /// Optional client-side send throttle burst.
    pub token_bucket_bytes_burst: i64,
}

impl Default for ServerInfo {
    fn default() -> Self {
        Self {
            version: PROTOCOL_VERSION as i64,
            token_bucket_bytes_per_second: 0,
            token_bucket_bytes_burst: 0,
        }
    }
}

impl ServerInfo {
    /// The JSON derper sends: exactly `{"version":2}` unless a token bucket is advertised.
    pub fn to_json(&self) -> String {
        let mut s = format!("{{\"version\":{}", self.version);
        if self.token_bucket_bytes_per_second != 0 {
            s.push_str(&format!(",\"TokenBucketBytesPerSecond\":{}", self.token_bucket_bytes_per_second));
        }
        if self.token_bucket_bytes_burst != 0 {
            s.push_str(&format!(",\"TokenBucketBytesBurst\":{}", self.token_bucket_bytes_burst));
        }
        s.push('}');
        s
    }

    /// Parses ServerInfo JSON, case-insensitively.
    pub fn from_json(plain: &[u8]) -> Result<Self, HandshakeError> {
        const W: &str = "ServerInfo";
        let m = object(W, plain)?;
        Ok(Self {
            version: int_field(W, &m, "version")?,
            token_bucket_bytes_per_second: int_field(W, &m, "TokenBucketBytesPerSecond")?,
            token_bucket_bytes_burst: int_field(W, &m, "TokenBucketBytesBurst")?,
        })
    }
}

/// Builds the ServerInfo frame payload `nonce ‖ box(json)`.
pub fn seal_server_info_with_nonce(
    server: &NodePrivate,
    client: &NodePublic,
    info: &ServerInfo,
    nonce: [u8; NONCE_LEN],
) -> Bytes {
    Bytes::from(seal_with_nonce(server, client, nonce, info.to_json().as_bytes()))
}

/// [`seal_server_info_with_nonce`] with a random nonce.
pub fn seal_server_info(server: &NodePrivate, client: &NodePublic, info: &ServerInfo) -> Bytes {
    seal_server_info_with_nonce(server, client, info, rand::random())
}

/// Client side: opens a ServerInfo payload (24 ≤ len ≤ 24 + 1 MiB).
pub fn open_server_info(
    client: &NodePrivate,
    server: &NodePublic,
    payload: &[u8],
) -> Result<ServerInfo, HandshakeError> {
    if payload.len() < NONCE_LEN || payload.len() > NONCE_LEN + MAX_INFO_LEN {
        return Err(HandshakeError::TooShort("ServerInfo"));
    }
    let plain = open(client, server, payload).ok_or(HandshakeError::BoxOpen("ServerInfo"))?;
    ServerInfo::from_json(&plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::ClientToServer;

    fn seq(start: u8) -> [u8; 24] {
        std::array::from_fn(|i| start + i as u8)
    }

    fn frame(ty: FrameType, payload: &[u8]) -> String {
        let mut b = BytesMut::new();
        put_header(&mut b, ty, payload.len());
        b.put_slice(payload);
        hex::encode(b)
    }

    #[test]
    fn spec_vectors_byte_for_byte() {
        let server = NodePrivate::from_bytes([0x11; 32]);
        let client = NodePrivate::from_bytes([0x22; 32]);
        assert_eq!(
            hex::encode(server_key_frame(&server.public())),
            "010000002844455250f09f94917b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13"
        );
        let info = ClientInfo { version: 2, can_ack_pings: true, ..Default::default() };
        assert_eq!(info.to_json(), r#"{"version":2,"CanAckPings":true}"#);
        let ci = seal_client_info_with_nonce(&client, &server.public(), &info, seq(0));
        assert_eq!(
            frame(FrameType::ClientInfo, &ci),
            "02000000680faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20000102030405060708090a0b0c0d0e0f1011121314151617a858a062bb55fbd0e565bf952225b5e220ae6ff32ce093a7548f0f9efd7331db8b94711fe4546f1ed0d738121d94abe3"
        );
        let si = seal_server_info_with_nonce(&server, &client.public(), &ServerInfo::default(), seq(0x20));
        assert_eq!(
            frame(FrameType::ServerInfo, &si),
            "0300000035202122232425262728292a2b2c2d2e2f303132333435363728743e8bae74bd6ec0b9b80cf3f69c1222c6d5d7bde72d8db1967e494b"
        );
        let (k, got) = open_client_info(&server, &ci).unwrap();
        assert_eq!(k, client.public());
        assert!(got.can_ack_pings && got.version == 2 && got.mesh_key.is_none());
        assert_eq!(open_server_info(&client, &server.public(), &si).unwrap(), ServerInfo::default());
        let (k2, got2, reply) =
            open_client_info_and_seal_reply(&server, &ci, &ServerInfo::default()).unwrap();
        assert_eq!(k2, client.public());
        assert_eq!(got2.version, 2);
        assert_eq!(open_server_info(&client, &server.public(), &reply).unwrap(), ServerInfo::default());
        let _ = ClientToServer::ClientInfo(ci);
    }

    #[test]
    fn client_info_json_is_case_insensitive_and_lenient() {
        let i = ClientInfo::from_json(br#"{"Version":2,"MeshKey":"abababababababababababababababababababababababababababababababab","x":1}"#).unwrap();
        assert_eq!(i.version, 2);
        assert!(i.mesh_key.unwrap().ct_eq(&MeshKey::from_bytes([0xab; 32])));
        let i =
            ClientInfo::from_json(br#"{"version":2,"meshKey":"none","canAckPings":false,"isProber":true}"#)
                .unwrap();
        assert!(i.mesh_key.is_none() && i.is_prober);
        assert!(ClientInfo::from_json(br#"{"meshKey":"abcd"}"#).is_err());
        assert!(ClientInfo::from_json(b"not json").is_err());
        let mesh =
            ClientInfo { mesh_key: Some(MeshKey::from_bytes([1; 32])), version: 2, ..Default::default() };
        assert_eq!(
            mesh.to_json(),
            format!(r#"{{"meshKey":"{}","version":2,"CanAckPings":false}}"#, "01".repeat(32))
        );
    }

    #[test]
    fn wrong_key_does_not_open() {
        let server = NodePrivate::generate();
        let client = NodePrivate::generate();
        let mut ci = seal_client_info(&client, &server.public(), &ClientInfo::default()).to_vec();
        ci[0] ^= 1; // claim another key
        assert!(matches!(open_client_info(&server, &ci), Err(HandshakeError::BoxOpen(_))));
    }
}
