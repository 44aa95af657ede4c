//! Shared fixtures: a private namespace with a kernel peer and an agent per test, request helpers,
//! temporary directories, disk images and loop devices.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use ulog_agent::wire::kernel_peer::{
    encode_request, enter_private_netns, errno_name, regions_payload, AgentProcess, Capacity, GroupListener,
    KernelPeer, Reply, ReplyForm, Request,
};
pub use ulog_common::RequestType as T;
pub use ulog_common::{NLMSG_HDRLEN, ULOG_OFFSET, ULOG_REQUEST_LEN};

/// The agent binary under test: the one cargo built, or `$ULOG_AGENT_BIN` (e.g. a mutated
/// build, to check that the tests catch a bug).
pub fn agent_bin() -> String {
    std::env::var("ULOG_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ulog-agent").to_string())
}
/// The uuid most tests use.
pub const UUID: &str = "LVM-ulogintegrationtest0001";
/// A kernel-looking luid.
pub const LUID: u64 = 0xffff_8880_03a1_b000;
/// 100 sectors in regions of 8: 13 regions, the last one partial.
pub const CORE: &str = "100 clustered-core 8";
/// Regions of [`CORE`].
pub const N: u64 = 13;
/// Negative errnos as replies carry them.
pub const EINVAL: i32 = -libc::EINVAL;
/// -ESRCH: "no server", what makes the kernel run its reconnect loop.
pub const ESRCH: i32 = -libc::ESRCH;
/// What a request of type `t` for an unknown (uuid, luid) is answered: -ESRCH for the types the
/// kernel sends through `userspace_do_request` (it reconnects: CTR + RESUME, then the request
/// again), -EINVAL for the others (the kernel does not retry them).
pub fn unknown_log_errno(t: T) -> i32 {
    const RECONNECTING: [T; 10] = [
        T::IsClean,
        T::InSync,
        T::Flush,
        T::MarkRegion,
        T::ClearRegion,
        T::GetResyncWork,
        T::SetRegionSync,
        T::GetSyncCount,
        T::StatusInfo,
        T::IsRemoteRecovering,
    ];
    if RECONNECTING.contains(&t) {
        ESRCH
    } else {
        EINVAL
    }
}
/// -EEXIST.
pub const EEXIST: i32 = -libc::EEXIST;
/// How long "no reply" is waited for after a sentinel request has been answered.
pub const QUIET: Duration = Duration::from_millis(300);

/// A log: (uuid, luid).
#[derive(Clone, Debug)]
pub struct Log {
    pub uuid: String,
    pub luid: u64,
}

impl Log {
    pub fn new(uuid: &str, luid: u64) -> Self {
        Self { uuid: uuid.into(), luid }
    }
    /// `UUID` with luid `LUID + n`.
    pub fn nth(n: u64) -> Self {
        Self::new(UUID, LUID + n)
    }
}

/// A directory under the system temp dir, removed on drop (kept with ULOG_KEEP_TMP=1).
pub struct TempDir(PathBuf);

static TMP_N: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    pub fn new() -> Self {
        let n = TMP_N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ulog-it-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("ULOG_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One test's world: a private namespace (entered by the test's thread), the kernel peer, the
/// agent, and a temp dir.
pub struct Agent {
    pub peer: KernelPeer,
    pub proc: AgentProcess,
    pub dir: TempDir,
    args: Vec<String>,
}

/// Where the agent keeps core logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Core {
    InMemory,
    StateDir,
}

impl Agent {
    /// An agent without `--state-dir`.
    pub fn start() -> Self {
        Self::start_with(Core::InMemory)
    }

    pub fn start_with(core: Core) -> Self {
        Self::start_with_args(core, &[])
    }

    /// An agent with more command-line arguments.
    pub fn start_with_args(core: Core, extra: &[String]) -> Self {
        Self::start_with_args_after(core, extra, || {})
    }

    /// An agent with more command-line arguments, `before` run in the test's namespace just
    /// before the agent starts (e.g. to take a port the agent wants).
    pub fn start_with_args_after(core: Core, extra: &[String], before: impl FnOnce()) -> Self {
        enter_private_netns().expect("integration tests need root (unshare CLONE_NEWNET)");
        before();
        let mut peer = KernelPeer::open().expect("open the kernel peer socket");
        let dir = TempDir::new();
        let mut args = extra.to_vec();
        if core == Core::StateDir {
            // The agent does not create it (a mistyped path must not start every log afresh).
            std::fs::create_dir_all(dir.join("state")).expect("create the state directory");
            args.push("--state-dir".to_string());
            args.push(dir.join("state").display().to_string());
        }
        let proc = AgentProcess::spawn_ready(agent_bin(), &mut peer, &args).unwrap_or_else(|e| panic!("{e}"));
        Self { peer, proc, dir, args }
    }

    /// kill -9 and start a new agent with the same arguments.
    pub fn restart_after_kill9(&mut self) {
        let st = self.proc.kill9().unwrap_or_else(|e| panic!("{e}"));
        assert!(!st.success(), "SIGKILL ends the agent: {st}");
        self.respawn();
    }

    /// Starts a new agent with the same arguments (the old one must be gone).
    pub fn respawn(&mut self) {
        self.proc =
            AgentProcess::spawn_ready(agent_bin(), &mut self.peer, &self.args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Sends one request and waits for its reply, which must be a full reply.
    pub fn request(&mut self, req: &Request) -> Reply {
        let what = format!("{} of {}/{:#x}", req.kind_name(), String::from_utf8_lossy(&req.uuid), req.luid);
        let r = self.peer.call_request(req).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.form, ReplyForm::Full, "{what}: every reply to a readable request is a full reply ({r})");
        r
    }

    pub fn call(&mut self, log: &Log, t: T, payload: &[u8]) -> Reply {
        self.request(&Request::new(t, &log.uuid, log.luid, payload))
    }

    /// The payload of a successful reply; panics on an error.
    pub fn ok(&mut self, log: &Log, t: T, payload: &[u8]) -> Vec<u8> {
        let r = self.call(log, t, payload);
        assert_eq!(r.error, 0, "{} of {log:?} with payload {payload:02x?} failed: {r}", t.name());
        r.payload
    }

    /// Asserts the request fails with `errno` (negative).
    pub fn expect_err(&mut self, log: &Log, t: T, payload: &[u8], errno: i32, why: &str) {
        let r = self.call(log, t, payload);
        assert_eq!(
            r.error,
            errno,
            "{} of {log:?} ({why}): expected {errno} ({}), got {r}",
            t.name(),
            errno_name(errno)
        );
    }

    pub fn ctr(&mut self, log: &Log, ctr: &str) -> Reply {
        self.request(&Request::ctr(&log.uuid, log.luid, ctr))
    }

    pub fn ctr_ok(&mut self, log: &Log, ctr: &str) -> Vec<u8> {
        let r = self.ctr(log, ctr);
        assert_eq!(r.error, 0, "CTR {ctr:?}: {r}");
        r.payload
    }

    /// CTR then RESUME.
    pub fn create(&mut self, log: &Log, ctr: &str) {
        self.ctr_ok(log, ctr);
        self.resume(log);
    }

    pub fn resume(&mut self, log: &Log) {
        self.ok(log, T::Resume, &[]);
    }

    pub fn suspend(&mut self, log: &Log) {
        self.ok(log, T::Presuspend, &[]);
        self.ok(log, T::Postsuspend, &[]);
    }

    fn bool_reply(&mut self, log: &Log, t: T, r: u64) -> bool {
        let p = self.ok(log, t, &r.to_ne_bytes());
        assert_eq!(p.len(), 8, "{} reply is an i64", t.name());
        match i64::from_ne_bytes(p[..8].try_into().unwrap()) {
            0 => false,
            1 => true,
            v => panic!("{}({r}) answered {v}: must be exactly 0 or 1", t.name()),
        }
    }

    pub fn in_sync(&mut self, log: &Log, r: u64) -> bool {
        self.bool_reply(log, T::InSync, r)
    }

    pub fn is_clean(&mut self, log: &Log, r: u64) -> bool {
        self.bool_reply(log, T::IsClean, r)
    }

    /// IN_SYNC of regions 0..n as a string of 0/1, region 0 first.
    pub fn sync_map(&mut self, log: &Log, n: u64) -> String {
        (0..n).map(|r| if self.in_sync(log, r) { '1' } else { '0' }).collect()
    }

    /// IS_CLEAN of regions 0..n as a string of 0/1.
    pub fn clean_map(&mut self, log: &Log, n: u64) -> String {
        (0..n).map(|r| if self.is_clean(log, r) { '1' } else { '0' }).collect()
    }

    fn u64_reply(&mut self, log: &Log, t: T) -> u64 {
        let p = self.ok(log, t, &[]);
        assert_eq!(p.len(), 8, "{} reply is a u64", t.name());
        u64::from_ne_bytes(p[..8].try_into().unwrap())
    }

    pub fn region_size(&mut self, log: &Log) -> u64 {
        self.u64_reply(log, T::GetRegionSize)
    }

    pub fn sync_count(&mut self, log: &Log) -> u64 {
        self.u64_reply(log, T::GetSyncCount)
    }

    fn pair_reply(&mut self, log: &Log, t: T, payload: &[u8]) -> (i64, u64) {
        let p = self.ok(log, t, payload);
        assert_eq!(p.len(), 16, "{} reply is 16 bytes", t.name());
        (i64::from_ne_bytes(p[..8].try_into().unwrap()), u64::from_ne_bytes(p[8..16].try_into().unwrap()))
    }

    /// GET_RESYNC_WORK: (i, r).
    pub fn resync_work(&mut self, log: &Log) -> (i64, u64) {
        self.pair_reply(log, T::GetResyncWork, &[])
    }

    /// IS_REMOTE_RECOVERING(r): (is_recovering, in_sync_hint).
    pub fn remote_recovering(&mut self, log: &Log, r: u64) -> (i64, u64) {
        self.pair_reply(log, T::IsRemoteRecovering, &r.to_ne_bytes())
    }

    pub fn set_sync(&mut self, log: &Log, r: u64, in_sync: i64) {
        self.ok(log, T::SetRegionSync, &set_sync_payload(r, in_sync));
    }

    /// What the kernel does when it has resynchronised a region: SET_REGION_SYNC(r, 1), then
    /// CLEAR_REGION(r) (dm-region-hash clears a recovered region). Only then is the region clean
    /// and in sync, i.e. set in the on-disk bitmap.
    pub fn recover(&mut self, log: &Log, r: u64) {
        self.set_sync(log, r, 1);
        self.clear(log, &[r]);
    }

    pub fn mark(&mut self, log: &Log, regions: &[u64]) {
        let p = self.ok(log, T::MarkRegion, &regions_payload(regions));
        assert!(p.is_empty());
    }

    pub fn clear(&mut self, log: &Log, regions: &[u64]) {
        self.ok(log, T::ClearRegion, &regions_payload(regions));
    }

    /// FLUSH, with marks (integrated_flush) when `regions` is not empty.
    pub fn flush(&mut self, log: &Log, regions: &[u64]) {
        self.ok(log, T::Flush, &regions_payload(regions));
    }

    /// A sentinel round trip, then nothing more may arrive for [`QUIET`].
    pub fn assert_no_reply(&mut self, log: &Log, why: &str) {
        self.ok(log, T::GetRegionSize, &[]);
        if let Err(e) = self.peer.assert_silent(QUIET) {
            panic!("{why}: expected no reply, got {e}");
        }
    }
}

/// SET_REGION_SYNC payload: {u64 region, i64 in_sync}.
pub fn set_sync_payload(r: u64, in_sync: i64) -> Vec<u8> {
    let mut p = r.to_ne_bytes().to_vec();
    p.extend_from_slice(&in_sync.to_ne_bytes());
    p
}

/// The string of a STATUS reply, which must end with its NUL (counted in data_size).
pub fn status_text(payload: &[u8]) -> String {
    assert_eq!(payload.last(), Some(&0), "status text {payload:02x?} ends with a NUL counted in data_size");
    let body = &payload[..payload.len() - 1];
    assert!(!body.contains(&0), "one string: {payload:02x?}");
    String::from_utf8(body.to_vec()).unwrap()
}

// ---- disk images (protocol.md §4) ----

pub const MAGIC: u32 = 0x4D69_5272;
pub const BITMAP_OFFSET: usize = 1024;

/// Minimum log device size for `regions` regions.
pub fn min_device_bytes(regions: u64) -> u64 {
    let bitmap = regions.div_ceil(32) * 4;
    (1024 + bitmap).div_ceil(512) * 512
}

/// A zero-filled file of `len` bytes.
pub fn zero_file(path: &Path, len: u64) -> PathBuf {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    f.sync_all().unwrap();
    path.to_path_buf()
}

/// A log image: header {magic, version 2, nr_regions}, clean bitmap at 1024 (LE bit order).
pub fn image(magic: u32, nr_regions: u64, clean: impl Fn(u64) -> bool) -> Vec<u8> {
    let bitmap = nr_regions.div_ceil(32) as usize * 4;
    let mut b = vec![0u8; (BITMAP_OFFSET + bitmap).div_ceil(512) * 512];
    b[0..4].copy_from_slice(&magic.to_le_bytes());
    b[4..8].copy_from_slice(&2u32.to_le_bytes());
    b[8..16].copy_from_slice(&nr_regions.to_le_bytes());
    for r in 0..nr_regions {
        if clean(r) {
            b[BITMAP_OFFSET + r as usize / 8] |= 1 << (r % 8);
        }
    }
    b
}

/// Writes `bytes` at offset 0 of `path` (a file or a block device), durably.
pub fn write_head(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

/// Reads the first `len` bytes of a file or block device as they are on the device (O_DIRECT for
/// block devices, so no stale page cache is read).
pub fn read_head(path: &Path, len: usize) -> Vec<u8> {
    let is_blk = std::fs::metadata(path).unwrap().file_type().is_block_device();
    if !is_blk {
        let mut v = Vec::new();
        File::open(path).unwrap().read_to_end(&mut v).unwrap();
        v.truncate(len);
        return v;
    }
    let size = len.div_ceil(4096) * 4096;
    let layout = std::alloc::Layout::from_size_align(size, 4096).unwrap();
    // SAFETY: non-zero size; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!ptr.is_null());
    let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).unwrap();
    let mut done = 0usize;
    while done < size {
        // SAFETY: the buffer holds `size` bytes; the fd is open.
        let n = unsafe {
            libc::pread(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                ptr.add(done) as *mut libc::c_void,
                size - done,
                done as i64,
            )
        };
        assert!(n >= 0, "pread {}: {}", path.display(), std::io::Error::last_os_error());
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    // SAFETY: `done` bytes were initialised (the whole buffer was zeroed anyway).
    let v = unsafe { std::slice::from_raw_parts(ptr, len.min(size)) }.to_vec();
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    v
}

/// The decoded head of a log device.
#[derive(Debug)]
pub struct DiskLog {
    pub magic: u32,
    pub version: u32,
    pub nr_regions: u64,
    pub bytes: Vec<u8>,
}

impl DiskLog {
    /// Reads the first 64 KiB (enough for 500 000 regions; shorter files are read whole).
    pub fn read(path: &Path) -> Self {
        let bytes = read_head(path, 65536);
        assert!(bytes.len() >= BITMAP_OFFSET + 8, "log device too short: {} bytes", bytes.len());
        Self {
            magic: u32::from_le_bytes(bytes[0..4].try_into().unwrap()),
            version: u32::from_le_bytes(bytes[4..8].try_into().unwrap()),
            nr_regions: u64::from_le_bytes(bytes[8..16].try_into().unwrap()),
            bytes,
        }
    }

    /// The clean/in-sync bit of region `r`.
    pub fn clean(&self, r: u64) -> bool {
        self.bytes[BITMAP_OFFSET + r as usize / 8] & (1 << (r % 8)) != 0
    }

    /// Bits of regions 0..n as a string of 0/1.
    pub fn map(&self, n: u64) -> String {
        (0..n).map(|r| if self.clean(r) { '1' } else { '0' }).collect()
    }

    /// Asserts a valid header for `n` regions.
    pub fn assert_header(&self, n: u64) {
        assert_eq!(self.magic, MAGIC, "magic 0x4D695272 (\"MiRr\" LE) at byte 0");
        assert_eq!(self.version, 2, "version 2 at byte 4");
        assert_eq!(self.nr_regions, n, "nr_regions at byte 8");
    }
}

/// The disk map expected for regions 0..n where `f(r)` says clean.
pub fn map_of(n: u64, f: impl Fn(u64) -> bool) -> String {
    (0..n).map(|r| if f(r) { '1' } else { '0' }).collect()
}

/// A loop device over a file, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    pub fn attach(file: &Path) -> Self {
        let mut last = String::new();
        for _ in 0..10 {
            let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().expect("run losetup");
            if out.status.success() {
                let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
                return Self { dev: PathBuf::from(dev) };
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("losetup -f --show {} failed: {last}", file.display());
    }

    /// "major:minor" of the device.
    pub fn maj_min(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&self.dev).unwrap().rdev();
        format!("{}:{}", libc::major(rdev), libc::minor(rdev))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

// ---- raw datagram surgery ----

pub fn put_u32(d: &mut [u8], at: usize, v: u32) {
    d[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

pub fn put_u16(d: &mut [u8], at: usize, v: u16) {
    d[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

/// Byte offsets inside a request datagram.
pub mod at {
    use super::{NLMSG_HDRLEN, ULOG_OFFSET};
    pub const NL_LEN: usize = 0;
    pub const CN_IDX: usize = NLMSG_HDRLEN;
    pub const CN_VAL: usize = NLMSG_HDRLEN + 4;
    pub const CN_SEQ: usize = NLMSG_HDRLEN + 8;
    pub const CN_LEN: usize = NLMSG_HDRLEN + 16;
    pub const UUID: usize = ULOG_OFFSET + 8;
    pub const SEQ: usize = ULOG_OFFSET + 148;
    pub const DATA_SIZE: usize = ULOG_OFFSET + 156;
    pub const DATA: usize = ULOG_OFFSET + 160;
}

/// A request datagram with a fresh seq from the peer (not registered).
pub fn raw_request(peer: &mut KernelPeer, req: &Request) -> (u32, Vec<u8>) {
    let seq = peer.next_seq();
    let d = encode_request(req, seq, req.version.unwrap_or(3)).unwrap();
    (seq, d)
}
