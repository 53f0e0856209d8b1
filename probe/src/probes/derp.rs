//! `derp`: two probe clients connect to the node (TCP, TLS per `CertName`, upgrade, handshake,
//! ServerInfo), then a packet goes from the first to the second and back. The latency is that
//! round trip; the connects are covered by the probe's timeout.

use super::deliver::deliver;
use super::{connect, ProbeEnv};
use crate::plan::ProbeSpec;
use crate::results::Measured;

/// Runs the probe.
pub async fn probe(spec: &ProbeSpec, env: &ProbeEnv) -> Result<Measured, String> {
    let (a, b) = tokio::join!(connect(&spec.node, env), connect(&spec.node, env));
    let (mut a, mut b) = (a?, b?);
    let there = deliver(&a, &mut b).await?;
    let back = deliver(&b, &mut a).await?;
    Ok(Measured { latency: there + back, ..Default::default() })
}
