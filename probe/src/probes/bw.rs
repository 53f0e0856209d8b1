//! `bw`: `-bw-probe-size-bytes` through one node, from one probe client to another, in 16 KiB
//! packets. The receiver acknowledges every [`ACK_EVERY`] packets and the sender keeps at most
//! [`WINDOW`] packets unacknowledged, so the transfer runs at what the node forwards instead of
//! overflowing its per-client queue (which would drop, as a relay must). The latency is the
//! transfer time; the throughput is exported as bytes per second.

use std::time::Instant;

use bytes::Bytes;
use derpfleet_proto::msg::ServerToClient;

use super::deliver::deliver;
use super::{connect, ProbeEnv};
use crate::plan::ProbeSpec;
use crate::results::Measured;

const CHUNK: usize = 16 << 10;
/// Payload byte of transfer packets (never the first byte of a delivery-check packet).
const FILL: u8 = 0x5a;
/// Packets in flight at most (below derper's per-client queue of 32).
const WINDOW: u64 = 24;
/// The receiver acknowledges this often.
const ACK_EVERY: u64 = 8;

/// Runs the probe.
pub async fn probe(spec: &ProbeSpec, env: &ProbeEnv) -> Result<Measured, String> {
    let (a, b) = tokio::join!(connect(&spec.node, env), connect(&spec.node, env));
    let (mut a, mut b) = (a?, b?);
    // The transfer starts once the node has registered the receiver.
    deliver(&a, &mut b).await?;
    let total = env.bw_size.max(1);
    let packets = total.div_ceil(CHUNK as u64);
    let last_len = (total - (packets - 1) * CHUNK as u64) as usize;
    let (a_key, b_key) = (a.key, b.key);
    let receiver = tokio::spawn(async move {
        let mut got = 0u64;
        while got < packets {
            match b.rx.recv().await.map_err(|e| format!("bw receiver: {e}"))? {
                ServerToClient::RecvPacket { src, data } if src == a_key && data.first() == Some(&FILL) => {
                    got += 1;
                    if got.is_multiple_of(ACK_EVERY) || got == packets {
                        b.tx.send_packet(a_key, Bytes::copy_from_slice(&got.to_be_bytes()))
                            .await
                            .map_err(|e| format!("bw ack: {e}"))?;
                    }
                }
                _ => {}
            }
        }
        Ok::<_, String>(b)
    });
    let full = Bytes::from(vec![FILL; CHUNK]);
    let start = Instant::now();
    let (mut sent, mut acked) = (0u64, 0u64);
    // A lost packet stalls the window; the probe then fails by its timeout, as it should.
    while acked < packets {
        while sent < packets && sent - acked < WINDOW {
            let data = if sent + 1 == packets { full.slice(..last_len) } else { full.clone() };
            a.tx.send_packet(b_key, data).await.map_err(|e| format!("bw send: {e}"))?;
            sent += 1;
        }
        match a.rx.recv().await.map_err(|e| format!("bw sender: {e}"))? {
            ServerToClient::RecvPacket { src, data } if src == b_key && data.len() == 8 => {
                acked = acked.max(u64::from_be_bytes(data[..8].try_into().unwrap_or_default()));
            }
            _ => {}
        }
    }
    let elapsed = start.elapsed();
    receiver.await.map_err(|e| format!("bw receiver: {e}"))??;
    Ok(Measured {
        latency: elapsed,
        bytes_per_second: Some(total as f64 / elapsed.as_secs_f64().max(1e-9)),
        ..Default::default()
    })
}
