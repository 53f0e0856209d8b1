//! derper's debug pages: `/debug/` (an index) and `/debug/vars` (expvar-style JSON), next to the
//! Prometheus text of `/debug/varz` and `/metrics`. The HTTP layer serves them to loopback clients
//! only, never through a proxy (`http::debug_allowed`), as derper limits debug access.
//!
//! `/debug/vars` has derper's top-level names (`derp`, `tls_listener`, `stun`,
//! `counter_bootstrap_dns_*`, `process_start_unix_time`, `counter_uptime_sec`, `version`,
//! `cmdline`) and, in `derp`, the names of derper's `Server.ExpVar` (`accepts`,
//! `gauge_current_connections`, `counter_packets_received_kind`, `home_moves_in`, …), all read
//! from the same series as `/metrics`. derper's label maps published only for Prometheus
//! (`derp_packets_dropped`, `derp_bytes_dropped`) show the literal `"MultiLabelMap"`, as Go's do.
//! Names derper has and this relay does not are listed, with the reason, in docs/operators.md.
//! Decision: `average_queue_duration_ms` is the mean send-queue wait since start (derper keeps a
//! moving average of the same wait); `counter_buffered_write_frames` is the frames-per-flush
//! histogram with Go's per-bucket (not cumulative) counts.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::core::metrics::MetricsSnapshot;
use crate::ops::bootstrap_dns::BootstrapDns;
use crate::ops::metrics_http::Status;

/// The parsed metrics text, with the lookups derper's expvar layout needs.
struct Samples(MetricsSnapshot);

impl Samples {
    fn get(&self, name: &str) -> f64 {
        self.0.get(name, &[])
    }

    fn by_label(&self, name: &str, label: &str) -> Map<String, Value> {
        let mut m = Map::new();
        for (labels, value) in self.0.series_named(name) {
            if let Some((_, v)) = labels.iter().find(|(k, _)| k == label) {
                m.insert(v.clone(), int(value));
            }
        }
        m
    }

    /// Go's `metrics.Histogram` JSON from a Prometheus histogram: per-bucket counts, sum, count.
    fn histogram(&self, name: &str) -> Value {
        let bucket = format!("{name}_bucket");
        let mut cumulative: Vec<(String, f64)> = self
            .0
            .series_named(&bucket)
            .filter_map(|(labels, v)| labels.iter().find(|(k, _)| k == "le").map(|(_, le)| (le.clone(), v)))
            .collect();
        cumulative.sort_by(|a, b| le_value(&a.0).total_cmp(&le_value(&b.0)));
        let mut m = Map::new();
        let mut prev = 0.0;
        for (le, c) in cumulative {
            if le != "+Inf" {
                m.insert(le, int(c - prev));
            }
            prev = c;
        }
        m.insert("sum".into(), int(self.get(&format!("{name}_sum"))));
        m.insert("count".into(), int(self.get(&format!("{name}_count"))));
        Value::Object(m)
    }
}

fn le_value(le: &str) -> f64 {
    le.parse().unwrap_or(f64::INFINITY)
}

/// A counter or gauge as a JSON integer (they are whole numbers).
fn int(v: f64) -> Value {
    json!(v.round() as i64)
}

/// The `/debug/vars` JSON of one relay.
pub(crate) fn vars(status: &Status, bootstrap: &BootstrapDns, rate_limit_enabled: bool) -> String {
    let s = Samples(MetricsSnapshot::parse(&status.render_metrics()));
    let registry = status.derp.registry();
    let local = registry.key_count();
    let remote = registry.forwarded_key_count();
    let mut derp = Map::new();
    let mut put = |k: &str, v: Value| {
        derp.insert(k.to_owned(), v);
    };
    put("gauge_watchers", int(s.get("derp_watchers")));
    put("gauge_current_file_descriptors", int(s.get("derp_current_file_descriptors")));
    put("gauge_current_connections", int(s.get("derp_current_connections")));
    put("gauge_current_home_connections", int(s.get("derp_current_home_connections")));
    put("gauge_current_notideal_connections", int(s.get("derp_current_notideal_connections")));
    put("gauge_clients_total", json!(local + remote));
    put("gauge_clients_local", json!(local));
    put("gauge_clients_remote", json!(remote));
    put("gauge_current_dup_client_keys", int(s.get("derp_current_dup_client_keys")));
    put("gauge_current_dup_client_conns", int(s.get("derp_current_dup_client_conns")));
    put("counter_total_dup_client_conns", int(s.get("derp_total_dup_client_conns")));
    for name in [
        "accepts",
        "bytes_received",
        "bytes_sent",
        "packets_sent",
        "packets_received",
        "unknown_frames",
        "home_moves_in",
        "home_moves_out",
        "got_ping",
        "sent_pong",
        "peer_gone_disconnected_frames",
        "peer_gone_not_here_frames",
        "packets_forwarded_out",
        "packets_forwarded_in",
        "multiforwarder_created",
        "multiforwarder_deleted",
        "sclient_write_timeouts",
    ] {
        put(name, int(s.get(&format!("derp_{name}"))));
    }
    put("counter_packets_received_kind", Value::Object(s.by_label("derp_packets_received_kind", "kind")));
    let (sum, count) = (s.get("derp_queue_delay_seconds_sum"), s.get("derp_queue_delay_seconds_count"));
    put("average_queue_duration_ms", json!(if count > 0.0 { sum / count * 1000.0 } else { 0.0 }));
    put("counter_buffered_write_frames", s.histogram("derp_buffered_write_frames"));
    put("version", json!(env!("CARGO_PKG_VERSION")));
    if rate_limit_enabled {
        put("rate_limit_per_client_bytes_per_second", int(s.get("derp_rate_limit_per_client_bytes_per_sec")));
        put("rate_limit_per_client_burst_bytes", int(s.get("derp_rate_limit_per_client_burst_bytes")));
    }

    let mut top: BTreeMap<&str, Value> = BTreeMap::new();
    top.insert("derp", Value::Object(derp));
    top.insert(
        "tls_listener",
        json!({
            "counter_accepted_connections": int(s.get("tls_listener_accepted_connections")),
            "counter_rejected_connections": int(s.get("tls_listener_rejected_connections")),
        }),
    );
    top.insert(
        "stun",
        json!({
            "counter_requests": s.by_label("stun_requests", "disposition"),
            "counter_addrfamily": s.by_label("stun_addrfamily", "family"),
        }),
    );
    for name in [
        "counter_bootstrap_dns_requests",
        "counter_bootstrap_dns_published_hits",
        "counter_bootstrap_dns_published_misses",
        "counter_bootstrap_dns_unpublished_hits",
        "counter_bootstrap_dns_unpublished_misses",
        "counter_bootstrap_dns_unpublished_percent_misses",
    ] {
        top.insert(name, int(s.get(name)));
    }
    top.insert("counter_bootstrap_dns_queried_domains", json!(bootstrap.queried_domains()));
    top.insert("derp_websocket_accepts", int(s.get("derp_websocket_accepts")));
    top.insert("derp_packets_dropped", json!("MultiLabelMap"));
    top.insert("derp_bytes_dropped", json!("MultiLabelMap"));
    top.insert("process_start_unix_time", int(s.get("process_start_unix_time")));
    top.insert("counter_uptime_sec", json!(status.ops.uptime().as_secs()));
    top.insert("version", json!(env!("CARGO_PKG_VERSION")));
    top.insert("cmdline", json!(std::env::args().collect::<Vec<_>>()));
    let mut text = serde_json::to_string_pretty(&top).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

/// The `/debug/` index: what there is, and a few facts (derper's `tsweb.Debugger` page).
pub(crate) fn index(status: &Status) -> String {
    let mesh_key = status.derp.config().mesh_key.is_some();
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>derpfleet-relay debug</title></head><body>\n\
         <h1>derpfleet-relay debug</h1>\n<ul>\n\
         <li><a href=\"/debug/vars\">/debug/vars</a> expvar-style JSON (derper's names)</li>\n\
         <li><a href=\"/debug/varz\">/debug/varz</a> Prometheus metrics</li>\n\
         </ul>\n<table>\n\
         <tr><td>Version</td><td>{}</td></tr>\n\
         <tr><td>Mesh key</td><td>{mesh_key}</td></tr>\n\
         <tr><td>Uptime</td><td>{}s</td></tr>\n\
         </table>\n</body></html>\n",
        env!("CARGO_PKG_VERSION"),
        status.ops.uptime().as_secs(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_histogram_becomes_gos_per_bucket_counts() {
        let text =
            "x_bucket{le=\"1\"} 2\nx_bucket{le=\"2\"} 5\nx_bucket{le=\"+Inf\"} 6\nx_sum 9\nx_count 6\n";
        let s = Samples(MetricsSnapshot::parse(text));
        assert_eq!(s.histogram("x"), json!({"1": 2, "2": 3, "sum": 9, "count": 6}));
        let t = "k{kind=\"disco\"} 3\nk{kind=\"other\"} 4\n";
        assert_eq!(
            Value::Object(Samples(MetricsSnapshot::parse(t)).by_label("k", "kind")),
            json!({"disco": 3, "other": 4})
        );
    }
}
