//! The scenarios. Each takes its arguments, the resolved targets and a stop token (Ctrl-C), runs,
//! closes every connection it opened, and returns a [`crate::report::Report`].

pub mod churn;
pub mod connections;
pub mod flow;
pub mod many;
pub mod pingpong;
pub mod stun;

use std::net::IpAddr;

use anyhow::{Context, Result};
use derpfleet_client::{ConnectOptions, DerpConn, DerpReceiver, DerpSender, DerpTarget};
use derpfleet_proto::{NodePrivate, NodePublic};
use tokio::task::JoinSet;

/// One connected client: its key and halves.
pub struct Client {
    /// our public key
    pub public: NodePublic,
    /// sending half
    pub tx: DerpSender,
    /// receiving half
    pub rx: DerpReceiver,
}

/// How the packet scenarios' clients connect and write.
#[derive(Clone, Debug)]
pub struct ClientSetup {
    /// DERP over WebSocket.
    pub websocket: bool,
    /// One write and flush per frame, as Tailscale's client (see
    /// [`derpfleet_client::ConnectOptions::write_per_frame`]).
    pub per_frame: bool,
    /// Frames that may wait for a connection's writer.
    pub send_queue: usize,
    /// Source addresses, used round-robin (empty = the system's choice).
    pub sources: Vec<IpAddr>,
    /// Handshakes in flight at once.
    pub concurrency: usize,
}

impl ClientSetup {
    /// The defaults for the throughput-style scenarios: a queue deep enough for a scheduling
    /// tick's burst, shallow so unthrottled senders do not measure their own queue.
    pub fn new(websocket: bool, per_frame: bool) -> Self {
        Self { websocket, per_frame, send_queue: 256, sources: Vec::new(), concurrency: 64 }
    }

    /// Connect options for the `n`-th connection.
    pub fn options(&self, n: usize, key: NodePrivate) -> ConnectOptions {
        let mut opts = ConnectOptions::new(key);
        opts.app_name = Some("derpfleet-loadtest".into());
        opts.send_queue = self.send_queue;
        opts.websocket = self.websocket;
        opts.write_per_frame = self.per_frame;
        if !self.sources.is_empty() {
            opts.bind_addr = Some(self.sources[n % self.sources.len()]);
        }
        opts
    }
}

/// Connects one client per entry of `targets` (the index says which target), `setup.concurrency`
/// at a time; fails on the first connect error (naming the target).
pub async fn connect_all(
    targets: &[(String, DerpTarget)],
    which: Vec<usize>,
    setup: &ClientSetup,
) -> Result<Vec<Client>> {
    let mut out: Vec<Option<Client>> = (0..which.len()).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < which.len() || !set.is_empty() {
        while next < which.len() && set.len() < setup.concurrency.max(1) {
            let (name, target) = targets[which[next]].clone();
            let i = next;
            let key = NodePrivate::generate();
            let public = key.public();
            let opts = setup.options(i, key);
            set.spawn(async move {
                let c = DerpConn::connect(&target, &opts)
                    .await
                    .with_context(|| format!("connecting to {name}"))?;
                let (tx, rx) = c.split();
                anyhow::Ok((i, Client { public, tx, rx }))
            });
            next += 1;
        }
        if let Some(r) = set.join_next().await {
            let (i, c) = r.context("connect task")??;
            out[i] = Some(c);
        }
    }
    Ok(out.into_iter().flatten().collect())
}
