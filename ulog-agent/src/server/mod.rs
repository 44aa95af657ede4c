//! `LogServer`: the logs, keyed by (uuid, luid), and the answer to every request.
//!
//! It runs on the receive thread: `handle_datagram` decodes, applies the request to the
//! log's `DirtyLog`, and sends the reply itself, so a request answered from memory never
//! changes thread (on the real kernel the round trip is the cost, and dm-raid1's single worker
//! waits for every IN_SYNC). Requests whose answer depends on the disk go to the log's
//! `Persister`, which answers them after the I/O.
//!
//! Two logs may share a uuid (a table reload keeps the live table while the new one is
//! constructed); the kernel tells them apart by luid, its per-log context address.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use ulog_common::RequestType;

use crate::cluster::engine::{Change, ClusterView, Command as ClusterCommand, InSyncAnswer, LogShape, Read};
use crate::metrics::counters::{Counters, Dropped};
use crate::metrics::flight::{FlightRecord, PENDING};
use crate::metrics::persister::PersisterTelemetry;
use crate::metrics::{clock, LogHandle, LogState, LogTelemetry, SharedLog, Telemetry};
use crate::region_log::ctr::{self, CtrArgs, LogKind, SyncMode};
use crate::region_log::dirty_log::{DirtyLog, LoadRule, LogError, Phase};
use crate::region_log::legs::Legs;
use crate::region_log::persist::{PendingReply, Persister, ReplySink, SharedDevice};
use crate::region_log::store::{self, DeviceKey, LogDevice};
use crate::server::cluster_disk::ClusterDisk;
use crate::server::ratelimit::RateLimit;
use crate::wire::protocol::{self, Answer, ReplyBuf, Request, MAX_REPLY_PAYLOAD};

pub mod cluster_disk;
pub mod ratelimit;
pub mod transport;

/// Where a cluster log's requests go: the cluster engine's command queue (false: the engine
/// is gone, the request is answered -EIO).
pub type ClusterCommands = crate::cluster::engine::CommandSink;

/// Server configuration.
#[derive(Clone, Default)]
pub struct ServerConfig {
    /// Keep `clustered-core` logs in files here, with the disk log's durability.
    pub state_dir: Option<PathBuf>,
    /// Also serve requests from this userspace netlink port (tests; the kernel is port 0).
    pub accept_peer: Option<u32>,
    /// Cluster mode (`--cluster`): every log is one coherent log of all the nodes that
    /// activate its mirror, served through the cluster engine.
    pub cluster: Option<ClusterMode>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("state_dir", &self.state_dir)
            .field("accept_peer", &self.accept_peer)
            .field("cluster", &self.cluster.is_some())
            .finish()
    }
}

/// Cluster mode: the engine's command queue and the answers it sends.
#[derive(Clone)]
pub struct ClusterMode {
    /// Where a cluster log's requests go.
    pub commands: ClusterCommands,
    /// The engine's answers (the server registers each cluster log's telemetry there).
    pub replies: Arc<ClusterReplies>,
}

/// Cluster logs by (luid, uuid), as [`ClusterReplies`] finds them.
type AnsweredLogs = HashMap<(u64, Box<[u8]>), AnsweredLog>;

/// A cluster log's telemetry, as the engine's answers record it.
struct AnsweredLog {
    tel: Arc<LogTelemetry>,
    shared: Arc<SharedLog>,
}

/// How the cluster engine answers the kernel: like a persister (the reply, the request
/// counters, the service time from receipt, also into the cluster's own service-time
/// histogram), from the engine's thread.
pub struct ClusterReplies {
    sink: Arc<dyn ReplySink>,
    telemetry: Arc<Telemetry>,
    /// The engine's counters (recovery restarts that failed are counted there).
    engine_stats: std::sync::OnceLock<Arc<crate::cluster::engine::EngineStats>>,
    /// Cluster logs by (luid, uuid): their result counters, phase and flight records are
    /// updated when the engine answers (one lock per answer, on the engine's thread; the
    /// receive thread takes it only at CTR and DTR).
    logs: std::sync::Mutex<AnsweredLogs>,
}

impl ClusterReplies {
    /// Answers through `sink`, recording into `telemetry`.
    pub fn new(sink: Arc<dyn ReplySink>, telemetry: Arc<Telemetry>) -> Self {
        Self { sink, telemetry, engine_stats: std::sync::OnceLock::new(), logs: std::sync::Mutex::default() }
    }

    /// Where failed recovery restarts are counted (the engine is made after its replies).
    pub fn set_engine_stats(&self, stats: Arc<crate::cluster::engine::EngineStats>) {
        let _ = self.engine_stats.set(stats);
    }

    fn logs(&self) -> std::sync::MutexGuard<'_, AnsweredLogs> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, uuid: &[u8], luid: u64, tel: Arc<LogTelemetry>, shared: Arc<SharedLog>) {
        self.logs().insert((luid, uuid.into()), AnsweredLog { tel, shared });
    }

    fn unregister(&self, uuid: &[u8], luid: u64) {
        self.logs().remove(&(luid, Box::<[u8]>::from(uuid)));
    }
}

impl crate::cluster::engine::Replies for Arc<ClusterReplies> {
    fn answer(&self, r: &PendingReply, error: i32, payload: &[u8]) {
        let uuid = &r.header.uuid[..r.header.uuid.iter().position(|&b| b == 0).unwrap_or(r.header.uuid.len())];
        // The log's own record: result counters, the phase RESUME / POSTSUSPEND reached, the
        // flight record the receive thread opened.
        if let Some(log) = self.logs().get(&(r.header.luid, uuid.into())) {
            let kind = RequestType::from_raw(r.header.request_type);
            let now = clock::now_ns();
            if let Some(kind) = kind {
                log.tel.answered(kind, error, now, now.saturating_sub(r.received_ns));
            }
            let mut s = log.shared.lock();
            match kind {
                Some(RequestType::Resume) if error == 0 => s.resume_in_memory(),
                Some(RequestType::Postsuspend) => s.postsuspend(),
                _ => {}
            }
            if r.flight_id != 0 {
                s.flight.complete(FlightRecord::deferred(r, now.saturating_sub(r.received_ns), error));
            }
        }
        self.send_answer(r, error, payload);
    }

    fn restart_recovery(&self, group: &[u8]) {
        let uuid = String::from_utf8_lossy(group.strip_suffix(&[0]).unwrap_or(group)).into_owned();
        let stats = self.engine_stats.get().cloned();
        let failed = move |stats: Option<Arc<crate::cluster::engine::EngineStats>>| {
            if let Some(s) = stats {
                s.recovery_restart_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let thread_stats = stats.clone();
        let thread_uuid = uuid.clone();
        let spawned = std::thread::Builder::new().name("ulog-recovery".into()).spawn(move || {
            let uuid = thread_uuid;
            match crate::cluster::restart_mirror_recovery(
                std::path::Path::new(crate::region_log::dm::DM_CONTROL),
                std::path::Path::new(crate::cluster::RESTART_MARKERS),
                &uuid,
            ) {
                Ok(mirrors) => tracing::info!(log = %uuid, ?mirrors, "mirror suspended and resumed: its kernel asks for resync work again"),
                Err(e) => {
                    tracing::error!(log = %uuid, error = %e, "cannot restart the mirror's recovery; out-of-sync regions wait for a resume of the mirror on some node");
                    failed(thread_stats);
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(log = %uuid, error = %e, "cannot start the recovery restart thread");
            failed(stats);
        }
    }
}

impl ClusterReplies {
    fn send_answer(&self, r: &PendingReply, error: i32, payload: &[u8]) {
        let kind = RequestType::from_raw(r.header.request_type);
        let reply = ReplyBuf::full(&r.header, r.cn_seq, error, payload, r.own_port);
        if error != 0 {
            self.telemetry.counters().deferred_error(kind);
        }
        self.telemetry.about_to_reply(r.header.seq, r.received_ns);
        if !self.sink.send_reply(r.port, reply.as_bytes()) {
            self.telemetry.counters().dropped(Dropped::SendFailed);
        }
        let service_ns = clock::now_ns().saturating_sub(r.received_ns);
        self.telemetry.observe_service(kind, service_ns);
        self.telemetry.observe_cluster_service(kind, service_ns);
    }
}

/// A log served through the cluster engine.
struct ClusterLog {
    /// Its CPG group: the uuid and its NUL, as cmirrord names it (so a cmirrord on the same
    /// mirror shares the group and is seen).
    group: Vec<u8>,
    /// The replicated state, for the requests answered locally.
    view: Arc<ClusterView>,
    commands: ClusterCommands,
    replies: Arc<ClusterReplies>,
}

/// The largest answer a hot request carries: two `u64`s (GET_RESYNC_WORK,
/// IS_REMOTE_RECOVERING); IN_SYNC, IS_CLEAN, GET_SYNC_COUNT and GET_REGION_SIZE carry one.
const INLINE_PAYLOAD: usize = 16;

/// A reply payload. Numbers are kept inline, so the answers on the request path (every type
/// but the STATUS pair and CTR's device name) neither allocate nor move a `MAX_REPLY_PAYLOAD`
/// buffer through every return (each move of the old 452-byte on-stack buffer was a `memcpy`;
/// with the zeroing they were a quarter of a GET_SYNC_COUNT's instructions). Text answers,
/// which are built with `format!` anyway, are on the heap.
enum Payload {
    Inline { buf: [u8; INLINE_PAYLOAD], len: u8 },
    Text(Vec<u8>),
}

impl Payload {
    fn none() -> Self {
        Self::Inline { buf: [0; INLINE_PAYLOAD], len: 0 }
    }
    fn bytes(b: &[u8]) -> Self {
        let b = &b[..b.len().min(MAX_REPLY_PAYLOAD)];
        match <[u8; INLINE_PAYLOAD]>::try_from(b) {
            Ok(buf) => Self::Inline { buf, len: INLINE_PAYLOAD as u8 },
            Err(_) if b.len() < INLINE_PAYLOAD => {
                let mut buf = [0; INLINE_PAYLOAD];
                buf[..b.len()].copy_from_slice(b);
                Self::Inline { buf, len: b.len() as u8 }
            }
            Err(_) => Self::Text(b.to_vec()),
        }
    }
    fn text(s: &str) -> Self {
        // The kernel copies data_size bytes after its own text; count the NUL in (unless the
        // text fills the kernel's buffer).
        let n = s.len().min(MAX_REPLY_PAYLOAD);
        let mut v = Vec::with_capacity(n + 1);
        v.extend_from_slice(&s.as_bytes()[..n]);
        if n < MAX_REPLY_PAYLOAD {
            v.push(0);
        }
        Self::Text(v)
    }
    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { buf, len } => &buf[..usize::from(*len)],
            Self::Text(v) => v,
        }
    }
}

enum Outcome {
    Reply(i32, Payload),
    /// A persister answers.
    Deferred,
    /// The cluster engine answers (`ClusterReplies` completes its flight record).
    DeferredToCluster,
}

fn ok(p: Payload) -> Result<Outcome, i32> {
    Ok(Outcome::Reply(0, p))
}

impl From<LogError> for i32 {
    fn from(e: LogError) -> i32 {
        -e.errno()
    }
}

/// Public facts about a log, for status output.
#[derive(Clone, Debug)]
pub struct LogSummary {
    /// The log's name (its metrics' `log` label).
    pub name: String,
    /// dm uuid.
    pub uuid: String,
    /// Kernel log id.
    pub luid: u64,
    /// clustered-core / clustered-disk.
    pub kind: &'static str,
    /// The log device or state file, if any.
    pub device: Option<PathBuf>,
    /// Region size in sectors.
    pub region_size: u64,
    /// Region count.
    pub region_count: u64,
    /// In-sync regions.
    pub sync_count: u64,
    /// Phase.
    pub phase: Phase,
}

struct LogEntry {
    uuid: Box<[u8]>,
    shared: Arc<SharedLog>,
    persister: Option<Persister>,
    ctr_text: String,
    args: CtrArgs,
    device: Option<(PathBuf, (u32, u32))>,
    /// Which device or state file the log uses.
    device_key: Option<DeviceKey>,
    /// Short name for diagnostics.
    name: String,
    /// Request-path telemetry handles, resolved at CTR.
    tel: Arc<LogTelemetry>,
    /// Cluster mode: the log's group and replicated state.
    cluster: Option<ClusterLog>,
}

/// Hashes a luid (the kernel's address of its log context) with one multiplication. Every
/// request looks its log up; SipHash's resistance to chosen keys buys nothing here (only the
/// kernel is served) and cost ~140 of the ~1700 instructions an IN_SYNC took.
#[derive(Default, Clone, Copy)]
struct LuidHasher(u64);

impl Hasher for LuidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fold the high half of the product down: the table indexes with the low bits, and
        // luids are aligned addresses whose low bits barely change.
        let x = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 32);
    }
}

/// The server's state: every log, and where replies go.
pub struct LogServer {
    logs: HashMap<u64, Vec<LogEntry>, BuildHasherDefault<LuidHasher>>,
    cfg: ServerConfig,
    sink: Arc<dyn ReplySink>,
    own_port: u32,
    counters: Arc<Counters>,
    telemetry: Arc<Telemetry>,
    malformed_log: RateLimit,
    error_log: RateLimit,
    foreign_log: RateLimit,
    /// Regions whose IN_SYNC was answered -ESRCH because their log was unknown, by (uuid,
    /// luid): see [`LogServer::unknown_log`].
    orphaned_in_sync: HashMap<(Box<[u8]>, u64), OutOfSyncNote>,
    /// Every log device and state file in use, shared by the logs of one uuid on it (see
    /// `persist::SharedDevice`); an entry lives as long as a log or its I/O thread holds it.
    devices: HashMap<DeviceKey, Weak<SharedDevice<LogState>>>,
}

/// Regions a log must record out of sync when it is created (see [`LogServer::unknown_log`]).
#[derive(Debug)]
enum OutOfSyncNote {
    Regions(Vec<u64>),
    /// More than [`ORPHAN_REGIONS_PER_LOG`]: resync the whole log.
    All,
}

/// Bounds on what [`LogServer::unknown_log`] remembers (only the kernel reaches it: these
/// bound a misbehaving kernel, not a hostile peer).
const ORPHAN_REGIONS_PER_LOG: usize = 64;
const ORPHAN_LOGS: usize = 4096;

/// The request types the kernel sends through `userspace_do_request`: on `-ESRCH` it runs
/// its reconnect loop (CTR in the reconnect form, RESUME) and sends the request again.
/// The others (CTR, DTR, PRESUSPEND, POSTSUSPEND, RESUME, GET_REGION_SIZE, STATUS_TABLE) are
/// sent directly and simply fail.
fn kernel_reconnects_on_esrch(kind: RequestType) -> bool {
    use RequestType::*;
    matches!(
        kind,
        IsClean
            | InSync
            | Flush
            | MarkRegion
            | ClearRegion
            | GetResyncWork
            | SetRegionSync
            | GetSyncCount
            | StatusInfo
            | IsRemoteRecovering
    )
}

impl LogServer {
    /// A server with no logs. `own_port` is the socket's netlink port (goes into replies).
    pub fn new(cfg: ServerConfig, sink: Arc<dyn ReplySink>, own_port: u32, counters: Arc<Counters>) -> Self {
        Self::with_telemetry(cfg, sink, own_port, Arc::new(Telemetry::new(counters)))
    }

    /// A server with no logs, recording into `telemetry` (which the HTTP API reads).
    pub fn with_telemetry(
        cfg: ServerConfig,
        sink: Arc<dyn ReplySink>,
        own_port: u32,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            logs: HashMap::default(),
            cfg,
            sink,
            own_port,
            counters: Arc::clone(telemetry.counters()),
            telemetry,
            malformed_log: RateLimit::new(10, Duration::from_secs(60)),
            error_log: RateLimit::new(20, Duration::from_secs(60)),
            foreign_log: RateLimit::new(5, Duration::from_secs(60)),
            orphaned_in_sync: HashMap::new(),
            devices: HashMap::new(),
        }
    }

    /// The counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The telemetry.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// How many logs are live (constructed, not destroyed); locks none of them.
    pub fn log_count(&self) -> usize {
        self.logs.values().map(Vec::len).sum()
    }

    /// Every live log's name with its mirror's dm name where discovery found it (the cached
    /// [`LogTelemetry::mirror`]: no device-mapper call), in (uuid, luid) order as
    /// [`Self::summaries`]; locks none of the logs.
    pub fn log_names(&self) -> Vec<(String, Option<Arc<str>>)> {
        let mut v: Vec<(&[u8], u64, &LogEntry)> =
            self.logs.iter().flat_map(|(luid, entries)| entries.iter().map(move |e| (&*e.uuid, *luid, e))).collect();
        v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        v.into_iter().map(|(_, _, e)| (e.name.clone(), e.tel.mirror())).collect()
    }

    /// A summary of every log.
    pub fn summaries(&self) -> Vec<LogSummary> {
        let mut v: Vec<LogSummary> = self
            .logs
            .iter()
            .flat_map(|(luid, entries)| entries.iter().map(move |e| (*luid, e)))
            .map(|(luid, e)| {
                let s = e.shared.lock();
                LogSummary {
                    name: e.name.clone(),
                    uuid: String::from_utf8_lossy(&e.uuid).into_owned(),
                    luid,
                    kind: e.args.type_name(),
                    device: e.device.as_ref().map(|d| d.0.clone()),
                    region_size: s.region_size(),
                    region_count: s.region_count(),
                    sync_count: s.sync_count(),
                    phase: s.phase(),
                }
            })
            .collect();
        v.sort_by(|a, b| (&a.uuid, a.luid).cmp(&(&b.uuid, b.luid)));
        v
    }

    fn send(&self, port: u32, reply: &ReplyBuf) {
        if !self.sink.send_reply(port, reply.as_bytes()) {
            self.counters.dropped(Dropped::SendFailed);
        }
    }

    /// Serves one datagram received from netlink port `sender`. `truncated`: the datagram
    /// was larger than the receive buffer and `buf` holds only its start.
    pub fn handle_datagram(&mut self, buf: &[u8], sender: u32, truncated: bool) {
        let received = clock::now_ns();
        self.telemetry.beat(received);
        if sender != 0 && Some(sender) != self.cfg.accept_peer {
            self.counters.dropped(Dropped::ForeignSender);
            if let Some(sup) = self.foreign_log.allow(Instant::now()) {
                warn!(
                    sender,
                    suppressed = sup,
                    "ignored a request from a userspace process (only the kernel is served; see --accept-peer-port)"
                );
            }
            return;
        }
        let decoded = match protocol::decode(buf) {
            Ok(req) if truncated => Err(protocol::Rejected {
                reason: protocol::Malformed::Oversized,
                answer: Answer::Full { header: req.header, cn_seq: req.cn_seq },
            }),
            Err(rej) if truncated => Err(protocol::Rejected { reason: protocol::Malformed::Oversized, ..rej }),
            other => other,
        };
        match decoded {
            Ok(req) => self.handle_request(&req, sender, received),
            Err(rej) => {
                self.counters.malformed(rej.reason);
                if let Some(sup) = self.malformed_log.allow(Instant::now()) {
                    warn!(reason = rej.reason.name(), len = buf.len(), sender, suppressed = sup, "malformed datagram");
                }
                self.answer_malformed(rej.answer, sender);
            }
        }
    }

    fn answer_malformed(&self, answer: Answer, sender: u32) {
        match answer {
            Answer::Drop => {}
            Answer::Ack { cn_seq } => self.send(sender, &ReplyBuf::ack(cn_seq, libc::EINVAL as u32, self.own_port)),
            Answer::Full { header, cn_seq } => {
                self.send(sender, &ReplyBuf::full(&header, cn_seq, -libc::EINVAL, &[], self.own_port))
            }
        }
    }

    fn handle_request(&mut self, req: &Request<'_>, sender: u32, received: u64) {
        let (uuid, luid) = (req.uuid(), req.header.luid);
        let pending = |flight_id| PendingReply {
            port: sender,
            own_port: self.own_port,
            header: req.header,
            cn_seq: req.cn_seq,
            received_ns: received,
            flight_id,
        };
        let error = match req.kind {
            Some(RequestType::Ctr) => {
                let outcome = self.ctr(req);
                let entry = self.find(uuid, luid);
                if entry.is_none() {
                    self.counters.without_log(req.kind);
                }
                let id = entry.map_or(0, |e| e.tel.ids.next());
                self.finish(req, sender, received, entry.map(|e| (&*e.tel, &*e.shared)), id, outcome)
            }
            Some(RequestType::Dtr) => {
                let (outcome, tel) = self.dtr(uuid, luid, pending(0));
                if tel.is_none() {
                    self.counters.without_log(req.kind);
                }
                // The log is gone: its result is counted, no flight record is kept.
                if let (Some(tel), Ok(Outcome::Reply(error, _))) = (&tel, &outcome) {
                    let now = clock::now_ns();
                    tel.answered(RequestType::Dtr, *error, now, now.saturating_sub(received));
                }
                self.finish(req, sender, received, None, 0, outcome)
            }
            Some(kind) => match self.find(uuid, luid) {
                Some(entry) => {
                    let id = entry.tel.ids.next();
                    let outcome = Self::dispatch(entry, kind, req, pending(id));
                    self.finish(req, sender, received, Some((&*entry.tel, &*entry.shared)), id, outcome)
                }
                None => {
                    self.counters.without_log(req.kind);
                    let error = self.unknown_log(kind, req);
                    self.finish(req, sender, received, None, 0, Err(error))
                }
            },
            None => {
                self.counters.without_log(None);
                self.finish(req, sender, received, None, 0, Err(-libc::EINVAL))
            }
        };
        self.log_failure(req, error);
    }

    /// Answers (or records the hand-off of) a request and records its telemetry: counters, the
    /// service-time histogram, the log's results and its flight record (`log`: the log it was
    /// served by, if any; `flight_id` 0: no record).
    /// Returns the error answered (0 for a request handed to a persister).
    fn finish(
        &self,
        req: &Request<'_>,
        sender: u32,
        received: u64,
        log: Option<(&LogTelemetry, &SharedLog)>,
        flight_id: u64,
        outcome: Result<Outcome, i32>,
    ) -> i32 {
        let (error, payload) = match outcome {
            Ok(Outcome::Deferred | Outcome::DeferredToCluster) => {
                self.counters.request(req.kind, 0, true);
                if let (Some((_, shared)), true) = (log, flight_id != 0) {
                    shared.lock().flight.record(flight_record(req, flight_id, received, PENDING, 0, true, &[]));
                }
                return 0;
            }
            Ok(Outcome::Reply(e, p)) => (e, p),
            Err(e) => (e, Payload::none()),
        };
        self.counters.request(req.kind, error, false);
        let reply = ReplyBuf::full(&req.header, req.cn_seq, error, payload.as_bytes(), self.own_port);
        self.telemetry.about_to_reply(req.header.seq, received);
        self.send(sender, &reply);
        let now = clock::now_ns();
        let service_ns = now.saturating_sub(received);
        self.telemetry.observe_service(req.kind, service_ns);
        if let Some((tel, shared)) = log {
            if let Some(kind) = req.kind {
                tel.answered(kind, error, now, service_ns);
            }
            if flight_id != 0 {
                let rec = flight_record(req, flight_id, received, service_ns, error, false, payload.as_bytes());
                shared.lock().flight.record(rec);
            }
        }
        error
    }

    fn log_failure(&mut self, req: &Request<'_>, error: i32) {
        if error != 0 {
            if let Some(sup) = self.error_log.allow(Instant::now()) {
                let name = req.kind.map_or("UNKNOWN", RequestType::name);
                debug!(request = name, raw_type = req.header.request_type, seq = req.header.seq, error, suppressed = sup, uuid = %String::from_utf8_lossy(req.uuid()), luid = req.header.luid, "request failed");
            }
        }
    }

    /// The error for a request of `kind` (not CTR or DTR) for a (uuid, luid) the server does
    /// not know: the kernel has a log the server lost, because the agent restarted while that
    /// request was in flight (the kernel resends it after 15 s, to the new agent).
    ///
    /// `-ESRCH` where the kernel answers it with its reconnect loop (CTR + RESUME, then the
    /// request again), which re-creates the log; `-EINVAL` otherwise (it would only fail).
    ///
    /// The kernel (6.1) resends the request with a reply capacity of 0 after an -ESRCH reply,
    /// so a resent IN_SYNC cannot be answered: the kernel takes it as "not in sync" and writes
    /// that region to its default leg only. The region is remembered here and recorded out of
    /// sync when the log is re-created (at its RESUME), so it is resynchronised, not left
    /// claiming to be in sync with one leg stale.
    fn unknown_log(&mut self, kind: RequestType, req: &Request<'_>) -> i32 {
        if !kernel_reconnects_on_esrch(kind) {
            return -libc::EINVAL;
        }
        if kind == RequestType::InSync {
            let key = (Box::<[u8]>::from(req.uuid()), req.header.luid);
            let region = protocol::one_u64(req.payload);
            if self.orphaned_in_sync.len() < ORPHAN_LOGS || self.orphaned_in_sync.contains_key(&key) {
                let note = self.orphaned_in_sync.entry(key).or_insert_with(|| OutOfSyncNote::Regions(Vec::new()));
                match (note, region) {
                    (OutOfSyncNote::Regions(v), Some(r)) if v.contains(&r) => {}
                    (OutOfSyncNote::Regions(v), Some(r)) if v.len() < ORPHAN_REGIONS_PER_LOG => v.push(r),
                    (note, _) => *note = OutOfSyncNote::All,
                }
            } else {
                warn!(uuid = %String::from_utf8_lossy(req.uuid()), luid = req.header.luid, "too many unknown logs: an IN_SYNC answered -ESRCH is not remembered");
            }
        }
        -libc::ESRCH
    }

    fn find(&self, uuid: &[u8], luid: u64) -> Option<&LogEntry> {
        self.logs.get(&luid)?.iter().find(|e| &*e.uuid == uuid)
    }

    /// A request for an existing log (CTR and DTR have their own paths).
    fn dispatch(entry: &LogEntry, kind: RequestType, req: &Request<'_>, pending: PendingReply) -> Result<Outcome, i32> {
        use RequestType::*;
        if let Some(c) = &entry.cluster {
            if let Some(outcome) = Self::dispatch_cluster(c, kind, req, pending)? {
                return Ok(outcome);
            }
        }
        let p = req.payload;
        let now_ns = pending.received_ns;
        match kind {
            Ctr | Dtr => Err(-libc::EINVAL),
            Presuspend => {
                entry.shared.lock().presuspend();
                ok(Payload::none())
            }
            Postsuspend => {
                entry.shared.lock().postsuspend();
                match &entry.persister {
                    Some(persister) if persister.release(pending) => Ok(Outcome::Deferred),
                    Some(_) => Err(-libc::EIO),
                    None => ok(Payload::none()),
                }
            }
            Resume => match &entry.persister {
                Some(persister) if persister.resume(pending) => Ok(Outcome::Deferred),
                Some(_) => Err(-libc::EIO),
                None => {
                    entry.shared.lock().resume_in_memory();
                    ok(Payload::none())
                }
            },
            GetRegionSize => ok(Payload::bytes(&entry.shared.lock().region_size().to_ne_bytes())),
            IsClean | InSync => {
                let r = protocol::one_u64(p).ok_or(-libc::EINVAL)?;
                let s = entry.shared.lock();
                let v = if kind == IsClean { s.is_clean(r)? } else { s.in_sync(r)? };
                ok(Payload::bytes(&i64::from(v).to_ne_bytes()))
            }
            Flush | MarkRegion => {
                let durable = {
                    let mut s = entry.shared.lock();
                    if kind == MarkRegion || !p.is_empty() {
                        s.mark_timed(protocol::regions(p).ok_or(-libc::EINVAL)?, now_ns, &entry.tel.metrics)?;
                    } else {
                        s.flush()?;
                    }
                    (s.durability_needed(), s.has_unwritten_changes())
                };
                Self::after_change(entry, durable, pending)
            }
            ClearRegion => {
                let regions = protocol::regions(p).ok_or(-libc::EINVAL)?;
                entry.shared.lock().clear_timed(regions, now_ns, &entry.tel.metrics)?;
                ok(Payload::none())
            }
            GetResyncWork => {
                let mut s = entry.shared.lock();
                let (i, r) = match s.get_resync_work() {
                    Some(r) => (1, r),
                    None => (0, s.region_count()),
                };
                ok(Payload::bytes(&protocol::pair(i, r)))
            }
            SetRegionSync => {
                let (r, in_sync) = protocol::two_u64(p).ok_or(-libc::EINVAL)?;
                entry.shared.lock().set_region_sync(r, in_sync != 0)?;
                ok(Payload::none())
            }
            GetSyncCount => ok(Payload::bytes(&entry.shared.lock().sync_count().to_ne_bytes())),
            StatusInfo => ok(Payload::text(&match &entry.args.kind {
                LogKind::Core => "1 clustered-core".to_string(),
                LogKind::Disk { .. } => {
                    let (maj, min) = entry.device.as_ref().map_or((0, 0), |d| d.1);
                    let state = if entry.shared.device_failed() { 'D' } else { 'A' };
                    format!("3 clustered-disk {maj}:{min} {state}")
                }
            })),
            StatusTable => {
                let a = &entry.args;
                let sync = match a.sync {
                    SyncMode::Default => "",
                    SyncMode::Force => "sync ",
                    SyncMode::NoSync => "nosync ",
                };
                let boe = if a.block_on_error { "block_on_error " } else { "" };
                let text = match &entry.device {
                    Some((_, (maj, min))) if matches!(a.kind, LogKind::Disk { .. }) => {
                        format!("clustered-disk {maj}:{min} {} {sync}{boe}", a.region_size)
                    }
                    _ => format!("clustered-core {} {sync}{boe}", a.region_size),
                };
                ok(Payload::text(&text))
            }
            IsRemoteRecovering => {
                let r = protocol::one_u64(p).ok_or(-libc::EINVAL)?;
                let (rec, hint) = entry.shared.lock().remote_recovering(r)?;
                ok(Payload::bytes(&protocol::pair(u64::from(rec), hint)))
            }
        }
    }

    /// A request for a cluster log: what changes the state goes to the engine (answered in the
    /// group's order), what reads it is answered from the replicated state here. `None`: the
    /// request is answered as for a single node (PRESUSPEND, GET_REGION_SIZE, the STATUS pair:
    /// they read only the table).
    fn dispatch_cluster(
        c: &ClusterLog,
        kind: RequestType,
        req: &Request<'_>,
        pending: PendingReply,
    ) -> Result<Option<Outcome>, i32> {
        use RequestType::*;
        let p = req.payload;
        let group = c.group.clone();
        let command = match kind {
            Resume => ClusterCommand::Resume { group, pending },
            Postsuspend => ClusterCommand::Suspend { group, pending },
            Flush if p.is_empty() => ClusterCommand::Flush { group, pending },
            Flush | MarkRegion => ClusterCommand::Change {
                group,
                change: Change::Mark(protocol::regions(p).ok_or(-libc::EINVAL)?.collect()),
                pending,
            },
            ClearRegion => ClusterCommand::Change {
                group,
                change: Change::Clear(protocol::regions(p).ok_or(-libc::EINVAL)?.collect()),
                pending,
            },
            GetResyncWork => ClusterCommand::Change { group, change: Change::GetResyncWork, pending },
            SetRegionSync => {
                let (r, in_sync) = protocol::two_u64(p).ok_or(-libc::EINVAL)?;
                ClusterCommand::Change { group, change: Change::SetRegionSync(r, in_sync != 0), pending }
            }
            // Reads: from the view while it serves (a held, current state in a quorate group);
            // otherwise the engine answers them once it does (the kernel's I/O waits: an
            // answer from a missing or outdated state could send a write to one leg only of a
            // region the group holds in sync, or a read to a stale leg).
            IsClean | InSync | GetSyncCount | IsRemoteRecovering if !c.view.serving() => {
                let read = match kind {
                    IsClean => Read::IsClean(protocol::one_u64(p).ok_or(-libc::EINVAL)?),
                    InSync => Read::InSync(protocol::one_u64(p).ok_or(-libc::EINVAL)?),
                    IsRemoteRecovering => Read::RemoteRecovering(protocol::one_u64(p).ok_or(-libc::EINVAL)?),
                    _ => Read::SyncCount,
                };
                ClusterCommand::Read { group, read, pending }
            }
            IsClean => {
                let r = protocol::one_u64(p).ok_or(-libc::EINVAL)?;
                let v = c.view.is_clean(r)?;
                return Ok(Some(Outcome::Reply(0, Payload::bytes(&i64::from(v).to_ne_bytes()))));
            }
            // A region another node copies: the kernel asks IN_SYNC before a write it did not
            // check with IS_REMOTE_RECOVERING (its cached hint is above the region), and a
            // "not in sync" answer would send that write to the default leg during the copy.
            InSync => {
                let r = protocol::one_u64(p).ok_or(-libc::EINVAL)?;
                match c.view.in_sync_now(r)? {
                    InSyncAnswer::Now(v) => {
                        return Ok(Some(Outcome::Reply(0, Payload::bytes(&i64::from(v).to_ne_bytes()))))
                    }
                    InSyncAnswer::Wait => ClusterCommand::Read { group, read: Read::InSync(r), pending },
                    InSyncAnswer::VoidCopy => ClusterCommand::Change { group, change: Change::VoidCopy(r), pending },
                }
            }
            GetSyncCount => return Ok(Some(Outcome::Reply(0, Payload::bytes(&c.view.sync_count().to_ne_bytes())))),
            IsRemoteRecovering => {
                let r = protocol::one_u64(p).ok_or(-libc::EINVAL)?;
                let (rec, hint) = c.view.remote_recovering(r)?;
                // The kernel requeues this write while the region is raw: ask the group to copy
                // it next, so the write waits one copy, not the whole resync.
                if rec && c.view.want_worth_asking(r) {
                    let _ = (c.commands)(ClusterCommand::Want { group, region: r });
                }
                return Ok(Some(Outcome::Reply(0, Payload::bytes(&protocol::pair(u64::from(rec), hint)))));
            }
            Ctr | Dtr | Presuspend | GetRegionSize | StatusInfo | StatusTable => return Ok(None),
        };
        if (c.commands)(command) {
            Ok(Some(Outcome::DeferredToCluster))
        } else {
            Err(-libc::EIO)
        }
    }

    /// After a MARK or FLUSH: answer now, or once the marks are durable.
    fn after_change(
        entry: &LogEntry,
        (need, unwritten): (Option<u64>, bool),
        pending: PendingReply,
    ) -> Result<Outcome, i32> {
        let Some(persister) = &entry.persister else { return ok(Payload::none()) };
        if let Some(gen) = need {
            return if persister.when_durable(gen, pending) { Ok(Outcome::Deferred) } else { Err(-libc::EIO) };
        }
        if unwritten && entry.shared.claim_lazy() {
            persister.lazy();
        }
        ok(Payload::none())
    }

    /// CTR. Which log answers it, by what the kernel can have meant (dm-log-userspace-base.c):
    ///
    /// - The reconnect form (NUL-terminated, sent by `userspace_do_request` after -ESRCH) for a
    ///   log this agent has, with the same string: the kernel's log is the one it has. It keeps
    ///   its state, and its next load ignores the table's `sync`/`nosync` ([`LoadRule::Reconnect`]).
    /// - Any other CTR for a (uuid, luid) this agent has: the kernel's log of that address is
    ///   gone without a DTR having reached this agent, and the address (a slab address) is in
    ///   use again. `userspace_ctr` frees its context without a DTR when GET_REGION_SIZE,
    ///   `dm_get_device` or the workqueue fail after CTR succeeded; a DTR is lost when the
    ///   receive queue overflowed (the kernel then saw -ESRCH and freed it all the same); and a
    ///   resend of an unanswered CTR arrives before anything else happened to the log. In every
    ///   case the old log is destroyed as by a DTR (its last write done, its thread and device
    ///   released) and the new one is created. No CTR can reach a log the kernel still uses: it
    ///   sends CTR only for a new context, and its reconnect CTR in the NUL-terminated form.
    /// - A `clustered-core` log in `--state-dir` uses its state file only when the kernel
    ///   reconnects (the agent restarted) or while another log of the uuid exists (a table
    ///   reload); otherwise the file is an earlier mirror's, and the log starts over
    ///   ([`LoadRule::StartOver`]): a new table on other legs must not inherit its sync state.
    fn ctr(&mut self, req: &Request<'_>) -> Result<Outcome, i32> {
        let uuid = req.uuid();
        let luid = req.header.luid;
        let parsed = ctr::parse(req.payload).map_err(|e| {
            warn!(uuid = %String::from_utf8_lossy(uuid), error = %e, "CTR refused");
            -e.errno()
        })?;
        // The device name goes back so the kernel takes a reference on it (protocol v2+),
        // except to the reconnect loop's CTR, which has no room for a reply.
        let reply_payload = |args: &CtrArgs| match &args.kind {
            LogKind::Disk { device } if req.header.version > 1 && !parsed.reconnect => Payload::text(device),
            _ => Payload::none(),
        };
        if let Some(existing) = self.find(uuid, luid) {
            if parsed.reconnect && existing.ctr_text == parsed.text {
                existing.tel.metrics.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                existing.shared.lock().set_next_load(LoadRule::Reconnect);
                return ok(reply_payload(&existing.args));
            }
            let phase = existing.shared.lock().phase();
            let replaced = self.take(uuid, luid);
            if let Some(old) = replaced {
                if phase == Phase::Constructed {
                    info!(log = %old.name, mirror = old.tel.mirror().as_deref(), "CTR for a log that was never resumed: replaced (the kernel gave up on it, or resent its CTR)");
                } else {
                    warn!(log = %old.name, mirror = old.tel.mirror().as_deref(), phase = phase.name(), old = %old.ctr_text, new = %parsed.text, "CTR for a log that exists: the kernel destroyed it without a DTR reaching this agent; it is replaced");
                }
                if let Some(p) = old.persister {
                    p.stop(None);
                }
            }
        }
        // One name per log everywhere: the `log` label of its metrics and alerts, which the API
        // shows too (the two logs of a reload share it; the luid tells them apart).
        let uuid_text = String::from_utf8_lossy(uuid).into_owned();
        let tel = self.telemetry.log_telemetry(&uuid_text, parsed.reconnect);
        let name = tel.name.to_string();
        let args = parsed.args.clone();
        // A cluster log's state lives in the group (its members hold it), not in a state file.
        let state_dir = if self.cfg.cluster.is_some() { &None } else { &self.cfg.state_dir };
        let device = match (&args.kind, state_dir) {
            (LogKind::Disk { device }, _) => {
                let path = store::resolve_device(device).map_err(|e| {
                    warn!(log = %name, error = %e, "CTR refused");
                    -e.errno()
                })?;
                Some(LogDevice::open(&path, args.region_count()))
            }
            (LogKind::Core, Some(dir)) => {
                Some(LogDevice::open_state_file(&dir.join(store::state_file_name(uuid)), args.region_count()))
            }
            (LogKind::Core, None) => None,
        }
        .transpose()
        .map_err(|e| {
            warn!(log = %name, error = %e, "CTR refused: log device unusable");
            -e.errno()
        })?;
        let shared_device = match &device {
            Some(d) => Some(self.shared_device(uuid, d, &name)?),
            None => None,
        };
        let mut log = DirtyLog::new(&args, device.is_some())?;
        if parsed.reconnect {
            log.set_next_load(LoadRule::Reconnect);
        } else if args.kind == LogKind::Core
            && device.is_some()
            && !self.logs.values().flatten().any(|e| &*e.uuid == uuid)
        {
            log.set_next_load(LoadRule::StartOver);
        }
        if let Some(note) = self.orphaned_in_sync.remove(&(Box::<[u8]>::from(uuid), luid)) {
            warn!(log = %name, regions = ?note, "the kernel reconnected after an IN_SYNC this agent could not answer: those regions will be resynchronised");
            match note {
                OutOfSyncNote::Regions(regions) => regions.into_iter().for_each(|r| log.out_of_sync_at_resume(Some(r))),
                OutOfSyncNote::All => log.out_of_sync_at_resume(None),
            }
        }
        let shared = Arc::new(SharedLog::new(log));
        let dev_info = device.as_ref().map(|d| (d.path().to_path_buf(), d.dev));
        let device_key = device.as_ref().map(|d| d.key);
        if parsed.reconnect {
            tel.metrics.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // A cluster log's device is written by the group's disk writer through the engine, not
        // by a persister of this node.
        let (device, cluster_device) = if self.cfg.cluster.is_some() { (None, device) } else { (device, None) };
        let persister = match (device, shared_device) {
            (Some(d), Some(sd)) => Some(
                Persister::start(
                    Arc::clone(&shared),
                    d,
                    sd,
                    Arc::clone(&self.sink),
                    Arc::new(PersisterTelemetry::new(Arc::clone(&self.telemetry), Arc::clone(&tel))),
                    name.clone(),
                    Legs::new(&uuid_text),
                )
                .map_err(|e| {
                    warn!(log = %name, error = %e, "cannot start the log's I/O thread");
                    -e.raw_os_error().unwrap_or(libc::ENOMEM)
                })?,
            ),
            _ => None,
        };
        let cluster = match &self.cfg.cluster {
            Some(ClusterMode { commands, replies }) => {
                let mut group = uuid.to_vec();
                group.push(0);
                // A table reload (a second log of the uuid on this node) reads the same view as
                // the live table: the engine updates one view per group, and the live table keeps
                // serving I/O until it is suspended (or for good, if the reload is abandoned).
                let view = self
                    .logs
                    .values()
                    .flatten()
                    .find_map(|e| e.cluster.as_ref().filter(|c| c.group == group).map(|c| Arc::clone(&c.view)))
                    .unwrap_or_default();
                let shape = LogShape { region_count: args.region_count(), in_sync: args.sync == SyncMode::NoSync };
                let disk = match cluster_device {
                    Some(d) => Some(Box::new(
                        ClusterDisk::start(
                            d,
                            group.clone(),
                            args.region_count(),
                            args.sync,
                            Arc::clone(commands),
                            name.clone(),
                        )
                        .map_err(|e| {
                            warn!(log = %name, error = %e, "cannot start the log device's writer thread");
                            -e.raw_os_error().unwrap_or(libc::ENOMEM)
                        })?,
                    ) as Box<dyn crate::cluster::engine::DiskImage>),
                    None => None,
                };
                let open = ClusterCommand::Open {
                    group: group.clone(),
                    shape,
                    view: Arc::clone(&view),
                    reconnect: parsed.reconnect,
                    disk,
                };
                if !commands(open) {
                    warn!(log = %name, "CTR refused: the cluster engine is gone");
                    return Err(-libc::EIO);
                }
                replies.register(uuid, luid, Arc::clone(&tel), Arc::clone(&shared));
                Some(ClusterLog { group, view, commands: Arc::clone(commands), replies: Arc::clone(replies) })
            }
            None => None,
        };
        info!(log = %name, uuid = %String::from_utf8_lossy(uuid), luid, ctr = %parsed.text, regions = args.region_count(), reconnect = parsed.reconnect, cluster = cluster.is_some(), "log created");
        let payload = reply_payload(&args);
        self.telemetry.add_log(Arc::new(LogHandle {
            uuid: uuid_text,
            luid,
            kind: args.type_name(),
            ctr: parsed.text.clone(),
            region_size: args.region_size,
            region_count: args.region_count(),
            device: dev_info.as_ref().map(|d| d.0.clone()),
            dev: dev_info.as_ref().map(|d| d.1),
            shared: Arc::clone(&shared),
            tel: Arc::clone(&tel),
            cluster: cluster.as_ref().map(|c| Arc::clone(&c.view)),
        }));
        self.logs.entry(luid).or_default().push(LogEntry {
            uuid: uuid.into(),
            shared,
            persister,
            ctr_text: parsed.text,
            args,
            device: dev_info,
            device_key,
            name,
            tel,
            cluster,
        });
        ok(payload)
    }

    /// The [`SharedDevice`] for a log of `uuid` on `device`: the one its other logs use, or a
    /// new one. `-EBUSY` if a log of another uuid uses the device: two mirrors' logs on one
    /// device would overwrite each other's bitmap (device-mapper does not stop two tables from
    /// opening one device).
    fn shared_device(
        &mut self,
        uuid: &[u8],
        device: &LogDevice,
        name: &str,
    ) -> Result<Arc<SharedDevice<LogState>>, i32> {
        let key = device.key;
        if let Some(other) = self.logs.values().flatten().find(|e| e.device_key == Some(key) && &*e.uuid != uuid) {
            warn!(log = %name, device = %device.path().display(), other = %other.name, "CTR refused: the log device is in use by the log of another mirror");
            return Err(-libc::EBUSY);
        }
        self.devices.retain(|_, d| d.strong_count() > 0);
        if let Some(d) = self.devices.get(&key).and_then(Weak::upgrade) {
            return Ok(d);
        }
        let d = Arc::new(SharedDevice::default());
        self.devices.insert(key, Arc::downgrade(&d));
        Ok(d)
    }

    /// Removes a log from the server and the telemetry (its persister is the caller's).
    fn take(&mut self, uuid: &[u8], luid: u64) -> Option<LogEntry> {
        let entries = self.logs.get_mut(&luid)?;
        let i = entries.iter().position(|e| &*e.uuid == uuid)?;
        let entry = entries.swap_remove(i);
        if entries.is_empty() {
            self.logs.remove(&luid);
        }
        if let Some(c) = &entry.cluster {
            (c.commands)(ClusterCommand::Close { group: c.group.clone() });
            c.replies.unregister(uuid, luid);
        }
        self.telemetry.remove_log(&String::from_utf8_lossy(uuid), luid);
        Some(entry)
    }

    /// DTR: the outcome, and the telemetry of the log removed (None if there was none).
    fn dtr(
        &mut self,
        uuid: &[u8],
        luid: u64,
        pending: PendingReply,
    ) -> (Result<Outcome, i32>, Option<Arc<LogTelemetry>>) {
        let Some(entry) = self.take(uuid, luid) else { return (Err(-libc::EINVAL), None) };
        info!(log = %entry.name, mirror = entry.tel.mirror().as_deref(), "log destroyed");
        let outcome = match entry.persister {
            Some(p) => {
                p.stop(Some(pending));
                Ok(Outcome::Deferred)
            }
            None => ok(Payload::none()),
        };
        (outcome, Some(entry.tel))
    }

    /// Flushes every persistent log and stops its I/O thread (SIGTERM).
    pub fn shutdown(self) {
        for entry in self.logs.into_values().flatten() {
            if let Some(p) = entry.persister {
                p.stop_and_wait();
                info!(log = %entry.name, mirror = entry.tel.mirror().as_deref(), "log flushed");
            }
        }
    }
}

/// The flight record of a request (`reply`: the reply's payload).
fn flight_record(
    req: &Request<'_>,
    id: u64,
    received_ns: u64,
    service_ns: u64,
    error: i32,
    deferred: bool,
    reply: &[u8],
) -> FlightRecord {
    use RequestType::*;
    let word = |b: &[u8], at: usize| b.get(at..at + 8).map(|w| u64::from_ne_bytes(w.try_into().unwrap_or([0; 8])));
    let p = req.payload;
    let mut rec = FlightRecord {
        id,
        received_ns,
        service_ns,
        seq: req.header.seq,
        request_type: req.header.request_type & ulog_common::DM_ULOG_REQUEST_MASK,
        error,
        deferred,
        seen: true,
        payload_bytes: p.len() as u32,
        in_sync_arg: -1,
        reply_bytes: reply.len() as u32,
        ..FlightRecord::default()
    };
    match req.kind {
        Some(InSync | IsClean | IsRemoteRecovering | SetRegionSync) => {
            if let Some(r) = word(p, 0) {
                (rec.regions, rec.first_region) = (1, r);
            }
            if req.kind == Some(SetRegionSync) {
                rec.in_sync_arg = word(p, 8).map_or(-1, |v| i8::from(v != 0));
            }
        }
        Some(MarkRegion | ClearRegion | Flush) if p.len().is_multiple_of(8) => {
            rec.regions = (p.len() / 8) as u32;
            rec.first_region = word(p, 0).unwrap_or(0);
        }
        _ => {}
    }
    if error == 0 {
        let n = match req.kind {
            Some(GetRegionSize | IsClean | InSync | GetSyncCount) => 1,
            Some(GetResyncWork | IsRemoteRecovering) => 2,
            _ => 0,
        };
        for i in 0..n {
            if let Some(v) = word(reply, i * 8) {
                rec.reply_values[i] = v;
                rec.reply_value_count += 1;
            }
        }
    }
    rec
}

#[cfg(test)]
mod tests {
    //! Whole-server properties: whatever arrives, the server neither panics nor stays silent
    //! where an answer can be matched, and every answer is one the kernel accepts.
    use super::*;
    use crate::wire::kernel_peer::{encode_request, parse_datagram, Parsed, Request as PeerRequest};
    use proptest::prelude::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Collect(Mutex<Vec<(u32, Vec<u8>)>>);
    impl ReplySink for Collect {
        fn send_reply(&self, port: u32, datagram: &[u8]) -> bool {
            self.0.lock().unwrap().push((port, datagram.to_vec()));
            true
        }
    }

    fn server() -> (LogServer, Arc<Collect>) {
        let sink = Arc::new(Collect::default());
        let cfg = ServerConfig { state_dir: None, accept_peer: Some(77), ..Default::default() };
        (LogServer::new(cfg, sink.clone(), 1, Arc::new(Counters::default())), sink)
    }

    const UUIDS: [&str; 2] = ["LVM-a", "LVM-b"];
    const CTRS: [&str; 6] = [
        "64 clustered-core 2",
        "64 clustered-core 4 nosync",
        "1000 clustered-core 2",
        "64 clustered-core 3",
        "64 clustered-core",
        "64 clustered-disk /nonexistent 2",
    ];

    fn request() -> impl Strategy<Value = (u32, usize, u64, Vec<u8>)> {
        let payload = prop_oneof![
            Just(vec![]),
            (0usize..6).prop_map(|i| CTRS[i].as_bytes().to_vec()),
            proptest::collection::vec(0u64..600, 0..5).prop_map(|rs| rs.iter().flat_map(|r| r.to_ne_bytes()).collect()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ];
        (prop_oneof![1u32..=17, 0u32..20, any::<u32>()], 0usize..2, 1u64..3, payload)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn every_answer_is_one_the_kernel_accepts(
            reqs in proptest::collection::vec(request(), 1..60),
            mutate in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<usize>()), 0..10),
        ) {
            let (mut srv, sink) = server();
            for (i, (kind, u, luid, payload)) in reqs.iter().enumerate() {
                let seq = i as u32 + 1;
                let req = PeerRequest::raw(*kind, UUIDS[*u], *luid, payload.clone());
                let mut dgram = encode_request(&req, seq, 3).unwrap();
                if let Some((at, val, cut)) = mutate.get(i) {
                    let at = at % dgram.len();
                    dgram[at] = *val;
                    dgram.truncate(1 + cut % dgram.len());
                }
                let answerable = !matches!(protocol::decode(&dgram), Err(protocol::Rejected { answer: Answer::Drop, .. }));
                sink.0.lock().unwrap().clear();
                srv.handle_datagram(&dgram, 77, false);
                let replies = std::mem::take(&mut *sink.0.lock().unwrap());
                prop_assert_eq!(replies.len(), usize::from(answerable), "one reply per answerable datagram");
                for (port, r) in replies {
                    prop_assert_eq!(port, 77);
                    match parse_datagram(&r).map_err(TestCaseError::fail)? {
                        Parsed::Full { header, payload, .. } => {
                            prop_assert!(header.error <= 0);
                            if header.error != 0 {
                                prop_assert!(payload.is_empty());
                            }
                            let cap = RequestType::from_raw(header.request_type)
                                .and_then(|t| t.reply_capacity())
                                .unwrap_or(usize::MAX);
                            prop_assert!(payload.len() <= cap, "payload {} > capacity {}", payload.len(), cap);
                            let t = RequestType::from_raw(header.request_type);
                            if header.error == 0 && matches!(t, Some(RequestType::InSync | RequestType::IsClean)) {
                                let v = i64::from_ne_bytes(payload[..8].try_into().unwrap());
                                prop_assert!(v == 0 || v == 1);
                            }
                            if t.is_none() {
                                prop_assert_eq!(header.error, -libc::EINVAL);
                            }
                        }
                        Parsed::AckOnly { cn, .. } => prop_assert_eq!(cn.ack, libc::EINVAL as u32),
                        Parsed::Incomplete { .. } => prop_assert!(false, "incomplete reply"),
                    }
                }
            }
        }
    }

    #[test]
    fn foreign_senders_are_ignored_and_counted() {
        let (mut srv, sink) = server();
        let req = PeerRequest::raw(6, "x", 1, vec![]);
        let d = encode_request(&req, 1, 3).unwrap();
        srv.handle_datagram(&d, 1234, false);
        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(srv.counters().dropped_of(Dropped::ForeignSender), 1);
        srv.handle_datagram(&d, 0, false);
        assert_eq!(sink.0.lock().unwrap().len(), 1, "the kernel (port 0) is always served");
    }

    #[test]
    fn oversized_datagrams_get_einval() {
        let (mut srv, sink) = server();
        let d = encode_request(&PeerRequest::raw(8, "x", 1, vec![0; 8]), 5, 3).unwrap();
        srv.handle_datagram(&d, 77, true);
        let r = sink.0.lock().unwrap().pop().unwrap().1;
        let Ok(Parsed::Full { header, .. }) = parse_datagram(&r) else { panic!("full reply expected") };
        assert_eq!((header.seq, header.error), (5, -libc::EINVAL));
        assert_eq!(srv.counters().malformed_of(protocol::Malformed::Oversized), 1);
    }
}
