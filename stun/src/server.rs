//! The STUN responder: answers Binding requests on one or more UDP sockets.
//!
//! Each socket gets its own task that drains it with `recvmmsg` and answers with `sendmmsg`
//! ([`crate::batch`]); binding several `SO_REUSEPORT` sockets ([`bind_sockets`]) lets the kernel
//! spread clients over them, one task each. Nothing is queued beyond one batch per socket, so memory
//! is fixed apart from the per-IP rate limiter, which is pruned periodically.
//!
//! Every received datagram ends in exactly one `stun_requests{disposition}` bucket:
//! `success` (answered), `not_stun` (rejected by the codec, truncated, or no source address),
//! `rate_limited`, or `write_error`; `read_error` counts failed receive calls.
//!
//! Embedding (what `derpfleet-relay -stun -stun-port N` needs):
//! ```no_run
//! # async fn embed(recorder: &metrics_exporter_prometheus::PrometheusRecorder,
//! #                cancel: tokio_util::sync::CancellationToken) -> std::io::Result<()> {
//! use derpfleet_stun::server::bind_sockets;
//! use derpfleet_stun::{StunConfig, StunMetrics, StunServer};
//! let addr = "[::]:3478".parse().expect("addr"); // the IP of -a (":443" → [::] dual-stack), -stun-port
//! let sockets = bind_sockets(addr, std::thread::available_parallelism().map_or(1, |n| n.get()))?;
//! let server = StunServer::new(StunConfig::default(), StunMetrics::register(recorder));
//! tokio::spawn(server.serve(sockets, cancel));
//! # Ok(()) }
//! ```

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota};
use metrics::{Counter, Key, Label, Level, Metadata, Recorder};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::batch::{recv_batch, send_batch, RecvBatch, SendBatch};
use crate::message::{parse_binding_request, parse_tailscale_request, write_response, MAX_RESPONSE_LEN};

/// How often idle entries are pruned from the per-IP rate limiter. An entry becomes prunable once
/// its bucket has refilled, so between prunes the map holds at most the source IPs seen in about
/// this interval (plus sources still over their limit): bounded even under spoofed floods.
const LIMITER_PRUNE_INTERVAL: Duration = Duration::from_secs(1);
/// Pause after a failed receive call, so a persistent socket error cannot spin a core.
const READ_ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Batches a socket task handles before yielding to the runtime under sustained load.
const BATCHES_PER_TURN: usize = 16;
/// Requested socket buffer size; the kernel caps it at `net.core.{r,w}mem_max`.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A per-source-IP token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerIpLimit {
    /// Sustained requests per second per source IP.
    pub per_second: NonZeroU32,
    /// Requests a source IP may send back to back.
    pub burst: NonZeroU32,
}

/// Responder settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StunConfig {
    /// Answer only Tailscale-style requests (derper's exact rules); otherwise plain RFC 5389
    /// Binding requests are answered too.
    pub strict: bool,
    /// Per-source-IP limit; `None` answers every valid request.
    pub per_ip_limit: Option<PerIpLimit>,
}

/// Counter handles for `stun_requests{disposition}` and `stun_addrfamily{family}`.
#[derive(Clone)]
pub struct StunMetrics {
    success: Counter,
    not_stun: Counter,
    read_error: Counter,
    write_error: Counter,
    rate_limited: Counter,
    ipv4: Counter,
    ipv6: Counter,
}

impl StunMetrics {
    /// Registers the counters on `recorder` (e.g. a relay's own `PrometheusRecorder`), never on the
    /// process-global recorder.
    pub fn register<R: Recorder + ?Sized>(recorder: &R) -> Self {
        recorder.describe_counter(
            "stun_requests".into(),
            None,
            "STUN datagrams received, by what happened to them".into(),
        );
        recorder.describe_counter(
            "stun_addrfamily".into(),
            None,
            "STUN requests answered, by the client's address family".into(),
        );
        let meta = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));
        let counter = |name: &'static str, label: &'static str, value: &'static str| {
            recorder.register_counter(&Key::from_parts(name, vec![Label::new(label, value)]), &meta)
        };
        StunMetrics {
            success: counter("stun_requests", "disposition", "success"),
            not_stun: counter("stun_requests", "disposition", "not_stun"),
            read_error: counter("stun_requests", "disposition", "read_error"),
            write_error: counter("stun_requests", "disposition", "write_error"),
            rate_limited: counter("stun_requests", "disposition", "rate_limited"),
            ipv4: counter("stun_addrfamily", "family", "ipv4"),
            ipv6: counter("stun_addrfamily", "family", "ipv6"),
        }
    }

    /// Handles that record nothing.
    pub fn noop() -> Self {
        StunMetrics {
            success: Counter::noop(),
            not_stun: Counter::noop(),
            read_error: Counter::noop(),
            write_error: Counter::noop(),
            rate_limited: Counter::noop(),
            ipv4: Counter::noop(),
            ipv6: Counter::noop(),
        }
    }
}

/// Per-batch tallies, flushed to the shared counters once per batch to keep atomics off the
/// per-packet path.
#[derive(Default)]
struct Tally {
    success: u64,
    not_stun: u64,
    write_error: u64,
    rate_limited: u64,
    ipv4: u64,
    ipv6: u64,
}

impl Tally {
    fn flush(&mut self, m: &StunMetrics) {
        for (n, c) in [
            (self.success, &m.success),
            (self.not_stun, &m.not_stun),
            (self.write_error, &m.write_error),
            (self.rate_limited, &m.rate_limited),
            (self.ipv4, &m.ipv4),
            (self.ipv6, &m.ipv6),
        ] {
            if n > 0 {
                c.increment(n);
            }
        }
        *self = Tally::default();
    }
}

/// The responder. Build it, then [`serve`](Self::serve) it on sockets from [`bind_sockets`].
pub struct StunServer {
    inner: Arc<Inner>,
}

struct Inner {
    strict: bool,
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    metrics: StunMetrics,
}

impl StunServer {
    /// A responder with `config`, recording into `metrics`.
    pub fn new(config: StunConfig, metrics: StunMetrics) -> Self {
        let limiter = config
            .per_ip_limit
            .map(|l| DefaultKeyedRateLimiter::keyed(Quota::per_second(l.per_second).allow_burst(l.burst)));
        StunServer { inner: Arc::new(Inner { strict: config.strict, limiter, metrics }) }
    }

    /// Answers requests on every socket until `cancel` fires, then returns. Must run inside a Tokio
    /// runtime; one task per socket is spawned (use a multi-thread runtime to use several cores).
    pub async fn serve(self, sockets: Vec<std::net::UdpSocket>, cancel: CancellationToken) -> io::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for sock in sockets {
            sock.set_nonblocking(true)?;
            let sock = UdpSocket::from_std(sock)?;
            tasks.spawn(socket_loop(self.inner.clone(), sock, cancel.clone()));
        }
        if self.inner.limiter.is_some() {
            let inner = self.inner.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(LIMITER_PRUNE_INTERVAL);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {
                            if let Some(l) = &inner.limiter {
                                l.retain_recent();
                                l.shrink_to_fit();
                            }
                        }
                    }
                }
            });
        }
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        Ok(())
    }
}

async fn socket_loop(inner: Arc<Inner>, sock: UdpSocket, cancel: CancellationToken) {
    let mut rx = Box::<RecvBatch>::default();
    let mut tx = Box::<SendBatch<MAX_RESPONSE_LEN>>::default();
    let mut tally = Tally::default();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            ready = sock.readable() => {
                if let Err(e) = ready {
                    tracing::warn!(error = %e, "STUN socket readiness failed");
                    return;
                }
            }
        }
        // Drain the socket: one batch in, its answers out, until it would block or the task has
        // had its turn (then yield, so cancellation and other tasks on this worker get to run).
        let mut turn_used_up = true;
        for _ in 0..BATCHES_PER_TURN {
            match sock.try_io(Interest::READABLE, || recv_batch(sock.as_fd(), &mut rx)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    turn_used_up = false;
                    break;
                }
                Err(e) => {
                    inner.metrics.read_error.increment(1);
                    tracing::debug!(error = %e, "STUN receive failed");
                    tokio::time::sleep(READ_ERROR_BACKOFF).await;
                    turn_used_up = false;
                    break;
                }
            }
            for pkt in rx.iter() {
                let (Some(from), false) = (pkt.from, pkt.truncated) else {
                    tally.not_stun += 1;
                    continue;
                };
                let txid = if inner.strict {
                    parse_tailscale_request(pkt.data).ok()
                } else {
                    parse_binding_request(pkt.data).ok().map(|r| r.txid)
                };
                let Some(txid) = txid else {
                    tally.not_stun += 1;
                    continue;
                };
                let src = SocketAddr::new(from.ip().to_canonical(), from.port());
                if let Some(limiter) = &inner.limiter {
                    if limiter.check_key(&src.ip()).is_err() {
                        tally.rate_limited += 1;
                        continue;
                    }
                }
                // A receive batch and a send batch hold the same number of datagrams.
                tx.push_from(from, pkt.local, |buf| write_response(txid, src, buf));
            }
            if !flush(&sock, &mut tx, &mut tally, &inner.metrics, &cancel).await {
                return;
            }
        }
        if turn_used_up {
            tokio::task::yield_now().await;
        }
    }
}

/// Sends everything queued in `tx`, waiting for writability if the socket buffer is full.
/// A datagram the kernel refuses is counted as a write error and skipped. Returns `false` if
/// cancelled while waiting.
///
/// The tally is published before and right after each send, so counters are current by the time a
/// client could act on its answer.
async fn flush(
    sock: &UdpSocket,
    tx: &mut SendBatch<MAX_RESPONSE_LEN>,
    tally: &mut Tally,
    metrics: &StunMetrics,
    cancel: &CancellationToken,
) -> bool {
    tally.flush(metrics);
    while !tx.is_empty() {
        match sock.try_io(Interest::WRITABLE, || send_batch(sock.as_fd(), tx)) {
            Ok(n) => {
                for to in tx.destinations().take(n) {
                    tally.success += 1;
                    if to.ip().to_canonical().is_ipv4() {
                        tally.ipv4 += 1;
                    } else {
                        tally.ipv6 += 1;
                    }
                }
                tx.consume(n);
                tally.flush(metrics);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::select! {
                    _ = cancel.cancelled() => {
                        tally.flush(metrics);
                        return false;
                    }
                    ready = sock.writable() => {
                        if ready.is_err() {
                            tally.write_error += tx.len() as u64;
                            tx.clear();
                        }
                    }
                }
            }
            Err(e) => {
                // sendmmsg reports an error only for the first datagram; skip it and go on.
                tracing::debug!(error = %e, "STUN send failed");
                tally.write_error += 1;
                tx.consume(1);
            }
        }
    }
    tally.flush(metrics);
    true
}

/// Binds `count` UDP sockets on `addr` (with `SO_REUSEPORT` when `count > 1`, so the kernel
/// spreads clients across them). With port 0 all sockets share the port the first one got.
///
/// An unspecified IPv6 address (`[::]`) is bound dual-stack; if IPv6 is unavailable on the host it
/// falls back to `0.0.0.0`.
pub fn bind_sockets(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let count = count.max(1);
    let first = match bind_one(addr, count > 1) {
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && is_no_ipv6(&e) => {
            let v4 = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), addr.port());
            tracing::warn!(error = %e, "IPv6 unavailable, STUN listening on IPv4 only");
            bind_one(v4, count > 1)?
        }
        other => other?,
    };
    let actual = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(bind_one(actual, true)?);
    }
    Ok(sockets)
}

fn is_no_ipv6(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL))
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        sock.set_only_v6(false)?;
    }
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    // Best effort: a deeper queue absorbs bursts; the kernel caps it at rmem_max/wmem_max.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    if addr.ip().is_unspecified() {
        // Answer from the address each request came to, not from whichever one routing picks.
        crate::batch::enable_packet_info(std::os::fd::AsFd::as_fd(&sock), addr.is_ipv6())?;
    }
    Ok(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_sockets_share_one_port() {
        let socks = bind_sockets("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(socks.len(), 3);
        let port = socks[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(socks.iter().all(|s| s.local_addr().unwrap().port() == port));
        // A socket without SO_REUSEPORT cannot take the port from under us.
        assert!(std::net::UdpSocket::bind(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn unspecified_ipv6_is_dual_stack() {
        let socks = bind_sockets("[::]:0".parse().unwrap(), 1).unwrap();
        let port = socks[0].local_addr().unwrap().port();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"x", ("127.0.0.1", port)).unwrap();
        socks[0].set_nonblocking(false).unwrap();
        socks[0].set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4];
        let (_, from) = socks[0].recv_from(&mut buf).unwrap();
        assert_eq!(from.ip().to_canonical(), client.local_addr().unwrap().ip());
    }
}
