//! The flight recorder: each log's most recent requests with their timings (what cmirrord's
//! SIGUSR1 dump was for, served by `GET /api/v1/logs/{log}/requests`).
//!
//! A fixed ring of [`FLIGHT_SLOTS`] plain records per log, allocated at CTR and written under the
//! log's mutex (which the request path takes anyway), so recording costs a short critical
//! section and a copy of ~64 bytes, never an allocation. Readers lock, copy the ring, unlock.
//!
//! Ids: the receive thread numbers every request of a log (1, 2, ...; [`FlightIds`]) before it
//! dispatches it; record `id` lives in slot `id % FLIGHT_SLOTS`. A request answered after a
//! durable write is completed by the log's I/O thread, possibly *before* the receive thread has
//! recorded it: whichever of the two comes second merges into the slot, so both orders give the
//! same record. A completion for a slot that newer requests have taken over is dropped (the
//! record has left the ring).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::region_log::persist::PendingReply;

/// Records kept per log.
pub const FLIGHT_SLOTS: usize = 128;

/// `service_ns` of a request not answered yet.
pub const PENDING: u64 = u64::MAX;

/// One request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlightRecord {
    /// Per-log request number, from 1; 0 marks an empty slot.
    pub id: u64,
    /// When it was received ([`super::clock`] nanoseconds).
    pub received_ns: u64,
    /// Receive to reply sent, in ns; [`PENDING`] while a deferred request waits for its write.
    pub service_ns: u64,
    /// The kernel's sequence number.
    pub seq: u32,
    /// The request type (wire value, low 8 bits).
    pub request_type: u32,
    /// The answer: 0 or a negative errno.
    pub error: i32,
    /// Answered by the log's I/O thread after a durable write.
    pub deferred: bool,
    /// The receive thread has filled in the request's own fields (payload, reply).
    pub seen: bool,
    /// Request payload bytes.
    pub payload_bytes: u32,
    /// Regions named by the payload (IN_SYNC: 1; MARK/CLEAR/FLUSH: the list; 0 if none).
    pub regions: u32,
    /// The first region named (valid when `regions > 0`).
    pub first_region: u64,
    /// SET_REGION_SYNC's in_sync argument (0/1), -1 for other types.
    pub in_sync_arg: i8,
    /// Reply payload bytes.
    pub reply_bytes: u32,
    /// The reply's numbers (IN_SYNC/IS_CLEAN: 0/1; GET_SYNC_COUNT/GET_REGION_SIZE: the value;
    /// GET_RESYNC_WORK/IS_REMOTE_RECOVERING: both fields), when the reply carries numbers.
    pub reply_values: [u64; 2],
    /// How many of `reply_values` are meaningful.
    pub reply_value_count: u8,
}

impl FlightRecord {
    /// The record that completes a deferred request's (opened as pending when it was handed
    /// over), answered with `error` after `service_ns`.
    pub fn deferred(reply: &PendingReply, service_ns: u64, error: i32) -> Self {
        Self {
            id: reply.flight_id,
            received_ns: reply.received_ns,
            service_ns,
            seq: reply.header.seq,
            request_type: reply.header.request_type & ulog_common::DM_ULOG_REQUEST_MASK,
            error,
            deferred: true,
            in_sync_arg: -1,
            ..Self::default()
        }
    }
}

/// The per-log request numbering (only the receive thread allocates).
#[derive(Debug, Default)]
pub struct FlightIds(AtomicU64);

impl FlightIds {
    /// The next id (1, 2, ...). Single writer: a load and a store, no read-modify-write.
    #[inline]
    pub fn next(&self) -> u64 {
        let id = self.0.load(Relaxed) + 1;
        self.0.store(id, Relaxed);
        id
    }

    /// The last id handed out.
    pub fn last(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// The ring.
#[derive(Clone, Debug)]
pub struct FlightRing {
    slots: Box<[FlightRecord]>,
}

impl Default for FlightRing {
    fn default() -> Self {
        Self::new()
    }
}

impl FlightRing {
    /// An empty ring.
    pub fn new() -> Self {
        Self { slots: vec![FlightRecord::default(); FLIGHT_SLOTS].into_boxed_slice() }
    }

    fn slot(&mut self, id: u64) -> &mut FlightRecord {
        &mut self.slots[(id % FLIGHT_SLOTS as u64) as usize]
    }

    /// The receive thread's record of a request (`rec.seen` set). If the I/O thread already
    /// completed it, its timing and result are kept.
    #[inline]
    pub fn record(&mut self, rec: FlightRecord) {
        let slot = self.slot(rec.id);
        if slot.id == rec.id && !slot.seen {
            let (service_ns, error) = (slot.service_ns, slot.error);
            *slot = FlightRecord { service_ns, error, ..rec };
        } else if slot.id <= rec.id {
            *slot = rec;
        }
    }

    /// The I/O thread answered deferred request `rec.id` (`rec` carries what the I/O thread
    /// knows: header fields, timing, result; `seen` clear).
    pub fn complete(&mut self, rec: FlightRecord) {
        let slot = self.slot(rec.id);
        if slot.id == rec.id {
            slot.service_ns = rec.service_ns;
            slot.error = rec.error;
        } else if slot.id < rec.id {
            *slot = rec;
        }
    }

    /// Copies every record into `out` (cleared first). Give it room for [`FLIGHT_SLOTS`]
    /// records beforehand and nothing is allocated while the caller holds the log's mutex; sort
    /// and filter after unlocking.
    pub fn copy_into(&self, out: &mut Vec<FlightRecord>) {
        out.clear();
        out.extend_from_slice(&self.slots);
    }

    /// Copies out every record.
    pub fn copy(&self) -> Vec<FlightRecord> {
        self.slots.to_vec()
    }
}

/// Records of `copy` newest first, at most `limit`, optionally of one raw request type.
pub fn newest_first(mut recs: Vec<FlightRecord>, limit: usize, request_type: Option<u32>) -> Vec<FlightRecord> {
    recs.retain(|r| r.id != 0 && request_type.is_none_or(|t| t == r.request_type));
    recs.sort_unstable_by_key(|r| std::cmp::Reverse(r.id));
    recs.truncate(limit);
    recs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64) -> FlightRecord {
        FlightRecord { id, seq: id as u32 + 100, request_type: 8, seen: true, service_ns: 5, ..Default::default() }
    }

    #[test]
    fn the_ring_keeps_the_newest_records() {
        let mut r = FlightRing::new();
        let ids = FlightIds::default();
        for _ in 0..(FLIGHT_SLOTS as u64 + 10) {
            r.record(rec(ids.next()));
        }
        let out = newest_first(r.copy(), 1000, None);
        assert_eq!(out.len(), FLIGHT_SLOTS);
        assert_eq!(out[0].id, FLIGHT_SLOTS as u64 + 10);
        assert_eq!(out.last().unwrap().id, 11);
        assert_eq!(newest_first(r.copy(), 3, Some(8)).len(), 3);
        assert!(newest_first(r.copy(), 3, Some(9)).is_empty());
    }

    #[test]
    fn deferred_completion_merges_in_either_order() {
        let done = FlightRecord {
            id: 7,
            service_ns: 900,
            error: -5,
            seq: 107,
            request_type: 10,
            deferred: true,
            ..Default::default()
        };
        let seen = FlightRecord {
            service_ns: PENDING,
            deferred: true,
            regions: 3,
            first_region: 42,
            request_type: 10,
            ..rec(7)
        };
        // Receive thread first, then the I/O thread.
        let mut a = FlightRing::new();
        a.record(seen);
        a.complete(done);
        // The I/O thread first.
        let mut b = FlightRing::new();
        b.complete(done);
        b.record(seen);
        for ring in [a, b] {
            let r = newest_first(ring.copy(), 1, None)[0];
            assert_eq!((r.service_ns, r.error, r.regions, r.first_region, r.seen), (900, -5, 3, 42, true));
        }
        // A completion for a slot newer requests took over is dropped.
        let mut c = FlightRing::new();
        c.record(rec(7 + FLIGHT_SLOTS as u64));
        c.complete(done);
        assert_eq!(newest_first(c.copy(), 1, None)[0].id, 7 + FLIGHT_SLOTS as u64);
    }
}
