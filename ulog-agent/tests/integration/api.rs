//! The HTTP API and the metrics of a running agent, with traffic from the kernel peer: values
//! checked against the requests sent, `promtool check metrics` on a real scrape, the alert
//! rules, the OpenAPI document against the live server, paging, the flight recorder, hostile
//! clients, and `ulog-agent status`.
//!
//! A fresh network namespace has its loopback down, so the agent `Agent::start` spawns cannot
//! bind 127.0.0.1 (it logs that and retries every 5 s while serving the log protocol); each test
//! brings `lo` up and starts a second agent in the same namespace ([`start`]).

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use ulog_agent::api;
use ulog_agent::metrics::histogram::{edge_seconds, KERNEL_EDGES_NS};

use crate::common::*;

pub(crate) const ADDR: &str = "127.0.0.1:9477";

/// Brings the loopback interface of the calling thread's network namespace up.
pub(crate) fn lo_up() {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), 0, "SIOCGIFFLAGS lo");
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), 0, "SIOCSIFFLAGS lo");
        libc::close(fd);
    }
}

/// An HTTP client of the agent's API.
pub(crate) struct Http {
    pub(crate) agent: ureq::Agent,
}

impl Http {
    pub(crate) fn new() -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        Self { agent }
    }

    /// (status, content type, body).
    pub(crate) fn get(&self, path: &str) -> (u16, String, String) {
        let url = format!("http://{ADDR}{path}");
        let mut r = self.agent.get(&url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        (r.status().as_u16(), ct, r.body_mut().read_to_string().unwrap())
    }

    fn json(&self, path: &str) -> (u16, Value) {
        let (status, ct, body) = self.get(path);
        assert!(ct.starts_with("application/json"), "GET {path}: content type {ct:?}");
        (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}")))
    }

    fn ok(&self, path: &str) -> Value {
        let (status, v) = self.json(path);
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    fn scrape(&self) -> Scrape {
        let (status, ct, body) = self.get("/metrics");
        assert_eq!(status, 200);
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        Scrape::parse(&body)
    }
}

/// An agent serving its API in a private namespace, with the kernel peer.
pub(crate) fn start(core: Core) -> (Agent, Http) {
    let mut a = Agent::start_with(core);
    lo_up();
    a.proc.terminate(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    a.respawn();
    let http = Http::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(ADDR).is_ok() && http.get("/readyz").0 == 200 {
            return (a, http);
        }
        assert!(Instant::now() < deadline, "the API did not come up:\n{}", a.proc.output());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// A parsed text exposition.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Vec::new()),
                Some((n, rest)) => (n.to_string(), parse_labels(rest.strip_suffix('}').expect("closing brace"))),
            };
            samples.push((name, labels, value));
        }
        Self { text: text.to_string(), samples }
    }

    fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = f64> + 'a {
        self.samples
            .iter()
            .filter(move |(n, ls, _)| {
                n == name && labels.iter().all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.2)
    }

    /// The value of the one series of `name` with (at least) these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let v: Vec<f64> = self.matching(name, labels).collect();
        assert_eq!(v.len(), 1, "{name}{labels:?}: {} series in\n{}", v.len(), self.text);
        v[0]
    }

    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).sum()
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.0 == name)
    }

    /// The `le` values of a histogram family, as printed.
    fn les(&self, name: &str) -> BTreeSet<String> {
        let bucket = format!("{name}_bucket");
        self.samples
            .iter()
            .filter(|s| s.0 == bucket)
            .flat_map(|s| s.1.iter().filter(|l| l.0 == "le").map(|l| l.1.clone()))
            .collect()
    }
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if name.is_empty() {
            return out;
        }
        assert_eq!(chars.next(), Some('"'), "label {name} of {s:?}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(o) => value.push(o),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((name.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// `GET_SYNC_COUNT` etc. of a log that does not exist.
fn nolog() -> Log {
    Log::new("LVM-no-such-log", 0xdead)
}

/// `rate()` and `increase()` need a sample before a series' first increment: a series that
/// appears with its first observation loses that increment (Prometheus sees its first value, not
/// a change). Every request type's service-time histogram exists from the start, and every
/// (log, type, result) counter from the log's CTR, at zero.
#[test]
fn series_exist_at_zero_before_their_first_observation() {
    let (mut a, http) = start(Core::InMemory);
    let s = http.scrape();
    // (The harness asked GET_REGION_SIZE of an unknown log to see the agent was up.)
    for t in T::ALL.iter().map(|t| t.name()).filter(|&t| t != "GET_REGION_SIZE").chain(["UNKNOWN"]) {
        assert_eq!(s.get("ulog_request_duration_seconds_count", &[("type", t)]), 0.0, "{t} before any request");
        assert_eq!(s.get("ulog_request_duration_seconds_bucket", &[("type", t), ("le", "+Inf")]), 0.0);
    }
    let log = Log::new("LVM-apizero0001", LUID);
    a.ctr_ok(&log, "1000 clustered-core 8");
    let s = http.scrape();
    for t in T::ALL {
        for result in ["ok", "error"] {
            let want = if t == T::Ctr && result == "ok" { 1.0 } else { 0.0 };
            let labels = [("log", "apizero0001"), ("type", t.name()), ("result", result)];
            assert_eq!(s.get("ulog_requests_total", &labels), want, "{} {result} after the CTR", t.name());
        }
    }
    assert_eq!(s.get("ulog_request_duration_seconds_count", &[("type", "MARK_REGION")]), 0.0);
}

#[test]
fn scrape_and_api_match_the_traffic_sent() {
    let (mut a, http) = start(Core::InMemory);
    let log = Log::new("LVM-apitraffic0001", LUID);
    let name = "apitraffic0001";
    a.create(&log, "1000 clustered-core 8"); // 125 regions
    let before = http.scrape();
    let d = |s: &Scrape, n: &str, l: &[(&str, &str)]| s.sum(n, l) - before.sum(n, l);

    for r in 0..10 {
        a.set_sync(&log, r, 1);
    }
    for r in 0..20 {
        a.in_sync(&log, r);
    }
    let mark_seq = a.call(&log, T::MarkRegion, &regions_payload(&[1, 2, 3])).seq;
    a.flush(&log, &[]);
    a.clear(&log, &[1, 2]);
    a.expect_err(&log, T::InSync, &1000u64.to_ne_bytes(), EINVAL, "out of range");
    a.expect_err(&nolog(), T::GetSyncCount, &[], ESRCH, "no such log");
    let r = a.request(&Request::ctr_reconnect(&log.uuid, log.luid, "1000 clustered-core 8"));
    assert_eq!(r.error, 0, "{r}");
    // A malformed datagram: data_size beyond the payload (answered -EINVAL, counted).
    let (seq, mut dgram) = raw_request(&mut a.peer, &Request::new(T::InSync, &log.uuid, log.luid, 5u64.to_ne_bytes()));
    put_u32(&mut dgram, at::DATA_SIZE, 4000);
    a.peer.expect(seq, T::InSync.raw(), Capacity::Unbounded);
    a.peer.send_raw(&dgram).unwrap();
    assert_eq!(a.peer.wait_reply(seq, Duration::from_secs(5)).unwrap().error, EINVAL);

    let s = http.scrape();
    let req = |t: &str, res: &str| d(&s, "ulog_requests_total", &[("log", name), ("type", t), ("result", res)]);
    assert_eq!(req("SET_REGION_SYNC", "ok"), 10.0);
    assert_eq!(req("IN_SYNC", "ok"), 20.0);
    assert_eq!(req("IN_SYNC", "error"), 1.0);
    assert_eq!(req("MARK_REGION", "ok"), 1.0);
    assert_eq!(req("FLUSH", "ok"), 1.0);
    assert_eq!(req("CLEAR_REGION", "ok"), 1.0);
    assert_eq!(req("CTR", "ok"), 1.0, "the reconnect CTR");
    assert_eq!(req("GET_SYNC_COUNT", "ok") + req("GET_SYNC_COUNT", "error"), 0.0);
    assert_eq!(s.get("ulog_requests_total", &[("log", name), ("type", "RESUME"), ("result", "ok")]), 1.0);
    assert_eq!(d(&s, "ulog_requests_without_log_total", &[("type", "GET_SYNC_COUNT")]), 1.0);
    assert_eq!(s.get("ulog_kernel_reconnects_total", &[("log", name)]), 1.0);
    assert_eq!(d(&s, "ulog_malformed_messages_total", &[]), 1.0);
    assert_eq!(s.get("ulog_malformed_messages_total", &[("reason", "bad_data_size")]), 1.0);
    // Service time: every IN_SYNC answered (21), in the histogram of its type; +Inf = count.
    assert_eq!(d(&s, "ulog_request_duration_seconds_count", &[("type", "IN_SYNC")]), 21.0);
    assert_eq!(
        s.get("ulog_request_duration_seconds_bucket", &[("type", "IN_SYNC"), ("le", "+Inf")]),
        s.get("ulog_request_duration_seconds_count", &[("type", "IN_SYNC")])
    );
    assert!(s.get("ulog_request_duration_seconds_sum", &[("type", "IN_SYNC")]) > 0.0);
    // Regions: 0..10 in sync; 3 marked and not cleared (dirty); 1, 2 cleared (clean again).
    assert_eq!(s.get("ulog_regions", &[("log", name), ("state", "out_of_sync")]), 115.0);
    assert_eq!(s.get("ulog_regions", &[("log", name), ("state", "dirty")]), 1.0);
    assert_eq!(s.get("ulog_regions", &[("log", name), ("state", "clean")]), 9.0);
    assert_eq!(s.get("ulog_resync_progress_ratio", &[("log", name)]), 10.0 / 125.0);
    assert_eq!(s.get("ulog_region_size_bytes", &[("log", name)]), 4096.0);
    assert_eq!(s.get("ulog_region_dirty_duration_seconds_count", &[("log", name)]), 2.0, "1 and 2: MARK to CLEAR");
    assert_eq!(s.get("ulog_region_dirty_untimed_total", &[("log", name)]), 0.0);
    assert_eq!(
        s.get(
            "ulog_log_info",
            &[("log", name), ("uuid", &log.uuid), ("type", "clustered-core"), ("device", ""), ("mirror", "")]
        ),
        1.0
    );
    assert!(s.get("ulog_log_last_resume_timestamp_seconds", &[("log", name)]) > 1.7e9);
    assert_eq!(s.get("ulog_logs", &[("type", "clustered-core"), ("state", "resumed")]), 1.0);
    assert_eq!(s.get("ulog_probe_attached", &[]), 0.0);
    assert!(!s.has("ulog_kernel_requests_total"), "kernel families only with the probe attached");
    assert!(!s.has("ulog_kernel_requests_correlated_total") && !s.has("ulog_probe_runs_total"));
    // No probes on this machine: the slow-request list is empty and says so.
    let slow = http.ok("/api/v1/kernel/slow?all=true");
    assert_eq!((slow["attached"].as_bool(), slow["kind"].as_str()), (Some(false), Some("all")));
    assert_eq!(slow["requests"].as_array().map(Vec::len), Some(0));
    assert!(!s.has("ulog_mirror_writes_total"), "no device-mapper here: no mirror metric");
    assert!(!s.has("ulog_disk_flush_bytes_total"), "a core log in memory writes nothing");
    assert_eq!(s.get("ulog_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(s.has("process_resident_memory_bytes"));

    // The same through the JSON API.
    let logs = http.ok("/api/v1/logs");
    let l = &logs["logs"][0];
    assert_eq!(logs["logs"].as_array().unwrap().len(), 1);
    assert_eq!((l["name"].as_str(), l["uuid"].as_str()), (Some(name), Some(log.uuid.as_str())));
    assert_eq!(l["luid"], format!("{LUID:#018x}"));
    assert_eq!((l["region_count"].as_u64(), l["sync_count"].as_u64()), (Some(125), Some(10)));
    assert_eq!((l["state"].as_str(), l["type"].as_str()), (Some("resumed"), Some("clustered-core")));
    assert!(l["resumed_at"].is_string() && l["device"].is_null() && l["mirror"].is_null());
    let det = http.ok(&format!("/api/v1/logs/{name}"));
    assert_eq!(det["regions"], serde_json::json!({"clean": 9, "dirty": 1, "out_of_sync": 115}));
    assert_eq!(det["kernel_reconnects"], 1);
    assert_eq!(det["dirty_time"]["count"], 2);
    let in_sync = det["requests"].as_array().unwrap().iter().find(|t| t["type"] == "IN_SYNC").unwrap();
    assert_eq!((in_sync["ok"].as_u64(), in_sync["error"].as_u64()), (Some(20), Some(1)));
    assert_eq!(http.ok(&format!("/api/v1/logs/{}", log.uuid))["name"], name, "a log is also found by its uuid");
    let agent = http.ok("/api/v1/agent");
    assert_eq!(agent["logs"], 1);
    assert_eq!(agent["state"], "serving");
    assert_eq!(agent["probe"]["attached"], false);
    let t = agent["requests"].as_array().unwrap().iter().find(|t| t["type"] == "IN_SYNC").unwrap();
    assert_eq!(t["service_time"]["count"].as_u64(), Some(21));
    // The flight recorder has the MARK, with its seq, regions and timing.
    let recs = http.ok(&format!("/api/v1/logs/{name}/requests?type=MARK_REGION"));
    let m = &recs["requests"][0];
    assert_eq!(
        (m["seq"].as_u64(), m["regions"].as_u64(), m["first_region"].as_u64()),
        (Some(u64::from(mark_seq)), Some(3), Some(1))
    );
    assert_eq!((m["error"].as_i64(), m["deferred"].as_bool()), (Some(0), Some(false)));
    assert!(m["service_time_seconds"].as_f64().unwrap() > 0.0);
}

/// The per-log SLO histogram (`ulog_log_request_duration_seconds{log, type}`): FLUSH and
/// MARK_REGION only, over the SLO edges only (12 series per log), at zero from the CTR on, counting
/// exactly the answers of its own log (a busy log's fast answers do not land in another log's
/// series), and gone with the DTR.
#[test]
fn per_log_slo_histograms_count_each_logs_flush_and_mark() {
    let (mut a, http) = start(Core::InMemory);
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let busy = Log::new("LVM-slobusy0001", LUID);
    let dlog = Log::new("LVM-slodisk0001", LUID + 1);
    a.create(&busy, "1000 clustered-core 8");
    a.create(&dlog, &format!("1000 clustered-disk {} 8", disk.display()));
    let family = "ulog_log_request_duration_seconds";
    let s = http.scrape();
    assert_eq!(s.les(family), ["+Inf", "0.0001", "0.016384", "15"].map(String::from).into(), "the SLO edges only");
    for name in ["slobusy0001", "slodisk0001"] {
        let series =
            s.samples.iter().filter(|x| x.0.starts_with(family) && x.1.iter().any(|l| l.0 == "log" && l.1 == name));
        assert_eq!(series.count(), 12, "{name}: 2 types x (4 buckets, _sum, _count)");
        for t in ["FLUSH", "MARK_REGION"] {
            assert_eq!(s.get(&format!("{family}_count"), &[("log", name), ("type", t)]), 0.0, "{name} {t} at CTR");
            assert_eq!(s.get(&format!("{family}_bucket"), &[("log", name), ("type", t), ("le", "+Inf")]), 0.0);
        }
        assert_eq!(s.sum(&format!("{family}_count"), &[("log", name), ("type", "IN_SYNC")]), 0.0, "no other type");
        assert!(!s.matching(&format!("{family}_count"), &[("type", "IN_SYNC")]).any(|_| true));
    }

    // Busy core log: 40 FLUSH, 30 MARK_REGION. Disk log: 3 recoveries, 3 MARKs (each waits for
    // a durable write), 5 FLUSHes.
    for r in 0..30 {
        a.mark(&busy, &[r]);
        a.flush(&busy, &[]);
    }
    for _ in 0..10 {
        a.flush(&busy, &[]);
    }
    for r in [3, 50, 100] {
        a.recover(&dlog, r);
        a.mark(&dlog, &[r]);
    }
    for _ in 0..5 {
        a.flush(&dlog, &[]);
    }
    let s = http.scrape();
    let count = |name: &str, t: &str| s.get(&format!("{family}_count"), &[("log", name), ("type", t)]);
    let inf = |name: &str, t: &str| s.get(&format!("{family}_bucket"), &[("log", name), ("type", t), ("le", "+Inf")]);
    let requests = |name: &str, t: &str| s.sum("ulog_requests_total", &[("log", name), ("type", t)]);
    for (name, t, want) in [
        ("slobusy0001", "FLUSH", 40.0),
        ("slobusy0001", "MARK_REGION", 30.0),
        ("slodisk0001", "FLUSH", 5.0),
        ("slodisk0001", "MARK_REGION", 3.0),
    ] {
        assert_eq!(count(name, t), want, "{name} {t}");
    }
    for name in ["slobusy0001", "slodisk0001"] {
        for t in ["FLUSH", "MARK_REGION"] {
            assert_eq!(count(name, t), requests(name, t), "{name} {t}: one observation per answer, ok or error");
            assert_eq!(inf(name, t), count(name, t), "{name} {t}: +Inf = _count");
            let le15 = s.get(&format!("{family}_bucket"), &[("log", name), ("type", t), ("le", "15")]);
            assert_eq!(le15, count(name, t), "{name} {t}: nothing took 15 s");
            assert!(s.get(&format!("{family}_sum"), &[("log", name), ("type", t)]) > 0.0);
        }
    }
    // The per-type histogram sums both logs.
    for t in ["FLUSH", "MARK_REGION"] {
        assert_eq!(
            s.get("ulog_request_duration_seconds_count", &[("type", t)]),
            count("slobusy0001", t) + count("slodisk0001", t),
            "{t}"
        );
    }

    // DTR: the log's series go with it; the other log's stay.
    a.suspend(&dlog);
    a.ok(&dlog, T::Dtr, &[]);
    let s = http.scrape();
    assert!(!s.matching(&format!("{family}_count"), &[("log", "slodisk0001")]).any(|_| true), "removed at DTR");
    assert_eq!(s.get(&format!("{family}_count"), &[("log", "slobusy0001"), ("type", "FLUSH")]), 40.0);
}

/// `--textfile-dir`: the file node_exporter reads says "serving, API not bound" while the API
/// cannot bind (another process holds its port), and "listening" once the port is free and the
/// agent's 5 s bind retry succeeds: what `up{job="ulog"} == 0` alone cannot tell.
#[test]
fn the_textfile_tells_serving_without_api_from_dead() {
    let textfiles = TempDir::new();
    let mut squatter = None;
    let mut a = Agent::start_with_args_after(
        Core::InMemory,
        &["--textfile-dir".to_string(), textfiles.path().display().to_string()],
        || {
            lo_up();
            squatter = Some(std::net::TcpListener::bind(ADDR).expect("take the API port first"));
        },
    );
    let file = textfiles.join("ulog-agent.prom");
    let value = |text: &str, name: &str| -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok())
    };
    // Polls the file until `want` holds (the agent writes it every 5 s).
    let wait_for = |want: &dyn Fn(&str) -> bool, what: &str, a: &Agent| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if want(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "{what}: {text:?}\n{}", a.proc.output());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let log = Log::new("LVM-textfile0001", LUID);
    a.create(&log, "1000 clustered-core 8");
    let text = wait_for(&|t| value(t, "ulog_agent_logs") == Some(1.0), "the log counted", &a);
    assert_eq!(value(&text, "ulog_agent_serving"), Some(1.0), "{text}");
    assert_eq!(
        value(&text, "ulog_agent_http_listening"),
        Some(0.0),
        "no such address: no API\n{text}\n{}",
        a.proc.output()
    );
    assert!(value(&text, "ulog_agent_textfile_timestamp_seconds").unwrap() > 1.7e9);
    // The requests are still served.
    assert_eq!(a.region_size(&log), 8);
    // The port freed: the agent's bind retry succeeds and the file says so.
    drop(squatter.take());
    let text = wait_for(&|t| value(t, "ulog_agent_http_listening") == Some(1.0), "the API bound", &a);
    assert_eq!(value(&text, "ulog_agent_serving"), Some(1.0));
    assert_eq!(Http::new().get("/readyz").0, 200, "the agent's API answers");
    let out = Command::new("promtool").args(["check", "metrics"]).stdin(std::fs::File::open(&file).unwrap()).output();
    let out = out.expect("promtool");
    assert!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(), "promtool check metrics: {out:?}");
}

#[test]
fn persistent_logs_export_their_durable_writes() {
    let (mut a, http) = start(Core::InMemory);
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let log = Log::new("LVM-apidisk0001", LUID);
    a.create(&log, &format!("1000 clustered-disk {} 8", disk.display()));
    let before = http.scrape();
    // A fresh disk log starts all dirty: recover (SET_REGION_SYNC + CLEAR) first, so each MARK
    // makes a clean region dirty and waits for a durable write.
    for r in [3, 50, 100] {
        a.recover(&log, r);
        a.mark(&log, &[r]);
    }
    let s = http.scrape();
    let l = [("log", "apidisk0001")];
    assert!(
        s.get("ulog_disk_flush_duration_seconds_count", &l) > before.get("ulog_disk_flush_duration_seconds_count", &l)
    );
    let bytes = s.get("ulog_disk_flush_bytes_total", &l);
    assert!(bytes >= 4096.0 && bytes % 1.0 == 0.0, "{bytes}");
    assert_eq!(s.get("ulog_disk_flush_errors_total", &l), 0.0);
    assert_eq!(s.get("ulog_log_device_failed", &l), 0.0);
    // No device-mapper on this host, so no kernel mirror: writes carrying clean bits flush no leg.
    for result in ["ok", "error"] {
        assert_eq!(s.get("ulog_leg_flushes_total", &[("log", "apidisk0001"), ("result", result)]), 0.0);
    }
    assert_eq!(s.get("ulog_leg_flush_failed", &l), 0.0);
    assert_eq!(s.get("ulog_requests_total", &[("log", "apidisk0001"), ("type", "MARK_REGION"), ("result", "ok")]), 3.0);
    assert_eq!(s.get("ulog_log_info", &[("log", "apidisk0001"), ("device", &disk.display().to_string())]), 1.0);
    // MARKs are answered after the write: deferred, timed to the persister's send.
    let recs = http.ok("/api/v1/logs/apidisk0001/requests?type=MARK_REGION&limit=3");
    let recs = recs["requests"].as_array().unwrap();
    assert_eq!(recs.len(), 3);
    for r in recs {
        assert_eq!(r["deferred"], true, "{r}");
        assert!(r["service_time_seconds"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!((r["regions"].as_u64(), r["error"].as_i64()), (Some(1), Some(0)));
    }
    assert_eq!(recs[0]["first_region"], 100, "newest first");
    let det = http.ok("/api/v1/logs/apidisk0001");
    assert!(det["disk"]["flush_time"]["count"].as_u64().unwrap() >= 1);
    assert_eq!(det["device"], disk.display().to_string());
    assert_eq!(det["device_number"], "0:0", "a regular file");
}

#[test]
fn promtool_accepts_a_real_scrape_and_the_rules_use_real_bucket_edges() {
    let (mut a, http) = start(Core::StateDir);
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let core = Log::new("LVM-promtoolcore", LUID);
    let dlog = Log::new("LVM-promtooldisk", LUID + 1);
    a.create(&core, "1000 clustered-core 8");
    a.create(&dlog, &format!("1000 clustered-disk {} 8", disk.display()));
    for log in [&core, &dlog] {
        a.set_sync(log, 1, 1);
        a.mark(log, &[1]);
        a.flush(log, &[]);
        a.clear(log, &[1]);
        a.in_sync(log, 1);
    }
    a.expect_err(&nolog(), T::InSync, &0u64.to_ne_bytes(), ESRCH, "no such log");
    let (_, _, text) = http.get("/metrics");
    let path = a.dir.join("scrape.txt");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install Debian's `prometheus` package (`cargo xtask setup`)")
        });
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("promtool check metrics: exit {}; output: {report:?}", out.status);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}\n--- scrape ---\n{text}"
    );

    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards/ulog-rules.yml");
    let out = Command::new("promtool").args(["check", "rules", rules]).output().unwrap();
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every SLO threshold of the rules is an exact bucket edge of the histogram it reads.
    let s = Scrape::parse(&text);
    let agent_les = s.les("ulog_request_duration_seconds");
    let kernel_les: BTreeSet<String> = KERNEL_EDGES_NS.iter().map(|&e| edge_seconds(e).to_string()).collect();
    let rules_text = std::fs::read_to_string(rules).unwrap();
    let mut checked = 0;
    for (family, les) in [
        ("ulog_request_duration_seconds_bucket{", &agent_les),
        ("ulog_kernel_request_duration_seconds_bucket{", &kernel_les),
    ] {
        for (at, _) in rules_text.match_indices(family) {
            let sel = &rules_text[at + family.len()..];
            let sel = &sel[..sel.find('}').unwrap()];
            let le = sel.split(',').find_map(|m| m.trim().strip_prefix("le")).expect("a bucket selector names le");
            let thresholds: Vec<String> = if let Some(v) = le.strip_prefix("=\"") {
                vec![v.trim_end_matches('"').to_string()]
            } else {
                // le=~"15|15\\.0": the plain spelling must be an edge.
                let v = le.strip_prefix("=~\"").unwrap().trim_end_matches('"');
                vec![v.split('|').next().unwrap().to_string()]
            };
            for t in thresholds {
                assert!(les.contains(&t), "rule threshold le={t} of {family}..}} is not a bucket edge: {les:?}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "the rules' thresholds were found ({checked})");
    for slo in ["0.0001", "0.02", "15"] {
        assert!(agent_les.contains(slo), "SLO edge {slo}");
    }
}

/// The response schema the document gives for `path` (a documented template) and `status`,
/// resolving `$ref`s to components/responses.
fn response_schema(doc: &Value, template: &str, status: u16) -> Option<Value> {
    let mut resp = doc["paths"][template]["get"]["responses"].get(status.to_string())?.clone();
    if let Some(r) = resp.get("$ref").and_then(Value::as_str) {
        resp = doc.pointer(r.trim_start_matches('#')).unwrap().clone();
    }
    let content = resp["content"].as_object().unwrap();
    let (ct, media) = content.iter().next().unwrap();
    Some(if ct == "application/json" { media["schema"].clone() } else { serde_json::json!({"type": "string"}) })
}

fn validate(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let mut root = schema.clone();
    let obj = root.as_object_mut().unwrap();
    obj.insert("$schema".into(), "https://json-schema.org/draft/2020-12/schema".into());
    obj.insert("components".into(), doc["components"].clone());
    let v = jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("{what}: bad schema: {e}"));
    let errors: Vec<String> = v.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(
        errors.is_empty(),
        "{what}: the response does not match the document:\n{}\n{instance:#}",
        errors.join("\n")
    );
}

#[test]
fn the_openapi_document_describes_the_server() {
    let doc: Value = serde_json::from_str(include_str!("../../openapi.json")).expect("openapi.json is JSON");
    // Exactly the routes the server has.
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| ops.as_object().unwrap().keys().map(move |m| (p.clone(), m.clone())))
        .collect();
    let served: BTreeSet<(String, String)> = api::ROUTES.iter().map(|(p, m)| (p.to_string(), m.to_string())).collect();
    assert_eq!(documented, served, "openapi.json paths vs api::ROUTES");

    let (mut a, http) = start(Core::InMemory);
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let core = Log::new("LVM-openapicore", LUID);
    a.create(&core, "1000 clustered-core 8");
    a.create(&Log::new("LVM-openapidisk", LUID + 1), &format!("1000 clustered-disk {} 8", disk.display()));
    a.set_sync(&core, 4, 1);
    a.mark(&core, &[4]);
    a.in_sync(&core, 4);
    a.resync_work(&core);
    let luid = format!("{LUID:#018x}");
    let cases: Vec<(String, &str, u16)> = vec![
        ("/healthz".into(), "/healthz", 200),
        ("/readyz".into(), "/readyz", 200),
        ("/metrics".into(), "/metrics", 200),
        ("/api/v1/agent".into(), "/api/v1/agent", 200),
        ("/api/v1/logs".into(), "/api/v1/logs", 200),
        ("/api/v1/logs/openapicore".into(), "/api/v1/logs/{log}", 200),
        ("/api/v1/logs/openapidisk".into(), "/api/v1/logs/{log}", 200),
        (format!("/api/v1/logs/LVM-openapicore?luid={luid}"), "/api/v1/logs/{log}", 200),
        ("/api/v1/logs/openapicore/regions".into(), "/api/v1/logs/{log}/regions", 200),
        ("/api/v1/logs/openapicore/regions?state=dirty&start=1&limit=5".into(), "/api/v1/logs/{log}/regions", 200),
        ("/api/v1/logs/openapicore/regions?state=all&limit=10000".into(), "/api/v1/logs/{log}/regions", 200),
        ("/api/v1/logs/openapicore/requests".into(), "/api/v1/logs/{log}/requests", 200),
        ("/api/v1/logs/openapicore/requests?type=IN_SYNC&limit=2".into(), "/api/v1/logs/{log}/requests", 200),
        ("/api/v1/logs/nosuchlog".into(), "/api/v1/logs/{log}", 404),
        ("/api/v1/logs/openapicore?luid=0x1".into(), "/api/v1/logs/{log}", 404),
        ("/api/v1/logs/openapicore?luid=zz".into(), "/api/v1/logs/{log}", 400),
        ("/api/v1/logs/openapicore?verbose=1".into(), "/api/v1/logs/{log}", 400),
        ("/api/v1/logs/nosuchlog/regions".into(), "/api/v1/logs/{log}/regions", 404),
        ("/api/v1/logs/openapicore/regions?state=bogus".into(), "/api/v1/logs/{log}/regions", 400),
        ("/api/v1/logs/openapicore/regions?limit=0".into(), "/api/v1/logs/{log}/regions", 400),
        ("/api/v1/logs/openapicore/regions?limit=10001".into(), "/api/v1/logs/{log}/regions", 400),
        ("/api/v1/logs/openapicore/regions?start=-1".into(), "/api/v1/logs/{log}/regions", 400),
        ("/api/v1/logs/openapicore/regions?start=126".into(), "/api/v1/logs/{log}/regions", 400),
        ("/api/v1/logs/openapicore/regions?start=".into(), "/api/v1/logs/{log}/regions", 400),
        ("/api/v1/logs/openapicore/requests?limit=129".into(), "/api/v1/logs/{log}/requests", 400),
        ("/api/v1/logs/openapicore/requests?type=NOPE".into(), "/api/v1/logs/{log}/requests", 400),
        ("/api/v1/logs/nosuchlog/requests".into(), "/api/v1/logs/{log}/requests", 404),
        ("/api/v1/kernel/slow".into(), "/api/v1/kernel/slow", 200),
        ("/api/v1/kernel/slow?all=true&limit=3".into(), "/api/v1/kernel/slow", 200),
        ("/api/v1/kernel/slow?limit=0".into(), "/api/v1/kernel/slow", 400),
        ("/api/v1/kernel/slow?limit=257".into(), "/api/v1/kernel/slow", 400),
        ("/api/v1/kernel/slow?all=maybe".into(), "/api/v1/kernel/slow", 400),
        ("/api/v1/kernel/slow?verbose=1".into(), "/api/v1/kernel/slow", 400),
    ];
    for (path, template, want) in &cases {
        let (status, ct, body) = http.get(path);
        assert_eq!(status, *want, "GET {path}: {body}");
        let schema = response_schema(&doc, template, status)
            .unwrap_or_else(|| panic!("{template}: status {status} undocumented"));
        if template == &"/metrics" {
            assert!(ct.starts_with("text/plain") && body.contains("ulog_build_info"), "{ct}");
            continue;
        }
        assert!(ct.starts_with("application/json"), "GET {path}: {ct}");
        let v: Value = serde_json::from_str(&body).unwrap();
        validate(&doc, &schema, &v, &format!("GET {path}"));
        if status == 404 {
            assert_eq!(v["error"]["code"], "log_not_found", "{path}");
        }
    }
    // Errors outside any documented operation are Error documents too.
    let error_schema = serde_json::json!({"$ref": "#/components/schemas/Error"});
    let (status, v) = http.json("/api/v1/nope");
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("not_found")));
    validate(&doc, &error_schema, &v, "GET /api/v1/nope");
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let r = http.agent.run(
            ureq::http::Request::builder().method(method).uri(format!("http://{ADDR}/api/v1/logs")).body(()).unwrap(),
        );
        let mut r = r.unwrap();
        assert_eq!(r.status().as_u16(), 405, "{method}");
        assert_eq!(r.headers().get("allow").unwrap(), "GET, HEAD");
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        validate(&doc, &error_schema, &v, method);
        assert_eq!(v["error"]["code"], "method_not_allowed");
    }
    // HEAD works on GET routes.
    let r = http.agent.head(format!("http://{ADDR}/healthz")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn region_pages_and_filters_are_exact() {
    let (mut a, http) = start(Core::InMemory);
    let log = Log::new("LVM-apiregions", LUID);
    a.create(&log, "1000 clustered-core 2"); // 500 regions
    for r in (0..500).filter(|r| r % 7 != 0) {
        a.set_sync(&log, r, 1);
    }
    a.mark(&log, &[5, 13, 100]);
    let page_all = |state: &str, limit: usize| -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut start = Some(0u64);
        let mut pages = 0;
        while let Some(s) = start {
            let p = http.ok(&format!("/api/v1/logs/apiregions/regions?state={state}&start={s}&limit={limit}"));
            let regions = p["regions"].as_array().unwrap();
            assert!(regions.len() <= limit);
            out.extend(
                regions.iter().map(|r| (r["region"].as_u64().unwrap(), r["state"].as_str().unwrap().to_string())),
            );
            start = p["next"].as_u64();
            pages += 1;
            assert!(pages < 1000);
        }
        out
    };
    let oos = page_all("out_of_sync", 7);
    assert_eq!(oos.iter().map(|r| r.0).collect::<Vec<_>>(), (0..500).filter(|r| r % 7 == 0).collect::<Vec<_>>());
    assert!(oos.iter().all(|r| r.1 == "out_of_sync"));
    let dirty = page_all("dirty", 2);
    assert_eq!(dirty, vec![(5, "dirty".into()), (13, "dirty".into()), (100, "dirty".into())]);
    let clean = page_all("clean", 100);
    assert_eq!(clean.len(), 500 - oos.len() - 3);
    let all = page_all("all", 10_000);
    assert_eq!(all.len(), 500);
    let by_state: HashMap<u64, &str> = all.iter().map(|(r, s)| (*r, s.as_str())).collect();
    assert_eq!(by_state[&0], "out_of_sync");
    assert_eq!(by_state[&5], "dirty");
    assert_eq!(by_state[&6], "clean");
    let p = http.ok("/api/v1/logs/apiregions/regions?start=499&limit=10");
    assert_eq!((p["regions"].as_array().unwrap().len(), p["next"].is_null()), (1, true));
    let p = http.ok("/api/v1/logs/apiregions/regions?start=500");
    assert_eq!((p["regions"].as_array().unwrap().len(), p["next"].is_null()), (0, true));
    assert_eq!(http.json("/api/v1/logs/apiregions/regions?start=501").0, 400);
    let det = http.ok("/api/v1/logs/apiregions");
    assert_eq!(det["regions"]["out_of_sync"].as_u64(), Some(oos.len() as u64));
    assert_eq!(det["regions"]["dirty"], 3);
}

#[test]
fn the_flight_recorder_keeps_the_newest_requests() {
    let (mut a, http) = start(Core::InMemory);
    let log = Log::new("LVM-apiflight", LUID);
    a.create(&log, "1000 clustered-core 8");
    let mut seqs = Vec::new();
    for i in 0..200u64 {
        seqs.push(a.call(&log, T::InSync, &(i % 125).to_ne_bytes()).seq);
    }
    let work = a.call(&log, T::GetResyncWork, &[]);
    // The agent writes a request's flight record right after it sent the reply, so the reply
    // can reach this client first: wait (bounded) until the newest record is that request.
    let mut recs = http.ok("/api/v1/logs/apiflight/requests");
    for _ in 0..100 {
        if recs["requests"][0]["seq"].as_u64() == Some(u64::from(work.seq)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        recs = http.ok("/api/v1/logs/apiflight/requests");
    }
    assert_eq!(recs["capacity"], 128);
    let recs = recs["requests"].as_array().unwrap();
    assert_eq!(recs.len(), 128, "the ring keeps 128");
    assert_eq!(recs[0]["type"], "GET_RESYNC_WORK");
    assert_eq!(recs[0]["seq"].as_u64(), Some(u64::from(work.seq)));
    let (i, r) = (
        i64::from_ne_bytes(work.payload[..8].try_into().unwrap()),
        u64::from_ne_bytes(work.payload[8..].try_into().unwrap()),
    );
    assert_eq!(recs[0]["reply"], serde_json::json!([i, r]));
    let ids: Vec<u64> = recs.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1] + 1), "newest first, consecutive");
    for (rec, seq) in recs[1..].iter().zip(seqs.iter().rev()) {
        assert_eq!(rec["seq"].as_u64(), Some(u64::from(*seq)));
        assert_eq!(
            (rec["type"].as_str(), rec["regions"].as_u64(), rec["reply_bytes"].as_u64()),
            (Some("IN_SYNC"), Some(1), Some(8))
        );
        assert_eq!(rec["reply"], serde_json::json!([0]), "nothing is in sync");
        assert!(rec["service_time_seconds"].as_f64().unwrap() > 0.0);
    }
    let two = http.ok("/api/v1/logs/apiflight/requests?limit=2&type=IN_SYNC");
    assert_eq!(two["requests"].as_array().unwrap().len(), 2);
    assert_eq!(two["requests"][0]["seq"].as_u64(), Some(u64::from(*seqs.last().unwrap())));
}

#[test]
fn hostile_http_clients_do_not_stall_the_log_server() {
    let (mut a, http) = start(Core::InMemory);
    let log = Log::new("LVM-apihostile", LUID);
    a.create(&log, "2147483648 clustered-core 1024"); // 2^21 regions
    let in_sync_burst = |a: &mut Agent, what: &str| {
        let mut worst = Duration::ZERO;
        let t0 = Instant::now();
        for i in 0..3000u64 {
            let t = Instant::now();
            a.in_sync(&log, (i * 7919) % (1 << 21));
            worst = worst.max(t.elapsed());
        }
        // Every request is answered (the peer fails the test on a lost answer); how long they
        // took is reported, not asserted: speed belongs to the benchmarks, and a loaded CI
        // machine may pause this process for any time.
        eprintln!("3000 IN_SYNC {what}: {:?} in all, worst {worst:?}", t0.elapsed());
    };
    // Idle clients take most connection slots: half send half a request and stop, half send
    // nothing at all.
    let connect_idle = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|i| {
                let mut c = TcpStream::connect(ADDR).unwrap();
                if i % 2 == 0 {
                    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
                }
                c
            })
            .collect()
    };
    let mut idle = connect_idle(api::MAX_CONNECTIONS - 4);
    // Threads use the rest with the heaviest calls: whole-log scans and scrapes, back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hammers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            std::thread::spawn(move || {
                let h = Http::new();
                while !stop.load(Ordering::Relaxed) {
                    let url = format!("http://{ADDR}/api/v1/logs/apihostile/regions?state=dirty&limit=10000");
                    if h.agent.get(&url).call().is_ok_and(|r| r.status() == 200) {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = h.agent.get(format!("http://{ADDR}/metrics")).call();
                }
            })
        })
        .collect();
    // Bursts go on until at least one scan has completed during one (on a loaded machine the
    // first burst can end before the first scan does), so the overlap is real.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let before = served.load(Ordering::Relaxed);
        in_sync_burst(&mut a, "while the API scans a 2^21-region log back to back");
        if served.load(Ordering::Relaxed) > before || Instant::now() > deadline {
            break;
        }
    }
    assert!(served.load(Ordering::Relaxed) > 0, "the scans ran meanwhile");
    stop.store(true, Ordering::Relaxed);
    for h in hammers {
        h.join().unwrap();
    }
    // Now every slot is taken by idle clients (the hammers' connections are gone; wait for the
    // server to see them close).
    std::thread::sleep(Duration::from_millis(300));
    idle.extend(connect_idle(20));
    std::thread::sleep(Duration::from_millis(100));
    in_sync_burst(&mut a, "with every HTTP connection slot held by idle clients");
    // A new client is turned away (its connection closed: end of stream, no answer) rather
    // than left hanging (which the generous read timeout would turn into an error).
    let mut c = TcpStream::connect(ADDR).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    let read = c.read(&mut buf);
    assert!(
        matches!(read, Ok(0)) || read.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "a connection beyond the limit is closed, got {read:?}"
    );
    // Once the idle clients go, the API serves again.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(60); // a liveness bound, not a speed check
    while http.agent.get(format!("http://{ADDR}/healthz")).call().map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "the API did not recover");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http.ok("/api/v1/logs/apihostile")["state"], "resumed");
}

#[test]
fn the_status_command_summarises_the_agent() {
    let (mut a, _http) = start(Core::InMemory);
    let log = Log::new("LVM-apistatus", LUID);
    a.create(&log, "1000 clustered-core 8");
    a.set_sync(&log, 0, 1);
    for r in 0..50 {
        a.in_sync(&log, r % 125);
    }
    // Traffic while it samples, so it has rates to show.
    let child = Command::new(agent_bin())
        .args(["status", "--addr", ADDR, "--interval", "0.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut i = 0u64;
    while t.elapsed() < Duration::from_millis(1500) {
        a.in_sync(&log, i % 125);
        i += 1;
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "status: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    for want in ["ulog-agent", "ready", "apistatus", "resumed", "1 (0.8%)", "IN_SYNC", "REQ/S", "P99"] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    let row = text.lines().find(|l| l.starts_with("IN_SYNC")).unwrap();
    let rate: f64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(rate > 0.0, "an IN_SYNC rate was measured: {row}");
    eprintln!("{text}");
    let out = Command::new(agent_bin()).args(["status", "--addr", "127.0.0.1:1", "--interval", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

/// The API does what README says: a parameter an endpoint does not take is refused (a typo
/// such as `?lmit=10` must not be silently ignored), errors say what is wrong without the
/// parser's internals, `/` links to the rest, and `/api/v1/kernel/slow` reports the configured
/// threshold (`--slow-request-us`, default 1 ms) even before any probe was attached.
#[test]
fn unknown_parameters_are_refused_and_the_landing_page_links_the_api() {
    let (mut a, http) = start(Core::InMemory);
    a.create(&Log::new("LVM-apiconv0001", LUID), "1000 clustered-core 8");
    for path in [
        "/metrics?foo=1",
        "/healthz?x",
        "/api/v1/agent?verbose=true",
        "/api/v1/logs?luid=1",
        "/api/v1/logs/apiconv0001?lmit=3",
        "/api/v1/logs/apiconv0001/regions?limit=5&sate=dirty",
        "/api/v1/kernel/slow?limt=2",
    ] {
        let (status, body) = http.json(path);
        assert_eq!(status, 400, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(message.contains("unknown query parameter"), "{path}: {message}");
    }
    // Parameters an endpoint takes still work, and a bad value is said plainly.
    assert_eq!(http.json("/api/v1/logs/apiconv0001/regions?limit=5").0, 200);
    let (status, body) = http.json("/api/v1/kernel/slow?limit=x");
    assert_eq!(status, 400);
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.contains("deserialize") && message.contains("wrong form"), "{message}");
    let (status, _, page) = http.get("/");
    assert_eq!(status, 200);
    for link in ["/metrics", "/api/v1/logs", "/api/v1/agent", "/healthz"] {
        assert!(page.contains(&format!("href=\"{link}\"")), "{page}");
    }
    let (status, slow) = http.json("/api/v1/kernel/slow");
    assert_eq!(status, 200);
    assert_eq!(slow["threshold_seconds"], serde_json::json!(0.001), "{slow}");
}

#[test]
fn health_and_readiness() {
    let (_a, http) = start(Core::InMemory);
    assert_eq!(http.json("/healthz"), (200, serde_json::json!({"status": "ok"})));
    assert_eq!(http.json("/readyz"), (200, serde_json::json!({"status": "ready"})));
}

/// An agent in a time namespace reads a CLOCK_MONOTONIC offset from the kernel's own, which the
/// eBPF probes use: it must notice and say so (it converts kernel times by the offset) rather
/// than compare offset clocks. Run under `unshare --time --monotonic 86400`.
#[test]
fn an_agent_in_a_time_namespace_says_so() {
    enter_private_netns().expect("root");
    let mut peer = KernelPeer::open().unwrap();
    let dir = TempDir::new();
    let wrapper = dir.join("in-time-namespace.sh");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec unshare --time --monotonic 86400 --fork --kill-child {} \"$@\"\n", agent_bin()),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let proc = AgentProcess::spawn_ready(&wrapper, &mut peer, ["--no-http"]).unwrap_or_else(|e| panic!("{e}"));
    let log = Log::nth(0);
    let r = peer.call_request(&Request::ctr(&log.uuid, log.luid, CORE)).unwrap();
    assert_eq!(r.error, 0, "served as usual: {r}");
    let out = proc.output();
    assert!(
        out.contains("the agent runs in a time namespace") && out.contains("86400000000000"),
        "no word of the time namespace in:\n{out}"
    );
}

/// Requests that waited in the socket queue while the agent was stopped (SIGSTOP for 1 s, sent
/// while it waited in recvfrom) are counted in ulog_requests_after_stall_total by type; their
/// service time (from recvfrom) would not show the wait. Requests served without a stall are
/// not counted.
#[test]
fn requests_queued_through_a_stall_are_counted() {
    let (mut a, http) = start(Core::InMemory);
    let log = Log::nth(0);
    a.create(&log, "512 clustered-core 8");
    a.mark(&log, &[1]);
    a.flush(&log, &[]);
    let after_stall = |s: &Scrape, t: &str| s.get("ulog_requests_after_stall_total", &[("type", t)]);
    let s0 = http.scrape();
    assert_eq!(after_stall(&s0, "MARK_REGION"), 0.0, "before the stall");
    assert_eq!(after_stall(&s0, "FLUSH"), 0.0, "before the stall");

    let pid = a.proc.pid() as libc::pid_t;
    // SAFETY: signals to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // kill() returns before the stop takes effect: wait until every thread is stopped, so the
    // requests below are queued, not received by a receive loop that still runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !all_threads_stopped(pid) {
        assert!(Instant::now() < deadline, "the agent did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mark = a.peer.send(&Request::new(T::MarkRegion, &log.uuid, log.luid, regions_payload(&[2]))).unwrap();
    let flush = a.peer.send(&Request::new(T::Flush, &log.uuid, log.luid, vec![])).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let mut answered = Vec::new();
    for _ in 0..2 {
        let r = a.peer.recv_reply(Duration::from_secs(10)).unwrap();
        assert_eq!(r.error, 0, "{r}");
        answered.push(r.seq);
    }
    answered.sort_unstable();
    let mut sent = vec![mark, flush];
    sent.sort_unstable();
    assert_eq!(answered, sent);
    let s1 = http.scrape();
    assert_eq!(after_stall(&s1, "MARK_REGION"), 1.0, "the MARK_REGION queued during the stall");
    assert_eq!(after_stall(&s1, "FLUSH"), 1.0, "the FLUSH queued during the stall");
    assert_eq!(after_stall(&s1, "IN_SYNC"), 0.0);

    // Served without a stall: not counted.
    a.mark(&log, &[3]);
    a.flush(&log, &[]);
    let s2 = http.scrape();
    assert_eq!(after_stall(&s2, "MARK_REGION"), 1.0, "a request served without a stall");
    assert_eq!(after_stall(&s2, "FLUSH"), 1.0, "a request served without a stall");
}

/// Whether every thread of `pid` is in the stopped state (`T` in /proc/PID/task/TID/stat).
fn all_threads_stopped(pid: libc::pid_t) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
            .unwrap_or(false)
    })
}

/// `ulog-agent cluster confirm-fenced` against a single-node agent: refused with a clear
/// message (HTTP 409, exit status 1), nothing changes. The cluster case is in `cluster`.
#[test]
fn confirm_fenced_is_refused_outside_cluster_mode() {
    let (mut a, http) = start(Core::InMemory);
    let log = Log::new("LVM-apifence", LUID);
    a.create(&log, "1000 clustered-core 8");
    let out =
        Command::new(agent_bin()).args(["cluster", "confirm-fenced", "--addr", ADDR, "--node", "2"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("409") && err.contains("not in cluster mode"), "{err}");
    // The endpoint takes POST only.
    let (status, _, _) = http.get("/api/v1/cluster/confirm-fenced");
    assert_eq!(status, 405);
}
