//! The node's background tasks: the UDP and TUN readers, the timer tick, network-change
//! watching, one task per DERP region, the netcheck loop that re-decides the home region, and port
//! mapping. Each only feeds events into [`Node`], which holds all the state.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use derpfleet_proto::msg::ServerToClient;
use tracing::{debug, info, warn};

use super::engine::{Node, TICK};
use super::homing;
use super::regions;
use super::tun::PacketBatch;
use super::udp::{Family, RecvBatch, SendBatch};
use super::wg::WG_BUF_LEN;
use crate::conn::{ConnectOptions, DerpTarget};
use crate::netcheck::Netchecker;
use crate::portmap;
use crate::region::{DerpRegionClient, RegionClientConfig, RegionEvent};

/// Most inner packets read from the device per burst (one GSO send each way per burst and peer).
const TUN_BATCH: usize = 64;

/// Starts the background tasks: UDP reader, TUN reader, timers, DERP regions, and the netcheck
/// loop with `netchecker` (its first report runs at once unless `first_report_done`).
pub(super) fn spawn_tasks(
    node: Arc<Node>,
    opts: ConnectOptions,
    netchecker: Netchecker,
    first_report_done: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for family in [Family::V4, Family::V6] {
        let n = node.clone();
        tasks.push(tokio::spawn(async move {
            let mut rb = RecvBatch::default();
            let mut wbuf = vec![0u8; WG_BUF_LEN];
            loop {
                match n.sock.recv(family, &mut rb).await {
                    Ok(k) => {
                        for (from, d) in rb.datagrams(k) {
                            n.on_udp(d, from, &mut wbuf);
                        }
                    }
                    Err(e) => {
                        // ICMP errors surface here on Linux; keep reading.
                        debug!("udp recv: {e}");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }));
    }
    let n = node.clone();
    tasks.push(tokio::spawn(async move {
        let mut pkts = PacketBatch::new(TUN_BATCH, 65536);
        let mut wbuf = vec![0u8; WG_BUF_LEN];
        let mut out = SendBatch::default();
        loop {
            match n.dev.recv_batch(&mut pkts).await {
                Ok(_) => {
                    n.on_tun_batch(&pkts, &mut wbuf, &mut out);
                    let failed = n.sock.send_batch(&mut out).await;
                    n.drops.udp.fetch_add(failed, Relaxed);
                }
                Err(e) => {
                    warn!("device read: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }));
    let n = node.clone();
    tasks.push(tokio::spawn(async move {
        let mut buf = vec![0u8; WG_BUF_LEN];
        let mut iv = tokio::time::interval(TICK);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reset = Instant::now();
        loop {
            iv.tick().await;
            n.tick(&mut buf);
            if last_reset.elapsed() >= Duration::from_secs(1) {
                last_reset = Instant::now();
                n.reset_rate_limit();
            }
        }
    }));
    let n = node.clone();
    tasks.push(tokio::spawn(async move { super::netmon::run(n.tun_name.clone(), &n.net).await }));
    let n = node.clone();
    let mut net = node.net.subscribe();
    tasks.push(tokio::spawn(async move {
        while net.changed().await.is_ok() {
            n.on_network_change();
        }
    }));
    if let Some(cmds) = node.region_cmds.lock().take() {
        let n = node.clone();
        tasks.push(tokio::spawn(regions::manage(cmds, move |region, set| {
            set.spawn(region_task(n.clone(), region, opts.clone()))
        })));
    }
    tasks.push(tokio::spawn(netcheck_loop(node.clone(), netchecker, first_report_done)));
    if !node.portmap_protocols.is_empty() {
        tasks.push(tokio::spawn(portmap_loop(node.clone())));
    }
    tasks
}

/// Without a mapping, port mapping is retried this often (gateways come and go with networks).
const PORTMAP_RETRY: Duration = Duration::from_secs(30);

/// Keeps a port mapping for the shared socket's port: maps, renews at half the lifetime (asking
/// for the same external port), retries every [`PORTMAP_RETRY`] while none is granted; a failed
/// renewal keeps the mapping until it expires.
async fn portmap_loop(node: Arc<Node>) {
    let Ok(port) = node.sock.local_addr().map(|a| a.port()) else { return };
    loop {
        let prev = node.mapping.lock().clone();
        let r = match portmap::discover() {
            None => Err(portmap::PortmapError::NoGateway),
            Some(gw) => portmap::map_port(&gw, port, prev.as_ref(), &node.portmap_protocols).await,
        };
        let wait = match r {
            Ok(m) => {
                if prev.as_ref().map(|p| p.external) != Some(m.external) {
                    info!(protocol = m.protocol.name(), external = %m.external, lifetime = ?m.lifetime, "port mapped");
                }
                let renew =
                    m.renew_at().saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                node.set_mapping(Ok(m));
                renew
            }
            // A renewal that failed leaves the mapping in use until it expires.
            Err(e) if prev.as_ref().is_some_and(|p| Instant::now() < p.obtained + p.lifetime) => {
                warn!("renewing port mapping: {e}");
                PORTMAP_RETRY
            }
            Err(e) => {
                debug!("port mapping: {e}");
                node.set_mapping(Err(e.to_string()));
                PORTMAP_RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One region's DERP client: delivers its packets to the node, tracks its connection, and sends
/// `NotePreferred` when the home moves to or from it.
async fn region_task(node: Arc<Node>, region: i64, opts: ConnectOptions) {
    let Some(r) = node.map.regions.get(&region).cloned() else { return };
    let mut home = node.regions.watch_home();
    let mut cfg = RegionClientConfig::new(DerpTarget::Region(r), opts);
    cfg.is_home = *home.borrow_and_update() == region;
    let mut client = DerpRegionClient::spawn(cfg.clone());
    let mut net = node.net.subscribe();
    let mut buf = vec![0u8; WG_BUF_LEN];
    loop {
        tokio::select! {
            Ok(()) = net.changed() => {
                // The connection may be bound to an address that is gone: reconnect now rather
                // than after a read timeout (Tailscale closes DERP on rebind too).
                info!(region, "network changed: reconnecting DERP");
                node.set_derp_sender(region, None);
                cfg.is_home = *home.borrow() == region;
                client = DerpRegionClient::spawn(cfg.clone());
            }
            ev = client.recv() => {
                let Some(ev) = ev else { return };
                match ev {
                    RegionEvent::Connected(info) => {
                        info!(region, remote = %info.remote, "DERP connected");
                        node.regions.note_rx(region);
                        node.set_derp_sender(region, client.wait_connected(Duration::from_secs(1)).await);
                    }
                    RegionEvent::Disconnected { error, .. } | RegionEvent::ConnectFailed { error, .. } => {
                        warn!(region, "DERP: {error}");
                        node.set_derp_sender(region, None);
                    }
                    RegionEvent::Message(m) => {
                        node.regions.note_rx(region);
                        if let ServerToClient::RecvPacket { src, data } = m {
                            node.on_derp_packet(region, src, &data, &mut buf)
                        }
                    }
                }
            }
            c = home.changed() => {
                if c.is_err() {
                    return;
                }
                client.set_home(*home.borrow_and_update() == region);
            }
        }
    }
}

/// Re-runs netcheck (periodically, on request, and when the home's DERP connection died) and
/// applies each report. Timing: see [`super::homing`].
async fn netcheck_loop(node: Arc<Node>, mut nc: Netchecker, first_report_done: bool) {
    let jitter = || homing::jittered(node.netcheck_interval, rand::random());
    let start = tokio::time::Instant::now();
    let mut next = if first_report_done { start + jitter() } else { start };
    let mut trigger = if first_report_done { "periodic" } else { "start" };
    let mut last_full: Option<tokio::time::Instant> = first_report_done.then_some(start);
    let mut last_run = std::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = node.homing.requested() => trigger = "requested",
            _ = poll.tick() => {
                let home = node.regions.home();
                let dead = node.regions.down_since(home).is_some_and(|t| {
                    t.elapsed() >= homing::HOME_DOWN_GRACE && last_run < t + homing::HOME_DOWN_GRACE
                });
                if !dead {
                    continue;
                }
                trigger = "home DERP down";
            }
        }
        let home = node.regions.home();
        let down =
            node.regions.down_since(home).map(|t| t.elapsed()).filter(|d| *d >= homing::HOME_DOWN_GRACE);
        let full =
            trigger != "periodic" || last_full.is_none_or(|t| t.elapsed() >= homing::FULL_REPORT_EVERY);
        if full {
            last_full = Some(tokio::time::Instant::now());
        }
        nc.set_home(Some(home));
        let report = nc.run_for_home(&node.map, full, node.regions.heard_ago(home), down.is_some()).await;
        debug!(trigger, full, home = report.preferred_derp, latencies = ?report.region_latency, "netcheck");
        node.apply_report(&report, trigger, down);
        last_run = std::time::Instant::now();
        let still_down = node.regions.down_since(node.regions.home()).is_some();
        next = tokio::time::Instant::now() + if still_down { homing::HOME_DOWN_RETRY } else { jitter() };
        trigger = "periodic";
    }
}
