//! The node's DERP connections: one self-reconnecting region client per region in use, opened on
//! demand (our home, the regions peers are reached through) and closed when idle.
//!
//! What is kept per region: the current sender (the hot path reads it for every relayed datagram),
//! since when the connection has been down, when a frame last arrived (the home choice keeps a
//! home it heard from recently) and when the region was last used in either direction.
//!
//! Idle policy (Tailscale closes non-home DERP connections after 60 s without traffic): a region
//! that is not home, that no peer is reached through, and that carried nothing for
//! [`IDLE_CLOSE_AFTER`] is closed. So after a home move the old home stays open while peers still
//! send to us there.
//!
//! The region tasks themselves live with the engine (they hand packets to it); this module owns
//! the bookkeeping and the [`manage`] loop that starts and stops them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};

use crate::conn::DerpSender;

/// A non-home region without traffic for this long is closed (Tailscale: 60 s).
pub const IDLE_CLOSE_AFTER: Duration = Duration::from_secs(60);

/// Start or stop a region's task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionCmd {
    /// start the region's client
    Open(i64),
    /// stop it
    Close(i64),
}

#[derive(Default)]
struct Slot {
    sender: RwLock<Option<DerpSender>>,
    open: AtomicBool,
    down_since: Mutex<Option<Instant>>,
    /// milliseconds since [`Regions::epoch`] + 1 (0 = never)
    last_rx_ms: AtomicU64,
    last_used_ms: AtomicU64,
}

/// Per-region connection state for every region of the DERP map.
pub struct Regions {
    epoch: Instant,
    slots: HashMap<i64, Slot>,
    home: watch::Sender<i64>,
    cmd: mpsc::UnboundedSender<RegionCmd>,
}

impl Regions {
    /// State for `ids` (the DERP map's regions) with `home` as the home; commands for the manager
    /// come out of the returned receiver.
    pub fn new(ids: impl IntoIterator<Item = i64>, home: i64) -> (Self, mpsc::UnboundedReceiver<RegionCmd>) {
        let (cmd, rx) = mpsc::unbounded_channel();
        let slots = ids.into_iter().map(|id| (id, Slot::default())).collect();
        let (home, _) = watch::channel(home);
        (Self { epoch: Instant::now(), slots, home, cmd }, rx)
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    fn since(&self, ms: u64, now: Instant) -> Option<Duration> {
        (ms != 0).then(|| now.saturating_duration_since(self.epoch + Duration::from_millis(ms - 1)))
    }

    /// The current home region.
    pub fn home(&self) -> i64 {
        *self.home.borrow()
    }

    /// Follows the home region (region tasks send `NotePreferred` when it changes).
    pub fn watch_home(&self) -> watch::Receiver<i64> {
        self.home.subscribe()
    }

    /// Makes `region` the home (and opens it).
    pub fn set_home(&self, region: i64) {
        self.open(region);
        self.home.send_replace(region);
    }

    /// Starts `region`'s client unless it runs already. Unknown regions are ignored.
    pub fn open(&self, region: i64) {
        let Some(s) = self.slots.get(&region) else { return };
        if !s.open.swap(true, Relaxed) {
            s.last_used_ms.store(self.ms(Instant::now()), Relaxed);
            *s.down_since.lock() = None;
            let _ = self.cmd.send(RegionCmd::Open(region));
        }
    }

    /// Stops `region`'s client.
    pub fn close(&self, region: i64) {
        let Some(s) = self.slots.get(&region) else { return };
        if s.open.swap(false, Relaxed) {
            *s.sender.write() = None;
            let _ = self.cmd.send(RegionCmd::Close(region));
        }
    }

    /// Regions whose client runs.
    pub fn open_regions(&self) -> Vec<i64> {
        let mut v: Vec<i64> =
            self.slots.iter().filter(|(_, s)| s.open.load(Relaxed)).map(|(r, _)| *r).collect();
        v.sort_unstable();
        v
    }

    /// Regions with a connection up.
    pub fn connected_regions(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.slots.keys().copied().filter(|r| self.connected(*r)).collect();
        v.sort_unstable();
        v
    }

    /// The sender of `region`, if connected.
    pub fn sender(&self, region: i64) -> Option<DerpSender> {
        self.slots.get(&region).and_then(|s| s.sender.read().clone())
    }

    /// Whether `region` is connected.
    pub fn connected(&self, region: i64) -> bool {
        self.slots.get(&region).is_some_and(|s| s.sender.read().is_some())
    }

    /// Records `region`'s connection (`None` = it went down).
    pub fn set_sender(&self, region: i64, sender: Option<DerpSender>) {
        let Some(s) = self.slots.get(&region) else { return };
        if !s.open.load(Relaxed) {
            return;
        }
        let mut down = s.down_since.lock();
        match &sender {
            Some(_) => *down = None,
            None => {
                down.get_or_insert_with(Instant::now);
            }
        }
        *s.sender.write() = sender;
    }

    /// Since when `region`'s connection has been down (None while up or never tried).
    pub fn down_since(&self, region: i64) -> Option<Instant> {
        self.slots.get(&region).and_then(|s| *s.down_since.lock())
    }

    /// A frame arrived from `region`.
    pub fn note_rx(&self, region: i64) {
        if let Some(s) = self.slots.get(&region) {
            let now = self.ms(Instant::now());
            s.last_rx_ms.store(now, Relaxed);
            s.last_used_ms.store(now, Relaxed);
        }
    }

    /// We sent something through `region`.
    pub fn note_tx(&self, region: i64) {
        if let Some(s) = self.slots.get(&region) {
            s.last_used_ms.store(self.ms(Instant::now()), Relaxed);
        }
    }

    /// How long ago `region` last delivered a frame.
    pub fn heard_ago(&self, region: i64) -> Option<Duration> {
        let s = self.slots.get(&region)?;
        self.since(s.last_rx_ms.load(Relaxed), Instant::now())
    }

    /// Open regions that may be closed now: not home, not in `in_use`, idle for [`IDLE_CLOSE_AFTER`].
    pub fn idle(&self, in_use: &[i64], now: Instant) -> Vec<i64> {
        let home = self.home();
        self.slots
            .iter()
            .filter(|(r, s)| {
                s.open.load(Relaxed)
                    && **r != home
                    && !in_use.contains(r)
                    && self.since(s.last_used_ms.load(Relaxed), now).is_some_and(|d| d >= IDLE_CLOSE_AFTER)
            })
            .map(|(r, _)| *r)
            .collect()
    }
}

/// Runs region tasks as `rx` asks: `spawn(region, set)` starts one in `set` and returns its handle.
/// Dropping this future (the node stopping) aborts every region task.
pub async fn manage(
    mut rx: mpsc::UnboundedReceiver<RegionCmd>,
    mut spawn: impl FnMut(i64, &mut JoinSet<()>) -> AbortHandle,
) {
    let mut set = JoinSet::new();
    let mut running: HashMap<i64, AbortHandle> = HashMap::new();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => return,
                Some(RegionCmd::Open(r)) => {
                    if running.get(&r).is_none_or(|h| h.is_finished()) {
                        running.insert(r, spawn(r, &mut set));
                    }
                }
                Some(RegionCmd::Close(r)) => {
                    if let Some(h) = running.remove(&r) {
                        h.abort();
                    }
                }
            },
            Some(_) = set.join_next(), if !set.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_close_and_idle_bookkeeping() {
        let (r, mut rx) = Regions::new([1, 2, 3], 1);
        r.open(1);
        r.open(1);
        r.open(2);
        assert_eq!(rx.try_recv().unwrap(), RegionCmd::Open(1));
        assert_eq!(rx.try_recv().unwrap(), RegionCmd::Open(2));
        assert!(rx.try_recv().is_err(), "opening twice sends one command");
        r.open(99);
        assert!(rx.try_recv().is_err(), "unknown regions are ignored");
        assert_eq!(r.open_regions(), vec![1, 2]);
        r.set_sender(2, None);
        assert!(r.down_since(2).is_some() && !r.connected(2));
        let later = Instant::now() + IDLE_CLOSE_AFTER + Duration::from_secs(1);
        assert_eq!(r.idle(&[], later), vec![2], "home is never idle");
        assert!(r.idle(&[2], later).is_empty(), "a region a peer is reached through stays");
        r.note_rx(2);
        assert!(r.heard_ago(2).is_some_and(|d| d < Duration::from_secs(1)));
        assert!(r.idle(&[], Instant::now()).is_empty());
        r.set_home(3);
        assert_eq!((r.home(), rx.try_recv().unwrap()), (3, RegionCmd::Open(3)));
        r.close(2);
        assert_eq!(rx.try_recv().unwrap(), RegionCmd::Close(2));
        assert_eq!(r.open_regions(), vec![1, 3]);
    }
}
