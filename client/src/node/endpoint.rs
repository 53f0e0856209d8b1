//! Per-peer path state (spec §8): which UDP address is best, whether it is trusted, which
//! candidates to ping and when. Pure logic over an explicit `now`, so it is tested without sockets.
//!
//! The rules: a pong on the best address trusts it for 6.5 s; while trusted, WireGuard goes over UDP
//! only; otherwise it goes over DERP *and* the best address (if any) while a disco round pings every
//! candidate not pinged in the last 5 s. The best address is heartbeated every 3 s while the session
//! has sent something in the last 45 s.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Every pong on the best address extends trust to now + this.
pub const TRUST_UDP_ADDR_DURATION: Duration = Duration::from_millis(6500);
/// The best address is pinged this often while the session is active.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// Heartbeats stop after this much time without sending.
pub const SESSION_ACTIVE_TIMEOUT: Duration = Duration::from_secs(45);
/// While trusted, all candidates are re-pinged this often to find a better path...
pub const UPGRADE_UDP_DIRECT_INTERVAL: Duration = Duration::from_secs(60);
/// ...unless the current path is at least this fast.
pub const GOOD_ENOUGH_LATENCY: Duration = Duration::from_millis(5);
/// No endpoint is pinged more often than this (outside heartbeats and CallMeMaybe).
pub const DISCO_PING_INTERVAL: Duration = Duration::from_secs(5);
/// An unanswered ping is forgotten after this.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A runtime-learned candidate (from a ping we received) is dropped this long after last use.
pub const LEARNED_ENDPOINT_TTL: Duration = Duration::from_secs(45);
/// Bound on candidates per peer (CallMeMaybe lists plus learned addresses).
pub const MAX_CANDIDATES: usize = 64;
/// Bound on pings in flight per peer.
const MAX_PENDING_PINGS: usize = 256;

/// Where one WireGuard datagram for this peer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendPath {
    /// The trusted direct address only.
    Direct(SocketAddr),
    /// DERP, plus this UDP address when there is an (untrusted) best one.
    DerpAnd(Option<SocketAddr>),
}

/// The current best direct address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BestAddr {
    /// the address
    pub addr: SocketAddr,
    /// round trip measured by the last pong
    pub latency: Duration,
    /// trusted until
    pub trust_until: Instant,
}

#[derive(Clone, Debug, Default)]
struct Candidate {
    last_ping: Option<Instant>,
    last_pong: Option<Instant>,
    latency: Option<Duration>,
    /// `Some(t)`: learned at runtime from a ping, expires after [`LEARNED_ENDPOINT_TTL`] past t.
    learned_at: Option<Instant>,
    /// From configuration or CallMeMaybe (not subject to expiry).
    advertised: bool,
}

/// What `on_pong` concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PongOutcome {
    /// Unknown transaction or from another address: ignored.
    Unknown,
    /// Latency recorded; the best address is unchanged (trust extended if it was the best).
    Recorded,
    /// This address became the best.
    NewBest,
}

/// The path state machine for one peer.
#[derive(Debug, Default)]
pub struct Endpoint {
    best: Option<BestAddr>,
    candidates: HashMap<SocketAddr, Candidate>,
    pending: HashMap<[u8; 12], (SocketAddr, Instant)>,
    last_send: Option<Instant>,
    last_round: Option<Instant>,
}

/// Tailscale's `betterAddr` points for `a` being better than `b`: the percentage by which `a` is
/// faster, plus bonuses for loopback (+50), link-local (+30), private (+20) and IPv6 (+10);
/// improvements of 1 point or less are hysteresis.
pub fn better_addr(a: (SocketAddr, Duration), b: Option<(SocketAddr, Duration)>) -> bool {
    let Some(b) = b else { return true };
    if a.0 == b.0 {
        return false;
    }
    fn bonus(ip: IpAddr) -> f64 {
        let mut p = 0.0;
        if ip.is_loopback() {
            p += 50.0;
        }
        match ip {
            IpAddr::V4(v4) => {
                if v4.is_link_local() {
                    p += 30.0;
                }
                if v4.is_private() {
                    p += 20.0;
                }
            }
            IpAddr::V6(v6) => {
                if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                    p += 30.0;
                }
                if (v6.segments()[0] & 0xfe00) == 0xfc00 {
                    p += 20.0;
                }
                p += 10.0;
            }
        }
        p
    }
    let (la, lb) = (a.1.as_secs_f64().max(1e-9), b.1.as_secs_f64().max(1e-9));
    // Percentage by which a is faster than b (negative when slower).
    let mut points = (lb - la) / lb * 100.0;
    points += bonus(a.0.ip()) - bonus(b.0.ip());
    points > 1.0
}

impl Endpoint {
    /// The best address, if any.
    pub fn best(&self) -> Option<BestAddr> {
        self.best
    }

    /// Whether the best address is trusted at `now`.
    pub fn trusted(&self, now: Instant) -> bool {
        self.best.is_some_and(|b| now < b.trust_until)
    }

    /// Where the next WireGuard datagram goes; also notes the session as active.
    pub fn send_path(&mut self, now: Instant) -> SendPath {
        self.last_send = Some(now);
        self.peek_path(now)
    }

    /// Like [`Self::send_path`] without marking activity (for status).
    pub fn peek_path(&self, now: Instant) -> SendPath {
        match self.best {
            Some(b) if now < b.trust_until => SendPath::Direct(b.addr),
            b => SendPath::DerpAnd(b.map(|b| b.addr)),
        }
    }

    /// Adds configured or CallMeMaybe endpoints. With `replace`, the previous advertised set is
    /// replaced (CallMeMaybe semantics) and ping rate limits are cleared so all are pinged at once.
    pub fn add_advertised(&mut self, eps: &[SocketAddr], replace: bool) {
        if replace {
            self.candidates.retain(|a, c| {
                c.advertised = c.advertised && eps.contains(a);
                c.advertised || c.learned_at.is_some() || self.best.is_some_and(|b| b.addr == *a)
            });
            for c in self.candidates.values_mut() {
                c.last_ping = None;
            }
        }
        for &e in eps {
            if self.candidates.len() >= MAX_CANDIDATES && !self.candidates.contains_key(&e) {
                break;
            }
            let c = self.candidates.entry(e).or_default();
            c.advertised = true;
            if replace {
                c.last_ping = None;
            }
        }
    }

    /// A CallMeMaybe listing `eps` (the peer's current endpoints): they replace the advertised set
    /// and are pinged at once. A best address the peer no longer lists loses its trust (it is kept
    /// as an untrusted best, so DERP carries traffic beside it until a pong proves a path again):
    /// the peer has moved, and sending only to its old address would black-hole traffic until the
    /// trust ran out (Tailscale drops such a best address the same way).
    pub fn on_call_me_maybe(&mut self, eps: &[SocketAddr], now: Instant) {
        self.add_advertised(eps, true);
        if let Some(b) = self.best.as_mut().filter(|b| !eps.contains(&b.addr)) {
            b.trust_until = b.trust_until.min(now);
        }
    }

    /// Our own network changed (new address, NAT or route): the direct path must be proven again,
    /// so trust ends now, every candidate may be pinged at once and a full round (with
    /// CallMeMaybe) runs at the next tick. The session counts as active so the round happens even
    /// before the next datagram is sent.
    pub fn on_network_change(&mut self, now: Instant) {
        if let Some(b) = self.best.as_mut() {
            b.trust_until = b.trust_until.min(now);
        }
        for c in self.candidates.values_mut() {
            c.last_ping = None;
        }
        self.pending.clear();
        self.last_round = None;
        if self.last_send.is_some() {
            self.last_send = Some(now);
        }
    }

    /// Makes the next tick run a full disco round (our endpoints changed: announce them).
    pub fn restart_round(&mut self) {
        self.last_round = None;
    }

    /// Notes an address a ping arrived from. Returns true when it should be pinged back now, which
    /// opens our NAT towards it: while no path is trusted, always. Both sides ping at once after
    /// CallMeMaybe; the first ping is dropped by the far NAT and the second passes (even 2 ms
    /// later), so an earlier ping of ours is probably lost, and waiting for the next round (5 s) or
    /// the peer's heartbeat (3 s) only delays the upgrade. This cannot loop: every ping-back answers
    /// one received ping and draws a pong, and the first pong brings trust; once trusted, at most
    /// one ping-back per 5 s.
    pub fn note_ping_from(&mut self, addr: SocketAddr, now: Instant) -> bool {
        if self.candidates.len() >= MAX_CANDIDATES && !self.candidates.contains_key(&addr) {
            return false;
        }
        let trusted = self.trusted(now);
        let c = self.candidates.entry(addr).or_default();
        c.learned_at = Some(now);
        !trusted || c.last_ping.is_none_or(|t| now.duration_since(t) >= DISCO_PING_INTERVAL)
    }

    /// Records a ping sent to `addr` with `tx_id`.
    pub fn note_ping_sent(&mut self, addr: SocketAddr, tx_id: [u8; 12], now: Instant) {
        if self.pending.len() >= MAX_PENDING_PINGS {
            self.pending.retain(|_, (_, t)| now.duration_since(*t) < PING_TIMEOUT);
            if self.pending.len() >= MAX_PENDING_PINGS {
                return;
            }
        }
        self.pending.insert(tx_id, (addr, now));
        if let Some(c) = self.candidates.get_mut(&addr) {
            c.last_ping = Some(now);
        }
    }

    /// A pong for `tx_id` arrived over UDP from `from`.
    pub fn on_pong(&mut self, tx_id: [u8; 12], from: SocketAddr, now: Instant) -> PongOutcome {
        let Some((addr, sent)) = self.pending.remove(&tx_id) else { return PongOutcome::Unknown };
        if addr != from || now.duration_since(sent) > PING_TIMEOUT {
            return PongOutcome::Unknown;
        }
        let latency = now.duration_since(sent);
        if let Some(c) = self.candidates.get_mut(&addr) {
            c.last_pong = Some(now);
            c.latency = Some(latency);
        }
        let trusted = self.trusted(now);
        let cur = self.best.map(|b| (b.addr, b.latency));
        let trust_until = now + TRUST_UDP_ADDR_DURATION;
        if !trusted || better_addr((addr, latency), cur) {
            let changed = cur.map(|c| c.0) != Some(addr);
            self.best = Some(BestAddr { addr, latency, trust_until });
            return if changed { PongOutcome::NewBest } else { PongOutcome::Recorded };
        }
        if let Some(b) = self.best.as_mut().filter(|b| b.addr == addr) {
            b.latency = latency;
            b.trust_until = trust_until;
        }
        PongOutcome::Recorded
    }

    /// Addresses to ping now, and whether this is a full disco round (then a CallMeMaybe follows
    /// over DERP). While trusted: a heartbeat to the best address every 3 s of an active session.
    /// Otherwise, during an active session: every candidate not pinged in the last 5 s.
    pub fn pings_due(&mut self, now: Instant) -> (Vec<SocketAddr>, bool) {
        self.expire(now);
        let active = self.last_send.is_some_and(|t| now.duration_since(t) < SESSION_ACTIVE_TIMEOUT);
        if !active {
            return (Vec::new(), false);
        }
        if let Some(b) = self.best.filter(|b| now < b.trust_until) {
            let mut due = Vec::new();
            let last = self.candidates.get(&b.addr).and_then(|c| c.last_ping);
            if last.is_none_or(|t| now.duration_since(t) >= HEARTBEAT_INTERVAL) {
                self.candidates.entry(b.addr).or_default();
                due.push(b.addr);
            }
            // Once a minute, look for a better path unless this one is already good enough.
            if b.latency > GOOD_ENOUGH_LATENCY
                && self.last_round.is_none_or(|t| now.duration_since(t) >= UPGRADE_UDP_DIRECT_INTERVAL)
            {
                self.last_round = Some(now);
                due.extend(
                    self.candidates
                        .iter()
                        .filter(|(a, c)| {
                            **a != b.addr
                                && c.last_ping.is_none_or(|t| now.duration_since(t) >= DISCO_PING_INTERVAL)
                        })
                        .map(|(a, _)| *a),
                );
            }
            return (due, false);
        }
        if self.last_round.is_some_and(|t| now.duration_since(t) < DISCO_PING_INTERVAL) {
            // Candidates added since the round (CallMeMaybe) have no last_ping: ping those.
            let fresh: Vec<_> =
                self.candidates.iter().filter(|(_, c)| c.last_ping.is_none()).map(|(a, _)| *a).collect();
            return (fresh, false);
        }
        self.last_round = Some(now);
        let due = self
            .candidates
            .iter()
            .filter(|(_, c)| c.last_ping.is_none_or(|t| now.duration_since(t) >= DISCO_PING_INTERVAL))
            .map(|(a, _)| *a)
            .collect();
        (due, true)
    }

    fn expire(&mut self, now: Instant) {
        self.pending.retain(|_, (_, t)| now.duration_since(*t) < PING_TIMEOUT);
        let best = self.best.map(|b| b.addr);
        self.candidates.retain(|a, c| {
            c.advertised
                || Some(*a) == best
                || c.learned_at.is_some_and(|t| now.duration_since(t) < LEARNED_ENDPOINT_TTL)
        });
    }

    /// Number of known candidates (for status).
    pub fn candidate_count(&self) -> usize {
        self.candidates.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn better_addr_rules() {
        let ms = Duration::from_millis;
        assert!(better_addr((sa("1.1.1.1:1"), ms(10)), None));
        assert!(!better_addr((sa("1.1.1.1:1"), ms(1)), Some((sa("1.1.1.1:1"), ms(10)))));
        assert!(better_addr((sa("1.1.1.1:1"), ms(5)), Some((sa("2.2.2.2:1"), ms(10)))));
        // 1 % faster is hysteresis.
        assert!(!better_addr((sa("1.1.1.1:1"), ms(995)), Some((sa("2.2.2.2:1"), ms(1000)))));
        // Private beats public at equal latency.
        assert!(better_addr((sa("192.168.1.2:1"), ms(10)), Some((sa("2.2.2.2:1"), ms(10)))));
        assert!(!better_addr((sa("2.2.2.2:1"), ms(10)), Some((sa("192.168.1.2:1"), ms(10)))));
    }

    #[test]
    fn untrusted_sends_both_then_direct_after_pong_then_falls_back() {
        let t0 = Instant::now();
        let mut e = Endpoint::default();
        assert_eq!(e.send_path(t0), SendPath::DerpAnd(None));
        e.add_advertised(&[sa("1.2.3.4:41641")], true);
        let (due, round) = e.pings_due(t0);
        assert_eq!((due.clone(), round), (vec![sa("1.2.3.4:41641")], true));
        e.note_ping_sent(due[0], [1; 12], t0);
        let t1 = t0 + Duration::from_millis(20);
        assert_eq!(e.on_pong([1; 12], sa("1.2.3.4:41641"), t1), PongOutcome::NewBest);
        assert_eq!(e.send_path(t1), SendPath::Direct(sa("1.2.3.4:41641")));
        // No heartbeat until 3 s after the last ping.
        assert!(e.pings_due(t1).0.is_empty());
        let t2 = t0 + Duration::from_secs(3);
        assert_eq!(e.pings_due(t2).0, vec![sa("1.2.3.4:41641")]);
        // Without pongs, trust ends 6.5 s after the last one: DERP and the old address.
        let t3 = t1 + TRUST_UDP_ADDR_DURATION;
        assert_eq!(e.send_path(t3), SendPath::DerpAnd(Some(sa("1.2.3.4:41641"))));
        // A late pong for an expired ping is ignored.
        e.note_ping_sent(sa("1.2.3.4:41641"), [2; 12], t2);
        assert_eq!(
            e.on_pong([2; 12], sa("1.2.3.4:41641"), t2 + Duration::from_secs(6)),
            PongOutcome::Unknown
        );
    }

    fn trusted_on(addr: &str, t0: Instant) -> Endpoint {
        let mut e = Endpoint::default();
        e.add_advertised(&[sa(addr)], true);
        let _ = e.send_path(t0);
        let _ = e.pings_due(t0);
        e.note_ping_sent(sa(addr), [1; 12], t0);
        assert_eq!(e.on_pong([1; 12], sa(addr), t0), PongOutcome::NewBest);
        e
    }

    #[test]
    fn call_me_maybe_without_the_best_address_ends_its_trust() {
        let t0 = Instant::now();
        let mut e = trusted_on("172.30.1.2:41641", t0);
        // Listed again: still direct.
        e.on_call_me_maybe(&[sa("172.30.1.2:41641")], t0);
        assert_eq!(e.send_path(t0), SendPath::Direct(sa("172.30.1.2:41641")));
        // The peer moved: DERP plus the old address, and the new one is pinged now.
        e.on_call_me_maybe(&[sa("172.30.3.2:41641")], t0);
        assert_eq!(e.send_path(t0), SendPath::DerpAnd(Some(sa("172.30.1.2:41641"))));
        assert!(e.pings_due(t0).0.contains(&sa("172.30.3.2:41641")));
    }

    #[test]
    fn network_change_ends_trust_and_starts_a_round_now() {
        let t0 = Instant::now();
        let mut e = trusted_on("172.30.2.2:41641", t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(e.pings_due(t1), (vec![], false));
        e.on_network_change(t1);
        assert_eq!(e.send_path(t1), SendPath::DerpAnd(Some(sa("172.30.2.2:41641"))));
        assert_eq!(e.pings_due(t1), (vec![sa("172.30.2.2:41641")], true));
        // The next round can also be forced (new STUN endpoint to announce).
        let t2 = t1 + Duration::from_millis(100);
        assert!(!e.pings_due(t2).1);
        e.restart_round();
        assert!(e.pings_due(t2).1);
    }

    #[test]
    fn pong_from_wrong_address_or_unknown_txid_is_ignored() {
        let t0 = Instant::now();
        let mut e = Endpoint::default();
        e.add_advertised(&[sa("1.2.3.4:1")], false);
        e.note_ping_sent(sa("1.2.3.4:1"), [9; 12], t0);
        assert_eq!(e.on_pong([8; 12], sa("1.2.3.4:1"), t0), PongOutcome::Unknown);
        assert_eq!(e.on_pong([9; 12], sa("5.6.7.8:1"), t0), PongOutcome::Unknown);
        assert!(e.best().is_none());
    }

    #[test]
    fn faster_address_replaces_trusted_best_only_if_better() {
        let t0 = Instant::now();
        let mut e = Endpoint::default();
        e.add_advertised(&[sa("2.2.2.2:1"), sa("3.3.3.3:1")], true);
        e.note_ping_sent(sa("2.2.2.2:1"), [1; 12], t0);
        e.note_ping_sent(sa("3.3.3.3:1"), [2; 12], t0);
        assert_eq!(e.on_pong([1; 12], sa("2.2.2.2:1"), t0 + Duration::from_millis(50)), PongOutcome::NewBest);
        assert_eq!(
            e.on_pong([2; 12], sa("3.3.3.3:1"), t0 + Duration::from_millis(52)),
            PongOutcome::Recorded
        );
        assert_eq!(e.best().unwrap().addr, sa("2.2.2.2:1"));
        e.note_ping_sent(sa("3.3.3.3:1"), [3; 12], t0 + Duration::from_millis(60));
        assert_eq!(e.on_pong([3; 12], sa("3.3.3.3:1"), t0 + Duration::from_millis(70)), PongOutcome::NewBest);
    }

    #[test]
    fn idle_session_sends_no_pings_and_rounds_are_rate_limited() {
        let t0 = Instant::now();
        let mut e = Endpoint::default();
        e.add_advertised(&[sa("1.2.3.4:1")], true);
        assert_eq!(e.pings_due(t0), (vec![], false));
        e.send_path(t0);
        let (due, _) = e.pings_due(t0);
        e.note_ping_sent(due[0], [1; 12], t0);
        assert_eq!(e.pings_due(t0 + Duration::from_secs(1)), (vec![], false));
        assert!(e.pings_due(t0 + Duration::from_secs(5)).1);
        // CallMeMaybe clears the rate limit.
        e.add_advertised(&[sa("1.2.3.4:1")], true);
        assert_eq!(e.pings_due(t0 + Duration::from_secs(6)).0, vec![sa("1.2.3.4:1")]);
        assert!(e.pings_due(t0 + Duration::from_secs(60)).0.is_empty());
    }

    #[test]
    fn trusted_slow_path_looks_for_a_better_one_every_minute() {
        let t0 = Instant::now();
        let mut e = Endpoint::default();
        let (far, near) = (sa("2.2.2.2:1"), sa("192.168.1.9:1"));
        e.add_advertised(&[far, near], true);
        e.send_path(t0);
        let (due, round) = e.pings_due(t0);
        assert!(round && due.len() == 2);
        e.note_ping_sent(far, [1; 12], t0);
        e.note_ping_sent(near, [2; 12], t0);
        // Only the far one answers (20 ms): trusted, but not good enough.
        assert_eq!(e.on_pong([1; 12], far, t0 + Duration::from_millis(20)), PongOutcome::NewBest);
        let mut t = t0;
        while t < t0 + UPGRADE_UDP_DIRECT_INTERVAL - HEARTBEAT_INTERVAL {
            t += HEARTBEAT_INTERVAL;
            e.send_path(t);
            let (due, _) = e.pings_due(t);
            assert_eq!(due, vec![far], "only heartbeats before a minute");
            let tx = [t.duration_since(t0).as_secs() as u8; 12];
            e.note_ping_sent(far, tx, t);
            e.on_pong(tx, far, t + Duration::from_millis(20));
        }
        let t = t0 + UPGRADE_UDP_DIRECT_INTERVAL + Duration::from_millis(1);
        e.send_path(t);
        let (due, round) = e.pings_due(t);
        assert!(!round && due.contains(&near), "{due:?}");
    }

    #[test]
    fn ping_back_always_while_untrusted_then_once_per_interval() {
        let t0 = Instant::now();
        let mut e = Endpoint::default();
        let a = sa("9.9.9.9:9");
        assert!(e.note_ping_from(a, t0));
        e.note_ping_sent(a, [1; 12], t0);
        assert!(e.note_ping_from(a, t0 + Duration::from_millis(1)));
        e.note_ping_sent(a, [2; 12], t0 + Duration::from_millis(1));
        assert_eq!(e.on_pong([2; 12], a, t0 + Duration::from_millis(2)), PongOutcome::NewBest);
        assert!(!e.note_ping_from(a, t0 + Duration::from_millis(3)));
        assert!(e.note_ping_from(a, t0 + DISCO_PING_INTERVAL + Duration::from_millis(1)));
    }

    #[test]
    fn learned_endpoints_expire_and_candidates_are_bounded() {
        let t0 = Instant::now();
        let mut e = Endpoint::default();
        assert!(e.note_ping_from(sa("9.9.9.9:9"), t0));
        assert_eq!(e.candidate_count(), 1);
        e.send_path(t0 + LEARNED_ENDPOINT_TTL);
        e.pings_due(t0 + LEARNED_ENDPOINT_TTL);
        assert_eq!(e.candidate_count(), 0);
        let many: Vec<SocketAddr> = (0..200).map(|i| SocketAddr::from(([10, 0, 0, 1], i))).collect();
        e.add_advertised(&many, true);
        assert_eq!(e.candidate_count(), MAX_CANDIDATES);
    }
}
