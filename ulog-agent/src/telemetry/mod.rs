//! Kernel-side telemetry: the eBPF probes and what the agent makes of them.
//!
//! - [`probes`] loads the embedded eBPF object and reads its maps. Telemetry is best effort: when
//!   the kernel or the build cannot provide it, [`probes::ProbeSet::start`] returns a
//!   [`probes::ProbeError`] and the agent logs one line and serves requests all the same.
//! - [`manager`] is the probe thread: attaches when `dm_log_userspace` appears (also after the
//!   agent started), detaches when it goes away (and reattaches to a reloaded module), and
//!   drains the event ring buffer into the [`correlate::Correlator`].
//! - [`correlate`]: the request path's seq table and the join of kernel events with it.
//! - [`KernelTelemetry`] keeps it all across attachments and is the exporter's
//!   [`KernelSource`].

pub mod correlate;
pub mod manager;
pub mod probes;

use std::sync::{Mutex, MutexGuard, PoisonError};

use ulog_common::probes::{
    C_ESRCH_RETURNS, C_EVENTS_LOST, C_INFLIGHT_FULL, C_RECONNECT_ATTEMPTS, C_SENDS, C_SENDS_UNMATCHED,
    C_UNMATCHED_RETURNS, HIST_SLOTS, REQUEST_COUNTER_SLOTS, RETRY_EAGAIN, RETRY_TIMEOUT,
};

use crate::metrics::histogram::KERNEL_SLOTS;
use crate::metrics::kernel::{Correlation, KernelSource, KernelStats, Log2Hist, ProgramRun};
use correlate::{Correlated, Correlator, Uncorrelated};
use probes::{ProbeSet, RawCounts};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Attachment {
    probes: Option<ProbeSet>,
    /// What earlier attachments counted (folded in at detach).
    base: RawCounts,
    /// Program run time and count of earlier attachments, by program.
    base_runs: Vec<(&'static str, u64, u64)>,
    /// Attachments so far.
    attachments: u64,
}

/// The kernel-side figures over the agent's life: the attached probes (if any), what earlier
/// attachments counted, and the correlation. Read at scrape time and by the status API; written
/// by the probe thread. Never touched by the request path (which only writes the seq table in
/// [`crate::metrics::Telemetry`]).
#[derive(Debug)]
pub struct KernelTelemetry {
    state: Mutex<Attachment>,
    corr: Mutex<Correlator>,
}

impl KernelTelemetry {
    /// Nothing attached yet; requests of `slow_ns` or more (kernel total) are kept as slow.
    pub fn new(slow_ns: u64) -> Self {
        Self { state: Mutex::default(), corr: Mutex::new(Correlator::new(slow_ns)) }
    }

    /// Takes over an attached probe set.
    pub fn attach(&self, probes: ProbeSet) {
        let mut s = lock(&self.state);
        s.probes = Some(probes);
        s.attachments += 1;
    }

    /// Detaches (drops) the probe set, keeping what it counted.
    pub fn detach(&self) {
        let mut s = lock(&self.state);
        if let Some(p) = s.probes.take() {
            let last = p.counts();
            s.base.add(&last);
            for (name, ns, runs) in p.program_runs() {
                match s.base_runs.iter_mut().find(|(n, _, _)| *n == name) {
                    Some(e) => {
                        e.1 += ns;
                        e.2 += runs;
                    }
                    None => s.base_runs.push((name, ns, runs)),
                }
            }
        }
    }

    /// Whether a probe set is attached.
    pub fn attached(&self) -> bool {
        lock(&self.state).probes.is_some()
    }

    /// How many times probes were attached.
    pub fn attachments(&self) -> u64 {
        lock(&self.state).attachments
    }

    /// Every map's figures over every attachment.
    pub fn raw(&self) -> RawCounts {
        let s = lock(&self.state);
        let mut total = s.base.clone();
        if let Some(p) = &s.probes {
            total.add(&p.counts());
        }
        total
    }

    fn runs(&self) -> Vec<ProgramRun> {
        let s = lock(&self.state);
        let mut out: Vec<ProgramRun> =
            s.base_runs.iter().map(|&(program, run_ns, runs)| ProgramRun { program, run_ns, runs }).collect();
        if let Some(p) = &s.probes {
            for (program, ns, n) in p.program_runs() {
                match out.iter_mut().find(|r| r.program == program) {
                    Some(r) => {
                        r.run_ns += ns;
                        r.runs += n;
                    }
                    None => out.push(ProgramRun { program, run_ns: ns, runs: n }),
                }
            }
        }
        out
    }

    /// Requests the kernel sent, by counter slot, over every attachment.
    pub fn request_counts(&self) -> Vec<u64> {
        self.raw().requests
    }

    /// Joins one kernel event with the request path's seq table (probe thread).
    pub fn process(
        &self,
        ev: &ulog_common::probes::RequestEvent,
        seqs: &correlate::SeqTable,
    ) -> Result<Correlated, Uncorrelated> {
        lock(&self.corr).process(ev, seqs)
    }
}

impl KernelSource for KernelTelemetry {
    fn kernel_stats(&self) -> KernelStats {
        let raw = self.raw();
        let round_trip = (0..REQUEST_COUNTER_SLOTS)
            .map(|slot| {
                let mut slots = vec![0u64; KERNEL_SLOTS];
                let from = slot * HIST_SLOTS;
                for (k, s) in slots.iter_mut().enumerate().take(HIST_SLOTS) {
                    *s = raw.hist.get(from + k).copied().unwrap_or(0);
                }
                Log2Hist { slots, sum_ns: raw.sums.get(slot).copied().unwrap_or(0) }
            })
            .collect();
        let retries = (0..REQUEST_COUNTER_SLOTS)
            .map(|slot| {
                let at = |reason: usize| raw.retries.get(slot * 2 + reason).copied().unwrap_or(0);
                [at(RETRY_TIMEOUT), at(RETRY_EAGAIN)]
            })
            .collect();
        let (stages, correlation) = {
            let c = lock(&self.corr);
            (
                c.stats.stages.clone(),
                Correlation {
                    correlated: c.stats.correlated.clone(),
                    uncorrelated: Uncorrelated::ALL
                        .iter()
                        .map(|u| (u.name(), c.stats.uncorrelated[*u as usize]))
                        .collect(),
                    inversions: c.stats.inversions,
                },
            )
        };
        KernelStats {
            requests: raw.requests.clone(),
            round_trip: Some(round_trip),
            stages: Some(stages),
            retries: Some(retries),
            reconnect_attempts: Some(raw.counter(C_RECONNECT_ATTEMPTS)),
            esrch_returns: Some(raw.counter(C_ESRCH_RETURNS)),
            events_lost: Some(raw.counter(C_EVENTS_LOST)),
            inflight_full: Some(raw.counter(C_INFLIGHT_FULL)),
            unmatched_returns: Some(raw.counter(C_UNMATCHED_RETURNS)),
            sends: Some(raw.counter(C_SENDS)),
            sends_unmatched: Some(raw.counter(C_SENDS_UNMATCHED)),
            correlation: Some(correlation),
            programs: self.runs(),
        }
    }

    fn recent_requests(&self, slow: bool) -> (u64, Vec<Correlated>) {
        let c = lock(&self.corr);
        let q = if slow { &c.slow } else { &c.recent };
        (c.slow_ns, q.iter().rev().copied().collect())
    }
}
