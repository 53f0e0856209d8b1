//! A mesh peer that stops reading must not hold up the node that forwards to it: ForwardPackets
//! queue on the link's own bounded queue and the surplus is dropped and counted, the senders'
//! other traffic keeps flowing, and the link closes at its 5 s write deadline (its forwarders go).

use crate::mesh_common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use bytes::BytesMut;
use derpfleet_proto::codec::ServerCodec;
use derpfleet_proto::handshake::{open_client_info, seal_server_info, server_key_frame, ServerInfo};
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use derpfleet_relay::mesh::{Mesh, MeshPeer};
use futures_util::StreamExt;
use mesh_common::{eventually, eventually_within, gauge, knows, relay, Client, T};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::{Framed, FramedParts};

/// A "server" that completes the DERP handshake, announces `present` as one of its clients, and
/// then never reads again (its receive buffer is small, so the link's writes stall soon).
async fn stalled_peer(
    present: NodePublic,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<TcpStream>>)> {
    let sock = TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(4096)?;
    sock.bind("127.0.0.1:0".parse()?)?;
    let listener = sock.listen(1)?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let (mut s, remote) = listener.accept().await?;
        let mut buf = BytesMut::new();
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            if s.read_buf(&mut buf).await? == 0 {
                bail!("closed before the request");
            }
        }
        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let _ = buf.split_to(head_end);
        let key = NodePrivate::generate();
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
            .await?;
        s.write_all(&server_key_frame(&key.public())).await?;
        let mut parts = FramedParts::new::<ServerToClient>(s, ServerCodec::new());
        parts.read_buf = buf;
        let mut framed = Framed::from_parts(parts);
        let info = loop {
            match framed.next().await {
                Some(Ok(ClientToServer::ClientInfo(p))) => break p,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("closed before ClientInfo"),
            }
        };
        let mut s = framed.into_inner();
        let (client, _) = open_client_info(&key, &info)?;
        let mut out = BytesMut::new();
        ServerToClient::ServerInfo(seal_server_info(&key, &client, &ServerInfo::default())).encode(&mut out);
        ServerToClient::PeerPresent { key: present, endpoint: Some(remote), flags: 1 }.encode(&mut out);
        s.write_all(&out).await?;
        Ok(s)
    });
    Ok((addr, task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_peer_costs_drops_not_blocking_and_its_link_closes_at_the_write_deadline() -> Result<()> {
    let key = MeshKey::generate();
    let s1 = relay(key).await;
    let far = NodePrivate::generate().public();
    let (peer_addr, peer) = stalled_peer(far).await?;
    let _mesh = Mesh::start(
        s1.derp().clone(),
        mesh_common::mesh_config(key, vec![MeshPeer::parse(&format!("http://{peer_addr}"))?]),
    );
    eventually("s1 learned the far key", || knows(&s1, &far)).await?;
    let _held = peer.await??;
    let a = Client::connect(s1.local_addr()).await?;
    let mut b = Client::connect(s1.local_addr()).await?;
    let payload = vec![7u8; 1200];
    for _ in 0..20_000 {
        a.send(far, &payload).await?;
    }
    eventually("the link's queue overflowed", || gauge(&s1, "derp_mesh_forward_dropped") > 0.0).await?;
    // The sender's reader was never blocked: its local traffic still flows at once.
    a.deliver_to(&mut b, "local while the mesh peer stalls").await?;
    eventually("every packet was either queued for the link or counted as dropped", || {
        gauge(&s1, "derp_packets_forwarded_out") + gauge(&s1, "derp_mesh_forward_dropped") == 20_000.0
    })
    .await?;
    let dropped = gauge(&s1, "derp_mesh_forward_dropped");
    assert_eq!(
        s1.derp()
            .metrics()
            .snapshot()
            .get("derp_packets_dropped", &[("reason", "queue_tail"), ("kind", "other")]),
        dropped
    );
    // The 5 s write deadline closes the link; its forwarders are removed.
    eventually_within("stalled link closed", Duration::from_secs(5) + T, || !knows(&s1, &far)).await?;
    assert_eq!(gauge(&s1, "derp_mesh_peers_connected"), 0.0);
    Ok(())
}
