//! The mesh: several relays acting as one region (spec §3; derper's `mesh.go`).
//!
//! Every node dials every other node named in `-mesh-with` with its **own** server key and the
//! region's mesh key, sends WatchConns, and learns from PeerPresent/PeerGone which clients the
//! other node holds. Each such watch connection is a [`MeshLink`]: registered in the
//! [`Registry`] as the [`PacketForwarder`] for every key the other node announced, so a local
//! SendPacket to such a key leaves as ForwardPacket over that link (exactly one hop; the other
//! node delivers locally only). When a link breaks, every key it announced is removed (local
//! senders to keys left nowhere get PeerGone), and the link reconnects after
//! [`MeshConfig::retry_interval`] (5 s, as derper); the new flood re-adds the keys. A failed
//! connect is retried after [`MeshConfig::dial_retry_interval`] (1 s; derper waits 5 s), so a
//! restarted node rejoins within about a second.
//!
//! Entries: `host[:port][/dialhost]` as derper (`https://host[:port]/derp`, TLS verified for
//! `host` against the system trust store, TCP to `dialhost` if given). The name actually dialed
//! is resolved every [`MeshConfig::resolve_interval`] (30 s) and each address gets its own link,
//! so a DNS name with several addresses (a Kubernetes headless service) meshes with every node
//! behind it; vanished addresses lose their link. A link that reaches this node itself (the
//! server key equals ours) stops for good ("detected self-connect"). Our own extension for tests
//! and private networks: an entry starting with `http://` is dialed without TLS.
//!
//! A ForwardPacket never waits: it is queued on the link's bounded queue (the DERP client's send
//! queue), whose writer task batches frames into few writes under a 5 s write deadline; a full
//! queue drops the packet (`derp_packets_dropped{reason="queue_tail"}` and
//! `derp_mesh_forward_dropped`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use derpfleet_client::conn::{ConnectOptions, DerpConn, DerpSender, DerpTarget, SendError};
use derpfleet_client::dial::DerpUrl;
use derpfleet_proto::derpmap::CertCheck;
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::{MeshKey, NodePublic};
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::derp_server::DerpServer;
use crate::core::metrics::{DropReason, Metrics, PacketKind};
use crate::core::registry::{PacketForwarder, Registry};

/// Pause after a link broke before reconnecting (derper: 5 s).
pub const MESH_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Pause after a failed connect before the next one: shorter than derper's 5 s, so a restarted
/// node is back in the region within about a second of listening again (a refused connect costs
/// next to nothing).
pub const MESH_DIAL_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often a `-mesh-with` name is resolved again.
pub const MESH_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// ForwardPackets that may wait for one link's writer.
pub const MESH_QUEUE_DEPTH: usize = 1024;
/// Deadline of each batched write on a link (derper: 5 s, then the link closes).
pub const MESH_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the system's trusted CA bundle may be (Go's `crypto/x509` list for Linux, in order).
const SYSTEM_CA_FILES: [&str; 6] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Why the mesh key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MeshKeyError {
    /// The file could not be read.
    #[error("reading mesh key file {path}: {source}")]
    Read {
        /// the file
        path: PathBuf,
        /// why
        source: io::Error,
    },
    /// The file does not hold 64 hex characters.
    #[error("mesh key file {path}: must hold exactly 64 hex characters (whitespace is trimmed)")]
    Invalid {
        /// the file
        path: PathBuf,
    },
}

/// Reads a `-mesh-psk-file`: 64 hex characters, surrounding whitespace trimmed.
pub fn load_mesh_key(path: &Path) -> Result<MeshKey, MeshKeyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| MeshKeyError::Read { path: path.to_owned(), source })?;
    MeshKey::parse(text.trim()).map_err(|_| MeshKeyError::Invalid { path: path.to_owned() })
}

/// derper's default `-mesh-psk-file`: `/home/derp/keys/derp-mesh.key` or
/// `$HOME/keys/derp-mesh.key`, whichever exists first.
pub fn default_mesh_psk_file() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("/home/derp/keys/derp-mesh.key")];
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        candidates.push(Path::new(&home).join("keys").join("derp-mesh.key"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Why a `-mesh-with` entry was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("-mesh-with entry {entry:?}: {reason}")]
pub struct MeshPeerError {
    entry: String,
    reason: &'static str,
}

/// One `-mesh-with` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPeer {
    /// TLS (the default) or plain HTTP (entries starting with `http://`).
    pub https: bool,
    /// The name TLS verifies and the `Host` header carries (brackets removed).
    pub host: String,
    /// The port (443 / 80 by default).
    pub port: u16,
    /// The name or address to dial instead of `host` (the `/dialhost` suffix).
    pub dial_host: Option<String>,
}

impl MeshPeer {
    /// Parses `host[:port][/dialhost]` or `http://host[:port][/dialhost]`.
    pub fn parse(entry: &str) -> Result<Self, MeshPeerError> {
        let bad = |reason| MeshPeerError { entry: entry.to_owned(), reason };
        let (https, rest) = match entry.strip_prefix("http://") {
            Some(rest) => (false, rest),
            None => (true, entry.strip_prefix("https://").unwrap_or(entry)),
        };
        let (host_port, dial_host) = match rest.split_once('/') {
            Some((h, d)) => {
                let d = d.trim_start_matches('[').trim_end_matches(']');
                if d.is_empty() || d.contains('/') {
                    return Err(bad("the dial host after '/' must be a single name or address"));
                }
                (h, Some(d.to_owned()))
            }
            None => (rest, None),
        };
        if host_port.is_empty() {
            return Err(bad("no host"));
        }
        let uri: http::Uri =
            format!("http://{host_port}/").parse().map_err(|_| bad("not a host or host:port"))?;
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(bad("user info is not allowed"));
        }
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let port = match authority.strip_prefix(uri.host().unwrap_or_default()) {
            Some("") => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .strip_prefix(':')
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|&p| p != 0)
                .ok_or_else(|| bad("bad port"))?,
            None => return Err(bad("not a host or host:port")),
        };
        Ok(Self { https, host, port, dial_host })
    }

    /// The name resolved for dialing: the dial host, else the host.
    pub fn dial_name(&self) -> &str {
        self.dial_host.as_deref().unwrap_or(&self.host)
    }

    /// The DERP URL of this peer, dialed at `addr`.
    pub fn url(&self, addr: SocketAddr) -> DerpUrl {
        DerpUrl {
            https: self.https,
            host: self.host.clone(),
            port: self.port,
            path: "/derp".into(),
            cert_check: CertCheck::HostName,
            dial_addr: Some(addr),
        }
    }
}

impl std::fmt::Display for MeshPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        let h = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{scheme}://{h}:{}/derp", self.port)?;
        if let Some(d) = &self.dial_host {
            write!(f, " (dial {d})")?;
        }
        Ok(())
    }
}

/// Parses a whole `-mesh-with` value (comma-separated; empty entries skipped).
pub fn parse_mesh_with(s: &str) -> Result<Vec<MeshPeer>, MeshPeerError> {
    s.split(',').map(str::trim).filter(|e| !e.is_empty()).map(MeshPeer::parse).collect()
}

/// Why a CA bundle could not be used.
#[derive(Debug, thiserror::Error)]
#[error("CA file {path}: {reason}")]
pub struct CaFileError {
    path: PathBuf,
    reason: String,
}

impl CaFileError {
    /// A CA file that read fine but holds something the caller cannot use.
    pub(crate) fn new(path: &Path, reason: impl Into<String>) -> Self {
        CaFileError { path: path.to_owned(), reason: reason.into() }
    }
}

/// Reads every certificate of a PEM bundle.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let err = |reason: String| CaFileError { path: path.to_owned(), reason };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no certificates in it".into()));
    }
    Ok(certs)
}

/// The system trust store as Go reads it on Linux: `$SSL_CERT_FILE`, else the first bundle
/// found among the usual paths. Empty when none is found (the bundled Mozilla roots remain).
pub fn system_roots() -> Vec<CertificateDer<'static>> {
    let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let candidates = env.into_iter().chain(SYSTEM_CA_FILES.iter().map(PathBuf::from));
    for path in candidates {
        if path.is_file() {
            match load_ca_file(&path) {
                Ok(certs) => return certs,
                Err(e) => tracing::warn!("mesh: {e}"),
            }
        }
    }
    Vec::new()
}

/// Turns a name into addresses (the real one is DNS; tests may inject their own).
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host` with `port`.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system resolver (`tokio::net::lookup_host`).
#[derive(Debug, Default)]
pub struct DnsResolver;

impl Resolve for DnsResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move {
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
            addrs.sort();
            addrs.dedup();
            Ok(addrs)
        })
    }
}

/// How this node meshes.
#[derive(Clone)]
pub struct MeshConfig {
    /// The region's mesh key (also set in the core's `DerpServerConfig::mesh_key`).
    pub mesh_key: MeshKey,
    /// The other nodes (this one may be among them).
    pub peers: Vec<MeshPeer>,
    /// Roots trusted besides the bundled Mozilla roots: the system store, `-mesh-ca-file`.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Pause after a link breaks.
    pub retry_interval: Duration,
    /// Pause after a connect fails.
    pub dial_retry_interval: Duration,
    /// How often names are resolved again.
    pub resolve_interval: Duration,
    /// Per-link ForwardPacket queue depth.
    pub queue_depth: usize,
    /// Name resolution.
    pub resolver: Arc<dyn Resolve>,
}

impl std::fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConfig")
            .field("peers", &self.peers)
            .field("extra_roots", &self.extra_roots.len())
            .field("retry_interval", &self.retry_interval)
            .field("resolve_interval", &self.resolve_interval)
            .field("queue_depth", &self.queue_depth)
            .finish_non_exhaustive()
    }
}

impl MeshConfig {
    /// derper's behaviour for `peers`: system roots, 5 s retry, 30 s re-resolve, DNS.
    pub fn new(mesh_key: MeshKey, peers: Vec<MeshPeer>) -> Self {
        Self {
            mesh_key,
            peers,
            extra_roots: system_roots(),
            retry_interval: MESH_RETRY_INTERVAL,
            dial_retry_interval: MESH_DIAL_RETRY_INTERVAL,
            resolve_interval: MESH_RESOLVE_INTERVAL,
            queue_depth: MESH_QUEUE_DEPTH,
            resolver: Arc::new(DnsResolver),
        }
    }
}

/// One connected watch link to another node: the forwarder for the keys that node announced.
pub struct MeshLink {
    id: u64,
    tx: DerpSender,
    metrics: Arc<Metrics>,
}

impl PacketForwarder for MeshLink {
    fn forward_packet(&self, src: NodePublic, dst: NodePublic, data: Bytes) {
        let (kind, len) = (PacketKind::of(&data), data.len());
        match self.tx.try_send(ClientToServer::ForwardPacket { src, dst, data }) {
            Ok(()) => self.metrics.packets_forwarded_out.increment(1),
            Err(e) => {
                let reason =
                    if e == SendError::Full { DropReason::QueueTail } else { DropReason::GoneDisconnected };
                self.metrics.drop_packet(reason, kind, len);
                self.metrics.mesh_forward_dropped.increment(1);
            }
        }
    }

    fn forwarder_id(&self) -> u64 {
        self.id
    }
}

/// Forwarder ids: unique in the process, so links of different servers never collide.
static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

/// The running mesh of one server. Dropping it stops every link (without waiting).
pub struct Mesh {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Mesh {
    /// Starts one task per `-mesh-with` entry. Must be called inside a Tokio runtime.
    pub fn start(derp: Arc<DerpServer>, config: MeshConfig) -> Mesh {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let config = Arc::new(config);
        for peer in config.peers.clone() {
            let ctx = LinkCtx { derp: derp.clone(), config: config.clone(), tracker: tracker.clone() };
            tracker.spawn(run_peer(ctx, peer, cancel.clone()));
        }
        Mesh { cancel, tracker }
    }

    /// Stops every link and waits for them; their forwarders are removed.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[derive(Clone)]
struct LinkCtx {
    derp: Arc<DerpServer>,
    config: Arc<MeshConfig>,
    tracker: TaskTracker,
}

/// Keeps one link per address of `peer`'s dial name, re-resolving names periodically.
async fn run_peer(ctx: LinkCtx, peer: MeshPeer, cancel: CancellationToken) {
    let name = peer.dial_name().to_owned();
    if let Ok(ip) = name.parse::<IpAddr>() {
        run_link(ctx, peer.clone(), SocketAddr::new(ip, peer.port), cancel).await;
        return;
    }
    let mut links: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    loop {
        match ctx.config.resolver.resolve(&name, peer.port).await {
            Ok(addrs) => {
                let now: HashSet<SocketAddr> = addrs.into_iter().collect();
                links.retain(|addr, link| {
                    let keep = now.contains(addr);
                    if !keep {
                        tracing::info!(%peer, %addr, "mesh: address gone from DNS; dropping its link");
                        link.cancel();
                    }
                    keep
                });
                for addr in now {
                    if let std::collections::hash_map::Entry::Vacant(e) = links.entry(addr) {
                        let link = cancel.child_token();
                        e.insert(link.clone());
                        ctx.tracker.spawn(run_link(ctx.clone(), peer.clone(), addr, link));
                    }
                }
            }
            Err(e) => tracing::warn!(%peer, "mesh: resolving {name:?}: {e}; keeping current links"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(ctx.config.resolve_interval) => {}
        }
    }
}

/// Why a link ended.
enum LinkEnd {
    /// Stopped (shutdown, address gone, or self-connect).
    Stop,
    /// The link was up and broke: try again after the retry interval.
    Broke,
    /// The connect failed: try again after the dial retry interval.
    DialFailed,
}

/// The keys one connected link announced, registered as forwarded through it. Dropping it (when
/// the link ends, however it ends) removes them all and counts the link as disconnected.
struct Announced<'a> {
    registry: &'a Registry,
    metrics: &'a Metrics,
    link_id: u64,
    keys: HashSet<NodePublic>,
}

impl<'a> Announced<'a> {
    fn new(registry: &'a Registry, metrics: &'a Metrics, link_id: u64) -> Self {
        metrics.mesh_peers_connected.increment(1.0);
        Self { registry, metrics, link_id, keys: HashSet::new() }
    }
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        for key in self.keys.drain() {
            self.registry.remove_packet_forwarder(key, self.link_id);
        }
        self.metrics.mesh_peers_connected.decrement(1.0);
    }
}

/// Connects, watches and forwards for one address until cancelled, reconnecting after breaks.
async fn run_link(ctx: LinkCtx, peer: MeshPeer, addr: SocketAddr, cancel: CancellationToken) {
    let mut failures = 0u32;
    loop {
        // Not raced against `cancel` from out here: `link_once` must run its cleanup.
        let end = link_once(&ctx, &peer, addr, &cancel, failures).await;
        let pause = match end {
            LinkEnd::Stop => return,
            LinkEnd::Broke => {
                failures = 0;
                ctx.config.retry_interval
            }
            LinkEnd::DialFailed => {
                failures = failures.saturating_add(1);
                ctx.config.dial_retry_interval
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// One connection: connect, watch, forward until it ends. `failures` (connects failed in a row)
/// keeps repeated failures out of the warning log.
async fn link_once(
    ctx: &LinkCtx,
    peer: &MeshPeer,
    addr: SocketAddr,
    cancel: &CancellationToken,
    failures: u32,
) -> LinkEnd {
    let server = ctx.derp.config();
    let opts = ConnectOptions {
        mesh_key: Some(ctx.config.mesh_key),
        extra_roots: ctx.config.extra_roots.clone(),
        send_queue: ctx.config.queue_depth,
        write_timeout: Some(MESH_WRITE_TIMEOUT),
        ..ConnectOptions::new(server.private_key.clone())
    };
    let target = DerpTarget::Url(peer.url(addr));
    let connect = DerpConn::connect(&target, &opts);
    let connected = tokio::select! {
        _ = cancel.cancelled() => return LinkEnd::Stop,
        c = connect => c,
    };
    let conn = match connected {
        Ok(c) => c,
        Err(e) => {
            if failures.is_multiple_of(60) {
                tracing::warn!(%peer, %addr, failures, "mesh: connecting: {e}; retrying every {:?}", ctx.config.dial_retry_interval);
            } else {
                tracing::debug!(%peer, %addr, "mesh: connecting: {e}");
            }
            return LinkEnd::DialFailed;
        }
    };
    if conn.info().server_key == ctx.derp.public_key() {
        tracing::info!(%peer, %addr, "mesh: detected self-connect; ignoring this address");
        return LinkEnd::Stop;
    }
    let other = conn.info().server_key;
    let (tx, mut rx) = conn.split();
    if tx.watch_conns().await.is_err() {
        return LinkEnd::Broke;
    }
    let metrics = ctx.derp.metrics().clone();
    let link =
        Arc::new(MeshLink { id: NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed), tx: tx.clone(), metrics });
    let registry = ctx.derp.registry();
    let mut present = Announced::new(registry, ctx.derp.metrics(), link.id);
    tracing::info!(%peer, %addr, server = %other.short(), "mesh: link up, watching connections");
    let err = loop {
        let m = tokio::select! {
            _ = cancel.cancelled() => break None,
            m = rx.recv() => m,
        };
        match m {
            Ok(ServerToClient::PeerPresent { key, .. }) => {
                if present.keys.insert(key) {
                    registry.add_packet_forwarder(key, link.clone());
                }
            }
            Ok(ServerToClient::PeerGone { key, .. }) => {
                if present.keys.remove(&key) {
                    registry.remove_packet_forwarder(key, link.id);
                }
            }
            Ok(_) => {}
            Err(e) => break Some(e),
        }
    };
    tx.close();
    drop(present);
    match err {
        Some(e) => {
            tracing::warn!(%peer, %addr, server = %other.short(), "mesh: link broke: {e}; reconnecting in {:?}", ctx.config.retry_interval);
            LinkEnd::Broke
        }
        None => LinkEnd::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_with_entries_parse_like_derper() {
        let p = parse_mesh_with("derp1.example.com, derp2.example.com:8443/10.0.0.2,,").unwrap();
        assert_eq!(
            p[0],
            MeshPeer { https: true, host: "derp1.example.com".into(), port: 443, dial_host: None }
        );
        assert_eq!(
            p[1],
            MeshPeer {
                https: true,
                host: "derp2.example.com".into(),
                port: 8443,
                dial_host: Some("10.0.0.2".into())
            }
        );
        assert_eq!(p[1].dial_name(), "10.0.0.2");
        let h = MeshPeer::parse("http://127.0.0.1:3340").unwrap();
        assert_eq!((h.https, h.host.as_str(), h.port), (false, "127.0.0.1", 3340));
        let v6 = MeshPeer::parse("[::1]:444/[fd00::2]").unwrap();
        assert_eq!((v6.host.as_str(), v6.port, v6.dial_name()), ("::1", 444, "fd00::2"));
        assert_eq!(v6.url("[fd00::2]:444".parse().unwrap()).host_header(), "[::1]:444");
        for bad in ["/x", "host:notaport", "a/b/c", "host/", "user@host"] {
            assert!(MeshPeer::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mesh_key_file_trimmed_and_invalid_rejected() {
        let dir = std::env::temp_dir().join(format!("derpfleet-meshkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = MeshKey::generate();
        let good = dir.join("good");
        std::fs::write(&good, format!("  {}\n", k.to_hex())).unwrap();
        assert!(load_mesh_key(&good).unwrap().ct_eq(&k));
        let bad = dir.join("bad");
        std::fs::write(&bad, "abc").unwrap();
        let e = load_mesh_key(&bad).unwrap_err().to_string();
        assert!(e.contains("64 hex"), "{e}");
        assert!(load_mesh_key(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
