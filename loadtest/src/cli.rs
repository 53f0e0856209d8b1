//! The command line: GNU-style `--flags`, one subcommand per scenario; target options are global.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use derpfleet_proto::consts::{KEY_LEN, MAX_PACKET_SIZE};

use crate::payload::HEADER_LEN;

/// Load generator for DERP v2 relays.
#[derive(Parser, Debug)]
#[command(name = "derpfleet-loadtest", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Options every scenario understands.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// DERP server URL, e.g. http://127.0.0.1:3340/derp (repeat for mesh: the nodes of a region).
    #[arg(long = "url", global = true, value_name = "URL")]
    pub urls: Vec<String>,
    /// DERP map JSON file (instead of --url).
    #[arg(long = "derp-map", global = true, value_name = "FILE")]
    pub derp_map: Option<PathBuf>,
    /// Region ID in the DERP map (repeat for fleet; fleet without --region uses every region).
    #[arg(long = "region", global = true, value_name = "ID")]
    pub regions: Vec<i64>,
    /// Skip TLS certificate verification (https URLs).
    #[arg(long, global = true)]
    pub insecure: bool,
    /// DERP over WebSocket (subprotocol `derp`) instead of `Upgrade: DERP`.
    #[arg(long, global = true)]
    pub websocket: bool,
    /// Write like Tailscale's client: each frame its own write and flush, no coalescing of
    /// queued frames (`many` always does).
    #[arg(long, global = true)]
    pub tailscale_writes: bool,
    /// Print one JSON document (fields in loadtest/README.md) instead of the table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Write an SVG chart (latency distribution, or packets/s over time for throughput scenarios).
    #[arg(long, global = true, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// The relay's process ID (same host): report its CPU time (and, for connections, its memory).
    /// Repeat for a mesh: the CPU of every process is added up.
    #[arg(long = "relay-pid", global = true, value_name = "PID")]
    pub relay_pids: Vec<u32>,
    /// The relay's Prometheus text (`http://127.0.0.1:PORT/debug/varz` or its `/metrics`): read
    /// `derp_packets_dropped` before and after and report the difference. Repeat for a mesh.
    #[arg(long = "metrics-url", global = true, value_name = "URL")]
    pub metrics_urls: Vec<crate::drops::MetricsUrl>,
    /// With --relay-pid: how long to measure the floor (one write + one read of a 1205-byte
    /// message over loopback TCP) before a packet run; 0 skips it.
    #[arg(long, global = true, default_value = "1s", value_parser = parse_duration)]
    pub floor_time: Duration,
    /// Tokio worker threads (the tool shares the CPU with the relay under test).
    #[arg(long, global = true, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
}

/// What to measure.
#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// N sender→receiver pairs: packets/s, Mbit/s, loss, reordering, one-way latency.
    Throughput(FlowArgs),
    /// N pairs bouncing one packet at a time: round-trip percentiles.
    Pingpong(PingArgs),
    /// Open N idle connections; handshakes/s and the relay's memory per connection.
    Connections(ConnArgs),
    /// Connect and disconnect at a rate; handshake latency and failures.
    Churn(ChurnArgs),
    /// Throughput with senders and receivers spread over several URLs (a region's nodes).
    Mesh(FlowArgs),
    /// Throughput with senders and receivers spread over a DERP map's regions.
    Fleet(FlowArgs),
    /// Thousands of paced pairs in one process, Tailscale-like writes: relay CPU per packet.
    Many(ManyArgs),
    /// CPU cost of one write + one read of a message over loopback TCP (the per-packet floor).
    Floor(FloorArgs),
    /// STUN Binding request rate and latency against a responder.
    Stun(StunArgs),
}

/// Payload size of relayed packets: room for our header, at most what a SendPacket frame carries.
fn parse_size(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("{s:?} is not a number of bytes"))?;
    let max = MAX_PACKET_SIZE - KEY_LEN;
    if !(HEADER_LEN..=max).contains(&n) {
        return Err(format!("must be between {HEADER_LEN} and {max} bytes"));
    }
    Ok(n)
}

/// A duration: `10s`, `500ms`, `2m`, `1h` or a plain number of seconds (fractions allowed).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 || v * mult > 7.0 * 86400.0 {
        return Err(format!("{s:?} is out of range (0 to 7 days)"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

fn parse_floor_size(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if !(1..=65_536).contains(&n) {
        return Err("must be between 1 and 65536 bytes".into());
    }
    Ok(n)
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|_| format!("{s:?} is not a whole number per second"))?;
    if n == 0 || n > 100_000_000 {
        return Err("must be between 1 and 100000000 per second".into());
    }
    Ok(n)
}

/// Throughput-style scenarios (throughput, mesh, fleet).
#[derive(Args, Debug, Clone)]
pub struct FlowArgs {
    /// Sender→receiver pairs (each is two DERP connections).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub pairs: u32,
    /// Payload bytes per packet (our 20-byte header included).
    #[arg(long, default_value = "1200", value_parser = parse_size)]
    pub size: usize,
    /// Packets per second per sender; omit for unthrottled.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<u64>,
    /// Measurement length.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Traffic before the measurement starts (not counted).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
}

/// Many-clients scenario: like throughput, but many slow senders, each its own paced schedule.
#[derive(Args, Debug, Clone)]
pub struct ManyArgs {
    /// Sender→receiver pairs (each is two DERP connections).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub pairs: u32,
    /// Packets per second per sender.
    #[arg(long, default_value = "20", value_parser = parse_rate)]
    pub rate: u64,
    /// Payload bytes per packet (our 20-byte header included).
    #[arg(long, default_value = "1200", value_parser = parse_size)]
    pub size: usize,
    /// Measurement length.
    #[arg(long, default_value = "20s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Traffic before the measurement starts (not counted).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Local source addresses to spread connections over (past ~28k per source address).
    #[arg(long, value_parser = parse_source_ips, value_name = "IP-IP|IP,IP")]
    pub source_ips: Option<SourceIps>,
    /// Handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Each pair's receiver also sends to its sender at the same rate, so every connection sends
    /// and receives, as a WireGuard tunnel's two ends do (TCP ACKs then ride on data).
    #[arg(long)]
    pub both_ways: bool,
}

/// Floor benchmark.
#[derive(Args, Debug, Clone)]
pub struct FloorArgs {
    /// How long to measure.
    #[arg(long, default_value = "3s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Bytes per message (default: a 1200-byte packet behind a 5-byte DERP frame header).
    #[arg(long, default_value_t = crate::floor::MESSAGE_LEN, value_parser = parse_floor_size)]
    pub size: usize,
    /// Loopback connections to go round-robin over (two file descriptors each): the kernel's
    /// floor when every packet touches sockets that are out of the caches, as with many clients.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9_000))]
    pub connections: u32,
}

/// Round-trip scenario.
#[derive(Args, Debug, Clone)]
pub struct PingArgs {
    /// Concurrent pairs, each bouncing one packet.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub pairs: u32,
    /// Payload bytes per packet.
    #[arg(long, default_value = "1200", value_parser = parse_size)]
    pub size: usize,
    /// Measurement length.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Round trips before the measurement starts (not counted).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// A round trip not back after this long counts as lost.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
}

/// Local source addresses to spread connections over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceIps(pub Vec<IpAddr>);

/// A list or range of local source addresses: `127.0.0.2-127.0.0.20` or `127.0.0.2,127.0.0.3`.
pub fn parse_source_ips(s: &str) -> Result<SourceIps, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("{a:?} is not an IPv4 address"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| format!("{b:?} is not an IPv4 address"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a >= 65_536 {
                return Err(format!("bad range {part:?} (first..last, at most 65536 addresses)"));
            }
            out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
        } else {
            out.push(part.parse().map_err(|_| format!("{part:?} is not an IP address"))?);
        }
    }
    if out.is_empty() {
        return Err("no address given".into());
    }
    Ok(SourceIps(out))
}

/// Idle-connection scenario.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub count: u32,
    /// Local source addresses to spread connections over (past ~28k per source address).
    #[arg(long, value_parser = parse_source_ips, value_name = "IP-IP|IP,IP")]
    pub source_ips: Option<SourceIps>,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// How long to hold the connections open once all are up (memory is read at the end).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub hold: Duration,
}

/// Connect/disconnect scenario.
#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Connections started per second.
    #[arg(long, default_value = "100", value_parser = parse_rate)]
    pub rate: u64,
    /// How long to keep starting connections.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Local source addresses to spread connections over.
    #[arg(long, value_parser = parse_source_ips, value_name = "IP-IP|IP,IP")]
    pub source_ips: Option<SourceIps>,
    /// Handshakes in flight at most (beyond that the schedule slips and is reported).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
}

/// STUN scenario.
#[derive(Args, Debug, Clone)]
pub struct StunArgs {
    /// STUN responder address, e.g. 127.0.0.1:3478.
    #[arg(long, value_name = "ADDR")]
    pub server: SocketAddr,
    /// Total requests per second (open loop); omit for unthrottled (closed loop, --window per socket).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<u64>,
    /// Client sockets.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub sockets: u32,
    /// Unthrottled: unanswered requests allowed per socket.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub window: u32,
    /// Measurement length.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Requests before the measurement starts (not counted).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn source_ip_ranges() {
        let v = parse_source_ips("127.0.0.2-127.0.0.4,127.0.0.9").unwrap().0;
        assert_eq!(v.len(), 4);
        assert_eq!(v[3], "127.0.0.9".parse::<IpAddr>().unwrap());
        assert!(parse_source_ips("127.0.0.4-127.0.0.2").is_err());
        assert!(parse_source_ips("nope").is_err());
        assert!(parse_source_ips("").is_err());
    }

    #[test]
    fn every_subcommand_parses() {
        use clap::Parser;
        let u = ["--url", "http://127.0.0.1:1/derp"];
        for args in [
            vec!["throughput", "--pairs", "2", "--rate", "10", "--duration", "1s"],
            vec!["pingpong", "--pairs", "2"],
            vec!["connections", "--count", "5", "--source-ips", "127.0.0.2-127.0.0.3", "--relay-pid", "1"],
            vec!["--relay-pid", "1", "throughput"],
            vec!["churn", "--rate", "5", "--source-ips", "127.0.0.2"],
            vec!["mesh", "--pairs", "2"],
            vec!["fleet"],
            vec!["stun", "--server", "127.0.0.1:3478", "--rate", "10"],
            vec!["many", "--pairs", "20", "--rate", "5", "--tailscale-writes"],
            vec![
                "--relay-pid",
                "1",
                "--relay-pid",
                "2",
                "mesh",
                "--metrics-url",
                "http://127.0.0.1:1/metrics",
            ],
            vec!["floor", "--duration", "1s"],
        ] {
            let mut v = vec!["derpfleet-loadtest"];
            v.extend(args.iter().copied());
            v.extend(u);
            let cli = Cli::try_parse_from(&v).unwrap_or_else(|e| panic!("{v:?}: {e}"));
            if let Scenario::Connections(c) = cli.scenario {
                assert_eq!(c.source_ips.unwrap().0.len(), 2);
            }
        }
    }

    #[test]
    fn sizes() {
        assert!(parse_size("19").is_err());
        assert_eq!(parse_size("1200").unwrap(), 1200);
        assert!(parse_size("65505").is_err());
    }
}
