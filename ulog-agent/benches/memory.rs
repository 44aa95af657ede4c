//! Resident memory of the agent binary (the bench-profile build cargo makes for this target)
//! with 16 logs of 2^21 regions each, created through a [`KernelPeer`] in a private network
//! namespace (needs root): CTR + RESUME each log, MARK some regions (1000 MARKs of 32
//! pseudo-random regions per log, then a FLUSH), then read `VmRSS` (and `VmHWM`, `RssAnon`,
//! `Threads`) from `/proc/<pid>/status`. Baseline: the same agent idle, before the first CTR.
//!
//! Two configurations, each in a fresh agent process: 16 `clustered-core` logs, and 16
//! `clustered-disk` logs on sparse files on the target directory's filesystem (one I/O thread
//! and one image buffer per log).
//!
//! Output: JSON lines (`ULOG-BENCH {...}` on stdout and `<target>/ulog-bench/memory.jsonl`).
//! Run: `cargo bench -p ulog-agent --bench memory [-- --quick] [-- --no-disk]`.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{Results, J};
use ulog_agent::wire::kernel_peer::{enter_private_netns, regions_payload, AgentProcess, KernelPeer, Request};
use ulog_common::RequestType;

const LOGS: usize = 16;
const REGIONS: u64 = 1 << 21;
const DEV_SECTORS: u64 = 2_147_483_648;
const TARGET_MIB: f64 = 40.0;

/// Fields of `/proc/<pid>/status` in KiB (and `Threads` as a count).
fn status(pid: u32) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let want = ["VmRSS", "VmHWM", "RssAnon", "RssFile", "VmSize", "Threads"];
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            if !want.contains(&k) {
                return None;
            }
            let n = v.split_whitespace().next()?.parse().ok()?;
            Some((k.to_string(), n))
        })
        .collect()
}

fn get(st: &[(String, u64)], k: &str) -> u64 {
    st.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v)
}

fn ok(peer: &mut KernelPeer, req: Request, what: &str) {
    let r = peer.call_request(&req).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.error, 0, "{what}: {r}");
}

fn run(kind: &str, dir: &Path, marks_per_log: usize, results: &mut Results) -> f64 {
    enter_private_netns().expect("private netns");
    let mut peer = KernelPeer::open().expect("kernel peer");
    peer.set_call_timeout(Duration::from_secs(30));
    let mut agent = AgentProcess::spawn_ready(env!("CARGO_BIN_EXE_ulog-agent"), &mut peer, Vec::<String>::new())
        .expect("start the agent");
    let pid = agent.pid();
    let idle = status(pid);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for i in 0..LOGS {
        let uuid = format!("LVM-ulog-bench-memory-{kind}-{i:02}");
        let luid = 0xffff_8880_1000_0000 + ((i as u64) << 12);
        let ctr = match kind {
            "core" => format!("{DEV_SECTORS} clustered-core 1024"),
            _ => {
                let p = dir.join(format!("memory-disk-{i:02}.img"));
                let f = std::fs::File::create(&p).expect("create the log file");
                f.set_len(1 << 20).expect("size the log file (sparse)");
                format!("{DEV_SECTORS} clustered-disk {} 1024", p.display())
            }
        };
        ok(&mut peer, Request::ctr(&uuid, luid, &ctr), "CTR");
        ok(&mut peer, Request::new(RequestType::Resume, &uuid, luid, vec![]), "RESUME");
        for _ in 0..marks_per_log {
            let regions: Vec<u64> = (0..32)
                .map(|_| {
                    rng ^= rng >> 12;
                    rng ^= rng << 25;
                    rng ^= rng >> 27;
                    rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % REGIONS
                })
                .collect();
            ok(&mut peer, Request::new(RequestType::MarkRegion, &uuid, luid, regions_payload(&regions)), "MARK");
        }
        ok(&mut peer, Request::new(RequestType::Flush, &uuid, luid, vec![]), "FLUSH");
    }
    // Let lazy writes (disk) settle before reading.
    std::thread::sleep(Duration::from_millis(300));
    let full = status(pid);
    let rss_mib = get(&full, "VmRSS") as f64 / 1024.0;
    let idle_mib = get(&idle, "VmRSS") as f64 / 1024.0;
    println!(
        "{kind:>4}: idle VmRSS {idle_mib:.1} MiB; with {LOGS} logs of {REGIONS} regions: VmRSS {rss_mib:.1} MiB (VmHWM {:.1}, RssAnon {:.1}, threads {}); {:.2} MiB per log; target <= {TARGET_MIB} MiB",
        get(&full, "VmHWM") as f64 / 1024.0,
        get(&full, "RssAnon") as f64 / 1024.0,
        get(&full, "Threads"),
        (rss_mib - idle_mib) / LOGS as f64,
    );
    results.push(&[
        ("bench", J::from("memory")),
        ("kind", "summary".into()),
        ("log_type", kind.into()),
        ("logs", LOGS.into()),
        ("regions_per_log", REGIONS.into()),
        ("marks_per_log", marks_per_log.into()),
        ("idle_rss_mib", idle_mib.into()),
        ("rss_mib", rss_mib.into()),
        ("hwm_mib", (get(&full, "VmHWM") as f64 / 1024.0).into()),
        ("rss_anon_mib", (get(&full, "RssAnon") as f64 / 1024.0).into()),
        ("rss_file_mib", (get(&full, "RssFile") as f64 / 1024.0).into()),
        ("vm_size_mib", (get(&full, "VmSize") as f64 / 1024.0).into()),
        ("threads", get(&full, "Threads").into()),
        ("per_log_mib", ((rss_mib - idle_mib) / LOGS as f64).into()),
        ("rss_ratio_vs_idle", (rss_mib / idle_mib).into()),
        ("target_mib", TARGET_MIB.into()),
        ("file_fs", common::fs_type(dir).into()),
    ]);
    let st = agent.restart_exit(Duration::from_secs(60)).expect("agent exit");
    assert!(st.success(), "agent exited with {st}:\n{}", agent.output());
    rss_mib
}

fn main() {
    if !common::start_as_root("memory") {
        return;
    }
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("RUST_LOG", "warn") };
    let marks = if common::quick() { 200 } else { 1000 };
    let dir = common::target_dir().join("ulog-bench").join("files");
    std::fs::create_dir_all(&dir).expect("create the bench file directory");
    let mut results = Results::new("memory");
    run("core", &dir, marks, &mut results);
    let no_disk = std::env::args().any(|a| a == "--no-disk");
    if no_disk {
        eprintln!("note: disk logs skipped (--no-disk)");
    } else if common::fs_type(&dir) == "tmpfs" {
        eprintln!("note: disk logs skipped: {} is on tmpfs", dir.display());
    } else {
        run("disk", &dir, marks, &mut results);
        for i in 0..LOGS {
            let _ = std::fs::remove_file(dir.join(format!("memory-disk-{i:02}.img")));
        }
    }
    results.write();
}
