//! DerpRegionClient: reconnect after a relay restart, Restarting, NotePreferred.

mod support;

use std::time::Duration;

use derpfleet_client::region::{DerpRegionClient, RegionClientConfig, RegionEvent, BACKOFF_MAX};
use derpfleet_client::{ConnectOptions, DerpTarget};
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::NodePrivate;
use support::{TestServer, Tls};
use tokio::time::Instant;

const T: Duration = Duration::from_secs(10);

fn client(s: &TestServer, home: bool) -> DerpRegionClient {
    let target = DerpTarget::Url(format!("http://{}/derp", s.addr).parse().unwrap());
    let mut cfg = RegionClientConfig::new(target, ConnectOptions::new(NodePrivate::generate()));
    cfg.is_home = home;
    DerpRegionClient::spawn(cfg)
}

async fn next_connected(c: &mut DerpRegionClient, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let ev =
            tokio::time::timeout_at(deadline, c.recv()).await.expect("no Connected event in time").unwrap();
        if let RegionEvent::Connected(_) = ev {
            return Instant::now();
        }
    }
}

async fn next_disconnected(c: &mut DerpRegionClient) -> Instant {
    loop {
        let ev = tokio::time::timeout(T, c.recv()).await.expect("no Disconnected event").unwrap();
        if let RegionEvent::Disconnected { .. } = ev {
            return Instant::now();
        }
    }
}

async fn wait_received(s: &TestServer, m: &ClientToServer) {
    let deadline = Instant::now() + T;
    while !s.received.lock().unwrap().contains(m) {
        assert!(Instant::now() < deadline, "server never received {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn home_client_notes_preferred_and_follows_home_changes() {
    let s = TestServer::start(Tls::default()).await;
    let mut c = client(&s, true);
    next_connected(&mut c, T).await;
    wait_received(&s, &ClientToServer::NotePreferred(true)).await;
    c.set_home(false);
    wait_received(&s, &ClientToServer::NotePreferred(false)).await;
}

#[tokio::test]
async fn reconnects_after_relay_restart_within_the_backoff_bound() {
    let s = TestServer::start(Tls::default()).await;
    let (addr, key) = (s.addr, s.key.clone());
    let mut c = client(&s, true);
    next_connected(&mut c, T).await;
    s.stop();
    next_disconnected(&mut c).await;
    // Down long enough for several failed attempts and growing backoff.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s2 = TestServer::start_on(addr, Tls::default(), key).await;
    let up = Instant::now();
    let connected = next_connected(&mut c, BACKOFF_MAX + T).await;
    let took = connected - up;
    assert!(took <= BACKOFF_MAX + Duration::from_secs(2), "reconnected {took:?} after the relay came back");
    assert!(c.sender().is_some());
    wait_received(&s2, &ClientToServer::NotePreferred(true)).await;
}

#[tokio::test]
async fn restarting_frame_delays_the_first_retry() {
    let s = TestServer::start(Tls::default()).await;
    let (addr, key) = (s.addr, s.key.clone());
    let mut c = client(&s, false);
    next_connected(&mut c, T).await;
    let reconnect_in = Duration::from_millis(800);
    s.push(ServerToClient::Restarting { reconnect_in, try_for: Duration::from_secs(5) });
    loop {
        match tokio::time::timeout(T, c.recv()).await.unwrap().unwrap() {
            RegionEvent::Message(ServerToClient::Restarting { .. }) => break,
            _ => continue,
        }
    }
    s.stop();
    let down = next_disconnected(&mut c).await;
    let _s2 = TestServer::start_on(addr, Tls::default(), key).await;
    let back = next_connected(&mut c, T).await;
    assert!(back - down >= reconnect_in, "reconnected after {:?}, before reconnect_in", back - down);
}
