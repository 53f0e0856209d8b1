//! A Linux TUN device (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`) read and written asynchronously.
//!
//! The unsafe part is two `libc` calls (open is safe through std; `ioctl(TUNSETIFF)` and the
//! raw read/write on a non-blocking fd). Addresses, MTU and link state are set with `ip`, the tool an
//! operator would use, so the interface looks exactly as if configured by hand.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Command;

use tokio::io::unix::AsyncFd;

use super::config::IpNet;

/// Why the TUN device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// Opening `/dev/net/tun` or `TUNSETIFF` failed (root or CAP_NET_ADMIN needed).
    #[error("creating TUN {name}: {source}")]
    Create {
        /// interface name
        name: String,
        /// why
        source: io::Error,
    },
    /// An `ip` command failed.
    #[error("configuring {name}: `ip {args}`: {msg}")]
    Ip {
        /// interface name
        name: String,
        /// the arguments
        args: String,
        /// stderr
        msg: String,
    },
}

/// An open TUN interface.
pub struct Tun {
    fd: AsyncFd<OwnedFd>,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

impl Tun {
    /// Creates (or attaches to) interface `name`. Needs a tokio runtime.
    pub fn create(name: &str) -> Result<Self, TunError> {
        let err = |source| TunError::Create { name: name.to_string(), source };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(err(io::Error::new(io::ErrorKind::InvalidInput, "bad interface name")));
        }
        let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(err)?;
        let fd: OwnedFd = file.into();
        let mut req =
            IfReq { name: [0; libc::IFNAMSIZ], flags: (libc::IFF_TUN | libc::IFF_NO_PI) as _, _pad: [0; 22] };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: fd is an open /dev/net/tun descriptor and req is a properly sized ifreq.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: fcntl on an fd we own.
        let rc = unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        };
        if rc < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: fd is a valid open descriptor owned by the OwnedFd we move into the AsyncFd, so it
        // stays open and unchanged for the AsyncFd's lifetime.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| err(e.into()))?;
        Ok(Self { fd, name: name.to_string() })
    }

    /// Sets MTU, addresses (each also installs its on-link route) and brings the link up.
    pub fn configure(&self, addresses: &[IpNet], mtu: u16) -> Result<(), TunError> {
        self.ip(&["link", "set", "dev", &self.name, "mtu", &mtu.to_string()])?;
        for a in addresses {
            self.ip(&["addr", "add", &a.to_string(), "dev", &self.name])?;
        }
        self.ip(&["link", "set", "dev", &self.name, "up"])
    }

    /// Adds a route to `net` through this interface (for allowed IPs outside the address prefixes).
    pub fn add_route(&self, net: &IpNet) -> Result<(), TunError> {
        self.ip(&["route", "replace", &net.to_string(), "dev", &self.name])
    }

    fn ip(&self, args: &[&str]) -> Result<(), TunError> {
        let fail = |msg: String| TunError::Ip { name: self.name.clone(), args: args.join(" "), msg };
        let out = Command::new("ip").args(args).output().map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one IP packet.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut g = self.fd.readable().await?;
            match g.try_io(|fd| read_fd(fd.as_raw_fd(), buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads a burst: waits for the first packet, then takes what is already queued, up to
    /// `batch.capacity()` packets (one `read(2)` each; a TUN fd without `IFF_VNET_HDR` has no
    /// multi-packet read, but the encryption and UDP sends behind it can then be batched).
    pub async fn recv_batch(&self, batch: &mut PacketBatch) -> io::Result<usize> {
        batch.clear();
        loop {
            let mut g = self.fd.readable().await?;
            while batch.len() < batch.capacity() {
                match read_fd(self.fd.get_ref().as_raw_fd(), batch.next_buf()) {
                    Ok(n) => batch.commit(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        g.clear_ready();
                        break;
                    }
                    Err(e) if batch.is_empty() => return Err(e),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                return Ok(batch.len());
            }
        }
    }

    /// Writes one IP packet without waiting; fails with `WouldBlock` when the device queue is full.
    pub fn try_send(&self, pkt: &[u8]) -> io::Result<usize> {
        write_fd(self.fd.get_ref().as_raw_fd(), pkt)
    }

    /// Writes one IP packet.
    pub async fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        loop {
            let mut g = self.fd.writable().await?;
            match g.try_io(|fd| write_fd(fd.as_raw_fd(), pkt)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Packets read in one burst: fixed buffers, reused for every burst.
pub struct PacketBatch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
}

impl PacketBatch {
    /// Room for `count` packets of up to `max_len` bytes each.
    pub fn new(count: usize, max_len: usize) -> Self {
        Self { bufs: vec![vec![0u8; max_len]; count.max(1)], lens: Vec::with_capacity(count.max(1)) }
    }

    /// Most packets one burst holds.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Packets held.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Forgets the held packets.
    pub fn clear(&mut self) {
        self.lens.clear();
    }

    /// The buffer the next packet is read into (call [`PacketBatch::commit`] after filling it).
    /// Panics when full.
    pub fn next_buf(&mut self) -> &mut [u8] {
        let i = self.lens.len();
        &mut self.bufs[i]
    }

    /// Keeps the first `len` bytes of [`PacketBatch::next_buf`] as the next packet.
    pub fn commit(&mut self, len: usize) {
        let i = self.lens.len();
        self.lens.push(len.min(self.bufs[i].len()));
    }

    /// The held packets, in read order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.lens.iter().zip(&self.bufs).map(|(&n, b)| &b[..n])
    }
}

/// One `read(2)` on the non-blocking TUN fd.
fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reading into a valid mutable buffer of buf.len() bytes from a fd we own.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `write(2)` on the non-blocking TUN fd (one IP packet).
fn write_fd(fd: RawFd, pkt: &[u8]) -> io::Result<usize> {
    // SAFETY: writing from a valid buffer of pkt.len() bytes to a fd we own.
    let n = unsafe { libc::write(fd, pkt.as_ptr().cast(), pkt.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
