//! The TOML config file with the real binary: settings apply, flags override them, and a bad
//! file stops the start naming the file, the line, the key and the reason.

use crate::http_common;
use crate::ops_common;

use std::net::SocketAddr;
use std::process::Command;

use http_common::temp_dir;
use ops_common::*;

#[tokio::test]
async fn config_file_applies_and_flags_override_it() {
    let dir = temp_dir("ops-config");
    let (file_port, flag_port, metrics_port) = (unused_port(), unused_port(), unused_port());
    let toml = dir.path().join("relay.toml");
    std::fs::write(
        &toml,
        format!(
            "# derpfleet-relay settings\na = \"127.0.0.1:{file_port}\"\nc = \"{}\"\nstun = false\n\
             home = \"blank\"\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\ndrain-timeout = \"2s\"\n",
            dir.path().join("k.key").display()
        ),
    )
    .unwrap();
    let flag_a = format!("127.0.0.1:{flag_port}");
    let mut p = Proc::start(&["-config", toml.to_str().unwrap(), "-a", &flag_a]);
    p.wait_for_line("derpfleet-relay running");
    let addr: SocketAddr = flag_a.parse().unwrap();
    let (status, body) = get(addr, "/").await;
    assert_eq!((status, body.as_str()), (200, ""), "home = blank from the file");
    let (status, body) = get(format!("127.0.0.1:{metrics_port}").parse().unwrap(), "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", file_port)).is_err(),
        "the flag's -a replaced the file's"
    );
    p.signal("-TERM");
    assert!(p.wait_exit(WAIT).expect("exits").success(), "{}", p.log());
}

#[test]
fn bad_config_names_file_line_key_and_reason() {
    let dir = temp_dir("ops-config-bad");
    let toml = dir.path().join("bad.toml");
    std::fs::write(&toml, "a = \"127.0.0.1:0\"\n\nstun-port = \"lots\"\n").unwrap();
    let out = Command::new(BIN).args(["-config", toml.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [toml.to_str().unwrap(), "line 3", "stun-port", "lots"] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    std::fs::write(&toml, "stun = true\nverify-client-url = \"ftp://x/\"\n").unwrap();
    let out = Command::new(BIN).args(["-config", toml.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("line 2") && err.contains("verify-client-url") && err.contains("scheme"), "{err}");
    std::fs::write(&toml, "no-such-flag = 1\n").unwrap();
    let out = Command::new(BIN).args(["-config", toml.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1") && err.contains("no-such-flag") && err.contains("unknown key"), "{err}");
    let missing = dir.path().join("missing.toml");
    let out = Command::new(BIN).args(["-config", missing.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("missing.toml"), "{err}");
}

/// A value of the wrong TOML type stops the start (exit 2) with file, line, key and reason; it is
/// not converted.
#[test]
fn wrong_toml_types_are_rejected() {
    let dir = temp_dir("ops-config-types");
    let toml = dir.path().join("types.toml");
    for (text, line, key, reason) in [
        ("stun-port = \"3478\"\n", "line 1", "stun-port", "expected an integer"),
        ("a = \"127.0.0.1:0\"\nhostname = 123\n", "line 2", "hostname", "expected a string"),
        ("hostname = [\"a.example\"]\n", "line 1", "hostname", "found an array"),
    ] {
        std::fs::write(&toml, text).unwrap();
        let out = Command::new(BIN).args(["-config", toml.to_str().unwrap()]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {err}");
        for needle in [toml.to_str().unwrap(), line, key, reason] {
            assert!(err.contains(needle), "{text:?}: {needle:?} missing from: {err}");
        }
    }
}
