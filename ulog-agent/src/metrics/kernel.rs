//! The boundary between the kernel-side probes and the metrics: [`KernelStats`] is what the
//! probes measured, cumulative since the agent started (over every attachment: a detach at module
//! unload folds the last figures into a base, so counters never go backwards); [`KernelSource`]
//! is how the exporter asks for it (at scrape time, off the request path). The source is
//! `telemetry::KernelTelemetry`.
//!
//! Histograms cross the boundary as log2 slots in the layout of [`super::histogram::kernel_slot`]
//! (the eBPF program buckets exactly that way, edges included; a test pins the mapping).

use super::histogram::KERNEL_SLOTS;

/// A kernel-side latency histogram: `slots[k]` counts durations in slot `k` of
/// [`super::histogram::kernel_slot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log2Hist {
    /// Counts per slot ([`KERNEL_SLOTS`] of them).
    pub slots: Vec<u64>,
    /// Sum of the durations, ns.
    pub sum_ns: u64,
}

impl Default for Log2Hist {
    fn default() -> Self {
        Self { slots: vec![0; KERNEL_SLOTS], sum_ns: 0 }
    }
}

/// The three stages of a kernel round trip (`dm_consult_userspace` entry to return), in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The answered attempt's `cn_netlink_send` to the agent's receive (`recvfrom` returned).
    Send,
    /// In the agent: received to reply handed to `sendto`.
    Server,
    /// Reply handed to `sendto` until the waiting kernel thread returns from
    /// `dm_consult_userspace`.
    Wakeup,
}

impl Stage {
    /// Every stage, in order (the index into [`KernelStats::stages`]).
    pub const ALL: [Stage; 3] = [Stage::Send, Stage::Server, Stage::Wakeup];
    /// The `stage` label value.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Send => "send",
            Stage::Server => "server",
            Stage::Wakeup => "wakeup",
        }
    }
}

/// Why the kernel sent a request again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// No answer within 15 s (`DM_ULOG_RETRY_TIMEOUT`): resent with a new seq.
    Timeout,
    /// Answered -EAGAIN: resent at once.
    Eagain,
}

impl Retry {
    /// Every reason, in order (the index into [`KernelStats::retries`]).
    pub const ALL: [Retry; 2] = [Retry::Timeout, Retry::Eagain];
    /// The `reason` label value.
    pub const fn name(self) -> &'static str {
        match self {
            Retry::Timeout => "timeout",
            Retry::Eagain => "eagain",
        }
    }
}

/// What the probes measured. Indexes by request type are the probe's counter slots
/// (`ulog_common::probes::request_counter_slot`: the wire type, 0 for others).
/// `None`: not measured (the family is not exported).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Requests the kernel sent (`dm_consult_userspace` calls), by slot.
    pub requests: Vec<u64>,
    /// Round trip (entry to return of `dm_consult_userspace`), by slot.
    pub round_trip: Option<Vec<Log2Hist>>,
    /// The stages of correlated round trips: `stages[stage][slot]`, stage in [`Stage::ALL`] order.
    pub stages: Option<[Vec<Log2Hist>; 3]>,
    /// Resends: `retries[slot][reason]`, reason in [`Retry::ALL`] order.
    pub retries: Option<Vec<[u64; 2]>>,
    /// CTRs sent by the kernel's -ESRCH reconnect loop (every 2 s while no server answers),
    /// answered or not.
    pub reconnect_attempts: Option<u64>,
    /// Calls that returned -ESRCH (no log server listening).
    pub esrch_returns: Option<u64>,
    /// Per-request events the ring buffer had no room for.
    pub events_lost: Option<u64>,
    /// Calls counted but not timed because the in-flight map was full.
    pub inflight_full: Option<u64>,
    /// Returns seen without a recorded entry (the probe attached during the call).
    pub unmatched_returns: Option<u64>,
    /// dm-log-userspace messages seen by the send probe.
    pub sends: Option<u64>,
    /// dm-log-userspace sends outside a timed call.
    pub sends_unmatched: Option<u64>,
    /// Correlation by seq with the agent's own receive/reply times.
    pub correlation: Option<Correlation>,
    /// Run time and count of each eBPF program (kernel BPF statistics), while enabled.
    pub programs: Vec<ProgramRun>,
}

/// Correlation counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Correlation {
    /// Correlated requests by slot.
    pub correlated: Vec<u64>,
    /// Uncorrelated events, by reason label.
    pub uncorrelated: Vec<(&'static str, u64)>,
    /// Correlated requests whose kernel total was below the agent's service time (never
    /// expected: the clocks are the same).
    pub inversions: u64,
}

/// One eBPF program's cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramRun {
    /// Program name.
    pub program: &'static str,
    /// Total run time, ns.
    pub run_ns: u64,
    /// Runs.
    pub runs: u64,
}

/// Something that can say what the kernel did.
pub trait KernelSource: Send + Sync {
    /// The current cumulative figures.
    fn kernel_stats(&self) -> KernelStats;

    /// The most recent correlated requests, newest first: all of them (`slow` false) or those
    /// whose kernel total reached the slow threshold; with that threshold in ns.
    fn recent_requests(&self, slow: bool) -> (u64, Vec<crate::telemetry::correlate::Correlated>) {
        let _ = slow;
        (0, Vec::new())
    }
}
