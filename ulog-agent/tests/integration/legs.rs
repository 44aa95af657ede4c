//! The mirror legs' flush before clean bits are written (dm-log.c `disk_flush` calls
//! `flush_callback_fn`, dm-raid1's `mirror_flush`, whenever `touched_cleaned`), seen through a
//! real disk log file. There is no device-mapper on the development machine, so every other
//! test here runs the "no device-mapper at all" case (nothing to flush, clean bits written as
//! before: e.g. `persistence::postsuspend_writes_the_clean_regions`). This file makes
//! device-mapper *look* present to the agent (its misc class in sysfs) while it has no control
//! node: the legs cannot be looked up, so they cannot be flushed, and the agent must do what
//! the kernel does when the legs' flush fails. A successful flush of real legs is the VM
//! scenario `ulog-leg-flush`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;

/// Gives the calling thread a private mount namespace in which `/sys/class/misc` is a tmpfs
/// holding an empty `device-mapper` directory: to an agent spawned from this thread, the kernel
/// has device-mapper, and `/dev/mapper/control` is still missing (as in a container whose /dev
/// lacks it).
fn pretend_device_mapper_without_control_node() {
    assert!(!Path::new("/dev/mapper/control").exists(), "this test needs a host without device-mapper");
    // SAFETY: unshare/mount with constant, NUL-terminated arguments; affects this thread only.
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error());
        let none = c"none".as_ptr();
        let root = c"/".as_ptr();
        assert_eq!(libc::mount(none, root, std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()), 0);
        let misc = c"/sys/class/misc".as_ptr();
        assert_eq!(libc::mount(c"tmpfs".as_ptr(), misc, c"tmpfs".as_ptr(), 0, std::ptr::null()), 0, "mount tmpfs");
    }
    std::fs::create_dir("/sys/class/misc/device-mapper").unwrap();
}

fn disk_ctr(path: &Path) -> String {
    format!("100 clustered-disk {} 8", path.display())
}

/// Polls the device until its bitmap reads `want` (the lazy write of clean-going changes is the
/// I/O thread's), or 5 s pass; returns the last map read.
fn wait_map(disk: &Path, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let map = DiskLog::read(disk).map(N);
        if map == want || Instant::now() > deadline {
            return map;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// dm-log.c `disk_flush`, `flush_callback_fn` failing: "it is impossible to determine which
/// regions are clean and which are dirty", so `flush_failed = 1`, every region's clean bit is
/// cleared and the log written so (no clean bit reaches the disk); `core_clear_region` ignores
/// every later clear. MARK keeps working (a write that sets no clean bit needs no leg flush).
/// Old code: the CLEAR's lazy write puts region 4's clean bit on the device (`1111101111111`).
#[test]
fn when_the_legs_cannot_be_flushed_no_clean_bit_is_written_and_clears_are_ignored() {
    pretend_device_mapper_without_control_node();
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    write_head(&disk, &image(MAGIC, N, |_| true));
    let log = Log::nth(0);
    a.create(&log, &disk_ctr(&disk));
    a.mark(&log, &[4, 5]);
    assert_eq!(DiskLog::read(&disk).map(N), "1111001111111", "marks are written without a leg flush");
    // Region 4's writes completed: CLEAR + FLUSH, and the lazy write that carries the clean bit.
    a.clear(&log, &[4]);
    a.flush(&log, &[]);
    let all_dirty = "0".repeat(N as usize);
    assert_eq!(wait_map(&disk, &all_dirty), all_dirty, "the legs could not be flushed: every region written dirty");
    DiskLog::read(&disk).assert_header(N);
    assert!(!a.is_clean(&log, 4) && !a.is_clean(&log, 0), "every region dirty in memory too");
    assert!(a.in_sync(&log, 0), "sync bits untouched (the kernel clears only clean bits)");
    // From now on CLEAR is ignored: nothing becomes clean, on disk or in memory.
    a.clear(&log, &[0, 1, 2]);
    a.flush(&log, &[]);
    assert!(!a.is_clean(&log, 1));
    a.mark(&log, &[7]);
    a.ok(&log, T::Presuspend, &[]);
    a.ok(&log, T::Postsuspend, &[]);
    assert_eq!(DiskLog::read(&disk).map(N), all_dirty, "still no clean bit after POSTSUSPEND");
    // A resume reads the all-dirty log: every region is resynchronised; the failure stays.
    a.resume(&log);
    assert_eq!(a.sync_count(&log), 0);
    a.recover(&log, 3);
    a.clear(&log, &[3]);
    assert!(!a.is_clean(&log, 3), "clears stay ignored after a resume (only a new log resets it)");
    assert_eq!(
        String::from_utf8(a.ok(&log, T::StatusInfo, &[])).unwrap(),
        "3 clustered-disk 0:0 A\0",
        "the log device itself is fine"
    );
}
