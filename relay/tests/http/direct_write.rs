//! Packets written straight from a sender's reader to an idle plain-TCP destination
//! (`core::outbox::DirectSlot`): a receiver that stops reading fills its socket, so direct writes
//! go partial and then fall back to the queue, which head-drops; once it reads again every packet
//! that arrives is whole and in order, and every packet sent is either delivered or counted.

use std::time::Duration;

use bytes::Bytes;
use derpfleet_proto::msg::ClientToServer;

use crate::http_common::*;

const PACKETS: u32 = 4000;
/// Small enough that one frame fits the reader's quiet read, so it arrives alone.
const SIZE: usize = 1800;

fn payload(seq: u32) -> Vec<u8> {
    let mut d = vec![(seq % 251) as u8; SIZE];
    d[..4].copy_from_slice(&seq.to_be_bytes());
    d
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_receiver_gets_whole_packets_in_order_and_the_rest_is_counted() {
    let (server, _) = plain_relay().await;
    let addr = server.local_addr();
    let (mut a, _) = derp_client(addr).await;
    let (mut b, b_key) = derp_client(addr).await;
    // b does not read while a sends, one frame at a time (each arrives alone: the direct path).
    for seq in 0..PACKETS {
        a.send(&ClientToServer::SendPacket { dst: b_key.public(), data: Bytes::from(payload(seq)) })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let mut got = Vec::new();
    while let Ok((_, data)) = b.want_packet(Duration::from_secs(2)).await {
        let seq = u32::from_be_bytes(data[..4].try_into().unwrap());
        assert_eq!(data, payload(seq), "packet {seq} arrived damaged");
        got.push(seq);
        if seq == PACKETS - 1 {
            break;
        }
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
    assert_eq!(got.last(), Some(&(PACKETS - 1)), "the last packet is always delivered");
    let text = server.derp().render_metrics();
    let sent = metric(&text, "derp_packets_sent ");
    let dropped = metric(&text, "derp_packets_dropped{reason=\"queue_head\",kind=\"other\"} ");
    assert_eq!(sent as usize, got.len(), "derp_packets_sent counts what b received");
    assert_eq!(sent + dropped, PACKETS as f64, "sent {sent} + head-dropped {dropped}");
    assert!(dropped > 0.0, "the stalled socket filled and the queue head-dropped");
    server.shutdown().await;
}
