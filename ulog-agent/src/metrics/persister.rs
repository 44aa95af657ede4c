//! `PersisterTelemetry`: what a persistent log's I/O thread reports, recorded where the rest of
//! the request path's figures are.
//!
//! The log engine's persister (`region_log::persist`) knows only its
//! [`PersistObserver`] trait; this is the agent's implementation, one per persistent log,
//! made at CTR. Every call is on the log's I/O thread and costs relaxed atomics (the process
//! counters, the histograms, the log's result counters, the probes' seq table) plus, for a
//! request with a flight record, one short critical section in the log's mutex, as the
//! persister did itself before the engine stopped naming telemetry. Nothing allocates.

use std::sync::Arc;

use super::flight::FlightRecord;
use super::{clock, counters::Dropped, LogState, LogTelemetry, SharedLog, Telemetry};
use crate::region_log::persist::{PendingReply, PersistObserver};

/// The telemetry a persistent log's I/O thread writes: the agent's and the log's own.
#[derive(Debug)]
pub struct PersisterTelemetry {
    telemetry: Arc<Telemetry>,
    log: Arc<LogTelemetry>,
}

impl PersisterTelemetry {
    /// For the log whose figures are `log`, within the agent's `telemetry`.
    pub fn new(telemetry: Arc<Telemetry>, log: Arc<LogTelemetry>) -> Self {
        Self { telemetry, log }
    }
}

impl PersistObserver<LogState> for PersisterTelemetry {
    fn replying(&self, reply: &PendingReply, error: i32) {
        if error != 0 {
            self.telemetry.counters().deferred_error(reply.kind());
        }
        self.telemetry.about_to_reply(reply.header.seq, reply.received_ns);
    }

    fn replied(&self, reply: &PendingReply, error: i32, sent: bool, log: &SharedLog) {
        if !sent {
            self.telemetry.counters().dropped(Dropped::SendFailed);
        }
        // Service time from receipt, the log's result counters, the flight record.
        let now = clock::now_ns();
        let service_ns = now.saturating_sub(reply.received_ns);
        self.telemetry.observe_service(reply.kind(), service_ns);
        if let Some(kind) = reply.kind() {
            self.log.answered(kind, error, now, service_ns);
        }
        if reply.flight_id == 0 {
            return;
        }
        log.lock().flight.complete(FlightRecord::deferred(reply, service_ns, error));
    }

    fn device_written(&self, bytes: usize, ok: bool) {
        self.telemetry.counters().disk_write(bytes, ok);
    }

    fn image_written(&self, bytes: u64, elapsed_ns: u64, ok: bool) {
        self.log.metrics.flushed(bytes, elapsed_ns, ok);
    }

    fn legs_flushed(&self, ok: bool) {
        self.log.metrics.leg_flushed(ok);
    }

    fn mirror(&self) -> Option<Arc<str>> {
        self.log.mirror()
    }
}
