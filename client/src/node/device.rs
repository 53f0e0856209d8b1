//! Where inner IP packets come from and go to: a TUN device, or the userspace port forwarder.

use std::io;

use super::tun::{PacketBatch, Tun};
use super::userspace::Userspace;

/// The node's packet device.
pub enum Device {
    /// A kernel TUN interface.
    Tun(Tun),
    /// Local UDP ports forwarded through the tunnel (no TUN).
    Userspace(Userspace),
}

impl Device {
    /// The next inner packet to send through the tunnel.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Device::Tun(t) => t.recv(buf).await,
            Device::Userspace(u) => u.recv(buf).await,
        }
    }

    /// The next burst of inner packets (at least one).
    pub async fn recv_batch(&self, batch: &mut PacketBatch) -> io::Result<usize> {
        match self {
            Device::Tun(t) => t.recv_batch(batch).await,
            Device::Userspace(u) => {
                batch.clear();
                let n = u.recv(batch.next_buf()).await?;
                batch.commit(n);
                Ok(1)
            }
        }
    }

    /// Delivers an inner packet from the tunnel without waiting (a full queue drops it).
    pub fn try_send(&self, pkt: &[u8]) -> io::Result<usize> {
        match self {
            Device::Tun(t) => t.try_send(pkt),
            Device::Userspace(u) => u.try_send(pkt),
        }
    }
}
