//! Third-party STUN clients against our responder over IPv4 and IPv6 loopback: Debian coturn's
//! `turnutils_stunclient` and PyPI `aiostun` (test-lab.md §1). Both send plain RFC 5389 Binding
//! requests, so they exercise the default (lenient) mode; strict mode must stay silent for them.
//!
//! Missing tools fail the test with instructions rather than skipping it.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::TestServer;
use derpfleet_stun::StunConfig;
use tokio::process::Command;

const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

fn require_turnutils() -> &'static str {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("turnutils_stunclient").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "turnutils_stunclient not found on PATH: install Debian package `coturn` \
         (listed in scripts/apt-packages.txt; scripts/test-all.sh installs it)"
    );
    "turnutils_stunclient"
}

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("DERPFLEET_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-test"));
    let py = venv.join("bin/python");
    assert!(
        py.is_file(),
        "no Python venv at {}: create it and install aiostun (`python3 -m venv .venv-test && \
         .venv-test/bin/pip install aiostun`, or run scripts/test-all.sh), or set DERPFLEET_TEST_VENV",
        venv.display()
    );
    py
}

/// Runs a command with a hard timeout (turnutils_stunclient waits forever without a reply);
/// returns (exit success, stdout, stderr).
async fn run(cmd: &mut Command) -> (bool, String, String) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = cmd.spawn().expect("spawn tool");
    let out = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not finish within {TOOL_TIMEOUT:?} (no STUN answer?)"))
        .expect("wait for tool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The reflexive address from turnutils_stunclient's "UDP reflexive addr: IP:PORT" line.
fn reflexive_addr(stdout: &str) -> Option<SocketAddr> {
    let line = stdout.lines().find(|l| l.contains("UDP reflexive addr:"))?;
    let text = line.split("UDP reflexive addr:").nth(1)?.trim();
    text.parse().ok().or_else(|| {
        // IPv6 is printed as `::1:PORT` without brackets.
        let (ip, port) = text.rsplit_once(':')?;
        Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
    })
}

async fn turnutils_against(bind: &str, target: &str) {
    let tool = require_turnutils();
    let server = TestServer::start(bind, 1, StunConfig::default());
    let port = server.addr.port().to_string();
    let (ok, stdout, stderr) = run(Command::new(tool).args(["-p", &port, target])).await;
    assert!(ok, "turnutils_stunclient failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let mapped = reflexive_addr(&stdout).unwrap_or_else(|| panic!("no reflexive address in:\n{stdout}"));
    assert_eq!(mapped.ip(), target.parse::<std::net::IpAddr>().unwrap(), "{stdout}");
    assert_ne!(mapped.port(), 0);
    assert!(server.counter(r#"stun_requests{disposition="success"}"#) >= 1);
    server.stop().await;
}

#[tokio::test]
async fn turnutils_stunclient_ipv4() {
    turnutils_against("127.0.0.1:0", "127.0.0.1").await;
}

#[tokio::test]
async fn turnutils_stunclient_ipv6() {
    turnutils_against("[::1]:0", "::1").await;
}

#[tokio::test]
async fn turnutils_stunclient_gets_no_answer_in_strict_mode() {
    let tool = require_turnutils();
    let server = TestServer::start("127.0.0.1:0", 1, StunConfig { strict: true, per_ip_limit: None });
    let port = server.addr.port().to_string();
    let mut cmd = Command::new(tool);
    cmd.args(["-p", &port, "127.0.0.1"]).stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn turnutils_stunclient");
    let finished = tokio::time::timeout(Duration::from_millis(1500), child.wait()).await;
    assert!(finished.is_err(), "turnutils_stunclient finished (got an answer?) in strict mode: {finished:?}");
    child.kill().await.unwrap();
    assert!(server.counter(r#"stun_requests{disposition="not_stun"}"#) >= 1);
    server.assert_counter(r#"stun_requests{disposition="success"}"#, 0).await;
    server.stop().await;
}

/// Asks aiostun for the mapped address; prints `local_ip local_port mapped_ip mapped_port`.
const AIOSTUN_SCRIPT: &str = r#"
import asyncio, sys
import aiostun
from aiostun import constants

async def main(host, port, family):
    fam = constants.FAMILY_IP6 if family == "6" else constants.FAMILY_IP4
    async with aiostun.Client(host=host, port=int(port), family=fam, timeout=3) as c:
        local = c.get_local_addr()
        mapped = await c.get_mapped_address()
        print(local[0], local[1], mapped["ip"], mapped["port"])

asyncio.run(main(*sys.argv[1:4]))
"#;

async fn aiostun_against(bind: &str, host: &str, family: &str) {
    let py = venv_python();
    let server = TestServer::start(bind, 1, StunConfig::default());
    let port = server.addr.port().to_string();
    let (ok, stdout, stderr) = run(Command::new(py).args(["-c", AIOSTUN_SCRIPT, host, &port, family])).await;
    assert!(ok, "aiostun failed (is it installed in the venv?)\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "unexpected aiostun output: {stdout}");
    let local_ip: std::net::IpAddr = fields[0].parse().unwrap();
    let mapped_ip: std::net::IpAddr = fields[2].parse().unwrap();
    assert_eq!(mapped_ip, local_ip, "{stdout}");
    assert_eq!(fields[3], fields[1], "mapped port equals the client's local port: {stdout}");
    server.assert_counter(r#"stun_requests{disposition="success"}"#, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn aiostun_ipv4() {
    aiostun_against("127.0.0.1:0", "127.0.0.1", "4").await;
}

#[tokio::test]
async fn aiostun_ipv6() {
    aiostun_against("[::1]:0", "::1", "6").await;
}
