//! The per-packet floor of this host: the CPU cost of moving one message through loopback TCP
//! with one `write` and one `read`.
//!
//! A relay has to do at least that much per packet (read it from the sender, write it to the
//! receiver), so relay CPU per packet is reported as a multiple of this figure, measured in the
//! same run: machines differ and a shared VM drifts by tens of percent within minutes.
//!
//! One thread, blocking sockets, Nagle off: write the message to one end of a loopback
//! connection, read it from the other. Loopback delivers during the `write`, so the `read` finds
//! the data and never sleeps; the figure is pure syscall and TCP-stack cost, without wake-ups or
//! epoll. CPU time is the thread's own (`/proc/thread-self/schedstat`, nanoseconds on CPU), so
//! other processes on the host do not count, though they still slow the caches down.
//!
//! With several connections the messages go round-robin, one per connection in turn, as a relay
//! with many quiet clients touches a different pair of sockets for every packet. The figure then
//! includes what the kernel pays for sockets that are no longer in the caches; the relay's
//! headline (`relay_cpu_x_floor`) is always against the one-connection floor.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Default message: a 1200-byte packet behind a 5-byte DERP frame header.
pub const MESSAGE_LEN: usize = 1205;

/// What one floor measurement found.
#[derive(Clone, Copy, Debug)]
pub struct Floor {
    /// Loopback connections the messages went through, round-robin.
    pub connections: usize,
    /// Messages moved (one write + one read each).
    pub messages: u64,
    /// CPU µs per message (write + read).
    pub cpu_us: f64,
    /// Share of that CPU spent in the kernel, in percent (`None` if not readable).
    pub kernel_pct: Option<f64>,
    /// Reads that returned less than a whole message (each then needed another read).
    pub short_reads: u64,
    /// Wall time of the measurement.
    pub elapsed: Duration,
}

/// Moves `size`-byte messages for `duration` through `connections` loopback connections
/// (round-robin; at least one) and reports the CPU per message. Blocking: call it from a thread
/// of its own (or `spawn_blocking`). Each connection holds two file descriptors.
pub fn measure(duration: Duration, size: usize, connections: usize) -> io::Result<Floor> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let connections = connections.max(1);
    let mut pairs = Vec::with_capacity(connections);
    for _ in 0..connections {
        let tx = TcpStream::connect(listener.local_addr()?)?;
        let (rx, _) = listener.accept()?;
        tx.set_nodelay(true)?;
        rx.set_nodelay(true)?;
        pairs.push((tx, rx));
    }
    drop(listener);
    let msg = vec![0x5au8; size];
    let mut buf = vec![0u8; size];
    // Warm every connection (window, buffers) before counting: 1000 messages, and at least one
    // per connection.
    let mut next = 0;
    for _ in 0..1000.max(pairs.len()) {
        let (tx, rx) = &mut pairs[next];
        move_one(tx, rx, &msg, &mut buf)?;
        next = (next + 1) % pairs.len();
    }
    let (cpu0, ticks0, t0) = (thread_cpu_ns()?, thread_ticks().ok(), Instant::now());
    let mut messages = 0u64;
    let mut short_reads = 0u64;
    while t0.elapsed() < duration {
        for _ in 0..256 {
            let (tx, rx) = &mut pairs[next];
            short_reads += move_one(tx, rx, &msg, &mut buf)?;
            next = (next + 1) % pairs.len();
        }
        messages += 256;
    }
    let elapsed = t0.elapsed();
    let cpu_ns = thread_cpu_ns()?.saturating_sub(cpu0);
    let kernel_pct = match (ticks0, thread_ticks().ok()) {
        (Some((u0, s0)), Some((u1, s1))) if u1 + s1 > u0 + s0 => {
            Some(100.0 * (s1 - s0) as f64 / ((u1 - u0) + (s1 - s0)) as f64)
        }
        _ => None,
    };
    Ok(Floor {
        connections: pairs.len(),
        messages,
        cpu_us: cpu_ns as f64 / 1e3 / messages as f64,
        kernel_pct,
        short_reads,
        elapsed,
    })
}

/// One write and one read of the whole message; returns the extra reads needed (normally 0).
fn move_one(tx: &mut TcpStream, rx: &mut TcpStream, msg: &[u8], buf: &mut [u8]) -> io::Result<u64> {
    tx.write_all(msg)?;
    let mut got = 0;
    let mut extra = 0;
    while got < buf.len() {
        let n = rx.read(&mut buf[got..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
        if got < buf.len() {
            extra += 1;
        }
    }
    Ok(extra)
}

/// Nanoseconds this thread has run on a CPU.
fn thread_cpu_ns() -> io::Result<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/thread-self/schedstat"))
}

/// (user, system) clock ticks of this thread.
fn thread_ticks() -> io::Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/thread-self/stat")?;
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    match (f.get(11).and_then(|v| v.parse().ok()), f.get(12).and_then(|v| v.parse().ok())) {
        (Some(u), Some(s)) => Ok((u, s)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/thread-self/stat")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn moves_messages_and_costs_cpu() {
        let f = super::measure(std::time::Duration::from_millis(100), 1205, 1).unwrap();
        assert!(f.messages >= 256, "{f:?}");
        assert!(f.cpu_us > 0.0 && f.cpu_us.is_finite(), "{f:?}");
        assert_eq!(f.connections, 1);
    }

    #[test]
    fn goes_round_robin_over_several_connections() {
        let f = super::measure(std::time::Duration::from_millis(100), 1205, 300).unwrap();
        assert_eq!(f.connections, 300, "{f:?}");
        assert!(f.messages >= 256, "{f:?}");
        assert!(f.cpu_us > 0.0 && f.cpu_us.is_finite(), "{f:?}");
    }
}
