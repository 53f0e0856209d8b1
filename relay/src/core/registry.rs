//! Who is connected: connections by key, the duplicate-connection policy, watchers, and the
//! who-saw-whom index for region-gone notifications (spec §1.6, §1.7, §3).
//!
//! The packet path ([`Registry::route`]) takes one `DashMap` shard read lock and enqueues into
//! the destination's [`Outbox`] while holding it: no global lock, no extra channel hop.
//! Membership changes (register, unregister, WatchConns) are rare and serialise on one mutex so
//! that watchers see a consistent stream: a watcher's initial flood and the later updates never
//! miss a connection.
//!
//! The mesh (the crate's `mesh` module): a destination with no local connection may have
//! [`PacketForwarder`]s (links to other servers of the region). `route` prefers local delivery,
//! then the key's preferred forwarder, then "unknown"; a key whose last local connection leaves is
//! only reported gone when no forwarder knows it. Several forwarders for one key follow derper's
//! `multiForwarder`: the first registered stays preferred, and when it goes the one registered
//! earliest among the rest takes over.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use derpfleet_proto::msg::PeerGoneReason;
use derpfleet_proto::NodePublic;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::core::branch_wake::{HasWakeFlags, WakeFlags};
use crate::core::metrics::{DropReason, Metrics, PacketKind};
use crate::core::outbox::{Control, Direct, Outbox, SeenSources};

/// One accepted, handshaken connection as the rest of the server sees it.
#[derive(Debug)]
pub struct Conn {
    /// Unique per server, increasing.
    pub id: u64,
    /// The client's key.
    pub key: NodePublic,
    /// The client's address (for PeerPresent).
    pub remote: SocketAddr,
    /// PeerPresent flag bits of this connection.
    pub present_flags: u8,
    /// The client proved the mesh key.
    pub can_mesh: bool,
    /// Its send side.
    pub out: Outbox,
    /// Cancelled to close the connection (ClosePeer, server shutdown, or either loop ending).
    pub cancel: CancellationToken,
    dup: AtomicBool,
    /// Which of this connection's reader, send loop and cancellation woke its task.
    pub(crate) wake: WakeFlags,
}

impl Conn {
    /// A connection record; `out` and `cancel` belong to it alone.
    pub fn new(
        id: u64,
        key: NodePublic,
        remote: SocketAddr,
        present_flags: u8,
        can_mesh: bool,
        out: Outbox,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            id,
            key,
            remote,
            present_flags,
            can_mesh,
            out,
            cancel,
            dup: AtomicBool::new(false),
            wake: WakeFlags::default(),
        }
    }

    /// True while another connection with the same key exists.
    #[inline]
    pub fn is_dup(&self) -> bool {
        self.dup.load(Ordering::Relaxed)
    }

    fn present(&self) -> Control {
        Control::PeerPresent(self.key, self.remote, self.present_flags)
    }
}

impl HasWakeFlags for Conn {
    fn wake_flags(&self) -> &WakeFlags {
        &self.wake
    }
}

/// A destination that is not a local connection: a mesh link to the server holding the key.
pub trait PacketForwarder: Send + Sync + 'static {
    /// Sends `data` from `src` to `dst` over the mesh (ForwardPacket). Never blocks; losses are
    /// the forwarder's to count.
    fn forward_packet(&self, src: NodePublic, dst: NodePublic, data: Bytes);
    /// Identity, to remove exactly the forwarder that was added.
    fn forwarder_id(&self) -> u64;
}

/// The connections of one key (spec §1.7, policy `lastWriterIsActive`).
#[derive(Debug)]
enum ClientSet {
    /// The usual case.
    One(Arc<Conn>),
    /// Duplicates, ordered by recency of activity: the last one is active.
    Dups(Vec<Arc<Conn>>),
}

impl ClientSet {
    #[inline]
    fn active(&self) -> Option<&Arc<Conn>> {
        match self {
            Self::One(c) => Some(c),
            Self::Dups(v) => v.last(),
        }
    }

    fn conns(&self) -> Vec<Arc<Conn>> {
        match self {
            Self::One(c) => vec![c.clone()],
            Self::Dups(v) => v.clone(),
        }
    }
}

/// The forwarders of one key, in registration order: the first is preferred. Almost always one.
struct Forwarders(Vec<Arc<dyn PacketForwarder>>);

impl Forwarders {
    #[inline]
    fn preferred(&self) -> Option<&Arc<dyn PacketForwarder>> {
        self.0.first()
    }
}

/// What [`Registry::route`] did with a packet.
#[derive(Debug)]
pub enum Routed {
    /// Queued for a local connection (possibly evicting an older packet, counted).
    Local,
    /// Handed to a mesh forwarder.
    Forwarded,
    /// The key has connections but none is active (counted as `dup_client`).
    NoActiveDup,
    /// No connection and no forwarder (counted as `unknown_dest`, or `unknown_dest_on_fwd` for a
    /// packet that may not be forwarded).
    Unknown,
}

#[derive(Default)]
struct Membership {
    watchers: Vec<Arc<Conn>>,
}

/// The server's table of connections.
pub struct Registry {
    clients: DashMap<NodePublic, ClientSet>,
    forwarders: DashMap<NodePublic, Forwarders>,
    membership: Mutex<Membership>,
    /// src key → receivers that were sent packets from it (conn id → conn).
    sent_to: Mutex<HashMap<NodePublic, HashMap<u64, Weak<Conn>>>>,
    server_key: NodePublic,
    /// The server's metrics: membership gauges and routing drops are counted here.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("keys", &self.clients.len()).finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry for the server whose key is `server_key`.
    pub fn new(server_key: NodePublic, metrics: Arc<Metrics>) -> Self {
        Self {
            clients: DashMap::new(),
            forwarders: DashMap::new(),
            membership: Mutex::new(Membership::default()),
            sent_to: Mutex::new(HashMap::new()),
            server_key,
            metrics,
        }
    }

    /// Number of keys with at least one local connection.
    pub fn key_count(&self) -> usize {
        self.clients.len()
    }

    /// Adds a connection. A second connection for a key becomes active; neither is closed.
    /// Watchers get a PeerPresent for every connection, duplicates included.
    pub fn register(&self, conn: &Arc<Conn>) {
        let m = self.membership.lock();
        match self.clients.entry(conn.key) {
            Entry::Vacant(e) => {
                e.insert(ClientSet::One(conn.clone()));
            }
            Entry::Occupied(mut e) => {
                let set = e.get_mut();
                conn.dup.store(true, Ordering::Relaxed);
                match set {
                    ClientSet::One(old) => {
                        old.dup.store(true, Ordering::Relaxed);
                        *set = ClientSet::Dups(vec![old.clone(), conn.clone()]);
                        self.metrics.current_dup_client_keys.increment(1.0);
                        self.metrics.current_dup_client_conns.increment(2.0);
                        self.metrics.total_dup_client_conns.increment(2);
                    }
                    ClientSet::Dups(v) => {
                        v.push(conn.clone());
                        self.metrics.current_dup_client_conns.increment(1.0);
                        self.metrics.total_dup_client_conns.increment(1);
                    }
                }
            }
        }
        self.metrics.current_connections.increment(1.0);
        for w in &m.watchers {
            w.out.send_control(conn.present());
        }
    }

    /// Removes a connection (its send loop's `seen` sources are forgotten). When it was the
    /// key's last, watchers get PeerGone and, unless a forwarder still knows the key, so does
    /// every connection that was sent packets from it.
    pub fn unregister(&self, conn: &Arc<Conn>, seen: &SeenSources) {
        let mut m = self.membership.lock();
        let mut last = false;
        if let Entry::Occupied(mut e) = self.clients.entry(conn.key) {
            match e.get_mut() {
                ClientSet::One(c) if c.id == conn.id => {
                    e.remove();
                    last = true;
                }
                ClientSet::One(_) => {}
                ClientSet::Dups(v) => {
                    let before = v.len();
                    v.retain(|c| c.id != conn.id);
                    if v.len() < before {
                        self.metrics.current_dup_client_conns.decrement(1.0);
                    }
                    if v.len() == 1 {
                        let survivor = v.pop().expect("one left");
                        survivor.dup.store(false, Ordering::Relaxed);
                        *e.get_mut() = ClientSet::One(survivor);
                        self.metrics.current_dup_client_keys.decrement(1.0);
                        self.metrics.current_dup_client_conns.decrement(1.0);
                    }
                }
            }
        }
        conn.dup.store(false, Ordering::Relaxed);
        let before = m.watchers.len();
        m.watchers.retain(|w| w.id != conn.id);
        if m.watchers.len() < before {
            self.metrics.watchers.decrement(1.0);
        }
        self.metrics.current_connections.decrement(1.0);
        if last {
            for w in &m.watchers {
                w.out.send_control(Control::PeerGone(conn.key, PeerGoneReason::Disconnected));
            }
        }
        drop(m);
        if last && !self.forwarders.contains_key(&conn.key) {
            self.notify_region_gone(conn.key);
        }
        let mut sent_to = self.sent_to.lock();
        for src in seen.keys() {
            if let Some(receivers) = sent_to.get_mut(src) {
                receivers.remove(&conn.id);
                if receivers.is_empty() {
                    sent_to.remove(src);
                }
            }
        }
    }

    /// Tells every connection that was sent packets from `key` that it left the region.
    fn notify_region_gone(&self, key: NodePublic) {
        let receivers = self.sent_to.lock().remove(&key);
        for r in receivers.into_iter().flat_map(|m| m.into_values()) {
            if let Some(c) = r.upgrade() {
                c.out.send_control(Control::PeerGone(key, PeerGoneReason::Disconnected));
            }
        }
    }

    /// Records that `receiver` was sent a packet from `src` (first time only; called by its
    /// send loop).
    pub fn note_sent(&self, src: NodePublic, receiver: &Arc<Conn>) {
        self.sent_to.lock().entry(src).or_default().insert(receiver.id, Arc::downgrade(receiver));
    }

    /// Any frame from a duplicate makes it the active connection of its key.
    #[inline]
    pub fn note_activity(&self, conn: &Arc<Conn>) {
        if !conn.is_dup() {
            return;
        }
        if let Some(mut set) = self.clients.get_mut(&conn.key) {
            if let ClientSet::Dups(v) = &mut *set {
                if v.last().map(|c| c.id) != Some(conn.id) {
                    if let Some(i) = v.iter().position(|c| c.id == conn.id) {
                        let c = v.remove(i);
                        v.push(c);
                    }
                }
            }
        }
    }

    /// Delivers a packet from `src` to `dst`: the active local connection first, then (when
    /// `may_forward`, i.e. it came from a client rather than a mesh peer) a mesh forwarder.
    /// Every packet that cannot be routed is counted here. `direct`: the packet may be written
    /// straight to an idle destination's socket (see `core::outbox::DirectSlot`).
    #[inline]
    pub fn route(
        &self,
        src: NodePublic,
        dst: NodePublic,
        data: Bytes,
        kind: PacketKind,
        may_forward: bool,
        direct: bool,
    ) -> Routed {
        if let Some(set) = self.clients.get(&dst) {
            return match set.active() {
                Some(c) => {
                    let written = if direct { c.out.try_direct(&src, &data, kind) } else { Direct::Queue };
                    match written {
                        Direct::Written(first) => {
                            if first {
                                self.note_sent(src, c);
                            }
                        }
                        Direct::Queue => {
                            c.out.send_packet(src, data, kind);
                        }
                    }
                    Routed::Local
                }
                None => {
                    self.metrics.drop_packet(DropReason::DupClient, kind, data.len());
                    Routed::NoActiveDup
                }
            };
        }
        if may_forward && !self.forwarders.is_empty() {
            if let Some(f) = self.forwarders.get(&dst).and_then(|f| f.preferred().cloned()) {
                f.forward_packet(src, dst, data);
                return Routed::Forwarded;
            }
        }
        let reason = if may_forward { DropReason::UnknownDest } else { DropReason::UnknownDestOnFwd };
        self.metrics.drop_packet(reason, kind, data.len());
        Routed::Unknown
    }

    /// WatchConns: subscribes `watcher` and floods it with a PeerPresent for every key's active
    /// connection. A self-connect (the watcher has the server's own key) does nothing.
    pub fn watch(&self, watcher: &Arc<Conn>) {
        if watcher.key == self.server_key {
            return;
        }
        let mut m = self.membership.lock();
        if m.watchers.iter().any(|w| w.id == watcher.id) {
            return;
        }
        let flood: Vec<Control> =
            self.clients.iter().filter_map(|e| e.value().active().map(|c| c.present())).collect();
        watcher.out.send_controls(flood);
        m.watchers.push(watcher.clone());
        self.metrics.watchers.increment(1.0);
    }

    /// ClosePeer: closes every connection of `key`. Returns how many.
    pub fn close_peer(&self, key: &NodePublic) -> usize {
        let conns = self.clients.get(key).map(|s| s.conns()).unwrap_or_default();
        for c in &conns {
            c.cancel.cancel();
        }
        conns.len()
    }

    /// Every connection of `key` (tests, debugging).
    pub fn conns_of(&self, key: &NodePublic) -> Vec<Arc<Conn>> {
        self.clients.get(key).map(|s| s.conns()).unwrap_or_default()
    }

    /// Every local connection (graceful shutdown sends each one Restarting).
    pub fn all_conns(&self) -> Vec<Arc<Conn>> {
        self.clients.iter().flat_map(|e| e.value().conns()).collect()
    }

    /// The active connection of `key`, if any.
    pub fn active_conn(&self, key: &NodePublic) -> Option<Arc<Conn>> {
        self.clients.get(key).and_then(|s| s.active().cloned())
    }

    /// Registers `f` as a way to reach `key` when it has no local connection. The first
    /// forwarder of a key stays preferred; adding one already registered is a no-op.
    pub fn add_packet_forwarder(&self, key: NodePublic, f: Arc<dyn PacketForwarder>) {
        match self.forwarders.entry(key) {
            Entry::Vacant(e) => {
                e.insert(Forwarders(vec![f]));
            }
            Entry::Occupied(mut e) => {
                let list = &mut e.get_mut().0;
                if list.iter().any(|g| g.forwarder_id() == f.forwarder_id()) {
                    return;
                }
                if list.len() == 1 {
                    self.metrics.multiforwarder_created.increment(1);
                }
                list.push(f);
            }
        }
    }

    /// Removes the forwarder `forwarder_id` for `key`; the earliest registered of the others
    /// takes over. When that leaves the key nowhere in the region, the connections that were
    /// sent packets from it get PeerGone.
    pub fn remove_packet_forwarder(&self, key: NodePublic, forwarder_id: u64) {
        let mut gone = false;
        if let Entry::Occupied(mut e) = self.forwarders.entry(key) {
            let list = &mut e.get_mut().0;
            let before = list.len();
            list.retain(|f| f.forwarder_id() != forwarder_id);
            if list.len() < before {
                if list.is_empty() {
                    e.remove();
                    gone = true;
                } else if list.len() == 1 && before == 2 {
                    self.metrics.multiforwarder_deleted.increment(1);
                }
            }
        }
        if gone && !self.clients.contains_key(&key) {
            self.notify_region_gone(key);
        }
    }

    /// The id of the forwarder `route` would use for `key` (tests, debugging).
    pub fn preferred_forwarder(&self, key: &NodePublic) -> Option<u64> {
        self.forwarders.get(key).and_then(|f| f.preferred().map(|f| f.forwarder_id()))
    }

    /// Number of keys reachable through a forwarder.
    pub fn forwarded_key_count(&self) -> usize {
        self.forwarders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64, key: NodePublic, m: &Arc<Metrics>) -> Arc<Conn> {
        Arc::new(Conn::new(
            id,
            key,
            "127.0.0.1:1".parse().unwrap(),
            1,
            false,
            Outbox::new(4, 16, m.clone()),
            CancellationToken::new(),
        ))
    }

    fn active_id(r: &Registry, k: &NodePublic) -> Option<u64> {
        r.active_conn(k).map(|c| c.id)
    }

    #[test]
    fn dup_policy_last_writer_is_active_and_survivor_is_demoted() {
        let m = Arc::new(Metrics::new());
        let r = Registry::new(NodePublic([9; 32]), m.clone());
        let k = NodePublic([1; 32]);
        let (a, b, c) = (conn(1, k, &m), conn(2, k, &m), conn(3, k, &m));
        r.register(&a);
        assert!(!a.is_dup());
        r.register(&b);
        assert!(a.is_dup() && b.is_dup());
        assert_eq!(active_id(&r, &k), Some(2), "newest becomes active");
        r.note_activity(&a);
        assert_eq!(active_id(&r, &k), Some(1), "any frame from a dup makes it active");
        r.register(&c);
        assert_eq!(active_id(&r, &k), Some(3));
        r.unregister(&c, &SeenSources::default());
        assert_eq!(active_id(&r, &k), Some(1), "most recent remaining sender");
        r.unregister(&a, &SeenSources::default());
        assert_eq!(active_id(&r, &k), Some(2));
        assert!(!b.is_dup(), "a single survivor is demoted");
        let s = m.snapshot();
        assert_eq!(s.get("derp_current_dup_client_keys", &[]), 0.0);
        assert_eq!(s.get("derp_current_dup_client_conns", &[]), 0.0);
        assert_eq!(s.get("derp_total_dup_client_conns", &[]), 3.0);
        assert_eq!(s.get("derp_current_connections", &[]), 1.0);
        r.unregister(&b, &SeenSources::default());
        assert_eq!(r.key_count(), 0);
    }

    struct Fwd {
        id: u64,
        got: Mutex<Vec<NodePublic>>,
    }

    impl PacketForwarder for Fwd {
        fn forward_packet(&self, _src: NodePublic, dst: NodePublic, _data: Bytes) {
            self.got.lock().push(dst);
        }
        fn forwarder_id(&self) -> u64 {
            self.id
        }
    }

    fn fwd(id: u64) -> Arc<Fwd> {
        Arc::new(Fwd { id, got: Mutex::new(Vec::new()) })
    }

    #[test]
    fn multi_forwarder_first_stays_preferred_and_lowest_index_takes_over() {
        let m = Arc::new(Metrics::new());
        let r = Registry::new(NodePublic([9; 32]), m.clone());
        let k = NodePublic([1; 32]);
        let (f1, f2, f3) = (fwd(1), fwd(2), fwd(3));
        r.add_packet_forwarder(k, f2.clone());
        r.add_packet_forwarder(k, f1.clone());
        r.add_packet_forwarder(k, f3.clone());
        r.add_packet_forwarder(k, f2.clone());
        assert_eq!(r.preferred_forwarder(&k), Some(2), "first registered stays; re-adding is a no-op");
        assert!(matches!(r.route(k, k, Bytes::new(), PacketKind::Other, true, false), Routed::Forwarded));
        assert!(matches!(r.route(k, k, Bytes::new(), PacketKind::Other, false, false), Routed::Unknown));
        assert_eq!(f2.got.lock().len(), 1);
        r.remove_packet_forwarder(k, 2);
        assert_eq!(r.preferred_forwarder(&k), Some(1), "next by insertion order, not by id");
        r.remove_packet_forwarder(k, 7);
        assert_eq!(r.preferred_forwarder(&k), Some(1), "removing an unknown id changes nothing");
        r.remove_packet_forwarder(k, 1);
        assert_eq!(r.preferred_forwarder(&k), Some(3));
        let s = m.snapshot();
        assert_eq!(s.get("derp_multiforwarder_created", &[]), 1.0);
        assert_eq!(s.get("derp_multiforwarder_deleted", &[]), 1.0);
        r.remove_packet_forwarder(k, 3);
        assert_eq!(r.preferred_forwarder(&k), None);
        assert_eq!(r.forwarded_key_count(), 0);
    }

    #[test]
    fn route_prefers_local_then_reports_unknown() {
        let m = Arc::new(Metrics::new());
        let r = Registry::new(NodePublic([9; 32]), m.clone());
        let k = NodePublic([1; 32]);
        let a = conn(1, k, &m);
        r.register(&a);
        assert!(matches!(
            r.route(NodePublic([2; 32]), k, Bytes::from_static(b"x"), PacketKind::Other, true, false),
            Routed::Local
        ));
        assert_eq!(a.out.queued_packets(), 1);
        assert!(matches!(
            r.route(NodePublic([2; 32]), NodePublic([3; 32]), Bytes::new(), PacketKind::Other, true, false),
            Routed::Unknown
        ));
    }
}
