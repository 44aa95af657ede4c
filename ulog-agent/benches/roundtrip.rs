//! Round trips to the release agent binary over a real NETLINK_CONNECTOR socket, in a private
//! network namespace (needs root), against a constant-answer responder measured with the same
//! client code in the same invocation.
//!
//! * Client: a [`KernelPeer`] (the harness that plays the kernel). Latency is send -> matching
//!   reply as the peer classifies it; with N in flight the client keeps N requests outstanding
//!   and sends a new one for every reply.
//! * Agent: `ulog-agent -f --accept-peer-port <peer>` (the bench-profile binary cargo builds for
//!   this target), in namespace A.
//! * Baseline: a thread of this process with its own connector socket, set up like the agent's
//!   (bound without groups, joined to group 7, 8 MiB receive buffer, blocking receive with a
//!   timeout), that answers every request from constants: `recvfrom`, copy the header, set
//!   error 0 and a constant payload of the size the type needs, `sendto`. It lives in namespace
//!   B, so it and the agent never share a connector bus (both would answer), and the idle agent
//!   sees none of its traffic.
//! * Logs (2^21 regions, `nosync`, so every region starts clean and every MARK of a fresh region
//!   really dirties it; a fresh log per round): `core` = `clustered-core`; `disk-file` =
//!   `clustered-disk` on a regular file on the filesystem of the target directory (checked not
//!   to be tmpfs), where MARKs are answered after a `pwritev2(RWF_DSYNC)`; `disk-loop` = the same
//!   on a loop device over such a file (`losetup`, detached at the end; skipped with a note if
//!   `losetup` fails).
//! * Workloads: IN_SYNC of pseudo-random regions; MARK_REGION (1 fresh region) + FLUSH pairs,
//!   with the regions scattered over the log (`MARK+FLUSH`) or consecutive (`MARK+FLUSH seq`:
//!   32768 regions share one 4 KiB block of the disk image, so a group commit writes one block).
//!   Each with 1 and with 32 requests in flight.
//! * Device baseline (disk targets): right before each MARK measurement, 4 KiB durable writes at
//!   scattered blocks through the agent's own `LogDevice::write_durable` on a probe device of the
//!   same kind (a second file in the same directory / a second loop device): what a MARK on a
//!   disk log must wait for.
//! * Rounds: every round measures every (workload, depth) on the baseline and on every log type,
//!   in an order rotated per round; results are medians over rounds.
//!
//! Output: human-readable lines, and JSON lines (`ULOG-BENCH {...}` on stdout and
//! `<target>/ulog-bench/roundtrip.jsonl`; `$ULOG_BENCH_OUT_DIR` overrides the directory).
//!
//! Run: `cargo bench -p ulog-agent --bench roundtrip [-- --quick] [-- --rounds N --secs S
//! --no-loop --targets core,disk-file --workloads in-sync,mark-flush,mark-flush-seq --depths 1,32]`. Under `cargo test --benches` it only says it was skipped.

#[path = "common/mod.rs"]
mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{median, quantile, Results, J};
use ulog_agent::region_log::disk_format;
use ulog_agent::region_log::store::{AlignedBuf, LogDevice};
use ulog_agent::wire::kernel_peer::{enter_private_netns, AgentProcess, KernelPeer, Request};
use ulog_common::{RequestType, CN_IDX_DM, NETLINK_CONNECTOR, NLMSG_HDRLEN, ULOG_OFFSET, ULOG_REQUEST_LEN};

const REGIONS: u64 = 1 << 21;
const DEV_SECTORS: u64 = 2_147_483_648;
const REGION_SIZE: u64 = 1024;
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes of the log files (the image of 2^21 regions is ~257 KiB).
const LOG_FILE_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    InSync,
    /// MARK of one fresh region scattered over the log, then FLUSH.
    MarkFlush,
    /// The same with consecutive regions (32768 share one 4 KiB block of the disk image).
    MarkFlushSeq,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::InSync => "IN_SYNC",
            Workload::MarkFlush => "MARK+FLUSH",
            Workload::MarkFlushSeq => "MARK+FLUSH seq",
        }
    }
}

/// Where requests go.
#[derive(Clone, Debug)]
enum Target {
    Baseline,
    Core,
    DiskFile(PathBuf),
    DiskLoop(PathBuf),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Baseline => "baseline",
            Target::Core => "core",
            Target::DiskFile(_) => "disk-file",
            Target::DiskLoop(_) => "disk-loop",
        }
    }

    fn ctr(&self) -> Option<String> {
        match self {
            Target::Baseline => None,
            Target::Core => Some(format!("{DEV_SECTORS} clustered-core {REGION_SIZE} nosync")),
            Target::DiskFile(p) | Target::DiskLoop(p) => {
                Some(format!("{DEV_SECTORS} clustered-disk {} {REGION_SIZE} nosync", p.display()))
            }
        }
    }
}

struct Config {
    rounds: usize,
    secs: f64,
    depths: Vec<usize>,
    workloads: Vec<Workload>,
    targets: Vec<String>,
    use_loop: bool,
    /// Pin the client thread to CPU 0 and the server (agent process / responder thread) to CPU 1.
    pin: bool,
}

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn config() -> Config {
    let args: Vec<String> = std::env::args().collect();
    let quick = common::quick();
    let rounds =
        arg_value(&args, "--rounds").map(|v| v.parse().expect("--rounds N")).unwrap_or(if quick { 2 } else { 5 });
    let secs =
        arg_value(&args, "--secs").map(|v| v.parse().expect("--secs S")).unwrap_or(if quick { 0.3 } else { 1.5 });
    let targets = arg_value(&args, "--targets")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| vec!["core".into(), "disk-file".into(), "disk-loop".into()]);
    let depths = arg_value(&args, "--depths")
        .map(|v| v.split(',').map(|d| d.parse().expect("--depths 1,32")).collect())
        .unwrap_or_else(|| vec![1, 32]);
    let workloads = arg_value(&args, "--workloads")
        .map(|v| {
            v.split(',')
                .map(|w| match w {
                    "in-sync" | "IN_SYNC" => Workload::InSync,
                    "mark-flush" | "MARK+FLUSH" => Workload::MarkFlush,
                    "mark-flush-seq" => Workload::MarkFlushSeq,
                    other => panic!("unknown workload {other:?} (in-sync, mark-flush, mark-flush-seq)"),
                })
                .collect()
        })
        .unwrap_or_else(|| vec![Workload::InSync, Workload::MarkFlush, Workload::MarkFlushSeq]);
    Config {
        rounds,
        secs,
        depths,
        workloads,
        targets,
        use_loop: !args.iter().any(|a| a == "--no-loop"),
        pin: args.iter().any(|a| a == "--pin"),
    }
}

/// Pins thread `tid` (0 = the calling thread) to `cpu`.
fn pin(tid: libc::pid_t, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: valid set of the size passed.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(r, 0, "sched_setaffinity({tid}, cpu {cpu}): {}", std::io::Error::last_os_error());
}

/// Pins every thread of process `pid` (threads it creates later inherit it).
fn pin_process(pid: u32, cpu: usize) {
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the agent's threads").flatten() {
        if let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) {
            pin(tid, cpu);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The constant-answer baseline responder.

fn cvt(r: libc::c_int, what: &str) -> libc::c_int {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, v: &T) -> libc::c_int {
    // SAFETY: v points to a T of the size passed.
    unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (v as *const T).cast(), std::mem::size_of::<T>() as u32) }
}

/// A connector socket set up as the agent sets up its own (server/transport.rs): bound without groups,
/// joined to group 7, 8 MiB receive buffer, 250 ms receive timeout. Returns it and its port.
fn responder_socket() -> (OwnedFd, u32) {
    // SAFETY: plain socket(2).
    let fd = cvt(
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_CONNECTOR) },
        "socket",
    );
    // SAFETY: fresh fd, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero sockaddr_nl is valid.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    let sl = std::mem::size_of::<libc::sockaddr_nl>() as u32;
    // SAFETY: valid address of the given length.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_nl).cast(), sl) }, "bind");
    cvt(setsockopt(&fd, 270, 1, &(CN_IDX_DM as libc::c_int)), "NETLINK_ADD_MEMBERSHIP");
    let size: libc::c_int = 8 << 20;
    if setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size) != 0 {
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &size);
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: 250_000 };
    cvt(setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv), "SO_RCVTIMEO");
    let mut len = sl;
    // SAFETY: out-params of the right size.
    cvt(
        unsafe { libc::getsockname(fd.as_raw_fd(), (&mut sa as *mut libc::sockaddr_nl).cast(), &mut len) },
        "getsockname",
    );
    (fd, sa.nl_pid)
}

/// Reply payload size by request type (what the kernel accepts), answered with constants.
fn constant_payload(request_type: u32) -> &'static [u8] {
    const ONE: [u8; 8] = 1u64.to_ne_bytes();
    const PAIR: [u8; 16] = [0; 16];
    match RequestType::from_raw(request_type) {
        Some(RequestType::InSync | RequestType::IsClean) => &ONE,
        Some(RequestType::GetRegionSize) => &[0, 4, 0, 0, 0, 0, 0, 0],
        Some(RequestType::GetSyncCount) => &[0, 0, 0x20, 0, 0, 0, 0, 0],
        Some(RequestType::GetResyncWork | RequestType::IsRemoteRecovering) => &PAIR,
        _ => &[],
    }
}

/// The responder thread: answers every request datagram until `stop`.
fn responder(fd: OwnedFd, port: u32, stop: Arc<AtomicBool>, tid: Arc<AtomicU64>, cpu: Option<usize>) -> u64 {
    if let Some(cpu) = cpu {
        pin(0, cpu);
    }
    // SAFETY: plain syscall.
    tid.store(unsafe { libc::gettid() } as u64, Ordering::Release);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = [0u8; ULOG_OFFSET + ULOG_REQUEST_LEN + 16];
    let mut answered = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: all-zero sockaddr_nl is valid.
        let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut flen = std::mem::size_of::<libc::sockaddr_nl>() as u32;
        // SAFETY: valid buffers of the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut flen,
            )
        };
        if n < (ULOG_OFFSET + ULOG_REQUEST_LEN) as isize {
            continue; // timeout, EINTR, or not a request
        }
        let rt = u32::from_ne_bytes(buf[ULOG_OFFSET + 152..ULOG_OFFSET + 156].try_into().unwrap());
        let payload = constant_payload(rt);
        let cn_len = ULOG_REQUEST_LEN + payload.len();
        let len = ULOG_OFFSET + cn_len;
        out[..ULOG_OFFSET + ULOG_REQUEST_LEN].copy_from_slice(&buf[..ULOG_OFFSET + ULOG_REQUEST_LEN]);
        out[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        out[12..16].copy_from_slice(&port.to_ne_bytes());
        out[NLMSG_HDRLEN + 16..NLMSG_HDRLEN + 18].copy_from_slice(&(cn_len as u16).to_ne_bytes());
        out[ULOG_OFFSET + 144..ULOG_OFFSET + 148].copy_from_slice(&0i32.to_ne_bytes());
        out[ULOG_OFFSET + 156..ULOG_OFFSET + 160].copy_from_slice(&(payload.len() as u32).to_ne_bytes());
        out[ULOG_OFFSET + ULOG_REQUEST_LEN..len].copy_from_slice(payload);
        // SAFETY: all-zero sockaddr_nl is valid.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        to.nl_pid = from.nl_pid;
        // SAFETY: valid buffer and address.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                out.as_ptr().cast(),
                len,
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r >= 0 {
            answered += 1;
        }
    }
    answered
}

// ---------------------------------------------------------------------------------------------
// The client.

/// One measurement: per-request latencies (ns), MARK->FLUSH pair latencies at depth 1 (ns),
/// completed requests, and the time they took.
struct Sample {
    lat: Vec<u64>,
    /// MARK+FLUSH workloads: the MARKs' and the FLUSHes' latencies.
    mark_lat: Vec<u64>,
    flush_lat: Vec<u64>,
    pair_lat: Vec<u64>,
    requests: u64,
    elapsed: Duration,
    /// CPU time the server (agent process, all threads / responder thread) used meanwhile.
    server_cpu_ns: u64,
    /// CPU time this client thread used meanwhile.
    client_cpu_ns: u64,
}

/// Nanoseconds a thread has run (`/proc/.../schedstat`, first field); 0 if unreadable.
fn schedstat_ns(path: &Path) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// CPU time of every thread of process `pid`.
fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    dir.flatten().map(|e| schedstat_ns(&e.path().join("schedstat"))).sum()
}

/// CPU time of the calling thread.
fn this_thread_cpu_ns() -> u64 {
    schedstat_ns(Path::new("/proc/thread-self/schedstat"))
}

/// Generates the requests of a workload for one log.
struct Gen {
    wl: Workload,
    uuid: String,
    i: u64,
    /// MARK+FLUSH: the next request is a MARK.
    mark_next: bool,
    /// Next fresh region index (a permutation of the log's regions).
    fresh: u64,
    in_sync: Request,
    mark: Request,
    flush: Request,
}

impl Gen {
    fn new(wl: Workload, uuid: &str, luid: u64) -> Self {
        Self {
            wl,
            uuid: uuid.to_string(),
            i: 0,
            mark_next: true,
            fresh: 0,
            in_sync: Request::new(RequestType::InSync, uuid, luid, 0u64.to_ne_bytes()),
            mark: Request::new(RequestType::MarkRegion, uuid, luid, 0u64.to_ne_bytes()),
            flush: Request::new(RequestType::Flush, uuid, luid, vec![]),
        }
    }

    /// The next request (and whether it is a MARK).
    fn next(&mut self) -> (&Request, bool) {
        self.i += 1;
        match self.wl {
            Workload::InSync => {
                let r = self.i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 43; // 21 bits
                self.in_sync.payload.copy_from_slice(&r.to_ne_bytes());
                (&self.in_sync, false)
            }
            Workload::MarkFlush | Workload::MarkFlushSeq => {
                self.mark_next = !self.mark_next;
                if !self.mark_next {
                    // Odd multiplier: a permutation of 0..2^21, so every MARK dirties a clean
                    // region (until 2^21 marks; a round never gets near that).
                    let r = if self.wl == Workload::MarkFlushSeq {
                        (self.fresh + 1_000_000) % REGIONS
                    } else {
                        self.fresh.wrapping_mul(0x5851_f42d) % REGIONS
                    };
                    self.fresh += 1;
                    self.mark.payload.copy_from_slice(&r.to_ne_bytes());
                    (&self.mark, true)
                } else {
                    (&self.flush, false)
                }
            }
        }
    }
}

fn check(reply: &ulog_agent::wire::kernel_peer::Reply, what: &str) {
    assert_eq!(reply.error, 0, "{what}: {reply}");
}

/// Runs `gen` against whoever answers `peer` for `dur` (after a warm-up of `warm`), with
/// `depth` requests in flight.
fn measure(
    peer: &mut KernelPeer,
    gen: &mut Gen,
    depth: usize,
    dur: Duration,
    warm: Duration,
    server_cpu: &dyn Fn() -> u64,
) -> Sample {
    let what = format!("{} {} depth {depth}", gen.uuid, gen.wl.name());
    let mark_flush = gen.wl != Workload::InSync;
    let mut s = Sample {
        lat: Vec::new(),
        mark_lat: Vec::new(),
        flush_lat: Vec::new(),
        pair_lat: Vec::new(),
        requests: 0,
        elapsed: Duration::ZERO,
        server_cpu_ns: 0,
        client_cpu_ns: 0,
    };
    for warming in [true, false] {
        let limit = if warming { warm } else { dur };
        let mut lat = Vec::with_capacity(1 << 16);
        let (mut mark_lat, mut flush_lat) = (Vec::new(), Vec::new());
        let mut pair_lat = Vec::new();
        let (cpu0, ccpu0) = (server_cpu(), this_thread_cpu_ns());
        let start = Instant::now();
        let mut done = 0u64;
        if depth == 1 {
            while start.elapsed() < limit {
                let (req, is_mark) = gen.next();
                let t0 = Instant::now();
                let seq = peer.send(req).expect("send");
                let r = peer.recv_reply(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("{what}: {e}"));
                let t1 = Instant::now();
                assert_eq!(r.seq, seq, "{what}: reply to another seq");
                check(&r, &what);
                lat.push((t1 - t0).as_nanos() as u64);
                if is_mark {
                    mark_lat.push((t1 - t0).as_nanos() as u64);
                }
                done += 1;
                if is_mark {
                    // The FLUSH that completes the pair.
                    let (req, _) = gen.next();
                    let seq = peer.send(req).expect("send");
                    let r = peer.recv_reply(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("{what}: {e}"));
                    let t2 = Instant::now();
                    assert_eq!(r.seq, seq, "{what}: reply to another seq");
                    check(&r, &what);
                    lat.push((t2 - t1).as_nanos() as u64);
                    flush_lat.push((t2 - t1).as_nanos() as u64);
                    pair_lat.push((t2 - t0).as_nanos() as u64);
                    done += 1;
                }
            }
        } else {
            const RING: usize = 4096;
            let mut sent_at: Vec<Option<(Instant, bool)>> = vec![None; RING];
            let mut outstanding = 0usize;
            let mut sending = true;
            loop {
                while sending && outstanding < depth {
                    let (req, is_mark) = gen.next();
                    let t = Instant::now();
                    let seq = peer.send(req).expect("send");
                    sent_at[seq as usize % RING] = Some((t, is_mark));
                    outstanding += 1;
                }
                if outstanding == 0 {
                    break;
                }
                let r = peer.recv_reply(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("{what}: {e}"));
                let t1 = Instant::now();
                check(&r, &what);
                let (t0, is_mark) = sent_at[r.seq as usize % RING]
                    .take()
                    .unwrap_or_else(|| panic!("{what}: reply to unknown seq {}", r.seq));
                let ns = (t1 - t0).as_nanos() as u64;
                lat.push(ns);
                if is_mark {
                    mark_lat.push(ns);
                } else if mark_flush {
                    flush_lat.push(ns);
                }
                outstanding -= 1;
                done += 1;
                if start.elapsed() >= limit {
                    sending = false;
                }
            }
        }
        if !warming {
            let elapsed = start.elapsed();
            let (cpu1, ccpu1) = (server_cpu(), this_thread_cpu_ns());
            s = Sample {
                lat,
                mark_lat,
                flush_lat,
                pair_lat,
                requests: done,
                elapsed,
                server_cpu_ns: cpu1.saturating_sub(cpu0),
                client_cpu_ns: ccpu1.saturating_sub(ccpu0),
            };
        }
    }
    assert!(peer.take_unmatched().is_empty(), "{what}: unmatched replies");
    s
}

// ---------------------------------------------------------------------------------------------
// Log devices.

/// A loop device we attached, detached on drop.
struct LoopDev(PathBuf);

impl LoopDev {
    fn attach(file: &Path) -> Result<Self, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!("losetup --find --show: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dev.is_empty() {
            return Err("losetup printed no device".into());
        }
        Ok(Self(PathBuf::from(dev)))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A preallocated (written, not sparse) log file of `LOG_FILE_BYTES` zero bytes.
fn log_file(path: &Path) {
    std::fs::write(path, vec![0u8; LOG_FILE_BYTES as usize]).expect("create the log file");
    std::fs::File::open(path).and_then(|f| f.sync_all()).expect("sync the log file");
}

/// Raw durable 4 KiB writes through the agent's own `LogDevice::write_durable` (the
/// `pwritev2(RWF_DSYNC)` a MARK waits for) to a probe device of the same kind as a disk log's
/// (a second file in the same directory / a second loop device), at scattered block offsets
/// inside the image, for `dur`. Latencies in ns.
fn device_probe(dev: &LogDevice, buf: &AlignedBuf, dur: Duration) -> Vec<u64> {
    let blocks = dev.image_len() / 4096;
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < dur {
        let block = (i.wrapping_mul(0x9e37_79b9) % blocks as u64) as usize;
        i += 1;
        let t0 = Instant::now();
        dev.write_durable(buf, block * 4096, 4096).expect("probe write");
        lat.push(t0.elapsed().as_nanos() as u64);
    }
    lat
}

// ---------------------------------------------------------------------------------------------

fn ok_call(peer: &mut KernelPeer, req: Request, what: &str) {
    let r = peer.call_request(&req).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.error, 0, "{what}: {r}");
}

/// A fresh log for `target` in the agent: CTR + RESUME. Returns (uuid, luid).
fn create_log(peer: &mut KernelPeer, target: &Target, round: usize, wl: usize) -> (String, u64) {
    let uuid = format!("LVM-ulog-bench-roundtrip-{}-{round:03}-{wl}", target.name());
    let luid = 0xffff_8880_0000_0000 + ((round as u64) << 16) + ((wl as u64) << 12) + target.name().len() as u64;
    let ctr = target.ctr().expect("agent target");
    ok_call(peer, Request::ctr(&uuid, luid, &ctr), "CTR");
    ok_call(peer, Request::new(RequestType::Resume, &uuid, luid, vec![]), "RESUME");
    (uuid, luid)
}

fn destroy_log(peer: &mut KernelPeer, uuid: &str, luid: u64) {
    ok_call(peer, Request::new(RequestType::Presuspend, uuid, luid, vec![]), "PRESUSPEND");
    ok_call(peer, Request::new(RequestType::Postsuspend, uuid, luid, vec![]), "POSTSUSPEND");
    ok_call(peer, Request::new(RequestType::Dtr, uuid, luid, vec![]), "DTR");
}

/// The median over rounds of the per-round ratio `a[i] / b[i]` (the agent against the baseline
/// measured in the same round, seconds apart): robust to a noisy stretch that slows a whole round.
fn paired(a: &[f64], b: &[f64]) -> f64 {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&r)
}

/// Per (target, workload, depth): one value per round, in round order.
#[derive(Default)]
struct Agg {
    p50: Vec<f64>,
    p99: Vec<f64>,
    rps: Vec<f64>,
    pair_p50: Vec<f64>,
    pair_p99: Vec<f64>,
    mark_p50: Vec<f64>,
    mark_p99: Vec<f64>,
    flush_p50: Vec<f64>,
    flush_p99: Vec<f64>,
    /// Disk targets, MARK workloads: the probe device's write p50 measured right before.
    device_p50: Vec<f64>,
    scpu: Vec<f64>,
    ccpu: Vec<f64>,
    requests: u64,
}

fn main() {
    if !common::start_as_root("roundtrip") {
        return;
    }
    let cfg = config();
    let mut results = Results::new("roundtrip");
    let dur = Duration::from_secs_f64(cfg.secs);
    let warm = Duration::from_secs_f64((cfg.secs / 5.0).max(0.05));
    // The agent: quiet, so its own logging costs nothing measurable.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("RUST_LOG", "warn") };

    // Log files on the target directory's filesystem (not tmpfs).
    let dir = common::target_dir().join("ulog-bench").join("files");
    std::fs::create_dir_all(&dir).expect("create the bench file directory");
    let fs = common::fs_type(&dir);
    let mut notes: Vec<String> = Vec::new();
    let mut targets: Vec<Target> = vec![Target::Baseline];
    let mut loop_devs: Vec<LoopDev> = Vec::new();
    // Per disk target: a probe device of the same kind, for the raw durable-write baseline.
    let mut probes: Vec<(&'static str, LogDevice)> = Vec::new();
    for t in &cfg.targets {
        match t.as_str() {
            "core" => targets.push(Target::Core),
            "disk-file" | "disk-loop" if fs == "tmpfs" => {
                notes.push(format!("{t}: skipped, {} is on tmpfs", dir.display()));
            }
            "disk-file" => {
                let p = dir.join("roundtrip-disk-file.img");
                log_file(&p);
                targets.push(Target::DiskFile(p));
                let probe = dir.join("roundtrip-probe-file.img");
                log_file(&probe);
                probes.push(("disk-file", LogDevice::open(&probe, REGIONS).expect("open the probe file")));
            }
            "disk-loop" if !cfg.use_loop => notes.push("disk-loop: skipped (--no-loop)".into()),
            "disk-loop" => {
                let p = dir.join("roundtrip-disk-loop.img");
                log_file(&p);
                let probe = dir.join("roundtrip-probe-loop.img");
                log_file(&probe);
                match LoopDev::attach(&p).and_then(|l| Ok((l, LoopDev::attach(&probe)?))) {
                    Ok((l, pl)) => {
                        targets.push(Target::DiskLoop(l.0.clone()));
                        probes
                            .push(("disk-loop", LogDevice::open(&pl.0, REGIONS).expect("open the probe loop device")));
                        loop_devs.push(l);
                        loop_devs.push(pl);
                    }
                    Err(e) => notes.push(format!("disk-loop: skipped, {e}")),
                }
            }
            other => panic!("unknown target {other:?} (core, disk-file, disk-loop)"),
        }
    }
    for n in &notes {
        eprintln!("note: {n}");
    }

    // Namespace A: the agent and its peer.
    enter_private_netns().expect("private netns for the agent");
    let mut agent_peer = KernelPeer::open().expect("kernel peer (agent)");
    agent_peer.set_call_timeout(REPLY_TIMEOUT);
    let exe = env!("CARGO_BIN_EXE_ulog-agent");
    let agent = AgentProcess::spawn_ready(exe, &mut agent_peer, Vec::<String>::new()).expect("start the agent");
    if cfg.pin {
        pin_process(agent.pid(), 1);
        pin(0, 0);
    }

    // Namespace B: the baseline responder and its peer.
    enter_private_netns().expect("private netns for the baseline");
    let mut base_peer = KernelPeer::open().expect("kernel peer (baseline)");
    let stop = Arc::new(AtomicBool::new(false));
    let (fd, port) = responder_socket();
    let tid = Arc::new(AtomicU64::new(0));
    let resp: JoinHandle<u64> = {
        let (stop, tid) = (Arc::clone(&stop), Arc::clone(&tid));
        let cpu = cfg.pin.then_some(1);
        std::thread::Builder::new()
            .name("baseline".into())
            .spawn(move || responder(fd, port, stop, tid, cpu))
            .expect("responder thread")
    };
    while tid.load(Ordering::Acquire) == 0 {
        std::thread::yield_now();
    }
    let resp_stat = PathBuf::from(format!("/proc/self/task/{}/schedstat", tid.load(Ordering::Acquire)));
    let base_cpu = move || schedstat_ns(&resp_stat);
    let agent_pid = agent.pid();
    let agent_cpu = move || process_cpu_ns(agent_pid);
    assert_eq!(base_peer.group_listeners().expect("listeners"), 1, "exactly the responder listens in namespace B");
    assert_eq!(agent_peer.group_listeners().expect("listeners"), 1, "exactly the agent listens in namespace A");

    let loop_desc =
        targets.iter().find_map(|t| if let Target::DiskLoop(p) = t { Some(p.display().to_string()) } else { None });
    results.push(&[
        ("bench", "roundtrip".into()),
        ("kind", "meta".into()),
        ("rounds", cfg.rounds.into()),
        ("secs_per_measurement", cfg.secs.into()),
        ("regions", REGIONS.into()),
        ("file_dir", dir.display().to_string().into()),
        ("file_fs", fs.clone().into()),
        ("loop_device", loop_desc.unwrap_or_else(|| "none".into()).into()),
        ("agent", exe.into()),
        ("notes", notes.join("; ").into()),
        ("pinned", cfg.pin.into()),
    ]);

    let workloads = cfg.workloads.clone();
    let mut agg: std::collections::BTreeMap<(String, &'static str, usize), Agg> = Default::default();
    let probe_buf = AlignedBuf::zeroed(disk_format::image_len(REGIONS, 4096)).expect("probe buffer");
    let mut device_p50: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
    let mut device_p99: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
    let mut device_rate: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
    for round in 0..cfg.rounds {
        for (wi, &wl) in workloads.iter().enumerate() {
            // A fresh log per agent target, round and workload; one request generator per log,
            // kept across depths, so MARKs never repeat a region.
            let logs: Vec<Option<(String, u64)>> = targets
                .iter()
                .map(|t| match t {
                    Target::Baseline => None,
                    t => Some(create_log(&mut agent_peer, t, round, wi)),
                })
                .collect();
            let mut gens: Vec<Gen> = logs
                .iter()
                .map(|l| match l {
                    None => Gen::new(wl, "LVM-ulog-bench-baseline", 1),
                    Some((uuid, luid)) => Gen::new(wl, uuid, *luid),
                })
                .collect();
            for &depth in &cfg.depths {
                // Rotate the order so no target always runs first (or right after the disk).
                let n = targets.len();
                for k in 0..n {
                    let ti = (k + round) % n;
                    let t = &targets[ti];
                    let (peer, cpu): (_, &dyn Fn() -> u64) = match &logs[ti] {
                        None => (&mut base_peer, &base_cpu),
                        Some(_) => (&mut agent_peer, &agent_cpu),
                    };
                    // Disk targets, MARK workloads: the raw durable write of a probe device of the
                    // same kind, measured right before, for a paired ratio.
                    let probe = probes.iter().find(|(n, _)| *n == t.name()).filter(|_| wl != Workload::InSync);
                    let device = probe.map(|(name, dev)| {
                        let mut lat = device_probe(dev, &probe_buf, (dur / 4).max(Duration::from_millis(200)));
                        lat.sort_unstable();
                        let total: u64 = lat.iter().sum();
                        let (p50, p99) = (quantile(&lat, 0.5) as f64 / 1e3, quantile(&lat, 0.99) as f64 / 1e3);
                        let rate = lat.len() as f64 / (total as f64 / 1e9);
                        println!(
                            "round {round} {name:<9} device: 4 KiB durable write p50 {p50:>8.1} us  p99 {p99:>8.1} us  {rate:>7.0} writes/s"
                        );
                        results.push(&[
                            ("bench", J::from("roundtrip")),
                            ("kind", "device_round".into()),
                            ("round", round.into()),
                            ("target", (*name).into()),
                            ("workload", wl.name().into()),
                            ("depth", depth.into()),
                            ("writes", lat.len().into()),
                            ("p50_us", p50.into()),
                            ("p99_us", p99.into()),
                            ("writes_per_s", rate.into()),
                        ]);
                        device_p50.entry(name).or_default().push(p50);
                        device_p99.entry(name).or_default().push(p99);
                        device_rate.entry(name).or_default().push(rate);
                        p50
                    });
                    let s = measure(peer, &mut gens[ti], depth, dur, warm, cpu);
                    let mut lat = s.lat;
                    lat.sort_unstable();
                    let mut pl = s.pair_lat;
                    pl.sort_unstable();
                    let (mut ml, mut fl) = (s.mark_lat, s.flush_lat);
                    ml.sort_unstable();
                    fl.sort_unstable();
                    let rps = s.requests as f64 / s.elapsed.as_secs_f64();
                    let (p50, p99) = (quantile(&lat, 0.5) as f64 / 1e3, quantile(&lat, 0.99) as f64 / 1e3);
                    let scpu = s.server_cpu_ns as f64 / 1e3 / s.requests.max(1) as f64;
                    let ccpu = s.client_cpu_ns as f64 / 1e3 / s.requests.max(1) as f64;
                    println!(
                        "round {round} {:<9} {:<10} depth {depth:>2}: p50 {p50:>8.1} us  p99 {p99:>8.1} us  {rps:>9.0} req/s  server {scpu:>5.2} / client {ccpu:>5.2} CPU us/req ({} requests)",
                        t.name(),
                        wl.name(),
                        s.requests
                    );
                    if !ml.is_empty() {
                        println!(
                            "        MARK p50 {:>8.1} us  p99 {:>8.1} us; FLUSH p50 {:>8.1} us  p99 {:>8.1} us",
                            quantile(&ml, 0.5) as f64 / 1e3,
                            quantile(&ml, 0.99) as f64 / 1e3,
                            quantile(&fl, 0.5) as f64 / 1e3,
                            quantile(&fl, 0.99) as f64 / 1e3
                        );
                    }
                    let mut rec = vec![
                        ("bench", J::from("roundtrip")),
                        ("kind", "round".into()),
                        ("round", round.into()),
                        ("target", t.name().into()),
                        ("workload", wl.name().into()),
                        ("depth", depth.into()),
                        ("requests", s.requests.into()),
                        ("secs", s.elapsed.as_secs_f64().into()),
                        ("p50_us", p50.into()),
                        ("p99_us", p99.into()),
                        ("rps", rps.into()),
                        ("server_cpu_us_per_req", scpu.into()),
                        ("client_cpu_us_per_req", ccpu.into()),
                    ];
                    let a = agg.entry((t.name().to_string(), wl.name(), depth)).or_default();
                    if !ml.is_empty() {
                        let q = |v: &[u64], p: f64| quantile(v, p) as f64 / 1e3;
                        let (m50, m99, f50, f99) = (q(&ml, 0.5), q(&ml, 0.99), q(&fl, 0.5), q(&fl, 0.99));
                        rec.push(("mark_p50_us", m50.into()));
                        rec.push(("mark_p99_us", m99.into()));
                        rec.push(("flush_p50_us", f50.into()));
                        rec.push(("flush_p99_us", f99.into()));
                        a.mark_p50.push(m50);
                        a.mark_p99.push(m99);
                        a.flush_p50.push(f50);
                        a.flush_p99.push(f99);
                    }
                    if !pl.is_empty() {
                        let (pp50, pp99) = (quantile(&pl, 0.5) as f64 / 1e3, quantile(&pl, 0.99) as f64 / 1e3);
                        rec.push(("pair_p50_us", pp50.into()));
                        rec.push(("pair_p99_us", pp99.into()));
                        a.pair_p50.push(pp50);
                        a.pair_p99.push(pp99);
                    }
                    results.push(&rec);
                    a.p50.push(p50);
                    a.p99.push(p99);
                    a.rps.push(rps);
                    if let Some(d) = device {
                        a.device_p50.push(d);
                    }
                    a.scpu.push(scpu);
                    a.ccpu.push(ccpu);
                    a.requests += s.requests;
                }
            }
            for (uuid, luid) in logs.iter().flatten() {
                destroy_log(&mut agent_peer, uuid, *luid);
            }
        }
    }

    // Summaries: medians over rounds, ratios against the baseline of the same (workload, depth).
    println!();
    println!(
        "{:<9} {:<10} {:>5} {:>9} {:>9} {:>10} {:>8} {:>8} {:>10} {:>7} {:>10}",
        "target",
        "workload",
        "depth",
        "p50 us",
        "p99 us",
        "req/s",
        "p50 x",
        "req/s x",
        "srv us/req",
        "srv x",
        "cli us/req"
    );
    for &wl in &workloads {
        for &depth in &cfg.depths {
            let base = &agg[&("baseline".to_string(), wl.name(), depth)];
            let (bp50, bp99, brps, bscpu) =
                (median(&base.p50), median(&base.p99), median(&base.rps), median(&base.scpu));
            for t in &targets {
                let a = &agg[&(t.name().to_string(), wl.name(), depth)];
                let (p50, p99, rps) = (median(&a.p50), median(&a.p99), median(&a.rps));
                let (scpu, ccpu) = (median(&a.scpu), median(&a.ccpu));
                println!(
                    "{:<9} {:<10} {depth:>5} {p50:>9.1} {p99:>9.1} {rps:>10.0} {:>8.2} {:>8.2} {scpu:>10.2} {:>7.2} {ccpu:>10.2}",
                    t.name(),
                    wl.name(),
                    paired(&a.p50, &base.p50),
                    paired(&a.rps, &base.rps),
                    paired(&a.scpu, &base.scpu)
                );
                let mut rec = vec![
                    ("bench", J::from("roundtrip")),
                    ("kind", "summary".into()),
                    ("target", t.name().into()),
                    ("workload", wl.name().into()),
                    ("depth", depth.into()),
                    ("rounds", a.p50.len().into()),
                    ("requests", a.requests.into()),
                    ("p50_us", p50.into()),
                    ("p99_us", p99.into()),
                    ("rps", rps.into()),
                    ("baseline_p50_us", bp50.into()),
                    ("baseline_p99_us", bp99.into()),
                    ("baseline_rps", brps.into()),
                    ("p50_ratio", paired(&a.p50, &base.p50).into()),
                    ("p99_ratio", paired(&a.p99, &base.p99).into()),
                    ("rps_ratio", paired(&a.rps, &base.rps).into()),
                    ("rps_ratio_of_medians", (rps / brps).into()),
                    ("rps_best", a.rps.iter().copied().fold(0.0, f64::max).into()),
                    ("baseline_rps_best", base.rps.iter().copied().fold(0.0, f64::max).into()),
                    ("p50_ratio_of_medians", (p50 / bp50).into()),
                    ("server_cpu_us_per_req", scpu.into()),
                    ("baseline_server_cpu_us_per_req", bscpu.into()),
                    ("server_cpu_ratio", paired(&a.scpu, &base.scpu).into()),
                    ("client_cpu_us_per_req", ccpu.into()),
                ];
                if !a.mark_p50.is_empty() {
                    let m = |v: &[f64]| median(v);
                    rec.push(("mark_p50_us", m(&a.mark_p50).into()));
                    rec.push(("mark_p99_us", m(&a.mark_p99).into()));
                    rec.push(("flush_p50_us", m(&a.flush_p50).into()));
                    rec.push(("flush_p99_us", m(&a.flush_p99).into()));
                    rec.push(("baseline_mark_p50_us", m(&base.mark_p50).into()));
                    rec.push(("baseline_flush_p50_us", m(&base.flush_p50).into()));
                    rec.push(("mark_p50_ratio", paired(&a.mark_p50, &base.mark_p50).into()));
                    rec.push(("mark_p99_ratio", paired(&a.mark_p99, &base.mark_p99).into()));
                    rec.push(("flush_p50_ratio", paired(&a.flush_p50, &base.flush_p50).into()));
                    if !a.device_p50.is_empty() {
                        // MARK latency against the raw durable write measured right before it.
                        rec.push(("device_p50_us", median(&a.device_p50).into()));
                        rec.push(("mark_p50_over_device", paired(&a.mark_p50, &a.device_p50).into()));
                    }
                }
                if !a.pair_p50.is_empty() {
                    rec.push(("pair_p50_us", median(&a.pair_p50).into()));
                    rec.push(("pair_p99_us", median(&a.pair_p99).into()));
                    rec.push(("baseline_pair_p50_us", median(&base.pair_p50).into()));
                    rec.push(("pair_p50_ratio", paired(&a.pair_p50, &base.pair_p50).into()));
                }
                results.push(&rec);
            }
        }
    }

    for (name, p50) in &device_p50 {
        let (p99, rate) = (&device_p99[name], &device_rate[name]);
        println!(
            "{name:<9} device: 4 KiB durable write p50 {:.1} us  p99 {:.1} us  {:.0} writes/s (medians over rounds)",
            median(p50),
            median(p99),
            median(rate)
        );
        results.push(&[
            ("bench", J::from("roundtrip")),
            ("kind", "device_summary".into()),
            ("target", (*name).into()),
            ("rounds", p50.len().into()),
            ("p50_us", median(p50).into()),
            ("p99_us", median(p99).into()),
            ("writes_per_s", median(rate).into()),
        ]);
    }

    stop.store(true, Ordering::Relaxed);
    let answered = resp.join().expect("responder thread");
    eprintln!("baseline responder answered {answered} requests");
    let mut agent = agent;
    let status = agent.restart_exit(Duration::from_secs(30)).expect("agent exit");
    assert!(status.success(), "agent exited with {status}:\n{}", agent.output());
    drop(probes);
    drop(loop_devs);
    results.write();
}
