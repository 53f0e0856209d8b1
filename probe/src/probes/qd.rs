//! `qd` (with `-qd-packets-per-second`): queuing delay at a low packet rate, as derpprobe's. Two
//! probe clients on the node; 260-byte packets (about a CallMeMaybe) go from one to the other at
//! the configured rate for the run, then the run waits `-qd-packet-timeout` for stragglers.
//! Packets later than that count as lost. Runs follow each other back to back, so the measurement
//! is continuous; the latency is the mean delay of the packets that arrived in time.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use derpfleet_proto::msg::ServerToClient;
use tokio::time::Instant;

use super::deliver::deliver;
use super::{connect, ProbeEnv};
use crate::plan::ProbeSpec;
use crate::results::Measured;

const PACKET_LEN: usize = 260;

/// Runs the probe for `budget`.
pub async fn probe(spec: &ProbeSpec, env: &ProbeEnv, budget: Duration) -> Result<Measured, String> {
    let started = Instant::now();
    let (a, b) = tokio::join!(connect(&spec.node, env), connect(&spec.node, env));
    let (a, mut b) = (a?, b?);
    // Wait until the receiver is registered, so that start-up is not counted as loss.
    deliver(&a, &mut b).await?;
    let rate = env.qd_rate.max(1);
    let gap = Duration::from_secs(1) / rate;
    let send_for = budget.saturating_sub(started.elapsed() + env.qd_packet_timeout).max(gap);
    let send_until = Instant::now() + send_for;
    let nonce: u64 = rand::random();
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    let (mut delays, mut late) = (Vec::new(), 0u64);
    let mut next = Instant::now();
    let mut seq = 0u64;
    loop {
        let sending = next < send_until;
        let wake = if sending { next } else { send_until + env.qd_packet_timeout };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {
                if !sending {
                    break;
                }
                let mut p = BytesMut::with_capacity(PACKET_LEN);
                p.put_u64(nonce);
                p.put_u64(seq);
                p.resize(PACKET_LEN, 0);
                a.tx.send_packet(b.key, p.freeze()).await.map_err(|e| format!("qd send: {e}"))?;
                sent_at.insert(seq, Instant::now());
                seq += 1;
                next += gap;
            }
            m = b.rx.recv() => {
                if let ServerToClient::RecvPacket { src, data } = m.map_err(|e| format!("qd receive: {e}"))? {
                    if src == a.key && data.len() == PACKET_LEN && data[..8] == nonce.to_be_bytes() {
                        let n = u64::from_be_bytes(data[8..16].try_into().unwrap_or_default());
                        if let Some(at) = sent_at.remove(&n) {
                            let d = at.elapsed();
                            if d > env.qd_packet_timeout { late += 1 } else { delays.push(d) }
                        }
                    }
                }
            }
        }
    }
    let lost = late + sent_at.len() as u64;
    if delays.is_empty() {
        return Err(format!("qd: none of {seq} packets arrived within {:?}", env.qd_packet_timeout));
    }
    let mean = delays.iter().sum::<Duration>() / delays.len() as u32;
    Ok(Measured { latency: mean, qd_packets: Some((seq, lost)), ..Default::default() })
}
