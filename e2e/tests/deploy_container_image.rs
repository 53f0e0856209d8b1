//! Builds the relay image from the repository's `Dockerfile` with podman (no registry: base images are
//! made locally by `deploy/container/local-base-images.sh`), runs it with runc, and talks to it over
//! loopback: the relay's `/derp/probe` answers 200, both STUN responders (the relay's `-stun` and the
//! standalone `derpfleet-stun`) answer with our own address, `/metrics` answers, the image's HEALTHCHECK
//! passes, and SIGTERM ends both with exit code 0 within the stop timeout (143, the runtime's "killed by
//! SIGTERM", or a SIGKILL after the timeout fails the test: the image promises a clean drain).
//!
//! The image is built with the Dockerfile's own Rust build stage (`BINARIES_FROM=build`: a builder image made
//! from the host's toolchain, crates from crates.io), as an operator would build it. The stage's cache mounts
//! (cargo registry and target dir) live in buildah's cache under /var/tmp, outside the private storage below,
//! so later runs on one machine recompile only the workspace's crates. `DERPFLEET_DEPLOY_PREBUILT=1` builds
//! around the workspace's already built binaries instead (`BINARIES_FROM=prebuilt`, seconds), for quick local
//! iterations on the runtime stage; CI never sets it.
//!
//! The flags the test passes are checked against the image relay's `--help` first: one that disappears
//! fails the test instead of silently shrinking what it checks.
//!
//! Everything lives in a private podman storage root (overlay driver: 8x faster than vfs here) under a
//! temp dir, removed at the end; only the debootstrap tarballs stay cached in /var/tmp/derpfleet-image-cache.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use derpfleet_e2e::ports::unused_port;
use derpfleet_e2e::{bin_path, success_stdout, workspace_root};
use derpfleet_stun::message::{build_request, parse_response, TxId};

const RUNTIME_BASE: &str = "localhost/derpfleet-test/debian:bookworm-slim";
const BUILDER_BASE: &str = "localhost/derpfleet-test/rust-builder:bookworm";
const IMAGE: &str = "localhost/derpfleet-test/relay:e2e";

/// The relay flags this test passes (`-metrics-addr` moves the listener off its default 127.0.0.1:9090, which
/// would collide on the host network).
const RELAY_FLAGS_USED: &[&str] = &["a", "http-port", "stun", "stun-port", "c", "hostname", "metrics-addr"];
/// How long `podman stop` waits after SIGTERM before it sends SIGKILL; the relay drains within
/// `-drain-timeout` (default 5 s), so a stop that takes this long has failed.
const STOP_TIMEOUT_SECS: u64 = 20;

/// A private podman installation (storage, run state, temp files) under one directory, torn down on drop.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
        let dir = PathBuf::from(format!("/var/tmp/derpfleet-e2e-podman-{}-{nanos}", std::process::id()));
        for sub in ["root", "run", "tmp", "ctx"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        Ok(Self { dir })
    }

    /// The global options that point podman at this private installation.
    fn opts(&self) -> Vec<String> {
        vec![
            format!("--root={}", self.dir.join("root").display()),
            format!("--runroot={}", self.dir.join("run").display()),
            format!("--tmpdir={}", self.dir.join("tmp").display()),
            "--storage-driver=overlay".into(),
            "--cgroup-manager=cgroupfs".into(),
            "--events-backend=file".into(),
        ]
    }

    /// `podman <opts> args...`, killed after `limit`.
    fn run(&self, limit: Duration, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("timeout");
        cmd.arg("--kill-after=10")
            .arg(limit.as_secs().to_string())
            .arg("podman")
            .args(self.opts())
            .args(args);
        let out = cmd.output().context("running podman (is it installed? scripts/apt-packages.txt)")?;
        Ok(out)
    }

    /// Like [`Podman::run`], failing with podman's output on a non-zero exit.
    fn ok(&self, limit: Duration, args: &[&str]) -> Result<String> {
        success_stdout(&format!("podman {}", args.join(" ")), self.run(limit, args)?)
    }

    /// `--help` of the image's `entrypoint` (the relay when `None`), run without network.
    fn help(&self, entrypoint: Option<&str>) -> Result<String> {
        let mut args = vec![
            "run",
            "--rm",
            "--runtime=runc",
            "--network=none",
            "--ulimit=nofile=4096:4096",
            "--ulimit=nproc=4096:4096",
        ];
        if let Some(e) = entrypoint {
            args.extend(["--entrypoint", e]);
        }
        args.extend([IMAGE, "--help"]);
        self.ok(Duration::from_secs(60), &args)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let t = Duration::from_secs(60);
        let _ = self.run(t, &["rm", "--all", "--force", "--time", "0"]);
        let _ = self.run(t, &["rmi", "--all", "--force"]);
        // Anything still mounted below our directory (container shm, storage) must go before the files.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let prefix = self.dir.to_string_lossy().into_owned();
            let mut targets: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|m| m.starts_with(&prefix))
                .collect();
            targets.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in targets {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `deploy/container/local-base-images.sh KIND TAG` against our private storage.
fn make_base_image(podman: &Podman, kind: &str, tag: &str) -> Result<()> {
    let script = workspace_root().join("deploy/container/local-base-images.sh");
    let out = Command::new("timeout")
        .args(["--kill-after=10", "900"])
        .arg(&script)
        .args([kind, tag])
        .env("PODMAN_OPTS", podman.opts().join(" "))
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        out.status.success(),
        "{} {kind} failed ({}):\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Builds the image; returns how long the build took.
fn build_image(podman: &Podman, full: bool) -> Result<Duration> {
    let root = workspace_root();
    let mut args: Vec<String> =
        ["build", "--pull=never", "--isolation=chroot", "--format=docker", "--network=host", "--tag", IMAGE]
            .map(String::from)
            .to_vec();
    args.push(format!("--build-arg=RUNTIME_IMAGE={RUNTIME_BASE}"));
    args.push(format!("--file={}", root.join("Dockerfile").display()));
    if full {
        make_base_image(podman, "builder", BUILDER_BASE)?;
        args.push(format!("--build-arg=RUST_IMAGE={BUILDER_BASE}"));
        args.push("--build-arg=BINARIES_FROM=build".into());
        args.push(root.display().to_string());
    } else {
        // A context of just the binaries: the prebuilt stage needs nothing else.
        let ctx = podman.dir.join("ctx");
        std::fs::create_dir_all(ctx.join("dist"))?;
        for bin in ["derpfleet-relay", "derpfleet-stun"] {
            std::fs::copy(bin_path(bin), ctx.join("dist").join(bin))
                .with_context(|| format!("copying {bin}"))?;
        }
        args.push("--build-arg=BINARIES_FROM=prebuilt".into());
        args.push(ctx.display().to_string());
    }
    let started = Instant::now();
    let limit = if full { Duration::from_secs(1500) } else { Duration::from_secs(400) };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman.ok(limit, &args)?;
    Ok(started.elapsed())
}

/// `GET path` over plain HTTP/1.1; returns (status, headers+body text).
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.take(64 * 1024).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status line in {text:?}"))?;
    Ok((status, text))
}

/// Polls `GET path` until it answers, for at most `limit`.
fn wait_http(port: u16, path: &str, limit: Duration) -> Result<(u16, String)> {
    let deadline = Instant::now() + limit;
    loop {
        match http_get(port, path) {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() >= deadline => return Err(e.context(format!("GET {path} on :{port}"))),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Sends Tailscale's STUN Binding request to 127.0.0.1:`port` (retrying, bounded) and returns the
/// mapped address of the answer that carries our transaction ID.
fn stun_query(port: u16, limit: Duration) -> Result<(SocketAddr, SocketAddr)> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let ours = sock.local_addr()?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let txid = TxId::random();
    let req = build_request(txid);
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send_to(&req, ("127.0.0.1", port))?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let (got_txid, mapped) =
                parse_response(&buf[..n]).map_err(|e| anyhow::anyhow!("bad STUN answer: {e}"))?;
            ensure!(got_txid == txid, "STUN answer for another transaction");
            return Ok((ours, mapped));
        }
    }
    bail!("no STUN answer from 127.0.0.1:{port} within {limit:?}")
}

/// `podman inspect` of one object as JSON.
fn inspect(podman: &Podman, what: &[&str]) -> Result<serde_json::Value> {
    let mut args = vec!["inspect"];
    args.extend_from_slice(what);
    let out = podman.ok(Duration::from_secs(60), &args)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("podman inspect JSON")?;
    v.get(0).cloned().context("podman inspect returned nothing")
}

fn container_logs(podman: &Podman, name: &str) -> String {
    podman
        .run(Duration::from_secs(30), &["logs", name])
        .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
        .unwrap_or_default()
}

/// Common `podman run` options: runc (crun cannot use this host's hybrid cgroups), rlimits the sandbox
/// allows, host network so that we reach the container on loopback only.
const RUN_OPTS: &[&str] = &[
    "run",
    "--detach",
    "--runtime=runc",
    "--network=host",
    "--ulimit=nofile=4096:4096",
    "--ulimit=nproc=4096:4096",
    "--read-only",
];

fn check_image_config(podman: &Podman) -> Result<()> {
    let img = inspect(podman, &["--type=image", IMAGE])?;
    let cfg = &img["Config"];
    let user = cfg["User"].as_str().unwrap_or_default();
    ensure!(!user.is_empty() && !user.starts_with("0") && user != "root", "image runs as root: {user:?}");
    for port in ["443/tcp", "80/tcp", "3478/udp", "9090/tcp"] {
        ensure!(cfg["ExposedPorts"].get(port).is_some(), "port {port} not exposed: {}", cfg["ExposedPorts"]);
    }
    ensure!(cfg["StopSignal"].as_str() == Some("SIGTERM"), "StopSignal: {}", cfg["StopSignal"]);
    let hc = &img["Healthcheck"];
    ensure!(hc["Test"].as_array().is_some_and(|t| !t.is_empty()), "no HEALTHCHECK in the image: {img}");
    ensure!(
        cfg["Entrypoint"].as_array().is_some_and(|e| e[0] == "/usr/local/bin/derpfleet-relay"),
        "exec-form ENTRYPOINT of the relay expected: {}",
        cfg["Entrypoint"]
    );
    Ok(())
}

/// The standalone STUN responder shipped in the same image.
fn check_stun_binary(podman: &Podman) -> Result<()> {
    let port = unused_port();
    let addr = format!("127.0.0.1:{port}");
    let help = podman.help(Some("/usr/local/bin/derpfleet-stun"))?;
    derpfleet_e2e::require_flags("derpfleet-stun (in the image)", &help, &["a"])?;
    let mut args = RUN_OPTS.to_vec();
    args.extend(["--name", "e2e-stun", "--entrypoint", "/usr/local/bin/derpfleet-stun", IMAGE, "-a", &addr]);
    podman.ok(Duration::from_secs(60), &args)?;
    let (ours, mapped) = stun_query(port, Duration::from_secs(20)).with_context(|| {
        format!("derpfleet-stun in the image; logs:\n{}", container_logs(podman, "e2e-stun"))
    })?;
    assert_eq!(mapped, ours, "STUN must report our own loopback address and port");
    let top = podman.ok(Duration::from_secs(30), &["top", "e2e-stun", "user"])?;
    assert!(!top.lines().skip(1).any(|l| l.trim() == "root"), "derpfleet-stun runs as root:\n{top}");
    let stop_time = STOP_TIMEOUT_SECS.to_string();
    podman.ok(Duration::from_secs(STOP_TIMEOUT_SECS + 30), &["stop", "--time", &stop_time, "e2e-stun"])?;
    let st = inspect(podman, &["--type=container", "e2e-stun"])?;
    assert_eq!(st["State"]["ExitCode"], 0, "derpfleet-stun must exit 0 on SIGTERM: {}", st["State"]);
    Ok(())
}

/// The relay with the image's entrypoint: probe, STUN, health check, SIGTERM.
fn check_relay(podman: &Podman) -> Result<()> {
    let help = podman.help(None)?;
    derpfleet_e2e::require_flags("derpfleet-relay (in the image)", &help, RELAY_FLAGS_USED)?;
    let (http, stun, metrics) = (unused_port(), unused_port(), unused_port());
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let a = format!("127.0.0.1:{http}");
    let (stun_s, health_port) = (stun.to_string(), format!("DERPFLEET_HEALTH_PORT={http}"));
    let state = podman.dir.join("state");
    std::fs::create_dir_all(&state)?;
    // The state volume belongs to the image's non-root user, as an operator's volume would.
    let chown = Command::new("chown").arg("10001:10001").arg(&state).status()?;
    ensure!(chown.success(), "chown of the state dir failed");
    let vol = format!("{}:/var/lib/derper", state.display());
    let mut args = RUN_OPTS.to_vec();
    args.extend(["--name", "e2e-relay", "--env", &health_port, "--volume", &vol, IMAGE]);
    // Plain HTTP on a loopback port (not 443, certmode letsencrypt: no TLS, as derper), STUN beside it.
    args.extend(["-a", &a, "-http-port", "-1", "-stun", "-stun-port", &stun_s]);
    args.extend([
        "-c",
        "/var/lib/derper/derper.key",
        "-hostname",
        "127.0.0.1",
        "-metrics-addr",
        &metrics_addr,
    ]);
    podman.ok(Duration::from_secs(60), &args)?;
    let logs = || container_logs(podman, "e2e-relay");

    let (status, text) = wait_http(http, "/derp/probe", Duration::from_secs(30))
        .with_context(|| format!("relay logs:\n{}", logs()))?;
    assert_eq!(status, 200, "/derp/probe:\n{text}\nrelay logs:\n{}", logs());
    let (ours, mapped) =
        stun_query(stun, Duration::from_secs(20)).with_context(|| format!("relay logs:\n{}", logs()))?;
    assert_eq!(mapped, ours, "the relay's STUN must report our own address and port");
    let (status, text) = wait_http(metrics, "/metrics", Duration::from_secs(10))?;
    assert_eq!(status, 200, "/metrics on {metrics_addr}:\n{text}");
    ensure!(state.join("derper.key").exists(), "the node key was not written to the state volume");

    let hc = podman.run(Duration::from_secs(60), &["healthcheck", "run", "e2e-relay"])?;
    assert!(
        hc.status.success(),
        "HEALTHCHECK failed: {}{}",
        String::from_utf8_lossy(&hc.stdout),
        String::from_utf8_lossy(&hc.stderr)
    );

    // A graceful stop: SIGTERM starts the drain and the relay exits 0 on its own, well before podman gives up
    // and sends SIGKILL (137). 143 would mean the process died of the signal instead of draining.
    let t0 = Instant::now();
    let stop_time = STOP_TIMEOUT_SECS.to_string();
    podman.ok(Duration::from_secs(STOP_TIMEOUT_SECS + 30), &["stop", "--time", &stop_time, "e2e-relay"])?;
    let stop_took = t0.elapsed();
    let st = inspect(podman, &["--type=container", "e2e-relay"])?;
    let code = st["State"]["ExitCode"].as_i64().unwrap_or(-1);
    eprintln!("relay container stopped in {stop_took:?} with exit code {code}");
    assert_eq!(
        code,
        0,
        "the relay must exit 0 after SIGTERM (143 = killed by it, 137 = SIGKILLed); logs:\n{}",
        logs()
    );
    assert!(
        stop_took < Duration::from_secs(STOP_TIMEOUT_SECS),
        "stop took {stop_took:?}, not within the {STOP_TIMEOUT_SECS} s stop timeout"
    );
    Ok(())
}

#[test]
fn deploy_container_image() -> Result<()> {
    let full = !std::env::var("DERPFLEET_DEPLOY_PREBUILT").is_ok_and(|v| v == "1");
    let podman = Podman::new()?;
    let t0 = Instant::now();
    make_base_image(&podman, "runtime", RUNTIME_BASE)?;
    let took = build_image(&podman, full)?;
    eprintln!("base image ready in {:?}; image built in {took:?} (full build: {full})", t0.elapsed() - took);
    let size = podman.ok(Duration::from_secs(30), &["images", "--format", "{{.Size}}", IMAGE])?;
    eprintln!("image size: {}", size.trim());

    check_image_config(&podman)?;
    check_stun_binary(&podman)?;
    check_relay(&podman)?;
    eprintln!("deploy_container_image total {:?}", t0.elapsed());
    Ok(())
}
