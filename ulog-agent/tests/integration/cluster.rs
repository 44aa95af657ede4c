//! Cluster logs on a real 3-node corosync: three agents in `--cluster` mode, each in its node's
//! network namespace and driven by a kernel peer as its node's kernel (issue 11, host cluster).
//! Each test names the guarantee and the kernel behaviour it stands for.
//!
//! Every node runs under this one kernel, so every agent has the same boot id; a test plays a
//! rebooted node with the agent's test hook `ULOG_CLUSTER_INCARNATION` (a new boot id).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use ulog_agent::cluster::bus::{BusEvent, BusHandler, Outbound};
use ulog_agent::cluster::corosync::{self, BusConfig};
use ulog_agent::cluster::test_cluster::TestCluster;
use ulog_agent::wire::kernel_peer::AgentOutput;

use crate::common::*;

/// One node: its kernel (the peer, in the node's namespace) and its agent.
struct Node {
    peer: KernelPeer,
    agent: AgentProcess,
    luid: u64,
}

const CUUID: &str = "LVM-ulogclustertest000000000001";
/// 13 regions, every one in sync (`nosync`): IS_CLEAN then shows the marks alone.
const NOSYNC: &str = "100 clustered-core 8 nosync";
/// 100 regions, every one in sync: room for two nodes writing disjoint regions.
const WIDE: &str = "800 clustered-core 8 nosync";
/// Regions of [`WIDE`].
const WIDE_N: u64 = 100;
/// -EPROTO: a refused cluster log.
const EPROTO: i32 = -libc::EPROTO;

/// How an agent is started.
#[derive(Clone, Copy, Default)]
struct AgentOpts {
    /// `ULOG_CLUSTER_INCARNATION`: play a kernel of another boot.
    incarnation: Option<u128>,
    /// Serve the HTTP API (on 127.0.0.1:9477 of the node's namespace, whose `lo` is up).
    http: bool,
}

fn start_agent(cluster: &TestCluster, i: usize, peer: &mut KernelPeer) -> AgentProcess {
    start_agent_with(cluster, i, peer, AgentOpts::default())
}

fn start_agent_with(cluster: &TestCluster, i: usize, peer: &mut KernelPeer, opts: AgentOpts) -> AgentProcess {
    cluster.enter(i).expect("enter the node's namespace");
    let env = opts.incarnation.map(|inc| format!("ULOG_CLUSTER_INCARNATION={inc:032x}"));
    // `env` execs the agent in place: the child's pid stays the agent's.
    let wrapper: Vec<&str> = env.as_deref().map(|e| vec!["env", e]).unwrap_or_default();
    let args: &[&str] = if opts.http { &["--cluster"] } else { &["--cluster", "--no-http"] };
    let mut agent = AgentProcess::spawn_with(&wrapper, agent_bin(), peer.port(), args, AgentOutput::File)
        .unwrap_or_else(|e| panic!("agent {i}: {e}"));
    agent.wait_ready(peer, Duration::from_secs(10)).unwrap_or_else(|e| panic!("agent {i}: {e}"));
    agent
}

/// A 3-node cluster with an agent per node, every node's log constructed and resumed.
fn three_nodes(ctr: &str) -> (TestCluster, Vec<Node>) {
    three_nodes_with(ctr, AgentOpts::default())
}

fn three_nodes_with(ctr: &str, opts: AgentOpts) -> (TestCluster, Vec<Node>) {
    let cluster = TestCluster::start(3).expect("a 3-node corosync cluster");
    let mut nodes = Vec::new();
    for i in 0..3 {
        cluster.enter(i).expect("enter");
        let mut peer = KernelPeer::open().expect("the node's kernel peer");
        peer.set_call_timeout(Duration::from_secs(30));
        let agent = start_agent_with(&cluster, i, &mut peer, opts);
        nodes.push(Node { peer, agent, luid: LUID + i as u64 * 0x1000 });
    }
    for (i, n) in nodes.iter_mut().enumerate() {
        let r = n.peer.call_request(&Request::ctr(CUUID, n.luid, ctr)).expect("CTR");
        assert_eq!(r.error, 0, "CTR on node {i}: {r}");
        let r = n.peer.call(T::Resume, CUUID, n.luid, &[]).expect("RESUME");
        assert_eq!(r.error, 0, "RESUME on node {i} (joins the group, gets the state): {r}");
    }
    (cluster, nodes)
}

fn call(n: &mut Node, t: T, payload: &[u8]) -> Reply {
    n.peer.call(t, CUUID, n.luid, payload).unwrap_or_else(|e| panic!("{}: {e}", t.name()))
}

fn ok(n: &mut Node, t: T, payload: &[u8]) -> Vec<u8> {
    let r = call(n, t, payload);
    assert_eq!(r.error, 0, "{}: {r}", t.name());
    r.payload
}

fn flag(n: &mut Node, t: T, region: u64) -> bool {
    let p = ok(n, t, &region.to_ne_bytes());
    i64::from_ne_bytes(p[..8].try_into().expect("8 bytes")) != 0
}

/// GET_RESYNC_WORK: the region handed out, if any.
fn resync_work(n: &mut Node) -> Option<u64> {
    let p = ok(n, T::GetResyncWork, &[]);
    let has = i64::from_ne_bytes(p[..8].try_into().expect("8 bytes"));
    (has != 0).then(|| u64::from_ne_bytes(p[8..16].try_into().expect("16 bytes")))
}

fn sync_count(n: &mut Node) -> u64 {
    u64::from_ne_bytes(ok(n, T::GetSyncCount, &[])[..8].try_into().expect("8 bytes"))
}

/// IS_CLEAN of regions `0..count` as a string of 0/1.
fn clean_map(n: &mut Node, count: u64) -> String {
    (0..count).map(|r| if flag(n, T::IsClean, r) { '1' } else { '0' }).collect()
}

/// Polls until `cond` holds (state applied on another node arrives with that node's own
/// delivery); fails after 30 s.
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path` of node `i`'s agent's HTTP API, from a thread in that node's namespace; polls
/// until the API answers.
fn http_get(cluster: &TestCluster, i: usize, path: &str) -> String {
    std::thread::scope(|s| {
        s.spawn(|| {
            cluster.enter(i).expect("enter");
            until("the agent's HTTP API answers", || std::net::TcpStream::connect(crate::api::ADDR).is_ok());
            let (status, _, body) = crate::api::Http::new().get(path);
            assert_eq!(status, 200, "GET {path} on node {}: {body}", i + 1);
            body
        })
        .join()
        .expect("HTTP thread")
    })
}

/// The value of the first sample of metric `name` (with any labels) in node `i`'s agent's
/// `/metrics`.
fn metric(cluster: &TestCluster, i: usize, name: &str) -> Option<f64> {
    http_get(cluster, i, "/metrics")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls until every node answers IS_CLEAN of regions `0..count` as `clean` (a 0/1 string) and
/// GET_SYNC_COUNT as `synced`; fails after 30 s with what each node answered and, for agents
/// with the HTTP API, its view of the cluster log.
fn until_all_agree(cluster: &TestCluster, nodes: &mut [Node], count: u64, clean: &str, synced: u64, http: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: Vec<(String, u64)> = nodes.iter_mut().map(|n| (clean_map(n, count), sync_count(n))).collect();
        if seen.iter().all(|(c, y)| c == clean && *y == synced) {
            return;
        }
        if Instant::now() >= deadline {
            let mut report = String::new();
            for (i, (c, y)) in seen.iter().enumerate() {
                report.push_str(&format!("node {}: sync_count {y}, clean {c}\n", i + 1));
                if http {
                    let log = http_get(cluster, i, "/api/v1/logs");
                    report.push_str(&format!("  /api/v1/logs: {log}\n"));
                }
            }
            panic!("the nodes never agreed on clean {clean} and sync_count {synced}:\n{report}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What one node's kernel saw of a flood.
#[derive(Debug, Default)]
struct Flood {
    /// Requests answered (with any error).
    answered: usize,
    /// Answers other than 0, and waits that timed out.
    errors: Vec<String>,
}

/// dm-raid1 under heavy writes: MARK then CLEAR of `regions` round robin, `window` requests in
/// flight at once (the kernel sends from many bios at a time), while `go(sent)` says so (asked
/// before each MARK); every answer is counted in `progress`. Returns once every request sent
/// was answered.
fn flood(
    n: &mut Node,
    regions: &[u64],
    window: usize,
    progress: &AtomicUsize,
    mut go: impl FnMut(usize) -> bool,
) -> Flood {
    let mut f = Flood::default();
    let (mut sent, mut in_flight) = (0usize, 0usize);
    loop {
        // `go` is asked at pair boundaries only: every MARK sent is followed by its CLEAR.
        while in_flight < window && (sent % 2 == 1 || go(sent)) {
            let region = regions[(sent / 2) % regions.len()];
            let t = if sent % 2 == 0 { T::MarkRegion } else { T::ClearRegion };
            n.peer.send(&Request::new(t, CUUID, n.luid, regions_payload(&[region]))).expect("send");
            sent += 1;
            in_flight += 1;
        }
        if in_flight == 0 {
            return f;
        }
        match n.peer.recv_reply(Duration::from_secs(30)) {
            Ok(r) => {
                if r.error != 0 {
                    f.errors.push(format!("{r}"));
                }
            }
            Err(e) => {
                f.errors.push(format!("no answer: {e}"));
                return f;
            }
        }
        in_flight -= 1;
        f.answered += 1;
        progress.fetch_add(1, Ordering::Relaxed);
    }
}

/// Guarantee 1. dm-raid1 on two nodes writes one region: each marks it before its write and
/// clears it after. The region must stay dirty until the last writer cleared it, on every node
/// (IS_CLEAN is what a node's resync and a suspend-time check trust).
#[test]
fn a_region_two_nodes_write_stays_dirty_until_both_cleared_it() {
    let (_cluster, mut nodes) = three_nodes(NOSYNC);
    ok(&mut nodes[0], T::MarkRegion, &regions_payload(&[3]));
    ok(&mut nodes[1], T::MarkRegion, &regions_payload(&[3, 4]));
    until("node 3 sees region 3 dirty", || !flag(&mut nodes[2], T::IsClean, 3));
    ok(&mut nodes[0], T::ClearRegion, &regions_payload(&[3]));
    // Node 3's own MARK is ordered after node 1's CLEAR: once it is answered, node 3 has
    // applied the CLEAR, and region 3 is still node 2's.
    ok(&mut nodes[2], T::MarkRegion, &regions_payload(&[9]));
    assert!(!flag(&mut nodes[2], T::IsClean, 3), "region 3 clean while node 2 still writes it");
    ok(&mut nodes[1], T::ClearRegion, &regions_payload(&[3]));
    ok(&mut nodes[2], T::ClearRegion, &regions_payload(&[9]));
    assert!(flag(&mut nodes[2], T::IsClean, 3), "both writers cleared region 3");
    assert!(!flag(&mut nodes[2], T::IsClean, 4), "region 4 is still node 2's");
    until("node 1 agrees", || flag(&mut nodes[0], T::IsClean, 3) && !flag(&mut nodes[0], T::IsClean, 4));
}

/// Guarantees 2 and 3 (ProcDown). The agent of a node is SIGKILLed after answering a MARK;
/// its kernel lives on and may still be writing the region. The survivors hold the mark (the
/// region is not in sync: it may be torn). The restarted agent (same boot id) is reached by the
/// kernel's reconnect (CTR in the reconnect form, RESUME) and adopts the mark: it is not
/// reclaimed (no survivor is handed it while that kernel still marks it), and since the other
/// kernels wrote it to their default leg only while it read out of sync (dm-raid1's
/// DM_RH_NOSYNC writes), it is recovered after the CLEAR before it reads clean.
#[test]
fn a_mark_survives_sigkill_of_its_agent_and_the_restarted_agent_adopts_it() {
    let (cluster, mut nodes) = three_nodes(NOSYNC);
    ok(&mut nodes[0], T::MarkRegion, &regions_payload(&[5]));
    let st = nodes[0].agent.kill9().expect("SIGKILL");
    assert!(!st.success());
    // Held: out of sync (GET_SYNC_COUNT), but torn, so the kernels are told "in sync" and
    // write it marked to every leg (a NOSYNC answer would be cached in their region hash).
    until("node 2 holds node 1's mark", || sync_count(&mut nodes[1]) == 12);
    assert!(flag(&mut nodes[1], T::InSync, 5), "torn: told in sync");
    assert!(!flag(&mut nodes[2], T::IsClean, 5));
    assert!(flag(&mut nodes[1], T::InSync, 6), "other regions are untouched");

    let n = &mut nodes[0];
    n.agent = start_agent(&cluster, 0, &mut n.peer);
    let r = n.peer.call_request(&Request::ctr_reconnect(CUUID, n.luid, NOSYNC)).expect("reconnect CTR");
    assert_eq!(r.error, 0, "{r}");
    ok(n, T::Resume, &[]);
    // Node 1 serves once its Join is applied; node 2's GET_RESYNC_WORK is ordered after it.
    assert!(!flag(&mut nodes[0], T::IsClean, 5), "adopted, still dirty");
    let work = |n: &mut Node| {
        let p = ok(n, T::GetResyncWork, &[]);
        (u64::from_ne_bytes(p[..8].try_into().unwrap()), u64::from_ne_bytes(p[8..16].try_into().unwrap()))
    };
    assert_eq!(work(&mut nodes[1]).0, 0, "region 5 handed out while node 1's kernel still marks it");
    assert_eq!(sync_count(&mut nodes[1]), 12, "region 5 stays out of sync after the adoption");
    ok(&mut nodes[0], T::ClearRegion, &regions_payload(&[5]));
    until("node 2 is handed region 5 after the CLEAR", || work(&mut nodes[1]) == (1, 5));
    let mut sync = 5u64.to_ne_bytes().to_vec();
    sync.extend_from_slice(&1u64.to_ne_bytes());
    ok(&mut nodes[1], T::SetRegionSync, &sync);
    until("region 5 recovered and clean on node 3", || flag(&mut nodes[2], T::IsClean, 5));
}

/// Guarantee 4. Node 3 is cut off (1 vs 2): it loses quorum, and its MARK is held (the
/// kernel's write waits) instead of being answered from a divergent state; the majority keeps
/// serving. After the heal node 3 fetches the state again and its MARK is answered and seen.
#[test]
fn without_quorum_a_mark_waits_and_is_answered_after_the_heal() {
    let (cluster, mut nodes) = three_nodes(NOSYNC);
    cluster.partition(2).expect("partition");
    cluster.wait_quorate(2, false).expect("node 3 without quorum");
    cluster.wait_quorate(0, true).expect("the majority keeps quorum");
    let luid = nodes[2].luid;
    let seq = nodes[2].peer.send(&Request::new(T::MarkRegion, CUUID, luid, regions_payload(&[7]))).expect("send");
    nodes[2].peer.assert_silent(Duration::from_secs(3)).expect("no answer without quorum");
    ok(&mut nodes[0], T::MarkRegion, &regions_payload(&[8]));
    cluster.heal(2).expect("heal");
    let r = nodes[2].peer.wait_reply(seq, Duration::from_secs(60)).expect("the held MARK is answered after the heal");
    assert_eq!(r.error, 0, "{r}");
    assert!(!flag(&mut nodes[2], T::IsClean, 8), "node 3 got the majority's mark made while it was cut off");
    until("node 1 sees node 3's mark", || !flag(&mut nodes[0], T::IsClean, 7));
}

/// Guarantee 7. dm-raid1 on each node recovers one region at a time (GET_RESYNC_WORK, copy,
/// SET_REGION_SYNC): two nodes never get the same region, and the one recovering elsewhere is
/// reported by IS_REMOTE_RECOVERING.
#[test]
fn resync_is_split_across_nodes() {
    let (_cluster, mut nodes) = three_nodes(CORE);
    let a = ok(&mut nodes[0], T::GetResyncWork, &[]);
    let b = ok(&mut nodes[1], T::GetResyncWork, &[]);
    let region =
        |p: &[u8]| (u64::from_ne_bytes(p[..8].try_into().unwrap()), u64::from_ne_bytes(p[8..16].try_into().unwrap()));
    let (ra, rb) = (region(&a), region(&b));
    assert_eq!((ra.0, rb.0), (1, 1), "both get work");
    assert_ne!(ra.1, rb.1, "the same region handed to two nodes");
    // Node 1 answers IS_REMOTE_RECOVERING from its own copy of the state, which has node 2's
    // GET_RESYNC_WORK once node 1's own delivery of it came (node 2 answered on its delivery).
    until("node 1 sees node 2's region as recovering", || {
        region(&ok(&mut nodes[0], T::IsRemoteRecovering, &rb.1.to_ne_bytes())).0 == 1
    });
    let mut sync = ra.1.to_ne_bytes().to_vec();
    sync.extend_from_slice(&1u64.to_ne_bytes());
    ok(&mut nodes[0], T::SetRegionSync, &sync);
    let n = u64::from_ne_bytes(ok(&mut nodes[0], T::GetSyncCount, &[])[..8].try_into().unwrap());
    assert_eq!(n, 1);
    until("node 3 counts it", || {
        u64::from_ne_bytes(ok(&mut nodes[2], T::GetSyncCount, &[])[..8].try_into().unwrap()) == 1
    });
}

/// Guarantee 3 (NodeDown, then a reboot). Node 1 crashes (its agent and its corosync die at
/// once) after its kernel's MARK of region 9 was answered: its write may have reached one leg
/// only. The survivors hold the mark (region 9 is neither in sync nor clean: dm-raid1 reads it
/// from the default leg only). Node 1 reboots: a new kernel (new boot id) constructs and
/// resumes the log (CTR, RESUME); its `Join` proves the old kernel is gone, so the old marks are
/// reclaimed: region 9 goes out of sync and is the first region a survivor's kernel is handed
/// to recover (before region 0, out of sync and lower), and once recovered it is in sync and
/// clean everywhere.
#[test]
fn a_rebooted_node_reclaims_its_old_marks_and_they_are_resynced_first() {
    let (mut cluster, mut nodes) = three_nodes(CORE);
    // Node 3's kernel writes region 0 while node 2's kernel resynchronises the rest: a region
    // owned by a live writer is not handed out, so after node 3's CLEAR region 0 is the one
    // region left out of sync.
    ok(&mut nodes[2], T::MarkRegion, &regions_payload(&[0]));
    let mut recovered = Vec::new();
    while let Some(r) = resync_work(&mut nodes[1]) {
        assert_ne!(r, 0, "region 0 handed out while node 3 writes it");
        ok(&mut nodes[1], T::SetRegionSync, &set_sync_payload(r, 1));
        recovered.push(r);
    }
    assert_eq!(recovered, (1..N).collect::<Vec<_>>(), "node 2 recovers every region but node 3's");
    ok(&mut nodes[2], T::ClearRegion, &regions_payload(&[0]));

    const R: u64 = 9;
    ok(&mut nodes[0], T::MarkRegion, &regions_payload(&[R]));
    cluster.kill_corosync(0).expect("SIGKILL node 1's corosync");
    assert!(!nodes[0].agent.kill9().expect("SIGKILL node 1's agent").success());
    for (i, n) in nodes.iter_mut().enumerate().skip(1) {
        until(&format!("node {} holds node 1's mark", i + 1), || sync_count(n) == N - 2);
        assert!(!flag(n, T::IsClean, R), "node {}: region {R} clean while held", i + 1);
        assert!(flag(n, T::InSync, R - 1), "node {}: other regions are untouched", i + 1);
    }

    // The reboot: corosync first (as at boot), then an agent of the new kernel, then the new
    // kernel's table (the normal CTR: a new kernel has never seen this agent).
    cluster.start_corosync(0).expect("start node 1's corosync");
    cluster.wait_ready().expect("node 1 back in the membership");
    let n = &mut nodes[0];
    n.agent = start_agent_with(
        &cluster,
        0,
        &mut n.peer,
        AgentOpts { incarnation: Some(0x5eb0_07ed_0000_0000_0000_0000_0000_0001), ..AgentOpts::default() },
    );
    n.luid += 1;
    let r = n.peer.call_request(&Request::ctr(CUUID, n.luid, CORE)).expect("CTR");
    assert_eq!(r.error, 0, "CTR of the rebooted node: {r}");
    ok(n, T::Resume, &[]);
    let out = nodes[0].agent.output_when(|o| o.contains("ULOG_CLUSTER_INCARNATION"), Duration::from_secs(5));
    assert!(out.contains("ULOG_CLUSTER_INCARNATION"), "the agent says its boot id is overridden:\n{out}");
    assert_eq!(sync_count(&mut nodes[1]), N - 2, "reclaimed: out of sync");
    assert!(flag(&mut nodes[1], T::InSync, R), "torn (written by a lost kernel): told in sync");
    assert!(!flag(&mut nodes[1], T::InSync, 0), "region 0 is raw (never copied): told out of sync");
    // Node 1's Join was delivered before its RESUME was answered: node 2's request is ordered
    // after it, so node 2's answer is the reclaimed state's.
    assert_eq!(resync_work(&mut nodes[1]), Some(R), "the reclaimed region is recovered first");
    ok(&mut nodes[1], T::SetRegionSync, &set_sync_payload(R, 1));
    for (i, n) in nodes.iter_mut().enumerate() {
        until(&format!("node {}: region {R} in sync and clean", i + 1), || {
            flag(n, T::InSync, R) && flag(n, T::IsClean, R)
        });
    }
    // Region 0 goes next, and then every node counts every region in sync.
    assert_eq!(resync_work(&mut nodes[2]), Some(0));
    ok(&mut nodes[2], T::SetRegionSync, &set_sync_payload(0, 1));
    for (i, n) in nodes.iter_mut().enumerate() {
        until(&format!("node {} counts every region in sync", i + 1), || sync_count(n) == N);
    }
}

/// Guarantee 4 (losing the local corosync counts as losing quorum). Node 3's corosync is
/// SIGKILLed; its agent stays. A MARK from node 3's kernel is not answered while the agent
/// cannot reach the cluster (the write waits; the log is not failed). Once corosync is back
/// the agent reconnects, re-syncs its state and answers the MARK with 0, and the other nodes
/// see the mark.
#[test]
fn a_mark_waits_while_the_local_corosync_is_down_and_is_answered_after_it_returns() {
    let (mut cluster, mut nodes) = three_nodes(NOSYNC);
    ok(&mut nodes[2], T::MarkRegion, &regions_payload(&[2]));
    cluster.kill_corosync(2).expect("SIGKILL node 3's corosync");
    let luid = nodes[2].luid;
    let seq = nodes[2].peer.send(&Request::new(T::MarkRegion, CUUID, luid, regions_payload(&[7]))).expect("send");
    nodes[2].peer.assert_silent(Duration::from_secs(3)).expect("no answer without the local corosync");
    assert!(nodes[2].agent.try_exited().expect("waitpid").is_none(), "node 3's agent survives losing corosync");
    // The survivors hold node 3's earlier mark meanwhile.
    until("node 1 holds node 3's mark", || sync_count(&mut nodes[0]) == 12);

    cluster.start_corosync(2).expect("start node 3's corosync");
    let r = nodes[2].peer.wait_reply(seq, Duration::from_secs(60)).expect("the MARK is answered once corosync is back");
    assert_eq!(r.error, 0, "{r}");
    assert!(nodes[2].agent.try_exited().expect("waitpid").is_none(), "node 3's agent still runs");
    for (i, n) in nodes.iter_mut().enumerate().take(2) {
        until(&format!("node {} sees node 3's new mark", i + 1), || !flag(n, T::IsClean, 7));
        // Held while node 3 was away, so out of sync (the others' kernels wrote it to their
        // default leg only): recovered after node 3's CLEAR, never while node 3 still marks it.
        assert!(sync_count(n) == 12 && !flag(n, T::IsClean, 2), "node {}: region 2 trusted too early", i + 1);
    }
    let work = |n: &mut Node| {
        let p = ok(n, T::GetResyncWork, &[]);
        (u64::from_ne_bytes(p[..8].try_into().unwrap()), u64::from_ne_bytes(p[8..16].try_into().unwrap()))
    };
    assert_eq!(work(&mut nodes[0]).0, 0, "region 2 handed out while node 3's kernel still marks it");
    ok(&mut nodes[2], T::ClearRegion, &regions_payload(&[2, 7]));
    until("node 1 is handed region 2 after the CLEAR", || work(&mut nodes[0]) == (1, 2));
    let mut sync = 2u64.to_ne_bytes().to_vec();
    sync.extend_from_slice(&1u64.to_ne_bytes());
    ok(&mut nodes[0], T::SetRegionSync, &sync);
    until("node 1 sees both clean", || flag(&mut nodes[0], T::IsClean, 2) && flag(&mut nodes[0], T::IsClean, 7));
}

/// Guarantee 5. Two nodes' kernels write hard at once (disjoint regions, 32 requests in
/// flight each, 2000 requests each): corosync's flow control (TRY_AGAIN) and the agent's
/// batching stay inside the agents. Every request is answered 0 (no kernel error: dm-raid1
/// would fail the log on one), and once the writes are done every region is clean on every
/// node. The TRY_AGAIN counts are printed (how many depends on the machine).
#[test]
fn a_flood_from_two_nodes_gets_no_kernel_error() {
    let (cluster, mut nodes) = three_nodes_with(WIDE, AgentOpts { http: true, ..AgentOpts::default() });
    const REQUESTS: usize = 2000;
    let (a, rest) = nodes.split_at_mut(1);
    let progress = [AtomicUsize::new(0), AtomicUsize::new(0)];
    let first: Vec<u64> = (0..WIDE_N / 2).collect();
    let second: Vec<u64> = (WIDE_N / 2..WIDE_N).collect();
    let (fa, fb) = std::thread::scope(|s| {
        let ta = s.spawn(|| flood(&mut a[0], &first, 32, &progress[0], |sent| sent < REQUESTS));
        let tb = s.spawn(|| flood(&mut rest[0], &second, 32, &progress[1], |sent| sent < REQUESTS));
        (ta.join().expect("node 1's kernel"), tb.join().expect("node 2's kernel"))
    });
    assert_eq!((fa.errors.as_slice(), fa.answered), (&[][..], REQUESTS), "node 1's kernel");
    assert_eq!((fb.errors.as_slice(), fb.answered), (&[][..], REQUESTS), "node 2's kernel");
    until_all_agree(&cluster, &mut nodes, WIDE_N, &"1".repeat(WIDE_N as usize), WIDE_N, true);
    for i in 0..3 {
        let try_again = metric(&cluster, i, "ulog_cluster_bus_try_again_total");
        let refused = metric(&cluster, i, "ulog_cluster_log_refused");
        eprintln!("node {}: ulog_cluster_bus_try_again_total {try_again:?}", i + 1);
        assert_eq!(refused, Some(0.0), "node {}: the log is served", i + 1);
    }
}

/// Guarantee 6. Nodes 1 and 2 keep writing (MARK/CLEAR, 16 in flight each) while node 3's
/// agent is SIGKILLed and restarted, and node 3's kernel reconnects (CTR in the reconnect form,
/// RESUME): the restarted agent gets the state cut at one point of the ordered history under
/// load. Every request of nodes 1 and 2 is answered 0, and once the writes stop the three
/// nodes agree (IS_CLEAN of every region, GET_SYNC_COUNT).
#[test]
fn rejoin_under_load_loses_nothing_and_the_nodes_agree() {
    let http = AgentOpts { http: true, ..AgentOpts::default() };
    let (cluster, mut nodes) = three_nodes_with(WIDE, http);
    let (ab, c) = nodes.split_at_mut(2);
    let (a, b) = ab.split_at_mut(1);
    let progress = [AtomicUsize::new(0), AtomicUsize::new(0)];
    let stop = AtomicBool::new(false);
    let first: Vec<u64> = (0..WIDE_N / 2).collect();
    let second: Vec<u64> = (WIDE_N / 2..WIDE_N).collect();
    let go = |_| !stop.load(Ordering::Relaxed);
    let (fa, fb) = std::thread::scope(|s| {
        let ta = s.spawn(|| flood(&mut a[0], &first, 16, &progress[0], go));
        let tb = s.spawn(|| flood(&mut b[0], &second, 16, &progress[1], go));
        let answered = || [progress[0].load(Ordering::Relaxed), progress[1].load(Ordering::Relaxed)];
        until("traffic on nodes 1 and 2", || answered().iter().all(|&n| n >= 200));

        let n = &mut c[0];
        assert!(!n.agent.kill9().expect("SIGKILL node 3's agent").success());
        n.agent = start_agent_with(&cluster, 2, &mut n.peer, http);
        let r = n.peer.call_request(&Request::ctr_reconnect(CUUID, n.luid, WIDE)).expect("reconnect CTR");
        assert_eq!(r.error, 0, "{r}");
        ok(n, T::Resume, &[]);
        let at_rejoin = answered();
        until("traffic goes on after the rejoin", || {
            let now = answered();
            now[0] >= at_rejoin[0] + 200 && now[1] >= at_rejoin[1] + 200
        });
        stop.store(true, Ordering::Relaxed);
        (ta.join().expect("node 1's kernel"), tb.join().expect("node 2's kernel"))
    });
    assert!(fa.errors.is_empty(), "node 1's kernel got errors: {:?}", fa.errors);
    assert!(fb.errors.is_empty(), "node 2's kernel got errors: {:?}", fb.errors);
    eprintln!("requests answered: node 1 {}, node 2 {}", fa.answered, fb.answered);
    until_all_agree(&cluster, &mut nodes, WIDE_N, &"1".repeat(WIDE_N as usize), WIDE_N, true);
    // And the restarted agent serves: its kernel's mark reaches the others.
    ok(&mut nodes[2], T::MarkRegion, &regions_payload(&[3]));
    until("node 1 sees node 3's mark", || !flag(&mut nodes[0], T::IsClean, 3));
}

/// A stand-in for cmirrord: joins a group and multicasts what it is told.
struct FakeCmirrord {
    group: Vec<u8>,
    events: Sender<BusEvent>,
}

enum FakeCmd {
    Join,
    Send(Vec<u8>),
}

impl BusHandler for FakeCmirrord {
    type Command = FakeCmd;

    fn on_command(&mut self, cmd: FakeCmd, out: &mut dyn Outbound) {
        match cmd {
            FakeCmd::Join => out.join(&self.group),
            FakeCmd::Send(m) => out.send(&self.group, m),
        }
    }

    fn on_event(&mut self, ev: BusEvent, _out: &mut dyn Outbound) {
        let _ = self.events.send(ev);
    }
}

fn next_event(events: &Receiver<BusEvent>, what: &str, mut pick: impl FnMut(&BusEvent) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(ev) if pick(&ev) => return,
            Ok(_) => {}
            Err(e) => panic!("no {what}: {e}"),
        }
    }
}

/// Guarantee 10. cmirrord runs on node 2 for the same mirror: it joins the log's CPG group (the
/// uuid and its NUL, as cmirrord names it) and multicasts one of its requests (184 bytes, two
/// little-endian u64 protocol versions 5 first). Serving the mirror from both would corrupt it,
/// so every agent refuses the log: the kernels' next MARK fails with -EPROTO (dm-raid1 fails
/// the log and says so, rather than writing with two log servers), and the refusal shows in
/// the metrics.
#[test]
fn cmirrord_on_the_group_makes_every_agent_refuse_the_log() {
    let (cluster, mut nodes) = three_nodes_with(NOSYNC, AgentOpts { http: true, ..AgentOpts::default() });
    ok(&mut nodes[0], T::MarkRegion, &regions_payload(&[1]));
    let mut group = CUUID.as_bytes().to_vec();
    group.push(0);
    let (tx, events) = mpsc::channel();
    let (bus, thread) = std::thread::scope(|s| {
        s.spawn(|| {
            cluster.enter(1).expect("enter node 2's namespace");
            let cfg = BusConfig { thread_name: "fake-cmirrord".to_string(), ..BusConfig::default() };
            corosync::spawn(FakeCmirrord { group: group.clone(), events: tx }, cfg).expect("spawn the transport")
        })
        .join()
        .expect("spawning thread")
    });
    let mut me = None;
    next_event(&events, "connection to node 2's corosync", |ev| match ev {
        BusEvent::Connected { node, pid, .. } => {
            me = Some((*node, *pid));
            true
        }
        _ => false,
    });
    let (node, pid) = me.expect("connected");
    bus.command(FakeCmd::Join).expect("join");
    next_event(&events, "the fake cmirrord in the group", |ev| {
        matches!(ev, BusEvent::Membership { group: g, members, .. }
            if *g == group && members.iter().any(|m| m.node == node && m.pid == pid))
    });
    let mut request = vec![0u8; 184];
    request[..8].copy_from_slice(&5u64.to_le_bytes());
    request[8..16].copy_from_slice(&5u64.to_le_bytes());
    bus.command(FakeCmd::Send(request)).expect("send");
    next_event(
        &events,
        "the cmirrord request delivered",
        |ev| matches!(ev, BusEvent::Delivered { from, data, .. } if from.node == node && from.pid == pid && data.len() == 184),
    );
    for (i, n) in nodes.iter_mut().enumerate() {
        until(&format!("node {} refuses the log", i + 1), || {
            call(n, T::MarkRegion, &regions_payload(&[4])).error == EPROTO
        });
        let r = call(n, T::ClearRegion, &regions_payload(&[1]));
        assert_eq!(r.error, EPROTO, "node {}: a refused log changes nothing: {r}", i + 1);
        assert_eq!(metric(&cluster, i, "ulog_cluster_log_refused"), Some(1.0), "node {}", i + 1);
        assert_eq!(metric(&cluster, i, "ulog_cluster_cmirrord_refusals_total"), Some(1.0), "node {}", i + 1);
        let out = n.agent.output();
        assert!(out.contains("cmirrord serves this mirror too"), "node {}: the agent says why:\n{out}", i + 1);
    }
    bus.shutdown();
    thread.join().expect("the fake cmirrord's transport");
}

/// The test hook that plays a rebooted kernel takes 32 hexadecimal digits; anything else stops
/// the agent at start with a message naming it (a typo must not silently mean "same kernel").
#[test]
fn an_invalid_incarnation_override_stops_the_agent_at_start() {
    enter_private_netns().expect("a private namespace");
    let peer = KernelPeer::open().expect("peer");
    let mut agent = AgentProcess::spawn_with(
        &["env", "ULOG_CLUSTER_INCARNATION=not-a-boot-id"],
        agent_bin(),
        peer.port(),
        ["--cluster", "--no-http"],
        AgentOutput::File,
    )
    .expect("spawn");
    let st = agent.wait_exit(Duration::from_secs(10)).expect("the agent exits");
    assert!(!st.success(), "{st}");
    let out = agent.output_when(|o| o.contains("ULOG_CLUSTER_INCARNATION"), Duration::from_secs(5));
    assert!(
        out.contains("ULOG_CLUSTER_INCARNATION=\"not-a-boot-id\"") && out.contains("32 hexadecimal digits"),
        "{out}"
    );
}

/// Guarantee 3, the operator's path. Node 1 crashes (agent and corosync SIGKILLed) and stays
/// down: its marked region is held on the survivors, not in sync and never handed out, until an
/// operator on a survivor runs `ulog-agent cluster confirm-fenced --node 1` (what the runbook
/// of `UlogClusterNodeLostWithRegions` says to do once the node is known dead). Then the
/// region is reclaimed out of sync and recovered first; the held node is gone from the status.
#[test]
fn confirm_fenced_reclaims_a_dead_nodes_regions() {
    let http = AgentOpts { http: true, ..AgentOpts::default() };
    let (mut cluster, mut nodes) = three_nodes_with(NOSYNC, http);
    const R: u64 = 6;
    ok(&mut nodes[0], T::MarkRegion, &regions_payload(&[R]));
    cluster.kill_corosync(0).expect("SIGKILL node 1's corosync");
    assert!(!nodes[0].agent.kill9().expect("SIGKILL node 1's agent").success());
    until("node 2 holds node 1's mark", || sync_count(&mut nodes[1]) == 12);
    assert_eq!(resync_work(&mut nodes[1]), None, "a held region is never handed out");
    let status = http_get(&cluster, 1, "/api/v1/logs");
    assert!(status.contains("\"live\":false"), "the API shows node 1 held: {status}");

    // The operator, on node 2 (the command talks to the agent of its own namespace).
    cluster.enter(1).expect("enter node 2's namespace");
    let out = std::process::Command::new(agent_bin())
        .args(["cluster", "confirm-fenced", "--node", "1"])
        .output()
        .expect("run ulog-agent cluster confirm-fenced");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "confirm-fenced: {}{}", text, String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("node 1") && text.contains("confirmed dead"), "{text}");

    until("node 3 sees the region reclaimed (out of sync, no longer held)", || {
        !http_get(&cluster, 2, "/api/v1/logs").contains("\"live\":false")
    });
    assert_eq!(sync_count(&mut nodes[2]), 12, "reclaimed regions are out of sync");
    assert_eq!(resync_work(&mut nodes[2]), Some(R), "and recovered first");
    ok(&mut nodes[2], T::SetRegionSync, &set_sync_payload(R, 1));
    for (i, n) in nodes.iter_mut().enumerate().skip(1) {
        until(&format!("node {}: region {R} in sync and clean", i + 1), || {
            flag(n, T::InSync, R) && flag(n, T::IsClean, R)
        });
    }
    // A second confirmation finds nothing to reclaim and says so.
    let out =
        std::process::Command::new(agent_bin()).args(["cluster", "confirm-fenced", "--node", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cluster log holds a departed node 1"));
}

/// Guarantee 8 on real corosync. Three nodes share one `clustered-disk` log device (a file
/// every node opens, standing for the shared LUN). dm-raid1 writes a region once its MARK is
/// answered, and after a crash of every node the log device is all that tells which regions
/// to resync: so a MARK answered on any node is on the device at that moment. One node (the
/// lowest) writes the device; when it goes down it may only be cut off and still writing, so
/// MARKs wait until it is confirmed dead; then the next node takes over with a whole image.
#[test]
fn a_disk_log_is_written_by_one_node_and_an_answered_mark_is_on_the_device() {
    let device = std::env::temp_dir().join(format!("ulog-shared-log-{}", std::process::id()));
    std::fs::write(&device, vec![0u8; 4096]).expect("the shared log device");
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(device.clone());
    let ctr = format!("100 clustered-disk {} 8 nosync", device.display());
    let clean_on_device = |r: u64| {
        let image = std::fs::read(&device).expect("read the device");
        image[1024 + (r / 8) as usize] & (1 << (r % 8)) != 0
    };
    let http = AgentOpts { http: true, ..AgentOpts::default() };
    let (mut cluster, mut nodes) = three_nodes_with(&ctr, http);
    until("the first image is on the device", || {
        let image = std::fs::read(&device).expect("read the device");
        image[..4] == 0x4D69_5272u32.to_le_bytes() && clean_on_device(5)
    });
    ok(&mut nodes[1], T::MarkRegion, &regions_payload(&[5]));
    assert!(!clean_on_device(5), "MARK answered before the device says dirty");
    ok(&mut nodes[2], T::Flush, &regions_payload(&[9]));
    assert!(!clean_on_device(9), "FLUSH with a mark answered before the device says dirty");
    let writes = |cluster: &TestCluster, i| metric(cluster, i, "ulog_cluster_disk_image_writes_total").unwrap_or(0.0);
    assert!(writes(&cluster, 0) > 0.0, "node 1 (the lowest) writes the device");
    assert_eq!((writes(&cluster, 1), writes(&cluster, 2)), (0.0, 0.0), "one writer");
    let status = http_get(&cluster, 2, "/api/v1/logs");
    assert!(status.contains("\"disk_writer\":1"), "the API names the disk writer: {status}");

    // The writer's node goes down.
    cluster.kill_corosync(0).expect("SIGKILL node 1's corosync");
    assert!(!nodes[0].agent.kill9().expect("SIGKILL node 1's agent").success());
    until("node 2 holds node 1", || http_get(&cluster, 1, "/api/v1/logs").contains("\"live\":false"));
    let luid = nodes[1].luid;
    let seq = nodes[1].peer.send(&Request::new(T::MarkRegion, CUUID, luid, regions_payload(&[6]))).expect("send");
    nodes[1].peer.assert_silent(Duration::from_secs(3)).expect("no answer while the old writer may write the device");
    assert!(clean_on_device(6));
    assert!(
        metric(&cluster, 1, "ulog_cluster_held_requests").unwrap_or(0.0) >= 1.0,
        "the waiting MARK shows as held (UlogClusterRequestsHeld)"
    );

    cluster.enter(2).expect("enter node 3's namespace");
    let out = std::process::Command::new(agent_bin())
        .args(["cluster", "confirm-fenced", "--node", "1"])
        .output()
        .expect("run ulog-agent cluster confirm-fenced");
    assert!(out.status.success(), "confirm-fenced: {}", String::from_utf8_lossy(&out.stderr));
    let r = nodes[1].peer.wait_reply(seq, Duration::from_secs(30)).expect("the MARK is answered by the new writer");
    assert_eq!(r.error, 0, "{r}");
    assert!(
        !clean_on_device(6) && !clean_on_device(5) && !clean_on_device(9),
        "the new writer's image holds every mark"
    );
    assert!(writes(&cluster, 1) > 0.0, "node 2 took over");
    assert!(http_get(&cluster, 2, "/api/v1/logs").contains("\"disk_writer\":2"));
    assert_eq!(writes(&cluster, 2), 0.0, "still one writer");
}

/// Guarantee 1 across a table reload. `dmsetup reload` constructs a second log of the uuid on
/// the node (CTR, new luid) while the live table keeps writing until it is suspended, and a
/// reload may be abandoned (the new table's DTR, the old one stays live). Both tables read one
/// current state: the live table must see another node's marks after the reload's CTR, and
/// after an abandoned reload, or it would call a region clean that node still writes.
#[test]
fn a_table_reload_and_an_abandoned_one_keep_the_live_tables_answers_current() {
    let (_cluster, mut nodes) = three_nodes(NOSYNC);
    let reload_luid = nodes[0].luid + 1;
    let r = nodes[0].peer.call_request(&Request::ctr(CUUID, reload_luid, NOSYNC)).expect("the reload's CTR");
    assert_eq!(r.error, 0, "{r}");
    ok(&mut nodes[1], T::MarkRegion, &regions_payload(&[3]));
    until("the live table sees node 2's mark after the reload's CTR", || !flag(&mut nodes[0], T::IsClean, 3));
    let r = nodes[0].peer.call(T::Dtr, CUUID, reload_luid, &[]).expect("the abandoned reload's DTR");
    assert_eq!(r.error, 0, "{r}");
    ok(&mut nodes[1], T::MarkRegion, &regions_payload(&[4]));
    until("the live table sees node 2's mark after the abandoned reload", || !flag(&mut nodes[0], T::IsClean, 4));
    ok(&mut nodes[1], T::ClearRegion, &regions_payload(&[3, 4]));
    until("and its clear", || flag(&mut nodes[0], T::IsClean, 3) && flag(&mut nodes[0], T::IsClean, 4));
}
