//! Cluster logs on a real 3-node corosync: three agents in `--cluster` mode, each in its node's
//! network namespace and driven by a kernel peer as its node's kernel (issue 11, host cluster).
//! Each test names the guarantee and the kernel behaviour it stands for.

use std::time::{Duration, Instant};

use ulog_agent::cluster::test_cluster::TestCluster;

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

fn start_agent(cluster: &TestCluster, i: usize, peer: &mut KernelPeer) -> AgentProcess {
    cluster.enter(i).expect("enter the node's namespace");
    AgentProcess::spawn_ready(agent_bin(), peer, ["--cluster", "--no-http"])
        .unwrap_or_else(|e| panic!("agent {i}: {e}"))
}

/// A 3-node cluster with an agent per node, every node's log constructed and resumed.
fn three_nodes(ctr: &str) -> (TestCluster, Vec<Node>) {
    let cluster = TestCluster::start(3).expect("a 3-node corosync cluster");
    let mut nodes = Vec::new();
    for i in 0..3 {
        cluster.enter(i).expect("enter");
        let mut peer = KernelPeer::open().expect("the node's kernel peer");
        peer.set_call_timeout(Duration::from_secs(30));
        let agent = start_agent(&cluster, i, &mut peer);
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

/// Polls until `cond` holds (state applied on another node arrives with that node's own
/// delivery); fails after 30 s.
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(50));
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
/// kernel's reconnect (CTR in the reconnect form, RESUME) and adopts the mark.
#[test]
fn a_mark_survives_sigkill_of_its_agent_and_the_restarted_agent_adopts_it() {
    let (cluster, mut nodes) = three_nodes(NOSYNC);
    ok(&mut nodes[0], T::MarkRegion, &regions_payload(&[5]));
    let st = nodes[0].agent.kill9().expect("SIGKILL");
    assert!(!st.success());
    until("node 2 holds node 1's mark", || !flag(&mut nodes[1], T::InSync, 5));
    assert!(!flag(&mut nodes[2], T::IsClean, 5));
    assert!(flag(&mut nodes[1], T::InSync, 6), "other regions are untouched");

    let n = &mut nodes[0];
    n.agent = start_agent(&cluster, 0, &mut n.peer);
    let r = n.peer.call_request(&Request::ctr_reconnect(CUUID, n.luid, NOSYNC)).expect("reconnect CTR");
    assert_eq!(r.error, 0, "{r}");
    ok(n, T::Resume, &[]);
    until("node 2 sees the mark adopted", || flag(&mut nodes[1], T::InSync, 5));
    assert!(!flag(&mut nodes[1], T::IsClean, 5), "adopted, still dirty");
    ok(&mut nodes[0], T::ClearRegion, &regions_payload(&[5]));
    until("the CLEAR of the restarted agent reaches node 3", || flag(&mut nodes[2], T::IsClean, 5));
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
    let p = ok(&mut nodes[0], T::IsRemoteRecovering, &rb.1.to_ne_bytes());
    assert_eq!(region(&p).0, 1, "node 1 sees node 2's region as recovering");
    let mut sync = ra.1.to_ne_bytes().to_vec();
    sync.extend_from_slice(&1u64.to_ne_bytes());
    ok(&mut nodes[0], T::SetRegionSync, &sync);
    let n = u64::from_ne_bytes(ok(&mut nodes[0], T::GetSyncCount, &[])[..8].try_into().unwrap());
    assert_eq!(n, 1);
    until("node 3 counts it", || {
        u64::from_ne_bytes(ok(&mut nodes[2], T::GetSyncCount, &[])[..8].try_into().unwrap()) == 1
    });
}
