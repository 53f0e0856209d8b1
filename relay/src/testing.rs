//! Test fixtures: an in-process relay speaking raw DERP on loopback TCP, and the raw test client
//! every relay test uses.
//!
//! Compiled with the `test-utils` feature (and in this crate's unit tests). Used by the core,
//! HTTP, mesh and operations tests:
//!
//! ```ignore
//! let relay = spawn_core_relay().await;
//! let mut a = TestClient::connect(relay.addr, relay.server.public_key()).await?;
//! let mut b = TestClient::connect(relay.addr, relay.server.public_key()).await?;
//! a.send_packet(b.public(), b"hello").await?;
//! assert_eq!(b.want_packet(T).await?, (a.public(), b"hello".to_vec()));
//! ```
//!
//! There is no HTTP here: the listener hands each accepted socket straight to
//! [`DerpServer::accept`]. Every `want_*`/`recv_*` takes a timeout so a broken relay fails a test
//! instead of hanging it. Panics inside `accept` are caught and counted ([`CoreRelay::panics`]).

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{BufMut, BytesMut};
use derpfleet_proto::client_handshake::{ClientHandshake, Progress};
use derpfleet_proto::codec::CodecError;
use derpfleet_proto::consts::{HANDSHAKE_TIMEOUT, PROTOCOL_VERSION};
use derpfleet_proto::frame::{put_header, FrameDecoder, FrameType, RawFrame, Role};
use derpfleet_proto::handshake::{open_server_info, ClientInfo, ServerInfo};
use derpfleet_proto::msg::{ClientToServer, PeerGoneReason, ServerToClient};
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;

use crate::core::derp_server::{ConnInfo, CoreConfig, DerpServer, DerpServerConfig};

pub use tempfile::TempDir;

/// A fresh directory under the system temp dir named `derpfleet-<tag>-…`, removed on drop.
/// Mode 0755 (what `create_dir_all` gives), so daemons a test starts that drop privileges
/// (nginx workers, HAProxy) can read the files the test writes there.
pub fn temp_dir(tag: &str) -> TempDir {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(&format!("derpfleet-{tag}-"))
        .permissions(std::fs::Permissions::from_mode(0o755))
        .tempdir()
        .expect("create a temp dir")
}

/// A default timeout for `want_*` calls in tests.
pub const WANT_TIMEOUT: Duration = Duration::from_secs(5);

/// An in-process relay on a loopback port (raw DERP, no HTTP). Dropping it stops accepting and
/// closes every connection.
pub struct CoreRelay {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The server core.
    pub server: Arc<DerpServer>,
    panics: Arc<AtomicUsize>,
    accept_loop: JoinHandle<()>,
}

impl CoreRelay {
    /// How many `accept` calls panicked (must stay 0).
    pub fn panics(&self) -> usize {
        self.panics.load(Ordering::SeqCst)
    }

    /// The server's public key.
    pub fn key(&self) -> NodePublic {
        self.server.public_key()
    }

    /// Waits until the metric series `name{labels}` equals `value` (counters published in
    /// batches, e.g. `derp_packets_received`, may trail what a client already observed).
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], value: f64) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WANT_TIMEOUT;
        loop {
            let got = self.server.metrics().snapshot().get(name, labels);
            if got == value {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{name}{labels:?} = {got}, expected {value}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Connects a new client with a fresh key and a typical tailscaled ClientInfo.
    pub async fn client(&self) -> Result<TestClient> {
        TestClient::connect(self.addr, self.key()).await
    }

    /// Connects a mesh peer with `mesh` that sent WatchConns (its own PeerPresent is still to
    /// be read).
    pub async fn watcher(&self, mesh: MeshKey) -> Result<TestClient> {
        let mut w = TestClient::connect_with(self.addr, NodePrivate::generate(), mesh_info(mesh)).await?;
        w.send(&ClientToServer::WatchConns).await?;
        Ok(w)
    }
}

impl Drop for CoreRelay {
    fn drop(&mut self) {
        self.accept_loop.abort();
        self.server.close_all();
    }
}

/// A relay with derper's defaults and a random key.
pub async fn spawn_core_relay() -> CoreRelay {
    spawn_core_relay_with(DerpServerConfig::new(NodePrivate::generate()), CoreConfig::default()).await
}

/// A relay with a fresh mesh key (returned), otherwise derper's defaults.
pub async fn spawn_mesh_relay() -> (CoreRelay, MeshKey) {
    let mesh = MeshKey::generate();
    let config = DerpServerConfig { mesh_key: Some(mesh), ..DerpServerConfig::new(NodePrivate::generate()) };
    (spawn_core_relay_with(config, CoreConfig::default()).await, mesh)
}

/// A relay with the given settings.
pub async fn spawn_core_relay_with(config: DerpServerConfig, options: CoreConfig) -> CoreRelay {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let server = DerpServer::with_options(config, options);
    let panics = Arc::new(AtomicUsize::new(0));
    let accept_loop = {
        let server = server.clone();
        let panics = panics.clone();
        tokio::spawn(async move {
            while let Ok((sock, remote)) = listener.accept().await {
                let _ = sock.set_nodelay(true);
                let server = server.clone();
                let panics = panics.clone();
                tokio::spawn(async move {
                    let info = ConnInfo { remote, not_ideal: false };
                    let run = AssertUnwindSafe(server.accept(sock, info)).catch_unwind();
                    if run.await.is_err() {
                        panics.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        })
    };
    CoreRelay { addr, server, panics, accept_loop }
}

/// A raw DERP client for tests, over any byte stream (TCP, TLS, an upgraded HTTP connection).
///
/// It frames with `derpfleet-proto` (its frame decoder as a `FramedRead`, its client handshake
/// machine) and checks nothing else on its own, so tests can send anything and observe exactly
/// what the server writes. Constructors that take a [`TcpStream`] dial; [`TestClient::new`] and
/// [`TestClient::over`] take a stream the test has already set up (e.g. after the HTTP upgrade).
pub struct TestClient<S = TcpStream> {
    /// The client's private key.
    pub key: NodePrivate,
    /// The server key read from ServerKey.
    pub server_key: NodePublic,
    framed: FramedRead<S, FrameDecoder>,
}

impl<S> std::fmt::Debug for TestClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestClient").field("key", &self.key.public()).finish_non_exhaustive()
    }
}

/// The ClientInfo tailscaled sends: `{"version":2,"CanAckPings":true}`.
pub fn tailscaled_info() -> ClientInfo {
    ClientInfo { version: 2, can_ack_pings: true, ..Default::default() }
}

/// The ClientInfo a mesh peer sends.
pub fn mesh_info(mesh_key: MeshKey) -> ClientInfo {
    ClientInfo { mesh_key: Some(mesh_key), version: 2, ..Default::default() }
}

impl TestClient<TcpStream> {
    /// Connects with a fresh key and [`tailscaled_info`], completing the handshake; checks that the
    /// server key is `server_key`.
    pub async fn connect(addr: SocketAddr, server_key: NodePublic) -> Result<Self> {
        let c = Self::connect_with(addr, NodePrivate::generate(), tailscaled_info()).await?;
        if c.server_key != server_key {
            bail!("server key {} != expected {}", c.server_key, server_key);
        }
        Ok(c)
    }

    /// Connects with `key` and `info`, completing the handshake (ServerKey, ClientInfo, ServerInfo).
    pub async fn connect_with(addr: SocketAddr, key: NodePrivate, info: ClientInfo) -> Result<Self> {
        let stream = TcpStream::connect(addr).await.context("connect")?;
        Self::handshake_on(stream, key, info).await
    }

    /// Like [`TestClient::connect_with`] with a small socket receive buffer, for slow-receiver
    /// tests (the kernel then stops accepting data sooner when the client does not read).
    pub async fn connect_small_rcvbuf(addr: SocketAddr, key: NodePrivate, rcvbuf: u32) -> Result<Self> {
        let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        sock.set_recv_buffer_size(rcvbuf)?;
        let stream = sock.connect(addr).await.context("connect")?;
        Self::handshake_on(stream, key, tailscaled_info()).await
    }

    /// Opens a TCP connection and reads the ServerKey only; nothing is sent.
    pub async fn connect_raw(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).await.context("connect")?;
        stream.set_nodelay(true)?;
        let mut c = Self::new(stream, NodePrivate::generate());
        match c.recv_frame(WANT_TIMEOUT).await? {
            ServerToClient::ServerKey(k) => c.server_key = k,
            other => bail!("first frame is not ServerKey: {other:?}"),
        }
        Ok(c)
    }

    async fn handshake_on(stream: TcpStream, key: NodePrivate, info: ClientInfo) -> Result<Self> {
        stream.set_nodelay(true)?;
        let mut c = Self::new(stream, key);
        c.handshake(info).await?;
        Ok(c)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TestClient<S> {
    /// A client over `io` with `key`: nothing is read or sent yet (`server_key` is unset until a
    /// handshake).
    pub fn new(io: S, key: NodePrivate) -> Self {
        Self {
            key,
            server_key: NodePublic::default(),
            framed: FramedRead::new(io, FrameDecoder::new(Role::Client)),
        }
    }

    /// A client over `io` with `key`, handshaken with [`tailscaled_info`]; the server must say
    /// protocol version 2 in ServerInfo.
    pub async fn over(io: S, key: NodePrivate) -> Result<Self> {
        let mut c = Self::new(io, key);
        let info = c.handshake(tailscaled_info()).await?;
        if info.version != PROTOCOL_VERSION as i64 {
            bail!("ServerInfo version {} != {PROTOCOL_VERSION}", info.version);
        }
        Ok(c)
    }

    /// Runs the client handshake (proto's [`ClientHandshake`]) with `info`: ServerKey in,
    /// ClientInfo out, ServerInfo in. Sets `server_key`; returns what ServerInfo said.
    pub async fn handshake(&mut self, info: ClientInfo) -> Result<ServerInfo> {
        self.try_handshake(info).await?.ok_or_else(|| anyhow!("server closed instead of sending ServerInfo"))
    }

    /// [`TestClient::handshake`] for admission tests: `Ok(None)` when the server closes the
    /// connection after ClientInfo instead of answering (refused); any frame other than ServerInfo
    /// in its place is an error.
    pub async fn try_handshake(&mut self, info: ClientInfo) -> Result<Option<ServerInfo>> {
        let mut hs = ClientHandshake::new(self.key.clone(), info);
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(frame) = self.next(left).await.context("DERP handshake")? else {
                if hs.server_key().is_some() {
                    return Ok(None);
                }
                bail!("server closed before ServerKey");
            };
            let shown = format!("{frame:?}");
            match hs.feed(frame)? {
                Progress::Send(out) => {
                    self.server_key = hs.server_key().expect("known once ClientInfo is due");
                    self.write_raw(&out).await?;
                }
                Progress::Pending => bail!("expected ServerInfo or a close, got {shown}"),
                Progress::Done(up) => return Ok(Some(up.server_info)),
            }
        }
    }

    /// Reads the next frame, which must be a ServerInfo that opens; returns its content.
    pub async fn want_server_info(&mut self) -> Result<ServerInfo> {
        match self.recv_frame(WANT_TIMEOUT).await? {
            ServerToClient::ServerInfo(p) => Ok(open_server_info(&self.key, &self.server_key, &p)?),
            other => bail!("expected ServerInfo, got {other:?}"),
        }
    }

    /// This client's public key.
    pub fn public(&self) -> NodePublic {
        self.key.public()
    }

    /// The underlying stream (e.g. for its local address).
    pub fn stream(&self) -> &S {
        self.framed.get_ref()
    }

    /// The underlying stream, for writing by hand (this client buffers no writes, so bytes
    /// written here go out in order with its own).
    pub fn stream_mut(&mut self) -> &mut S {
        self.framed.get_mut()
    }

    /// Writes raw bytes.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let s = self.framed.get_mut();
        s.write_all(bytes).await?;
        s.flush().await?;
        Ok(())
    }

    /// Writes one frame of type `ty` with `payload`.
    pub async fn send_frame(&mut self, ty: u8, payload: &[u8]) -> Result<()> {
        let mut b = BytesMut::with_capacity(5 + payload.len());
        b.put_u8(ty);
        b.put_u32(payload.len() as u32);
        b.put_slice(payload);
        self.write_raw(&b).await
    }

    /// Sends a client message.
    pub async fn send(&mut self, m: &ClientToServer) -> Result<()> {
        let mut b = BytesMut::new();
        m.encode(&mut b);
        self.write_raw(&b).await
    }

    /// SendPacket to `dst`.
    pub async fn send_packet(&mut self, dst: NodePublic, data: &[u8]) -> Result<()> {
        let mut b = BytesMut::with_capacity(5 + 32 + data.len());
        put_header(&mut b, FrameType::SendPacket, 32 + data.len());
        b.put_slice(&dst.0);
        b.put_slice(data);
        self.write_raw(&b).await
    }

    /// Ping with `data` (8 bytes or more).
    pub async fn send_ping(&mut self, data: &[u8]) -> Result<()> {
        self.send_frame(FrameType::Ping as u8, data).await
    }

    /// Reads the next raw frame (any type, nothing skipped except what the client decoder skips).
    pub async fn recv_raw(&mut self, timeout: Duration) -> Result<RawFrame> {
        match tokio::time::timeout(timeout, self.framed.next()).await {
            Err(_) => bail!("no frame within {timeout:?}"),
            Ok(None) => bail!("connection closed by server"),
            Ok(Some(f)) => Ok(f?),
        }
    }

    /// Reads and decodes the next frame.
    pub async fn recv_frame(&mut self, timeout: Duration) -> Result<ServerToClient> {
        let f = self.recv_raw(timeout).await?;
        Ok(ServerToClient::decode(f)?)
    }

    /// The next frame, or `None` once the server closed the connection (a reset, or a close
    /// inside a frame, counts as closed). Fails on a malformed frame and when nothing arrives
    /// within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<ServerToClient>> {
        match tokio::time::timeout(timeout, self.framed.next()).await {
            Err(_) => bail!("no frame from the server within {timeout:?}"),
            Ok(None) | Ok(Some(Err(CodecError::Io(_)))) => Ok(None),
            Ok(Some(Err(e))) => Err(anyhow!("bad frame from the server: {e}")),
            Ok(Some(Ok(f))) => Ok(Some(ServerToClient::decode(f)?)),
        }
    }

    /// [`TestClient::next`], passing over KeepAlives.
    pub async fn next_data(&mut self, timeout: Duration) -> Result<Option<ServerToClient>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Some(ServerToClient::KeepAlive) => continue,
                f => return Ok(f),
            }
        }
    }

    /// Reads frames, skipping KeepAlives, until one `pick` accepts.
    async fn want<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(ServerToClient) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.recv_frame(left).await.with_context(|| format!("waiting for {what}"))?;
            if matches!(f, ServerToClient::KeepAlive) {
                continue;
            }
            let shown = format!("{f:?}");
            match pick(f) {
                Some(t) => return Ok(t),
                None => bail!("waiting for {what}, got {shown}"),
            }
        }
    }

    /// The next frame (KeepAlives skipped) must be a RecvPacket; returns (src, data).
    pub async fn want_packet(&mut self, timeout: Duration) -> Result<(NodePublic, Vec<u8>)> {
        self.want(timeout, "RecvPacket", |f| match f {
            ServerToClient::RecvPacket { src, data } => Some((src, data.to_vec())),
            _ => None,
        })
        .await
    }

    /// The next frame (KeepAlives skipped) must be a PeerGone; returns (key, reason).
    pub async fn want_peer_gone(&mut self, timeout: Duration) -> Result<(NodePublic, PeerGoneReason)> {
        self.want(timeout, "PeerGone", |f| match f {
            ServerToClient::PeerGone { key, reason } => Some((key, reason)),
            _ => None,
        })
        .await
    }

    /// The next frame (KeepAlives skipped) must be a PeerPresent; returns (key, endpoint, flags).
    pub async fn want_present(&mut self, timeout: Duration) -> Result<(NodePublic, Option<SocketAddr>, u8)> {
        self.want(timeout, "PeerPresent", |f| match f {
            ServerToClient::PeerPresent { key, endpoint, flags } => Some((key, endpoint, flags)),
            _ => None,
        })
        .await
    }

    /// The next frame (KeepAlives skipped) must be a Pong; returns its data.
    pub async fn want_pong(&mut self, timeout: Duration) -> Result<[u8; 8]> {
        self.want(timeout, "Pong", |f| match f {
            ServerToClient::Pong(d) => Some(d),
            _ => None,
        })
        .await
    }

    /// Pings with `data` and waits for the matching Pong (a liveness round trip).
    pub async fn ping_pong(&mut self, data: [u8; 8], timeout: Duration) -> Result<()> {
        self.send_ping(&data).await?;
        let got = self.want_pong(timeout).await?;
        if got != data {
            bail!("pong {got:?} != ping {data:?}");
        }
        Ok(())
    }

    /// Succeeds when no frame other than KeepAlive arrives within `dur` (and the connection stays
    /// open).
    pub async fn want_silence(&mut self, dur: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.recv_raw(left).await {
                Ok(f) if f.ty == FrameType::KeepAlive as u8 => continue,
                Ok(f) => bail!("expected silence, got frame type {:#04x} ({} bytes)", f.ty, f.payload.len()),
                Err(e) if e.to_string().starts_with("no frame within") => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Succeeds when the server closes the connection within `timeout` (frames before the close
    /// are discarded; a reset counts as closed).
    pub async fn want_closed(&mut self, timeout: Duration) -> Result<()> {
        let r = tokio::time::timeout(timeout, async {
            let mut scratch = [0u8; 64 << 10];
            loop {
                match self.framed.get_mut().read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        r.map_err(|_| anyhow!("connection still open after {timeout:?}"))
    }

    /// The raw socket, for tests that frame by hand after the handshake (bytes already
    /// buffered by this client are discarded).
    pub fn into_stream(self) -> S {
        self.framed.into_inner()
    }

    /// Closes the client's side.
    pub async fn close(mut self) {
        let _ = self.framed.get_mut().shutdown().await;
    }
}
