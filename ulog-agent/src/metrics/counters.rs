//! `Counters`: what the request path counts, lock-free.
//!
//! Design: fixed tables of relaxed `AtomicU64`s indexed by request type and malformed-message
//! reason, so counting costs one uncontended atomic add and never allocates or locks. Readers
//! (logs now, the metrics exporter later) take unsynchronised snapshots: two counters read
//! together may be one request apart, which no consumer of rates can notice.
//! Limits: no per-log breakdown here (per-log counters are `metrics::LogMetrics`, kept in each
//! log's entry).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use ulog_common::{RequestType, REQUEST_TYPE_COUNT};

use crate::wire::protocol::Malformed;

/// Why a datagram was not served at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// From a userspace port that isn't the accepted test peer.
    ForeignSender,
    /// The reply could not be sent.
    SendFailed,
    /// The socket's receive queue overflowed (ENOBUFS): the kernel will resend after 15 s.
    ReceiveOverrun,
}

impl Dropped {
    /// Every kind, for metric tables.
    pub const ALL: [Dropped; 3] = [Self::ForeignSender, Self::SendFailed, Self::ReceiveOverrun];
    /// Stable snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ForeignSender => "foreign_sender",
            Self::SendFailed => "send_failed",
            Self::ReceiveOverrun => "receive_overrun",
        }
    }
}

/// Request-path counters.
#[derive(Debug, Default)]
pub struct Counters {
    requests: [AtomicU64; REQUEST_TYPE_COUNT + 1],
    errors: [AtomicU64; REQUEST_TYPE_COUNT + 1],
    deferred: [AtomicU64; REQUEST_TYPE_COUNT + 1],
    without_log: [AtomicU64; REQUEST_TYPE_COUNT + 1],
    after_stall: [AtomicU64; REQUEST_TYPE_COUNT + 1],
    /// Set by the receive loop while it serves what queued up during a stall (see
    /// `transport::serve`): the requests counted meanwhile are also counted in `after_stall`.
    stalled: AtomicBool,
    malformed: [AtomicU64; Malformed::ALL.len()],
    dropped: [AtomicU64; Dropped::ALL.len()],
    disk_writes: AtomicU64,
    disk_write_bytes: AtomicU64,
    disk_write_errors: AtomicU64,
    log_lines_dropped: AtomicU64,
}

fn slot(kind: Option<RequestType>) -> usize {
    kind.map_or(REQUEST_TYPE_COUNT, RequestType::index)
}

impl Counters {
    /// One request answered (or handed to a persister) with `error`.
    #[inline]
    pub fn request(&self, kind: Option<RequestType>, error: i32, deferred: bool) {
        let i = slot(kind);
        self.requests[i].fetch_add(1, Relaxed);
        if error != 0 {
            self.errors[i].fetch_add(1, Relaxed);
        }
        if deferred {
            self.deferred[i].fetch_add(1, Relaxed);
        }
        if self.stalled.load(Relaxed) {
            self.after_stall[i].fetch_add(1, Relaxed);
        }
    }

    /// While `true`, every request counted is also counted as received after a stall of the
    /// receive loop: it waited in the socket queue for an unknown part of the stall.
    pub fn set_after_stall(&self, on: bool) {
        self.stalled.store(on, Relaxed);
    }

    /// Requests of a type received right after a stall of the receive loop.
    pub fn after_stall_of(&self, kind: Option<RequestType>) -> u64 {
        self.after_stall[slot(kind)].load(Relaxed)
    }

    /// A request answered without a log (unknown (uuid, luid), refused CTR, unknown type).
    #[inline]
    pub fn without_log(&self, kind: Option<RequestType>) {
        self.without_log[slot(kind)].fetch_add(1, Relaxed);
    }

    /// A deferred request finished with an error.
    pub fn deferred_error(&self, kind: Option<RequestType>) {
        self.errors[slot(kind)].fetch_add(1, Relaxed);
    }

    /// A malformed datagram.
    pub fn malformed(&self, why: Malformed) {
        self.malformed[why.index()].fetch_add(1, Relaxed);
    }

    /// A datagram dropped or a reply lost.
    pub fn dropped(&self, why: Dropped) {
        self.dropped[why as usize].fetch_add(1, Relaxed);
    }

    /// A durable write to a log device.
    pub fn disk_write(&self, bytes: usize, ok: bool) {
        self.disk_writes.fetch_add(1, Relaxed);
        self.disk_write_bytes.fetch_add(bytes as u64, Relaxed);
        if !ok {
            self.disk_write_errors.fetch_add(1, Relaxed);
        }
    }

    /// Requests of a type (`None` = unknown types).
    pub fn requests_of(&self, kind: Option<RequestType>) -> u64 {
        self.requests[slot(kind)].load(Relaxed)
    }

    /// Failed requests of a type.
    pub fn errors_of(&self, kind: Option<RequestType>) -> u64 {
        self.errors[slot(kind)].load(Relaxed)
    }

    /// Requests of a type answered off the receive thread (after disk I/O).
    pub fn deferred_of(&self, kind: Option<RequestType>) -> u64 {
        self.deferred[slot(kind)].load(Relaxed)
    }

    /// Requests of a type answered without a log.
    pub fn without_log_of(&self, kind: Option<RequestType>) -> u64 {
        self.without_log[slot(kind)].load(Relaxed)
    }

    /// Malformed datagrams for a reason.
    pub fn malformed_of(&self, why: Malformed) -> u64 {
        self.malformed[why.index()].load(Relaxed)
    }

    /// Dropped datagrams of a kind.
    pub fn dropped_of(&self, why: Dropped) -> u64 {
        self.dropped[why as usize].load(Relaxed)
    }

    /// The logging queue's count of lines dropped while stderr blocked (copied from the
    /// writer's own counter by the binary; see `main.rs`).
    pub fn set_log_lines_dropped(&self, total: u64) {
        self.log_lines_dropped.fetch_max(total, Relaxed);
    }

    /// Log lines dropped so far.
    pub fn log_lines_dropped(&self) -> u64 {
        self.log_lines_dropped.load(Relaxed)
    }

    /// (writes, bytes, errors) to log devices.
    pub fn disk_writes(&self) -> (u64, u64, u64) {
        (self.disk_writes.load(Relaxed), self.disk_write_bytes.load(Relaxed), self.disk_write_errors.load(Relaxed))
    }
}
