//! Shared fixtures for derpfleet's end-to-end tests.
//!
//! - [`bin_path`]: finds the workspace's built binaries (`scripts/test-all.sh` runs
//!   `cargo build --workspace --bins` before the tests; a test fails with that hint if one is missing).
//! - [`netns`]: network namespaces and veth links that clean themselves up on drop, for multi-host and
//!   NAT labs on one machine (root needed; see `shared/docs/test-lab.md`).
//! - [`nsthread`]: a thread (with its own Tokio runtime) living inside a namespace, for in-process
//!   clients and forwarders.
//! - [`natlab`]: home routers (NAT + stateful firewall) and the homes behind them.
//! - [`relay`]: `derpfleet-relay` processes for labs (TLS with a self-signed IP certificate, or plain).
//! - [`node`]: `derpfleet-client up` processes for labs and their status.
//! - [`traffic`]: ping counts and iperf3 throughput between namespaces.
//! - [`wireguard_go`]: Debian's `wireguard-go` as a peer or baseline.
//! - [`pathlab`]: the NAT lab for the reference node's path tests (speed, roaming, IPv6).
//! - [`ports`]: ports to name before the process that binds them starts, outside the kernel's
//!   ephemeral range so no other socket on the machine can take them first.
//! - [`scratch`]: per-test working directories removed on drop.
//! - [`Child`]: a spawned process that is killed (and reaped) on drop, so no test leaves one behind.

pub mod delay;
pub mod natlab;
pub mod netns;
pub mod node;
pub mod nsthread;
pub mod pathlab;
pub mod ports;
pub mod relay;
pub mod scratch;
pub mod traffic;
pub mod wireguard_go;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A workspace binary for a lab; `NODE_LAB_BIN_DIR` (e.g. `target/release`) overrides the test's profile
/// directory, so throughput runs can use optimised (or older, for before/after pairs) builds.
pub fn lab_bin(name: &str) -> PathBuf {
    match std::env::var_os("NODE_LAB_BIN_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => bin_path(name),
    }
}

/// The file's text, or empty when it is missing (logs read for failure messages).
pub fn read_text(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Calls `probe` every `every` until it returns `Some`, for at most `timeout`; `None` when time ran out.
/// Labs wait on processes they started (a socket appearing, a status turning true), never on wall-clock
/// guesses, so every wait is this loop with its own failure message.
pub fn wait_for<T>(timeout: Duration, every: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Waits until the file at `path` contains `needle` (a server's "listening" log line); returns its text.
pub fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> anyhow::Result<String> {
    wait_for(timeout, Duration::from_millis(50), || Some(read_text(path)).filter(|s| s.contains(needle)))
        .ok_or_else(|| {
            anyhow::anyhow!("{} never logged {needle:?}; log:\n{}", path.display(), read_text(path))
        })
}

/// The stdout of a finished command, or an error naming it (`what`) with its exit status, stdout and
/// stderr: what a tool printed is what the reader of a failed test needs.
pub fn success_stdout(what: &str, out: Output) -> anyhow::Result<String> {
    anyhow::ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

    /// Spawns `cmd` with stdin closed, stdout appended to `log` and stderr to `log` with the extension
    /// `err` (appended, so a restarted server keeps its earlier lines), `RUST_LOG` from `NODE_LAB_LOG`
    /// (default `info`).
    pub fn spawn_logged(mut cmd: Command, log: &Path, what: &str) -> anyhow::Result<Self> {
        let append = |p: &Path| std::fs::OpenOptions::new().create(true).append(true).open(p);
        cmd.env("RUST_LOG", std::env::var("NODE_LAB_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(append(log)?)
            .stderr(append(&log.with_extension("err"))?);
        Self::spawn(cmd, what)
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
