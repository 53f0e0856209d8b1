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

#[cfg(test)]
mod tests {
    #[test]
    fn own_rss_is_positive() {
        assert!(super::rss_kib(std::process::id()).unwrap() > 0);
        assert!(super::rss_kib(u32::MAX).is_err());
    }
}
