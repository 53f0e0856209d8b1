//! The load generator against the in-process responder: answers are validated and counted.

mod common;

use std::time::Duration;

use common::TestServer;
use derpfleet_stun::load::{run, LoadConfig};
use derpfleet_stun::StunConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_and_open_loop_runs_count_valid_answers() {
    let server = TestServer::start("127.0.0.1:0", 2, StunConfig { strict: true, per_ip_limit: None });
    let base = LoadConfig {
        server: server.addr,
        bind: "127.0.0.1:0".parse().unwrap(),
        sockets: 3,
        rate: 0,
        window: 64,
        duration: Duration::from_millis(300),
    };
    let closed = run(&base).await.unwrap();
    assert!(closed.answered > 0, "{closed:?}");
    assert!(closed.answered <= closed.sent, "{closed:?}");
    assert_eq!(closed.invalid, 0, "{closed:?}");

    // A low open-loop rate is fully answered (nothing is lost at 2000/s on loopback).
    let open = run(&LoadConfig { rate: 2000, ..base }).await.unwrap();
    assert!(open.sent >= 300, "{open:?}");
    assert_eq!(open.answered, open.sent, "{open:?}");
    let served = server.counter(r#"stun_requests{disposition="success"}"#);
    // The generator saw every answer it counted from this server; the closed loop may have
    // written off (late) requests, so the server can have answered more than were counted.
    assert!(served >= closed.answered + open.answered, "served {served}");
    assert!(served <= closed.sent + open.sent, "served {served}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responder_stops_promptly_while_flooded() {
    let server = TestServer::start("127.0.0.1:0", 1, StunConfig::default());
    let flood = LoadConfig {
        server: server.addr,
        bind: "127.0.0.1:0".parse().unwrap(),
        sockets: 2,
        rate: 2_000_000,
        window: 1,
        // Far longer than the stop allowance below: a responder that only noticed cancellation
        // when its socket ran dry would miss it.
        duration: Duration::from_secs(20),
    };
    let load = tokio::spawn(async move { run(&flood).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.counter(r#"stun_requests{disposition="success"}"#) > 0, "flood is being answered");
    // A liveness bound, not a speed target: the responder yields every few batches, so it
    // notices cancellation within milliseconds even when its socket never runs dry.
    server.stop_within(Duration::from_secs(2)).await;
    load.abort();
}
