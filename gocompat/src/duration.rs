//! Go `time.Duration` values as derper's flags spell them (`10m`, `1h30m`, `500ms`, `1.5s`).
//!
//! [`GoDuration`] parses ([`std::str::FromStr`]) and prints ([`std::fmt::Display`]), so one
//! constant serves as clap's `default_value_t`, as the value in a `Default` impl and as the text in
//! `--help`. Printing is compact (`10m`, not Go's `10m0s`) and always parses back to the same value.
//! Negative durations are rejected: none of our flags gives them a meaning (use `0`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A non-negative Go duration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    /// No time at all (`0`): "off" for most flags.
    pub const ZERO: GoDuration = GoDuration(Duration::ZERO);

    /// Whole seconds.
    pub const fn from_secs(secs: u64) -> GoDuration {
        GoDuration(Duration::from_secs(secs))
    }

    /// Whole milliseconds.
    pub const fn from_millis(millis: u64) -> GoDuration {
        GoDuration(Duration::from_millis(millis))
    }

    /// The value as a [`Duration`].
    pub const fn get(self) -> Duration {
        self.0
    }

    /// `None` for zero (the flags' "off"), else the duration.
    pub fn non_zero(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl From<GoDuration> for Duration {
    fn from(d: GoDuration) -> Duration {
        d.0
    }
}

impl From<Duration> for GoDuration {
    fn from(d: Duration) -> GoDuration {
        GoDuration(d)
    }
}

impl std::ops::Deref for GoDuration {
    type Target = Duration;
    fn deref(&self) -> &Duration {
        &self.0
    }
}

impl FromStr for GoDuration {
    type Err = String;

    /// `0`, or a sequence of decimal numbers with units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`.
    fn from_str(s: &str) -> Result<GoDuration, String> {
        parse(s).map(GoDuration)
    }
}

fn parse(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (examples: 2s, 10m, 1h30m, 500ms)");
    if s == "0" || s == "+0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() || rest.starts_with('-') {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let nanos_per = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        total += value * nanos_per;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

impl fmt::Display for GoDuration {
    /// Largest units first, zero parts left out: `1h30m`, `10m`, `1s500ms`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        const UNITS: [(&str, u128); 6] = [
            ("h", 3_600_000_000_000),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
            ("us", 1_000),
            ("ns", 1),
        ];
        for (unit, per) in UNITS {
            if nanos >= per {
                write!(f, "{}{unit}", nanos / per)?;
                nanos %= per;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Duration, String> {
        s.parse::<GoDuration>().map(GoDuration::get)
    }

    #[test]
    fn go_durations() {
        assert_eq!(p("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(p("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(p("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(p("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(p("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(p("0"), Ok(Duration::ZERO));
        for bad in ["", "2", "s", "2x", "-1s", "1..2s", "1h30"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prints_what_it_parses() {
        for (d, text) in [
            (GoDuration::from_secs(600), "10m"),
            (GoDuration::from_secs(5400), "1h30m"),
            (GoDuration::from_millis(1500), "1s500ms"),
            (GoDuration::from_millis(500), "500ms"),
            (GoDuration::ZERO, "0s"),
            (GoDuration(Duration::from_nanos(3_600_000_000_001)), "1h1ns"),
        ] {
            assert_eq!(d.to_string(), text);
            assert_eq!(text.parse::<GoDuration>(), Ok(d), "{text}");
        }
    }
}
