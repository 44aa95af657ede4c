//! The cluster state machine: kernel-facing cases, then a deterministic simulation of three
//! nodes (their kernels, agent crashes, node crashes, reboots, fencing, releases, resync)
//! against a reference model of what the legs hold.
//!
//! Kernel behaviour each case stands for:
//! - dm-raid1 marks a region (MARK_REGION, batched at FLUSH) before its first write and clears
//!   it (CLEAR_REGION) once the region's writes completed; a region another node still writes
//!   must not read as clean (`rh_update_states` / `__rh_alloc` use IS_CLEAN and IN_SYNC).
//! - dm-raid1 recovers one region at a time per node: GET_RESYNC_WORK, copy, SET_REGION_SYNC
//!   (`do_recovery`, `MAX_RECOVERY` 1); a kernel that reconnects asks again.
//! - Before writing a region the kernel asks IS_REMOTE_RECOVERING and waits while another node
//!   recovers it (`do_writes`), unless the region is below the in-sync hint it cached
//!   (`userspace_is_remote_recovering`; a hint can be stale: regions fall out of sync below it).
//!   It then asks IN_SYNC (the region is not in its region hash): a region read as not in sync
//!   is written to the default leg only and not marked (DM_RH_NOSYNC), one read as in sync is
//!   marked and written to every leg.

use super::*;
use proptest::prelude::*;

const A: NodeId = 1;
const B: NodeId = 2;
const C: NodeId = 3;

fn log(regions: u64, in_sync: bool, nodes: &[NodeId]) -> ReplicatedLog {
    let mut l = ReplicatedLog::new(regions, in_sync).unwrap();
    for &n in nodes {
        l.apply(&Event::Join { node: n, incarnation: u128::from(n) * 1000 }).unwrap();
    }
    l
}

fn mark(l: &mut ReplicatedLog, node: NodeId, regions: &[u64]) {
    l.apply(&Event::Mark { node, regions: regions.to_vec() }).unwrap();
}

fn clear(l: &mut ReplicatedLog, node: NodeId, regions: &[u64]) {
    l.apply(&Event::Clear { node, regions: regions.to_vec() }).unwrap();
}

fn work(l: &mut ReplicatedLog, node: NodeId) -> Option<u64> {
    match l.apply(&Event::GetResyncWork { node }).unwrap() {
        Outcome::ResyncWork(w) => w,
        o => panic!("GET_RESYNC_WORK answered {o:?}"),
    }
}

fn synced(l: &mut ReplicatedLog, node: NodeId, region: u64) {
    l.apply(&Event::SetRegionSync { node, region, in_sync: true }).unwrap();
}

#[test]
fn a_region_is_clean_only_when_no_node_has_it_marked() {
    let mut l = log(8, true, &[A, B]);
    mark(&mut l, A, &[3]);
    mark(&mut l, B, &[3]);
    mark(&mut l, B, &[3]); // dm-raid1 marks once per dirty period; a repeat changes nothing
    clear(&mut l, A, &[3]);
    assert_eq!(l.is_clean(3), Ok(false), "B still writes region 3");
    clear(&mut l, B, &[3]);
    assert_eq!(l.is_clean(3), Ok(true));
    assert_eq!(l.in_sync(3), Ok(true));
}

#[test]
fn a_departed_nodes_marks_are_held_and_its_regions_not_trusted_until_reclaimed() {
    let mut l = log(8, true, &[A, B]);
    mark(&mut l, B, &[2, 5]);
    l.apply(&Event::Depart { node: B }).unwrap();
    assert_eq!((l.is_clean(2), l.in_sync(2)), (Ok(false), Ok(false)), "B may have died mid-write");
    assert_eq!(l.sync_count(), 6);
    assert_eq!(work(&mut l, A), None, "held regions wait for the reclaim");
    // The fencing confirmation names the incarnation: a confirmation for another one is refused.
    assert_eq!(
        l.apply(&Event::FenceConfirmed { node: B, incarnation: 7 }),
        Err(Refusal::NothingToReclaim { node: B, incarnation: 7 })
    );
    l.apply(&Event::FenceConfirmed { node: B, incarnation: 2000 }).unwrap();
    assert!(!l.nodes().contains_key(&B));
    assert_eq!(l.reclaimed().collect::<Vec<_>>(), vec![2, 5]);
    assert_eq!(work(&mut l, A), Some(2));
    synced(&mut l, A, 2);
    assert_eq!(work(&mut l, A), Some(5));
    synced(&mut l, A, 5);
    assert_eq!((l.sync_count(), l.is_clean(5)), (8, Ok(true)));
}

#[test]
fn an_agent_restarted_under_the_same_kernel_adopts_its_marks() {
    let mut l = log(8, true, &[A, B]);
    mark(&mut l, B, &[4]);
    l.apply(&Event::Depart { node: B }).unwrap();
    l.apply(&Event::Join { node: B, incarnation: 2000 }).unwrap();
    // While B was held, A's kernel read region 4 as not in sync and would have written it to
    // its default leg only: the adopted region stays out of sync and is recovered once B's
    // kernel clears it (never while B still marks it).
    assert_eq!((l.is_clean(4), l.in_sync(4)), (Ok(false), Ok(false)), "adopted, not reclaimed");
    assert_eq!(l.reclaimed().count(), 0);
    assert_eq!(work(&mut l, A), None, "B's kernel still writes region 4");
    clear(&mut l, B, &[4]);
    assert_eq!(work(&mut l, A), Some(4));
    synced(&mut l, A, 4);
    assert_eq!((l.is_clean(4), l.in_sync(4), l.sync_count()), (Ok(true), Ok(true), 8));
}

#[test]
fn a_rebooted_node_rejoining_reclaims_what_its_old_kernel_held() {
    let mut l = log(8, true, &[A, B]);
    mark(&mut l, B, &[6]);
    l.apply(&Event::Depart { node: B }).unwrap();
    l.apply(&Event::Join { node: B, incarnation: 2001 }).unwrap();
    assert_eq!(l.nodes()[&B].marks.len(), 0, "the new kernel marked nothing");
    assert_eq!(l.in_sync(6), Ok(false));
    assert_eq!(work(&mut l, B), Some(6), "reclaimed regions first");
}

#[test]
fn a_released_node_lets_go_of_its_marks() {
    let mut l = log(8, false, &[A, B]);
    mark(&mut l, B, &[1]);
    assert_eq!(work(&mut l, B), Some(0));
    l.apply(&Event::Release { node: B }).unwrap();
    assert_eq!(l.apply(&Event::Mark { node: B, regions: vec![1] }), Err(Refusal::NotMember(B)));
    assert_eq!(Refusal::NotMember(B).errno(), -libc::ESRCH, "the kernel reconnects on -ESRCH");
    assert_eq!(work(&mut l, A), Some(0), "B's slot is free again");
    assert_eq!(l.apply(&Event::GetResyncWork { node: C }), Err(Refusal::NotMember(C)), "C never joined");
}

#[test]
fn resync_hands_out_one_slot_per_node_and_never_a_written_region() {
    let mut l = log(6, false, &[A, B, C]);
    mark(&mut l, C, &[0]);
    assert_eq!(work(&mut l, A), Some(1), "region 0 is being written by C");
    assert_eq!(work(&mut l, A), Some(1), "asked again: the same slot");
    assert_eq!(work(&mut l, B), Some(2));
    assert_eq!(l.remote_recovering(A, 2), Ok((true, 0)), "B recovers 2; region 0 is out of sync");
    assert_eq!(l.remote_recovering(B, 2), Ok((false, 0)), "its own slot is not remote");
    assert_eq!(l.remote_recovering(B, 3), Ok((true, 0)), "raw, copied by nobody yet: the write waits");
    synced(&mut l, A, 1);
    clear(&mut l, C, &[0]);
    assert_eq!(work(&mut l, A), Some(0));
}

/// The hint and IS_REMOTE_RECOVERING for raw regions (never copied: the legs may differ
/// anywhere). A kernel that writes a raw region to its default leg caches it as DM_RH_NOSYNC
/// in its region hash until it recovers the region itself (`__rh_alloc`, `dm_rh_dec`), so
/// its later writes would go to one leg after another node's copy: a raw region is
/// "recovering" to every kernel but its copier's (the write waits, and asks for the region
/// first), and the hint never passes the lowest raw region, alone or not. Torn regions (legs
/// equal but where a lost kernel wrote) are told "in sync": written marked, to every leg.
#[test]
fn raw_regions_are_recovering_to_every_kernel_but_their_copier() {
    let mut l = log(4, false, &[A]);
    assert_eq!(l.remote_recovering(A, 2), Ok((true, 0)), "raw: the write waits for a copy");
    assert!(l.want_worth_asking(2));
    l.apply(&Event::Want { node: A, region: 2 }).unwrap();
    assert!(!l.want_worth_asking(2), "asked once");
    assert_eq!(work(&mut l, A), Some(2), "the waited-for region comes first");
    assert_eq!(l.remote_recovering(A, 2), Ok((false, 0)), "its own copy: the region hash holds the write");
    synced(&mut l, A, 2);
    assert_eq!((l.remote_recovering(A, 2), l.kernel_in_sync(2)), (Ok((false, 0)), Ok(true)));
    l.apply(&Event::Join { node: B, incarnation: 1 }).unwrap();
    for r in [0, 1, 3] {
        assert_eq!(l.remote_recovering(B, r).map(|x| x.1), Ok(r), "the hint is the lowest raw region");
        let w = work(&mut l, A).unwrap();
        synced(&mut l, A, w);
    }
    assert_eq!(l.remote_recovering(A, 0), Ok((false, 4)), "all in sync");
    // B departs holding region 1: torn, out of sync, but told "in sync" to the kernels.
    mark(&mut l, B, &[1]);
    l.apply(&Event::Depart { node: B }).unwrap();
    assert_eq!((l.in_sync(1), l.kernel_in_sync(1), l.is_raw(1)), (Ok(false), Ok(true), false));
    assert_eq!(l.remote_recovering(A, 1), Ok((false, 3)), "no raw region: the hint keeps work flowing");
    let back = ReplicatedLog::decode(&l.encode()).unwrap();
    assert_eq!((back.kernel_in_sync(1), back.in_sync(1)), (Ok(true), Ok(false)));
}

#[test]
fn refused_events_change_nothing() {
    let mut l = log(4, true, &[A]);
    let before = l.encode();
    assert_eq!(
        l.apply(&Event::Mark { node: A, regions: vec![1, 4] }),
        Err(Refusal::RegionOutOfRange { region: 4, count: 4 })
    );
    assert_eq!(l.apply(&Event::GetResyncWork { node: B }), Err(Refusal::NotMember(B)));
    assert_eq!(l.encode(), before);
    assert_eq!(l.is_clean(1), Ok(true));
}

#[test]
fn snapshots_decode_to_the_same_state_and_reject_damage() {
    let mut l = log(130, false, &[A, B]);
    mark(&mut l, A, &[0, 129]);
    work(&mut l, B);
    l.apply(&Event::Depart { node: A }).unwrap();
    let bytes = l.encode();
    let back = ReplicatedLog::decode(&bytes).unwrap();
    assert_eq!(back.encode(), bytes);
    assert_eq!((back.is_clean(129), back.sync_count()), (l.is_clean(129), l.sync_count()));
    assert_eq!(ReplicatedLog::decode(&bytes[..bytes.len() - 1]).err(), Some(SnapshotError::Truncated));
    let mut v2 = bytes.clone();
    v2[4] = 4;
    assert_eq!(ReplicatedLog::decode(&v2).err(), Some(SnapshotError::Version(4)));
    let mut tail = bytes.clone();
    tail[16 + 16 + 7] |= 0x80; // bit 191 of a 130-region bitmap
    assert!(matches!(ReplicatedLog::decode(&tail), Err(SnapshotError::Inconsistent(_))));
}

proptest! {
    /// Garbage never panics the decoder.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = ReplicatedLog::decode(&bytes);
        let mut framed = b"ULRL\x03\x00\x00\x00".to_vec();
        framed.extend_from_slice(&bytes);
        let _ = ReplicatedLog::decode(&framed);
    }
}

// ---- the simulation ----

const REGIONS: u64 = 12;
const NODES: [NodeId; 3] = [A, B, C];

#[derive(Clone, Debug)]
enum Step {
    /// The node's kernel starts writing a region (MARK first if it reads as in sync); `true`:
    /// the kernel's cached in-sync hint is above the region, so it does not ask
    /// IS_REMOTE_RECOVERING first.
    Write(usize, u64, bool),
    /// The node's kernel completed a region's writes (CLEAR).
    Complete(usize, u64),
    /// The node's kernel asks for resync work.
    GetWork(usize),
    /// The node's kernel finished copying its slot (SET_REGION_SYNC 1), or failed (0).
    FinishWork(usize, bool),
    /// The node's agent dies; its kernel lives on.
    AgentCrash(usize),
    /// The agent restarts under the same kernel.
    AgentRestart(usize),
    /// The whole node dies mid-write.
    NodeCrash(usize),
    /// Fencing confirms the crashed node's kernel is dead.
    Fence(usize),
    /// The crashed node boots again (a new kernel) and its agent joins.
    Reboot(usize),
    /// The node's kernel suspends the mirror (writes and recovery done), the agent releases.
    Suspend(usize),
    /// A joiner's replica is built from a snapshot at this point.
    Snapshot,
}

fn step() -> impl Strategy<Value = Step> {
    let n = 0..NODES.len();
    let r = 0..REGIONS;
    prop_oneof![
        6 => (n.clone(), r.clone(), prop::bool::weighted(0.3)).prop_map(|(n, r, stale)| Step::Write(n, r, stale)),
        5 => (n.clone(), r).prop_map(|(n, r)| Step::Complete(n, r)),
        4 => n.clone().prop_map(Step::GetWork),
        4 => (n.clone(), prop::bool::weighted(0.9)).prop_map(|(n, ok)| Step::FinishWork(n, ok)),
        1 => n.clone().prop_map(Step::AgentCrash),
        1 => n.clone().prop_map(Step::AgentRestart),
        1 => n.clone().prop_map(Step::NodeCrash),
        1 => n.clone().prop_map(Step::Fence),
        1 => n.clone().prop_map(Step::Reboot),
        1 => n.prop_map(Step::Suspend),
        1 => Just(Step::Snapshot),
    ]
}

/// One node's kernel and agent as the reference model sees them.
#[derive(Clone, Debug, Default)]
struct ModelNode {
    incarnation: Incarnation,
    kernel_alive: bool,
    agent_live: bool,
    /// Regions with writes this kernel has started and not completed.
    writing: BTreeSet<u64>,
    /// The region this kernel is copying.
    copying: Option<u64>,
    /// Regions this kernel's region hash holds as DM_RH_NOSYNC: written to the default leg
    /// only until this kernel recovers them itself (or its node reboots).
    nosync_cache: BTreeSet<u64>,
    /// The copy proves nothing: another kernel wrote the region to one leg while it ran, or
    /// this node's agent departed during it (the state voids such a copy: the other kernels
    /// do not wait for a held node's copy).
    copy_void: bool,
    /// The agent has joined the log (false after a release, before the first join).
    joined: bool,
}

/// What the legs hold: the regions whose legs may differ. The model's truth.
struct Model {
    nodes: Vec<ModelNode>,
    legs_may_differ: BTreeSet<u64>,
    /// Regions reclaimed from a dead kernel and not yet recovered.
    reclaimed: BTreeSet<u64>,
}

/// Every replica applies the same events; a joiner's replica starts from a snapshot.
struct Replicas(Vec<ReplicatedLog>);

impl Replicas {
    fn apply(&mut self, e: &Event) -> Result<Outcome, Refusal> {
        let first = self.0[0].apply(e);
        for r in &mut self.0[1..] {
            assert_eq!(r.apply(e), first, "replicas answer {e:?} alike");
        }
        let digest = self.0[0].digest();
        assert!(self.0.iter().all(|r| r.digest() == digest), "replicas agree after {e:?}");
        first
    }
}

/// A write to the default leg only: the legs differ there, and a copy of the region running
/// elsewhere may have read the default leg before it.
fn nosync_write(m: &mut Model, r: u64) {
    m.legs_may_differ.insert(r);
    for other in &mut m.nodes {
        if other.copying == Some(r) {
            other.copy_void = true;
        }
    }
}

fn check_guarantees(m: &Model, l: &ReplicatedLog) {
    for (i, n) in m.nodes.iter().enumerate() {
        for &r in &n.writing {
            // Guarantee 1: a region any kernel may still be writing is never clean.
            assert_eq!(l.is_clean(r), Ok(false), "node {} writes region {r}", NODES[i]);
        }
    }
    for (i, n) in m.nodes.iter().enumerate() {
        for &r in n.nosync_cache.iter().filter(|_| n.kernel_alive) {
            // Finding of 2026-12-04: a region a kernel holds as NOSYNC must not be in sync, or
            // that kernel's next write to it goes to one leg under an in-sync bit.
            assert_eq!(l.in_sync(r), Ok(false), "node {} holds region {r} as NOSYNC", NODES[i]);
        }
    }
    for &r in &m.legs_may_differ {
        // Guarantee 3: a region whose legs may differ never reads as in sync.
        assert_eq!(l.in_sync(r), Ok(false), "the legs of region {r} may differ");
    }
    // One slot per node, no region in two slots.
    let slots: Vec<u64> = l.nodes().values().filter_map(|s| s.slot).collect();
    let distinct: BTreeSet<u64> = slots.iter().copied().collect();
    assert_eq!(slots.len(), distinct.len(), "a region in two slots: {slots:?}");
    assert!(l.sync_count() <= REGIONS);
}

fn run(initially_in_sync: bool, steps: &[Step]) {
    let mut replicas = Replicas(vec![ReplicatedLog::new(REGIONS, initially_in_sync).unwrap()]);
    let mut m = Model {
        nodes: NODES
            .iter()
            .map(|&n| ModelNode { incarnation: u128::from(n), kernel_alive: true, ..Default::default() })
            .collect(),
        legs_may_differ: if initially_in_sync { BTreeSet::new() } else { (0..REGIONS).collect() },
        reclaimed: BTreeSet::new(),
    };
    for (i, &id) in NODES.iter().enumerate() {
        replicas.apply(&Event::Join { node: id, incarnation: m.nodes[i].incarnation }).unwrap();
        m.nodes[i].agent_live = true;
        m.nodes[i].joined = true;
    }
    for s in steps {
        apply_step(&mut m, &mut replicas, s);
        check_guarantees(&m, &replicas.0[0]);
    }
    // Drain: every kernel completes its writes and copies, crashed nodes are fenced, stopped
    // agents restart; then resync runs to the end. Everything must end in sync and clean.
    for i in 0..NODES.len() {
        if !m.nodes[i].kernel_alive {
            apply_step(&mut m, &mut replicas, &Step::Fence(i));
            apply_step(&mut m, &mut replicas, &Step::Reboot(i));
        }
        if !m.nodes[i].agent_live {
            apply_step(&mut m, &mut replicas, &Step::AgentRestart(i));
        }
        for r in m.nodes[i].writing.clone() {
            apply_step(&mut m, &mut replicas, &Step::Complete(i, r));
        }
        apply_step(&mut m, &mut replicas, &Step::FinishWork(i, true));
        check_guarantees(&m, &replicas.0[0]);
    }
    for round in 0..=REGIONS * 2 {
        let mut any = false;
        for i in 0..NODES.len() {
            apply_step(&mut m, &mut replicas, &Step::GetWork(i));
            any |= m.nodes[i].copying.is_some();
            apply_step(&mut m, &mut replicas, &Step::FinishWork(i, true));
            check_guarantees(&m, &replicas.0[0]);
        }
        if !any {
            break;
        }
        assert!(round < REGIONS * 2, "resync does not end");
    }
    let l = &replicas.0[0];
    assert_eq!(l.sync_count(), REGIONS, "everything resynced: {:?}", l.encode());
    assert!(m.legs_may_differ.is_empty());
    assert!((0..REGIONS).all(|r| l.is_clean(r) == Ok(true)));
}

fn apply_step(m: &mut Model, reps: &mut Replicas, s: &Step) {
    match *s {
        Step::Write(i, r, stale_hint) => {
            let n = &m.nodes[i];
            if !(n.kernel_alive && n.agent_live && n.joined) || n.writing.contains(&r) {
                return;
            }
            let l = &reps.0[0];
            // The hint the agents give is never above a raw region, and raw regions do not
            // appear below it later (only at the log's start, from a disk image, or from a
            // failed leg): a stale hint covers in-sync and torn regions only.
            let stale_hint = stale_hint && !l.is_raw(r);
            // do_writes: at or above its hint the kernel asks IS_REMOTE_RECOVERING and requeues
            // the write while the answer is "recovering".
            if !stale_hint && l.remote_recovering(NODES[i], r).unwrap().0 {
                return;
            }
            // The kernel's own recovery holds its region (region hash RECOVERING): no write.
            if n.copying == Some(r) {
                return;
            }
            // A region this kernel holds as DM_RH_NOSYNC in its region hash: the default leg
            // only, no request at all.
            if n.nosync_cache.contains(&r) {
                nosync_write(m, r);
                return;
            }
            // dm_rh_get_state / __rh_alloc ask IN_SYNC; an answer that waits holds the write
            // (it is written, if ever, by a later step). A kernel that copies a region itself
            // never waits: its IN_SYNC voids the other copy (ordered), and is answered after it.
            if l.in_sync_waits(NODES[i], r) {
                return;
            }
            if l.in_sync_voids(NODES[i], r) {
                let Ok(Outcome::InSync(_)) = reps.apply(&Event::VoidCopy { node: NODES[i], region: r }) else {
                    panic!("VoidCopy refused for a live member");
                };
            }
            if reps.0[0].kernel_in_sync(r) == Ok(false) {
                // DM_RH_NOSYNC, cached in this kernel's region hash until its own recovery of
                // the region: this write and every later one go to the default leg only.
                m.nodes[i].nosync_cache.insert(r);
                nosync_write(m, r);
                return;
            }
            // Marked, to every leg; a copy of the region running elsewhere read the default leg
            // before this write and may put the old data on the others.
            for (j, other) in m.nodes.iter_mut().enumerate() {
                if j != i && other.copying == Some(r) {
                    other.copy_void = true;
                }
            }
            reps.apply(&Event::Mark { node: NODES[i], regions: vec![r] }).unwrap();
            m.nodes[i].writing.insert(r);
        }
        Step::Complete(i, r) => {
            let n = &m.nodes[i];
            if !(n.kernel_alive && n.agent_live) || !n.writing.contains(&r) {
                return;
            }
            reps.apply(&Event::Clear { node: NODES[i], regions: vec![r] }).unwrap();
            m.nodes[i].writing.remove(&r);
        }
        Step::GetWork(i) => {
            let n = &m.nodes[i];
            if !(n.kernel_alive && n.agent_live && n.joined) || n.copying.is_some() {
                return;
            }
            let reclaimed_free: BTreeSet<u64> = m
                .reclaimed
                .iter()
                .copied()
                .filter(|&r| {
                    m.nodes.iter().all(|n| !n.writing.contains(&r) && n.copying != Some(r))
                        && reps.0[0].nodes().values().all(|s| !s.marks.contains(&r) && s.slot != Some(r))
                })
                .collect();
            let Ok(Outcome::ResyncWork(w)) = reps.apply(&Event::GetResyncWork { node: NODES[i] }) else {
                panic!("GET_RESYNC_WORK refused for a live member");
            };
            if let Some(r) = w {
                // Guarantee 7: never a region a live or held kernel is writing, or another copies.
                for (j, other) in m.nodes.iter().enumerate() {
                    assert!(!other.writing.contains(&r), "region {r} handed to {i} while node {j} writes it");
                    assert!(j == i || other.copying != Some(r), "region {r} copied twice");
                }
                // Guarantee 3: reclaimed regions go first.
                assert!(
                    reclaimed_free.is_empty() || reclaimed_free.contains(&r),
                    "{r} before reclaimed {reclaimed_free:?}"
                );
                m.nodes[i].copying = Some(r);
            }
        }
        Step::FinishWork(i, ok) => {
            let n = &m.nodes[i];
            let Some(r) = n.copying else { return };
            if !(n.kernel_alive && n.agent_live) {
                return;
            }
            reps.apply(&Event::SetRegionSync { node: NODES[i], region: r, in_sync: ok }).unwrap();
            m.nodes[i].copying = None;
            // Its own recovery of the region took it out of its region hash.
            m.nodes[i].nosync_cache.remove(&r);
            let void = std::mem::take(&mut m.nodes[i].copy_void);
            if ok && !void {
                m.legs_may_differ.remove(&r);
                m.reclaimed.remove(&r);
            }
        }
        Step::AgentCrash(i) => {
            if m.nodes[i].agent_live && m.nodes[i].joined {
                reps.apply(&Event::Depart { node: NODES[i] }).unwrap();
                m.nodes[i].agent_live = false;
                m.nodes[i].copy_void |= m.nodes[i].copying.is_some();
            }
        }
        Step::AgentRestart(i) => {
            let n = &m.nodes[i];
            if n.kernel_alive && !n.agent_live {
                reps.apply(&Event::Join { node: NODES[i], incarnation: n.incarnation }).unwrap();
                m.nodes[i].agent_live = true;
                m.nodes[i].joined = true;
            }
        }
        Step::NodeCrash(i) => {
            let n = &mut m.nodes[i];
            if !n.kernel_alive {
                return;
            }
            if n.agent_live && n.joined {
                reps.apply(&Event::Depart { node: NODES[i] }).unwrap();
            }
            // Its writes and its copy may have reached one leg only.
            m.legs_may_differ.extend(n.writing.iter().copied().chain(n.copying));
            if reps.0[0].nodes().contains_key(&NODES[i]) {
                m.reclaimed.extend(n.writing.iter().copied().chain(n.copying));
            }
            n.writing.clear();
            n.copying = None;
            n.copy_void = false;
            n.nosync_cache.clear();
            n.kernel_alive = false;
            n.agent_live = false;
        }
        Step::Fence(i) => {
            let n = &m.nodes[i];
            if n.kernel_alive {
                return;
            }
            let held = reps.0[0].nodes().get(&NODES[i]).is_some_and(|s| !s.live && s.incarnation == n.incarnation);
            let got = reps.apply(&Event::FenceConfirmed { node: NODES[i], incarnation: n.incarnation });
            assert_eq!(got.is_ok(), held, "a confirmation reclaims exactly a held incarnation");
        }
        Step::Reboot(i) => {
            let n = &mut m.nodes[i];
            if n.kernel_alive {
                return;
            }
            n.incarnation += 0x1_0000;
            n.kernel_alive = true;
            n.agent_live = true;
            n.joined = true;
            reps.apply(&Event::Join { node: NODES[i], incarnation: n.incarnation }).unwrap();
        }
        Step::Suspend(i) => {
            let n = &m.nodes[i];
            if !(n.kernel_alive && n.agent_live && n.joined) || !n.writing.is_empty() || n.copying.is_some() {
                return;
            }
            reps.apply(&Event::Release { node: NODES[i] }).unwrap();
            // The kernel resumes at once (a table reload): its agent joins again.
            reps.apply(&Event::Join { node: NODES[i], incarnation: n.incarnation }).unwrap();
        }
        Step::Snapshot => {
            let bytes = reps.0[0].encode();
            let joiner = ReplicatedLog::decode(&bytes).unwrap();
            assert_eq!(joiner.encode(), bytes);
            reps.0.push(joiner);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Any interleaving of writes, resync, agent crashes, node crashes mid-write, fencing,
    /// reboots and table reloads on three nodes keeps the guarantees at every step, gives the
    /// same answers on every replica (joiners from snapshots included), and ends in sync.
    #[test]
    fn three_nodes_keep_the_guarantees_through_crashes_and_resync(
        in_sync in any::<bool>(),
        steps in proptest::collection::vec(step(), 0..120),
    ) {
        run(in_sync, &steps);
    }
}

/// Guarantee 8: one disk writer at a time. The role goes to the lowest live node, stays with
/// its holder while it lives (no hand-over when a lower node joins), and while it is held
/// (its node may be cut off and still writing the device); it moves only when that node is
/// released, reclaimed (fenced, rebooted) or never was.
#[test]
fn the_disk_writer_role_moves_only_when_its_holder_is_surely_gone() {
    let mut l = log(8, true, &[B, C]);
    assert_eq!(l.disk_writer(), Some(B));
    l.apply(&Event::Join { node: A, incarnation: 1000 }).unwrap();
    assert_eq!(l.disk_writer(), Some(B), "a lower node joining takes nothing");
    l.apply(&Event::Depart { node: B }).unwrap();
    assert_eq!(l.disk_writer(), Some(B), "held: B may still write the device");
    l.apply(&Event::Join { node: B, incarnation: 2000 }).unwrap();
    assert_eq!(l.disk_writer(), Some(B), "adopted");
    l.apply(&Event::Depart { node: B }).unwrap();
    l.apply(&Event::FenceConfirmed { node: B, incarnation: 2000 }).unwrap();
    assert_eq!(l.disk_writer(), Some(A), "reclaimed: the lowest live node writes");
    l.apply(&Event::Release { node: A }).unwrap();
    assert_eq!(l.disk_writer(), Some(C), "released: its writes are done");
    let back = ReplicatedLog::decode(&l.encode()).unwrap();
    assert_eq!(back.disk_writer(), Some(C));
    // The image: clean = in sync and marked by nobody.
    mark(&mut l, C, &[3]);
    l.apply(&Event::SetRegionSync { node: C, region: 5, in_sync: false }).unwrap();
    let clean = l.clean_bitmap().unwrap();
    assert_eq!((0..8).filter(|&r| !clean.get(r)).collect::<Vec<_>>(), vec![3, 5]);
    let from_disk = ReplicatedLog::from_clean_image(&clean).unwrap();
    assert_eq!((from_disk.sync_count(), from_disk.in_sync(3), from_disk.in_sync(4)), (6, Ok(false), Ok(true)));
}

/// IN_SYNC waits for another live node's copy only when the asker copies nothing itself: a
/// kernel's copy completes through its one kmirrord worker, the same worker that waits for the
/// answer, so two copiers waiting on each other's regions would hang both mirrors.
#[test]
fn in_sync_never_waits_for_a_node_that_copies_itself() {
    let mut l = log(8, false, &[A, B, C]);
    assert_eq!(work(&mut l, A), Some(0));
    assert!(l.in_sync_waits(C, 0), "C copies nothing: its write waits for A's copy");
    assert!(!l.in_sync_waits(A, 0), "A's own copy");
    assert_eq!(work(&mut l, B), Some(1));
    assert!(!l.in_sync_waits(B, 0) && !l.in_sync_waits(A, 1), "copiers never wait on each other");
    // B's IN_SYNC of A's region voids A's copy instead (B may now write it to one leg).
    assert!(l.in_sync_voids(B, 0) && !l.in_sync_voids(C, 0) && !l.in_sync_voids(A, 0));
    assert_eq!(l.apply(&Event::VoidCopy { node: B, region: 0 }), Ok(Outcome::InSync(false)));
    synced(&mut l, A, 0);
    assert_eq!(l.in_sync(0), Ok(false), "A's copy ran while B could write region 0 to one leg");
    assert_eq!(work(&mut l, C), Some(0), "copied again");
}

/// A torn region (told "in sync") that another node copies: a writer below its stale hint
/// waits for the copy before its IN_SYNC is answered, instead of marking the region and voiding
/// the copy on every write (a hot region's resync would never end).
#[test]
fn a_torn_region_being_copied_holds_a_stale_writer_until_the_copy_ends() {
    let mut l = log(4, true, &[A, B, C]);
    mark(&mut l, C, &[2]);
    l.apply(&Event::Depart { node: C }).unwrap();
    l.apply(&Event::FenceConfirmed { node: C, incarnation: 3000 }).unwrap();
    assert_eq!((l.in_sync(2), l.kernel_in_sync(2)), (Ok(false), Ok(true)), "torn");
    assert_eq!(work(&mut l, A), Some(2));
    assert!(l.in_sync_waits(B, 2), "B's write waits for A's copy");
    mark(&mut l, B, &[2]); // had B been answered at once: its write voids the copy
    synced(&mut l, A, 2);
    assert_eq!(l.in_sync(2), Ok(false), "a copy raced by a marked write proves nothing");
}

/// A write to one leg failed on node B (dm-raid1's `dm_rh_mark_nosync`: SET_REGION_SYNC 0 of a
/// region B has marked, not its slot). B never clears that mark until its table is reloaded,
/// so no node may copy the region meanwhile; it must not become "recovering" to every kernel
/// for good (their writes, and any suspend, would wait forever): it is torn.
#[test]
fn a_failed_leg_write_leaves_a_torn_region_that_no_write_waits_for() {
    let mut l = log(4, true, &[A, B]);
    mark(&mut l, B, &[1]);
    l.apply(&Event::SetRegionSync { node: B, region: 1, in_sync: false }).unwrap();
    assert_eq!((l.in_sync(1), l.is_raw(1), l.kernel_in_sync(1)), (Ok(false), false, Ok(true)));
    assert_eq!(l.remote_recovering(A, 1).map(|x| x.0), Ok(false), "A's writes to region 1 go on");
    assert_eq!(work(&mut l, A), None, "B still marks it: nobody copies it under B's writes");
}
