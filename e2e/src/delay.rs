//! A userspace link delayer for labs (netem is missing here): UDP datagrams and TCP streams forwarded
//! from a listen address to an upstream, each direction held back by a one-way delay that can be
//! changed while it runs. Used by the netcheck and home-move labs to make one region slower.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// A one-way delay in microseconds, adjustable while the forwarder runs.
pub type Delay = Arc<AtomicU64>;

fn now_delay(d: &Delay) -> Duration {
    Duration::from_micros(d.load(Relaxed))
}

/// Forwards UDP datagrams arriving at `listen` to `upstream`, and the replies back, each direction
/// delayed by `one_way`. One upstream socket per client source, so mappings stay distinct.
pub async fn udp_delay(listen: SocketAddr, upstream: SocketAddr, one_way: Delay) -> Result<()> {
    let front = Arc::new(UdpSocket::bind(listen).await.with_context(|| format!("bind {listen}"))?);
    let mut sessions: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, client) = front.recv_from(&mut buf).await?;
        let back = match sessions.get(&client) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(UdpSocket::bind("0.0.0.0:0").await?);
                s.connect(upstream).await?;
                let (s2, front2, d2) = (s.clone(), front.clone(), one_way.clone());
                tokio::spawn(async move {
                    let mut b = vec![0u8; 65536];
                    loop {
                        let n = match s2.recv(&mut b).await {
                            Ok(n) => n,
                            // The upstream is down (ICMP port unreachable): keep the session.
                            Err(_) => continue,
                        };
                        let (pkt, f, wait) = (b[..n].to_vec(), front2.clone(), now_delay(&d2));
                        tokio::spawn(async move {
                            tokio::time::sleep(wait).await;
                            let _ = f.send_to(&pkt, client).await;
                        });
                    }
                });
                sessions.insert(client, s.clone());
                s
            }
        };
        let (pkt, wait) = (buf[..n].to_vec(), now_delay(&one_way));
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = back.send(&pkt).await;
        });
    }
}

/// Copies `r` to `w`, each chunk released `one_way` after it was read (order kept).
async fn delayed_pipe<R, W>(mut r: R, mut w: W, one_way: Delay)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 || tx.send((tokio::time::Instant::now() + now_delay(&one_way), buf[..n].to_vec())).is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Forwards TCP connections from `listen` to `upstream` with `one_way` delay per direction.
pub async fn tcp_delay(listen: SocketAddr, upstream: SocketAddr, one_way: Delay) -> Result<()> {
    let l = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
    loop {
        let (c, _) = l.accept().await?;
        let one_way = one_way.clone();
        tokio::spawn(async move {
            let Ok(u) = TcpStream::connect(upstream).await else { return };
            let _ = (c.set_nodelay(true), u.set_nodelay(true));
            let (cr, cw) = c.into_split();
            let (ur, uw) = u.into_split();
            tokio::join!(delayed_pipe(cr, uw, one_way.clone()), delayed_pipe(ur, cw, one_way));
        });
    }
}

/// What one delayed server address forwards: UDP `udp.0` → `udp.1` and TCP `tcp.0` → `tcp.1`, both
/// directions held back by `one_way` (a region's STUN and HTTPS behind one slow link).
pub struct DelayedRoute {
    /// UDP listen address and upstream.
    pub udp: (SocketAddr, SocketAddr),
    /// TCP listen address and upstream.
    pub tcp: (SocketAddr, SocketAddr),
    /// The one-way delay of both.
    pub one_way: Delay,
}

/// Runs the delayers of every route in namespace `ns` (where the listen addresses live) until the guard
/// is dropped; the first delayer to fail ends them all (its error is printed).
pub fn spawn_delayers(ns: &str, routes: Vec<DelayedRoute>) -> Result<crate::nsthread::NsThread> {
    crate::nsthread::NsThread::spawn(ns, move || async move {
        let mut set = tokio::task::JoinSet::new();
        for r in routes {
            set.spawn(udp_delay(r.udp.0, r.udp.1, r.one_way.clone()));
            set.spawn(tcp_delay(r.tcp.0, r.tcp.1, r.one_way));
        }
        match set.join_next().await {
            Some(Ok(r)) => r,
            _ => Ok(()),
        }
    })
}
