//! The demo's report: the dashboard's key panels drawn from Prometheus' `query_range` results
//! into one self-contained HTML file with inline SVG line charts (no JavaScript, no fonts or
//! styles fetched), because Grafana cannot run here. The panel queries are read from
//! dashboards/ulog.json, so the report shows what the dashboard would.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{encode, Prom};

/// Panels drawn, by title in dashboards/ulog.json.
pub const PANELS: &[&str] = &[
    "Request rate by type",
    "Log requests per mirror write",
    "Mirror writes",
    "Agent service time percentiles",
    "Kernel round trip vs agent service time (p99)",
    "Kernel round trip: three stages (mean)",
    "FLUSH and MARK_REGION within the SLO threshold",
    "Resync progress",
    "Regions by state",
    "How long regions stay dirty",
    "Agent CPU",
    "Agent resident memory",
];

const COLORS: &[&str] =
    &["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Grafana's variables for a query over the whole demo: every agent and log, a rate interval
/// of four scrapes.
pub fn substitute(expr: &str, scrape_s: u64) -> String {
    expr.replace("$__rate_interval", &format!("{}s", 4 * scrape_s.max(1)))
        .replace("$__interval", &format!("{}s", scrape_s.max(1)))
        .replace("\"$job\"", "\".*\"")
        .replace("\"$instance\"", "\".*\"")
        .replace("\"$log\"", "\".*\"")
}

/// Grafana's legend format: `{{label}}` replaced by the series' label values.
fn legend(fmt: &str, metric: &Value) -> String {
    let mut out = fmt.to_string();
    if let Some(m) = metric.as_object() {
        for (k, v) in m {
            out = out.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or(""));
        }
    }
    // Labels the series does not have.
    while let (Some(a), Some(b)) = (out.find("{{"), out.find("}}")) {
        if b < a {
            break;
        }
        out.replace_range(a..b + 2, "");
    }
    let out = out.trim().to_string();
    if out.is_empty() {
        metric.to_string()
    } else {
        out
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A value in the panel's unit, short.
fn fmt_value(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    match unit {
        "s" => {
            let a = v.abs();
            if a == 0.0 {
                "0".into()
            } else if a < 1e-3 {
                format!("{:.1} µs", v * 1e6)
            } else if a < 1.0 {
                format!("{:.2} ms", v * 1e3)
            } else {
                format!("{v:.2} s")
            }
        }
        "percentunit" => format!("{:.2}%", v * 100.0),
        "bytes" => format!("{:.1} MiB", v / 1048576.0),
        "reqps" => format!("{v:.1}/s"),
        _ if v.abs() >= 1000.0 || v == v.round() => format!("{v:.0}"),
        _ if v.abs() >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.3}"),
    }
}

/// One chart: SVG polylines over [t0, t1], y from min(0, lo) to hi.
fn svg(series: &[Series], t0: f64, t1: f64, unit: &str) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 220.0, 80.0, 10.0, 10.0, 24.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let vals = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|v| v.is_finite());
    let (mut lo, mut hi) = vals.fold((0.0f64, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi <= lo {
        hi = lo + 1.0;
    }
    if lo > 0.0 {
        lo = 0.0;
    }
    let x = |t: f64| left + (t - t0) / (t1 - t0).max(1e-9) * pw;
    let y = |v: f64| top + ph - (v - lo) / (hi - lo) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">\
         <rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"#fafafa\" stroke=\"#ccc\"/>"
    );
    for i in 0..=4 {
        let v = lo + (hi - lo) * f64::from(i) / 4.0;
        let yy = y(v);
        let _ = write!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#e4e4e4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + pw,
            left - 4.0,
            yy + 4.0,
            esc(&fmt_value(v, unit))
        );
    }
    let span = t1 - t0;
    for i in 0..=4 {
        let t = t0 + span * f64::from(i) / 4.0;
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{}\">+{:.0} s</text>",
            x(t),
            h - 6.0,
            match i {
                0 => "start",
                4 => "end",
                _ => "middle",
            },
            t - t0
        );
    }
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        // Gaps (missing steps) split the line.
        let step = se.points.windows(2).map(|w| w[1].0 - w[0].0).fold(f64::MAX, f64::min);
        let mut seg = String::new();
        let mut prev: Option<f64> = None;
        for &(t, v) in &se.points {
            if !v.is_finite() {
                continue;
            }
            if prev.is_some_and(|p| t - p > step * 1.5) && !seg.is_empty() {
                let _ = write!(s, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{seg}\"/>");
                seg.clear();
            }
            let _ = write!(seg, "{:.1},{:.1} ", x(t), y(v));
            prev = Some(t);
        }
        if !seg.is_empty() {
            let _ = write!(s, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{seg}\"/>");
        }
    }
    s + "</svg>"
}

/// Writes the report; returns the number of panels drawn with data.
pub fn write(prom: &Prom, dashboard: &Path, t0: f64, t1: f64, scrape_s: u64, out: &Path) -> Result<usize> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(dashboard)?)
        .with_context(|| format!("{} is not JSON", dashboard.display()))?;
    let panels = d["panels"].as_array().context("dashboard without panels")?;
    let step = ((t1 - t0) / 300.0).max(scrape_s as f64).ceil();
    let mut body = String::new();
    let mut drawn = 0;
    for title in PANELS {
        let Some(p) = panels.iter().find(|p| p["title"] == *title) else { continue };
        let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("short");
        let mut series = Vec::new();
        let mut errors = Vec::new();
        for t in p["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let expr = substitute(t["expr"].as_str().unwrap_or(""), scrape_s);
            let path = format!("/api/v1/query_range?query={}&start={t0:.3}&end={t1:.3}&step={step}", encode(&expr));
            match prom.api(&path) {
                Ok(data) => {
                    for r in data["result"].as_array().map(Vec::as_slice).unwrap_or_default() {
                        let points = r["values"]
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default()
                            .iter()
                            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_str()?.parse::<f64>().ok()?)))
                            .collect();
                        series.push(Series {
                            name: legend(t["legendFormat"].as_str().unwrap_or(""), &r["metric"]),
                            points,
                        });
                    }
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        series.sort_by(|a, b| a.name.cmp(&b.name));
        series.truncate(COLORS.len());
        let _ = write!(
            body,
            "<section><h2>{}</h2><p class=\"d\">{}</p>",
            esc(title),
            esc(p["description"].as_str().unwrap_or(""))
        );
        if series.is_empty() {
            let why = if errors.is_empty() {
                "no data (kernel-side panels need the eBPF probe)".to_string()
            } else {
                errors.join("; ")
            };
            let _ = write!(body, "<p class=\"empty\">{}</p></section>", esc(&why));
            continue;
        }
        drawn += 1;
        body += &svg(&series, t0, t1, unit);
        body += "<ul>";
        for (i, s) in series.iter().enumerate() {
            let last = s.points.iter().rev().map(|p| p.1).find(|v| v.is_finite()).unwrap_or(f64::NAN);
            let _ = write!(
                body,
                "<li><span style=\"background:{}\"></span>{} <b>{}</b></li>",
                COLORS[i % COLORS.len()],
                esc(&s.name),
                esc(&fmt_value(last, unit))
            );
        }
        body += "</ul></section>";
    }
    // Alerts at the end of the run.
    let alerts = prom.api("/api/v1/alerts").ok();
    let mut alert_rows = String::new();
    for al in alerts.as_ref().and_then(|a| a["alerts"].as_array()).map(Vec::as_slice).unwrap_or_default() {
        let _ = write!(
            alert_rows,
            "<li>{} ({}) {}</li>",
            esc(al["labels"]["alertname"].as_str().unwrap_or("")),
            esc(al["state"].as_str().unwrap_or("")),
            esc(al["annotations"]["summary"].as_str().unwrap_or(""))
        );
    }
    if alert_rows.is_empty() {
        alert_rows = "<li>none pending or firing</li>".into();
    }
    let html = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>ulog demo report</title><style>\
         body{{font-family:sans-serif;margin:20px;color:#222}} section{{display:inline-block;vertical-align:top;margin:0 20px 24px 0;width:770px}}\
         h2{{font-size:15px;margin:4px 0}} p.d{{font-size:12px;color:#555;margin:2px 0 6px}} p.empty{{color:#999}}\
         ul{{list-style:none;padding:0;margin:4px 0;font-size:12px;columns:2}} li span{{display:inline-block;width:10px;height:10px;margin-right:5px}}\
         </style></head><body><h1>ulog demo: {span:.0} s on a real kernel</h1>\
         <p>Drawn by <code>cargo xtask demo</code> from Prometheus <code>query_range</code> (step {step} s) with the queries of \
         <code>dashboards/ulog.json</code> ($job, $instance and $log = all, $__rate_interval = {ri} s). Legends show the last value.</p>\
         <h2>Alerts at the end</h2><ul>{alert_rows}</ul>{body}</body></html>",
        span = t1 - t0,
        ri = 4 * scrape_s.max(1)
    );
    std::fs::write(out, html).with_context(|| format!("write {}", out.display()))?;
    Ok(drawn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legends_and_values() {
        let m = serde_json::json!({"type": "FLUSH", "log": "a"});
        assert_eq!(legend("p99 {{type}}", &m), "p99 FLUSH");
        assert_eq!(legend("{{log}} {{state}}", &m), "a");
        assert_eq!(fmt_value(0.000_05, "s"), "50.0 µs");
        assert_eq!(fmt_value(0.5, "percentunit"), "50.00%");
        assert_eq!(
            (fmt_value(768.0, "short"), fmt_value(12.34, "short"), fmt_value(0.5, "short")),
            ("768".into(), "12.3".into(), "0.500".into())
        );
        assert_eq!(substitute("rate(x{log=~\"$log\"}[$__rate_interval])", 2), "rate(x{log=~\".*\"}[8s])");
    }

    #[test]
    fn every_report_panel_is_in_the_dashboard() {
        let p = crate::setup::repo_root().unwrap().join("dashboards/ulog.json");
        let d: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let titles: Vec<&str> = d["panels"].as_array().unwrap().iter().filter_map(|p| p["title"].as_str()).collect();
        for t in PANELS {
            assert!(titles.contains(t), "{t} is not a panel of dashboards/ulog.json");
        }
    }

    #[test]
    fn charts_are_svg_with_one_line_per_series() {
        let s = vec![
            Series { name: "a".into(), points: vec![(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)] },
            Series { name: "b".into(), points: vec![(0.0, 0.0), (1.0, f64::NAN), (2.0, 1.0)] },
        ];
        let out = svg(&s, 0.0, 2.0, "short");
        assert!(out.starts_with("<svg") && out.ends_with("</svg>"));
        assert_eq!(out.matches("<polyline").count(), 3, "b is split at its gap: {out}");
    }
}
