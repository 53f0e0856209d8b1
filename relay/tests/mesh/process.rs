//! The mesh with real relay processes: kill one node of three, restart
//! it, and watch the region heal without the other nodes' clients reconnecting. Also the
//! `-mesh-psk-file`/`-mesh-with` start-up errors.

use crate::http_common;
use crate::mesh_common;
use crate::ops_common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use derpfleet_client::ConnectOptions;
use derpfleet_proto::msg::PeerGoneReason;
use derpfleet_proto::{MeshKey, NodePrivate};
use http_common::temp_dir;
use mesh_common::Client;
use ops_common::{unused_port, BIN};

/// A relay process, killed on drop.
struct Relay {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, name: &str, port: u16, mesh_with: &str) -> Relay {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(BIN)
        .args(["-a", &format!("127.0.0.1:{port}"), "-http-port=-1", "-stun=false", "-metrics-addr="])
        .arg("-c")
        .arg(dir.join(format!("{name}.key")))
        .arg("-mesh-psk-file")
        .arg(dir.join("mesh.key"))
        .args(["-mesh-with", mesh_with])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Relay { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) }
}

/// Connects with `key` to `addr`, retrying while the relay is still starting.
async fn connect_retrying(addr: SocketAddr, key: &NodePrivate) -> Result<Client> {
    let start = Instant::now();
    loop {
        match Client::connect_with(addr, ConnectOptions::new(key.clone())).await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() > Duration::from_secs(10) => bail!("connecting to {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_senders_get_peer_gone_and_restart_resumes_within_6s() -> Result<()> {
    let dir = temp_dir("mesh-proc");
    std::fs::write(dir.path().join("mesh.key"), format!("{}\n", MeshKey::generate().to_hex()))?;
    let ports = [unused_port(), unused_port(), unused_port()];
    let with = ports.map(|p| format!("http://127.0.0.1:{p}")).join(",");
    let r1 = start(dir.path(), "r1", ports[0], &with);
    let r2 = start(dir.path(), "r2", ports[1], &with);
    let mut r3 = start(dir.path(), "r3", ports[2], &with);
    let keys = [NodePrivate::generate(), NodePrivate::generate(), NodePrivate::generate()];
    let mut c1 = connect_retrying(r1.addr, &keys[0]).await?;
    let mut c2 = connect_retrying(r2.addr, &keys[1]).await?;
    let mut c3 = connect_retrying(r3.addr, &keys[2]).await?;
    // The mesh comes up (links retry every 5 s while the other processes start).
    let up = Duration::from_secs(15);
    c1.deliver_eventually(&mut c2, up).await?;
    c2.deliver_eventually(&mut c1, up).await?;
    c3.deliver_eventually(&mut c1, up).await?;
    c3.deliver_eventually(&mut c2, up).await?;
    c1.deliver_eventually(&mut c3, up).await?;

    r3.child.kill()?;
    r3.child.wait()?;
    for c in [&mut c1, &mut c2] {
        assert_eq!(
            c.want_gone(keys[2].public()).await?,
            PeerGoneReason::Disconnected,
            "sender to r3's client"
        );
    }
    c1.deliver_to(&mut c2, "r1->r2 with r3 down").await?;
    c2.deliver_to(&mut c1, "r2->r1 with r3 down").await?;

    // Restart out of step with the other nodes' 5 s reconnect pause: their first attempt fails,
    // and the next one (1 s later) must find the node.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let restarted = Instant::now();
    let _r3 = start(dir.path(), "r3", ports[2], &with);
    drop(c3);
    let mut c3 = connect_retrying(SocketAddr::from(([127, 0, 0, 1], ports[2])), &keys[2]).await?;
    let limit = Duration::from_secs(6);
    c1.deliver_eventually(&mut c3, limit).await?;
    c2.deliver_eventually(&mut c3, limit).await?;
    c3.deliver_eventually(&mut c1, limit).await?;
    c3.deliver_eventually(&mut c2, limit).await?;
    let healed = restarted.elapsed();
    eprintln!("delivery in every direction resumed {healed:?} after the restart");
    assert!(healed <= Duration::from_secs(6) + Duration::from_millis(500), "healed after {healed:?}");
    assert!(!c1.tx.is_closed() && !c2.tx.is_closed(), "the other nodes' clients never reconnected");
    c1.deliver_to(&mut c2, "r1->r2 after").await?;
    drop((r1, r2));
    Ok(())
}

fn run_to_exit(args: &[&str], dir: &Path) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["-a", "127.0.0.1:0", "-http-port=-1", "-stun=false", "-metrics-addr="])
        .arg("-c")
        .arg(dir.join("k.key"))
        .args(args)
        .env("HOME", dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return (status.success(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relay with {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mesh_with_without_key_or_with_invalid_key_is_fatal() {
    let dir = temp_dir("mesh-cli");
    let (ok, err) = run_to_exit(&["-mesh-with", "derp2.example.com"], dir.path());
    assert!(!ok && err.contains("-mesh-with requires a mesh key"), "{err}");
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not hex\n").unwrap();
    let (ok, err) = run_to_exit(&["-mesh-psk-file", bad.to_str().unwrap()], dir.path());
    assert!(!ok && err.contains("64 hex"), "{err}");
    let (ok, err) =
        run_to_exit(&["-mesh-psk-file", dir.path().join("missing").to_str().unwrap()], dir.path());
    assert!(!ok && err.contains("reading mesh key file"), "{err}");
    let good = dir.path().join("good.key");
    std::fs::write(&good, format!("{}\n", MeshKey::generate().to_hex())).unwrap();
    let (ok, err) =
        run_to_exit(&["-mesh-psk-file", good.to_str().unwrap(), "-mesh-with", "a/b/c"], dir.path());
    assert!(!ok && err.contains("-mesh-with entry"), "{err}");
}
