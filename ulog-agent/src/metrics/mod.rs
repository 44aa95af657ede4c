//! Telemetry: what the request path records, the registry of logs the HTTP API reads, and the
//! Prometheus exposition ([`export`]).
//!
//! # Design
//! * **Request path** (receive thread, and a persistent log's I/O thread for the requests it
//!   answers): per-request figures are relaxed atomics in handles resolved once, at CTR, and kept
//!   in the log's entry ([`LogTelemetry`], [`LogMetrics`]); the service-time histograms are
//!   [`histogram::AtomicHistogram`]s indexed by request type. Per log, only FLUSH and
//!   MARK_REGION ([`SLO_TYPES`]) also get a service-time histogram ([`LogMetrics::slo_service`]),
//!   over the three SLO edges only: 12 series per log (2 types x 4 buckets, sum, count), enough
//!   for a per-log SLI without a full ladder's 31 series per type and log. The flight recorder
//!   ([`flight`]) and the dirty-time table ([`dirty`]) live inside the log's mutex
//!   ([`LogState`]), written in critical sections the request path takes anyway (plus one short
//!   one to record the request after its reply is sent). Nothing allocates per request.
//! * **Registry** ([`Telemetry::logs`]): an immutable list of [`LogHandle`]s replaced
//!   (copy-on-write) at CTR and DTR by the receive thread; readers take a mutex only to clone an
//!   `Arc`. Reading a log's state = lock its mutex, copy, unlock ([`regions`]).
//! * **Names**: the `log` label is a short, stable name derived from the dm uuid alone
//!   ([`short_name`]), shared by the logs of one uuid (a table reload's two logs), so a mirror's
//!   series survive reloads; `ulog_log_info` maps it back to the uuid, the log device and the
//!   mirror's dm name. Log lines that name a log add `mirror=<dm name>` once the 5 s discovery
//!   has found it ([`LogTelemetry::mirror`], handed to each log by [`Telemetry::set_mirrors`] and
//!   at registration): the engine's lines read that cached name, never a DM ioctl of their own.
//! * **Off the request path**: a 1 s sampler (resync rate and ETA) and a 5 s mirror-device
//!   refresh ([`mirror`]) run on the runtime's blocking pool; the exporter reads everything at
//!   scrape time.
//! * **Cluster mode** ([`Telemetry::set_cluster`]): the engine's and the transport's counters
//!   are relaxed atomics the exporter reads; the engine's answers are timed into
//!   [`Telemetry::observe_cluster_service`] (a lock-free histogram per type, on the engine's
//!   thread). A cluster log's own figures (members, held requests, per-node marks) come from
//!   its [`crate::cluster::engine::ClusterView::status`], which locks the view and walks the
//!   marks: called at scrape and API time only, never on the request path. Its region and sync
//!   gauges are the replicated state's, not the local [`DirtyLog`]'s (which the cluster engine
//!   does not update), and are left out while this member does not hold the state.

pub mod counters;
pub mod dirty;
pub mod export;
pub mod flight;
pub mod histogram;
pub mod kernel;
pub mod mirror;
pub mod persister;
pub mod regions;
pub mod textfile;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ulog_common::{RequestType, REQUEST_TYPE_COUNT};

use crate::metrics::counters::Counters;
use crate::region_log::dirty_log::{DirtyLog, LogError};
use crate::region_log::persist;
use crate::telemetry::correlate::SeqTable;
use dirty::DirtyTracker;
use flight::{FlightIds, FlightRing};
use histogram::{AtomicHistogram, DIRTY_EDGES_NS, PER_LOG_SLO_EDGES_NS};
use kernel::KernelSource;
use mirror::MirrorDevice;
use regions::RegionCounts;

/// The process clock: nanoseconds since the telemetry epoch (taken once, at first use), and the
/// wall-clock time of that epoch, so records keep monotonic `u64`s and are shown as dates.
///
/// The clock is `CLOCK_MONOTONIC`, read with `clock_gettime` (what `Instant` reads on Linux,
/// through the vDSO), and the epoch's raw value is kept: [`kernel_ns`] turns a clock value into
/// the kernel's `bpf_ktime_get_ns()` time base exactly, so the agent's receive and reply times
/// compare with the eBPF probes' timestamps without any offset estimate.
pub mod clock {
    use std::sync::OnceLock;
    use std::time::{Duration, SystemTime};

    static EPOCH: OnceLock<(u64, SystemTime)> = OnceLock::new();
    static TIMENS_OFFSET: OnceLock<i64> = OnceLock::new();

    /// Raw `CLOCK_MONOTONIC` in ns (the time base of `bpf_ktime_get_ns`, unless the agent runs
    /// in a time namespace: see [`monotonic_offset_ns`]).
    #[inline]
    pub fn monotonic_raw_ns() -> u64 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes the timespec we pass; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
    }

    /// The epoch: raw monotonic ns and wall-clock time (set on first use).
    pub fn epoch() -> (u64, SystemTime) {
        *EPOCH.get_or_init(|| (monotonic_raw_ns(), SystemTime::now()))
    }

    /// How far this process's `CLOCK_MONOTONIC` is ahead of the kernel's own (the one
    /// `bpf_ktime_get_ns` reads): non-zero only in a time namespace (`unshare --time
    /// --monotonic`, some container runtimes), from `/proc/self/timens_offsets`; read once.
    pub fn monotonic_offset_ns() -> i64 {
        *TIMENS_OFFSET.get_or_init(|| {
            std::fs::read_to_string("/proc/self/timens_offsets").map_or(0, |t| parse_timens_offsets(&t))
        })
    }

    /// The `monotonic` line of `/proc/<pid>/timens_offsets` (`monotonic <secs> <nanosecs>`), in ns.
    pub fn parse_timens_offsets(text: &str) -> i64 {
        text.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                if f.next()? != "monotonic" {
                    return None;
                }
                let secs: i64 = f.next()?.parse().ok()?;
                let nanos: i64 = f.next()?.parse().ok()?;
                Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
            })
            .unwrap_or(0)
    }

    /// Now, in nanoseconds since the epoch.
    #[inline]
    pub fn now_ns() -> u64 {
        monotonic_raw_ns().saturating_sub(epoch().0)
    }

    /// A clock value in the kernel's `CLOCK_MONOTONIC` time base (`bpf_ktime_get_ns`), the time
    /// namespace's offset taken off.
    #[inline]
    pub fn kernel_ns(ns: u64) -> u64 {
        ns.wrapping_add(epoch().0).wrapping_sub(monotonic_offset_ns() as u64)
    }

    /// A kernel `CLOCK_MONOTONIC` time as a clock value (0 for times before the epoch).
    #[inline]
    pub fn from_kernel_ns(kns: u64) -> u64 {
        kns.wrapping_add(monotonic_offset_ns() as u64).saturating_sub(epoch().0)
    }

    /// The wall-clock time of a clock value.
    pub fn system(ns: u64) -> SystemTime {
        epoch().1 + Duration::from_nanos(ns)
    }

    /// Seconds since 1970 of a clock value.
    pub fn unix_seconds(ns: u64) -> f64 {
        system(ns).duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn time_namespace_offsets() {
            assert_eq!(super::parse_timens_offsets("monotonic 0 0\nboottime 0 0\n"), 0);
            assert_eq!(super::parse_timens_offsets("monotonic 86400 5\nboottime 0 0\n"), 86_400_000_000_005);
            assert_eq!(super::parse_timens_offsets("monotonic -10 0\n"), -10_000_000_000);
            assert_eq!(super::parse_timens_offsets(""), 0);
        }

        #[test]
        fn same_base_as_instant_and_round_trips() {
            let a = super::now_ns();
            let k = super::kernel_ns(a);
            assert_eq!(super::from_kernel_ns(k), a);
            let raw = super::monotonic_raw_ns();
            assert!(raw >= k, "monotonic");
            // Instant is CLOCK_MONOTONIC too: elapsed times agree.
            let t = std::time::Instant::now();
            let r0 = super::monotonic_raw_ns();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let r1 = super::monotonic_raw_ns();
            let e = t.elapsed().as_nanos() as u64;
            assert!(r1 - r0 >= 20_000_000);
            assert!(e >= r1 - r0, "{e} < {}", r1 - r0);
        }
    }
}

/// The index of a request type in per-type tables (unknown types: the last slot).
#[inline]
pub fn type_slot(kind: Option<RequestType>) -> usize {
    kind.map_or(REQUEST_TYPE_COUNT, RequestType::index)
}

/// The `type` label of a per-type slot.
pub fn type_label(slot: usize) -> &'static str {
    RequestType::ALL.get(slot).map_or("UNKNOWN", |t| t.name())
}

/// A short, stable name for the log(s) of a dm uuid, for the `log` label: the uuid without an
/// `LVM-` prefix if that leaves at most 24 characters, else its last 16 characters (for LVM's
/// `LVM-<vg uuid><lv uuid>`, the end of the LV's uuid). `taken` says whether a name is used by
/// another uuid; on a clash the tail grows (32 characters, then the whole uuid).
pub fn short_name(uuid: &str, taken: impl Fn(&str) -> bool) -> String {
    let body = uuid.strip_prefix("LVM-").unwrap_or(uuid);
    let chars: Vec<char> = body.chars().collect();
    if chars.len() <= 24 && !body.is_empty() && !taken(body) {
        return body.to_string();
    }
    for n in [16, 32] {
        if chars.len() > n {
            let tail: String = chars[chars.len() - n..].iter().collect();
            if !taken(&tail) {
                return tail;
            }
        }
    }
    if !taken(uuid) {
        return uuid.to_string();
    }
    (2u32..).map(|k| format!("{uuid}~{k}")).find(|n| !taken(n)).unwrap_or_default()
}

/// A receive loop that has not run for this long is stalled (it runs at least every 250 ms).
pub const RECEIVE_LOOP_STALL_NS: u64 = 10_000_000_000;

/// The request types with a latency SLO (dm-raid1 waits for them on every write to a clean
/// region), which get a per-log service-time histogram: `ulog_log_request_duration_seconds`.
pub const SLO_TYPES: [RequestType; 2] = [RequestType::Flush, RequestType::MarkRegion];

/// The slot of a request type in [`LogMetrics::slo_service`] (None: not an SLO type).
#[inline]
pub fn slo_slot(kind: RequestType) -> Option<usize> {
    SLO_TYPES.iter().position(|&t| t == kind)
}

/// Per-log counters and histograms, shared by every log of one uuid (their series continue across
/// a table reload). All relaxed atomics.
#[derive(Debug)]
pub struct LogMetrics {
    /// `[type][0 = ok, 1 = error]`.
    requests: [[AtomicU64; 2]; REQUEST_TYPE_COUNT],
    /// Reconnect-form CTRs (the kernel had lost its server).
    pub reconnects: AtomicU64,
    /// How long regions stayed dirty (MARK to CLEAR). Written by the receive thread only (CLEAR
    /// is answered there), so with [`AtomicHistogram::observe_ns_single_writer`].
    pub dirty: AtomicHistogram,
    /// Regions made dirty while the timing table was full.
    pub dirty_untimed: AtomicU64,
    /// Durable writes of the log device (one per group commit).
    pub flush: AtomicHistogram,
    /// Bytes written by them.
    pub flush_bytes: AtomicU64,
    /// Failed durable writes.
    pub flush_errors: AtomicU64,
    /// Flushes of the mirror legs before clean bits were written: `[ok, failed]`.
    pub leg_flushes: [AtomicU64; 2],
    /// Service time of the [`SLO_TYPES`] answered for this log, over the SLO edges only
    /// ([`PER_LOG_SLO_EDGES_NS`]: 6 series per type, 12 per log), so one slow log is not
    /// diluted by busy fast ones in the per-type histogram. Receive and I/O threads both write.
    pub slo_service: [AtomicHistogram; SLO_TYPES.len()],
}

impl Default for LogMetrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            reconnects: AtomicU64::new(0),
            dirty: AtomicHistogram::new(&DIRTY_EDGES_NS),
            dirty_untimed: AtomicU64::new(0),
            flush: AtomicHistogram::latency(),
            flush_bytes: AtomicU64::new(0),
            flush_errors: AtomicU64::new(0),
            leg_flushes: Default::default(),
            slo_service: std::array::from_fn(|_| AtomicHistogram::new(&PER_LOG_SLO_EDGES_NS)),
        }
    }
}

impl LogMetrics {
    /// One answered request.
    #[inline]
    pub fn request(&self, kind: RequestType, error: i32) {
        self.requests[kind.index()][usize::from(error != 0)].fetch_add(1, Relaxed);
    }

    /// `(ok, error)` answers of a type.
    pub fn requests_of(&self, kind: RequestType) -> (u64, u64) {
        let r = &self.requests[kind.index()];
        (r[0].load(Relaxed), r[1].load(Relaxed))
    }

    /// A flush of the mirror legs (before clean bits were written).
    pub fn leg_flushed(&self, ok: bool) {
        self.leg_flushes[usize::from(!ok)].fetch_add(1, Relaxed);
    }

    /// A durable write of `bytes` that took `ns`.
    pub fn flushed(&self, bytes: u64, ns: u64, ok: bool) {
        self.flush.observe_ns(ns);
        self.flush_bytes.fetch_add(bytes, Relaxed);
        if !ok {
            self.flush_errors.fetch_add(1, Relaxed);
        }
    }
}

/// The telemetry of one log (one (uuid, luid)).
#[derive(Debug)]
pub struct LogTelemetry {
    /// The `log` label.
    pub name: Arc<str>,
    /// Counters shared by the logs of this uuid.
    pub metrics: Arc<LogMetrics>,
    /// Flight-recorder ids.
    pub ids: FlightIds,
    /// When it was constructed ([`clock`] ns).
    pub created_ns: u64,
    /// When a RESUME was last answered successfully (0: never).
    pub resumed_ns: AtomicU64,
    /// Constructed by a reconnect-form CTR.
    pub by_reconnect: bool,
    history: Mutex<SyncHistory>,
    /// The dm name of the log's mirror, as the 5 s discovery last found it (None: not found).
    /// For log lines that name the log (`mirror=<dm name>`): read off the request path only,
    /// written by [`Telemetry::set_mirrors`] and at registration, never by a DM ioctl of its own.
    mirror: Mutex<Option<Arc<str>>>,
}

impl LogTelemetry {
    /// A request of this log was answered (receive thread or I/O thread), `service_ns` after it
    /// was received.
    #[inline]
    pub fn answered(&self, kind: RequestType, error: i32, now_ns: u64, service_ns: u64) {
        self.metrics.request(kind, error);
        if let Some(slot) = slo_slot(kind) {
            self.metrics.slo_service[slot].observe_ns(service_ns);
        }
        if kind == RequestType::Resume && error == 0 {
            self.resumed_ns.store(now_ns.max(1), Relaxed);
        }
    }

    /// The dm name of the log's mirror, if discovery found it. For log lines: record it as
    /// `mirror = tel.mirror().as_deref()` (tracing records nothing for `None`).
    pub fn mirror(&self) -> Option<Arc<str>> {
        lock(&self.mirror).clone()
    }

    fn set_mirror(&self, name: Option<&str>) {
        let mut m = lock(&self.mirror);
        if m.as_deref() != name {
            *m = name.map(Arc::from);
        }
    }

    /// Regions per state (counted now, a chunk of the bitmaps per lock).
    pub fn region_counts(&self, log: &SharedLog, region_count: u64) -> RegionCounts {
        regions::count(log, region_count)
    }

    /// Resync speed (regions/s over the sampling window) and estimated seconds to completion,
    /// given the current sync count. `(None, None)` without enough samples or progress;
    /// `eta` is 0 once everything is in sync.
    pub fn resync_estimate(&self, region_count: u64, sync_count: u64) -> (Option<f64>, Option<f64>) {
        let remaining = region_count.saturating_sub(sync_count);
        let rate = lock(&self.history).rate();
        let eta = if remaining == 0 { Some(0.0) } else { rate.filter(|r| *r > 0.0).map(|r| remaining as f64 / r) };
        (rate, eta)
    }

    fn sample(&self, now_ns: u64, sync_count: u64) {
        lock(&self.history).push(now_ns, sync_count);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sync-count samples, one per second, for the resync rate.
#[derive(Debug, Default)]
struct SyncHistory {
    samples: VecDeque<(u64, u64)>,
}

/// Window of the resync rate.
const RATE_WINDOW_NS: u64 = 30_000_000_000;

impl SyncHistory {
    fn push(&mut self, now_ns: u64, sync: u64) {
        // A drop (a region failed, a reload) starts the window again.
        if self.samples.back().is_some_and(|&(_, s)| sync < s) {
            self.samples.clear();
        }
        self.samples.push_back((now_ns, sync));
        while self.samples.front().is_some_and(|&(t, _)| now_ns.saturating_sub(t) > RATE_WINDOW_NS) {
            self.samples.pop_front();
        }
    }

    fn rate(&self) -> Option<f64> {
        let (&(t0, s0), &(t1, s1)) = (self.samples.front()?, self.samples.back()?);
        (t1 >= t0 + 2_000_000_000).then(|| (s1 - s0) as f64 / ((t1 - t0) as f64 / 1e9))
    }
}

/// A log as the agent shares it between the receive thread, its I/O thread and the API: the
/// engine's log with this module's [`LogState`] under its mutex.
pub type SharedLog = persist::SharedLog<LogState>;

/// What a log's mutex protects: the log itself, and its request-path telemetry.
#[derive(Debug)]
pub struct LogState {
    log: DirtyLog,
    /// The flight recorder.
    pub flight: FlightRing,
    /// MARK times of dirty regions.
    pub dirty: DirtyTracker,
}

impl LogState {
    /// Wraps a log.
    pub fn new(log: DirtyLog) -> Self {
        let dirty = DirtyTracker::new(log.region_count());
        Self { log, flight: FlightRing::new(), dirty }
    }

    /// [`DirtyLog::mark`], timing the regions it makes dirty (the first 64 of a request: the
    /// kernel sends at most 32).
    pub fn mark_timed(
        &mut self,
        regions: impl Iterator<Item = u64> + Clone,
        now_ns: u64,
        m: &LogMetrics,
    ) -> Result<(), LogError> {
        let mut was_clean = 0u64;
        for (i, r) in regions.clone().take(64).enumerate() {
            if self.log.is_clean(r) == Ok(true) {
                was_clean |= 1 << i;
            }
        }
        self.log.mark(regions.clone())?;
        if was_clean != 0 {
            for (i, r) in regions.take(64).enumerate() {
                if was_clean & (1 << i) != 0 && !self.dirty.start(r, now_ns) {
                    m.dirty_untimed.fetch_add(1, Relaxed);
                }
            }
        }
        Ok(())
    }

    /// [`DirtyLog::clear`], observing how long each region it makes clean was dirty.
    pub fn clear_timed(
        &mut self,
        regions: impl Iterator<Item = u64> + Clone,
        now_ns: u64,
        m: &LogMetrics,
    ) -> Result<(), LogError> {
        self.log.clear(regions.clone())?;
        if !self.dirty.is_empty() {
            for r in regions {
                if self.log.is_clean(r) == Ok(true) {
                    if let Some(since) = self.dirty.finish(r) {
                        m.dirty.observe_ns_single_writer(now_ns.saturating_sub(since));
                    }
                }
            }
        }
        Ok(())
    }
}

impl From<DirtyLog> for LogState {
    fn from(log: DirtyLog) -> Self {
        Self::new(log)
    }
}

impl Deref for LogState {
    type Target = DirtyLog;
    fn deref(&self) -> &DirtyLog {
        &self.log
    }
}

impl DerefMut for LogState {
    fn deref_mut(&mut self) -> &mut DirtyLog {
        &mut self.log
    }
}

/// A log as the API and the exporter see it.
#[derive(Debug)]
pub struct LogHandle {
    /// dm uuid.
    pub uuid: String,
    /// Kernel log id.
    pub luid: u64,
    /// clustered-core / clustered-disk.
    pub kind: &'static str,
    /// The constructor string.
    pub ctr: String,
    /// Region size in sectors.
    pub region_size: u64,
    /// Regions.
    pub region_count: u64,
    /// The log device or state file.
    pub device: Option<PathBuf>,
    /// Its device number (0:0 for regular files).
    pub dev: Option<(u32, u32)>,
    /// The log's state.
    pub shared: Arc<SharedLog>,
    /// Its telemetry.
    pub tel: Arc<LogTelemetry>,
    /// Cluster mode: the replicated state this member serves from (the `shared` log is then
    /// only the table's shape; sync and mark counts come from here).
    pub cluster: Option<Arc<crate::cluster::engine::ClusterView>>,
}

impl LogHandle {
    /// Whether the log keeps its state on a device or file.
    pub fn persistent(&self) -> bool {
        self.device.is_some()
    }

    /// In-sync regions: the replicated state's count for a cluster log (0 while this member
    /// does not hold it, as GET_SYNC_COUNT answers), else the local log's.
    pub fn sync_count(&self) -> u64 {
        match &self.cluster {
            Some(view) => view.sync_count(),
            None => self.shared.lock().sync_count(),
        }
    }

    /// Regions per state. A cluster log's come from its replicated state (None while this
    /// member does not hold it: the counts are unknown, not "all out of sync"); walks the marks
    /// or the bitmaps, so off the request path only.
    pub fn region_counts(&self) -> Option<RegionCounts> {
        match &self.cluster {
            Some(view) => cluster_region_counts(&view.status()),
            None => Some(self.tel.region_counts(&self.shared, self.region_count)),
        }
    }
}

/// Regions per state of a cluster log, from its status (None while the state is not held).
pub fn cluster_region_counts(st: &crate::cluster::engine::ClusterLogStatus) -> Option<RegionCounts> {
    st.holding.then(|| {
        let out_of_sync = st.region_count.saturating_sub(st.sync_count);
        let dirty = st.dirty.min(st.sync_count);
        RegionCounts { clean: st.sync_count - dirty, dirty, out_of_sync }
    })
}

/// The request types the cluster engine answers (the others of a cluster log are answered
/// locally): the `type` values of `ulog_cluster_request_duration_seconds`, exported from the
/// start.
pub const CLUSTER_TYPES: [RequestType; 7] = [
    RequestType::Resume,
    RequestType::Postsuspend,
    RequestType::Flush,
    RequestType::MarkRegion,
    RequestType::ClearRegion,
    RequestType::GetResyncWork,
    RequestType::SetRegionSync,
];

/// The counters of cluster mode, handed over by `main` once the engine and its transport exist.
#[derive(Clone, Debug)]
pub struct ClusterStats {
    /// The engine's counters (and the node's quorum).
    pub engine: Arc<crate::cluster::engine::EngineStats>,
    /// The corosync transport's counters (None until the transport hands them over).
    pub bus: Option<Arc<crate::cluster::bus::BusStats>>,
}

struct Named {
    name: Arc<str>,
    metrics: Arc<LogMetrics>,
    instances: usize,
}

#[derive(Default)]
struct Registry {
    logs: Arc<Vec<Arc<LogHandle>>>,
    by_uuid: HashMap<String, Named>,
}

/// Agent life cycle, for `/readyz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// The receive loop has not started.
    Starting,
    /// Serving.
    Serving,
    /// SIGTERM/SIGINT: flushing and exiting.
    Stopping,
}

/// The root of the telemetry, shared by the receive thread, the I/O threads and the HTTP API.
pub struct Telemetry {
    counters: Arc<Counters>,
    service: Box<[AtomicHistogram]>,
    registry: Mutex<Registry>,
    heartbeat_ns: AtomicU64,
    lifecycle: AtomicU8,
    probe_attached: AtomicBool,
    probes_disabled: AtomicBool,
    kernel: Mutex<Option<Arc<dyn KernelSource>>>,
    probe_status: Mutex<String>,
    mirrors: Mutex<Arc<MirrorView>>,
    http_addr: Mutex<Option<SocketAddr>>,
    seqs: SeqTable,
    /// `--slow-request-us`, in ns (what `/api/v1/kernel/slow` keeps, probes attached or not).
    slow_threshold_ns: AtomicU64,
    /// Cluster mode: the engine's and the transport's counters (None: single node).
    cluster: Mutex<Option<ClusterStats>>,
    cluster_control: Mutex<Option<crate::cluster::engine::CommandSink>>,
    /// Service time of the requests the cluster engine answered, by type slot (written by the
    /// engine's thread only; exported in cluster mode).
    cluster_service: Box<[AtomicHistogram]>,
}

/// The cached log-uuid -> mirror mapping.
#[derive(Clone, Debug, Default)]
pub struct MirrorView {
    /// Mirrors by log uuid.
    pub by_uuid: HashMap<String, MirrorDevice>,
    /// When it was refreshed (0: never).
    pub refreshed_ns: u64,
    /// Why the last refresh failed, if it did.
    pub error: Option<String>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Telemetry around the request-path counters.
    pub fn new(counters: Arc<Counters>) -> Self {
        clock::epoch();
        Self {
            counters,
            service: (0..=REQUEST_TYPE_COUNT).map(|_| AtomicHistogram::latency()).collect(),
            registry: Mutex::new(Registry::default()),
            heartbeat_ns: AtomicU64::new(0),
            lifecycle: AtomicU8::new(0),
            probe_attached: AtomicBool::new(false),
            probes_disabled: AtomicBool::new(false),
            kernel: Mutex::new(None),
            probe_status: Mutex::new("not started".into()),
            mirrors: Mutex::new(Arc::default()),
            http_addr: Mutex::new(None),
            seqs: SeqTable::default(),
            slow_threshold_ns: AtomicU64::new(0),
            cluster: Mutex::new(None),
            cluster_control: Mutex::new(None),
            cluster_service: (0..=REQUEST_TYPE_COUNT).map(|_| AtomicHistogram::latency()).collect(),
        }
    }

    /// Cluster mode: the engine's counters and, once the transport hands them over, its own.
    /// From here on the `ulog_cluster_*` families are exported and `/api/v1/agent` has a
    /// `cluster` section.
    pub fn set_cluster(
        &self,
        engine: Arc<crate::cluster::engine::EngineStats>,
        bus: Option<Arc<crate::cluster::bus::BusStats>>,
    ) {
        *lock(&self.cluster) = Some(ClusterStats { engine, bus });
    }

    /// The cluster counters (None: not in cluster mode).
    pub fn cluster(&self) -> Option<ClusterStats> {
        lock(&self.cluster).clone()
    }

    /// Cluster mode: where operator commands (a fencing confirmation) go.
    pub fn set_cluster_control(&self, sink: crate::cluster::engine::CommandSink) {
        *lock(&self.cluster_control) = Some(sink);
    }

    /// The cluster engine's command queue (None: not in cluster mode).
    pub fn cluster_control(&self) -> Option<crate::cluster::engine::CommandSink> {
        lock(&self.cluster_control).clone()
    }

    /// Service time (receipt to reply sent) of one request the cluster engine answered. On the
    /// engine's thread: a binary search and two relaxed adds, no lock.
    #[inline]
    pub fn observe_cluster_service(&self, kind: Option<RequestType>, ns: u64) {
        self.cluster_service[type_slot(kind)].observe_ns(ns);
    }

    /// The cluster service-time histogram of a type slot ([`type_slot`]).
    pub fn cluster_service(&self, slot: usize) -> &AtomicHistogram {
        &self.cluster_service[slot]
    }

    /// Sets the kernel round trip from which a request counts as slow (`--slow-request-us`).
    pub fn set_slow_threshold_ns(&self, ns: u64) {
        self.slow_threshold_ns.store(ns, Relaxed);
    }

    /// The slow-request threshold, ns.
    pub fn slow_threshold_ns(&self) -> u64 {
        self.slow_threshold_ns.load(Relaxed)
    }

    /// The request-path counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Agent service time (receive to reply sent) of one request.
    #[inline]
    pub fn observe_service(&self, kind: Option<RequestType>, ns: u64) {
        self.service[type_slot(kind)].observe_ns(ns);
    }

    /// The service-time histogram of a type slot ([`type_slot`]).
    pub fn service(&self, slot: usize) -> &AtomicHistogram {
        &self.service[slot]
    }

    /// The receive loop is alive (it beats at least every 250 ms).
    #[inline]
    pub fn beat(&self, now_ns: u64) {
        self.heartbeat_ns.store(now_ns.max(1), Relaxed);
    }

    /// Last heartbeat (0: none yet).
    pub fn heartbeat_ns(&self) -> u64 {
        self.heartbeat_ns.load(Relaxed)
    }

    /// How long the receive loop has not run, as of `now_ns`, if it is serving, has run, and has
    /// been away longer than [`RECEIVE_LOOP_STALL_NS`] (`/healthz` fails, the textfile says it
    /// does not serve).
    pub fn receive_loop_stall(&self, now_ns: u64) -> Option<u64> {
        let hb = self.heartbeat_ns();
        let idle = now_ns.saturating_sub(hb);
        (self.lifecycle() == Lifecycle::Serving && hb != 0 && idle > RECEIVE_LOOP_STALL_NS).then_some(idle)
    }

    /// Sets the life-cycle phase.
    pub fn set_lifecycle(&self, l: Lifecycle) {
        self.lifecycle.store(l as u8, Relaxed);
    }

    /// The life-cycle phase.
    pub fn lifecycle(&self) -> Lifecycle {
        match self.lifecycle.load(Relaxed) {
            0 => Lifecycle::Starting,
            1 => Lifecycle::Serving,
            _ => Lifecycle::Stopping,
        }
    }

    /// The probes: attached (`Some`, the source of kernel figures) or not, and why, for display.
    pub fn set_probes(&self, source: Option<Arc<dyn KernelSource>>, status: String) {
        self.probe_attached.store(source.is_some(), Relaxed);
        *lock(&self.kernel) = source;
        *lock(&self.probe_status) = status;
    }

    /// The kernel source (kept once set: its families stay exported, frozen, while the probes
    /// are detached).
    pub fn set_kernel_source(&self, source: Arc<dyn KernelSource>) {
        *lock(&self.kernel) = Some(source);
    }

    /// Whether the probes are attached now, and why (not).
    pub fn set_probe_state(&self, attached: bool, status: String) {
        self.probe_attached.store(attached, Relaxed);
        *lock(&self.probe_status) = status;
    }

    /// Whether the eBPF probe is attached.
    pub fn probe_attached(&self) -> bool {
        self.probe_attached.load(Relaxed)
    }

    /// The operator turned the probes off (`--no-probes`): a detached probe is then intended,
    /// and the probe alert stays quiet.
    pub fn set_probes_disabled(&self, disabled: bool) {
        self.probes_disabled.store(disabled, Relaxed);
    }

    /// Whether the probes were turned off by the operator.
    pub fn probes_disabled(&self) -> bool {
        self.probes_disabled.load(Relaxed)
    }

    /// What the probes say (or why there are none).
    pub fn probe_status(&self) -> String {
        lock(&self.probe_status).clone()
    }

    /// Request path: a request with kernel seq `seq`, received at `received_ns`, is about to be
    /// answered now. Only while the probes are attached (one relaxed load otherwise); three
    /// relaxed stores into a fixed table (see `telemetry::correlate`).
    #[inline]
    pub fn about_to_reply(&self, seq: u32, received_ns: u64) {
        if self.probe_attached.load(Relaxed) {
            self.seqs.record(seq, received_ns, clock::now_ns());
        }
    }

    /// The request path's seq table.
    pub fn seqs(&self) -> &SeqTable {
        &self.seqs
    }

    /// The kernel source, if attached.
    pub fn kernel_source(&self) -> Option<Arc<dyn KernelSource>> {
        lock(&self.kernel).clone()
    }

    /// The mirror mapping.
    pub fn mirrors(&self) -> Arc<MirrorView> {
        Arc::clone(&lock(&self.mirrors))
    }

    /// Replaces the mirror mapping, and hands each registered log its mirror's dm name (for its
    /// log lines).
    pub fn set_mirrors(&self, v: MirrorView) {
        for h in self.logs().iter() {
            h.tel.set_mirror(v.by_uuid.get(&h.uuid).map(|m| m.name.as_str()));
        }
        *lock(&self.mirrors) = Arc::new(v);
    }

    /// The HTTP server's address, once bound.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        *lock(&self.http_addr)
    }

    /// Records the HTTP server's address.
    pub fn set_http_addr(&self, a: Option<SocketAddr>) {
        *lock(&self.http_addr) = a;
    }

    /// Every log, sorted by name and luid (a snapshot: holding it never blocks the request path).
    pub fn logs(&self) -> Arc<Vec<Arc<LogHandle>>> {
        Arc::clone(&lock(&self.registry).logs)
    }

    /// The telemetry of a log about to be constructed (CTR). The log's name and counters are
    /// those of any live log with the same uuid. Nothing is registered until [`Self::add_log`].
    pub fn log_telemetry(&self, uuid: &str, by_reconnect: bool) -> Arc<LogTelemetry> {
        let reg = lock(&self.registry);
        let (name, metrics) = match reg.by_uuid.get(uuid) {
            Some(n) => (Arc::clone(&n.name), Arc::clone(&n.metrics)),
            None => {
                let name = short_name(uuid, |cand| reg.by_uuid.values().any(|n| &*n.name == cand));
                (Arc::from(name), Arc::default())
            }
        };
        Arc::new(LogTelemetry {
            name,
            metrics,
            ids: FlightIds::default(),
            created_ns: clock::now_ns(),
            resumed_ns: AtomicU64::new(0),
            by_reconnect,
            history: Mutex::default(),
            mirror: Mutex::new(None),
        })
    }

    /// Registers a constructed log (with its mirror's dm name, if the last discovery found it:
    /// a reconnected or reloaded log's mirror is known at once).
    pub fn add_log(&self, h: Arc<LogHandle>) {
        h.tel.set_mirror(self.mirrors().by_uuid.get(&h.uuid).map(|m| m.name.as_str()));
        let mut reg = lock(&self.registry);
        let named = reg.by_uuid.entry(h.uuid.clone()).or_insert_with(|| Named {
            name: Arc::clone(&h.tel.name),
            metrics: Arc::clone(&h.tel.metrics),
            instances: 0,
        });
        named.instances += 1;
        let mut logs: Vec<Arc<LogHandle>> = reg.logs.iter().cloned().collect();
        logs.push(h);
        logs.sort_by(|a, b| (&a.tel.name, a.tel.created_ns, a.luid).cmp(&(&b.tel.name, b.tel.created_ns, b.luid)));
        reg.logs = Arc::new(logs);
    }

    /// Unregisters a destroyed log.
    pub fn remove_log(&self, uuid: &str, luid: u64) {
        let mut reg = lock(&self.registry);
        let logs: Vec<Arc<LogHandle>> =
            reg.logs.iter().filter(|h| !(h.uuid == uuid && h.luid == luid)).cloned().collect();
        if logs.len() != reg.logs.len() {
            if let Some(n) = reg.by_uuid.get_mut(uuid) {
                n.instances -= 1;
                if n.instances == 0 {
                    reg.by_uuid.remove(uuid);
                }
            }
        }
        reg.logs = Arc::new(logs);
    }

    /// Samples every log's sync count (the resync rate). Called once a second, off the request
    /// path.
    pub fn sample(&self) {
        let now = clock::now_ns();
        for h in self.logs().iter() {
            h.tel.sample(now, h.sync_count());
        }
    }

    /// Refreshes the mirror mapping from device-mapper (blocking ioctls: call it off the async
    /// runtime and off the request path). Logs what changed.
    pub fn refresh_mirrors(&self) {
        let now = clock::now_ns();
        let old = self.mirrors();
        let view = match mirror::discover() {
            Ok(by_uuid) => MirrorView { by_uuid, refreshed_ns: now, error: None },
            Err(e) => MirrorView {
                by_uuid: HashMap::new(),
                refreshed_ns: now,
                error: Some(format!("{}: {e}", mirror::DM_CONTROL)),
            },
        };
        match (&old.error, &view.error) {
            (_, Some(e)) if old.error.as_ref() != Some(e) => {
                tracing::info!(error = %e, "mirror devices not discovered: no ulog_mirror_* metrics until device-mapper answers")
            }
            _ => {}
        }
        for (uuid, m) in &view.by_uuid {
            if old.by_uuid.get(uuid) != Some(m) {
                let log = self.logs().iter().find(|h| &h.uuid == uuid).map(|h| Arc::clone(&h.tel.name));
                tracing::info!(log = log.as_deref(), uuid = %uuid, mirror = %m.name, dev = %format!("{}:{}", m.major, m.minor), "found the mirror device of a log");
            }
        }
        self.set_mirrors(view);
    }
}

/// The telemetry's periodic work, off the request path: sync-count samples every second, the
/// mirror-device mapping every 5 s (both on the runtime's blocking pool). Runs until the runtime
/// stops.
pub async fn background(tel: Arc<Telemetry>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        let t = Arc::clone(&tel);
        let _ = tokio::task::spawn_blocking(move || {
            t.sample();
            if n % 5 == 1 {
                t.refresh_mirrors();
            }
        })
        .await;
    }
}

/// The log of `logs` that stands for `name` in per-log gauges: the resumed one, else the most
/// recently constructed.
pub fn primary<'a>(logs: impl IntoIterator<Item = &'a Arc<LogHandle>>) -> Option<&'a Arc<LogHandle>> {
    logs.into_iter().max_by_key(|h| {
        let resumed = h.shared.lock().phase() == crate::region_log::dirty_log::Phase::Resumed;
        (resumed, h.tel.created_ns, h.luid)
    })
}

/// Logs for the telemetry's tests: plain and cluster [`LogHandle`]s.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use super::{LogHandle, Telemetry};
    use crate::cluster::bus::Member;
    use crate::cluster::engine::ClusterView;
    use crate::cluster::state::{Event, ReplicatedLog};
    use crate::metrics::SharedLog;
    use crate::region_log::dirty_log::DirtyLog;

    /// A registered-to-be `clustered-core` log of 100 regions (none in sync locally).
    pub fn handle(tel: &Telemetry, uuid: &str, cluster: Option<Arc<ClusterView>>) -> Arc<LogHandle> {
        let ctr = "800 clustered-core 8";
        let args = crate::region_log::ctr::parse(ctr.as_bytes()).unwrap().args;
        Arc::new(LogHandle {
            uuid: uuid.into(),
            luid: 1,
            kind: "clustered-core",
            ctr: ctr.into(),
            region_size: 8,
            region_count: 100,
            device: None,
            dev: None,
            shared: Arc::new(SharedLog::new(DirtyLog::new(&args, false).unwrap())),
            tel: tel.log_telemetry(uuid, false),
            cluster,
        })
    }

    /// Node 1's view of a `nosync` cluster log of 100 regions that three nodes shared: node 1
    /// marked 1, 2, 3; node 2 marked 3, 4 and departed (held); node 3 marked 7, 8, died and was
    /// fenced (7, 8 reclaimed); node 1 then got 7 to recover. Node 1 is the only member, with 5
    /// requests held. So: sync count 96 (7, 8 reclaimed, 3, 4 held), 2 dirty (1, 2).
    pub fn three_node_view() -> Arc<ClusterView> {
        let mut log = ReplicatedLog::new(100, true).unwrap();
        let inc = |n: u32| u128::from(n) << 64 | 0xb007;
        for node in 1..=3 {
            log.apply(&Event::Join { node, incarnation: inc(node) }).unwrap();
        }
        log.apply(&Event::Mark { node: 1, regions: vec![1, 2, 3] }).unwrap();
        log.apply(&Event::Mark { node: 2, regions: vec![3, 4] }).unwrap();
        log.apply(&Event::Mark { node: 3, regions: vec![7, 8] }).unwrap();
        log.apply(&Event::Depart { node: 2 }).unwrap();
        log.apply(&Event::Depart { node: 3 }).unwrap();
        log.apply(&Event::FenceConfirmed { node: 3, incarnation: inc(3) }).unwrap();
        log.apply(&Event::GetResyncWork { node: 1 }).unwrap();
        Arc::new(ClusterView::holding(1, vec![Member { node: 1, pid: 10 }], log, 5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        let none = |_: &str| false;
        assert_eq!(short_name("LVM-ulogexample0001", none), "ulogexample0001");
        let lvm = "LVM-Xq3m1eN0bTz9kF5yHdC2wLp8RvGs4Ua7tYj6KiOe0MnBc1ZxVl3QwSd5Fg7Hh9Jk";
        assert_eq!(short_name(lvm, none), lvm[lvm.len() - 16..]);
        // A clash makes the tail longer, then the whole uuid.
        let taken16 = |n: &str| n.len() == 16;
        assert_eq!(short_name(lvm, taken16).len(), 32);
        assert_eq!(short_name(lvm, |n: &str| n.len() <= 32), lvm);
        assert_eq!(short_name("LVM-", none), "LVM-");
        assert_eq!(short_name("LVM-abc", |n: &str| n == "abc"), "LVM-abc");
        assert_eq!(short_name("abc", |n: &str| n == "abc"), "abc~2");
    }

    /// Log lines name a log's mirror from the last discovery: at registration if the cached view
    /// has it (a reconnect), on every refresh after, and not once it is gone.
    #[test]
    fn logs_carry_their_mirror_name_from_discovery() {
        let tel = Telemetry::new(Arc::default());
        let view = |names: &[(&str, &str)]| MirrorView {
            by_uuid: names
                .iter()
                .map(|(u, n)| (u.to_string(), MirrorDevice { name: n.to_string(), major: 253, minor: 3 }))
                .collect(),
            refreshed_ns: 1,
            error: None,
        };
        let handle = |uuid: &str| {
            let args = crate::region_log::ctr::parse(b"1000 clustered-core 8").unwrap().args;
            let log = DirtyLog::new(&args, false).unwrap();
            Arc::new(LogHandle {
                uuid: uuid.into(),
                luid: 1,
                kind: "clustered-core",
                ctr: "1000 clustered-core 8".into(),
                region_size: 8,
                region_count: 125,
                device: None,
                dev: None,
                shared: Arc::new(SharedLog::new(log)),
                tel: tel.log_telemetry(uuid, false),
                cluster: None,
            })
        };
        let a = handle("LVM-mirrora");
        tel.add_log(Arc::clone(&a));
        assert_eq!(a.tel.mirror(), None, "not discovered yet");
        tel.set_mirrors(view(&[("LVM-mirrora", "m_core")]));
        assert_eq!(a.tel.mirror().as_deref(), Some("m_core"));
        // A log constructed after the discovery (a reconnect) has it at once.
        let b = handle("LVM-mirrorb");
        tel.set_mirrors(view(&[("LVM-mirrora", "m_core"), ("LVM-mirrorb", "m_disk")]));
        tel.add_log(Arc::clone(&b));
        assert_eq!(b.tel.mirror().as_deref(), Some("m_disk"));
        // The mirror removed: no stale name.
        tel.set_mirrors(view(&[("LVM-mirrorb", "m_disk")]));
        assert_eq!(a.tel.mirror(), None);
        assert_eq!(b.tel.mirror().as_deref(), Some("m_disk"));
    }

    #[test]
    fn resync_rate_over_the_window() {
        let mut h = SyncHistory::default();
        assert_eq!(h.rate(), None);
        h.push(0, 100);
        h.push(1_000_000_000, 150);
        assert_eq!(h.rate(), None, "less than 2 s of samples");
        h.push(2_000_000_000, 200);
        assert_eq!(h.rate(), Some(50.0));
        h.push(3_000_000_000, 10);
        assert_eq!(h.rate(), None, "a drop restarts the window");
        for s in 0..40u64 {
            h.push(4_000_000_000 + s * 1_000_000_000, 10 + s * 7);
        }
        assert_eq!(h.rate(), Some(7.0));
        assert!(h.samples.len() <= 31);
    }
}
