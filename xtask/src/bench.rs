//! `cargo xtask bench [--quick] [--only handling,roundtrip,memory,cluster]`: runs the agent's
//! benchmarks and rewrites their sections of `BENCHMARKS.md` at the repo root.
//!
//! Each benchmark is a `cargo bench -p ulog-agent --bench <name>` target:
//!
//! * `handling` (criterion): in-process request handling against `protocol::decode` of the same
//!   datagrams. Results are read from criterion's own files (`estimates.json`, median point
//!   estimates) under `$CRITERION_HOME`, which this command points at `<target>/ulog-bench/criterion`.
//! * `roundtrip` and `memory` (harness-less, need root): they write JSON lines to
//!   `<target>/ulog-bench/<name>.jsonl` (`$ULOG_BENCH_OUT_DIR`); the summaries carry the ratios
//!   against the baselines they measure in the same invocation.
//! * `cluster` (harness-less, needs root and corosync): the same kind of JSON lines; what
//!   `--cluster` costs per request type against a single-node agent measured in the same
//!   invocation, resync time with 1, 2, 3 nodes, and one log written by two nodes vs one
//!   (~35 s on a 2-core machine, cluster start-up included).
//!
//! `BENCHMARKS.md` is made of generated sections between `<!-- bench:<name>:begin -->` and
//! `<!-- bench:<name>:end -->` markers; a run replaces the sections of the benchmarks it ran
//! (and the introduction) and keeps everything else, including text written by hand outside the
//! markers. Each section states the machine, the date and the command that produced it.
//!
//! No timing is asserted anywhere: this is not part of the test suite.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::setup::{repo_root, run_streaming};

/// Every benchmark, in the order of their sections (and of a run without `--only`).
const BENCHES: [&str; 4] = ["handling", "roundtrip", "memory", "cluster"];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Short runs (criterion `--quick`; 2 rounds of 0.3 s for the round trips; fewer MARKs for
    /// the memory benchmark; 2 rounds of 100 requests per type for the cluster benchmark). Figures are noisier; the file says the run was quick.
    #[arg(long)]
    quick: bool,
    /// Run only these benchmarks (comma-separated or repeated): handling, roundtrip, memory,
    /// cluster.
    #[arg(long, value_delimiter = ',', value_name = "NAME")]
    only: Vec<String>,
    /// Round trips and cluster: rounds (default 5 / 4, quick 2).
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// Round trips: seconds per measurement (default 1.5, quick 0.3).
    #[arg(long, value_name = "S")]
    secs: Option<f64>,
    /// Round trips: skip the loop-device disk log (no `losetup`).
    #[arg(long)]
    no_loop: bool,
    /// Round trips: pin the client thread to CPU 0 and the server (agent / baseline responder)
    /// to CPU 1.
    #[arg(long)]
    pin: bool,
    /// Memory: skip the 16 disk logs.
    #[arg(long)]
    no_disk: bool,
    /// Print the tables but leave BENCHMARKS.md alone.
    #[arg(long)]
    no_write: bool,
    /// Run nothing: rewrite the sections from the results the last run left under
    /// `<target>/ulog-bench/` (after a change to the tables' layout).
    #[arg(long)]
    render_only: bool,
}

pub fn run(args: Args) -> Result<()> {
    for o in &args.only {
        if !BENCHES.contains(&o.as_str()) {
            bail!("unknown benchmark {o:?} (expected one of {})", BENCHES.join(", "));
        }
    }
    let selected = selected(&args.only);
    let needs_root = !args.render_only && selected.iter().any(|b| *b != "handling");
    // SAFETY: plain syscall.
    if needs_root && unsafe { libc::geteuid() } != 0 {
        bail!("roundtrip, memory and cluster need root (network namespaces, connector sockets); run as root or use --only handling");
    }
    let root = repo_root()?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"));
    let out = target.join("ulog-bench");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let command = reproduce_command();
    let machine = Machine::probe();
    println!("machine: {}", machine.one_line());

    let mut sections: BTreeMap<&str, String> = BTreeMap::new();
    for &bench in &selected {
        let jsonl = out.join(format!("{bench}.jsonl"));
        let run_info = out.join(format!("{bench}.run.json"));
        if args.render_only {
            let Ok(text) = std::fs::read_to_string(&run_info) else {
                println!(
                    "{bench}: no results from an earlier run ({} missing); section left as it is",
                    run_info.display()
                );
                continue;
            };
            let header: SectionHeader = SectionHeader::from_json(&serde_json::from_str(&text)?);
            let text = format!("{}{}", header.render(bench), render(bench, &out, &jsonl)?);
            println!("\n{text}");
            sections.insert(bench, text);
            continue;
        }
        let started = utc_now();
        let load = machine_load();
        let mut extra: Vec<String> = Vec::new();
        if args.quick {
            extra.push("--quick".into());
        }
        match bench {
            "handling" => {
                let dir = out.join("criterion");
                // Stale groups from an earlier run must not show up in this one.
                let _ = std::fs::remove_dir_all(&dir);
            }
            "roundtrip" => {
                if let Some(n) = args.rounds {
                    extra.extend(["--rounds".into(), n.to_string()]);
                }
                if let Some(s) = args.secs {
                    extra.extend(["--secs".into(), s.to_string()]);
                }
                if args.no_loop {
                    extra.push("--no-loop".into());
                }
                if args.pin {
                    extra.push("--pin".into());
                }
            }
            "memory" => {
                if args.no_disk {
                    extra.push("--no-disk".into());
                }
            }
            "cluster" => {
                if let Some(n) = args.rounds {
                    extra.extend(["--rounds".into(), n.to_string()]);
                }
            }
            _ => unreachable!(),
        }
        let _ = std::fs::remove_file(&jsonl);
        let _ = std::fs::remove_file(&run_info);
        let mut cmd = Command::new(cargo());
        cmd.current_dir(&root)
            .args(["bench", "-p", "ulog-agent", "--bench", bench])
            .env("CRITERION_HOME", out.join("criterion"))
            .env("ULOG_BENCH_OUT_DIR", &out);
        if !extra.is_empty() {
            cmd.arg("--").args(&extra);
        }
        let cargo_line = format!(
            "cargo bench -p ulog-agent --bench {bench}{}",
            if extra.is_empty() { String::new() } else { format!(" -- {}", extra.join(" ")) }
        );
        println!("\n==> {bench}");
        run_streaming(&mut cmd).with_context(|| format!("benchmark {bench}"))?;
        let header = SectionHeader {
            started,
            load,
            command: command.clone(),
            cargo_line,
            quick: args.quick,
            machine: machine.one_line(),
        };
        std::fs::write(&run_info, header.to_json().to_string())
            .with_context(|| format!("writing {}", run_info.display()))?;
        let text = format!("{}{}", header.render(bench), render(bench, &out, &jsonl)?);
        println!("\n{text}");
        sections.insert(bench, text);
    }

    if args.no_write {
        return Ok(());
    }
    let path = root.join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let new = merge(&old, &sections);
    std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// A benchmark's section body from its results.
fn render(bench: &str, out: &Path, jsonl: &Path) -> Result<String> {
    Ok(match bench {
        "handling" => render_handling(&out.join("criterion"))?,
        "roundtrip" => render_roundtrip(&read_jsonl(jsonl)?),
        "memory" => render_memory(&read_jsonl(jsonl)?),
        "cluster" => render_cluster(&read_jsonl(jsonl)?),
        _ => unreachable!(),
    })
}

/// The benchmarks a run covers: those named with `--only` (in section order), else all.
fn selected(only: &[String]) -> Vec<&'static str> {
    BENCHES.iter().copied().filter(|b| only.is_empty() || only.iter().any(|o| o == b)).collect()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// `cargo xtask bench <the flags given>`.
fn reproduce_command() -> String {
    let mut parts = vec!["cargo".to_string(), "xtask".to_string()];
    parts.extend(std::env::args().skip(1));
    parts.join(" ")
}

// ---------------------------------------------------------------------------------------------
// Machine and time.

struct Machine {
    nproc: usize,
    cpu: String,
    kernel: String,
    mem: String,
}

impl Machine {
    fn probe() -> Self {
        let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or_else(|| "unknown".into(), |kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0));
        Self { nproc, cpu, kernel, mem }
    }

    fn one_line(&self) -> String {
        format!("{} CPUs ({}), Linux {}, {} RAM", self.nproc, self.cpu, self.kernel, self.mem)
    }
}

/// The 1/5/15-minute load averages.
fn machine_load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Now as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// What a section says about its run; saved next to the results (`<bench>.run.json`).
struct SectionHeader {
    started: String,
    load: String,
    command: String,
    cargo_line: String,
    quick: bool,
    machine: String,
}

impl SectionHeader {
    fn to_json(&self) -> Value {
        serde_json::json!({
            "started": self.started,
            "load": self.load,
            "command": self.command,
            "cargo_line": self.cargo_line,
            "quick": self.quick,
            "machine": self.machine,
        })
    }

    fn from_json(v: &Value) -> Self {
        Self {
            started: js(v, "started").into(),
            load: js(v, "load").into(),
            command: js(v, "command").into(),
            cargo_line: js(v, "cargo_line").into(),
            quick: v.get("quick").and_then(Value::as_bool).unwrap_or(false),
            machine: js(v, "machine").into(),
        }
    }

    fn render(&self, bench: &str) -> String {
        let title = match bench {
            "handling" => "In-process request handling (`benches/handling.rs`)",
            "roundtrip" => "Round trips over the connector (`benches/roundtrip.rs`)",
            "cluster" => "Cluster mode against a single node (`benches/cluster.rs`)",
            _ => "Memory (`benches/memory.rs`)",
        };
        let mut s = format!("## {title}\n\n");
        let _ = writeln!(
            s,
            "- Date: {}{}",
            self.started,
            if self.quick { " (**quick run**: short measurements, noisier)" } else { "" }
        );
        let _ = writeln!(s, "- Machine: {}; load average at start: {}", self.machine, self.load);
        let _ = writeln!(s, "- Reproduce: `{}` (runs `{}`)", self.command, self.cargo_line);
        s.push('\n');
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Reading results.

fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: bad line {l:?}", path.display())))
        .collect()
}

fn jf(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn js<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Criterion's median estimate (ns per iteration) and its 95% interval.
struct Estimate {
    median: f64,
    lo: f64,
    hi: f64,
}

fn estimate(dir: &Path) -> Result<Estimate> {
    let p = dir.join("new").join("estimates.json");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("parsing {}", p.display()))?;
    let m = &v["median"];
    Ok(Estimate {
        median: m["point_estimate"].as_f64().unwrap_or(f64::NAN),
        lo: m["confidence_interval"]["lower_bound"].as_f64().unwrap_or(f64::NAN),
        hi: m["confidence_interval"]["upper_bound"].as_f64().unwrap_or(f64::NAN),
    })
}

/// Elements per iteration from criterion's `benchmark.json`, if a throughput was set.
fn elements(dir: &Path) -> Option<f64> {
    let p = dir.join("new").join("benchmark.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["throughput"]["Elements"].as_f64()
}

// ---------------------------------------------------------------------------------------------
// Rendering.

fn fmt_ns(ns: f64) -> String {
    if ns >= 10_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns >= 1_000.0 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else if us >= 1_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.1} µs")
    }
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 1_000.0 {
        format!("{:.2} s", ms / 1e3)
    } else {
        format!("{ms:.1} ms")
    }
}

fn fmt_rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.1} M", per_s / 1e6)
    } else if per_s >= 1e3 {
        format!("{:.1} k", per_s / 1e3)
    } else {
        format!("{per_s:.0}")
    }
}

/// The handling order of the bench file, then anything else criterion recorded.
const HANDLING_ORDER: [&str; 14] = [
    "IN_SYNC",
    "IS_CLEAN",
    "MARK_REGION_x32",
    "CLEAR_REGION_x32",
    "MARK+CLEAR_x32",
    "MARK_REGION_x32_sync",
    "CLEAR_REGION_x32_sync",
    "FLUSH",
    "GET_RESYNC_WORK",
    "SET_REGION_SYNC",
    "GET_SYNC_COUNT",
    "IS_REMOTE_RECOVERING",
    "STATUS_INFO",
    "GET_REGION_SIZE",
];

fn describe_case(id: &str) -> &'static str {
    match id {
        "MARK_REGION_x32" => "32 regions, `nosync` log",
        "CLEAR_REGION_x32" => "32 regions, `nosync` log (bits really set)",
        "MARK+CLEAR_x32" => "MARK then CLEAR of the same 32 regions, `nosync` log: 64 real bit flips",
        "MARK_REGION_x32_sync" => "32 regions, default-sync log",
        "CLEAR_REGION_x32_sync" => "32 regions, default-sync log (not in sync: bits stay)",
        "IN_SYNC" | "IS_CLEAN" | "IS_REMOTE_RECOVERING" => "1 region",
        "SET_REGION_SYNC" => "region, in_sync=1",
        _ => "",
    }
}

/// Criterion group directories are named after the group id, with some characters replaced.
fn group_dir(criterion: &Path, id: &str) -> PathBuf {
    criterion.join(id.replace(['/', '\\', ':', '*', '?', '"', '<', '>', '|'], "_"))
}

fn render_handling(criterion: &Path) -> Result<String> {
    let mut s = String::new();
    s.push_str(
        "One `LogServer` with two `clustered-core` logs of 2^21 regions (`2147483648 clustered-core 1024`, and the same \
         with `nosync`), CTR + RESUME first; replies go to a sink that counts them (every request was answered, none with \
         an error). Each benchmark cycles through 256 pre-encoded datagrams (`kernel_peer::encode_request`) with \
         pseudo-random regions. *decode* = `protocol::decode` alone on the same datagrams (the baseline, measured right \
         before); *handle* = `LogServer::handle_datagram(buf, 0, false)`. Criterion median per iteration, 95% interval \
         in brackets.\n\n",
    );
    s.push_str("| request | payload | decode | handle [95% CI] | handle / decode | handle − decode | requests/s (1 core) | region ops/s |\n");
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    let mut best_region_rate: Option<(f64, String)> = None;
    let mut worst_region_rate: Option<(f64, String)> = None;
    let mut ratios = Vec::new();
    for id in HANDLING_ORDER {
        let g = group_dir(criterion, id);
        if !g.is_dir() {
            continue;
        }
        let dec = estimate(&g.join("decode"))?;
        let han = estimate(&g.join("handle"))?;
        let reqs_per_iter = if id.contains('+') { 2.0 } else { 1.0 };
        let el = elements(&g.join("handle"));
        let region_rate = el.map(|n| n / (han.median * 1e-9));
        if let Some(r) = region_rate {
            if worst_region_rate.as_ref().is_none_or(|(w, _)| r < *w) {
                worst_region_rate = Some((r, id.to_string()));
            }
            if best_region_rate.as_ref().is_none_or(|(b, _)| r > *b) {
                best_region_rate = Some((r, id.to_string()));
            }
        }
        ratios.push(han.median / dec.median);
        let _ = writeln!(
            s,
            "| {id} | {} | {} | {} [{}–{}] | {:.1}× | {} | {} | {} |",
            describe_case(id),
            fmt_ns(dec.median),
            fmt_ns(han.median),
            fmt_ns(han.lo),
            fmt_ns(han.hi),
            han.median / dec.median,
            fmt_ns(han.median - dec.median),
            fmt_rate(reqs_per_iter / (han.median * 1e-9)),
            region_rate.map_or_else(|| "—".into(), |r| format!("{}/s", fmt_rate(r))),
        );
    }
    s.push('\n');
    if let Some((w, id)) = &worst_region_rate {
        let _ = writeln!(
            s,
            "**Target ≥ 5 M MARK/CLEAR region operations/s per core: {}** (slowest case {id}: {} region ops/s, \
             {:.0}× the target).",
            if *w >= 5e6 { "met" } else { "NOT met" },
            fmt_rate(*w),
            w / 5e6
        );
    }
    if !ratios.is_empty() {
        ratios.sort_by(f64::total_cmp);
        let _ = writeln!(
            s,
            "Handling costs {:.1}×–{:.1}× decoding (median {:.1}×).",
            ratios[0],
            ratios[ratios.len() - 1],
            ratios[ratios.len() / 2]
        );
    }
    // Diagnostic: the persister's snapshot copy.
    let mut diag = String::new();
    for blocks in [1, 16] {
        let g = group_dir(criterion, &format!("snapshot_{blocks}_blocks"));
        if !g.is_dir() {
            continue;
        }
        let mem = estimate(&g.join("memcpy"))?;
        let snap = estimate(&g.join("snapshot"))?;
        let bytes = blocks as f64 * 4096.0;
        let _ = writeln!(
            diag,
            "| {blocks} | {} | {} ({:.2} GB/s) | {} ({:.0} GB/s) | {:.0}× |",
            blocks * 4096,
            fmt_ns(snap.median),
            bytes / snap.median,
            fmt_ns(mem.median),
            bytes / mem.median,
            snap.median / mem.median
        );
    }
    if !diag.is_empty() {
        s.push_str(
            "\nDiagnostic (not request handling): a disk log's persister copying the changed 4 KiB image blocks out of \
             the bitmap before each durable write (`DirtyLog::snapshot`, under the log's mutex, which the receive \
             thread needs for every request on that log), against `copy_from_slice` of the same bytes. 16 blocks = \
             a group commit of 16 MARKs of scattered regions.\n\n",
        );
        s.push_str("| changed blocks | bytes | snapshot | memcpy (baseline) | snapshot / memcpy |\n|---:|---:|---:|---:|---:|\n");
        s.push_str(&diag);
    }
    s.push('\n');
    Ok(s)
}

fn render_roundtrip(lines: &[Value]) -> String {
    let mut s = String::new();
    let meta = lines.iter().find(|v| s_eq(v, "kind", "meta"));
    let sums: Vec<&Value> = lines.iter().filter(|v| s_eq(v, "kind", "summary")).collect();
    if let Some(m) = meta {
        let _ = writeln!(
            s,
            "Client: a `KernelPeer` (the kernel's side, over a real NETLINK_CONNECTOR socket) in a private network \
             namespace; latency = send → matching reply; with 32 in flight it keeps 32 requests outstanding. Agent: the \
             bench-profile `ulog-agent` binary (`--accept-peer-port`). Baseline: a thread with its own connector \
             socket set up like the agent's (group 7, 8 MiB receive buffer) that answers every request from constants \
             (`recvfrom`, copy the header, `sendto`), in a second namespace so the two never share a bus; same client \
             code. Logs: 2^21 regions, `nosync`, a fresh log per round, so every MARK dirties a clean region (regions \
             scattered over the log; *seq* = consecutive regions). *disk-file* = `clustered-disk` on a preallocated \
             file on {} ({}); *disk-loop* = the same on {} over such a file; MARKs are answered after \
             `pwritev2(RWF_DSYNC)`. {} rounds × {} s per measurement, targets interleaved in an order rotated per \
             round; figures are medians over rounds. Ratios are agent ÷ baseline (latency: > 1 is slower; req/s: < 1 \
             is slower), taken per round against the baseline measured seconds apart, then the median over rounds \
             (a noisy stretch on the shared machine slows both sides of a round's ratio). *server CPU* = CPU time of the agent process (all threads) or of the responder thread per \
             request (`/proc/*/schedstat`); *client CPU* = the client thread's.\n",
            js(m, "file_fs"),
            js(m, "file_dir"),
            js(m, "loop_device"),
            jf(m, "rounds"),
            jf(m, "secs_per_measurement"),
        );
        if m.get("pinned").and_then(Value::as_bool) == Some(true) {
            s.push_str("Pinned: client thread on CPU 0, agent process / responder thread on CPU 1.\n\n");
        }
        if !js(m, "notes").is_empty() {
            let _ = writeln!(s, "Notes: {}\n", js(m, "notes"));
        }
    }
    let mut groups: Vec<(String, u64)> = Vec::new();
    for v in &sums {
        let key = (js(v, "workload").to_string(), jf(v, "depth") as u64);
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    for (wl, depth) in &groups {
        let _ = writeln!(s, "### {wl}, {depth} in flight\n");
        let rows: Vec<&&Value> =
            sums.iter().filter(|v| js(v, "workload") == wl && jf(v, "depth") as u64 == *depth).collect();
        let marks = rows.iter().any(|v| v.get("mark_p50_us").is_some());
        let pairs = rows.iter().any(|v| v.get("pair_p50_us").is_some());
        if marks {
            // MARK and FLUSH latencies apart: their mix is bimodal on disk logs.
            s.push_str("| target | MARK p50 | MARK p99 | FLUSH p50 | FLUSH p99 |");
            s.push_str(if pairs { " MARK→FLUSH pair p50 |" } else { "" });
            s.push_str(" requests/s | best round | MARK p50 × baseline | MARK p99 × baseline | FLUSH p50 × baseline |");
            s.push_str(if pairs { " pair × baseline |" } else { "" });
            s.push_str(" req/s × baseline | server CPU/req | × baseline | client CPU/req |\n");
            s.push_str("|---|---:|---:|---:|---:|");
            s.push_str(if pairs { "---:|" } else { "" });
            s.push_str("---:|---:|---:|---:|---:|");
            s.push_str(if pairs { "---:|" } else { "" });
            s.push_str("---:|---:|---:|---:|\n");
        } else {
            s.push_str("| target | p50 | p99 | requests/s | best round | p50 × baseline | p99 × baseline | req/s × baseline | server CPU/req | × baseline | client CPU/req |\n");
            s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        }
        for v in rows {
            let _ = write!(s, "| {} |", js(v, "target"));
            if marks {
                let _ = write!(
                    s,
                    " {} | {} | {} | {} |",
                    fmt_us(jf(v, "mark_p50_us")),
                    fmt_us(jf(v, "mark_p99_us")),
                    fmt_us(jf(v, "flush_p50_us")),
                    fmt_us(jf(v, "flush_p99_us"))
                );
                if pairs {
                    let _ = write!(s, " {} |", fmt_us(jf(v, "pair_p50_us")));
                }
                let _ = write!(
                    s,
                    " {} | {} | {:.2} | {:.2} | {:.2} |",
                    fmt_rate(jf(v, "rps")),
                    fmt_rate(jf(v, "rps_best")),
                    jf(v, "mark_p50_ratio"),
                    jf(v, "mark_p99_ratio"),
                    jf(v, "flush_p50_ratio")
                );
                if pairs {
                    let _ = write!(s, " {:.2} |", jf(v, "pair_p50_ratio"));
                }
            } else {
                let _ = write!(
                    s,
                    " {} | {} | {} | {} | {:.2} | {:.2} |",
                    fmt_us(jf(v, "p50_us")),
                    fmt_us(jf(v, "p99_us")),
                    fmt_rate(jf(v, "rps")),
                    fmt_rate(jf(v, "rps_best")),
                    jf(v, "p50_ratio"),
                    jf(v, "p99_ratio")
                );
            }
            let _ = writeln!(
                s,
                " {:.2} | {:.2} µs | {:.2} | {:.2} µs |",
                jf(v, "rps_ratio"),
                jf(v, "server_cpu_us_per_req"),
                jf(v, "server_cpu_ratio"),
                jf(v, "client_cpu_us_per_req"),
            );
        }
        s.push('\n');
    }
    let devices: Vec<&Value> = lines.iter().filter(|v| s_eq(v, "kind", "device_summary")).collect();
    if !devices.is_empty() {
        s.push_str(
            "### Raw device writes (disk targets, context)\n\nRight before each MARK measurement on a disk log, 4 KiB durable \
             writes at scattered blocks through the agent's own `LogDevice::write_durable` (`pwritev2(RWF_DSYNC)`; \
             `O_DIRECT` on the loop device), back to back from the bench process, on a probe device of the same kind \
             (a second file in the same directory, a second loop device). Not a floor on this VM: these tight-loop \
             writes often took one 250 Hz tick (~4 ms, quantised) while the agent's own MARKs, whose reply waits for \
             the same kind of write, completed in ~0.1 ms in the adjacent measurement; the shared disk's latency \
             swings by 10-40× within minutes. The per-round pairs are in the JSON (`mark_p50_over_device`).\n\n\
             | device | write p50 | write p99 | writes/s (one at a time) |\n|---|---:|---:|---:|\n",
        );
        for v in devices {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                js(v, "target"),
                fmt_us(jf(v, "p50_us")),
                fmt_us(jf(v, "p99_us")),
                fmt_rate(jf(v, "writes_per_s"))
            );
        }
        s.push('\n');
    }
    // Targets (core log).
    let find = |t: &str, wl: &str, d: u64| {
        sums.iter().find(|v| js(v, "target") == t && js(v, "workload") == wl && jf(v, "depth") as u64 == d)
    };
    if let Some(v) = find("core", "IN_SYNC", 1) {
        let p50 = jf(v, "p50_us");
        let _ = writeln!(
            s,
            "**Target core log p50 ≤ 20 µs: {}** (IN_SYNC, 1 in flight: {p50:.1} µs; baseline {:.1} µs).",
            if p50 <= 20.0 { "met" } else { "NOT met" },
            jf(v, "baseline_p50_us")
        );
    }
    for wl in ["IN_SYNC", "MARK+FLUSH"] {
        if let Some(v) = find("core", wl, 32) {
            let rps = jf(v, "rps");
            let _ = writeln!(
                s,
                "**Target core log ≥ 150 k requests/s with 32 in flight ({wl}): {}** (median over rounds {} req/s, \
                 best round {}; the constant-answer baseline: median {}, best round {}, with the same client; \
                 agent ÷ baseline {:.2}; agent CPU per request {:.2} µs, i.e. one core could serve ~{} req/s if the \
                 client and the transport kept up).",
                if rps >= 150_000.0 {
                    "met"
                } else if jf(v, "rps_best") >= 150_000.0 {
                    "met in the best round only"
                } else {
                    "NOT met"
                },
                fmt_rate(rps),
                fmt_rate(jf(v, "rps_best")),
                fmt_rate(jf(v, "baseline_rps")),
                fmt_rate(jf(v, "baseline_rps_best")),
                jf(v, "rps_ratio"),
                jf(v, "server_cpu_us_per_req"),
                fmt_rate(1e6 / jf(v, "server_cpu_us_per_req")),
            );
        }
    }
    s.push('\n');
    s
}

fn s_eq(v: &Value, k: &str, want: &str) -> bool {
    js(v, k) == want
}

/// Request series of the cluster benchmark, in its order.
const CLUSTER_SERIES: [&str; 8] = [
    "IN_SYNC",
    "MARK_REGION",
    "FLUSH",
    "CLEAR_REGION",
    "GET_SYNC_COUNT",
    "GET_RESYNC_WORK",
    "SET_REGION_SYNC",
    "GET_RESYNC_WORK+SET_REGION_SYNC",
];

fn render_cluster(lines: &[Value]) -> String {
    let mut s = String::new();
    let meta = lines.iter().find(|v| s_eq(v, "kind", "meta"));
    if let Some(m) = meta {
        let _ = write!(
            s,
            "The bench-profile `ulog-agent`, each driven by a `KernelPeer` over a real connector socket in its own \
             network namespace, one request at a time. Configurations, measured in the same invocation with rounds \
             interleaved (order rotated per round): *single* = the agent without `--cluster` (the baseline); \
             *cluster-1* = `--cluster` on a 1-node corosync cluster; *cluster-3* = `--cluster` on node 1 of a 3-node \
             cluster (`TestCluster`: knet over veths and a bridge, `token: 1000`), whose other two agents have the \
             same logs constructed and resumed and stay idle (they apply and acknowledge). Logs: 2^21-region \
             `clustered-core nosync` (fresh regions for MARK, the same regions for CLEAR) and, for \
             GET_RESYNC_WORK + SET_REGION_SYNC, the same without `nosync`. {} rounds × {} requests per type and \
             configuration; quantiles over all rounds' samples; ratios are cluster ÷ single (the JSON also has the \
             median of per-round ratios, `p50_ratio_paired`). Before each configuration's turn the bench waits until \
             every agent is idle (< 5% of a CPU over 100 ms). In cluster mode reads (IN_SYNC, GET_SYNC_COUNT) are \
             answered locally; MARK once a second member applied it (~2 ordered multicasts; alone in the group, on \
             its own delivery); CLEAR, GET_RESYNC_WORK, SET_REGION_SYNC on their own delivery; FLUSH when this \
             node's earlier frames are stable.\n\n",
            jf(m, "rounds"),
            jf(m, "count"),
        );
        let _ = write!(
            s,
            "**Figures are from a {}-CPU machine shared with other work (the client, up to 5 agents and 4 corosyncs \
             share those CPUs): absolute figures move with its load; only the ratios mean anything.**\n\n",
            jf(m, "cpus")
        );
    }
    let sums: Vec<&Value> = lines.iter().filter(|v| s_eq(v, "kind", "summary")).collect();
    let get = |c: &str, series: &str| sums.iter().find(|v| js(v, "config") == c && js(v, "series") == series);
    s.push_str("### Round trip, 1 in flight\n\n");
    s.push_str(
        "| request | single p50 | single p99 | cluster-1 p50 | cluster-1 p99 | cluster-3 p50 | cluster-3 p99 | \
         cluster-1 ÷ single p50 | p99 | cluster-3 ÷ single p50 | p99 |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for series in CLUSTER_SERIES {
        let Some(base) = get("single", series) else { continue };
        let _ = write!(s, "| {series} | {} | {} |", fmt_us(jf(base, "p50_us")), fmt_us(jf(base, "p99_us")));
        for c in ["cluster-1", "cluster-3"] {
            match get(c, series) {
                Some(v) => {
                    let _ = write!(s, " {} | {} |", fmt_us(jf(v, "p50_us")), fmt_us(jf(v, "p99_us")));
                }
                None => s.push_str(" – | – |"),
            }
        }
        for c in ["cluster-1", "cluster-3"] {
            match get(c, series) {
                Some(v) => {
                    let _ = write!(s, " {:.2} | {:.2} |", jf(v, "p50_ratio"), jf(v, "p99_ratio"));
                }
                None => s.push_str(" – | – |"),
            }
        }
        s.push('\n');
    }
    s.push_str("\n*GET_RESYNC_WORK+SET_REGION_SYNC* = the two round trips of one recovered region, back to back.\n\n");
    let tput: Vec<&Value> = lines.iter().filter(|v| s_eq(v, "kind", "throughput_summary")).collect();
    if !tput.is_empty() {
        let _ = writeln!(
            s,
            "### MARK + FLUSH, {} in flight\n\nMARK of a fresh region and an empty FLUSH alternating, {} requests \
             per round and configuration (then, unmeasured, CLEARs of those regions, so marks do not pile up); \
             requests/s is the median over rounds, latencies over all rounds.\n",
            jf(tput[0], "depth"),
            meta.map_or(f64::NAN, |m| jf(m, "tput_count")),
        );
        s.push_str("| config | requests/s | × single | latency p50 | latency p99 |\n|---|---:|---:|---:|---:|\n");
        for v in tput {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {} | {} |",
                js(v, "config"),
                fmt_rate(jf(v, "rps")),
                jf(v, "rps_ratio"),
                fmt_us(jf(v, "p50_us")),
                fmt_us(jf(v, "p99_us"))
            );
        }
        s.push('\n');
    }
    let resync: Vec<&Value> = lines.iter().filter(|v| s_eq(v, "kind", "resync_summary")).collect();
    if let Some(first) = resync.first() {
        let _ = writeln!(
            s,
            "### Resync with 1, 2, 3 nodes\n\nA fresh {}-region `clustered-core` log (not `nosync`: every region \
             starts out of sync), constructed and resumed on the first *k* nodes of the 3-node cluster only (a new \
             uuid per run; the other agents never open it). Each of the *k* kernel peers runs dm-raid1's recovery \
             loop in its own thread, all started together: GET_RESYNC_WORK; for a region, a {} ms sleep standing for \
             the kernel's kcopyd copy of that region (not measured here); SET_REGION_SYNC(region, 1); until \
             GET_RESYNC_WORK says there is no work. The wall time ends when the last node is told so. Every run \
             asserts that the regions handed out are disjoint and cover the log and that GET_SYNC_COUNT is the \
             region count on every node. Median of {} runs per *k* (rotated with the other *k* per round). \
             dm-raid1 recovers one region at a time per node, so *k* nodes can approach *k* × the 1-node speed; \
             *copy floor* = ⌈regions / k⌉ × copy time, the wall time if the round trips cost nothing.\n",
            jf(first, "regions"),
            jf(first, "copy_ms"),
            jf(first, "runs"),
        );
        s.push_str(
            "| nodes | wall time | regions/s | × 1 node | copy floor | regions per node (each run) |\n\
             |---:|---:|---:|---:|---:|---|\n",
        );
        for v in resync {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.2} | {} | {} |",
                jf(v, "nodes"),
                fmt_ms(jf(v, "wall_ms")),
                jf(v, "regions_per_s"),
                jf(v, "speedup"),
                fmt_ms(jf(v, "copy_floor_ms")),
                js(v, "per_node"),
            );
        }
        s.push('\n');
    }
    let writers: Vec<&Value> = lines.iter().filter(|v| s_eq(v, "kind", "writers_summary")).collect();
    if let Some(first) = writers.first() {
        let _ = writeln!(
            s,
            "### One mirror written by two nodes vs one, {} in flight per writer\n\nThe `clustered-core nosync` log \
             of the 3-node cluster (all three agents in its group): MARK of a fresh region then CLEAR of the same \
             region, {} requests per writer and run, from node 1's kernel peer alone or from nodes 1 and 2 at once \
             (distinct regions per node; rotated per round). Requests/s = all writers' requests ÷ the wall time \
             until the last one is answered, median over rounds; latencies over all runs. × 1 writer > 1 means a \
             second writing node adds throughput to the mirror's log, < 1 that the writers slow each other down. \
             This stands in on the host for the IOPS of one mirror written from two nodes; the client, three agents \
             and three corosyncs share the machine's CPUs.\n",
            jf(first, "depth"),
            meta.map_or(f64::NAN, |m| jf(m, "tput_count")),
        );
        // Per-round ratios, from the round lines: how much of the median ratio is noise.
        let round_rps = |w: f64| -> BTreeMap<i64, f64> {
            lines
                .iter()
                .filter(|v| s_eq(v, "kind", "writers_round") && jf(v, "writers") == w)
                .map(|v| (jf(v, "round") as i64, jf(v, "rps")))
                .collect()
        };
        let one = round_rps(1.0);
        s.push_str(
            "| writers | requests/s | × 1 writer | × 1 writer, each round | latency p50 | latency p99 |\n\
             |---:|---:|---:|---|---:|---:|\n",
        );
        for v in writers {
            let per_round: Vec<String> = round_rps(jf(v, "writers"))
                .iter()
                .filter_map(|(r, rps)| one.get(r).map(|b| format!("{:.2}", rps / b)))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {} | {} | {} |",
                jf(v, "writers"),
                fmt_rate(jf(v, "rps")),
                jf(v, "rps_ratio"),
                if per_round.is_empty() { "–".to_string() } else { per_round.join(", ") },
                fmt_us(jf(v, "p50_us")),
                fmt_us(jf(v, "p99_us"))
            );
        }
        s.push('\n');
    }
    let tries: Vec<String> = lines
        .iter()
        .filter(|v| s_eq(v, "kind", "try_again"))
        .map(|v| {
            let n = jf(v, "count");
            let shown = if n >= 0.0 { format!("{n}") } else { "unreadable".to_string() };
            format!("{} node {}: {shown}", js(v, "config"), jf(v, "node"))
        })
        .collect();
    if !tries.is_empty() {
        let _ = writeln!(
            s,
            "TRY_AGAIN answers of corosync (`ulog_cluster_bus_try_again_total` of each agent at the end): {}.\n",
            tries.join("; ")
        );
    }
    s
}

fn render_memory(lines: &[Value]) -> String {
    let mut s = String::from(
        "The bench-profile `ulog-agent` in a private network namespace; through a `KernelPeer`: 16 logs of 2^21 \
         regions each (CTR + RESUME), 1000 MARKs of 32 pseudo-random regions per log (200 in quick runs), a FLUSH; \
         then `/proc/<pid>/status`. Each configuration in a fresh agent. Baseline: the same agent idle, before the \
         first CTR; the floor is the two bitmaps per log (2 × 2^21 bits = 0.5 MiB).\n\n",
    );
    s.push_str(
        "| logs | idle VmRSS | VmRSS | VmHWM | RssAnon | per log | per log ÷ bitmaps | threads | target ≤ 40 MiB |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for v in lines.iter().filter(|v| s_eq(v, "kind", "summary")) {
        let bitmaps = 2.0 * jf(v, "regions_per_log") / 8.0 / 1_048_576.0;
        let desc = match js(v, "log_type") {
            "core" => format!("{} × clustered-core", jf(v, "logs")),
            _ => format!("{} × clustered-disk (sparse files on {})", jf(v, "logs"), js(v, "file_fs")),
        };
        let _ = writeln!(
            s,
            "| {desc} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} MiB | {:.2}× | {} | {} |",
            jf(v, "idle_rss_mib"),
            jf(v, "rss_mib"),
            jf(v, "hwm_mib"),
            jf(v, "rss_anon_mib"),
            jf(v, "per_log_mib"),
            jf(v, "per_log_mib") / bitmaps,
            jf(v, "threads"),
            if jf(v, "rss_mib") <= jf(v, "target_mib") { "met" } else { "NOT met" },
        );
    }
    s.push('\n');
    s
}

// ---------------------------------------------------------------------------------------------
// BENCHMARKS.md.

const INTRO: &str = "# Benchmarks

Generated by `cargo xtask bench` (the sections between `<!-- bench:... -->` markers are rewritten by
each run of the benchmarks they belong to; text outside them is kept). Every figure comes with a
baseline measured in the same invocation on the same machine, and the ratio to it: the machines
these run on are shared, so absolute figures move with the load, ratios much less. Nothing here is
asserted by any test.

| command | what it runs |
|---|---|
| `cargo xtask bench` | all four benchmarks below, then rewrites this file |
| `cargo xtask bench --quick` | the same with short measurements (noisier; marked as such) |
| `cargo xtask bench --only handling` (or `roundtrip`, `memory`, `cluster`; comma-separated) | a subset; the other sections stay as they were |
| `cargo xtask bench --only cluster` | the cluster benchmark alone (~35 s: 4 corosyncs, 5 agents; resync with 1-3 nodes, 2 writers vs 1); `--quick`, `--rounds N` apply |
| `cargo xtask bench --only roundtrip --rounds 9 --secs 3 --no-loop` | round-trip options; `--no-disk` skips the memory benchmark's disk logs |
| `cargo bench -p ulog-agent` | the same benchmarks through cargo alone (results in `target/ulog-bench/` and `target/ulog-bench/criterion` if `CRITERION_HOME` points there, this file untouched) |

`roundtrip`, `memory` and `cluster` need root (private network namespaces, connector sockets);
`roundtrip` also uses `losetup` for the loop-device case (skipped with a note if that fails);
`cluster` needs corosync 3 and iproute2 (`cargo xtask setup`). `cargo test` does not build
benchmarks; `cargo test --benches` runs `handling` once per case in criterion's test mode and only
prints \"skipped\" for the others.

";

fn section(name: &str, body: &str) -> String {
    format!("<!-- bench:{name}:begin -->\n{}<!-- bench:{name}:end -->\n", body)
}

/// Replaces the sections in `new` (and the intro) inside `old`, appending missing ones in the
/// canonical order; everything outside markers is kept.
fn merge(old: &str, new: &BTreeMap<&str, String>) -> String {
    let mut doc = if old.trim().is_empty() { String::new() } else { old.to_string() };
    let mut all: Vec<(String, String)> = vec![("intro".into(), INTRO.to_string())];
    for b in BENCHES {
        if let Some(t) = new.get(b) {
            all.push((b.to_string(), t.clone()));
        } else if !doc.contains(&format!("<!-- bench:{b}:begin -->")) {
            all.push((b.to_string(), format!("## `{b}`\n\nNot run yet: `cargo xtask bench --only {b}`.\n\n")));
        }
    }
    for (name, body) in all {
        let begin = format!("<!-- bench:{name}:begin -->");
        let end = format!("<!-- bench:{name}:end -->");
        match (doc.find(&begin), doc.find(&end)) {
            (Some(b), Some(e)) if e > b => {
                let e = e + end.len();
                let e = if doc[e..].starts_with('\n') { e + 1 } else { e };
                doc.replace_range(b..e, &section(&name, &body));
            }
            _ => {
                if name == "intro" {
                    doc.insert_str(0, &section(&name, &body));
                } else {
                    if !doc.is_empty() && !doc.ends_with('\n') {
                        doc.push('\n');
                    }
                    // Before a hand-written tail? Keep it simple: sections go in order at the end
                    // of the generated part, i.e. after the last existing section marker.
                    let insert_at = BENCHES
                        .iter()
                        .chain(std::iter::once(&"intro"))
                        .filter_map(|b| {
                            let end = format!("<!-- bench:{b}:end -->\n");
                            doc.find(&end).map(|i| i + end.len())
                        })
                        .max()
                        .unwrap_or(doc.len());
                    doc.insert_str(insert_at, &section(&name, &body));
                }
            }
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_replaces_only_the_sections_run_and_keeps_hand_written_text() {
        let mut new = BTreeMap::new();
        new.insert("handling", "H1\n".to_string());
        let first = merge("", &new);
        assert!(first.starts_with("<!-- bench:intro:begin -->\n# Benchmarks"));
        assert!(first.contains("<!-- bench:handling:begin -->\nH1\n<!-- bench:handling:end -->"));
        assert!(first.contains("Not run yet: `cargo xtask bench --only roundtrip`"));
        let hand = format!("{first}\n## Observations\n\nkept\n");
        let mut new2 = BTreeMap::new();
        new2.insert("roundtrip", "R1\n".to_string());
        let second = merge(&hand, &new2);
        assert!(second.contains("H1\n"), "handling kept");
        assert!(second.contains("<!-- bench:roundtrip:begin -->\nR1\n<!-- bench:roundtrip:end -->"));
        assert!(!second.contains("Not run yet: `cargo xtask bench --only roundtrip`"));
        assert!(second.ends_with("## Observations\n\nkept\n"));
        assert_eq!(second.matches("<!-- bench:intro:begin -->").count(), 1);
        // Idempotent.
        assert_eq!(merge(&second, &new2), second);
    }

    #[test]
    fn only_selects_in_section_order_and_nothing_selects_all() {
        assert_eq!(selected(&[]), BENCHES);
        assert_eq!(selected(&["cluster".to_string()]), ["cluster"]);
        assert_eq!(selected(&["memory".to_string(), "handling".to_string()]), ["handling", "memory"]);
    }

    #[test]
    fn the_cluster_section_shows_both_ratios_per_type_and_the_try_again_counts() {
        let lines: Vec<Value> = [
            r#"{"kind":"meta","rounds":4,"count":500,"tput_count":2000,"depth":32,"cpus":2}"#,
            r#"{"kind":"summary","config":"single","series":"MARK_REGION","p50_us":20,"p99_us":40,"p50_ratio":1,"p99_ratio":1}"#,
            r#"{"kind":"summary","config":"cluster-1","series":"MARK_REGION","p50_us":200,"p99_us":400,"p50_ratio":10,"p99_ratio":10}"#,
            r#"{"kind":"summary","config":"cluster-3","series":"MARK_REGION","p50_us":700,"p99_us":1600,"p50_ratio":35,"p99_ratio":40}"#,
            r#"{"kind":"throughput_summary","config":"cluster-3","depth":32,"rps":7700,"rps_ratio":0.07,"p50_us":3800,"p99_us":5400}"#,
            r#"{"kind":"try_again","config":"cluster-3","node":2,"count":3}"#,
            r#"{"kind":"try_again","config":"cluster-3","node":3,"count":-1}"#,
            r#"{"kind":"resync_summary","nodes":1,"runs":4,"regions":192,"copy_ms":5,"copy_floor_ms":960,"wall_ms":1250,"regions_per_s":153.6,"speedup":1,"per_node":"192, 192"}"#,
            r#"{"kind":"resync_summary","nodes":3,"runs":4,"regions":192,"copy_ms":5,"copy_floor_ms":320,"wall_ms":460,"regions_per_s":417.4,"speedup":2.72,"per_node":"64+65+63, 64+64+64"}"#,
            r#"{"kind":"writers_round","round":0,"writers":1,"rps":5000}"#,
            r#"{"kind":"writers_round","round":0,"writers":2,"rps":6000}"#,
            r#"{"kind":"writers_round","round":1,"writers":2,"rps":8000}"#,
            r#"{"kind":"writers_round","round":1,"writers":1,"rps":5000}"#,
            r#"{"kind":"writers_summary","writers":2,"depth":32,"rps":9000,"rps_ratio":1.3,"p50_us":6000,"p99_us":9000}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        let s = render_cluster(&lines);
        assert!(s.contains("4 rounds × 500 requests"), "{s}");
        assert!(s.contains("2-CPU machine shared") && s.contains("only the ratios mean anything"), "{s}");
        assert!(s.contains("| MARK_REGION | 20.0 µs | 40.0 µs | 200.0 µs | 400.0 µs | 700.0 µs | 1.60 ms | 10.00 | 10.00 | 35.00 | 40.00 |"), "{s}");
        assert!(s.contains("| cluster-3 | 7.7 k | 0.07 | 3.80 ms | 5.40 ms |"), "{s}");
        assert!(s.contains("cluster-3 node 2: 3; cluster-3 node 3: unreadable"), "{s}");
        assert!(!s.contains("| IN_SYNC |"), "no row without results: {s}");
        assert!(s.contains("A fresh 192-region `clustered-core` log") && s.contains("a 5 ms sleep"), "{s}");
        assert!(s.contains("Median of 4 runs per *k*"), "{s}");
        assert!(s.contains("| 1 | 1.25 s | 154 | 1.00 | 960.0 ms | 192, 192 |"), "{s}");
        assert!(s.contains("| 3 | 460.0 ms | 417 | 2.72 | 320.0 ms | 64+65+63, 64+64+64 |"), "{s}");
        assert!(
            s.contains("two nodes vs one, 32 in flight per writer") && s.contains("2000 requests per writer"),
            "{s}"
        );
        assert!(s.contains("| 2 | 9.0 k | 1.30 | 1.20, 1.60 | 6.00 ms | 9.00 ms |"), "{s}");
    }

    #[test]
    fn utc_dates() {
        let d = utc_now();
        assert_eq!(d.len(), "2026-11-21 13:00 UTC".len());
        assert!(d.starts_with("20"));
    }
}
