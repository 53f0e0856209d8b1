//! Shared helpers of the mesh tests: in-process relays (HTTP on loopback) meshed with
//! [`Mesh::start`], and clients built on the real `derpfleet-client` connection.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use derpfleet_client::{ConnectOptions, DerpConn, DerpReceiver, DerpSender, DerpTarget, DerpUrl};
use derpfleet_proto::msg::{PeerGoneReason, ServerToClient};
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use derpfleet_relay::core::derp_server::DerpServerConfig;
use derpfleet_relay::http::HomePage;
use derpfleet_relay::mesh::{Mesh, MeshConfig, MeshPeer};
use derpfleet_relay::server::{Server, ServerConfig, TcpConfig};

/// Every single wait in these tests is bounded by this.
pub const T: Duration = Duration::from_secs(5);

/// A plain-HTTP relay holding `mesh` on `listen`.
pub async fn relay_at(listen: SocketAddr, mesh: MeshKey) -> Server {
    let config = ServerConfig {
        listen,
        tls: None,
        http_port: None,
        home: HomePage::Default,
        derp_enabled: true,
        derp: DerpServerConfig { mesh_key: Some(mesh), ..DerpServerConfig::new(NodePrivate::generate()) },
        tcp: TcpConfig::default(),
    };
    Server::spawn(config).await.expect("relay starts")
}

/// A plain-HTTP relay holding `mesh` on an ephemeral loopback port.
pub async fn relay(mesh: MeshKey) -> Server {
    relay_at("127.0.0.1:0".parse().unwrap(), mesh).await
}

/// The `-mesh-with` entry of a plain-HTTP relay.
pub fn entry(s: &Server) -> MeshPeer {
    MeshPeer::parse(&format!("http://{}", s.local_addr())).unwrap()
}

/// A mesh config for tests: no system roots needed (plain HTTP).
pub fn mesh_config(key: MeshKey, peers: Vec<MeshPeer>) -> MeshConfig {
    MeshConfig { extra_roots: Vec::new(), ..MeshConfig::new(key, peers) }
}

/// Meshes every relay with every relay (each list includes the relay itself, as derper
/// deployments usually do) and waits until every node has a link to every other one.
pub async fn full_mesh(servers: &[&Server], key: MeshKey) -> Result<Vec<Mesh>> {
    let peers: Vec<MeshPeer> = servers.iter().map(|s| entry(s)).collect();
    let meshes =
        servers.iter().map(|s| Mesh::start(s.derp().clone(), mesh_config(key, peers.clone()))).collect();
    for s in servers {
        eventually("every mesh link up", || {
            gauge(s, "derp_mesh_peers_connected") == (servers.len() - 1) as f64
        })
        .await?;
    }
    Ok(meshes)
}

/// A metric of `s` (no labels).
pub fn gauge(s: &Server, name: &str) -> f64 {
    s.derp().metrics().snapshot().get(name, &[])
}

/// Waits (up to [`T`]) for `cond`.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) -> Result<()> {
    eventually_within(what, T, cond).await
}

/// Waits (up to `limit`) for `cond`.
pub async fn eventually_within(what: &str, limit: Duration, cond: impl Fn() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// True once `s` can forward to `key` (it learned where the key is).
pub fn knows(s: &Server, key: &NodePublic) -> bool {
    s.derp().registry().preferred_forwarder(key).is_some()
}

/// A DERP client (the real `derpfleet-client` connection) on one relay.
pub struct Client {
    pub key: NodePrivate,
    pub tx: DerpSender,
    rx: DerpReceiver,
    /// PeerGone frames seen while waiting for something else.
    pub gone: Vec<(NodePublic, PeerGoneReason)>,
}

impl Client {
    /// Connects with a fresh key.
    pub async fn connect(addr: SocketAddr) -> Result<Client> {
        Self::connect_with(addr, ConnectOptions::new(NodePrivate::generate())).await
    }

    /// Connects with `opts` over plain HTTP.
    pub async fn connect_with(addr: SocketAddr, opts: ConnectOptions) -> Result<Client> {
        let url: DerpUrl = format!("http://{addr}/derp").parse()?;
        Self::connect_target(&DerpTarget::Url(url), opts).await
    }

    /// Connects to any target.
    pub async fn connect_target(target: &DerpTarget, opts: ConnectOptions) -> Result<Client> {
        let conn = DerpConn::connect(target, &opts).await?;
        let (tx, rx) = conn.split();
        Ok(Client { key: opts.private_key, tx, rx, gone: Vec::new() })
    }

    pub fn public(&self) -> NodePublic {
        self.key.public()
    }

    pub async fn send(&self, dst: NodePublic, data: &[u8]) -> Result<()> {
        self.tx.send_packet(dst, data.to_vec()).await.map_err(|e| anyhow!("send: {e}"))
    }

    /// The next frame (any type), within `limit`.
    pub async fn next(&mut self, limit: Duration) -> Result<ServerToClient> {
        match tokio::time::timeout(limit, self.rx.recv()).await {
            Ok(r) => Ok(r?),
            Err(_) => bail!("no frame within {limit:?}"),
        }
    }

    /// The next RecvPacket within `limit`; PeerGone frames on the way are kept in `gone`.
    pub async fn want_packet_within(&mut self, limit: Duration) -> Result<(NodePublic, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                ServerToClient::RecvPacket { src, data } => return Ok((src, data.to_vec())),
                ServerToClient::PeerGone { key, reason } => self.gone.push((key, reason)),
                _ => {}
            }
        }
    }

    pub async fn want_packet(&mut self) -> Result<(NodePublic, Vec<u8>)> {
        self.want_packet_within(T).await
    }

    /// Waits for PeerGone(`key`) (or finds it among those already seen); returns its reason.
    pub async fn want_gone(&mut self, key: NodePublic) -> Result<PeerGoneReason> {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(i) = self.gone.iter().position(|(k, _)| *k == key) {
                return Ok(self.gone.remove(i).1);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let ServerToClient::PeerGone { key, reason } = self.next(left).await? {
                self.gone.push((key, reason));
            }
        }
    }

    /// Asserts one round trip of a fresh payload from `self` to `to`.
    pub async fn deliver_to(&self, to: &mut Client, tag: &str) -> Result<()> {
        let payload = format!("{tag} {}", rand::random::<u64>()).into_bytes();
        self.send(to.public(), &payload).await?;
        let (src, data) = to.want_packet().await?;
        if src != self.public() || data != payload {
            bail!("{tag}: got {:?} from {}, wanted {:?}", String::from_utf8_lossy(&data), src, payload);
        }
        Ok(())
    }

    /// Sends a fresh payload every 100 ms until `to` receives one (stale ones are skipped);
    /// returns how long that took. Fails after `limit`.
    pub async fn deliver_eventually(&self, to: &mut Client, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        let want_prefix = format!("probe-{}-", rand::random::<u64>());
        let mut n = 0u64;
        while start.elapsed() < limit {
            n += 1;
            self.send(to.public(), format!("{want_prefix}{n}").as_bytes()).await?;
            let wait_until = Instant::now() + Duration::from_millis(100);
            while Instant::now() < wait_until {
                let left = wait_until.saturating_duration_since(Instant::now());
                match to.want_packet_within(left).await {
                    Ok((src, data)) if src == self.public() && data.starts_with(want_prefix.as_bytes()) => {
                        return Ok(start.elapsed())
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
        bail!("nothing delivered within {limit:?}")
    }
}
