//! Pushes packets from one DERP client to another through a relay and prints packets/s.
//!
//! `cargo run --release -p derpfleet-client --example throughput -- http://127.0.0.1:3340/derp 200000 1200`

use std::time::Instant;

use derpfleet_client::{ConnectOptions, DerpConn, DerpTarget};
use derpfleet_proto::msg::ServerToClient;
use derpfleet_proto::NodePrivate;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).map(String::as_str).unwrap_or("http://127.0.0.1:3340/derp");
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let size: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1200);
    let target = DerpTarget::Url(url.parse()?);
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let (tx, _ra) = DerpConn::connect(&target, &ConnectOptions::new(ka)).await?.split();
    let (_sb, mut rb) = DerpConn::connect(&target, &ConnectOptions::new(kb.clone())).await?.split();
    let dst = kb.public();
    let payload = bytes::Bytes::from(vec![7u8; size]);
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            if tx.send_packet(dst, payload.clone()).await.is_err() {
                break;
            }
        }
        tx
    });
    let mut got = 0u64;
    while got < n {
        match tokio::time::timeout(std::time::Duration::from_secs(2), rb.recv()).await {
            Ok(Ok(ServerToClient::RecvPacket { .. })) => got += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let el = t0.elapsed();
    let tx = sender.await?;
    let (frames, writes) = tx.write_stats();
    println!(
        "sent {n}, received {got} in {:.2}s: {:.0} pkt/s received, {:.1} Mbit/s; {frames} frames in {writes} writes",
        el.as_secs_f64(),
        got as f64 / el.as_secs_f64(),
        got as f64 * size as f64 * 8.0 / el.as_secs_f64() / 1e6
    );
    Ok(())
}
