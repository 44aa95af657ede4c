//! The JSON documents of the API (`openapi.json` at the crate root describes them; a test checks
//! live responses against it). Built from snapshots: a log's mutex is held only to copy.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use ulog_common::{RequestType, REQUEST_TYPE_COUNT};

pub use crate::cluster::engine::{ClusterLogStatus, NodeStatus};
use crate::metrics::flight::{FlightRecord, PENDING};
use crate::metrics::histogram::HistSnapshot;
use crate::metrics::regions::RegionCounts;
use crate::metrics::{clock, mirror, type_label, LogHandle, Telemetry};
use crate::wire::kernel_peer::errno_name;

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn at(ns: u64) -> String {
    rfc3339(clock::system(ns))
}

/// A luid as the API shows it: hex (kernel addresses do not fit a JSON number exactly).
pub fn luid_hex(luid: u64) -> String {
    format!("{luid:#018x}")
}

/// Parses `0x...` hex or decimal.
pub fn parse_luid(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A latency or duration distribution.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Distribution {
    /// Observations.
    pub count: u64,
    /// Their sum, seconds.
    pub sum_seconds: f64,
    /// Estimated median (null without observations).
    pub p50_seconds: Option<f64>,
    /// Estimated 90th percentile.
    pub p90_seconds: Option<f64>,
    /// Estimated 99th percentile.
    pub p99_seconds: Option<f64>,
    /// `[le_seconds, cumulative count]` per finite bucket edge (the `+Inf` bucket is `count`).
    pub buckets: Vec<(f64, u64)>,
}

impl Distribution {
    /// From a histogram snapshot.
    pub fn of(s: &HistSnapshot) -> Self {
        Self {
            count: s.count(),
            sum_seconds: s.sum_seconds(),
            p50_seconds: s.quantile(0.5),
            p90_seconds: s.quantile(0.9),
            p99_seconds: s.quantile(0.99),
            buckets: s.cumulative(),
        }
    }
}

/// Per request type figures of the whole agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TypeStats {
    /// Request type name (`UNKNOWN`: types outside 1..17).
    #[serde(rename = "type")]
    pub kind: String,
    /// Requests received (answered or waiting for a durable write).
    pub requests: u64,
    /// Answered with an error.
    pub errors: u64,
    /// Answered after a durable write.
    pub deferred: u64,
    /// Answered without a log (unknown log, refused CTR, unknown type).
    pub without_log: u64,
    /// Agent service time.
    pub service_time: Distribution,
}

/// `GET /api/v1/agent`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentInfo {
    /// ulog-agent's version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// When the agent started.
    pub started_at: String,
    /// Seconds since then.
    pub uptime_seconds: f64,
    /// `starting`, `serving` or `stopping`.
    pub state: String,
    /// Seconds since the receive loop last ran (it runs at least 4 times a second).
    pub receive_loop_idle_seconds: Option<f64>,
    /// Whether the eBPF probe is attached, and what it said.
    pub probe: ProbeInfo,
    /// Logs served.
    pub logs: usize,
    /// Per request type.
    pub requests: Vec<TypeStats>,
    /// Malformed datagrams by reason.
    pub malformed: BTreeMap<String, u64>,
    /// Dropped datagrams by reason.
    pub dropped: BTreeMap<String, u64>,
    /// The mirror-device mapping's last refresh.
    pub mirror_discovery: MirrorDiscovery,
    /// Cluster mode only: quorum and the engine's and transport's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<AgentCluster>,
}

/// The agent's cluster mode (`--cluster`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentCluster {
    /// The node is part of a quorate corosync partition (without quorum, cluster requests that
    /// need agreement are held).
    pub quorate: bool,
    /// Frames multicast.
    pub frames_sent: u64,
    /// Frames delivered (every group and sender).
    pub frames_delivered: u64,
    /// Delivered frames that did not decode.
    pub frames_malformed: u64,
    /// State transfers sent as donor.
    pub state_transfers_sent: u64,
    /// Bytes of state sent as donor.
    pub state_transfer_sent_bytes: u64,
    /// State transfers installed.
    pub state_transfers_received: u64,
    /// Groups started over from a fresh log (nobody held the state).
    pub geneses: u64,
    /// Rejoins to fetch the state after losing quorum or the local corosync.
    pub resyncs_after_stale: u64,
    /// Logs refused because cmirrord serves the same mirror.
    pub cmirrord_refusals: u64,
    /// The corosync transport's counters (null until the transport hands them over).
    pub bus: Option<BusCounters>,
}

/// The corosync transport's counters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BusCounters {
    /// `CS_ERR_TRY_AGAIN` answers (flow control; each a retry later).
    pub try_again: u64,
    /// `CS_ERR_INTERRUPT` answers (each a resend).
    pub interrupts: u64,
    /// Connections to the local corosync made again after one was lost.
    pub reconnects: u64,
}

impl AgentCluster {
    /// From the counters.
    pub fn of(c: &crate::metrics::ClusterStats) -> Self {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let e = &c.engine;
        Self {
            quorate: load(&e.quorate) != 0,
            frames_sent: load(&e.frames_sent),
            frames_delivered: load(&e.frames_delivered),
            frames_malformed: load(&e.frames_malformed),
            state_transfers_sent: load(&e.transfers_sent),
            state_transfer_sent_bytes: load(&e.transfer_bytes_sent),
            state_transfers_received: load(&e.transfers_received),
            geneses: load(&e.geneses),
            resyncs_after_stale: load(&e.resyncs_after_stale),
            cmirrord_refusals: load(&e.cmirrord_refusals),
            bus: c.bus.as_ref().map(|b| BusCounters {
                try_again: load(&b.try_again),
                interrupts: load(&b.interrupts),
                reconnects: load(&b.reconnects),
            }),
        }
    }
}

/// The probe's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeInfo {
    /// Attached.
    pub attached: bool,
    /// Why not, or what is attached.
    pub status: String,
}

/// The mirror mapping's freshness.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MirrorDiscovery {
    /// When it last ran (null: not yet).
    pub refreshed_at: Option<String>,
    /// Mirrors found.
    pub mirrors: usize,
    /// Why it failed (e.g. no device-mapper), if it did.
    pub error: Option<String>,
}

/// A log's mirror device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MirrorRef {
    /// dm name.
    pub name: String,
    /// `major:minor`.
    pub device_number: String,
    /// Writes completed by it so far (null if unreadable).
    pub writes: Option<u64>,
    /// Bytes written to it so far.
    pub written_bytes: Option<u64>,
}

/// One log, as listed by `GET /api/v1/logs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogSummary {
    /// The `log` label of its metrics (shared by the logs of one uuid).
    pub name: String,
    /// dm uuid.
    pub uuid: String,
    /// Kernel log id, hex.
    pub luid: String,
    /// `clustered-core` or `clustered-disk`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The log device or state file (null: in memory).
    pub device: Option<String>,
    /// Its `major:minor` (null without a device; `0:0` for a regular file).
    pub device_number: Option<String>,
    /// The mirror using this log, once discovered.
    pub mirror: Option<MirrorRef>,
    /// Region size in 512-byte sectors.
    pub region_size: u64,
    /// Region size in bytes.
    pub region_size_bytes: u64,
    /// Regions.
    pub region_count: u64,
    /// Regions in sync.
    pub sync_count: u64,
    /// `constructed`, `resumed` or `suspended`.
    pub state: String,
    /// The log device failed since the last resume (status `D`).
    pub device_failed: bool,
    /// A flush of the mirror legs failed: every region is dirty, clears are ignored until the
    /// table is reloaded (dm-log.c `flush_failed`).
    pub legs_flush_failed: bool,
    /// When the log was constructed.
    pub created_at: String,
    /// When it was last resumed (null: never).
    pub resumed_at: Option<String>,
    /// Constructed by the kernel's reconnect loop (it had lost its server).
    pub by_reconnect: bool,
    /// Cluster mode: the log as this member sees the group (absent for single-node logs).
    /// `sync_count` and the region counts above are the replicated state's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterLogStatus>,
}

/// Regions per state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegionCountsJson {
    /// In sync, no writes outstanding.
    pub clean: u64,
    /// In sync, writes outstanding.
    pub dirty: u64,
    /// Awaiting resync.
    pub out_of_sync: u64,
}

/// Resync progress.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Resync {
    /// sync_count / region_count.
    pub progress_ratio: f64,
    /// Regions per second over the last 30 s (null: not enough samples yet).
    pub rate_regions_per_second: Option<f64>,
    /// Estimated seconds to completion (0: done; null: no progress seen).
    pub eta_seconds: Option<f64>,
}

/// A log's requests of one type.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogTypeCount {
    /// Request type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Answered successfully.
    pub ok: u64,
    /// Answered with an error.
    pub error: u64,
}

/// Durable writes of a persistent log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskStats {
    /// Failed writes.
    pub errors: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Write durations.
    pub flush_time: Distribution,
}

/// `GET /api/v1/logs/{log}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogDetail {
    /// The summary.
    #[serde(flatten)]
    pub summary: LogSummary,
    /// The constructor string.
    pub ctr: String,
    /// Regions per state.
    pub regions: RegionCountsJson,
    /// Resync progress.
    pub resync: Resync,
    /// Requests answered, by type (types seen only). Shared by the logs of one uuid.
    pub requests: Vec<LogTypeCount>,
    /// Reconnect-form CTRs.
    pub kernel_reconnects: u64,
    /// How long regions stayed dirty.
    pub dirty_time: Distribution,
    /// Regions made dirty but not timed (table full).
    pub dirty_untimed: u64,
    /// Durable writes (null for logs in memory).
    pub disk: Option<DiskStats>,
    /// Flight-recorder ids handed out (the newest request's id).
    pub last_request_id: u64,
}

/// One region.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegionJson {
    /// Region number.
    pub region: u64,
    /// Its state.
    pub state: String,
}

/// `GET /api/v1/logs/{log}/regions`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegionPage {
    /// The log's name.
    pub log: String,
    /// Its luid.
    pub luid: String,
    /// The state filter (null: every region).
    pub state: Option<String>,
    /// The first region examined.
    pub start: u64,
    /// The page size asked for.
    pub limit: usize,
    /// The regions, ascending.
    pub regions: Vec<RegionJson>,
    /// `start` of the next page (null: the end of the log was reached).
    pub next: Option<u64>,
}

/// A recorded request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Per-log request number.
    pub id: u64,
    /// The kernel's sequence number.
    pub seq: u32,
    /// Request type.
    #[serde(rename = "type")]
    pub kind: String,
    /// When it was received.
    pub received_at: String,
    /// Receive to reply sent, seconds (null: waiting for a durable write).
    pub service_time_seconds: Option<f64>,
    /// 0 or a negative errno.
    pub error: i32,
    /// `ok` or the errno's name.
    pub error_name: String,
    /// Answered after a durable write.
    pub deferred: bool,
    /// Request payload bytes.
    pub payload_bytes: u32,
    /// Regions the payload names.
    pub regions: u32,
    /// The first of them.
    pub first_region: Option<u64>,
    /// SET_REGION_SYNC's in_sync argument.
    pub in_sync: Option<bool>,
    /// Reply payload bytes.
    pub reply_bytes: u32,
    /// The reply's numbers (e.g. IN_SYNC: `[0 or 1]`; GET_RESYNC_WORK: `[i, region]`).
    pub reply: Vec<u64>,
}

impl RequestRecord {
    /// From a flight record.
    pub fn of(r: &FlightRecord) -> Self {
        let kind = RequestType::from_raw(r.request_type)
            .map_or_else(|| format!("type {}", r.request_type), |t| t.name().to_string());
        Self {
            id: r.id,
            seq: r.seq,
            kind,
            received_at: at(r.received_ns),
            service_time_seconds: (r.service_ns != PENDING).then(|| r.service_ns as f64 / 1e9),
            error: r.error,
            error_name: if r.error == 0 { "ok".into() } else { errno_name(r.error).to_string() },
            deferred: r.deferred,
            payload_bytes: r.payload_bytes,
            regions: r.regions,
            first_region: (r.regions > 0).then_some(r.first_region),
            in_sync: (r.in_sync_arg >= 0).then_some(r.in_sync_arg != 0),
            reply_bytes: r.reply_bytes,
            reply: r.reply_values[..usize::from(r.reply_value_count.min(2))].to_vec(),
        }
    }
}

/// `GET /api/v1/logs/{log}/requests`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestLog {
    /// The log's name.
    pub log: String,
    /// Its luid.
    pub luid: String,
    /// Records kept per log.
    pub capacity: usize,
    /// Newest first.
    pub requests: Vec<RequestRecord>,
}

/// `GET /api/v1/kernel/slow`: kernel requests correlated by seq with the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelRequests {
    /// Whether the probes are attached now.
    pub attached: bool,
    /// Requests with a kernel round trip at least this long are kept as slow.
    pub threshold_seconds: f64,
    /// Requests kept.
    pub capacity: usize,
    /// `slow` (only those over the threshold) or `all` (every correlated request).
    pub kind: String,
    /// Newest first.
    pub requests: Vec<KernelRequest>,
}

/// One kernel request, correlated with the agent's receive and reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelRequest {
    /// Seq of the answered attempt.
    pub seq: u32,
    /// Seq of the first attempt (differs after a resend).
    pub first_seq: u32,
    /// Request type name.
    #[serde(rename = "type")]
    pub kind: String,
    /// The log's luid.
    pub luid: String,
    /// What dm_consult_userspace returned (0 or a negative errno).
    pub result: i32,
    /// Attempts sent (more than 1 after a timeout or -EAGAIN).
    pub attempts: u32,
    /// When the kernel entered dm_consult_userspace.
    pub entered_at: String,
    /// Entry to return.
    pub kernel_seconds: f64,
    /// The answered attempt's send to the agent's receive.
    pub send_seconds: f64,
    /// In the agent: received to the reply's sendto.
    pub server_seconds: f64,
    /// The reply's sendto to the kernel's return.
    pub wakeup_seconds: f64,
}

impl KernelRequest {
    /// From a correlated request.
    pub fn of(c: &crate::telemetry::correlate::Correlated) -> Self {
        let s = |ns: u64| ns as f64 / 1e9;
        Self {
            seq: c.seq,
            first_seq: c.first_seq,
            kind: ulog_common::RequestType::from_raw(c.request_type).map_or("UNKNOWN", |t| t.name()).into(),
            luid: luid_hex(c.luid),
            result: c.ret,
            attempts: c.attempts,
            entered_at: rfc3339(clock::system(c.entry_ns)),
            kernel_seconds: s(c.total_ns),
            send_seconds: s(c.send_ns),
            server_seconds: s(c.server_ns),
            wakeup_seconds: s(c.wakeup_ns),
        }
    }
}

/// The body of every error (4xx, 5xx).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// HTTP status.
    pub status: u16,
    /// A stable code: `not_found`, `log_not_found`, `bad_request`, `method_not_allowed`, ...
    pub code: String,
    /// For humans.
    pub message: String,
}

/// `/healthz` and `/readyz`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    /// `ok` / `ready`, or `unhealthy` / `not_ready`.
    pub status: String,
    /// Why not (absent when fine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The summary of a log.
pub fn summary(h: &LogHandle, tel: &Telemetry) -> LogSummary {
    let (local_sync_count, phase) = {
        let s = h.shared.lock();
        (s.sync_count(), s.phase())
    };
    // A cluster log's state is the group's (the local log only has the table's shape).
    let cluster = h.cluster.as_ref().map(|v| v.status());
    let sync_count = cluster.as_ref().map_or(local_sync_count, |c| c.sync_count);
    let mirror = tel.mirrors().by_uuid.get(&h.uuid).map(|m| {
        let st = mirror::write_stats(m.major, m.minor).ok();
        MirrorRef {
            name: m.name.clone(),
            device_number: format!("{}:{}", m.major, m.minor),
            writes: st.map(|s| s.writes),
            written_bytes: st.map(|s| s.sectors * 512),
        }
    });
    let resumed = h.tel.resumed_ns.load(std::sync::atomic::Ordering::Relaxed);
    LogSummary {
        name: h.tel.name.to_string(),
        uuid: h.uuid.clone(),
        luid: luid_hex(h.luid),
        kind: h.kind.to_string(),
        device: h.device.as_ref().map(|d| d.display().to_string()),
        device_number: h.dev.map(|(a, b)| format!("{a}:{b}")),
        mirror,
        region_size: h.region_size,
        region_size_bytes: h.region_size * 512,
        region_count: h.region_count,
        sync_count,
        state: phase.name().to_string(),
        device_failed: h.shared.device_failed(),
        legs_flush_failed: h.shared.legs_flush_failed(),
        created_at: at(h.tel.created_ns),
        resumed_at: (resumed != 0).then(|| at(resumed)),
        by_reconnect: h.tel.by_reconnect,
        cluster,
    }
}

/// The details of a log.
pub fn detail(h: &LogHandle, tel: &Telemetry) -> LogDetail {
    let summary = summary(h, tel);
    let counts = match &summary.cluster {
        // Not holding the state: nothing is known to be in sync (as GET_SYNC_COUNT answers).
        Some(st) => crate::metrics::cluster_region_counts(st).unwrap_or(RegionCounts {
            clean: 0,
            dirty: 0,
            out_of_sync: h.region_count,
        }),
        None => h.tel.region_counts(&h.shared, h.region_count),
    };
    let (rate, eta) = h.tel.resync_estimate(h.region_count, summary.sync_count);
    let m = &h.tel.metrics;
    let requests = RequestType::ALL
        .iter()
        .map(|&t| (t, m.requests_of(t)))
        .filter(|(_, (ok, err))| ok + err > 0)
        .map(|(t, (ok, error))| LogTypeCount { kind: t.name().into(), ok, error })
        .collect();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    LogDetail {
        ctr: h.ctr.clone(),
        regions: RegionCountsJson { clean: counts.clean, dirty: counts.dirty, out_of_sync: counts.out_of_sync },
        resync: Resync {
            progress_ratio: if h.region_count == 0 { 1.0 } else { summary.sync_count as f64 / h.region_count as f64 },
            rate_regions_per_second: rate,
            eta_seconds: eta,
        },
        requests,
        kernel_reconnects: m.reconnects.load(relaxed),
        dirty_time: Distribution::of(&m.dirty.snapshot()),
        dirty_untimed: m.dirty_untimed.load(relaxed),
        disk: h.persistent().then(|| DiskStats {
            errors: m.flush_errors.load(relaxed),
            bytes: m.flush_bytes.load(relaxed),
            flush_time: Distribution::of(&m.flush.snapshot()),
        }),
        last_request_id: h.tel.ids.last(),
        summary,
    }
}

/// The agent document.
pub fn agent(tel: &Telemetry) -> AgentInfo {
    let c = tel.counters();
    let (_, start_wall) = clock::epoch();
    let requests = (0..=REQUEST_TYPE_COUNT)
        .map(|slot| {
            let kind = RequestType::ALL.get(slot).copied();
            TypeStats {
                kind: type_label(slot).to_string(),
                requests: c.requests_of(kind),
                errors: c.errors_of(kind),
                deferred: c.deferred_of(kind),
                without_log: c.without_log_of(kind),
                service_time: Distribution::of(&tel.service(slot).snapshot()),
            }
        })
        .filter(|t| t.requests > 0 || t.without_log > 0)
        .collect();
    let hb = tel.heartbeat_ns();
    let mirrors = tel.mirrors();
    AgentInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        started_at: rfc3339(start_wall),
        uptime_seconds: clock::now_ns() as f64 / 1e9,
        state: format!("{:?}", tel.lifecycle()).to_lowercase(),
        receive_loop_idle_seconds: (hb != 0).then(|| clock::now_ns().saturating_sub(hb) as f64 / 1e9),
        probe: ProbeInfo { attached: tel.probe_attached(), status: tel.probe_status() },
        logs: tel.logs().len(),
        requests,
        malformed: crate::wire::protocol::Malformed::ALL
            .iter()
            .map(|m| (m.name().to_string(), c.malformed_of(*m)))
            .collect(),
        dropped: crate::metrics::counters::Dropped::ALL
            .iter()
            .map(|d| (d.name().to_string(), c.dropped_of(*d)))
            .collect(),
        mirror_discovery: MirrorDiscovery {
            refreshed_at: (mirrors.refreshed_ns != 0).then(|| at(mirrors.refreshed_ns)),
            mirrors: mirrors.by_uuid.len(),
            error: mirrors.error.clone(),
        },
        cluster: tel.cluster().as_ref().map(AgentCluster::of),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_263_845_123);
        assert_eq!(rfc3339(t), "2026-11-21T12:24:05.123Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    /// Validates `v` against a schema of `openapi.json` (as the integration test does live).
    fn check_schema(name: &str, v: &serde_json::Value) {
        let doc: serde_json::Value = serde_json::from_str(include_str!("../../openapi.json")).unwrap();
        let root = serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": format!("#/components/schemas/{name}"),
            "components": doc["components"].clone(),
        });
        let validator = jsonschema::validator_for(&root).unwrap();
        let errors: Vec<String> = validator.iter_errors(v).map(|e| format!("{e} at {}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{name}: {}\n{v:#}", errors.join("\n"));
    }

    /// A cluster log's summary and detail carry the group's view and the replicated state's
    /// counts; the agent document has a cluster section in cluster mode only; single-node
    /// documents are unchanged (no `cluster` key). All match openapi.json.
    #[test]
    fn cluster_logs_and_agent_in_the_api() {
        use crate::metrics::test_support::{handle, three_node_view};
        let tel = Telemetry::new(Arc::default());
        let single = handle(&tel, "LVM-apisingle", None);
        let clustered = handle(&tel, "LVM-apishared", Some(three_node_view()));

        let v = serde_json::to_value(detail(&single, &tel)).unwrap();
        assert!(v.get("cluster").is_none(), "{v:#}");
        check_schema("LogDetail", &v);
        let a = serde_json::to_value(agent(&tel)).unwrap();
        assert!(a.get("cluster").is_none(), "{a:#}");
        check_schema("AgentInfo", &a);

        let d = detail(&clustered, &tel);
        assert_eq!(d.summary.sync_count, 96, "the replicated state's, not the local log's 0");
        assert_eq!((d.regions.clean, d.regions.dirty, d.regions.out_of_sync), (94, 2, 4));
        let c = d.summary.cluster.as_ref().expect("cluster view");
        assert_eq!((c.node, c.holding, c.held_requests, c.reclaimed), (Some(1), true, 5, 2));
        let nodes: Vec<(u32, bool, u64, Option<u64>)> =
            c.nodes.iter().map(|n| (n.node, n.live, n.marked, n.recovering)).collect();
        assert_eq!(nodes, vec![(1, true, 3, Some(7)), (2, false, 2, None)]);
        let v = serde_json::to_value(&d).unwrap();
        check_schema("LogDetail", &v);
        check_schema("LogSummary", &serde_json::to_value(summary(&clustered, &tel)).unwrap());
        // What `ulog-agent status` reads back.
        let back: LogDetail = serde_json::from_value(v).unwrap();
        assert_eq!(back.summary.cluster.as_ref(), Some(c));

        let engine = Arc::new(crate::cluster::engine::EngineStats::default());
        engine.quorate.store(1, std::sync::atomic::Ordering::Relaxed);
        engine.geneses.store(3, std::sync::atomic::Ordering::Relaxed);
        tel.set_cluster(engine, None);
        let a = agent(&tel);
        let ac = a.cluster.as_ref().expect("cluster section");
        assert!(ac.quorate && ac.geneses == 3 && ac.bus.is_none());
        check_schema("AgentInfo", &serde_json::to_value(&a).unwrap());
        tel.set_cluster(Arc::default(), Some(Arc::default()));
        let a = serde_json::to_value(agent(&tel)).unwrap();
        assert_eq!(a["cluster"]["quorate"], false);
        assert_eq!(a["cluster"]["bus"]["try_again"], 0);
        check_schema("AgentInfo", &a);
    }

    #[test]
    fn luids() {
        assert_eq!(luid_hex(0xffff_8880_03a1_b000), "0xffff888003a1b000");
        assert_eq!(luid_hex(1), "0x0000000000000001");
        assert_eq!(parse_luid("0xffff888003a1b000"), Some(0xffff_8880_03a1_b000));
        assert_eq!(parse_luid("42"), Some(42));
        assert_eq!(parse_luid("0xz"), None);
        assert_eq!(parse_luid(""), None);
    }
}
