//! Process facts: open-file limit and resident memory of a process.

use std::io;

/// Raises the soft open-file limit to the hard limit; returns the limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Resident set size in KiB of process `pid` (`VmRSS` in /proc/PID/status).
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS line in /proc/PID/status"))
}

/// CPU time (user + system, all threads) of process `pid` in seconds, from /proc/PID/stat
/// (Linux reports it in USER_HZ = 100 ticks per second).
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after its closing ')' are plain.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    match (tick(11), tick(12)) {
        (Some(u), Some(s)) => Ok((u + s) as f64 / 100.0),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/PID/stat format")),
    }
}

/// The host's 1-minute load average (`/proc/loadavg`), recorded with every run: on a shared host
/// it explains the spread between runs.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// CPU used by a process between [`CpuMeter::start`] and [`CpuMeter::seconds`].
pub struct CpuMeter {
    pid: u32,
    start: f64,
}

impl CpuMeter {
    /// Starts measuring `pid`; `None` if its CPU time cannot be read.
    pub fn start(pid: u32) -> Option<Self> {
        cpu_seconds(pid).ok().map(|start| Self { pid, start })
    }

    /// CPU seconds since the start (`None` if the process is gone).
    pub fn seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid).ok().map(|now| now - self.start)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_rss_is_positive() {
        assert!(super::rss_kib(std::process::id()).unwrap() > 0);
        assert!(super::rss_kib(u32::MAX).is_err());
        let m = super::CpuMeter::start(std::process::id()).unwrap();
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(100) {
            std::hint::black_box(0u64);
        }
        assert!(m.seconds().unwrap() > 0.0);
        assert!(super::cpu_seconds(u32::MAX).is_err());
    }
}
