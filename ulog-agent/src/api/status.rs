//! `ulog-agent status`: a human summary of a running agent, read from its HTTP API: the agent,
//! its logs with sync progress, and request rates and latencies measured over a short interval
//! (two reads of the API, `--interval` apart).
//!
//! Exit status: 0 if the agent answered and is ready, 1 if it could not be reached, 2 if it
//! answered but is not ready (starting, stopping, or its receive loop stalled).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::api::model::{AgentInfo, ClusterLogStatus, Distribution, Health, LogDetail, LogSummary};

/// `ulog-agent status` options.
#[derive(Clone, Debug, clap::Args)]
pub struct StatusArgs {
    /// Address of the agent's HTTP API (its --http-addr).
    #[arg(long, default_value = crate::api::DEFAULT_ADDR, value_name = "ADDR")]
    pub addr: String,
    /// Seconds between the two reads that rates and latencies are computed from (0: no rates,
    /// latencies since the agent started).
    #[arg(long, default_value_t = 1.0, value_name = "SECS")]
    pub interval: f64,
}

struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(addr: &str) -> Self {
        let base =
            if addr.starts_with("http://") { addr.trim_end_matches('/').to_string() } else { format!("http://{addr}") };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        Self { base, agent }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<(u16, T)> {
        let url = format!("{}{path}", self.base);
        let mut r = self.agent.get(&url).call().with_context(|| format!("cannot reach {url}"))?;
        let status = r.status().as_u16();
        let body: serde_json::Value = r.body_mut().read_json().with_context(|| format!("{url}: not JSON"))?;
        if status >= 400 && status != 503 {
            bail!("{url}: HTTP {status}: {}", body["error"]["message"].as_str().unwrap_or("(no message)"));
        }
        Ok((status, serde_json::from_value(body).with_context(|| format!("{url}: unexpected document"))?))
    }
}

struct Sample {
    agent: AgentInfo,
    logs: Vec<LogDetail>,
}

fn sample(c: &Client) -> Result<Sample> {
    let (_, agent): (_, AgentInfo) = c.get("/api/v1/agent")?;
    let (_, list): (_, serde_json::Value) = c.get("/api/v1/logs")?;
    let summaries: Vec<LogSummary> =
        serde_json::from_value(list["logs"].clone()).context("/api/v1/logs: unexpected document")?;
    let mut logs = Vec::new();
    for s in summaries {
        // A log may go away between the two calls.
        if let Ok((_, d)) = c.get::<LogDetail>(&format!("/api/v1/logs/{}?luid={}", urlencode(&s.uuid), s.luid)) {
            logs.push(d);
        }
    }
    Ok(Sample { agent, logs })
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `ulog-agent cluster confirm-fenced` options.
#[derive(Clone, Debug, clap::Args)]
pub struct ConfirmFencedArgs {
    /// Address of the agent's HTTP API (its --http-addr; the agent accepts this request only
    /// from loopback).
    #[arg(long, default_value = crate::api::DEFAULT_ADDR, value_name = "ADDR")]
    pub addr: String,
    /// The dead node's corosync node id.
    #[arg(long)]
    pub node: u32,
    /// The dead kernel's boot id (32 hex digits, as `ulog-agent status` shows); default: the
    /// one each log holds for the node.
    #[arg(long, value_name = "BOOT_ID")]
    pub incarnation: Option<String>,
    /// Only this log (name or uuid); default: every cluster log that holds the node.
    #[arg(long)]
    pub log: Option<String>,
}

/// `ulog-agent cluster confirm-fenced`; returns the exit status (0 confirmed, 1 refused or
/// unreachable).
pub fn confirm_fenced(args: &ConfirmFencedArgs) -> i32 {
    let c = Client::new(&args.addr);
    let url = format!("{}/api/v1/cluster/confirm-fenced", c.base);
    let body = serde_json::json!({ "node": args.node, "incarnation": args.incarnation, "log": args.log });
    let result =
        c.agent.post(&url).send_json(&body).with_context(|| format!("cannot reach {url}")).and_then(|mut r| {
            let status = r.status().as_u16();
            let v: serde_json::Value = r.body_mut().read_json().with_context(|| format!("{url}: not JSON"))?;
            Ok((status, v))
        });
    match result {
        Ok((200, v)) => {
            for c in v["confirmed"].as_array().into_iter().flatten() {
                println!(
                    "{}: node {} (boot id {}) confirmed dead: its held regions will be reclaimed and resynchronised",
                    c["log"].as_str().unwrap_or("?"),
                    c["node"],
                    c["incarnation"].as_str().unwrap_or("?")
                );
            }
            0
        }
        Ok((status, v)) => {
            eprintln!(
                "ulog-agent cluster confirm-fenced: HTTP {status}: {}",
                v["error"]["message"].as_str().unwrap_or("(no message)")
            );
            1
        }
        Err(e) => {
            eprintln!("ulog-agent cluster confirm-fenced: {e:#}");
            1
        }
    }
}

/// Runs the command; returns the process exit status.
pub fn run(args: &StatusArgs) -> i32 {
    match report(args) {
        Ok((text, code)) => {
            print!("{text}");
            code
        }
        Err(e) => {
            eprintln!("ulog-agent status: {e:#}");
            eprintln!("(is ulog-agent running, and is its --http-addr {}?)", args.addr);
            1
        }
    }
}

/// The report and the exit status.
pub fn report(args: &StatusArgs) -> Result<(String, i32)> {
    let c = Client::new(&args.addr);
    let first = sample(&c)?;
    let interval = args.interval.max(0.0);
    let second = if interval > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(interval));
        Some(sample(&c)?)
    } else {
        None
    };
    let (ready_status, ready): (u16, Health) = c.get("/readyz")?;
    let (before, now) = match &second {
        Some(s) => (Some(&first), s),
        None => (None, &first),
    };
    let elapsed = before.map(|b| (now.agent.uptime_seconds - b.agent.uptime_seconds).max(1e-3));
    let text = render(before, now, elapsed, &ready, &args.addr);
    Ok((text, if ready_status == 200 { 0 } else { 2 }))
}

fn secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn duration_words(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d {:02}h", s / 86_400, s / 3600 % 24),
    }
}

/// A quantile of a cumulative `(le, count)` list (the part observed between two reads when
/// `earlier` is given), interpolated within the bucket as histogram_quantile does.
fn quantile(now: &Distribution, earlier: Option<&Distribution>, q: f64) -> Option<f64> {
    let cum: Vec<(f64, u64)> = now
        .buckets
        .iter()
        .enumerate()
        .map(|(i, &(le, c))| (le, c.saturating_sub(earlier.and_then(|e| e.buckets.get(i)).map_or(0, |b| b.1))))
        .collect();
    let total = now.count.saturating_sub(earlier.map_or(0, |e| e.count));
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut prev = (0.0, 0u64);
    for &(le, c) in &cum {
        if c as f64 >= rank && c > prev.1 {
            let frac = (rank - prev.1 as f64) / (c - prev.1) as f64;
            return Some(prev.0 + (le - prev.0) * frac.clamp(0.0, 1.0));
        }
        prev = (le, c);
    }
    cum.last().map(|b| b.0)
}

fn render(before: Option<&Sample>, now: &Sample, elapsed: Option<f64>, ready: &Health, addr: &str) -> String {
    let a = &now.agent;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "ulog-agent {} (pid {}) at {addr}: {}{}, up {}",
        a.version,
        a.pid,
        ready.status,
        ready.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
        duration_words(a.uptime_seconds)
    );
    let _ = writeln!(
        o,
        "eBPF probe: {}",
        if a.probe.attached { "attached".to_string() } else { format!("not attached ({})", a.probe.status) }
    );
    let total: u64 = a.requests.iter().map(|t| t.requests).sum();
    let errors: u64 = a.requests.iter().map(|t| t.errors).sum();
    let malformed: u64 = a.malformed.values().sum();
    let dropped: u64 = a.dropped.values().sum();
    let rate = match (before, elapsed) {
        (Some(b), Some(dt)) => {
            let t0: u64 = b.agent.requests.iter().map(|t| t.requests).sum();
            format!("{:.1}/s over the last {dt:.1} s; ", total.saturating_sub(t0) as f64 / dt)
        }
        _ => String::new(),
    };
    let _ =
        writeln!(o, "Requests: {rate}{total} since start ({errors} errors); malformed {malformed}, dropped {dropped}");
    if let Some(e) = &a.mirror_discovery.error {
        let _ = writeln!(o, "Mirror devices: not discovered ({e})");
    }
    if let Some(c) = &a.cluster {
        let _ = writeln!(
            o,
            "Cluster: {}; frames {} sent, {} delivered; state transfers {} sent, {} received{}",
            if c.quorate { "quorate" } else { "NOT QUORATE (requests that need agreement are held)" },
            c.frames_sent,
            c.frames_delivered,
            c.state_transfers_sent,
            c.state_transfers_received,
            if c.cmirrord_refusals > 0 {
                format!("; {} refused (cmirrord)", c.cmirrord_refusals)
            } else {
                String::new()
            }
        );
    }

    let _ = writeln!(o);
    if now.logs.is_empty() {
        let _ = writeln!(o, "No logs.");
    } else {
        let _ = writeln!(
            o,
            "{:<18} {:<5} {:<11} {:>9} {:>17} {:>9} {:>7} {:>9} {:<14} {:>9}",
            "LOG", "TYPE", "STATE", "REGIONS", "IN SYNC", "ETA", "DIRTY", "REQ/S", "MIRROR", "REQ/WRITE"
        );
        let earlier: HashMap<(&str, &str), &LogDetail> = before
            .map(|b| b.logs.iter().map(|l| ((l.summary.uuid.as_str(), l.summary.luid.as_str()), l)).collect())
            .unwrap_or_default();
        for l in &now.logs {
            let s = &l.summary;
            let prev = earlier.get(&(s.uuid.as_str(), s.luid.as_str()));
            let reqs = |d: &LogDetail| d.requests.iter().map(|t| t.ok + t.error).sum::<u64>();
            let (req_rate, per_write) = match (prev, elapsed) {
                (Some(p), Some(dt)) => {
                    let dr = reqs(l).saturating_sub(reqs(p));
                    let dw = match (
                        s.mirror.as_ref().and_then(|m| m.writes),
                        p.summary.mirror.as_ref().and_then(|m| m.writes),
                    ) {
                        (Some(w1), Some(w0)) => w1.saturating_sub(w0),
                        _ => 0,
                    };
                    (
                        format!("{:.1}", dr as f64 / dt),
                        if dw > 0 { format!("{:.2}", dr as f64 / dw as f64) } else { "-".into() },
                    )
                }
                _ => ("-".into(), "-".into()),
            };
            let pct = if s.region_count == 0 { 100.0 } else { s.sync_count as f64 * 100.0 / s.region_count as f64 };
            let eta = match l.resync.eta_seconds {
                Some(e) if e <= 0.0 => "-".to_string(),
                Some(e) => duration_words(e),
                None if s.sync_count < s.region_count => "?".into(),
                None => "-".into(),
            };
            let _ = writeln!(
                o,
                "{:<18} {:<5} {:<11} {:>9} {:>17} {:>9} {:>7} {:>9} {:<14} {:>9}",
                s.name,
                s.kind.trim_start_matches("clustered-"),
                format!(
                    "{}{}{}",
                    s.state,
                    if s.device_failed { " D" } else { "" },
                    if s.legs_flush_failed { " F" } else { "" }
                ),
                s.region_count,
                format!("{} ({pct:.1}%)", s.sync_count),
                eta,
                l.regions.dirty,
                req_rate,
                s.mirror.as_ref().map_or("-", |m| m.name.as_str()),
                per_write
            );
        }
    }

    for l in &now.logs {
        if let Some(c) = &l.summary.cluster {
            cluster_block(&mut o, &l.summary.name, c);
        }
    }

    let _ = writeln!(o);
    let window = match elapsed {
        Some(dt) => format!("over the last {dt:.1} s; * = since start"),
        None => "since start".to_string(),
    };
    let _ = writeln!(
        o,
        "{:<22} {:>9} {:>12} {:>7} {:>11} {:>11}   (agent service time {window})",
        "REQUEST", "REQ/S", "TOTAL", "ERRORS", "P50", "P99"
    );
    for t in &a.requests {
        let prev = before.and_then(|b| b.agent.requests.iter().find(|p| p.kind == t.kind));
        let rate = match (prev, elapsed) {
            (Some(p), Some(dt)) => format!("{:.1}", t.requests.saturating_sub(p.requests) as f64 / dt),
            (None, Some(dt)) => format!("{:.1}", t.requests as f64 / dt),
            _ => "-".into(),
        };
        let interval = elapsed.is_some().then(|| prev.map(|p| &p.service_time));
        let (p50, p99, star) =
            match interval.map(|e| (quantile(&t.service_time, e, 0.5), quantile(&t.service_time, e, 0.99))) {
                Some((Some(a), Some(b))) => (Some(a), Some(b), ""),
                _ => (
                    quantile(&t.service_time, None, 0.5),
                    quantile(&t.service_time, None, 0.99),
                    if elapsed.is_some() { "*" } else { "" },
                ),
            };
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{}{star}", secs(v)));
        let _ = writeln!(
            o,
            "{:<22} {:>9} {:>12} {:>7} {:>11} {:>11}",
            t.kind,
            rate,
            t.requests,
            t.errors,
            fmt(p50),
            fmt(p99)
        );
    }
    o
}

/// A cluster log: the group as this member sees it, and every node that shares the log.
fn cluster_block(o: &mut String, name: &str, c: &ClusterLogStatus) {
    let members: Vec<String> = c.members.iter().map(u32::to_string).collect();
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Cluster log {name}: node {}, members {}; {}{}{}{}{}",
        c.node.map_or("?".to_string(), |n| n.to_string()),
        if members.is_empty() { "none".to_string() } else { members.join(", ") },
        if c.holding { "holding the state" } else { "NOT holding the state (joining or rejoining)" },
        if c.held_requests > 0 { format!("; {} requests held", c.held_requests) } else { String::new() },
        if c.reclaimed > 0 { format!("; {} reclaimed regions awaiting resync", c.reclaimed) } else { String::new() },
        c.disk_writer.map_or(String::new(), |w| format!("; disk writer: node {w}")),
        if c.refused { "; REFUSED: cmirrord serves this mirror" } else { "" }
    );
    if c.nodes.is_empty() {
        return;
    }
    let _ = writeln!(o, "  {:<10} {:<34} {:>9} {:>11}", "NODE", "STATE", "MARKED", "RECOVERING");
    for n in &c.nodes {
        let _ = writeln!(
            o,
            "  {:<10} {:<34} {:>9} {:>11}",
            n.node,
            if n.live { "live" } else { "departed, marks held (agent/fence)" },
            n.marked,
            n.recovering.map_or("-".to_string(), |r| r.to_string())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_an_interval() {
        let d = |count, buckets: Vec<(f64, u64)>| Distribution {
            count,
            sum_seconds: 0.0,
            p50_seconds: None,
            p90_seconds: None,
            p99_seconds: None,
            buckets,
        };
        let before = d(10, vec![(1e-6, 10), (2e-6, 10), (4e-6, 10)]);
        let after = d(20, vec![(1e-6, 10), (2e-6, 10), (4e-6, 20)]);
        // The interval's 10 observations are all in (2, 4] µs.
        let p50 = quantile(&after, Some(&before), 0.5).unwrap();
        assert!((p50 - 3e-6).abs() < 1e-12, "{p50}");
        assert_eq!(quantile(&before, Some(&before), 0.5), None);
        let all = quantile(&after, None, 0.5).unwrap();
        assert!((all - 1e-6).abs() < 1e-12, "{all}");
    }

    /// A cluster log gets its block: members, state, per node live or held, marks, slot; the
    /// agent line says whether the node is quorate. A single-node report has neither.
    #[test]
    fn cluster_logs_get_a_block() {
        use crate::metrics::test_support::{handle, three_node_view};
        use crate::metrics::Telemetry;
        use std::sync::Arc;
        let tel = Telemetry::new(Arc::default());
        let ready = Health { status: "ready".into(), reason: None };
        let single = handle(&tel, "LVM-stsingle", None);
        let now =
            Sample { agent: crate::api::model::agent(&tel), logs: vec![crate::api::model::detail(&single, &tel)] };
        let text = render(None, &now, None, &ready, "x");
        assert!(!text.contains("Cluster"), "{text}");

        tel.set_cluster(Arc::default(), None);
        let shared = handle(&tel, "LVM-stshared", Some(three_node_view()));
        let now =
            Sample { agent: crate::api::model::agent(&tel), logs: vec![crate::api::model::detail(&shared, &tel)] };
        let text = render(None, &now, None, &ready, "x");
        assert!(text.contains("Cluster: NOT QUORATE"), "{text}");
        assert!(
            text.contains(
                "Cluster log stshared: node 1, members 1; holding the state; 5 requests held; 2 reclaimed regions awaiting resync"
            ),
            "{text}"
        );
        let rows: Vec<Vec<&str>> =
            text.lines().filter(|l| l.starts_with("  ")).map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["NODE", "STATE", "MARKED", "RECOVERING"]);
        assert_eq!(rows[1], ["1", "live", "3", "7"]);
        assert_eq!(rows[2], ["2", "departed,", "marks", "held", "(agent/fence)", "2", "-"]);
    }

    #[test]
    fn words() {
        assert_eq!(duration_words(59.9), "59s");
        assert_eq!(duration_words(3725.0), "1h 02m");
        assert_eq!(secs(0.0000125), "12.5 µs");
        assert_eq!(secs(0.0125), "12.50 ms");
        assert_eq!(urlencode("LVM-a b/c"), "LVM-a%20b%2Fc");
    }
}
