//! `derpfleet-client netcheck` with a DERP map that is empty or of the wrong shape: it says what is wrong
//! in the JSON's words (no Rust type names), names the file, and exits 1 without running a netcheck.

use std::process::Command;

fn netcheck_with(name: &str, json: &str) -> (Option<i32>, String) {
    let p = std::env::temp_dir().join(format!("derpfleet-mapshape-{}-{name}.json", std::process::id()));
    std::fs::write(&p, json).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_derpfleet-client"))
        .args(["netcheck", "--derp-map", p.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&p);
    (
        out.status.code(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn empty_and_wrong_shaped_maps_are_explained_and_fail() {
    let cases = [
        ("empty-object", "{}", "no regions"),
        ("empty-regions", r#"{"Regions":{}}"#, "no regions"),
        (
            "no-nodes",
            r#"{"Regions":{"1":{"RegionID":1,"RegionCode":"x","Nodes":[]}}}"#,
            "no region has a node",
        ),
        ("array", "[]", "a DERP map is a JSON object"),
        ("number", "42", "not the number 42"),
        ("empty-file", "", "EOF while parsing"),
        ("home-params", r#"{"HomeParams":5}"#, "expected an object for \"HomeParams\""),
        ("regions-array", r#"{"Regions":[1,2]}"#, "invalid type: array, expected an object"),
        ("region-string", r#"{"Regions":{"1":"derp.example.com"}}"#, "expected a region object"),
        ("node-number", r#"{"Regions":{"1":{"RegionID":1,"Nodes":[7]}}}"#, "expected a node object"),
    ];
    for (name, json, says) in cases {
        let (code, out) = netcheck_with(name, json);
        assert_eq!(code, Some(1), "{name}: exit code {code:?}\n{out}");
        assert!(out.contains(says), "{name}: should say {says:?}:\n{out}");
        assert!(
            out.contains(&format!("derpfleet-mapshape-{}-{name}.json", std::process::id())),
            "{name}: no file name:\n{out}"
        );
        for rust in ["struct", "HomeParams`", "DerpRegion", "DerpNode", "FoldedMap"] {
            assert!(!out.contains(rust), "{name}: Rust type name {rust:?} in the message:\n{out}");
        }
        assert!(!out.contains("Report:"), "{name}: ran a netcheck anyway:\n{out}");
    }
}
