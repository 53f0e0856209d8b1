//! Faults in a meshed region, with real `derpfleet-relay` processes and the workspace DERP client:
//!
//! - **Partition and heal** ([`partitioned_node_keeps_its_clients_and_heals_without_reconnects`]): three
//!   relays, each in its own network namespace behind a router namespace; the clients sit in a fourth. An
//!   nftables ruleset in one node's namespace silently drops everything to and from the other two nodes (its
//!   clients still reach it). While its clients keep sending, its mesh links break at the 5 s write deadline
//!   (a silent drop gives no RST: the link's socket buffer fills, the batched write times out), and from then
//!   on what its clients send to other nodes' clients is dropped and counted (`unknown_dest`); each side's
//!   clients that had heard from a client behind the cut get `PeerGone(Disconnected)` for it, as derper's
//!   region-gone notice does; the other two nodes keep forwarding to each other. After the heal, forwarding in
//!   every direction resumes within the mesh retry bound, and no client connection was ever replaced.
//! - **SIGKILL** ([`sigkilled_node_leaves_the_rest_untouched_and_its_clients_return`]): three relays on
//!   loopback; one is killed with SIGKILL while packets flow. The other nodes' clients lose nothing (every
//!   packet of a stream between them that spans the kill arrives, and their connections stay), they get
//!   `PeerGone` for the dead node's client, and that client (the workspace's self-reconnecting
//!   `DerpRegionClient`) reconnects to the node once it is back and is reachable from both others again.
//!
//! Namespaces are named `dfr<pid>…` (unique per test process) and deleted on drop; relay processes are
//! killed by PID on drop. Waits are bounded; the bounds come from the relay's mesh timers (below).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use derpfleet_client::region::{DerpRegionClient, RegionClientConfig, RegionEvent};
use derpfleet_client::{ConnectOptions, DerpConn, DerpTarget, DerpUrl};
use derpfleet_e2e::netns::{run, unique_tag, veth, Netns};
use derpfleet_e2e::nsthread::run_in_netns;
use derpfleet_e2e::ports::unused_port;
use derpfleet_e2e::relay::RelayCmd;
use derpfleet_e2e::scratch::ScratchDir;
use derpfleet_e2e::{read_text, Child};
use derpfleet_proto::msg::ServerToClient;
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use tokio::sync::mpsc;

/// The relay's mesh timers (`derpfleet_relay::mesh`): a broken link waits `MESH_RETRY_INTERVAL` before
/// redialing, a failed dial is retried after `MESH_DIAL_RETRY_INTERVAL`, each dial gives up after the client's
/// `NODE_DIAL_TIMEOUT`, and a blocked link write closes the link after `MESH_WRITE_TIMEOUT`.
const MESH_RETRY_INTERVAL: Duration = Duration::from_secs(5);
const MESH_DIAL_RETRY_INTERVAL: Duration = Duration::from_secs(1);
const MESH_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Forwarding must resume within this after a heal or a restart: one retry wait plus one failed dial, one
/// dial retry, a connect and the PeerPresent flood (1 s of slack for the busy 2-core CI machine).
fn heal_bound() -> Duration {
    MESH_RETRY_INTERVAL
        + derpfleet_client::dial::NODE_DIAL_TIMEOUT
        + MESH_DIAL_RETRY_INTERVAL
        + Duration::from_secs(1)
}

/// A scratch directory for one test's relays, with the region's mesh key in `mesh.key`.
fn scratch(tag: &str) -> Result<ScratchDir> {
    let dir = ScratchDir::new(&format!("dfr-mesh-faults-{tag}-{}", std::process::id()))?;
    std::fs::write(dir.join("mesh.key"), format!("{}\n", MeshKey::generate().to_hex()))?;
    Ok(dir)
}

/// Starts one relay (plain HTTP on `listen`, meshed with `mesh_with`), inside `ns` if given; its key file
/// and log live in `dir` under `name` ([`derpfleet_e2e::relay`]), so a restart keeps the node's identity.
fn start_relay(
    dir: &Path,
    name: &str,
    ns: Option<&Netns>,
    listen: &str,
    metrics: &str,
    mesh_with: &str,
) -> Result<Child> {
    RelayCmd::new(ns, dir, name)
        .args(["-a", listen, "-http-port=-1", "-stun=false", &format!("-metrics-addr={metrics}")])
        .args(["-mesh-with", mesh_with, "-mesh-psk-file"])
        .args([dir.join("mesh.key")])
        .spawn()
}

/// What a client saw.
#[derive(Debug)]
enum Event {
    Packet(NodePublic, Vec<u8>),
    Gone(NodePublic),
    Connected,
    Disconnected,
}

/// A DERP client driven by a background task: packets to send go in, what the server sends comes out.
struct Peer {
    name: &'static str,
    key: NodePrivate,
    out: mpsc::UnboundedSender<(NodePublic, Vec<u8>)>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Set when a plain connection ended (a `DerpRegionClient` reconnects instead and reports it).
    closed: Arc<AtomicBool>,
    /// PeerGone keys seen while waiting for something else.
    gone: Vec<NodePublic>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Peer {
    /// One plain `DerpConn` to `url` (retrying while the relay starts); it is never replaced, so
    /// [`Peer::closed`] tells whether this client ever had to reconnect.
    async fn plain(name: &'static str, url: &str) -> Result<Peer> {
        let key = NodePrivate::generate();
        let target = DerpTarget::Url(url.parse::<DerpUrl>()?);
        let opts = ConnectOptions::new(key.clone());
        let started = Instant::now();
        let conn = loop {
            match DerpConn::connect(&target, &opts).await {
                Ok(c) => break c,
                Err(e) if started.elapsed() > Duration::from_secs(20) => {
                    bail!("{name}: connecting to {url}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let (tx, mut rx) = conn.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<(NodePublic, Vec<u8>)>();
        let (ev_tx, events) = mpsc::unbounded_channel();
        let closed = Arc::new(AtomicBool::new(false));
        let closed2 = closed.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some((dst, data)) = out_rx.recv() => {
                        let _ = tx.send_packet(dst, data).await;
                    }
                    m = rx.recv() => match m {
                        Ok(ServerToClient::RecvPacket { src, data }) => {
                            let _ = ev_tx.send(Event::Packet(src, data.to_vec()));
                        }
                        Ok(ServerToClient::PeerGone { key, .. }) => {
                            let _ = ev_tx.send(Event::Gone(key));
                        }
                        Ok(_) => {}
                        Err(_) => {
                            closed2.store(true, Ordering::SeqCst);
                            let _ = ev_tx.send(Event::Disconnected);
                            return;
                        }
                    },
                }
            }
        });
        Ok(Peer { name, key, out, events, closed, gone: Vec::new(), task })
    }

    /// The workspace's self-reconnecting region client on `url` (what tailscaled's DERP client does:
    /// reconnect with backoff after a drop).
    async fn reconnecting(name: &'static str, url: &str) -> Result<Peer> {
        let key = NodePrivate::generate();
        let target = DerpTarget::Url(url.parse::<DerpUrl>()?);
        let mut region =
            DerpRegionClient::spawn(RegionClientConfig::new(target, ConnectOptions::new(key.clone())));
        let (out, mut out_rx) = mpsc::unbounded_channel::<(NodePublic, Vec<u8>)>();
        let (ev_tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some((dst, data)) = out_rx.recv() => {
                        let _ = region.send_packet(dst, data).await;
                    }
                    e = region.recv() => {
                        let ev = match e {
                            None => return,
                            Some(RegionEvent::Message(ServerToClient::RecvPacket { src, data })) => {
                                Event::Packet(src, data.to_vec())
                            }
                            Some(RegionEvent::Message(ServerToClient::PeerGone { key, .. })) => Event::Gone(key),
                            Some(RegionEvent::Connected(_)) => Event::Connected,
                            Some(RegionEvent::Disconnected { .. }) => Event::Disconnected,
                            Some(_) => continue,
                        };
                        let _ = ev_tx.send(ev);
                    }
                }
            }
        });
        let mut peer =
            Peer { name, key, out, events, closed: Arc::new(AtomicBool::new(false)), gone: Vec::new(), task };
        peer.wait_for(Duration::from_secs(20), |e| matches!(e, Event::Connected))
            .await
            .context("first connect")?;
        Ok(peer)
    }

    fn public(&self) -> NodePublic {
        self.key.public()
    }

    fn send(&self, dst: NodePublic, data: Vec<u8>) {
        let _ = self.out.send((dst, data));
    }

    /// Waits (up to `limit`) for an event `want` accepts; PeerGone events on the way are kept.
    async fn wait_for(&mut self, limit: Duration, want: impl Fn(&Event) -> bool) -> Result<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => bail!("{}: nothing matching within {limit:?}", self.name),
                Ok(None) => bail!("{}: client task ended", self.name),
                Ok(Some(e)) => {
                    if let Event::Gone(k) = &e {
                        self.gone.push(*k);
                    }
                    if want(&e) {
                        return Ok(e);
                    }
                }
            }
        }
    }

    /// Waits (up to `limit`) until PeerGone(`key`) has arrived (now or earlier).
    async fn wait_gone(&mut self, key: NodePublic, limit: Duration) -> Result<()> {
        if self.gone.contains(&key) {
            return Ok(());
        }
        self.wait_for(limit, |e| matches!(e, Event::Gone(k) if *k == key)).await.map(|_| ())
    }

    /// Every event that has already arrived.
    fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            if let Event::Gone(k) = &e {
                self.gone.push(*k);
            }
            out.push(e);
        }
        out
    }
}

/// Sends a fresh probe from `from` to `to` every 100 ms until one arrives; returns how long it took.
async fn deliver_eventually(from: &Peer, to: &mut Peer, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let prefix = format!("probe-{}-{}-", from.name, rand_u64());
    let mut n = 0u64;
    while started.elapsed() < limit {
        n += 1;
        from.send(to.public(), format!("{prefix}{n}").into_bytes());
        let src = from.public();
        let got = to
            .wait_for(
                Duration::from_millis(100),
                |e| matches!(e, Event::Packet(s, d) if *s == src && d.starts_with(prefix.as_bytes())),
            )
            .await;
        if got.is_ok() {
            return Ok(started.elapsed());
        }
    }
    bail!("{} -> {}: nothing delivered within {limit:?}", from.name, to.name)
}

/// [`deliver_eventually`] in both directions between every two of `a`, `b`, `c`: the mesh is up.
async fn deliver_among(a: &mut Peer, b: &mut Peer, c: &mut Peer, limit: Duration) -> Result<()> {
    deliver_both_ways(a, b, limit).await?;
    deliver_both_ways(a, c, limit).await?;
    deliver_both_ways(b, c, limit).await
}

/// [`deliver_eventually`] from `a` to `b`, then back.
async fn deliver_both_ways(a: &mut Peer, b: &mut Peer, limit: Duration) -> Result<()> {
    deliver_eventually(a, b, limit).await?;
    deliver_eventually(b, a, limit).await.map(|_| ())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// The sum of `derp_packets_dropped` samples whose labels contain `label` (e.g. `reason="unknown_dest"`),
/// read from the relay's `/metrics`.
fn dropped(metrics: SocketAddr, label: &str) -> Result<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let mut sum = 0.0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("derp_packets_dropped{") {
            if rest.contains(label) {
                sum += rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            }
        }
    }
    Ok(sum)
}

/// The partition lab: router `s`, relay namespaces `n1..n3` (10.77.i.2 behind 10.77.i.1), clients in `k`.
struct Lab {
    _s: Netns,
    nodes: Vec<Netns>,
    k: Netns,
}

const RELAY_PORT: u16 = 3340;
const METRICS_PORT: u16 = 9090;

fn node_ip(i: usize) -> String {
    format!("10.77.{i}.2")
}

impl Lab {
    fn new() -> Result<Lab> {
        let tag = unique_tag();
        let s = Netns::new(&format!("dfr{tag}s"))?;
        s.enable_forwarding()?;
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let n = Netns::new(&format!("dfr{tag}n{i}"))?;
            veth(&n, "m0", &format!("10.77.{i}.2/24"), &s, &format!("n{i}"), &format!("10.77.{i}.1/24"))?;
            n.ip(&["route", "add", "default", "via", &format!("10.77.{i}.1")])?;
            nodes.push(n);
        }
        let k = Netns::new(&format!("dfr{tag}k"))?;
        veth(&k, "c0", "10.77.9.2/24", &s, "k0", "10.77.9.1/24")?;
        k.ip(&["route", "add", "default", "via", "10.77.9.1"])?;
        Ok(Lab { _s: s, nodes, k })
    }
}

#[test]
fn partitioned_node_keeps_its_clients_and_heals_without_reconnects() -> Result<()> {
    let lab = Lab::new()?;
    let scratch = scratch("partition")?;
    let with = (1..=3).map(|i| format!("http://{}:{RELAY_PORT}", node_ip(i))).collect::<Vec<_>>().join(",");
    let mut relays = Vec::new();
    for (i, ns) in lab.nodes.iter().enumerate() {
        relays.push(start_relay(
            scratch.path(),
            &format!("n{}", i + 1),
            Some(ns),
            &format!("0.0.0.0:{RELAY_PORT}"),
            &format!("0.0.0.0:{METRICS_PORT}"),
            &with,
        )?);
    }
    let isolated_metrics: SocketAddr = format!("{}:{METRICS_PORT}", node_ip(1)).parse()?;
    let cut = format!(
        "table inet dfr_partition {{
  chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {b}, {c} }} drop; }}
  chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {b}, {c} }} drop; }}
}}
",
        b = node_ip(2),
        c = node_ip(3)
    );
    let isolated = lab.nodes[0].name().to_string();
    let cut_file = scratch.join("partition.nft");
    std::fs::write(&cut_file, cut)?;
    let cut_file = cut_file.to_str().context("path")?.to_string();
    let result = run_in_netns(lab.k.name().to_string(), move || async move {
        let url = |i: usize| format!("http://{}:{RELAY_PORT}/derp", node_ip(i));
        let mut a = Peer::plain("a(n1)", &url(1)).await?;
        let mut b = Peer::plain("b(n2)", &url(2)).await?;
        let mut c = Peer::plain("c(n3)", &url(3)).await?;
        // The mesh comes up (links retry while the other processes start); every pair has heard from
        // the other, so each will be told when the other vanishes from the region.
        deliver_among(&mut a, &mut b, &mut c, Duration::from_secs(20)).await?;

        run("ip", &["netns", "exec", &isolated, "nft", "-f", &cut_file])?;
        let cut_at = Instant::now();
        eprintln!("partition: n1 cut off from n2 and n3 (its clients still reach it)");
        // Traffic across the cut keeps flowing until every side has given up on the other: the links
        // break at the write deadline once their socket buffers are full.
        let payload = vec![0x5a; 1000];
        let limit = MESH_WRITE_TIMEOUT * 4;
        let (ak, bk, ck) = (a.public(), b.public(), c.public());
        loop {
            a.send(bk, payload.clone());
            a.send(ck, payload.clone());
            b.send(ak, payload.clone());
            c.send(ak, payload.clone());
            a.drain();
            b.drain();
            c.drain();
            let done =
                a.gone.contains(&bk) && a.gone.contains(&ck) && b.gone.contains(&ak) && c.gone.contains(&ak);
            if done {
                break;
            }
            if cut_at.elapsed() > limit {
                bail!(
                    "PeerGone missing {limit:?} after the cut: a saw {:?}, b saw {:?}, c saw {:?}",
                    a.gone,
                    b.gone,
                    c.gone
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!(
            "partition: every side got PeerGone for the clients behind the cut after {:?}",
            cut_at.elapsed()
        );
        // The rest of the region is untouched.
        deliver_both_ways(&mut b, &mut c, Duration::from_secs(2)).await?;
        // The isolated node's clients' packets to other nodes' clients are dropped and counted.
        let before = dropped(isolated_metrics, "reason=\"unknown_dest\"")?;
        for _ in 0..20 {
            a.send(bk, b"across the cut".to_vec());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let counted = loop {
            let now = dropped(isolated_metrics, "reason=\"unknown_dest\"")? - before;
            if now >= 20.0 || Instant::now() > deadline {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            counted >= 20.0,
            "n1 counted {counted} unknown_dest drops for 20 packets sent across the cut"
        );

        run("ip", &["netns", "exec", &isolated, "nft", "delete", "table", "inet", "dfr_partition"])?;
        let healed_at = Instant::now();
        let bound = heal_bound();
        deliver_both_ways(&mut a, &mut b, bound).await?;
        deliver_both_ways(&mut a, &mut c, bound).await?;
        let took = healed_at.elapsed();
        eprintln!(
            "heal: forwarding across the former cut resumed in every direction {took:?} after the heal"
        );
        assert!(took <= bound, "forwarding resumed {took:?} after the heal, bound {bound:?}");
        for p in [&a, &b, &c] {
            assert!(
                !p.closed.load(Ordering::SeqCst),
                "{}'s connection ended: clients must never reconnect",
                p.name
            );
        }
        Ok(())
    });
    drop(relays);
    if result.is_err() {
        for i in 1..=3 {
            let log = read_text(&scratch.join(format!("n{i}.err")));
            eprintln!("--- n{i} log (tail)\n{}", tail(&log, 30));
        }
    }
    result
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_node_leaves_the_rest_untouched_and_its_clients_return() -> Result<()> {
    let scratch = scratch("sigkill")?;
    let ports = [unused_port(), unused_port(), unused_port()];
    let with = ports.map(|p| format!("http://127.0.0.1:{p}")).join(",");
    let start = |i: usize| {
        start_relay(
            scratch.path(),
            &format!("r{}", i + 1),
            None,
            &format!("127.0.0.1:{}", ports[i]),
            "",
            &with,
        )
    };
    let mut r1 = start(0)?;
    let _r2 = start(1)?;
    let _r3 = start(2)?;
    let url = |i: usize| format!("http://127.0.0.1:{}/derp", ports[i]);
    let mut a = Peer::reconnecting("a(r1)", &url(0)).await?;
    let mut b = Peer::plain("b(r2)", &url(1)).await?;
    let mut c = Peer::plain("c(r3)", &url(2)).await?;
    deliver_among(&mut a, &mut b, &mut c, Duration::from_secs(20)).await?;
    b.drain();
    c.drain();

    // A numbered stream in both directions between b and c, every 10 ms, with r1 killed in the middle.
    let (ak, bk, ck) = (a.public(), b.public(), c.public());
    let mut sent = 0u32;
    let mut killed = None;
    let stream_started = Instant::now();
    while stream_started.elapsed() < Duration::from_secs(4) {
        sent += 1;
        b.send(ck, format!("stream-b-{sent}").into_bytes());
        c.send(bk, format!("stream-c-{sent}").into_bytes());
        a.send(bk, b"from a".to_vec());
        if killed.is_none() && stream_started.elapsed() > Duration::from_secs(1) {
            r1.signal("KILL");
            r1.wait_timeout(Duration::from_secs(5)).context("r1 survived SIGKILL")?;
            killed = Some(Instant::now());
            eprintln!("sigkill: r1 killed mid-traffic after {sent} packets each way");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = killed.context("never killed")?;
    // Everything between the survivors' clients arrives, across the kill.
    let received = |p: &mut Peer, from: NodePublic, prefix: &str| -> BTreeSet<u32> {
        p.drain()
            .into_iter()
            .filter_map(|e| match e {
                Event::Packet(s, d) if s == from => {
                    String::from_utf8(d).ok()?.strip_prefix(prefix)?.parse().ok()
                }
                _ => None,
            })
            .collect()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_c = received(&mut c, bk, "stream-b-");
    let at_b = received(&mut b, ck, "stream-c-");
    assert_eq!(at_c.len() as u32, sent, "b->c lost packets across r1's death: got {} of {sent}", at_c.len());
    assert_eq!(at_b.len() as u32, sent, "c->b lost packets across r1's death: got {} of {sent}", at_b.len());
    // They were told that r1's client is gone, and their own connections never broke.
    b.wait_gone(ak, Duration::from_secs(5)).await?;
    c.wait_gone(ak, Duration::from_secs(5)).await?;
    assert!(
        !b.closed.load(Ordering::SeqCst) && !c.closed.load(Ordering::SeqCst),
        "b or c lost its connection"
    );
    eprintln!("sigkill: b and c got PeerGone for a {:?} after the kill, no packet lost", killed_at.elapsed());

    // r1 comes back (same key, same port); a reconnects by itself and both others reach it again.
    let _r1 = start(0)?;
    let restarted = Instant::now();
    a.wait_for(Duration::from_secs(5) + Duration::from_secs(10), |e| matches!(e, Event::Connected)).await?;
    let reconnected = restarted.elapsed();
    let bound = heal_bound();
    deliver_eventually(&b, &mut a, bound).await?;
    deliver_eventually(&c, &mut a, bound).await?;
    deliver_eventually(&a, &mut b, bound).await?;
    let healed = restarted.elapsed();
    eprintln!(
        "sigkill: a reconnected {reconnected:?} after the restart; delivery both ways after {healed:?}"
    );
    assert!(healed <= bound + Duration::from_secs(5), "region healed {healed:?} after the restart");
    assert!(
        !b.closed.load(Ordering::SeqCst) && !c.closed.load(Ordering::SeqCst),
        "b or c lost its connection"
    );
    Ok(())
}
