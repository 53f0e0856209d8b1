//! With the real relay binary: a home-region client reconnects after the
//! relay restarts, within the documented backoff bound (`derpfleet_client::region`: no wait
//! exceeds 5 s), and tells the new relay process it is its home (`NotePreferred`), which the relay
//! counts in `derp_current_home_connections`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use derpfleet_client::region::{DerpRegionClient, RegionClientConfig, RegionEvent, BACKOFF_MAX};
use derpfleet_client::{ConnectOptions, DerpTarget};
use derpfleet_e2e::ports::unused_port;
use derpfleet_e2e::{bin_path, Child};
use derpfleet_proto::NodePrivate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn start_relay(port: u16, key: &std::path::Path) -> Result<Child> {
    let mut cmd = Command::new(bin_path("derpfleet-relay"));
    cmd.args(["-a", &format!("127.0.0.1:{port}"), "-stun=false", "-c", key.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Child::spawn(cmd, "derpfleet-relay")
}

/// Reads `name` from the relay's `/debug/varz` (loopback is allowed to see it).
async fn metric(port: u16, name: &str) -> Result<f64> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /debug/varz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("{name} not in /debug/varz"))
}

async fn wait_metric(port: u16, name: &str, want: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if metric(port, name).await.ok() == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} never reached {want} (last {:?})", metric(port, name).await.ok());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn next(c: &mut DerpRegionClient, within: Duration, want_connected: bool) -> Result<Instant> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, c.recv())
            .await
            .context("no event in time")?
            .context("ended")?;
        match ev {
            RegionEvent::Connected(_) if want_connected => return Ok(Instant::now()),
            RegionEvent::Disconnected { .. } if !want_connected => return Ok(Instant::now()),
            _ => {}
        }
    }
}

#[tokio::test]
async fn home_client_reconnects_after_relay_restart() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("derpfleet-home-reconnect-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("relay.key");
    let port = unused_port();
    let relay = start_relay(port, &key)?;
    let target = DerpTarget::Url(format!("http://127.0.0.1:{port}/derp").parse()?);
    let mut cfg = RegionClientConfig::new(target, ConnectOptions::new(NodePrivate::generate()));
    cfg.is_home = true;
    let mut client = DerpRegionClient::spawn(cfg);
    next(&mut client, Duration::from_secs(15), true).await?;
    wait_metric(port, "derp_current_home_connections", 1.0).await?;

    drop(relay); // killed and reaped
    next(&mut client, Duration::from_secs(10), false).await?;
    // Stay down long enough for the backoff to grow past its first steps.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let relay = start_relay(port, &key)?;
    let restarted = Instant::now();
    let back = next(&mut client, BACKOFF_MAX + Duration::from_secs(10), true).await?;
    let took = back - restarted;
    assert!(
        took <= BACKOFF_MAX + Duration::from_secs(2),
        "reconnected {took:?} after the relay restarted; bound is {BACKOFF_MAX:?} plus one connect"
    );
    wait_metric(port, "derp_current_home_connections", 1.0).await?;
    drop((client, relay));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
