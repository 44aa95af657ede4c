//! How long a CTR holds up the other logs: the receive thread serves every log, so whatever a
//! CTR does on it (opening the log device, creating a state file) delays every request behind
//! it. Issue "Trust" item 14.
//!
//! * Agent: the release `ulog-agent` (or `$ULOG_AGENT_BIN`, e.g. an older build to compare)
//!   with `--state-dir` on the target directory's filesystem (not tmpfs) and
//!   `--accept-peer-port`, in a private network namespace, driven by a [`KernelPeer`].
//! * A live `clustered-core` log `busy` (in the state directory, resumed).
//! * Baseline, same invocation: IN_SYNC round trips on `busy` alone.
//! * Measured: for each of `--ctrs` new uuids, a CTR of a state-dir core log (a new state file)
//!   and, right behind it on the same socket, an IN_SYNC on `busy`; the IN_SYNC's round trip
//!   includes everything the CTR did on the receive thread. Also the CTR's own round trip.
//!   The new logs are resumed and destroyed between samples.
//!
//! Output: text lines and `ULOG-BENCH {...}` JSON lines (`<target>/ulog-bench/ctr_stall.jsonl`).
//!
//! Run: `cargo bench -p ulog-agent --bench ctr_stall [-- --ctrs 200]` (root).

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{median, quantile, Results, J};
use ulog_agent::wire::kernel_peer::{enter_private_netns, AgentProcess, KernelPeer, Request};
use ulog_common::RequestType;

fn main() {
    if !common::start_as_root("ctr_stall") {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let ctrs: usize = args
        .iter()
        .position(|a| a == "--ctrs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if common::quick() { 40 } else { 200 });
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("RUST_LOG", "warn") };
    let state = common::target_dir().join("ulog-bench").join("ctr-stall-state");
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).expect("create the state directory");
    let fs = common::fs_type(&state);
    enter_private_netns().expect("private netns");
    let mut peer = KernelPeer::open().expect("kernel peer");
    peer.set_call_timeout(Duration::from_secs(20));
    let exe = std::env::var("ULOG_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ulog-agent").to_string());
    let agent = AgentProcess::spawn_ready(&exe, &mut peer, ["--state-dir".to_string(), state.display().to_string()])
        .expect("start the agent");
    let ok = |peer: &mut KernelPeer, req: Request, what: &str| {
        let r = peer.call_request(&req).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.error, 0, "{what}: {r}");
    };
    let (busy, luid) = ("LVM-ulog-bench-ctr-busy", 0xffff_8880_0000_1000u64);
    let ctr = "2097152 clustered-core 1024";
    ok(&mut peer, Request::ctr(busy, luid, ctr), "CTR busy");
    ok(&mut peer, Request::new(RequestType::Resume, busy, luid, vec![]), "RESUME busy");
    let in_sync = || Request::new(RequestType::InSync, busy, luid, 7u64.to_ne_bytes().to_vec());

    let mut alone = Vec::new();
    for _ in 0..ctrs.max(200) {
        let t = Instant::now();
        ok(&mut peer, in_sync(), "IN_SYNC");
        alone.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (mut behind, mut ctr_rtt) = (Vec::new(), Vec::new());
    for i in 0..ctrs {
        let uuid = format!("LVM-ulog-bench-ctr-{i:05}");
        let l = 0xffff_8880_0010_0000 + i as u64 * 0x1000;
        let t = Instant::now();
        let c = peer.send(&Request::ctr(&uuid, l, ctr)).expect("send CTR");
        let s = peer.send(&in_sync()).expect("send IN_SYNC");
        let rs = peer.wait_reply(s, Duration::from_secs(20)).expect("IN_SYNC reply");
        behind.push(t.elapsed().as_secs_f64() * 1e6);
        let rc = peer.wait_reply(c, Duration::from_secs(20)).expect("CTR reply");
        ctr_rtt.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!((rc.error, rs.error), (0, 0), "CTR {rc} / IN_SYNC {rs}");
        ok(&mut peer, Request::new(RequestType::Resume, &uuid, l, vec![]), "RESUME");
        ok(&mut peer, Request::new(RequestType::Presuspend, &uuid, l, vec![]), "PRESUSPEND");
        ok(&mut peer, Request::new(RequestType::Postsuspend, &uuid, l, vec![]), "POSTSUSPEND");
        ok(&mut peer, Request::new(RequestType::Dtr, &uuid, l, vec![]), "DTR");
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&state);

    let mut results = Results::new("ctr_stall");
    let row = |name: &str, v: &mut Vec<f64>| {
        let mut ns: Vec<u64> = v.iter().map(|us| (us * 1000.0) as u64).collect();
        ns.sort_unstable();
        let p99 = quantile(&ns, 0.99) as f64 / 1000.0;
        let max = ns.last().copied().unwrap_or(0) as f64 / 1000.0;
        let p50 = median(v);
        println!("{name:<34} p50 {p50:>9.1} µs   p99 {p99:>9.1} µs   max {max:>9.1} µs   (n={})", v.len());
        (p50, p99, max)
    };
    println!("agent {exe}, state directory on {fs}");
    let a = row("IN_SYNC alone (baseline)", &mut alone);
    let b = row("IN_SYNC right behind a CTR", &mut behind);
    let c = row("CTR (new state file)", &mut ctr_rtt);
    println!("ratio behind/alone: p50 {:.2}  p99 {:.2}", b.0 / a.0, b.1 / a.1);
    for (name, (p50, p99, max)) in [("alone", a), ("behind_ctr", b), ("ctr", c)] {
        results.push(&[
            ("what", J::from(name)),
            ("p50_us", J::from(p50)),
            ("p99_us", J::from(p99)),
            ("max_us", J::from(max)),
            ("fs", J::from(fs.clone())),
            ("agent", J::from(exe.clone())),
        ]);
    }
    results.write();
}
