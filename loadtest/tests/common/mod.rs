//! Test fixtures: a spawned `derpfleet-relay` (plain HTTP or self-signed TLS) or `derpfleet-stun`,
//! and a runner for the `derpfleet-loadtest` binary that parses its `--json` output.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use derpfleet_e2e::{bin_path, Child};
use serde_json::Value;

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("derpfleet-loadtest-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A relay process on an ephemeral loopback port, killed on drop.
pub struct Relay {
    pub child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Relay {
    /// Plain HTTP.
    pub fn plain() -> Self {
        Self::spawn(false)
    }

    /// TLS with a generated self-signed certificate for 127.0.0.1.
    pub fn tls() -> Self {
        Self::spawn(true)
    }

    fn spawn(tls: bool) -> Self {
        let dir = TempDir::new("relay");
        let mut cmd = Command::new(bin_path("derpfleet-relay"));
        cmd.arg("-a").arg("127.0.0.1:0").arg("-c").arg(dir.0.join("key.json")).arg("-stun=false");
        if tls {
            cmd.args(["-certmode", "manual", "-hostname", "127.0.0.1", "-http-port", "-1", "-certdir"])
                .arg(dir.0.join("certs"));
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).env("RUST_LOG", "info");
        let mut child = Child::spawn(cmd, "derpfleet-relay").expect("spawn relay");
        let stderr = child.inner().stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("derpfleet-relay running") {
                    if let Some(a) = line.split("addr=").nth(1) {
                        let _ = tx.send(a.split_whitespace().next().unwrap_or("").to_string());
                    }
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(20)).expect("relay did not report its address");
        Relay { child, addr: addr.parse().expect("relay address"), _dir: dir }
    }

    /// `http(s)://addr/derp`.
    pub fn url(&self) -> String {
        format!("http://{}/derp", self.addr)
    }
}

/// A STUN responder (no per-IP rate limit) on a free loopback port, killed on drop.
pub struct Stun {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Stun {
    pub fn spawn() -> Self {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], derpfleet_e2e::ports::unused_port()));
        let mut cmd = Command::new(bin_path("derpfleet-stun"));
        cmd.arg("--a").arg(addr.to_string()).args(["--rate-limit", "0", "--sockets", "1"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = Child::spawn(cmd, "derpfleet-stun").expect("spawn stun");
        std::thread::sleep(Duration::from_millis(300));
        Stun { child, addr }
    }
}

/// The load-test binary.
pub fn loadtest() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_derpfleet-loadtest"));
    c.stdin(Stdio::null());
    c
}

/// Runs the load test (bounded by `limit`), asserts success, returns the parsed JSON.
pub fn run_json(args: &[&str], limit: Duration) -> Value {
    let out = run(args, limit);
    assert!(
        out.status.success(),
        "loadtest {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("loadtest {args:?}: output is not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
    })
}

/// Runs the load test with `--json`, killing it after `limit`.
pub fn run(args: &[&str], limit: Duration) -> Output {
    let mut cmd = loadtest();
    cmd.args(args).arg("--json").stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Child::spawn(cmd, "derpfleet-loadtest").expect("spawn loadtest");
    let mut stdout = child.inner().stdout.take().unwrap();
    let mut stderr = child.inner().stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let status = child.wait_timeout(limit).unwrap_or_else(|| panic!("loadtest {args:?} ran past {limit:?}"));
    Output { status, stdout: o.join().unwrap(), stderr: e.join().unwrap() }
}

/// `v[a][b]...` as f64, panicking with the document when missing.
pub fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).unwrap_or_else(|| panic!("no {path:?} in {v:#}"));
    }
    cur.as_f64().unwrap_or_else(|| panic!("{path:?} is not a number in {v:#}"))
}

/// Checks the fields every report has and the latency summary's ordering.
pub fn check_common(v: &Value, scenario: &str) {
    assert_eq!(v["scenario"], scenario, "{v:#}");
    assert!(v["version"].is_string() && v["targets"].is_array() && v["config"].is_object(), "{v:#}");
    assert!(v["results"].is_object() && v["timeline"].is_array() && v["notes"].is_array(), "{v:#}");
    assert!(num(v, &["started_unix"]) > 1.6e9);
    assert!(num(v, &["elapsed_s"]) > 0.0);
    if let Some(l) = v.get("latency_us").filter(|l| !l.is_null()) {
        let g = |k: &str| num(l, &[k]);
        assert!(g("count") >= 1.0, "{v:#}");
        assert!(g("min_us") > 0.0, "{v:#}");
        assert!(g("min_us") <= g("p50_us") && g("p50_us") <= g("p90_us"), "{v:#}");
        assert!(
            g("p90_us") <= g("p99_us") && g("p99_us") <= g("p999_us") && g("p999_us") <= g("max_us"),
            "{v:#}"
        );
    }
}
