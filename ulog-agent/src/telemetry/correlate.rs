//! Correlation by seq: the kernel's view of a request (from the eBPF events) joined with the
//! agent's own receive and reply times.
//!
//! # The request path's part: [`SeqTable`]
//! For every request it answers, the request path stores `(seq, received, replying)` into a
//! fixed table of [`SEQ_SLOTS`] slots indexed by `seq % SEQ_SLOTS`: a compare-and-swap that
//! claims the slot (several threads write the table), two relaxed stores and a release store, no
//! lock, no allocation, no channel. `replying` is taken just
//! before the reply is handed to `sendto`: the kernel can only wake up after that, so every
//! correlated request satisfies `kernel entry <= send <= received <= replying <= kernel return`
//! (all four on `CLOCK_MONOTONIC`, see [`crate::metrics::clock`]). A slot is a seqlock: the
//! reader accepts it only if the seq tag is the one it looks for before and after reading the
//! times. The kernel's seq is one global counter, so a slot is reused only after
//! [`SEQ_SLOTS`] later requests; the reader drains the events every 50 ms.
//!
//! # The reader's part: [`Correlator`]
//! Runs on the probe thread ([`super::manager`]), off the request path. For each
//! [`RequestEvent`] (one per returned `dm_consult_userspace` call) it looks up the last
//! attempt's seq and, when found, derives the stages:
//! - `send`: the attempt's `cn_netlink_send` to the agent's receive (queueing, the agent's
//!   wake-up and `recvfrom`),
//! - `server`: received to reply handed to `sendto` (the agent's service time),
//! - `wakeup`: reply handed to `sendto` to the kernel's return (the reply's delivery, the waiting
//!   kernel thread's wake-up).
//!
//! The kernel total (entry to return) also covers what precedes the send (building the request,
//! the kernel's send mutex) and, for a resent request, the earlier attempts. A correlated request
//! whose total is below the agent's service time would mean the clocks disagree: counted as an
//! inversion (never expected).

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use ulog_common::probes::{request_counter_slot, RequestEvent, ESRCH, EV_RECONNECT, EV_SEQ, REQUEST_COUNTER_SLOTS};

use crate::metrics::clock;
use crate::metrics::histogram::kernel_slot;
use crate::metrics::kernel::Log2Hist;

/// Slots of the seq table (16384 × 24 bytes = 384 KiB).
pub const SEQ_SLOTS: usize = 1 << 14;
const VALID: u64 = 1 << 32;
/// The tag of a slot being written (never a valid tag: those have [`VALID`] and a 32-bit seq).
const WRITING: u64 = 1 << 33;

struct SeqSlot {
    tag: AtomicU64,
    received: AtomicU64,
    replied: AtomicU64,
}

/// The request path's record of `seq -> (received, replying)`, in [`clock`] ns.
pub struct SeqTable {
    slots: Box<[SeqSlot]>,
}

impl std::fmt::Debug for SeqTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqTable").field("slots", &self.slots.len()).finish()
    }
}

impl Default for SeqTable {
    fn default() -> Self {
        Self {
            slots: (0..SEQ_SLOTS)
                .map(|_| SeqSlot { tag: AtomicU64::new(0), received: AtomicU64::new(0), replied: AtomicU64::new(0) })
                .collect(),
        }
    }
}

impl SeqTable {
    /// Records a request (request path: one compare-and-swap that claims the slot, two relaxed
    /// stores, one release store).
    ///
    /// Several threads write the table (the receive thread, and each persistent log's I/O
    /// thread for the requests it answers), so two writers can meet in one slot (seqs 16384
    /// apart). The claim makes that harmless: a writer first swaps the slot's tag from whatever
    /// it holds to [`WRITING`]; only the winner writes the times and publishes its tag, a writer
    /// that finds the slot being written gives its record up (the request is then not
    /// correlated, which is counted), and so a slot never holds one writer's `received` with
    /// another's `replying`.
    #[inline]
    pub fn record(&self, seq: u32, received_ns: u64, replying_ns: u64) {
        let s = &self.slots[seq as usize % SEQ_SLOTS];
        let current = s.tag.load(Ordering::Relaxed);
        if current == WRITING || s.tag.compare_exchange(current, WRITING, Ordering::Acquire, Ordering::Relaxed).is_err()
        {
            return;
        }
        fence(Ordering::Release);
        s.received.store(received_ns, Ordering::Relaxed);
        s.replied.store(replying_ns, Ordering::Relaxed);
        s.tag.store(u64::from(seq) | VALID, Ordering::Release);
    }

    /// Forgets every record (at a new attachment: the kernel's seq restarts with the module, so
    /// an old record could match a new request's seq).
    pub fn clear(&self) {
        for s in self.slots.iter() {
            s.tag.store(0, Ordering::Release);
        }
    }

    /// `(received, replying)` of `seq`, if the slot still holds it.
    pub fn get(&self, seq: u32) -> Option<(u64, u64)> {
        let s = &self.slots[seq as usize % SEQ_SLOTS];
        let want = u64::from(seq) | VALID;
        if s.tag.load(Ordering::Acquire) != want {
            return None;
        }
        let r = s.received.load(Ordering::Relaxed);
        let p = s.replied.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        (s.tag.load(Ordering::Relaxed) == want).then_some((r, p))
    }
}

/// Why an event could not be correlated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uncorrelated {
    /// The send probe saw no attempt (the call failed before sending, or the probe attached
    /// during the call).
    NoSend,
    /// The call returned -ESRCH: no log server was listening, the request went nowhere.
    NoServer,
    /// The seq is not in the agent's table: not answered by this agent (another server, an
    /// agent restart), or overwritten.
    NotSeen,
}

impl Uncorrelated {
    /// Every reason, in order.
    pub const ALL: [Uncorrelated; 3] = [Uncorrelated::NoSend, Uncorrelated::NoServer, Uncorrelated::NotSeen];
    /// The `reason` label.
    pub const fn name(self) -> &'static str {
        match self {
            Uncorrelated::NoSend => "no_send",
            Uncorrelated::NoServer => "no_server",
            Uncorrelated::NotSeen => "not_seen",
        }
    }
}

/// One correlated request, as the status API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Correlated {
    /// Seq of the answered attempt.
    pub seq: u32,
    /// Seq of the first attempt (differs after a resend).
    pub first_seq: u32,
    /// Request type (wire value).
    pub request_type: u32,
    /// The log's luid.
    pub luid: u64,
    /// The call's return value.
    pub ret: i32,
    /// Attempts sent.
    pub attempts: u32,
    /// When the kernel entered `dm_consult_userspace` ([`clock`] ns).
    pub entry_ns: u64,
    /// Kernel total: entry to return.
    pub total_ns: u64,
    /// Stage `send`.
    pub send_ns: u64,
    /// Stage `server` (the agent's service time up to `sendto`).
    pub server_ns: u64,
    /// Stage `wakeup`.
    pub wakeup_ns: u64,
}

/// Correlated requests kept for the status API.
pub const RECENT_KEPT: usize = 256;
/// Slow requests kept for the status API.
pub const SLOW_KEPT: usize = 256;

/// The joined figures, cumulative since the agent started (over every attachment).
#[derive(Clone, Debug)]
pub struct CorrelationStats {
    /// Correlated requests by counter slot.
    pub correlated: Vec<u64>,
    /// Uncorrelated events by [`Uncorrelated::ALL`] order.
    pub uncorrelated: [u64; 3],
    /// Correlated requests whose kernel total was below the agent's service time.
    pub inversions: u64,
    /// Stage histograms: `stages[stage][slot]`.
    pub stages: [Vec<Log2Hist>; 3],
}

impl Default for CorrelationStats {
    fn default() -> Self {
        let per_type = || vec![Log2Hist::default(); REQUEST_COUNTER_SLOTS];
        Self {
            correlated: vec![0; REQUEST_COUNTER_SLOTS],
            uncorrelated: [0; 3],
            inversions: 0,
            stages: [per_type(), per_type(), per_type()],
        }
    }
}

fn observe(h: &mut Log2Hist, ns: u64) {
    let k = kernel_slot(ns).min(h.slots.len().saturating_sub(1));
    if let Some(c) = h.slots.get_mut(k) {
        *c += 1;
    }
    h.sum_ns = h.sum_ns.wrapping_add(ns);
}

/// The join, and what it accumulates.
#[derive(Debug)]
pub struct Correlator {
    /// The aggregates.
    pub stats: CorrelationStats,
    /// The most recent correlated requests (newest last).
    pub recent: VecDeque<Correlated>,
    /// The most recent correlated requests with a kernel total >= `slow_ns` (newest last).
    pub slow: VecDeque<Correlated>,
    /// Threshold of [`Correlator::slow`].
    pub slow_ns: u64,
}

impl Correlator {
    /// An empty correlator keeping requests of `slow_ns` or more as slow.
    pub fn new(slow_ns: u64) -> Self {
        Self {
            stats: CorrelationStats::default(),
            recent: VecDeque::with_capacity(RECENT_KEPT),
            slow: VecDeque::with_capacity(SLOW_KEPT),
            slow_ns,
        }
    }

    /// Joins one event with the table. Every value comes from the kernel or the table: nothing
    /// here trusts them to be ordered (saturating arithmetic, bounded indexes).
    pub fn process(&mut self, ev: &RequestEvent, table: &SeqTable) -> Result<Correlated, Uncorrelated> {
        let r = self.join(ev, table);
        match r {
            Ok(c) => {
                let slot = request_counter_slot(c.request_type) as usize;
                if let Some(n) = self.stats.correlated.get_mut(slot) {
                    *n += 1;
                }
                for (stage, ns) in [c.send_ns, c.server_ns, c.wakeup_ns].into_iter().enumerate() {
                    if let Some(h) = self.stats.stages[stage].get_mut(slot) {
                        observe(h, ns);
                    }
                }
                if c.total_ns < c.server_ns {
                    self.stats.inversions += 1;
                }
                push(&mut self.recent, c, RECENT_KEPT);
                if c.total_ns >= self.slow_ns {
                    push(&mut self.slow, c, SLOW_KEPT);
                }
            }
            Err(why) => self.stats.uncorrelated[why as usize] += 1,
        }
        r
    }

    fn join(&self, ev: &RequestEvent, table: &SeqTable) -> Result<Correlated, Uncorrelated> {
        if ev.ret == -ESRCH {
            return Err(Uncorrelated::NoServer);
        }
        if ev.flags & EV_SEQ == 0 || ev.send_ns == 0 {
            return Err(Uncorrelated::NoSend);
        }
        let (received, replying) = table.get(ev.last_seq).ok_or(Uncorrelated::NotSeen)?;
        let (received_k, replying_k) = (clock::kernel_ns(received), clock::kernel_ns(replying));
        Ok(Correlated {
            seq: ev.last_seq,
            first_seq: ev.first_seq,
            request_type: ev.request_type,
            luid: ev.luid,
            ret: ev.ret,
            attempts: ev.attempts,
            entry_ns: clock::from_kernel_ns(ev.entry_ns),
            total_ns: ev.exit_ns.saturating_sub(ev.entry_ns),
            send_ns: received_k.saturating_sub(ev.send_ns),
            server_ns: replying.saturating_sub(received),
            wakeup_ns: ev.exit_ns.saturating_sub(replying_k),
        })
    }
}

fn push(q: &mut VecDeque<Correlated>, c: Correlated, cap: usize) {
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(c);
}

/// Whether an event is a CTR of the kernel's reconnect loop.
pub fn is_reconnect(ev: &RequestEvent) -> bool {
    ev.flags & EV_RECONNECT != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ulog_common::RequestType;

    /// Two writers in one slot (seqs SEQ_SLOTS apart, as the receive thread and a persister
    /// can be: each seq is answered once) while a reader reads it: every record the reader
    /// accepts is one writer's whole record, never one writer's `received` with the other's
    /// `replying`.
    #[test]
    fn concurrent_writers_never_leave_a_torn_slot() {
        const ROUNDS: u32 = 120_000; // seqs stay unique: 7 + 16384 * 240_000 < 2^32
        let table = std::sync::Arc::new(SeqTable::default());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // received = seq << 20, replying = received + (seq >> 14): a record whose times
        // belong to two seqs is torn.
        let times = |seq: u32| (u64::from(seq) << 20, (u64::from(seq) << 20) + u64::from(seq >> 14));
        let writers: Vec<_> = (0..2u32)
            .map(|w| {
                let (table, done) = (std::sync::Arc::clone(&table), std::sync::Arc::clone(&done));
                std::thread::spawn(move || {
                    for k in 0..ROUNDS {
                        let seq = 7 + SEQ_SLOTS as u32 * (2 * k + w);
                        let (r, p) = times(seq);
                        table.record(seq, r, p);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        let (mut seen, mut torn) = (0u64, 0u64);
        let slot = &table.slots[7];
        while done.load(Ordering::Relaxed) < 2 {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag & VALID == 0 || tag == WRITING {
                continue;
            }
            if let Some((r, p)) = table.get(tag as u32) {
                seen += 1;
                if (r, p) != times(tag as u32) {
                    torn += 1;
                }
            }
        }
        writers.into_iter().for_each(|w| w.join().unwrap());
        let last = slot.tag.load(Ordering::Acquire) as u32;
        assert_eq!(table.get(last), Some(times(last)), "the last record stands");
        assert_eq!(torn, 0, "{torn} torn records out of {seen}");
    }

    /// A new load of the module restarts the kernel's seq at 0: the table is cleared at attach.
    #[test]
    fn clear_forgets_every_record() {
        let t = SeqTable::default();
        t.record(3, 10, 20);
        assert_eq!(t.get(3), Some((10, 20)));
        t.clear();
        assert_eq!(t.get(3), None);
        t.record(3, 30, 40);
        assert_eq!(t.get(3), Some((30, 40)));
    }

    fn event(seq: u32, entry: u64, send: u64, exit: u64) -> RequestEvent {
        RequestEvent {
            luid: 7,
            entry_ns: entry,
            exit_ns: exit,
            send_ns: send,
            first_seq: seq,
            last_seq: seq,
            request_type: RequestType::InSync.raw(),
            ret: 0,
            attempts: 1,
            flags: EV_SEQ,
            ..RequestEvent::default()
        }
    }

    #[test]
    fn table_keeps_the_latest_seq_per_slot() {
        let t = SeqTable::default();
        assert_eq!(t.get(5), None);
        t.record(5, 100, 150);
        assert_eq!(t.get(5), Some((100, 150)));
        t.record(5 + SEQ_SLOTS as u32, 200, 250);
        assert_eq!(t.get(5), None, "overwritten by a later seq of the same slot");
        assert_eq!(t.get(5 + SEQ_SLOTS as u32), Some((200, 250)));
        // seq 0 is a valid seq (the tag carries a valid bit).
        t.record(0, 1, 2);
        assert_eq!(t.get(0), Some((1, 2)));
    }

    #[test]
    fn stages_add_up_from_send_to_return() {
        let t = SeqTable::default();
        let base = clock::kernel_ns(0);
        // Agent clock: received at 10_000, replying at 14_000. Kernel: entry 8_000, send 9_000,
        // return 20_000 (all in the agent's clock + base).
        t.record(42, 10_000, 14_000);
        let mut c = Correlator::new(1_000_000);
        let got = c.process(&event(42, base + 8_000, base + 9_000, base + 20_000), &t).expect("correlated");
        assert_eq!(got.total_ns, 12_000);
        assert_eq!(got.send_ns, 1_000);
        assert_eq!(got.server_ns, 4_000);
        assert_eq!(got.wakeup_ns, 6_000);
        assert!(got.total_ns >= got.send_ns + got.server_ns + got.wakeup_ns);
        let slot = RequestType::InSync.raw() as usize;
        assert_eq!(c.stats.correlated[slot], 1);
        assert_eq!(c.stats.stages[1][slot].slots[kernel_slot(4_000)], 1);
        assert_eq!(c.stats.stages[1][slot].sum_ns, 4_000);
        assert_eq!(c.stats.inversions, 0);
        assert_eq!(c.recent.len(), 1);
        assert!(c.slow.is_empty(), "12 µs is not slow at a 1 ms threshold");
    }

    #[test]
    fn uncorrelated_reasons_and_hostile_values() {
        let t = SeqTable::default();
        let mut c = Correlator::new(0);
        let mut e = event(9, 5, 6, 7);
        e.ret = -ESRCH;
        assert_eq!(c.process(&e, &t), Err(Uncorrelated::NoServer));
        let mut e = event(9, 5, 6, 7);
        e.flags = 0;
        assert_eq!(c.process(&e, &t), Err(Uncorrelated::NoSend));
        assert_eq!(c.process(&event(9, 5, 6, 7), &t), Err(Uncorrelated::NotSeen));
        assert_eq!(c.stats.uncorrelated, [1, 1, 1]);
        // Times out of order and a type out of range: no panic, saturated, counted as OTHER.
        t.record(9, u64::MAX, 0);
        let mut e = event(9, u64::MAX, 1, 0);
        e.request_type = 0xFF;
        let got = c.process(&e, &t).expect("correlated");
        assert_eq!(got.total_ns, 0);
        assert_eq!(got.server_ns, 0);
        assert_eq!(c.stats.correlated[0], 1);
        assert_eq!(c.slow.len(), 1);
    }

    #[test]
    fn an_inversion_is_counted() {
        let t = SeqTable::default();
        let base = clock::kernel_ns(0);
        t.record(1, 1_000, 50_000);
        let mut c = Correlator::new(u64::MAX);
        c.process(&event(1, base + 900, base + 950, base + 10_000), &t).expect("correlated");
        assert_eq!(c.stats.inversions, 1);
    }

    #[test]
    fn rings_are_bounded() {
        let t = SeqTable::default();
        let mut c = Correlator::new(0);
        for s in 0..(RECENT_KEPT as u32 + 10) {
            t.record(s, 1, 2);
            c.process(&event(s, 0, 1, 3), &t).expect("correlated");
        }
        assert_eq!(c.recent.len(), RECENT_KEPT);
        assert_eq!(c.slow.len(), SLOW_KEPT);
        assert_eq!(c.recent.back().map(|r| r.seq), Some(RECENT_KEPT as u32 + 9));
    }
}
