//! Reading a log's regions without holding its mutex for longer than a copy.
//!
//! The bitmaps are copied a chunk at a time ([`CHUNK_WORDS`] words of each, 256 Ki regions:
//! 64 KiB, a few microseconds under the lock) and examined outside the lock. Counts over several
//! chunks therefore mix instants a few microseconds apart, which is fine for a gauge.
//!
//! A cluster log's regions come from its replicated state ([`list_cluster`]), a smaller chunk
//! per lock: its view answers region by region.
//!
//! States are disjoint: **out_of_sync** (the legs may differ: awaiting resync), else **dirty**
//! (writes outstanding: marked and not yet cleared), else **clean**.

use std::str::FromStr;

use crate::metrics::SharedLog;

/// Words of each bitmap copied per lock.
pub const CHUNK_WORDS: usize = 4096;

/// A region's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionState {
    /// In sync, no writes outstanding.
    Clean,
    /// In sync, writes outstanding.
    Dirty,
    /// Not in sync.
    OutOfSync,
}

impl RegionState {
    /// Every state, in label order.
    pub const ALL: [RegionState; 3] = [RegionState::Clean, RegionState::Dirty, RegionState::OutOfSync];
    /// Label / JSON name.
    pub const fn name(self) -> &'static str {
        match self {
            RegionState::Clean => "clean",
            RegionState::Dirty => "dirty",
            RegionState::OutOfSync => "out_of_sync",
        }
    }
    fn of(clean: bool, in_sync: bool) -> Self {
        match (clean, in_sync) {
            (_, false) => RegionState::OutOfSync,
            (false, true) => RegionState::Dirty,
            (true, true) => RegionState::Clean,
        }
    }
    /// The bits of the regions in this state, from a word of each bitmap.
    fn select(self, clean: u64, sync: u64) -> u64 {
        match self {
            RegionState::Clean => clean & sync,
            RegionState::Dirty => !clean & sync,
            RegionState::OutOfSync => !sync,
        }
    }
}

impl FromStr for RegionState {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Self::ALL.into_iter().find(|st| st.name() == s).ok_or(())
    }
}

/// Regions per state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionCounts {
    /// In sync and clean.
    pub clean: u64,
    /// In sync, writes outstanding.
    pub dirty: u64,
    /// Not in sync.
    pub out_of_sync: u64,
}

impl RegionCounts {
    /// The count of one state.
    pub fn get(&self, s: RegionState) -> u64 {
        match s {
            RegionState::Clean => self.clean,
            RegionState::Dirty => self.dirty,
            RegionState::OutOfSync => self.out_of_sync,
        }
    }
}

/// The valid bits of word `w` of a bitmap of `region_count` bits.
fn valid_mask(w: usize, region_count: u64) -> u64 {
    let first = w as u64 * 64;
    if region_count >= first + 64 {
        u64::MAX
    } else if region_count <= first {
        0
    } else {
        (1u64 << (region_count - first)) - 1
    }
}

/// Words of a cluster log's state read per lock of its view: 2048 regions, answered one by one
/// (IN_SYNC and IS_CLEAN of the replicated state), so the receive thread, which reads the same
/// view for IN_SYNC, waits for a short lock only.
pub const CLUSTER_CHUNK_WORDS: usize = 32;

/// Walks the bitmaps from word `first_word`, a chunk per lock, until `f` returns false.
fn walk(log: &SharedLog, region_count: u64, first_word: usize, f: impl FnMut(usize, u64, u64) -> bool) {
    walk_words(|w, c, s| log.lock().copy_words(w, c, s), CHUNK_WORDS, region_count, first_word, f)
}

/// Walks bitmap words that `copy` hands out a chunk of `chunk_words` at a time (from word
/// `first_word`, 0 at the end), until `f` returns false.
fn walk_words(
    mut copy: impl FnMut(usize, &mut [u64], &mut [u64]) -> usize,
    chunk_words: usize,
    region_count: u64,
    first_word: usize,
    mut f: impl FnMut(usize, u64, u64) -> bool,
) {
    let mut clean = vec![0u64; chunk_words];
    let mut sync = vec![0u64; chunk_words];
    let mut w = first_word;
    loop {
        let n = copy(w, &mut clean, &mut sync);
        if n == 0 {
            return;
        }
        for i in 0..n {
            let m = valid_mask(w + i, region_count);
            if !f(w + i, clean[i] & m, sync[i] & m) {
                return;
            }
        }
        w += n;
    }
}

/// Regions per state (`region_count` is the log's). Two popcounts per word (bits beyond
/// `region_count` are zero in both bitmaps, so they count as neither clean nor in sync).
pub fn count(log: &SharedLog, region_count: u64) -> RegionCounts {
    let (mut in_sync, mut clean) = (0u64, 0u64);
    walk(log, region_count, 0, |_, c, s| {
        in_sync += u64::from(s.count_ones());
        clean += u64::from((c & s).count_ones());
        true
    });
    RegionCounts { clean, dirty: in_sync - clean, out_of_sync: region_count - in_sync }
}

/// A page of regions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// `(region, state)`, ascending.
    pub regions: Vec<(u64, RegionState)>,
    /// Where the next page starts (`None`: the end of the log was reached).
    pub next: Option<u64>,
}

/// Up to `limit` regions from `start` on, only those in `filter` if given. Examines at most
/// `budget` regions (rounded up to whole words), so a filter that matches rarely costs a bounded
/// amount per call; `next` then says where to continue.
pub fn list(
    log: &SharedLog,
    region_count: u64,
    start: u64,
    limit: usize,
    filter: Option<RegionState>,
    budget: u64,
) -> Page {
    let copy = |w: usize, c: &mut [u64], s: &mut [u64]| log.lock().copy_words(w, c, s);
    list_words(copy, CHUNK_WORDS, region_count, start, limit, filter, budget)
}

/// [`list`] for a cluster log: its replicated state as this member sees it (every region out
/// of sync while the member does not hold it), [`CLUSTER_CHUNK_WORDS`] per lock of its view.
pub fn list_cluster(
    view: &crate::cluster::engine::ClusterView,
    region_count: u64,
    start: u64,
    limit: usize,
    filter: Option<RegionState>,
    budget: u64,
) -> Page {
    let copy = |w: usize, c: &mut [u64], s: &mut [u64]| view.copy_words(w, region_count, c, s);
    list_words(copy, CLUSTER_CHUNK_WORDS, region_count, start, limit, filter, budget)
}

fn list_words(
    copy: impl FnMut(usize, &mut [u64], &mut [u64]) -> usize,
    chunk_words: usize,
    region_count: u64,
    start: u64,
    limit: usize,
    filter: Option<RegionState>,
    budget: u64,
) -> Page {
    let mut page = Page::default();
    if start >= region_count || limit == 0 {
        page.next = (start < region_count).then_some(start);
        return page;
    }
    let first_word = (start / 64) as usize;
    let mut examined = 0u64;
    walk_words(copy, chunk_words, region_count, first_word, |w, clean, sync| {
        let base = w as u64 * 64;
        let mut bits = match filter {
            Some(s) => s.select(clean, sync),
            None => u64::MAX,
        } & valid_mask(w, region_count);
        if base < start {
            bits &= u64::MAX << (start - base);
        }
        while bits != 0 {
            let b = u64::from(bits.trailing_zeros());
            let r = base + b;
            if page.regions.len() == limit {
                page.next = Some(r);
                return false;
            }
            page.regions.push((r, RegionState::of(clean >> b & 1 == 1, sync >> b & 1 == 1)));
            bits &= bits - 1;
        }
        examined += 64;
        let end = base + 64;
        if examined >= budget && end < region_count {
            page.next = Some(end);
            return false;
        }
        true
    });
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster log's pages are its replicated state's ([`crate::metrics::test_support::three_node_view`]):
    /// 1, 2 dirty (node 1's marks), 3, 4 out of sync (held by departed node 2), 7, 8 out of
    /// sync (reclaimed); the rest clean. Across chunks and with a filter and a budget.
    #[test]
    fn cluster_pages_are_the_replicated_states() {
        let view = crate::metrics::test_support::three_node_view();
        let p = list_cluster(&view, 100, 0, 10, None, u64::MAX);
        let states: Vec<(u64, &str)> = p.regions.iter().map(|&(r, s)| (r, s.name())).collect();
        assert_eq!(
            states,
            [
                (0, "clean"),
                (1, "dirty"),
                (2, "dirty"),
                (3, "out_of_sync"),
                (4, "out_of_sync"),
                (5, "clean"),
                (6, "clean"),
                (7, "out_of_sync"),
                (8, "out_of_sync"),
                (9, "clean")
            ]
        );
        assert_eq!(p.next, Some(10));
        let p = list_cluster(&view, 100, 4, 100, Some(RegionState::OutOfSync), u64::MAX);
        assert_eq!(p.regions.iter().map(|r| r.0).collect::<Vec<_>>(), [4, 7, 8]);
        assert_eq!(p.next, None);
        let p = list_cluster(&view, 100, 0, 100, Some(RegionState::Clean), u64::MAX);
        assert_eq!(p.regions.len(), 94);
        // Not holding the state: everything out of sync.
        let empty = crate::cluster::engine::ClusterView::default();
        let p = list_cluster(&empty, 100, 98, 10, None, u64::MAX);
        assert_eq!(p.regions, [(98, RegionState::OutOfSync), (99, RegionState::OutOfSync)]);
        // A big log walks several chunks of the view.
        let mut log = crate::cluster::state::ReplicatedLog::new(20_000, true).unwrap();
        log.apply(&crate::cluster::state::Event::Join { node: 1, incarnation: 1 }).unwrap();
        log.apply(&crate::cluster::state::Event::Mark { node: 1, regions: vec![19_999] }).unwrap();
        let big = crate::cluster::engine::ClusterView::holding(1, vec![], log, 0);
        let p = list_cluster(&big, 20_000, 0, 10, Some(RegionState::Dirty), u64::MAX);
        assert_eq!(p.regions, [(19_999, RegionState::Dirty)]);
    }
    use crate::region_log::ctr::parse;
    use crate::region_log::dirty_log::DirtyLog;

    fn log(ctr: &str) -> SharedLog {
        let l = DirtyLog::new(&parse(ctr.as_bytes()).unwrap().args, false).unwrap();
        SharedLog::new(l)
    }

    #[test]
    fn counts_and_pages() {
        // 300 000 regions: more than one chunk; a partial last word.
        let n = 300_000u64;
        let l = log(&format!("{} clustered-core 2", n * 2));
        {
            let mut s = l.lock();
            s.resume_in_memory();
            for r in (0..n).filter(|r| r % 3 != 0) {
                s.set_region_sync(r, true).unwrap();
            }
            s.mark([1, 2, 299_999].into_iter()).unwrap();
        }
        let c = count(&l, n);
        assert_eq!(c.clean + c.dirty + c.out_of_sync, n);
        assert_eq!(c.out_of_sync, n.div_ceil(3));
        assert_eq!(c.dirty, 3);
        let p = list(&l, n, 0, 4, None, u64::MAX);
        assert_eq!(
            p.regions,
            vec![
                (0, RegionState::OutOfSync),
                (1, RegionState::Dirty),
                (2, RegionState::Dirty),
                (3, RegionState::OutOfSync)
            ]
        );
        assert_eq!(p.next, Some(4));
        let p = list(&l, n, 2, 2, Some(RegionState::Dirty), u64::MAX);
        assert_eq!((p.regions, p.next), (vec![(2, RegionState::Dirty), (299_999, RegionState::Dirty)], None));
        let p = list(&l, n, 299_990, 100, Some(RegionState::OutOfSync), u64::MAX);
        assert_eq!(p.regions.iter().map(|x| x.0).collect::<Vec<_>>(), vec![299_991, 299_994, 299_997]);
        assert_eq!(p.next, None);
        // A bounded scan says where to go on.
        let p = list(&l, n, 5, 10, Some(RegionState::Clean), 0);
        assert_eq!(p.regions.iter().map(|x| x.0).collect::<Vec<_>>(), vec![5, 7, 8, 10, 11, 13, 14, 16, 17, 19]);
        let p = list(&l, n, 0, 10, Some(RegionState::Dirty), 64);
        assert_eq!((p.regions.len(), p.next), (2, Some(64)));
        assert_eq!(list(&l, n, n, 10, None, 10).next, None);
        assert_eq!(list(&l, n, 7, 0, None, 10).next, Some(7));
        // Filtered pages together give exactly the regions of the state.
        let mut all = Vec::new();
        let mut at = Some(0);
        while let Some(s) = at {
            let p = list(&l, n, s, 1000, Some(RegionState::OutOfSync), 50_000);
            all.extend(p.regions.iter().map(|x| x.0));
            at = p.next;
        }
        assert_eq!(all.len() as u64, c.out_of_sync);
        assert!(all.iter().all(|r| r % 3 == 0));
    }

    #[test]
    fn a_fresh_core_log_is_clean_but_out_of_sync() {
        let l = log("100 clustered-core 8");
        assert_eq!(count(&l, 13), RegionCounts { clean: 0, dirty: 0, out_of_sync: 13 });
        let l = log("100 clustered-core 8 nosync");
        assert_eq!(count(&l, 13), RegionCounts { clean: 13, dirty: 0, out_of_sync: 0 });
    }
}
