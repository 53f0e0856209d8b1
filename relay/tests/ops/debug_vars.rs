//! derper's `/debug/` index and `/debug/vars` (expvar-style JSON with derper's names), loopback
//! only and never through a proxy.

use crate::http_common;

use http_common::{derp_client, http, plain_relay, STEP};

#[tokio::test]
async fn debug_vars_has_derpers_names_and_live_values() {
    let (server, _) = plain_relay().await;
    let addr = server.local_addr();
    let (mut c, _) = derp_client(addr).await;
    c.send(&derpfleet_proto::msg::ClientToServer::Ping(*b"pingpong")).await.unwrap();
    assert!(c.next_data(STEP).await.unwrap().is_some());
    let r = http(addr, "GET", "/debug/vars", "").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let derp = &v["derp"];
    for name in [
        "accepts",
        "gauge_current_connections",
        "gauge_current_home_connections",
        "gauge_clients_total",
        "gauge_clients_local",
        "gauge_clients_remote",
        "counter_packets_received_kind",
        "average_queue_duration_ms",
        "home_moves_in",
        "home_moves_out",
        "packets_sent",
        "bytes_received",
        "got_ping",
        "sent_pong",
        "counter_buffered_write_frames",
        "version",
    ] {
        assert!(!derp[name].is_null(), "derp.{name} missing: {derp}");
    }
    assert_eq!(derp["accepts"], 1);
    assert_eq!(derp["gauge_current_connections"], 1);
    assert_eq!(derp["gauge_clients_local"], 1);
    assert_eq!(derp["got_ping"], 1);
    for name in
        ["tls_listener", "counter_bootstrap_dns_requests", "process_start_unix_time", "version", "stun"]
    {
        assert!(!v[name].is_null(), "{name} missing: {v}");
    }
    assert_eq!(v["derp_packets_dropped"], "MultiLabelMap");

    let r = http(addr, "GET", "/debug/", "").await;
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("/debug/vars"));
    // Through a proxy: refused, as derper's debug handler.
    let r = http(addr, "GET", "/debug/vars", "X-Forwarded-For: 192.0.2.1\r\n").await;
    assert_eq!(r.status, 403);
    server.shutdown().await;
}

/// derper counts a home move only for an established client (after its first 5 s).
#[tokio::test]
async fn home_moves_count_after_the_initial_announcement() {
    use derpfleet_proto::msg::ClientToServer;
    let (server, _) = plain_relay().await;
    let addr = server.local_addr();
    let (mut c, _) = derp_client(addr).await;
    c.send(&ClientToServer::NotePreferred(true)).await.unwrap();
    let vars = || async {
        let r = http(addr, "GET", "/debug/vars", "").await;
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["derp"].clone()
    };
    // A round trip so the announcement has been read.
    c.send(&ClientToServer::Ping(*b"12345678")).await.unwrap();
    assert!(c.next_data(STEP).await.unwrap().is_some());
    let d = vars().await;
    assert_eq!(
        (d["gauge_current_home_connections"].as_i64(), d["home_moves_in"].as_i64()),
        (Some(1), Some(0))
    );
    tokio::time::sleep(std::time::Duration::from_millis(5200)).await;
    c.send(&ClientToServer::NotePreferred(false)).await.unwrap();
    c.send(&ClientToServer::NotePreferred(true)).await.unwrap();
    c.send(&ClientToServer::Ping(*b"87654321")).await.unwrap();
    assert!(c.next_data(STEP).await.unwrap().is_some());
    let d = vars().await;
    assert_eq!((d["home_moves_out"].as_i64(), d["home_moves_in"].as_i64()), (Some(1), Some(1)));
    server.shutdown().await;
}
