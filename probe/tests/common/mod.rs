//! A small fleet of real `derpfleet-relay` processes on loopback for the prober's tests.
//!
//! Every relay serves DERP over TLS (`-certmode manual`, a certificate for `127.0.0.1` issued by a
//! test CA made here), STUN on its own UDP port and `/metrics` on its own port. Region 1 has two
//! nodes meshed with `-mesh-psk-file` / `-mesh-with` (TLS verified with `-mesh-ca-file`), region 2
//! one node, region 3 is dead (nothing listens at its node's addresses). The prober trusts the
//! test CA through `SSL_CERT_FILE`, as any program using the system trust store would.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Ports for processes started later: outside the ephemeral range, so nothing else takes them first.
pub use derpfleet_e2e::ports::unused_port;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub use tempfile::TempDir;

/// A fresh directory under the system temp dir named `dfprobe-<tag>-…`, removed on drop
/// (mode 0755, as `create_dir_all` would make it).
pub fn temp_dir(tag: &str) -> TempDir {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(&format!("dfprobe-{tag}-"))
        .permissions(std::fs::Permissions::from_mode(0o755))
        .tempdir()
        .expect("create a temp dir")
}

/// A binary of the workspace, next to this test's profile directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(|d| d.parent()).unwrap().join(name);
    assert!(p.exists(), "{} not built: run `cargo build --workspace --bins` first", p.display());
    p
}

/// A child process killed and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One relay process and its ports.
pub struct Relay {
    pub proc: Proc,
    pub name: String,
    pub derp_port: u16,
    pub stun_port: u16,
    pub metrics_port: u16,
}

impl Relay {
    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics_port))
    }
}

/// The fleet: CA, mesh key, relays, and the DERP map file.
pub struct Fleet {
    pub dir: TempDir,
    pub ca_pem: PathBuf,
    pub map_path: PathBuf,
    pub relays: Vec<Relay>,
    /// The dead region's node ports (nothing listens there).
    pub dead: (u16, u16),
}

fn test_ca() -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "derpfleet-probe test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// A leaf for 127.0.0.1, valid from a day ago for `valid_days` more days (rcgen's default, into
/// year 4096, when `None`).
fn issue_leaf(ca: &Issuer<'static, KeyPair>, certdir: &Path, valid_days: Option<u64>) {
    std::fs::create_dir_all(certdir).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    if let Some(days) = valid_days {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days as i64);
    }
    let cert = params.signed_by(&key, ca).unwrap();
    std::fs::write(certdir.join("127.0.0.1.crt"), cert.pem()).unwrap();
    std::fs::write(certdir.join("127.0.0.1.key"), key.serialize_pem()).unwrap();
}

/// A relay's command line (TLS, STUN, metrics, optional mesh).
fn start_relay(
    dir: &Path,
    ca: &Issuer<'static, KeyPair>,
    name: &str,
    ports: (u16, u16, u16),
    mesh_with: Option<&str>,
    valid_days: Option<u64>,
    allowlist: bool,
) -> Relay {
    let certdir = dir.join(format!("{name}-certs"));
    issue_leaf(ca, &certdir, valid_days);
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut cmd = Command::new(bin("derpfleet-relay"));
    cmd.args([
        "-a",
        &format!("127.0.0.1:{}", ports.0),
        "-http-port=-1",
        "-certmode",
        "manual",
        "-hostname",
        "127.0.0.1",
    ])
    .arg("-certdir")
    .arg(&certdir)
    .args(["-stun", "-stun-port", &ports.1.to_string(), "-stun-rate-limit", "0"])
    .args(["-metrics-addr", &format!("127.0.0.1:{}", ports.2)])
    .arg("-c")
    .arg(dir.join(format!("{name}.key")))
    .arg("-mesh-psk-file")
    .arg(dir.join("mesh.key"));
    if let Some(with) = mesh_with {
        cmd.args(["-mesh-with", with]).arg("-mesh-ca-file").arg(dir.join("ca.pem"));
    }
    if allowlist {
        cmd.arg("-allowlist").arg(dir.join("allowlist"));
    }
    cmd.env("RUST_LOG", "info").env("HOME", dir).stdout(Stdio::null()).stderr(log);
    let child = cmd.spawn().unwrap();
    Relay {
        proc: Proc { child, what: name.into() },
        name: name.into(),
        derp_port: ports.0,
        stun_port: ports.1,
        metrics_port: ports.2,
    }
}

fn node_json(name: &str, region: i64, derp: u16, stun: u16) -> String {
    format!(
        r#"{{"Name":"{name}","RegionID":{region},"HostName":"127.0.0.1","IPv4":"127.0.0.1","IPv6":"none","DERPPort":{derp},"STUNPort":{stun}}}"#
    )
}

/// Plain HTTP/1.0 GET on loopback (so no server answers chunked): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// The value of an unlabelled series in a Prometheus text body.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `f` every 100 ms until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Fleet {
    /// Starts the relays and waits until they serve and the region-1 mesh is up.
    pub fn start(tag: &str) -> Fleet {
        Self::start_with_cert_days(tag, [None; 3])
    }

    /// [`Fleet::start`] with each relay's (1a, 1b, 2a) certificate valid for so many more days.
    pub fn start_with_cert_days(tag: &str, valid_days: [Option<u64>; 3]) -> Fleet {
        Self::start_custom(tag, valid_days, false)
    }

    /// With `allowlist`, every relay runs with an empty `-allowlist`: only mesh-key holders get in.
    pub fn start_custom(tag: &str, valid_days: [Option<u64>; 3], allowlist: bool) -> Fleet {
        let dir = temp_dir(tag);
        std::fs::write(dir.path().join("allowlist"), "# nobody but mesh-key holders\n").unwrap();
        let (ca_pem, ca) = test_ca();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca_pem).unwrap();
        let mesh_key = derpfleet_proto::MeshKey::generate().to_hex();
        std::fs::write(dir.path().join("mesh.key"), format!("{mesh_key}\n")).unwrap();
        let ports: Vec<(u16, u16, u16)> =
            (0..3).map(|_| (unused_port(), unused_port(), unused_port())).collect();
        let with = format!("127.0.0.1:{},127.0.0.1:{}", ports[0].0, ports[1].0);
        let relays = vec![
            start_relay(dir.path(), &ca, "1a", ports[0], Some(&with), valid_days[0], allowlist),
            start_relay(dir.path(), &ca, "1b", ports[1], Some(&with), valid_days[1], allowlist),
            start_relay(dir.path(), &ca, "2a", ports[2], None, valid_days[2], allowlist),
        ];
        let dead = (unused_port(), unused_port());
        let map = format!(
            r#"{{"Regions":{{
              "1":{{"RegionID":1,"RegionCode":"one","RegionName":"Region One","Nodes":[{},{}]}},
              "2":{{"RegionID":2,"RegionCode":"two","RegionName":"Region Two","Nodes":[{}]}},
              "3":{{"RegionID":3,"RegionCode":"dead","RegionName":"Dead Region","Nodes":[{}]}}}}}}"#,
            node_json("1a", 1, ports[0].0, ports[0].1),
            node_json("1b", 1, ports[1].0, ports[1].1),
            node_json("2a", 2, ports[2].0, ports[2].1),
            node_json("3a", 3, dead.0, dead.1),
        );
        let map_path = dir.path().join("derpmap.json");
        std::fs::write(&map_path, map).unwrap();
        let fleet = Fleet { dir, ca_pem: ca_path, map_path, relays, dead };
        for r in &fleet.relays {
            wait_until(Duration::from_secs(20), &format!("relay {} metrics", r.name), || {
                http_get(r.metrics_addr(), "/metrics").is_some_and(|(s, _)| s == 200)
            });
        }
        for r in &fleet.relays[..2] {
            wait_until(Duration::from_secs(20), &format!("relay {} mesh link", r.name), || {
                http_get(r.metrics_addr(), "/metrics")
                    .and_then(|(_, b)| metric(&b, "derp_mesh_peers_connected"))
                    .is_some_and(|v| v >= 1.0)
            });
        }
        fleet
    }

    /// The region mesh key file the relays use.
    pub fn mesh_key_path(&self) -> PathBuf {
        self.dir.path().join("mesh.key")
    }

    /// `file://` URL of the map.
    pub fn map_url(&self) -> String {
        format!("file://{}", self.map_path.display())
    }

    /// A prober command with the fleet's CA trusted.
    pub fn prober(&self) -> Command {
        let mut cmd = Command::new(bin("derpfleet-probe"));
        cmd.env("SSL_CERT_FILE", &self.ca_pem).env_remove("SSL_CERT_DIR");
        cmd
    }

    /// Runs `derpfleet-probe -derp-map MAP -once -json` with `extra` flags.
    pub fn probe_once_json(&self, extra: &[&str]) -> (Output, serde_json::Value) {
        let out = self
            .prober()
            .args(["-derp-map", &self.map_url(), "-once", "-json"])
            .args(extra)
            .output()
            .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
        (out, doc)
    }
}
