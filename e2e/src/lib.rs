//! Shared fixtures for derpfleet's end-to-end tests.
//!
//! - [`bin_path`]: finds the workspace's built binaries (`scripts/test-all.sh` runs
//!   `cargo build --workspace --bins` before the tests; a test fails with that hint if one is missing).
//! - [`netns`]: network namespaces and veth links that clean themselves up on drop, for multi-host and
//!   NAT labs on one machine (root needed; see `shared/docs/test-lab.md`).
//! - [`pathlab`]: the NAT lab for the reference node's path tests (speed, roaming, IPv6).
//! - [`Child`]: a spawned process that is killed (and reaped) on drop, so no test leaves one behind.

pub mod delay;
pub mod netns;
pub mod pathlab;

use std::path::PathBuf;
use std::process::Command;

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e sits in the workspace").to_path_buf()
}

/// Path of a workspace binary in the same profile directory as the running test.
///
/// Panics with a clear hint when it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    // The test executable lives in target/<profile>/deps/; binaries in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps layout");
    let p = profile_dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test-all.sh does)",
        p.display()
    );
    p
}

/// A child process killed and reaped on drop.
pub struct Child {
    inner: std::process::Child,
    what: String,
}

impl Child {
    /// Spawns `cmd`, labelled `what` in panics and logs.
    pub fn spawn(mut cmd: Command, what: &str) -> anyhow::Result<Self> {
        let inner = cmd.spawn().map_err(|e| anyhow::anyhow!("spawning {what}: {e}"))?;
        Ok(Self { inner, what: what.to_string() })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.inner.id()
    }

    /// Sends a signal (e.g. `"TERM"`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.inner.id().to_string()).status();
    }

    /// Waits for exit, up to `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.inner.try_wait() {
                return Some(s);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Mutable access to the std child (stdio handles).
    pub fn inner(&mut self) -> &mut std::process::Child {
        &mut self.inner
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.inner.try_wait() {
            let _ = self.inner.kill();
            let _ = self.inner.wait();
            eprintln!("[e2e] killed {}", self.what);
        }
    }
}

/// The flag names a program's `--help` lists (without dashes): the first word of every line that starts
/// with `-` after indentation, as clap prints them (`--stun[=<bool>]`, `--a <addr>`, `-h, --help`). Tests
/// that pass flags to a binary check them against this, so a flag that disappears fails the test instead
/// of silently shrinking it.
pub fn help_flags(help: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for line in help.lines() {
        let line = line.trim_start();
        if !line.starts_with('-') {
            continue;
        }
        // `-h, --help` names two spellings of one flag; both count.
        for word in line.split_whitespace().take_while(|w| w.starts_with('-')) {
            let name = word.trim_start_matches('-').trim_end_matches(',');
            let name = name.split(['[', '=', '<']).next().unwrap_or("");
            if !name.is_empty() {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// Fails (naming the missing ones) unless `help` lists every flag in `needed` (names without dashes).
pub fn require_flags(program: &str, help: &str, needed: &[&str]) -> anyhow::Result<()> {
    let listed = help_flags(help);
    let missing: Vec<&str> = needed.iter().copied().filter(|f| !listed.contains(*f)).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{program} --help no longer lists {missing:?}, which this test passes; update the test with the \
         flag's new spelling (the flags it lists: {listed:?})"
    );
    Ok(())
}
