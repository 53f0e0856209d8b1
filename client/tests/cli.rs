//! The `derpfleet-client` binary: netcheck output and map errors.

mod support;

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_derpfleet-client"))
}

fn write_map(name: &str, json: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("derpfleet-cli-{}-{name}.json", std::process::id()));
    std::fs::write(&p, json).unwrap();
    p
}

#[test]
fn bad_maps_are_rejected_naming_the_culprit() {
    let cases = [
        ("zero", r#"{"Regions":{"0":{"RegionID":0,"Nodes":[]}}}"#, "region 0"),
        (
            "dup",
            r#"{"Regions":{"1":{"RegionID":1,"Nodes":[{"Name":"x","RegionID":1,"HostName":"a.example"}]},
                           "2":{"RegionID":2,"Nodes":[{"Name":"x","RegionID":2,"HostName":"b.example"}]}}}"#,
            "node \"x\": duplicate Name",
        ),
        (
            "cert",
            r#"{"Regions":{"1":{"RegionID":1,"Nodes":[{"Name":"1a","RegionID":1,"HostName":"a.example","CertName":"sha256-raw:nothex"}]}}}"#,
            "CertName \"sha256-raw:nothex\"",
        ),
    ];
    for (name, json, want) in cases {
        let p = write_map(name, json);
        let out = bin().args(["netcheck", "--derp-map", p.to_str().unwrap()]).output().unwrap();
        let _ = std::fs::remove_file(&p);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert!(err.contains(want), "{name}: {err}");
    }
}

#[test]
fn netcheck_prints_a_tailscale_style_report() {
    // One region whose STUN server answers both runs (3 tries each), on loopback.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let responder = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let mut answered = 0;
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let Ok(txid) = derpfleet_stun::message::parse_tailscale_request(&buf[..n]) {
                let _ = sock.send_to(&derpfleet_stun::message::build_response(txid, from), from);
                answered += 1;
                if answered == 6 {
                    break;
                }
            }
        }
    });
    let map = format!(
        r#"{{"Regions":{{"900":{{"RegionID":900,"RegionCode":"lo","RegionName":"Loopback","Nodes":[
            {{"Name":"900a","RegionID":900,"HostName":"127.0.0.1","IPv4":"127.0.0.1","IPv6":"none","STUNPort":{port}}}]}}}}}}"#
    );
    let p = write_map("ok", &map);
    let out = bin().args(["netcheck", "--derp-map", p.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    for want in ["Report:", "* UDP: true", "* IPv4: yes, 127.0.0.1:", "* Nearest DERP: Loopback", "- lo: "] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let out = bin().args(["netcheck", "--derp-map", p.to_str().unwrap(), "--json"]).output().unwrap();
    let _ = std::fs::remove_file(&p);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["PreferredDERP"], 900);
    assert!(v["RegionLatency"]["900"].as_u64().unwrap() > 0);
    responder.join().unwrap();
}

#[tokio::test]
async fn connect_trusts_the_system_store_via_ssl_cert_file() {
    let tls = support::Tls::tls13();
    let s = support::TestServer::start(tls).await;
    let ca = std::env::temp_dir().join(format!("derpfleet-cli-{}-ca.pem", std::process::id()));
    std::fs::write(&ca, s.leaf_pem.as_ref().unwrap()).unwrap();
    let url = format!("https://127.0.0.1:{}/derp", s.addr.port());
    let run = |with_ca: bool| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_derpfleet-client"));
        c.args(["connect", "--url", &url, "--ping", "1"]).env_remove("SSL_CERT_DIR");
        if with_ca {
            c.env("SSL_CERT_FILE", &ca);
        } else {
            c.env("SSL_CERT_FILE", "/nonexistent");
        }
        c.output()
    };
    let ok = run(true).await.unwrap();
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out} {}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.contains("fast start: true") && out.contains("pong 0:"), "{out}");
    let bad = run(false).await.unwrap();
    let _ = std::fs::remove_file(&ca);
    assert!(!bad.status.success(), "an untrusted self-signed certificate was accepted");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("TLS"), "{}", String::from_utf8_lossy(&bad.stderr));
}
