//! Probe results: what one run measured ([`Outcome`]), and the table of the latest result and run
//! counters of every probe ([`Results`]), which `/metrics`, the status page and `-once` read.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::plan::{Class, ProbeSpec};

/// What a successful probe measured besides "it worked".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    /// The latency that matters for the class: packet round trip (derp), handshake (tls), Binding
    /// round trip (stun), one-way delivery across the mesh (mesh), transfer time (bw), mean
    /// queuing delay (qd).
    pub latency: Duration,
    /// tls: days until the leaf certificate's notAfter (negative once expired).
    pub cert_days_left: Option<f64>,
    /// bw: bytes per second delivered.
    pub bytes_per_second: Option<f64>,
    /// qd: packets sent in the period and packets lost (or later than the timeout).
    pub qd_packets: Option<(u64, u64)>,
}

/// One finished run.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Ok with measurements, or the error.
    pub result: Result<Measured, String>,
    /// When the run started.
    pub started: SystemTime,
    /// When the run ended.
    pub ended: SystemTime,
}

impl Outcome {
    /// True for a good run.
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }
    /// Wall time of the run.
    pub fn duration(&self) -> Duration {
        self.ended.duration_since(self.started).unwrap_or_default()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// RFC 3339 UTC time with milliseconds (the JSON `at` field).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Run counters of one probe (derpprobe's `attempts_total` / `seconds_total` by status).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Good runs.
    pub ok: u64,
    /// Failed runs.
    pub fail: u64,
    /// Seconds spent in good runs.
    pub ok_seconds: f64,
    /// Seconds spent in failed runs.
    pub fail_seconds: f64,
}

/// The state of one probe.
#[derive(Clone, Debug)]
pub struct ProbeState {
    /// What it probes.
    pub spec: ProbeSpec,
    /// The latest finished run.
    pub last: Option<Outcome>,
    /// When the current run started, if one is running.
    pub running_since: Option<SystemTime>,
    /// All runs so far.
    pub counters: Counters,
}

/// The shared results table, keyed by probe name.
#[derive(Clone, Debug, Default)]
pub struct Results {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    probes: BTreeMap<String, ProbeState>,
    map_error: Option<String>,
}

impl Results {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the table hold exactly `specs` (new ones start empty, removed ones disappear).
    pub fn set_plan(&self, specs: &[ProbeSpec]) {
        let mut g = self.write();
        g.probes.retain(|name, _| specs.iter().any(|s| &s.name == name));
        for s in specs {
            g.probes.entry(s.name.clone()).and_modify(|st| st.spec = s.clone()).or_insert_with(|| {
                ProbeState { spec: s.clone(), last: None, running_since: None, counters: Counters::default() }
            });
        }
    }

    /// Records that `name` started a run.
    pub fn started(&self, name: &str, at: SystemTime) {
        if let Some(st) = self.write().probes.get_mut(name) {
            st.running_since = Some(at);
        }
    }

    /// Records a finished run of `name`.
    pub fn finished(&self, name: &str, outcome: Outcome) {
        let mut g = self.write();
        let Some(st) = g.probes.get_mut(name) else { return };
        let secs = outcome.duration().as_secs_f64();
        if outcome.ok() {
            st.counters.ok += 1;
            st.counters.ok_seconds += secs;
        } else {
            st.counters.fail += 1;
            st.counters.fail_seconds += secs;
        }
        st.running_since = None;
        st.last = Some(outcome);
    }

    /// Records whether the last DERP map read failed.
    pub fn set_map_error(&self, e: Option<String>) {
        self.write().map_error = e;
    }

    /// The last DERP map error, if the latest read failed.
    pub fn map_error(&self) -> Option<String> {
        self.read().map_error.clone()
    }

    /// A copy of every probe's state, by name.
    pub fn snapshot(&self) -> Vec<ProbeState> {
        self.read().probes.values().cloned().collect()
    }
}

/// One probe's line of the `-once -json` document (and of the status page's data).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProbeRecord {
    /// Probe name.
    pub name: String,
    /// Probe class.
    pub class: Class,
    /// Region code.
    pub region: String,
    /// Region ID.
    pub region_id: i64,
    /// Node name (for mesh: the sender).
    pub node: String,
    /// Mesh: the receiving node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Whether the latest run was good (`null` before the first run finished).
    pub ok: Option<bool>,
    /// The class's latency in milliseconds (null when bad).
    pub latency_ms: Option<f64>,
    /// The error of a bad run.
    pub error: Option<String>,
    /// When the latest run ended (RFC 3339).
    pub at: Option<String>,
    /// tls: days until the certificate expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_days_left: Option<f64>,
    /// bw: bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<f64>,
}

impl ProbeRecord {
    /// The record of `st`'s latest run.
    pub fn of(st: &ProbeState) -> Self {
        let last = st.last.as_ref();
        let measured = last.and_then(|o| o.result.as_ref().ok());
        ProbeRecord {
            name: st.spec.name.clone(),
            class: st.spec.class,
            region: st.spec.region.clone(),
            region_id: st.spec.region_id,
            node: st.spec.node.name.clone(),
            peer: st.spec.peer.as_ref().map(|p| p.name.clone()),
            ok: last.map(Outcome::ok),
            latency_ms: measured.map(|m| m.latency.as_secs_f64() * 1e3),
            error: last.and_then(|o| o.result.as_ref().err().cloned()),
            at: last.map(|o| rfc3339(o.ended)),
            cert_days_left: measured.and_then(|m| m.cert_days_left),
            bytes_per_second: measured.and_then(|m| m.bytes_per_second),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_709_251_200_123)),
            "2024-03-01T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 86_399)),
            "2000-02-29T23:59:59.000Z"
        );
    }
}
