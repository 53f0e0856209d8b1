//! `derpfleet-client status`: what the running `up` process reports over its control socket.
//!
//! Protocol: connect to the unix socket (default `/run/derpfleet-client/<iface>.sock`); the server
//! writes one JSON [`Status`] document and closes. No request is read, so the socket is read-only
//! by design; its file mode (0600, root) is the access control.

use std::collections::BTreeMap;
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
    /// the home is pinned by the config (`pin_home`)
    #[serde(default)]
    pub pin_home: bool,
    /// regions with a DERP connection up
    #[serde(default)]
    pub regions_connected: Vec<i64>,
    /// the last netcheck, if one ran
    #[serde(default)]
    pub netcheck: Option<NetcheckStatus>,
    /// every home change since start, oldest first (bounded)
    #[serde(default)]
    pub home_history: Vec<HomeMove>,
    /// the port mapping on the LAN gateway
    #[serde(default)]
    pub port_mapping: PortMapStatus,
}

/// Port mapping state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PortMapStatus {
    /// `nat-pmp` / `pcp` while a mapping is held
    pub protocol: Option<String>,
    /// the mapped public address (also advertised as a disco candidate)
    pub external: Option<SocketAddr>,
    /// seconds until it is renewed
    pub renew_in_secs: Option<f64>,
    /// why the last attempt failed (`off` when disabled)
    pub error: Option<String>,
}

/// The last netcheck report, as far as the home choice is concerned.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NetcheckStatus {
    /// seconds since the report finished
    pub age_secs: f64,
    /// why it ran (`start`, `periodic`, `requested`, `home DERP down`)
    pub trigger: String,
    /// a STUN answer arrived
    pub udp: bool,
    /// our public address as STUN saw it
    pub global_v4: Option<SocketAddr>,
    /// the region netcheck preferred (0 = none)
    pub preferred_derp: i64,
    /// this report's latency per region, milliseconds
    pub region_latency_ms: BTreeMap<i64, f64>,
    /// reports run since start
    pub reports: u64,
}

/// One home change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HomeMove {
    /// when (seconds since the Unix epoch)
    pub at_unix: f64,
    /// the previous home (0 = none)
    pub from: i64,
    /// the new home
    pub to: i64,
    /// why
    pub reason: String,
}

/// One change of a peer's path or DERP region.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathEvent {
    /// when (seconds since the Unix epoch)
    pub at_unix: f64,
    /// the path after the change (`direct ip:port` or `derp-<region>`)
    pub path: String,
    /// why
    pub reason: String,
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
    /// the DERP region used for this peer
    #[serde(default)]
    pub derp_region: i64,
    /// why that region (`config`, `our home`, `packets arrived via derp-N`, ...)
    #[serde(default)]
    pub derp_region_reason: String,
    /// recent path and region changes, oldest first (bounded)
    #[serde(default)]
    pub path_history: Vec<PathEvent>,
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
    match (&s.port_mapping.protocol, s.port_mapping.external, &s.port_mapping.error) {
        (Some(p), Some(e), _) => out += &format!("port mapping: {p} {e}\n"),
        (_, _, Some(err)) => out += &format!("port mapping: none ({err})\n"),
        _ => out += "port mapping: none yet\n",
    }
    if s.pin_home {
        out += "home pinned by config\n";
    }
    match &s.netcheck {
        Some(n) => {
            let lat: Vec<String> =
                n.region_latency_ms.iter().map(|(r, ms)| format!("derp-{r} {ms:.1}ms")).collect();
            out += &format!(
                "netcheck: {:.0}s ago ({}, {} reports)  udp {}  global {}  preferred derp-{}  {}\n",
                n.age_secs,
                n.trigger,
                n.reports,
                n.udp,
                n.global_v4.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                n.preferred_derp,
                if lat.is_empty() { "no latencies".into() } else { lat.join(", ") },
            );
        }
        None => out += "netcheck: none yet\n",
    }
    for m in &s.home_history {
        out += &format!(
            "home moved {} -> derp-{} at {:.0}: {}\n",
            region_name(m.from),
            m.to,
            m.at_unix,
            m.reason
        );
    }
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
        out += &format!("  derp-{}: {}\n", p.derp_region, p.derp_region_reason);
        for e in &p.path_history {
            out += &format!("  {:.0} {}: {}\n", e.at_unix, e.path, e.reason);
        }
    }
    out
}

fn region_name(r: i64) -> String {
    if r == 0 {
        "none".into()
    } else {
        format!("derp-{r}")
    }
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
                derp_region: 900,
                derp_region_reason: "packets arrived via derp-900".into(),
                path_history: vec![PathEvent {
                    at_unix: 1.0,
                    path: "direct 203.0.113.2:41641".into(),
                    reason: "disco pong".into(),
                }],
            }],
            drops: DropCounts { udp: 1, derp: 2, tun: 3, not_allowed: 4 },
            pin_home: false,
            regions_connected: vec![900],
            netcheck: Some(NetcheckStatus {
                age_secs: 2.0,
                trigger: "periodic".into(),
                udp: true,
                preferred_derp: 900,
                region_latency_ms: [(900, 1.5)].into_iter().collect(),
                ..Default::default()
            }),
            home_history: vec![HomeMove { at_unix: 5.0, from: 901, to: 900, reason: "faster".into() }],
            port_mapping: PortMapStatus {
                protocol: Some("pcp".into()),
                external: Some("44.0.0.1:5000".parse().unwrap()),
                ..Default::default()
            },
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
        assert!(
            text.contains("home moved derp-901 -> derp-900")
                && text.contains("derp-900 1.5ms")
                && text.contains("port mapping: pcp 44.0.0.1:5000"),
            "{text}"
        );
        assert_eq!(st.netcheck.unwrap().region_latency_ms[&900], 1.5);
        // A document from an older node (no new fields) still parses.
        let old = serde_json::json!({"node_key": "n", "disco_key": "d", "home_region": 1,
            "home_connected": true, "listen": "0.0.0.0:1", "endpoints": [], "peers": [{"node_key": "p",
            "path": "derp-1", "latency_ms": null, "tx_bytes": 0, "rx_bytes": 0, "last_handshake_secs": null,
            "derp_tx_packets": 0, "udp_tx_packets": 0, "candidates": 0}]});
        let st: Status = serde_json::from_value(old).unwrap();
        assert!(st.netcheck.is_none() && st.home_history.is_empty());
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(fetch(&path).await, Err(StatusError::Io { .. })));
    }
}
