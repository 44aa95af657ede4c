//! `ReplicatedLog`: the state of one cluster log, changed only by totally ordered [`Event`]s.
//!
//! Every member applies the same events in the same order, so every member holds the same
//! state and gives the same answers (IN_SYNC, IS_CLEAN, GET_SYNC_COUNT, IS_REMOTE_RECOVERING,
//! GET_RESYNC_WORK). Nothing here reads a clock, a random source or a hash map's iteration
//! order: ordered containers only, so [`ReplicatedLog::digest`] and [`ReplicatedLog::encode`]
//! are the same bytes on every member.
//!
//! The state per log: the sync bitmap (legs identical), and per node that has joined the log
//! the kernel incarnation of its agent (the node's boot id), whether that agent is live, the
//! regions its kernel marked (a set: a second MARK of a region changes nothing, one CLEAR ends
//! it, as dm-raid1's region hash marks a region once per dirty period), and its recovery slot.
//! Derived, kept for speed: how many nodes own each marked region, which node recovers each
//! slotted region, and a lower bound of the lowest out-of-sync region.
//!
//! Costs: marks and slots are in ordered maps (a node marks at most the regions with writes in
//! flight, dm-raid1 batches them by 32); the bitmap is one bit per region. Handing out work
//! scans the bitmap from the lowest out-of-sync region, skipping owned and slotted ones.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::region_log::bitmap::RegionBitmap;

/// A corosync node id.
pub type NodeId = u32;

/// A kernel incarnation: the node's boot id (`/proc/sys/kernel/random/boot_id` as 128 bits).
/// An agent that restarts under the same kernel has the same one; a rebooted node a new one.
pub type Incarnation = u128;

/// One totally ordered change to a cluster log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A node's agent joined the log (its first message after joining the group).
    Join {
        /// The node whose agent sent it (or that the membership change is about).
        node: NodeId,
        /// The kernel incarnation (boot id) of that node.
        incarnation: Incarnation,
    },
    /// A node's agent left the group without [`Event::Release`] (its agent or its whole node
    /// died, or it was partitioned away): its marks and slot are held, because its kernel may
    /// still be writing, or may have died mid-write.
    Depart {
        /// The node whose agent sent it (or that the membership change is about).
        node: NodeId,
    },
    /// A node's kernel no longer writes the mirror (sent by the node itself once its kernel
    /// suspended or destroyed the log): its marks and slot are let go.
    Release {
        /// The node whose agent sent it (or that the membership change is about).
        node: NodeId,
    },
    /// The node's kernel of that incarnation is known dead (fencing, or an operator's word):
    /// its held marks and slot are reclaimed.
    FenceConfirmed {
        /// The node whose agent sent it (or that the membership change is about).
        node: NodeId,
        /// The kernel incarnation (boot id) of that node.
        incarnation: Incarnation,
    },
    /// A member that re-synced after losing quorum saw these marks of a departed node in its
    /// old state (made where the others could not see them): they are added to that node's
    /// held marks, so the merge of what the partitions knew loses no dirty region. Applied only
    /// to a held share of that incarnation (a live node re-asserts its own marks; an absent one
    /// released or was reclaimed, which only the quorate side can do).
    HoldMarks {
        /// The departed node.
        node: NodeId,
        /// Its kernel incarnation (boot id).
        incarnation: Incarnation,
        /// The regions.
        regions: Vec<u64>,
    },
    /// A node's kernel reconnected to a new agent (its old agent died) and the state holds no
    /// marks of that kernel (it came from a log restarted without them): the regions that
    /// kernel holds dirty, and will never mark again, are unknown, so every region goes out of
    /// sync.
    UnknownMarks {
        /// The node.
        node: NodeId,
    },
    /// IN_SYNC from a node that copies a region itself, of a region another live node copies
    /// (see [`ReplicatedLog::in_sync_voids`]): that copy is void, because the asking kernel
    /// may now write the region to its default leg while the copy reads it.
    VoidCopy {
        /// The asking node.
        node: NodeId,
        /// The region.
        region: u64,
    },
    /// A node's kernel waits to write a raw region (IS_REMOTE_RECOVERING said "recovering"):
    /// it is handed out before the regions nobody waits for.
    Want {
        /// The node whose kernel waits.
        node: NodeId,
        /// The region.
        region: u64,
    },
    /// MARK_REGION (or FLUSH's integrated marks) from a node's kernel.
    Mark {
        /// The node whose agent sent it (or that the membership change is about).
        node: NodeId,
        /// The regions, in the order the kernel sent them.
        regions: Vec<u64>,
    },
    /// CLEAR_REGION (or FLUSH's integrated clears) from a node's kernel.
    Clear {
        /// The node whose agent sent it (or that the membership change is about).
        node: NodeId,
        /// The regions, in the order the kernel sent them.
        regions: Vec<u64>,
    },
    /// GET_RESYNC_WORK from a node's kernel.
    GetResyncWork {
        /// The node whose agent sent it (or that the membership change is about).
        node: NodeId,
    },
    /// SET_REGION_SYNC from a node's kernel.
    SetRegionSync {
        /// The node whose agent sent it (or that the membership change is about).
        node: NodeId,
        /// The region.
        region: u64,
        /// The state the kernel reports for it.
        in_sync: bool,
    },
}

/// What applying an event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The state changed (or the event changed nothing, e.g. a second CLEAR).
    Applied,
    /// GET_RESYNC_WORK's answer: the region this node is to recover, if any.
    ResyncWork(Option<u64>),
    /// IN_SYNC's answer after [`Event::VoidCopy`].
    InSync(bool),
}

/// Why an event was refused. Refusals are deterministic (every member refuses the same event),
/// and the node whose kernel asked answers it with [`Refusal::errno`].
#[derive(thiserror::Error, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A request from a node whose agent is not a live member of the log.
    #[error("node {0} is not a live member of this log")]
    NotMember(NodeId),
    /// A region number at or beyond the region count.
    #[error("region {region} is beyond the log's {count} regions")]
    RegionOutOfRange {
        /// The region.
        region: u64,
        /// The region count of the log.
        count: u64,
    },
    /// A fencing confirmation for an incarnation that is not held (already reclaimed, adopted,
    /// or never seen): nothing to reclaim, and nothing is.
    #[error("no held state of node {node} incarnation {incarnation:032x} to reclaim")]
    NothingToReclaim {
        /// The node whose agent sent it (or that the membership change is about).
        node: NodeId,
        /// The kernel incarnation (boot id) of that node.
        incarnation: Incarnation,
    },
}

impl Refusal {
    /// The negative errno a kernel request refused so is answered with.
    pub fn errno(&self) -> i32 {
        match self {
            // The kernel reconnects (CTR + RESUME) on -ESRCH, which makes the agent join again.
            Refusal::NotMember(_) => -libc::ESRCH,
            Refusal::RegionOutOfRange { .. } | Refusal::NothingToReclaim { .. } => -libc::EINVAL,
        }
    }
}

/// One node's share of a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeShare {
    /// The kernel incarnation whose marks these are.
    pub incarnation: Incarnation,
    /// The agent is a live member; false while held after a departure.
    pub live: bool,
    /// Regions this node's kernel marked and has not cleared.
    pub marks: BTreeSet<u64>,
    /// The region this node is recovering.
    pub slot: Option<u64>,
    /// The node departed while it held `slot`: the other kernels may have written the region to
    /// their default leg meanwhile (they answer IN_SYNC of a held node's slot at once), so the
    /// copy's SET_REGION_SYNC 1 does not set it in sync; it is recovered again.
    pub slot_voided: bool,
}

/// The replicated state of one cluster log.
#[derive(Clone, Debug)]
pub struct ReplicatedLog {
    sync: RegionBitmap,
    /// Out-of-sync regions whose legs can differ only where some kernel was writing when its
    /// node departed or its marks were lost (a held node's marks, a reclaim, unknown marks):
    /// the legs were equal before. The kernels are told they are in sync (see
    /// [`Self::kernel_in_sync`]); the others out of sync are *raw* (never copied, or a leg
    /// failed): the legs may differ anywhere.
    torn: RegionBitmap,
    /// Raw regions a kernel waits to write (IS_REMOTE_RECOVERING said "recovering"): handed out
    /// after the reclaimed ones and before the rest, so the write waits one copy.
    wanted: VecDeque<u64>,
    /// Set bits of `sync` (GET_SYNC_COUNT is on the request path: not a walk of the bitmap).
    sync_ones: u64,
    nodes: BTreeMap<NodeId, NodeShare>,
    /// Reclaimed regions, handed out before any other (oldest reclaim first).
    reclaimed: VecDeque<u64>,
    // Derived from `nodes` (never encoded, rebuilt on decode):
    owners: BTreeMap<u64, u32>,
    recovering: BTreeMap<u64, NodeId>,
    /// No region below this is out of sync (a lower bound; any lower bound gives the same answers).
    search_from: u64,
    /// The node that writes the shared log device of a `clustered-disk` log (see
    /// [`Self::disk_writer`]).
    writer: Option<NodeId>,
}

/// Snapshot format version of [`ReplicatedLog::encode`].
pub const SNAPSHOT_VERSION: u32 = 3;
const SNAPSHOT_MAGIC: [u8; 4] = *b"ULRL";

/// Why a snapshot could not be decoded.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a ulog log snapshot (bad magic)")]
    /// The bytes do not start with the snapshot magic.
    Magic,
    #[error("snapshot version {0} is not {SNAPSHOT_VERSION}")]
    /// Another snapshot format version.
    Version(u32),
    #[error("snapshot truncated")]
    /// The bytes end before the snapshot does.
    Truncated,
    #[error("snapshot has {0} bytes after its end")]
    /// Bytes follow the snapshot's end.
    Trailing(usize),
    #[error("snapshot inconsistent: {0}")]
    /// The snapshot contradicts itself (what, in the text).
    Inconsistent(&'static str),
    #[error("no memory for a snapshot of {0} regions")]
    /// The region count does not fit in memory.
    NoMemory(u64),
}

impl SnapshotError {
    /// Errno for the kernel request that waited on a state transfer that failed so.
    pub fn errno(&self) -> i32 {
        match self {
            SnapshotError::NoMemory(_) => -libc::ENOMEM,
            _ => -libc::EPROTO,
        }
    }
}

impl ReplicatedLog {
    /// A log of `region_count` regions, all in sync (`nosync` tables) or none.
    pub fn new(region_count: u64, in_sync: bool) -> Result<Self, std::collections::TryReserveError> {
        Ok(Self {
            sync: RegionBitmap::try_new(region_count, in_sync)?,
            torn: RegionBitmap::try_new(region_count, false)?,
            wanted: VecDeque::new(),
            sync_ones: if in_sync { region_count } else { 0 },
            nodes: BTreeMap::new(),
            reclaimed: VecDeque::new(),
            owners: BTreeMap::new(),
            recovering: BTreeMap::new(),
            search_from: 0,
            writer: None,
        })
    }

    /// A log whose regions are in sync exactly where `clean` (a `clustered-disk` image's clean
    /// bits, `region_count` long) says so: a region dirty on the disk may have been written on
    /// one leg only.
    pub fn from_clean_image(clean: &RegionBitmap) -> Result<Self, std::collections::TryReserveError> {
        let mut log = Self::new(clean.len(), false)?;
        log.sync.copy_from(clean);
        log.sync_ones = log.sync.count_ones();
        Ok(log)
    }

    /// Every region the image `clean` does not call clean goes out of sync (a log continued from
    /// a kept history that may be older than the disk).
    pub fn out_of_sync_unless_clean(&mut self, clean: &RegionBitmap) {
        let mut next = clean.next_zero(0);
        while let Some(r) = next {
            if r >= self.region_count() {
                break;
            }
            // Dirty on the device: why is not known, so raw.
            self.set_sync(r, false);
            self.torn.set(r, false);
            next = clean.next_zero(r + 1);
        }
    }

    /// The clean bits of the state as a `clustered-disk` image holds them: in sync and marked
    /// by no node, live or held (IS_CLEAN).
    pub fn clean_bitmap(&self) -> Result<RegionBitmap, std::collections::TryReserveError> {
        let mut clean = RegionBitmap::try_new(self.region_count(), false)?;
        clean.copy_from(&self.sync);
        for &r in self.owners.keys() {
            clean.set(r, false);
        }
        Ok(clean)
    }

    /// The node whose agent writes the shared log device (`clustered-disk`): one at a time.
    /// The role goes to the lowest live node when there is none, stays with its holder while
    /// it is live (a lower node joining does not take it), and stays with it while it is held
    /// (departed without release: its node may be cut off and still writing, so no other node
    /// writes until it is adopted, released or reclaimed).
    pub fn disk_writer(&self) -> Option<NodeId> {
        self.writer
    }

    fn update_writer(&mut self) {
        if self.writer.is_some_and(|w| self.nodes.contains_key(&w)) {
            return;
        }
        self.writer = self.nodes.iter().find(|(_, s)| s.live).map(|(&n, _)| n);
    }

    /// Number of regions.
    pub fn region_count(&self) -> u64 {
        self.sync.len()
    }

    /// IN_SYNC: the legs hold the same data for region `r`.
    ///
    /// A region marked by a held node is out of sync: that node's kernel may have died
    /// mid-write. Its sync bit is cleared at the departure (torn: the kernels are still told
    /// "in sync", see [`Self::kernel_in_sync`]) and stays clear through an adoption; the
    /// held-mark test here keeps the answer right whatever sets the bit while the mark is held.
    pub fn in_sync(&self, r: u64) -> Result<bool, Refusal> {
        self.check(r)?;
        Ok(self.sync.get(r) && !self.held_mark(r))
    }

    fn held_mark(&self, r: u64) -> bool {
        self.nodes.values().any(|s| !s.live && s.marks.contains(&r))
    }

    /// Whether an IN_SYNC of `r` from `node` must wait: a live member other than `node` is
    /// copying `r`. A kernel whose cached in-sync hint is above `r` writes it without asking
    /// IS_REMOTE_RECOVERING: answered now, a raw region's write would go to the default leg
    /// while the copy reads it, and a torn region's (told "in sync") would be marked and void
    /// the copy, again and again while that kernel keeps writing it (the resync of a hot
    /// region would never end). Answered once the copy ends, the write goes to every leg. A
    /// held node's slot does not wait (its completion is voided), and a node that holds a slot
    /// itself never waits: its kernel's one worker (kmirrord) would be blocked, and the copy it
    /// runs completes only through that worker, so two such nodes waiting on each other's
    /// copies would hang both mirrors.
    pub fn in_sync_waits(&self, node: NodeId, r: u64) -> bool {
        self.nodes.get(&node).is_some_and(|s| s.slot.is_none()) && self.copied_by_another_live(node, r)
    }

    /// Whether an IN_SYNC of `r` from `node` voids another live member's copy of `r` (an
    /// ordered [`Event::VoidCopy`] answers it): `node` holds a slot itself, so it must not wait
    /// (see [`Self::in_sync_waits`]), and a "not in sync" answer lets its kernel write `r` to
    /// the default leg while the copy reads it.
    pub fn in_sync_voids(&self, node: NodeId, r: u64) -> bool {
        self.nodes.get(&node).is_some_and(|s| s.slot.is_some()) && self.copied_by_another_live(node, r)
    }

    /// A live member other than `node` has `r` in its slot.
    fn copied_by_another_live(&self, node: NodeId, r: u64) -> bool {
        self.recovering.get(&r).is_some_and(|&n| n != node && self.nodes.get(&n).is_some_and(|s| s.live))
    }

    /// `node`'s kernel may write `r` to a leg while another node's copy of it runs: that copy
    /// proves nothing (its SET_REGION_SYNC 1 leaves the region out of sync).
    fn void_copy_by_another(&mut self, node: NodeId, r: u64) {
        if let Some(&copier) = self.recovering.get(&r).filter(|&&n| n != node) {
            if let Some(s) = self.nodes.get_mut(&copier) {
                s.slot_voided = true;
            }
        }
    }

    /// IS_CLEAN: in sync and marked by no node, live or held.
    pub fn is_clean(&self, r: u64) -> Result<bool, Refusal> {
        self.check(r)?;
        Ok(self.sync.get(r) && !self.owners.contains_key(&r))
    }

    /// GET_SYNC_COUNT: the regions [`Self::in_sync`] answers true for.
    pub fn sync_count(&self) -> u64 {
        let held: BTreeSet<u64> = self
            .nodes
            .values()
            .filter(|s| !s.live)
            .flat_map(|s| s.marks.iter().copied())
            .filter(|&r| self.sync.get(r))
            .collect();
        self.sync_ones - held.len() as u64
    }

    /// IS_REMOTE_RECOVERING from `node`'s kernel: `(is_recovering, in_sync_hint)`.
    ///
    /// Recovering: another node (live or held) has `r` in its slot. The hint (the kernel
    /// treats every region below it as not recovering without asking, and stops asking for
    /// resync work once it reaches region_count; see `DirtyLog::remote_recovering`): while any
    /// region is out of sync, the lowest out-of-sync region when another node shares the log
    /// (any such region may be handed to it at any moment), capped at `region_count - 1` so
    /// resync work keeps flowing; alone, `region_count - 1` as a single node answers;
    /// `region_count` once all is in sync.
    pub fn remote_recovering(&self, node: NodeId, r: u64) -> Result<(bool, u64), Refusal> {
        self.check(r)?;
        let own_slot = self.nodes.get(&node).is_some_and(|s| s.slot == Some(r));
        let recovering = self.recovering.get(&r).is_some_and(|&n| n != node) || (self.is_raw(r) && !own_slot);
        let count = self.region_count();
        let hint = match (self.next_raw(self.search_from), self.sync.next_zero(self.search_from)) {
            (_, None) => count,
            (Some(raw), _) => raw.min(count - 1),
            (None, Some(_)) => count - 1,
        };
        Ok((recovering, hint))
    }

    /// IN_SYNC as a kernel is told it: in sync, or torn (see the `torn` field): a torn
    /// region's writes then go to every leg, marked, so no kernel caches it as DM_RH_NOSYNC.
    /// dm-raid1 reads the default leg whatever the answer (`choose_mirror`), unless that leg
    /// failed; then a torn region may give the other version of a write that never completed.
    pub fn kernel_in_sync(&self, r: u64) -> Result<bool, Refusal> {
        self.check(r)?;
        Ok(self.sync.get(r) || self.torn.get(r))
    }

    /// Out of sync and not torn: the legs may differ anywhere.
    pub fn is_raw(&self, r: u64) -> bool {
        !self.sync.get(r) && !self.torn.get(r)
    }

    /// Whether a kernel waiting on raw region `r` should ask for it first (see `wanted`).
    pub fn want_worth_asking(&self, r: u64) -> bool {
        r < self.region_count() && self.is_raw(r) && !self.recovering.contains_key(&r) && !self.wanted.contains(&r)
    }

    /// The lowest raw region at or after `from`.
    fn next_raw(&self, from: u64) -> Option<u64> {
        let count = self.region_count();
        let (sync, torn) = (self.sync.words(), self.torn.words());
        let mut w = (from / 64) as usize;
        let mut mask = !0u64 << (from % 64);
        while w < sync.len() {
            let raw = !sync[w] & !torn[w] & mask;
            if raw != 0 {
                let r = w as u64 * 64 + u64::from(raw.trailing_zeros());
                return (r < count).then_some(r);
            }
            w += 1;
            mask = !0;
        }
        None
    }

    /// Every region out of sync (the log restarts from a history that may miss marks: a
    /// kernel wrote while no member knew what it marked). Marks and slots are kept.
    pub fn all_out_of_sync(&mut self) {
        // What was in sync had equal legs but for the writes nobody knows of: torn.
        self.torn.or_assign(&self.sync);
        self.sync.fill(false);
        self.sync_ones = 0;
        self.search_from = 0;
    }

    /// The nodes that share the log, live or held.
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeShare> {
        &self.nodes
    }

    /// Reclaimed regions not yet handed out again.
    pub fn reclaimed(&self) -> impl Iterator<Item = u64> + '_ {
        self.reclaimed.iter().copied()
    }

    fn check(&self, r: u64) -> Result<(), Refusal> {
        if r < self.region_count() {
            Ok(())
        } else {
            Err(Refusal::RegionOutOfRange { region: r, count: self.region_count() })
        }
    }

    fn live(&self, node: NodeId) -> Result<(), Refusal> {
        match self.nodes.get(&node) {
            Some(s) if s.live => Ok(()),
            _ => Err(Refusal::NotMember(node)),
        }
    }

    /// Applies one event. A refused event changes nothing.
    pub fn apply(&mut self, event: &Event) -> Result<Outcome, Refusal> {
        let outcome = self.apply_event(event);
        self.update_writer();
        outcome
    }

    fn apply_event(&mut self, event: &Event) -> Result<Outcome, Refusal> {
        match *event {
            Event::Join { node, incarnation } => {
                match self.nodes.get_mut(&node) {
                    // The agent restarted under the same kernel: it adopts its kernel's marks
                    // and slot (the kernel will CLEAR them and report its recovery).
                    Some(s) if s.incarnation == incarnation => s.live = true,
                    // A new kernel on that node: the old one is dead (a reboot), so what it
                    // held is reclaimed without waiting for fencing.
                    Some(_) => {
                        self.reclaim(node);
                        self.nodes.insert(node, NodeShare::new(incarnation));
                    }
                    None => {
                        self.nodes.insert(node, NodeShare::new(incarnation));
                    }
                }
                Ok(Outcome::Applied)
            }
            Event::Depart { node } => {
                let Some(share) = self.nodes.get_mut(&node) else { return Ok(Outcome::Applied) };
                share.live = false;
                share.slot_voided |= share.slot.is_some();
                // The held node's kernel may have died mid-write, or still write: the legs of
                // its regions may differ where it wrote, whatever becomes of it, so they go out
                // of sync now (an adopted region is recovered after its kernel clears it). Torn:
                // the other kernels are still told "in sync", so their writes are marked and go
                // to every leg; a "not in sync" answer would be cached in their region hash as
                // DM_RH_NOSYNC and send their later writes to one leg even after the resync.
                let marks: Vec<u64> = share.marks.iter().copied().collect();
                for r in marks {
                    self.tear(r);
                }
                Ok(Outcome::Applied)
            }
            Event::Release { node } => {
                self.live(node)?;
                if let Some(s) = self.nodes.remove(&node) {
                    for r in s.marks {
                        self.disown(r);
                    }
                    if let Some(r) = s.slot {
                        self.recovering.remove(&r);
                    }
                }
                Ok(Outcome::Applied)
            }
            Event::FenceConfirmed { node, incarnation } => match self.nodes.get(&node) {
                Some(s) if !s.live && s.incarnation == incarnation => {
                    self.reclaim(node);
                    Ok(Outcome::Applied)
                }
                _ => Err(Refusal::NothingToReclaim { node, incarnation }),
            },
            Event::HoldMarks { node, incarnation, ref regions } => {
                self.check_all(regions)?;
                let Some(share) = self.nodes.get_mut(&node).filter(|s| !s.live && s.incarnation == incarnation) else {
                    return Ok(Outcome::Applied);
                };
                for &r in regions {
                    if share.marks.insert(r) {
                        *self.owners.entry(r).or_insert(0) += 1;
                    }
                }
                // Held marks are torn, as at the departure.
                for &r in regions {
                    self.tear(r);
                }
                Ok(Outcome::Applied)
            }
            Event::UnknownMarks { .. } => {
                self.all_out_of_sync();
                Ok(Outcome::Applied)
            }
            Event::VoidCopy { node, region } => {
                self.live(node)?;
                self.check(region)?;
                self.void_copy_by_another(node, region);
                Ok(Outcome::InSync(self.kernel_in_sync(region)?))
            }
            Event::Mark { node, ref regions } => {
                self.live(node)?;
                self.check_all(regions)?;
                let share = self.nodes.get_mut(&node).ok_or(Refusal::NotMember(node))?;
                for &r in regions {
                    if share.marks.insert(r) {
                        *self.owners.entry(r).or_insert(0) += 1;
                    }
                }
                // A kernel that writes a region another node copies (a torn region below its
                // cached hint: it was told "in sync") writes every leg while the copy reads the
                // default one: that copy proves nothing.
                for &r in regions {
                    self.void_copy_by_another(node, r);
                }
                Ok(Outcome::Applied)
            }
            Event::Want { node, region } => {
                self.live(node)?;
                self.check(region)?;
                if self.want_worth_asking(region) {
                    self.wanted.push_back(region);
                }
                Ok(Outcome::Applied)
            }
            Event::Clear { node, ref regions } => {
                self.live(node)?;
                self.check_all(regions)?;
                let share = self.nodes.get_mut(&node).ok_or(Refusal::NotMember(node))?;
                let mut gone = Vec::new();
                for &r in regions {
                    if share.marks.remove(&r) {
                        gone.push(r);
                    }
                }
                for r in gone {
                    self.disown(r);
                }
                Ok(Outcome::Applied)
            }
            Event::GetResyncWork { node } => {
                self.live(node)?;
                if let Some(r) = self.nodes.get(&node).and_then(|s| s.slot) {
                    // A resend (or the kernel's reconnect) asks again: same answer.
                    return Ok(Outcome::ResyncWork(Some(r)));
                }
                let work = self.next_work();
                if let Some(r) = work {
                    // A reclaimed region stays queued until it is in sync: if this copy
                    // fails (SET_REGION_SYNC 0), it is still first in line.
                    self.recovering.insert(r, node);
                    if let Some(s) = self.nodes.get_mut(&node) {
                        s.slot = Some(r);
                    }
                }
                Ok(Outcome::ResyncWork(work))
            }
            Event::SetRegionSync { node, region, in_sync } => {
                self.live(node)?;
                self.check(region)?;
                let mut voided = false;
                let mut own_copy = false;
                if let Some(s) = self.nodes.get_mut(&node) {
                    if s.slot == Some(region) {
                        own_copy = true;
                        voided = s.slot_voided;
                        s.slot = None;
                        s.slot_voided = false;
                        self.recovering.remove(&region);
                    }
                }
                if !in_sync && !own_copy {
                    // A write to one leg failed (`dm_rh_mark_nosync`): that kernel keeps the
                    // region marked (it never clears it) and writes it to its default leg only
                    // until its table is reloaded. Torn, not raw: the legs differ only where that
                    // write failed, and a raw region nobody may copy would be "recovering" to
                    // every kernel for good, holding their writes (and any suspend) forever.
                    self.tear(region);
                    return Ok(Outcome::Applied);
                }
                // A copy that ran while this node was away proves nothing: the region stays
                // out of sync and is handed out again.
                self.set_sync(region, in_sync && !voided);
                Ok(Outcome::Applied)
            }
        }
    }

    fn set_sync(&mut self, r: u64, in_sync: bool) {
        if !in_sync {
            self.search_from = self.search_from.min(r);
        } else {
            self.torn.set(r, false);
            if !self.wanted.is_empty() {
                self.wanted.retain(|&x| x != r);
            }
        }
        if self.sync.set(r, in_sync) {
            if in_sync {
                // Recovered: no longer a reclaimed region, even if it falls out of sync again
                // for another reason (a held mark) before the next GET_RESYNC_WORK.
                if !self.reclaimed.is_empty() {
                    self.reclaimed.retain(|&x| x != r);
                }
                self.sync_ones += 1;
            } else {
                self.sync_ones -= 1;
            }
        }
    }

    /// `r` falls out of sync because a kernel may have written it while its marks were lost
    /// or held: torn if it was in sync (a raw region stays raw).
    fn tear(&mut self, r: u64) {
        if self.sync.get(r) {
            self.set_sync(r, false);
            self.torn.set(r, true);
        }
    }

    fn check_all(&self, regions: &[u64]) -> Result<(), Refusal> {
        regions.iter().try_for_each(|&r| self.check(r))
    }

    fn disown(&mut self, r: u64) {
        if let Some(n) = self.owners.get_mut(&r) {
            *n -= 1;
            if *n == 0 {
                self.owners.remove(&r);
            }
        }
    }

    /// The node's kernel is dead: every region it marked may differ between the legs (a write
    /// may have reached one leg only), and so may the region it was recovering. They go out of
    /// sync and to the front of the resync queue; its share is removed.
    fn reclaim(&mut self, node: NodeId) {
        let Some(share) = self.nodes.remove(&node) else { return };
        if let Some(r) = share.slot {
            self.recovering.remove(&r);
        }
        for &r in &share.marks {
            self.disown(r);
        }
        let slot_only = share.slot.filter(|r| !share.marks.contains(r));
        for r in share.marks.iter().copied().chain(slot_only) {
            self.tear(r);
            self.search_from = self.search_from.min(r);
            if !self.reclaimed.contains(&r) {
                self.reclaimed.push_back(r);
            }
        }
    }

    fn is_free(&self, r: u64) -> bool {
        !self.sync.get(r) && !self.owners.contains_key(&r) && !self.recovering.contains_key(&r)
    }

    /// Whether only torn regions are free to hand out (none raw, none waited for): the work a
    /// kernel that saw the log in sync never asks for. While a raw region is out of sync the
    /// hint stays below it and kernels keep asking; a suspend then could also wait for ever on
    /// a write the kernel requeues while it is "recovering" (presuspend stops recovery).
    pub fn free_work_is_torn_only(&self) -> bool {
        if !self.wanted.is_empty() {
            return false;
        }
        let mut next = self.sync.next_zero(self.search_from);
        let mut any = false;
        while let Some(r) = next {
            if self.is_raw(r) {
                return false;
            }
            any |= self.is_free(r);
            next = self.sync.next_zero(r + 1);
        }
        any
    }

    /// The region to hand out next: the oldest free reclaimed region, else the lowest free
    /// out-of-sync one. Free: out of sync, marked by no node (a live writer's region is never
    /// recovered under it; a held node's may be torn and waits for its reclaim), in no slot.
    fn next_work(&mut self) -> Option<u64> {
        self.reclaimed.retain(|&r| !self.sync.get(r));
        if let Some(&r) = self.reclaimed.iter().find(|&&r| self.is_free(r)) {
            return Some(r);
        }
        self.wanted.retain(|&r| !self.sync.get(r));
        if let Some(&r) = self.wanted.iter().find(|&&r| self.is_free(r)) {
            return Some(r);
        }
        let mut r = self.sync.next_zero(self.search_from)?;
        self.search_from = r;
        loop {
            if self.is_free(r) {
                return Some(r);
            }
            r = self.sync.next_zero(r + 1)?;
        }
    }

    /// A digest of the replicated state (not of derived fields): members compare it at the
    /// same point of the ordered history to detect divergence. FNV-1a over [`Self::encode`].
    pub fn digest(&self) -> u64 {
        super::wire::fnv1a(&self.encode())
    }

    /// The state as bytes, for a joiner (the transport cuts it into atomic chunks) and for
    /// [`Self::digest`]. Little-endian, versioned: magic, version, region count, sync bitmap,
    /// torn bitmap, nodes (id, incarnation, live, slot, slot voided, marks), reclaim queue,
    /// disk writer, wanted queue.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.sync.words().len() * 8);
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.region_count().to_le_bytes());
        for w in self.sync.words() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for w in self.torn.words() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&(self.nodes.len() as u64).to_le_bytes());
        for (&id, s) in &self.nodes {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&s.incarnation.to_le_bytes());
            out.push(u8::from(s.live));
            out.extend_from_slice(&s.slot.unwrap_or(u64::MAX).to_le_bytes());
            out.push(u8::from(s.slot_voided));
            out.extend_from_slice(&(s.marks.len() as u64).to_le_bytes());
            for r in &s.marks {
                out.extend_from_slice(&r.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.reclaimed.len() as u64).to_le_bytes());
        for r in &self.reclaimed {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&self.writer.unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&(self.wanted.len() as u64).to_le_bytes());
        for r in &self.wanted {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out
    }

    /// Decodes [`Self::encode`]'s bytes; every length and region is checked.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut rd = super::wire::Reader(bytes);
        if rd.take(4)? != SNAPSHOT_MAGIC {
            return Err(SnapshotError::Magic);
        }
        let version = u32::from_le_bytes(rd.array()?);
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(version));
        }
        let count = rd.u64()?;
        let words = usize::try_from(count.div_ceil(64)).map_err(|_| SnapshotError::Truncated)?;
        if rd.0.len() / 8 < words {
            return Err(SnapshotError::Truncated);
        }
        let mut log = Self::new(count, false).map_err(|_| SnapshotError::NoMemory(count))?;
        let image = rd.take(words * 8)?;
        log.sync.load_le_bytes(image);
        log.sync_ones = log.sync.count_ones();
        // load_le_bytes clears bits beyond the count: a snapshot that had any is not ours.
        if log.sync.words().iter().flat_map(|w| w.to_le_bytes()).ne(image.iter().copied()) {
            return Err(SnapshotError::Inconsistent("sync bit beyond the region count"));
        }
        if rd.0.len() / 8 < words {
            return Err(SnapshotError::Truncated);
        }
        let torn = rd.take(words * 8)?;
        log.torn.load_le_bytes(torn);
        if log.torn.words().iter().flat_map(|w| w.to_le_bytes()).ne(torn.iter().copied())
            || log.torn.words().iter().zip(log.sync.words()).any(|(t, s)| t & s != 0)
        {
            return Err(SnapshotError::Inconsistent("torn bit beyond the count or on an in-sync region"));
        }
        let region = |r: u64| if r < count { Ok(r) } else { Err(SnapshotError::Inconsistent("region out of range")) };
        let nodes = rd.u64()?;
        for _ in 0..nodes {
            let id = u32::from_le_bytes(rd.array()?);
            let incarnation = u128::from_le_bytes(rd.array()?);
            let live = match rd.take(1)?[0] {
                0 => false,
                1 => true,
                _ => return Err(SnapshotError::Inconsistent("live flag")),
            };
            let slot = match rd.u64()? {
                u64::MAX => None,
                r => Some(region(r)?),
            };
            let slot_voided = match rd.take(1)?[0] {
                0 => false,
                1 if slot.is_some() => true,
                _ => return Err(SnapshotError::Inconsistent("slot voided flag")),
            };
            let mut share = NodeShare { incarnation, live, marks: BTreeSet::new(), slot, slot_voided };
            let n = rd.u64()?;
            if rd.0.len() as u64 / 8 < n {
                return Err(SnapshotError::Truncated);
            }
            for _ in 0..n {
                let r = region(rd.u64()?)?;
                if !share.marks.insert(r) {
                    return Err(SnapshotError::Inconsistent("a mark twice"));
                }
                *log.owners.entry(r).or_insert(0) += 1;
            }
            if let Some(r) = slot {
                if log.recovering.insert(r, id).is_some() {
                    return Err(SnapshotError::Inconsistent("a region in two slots"));
                }
            }
            if log.nodes.insert(id, share).is_some() {
                return Err(SnapshotError::Inconsistent("a node twice"));
            }
        }
        let n = rd.u64()?;
        if rd.0.len() as u64 / 8 < n {
            return Err(SnapshotError::Truncated);
        }
        for _ in 0..n {
            let r = region(rd.u64()?)?;
            log.reclaimed.push_back(r);
        }
        log.writer = match u32::from_le_bytes(rd.array()?) {
            u32::MAX => None,
            w if log.nodes.contains_key(&w) => Some(w),
            _ => return Err(SnapshotError::Inconsistent("disk writer not a node of the log")),
        };
        let n = rd.u64()?;
        if rd.0.len() as u64 / 8 < n {
            return Err(SnapshotError::Truncated);
        }
        for _ in 0..n {
            let r = region(rd.u64()?)?;
            log.wanted.push_back(r);
        }
        if !rd.0.is_empty() {
            return Err(SnapshotError::Trailing(rd.0.len()));
        }
        Ok(log)
    }
}

impl NodeShare {
    fn new(incarnation: Incarnation) -> Self {
        Self { incarnation, live: true, marks: BTreeSet::new(), slot: None, slot_voided: false }
    }
}

impl From<super::wire::Truncated> for SnapshotError {
    fn from(_: super::wire::Truncated) -> Self {
        SnapshotError::Truncated
    }
}

#[cfg(test)]
mod tests;
