//! The reference node (`derpfleet-client up`) in labs: keys, the config of a pair of nodes peered with
//! each other, the process, and its `status --json` (over the control socket, which works from the test's
//! own namespace). Node `i` of a lab keeps `node<i>.toml`, `node<i>.sock` and `node<i>.log`/`.err` in the
//! lab's directory, next to the `derpmap.json` the configs name.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::netns::Netns;
use crate::{lab_bin, read_text, wait_for, Child};

/// The nodes' tunnel addresses (node 0, node 1).
pub const TUN_IPS: [&str; 2] = ["100.64.0.1", "100.64.0.2"];

/// `derpfleet-client keygen` → [private key, disco key, public key, disco public].
pub fn keygen() -> Result<[String; 4]> {
    let out = Command::new(lab_bin("derpfleet-client")).arg("keygen").output()?;
    let text = String::from_utf8(out.stdout)?;
    let vals: Vec<String> = text.lines().filter_map(|l| l.split('"').nth(1).map(str::to_string)).collect();
    <[String; 4]>::try_from(vals).map_err(|_| {
        anyhow::anyhow!(
            "`derpfleet-client keygen` failed ({}): was the binary built without its default `node` \
             feature?\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Node `i`'s control socket in `dir`.
pub fn control_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("node{i}.sock"))
}

/// Configs for nodes 0 and 1, each the other's peer: fresh keys, port 41641, TUN `df<i>` with
/// [`TUN_IPS`]`[i]`, `home_region` for itself and its peer; `extra` goes into the top level of both.
pub fn pair_configs(dir: &Path, home_region: i64, extra: &str) -> Result<[String; 2]> {
    let keys = [keygen()?, keygen()?];
    let config = |i: usize| {
        let (me, peer) = (&keys[i], &keys[1 - i]);
        format!(
            "private_key = \"{}\"\ndisco_key = \"{}\"\nlisten_port = 41641\nderp_map = \"derpmap.json\"\n\
             home_region = {home_region}\ncontrol = \"{}\"\n{extra}\n[tun]\nname = \"df{i}\"\naddresses = [\"{}/24\"]\n\
             [[peer]]\npublic_key = \"{}\"\ndisco_key = \"{}\"\nhome_region = {home_region}\nallowed_ips = [\"{}/32\"]\n",
            me[0],
            me[1],
            control_path(dir, i).display(),
            TUN_IPS[i],
            peer[2],
            peer[3],
            TUN_IPS[1 - i],
        )
    };
    Ok([config(0), config(1)])
}

/// Starts nodes 0 and 1 ([`pair_configs`] with `home_region` and `extra`) in `homes` and waits until
/// both are connected to their home relay.
pub fn start_connected_pair(
    homes: [&Netns; 2],
    dir: &Path,
    home_region: i64,
    extra: &str,
) -> Result<Vec<LabNode>> {
    let configs = pair_configs(dir, home_region, extra)?;
    let mut nodes = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        nodes.push(LabNode::start(homes[i], dir, i, config)?);
    }
    for node in &nodes {
        node.wait_status(Duration::from_secs(15), "home connected", |s| s["home_connected"] == true)?;
    }
    Ok(nodes)
}

/// A running node, killed on drop.
pub struct LabNode {
    index: usize,
    control: PathBuf,
    err_log: PathBuf,
    process: Child,
}

impl LabNode {
    /// Writes `config` to `<dir>/node<i>.toml` and starts the node inside `ns`.
    pub fn start(ns: &Netns, dir: &Path, i: usize, config: &str) -> Result<Self> {
        let path = dir.join(format!("node{i}.toml"));
        std::fs::write(&path, config)?;
        let mut cmd = ns.command(lab_bin("derpfleet-client"));
        cmd.arg("up").arg("--config").arg(&path);
        let log = dir.join(format!("node{i}.log"));
        let process = Child::spawn_logged(cmd, &log, &format!("node {i}"))?;
        Ok(Self { index: i, control: control_path(dir, i), err_log: log.with_extension("err"), process })
    }

    /// The node's log (stderr).
    pub fn log(&self) -> String {
        read_text(&self.err_log)
    }

    /// The process (to signal it).
    pub fn process(&mut self) -> &mut Child {
        &mut self.process
    }

    /// `derpfleet-client status --json`.
    pub fn status(&self) -> Result<Value> {
        let out = self.status_command(&["--json"])?;
        if !out.status.success() {
            bail!("status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `derpfleet-client status` (the text an operator reads).
    pub fn status_text(&self) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.status_command(&[])?.stdout).into_owned())
    }

    fn status_command(&self, extra: &[&str]) -> Result<std::process::Output> {
        Command::new(lab_bin("derpfleet-client"))
            .arg("status")
            .args(extra)
            .arg("--control")
            .arg(&self.control)
            .output()
            .context("running derpfleet-client status")
    }

    /// The path to its (first) peer: `direct ip:port` or `derp-<region>`.
    pub fn path(&self) -> Result<String> {
        Ok(path_of(&self.status()?))
    }

    /// Waits (up to `timeout`) until `pred(status)` holds; returns that status. The error names `what`
    /// and carries the last status and the node's log.
    pub fn wait_status(&self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let mut last = None;
        wait_for(timeout, Duration::from_millis(50), || {
            let s = self.status();
            let hit = s.as_ref().is_ok_and(&pred);
            last = Some(s);
            hit.then(|| last.take().and_then(Result::ok)).flatten()
        })
        .with_context(|| {
            let shown = match &last {
                Some(Ok(v)) => format!("{v:#}"),
                Some(Err(e)) => format!("unavailable: {e:#}"),
                None => "never asked".into(),
            };
            format!(
                "node {}: {what} not reached in {timeout:?}\nstatus {shown}\nlog:\n{}",
                self.index,
                self.log()
            )
        })
    }

    /// Waits until `pred(path)` holds; returns the time it took.
    pub fn wait_path(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<Duration> {
        let t0 = Instant::now();
        self.wait_status(timeout, "the expected path", |s| pred(&path_of(s)))?;
        Ok(t0.elapsed())
    }
}

fn path_of(status: &Value) -> String {
    status["peers"][0]["path"].as_str().unwrap_or_default().to_string()
}
