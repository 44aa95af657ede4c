//! Device-mapper ioctls: which dm devices exist and what their tables say, and the one change
//! the agent makes, a suspend and resume of a cluster log's mirror to restart its recovery
//! (the cluster layer's `restart_mirror_recovery`).
//!
//! Used by the log engine (a log's mirror legs, [`crate::region_log::legs`]) and by telemetry (each log's
//! mirror device, `metrics::mirror`), so it imports neither.
//!
//! Everything goes through `/dev/mapper/control`:
//!
//! 1. `DM_LIST_DEVICES`: every dm device's name and device number;
//! 2. `DM_TABLE_STATUS` with `DM_STATUS_TABLE_FLAG` per device: its live table (or, with
//!    `DM_QUERY_INACTIVE_TABLE_FLAG`, the table loaded but not yet resumed), target by target.
//!    For a `mirror` target the kernel prints its parameters with device numbers:
//!    `userspace <argc> <log uuid> [integrated_flush] <log args> <#legs> <maj:min> <offset>...`.
//!    The table text is produced in the kernel (`mirror_status`, and `userspace_status` for
//!    STATUSTYPE_TABLE): no request reaches a userspace log server, so calling this while the
//!    kernel waits for one of our answers cannot deadlock.
//!
//! Ioctls rather than `dmsetup table`: no process per lookup, no dependency on the dmsetup
//! binary or its output format, and a structured answer (`DM_BUFFER_FULL_FLAG` says when to
//! retry with a larger buffer). `DM_TABLE_DEPS` is not used for the legs: it lists every device
//! the table holds, and a mirror whose userspace log is `clustered-disk` also holds its log
//! device, so only the mirror's own parameters say which devices are legs.
//!
//! Limits: a device removed between the list and its table query is skipped; answers are capped
//! at 64 MiB.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The device-mapper control node.
pub const DM_CONTROL: &str = "/dev/mapper/control";

/// Present when the running kernel has device-mapper (built in or loaded), whether or not the
/// control node exists in this mount namespace's /dev.
pub const DM_MISC_CLASS: &str = "/sys/class/misc/device-mapper";

/// `sizeof(struct dm_ioctl)`.
const DM_IOCTL_SIZE: usize = 312;
const DM_MAX_TYPE_NAME: usize = 16;
/// `sizeof(struct dm_target_spec)` without its parameter string.
const TARGET_SPEC_SIZE: usize = 24 + DM_MAX_TYPE_NAME;
/// `offsetof(struct dm_name_list, name)`.
const NAME_LIST_NAME: usize = 12;

const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
const DM_QUERY_INACTIVE_TABLE_FLAG: u32 = 1 << 12;

const fn dm_iowr(nr: u32) -> u32 {
    (3 << 30) | ((DM_IOCTL_SIZE as u32) << 16) | (0xfd << 8) | nr
}
const DM_LIST_DEVICES: u32 = dm_iowr(2);
const DM_TABLE_STATUS: u32 = dm_iowr(12);
const DM_DEV_SUSPEND: u32 = dm_iowr(6);
const DM_DEV_STATUS: u32 = dm_iowr(7);
const DM_SUSPEND_FLAG: u32 = 1 << 1;
const DM_INACTIVE_PRESENT_FLAG: u32 = 1 << 6;
const DM_SKIP_LOCKFS_FLAG: u32 = 1 << 10;

/// A block device number, split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevNum {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

impl DevNum {
    /// From a kernel `dev_t` as the dm ioctls return it (`huge_encode_dev`).
    pub fn from_dev_t(dev: u64) -> Self {
        Self { major: libc::major(dev), minor: libc::minor(dev) }
    }

    /// `maj:min`.
    pub fn parse(text: &str) -> Option<Self> {
        let (a, b) = text.split_once(':')?;
        Some(Self { major: a.parse().ok()?, minor: b.parse().ok()? })
    }

    /// As a `dev_t` for comparing with `st_rdev`.
    pub fn dev_t(self) -> u64 {
        libc::makedev(self.major, self.minor)
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// Which of a device's tables to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// The live table.
    Live,
    /// The table loaded and not yet resumed (a reload in progress), if any.
    Inactive,
}

/// A `struct dm_ioctl` buffer with `data` bytes after the header, 8-byte aligned.
struct IoctlBuf(Vec<u64>);

impl IoctlBuf {
    fn new(total: usize) -> Self {
        let mut b = Self(vec![0u64; total.div_ceil(8)]);
        let bytes = b.bytes_mut();
        put_u32(bytes, 0, 4); // version 4.0.0: any kernel with the v4 interface
        put_u32(bytes, 12, total as u32); // data_size
        put_u32(bytes, 16, DM_IOCTL_SIZE as u32); // data_start
        b
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: u64 storage viewed as bytes; length in bytes of the same allocation.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 8) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 8) }
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
fn get_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn get_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// An open device-mapper control node.
pub struct Control(File);

impl Control {
    /// Opens the control node at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        File::options().read(true).write(true).open(path).map(Self)
    }

    /// Runs one dm ioctl, growing the buffer while the kernel says it is full. `fill` sets the
    /// request fields. Returns the whole answer (header and data).
    fn ioctl(&self, request: u32, fill: &dyn Fn(&mut [u8])) -> io::Result<Vec<u8>> {
        let mut size = 16 * 1024;
        loop {
            let mut buf = IoctlBuf::new(size);
            fill(buf.bytes_mut());
            // SAFETY: the buffer is a dm_ioctl of data_size bytes, as the ioctl expects.
            let r = unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, buf.0.as_mut_ptr()) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            let flags = get_u32(buf.bytes(), 28).unwrap_or(0);
            if flags & DM_BUFFER_FULL_FLAG == 0 {
                return Ok(buf.bytes().to_vec());
            }
            if size >= 64 << 20 {
                return Err(io::Error::other("device-mapper answer larger than 64 MiB"));
            }
            size *= 4;
        }
    }

    /// Every dm device: `(name, device number as dev_t)`.
    pub fn list_devices(&self) -> io::Result<Vec<(String, u64)>> {
        let list = self.ioctl(DM_LIST_DEVICES, &|_| {})?;
        Ok(parse_name_list(answer_data(&list)))
    }

    /// Suspends device `dev` (`suspend`: its in-flight I/O completes first, new I/O waits, as
    /// `dmsetup suspend --nolockfs`: a filesystem on it is not frozen) or resumes it. A resume
    /// also activates a loaded inactive table: check [`Self::state`] first.
    pub fn suspend(&self, dev: u64, suspend: bool) -> io::Result<()> {
        self.ioctl(DM_DEV_SUSPEND, &|b| {
            put_u32(b, 28, if suspend { DM_SUSPEND_FLAG | DM_SKIP_LOCKFS_FLAG } else { 0 });
            b[40..48].copy_from_slice(&dev.to_ne_bytes());
        })
        .map(|_| ())
    }

    /// Device `dev`'s state (`DM_DEV_STATUS`): `(suspended, inactive table loaded)`.
    pub fn state(&self, dev: u64) -> io::Result<(bool, bool)> {
        let answer = self.ioctl(DM_DEV_STATUS, &|b| b[40..48].copy_from_slice(&dev.to_ne_bytes()))?;
        let flags = get_u32(&answer, 28).unwrap_or(0);
        Ok((flags & DM_SUSPEND_FLAG != 0, flags & DM_INACTIVE_PRESENT_FLAG != 0))
    }

    /// The targets `(type, parameters)` of one of device `dev`'s tables; `Ok(None)` if the
    /// device is gone (removed since it was listed). No inactive table: an empty list.
    pub fn table(&self, dev: u64, which: Table) -> io::Result<Option<Vec<(String, String)>>> {
        let flags = match which {
            Table::Live => DM_STATUS_TABLE_FLAG,
            Table::Inactive => DM_STATUS_TABLE_FLAG | DM_QUERY_INACTIVE_TABLE_FLAG,
        };
        let status = match self.ioctl(DM_TABLE_STATUS, &|b| {
            put_u32(b, 28, flags);
            b[40..48].copy_from_slice(&dev.to_ne_bytes());
        }) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
            Err(e) => return Err(e),
        };
        let count = get_u32(&status, 20).unwrap_or(0);
        Ok(Some(parse_targets(answer_data(&status), count)))
    }
}

/// The data part of an ioctl answer.
fn answer_data(answer: &[u8]) -> &[u8] {
    let start = get_u32(answer, 16).unwrap_or(DM_IOCTL_SIZE as u32) as usize;
    let size = (get_u32(answer, 12).unwrap_or(0) as usize).min(answer.len());
    answer.get(start..size).unwrap_or(&[])
}

/// Parses a `DM_LIST_DEVICES` data area: `(name, device number)` for each `struct dm_name_list`
/// (`dev`, `next` = offset of the next entry from this one, 0 for the last, then the name).
/// An empty list is a single entry with `dev` 0.
pub fn parse_name_list(data: &[u8]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let (Some(dev), Some(next)) = (get_u64(data, at), get_u32(data, at + 8)) {
        if dev == 0 && next == 0 && out.is_empty() {
            break;
        }
        let name_from = at + NAME_LIST_NAME;
        let name_to = if next == 0 { data.len() } else { (at + next as usize).min(data.len()) };
        if name_from < name_to {
            out.push((c_str(&data[name_from..name_to]), dev));
        }
        if next == 0 {
            break;
        }
        at += next as usize;
    }
    out
}

/// Parses a `DM_TABLE_STATUS` data area of `count` targets: `(target type, parameters)` for each
/// `struct dm_target_spec` (`next` = offset of the next spec from the start of the data area).
pub fn parse_targets(data: &[u8], count: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        let Some(next) = get_u32(data, at + 20) else { break };
        let Some(ty) = data.get(at + 24..at + TARGET_SPEC_SIZE) else { break };
        let params_to = if next as usize > at { (next as usize).min(data.len()) } else { data.len() };
        let params = data.get(at + TARGET_SPEC_SIZE..params_to).map(c_str).unwrap_or_default();
        out.push((c_str(ty), params));
        if next as usize <= at {
            break;
        }
        at = next as usize;
    }
    out
}

/// The log uuid of a `mirror` target's table parameters, if its log is `userspace`:
/// `userspace <argc> <uuid> ...`.
pub fn userspace_log_uuid(params: &str) -> Option<&str> {
    let mut t = params.split_ascii_whitespace();
    (t.next()? == "userspace").then_some(())?;
    t.next()?.parse::<u32>().ok()?;
    t.next()
}

/// The leg devices of a `mirror` target's table parameters whose log is `userspace`:
/// `userspace <argc> <argc log args, uuid first> <#legs> (<maj:min> <offset>){#legs} ...`
/// (dm-raid1's `mirror_status`, STATUSTYPE_TABLE; `argc` counts `integrated_flush` too).
/// `None` if the parameters do not have that shape.
pub fn userspace_mirror_legs(params: &str) -> Option<Vec<DevNum>> {
    let mut t = params.split_ascii_whitespace();
    (t.next()? == "userspace").then_some(())?;
    let argc: usize = t.next()?.parse().ok()?;
    for _ in 0..argc {
        t.next()?;
    }
    let legs: usize = t.next()?.parse().ok()?;
    // dm-raid1 allows at most 32 legs (MAX_NR_MIRRORS); more is not a mirror table.
    if legs == 0 || legs > 32 {
        return None;
    }
    let mut out = Vec::with_capacity(legs);
    for _ in 0..legs {
        out.push(DevNum::parse(t.next()?)?);
        t.next()?.parse::<u64>().ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `DM_LIST_DEVICES` data area as the kernel lays it out (names padded to 8 bytes, newer
    /// kernels append event_nr and flags after the name: `next` skips them).
    fn name_list(entries: &[(&str, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (name, dev)) in entries.iter().enumerate() {
            let start = out.len();
            out.extend_from_slice(&dev.to_ne_bytes());
            out.extend_from_slice(&0u32.to_ne_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while out.len() % 8 != 0 {
                out.push(0);
            }
            out.extend_from_slice(&[7, 0, 0, 0, 0, 0, 0, 0]); // event_nr, flags
            let next = if i + 1 == entries.len() { 0 } else { (out.len() - start) as u32 };
            out[start + 8..start + 12].copy_from_slice(&next.to_ne_bytes());
        }
        if entries.is_empty() {
            out.extend_from_slice(&[0u8; 16]);
        }
        out
    }

    /// A `DM_TABLE_STATUS` data area: specs aligned to 8, `next` from the area's start.
    fn targets(specs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (ty, params)) in specs.iter().enumerate() {
            let start = out.len();
            out.extend_from_slice(&(i as u64 * 100).to_ne_bytes());
            out.extend_from_slice(&100u64.to_ne_bytes());
            out.extend_from_slice(&0i32.to_ne_bytes());
            out.extend_from_slice(&0u32.to_ne_bytes());
            let mut t = [0u8; DM_MAX_TYPE_NAME];
            t[..ty.len()].copy_from_slice(ty.as_bytes());
            out.extend_from_slice(&t);
            out.extend_from_slice(params.as_bytes());
            out.push(0);
            while out.len() % 8 != 0 {
                out.push(0);
            }
            let next = out.len() as u32;
            out[start + 20..start + 24].copy_from_slice(&next.to_ne_bytes());
        }
        out
    }

    #[test]
    fn name_lists() {
        let d = name_list(&[("m_core", 0xfd00), ("vg-lv_mimage_0", 0xfd01), ("x", (259 << 8) | 3)]);
        assert_eq!(
            parse_name_list(&d),
            vec![("m_core".into(), 0xfd00), ("vg-lv_mimage_0".into(), 0xfd01), ("x".into(), (259 << 8) | 3)]
        );
        assert!(parse_name_list(&name_list(&[])).is_empty(), "no devices");
        assert!(parse_name_list(&[]).is_empty());
        // A truncated area ends the list instead of reading past it.
        assert_eq!(parse_name_list(&d[..20]).len(), 1);
    }

    #[test]
    fn tables() {
        let mirror = "userspace 3 LVM-ulogexample0001 clustered-core 1024 2 7:0 0 7:1 0 1 handle_errors";
        let d = targets(&[("linear", "7:2 0"), ("mirror", mirror)]);
        let t = parse_targets(&d, 2);
        assert_eq!(t, vec![("linear".into(), "7:2 0".into()), ("mirror".into(), mirror.into())]);
        assert_eq!(userspace_log_uuid(&t[1].1), Some("LVM-ulogexample0001"));
        assert_eq!(parse_targets(&d, 1).len(), 1);
        assert_eq!(parse_targets(&d[..30], 2).len(), 0, "truncated spec");
        // integrated_flush comes after the uuid; core/disk logs are not ours.
        assert_eq!(
            userspace_log_uuid("userspace 4 LVM-x integrated_flush clustered-core 1024 2 7:0 0 7:1 0"),
            Some("LVM-x")
        );
        assert_eq!(userspace_log_uuid("core 2 1024 nosync 2 7:0 0 7:1 0"), None);
        assert_eq!(userspace_log_uuid("disk 2 7:3 1024 2 7:0 0 7:1 0"), None);
        assert_eq!(userspace_log_uuid("userspace"), None);
        assert_eq!(userspace_log_uuid("userspace x LVM-x"), None);
    }

    #[test]
    fn mirror_legs_from_table_parameters() {
        let leg = |major, minor| DevNum { major, minor };
        // The forms protocol.md §5 and the VM show: core, disk (the log device is not a leg),
        // integrated_flush (counted in argc), nosync, features after the legs.
        assert_eq!(
            userspace_mirror_legs("userspace 3 LVM-a clustered-core 1024 2 7:0 0 7:1 0 1 handle_errors"),
            Some(vec![leg(7, 0), leg(7, 1)])
        );
        assert_eq!(
            userspace_mirror_legs("userspace 4 LVM-a clustered-disk 7:2 1024 2 7:0 0 253:3 2048"),
            Some(vec![leg(7, 0), leg(253, 3)])
        );
        assert_eq!(
            userspace_mirror_legs("userspace 5 LVM-a integrated_flush clustered-disk 7:2 1024 3 7:0 0 7:1 0 7:4 8"),
            Some(vec![leg(7, 0), leg(7, 1), leg(7, 4)])
        );
        assert_eq!(
            userspace_mirror_legs("userspace 4 LVM-a clustered-core 1024 nosync 2 7:0 0 7:1 0"),
            Some(vec![leg(7, 0), leg(7, 1)])
        );
        // Not that shape: another log type, truncated, a path instead of maj:min, no legs.
        assert_eq!(userspace_mirror_legs("core 2 1024 nosync 2 7:0 0 7:1 0"), None);
        assert_eq!(userspace_mirror_legs("userspace 3 LVM-a clustered-core 1024 2 7:0 0 7:1"), None);
        assert_eq!(userspace_mirror_legs("userspace 3 LVM-a clustered-core 1024 2 /dev/loop0 0 7:1 0"), None);
        assert_eq!(userspace_mirror_legs("userspace 3 LVM-a clustered-core 1024 0"), None);
        assert_eq!(userspace_mirror_legs("userspace 9 LVM-a clustered-core 1024 2 7:0 0 7:1 0"), None);
    }

    #[test]
    fn device_numbers() {
        let d = DevNum::parse("253:17").unwrap();
        assert_eq!(d, DevNum { major: 253, minor: 17 });
        assert_eq!(d.to_string(), "253:17");
        assert_eq!(DevNum::from_dev_t(d.dev_t()), d);
        // Minors above 255 use the split encoding (huge_encode_dev).
        let big = DevNum { major: 259, minor: 300 };
        assert_eq!(DevNum::from_dev_t(big.dev_t()), big);
        assert_eq!(DevNum::parse("7"), None);
        assert_eq!(DevNum::parse("a:1"), None);
    }

    #[test]
    fn ioctl_numbers() {
        // _IOWR(0xfd, 2, struct dm_ioctl) and _IOWR(0xfd, 12, ...), as in linux/dm-ioctl.h.
        assert_eq!(DM_LIST_DEVICES, 0xc138_fd02);
        assert_eq!(DM_TABLE_STATUS, 0xc138_fd0c);
        assert_eq!(DM_DEV_SUSPEND, 0xc138_fd06);
        assert_eq!(DM_DEV_STATUS, 0xc138_fd07);
    }

    #[test]
    fn without_device_mapper_the_control_node_fails_cleanly() {
        let e = Control::open(Path::new("/nonexistent/mapper/control")).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
