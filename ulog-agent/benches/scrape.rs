//! What scraping `/metrics` costs the request path: the bench-profile agent under a saturating
//! request load from a [`KernelPeer`], measured with no scraper, with a scrape every second (the
//! requirement: <= 1% of the request path), and with a scrape every 100 ms (ten times the rate,
//! so the per-scrape cost stands out of the noise; the 1 s figure extrapolated from it is
//! reported beside the direct one).
//!
//! * Agent: `ulog-agent -f --accept-peer-port <peer>` in a private network namespace with its
//!   loopback up, serving its HTTP API on 127.0.0.1:9477. 16 `clustered-core` logs of 2^21
//!   regions (`nosync`; 64 regions marked per log), so every scrape walks 16 × 2 bitmaps of
//!   256 KiB for the region counts: a heavy, realistic host.
//! * Load: the peer keeps 32 IN_SYNC requests in flight (pseudo-random regions over all logs):
//!   the receive thread is saturated, so anything the scrape takes from it shows as throughput.
//! * Scraper: a thread of this process, `GET /metrics` over HTTP/1.1 (a new connection each
//!   time, as a worst case for the agent), at the configured period.
//! * Per measurement: requests/s; the receive thread's CPU time per request
//!   (`/proc/<pid>/task/<tid>/schedstat` of `ulog-recv`); the CPU time of the agent's other
//!   threads (HTTP worker and blocking pool) per scrape; the scrape's latency and size.
//! * Rounds: each round measures the three configurations in a rotated order; overheads are
//!   medians over rounds of the per-round ratio to the unscraped run (paired, so slow drift of
//!   the shared machine cancels).
//!
//! Part 2, **in process** (the precise figure; the end-to-end one moves with the shared machine's
//! load by tens of percent): one `LogServer` with the same 16 logs, its receive path
//! (`handle_datagram` of pre-encoded IN_SYNC datagrams, replies to a counting sink) run flat out
//! on one thread, while another thread renders the exposition (`Exporter::render`, exactly what
//! `/metrics` serves, minus HTTP) every 1 s, 100 ms, 10 ms or 1 ms, or never. Rounds interleave
//! the periods; the cost per scrape is the slope of the throughput loss over the scrape rate
//! (least squares over the rounds' paired ratios), and the figure at 1 scrape/s is that slope.
//!
//! Output: JSON lines (`ULOG-BENCH {...}` on stdout and `<target>/ulog-bench/scrape.jsonl`).
//! Run: `cargo bench -p ulog-agent --bench scrape [-- --quick] [-- --rounds N --secs S]
//! [--in-process-only | --end-to-end-only]`.

#[path = "common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{median, quantile, Results, J};
use ulog_agent::metrics::counters::Counters;
use ulog_agent::metrics::export::Exporter;
use ulog_agent::region_log::persist::ReplySink;
use ulog_agent::server::{LogServer, ServerConfig};
use ulog_agent::wire::kernel_peer::{
    encode_request, enter_private_netns, regions_payload, AgentProcess, KernelPeer, Request,
};
use ulog_common::RequestType;

const LOGS: u64 = 16;
const REGIONS: u64 = 1 << 21;
const DEPTH: usize = 32;
const ADDR: &str = "127.0.0.1:9477";

fn lo_up() {
    // SAFETY: socket/ioctl on a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), 0);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), 0);
        libc::close(fd);
    }
}

/// CPU ns of thread `tid` of `pid`.
fn thread_cpu(pid: u32, tid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (receive thread CPU ns, CPU ns of every other thread) of the agent.
fn agent_cpu(pid: u32) -> (u64, u64) {
    let (mut recv, mut other) = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("agent threads").flatten() {
        let tid = e.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        let cpu = thread_cpu(pid, &tid);
        if comm.trim() == "ulog-recv" {
            recv += cpu;
        } else {
            other += cpu;
        }
    }
    (recv, other)
}

/// This thread's CPU time, ns.
fn thread_cpu_now() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn log_name(i: u64) -> String {
    format!("LVM-bench-scrape-{i:02}")
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Config {
    NoScrape,
    Every(Duration),
}

impl Config {
    fn name(self) -> String {
        match self {
            Config::NoScrape => "none".into(),
            Config::Every(d) => format!("every {} ms", d.as_millis()),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Measured {
    req_per_s: f64,
    recv_cpu_per_req_ns: f64,
    other_cpu_ns: f64,
    scrapes: u64,
    scrape_ms: Vec<f64>,
    scrape_bytes: u64,
    p50_us: f64,
    p99_us: f64,
}

/// Keeps DEPTH IN_SYNC in flight for `secs`, scraping per `cfg`.
fn measure(peer: &mut KernelPeer, pid: u32, cfg: Config, secs: f64, rng: &mut u64) -> Measured {
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scrape_info = Arc::new(Mutex::new((Vec::<f64>::new(), 0u64)));
    // The scraper thread exists in every configuration and wakes every 50 ms in all of them, so
    // the configurations differ only by the scrapes (a sleeping-and-waking thread alone changes
    // how the client and the agent are scheduled on a small machine).
    let period = match cfg {
        Config::NoScrape => None,
        Config::Every(p) => Some(p),
    };
    let scraper = {
        let (stop, scrapes, info) = (Arc::clone(&stop), Arc::clone(&scrapes), Arc::clone(&scrape_info));
        Some(std::thread::spawn(move || {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).build().into();
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(period) = period {
                    let t = Instant::now();
                    // A fresh agent per scrape would pool nothing either; ureq closes after the
                    // body is read when asked to: keep it simple and close explicitly.
                    let body = agent
                        .get(format!("http://{ADDR}/metrics"))
                        .header("Connection", "close")
                        .call()
                        .expect("scrape")
                        .body_mut()
                        .read_to_string()
                        .expect("scrape body");
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    scrapes.fetch_add(1, Ordering::Relaxed);
                    let mut i = info.lock().unwrap();
                    i.0.push(ms);
                    i.1 = body.len() as u64;
                    drop(i);
                    next += period;
                } else {
                    next += Duration::from_secs(1);
                }
                while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50).min(next.saturating_duration_since(Instant::now())));
                }
            }
        }))
    };
    let mut next_req = |peer: &mut KernelPeer| {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let log = *rng % LOGS;
        let r = (*rng >> 8) % REGIONS;
        let req = Request::new(RequestType::InSync, &log_name(log), 1000 + log, r.to_ne_bytes());
        (peer.send(&req).expect("send"), Instant::now())
    };
    let mut inflight: std::collections::HashMap<u32, Instant> = std::collections::HashMap::new();
    for _ in 0..DEPTH {
        let (s, t) = next_req(peer);
        inflight.insert(s, t);
    }
    // Warm-up, then measure.
    let mut lat = Vec::new();
    let mut done = 0u64;
    let warm = Instant::now() + Duration::from_millis(300);
    let mut start: Option<(Instant, (u64, u64))> = None;
    let end_at = warm + Duration::from_secs_f64(secs);
    loop {
        let r = peer.recv_reply(Duration::from_secs(20)).expect("reply");
        assert_eq!(r.error, 0, "{r}");
        let sent = inflight.remove(&r.seq).expect("a reply to a request in flight");
        let now = Instant::now();
        if start.is_none() && now >= warm {
            start = Some((now, agent_cpu(pid)));
            scrapes.store(0, Ordering::Relaxed);
            scrape_info.lock().unwrap().0.clear();
        }
        if start.is_some() {
            done += 1;
            lat.push(now.duration_since(sent).as_nanos() as u64);
        }
        if now >= end_at {
            break;
        }
        let (s, t) = next_req(peer);
        inflight.insert(s, t);
    }
    let (t0, (recv0, other0)) = start.expect("measured");
    let elapsed = t0.elapsed().as_secs_f64();
    let (recv1, other1) = agent_cpu(pid);
    stop.store(true, Ordering::Relaxed);
    // Drain what is still in flight.
    while !inflight.is_empty() {
        let r = peer.recv_reply(Duration::from_secs(20)).expect("drain");
        inflight.remove(&r.seq);
    }
    if let Some(s) = scraper {
        s.join().unwrap();
    }
    lat.sort_unstable();
    let info = scrape_info.lock().unwrap().clone();
    Measured {
        req_per_s: done as f64 / elapsed,
        recv_cpu_per_req_ns: (recv1 - recv0) as f64 / done as f64,
        other_cpu_ns: (other1 - other0) as f64,
        scrapes: scrapes.load(Ordering::Relaxed),
        scrape_ms: info.0,
        scrape_bytes: info.1,
        p50_us: quantile(&lat, 0.5) as f64 / 1e3,
        p99_us: quantile(&lat, 0.99) as f64 / 1e3,
    }
}

fn arg_value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    if !common::start_as_root("scrape") {
        return;
    }
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("RUST_LOG", "warn") };
    let mut results = Results::new("scrape");
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--end-to-end-only") {
        in_process(&mut results);
    }
    if !args.iter().any(|a| a == "--in-process-only") {
        end_to_end(&mut results);
    }
    results.write();
}

/// Counts replies; sends nothing.
#[derive(Default)]
struct CountingSink(AtomicU64);

impl ReplySink for CountingSink {
    fn send_reply(&self, _port: u32, _d: &[u8]) -> bool {
        self.0.fetch_add(1, Ordering::Relaxed);
        true
    }
}

fn in_process(results: &mut Results) {
    let quick = common::quick();
    let rounds: usize =
        arg_value("--rounds").map(|v| v.parse().expect("--rounds N")).unwrap_or(if quick { 4 } else { 12 });
    let window = Duration::from_secs_f64(if quick { 0.5 } else { 1.0 });
    let sink = Arc::new(CountingSink::default());
    let mut server = LogServer::new(ServerConfig::default(), sink.clone(), 4242, Arc::new(Counters::default()));
    let mut seq = 1u32;
    let mut enc = |req: &Request| {
        seq = seq.wrapping_add(1);
        encode_request(req, seq, 3).expect("encodable")
    };
    for i in 0..LOGS {
        let (uuid, luid) = (log_name(i), 1000 + i);
        let ctr = format!("{} clustered-core 1024 nosync", REGIONS * 1024);
        server.handle_datagram(&enc(&Request::ctr(&uuid, luid, &ctr)), 0, false);
        server.handle_datagram(&enc(&Request::new(RequestType::Resume, &uuid, luid, vec![])), 0, false);
        let regions: Vec<u64> = (0..32).map(|k| (k * 65_537 + i * 7) % REGIONS).collect();
        server.handle_datagram(
            &enc(&Request::new(RequestType::MarkRegion, &uuid, luid, regions_payload(&regions))),
            0,
            false,
        );
    }
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let pool: Vec<Vec<u8>> = (0..1024)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let log = rng % LOGS;
            enc(&Request::new(RequestType::InSync, &log_name(log), 1000 + log, ((rng >> 8) % REGIONS).to_ne_bytes()))
        })
        .collect();
    let exporter = Arc::new(Exporter::new(Arc::clone(server.telemetry())));
    let series = exporter.render().lines().filter(|l| !l.starts_with('#')).count();
    // CPU time of one render and of its largest part, the region counts (thread CPU clock, so
    // the machine's other load does not inflate it).
    let cpu_ms = |f: &dyn Fn()| {
        let t0 = thread_cpu_now();
        for _ in 0..20 {
            f();
        }
        (thread_cpu_now() - t0) as f64 / 20.0 / 1e6
    };
    let render_cpu_ms = cpu_ms(&|| {
        std::hint::black_box(exporter.render());
    });
    let tel = Arc::clone(server.telemetry());
    let count_cpu_ms = cpu_ms(&|| {
        for h in tel.logs().iter() {
            std::hint::black_box(h.tel.region_counts(&h.shared, h.region_count));
        }
    });
    println!("one render: {render_cpu_ms:.2} ms of CPU, of which region counts {count_cpu_ms:.2} ms ({series} series)");
    results.push(&[
        ("bench", J::from("scrape")),
        ("kind", "render_cost".into()),
        ("render_cpu_ms", render_cpu_ms.into()),
        ("region_count_cpu_ms", count_cpu_ms.into()),
        ("series", series.into()),
    ]);
    // The longest the exporter holds a log's mutex: one chunk copy (lock + copy_words of
    // CHUNK_WORDS words of both bitmaps).
    let hold_ns = {
        let h = Arc::clone(&tel.logs()[0]);
        let (mut c, mut sy) = (
            vec![0u64; ulog_agent::metrics::regions::CHUNK_WORDS],
            vec![0u64; ulog_agent::metrics::regions::CHUNK_WORDS],
        );
        let mut worst = 0u64;
        let mut all = Vec::new();
        for i in 0..200 {
            let t = Instant::now();
            let n = h.shared.lock().copy_words((i % 8) * c.len(), &mut c, &mut sy);
            let ns = t.elapsed().as_nanos() as u64;
            assert!(n > 0);
            worst = worst.max(ns);
            all.push(ns);
        }
        all.sort_unstable();
        (quantile(&all, 0.5), worst)
    };
    println!(
        "one chunk under the log's mutex: median {:.1} µs, worst {:.1} µs of 200",
        hold_ns.0 as f64 / 1e3,
        hold_ns.1 as f64 / 1e3
    );
    results.push(&[
        ("bench", J::from("scrape")),
        ("kind", "lock_hold".into()),
        ("chunk_copy_us_median", (hold_ns.0 as f64 / 1e3).into()),
        ("chunk_copy_us_worst", (hold_ns.1 as f64 / 1e3).into()),
    ]);
    let periods: [Option<Duration>; 4] =
        [None, Some(Duration::from_secs(1)), Some(Duration::from_millis(100)), Some(Duration::from_millis(10))];
    let name = |p: Option<Duration>| p.map_or("none".to_string(), |d| format!("every {} ms", d.as_millis()));
    // rates[config][round] = requests/s; cpus[config][round] = the receive path's CPU ns per
    // request (its thread's CPU clock: the machine's other load does not count, cache misses
    // and lock handoffs do); renders[config] = (renders, render ns).
    let mut rates = vec![Vec::new(); periods.len()];
    let mut cpus = vec![Vec::new(); periods.len()];
    let mut render_ns = vec![(0u64, 0u64); periods.len()];
    for round in 0..rounds {
        for k in 0..periods.len() {
            let ci = (k + round) % periods.len();
            let stop = Arc::new(AtomicBool::new(false));
            let renders = Arc::new(AtomicU64::new(0));
            let spent = Arc::new(AtomicU64::new(0));
            let scraper = {
                let (stop, renders, spent, ex) =
                    (Arc::clone(&stop), Arc::clone(&renders), Arc::clone(&spent), Arc::clone(&exporter));
                let period = periods[ci];
                std::thread::spawn(move || {
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(p) = period {
                            let t = Instant::now();
                            std::hint::black_box(ex.render());
                            spent.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            renders.fetch_add(1, Ordering::Relaxed);
                            next += p;
                        } else {
                            next += Duration::from_secs(1);
                        }
                        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(
                                Duration::from_millis(50).min(next.saturating_duration_since(Instant::now())),
                            );
                        }
                    }
                })
            };
            let t0 = Instant::now();
            let c0 = thread_cpu_now();
            let mut n = 0u64;
            while t0.elapsed() < window {
                for d in &pool {
                    server.handle_datagram(d, 0, false);
                }
                n += pool.len() as u64;
            }
            let rate = n as f64 / t0.elapsed().as_secs_f64();
            let cpu = (thread_cpu_now() - c0) as f64 / n as f64;
            cpus[ci].push(cpu);
            stop.store(true, Ordering::Relaxed);
            scraper.join().unwrap();
            let (r, sp) = (renders.load(Ordering::Relaxed), spent.load(Ordering::Relaxed));
            render_ns[ci].0 += r;
            render_ns[ci].1 += sp;
            eprintln!(
                "in-process round {round} {:>13}: {:>10.0} req/s, {cpu:>6.1} ns CPU/req, {r} renders",
                name(periods[ci]),
                rate
            );
            rates[ci].push(rate);
        }
    }
    // Per round, paired against the unscraped run of the same round: the throughput loss and the
    // increase of the receive path's CPU per request; their slopes over the scrape rate (least
    // squares through the origin) are the cost of one scrape per second.
    let paired = |v: &Vec<Vec<f64>>, ci: usize, f: &dyn Fn(f64, f64) -> f64| -> Vec<f64> {
        v[ci].iter().zip(&v[0]).map(|(x, b)| f(*x, *b)).collect()
    };
    let slope = |v: &Vec<Vec<f64>>, f: &dyn Fn(f64, f64) -> f64| -> f64 {
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for (ci, p) in periods.iter().enumerate().skip(1) {
            let x = 1.0 / p.unwrap().as_secs_f64();
            for y in paired(v, ci, f) {
                sxy += x * y;
                sxx += x * x;
            }
        }
        sxy / sxx
    };
    let loss = |x: f64, b: f64| 1.0 - x / b;
    let gain = |x: f64, b: f64| x / b - 1.0;
    let base = median(&rates[0]);
    println!("\nIn process: {series} series, {LOGS} logs of 2^21 regions; receive path unscraped: {base:.0} req/s on one thread, {:.1} ns CPU/req", median(&cpus[0]));
    println!(
        "{:<14} {:>12} {:>16} {:>14} {:>22} {:>12}",
        "scrape", "req/s", "throughput loss", "CPU/req", "CPU/req increase", "render"
    );
    for (ci, p) in periods.iter().enumerate() {
        let l = median(&paired(&rates, ci, &loss));
        let g = median(&paired(&cpus, ci, &gain));
        let (r, sp) = render_ns[ci];
        let render_ms = if r > 0 { sp as f64 / r as f64 / 1e6 } else { f64::NAN };
        println!(
            "{:<14} {:>12.0} {:>15.2}% {:>11.1} ns {:>21.2}% {:>9.2} ms",
            name(*p),
            median(&rates[ci]),
            l * 100.0,
            median(&cpus[ci]),
            g * 100.0,
            render_ms
        );
        results.push(&[
            ("bench", J::from("scrape")),
            ("kind", "in_process".into()),
            ("config", name(*p).into()),
            ("req_per_s_median", median(&rates[ci]).into()),
            ("throughput_loss_ratio_median", l.into()),
            ("cpu_ns_per_req_median", median(&cpus[ci]).into()),
            ("cpu_per_req_increase_ratio_median", g.into()),
            ("render_wall_ms", render_ms.into()),
            ("rounds", rounds.into()),
        ]);
    }
    let (thr_slope, cpu_slope) = (slope(&rates, &loss), slope(&cpus, &gain));
    println!(
        "cost of one scrape per second to the receive path: throughput {:.3}%, CPU per request {:.3}% (slopes over {} rounds x {} scrape rates)",
        thr_slope * 100.0,
        cpu_slope * 100.0,
        rounds,
        periods.len() - 1
    );
    results.push(&[
        ("bench", J::from("scrape")),
        ("kind", "in_process_summary".into()),
        ("throughput_loss_at_1_per_s_ratio", thr_slope.into()),
        ("cpu_per_req_increase_at_1_per_s_ratio", cpu_slope.into()),
        ("unscraped_req_per_s", base.into()),
        ("unscraped_cpu_ns_per_req", median(&cpus[0]).into()),
        ("render_cpu_ms", render_cpu_ms.into()),
        ("series", series.into()),
        ("logs", LOGS.into()),
        ("regions_per_log", REGIONS.into()),
        ("quick", quick.into()),
    ]);
}

fn end_to_end(results: &mut Results) {
    let quick = common::quick();
    let rounds: usize =
        arg_value("--rounds").map(|v| v.parse().expect("--rounds N")).unwrap_or(if quick { 3 } else { 8 });
    let secs: f64 = arg_value("--secs").map(|v| v.parse().expect("--secs S")).unwrap_or(if quick { 2.0 } else { 5.0 });

    enter_private_netns().expect("private netns");
    lo_up();
    let mut peer = KernelPeer::open().expect("kernel peer");
    peer.set_call_timeout(Duration::from_secs(30));
    let mut agent = AgentProcess::spawn_ready(env!("CARGO_BIN_EXE_ulog-agent"), &mut peer, Vec::<String>::new())
        .expect("start the agent");
    let pid = agent.pid();
    for i in 0..LOGS {
        let (uuid, luid) = (log_name(i), 1000 + i);
        let ctr = format!("{} clustered-core 1024 nosync", REGIONS * 1024);
        for req in [Request::ctr(&uuid, luid, &ctr), Request::new(RequestType::Resume, &uuid, luid, vec![])] {
            let r = peer.call_request(&req).expect("set up a log");
            assert_eq!(r.error, 0, "{r}");
        }
        let regions: Vec<u64> = (0..32).map(|k| (k * 65_537 + i * 7) % REGIONS).collect();
        for chunk in [&regions[..16], &regions[16..]] {
            let r =
                peer.call_request(&Request::new(RequestType::MarkRegion, &uuid, luid, regions_payload(chunk))).unwrap();
            assert_eq!(r.error, 0, "{r}");
        }
    }
    // The API is up (a first scrape: also warms the caches of its code path).
    let deadline = Instant::now() + Duration::from_secs(10);
    let series = loop {
        if let Ok(mut r) = ureq::get(format!("http://{ADDR}/metrics")).call() {
            let body = r.body_mut().read_to_string().unwrap();
            break body.lines().filter(|l| !l.starts_with('#')).count();
        }
        assert!(Instant::now() < deadline, "the agent's API did not come up:\n{}", agent.output());
        std::thread::sleep(Duration::from_millis(50));
    };

    let configs = [Config::NoScrape, Config::Every(Duration::from_secs(1)), Config::Every(Duration::from_millis(100))];
    let mut per: Vec<Vec<Measured>> = vec![Vec::new(); configs.len()];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..rounds {
        for k in 0..configs.len() {
            let ci = (k + round) % configs.len();
            let m = measure(&mut peer, pid, configs[ci], secs, &mut rng);
            eprintln!(
                "round {round} {:>14}: {:>9.0} req/s, recv thread {:>6.0} ns/req, p50 {:>6.1} µs p99 {:>7.1} µs, {} scrapes",
                configs[ci].name(),
                m.req_per_s,
                m.recv_cpu_per_req_ns,
                m.p50_us,
                m.p99_us,
                m.scrapes
            );
            results.push(&[
                ("bench", J::from("scrape")),
                ("kind", "round".into()),
                ("round", round.into()),
                ("config", configs[ci].name().into()),
                ("req_per_s", m.req_per_s.into()),
                ("recv_cpu_ns_per_req", m.recv_cpu_per_req_ns.into()),
                ("p50_us", m.p50_us.into()),
                ("p99_us", m.p99_us.into()),
                ("scrapes", m.scrapes.into()),
                ("other_cpu_ns", m.other_cpu_ns.into()),
            ]);
            per[ci].push(m);
        }
    }
    let base = &per[0];
    let ratio = |ci: usize, f: &dyn Fn(&Measured) -> f64| -> f64 {
        median(&per[ci].iter().zip(base).map(|(m, b)| f(m) / f(b)).collect::<Vec<_>>())
    };
    // Per-scrape cost: the CPU the agent's non-receive threads spent beyond the unscraped runs,
    // divided by the scrapes.
    let per_scrape_cpu = |ci: usize| -> f64 {
        median(
            &per[ci]
                .iter()
                .zip(base)
                .filter(|(m, _)| m.scrapes > 0)
                .map(|(m, b)| (m.other_cpu_ns - b.other_cpu_ns).max(0.0) / m.scrapes as f64)
                .collect::<Vec<_>>(),
        )
    };
    let mut summary = Vec::new();
    for (ci, cfg) in configs.iter().enumerate().skip(1) {
        let Config::Every(period) = *cfg else { continue };
        let thr_loss = 1.0 - ratio(ci, &|m| m.req_per_s);
        let cpu_gain = ratio(ci, &|m| m.recv_cpu_per_req_ns) - 1.0;
        let p99 = ratio(ci, &|m| m.p99_us) - 1.0;
        let all_ms: Vec<f64> = per[ci].iter().flat_map(|m| m.scrape_ms.iter().copied()).collect();
        let cpu_ms = per_scrape_cpu(ci) / 1e6;
        let per_second = 1.0 / period.as_secs_f64();
        summary.push((cfg.name(), thr_loss, cpu_gain, p99, median(&all_ms), cpu_ms, per_second));
        results.push(&[
            ("bench", J::from("scrape")),
            ("kind", "summary".into()),
            ("config", cfg.name().into()),
            ("scrapes_per_s", per_second.into()),
            ("throughput_loss_ratio", thr_loss.into()),
            ("recv_cpu_per_req_increase_ratio", cpu_gain.into()),
            ("p99_increase_ratio", p99.into()),
            ("scrape_latency_ms_median", median(&all_ms).into()),
            ("scrape_cpu_ms", cpu_ms.into()),
            ("scrape_bytes", per[ci].last().map_or(0, |m| m.scrape_bytes).into()),
            ("series", series.into()),
            ("logs", LOGS.into()),
            ("regions_per_log", REGIONS.into()),
            ("depth", DEPTH.into()),
            ("rounds", rounds.into()),
            ("secs", secs.into()),
            ("quick", quick.into()),
        ]);
    }
    let base_rps = median(&base.iter().map(|m| m.req_per_s).collect::<Vec<_>>());
    println!("\nScraping /metrics ({series} series, {LOGS} logs of 2^21 regions) under {DEPTH} IN_SYNC in flight; unscraped: {base_rps:.0} req/s");
    println!(
        "{:<16} {:>16} {:>22} {:>12} {:>16} {:>16}",
        "scrape", "throughput loss", "recv-thread CPU/req", "p99", "scrape latency", "scrape CPU"
    );
    for (name, thr, cpu, p99, lat, cpu_ms, _) in &summary {
        println!(
            "{name:<16} {:>15.2}% {:>21.2}% {:>11.1}% {:>13.2} ms {:>13.2} ms",
            thr * 100.0,
            cpu * 100.0,
            p99 * 100.0,
            lat,
            cpu_ms
        );
    }
    if let Some(fast) = summary.iter().find(|s| s.6 > 1.5) {
        let extrapolated = fast.1 / fast.6;
        let cpu_share = fast.5 / 1e3;
        println!(
            "per scrape: {:.2} ms of agent CPU (HTTP thread + blocking pool), i.e. {:.3}% of one core at 1 scrape/s; \
             throughput loss extrapolated from {}: {:.3}% at 1 scrape/s",
            fast.5,
            cpu_share * 100.0,
            fast.0,
            extrapolated * 100.0
        );
        results.push(&[
            ("bench", J::from("scrape")),
            ("kind", "per_scrape".into()),
            ("scrape_cpu_ms", fast.5.into()),
            ("core_share_at_1_per_s", cpu_share.into()),
            ("throughput_loss_at_1_per_s_extrapolated", extrapolated.into()),
        ]);
    }
    let st = agent.restart_exit(Duration::from_secs(30)).expect("stop the agent");
    assert!(st.success(), "agent exited with {st}:\n{}", agent.output());
}
