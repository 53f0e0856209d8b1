//! The relay's `-config FILE`: arbitrary text as the TOML file, turned into flags. Nothing may panic; an
//! error names the file.
#![no_main]

use std::path::Path;

use derpfleet_relay::startup::config::args_from_toml;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = args_from_toml(Path::new("/etc/derpfleet/fuzz.toml"), text) {
        assert!(e.to_string().contains("fuzz.toml"), "error without the file name: {e}");
    }
});
