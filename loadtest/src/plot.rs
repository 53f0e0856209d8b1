//! Hand-written SVG line charts: a latency distribution (percentile on a "nines" axis) or events
//! per second over time.

use std::fmt::Write;

const W: f64 = 800.0;
const H: f64 = 450.0;
const L: f64 = 80.0;
const R: f64 = 30.0;
const T: f64 = 50.0;
const B: f64 = 60.0;

/// Latency by percentile: x is -log10(1 - p/100) (0 = p0, 1 = p90, 2 = p99, ...), capped at 5.
pub fn latency_chart(title: &str, points: &[(f64, f64)]) -> String {
    let nines = |p: f64| (-(1.0 - p / 100.0).max(1e-5).log10()).min(5.0);
    let pts: Vec<(f64, f64)> = points.iter().map(|&(p, v)| (nines(p), v)).collect();
    let ticks: Vec<(f64, String)> =
        [(0.0, "0%"), (1.0, "90%"), (2.0, "99%"), (3.0, "99.9%"), (4.0, "99.99%"), (5.0, "max")]
            .iter()
            .map(|(x, l)| (*x, l.to_string()))
            .collect();
    chart(title, "percentile", "latency (µs)", &pts, (0.0, 5.0), &ticks)
}

/// Events per second over time (one point per second).
pub fn timeline_chart(title: &str, y_label: &str, per_sec: &[u64]) -> String {
    let pts: Vec<(f64, f64)> = per_sec.iter().enumerate().map(|(i, &c)| (i as f64 + 0.5, c as f64)).collect();
    let xmax = (per_sec.len() as f64).max(1.0);
    let step = (xmax / 10.0).ceil().max(1.0);
    let ticks: Vec<(f64, String)> =
        (0..).map(|i| i as f64 * step).take_while(|&x| x <= xmax).map(|x| (x, format!("{x}"))).collect();
    chart(title, "time (s)", y_label, &pts, (0.0, xmax), &ticks)
}

fn chart(
    title: &str,
    xl: &str,
    yl: &str,
    pts: &[(f64, f64)],
    xr: (f64, f64),
    xticks: &[(f64, String)],
) -> String {
    let ymax = pts.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let sx = |x: f64| L + (x - xr.0) / (xr.1 - xr.0).max(1e-9) * (W - L - R);
    let sy = |y: f64| H - B - y / ymax * (H - T - B);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="25" text-anchor="middle" font-size="16">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        r#"<line x1="{L}" y1="{y}" x2="{x2}" y2="{y}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{y}" stroke="black"/>"#,
        y = H - B,
        x2 = W - R
    );
    for (x, label) in xticks {
        let px = sx(*x);
        let _ = writeln!(
            s,
            r#"<line x1="{px:.1}" y1="{y0}" x2="{px:.1}" y2="{y1}" stroke="black"/><text x="{px:.1}" y="{ty}" text-anchor="middle">{}</text>"#,
            esc(label),
            y0 = H - B,
            y1 = H - B + 5.0,
            ty = H - B + 20.0
        );
    }
    for i in 0..=5 {
        let v = ymax / 1.1 * i as f64 / 5.0;
        let py = sy(v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{py:.1}" x2="{x2}" y2="{py:.1}" stroke="#ddd"/><text x="{tx}" y="{py:.1}" text-anchor="end" dominant-baseline="middle">{}</text>"##,
            fmt_num(v),
            x2 = W - R,
            tx = L - 6.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (L + W - R) / 2.0,
        H - 15.0,
        esc(xl)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{y}" text-anchor="middle" transform="rotate(-90 18 {y})">{}</text>"#,
        esc(yl),
        y = (T + H - B) / 2.0
    );
    let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
        path.join(" ")
    );
    for &(x, y) in pts {
        let _ = writeln!(s, r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#1f77b4"/>"##, sx(x), sy(y));
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_all_points() {
        let s = latency_chart("a <b>", &[(0.0, 10.0), (50.0, 20.0), (99.0, 30.0), (100.0, 90.0)]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<circle").count(), 4);
        assert!(s.contains("a &lt;b&gt;"));
        let t = timeline_chart("t", "packets/s", &[5, 7, 9]);
        assert_eq!(t.matches("<circle").count(), 3);
        assert!(timeline_chart("t", "y", &[]).contains("</svg>"));
    }
}
