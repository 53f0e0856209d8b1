//! The `derpfleet-stun` binary: Go-style flags, answering, `/metrics`, clean exit on signals.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use derpfleet_stun::client::{binding, RetryPlan};
use derpfleet_stun::message::{TxId, MAGIC_COOKIE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const BIN: &str = env!("CARGO_BIN_EXE_derpfleet-stun");

/// A running binary, killed on drop if the test did not stop it.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn derpfleet-stun");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// Waits for a log line containing `marker` and returns the value of its `field=` token.
    fn logged_addr(&self, marker: &str, field: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line =
                self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no log line with {marker:?}"));
            if line.contains(marker) {
                let value = line
                    .split_whitespace()
                    .find_map(|t| t.strip_prefix(&format!("{field}=")))
                    .unwrap_or_else(|| panic!("no {field}= in {line:?}"));
                return value.parse().unwrap_or_else(|e| panic!("{value:?}: {e}"));
            }
        }
    }

    /// Sends `signal` and asserts a zero exit status within 5 s.
    fn stop_with(mut self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, signal) }, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status:?} after signal {signal}");
                return;
            }
            assert!(Instant::now() < deadline, "did not exit within 5 s of signal {signal}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.unwrap().unwrap();
    out
}

#[tokio::test]
async fn serves_stun_and_metrics_then_exits_0_on_sigterm() {
    let bin = Running::start(&["-a", "127.0.0.1:0", "-metrics-addr=127.0.0.1:0", "-sockets", "2"]);
    let metrics = bin.logged_addr("serving Prometheus metrics", "addr");
    let stun = bin.logged_addr("STUN responder listening", "addr");
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let answer = binding(&sock, stun, RetryPlan::default()).await.unwrap();
    assert_eq!(answer.mapped, sock.local_addr().unwrap());

    // Counters are published right after the send, so allow the answer to overtake them briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut page = http_get(metrics, "/metrics").await;
    while !page.contains(r#"stun_requests{disposition="success"} 1"#) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        page = http_get(metrics, "/metrics").await;
    }
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains(r#"stun_requests{disposition="success"} 1"#), "{page}");
    assert!(page.contains(r#"stun_addrfamily{family="ipv4"} 1"#), "{page}");
    assert!(http_get(metrics, "/nope").await.starts_with("HTTP/1.1 404"));
    bin.stop_with(libc::SIGTERM);
}

#[tokio::test]
async fn strict_flag_in_go_syntax_and_sigint() {
    let bin = Running::start(&["-a=127.0.0.1:0", "-stun-strict", "-rate-limit=0"]);
    let stun = bin.logged_addr("STUN responder listening", "addr");
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut bare = vec![0, 1, 0, 0];
    bare.extend_from_slice(&MAGIC_COOKIE);
    bare.extend_from_slice(&TxId::random().0);
    sock.send_to(&bare, stun).await.unwrap();
    let mut buf = [0u8; 100];
    let silent = tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await;
    assert!(silent.is_err(), "strict mode answered a bare RFC 5389 request");
    assert!(binding(&sock, stun, RetryPlan::default()).await.is_ok(), "Tailscale-style request answered");
    bin.stop_with(libc::SIGINT);
}

#[test]
fn help_lists_the_flags_and_bad_flags_fail() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--a ", "--stun-strict", "--rate-limit", "--rate-burst", "--metrics-addr", "--sockets"] {
        assert!(help.contains(flag), "{flag} missing from help:\n{help}");
    }
    let out = Command::new(BIN).args(["-a", "not-an-address"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-a"), "error names the flag");
    let out = Command::new(BIN).args(["-stun-strict=maybe"]).output().unwrap();
    assert!(!out.status.success());
}

/// Every bad flag value exits 2 and names the flag as typed and the value.
#[test]
fn bad_flag_values_exit_2_naming_flag_and_value() {
    for (args, needles) in [
        (&["--rate-limit", "-5"][..], &["'--rate-limit", "'-5'"][..]),
        (&["-rate-limit", "-5"], &["'-rate-limit", "'-5'"]),
        (&["-a", "nonsense"], &["'-a", "nonsense"]),
        (&["-bogus"], &["'-bogus'"]),
        (&["-stun-strict=maybe"], &["'-stun-strict", "maybe"]),
        (&["-metrics-addr", "9478"], &["'-metrics-addr", "9478"]),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {needle:?} missing from {err}");
        }
        if args[0].starts_with("--") {
            continue;
        }
        assert!(!err.contains(&format!("'-{}", args[0])), "{args:?} echoed with two dashes: {err}");
    }
}
