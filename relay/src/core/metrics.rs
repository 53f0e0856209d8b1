//! Every counter, gauge and histogram of one DERP server, with derper's Prometheus names.
//!
//! Each `DerpServer` owns its own `PrometheusRecorder` (not the global
//! recorder), so several servers in one process (tests, a mesh in one binary) keep separate
//! numbers. Every series, labelled ones included, is registered up front into fixed arrays, so
//! the packet path costs one atomic add per counter and never touches the registry.
//! Histogram samples sit in the recorder until drained: [`Metrics::run_upkeep`] (called by the
//! server's upkeep task and by [`Metrics::render`]) keeps that memory bounded.

use std::collections::BTreeMap;
use std::fmt;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Why a packet was dropped (the `reason` label of `derp_packets_dropped`).
///
/// Where each is counted, so every loss has one owner: `Registry::route`
/// for packets that cannot be routed (`unknown_dest`, `unknown_dest_on_fwd`, `dup_client`);
/// the `Outbox` for packets lost in a destination's queue (`queue_head`, and
/// `gone_disconnected` for a closed one); the send loop for a failed write (`write_error`); the
/// mesh forwarder for its link queue (`queue_tail`, `gone_disconnected`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// SendPacket to a key with no connection and no forwarder.
    UnknownDest,
    /// ForwardPacket (from a mesh peer) to a key with no local connection.
    UnknownDestOnFwd,
    /// The destination connection was closed (or closed with the packet still queued).
    GoneDisconnected,
    /// The destination queue was full: its oldest packet was dropped.
    QueueHead,
    /// The destination queue stayed full: the new packet was dropped.
    QueueTail,
    /// Writing to the destination failed (or timed out) with the packet in the batch.
    WriteError,
    /// The destination key has duplicate connections and none is active.
    DupClient,
}

impl DropReason {
    /// Every reason, in label-array order.
    pub const ALL: [DropReason; 7] = [
        Self::UnknownDest,
        Self::UnknownDestOnFwd,
        Self::GoneDisconnected,
        Self::QueueHead,
        Self::QueueTail,
        Self::WriteError,
        Self::DupClient,
    ];

    /// The Prometheus label value (derper's spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownDest => "unknown_dest",
            Self::UnknownDestOnFwd => "unknown_dest_on_fwd",
            Self::GoneDisconnected => "gone_disconnected",
            Self::QueueHead => "queue_head",
            Self::QueueTail => "queue_tail",
            Self::WriteError => "write_error",
            Self::DupClient => "dup_client",
        }
    }
}

/// Disco or not (the `kind` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// Looks like a Tailscale disco packet.
    Disco,
    /// Anything else (WireGuard).
    Other,
}

impl PacketKind {
    /// Both kinds, in label-array order.
    pub const ALL: [PacketKind; 2] = [Self::Disco, Self::Other];

    /// Classifies packet data.
    #[inline]
    pub fn of(data: &[u8]) -> Self {
        if derpfleet_proto::disco::looks_like_disco(data) {
            Self::Disco
        } else {
            Self::Other
        }
    }

    /// The Prometheus label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disco => "disco",
            Self::Other => "other",
        }
    }
}

/// Bucket bounds of `derp_buffered_write_frames` (frames per flush).
const FRAME_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Bucket bounds (seconds) of the handshake and queue-delay histograms.
const SECONDS_BUCKETS: &[f64] =
    &[0.000_01, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The server's metrics. Field names follow derper's expvar names without the type prefix.
pub struct Metrics {
    handle: PrometheusHandle,
    /// Live connections past the handshake.
    pub current_connections: Gauge,
    /// Connections whose last NotePreferred said "home".
    pub current_home_connections: Gauge,
    /// Connections that sent `Ideal-Node` (not on the region's ideal node).
    pub current_notideal_connections: Gauge,
    /// Connections handed to `accept`.
    pub accepts: Counter,
    /// Packet data bytes received in SendPacket/ForwardPacket.
    pub bytes_received: Counter,
    /// Packet data bytes written in RecvPacket.
    pub bytes_sent: Counter,
    /// RecvPacket frames written.
    pub packets_sent: Counter,
    /// SendPacket/ForwardPacket frames received.
    pub packets_received: Counter,
    packets_received_kind: [Counter; 2],
    /// Frames skipped because their type is unknown or not for the server.
    pub unknown_frames: Counter,
    /// Ping frames received.
    pub got_ping: Counter,
    /// Pong frames written.
    pub sent_pong: Counter,
    /// PeerGone(Disconnected) frames written.
    pub peer_gone_disconnected_frames: Counter,
    /// PeerGone(NotHere) frames written.
    pub peer_gone_not_here_frames: Counter,
    packets_dropped: [[Counter; 2]; 7],
    bytes_dropped: [[Counter; 2]; 7],
    /// Keys with more than one connection.
    pub current_dup_client_keys: Gauge,
    /// Connections belonging to such keys.
    pub current_dup_client_conns: Gauge,
    /// Connections that ever became duplicates.
    pub total_dup_client_conns: Counter,
    /// Connections subscribed with WatchConns.
    pub watchers: Gauge,
    /// Connections that arrived over WebSocket (counted by the HTTP layer).
    pub websocket_accepts: Counter,
    /// Connections closed because a write hit its deadline.
    pub sclient_write_timeouts: Counter,
    /// Established clients (past derper's 5 s grace) announcing this node as their home.
    pub home_moves_in: Counter,
    /// Established clients announcing they moved their home elsewhere.
    pub home_moves_out: Counter,
    /// Frames coalesced per flush.
    pub buffered_write_frames: Histogram,
    /// Accept-to-ServerInfo time of successful handshakes (ours).
    pub handshake_seconds: Histogram,
    /// Time a packet waited in a send queue (ours; sampled).
    pub queue_delay_seconds: Histogram,
    /// Handshakes that failed (wrong first frame, bad box, bad JSON, timeout, rejected) (ours).
    pub handshake_errors: Counter,
    /// PeerGone/PeerPresent frames dropped because a control queue was full (ours).
    pub control_frames_dropped: Counter,
    /// ForwardPacket frames received from mesh peers.
    pub packets_forwarded_in: Counter,
    /// ForwardPacket frames queued to mesh links.
    pub packets_forwarded_out: Counter,
    /// Keys that went from one forwarder to several.
    pub multiforwarder_created: Counter,
    /// Keys that went from several forwarders back to one.
    pub multiforwarder_deleted: Counter,
    /// Mesh links (to other servers of the region) currently connected and watching.
    pub mesh_peers_connected: Gauge,
    /// ForwardPacket frames dropped because a mesh link's queue was full or the link closed
    /// (also counted in `derp_packets_dropped` as `queue_tail` / `gone_disconnected`).
    pub mesh_forward_dropped: Counter,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn key(name: &'static str, labels: Vec<Label>) -> Key {
    Key::from_parts(name, labels)
}

const META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of series, all at zero, in a recorder of its own.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full("derp_buffered_write_frames".into()), FRAME_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS))
            .expect("bucket lists are non-empty constants")
            .build_recorder();
        let c = |name: &'static str| recorder.register_counter(&key(name, vec![]), &META);
        let g = |name: &'static str| recorder.register_gauge(&key(name, vec![]), &META);
        let h = |name: &'static str| recorder.register_histogram(&key(name, vec![]), &META);
        let dropped = |name: &'static str| {
            DropReason::ALL.map(|r| {
                PacketKind::ALL.map(|k| {
                    let labels = vec![Label::new("reason", r.as_str()), Label::new("kind", k.as_str())];
                    recorder.register_counter(&key(name, labels), &META)
                })
            })
        };
        let m = Metrics {
            handle: recorder.handle(),
            current_connections: g("derp_current_connections"),
            current_home_connections: g("derp_current_home_connections"),
            current_notideal_connections: g("derp_current_notideal_connections"),
            accepts: c("derp_accepts"),
            bytes_received: c("derp_bytes_received"),
            bytes_sent: c("derp_bytes_sent"),
            packets_sent: c("derp_packets_sent"),
            packets_received: c("derp_packets_received"),
            packets_received_kind: PacketKind::ALL.map(|k| {
                recorder.register_counter(
                    &key("derp_packets_received_kind", vec![Label::new("kind", k.as_str())]),
                    &META,
                )
            }),
            unknown_frames: c("derp_unknown_frames"),
            got_ping: c("derp_got_ping"),
            sent_pong: c("derp_sent_pong"),
            peer_gone_disconnected_frames: c("derp_peer_gone_disconnected_frames"),
            peer_gone_not_here_frames: c("derp_peer_gone_not_here_frames"),
            packets_dropped: dropped("derp_packets_dropped"),
            bytes_dropped: dropped("derp_bytes_dropped"),
            current_dup_client_keys: g("derp_current_dup_client_keys"),
            current_dup_client_conns: g("derp_current_dup_client_conns"),
            total_dup_client_conns: c("derp_total_dup_client_conns"),
            watchers: g("derp_watchers"),
            websocket_accepts: c("derp_websocket_accepts"),
            sclient_write_timeouts: c("derp_sclient_write_timeouts"),
            home_moves_in: c("derp_home_moves_in"),
            home_moves_out: c("derp_home_moves_out"),
            buffered_write_frames: h("derp_buffered_write_frames"),
            handshake_seconds: h("derp_handshake_seconds"),
            queue_delay_seconds: h("derp_queue_delay_seconds"),
            handshake_errors: c("derp_handshake_errors"),
            control_frames_dropped: c("derp_control_frames_dropped"),
            packets_forwarded_in: c("derp_packets_forwarded_in"),
            packets_forwarded_out: c("derp_packets_forwarded_out"),
            multiforwarder_created: c("derp_multiforwarder_created"),
            multiforwarder_deleted: c("derp_multiforwarder_deleted"),
            mesh_peers_connected: g("derp_mesh_peers_connected"),
            mesh_forward_dropped: c("derp_mesh_forward_dropped"),
        };
        // Gauges only appear in the output once touched; make every series visible from the start.
        for gauge in [
            &m.current_connections,
            &m.current_home_connections,
            &m.current_notideal_connections,
            &m.current_dup_client_keys,
            &m.current_dup_client_conns,
            &m.watchers,
            &m.mesh_peers_connected,
        ] {
            gauge.set(0.0);
        }
        m
    }

    /// Counts one dropped packet of `bytes` data bytes.
    #[inline]
    pub fn drop_packet(&self, reason: DropReason, kind: PacketKind, bytes: usize) {
        self.drop_packets(reason, kind, 1, bytes);
    }

    /// Counts `packets` dropped packets totalling `bytes` data bytes.
    #[inline]
    pub fn drop_packets(&self, reason: DropReason, kind: PacketKind, packets: u64, bytes: usize) {
        if packets == 0 {
            return;
        }
        self.packets_dropped[reason as usize][kind as usize].increment(packets);
        self.bytes_dropped[reason as usize][kind as usize].increment(bytes as u64);
    }

    /// Counts one received packet.
    #[inline]
    pub fn packet_received(&self, kind: PacketKind, bytes: usize) {
        self.packets_received_kind(kind, 1);
        self.bytes_received.increment(bytes as u64);
    }

    /// Counts `n` received packets of `kind` (bytes are counted separately).
    #[inline]
    pub fn packets_received_kind(&self, kind: PacketKind, n: u64) {
        if n > 0 {
            self.packets_received.increment(n);
            self.packets_received_kind[kind as usize].increment(n);
        }
    }

    /// Moves buffered histogram samples into their buckets (bounded memory).
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Parses [`Metrics::render`] into a [`MetricsSnapshot`] (for tests and debugging).
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot::parse(&self.render())
    }
}

/// Parsed Prometheus text: series (name plus sorted labels) to value. The one parser of the
/// exposition format in the crate (tests, the drop log and `/debug/vars` read through it).
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    series: BTreeMap<(String, Labels), f64>,
}

/// A series' labels, sorted by name.
type Labels = Vec<(String, String)>;

fn sorted_labels(labels: &[(&str, &str)]) -> Labels {
    let mut pairs: Labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    pairs.sort();
    pairs
}

impl MetricsSnapshot {
    /// Parses Prometheus text exposition lines `name{a="x",b="y"} value`.
    pub fn parse(text: &str) -> Self {
        let mut series = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((lhs, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match lhs.split_once('{') {
                Some((n, rest)) => {
                    let body = rest.trim_end_matches('}');
                    let mut pairs: Labels = body
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .filter_map(|p| p.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                        .collect();
                    pairs.sort();
                    (n.to_string(), pairs)
                }
                None => (lhs.to_string(), vec![]),
            };
            series.insert((name, labels), value);
        }
        Self { series }
    }

    /// The value of `name` with exactly these labels (any order); 0 when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series.get(&(name.to_string(), sorted_labels(labels))).copied().unwrap_or(0.0)
    }

    /// `derp_packets_dropped{reason,kind}`.
    pub fn dropped(&self, reason: DropReason, kind: PacketKind) -> f64 {
        self.get("derp_packets_dropped", &[("reason", reason.as_str()), ("kind", kind.as_str())])
    }

    /// True when the series exists at all.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.series.contains_key(&(name.to_string(), sorted_labels(labels)))
    }

    /// Every series named `name`: its labels (sorted) and value.
    pub fn series_named<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a [(String, String)], f64)> + 'a {
        self.series.iter().filter(move |((n, _), _)| n == name).map(|((_, l), v)| (l.as_slice(), *v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_keep_separate_numbers_and_render_derper_names() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.accepts.increment(3);
        a.drop_packet(DropReason::QueueHead, PacketKind::Disco, 100);
        a.buffered_write_frames.record(5.0);
        let sa = a.snapshot();
        let sb = b.snapshot();
        assert_eq!(sa.get("derp_accepts", &[]), 3.0);
        assert_eq!(sb.get("derp_accepts", &[]), 0.0);
        assert_eq!(sa.dropped(DropReason::QueueHead, PacketKind::Disco), 1.0);
        assert_eq!(sa.get("derp_bytes_dropped", &[("kind", "disco"), ("reason", "queue_head")]), 100.0);
        assert!(sb.has("derp_packets_dropped", &[("reason", "dup_client"), ("kind", "other")]));
        assert!(sb.has("derp_current_connections", &[]));
        assert_eq!(sa.get("derp_buffered_write_frames_count", &[]), 1.0);
    }
}
