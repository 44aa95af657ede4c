//! `Legs`: the mirror legs of one log, and flushing their volatile write caches before the
//! log writes clean bits.
//!
//! Why: a clean bit on disk says "this region is the same on every leg". dm-raid1 clears a
//! region once its writes *completed*, which for a leg with a volatile write cache means "in the
//! cache". The kernel's own disk log therefore flushes the legs before every write that sets
//! clean bits: dm-log.c `disk_flush` calls `flush_callback_fn` (dm-raid1's `mirror_flush`, an
//! empty `REQ_PREFLUSH` bio to every leg, passed to `dm_dirty_log_create` by `mirror_ctr`) when
//! `touched_cleaned` is set, and only then writes. The userspace log gets no such callback (the
//! kernel never calls it for a userspace log), and cmirrord writes clean bits with no flush at
//! all, so after a power loss a region could read as in sync while its legs differ. ulog closes
//! that gap the way dm-log.c does, from the log's persister thread:
//!
//! * **Which legs**: the table of every dm device whose `mirror` target names this log's uuid
//!   (`userspace <argc> <uuid> ...`), live and inactive (during a reload both name the uuid,
//!   possibly with different legs: all are flushed), leg devices as `maj:min` ([`crate::region_log::dm`]).
//!   Looked up at every RESUME. Nothing can change them in between: a table reload constructs
//!   a new log (CTR, then RESUME), and a leg device that is itself reloaded keeps its device
//!   number. A lookup that failed is retried before the next write that needs it.
//! * **How**: open the leg's block device node (`/dev/<DEVNAME>` from sysfs, checked against the
//!   device number) and `fdatasync` it: `blkdev_fsync` sends a `REQ_PREFLUSH` to that device
//!   only, not through the mirror, so it neither queues behind kmirrord nor waits for a log
//!   request the kernel is sending us. Legs are flushed in parallel (as `dm_io` does) and the
//!   nodes are closed again (a held open count would make the leg device busy for LVM's removal
//!   of a failed image).
//! * **No device-mapper at all** (no `/sys/class/misc/device-mapper`: the running kernel has no
//!   dm, so no kernel mirror can exist; the kernel-peer test harness): nothing to flush, and
//!   clean bits are written as before.
//! * **device-mapper present, but the lookup fails or no table names the uuid** (a control node
//!   missing from a container's /dev, an ioctl refused, a peer that is not the kernel): the legs
//!   cannot be flushed, which is treated as a failed flush (below). At a real kernel's RESUME
//!   the mirror's table is always live, so this costs nothing where the kernel is the peer.
//!
//! On failure the caller does what dm-log.c does when `flush_callback_fn` fails: every region
//! goes dirty, nothing is written as clean, and CLEARs are ignored for the rest of the log's
//! life (`DirtyLog::legs_flush_failed`).
//!
//! Limits: the flush is issued after the write's snapshot is taken, so it covers every write
//! completed before the CLEARs that snapshot carries (dm-raid1 sends a CLEAR only once the
//! region's writes completed). A MARK whose group commit carries clean-going changes pays the
//! legs' flush too, exactly where the kernel's disk log pays `mirror_flush`.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::region_log::dm::{self, Control, DevNum, Table};
use crate::region_log::store;

/// Why a log's legs could not be flushed.
#[derive(Debug, Error)]
pub enum LegError {
    /// device-mapper exists but could not be asked.
    #[error("cannot read the device-mapper tables ({control}): {source}")]
    Lookup {
        /// The control node.
        control: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// No mirror table names the log.
    #[error("no device-mapper mirror table names log {0}")]
    NoMirror(String),
    /// A leg's device node could not be opened.
    #[error("leg {dev}: cannot open {path}: {source}")]
    Open {
        /// The leg.
        dev: DevNum,
        /// The node tried.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The flush itself failed.
    #[error("leg {dev}: flush failed: {source}")]
    Flush {
        /// The leg.
        dev: DevNum,
        /// The cause.
        source: io::Error,
    },
}

impl LegError {
    /// The errno it maps to.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Lookup { source, .. } | Self::Open { source, .. } | Self::Flush { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Self::NoMirror(_) => libc::ENODEV,
        }
    }
}

/// What a lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LegLookup {
    /// The running kernel has no device-mapper: no kernel mirror exists.
    NoDeviceMapper,
    /// The legs of every table naming the log (at least one).
    Found(Vec<DevNum>),
}

/// What a flush did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Nothing to flush: no device-mapper on this host.
    NoDeviceMapper,
    /// This many legs flushed.
    Legs(usize),
}

/// Finds the legs of the log `uuid`: the union over the live and inactive tables of every dm
/// device (through the control node `control`; `misc_class` tells whether dm exists at all).
pub fn lookup(control: &Path, misc_class: &Path, uuid: &str) -> Result<LegLookup, LegError> {
    let lookup_err = |source| LegError::Lookup { control: control.to_path_buf(), source };
    if !control.exists() && !misc_class.exists() {
        return Ok(LegLookup::NoDeviceMapper);
    }
    let ctl = Control::open(control).map_err(lookup_err)?;
    let mut legs = Vec::new();
    for (_, dev) in ctl.list_devices().map_err(lookup_err)? {
        for which in [Table::Live, Table::Inactive] {
            // None: the device went away since the list.
            let Some(targets) = ctl.table(dev, which).map_err(lookup_err)? else { break };
            for (ty, params) in targets {
                if ty != "mirror" || dm::userspace_log_uuid(&params) != Some(uuid) {
                    continue;
                }
                legs.extend(dm::userspace_mirror_legs(&params).unwrap_or_default());
            }
        }
    }
    legs.sort_unstable();
    legs.dedup();
    if legs.is_empty() {
        return Err(LegError::NoMirror(uuid.to_string()));
    }
    Ok(LegLookup::Found(legs))
}

/// Flushes one block device's volatile write cache (`fdatasync` on its node: `blkdev_fsync`,
/// one `REQ_PREFLUSH` to that device).
pub fn flush_device(dev: DevNum) -> Result<(), LegError> {
    let path = store::resolve_device(&dev.to_string()).map_err(|e| LegError::Open {
        dev,
        path: PathBuf::from(format!("/sys/dev/block/{dev}")),
        source: io::Error::new(io::ErrorKind::NotFound, e.to_string()),
    })?;
    let open_err = |source| LegError::Open { dev, path: path.clone(), source };
    let file = File::options().read(true).custom_flags(libc::O_CLOEXEC).open(&path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.file_type().is_block_device() || meta.rdev() != dev.dev_t() {
        return Err(open_err(io::Error::other("not the leg's block device (the node names another device)")));
    }
    file.sync_data().map_err(|source| LegError::Flush { dev, source })
}

/// Flushes every device in `legs`, in parallel; the first error, if any.
pub fn flush_all(legs: &[DevNum]) -> Result<(), LegError> {
    match legs {
        [] => Ok(()),
        [one] => flush_device(*one),
        many => std::thread::scope(|s| {
            let handles: Vec<_> = many.iter().map(|&d| s.spawn(move || flush_device(d))).collect();
            let mut first = Ok(());
            for (h, &dev) in handles.into_iter().zip(many) {
                let r = h.join().unwrap_or_else(|_| {
                    Err(LegError::Flush { dev, source: io::Error::other("flush thread panicked") })
                });
                if first.is_ok() {
                    first = r;
                }
            }
            first
        }),
    }
}

/// The legs of one log, as its persister knows them.
#[derive(Debug)]
pub struct Legs {
    uuid: String,
    control: PathBuf,
    misc_class: PathBuf,
    known: Option<LegLookup>,
}

impl Legs {
    /// The legs of log `uuid`, looked up through the system's device-mapper.
    pub fn new(uuid: &str) -> Self {
        Self::with_paths(uuid, Path::new(dm::DM_CONTROL), Path::new(dm::DM_MISC_CLASS))
    }

    /// As [`new`](Self::new), with another control node and dm presence marker (tests).
    pub fn with_paths(uuid: &str, control: &Path, misc_class: &Path) -> Self {
        Self { uuid: uuid.to_string(), control: control.into(), misc_class: misc_class.into(), known: None }
    }

    /// Looks the legs up again (RESUME). A failure is remembered as "unknown" and retried by
    /// the next [`flush`](Self::flush).
    pub fn resolve(&mut self) -> Result<&LegLookup, LegError> {
        self.known = None;
        let found = lookup(&self.control, &self.misc_class, &self.uuid)?;
        Ok(self.known.insert(found))
    }

    /// What the last successful lookup found.
    pub fn known(&self) -> Option<&LegLookup> {
        self.known.as_ref()
    }

    /// Flushes the legs' caches (looking them up first if unknown).
    pub fn flush(&mut self) -> Result<Flushed, LegError> {
        let known = match self.known.take() {
            Some(k) => self.known.insert(k),
            None => {
                let found = lookup(&self.control, &self.misc_class, &self.uuid)?;
                self.known.insert(found)
            }
        };
        match known {
            LegLookup::NoDeviceMapper => Ok(Flushed::NoDeviceMapper),
            LegLookup::Found(legs) => flush_all(legs).map(|()| Flushed::Legs(legs.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_device_mapper_there_is_nothing_to_flush() {
        let mut legs = Legs::with_paths("LVM-x", Path::new("/nonexistent/control"), Path::new("/nonexistent/misc"));
        assert_eq!(legs.resolve().unwrap(), &LegLookup::NoDeviceMapper);
        assert_eq!(legs.flush().unwrap(), Flushed::NoDeviceMapper);
    }

    #[test]
    fn device_mapper_present_but_unreachable_is_a_failure() {
        // dm exists in the kernel (its misc class is present; any existing path stands for it)
        // but the control node is missing here: the legs cannot be flushed.
        let misc = std::env::temp_dir();
        let mut legs = Legs::with_paths("LVM-x", Path::new("/nonexistent/control"), &misc);
        let e = legs.resolve().unwrap_err();
        assert!(matches!(e, LegError::Lookup { .. }), "{e}");
        assert_eq!(e.errno(), libc::ENOENT);
        assert!(legs.known().is_none());
        assert!(matches!(legs.flush(), Err(LegError::Lookup { .. })), "retried, and still failing");
    }

    /// Flush requests completed by a block device: field 16 of its `stat` file
    /// (Documentation/block/stat.rst).
    fn flushes_completed(name: &str) -> u64 {
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
        stat.split_ascii_whitespace().nth(15).unwrap().parse().unwrap()
    }

    /// The kernel side of `mirror_flush`: one REQ_PREFLUSH reaches the leg device itself. A
    /// loop device (root; loop devices work on the development machine) counts it in its
    /// `stat`; a device number with no device fails to open, and that is a flush failure.
    #[test]
    fn a_leg_flush_reaches_the_device_and_a_missing_leg_fails() {
        use std::process::Command;
        let dir = std::env::temp_dir().join(format!("ulog-legs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("leg.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&img).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let node = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let name = node.trim_start_matches("/dev/").to_string();
        let dev = DevNum::parse(std::fs::read_to_string(format!("/sys/block/{name}/dev")).unwrap().trim()).unwrap();
        let before = flushes_completed(&name);
        let flushed = flush_all(&[dev, dev]);
        let after = flushes_completed(&name);
        let none = DevNum { major: 7, minor: 1_000_000 };
        let with_missing = flush_all(&[dev, none]);
        let _ = Command::new("losetup").arg("-d").arg(&node).status();
        let _ = std::fs::remove_dir_all(&dir);
        flushed.unwrap();
        assert!(after >= before + 2, "two flushes reached {node}: {before} -> {after}");
        assert!(matches!(flush_device(none), Err(LegError::Open { .. })));
        assert!(matches!(with_missing, Err(LegError::Open { dev: d, .. }) if d == none), "{with_missing:?}");
    }
}
