//! "Does a packet from this client reach that one, and how fast": numbered probe packets sent until
//! one arrives.
//!
//! A relay registers a client only after its ServerInfo, and a mesh peer learns of a client only
//! when PeerPresent crosses the mesh, so the first packet may legitimately find nobody. The sender
//! therefore repeats (a fresh sequence number every [`RESEND_EVERY`]) and the latency is taken
//! from the send of the packet that arrived.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use derpfleet_proto::msg::ServerToClient;
use tokio::time::Instant;

use derpfleet_client::conn::DerpSender;
use derpfleet_proto::NodePublic;

use super::ProbeClient;

/// How often an unanswered probe packet is sent again.
pub(crate) const RESEND_EVERY: Duration = Duration::from_millis(200);
/// Tag at the start of every probe packet (so stray traffic is never mistaken for ours).
const TAG: &[u8; 8] = b"dfprobe1";

fn packet(nonce: u64, seq: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(20);
    b.put_slice(TAG);
    b.put_u64(nonce);
    b.put_u32(seq);
    b.freeze()
}

fn parse(data: &[u8], nonce: u64) -> Option<u32> {
    if data.len() != 20 || &data[..8] != TAG || data[8..16] != nonce.to_be_bytes() {
        return None;
    }
    Some(u32::from_be_bytes(data[16..20].try_into().ok()?))
}

/// Sends probe packets from `from` to `to` until one arrives; returns its one-way latency.
pub(crate) fn deliver<'a>(
    from: &'a ProbeClient,
    to: &'a mut ProbeClient,
) -> impl std::future::Future<Output = Result<Duration, String>> + Send + 'a {
    // Only the sending half is held across awaits (the receiving half is not `Sync`).
    deliver_from(&from.tx, from.key, to)
}

async fn deliver_from(
    tx: &DerpSender,
    from_key: NodePublic,
    to: &mut ProbeClient,
) -> Result<Duration, String> {
    let nonce: u64 = rand::random();
    let mut sent: Vec<Instant> = Vec::new();
    let mut next_send = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_send) => {
                let seq = sent.len() as u32;
                tx
                    .send_packet(to.key, packet(nonce, seq))
                    .await
                    .map_err(|e| format!("sending probe packet: {e}"))?;
                sent.push(Instant::now());
                next_send = Instant::now() + RESEND_EVERY;
            }
            m = to.rx.recv() => match m.map_err(|e| format!("receiving probe packet: {e}"))? {
                ServerToClient::RecvPacket { src, data } if src == from_key => {
                    if let Some(at) = parse(&data, nonce).and_then(|seq| sent.get(seq as usize)) {
                        return Ok(at.elapsed());
                    }
                }
                _ => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip_and_foreign_ones_are_refused() {
        let p = packet(7, 3);
        assert_eq!(parse(&p, 7), Some(3));
        assert_eq!(parse(&p, 8), None);
        assert_eq!(parse(b"short", 7), None);
    }
}
