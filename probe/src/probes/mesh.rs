//! `mesh`: a client on node A sends to a client on node B of the same region; the packet can only
//! arrive through A's mesh link to B. The latency is the one-way time of the packet that arrived
//! (both clients live in this process, so one clock measures both ends).

use super::deliver::deliver;
use super::{connect, ProbeEnv};
use crate::plan::ProbeSpec;
use crate::results::Measured;

/// Runs the probe.
pub async fn probe(spec: &ProbeSpec, env: &ProbeEnv) -> Result<Measured, String> {
    let peer = spec.peer.as_ref().ok_or("mesh probe without a peer node")?;
    let (a, b) = tokio::join!(connect(&spec.node, env), connect(peer, env));
    let (a, mut b) = (a?, b?);
    let latency =
        deliver(&a, &mut b).await.map_err(|e| format!("{} -> {}: {e}", spec.node.name, peer.name))?;
    Ok(Measured { latency, ..Default::default() })
}
