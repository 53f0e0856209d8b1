//! Protocol constants (spec §1.1). Every number here is part of the wire contract with Tailscale's
//! Go client and server; change none of them without reading the spec.

use std::time::Duration;

/// `"DERP🔑"`: the 8 bytes that open the ServerKey frame.
pub const MAGIC: [u8; 8] = *b"DERP\xf0\x9f\x94\x91";
/// DERP protocol version 2: RecvPacket frames carry the 32-byte source key.
pub const PROTOCOL_VERSION: u32 = 2;
/// Frame header: `type:u8` then `length:u32` big-endian (payload length only).
pub const FRAME_HEADER_LEN: usize = 5;
/// Curve25519 public key length.
pub const KEY_LEN: usize = 32;
/// NaCl box nonce length.
pub const NONCE_LEN: usize = 24;
/// NaCl box authenticator (Poly1305 tag) length.
pub const BOX_OVERHEAD: usize = 16;
/// Maximum packet **data** in SendPacket/RecvPacket/ForwardPacket, excluding keys and header.
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Maximum ServerInfo JSON a client accepts.
pub const MAX_INFO_LEN: usize = 1 << 20;
/// Maximum ClientInfo frame payload the server accepts (256 KiB).
pub const MAX_CLIENT_INFO_LEN: usize = 256 << 10;
/// Largest frame a client accepts from a server (1 MiB).
pub const MAX_FRAME_FROM_SERVER: usize = 1 << 20;
/// Ping payloads longer than this close the connection (server rule).
pub const MAX_PING_LEN: usize = 1000;
/// Ping/Pong payload length echoed.
pub const PING_DATA_LEN: usize = 8;
/// The interval between server KeepAlive frames, before jitter.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// Upper bound (exclusive) of the per-connection KeepAlive jitter.
pub const KEEPALIVE_JITTER: Duration = Duration::from_secs(5);
/// Deadline for the ServerKey write and ClientInfo read on a new connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The Go client's read deadline: a server silent this long gets disconnected.
pub const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Per-connection send queue depth (data and disco queues each), as derper.
pub const PER_CLIENT_SEND_QUEUE_DEPTH: usize = 32;
/// Default per-frame write deadline for regular clients.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-frame write deadline for mesh peers.
pub const MESH_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The `Derp-Version` HTTP header value and ServerInfo version.
pub const DERP_VERSION_HEADER: &str = "Derp-Version";
/// The `Derp-Public-Key` header in the 101 response.
pub const DERP_PUBLIC_KEY_HEADER: &str = "Derp-Public-Key";
/// Request header asking the server to skip the 101 response (fast start).
pub const FAST_START_HEADER: &str = "Derp-Fast-Start";
/// Request header naming the region's first node when the client connected to another one.
pub const IDEAL_NODE_HEADER: &str = "Ideal-Node";
/// CN prefix of the TLS meta-certificate carrying the server key.
pub const META_CERT_CN_PREFIX: &str = "derpkey";
