//! The relay's command line in Go flag syntax (`-name value`, `-name=value`, `--name`, booleans as
//! `-name=false`): arbitrary bytes split at NUL into arguments (not necessarily UTF-8), parsed. Nothing
//! may panic (`--help` and friends come back as errors, never as an exit).
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use derpfleet_relay::startup::flags::Flags;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args = std::iter::once(OsString::from("derpfleet-relay"))
        .chain(data.split(|&b| b == 0).map(|a| OsString::from_vec(a.to_vec())));
    let _ = Flags::parse_go(args);
});
