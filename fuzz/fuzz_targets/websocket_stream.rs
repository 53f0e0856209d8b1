//! The WebSocket byte-stream adapter (`derpfleet_client::ws::WsBytes`, also the relay's): arbitrary bytes
//! as the frames a peer sends after the upgrade, read to the end in both roles (the first byte picks the
//! role: a server reads masked client frames, a client reads unmasked ones). Nothing may panic, and no
//! read returns more than the 1 MiB message limit allows in one go.
#![no_main]

use std::sync::OnceLock;

use derpfleet_client::ws::WsBytes;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::protocol::Role;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, frames)) = data.split_first() else { return };
    let role = if pick & 1 == 0 { Role::Server } else { Role::Client };
    // What the adapter writes back (pongs, close replies) goes to a sink, so it never waits on us.
    let io = tokio::io::join(frames, tokio::io::sink());
    runtime().block_on(async move {
        let mut ws = WsBytes::new(io, role, Vec::new()).await;
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = ws.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
});
