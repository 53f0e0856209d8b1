//! Hand-written SVG line charts: a latency distribution (percentile on a "nines" axis, latency on
//! a log axis so p50 to p99.9 are all readable) or events per second over time (warm-up and
//! measurement window marked; the drain after the window is left out, since its falling count
//! is the end of the run, not a collapse). Axes use round ticks (1, 2, 5 × 10^k); a subtitle shows
//! the run's configuration.

use std::fmt::Write;

const W: f64 = 800.0;
const H: f64 = 470.0;
const L: f64 = 80.0;
const R: f64 = 30.0;
const T: f64 = 70.0;
const B: f64 = 60.0;

/// Latency by percentile: x is -log10(1 - p/100) (0 = p0, 1 = p90, 2 = p99, ...), capped at 5;
/// y (µs) on a log axis.
pub fn latency_chart(title: &str, subtitle: &str, points: &[(f64, f64)]) -> String {
    let nines = |p: f64| (-(1.0 - p / 100.0).max(1e-5).log10()).min(5.0);
    let pts: Vec<(f64, f64)> = points.iter().map(|&(p, v)| (nines(p), v.max(0.001))).collect();
    let xticks: Vec<(f64, String)> = [
        (0.0, "0%"),
        (nines(50.0), "50%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
        (5.0, "max"),
    ]
    .iter()
    .map(|(x, l)| (*x, l.to_string()))
    .collect();
    let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let (y0, y1, yticks) = log_ticks(if lo.is_finite() { lo } else { 1.0 }, hi.max(1.0));
    Chart {
        title,
        subtitle,
        xl: "percentile",
        yl: "latency (µs, log scale)",
        x: (0.0, 5.0),
        y: (y0, y1),
        log_y: true,
        xticks,
        yticks,
        bands: Vec::new(),
    }
    .draw(&pts)
}

/// Events per second over time (one point per second). `window` (start, end in seconds) marks
/// the warm-up before it and leaves out the seconds after it.
pub fn timeline_chart(
    title: &str,
    subtitle: &str,
    y_label: &str,
    per_sec: &[u64],
    window: Option<(f64, f64)>,
) -> String {
    let shown = match window {
        // Whole seconds up to the window's end: the drain after it is not plotted.
        Some((_, end)) => per_sec.len().min(end.floor().max(1.0) as usize),
        None => per_sec.len(),
    };
    let pts: Vec<(f64, f64)> =
        per_sec[..shown].iter().enumerate().map(|(i, &c)| (i as f64 + 0.5, c as f64)).collect();
    let xmax = window.map(|w| w.1).unwrap_or(0.0).max(shown as f64).max(1.0);
    let xs = nice_step(xmax, 10);
    let xticks =
        (0..).map(|i| i as f64 * xs).take_while(|&x| x <= xmax + 1e-9).map(|x| (x, fmt_num(x))).collect();
    let ymax = pts.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1.0);
    let ys = nice_step(ymax * 1.05, 6);
    let ytop = (ymax * 1.05 / ys).ceil() * ys;
    let yticks =
        (0..).map(|i| i as f64 * ys).take_while(|&y| y <= ytop + 1e-9).map(|y| (y, fmt_num(y))).collect();
    let mut bands = Vec::new();
    if let Some((start, end)) = window {
        if start > 0.0 {
            bands.push(Band { x0: 0.0, x1: start, label: "warm-up", fill: "#eeeeee" });
        }
        bands.push(Band { x0: start, x1: end, label: "measurement window", fill: "#e8f1fa" });
    }
    Chart {
        title,
        subtitle,
        xl: "time since traffic started (s)",
        yl: y_label,
        x: (0.0, xmax),
        y: (0.0, ytop),
        log_y: false,
        xticks,
        yticks,
        bands,
    }
    .draw(&pts)
}

/// A shaded stretch of the x axis.
struct Band {
    x0: f64,
    x1: f64,
    label: &'static str,
    fill: &'static str,
}

struct Chart<'a> {
    title: &'a str,
    subtitle: &'a str,
    xl: &'a str,
    yl: &'a str,
    x: (f64, f64),
    y: (f64, f64),
    log_y: bool,
    xticks: Vec<(f64, String)>,
    yticks: Vec<(f64, String)>,
    bands: Vec<Band>,
}

impl Chart<'_> {
    fn sx(&self, x: f64) -> f64 {
        L + (x - self.x.0) / (self.x.1 - self.x.0).max(1e-9) * (W - L - R)
    }

    fn sy(&self, y: f64) -> f64 {
        let (a, b, v) = if self.log_y {
            (self.y.0.log10(), self.y.1.log10(), y.max(self.y.0).log10())
        } else {
            (self.y.0, self.y.1, y)
        };
        H - B - (v - a) / (b - a).max(1e-9) * (H - T - B)
    }

    fn draw(&self, pts: &[(f64, f64)]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="16">{}</text>"#,
            W / 2.0,
            esc(self.title)
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="44" text-anchor="middle" font-size="11" fill="#444">{}</text>"##,
            W / 2.0,
            esc(self.subtitle)
        );
        for b in &self.bands {
            let (x0, x1) = (self.sx(b.x0), self.sx(b.x1.min(self.x.1)));
            let _ = writeln!(
                s,
                r##"<rect x="{x0:.1}" y="{T}" width="{w:.1}" height="{h}" fill="{}"/><text x="{tx:.1}" y="{ty}" text-anchor="middle" font-size="11" fill="#666">{}</text>"##,
                b.fill,
                esc(b.label),
                w = (x1 - x0).max(0.0),
                h = H - T - B,
                tx = (x0 + x1) / 2.0,
                ty = T + 14.0
            );
        }
        let _ = writeln!(
            s,
            r#"<line x1="{L}" y1="{y}" x2="{x2}" y2="{y}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{y}" stroke="black"/>"#,
            y = H - B,
            x2 = W - R
        );
        for (x, label) in &self.xticks {
            let px = self.sx(*x);
            let _ = writeln!(
                s,
                r#"<line x1="{px:.1}" y1="{y0}" x2="{px:.1}" y2="{y1}" stroke="black"/><text x="{px:.1}" y="{ty}" text-anchor="middle">{}</text>"#,
                esc(label),
                y0 = H - B,
                y1 = H - B + 5.0,
                ty = H - B + 20.0
            );
        }
        for (v, label) in &self.yticks {
            let py = self.sy(*v);
            let _ = writeln!(
                s,
                r##"<line x1="{L}" y1="{py:.1}" x2="{x2}" y2="{py:.1}" stroke="#ddd"/><text x="{tx}" y="{py:.1}" text-anchor="end" dominant-baseline="middle">{}</text>"##,
                esc(label),
                x2 = W - R,
                tx = L - 6.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (L + W - R) / 2.0,
            H - 15.0,
            esc(self.xl)
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{y}" text-anchor="middle" transform="rotate(-90 18 {y})">{}</text>"#,
            esc(self.yl),
            y = (T + H - B) / 2.0
        );
        let path: Vec<String> =
            pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", self.sx(x), self.sy(y))).collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
            path.join(" ")
        );
        for &(x, y) in pts {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#1f77b4"/>"##,
                self.sx(x),
                self.sy(y)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// A round step (1, 2 or 5 × 10^k) giving at most about `max_ticks` ticks over `0..=range`.
pub fn nice_step(range: f64, max_ticks: usize) -> f64 {
    let raw = (range / max_ticks.max(1) as f64).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(10.0 * mag)
}

/// Decade bounds around `lo..=hi` and ticks at 1, 2 and 5 × 10^k (decades only past 3 decades).
fn log_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<(f64, String)>) {
    let a = lo.max(1e-3).log10().floor() as i32;
    let b = (hi.max(lo * 1.0001).log10().ceil() as i32).max(a + 1);
    let mults: &[f64] = if b - a > 3 { &[1.0] } else { &[1.0, 2.0, 5.0] };
    let mut ticks = Vec::new();
    for e in a..=b {
        for m in mults {
            let v = m * 10f64.powi(e);
            if v <= 10f64.powi(b) * 1.0001 {
                ticks.push((v, fmt_num(v)));
            }
        }
    }
    (10f64.powi(a), 10f64.powi(b), ticks)
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_all_points() {
        let s = latency_chart("a <b>", "pairs=2", &[(0.0, 10.0), (50.0, 20.0), (99.0, 30.0), (100.0, 90.0)]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<circle").count(), 4);
        assert!(s.contains("a &lt;b&gt;") && s.contains("pairs=2") && s.contains("log scale"));
        // Decade ticks of a log axis from 10 to 100 µs.
        assert!(s.contains(">10<") && s.contains(">100<"), "{s}");
        let t = timeline_chart("t", "", "packets/s", &[5, 7, 9], None);
        assert_eq!(t.matches("<circle").count(), 3);
        assert!(timeline_chart("t", "", "y", &[], None).contains("</svg>"));
    }

    #[test]
    fn timeline_marks_the_window_and_leaves_out_the_drain() {
        // 1 s warm-up, 3 s window, then two drain seconds with few packets.
        let t = timeline_chart("t", "cfg", "packets/s", &[900, 1000, 1000, 1000, 40, 1], Some((1.0, 4.0)));
        assert_eq!(t.matches("<circle").count(), 4, "{t}");
        assert!(t.contains("warm-up") && t.contains("measurement window"));
    }

    #[test]
    fn round_steps() {
        assert_eq!(nice_step(10.0, 10), 1.0);
        assert_eq!(nice_step(11.0, 10), 2.0);
        assert_eq!(nice_step(43_000.0, 6), 10_000.0);
        assert_eq!(nice_step(0.7, 10), 0.1);
        assert_eq!(fmt_num(40_000.0), "40k");
        assert_eq!(fmt_num(2.5), "2.5");
    }
}
