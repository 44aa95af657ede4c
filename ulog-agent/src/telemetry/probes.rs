//! The kernel-side probes: load the embedded eBPF object, attach it, read its counters.
//!
//! # Design
//! The object (`ulog-ebpf`, built by `build.rs` with the pinned nightly and bpf-linker) is
//! embedded in the binary with `aya::include_bytes_aligned!`, so the agent ships as one file.
//! [`ProbeSet::try_start`] checks the kernel first, so the common ways of not having probes come
//! back as specific, cheap errors instead of a failed syscall deep inside aya:
//!
//! 1. built without feature `ebpf` → [`ProbeError::Disabled`];
//! 2. built with `AYA_BUILD_SKIP=1` (empty object) → [`ProbeError::NotEmbedded`];
//! 3. no kprobe PMU (`/sys/bus/event_source/devices/kprobe/type`) → [`ProbeError::KprobesUnsupported`];
//! 4. `dm_log_userspace` neither in `/proc/modules` nor built in → [`ProbeError::ModuleNotLoaded`];
//! 5. then: raise `RLIMIT_MEMLOCK` (kernels before 5.11 charge BPF maps to it), load the object
//!    (creates the maps), load the program (verifier) and attach it; each failure keeps its aya
//!    error as the `source`, the verifier's log included.
//!
//! Telemetry is optional: the agent logs one line ([`ProbeError::report`]) and keeps serving.
//! Every step returns an error; nothing here panics.
//!
//! # Counters
//! `REQUESTS_BY_TYPE` is a per-CPU array of `u64` with [`REQUEST_COUNTER_SLOTS`] slots: slot `t`
//! counts requests of type `t` (1..=17, `ulog_common::RequestType`), slot 0 anything else.
//! [`ProbeSet::request_counts`] sums the CPUs. They count calls of `dm_consult_userspace` (one per
//! request attempt the kernel makes, whoever serves it), since the probe was attached.
//!
//! # Limits
//! - Needs root (or CAP_BPF + CAP_PERFMON) and a kernel with kprobes; the development machines
//!   have neither kprobes nor device-mapper, so attaching is only exercised in the VM suite.
//! - Kernels older than 4.17 (legacy tracefs kprobes, no PMU file) are reported as unsupported.
//! - The kprobe goes away when `dm_log_userspace` is unloaded; nothing reattaches it (the kernel
//!   keeps the module loaded while any userspace-logged device exists).

use std::sync::Mutex;

use thiserror::Error;
pub use ulog_common::probes::{DM_CONSULT_USERSPACE, DM_LOG_USERSPACE_MODULE, REQUESTS_BY_TYPE, REQUEST_COUNTER_SLOTS};

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

/// The loaded and attached probes. Dropping it detaches them and frees the maps.
pub struct ProbeSet {
    #[cfg(feature = "ebpf")]
    requests: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    /// Holds the programs and their links (declared after the map: dropped last).
    #[cfg(feature = "ebpf")]
    _ebpf: aya::Ebpf,
    /// Last successful read, so a failed read never makes a counter go backwards.
    last: Mutex<[u64; REQUEST_COUNTER_SLOTS]>,
}

impl std::fmt::Debug for ProbeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeSet").finish_non_exhaustive()
    }
}

impl ProbeSet {
    /// Loads and attaches every probe, or says why it cannot (see the module docs for the order
    /// of the checks). Needs root.
    pub fn try_start() -> Result<ProbeSet, ProbeError> {
        #[cfg(not(feature = "ebpf"))]
        {
            Err(ProbeError::Disabled)
        }
        #[cfg(feature = "ebpf")]
        {
            Self::start_with(OBJECT)
        }
    }

    #[cfg(feature = "ebpf")]
    fn start_with(object: &[u8]) -> Result<ProbeSet, ProbeError> {
        use aya::programs::KProbe;

        if object.is_empty() {
            return Err(ProbeError::NotEmbedded);
        }
        check_kernel()?;
        raise_memlock_rlimit();
        let mut ebpf = aya::Ebpf::load(object).map_err(ProbeError::Load)?;
        let program = DM_CONSULT_USERSPACE;
        let kprobe: &mut KProbe = ebpf
            .program_mut(program)
            .ok_or(ProbeError::Missing { kind: "program", name: program })?
            .try_into()
            .map_err(|source| ProbeError::ProgramLoad { program, source })?;
        kprobe.load().map_err(|source| ProbeError::ProgramLoad { program, source })?;
        kprobe.attach(DM_CONSULT_USERSPACE, 0).map_err(|source| ProbeError::Attach {
            program,
            function: DM_CONSULT_USERSPACE,
            source,
        })?;
        let map = ebpf.take_map(REQUESTS_BY_TYPE).ok_or(ProbeError::Missing { kind: "map", name: REQUESTS_BY_TYPE })?;
        let requests = aya::maps::PerCpuArray::try_from(map)
            .map_err(|source| ProbeError::Map { map: REQUESTS_BY_TYPE, source })?;
        Ok(ProbeSet { requests, _ebpf: ebpf, last: Mutex::new([0; REQUEST_COUNTER_SLOTS]) })
    }

    /// Requests by type since the probe was attached, summed over CPUs (index = slot, see
    /// [`slot_label`]). If reading the map fails, returns the last good values (and logs at debug
    /// level): counters never go backwards.
    pub fn request_counts(&self) -> [u64; REQUEST_COUNTER_SLOTS] {
        let mut last = match self.last.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match self.try_request_counts() {
            Ok(now) => {
                for (l, n) in last.iter_mut().zip(now) {
                    *l = (*l).max(n);
                }
            }
            Err(e) => tracing::debug!("reading {REQUESTS_BY_TYPE}: {}", e.report()),
        }
        *last
    }

    /// Like [`ProbeSet::request_counts`], but reports a failed read.
    pub fn try_request_counts(&self) -> Result<[u64; REQUEST_COUNTER_SLOTS], ProbeError> {
        #[cfg(feature = "ebpf")]
        {
            let mut out = [0u64; REQUEST_COUNTER_SLOTS];
            for (slot, total) in (0u32..).zip(out.iter_mut()) {
                let per_cpu =
                    self.requests.get(&slot, 0).map_err(|source| ProbeError::Map { map: REQUESTS_BY_TYPE, source })?;
                *total = per_cpu.iter().fold(0u64, |a, &v| a.wrapping_add(v));
            }
            Ok(out)
        }
        #[cfg(not(feature = "ebpf"))]
        {
            Ok([0; REQUEST_COUNTER_SLOTS])
        }
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
            for name in [DM_CONSULT_USERSPACE, REQUESTS_BY_TYPE, "license"] {
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
            let mut ebpf = match aya::Ebpf::load(obj) {
                Ok(e) => e,
                Err(e) => panic!("{}", ProbeError::Load(e).report()),
            };
            assert!(matches!(ebpf.map(REQUESTS_BY_TYPE), Some(Map::PerCpuArray(_))));
            let Some(Program::KProbe(kprobe)) = ebpf.program_mut(DM_CONSULT_USERSPACE) else {
                panic!("no kprobe program {DM_CONSULT_USERSPACE}");
            };
            // The development kernel loads kprobe programs (only attaching fails there).
            if let Err(source) = kprobe.load() {
                panic!("{}", ProbeError::ProgramLoad { program: DM_CONSULT_USERSPACE, source }.report());
            }
        }
    }
}
