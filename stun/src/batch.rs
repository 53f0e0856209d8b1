//! Batched UDP receive and send (`recvmmsg`/`sendmmsg`) behind a safe interface.
//!
//! The responder's cost per request is dominated by system calls; moving up to [`BATCH`] datagrams
//! per call amortises the syscall entry and the readiness bookkeeping. All buffers are owned by the
//! batch structs and the kernel-facing header arrays are rebuilt right before each call, so no
//! pointer ever outlives or escapes the borrow it was taken from. Linux only.
//!
//! A socket bound to a wildcard address (`:3478`) must answer from the address each request was
//! sent to, or a multi-homed host (several IPv6 addresses are the common case) answers from
//! whichever address routing picks and the client's firewall or NAT drops the answer. Such
//! sockets ask for packet info ([`enable_packet_info`]); each [`Received`] then carries its
//! [`LocalAddr`] and [`SendBatch::push_from`] sends the answer from it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Receive buffer per datagram. Requests are ~20–100 bytes; anything that does not fit is
/// reported truncated and dropped by the responder.
pub const RECV_BUF: usize = 2048;

/// The local address a datagram arrived on, from the kernel's packet info (`IP_PKTINFO` on an
/// IPv4 socket, `IPV6_PKTINFO` on an IPv6 one, where IPv4 arrivals show as v4-mapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalAddr {
    /// On an IPv4 socket: the local address the kernel would answer from (`ipi_spec_dst`).
    V4(Ipv4Addr),
    /// On an IPv6 socket: the destination address and the interface it arrived on (needed to
    /// answer from a link-local address).
    V6 {
        /// Destination address (v4-mapped for IPv4 on a dual-stack socket).
        addr: Ipv6Addr,
        /// Arrival interface index.
        ifindex: u32,
    },
}

impl LocalAddr {
    /// The address as a plain IP (v4-mapped addresses unmapped).
    pub fn ip(&self) -> IpAddr {
        match *self {
            LocalAddr::V4(a) => IpAddr::V4(a),
            LocalAddr::V6 { addr, .. } => IpAddr::V6(addr).to_canonical(),
        }
    }
}

/// Room for the control messages of one datagram (one packet info, with headroom), aligned for
/// `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Ctrl([u8; CTRL_LEN]);
const CTRL_LEN: usize = 128;

/// One received datagram.
#[derive(Debug)]
pub struct Received<'a> {
    /// Payload (at most [`RECV_BUF`] bytes).
    pub data: &'a [u8],
    /// Source address (`None` only for a non-IP source, which a UDP/IP socket never reports).
    pub from: Option<SocketAddr>,
    /// The datagram was larger than the buffer and was cut.
    pub truncated: bool,
    /// Where it arrived, when the socket reports packet info ([`enable_packet_info`]).
    pub local: Option<LocalAddr>,
}

/// Receive side: [`BATCH`] buffers plus their source addresses.
pub struct RecvBatch {
    bufs: Vec<[u8; RECV_BUF]>,
    lens: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
    truncated: [bool; BATCH],
    local: [Option<LocalAddr>; BATCH],
    ctrl: Vec<Ctrl>,
    count: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![[0u8; RECV_BUF]; BATCH],
            lens: [0; BATCH],
            from: [None; BATCH],
            truncated: [false; BATCH],
            local: [None; BATCH],
            ctrl: vec![Ctrl([0; CTRL_LEN]); BATCH],
            count: 0,
        }
    }
}

impl RecvBatch {
    /// The datagrams filled by the last successful [`recv`](Self::recv).
    pub fn iter(&self) -> impl Iterator<Item = Received<'_>> {
        (0..self.count).map(move |i| Received {
            data: &self.bufs[i][..self.lens[i]],
            from: self.from[i],
            truncated: self.truncated[i],
            local: self.local[i],
        })
    }
}

/// Send side: up to [`BATCH`] small datagrams queued with their destinations.
pub struct SendBatch<const N: usize> {
    bufs: Vec<[u8; N]>,
    lens: [usize; BATCH],
    to: [Option<SocketAddr>; BATCH],
    from: [Option<LocalAddr>; BATCH],
    /// Room for each datagram's packet-info message, kept with the batch (not rebuilt per send).
    ctrl: Vec<Ctrl>,
    count: usize,
}

impl<const N: usize> Default for SendBatch<N> {
    fn default() -> Self {
        SendBatch {
            bufs: vec![[0u8; N]; BATCH],
            lens: [0; BATCH],
            to: [None; BATCH],
            from: [None; BATCH],
            ctrl: vec![Ctrl([0; CTRL_LEN]); BATCH],
            count: 0,
        }
    }
}

impl<const N: usize> SendBatch<N> {
    /// Queued datagrams.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Room for another datagram.
    pub fn is_full(&self) -> bool {
        self.count == BATCH
    }

    /// Queues a datagram written by `fill` (which returns its length) to `to`.
    /// Returns `false` (queueing nothing) if the batch is full.
    pub fn push(&mut self, to: SocketAddr, fill: impl FnOnce(&mut [u8; N]) -> usize) -> bool {
        self.push_from(to, None, fill)
    }

    /// As [`push`](Self::push), sent from `from` (the [`Received::local`] of the request being
    /// answered) when given; the socket's own address otherwise.
    pub fn push_from(
        &mut self,
        to: SocketAddr,
        from: Option<LocalAddr>,
        fill: impl FnOnce(&mut [u8; N]) -> usize,
    ) -> bool {
        if self.is_full() {
            return false;
        }
        let i = self.count;
        self.lens[i] = fill(&mut self.bufs[i]).min(N);
        self.to[i] = Some(to);
        self.from[i] = from;
        self.count += 1;
        true
    }

    /// Destinations of the queued datagrams, front first.
    pub fn destinations(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.to[..self.count].iter().flatten().copied()
    }

    /// Drops the first `n` queued datagrams (they were sent, or given up on).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.count);
        for i in n..self.count {
            self.bufs.swap(i - n, i);
            self.lens[i - n] = self.lens[i];
            self.to[i - n] = self.to[i];
            self.from[i - n] = self.from[i];
        }
        self.count -= n;
    }

    /// Empties the batch.
    pub fn clear(&mut self) {
        self.count = 0;
    }
}

#[cfg(not(target_os = "linux"))]
compile_error!("derpfleet-stun's batched UDP I/O uses recvmmsg/sendmmsg and supports Linux only");

mod sys {
    use super::*;
    use socket2::{SockAddr, SockAddrStorage};
    use std::os::fd::{AsRawFd, BorrowedFd};

    /// Non-blocking `recvmmsg` into `batch`; returns the number of datagrams (0 is never returned:
    /// an empty socket yields `WouldBlock`).
    pub fn recv(fd: BorrowedFd<'_>, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.count = 0;
        let mut addrs: [SockAddrStorage; BATCH] = std::array::from_fn(|_| SockAddrStorage::zeroed());
        let mut iovs: [libc::iovec; BATCH] =
            std::array::from_fn(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 });
        for (iov, buf) in iovs.iter_mut().zip(batch.bufs.iter_mut()) {
            iov.iov_base = buf.as_mut_ptr().cast();
            iov.iov_len = RECV_BUF;
        }
        // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (((hdr, iov), addr), ctrl) in
            hdrs.iter_mut().zip(iovs.iter_mut()).zip(addrs.iter_mut()).zip(batch.ctrl.iter_mut())
        {
            hdr.msg_hdr.msg_namelen = addr.size_of();
            hdr.msg_hdr.msg_name = (addr as *mut SockAddrStorage).cast();
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = ctrl.0.as_mut_ptr().cast();
            hdr.msg_hdr.msg_controllen = CTRL_LEN as _;
        }
        // SAFETY: every pointer in `hdrs` refers to a live local (`iovs`, `addrs`) or to
        // `batch.bufs` / `batch.ctrl`, all exclusively borrowed for the duration of the call, with
        // the lengths given; the kernel writes at most those lengths.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            let hdr = &hdrs[i];
            batch.lens[i] = (hdr.msg_len as usize).min(RECV_BUF);
            batch.truncated[i] = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let storage = std::mem::replace(&mut addrs[i], SockAddrStorage::zeroed());
            // SAFETY: the storage was zeroed, then the kernel wrote a sockaddr of `msg_namelen`
            // bytes (never more than the storage size) into it.
            let addr = unsafe { SockAddr::new(storage, hdr.msg_hdr.msg_namelen) };
            batch.from[i] = addr.as_socket();
            batch.local[i] = packet_info(&hdr.msg_hdr);
        }
        batch.count = n;
        Ok(n)
    }

    /// Non-blocking `sendmmsg` of the queued datagrams; returns how many were sent (from the front).
    pub fn send<const N: usize>(fd: BorrowedFd<'_>, batch: &mut SendBatch<N>) -> io::Result<usize> {
        let count = batch.count;
        if count == 0 {
            return Ok(0);
        }
        let addrs: Vec<SockAddr> =
            batch.to[..count].iter().map(|a| SockAddr::from(a.expect("queued with an address"))).collect();
        let mut iovs: [libc::iovec; BATCH] =
            std::array::from_fn(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 });
        for ((iov, buf), len) in iovs.iter_mut().zip(batch.bufs.iter_mut()).zip(&batch.lens).take(count) {
            iov.iov_base = buf.as_mut_ptr().cast();
            iov.iov_len = *len;
        }
        // SAFETY: plain old data, all-zero is valid.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for ((((hdr, addr), iov), ctrl), from) in
            hdrs.iter_mut().zip(&addrs).zip(iovs.iter_mut()).zip(batch.ctrl.iter_mut()).zip(&batch.from)
        {
            hdr.msg_hdr.msg_name = addr.as_ptr().cast_mut().cast();
            hdr.msg_hdr.msg_namelen = addr.len();
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            if let Some(from) = from {
                set_packet_info(&mut hdr.msg_hdr, ctrl, *from);
            }
        }
        // SAFETY: the first `count` headers point at live addresses (`addrs`), iovecs (`iovs`),
        // control buffers and buffers (`batch.ctrl`, `batch.bufs`, exclusively borrowed) with correct
        // lengths; the kernel only reads.
        let n = unsafe {
            libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), count as libc::c_uint, libc::MSG_DONTWAIT)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Asks the kernel to report each datagram's local address (see [`LocalAddr`]).
    pub fn enable_packet_info(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
        let on: libc::c_int = 1;
        let (level, name) = if ipv6 {
            (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
        } else {
            (libc::IPPROTO_IP, libc::IP_PKTINFO)
        };
        // SAFETY: `on` is a live c_int and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The packet info among the control messages the kernel wrote for `hdr`, if any.
    fn packet_info(hdr: &libc::msghdr) -> Option<LocalAddr> {
        if hdr.msg_controllen == 0 || hdr.msg_flags & libc::MSG_CTRUNC != 0 {
            return None;
        }
        // SAFETY: `hdr` was filled by recvmmsg: msg_control points at our CTRL_LEN buffer and
        // msg_controllen says how much of it holds complete control messages; the CMSG macros
        // stay within that length, and each payload is read unaligned after checking its size.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
            while !cmsg.is_null() {
                let c = &*cmsg;
                let data = libc::CMSG_DATA(cmsg);
                let len = c.cmsg_len as usize;
                if c.cmsg_level == libc::IPPROTO_IP
                    && c.cmsg_type == libc::IP_PKTINFO
                    && len >= libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize
                {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    return Some(LocalAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr))));
                }
                if c.cmsg_level == libc::IPPROTO_IPV6
                    && c.cmsg_type == libc::IPV6_PKTINFO
                    && len >= libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize
                {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    return Some(LocalAddr::V6 {
                        addr: Ipv6Addr::from(info.ipi6_addr.s6_addr),
                        ifindex: info.ipi6_ifindex,
                    });
                }
                cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
            }
        }
        None
    }

    /// Points `hdr` at one packet-info control message in `ctrl` that makes the kernel send from
    /// `from`. The interface is pinned only for link-local IPv6 (elsewhere routing picks it, so
    /// asymmetric routes keep working).
    fn set_packet_info(hdr: &mut libc::msghdr, ctrl: &mut Ctrl, from: LocalAddr) {
        let (level, kind, payload_len) = match from {
            LocalAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO, std::mem::size_of::<libc::in_pktinfo>()),
            LocalAddr::V6 { .. } => {
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, std::mem::size_of::<libc::in6_pktinfo>())
            }
        };
        hdr.msg_control = ctrl.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE of one pktinfo (≤ 40 bytes) fits CTRL_LEN; the header and payload are
        // written inside `ctrl` through the CMSG macros, payload unaligned.
        unsafe {
            hdr.msg_controllen = libc::CMSG_SPACE(payload_len as u32) as _;
            let cmsg = libc::CMSG_FIRSTHDR(hdr);
            (*cmsg).cmsg_level = level;
            (*cmsg).cmsg_type = kind;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload_len as u32) as _;
            let data = libc::CMSG_DATA(cmsg);
            match from {
                LocalAddr::V4(a) => {
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr { s_addr: u32::from(a).to_be() },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(data.cast::<libc::in_pktinfo>(), info);
                }
                LocalAddr::V6 { addr, ifindex } => {
                    let link_local = addr.segments()[0] & 0xffc0 == 0xfe80;
                    let info = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr { s6_addr: addr.octets() },
                        ipi6_ifindex: if link_local { ifindex } else { 0 },
                    };
                    std::ptr::write_unaligned(data.cast::<libc::in6_pktinfo>(), info);
                }
            }
        }
    }
}

/// Makes a socket report each datagram's local address in [`Received::local`]; for sockets bound
/// to a wildcard address (`ipv6` = the socket is AF_INET6, dual-stack or not).
pub fn enable_packet_info(fd: std::os::fd::BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    sys::enable_packet_info(fd, ipv6)
}

/// Receives up to [`BATCH`] datagrams without blocking (`WouldBlock` when none are waiting).
pub fn recv_batch(fd: std::os::fd::BorrowedFd<'_>, batch: &mut RecvBatch) -> io::Result<usize> {
    sys::recv(fd, batch)
}

/// Sends queued datagrams without blocking; returns how many left (from the front of the batch).
/// The caller [`consume`](SendBatch::consume)s them.
pub fn send_batch<const N: usize>(
    fd: std::os::fd::BorrowedFd<'_>,
    batch: &mut SendBatch<N>,
) -> io::Result<usize> {
    sys::send(fd, batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn send_batch_consume_keeps_the_unsent_tail_in_order() {
        let mut b = SendBatch::<4>::default();
        for i in 0..5u8 {
            let to = SocketAddr::from(([127, 0, 0, 1], 1000 + u16::from(i)));
            assert!(b.push(to, |buf| {
                buf[0] = i;
                1
            }));
        }
        b.consume(2);
        assert_eq!(b.len(), 3);
        let ports: Vec<u16> = b.destinations().map(|a| a.port()).collect();
        assert_eq!(ports, [1002, 1003, 1004]);
        assert_eq!((b.bufs[0][0], b.bufs[2][0]), (2, 4));
        b.consume(10);
        assert!(b.is_empty());
    }

    #[test]
    fn send_batch_refuses_past_capacity() {
        let mut b = SendBatch::<4>::default();
        let to = SocketAddr::from(([127, 0, 0, 1], 1));
        for _ in 0..BATCH {
            assert!(b.push(to, |_| 4));
        }
        assert!(b.is_full());
        assert!(!b.push(to, |_| 4));
        assert_eq!(b.len(), BATCH);
    }

    #[test]
    fn batched_round_trip_over_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut tx = SendBatch::<8>::default();
        tx.push(c.local_addr().unwrap(), |buf| {
            buf[..3].copy_from_slice(b"one");
            3
        });
        tx.push(c.local_addr().unwrap(), |buf| {
            buf[..3].copy_from_slice(b"two");
            3
        });
        assert_eq!(send_batch(a.as_fd(), &mut tx).unwrap(), 2);
        let mut tx6 = SendBatch::<8>::default();
        let d = std::net::UdpSocket::bind("[::1]:0").unwrap();
        tx6.push(d.local_addr().unwrap(), |buf| {
            buf[..5].copy_from_slice(b"three");
            5
        });
        assert_eq!(send_batch(b.as_fd(), &mut tx6).unwrap(), 1);

        let mut rx = RecvBatch::default();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 2 && std::time::Instant::now() < deadline {
            match recv_batch(c.as_fd(), &mut rx) {
                Ok(_) => got.extend(rx.iter().map(|p| (p.data.to_vec(), p.from, p.truncated))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let a_addr = Some(a.local_addr().unwrap());
        assert_eq!(got, [(b"one".to_vec(), a_addr, false), (b"two".to_vec(), a_addr, false)]);
        // Empty socket: WouldBlock, not a zero-length batch.
        assert_eq!(recv_batch(c.as_fd(), &mut rx).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // IPv6 source addresses decode, and oversized datagrams are flagged truncated.
        let big = vec![7u8; RECV_BUF + 10];
        b.send_to(&big, d.local_addr().unwrap()).unwrap();
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while seen.len() < 2 && std::time::Instant::now() < deadline {
            match recv_batch(d.as_fd(), &mut rx) {
                Ok(_) => seen.extend(rx.iter().map(|p| (p.data.len(), p.from, p.truncated))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let b_addr = Some(b.local_addr().unwrap());
        assert_eq!(seen, [(5, b_addr, false), (RECV_BUF, b_addr, true)]);
    }
}
