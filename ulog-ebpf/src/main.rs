//! ulog's kernel-side programs (one object, bin `ulog`, loaded by `ulog-agent`'s
//! `telemetry::probes`). Names and layouts are shared with the agent through
//! `ulog_common::probes`.
//!
//! # Programs
//! - `dm_consult_userspace` (kprobe, module `dm_log_userspace`): counts every call by request
//!   type in `REQUESTS_BY_TYPE` (slot = type for 1..=17, 0 for anything else) and records the
//!   call in `INFLIGHT`, keyed by the task's `pid_tgid`: entry time, type (argument 2 masked with
//!   0xFF), luid (argument 1). A CTR with `rdata == NULL` (argument 5) is the kernel's -ESRCH
//!   reconnect loop (`userspace_do_request`; the constructor's own CTR passes a reply buffer):
//!   counted in `COUNTERS[C_RECONNECT_ATTEMPTS]`.
//! - `cn_netlink_send` (kprobe): for messages with connector id {7, 1} only, reads seq and type
//!   of the `dm_ulog_request` after the 20-byte `cn_msg`, and stamps the task's in-flight call
//!   with that attempt (seq, time). A second attempt within one call is a resend: after a
//!   timeout (>= 10 s since the previous send: the kernel waits 15 s) or after -EAGAIN (at once),
//!   counted in `RETRIES` by type and reason when it is sent.
//! - `dm_consult_userspace_ret` (kretprobe): entry-to-return time into the per-type log2
//!   histogram `LATENCY_HIST` (+ `LATENCY_SUM`), except for -ESRCH returns, which are counted
//!   apart in `COUNTERS` (most never reached a server), and one
//!   `RequestEvent` into the `EVENTS` ring buffer for the agent to correlate by seq with its own
//!   receive and reply times. A full ring buffer loses the event, counted
//!   (`COUNTERS[C_EVENTS_LOST]`); the histograms and counters never depend on the ring.
//!
//! # Diagnostics
//! Rare conditions (a resend, a reconnect CTR, an insert failure, a lost event, a return
//! without an entry, -ESRCH) are logged with aya-log. The agent loads the object with
//! `AYA_LOG_LEVEL` 0 unless it runs with `--probe-log`, so by default every log statement is a
//! load and a branch.
//!
//! # Limits
//! Attaching needs a kernel with kprobes and the module loaded; a module unloaded and reloaded
//! drops the probes (the agent reattaches). Per-CPU counters are incremented without atomics: a
//! kprobe program does not nest on one CPU, and readers sum the CPUs' values.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{kprobe, kretprobe, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use aya_log_ebpf::{debug, info, warn};
use ulog_common::{
    offsets,
    probes::{
        log2_slot, request_counter_slot, RequestEvent, COUNTER_SLOTS, C_ESRCH_RETURNS, C_EVENTS_LOST, C_INFLIGHT_FULL,
        C_RECONNECT_ATTEMPTS, C_SENDS, C_SENDS_UNMATCHED, C_UNMATCHED_RETURNS, ESRCH, EVENTS_BYTES, EV_RECONNECT,
        EV_SEQ, HIST_SLOTS, INFLIGHT_ENTRIES, REQUEST_COUNTER_SLOTS, RETRY_EAGAIN, RETRY_TIMEOUT,
        TIMEOUT_RESEND_MIN_NS,
    },
    RequestType, CN_IDX_DM, CN_MSG_LEN, CN_VAL_DM_USERSPACE_LOG, DM_ULOG_REQUEST_MASK, ULOG_REQUEST_LEN,
};

/// Requests by type.
#[map]
static REQUESTS_BY_TYPE: PerCpuArray<u64> = PerCpuArray::with_max_entries(REQUEST_COUNTER_SLOTS as u32, 0);

/// Calls in progress, by pid_tgid.
#[map]
static INFLIGHT: HashMap<u64, RequestEvent> = HashMap::with_max_entries(INFLIGHT_ENTRIES, 0);

/// Round-trip histograms: `slot * HIST_SLOTS + log2 slot`.
#[map]
static LATENCY_HIST: PerCpuArray<u64> = PerCpuArray::with_max_entries((REQUEST_COUNTER_SLOTS * HIST_SLOTS) as u32, 0);

/// Round-trip sums (ns) by slot.
#[map]
static LATENCY_SUM: PerCpuArray<u64> = PerCpuArray::with_max_entries(REQUEST_COUNTER_SLOTS as u32, 0);

/// Resends: `slot * 2 + reason`.
#[map]
static RETRIES: PerCpuArray<u64> = PerCpuArray::with_max_entries((REQUEST_COUNTER_SLOTS * 2) as u32, 0);

/// Single counters (`C_*`).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// One event per returned call.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Argument indexes of `dm_consult_userspace(uuid, luid, request_type, data, data_size, rdata,
/// rdata_size)`.
const ARG_LUID: usize = 1;
const ARG_REQUEST_TYPE: usize = 2;
const ARG_RDATA: usize = 5;

#[inline(always)]
fn add(map: &PerCpuArray<u64>, index: u32, n: u64) {
    if let Some(counter) = map.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array; the element
        // belongs to this CPU and a kprobe program cannot be re-entered on it.
        unsafe { *counter += n };
    }
}

/// kprobe on `dm_consult_userspace`: count, and remember the call for the return probe.
#[kprobe]
pub fn dm_consult_userspace(ctx: ProbeContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    // The argument is a C `int` in a 64-bit register; the type is its low 8 bits. An unreadable
    // argument (not possible on x86_64, but the API is fallible) counts as slot 0.
    let raw: u32 = ctx.arg::<u64>(ARG_REQUEST_TYPE).map_or(0, |r| r as u32) & DM_ULOG_REQUEST_MASK;
    add(&REQUESTS_BY_TYPE, request_counter_slot(raw), 1);
    let rdata: u64 = ctx.arg::<u64>(ARG_RDATA).unwrap_or(1);
    let mut flags = 0;
    if raw == RequestType::Ctr.raw() && rdata == 0 {
        flags |= EV_RECONNECT;
        add(&COUNTERS, C_RECONNECT_ATTEMPTS, 1);
        info!(&ctx, "reconnect loop: CTR without a reply buffer");
    }
    let ev = RequestEvent {
        luid: ctx.arg::<u64>(ARG_LUID).unwrap_or(0),
        entry_ns: now,
        request_type: raw,
        flags,
        ..RequestEvent::default()
    };
    let key = bpf_get_current_pid_tgid();
    if INFLIGHT.insert(&key, &ev, BPF_ANY as u64).is_err() {
        add(&COUNTERS, C_INFLIGHT_FULL, 1);
        warn!(&ctx, "in-flight table insert failed: type {} not timed", raw);
    }
    0
}

/// kprobe on `cn_netlink_send(struct cn_msg *msg, ...)`: a dm-log-userspace request attempt.
#[kprobe]
pub fn cn_netlink_send(ctx: ProbeContext) -> u32 {
    let Some(msg) = ctx.arg::<*const u8>(0) else { return 0 };
    // cn_msg: id.idx @0, id.val @4, seq @8, ack @12, len @16 (u16).
    // SAFETY: bpf_probe_read_kernel checks the address; a bad pointer is an error, not a fault.
    let Ok(id) = (unsafe { bpf_probe_read_kernel(msg as *const [u32; 2]) }) else { return 0 };
    if id[0] != CN_IDX_DM || id[1] != CN_VAL_DM_USERSPACE_LOG {
        return 0;
    }
    let Ok(len) = (unsafe { bpf_probe_read_kernel(msg.wrapping_add(16) as *const u16) }) else { return 0 };
    if (len as usize) < ULOG_REQUEST_LEN {
        return 0;
    }
    let req = msg.wrapping_add(CN_MSG_LEN);
    // seq @148 and request_type @152 of dm_ulog_request, read together.
    let Ok(st) = (unsafe { bpf_probe_read_kernel(req.wrapping_add(offsets::SEQ) as *const [u32; 2]) }) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    add(&COUNTERS, C_SENDS, 1);
    let key = bpf_get_current_pid_tgid();
    let Some(call) = INFLIGHT.get_ptr_mut(&key) else {
        add(&COUNTERS, C_SENDS_UNMATCHED, 1);
        debug!(&ctx, "send of seq {} outside a timed call", st[0]);
        return 0;
    };
    // SAFETY: a value of this task's entry; only this task (this call) writes it, and the
    // kretprobe removes it only after the call returned.
    let call = unsafe { &mut *call };
    if call.attempts == 0 {
        call.first_seq = st[0];
    } else {
        // A resend within the same call: classify by the time since the previous send.
        let slot = request_counter_slot(st[1] & DM_ULOG_REQUEST_MASK);
        let gap = now.saturating_sub(call.send_ns);
        if gap >= TIMEOUT_RESEND_MIN_NS {
            call.timeouts = call.timeouts.saturating_add(1);
            add(&RETRIES, slot * 2 + RETRY_TIMEOUT as u32, 1);
        } else {
            call.eagains = call.eagains.saturating_add(1);
            add(&RETRIES, slot * 2 + RETRY_EAGAIN as u32, 1);
        }
        info!(&ctx, "resend: seq {} after seq {}, {} ns later", st[0], call.last_seq, gap);
    }
    call.attempts += 1;
    call.last_seq = st[0];
    call.send_ns = now;
    call.flags |= EV_SEQ;
    0
}

/// kretprobe on `dm_consult_userspace`: latency, -ESRCH, and the event.
#[kretprobe]
pub fn dm_consult_userspace_ret(ctx: RetProbeContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let key = bpf_get_current_pid_tgid();
    let Some(call) = INFLIGHT.get_ptr(&key) else {
        add(&COUNTERS, C_UNMATCHED_RETURNS, 1);
        debug!(&ctx, "return without a recorded entry");
        return 0;
    };
    // SAFETY: this task's own entry (see cn_netlink_send); copied before it is removed.
    let mut ev = unsafe { *call };
    let _ = INFLIGHT.remove(&key);
    let ret: i64 = ctx.ret::<i64>();
    ev.ret = ret as i32;
    ev.exit_ns = now;
    if ev.ret == -ESRCH {
        // Counted apart, not timed: nobody listened, every listener's queue was full (the
        // request went nowhere: a few µs that would drag the round-trip quantiles down, every
        // 2 s while the reconnect loop runs), or the server answered -ESRCH (a log it does not
        // know); this return cannot tell which, the agent's correlation can.
        add(&COUNTERS, C_ESRCH_RETURNS, 1);
        debug!(&ctx, "type {} returned -ESRCH", ev.request_type);
    } else {
        let slot = request_counter_slot(ev.request_type);
        let ns = now.saturating_sub(ev.entry_ns);
        add(&LATENCY_HIST, slot * HIST_SLOTS as u32 + log2_slot(ns), 1);
        add(&LATENCY_SUM, slot, ns);
    }
    match EVENTS.reserve::<RequestEvent>(0) {
        Some(mut entry) => {
            entry.write(ev);
            // Wake the reader only when a quarter of the ring is used (it drains every 50 ms
            // anyway): no wake-up per event.
            let used = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
            let wake = if used >= (EVENTS_BYTES / 4) as u64 { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
            entry.submit(wake as u64);
        }
        None => {
            add(&COUNTERS, C_EVENTS_LOST, 1);
            warn!(&ctx, "event ring full: event of seq {} lost", ev.last_seq);
        }
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
