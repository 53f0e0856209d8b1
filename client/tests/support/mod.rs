//! A small DERP server for the client's tests: real TCP (optionally TLS with a self-signed leaf and
//! the `derpkey` meta-certificate), the real HTTP upgrade and handshake from `derpfleet-proto`, and a
//! hub relaying SendPacket between connected clients. It records each request head so tests can
//! assert on headers, and can push arbitrary server frames (Ping, Restarting) to every client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use derpfleet_proto::codec::ServerCodec;
use derpfleet_proto::handshake::{open_client_info, seal_server_info, server_key_frame, ServerInfo};
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::{NodePrivate, NodePublic};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::codec::{Framed, FramedParts};

pub struct TestServer {
    pub addr: SocketAddr,
    pub key: NodePrivate,
    /// DER of the TLS leaf, when TLS is on.
    pub leaf_der: Option<Vec<u8>>,
    /// The same leaf in PEM form.
    pub leaf_pem: Option<String>,
    /// Request heads received, in order.
    pub requests: Arc<Mutex<Vec<String>>>,
    /// Frames received from clients, in order (ClientInfo as its opened JSON; SendPacket not kept).
    pub received: Arc<Mutex<Vec<ClientToServer>>>,
    push: broadcast::Sender<ServerToClient>,
    task: JoinHandle<()>,
}

#[derive(Clone, Copy, Default)]
pub struct Tls {
    pub enabled: bool,
    pub meta_cert: bool,
    pub tls12_only: bool,
    /// Answer 101 even to a fast-start request (like a server or proxy that ignores the header).
    pub ignore_fast_start: bool,
}

type Hub = Arc<Mutex<HashMap<NodePublic, mpsc::Sender<ServerToClient>>>>;

impl Tls {
    /// TLS 1.3 with the meta certificate: a server that offers fast start.
    pub fn tls13() -> Self {
        Self { enabled: true, meta_cert: true, ..Self::default() }
    }
}

impl TestServer {
    pub async fn start(tls: Tls) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), tls, NodePrivate::generate()).await
    }

    /// A server whose `/derp/latency-check` answers after `delay`.
    pub async fn start_delayed(tls: Tls, delay: std::time::Duration) -> Self {
        Self::start_full("127.0.0.1:0".parse().unwrap(), tls, NodePrivate::generate(), delay).await
    }

    pub async fn start_on(addr: SocketAddr, tls: Tls, key: NodePrivate) -> Self {
        Self::start_full(addr, tls, key, std::time::Duration::ZERO).await
    }

    async fn start_full(addr: SocketAddr, tls: Tls, key: NodePrivate, delay: std::time::Duration) -> Self {
        let l = TcpListener::bind(addr).await.unwrap();
        let addr = l.local_addr().unwrap();
        let (acceptor, leaf_der, leaf_pem) = if tls.enabled {
            let (a, d, p) = acceptor(&key.public(), addr, tls);
            (Some(a), Some(d), Some(p))
        } else {
            (None, None, None)
        };
        let requests = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (push, _) = broadcast::channel(16);
        let hub: Hub = Arc::default();
        let (k, rq, rc, p) = (key.clone(), requests.clone(), received.clone(), push.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else { return };
                // Subscribe here, so no connection task keeps a Sender: `stop` then ends them all.
                let (k, rq, rc, hub, sub, acc) =
                    (k.clone(), rq.clone(), rc.clone(), hub.clone(), p.subscribe(), acceptor.clone());
                tokio::spawn(async move {
                    match acc {
                        Some(a) => {
                            if let Ok(s) = a.accept(tcp).await {
                                serve(s, k, rq, rc, hub, sub, delay, tls.ignore_fast_start).await
                            }
                        }
                        None => serve(tcp, k, rq, rc, hub, sub, delay, tls.ignore_fast_start).await,
                    }
                });
            }
        });
        Self { addr, key, leaf_der, leaf_pem, requests, received, push, task }
    }

    /// Sends `m` to every connected client.
    pub fn push(&self, m: ServerToClient) {
        let _ = self.push.send(m);
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

fn acceptor(key: &NodePublic, addr: SocketAddr, tls: Tls) -> (tokio_rustls::TlsAcceptor, Vec<u8>, String) {
    let leaf = rcgen::generate_simple_self_signed(vec![addr.ip().to_string(), "localhost".into()]).unwrap();
    let mut chain = vec![leaf.cert.der().clone()];
    if tls.meta_cert {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, format!("derpkey{}", key.to_hex()));
        p.serial_number = Some(rcgen::SerialNumber::from(2u64));
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        chain.push(CertificateDer::from(p.self_signed(&k).unwrap().der().to_vec()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ServerConfig::builder_with_provider(provider);
    let b = if tls.tls12_only {
        b.with_protocol_versions(&[&rustls::version::TLS12]).unwrap()
    } else {
        b.with_safe_default_protocol_versions().unwrap()
    };
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.signing_key.serialize_der()));
    let cfg = b.with_no_client_auth().with_single_cert(chain, key_der).unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), leaf.cert.der().to_vec(), leaf.cert.pem())
}

#[allow(clippy::too_many_arguments)]
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    key: NodePrivate,
    requests: Arc<Mutex<Vec<String>>>,
    received: Arc<Mutex<Vec<ClientToServer>>>,
    hub: Hub,
    push: broadcast::Receiver<ServerToClient>,
    latency_delay: std::time::Duration,
    ignore_fast_start: bool,
) {
    let mut buf = BytesMut::with_capacity(8192);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let _ = buf.split_to(head_end);
    requests.lock().unwrap().push(head.clone());
    if head.starts_with("GET /derp/latency-check ") || head.starts_with("GET /derp/probe ") {
        tokio::time::sleep(latency_delay).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    }
    let lower = head.to_ascii_lowercase();
    if lower.contains("upgrade: websocket") && lower.contains("sec-websocket-protocol: derp") {
        let ws_key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap_or_default()
            .trim()
            .to_string();
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: derp\r\n\r\n",
            derpfleet_client::ws::accept_for(&ws_key)
        );
        if s.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
        let ws = derpfleet_client::ws::WsBytes::new(
            s,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            buf.to_vec(),
        )
        .await;
        return session(ws, BytesMut::new(), false, key, requests, received, hub, push).await;
    }
    if !lower.contains("upgrade: derp") {
        let _ = s.write_all(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 27\r\n\r\nDERP requires connection upgrade").await;
        return;
    }
    let fast = head.contains("Derp-Fast-Start: 1") && !ignore_fast_start;
    session(s, buf, !fast, key, requests, received, hub, push).await
}

#[allow(clippy::too_many_arguments)]
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    buf: BytesMut,
    send_101: bool,
    key: NodePrivate,
    _requests: Arc<Mutex<Vec<String>>>,
    received: Arc<Mutex<Vec<ClientToServer>>>,
    hub: Hub,
    mut push: broadcast::Receiver<ServerToClient>,
) {
    let mut out = Vec::new();
    if send_101 {
        out.extend_from_slice(
            format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: {}\r\n\r\n", key.public().to_hex()).as_bytes(),
        );
    }
    out.extend_from_slice(&server_key_frame(&key.public()));
    if s.write_all(&out).await.is_err() || s.flush().await.is_err() {
        return;
    }
    // Frames from the client, starting with what followed the request head.
    let mut parts = FramedParts::new::<ServerToClient>(s, ServerCodec::new());
    parts.read_buf = buf;
    let mut framed = Framed::from_parts(parts);
    let client = match framed.next().await {
        Some(Ok(ClientToServer::ClientInfo(p))) => match open_client_info(&key, &p) {
            Ok((c, info)) => {
                // Recorded as the opened JSON, so tests can check what the client said.
                let json = bytes::Bytes::from(info.to_json());
                received.lock().unwrap().push(ClientToServer::ClientInfo(json));
                c
            }
            Err(_) => return,
        },
        _ => return,
    };
    let info = ServerToClient::ServerInfo(seal_server_info(&key, &client, &ServerInfo::default()));
    if framed.send(info).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<ServerToClient>(4096);
    hub.lock().unwrap().insert(client, tx);
    loop {
        let reply = tokio::select! {
            m = rx.recv() => { let Some(m) = m else { break }; m }
            m = push.recv() => { let Ok(m) = m else { break }; m }
            m = framed.next() => {
                let Some(Ok(m)) = m else { break };
                match &m {
                    ClientToServer::SendPacket { dst, data } => {
                        let tx = hub.lock().unwrap().get(dst).cloned();
                        if let Some(tx) = tx {
                            let _ = tx.send(ServerToClient::RecvPacket { src: client, data: data.clone() }).await;
                        }
                        continue; // not recorded: tests send many
                    }
                    ClientToServer::Ping(d) => {
                        let pong = ServerToClient::Pong(*d);
                        received.lock().unwrap().push(m);
                        pong
                    }
                    _ => {
                        received.lock().unwrap().push(m);
                        continue;
                    }
                }
            }
        };
        if framed.send(reply).await.is_err() {
            break;
        }
    }
    hub.lock().unwrap().remove(&client);
}
