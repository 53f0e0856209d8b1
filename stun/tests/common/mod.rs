//! Shared test helpers: an in-process responder on loopback with a private Prometheus recorder.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use derpfleet_stun::{bind_sockets, StunConfig, StunMetrics, StunServer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running responder; cancelled and awaited by [`TestServer::stop`] (or cancelled on drop).
pub struct TestServer {
    pub addr: SocketAddr,
    pub recorder: PrometheusRecorder,
    cancel: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a responder on `bind` (port 0 picks one) with `sockets` sockets.
    pub fn start(bind: &str, sockets: usize, config: StunConfig) -> TestServer {
        let recorder = PrometheusBuilder::new().build_recorder();
        let metrics = StunMetrics::register(&recorder);
        let socks = bind_sockets(bind.parse().unwrap(), sockets).expect("bind STUN sockets");
        let addr = socks[0].local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(StunServer::new(config, metrics).serve(socks, cancel.clone()));
        TestServer { addr, recorder, cancel, task: Some(task) }
    }

    /// The server address with its unspecified IP replaced by the loopback of the same family.
    pub fn loopback_addr(&self) -> SocketAddr {
        let mut a = self.addr;
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() { "127.0.0.1".parse().unwrap() } else { "::1".parse().unwrap() });
        }
        a
    }

    /// Value of a counter series such as `stun_requests{disposition="success"}` (0 if absent).
    pub fn counter(&self, series: &str) -> u64 {
        let text = self.recorder.handle().render();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// Waits (up to 5 s) for a counter to reach `want`, then asserts it equals `want`. Counters are
    /// published right after each send, so a client can see its answer a moment before the count.
    pub async fn assert_counter(&self, series: &str, want: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.counter(series) != want && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.counter(series), want, "{series}");
    }

    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(5)).await;
    }

    /// Cancels the responder and asserts that `serve` returns within `limit`.
    pub async fn stop_within(mut self, limit: Duration) {
        self.cancel.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(limit, task)
            .await
            .unwrap_or_else(|_| panic!("responder did not stop within {limit:?} of cancellation"))
            .expect("responder task did not panic")
            .expect("responder returned Ok");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Receives one datagram within `wait`, or `None`.
pub async fn recv_within(sock: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        Ok(Err(e)) => panic!("recv failed: {e}"),
        Err(_) => None,
    }
}
