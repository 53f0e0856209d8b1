//! README.md documents every flag and config key. The table between the
//! `relay-flags` markers is generated from the same clap definitions as `--help`
//! (`derpfleet_relay::startup::flags::flags_markdown`); run with `UPDATE_README=1` to rewrite it.

const BEGIN: &str = "<!-- relay-flags:begin (generated: UPDATE_README=1 cargo test -p derpfleet-relay --test ops readme::) -->\n";
const END: &str = "<!-- relay-flags:end -->";

#[test]
fn readme_lists_every_flag_and_config_key() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).unwrap();
    let want = derpfleet_relay::startup::flags::flags_markdown();
    let (Some(b), Some(e)) = (readme.find(BEGIN), readme.find(END)) else {
        panic!("README.md has no relay-flags markers; add\n{BEGIN}{want}{END}");
    };
    let have = &readme[b + BEGIN.len()..e];
    if have != want {
        if std::env::var_os("UPDATE_README").is_some() {
            let updated = format!("{}{BEGIN}{want}{}", &readme[..b], &readme[e..]);
            std::fs::write(path, updated).unwrap();
            return;
        }
        panic!("README.md flag table is stale; rerun with UPDATE_README=1. Expected:\n{want}");
    }
    // Every flag of --help appears in the table, and so does every config key.
    let help =
        std::process::Command::new(env!("CARGO_BIN_EXE_derpfleet-relay")).arg("-help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for word in help.split_whitespace().filter(|w| w.starts_with("--")) {
        let flag = word.trim_start_matches('-').split(['=', ',', '[', '<', ']']).next().unwrap();
        // `-h` is the alias of `-help`.
        if !flag.is_empty() && flag != "h" {
            assert!(have.contains(&format!("`-{flag}`")), "-{flag} missing from README");
        }
    }
}
