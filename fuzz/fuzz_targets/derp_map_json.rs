//! A DERP map as the client reads it from a file or a control server (`derpfleet-client netcheck
//! --derp-map`, the node's config, the loadtest's `--derp-map`): arbitrary bytes as JSON, validated.
//! Nothing may panic; a map that parses and validates survives its own JSON encoding unchanged.
#![no_main]

use derpfleet_proto::derpmap::DerpMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(map) = DerpMap::from_json(data) else { return };
    if map.validate().is_ok() {
        let again = DerpMap::from_json(map.to_json().as_bytes()).expect("a map's own JSON parses");
        assert_eq!(again, map);
    }
});
