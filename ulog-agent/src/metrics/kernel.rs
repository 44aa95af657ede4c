//! The boundary between the kernel-side probes and the metrics: [`KernelStats`] is what a probe
//! set measured, cumulative since it was attached; [`KernelSource`] is how the exporter asks for
//! it (at scrape time, off the request path).
//!
//! Today's probe ([`ProbeSet`]) counts requests by type only; the round trip, its stages and the
//! retry counters are `None` and their metric families are not exported. The eBPF latency work
//! fills them in (`impl KernelSource for ProbeSet` below is the one place to change), and the
//! families appear: nothing else in the exporter changes.
//!
//! Histograms cross the boundary as log2 slots in the layout of [`super::histogram::kernel_slot`]
//! (the eBPF program must bucket exactly that way, edges included; a test pins the mapping).

use ulog_common::probes::REQUEST_COUNTER_SLOTS;

use super::histogram::KERNEL_SLOTS;
use crate::telemetry::probes::ProbeSet;

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
    /// Building the request and queueing it to the connector socket (`cn_netlink_send`).
    Send,
    /// Queued until the reply arrives in `cn_ulog_callback`: the agent's wake-up, service and
    /// reply.
    Server,
    /// Reply received until the waiting kernel thread runs again and returns.
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

/// What the probes measured since they were attached. Indexes by request type are the probe's
/// counter slots (`ulog_common::probes::request_counter_slot`: the wire type, 0 for others).
/// `None`: this probe build does not measure it (the family is not exported).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Requests the kernel sent (`dm_consult_userspace` calls), by slot.
    pub requests: Vec<u64>,
    /// Round trip (entry to return of `dm_consult_userspace`), by slot.
    pub round_trip: Option<Vec<Log2Hist>>,
    /// The stages of the round trip: `stages[stage][slot]`, stage in [`Stage::ALL`] order.
    pub stages: Option<[Vec<Log2Hist>; 3]>,
    /// Resends: `retries[slot][reason]`, reason in [`Retry::ALL`] order.
    pub retries: Option<Vec<[u64; 2]>>,
    /// CTRs sent by the kernel's -ESRCH reconnect loop (every 2 s while no server answers),
    /// answered or not.
    pub reconnect_attempts: Option<u64>,
}

/// Something that can say what the kernel did (the attached probes, or a test double).
pub trait KernelSource: Send + Sync {
    /// The current cumulative figures.
    fn kernel_stats(&self) -> KernelStats;
}

impl KernelSource for ProbeSet {
    fn kernel_stats(&self) -> KernelStats {
        let counts = self.request_counts();
        debug_assert_eq!(counts.len(), REQUEST_COUNTER_SLOTS);
        KernelStats { requests: counts.to_vec(), ..KernelStats::default() }
    }
}
