//! The shipped Prometheus rules and Grafana dashboard, checked with Debian's real `promtool`:
//! `check rules` on the rules, their unit tests (`test rules`), and every dashboard expression
//! parsed by wrapping it in a recording rule. Every `derpprobe_*` name they use must be one the
//! prober exports.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn observability() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability")
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package prometheus) runs");
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let dir = observability();
    let (ok, text) = promtool(&["check", "rules", "derpfleet-rules.yml"], &dir);
    assert!(ok && text.contains("SUCCESS: 15 rules found"), "{text}");
    let (ok, text) = promtool(&["test", "rules", "tests/derpfleet-rules.test.yml"], &dir);
    assert!(ok && text.contains("SUCCESS"), "{text}");
    // The same check refuses a broken rule (so a pass above means something).
    let tmp = common::temp_dir("promtool-bad");
    let bad = std::fs::read_to_string(dir.join("derpfleet-rules.yml")).unwrap().replace(
        "max by (region, node) (derpprobe_result{class=\"derp\"}) == 0",
        "max by (region, node (derpprobe_result == 0",
    );
    std::fs::write(tmp.path().join("bad.yml"), bad).unwrap();
    let (ok, text) = promtool(&["check", "rules", "bad.yml"], tmp.path());
    assert!(!ok, "a broken expression must fail: {text}");
}

/// Every `expr` in the dashboard, with Grafana's template variables replaced by values.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(observability().join("grafana-dashboard.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&doc, &mut out);
    out.into_iter()
        .map(|e| e.replace("$__rate_interval", "5m").replace("${region}", ".*").replace("$region", ".*"))
        .collect()
}

#[test]
fn every_dashboard_expression_parses() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "relay and prober panels: {exprs:?}");
    let tmp = common::temp_dir("dash");
    let rules = |exprs: &[String]| {
        let mut y = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (i, e) in exprs.iter().enumerate() {
            y.push_str(&format!(
                "      - record: dashboard:expr_{i}\n        expr: {}\n",
                serde_json::to_string(e).unwrap()
            ));
        }
        y
    };
    std::fs::write(tmp.path().join("dash.yml"), rules(&exprs)).unwrap();
    let (ok, text) = promtool(&["check", "rules", "dash.yml"], tmp.path());
    assert!(ok && text.contains(&format!("SUCCESS: {} rules found", exprs.len())), "{text}");
    let mut broken = exprs.clone();
    broken.push("rate(derp_packets_received[5m]".into());
    std::fs::write(tmp.path().join("broken.yml"), rules(&broken)).unwrap();
    assert!(!promtool(&["check", "rules", "broken.yml"], tmp.path()).0, "an unparsable expression must fail");
}

#[test]
fn rules_and_dashboard_use_only_series_the_prober_exports() {
    let exported = derpfleet_probe_series();
    let mut text = std::fs::read_to_string(observability().join("derpfleet-rules.yml")).unwrap();
    text.push_str(&dashboard_exprs().join("\n"));
    let mut used: Vec<String> = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("derpprobe_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        used.push(name);
    }
    assert!(used.len() > 10);
    for name in used {
        assert!(exported.contains(&name), "{name} is used but not exported (exported: {exported:?})");
    }
}

/// The series names the prober's /metrics declares (every family has its `# TYPE` line even
/// before any probe ran).
fn derpfleet_probe_series() -> Vec<String> {
    let text = derpfleet_probe::metrics::render(&derpfleet_probe::results::Results::new());
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}
