//! `-verify-clients`: admission through tailscaled's LocalAPI over a unix socket.
//!
//! tailscaled cannot run on this machine, so [`LocalApi`] stands in for it: a unix-socket HTTP/1.1
//! server whose `/localapi/v0/whois` handler answers as tailscale's `ipn/localapi`
//! `serveWhoIsWithBackend` does (written from that public source and from `client/local`'s
//! `WhoIsNodeKey`): 403 `whois access denied` without read permission, 400 for a missing
//! `addr` or a bad node key, 200 with an indented WhoIsResponse JSON (`Node`, `UserProfile`,
//! `CapMap`) for a known key, 404 `no match for IP:port` otherwise. Modes reproduce a tailscaled
//! too old for node-key lookups (400 `invalid 'addr' parameter`) and an internal error (500).

use crate::http_common;
use crate::ops_common;

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use derpfleet_proto::handshake::ClientInfo;
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use derpfleet_relay::core::metrics::MetricsSnapshot;
use derpfleet_relay::ops::admission::VerifyUrl;
use derpfleet_relay::server::{OpsConfig, Server};
use http_body_util::Full;
use http_common::{config, derp_upgrade, temp_dir, TempDir, TestClient};
use hyper_util::rt::TokioIo;
use ops_common::*;
use tokio::net::{TcpStream, UnixListener};

/// How the stand-in tailscaled behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Normal: known keys 200, others 404.
    Normal,
    /// The caller lacks read access (403).
    NoReadAccess,
    /// A tailscaled from before node-key whois (400 invalid 'addr' parameter).
    TooOld,
    /// An internal failure (500).
    Broken,
}

/// One request the stand-in received.
#[derive(Clone, Debug)]
struct Asked {
    host: String,
    target: String,
}

/// The stand-in for tailscaled's LocalAPI (see the module docs).
struct LocalApi {
    path: PathBuf,
    known: Arc<Mutex<HashSet<NodePublic>>>,
    asked: Arc<Mutex<Vec<Asked>>>,
    task: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl Drop for LocalApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Resp = http::Response<Full<Bytes>>;

fn go_http_error(status: u16, msg: &str) -> Resp {
    http::Response::builder()
        .status(status)
        .header("Content-Type", "text/plain; charset=utf-8")
        .header("X-Content-Type-Options", "nosniff")
        .body(Full::new(Bytes::from(format!("{msg}\n"))))
        .unwrap()
}

/// Go's `url.Values.Get` on the query (percent-decoding, `+` as space).
fn form_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            let v = v.replace('+', " ");
            let mut out = Vec::new();
            let b = v.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%' && i + 3 <= b.len() {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                    if let Ok(x) = u8::from_str_radix(hex, 16) {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                }
                out.push(b[i]);
                i += 1;
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    })
}

fn whois(mode: Mode, known: &HashSet<NodePublic>, query: &str) -> Resp {
    if mode == Mode::NoReadAccess {
        return go_http_error(403, "whois access denied");
    }
    if mode == Mode::Broken {
        return go_http_error(500, "internal error");
    }
    let Some(addr) = form_value(query, "addr").filter(|a| !a.is_empty()) else {
        return go_http_error(400, "missing 'addr' parameter");
    };
    if mode == Mode::TooOld {
        // Old tailscaled only parsed IP[:port] here.
        return go_http_error(400, "invalid 'addr' parameter");
    }
    if !addr.starts_with("nodekey:") {
        return go_http_error(404, "no match for IP:port");
    }
    let Ok(key) = addr.parse::<NodePublic>() else {
        return go_http_error(400, "invalid nodekey in 'addr' parameter");
    };
    if !known.contains(&key) {
        return go_http_error(404, "no match for IP:port");
    }
    let body = serde_json::json!({
        "Node": {"ID": 1, "StableID": "nStable1", "Name": "node1.tailnet.ts.net.", "Key": key.to_string(),
                 "Addresses": ["100.64.0.1/32"]},
        "UserProfile": {"ID": 7, "LoginName": "user@example.com", "DisplayName": "User"},
        "CapMap": null,
    });
    http::Response::builder()
        .status(200)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec_pretty(&body).unwrap())))
        .unwrap()
}

impl LocalApi {
    async fn start(mode: Mode) -> LocalApi {
        let dir = temp_dir("verify-clients");
        let path = dir.path().join("tailscaled.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let known = Arc::new(Mutex::new(HashSet::new()));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (k, a) = (known.clone(), asked.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (k, a) = (k.clone(), a.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                            let host = req
                                .headers()
                                .get("host")
                                .and_then(|h| h.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let target = req.uri().to_string();
                            a.lock().unwrap().push(Asked { host, target });
                            let resp = if req.uri().path() == "/localapi/v0/whois" {
                                whois(mode, &k.lock().unwrap(), req.uri().query().unwrap_or(""))
                            } else {
                                go_http_error(404, "404 page not found")
                            };
                            async move { Ok::<_, Infallible>(resp) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        LocalApi { path, known, asked, task, _dir: dir }
    }

    fn know(&self, key: NodePublic) {
        self.known.lock().unwrap().insert(key);
    }

    fn socket(&self) -> String {
        self.path.to_str().unwrap().to_owned()
    }
}

async fn try_connect(
    addr: std::net::SocketAddr,
    key: &NodePrivate,
    info: ClientInfo,
) -> Option<TestClient<TcpStream>> {
    let mut c = TestClient::new(derp_upgrade(addr).await, key.clone());
    c.try_handshake(info).await.unwrap().map(|_| c)
}

fn info() -> ClientInfo {
    ClientInfo { version: 2, can_ack_pings: true, ..Default::default() }
}

async fn admitted(server: &Server, key: &NodePrivate) -> bool {
    try_connect(server.local_addr(), key, info()).await.is_some()
}

async fn relay(socket: &str, verify_url: Option<String>) -> Server {
    let ops = OpsConfig {
        verify_clients_socket: Some(socket.to_owned()),
        verify_url: verify_url.map(|u| VerifyUrl::parse(&u).unwrap()),
        verify_fail_open: false,
        ..OpsConfig::default()
    };
    Server::spawn_with(config(NodePrivate::generate()), ops).await.unwrap()
}

fn metrics(server: &Server) -> MetricsSnapshot {
    MetricsSnapshot::parse(&server.status().render_metrics())
}

#[tokio::test]
async fn known_key_admitted_unknown_key_closed_without_server_info() {
    let api = LocalApi::start(Mode::Normal).await;
    let server = relay(&api.socket(), None).await;
    let (good, bad) = (NodePrivate::generate(), NodePrivate::generate());
    api.know(good.public());
    assert!(admitted(&server, &good).await, "a key tailscaled knows is admitted");
    assert!(!admitted(&server, &bad).await, "an unknown key gets no ServerInfo");
    // What was asked: tailscale's client request, host local-tailscaled.sock.
    let asked = api.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 2);
    assert_eq!(asked[0].host, "local-tailscaled.sock");
    assert_eq!(asked[0].target, format!("/localapi/v0/whois?addr=nodekey%3A{}", good.public().to_hex()));
    let m = metrics(&server);
    assert_eq!(m.get("derp_verify_clients", &[("result", "allowed")]), 1.0);
    assert_eq!(m.get("derp_verify_clients", &[("result", "not_found")]), 1.0);
    assert_eq!(m.get("derp_admission", &[("result", "rejected")]), 1.0);
    // Per-key results.
    let good_s = good.public().to_string();
    let bad_s = bad.public().to_string();
    assert_eq!(
        m.get("derp_verify_clients_key_result", &[("key", good_s.as_str()), ("result", "allowed")]),
        1.0
    );
    assert_eq!(
        m.get("derp_verify_clients_key_result", &[("key", bad_s.as_str()), ("result", "not_found")]),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn answers_are_cached_briefly_and_counted() {
    let api = LocalApi::start(Mode::Normal).await;
    let server = relay(&api.socket(), None).await;
    let (good, bad) = (NodePrivate::generate(), NodePrivate::generate());
    api.know(good.public());
    for _ in 0..3 {
        assert!(admitted(&server, &good).await);
        assert!(!admitted(&server, &bad).await);
    }
    assert_eq!(api.asked.lock().unwrap().len(), 2, "one question per key within the cache lifetime");
    let m = metrics(&server);
    assert_eq!(m.get("derp_verify_clients_cache", &[("result", "miss")]), 2.0);
    assert_eq!(m.get("derp_verify_clients_cache", &[("result", "hit")]), 4.0);
    server.shutdown().await;
}

#[tokio::test]
async fn access_denied_too_old_and_internal_errors_refuse() {
    for mode in [Mode::NoReadAccess, Mode::TooOld, Mode::Broken] {
        let api = LocalApi::start(mode).await;
        let server = relay(&api.socket(), None).await;
        let key = NodePrivate::generate();
        api.know(key.public());
        assert!(!admitted(&server, &key).await, "{mode:?} refuses");
        // Errors are not cached: a second try asks again.
        assert!(!admitted(&server, &key).await);
        assert_eq!(api.asked.lock().unwrap().len(), 2, "{mode:?}");
        let m = metrics(&server);
        assert_eq!(m.get("derp_verify_clients", &[("result", "error")]), 2.0, "{mode:?}");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn combined_with_verify_client_url_both_must_allow() {
    let api = LocalApi::start(Mode::Normal).await;
    let (known, unknown) = (NodePrivate::generate(), NodePrivate::generate());
    api.know(known.public());

    let allow = CannedHttp::start(200, r#"{"Allow":true}"#, Duration::ZERO).await;
    let server = relay(&api.socket(), Some(allow.url())).await;
    assert!(admitted(&server, &known).await, "tailscaled and the URL allow");
    assert!(!admitted(&server, &unknown).await, "the URL allows but tailscaled does not");
    assert_eq!(allow.seen.lock().unwrap().len(), 1, "tailscaled is asked first, as derper does");
    server.shutdown().await;

    let deny = CannedHttp::start(200, r#"{"Allow":false}"#, Duration::ZERO).await;
    let server = relay(&api.socket(), Some(deny.url())).await;
    assert!(!admitted(&server, &known).await, "tailscaled allows but the URL does not");
    server.shutdown().await;
}

#[tokio::test]
async fn mesh_peers_are_always_admitted() {
    let api = LocalApi::start(Mode::Normal).await;
    let mesh = MeshKey::generate();
    let mut cfg = config(NodePrivate::generate());
    cfg.derp.mesh_key = Some(mesh);
    let ops = OpsConfig { verify_clients_socket: Some(api.socket()), ..OpsConfig::default() };
    let server = Server::spawn_with(cfg, ops).await.unwrap();
    let mesh_info = ClientInfo { mesh_key: Some(mesh), version: 2, ..Default::default() };
    assert!(try_connect(server.local_addr(), &NodePrivate::generate(), mesh_info).await.is_some());
    assert!(api.asked.lock().unwrap().is_empty(), "a mesh peer is not asked about");
    server.shutdown().await;
}

// Multi-threaded: the stand-in keeps answering while this thread waits for the process's logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_socket_refuses_and_logs_why_in_the_binary() {
    let dir = temp_dir("verify-clients-bin");
    let key = dir.path().join("k.key");
    let missing = dir.path().join("no-tailscaled.sock");
    let (p, addr) = start_plain_relay(&key, &["-verify-clients", "-socket", missing.to_str().unwrap()]);
    let client = NodePrivate::generate();
    assert!(try_connect(addr, &client, info()).await.is_none(), "no tailscaled: refused");
    let line = p.wait_for_line("client rejected");
    assert!(line.contains("failed to query local tailscaled status"), "{line}");
    assert!(line.contains(missing.to_str().unwrap()), "the socket is named: {line}");
    // The same relay with a working tailscaled (a fresh process on the real socket path).
    drop(p);
    let api = LocalApi::start(Mode::Normal).await;
    api.know(client.public());
    let (_p, addr) = start_plain_relay(&key, &["-verify-clients", "-socket", &api.socket()]);
    assert!(try_connect(addr, &client, info()).await.is_some(), "known to tailscaled: admitted");
}
