//! Spec §11 item 30: slow receivers and hostile bytes, against
//! the server core over loopback TCP.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Result;
use derpfleet_proto::handshake::seal_client_info;
use derpfleet_proto::msg::PeerGoneReason;
use derpfleet_proto::NodePrivate;
use derpfleet_relay::core::derp_server::{CoreConfig, DerpServerConfig};
use derpfleet_relay::core::metrics::{DropReason, PacketKind};
use derpfleet_relay::testing::{
    spawn_core_relay, spawn_core_relay_with, tailscaled_info, CoreRelay, TestClient,
};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

const T: Duration = Duration::from_secs(5);

/// A receiver that never reads, behind a 4 KiB socket receive buffer.
async fn stalled_receiver(relay: &CoreRelay) -> Result<TestClient> {
    TestClient::connect_small_rcvbuf(relay.addr, NodePrivate::generate(), 4096).await
}

#[tokio::test]
async fn c30_non_reading_receiver_disconnected_after_write_deadline_sender_never_blocked() -> Result<()> {
    let relay = spawn_core_relay().await;
    assert_eq!(relay.server.config().write_timeout, Some(Duration::from_secs(2)), "derper's default");
    let b = stalled_receiver(&relay).await?;
    let b_key = b.public();
    let mut a = relay.client().await?;
    let mut c = relay.client().await?;
    let packet = vec![0xab; 60 << 10];
    let mut max_queued = 0;
    let mut sent = 0u32;
    // Keep sending to B until the server drops it; A must keep getting service all along.
    let gone = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            for _ in 0..16 {
                a.send_packet(b_key, &packet).await?;
                sent += 1;
            }
            match relay.server.registry().active_conn(&b_key) {
                Some(conn) => max_queued = max_queued.max(conn.out.queued_packets()),
                None => return anyhow::Ok(()),
            }
            a.send_packet(c.public(), b"meanwhile").await?;
            assert_eq!(c.want_packet(T).await?.1, b"meanwhile".to_vec());
            a.ping_pong(sent.to_be_bytes().repeat(2).try_into().unwrap(), T).await?;
        }
    })
    .await;
    gone.expect("the stalled receiver is disconnected")?;
    assert!(max_queued <= 32, "at most 32 packets queue for the receiver, saw {max_queued}");
    let s = relay.server.metrics().snapshot();
    assert_eq!(s.get("derp_sclient_write_timeouts", &[]), 1.0);
    assert!(s.dropped(DropReason::QueueHead, PacketKind::Other) > 0.0);
    let lost_at_close = s.dropped(DropReason::WriteError, PacketKind::Other)
        + s.dropped(DropReason::GoneDisconnected, PacketKind::Other);
    assert!(lost_at_close > 0.0, "packets lost with the connection are counted");
    // A and C still relay after B is gone; A (which sent to B) is not told B left, C neither.
    a.send_packet(c.public(), b"after").await?;
    assert_eq!(c.want_packet(T).await?.1, b"after".to_vec());
    assert_eq!(relay.panics(), 0);
    drop(b);
    Ok(())
}

#[tokio::test]
async fn slow_receiver_does_not_slow_senders_or_other_pairs_and_drops_are_counted() -> Result<()> {
    // No write deadline: the stalled receiver stays connected the whole time.
    let config = DerpServerConfig { write_timeout: None, ..DerpServerConfig::new(NodePrivate::generate()) };
    let relay = spawn_core_relay_with(config, CoreConfig::default()).await;
    let stalled = stalled_receiver(&relay).await?;
    let mut a = relay.client().await?;
    let mut c = relay.client().await?;
    let mut d = relay.client().await?;
    let mut e = relay.client().await?;
    let big = vec![0x11; 60 << 10];
    let rounds = 40;
    let per_round = 16;
    for round in 0..rounds {
        for _ in 0..per_round {
            a.send_packet(stalled.public(), &big).await?;
        }
        // The sender's other destination and an unrelated pair get every packet, in order.
        let tag = format!("a->c {round}");
        a.send_packet(c.public(), tag.as_bytes()).await?;
        assert_eq!(c.want_packet(T).await?, (a.public(), tag.into_bytes()));
        let tag = format!("d->e {round}");
        d.send_packet(e.public(), tag.as_bytes()).await?;
        assert_eq!(e.want_packet(T).await?, (d.public(), tag.into_bytes()));
    }
    let queued = relay.server.registry().active_conn(&stalled.public()).expect("still connected");
    assert!(queued.out.queued_packets() <= 32);
    let s = relay.server.metrics().snapshot();
    let total = (rounds * per_round) as f64;
    let head_drops = s.dropped(DropReason::QueueHead, PacketKind::Other);
    assert!(head_drops > 0.0, "the stalled receiver's overflow is counted as queue_head");
    assert!(head_drops <= total);
    assert_eq!(
        s.get("derp_bytes_dropped", &[("reason", "queue_head"), ("kind", "other")]),
        head_drops * big.len() as f64
    );
    relay.wait_metric("derp_packets_received", &[], total + 2.0 * rounds as f64).await?;
    // Closing the stalled receiver counts what was still queued for it as gone_disconnected.
    let still_queued = queued.out.queued_packets() as f64;
    drop(queued);
    drop(stalled);
    tokio::time::timeout(T, async {
        while relay.server.metrics().snapshot().dropped(DropReason::GoneDisconnected, PacketKind::Other)
            < still_queued
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    assert_eq!(relay.panics(), 0);
    Ok(())
}

/// One chunk of hostile input.
#[derive(Clone, Debug)]
enum Chunk {
    /// Arbitrary bytes.
    Raw(Vec<u8>),
    /// A frame header with a plausible type and a payload whose declared length may lie.
    Frame { ty: u8, payload: Vec<u8>, len_delta: i8 },
}

fn chunk() -> impl Strategy<Value = Chunk> {
    let ty = prop_oneof![0u8..=0x16, Just(0x42), any::<u8>()];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Chunk::Raw),
        (ty, proptest::collection::vec(any::<u8>(), 0..120), -3i8..=3)
            .prop_map(|(ty, payload, len_delta)| Chunk::Frame { ty, payload, len_delta }),
    ]
}

fn encode(chunks: &[Chunk]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        match c {
            Chunk::Raw(b) => out.extend_from_slice(b),
            Chunk::Frame { ty, payload, len_delta } => {
                let len = (payload.len() as i64 + *len_delta as i64).max(0) as u32;
                out.push(*ty);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(payload);
            }
        }
    }
    out
}

/// How the hostile connection starts.
#[derive(Clone, Copy, Debug)]
enum Start {
    /// Bytes instead of a handshake (ServerKey unread).
    NoHandshake,
    /// A valid ClientInfo, then the bytes.
    AfterHandshake,
    /// A valid ClientInfo cut short at `n` bytes, then the bytes.
    TruncatedClientInfo(usize),
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    relay: CoreRelay,
    pair: Mutex<(TestClient, TestClient)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (relay, pair) = rt.block_on(async {
            let relay = spawn_core_relay().await;
            let a = relay.client().await.unwrap();
            let b = relay.client().await.unwrap();
            (relay, (a, b))
        });
        Fixture { rt, relay, pair: Mutex::new(pair) }
    })
}

async fn throw_bytes(relay: &CoreRelay, start: Start, bytes: &[u8], close: bool) -> Result<()> {
    let mut s = TcpStream::connect(relay.addr).await?;
    let key = NodePrivate::generate();
    let mut ci = vec![0x02];
    let payload = seal_client_info(&key, &relay.key(), &tailscaled_info());
    ci.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    ci.extend_from_slice(&payload);
    match start {
        Start::NoHandshake => {}
        Start::AfterHandshake => s.write_all(&ci).await?,
        Start::TruncatedClientInfo(n) => s.write_all(&ci[..n % ci.len()]).await?,
    }
    // The server may close first; write errors are expected then.
    let _ = s.write_all(bytes).await;
    if close {
        let _ = s.shutdown().await;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// random and truncated bytes at the handshake and the frame reader
    /// never panic, and the other clients keep relaying.
    #[test]
    fn hostile_bytes_close_only_their_connection(
        start in prop_oneof![
            Just(Start::NoHandshake),
            Just(Start::AfterHandshake),
            (0usize..200).prop_map(Start::TruncatedClientInfo),
        ],
        chunks in proptest::collection::vec(chunk(), 0..8),
        close in any::<bool>(),
    ) {
        let f = fixture();
        let bytes = encode(&chunks);
        f.rt.block_on(async {
            throw_bytes(&f.relay, start, &bytes, close).await.unwrap();
            let mut pair = f.pair.lock().await;
            let (a, b) = &mut *pair;
            let (ka, kb) = (a.public(), b.public());
            a.send_packet(kb, &bytes).await.unwrap();
            let (src, data) = b.want_packet(T).await.unwrap();
            assert_eq!((src, data), (ka, bytes.clone()));
            b.send_packet(ka, b"back").await.unwrap();
            assert_eq!(a.want_packet(T).await.unwrap(), (kb, b"back".to_vec()));
        });
        prop_assert_eq!(f.relay.panics(), 0);
    }
}

#[tokio::test]
async fn peer_gone_is_not_sent_for_a_key_that_still_has_a_connection() -> Result<()> {
    // Who-saw-whom is per key: a duplicate leaving does not produce PeerGone.
    let relay = spawn_core_relay().await;
    let key = NodePrivate::generate();
    let mut a1 = TestClient::connect_with(relay.addr, key.clone(), tailscaled_info()).await?;
    let a2 = TestClient::connect_with(relay.addr, key.clone(), tailscaled_info()).await?;
    let mut b = relay.client().await?;
    a1.ping_pong(*b"a1 first", T).await?; // a1 active
    a1.send_packet(b.public(), b"from a").await?;
    assert_eq!(b.want_packet(T).await?.0, key.public());
    a2.close().await;
    b.want_silence(Duration::from_millis(300)).await?;
    a1.close().await;
    assert_eq!(b.want_peer_gone(T).await?, (key.public(), PeerGoneReason::Disconnected));
    Ok(())
}

#[tokio::test]
async fn peer_gone_sent_again_when_a_returning_sender_leaves_again() -> Result<()> {
    let relay = spawn_core_relay().await;
    let key = NodePrivate::generate();
    let mut b = relay.client().await?;
    for round in 0..3u8 {
        let mut a = TestClient::connect_with(relay.addr, key.clone(), tailscaled_info()).await?;
        a.send_packet(b.public(), &[round; 10]).await?;
        assert_eq!(b.want_packet(T).await?, (key.public(), vec![round; 10]));
        a.close().await;
        assert_eq!(b.want_peer_gone(T).await?, (key.public(), PeerGoneReason::Disconnected));
    }
    Ok(())
}

/// Resident memory of this process, in bytes (Linux).
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: usize = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("statm rss");
    pages * 4096
}

#[tokio::test]
async fn idle_connections_cost_little_memory() -> Result<()> {
    const N: usize = 500;
    let relay = spawn_core_relay().await;
    // Bare sockets that complete the handshake by hand, so client-side memory stays tiny and
    // the growth measured is the server's.
    let mut ci_frames = Vec::new();
    for _ in 0..N {
        let key = NodePrivate::generate();
        let payload = seal_client_info(&key, &relay.key(), &tailscaled_info());
        let mut f = vec![0x02];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(&payload);
        ci_frames.push(f);
    }
    let before = rss_bytes();
    let mut socks = Vec::with_capacity(N);
    for f in &ci_frames {
        let mut s = TcpStream::connect(relay.addr).await?;
        s.write_all(f).await?;
        socks.push(s);
    }
    relay.wait_metric("derp_current_connections", &[], N as f64).await?;
    // Let every connection finish its ServerInfo write and settle into waiting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let per_conn = rss_bytes().saturating_sub(before) / N;
    println!("server memory per idle connection: ~{per_conn} bytes (RSS growth / {N})");
    assert!(per_conn < 24 << 10, "idle connections cost {per_conn} bytes each");
    drop(socks);
    Ok(())
}
