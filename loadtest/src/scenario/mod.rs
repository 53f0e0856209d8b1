//! The scenarios. Each takes its arguments, the resolved targets and a stop token (Ctrl-C), runs,
//! closes every connection it opened, and returns a [`crate::report::Report`].

pub mod churn;
pub mod connections;
pub mod flow;
pub mod pingpong;
pub mod stun;

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

/// Connects one client per entry of `targets` (the index says which target), 64 at a time; fails
/// on the first connect error (naming the target).
pub async fn connect_all(targets: &[(String, DerpTarget)], which: Vec<usize>) -> Result<Vec<Client>> {
    let mut out: Vec<Option<Client>> = (0..which.len()).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < which.len() || !set.is_empty() {
        while next < which.len() && set.len() < 64 {
            let (name, target) = targets[which[next]].clone();
            let i = next;
            set.spawn(async move {
                let key = NodePrivate::generate();
                let public = key.public();
                let mut opts = ConnectOptions::new(key);
                opts.app_name = Some("derpfleet-loadtest".into());
                // Deep enough for a scheduling tick's burst; shallow so unthrottled senders do not
                // measure their own queue.
                opts.send_queue = 256;
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
