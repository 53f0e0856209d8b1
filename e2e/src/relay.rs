//! `derpfleet-relay` processes for labs. Each is named (`relay`, `relay2`, `n1`…): its node key is
//! `<dir>/<name>.key`, so a restart under the same name keeps the node's identity, and its output goes to
//! `<dir>/<name>.log` / `.err` (appended across restarts). TLS labs use the relay's own manual cert mode
//! with an IP hostname, in which it writes a self-signed certificate that DERP maps accept with
//! `InsecureForTests` or pin with `sha256-raw`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;
use crate::{lab_bin, read_text, wait_for, Child};

/// A relay command being put together; [`RelayCmd::spawn`] starts it.
pub struct RelayCmd {
    cmd: Command,
    dir: PathBuf,
    name: String,
}

impl RelayCmd {
    /// The relay `name` with its key file in `dir`, run inside `ns` if given (else in the test's namespace).
    pub fn new(ns: Option<&Netns>, dir: &Path, name: &str) -> Self {
        let bin = lab_bin("derpfleet-relay");
        let mut cmd = match ns {
            Some(ns) => ns.command(&bin),
            None => Command::new(&bin),
        };
        cmd.arg("-c").arg(dir.join(format!("{name}.key")));
        Self { cmd, dir: dir.to_path_buf(), name: name.to_string() }
    }

    /// Adds flags.
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.cmd.args(args);
        self
    }

    /// TLS only (no plain HTTP listener) with the certificate the relay makes itself for `hostname` (an
    /// IP address) in [`cert_dir`].
    pub fn self_signed_tls(mut self, hostname: &str) -> Self {
        let certdir = cert_dir(&self.dir, &self.name);
        self.cmd
            .args(["-certmode", "manual", "-hostname", hostname, "-http-port", "-1", "-certdir"])
            .arg(certdir);
        self
    }

    /// Starts the relay, logging to `<dir>/<name>.log` / `.err`.
    pub fn spawn(self) -> Result<Child> {
        let log = self.dir.join(format!("{}.log", self.name));
        Child::spawn_logged(self.cmd, &log, &format!("derpfleet-relay {}", self.name))
    }
}

/// Where relay `name` keeps the certificate of [`RelayCmd::self_signed_tls`].
pub fn cert_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}-certs"))
}

/// Waits until relay `name` has written its self-signed certificate for `hostname`; returns its path.
pub fn wait_cert(dir: &Path, name: &str, hostname: &str, timeout: Duration) -> Result<PathBuf> {
    let cert = cert_dir(dir, name).join(format!("{hostname}.crt"));
    wait_for(timeout, Duration::from_millis(50), || cert.exists().then_some(())).with_context(|| {
        format!("relay {name} wrote no certificate; log:\n{}", read_text(&dir.join(format!("{name}.err"))))
    })?;
    // The file appears before the listener is up; give the relay a moment.
    std::thread::sleep(Duration::from_millis(200));
    Ok(cert)
}

/// Waits until relay `name` logs that it is listening.
pub fn wait_listening(dir: &Path, name: &str, timeout: Duration) -> Result<()> {
    crate::wait_for_log(&dir.join(format!("{name}.err")), "relay listening", timeout).map(|_| ())
}
