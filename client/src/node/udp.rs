//! The node's UDP sockets and their batched I/O: one IPv4 and (when the host has IPv6) one IPv6
//! socket on the same port, read with `recvmmsg` + UDP GRO and written with UDP GSO
//! (`UDP_SEGMENT`), both through `quinn-udp`.
//!
//! Why batches: the direct path used to cost one syscall and one trip through every NAT and
//! forwarding hop per WireGuard datagram. A GSO send hands the kernel up to [`MAX_GSO_SEGMENTS`]
//! equal-sized datagrams to one destination as a single super-packet that crosses veths and NATs
//! whole and is split only where a device needs it (or not at all when the receiver has GRO on), and
//! `recvmmsg` takes a whole burst per syscall.
//!
//! Decisions:
//! - Two sockets instead of one dual-stack socket: an `IPV6_V6ONLY` socket beside the IPv4 one keeps
//!   IPv4 addresses plain (no `::ffff:` mapping in endpoints, STUN and disco) and lets the node run
//!   where IPv6 is disabled; Tailscale's magicsock does the same. The IPv6 socket takes the IPv4
//!   socket's port when free (so advertised endpoints share one port), else any port.
//! - Both bind the wildcard address, so an address that vanishes (roaming) never strands the
//!   socket: the kernel picks the new source address for the next datagram; the sockets are never
//!   rebound.
//! - Path MTU handling stays the kernel default (`IP_PMTUDISC_WANT`, as before the batching):
//!   quinn-udp switches its sockets to `IP_PMTUDISC_PROBE` (DF set, learned path MTU ignored), which
//!   would silently drop datagrams on a path narrower than the TUN MTU plus 60 bytes, so the node
//!   sets the default back. If a learned path MTU makes a GSO send fail, quinn-udp turns GSO off
//!   for that socket and [`UdpConn::send_batch`] sends one datagram at a time.
//! - A batch whose send would block waits for the socket to drain (backpressure into the TUN
//!   queue) instead of dropping: a dropped GSO batch is dozens of TCP losses inside the tunnel.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, info};

/// Socket buffer size asked for on each socket: WireGuard bursts (a TCP window through the
/// tunnel) overflow the 208 KiB default and every overflow is a TCP loss inside the tunnel.
pub const SOCKET_BUFFER: usize = 4 << 20;
/// Most datagrams in one GSO send (quinn-udp's batch size; the kernel allows 64).
pub const MAX_GSO_SEGMENTS: usize = quinn_udp::BATCH_SIZE;
/// Most payload bytes in one GSO send (a UDP datagram's 16-bit length bounds the super-packet).
pub const MAX_GSO_BYTES: usize = 65_000;
/// Receive buffers per `recvmmsg` call.
pub const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;
/// Size of each receive buffer: one GRO super-packet (up to 64 KiB).
pub const RECV_BUF_LEN: usize = 65_536;

/// Address family of one of the node's sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// the IPv4 socket
    V4,
    /// the IPv6 socket
    V6,
}

/// One bound socket with quinn-udp's per-socket state (GSO/GRO support found at bind time).
pub struct FamilySocket {
    sock: Arc<UdpSocket>,
    state: UdpSocketState,
}

impl FamilySocket {
    fn new(std: std::net::UdpSocket) -> io::Result<Self> {
        set_buffers(&std);
        std.set_nonblocking(true)?;
        let state = UdpSocketState::new((&std).into())?;
        restore_default_pmtu(&std);
        Ok(Self { sock: Arc::new(UdpSocket::from_std(std)?), state })
    }

    fn try_send(&self, t: &Transmit<'_>) -> io::Result<()> {
        self.sock.try_io(Interest::WRITABLE, || self.state.try_send((&*self.sock).into(), t))
    }

    /// Sends `contents` (datagrams of `seg` bytes, the last possibly shorter) to `to`, waiting while
    /// the socket is full. Falls back to one datagram per send if GSO turns out unsupported.
    async fn send_segments(&self, to: SocketAddr, contents: &[u8], seg: usize) -> io::Result<()> {
        let gso = contents.len() > seg && self.state.max_gso_segments() > 1;
        let t =
            Transmit { destination: to, ecn: None, contents, segment_size: gso.then_some(seg), src_ip: None };
        if gso || contents.len() <= seg {
            match self.send_waiting(&t).await {
                Err(e) if gso && self.state.max_gso_segments() == 1 => {
                    info!("UDP GSO unsupported here ({e}); sending datagrams one by one");
                }
                r => return r,
            }
        }
        for chunk in contents.chunks(seg) {
            let t =
                Transmit { destination: to, ecn: None, contents: chunk, segment_size: None, src_ip: None };
            self.send_waiting(&t).await?;
        }
        Ok(())
    }

    async fn send_waiting(&self, t: &Transmit<'_>) -> io::Result<()> {
        loop {
            self.sock.writable().await?;
            match self.try_send(t) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    async fn recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        loop {
            self.sock.readable().await?;
            let mut slices: Vec<IoSliceMut<'_>> = batch.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let r = self.sock.try_io(Interest::READABLE, || {
                self.state.recv((&*self.sock).into(), &mut slices, &mut batch.meta)
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

/// The node's UDP sockets (IPv4 always, IPv6 when it binds).
pub struct UdpConn {
    v4: FamilySocket,
    v6: Option<FamilySocket>,
}

impl UdpConn {
    /// Binds `0.0.0.0:port` (which must succeed) and `[::]:port` with `IPV6_V6ONLY` (any port if
    /// that one is taken; skipped when the host has no IPv6). Needs a tokio runtime.
    pub fn bind(port: u16) -> io::Result<Self> {
        let v4 = FamilySocket::new(std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?)?;
        let port = v4.sock.local_addr()?.port();
        let v6 = match bind_v6(port).or_else(|_| bind_v6(0)).and_then(FamilySocket::new) {
            Ok(s) => Some(s),
            Err(e) => {
                info!("no IPv6 UDP socket: {e}");
                None
            }
        };
        debug!(
            gso = v4.state.max_gso_segments(),
            gro = v4.state.gro_segments(),
            v6 = v6.is_some(),
            "UDP sockets bound"
        );
        Ok(Self { v4, v6 })
    }

    /// The IPv4 socket (shared with netcheck).
    pub fn v4(&self) -> &Arc<UdpSocket> {
        &self.v4.sock
    }

    /// The IPv6 socket, if bound.
    pub fn v6(&self) -> Option<&Arc<UdpSocket>> {
        self.v6.as_ref().map(|s| &s.sock)
    }

    /// The IPv4 socket's local address (`0.0.0.0:port`).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.v4.sock.local_addr()
    }

    /// The IPv6 socket's local address, if bound.
    pub fn local_addr_v6(&self) -> Option<SocketAddr> {
        self.v6.as_ref().and_then(|s| s.sock.local_addr().ok())
    }

    fn socket_for(&self, to: &SocketAddr) -> io::Result<&FamilySocket> {
        match to {
            SocketAddr::V4(_) => Ok(&self.v4),
            SocketAddr::V6(_) => self
                .v6
                .as_ref()
                .ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "no IPv6 socket")),
        }
    }

    /// Sends one datagram without waiting (fails with `WouldBlock` when the socket is full).
    pub fn try_send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        let t = Transmit { destination: to, ecn: None, contents: data, segment_size: None, src_ip: None };
        self.socket_for(&to)?.try_send(&t)
    }

    /// Sends every run of `batch` (GSO where possible), waiting while a socket is full; returns how
    /// many datagrams could not be sent (errors other than a full socket, e.g. no route), and empties
    /// the batch.
    pub async fn send_batch(&self, batch: &mut SendBatch) -> u64 {
        let mut failed = 0;
        for run in &batch.runs {
            let contents = &batch.buf[run.start..run.end];
            let r = match self.socket_for(&run.to) {
                Ok(s) => s.send_segments(run.to, contents, run.seg).await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                debug!(to = %run.to, "UDP send: {e}");
                failed += run.count as u64;
            }
        }
        batch.clear();
        failed
    }

    /// Receives the next burst on the `family` socket into `batch`; returns the number of filled
    /// buffers (see [`RecvBatch::datagrams`]). Pends forever for a family that is not bound.
    pub async fn recv(&self, family: Family, batch: &mut RecvBatch) -> io::Result<usize> {
        match (family, &self.v6) {
            (Family::V4, _) => self.v4.recv(batch).await,
            (Family::V6, Some(s)) => s.recv(batch).await,
            (Family::V6, None) => std::future::pending().await,
        }
    }
}

fn bind_v6(port: u16) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(true)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s.into())
}

/// Puts `IP_MTU_DISCOVER` (and `IPV6_MTU_DISCOVER` on IPv6 sockets) back to the kernel default.
fn restore_default_pmtu(sock: &std::net::UdpSocket) {
    let fd = sock.as_raw_fd();
    let v6 = sock.local_addr().is_ok_and(|a| a.is_ipv6());
    let opts: &[(libc::c_int, libc::c_int, libc::c_int)] = if v6 {
        &[(libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_WANT)]
    } else {
        &[(libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_WANT)]
    };
    for &(level, opt, val) in opts {
        // SAFETY: setsockopt on a socket we own with a pointer to a c_int of the stated size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Large buffers, forced past the sysctl cap when allowed (root), else the capped size.
fn set_buffers(sock: &std::net::UdpSocket) {
    let fd = sock.as_raw_fd();
    let size = SOCKET_BUFFER as libc::c_int;
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        let set = |opt| {
            // SAFETY: setsockopt on a socket we own with a pointer to a c_int of the stated size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            set(plain);
        }
    }
}

/// Buffers for one `recvmmsg` call.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self { bufs: vec![vec![0u8; RECV_BUF_LEN]; RECV_BATCH], meta: vec![RecvMeta::default(); RECV_BATCH] }
    }
}

impl RecvBatch {
    /// The datagrams of the first `filled` buffers, GRO super-packets split at their stride.
    pub fn datagrams(&self, filled: usize) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.meta.iter().zip(&self.bufs).take(filled).flat_map(|(m, b)| {
            let data = &b[..m.len.min(b.len())];
            let stride = if m.stride == 0 { data.len().max(1) } else { m.stride };
            data.chunks(stride).map(move |d| (m.addr, d))
        })
    }
}

/// One GSO run: datagrams to one destination, all `seg` bytes but the last.
#[derive(Debug)]
struct Run {
    to: SocketAddr,
    seg: usize,
    start: usize,
    end: usize,
    count: usize,
    /// the last datagram was shorter than `seg`, so nothing more may join
    closed: bool,
}

/// Outgoing datagrams gathered while a batch of TUN packets is encrypted, grouped into GSO runs
/// (consecutive datagrams to the same address and of the same size, the last may be shorter).
#[derive(Debug, Default)]
pub struct SendBatch {
    buf: Vec<u8>,
    runs: Vec<Run>,
}

impl SendBatch {
    /// Queues one datagram to `to`.
    pub fn push(&mut self, to: SocketAddr, data: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        let end = self.buf.len();
        if let Some(r) = self.runs.last_mut() {
            if r.to == to
                && !r.closed
                && data.len() <= r.seg
                && r.count < MAX_GSO_SEGMENTS
                && end - r.start <= MAX_GSO_BYTES
            {
                r.end = end;
                r.count += 1;
                r.closed = data.len() < r.seg;
                return;
            }
        }
        self.runs.push(Run { to, seg: data.len().max(1), start, end, count: 1, closed: false });
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.runs.iter().map(|r| r.count).sum()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Sends (GSO) runs queued, for tests and diagnostics.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.runs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_batch_groups_equal_sized_datagrams_per_destination() {
        let (a, b): (SocketAddr, SocketAddr) =
            ("192.0.2.1:1".parse().unwrap(), "192.0.2.2:1".parse().unwrap());
        let mut s = SendBatch::default();
        for _ in 0..3 {
            s.push(a, &[1; 100]);
        }
        s.push(a, &[2; 40]); // shorter: ends the run
        s.push(a, &[3; 100]); // so this starts a new one
        s.push(b, &[4; 100]); // other destination
        s.push(b, &[5; 120]); // longer than the run's size: new run
        assert_eq!(s.len(), 7);
        assert_eq!(s.run_count(), 4);
        assert_eq!(s.runs[0].count, 4);
        assert_eq!(s.runs[0].end - s.runs[0].start, 340);
        // A run stops at the segment limit.
        let mut s = SendBatch::default();
        for _ in 0..MAX_GSO_SEGMENTS + 1 {
            s.push(a, &[0; 1000]);
        }
        assert_eq!(s.run_count(), 2);
        // ... and at the byte limit.
        let mut s = SendBatch::default();
        for _ in 0..MAX_GSO_SEGMENTS {
            s.push(a, &[0; 8000]);
        }
        assert!(s.runs.iter().all(|r| r.end - r.start <= MAX_GSO_BYTES), "{:?}", s.runs);
    }

    /// Real sockets on loopback: a GSO batch arrives as separate datagrams (split by GRO stride or
    /// by the kernel), in order and intact, plus a single datagram from `try_send_to`.
    #[tokio::test]
    async fn batches_cross_loopback_intact() {
        let a = UdpConn::bind(0).unwrap();
        let b = UdpConn::bind(0).unwrap();
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, b.local_addr().unwrap().port()));
        let mut s = SendBatch::default();
        for i in 0..20u8 {
            s.push(to, &[i; 1200]);
        }
        s.push(to, &[99; 10]);
        assert_eq!(a.send_batch(&mut s).await, 0);
        assert!(s.is_empty());
        a.try_send_to(b"single", to).unwrap();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut rb = RecvBatch::default();
        while got.len() < 22 {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), b.recv(Family::V4, &mut rb))
                .await
                .expect("datagrams arrive")
                .unwrap();
            for (from, d) in rb.datagrams(n) {
                assert_eq!(from.port(), a.local_addr().unwrap().port());
                got.push(d.to_vec());
            }
        }
        for (i, d) in got.iter().take(20).enumerate() {
            assert_eq!(d, &vec![i as u8; 1200]);
        }
        assert_eq!(got[20], vec![99; 10]);
        assert_eq!(got[21], b"single");
    }

    fn sockopt(fd: std::os::fd::RawFd, level: libc::c_int, opt: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a c_int of the stated size on an open socket.
        let rc = unsafe { libc::getsockopt(fd, level, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
        assert_eq!(rc, 0);
        v
    }

    #[tokio::test]
    async fn path_mtu_discovery_is_the_kernel_default() {
        let c = UdpConn::bind(0).unwrap();
        let v4 = sockopt(c.v4().as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER);
        assert_eq!(v4, libc::IP_PMTUDISC_WANT);
        if let Some(s) = c.v6() {
            let v6 = sockopt(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER);
            assert_eq!(v6, libc::IPV6_PMTUDISC_WANT);
        }
    }

    /// The IPv6 socket (loopback `::1`) carries datagrams too, and shares the IPv4 port.
    #[tokio::test]
    async fn ipv6_socket_carries_datagrams() {
        let a = UdpConn::bind(0).unwrap();
        let b = UdpConn::bind(0).unwrap();
        let bport = b.local_addr_v6().expect("IPv6 socket bound").port();
        assert_eq!(bport, b.local_addr().unwrap().port());
        let to = SocketAddr::from((Ipv6Addr::LOCALHOST, bport));
        let mut s = SendBatch::default();
        for _ in 0..5 {
            s.push(to, &[7; 500]);
        }
        assert_eq!(a.send_batch(&mut s).await, 0);
        let mut rb = RecvBatch::default();
        let mut count = 0;
        while count < 5 {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), b.recv(Family::V6, &mut rb))
                .await
                .expect("datagrams arrive")
                .unwrap();
            for (from, d) in rb.datagrams(n) {
                assert!(from.is_ipv6());
                assert_eq!(d, &[7; 500][..]);
                count += 1;
            }
        }
    }
}
