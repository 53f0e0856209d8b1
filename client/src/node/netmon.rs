//! Network change monitor: watches rtnetlink (links, IPv4/IPv6 addresses and routes) and publishes
//! a [`NetChange`] on a `tokio::sync::watch` channel whenever the host's usable network changed.
//!
//! Netlink messages are only a hint: after one arrives (and a short settle delay that coalesces a
//! burst such as "address removed, route removed, address added, route added"), the monitor takes a
//! [`NetState`] snapshot (local addresses other than our TUN's, and the default routes) and
//! publishes only when it differs from the last one. So the node's own TUN setup, or a neighbour
//! table churn, never counts as a change, and subscribers see one event per real move (Tailscale's
//! netmon does the same "is this a major change" comparison).
//!
//! Subscribers: the node re-STUNs, refreshes its candidates, restarts disco with every peer and
//! reconnects DERP (its TCP connections may be bound to an address that is gone); netcheck can hook
//! [`NetChanges::subscribe`] to re-run at once.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use tokio::sync::watch;
use tracing::{info, warn};

use super::magicsock::local_ips;
use crate::route_table::{read_default_routes, DefaultRoute};

/// How long a burst of netlink messages may take before the snapshot is compared.
pub const SETTLE: Duration = Duration::from_millis(100);
/// Poll period when netlink is unavailable (containers without it).
pub const POLL_FALLBACK: Duration = Duration::from_secs(2);

/// What the node's network looks like, as far as path selection cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetState {
    /// Usable local addresses (up, not loopback, not our TUN), sorted.
    pub addrs: Vec<IpAddr>,
    /// Default routes, sorted.
    pub default_routes: Vec<DefaultRoute>,
}

impl NetState {
    /// Takes a snapshot now, ignoring interface `exclude_iface` (the node's TUN).
    pub fn snapshot(exclude_iface: &str) -> Self {
        let mut addrs = local_ips(exclude_iface);
        addrs.sort();
        addrs.dedup();
        let mut default_routes = read_default_routes();
        default_routes.retain(|r| r.iface != exclude_iface);
        default_routes.sort();
        Self { addrs, default_routes }
    }
}

/// One published change: a counter (1 for the first change) and the new state.
#[derive(Clone, Debug, Default)]
pub struct NetChange {
    /// Increments with every change.
    pub generation: u64,
    /// The state after the change.
    pub state: NetState,
}

/// The publishing side, owned by the node; [`NetChanges::subscribe`] hands out receivers.
#[derive(Debug)]
pub struct NetChanges {
    tx: watch::Sender<NetChange>,
}

impl NetChanges {
    /// A channel starting at `initial` (generation 0).
    pub fn new(initial: NetState) -> Self {
        Self { tx: watch::Sender::new(NetChange { generation: 0, state: initial }) }
    }

    /// A receiver; `changed()` fires on every later change.
    pub fn subscribe(&self) -> watch::Receiver<NetChange> {
        self.tx.subscribe()
    }

    /// The last published state.
    pub fn current(&self) -> NetChange {
        self.tx.borrow().clone()
    }

    /// Publishes `state` if it differs from the current one; returns whether it did.
    pub fn publish(&self, state: NetState) -> bool {
        self.tx.send_if_modified(|c| {
            if c.state == state {
                return false;
            }
            c.generation += 1;
            c.state = state;
            true
        })
    }
}

/// Watches the host until the task is dropped, publishing changes into `out`.
pub async fn run(exclude_iface: String, out: &NetChanges) {
    let sock = match subscribe_rtnetlink() {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("netlink unavailable ({e}); polling the network state every {POLL_FALLBACK:?}");
            None
        }
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        match &sock {
            Some(s) => {
                buf.clear();
                if let Err(e) = s.recv(&mut buf).await {
                    // ENOBUFS: we missed messages; a snapshot below covers them.
                    tracing::debug!("netlink recv: {e}");
                }
                tokio::time::sleep(SETTLE).await;
                drain(s, &mut buf);
            }
            None => tokio::time::sleep(POLL_FALLBACK).await,
        }
        let state = NetState::snapshot(&exclude_iface);
        let before = out.current().state;
        if out.publish(state.clone()) {
            info!(
                addrs = ?state.addrs,
                routes = ?state.default_routes,
                was = ?before.addrs,
                "network changed"
            );
        }
    }
}

fn subscribe_rtnetlink() -> io::Result<TokioSocket> {
    let mut s = TokioSocket::new(NETLINK_ROUTE)?;
    let groups = libc::RTMGRP_LINK
        | libc::RTMGRP_IPV4_IFADDR
        | libc::RTMGRP_IPV4_ROUTE
        | libc::RTMGRP_IPV6_IFADDR
        | libc::RTMGRP_IPV6_ROUTE;
    s.socket_mut().bind(&SocketAddr::new(0, groups as u32))?;
    Ok(s)
}

/// Reads whatever else is queued without waiting.
fn drain(s: &TokioSocket, buf: &mut Vec<u8>) {
    for _ in 0..1024 {
        buf.clear();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match s.poll_recv(&mut cx, buf) {
            std::task::Poll::Ready(Ok(())) => continue,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_only_on_a_real_change() {
        let c = NetChanges::new(NetState::default());
        let mut rx = c.subscribe();
        let s = NetState { addrs: vec!["192.0.2.1".parse().unwrap()], default_routes: vec![] };
        assert!(c.publish(s.clone()));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().generation, 1);
        assert!(!c.publish(s));
        assert!(!rx.has_changed().unwrap());
    }

    /// A real netlink subscription in a fresh network namespace (root): adding an address to a
    /// veth link is seen and published within a second; a snapshot-equal burst is not.
    #[test]
    fn netlink_sees_an_address_change_in_a_namespace() {
        let ns = format!("dfpnm{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip").args(args).status().is_ok_and(|s| s.success());
            assert!(ok, "ip {args:?} failed");
        };
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).status();
        ip(&["netns", "add", &ns]);
        struct Del(String);
        impl Drop for Del {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }
        let _del = Del(ns.clone());
        let nsname = ns.clone();
        // The monitor runs on a thread that has entered the namespace (setns affects one thread).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/var/run/netns/{nsname}")).unwrap();
            // SAFETY: setns on this thread with an open namespace fd.
            assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }, 0);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let changes = NetChanges::new(NetState::snapshot("df-none"));
                let mut sub = changes.subscribe();
                let mon = run("df-none".into(), &changes);
                tokio::pin!(mon);
                tx.send(()).unwrap();
                tokio::select! {
                    _ = &mut mon => {}
                    r = tokio::time::timeout(Duration::from_secs(5), sub.changed()) => {
                        r.expect("change within 5 s").unwrap();
                        tx.send(()).ok();
                        let st = sub.borrow().state.clone();
                        assert!(st.addrs.contains(&"10.99.0.1".parse().unwrap()), "{st:?}");
                    }
                }
            });
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        ip(&["-n", &ns, "link", "add", "dm0", "type", "veth", "peer", "name", "dm1"]);
        ip(&["-n", &ns, "link", "set", "dm0", "up"]);
        ip(&["-n", &ns, "addr", "add", "10.99.0.1/24", "dev", "dm0"]);
        rx.recv_timeout(Duration::from_secs(6)).expect("the monitor published the change");
    }
}
