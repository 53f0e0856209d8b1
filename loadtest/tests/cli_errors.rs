//! Bad arguments are refused with a clear message and exit code 2; a run that cannot connect
//! fails with exit code 1 and says why.

mod common;

use std::time::Duration;

use common::*;

fn refused(args: &[&str], needle: &str) {
    let out = run(args, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {}\n{err}", out.status);
    assert!(err.contains(needle), "{args:?}: expected {needle:?} in:\n{err}");
    assert!(out.stdout.is_empty(), "{args:?} printed a report");
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let u = "http://127.0.0.1:9/derp";
    refused(&["throughput"], "no target");
    refused(&["throughput", "--url", u, "--size", "10"], "--size");
    refused(&["throughput", "--url", u, "--rate", "0"], "--rate");
    refused(&["throughput", "--url", u, "--pairs", "0"], "--pairs");
    refused(&["throughput", "--url", u, "--duration", "soon"], "--duration");
    refused(&["warp", "--url", u], "warp");
    refused(&["throughput", "--url", "ftp://x/derp"], "scheme");
    refused(&["many", "--url", u, "--rate", "0"], "--rate");
    refused(&["throughput", "--url", u, "--metrics-url", "https://127.0.0.1:1/metrics"], "--metrics-url");
    refused(&["floor", "--duration", "0s"], "--duration");
    refused(&["floor", "--connections", "0"], "--connections");
    refused(&["floor", "--connections", "9001"], "--connections");
    refused(&["connections", "--url", u, "--source-ips", "127.0.0.9-127.0.0.2"], "--source-ips");
    refused(&["stun"], "--server");
    refused(&["fleet", "--url", u], "--derp-map");
    refused(&["throughput", "--derp-map", "/nonexistent/map.json", "--region", "1"], "/nonexistent/map.json");
}

#[test]
fn bad_plot_path_and_dead_relay_pid_are_refused_before_the_run() {
    // The URL has nobody listening: had the run started, it would fail with exit 1 instead.
    let u = "http://127.0.0.1:9/derp";
    refused(
        &["throughput", "--url", u, "--plot", "/nonexistent-dir/chart.svg"],
        "--plot /nonexistent-dir/chart.svg",
    );
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id().to_string();
    gone.wait().unwrap();
    refused(&["many", "--url", u, "--relay-pid", &pid], &format!("--relay-pid {pid}"));
    refused(&["connections", "--url", u, "--relay-pid", "4294967295"], "--relay-pid 4294967295");
}

#[test]
fn derp_map_needs_a_known_region() {
    let dir = TempDir::new("map");
    let p = dir.0.join("m.json");
    std::fs::write(&p, r#"{"Regions":{"1":{"RegionID":1,"RegionCode":"x","Nodes":[{"Name":"1a","RegionID":1,"HostName":"127.0.0.1"}]}}}"#)
        .unwrap();
    let p = p.to_str().unwrap();
    refused(&["throughput", "--derp-map", p], "--region");
    refused(&["throughput", "--derp-map", p, "--region", "7"], "not in the DERP map");
}

#[test]
fn unreachable_server_fails_with_exit_1() {
    // A port nobody listens on (outside the ephemeral range, so nothing takes it meanwhile).
    let port = derpfleet_e2e::ports::unused_port();
    let url = format!("http://127.0.0.1:{port}/derp");
    for args in [
        vec!["throughput", "--url", &url, "--duration", "1s"],
        vec!["connections", "--url", &url, "--count", "3"],
    ] {
        let out = run(&args, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        // connections reports failures in its document; throughput cannot start at all.
        if args[0] == "throughput" {
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(err.contains("error:") && err.contains("connect"), "{err}");
        } else {
            assert!(out.status.success(), "{err}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["results"]["failed"], 3, "{v:#}");
            assert!(v["results"]["errors"].to_string().contains("connecting"), "{v:#}");
        }
    }
}

#[test]
fn floor_over_more_connections_than_the_file_limit_allows_is_refused_clearly() {
    // Hard and soft limit 256: 500 connections need about 1 000 descriptors.
    let bin = env!("CARGO_BIN_EXE_derpfleet-loadtest");
    let out = std::process::Command::new("bash")
        .args(["-c", "ulimit -n 256 && exec \"$0\" floor --duration 0.1s --connections 500"])
        .arg(bin)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("500 connections need 1032 open files") && err.contains("256"), "{err}");
}

#[test]
fn help_lists_every_scenario() {
    let out = loadtest().arg("--help").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for name in ["throughput", "pingpong", "connections", "churn", "mesh", "fleet", "stun", "many", "floor"] {
        assert!(s.contains(name), "{name} missing from --help:\n{s}");
    }
}
