//! The probe bodies, one module per class. Each takes the spec, the shared [`ProbeEnv`] and the
//! time it may use, and returns what it measured or why it failed; the scheduler bounds every run
//! with a timeout on top, so a node that hangs costs its own probes their timeout and nothing more.
//!
//! Every DERP connection goes through the workspace's client, [`derpfleet_client::conn`], with a
//! fresh node key, `IsProber` set and (with `-mesh-psk-file`) the region mesh key.

pub mod bw;
mod deliver;
pub mod derp;
pub mod mesh;
pub mod qd;
pub mod stun;
pub mod tls;

use std::time::Duration;

use derpfleet_client::conn::{ConnectOptions, DerpConn, DerpReceiver, DerpSender, DerpTarget};
use derpfleet_proto::derpmap::{DerpNode, DerpRegion};
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};

use crate::plan::{Class, ProbeSpec};
use crate::results::Measured;

/// What every probe shares.
#[derive(Clone, Debug, Default)]
pub struct ProbeEnv {
    /// Presented by probe clients when set (`-mesh-psk-file`).
    pub mesh_key: Option<MeshKey>,
    /// `-bw-probe-size-bytes`.
    pub bw_size: u64,
    /// `-qd-packets-per-second`.
    pub qd_rate: u32,
    /// `-qd-packet-timeout`.
    pub qd_packet_timeout: Duration,
}

/// Runs one probe of `spec` with `budget` to spend.
pub async fn run(spec: &ProbeSpec, env: &ProbeEnv, budget: Duration) -> Result<Measured, String> {
    match spec.class {
        Class::Derp => derp::probe(spec, env).await,
        Class::Tls => tls::probe(&spec.node).await,
        Class::Stun => stun::probe(spec, budget).await,
        Class::Mesh => mesh::probe(spec, env).await,
        Class::Bw => bw::probe(spec, env).await,
        Class::Qd => qd::probe(spec, env, budget).await,
    }
}

/// A region holding only `node`, so that the client dials exactly that node.
fn only(node: &DerpNode) -> DerpRegion {
    DerpRegion { region_id: node.region_id, nodes: vec![node.clone()], ..Default::default() }
}

/// One probe client connected to `node`: its key and the two halves.
pub(crate) struct ProbeClient {
    pub(crate) key: NodePublic,
    pub(crate) tx: DerpSender,
    pub(crate) rx: DerpReceiver,
}

/// Connects a probe client to `node` (handshake and ServerInfo included).
pub(crate) async fn connect(node: &DerpNode, env: &ProbeEnv) -> Result<ProbeClient, String> {
    let key = NodePrivate::generate();
    let public = key.public();
    let mut opts = ConnectOptions::new(key);
    opts.is_prober = true;
    opts.app_name = Some("derpfleet-probe".into());
    opts.mesh_key = env.mesh_key;
    let conn = DerpConn::connect(&DerpTarget::Region(only(node)), &opts)
        .await
        .map_err(|e| format!("connecting to {} ({}:{}): {e}", node.name, node.host_name, node.derp_port()))?;
    let (tx, rx) = conn.split();
    Ok(ProbeClient { key: public, tx, rx })
}
