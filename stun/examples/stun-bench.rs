//! STUN responder throughput: `cargo run --release -p derpfleet-stun --example stun-bench -- \
//!   --server 127.0.0.1:3478 --sockets 4 --duration 5 [--rate 235000 | --window 256]`
//!
//! Prints requests sent/s and valid answers/s. See [`derpfleet_stun::load`] for the method.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use derpfleet_stun::load::{run, LoadConfig};

#[derive(Debug, Parser)]
#[command(name = "stun-bench")]
struct Args {
    /// responder address
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    /// local address for the client sockets
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// client sockets
    #[arg(long, default_value_t = 4)]
    sockets: usize,
    /// seconds to send for
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// total offered requests per second (open loop); 0 = closed loop with --window
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// closed loop: unanswered requests allowed per socket
    #[arg(long, default_value_t = 256)]
    window: u64,
    /// tokio worker threads for the generator
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = LoadConfig {
        server: args.server,
        bind: args.bind,
        sockets: args.sockets,
        rate: args.rate,
        window: args.window,
        duration: Duration::from_secs(args.duration),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let r = rt.block_on(run(&cfg))?;
    let mode = if cfg.rate > 0 {
        format!("open loop at {}/s", cfg.rate)
    } else {
        format!("closed loop, window {}", cfg.window)
    };
    println!(
        "stun-bench: {mode}, {} sockets, {:.1} s: sent {} ({:.0}/s), answered {} ({:.0}/s, {:.2}% of sent), invalid {}",
        cfg.sockets,
        r.elapsed.as_secs_f64(),
        r.sent,
        r.sent_per_sec(),
        r.answered,
        r.answers_per_sec(),
        if r.sent > 0 { 100.0 * r.answered as f64 / r.sent as f64 } else { 0.0 },
        r.invalid,
    );
    Ok(())
}
