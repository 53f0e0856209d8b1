//! The real `derpfleet-relay` binary with derper command lines.

use crate::http_common;
use crate::ops_common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use derpfleet_proto::NodePrivate;
use http_common::*;
use ops_common::{unused_port, Proc, BIN};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn plain_http_with_key_file_and_blank_home() {
    let dir = temp_dir("cli-plain");
    let keyfile = dir.path().join("derper.key");
    let port = unused_port();
    let a = format!("127.0.0.1:{port}");
    let mut p = Proc::start_without_stun(&["-a", &a, "-c", keyfile.to_str().unwrap(), "-home", "blank"]);
    p.wait_for_line("derpfleet-relay running");
    let addr: SocketAddr = a.parse().unwrap();
    let r = http(addr, "GET", "/", "").await;
    assert_eq!((r.status, r.body.len()), (200, 0), "blank home");
    // The key file was created (0600) and is the identity the server presents.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&keyfile).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let key = derpfleet_relay::startup::keyfile::load_or_create(&keyfile).unwrap().0;
    let (mut c, _) = derp_client(addr).await;
    c.send(&derpfleet_proto::msg::ClientToServer::Ping(*b"12345678")).await.unwrap();
    assert_eq!(
        c.next_data(STEP).await.unwrap(),
        Some(derpfleet_proto::msg::ServerToClient::Pong(*b"12345678"))
    );
    let mut s = derp_upgrade(addr).await;
    let _ = s.flush().await;
    assert_eq!(TestClient::over(s, NodePrivate::generate()).await.unwrap().server_key, key.public());
    p.signal("-TERM");
    assert!(p.wait_exit(STEP).expect("process did not exit").success(), "SIGTERM exits 0; log:\n{}", p.log());
}

#[tokio::test]
async fn tls_manual_with_ip_hostname_generates_pinned_self_signed_cert() {
    let dir = temp_dir("cli-tls");
    let keyfile = dir.path().join("k.key");
    let certdir = dir.path().join("certs");
    let port = unused_port();
    let a = format!("127.0.0.1:{port}");
    let mut p = Proc::start_without_stun(&[
        "-a",
        &a,
        "-c",
        keyfile.to_str().unwrap(),
        "-certmode",
        "manual",
        "-hostname",
        "127.0.0.1",
        "-certdir",
        certdir.to_str().unwrap(),
        "-http-port",
        "-1",
    ]);
    let line = p.wait_for_line("sha256-raw:");
    let json = &line[line.find('{').unwrap()..];
    let node: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(node["HostName"], "127.0.0.1");
    assert_eq!(node["IPv4"], "127.0.0.1");
    assert_eq!(node["DERPPort"], port);
    let cert_name = node["CertName"].as_str().unwrap();
    p.wait_for_line("derpfleet-relay running");
    assert!(certdir.join("127.0.0.1.crt").exists() && certdir.join("127.0.0.1.key").exists());
    let mut s = tls_connect(a.parse().unwrap(), pinned_client(pin_of(cert_name), rustls::DEFAULT_VERSIONS))
        .await
        .unwrap();
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\n\r\n").await.unwrap();
    assert_eq!(read_head(&mut s).await.status, 101);
    let key = derpfleet_relay::startup::keyfile::load_or_create(&keyfile).unwrap().0;
    assert_eq!(TestClient::over(s, NodePrivate::generate()).await.unwrap().server_key, key.public());
    assert!(!p.log().contains("http_port_addr=Some"), "-http-port -1 disables port 80");
    p.signal("-TERM");
    assert!(p.wait_exit(STEP).expect("process did not exit").success());
}

#[tokio::test]
async fn go_flag_syntax_variants_parse() {
    let dir = temp_dir("cli-syntax");
    let keyfile = dir.path().join("k.key");
    let port = unused_port();
    // `-a=x`, `--c x`, `-stun=false`, bare bool `-derp`, `-tcp-write-timeout=500ms`.
    let a = format!("-a=127.0.0.1:{port}");
    let p = Proc::start_without_stun(&[
        &a,
        "--c",
        keyfile.to_str().unwrap(),
        "-stun=false",
        "-derp",
        "-tcp-write-timeout=500ms",
        "-tcp-keepalive-time",
        "1h30m",
        "--tcp-user-timeout=0",
    ]);
    p.wait_for_line("derpfleet-relay running");
    let r = http(format!("127.0.0.1:{port}").parse().unwrap(), "GET", "/derp/probe", "").await;
    assert_eq!(r.status, 200);
}

#[test]
fn dev_mode_uses_loopback_3340() {
    let mut p = Proc::start_without_stun(&["-dev"]);
    // Either it serves on 127.0.0.1:3340, or (if something else holds that port) it says so.
    let deadline = Instant::now() + STEP;
    loop {
        let log = p.log();
        if log.contains("derpfleet-relay running") {
            assert!(log.contains("127.0.0.1:3340"), "{log}");
            assert!(log.contains("dev mode"), "{log}");
            break;
        }
        if p.child.try_wait().unwrap().is_some() {
            assert!(log.contains("127.0.0.1:3340"), "dev mode failed for another reason: {log}");
            return;
        }
        assert!(Instant::now() < deadline, "dev mode did not start: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    p.signal("-TERM");
    assert!(p.wait_exit(STEP).expect("process did not exit").success());
}

#[test]
fn version_help_and_bad_flags() {
    let out = Command::new(BIN).arg("-version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("derpfleet-relay "));
    let out = Command::new(BIN).arg("-help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--a",
        "--c",
        "--dev",
        "--http-port",
        "--certmode",
        "--certdir",
        "--hostname",
        "--home",
        "--tcp-keepalive-time",
        "--tcp-user-timeout",
        "--tcp-write-timeout",
        "--version",
        "--stun",
    ] {
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}[")),
            "{flag} missing:\n{help}"
        );
    }
    let out = Command::new(BIN).args(["-no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).args(["-tcp-write-timeout", "soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration"));
}

/// Every bad flag value exits 2 (before anything starts), naming the flag as typed and the value.
#[test]
fn bad_flag_values_exit_2_naming_the_flag_as_typed() {
    for (args, needles) in [
        (&["-a", "nonsense"][..], &["'-a", "nonsense"][..]),
        (&["-a=:99999"], &["'-a", ":99999"]),
        (&["--a", "1.2.3.4"], &["'--a", "1.2.3.4"]),
        (&["-bogus"], &["'-bogus'"]),
        (&["-stun=maybe"], &["'-stun", "maybe"]),
        (&["-stun-port", "-5"], &["'-stun-port", "-5"]),
        (&["-certmode", "selfsigned"], &["'-certmode", "selfsigned"]),
        (&["-home", "ftp://x/"], &["'-home", "ftp://x/"]),
        (&["-mesh-with", "a.example:notaport"], &["'-mesh-with", "a.example:notaport"]),
        (&["-metrics-addr", "9090"], &["'-metrics-addr", "9090"]),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {needle:?} missing from {err}");
        }
        if !args[0].starts_with("--") {
            let doubled = format!("'-{}", args[0].split('=').next().unwrap());
            assert!(!err.contains(&doubled), "{args:?} echoed with two dashes: {err}");
        }
    }
}

#[test]
fn startup_errors_are_clear() {
    let dir = temp_dir("cli-errors");
    let keyfile = dir.path().join("k.key");
    // gcp (ACME with EAB) on 443 without the EAB flags is refused before binding anything, saying
    // once what is missing.
    let out = Command::new(BIN)
        .args(["-a", "127.0.0.1:443", "-c", keyfile.to_str().unwrap(), "-certmode", "gcp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ACME: -certmode gcp requires -acme-eab-kid and -acme-eab-key\n"), "{err}");
    assert_eq!(err.matches("requires").count(), 1, "{err}");
    // A broken key file is named, with the field.
    std::fs::write(&keyfile, r#"{"PrivateKey":"nope"}"#).unwrap();
    let port = unused_port().to_string();
    let out = Command::new(BIN)
        .args(["-a", &format!("127.0.0.1:{port}"), "-c", keyfile.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(keyfile.to_str().unwrap()) && err.contains("PrivateKey"), "{err}");
    // Manual mode with a DNS hostname and no files names the missing file.
    let out = Command::new(BIN)
        .args(["-a", &format!("127.0.0.1:{port}"), "-certmode", "manual", "-hostname", "derp.example.test"])
        .args(["-certdir", dir.path().to_str().unwrap(), "-c", dir.path().join("k2.key").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("derp.example.test.crt"));
}
