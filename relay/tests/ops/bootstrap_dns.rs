//! `/bootstrap-dns` with the real binary, as derper's: the published map for
//! `-bootstrap-dns-names`, `?q=` for `-unpublished-bootstrap-dns-names`, `Connection: close`,
//! derper's counter names, on the main and the HTTP port, and still with `-derp=false`.

use crate::http_common;
use crate::ops_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_common::{http, temp_dir, HttpResp};
use ops_common::*;

/// GETs `path` until the body is non-empty (names resolve in the background after start).
async fn bootstrap(addr: SocketAddr, path: &str) -> HttpResp {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http(addr, "GET", path, "").await;
        if !r.body.is_empty() || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn json(r: &HttpResp) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&r.body)))
}

#[tokio::test]
async fn published_names_are_served_as_derpers_json() {
    let dir = temp_dir("bootstrap-pub");
    let metrics = format!("127.0.0.1:{}", unused_port());
    let (p, addr) = start_plain_relay(
        &dir.path().join("k.key"),
        &["-bootstrap-dns-names", "localhost", "-metrics-addr", &metrics],
    );
    let r = bootstrap(addr, "/bootstrap-dns").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("connection"), Some("close"));
    let v = json(&r);
    let ips: Vec<&str> = v["localhost"].as_array().unwrap().iter().map(|ip| ip.as_str().unwrap()).collect();
    assert!(ips.contains(&"127.0.0.1"), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 1);
    // Go's MarshalIndent with a tab.
    assert!(String::from_utf8_lossy(&r.body).starts_with("{\n\t\"localhost\": [\n\t\t\""), "{:?}", r.body);
    // A ?q= for a published name: the full published map, counted as a published hit.
    let r = http(addr, "GET", "/bootstrap-dns?q=localhost", "").await;
    assert_eq!(json(&r), v);
    let m = wait_metric(metrics.parse().unwrap(), "counter_bootstrap_dns_published_hits", &[], 1.0).await;
    assert!(m.get("counter_bootstrap_dns_requests", &[]) >= 2.0);
    drop(p);
}

#[tokio::test]
async fn unpublished_names_answer_only_to_q() {
    let dir = temp_dir("bootstrap-unpub");
    let metrics = format!("127.0.0.1:{}", unused_port());
    let (_p, addr) = start_plain_relay(
        &dir.path().join("k.key"),
        &["-unpublished-bootstrap-dns-names", "localhost", "-metrics-addr", &metrics],
    );
    let r = bootstrap(addr, "/bootstrap-dns?q=localhost").await;
    assert_eq!(r.status, 200);
    let v = json(&r);
    assert!(v["localhost"].as_array().unwrap().iter().any(|ip| ip == "127.0.0.1"), "{v}");
    // Not in the published list: a plain request gets derper's empty answer.
    let r = http(addr, "GET", "/bootstrap-dns", "").await;
    assert_eq!((r.status, r.body.len()), (200, 0));
    // An unknown name counts as an unpublished miss and gets the (empty) published map.
    let r = http(addr, "GET", "/bootstrap-dns?q=nothing.invalid", "").await;
    assert_eq!((r.status, r.body.len()), (200, 0));
    let m = wait_metric(metrics.parse().unwrap(), "counter_bootstrap_dns_unpublished_misses", &[], 1.0).await;
    assert!(m.get("counter_bootstrap_dns_unpublished_hits", &[]) >= 1.0);
}

#[tokio::test]
async fn keeps_serving_with_derp_false_on_main_and_http_ports() {
    let dir = temp_dir("bootstrap-noderp");
    let key = dir.path().join("k.key");
    let certdir = dir.path().join("certs");
    let port = unused_port();
    let http_port = unused_port();
    let a = format!("127.0.0.1:{port}");
    let p = Proc::start_without_stun(&[
        "-a",
        &a,
        "-c",
        key.to_str().unwrap(),
        "-derp=false",
        "-certmode",
        "manual",
        "-hostname",
        "127.0.0.1",
        "-certdir",
        certdir.to_str().unwrap(),
        "-http-port",
        &http_port.to_string(),
        "-metrics-addr=",
        "-bootstrap-dns-names",
        "localhost",
    ]);
    p.wait_for_line("derpfleet-relay running");
    // The plain-HTTP port.
    let port80: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let r = bootstrap(port80, "/bootstrap-dns").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(json(&r)["localhost"].as_array().unwrap().iter().any(|ip| ip == "127.0.0.1"));
    // The TLS main port: bootstrap DNS answers, /derp says the DERP server is disabled.
    let line = p.wait_for_line("sha256-raw:");
    let node: serde_json::Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
    let pin = http_common::pin_of(node["CertName"].as_str().unwrap());
    let request = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
    };
    let main: SocketAddr = a.parse().unwrap();
    let over_tls = |req: Vec<u8>| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let client = http_common::pinned_client(pin, rustls::DEFAULT_VERSIONS);
        let mut s = http_common::tls_connect(main, client).await.unwrap();
        s.write_all(&req).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
        http_common::parse_response(&out)
    };
    let r = over_tls(request("/bootstrap-dns")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(json(&r)["localhost"].as_array().unwrap().iter().any(|ip| ip == "127.0.0.1"));
    let r = over_tls(request("/derp")).await;
    assert_eq!(r.status, 404);
    assert_eq!(String::from_utf8_lossy(&r.body), "derp server disabled\n");
}
