//! The cluster engine: runs every cluster log of this agent over the bus (one CPG group per log),
//! turning kernel requests into ordered frames and delivered frames into answers.
//!
//! # Design
//!
//! One [`Engine`] runs on the transport's thread ([`BusHandler`]); the receive thread sends it
//! [`Command`]s and reads the replicated state through each log's [`ClusterView`] (IN_SYNC,
//! IS_CLEAN, GET_SYNC_COUNT, IS_REMOTE_RECOVERING are answered locally, as cmirrord does: every
//! member holds the same state). What changes the state goes through the group's agreed order:
//!
//! - **RESUME** joins the group. The member gets the log's state (below), then multicasts
//!   `Join` with its kernel incarnation; RESUME is answered when that `Join` is delivered back.
//! - **MARK** (and FLUSH carrying marks) is answered once the frame is *stable*: applied by a
//!   second live member ([`Stability`]), so a crash of this node cannot lose it. CLEAR,
//!   GET_RESYNC_WORK and SET_REGION_SYNC are answered on their own delivery, with the answer
//!   the ordered state gives. A FLUSH waits until every earlier frame of this node is stable.
//! - **`clustered-disk`**: one member, the log's disk writer, writes the whole image to the
//!   shared device after it applies events and multicasts `Written { position }`; a MARK is
//!   answered once stable *and* covered by a `Written` (see `maybe_write_image`).
//! - **POSTSUSPEND** multicasts `Release` (the kernel's writes are done) and leaves the group.
//!
//! **State transfer, cut at a known point.** A member that joins has no state. It multicasts
//! `Hello`; the donor (the lowest member that has the state) snapshots its state when it
//! *applies* that `Hello` and sends it in atomic chunks; the joiner keeps every frame and
//! membership change delivered after its own `Hello`, installs the snapshot when its last chunk
//! arrives and replays what it kept. Total order makes the cut exact, whatever the snapshot's
//! size or the load. Every member sees the last chunk of the transfer for a joiner's latest
//! `Hello` and counts the joiner as holding the state from there on. A joiner sends `Hello`
//! again after every membership change until it holds the state (its donor may have died; a
//! duplicate transfer is ignored). If every member has sent `Hello` since the last membership
//! change, nobody holds the state: the lowest member multicasts `Genesis`, and every member
//! starts from a fresh log of the table's shape at that point (all regions out of sync unless
//! the table says `nosync`: the marks of nodes that died with the state are unknown).
//!
//! **Quorum.** Nothing is multicast without quorum: requests that need agreement are held
//! (the mirror's I/O waits; the log does not fail). A member that lost quorum (or its local
//! corosync) may have missed what the quorate side did, so its state is *stale*: when quorum
//! returns it leaves the group and joins again, getting the state by transfer; requests it had
//! sent but not answered are sent again (MARK, CLEAR and SET_REGION_SYNC are idempotent;
//! GET_RESYNC_WORK returns the slot the node already has). It never merges its own state.
//!
//! **Divergence** (a bug, memory corruption) is detected by digest checkpoints every
//! [`DIGEST_EVERY_TICKS`] seconds: a member whose state differs from the reference member's
//! leaves and joins again (see `digest_frame`).
//!
//! # Limits (not done yet)
//! - `clustered-disk`: while the disk writer is held (departed, maybe cut off and still
//!   writing), MARKs of every node wait until it is adopted, rebooted or confirmed dead.
//!   Mixing `clustered-core` and `clustered-disk` tables of one uuid is not detected.
//! - An acknowledgement proves the acker *applied* the frame. If the sender and its acker are
//!   both cut off into a minority and both crash there, the majority may lack a mark that was
//!   answered (needs >= 4 nodes and two crashes); SAFE delivery or a majority ack would close it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, error, info, warn};

use super::bus::{BusEvent, BusHandler, Member, Outbound};
use super::stability::Stability;
use super::state::{Event, Incarnation, NodeId, Outcome, ReplicatedLog};
use super::wire::{self, Assembler, Body, Frame};
use crate::region_log::bitmap::RegionBitmap;
use crate::region_log::persist::PendingReply;
use crate::wire::protocol;

/// Where commands for the engine go (its transport's command queue): false if the engine is
/// gone.
pub type CommandSink = Arc<dyn Fn(Command) -> bool + Send + Sync>;

/// Where the engine's answers to kernel requests go (the server sends them and records their
/// telemetry; tests collect them).
pub trait Replies: Send + 'static {
    /// Answers a request the receive thread handed to the engine.
    fn answer(&self, pending: &PendingReply, error: i32, payload: &[u8]);

    /// Make this node's kernel ask for resync work again: suspend and resume the mirror
    /// using the log of `group` (see [`RESTART_RECOVERY_AFTER_TICKS`]). Must not block: the
    /// suspend sends this agent requests the engine answers.
    fn restart_recovery(&self, group: &[u8]) {
        let _ = group;
    }
}

/// Ticks (seconds) a log may have recovery work that no live member recovers before the
/// lowest live member restarts its kernel's recovery.
///
/// A kernel that was told the log is fully in sync (GET_SYNC_COUNT = region count, which sets
/// its in-sync hint to the region count; any `dmsetup status` asks it) sends no GET_RESYNC_WORK
/// until its next RESUME (`userspace_get_resync_work`), and an idle mirror asks only when its
/// kmirrord runs. In a cluster regions fall out of sync later: a dead node's reclaimed marks,
/// a held node's marks, a void copy. Nothing but a RESUME resets the hint, so the lowest live
/// member suspends and resumes its mirror (`Replies::restart_recovery`): its RESUME resets the
/// hint and recovery starts. Its I/O pauses for the suspend (in-flight writes complete first).
pub const RESTART_RECOVERY_AFTER_TICKS: u32 = 5;

/// Ticks between two recovery restarts of the same log by this member.
pub const RESTART_RECOVERY_COOLDOWN_TICKS: u32 = 60;

/// The shared log device of a `clustered-disk` log, as the engine uses it (the server opens it
/// at CTR; tests pass a fake). Only the log's disk writer writes it (guarantee 8).
pub trait DiskImage: Send + std::fmt::Debug {
    /// Reads the device's image: its clean bits for the table's region count, or `None` when it
    /// holds no usable image (a new log). Blocks (called at `Genesis` only, when nobody holds
    /// the state and so nobody writes the device).
    fn read(&mut self) -> std::io::Result<Option<RegionBitmap>>;

    /// Starts writing an image of these clean bits, the state after `position` events; must
    /// not block. Completion comes back as [`Command::DiskWritten`] once the image is on
    /// stable storage (or failed).
    fn write(&mut self, clean: RegionBitmap, position: u64);
}

/// The shape of a log, from its table. Every member of a group must have the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogShape {
    /// Region count.
    pub region_count: u64,
    /// The table says `nosync`: a fresh log starts with every region in sync.
    pub in_sync: bool,
}

/// What the receive thread reads of a cluster log: the replicated state, once this member
/// holds it. Written only by the engine's thread.
#[derive(Debug, Default)]
pub struct ClusterView {
    state: Mutex<ViewState>,
    /// The state here is current: held, in a quorate group, not stale. Only then does the
    /// receive thread answer reads from it; otherwise they go to the engine and wait (a read
    /// answered from a state that is missing or outdated can send a write to one leg of a
    /// region the group holds in sync, or read a stale leg).
    serving: AtomicBool,
    /// Kernel requests waiting: for quorum or the state, or (a MARK) for a second holder or the
    /// disk writer (a gauge for the API).
    held: AtomicU64,
    /// cmirrord was seen on the group: the log is refused.
    refused: AtomicBool,
    /// The log is `clustered-disk` (its status names the disk writer).
    disk: AtomicBool,
}

#[derive(Debug, Default)]
struct ViewState {
    node: Option<NodeId>,
    log: Option<ReplicatedLog>,
    members: Vec<Member>,
}

/// One node's share of a cluster log, for status output.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    /// corosync node id.
    pub node: NodeId,
    /// Its kernel incarnation (boot id), 32 hex digits.
    pub incarnation: String,
    /// Its agent is a live member. False: departed without releasing; its marks are held
    /// until its agent comes back (same boot id) or its death is confirmed (fencing).
    pub live: bool,
    /// Regions its kernel marked and has not cleared.
    pub marked: u64,
    /// The region it is recovering.
    pub recovering: Option<u64>,
}

/// A cluster log as this member sees it, for metrics, `/api/v1` and `ulog-agent status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterLogStatus {
    /// This node's id (None until connected to corosync).
    pub node: Option<NodeId>,
    /// This member holds the replicated state (false while joining, without quorum, ...).
    pub holding: bool,
    /// Node ids of the group's current members (processes of this log's group).
    pub members: Vec<NodeId>,
    /// Kernel requests waiting for quorum, membership or the state.
    pub held_requests: u64,
    /// Refused because cmirrord serves the same mirror.
    pub refused: bool,
    /// Every node that shares the log (live or held).
    pub nodes: Vec<NodeStatus>,
    /// Regions reclaimed from dead nodes and not yet resynchronised.
    pub reclaimed: u64,
    /// In-sync regions (as GET_SYNC_COUNT answers).
    pub sync_count: u64,
    /// In-sync regions that some node marked and has not cleared (the `dirty` of
    /// `ulog_regions`; a region marked by a held node is out of sync, not dirty).
    pub dirty: u64,
    /// The node that writes the shared log device (`clustered-disk` logs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_writer: Option<NodeId>,
    /// Region count (0 until the state is held).
    pub region_count: u64,
}

impl ClusterView {
    fn lock(&self) -> MutexGuard<'_, ViewState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// IN_SYNC. Before this member holds the state: not in sync (the kernel then reads the
    /// default leg only, which is always safe).
    pub fn in_sync(&self, r: u64) -> Result<bool, i32> {
        match &self.lock().log {
            Some(l) => l.in_sync(r).map_err(|e| e.errno()),
            None => Ok(false),
        }
    }

    /// IN_SYNC as the receive thread may answer it now: `Ok(None)` while another live member
    /// copies the region (the engine answers once the copy ends, see
    /// [`ReplicatedLog::in_sync_waits`]).
    pub fn in_sync_now(&self, r: u64) -> Result<InSyncAnswer, i32> {
        let s = self.lock();
        match (&s.log, s.node) {
            (Some(l), Some(node)) if l.in_sync_waits(node, r) => Ok(InSyncAnswer::Wait),
            (Some(l), Some(node)) if l.in_sync_voids(node, r) => Ok(InSyncAnswer::VoidCopy),
            (Some(l), _) => l.kernel_in_sync(r).map(InSyncAnswer::Now).map_err(|e| e.errno()),
            (None, _) => Ok(InSyncAnswer::Now(false)),
        }
    }

    /// IS_CLEAN (false before the state is held).
    pub fn is_clean(&self, r: u64) -> Result<bool, i32> {
        match &self.lock().log {
            Some(l) => l.is_clean(r).map_err(|e| e.errno()),
            None => Ok(false),
        }
    }

    /// GET_SYNC_COUNT (0 before the state is held).
    pub fn sync_count(&self) -> u64 {
        self.lock().log.as_ref().map_or(0, ReplicatedLog::sync_count)
    }

    /// IS_REMOTE_RECOVERING: before the state is held, "recovering" with hint 0 (the kernel
    /// waits and asks again rather than writing a region another node may be copying).
    pub fn remote_recovering(&self, r: u64) -> Result<(bool, u64), i32> {
        let s = self.lock();
        match (&s.log, s.node) {
            (Some(l), Some(node)) => l.remote_recovering(node, r).map_err(|e| e.errno()),
            _ => Ok((true, 0)),
        }
    }

    /// Whether a kernel told "recovering" for raw region `r` should ask the group to copy it
    /// first ([`Command::Want`]).
    pub fn want_worth_asking(&self, r: u64) -> bool {
        self.lock().log.as_ref().is_some_and(|l| l.want_worth_asking(r))
    }

    /// Whether reads may be answered from this view now (see `serving`).
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Requests held for quorum or state.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether the log was refused (cmirrord on its group).
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// A copy of the replicated state, if held (tests).
    pub fn snapshot(&self) -> Option<ReplicatedLog> {
        self.lock().log.clone()
    }

    /// The IS_CLEAN and IN_SYNC answers of the regions from word `first` on (region `64 *
    /// first` up) as bitmap words, into `clean` and `sync`, as many as both hold and the log
    /// has (`region_count`: the table's); returns how many. Before the state is held every
    /// region reads as out of sync (as IN_SYNC answers). One lock per call, answering region by
    /// region: the HTTP API's region pages pass small chunks (the receive thread reads the view
    /// too).
    pub fn copy_words(&self, first: usize, region_count: u64, clean: &mut [u64], sync: &mut [u64]) -> usize {
        let words = region_count.div_ceil(64) as usize;
        if first >= words {
            return 0;
        }
        let n = (words - first).min(clean.len()).min(sync.len());
        let s = self.lock();
        for i in 0..n {
            let (mut c, mut y) = (0u64, 0u64);
            if let Some(log) = &s.log {
                let base = (first + i) as u64 * 64;
                for b in 0..64u64.min(region_count - base) {
                    c |= u64::from(log.is_clean(base + b) == Ok(true)) << b;
                    y |= u64::from(log.in_sync(base + b) == Ok(true)) << b;
                }
            }
            clean[i] = c;
            sync[i] = y;
        }
        n
    }

    /// A view holding `log` as member `node` of a group of `members`, with `held` requests
    /// waiting (telemetry tests: the engine is the only writer otherwise).
    #[cfg(test)]
    pub(crate) fn holding(node: NodeId, members: Vec<Member>, log: ReplicatedLog, held: u64) -> Self {
        Self {
            state: Mutex::new(ViewState { node: Some(node), log: Some(log), members }),
            serving: AtomicBool::new(true),
            held: AtomicU64::new(held),
            refused: AtomicBool::new(false),
            disk: AtomicBool::new(false),
        }
    }

    /// The log as this member sees it (walks the marks: for status, not for the request path).
    pub fn status(&self) -> ClusterLogStatus {
        let s = self.lock();
        let mut st = ClusterLogStatus {
            node: s.node,
            holding: s.log.is_some(),
            members: s.members.iter().map(|m| m.node).collect(),
            held_requests: self.held(),
            refused: self.refused(),
            ..ClusterLogStatus::default()
        };
        if let Some(log) = &s.log {
            st.nodes = log
                .nodes()
                .iter()
                .map(|(&node, share)| NodeStatus {
                    node,
                    incarnation: format!("{:032x}", share.incarnation),
                    live: share.live,
                    marked: share.marks.len() as u64,
                    recovering: share.slot,
                })
                .collect();
            st.reclaimed = log.reclaimed().count() as u64;
            if self.disk.load(Ordering::Relaxed) {
                st.disk_writer = log.disk_writer();
            }
            let marked: BTreeSet<u64> = log.nodes().values().flat_map(|n| n.marks.iter().copied()).collect();
            st.dirty = marked.into_iter().filter(|&r| log.in_sync(r) == Ok(true)).count() as u64;
            st.sync_count = log.sync_count();
            st.region_count = log.region_count();
        }
        st
    }
}

/// A kernel request that reads the replicated state, sent to the engine while the view is
/// not serving (answered once it is), or an IN_SYNC of a region another live member copies
/// (answered once the copy ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// IN_SYNC of a region.
    InSync(u64),
    /// IS_CLEAN of a region.
    IsClean(u64),
    /// GET_SYNC_COUNT.
    SyncCount,
    /// IS_REMOTE_RECOVERING of a region.
    RemoteRecovering(u64),
}

impl Read {
    /// Whether the answer must wait although the view serves.
    fn waits(self, log: &ReplicatedLog, node: NodeId) -> bool {
        matches!(self, Read::InSync(r) if log.in_sync_waits(node, r))
    }

    /// The answer from `log` as `node` sees it: (error, payload).
    fn answer(self, log: &ReplicatedLog, node: NodeId) -> (i32, Vec<u8>) {
        let flag = |r: Result<bool, super::state::Refusal>| match r {
            Ok(v) => (0, i64::from(v).to_ne_bytes().to_vec()),
            Err(e) => (e.errno(), Vec::new()),
        };
        match self {
            Read::InSync(r) => flag(log.kernel_in_sync(r)),
            Read::IsClean(r) => flag(log.is_clean(r)),
            Read::SyncCount => (0, log.sync_count().to_ne_bytes().to_vec()),
            Read::RemoteRecovering(r) => match log.remote_recovering(node, r) {
                Ok((rec, hint)) => (0, protocol::pair(u64::from(rec), hint).to_vec()),
                Err(e) => (e.errno(), Vec::new()),
            },
        }
    }
}

/// A kernel request that changes the replicated state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// MARK_REGION, or FLUSH with marks.
    Mark(Vec<u64>),
    /// CLEAR_REGION.
    Clear(Vec<u64>),
    /// GET_RESYNC_WORK.
    GetResyncWork,
    /// SET_REGION_SYNC.
    SetRegionSync(u64, bool),
    /// IN_SYNC that voids another member's copy of the region (see
    /// [`ReplicatedLog::in_sync_voids`]).
    VoidCopy(u64),
}

/// How the receive thread answers an IN_SYNC of a cluster log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InSyncAnswer {
    /// At once.
    Now(bool),
    /// Through the engine, once another member's copy of the region ends.
    Wait,
    /// Through the engine, voiding another member's copy ([`Change::VoidCopy`]).
    VoidCopy,
}

/// What the receive thread (and the operator's API) asks of the engine.
#[derive(Debug)]
pub enum Command {
    /// A CTR made a log of this group on this node (a table reload makes a second one).
    Open {
        /// The group (the dm uuid and its NUL).
        group: Vec<u8>,
        /// The table's shape.
        shape: LogShape,
        /// Where the receive thread reads the state.
        view: Arc<ClusterView>,
        /// The CTR was the kernel's reconnect (its agent restarted while it wrote).
        reconnect: bool,
        /// The shared log device of a `clustered-disk` table.
        disk: Option<Box<dyn DiskImage>>,
    },
    /// A [`DiskImage::write`] ended.
    DiskWritten {
        /// The group.
        group: Vec<u8>,
        /// The position the image covers.
        position: u64,
        /// Ok, or the negative errno of the write.
        result: Result<(), i32>,
    },
    /// RESUME: join the group, get the state, multicast `Join`.
    Resume {
        /// The group.
        group: Vec<u8>,
        /// The kernel's request.
        pending: PendingReply,
    },
    /// A request that changes the state.
    Change {
        /// The group.
        group: Vec<u8>,
        /// What.
        change: Change,
        /// The kernel's request (answered on delivery, MARK once stable).
        pending: PendingReply,
    },
    /// A read while the view is not serving: answered once it is.
    Read {
        /// The group.
        group: Vec<u8>,
        /// What.
        read: Read,
        /// The kernel's request.
        pending: PendingReply,
    },
    /// FLUSH without marks: answered once every earlier frame of this node is stable.
    Flush {
        /// The group.
        group: Vec<u8>,
        /// The kernel's request.
        pending: PendingReply,
    },
    /// POSTSUSPEND: multicast `Release`, leave the group.
    Suspend {
        /// The group.
        group: Vec<u8>,
        /// The kernel's request.
        pending: PendingReply,
    },
    /// DTR of one of this node's logs of the group.
    Close {
        /// The group.
        group: Vec<u8>,
    },
    /// This node's kernel waits to write raw region `region` (no answer owed).
    Want {
        /// The group.
        group: Vec<u8>,
        /// The region.
        region: u64,
    },
    /// The operator (or fencing) confirms that `node`'s kernel of `incarnation` is dead.
    ConfirmFenced {
        /// The group.
        group: Vec<u8>,
        /// The dead node.
        node: NodeId,
        /// Its kernel incarnation.
        incarnation: Incarnation,
    },
}

/// Counters of the engine, read by the telemetry (lock-free).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Frames multicast.
    pub frames_sent: AtomicU64,
    /// Frames delivered (all groups, all senders).
    pub frames_delivered: AtomicU64,
    /// Frames that did not decode (other than cmirrord's).
    pub frames_malformed: AtomicU64,
    /// State transfers this member sent as donor.
    pub transfers_sent: AtomicU64,
    /// Bytes of state this member sent as donor.
    pub transfer_bytes_sent: AtomicU64,
    /// State transfers this member installed.
    pub transfers_received: AtomicU64,
    /// Times every member started over from `Genesis`.
    pub geneses: AtomicU64,
    /// Times a stale member left and joined again to re-sync.
    pub resyncs_after_stale: AtomicU64,
    /// The node is quorate (0/1).
    pub quorate: AtomicU64,
    /// Logs refused because cmirrord shares their group.
    pub cmirrord_refusals: AtomicU64,
    /// Digest checkpoints this member compared with the reference member's.
    pub digest_checks: AtomicU64,
    /// Checkpoints where this member's state differed from the reference member's (it then
    /// left the group and joined again to fetch the state).
    pub digest_mismatches: AtomicU64,
    /// Times this member restarted its kernel's recovery (suspend and resume of the mirror)
    /// because work waited that no member recovered.
    pub recovery_restarts: AtomicU64,
    /// Restarts that failed (no such mirror on this node, or the suspend or resume failed).
    pub recovery_restart_failures: AtomicU64,
    /// Nanoseconds from a member's first `Hello` to the installed transfer, summed over
    /// `transfers_received` (what joining costs: the joiner's requests wait meanwhile).
    pub transfer_wait_ns: AtomicU64,
    /// Images of `clustered-disk` logs this member wrote to their log device as disk writer.
    pub disk_image_writes: AtomicU64,
    /// Such writes that failed.
    pub disk_image_write_errors: AtomicU64,
}

/// A request waiting to be multicast, or for its frame.
#[derive(Debug)]
struct Pend {
    what: PendWhat,
    reply: Option<PendingReply>,
}

#[derive(Clone, Debug)]
enum PendWhat {
    Join,
    Change(Change),
    Release,
    Flush,
    /// An event with no kernel request behind it (marks re-asserted after a re-sync).
    Event(Event),
}

enum Held {
    /// Waiting for stability of own frames up to this sequence (MARK, FLUSH).
    Stable(u64, Pend),
}

/// Whether this member holds the state.
enum Holding {
    Yes,
    No {
        /// Sequence of this member's latest `Hello` delivered back to it.
        hello: Option<u64>,
        /// Everything delivered after that `Hello`, replayed once the snapshot is installed.
        kept: Vec<Kept>,
        assembler: Assembler,
    },
}

enum Kept {
    Frame(Member, Frame),
    /// A membership change: the members after it, and who left (computed when it was
    /// delivered: at replay the member list is already the latest).
    Membership(Vec<Member>, Vec<Member>),
}

/// The state of one group on this member.
struct LogCtx {
    shape: LogShape,
    view: Arc<ClusterView>,
    /// Local logs (CTRs) of the group.
    opens: u32,
    /// A RESUME asked for membership (until POSTSUSPEND).
    wanted: bool,
    /// A membership naming this member was delivered (and it has not left since).
    in_group: bool,
    members: BTreeSet<Member>,
    /// Members that hold the state.
    holders: BTreeSet<Member>,
    /// Latest `Hello` sequence of each member without the state.
    hellos: BTreeMap<Member, u64>,
    /// Members whose `Hello` was delivered since the last membership change.
    hellos_since_change: BTreeSet<Member>,
    genesis_sent: bool,
    holding: Holding,
    /// Lost quorum or the local corosync while in the group: must leave and join again.
    stale: bool,
    log: Option<ReplicatedLog>,
    stability: Option<Stability>,
    seq: u64,
    /// Highest own Event sequence multicast.
    last_event: u64,
    /// A `Join` of this member is in flight.
    join_in_flight: bool,
    to_send: VecDeque<Pend>,
    in_flight: BTreeMap<u64, Pend>,
    waiting: Vec<Held>,
    /// Acknowledgements owed (sender node -> highest sequence), sent at idle.
    acks_owed: BTreeMap<NodeId, u64>,
    /// Events applied to `log` since the log began (the length of its history; the same on
    /// every holder, carried by state transfers).
    applied: u64,
    /// The state this member held when it lost quorum or its corosync, with its `applied`:
    /// what it saw there is re-asserted after it gets the current state (or, if nobody holds
    /// one, the longest such history becomes the log's).
    stale_state: Option<(u64, ReplicatedLog)>,
    /// Each asking member's `Hello { stale }` since the last membership change.
    hello_stale: BTreeMap<Member, u64>,
    /// Members whose `Hello` said their kernel reconnected, since the last change.
    hello_reconnected: BTreeSet<Member>,
    /// This node's kernel reconnected to this agent (see [`Body::Hello`]).
    reconnected: bool,
    /// This member's digest at each sender's latest checkpoint (`Digest { digest: 0 }`).
    checkpoints: BTreeMap<Member, u64>,
    /// Ticks since this member (the reference) last asked for a checkpoint.
    ticks_since_checkpoint: u32,
    /// Reads waiting for the view to serve.
    reads: Vec<(Read, PendingReply)>,
    /// The shared log device (`clustered-disk`).
    disk: Option<Box<dyn DiskImage>>,
    /// The image written so far covers this many events (from `Written` of the disk writer):
    /// a MARK applied at or before it is durable.
    durable: u64,
    /// Where this member's own events were applied (sequence -> position), for the MARKs and
    /// FLUSHes that wait for `durable` (disk logs).
    own_positions: BTreeMap<u64, u64>,
    /// As the disk writer: the write in flight (position, image).
    disk_in_flight: Option<(u64, RegionBitmap)>,
    /// As the disk writer: the last image written in this tenure of the role, and its position.
    disk_written: Option<(u64, RegionBitmap)>,
    /// A disk write failed: the next waits for a tick.
    disk_failed: bool,
    /// When this member first asked for the state (its first `Hello` since it last held it).
    asked_state_at: Option<std::time::Instant>,
    /// Consecutive ticks with recovery work that no live member recovers.
    unrecovered_ticks: u32,
    /// Ticks left before this member may restart its kernel's recovery again.
    restart_cooldown: u32,
}

/// The cluster engine of one agent.
pub struct Engine<R: Replies> {
    replies: R,
    incarnation: Incarnation,
    me: Option<Member>,
    max_atomic: usize,
    quorate: bool,
    logs: BTreeMap<Vec<u8>, LogCtx>,
    stats: Arc<EngineStats>,
}

/// Ticks (about a second each) between two digest checkpoints of a log.
pub const DIGEST_EVERY_TICKS: u32 = 10;

/// Bytes of a snapshot before the log's own encoding: target node and pid, the `Hello` it
/// answers, and the holder/hello tables.
const SNAPSHOT_MAGIC: [u8; 4] = *b"ULCS";

fn group_name(group: &[u8]) -> String {
    String::from_utf8_lossy(group.strip_suffix(b"\0").unwrap_or(group)).into_owned()
}

impl<R: Replies> Engine<R> {
    /// An engine for the kernel incarnation `incarnation` (this node's boot id).
    pub fn new(replies: R, incarnation: Incarnation) -> Self {
        Self {
            replies,
            incarnation,
            me: None,
            max_atomic: 0,
            quorate: false,
            logs: BTreeMap::new(),
            stats: Arc::new(EngineStats::default()),
        }
    }

    /// The engine's counters.
    pub fn stats(&self) -> Arc<EngineStats> {
        Arc::clone(&self.stats)
    }

    fn answer(&self, p: &Pend, error: i32, payload: &[u8]) {
        if let Some(r) = &p.reply {
            self.replies.answer(r, error, payload);
        }
    }

    fn send(&self, ctx: &mut LogCtx, group: &[u8], body: Body, out: &mut dyn Outbound) -> Option<u64> {
        let me = self.me?;
        ctx.seq += 1;
        let frame = Frame { sender: me.node, seq: ctx.seq, body };
        out.send(group, wire::encode(&frame));
        self.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
        Some(ctx.seq)
    }

    /// Multicasts what can be: `Hello`/`Genesis` for a member without state, `Join` for a
    /// resumed one that is not live, then the queued requests once it is.
    fn pump(&mut self, group: &[u8], out: &mut dyn Outbound) {
        let Some(mut ctx) = self.logs.remove(group) else { return };
        self.pump_ctx(&mut ctx, group, out);
        if ctx.view.refused() && ctx.in_group {
            // A refused log (cmirrord on the group, another table shape) leaves: staying, it
            // would count as a member that never holds the state, and the others' MARKs would
            // wait for it.
            out.leave(group);
            Self::reset_membership(&mut ctx);
            self.fail_all(&mut ctx, -libc::EPROTO);
        }
        self.update_serving(&mut ctx);
        ctx.view.held.store(
            (ctx.to_send.len() + ctx.in_flight.len() + ctx.reads.len() + ctx.waiting.len()) as u64,
            Ordering::Relaxed,
        );
        self.logs.insert(group.to_vec(), ctx);
    }

    /// Whether the receive thread may answer reads from the view; once it may, the reads that
    /// waited are answered from the state.
    /// Quorate, in the group, not stale, holding the state: this member's state is current.
    fn holds_current_state(&self, ctx: &LogCtx) -> bool {
        self.quorate && ctx.in_group && !ctx.stale && matches!(ctx.holding, Holding::Yes)
    }

    fn update_serving(&self, ctx: &mut LogCtx) {
        let serving = self.holds_current_state(ctx) && ctx.log.is_some() && !ctx.view.refused();
        ctx.view.serving.store(serving, Ordering::Release);
        if ctx.view.refused() {
            for (_, p) in ctx.reads.drain(..) {
                self.replies.answer(&p, -libc::EPROTO, &[]);
            }
            return;
        }
        if let (true, Some(log), Some(me)) = (serving, &ctx.log, self.me) {
            let mut waiting = Vec::new();
            for (read, p) in ctx.reads.drain(..) {
                if read.waits(log, me.node) {
                    waiting.push((read, p));
                    continue;
                }
                let (error, payload) = read.answer(log, me.node);
                self.replies.answer(&p, error, &payload);
            }
            ctx.reads = waiting;
        }
    }

    fn pump_ctx(&mut self, ctx: &mut LogCtx, group: &[u8], out: &mut dyn Outbound) {
        let Some(me) = self.me else { return };
        if !self.quorate || !ctx.in_group || ctx.stale || ctx.view.refused() {
            return;
        }
        if !matches!(ctx.holding, Holding::Yes) {
            return;
        }
        let live = ctx.log.as_ref().and_then(|l| l.nodes().get(&me.node)).is_some_and(|s| s.live);
        if !live {
            if ctx.wanted && !ctx.join_in_flight {
                // Join first: a resumed member sends nothing before its Join is delivered.
                let reply = match ctx.to_send.front() {
                    Some(Pend { what: PendWhat::Join, .. }) => ctx.to_send.pop_front().and_then(|p| p.reply),
                    _ => None,
                };
                let ev = Event::Join { node: me.node, incarnation: self.incarnation };
                if let Some(seq) = self.send(ctx, group, Body::Event(ev), out) {
                    ctx.last_event = seq;
                    ctx.join_in_flight = true;
                    ctx.in_flight.insert(seq, Pend { what: PendWhat::Join, reply });
                }
            }
            return;
        }
        while let Some(p) = ctx.to_send.pop_front() {
            let ev = match &p.what {
                PendWhat::Join => {
                    // Already live (an agent adopted its marks, or a second RESUME).
                    self.answer(&p, 0, &[]);
                    continue;
                }
                PendWhat::Flush => {
                    let upto = ctx.last_event;
                    ctx.waiting.push(Held::Stable(upto, p));
                    continue;
                }
                // The disk writer lets the role go only with no image write in flight: the next
                // writer's first image must not be overwritten by an older one landing late.
                PendWhat::Release if ctx.disk_in_flight.is_some() => {
                    ctx.to_send.push_front(p);
                    break;
                }
                PendWhat::Release => Event::Release { node: me.node },
                PendWhat::Event(ev) => ev.clone(),
                PendWhat::Change(Change::Mark(r)) => Event::Mark { node: me.node, regions: r.clone() },
                PendWhat::Change(Change::Clear(r)) => Event::Clear { node: me.node, regions: r.clone() },
                PendWhat::Change(Change::GetResyncWork) => Event::GetResyncWork { node: me.node },
                PendWhat::Change(Change::SetRegionSync(region, in_sync)) => {
                    Event::SetRegionSync { node: me.node, region: *region, in_sync: *in_sync }
                }
                PendWhat::Change(Change::VoidCopy(region)) => Event::VoidCopy { node: me.node, region: *region },
            };
            match self.send(ctx, group, Body::Event(ev), out) {
                Some(seq) => {
                    ctx.last_event = seq;
                    ctx.in_flight.insert(seq, p);
                }
                None => {
                    ctx.to_send.push_front(p);
                    break;
                }
            }
        }
        self.release_stable(ctx);
    }

    /// Answers the MARKs and FLUSHes whose frames are stable now.
    fn release_stable(&self, ctx: &mut LogCtx) {
        let Some(st) = &ctx.stability else { return };
        // A disk log's MARK (and a FLUSH after one) also waits for the image holding it to be
        // durable on the log device (the durability rule, on top of the second holder).
        let disk = ctx.disk.is_some();
        let (durable, positions) = (ctx.durable, &ctx.own_positions);
        let on_disk = |seq: u64| !disk || seq == 0 || positions.get(&seq).is_some_and(|&p| p <= durable);
        let (ready, rest): (Vec<Held>, Vec<Held>) =
            ctx.waiting.drain(..).partition(|Held::Stable(seq, _)| (*seq == 0 || st.is_stable(*seq)) && on_disk(*seq));
        ctx.waiting = rest;
        for Held::Stable(_, p) in ready {
            self.answer(&p, 0, &[]);
        }
        let oldest = ctx.waiting.iter().map(|Held::Stable(seq, _)| *seq).min().unwrap_or(u64::MAX);
        let keep_from = oldest.min(ctx.last_event);
        ctx.own_positions.retain(|&seq, _| seq >= keep_from);
    }

    /// The disk writer of a `clustered-disk` log writes the image of its state whenever it has
    /// applied events since its last image (the first write of a tenure is a full rewrite, as
    /// every write is), and says so with `Written` once it is durable. An unchanged image is
    /// not written again: the new position is announced at once.
    fn maybe_write_image(&self, ctx: &mut LogCtx, group: &[u8], out: &mut dyn Outbound) {
        let (Some(me), Some(log)) = (self.me, ctx.log.as_ref()) else { return };
        if ctx.disk.is_none() || ctx.disk_in_flight.is_some() || ctx.disk_failed {
            return;
        }
        let releasing = ctx.to_send.iter().chain(ctx.in_flight.values()).any(|p| matches!(p.what, PendWhat::Release));
        if releasing {
            // No new write once the role is being let go (see the Release in `pump_ctx`).
            return;
        }
        if !self.holds_current_state(ctx) || log.disk_writer() != Some(me.node) {
            // Not (or no longer) the writer: a later tenure starts with a full write.
            ctx.disk_written = None;
            return;
        }
        if ctx.disk_written.as_ref().is_some_and(|(p, _)| *p >= ctx.applied) {
            return;
        }
        let image = match log.clean_bitmap() {
            Ok(i) => i,
            Err(_) => {
                error!(group = %group_name(group), "no memory for the cluster log's image");
                ctx.disk_failed = true;
                return;
            }
        };
        let position = ctx.applied;
        if let Some((p, written)) = ctx.disk_written.as_mut() {
            if *written == image {
                *p = position;
                self.announce_written(ctx, group, position, out);
                return;
            }
        }
        ctx.disk_in_flight = Some((position, image.clone()));
        if let Some(d) = ctx.disk.as_mut() {
            d.write(image, position);
        }
    }

    fn announce_written(&self, ctx: &mut LogCtx, group: &[u8], position: u64, out: &mut dyn Outbound) {
        if self.quorate && ctx.in_group && !ctx.stale {
            self.send(ctx, group, Body::Written { position }, out);
        }
    }

    /// The member lost its view of the group (quorum, corosync, or it left): requests sent
    /// but not answered go back to the front of the queue, in their order.
    fn requeue(ctx: &mut LogCtx) {
        let mut again: Vec<Pend> = std::mem::take(&mut ctx.in_flight).into_values().collect();
        for Held::Stable(_, p) in ctx.waiting.drain(..) {
            again.push(p);
        }
        ctx.join_in_flight = false;
        ctx.own_positions.clear();
        for p in again.into_iter().rev() {
            ctx.to_send.push_front(p);
        }
    }

    fn reset_membership(ctx: &mut LogCtx) {
        if let (Holding::Yes, Some(log)) = (&ctx.holding, ctx.log.take()) {
            // Keep what we knew: it is re-asserted once we hold the group's state again.
            let keep = match ctx.stale_state.take() {
                Some((a, old)) if a > ctx.applied => (a, old),
                _ => (ctx.applied, log),
            };
            ctx.stale_state = Some(keep);
        }
        ctx.log = None;
        ctx.applied = 0;
        ctx.checkpoints.clear();
        ctx.hello_stale.clear();
        ctx.hello_reconnected.clear();
        ctx.in_group = false;
        ctx.members.clear();
        ctx.holders.clear();
        ctx.hellos.clear();
        ctx.hellos_since_change.clear();
        ctx.genesis_sent = false;
        ctx.holding = Holding::No { hello: None, kept: Vec::new(), assembler: Assembler::default() };
        ctx.stale = false;
        ctx.stability = None;
        ctx.acks_owed.clear();
        Self::requeue(ctx);
    }

    fn on_membership(&mut self, group: &[u8], members: Vec<Member>, joined: &[Member], out: &mut dyn Outbound) {
        let Some(me) = self.me else { return };
        let Some(mut ctx) = self.logs.remove(group) else { return };
        if joined.contains(&me) || (!ctx.in_group && members.contains(&me)) {
            Self::reset_membership(&mut ctx);
            ctx.in_group = true;
            info!(group = %group_name(group), members = members.len(), "joined the cluster log's group");
        }
        if !members.contains(&me) {
            // Our own leave, or a change seen after it.
            if ctx.in_group {
                Self::reset_membership(&mut ctx);
            }
            self.logs.insert(group.to_vec(), ctx);
            return;
        }
        let gone: Vec<Member> = ctx.members.iter().filter(|m| !members.contains(m)).copied().collect();
        if let Holding::No { hello: Some(_), kept, .. } = &mut ctx.holding {
            kept.push(Kept::Membership(members.clone(), gone.clone()));
        }
        self.apply_membership(&mut ctx, group, &members, &gone);
        if !matches!(ctx.holding, Holding::Yes) {
            // A donor may have left; ask again (a duplicate transfer is ignored).
            self.send_hello(&mut ctx, group, out);
        }
        self.logs.insert(group.to_vec(), ctx);
        self.pump(group, out);
    }

    /// The deterministic part of a membership change (also replayed by a joiner).
    fn apply_membership(&mut self, ctx: &mut LogCtx, group: &[u8], members: &[Member], gone: &[Member]) {
        ctx.members = members.iter().copied().collect();
        ctx.holders.retain(|m| ctx.members.contains(m));
        ctx.hellos.retain(|m, _| ctx.members.contains(m));
        ctx.hellos_since_change.clear();
        ctx.hello_stale.clear();
        ctx.hello_reconnected.clear();
        ctx.genesis_sent = false;
        if let (Holding::Yes, Some(log)) = (&ctx.holding, ctx.log.as_mut()) {
            for m in gone {
                // Without a Release its kernel may still write, or died mid-write: held.
                if log.nodes().get(&m.node).is_some_and(|s| s.live) {
                    let _ = log.apply(&Event::Depart { node: m.node });
                    warn!(group = %group_name(group), node = m.node, "a member left without releasing its log: its marks are held until it comes back or is fenced");
                }
            }
        }
        self.publish(ctx);
        self.holders_changed(ctx);
    }

    /// Reads stop being served and a lone member's frames stop counting as stable on their
    /// own delivery while the node has no quorum (a member cut off alone must not answer a MARK
    /// that no quorate member holds).
    fn after_quorum_change(&mut self, out: &mut dyn Outbound) {
        let groups: Vec<Vec<u8>> = self.logs.keys().cloned().collect();
        for g in groups {
            if let Some(mut ctx) = self.logs.remove(&g) {
                self.holders_changed(&mut ctx);
                self.logs.insert(g.clone(), ctx);
            }
            self.pump(&g, out);
        }
    }

    fn holders_changed(&mut self, ctx: &mut LogCtx) {
        let nodes: Vec<NodeId> = ctx.holders.iter().map(|m| m.node).collect();
        if let Some(st) = ctx.stability.as_mut() {
            st.set_others_in_group(ctx.members.len() > 1 || !self.quorate);
            for (node, seq) in st.acks_due_after_change(nodes) {
                let e = ctx.acks_owed.entry(node).or_insert(0);
                *e = (*e).max(seq);
            }
        }
        self.release_stable(ctx);
    }

    fn send_hello(&mut self, ctx: &mut LogCtx, group: &[u8], out: &mut dyn Outbound) {
        if self.quorate && ctx.in_group && !ctx.stale && !matches!(ctx.holding, Holding::Yes) {
            let stale = ctx.stale_state.as_ref().map_or(0, |(a, _)| a + 1);
            ctx.asked_state_at.get_or_insert_with(std::time::Instant::now);
            self.send(ctx, group, Body::Hello { stale, reconnected: ctx.reconnected }, out);
        }
    }

    fn publish(&self, ctx: &LogCtx) {
        let mut v = ctx.view.lock();
        v.node = self.me.map(|m| m.node);
        v.members = ctx.members.iter().copied().collect();
        v.log = match (&ctx.holding, &ctx.log) {
            (Holding::Yes, Some(l)) => Some(l.clone()),
            _ => None,
        };
    }

    fn on_delivered(&mut self, group: &[u8], from: Member, data: &[u8], out: &mut dyn Outbound) {
        self.stats.frames_delivered.fetch_add(1, Ordering::Relaxed);
        let Some(me) = self.me else { return };
        let Some(mut ctx) = self.logs.remove(group) else { return };
        if !ctx.in_group {
            self.logs.insert(group.to_vec(), ctx);
            return;
        }
        let frame = match wire::decode(data) {
            Ok(f) if f.sender == from.node => f,
            Ok(f) => {
                self.stats.frames_malformed.fetch_add(1, Ordering::Relaxed);
                warn!(group = %group_name(group), node = from.node, claimed = f.sender, "cluster frame names another sender: ignored");
                self.logs.insert(group.to_vec(), ctx);
                return;
            }
            Err(wire::WireError::Cmirrord(v)) => {
                self.refuse(&mut ctx, group, v, out);
                self.logs.insert(group.to_vec(), ctx);
                return;
            }
            Err(e) => {
                self.stats.frames_malformed.fetch_add(1, Ordering::Relaxed);
                warn!(group = %group_name(group), node = from.node, error = %e, "malformed cluster frame: ignored");
                self.logs.insert(group.to_vec(), ctx);
                return;
            }
        };
        if matches!(ctx.holding, Holding::Yes) {
            self.apply_frame(&mut ctx, group, from, frame, out);
        } else {
            self.unheld_frame(&mut ctx, group, me, from, frame, out);
        }
        self.logs.insert(group.to_vec(), ctx);
        self.pump(group, out);
    }

    /// A frame delivered to a member that does not hold the state yet.
    fn unheld_frame(
        &mut self,
        ctx: &mut LogCtx,
        group: &[u8],
        me: Member,
        from: Member,
        frame: Frame,
        out: &mut dyn Outbound,
    ) {
        match &frame.body {
            Body::Hello { stale, reconnected } => {
                ctx.hellos.insert(from, frame.seq);
                ctx.hellos_since_change.insert(from);
                ctx.hello_stale.insert(from, *stale);
                if *reconnected {
                    ctx.hello_reconnected.insert(from);
                }
                if from == me {
                    if let Holding::No { hello, kept, assembler } = &mut ctx.holding {
                        *hello = Some(frame.seq);
                        kept.clear();
                        *assembler = Assembler::default();
                    }
                    self.maybe_genesis(ctx, group, me, out);
                    return;
                }
                self.maybe_genesis(ctx, group, me, out);
            }
            Body::Genesis { region_count, in_sync, from_stale } => {
                if !ctx.members.iter().all(|m| ctx.hellos_since_change.contains(m)) {
                    // Someone got the state since the sender decided: it holds the log.
                    return;
                }
                let shape = LogShape { region_count: *region_count, in_sync: *in_sync };
                if *from_stale {
                    self.genesis_from_stale(ctx, group, me, from, *in_sync, out);
                } else {
                    self.genesis(ctx, group, shape);
                }
                return;
            }
            Body::Chunk(c) if transfer_target(c.transfer) == (me.node, low32(ctx_hello(ctx))) => {
                let c = c.clone();
                let Holding::No { assembler, .. } = &mut ctx.holding else { return };
                match assembler.push(c) {
                    Ok(None) => {}
                    Ok(Some(bytes)) => {
                        self.install(ctx, group, me, &bytes, out);
                        return;
                    }
                    Err(e) => {
                        error!(group = %group_name(group), error = %e, "state transfer damaged: leaving the group to join again");
                        out.leave(group);
                        out.join(group);
                        Self::reset_membership(ctx);
                        return;
                    }
                }
            }
            Body::Chunk(c) if c.index + 1 == c.count => {
                // Another member's transfer completed: it holds the state now, so the log is
                // not without holders (no Genesis).
                let (node, low) = transfer_target(c.transfer);
                let done: Vec<Member> = ctx
                    .hellos
                    .iter()
                    .filter(|(m, &h)| m.node == node && low32(Some(h)) == low)
                    .map(|(m, _)| *m)
                    .collect();
                for m in done {
                    ctx.hellos_since_change.remove(&m);
                }
            }
            _ => {}
        }
        if let Holding::No { hello: Some(_), kept, .. } = &mut ctx.holding {
            kept.push(Kept::Frame(from, frame));
        }
    }

    fn maybe_genesis(&mut self, ctx: &mut LogCtx, group: &[u8], me: Member, out: &mut dyn Outbound) {
        // Every member asked for the state since the last change: nobody holds it. The member
        // with the longest kept history starts the log from it (the lowest on a tie; a fresh
        // log when nobody kept one); every member computes the same choice.
        let all_asked = ctx.members.iter().all(|m| ctx.hellos_since_change.contains(m));
        if !all_asked || ctx.genesis_sent || !self.quorate {
            return;
        }
        let best = ctx
            .members
            .iter()
            .map(|m| (ctx.hello_stale.get(m).copied().unwrap_or(0), *m))
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let Some((stale, chosen)) = best else { return };
        if chosen == me {
            ctx.genesis_sent = true;
            // A kernel that reconnected may hold dirty regions it will never mark again: a
            // fresh log then starts with every region out of sync, whatever the table says.
            // From a kept history, `in_sync` says whether its sync bits still hold (no such
            // kernel); fresh, whether every region starts in sync (`nosync`, no such kernel).
            // A kept history's sync bits hold only if every node it knows is here with its
            // own agent: an absent node's kernel may have marked regions since, known only to
            // agents that are gone.
            let from_stale = stale > 0 && ctx.stale_state.is_some();
            let present: BTreeSet<NodeId> = ctx.members.iter().map(|m| m.node).collect();
            let all_known_here =
                ctx.stale_state.as_ref().is_some_and(|(_, l)| l.nodes().keys().all(|n| present.contains(n)));
            let nobody_reconnected = ctx.hello_reconnected.is_empty();
            let in_sync = if from_stale { all_known_here } else { ctx.shape.in_sync } && nobody_reconnected;
            let body = Body::Genesis { region_count: ctx.shape.region_count, in_sync, from_stale };
            self.send(ctx, group, body, out);
        }
    }

    /// `Genesis` from a kept history: its sender holds the log from there; every other member
    /// asks it for the state (a transfer cut after this frame).
    fn genesis_from_stale(
        &mut self,
        ctx: &mut LogCtx,
        group: &[u8],
        me: Member,
        from: Member,
        keep_sync: bool,
        out: &mut dyn Outbound,
    ) {
        ctx.hellos_since_change.clear();
        ctx.hello_stale.clear();
        ctx.hello_reconnected.clear();
        ctx.hellos.clear();
        if from == me {
            let Some((mut applied, mut log)) = ctx.stale_state.take() else { return };
            // Nodes live in the kept state but not in the group now left while this member
            // was not holding: their departure is applied here (their marks are held).
            let present: BTreeSet<NodeId> = ctx.members.iter().map(|m| m.node).collect();
            let gone: Vec<NodeId> =
                log.nodes().iter().filter(|(n, s)| s.live && !present.contains(n)).map(|(&n, _)| n).collect();
            for node in gone {
                let _ = log.apply(&Event::Depart { node });
                applied += 1;
            }
            if !keep_sync {
                // A member's kernel wrote while no member knew its marks: any region may differ.
                log.all_out_of_sync();
            }
            // A disk log's device may be newer than the kept history (the quorate side wrote
            // on): what it calls dirty is dirty.
            match ctx.disk.as_mut().map(|d| d.read()) {
                Some(Ok(Some(clean))) if clean.len() == log.region_count() => log.out_of_sync_unless_clean(&clean),
                Some(Err(e)) => {
                    error!(group = %group_name(group), error = %e, "cannot read the log device: every region out of sync");
                    log.all_out_of_sync();
                }
                _ => {}
            }
            ctx.durable = 0;
            ctx.disk_written = None;
            warn!(group = %group_name(group), applied, "no member held a current state: the log continues from the longest history kept (this member's), and every member adds the marks it saw");
            self.stats.geneses.fetch_add(1, Ordering::Relaxed);
            ctx.log = Some(log);
            ctx.applied = applied;
            ctx.holders = [me].into_iter().collect();
            ctx.holding = Holding::Yes;
            ctx.reconnected = false;
            ctx.stability = Some(Stability::new(me.node, [me.node]));
            if let Some(st) = ctx.stability.as_mut() {
                st.set_others_in_group(ctx.members.len() > 1 || !self.quorate);
            }
            self.publish(ctx);
        } else {
            // Transfers cut before this frame (from members that held a state then) are void:
            // ask the new holder, and take only a transfer for a Hello after this point.
            if let Holding::No { hello, kept, assembler } = &mut ctx.holding {
                *hello = None;
                kept.clear();
                *assembler = Assembler::default();
            }
            ctx.holders = [from].into_iter().collect();
            self.send_hello(ctx, group, out);
        }
    }

    fn genesis(&mut self, ctx: &mut LogCtx, group: &[u8], shape: LogShape) {
        if shape.region_count != ctx.shape.region_count {
            error!(group = %group_name(group), ?shape, ours = ?ctx.shape, "the cluster log's members have different tables: refused");
            ctx.view.refused.store(true, Ordering::Relaxed);
            self.fail_all(ctx, -libc::EINVAL);
            return;
        }
        // A disk log starts from its device's image: every MARK answered was durable there
        // before its answer, so a region the image calls clean was clean when the last writer
        // wrote it. Every member reads the same device at the same point (nobody writes it
        // now: nobody holds the state); a failed read starts every region out of sync.
        let from_disk = match ctx.disk.as_mut().map(|d| d.read()) {
            None => None,
            Some(Ok(image)) => image,
            Some(Err(e)) => {
                error!(group = %group_name(group), error = %e, "cannot read the log device: every region starts out of sync");
                RegionBitmap::try_new(shape.region_count, false).ok()
            }
        };
        let made = match from_disk.filter(|c| c.len() == shape.region_count) {
            Some(clean) => ReplicatedLog::from_clean_image(&clean),
            None => ReplicatedLog::new(shape.region_count, shape.in_sync),
        };
        let log = match made {
            Ok(l) => l,
            Err(_) => {
                error!(group = %group_name(group), regions = shape.region_count, "no memory for the cluster log");
                self.fail_all(ctx, -libc::ENOMEM);
                return;
            }
        };
        info!(group = %group_name(group), members = ctx.members.len(), in_sync = shape.in_sync, "no member held the log's state: every member starts from a fresh log");
        self.stats.geneses.fetch_add(1, Ordering::Relaxed);
        ctx.log = Some(log);
        ctx.holders = ctx.members.clone();
        ctx.hellos.clear();
        ctx.holding = Holding::Yes;
        ctx.reconnected = false;
        let me = self.me.map_or(0, |m| m.node);
        ctx.stability = Some(Stability::new(me, ctx.holders.iter().map(|m| m.node)));
        if let Some(st) = ctx.stability.as_mut() {
            st.set_others_in_group(ctx.members.len() > 1 || !self.quorate);
        }
        ctx.applied = 0;
        ctx.durable = 0;
        ctx.disk_written = None;
        self.publish(ctx);
        self.reassert_stale(ctx, group);
    }

    /// After getting the group's state, re-asserts what this member saw while the others could
    /// not: its own kernel's marks (sent after its `Join`) and the marks of nodes that are held
    /// in both states. Nothing is taken away: the merge only adds dirty regions.
    fn reassert_stale(&mut self, ctx: &mut LogCtx, group: &[u8]) {
        let (Some((_, old)), Some(me), Some(new)) = (ctx.stale_state.take(), self.me, ctx.log.as_ref()) else { return };
        let mut front = Vec::new();
        for (&node, share) in old.nodes() {
            let now = new.nodes().get(&node);
            let missing: Vec<u64> =
                share.marks.iter().copied().filter(|r| !now.is_some_and(|n| n.marks.contains(r))).collect();
            if missing.is_empty() {
                continue;
            }
            if node == me.node {
                for part in missing.chunks(wire::MAX_REGIONS) {
                    front.push(Pend { what: PendWhat::Change(Change::Mark(part.to_vec())), reply: None });
                }
            } else if now.is_some_and(|n| !n.live && n.incarnation == share.incarnation) {
                for part in missing.chunks(wire::MAX_HOLD_REGIONS) {
                    let ev = Event::HoldMarks { node, incarnation: share.incarnation, regions: part.to_vec() };
                    front.push(Pend { what: PendWhat::Event(ev), reply: None });
                }
            }
        }
        if !front.is_empty() {
            info!(group = %group_name(group), frames = front.len(), "re-asserting marks seen while out of the quorate group");
        }
        for p in front.into_iter().rev() {
            ctx.to_send.push_front(p);
        }
    }

    fn fail_all(&self, ctx: &mut LogCtx, error: i32) {
        Self::requeue(ctx);
        for p in ctx.to_send.drain(..) {
            self.answer(&p, error, &[]);
        }
    }

    fn install(&mut self, ctx: &mut LogCtx, group: &[u8], me: Member, bytes: &[u8], out: &mut dyn Outbound) {
        let parsed = decode_snapshot(bytes);
        let (target, hello, applied, seqs, holders, hellos, log) = match parsed {
            Ok(v) => v,
            Err(e) => {
                error!(group = %group_name(group), error = %e, "state transfer unreadable: leaving the group to join again");
                out.leave(group);
                out.join(group);
                Self::reset_membership(ctx);
                return;
            }
        };
        if target != me || Some(hello) != ctx_hello(ctx) {
            return;
        }
        if log.region_count() != ctx.shape.region_count {
            error!(group = %group_name(group), theirs = log.region_count(), ours = ctx.shape.region_count, "the cluster log's members have different tables: refused");
            ctx.view.refused.store(true, Ordering::Relaxed);
            self.fail_all(ctx, -libc::EINVAL);
            return;
        }
        self.stats.transfers_received.fetch_add(1, Ordering::Relaxed);
        let waited = ctx.asked_state_at.take().map_or(0, |t| t.elapsed().as_nanos() as u64);
        self.stats.transfer_wait_ns.fetch_add(waited, Ordering::Relaxed);
        info!(group = %group_name(group), bytes = bytes.len(), waited_ms = waited / 1_000_000, "installed the cluster log's state");
        // This kernel's marks are in the state now (held for it, adopted by its Join), unless
        // the log restarted without them (every agent died, and a Genesis elsewhere began
        // anew): then they are unknown, and every region goes out of sync. (A disk log's
        // restart reads the device, where every mark was durable before its write.)
        let known = log.nodes().get(&me.node).is_some_and(|s| s.incarnation == self.incarnation);
        if ctx.reconnected && !known && ctx.disk.is_none() {
            warn!(group = %group_name(group), "this kernel reconnected and the log's state holds none of its marks: every region goes out of sync");
            ctx.to_send.push_front(Pend { what: PendWhat::Event(Event::UnknownMarks { node: me.node }), reply: None });
        }
        ctx.reconnected = false;
        let kept = match std::mem::replace(&mut ctx.holding, Holding::Yes) {
            Holding::No { kept, .. } => kept,
            Holding::Yes => Vec::new(),
        };
        ctx.log = Some(log);
        ctx.applied = applied;
        ctx.durable = 0;
        ctx.disk_written = None;
        ctx.holders = holders;
        ctx.hellos = hellos;
        ctx.stability = Some(Stability::with_applied(me.node, ctx.holders.iter().map(|m| m.node), seqs));
        if let Some(st) = ctx.stability.as_mut() {
            st.set_others_in_group(ctx.members.len() > 1 || !self.quorate);
        }
        // Replay what was delivered after the cut, as a holder would have applied it. This
        // member owed no acknowledgements then (it held nothing): they are dropped.
        for k in kept {
            match k {
                Kept::Membership(members, gone) => self.apply_membership(ctx, group, &members, &gone),
                Kept::Frame(from, frame) => self.apply_frame(ctx, group, from, frame, out),
            }
        }
        ctx.acks_owed.clear();
        ctx.holders.insert(me);
        ctx.hellos.remove(&me);
        if let Some(st) = ctx.stability.as_mut() {
            st.acks_due_after_change(ctx.holders.iter().map(|m| m.node));
            // Now a holder: acknowledge what this member holds for the senders it acks (their
            // acker may have been unable to, e.g. without quorum).
            for (node, seq) in st.acks_owed() {
                ctx.acks_owed.insert(node, seq);
            }
        }
        self.publish(ctx);
        self.reassert_stale(ctx, group);
    }

    /// Applies a frame as a member that holds the state.
    fn apply_frame(&mut self, ctx: &mut LogCtx, group: &[u8], from: Member, frame: Frame, out: &mut dyn Outbound) {
        let me = self.me;
        match frame.body {
            Body::Event(ev) => {
                let Some(log) = ctx.log.as_mut() else { return };
                let result = log.apply(&ev);
                ctx.applied += 1;
                if let Some(st) = ctx.stability.as_mut() {
                    if let Some((node, seq)) = st.delivered(from.node, frame.seq) {
                        let e = ctx.acks_owed.entry(node).or_insert(0);
                        *e = (*e).max(seq);
                    }
                }
                // The view's copy takes the same event (deterministic: it stays equal), at the
                // cost of the event, not of a copy of the whole log (its bitmap) per frame.
                if let Some(view_log) = ctx.view.lock().log.as_mut() {
                    let _ = view_log.apply(&ev);
                }
                if Some(from) == me {
                    if ctx.disk.is_some() {
                        ctx.own_positions.insert(frame.seq, ctx.applied);
                    }
                    if let Some(p) = ctx.in_flight.remove(&frame.seq) {
                        self.resolved(ctx, group, frame.seq, p, result, out);
                    }
                }
            }
            Body::Written { position } => {
                // Only the writer's word counts (a former writer's frame delivered before its
                // departure is true too, but the role is what the state says now).
                if ctx.log.as_ref().and_then(ReplicatedLog::disk_writer) == Some(from.node) {
                    ctx.durable = ctx.durable.max(position);
                    self.release_stable(ctx);
                }
            }
            Body::Ack { node, seq } => {
                if let Some(st) = ctx.stability.as_mut() {
                    st.ack(from.node, node, seq);
                }
                self.release_stable(ctx);
            }
            Body::Hello { stale, .. } => {
                ctx.hellos.insert(from, frame.seq);
                ctx.hellos_since_change.insert(from);
                ctx.hello_stale.insert(from, stale);
                if Some(from) != me && ctx.holders.first().copied() == me && me.is_some() {
                    self.donate(ctx, group, from, frame.seq, out);
                }
            }
            Body::Chunk(c) => {
                if c.index + 1 == c.count {
                    let (node, low) = transfer_target(c.transfer);
                    let target =
                        ctx.hellos.iter().find(|(m, &h)| m.node == node && low32(Some(h)) == low).map(|(m, _)| *m);
                    if let Some(t) = target {
                        ctx.hellos.remove(&t);
                        ctx.hellos_since_change.remove(&t);
                        ctx.holders.insert(t);
                        self.holders_changed(ctx);
                    }
                }
            }
            Body::Genesis { .. } if me.is_some() && ctx.members.iter().all(|m| ctx.hellos_since_change.contains(m)) => {
                // Every member asked for the state since the last change, this one too (it
                // became a holder while its Hello was on the way): the rule every member
                // applies at this frame says the log starts over here. This member follows it
                // (never diverging), keeping what it held to re-assert, like a stale member.
                warn!(group = %group_name(group), "a Genesis raced this member's state transfer: starting over with the group, re-asserting the marks it held");
                if let Some(log) = ctx.log.take() {
                    ctx.stale_state = match ctx.stale_state.take() {
                        Some((a, old)) if a > ctx.applied => Some((a, old)),
                        _ => Some((ctx.applied, log)),
                    };
                }
                ctx.holding = Holding::No { hello: None, kept: Vec::new(), assembler: Assembler::default() };
                ctx.holders.clear();
                ctx.stability = None;
                ctx.acks_owed.clear();
                // What it sent and was not answered is sent again once it holds the state.
                Self::requeue(ctx);
                self.publish(ctx);
                if let Some(me) = me {
                    self.unheld_frame(ctx, group, me, from, frame, out);
                }
            }
            Body::Digest { digest } => self.digest_frame(ctx, group, from, digest, out),
            Body::Genesis { .. } => {}
        }
    }

    /// Divergence detection (guarantee 9). The reference member (the lowest holder) multicasts
    /// a checkpoint (`Digest { digest: 0 }`); every holder records its own digest where the
    /// checkpoint falls in the order, which is the same point on every member; the reference
    /// then multicasts the digest it recorded, and every holder compares. A member that
    /// differs leaves and joins again: it fetches the state and re-asserts what it saw (like a
    /// stale member), so a divergence heals without losing a mark.
    fn digest_frame(&mut self, ctx: &mut LogCtx, group: &[u8], from: Member, digest: u64, out: &mut dyn Outbound) {
        let Some(log) = &ctx.log else { return };
        if digest == 0 {
            let mine = log.digest().max(1);
            ctx.checkpoints.insert(from, mine);
            if Some(from) == self.me && self.quorate && !ctx.stale {
                self.send(ctx, group, Body::Digest { digest: mine }, out);
            }
            return;
        }
        let Some(mine) = ctx.checkpoints.remove(&from) else { return };
        if Some(from) == self.me {
            return;
        }
        self.stats.digest_checks.fetch_add(1, Ordering::Relaxed);
        if mine != digest {
            self.stats.digest_mismatches.fetch_add(1, Ordering::Relaxed);
            error!(group = %group_name(group), reference = from.node, ours = %format!("{mine:016x}"), theirs = %format!("{digest:016x}"), "this member's log state differs from the reference member's: leaving and joining again to fetch it");
            out.leave(group);
            out.join(group);
            Self::reset_membership(ctx);
            self.publish(ctx);
        }
    }

    fn resolved(
        &mut self,
        ctx: &mut LogCtx,
        group: &[u8],
        seq: u64,
        p: Pend,
        result: Result<Outcome, super::state::Refusal>,
        out: &mut dyn Outbound,
    ) {
        match (&p.what, result) {
            (_, Err(refusal)) => {
                if matches!(p.what, PendWhat::Join) {
                    ctx.join_in_flight = false;
                }
                debug!(group = %group_name(group), %refusal, "cluster request refused");
                self.answer(&p, refusal.errno(), &[]);
            }
            (PendWhat::Join, Ok(_)) => {
                ctx.join_in_flight = false;
                self.answer(&p, 0, &[]);
            }
            (PendWhat::Change(Change::Mark(_)), Ok(_)) => {
                ctx.waiting.push(Held::Stable(seq, p));
                self.release_stable(ctx);
            }
            (PendWhat::Change(Change::GetResyncWork), Ok(Outcome::ResyncWork(work))) => {
                let payload = match work {
                    Some(r) => protocol::pair(1, r),
                    None => protocol::pair(0, ctx.shape.region_count),
                };
                self.answer(&p, 0, &payload);
            }
            (PendWhat::Change(Change::VoidCopy(_)), Ok(Outcome::InSync(v))) => {
                self.answer(&p, 0, &i64::from(v).to_ne_bytes());
            }
            (PendWhat::Release, Ok(_)) => {
                self.answer(&p, 0, &[]);
                if !ctx.wanted {
                    out.leave(group);
                    Self::reset_membership(ctx);
                }
            }
            (_, Ok(_)) => self.answer(&p, 0, &[]),
        }
    }

    fn donate(&mut self, ctx: &mut LogCtx, group: &[u8], target: Member, hello: u64, out: &mut dyn Outbound) {
        let Some(log) = &ctx.log else { return };
        let seqs = ctx.stability.as_ref().map(|s| s.applied().clone()).unwrap_or_default();
        let bytes = encode_snapshot(target, hello, ctx.applied, &seqs, &ctx.holders, &ctx.hellos, log);
        let limit = if self.max_atomic == 0 { 1 << 20 } else { self.max_atomic };
        let transfer = (u64::from(target.node) << 32) | u64::from(low32(Some(hello)));
        match wire::split(transfer, &bytes, limit) {
            Ok(chunks) => {
                self.stats.transfers_sent.fetch_add(1, Ordering::Relaxed);
                self.stats.transfer_bytes_sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                info!(group = %group_name(group), node = target.node, bytes = bytes.len(), chunks = chunks.len(), "sending the cluster log's state to a joining member");
                for c in chunks {
                    self.send(ctx, group, Body::Chunk(c), out);
                }
            }
            Err(e) => error!(group = %group_name(group), error = %e, "cannot split the state transfer"),
        }
    }

    fn refuse(&mut self, ctx: &mut LogCtx, group: &[u8], version: u64, out: &mut dyn Outbound) {
        if !ctx.view.refused.swap(true, Ordering::Relaxed) {
            self.stats.cmirrord_refusals.fetch_add(1, Ordering::Relaxed);
            error!(group = %group_name(group), version, "cmirrord serves this mirror too (its message on the log's group): the log is refused and the group left; stop one of them");
        }
        out.leave(group);
        Self::reset_membership(ctx);
        self.fail_all(ctx, -libc::EPROTO);
    }

    fn command(&mut self, cmd: Command, out: &mut dyn Outbound) {
        match cmd {
            Command::Open { group, shape, view, reconnect, disk } => {
                let ctx = self.logs.entry(group.clone()).or_insert_with(|| LogCtx::new(shape, Arc::clone(&view)));
                ctx.opens += 1;
                if ctx.disk.is_none() {
                    ctx.disk = disk;
                }
                ctx.view.disk.store(ctx.disk.is_some(), Ordering::Relaxed);
                ctx.reconnected |= reconnect;
                if ctx.opens > 1 && !Arc::ptr_eq(&ctx.view, &view) {
                    // A reload: the new table's log reads the same state.
                    let state = ctx.view.lock().log.clone();
                    let node = ctx.view.lock().node;
                    {
                        let mut v = view.lock();
                        v.log = state;
                        v.node = node;
                    }
                    ctx.view = view;
                }
            }
            Command::Want { group, region } => {
                let Some(me) = self.me else { return };
                if let Some(ctx) = self.logs.get_mut(&group) {
                    let ev = Event::Want { node: me.node, region };
                    ctx.to_send.push_back(Pend { what: PendWhat::Event(ev), reply: None });
                }
                self.pump(&group, out);
            }
            Command::DiskWritten { group, position, result } => {
                let Some(mut ctx) = self.logs.remove(&group) else { return };
                let image = ctx.disk_in_flight.take().map(|(_, image)| image);
                match (result, image) {
                    (Ok(()), Some(image)) => {
                        self.stats.disk_image_writes.fetch_add(1, Ordering::Relaxed);
                        ctx.disk_written = Some((position, image));
                        self.announce_written(&mut ctx, &group, position, out);
                    }
                    (Err(e), _) => {
                        self.stats.disk_image_write_errors.fetch_add(1, Ordering::Relaxed);
                        error!(group = %group_name(&group), errno = e, "cannot write the cluster log's image to the log device: MARKs wait; retrying every second");
                        ctx.disk_written = None;
                        ctx.disk_failed = true;
                    }
                    (Ok(()), None) => {}
                }
                self.maybe_write_image(&mut ctx, &group, out);
                self.logs.insert(group.clone(), ctx);
                // A Release that waited for this write goes now.
                self.pump(&group, out);
            }
            Command::Resume { group, pending } => {
                let Some(ctx) = self.logs.get_mut(&group) else {
                    self.replies.answer(&pending, -libc::EINVAL, &[]);
                    return;
                };
                if ctx.view.refused() {
                    self.replies.answer(&pending, -libc::EPROTO, &[]);
                    return;
                }
                ctx.wanted = true;
                ctx.to_send.push_front(Pend { what: PendWhat::Join, reply: Some(pending) });
                if !ctx.in_group {
                    out.join(&group);
                }
                self.pump(&group, out);
            }
            Command::Change { group, change, pending } => self.enqueue(&group, PendWhat::Change(change), pending, out),
            Command::Flush { group, pending } => self.enqueue(&group, PendWhat::Flush, pending, out),
            Command::Read { group, read, pending } => {
                let Some(ctx) = self.logs.get_mut(&group) else {
                    self.replies.answer(&pending, -libc::ESRCH, &[]);
                    return;
                };
                ctx.reads.push((read, pending));
                self.pump(&group, out);
            }
            Command::Suspend { group, pending } => {
                if let Some(ctx) = self.logs.get_mut(&group) {
                    if !ctx.in_group && ctx.to_send.is_empty() && ctx.in_flight.is_empty() {
                        // Never joined (or already left): nothing to release.
                        ctx.wanted = false;
                        self.replies.answer(&pending, 0, &[]);
                        return;
                    }
                    ctx.wanted = false;
                }
                self.enqueue(&group, PendWhat::Release, pending, out)
            }
            Command::Close { group } => {
                let gone = match self.logs.get_mut(&group) {
                    Some(ctx) => {
                        ctx.opens = ctx.opens.saturating_sub(1);
                        ctx.opens == 0
                    }
                    None => false,
                };
                if gone {
                    if let Some(mut ctx) = self.logs.remove(&group) {
                        out.leave(&group);
                        self.fail_all(&mut ctx, -libc::ESRCH);
                        for (_, p) in ctx.reads.drain(..) {
                            self.replies.answer(&p, -libc::ESRCH, &[]);
                        }
                    }
                }
            }
            Command::ConfirmFenced { group, node, incarnation } => {
                let Some(ctx) = self.logs.get_mut(&group) else { return };
                info!(group = %group_name(&group), node, incarnation = %format!("{incarnation:032x}"), "fencing confirmed: the node's held regions will be reclaimed and resynchronised (once this member is live and quorate)");
                // Like every change: only from a live member of a quorate group.
                ctx.to_send.push_back(Pend {
                    what: PendWhat::Event(Event::FenceConfirmed { node, incarnation }),
                    reply: None,
                });
                self.pump(&group, out);
            }
        }
    }

    fn enqueue(&mut self, group: &[u8], what: PendWhat, pending: PendingReply, out: &mut dyn Outbound) {
        let Some(ctx) = self.logs.get_mut(group) else {
            self.replies.answer(&pending, -libc::ESRCH, &[]);
            return;
        };
        if ctx.view.refused() {
            self.replies.answer(&pending, -libc::EPROTO, &[]);
            return;
        }
        ctx.to_send.push_back(Pend { what, reply: Some(pending) });
        self.pump(group, out);
    }

    fn flush_acks(&mut self, out: &mut dyn Outbound) {
        let groups: Vec<Vec<u8>> =
            self.logs.iter().filter(|(_, c)| !c.acks_owed.is_empty()).map(|(g, _)| g.clone()).collect();
        for g in groups {
            let Some(mut ctx) = self.logs.remove(&g) else { continue };
            // Acknowledgements go out even without quorum: they say "applied here", which stays
            // true (a stale member re-asserts what it held when it re-syncs).
            if ctx.in_group {
                for (node, seq) in std::mem::take(&mut ctx.acks_owed) {
                    self.send(&mut ctx, &g, Body::Ack { node, seq }, out);
                }
            }
            self.logs.insert(g, ctx);
        }
    }
}

#[cfg(test)]
impl<R: Replies> Engine<R> {
    /// Publishes every log's state to its view.
    fn publish_all(&self) {
        for ctx in self.logs.values() {
            self.publish(ctx);
        }
    }

    /// Changes this member's copy of a log behind the group's back (a bug, a bit flip): what
    /// the digest comparison is for.
    fn corrupt(&mut self, group: &[u8]) {
        let Some(ctx) = self.logs.get_mut(group) else { return };
        if let Some(log) = ctx.log.as_mut() {
            let r = log.region_count() - 1;
            let v = log.in_sync(r).unwrap_or(false);
            let node = self.me.map_or(0, |m| m.node);
            let _ = log.apply(&Event::SetRegionSync { node, region: r, in_sync: !v });
        }
    }

    /// The engine's per-group bookkeeping, for a failing simulation's message.
    fn debug_state(&self) -> String {
        self.logs
            .values()
            .map(|c| {
                format!(
                    "in_group {} holding {} stale {} members {:?} holders {:?} to_send {:?} in_flight {:?} waiting {:?} stability {:?} quorate {}",
                    c.in_group,
                    matches!(c.holding, Holding::Yes),
                    c.stale,
                    c.members,
                    c.holders,
                    c.to_send.iter().map(|p| &p.what).collect::<Vec<_>>(),
                    c.in_flight.keys().collect::<Vec<_>>(),
                    c.waiting.iter().map(|Held::Stable(s, _)| *s).collect::<Vec<_>>(),
                    c.stability,
                    self.quorate
                )
            })
            .collect()
    }
}

fn ctx_hello(ctx: &LogCtx) -> Option<u64> {
    match &ctx.holding {
        Holding::No { hello, .. } => *hello,
        Holding::Yes => None,
    }
}

fn low32(seq: Option<u64>) -> u32 {
    seq.map_or(u32::MAX, |s| (s & 0xffff_ffff) as u32)
}

fn transfer_target(transfer: u64) -> (NodeId, u32) {
    ((transfer >> 32) as NodeId, (transfer & 0xffff_ffff) as u32)
}

impl LogCtx {
    fn new(shape: LogShape, view: Arc<ClusterView>) -> Self {
        Self {
            shape,
            view,
            opens: 0,
            wanted: false,
            in_group: false,
            members: BTreeSet::new(),
            holders: BTreeSet::new(),
            hellos: BTreeMap::new(),
            hellos_since_change: BTreeSet::new(),
            genesis_sent: false,
            holding: Holding::No { hello: None, kept: Vec::new(), assembler: Assembler::default() },
            stale: false,
            log: None,
            stability: None,
            seq: 0,
            last_event: 0,
            join_in_flight: false,
            to_send: VecDeque::new(),
            in_flight: BTreeMap::new(),
            waiting: Vec::new(),
            acks_owed: BTreeMap::new(),
            applied: 0,
            stale_state: None,
            hello_stale: BTreeMap::new(),
            hello_reconnected: BTreeSet::new(),
            reconnected: false,
            checkpoints: BTreeMap::new(),
            ticks_since_checkpoint: 0,
            reads: Vec::new(),
            unrecovered_ticks: 0,
            restart_cooldown: 0,
            disk: None,
            durable: 0,
            own_positions: BTreeMap::new(),
            disk_in_flight: None,
            disk_written: None,
            disk_failed: false,
            asked_state_at: None,
        }
    }
}

fn encode_snapshot(
    target: Member,
    hello: u64,
    applied: u64,
    seqs: &BTreeMap<NodeId, u64>,
    holders: &BTreeSet<Member>,
    hellos: &BTreeMap<Member, u64>,
    log: &ReplicatedLog,
) -> Vec<u8> {
    let body = log.encode();
    let mut o = Vec::with_capacity(body.len() + 64);
    o.extend_from_slice(&SNAPSHOT_MAGIC);
    o.extend_from_slice(&target.node.to_le_bytes());
    o.extend_from_slice(&target.pid.to_le_bytes());
    o.extend_from_slice(&hello.to_le_bytes());
    o.extend_from_slice(&applied.to_le_bytes());
    o.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    for (n, q) in seqs {
        o.extend_from_slice(&n.to_le_bytes());
        o.extend_from_slice(&q.to_le_bytes());
    }
    o.extend_from_slice(&(holders.len() as u32).to_le_bytes());
    for m in holders {
        o.extend_from_slice(&m.node.to_le_bytes());
        o.extend_from_slice(&m.pid.to_le_bytes());
    }
    o.extend_from_slice(&(hellos.len() as u32).to_le_bytes());
    for (m, h) in hellos {
        o.extend_from_slice(&m.node.to_le_bytes());
        o.extend_from_slice(&m.pid.to_le_bytes());
        o.extend_from_slice(&h.to_le_bytes());
    }
    o.extend_from_slice(&body);
    o
}

/// A decoded state transfer: target, the Hello it answers, events applied, sequences applied
/// per sender, holders, pending Hellos, the log.
type Decoded = (Member, u64, u64, BTreeMap<NodeId, u64>, BTreeSet<Member>, BTreeMap<Member, u64>, ReplicatedLog);

fn decode_snapshot(b: &[u8]) -> Result<Decoded, super::state::SnapshotError> {
    use super::state::SnapshotError;
    if b.get(..4) != Some(&SNAPSHOT_MAGIC[..]) {
        return Err(SnapshotError::Magic);
    }
    let mut r = wire::Reader(&b[4..]);
    let target = Member { node: r.u32()?, pid: r.u32()? };
    let hello = r.u64()?;
    let applied = r.u64()?;
    let n = r.u32()? as usize;
    if n > 1 << 16 {
        return Err(SnapshotError::Inconsistent("member count"));
    }
    let mut seqs = BTreeMap::new();
    for _ in 0..n {
        seqs.insert(r.u32()?, r.u64()?);
    }
    let n = r.u32()? as usize;
    if n > 1 << 16 {
        return Err(SnapshotError::Inconsistent("member count"));
    }
    let mut holders = BTreeSet::new();
    for _ in 0..n {
        holders.insert(Member { node: r.u32()?, pid: r.u32()? });
    }
    let n = r.u32()? as usize;
    if n > 1 << 16 {
        return Err(SnapshotError::Inconsistent("member count"));
    }
    let mut hellos = BTreeMap::new();
    for _ in 0..n {
        hellos.insert(Member { node: r.u32()?, pid: r.u32()? }, r.u64()?);
    }
    let log = ReplicatedLog::decode(r.0)?;
    Ok((target, hello, applied, seqs, holders, hellos, log))
}

impl<R: Replies> BusHandler for Engine<R> {
    type Command = Command;

    fn on_command(&mut self, cmd: Command, out: &mut dyn Outbound) {
        self.command(cmd, out);
    }

    fn on_event(&mut self, ev: BusEvent, out: &mut dyn Outbound) {
        match ev {
            BusEvent::Connected { node, pid, max_atomic } => {
                self.me = Some(Member { node, pid });
                self.max_atomic = max_atomic;
                info!(node, max_atomic, "connected to corosync");
                for (g, ctx) in &self.logs {
                    if ctx.wanted {
                        out.join(g);
                    }
                }
            }
            BusEvent::Disconnected => {
                warn!("lost the local corosync: cluster logs hold their requests until it is back and quorate");
                self.quorate = false;
                self.stats.quorate.store(0, Ordering::Relaxed);
                for ctx in self.logs.values_mut() {
                    Self::reset_membership(ctx);
                }
                self.after_quorum_change(out);
            }
            BusEvent::Quorum { quorate } => {
                let was = self.quorate;
                self.quorate = quorate;
                self.stats.quorate.store(u64::from(quorate), Ordering::Relaxed);
                if was && !quorate {
                    warn!("lost quorum: cluster logs hold every request that needs agreement");
                    for ctx in self.logs.values_mut() {
                        if ctx.in_group {
                            ctx.stale = true;
                        }
                    }
                    self.after_quorum_change(out);
                }
                if quorate && !was {
                    info!("quorate");
                    let groups: Vec<Vec<u8>> = self.logs.keys().cloned().collect();
                    for g in groups {
                        let Some(mut ctx) = self.logs.remove(&g) else { continue };
                        if ctx.stale {
                            // Our state may miss what the quorate side did: get it again.
                            self.stats.resyncs_after_stale.fetch_add(1, Ordering::Relaxed);
                            info!(group = %group_name(&g), "back in a quorate partition: leaving and joining the log's group again to get its state");
                            out.leave(&g);
                            out.join(&g);
                            Self::reset_membership(&mut ctx);
                        } else if ctx.in_group && !matches!(ctx.holding, Holding::Yes) {
                            // Joining: ask (again) for the state. Without quorum this member
                            // could neither ask after a membership change nor start the log
                            // (Genesis) when everyone had asked; its new Hello does both.
                            self.send_hello(&mut ctx, &g, out);
                        }
                        self.logs.insert(g.clone(), ctx);
                        self.pump(&g, out);
                    }
                    self.after_quorum_change(out);
                }
            }
            BusEvent::Membership { group, members, joined, .. } => self.on_membership(&group, members, &joined, out),
            BusEvent::Delivered { group, from, data } => self.on_delivered(&group, from, &data, out),
        }
    }

    fn on_tick(&mut self, out: &mut dyn Outbound) {
        let Some(me) = self.me else { return };
        if !self.quorate {
            return;
        }
        let groups: Vec<Vec<u8>> = self.logs.keys().cloned().collect();
        for g in groups {
            let Some(mut ctx) = self.logs.remove(&g) else { continue };
            let reference = matches!(ctx.holding, Holding::Yes)
                && ctx.in_group
                && !ctx.stale
                && ctx.members.len() > 1
                && ctx.holders.first() == Some(&me);
            if reference {
                ctx.ticks_since_checkpoint += 1;
                if ctx.ticks_since_checkpoint >= DIGEST_EVERY_TICKS {
                    ctx.ticks_since_checkpoint = 0;
                    self.send(&mut ctx, &g, Body::Digest { digest: 0 }, out);
                }
            }
            self.watch_recovery(&mut ctx, &g, me.node);
            if ctx.disk_failed {
                ctx.disk_failed = false;
                self.maybe_write_image(&mut ctx, &g, out);
            }
            self.logs.insert(g, ctx);
        }
    }

    fn on_idle(&mut self, out: &mut dyn Outbound) {
        self.flush_acks(out);
        let disk_groups: Vec<Vec<u8>> =
            self.logs.iter().filter(|(_, c)| c.disk.is_some()).map(|(g, _)| g.clone()).collect();
        for g in disk_groups {
            if let Some(mut ctx) = self.logs.remove(&g) {
                self.maybe_write_image(&mut ctx, &g, out);
                self.logs.insert(g, ctx);
            }
        }
    }
}

impl<R: Replies> Engine<R> {
    /// Once a tick: if the log has had recovery work that no live member recovers for
    /// [`RESTART_RECOVERY_AFTER_TICKS`] and this member is the lowest live one, restart its
    /// kernel's recovery.
    fn watch_recovery(&self, ctx: &mut LogCtx, group: &[u8], me: NodeId) {
        ctx.restart_cooldown = ctx.restart_cooldown.saturating_sub(1);
        let unrecovered = self.holds_current_state(ctx)
            && !ctx.view.refused()
            && ctx.log.as_ref().is_some_and(|log| {
                let mut live = log.nodes().iter().filter(|(_, s)| s.live);
                live.clone().next().map(|(&n, _)| n) == Some(me)
                    && live.all(|(_, s)| s.slot.is_none())
                    && log.free_work_is_torn_only()
            });
        if !unrecovered {
            ctx.unrecovered_ticks = 0;
            return;
        }
        ctx.unrecovered_ticks += 1;
        if ctx.unrecovered_ticks >= RESTART_RECOVERY_AFTER_TICKS && ctx.restart_cooldown == 0 {
            ctx.unrecovered_ticks = 0;
            ctx.restart_cooldown = RESTART_RECOVERY_COOLDOWN_TICKS;
            self.stats.recovery_restarts.fetch_add(1, Ordering::Relaxed);
            info!(group = %group_name(group),
                "recovery work waits and no member recovers it: restarting this node's mirror recovery (suspend, resume)");
            self.replies.restart_recovery(group);
        }
    }
}

#[cfg(test)]
mod tests;
