//! `DirtyLog`: the state of one log and the semantics of every request that touches it.
//!
//! Pure state, no I/O: the server calls it under the log's mutex, the persister takes
//! snapshots of it. Two bitmaps, as in the kernel's dm-log.c:
//!
//! * `clean`: no writes outstanding (MARK clears the bit, CLEAR sets it). This is the bitmap
//!   that goes to disk for persistent logs, so it also carries "needs resync": a region that is
//!   not in sync is never clean (CLEAR only sets the bit of an in-sync region, as cmirrord does,
//!   and SET_REGION_SYNC(0) clears it), and a reload treats every unclean region as out of sync.
//! * `sync`: the legs hold the same data.
//!
//! Semantics are those of protocol.md §2 for a single node, with cmirrord's defects fixed
//! (range checks, 0/1 answers, counts bounded by region_count). Where cmirrord's behaviour
//! exists only for clusters it is replaced by the single-node truth: IS_REMOTE_RECOVERING
//! answers "not recovering" (there is no remote node; the kernel's own logs answer the same by
//! not implementing it) with an in-sync hint of `region_count - 1` while resync work remains
//! and `region_count` once none does before the next RESUME, so the kernel throttles writes to
//! at most the last region and keeps asking for resync work exactly while there is some
//! (see [`DirtyLog::remote_recovering`]).
//!
//! Durability bookkeeping (`Tracker`, persistent logs only): each change to a bit that must
//! reach the disk marks the 4 KiB image block holding it; a change that makes a region dirty
//! (or out of sync) also bumps `dirty_gen`. The persister copies the marked blocks, writes
//! them, and records the `dirty_gen` it wrote as `durable_gen`. A request that needs its marks
//! on stable storage is answered once `durable_gen >= dirty_gen` as seen after its change.
//! Clean-going changes (CLEAR) mark blocks without bumping `dirty_gen`: losing one costs a
//! region's resync, never data, so they ride along with the next write.
//!
//! Clean bits and the legs' caches (dm-log.c `disk_flush`): the tracker also records whether
//! the marked blocks carry clean-going changes (`clean_going`, the kernel's `touched_cleaned`),
//! and the snapshot says so, so the persister flushes the mirror legs before writing it
//! (`crate::region_log::legs`). If that flush fails, [`DirtyLog::legs_flush_failed`] does what dm-log.c does
//! when `flush_callback_fn` fails: it sets `flush_failed`, makes every region dirty (the write
//! then carries no clean bit), and from then on CLEAR is ignored (`core_clear_region` tests
//! `flush_failed`), for the rest of the log's life: as in the kernel, neither a suspend/resume
//! nor a reload of the image resets it; a table reload constructs a new log, which starts
//! without it.

use thiserror::Error;

use crate::region_log::bitmap::RegionBitmap;
use crate::region_log::ctr::{CtrArgs, SyncMode};
use crate::region_log::disk_format::{self, LoadOutcome, BITMAP_OFFSET};

/// The unit the persister writes: one page, a multiple of every logical block size in use.
pub const IMAGE_BLOCK: usize = 4096;

/// Why a request on a log failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LogError {
    /// A region number at or beyond region_count.
    #[error("region {region} out of range (log has {count} regions)")]
    RegionOutOfRange {
        /// The region asked for.
        region: u64,
        /// region_count.
        count: u64,
    },
    /// Payload of the wrong size for the request.
    #[error("payload of {0} bytes has the wrong size for this request")]
    BadPayload(usize),
    /// A state-changing request before the first RESUME or after POSTSUSPEND.
    #[error("log is not resumed")]
    NotResumed,
    /// Out of memory for the bitmaps.
    #[error("cannot allocate bitmaps for {0} regions")]
    NoMemory(u64),
}

impl LogError {
    /// The errno the kernel gets back.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NoMemory(_) => libc::ENOMEM,
            _ => libc::EINVAL,
        }
    }
}

/// Where the log is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Constructed, never resumed (the inactive table of a reload, or a mirror being created).
    Constructed,
    /// Live.
    Resumed,
    /// Suspended after having been live.
    Suspended,
}

impl Phase {
    /// Stable lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Constructed => "constructed",
            Self::Resumed => "resumed",
            Self::Suspended => "suspended",
        }
    }
}

/// Durability bookkeeping of a persistent log.
#[derive(Debug)]
struct Tracker {
    /// Image blocks changed since the last snapshot, one bit each.
    changed: Vec<u64>,
    any_changed: bool,
    dirty_gen: u64,
    durable_gen: u64,
    /// The changed blocks carry clean-going changes (a CLEAR set a clean bit since the last
    /// snapshot): dm-log.c's `touched_cleaned`. Their write must follow a flush of the legs.
    clean_going: bool,
}

impl Tracker {
    fn mark_block_of(&mut self, region: u64) {
        let block = (BITMAP_OFFSET + (region / 8) as usize) / IMAGE_BLOCK;
        self.changed[block / 64] |= 1 << (block % 64);
        self.any_changed = true;
    }

    /// Every one of the image's `blocks` changed.
    fn mark_all(&mut self, blocks: usize) {
        self.changed.fill(0);
        for b in 0..blocks {
            self.changed[b / 64] |= 1 << (b % 64);
        }
        self.any_changed = true;
    }
}

/// A set of image blocks to write, produced by [`DirtyLog::snapshot`].
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `dirty_gen` the copied bits reflect.
    pub gen: u64,
    /// Runs of consecutive blocks, as (first block, block count).
    pub runs: Vec<(usize, usize)>,
    /// The blocks carry clean bits set since the last snapshot: the mirror legs must be
    /// flushed before they are written (dm-log.c flushes them when `touched_cleaned`).
    pub clean_going: bool,
}

/// The state of one log.
#[derive(Debug)]
pub struct DirtyLog {
    region_size: u64,
    region_count: u64,
    sync_mode: SyncMode,
    clean: RegionBitmap,
    sync: RegionBitmap,
    sync_count: u64,
    /// Region handed out by GET_RESYNC_WORK and not yet reported by SET_REGION_SYNC.
    recovering: Option<u64>,
    resync_cursor: u64,
    recovery_halted: bool,
    phase: Phase,
    tracker: Option<Tracker>,
    image_blocks: usize,
    /// Regions to record out of sync at the next RESUME (`out_of_sync_at_resume`).
    out_of_sync_at_resume: Vec<u64>,
    /// Every region, at the next RESUME.
    all_out_of_sync_at_resume: bool,
    /// How the next load treats the device's image.
    next_load: LoadRule,
    /// A flush of the mirror legs failed: every region was made dirty and CLEAR is ignored
    /// (dm-log.c's `flush_failed`).
    legs_flush_failed: bool,
}

/// How the next load of a persistent log (its RESUME) treats the image on its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadRule {
    /// A table resume: the table's `sync` / `nosync` re-initialise the log, as the kernel's
    /// `disk_resume` does at every resume of a table that says them.
    Table,
    /// The kernel's reconnect loop (CTR in its NUL-terminated form, then RESUME, after it lost
    /// the server): the image is loaded as it is, whatever the table says. The kernel applies
    /// `sync`/`nosync` only at a real table resume; its region hash still holds regions dirty
    /// that it will never mark again, and their bits must survive.
    Reconnect,
    /// A state file left behind by an earlier mirror with the same uuid: ignored, the log
    /// starts as a new one (every region out of sync, or in sync with `nosync`).
    StartOver,
}

/// What GET_RESYNC_WORK answers: `Some(region)` to recover, `None` for no work.
pub type ResyncWork = Option<u64>;

impl DirtyLog {
    /// A new log as CTR creates it: every region clean, in sync only with `nosync`.
    /// `persistent` logs track what must reach the disk.
    pub fn new(args: &CtrArgs, persistent: bool) -> Result<Self, LogError> {
        let count = args.region_count();
        let nosync = args.sync == SyncMode::NoSync;
        let clean = RegionBitmap::try_new(count, true).map_err(|_| LogError::NoMemory(count))?;
        let sync = RegionBitmap::try_new(count, nosync).map_err(|_| LogError::NoMemory(count))?;
        let image_blocks = disk_format::image_len(count, IMAGE_BLOCK) / IMAGE_BLOCK;
        let tracker = persistent.then(|| Tracker {
            changed: vec![0; image_blocks.div_ceil(64)],
            any_changed: false,
            dirty_gen: 0,
            durable_gen: 0,
            clean_going: false,
        });
        Ok(Self {
            region_size: args.region_size,
            region_count: count,
            sync_mode: args.sync,
            clean,
            sync,
            sync_count: if nosync { count } else { 0 },
            recovering: None,
            resync_cursor: 0,
            recovery_halted: false,
            phase: Phase::Constructed,
            tracker,
            image_blocks,
            out_of_sync_at_resume: Vec::new(),
            all_out_of_sync_at_resume: false,
            next_load: LoadRule::Table,
            legs_flush_failed: false,
        })
    }

    /// Sets how the next load (RESUME) of a persistent log treats its device's image; it
    /// applies to that one load, the ones after it follow the table again.
    pub fn set_next_load(&mut self, rule: LoadRule) {
        self.next_load = rule;
    }

    /// How the next load treats the image.
    pub fn next_load(&self) -> LoadRule {
        self.next_load
    }

    /// The clean bitmap (for another log of the same device, see [`Self::resume_from_image`]).
    pub fn clean_bits(&self) -> &RegionBitmap {
        &self.clean
    }

    /// Records region `r` (every region for `None`) out of sync, and not clean, at the next
    /// RESUME, after the log's state is loaded: the kernel wrote it to one leg only while the
    /// log could not tell it (an IN_SYNC it could not answer, see `LogServer`). Regions out of
    /// range are ignored (the request that named them came before the log was known).
    pub fn out_of_sync_at_resume(&mut self, r: Option<u64>) {
        match r {
            Some(r) if r < self.region_count => self.out_of_sync_at_resume.push(r),
            Some(_) => {}
            None => self.all_out_of_sync_at_resume = true,
        }
    }

    /// Region size in sectors.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// Number of regions.
    pub fn region_count(&self) -> u64 {
        self.region_count
    }

    /// Life-cycle phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// In-sync regions (never more than region_count).
    pub fn sync_count(&self) -> u64 {
        self.sync_count
    }

    /// Copies the clean and in-sync bitmap words from word `first` on (region `64 * first` up)
    /// into `clean` and `sync`, as many as both hold and exist; returns how many. For readers
    /// (the HTTP API, the metrics) that must not hold the log's mutex for longer than a copy.
    pub fn copy_words(&self, first: usize, clean: &mut [u64], sync: &mut [u64]) -> usize {
        let (c, s) = (self.clean.words(), self.sync.words());
        if first >= c.len() {
            return 0;
        }
        let n = (c.len() - first).min(clean.len()).min(sync.len());
        clean[..n].copy_from_slice(&c[first..first + n]);
        sync[..n].copy_from_slice(&s[first..first + n]);
        n
    }

    /// Regions with writes outstanding or awaiting resync (not clean).
    pub fn dirty_count(&self) -> u64 {
        self.region_count - self.clean.count_ones()
    }

    /// Whether the log keeps its state on disk.
    pub fn is_persistent(&self) -> bool {
        self.tracker.is_some()
    }

    /// Bytes the bitmaps occupy.
    pub fn heap_bytes(&self) -> usize {
        self.clean.heap_bytes() + self.sync.heap_bytes()
    }

    fn check(&self, r: u64) -> Result<u64, LogError> {
        if r < self.region_count {
            Ok(r)
        } else {
            Err(LogError::RegionOutOfRange { region: r, count: self.region_count })
        }
    }

    fn check_all(&self, regions: impl Iterator<Item = u64>) -> Result<(), LogError> {
        for r in regions {
            self.check(r)?;
        }
        Ok(())
    }

    /// Loaded at least once: after POSTSUSPEND, dm-raid1's worker may still clear regions and
    /// flush (kmirrord runs on), and failing those would raise a log failure.
    fn require_loaded(&self) -> Result<(), LogError> {
        if self.phase == Phase::Constructed {
            Err(LogError::NotResumed)
        } else {
            Ok(())
        }
    }

    fn require_resumed(&self) -> Result<(), LogError> {
        if self.phase == Phase::Resumed {
            Ok(())
        } else {
            Err(LogError::NotResumed)
        }
    }

    fn became_dirty(&mut self, r: u64) {
        if let Some(t) = &mut self.tracker {
            t.mark_block_of(r);
            t.dirty_gen += 1;
        }
    }

    fn became_clean(&mut self, r: u64) {
        if let Some(t) = &mut self.tracker {
            t.mark_block_of(r);
            t.clean_going = true;
        }
    }

    fn set_sync_bit(&mut self, r: u64, value: bool) {
        if self.sync.set(r, value) {
            if value {
                self.sync_count += 1;
            } else {
                self.sync_count -= 1;
            }
        }
    }

    /// IS_CLEAN.
    pub fn is_clean(&self, r: u64) -> Result<bool, LogError> {
        Ok(self.clean.get(self.check(r)?))
    }

    /// IN_SYNC.
    pub fn in_sync(&self, r: u64) -> Result<bool, LogError> {
        Ok(self.sync.get(self.check(r)?))
    }

    /// MARK_REGION (and the marks of an integrated FLUSH): all regions or none.
    pub fn mark(&mut self, regions: impl Iterator<Item = u64> + Clone) -> Result<(), LogError> {
        self.require_resumed()?;
        self.check_all(regions.clone())?;
        for r in regions {
            if self.clean.set(r, false) {
                self.became_dirty(r);
            }
        }
        Ok(())
    }

    /// CLEAR_REGION: a region becomes clean only if it is in sync, and never once a flush of
    /// the legs failed (dm-log.c `core_clear_region`: `if (likely(!lc->flush_failed))`).
    pub fn clear(&mut self, regions: impl Iterator<Item = u64> + Clone) -> Result<(), LogError> {
        self.require_loaded()?;
        self.check_all(regions.clone())?;
        if self.legs_flush_failed {
            return Ok(());
        }
        for r in regions {
            if self.sync.get(r) && self.clean.set(r, true) {
                self.became_clean(r);
            }
        }
        Ok(())
    }

    /// FLUSH's own check (its marks go through [`mark`](Self::mark)).
    pub fn flush(&self) -> Result<(), LogError> {
        self.require_loaded()
    }

    /// GET_RESYNC_WORK: one region at a time, the lowest unsynced one from the cursor.
    pub fn get_resync_work(&mut self) -> ResyncWork {
        if self.phase != Phase::Resumed || self.recovery_halted {
            return None;
        }
        if let Some(r) = self.recovering {
            return Some(r);
        }
        match self.sync.next_zero(self.resync_cursor) {
            Some(r) => {
                self.resync_cursor = r + 1;
                self.recovering = Some(r);
                Some(r)
            }
            None => {
                self.resync_cursor = self.region_count + 1;
                None
            }
        }
    }

    /// SET_REGION_SYNC.
    pub fn set_region_sync(&mut self, r: u64, in_sync: bool) -> Result<(), LogError> {
        self.require_resumed()?;
        self.check(r)?;
        self.recovering = None;
        self.set_sync_bit(r, in_sync);
        if !in_sync && self.clean.set(r, false) {
            self.became_dirty(r);
        }
        Ok(())
    }

    /// IS_REMOTE_RECOVERING: `(is_recovering, in_sync_hint)`.
    ///
    /// What the kernel does with the answer (dm-log-userspace-base.c): it answers 0 itself for
    /// a region below the hint; at or above it, it asks at most once per 250 ms (one timestamp
    /// shared by every userspace log) and answers 1 ("recovering") in between, and dm-raid1's
    /// `do_writes` requeues such a write on a 200 ms timer. The hint is also the kernel's only
    /// reason to stop sending GET_RESYNC_WORK (`hint >= region_count`); GET_SYNC_COUNT raises
    /// it to region_count once all is in sync, and RESUME resets it to 0. Nothing else reads it.
    ///
    /// A single node has no remote recoverer (its own recovery is guarded by the region hash's
    /// RECOVERING state, not by this call), so is_recovering is always false, and the hint is
    /// the largest that keeps resync work flowing: `region_count - 1` while GET_RESYNC_WORK
    /// still has work (a region being recovered, or an unsynced one at or after the cursor),
    /// so at most the last region's writes can be throttled; `region_count` once it has none
    /// until the next RESUME (all in sync, recovery halted by PRESUSPEND, or only regions
    /// behind the cursor left, e.g. a failed recovery), so the kernel stops asking both
    /// questions. A region that falls out of sync later (SET_REGION_SYNC(0) after a leg
    /// failure) is recovered after the next RESUME, which resets the kernel's hint and the
    /// cursor, exactly as GET_RESYNC_WORK alone would have it.
    pub fn remote_recovering(&self, r: u64) -> Result<(bool, u64), LogError> {
        self.check(r)?;
        let hint = if self.resync_work_left() { self.region_count - 1 } else { self.region_count };
        Ok((false, hint))
    }

    /// Whether GET_RESYNC_WORK would hand out a region before the next RESUME.
    fn resync_work_left(&self) -> bool {
        if self.phase != Phase::Resumed || self.recovery_halted {
            return false;
        }
        self.recovering.is_some() || self.sync.next_zero(self.resync_cursor).is_some()
    }

    /// PRESUSPEND: stop handing out resync work.
    pub fn presuspend(&mut self) {
        self.recovery_halted = true;
    }

    /// POSTSUSPEND.
    pub fn postsuspend(&mut self) {
        if self.phase == Phase::Resumed {
            self.phase = Phase::Suspended;
        }
        self.recovering = None;
    }

    /// RESUME of a log that keeps its state in memory.
    pub fn resume_in_memory(&mut self) {
        self.next_load = LoadRule::Table;
        self.phase = Phase::Resumed;
        self.recovery_halted = false;
        self.recovering = None;
        self.resync_cursor = 0;
        if std::mem::take(&mut self.all_out_of_sync_at_resume) {
            self.out_of_sync_at_resume.clear();
            self.clean.fill(false);
            self.sync.fill(false);
            self.sync_count = 0;
            if let Some(t) = &mut self.tracker {
                t.mark_all(self.image_blocks);
                t.dirty_gen += 1;
            }
        }
        for r in std::mem::take(&mut self.out_of_sync_at_resume) {
            self.set_sync_bit(r, false);
            if self.clean.set(r, false) {
                self.became_dirty(r);
            }
        }
    }

    /// RESUME of a persistent log: replace the state with the image read from its device
    /// (`None` if it could not be read), then mark the whole image for writing back.
    /// Regions not clean on disk are out of sync, as the kernel's disk log decides; how the
    /// image is read depends on [`LoadRule`] (set by the CTR before this RESUME).
    ///
    /// Nothing known to be dirty is lost to an older image:
    /// - a log that was loaded before (a suspend/resume, or the kernel's reconnect loop resuming
    ///   a live log after a lost request) keeps every region it knows to be dirty: the image is
    ///   merged with its clean bits (`clean = disk & memory`), so nothing it had not yet written
    ///   (a SET_REGION_SYNC(0), a failed write) is lost;
    /// - `others` are the clean bits of the other logs loaded on the same device (the two
    ///   tables of a reload, see `persist::SharedDevice`): their dirt is merged in the same way,
    ///   so a region one of them has not yet written as dirty is not taken as in sync.
    pub fn resume_from_image(&mut self, image: Option<&[u8]>, others: &[RegionBitmap]) -> LoadOutcome {
        let previous = (self.phase != Phase::Constructed).then(|| self.clean.clone());
        let rule = std::mem::replace(&mut self.next_load, LoadRule::Table);
        let mode = match rule {
            LoadRule::Table => self.sync_mode,
            LoadRule::Reconnect => SyncMode::Default,
            LoadRule::StartOver => self.sync_mode,
        };
        let outcome = match image {
            Some(img) if rule != LoadRule::StartOver => disk_format::load_clean_bits(img, mode, &mut self.clean),
            _ => {
                self.clean.fill(self.sync_mode == SyncMode::NoSync);
                LoadOutcome::Fresh
            }
        };
        if let Some(prev) = previous {
            self.clean.and_assign(&prev);
        }
        for other in others {
            self.clean.and_assign_prefix(other);
        }
        self.sync.copy_from(&self.clean);
        self.sync_count = self.sync.count_ones();
        self.resume_in_memory();
        if let Some(t) = &mut self.tracker {
            t.mark_all(self.image_blocks);
            t.dirty_gen += 1;
            // The write-back carries no clean bit the disk did not have (`clean = disk &
            // memory`, or sync/nosync re-initialisation, which the kernel's disk_resume writes
            // without flush_callback too).
            t.clean_going = false;
        }
        outcome
    }

    /// Clears, in the on-disk `image`, every clean bit of the blocks in `runs` that is not clean
    /// in this log: another log of the same device is writing, and no region this log holds
    /// dirty may reach the disk as clean (`persist::SharedDevice`). Bits beyond this log's
    /// region count are left alone.
    pub fn and_clean_into(&self, image: &mut [u8], runs: &[(usize, usize)]) {
        let limit = BITMAP_OFFSET + disk_format::bitset_bytes(self.region_count);
        let mut mine = [0u8; 512];
        for &(first, count) in runs {
            let from = (first * IMAGE_BLOCK).max(BITMAP_OFFSET);
            let to = ((first + count) * IMAGE_BLOCK).min(limit).min(image.len());
            let mut at = from;
            while at < to {
                let n = (to - at).min(mine.len());
                self.clean.read_le_bytes(at - BITMAP_OFFSET, &mut mine[..n]);
                for (k, (dst, &m)) in image[at..at + n].iter_mut().zip(&mine[..n]).enumerate() {
                    let first_region = ((at + k - BITMAP_OFFSET) * 8) as u64;
                    // Regions this log does not have read as clean: they are not its to veto.
                    let beyond = if first_region + 8 > self.region_count {
                        let mine_bits = self.region_count.saturating_sub(first_region) as u32;
                        0xffu8.checked_shl(mine_bits).unwrap_or(0)
                    } else {
                        0
                    };
                    *dst &= m | beyond;
                }
                at += n;
            }
        }
    }

    /// Marks the whole image for writing (another log of the device went away: blocks it kept
    /// dirty can be written as this log has them).
    pub fn rewrite_all(&mut self) {
        if self.phase == Phase::Constructed {
            return;
        }
        if let Some(t) = &mut self.tracker {
            t.mark_all(self.image_blocks);
        }
    }

    /// The `dirty_gen` a request must see durable before it is answered, or `None` if
    /// everything that must be durable already is.
    pub fn durability_needed(&self) -> Option<u64> {
        let t = self.tracker.as_ref()?;
        (t.durable_gen < t.dirty_gen).then_some(t.dirty_gen)
    }

    /// Whether anything (including clean-going changes) waits to be written.
    pub fn has_unwritten_changes(&self) -> bool {
        self.phase != Phase::Constructed && self.tracker.as_ref().is_some_and(|t| t.any_changed)
    }

    /// Whether `gen` is on disk.
    pub fn is_durable(&self, gen: u64) -> bool {
        self.tracker.as_ref().is_none_or(|t| t.durable_gen >= gen)
    }

    /// Copies every changed block into `image` (the full on-disk image, header included)
    /// and forgets the changes (until [`Self::snapshot_failed`] gives them back). Returns
    /// `None` if nothing changed, or if the log was never loaded: before its first RESUME the
    /// device's image is not the log's to write (the live table of a reload may be using it).
    pub fn snapshot(&mut self, image: &mut [u8]) -> Option<Snapshot> {
        if self.phase == Phase::Constructed {
            return None;
        }
        let t = self.tracker.as_mut()?;
        if !t.any_changed {
            return None;
        }
        let mut snap = Snapshot { gen: t.dirty_gen, runs: Vec::new(), clean_going: t.clean_going };
        let mut run: Option<(usize, usize)> = None;
        for b in 0..self.image_blocks {
            if t.changed[b / 64] & (1 << (b % 64)) == 0 {
                continue;
            }
            copy_image_block(&self.clean, self.region_count, b, image);
            run = match run {
                Some((first, len)) if first + len == b => Some((first, len + 1)),
                Some(done) => {
                    snap.runs.push(done);
                    Some((b, 1))
                }
                None => Some((b, 1)),
            };
        }
        snap.runs.extend(run);
        t.changed.fill(0);
        t.any_changed = false;
        t.clean_going = false;
        Some(snap)
    }

    /// The persister could not flush the mirror legs before writing `snap`, which carries clean
    /// bits: do what dm-log.c `disk_flush` does when `flush_callback_fn` fails. "At this point
    /// it is impossible to determine which regions are clean and which are dirty", so every
    /// region is made dirty (`flush_failed = 1`; `log_clear_bit` on every clean bit; sync bits
    /// untouched), and CLEAR is ignored from now on. `snap` and `image` are replaced by the whole
    /// image, every region dirty, so the write that follows carries no clean bit (the kernel too
    /// writes its whole log then); nothing is left to write after it.
    pub fn legs_flush_failed(&mut self, image: &mut [u8], snap: &mut Snapshot) {
        self.legs_flush_failed = true;
        self.clean.fill(false);
        let Some(t) = self.tracker.as_mut() else { return };
        t.dirty_gen += 1;
        for b in 0..self.image_blocks {
            copy_image_block(&self.clean, self.region_count, b, image);
        }
        t.changed.fill(0);
        t.any_changed = false;
        t.clean_going = false;
        *snap = Snapshot { gen: t.dirty_gen, runs: vec![(0, self.image_blocks)], clean_going: false };
    }

    /// Whether a flush of the mirror legs failed (CLEAR is ignored; every region stays dirty).
    pub fn has_legs_flush_failed(&self) -> bool {
        self.legs_flush_failed
    }

    /// The persister wrote `snap`.
    pub fn snapshot_written(&mut self, gen: u64) {
        if let Some(t) = &mut self.tracker {
            t.durable_gen = t.durable_gen.max(gen);
        }
    }

    /// The persister failed to write `snap`: its blocks must be written again.
    pub fn snapshot_failed(&mut self, snap: &Snapshot) {
        if let Some(t) = &mut self.tracker {
            // Its clean bits are still unwritten: their write still needs the legs flushed.
            t.clean_going |= snap.clean_going;
            for &(first, len) in &snap.runs {
                for b in first..first + len {
                    t.changed[b / 64] |= 1 << (b % 64);
                }
            }
            t.any_changed = true;
        }
    }
}

/// Copies image block `b` (the header in block 0, then the clean bitmap from byte 1024, zero
/// padding) from `clean` into `image`.
fn copy_image_block(clean: &RegionBitmap, region_count: u64, b: usize, image: &mut [u8]) {
    let start = b * IMAGE_BLOCK;
    let chunk = &mut image[start..start + IMAGE_BLOCK];
    // Bitmap bytes inside this block (the first block also holds the header).
    let bm_from = start.max(BITMAP_OFFSET);
    let bm_to = start + IMAGE_BLOCK;
    if b == 0 {
        chunk.fill(0);
        disk_format::Header::current(region_count).write(chunk);
    }
    let limit = BITMAP_OFFSET + disk_format::bitset_bytes(region_count);
    let out = &mut image[bm_from..bm_to];
    if bm_from < limit {
        let n = (limit - bm_from).min(out.len());
        clean.read_le_bytes(bm_from - BITMAP_OFFSET, &mut out[..n]);
        out[n..].fill(0);
    } else {
        out.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region_log::ctr::parse;

    fn log(ctr: &str, persistent: bool) -> DirtyLog {
        DirtyLog::new(&parse(ctr.as_bytes()).unwrap().args, persistent).unwrap()
    }

    #[test]
    fn resync_walks_unsynced_regions_one_at_a_time() {
        let mut l = log("8 clustered-core 2", false);
        assert_eq!(l.get_resync_work(), None, "no work before resume");
        l.resume_in_memory();
        assert_eq!(l.get_resync_work(), Some(0));
        assert_eq!(l.get_resync_work(), Some(0), "same region until reported");
        l.set_region_sync(0, true).unwrap();
        assert_eq!(l.get_resync_work(), Some(1));
        l.set_region_sync(1, true).unwrap();
        assert_eq!(l.get_resync_work(), Some(2));
        l.set_region_sync(2, false).unwrap(); // failed recovery
        assert_eq!(l.get_resync_work(), Some(3), "cursor moves on past a failed region");
        l.set_region_sync(3, true).unwrap();
        assert_eq!(l.get_resync_work(), None);
        assert_eq!(l.sync_count(), 3);
        assert_eq!(l.remote_recovering(0).unwrap(), (false, 4), "no work before the next resume");
        l.presuspend();
        assert_eq!(l.remote_recovering(0).unwrap(), (false, 4));
        l.postsuspend();
        l.resume_in_memory();
        assert_eq!(l.get_resync_work(), Some(2), "cursor restarts at resume");
    }

    /// The kernel side (dm-log-userspace-base.c `userspace_is_remote_recovering`): a region
    /// below the hint is answered 0 locally; at or above it the kernel asks at most once per
    /// 250 ms (one timestamp for all userspace logs) and answers "recovering" in between, and
    /// dm-raid1 `do_writes` requeues such writes on a 200 ms timer. `userspace_get_resync_work`
    /// sends nothing once the hint is >= region_count, `userspace_get_sync_count` raises the
    /// hint to region_count when all are in sync, `userspace_resume` resets it to 0.
    ///
    /// So a single node (no remote recoverer: local recovery is guarded by the region hash's
    /// RECOVERING state, not by this call) answers is_recovering 0 and the largest hint that
    /// keeps resync work flowing: region_count - 1 while GET_RESYNC_WORK still has work (only
    /// the last region can ever be throttled), region_count once it has none until the next
    /// RESUME (the kernel then stops asking; at RESUME it starts again from hint 0).
    #[test]
    fn remote_recovering_throttles_at_most_the_last_region_while_work_remains() {
        let mut l = log("8 clustered-core 2", false); // 4 regions
        assert_eq!(l.remote_recovering(0).unwrap(), (false, 4), "not resumed: no work to keep flowing");
        l.resume_in_memory();
        for r in 0..4 {
            assert_eq!(l.remote_recovering(r).unwrap(), (false, 3), "nothing in sync yet (region {r})");
        }
        assert_eq!(l.get_resync_work(), Some(0));
        l.set_region_sync(0, false).unwrap(); // recovery of region 0 failed: stays out of sync
        assert_eq!(l.get_resync_work(), Some(1));
        l.set_region_sync(1, true).unwrap();
        assert_eq!(l.remote_recovering(2).unwrap(), (false, 3), "regions 2 and 3 still to recover");
        assert_eq!(l.get_resync_work(), Some(2));
        l.set_region_sync(2, true).unwrap();
        assert_eq!(l.get_resync_work(), Some(3));
        assert_eq!(l.remote_recovering(3).unwrap(), (false, 3), "the last region is being recovered");
        l.set_region_sync(3, true).unwrap();
        assert_eq!(
            l.remote_recovering(1).unwrap(),
            (false, 4),
            "region 0 is out of sync, but GET_RESYNC_WORK has nothing before the next RESUME"
        );
        assert_eq!(l.get_resync_work(), None);
        // The next RESUME restarts the search (the kernel's hint restarts at 0).
        l.presuspend();
        assert_eq!(l.remote_recovering(0).unwrap(), (false, 4), "halted");
        l.postsuspend();
        l.resume_in_memory();
        assert_eq!(l.remote_recovering(3).unwrap(), (false, 3), "region 0 is work again");
        assert_eq!(l.get_resync_work(), Some(0));
        l.set_region_sync(0, true).unwrap();
        assert_eq!(l.remote_recovering(0).unwrap(), (false, 4), "all in sync");
        // A leg failure after the resync (dm-raid1 `dm_rh_mark_nosync` -> SET_REGION_SYNC(0)):
        // the kernel holds hint 4 and asks neither question until its next RESUME; after it,
        // the region is work again (and ahead of the cursor it would be work at once).
        l.set_region_sync(2, false).unwrap();
        assert_eq!(l.remote_recovering(2).unwrap(), (false, 3), "region 2 is ahead of the cursor");
        l.presuspend();
        l.postsuspend();
        l.resume_in_memory();
        assert_eq!(l.remote_recovering(0).unwrap(), (false, 3));
        assert_eq!(l.get_resync_work(), Some(2));
        l.set_region_sync(2, true).unwrap();
        l.set_region_sync(0, false).unwrap(); // behind the cursor now
        assert_eq!(l.get_resync_work(), None, "region 0 waits for the next RESUME");
        assert_eq!(l.remote_recovering(0).unwrap(), (false, 4), "so the kernel may stop asking");
    }

    #[test]
    fn nosync_vector_12a() {
        let mut l = log("2097152 clustered-core 1024 nosync", false);
        assert_eq!(l.sync_count(), 2048);
        l.resume_in_memory();
        assert_eq!(l.get_resync_work(), None);
        assert_eq!(l.remote_recovering(5).unwrap(), (false, 2048));
        assert_eq!(l.in_sync(2048), Err(LogError::RegionOutOfRange { region: 2048, count: 2048 }));
    }

    #[test]
    fn clear_needs_sync_and_marks_are_all_or_nothing() {
        let mut l = log("8 clustered-core 2", false);
        assert_eq!(l.mark([1].into_iter()), Err(LogError::NotResumed));
        l.resume_in_memory();
        l.mark([1, 2].into_iter()).unwrap();
        assert!(!l.is_clean(1).unwrap());
        assert_eq!(l.mark([0, 4].into_iter()), Err(LogError::RegionOutOfRange { region: 4, count: 4 }));
        assert!(l.is_clean(0).unwrap(), "nothing applied on error");
        l.clear([1].into_iter()).unwrap();
        assert!(!l.is_clean(1).unwrap(), "out-of-sync region stays dirty");
        l.set_region_sync(1, true).unwrap();
        l.clear([1].into_iter()).unwrap();
        assert!(l.is_clean(1).unwrap());
        assert_eq!(l.dirty_count(), 1);
    }

    #[test]
    fn clears_and_flushes_after_postsuspend_are_accepted_marks_are_not() {
        // kmirrord may still clear idle regions and flush after the log's POSTSUSPEND; failing
        // those would raise a log failure on every suspend under writes (found in the VM).
        let mut l = log("8 clustered-core 2 nosync", false);
        assert_eq!(l.clear([0].into_iter()), Err(LogError::NotResumed), "never loaded");
        l.resume_in_memory();
        l.mark([1].into_iter()).unwrap();
        l.presuspend();
        l.postsuspend();
        l.clear([1].into_iter()).unwrap();
        l.flush().unwrap();
        assert!(l.is_clean(1).unwrap());
        assert_eq!(l.mark([2].into_iter()), Err(LogError::NotResumed), "no new writes while suspended");
    }

    #[test]
    fn a_second_resume_keeps_unwritten_dirt() {
        let mut l = log("64 clustered-disk /dev/x 2", true);
        let mut image = vec![0u8; disk_format::image_len(l.region_count(), IMAGE_BLOCK)];
        l.resume_from_image(None, &[]);
        for r in 0..32 {
            l.set_region_sync(r, true).unwrap();
        }
        l.clear(0..32).unwrap();
        let s = l.snapshot(&mut image).unwrap();
        l.snapshot_written(s.gen);
        // A leg failure makes region 5 out of sync; the log is resumed again before that
        // reached the disk (the image still says clean).
        l.set_region_sync(5, false).unwrap();
        l.resume_from_image(Some(&image), &[]);
        assert!(!l.in_sync(5).unwrap(), "dirt not yet on disk survives a reload");
        assert!(l.in_sync(6).unwrap());
        assert_eq!(l.sync_count(), 31);
        // A never-loaded log (the new table of a reload) takes the image as it is.
        let mut fresh = log("64 clustered-disk /dev/x 2", true);
        fresh.resume_from_image(Some(&image), &[]);
        assert_eq!(fresh.sync_count(), 32);
    }

    #[test]
    fn durability_generations() {
        let mut l = log("1048576 clustered-disk /dev/x 2", true);
        let mut image = vec![0u8; disk_format::image_len(l.region_count(), IMAGE_BLOCK)];
        assert!(l.snapshot(&mut image).is_none(), "never loaded: may not write");
        assert_eq!(l.resume_from_image(None, &[]), LoadOutcome::Fresh);
        let all = l.snapshot(&mut image).unwrap();
        assert_eq!(all.runs, vec![(0, image.len() / IMAGE_BLOCK)]);
        assert_eq!(&image[..4], &[0x72, 0x52, 0x69, 0x4d]);
        l.snapshot_written(all.gen);
        assert_eq!(l.durability_needed(), None);
        // Mark region 40000: block (1024 + 5000) / 4096 = 1.
        l.set_region_sync(40000, true).unwrap();
        l.clear([40000].into_iter()).unwrap();
        assert_eq!(l.durability_needed(), None, "clean-going changes need no durable write");
        assert!(l.has_unwritten_changes());
        l.mark([40000].into_iter()).unwrap();
        let need = l.durability_needed().unwrap();
        let s = l.snapshot(&mut image).unwrap();
        assert_eq!(s.runs, vec![(1, 1)]);
        assert_eq!(image[1024 + 5000] & 1, 0);
        assert!(!l.is_durable(need));
        l.snapshot_failed(&s);
        let s2 = l.snapshot(&mut image).unwrap();
        assert_eq!(s2.runs, vec![(1, 1)], "failed blocks are written again");
        l.snapshot_written(s2.gen);
        assert!(l.is_durable(need));
        // After POSTSUSPEND nothing new becomes dirty.
        l.postsuspend();
        l.set_region_sync(7, false).unwrap_err();
        assert!(l.snapshot(&mut image).is_none());
    }

    #[test]
    fn load_rules() {
        let ctr = "64 clustered-disk /dev/x 2 nosync";
        let mut image = vec![0u8; disk_format::image_len(32, IMAGE_BLOCK)];
        let mut l = log(ctr, true);
        l.resume_from_image(None, &[]);
        l.mark([5].into_iter()).unwrap();
        let s = l.snapshot(&mut image).unwrap();
        l.snapshot_written(s.gen);
        // A table resume of a `nosync` table re-initialises (the kernel's disk_resume).
        let mut table = log(ctr, true);
        table.resume_from_image(Some(&image), &[]);
        assert!(table.is_clean(5).unwrap());
        // The reconnect loop's RESUME loads the image as it is: region 5 stays dirty.
        let mut reconnect = log(ctr, true);
        reconnect.set_next_load(LoadRule::Reconnect);
        reconnect.resume_from_image(Some(&image), &[]);
        assert!(!reconnect.is_clean(5).unwrap() && !reconnect.in_sync(5).unwrap());
        assert_eq!(reconnect.next_load(), LoadRule::Table, "the rule applies to one load");
        // A state file of an earlier mirror is ignored.
        let mut over = log("64 clustered-core 2", true);
        over.set_next_load(LoadRule::StartOver);
        image.fill(0xff);
        disk_format::Header::current(32).write(&mut image);
        over.resume_from_image(Some(&image), &[]);
        assert_eq!(over.sync_count(), 0);
    }

    #[test]
    fn other_logs_of_the_device_veto_clean_bits() {
        let mut image = vec![0u8; disk_format::image_len(40, IMAGE_BLOCK)];
        let mut a = log("80 clustered-disk /dev/x 2 nosync", true);
        let mut b = log("64 clustered-disk /dev/x 2 nosync", true); // 32 regions
        a.resume_from_image(None, &[]);
        b.resume_from_image(None, &[]);
        b.mark([3, 31].into_iter()).unwrap();
        let s = a.snapshot(&mut image).unwrap();
        assert_eq!(image[1024..1029], [0xff; 5]);
        b.and_clean_into(&mut image, &s.runs);
        assert_eq!(image[1024..1029], [0xf7, 0xff, 0xff, 0x7f, 0xff], "regions 32.. are not b's to veto");
        // Loading with b's bits merged: b's dirt is a's too.
        let mut c = log("80 clustered-disk /dev/x 2", true);
        c.resume_from_image(Some(&image), &[b.clean_bits().clone()]);
        assert_eq!((c.in_sync(3).unwrap(), c.in_sync(31).unwrap(), c.in_sync(35).unwrap()), (false, false, true));
    }
    /// dm-log.c sets `touched_cleaned` in `log_set_bit` (CLEAR) and `disk_flush` calls
    /// `flush_callback_fn` (the legs' flush) only when it is set; `disk_resume` writes without
    /// it. The snapshot's `clean_going` is that flag for the blocks it carries.
    #[test]
    fn snapshots_say_when_they_carry_clean_going_changes() {
        let mut l = log("64 clustered-disk /dev/x 2", true);
        let mut image = vec![0u8; disk_format::image_len(l.region_count(), IMAGE_BLOCK)];
        l.resume_from_image(None, &[]);
        let s = l.snapshot(&mut image).unwrap();
        assert!(!s.clean_going, "the resume write-back sets no new clean bit");
        l.snapshot_written(s.gen);
        for r in 0..4 {
            l.set_region_sync(r, true).unwrap();
        }
        assert!(l.snapshot(&mut image).is_none(), "sync bits alone are not written");
        l.clear([0, 1].into_iter()).unwrap();
        let s = l.snapshot(&mut image).unwrap();
        assert!(s.clean_going, "a CLEAR's write (the lazy one) needs the legs flushed");
        l.snapshot_written(s.gen);
        l.mark([1].into_iter()).unwrap();
        let s = l.snapshot(&mut image).unwrap();
        assert!(!s.clean_going, "marks only: no flush of the legs (kernel: touched_dirtied only)");
        l.snapshot_written(s.gen);
        l.clear([7].into_iter()).unwrap();
        assert!(!l.has_unwritten_changes(), "a region not in sync stays dirty: nothing to write");
        l.clear([1].into_iter()).unwrap();
        l.mark([0].into_iter()).unwrap();
        let s = l.snapshot(&mut image).unwrap();
        assert!(s.clean_going, "a MARK's write that also carries a CLEAR needs the legs flushed");
        l.snapshot_failed(&s);
        let s = l.snapshot(&mut image).unwrap();
        assert!(s.clean_going, "a failed write's clean bits still need the flush when retried");
        l.snapshot_written(s.gen);
        l.mark([1].into_iter()).unwrap();
        assert!(!l.snapshot(&mut image).unwrap().clean_going, "reset once written");
        // A resume after unwritten CLEARs: the write-back is `disk & memory`, no new clean bit.
        l.clear([3].into_iter()).unwrap();
        assert!(l.is_clean(3).unwrap());
        l.postsuspend();
        l.resume_from_image(Some(&image.clone()), &[]);
        let s = l.snapshot(&mut image).unwrap();
        assert!(!s.clean_going);
        assert!(!l.is_clean(3).unwrap(), "the CLEAR not on disk is not taken as clean by the merge");
    }

    /// dm-log.c `disk_flush` when `flush_callback_fn` fails: `flush_failed = 1`, every clean
    /// bit cleared (sync bits untouched), the log written (whole), and `core_clear_region`
    /// ignores every later clear; a resume keeps `flush_failed` (only a new log, i.e. a table
    /// reload, starts without it), and the all-dirty image it reads makes every region resync.
    #[test]
    fn a_failed_leg_flush_writes_no_clean_bit_and_clears_are_ignored_from_then_on() {
        let mut l = log("131072 clustered-disk /dev/x 2", true); // 65536 regions: 3 image blocks
        let mut image = vec![0u8; disk_format::image_len(l.region_count(), IMAGE_BLOCK)];
        let blocks = image.len() / IMAGE_BLOCK;
        assert_eq!(blocks, 3);
        l.resume_from_image(None, &[]);
        let s = l.snapshot(&mut image).unwrap();
        l.snapshot_written(s.gen);
        for r in 0..40000 {
            l.set_region_sync(r, true).unwrap();
        }
        l.clear(0..40000).unwrap();
        l.mark([5].into_iter()).unwrap();
        let need = l.durability_needed().unwrap();
        let mut s = l.snapshot(&mut image).unwrap();
        assert!(s.clean_going);
        assert!(image[BITMAP_OFFSET..BITMAP_OFFSET + 4000].iter().any(|&b| b != 0), "clean bits copied");
        // The legs' flush fails.
        l.legs_flush_failed(&mut image, &mut s);
        assert!(l.has_legs_flush_failed());
        assert_eq!(s.runs, vec![(0, blocks)], "the whole image is written");
        assert!(!s.clean_going);
        assert_eq!(&image[..4], &[0x72, 0x52, 0x69, 0x4d], "header intact");
        assert!(image[BITMAP_OFFSET..].iter().all(|&b| b == 0), "no clean bit in the image");
        assert_eq!(l.dirty_count(), l.region_count(), "every region dirty in memory");
        assert_eq!(l.sync_count(), 40000, "sync bits untouched, as the kernel's");
        assert!(!l.has_unwritten_changes(), "nothing left to write after it");
        l.snapshot_written(s.gen);
        assert!(l.is_durable(need), "the MARK that waited is answered by this write");
        // From now on CLEAR is ignored (range still checked), MARK works.
        l.clear([10].into_iter()).unwrap();
        assert!(!l.is_clean(10).unwrap());
        assert!(!l.has_unwritten_changes());
        assert!(l.clear([1 << 20].into_iter()).is_err());
        l.mark([11].into_iter()).unwrap();
        // A suspend/resume reads the all-dirty image: everything resyncs, the failure stays.
        l.postsuspend();
        assert!(l.snapshot(&mut image).is_none());
        l.resume_from_image(Some(&image.clone()), &[]);
        assert_eq!(l.sync_count(), 0);
        assert!(l.has_legs_flush_failed());
        l.set_region_sync(10, true).unwrap();
        l.clear([10].into_iter()).unwrap();
        assert!(!l.is_clean(10).unwrap(), "still ignored after a resume");
        // A new log over the same device (a table reload) starts without the failure.
        let mut fresh = log("131072 clustered-disk /dev/x 2", true);
        fresh.resume_from_image(Some(&image), &[]);
        fresh.set_region_sync(10, true).unwrap();
        fresh.clear([10].into_iter()).unwrap();
        assert!(fresh.is_clean(10).unwrap());
    }
}
