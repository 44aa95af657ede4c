//! The probe thread (`ulog-probes`): keeps the probes attached while `dm_log_userspace` is
//! loaded, and drains their event ring into the correlation.
//!
//! # Life cycle
//! - At start, `main` calls [`adopt`] with the result of its first [`ProbeSet::start`] (made
//!   before the connector socket opens, so every request the agent serves is counted).
//! - Every [`ManagerConfig::module_poll`] the thread reads the module's identity
//!   ([`ModuleWatch`]: its load address in `/proc/modules` and the inode of its sysfs directory,
//!   which is new at every load, even at the same address). A new attachment clears the seq
//!   table (the kernel's seq restarts at 0 with the module). Attached and the module
//!   gone or reloaded (another address): detach (the kprobes of an unloaded module are dead) and
//!   keep what was counted ([`KernelTelemetry::detach`]). Not attached and the module present:
//!   attach. A failure other than "module not loaded" is logged once per module identity (no
//!   retry loop against a verifier that refused the programs); kernels without kprobes and
//!   builds without the programs end the thread after one log line.
//! - Between checks it waits on the ring buffer (50 ms at most) and hands each event to
//!   [`KernelTelemetry::process`].
//!
//! The request path never waits for this thread: it only writes the seq table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::probes::{EventReader, ModuleWatch, ProbeError, ProbeOptions, ProbeSet};
use super::KernelTelemetry;
use crate::metrics::kernel::KernelSource;
use crate::metrics::Telemetry;

/// Settings of the probe thread.
#[derive(Clone, Copy, Debug)]
pub struct ManagerConfig {
    /// Options for each attachment.
    pub opts: ProbeOptions,
    /// How often to look for the module.
    pub module_poll: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self { opts: ProbeOptions::default(), module_poll: Duration::from_secs(2) }
    }
}

/// The status line of attached probes.
pub const ATTACHED: &str = "attached: dm_consult_userspace (entry and return), cn_netlink_send";

/// What the thread needs to carry on after [`adopt`].
#[derive(Debug)]
pub struct Adopted {
    reader: Option<EventReader>,
    watch: ModuleWatch,
    identity: Option<String>,
    /// The error is permanent: no thread needed.
    permanent: bool,
    /// The identity of the module when an attach last failed (not retried for it).
    failed_for: Option<Option<String>>,
}

fn permanent(e: &ProbeError) -> bool {
    matches!(e, ProbeError::Disabled | ProbeError::NotEmbedded | ProbeError::KprobesUnsupported { .. })
}

/// Takes the first start's result: registers an attached set (and the kernel source), or logs
/// why there is none, once.
pub fn adopt(kt: &Arc<KernelTelemetry>, tel: &Telemetry, first: Result<ProbeSet, ProbeError>) -> Adopted {
    let mut watch = ModuleWatch::default();
    let identity = watch.identity();
    let offset = crate::metrics::clock::monotonic_offset_ns();
    if offset != 0 {
        warn!(
            offset_ns = offset,
            "the agent runs in a time namespace: its CLOCK_MONOTONIC differs from the kernel's (the eBPF probes' clock); kernel times are converted by that offset"
        );
    }
    match first {
        Ok(mut set) => {
            let reader = set.take_events();
            kt.attach(set);
            tel.set_kernel_source(Arc::clone(kt) as Arc<dyn KernelSource>);
            tel.set_probe_state(true, ATTACHED.into());
            info!(module = ?identity, "eBPF probe attached: dm_consult_userspace (entry and return), cn_netlink_send");
            Adopted { reader, watch, identity, permanent: false, failed_for: None }
        }
        Err(e) => {
            let report = e.report();
            if matches!(e, ProbeError::ModuleNotLoaded { .. }) {
                info!(reason = %report, "eBPF probes not attached yet; they attach when the module loads");
                tel.set_probe_state(false, format!("waiting: {report}"));
                Adopted { reader: None, watch, identity: None, permanent: false, failed_for: None }
            } else {
                warn!(reason = %report, "eBPF probes not attached; serving without kernel-side telemetry");
                tel.set_probe_state(false, report);
                Adopted { reader: None, watch, identity: None, permanent: permanent(&e), failed_for: Some(identity) }
            }
        }
    }
}

/// Starts the probe thread (unless the first attempt failed for good). It runs until `stop`.
pub fn spawn(
    kt: Arc<KernelTelemetry>,
    tel: Arc<Telemetry>,
    cfg: ManagerConfig,
    adopted: Adopted,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    if adopted.permanent {
        return Ok(None);
    }
    std::thread::Builder::new().name("ulog-probes".into()).spawn(move || run(&kt, &tel, cfg, adopted, &stop)).map(Some)
}

fn drain(reader: &mut EventReader, kt: &KernelTelemetry, tel: &Telemetry, timeout_ms: i32) {
    reader.drain(timeout_ms, |ev| {
        let _ = kt.process(ev, tel.seqs());
    });
}

fn run(kt: &Arc<KernelTelemetry>, tel: &Telemetry, cfg: ManagerConfig, mut a: Adopted, stop: &AtomicBool) {
    let mut last_check = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match a.reader.as_mut() {
            Some(r) => drain(r, kt, tel, 50),
            None => std::thread::sleep(Duration::from_millis(100).min(cfg.module_poll)),
        }
        if last_check.elapsed() < cfg.module_poll {
            continue;
        }
        last_check = Instant::now();
        let now = a.watch.identity();
        if kt.attached() && now != a.identity {
            if let Some(r) = a.reader.as_mut() {
                drain(r, kt, tel, 0);
            }
            a.reader = None;
            kt.detach();
            let why = match &now {
                None => "module dm_log_userspace was unloaded".to_string(),
                Some(_) => "module dm_log_userspace was reloaded".to_string(),
            };
            info!(reason = %why, "eBPF probes detached");
            tel.set_probe_state(false, format!("detached: {why}"));
            a.identity = None;
        }
        if kt.attached() {
            continue;
        }
        if now.is_none() {
            // Retry a failed attach once the module comes back.
            a.failed_for = None;
            continue;
        }
        if a.failed_for.as_ref() == Some(&now) {
            continue;
        }
        match ProbeSet::start(cfg.opts) {
            Ok(mut set) => {
                // The kernel's seq counter restarts at 0 with a new load of the module: entries
                // of the old load's requests must not match the new load's events.
                tel.seqs().clear();
                a.reader = set.take_events();
                kt.attach(set);
                a.identity = now;
                a.failed_for = None;
                tel.set_kernel_source(Arc::clone(kt) as Arc<dyn KernelSource>);
                tel.set_probe_state(true, ATTACHED.into());
                info!(module = ?a.identity, attachments = kt.attachments(), "eBPF probe attached: dm_consult_userspace (entry and return), cn_netlink_send");
            }
            Err(e) => {
                let report = e.report();
                warn!(reason = %report, "eBPF probes not attached; serving without kernel-side telemetry");
                tel.set_probe_state(false, report);
                if permanent(&e) {
                    return;
                }
                a.failed_for = Some(now);
            }
        }
    }
}
