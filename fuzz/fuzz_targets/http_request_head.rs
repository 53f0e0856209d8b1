//! The relay's first read on every connection of the main port: the HTTP request head sniffer that picks
//! DERP upgrade, WebSocket upgrade or plain HTTP. Arbitrary bytes as the connection's stream; nothing may
//! panic, and a head it accepts lies within what was read.
#![no_main]

use std::sync::OnceLock;

use derpfleet_relay::http::read_request_head;
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let mut io = data;
    if let Ok(Some((head, buf, head_len))) = runtime().block_on(read_request_head(&mut io)) {
        assert!(head_len <= buf.len() && buf.len() <= data.len());
        let _ = head.route(true);
    }
});
