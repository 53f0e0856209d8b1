//! End to end with Debian's real `prometheus`: it scrapes two relays and the prober (1 s scrape
//! and evaluation intervals) with the shipped rules, one relay is killed, and the `DerpNodeDown`
//! alert for that node becomes firing in `/api/v1/alerts` (bounded wait).
//!
//! The only change to the shipped rules file is that every `for:` becomes 3 s, so the test does
//! not wait minutes; the `for:` values themselves are covered by the promtool unit tests.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{http_get, unused_port, wait_until, Fleet, Proc};
use serde_json::Value;

fn alerts(addr: std::net::SocketAddr) -> Vec<Value> {
    let Some((200, body)) = http_get(addr, "/api/v1/alerts") else { return Vec::new() };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["data"]["alerts"].as_array().cloned().unwrap_or_default()
}

fn firing(alerts: &[Value], name: &str, node: &str) -> bool {
    alerts
        .iter()
        .any(|a| a["labels"]["alertname"] == name && a["labels"]["node"] == node && a["state"] == "firing")
}

#[test]
fn prometheus_fires_node_down_when_a_relay_is_killed() {
    let mut fleet = Fleet::start("prom");
    let dir = fleet.dir.path().to_path_buf();
    let probe_port = unused_port();
    let probe_addr = std::net::SocketAddr::from(([127, 0, 0, 1], probe_port));
    let log = std::fs::File::create(dir.join("probe.log")).unwrap();
    let child = fleet
        .prober()
        .args(["-derp-map", &fleet.map_url(), "-listen", &format!("127.0.0.1:{probe_port}"), "-spread=false"])
        .args(["-interval", "1s", "-mesh-interval", "1s", "-stun-interval", "1s", "-tls-interval", "1s"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _prober = Proc { child, what: "prober".into() };

    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability/derpfleet-rules.yml"),
    )
    .unwrap();
    let fast: String = rules
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for: ") {
                format!("{}for: 3s", &l[..l.len() - l.trim_start().len()])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(fast.matches("for: 3s").count() >= 8);
    std::fs::write(dir.join("rules.yml"), fast).unwrap();
    let targets = |addrs: Vec<String>| addrs.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(", ");
    let relays = targets(fleet.relays[..2].iter().map(|r| r.metrics_addr().to_string()).collect());
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n  scrape_timeout: 900ms\nrule_files:\n  - rules.yml\n\
         scrape_configs:\n  - job_name: derpfleet-relay\n    static_configs:\n      - targets: [{relays}]\n\
         \x20 - job_name: derpfleet-probe\n    static_configs:\n      - targets: ['{probe_addr}']\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let prom_port = unused_port();
    let prom_addr = std::net::SocketAddr::from(([127, 0, 0, 1], prom_port));
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (Debian package prometheus) runs");
    let _prom = Proc { child, what: "prometheus".into() };
    wait_until(Duration::from_secs(30), "prometheus ready", || {
        http_get(prom_addr, "/-/ready").is_some_and(|(s, _)| s == 200)
    });

    // All three targets scraped and the rules loaded; the dead region's node is already down.
    wait_until(Duration::from_secs(30), "targets up", || {
        let Some((200, body)) = http_get(prom_addr, "/api/v1/query?query=sum(up)") else { return false };
        body.contains("\"3\"")
    });
    wait_until(Duration::from_secs(30), "DerpNodeDown for the dead region", || {
        firing(&alerts(prom_addr), "DerpNodeDown", "3a")
    });
    // Healthy nodes do not alert (after the prober had time to probe them several times).
    std::thread::sleep(Duration::from_secs(4));
    let before = alerts(prom_addr);
    assert!(
        !before.iter().any(|a| a["labels"]["node"] == "1b"),
        "nothing about 1b before the kill: {before:?}"
    );

    fleet.relays[1].proc.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !firing(&alerts(prom_addr), "DerpNodeDown", "1b") {
        if std::time::Instant::now() > deadline {
            let probe_metrics = http_get(probe_addr, "/metrics").map(|(_, b)| b).unwrap_or_default();
            let derp: Vec<&str> =
                probe_metrics.lines().filter(|l| l.starts_with("derpprobe_result")).collect();
            let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "DerpNodeDown for 1b not firing within 60 s; alerts: {:?}\nraw: {:?}\nprober: {derp:#?}\nprometheus log (last lines first): {tail:#?}",
                alerts(prom_addr),
                http_get(prom_addr, "/api/v1/alerts")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_until(Duration::from_secs(30), "DerpMeshPairBroken 1a -> 1b", || {
        alerts(prom_addr).iter().any(|a| {
            a["labels"]["alertname"] == "DerpMeshPairBroken"
                && a["labels"]["node"] == "1a"
                && a["labels"]["peer"] == "1b"
                && a["state"] == "firing"
        })
    });
    wait_until(Duration::from_secs(30), "DerpRelayScrapeDown for the killed relay", || {
        alerts(prom_addr).iter().any(|a| {
            a["labels"]["alertname"] == "DerpRelayScrapeDown"
                && a["labels"]["instance"] == fleet.relays[1].metrics_addr().to_string()
                && a["state"] == "firing"
        })
    });
    assert!(!firing(&alerts(prom_addr), "DerpNodeDown", "1a"), "the surviving node stays up");
}
