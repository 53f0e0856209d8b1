//! Several in-process relays meshed into one region (spec §3, §11 items 25–26): packets
//! cross the mesh in every direction, links that break are rebuilt, a client may move between
//! nodes, and a DNS name with several addresses meshes with each of them.

use crate::mesh_common;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use derpfleet_client::ConnectOptions;
use derpfleet_proto::msg::PeerGoneReason;
use derpfleet_proto::{MeshKey, NodePrivate};
use derpfleet_relay::mesh::{Mesh, MeshConfig, MeshPeer, Resolve};
use mesh_common::{entry, eventually, eventually_within, full_mesh, gauge, knows, relay, relay_at, Client};
use parking_lot::Mutex;

#[tokio::test]
async fn c25_two_meshed_servers_relay_both_ways() -> Result<()> {
    let key = MeshKey::generate();
    let (s1, s2) = (relay(key).await, relay(key).await);
    let _mesh = full_mesh(&[&s1, &s2], key).await?;
    let mut a = Client::connect(s1.local_addr()).await?;
    let mut b = Client::connect(s2.local_addr()).await?;
    eventually("s1 knows b", || knows(&s1, &b.public())).await?;
    eventually("s2 knows a", || knows(&s2, &a.public())).await?;
    a.deliver_to(&mut b, "a->b").await?;
    b.deliver_to(&mut a, "b->a reply").await?;
    assert_eq!(gauge(&s1, "derp_packets_forwarded_out"), 1.0);
    assert_eq!(gauge(&s2, "derp_packets_forwarded_in"), 1.0);
    assert_eq!(gauge(&s2, "derp_packets_forwarded_out"), 1.0);
    assert_eq!(gauge(&s1, "derp_packets_forwarded_in"), 1.0);
    Ok(())
}

#[tokio::test]
async fn c26_broken_link_removes_forwarders_and_delivery_resumes_after_reconnect() -> Result<()> {
    let key = MeshKey::generate();
    let (s1, s2) = (relay(key).await, relay(key).await);
    let _mesh = full_mesh(&[&s1, &s2], key).await?;
    let mut a = Client::connect(s1.local_addr()).await?;
    let mut b = Client::connect(s2.local_addr()).await?;
    eventually("s1 knows b", || knows(&s1, &b.public())).await?;
    eventually("s2 knows a", || knows(&s2, &a.public())).await?;
    b.deliver_to(&mut a, "before").await?;

    // Break s1's watch link: s2 closes every connection of s1's server key (only that link).
    let s1_key = s1.derp().public_key();
    assert_eq!(s2.derp().registry().close_peer(&s1_key), 1);
    eventually("s1 forgot b", || !knows(&s1, &b.public())).await?;
    assert_eq!(gauge(&s1, "derp_mesh_peers_connected"), 0.0);
    assert_eq!(
        a.want_gone(b.public()).await?,
        PeerGoneReason::Disconnected,
        "a received from b, and b is nowhere in s1's region view now"
    );
    // Reconnect after ~5 s; the flood re-adds b. Nobody reconnects a client.
    eventually_within("s1 relinked and knows b", Duration::from_secs(9), || knows(&s1, &b.public())).await?;
    a.deliver_to(&mut b, "after").await?;
    b.deliver_to(&mut a, "after reply").await?;
    Ok(())
}

#[tokio::test]
async fn three_relays_every_direction_and_a_moving_client_keeps_receiving() -> Result<()> {
    let key = MeshKey::generate();
    let (s1, s2, s3) = (relay(key).await, relay(key).await, relay(key).await);
    let servers = [&s1, &s2, &s3];
    let _mesh = full_mesh(&servers, key).await?;
    let mut clients = Vec::new();
    for s in servers {
        clients.push(Client::connect(s.local_addr()).await?);
    }
    for s in servers {
        for c in &clients {
            let local = s.derp().registry().active_conn(&c.public()).is_some();
            eventually("every node knows every client", || local || knows(s, &c.public())).await?;
        }
    }
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                let (from, to) = if i < j {
                    let (l, r) = clients.split_at_mut(j);
                    (&l[i], &mut r[0])
                } else {
                    let (l, r) = clients.split_at_mut(i);
                    (&r[0], &mut l[j])
                };
                from.deliver_to(to, &format!("s{} -> s{}", i + 1, j + 1)).await?;
            }
        }
    }

    // A client moves from relay 1 to relay 3 while relay 2's client keeps sending to it.
    let mover_key = NodePrivate::generate();
    let old = Client::connect_with(s1.local_addr(), ConnectOptions::new(mover_key.clone())).await?;
    eventually("s2 knows the mover on s1", || knows(&s2, &mover_key.public())).await?;
    let mut old = old;
    clients[1].deliver_to(&mut old, "to mover on s1").await?;
    // (The servers' own keys already have several locations: each node's links are clients
    // of the others.)
    let (created, deleted) =
        (gauge(&s2, "derp_multiforwarder_created"), gauge(&s2, "derp_multiforwarder_deleted"));
    let via_s1 = s2.derp().registry().preferred_forwarder(&mover_key.public());
    let mut new = Client::connect_with(s3.local_addr(), ConnectOptions::new(mover_key.clone())).await?;
    eventually("s2 has two locations for the mover", || {
        gauge(&s2, "derp_multiforwarder_created") == created + 1.0
    })
    .await?;
    assert_eq!(
        s2.derp().registry().preferred_forwarder(&mover_key.public()),
        via_s1,
        "the first location stays preferred"
    );
    clients[1].deliver_to(&mut old, "still to mover on s1").await?;
    old.tx.close();
    drop(old);
    eventually("s2 now prefers s3 for the mover", || {
        gauge(&s2, "derp_multiforwarder_deleted") == deleted + 1.0 && knows(&s2, &mover_key.public())
    })
    .await?;
    clients[1].deliver_to(&mut new, "to mover on s3").await?;
    clients[0].deliver_to(&mut new, "from s1 to mover on s3").await?;
    Ok(())
}

/// A resolver whose answer the test changes.
struct FakeDns(Mutex<Vec<SocketAddr>>);

impl Resolve for FakeDns {
    fn resolve<'a>(
        &'a self,
        _host: &'a str,
        _port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        let addrs = self.0.lock().clone();
        Box::pin(async move { Ok(addrs) })
    }
}

#[tokio::test]
async fn dns_name_with_several_addresses_meshes_with_each_and_follows_changes() -> Result<()> {
    let key = MeshKey::generate();
    // One port on three loopback addresses, as one DNS name's nodes share a port. It comes from outside
    // the ephemeral range, so no other test's socket can take it on .2 or .3 meanwhile.
    let loopbacks = [1, 2, 3].map(|last| IpAddr::from([127, 0, 0, last]));
    let port = derpfleet_e2e::ports::unused_port_on(&loopbacks);
    let s1 = relay_at(SocketAddr::from(([127, 0, 0, 1], port)), key).await;
    let s2 = relay_at(SocketAddr::from(([127, 0, 0, 2], port)), key).await;
    let s3 = relay_at(SocketAddr::from(([127, 0, 0, 3], port)), key).await;
    let dns = Arc::new(FakeDns(Mutex::new(vec![s1.local_addr(), s2.local_addr()])));
    let peer = MeshPeer::parse(&format!("http://relays.test:{port}"))?;
    let config = MeshConfig {
        resolver: dns.clone(),
        resolve_interval: Duration::from_millis(100),
        ..mesh_common::mesh_config(key, vec![peer])
    };
    let _mesh = Mesh::start(s1.derp().clone(), config);
    let b2 = Client::connect(s2.local_addr()).await?;
    let mut b3 = Client::connect(s3.local_addr()).await?;
    let a = Client::connect(s1.local_addr()).await?;
    eventually("s1 learned b2 through the second address", || knows(&s1, &b2.public())).await?;
    assert!(!knows(&s1, &b3.public()), "s3 is not in DNS yet");
    assert_eq!(gauge(&s1, "derp_mesh_peers_connected"), 1.0, "its own address is skipped");
    // The self-connect stops for good: no further connections from s1 to itself.
    eventually("self link closed", || s1.derp().registry().conns_of(&s1.derp().public_key()).is_empty())
        .await?;
    let accepts = gauge(&s1, "derp_accepts");

    *dns.0.lock() = vec![s1.local_addr(), s3.local_addr()];
    eventually("s1 learned b3 through the new address", || knows(&s1, &b3.public())).await?;
    eventually("the vanished address lost its link", || !knows(&s1, &b2.public())).await?;
    assert_eq!(gauge(&s1, "derp_mesh_peers_connected"), 1.0);
    a.deliver_to(&mut b3, "to the new node").await?;
    assert_eq!(gauge(&s1, "derp_accepts"), accepts, "no self re-dial after the self-connect");
    Ok(())
}

#[tokio::test]
async fn mesh_entry_including_itself_only_links_to_the_others() -> Result<()> {
    let key = MeshKey::generate();
    let (s1, s2) = (relay(key).await, relay(key).await);
    let _m = Mesh::start(s1.derp().clone(), mesh_common::mesh_config(key, vec![entry(&s1), entry(&s2)]));
    eventually("one link", || gauge(&s1, "derp_mesh_peers_connected") == 1.0).await?;
    eventually("self link closed", || s1.derp().registry().conns_of(&s1.derp().public_key()).is_empty())
        .await?;
    Ok(())
}
