//! Shared fixtures for the operations tests: the relay binary as a child process, a
//! canned local HTTP server standing in for an admission controller, metric scraping. The CLI
//! tests (`cli_binary.rs`) use the same process fixture.
#![allow(dead_code)]

pub mod setec;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Ports for relays started later: outside the ephemeral range, so nothing else takes them first.
pub use derpfleet_e2e::ports::unused_port;
use derpfleet_relay::core::metrics::MetricsSnapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const BIN: &str = env!("CARGO_BIN_EXE_derpfleet-relay");
/// Every wait here is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running relay process, killed on drop; stderr lines are collected.
pub struct Proc {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn start(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, lines }
    }

    /// Like [`Proc::start`] with STUN off unless `args` turn it on (a later `-stun` wins):
    /// parallel tests would otherwise race for UDP 3478.
    pub fn start_without_stun(args: &[&str]) -> Proc {
        Proc::start(&[&["-stun=false"], args].concat())
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    pub fn wait_for_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no log line with {needle:?}; got {:#?}", self.lines.lock().unwrap());
    }

    /// Waits (bounded by `limit`) for exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(st.success());
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the relay binary on a free loopback port with key file `key`, STUN and the metrics
/// listener off, then the `extra` flags; returns once it logs that it is running.
pub fn start_plain_relay(key: &Path, extra: &[&str]) -> (Proc, SocketAddr) {
    let addr = format!("127.0.0.1:{}", unused_port());
    let base = ["-a", &addr, "-c", key.to_str().unwrap(), "-stun=false", "-metrics-addr="];
    let p = Proc::start(&[&base[..], extra].concat());
    p.wait_for_line("derpfleet-relay running");
    (p, addr.parse().unwrap())
}

/// GET `path` from `addr` (plain HTTP, `Connection: close`): (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw)).await.expect("no response in time").unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Scrapes `/metrics` at `addr`.
pub async fn scrape(addr: SocketAddr) -> MetricsSnapshot {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    MetricsSnapshot::parse(&body)
}

/// Scrapes until `name{labels}` equals `value` (counters are published in batches).
pub async fn wait_metric(
    addr: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    value: f64,
) -> MetricsSnapshot {
    let deadline = Instant::now() + WAIT;
    loop {
        let snap = scrape(addr).await;
        let got = snap.get(name, labels);
        if got == value {
            return snap;
        }
        assert!(Instant::now() < deadline, "{name}{labels:?} = {got}, expected {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request the canned server received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub head: String,
    pub body: Vec<u8>,
}

/// A local HTTP server answering every request with one canned response (status line, body),
/// after `delay`; it records what it received.
pub struct CannedHttp {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CannedHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CannedHttp {
    pub async fn start(status: u16, body: &str, delay: Duration) -> CannedHttp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (sink, body) = (seen.clone(), body.to_owned());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (sink, body) = (sink.clone(), body.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read the head, then Content-Length bytes of body.
                    let (head, body_start) = loop {
                        let Ok(n) = s.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break (String::from_utf8_lossy(&buf[..i]).into_owned(), i + 4);
                        }
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < body_start + len {
                        let Ok(n) = s.read(&mut chunk).await else { return };
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    sink.lock().unwrap().push(Seen { head, body: buf[body_start..].to_vec() });
                    tokio::time::sleep(delay).await;
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        CannedHttp { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/verify", self.addr)
    }
}
