//! The engine over a deterministic in-memory bus that keeps CPG's rules: one agreed order per
//! group, a membership change delivered in that order to the members after it, a crashed
//! member's undelivered messages delivered to all survivors or to none. Each test names the
//! guarantee (issue 11) and the kernel behaviour it stands for.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::*;
use crate::cluster::bus::LeaveReason;
use ulog_common::DmUlogRequest;

type Answers = Arc<Mutex<Vec<(u32, i32, Vec<u8>)>>>;

struct Collect(Answers);

impl Replies for Collect {
    fn answer(&self, p: &PendingReply, error: i32, payload: &[u8]) {
        self.0.lock().unwrap().push((p.header.seq, error, payload.to_vec()));
    }
}

#[derive(Default)]
struct Ops {
    ops: Vec<Op>,
    max_atomic: usize,
}

enum Op {
    Join(Vec<u8>),
    Leave(Vec<u8>),
    Send(Vec<u8>, Vec<u8>),
}

impl Outbound for Ops {
    fn join(&mut self, g: &[u8]) {
        self.ops.push(Op::Join(g.to_vec()));
    }
    fn leave(&mut self, g: &[u8]) {
        self.ops.push(Op::Leave(g.to_vec()));
    }
    fn send(&mut self, g: &[u8], data: Vec<u8>) {
        self.ops.push(Op::Send(g.to_vec(), data));
    }
    fn max_atomic(&self) -> usize {
        self.max_atomic
    }
}

enum Ev {
    Deliver { group: Vec<u8>, from: Member, data: Vec<u8> },
    Change { group: Vec<u8>, members: Vec<Member>, left: Vec<(Member, LeaveReason)>, joined: Vec<Member> },
}

struct Node {
    engine: Engine<Collect>,
    answers: Answers,
    member: Member,
    view: Arc<ClusterView>,
}

const G: &[u8] = b"LVM-simulated\0";

struct Sim {
    nodes: BTreeMap<NodeId, Node>,
    queue: VecDeque<Ev>,
    /// Membership as of the changes queued so far.
    queued_members: Vec<Member>,
    /// Membership as of the changes delivered so far.
    members: Vec<Member>,
    quorate: BTreeMap<NodeId, bool>,
    next_seq: u32,
    shape: LogShape,
    max_atomic: usize,
}

impl Sim {
    fn new(shape: LogShape) -> Self {
        Self {
            nodes: BTreeMap::new(),
            queue: VecDeque::new(),
            queued_members: Vec::new(),
            members: Vec::new(),
            quorate: BTreeMap::new(),
            next_seq: 1,
            shape,
            max_atomic: 1 << 20,
        }
    }

    /// Starts an agent on `node` (pid `pid`), connected, quorate, with the log opened.
    fn start(&mut self, node: NodeId, pid: u32) {
        let answers: Answers = Arc::default();
        let mut engine = Engine::new(Collect(Arc::clone(&answers)), u128::from(node) << 64 | 0xb007);
        let member = Member { node, pid };
        let view = Arc::new(ClusterView::default());
        let mut ops = Ops { ops: Vec::new(), max_atomic: self.max_atomic };
        engine.on_event(BusEvent::Connected { node, pid, max_atomic: self.max_atomic }, &mut ops);
        engine.on_event(BusEvent::Quorum { quorate: true }, &mut ops);
        engine.on_command(Command::Open { group: G.to_vec(), shape: self.shape, view: Arc::clone(&view) }, &mut ops);
        self.quorate.insert(node, true);
        self.nodes.insert(node, Node { engine, answers, member, view });
        self.carry_out(node, ops);
    }

    fn pending(&mut self, t: RequestType) -> PendingReply {
        let mut header = DmUlogRequest::zeroed();
        header.seq = self.next_seq;
        header.request_type = t as u32;
        self.next_seq += 1;
        PendingReply { port: 0, own_port: 0, header, cn_seq: 0, received_ns: 0, flight_id: 0 }
    }

    /// Sends a kernel request to `node`'s engine; returns the request's seq.
    fn request(&mut self, node: NodeId, t: RequestType, change: Option<Change>) -> u32 {
        let pending = self.pending(t);
        let group = G.to_vec();
        let cmd = match (t, change) {
            (RequestType::Resume, _) => Command::Resume { group, pending },
            (RequestType::Postsuspend, _) => Command::Suspend { group, pending },
            (RequestType::Flush, None) => Command::Flush { group, pending },
            (_, Some(change)) => Command::Change { group, change, pending },
            (t, None) => panic!("no change for {t:?}"),
        };
        self.command(node, cmd);
        pending.header.seq
    }

    fn command(&mut self, node: NodeId, cmd: Command) {
        let mut ops = Ops { ops: Vec::new(), max_atomic: self.max_atomic };
        let n = self.nodes.get_mut(&node).expect("node");
        n.engine.on_command(cmd, &mut ops);
        n.engine.on_idle(&mut ops);
        self.carry_out(node, ops);
    }

    fn carry_out(&mut self, node: NodeId, ops: Ops) {
        let Some(member) = self.nodes.get(&node).map(|n| n.member) else { return };
        for op in ops.ops {
            match op {
                Op::Join(g) => {
                    if !self.queued_members.contains(&member) {
                        self.queued_members.push(member);
                        self.queued_members.sort();
                        self.queue.push_back(Ev::Change {
                            group: g,
                            members: self.queued_members.clone(),
                            left: vec![],
                            joined: vec![member],
                        });
                    }
                }
                Op::Leave(g) => {
                    if self.queued_members.contains(&member) {
                        self.queued_members.retain(|m| *m != member);
                        self.queue.push_back(Ev::Change {
                            group: g,
                            members: self.queued_members.clone(),
                            left: vec![(member, LeaveReason::Leave)],
                            joined: vec![],
                        });
                    }
                }
                Op::Send(g, data) => self.queue.push_back(Ev::Deliver { group: g, from: member, data }),
            }
        }
    }

    /// Delivers one queued event; false when the queue is empty.
    fn step(&mut self) -> bool {
        let Some(ev) = self.queue.pop_front() else { return false };
        let recipients: Vec<NodeId> = match &ev {
            Ev::Deliver { from, .. } => {
                if !self.members.contains(from) {
                    return true; // not joined (or gone): CPG drops it
                }
                self.members.iter().map(|m| m.node).collect()
            }
            Ev::Change { members, .. } => {
                self.members = members.clone();
                members.iter().map(|m| m.node).collect()
            }
        };
        for node in recipients {
            let mut ops = Ops { ops: Vec::new(), max_atomic: self.max_atomic };
            let Some(n) = self.nodes.get_mut(&node) else { continue };
            let bus_ev = match &ev {
                Ev::Deliver { group, from, data } => {
                    BusEvent::Delivered { group: group.clone(), from: *from, data: data.clone() }
                }
                Ev::Change { group, members, left, joined } => BusEvent::Membership {
                    group: group.clone(),
                    members: members.clone(),
                    left: left.clone(),
                    joined: joined.clone(),
                },
            };
            n.engine.on_event(bus_ev, &mut ops);
            n.engine.on_idle(&mut ops);
            self.carry_out(node, ops);
        }
        true
    }

    fn run(&mut self) {
        let mut n = 0;
        while self.step() {
            n += 1;
            assert!(n < 1_000_000, "the simulation does not settle");
        }
    }

    /// SIGKILL of `node`'s agent (ProcDown) or of the whole node (NodeDown): its queued
    /// messages not yet delivered reach nobody when `lose_tail`.
    fn crash(&mut self, node: NodeId, reason: LeaveReason, lose_tail: bool) {
        let Some(n) = self.nodes.remove(&node) else { return };
        if lose_tail {
            self.queue.retain(|e| !matches!(e, Ev::Deliver { from, .. } if *from == n.member));
        }
        self.queued_members.retain(|m| *m != n.member);
        self.queue.push_back(Ev::Change {
            group: G.to_vec(),
            members: self.queued_members.clone(),
            left: vec![(n.member, reason)],
            joined: vec![],
        });
    }

    fn set_quorate(&mut self, node: NodeId, quorate: bool) {
        self.quorate.insert(node, quorate);
        let mut ops = Ops { ops: Vec::new(), max_atomic: self.max_atomic };
        let n = self.nodes.get_mut(&node).expect("node");
        n.engine.on_event(BusEvent::Quorum { quorate }, &mut ops);
        n.engine.on_idle(&mut ops);
        self.carry_out(node, ops);
    }

    fn answer(&self, node: NodeId, seq: u32) -> Option<(i32, Vec<u8>)> {
        self.nodes[&node].answers.lock().unwrap().iter().find(|a| a.0 == seq).map(|a| (a.1, a.2.clone()))
    }

    fn view(&self, node: NodeId) -> &ClusterView {
        &self.nodes[&node].view
    }

    /// Every member that holds the state holds the same (guarantee 1: same ordered history,
    /// same answers).
    fn assert_same_state(&self) -> u64 {
        let digests: Vec<(NodeId, u64)> =
            self.nodes.iter().filter_map(|(&n, node)| node.view.snapshot().map(|l| (n, l.digest()))).collect();
        assert!(!digests.is_empty(), "nobody holds the state");
        assert!(digests.iter().all(|d| d.1 == digests[0].1), "members diverged: {digests:?}");
        digests[0].1
    }

    fn resume_all(&mut self, nodes: &[NodeId]) {
        for &n in nodes {
            let s = self.request(n, RequestType::Resume, None);
            self.run();
            assert_eq!(self.answer(n, s), Some((0, vec![])), "RESUME of node {n}");
        }
    }
}

use ulog_common::RequestType;

fn mark(r: &[u64]) -> Option<Change> {
    Some(Change::Mark(r.to_vec()))
}
fn clear(r: &[u64]) -> Option<Change> {
    Some(Change::Clear(r.to_vec()))
}

const NOSYNC: LogShape = LogShape { region_count: 64, in_sync: true };

/// Guarantee 2: dm-raid1 writes a region only after its MARK is answered (FLUSH of the mark
/// list before the bio is issued), so the answer must wait for a second member to hold it.
#[test]
fn mark_is_answered_only_once_another_member_holds_it() {
    let mut sim = Sim::new(NOSYNC);
    sim.start(1, 100);
    sim.start(2, 200);
    sim.run();
    sim.resume_all(&[1, 2]);
    let s = sim.request(2, RequestType::MarkRegion, mark(&[5]));
    // Deliver the MARK frame itself: node 2 applied it, but only node 1's Ack makes it stable.
    assert!(sim.step());
    assert_eq!(sim.answer(2, s), None, "answered on its own (AGREED) delivery");
    sim.run();
    assert_eq!(sim.answer(2, s), Some((0, vec![])));
    for n in [1, 2] {
        assert_eq!(sim.view(n).is_clean(5), Ok(false), "node {n}");
        assert_eq!(sim.view(n).in_sync(5), Ok(true));
    }
    sim.assert_same_state();
}

/// Guarantee 1: two nodes write one region (dm-raid1 on each marks it); it is clean only when
/// both cleared it.
#[test]
fn a_region_marked_by_two_nodes_is_clean_only_when_both_cleared_it() {
    let mut sim = Sim::new(NOSYNC);
    for n in 1..=3 {
        sim.start(n, n * 10);
    }
    sim.run();
    sim.resume_all(&[1, 2, 3]);
    let a = sim.request(1, RequestType::MarkRegion, mark(&[7, 8]));
    let b = sim.request(3, RequestType::Flush, mark(&[7]));
    sim.run();
    assert_eq!(sim.answer(1, a).map(|a| a.0), Some(0));
    assert_eq!(sim.answer(3, b).map(|a| a.0), Some(0));
    sim.request(1, RequestType::ClearRegion, clear(&[7, 8]));
    sim.run();
    for n in 1..=3 {
        assert_eq!(sim.view(n).is_clean(7), Ok(false), "node 3 still writes region 7 (node {n}'s view)");
        assert_eq!(sim.view(n).is_clean(8), Ok(true));
    }
    sim.request(3, RequestType::ClearRegion, clear(&[7]));
    sim.run();
    for n in 1..=3 {
        assert_eq!(sim.view(n).is_clean(7), Ok(true));
    }
    sim.assert_same_state();
}

/// Guarantee 2 and 3: the node whose MARK was answered dies (NodeDown) before clearing: the
/// survivors hold its mark (not clean, not in sync), and after the fencing confirmation the
/// region is resynchronised first.
#[test]
fn an_answered_mark_survives_the_crash_of_its_node_and_is_resynced_after_fencing() {
    let mut sim = Sim::new(NOSYNC);
    for n in 1..=3 {
        sim.start(n, n);
    }
    sim.run();
    sim.resume_all(&[1, 2, 3]);
    let s = sim.request(1, RequestType::MarkRegion, mark(&[42]));
    sim.run();
    assert_eq!(sim.answer(1, s).map(|a| a.0), Some(0));
    sim.crash(1, LeaveReason::NodeDown, true);
    sim.run();
    for n in [2, 3] {
        assert_eq!(sim.view(n).is_clean(42), Ok(false));
        assert_eq!(sim.view(n).in_sync(42), Ok(false), "a held node's region may be torn");
    }
    let incarnation = u128::from(1u32) << 64 | 0xb007;
    sim.command(2, Command::ConfirmFenced { group: G.to_vec(), node: 1, incarnation });
    sim.run();
    let w = sim.request(3, RequestType::GetResyncWork, Some(Change::GetResyncWork));
    sim.run();
    assert_eq!(sim.answer(3, w), Some((0, protocol::pair(1, 42).to_vec())), "the reclaimed region comes first");
    sim.request(3, RequestType::SetRegionSync, Some(Change::SetRegionSync(42, true)));
    sim.run();
    assert_eq!(sim.view(2).is_clean(42), Ok(true));
    sim.assert_same_state();
}

/// Guarantee 3 (ProcDown): the agent dies, the kernel lives on; the restarted agent adopts
/// the marks (same boot id), so the region is in sync again and its CLEAR makes it clean.
#[test]
fn a_restarted_agent_adopts_its_kernels_marks() {
    let mut sim = Sim::new(NOSYNC);
    sim.start(1, 1);
    sim.start(2, 2);
    sim.run();
    sim.resume_all(&[1, 2]);
    sim.request(2, RequestType::MarkRegion, mark(&[3]));
    sim.run();
    sim.crash(2, LeaveReason::ProcDown, false);
    sim.run();
    assert_eq!(sim.view(1).in_sync(3), Ok(false), "held while the agent is away");
    sim.start(2, 22);
    sim.run();
    sim.resume_all(&[2]);
    assert_eq!(sim.view(1).in_sync(3), Ok(true), "adopted by the same kernel incarnation");
    assert_eq!(sim.view(1).is_clean(3), Ok(false));
    sim.request(2, RequestType::ClearRegion, clear(&[3]));
    sim.run();
    assert_eq!(sim.view(1).is_clean(3), Ok(true));
    sim.assert_same_state();
}

/// Guarantee 6: a joiner gets the state cut at its Hello while the others keep writing, in
/// chunks of the atomic size, and its donor may die mid-transfer.
#[test]
fn a_joiner_gets_the_state_in_chunks_under_load_even_if_its_donor_dies() {
    let mut sim = Sim::new(LogShape { region_count: 100_000, in_sync: false });
    sim.max_atomic = wire::CHUNK_OVERHEAD + 512;
    for n in 1..=2 {
        sim.start(n, n);
    }
    sim.run();
    sim.resume_all(&[1, 2]);
    for r in 0..50 {
        sim.request(1, RequestType::MarkRegion, mark(&[r * 7]));
        sim.request(2, RequestType::SetRegionSync, Some(Change::SetRegionSync(r * 11, true)));
    }
    sim.run();
    sim.start(3, 3);
    let resume3 = sim.request(3, RequestType::Resume, None);
    // Let the transfer start (two chunks delivered), write meanwhile, then kill the donor
    // (node 1) with the rest of its chunks undelivered.
    let mut chunks = 0;
    while chunks < 2 {
        if let Some(Ev::Deliver { from, data, .. }) = sim.queue.front() {
            if from.node == 1 && matches!(wire::decode(data).map(|f| f.body), Ok(Body::Chunk(_))) {
                chunks += 1;
            }
        }
        assert!(sim.step(), "the transfer never started");
    }
    for r in 0..20 {
        sim.request(2, RequestType::MarkRegion, mark(&[1000 + r]));
    }
    for _ in 0..5 {
        sim.step();
    }
    sim.crash(1, LeaveReason::NodeDown, true);
    sim.run();
    assert!(sim.view(3).snapshot().is_some(), "the joiner got the state");
    assert!(
        sim.nodes[&2].engine.stats().transfers_sent.load(Ordering::Relaxed) >= 1,
        "node 2 restarted the transfer its dead donor began"
    );
    sim.assert_same_state();
    assert_eq!(sim.answer(3, resume3), Some((0, vec![])));
    let r = sim.request(3, RequestType::MarkRegion, mark(&[99]));
    sim.run();
    assert_eq!(sim.answer(3, r).map(|a| a.0), Some(0));
    assert_eq!(sim.view(3).is_clean(1019), Ok(false), "node 2's mark made during the transfer");
    sim.assert_same_state();
}

/// A single node (the first member) starts the log from Genesis and answers MARK on its own
/// delivery: with no other member, nobody else could hold it.
#[test]
fn a_lone_member_starts_from_genesis() {
    let mut sim = Sim::new(LogShape { region_count: 8, in_sync: false });
    sim.start(5, 1);
    sim.run();
    sim.resume_all(&[5]);
    assert_eq!(sim.view(5).sync_count(), 0, "a fresh log without nosync: every region to resync");
    let s = sim.request(5, RequestType::MarkRegion, mark(&[1]));
    sim.run();
    assert_eq!(sim.answer(5, s).map(|a| a.0), Some(0));
}

/// Guarantee 4: a member without quorum holds its requests (the kernel's I/O waits) and, with
/// quorum back, gets the state again instead of merging its own, then answers them.
#[test]
fn without_quorum_requests_wait_and_the_state_is_fetched_again() {
    let mut sim = Sim::new(NOSYNC);
    for n in 1..=3 {
        sim.start(n, n);
    }
    sim.run();
    sim.resume_all(&[1, 2, 3]);
    sim.set_quorate(3, false);
    let held = sim.request(3, RequestType::MarkRegion, mark(&[9]));
    sim.run();
    assert_eq!(sim.answer(3, held), None, "answered without quorum");
    assert_eq!(sim.view(3).held(), 1);
    // The quorate side moves on.
    sim.request(1, RequestType::MarkRegion, mark(&[10]));
    sim.run();
    sim.set_quorate(3, true);
    sim.run();
    assert_eq!(sim.answer(3, held).map(|a| a.0), Some(0));
    assert_eq!(sim.view(3).is_clean(10), Ok(false), "node 3 got what happened meanwhile");
    assert_eq!(sim.view(1).is_clean(9), Ok(false));
    sim.assert_same_state();
}

/// Guarantee 7: one recovery slot per node, no region in two slots.
#[test]
fn resync_work_is_split_across_nodes() {
    let mut sim = Sim::new(LogShape { region_count: 4, in_sync: false });
    for n in 1..=2 {
        sim.start(n, n);
    }
    sim.run();
    sim.resume_all(&[1, 2]);
    let a = sim.request(1, RequestType::GetResyncWork, Some(Change::GetResyncWork));
    let b = sim.request(2, RequestType::GetResyncWork, Some(Change::GetResyncWork));
    sim.run();
    let (ea, pa) = sim.answer(1, a).unwrap();
    let (eb, pb) = sim.answer(2, b).unwrap();
    assert_eq!((ea, eb), (0, 0));
    assert_ne!(pa, pb, "two nodes got the same region");
    let region_of_2 = u64::from_ne_bytes(pb[8..16].try_into().unwrap());
    assert!(sim.view(1).remote_recovering(region_of_2).unwrap().0, "node 1 sees node 2's region as recovering");
}

/// Guarantee 10: a cmirrord message on the group refuses the log.
#[test]
fn a_cmirrord_member_refuses_the_log() {
    let mut sim = Sim::new(NOSYNC);
    sim.start(1, 1);
    sim.run();
    sim.resume_all(&[1]);
    let mut clog = vec![0u8; 184];
    clog[..8].copy_from_slice(&5u64.to_le_bytes());
    clog[8..16].copy_from_slice(&5u64.to_le_bytes());
    sim.queue.push_back(Ev::Deliver { group: G.to_vec(), from: Member { node: 1, pid: 1 }, data: clog });
    sim.run();
    assert!(sim.view(1).refused());
    let s = sim.request(1, RequestType::MarkRegion, mark(&[1]));
    sim.run();
    assert_eq!(sim.answer(1, s).map(|a| a.0), Some(-libc::EPROTO));
}
