//! A DERP client for one region that stays connected: [`DerpRegionClient`].
//!
//! Reconnect policy (the bound a test checks):
//! - after a failed attempt number `n` (0-based) the next one waits
//!   `min(max, min·2^n) × U[0.5, 1]` — with the defaults 100 ms → 5 s, so **no wait exceeds 5 s** and,
//!   once the relay is back, the client is connected again within 5 s plus one connect;
//! - after an established connection drops, the first retry waits only the minimum (≤ 100 ms);
//! - if the server sent `Restarting{reconnect_in, try_for}` before dropping, the first retry waits
//!   `reconnect_in`, and retries stay at the minimum delay for `try_for`, then back off as above;
//! - a server silent for 120 s ([`crate::ConnectOptions::read_timeout`]) is treated as dead.
//!
//! On every connect the client sends `NotePreferred(is_home)`; [`DerpRegionClient::set_home`]
//! re-sends it when the home region changes (tailscaled does both).

use std::time::Duration;

use bytes::Bytes;
use derpfleet_proto::msg::ServerToClient;
use derpfleet_proto::NodePublic;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conn::{ConnInfo, ConnectOptions, DerpConn, DerpSender, DerpTarget, SendError};

/// Smallest reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Largest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The delay before reconnect attempt `attempt` (0-based): exponential from `min`, capped at
/// `max`, scaled by `jitter01` ∈ [0, 1] into [½, 1] of the step, so clients don't stampede.
pub fn backoff_delay(attempt: u32, min: Duration, max: Duration, jitter01: f64) -> Duration {
    let step = min.saturating_mul(1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX)).min(max);
    step.mul_f64(0.5 + 0.5 * jitter01.clamp(0.0, 1.0))
}

/// Configuration of a [`DerpRegionClient`].
#[derive(Clone, Debug)]
pub struct RegionClientConfig {
    /// The region (or URL) to stay connected to.
    pub target: DerpTarget,
    /// Key and connection options.
    pub opts: ConnectOptions,
    /// Whether this is the home region at start.
    pub is_home: bool,
    /// Smallest reconnect delay (default 100 ms).
    pub backoff_min: Duration,
    /// Largest reconnect delay (default 5 s).
    pub backoff_max: Duration,
    /// Depth of the event queue; a consumer that does not read stalls the connection's reader.
    pub event_queue: usize,
}

impl RegionClientConfig {
    /// Defaults for `target` with `opts`.
    pub fn new(target: DerpTarget, opts: ConnectOptions) -> Self {
        Self {
            target,
            opts,
            is_home: false,
            backoff_min: BACKOFF_MIN,
            backoff_max: BACKOFF_MAX,
            event_queue: 1024,
        }
    }
}

/// What the region client reports.
#[derive(Debug)]
pub enum RegionEvent {
    /// A connection is up.
    Connected(ConnInfo),
    /// The connection dropped; the next attempt follows after `retry_in`.
    Disconnected {
        /// why
        error: String,
        /// delay before the next attempt
        retry_in: Duration,
    },
    /// A connect attempt failed; the next follows after `retry_in`.
    ConnectFailed {
        /// why
        error: String,
        /// delay before the next attempt
        retry_in: Duration,
    },
    /// A frame from the server (packets, PeerGone, PeerPresent, KeepAlive, Health, Restarting, ...).
    Message(ServerToClient),
}

/// A self-reconnecting DERP client for one region. Dropping it closes everything.
pub struct DerpRegionClient {
    current: watch::Receiver<Option<DerpSender>>,
    home: watch::Sender<bool>,
    events: mpsc::Receiver<RegionEvent>,
    task: JoinHandle<()>,
}

impl DerpRegionClient {
    /// Starts connecting in the background.
    pub fn spawn(cfg: RegionClientConfig) -> Self {
        let (cur_tx, current) = watch::channel(None);
        let (home, home_rx) = watch::channel(cfg.is_home);
        let (ev_tx, events) = mpsc::channel(cfg.event_queue.max(1));
        let task = tokio::spawn(run(cfg, cur_tx, home_rx, ev_tx));
        Self { current, home, events, task }
    }

    /// The current connection's sender, if connected.
    pub fn sender(&self) -> Option<DerpSender> {
        self.current.borrow().clone().filter(|s| !s.is_closed())
    }

    /// Sends a packet on the current connection; [`SendError::Closed`] while disconnected.
    pub async fn send_packet(&self, dst: NodePublic, data: impl Into<Bytes>) -> Result<(), SendError> {
        match self.sender() {
            Some(s) => s.send_packet(dst, data).await,
            None => Err(SendError::Closed),
        }
    }

    /// Marks the region as home (or not); `NotePreferred` follows on the current and later connections.
    pub fn set_home(&self, is_home: bool) {
        self.home.send_replace(is_home);
    }

    /// The next event; `None` only if the background task ended.
    pub async fn recv(&mut self) -> Option<RegionEvent> {
        self.events.recv().await
    }

    /// Waits until connected (or `timeout`); returns the sender.
    pub async fn wait_connected(&self, timeout: Duration) -> Option<DerpSender> {
        let mut cur = self.current.clone();
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(s) = cur.borrow_and_update().clone().filter(|s| !s.is_closed()) {
                    return Some(s);
                }
                cur.changed().await.ok()?;
            }
        })
        .await
        .ok()
        .flatten()
    }
}

impl Drop for DerpRegionClient {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(s) = self.current.borrow().as_ref() {
            s.close();
        }
    }
}

/// Restart hint from a `Restarting` frame, anchored when the connection dropped.
struct RestartPlan {
    fast_until: Instant,
}

async fn run(
    cfg: RegionClientConfig,
    current: watch::Sender<Option<DerpSender>>,
    mut home: watch::Receiver<bool>,
    events: mpsc::Sender<RegionEvent>,
) {
    let mut attempt: u32 = 0;
    let mut restart: Option<RestartPlan> = None;
    loop {
        let delay = match DerpConn::connect(&cfg.target, &cfg.opts).await {
            Ok(conn) => {
                attempt = 0;
                restart = None;
                let info = conn.info().clone();
                let (tx, mut rx) = conn.split();
                let is_home = *home.borrow_and_update();
                let _ = tx.note_preferred(is_home).await;
                current.send_replace(Some(tx.clone()));
                if events.send(RegionEvent::Connected(info)).await.is_err() {
                    return;
                }
                let mut hint = None;
                let error = loop {
                    tokio::select! {
                        m = rx.recv() => match m {
                            Ok(m) => {
                                if let ServerToClient::Restarting { reconnect_in, try_for } = m {
                                    hint = Some((reconnect_in, try_for));
                                }
                                if events.send(RegionEvent::Message(m)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => break e.to_string(),
                        },
                        c = home.changed() => {
                            if c.is_err() { return; }
                            let is_home = *home.borrow_and_update();
                            let _ = tx.note_preferred(is_home).await;
                        }
                    }
                };
                tx.close();
                current.send_replace(None);
                let delay = match hint {
                    Some((reconnect_in, try_for)) => {
                        restart = Some(RestartPlan { fast_until: Instant::now() + reconnect_in + try_for });
                        reconnect_in
                    }
                    None => backoff_delay(0, cfg.backoff_min, cfg.backoff_max, rand::random()),
                };
                if events.send(RegionEvent::Disconnected { error, retry_in: delay }).await.is_err() {
                    return;
                }
                delay
            }
            Err(e) => {
                let delay = match &restart {
                    Some(p) if Instant::now() < p.fast_until => cfg.backoff_min,
                    _ => {
                        let d = backoff_delay(attempt, cfg.backoff_min, cfg.backoff_max, rand::random());
                        attempt = attempt.saturating_add(1);
                        d
                    }
                };
                if events
                    .send(RegionEvent::ConnectFailed { error: e.to_string(), retry_in: delay })
                    .await
                    .is_err()
                {
                    return;
                }
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered_within_half_to_full_step() {
        let (min, max) = (BACKOFF_MIN, BACKOFF_MAX);
        assert_eq!(backoff_delay(0, min, max, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(0, min, max, 0.0), Duration::from_millis(50));
        assert_eq!(backoff_delay(3, min, max, 1.0), Duration::from_millis(800));
        assert_eq!(backoff_delay(6, min, max, 1.0), Duration::from_secs(5));
        for a in [10, 31, 100, u32::MAX] {
            let d = backoff_delay(a, min, max, 1.0);
            assert_eq!(d, max, "attempt {a}");
            assert!(backoff_delay(a, min, max, 0.0) >= max / 2);
        }
        assert_eq!(backoff_delay(2, min, max, 7.0), Duration::from_millis(400), "jitter clamped");
    }
}
