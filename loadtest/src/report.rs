//! The result of a run: one JSON document (`--json`, fields documented in loadtest/README.md) or a
//! two-column table for people.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use crate::stats::LatencySummary;

/// Named values kept in insertion order (so the table and the JSON read in a sensible order).
#[derive(Clone, Debug, Default)]
pub struct Fields(pub Vec<(String, Value)>);

impl Fields {
    /// Appends `name = value`.
    pub fn put(&mut self, name: &str, value: impl Into<Value>) -> &mut Self {
        self.0.push((name.to_string(), value.into()));
        self
    }

    /// Moves the named fields (those present, in the order given) to the front: a scenario's
    /// headline figures come first in the table and the JSON.
    pub fn promote(&mut self, names: &[&str]) {
        let mut front = Vec::new();
        for n in names {
            if let Some(i) = self.0.iter().position(|(k, _)| k == n) {
                front.push(self.0.remove(i));
            }
        }
        front.append(&mut self.0);
        self.0 = front;
    }

    /// The value of `name` as a number, if set and numeric.
    pub fn num(&self, name: &str) -> Option<f64> {
        self.get(name).and_then(Value::as_f64)
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// Rounds to 3 decimals (keeps the JSON readable).
pub fn r3(v: f64) -> f64 {
    if v.is_finite() {
        (v * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// Everything a run reports.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Scenario name (`throughput`, `pingpong`, ...).
    pub scenario: String,
    /// Tool version.
    pub version: String,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: u64,
    /// The servers used.
    pub targets: Vec<String>,
    /// The scenario's settings.
    pub config: Fields,
    /// Wall time of the measurement window in seconds.
    pub elapsed_s: f64,
    /// Scenario-specific figures.
    pub results: Fields,
    /// Latency percentiles (one-way, round trip, handshake or STUN, per scenario), when measured.
    pub latency_us: Option<LatencySummary>,
    /// Events per second over the whole run (received packets, handshakes, answers), for charts.
    pub timeline: Vec<u64>,
    /// Things the reader should know (limits hit, caveats).
    pub notes: Vec<String>,
    /// (percentile, µs) points of the latency distribution (for `--plot`; not in the JSON).
    #[serde(skip)]
    pub distribution: Vec<(f64, f64)>,
    /// Start and end of the measurement window in seconds of the timeline (packet runs; for
    /// `--plot`; the JSON has `warmup_s` and `duration_s` in `config`).
    #[serde(skip)]
    pub window_s: Option<(f64, f64)>,
    /// Packet runs: the relays' CPU seconds from the start of traffic to the end of the drain.
    #[serde(skip)]
    pub relay_cpu_traffic_s: Option<f64>,
}

impl Report {
    /// An empty report for `scenario`.
    pub fn new(scenario: &str, targets: Vec<String>) -> Self {
        Self {
            scenario: scenario.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            targets,
            config: Fields::default(),
            elapsed_s: 0.0,
            results: Fields::default(),
            latency_us: None,
            timeline: Vec::new(),
            notes: Vec::new(),
            distribution: Vec::new(),
            window_s: None,
            relay_cpu_traffic_s: None,
        }
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> =
            vec![("scenario".into(), self.scenario.clone()), ("targets".into(), self.targets.join(", "))];
        let cfg: Vec<String> = self.config.0.iter().map(|(k, v)| format!("{k}={}", show(v))).collect();
        rows.push(("config".into(), cfg.join(" ")));
        rows.push(("elapsed_s".into(), format!("{:.3}", self.elapsed_s)));
        rows.extend(self.results.0.iter().map(|(k, v)| (k.clone(), show(v))));
        if let Some(l) = &self.latency_us {
            rows.push(("latency samples".into(), l.count.to_string()));
            for (k, v) in [
                ("latency min µs", l.min_us),
                ("latency mean µs", l.mean_us),
                ("latency p50 µs", l.p50_us),
                ("latency p90 µs", l.p90_us),
                ("latency p99 µs", l.p99_us),
                ("latency p99.9 µs", l.p999_us),
                ("latency max µs", l.max_us),
            ] {
                rows.push((k.into(), format!("{v:.1}")));
            }
        }
        let w = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("{k:<w$}  {v}\n"));
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_order_in_json_and_table() {
        let mut r = Report::new("throughput", vec!["http://x/derp".into()]);
        r.results.put("zeta", 1).put("alpha", 2.5);
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.find("zeta").unwrap() < j.find("alpha").unwrap());
        let t = r.table();
        assert!(t.contains("alpha") && t.contains("2.50"), "{t}");
        assert!(!j.contains("distribution"));
        r.results.put("headline", 7);
        r.results.promote(&["headline", "missing", "alpha"]);
        let keys: Vec<&str> = r.results.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["headline", "alpha", "zeta"]);
        assert_eq!(r.results.num("headline"), Some(7.0));
    }
}
