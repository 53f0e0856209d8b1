//! Metrics of the relay process around the DERP core: accepts and refusals, admission, the rate
//! limit setting, certificate reloads, graceful restarts, STUN, and process gauges.
//!
//! They live in a recorder of their own (the core's [`crate::core::metrics::Metrics`] keeps the DERP
//! series), so each `Server` has separate numbers; `/metrics` renders both.
//! Names follow derper where it has one (`tls_listener_*_connections`, `process_start_unix_time`,
//! `uptime_sec`, `derp_current_file_descriptors`, `derp_rate_limit_per_client_*`, `stun_*`).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::http::proxy_protocol::ProxyProtocolMetrics;
use crate::ops::admission::AdmissionMetrics;
use crate::ops::ratelimit::{AcceptRefusal, RecvRate};

const META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The process-level series of one relay.
pub struct OpsMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    started: Instant,
    /// Connections accepted on the main listener (before any limit).
    pub tls_listener_accepted_connections: Counter,
    /// Connections closed at once by an accept limit.
    pub tls_listener_rejected_connections: Counter,
    accept_rejected: [Counter; 2],
    uptime_sec: Counter,
    current_file_descriptors: Gauge,
    rate_limit_bytes_per_sec: Gauge,
    rate_limit_burst_bytes: Gauge,
    /// Restarting frames queued at graceful shutdown.
    pub restarting_sent: Counter,
    /// Certificate reloads that took effect.
    pub cert_reloads_ok: Counter,
    /// Certificate reloads that failed (the old certificate stays).
    pub cert_reloads_failed: Counter,
    /// SIGHUP reloads (allowlist, rate config) that failed, keeping the old setting.
    pub reload_errors: Counter,
    admission: AdmissionMetrics,
    verify_clients: crate::ops::verify_localapi::LocalApiMetrics,
    /// Extra Prometheus text appended by [`OpsMetrics::render`] (per-key tables, bounded).
    text_sources: parking_lot::Mutex<Vec<TextSource>>,
    proxy_protocol: ProxyProtocolMetrics,
}

/// A producer of extra Prometheus text for `/metrics`.
pub(crate) type TextSource = Box<dyn Fn() -> String + Send + Sync>;

impl std::fmt::Debug for OpsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsMetrics").finish_non_exhaustive()
    }
}

impl Default for OpsMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OpsMetrics {
    /// Fresh series in a recorder of their own.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let key = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>())
        };
        let c = |name, labels: &[(&'static str, &'static str)]| {
            recorder.register_counter(&key(name, labels), &META)
        };
        let g = |name, labels: &[(&'static str, &'static str)]| {
            recorder.register_gauge(&key(name, labels), &META)
        };
        let start_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        g("process_start_unix_time", &[]).set(start_unix);
        let m = OpsMetrics {
            started: Instant::now(),
            tls_listener_accepted_connections: c("tls_listener_accepted_connections", &[]),
            tls_listener_rejected_connections: c("tls_listener_rejected_connections", &[]),
            accept_rejected: [
                c("derp_accept_rejected", &[("reason", "global")]),
                c("derp_accept_rejected", &[("reason", "per_ip")]),
            ],
            uptime_sec: c("uptime_sec", &[]),
            current_file_descriptors: g("derp_current_file_descriptors", &[]),
            rate_limit_bytes_per_sec: g("derp_rate_limit_per_client_bytes_per_sec", &[]),
            rate_limit_burst_bytes: g("derp_rate_limit_per_client_burst_bytes", &[]),
            restarting_sent: c("derp_restarting_frames_sent", &[]),
            cert_reloads_ok: c("derp_cert_reloads", &[("result", "ok")]),
            cert_reloads_failed: c("derp_cert_reloads", &[("result", "error")]),
            reload_errors: c("derp_config_reload_errors", &[]),
            admission: AdmissionMetrics {
                allowed: c("derp_admission", &[("result", "allowed")]),
                rejected: c("derp_admission", &[("result", "rejected")]),
                fail_open: c("derp_admission", &[("result", "fail_open")]),
                fail_closed: c("derp_admission", &[("result", "fail_closed")]),
            },
            verify_clients: crate::ops::verify_localapi::LocalApiMetrics {
                cache_hit: c("derp_verify_clients_cache", &[("result", "hit")]),
                cache_miss: c("derp_verify_clients_cache", &[("result", "miss")]),
                allowed: c("derp_verify_clients", &[("result", "allowed")]),
                not_found: c("derp_verify_clients", &[("result", "not_found")]),
                error: c("derp_verify_clients", &[("result", "error")]),
            },
            text_sources: parking_lot::Mutex::new(Vec::new()),
            proxy_protocol: ProxyProtocolMetrics {
                proxied: c("derp_proxy_protocol_headers", &[("result", "proxied")]),
                local: c("derp_proxy_protocol_headers", &[("result", "local")]),
                rejected: ProxyProtocolMetrics::REASONS
                    .map(|reason| c("derp_proxy_protocol_rejected", &[("reason", reason)])),
            },
            recorder,
            handle,
        };
        m.rate_limit_bytes_per_sec.set(0.0);
        m.rate_limit_burst_bytes.set(0.0);
        m
    }

    /// The recorder, for components that register their own series (the STUN responder).
    pub fn recorder(&self) -> &dyn Recorder {
        &self.recorder
    }

    /// Admission decision counters.
    pub fn admission(&self) -> AdmissionMetrics {
        self.admission.clone()
    }

    /// `-verify-clients` counters.
    pub fn verify_clients(&self) -> crate::ops::verify_localapi::LocalApiMetrics {
        self.verify_clients.clone()
    }

    /// Appends `source`'s text to every [`OpsMetrics::render`].
    pub fn add_text_source(&self, source: TextSource) {
        self.text_sources.lock().push(source);
    }

    /// PROXY protocol header counters.
    pub fn proxy_protocol(&self) -> ProxyProtocolMetrics {
        self.proxy_protocol.clone()
    }

    /// Counts a connection refused by an accept limit.
    pub fn accept_refused(&self, why: AcceptRefusal) {
        self.tls_listener_rejected_connections.increment(1);
        self.accept_rejected[why as usize].increment(1);
    }

    /// Publishes the per-client receive rate in force (0 = off).
    pub fn set_recv_rate(&self, rate: Option<RecvRate>) {
        let (r, b) = rate.map_or((0, 0), |r| (r.bytes_per_sec, r.burst_bytes));
        self.rate_limit_bytes_per_sec.set(r as f64);
        self.rate_limit_burst_bytes.set(b as f64);
    }

    /// Seconds since this relay started.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The Prometheus text of these series (refreshing uptime and descriptor count first).
    pub fn render(&self) -> String {
        self.uptime_sec.absolute(self.started.elapsed().as_secs());
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.current_file_descriptors.set(fds.count() as f64);
        }
        self.handle.run_upkeep();
        let mut text = self.handle.render();
        for source in self.text_sources.lock().iter() {
            text.push_str(&source());
        }
        text
    }
}
