//! The kernel-side probes: load the embedded eBPF object, attach it, read its maps.
//!
//! # Design
//! The object (`ulog-ebpf`, built by `build.rs` with the pinned nightly and bpf-linker) is
//! embedded in the binary with `aya::include_bytes_aligned!`, so the agent ships as one file.
//! [`ProbeSet::start`] checks the kernel first, so the common ways of not having probes come
//! back as specific, cheap errors instead of a failed syscall deep inside aya:
//!
//! 1. built without feature `ebpf` → [`ProbeError::Disabled`];
//! 2. built with `AYA_BUILD_SKIP=1` (empty object) → [`ProbeError::NotEmbedded`];
//! 3. no kprobe PMU (`/sys/bus/event_source/devices/kprobe/type`) → [`ProbeError::KprobesUnsupported`];
//! 4. `dm_log_userspace` neither in `/proc/modules` nor built in → [`ProbeError::ModuleNotLoaded`];
//! 5. then: raise `RLIMIT_MEMLOCK` (kernels before 5.11 charge BPF maps to it), load the object
//!    (creates the maps), load each program of [`PROGRAMS`] (verifier) and attach it; each
//!    failure keeps its aya error as the `source`, the verifier's log included.
//!
//! Telemetry is optional: the agent logs one line ([`ProbeError::report`]) and keeps serving.
//! Every step returns an error; nothing here panics. Attaching later (module loaded after the
//! agent started), and detaching at module unload, is [`super::manager`]'s job.
//!
//! # Maps (layouts in `ulog_common::probes`)
//! Per-CPU arrays of `u64`, summed over CPUs on read ([`ProbeSet::counts`]): requests by type
//! (`REQUESTS_BY_TYPE`, slot `t` for types 1..=17, slot 0 anything else), round-trip log2
//! histograms and sums by type, resends by type and reason, and single counters (reconnect
//! attempts, -ESRCH returns, lost events, ...). The ring buffer `EVENTS` carries one
//! [`RequestEvent`] per returned call to the [`EventReader`]. All count since the probes were
//! attached.
//!
//! # Limits
//! - Needs root (or CAP_BPF + CAP_PERFMON) and a kernel with kprobes; the development machines
//!   have neither kprobes nor device-mapper, so attaching is only exercised in the VM suite.
//! - Kernels older than 4.17 (legacy tracefs kprobes, no PMU file) are reported as unsupported.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use thiserror::Error;
pub use ulog_common::probes::{
    RequestEvent, CN_NETLINK_SEND, COUNTERS, COUNTER_SLOTS, DM_CONSULT_USERSPACE, DM_CONSULT_USERSPACE_RET,
    DM_LOG_USERSPACE_MODULE, EVENTS, HIST_SLOTS, LATENCY_HIST, LATENCY_SUM, REQUESTS_BY_TYPE, REQUEST_COUNTER_SLOTS,
    RETRIES,
};

/// Exists when the kernel has the kprobe PMU aya attaches kprobes through.
pub const KPROBE_PMU_TYPE: &str = "/sys/bus/event_source/devices/kprobe/type";
/// Loaded modules, one per line, name first.
pub const PROC_MODULES: &str = "/proc/modules";
/// Kernel symbols: finds `dm_consult_userspace` when dm-log-userspace is built in.
pub const PROC_KALLSYMS: &str = "/proc/kallsyms";

/// Why the probes are not running. Variants carry their cause (`source()`); log with
/// [`ProbeError::report`] to get the whole chain on one line.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The agent was built without the `ebpf` feature.
    #[error("eBPF telemetry disabled: ulog-agent was built without the `ebpf` feature")]
    Disabled,
    /// The agent was built with `AYA_BUILD_SKIP=1`: the embedded object is an empty placeholder.
    #[error("eBPF telemetry disabled: the eBPF object was not built (AYA_BUILD_SKIP)")]
    NotEmbedded,
    /// The kernel has no kprobe PMU.
    #[error("the kernel does not support kprobes ({path} is missing; CONFIG_KPROBES off?)")]
    KprobesUnsupported {
        /// The file whose absence says so.
        path: &'static str,
    },
    /// The module whose function the probe hooks is not loaded.
    #[error(
        "kernel module {module} is not loaded (it loads with the first dm `userspace` log; \
         or `modprobe {module}`)"
    )]
    ModuleNotLoaded {
        /// The module name.
        module: &'static str,
    },
    /// A procfs/sysfs file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Parsing the object or creating its maps failed.
    #[cfg(feature = "ebpf")]
    #[error("cannot load the eBPF object")]
    Load(#[source] aya::EbpfError),
    /// The object lacks an item this code expects (it was built from other sources).
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// The item's name.
        name: &'static str,
    },
    /// The program has another type, or the kernel refused it (the source's message includes the
    /// verifier log).
    #[cfg(feature = "ebpf")]
    #[error("cannot load eBPF program {program} into the kernel")]
    ProgramLoad {
        /// Program name.
        program: &'static str,
        /// aya's error (`LoadError` carries the verifier log).
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Attaching the loaded program failed.
    #[cfg(feature = "ebpf")]
    #[error("cannot attach eBPF program {program} to kernel function {function}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// The kernel function.
        function: &'static str,
        /// aya's error.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map has an unexpected type or cannot be read.
    #[cfg(feature = "ebpf")]
    #[error("eBPF map {map}")]
    Map {
        /// Map name.
        map: &'static str,
        /// aya's error.
        #[source]
        source: aya::maps::MapError,
    },
}

impl ProbeError {
    /// The error and its causes, joined with ": " (the verifier log, when there is one, keeps its
    /// own line breaks).
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

/// The label of a [`REQUESTS_BY_TYPE`] slot: the kernel's request type name (`"FLUSH"`), or
/// `"OTHER"` for slot 0 and anything out of range.
pub fn slot_label(slot: usize) -> &'static str {
    u32::try_from(slot)
        .ok()
        .filter(|&s| s != 0)
        .and_then(ulog_common::RequestType::from_raw)
        .map_or("OTHER", |t| t.name())
}

/// The eBPF object, built by build.rs (empty when built with `AYA_BUILD_SKIP=1`).
#[cfg(feature = "ebpf")]
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ulog"));

/// Every program of the object: (program name, kernel function, kind).
pub const PROGRAMS: [(&str, &str, ProgramKind); 3] = [
    (DM_CONSULT_USERSPACE, DM_CONSULT_USERSPACE, ProgramKind::Kprobe),
    (DM_CONSULT_USERSPACE_RET, DM_CONSULT_USERSPACE, ProgramKind::Kretprobe),
    (CN_NETLINK_SEND, CN_NETLINK_SEND, ProgramKind::Kprobe),
];

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// At the function's entry.
    Kprobe,
    /// At the function's return.
    Kretprobe,
}

/// Options of [`ProbeSet::start`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeOptions {
    /// Turn on the kernel's BPF run-time statistics (`BPF_ENABLE_STATS`) while attached, so
    /// [`ProbeSet::program_runs`] measures the programs' own cost. Costs two clock reads per
    /// program run.
    pub bpf_stats: bool,
    /// Turn on the programs' own aya-log diagnostics (loaded with `AYA_LOG_LEVEL` 0 otherwise)
    /// and forward them to the agent's log (target `ulog_ebpf`).
    pub log: bool,
}

/// The probes' raw map contents (summed over CPUs), since they were attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawCounts {
    /// `REQUESTS_BY_TYPE`.
    pub requests: Vec<u64>,
    /// `LATENCY_HIST` (`slot * HIST_SLOTS + k`).
    pub hist: Vec<u64>,
    /// `LATENCY_SUM`.
    pub sums: Vec<u64>,
    /// `RETRIES` (`slot * 2 + reason`).
    pub retries: Vec<u64>,
    /// `COUNTERS`.
    pub counters: Vec<u64>,
}

impl Default for RawCounts {
    fn default() -> Self {
        Self {
            requests: vec![0; REQUEST_COUNTER_SLOTS],
            hist: vec![0; REQUEST_COUNTER_SLOTS * HIST_SLOTS],
            sums: vec![0; REQUEST_COUNTER_SLOTS],
            retries: vec![0; REQUEST_COUNTER_SLOTS * 2],
            counters: vec![0; COUNTER_SLOTS as usize],
        }
    }
}

impl RawCounts {
    fn fields_mut(&mut self) -> [&mut Vec<u64>; 5] {
        [&mut self.requests, &mut self.hist, &mut self.sums, &mut self.retries, &mut self.counters]
    }

    /// Adds `other` element by element (wrapping).
    pub fn add(&mut self, other: &RawCounts) {
        let theirs = [&other.requests, &other.hist, &other.sums, &other.retries, &other.counters];
        for (mine, theirs) in self.fields_mut().into_iter().zip(theirs) {
            for (a, b) in mine.iter_mut().zip(theirs.iter()) {
                *a = a.wrapping_add(*b);
            }
        }
    }

    /// Element-wise maximum with `other` (counters never go backwards across a failed read).
    pub fn max_with(&mut self, other: &RawCounts) {
        let theirs = [&other.requests, &other.hist, &other.sums, &other.retries, &other.counters];
        for (mine, theirs) in self.fields_mut().into_iter().zip(theirs) {
            for (a, b) in mine.iter_mut().zip(theirs.iter()) {
                *a = (*a).max(*b);
            }
        }
    }

    /// A `COUNTERS` entry (0 if out of range).
    pub fn counter(&self, index: u32) -> u64 {
        self.counters.get(index as usize).copied().unwrap_or(0)
    }
}

/// The loaded and attached probes. Dropping it detaches them and frees the maps.
pub struct ProbeSet {
    #[cfg(feature = "ebpf")]
    maps: Maps,
    /// The event ring (and the log reader), until [`ProbeSet::take_events`] hands them over.
    #[cfg(feature = "ebpf")]
    events: Option<EventReader>,
    /// Keeps the kernel's BPF statistics on while attached.
    #[cfg(feature = "ebpf")]
    _stats: Option<std::os::fd::OwnedFd>,
    /// Holds the programs and their links (declared after the maps: dropped last).
    #[cfg(feature = "ebpf")]
    ebpf: aya::Ebpf,
    /// Last successful read, so a failed read never makes a counter go backwards.
    last: Mutex<RawCounts>,
}

#[cfg(feature = "ebpf")]
struct Maps {
    requests: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    hist: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    sums: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    retries: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    counters: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
}

impl std::fmt::Debug for ProbeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeSet").finish_non_exhaustive()
    }
}

/// Reads the events of a [`ProbeSet`] (on the probe thread).
#[cfg(feature = "ebpf")]
pub struct EventReader {
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    logger: Option<aya_log::EbpfLogger<TracingLog>>,
}

/// Forwards the eBPF programs' aya-log records to `tracing` (target `ulog_ebpf`).
#[cfg(feature = "ebpf")]
#[derive(Clone, Copy, Debug)]
pub struct TracingLog;

#[cfg(feature = "ebpf")]
impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "ulog_ebpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "ulog_ebpf", "{msg}"),
            log::Level::Info => tracing::info!(target: "ulog_ebpf", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "ulog_ebpf", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "ulog_ebpf", "{msg}"),
        }
    }
    fn flush(&self) {}
}

/// Reads the events of a [`ProbeSet`] (on the probe thread).
#[cfg(not(feature = "ebpf"))]
pub struct EventReader {
    _private: (),
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader").finish_non_exhaustive()
    }
}

impl EventReader {
    /// Waits up to `timeout_ms` for the ring to signal data (the programs signal only when it is
    /// a quarter full; call this in a loop with a short timeout), then hands every event to `f`.
    /// Returns the number of events read. Records of the wrong size (never written by our
    /// programs) are skipped.
    pub fn drain(&mut self, timeout_ms: i32, mut f: impl FnMut(&RequestEvent)) -> usize {
        #[cfg(feature = "ebpf")]
        {
            use std::os::fd::AsRawFd;
            let mut pfd = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd; the result only tells us to look at the ring.
            unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if let Some(logger) = self.logger.as_mut() {
                // aya-log unwraps while decoding a record; a record our programs did not write
                // must not take the agent down: drop the logger instead.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_err() {
                    tracing::warn!("undecodable eBPF log record: probe diagnostics turned off");
                    self.logger = None;
                }
            }
            let mut n = 0;
            while let Some(item) = self.ring.next() {
                if item.len() >= std::mem::size_of::<RequestEvent>() {
                    // SAFETY: RequestEvent is plain integers (valid for any bits); the read is
                    // unaligned-safe.
                    let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RequestEvent>()) };
                    f(&ev);
                    n += 1;
                }
            }
            n
        }
        #[cfg(not(feature = "ebpf"))]
        {
            let _ = (timeout_ms, &mut f);
            0
        }
    }
}

impl ProbeSet {
    /// Loads and attaches every probe, or says why it cannot (see the module docs for the order
    /// of the checks). Needs root.
    pub fn try_start() -> Result<ProbeSet, ProbeError> {
        Self::start(ProbeOptions::default())
    }

    /// [`ProbeSet::try_start`] with options.
    pub fn start(opts: ProbeOptions) -> Result<ProbeSet, ProbeError> {
        #[cfg(not(feature = "ebpf"))]
        {
            let _ = opts;
            Err(ProbeError::Disabled)
        }
        #[cfg(feature = "ebpf")]
        {
            Self::start_with(OBJECT, opts)
        }
    }

    #[cfg(feature = "ebpf")]
    fn start_with(object: &[u8], opts: ProbeOptions) -> Result<ProbeSet, ProbeError> {
        use aya::programs::KProbe;

        if object.is_empty() {
            return Err(ProbeError::NotEmbedded);
        }
        check_kernel()?;
        raise_memlock_rlimit();
        // The programs' log statements are live only at a level above 0 (aya-log-ebpf's global).
        let level: u8 = if opts.log { 5 } else { 0 };
        let mut ebpf = aya::EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, true)
            .load(object)
            .map_err(ProbeError::Load)?;
        let logger = if opts.log {
            match aya_log::EbpfLogger::init_with_logger(&mut ebpf, TracingLog) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the eBPF programs' log: probe diagnostics off");
                    None
                }
            }
        } else {
            None
        };
        for (program, function, _) in PROGRAMS {
            let kprobe: &mut KProbe = ebpf
                .program_mut(program)
                .ok_or(ProbeError::Missing { kind: "program", name: program })?
                .try_into()
                .map_err(|source| ProbeError::ProgramLoad { program, source })?;
            kprobe.load().map_err(|source| ProbeError::ProgramLoad { program, source })?;
            kprobe.attach(function, 0).map_err(|source| ProbeError::Attach { program, function, source })?;
        }
        let mut take = |name: &'static str| -> Result<aya::maps::PerCpuArray<aya::maps::MapData, u64>, ProbeError> {
            let map = ebpf.take_map(name).ok_or(ProbeError::Missing { kind: "map", name })?;
            aya::maps::PerCpuArray::try_from(map).map_err(|source| ProbeError::Map { map: name, source })
        };
        let maps = Maps {
            requests: take(REQUESTS_BY_TYPE)?,
            hist: take(LATENCY_HIST)?,
            sums: take(LATENCY_SUM)?,
            retries: take(RETRIES)?,
            counters: take(COUNTERS)?,
        };
        let ring = ebpf.take_map(EVENTS).ok_or(ProbeError::Missing { kind: "map", name: EVENTS })?;
        let ring = aya::maps::RingBuf::try_from(ring).map_err(|source| ProbeError::Map { map: EVENTS, source })?;
        let stats = if opts.bpf_stats {
            match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot enable the kernel's BPF statistics: no probe run-time metrics");
                    None
                }
            }
        } else {
            None
        };
        Ok(ProbeSet {
            maps,
            events: Some(EventReader { ring, logger }),
            _stats: stats,
            ebpf,
            last: Mutex::new(RawCounts::default()),
        })
    }

    /// The event ring's reader (once; `None` afterwards).
    pub fn take_events(&mut self) -> Option<EventReader> {
        #[cfg(feature = "ebpf")]
        {
            self.events.take()
        }
        #[cfg(not(feature = "ebpf"))]
        {
            None
        }
    }

    /// Requests by type since the probe was attached, summed over CPUs (index = slot, see
    /// [`slot_label`]). If reading the map fails, returns the last good values (and logs at debug
    /// level): counters never go backwards.
    pub fn request_counts(&self) -> [u64; REQUEST_COUNTER_SLOTS] {
        let mut out = [0u64; REQUEST_COUNTER_SLOTS];
        for (o, v) in out.iter_mut().zip(self.counts().requests) {
            *o = v;
        }
        out
    }

    /// Every map, summed over CPUs; on a failed read the last good values (never backwards).
    pub fn counts(&self) -> RawCounts {
        let mut last = match self.last.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match self.try_counts() {
            Ok(now) => last.max_with(&now),
            Err(e) => tracing::debug!("reading the probe maps: {}", e.report()),
        }
        last.clone()
    }

    /// Like [`ProbeSet::request_counts`], but reports a failed read.
    pub fn try_request_counts(&self) -> Result<[u64; REQUEST_COUNTER_SLOTS], ProbeError> {
        #[cfg_attr(not(feature = "ebpf"), allow(unused_mut))]
        let mut out = [0u64; REQUEST_COUNTER_SLOTS];
        #[cfg(feature = "ebpf")]
        read_into(&self.maps.requests, REQUESTS_BY_TYPE, &mut out)?;
        Ok(out)
    }

    /// Every map, summed over CPUs, or the first failed read.
    pub fn try_counts(&self) -> Result<RawCounts, ProbeError> {
        #[cfg_attr(not(feature = "ebpf"), allow(unused_mut))]
        let mut c = RawCounts::default();
        #[cfg(feature = "ebpf")]
        {
            read_into(&self.maps.requests, REQUESTS_BY_TYPE, &mut c.requests)?;
            read_into(&self.maps.hist, LATENCY_HIST, &mut c.hist)?;
            read_into(&self.maps.sums, LATENCY_SUM, &mut c.sums)?;
            read_into(&self.maps.retries, RETRIES, &mut c.retries)?;
            read_into(&self.maps.counters, COUNTERS, &mut c.counters)?;
        }
        Ok(c)
    }

    /// Each program's cumulative run time (ns) and run count, as the kernel's BPF statistics
    /// count them (zero unless they are enabled: [`ProbeOptions::bpf_stats`] or the sysctl
    /// `kernel.bpf_stats_enabled`). Programs whose info cannot be read are left out.
    pub fn program_runs(&self) -> Vec<(&'static str, u64, u64)> {
        #[cfg(feature = "ebpf")]
        {
            PROGRAMS
                .iter()
                .filter_map(|(name, _, _)| {
                    let info = self.ebpf.program(name)?.info().ok()?;
                    Some((*name, info.run_time().as_nanos() as u64, info.run_count()))
                })
                .collect()
        }
        #[cfg(not(feature = "ebpf"))]
        {
            Vec::new()
        }
    }
}

#[cfg(feature = "ebpf")]
fn read_into(
    map: &aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    name: &'static str,
    out: &mut [u64],
) -> Result<(), ProbeError> {
    for (index, total) in (0u32..).zip(out.iter_mut()) {
        let per_cpu = map.get(&index, 0).map_err(|source| ProbeError::Map { map: name, source })?;
        *total = per_cpu.iter().fold(0u64, |a, &v| a.wrapping_add(v));
    }
    Ok(())
}

/// Recognises a load of `dm_log_userspace` (the probe thread asks every 2 s).
///
/// A loaded module is identified by its load address in `/proc/modules` *and* the inode of its
/// `/sys/module/<name>` directory: a module unloaded and loaded again between two checks can
/// come back at the same address, but its sysfs directory is a new one (kernfs numbers every
/// node it creates anew), and the probes of the old load are dead. A module built into the
/// kernel (`dm_consult_userspace` in `/proc/kallsyms` without a `[module]` field) cannot come
/// or go, so `/proc/kallsyms` (megabytes) is read once, not at every check; the checks after it
/// read only `/proc/modules` (a few KiB) and stat one directory.
#[derive(Debug)]
pub struct ModuleWatch {
    proc_modules: PathBuf,
    sys_module: PathBuf,
    kallsyms: PathBuf,
    /// Whether the code is built into the kernel, once looked up.
    builtin: Option<bool>,
}

impl Default for ModuleWatch {
    fn default() -> Self {
        Self::at(
            Path::new(PROC_MODULES),
            &Path::new("/sys/module").join(DM_LOG_USERSPACE_MODULE),
            Path::new(PROC_KALLSYMS),
        )
    }
}

impl ModuleWatch {
    /// A watch reading these files (tests point it elsewhere).
    pub fn at(proc_modules: &Path, sys_module: &Path, kallsyms: &Path) -> Self {
        Self {
            proc_modules: proc_modules.into(),
            sys_module: sys_module.into(),
            kallsyms: kallsyms.into(),
            builtin: None,
        }
    }

    /// The identity of the module's current load: `None` while it is not loaded (nor built in).
    pub fn identity(&mut self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let modules = std::fs::read_to_string(&self.proc_modules).ok()?;
        if let Some(line) = modules.lines().find(|l| l.split_whitespace().next() == Some(DM_LOG_USERSPACE_MODULE)) {
            // name size refcount deps state address
            let address = line.split_whitespace().nth(5).unwrap_or("loaded");
            let ino = std::fs::metadata(&self.sys_module).map_or(0, |m| m.ino());
            return Some(format!("{address} (sysfs inode {ino})"));
        }
        let kallsyms = &self.kallsyms;
        let builtin = *self.builtin.get_or_insert_with(|| {
            std::fs::read_to_string(kallsyms).is_ok_and(|k| kallsyms_has_builtin(&k, DM_CONSULT_USERSPACE))
        });
        builtin.then(|| "builtin".to_string())
    }
}

/// Kernel prerequisites that would otherwise surface as an obscure attach error.
#[cfg_attr(not(feature = "ebpf"), allow(dead_code))]
fn check_kernel() -> Result<(), ProbeError> {
    if !std::path::Path::new(KPROBE_PMU_TYPE).exists() {
        return Err(ProbeError::KprobesUnsupported { path: KPROBE_PMU_TYPE });
    }
    let modules =
        std::fs::read_to_string(PROC_MODULES).map_err(|source| ProbeError::Io { path: PROC_MODULES, source })?;
    if module_listed(&modules, DM_LOG_USERSPACE_MODULE) {
        return Ok(());
    }
    // Built in (CONFIG_DM_LOG_USERSPACE=y): not a module, but its symbols are in kallsyms.
    let kallsyms =
        std::fs::read_to_string(PROC_KALLSYMS).map_err(|source| ProbeError::Io { path: PROC_KALLSYMS, source })?;
    if kallsyms_has(&kallsyms, DM_CONSULT_USERSPACE) {
        return Ok(());
    }
    Err(ProbeError::ModuleNotLoaded { module: DM_LOG_USERSPACE_MODULE })
}

/// Whether `/proc/modules` text lists `module` (first field of a line).
fn module_listed(proc_modules: &str, module: &str) -> bool {
    proc_modules.lines().any(|l| l.split_whitespace().next() == Some(module))
}

/// Whether `/proc/kallsyms` text has `symbol` as a symbol of the kernel itself (no fourth,
/// `[module]`, field).
fn kallsyms_has_builtin(kallsyms: &str, symbol: &str) -> bool {
    kallsyms.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(2) == Some(symbol) && f.next().is_none()
    })
}

/// Whether `/proc/kallsyms` text has a symbol named `symbol` (third field; a fourth, `[module]`,
/// follows for module symbols).
fn kallsyms_has(kallsyms: &str, symbol: &str) -> bool {
    kallsyms.lines().any(|l| l.split_whitespace().nth(2) == Some(symbol))
}

/// Lifts `RLIMIT_MEMLOCK`, as the aya examples do: kernels before 5.11 charge BPF maps against
/// it. Failure is not fatal (newer kernels do not need it; loading then reports the real error).
#[cfg(feature = "ebpf")]
fn raise_memlock_rlimit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads the struct we pass and has no other memory effects.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!("removing the RLIMIT_MEMLOCK limit failed: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_start_returns_an_error_or_a_working_set() {
        match ProbeSet::try_start() {
            Ok(set) => {
                // A machine with kprobes and dm-log-userspace loaded (the VM): counters readable.
                let counts = set.try_request_counts().expect("read counters");
                assert_eq!(counts.len(), REQUEST_COUNTER_SLOTS);
            }
            Err(e) => {
                let line = e.report();
                assert!(!line.is_empty());
                eprintln!("try_start on this host: {line}");
                if cfg!(not(feature = "ebpf")) {
                    assert!(matches!(e, ProbeError::Disabled), "{line}");
                } else if !OBJECT_EMPTY && !std::path::Path::new(KPROBE_PMU_TYPE).exists() {
                    // The development machines: no kprobe PMU.
                    assert!(matches!(e, ProbeError::KprobesUnsupported { .. }), "{line}");
                }
            }
        }
    }

    #[cfg(feature = "ebpf")]
    const OBJECT_EMPTY: bool = OBJECT.is_empty();
    #[cfg(not(feature = "ebpf"))]
    const OBJECT_EMPTY: bool = true;

    #[test]
    fn proc_parsing() {
        let modules = "dm_mirror 28672 0 - Live 0x0\ndm_log_userspace 24576 1 - Live 0x0\n";
        assert!(module_listed(modules, DM_LOG_USERSPACE_MODULE));
        assert!(!module_listed("dm_log_userspace_x 1 0 - Live 0x0\n", DM_LOG_USERSPACE_MODULE));
        assert!(!module_listed("", DM_LOG_USERSPACE_MODULE));
        let syms = "ffffffffc0a01000 t dm_consult_userspace\t[dm_log_userspace]\n";
        assert!(kallsyms_has(syms, DM_CONSULT_USERSPACE));
        assert!(kallsyms_has("0000000000000000 T dm_consult_userspace\n", DM_CONSULT_USERSPACE));
        assert!(!kallsyms_has("0 T dm_consult_userspace2\n", DM_CONSULT_USERSPACE));
        assert!(!kallsyms_has_builtin(syms, DM_CONSULT_USERSPACE), "a module's symbol");
        assert!(kallsyms_has_builtin("0000000000000000 T dm_consult_userspace\n", DM_CONSULT_USERSPACE));
    }

    /// A module reloaded at the same address is a new load (its probes must be attached again),
    /// and /proc/kallsyms is read once: built in or not cannot change while the kernel runs.
    #[test]
    fn module_watch_sees_every_load_and_reads_kallsyms_once() {
        let dir = std::env::temp_dir().join(format!("ulog-modwatch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (modules, sys, syms) = (dir.join("modules"), dir.join("sys_module"), dir.join("kallsyms"));
        let mut w = ModuleWatch::at(&modules, &sys, &syms);
        std::fs::write(&modules, "dm_mirror 28672 0 - Live 0xffffffffc0100000\n").unwrap();
        std::fs::write(&syms, "ffffffff81000000 T _text\n").unwrap();
        assert_eq!(w.identity(), None, "not loaded, not built in");
        std::fs::write(&syms, "ffffffff81000000 T dm_consult_userspace\n").unwrap();
        assert_eq!(w.identity(), None, "built in or not is looked up once");
        let loaded = "dm_log_userspace 24576 0 - Live 0xffffffffc0236000\n";
        std::fs::write(&modules, loaded).unwrap();
        std::fs::create_dir(&sys).unwrap();
        let first = w.identity().expect("loaded");
        assert_eq!(w.identity().as_deref(), Some(first.as_str()), "the same load");
        // rmmod + modprobe between two checks, at the same address: a new sysfs directory.
        let keep = dir.join("keep-inode-busy");
        std::fs::rename(&sys, &keep).unwrap();
        std::fs::create_dir(&sys).unwrap();
        let second = w.identity().expect("loaded again");
        assert_ne!(first, second, "a reload at the same address is a new load");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn labels() {
        assert_eq!(slot_label(0), "OTHER");
        assert_eq!(slot_label(1), "CTR");
        assert_eq!(slot_label(9), "FLUSH");
        assert_eq!(slot_label(17), "IS_REMOTE_RECOVERING");
        assert_eq!(slot_label(18), "OTHER");
        assert_eq!(slot_label(usize::MAX), "OTHER");
    }

    #[test]
    fn errors_chain_their_causes() {
        let e =
            ProbeError::Io { path: PROC_MODULES, source: std::io::Error::from(std::io::ErrorKind::PermissionDenied) };
        assert_eq!(e.report(), "cannot read /proc/modules: permission denied");
    }

    #[cfg(feature = "ebpf")]
    mod object {
        use super::super::*;

        fn object_or_skip() -> Option<&'static [u8]> {
            if OBJECT.is_empty() {
                eprintln!("skipped: built with AYA_BUILD_SKIP, no eBPF object");
                return None;
            }
            Some(OBJECT)
        }

        fn contains(hay: &[u8], needle: &[u8]) -> bool {
            hay.windows(needle.len()).any(|w| w == needle)
        }

        #[test]
        fn embedded_object_is_a_bpf_elf_with_our_names() {
            let Some(obj) = object_or_skip() else { return };
            assert_eq!(&obj[..4], b"\x7fELF", "ELF magic");
            assert_eq!(obj[4], 2, "ELFCLASS64");
            assert_eq!(obj[5], 1, "little endian (bpfel)");
            assert_eq!(u16::from_le_bytes([obj[18], obj[19]]), 247, "e_machine EM_BPF");
            for name in [
                DM_CONSULT_USERSPACE,
                DM_CONSULT_USERSPACE_RET,
                CN_NETLINK_SEND,
                REQUESTS_BY_TYPE,
                LATENCY_HIST,
                LATENCY_SUM,
                RETRIES,
                COUNTERS,
                EVENTS,
                ulog_common::probes::INFLIGHT,
                "license",
            ] {
                assert!(contains(obj, name.as_bytes()), "{name} not in the object");
            }
            assert!(contains(obj, b"GPL\0"));
        }

        /// Parses the object with aya (as `try_start` does) and, where the kernel lets us, loads
        /// the program through the verifier. Needs root for the map creation `Ebpf::load` does.
        #[test]
        fn object_parses_and_verifies() {
            use aya::{maps::Map, programs::Program};
            let Some(obj) = object_or_skip() else { return };
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("skipped: Ebpf::load creates maps and needs root");
                return;
            }
            raise_memlock_rlimit();
            // As start_with loads it: the aya-log level global must exist (must_exist = true).
            let mut ebpf = match aya::EbpfLoader::new().override_global(aya_log::LEVEL, &0u8, true).load(obj) {
                Ok(e) => e,
                Err(e) => panic!("{}", ProbeError::Load(e).report()),
            };
            for map in [REQUESTS_BY_TYPE, LATENCY_HIST, LATENCY_SUM, RETRIES, COUNTERS] {
                assert!(matches!(ebpf.map(map), Some(Map::PerCpuArray(_))), "{map}");
            }
            assert!(matches!(ebpf.map(EVENTS), Some(Map::RingBuf(_))));
            // Held until the end: the programs refer to the log ring by its fd when they load.
            let _logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, TracingLog).expect("AYA_LOGS ring");
            assert!(matches!(ebpf.map(ulog_common::probes::INFLIGHT), Some(Map::HashMap(_))));
            // The development kernel loads kprobe programs (only attaching fails there): each
            // goes through the verifier.
            for (program, _, kind) in PROGRAMS {
                let Some(Program::KProbe(kprobe)) = ebpf.program_mut(program) else {
                    panic!("no kprobe program {program}");
                };
                use aya::programs::ProbeKind;
                assert!(
                    matches!(
                        (kind, kprobe.kind()),
                        (ProgramKind::Kprobe, ProbeKind::Entry) | (ProgramKind::Kretprobe, ProbeKind::Return)
                    ),
                    "{program}"
                );
                if let Err(source) = kprobe.load() {
                    panic!("{}", ProbeError::ProgramLoad { program, source }.report());
                }
            }
        }
    }
}
