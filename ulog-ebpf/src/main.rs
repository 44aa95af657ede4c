//! ulog's kernel-side programs (one object, bin `ulog`, loaded by `ulog-agent`'s
//! `telemetry::probes`).
//!
//! # Programs
//! - `dm_consult_userspace` (kprobe on the function of the same name in module
//!   `dm_log_userspace`): counts every request the kernel sends to the log server, by type, in
//!   the per-CPU array `REQUESTS_BY_TYPE` (slot = type for 1..=17, 0 for anything else; see
//!   `ulog_common::probes`). The function runs once per request attempt, so a request the kernel
//!   retries after a timeout counts twice: these are kernel-side attempts, which is what the
//!   agent's own per-type counters cannot see.
//!
//! # Limits
//! Attaching needs a kernel with kprobes (`CONFIG_KPROBES`) and the module loaded; a module
//! unloaded and reloaded drops the probe (the agent must reattach). The counters are `u64` per
//! CPU, incremented without atomics: a kprobe program does not nest on one CPU, and readers sum
//! the CPUs' values, which is exact once the increments are visible.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{kprobe, map},
    maps::PerCpuArray,
    programs::ProbeContext,
};
use ulog_common::probes::{request_counter_slot, REQUEST_COUNTER_SLOTS};

/// Requests by type; name and layout shared with the agent through `ulog_common::probes`.
#[map]
static REQUESTS_BY_TYPE: PerCpuArray<u64> = PerCpuArray::with_max_entries(REQUEST_COUNTER_SLOTS as u32, 0);

/// Index of `int request_type` among `dm_consult_userspace`'s arguments.
const ARG_REQUEST_TYPE: usize = 2;

/// kprobe on `dm_consult_userspace`: count the request by type. Always returns 0 (the return value
/// of a kprobe program is ignored by the kernel).
#[kprobe]
pub fn dm_consult_userspace(ctx: ProbeContext) -> u32 {
    // The argument is a C `int` in a 64-bit register; the type is its low 8 bits. An unreadable
    // argument (not possible on x86_64 for argument 2, but the API is fallible) counts as slot 0.
    let raw: u32 = ctx.arg::<u64>(ARG_REQUEST_TYPE).map_or(0, |r| r as u32);
    let slot = request_counter_slot(raw);
    if let Some(counter) = REQUESTS_BY_TYPE.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array; the element
        // belongs to this CPU and a kprobe program cannot be re-entered on it.
        unsafe { *counter += 1 };
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel refuses GPL-only helpers (and kprobes on many functions) to non-GPL programs.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
