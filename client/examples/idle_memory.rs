//! Opens N idle DERP connections from one process and prints the resident memory they cost.
//!
//! `cargo run -p derpfleet-client --example idle_memory -- http://127.0.0.1:3340/derp 2000`

use derpfleet_client::{ConnectOptions, DerpConn, DerpTarget};
use derpfleet_proto::NodePrivate;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).map(String::as_str).unwrap_or("http://127.0.0.1:3340/derp");
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let target = DerpTarget::Url(url.parse()?);
    // Warm up allocator and runtime with one connection.
    let first = DerpConn::connect(&target, &ConnectOptions::new(NodePrivate::generate())).await?.split();
    let before = rss_kib();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(DerpConn::connect(&target, &ConnectOptions::new(NodePrivate::generate())).await?.split());
    }
    let after = rss_kib();
    println!(
        "{n} idle connections: {} KiB RSS, {:.1} KiB each",
        after - before,
        (after - before) as f64 / n as f64
    );
    drop((first, conns));
    Ok(())
}
