//! The Prometheus exposition: every `ulog_*` family built at scrape time from the telemetry
//! (relaxed atomic loads, log snapshots taken a chunk at a time), plus the `process_*` families
//! of the `prometheus` crate's process collector, encoded by its `TextEncoder`.
//!
//! Naming follows the Prometheus conventions: one `ulog_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` on counters, `_info` for the label-carrying mapping. Labels: `log` (the
//! short name of [`super::short_name`]), `type` (the kernel's request type name, `UNKNOWN` for
//! types outside 1..17), `result` (`ok`/`error`), `state`, `reason`, `stage`; never a region or a
//! sequence number. [`FAMILIES`] lists every family (the README's table is checked against it).

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use ulog_common::{RequestType, REQUEST_TYPE_COUNT};

use super::histogram::HistSnapshot;
use super::kernel::{Retry, Stage};
use super::regions::RegionState;
use super::{
    clock, cluster_region_counts, mirror, primary, type_label, type_slot, LogHandle, Telemetry, CLUSTER_TYPES,
    SLO_TYPES,
};
use crate::metrics::counters::Dropped;
use crate::region_log::dirty_log::Phase;
use crate::wire::protocol::Malformed;

/// Every `ulog_*` family: (name, type, labels, when it is exported).
pub const FAMILIES: &[(&str, &str, &str, &str)] = &[
    ("ulog_build_info", "gauge", "version, revision, ebpf", "always"),
    ("ulog_probe_attached", "gauge", "", "always"),
    ("ulog_probes_disabled", "gauge", "", "always"),
    ("ulog_receive_loop_idle_seconds", "gauge", "", "once the receive loop runs"),
    ("ulog_logs", "gauge", "type, state", "always"),
    ("ulog_requests_total", "counter", "log, type, result", "per log"),
    ("ulog_requests_without_log_total", "counter", "type", "always"),
    ("ulog_request_duration_seconds", "histogram", "type", "always, every type"),
    ("ulog_requests_after_stall_total", "counter", "type", "always, every type"),
    ("ulog_malformed_messages_total", "counter", "reason", "always"),
    ("ulog_dropped_messages_total", "counter", "reason", "always"),
    ("ulog_log_lines_dropped_total", "counter", "", "always"),
    ("ulog_kernel_reconnects_total", "counter", "log", "per log"),
    ("ulog_regions", "gauge", "log, state", "per log"),
    ("ulog_region_size_bytes", "gauge", "log", "per log"),
    ("ulog_resync_progress_ratio", "gauge", "log", "per log"),
    ("ulog_resync_remaining_seconds", "gauge", "log", "per log, when estimable"),
    ("ulog_log_request_duration_seconds", "histogram", "log, type", "per log, FLUSH and MARK_REGION"),
    ("ulog_region_dirty_duration_seconds", "histogram", "log", "per log"),
    ("ulog_region_dirty_untimed_total", "counter", "log", "per log"),
    ("ulog_log_last_resume_timestamp_seconds", "gauge", "log", "per log, once resumed"),
    ("ulog_log_info", "gauge", "log, uuid, type, device, mirror", "per log"),
    ("ulog_log_device_failed", "gauge", "log", "persistent logs"),
    ("ulog_disk_flush_duration_seconds", "histogram", "log", "persistent logs"),
    ("ulog_disk_flush_bytes_total", "counter", "log", "persistent logs"),
    ("ulog_disk_flush_errors_total", "counter", "log", "persistent logs"),
    ("ulog_leg_flushes_total", "counter", "log, result", "persistent logs"),
    ("ulog_leg_flush_failed", "gauge", "log", "persistent logs"),
    ("ulog_mirror_writes_total", "counter", "log", "logs whose mirror device is found"),
    ("ulog_mirror_written_bytes_total", "counter", "log", "logs whose mirror device is found"),
    ("ulog_kernel_requests_total", "counter", "type", "probe attached"),
    ("ulog_kernel_request_duration_seconds", "histogram", "type", "probe attached, latency probes"),
    ("ulog_kernel_request_stage_duration_seconds", "histogram", "type, stage", "probe attached, latency probes"),
    ("ulog_kernel_request_retries_total", "counter", "type, reason", "probe attached, retry probes"),
    ("ulog_kernel_reconnect_attempts_total", "counter", "", "probe attached, retry probes"),
    ("ulog_kernel_esrch_returns_total", "counter", "", "probe attached"),
    ("ulog_kernel_events_lost_total", "counter", "", "probe attached"),
    ("ulog_kernel_requests_untimed_total", "counter", "reason", "probe attached"),
    ("ulog_kernel_sends_total", "counter", "", "probe attached"),
    ("ulog_kernel_sends_unmatched_total", "counter", "", "probe attached"),
    ("ulog_kernel_requests_correlated_total", "counter", "type", "probe attached"),
    ("ulog_kernel_requests_uncorrelated_total", "counter", "reason", "probe attached"),
    ("ulog_kernel_correlation_inversions_total", "counter", "", "probe attached"),
    ("ulog_probe_run_seconds_total", "counter", "program", "probe attached, BPF statistics on"),
    ("ulog_probe_runs_total", "counter", "program", "probe attached, BPF statistics on"),
    ("ulog_cluster_quorate", "gauge", "", "cluster mode"),
    ("ulog_cluster_frames_sent_total", "counter", "", "cluster mode"),
    ("ulog_cluster_frames_delivered_total", "counter", "", "cluster mode"),
    ("ulog_cluster_frames_malformed_total", "counter", "", "cluster mode"),
    ("ulog_cluster_state_transfers_sent_total", "counter", "", "cluster mode"),
    ("ulog_cluster_state_transfer_sent_bytes_total", "counter", "", "cluster mode"),
    ("ulog_cluster_state_transfers_received_total", "counter", "", "cluster mode"),
    ("ulog_cluster_state_transfer_wait_seconds_total", "counter", "", "cluster mode"),
    ("ulog_cluster_geneses_total", "counter", "", "cluster mode"),
    ("ulog_cluster_resyncs_after_stale_total", "counter", "", "cluster mode"),
    ("ulog_cluster_cmirrord_refusals_total", "counter", "", "cluster mode"),
    ("ulog_cluster_digest_checks_total", "counter", "", "cluster mode"),
    ("ulog_cluster_digest_mismatches_total", "counter", "", "cluster mode"),
    ("ulog_cluster_recovery_restarts_total", "counter", "", "cluster mode"),
    ("ulog_cluster_recovery_restart_failures_total", "counter", "", "cluster mode"),
    ("ulog_cluster_disk_image_writes_total", "counter", "", "cluster mode"),
    ("ulog_cluster_disk_image_write_errors_total", "counter", "", "cluster mode"),
    ("ulog_cluster_bus_try_again_total", "counter", "", "cluster mode, transport started"),
    ("ulog_cluster_bus_interrupts_total", "counter", "", "cluster mode, transport started"),
    ("ulog_cluster_bus_reconnects_total", "counter", "", "cluster mode, transport started"),
    ("ulog_cluster_request_duration_seconds", "histogram", "type", "cluster mode, the engine's types"),
    ("ulog_cluster_members", "gauge", "log", "cluster logs"),
    ("ulog_cluster_holding_state", "gauge", "log", "cluster logs"),
    ("ulog_cluster_held_requests", "gauge", "log", "cluster logs"),
    ("ulog_cluster_log_refused", "gauge", "log", "cluster logs"),
    ("ulog_cluster_reclaimed_regions", "gauge", "log", "cluster logs, state held"),
    ("ulog_cluster_node_live", "gauge", "log, node", "cluster logs, per node sharing the log"),
    ("ulog_cluster_node_marked_regions", "gauge", "log, node", "cluster logs, per node sharing the log"),
    ("ulog_cluster_node_recovering", "gauge", "log, node", "cluster logs, per node sharing the log"),
];

struct Fam(MetricFamily);

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_string());
            l.set_value((*v).to_string());
            l
        })
        .collect()
}

impl Fam {
    fn new(name: &str, help: &str, ty: MetricType) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(ty);
        Self(mf)
    }
    fn counter(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::COUNTER)
    }
    fn gauge(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::GAUGE)
    }
    fn histogram(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::HISTOGRAM)
    }
    fn add_counter(&mut self, l: &[(&str, &str)], v: u64) {
        let mut c = Counter::default();
        c.set_value(v as f64);
        let mut m = Metric::from_label(labels(l));
        m.set_counter(c);
        self.0.mut_metric().push(m);
    }
    fn add_counter_f64(&mut self, l: &[(&str, &str)], v: f64) {
        let mut c = Counter::default();
        c.set_value(v);
        let mut m = Metric::from_label(labels(l));
        m.set_counter(c);
        self.0.mut_metric().push(m);
    }
    fn add_gauge(&mut self, l: &[(&str, &str)], v: f64) {
        if !v.is_finite() {
            return;
        }
        let mut g = Gauge::default();
        g.set_value(v);
        let mut m = Metric::from_label(labels(l));
        m.set_gauge(g);
        self.0.mut_metric().push(m);
    }
    fn add_histogram(&mut self, l: &[(&str, &str)], s: &HistSnapshot) {
        let mut h = Histogram::default();
        h.set_bucket(
            s.cumulative()
                .into_iter()
                .map(|(le, n)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(le);
                    b.set_cumulative_count(n);
                    b
                })
                .collect(),
        );
        h.set_sample_count(s.count());
        h.set_sample_sum(s.sum_seconds());
        let mut m = Metric::from_label(labels(l));
        m.set_histogram(h);
        self.0.mut_metric().push(m);
    }
    fn done(self, out: &mut Vec<MetricFamily>) {
        if !self.0.get_metric().is_empty() {
            out.push(self.0);
        }
    }
}

/// The per-log families of cluster logs.
struct ClusterLogFams {
    members: Fam,
    holding: Fam,
    held: Fam,
    refused: Fam,
    reclaimed: Fam,
    live: Fam,
    marked: Fam,
    recovering: Fam,
}

impl ClusterLogFams {
    fn new() -> Self {
        Self {
            members: Fam::gauge(
                "ulog_cluster_members",
                "Members of the log's corosync group (agents of the nodes that have the mirror active, this one included).",
            ),
            holding: Fam::gauge(
                "ulog_cluster_holding_state",
                "1 while this member holds the log's replicated state, else 0 (joining, fetching the state, or rejoining after losing quorum: its requests are held).",
            ),
            held: Fam::gauge(
                "ulog_cluster_held_requests",
                "Kernel requests of the log waiting for quorum, membership or the state (the mirror's I/O waits on them).",
            ),
            refused: Fam::gauge(
                "ulog_cluster_log_refused",
                "1 if the log was refused because cmirrord serves the same mirror on another node (its frames were seen on the group), else 0.",
            ),
            reclaimed: Fam::gauge(
                "ulog_cluster_reclaimed_regions",
                "Regions reclaimed from dead nodes (fencing confirmed, or the node rebooted) and not yet resynchronised: their legs may differ.",
            ),
            live: Fam::gauge(
                "ulog_cluster_node_live",
                "Per node sharing the log: 1 if its agent is a live member, 0 if it departed without releasing (its marks are held until its agent comes back under the same kernel or its death is confirmed by fencing).",
            ),
            marked: Fam::gauge(
                "ulog_cluster_node_marked_regions",
                "Per node sharing the log: regions its kernel marked and has not cleared (held while the node is not live).",
            ),
            recovering: Fam::gauge(
                "ulog_cluster_node_recovering",
                "Per node sharing the log: 1 if it has a recovery slot (a region handed out for resync), else 0.",
            ),
        }
    }

    fn add(&mut self, name: &str, st: &crate::cluster::engine::ClusterLogStatus) {
        let l = [("log", name)];
        self.members.add_gauge(&l, st.members.len() as f64);
        self.holding.add_gauge(&l, if st.holding { 1.0 } else { 0.0 });
        self.held.add_gauge(&l, st.held_requests as f64);
        self.refused.add_gauge(&l, if st.refused { 1.0 } else { 0.0 });
        if !st.holding {
            return;
        }
        self.reclaimed.add_gauge(&l, st.reclaimed as f64);
        for n in &st.nodes {
            let node = n.node.to_string();
            let l = [("log", name), ("node", node.as_str())];
            self.live.add_gauge(&l, if n.live { 1.0 } else { 0.0 });
            self.marked.add_gauge(&l, n.marked as f64);
            self.recovering.add_gauge(&l, if n.recovering.is_some() { 1.0 } else { 0.0 });
        }
    }

    fn done(self, out: &mut Vec<MetricFamily>) {
        for f in [
            self.members,
            self.holding,
            self.held,
            self.refused,
            self.reclaimed,
            self.live,
            self.marked,
            self.recovering,
        ] {
            f.done(out);
        }
    }
}

/// Builds the exposition.
pub struct Exporter {
    tel: Arc<Telemetry>,
    process: Option<prometheus::process_collector::ProcessCollector>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

/// The kernel-side `type` label of a probe counter slot (wire type; 0 = others): the agent's own
/// names, `UNKNOWN` for slot 0, so kernel and agent series join on `type`.
fn kernel_type_label(slot: usize) -> &'static str {
    u32::try_from(slot).ok().and_then(RequestType::from_raw).map_or("UNKNOWN", |t| t.name())
}

impl Exporter {
    /// An exporter of `tel`, with the process collector.
    pub fn new(tel: Arc<Telemetry>) -> Self {
        Self { tel, process: Some(prometheus::process_collector::ProcessCollector::for_self()) }
    }

    /// The text exposition (`text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(64 * 1024);
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&self.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding the metrics failed");
        }
        out
    }

    /// Every family, sorted by name.
    pub fn gather(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        self.global(&mut out);
        self.per_log(&mut out);
        self.cluster(&mut out);
        self.kernel(&mut out);
        if let Some(p) = &self.process {
            out.extend(p.collect());
        }
        out.sort_by(|a, b| a.name().cmp(b.name()));
        out
    }

    fn global(&self, out: &mut Vec<MetricFamily>) {
        let t = &self.tel;
        let c = t.counters();
        let mut f = Fam::gauge(
            "ulog_build_info",
            "ulog-agent's version, the commit it was built from, and whether its eBPF programs are embedded.",
        );
        f.add_gauge(
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("revision", env!("ULOG_GIT_REVISION")),
                ("ebpf", if cfg!(feature = "ebpf") { "true" } else { "false" }),
            ],
            1.0,
        );
        f.done(out);
        let mut f = Fam::gauge(
            "ulog_probe_attached",
            "1 while the eBPF probes (dm_consult_userspace entry and return, cn_netlink_send) are attached, else 0 (the reason is logged and in /api/v1/agent). Kernel-side families keep their last values while detached.",
        );
        f.add_gauge(&[], if t.probe_attached() { 1.0 } else { 0.0 });
        f.done(out);
        let mut f = Fam::gauge(
            "ulog_probes_disabled",
            "1 when the operator turned the eBPF probes off (--no-probes): a detached probe is intended (UlogProbeNotAttached stays quiet), else 0.",
        );
        f.add_gauge(&[], if t.probes_disabled() { 1.0 } else { 0.0 });
        f.done(out);
        // The receive loop beats at least every 250 ms, traffic or not, so a growing value means
        // a stuck loop (what /healthz reports), visible to Prometheus without a blackbox job.
        let hb = t.heartbeat_ns();
        if hb != 0 {
            let mut f = Fam::gauge(
                "ulog_receive_loop_idle_seconds",
                "Seconds since the netlink receive loop last ran (it runs at least every 250 ms, traffic or not; /healthz fails above its stall limit).",
            );
            f.add_gauge(&[], clock::now_ns().saturating_sub(hb) as f64 / 1e9);
            f.done(out);
        }

        let logs = t.logs();
        let mut f = Fam::gauge("ulog_logs", "Logs served, by log type and life-cycle state.");
        for kind in ["clustered-core", "clustered-disk"] {
            for phase in [Phase::Constructed, Phase::Resumed, Phase::Suspended] {
                let n = logs.iter().filter(|h| h.kind == kind && h.shared.lock().phase() == phase).count();
                f.add_gauge(&[("type", kind), ("state", phase.name())], n as f64);
            }
        }
        f.done(out);

        let mut f = Fam::counter(
            "ulog_requests_without_log_total",
            "Requests answered without a log: refused CTRs, requests for a (uuid, luid) the agent does not have (-EINVAL), and request types outside 1..17 (type UNKNOWN).",
        );
        for slot in 0..=REQUEST_TYPE_COUNT {
            let kind = RequestType::ALL.get(slot).copied();
            f.add_counter(&[("type", type_label(slot))], c.without_log_of(kind));
        }
        f.done(out);

        let mut f = Fam::histogram(
            "ulog_request_duration_seconds",
            "Agent service time: request received to reply sent (after the durable write for requests that wait for one), by request type.",
        );
        // Every type from the start, zeros included: a series that appears with its first
        // observation loses that increment to rate() (it has no earlier sample to differ from).
        for slot in 0..=REQUEST_TYPE_COUNT {
            f.add_histogram(&[("type", type_label(slot))], &t.service(slot).snapshot());
        }
        f.done(out);

        let mut f = Fam::counter(
            "ulog_requests_after_stall_total",
            "Requests served right after the receive loop was away from recvfrom for over 0.5 s (stopped, starved, or serving one slow request): they waited in the socket queue for an unknown part of that time, which ulog_request_duration_seconds does not include. By request type.",
        );
        for slot in 0..=REQUEST_TYPE_COUNT {
            f.add_counter(&[("type", type_label(slot))], c.after_stall_of(RequestType::ALL.get(slot).copied()));
        }
        f.done(out);

        let mut f = Fam::counter(
            "ulog_malformed_messages_total",
            "Malformed datagrams, by reason (answered -EINVAL where a reply can be matched, else dropped).",
        );
        for m in Malformed::ALL {
            f.add_counter(&[("reason", m.name())], c.malformed_of(m));
        }
        f.done(out);
        let mut f = Fam::counter(
            "ulog_dropped_messages_total",
            "Datagrams not served or replies not delivered, by reason (receive_overrun: the kernel's requests were lost to a full receive queue).",
        );
        for d in Dropped::ALL {
            f.add_counter(&[("reason", d.name())], c.dropped_of(d));
        }
        f.done(out);
        let mut f = Fam::counter(
            "ulog_log_lines_dropped_total",
            "Log lines dropped because stderr (a pipe, the journal) stopped draining and the logging queue was full: logging never blocks the request path.",
        );
        f.add_counter(&[], c.log_lines_dropped());
        f.done(out);
    }

    fn per_log(&self, out: &mut Vec<MetricFamily>) {
        let logs = self.tel.logs();
        let mirrors = self.tel.mirrors();
        let mut by_name: BTreeMap<&str, Vec<&Arc<LogHandle>>> = BTreeMap::new();
        for h in logs.iter() {
            by_name.entry(&h.tel.name).or_default().push(h);
        }
        let mut requests = Fam::counter(
            "ulog_requests_total",
            "Requests answered for a log, by request type and result (ok, or error: a negative errno). Divide by ulog_mirror_writes_total for the log requests each mirror write costs.",
        );
        let mut reconnects = Fam::counter(
            "ulog_kernel_reconnects_total",
            "Reconnect-form CTRs for this log (payload NUL-terminated): the kernel had lost its log server (agent down, or a request lost to a full receive queue) and re-created the log.",
        );
        let mut regions = Fam::gauge(
            "ulog_regions",
            "Regions by state: out_of_sync (awaiting resync), dirty (in sync, writes outstanding), clean. They add up to the log's region count.",
        );
        let mut region_size = Fam::gauge("ulog_region_size_bytes", "Region size.");
        let mut progress =
            Fam::gauge("ulog_resync_progress_ratio", "Regions in sync divided by all regions (1: fully in sync).");
        let mut eta = Fam::gauge(
            "ulog_resync_remaining_seconds",
            "Estimated time until every region is in sync, from the resync rate over the last 30 s (0 when in sync; absent while no progress is seen).",
        );
        let mut slo_service = Fam::histogram(
            "ulog_log_request_duration_seconds",
            "Agent service time of this log's FLUSH and MARK_REGION answers (the SLO types), over the SLO bucket edges only (0.0001, 0.016384, 15 s): 12 series per log, for per-log SLIs.",
        );
        let mut dirty = Fam::histogram(
            "ulog_region_dirty_duration_seconds",
            "How long regions stayed dirty: from the MARK that made a region dirty to the CLEAR that made it clean.",
        );
        let mut untimed = Fam::counter(
            "ulog_region_dirty_untimed_total",
            "Regions made dirty while the dirty-time table was full (not in ulog_region_dirty_duration_seconds).",
        );
        let mut resumed = Fam::gauge(
            "ulog_log_last_resume_timestamp_seconds",
            "When the log was last resumed (a RESUME answered successfully), seconds since the epoch.",
        );
        let mut info = Fam::gauge(
            "ulog_log_info",
            "Maps the log label to the log's dm uuid, type, log device or state file, and the dm name of its mirror (empty until found).",
        );
        let mut failed = Fam::gauge(
            "ulog_log_device_failed",
            "1 if the log device failed a read or write since the last successful resume (status D), else 0.",
        );
        let mut flush = Fam::histogram(
            "ulog_disk_flush_duration_seconds",
            "Durable writes of a persistent log's device or state file (one per group commit): duration.",
        );
        let mut flush_bytes = Fam::counter("ulog_disk_flush_bytes_total", "Bytes written by durable writes.");
        let mut flush_errors = Fam::counter("ulog_disk_flush_errors_total", "Durable writes that failed.");
        let mut leg_flushes = Fam::counter(
            "ulog_leg_flushes_total",
            "Flushes of the mirror legs' write caches before a write that carries clean bits (dm-log.c flush_callback), by result.",
        );
        let mut leg_failed = Fam::gauge(
            "ulog_leg_flush_failed",
            "1 once a flush of the mirror legs failed: every region was written dirty and clears are ignored until the table is reloaded, else 0.",
        );
        let mut writes = Fam::counter(
            "ulog_mirror_writes_total",
            "Writes completed by the log's mirror dm device (its /sys/block stat), the cost model's denominator.",
        );
        let mut written =
            Fam::counter("ulog_mirror_written_bytes_total", "Bytes written to the log's mirror dm device.");
        let mut cl = ClusterLogFams::new();

        for (name, hs) in by_name {
            let Some(p) = primary(hs.iter().copied()) else { continue };
            let l = [("log", name)];
            let m = &p.tel.metrics;
            for t in RequestType::ALL {
                let (ok, err) = m.requests_of(t);
                requests.add_counter(&[("log", name), ("type", t.name()), ("result", "ok")], ok);
                requests.add_counter(&[("log", name), ("type", t.name()), ("result", "error")], err);
            }
            reconnects.add_counter(&l, m.reconnects.load(std::sync::atomic::Ordering::Relaxed));
            // A cluster log's regions are the replicated state's (the local log is only the
            // table's shape), unknown while this member does not hold it.
            let cluster = p.cluster.as_ref().map(|v| v.status());
            let (counts, sync) = match &cluster {
                Some(st) => (cluster_region_counts(st), st.sync_count),
                None => (Some(p.tel.region_counts(&p.shared, p.region_count)), p.shared.lock().sync_count()),
            };
            region_size.add_gauge(&l, (p.region_size * 512) as f64);
            if let Some(counts) = counts {
                for s in RegionState::ALL {
                    regions.add_gauge(&[("log", name), ("state", s.name())], counts.get(s) as f64);
                }
                if p.region_count > 0 {
                    progress.add_gauge(&l, sync as f64 / p.region_count as f64);
                }
                if let (_, Some(s)) = p.tel.resync_estimate(p.region_count, sync) {
                    eta.add_gauge(&l, s);
                }
            }
            if let Some(st) = &cluster {
                cl.add(name, st);
            }
            // From the CTR on, zeros included (a series born with its first observation loses it
            // to rate()).
            for (t, h) in SLO_TYPES.iter().zip(&m.slo_service) {
                slo_service.add_histogram(&[("log", name), ("type", t.name())], &h.snapshot());
            }
            dirty.add_histogram(&l, &m.dirty.snapshot());
            untimed.add_counter(&l, m.dirty_untimed.load(std::sync::atomic::Ordering::Relaxed));
            let r = p.tel.resumed_ns.load(std::sync::atomic::Ordering::Relaxed);
            if r != 0 {
                resumed.add_gauge(&l, clock::unix_seconds(r));
            }
            let device = p.device.as_ref().map(|d| d.display().to_string()).unwrap_or_default();
            let mirror = mirrors.by_uuid.get(&p.uuid);
            info.add_gauge(
                &[
                    ("log", name),
                    ("uuid", &p.uuid),
                    ("type", p.kind),
                    ("device", &device),
                    ("mirror", mirror.map_or("", |m| m.name.as_str())),
                ],
                1.0,
            );
            if hs.iter().any(|h| h.persistent()) {
                failed.add_gauge(&l, if p.shared.device_failed() { 1.0 } else { 0.0 });
                flush.add_histogram(&l, &m.flush.snapshot());
                flush_bytes.add_counter(&l, m.flush_bytes.load(std::sync::atomic::Ordering::Relaxed));
                flush_errors.add_counter(&l, m.flush_errors.load(std::sync::atomic::Ordering::Relaxed));
                for (result, n) in ["ok", "error"].into_iter().zip(&m.leg_flushes) {
                    leg_flushes.add_counter(
                        &[("log", name), ("result", result)],
                        n.load(std::sync::atomic::Ordering::Relaxed),
                    );
                }
                leg_failed.add_gauge(&l, if p.shared.legs_flush_failed() { 1.0 } else { 0.0 });
            }
            if let Some(md) = mirror {
                if let Ok(st) = mirror::write_stats(md.major, md.minor) {
                    writes.add_counter(&l, st.writes);
                    written.add_counter(&l, st.sectors * 512);
                }
            }
        }
        for f in [
            requests,
            reconnects,
            regions,
            region_size,
            progress,
            eta,
            slo_service,
            dirty,
            untimed,
            resumed,
            info,
            failed,
            flush,
            flush_bytes,
            flush_errors,
            leg_flushes,
            leg_failed,
            writes,
            written,
        ] {
            f.done(out);
        }
        cl.done(out);
    }

    /// Cluster mode's agent-wide families: quorum, the engine's and the transport's counters,
    /// and the service time of the engine's answers.
    fn cluster(&self, out: &mut Vec<MetricFamily>) {
        let Some(stats) = self.tel.cluster() else { return };
        let e = &stats.engine;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let mut f = Fam::gauge(
            "ulog_cluster_quorate",
            "1 while this node is part of a quorate corosync partition, else 0: without quorum the cluster logs' requests that need agreement are held (mirror writes to clean regions wait).",
        );
        f.add_gauge(&[], load(&e.quorate).min(1) as f64);
        f.done(out);
        let counters: [(&str, &str, u64); 15] = [
            ("ulog_cluster_frames_sent_total", "Frames this agent multicast to its cluster logs' groups.", load(&e.frames_sent)),
            ("ulog_cluster_frames_delivered_total", "Frames corosync delivered to this agent (every group, every sender, its own included).", load(&e.frames_delivered)),
            ("ulog_cluster_frames_malformed_total", "Delivered frames that did not decode (a version mismatch or corruption; cmirrord's are counted in ulog_cluster_cmirrord_refusals_total).", load(&e.frames_malformed)),
            ("ulog_cluster_state_transfers_sent_total", "State transfers this agent sent as donor to a joining member.", load(&e.transfers_sent)),
            ("ulog_cluster_state_transfer_sent_bytes_total", "Bytes of log state this agent sent as donor.", load(&e.transfer_bytes_sent)),
            ("ulog_cluster_state_transfers_received_total", "State transfers this agent installed (a join, or a rejoin after losing quorum).", load(&e.transfers_received)),
            ("ulog_cluster_geneses_total", "Times a group started over from a fresh log because no member held the state (every region out of sync unless the table says nosync).", load(&e.geneses)),
            ("ulog_cluster_resyncs_after_stale_total", "Times this agent left a group and joined it again to fetch the state, after losing quorum or its local corosync while a member.", load(&e.resyncs_after_stale)),
            ("ulog_cluster_cmirrord_refusals_total", "Cluster logs refused because cmirrord serves the same mirror (its frames were seen on the group).", load(&e.cmirrord_refusals)),
            ("ulog_cluster_digest_checks_total", "Digest checkpoints where this agent compared its log state with the reference member's.", load(&e.digest_checks)),
            ("ulog_cluster_digest_mismatches_total", "Digest checkpoints where this agent's log state differed from the reference member's (it then left the group and fetched the state again).", load(&e.digest_mismatches)),
            ("ulog_cluster_recovery_restarts_total", "Times this agent suspended and resumed its mirror because recovery work waited that no node recovered (a kernel told the log was in sync asks for no work until its next resume).", load(&e.recovery_restarts)),
            ("ulog_cluster_recovery_restart_failures_total", "Recovery restarts that failed (no mirror on this node uses the log, or the suspend or resume failed).", load(&e.recovery_restart_failures)),
            ("ulog_cluster_disk_image_writes_total", "Images of clustered-disk logs this agent wrote to their shared log device as the log's disk writer (one node per log writes).", load(&e.disk_image_writes)),
            ("ulog_cluster_disk_image_write_errors_total", "Such writes that failed (the log's MARKs wait; retried every second).", load(&e.disk_image_write_errors)),
        ];
        for (name, help, v) in counters {
            let mut f = Fam::counter(name, help);
            f.add_counter(&[], v);
            f.done(out);
        }
        let mut f = Fam::counter(
            "ulog_cluster_state_transfer_wait_seconds_total",
            "Seconds this agent's logs waited for their state (from the first request for it to the installed transfer), summed over ulog_cluster_state_transfers_received_total: what a join costs (the joiner's requests wait meanwhile).",
        );
        f.add_counter_f64(&[], load(&e.transfer_wait_ns) as f64 / 1e9);
        f.done(out);
        if let Some(b) = &stats.bus {
            let counters: [(&str, &str, u64); 3] = [
                ("ulog_cluster_bus_try_again_total", "CS_ERR_TRY_AGAIN answers of corosync to a send or join (flow control: each one a retry later).", load(&b.try_again)),
                ("ulog_cluster_bus_interrupts_total", "CS_ERR_INTERRUPT answers of corosync to a send (each one a resend of the whole message).", load(&b.interrupts)),
                ("ulog_cluster_bus_reconnects_total", "Connections to the local corosync made again after one was lost (every group was left and joined again).", load(&b.reconnects)),
            ];
            for (name, help, v) in counters {
                let mut f = Fam::counter(name, help);
                f.add_counter(&[], v);
                f.done(out);
            }
        }
        let mut f = Fam::histogram(
            "ulog_cluster_request_duration_seconds",
            "Service time of the requests the cluster engine answered (received to reply sent: the group's ordering, MARK's acknowledgement by a second member, waits for quorum or the state), by request type.",
        );
        // The engine's types from the start, zeros included (see ulog_request_duration_seconds);
        // any other type once observed.
        for slot in 0..=REQUEST_TYPE_COUNT {
            let h = self.tel.cluster_service(slot).snapshot();
            let engine_type = CLUSTER_TYPES.iter().any(|&t| type_slot(Some(t)) == slot);
            if engine_type || h.count() > 0 {
                f.add_histogram(&[("type", type_label(slot))], &h);
            }
        }
        f.done(out);
    }

    fn kernel(&self, out: &mut Vec<MetricFamily>) {
        let Some(src) = self.tel.kernel_source() else { return };
        let k = src.kernel_stats();
        let mut f = Fam::counter(
            "ulog_kernel_requests_total",
            "Requests the kernel sent (dm_consult_userspace calls, seen by the eBPF probe since it was attached), by request type.",
        );
        for (slot, &n) in k.requests.iter().enumerate() {
            f.add_counter(&[("type", kernel_type_label(slot))], n);
        }
        f.done(out);
        if let Some(rt) = &k.round_trip {
            let mut f = Fam::histogram(
                "ulog_kernel_request_duration_seconds",
                "Kernel-side round trip of a request (dm_consult_userspace entry to return), by request type. Log2 buckets only.",
            );
            // Every type while attached, zeros included (see ulog_request_duration_seconds).
            for (slot, h) in rt.iter().enumerate() {
                f.add_histogram(
                    &[("type", kernel_type_label(slot))],
                    &HistSnapshot::from_kernel_slots(&h.slots, h.sum_ns),
                );
            }
            f.done(out);
        }
        if let Some(stages) = &k.stages {
            let mut f = Fam::histogram(
                "ulog_kernel_request_stage_duration_seconds",
                "The stages of kernel-side round trips correlated by seq with the agent: send (the answered attempt's cn_netlink_send to the agent's receive), server (in the agent, to the reply's sendto), wakeup (until dm_consult_userspace returns). Log2 buckets only.",
            );
            for (stage, per_type) in Stage::ALL.iter().zip(stages.iter()) {
                for (slot, h) in per_type.iter().enumerate() {
                    let s = HistSnapshot::from_kernel_slots(&h.slots, h.sum_ns);
                    f.add_histogram(&[("type", kernel_type_label(slot)), ("stage", stage.name())], &s);
                }
            }
            f.done(out);
        }
        if let Some(retries) = &k.retries {
            let mut f = Fam::counter(
                "ulog_kernel_request_retries_total",
                "Requests the kernel sent again: after its 15 s timeout, or at once after -EAGAIN.",
            );
            for (slot, per_reason) in retries.iter().enumerate() {
                for (reason, &n) in Retry::ALL.iter().zip(per_reason) {
                    f.add_counter(&[("type", kernel_type_label(slot)), ("reason", reason.name())], n);
                }
            }
            f.done(out);
        }
        if let Some(n) = k.reconnect_attempts {
            let mut f = Fam::counter(
                "ulog_kernel_reconnect_attempts_total",
                "CTRs sent by the kernel's -ESRCH reconnect loop (every 2 s while no log server answers), answered or not.",
            );
            f.add_counter(&[], n);
            f.done(out);
        }
        let single = |out: &mut Vec<MetricFamily>, name: &str, help: &str, v: Option<u64>| {
            if let Some(n) = v {
                let mut f = Fam::counter(name, help);
                f.add_counter(&[], n);
                f.done(out);
            }
        };
        single(
            out,
            "ulog_kernel_esrch_returns_total",
            "dm_consult_userspace calls that returned -ESRCH (not in the round-trip histograms): nobody listened, every listener's receive queue was full (see ulog_dropped_messages_total{reason=\"receive_overrun\"}), or the agent answered -ESRCH itself (a log it does not know, after a restart; those are correlated).",
            k.esrch_returns,
        );
        single(
            out,
            "ulog_kernel_events_lost_total",
            "Per-request events the probes' ring buffer had no room for (the histograms and counters are unaffected; only correlation loses them).",
            k.events_lost,
        );
        if let (Some(full), Some(unmatched)) = (k.inflight_full, k.unmatched_returns) {
            let mut f = Fam::counter(
                "ulog_kernel_requests_untimed_total",
                "Calls the probes saw only in part, so not in ulog_kernel_request_duration_seconds: inflight_full (entry seen, the in-flight map was full), unmatched_return (return seen without its entry: the probe attached during the call). Returns the kretprobe missed (more tasks waiting than its maxactive) are in neither: compare ulog_kernel_requests_total with the histogram's _count.",
            );
            f.add_counter(&[("reason", "inflight_full")], full);
            f.add_counter(&[("reason", "unmatched_return")], unmatched);
            f.done(out);
        }
        single(
            out,
            "ulog_kernel_sends_total",
            "dm-log-userspace messages the send probe saw (cn_netlink_send to {7,1}): first attempts, resends and the reconnect loop's CTRs.",
            k.sends,
        );
        single(
            out,
            "ulog_kernel_sends_unmatched_total",
            "dm-log-userspace sends seen outside a timed dm_consult_userspace call (its entry was not recorded).",
            k.sends_unmatched,
        );
        if let Some(c) = &k.correlation {
            let mut f = Fam::counter(
                "ulog_kernel_requests_correlated_total",
                "Kernel requests matched by seq with the agent's receive and reply (the stage histograms count these), by request type.",
            );
            for (slot, &n) in c.correlated.iter().enumerate() {
                f.add_counter(&[("type", kernel_type_label(slot))], n);
            }
            f.done(out);
            let mut f = Fam::counter(
                "ulog_kernel_requests_uncorrelated_total",
                "Kernel requests not matched with the agent: no_send (nothing was sent), no_server (-ESRCH, and the agent never received the request: not listening yet or any more, or its receive queue was full), not_seen (not answered by this agent).",
            );
            for (reason, n) in &c.uncorrelated {
                f.add_counter(&[("reason", reason)], *n);
            }
            f.done(out);
            single(
                out,
                "ulog_kernel_correlation_inversions_total",
                "Correlated requests whose kernel round trip was shorter than the agent's service time (impossible with one clock: should stay 0).",
                Some(c.inversions),
            );
        }
        if !k.programs.is_empty() {
            let mut t = Fam::counter(
                "ulog_probe_run_seconds_total",
                "Time the kernel spent running each eBPF program of the agent (kernel BPF statistics; counted while they are enabled).",
            );
            let mut r = Fam::counter(
                "ulog_probe_runs_total",
                "Runs of each eBPF program of the agent (kernel BPF statistics).",
            );
            for p in &k.programs {
                let mut c = Counter::default();
                c.set_value(p.run_ns as f64 / 1e9);
                let mut m = Metric::from_label(labels(&[("program", p.program)]));
                m.set_counter(c);
                t.0.mut_metric().push(m);
                r.add_counter(&[("program", p.program)], p.runs);
            }
            t.done(out);
            r.done(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    use super::{Exporter, FAMILIES};
    use crate::cluster::bus::BusStats;
    use crate::cluster::engine::EngineStats;
    use crate::metrics::test_support::{handle, three_node_view};
    use crate::metrics::Telemetry;
    use ulog_common::RequestType;

    /// The exposition's sample lines (no HELP/TYPE), for exact matches.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    /// A single-node agent exports no cluster family, and its log's regions are its own.
    #[test]
    fn single_node_exports_no_cluster_family() {
        let tel = Arc::new(Telemetry::new(Arc::default()));
        tel.add_log(handle(&tel, "LVM-single", None));
        tel.observe_cluster_service(Some(RequestType::MarkRegion), 1_000);
        let text = Exporter::new(Arc::clone(&tel)).render();
        assert!(!text.contains("ulog_cluster_"), "cluster families on a single node:\n{text}");
        let s = samples(&text);
        assert!(s.contains(&"ulog_regions{log=\"single\",state=\"out_of_sync\"} 100"), "{s:#?}");
    }

    /// A cluster log's families carry its replicated state ([`three_node_view`]).
    #[test]
    fn cluster_families_carry_the_replicated_state() {
        let view = three_node_view();
        let tel = Arc::new(Telemetry::new(Arc::default()));
        tel.add_log(handle(&tel, "LVM-shared", Some(Arc::clone(&view))));
        let exporter = Exporter::new(Arc::clone(&tel));
        // The log's families come with the log; the agent-wide ones with cluster mode.
        let text = exporter.render();
        assert!(text.contains("ulog_cluster_members{log=\"shared\"} 1"), "{text}");
        assert!(!text.contains("ulog_cluster_quorate"), "agent-wide families before set_cluster");

        let engine = Arc::new(EngineStats::default());
        engine.quorate.store(1, Relaxed);
        engine.frames_sent.store(11, Relaxed);
        engine.transfer_bytes_sent.store(4096, Relaxed);
        engine.cmirrord_refusals.store(2, Relaxed);
        let bus = Arc::new(BusStats::default());
        bus.try_again.store(7, Relaxed);
        tel.set_cluster(Arc::clone(&engine), Some(bus));
        tel.observe_cluster_service(Some(RequestType::MarkRegion), 3_000_000);
        let text = exporter.render();
        let s = samples(&text);
        for want in [
            "ulog_cluster_quorate 1",
            "ulog_cluster_frames_sent_total 11",
            "ulog_cluster_state_transfer_sent_bytes_total 4096",
            "ulog_cluster_cmirrord_refusals_total 2",
            "ulog_cluster_geneses_total 0",
            "ulog_cluster_bus_try_again_total 7",
            "ulog_cluster_bus_reconnects_total 0",
            "ulog_cluster_members{log=\"shared\"} 1",
            "ulog_cluster_holding_state{log=\"shared\"} 1",
            "ulog_cluster_held_requests{log=\"shared\"} 5",
            "ulog_cluster_log_refused{log=\"shared\"} 0",
            // 7 and 8 reclaimed, neither resynchronised yet (7 is in node 1's slot).
            "ulog_cluster_reclaimed_regions{log=\"shared\"} 2",
            "ulog_cluster_node_live{log=\"shared\",node=\"1\"} 1",
            "ulog_cluster_node_live{log=\"shared\",node=\"2\"} 0",
            "ulog_cluster_node_marked_regions{log=\"shared\",node=\"1\"} 3",
            "ulog_cluster_node_marked_regions{log=\"shared\",node=\"2\"} 2",
            "ulog_cluster_node_recovering{log=\"shared\",node=\"1\"} 1",
            "ulog_cluster_node_recovering{log=\"shared\",node=\"2\"} 0",
            "ulog_cluster_request_duration_seconds_count{type=\"MARK_REGION\"} 1",
            "ulog_cluster_request_duration_seconds_bucket{type=\"MARK_REGION\",le=\"0.002048\"} 0",
            "ulog_cluster_request_duration_seconds_bucket{type=\"MARK_REGION\",le=\"0.004096\"} 1",
            "ulog_cluster_request_duration_seconds_count{type=\"FLUSH\"} 0",
            // The regions are the replicated state's, not the (untouched) local log's: 7, 8
            // reclaimed and 3, 4 held by node 2 are out of sync; 1, 2 (node 1's) are dirty.
            "ulog_regions{log=\"shared\",state=\"out_of_sync\"} 4",
            "ulog_regions{log=\"shared\",state=\"dirty\"} 2",
            "ulog_regions{log=\"shared\",state=\"clean\"} 94",
            "ulog_resync_progress_ratio{log=\"shared\"} 0.96",
        ] {
            assert!(s.contains(&want), "{want} not in the exposition:\n{}", s.join("\n"));
        }
        assert!(!s.iter().any(|l| l.contains("node=\"3\"")), "the fenced node's share is gone");
        assert!(!text.contains("ulog_cluster_request_duration_seconds_count{type=\"IN_SYNC\"}"), "answered locally");
        // The README documents every family exported here.
        for line in &s {
            let fam = line.split(['{', ' ']).next().unwrap();
            let base = fam.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
            if base.starts_with("ulog_cluster_") {
                assert!(FAMILIES.iter().any(|f| f.0 == base), "{base} not in FAMILIES");
            }
        }
    }

    /// The README's metric table is what operators read: every family is in it with the type
    /// and labels the exporter writes, and it names no family the exporter does not have.
    #[test]
    fn the_readme_metric_table_matches_the_families() {
        let readme = include_str!("../../../README.md");
        let mut documented = std::collections::BTreeMap::new();
        for row in readme.lines().filter(|l| l.starts_with("| `ulog_")) {
            let cols: Vec<&str> = row.split('|').map(str::trim).collect();
            // "", names, type, labels, what, ""
            assert!(cols.len() >= 5, "a metric row has name, type, labels and text: {row}");
            for name in cols[1].split(',') {
                let name = name.trim().trim_matches('`');
                let prev = documented.insert(name.to_owned(), (cols[2].to_owned(), cols[3].to_owned()));
                assert!(prev.is_none(), "{name} is in the README's table twice");
            }
        }
        for (name, kind, labels, _) in FAMILIES {
            let Some((doc_kind, doc_labels)) = documented.remove(*name) else {
                panic!("{name} is exported but not in the README's metric table");
            };
            assert_eq!((doc_kind.as_str(), doc_labels.as_str()), (*kind, *labels), "README row of {name}");
        }
        assert!(documented.is_empty(), "the README documents families the agent does not export: {documented:?}");
    }
}
