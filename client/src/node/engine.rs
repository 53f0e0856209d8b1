//! The running node: ties the TUN device, the shared UDP socket, the DERP region clients and
//! each peer's `Tunn` + path state together.
//!
//! Every send is non-blocking (`try_send` on UDP, the DERP queue and the TUN fd): a full queue drops
//! the datagram and counts it, like a congested link, so no lock is held across an await and memory
//! stays bounded. Lock order where both are taken: a peer's `tunn` before its `path`.
//!
//! Home and regions: the home region is re-decided after every netcheck (see [`super::homing`]
//! for the timing, [`crate::netcheck::home`] for the rule). A peer is reached through the region
//! its DERP packets last arrived through (at first: its configured `home_region`, else our home);
//! when that region's connection is down, through our home instead, where a peer that moved with
//! us will be. After a home move we `NotePreferred` the new home (the region task does it on the
//! home watch), re-STUN, and send every disco peer a CallMeMaybe through the new home and through
//! the region we reach it by, so it learns where we are from the packet's region.
//!
//! The tasks that feed it (readers, timers, DERP regions, netcheck, port mapping) are in
//! [`super::tasks`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use bytes::Bytes;
use derpfleet_proto::derpmap::DerpMap;
use derpfleet_proto::key::NodePublic;
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::config::{IpNet, NodeConfig, PeerConfig};
use super::device::Device;
use super::disco::{sender_key, DiscoMessage, DiscoPublic, SharedBox};
use super::endpoint::{Endpoint, PongOutcome, SendPath};
use super::homing::{self, Homing};
use super::magicsock::{classify, local_addresses, Kind, OwnEndpoints};
use super::netmon::{NetChanges, NetState};
use super::regions::{RegionCmd, Regions};
use super::status::{DropCounts, PathEvent, PeerStatus, PortMapStatus, Status};
use super::tun::PacketBatch;
use super::udp::{SendBatch, UdpConn};
use super::wg::{src_ip, Screened, WgIdentity, WgSender};
use crate::conn::DerpSender;
use crate::netcheck::{Report, StunHandler};
use crate::portmap::{Mapping, Protocol};

/// How often timers run (boringtun timers, disco pings, STUN).
pub const TICK: Duration = Duration::from_millis(100);
/// CallMeMaybe is sent at most this often per peer.
const CALL_ME_MAYBE_INTERVAL: Duration = Duration::from_secs(5);
/// Tailscale's placeholder IP for "via DERP" in a Pong's source field (port = region id).
const DERP_MAGIC_IP: Ipv4Addr = Ipv4Addr::new(127, 3, 3, 40);
/// Path changes kept per peer for status.
pub const PATH_HISTORY_LEN: usize = 16;

/// Drop counters for the whole node.
#[derive(Default)]
pub struct Drops {
    /// UDP sends that failed (would block or error)
    pub udp: AtomicU64,
    /// DERP sends that failed (queue full or disconnected)
    pub derp: AtomicU64,
    /// TUN writes that failed
    pub tun: AtomicU64,
    /// inner packets from a peer with a source outside its allowed IPs
    pub not_allowed: AtomicU64,
}

/// One peer.
pub struct Peer {
    cfg: PeerConfig,
    tunn: Mutex<Tunn>,
    path: Mutex<Endpoint>,
    disco: Option<SharedBox>,
    /// Static endpoint (plain WireGuard peers); follows the peer when it roams.
    static_ep: Mutex<Option<SocketAddr>>,
    derp_region: AtomicI64,
    /// `derp_region` was learned from packets (not just configured / our home).
    region_learned: AtomicBool,
    region_reason: Mutex<String>,
    log: Mutex<PathLog>,
    last_call_me_maybe: Mutex<Option<Instant>>,
    derp_tx: AtomicU64,
    udp_tx: AtomicU64,
}

/// Which way a peer's datagrams go, compared tick to tick for the path history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathKey {
    Direct(SocketAddr),
    Derp(i64),
}

#[derive(Default)]
struct PathLog {
    last: Option<PathKey>,
    events: VecDeque<PathEvent>,
}

impl PathLog {
    fn push(&mut self, path: String, reason: String) {
        if self.events.len() >= PATH_HISTORY_LEN {
            self.events.pop_front();
        }
        self.events.push_back(PathEvent { at_unix: homing::unix_now(), path, reason });
    }
}

impl Peer {
    fn uses_disco(&self) -> bool {
        self.disco.is_some()
    }
}

/// The node.
pub struct Node {
    pub(super) regions: Regions,
    pub(super) region_cmds: Mutex<Option<mpsc::UnboundedReceiver<RegionCmd>>>,
    pin_home: bool,
    pub(super) homing: Homing,
    netcheck_stun: StunHandler,
    pub(super) netcheck_interval: Duration,
    pub(super) portmap_protocols: Vec<Protocol>,
    pub(super) mapping: Mutex<Option<Mapping>>,
    portmap_error: Mutex<Option<String>>,
    pub(super) map: DerpMap,
    node_key: NodePublic,
    disco_pub: DiscoPublic,
    wg: WgIdentity,
    pub(super) sock: Arc<UdpConn>,
    pub(super) dev: Device,
    peers: Vec<Peer>,
    by_node: HashMap<NodePublic, usize>,
    by_disco: HashMap<DiscoPublic, usize>,
    own: Mutex<OwnEndpoints>,
    pub(super) drops: Drops,
    pub(super) tun_name: String,
    pub(super) net: NetChanges,
}

impl Node {
    /// Builds the node; `home` is the starting home region; `netcheck_stun` gets the STUN answers
    /// meant for the netchecker that [`spawn_tasks`](super::tasks::spawn_tasks) then runs.
    pub fn new(
        cfg: &NodeConfig,
        home: i64,
        sock: Arc<UdpConn>,
        dev: Device,
        netcheck_stun: StunHandler,
    ) -> Self {
        let wg = WgIdentity::new(&cfg.private_key);
        let mut peers = Vec::new();
        let (mut by_node, mut by_disco) = (HashMap::new(), HashMap::new());
        for (i, p) in cfg.peers.iter().enumerate() {
            let mut path = Endpoint::default();
            if let (Some(_), Some(ep)) = (p.disco_key, p.endpoint) {
                path.add_advertised(&[ep], false);
            }
            by_node.insert(p.public_key, i);
            if let Some(d) = p.disco_key {
                by_disco.insert(d, i);
            }
            peers.push(Peer {
                cfg: p.clone(),
                tunn: Mutex::new(wg.tunnel(&p.public_key, i as u32, p.keepalive)),
                path: Mutex::new(path),
                disco: p.disco_key.map(|d| cfg.disco_key.shared(&d)),
                static_ep: Mutex::new(if p.disco_key.is_none() { p.endpoint } else { None }),
                derp_region: AtomicI64::new(p.home_region.unwrap_or(home)),
                region_learned: AtomicBool::new(false),
                region_reason: Mutex::new(match p.home_region {
                    Some(_) => "its home_region in the config".into(),
                    None => "our home (no home_region in the config)".into(),
                }),
                log: Mutex::default(),
                last_call_me_maybe: Mutex::new(None),
                derp_tx: AtomicU64::new(0),
                udp_tx: AtomicU64::new(0),
            });
        }
        let (regions, region_cmds) = Regions::new(cfg.derp_map.regions.keys().copied(), home);
        regions.open(home);
        for p in &peers {
            regions.open(p.derp_region.load(Relaxed));
        }
        Self {
            regions,
            region_cmds: Mutex::new(Some(region_cmds)),
            pin_home: cfg.pin_home,
            homing: Homing::default(),
            netcheck_stun,
            netcheck_interval: cfg.netcheck_interval,
            portmap_protocols: cfg.portmap.clone(),
            mapping: Mutex::new(None),
            portmap_error: Mutex::new(cfg.portmap.is_empty().then(|| "off".to_string())),
            map: cfg.derp_map.clone(),
            node_key: cfg.private_key.public(),
            disco_pub: cfg.disco_key.public(),
            wg,
            sock,
            dev,
            peers,
            by_node,
            by_disco,
            own: Mutex::new(OwnEndpoints::default()),
            drops: Drops::default(),
            tun_name: cfg.tun_name.clone(),
            net: NetChanges::new(NetState::snapshot(&cfg.tun_name)),
        }
    }

    /// Our endpoint list (for tests and status).
    pub fn own_endpoints(&self) -> &Mutex<OwnEndpoints> {
        &self.own
    }

    /// Regions we keep a DERP connection to (or are connecting to).
    pub fn regions(&self) -> Vec<i64> {
        self.regions.open_regions()
    }

    /// The current home region.
    pub fn home(&self) -> i64 {
        self.regions.home()
    }

    /// Runs a netcheck now (and re-decides the home): for a network-change watcher, or an
    /// operator (`SIGUSR1`).
    pub fn renetcheck(&self) {
        self.homing.request();
    }

    /// The region `peer`'s DERP datagrams go through: the one it was last heard on (or
    /// configured), or our home while that one's connection is down.
    fn peer_route(&self, peer: &Peer) -> i64 {
        let r = peer.derp_region.load(Relaxed);
        if self.regions.connected(r) {
            r
        } else {
            self.regions.home()
        }
    }

    /// Notes that `peer`'s DERP packets arrive through `region` (we answer there from now on).
    fn learn_peer_region(&self, peer: &Peer, region: i64, what: &str) {
        peer.region_learned.store(true, Relaxed);
        let old = peer.derp_region.swap(region, Relaxed);
        if old != region {
            let reason = format!("its {what} arrived via derp-{region} (was derp-{old})");
            info!(peer = %peer.cfg.public_key.short(), region, old, "peer region learned");
            self.regions.open(region);
            *peer.region_reason.lock() = reason.clone();
            peer.log.lock().push(format!("derp-{region}"), reason);
        } else if what == "disco packets" || peer.region_reason.lock().starts_with("its home_region") {
            // Refresh the reason, but only on the rarer disco packets or once (not per datagram).
            *peer.region_reason.lock() = format!("its {what} arrive via derp-{region}");
        }
    }

    fn peer_for_ip(&self, dst: IpAddr) -> Option<&Peer> {
        let mut best: Option<(&Peer, u8)> = None;
        for p in &self.peers {
            for n in &p.cfg.allowed_ips {
                if n.contains(dst) && best.is_none_or(|(_, l)| n.len > l) {
                    best = Some((p, n.len));
                }
            }
        }
        best.map(|(p, _)| p)
    }

    /// Sends one UDP datagram now, or queues it in `out` (a batch flushed by the caller).
    fn udp_send_via(&self, data: &[u8], to: SocketAddr, out: Option<&mut SendBatch>) -> bool {
        match out {
            Some(b) => {
                b.push(to, data);
                true
            }
            None => self.udp_send(data, to),
        }
    }

    fn udp_send(&self, data: &[u8], to: SocketAddr) -> bool {
        if self.sock.try_send_to(data, to).is_err() {
            self.drops.udp.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    fn derp_send(&self, region: i64, dst: NodePublic, data: &[u8]) -> bool {
        let sent = self
            .regions
            .sender(region)
            .is_some_and(|s| s.try_send_packet(dst, Bytes::copy_from_slice(data)).is_ok());
        if sent {
            self.regions.note_tx(region);
        } else {
            self.drops.derp.fetch_add(1, Relaxed);
        }
        sent
    }

    /// Sends one WireGuard datagram to `peer` by its current path (spec §8 "Send path").
    fn send_wg(&self, peer: &Peer, data: &[u8]) {
        self.send_wg_via(peer, data, None)
    }

    /// [`Node::send_wg`], with UDP datagrams queued in `out` when given.
    fn send_wg_via(&self, peer: &Peer, data: &[u8], out: Option<&mut SendBatch>) {
        if let Some(ep) = *peer.static_ep.lock() {
            peer.udp_tx.fetch_add(1, Relaxed);
            self.udp_send_via(data, ep, out);
            return;
        }
        let path = if peer.uses_disco() {
            peer.path.lock().send_path(Instant::now())
        } else {
            SendPath::DerpAnd(None)
        };
        match path {
            SendPath::Direct(a) => {
                peer.udp_tx.fetch_add(1, Relaxed);
                self.udp_send_via(data, a, out);
            }
            SendPath::DerpAnd(a) => {
                if let Some(a) = a {
                    peer.udp_tx.fetch_add(1, Relaxed);
                    self.udp_send_via(data, a, out);
                }
                peer.derp_tx.fetch_add(1, Relaxed);
                self.derp_send(self.peer_route(peer), peer.cfg.public_key, data);
            }
        }
    }

    fn write_tun(&self, peer: &Peer, pkt: &[u8], src: IpAddr) {
        if !peer.cfg.allowed_ips.iter().any(|n| n.contains(src)) {
            self.drops.not_allowed.fetch_add(1, Relaxed);
            return;
        }
        if self.dev.try_send(pkt).is_err() {
            self.drops.tun.fetch_add(1, Relaxed);
        }
    }

    /// An IP packet read from the TUN device.
    pub fn on_tun_packet(&self, pkt: &[u8], buf: &mut [u8]) {
        self.encapsulate(pkt, buf, None);
    }

    /// A burst of IP packets from the device: each is encrypted for its peer and its UDP
    /// datagram queued in `out`, which the caller sends as GSO runs ([`UdpConn::send_batch`]).
    pub fn on_tun_batch(&self, pkts: &PacketBatch, buf: &mut [u8], out: &mut SendBatch) {
        for pkt in pkts.iter() {
            self.encapsulate(pkt, buf, Some(out));
        }
    }

    fn encapsulate(&self, pkt: &[u8], buf: &mut [u8], out: Option<&mut SendBatch>) {
        let Some(dst) = Tunn::dst_address(pkt) else { return };
        let Some(peer) = self.peer_for_ip(dst) else { return };
        let mut t = peer.tunn.lock();
        match t.encapsulate(pkt, buf) {
            TunnResult::WriteToNetwork(d) => self.send_wg_via(peer, d, out),
            TunnResult::Err(e) => debug!("encapsulate: {e:?}"),
            _ => {}
        }
    }

    /// A WireGuard datagram from `peer`, via UDP from `from` or via DERP (`from` = None).
    fn on_wg(&self, peer: &Peer, from: Option<SocketAddr>, data: &[u8], buf: &mut [u8]) {
        let mut t = peer.tunn.lock();
        let mut ok = false;
        match t.decapsulate(src_ip(from), data, buf) {
            TunnResult::WriteToNetwork(d) => {
                ok = true;
                self.send_wg(peer, d);
                while let TunnResult::WriteToNetwork(d) = t.decapsulate(None, &[], buf) {
                    self.send_wg(peer, d);
                }
            }
            TunnResult::WriteToTunnelV4(p, src) => {
                ok = true;
                self.write_tun(peer, p, IpAddr::V4(src));
            }
            TunnResult::WriteToTunnelV6(p, src) => {
                ok = true;
                self.write_tun(peer, p, IpAddr::V6(src));
            }
            TunnResult::Done => ok = true,
            TunnResult::Err(e) => debug!(peer = %peer.cfg.public_key.short(), "decapsulate: {e:?}"),
        }
        drop(t);
        // WireGuard roaming for plain peers: follow an authenticated source address.
        if let (true, Some(from)) = (ok, from) {
            let mut ep = peer.static_ep.lock();
            if ep.is_some() && *ep != Some(from) {
                info!(peer = %peer.cfg.public_key.short(), %from, "peer roamed");
                *ep = Some(from);
            }
        }
    }

    /// A datagram on the shared UDP socket.
    pub fn on_udp(&self, data: &[u8], from: SocketAddr, buf: &mut [u8]) {
        match classify(data) {
            Kind::Stun => {
                if self.netcheck_stun.handle(data) {
                    return;
                }
                let new = self.own.lock().on_stun(data, Instant::now());
                if let Some(m) = new {
                    info!(mapped = %m, "STUN: new endpoint");
                    self.announce_endpoints();
                }
            }
            Kind::Disco => self.on_disco(data, DiscoVia::Udp(from)),
            Kind::WireGuard => {
                let sender = match self.wg.screen(from, data, buf) {
                    Screened::Peer(s) => s,
                    Screened::Reply(cookie) => {
                        self.udp_send(cookie, from);
                        return;
                    }
                    Screened::Drop => return,
                };
                let idx = match sender {
                    WgSender::Key(k) => self.by_node.get(&k).copied(),
                    WgSender::Index(i) => Some(i as usize).filter(|&i| i < self.peers.len()),
                };
                if let Some(i) = idx {
                    self.on_wg(&self.peers[i], Some(from), data, buf);
                }
            }
        }
    }

    /// A packet relayed by DERP region `region` from node `src`.
    pub fn on_derp_packet(&self, region: i64, src: NodePublic, data: &[u8], buf: &mut [u8]) {
        if derpfleet_proto::disco::looks_like_disco(data) {
            self.on_disco(data, DiscoVia::Derp { region, node: src });
            return;
        }
        let Some(&i) = self.by_node.get(&src) else { return };
        let peer = &self.peers[i];
        if peer.derp_region.load(Relaxed) != region || !peer.region_learned.load(Relaxed) {
            self.learn_peer_region(peer, region, "packets");
        }
        self.on_wg(peer, None, data, buf);
    }

    fn send_disco(&self, peer: &Peer, msg: &DiscoMessage, via: DiscoVia) {
        let Some(b) = &peer.disco else { return };
        let pkt = b.seal(&self.disco_pub, msg);
        match via {
            DiscoVia::Udp(a) => {
                self.udp_send(&pkt, a);
            }
            DiscoVia::Derp { region, node } => {
                self.derp_send(region, node, &pkt);
            }
        }
    }

    fn send_ping(&self, peer: &Peer, to: SocketAddr) {
        debug!(peer = %peer.cfg.public_key.short(), %to, "send disco ping");
        let tx_id: [u8; 12] = rand::random();
        peer.path.lock().note_ping_sent(to, tx_id, Instant::now());
        self.send_disco(
            peer,
            &DiscoMessage::Ping { tx_id, node_key: Some(self.node_key.0) },
            DiscoVia::Udp(to),
        );
    }

    fn on_disco(&self, pkt: &[u8], via: DiscoVia) {
        let Some(sender) = sender_key(pkt) else { return };
        let Some(&i) = self.by_disco.get(&sender) else { return };
        let peer = &self.peers[i];
        let Some(b) = &peer.disco else { return };
        let Ok(msg) = b.open(pkt) else { return };
        if let DiscoVia::Derp { node, region } = via {
            if node != peer.cfg.public_key {
                return;
            }
            self.learn_peer_region(peer, region, "disco packets");
        }
        let now = Instant::now();
        match msg {
            DiscoMessage::Ping { tx_id, .. } => {
                let src = match via {
                    DiscoVia::Udp(a) => a,
                    DiscoVia::Derp { region, .. } => {
                        SocketAddr::new(IpAddr::V4(DERP_MAGIC_IP), u16::try_from(region).unwrap_or(0))
                    }
                };
                self.send_disco(peer, &DiscoMessage::Pong { tx_id, src }, via);
                if let DiscoVia::Udp(a) = via {
                    let back = peer.path.lock().note_ping_from(a, now);
                    debug!(peer = %peer.cfg.public_key.short(), from = %a, back, "disco ping");
                    if back {
                        self.send_ping(peer, a);
                    }
                }
            }
            DiscoMessage::Pong { tx_id, .. } => {
                if let DiscoVia::Udp(a) = via {
                    let out = peer.path.lock().on_pong(tx_id, a, now);
                    debug!(peer = %peer.cfg.public_key.short(), from = %a, ?out, "disco pong");
                    if out == PongOutcome::NewBest {
                        info!(peer = %peer.cfg.public_key.short(), addr = %a, "direct path");
                    }
                }
            }
            DiscoMessage::CallMeMaybe { endpoints } => {
                if matches!(via, DiscoVia::Udp(_)) {
                    return; // only valid over DERP
                }
                debug!(peer = %peer.cfg.public_key.short(), ?endpoints, "call-me-maybe");
                peer.path.lock().on_call_me_maybe(&endpoints, now);
                for e in endpoints {
                    self.send_ping(peer, e);
                }
            }
        }
    }

    /// Periodic work: boringtun timers, disco pings/CallMeMaybe, re-STUN.
    pub fn tick(&self, buf: &mut [u8]) {
        let now = Instant::now();
        let home = self.regions.home();
        let stun = self.own.lock().stun_due(self.map.regions.get(&home), now);
        for (to, req) in stun {
            self.udp_send(&req, to);
        }
        let own = self.own.lock().list(now);
        let mut in_use = Vec::new();
        for peer in &self.peers {
            in_use.push(peer.derp_region.load(Relaxed));
            self.log_path(peer, now);
            {
                let mut t = peer.tunn.lock();
                if let TunnResult::WriteToNetwork(d) = t.update_timers(buf) {
                    self.send_wg(peer, d);
                }
            }
            if !peer.uses_disco() {
                continue;
            }
            let (due, round) = peer.path.lock().pings_due(now);
            for a in due {
                self.send_ping(peer, a);
            }
            if round && !own.is_empty() {
                let mut last = peer.last_call_me_maybe.lock();
                if last.is_none_or(|t| now.duration_since(t) >= CALL_ME_MAYBE_INTERVAL) {
                    *last = Some(now);
                    drop(last);
                    let via = DiscoVia::Derp { region: self.peer_route(peer), node: peer.cfg.public_key };
                    self.send_disco(peer, &DiscoMessage::CallMeMaybe { endpoints: own.clone() }, via);
                }
            }
        }
        for r in self.regions.idle(&in_use, now) {
            info!(region = r, "closing idle DERP region");
            self.regions.close(r);
        }
    }

    /// Records the port mapping (or why there is none) and advertises its address.
    pub(super) fn set_mapping(&self, m: Result<Mapping, String>) {
        let (addr, err, m) = match m {
            Ok(m) => (Some(SocketAddr::V4(m.external)), None, Some(m)),
            Err(e) => (None, Some(e), None),
        };
        self.own.lock().set_mapped(addr);
        *self.mapping.lock() = m;
        *self.portmap_error.lock() = err;
    }

    /// Deletes the port mapping on the gateway, waiting up to 2 s for a UPnP gateway's answer.
    pub async fn release_port_mapping_async(&self) {
        let m = self.mapping.lock().take();
        if let Some(m) = m {
            info!(external = %m.external, protocol = m.protocol.name(), "deleting port mapping");
            match tokio::time::timeout(Duration::from_secs(2), m.delete()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("deleting port mapping: {e}"),
                Err(_) => warn!("deleting port mapping: no answer in 2 s"),
            }
        }
    }

    /// Deletes a NAT-PMP / PCP port mapping without waiting (the node is stopping).
    pub fn release_port_mapping(&self) {
        if let Some(m) = self.mapping.lock().take() {
            info!(external = %m.external, protocol = m.protocol.name(), "deleting port mapping");
            m.delete_now();
        }
    }

    /// Where `peer`'s datagrams go now (for the path history).
    fn path_key(&self, peer: &Peer, now: Instant) -> PathKey {
        if let Some(ep) = *peer.static_ep.lock() {
            return PathKey::Direct(ep);
        }
        match peer.path.lock().peek_path(now) {
            SendPath::Direct(a) => PathKey::Direct(a),
            SendPath::DerpAnd(_) => PathKey::Derp(self.peer_route(peer)),
        }
    }

    /// Appends to `peer`'s path history when its path changed since the last tick.
    fn log_path(&self, peer: &Peer, now: Instant) {
        let key = self.path_key(peer, now);
        let mut log = peer.log.lock();
        if log.last == Some(key) {
            return;
        }
        let reason = match (log.last, key) {
            (_, PathKey::Direct(a)) if peer.static_ep.lock().is_some() => format!("static endpoint {a}"),
            (_, PathKey::Direct(a)) => {
                format!("disco pong from {a}: trusted for 6.5 s, renewed by heartbeats")
            }
            (Some(PathKey::Direct(a)), PathKey::Derp(r)) => {
                format!("no pong from {a} within the trust time: relayed via derp-{r}")
            }
            (_, PathKey::Derp(r)) if r != peer.derp_region.load(Relaxed) => {
                format!("derp-{} not connected: via our home derp-{r}", peer.derp_region.load(Relaxed))
            }
            (_, PathKey::Derp(_)) => peer.region_reason.lock().clone(),
        };
        let path = match key {
            PathKey::Direct(a) => format!("direct {a}"),
            PathKey::Derp(r) => format!("derp-{r}"),
        };
        log.last = Some(key);
        log.push(path, reason);
    }

    /// Takes in a finished netcheck report: records it, learns our STUN mapping, and moves home
    /// when the report prefers another region (unless the home is pinned).
    pub fn apply_report(&self, report: &Report, trigger: &str, home_down: Option<Duration>) {
        self.homing.record_report(report, trigger);
        if let Some(m) = report.global_v4 {
            self.own.lock().add_stun(m, Instant::now());
        }
        let (old, new) = (self.regions.home(), report.preferred_derp);
        if self.pin_home || new == 0 || new == old {
            return;
        }
        let reason = homing::move_reason(old, new, &report.region_latency, home_down);
        self.move_home(new, reason);
    }

    /// Moves the home to `new`: NotePreferred (through the home watch), re-STUN, re-announce.
    pub fn move_home(&self, new: i64, reason: String) {
        let old = self.regions.home();
        info!(from = old, to = new, %reason, "home region moved");
        self.regions.set_home(new);
        self.homing.record_move(old, new, reason);
        self.own.lock().restun_now();
        for peer in &self.peers {
            if !peer.region_learned.load(Relaxed) && peer.cfg.home_region.is_none() {
                peer.derp_region.store(new, Relaxed);
                *peer.region_reason.lock() = "our home (no home_region in the config)".into();
            }
        }
        self.announce();
    }

    /// CallMeMaybe to every disco peer through our home and through the region we reach it by.
    fn announce(&self) {
        let now = Instant::now();
        let own = self.own.lock().list(now);
        if own.is_empty() {
            return;
        }
        let home = self.regions.home();
        // Extra to the regular rounds: the rate limit of those is left alone.
        for peer in self.peers.iter().filter(|p| p.uses_disco()) {
            let route = self.peer_route(peer);
            for region in if route == home { vec![home] } else { vec![home, route] } {
                let via = DiscoVia::Derp { region, node: peer.cfg.public_key };
                self.send_disco(peer, &DiscoMessage::CallMeMaybe { endpoints: own.clone() }, via);
            }
        }
    }

    /// Network changes seen by the monitor (subscribe to react, e.g. re-run netcheck).
    pub fn net_changes(&self) -> &NetChanges {
        &self.net
    }

    /// The network changed: refresh our local candidates, forget STUN mappings and re-STUN now,
    /// and restart disco with every peer (trust ends, a round with CallMeMaybe runs at the next
    /// tick). The sockets stay: they are bound to the wildcard address.
    pub fn on_network_change(&self) {
        let port = self.sock.local_addr().map(|a| a.port()).unwrap_or(0);
        let port6 = self.sock.local_addr_v6().map(|a| a.port());
        self.own.lock().on_network_change(local_addresses(port, port6, &self.tun_name));
        let now = Instant::now();
        for p in &self.peers {
            p.path.lock().on_network_change(now);
            *p.last_call_me_maybe.lock() = None;
        }
        // Latencies and the best home may differ on the new network.
        self.renetcheck();
    }

    /// Our endpoint list changed: tell peers at the next tick (round + CallMeMaybe).
    fn announce_endpoints(&self) {
        for p in self.peers.iter().filter(|p| p.uses_disco()) {
            p.path.lock().restart_round();
            *p.last_call_me_maybe.lock() = None;
        }
    }

    /// Resets the shared handshake limiter (once a second).
    pub fn reset_rate_limit(&self) {
        self.wg.reset_rate_limit();
    }

    /// Records the current sender of `region` (None while disconnected).
    pub fn set_derp_sender(&self, region: i64, s: Option<DerpSender>) {
        // Only a reconnect after an outage, not the first connect (peers may not be there yet, and
        // the regular disco round announces anyway).
        let home_came_back =
            s.is_some() && region == self.regions.home() && self.regions.down_since(region).is_some();
        self.regions.set_sender(region, s);
        if home_came_back {
            // Peers may have failed to reach us meanwhile: tell them where we are.
            self.announce();
        }
    }

    /// The status document.
    pub fn status(&self) -> Status {
        let now = Instant::now();
        let peers = self
            .peers
            .iter()
            .map(|p| {
                let (hs, tx, rx, _, _) = p.tunn.lock().stats();
                let path = p.path.lock();
                let region = self.peer_route(p);
                let configured = p.derp_region.load(Relaxed);
                let derp_region_reason = if region == configured {
                    p.region_reason.lock().clone()
                } else {
                    format!("derp-{configured} not connected: via our home")
                };
                let (path_s, latency) = match *p.static_ep.lock() {
                    Some(ep) => (format!("direct {ep}"), None),
                    None => match path.peek_path(now) {
                        SendPath::Direct(a) => {
                            (format!("direct {a}"), path.best().map(|b| b.latency.as_secs_f64() * 1e3))
                        }
                        SendPath::DerpAnd(_) => (format!("derp-{region}"), None),
                    },
                };
                PeerStatus {
                    node_key: p.cfg.public_key.to_string(),
                    path: path_s,
                    latency_ms: latency,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                    last_handshake_secs: hs.map(|d| d.as_secs_f64()),
                    derp_tx_packets: p.derp_tx.load(Relaxed),
                    udp_tx_packets: p.udp_tx.load(Relaxed),
                    candidates: path.candidate_count(),
                    derp_region: region,
                    derp_region_reason,
                    path_history: p.log.lock().events.iter().cloned().collect(),
                }
            })
            .collect();
        let home = self.regions.home();
        Status {
            node_key: self.node_key.to_string(),
            disco_key: self.disco_pub.to_string(),
            home_region: home,
            home_connected: self.regions.connected(home),
            listen: self.sock.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            endpoints: self.own.lock().list(now),
            peers,
            drops: DropCounts {
                udp: self.drops.udp.load(Relaxed),
                derp: self.drops.derp.load(Relaxed),
                tun: self.drops.tun.load(Relaxed),
                not_allowed: self.drops.not_allowed.load(Relaxed),
            },
            pin_home: self.pin_home,
            regions_connected: self.regions.connected_regions(),
            netcheck: self.homing.netcheck_status(),
            home_history: self.homing.moves(),
            port_mapping: match &*self.mapping.lock() {
                Some(m) => PortMapStatus {
                    protocol: Some(m.protocol.name().into()),
                    external: Some(SocketAddr::V4(m.external)),
                    renew_in_secs: Some(m.renew_at().saturating_duration_since(now).as_secs_f64()),
                    error: None,
                },
                None => PortMapStatus { error: self.portmap_error.lock().clone(), ..Default::default() },
            },
        }
    }

    /// The packet device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The shared IPv4 socket.
    pub fn socket(&self) -> &Arc<UdpSocket> {
        self.sock.v4()
    }

    /// Both UDP sockets.
    pub fn udp(&self) -> &Arc<UdpConn> {
        &self.sock
    }

    /// Drop counters.
    pub fn drops(&self) -> &Drops {
        &self.drops
    }
}

/// Where a disco message came from / goes to.
#[derive(Clone, Copy, Debug)]
enum DiscoVia {
    Udp(SocketAddr),
    Derp { region: i64, node: NodePublic },
}

/// Allowed-IP prefixes not already covered by the TUN's own address prefixes (they need routes).
pub fn extra_routes(cfg: &NodeConfig) -> Vec<IpNet> {
    let mut out = Vec::new();
    for p in &cfg.peers {
        for n in &p.allowed_ips {
            let covered = cfg.tun_addresses.iter().any(|a| {
                a.len <= n.len
                    && a.addr.is_ipv4() == n.addr.is_ipv4()
                    && IpNet { addr: a.addr, len: a.len }.contains(n.addr)
            });
            if !covered && !out.contains(n) {
                out.push(*n);
            }
        }
    }
    out
}
