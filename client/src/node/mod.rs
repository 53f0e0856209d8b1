//! The reference node: WireGuard (boringtun) over DERP with Tailscale-style direct-path upgrade.
//!
//! `derpfleet-client up --config FILE` runs [`run`]. The pieces, one job each:
//! - [`config`]: the TOML file (keys, DERP map, TUN, peers).
//! - [`disco`]: disco keys and the Ping/Pong/CallMeMaybe codec in NaCl boxes.
//! - [`endpoint`]: per-peer path state (candidates, trust 6.5 s, heartbeat 3 s, betterAddr).
//! - [`magicsock`]: the shared UDP sockets' demux (STUN / disco / WireGuard) and our endpoints.
//! - [`udp`]: the IPv4 and IPv6 UDP sockets with batched I/O (`recvmmsg`/GRO, GSO sends).
//! - [`netmon`]: the network change monitor (rtnetlink) that restarts STUN, disco and DERP.
//! - [`wg`]: boringtun adapter (one `Tunn` per peer, shared rate limiter, peer lookup).
//! - [`tun`]: the TUN device; [`userspace`]: UDP port forwarding instead of a TUN (`tun.userspace`);
//!   [`device`]: either of them.
//! - [`regions`]: the DERP connections per region (opened on demand, idle ones closed);
//!   [`homing`]: netcheck/home-move records and the re-netcheck timing.
//! - [`engine`]: the running node gluing them together.
//! - [`status`]: the control socket and `derpfleet-client status`.
//!
//! # Running
//! ```text
//! derpfleet-client keygen > node.toml      # private_key / disco_key lines + public halves as comments
//! $EDITOR node.toml                        # add derp_map, [tun], [[peer]] (see `config`)
//! derpfleet-client up --config node.toml   # root: creates the TUN, runs `ip` for address/MTU/routes
//! derpfleet-client status --iface df0      # or --control PATH; --json for the raw document
//! ```
//! `up` prints one line when ready (`up: <iface> node <nodekey> disco <discokey> listen ... home
//! derp-<id> control <path>`) and stops on SIGINT/SIGTERM (the TUN interface vanishes with it).
//! `SIGUSR1` runs a netcheck at once (and re-decides the home).
//!
//! Home region: netcheck runs at start (unless the config names a `home_region`, which is then the
//! starting home) and again every 20–26 s; the home moves by the hysteresis rule of
//! [`crate::netcheck::home`], and at once off a home whose DERP connection is dead. `pin_home =
//! true` keeps `home_region` whatever netcheck says.
//!
//! Behaviour (spec §8): WireGuard goes over DERP to the peer's home region (SendPacket to its node
//! key) until a disco pong over UDP makes a direct address trusted (6.5 s, renewed by 3 s
//! heartbeats while traffic flows); while untrusted, each datagram goes both ways and a disco round
//! (pings + CallMeMaybe over DERP) runs every 5 s. Peers with a static `endpoint` and no disco key
//! are plain WireGuard peers (e.g. wireguard-go) reached directly. With `tun.userspace = true` no
//! TUN is created (no root needed apart from the control socket's default directory); `[[forward]]`
//! entries carry local UDP ports through the tunnel instead (UDP over IPv4 only).
//!
//! Underlay: one IPv4 and one IPv6 socket on the same port (IPv6 when the host has it); endpoints
//! of both families are advertised and pinged. On a network change (address, route or link, seen
//! over rtnetlink) the node forgets its STUN mappings and re-STUNs, re-reads its local addresses,
//! ends the trust of every direct path and runs a disco round with CallMeMaybe at once, reconnects
//! DERP and re-runs netcheck.
//!
//! Endpoints are STUN (home region, re-STUN every 20 s and on a home move), a NAT-PMP / PCP /
//! UPnP IGD port mapping on the gateway (IPv4, [`crate::portmap`]), plus local interface
//! addresses; no peer relays.

#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod device;
pub mod disco;
pub mod endpoint;
pub mod engine;
pub mod homing;
pub mod magicsock;
pub mod netmon;
pub mod regions;
pub mod status;
mod tasks;
pub mod tun;
pub mod udp;
pub mod userspace;
pub mod wg;

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::conn::ConnectOptions;
use crate::netcheck::{NetcheckConfig, Netchecker};
use config::NodeConfig;
use engine::Node;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// Binding the UDP socket failed.
    #[error("binding UDP port {port}: {source}")]
    Bind {
        /// the port
        port: u16,
        /// why
        source: std::io::Error,
    },
    /// TUN setup failed.
    #[error(transparent)]
    Tun(#[from] tun::TunError),
    /// The control socket could not be bound.
    #[error("control socket {path}: {source}")]
    Control {
        /// the path
        path: std::path::PathBuf,
        /// why
        source: std::io::Error,
    },
    /// A forwarded port could not be bound (userspace mode).
    #[error("userspace forward: {source}")]
    Forward {
        /// why
        source: std::io::Error,
    },
    /// Userspace mode needs an IPv4 address in `tun.addresses`.
    #[error("userspace mode needs an IPv4 address in tun.addresses")]
    NoUserspaceAddress,
    /// No home region: netcheck found none and the config names none.
    #[error("no home DERP region: netcheck got no answer and home_region is not set")]
    NoHome,
}

/// A started node; dropping it stops every task and removes the control socket.
pub struct RunningNode {
    /// the node
    pub node: Arc<Node>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    control: std::path::PathBuf,
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.node.release_port_mapping();
        let _ = std::fs::remove_file(&self.control);
    }
}

/// Starts the node: UDP socket, netcheck (for the home region and our STUN mapping, when the
/// config does not force a home), TUN, DERP connections, timers and the control socket.
pub async fn start(cfg: NodeConfig) -> Result<RunningNode, UpError> {
    let sock = udp::UdpConn::bind(cfg.listen_port)
        .map_err(|source| UpError::Bind { port: cfg.listen_port, source })?;
    let sock = Arc::new(sock);
    let port = sock.local_addr().map(|a| a.port()).unwrap_or(cfg.listen_port);
    let nc_cfg = NetcheckConfig {
        https_fallback: true,
        history_retention: cfg.netcheck_history,
        ..Default::default()
    };
    let mut nc = Netchecker::with_sockets(Some(sock.v4().clone()), None, nc_cfg);
    let mut first_report = None;
    let home = match cfg.home_region {
        Some(h) => {
            nc.set_home(Some(h));
            h
        }
        None => {
            // This first report reads the shared socket itself: the node's reader starts later.
            let report = nc.run(&cfg.derp_map, true, None).await;
            info!(home = report.preferred_derp, global_v4 = ?report.global_v4, "netcheck");
            if report.preferred_derp == 0 {
                return Err(UpError::NoHome);
            }
            let home = report.preferred_derp;
            first_report = Some(report);
            home
        }
    };
    // From now on the node's reader owns the socket and hands STUN answers to the netchecker.
    nc.set_read_sockets(false);
    let stun = nc.stun_handler();
    let dev = if cfg.userspace {
        let addr = cfg.userspace_address().ok_or(UpError::NoUserspaceAddress)?;
        let u = userspace::Userspace::start(addr, &cfg.forwards)
            .await
            .map_err(|source| UpError::Forward { source })?;
        device::Device::Userspace(u)
    } else {
        let tun = tun::Tun::create(&cfg.tun_name)?;
        tun.configure(&cfg.tun_addresses, cfg.mtu)?;
        for r in engine::extra_routes(&cfg) {
            tun.add_route(&r)?;
        }
        device::Device::Tun(tun)
    };
    let node = Arc::new(Node::new(&cfg, home, sock, dev, stun));
    {
        let mut own = node.own_endpoints().lock();
        own.set_ipv6(node.udp().v6().is_some());
        own.set_local(magicsock::local_addresses(
            port,
            node.udp().local_addr_v6().map(|a| a.port()),
            &cfg.tun_name,
        ));
    }
    if let Some(r) = &first_report {
        node.apply_report(r, "start", None);
    }
    let mut opts = ConnectOptions::new(cfg.private_key.clone());
    opts.app_name = Some("derpfleet-node".into());
    let mut tasks = tasks::spawn_tasks(node.clone(), opts, nc, first_report.is_some());
    let listener = status::bind(&cfg.control)
        .map_err(|source| UpError::Control { path: cfg.control.clone(), source })?;
    let n = node.clone();
    tasks.push(tokio::spawn(status::serve(listener, move || n.status())));
    Ok(RunningNode { node, tasks, control: cfg.control })
}

/// Runs until SIGINT/SIGTERM.
pub async fn run(cfg: NodeConfig) -> Result<(), UpError> {
    if cfg.disco_key_generated {
        warn!("no disco_key in the config: using a random one; peers cannot upgrade to a direct path");
    }
    let (node_key, disco_key, iface) =
        (cfg.private_key.public(), cfg.disco_key.public(), cfg.tun_name.clone());
    let control = cfg.control.clone();
    let running = start(cfg).await?;
    let st = running.node.status();
    println!(
        "up: {iface} node {node_key} disco {disco_key} listen {} home derp-{} control {}",
        st.listen,
        st.home_region,
        control.display()
    );
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k| signal(k).map_err(|source| UpError::Control { path: control.clone(), source });
    let (mut term, mut usr1) = (sig(SignalKind::terminate())?, sig(SignalKind::user_defined1())?);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = usr1.recv() => {
                info!("SIGUSR1: netcheck now");
                running.node.renetcheck();
            }
        }
    }
    info!("shutting down");
    running.node.release_port_mapping_async().await;
    drop(running);
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
