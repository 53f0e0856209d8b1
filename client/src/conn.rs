//! One DERP connection: dial, TLS, HTTP upgrade (with fast start), handshake, then a reader half
//! and a batching writer half.
//!
//! Connect flow (spec §1.3, §2.1, §2.6): TCP to the first node that answers, TLS per the node's
//! `CertName`, `GET /derp` with `Upgrade: DERP`. Under TLS 1.3 a `derpkey…` meta-certificate
//! already tells us the server key, so the request and ClientInfo go out in **one write** with
//! `Derp-Fast-Start: 1` and no 101 is awaited. Otherwise we read the 101, then the ServerKey frame,
//! then send ClientInfo. Either way the connection counts as up once ServerInfo opens. The whole
//! connect is bounded by [`ConnectOptions::connect_timeout`] (10 s, as the Go client).
//!
//! After connect, [`DerpConn::split`] yields a [`DerpSender`] (cheap to clone, many tasks may send)
//! and a [`DerpReceiver`]. Frames to send go through a bounded queue to a writer task that encodes
//! everything queued into one buffer and writes it at once, so a burst of packets becomes a few
//! TLS records instead of one record per packet. The receiver answers server Pings itself.
//! [`ConnectOptions::write_per_frame`] turns the batching off (one write per frame, as Tailscale's
//! client writes); [`DerpConn::connect_bare`] keeps only the socket (load generators).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use derpfleet_proto::consts::*;
use derpfleet_proto::derpmap::{CertCheck, DerpRegion};
use derpfleet_proto::frame::{FrameDecoder, FrameError, FrameType, Role};
use derpfleet_proto::handshake::{
    open_server_info, seal_client_info, ClientInfo, HandshakeError, ServerInfo,
};
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dial::{self, DerpUrl, DialError};
use crate::tls;

/// Any byte stream a DERP connection can run over (TCP, TLS).
pub trait DerpStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> DerpStream for T {}
pub(crate) type BoxStream = Box<dyn DerpStream>;

/// Largest HTTP response head we read before the DERP stream starts.
const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// Bytes the writer gathers before writing even if more frames are queued.
const WRITE_BATCH_BYTES: usize = 256 << 10;

/// Where to connect.
#[derive(Clone, Debug)]
pub enum DerpTarget {
    /// A region of a DERP map: nodes dialed in order.
    Region(DerpRegion),
    /// A URL (tests, load tests, mesh).
    Url(DerpUrl),
}

/// Who we are and how to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Our node key.
    pub private_key: NodePrivate,
    /// The region mesh key, when connecting as a mesh peer.
    pub mesh_key: Option<MeshKey>,
    /// Announce ourselves as a prober.
    pub is_prober: bool,
    /// Optional application name for the server's stats.
    pub app_name: Option<String>,
    /// Extra trusted roots for Web PKI verification (besides the bundled Mozilla roots).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Hold IPv4 back 200 ms (the last netcheck saw IPv6).
    pub prefer_ipv6: bool,
    /// Source address for the TCP connection (load generators spread over many addresses).
    pub bind_addr: Option<std::net::IpAddr>,
    /// Tunnel through this HTTP proxy (`CONNECT`); see [`crate::dial::HttpProxy::from_env`].
    pub proxy: Option<crate::dial::HttpProxy>,
    /// Use the meta-certificate fast start when offered (on by default).
    pub fast_start: bool,
    /// Speak DERP inside a WebSocket (subprotocol `derp`) instead of `Upgrade: DERP`.
    pub websocket: bool,
    /// Frames that may wait for the writer; beyond that `send_*` waits and `try_send_*` drops.
    pub send_queue: usize,
    /// A server silent this long is dead (120 s, as the Go client; the server sends KeepAlive every 60 s).
    pub read_timeout: Duration,
    /// Budget for DNS + TCP + TLS + HTTP + DERP handshake.
    pub connect_timeout: Duration,
    /// Deadline for each batched write; on expiry the connection closes (None = no deadline).
    /// Mesh links use 5 s, as derper's forwarding writes.
    pub write_timeout: Option<Duration>,
    /// Write each frame on its own (one write and flush per frame, no coalescing of queued
    /// frames), as Tailscale's Go client does: it writes header and payload through a
    /// `bufio.Writer` and flushes on every send. Load generators use it to offer a relay the
    /// syscall pattern real clients produce. Off by default (batched writes).
    pub write_per_frame: bool,
}

impl ConnectOptions {
    /// Defaults for `private_key`.
    pub fn new(private_key: NodePrivate) -> Self {
        Self {
            private_key,
            mesh_key: None,
            is_prober: false,
            app_name: None,
            extra_roots: Vec::new(),
            prefer_ipv6: false,
            bind_addr: None,
            proxy: None,
            fast_start: true,
            websocket: false,
            send_queue: 1024,
            read_timeout: CLIENT_READ_TIMEOUT,
            connect_timeout: HANDSHAKE_TIMEOUT,
            write_timeout: None,
            write_per_frame: false,
        }
    }
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No node accepted TCP.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// TCP to a URL target failed.
    #[error("connecting to {0}: {1}")]
    Tcp(String, std::io::Error),
    /// TLS handshake failed (certificate rejected, ...).
    #[error("TLS with {host}: {err}")]
    Tls {
        /// the dialed host
        host: String,
        /// what failed
        err: std::io::Error,
    },
    /// The server answered the upgrade with something other than 101.
    #[error("server refused the DERP upgrade: HTTP {status}: {body}")]
    HttpStatus {
        /// HTTP status code
        status: u16,
        /// start of the response body
        body: String,
    },
    /// The HTTP response could not be parsed.
    #[error("bad HTTP response: {0}")]
    Http(String),
    /// ServerKey/ServerInfo missing, malformed or not opening.
    #[error("DERP handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// Bad framing during the handshake.
    #[error("DERP handshake framing: {0}")]
    Frame(#[from] FrameError),
    /// The server key in ServerKey differs from the meta-certificate's.
    #[error("server key {frame} in ServerKey frame differs from meta-certificate key {cert}")]
    KeyMismatch {
        /// from the frame
        frame: NodePublic,
        /// from the certificate
        cert: NodePublic,
    },
    /// The first frame was not ServerKey.
    #[error("expected ServerKey frame, got type {0:#04x}")]
    NoServerKey(u8),
    /// Reading or writing failed (including the server closing the connection).
    #[error("I/O during handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The whole connect took longer than the budget.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
}

/// Why a connected DERP connection stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// The connection is closed (by the server, by us, or after a write failure).
    #[error("DERP connection closed")]
    Closed,
    /// Read failure.
    #[error("DERP read: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent a frame we cannot accept (e.g. > 1 MiB).
    #[error("DERP framing: {0}")]
    Frame(#[from] FrameError),
    /// Nothing heard from the server for the read timeout.
    #[error("no frame from the server for {0:?}")]
    Silent(Duration),
}

/// A connected, handshaken DERP connection, before splitting.
pub struct DerpConn {
    sender: DerpSender,
    receiver: DerpReceiver,
    info: ConnInfo,
}

/// Facts about an established connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The server's public key.
    pub server_key: NodePublic,
    /// What the server said in ServerInfo.
    pub server_info: ServerInfo,
    /// The TCP peer address.
    pub remote: SocketAddr,
    /// The node connected to (region targets), by name.
    pub node_name: Option<String>,
    /// Fast start was used (the 101 was skipped).
    pub fast_start: bool,
}

impl DerpConn {
    /// Dials `target` and completes the DERP handshake, within `opts.connect_timeout`.
    pub async fn connect(target: &DerpTarget, opts: &ConnectOptions) -> Result<Self, ConnectError> {
        tokio::time::timeout(opts.connect_timeout, connect_inner(target, opts))
            .await
            .unwrap_or(Err(ConnectError::Timeout(opts.connect_timeout)))
    }

    /// As [`Self::connect`], but keeps nothing past the handshake except the byte stream: no
    /// writer task, no queue, no read buffer. For holding many idle connections (load
    /// generators); the caller reads and writes raw DERP frames itself, if at all.
    pub async fn connect_bare(target: &DerpTarget, opts: &ConnectOptions) -> Result<BareConn, ConnectError> {
        let h = tokio::time::timeout(opts.connect_timeout, handshake(target, opts))
            .await
            .unwrap_or(Err(ConnectError::Timeout(opts.connect_timeout)))?;
        Ok(BareConn { stream: h.stream, info: h.info, pending: h.buf })
    }

    /// Facts about the connection.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// The sending and receiving halves. Keep the receiver alive (and reading) for as long as the
    /// connection should live: dropping it closes the connection, since unread frames would
    /// otherwise pile up on the server.
    pub fn split(self) -> (DerpSender, DerpReceiver) {
        (self.sender, self.receiver)
    }
}

/// A handshaken connection reduced to its byte stream (see [`DerpConn::connect_bare`]).
pub struct BareConn {
    /// TCP, TLS or WebSocket, positioned after ServerInfo.
    pub stream: Box<dyn DerpStream>,
    /// Facts about the connection.
    pub info: ConnInfo,
    /// Bytes already read past ServerInfo (usually none).
    pub pending: BytesMut,
}

/// A connection right after ServerInfo, before the halves exist.
struct Handshaken {
    stream: BoxStream,
    buf: BytesMut,
    dec: FrameDecoder,
    info: ConnInfo,
}

/// What the dial + TLS step produced.
pub(crate) struct Transport {
    pub(crate) stream: BoxStream,
    remote: SocketAddr,
    host: String,
    pub(crate) host_header: String,
    path: String,
    meta_key: Option<NodePublic>,
    ideal_node: Option<String>,
    node_name: Option<String>,
}

async fn tls_wrap(
    tcp: TcpStream,
    host: &str,
    check: &CertCheck,
    extra_roots: &[CertificateDer<'static>],
) -> Result<(BoxStream, Option<NodePublic>), ConnectError> {
    let _ = tcp.set_nodelay(true);
    let cfg = tls::client_config(check, extra_roots);
    // An IP literal becomes an IpAddress server name, for which rustls sends no SNI.
    let name = ServerName::try_from(host.to_string()).map_err(|_| ConnectError::Tls {
        host: host.into(),
        err: std::io::Error::new(std::io::ErrorKind::InvalidInput, "host is not a valid TLS name"),
    })?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|err| ConnectError::Tls { host: host.into(), err })?;
    let (_, session) = tls.get_ref();
    let meta = if session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
        session.peer_certificates().and_then(tls::meta_cert_key)
    } else {
        None
    };
    Ok((Box::new(tls), meta))
}

pub(crate) async fn transport(target: &DerpTarget, opts: &ConnectOptions) -> Result<Transport, ConnectError> {
    match target {
        DerpTarget::Region(region) => {
            let (tcp, remote, idx) =
                dial::dial_region(region, opts.prefer_ipv6, opts.bind_addr, opts.proxy.as_ref()).await?;
            let node = &region.nodes[idx];
            let (stream, meta_key) =
                tls_wrap(tcp, &node.host_name, &node.cert_check(), &opts.extra_roots).await?;
            let first = &region.nodes[0].name;
            Ok(Transport {
                stream,
                remote,
                host: node.host_name.clone(),
                host_header: dial::host_header(&node.host_name, node.derp_port(), 443),
                path: "/derp".into(),
                meta_key,
                ideal_node: (node.name != *first).then(|| first.clone()),
                node_name: Some(node.name.clone()),
            })
        }
        DerpTarget::Url(url) => {
            let (tcp, remote) = dial::dial_url(url, opts.bind_addr, opts.proxy.as_ref())
                .await
                .map_err(|e| ConnectError::Tcp(format!("{}:{}", url.host, url.port), e))?;
            let (stream, meta_key) = if url.https {
                tls_wrap(tcp, &url.host, &url.cert_check, &opts.extra_roots).await?
            } else {
                let _ = tcp.set_nodelay(true);
                (Box::new(tcp) as BoxStream, None)
            };
            Ok(Transport {
                stream,
                remote,
                host: url.host.clone(),
                host_header: url.host_header(),
                path: url.path.clone(),
                meta_key,
                ideal_node: None,
                node_name: None,
            })
        }
    }
}

fn upgrade_request(t: &Transport, fast: bool) -> Vec<u8> {
    let mut r = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: derpfleet-client/{}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n",
        t.path,
        t.host_header,
        env!("CARGO_PKG_VERSION")
    );
    if let Some(n) = &t.ideal_node {
        r.push_str(&format!("{IDEAL_NODE_HEADER}: {n}\r\n"));
    }
    if fast {
        r.push_str(&format!("{FAST_START_HEADER}: 1\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// Reads the HTTP response head (status must be 101); returns its headers, with `buf` holding
/// whatever followed the head.
async fn read_upgrade_response(
    s: &mut BoxStream,
    buf: &mut BytesMut,
) -> Result<Vec<(String, String)>, ConnectError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(0);
                if status == 101 {
                    let headers = resp
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect();
                    let _ = buf.split_to(n);
                    return Ok(headers);
                }
                let content_len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                    .unwrap_or(0)
                    .min(1024);
                let _ = buf.split_to(n);
                while buf.len() < content_len {
                    if s.read_buf(buf).await.unwrap_or(0) == 0 {
                        break;
                    }
                }
                let body = String::from_utf8_lossy(&buf[..buf.len().min(1024)]).trim().to_string();
                return Err(ConnectError::HttpStatus { status, body });
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_RESPONSE_HEAD {
                    return Err(ConnectError::Http("response head too large".into()));
                }
                if s.read_buf(buf).await? == 0 {
                    return Err(ConnectError::Http("connection closed before the HTTP response".into()));
                }
            }
            Err(e) => return Err(ConnectError::Http(e.to_string())),
        }
    }
}

/// Upgrades to a WebSocket with subprotocol `derp`; returns the byte stream over it.
async fn websocket_upgrade(t: &mut Transport, buf: &mut BytesMut) -> Result<BoxStream, ConnectError> {
    let key = crate::ws::new_key();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: derpfleet-client/{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        t.path,
        t.host_header,
        env!("CARGO_PKG_VERSION"),
        crate::ws::SUBPROTOCOL,
    );
    t.stream.write_all(req.as_bytes()).await?;
    t.stream.flush().await?;
    let headers = read_upgrade_response(&mut t.stream, buf).await?;
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.trim().to_string());
    if get("sec-websocket-accept") != Some(crate::ws::accept_for(&key)) {
        return Err(ConnectError::Http("WebSocket upgrade without a valid Sec-WebSocket-Accept".into()));
    }
    if get("sec-websocket-protocol").as_deref() != Some(crate::ws::SUBPROTOCOL) {
        return Err(ConnectError::Http("server did not accept the `derp` WebSocket subprotocol".into()));
    }
    let stream = std::mem::replace(&mut t.stream, Box::new(tokio::io::duplex(1).0));
    let already = buf.split().to_vec();
    Ok(Box::new(
        crate::ws::WsBytes::new(stream, tokio_tungstenite::tungstenite::protocol::Role::Client, already)
            .await,
    ))
}

async fn read_frame(
    s: &mut BoxStream,
    buf: &mut BytesMut,
    dec: &mut FrameDecoder,
) -> Result<ServerToClient, ConnectError> {
    loop {
        if let Some(f) = dec.decode(buf)? {
            return Ok(ServerToClient::decode(f)?);
        }
        buf.reserve(4096);
        if s.read_buf(buf).await? == 0 {
            return Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

fn client_info_frame(opts: &ConnectOptions, server: &NodePublic) -> BytesMut {
    let info = ClientInfo {
        mesh_key: opts.mesh_key,
        version: PROTOCOL_VERSION as i64,
        can_ack_pings: true,
        is_prober: opts.is_prober,
        app_name: opts.app_name.clone(),
    };
    let mut b = BytesMut::new();
    ClientToServer::ClientInfo(seal_client_info(&opts.private_key, server, &info)).encode(&mut b);
    b
}

async fn connect_inner(target: &DerpTarget, opts: &ConnectOptions) -> Result<DerpConn, ConnectError> {
    let Handshaken { stream, buf, dec, info } = handshake(target, opts).await?;
    let (r, w) = tokio::io::split(stream);
    let (sender, cancel) = spawn_writer(w, opts.send_queue, opts.write_timeout, opts.write_per_frame);
    let receiver = DerpReceiver {
        r,
        buf,
        dec,
        pong: sender.clone(),
        read_timeout: opts.read_timeout,
        cancel,
        closed: false,
        read_chunk: MIN_READ_CHUNK,
    };
    Ok(DerpConn { sender, receiver, info })
}

async fn handshake(target: &DerpTarget, opts: &ConnectOptions) -> Result<Handshaken, ConnectError> {
    let mut t = transport(target, opts).await?;
    let mut buf = BytesMut::with_capacity(4 << 10);
    let mut dec = FrameDecoder::new(Role::Client);
    if opts.websocket {
        t.stream = websocket_upgrade(&mut t, &mut buf).await?;
    }
    let fast_key = t.meta_key.filter(|_| opts.fast_start && !opts.websocket);
    let server_key = match fast_key {
        Some(key) => {
            let mut out = upgrade_request(&t, true);
            out.put_slice(&client_info_frame(opts, &key));
            t.stream.write_all(&out).await?;
            t.stream.flush().await?;
            // A server (or proxy) that ignores fast start still answers 101 first: accept it.
            while buf.len() < 5 {
                if t.stream.read_buf(&mut buf).await? == 0 {
                    return Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
            if buf.starts_with(b"HTTP/") {
                read_upgrade_response(&mut t.stream, &mut buf).await?;
            }
            key
        }
        None => {
            if !opts.websocket {
                t.stream.write_all(&upgrade_request(&t, false)).await?;
                t.stream.flush().await?;
                read_upgrade_response(&mut t.stream, &mut buf).await?;
            }
            let key = match read_frame(&mut t.stream, &mut buf, &mut dec).await? {
                ServerToClient::ServerKey(k) => k,
                other => return Err(ConnectError::NoServerKey(frame_type_of(&other))),
            };
            t.stream.write_all(&client_info_frame(opts, &key)).await?;
            t.stream.flush().await?;
            key
        }
    };
    // Up to ServerInfo: a fast-start server still sends ServerKey first; it must agree.
    let server_info = loop {
        match read_frame(&mut t.stream, &mut buf, &mut dec).await? {
            ServerToClient::ServerInfo(p) => break open_server_info(&opts.private_key, &server_key, &p)?,
            ServerToClient::ServerKey(k) if k != server_key => {
                return Err(ConnectError::KeyMismatch { frame: k, cert: server_key })
            }
            _ => continue,
        }
    };
    tracing::debug!(host = %t.host, remote = %t.remote, fast = fast_key.is_some(), "DERP connected");
    let info = ConnInfo {
        server_key,
        server_info,
        remote: t.remote,
        node_name: t.node_name,
        fast_start: fast_key.is_some(),
    };
    Ok(Handshaken { stream: t.stream, buf, dec, info })
}

fn frame_type_of(m: &ServerToClient) -> u8 {
    let mut b = BytesMut::new();
    m.encode(&mut b);
    b.first().copied().unwrap_or(0)
}

/// Spawns the writer task; returns the sender and a token cancelled when the writer stops.
fn spawn_writer(
    w: WriteHalf<BoxStream>,
    depth: usize,
    write_timeout: Option<Duration>,
    per_frame: bool,
) -> (DerpSender, CancellationToken) {
    let (tx, rx) = mpsc::channel(depth.max(1));
    let cancel = CancellationToken::new();
    let stats = Arc::new(SendStats::default());
    let batch_bytes = if per_frame { 0 } else { WRITE_BATCH_BYTES };
    tokio::spawn(writer_loop(w, rx, cancel.clone(), stats.clone(), write_timeout, batch_bytes));
    (DerpSender { tx, stats, cancel: cancel.clone() }, cancel)
}

/// Encodes everything queued (up to `batch_bytes`; 0 = one frame per write) into one buffer,
/// writes it, and repeats; exits on a write error, when every sender is gone, or when the
/// connection is cancelled.
async fn writer_loop(
    mut w: WriteHalf<BoxStream>,
    mut rx: mpsc::Receiver<ClientToServer>,
    cancel: CancellationToken,
    stats: Arc<SendStats>,
    write_timeout: Option<Duration>,
    batch_bytes: usize,
) {
    let mut buf = BytesMut::new();
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = cancel.cancelled() => None,
        };
        let Some(first) = first else { break };
        first.encode(&mut buf);
        let mut frames = 1u64;
        while buf.len() < batch_bytes {
            match rx.try_recv() {
                Ok(m) => {
                    m.encode(&mut buf);
                    frames += 1;
                }
                Err(_) => break,
            }
        }
        let write = async {
            w.write_all(&buf).await?;
            w.flush().await
        };
        let write = async {
            match write_timeout {
                Some(t) => tokio::time::timeout(t, write).await.unwrap_or_else(|_| {
                    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write deadline passed"))
                }),
                None => write.await,
            }
        };
        let res = tokio::select! {
            r = write => r,
            _ = cancel.cancelled() => break,
        };
        if let Err(e) = res {
            tracing::debug!("DERP write failed: {e}");
            break;
        }
        stats.frames.fetch_add(frames, Ordering::Relaxed);
        stats.writes.fetch_add(1, Ordering::Relaxed);
        buf.clear();
        // Keep a big batch buffer only while busy: an idle connection holds none.
        if buf.capacity() > (64 << 10) && rx.is_empty() {
            buf = BytesMut::new();
        }
    }
    cancel.cancel();
    // Bounded: a peer that stopped reading must not keep this task alive.
    let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
}

#[derive(Debug, Default)]
struct SendStats {
    frames: AtomicU64,
    writes: AtomicU64,
    dropped: AtomicU64,
}

/// Why a send failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// The connection is closed.
    #[error("DERP connection closed")]
    Closed,
    /// (`try_*` only) the send queue is full; the frame was dropped and counted.
    #[error("DERP send queue full; frame dropped")]
    Full,
}

/// The sending half: cheap to clone; frames are queued to the connection's writer task.
#[derive(Clone, Debug)]
pub struct DerpSender {
    tx: mpsc::Sender<ClientToServer>,
    stats: Arc<SendStats>,
    cancel: CancellationToken,
}

impl DerpSender {
    /// Queues any frame, waiting for queue space.
    pub async fn send(&self, m: ClientToServer) -> Result<(), SendError> {
        self.tx.send(m).await.map_err(|_| SendError::Closed)
    }

    /// Queues a frame without waiting; a full queue drops it (counted in [`Self::dropped`]).
    pub fn try_send(&self, m: ClientToServer) -> Result<(), SendError> {
        self.tx.try_send(m).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                SendError::Full
            }
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Relays `data` to `dst`.
    pub async fn send_packet(&self, dst: NodePublic, data: impl Into<Bytes>) -> Result<(), SendError> {
        self.send(ClientToServer::SendPacket { dst, data: data.into() }).await
    }

    /// [`Self::send_packet`] without waiting (drops when the queue is full).
    pub fn try_send_packet(&self, dst: NodePublic, data: impl Into<Bytes>) -> Result<(), SendError> {
        self.try_send(ClientToServer::SendPacket { dst, data: data.into() })
    }

    /// Mesh: delivers `data` from `src` to the server's local client `dst`.
    pub async fn forward_packet(
        &self,
        src: NodePublic,
        dst: NodePublic,
        data: Bytes,
    ) -> Result<(), SendError> {
        self.send(ClientToServer::ForwardPacket { src, dst, data }).await
    }

    /// Sends a Ping; the server answers with a Pong carrying `data`.
    pub async fn send_ping(&self, data: [u8; PING_DATA_LEN]) -> Result<(), SendError> {
        self.send(ClientToServer::Ping(data)).await
    }

    /// Tells the server whether this is our home region.
    pub async fn note_preferred(&self, preferred: bool) -> Result<(), SendError> {
        self.send(ClientToServer::NotePreferred(preferred)).await
    }

    /// Mesh: subscribes to PeerPresent/PeerGone.
    pub async fn watch_conns(&self) -> Result<(), SendError> {
        self.send(ClientToServer::WatchConns).await
    }

    /// Mesh: closes every connection of `key` on the server.
    pub async fn close_peer(&self, key: NodePublic) -> Result<(), SendError> {
        self.send(ClientToServer::ClosePeer(key)).await
    }

    /// Frames dropped by `try_*` because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    /// Frames written so far and the number of writes they took (frames/write = batching factor).
    pub fn write_stats(&self) -> (u64, u64) {
        (self.stats.frames.load(Ordering::Relaxed), self.stats.writes.load(Ordering::Relaxed))
    }

    /// Closes the connection (both halves).
    pub fn close(&self) {
        self.cancel.cancel();
    }

    /// True once the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.cancel.is_cancelled() || self.tx.is_closed()
    }
}

/// The receiving half.
pub struct DerpReceiver {
    r: ReadHalf<BoxStream>,
    buf: BytesMut,
    dec: FrameDecoder,
    pong: DerpSender,
    read_timeout: Duration,
    cancel: CancellationToken,
    closed: bool,
    read_chunk: usize,
}

const MIN_READ_CHUNK: usize = 4 << 10;
const MAX_READ_CHUNK: usize = 64 << 10;

impl DerpReceiver {
    /// The next frame from the server. Server Pings are answered (best effort) before being
    /// returned; frames of unknown type are skipped. After an error the connection is closed and
    /// every later call returns [`ConnError::Closed`].
    pub async fn recv(&mut self) -> Result<ServerToClient, ConnError> {
        let r = self.recv_inner().await;
        if r.is_err() {
            self.closed = true;
            self.cancel.cancel();
        }
        r
    }

    async fn recv_inner(&mut self) -> Result<ServerToClient, ConnError> {
        if self.closed {
            return Err(ConnError::Closed);
        }
        loop {
            while let Some(f) = self.dec.decode(&mut self.buf)? {
                if FrameType::from_u8(f.ty).is_none() {
                    continue;
                }
                let m = ServerToClient::decode(f)?;
                match m {
                    ServerToClient::Ignored(_) => continue,
                    ServerToClient::Ping(d) => {
                        let _ = self.pong.try_send(ClientToServer::Pong(d));
                        return Ok(m);
                    }
                    m => return Ok(m),
                }
            }
            // Read buffer sized to the traffic: 4 KiB when idle (many idle connections stay
            // cheap), doubling up to 64 KiB while reads keep filling it.
            if self.buf.is_empty() && self.buf.capacity() > 2 * self.read_chunk {
                self.buf = BytesMut::new();
            }
            if self.buf.capacity() - self.buf.len() < self.read_chunk / 2 {
                self.buf.reserve(self.read_chunk);
            }
            let spare = self.buf.capacity() - self.buf.len();
            let n = tokio::select! {
                r = tokio::time::timeout(self.read_timeout, self.r.read_buf(&mut self.buf)) => match r {
                    Ok(r) => r?,
                    Err(_) => return Err(ConnError::Silent(self.read_timeout)),
                },
                _ = self.cancel.cancelled() => return Err(ConnError::Closed),
            };
            if n == 0 {
                return Err(ConnError::Closed);
            }
            self.read_chunk = if n >= spare {
                (self.read_chunk * 2).min(MAX_READ_CHUNK)
            } else if n < self.read_chunk / 4 {
                (self.read_chunk / 2).max(MIN_READ_CHUNK)
            } else {
                self.read_chunk
            };
        }
    }

    /// A sender for this connection (e.g. to reply from the receiving task).
    pub fn sender(&self) -> DerpSender {
        self.pong.clone()
    }
}

impl Drop for DerpReceiver {
    fn drop(&mut self) {
        // Nobody reads any more: the connection is useless, so close it rather than let the
        // server's queue for us fill up.
        self.cancel.cancel();
    }
}
