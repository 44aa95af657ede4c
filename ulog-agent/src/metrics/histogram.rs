//! Histograms with integer-nanosecond bucket edges, updated with relaxed atomics.
//!
//! # Buckets
//! Edges follow a log2 ladder from 1 µs (1, 2, 4, ... µs), like the kernel-side histograms, plus
//! an edge exactly at every SLO threshold the alert rules use (`dashboards/ulog-rules.yml`):
//! [`SLO_EDGES_NS`]. A bucket counts the observations `<=` its edge (Prometheus `le`), compared
//! in integer nanoseconds, so an observation exactly on an edge lands in that edge's bucket and
//! nothing depends on float rounding. The exported `le` values are `edge_ns / 1e9`.
//!
//! Kernel-side (eBPF) histograms are log2 slots: [`kernel_slot`] is the reference mapping the
//! probes must implement so that slot `k` is exactly the Prometheus bucket `le = 2^k µs` (see its
//! docs); [`KERNEL_EDGES_NS`] are their edges (the log2 ladder without the SLO edges: the kernel
//! side cannot split a log2 slot).
//!
//! # Cost and consistency
//! `observe_ns` is a binary search over at most 34 edges plus two relaxed `fetch_add`s; no lock,
//! no allocation. A reader ([`AtomicHistogram::snapshot`]) loads the buckets one by one and
//! derives the count from them, so the exported `+Inf` bucket always equals `_count`; the sum
//! may include an observation whose bucket it has not seen yet (or miss one): harmless for rates.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Nanoseconds per microsecond.
pub const NS_PER_US: u64 = 1000;

/// Highest power of two (in µs) of the latency ladder: 2^24 µs ≈ 16.8 s, past the kernel's 15 s
/// request timeout.
pub const LATENCY_LOG2_MAX: u32 = 24;

/// Highest power of two (in µs) of the dirty-duration ladder: 2^32 µs ≈ 71.6 min.
pub const DIRTY_LOG2_MAX: u32 = 32;

/// SLO thresholds used by the alert rules, in ns: 100 µs (requests answered from memory),
/// 20 ms (requests answered after a durable write), 15 s (the kernel's request timeout,
/// `DM_ULOG_RETRY_TIMEOUT`: slower answers have been resent).
pub const SLO_EDGES_NS: [u64; 3] = [100_000, 20_000_000, 15_000_000_000];

const fn log2_ladder<const N: usize>() -> [u64; N] {
    let mut out = [0u64; N];
    let mut k = 0;
    while k < N {
        out[k] = NS_PER_US << k;
        k += 1;
    }
    out
}

const fn merge<const A: usize, const B: usize, const N: usize>(a: [u64; A], b: [u64; B]) -> [u64; N] {
    let mut out = [0u64; N];
    let (mut i, mut j, mut k) = (0, 0, 0);
    while k < N {
        if j >= B || (i < A && a[i] < b[j]) {
            out[k] = a[i];
            i += 1;
        } else {
            out[k] = b[j];
            j += 1;
        }
        k += 1;
    }
    out
}

const LATENCY_LOG2: [u64; LATENCY_LOG2_MAX as usize + 1] = log2_ladder();

/// Edges of request and disk-write latency histograms: the log2 ladder 1 µs .. 2^24 µs and the
/// SLO edges (no SLO edge is a power of two, so none is duplicated: checked by a test).
pub static LATENCY_EDGES_NS: [u64; LATENCY_LOG2_MAX as usize + 1 + SLO_EDGES_NS.len()] =
    merge(LATENCY_LOG2, SLO_EDGES_NS);

/// Edges of kernel-side histograms: the log2 ladder 1 µs .. 2^24 µs only.
pub static KERNEL_EDGES_NS: [u64; LATENCY_LOG2_MAX as usize + 1] = LATENCY_LOG2;

/// Edges of the per-log SLO histograms (`ulog_log_request_duration_seconds`): the SLO edges
/// only, so a log costs 6 series per request type (3 edges, `+Inf`, `_sum`, `_count`) instead
/// of the 31 of a full latency histogram. Enough for the SLIs (good = `le` at the threshold),
/// not for quantiles (use `ulog_request_duration_seconds` for those).
pub static PER_LOG_SLO_EDGES_NS: [u64; 3] = [100_000, 16_384_000, 15_000_000_000];

/// Edges of how long regions stay dirty: the log2 ladder 1 µs .. 2^32 µs.
pub static DIRTY_EDGES_NS: [u64; DIRTY_LOG2_MAX as usize + 1] = log2_ladder();

/// Number of slots in a kernel-side log2 histogram (more than any `u64` duration needs).
pub const KERNEL_SLOTS: usize = 64;

/// The kernel-side log2 slot of a duration of `ns` nanoseconds: slot 0 holds durations up to
/// and including 1 µs, slot `k >= 1` those in `(2^(k-1) µs, 2^k µs]`. So the cumulative count of
/// slots `0..=k` is exactly the Prometheus bucket `le = 2^k µs`, edges included.
///
/// In integer arithmetic (what the eBPF program must do): `c = ceil(ns / 1000)`; slot 0 if
/// `c <= 1`, otherwise the bit length of `c - 1` (`64 - clz(c - 1)`). Note the `- 1`: the plain
/// `floor(log2(us))` of bcc-style histograms puts an exact power of two in the slot *above* its
/// edge, which Prometheus' `le` semantics would count one bucket too high.
pub const fn kernel_slot(ns: u64) -> usize {
    let c = ns.div_ceil(NS_PER_US);
    if c <= 1 {
        0
    } else {
        (64 - (c - 1).leading_zeros()) as usize
    }
}

/// A histogram of durations (ns) with fixed edges, updated lock-free.
#[derive(Debug)]
pub struct AtomicHistogram {
    edges: &'static [u64],
    /// `buckets[i]`: observations in `(edges[i-1], edges[i]]`; the last one is `> last edge`.
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    /// An empty histogram over `edges` (strictly increasing, in ns).
    pub fn new(edges: &'static [u64]) -> Self {
        debug_assert!(edges.windows(2).all(|w| w[0] < w[1]));
        Self { edges, buckets: (0..=edges.len()).map(|_| AtomicU64::new(0)).collect(), sum_ns: AtomicU64::new(0) }
    }

    /// A request-latency histogram ([`LATENCY_EDGES_NS`]).
    pub fn latency() -> Self {
        Self::new(&LATENCY_EDGES_NS)
    }

    /// Records one duration.
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        let i = self.edges.partition_point(|&e| e < ns);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Records one duration, for a histogram with a single writer thread: plain loads and stores
    /// instead of read-modify-write instructions (readers still see consistent-enough counts).
    /// Concurrent writers would lose counts: only for histograms one thread updates.
    #[inline]
    pub fn observe_ns_single_writer(&self, ns: u64) {
        let i = self.edges.partition_point(|&e| e < ns);
        let b = &self.buckets[i];
        b.store(b.load(Relaxed) + 1, Relaxed);
        self.sum_ns.store(self.sum_ns.load(Relaxed).wrapping_add(ns), Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> HistSnapshot {
        HistSnapshot {
            edges: self.edges,
            counts: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_ns: self.sum_ns.load(Relaxed),
        }
    }

    /// Observations so far (sum of the buckets).
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }
}

/// A histogram's counts at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistSnapshot {
    /// Bucket edges in ns.
    pub edges: &'static [u64],
    /// Per-bucket (not cumulative) counts; `edges.len() + 1` of them, the last for `+Inf`.
    pub counts: Vec<u64>,
    /// Sum of the observations in ns.
    pub sum_ns: u64,
}

impl HistSnapshot {
    /// An empty snapshot over `edges`.
    pub fn empty(edges: &'static [u64]) -> Self {
        Self { edges, counts: vec![0; edges.len() + 1], sum_ns: 0 }
    }

    /// From kernel-side log2 slots ([`kernel_slot`]): slots up to [`LATENCY_LOG2_MAX`] are the
    /// [`KERNEL_EDGES_NS`] buckets, higher ones go to `+Inf`.
    pub fn from_kernel_slots(slots: &[u64], sum_ns: u64) -> Self {
        let mut s = Self::empty(&KERNEL_EDGES_NS);
        for (k, &n) in slots.iter().enumerate() {
            let i = k.min(KERNEL_EDGES_NS.len());
            s.counts[i] = s.counts[i].saturating_add(n);
        }
        s.sum_ns = sum_ns;
        s
    }

    /// Total observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_ns as f64 / 1e9
    }

    /// `(edge in seconds, cumulative count)` for every finite edge.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0u64;
        self.edges
            .iter()
            .zip(&self.counts)
            .map(|(&e, &c)| {
                acc += c;
                (edge_seconds(e), acc)
            })
            .collect()
    }

    /// What was observed since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &HistSnapshot) -> HistSnapshot {
        HistSnapshot {
            edges: self.edges,
            counts: self.counts.iter().zip(&earlier.counts).map(|(a, b)| a.saturating_sub(*b)).collect(),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
        }
    }

    /// The `q` quantile in seconds, estimated as Prometheus' `histogram_quantile` does (linear
    /// within the bucket; the lowest bucket starts at 0; a quantile in `+Inf` is the last edge).
    /// `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut acc = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            let before = acc;
            acc += c;
            if (acc as f64) >= rank && c > 0 {
                if i == self.edges.len() {
                    return self.edges.last().map(|&e| edge_seconds(e));
                }
                let lo = if i == 0 { 0.0 } else { edge_seconds(self.edges[i - 1]) };
                let hi = edge_seconds(self.edges[i]);
                let frac = (rank - before as f64) / c as f64;
                return Some(lo + (hi - lo) * frac.clamp(0.0, 1.0));
            }
        }
        self.edges.last().map(|&e| edge_seconds(e))
    }
}

/// An edge in seconds, as exported in `le`.
pub fn edge_seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladders_are_strictly_increasing_and_hold_every_slo_edge() {
        for edges in [&LATENCY_EDGES_NS[..], &KERNEL_EDGES_NS[..], &DIRTY_EDGES_NS[..]] {
            assert!(edges.windows(2).all(|w| w[0] < w[1]), "{edges:?}");
            assert_eq!(edges[0], 1000, "the ladder starts at 1 µs");
        }
        for slo in SLO_EDGES_NS {
            assert!(LATENCY_EDGES_NS.contains(&slo), "{slo}");
            assert!(!KERNEL_EDGES_NS.contains(&slo), "SLO edges are not powers of two");
        }
        assert_eq!(LATENCY_EDGES_NS.len(), 28);
        assert_eq!(*LATENCY_EDGES_NS.last().unwrap(), 1000 << 24);
        assert_eq!(*DIRTY_EDGES_NS.last().unwrap(), 1000 << 32);
        // Every kernel edge is also a latency edge: agent and kernel histograms compare bucket
        // by bucket.
        assert!(KERNEL_EDGES_NS.iter().all(|e| LATENCY_EDGES_NS.contains(e)));
    }

    #[test]
    fn an_observation_on_an_edge_lands_in_that_edge_bucket() {
        let h = AtomicHistogram::latency();
        for &e in LATENCY_EDGES_NS.iter() {
            h.observe_ns(e);
        }
        let s = h.snapshot();
        assert_eq!(&s.counts[..LATENCY_EDGES_NS.len()], &vec![1; LATENCY_EDGES_NS.len()][..]);
        assert_eq!(s.counts[LATENCY_EDGES_NS.len()], 0);
        // One past each edge goes to the next bucket; 0 to the first.
        let h = AtomicHistogram::latency();
        h.observe_ns(0);
        for &e in LATENCY_EDGES_NS.iter() {
            h.observe_ns(e + 1);
        }
        let s = h.snapshot();
        assert_eq!(s.counts[0], 1);
        assert!(s.counts[1..].iter().all(|&c| c == 1));
        assert_eq!(s.count(), LATENCY_EDGES_NS.len() as u64 + 1);
    }

    #[test]
    fn kernel_slots_match_the_le_buckets_exactly() {
        assert_eq!(kernel_slot(0), 0);
        assert_eq!(kernel_slot(1), 0);
        assert_eq!(kernel_slot(1000), 0, "1 µs exactly is <= 1 µs");
        assert_eq!(kernel_slot(1001), 1);
        assert_eq!(kernel_slot(2000), 1, "2 µs exactly is <= 2 µs");
        assert_eq!(kernel_slot(2001), 2);
        assert_eq!(kernel_slot(4000), 2);
        assert_eq!(kernel_slot(1000 << 24), 24);
        assert_eq!(kernel_slot((1000 << 24) + 1), 25);
        assert!(kernel_slot(u64::MAX) < KERNEL_SLOTS);
        // Exhaustively around every edge, and on a spread of values: the slot's Prometheus
        // bucket is the one an agent-side histogram over the same edges picks.
        let mut values: Vec<u64> = KERNEL_EDGES_NS.iter().flat_map(|&e| [e - 1, e, e + 1]).collect();
        values.extend((0..20_000u64).map(|i| i * 997 % 40_000_000));
        for v in values {
            let h = AtomicHistogram::new(&KERNEL_EDGES_NS);
            h.observe_ns(v);
            let mut slots = [0u64; KERNEL_SLOTS];
            slots[kernel_slot(v)] += 1;
            assert_eq!(HistSnapshot::from_kernel_slots(&slots, v), h.snapshot(), "{v} ns");
            // The eBPF programs' implementation agrees.
            assert_eq!(ulog_common::probes::log2_slot(v) as usize, kernel_slot(v), "{v} ns");
        }
        for v in [u64::MAX, u64::MAX - 1, 1 << 63, (1 << 40) + 3] {
            assert_eq!(ulog_common::probes::log2_slot(v) as usize, kernel_slot(v).min(KERNEL_SLOTS - 1), "{v} ns");
        }
    }

    #[test]
    fn exported_edges_print_as_the_rules_write_them() {
        let le = |ns: u64| edge_seconds(ns).to_string();
        assert_eq!(le(1000), "0.000001");
        assert_eq!(le(100_000), "0.0001");
        assert_eq!(le(20_000_000), "0.02");
        assert_eq!(le(15_000_000_000), "15");
        assert_eq!(le(1000 << 10), "0.001024");
        assert_eq!(le(1000 << 24), "16.777216");
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile() {
        let h = AtomicHistogram::new(&KERNEL_EDGES_NS);
        assert_eq!(h.snapshot().quantile(0.5), None);
        for _ in 0..100 {
            h.observe_ns(1500); // (1, 2] µs
        }
        let s = h.snapshot();
        let p50 = s.quantile(0.5).unwrap();
        assert!((p50 - 1.5e-6).abs() < 1e-12, "{p50}");
        assert!((s.quantile(1.0).unwrap() - 2e-6).abs() < 1e-12);
        h.observe_ns(u64::MAX / 2);
        assert_eq!(h.snapshot().quantile(1.0), Some(edge_seconds(1000 << 24)));
        let later = h.snapshot();
        assert_eq!(later.since(&s).count(), 1);
    }
}
