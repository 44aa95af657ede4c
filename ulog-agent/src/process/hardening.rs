//! What keeps the agent from deadlocking with the mirrors it serves, and from serving in a
//! way the kernel ignores: start-up checks and process settings, applied by `main` before any
//! thread starts (issue 10, items 12 and 13).
//!
//! A mirror whose log the agent serves cannot complete a write to a clean region until the
//! agent has answered MARK_REGION + FLUSH. So anything the agent itself waits for must not
//! need such a write (or a read the mirror's worker must first ask the log about):
//!
//! - [`check_capabilities`]: without `CAP_SYS_ADMIN` the kernel's `cn_ulog_callback` drops
//!   every reply silently (the mirrors hang while `/readyz` says ready); without
//!   `CAP_NET_ADMIN` the socket cannot join the connector group on kernels before 6.6. Since
//!   6.6, `cn_bind` lets anyone join the groups whose *number* has bit 0 set (it tests the group
//!   number as if it were a bitmask, meaning to allow only `CN_IDX_PROC` = 1), and 7 passes:
//!   seen on 6.18, where an agent without it serves. ulog does not rely on that. Both are fatal.
//! - [`lock_memory`]: `mlockall(MCL_CURRENT | MCL_FUTURE)`. Not `MCL_ONFAULT`: a code page not
//!   yet touched would be read from the binary's filesystem at its first use, and if that
//!   filesystem sits on a mirror we serve, the read waits for an IN_SYNC only we can answer
//!   (dm-raid1 queues reads of regions it cannot tell are in sync without blocking). Every
//!   mapping is made resident and stays so, which costs resident memory (figures in
//!   ARCHITECTURE.md). `RLIMIT_MEMLOCK` is raised first (root without `CAP_IPC_LOCK`).
//! - [`set_io_flusher`]: `PR_SET_IO_FLUSHER` (Linux 5.6): memory reclaim in our context never
//!   issues I/O (`PF_MEMALLOC_NOIO`) and we are not throttled as a dirtier of the devices we
//!   make writable (`PF_LOCAL_THROTTLE`). The flags are per task and copied to every thread
//!   created afterwards (`copy_process` keeps them; the unit test checks inheritance), so
//!   `main` sets them before it spawns the receive, I/O and HTTP threads.
//! - [`protect_from_oom`]: `oom_score_adj = -1000`, as multipathd does: killing the agent
//!   hangs every write to its mirrors, which frees no memory.
//! - [`served_mirror_under`]: refuses a `--state-dir` whose filesystem's block device is, or
//!   stacks on, a `mirror` with a `userspace` log: writing a state file would wait for a MARK
//!   that waits for that write.
//!
//! Failures of the first four that do not make the agent useless (memory lock, I/O flusher,
//! OOM score) are warnings: the agent still serves, with the risk named in its log.
//!
//! Limits of the state-dir check: the filesystem's device is taken from `stat(2)`'s `st_dev`,
//! or, for filesystems on anonymous devices (btrfs), from `/proc/self/mountinfo`'s mount source;
//! the stack is walked through sysfs (`slaves/` of every device, a partition's disk, a loop
//! device's backing file). Network filesystems, FUSE, overlayfs and multi-device btrfs are
//! not resolved (their device is not a block device we can walk); tmpfs has nothing under it.
//! The check runs at start-up only: a mirror built later under the state dir's filesystem (an
//! `lvconvert` of its LV) is not noticed, since at CTR the new table is not live yet and the
//! check would put device-mapper ioctls on the request path.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `prctl` options (not in every libc crate version).
const PR_SET_IO_FLUSHER: libc::c_int = 57;
const PR_GET_IO_FLUSHER: libc::c_int = 58;

const CAP_NET_ADMIN: u32 = 12;
const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_ADMIN: u32 = 21;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// A start-up check that makes serving impossible.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Another socket of this network namespace is subscribed to the dm log's connector group:
    /// another log server (cmirrord, a second ulog-agent) would answer every request too, two
    /// replies per seq, and two writers of every `clustered-disk` device.
    #[error(
        "another log server listens to the device-mapper log's connector group 7: {others}; stop it first \
         (one log server per host: two would both answer every request and both write every disk log)"
    )]
    AnotherServer {
        /// e.g. "pid 812 (cmirrord), netlink port 812".
        others: String,
    },
    /// Capabilities the kernel requires of a log server are missing from the effective set.
    #[error(
        "missing capabilities {missing}: {why} (run ulog-agent as root with a full capability set; \
         under systemd do not drop these with CapabilityBoundingSet=)"
    )]
    Capabilities {
        /// e.g. "CAP_SYS_ADMIN".
        missing: String,
        /// What each missing one breaks.
        why: String,
    },
    /// capget(2) failed.
    #[error("cannot read the process capabilities: {0}")]
    Capget(#[source] io::Error),
    /// The state directory's filesystem sits on a mirror this agent serves.
    #[error(
        "--state-dir {dir} is on a filesystem that sits on {chain}: a state file write would wait for a \
         mirror write that waits for this agent's answer (deadlock); put the state directory on a \
         filesystem outside the mirrors this host's log server serves"
    )]
    StateDirOnMirror {
        /// The state directory.
        dir: PathBuf,
        /// How it stacks, e.g. "253:1 (dm-1) -> 253:0 (dm-0), a userspace-log mirror (log LVM-x)".
        chain: String,
    },
    /// The state directory could not be examined.
    #[error("cannot examine --state-dir {dir}: {source}")]
    StateDir {
        /// The state directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl StartupError {
    /// The errno this maps to (the process's exit status is 1 whatever it is).
    pub fn errno(&self) -> i32 {
        match self {
            Self::Capabilities { .. } => libc::EPERM,
            Self::Capget(e) | Self::StateDir { source: e, .. } => e.raw_os_error().unwrap_or(libc::EIO),
            Self::StateDirOnMirror { .. } => libc::EDEADLK,
            Self::AnotherServer { .. } => libc::EBUSY,
        }
    }
}

/// The effective capability set of this process (bit n = capability n).
pub fn effective_capabilities() -> io::Result<u64> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header reads two data structs, which `data` holds.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

/// Fails unless `CAP_SYS_ADMIN` and `CAP_NET_ADMIN` are effective.
pub fn check_capabilities() -> Result<(), StartupError> {
    missing_capabilities(effective_capabilities().map_err(StartupError::Capget)?)
}

/// The check of [`check_capabilities`] on a given effective set.
pub fn missing_capabilities(effective: u64) -> Result<(), StartupError> {
    let needed = [
        (
            CAP_SYS_ADMIN,
            "CAP_SYS_ADMIN",
            "the kernel silently drops every reply from a sender without it, so the mirrors would hang",
        ),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN", "joining the connector group of dm-log-userspace (7) needs it"),
    ];
    let missing: Vec<_> = needed.iter().filter(|(bit, ..)| effective & (1 << bit) == 0).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(StartupError::Capabilities {
        missing: missing.iter().map(|(_, name, _)| *name).collect::<Vec<_>>().join(", "),
        why: missing.iter().map(|(_, name, why)| format!("{name}: {why}")).collect::<Vec<_>>().join("; "),
    })
}

/// Sets `PR_SET_IO_FLUSHER` on the calling thread (inherited by the threads it creates later).
pub fn set_io_flusher() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the calling thread has `PR_SET_IO_FLUSHER` set.
pub fn is_io_flusher() -> io::Result<bool> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(PR_GET_IO_FLUSHER, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r == 1)
}

/// `oom_score_adj = -1000`: the OOM killer never picks the agent.
pub fn protect_from_oom() -> io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", "-1000\n")
}

/// Locked and resident memory of this process, from `/proc/self/status` (kB).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryFigures {
    /// `VmLck`.
    pub locked_kb: u64,
    /// `VmRSS`.
    pub resident_kb: u64,
}

impl MemoryFigures {
    /// Reads them now.
    pub fn current() -> io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/self/status")?))
    }

    /// Parses a `/proc/<pid>/status` text (missing fields read 0).
    pub fn parse(status: &str) -> Self {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Self { locked_kb: field("VmLck:"), resident_kb: field("VmRSS:") }
    }
}

/// `mlockall(MCL_CURRENT | MCL_FUTURE)` after raising `RLIMIT_MEMLOCK` as far as allowed;
/// refused without `CAP_IPC_LOCK` under a finite limit. Returns the figures before and after.
pub fn lock_memory() -> io::Result<(MemoryFigures, MemoryFigures)> {
    let before = MemoryFigures::current().unwrap_or_default();
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain setrlimit with a valid struct; failure (no CAP_SYS_RESOURCE) is fine:
    // CAP_IPC_LOCK ignores the limit anyway.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as above; raise the soft limit to the hard one.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) } == 0 {
            cur.rlim_cur = cur.rlim_max;
            // SAFETY: as above.
            unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &cur) };
        }
    }
    // With MCL_FUTURE every later mapping counts against the limit: under a finite one (no
    // CAP_IPC_LOCK) an allocation past it would fail, and the agent abort, later. Refuse now.
    let ipc_lock = effective_capabilities().map(|c| c & (1 << CAP_IPC_LOCK) != 0).unwrap_or(false);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct.
    let unlimited_now =
        unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0 && limit.rlim_cur == libc::RLIM_INFINITY;
    if !ipc_lock && !unlimited_now {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "no CAP_IPC_LOCK and RLIMIT_MEMLOCK is {} bytes: later allocations would fail at the limit",
                limit.rlim_cur
            ),
        ));
    }
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, MemoryFigures::current().unwrap_or_default()))
}

/// A block device number.
pub type DevNum = (u32, u32);

/// Where [`served_mirror_under`] reads the system's state (tests point it elsewhere).
#[derive(Clone, Debug)]
pub struct SystemPaths {
    /// sysfs, normally `/sys`.
    pub sysfs: PathBuf,
    /// normally `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
}

impl Default for SystemPaths {
    fn default() -> Self {
        Self { sysfs: "/sys".into(), mountinfo: "/proc/self/mountinfo".into() }
    }
}

/// One step of a device stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackStep {
    /// Device number.
    pub dev: DevNum,
    /// Kernel name (`dm-0`, `loop1`, `sda1`), if sysfs knows it.
    pub name: String,
}

impl fmt::Display for StackStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} ({})", self.dev.0, self.dev.1, self.name)
    }
}

fn stat(path: &Path) -> io::Result<libc::stat> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: an all-zero stat is valid, and c is a NUL-terminated path.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::stat(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn split_dev(d: libc::dev_t) -> DevNum {
    (libc::major(d), libc::minor(d))
}

fn parse_dev(text: &str) -> Option<DevNum> {
    let (a, b) = text.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The block device a path's filesystem lives on: `st_dev`, or for an anonymous device (major
/// 0: btrfs, but also tmpfs and network filesystems) the mount source in mountinfo if that is
/// a block device. `None`: no block device (nothing to walk).
pub fn filesystem_device(path: &Path, paths: &SystemPaths) -> io::Result<Option<DevNum>> {
    let dev = split_dev(stat(path)?.st_dev);
    if dev.0 != 0 {
        return Ok(Some(dev));
    }
    let Ok(mountinfo) = std::fs::read_to_string(&paths.mountinfo) else { return Ok(None) };
    // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> <source> <super options>"
    for line in mountinfo.lines() {
        let mut f = line.split(' ');
        if f.nth(2).and_then(parse_dev) != Some(dev) {
            continue;
        }
        let mut rest = line.split(" - ").nth(1).unwrap_or("").split(' ');
        let source = rest.nth(1).unwrap_or("");
        if source.starts_with('/') {
            if let Ok(st) = stat(Path::new(source)) {
                if st.st_mode & libc::S_IFMT == libc::S_IFBLK {
                    return Ok(Some(split_dev(st.st_rdev)));
                }
            }
        }
    }
    Ok(None)
}

/// The devices `dev` sits on directly: its `slaves/`, a partition's whole disk, the device of a
/// loop device's backing file.
fn lower_devices(dev: DevNum, paths: &SystemPaths) -> Vec<StackStep> {
    let node = paths.sysfs.join(format!("dev/block/{}:{}", dev.0, dev.1));
    let mut out = Vec::new();
    let by_name = |name: &str| {
        std::fs::read_to_string(paths.sysfs.join("class/block").join(name).join("dev"))
            .ok()
            .and_then(|t| parse_dev(&t))
            .map(|d| StackStep { dev: d, name: name.to_string() })
    };
    if let Ok(entries) = std::fs::read_dir(node.join("slaves")) {
        for e in entries.flatten() {
            if let Some(step) = by_name(&e.file_name().to_string_lossy()) {
                out.push(step);
            }
        }
    }
    if node.join("partition").exists() {
        if let Ok(real) = std::fs::canonicalize(&node) {
            if let Some(disk) = real.parent() {
                let name = disk.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if let Some(d) = std::fs::read_to_string(disk.join("dev")).ok().and_then(|t| parse_dev(&t)) {
                    out.push(StackStep { dev: d, name });
                }
            }
        }
    }
    if let Ok(file) = std::fs::read_to_string(node.join("loop/backing_file")) {
        let file = file.trim_end_matches('\n');
        if let Ok(Some(d)) = filesystem_device(Path::new(file), paths) {
            out.push(StackStep { dev: d, name: format!("filesystem of {file}") });
        }
    }
    out
}

/// The kernel name of a device, from sysfs (`dm-0`), or "?".
fn device_name(dev: DevNum, paths: &SystemPaths) -> String {
    std::fs::read_to_string(paths.sysfs.join(format!("dev/block/{}:{}/uevent", dev.0, dev.1)))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("DEVNAME=")).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The path from `dev` down to the first device in `mirrors` (device number -> log uuid), if any
/// (depth-first; each device visited once).
pub fn stack_path_to(dev: DevNum, mirrors: &HashMap<DevNum, String>, paths: &SystemPaths) -> Option<Vec<StackStep>> {
    fn walk(
        step: StackStep,
        mirrors: &HashMap<DevNum, String>,
        paths: &SystemPaths,
        seen: &mut HashSet<DevNum>,
        path: &mut Vec<StackStep>,
    ) -> bool {
        if !seen.insert(step.dev) || path.len() > 64 {
            return false;
        }
        let dev = step.dev;
        path.push(step);
        if mirrors.contains_key(&dev) {
            return true;
        }
        for lower in lower_devices(dev, paths) {
            if walk(lower, mirrors, paths, seen, path) {
                return true;
            }
        }
        path.pop();
        false
    }
    let mut path = Vec::new();
    let first = StackStep { dev, name: device_name(dev, paths) };
    walk(first, mirrors, paths, &mut HashSet::new(), &mut path).then_some(path)
}

/// Refuses `dir` if its filesystem sits on one of `mirrors` (device number -> log uuid: every
/// mirror with a userspace log, all of which this host's one log server serves). `dir` may
/// also be a block device node: then that device is checked.
pub fn served_mirror_under(
    dir: &Path,
    mirrors: &HashMap<DevNum, String>,
    paths: &SystemPaths,
) -> Result<(), StartupError> {
    let dev = match stat(dir) {
        // A block device (`ulog-agent check-state-dir /dev/...`: a device meant for one).
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFBLK => Some(split_dev(st.st_rdev)),
        _ => {
            filesystem_device(dir, paths).map_err(|source| StartupError::StateDir { dir: dir.to_path_buf(), source })?
        }
    };
    let Some(dev) = dev else { return Ok(()) };
    let Some(path) = stack_path_to(dev, mirrors, paths) else { return Ok(()) };
    let last = path.last().map(|s| s.dev).unwrap_or(dev);
    let uuid = mirrors.get(&last).map(String::as_str).unwrap_or("?");
    let chain = path.iter().map(ToString::to_string).collect::<Vec<_>>().join(" -> ");
    Err(StartupError::StateDirOnMirror {
        dir: dir.to_path_buf(),
        chain: format!("{chain}, a device-mapper mirror with a userspace log (log {uuid})"),
    })
}

/// Refuses to start beside another log server: the sockets of this network namespace
/// subscribed to connector group 7 (`/proc/net/netlink`: protocol 11, group bit 6), except
/// `accept_peer` (the test harness's own port), named by the process that holds them (the
/// socket inode, found among `/proc/<pid>/fd`). Checked before the agent's own socket joins.
pub fn check_no_other_server(accept_peer: Option<u32>) -> Result<(), StartupError> {
    let Ok(text) = std::fs::read_to_string("/proc/net/netlink") else { return Ok(()) };
    let others: Vec<String> = group7_listeners(&text)
        .into_iter()
        .filter(|&(port, _)| Some(port) != accept_peer)
        .map(|(port, inode)| match socket_owner(inode) {
            Some((pid, comm)) => format!("pid {pid} ({comm}), netlink port {port}"),
            None => format!("netlink port {port} (process not found)"),
        })
        .collect();
    if others.is_empty() {
        Ok(())
    } else {
        Err(StartupError::AnotherServer { others: others.join("; ") })
    }
}

/// (port, socket inode) of the connector sockets subscribed to group 7 in `/proc/net/netlink`
/// text (`sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode`; Groups is the first 32 groups'
/// bitmask in hex).
pub fn group7_listeners(proc_net_netlink: &str) -> Vec<(u32, u64)> {
    const NETLINK_CONNECTOR: &str = "11";
    const GROUP_7: u32 = 1 << 6;
    proc_net_netlink
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            if c.len() < 10 || c[1] != NETLINK_CONNECTOR {
                return None;
            }
            let groups = u32::from_str_radix(c[3], 16).ok()?;
            (groups & GROUP_7 != 0).then(|| Some((c[2].parse().ok()?, c[9].parse().ok()?)))?
        })
        .collect()
}

/// The process holding socket `inode`, and its name.
fn socket_owner(inode: u64) -> Option<(u32, String)> {
    let want = format!("socket:[{inode}]");
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_dir.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == want.as_str())) {
            let comm = std::fs::read_to_string(proc_dir.path().join("comm")).unwrap_or_default();
            return Some((pid, comm.trim().to_string()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group7_listeners_from_proc_net_netlink() {
        let text = "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n\
            0000000094348724 0   0          00000000 0        0        0     2        0        4\n\
            00000000211285f4 11  812        00000040 0        0        0     2        0        31337\n\
            00000000211285f5 11  813        00000001 0        0        0     2        0        31338\n\
            00000000211285f6 11  814        00000047 0        0        0     2        0        31339\n";
        assert_eq!(group7_listeners(text), vec![(812, 31337), (814, 31339)], "group 7 is bit 6; group 1 alone is not");
    }

    #[test]
    fn capabilities() {
        let all = u64::MAX;
        assert!(missing_capabilities(all).is_ok());
        let e = missing_capabilities(all & !(1 << CAP_SYS_ADMIN)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("missing capabilities CAP_SYS_ADMIN:"), "{msg}");
        assert!(msg.contains("silently drops every reply"), "{msg}");
        assert_eq!(e.errno(), libc::EPERM);
        let e = missing_capabilities(0).unwrap_err().to_string();
        assert!(e.contains("CAP_SYS_ADMIN, CAP_NET_ADMIN"), "{e}");
        // The tests run as root: the real set has both.
        assert!(check_capabilities().is_ok());
    }

    /// PR_SET_IO_FLUSHER is per task; the agent relies on threads created afterwards inheriting
    /// it (the receive, I/O and HTTP threads are spawned after `main` sets it). Runs in a
    /// throwaway thread so the test process's other threads are untouched.
    #[test]
    fn io_flusher_is_inherited_by_later_threads() {
        let r: io::Result<bool> = std::thread::spawn(|| {
            // Kernels before 5.6 (EINVAL) or no CAP_SYS_RESOURCE (EPERM): nothing to check.
            set_io_flusher()?;
            assert!(is_io_flusher().unwrap());
            let child = std::thread::spawn(|| is_io_flusher().unwrap()).join().unwrap();
            Ok(child)
        })
        .join()
        .unwrap();
        match r {
            Ok(inherited) => assert!(inherited, "a thread created after PR_SET_IO_FLUSHER must have it"),
            Err(e) => eprintln!("PR_SET_IO_FLUSHER unavailable here ({e}); inheritance not checked"),
        }
        assert!(!is_io_flusher().unwrap_or(false), "the test thread itself was not changed");
    }

    #[test]
    fn memory_figures() {
        let s = "Name:\tx\nVmLck:\t   51200 kB\nVmRSS:\t   60123 kB\n";
        assert_eq!(MemoryFigures::parse(s), MemoryFigures { locked_kb: 51200, resident_kb: 60123 });
        assert_eq!(MemoryFigures::parse(""), MemoryFigures::default());
        assert!(MemoryFigures::current().unwrap().resident_kb > 0);
    }

    /// A fake sysfs: `dev/block/<maj:min>` nodes with `slaves/`, `partition`, `uevent`,
    /// `class/block/<name>/dev`.
    struct FakeSys {
        root: PathBuf,
    }

    impl FakeSys {
        fn new(tag: &str) -> Self {
            let root = std::env::temp_dir().join(format!("ulog-hardening-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("dev/block")).unwrap();
            std::fs::create_dir_all(root.join("class/block")).unwrap();
            Self { root }
        }
        fn paths(&self) -> SystemPaths {
            SystemPaths { sysfs: self.root.clone(), mountinfo: self.root.join("mountinfo") }
        }
        /// A whole device `name` = `dev`, on top of `slaves`.
        fn device(&self, name: &str, dev: DevNum, slaves: &[&str]) {
            let node = self.root.join(format!("devices/{name}"));
            std::fs::create_dir_all(node.join("slaves")).unwrap();
            std::fs::write(node.join("dev"), format!("{}:{}\n", dev.0, dev.1)).unwrap();
            std::fs::write(node.join("uevent"), format!("MAJOR={}\nDEVNAME={name}\n", dev.0)).unwrap();
            for s in slaves {
                std::fs::create_dir_all(node.join("slaves").join(s)).unwrap();
            }
            std::os::unix::fs::symlink(&node, self.root.join(format!("dev/block/{}:{}", dev.0, dev.1))).unwrap();
            std::os::unix::fs::symlink(&node, self.root.join("class/block").join(name)).unwrap();
        }
        /// A partition `name` of the whole device `disk`.
        fn partition(&self, disk: &str, name: &str, dev: DevNum) {
            let node = self.root.join(format!("devices/{disk}/{name}"));
            std::fs::create_dir_all(&node).unwrap();
            std::fs::write(node.join("dev"), format!("{}:{}\n", dev.0, dev.1)).unwrap();
            std::fs::write(node.join("partition"), "1\n").unwrap();
            std::fs::write(node.join("uevent"), format!("DEVNAME={name}\n")).unwrap();
            std::os::unix::fs::symlink(&node, self.root.join(format!("dev/block/{}:{}", dev.0, dev.1))).unwrap();
            std::os::unix::fs::symlink(&node, self.root.join("class/block").join(name)).unwrap();
        }
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    /// The walk the start-up check does: a filesystem on a linear device on a partition of a
    /// device on a userspace-log mirror is found; one on other devices is not.
    #[test]
    fn stacks_are_walked_down_to_a_served_mirror() {
        let sys = FakeSys::new("walk");
        sys.device("loop0", (7, 0), &[]);
        sys.device("loop1", (7, 1), &[]);
        sys.device("dm-0", (253, 0), &["loop0", "loop1"]); // the mirror
        sys.device("dm-1", (253, 1), &["dm-0"]); // a partition table's device on it...
        sys.partition("dm-1", "dm-1p1", (259, 0)); // ...and a partition of that
        sys.device("dm-2", (253, 2), &["dm-1p1"]); // a linear LV on the partition
        sys.device("sda", (8, 0), &[]);
        sys.device("dm-3", (253, 3), &["sda"]);
        let mirrors = HashMap::from([((253, 0), "LVM-served".to_string())]);
        let p = sys.paths();

        let path = stack_path_to((253, 2), &mirrors, &p).expect("dm-2 stacks on the mirror");
        let names: Vec<_> = path.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["dm-2", "dm-1p1", "dm-1", "dm-0"]);
        assert!(stack_path_to((253, 0), &mirrors, &p).is_some(), "the mirror itself");
        assert!(stack_path_to((253, 3), &mirrors, &p).is_none());
        assert!(stack_path_to((7, 0), &mirrors, &p).is_none(), "a leg is under the mirror, not on it");
        assert!(stack_path_to((8, 0), &HashMap::new(), &p).is_none());
    }

    #[test]
    fn a_cycle_in_sysfs_ends_the_walk() {
        let sys = FakeSys::new("cycle");
        sys.device("dm-5", (253, 5), &["dm-6"]);
        sys.device("dm-6", (253, 6), &["dm-5"]);
        let mirrors = HashMap::from([((253, 9), "LVM-x".to_string())]);
        assert!(stack_path_to((253, 5), &mirrors, &sys.paths()).is_none());
    }

    /// The state directory of the tests (tmp) is not on a device-mapper mirror: the real check
    /// passes, and with its own device declared a served mirror it refuses with the chain.
    #[test]
    fn state_dir_check_on_the_real_system() {
        let dir = std::env::temp_dir();
        let p = SystemPaths::default();
        assert!(served_mirror_under(&dir, &HashMap::new(), &p).is_ok());
        if let Ok(Some(dev)) = filesystem_device(&dir, &p) {
            let mirrors = HashMap::from([(dev, "LVM-pretend".to_string())]);
            let e = served_mirror_under(&dir, &mirrors, &p).unwrap_err();
            assert_eq!(e.errno(), libc::EDEADLK);
            let msg = e.to_string();
            assert!(msg.contains(&format!("{}:{}", dev.0, dev.1)) && msg.contains("log LVM-pretend"), "{msg}");
        }
        let e = served_mirror_under(Path::new("/nonexistent/ulog"), &HashMap::new(), &p).unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT);
    }
}
