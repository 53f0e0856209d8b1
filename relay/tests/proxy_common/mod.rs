//! Shared fixtures for the tests with real proxies in front of the relay binary (HAProxy, nginx,
//! Caddy): a proxy process started from a config file in a temp dir and killed by PID, DERP
//! clients (`derpfleet_client`) bound to distinct 127.0.0.x source addresses, a mesh watcher, and
//! a self-signed certificate for the proxies that terminate TLS.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use derpfleet_client::{ConnectOptions, DerpConn, DerpReceiver, DerpSender, DerpTarget, DerpUrl};
use derpfleet_proto::derpmap::CertCheck;
use derpfleet_proto::msg::ServerToClient;
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};

/// Every wait here is bounded by this.
pub const WAIT: Duration = Duration::from_secs(15);

/// A proxy process, killed (by its PID) on drop.
pub struct Daemon {
    pub name: &'static str,
    child: Child,
    log: std::path::PathBuf,
}

impl Daemon {
    /// Starts `program args…` with stdout/stderr to `dir/<name>.log`.
    pub fn start(
        name: &'static str,
        program: &str,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &Path)],
    ) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {program}: {e}"));
        Daemon { name, child, log }
    }

    /// Waits (bounded) until `addr` accepts TCP connections; panics with the log if the process
    /// exits or the port never opens.
    pub fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("{} exited ({st}): {}", self.name, self.log());
            }
            if probe_from_spare_address(addr) {
                return;
            }
            assert!(Instant::now() < deadline, "{} not listening on {addr}: {}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Whether `addr` accepts a TCP connection, tried from 127.0.0.254: a proxy forwards even this
/// probe, and the tests' clients (and their per-IP limits) must not be charged for it.
fn probe_from_spare_address(addr: SocketAddr) -> bool {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 254], 0)).into()).unwrap();
    s.connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1: (cert path, key path).
pub fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.join("proxy.crt"), dir.join("proxy.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A DERP URL (`http://…` or `https://…`, any certificate accepted: the proxies' is self-signed).
/// A `localhost` URL is dialed at 127.0.0.1 (never `::1`, which the 127.0.0.x binds cannot
/// reach) with SNI `localhost`.
pub fn target(url: &str) -> DerpTarget {
    let mut u: DerpUrl = url.parse().unwrap();
    u.cert_check = CertCheck::Insecure;
    if u.host == "localhost" {
        u.dial_addr = Some(SocketAddr::from(([127, 0, 0, 1], u.port)));
    }
    DerpTarget::Url(u)
}

/// A connected client: its key, sender and receiver.
pub struct Client {
    pub key: NodePrivate,
    pub tx: DerpSender,
    pub rx: DerpReceiver,
}

/// Connects a DERP client from source address `from` (127.0.0.x), optionally over WebSocket.
pub async fn connect(url: &str, from: &str, websocket: bool) -> anyhow::Result<Client> {
    let key = NodePrivate::generate();
    let mut opts = ConnectOptions::new(key.clone());
    opts.bind_addr = Some(from.parse::<IpAddr>().unwrap());
    opts.websocket = websocket;
    opts.connect_timeout = Duration::from_secs(10);
    let conn = DerpConn::connect(&target(url), &opts).await?;
    let (tx, rx) = conn.split();
    Ok(Client { key, tx, rx })
}

/// `a` sends a packet to `b`, which must receive it (bounded).
pub async fn relay_one(a: &Client, b: &mut Client, payload: &[u8]) {
    a.tx.send_packet(b.key.public(), payload.to_vec()).await.unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match b.rx.recv().await.unwrap() {
                ServerToClient::RecvPacket { src, data } => return (src, data),
                _ => continue,
            }
        }
    })
    .await
    .expect("packet not relayed in time");
    assert_eq!(got.0, a.key.public());
    assert_eq!(&got.1[..], payload);
}

/// A mesh watcher connected directly to the relay (`WatchConns`).
pub async fn watcher(url: &str, mesh: MeshKey) -> (DerpSender, DerpReceiver) {
    let mut opts = ConnectOptions::new(NodePrivate::generate());
    opts.mesh_key = Some(mesh);
    let conn = DerpConn::connect(&target(url), &opts).await.unwrap();
    let (tx, rx) = conn.split();
    tx.watch_conns().await.unwrap();
    (tx, rx)
}

/// Waits for the PeerPresent of `key` and returns its endpoint.
pub async fn peer_present(rx: &mut DerpReceiver, key: NodePublic) -> anyhow::Result<Option<SocketAddr>> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let ServerToClient::PeerPresent { key: k, endpoint, .. } = rx.recv().await? {
                if k == key {
                    return Ok(endpoint);
                }
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no PeerPresent in time"))?
}

/// The `Source` of every `-verify-client-url` request seen so far.
pub fn sources(seen: &std::sync::Mutex<Vec<crate::ops_common::Seen>>) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|s| {
            let v: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
            v["Source"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Writes the mesh key file and returns its path and the key.
pub fn mesh_key_file(dir: &Path) -> (std::path::PathBuf, MeshKey) {
    let bytes = [0x5au8; 32];
    let path = dir.join("mesh.key");
    std::fs::write(&path, hex::encode(bytes)).unwrap();
    (path, MeshKey::from_bytes(bytes))
}

/// Sends `bytes` from `from` to `to` and returns everything read until the peer closes.
pub async fn raw_from(from: &str, to: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = s.connect(to).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("connection left open");
    out
}
