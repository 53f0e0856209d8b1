//! A quick in-process throughput figure for the server core (ignored by default; not a
//! benchmark suite — the load-test tool measures properly). Run in release:
//! `cargo test --release -p derpfleet-relay --test core perf:: -- --ignored --nocapture`.
//! Senders and receivers share the machine with the relay, so the figure is a lower bound.

use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::{BufMut, BytesMut};
use derpfleet_proto::frame::{put_header, FrameType};
use derpfleet_relay::core::metrics::{DropReason, PacketKind};
use derpfleet_relay::testing::spawn_core_relay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAIRS: usize = 4;
const PACKET: usize = 1200;
const RUN: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput figure, run by hand in release"]
async fn relay_core_packet_rate() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..PAIRS {
        senders.push(relay.client().await?);
        receivers.push(relay.client().await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (s, r) in senders.into_iter().zip(receivers) {
        let dst = r.public();
        // A batch of 64 SendPacket frames per write.
        let mut batch = BytesMut::new();
        for _ in 0..64 {
            put_header(&mut batch, FrameType::SendPacket, 32 + PACKET);
            batch.put_slice(&dst.0);
            batch.put_slice(&[0x42; PACKET]);
        }
        let batch = batch.freeze();
        let mut sender = s.into_stream();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while started.elapsed() < RUN {
                sender.write_all(&batch).await.unwrap();
                sent += 64;
            }
            (sent, sender)
        }));
        let mut receiver = r.into_stream();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 256 << 10];
            let mut bytes = 0u64;
            loop {
                match tokio::time::timeout(Duration::from_millis(500), receiver.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => bytes += n as u64,
                    _ => break,
                }
            }
            (bytes / (5 + 32 + PACKET as u64), receiver)
        }));
    }
    let mut sent = 0;
    let mut received = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let (n, _stream) = t.await?;
        if i % 2 == 0 {
            sent += n;
        } else {
            received += n;
        }
    }
    let secs = RUN.as_secs_f64();
    let s = relay.server.metrics().snapshot();
    println!(
        "relay core, {PAIRS} pairs, {PACKET}-byte packets: sent {:.0} pkt/s, delivered ~{:.0} pkt/s ({:.2} Gbit/s), \
         queue_head drops {}, frames per flush p50-ish: see derp_buffered_write_frames",
        sent as f64 / secs,
        received as f64 / secs,
        received as f64 * PACKET as f64 * 8.0 / secs / 1e9,
        s.dropped(DropReason::QueueHead, PacketKind::Other),
    );
    assert!(received > 0);
    Ok(())
}
