//! What cluster mode costs a request (issue 11, host part): round trips to the release agent
//! binary over a real NETLINK_CONNECTOR socket, per request type, for three configurations
//! measured in the same invocation, rounds interleaved:
//!
//! * `single` (the baseline): `ulog-agent` without `--cluster`, in a private network namespace.
//! * `cluster-1`: `ulog-agent --cluster` on node 1 of a 1-node corosync cluster
//!   ([`TestCluster`]), in that node's namespace.
//! * `cluster-3`: `ulog-agent --cluster` on node 1 of a 3-node corosync cluster. Nodes 2 and 3
//!   run agents too, with the same logs constructed and resumed by their own kernel peers
//!   (members of each log's group), and idle: they only apply and acknowledge what node 1 sends.
//!
//! Each agent is driven by a [`KernelPeer`] in its namespace. Logs: `core` = 2^21-region
//! `clustered-core nosync` (every region starts clean, so every MARK of a fresh region really
//! dirties it); `resync` = the same without `nosync`, for GET_RESYNC_WORK + SET_REGION_SYNC
//! (every region starts out of sync). One pair of logs per configuration, kept for the run.
//!
//! * Latency, 1 in flight, per type, per round and configuration: `--count` requests each of
//!   IN_SYNC (pseudo-random regions), MARK_REGION (one fresh region), FLUSH (empty, after the
//!   MARKs were answered), CLEAR_REGION (the regions just marked), GET_SYNC_COUNT, and
//!   GET_RESYNC_WORK followed by SET_REGION_SYNC of the region it handed out (each, and the pair).
//!   Quantiles are over all rounds' samples; ratios are configuration ÷ `single`, also per round
//!   (`*_ratio_paired`: the median of per-round ratios).
//! * Throughput: MARK (fresh region) + FLUSH alternating with 32 in flight, `--tput-count`
//!   requests per round and configuration; requests/s and the ratio to `single`. Then,
//!   unmeasured, CLEARs of those regions, so marks do not pile up over rounds.
//! * Resync with 1, 2, 3 nodes (after the rounds above, on the 3-node cluster): per round and
//!   node count k (rotated), a fresh 192-region `clustered-core` log (not `nosync`), a new uuid
//!   each time, constructed and resumed on nodes 1..=k only. Each of those nodes' kernel peers
//!   runs dm-raid1's recovery loop in its own thread (GET_RESYNC_WORK; for a region, a 5 ms
//!   sleep standing for kcopyd's copy of it, which is not what is measured; SET_REGION_SYNC(r, 1);
//!   until no work), all started together. Wall time until the last node is told there is no
//!   work; regions/s; the ratio to k = 1. Each run asserts (a wrong resync fails the bench) that
//!   the regions handed out are disjoint and cover the log, and that GET_SYNC_COUNT is the region
//!   count on every node (waited for, at most 30 s).
//! * One mirror written by 1 vs 2 nodes (then): the `core` log of the 3-node cluster, MARK of a
//!   fresh region then CLEAR of it, [`DEPTH`] in flight, `--tput-count` requests per writer, from
//!   node 1 alone or from nodes 1 and 2 at once (distinct regions); total requests/s and the
//!   ratio 2 writers ÷ 1, per round (rotated) and as medians. The host's stand-in for "IOPS of
//!   one mirror written by two nodes vs one".
//! * TRY_AGAIN: `ulog_cluster_bus_try_again_total` of every cluster agent's `/metrics` at the end
//!   (the agents serve HTTP on loopback in their namespaces).
//!
//! Rounds rotate the order of the configurations. Before each configuration's turn the bench
//! waits until every agent is idle (< 5% of a CPU over 100 ms, at most 5 s): the idle members
//! of a cluster keep applying and acknowledging for a while after a burst. No timing is asserted.
//!
//! Output: human-readable lines, and JSON lines (`ULOG-BENCH {...}` on stdout and
//! `<target>/ulog-bench/cluster.jsonl`; `$ULOG_BENCH_OUT_DIR` overrides the directory).
//!
//! Run: `cargo bench -p ulog-agent --bench cluster [-- --quick] [-- --rounds N --count N
//! --tput-count N]`; needs root, `ip`, `unshare` and corosync 3 (`cargo xtask setup`). Under
//! `cargo test --benches` it only says it was skipped.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{median, quantile, Results, J};
use ulog_agent::cluster::test_cluster::TestCluster;
use ulog_agent::wire::kernel_peer::{enter_private_netns, regions_payload, AgentProcess, KernelPeer, Request};
use ulog_common::RequestType as T;

const REGIONS: u64 = 1 << 21;
const DEV_SECTORS: u64 = 2_147_483_648;
const REGION_SIZE: u64 = 1024;
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const CORE_UUID: &str = "LVM-ulog-bench-cluster-core";
const RESYNC_UUID: &str = "LVM-ulog-bench-cluster-resync";
const LUID_BASE: u64 = 0xffff_8880_0000_0000;
/// The agents' HTTP API, on loopback in each namespace.
const HTTP_ADDR: &str = "127.0.0.1:9477";
const DEPTH: usize = 32;
/// Regions of each resync log (all out of sync at the start).
const RESYNC_REGIONS: u64 = 192;
/// What one region's copy takes in the resync measurement: stands for the kernel's kcopyd copy
/// of a region between the legs (not measured here; a 512 KiB region at ~100 MB/s).
const COPY_TIME: Duration = Duration::from_millis(5);
/// Node counts of the resync measurement.
const RESYNC_NODES: [usize; 3] = [1, 2, 3];
/// Writer counts of the writers measurement.
const WRITERS: [usize; 2] = [1, 2];

/// Latency series, in the order they are measured (and reported).
const SERIES: [&str; 8] = [
    "IN_SYNC",
    "MARK_REGION",
    "FLUSH",
    "CLEAR_REGION",
    "GET_SYNC_COUNT",
    "GET_RESYNC_WORK",
    "SET_REGION_SYNC",
    "GET_RESYNC_WORK+SET_REGION_SYNC",
];

struct Config {
    rounds: usize,
    count: usize,
    tput_count: usize,
}

fn arg_value(args: &[String], name: &str) -> Option<usize> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} N")))
}

fn config() -> Config {
    let args: Vec<String> = std::env::args().collect();
    let quick = common::quick();
    Config {
        rounds: arg_value(&args, "--rounds").unwrap_or(if quick { 2 } else { 4 }),
        count: arg_value(&args, "--count").unwrap_or(if quick { 100 } else { 500 }),
        tput_count: arg_value(&args, "--tput-count").unwrap_or(if quick { 400 } else { 2000 }),
    }
}

/// An agent with its kernel peer and its two logs.
struct Node {
    peer: KernelPeer,
    agent: AgentProcess,
    luid: u64,
}

/// A configuration: the measured node, the idle others, and its cluster.
struct Setup {
    name: &'static str,
    node: Node,
    idle: Vec<Node>,
    /// Index of its [`TestCluster`] (whose node namespaces hold its agents' HTTP APIs).
    cluster: Option<usize>,
    /// Next fresh region of the core log (a permutation of the log's regions).
    fresh: u64,
    /// IN_SYNC requests sent (seed of their pseudo-random regions).
    in_sync_i: u64,
}

fn ok_call(peer: &mut KernelPeer, req: &Request, what: &str) -> Vec<u8> {
    let r = peer.call_request(req).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.error, 0, "{what}: {r}");
    r.payload
}

fn start_node(exe: &str, luid: u64, cluster_mode: bool) -> Node {
    let mut peer = KernelPeer::open().expect("kernel peer");
    peer.set_call_timeout(REPLY_TIMEOUT);
    let args: Vec<&str> = if cluster_mode { vec!["--cluster"] } else { vec![] };
    let agent = AgentProcess::spawn_ready(exe, &mut peer, args).expect("start the agent");
    Node { peer, agent, luid }
}

fn create_logs(n: &mut Node) {
    let core = format!("{DEV_SECTORS} clustered-core {REGION_SIZE} nosync");
    let resync = format!("{DEV_SECTORS} clustered-core {REGION_SIZE}");
    for (uuid, luid, ctr) in [(CORE_UUID, n.luid, core), (RESYNC_UUID, n.luid + 1, resync)] {
        ok_call(&mut n.peer, &Request::ctr(uuid, luid, &ctr), "CTR");
        ok_call(&mut n.peer, &Request::new(T::Resume, uuid, luid, vec![]), "RESUME");
    }
}

/// Region `k` of the fresh-region permutation (odd multiplier: a permutation of 0..2^21).
fn fresh_region(k: u64) -> u64 {
    k.wrapping_mul(0x5851_f42d) % REGIONS
}

/// Sends `req`, waits for its reply; the round trip in ns and the payload.
fn timed(peer: &mut KernelPeer, req: &Request, what: &str) -> (u64, Vec<u8>) {
    let t0 = Instant::now();
    let seq = peer.send(req).expect("send");
    let r = peer.recv_reply(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("{what}: {e}"));
    let ns = t0.elapsed().as_nanos() as u64;
    assert_eq!(r.seq, seq, "{what}: reply to another seq");
    assert_eq!(r.error, 0, "{what}: {r}");
    (ns, r.payload)
}

/// One round of the latency series on `s`: `count` requests of each, 1 in flight.
fn latency_round(s: &mut Setup, count: usize) -> BTreeMap<&'static str, Vec<u64>> {
    let mut out: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    let (peer, luid) = (&mut s.node.peer, s.node.luid);
    let what = |t: &str| format!("{} {t}", s.name);
    let mut req = Request::new(T::InSync, CORE_UUID, luid, 0u64.to_ne_bytes());
    for _ in 0..count {
        s.in_sync_i += 1;
        let r = s.in_sync_i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 43; // 21 bits
        req.payload.copy_from_slice(&r.to_ne_bytes());
        out.entry("IN_SYNC").or_default().push(timed(peer, &req, &what("IN_SYNC")).0);
    }
    let marked: Vec<u64> = (0..count as u64).map(|k| fresh_region(s.fresh + k)).collect();
    s.fresh += count as u64;
    for &region in &marked {
        let req = Request::new(T::MarkRegion, CORE_UUID, luid, regions_payload(&[region]));
        out.entry("MARK_REGION").or_default().push(timed(peer, &req, &what("MARK_REGION")).0);
    }
    let flush = Request::new(T::Flush, CORE_UUID, luid, vec![]);
    for _ in 0..count {
        out.entry("FLUSH").or_default().push(timed(peer, &flush, &what("FLUSH")).0);
    }
    for &region in &marked {
        let req = Request::new(T::ClearRegion, CORE_UUID, luid, regions_payload(&[region]));
        out.entry("CLEAR_REGION").or_default().push(timed(peer, &req, &what("CLEAR_REGION")).0);
    }
    let gsc = Request::new(T::GetSyncCount, CORE_UUID, luid, vec![]);
    for _ in 0..count {
        out.entry("GET_SYNC_COUNT").or_default().push(timed(peer, &gsc, &what("GET_SYNC_COUNT")).0);
    }
    let grw = Request::new(T::GetResyncWork, RESYNC_UUID, luid + 1, vec![]);
    for _ in 0..count {
        let (a, p) = timed(peer, &grw, &what("GET_RESYNC_WORK"));
        let found = i64::from_ne_bytes(p[..8].try_into().expect("8 bytes"));
        assert_ne!(found, 0, "{}: no resync work left", s.name);
        let mut sync = p[8..16].to_vec();
        sync.extend_from_slice(&1i64.to_ne_bytes());
        let (b, _) =
            timed(peer, &Request::new(T::SetRegionSync, RESYNC_UUID, luid + 1, sync), &what("SET_REGION_SYNC"));
        out.entry("GET_RESYNC_WORK").or_default().push(a);
        out.entry("SET_REGION_SYNC").or_default().push(b);
        out.entry("GET_RESYNC_WORK+SET_REGION_SYNC").or_default().push(a + b);
    }
    out
}

/// Sends `count` requests made by `next` with [`DEPTH`] in flight. Returns (requests/s,
/// sorted latencies in ns).
fn pipeline(peer: &mut KernelPeer, what: &str, count: usize, mut next: impl FnMut() -> Request) -> (f64, Vec<u64>) {
    const RING: usize = 4096;
    let mut sent_at: Vec<Option<Instant>> = vec![None; RING];
    let mut lat = Vec::with_capacity(count);
    let (mut sent, mut outstanding) = (0usize, 0usize);
    let start = Instant::now();
    loop {
        while sent < count && outstanding < DEPTH {
            let req = next();
            let t = Instant::now();
            let seq = peer.send(&req).expect("send");
            sent_at[seq as usize % RING] = Some(t);
            sent += 1;
            outstanding += 1;
        }
        if outstanding == 0 {
            break;
        }
        let r = peer.recv_reply(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("{what}: {e}"));
        let t1 = Instant::now();
        assert_eq!(r.error, 0, "{what}: {r}");
        let t0 = sent_at[r.seq as usize % RING].take().unwrap_or_else(|| panic!("{what}: unknown seq {}", r.seq));
        lat.push((t1 - t0).as_nanos() as u64);
        outstanding -= 1;
    }
    let rps = count as f64 / start.elapsed().as_secs_f64();
    assert!(peer.take_unmatched().is_empty(), "{what}: unmatched replies");
    lat.sort_unstable();
    (rps, lat)
}

/// MARK (fresh region) + FLUSH alternating with [`DEPTH`] in flight, `count` requests; then,
/// unmeasured, CLEARs of those regions (so marks do not pile up over rounds, as they do not in
/// a mirror whose writes complete). Returns (requests/s, sorted latencies in ns).
fn throughput_round(s: &mut Setup, count: usize) -> (f64, Vec<u64>) {
    let what = format!("{} MARK+FLUSH depth {DEPTH}", s.name);
    let (peer, luid) = (&mut s.node.peer, s.node.luid);
    let first = s.fresh;
    let fresh = &mut s.fresh;
    let mut mark_next = true;
    let out = pipeline(peer, &what, count, || {
        mark_next = !mark_next;
        if !mark_next {
            let region = fresh_region(*fresh);
            *fresh += 1;
            Request::new(T::MarkRegion, CORE_UUID, luid, regions_payload(&[region]))
        } else {
            Request::new(T::Flush, CORE_UUID, luid, vec![])
        }
    });
    let mut k = first;
    let end = s.fresh;
    pipeline(peer, &format!("{} CLEAR after MARK+FLUSH", s.name), (end - first) as usize, || {
        k += 1;
        Request::new(T::ClearRegion, CORE_UUID, luid, regions_payload(&[fresh_region(k - 1)]))
    });
    out
}

/// CPU time (ns) of every thread of process `pid`, from `/proc/<pid>/task/*/schedstat`.
fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Waits (at most 5 s) until the agents together use less than 5% of a CPU over 100 ms: a
/// configuration's idle members may still be applying and acknowledging the frames of the last
/// measurement, which would slow whatever is measured next.
fn settle(pids: &[u32]) -> Duration {
    let start = Instant::now();
    let cpu = || pids.iter().map(|&p| process_cpu_ns(p)).sum::<u64>();
    let mut before = cpu();
    while start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        let now = cpu();
        if now.saturating_sub(before) < 5_000_000 {
            break;
        }
        before = now;
    }
    start.elapsed()
}

/// `ulog_cluster_bus_try_again_total` from the `/metrics` of the agent in the calling thread's
/// namespace; `None` if unreachable or absent.
fn try_again_count() -> Option<u64> {
    let mut c = std::net::TcpStream::connect_timeout(&HTTP_ADDR.parse().ok()?, Duration::from_secs(5)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("ulog_cluster_bus_try_again_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// dm-raid1's recovery loop of one node's kernel, until GET_RESYNC_WORK says there is no work:
/// GET_RESYNC_WORK, then (for a region) [`COPY_TIME`] of sleep standing for kcopyd's copy of the
/// region between the legs, then SET_REGION_SYNC(region, 1). One region at a time, as the
/// kernel does. Returns the regions this node was handed, in order.
fn recover(peer: &mut KernelPeer, uuid: &str, luid: u64, what: &str) -> Vec<u64> {
    let work = Request::new(T::GetResyncWork, uuid, luid, vec![]);
    let mut got = Vec::new();
    loop {
        let p = ok_call(peer, &work, what);
        assert!(p.len() >= 16, "{what}: GET_RESYNC_WORK payload of {} bytes", p.len());
        if i64::from_ne_bytes(p[..8].try_into().expect("8 bytes")) == 0 {
            return got;
        }
        let region = u64::from_ne_bytes(p[8..16].try_into().expect("8 bytes"));
        got.push(region);
        std::thread::sleep(COPY_TIME);
        let mut sync = region.to_ne_bytes().to_vec();
        sync.extend_from_slice(&1i64.to_ne_bytes());
        ok_call(peer, &Request::new(T::SetRegionSync, uuid, luid, sync), what);
    }
}

/// GET_SYNC_COUNT of a log on one node.
fn sync_count(peer: &mut KernelPeer, uuid: &str, luid: u64, what: &str) -> u64 {
    let p = ok_call(peer, &Request::new(T::GetSyncCount, uuid, luid, vec![]), what);
    u64::from_ne_bytes(p.get(..8).and_then(|b| b.try_into().ok()).unwrap_or_else(|| panic!("{what}: short payload")))
}

/// One resync measurement: a fresh [`RESYNC_REGIONS`]-region `clustered-core` log (not
/// `nosync`: every region starts out of sync) constructed and resumed on `nodes` (the other
/// agents of the cluster never open it), then every node's recovery loop ([`recover`]) in its
/// own thread, started together. The wall time runs from the start until the last node's
/// GET_RESYNC_WORK said there was no work. Then it asserts that the nodes' regions are disjoint
/// and cover the log, and (waiting at most 30 s for the other nodes' SET_REGION_SYNCs to be
/// applied) that GET_SYNC_COUNT is the region count on every node. Returns the wall time and
/// the regions each node recovered.
fn resync_run(nodes: &mut [(&mut KernelPeer, u64)], uuid: &str, settle_pids: &[u32]) -> (Duration, Vec<Vec<u64>>) {
    let k = nodes.len();
    let ctr = format!("{} clustered-core {REGION_SIZE}", RESYNC_REGIONS * REGION_SIZE);
    for (peer, luid) in nodes.iter_mut() {
        ok_call(peer, &Request::ctr(uuid, *luid, &ctr), "resync CTR");
    }
    for (peer, luid) in nodes.iter_mut() {
        ok_call(peer, &Request::new(T::Resume, uuid, *luid, vec![]), "resync RESUME");
    }
    settle(settle_pids);
    let start = Barrier::new(k + 1);
    let (wall, per_node) = std::thread::scope(|sc| {
        let threads: Vec<_> = nodes
            .iter_mut()
            .enumerate()
            .map(|(i, (peer, luid))| {
                let (start, luid) = (&start, *luid);
                sc.spawn(move || {
                    start.wait();
                    recover(peer, uuid, luid, &format!("resync on {k} nodes, node {}", i + 1))
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let got: Vec<Vec<u64>> = threads.into_iter().map(|t| t.join().expect("a recovery thread panicked")).collect();
        (t0.elapsed(), got)
    });
    let mut all: Vec<u64> = per_node.concat();
    all.sort_unstable();
    let handed = all.len();
    all.dedup();
    assert_eq!(all.len(), handed, "resync on {k} nodes: a region was handed out twice: {per_node:?}");
    assert!(
        all.iter().copied().eq(0..RESYNC_REGIONS),
        "resync on {k} nodes: the regions handed out are not the log's {RESYNC_REGIONS}: {all:?}"
    );
    for (i, (peer, luid)) in nodes.iter_mut().enumerate() {
        let what = format!("resync on {k} nodes, node {} GET_SYNC_COUNT", i + 1);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = sync_count(peer, uuid, *luid, &what);
            if n == RESYNC_REGIONS {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: {n} of {RESYNC_REGIONS} in sync after 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    (wall, per_node)
}

/// One writers measurement on the core log: each of `writers` (a node's kernel peer and the
/// index of its next fresh region) sends `count` requests, MARK of a fresh region then CLEAR of
/// the same region, with [`DEPTH`] in flight, all writers at once in their own threads (regions
/// distinct per writer). Returns (total requests/s over the wall time of all writers, each
/// writer's requests/s, every latency in ns, sorted).
fn writers_run(writers: &mut [(&mut KernelPeer, u64, &mut u64)], count: usize) -> (f64, Vec<f64>, Vec<u64>) {
    let n = writers.len();
    let start = Barrier::new(n + 1);
    let (wall, got) = std::thread::scope(|sc| {
        let threads: Vec<_> = writers
            .iter_mut()
            .enumerate()
            .map(|(i, (peer, luid, next))| {
                let (start, luid) = (&start, *luid);
                sc.spawn(move || {
                    start.wait();
                    let mut mark_next = true;
                    let mut region = 0;
                    let what = format!("{n} writers, writer {} MARK+CLEAR depth {DEPTH}", i + 1);
                    pipeline(peer, &what, count, || {
                        let req = if mark_next {
                            region = fresh_region(**next);
                            **next += 1;
                            Request::new(T::MarkRegion, CORE_UUID, luid, regions_payload(&[region]))
                        } else {
                            Request::new(T::ClearRegion, CORE_UUID, luid, regions_payload(&[region]))
                        };
                        mark_next = !mark_next;
                        req
                    })
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let got: Vec<(f64, Vec<u64>)> =
            threads.into_iter().map(|t| t.join().expect("a writer thread panicked")).collect();
        (t0.elapsed(), got)
    });
    let rps = (n * count) as f64 / wall.as_secs_f64();
    let per_writer = got.iter().map(|g| g.0).collect();
    let mut lat: Vec<u64> = got.into_iter().flat_map(|g| g.1).collect();
    lat.sort_unstable();
    (rps, per_writer, lat)
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn main() {
    if !common::start_as_root("cluster") {
        return;
    }
    let cfg = config();
    let mut results = Results::new("cluster");
    // The agents: quiet, so their own logging costs nothing measurable.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("RUST_LOG", "warn") };
    let exe = env!("CARGO_BIN_EXE_ulog-agent");
    let started = Instant::now();

    // The clusters first (from the root namespace), then every agent in its namespace.
    let clusters = [
        TestCluster::start(1).expect("1-node corosync cluster"),
        TestCluster::start(3).expect("3-node corosync cluster"),
    ];
    eprintln!("clusters up after {:.1} s", started.elapsed().as_secs_f64());
    let mut setups: Vec<Setup> = Vec::new();
    for (ci, (name, c)) in [("cluster-1", &clusters[0]), ("cluster-3", &clusters[1])].into_iter().enumerate() {
        let mut nodes: Vec<Node> = (0..c.len())
            .map(|i| {
                c.enter(i).expect("enter the node's namespace");
                start_node(exe, LUID_BASE + ((ci as u64 + 1) << 16) + ((i as u64) << 8), true)
            })
            .collect();
        for n in &mut nodes {
            create_logs(n);
        }
        let node = nodes.remove(0);
        setups.push(Setup { name, node, idle: nodes, cluster: Some(ci), fresh: 0, in_sync_i: 0 });
    }
    enter_private_netns().expect("private netns for the single-node agent");
    let mut single = start_node(exe, LUID_BASE, false);
    create_logs(&mut single);
    setups.insert(0, Setup { name: "single", node: single, idle: Vec::new(), cluster: None, fresh: 0, in_sync_i: 0 });
    eprintln!("agents and logs ready after {:.1} s", started.elapsed().as_secs_f64());

    results.push(&[
        ("bench", "cluster".into()),
        ("kind", "meta".into()),
        ("rounds", cfg.rounds.into()),
        ("count", cfg.count.into()),
        ("tput_count", cfg.tput_count.into()),
        ("depth", DEPTH.into()),
        ("regions", REGIONS.into()),
        ("cpus", std::thread::available_parallelism().map_or(0, |n| n.get()).into()),
        ("agent", exe.into()),
    ]);

    let pids: Vec<u32> =
        setups.iter().flat_map(|s| std::iter::once(&s.node).chain(&s.idle)).map(|n| n.agent.pid()).collect();
    // Warm-up, unmeasured: a few of everything on every configuration.
    for s in &mut setups {
        latency_round(s, 20);
        throughput_round(s, 2 * DEPTH);
    }

    // (config, series) -> samples of all rounds; per-round p50/p99.
    let mut samples: BTreeMap<(&'static str, &'static str), Vec<u64>> = BTreeMap::new();
    let mut round_q: BTreeMap<(&'static str, &'static str), Vec<(f64, f64)>> = BTreeMap::new();
    let mut tput: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut tput_lat: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    let n = setups.len();
    for round in 0..cfg.rounds {
        for k in 0..n {
            let settled = settle(&pids);
            let s = &mut setups[(k + round) % n];
            let t0 = Instant::now();
            let got = latency_round(s, cfg.count);
            for (series, mut v) in got {
                v.sort_unstable();
                let (p50, p99) = (us(quantile(&v, 0.5)), us(quantile(&v, 0.99)));
                println!("round {round} {:<9} {series:<31} p50 {p50:>9.1} us  p99 {p99:>9.1} us", s.name);
                results.push(&[
                    ("bench", J::from("cluster")),
                    ("kind", "round".into()),
                    ("round", round.into()),
                    ("config", s.name.into()),
                    ("series", series.into()),
                    ("requests", v.len().into()),
                    ("p50_us", p50.into()),
                    ("p99_us", p99.into()),
                ]);
                round_q.entry((s.name, series)).or_default().push((p50, p99));
                samples.entry((s.name, series)).or_default().extend(v);
            }
            let (rps, lat) = throughput_round(s, cfg.tput_count);
            let (p50, p99) = (us(quantile(&lat, 0.5)), us(quantile(&lat, 0.99)));
            println!(
                "round {round} {:<9} MARK+FLUSH depth {DEPTH}: {rps:>8.0} req/s  p50 {p50:>9.1} us  p99 {p99:>9.1} us ({:.1} s for the round, {:.1} s settling before)",
                s.name,
                t0.elapsed().as_secs_f64(),
                settled.as_secs_f64()
            );
            results.push(&[
                ("bench", J::from("cluster")),
                ("kind", "throughput_round".into()),
                ("round", round.into()),
                ("config", s.name.into()),
                ("requests", lat.len().into()),
                ("rps", rps.into()),
                ("p50_us", p50.into()),
                ("p99_us", p99.into()),
            ]);
            tput.entry(s.name).or_default().push(rps);
            tput_lat.entry(s.name).or_default().extend(lat);
        }
    }

    // Summaries: quantiles over all rounds' samples; ratios against `single`.
    println!();
    println!(
        "{:<9} {:<31} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "config", "request", "p50 us", "p99 us", "p50 x", "p99 x", "p50 x/r"
    );
    let configs: Vec<&'static str> = setups.iter().map(|s| s.name).collect();
    for series in SERIES {
        let q = |c: &str| {
            let mut v = samples[&(configs.iter().copied().find(|x| *x == c).expect("config"), series)].clone();
            v.sort_unstable();
            (us(quantile(&v, 0.5)), us(quantile(&v, 0.99)), v.len())
        };
        let (b50, b99, _) = q("single");
        for &c in &configs {
            let (p50, p99, requests) = q(c);
            let per_round: Vec<f64> =
                round_q[&(c, series)].iter().zip(&round_q[&("single", series)]).map(|(a, b)| a.0 / b.0).collect();
            let per_round99: Vec<f64> =
                round_q[&(c, series)].iter().zip(&round_q[&("single", series)]).map(|(a, b)| a.1 / b.1).collect();
            println!(
                "{c:<9} {series:<31} {p50:>10.1} {p99:>10.1} {:>8.2} {:>8.2} {:>8.2}",
                p50 / b50,
                p99 / b99,
                median(&per_round)
            );
            results.push(&[
                ("bench", J::from("cluster")),
                ("kind", "summary".into()),
                ("config", c.into()),
                ("series", series.into()),
                ("requests", requests.into()),
                ("p50_us", p50.into()),
                ("p99_us", p99.into()),
                ("baseline_p50_us", b50.into()),
                ("baseline_p99_us", b99.into()),
                ("p50_ratio", (p50 / b50).into()),
                ("p99_ratio", (p99 / b99).into()),
                ("p50_ratio_paired", median(&per_round).into()),
                ("p99_ratio_paired", median(&per_round99).into()),
            ]);
        }
    }
    let base_rps = median(&tput["single"]);
    for &c in &configs {
        let mut lat = tput_lat[c].clone();
        lat.sort_unstable();
        let rps = median(&tput[c]);
        let paired: Vec<f64> = tput[c].iter().zip(&tput["single"]).map(|(a, b)| a / b).collect();
        println!(
            "{c:<9} MARK+FLUSH depth {DEPTH}: {rps:.0} req/s (x {:.2}), p50 {:.1} us, p99 {:.1} us",
            rps / base_rps,
            us(quantile(&lat, 0.5)),
            us(quantile(&lat, 0.99))
        );
        results.push(&[
            ("bench", J::from("cluster")),
            ("kind", "throughput_summary".into()),
            ("config", c.into()),
            ("depth", DEPTH.into()),
            ("requests", lat.len().into()),
            ("rps", rps.into()),
            ("baseline_rps", base_rps.into()),
            ("rps_ratio", (rps / base_rps).into()),
            ("rps_ratio_paired", median(&paired).into()),
            ("p50_us", us(quantile(&lat, 0.5)).into()),
            ("p99_us", us(quantile(&lat, 0.99)).into()),
        ]);
    }

    // Resync with 1, 2, 3 nodes: on the 3-node cluster, a fresh log per round and node count,
    // opened by the first k nodes only; node counts rotated per round.
    let s3 = setups.iter_mut().find(|s| s.name == "cluster-3").expect("cluster-3");
    let mut members: Vec<&mut Node> = std::iter::once(&mut s3.node).chain(s3.idle.iter_mut()).collect();
    let mut resync_wall: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut resync_split: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    println!();
    for round in 0..cfg.rounds {
        for j in 0..RESYNC_NODES.len() {
            let k = RESYNC_NODES[(j + round) % RESYNC_NODES.len()];
            let uuid = format!("LVM-ulog-bench-resync-{k}n-r{round}");
            let mut nodes: Vec<(&mut KernelPeer, u64)> = members[..k]
                .iter_mut()
                .enumerate()
                .map(|(i, n)| {
                    (&mut n.peer, LUID_BASE + (0x10 << 16) + ((round as u64) << 8) + ((k as u64) << 4) + i as u64)
                })
                .collect();
            let (wall, per_node) = resync_run(&mut nodes, &uuid, &pids);
            let wall_ms = wall.as_secs_f64() * 1e3;
            let split = per_node.iter().map(|v| v.len().to_string()).collect::<Vec<_>>().join("+");
            println!(
                "round {round} resync {RESYNC_REGIONS} regions on {k} node(s): {wall_ms:>7.1} ms, {:>6.0} regions/s, per node {split}",
                RESYNC_REGIONS as f64 / wall.as_secs_f64()
            );
            results.push(&[
                ("bench", J::from("cluster")),
                ("kind", "resync_round".into()),
                ("round", round.into()),
                ("nodes", k.into()),
                ("regions", RESYNC_REGIONS.into()),
                ("copy_ms", (COPY_TIME.as_secs_f64() * 1e3).into()),
                ("wall_ms", wall_ms.into()),
                ("regions_per_s", (RESYNC_REGIONS as f64 / wall.as_secs_f64()).into()),
                ("per_node", split.clone().into()),
            ]);
            resync_wall.entry(k).or_default().push(wall_ms);
            resync_split.entry(k).or_default().push(split);
        }
    }
    let base_wall = median(&resync_wall[&1]);
    for (&k, walls) in &resync_wall {
        let wall_ms = median(walls);
        let paired: Vec<f64> = resync_wall[&1].iter().zip(walls).map(|(a, b)| a / b).collect();
        // One node copies ceil(regions / k) regions one after the other at best.
        let copy_floor_ms = RESYNC_REGIONS.div_ceil(k as u64) as f64 * COPY_TIME.as_secs_f64() * 1e3;
        println!(
            "resync on {k} node(s): {wall_ms:.1} ms ({:.0} regions/s), x {:.2} the 1-node speed; copy floor {copy_floor_ms:.0} ms; per node {}",
            RESYNC_REGIONS as f64 / wall_ms * 1e3,
            base_wall / wall_ms,
            resync_split[&k].join(", ")
        );
        results.push(&[
            ("bench", J::from("cluster")),
            ("kind", "resync_summary".into()),
            ("nodes", k.into()),
            ("runs", walls.len().into()),
            ("regions", RESYNC_REGIONS.into()),
            ("copy_ms", (COPY_TIME.as_secs_f64() * 1e3).into()),
            ("copy_floor_ms", copy_floor_ms.into()),
            ("wall_ms", wall_ms.into()),
            ("regions_per_s", (RESYNC_REGIONS as f64 / wall_ms * 1e3).into()),
            ("speedup", (base_wall / wall_ms).into()),
            ("speedup_paired", median(&paired).into()),
            ("per_node", resync_split[&k].join(", ").into()),
        ]);
    }

    // One mirror written by 1 vs 2 nodes: the core log of the 3-node cluster (all three in its
    // group), MARK+CLEAR pairs from node 1, or from nodes 1 and 2 at once; rotated per round.
    // Fresh regions per writer from their own part of the permutation (node 1's latency rounds
    // used its start).
    let mut next_fresh: Vec<u64> = vec![1 << 20, (1 << 20) + (1 << 19)];
    let mut writers_rps: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut writers_lat: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    println!();
    for round in 0..cfg.rounds {
        for j in 0..WRITERS.len() {
            let w = WRITERS[(j + round) % WRITERS.len()];
            settle(&pids);
            let mut writers: Vec<(&mut KernelPeer, u64, &mut u64)> = members[..w]
                .iter_mut()
                .zip(next_fresh.iter_mut())
                .map(|(n, next)| (&mut n.peer, n.luid, next))
                .collect();
            let (rps, per_writer, lat) = writers_run(&mut writers, cfg.tput_count);
            let shown = per_writer.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" + ");
            println!(
                "round {round} {w} writer(s) MARK+CLEAR depth {DEPTH}: {rps:>8.0} req/s (per writer {shown}), p50 {:.1} us, p99 {:.1} us",
                us(quantile(&lat, 0.5)),
                us(quantile(&lat, 0.99))
            );
            results.push(&[
                ("bench", J::from("cluster")),
                ("kind", "writers_round".into()),
                ("round", round.into()),
                ("writers", w.into()),
                ("requests", lat.len().into()),
                ("rps", rps.into()),
                ("per_writer_rps", shown.into()),
                ("p50_us", us(quantile(&lat, 0.5)).into()),
                ("p99_us", us(quantile(&lat, 0.99)).into()),
            ]);
            writers_rps.entry(w).or_default().push(rps);
            writers_lat.entry(w).or_default().extend(lat);
        }
    }
    let base_rps = median(&writers_rps[&1]);
    for (&w, all) in &writers_rps {
        let rps = median(all);
        let paired: Vec<f64> = all.iter().zip(&writers_rps[&1]).map(|(a, b)| a / b).collect();
        let mut lat = writers_lat[&w].clone();
        lat.sort_unstable();
        println!(
            "{w} writer(s) MARK+CLEAR depth {DEPTH}: {rps:.0} req/s (x {:.2} one writer), p50 {:.1} us, p99 {:.1} us",
            rps / base_rps,
            us(quantile(&lat, 0.5)),
            us(quantile(&lat, 0.99))
        );
        results.push(&[
            ("bench", J::from("cluster")),
            ("kind", "writers_summary".into()),
            ("writers", w.into()),
            ("depth", DEPTH.into()),
            ("requests", lat.len().into()),
            ("rps", rps.into()),
            ("rps_ratio", (rps / base_rps).into()),
            ("rps_ratio_paired", median(&paired).into()),
            ("p50_us", us(quantile(&lat, 0.5)).into()),
            ("p99_us", us(quantile(&lat, 0.99)).into()),
        ]);
    }
    drop(members);

    // TRY_AGAIN of every cluster agent, read in its namespace.
    let mut try_again: Vec<String> = Vec::new();
    for s in &setups {
        let Some(ci) = s.cluster else { continue };
        for i in 0..clusters[ci].len() {
            clusters[ci].enter(i).expect("enter the node's namespace");
            let v = try_again_count();
            let shown = v.map_or_else(|| "unreadable".to_string(), |v| v.to_string());
            println!("{} node {}: TRY_AGAIN {shown}", s.name, i + 1);
            try_again.push(format!("{} node {}: {shown}", s.name, i + 1));
            results.push(&[
                ("bench", J::from("cluster")),
                ("kind", "try_again".into()),
                ("config", s.name.into()),
                ("node", (i + 1).into()),
                ("count", v.map_or(J::I(-1), J::from)),
            ]);
        }
    }

    results.write();
    // Stop every agent (the restart signal: exit without tearing logs down) while the clusters
    // still run; then the clusters go.
    for s in setups {
        for mut node in std::iter::once(s.node).chain(s.idle) {
            match node.agent.restart_exit(Duration::from_secs(30)) {
                Ok(st) if st.success() => {}
                other => eprintln!("{} agent exit: {other:?}\n{}", s.name, node.agent.output()),
            }
        }
    }
    drop(clusters);
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}
