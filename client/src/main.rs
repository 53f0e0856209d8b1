//! `derpfleet-client`: operator and test tools on top of the client library.
//!
//! - `netcheck --derp-map FILE [--json]`: one full netcheck report, printed like
//!   `tailscale netcheck` (or as JSON with Go's field names).
//! - `connect --url URL [--insecure | --cert-name NAME] [--ping N]`: one DERP connection; prints
//!   the server key and, with `--ping`, N ping round trips.
//! - `up --config FILE` (feature `node`): the WireGuard node (see `derpfleet_client::node`).
//! - `status [--control PATH | --iface NAME] [--json]`: the running node's per-peer paths.
//! - `keygen`: a node key and a disco key for a config file.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use derpfleet_client::derpmap::{CertCheck, DerpMap};
use derpfleet_client::dial::HttpProxy;
use derpfleet_client::netcheck::{NetcheckConfig, Netchecker, Report};
use derpfleet_client::{ConnectOptions, DerpConn, DerpTarget, DerpUrl};
use derpfleet_proto::msg::ServerToClient;
use derpfleet_proto::NodePrivate;

#[derive(Parser)]
#[command(name = "derpfleet-client", version, about = "DERP client tools: netcheck and connection checks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure latency to every region of a DERP map and pick the home region.
    Netcheck {
        /// DERP map JSON file (Tailscale's `derpMap` format).
        #[arg(long = "derp-map")]
        derp_map: PathBuf,
        /// Print the report as JSON (Go's `netcheck.Report` field names; durations in ns).
        #[arg(long)]
        json: bool,
        /// Skip the HTTPS latency fallback when UDP fails.
        #[arg(long = "no-https")]
        no_https: bool,
    },
    /// Connect to one DERP server and optionally ping it.
    Connect {
        /// `http://host:port/derp` or `https://host[:port]/derp`.
        #[arg(long)]
        url: String,
        /// Skip TLS verification (tests only).
        #[arg(long)]
        insecure: bool,
        /// Verify the certificate for this name, or pin it with `sha256-raw:<hex>`.
        #[arg(long = "cert-name")]
        cert_name: Option<String>,
        /// Number of pings to send after connecting.
        #[arg(long, default_value_t = 0)]
        ping: u32,
        /// Node private key (`privkey:<hex>`); random when absent.
        #[arg(long)]
        key: Option<String>,
        /// Carry DERP in a WebSocket (subprotocol `derp`).
        #[arg(long)]
        websocket: bool,
    },
    #[cfg(feature = "node")]
    #[command(flatten)]
    Node(derpfleet_client::node::cli::NodeCmd),
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Netcheck { derp_map, json, no_https } => netcheck(&derp_map, json, no_https).await,
        Cmd::Connect { url, insecure, cert_name, ping, key, websocket } => {
            connect(&url, insecure, cert_name, ping, key, websocket).await
        }
        #[cfg(feature = "node")]
        Cmd::Node(c) => c.run().await,
    }
}

async fn netcheck(path: &PathBuf, json: bool, no_https: bool) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let map = DerpMap::from_json(&bytes).map_err(|e| anyhow::anyhow!("DERP map {}: {e}", path.display()))?;
    // An empty map would "succeed" with a report of nothing; tailscale netcheck has nothing to do either.
    if map.regions.is_empty() {
        bail!(
            "DERP map {}: no regions (\"Regions\" is missing or empty), so there is nothing to check",
            path.display()
        );
    }
    if map.regions.values().all(|r| r.nodes.is_empty()) {
        bail!(
            "DERP map {}: no region has a node (every \"Nodes\" list is empty), so there is nothing to check",
            path.display()
        );
    }
    let mut cfg = NetcheckConfig { https_fallback: !no_https, ..Default::default() };
    cfg.connect.proxy = HttpProxy::from_env();
    let mut nc = Netchecker::bind(cfg).await.context("binding UDP sockets")?;
    let report = nc.run(&map, true, None).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", human(&map, &report));
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

/// The report in `tailscale netcheck`'s layout.
fn human(map: &DerpMap, r: &Report) -> String {
    let mut s = String::from("\nReport:\n");
    s += &format!("\t* UDP: {}\n", r.udp);
    s += &match r.global_v4 {
        Some(a) => format!("\t* IPv4: yes, {a}\n"),
        None => "\t* IPv4: (no addr found)\n".into(),
    };
    s += &match (r.global_v6, r.os_has_ipv6) {
        (Some(a), _) => format!("\t* IPv6: yes, {a}\n"),
        (None, true) => "\t* IPv6: no, but OS has support\n".into(),
        (None, false) => "\t* IPv6: no, unavailable in OS\n".into(),
    };
    s += &format!(
        "\t* MappingVariesByDestIP: {}\n",
        r.mapping_varies_by_dest_ip.map(|b| b.to_string()).unwrap_or_default()
    );
    let name = |id: i64| map.regions.get(&id).map(|r| r.region_name.clone()).unwrap_or_default();
    s += &format!(
        "\t* Nearest DERP: {}\n",
        if r.preferred_derp == 0 {
            "unknown (no response to latency probes)".into()
        } else {
            name(r.preferred_derp)
        }
    );
    s += "\t* DERP latency:\n";
    let mut rows: Vec<(Option<Duration>, i64)> =
        map.regions.keys().map(|id| (r.region_latency.get(id).copied(), *id)).collect();
    rows.sort_by_key(|(d, id)| (d.is_none(), *d, *id));
    for (d, id) in rows {
        let code = &map.regions[&id].region_code;
        let via = if r.https_regions.contains(&id) { " via HTTPS" } else { "" };
        let lat = d.map(ms).unwrap_or_default();
        s += &format!("\t\t- {code}: {lat}{via}  ({})\n", name(id));
    }
    s
}

async fn connect(
    url: &str,
    insecure: bool,
    cert_name: Option<String>,
    pings: u32,
    key: Option<String>,
    websocket: bool,
) -> Result<()> {
    let mut u: DerpUrl = url.parse()?;
    if insecure {
        u.cert_check = CertCheck::Insecure;
    } else if let Some(c) = cert_name {
        let node = derpfleet_client::derpmap::DerpNode { cert_name: c.clone(), ..Default::default() };
        u.cert_check = node.cert_check();
        if u.cert_check == CertCheck::HostName {
            bail!("bad --cert-name {c:?}");
        }
    }
    let key = match key {
        Some(k) => k.parse::<NodePrivate>().map_err(|e| anyhow::anyhow!("--key: {e}"))?,
        None => NodePrivate::generate(),
    };
    let t0 = Instant::now();
    let opts = ConnectOptions { websocket, proxy: HttpProxy::from_env(), ..ConnectOptions::new(key) };
    let conn = DerpConn::connect(&DerpTarget::Url(u), &opts).await?;
    let info = conn.info().clone();
    println!(
        "connected to {} in {}: server key {} (fast start: {})",
        info.remote,
        ms(t0.elapsed()),
        info.server_key,
        info.fast_start
    );
    let (tx, mut rx) = conn.split();
    for i in 0..pings {
        let data = (i as u64).to_be_bytes();
        let t = Instant::now();
        tx.send_ping(data).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .context("ping timed out")??
            {
                ServerToClient::Pong(d) if d == data => break,
                _ => continue,
            }
        }
        println!("pong {i}: {}", ms(t.elapsed()));
    }
    Ok(())
}
