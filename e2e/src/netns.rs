//! Network namespaces for labs, removed on drop.
//!
//! Names are made unique per process (`<prefix><pid%100000>`), so parallel test processes do not
//! collide; interface names stay within Linux's 15-character limit. Every helper shells out to
//! `ip`/`nft` (iproute2, nftables), which is what an operator would type, so a failing lab step is
//! easy to reproduce by hand.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A short tag unique to this process, for namespace and interface names.
pub fn unique_tag() -> String {
    format!("{}", std::process::id() % 100_000)
}

/// A network namespace, deleted (with its processes' sockets) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` (should include [`unique_tag`]) with loopback up.
    pub fn new(name: &str) -> Result<Self> {
        let _ = run("ip", &["netns", "del", name]);
        run("ip", &["netns", "add", name])?;
        let ns = Self { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.name, cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// A `Command` that runs `program` inside the namespace (for spawning servers).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Loads an nftables ruleset (text) into the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning nft")?;
        child.stdin.take().expect("piped").write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft in {}: {}", self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Enables IPv4 (and IPv6) forwarding, for router namespaces.
    pub fn enable_forwarding(&self) -> Result<()> {
        self.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        self.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill anything still running inside, then delete the namespace.
        if let Ok(pids) = run("ip", &["netns", "pids", &self.name]) {
            for pid in pids.split_whitespace() {
                let _ = run("kill", &["-9", pid]);
            }
        }
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Connects `a` and `b` with a veth pair named `a_if`/`b_if`, addresses in CIDR form, links up.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) -> Result<()> {
    run(
        "ip",
        &["link", "add", a_if, "netns", a.name(), "type", "veth", "peer", "name", b_if, "netns", b.name()],
    )?;
    a.ip(&["addr", "add", a_addr, "dev", a_if])?;
    b.ip(&["addr", "add", b_addr, "dev", b_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_namespaces_ping_each_other_and_vanish_on_drop() {
        let tag = unique_tag();
        let (na, nb) = (format!("t{tag}a"), format!("t{tag}b"));
        {
            let a = Netns::new(&na).unwrap();
            let b = Netns::new(&nb).unwrap();
            veth(&a, "va", "10.250.0.1/24", &b, "vb", "10.250.0.2/24").unwrap();
            a.exec("ping", &["-c", "1", "-W", "2", "10.250.0.2"]).unwrap();
        }
        let list = run("ip", &["netns", "list"]).unwrap();
        assert!(!list.contains(&na) && !list.contains(&nb), "namespaces left behind: {list}");
    }
}
