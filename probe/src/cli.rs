//! The prober's flags: Tailscale `derpprobe`'s names and defaults where they overlap (`-derp-map`,
//! `-once`, `-listen`, `-spread`, the per-class intervals, `-bw-*`, `-qd-*`, `-region-code`), in Go
//! flag syntax (`-name value`, `-name=value`, booleans as `-name` or `-name=false`), plus `-json`,
//! `-mesh-psk-file` and `-location`.
//!
//! A bad flag exits 2 and names the flag as it was typed (clap sees the `--name` form that
//! [`derpfleet_gocompat::normalize_args`] produced; the message is turned back).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};
use derpfleet_gocompat::{normalize_args, parse_go_bool};

/// derpprobe's default map (Tailscale's own fleet).
pub const DEFAULT_DERP_MAP: &str = "https://login.tailscale.com/derpmap/default";

/// The prober's command line.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "derpfleet-probe",
    version,
    about = "Probes every node of a DERP map (DERP, TLS, STUN, mesh, bandwidth, queuing delay) and serves \
             the results as Prometheus metrics and a status page.",
    disable_version_flag = true,
    args_override_self = true
)]
pub struct Flags {
    /// URL of the DERP map (file:// or https://; a plain path is read as a file)
    #[arg(long = "derp-map", alias = "derp-map-file", default_value = DEFAULT_DERP_MAP, value_name = "url")]
    pub derp_map: String,

    /// probe everything once, print the results, exit 0 if all are good and 1 otherwise; ignores -listen
    #[arg(long = "once", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set,
          value_name = "bool")]
    pub once: bool,

    /// with -once: print one JSON document {"probes":[...]} instead of good:/bad: lines
    #[arg(long = "json", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set,
          value_name = "bool")]
    pub json: bool,

    /// HTTP listen address for /metrics, /healthz and the status page (empty = off)
    #[arg(long = "listen", default_value = ":8030", value_name = "addr")]
    pub listen: String,

    /// spread each probe's first run randomly over its interval
    #[arg(long = "spread", default_value = "true", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set,
          value_name = "bool")]
    pub spread: bool,

    /// DERP probe interval (connect, ServerInfo, packet round trip); also how often the map is re-read
    #[arg(long = "interval", default_value = "15s", value_parser = parse_go_duration, value_name = "duration")]
    pub interval: Duration,

    /// mesh probe interval (0 = no mesh probes)
    #[arg(long = "mesh-interval", default_value = "15s", value_parser = parse_go_duration, value_name = "duration")]
    pub mesh_interval: Duration,

    /// STUN probe interval (0 = no STUN probes)
    #[arg(long = "stun-interval", default_value = "15s", value_parser = parse_go_duration, value_name = "duration")]
    pub stun_interval: Duration,

    /// TLS probe interval (0 = no TLS probes)
    #[arg(long = "tls-interval", default_value = "15s", value_parser = parse_go_duration, value_name = "duration")]
    pub tls_interval: Duration,

    /// bandwidth probe interval (0 = no bandwidth probing)
    #[arg(long = "bw-interval", default_value = "0", value_parser = parse_go_duration, value_name = "duration")]
    pub bw_interval: Duration,

    /// bandwidth probe size: bytes sent through the node per probe
    #[arg(long = "bw-probe-size-bytes", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=1 << 30), value_name = "int")]
    pub bw_probe_size_bytes: u64,

    /// if greater than 0, queuing delay is measured continuously with 260-byte packets at this rate
    #[arg(long = "qd-packets-per-second", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000), value_name = "int")]
    pub qd_packets_per_second: u32,

    /// queuing-delay packets arriving later than this after being sent count as dropped
    #[arg(long = "qd-packet-timeout", default_value = "5s", value_parser = parse_go_duration, value_name = "duration")]
    pub qd_packet_timeout: Duration,

    /// probe only this region (its RegionCode, e.g. "lax"); empty = every region
    #[arg(long = "region-code", default_value = "", value_name = "string")]
    pub region_code: String,

    /// file holding the region mesh key (64 hex chars): probe clients present it, so that nodes with an
    /// -allowlist or -verify-client-url admit them
    #[arg(long = "mesh-psk-file", value_name = "path")]
    pub mesh_psk_file: Option<PathBuf>,

    /// name of this probing location on the status page (default: the host name)
    #[arg(long = "location", default_value = "", value_name = "string")]
    pub location: String,

    /// print version and exit
    #[arg(long = "version", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_go_bool, action = ArgAction::Set,
          value_name = "bool")]
    pub version: bool,
}

impl Flags {
    /// Parses Go-style arguments; the error text names flags as they were typed.
    pub fn parse_go<I, T>(args: I) -> Result<Self, FlagError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let single_dash: Vec<String> = args
            .iter()
            .skip(1)
            .filter_map(|a| a.to_str())
            .filter(|a| a.starts_with('-') && !a.starts_with("--") && a.len() > 1)
            .map(|a| a[1..].split('=').next().unwrap_or_default().to_string())
            .collect();
        let flags = Self::try_parse_from(normalize_args(args)).map_err(|e| {
            let kind = e.kind();
            let mut text = e.render().to_string();
            for name in &single_dash {
                text = text.replace(&format!("--{name}"), &format!("-{name}"));
            }
            FlagError { text, is_help: matches!(kind, clap::error::ErrorKind::DisplayHelp) }
        })?;
        if flags.json && !flags.once {
            return Err(FlagError { text: "error: -json requires -once\n".into(), is_help: false });
        }
        if !flags.once && flags.interval.is_zero() {
            return Err(FlagError { text: "error: -interval must be above 0\n".into(), is_help: false });
        }
        Ok(flags)
    }

    /// This location's name: `-location`, else the host name.
    pub fn location_name(&self) -> String {
        if !self.location.is_empty() {
            return self.location.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "prober".into())
    }
}

/// A command line that could not be parsed (or `-help`).
#[derive(Debug)]
pub struct FlagError {
    /// What to print.
    pub text: String,
    /// `-help`: print to stdout and exit 0.
    pub is_help: bool,
}

/// Parses a Go `time.Duration` string (`15s`, `1m30s`, `500ms`, `0`) with the workspace's one Go
/// duration parser; negative values are rejected.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    s.parse::<derpfleet_gocompat::GoDuration>().map(derpfleet_gocompat::GoDuration::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_syntax_and_defaults() {
        let f =
            Flags::parse_go(["p", "-derp-map", "file:///m.json", "-once", "-json", "-interval=2s"]).unwrap();
        assert!(f.once && f.json && f.spread);
        assert_eq!(f.interval, Duration::from_secs(2));
        assert_eq!(f.mesh_interval, Duration::from_secs(15));
        assert_eq!(f.bw_interval, Duration::ZERO);
        let f = Flags::parse_go(["p", "--derp-map-file", "/m.json", "-spread=false"]).unwrap();
        assert_eq!(f.derp_map, "/m.json");
        assert!(!f.spread);
    }

    #[test]
    fn bad_flags_name_the_flag_as_typed() {
        let e = Flags::parse_go(["p", "-interval", "soon"]).unwrap_err();
        assert!(e.text.contains("-interval") && !e.text.contains("--interval"), "{}", e.text);
        assert!(e.text.contains("invalid duration"), "{}", e.text);
        let e = Flags::parse_go(["p", "-no-such-flag"]).unwrap_err();
        assert!(e.text.contains("-no-such-flag"), "{}", e.text);
        let e = Flags::parse_go(["p", "-json"]).unwrap_err();
        assert!(e.text.contains("-json requires -once"), "{}", e.text);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_go_duration("-1s").is_err());
        assert!(parse_go_duration("5").is_err());
    }
}
