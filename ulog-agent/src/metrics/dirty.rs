//! How long regions stay dirty: the time from the MARK that made a region dirty to the CLEAR
//! that made it clean again.
//!
//! A fixed open-addressing table (region -> when it became dirty), allocated at CTR and used
//! under the log's mutex by the MARK and CLEAR handlers: a few probes per region, no allocation.
//! It holds up to 3/4 of its capacity ([`MAX_CAPACITY`] slots at most, so at most 3072 regions
//! dirty at once are timed; a 2^21-region log costs 64 KiB). Regions made dirty while it is full
//! are counted as untracked and not timed. Only MARK-initiated dirtiness is timed: regions found
//! dirty at a disk log's load, or made out of sync by SET_REGION_SYNC(0), have no start time.

/// Largest table (slots).
pub const MAX_CAPACITY: usize = 4096;

const EMPTY: u32 = 0;

/// One slot: region + 1 (0 = empty) and when it became dirty; key and time share a cache line.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    key: u32,
    since: u64,
}

/// Region -> dirty-since (ns).
#[derive(Clone, Debug)]
pub struct DirtyTracker {
    slots: Box<[Slot]>,
    len: usize,
    shift: u32,
}

impl DirtyTracker {
    /// A table for a log of `region_count` regions.
    pub fn new(region_count: u64) -> Self {
        let want = usize::try_from(region_count.saturating_mul(2)).unwrap_or(usize::MAX);
        let cap = want.clamp(16, MAX_CAPACITY).next_power_of_two();
        Self { slots: vec![Slot::default(); cap].into_boxed_slice(), len: 0, shift: 64 - cap.trailing_zeros() }
    }

    /// Regions being timed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no region is being timed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn home(&self, key: u32) -> usize {
        (u64::from(key).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    #[inline]
    fn key(region: u64) -> Option<u32> {
        u32::try_from(region.checked_add(1)?).ok()
    }

    /// Region `region` became dirty at `now_ns`. Keeps an existing start. Returns false if the
    /// table is full (the region is not timed).
    #[inline]
    pub fn start(&mut self, region: u64, now_ns: u64) -> bool {
        let Some(key) = Self::key(region) else { return false };
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            match self.slots[i].key {
                EMPTY => break,
                k if k == key => return true,
                _ => i = (i + 1) & mask,
            }
        }
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            return false;
        }
        self.slots[i] = Slot { key, since: now_ns };
        self.len += 1;
        true
    }

    /// Region `region` became clean: when it became dirty, if it was timed.
    #[inline]
    pub fn finish(&mut self, region: u64) -> Option<u64> {
        let key = Self::key(region)?;
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            match self.slots[i].key {
                EMPTY => return None,
                k if k == key => break,
                _ => i = (i + 1) & mask,
            }
        }
        let since = self.slots[i].since;
        // Backward-shift deletion: move later members of the probe run into the hole when
        // their home position allows it, so lookups never stop early.
        let mut hole = i;
        let mut j = (i + 1) & mask;
        while self.slots[j].key != EMPTY {
            let home = self.home(self.slots[j].key);
            // j may move to the hole if its home is not in (hole, j] (cyclically).
            let between = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !between {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.slots[hole].key = EMPTY;
        self.len -= 1;
        Some(since)
    }

    /// Forgets every region (the log's state was replaced).
    pub fn reset(&mut self) {
        self.slots.fill(Slot::default());
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn sizes() {
        assert_eq!(DirtyTracker::new(13).capacity(), 32);
        assert_eq!(DirtyTracker::new(0).capacity(), 16);
        assert_eq!(DirtyTracker::new(1 << 21).capacity(), MAX_CAPACITY);
    }

    #[test]
    fn full_tables_refuse_and_keep_working() {
        let mut t = DirtyTracker::new(8); // 16 slots, 12 usable
        for r in 0..12 {
            assert!(t.start(r, r));
        }
        assert!(!t.start(100, 0));
        assert!(t.start(3, 99), "an already timed region is fine");
        assert_eq!(t.finish(3), Some(3), "and keeps its first start");
        assert!(t.start(100, 7));
        assert_eq!(t.finish(100), Some(7));
        assert_eq!(t.finish(100), None);
        assert_eq!(t.finish(u64::MAX), None);
        assert!(!t.start(u64::from(u32::MAX), 1), "regions beyond u32 are never timed");
    }

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 0u64..1000), 0..600)) {
            let mut t = DirtyTracker::new(100); // 256 slots, 192 usable
            let mut m: HashMap<u64, u64> = HashMap::new();
            for (start, r, now) in ops {
                if start {
                    let fits = m.contains_key(&r) || (m.len() + 1) * 4 <= 256 * 3;
                    prop_assert_eq!(t.start(r, now), fits);
                    if fits {
                        m.entry(r).or_insert(now);
                    }
                } else {
                    prop_assert_eq!(t.finish(r), m.remove(&r));
                }
                prop_assert_eq!(t.len(), m.len());
            }
            for (r, since) in m {
                prop_assert_eq!(t.finish(r), Some(since));
            }
            prop_assert!(t.is_empty());
        }
    }
}
