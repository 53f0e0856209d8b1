//! `/metrics`: the results table in the Prometheus text format, with derpprobe's series names
//! (its prober package under the `derpprobe` namespace) plus the class-specific ones.
//!
//! The series are rendered from the table at scrape time rather than pushed into a recorder, so a
//! probe that leaves the DERP map leaves `/metrics` with it (derpprobe unregisters such probes
//! too), and every series of a probe carries the same labels: `name`, `class`, `region`,
//! `region_id`, `node` and, for mesh probes, `peer`.
//!
//! | series | type | meaning |
//! |---|---|---|
//! | `derpprobe_result` | gauge | latest run: 1 good, 0 bad (absent before the first run) |
//! | `derpprobe_latency_millis` | gauge | latest good run's class latency in ms (absent after a bad run) |
//! | `derpprobe_start_secs` / `derpprobe_end_secs` | gauge | Unix time the latest run started / ended |
//! | `derpprobe_interval_secs` | gauge | the probe's interval |
//! | `derpprobe_attempts_total{status="ok"\|"fail"}` | counter | runs so far |
//! | `derpprobe_seconds_total{status="ok"\|"fail"}` | counter | time spent in runs |
//! | `derpprobe_tls_cert_days_left` | gauge | tls: days until the leaf certificate expires |
//! | `derpprobe_bw_bytes_per_second` | gauge | bw: throughput of the latest transfer |
//! | `derpprobe_qd_packets_sent` / `derpprobe_qd_packets_lost` | gauge | qd: packets of the latest period |
//! | `derpprobe_derpmap_ok` | gauge | 1 when the latest DERP map read succeeded |
//! | `derpprobe_probes` | gauge | probes planned |

use std::fmt::Write;

use crate::results::{unix_secs, ProbeState, Results};

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels(st: &ProbeState) -> String {
    let s = &st.spec;
    let mut l = format!(
        "name=\"{}\",class=\"{}\",region=\"{}\",region_id=\"{}\",node=\"{}\"",
        escape(&s.name),
        s.class.as_str(),
        escape(&s.region),
        s.region_id,
        escape(&s.node.name)
    );
    if let Some(p) = &s.peer {
        let _ = write!(l, ",peer=\"{}\"", escape(&p.name));
    }
    l
}

struct Family<'a> {
    name: &'a str,
    kind: &'a str,
    help: &'a str,
    lines: Vec<String>,
}

/// Renders the whole exposition.
pub fn render(results: &Results) -> String {
    let probes = results.snapshot();
    let mut fams: Vec<Family> = [
        ("derpprobe_result", "gauge", "Latest probe result (1 = success, 0 = failure)"),
        ("derpprobe_latency_millis", "gauge", "Latest successful probe's latency (ms)"),
        ("derpprobe_start_secs", "gauge", "Latest probe start time (seconds since epoch)"),
        ("derpprobe_end_secs", "gauge", "Latest probe end time (seconds since epoch)"),
        ("derpprobe_interval_secs", "gauge", "Probe interval in seconds"),
        ("derpprobe_attempts_total", "counter", "Total number of probing attempts"),
        ("derpprobe_seconds_total", "counter", "Total amount of time spent executing the probe"),
        ("derpprobe_tls_cert_days_left", "gauge", "Days until the node's TLS leaf certificate expires"),
        ("derpprobe_bw_bytes_per_second", "gauge", "Throughput of the latest bandwidth probe"),
        ("derpprobe_qd_packets_sent", "gauge", "Queuing-delay packets sent in the latest period"),
        ("derpprobe_qd_packets_lost", "gauge", "Queuing-delay packets lost or late in the latest period"),
    ]
    .into_iter()
    .map(|(name, kind, help)| Family { name, kind, help, lines: Vec::new() })
    .collect();
    for st in &probes {
        let l = labels(st);
        let mut push = |i: usize, extra: &str, v: f64| {
            let name = fams[i].name.to_string();
            fams[i].lines.push(format!("{name}{{{l}{extra}}} {v}"));
        };
        if let Some(o) = &st.last {
            push(0, "", if o.ok() { 1.0 } else { 0.0 });
            if let Ok(m) = &o.result {
                push(1, "", m.latency.as_secs_f64() * 1e3);
                if let Some(d) = m.cert_days_left {
                    push(7, "", d);
                }
                if let Some(b) = m.bytes_per_second {
                    push(8, "", b);
                }
                if let Some((sent, lost)) = m.qd_packets {
                    push(9, "", sent as f64);
                    push(10, "", lost as f64);
                }
            }
            push(2, "", unix_secs(o.started));
            push(3, "", unix_secs(o.ended));
        }
        push(4, "", st.spec.interval.as_secs_f64());
        let c = &st.counters;
        push(5, ",status=\"ok\"", c.ok as f64);
        push(5, ",status=\"fail\"", c.fail as f64);
        push(6, ",status=\"ok\"", c.ok_seconds);
        push(6, ",status=\"fail\"", c.fail_seconds);
    }
    let mut out = String::new();
    for f in &fams {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", f.name, f.help, f.name, f.kind);
        for line in &f.lines {
            out.push_str(line);
            out.push('\n');
        }
    }
    let map_ok = if results.map_error().is_some() { 0 } else { 1 };
    let _ = writeln!(
        out,
        "# HELP derpprobe_derpmap_ok 1 when the latest DERP map read succeeded\n# TYPE derpprobe_derpmap_ok gauge\nderpprobe_derpmap_ok {map_ok}"
    );
    let _ = writeln!(
        out,
        "# HELP derpprobe_probes Probes planned from the DERP map\n# TYPE derpprobe_probes gauge\nderpprobe_probes {}",
        probes.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use derpfleet_proto::derpmap::DerpNode;

    use super::*;
    use crate::plan::{Class, ProbeSpec};
    use crate::results::{Measured, Outcome};

    fn spec(name: &str, class: Class, peer: bool) -> ProbeSpec {
        let node = |n: &str| DerpNode {
            name: n.into(),
            region_id: 1,
            host_name: "h\"x".into(),
            ..Default::default()
        };
        ProbeSpec {
            name: name.into(),
            class,
            region_id: 1,
            region: "aa".into(),
            node: node("1a"),
            peer: peer.then(|| node("1b")),
            family: None,
            interval: Duration::from_secs(15),
        }
    }

    #[test]
    fn renders_result_latency_counters_and_class_series() {
        let r = Results::new();
        let (tls, mesh) =
            (spec("derp/aa/1a/tls", Class::Tls, false), spec("derp/aa/1a/1b/mesh", Class::Mesh, true));
        r.set_plan(&[tls.clone(), mesh.clone()]);
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let ok =
            Measured { latency: Duration::from_millis(12), cert_days_left: Some(30.5), ..Default::default() };
        r.finished(&tls.name, Outcome { result: Ok(ok), started: t, ended: t + Duration::from_secs(1) });
        r.finished(&mesh.name, Outcome { result: Err("no".into()), started: t, ended: t });
        let text = render(&r);
        let tl = r#"name="derp/aa/1a/tls",class="tls",region="aa",region_id="1",node="1a""#;
        let ml = r#"name="derp/aa/1a/1b/mesh",class="mesh",region="aa",region_id="1",node="1a",peer="1b""#;
        for want in [
            format!("derpprobe_result{{{tl}}} 1"),
            format!("derpprobe_latency_millis{{{tl}}} 12"),
            format!("derpprobe_tls_cert_days_left{{{tl}}} 30.5"),
            format!("derpprobe_end_secs{{{tl}}} 101"),
            format!("derpprobe_attempts_total{{{tl},status=\"ok\"}} 1"),
            format!("derpprobe_result{{{ml}}} 0"),
            format!("derpprobe_attempts_total{{{ml},status=\"fail\"}} 1"),
            "derpprobe_derpmap_ok 1".to_string(),
            "derpprobe_probes 2".to_string(),
        ] {
            assert!(text.contains(&want), "missing {want} in\n{text}");
        }
        assert!(!text.contains(&format!("derpprobe_latency_millis{{{ml}}}")), "no latency after a bad run");
    }
}
