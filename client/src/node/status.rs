//! `derpfleet-client status`: what the running `up` process reports over its control socket.
//!
//! Protocol: connect to the unix socket (default `/run/derpfleet-client/<iface>.sock`); the server
//! writes one JSON [`Status`] document and closes. No request is read, so the socket is read-only
//! by design; its file mode (0600, root) is the access control.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Whole-node status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// our node key
    pub node_key: String,
    /// our disco key
    pub disco_key: String,
    /// home DERP region
    pub home_region: i64,
    /// whether the home region connection is up
    pub home_connected: bool,
    /// the shared UDP socket
    pub listen: SocketAddr,
    /// endpoints we advertise
    pub endpoints: Vec<SocketAddr>,
    /// per-peer state
    pub peers: Vec<PeerStatus>,
    /// datagrams dropped because a queue was full (or DERP down), by where
    #[serde(default)]
    pub drops: DropCounts,
}

/// Drop counters (bounded queues drop instead of growing).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DropCounts {
    /// UDP sends that failed (socket buffer full, unreachable)
    pub udp: u64,
    /// DERP sends that failed (queue full or disconnected)
    pub derp: u64,
    /// TUN writes that failed
    pub tun: u64,
    /// inner packets whose source was outside the sending peer's allowed IPs
    pub not_allowed: u64,
}

/// One peer's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    /// node key
    pub node_key: String,
    /// `direct <ip:port>` or `derp-<region>`
    pub path: String,
    /// last disco round trip on the direct path, milliseconds
    pub latency_ms: Option<f64>,
    /// WireGuard bytes sent (ciphertext, as boringtun counts)
    pub tx_bytes: u64,
    /// WireGuard bytes received
    pub rx_bytes: u64,
    /// seconds since the last completed handshake
    pub last_handshake_secs: Option<f64>,
    /// datagrams sent over DERP
    pub derp_tx_packets: u64,
    /// datagrams sent over direct UDP
    pub udp_tx_packets: u64,
    /// known direct candidates
    pub candidates: usize,
}

/// Why the status could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Connecting or reading failed (is `up` running?).
    #[error("control socket {path}: {source}")]
    Io {
        /// the socket path
        path: PathBuf,
        /// why
        source: std::io::Error,
    },
    /// The answer was not a status document.
    #[error("bad status document: {0}")]
    Json(#[from] serde_json::Error),
}

/// Binds the control socket (replacing a stale one; creating its directory).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves `make()` to every connection until the task is dropped.
pub async fn serve(listener: UnixListener, make: impl Fn() -> Status + Send + 'static) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let body = serde_json::to_vec(&make()).unwrap_or_default();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            })
            .await;
        });
    }
}

/// Fetches the status from a control socket.
pub async fn fetch(path: &Path) -> Result<Status, StatusError> {
    let io = |source| StatusError::Io { path: path.to_path_buf(), source };
    let mut s = UnixStream::connect(path).await.map_err(io)?;
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer")))?
        .map_err(io)?;
    Ok(serde_json::from_slice(&buf)?)
}

/// Human-readable status, one line per peer.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "node {}  disco {}\nhome derp-{} ({})  listen {}  endpoints {}\n",
        s.node_key,
        s.disco_key,
        s.home_region,
        if s.home_connected { "connected" } else { "not connected" },
        s.listen,
        s.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(","),
    );
    out += &format!(
        "drops: udp {} derp {} tun {} not-allowed {}\n",
        s.drops.udp, s.drops.derp, s.drops.tun, s.drops.not_allowed
    );
    out += "peer             path                       latency   tx bytes   rx bytes  handshake\n";
    for p in &s.peers {
        let short = p.node_key.strip_prefix("nodekey:").unwrap_or(&p.node_key);
        out += &format!(
            "{:<16} {:<26} {:>8} {:>10} {:>10}  {}\n",
            &short[..short.len().min(16)],
            p.path,
            p.latency_ms.map(|l| format!("{l:.1}ms")).unwrap_or_else(|| "-".into()),
            p.tx_bytes,
            p.rx_bytes,
            p.last_handshake_secs.map(|s| format!("{s:.0}s ago")).unwrap_or_else(|| "never".into()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            node_key: "nodekey:00112233445566778899".into(),
            disco_key: "discokey:aa".into(),
            home_region: 900,
            home_connected: true,
            listen: "0.0.0.0:41641".parse().unwrap(),
            endpoints: vec!["203.0.113.1:41641".parse().unwrap()],
            peers: vec![PeerStatus {
                node_key: "nodekey:ffeeddccbbaa99887766".into(),
                path: "direct 203.0.113.2:41641".into(),
                latency_ms: Some(1.25),
                tx_bytes: 10,
                rx_bytes: 20,
                last_handshake_secs: Some(3.0),
                derp_tx_packets: 1,
                udp_tx_packets: 2,
                candidates: 1,
            }],
            drops: DropCounts { udp: 1, derp: 2, tun: 3, not_allowed: 4 },
        }
    }

    #[tokio::test]
    async fn control_socket_serves_the_status_and_is_private() {
        let dir =
            std::env::temp_dir().join(format!("dfstatus-{}-{}", std::process::id(), rand::random::<u32>()));
        let path = dir.join("x.sock");
        let l = bind(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let server = tokio::spawn(serve(l, sample));
        let st = fetch(&path).await.unwrap();
        assert_eq!(st.peers[0].path, "direct 203.0.113.2:41641");
        assert_eq!(st.drops.not_allowed, 4);
        let text = render(&st);
        assert!(
            text.contains("ffeeddccbbaa9988") && text.contains("1.2ms") && text.contains("3s ago"),
            "{text}"
        );
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(fetch(&path).await, Err(StatusError::Io { .. })));
    }
}
