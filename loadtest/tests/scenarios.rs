//! Every scenario against a real `derpfleet-relay` (or `derpfleet-stun`) process on loopback, with
//! short durations; the `--json` document is parsed and its figures checked for sanity.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn throughput_unthrottled_reports_sane_figures() {
    let relay = Relay::plain();
    let url = relay.url();
    let pid = relay.child.id().to_string();
    let v = run_json(
        &[
            "throughput",
            "--url",
            &url,
            "--pairs",
            "2",
            "--size",
            "1200",
            "--duration",
            "1s",
            "--warmup",
            "0.3s",
            "--relay-pid",
            &pid,
        ],
        LIMIT,
    );
    check_common(&v, "throughput");
    let sent = num(&v, &["results", "sent_packets"]);
    let recv = num(&v, &["results", "received_packets"]);
    assert!(recv > 0.0 && sent >= recv, "{v:#}");
    let loss = num(&v, &["results", "loss_pct"]);
    assert!((0.0..=100.0).contains(&loss), "{v:#}");
    let elapsed = num(&v, &["elapsed_s"]);
    assert!(elapsed >= 1.0, "{v:#}");
    let mbps = recv * 1200.0 * 8.0 / elapsed / 1e6;
    assert!((num(&v, &["results", "received_mbps"]) - mbps).abs() <= mbps * 0.002 + 0.01, "{v:#}");
    assert_eq!(num(&v, &["latency_us", "count"]), recv, "{v:#}");
    assert_eq!(v["config"]["pairs"], 2);
    assert!(v["config"]["rate_per_sender"].is_null());
    assert!(!v["timeline"].as_array().unwrap().is_empty());
    // The relay did work relaying, and so did we.
    assert!(num(&v, &["results", "relay_cpu_s"]) > 0.0, "{v:#}");
    assert!(num(&v, &["results", "relay_cpu_us_per_event"]) > 0.0, "{v:#}");
    assert!(num(&v, &["results", "loadtest_cpu_s"]) > 0.0, "{v:#}");
}

#[test]
fn throughput_at_a_rate_delivers_the_schedule_and_plots() {
    let relay = Relay::plain();
    let url = relay.url();
    let dir = TempDir::new("plot");
    let svg = dir.0.join("t.svg");
    let v = run_json(
        &[
            "throughput",
            "--url",
            &url,
            "--pairs",
            "2",
            "--size",
            "200",
            "--rate",
            "200",
            "--duration",
            "1s",
            "--warmup",
            "0.2s",
            "--plot",
            svg.to_str().unwrap(),
        ],
        LIMIT,
    );
    check_common(&v, "throughput");
    // 2 senders × 200/s × 1 s, by schedule: exactly 400 packets fall in the window.
    assert_eq!(num(&v, &["results", "sent_packets"]), 400.0, "{v:#}");
    assert!(num(&v, &["results", "loss_pct"]) < 5.0, "{v:#}");
    assert!(num(&v, &["results", "send_lag_p50_us"]) >= 0.0);
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.contains("polyline"), "{s}");
}

#[test]
fn pingpong_measures_round_trips_and_plots_their_distribution() {
    let relay = Relay::plain();
    let url = relay.url();
    let dir = TempDir::new("plot");
    let svg = dir.0.join("rtt.svg");
    let v = run_json(
        &[
            "pingpong",
            "--url",
            &url,
            "--pairs",
            "3",
            "--size",
            "100",
            "--duration",
            "1s",
            "--warmup",
            "0.2s",
            "--plot",
            svg.to_str().unwrap(),
        ],
        LIMIT,
    );
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.contains("latency distribution") && s.contains("99.9%"), "{s}");
    check_common(&v, "pingpong");
    let rounds = num(&v, &["results", "round_trips"]);
    assert!(rounds > 0.0, "{v:#}");
    assert_eq!(num(&v, &["latency_us", "count"]), rounds);
    assert!(num(&v, &["results", "loss_pct"]) <= 100.0);
}

#[test]
fn connections_opens_all_from_several_sources_and_reads_relay_memory() {
    let relay = Relay::plain();
    let url = relay.url();
    let pid = relay.child.id().to_string();
    let v = run_json(
        &[
            "connections",
            "--url",
            &url,
            "--count",
            "60",
            "--source-ips",
            "127.0.0.2-127.0.0.4",
            "--relay-pid",
            &pid,
            "--hold",
            "0.2s",
        ],
        LIMIT,
    );
    check_common(&v, "connections");
    assert_eq!(num(&v, &["results", "opened"]), 60.0, "{v:#}");
    assert_eq!(num(&v, &["results", "failed"]), 0.0, "{v:#}");
    assert_eq!(num(&v, &["config", "source_ips"]), 3.0);
    assert!(num(&v, &["results", "handshakes_per_s"]) > 0.0);
    assert!(num(&v, &["results", "relay_rss_after_kib"]) > 0.0, "{v:#}");
    assert!(v["results"]["relay_bytes_per_conn"].is_number(), "{v:#}");
    assert_eq!(num(&v, &["latency_us", "count"]), 60.0);
}

#[test]
fn churn_connects_and_disconnects_at_a_rate() {
    let relay = Relay::plain();
    let url = relay.url();
    let v = run_json(
        &["churn", "--url", &url, "--rate", "50", "--duration", "1s", "--source-ips", "127.0.0.5,127.0.0.6"],
        LIMIT,
    );
    check_common(&v, "churn");
    let attempted = num(&v, &["results", "attempted"]);
    assert!((45.0..=50.0).contains(&attempted), "{v:#}");
    assert_eq!(num(&v, &["results", "succeeded"]), attempted, "{v:#}");
    assert_eq!(num(&v, &["results", "failed"]), 0.0);
    assert_eq!(num(&v, &["latency_us", "count"]), attempted);
}

#[test]
fn mesh_spreads_pairs_over_the_urls() {
    let relay = Relay::plain();
    let a = relay.url();
    let b = format!("http://localhost:{}/derp", relay.addr.port());
    let v = run_json(
        &["mesh", "--url", &a, "--url", &b, "--pairs", "2", "--rate", "100", "--duration", "1s"],
        LIMIT,
    );
    check_common(&v, "mesh");
    assert_eq!(v["targets"].as_array().unwrap().len(), 2);
    assert!(num(&v, &["results", "received_packets"]) > 0.0, "{v:#}");
}

#[test]
fn fleet_over_tls_regions_of_a_derp_map_and_https_url() {
    let relay = Relay::tls();
    let port = relay.addr.port();
    let dir = TempDir::new("map");
    let node = |r: u32| {
        format!(
            r#"{{"Name":"{r}a","RegionID":{r},"HostName":"127.0.0.1","IPv4":"127.0.0.1","IPv6":"none","DERPPort":{port},"InsecureForTests":true}}"#
        )
    };
    let map = format!(
        r#"{{"Regions":{{"1":{{"RegionID":1,"RegionCode":"one","Nodes":[{}]}},"2":{{"RegionID":2,"RegionCode":"two","Nodes":[{}]}}}}}}"#,
        node(1),
        node(2)
    );
    let path = dir.0.join("map.json");
    std::fs::write(&path, map).unwrap();
    let p = path.to_str().unwrap();
    let v = run_json(&["fleet", "--derp-map", p, "--pairs", "2", "--rate", "100", "--duration", "1s"], LIMIT);
    check_common(&v, "fleet");
    assert_eq!(v["targets"].as_array().unwrap().len(), 2, "{v:#}");
    assert!(num(&v, &["results", "received_packets"]) > 0.0, "{v:#}");

    let url = format!("https://127.0.0.1:{port}/derp");
    let v =
        run_json(&["throughput", "--url", &url, "--insecure", "--rate", "100", "--duration", "0.5s"], LIMIT);
    assert!(num(&v, &["results", "received_packets"]) > 0.0, "{v:#}");
    let v =
        run_json(&["connections", "--derp-map", p, "--region", "2", "--count", "5", "--hold", "0s"], LIMIT);
    assert_eq!(num(&v, &["results", "opened"]), 5.0, "{v:#}");
}

#[test]
fn stun_at_a_rate_and_unthrottled() {
    let stun = Stun::spawn();
    let server = stun.addr.to_string();
    let v = run_json(
        &["stun", "--server", &server, "--rate", "400", "--sockets", "2", "--duration", "1s"],
        LIMIT,
    );
    check_common(&v, "stun");
    assert_eq!(num(&v, &["results", "sent"]), 400.0, "{v:#}");
    assert!(num(&v, &["results", "answered"]) > 0.0, "{v:#}");
    assert_eq!(num(&v, &["results", "invalid"]), 0.0);
    let v = run_json(
        &["stun", "--server", &server, "--sockets", "2", "--window", "4", "--duration", "0.5s"],
        LIMIT,
    );
    check_common(&v, "stun");
    assert!(num(&v, &["results", "answered"]) > 0.0, "{v:#}");
    assert!(num(&v, &["results", "loss_pct"]) <= 100.0);
}

#[test]
fn sigint_ends_the_run_early_with_a_report() {
    let relay = Relay::plain();
    let url = relay.url();
    let mut cmd = loadtest();
    cmd.args(["throughput", "--url", &url, "--rate", "100", "--duration", "60s", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = derpfleet_e2e::Child::spawn(cmd, "derpfleet-loadtest").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    child.signal("INT");
    let status = child.wait_timeout(Duration::from_secs(15)).expect("loadtest did not stop on SIGINT");
    assert!(status.success(), "{status}");
    let mut out = String::new();
    std::io::Read::read_to_string(child.inner().stdout.as_mut().unwrap(), &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["notes"].to_string().contains("interrupted"), "{v:#}");
    assert!(num(&v, &["elapsed_s"]) < 30.0, "{v:#}");
}

#[test]
fn connections_and_churn_over_websocket() {
    let relay = Relay::plain();
    let url = relay.url();
    let v = run_json(&["connections", "--url", &url, "--websocket", "--count", "20", "--hold", "0s"], LIMIT);
    check_common(&v, "connections");
    assert_eq!(v["config"]["websocket"], true);
    assert_eq!(num(&v, &["results", "opened"]), 20.0, "{v:#}");
    let v = run_json(&["churn", "--url", &url, "--websocket", "--rate", "20", "--duration", "0.5s"], LIMIT);
    check_common(&v, "churn");
    assert_eq!(num(&v, &["results", "failed"]), 0.0, "{v:#}");
    assert!(num(&v, &["results", "succeeded"]) >= 9.0, "{v:#}");
}
