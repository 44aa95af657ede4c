//! `LogDevice`: where a persistent log's image lives (a block device, or a regular file in the
//! state directory or given by a test), and the durable writes to it.
//!
//! Durability: every write is a `pwritev2(RWF_DSYNC)`. On a block device opened `O_DIRECT`
//! that is one I/O with FUA (or the write followed by a cache flush where the device has no FUA),
//! so when it returns the bits are on stable storage, with nothing of ours left in the page
//! cache. `O_DIRECT` on block devices also keeps us coherent with the kernel's own `disk` log,
//! which bypasses the page cache: a device written by one is read correctly by the other.
//! Regular files use buffered I/O with the same per-write `RWF_DSYNC` (data and the metadata
//! needed to read it back), because O_DIRECT alignment rules differ per filesystem.
//! Kernels without `pwritev2` (before 4.7) fall back to `pwrite` + `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::region_log::disk_format;

/// Why a log device could not be used.
#[derive(Debug, Error)]
pub enum StoreError {
    /// `major:minor` names no block device.
    #[error("no block device {0}")]
    NoSuchDevice(String),
    /// open / stat / ioctl failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Neither a block device nor a regular file.
    #[error("{0}: not a block device or regular file")]
    NotABlockDevice(PathBuf),
    /// Smaller than the image the log needs.
    #[error("{path}: {have} bytes, the log needs {need}")]
    TooSmall {
        /// The path.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The image size.
        need: u64,
    },
}

impl StoreError {
    /// The errno the kernel gets back for a CTR that fails this way.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NoSuchDevice(_) => libc::ENODEV,
            Self::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Self::NotABlockDevice(_) => libc::ENOTBLK,
            Self::TooSmall { .. } => libc::EINVAL,
        }
    }
}

/// A page-aligned, zeroed byte buffer (what `O_DIRECT` needs).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

const ALIGN: usize = 4096;

impl AlignedBuf {
    /// `len` zero bytes aligned to 4096 (`len` rounded up to 4096; at least one page).
    pub fn zeroed(len: usize) -> io::Result<Self> {
        let len = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = std::alloc::Layout::from_size_align(len, ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Self { ptr, len })
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe {
            std::alloc::dealloc(self.ptr.as_ptr(), std::alloc::Layout::from_size_align_unchecked(self.len, ALIGN))
        }
    }
}

/// Identity of a log device: its device number for a block device, (filesystem, inode) for a
/// regular file, so two paths to one device are one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKey {
    /// A block device (`st_rdev`).
    Block(u64),
    /// A regular file (`st_dev`, `st_ino`).
    File(u64, u64),
}

/// An open log device.
#[derive(Debug)]
pub struct LogDevice {
    file: File,
    path: PathBuf,
    /// Which device this is.
    pub key: DeviceKey,
    /// A state file created (or grown) without waiting for stable storage, and its directory:
    /// [`LogDevice::settle_creation`] makes that durable on the log's I/O thread, so a CTR
    /// never waits for an fsync on the receive thread.
    unsettled: Option<PathBuf>,
    /// Bytes of image on this device (header + bitmap rounded to its logical block size).
    image_len: usize,
    /// `major:minor` for STATUS_INFO (0:0 for a regular file).
    pub dev: (u32, u32),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Resolves a table's device argument: a path, or `major:minor` (looked up through sysfs, so
/// any block device works, not only /dev/mapper ones as in cmirrord).
pub fn resolve_device(arg: &str) -> Result<PathBuf, StoreError> {
    let is_majmin = arg
        .split_once(':')
        .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()));
    if !is_majmin {
        return Ok(PathBuf::from(arg));
    }
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{arg}/uevent"))
        .map_err(|_| StoreError::NoSuchDevice(arg.to_string()))?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(|name| Path::new("/dev").join(name))
        .ok_or_else(|| StoreError::NoSuchDevice(arg.to_string()))
}

const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl LogDevice {
    /// Opens the log device of a `clustered-disk` log for `region_count` regions.
    pub fn open(path: &Path, region_count: u64) -> Result<Self, StoreError> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        let ft = meta.file_type();
        if ft.is_block_device() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
                .open(path)
                .map_err(io_err(path))?;
            let mut lbs: libc::c_int = 0;
            let mut size: u64 = 0;
            // SAFETY: both ioctls write one value of the given type through the pointer.
            let ok = unsafe {
                libc::ioctl(file.as_raw_fd(), BLKSSZGET as _, &mut lbs) == 0
                    && libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size) == 0
            };
            if !ok {
                return Err(io_err(path)(io::Error::last_os_error()));
            }
            let lbs = usize::try_from(lbs).ok().filter(|b| b.is_power_of_two() && *b <= 4096).unwrap_or(4096);
            let image_len = disk_format::image_len(region_count, lbs);
            if size < image_len as u64 {
                return Err(StoreError::TooSmall { path: path.into(), have: size, need: image_len as u64 });
            }
            let rdev = meta.rdev();
            let dev = (libc::major(rdev), libc::minor(rdev));
            Ok(Self { file, path: path.into(), key: DeviceKey::Block(rdev), unsettled: None, image_len, dev })
        } else if ft.is_file() {
            let image_len = disk_format::image_len(region_count, 512);
            if meta.len() < image_len as u64 {
                return Err(StoreError::TooSmall { path: path.into(), have: meta.len(), need: image_len as u64 });
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(io_err(path))?;
            let key = DeviceKey::File(meta.dev(), meta.ino());
            Ok(Self { file, path: path.into(), key, unsettled: None, image_len, dev: (0, 0) })
        } else {
            Err(StoreError::NotABlockDevice(path.into()))
        }
    }

    /// Opens (creating or growing it if needed) the state file of a `clustered-core` log. What
    /// that changed is not yet durable: the log's I/O thread calls
    /// [`LogDevice::settle_creation`] before it first loads the file. (The CTR runs on the
    /// receive thread, which serves every log: it must not wait for an fsync of the file and
    /// of its directory, which on a busy filesystem can take seconds.)
    pub fn open_state_file(path: &Path, region_count: u64) -> Result<Self, StoreError> {
        let need = disk_format::image_len(region_count, 512) as u64;
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let grown = len < need;
        if grown {
            file.set_len(need).map_err(io_err(path))?;
        }
        drop(file);
        let mut dev = Self::open(path, region_count)?;
        if grown || !existed {
            dev.unsettled = Some(path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf));
        }
        Ok(dev)
    }

    /// Makes a state file's creation or growth durable (the file, then its directory entry).
    /// Nothing to do for a device or an unchanged file; done once.
    pub fn settle_creation(&mut self) -> io::Result<()> {
        let Some(dir) = self.unsettled.take() else { return Ok(()) };
        let r = self.file.sync_all().and_then(|()| File::open(&dir)?.sync_all());
        if r.is_err() {
            self.unsettled = Some(dir);
        }
        r
    }

    /// The device's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of image on the device.
    pub fn image_len(&self) -> usize {
        self.image_len
    }

    /// Reads the image into `buf` (at least `image_len` long).
    pub fn read_image(&self, buf: &mut AlignedBuf) -> io::Result<()> {
        let len = self.image_len;
        let mut done = 0;
        while done < len {
            // SAFETY: the destination range lies inside buf.
            let n = unsafe {
                libc::pread(self.file.as_raw_fd(), buf[done..].as_mut_ptr().cast(), len - done, done as libc::off_t)
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read of the log image")),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes `buf[offset..offset + len]` (clamped to the image) durably. `offset` and `len`
    /// are multiples of 4096 except at the image's end, which is a multiple of the block size.
    pub fn write_durable(&self, buf: &AlignedBuf, offset: usize, len: usize) -> io::Result<()> {
        let end = (offset + len).min(self.image_len);
        let mut at = offset;
        while at < end {
            let iov = libc::iovec { iov_base: buf[at..end].as_ptr() as *mut _, iov_len: end - at };
            // SAFETY: iov describes initialised memory inside buf that outlives the call.
            let n = unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, at as libc::off_t, libc::RWF_DSYNC) };
            if n > 0 {
                at += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => return self.write_then_sync(buf, at, end),
                _ if n == 0 => return Err(io::Error::new(io::ErrorKind::WriteZero, "log device accepted no bytes")),
                _ => return Err(e),
            }
        }
        Ok(())
    }

    fn write_then_sync(&self, buf: &AlignedBuf, at: usize, end: usize) -> io::Result<()> {
        self.write_plain(buf, at, end - at)?;
        self.sync_data()
    }

    /// Writes `buf[offset..offset + len]` (clamped to the image) without waiting for stable
    /// storage: callers follow a batch of these with one [`sync_data`](Self::sync_data).
    pub fn write_plain(&self, buf: &AlignedBuf, offset: usize, len: usize) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = (offset + len).min(self.image_len);
        let mut at = offset;
        while at < end {
            let n = self.file.write_at(&buf[at..end], at as u64)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "log device accepted no bytes"));
            }
            at += n;
        }
        Ok(())
    }

    /// `fdatasync`: everything written so far is on stable storage (on a block device this
    /// also flushes the device's volatile cache).
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// The state-file name for a uuid: bytes outside `[A-Za-z0-9._-]` are %-escaped, so any dm
/// uuid maps to one flat, reversible file name.
pub fn state_file_name(uuid: &[u8]) -> String {
    let mut s = String::with_capacity(uuid.len() + 5);
    for &c in uuid {
        if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || (c == b'.' && !s.is_empty()) {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s.push_str(".ulog");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_names_are_flat_and_distinct() {
        assert_eq!(state_file_name(b"LVM-abc_1.x"), "LVM-abc_1.x.ulog");
        assert_eq!(state_file_name(b"a/b"), "a%2Fb.ulog");
        assert_eq!(state_file_name(b".."), "%2E..ulog");
        assert_ne!(state_file_name(b"a%2F"), state_file_name(b"a/"));
    }

    #[test]
    fn majmin_resolution() {
        assert_eq!(resolve_device("/dev/loop2").unwrap(), PathBuf::from("/dev/loop2"));
        assert!(matches!(resolve_device("4095:1048575"), Err(StoreError::NoSuchDevice(_))));
        assert_eq!(resolve_device("7:").unwrap(), PathBuf::from("7:"));
    }

    #[test]
    fn file_round_trip_and_size_check() {
        let dir = std::env::temp_dir().join(format!("ulog-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(state_file_name(b"u"));
        let _ = std::fs::remove_file(&p);
        let dev = LogDevice::open_state_file(&p, 100_000).unwrap();
        assert_eq!(dev.image_len(), disk_format::image_len(100_000, 512));
        let mut buf = AlignedBuf::zeroed(dev.image_len()).unwrap();
        buf[1024..1028].copy_from_slice(&[1, 2, 3, 4]);
        dev.write_durable(&buf, 0, 4096).unwrap();
        let mut back = AlignedBuf::zeroed(dev.image_len()).unwrap();
        dev.read_image(&mut back).unwrap();
        assert_eq!(&back[1024..1028], &[1, 2, 3, 4]);
        let small = dir.join("small");
        std::fs::write(&small, [0u8; 100]).unwrap();
        assert!(matches!(LogDevice::open(&small, 10), Err(StoreError::TooSmall { need: 1536, .. })));
        assert!(matches!(LogDevice::open(&dir, 10), Err(StoreError::NotABlockDevice(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
