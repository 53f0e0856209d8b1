//! The prober as a service (`-listen`): `/metrics` has per-probe result and latency series, and
//! the status page, rendered by headless Chromium (Debian `chromium`, background networking off),
//! shows green cells for the live nodes and red ones for the dead region: checked in the DOM after
//! the page's script ran (`--dump-dom`) and in the pixels of screenshots (desktop and phone width).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, temp_dir, unused_port, wait_until, Fleet, Proc};

/// Runs chromium headless with `args` for `url`, killed after 90 s; returns stdout.
fn chromium(profile: &Path, args: &[String], url: &str) -> String {
    let mut child = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update"])
        .args([
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=4000")
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium (Debian package chromium) runs");
    let mut out = String::new();
    let reader = {
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        })
    };
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    out.push_str(&reader.join().unwrap());
    out
}

/// Pixels of the PNG at `path` close to `rgb`.
fn count_colour(path: &Path, rgb: (u8, u8, u8)) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let near = |a: u8, b: u8| a.abs_diff(b) <= 6;
    buf[..info.buffer_size()]
        .chunks_exact(channels)
        .filter(|p| near(p[0], rgb.0) && near(p[1], rgb.1) && near(p[2], rgb.2))
        .count()
}

const GOOD: (u8, u8, u8) = (0x1e, 0x9e, 0x3e);
const BAD: (u8, u8, u8) = (0xd3, 0x2f, 0x2f);

#[test]
fn metrics_series_and_status_page_rendered_in_headless_chromium() {
    let fleet = Fleet::start("page");
    let port = unused_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let log = std::fs::File::create(fleet.dir.path().join("probe.log")).unwrap();
    let child = fleet
        .prober()
        .args(["-derp-map", &fleet.map_url(), "-listen", &format!("127.0.0.1:{port}"), "-spread=false"])
        .args([
            "-interval",
            "2s",
            "-mesh-interval",
            "2s",
            "-stun-interval",
            "2s",
            "-tls-interval",
            "2s",
            "-location",
            "testlab",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _prober = Proc { child, what: "prober".into() };

    // Every probe has a result.
    wait_until(Duration::from_secs(30), "every probe finished once", || {
        let Some((200, body)) = http_get(addr, "/status.json") else { return false };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["probes"].as_array().is_some_and(|p| p.len() == 14 && p.iter().all(|p| !p["ok"].is_null()))
    });
    assert_eq!(http_get(addr, "/healthz").unwrap(), (200, "ok\n".to_string()));
    let (status, metrics) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    let series = |name: &str, probe: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{name=\"{probe}\",")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    for probe in [
        "derp/one/1a/derp",
        "derp/one/1a/tls",
        "derp/one/1b/stun",
        "derp/one/1a/1b/mesh",
        "derp/one/1b/1a/mesh",
        "derp/two/2a/derp",
    ] {
        assert_eq!(series("derpprobe_result", probe), Some(1.0), "{probe}:\n{metrics}");
        assert!(series("derpprobe_latency_millis", probe).is_some_and(|v| v > 0.0), "{probe}");
        assert!(series("derpprobe_attempts_total", probe).is_some_and(|v| v >= 1.0), "{probe}");
    }
    for probe in ["derp/dead/3a/derp", "derp/dead/3a/tls", "derp/dead/3a/stun"] {
        assert_eq!(series("derpprobe_result", probe), Some(0.0), "{probe}");
        assert_eq!(series("derpprobe_latency_millis", probe), None, "{probe}");
    }
    assert!(series("derpprobe_tls_cert_days_left", "derp/two/2a/tls").is_some_and(|d| d > 300.0));
    assert!(metrics.contains("derpprobe_derpmap_ok 1") && metrics.contains("derpprobe_probes 14"));

    // The DOM after the page's script ran.
    let profile = temp_dir("chromium");
    let url = format!("http://127.0.0.1:{port}/");
    let dom = chromium(profile.path(), &["--dump-dom".into()], &url);
    assert!(dom.contains("data-rendered=\"14\""), "the script rendered all 14 probes:\n{dom}");
    assert!(dom.contains("11 good, 3 bad"), "summary:\n{dom}");
    assert!(dom.contains("probing from testlab"), "{dom}");
    let row = |node: &str| {
        let start =
            dom.find(&format!("data-node=\"{node}\"")).unwrap_or_else(|| panic!("row {node}:\n{dom}"));
        let end = dom[start..].find("</tr>").unwrap() + start;
        dom[start..end].to_string()
    };
    for node in ["1a", "1b", "2a"] {
        let r = row(node);
        assert!(!r.contains("cell bad"), "{node} is all good: {r}");
        assert!(r.matches("cell good").count() >= 3, "{node}: derp, tls, stun (and mesh) green: {r}");
    }
    let dead = row("3a");
    assert_eq!(dead.matches("cell bad").count(), 3, "dead node: derp, tls, stun red: {dead}");
    assert!(dead.contains("refused"), "the dead node's last error is shown: {dead}");
    assert!(dom.contains("<td class=\"cell bad\">down</td>"), "the latency map shows the dead region down");

    // The pixels: green and red cells at desktop and phone widths.
    for (w, h) in [(1000, 1000), (390, 844)] {
        let shot = profile.path().join(format!("shot-{w}.png"));
        chromium(
            profile.path(),
            &[format!("--window-size={w},{h}"), format!("--screenshot={}", shot.display())],
            &url,
        );
        let (green, red) = (count_colour(&shot, GOOD), count_colour(&shot, BAD));
        assert!(green > 2000, "{w}x{h}: green cells visible ({green} px)");
        assert!(red > 1000, "{w}x{h}: red cells visible ({red} px)");
    }

    // The service re-reads the map every -interval: the dead region leaves, and its series with it.
    let mut map: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&fleet.map_path).unwrap()).unwrap();
    map["Regions"].as_object_mut().unwrap().remove("3");
    std::fs::write(&fleet.map_path, serde_json::to_vec(&map).unwrap()).unwrap();
    wait_until(Duration::from_secs(20), "the dead region's probes removed", || {
        http_get(addr, "/metrics")
            .is_some_and(|(_, m)| m.contains("derpprobe_probes 11") && !m.contains("node=\"3a\""))
    });
    // A map that becomes unreadable keeps the previous plan and says so.
    std::fs::write(&fleet.map_path, "{not json").unwrap();
    wait_until(Duration::from_secs(20), "map error reported", || {
        http_get(addr, "/metrics")
            .is_some_and(|(_, m)| m.contains("derpprobe_derpmap_ok 0") && m.contains("derpprobe_probes 11"))
    });
}
