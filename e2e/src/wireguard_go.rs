//! Debian's `wireguard-go` (and `wg` from wireguard-tools) for interop and baseline runs. wireguard-go
//! runs in the foreground (`-f`, killed by PID); its UAPI socket directory `/var/run/wireguard` is
//! shared by all namespaces, so interface names must be unique to the test process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::{read_text, wait_for, Child};

/// `wg args…` with optional stdin (`genkey`, `pubkey`), output trimmed.
pub fn wg(args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut c = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running wg (apt wireguard-tools)")?;
    if let Some(s) = stdin {
        c.stdin.take().context("piped")?.write_all(s.as_bytes())?;
    }
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!("wg {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The UAPI socket of interface `ifname` (remove it after a run: a killed wireguard-go leaves it).
pub fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

/// Starts `wireguard-go -f ifname` in `ns` (stdout to `log`) and waits for its UAPI socket, so `wg set`
/// can configure it at once.
pub fn spawn_wireguard_go(ns: &Netns, ifname: &str, log: &Path) -> Result<Child> {
    let mut cmd = ns.command("wireguard-go");
    cmd.arg("-f").arg(ifname).stdout(File::create(log)?).stderr(Stdio::null());
    let child = Child::spawn(cmd, "wireguard-go")?;
    let sock = uapi_socket(ifname);
    wait_for(Duration::from_secs(5), Duration::from_millis(20), || sock.exists().then_some(()))
        .with_context(|| format!("wireguard-go made no UAPI socket: {}", read_text(log)))?;
    Ok(child)
}
