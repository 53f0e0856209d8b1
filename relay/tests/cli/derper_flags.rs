//! Every flag of derper v1.102.3 (`derper -help`) is accepted by the real binary, one at a time
//! and all at once, each with a valid value; `-ace=true` stops the start with one sentence.

use crate::http_common;
use crate::ops_common;

use std::process::Command;

use http_common::{temp_dir, TempDir};
use ops_common::*;

/// derper v1.102.3's flags, as `derper -help` lists them.
const DERPER_FLAGS: &[&str] = &[
    "a",
    "accept-connection-burst",
    "accept-connection-limit",
    "ace",
    "acme-eab-key",
    "acme-eab-kid",
    "acme-email",
    "acme-ip-certs",
    "bootstrap-dns-names",
    "c",
    "certdir",
    "certmode",
    "derp",
    "dev",
    "home",
    "hostname",
    "http-port",
    "mesh-psk-file",
    "mesh-with",
    "rate-config",
    "secrets-cache-dir",
    "secrets-path-prefix",
    "secrets-url",
    "socket",
    "stun",
    "stun-port",
    "tcp-keepalive-time",
    "tcp-user-timeout",
    "tcp-write-timeout",
    "unpublished-bootstrap-dns-names",
    "verify-client-url",
    "verify-client-url-fail-open",
    "verify-clients",
    "version",
];

/// Files and ports the flag values point at.
struct Fixture {
    dir: TempDir,
    port: u16,
    setec: Option<SetecStandIn>,
}

/// The setec responder for `-secrets-url` (see `ops_secrets.rs`).
type SetecStandIn = ops_common::setec::SetecServer;

impl Fixture {
    async fn new(tag: &str) -> Fixture {
        let dir = temp_dir(tag);
        std::fs::write(dir.path().join("mesh.key"), format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::write(
            dir.path().join("rate.json"),
            r#"{"PerClientRateLimitBytesPerSec":1000000,"PerClientRateBurstBytes":2000000}"#,
        )
        .unwrap();
        let setec = ops_common::setec::SetecServer::start(&[("prod/derp/meshkey", &"cd".repeat(32))]).await;
        Fixture { dir, port: unused_port(), setec: Some(setec) }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// A valid value for `flag` (None: a boolean written bare).
    fn value(&self, flag: &str) -> Vec<String> {
        let v = |s: &str| vec![format!("-{flag}"), s.to_owned()];
        match flag {
            "a" => v(&format!("127.0.0.1:{}", self.port)),
            "accept-connection-burst" => v("100"),
            "accept-connection-limit" => v("50"),
            "ace" => vec!["-ace=false".into()],
            "acme-eab-key" => v("c2VjcmV0LWhtYWMta2V5"),
            "acme-eab-kid" => v("kid-1"),
            "acme-email" => v("ops@example.com"),
            "acme-ip-certs" => vec!["-acme-ip-certs".into()],
            "bootstrap-dns-names" => v("localhost"),
            "c" => v(&self.path("derper.key")),
            "certdir" => v(&self.path("certs")),
            "certmode" => v("letsencrypt"),
            "derp" => vec!["-derp=false".into()],
            "dev" => vec!["-dev=false".into()],
            "home" => v("blank"),
            "hostname" => v("derp.example.com"),
            "http-port" => v("-1"),
            "mesh-psk-file" => v(&self.path("mesh.key")),
            "mesh-with" => v(&format!("http://127.0.0.1:{}", self.port)),
            "rate-config" => v(&self.path("rate.json")),
            "secrets-cache-dir" => v(&self.path("setec-cache")),
            "secrets-path-prefix" => v("prod/derp"),
            "secrets-url" => v(&self.setec.as_ref().unwrap().url()),
            "socket" => v(&self.path("tailscaled.sock")),
            // With a free port: derper's default 3478 may be another test's.
            "stun" => vec!["-stun".into(), "-stun-port".into(), unused_port().to_string()],
            "stun-port" => v(&unused_port().to_string()),
            "tcp-keepalive-time" => v("5m"),
            "tcp-user-timeout" => v("10s"),
            "tcp-write-timeout" => v("1s"),
            "unpublished-bootstrap-dns-names" => v("localhost"),
            "verify-client-url" => v(&format!("http://127.0.0.1:{}/verify", unused_port())),
            "verify-client-url-fail-open" => vec!["-verify-client-url-fail-open=false".into()],
            "verify-clients" => vec!["-verify-clients".into()],
            "version" => vec!["-version=false".into()],
            other => panic!("no value for -{other}"),
        }
    }

    /// The flags every run needs so parallel tests do not collide (later flags win).
    fn base(&self) -> Vec<String> {
        [
            "-a",
            &format!("127.0.0.1:{}", self.port),
            "-c",
            &self.path("derper.key"),
            "-stun=false",
            "-metrics-addr=",
            "-mesh-psk-file",
            &self.path("mesh.key"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

fn start_and_expect_running(args: &[String]) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = Proc::start(&refs);
    p.wait_for_line("derpfleet-relay running");
    assert!(p.child.try_wait().unwrap().is_none(), "still running: {}", p.log());
    let log = p.log();
    assert!(!log.contains("unexpected argument"), "{log}");
    p.signal("-TERM");
    assert!(p.wait_exit(WAIT).is_some(), "exits on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_derper_flag_is_accepted_alone() {
    for flag in DERPER_FLAGS {
        let f = Fixture::new(&format!("derper-flag-{flag}")).await;
        let mut args = f.base();
        args.extend(f.value(flag));
        eprintln!("-{flag}: {args:?}");
        start_and_expect_running(&args);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_derper_flags_at_once() {
    let f = Fixture::new("derper-flags-all").await;
    let mut args = f.base();
    for flag in DERPER_FLAGS {
        args.extend(f.value(flag));
    }
    // One derper systemd-unit style line, all flags set; -stun-port was given a free port.
    start_and_expect_running(&args);
}

#[test]
fn every_derper_flag_is_in_help() {
    let out = Command::new(BIN).arg("-help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in DERPER_FLAGS {
        let listed = help.lines().map(str::trim_start).any(|l| {
            l.strip_prefix(&format!("--{flag}"))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '[', '=', ',']))
        });
        assert!(listed, "-{flag} missing from -help:\n{help}");
    }
}

#[test]
fn version_prints_and_exits() {
    let out = Command::new(BIN).arg("-version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("derpfleet-relay "));
}

#[test]
fn ace_true_stops_with_one_sentence() {
    let dir = temp_dir("derper-ace");
    let key = dir.path().join("k.key");
    let out = Command::new(BIN)
        .args(["-a", "127.0.0.1:0", "-c", key.to_str().unwrap(), "-stun=false", "-metrics-addr=", "-ace"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-ace=true") && err.contains("not offered"), "{err}");
    assert_eq!(err.lines().filter(|l| l.contains("ace")).count(), 1, "{err}");
}
