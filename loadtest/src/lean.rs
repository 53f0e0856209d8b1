//! A minimal DERP connect for the connection-count scenarios: optional source-address binding,
//! plain or TLS, the HTTP upgrade and the DERP handshake, then nothing but the socket is kept.
//!
//! `derpfleet-client`'s [`derpfleet_client::DerpConn`] cannot bind a source address (needed to get
//! past ~28k ephemeral ports per address) and keeps a writer task and two 64 KiB buffers per
//! connection, which would cap a single load generator at a few thousand idle connections.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use derpfleet_client::DerpUrl;
use derpfleet_proto::consts::PROTOCOL_VERSION;
use derpfleet_proto::frame::{FrameDecoder, Role};
use derpfleet_proto::handshake::{open_server_info, seal_client_info, ClientInfo};
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::NodePrivate;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Any stream a lean connection runs over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Where and how to connect, resolved once for many connections.
#[derive(Clone)]
pub struct LeanTarget {
    addr: SocketAddr,
    request: Arc<[u8]>,
    /// WebSocket instead of the DERP upgrade: (Host header, path).
    websocket: Option<(Arc<str>, Arc<str>)>,
    tls: Option<(ServerName<'static>, tokio_rustls::TlsConnector)>,
}

impl LeanTarget {
    /// Resolves the URL's host once; `websocket` selects DERP over WebSocket.
    pub async fn new(url: &DerpUrl, websocket: bool) -> Result<Self> {
        let addr = match url.dial_addr {
            Some(a) => a,
            None => tokio::net::lookup_host((url.host.as_str(), url.port))
                .await
                .with_context(|| format!("resolving {}", url.host))?
                .next()
                .with_context(|| format!("{} has no address", url.host))?,
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: derpfleet-loadtest/{}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
            url.path,
            url.host_header(),
            env!("CARGO_PKG_VERSION")
        );
        let tls = if url.https {
            let cfg = derpfleet_client::tls::client_config(&url.cert_check, &[]);
            let name = ServerName::try_from(url.host.clone()).context("host is not a valid TLS name")?;
            Some((name, tokio_rustls::TlsConnector::from(cfg)))
        } else {
            None
        };
        let websocket = websocket.then(|| (url.host_header().into(), url.path.as_str().into()));
        Ok(Self { addr, request: request.into_bytes().into(), websocket, tls })
    }

    /// The address dialed.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connects (from `source` if given) and completes the DERP handshake as `key`.
    pub async fn connect(&self, source: Option<IpAddr>, key: &NodePrivate) -> Result<Box<dyn Stream>> {
        let sock = if self.addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = source {
            sock.bind(SocketAddr::new(ip, 0)).with_context(|| format!("binding source address {ip}"))?;
        }
        let tcp: TcpStream =
            sock.connect(self.addr).await.with_context(|| format!("connecting to {}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        let mut s: Box<dyn Stream> = match &self.tls {
            Some((name, connector)) => Box::new(connector.connect(name.clone(), tcp).await.context("TLS")?),
            None => Box::new(tcp),
        };
        if let Some((host, path)) = &self.websocket {
            let ws = crate::ws::upgrade(s, host, path).await.context("WebSocket upgrade")?;
            let mut s: Box<dyn Stream> = Box::new(ws);
            derp_handshake(&mut s, BytesMut::new(), key).await?;
            return Ok(s);
        }
        handshake(&mut s, &self.request, key).await?;
        Ok(s)
    }
}

async fn handshake(s: &mut Box<dyn Stream>, request: &[u8], key: &NodePrivate) -> Result<()> {
    s.write_all(request).await?;
    s.flush().await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("connection closed before the HTTP response");
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf).context("bad HTTP response")? {
            httparse::Status::Complete(n) => {
                if resp.code != Some(101) {
                    bail!("server refused the DERP upgrade: HTTP {}", resp.code.unwrap_or(0));
                }
                let _ = buf.split_to(n);
                break;
            }
            httparse::Status::Partial if buf.len() > 16 << 10 => bail!("HTTP response head too large"),
            httparse::Status::Partial => {}
        }
    }
    derp_handshake(s, buf, key).await
}

/// ServerKey, ClientInfo, ServerInfo; `buf` holds bytes already read past the HTTP response.
async fn derp_handshake(s: &mut Box<dyn Stream>, mut buf: BytesMut, key: &NodePrivate) -> Result<()> {
    let mut dec = FrameDecoder::new(Role::Client);
    let server_key = match next_frame(s, &mut buf, &mut dec).await? {
        ServerToClient::ServerKey(k) => k,
        other => bail!("expected ServerKey, got {other:?}"),
    };
    let info = ClientInfo {
        mesh_key: None,
        version: PROTOCOL_VERSION as i64,
        can_ack_pings: true,
        is_prober: false,
        app_name: None,
    };
    let mut out = BytesMut::new();
    ClientToServer::ClientInfo(seal_client_info(key, &server_key, &info)).encode(&mut out);
    s.write_all(&out).await?;
    s.flush().await?;
    loop {
        if let ServerToClient::ServerInfo(p) = next_frame(s, &mut buf, &mut dec).await? {
            open_server_info(key, &server_key, &p).context("opening ServerInfo")?;
            return Ok(());
        }
    }
}

async fn next_frame(
    s: &mut Box<dyn Stream>,
    buf: &mut BytesMut,
    dec: &mut FrameDecoder,
) -> Result<ServerToClient> {
    loop {
        if let Some(f) = dec.decode(buf)? {
            return Ok(ServerToClient::decode(f)?);
        }
        buf.reserve(1024);
        if s.read_buf(buf).await? == 0 {
            bail!("connection closed during the DERP handshake");
        }
    }
}
