//! netcheck (spec §7): measure the latency to every region and pick the home region.
//!
//! The decisions are pure and unit-tested: [`plan`] (which probes, when), [`report`] (how answers
//! fold into a [`Report`]) and [`home`] (home choice with `RegionScore` and hysteresis). This module
//! is the small I/O part: it sends the planned STUN requests from **one UDP socket per family**
//! (the socket a node will later use for WireGuard, so the mapping seen is the real one), matches
//! answers by transaction ID, and — when no STUN answer arrives in the STUN phase — times one
//! HTTPS `GET /derp/latency-check` per region over a TLS connection dialed like the DERP client.
//!
//! Timeouts: the STUN phase ends after 3 s (or earlier: when every probe (full report) or every
//! region (incremental) answered, or, once 3 regions answered, after twice the slowest latency
//! seen); the whole report gets 5 s.

pub mod family;
pub mod home;
pub mod plan;
pub mod report;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use derpfleet_proto::derpmap::{AddrUsage, DerpMap, DerpNode, DerpRegion};
use derpfleet_proto::upgrade::parse_response_head;
use derpfleet_stun::message::{build_request, parse_response, TxId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::conn::{transport, ConnectOptions, DerpTarget};
pub use family::Family;
pub use home::{choose_home, HomeHistory, HomeState};
pub use plan::Probe;
pub use report::Report;

/// Budget for the whole report.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Budget for the STUN phase before falling back to HTTPS.
pub const STUN_TIMEOUT: Duration = Duration::from_secs(3);

/// Tuning for [`Netchecker`].
#[derive(Clone, Debug)]
pub struct NetcheckConfig {
    /// Budget for the whole report (5 s).
    pub timeout: Duration,
    /// Budget for the STUN phase (3 s).
    pub stun_timeout: Duration,
    /// Measure by HTTPS when no STUN answer arrives.
    pub https_fallback: bool,
    /// TLS roots and dialing preferences for the HTTPS fallback (the key is unused).
    pub connect: ConnectOptions,
    /// Read the sockets during a report (default). Set false when another task owns the reads
    /// (e.g. the node's WireGuard reader): it must then pass every datagram to
    /// [`StunHandler::handle`] from [`Netchecker::stun_handler`].
    pub read_sockets: bool,
    /// How long a report's latencies count for the home choice (Go: 5 min 5 s).
    pub history_retention: Duration,
}

impl Default for NetcheckConfig {
    fn default() -> Self {
        Self {
            timeout: REPORT_TIMEOUT,
            stun_timeout: STUN_TIMEOUT,
            https_fallback: true,
            connect: ConnectOptions::new(derpfleet_proto::NodePrivate::generate()),
            read_sockets: true,
            history_retention: home::HISTORY_RETENTION,
        }
    }
}

/// Runs netcheck reports and remembers what the home choice needs between them.
pub struct Netchecker {
    v4: Option<Arc<UdpSocket>>,
    v6: Option<Arc<UdpSocket>>,
    cfg: NetcheckConfig,
    history: HomeHistory,
    last: Option<Report>,
    home: Option<i64>,
    demux: StunHandler,
}

/// Matches STUN answers to this netchecker's requests by transaction ID. Cheap to clone; a socket
/// reader owned elsewhere calls [`StunHandler::handle`] with each datagram it receives.
#[derive(Clone, Default)]
pub struct StunHandler {
    inner: Arc<DemuxInner>,
}

#[derive(Default)]
struct DemuxInner {
    pending: Mutex<HashMap<TxId, Pending>>,
    out: Mutex<Option<mpsc::Sender<Answer>>>,
}

impl StunHandler {
    /// Offers a received datagram; true if it answered one of our STUN requests (then it is
    /// consumed; anything else is left to the caller, e.g. WireGuard or disco).
    pub fn handle(&self, datagram: &[u8]) -> bool {
        let now = Instant::now();
        let Ok((txid, mapped)) = parse_response(datagram) else { return false };
        let Some(p) = self.inner.pending.lock().expect("pending lock").remove(&txid) else { return false };
        let a = Answer { region: p.region, family: p.family, rtt: now - p.sent, mapped };
        if let Some(tx) = self.inner.out.lock().expect("out lock").as_ref() {
            let _ = tx.try_send(a);
        }
        true
    }

    fn expect(&self, txid: TxId, p: Pending) {
        self.inner.pending.lock().expect("pending lock").insert(txid, p);
    }

    fn start(&self, tx: mpsc::Sender<Answer>) {
        *self.inner.out.lock().expect("out lock") = Some(tx);
    }

    fn finish(&self) {
        *self.inner.out.lock().expect("out lock") = None;
        self.inner.pending.lock().expect("pending lock").clear();
    }
}

/// A STUN request in flight.
struct Pending {
    region: i64,
    family: Family,
    sent: Instant,
}

/// A STUN answer matched to its request.
struct Answer {
    region: i64,
    family: Family,
    rtt: Duration,
    mapped: SocketAddr,
}

impl Netchecker {
    /// Binds fresh sockets: `0.0.0.0:0` for IPv4 and `[::]:0` for IPv6 (if the OS allows).
    pub async fn bind(cfg: NetcheckConfig) -> std::io::Result<Self> {
        let v4 = UdpSocket::bind("0.0.0.0:0").await.ok().map(Arc::new);
        let v6 = UdpSocket::bind("[::]:0").await.ok().map(Arc::new);
        if v4.is_none() && v6.is_none() {
            return Err(std::io::Error::other("cannot bind any UDP socket"));
        }
        Ok(Self::with_sockets(v4, v6, cfg))
    }

    /// Uses the given sockets (e.g. the node's WireGuard sockets). While a report runs, this
    /// reads them; packets that are not STUN answers to our requests are ignored.
    pub fn with_sockets(v4: Option<Arc<UdpSocket>>, v6: Option<Arc<UdpSocket>>, cfg: NetcheckConfig) -> Self {
        Self {
            v4,
            v6,
            history: HomeHistory::with_retention(cfg.history_retention),
            cfg,
            last: None,
            home: None,
            demux: StunHandler::default(),
        }
    }

    /// The handler to feed datagrams to when [`NetcheckConfig::read_sockets`] is false.
    pub fn stun_handler(&self) -> StunHandler {
        self.demux.clone()
    }

    /// The current home region.
    pub fn home(&self) -> Option<i64> {
        self.home
    }

    /// Sets the home region (e.g. restored from disk, or forced).
    pub fn set_home(&mut self, home: Option<i64>) {
        self.home = home;
    }

    /// Whether reports read the sockets themselves (see [`NetcheckConfig::read_sockets`]); a node
    /// turns this off once its own reader owns the shared socket.
    pub fn set_read_sockets(&mut self, on: bool) {
        self.cfg.read_sockets = on;
    }

    /// The last report, if any.
    pub fn last_report(&self) -> Option<&Report> {
        self.last.as_ref()
    }

    /// Runs one report. `full` uses the full probe plan (otherwise incremental, from the last
    /// report); `home_heard_ago` is how long ago the home region's DERP connection last delivered a
    /// frame (it keeps a home that STUN cannot currently reach).
    pub async fn run(&mut self, map: &DerpMap, full: bool, home_heard_ago: Option<Duration>) -> Report {
        self.run_for_home(map, full, home_heard_ago, false).await
    }

    /// [`Self::run`], also told whether the home's DERP connection is down (then any other
    /// region that answers takes over at once; see [`home`]).
    pub async fn run_for_home(
        &mut self,
        map: &DerpMap,
        full: bool,
        home_heard_ago: Option<Duration>,
        home_down: bool,
    ) -> Report {
        let start = Instant::now();
        let mut report =
            Report { os_has_ipv6: std::net::UdpSocket::bind("[::1]:0").is_ok(), ..Default::default() };
        let (have4, have6) = (self.v4.is_some(), self.v6.is_some());
        let probes = if full {
            plan::full_plan(map, have4, have6, self.home)
        } else {
            plan::incremental_plan(map, self.last.as_ref(), have4, have6, self.home)
        };
        self.stun_phase(map, &probes, start, full, &mut report).await;
        if !report.udp && self.cfg.https_fallback {
            let deadline = start + self.cfg.timeout;
            https_phase(map, self.home, &self.cfg.connect, deadline, &mut report).await;
        }
        self.history.push(std::time::Instant::now(), &report.region_latency);
        let state =
            HomeState { old_home: self.home, old_home_heard_ago: home_heard_ago, old_home_down: home_down };
        self.home = choose_home(map, &self.history, &report.region_latency, state);
        report.preferred_derp = self.home.unwrap_or(0);
        self.last = Some(report.clone());
        report
    }

    async fn stun_phase(
        &self,
        map: &DerpMap,
        probes: &[Probe],
        start: Instant,
        full: bool,
        report: &mut Report,
    ) {
        if probes.is_empty() {
            return;
        }
        let answered: Arc<Mutex<HashSet<(i64, Family)>>> = Arc::default();
        let (ans_tx, mut ans_rx) = mpsc::channel::<Answer>(1024);
        let (sent_tx, mut sent_rx) = mpsc::channel::<Family>(256);
        self.demux.start(ans_tx);
        let mut tasks = JoinSet::new();
        if self.cfg.read_sockets {
            for sock in [&self.v4, &self.v6].into_iter().flatten() {
                tasks.spawn(read_answers(sock.clone(), self.demux.clone()));
            }
        }
        let wanted: HashSet<(i64, Family)> = probes.iter().map(|p| (p.region, p.family)).collect();
        for p in probes.iter().cloned() {
            let Some(node) = map.regions.get(&p.region).and_then(|r| r.nodes.get(p.node)).cloned() else {
                continue;
            };
            let sock = match p.family {
                Family::V4 => self.v4.clone(),
                Family::V6 => self.v6.clone(),
            };
            let Some(sock) = sock else { continue };
            let (demux, answered, sent_tx) = (self.demux.clone(), answered.clone(), sent_tx.clone());
            tasks.spawn(async move {
                tokio::time::sleep_until(start + p.delay).await;
                // Incremental reports stop probing a region once it answered (as Go does); full
                // reports send every try and keep the minimum, so one delayed answer (a busy
                // host) does not become the region's latency.
                if !full && answered.lock().expect("answered lock").contains(&(p.region, p.family)) {
                    return;
                }
                let Some(dst) = stun_addr(&node, p.family).await else { return };
                let txid = TxId::random();
                demux.expect(txid, Pending { region: p.region, family: p.family, sent: Instant::now() });
                if sock.send_to(&build_request(txid), dst).await.is_ok() {
                    let _ = sent_tx.send(p.family).await;
                }
            });
        }
        drop(sent_tx);
        let mut deadline = start + self.cfg.stun_timeout;
        let mut slowest = Duration::ZERO;
        let mut sent_open = true;
        let mut answers = 0usize;
        loop {
            tokio::select! {
                Some(a) = ans_rx.recv() => {
                    answered.lock().expect("answered lock").insert((a.region, a.family));
                    report.add_stun(a.region, a.family, a.rtt, a.mapped);
                    slowest = slowest.max(a.rtt);
                    if report.regions_answered() >= 3 {
                        let extra = if full { slowest * 2 } else { slowest };
                        deadline = deadline.min(Instant::now() + extra);
                    }
                    answers += 1;
                    let done = if full {
                        answers >= probes.len()
                    } else {
                        answered.lock().expect("answered lock").is_superset(&wanted)
                    };
                    if done {
                        break;
                    }
                }
                f = sent_rx.recv(), if sent_open => match f {
                    Some(Family::V4) => report.ipv4_can_send = true,
                    Some(Family::V6) => report.ipv6_can_send = true,
                    None => sent_open = false,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        tasks.abort_all();
        self.demux.finish();
    }
}

/// Reads `sock` and offers every datagram to `demux` (non-STUN datagrams are dropped here).
async fn read_answers(sock: Arc<UdpSocket>, demux: StunHandler) {
    let mut buf = vec![0u8; 1500];
    loop {
        let n = match sock.recv_from(&mut buf).await {
            Ok((n, _)) => n,
            // ICMP errors surface on the socket; they concern one destination, not the socket.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::HostUnreachable
                        | std::io::ErrorKind::NetworkUnreachable
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        demux.handle(&buf[..n]);
    }
}

/// Where to send STUN for `node` over `family` (STUNTestIP, the fixed address, or DNS).
async fn stun_addr(node: &DerpNode, family: Family) -> Option<SocketAddr> {
    let port = node.stun_port()?;
    let want_v6 = family == Family::V6;
    if let Ok(ip) = node.stun_test_ip.parse::<IpAddr>() {
        return (ip.is_ipv6() == want_v6).then_some(SocketAddr::new(ip, port));
    }
    let fixed = match family {
        Family::V4 => match node.ipv4_usage() {
            AddrUsage::Fixed(a) => Some(Some(IpAddr::V4(a))),
            AddrUsage::Disabled => return None,
            AddrUsage::Dns => None,
        },
        Family::V6 => match node.ipv6_usage() {
            AddrUsage::Fixed(a) => Some(Some(IpAddr::V6(a))),
            AddrUsage::Disabled => return None,
            AddrUsage::Dns => None,
        },
    };
    if let Some(ip) = fixed {
        return ip.map(|ip| SocketAddr::new(ip, port));
    }
    if let Ok(ip) = node.host_name.parse::<IpAddr>() {
        return (ip.is_ipv6() == want_v6).then_some(SocketAddr::new(ip, port));
    }
    let addrs = tokio::net::lookup_host((node.host_name.as_str(), port)).await.ok()?;
    addrs.into_iter().find(|a| a.is_ipv6() == want_v6)
}

/// HTTPS fallback: one timed `GET /derp/latency-check` per measurable region, in parallel.
async fn https_phase(
    map: &DerpMap,
    home: Option<i64>,
    opts: &ConnectOptions,
    deadline: Instant,
    report: &mut Report,
) {
    let mut set = JoinSet::new();
    for r in map.regions.values() {
        if !plan::measurable(r, home) || r.avoid || r.nodes.iter().all(|n| n.stun_only) {
            continue;
        }
        let (r, opts) = (r.clone(), opts.clone());
        set.spawn(async move { (r.region_id, https_latency(&r, &opts).await) });
    }
    let _ = tokio::time::timeout_at(deadline, async {
        while let Some(res) = set.join_next().await {
            match res {
                Ok((id, Ok(d))) => report.add_https(id, d),
                Ok((id, Err(e))) => tracing::debug!(region = id, "HTTPS latency check failed: {e}"),
                Err(_) => {}
            }
        }
    })
    .await;
}

/// TLS-dials `region` like the DERP client and times one `GET /derp/latency-check` on it.
pub async fn https_latency(region: &DerpRegion, opts: &ConnectOptions) -> Result<Duration, String> {
    let mut t = transport(&DerpTarget::Region(region.clone()), opts).await.map_err(|e| e.to_string())?;
    let req = format!(
        "GET /derp/latency-check HTTP/1.1\r\nHost: {}\r\nUser-Agent: derpfleet-client\r\nConnection: close\r\n\r\n",
        t.host_header
    );
    let start = Instant::now();
    t.stream.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    t.stream.flush().await.map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        match parse_response_head(&buf) {
            Ok(Some(head)) => {
                let rtt = start.elapsed();
                let code = head.status;
                return if code > 299 { Err(format!("HTTP status {code}")) } else { Ok(rtt) };
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let mut chunk = [0u8; 2048];
        let n = t.stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
