//! The operator-facing files in `dashboards/` against the real tools: `promtool check rules` and
//! `promtool test rules` (a firing and a quiet case for every alert), every alert's summary,
//! description and runbook section (dashboards/runbooks.md), SLO thresholds that are
//! real bucket edges, the Grafana dashboard's file-provisionable structure (job and instance
//! filters, the SLO threshold read from the rules, one unit per axis), and a real
//! Prometheus (Debian's `prometheus`) scraping a live agent under kernel-peer traffic that
//! runs every PromQL expression of the dashboard and of the rules through its HTTP API.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use ulog_agent::metrics::histogram::{edge_seconds, KERNEL_EDGES_NS, LATENCY_EDGES_NS, PER_LOG_SLO_EDGES_NS};

use crate::api;
use crate::common::*;

/// The rule files Prometheus loads (`rule_files:`), in dashboards/.
const RULE_FILES: &[&str] = &["ulog-rules.yml", "ulog-slo.yml"];

fn dashboards_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards"))
}

fn read(name: &str) -> String {
    let p = dashboards_dir().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs promtool; (success, stdout + stderr).
fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool").args(args).current_dir(dashboards_dir()).output().unwrap_or_else(|e| {
        panic!("cannot run promtool ({e}): install Debian's `prometheus` package (`cargo xtask setup`)")
    });
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The alert names of a rule file (`- alert: Name` lines).
fn alerts_in(rules: &str) -> Vec<String> {
    rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).map(|s| s.trim().to_string()).collect()
}

/// The unit-test files, dashboards/tests/*.yml.
fn test_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dashboards_dir().join("tests"))
        .expect("dashboards/tests")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .collect();
    v.sort();
    v
}

/// Per alert name: (cases where it must fire, cases where it must stay quiet), from the
/// `alert_rule_test` entries of promtool test files (`alertname:` followed by `exp_alerts: []`
/// or by a non-empty `exp_alerts:` list).
fn alert_cases(tests: &str) -> BTreeMap<String, (usize, usize)> {
    let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let lines: Vec<&str> = tests.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = l.strip_prefix("alertname: ") else { continue };
        let e = out.entry(name.trim().to_string()).or_default();
        match lines.get(i + 1).copied() {
            Some("exp_alerts: []") => e.1 += 1,
            Some("exp_alerts:") => e.0 += 1,
            other => panic!("alertname {name}: expected exp_alerts on the next line, got {other:?}"),
        }
    }
    out
}

/// The runbook file every alert's `runbook_url` points into, in dashboards/.
const RUNBOOKS: &str = "runbooks.md";

/// Per alert of a rule file: its annotations (key, unquoted value), read from the lines between
/// `- alert: Name` and the next rule (the rule files keep one annotation per line).
fn alert_annotations(rules: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let mut out: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    let mut in_annotations = false;
    for l in rules.lines() {
        let t = l.trim();
        if let Some(name) = t.strip_prefix("- alert: ") {
            out.push((name.trim().to_string(), BTreeMap::new()));
            in_annotations = false;
        } else if t.starts_with("- record: ") || t.starts_with("- name: ") {
            in_annotations = false;
        } else if t == "annotations:" {
            in_annotations = true;
        } else if in_annotations {
            if let (Some((k, v)), Some(last)) = (t.split_once(": "), out.last_mut()) {
                last.1.insert(k.to_string(), v.trim().trim_matches('"').to_string());
            }
        }
    }
    out
}

/// What an operator woken at 3 a.m. gets with every alert: a summary, a description that says
/// what is broken and what to do, and a `runbook_url` whose anchor is the alert's own section
/// of dashboards/runbooks.md (`<a id="Name"></a>` and a `## Name` heading).
#[test]
fn every_alert_has_summary_description_and_a_runbook_section() {
    let runbooks = read(RUNBOOKS);
    let mut problems = Vec::new();
    let mut n = 0;
    for f in RULE_FILES {
        for (alert, ann) in alert_annotations(&read(f)) {
            n += 1;
            for key in ["summary", "description", "runbook_url"] {
                if ann.get(key).is_none_or(|v| v.is_empty()) {
                    problems.push(format!("{f}: {alert} has no {key}"));
                }
            }
            let Some(url) = ann.get("runbook_url") else { continue };
            match url.split_once('#') {
                Some((file, a)) if file.ends_with(&format!("dashboards/{RUNBOOKS}")) && a == alert => {}
                _ => {
                    problems.push(format!("{f}: {alert}: runbook_url {url:?} is not .../dashboards/{RUNBOOKS}#{alert}"))
                }
            }
            if !runbooks.contains(&format!("<a id=\"{alert}\"></a>"))
                || !runbooks.lines().any(|l| l.trim() == format!("## {alert}"))
            {
                problems
                    .push(format!("{RUNBOOKS} has no section (`<a id=\"{alert}\"></a>` and `## {alert}`) for {alert}"));
            }
        }
    }
    assert!(n >= 19, "found only {n} alerts: is the annotation parser still reading the rule files?");
    assert!(problems.is_empty(), "alerts an operator cannot act on:\n{}", problems.join("\n"));
}

#[test]
fn promtool_checks_the_rules_and_unit_tests_every_alert() {
    for f in RULE_FILES {
        let (ok, out) = promtool(&["check", "rules", f]);
        assert!(ok, "promtool check rules {f}:\n{out}");
    }
    let (ok, out) = promtool(&["check", "config", "prometheus.example.yml"]);
    assert!(ok, "promtool check config prometheus.example.yml:\n{out}");

    let tests = test_files();
    assert!(tests.len() >= 2, "dashboards/tests/*.yml: {tests:?}");
    let mut args = vec!["test".to_string(), "rules".to_string()];
    args.extend(tests.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = promtool(&args);
    eprintln!("promtool test rules:\n{out}");
    assert!(ok, "promtool test rules failed:\n{out}");
    assert_eq!(out.matches("SUCCESS").count(), tests.len(), "one SUCCESS per test file:\n{out}");

    // Every alert has a case where it fires and one where it stays quiet; every case names a
    // real alert (a renamed alert must not leave its tests checking nothing).
    let alerts: BTreeSet<String> = RULE_FILES.iter().flat_map(|f| alerts_in(&read(f))).collect();
    assert!(alerts.len() >= 15, "alerts found: {alerts:?}");
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in &tests {
        for (name, (fire, quiet)) in alert_cases(&std::fs::read_to_string(t).unwrap()) {
            let e = cases.entry(name).or_default();
            e.0 += fire;
            e.1 += quiet;
        }
    }
    for a in &alerts {
        let (fire, quiet) = cases.get(a).copied().unwrap_or_default();
        assert!(fire > 0 && quiet > 0, "alert {a}: {fire} firing and {quiet} quiet cases in dashboards/tests/");
    }
    let unknown: Vec<&String> = cases.keys().filter(|n| !alerts.contains(*n)).collect();
    assert!(unknown.is_empty(), "tests for alerts that do not exist: {unknown:?}");
}

/// Every `le` matcher on `family_bucket{...}` in `text`: the `le` value (the first alternative
/// of a regex matcher such as `le=~"15|15\\.0"`).
fn bucket_thresholds(text: &str, family: &str) -> Vec<String> {
    let open = format!("{family}_bucket{{");
    let mut out = Vec::new();
    for (at, _) in text.match_indices(&open) {
        let sel = &text[at + open.len()..];
        let sel = &sel[..sel.find('}').expect("closing brace")];
        for m in sel.split(',') {
            let m = m.trim();
            if let Some(v) = m.strip_prefix("le=\"").or_else(|| m.strip_prefix("le=~\"")) {
                let v = v.trim_end_matches('"');
                out.push(v.split('|').next().unwrap().to_string());
            } else if let Some(v) = m.strip_prefix("le=\\\"").or_else(|| m.strip_prefix("le=~\\\"")) {
                // Inside a JSON string.
                let v = v.trim_end_matches('"').trim_end_matches('\\');
                out.push(v.split('|').next().unwrap().to_string());
            }
        }
    }
    out
}

#[test]
fn slo_thresholds_are_bucket_edges_and_agree() {
    let agent: BTreeSet<String> = LATENCY_EDGES_NS.iter().map(|&e| edge_seconds(e).to_string()).collect();
    let kernel: BTreeSet<String> = KERNEL_EDGES_NS.iter().map(|&e| edge_seconds(e).to_string()).collect();
    let mut checked = 0;
    let sources: Vec<(&str, String)> =
        RULE_FILES.iter().map(|f| (*f, read(f))).chain([("ulog.json", read("ulog.json"))]).collect();
    for (name, text) in &sources {
        for (family, edges) in [
            ("ulog_request_duration_seconds", &agent),
            ("ulog_cluster_request_duration_seconds", &agent),
            ("ulog_kernel_request_duration_seconds", &kernel),
        ] {
            for le in bucket_thresholds(text, family) {
                assert!(edges.contains(&le), "{name}: le=\"{le}\" on {family}_bucket is not a bucket edge: {edges:?}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 16, "thresholds found: {checked}");

    // ulog-slo.yml: per SLO type, every window's SLI reads the same bucket of the kernel
    // round-trip histogram (probes attached) and of the agent's service-time histogram (the
    // fallback), and that bucket is the type's `ulog:slo_threshold:seconds`.
    let slo = read("ulog-slo.yml");
    let mut les: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for family in ["ulog_request_duration_seconds", "ulog_kernel_request_duration_seconds"] {
        let open = format!("{family}_bucket{{type=\"");
        for (at, _) in slo.match_indices(&open) {
            let rest = &slo[at + open.len()..];
            let ty = &rest[..rest.find('"').unwrap()];
            let le = bucket_thresholds(&slo[at..], family).remove(0);
            les.entry(ty.to_string()).or_default().insert(le);
        }
    }
    let lines: Vec<&str> = slo.lines().map(str::trim).collect();
    let mut thresholds: BTreeMap<String, String> = BTreeMap::new();
    for (i, l) in lines.iter().enumerate() {
        if *l != "- record: ulog:slo_threshold:seconds" {
            continue;
        }
        let v = lines[i + 1].strip_prefix("expr: vector(").and_then(|v| v.strip_suffix(')')).expect("expr: vector(X)");
        let ty = lines[i + 2].split("type: ").nth(1).and_then(|t| t.split([',', ' ', '}']).next()).expect("labels");
        thresholds.insert(ty.to_string(), v.to_string());
    }
    // The per-log SLIs (ulog_log_request_duration_seconds, SLO edges only) read the same
    // threshold as the per-type ones, in five windows each, on a real per-log bucket edge.
    let per_log: BTreeSet<String> = PER_LOG_SLO_EDGES_NS.iter().map(|&e| edge_seconds(e).to_string()).collect();
    let mut per_log_les: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let open = "ulog_log_request_duration_seconds_bucket{type=\"";
    for (at, _) in slo.match_indices(open) {
        let rest = &slo[at + open.len()..];
        let ty = &rest[..rest.find('"').unwrap()];
        let le = bucket_thresholds(&slo[at..], "ulog_log_request_duration_seconds").remove(0);
        assert!(per_log.contains(&le), "per-log le=\"{le}\" is not an edge of the per-log histogram: {per_log:?}");
        let n = slo.matches(&format!("{open}{ty}\",le=\"{le}\"}}")).count();
        assert_eq!(n, 5, "{ty}: per-log SLI windows 5m, 30m, 1h, 6h, 3d");
        per_log_les.entry(ty.to_string()).or_default().insert(le);
    }
    assert_eq!(per_log_les, les, "per-log and per-type SLIs read the same threshold of each type");
    for (ty, set) in &les {
        assert_eq!(set.len(), 1, "{ty}: the SLI windows read different buckets: {set:?}");
        let le = set.iter().next().unwrap();
        let t = thresholds.get(ty).unwrap_or_else(|| panic!("no ulog:slo_threshold:seconds for {ty}"));
        assert_eq!(t.parse::<f64>().unwrap(), le.parse::<f64>().unwrap(), "{ty}: threshold constant vs le");
        // Five windows each, on both sides. Each SLI rule names its bucket as the good events and
        // as the zero that stands in for an absent counter: the error answers (both sides) and
        // the requests received after a stall (agent side).
        for (family, per_rule) in [("ulog_request_duration_seconds", 3), ("ulog_kernel_request_duration_seconds", 2)] {
            let n = slo.matches(&format!("{family}_bucket{{type=\"{ty}\",le=\"{le}\"}}")).count();
            assert_eq!(n, 5 * per_rule, "{ty}: {family}: SLI windows 5m, 30m, 1h, 6h, 3d");
        }
    }

    // The cluster SLO (cluster mode: `ulog_cluster_request_duration_seconds`, its own constants
    // `ulog_cluster:*`): per type, five windows on one agent-side bucket edge, which is the
    // type's `ulog_cluster:slo_threshold:seconds`.
    let open = "ulog_cluster_request_duration_seconds_bucket{type=\"";
    let mut cluster_les: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (at, _) in slo.match_indices(open) {
        let rest = &slo[at + open.len()..];
        let ty = &rest[..rest.find('"').unwrap()];
        let le = bucket_thresholds(&slo[at..], "ulog_cluster_request_duration_seconds").remove(0);
        assert!(agent.contains(&le), "cluster le=\"{le}\" is not an agent bucket edge");
        cluster_les.entry(ty.to_string()).or_default().insert(le);
    }
    let types: Vec<&String> = cluster_les.keys().collect();
    assert_eq!(types, ["FLUSH", "MARK_REGION"], "cluster SLO types");
    for (i, l) in lines.iter().enumerate() {
        if *l != "- record: ulog_cluster:slo_threshold:seconds" {
            continue;
        }
        let v = lines[i + 1].strip_prefix("expr: vector(").and_then(|v| v.strip_suffix(')')).expect("expr: vector(X)");
        let ty = lines[i + 2].split("type: ").nth(1).and_then(|t| t.split([',', ' ', '}']).next()).expect("labels");
        let set = cluster_les.remove(ty).unwrap_or_else(|| panic!("cluster threshold for {ty} without SLI rules"));
        assert_eq!(set.len(), 1, "cluster {ty}: the SLI windows read different buckets: {set:?}");
        let le = set.into_iter().next().unwrap();
        assert_eq!(v.parse::<f64>().unwrap(), le.parse::<f64>().unwrap(), "cluster {ty}: threshold constant vs le");
        let n = slo.matches(&format!("{open}{ty}\",le=\"{le}\"}}")).count();
        assert_eq!(n, 5, "cluster {ty}: SLI windows 5m, 30m, 1h, 6h, 3d");
    }
    assert!(cluster_les.is_empty(), "cluster SLI types without ulog_cluster:slo_threshold:seconds: {cluster_les:?}");
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner.iter());
        }
    }
    out
}

/// (panel title, refId, expression) of every query of the dashboard.
fn dashboard_queries(d: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let title = p["title"].as_str().unwrap_or("").to_string();
            out.push((
                title,
                t["refId"].as_str().unwrap_or("").to_string(),
                t["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read("ulog.json")).expect("dashboards/ulog.json is JSON")
}

/// Panels whose queries need the eBPF probe (kernel-side families) or device-mapper (the mirror
/// device's counters): they have no data on a host without them, as in this test.
fn needs_probe(expr: &str) -> bool {
    expr.contains("ulog_kernel_request") || expr.contains("ulog_kernel_reconnect_attempts")
}
fn needs_mirror(expr: &str) -> bool {
    expr.contains("ulog_mirror_")
}
/// Queries of cluster mode's families (`ulog_cluster_*`, and the cluster SLO's recorded
/// `ulog_cluster:*`): no data from a single-node agent, as in this test.
fn needs_cluster(expr: &str) -> bool {
    expr.contains("ulog_cluster")
}

#[test]
fn the_dashboard_is_file_provisionable() {
    let d = dashboard();
    assert!(d.get("__inputs").is_none() && d.get("__requires").is_none(), "no import-time inputs");
    assert!(d["id"].is_null(), "no database id (file provisioning assigns one)");
    assert_eq!(d["uid"], "ulog-overview");
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |n: &str| vars.iter().find(|v| v["name"] == n).unwrap_or_else(|| panic!("variable {n}"));
    assert_eq!(
        (var("datasource")["type"].as_str(), var("datasource")["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    assert!(var("log")["query"]["query"].as_str().unwrap().starts_with("label_values(ulog_log_info"));
    assert_eq!(var("log")["includeAll"], true);
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap();
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id: {title}");
        let g = &p["gridPos"];
        assert!(g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24, "{title}: wider than the grid");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: panel data source is the variable");
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}: target data source");
            assert!(!t["expr"].as_str().unwrap_or("").is_empty(), "{title}: empty query");
        }
        assert!(p["description"].as_str().is_some_and(|s| !s.is_empty()), "{title}: no description");
    }
    // What issue 6 asks the dashboard to show.
    let titles: Vec<&str> = panels(&d).iter().filter_map(|p| p["title"].as_str()).collect();
    for want in [
        "Request rate by type",
        "Agent service time percentiles",
        "Agent service time heatmap",
        "Kernel round trip vs agent service time (p99)",
        "Kernel round trip: three stages (mean)",
        "Kernel round trip heatmap",
        "FLUSH and MARK_REGION within the SLO threshold",
        "Error budget burn rate (1 h)",
        "Resync progress",
        "Resync ETA",
        "Dirty regions",
        "How long regions stay dirty",
        "Kernel retries",
        "Reconnects",
        "Malformed and dropped messages",
        "eBPF probe",
        "Agent CPU",
        "Agent resident memory",
        "Cluster quorum",
        "Held cluster requests",
        "Marked regions per node",
        "Cluster request latency p99 by type",
    ] {
        assert!(titles.contains(&want), "panel {want:?} missing: {titles:?}");
    }
    // Per-log filtering: every query of a per-log family filters on $log. Per-agent filtering
    // by job as well as instance (two jobs can scrape hosts of the same name), and the SLO
    // panels read the rules' threshold (the recorded SLIs), never a copy of its `le`.
    for (title, r, e) in dashboard_queries(&d) {
        if e.contains("instance=~\"$instance\"") {
            assert!(e.contains("job=~\"$job\""), "{title}/{r}: filters by instance but not by job: {e}");
        }
        if e.contains("ulog_request_duration_seconds_bucket")
            && !e.contains("type!~")
            && (e.contains("FLUSH") || e.contains("MARK_REGION"))
        {
            assert!(
                !e.contains("le=\""),
                "{title}/{r}: an SLO threshold copied into the dashboard; read ulog:sli_good:*: {e}"
            );
        }
        for fam in ["ulog_requests_total", "ulog_regions", "ulog_resync_", "ulog_region_dirty", "ulog_disk_flush"] {
            if e.contains(fam) {
                assert!(e.contains("log=~\"$log\""), "{title}/{r}: {fam} without the $log filter: {e}");
            }
        }
    }
}

/// Grafana's variables as the live test substitutes them: every agent, every log, a rate
/// interval of four 1 s scrapes plus one.
/// The kind of value a panel query plots, from the metric it reads: what its axis unit must be.
fn value_kind(expr: &str) -> &'static str {
    if expr.contains("_failed") || expr.contains("ulog_probe_attached") || expr.starts_with("up{") {
        "flag"
    } else if expr.contains("bytes") {
        "bytes"
    } else if expr.contains("histogram_quantile") && expr.contains("_seconds_bucket") {
        "seconds"
    } else {
        "other"
    }
}

/// One unit per axis: in a timeseries panel, the queries on the default axis plot one kind of
/// value (seconds, bytes, 0/1 flags, or other figures), and a query of another kind is moved,
/// by a per-query override, to a right axis with its own unit. An operator reading an axis at
/// 3 a.m. reads one unit.
#[test]
fn every_dashboard_axis_has_one_unit() {
    let d = dashboard();
    let mut problems = Vec::new();
    for p in panels(&d).into_iter().filter(|p| p["type"] == "timeseries") {
        let title = p["title"].as_str().unwrap_or("");
        if p["fieldConfig"]["defaults"]["unit"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{title}: no fieldConfig.defaults.unit"));
        }
        // refIds moved to their own axis: overrides by refId that set a unit and the right axis.
        let mut own_axis = BTreeSet::new();
        for o in p["fieldConfig"]["overrides"].as_array().into_iter().flatten() {
            let props: Vec<&str> =
                o["properties"].as_array().into_iter().flatten().filter_map(|x| x["id"].as_str()).collect();
            let sets_unit = props.contains(&"unit");
            if sets_unit && !props.contains(&"custom.axisPlacement") {
                problems.push(format!("{title}: an override sets a unit without an axis of its own"));
            }
            if sets_unit && o["matcher"]["id"] == "byFrameRefID" {
                own_axis.insert(o["matcher"]["options"].as_str().unwrap_or("").to_string());
            }
        }
        let kinds: BTreeSet<&str> = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| !own_axis.contains(t["refId"].as_str().unwrap_or("")))
            .map(|t| value_kind(t["expr"].as_str().unwrap_or("")))
            .collect();
        if kinds.len() > 1 {
            problems.push(format!("{title}: one axis plots {kinds:?}"));
        }
    }
    assert!(problems.is_empty(), "panels mixing units:\n{}", problems.join("\n"));
}

fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "5s")
        .replace("$__interval", "1s")
        .replace("$__range", "30s")
        .replace("\"$job\"", "\".*\"")
        .replace("\"$instance\"", "\".*\"")
        .replace("\"$log\"", "\".*\"")
}

/// A Prometheus server in the calling thread's network namespace, killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    http: ureq::Agent,
    log: PathBuf,
}

impl Prometheus {
    /// Scrapes `target` every second as job `ulog`, evaluates the rule files every second.
    fn start(dir: &TempDir, target: &str) -> Self {
        let listen = "127.0.0.1:9090";
        let rules: Vec<String> =
            RULE_FILES.iter().map(|f| format!("  - {}", dashboards_dir().join(f).display())).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n  - job_name: ulog\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.join("\n")
        );
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run prometheus ({e}): Debian's `prometheus` package (`cargo xtask setup`)")
            });
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        let p = Self { child, base: format!("http://{listen}"), http, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = p.http.get(format!("{}/-/ready", p.base)).call().is_ok_and(|r| r.status() == 200);
            if ready {
                return p;
            }
            assert!(Instant::now() < deadline, "prometheus not ready after 30 s:\n{}", p.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET an API path with query parameters; the parsed JSON document (any status).
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut req = self.http.get(format!("{}{path}", self.base));
        for (k, v) in params {
            req = req.query(*k, *v);
        }
        let mut r = req.call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body = r.body_mut().read_to_string().unwrap();
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// An instant query: Ok(result array) or Err(Prometheus' error).
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let v = self.api("/api/v1/query", &[("query", expr)]);
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        match &v["data"]["result"] {
            Value::Array(a) => Ok(a.clone()),
            // Scalars and strings: one value.
            other => Ok(vec![other.clone()]),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The traffic the kernel would send for a mirror under writes and resync: a resync step
/// (SET_REGION_SYNC + CLEAR), IN_SYNC twice, MARK_REGION, FLUSH, CLEAR_REGION, FLUSH per
/// round, on a core and a disk log, plus a request error now and then.
fn traffic_round(a: &mut Agent, logs: &[&Log], round: u64, regions: u64) {
    for log in logs {
        let r = round % regions;
        a.recover(log, r);
        a.in_sync(log, r);
        a.in_sync(log, r);
        a.mark(log, &[r]);
        a.flush(log, &[]);
        a.clear(log, &[r]);
        a.flush(log, &[]);
        a.resync_work(log);
        if round.is_multiple_of(50) {
            a.expect_err(log, T::InSync, &regions.to_ne_bytes(), EINVAL, "out of range");
        }
    }
}

#[test]
fn prometheus_runs_every_dashboard_and_rule_query_on_live_traffic() {
    let t0 = Instant::now();
    let (mut a, _http) = api::start(Core::InMemory);
    let disk = zero_file(&a.dir.join("disk"), 1 << 20);
    let core = Log::new("LVM-dashcore", LUID);
    let dlog = Log::new("LVM-dashdisk", LUID + 1);
    // Enough regions that the resync never finishes during the test (a finished resync has no
    // ETA): a region a round, ~200 rounds a second.
    const REGIONS: u64 = 100_000;
    a.create(&core, "800000 clustered-core 8");
    a.create(&dlog, &format!("800000 clustered-disk {} 8", disk.display()));
    let prom_dir = TempDir::new();
    let prom = Prometheus::start(&prom_dir, api::ADDR);

    // Traffic from another thread for as long as the queries run (a rate over the last 5 s
    // needs requests in the last 5 s), the kernel peer moving with it.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let worker = {
        let (stop, rounds) = (Arc::clone(&stop), Arc::clone(&rounds));
        let (core, dlog) = (core.clone(), dlog.clone());
        std::thread::spawn(move || {
            // The peer's socket lives in the test's namespace already; no new namespace here.
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                traffic_round(&mut a, &[&core, &dlog], round, REGIONS);
                round += 1;
                rounds.store(round, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            a
        })
    };

    // Until Prometheus has scraped traffic for a few seconds and the rules have results.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let up = prom.query("up{job=\"ulog\"} == 1").unwrap();
        let scraped =
            prom.query("count_over_time(ulog_requests_total{type=\"FLUSH\",result=\"ok\"}[30s]) >= 6").unwrap();
        let sli = prom.query("ulog:sli_good:ratio_rate5m").unwrap();
        let eta = prom.query("ulog_resync_remaining_seconds").unwrap();
        if up.len() == 1 && scraped.len() == 2 && sli.len() == 2 && eta.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no data in Prometheus after 40 s: up {up:?}, scraped {scraped:?}, sli {sli:?}, eta {eta:?}\n{}",
            prom.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The dashboard's variables find the logs.
    let v = prom.api("/api/v1/label/log/values", &[("match[]", "ulog_log_info{instance=~\".*\"}")]);
    assert_eq!(v["data"], serde_json::json!(["dashcore", "dashdisk"]), "label_values(ulog_log_info, log)");
    let v = prom.api("/api/v1/label/instance/values", &[("match[]", "ulog_build_info")]);
    assert_eq!(v["data"], serde_json::json!([api::ADDR]), "label_values(ulog_build_info, instance)");

    // Every query of the dashboard parses; those that describe this traffic return data.
    let d = dashboard();
    let mut failures = Vec::new();
    let mut without_data = BTreeSet::new();
    let mut with_data = 0;
    for (title, r, expr) in dashboard_queries(&d) {
        let q = substitute(&expr);
        assert!(!q.contains('$'), "{title}/{r}: a variable is left: {q}");
        match prom.query(&q) {
            Err(e) => failures.push(format!("{title}/{r}: {e}\n    {q}")),
            // A single-node agent exports no cluster family.
            Ok(res) if needs_cluster(&expr) => {
                if !res.is_empty() {
                    failures.push(format!("{title}/{r}: cluster data from a single-node agent: {res:?}\n    {q}"));
                }
            }
            Ok(res) if res.is_empty() => {
                if needs_probe(&expr) || needs_mirror(&expr) {
                    without_data.insert(format!("{title}/{r}"));
                } else {
                    failures.push(format!("{title}/{r}: no data\n    {q}"));
                }
            }
            Ok(_) => with_data += 1,
        }
    }
    // The rules: loaded, evaluated without error, every expression parses, and every
    // recording rule that does not need the probe or a mirror device has a result.
    let rules = prom.api("/api/v1/rules", &[]);
    let mut n_rules = 0;
    for g in rules["data"]["groups"].as_array().unwrap() {
        for rule in g["rules"].as_array().unwrap() {
            n_rules += 1;
            let name = rule["name"].as_str().unwrap();
            let expr = rule["query"].as_str().unwrap();
            if rule["health"] != "ok" {
                failures.push(format!("rule {name}: health {} ({})", rule["health"], rule["lastError"]));
            }
            match prom.query(expr) {
                Err(e) => failures.push(format!("rule {name}: {e}")),
                Ok(_)
                    if rule["type"] == "recording"
                        && !needs_probe(expr)
                        && !needs_mirror(expr)
                        && !needs_cluster(expr) =>
                {
                    match prom.query(name) {
                        Ok(res) if !res.is_empty() => {}
                        other => failures.push(format!("recording rule {name}: no result ({other:?})")),
                    }
                }
                Ok(_) => {}
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut a = worker.join().expect("traffic thread");
    assert!(matches!(a.proc.try_exited(), Ok(None)), "the agent died:\n{}", a.proc.output());
    eprintln!(
        "{} traffic rounds; {with_data} dashboard queries with data; without data here (probe or mirror device needed): {without_data:?}; {n_rules} rules; {:.1} s",
        rounds.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    let rule_count: usize =
        RULE_FILES.iter().map(|f| read(f).matches("- record: ").count() + alerts_in(&read(f)).len()).sum();
    assert_eq!(n_rules, rule_count, "Prometheus loaded every rule of the rule files");
    // Exactly the panels documented as probe-only or mirror-only lack data here.
    let expected: BTreeSet<String> = [
        "Log requests per mirror write/A",
        "Mirror writes/A",
        "Mirror writes/B",
        "Kernel round trip vs agent service time (p99)/A",
        "Kernel round trip: three stages (mean)/A",
        "Kernel stages p99 by type/A",
        "Kernel round trip heatmap/A",
        "Requests sent by the kernel vs answered/A",
        "Kernel retries/A",
        "Reconnects/B",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(without_data, expected, "queries without data on a host without probe and device-mapper");
}
