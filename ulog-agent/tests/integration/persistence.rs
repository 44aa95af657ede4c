//! Persistence: the on-disk log format written and read at the first RESUME, MARK and FLUSH
//! durability, POSTSUSPEND and SIGTERM flushing, failed writes, agent restarts (kill -9) with core
//! logs in a state directory and disk logs on a regular file and on a loop device, which loads may
//! use a state file, and two logs of one uuid on one device.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ulog_agent::wire::kernel_peer::AgentOutput;

use crate::common::*;

fn disk_ctr(path: &Path, extra: &str) -> String {
    format!("100 clustered-disk {} 8{extra}", path.display())
}

/// A 64 KiB log device file holding `img` at its start.
fn device_with(dir: &TempDir, img: &[u8]) -> PathBuf {
    let p = zero_file(&dir.join("disk"), 65536);
    write_head(&p, img);
    p
}

#[test]
fn first_resume_initialises_a_blank_device() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let log = Log::nth(0);
    a.ctr_ok(&log, &disk_ctr(&disk, ""));
    a.resume(&log);
    let img = DiskLog::read(&disk);
    img.assert_header(N);
    assert_eq!(img.map(N), "0000000000000");
    assert_eq!(a.sync_count(&log), 0, "no valid log: everything out of sync");
    assert_eq!(a.resync_work(&log), (1, 0));
}

#[test]
fn first_resume_with_nosync_records_every_region_in_sync() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let log = Log::nth(0);
    a.create(&log, &disk_ctr(&disk, " nosync"));
    let img = DiskLog::read(&disk);
    img.assert_header(N);
    assert_eq!(img.map(N), "1111111111111");
    assert_eq!(a.sync_count(&log), N);
}

#[test]
fn first_resume_loads_a_valid_log() {
    let mut a = Agent::start();
    let clean = |r: u64| [0, 2, 5, 6, 7, 12].contains(&r);
    let disk = device_with(&a.dir, &image(MAGIC, N, clean));
    let log = Log::nth(0);
    let name = a.ctr_ok(&log, &disk_ctr(&disk, ""));
    assert_eq!(name, format!("{}\0", disk.display()).into_bytes());
    a.resume(&log);
    assert_eq!(a.sync_map(&log, N), "1010011100001");
    assert_eq!(a.sync_count(&log), 6);
    assert_eq!(a.resync_work(&log), (1, 1));
    assert_eq!(a.remote_recovering(&log, 9), (0, N - 1));
    let img = DiskLog::read(&disk);
    img.assert_header(N);
    assert_eq!(img.map(N), "1010011100001", "written back unchanged");
}

#[test]
fn regions_beyond_the_recorded_count_are_out_of_sync() {
    let mut a = Agent::start();
    // The device describes an 8-region log, all clean; the table now has 13 regions.
    let disk = device_with(&a.dir, &image(MAGIC, 8, |_| true));
    let log = Log::nth(0);
    a.create(&log, &disk_ctr(&disk, ""));
    assert_eq!(a.sync_map(&log, N), "1111111100000");
    let img = DiskLog::read(&disk);
    img.assert_header(N);
    assert_eq!(img.map(N), "1111111100000");
}

#[test]
fn bad_magic_or_a_sync_keyword_discards_the_recorded_state() {
    for (extra, magic, want) in [
        ("", 0x1234_5678, "0000000000000"),
        ("", MAGIC.swap_bytes(), "0000000000000"),
        (" sync", MAGIC, "0000000000000"),
        (" sync block_on_error", MAGIC, "0000000000000"),
        (" nosync", MAGIC, "1111111111111"),
    ] {
        let mut a = Agent::start();
        // Half the regions recorded clean.
        let disk = device_with(&a.dir, &image(magic, N, |r| r % 2 == 0));
        let log = Log::nth(0);
        a.create(&log, &disk_ctr(&disk, extra));
        assert_eq!(a.sync_map(&log, N), want, "ctr extra {extra:?}, magic {magic:#x}");
        let img = DiskLog::read(&disk);
        img.assert_header(N);
        assert_eq!(img.map(N), want, "rewritten: ctr extra {extra:?}, magic {magic:#x}");
    }
}

#[test]
fn mark_and_integrated_flush_are_durable_when_answered() {
    let mut a = Agent::start();
    let disk = device_with(&a.dir, &image(MAGIC, N, |_| true));
    let log = Log::nth(0);
    a.create(&log, &disk_ctr(&disk, ""));
    assert_eq!(DiskLog::read(&disk).map(N), "1111111111111");
    a.mark(&log, &[3, 9]);
    assert_eq!(DiskLog::read(&disk).map(N), "1110111110111", "MARK answered only once on the device");
    a.flush(&log, &[11]);
    assert_eq!(DiskLog::read(&disk).map(N), "1110111110101", "integrated FLUSH");
    a.mark(&log, &[0]);
    a.flush(&log, &[]);
    assert_eq!(DiskLog::read(&disk).map(N), "0110111110101", "FLUSH");
    // A region leaving sync becomes dirty on the device at the latest at the next FLUSH.
    a.set_sync(&log, 12, 0);
    a.flush(&log, &[]);
    assert_eq!(DiskLog::read(&disk).map(N), "0110111110100");
}

#[test]
fn flush_covers_marks_still_in_flight() {
    let mut a = Agent::start();
    let disk = device_with(&a.dir, &image(MAGIC, N, |_| true));
    let log = Log::nth(0);
    a.create(&log, &disk_ctr(&disk, ""));
    // MARK and FLUSH sent back to back; once the FLUSH is answered the MARK is on the device,
    // whichever reply comes first.
    let mark = a.peer.send(&Request::new(T::MarkRegion, &log.uuid, log.luid, regions_payload(&[1, 7]))).unwrap();
    let flush = a.peer.send(&Request::new(T::Flush, &log.uuid, log.luid, vec![])).unwrap();
    let r = a.peer.wait_reply(flush, Duration::from_secs(5)).unwrap();
    assert_eq!(r.error, 0, "{r}");
    assert_eq!(DiskLog::read(&disk).map(N), "1011111011111", "FLUSH answered before the earlier MARK was durable");
    assert_eq!(a.peer.wait_reply(mark, Duration::from_secs(5)).unwrap().error, 0);
}

#[test]
fn postsuspend_writes_the_clean_regions() {
    let mut a = Agent::start();
    let disk = device_with(&a.dir, &image(MAGIC, N, |_| true));
    let log = Log::nth(0);
    a.create(&log, &disk_ctr(&disk, ""));
    a.mark(&log, &[4, 5]);
    assert_eq!(DiskLog::read(&disk).map(N), "1111001111111");
    a.clear(&log, &[4]);
    a.ok(&log, T::Presuspend, &[]);
    a.ok(&log, T::Postsuspend, &[]);
    assert_eq!(DiskLog::read(&disk).map(N), "1111101111111", "the clear is on the device after POSTSUSPEND");
}

/// What a restarted log must remember.
const BEFORE_KILL: &str = "1111101110111";

/// Brings a log into a known state, then MARKs region 5 without a FLUSH and kills the agent.
/// Afterwards region 5 (marked) and 9 (out of sync) must be out of sync, the rest in sync.
fn restart_scenario(a: &mut Agent, ctr: &str, disk: Option<&Path>) {
    let log = Log::nth(0);
    a.create(&log, ctr);
    for r in 0..N {
        a.recover(&log, r);
    }
    a.set_sync(&log, 9, 0);
    a.suspend(&log); // everything durable
    a.resume(&log);
    assert_eq!(a.sync_map(&log, N), "1111111110111");
    a.mark(&log, &[5]);
    if let Some(d) = disk {
        assert_eq!(DiskLog::read(d).map(N), BEFORE_KILL, "the MARK is on the device before it is answered");
    }
    a.restart_after_kill9();
    let r = a.request(&Request::ctr_reconnect(&log.uuid, log.luid, ctr));
    assert_eq!(r.error, 0, "reconnect CTR after the restart: {r}");
    a.resume(&log);
    assert_eq!(
        a.sync_map(&log, N),
        BEFORE_KILL,
        "after kill -9: the MARKed region 5 and the out-of-sync region 9 need a resync, the rest not"
    );
    assert_eq!(a.sync_count(&log), N - 2);
    assert_eq!(a.resync_work(&log), (1, 5));
    assert_eq!(a.remote_recovering(&log, 7), (0, N - 1));
    // And the restarted log works.
    a.set_sync(&log, 5, 1);
    assert_eq!(a.resync_work(&log), (1, 9));
}

/// The agent dies while the kernel waits for its answer to an IN_SYNC; the kernel resends it
/// after 15 s to the new agent, which does not know the log yet. What the kernel (6.1) does:
/// on -ESRCH it reconnects (CTR in the reconnect form, RESUME) and resends the IN_SYNC with a
/// reply capacity of 0, so that answer is lost ("Insufficient space"), it takes the region as
/// not in sync and writes it to its default leg only. The log must then record the region out
/// of sync (and not clean, on disk), or a later crash or the final resync would leave the legs
/// different in a region the log calls in sync.
fn restart_with_in_sync_in_flight(a: &mut Agent, ctr: &str, disk: Option<&Path>) {
    let log = Log::nth(0);
    a.create(&log, ctr);
    for r in 0..N {
        a.recover(&log, r);
    }
    a.suspend(&log); // everything durable
    a.resume(&log);
    a.restart_after_kill9();
    // The resent IN_SYNC (the kernel's retry after its 15 s timeout), and another for a
    // region out of range, which the re-created log must ignore.
    a.expect_err(&log, T::InSync, &7u64.to_ne_bytes(), ESRCH, "unknown log: make the kernel reconnect");
    a.expect_err(&log, T::InSync, &(N + 3).to_ne_bytes(), ESRCH, "unknown log, region out of range");
    a.expect_err(&log, T::MarkRegion, &regions_payload(&[2]), ESRCH, "unknown log");
    let r = a.request(&Request::ctr_reconnect(&log.uuid, log.luid, ctr));
    assert_eq!((r.error, r.payload.len()), (0, 0), "reconnect CTR after the restart: {r}");
    a.resume(&log);
    // The kernel retries the IN_SYNC with no room for the answer: it reads an error.
    let r = a.request(
        &Request::new(T::InSync, &log.uuid, log.luid, 7u64.to_ne_bytes().to_vec()).capacity(Capacity::Bytes(0)),
    );
    assert_ne!(r.error, 0, "the retried IN_SYNC has no room for its answer: {r}");
    assert_eq!(a.sync_map(&log, N), "1111111011111", "region 7 went to one leg only: out of sync");
    assert_eq!(a.resync_work(&log), (1, 7));
    if let Some(d) = disk {
        assert_eq!(DiskLog::read(d).map(N), "1111111011111", "the device says region 7 needs a resync");
    }
    // The MARK that was answered -ESRCH is resent after the reconnect and served.
    a.mark(&log, &[2]);
    a.clear(&log, &[2]);
    // Once resynchronised, the region is in sync again, also after a suspend/resume (which
    // reloads a persistent log from its device): the note was applied once, not kept.
    a.recover(&log, 7);
    a.suspend(&log);
    a.resume(&log);
    assert_eq!(a.sync_map(&log, N), "1".repeat(N as usize));
}

#[test]
fn restart_with_in_sync_in_flight_core_log_in_state_dir() {
    let mut a = Agent::start_with(Core::StateDir);
    restart_with_in_sync_in_flight(&mut a, CORE, None);
}

#[test]
fn restart_with_in_sync_in_flight_disk_log() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    restart_with_in_sync_in_flight(&mut a, &disk_ctr(&disk, ""), Some(&disk));
}

#[test]
fn restart_with_in_sync_in_flight_nosync_core_log_in_memory() {
    // A fresh in-memory `nosync` log would call every region in sync: region 7 must not be.
    let mut a = Agent::start();
    let log = Log::nth(0);
    let ctr = "100 clustered-core 8 nosync";
    a.create(&log, ctr);
    a.restart_after_kill9();
    a.expect_err(&log, T::InSync, &7u64.to_ne_bytes(), ESRCH, "unknown log");
    a.request(&Request::ctr_reconnect(&log.uuid, log.luid, ctr));
    a.resume(&log);
    assert_eq!(a.sync_map(&log, N), "1111111011111");
    assert_eq!(a.sync_count(&log), N - 1);
}

#[test]
fn restart_core_log_in_state_dir() {
    let mut a = Agent::start_with(Core::StateDir);
    restart_scenario(&mut a, CORE, None);
}

#[test]
fn restart_disk_log_on_a_regular_file() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    restart_scenario(&mut a, &disk_ctr(&disk, ""), Some(&disk));
}

#[test]
fn restart_disk_log_on_a_loop_device() {
    let mut a = Agent::start();
    let file = zero_file(&a.dir.join("backing"), 1 << 20);
    let dev = LoopDev::attach(&file);
    let ctr = disk_ctr(&dev.dev, "");
    let log = Log::nth(9);
    let name = a.ctr_ok(&log, &ctr);
    assert_eq!(name, format!("{}\0", dev.dev.display()).into_bytes(), "CTR returns the device as given");
    a.resume(&log);
    assert_eq!(
        status_text(&a.ok(&log, T::StatusInfo, &[])),
        format!("3 clustered-disk {} A", dev.maj_min()),
        "STATUS_INFO names the loop device"
    );
    a.ok(&log, T::Dtr, &[]);
    restart_scenario(&mut a, &ctr, Some(&dev.dev));
}

#[test]
fn restart_without_state_dir_forgets_core_logs() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.set_sync(&log, 0, 1);
    a.restart_after_kill9();
    a.expect_err(&log, T::GetRegionSize, &[], EINVAL, "a new agent does not know the log before its CTR");
    let r = a.request(&Request::ctr_reconnect(&log.uuid, log.luid, CORE));
    assert_eq!(r.error, 0);
    a.resume(&log);
    assert_eq!(a.sync_count(&log), 0, "an in-memory core log starts over");
}

/// Item 11 of issue 10. The kernel never gives up on a userspace log: with no server, every
/// request sent through `userspace_do_request` (MARK, FLUSH, IN_SYNC, ...) loops in its
/// reconnect loop (CTR + RESUME every 2 s) and the mirror's writes to clean regions wait. So
/// SIGTERM while a log is live must leave the agent serving (cmirrord: "exit only if no logs
/// exist"); only the restart-style exit (the restart signal, `ulog-agent stop --restart`) stops
/// it then, after writing everything, and the next agent gets the logs back through that
/// reconnect loop (CTR in its reconnect form + RESUME).
fn sigterm_scenario(a: &mut Agent, ctr: &str, disk: Option<&Path>) {
    let log = Log::nth(0);
    a.create(&log, ctr);
    for r in [0, 1, 2, 3, 8] {
        a.recover(&log, r);
    }
    a.mark(&log, &[8]);
    a.set_sync(&log, 11, 1);
    a.mark(&log, &[11]);
    a.clear(&log, &[11]);
    // Two SIGTERMs: refused both times, explained (a warning) once.
    for _ in 0..2 {
        a.proc.terminate_refused(Duration::from_millis(700)).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(a.in_sync(&log, 8), "still answering after SIGTERM");
    assert_eq!(a.sync_count(&log), 6, "still answering after SIGTERM (regions 0-3, 8, 11)");
    let out = a.proc.output();
    let warnings = out.lines().filter(|l| l.contains("WARN") && l.contains("not exiting: logs are live")).count();
    assert_eq!(warnings, 1, "one warning saying why, then quieter lines:\n{out}");
    assert!(out.contains("ulog-agent stop --restart"), "the warning names the way out:\n{out}");
    // No FLUSH, no suspend: the restart-style exit must write it all.
    let st = a.proc.restart_exit(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "restart-style exit: exit status 0, got {st}");
    let want = "1111000000010";
    if let Some(d) = disk {
        assert_eq!(DiskLog::read(d).map(N), want, "on the device after the restart-style exit");
    }
    a.respawn();
    assert!(a.request(&Request::ctr_reconnect(&log.uuid, log.luid, ctr)).error == 0);
    a.resume(&log);
    assert_eq!(a.sync_map(&log, N), want, "after a restart-style exit and a new agent");
}

#[test]
fn sigterm_keeps_serving_disk_logs_and_restart_exit_flushes_them() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    sigterm_scenario(&mut a, &disk_ctr(&disk, ""), Some(&disk));
}

#[test]
fn sigterm_keeps_serving_core_logs_in_state_dir_and_restart_exit_flushes_them() {
    let mut a = Agent::start_with(Core::StateDir);
    sigterm_scenario(&mut a, CORE, None);
}

/// The kernel sends DTR when the mirror is removed (`userspace_dtr`); after the last one the
/// agent serves nothing and SIGTERM ends it, exit status 0.
#[test]
fn sigterm_after_the_logs_are_destroyed_exits_zero() {
    let mut a = Agent::start_with(Core::StateDir);
    let (one, two) = (Log::nth(0), Log::nth(1));
    a.create(&one, CORE);
    a.create(&two, CORE);
    a.proc.terminate_refused(Duration::from_millis(700)).unwrap_or_else(|e| panic!("{e}"));
    a.ok(&one, T::Dtr, &[]);
    a.proc.terminate_refused(Duration::from_millis(700)).unwrap_or_else(|e| panic!("one log is still live: {e}"));
    a.ok(&two, T::Postsuspend, &[]);
    a.ok(&two, T::Dtr, &[]);
    let st = a.proc.terminate(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "{st}");
}

#[test]
fn sigterm_with_no_logs_exits_zero() {
    let mut a = Agent::start();
    let st = a.proc.terminate(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "{st}");
}

/// `ulog-agent stop` finds the agent through its pid file: plain, it is SIGTERM (refused while
/// a log is live: exit status 1, the agent still serves); with `--restart`, the restart-style
/// exit (the agent exits 0 and so does `stop`). A second agent on the same run directory
/// refuses to start while the first runs.
#[test]
fn stop_subcommand() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    let run_dir = a.proc.run_dir().to_path_buf();
    let stop = |extra: &[&str]| {
        std::process::Command::new(agent_bin())
            .arg("stop")
            .args(extra)
            .env("ULOG_RUN_DIR", &run_dir)
            .output()
            .expect("run ulog-agent stop")
    };
    // `env` overrides the run directory of its own that spawn gives every agent.
    let mut second = AgentProcess::spawn_with(
        &["env", &format!("ULOG_RUN_DIR={}", run_dir.display())],
        agent_bin(),
        a.peer.port(),
        ["--no-http", "--no-probes"],
        AgentOutput::File,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let st = second.wait_exit(Duration::from_secs(10)).unwrap_or_else(|e| panic!("a second agent must refuse: {e}"));
    let err = second.output();
    assert_eq!(st.code(), Some(1), "a second agent on the same run directory must refuse to start:\n{err}");
    assert!(err.contains(&format!("another ulog-agent (pid {})", a.proc.pid())), "{err}");

    let plain = stop(&["--timeout", "1"]);
    assert_eq!(plain.status.code(), Some(1), "{plain:?}");
    assert!(String::from_utf8_lossy(&plain.stderr).contains("still running"), "{plain:?}");
    assert_eq!(a.sync_count(&log), 0, "still answering");

    let restart = stop(&["--restart"]);
    assert!(restart.status.success(), "{restart:?}");
    let st = a.proc.wait_exit(Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "{st}");
    let gone = stop(&["--restart"]);
    assert!(gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("no agent"), "{gone:?}");
}

/// A tmpfs of `kib` KiB mounted on a fresh directory, unmounted on drop (the test's way to
/// make a durable write fail for want of space).
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &TempDir, kib: u32) -> Self {
        let p = dir.join("smallfs");
        std::fs::create_dir_all(&p).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(&p)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs on {}", p.display());
        Self(p)
    }

    /// Fills the filesystem with a file until it is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = [0xAAu8; 4096];
        loop {
            match f.write_all(&chunk).and_then(|()| f.sync_data()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return p,
                Err(e) => panic!("filling {}: {e}", p.display()),
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_failing_log_device_fails_marks_shows_d_and_recovers() {
    let mut a = Agent::start();
    let fs = SmallFs::mount(&a.dir, 128);
    let disk = fs.0.join("disk");
    std::fs::write(&disk, [0u8; 16384]).unwrap();
    write_head(&disk, &image(MAGIC, N, |_| true));
    let log = Log::nth(0);
    a.create(&log, &disk_ctr(&disk, ""));
    let status = |a: &mut Agent| String::from_utf8(a.ok(&log, T::StatusInfo, &[])).unwrap();
    assert_eq!(status(&mut a), "3 clustered-disk 0:0 A\0");
    // The device loses its blocks and the filesystem fills up: the next durable write must
    // allocate and cannot.
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(0).unwrap();
    let filler = fs.fill();
    let r = a.call(&log, T::MarkRegion, &regions_payload(&[3]));
    assert_eq!(r.error, -libc::ENOSPC, "a MARK that is not durable must not be answered with success: {r}");
    assert_eq!(status(&mut a), "3 clustered-disk 0:0 D\0", "a failed write shows as D");
    assert!(!a.is_clean(&log, 3), "the mark stays applied in memory (it is retried)");
    // Space again: the next MARK writes what is still pending, region 3 included.
    std::fs::remove_file(&filler).unwrap();
    a.mark(&log, &[4]);
    assert_eq!(DiskLog::read(&disk).map(N), "1110011111111", "the failed block was written again");
    assert_eq!(status(&mut a), "3 clustered-disk 0:0 D\0", "D stays until the log is resumed");
    a.suspend(&log);
    a.resume(&log);
    assert_eq!(status(&mut a), "3 clustered-disk 0:0 A\0", "a resume that reads and writes the device clears D");
    assert!(!a.in_sync(&log, 3) && !a.in_sync(&log, 4), "regions dirty on the device are out of sync after the reload");
    assert_eq!(a.sync_count(&log), N - 2);
}

#[test]
fn marks_in_several_image_blocks_are_all_durable_when_answered() {
    // 100 000 regions: the bitmap spans four 4 KiB blocks, so one MARK of scattered regions is
    // written as several runs (plain writes, then one fdatasync).
    const REGIONS: u64 = 100_000;
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    write_head(&disk, &image(MAGIC, REGIONS, |_| true));
    let log = Log::nth(0);
    a.create(&log, &format!("{} clustered-disk {} 2", REGIONS * 2, disk.display()));
    assert_eq!(a.sync_count(&log), REGIONS);
    let marked = [0u64, 40_000, 99_999];
    a.mark(&log, &marked);
    let map = DiskLog::read(&disk).map(REGIONS);
    for r in [0u64, 1, 39_999, 40_000, 40_001, 70_000, 99_998, 99_999] {
        let want = if marked.contains(&r) { '0' } else { '1' };
        assert_eq!(map.as_bytes()[r as usize] as char, want, "region {r} on the device after the MARK reply");
    }
}

/// A state file belongs to the mirror whose logs used it. A new table with a uuid the agent has
/// no log of (LVM re-creating a core-log mirror with the LV's uuid, or on other legs) must start
/// as a new log: regions clean in the old mirror are not in sync on the new legs. The file is
/// used by the kernel's reconnect (see `restart_core_log_in_state_dir`) and by a table reload,
/// where the old log of the uuid still exists.
#[test]
fn a_new_table_does_not_inherit_the_state_file_of_an_earlier_mirror() {
    let mut a = Agent::start_with(Core::StateDir);
    let first = Log::nth(0);
    a.create(&first, CORE);
    for r in 0..N {
        a.recover(&first, r);
    }
    a.flush(&first, &[]);
    // A table reload: the new table's log loads what the old one wrote at POSTSUSPEND.
    let reloaded = Log::nth(1);
    a.ctr_ok(&reloaded, CORE);
    a.suspend(&first);
    a.resume(&reloaded);
    a.ok(&first, T::Dtr, &[]);
    assert_eq!(a.sync_count(&reloaded), N, "a reload keeps the sync state");
    // The mirror is removed; a new one with the same uuid is created.
    a.suspend(&reloaded);
    a.ok(&reloaded, T::Dtr, &[]);
    let fresh = Log::nth(2);
    a.create(&fresh, CORE);
    assert_eq!(a.sync_count(&fresh), 0, "a new mirror must resynchronise everything");
    assert_eq!(a.resync_work(&fresh), (1, 0));
    let nosync = Log::nth(3);
    a.suspend(&fresh);
    a.ok(&fresh, T::Dtr, &[]);
    a.create(&nosync, "100 clustered-core 8 nosync");
    assert_eq!(a.sync_count(&nosync), N, "a new nosync mirror is all in sync");
}

/// The kernel applies a table's `sync`/`nosync` only at a real table resume. After the agent
/// restarts, its reconnect loop (NUL-terminated CTR + RESUME) re-creates the log of a live
/// table whose region hash still holds regions dirty (it never re-marks them): the image must be
/// loaded as it is. Reproduced: `nosync`, MARK 5, FLUSH, SIGKILL, reconnect CTR + RESUME:
/// region 5 was written clean and IS_CLEAN(5) answered 1.
fn reconnect_keeps_the_image(a: &mut Agent, ctr: &str, disk: Option<&Path>) {
    let log = Log::nth(0);
    a.create(&log, ctr);
    a.mark(&log, &[5]);
    a.flush(&log, &[]);
    a.restart_after_kill9();
    a.expect_err(&log, T::MarkRegion, &regions_payload(&[6]), ESRCH, "unknown log after the restart");
    let r = a.request(&Request::ctr_reconnect(&log.uuid, log.luid, ctr));
    assert_eq!(r.error, 0, "reconnect CTR: {r}");
    a.resume(&log);
    a.mark(&log, &[6]);
    assert!(!a.is_clean(&log, 5), "region 5 is dirty: the kernel still holds it dirty");
    assert!(!a.in_sync(&log, 5), "a region dirty when the agent died is resynchronised");
    assert_eq!(a.sync_count(&log), N - 1);
    if let Some(d) = disk {
        assert_eq!(DiskLog::read(d).map(N), "1111100111111", "on the device");
    }
}

#[test]
fn reconnect_does_not_reapply_nosync_to_a_disk_log() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    reconnect_keeps_the_image(&mut a, &disk_ctr(&disk, " nosync"), Some(&disk));
}

#[test]
fn reconnect_does_not_reapply_nosync_to_a_core_log_in_state_dir() {
    let mut a = Agent::start_with(Core::StateDir);
    reconnect_keeps_the_image(&mut a, "100 clustered-core 8 nosync", None);
}

/// `sync` re-initialises only at a table resume too: a reconnect must not resynchronise
/// regions the log has recorded in sync.
#[test]
fn reconnect_does_not_reapply_sync() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let ctr = disk_ctr(&disk, " sync");
    let log = Log::nth(0);
    a.create(&log, &ctr);
    assert_eq!(a.sync_count(&log), 0);
    for r in 0..N {
        a.recover(&log, r);
    }
    a.mark(&log, &[2]); // durable: the clears in the same block go with it
    assert_eq!(DiskLog::read(&disk).map(N), "1101111111111");
    a.restart_after_kill9();
    a.request(&Request::ctr_reconnect(&log.uuid, log.luid, &ctr));
    a.resume(&log);
    assert_eq!(a.sync_map(&log, N), "1101111111111", "only the dirty region is resynchronised");
}

/// POSTSUSPEND's write fails (the device is full): the error is answered and the blocks stay
/// pending, so the next POSTSUSPEND (dm-raid1 ignores the error; a later suspend sends it
/// again) writes them. It used to give the device up before the write's result was known:
/// the next POSTSUSPEND was answered 0 and wrote nothing.
#[test]
fn a_failed_postsuspend_write_is_answered_and_retried() {
    let mut a = Agent::start();
    let fs = SmallFs::mount(&a.dir, 128);
    let disk = fs.0.join("disk");
    std::fs::write(&disk, [0u8; 16384]).unwrap();
    write_head(&disk, &image(MAGIC, N, |_| true));
    let log = Log::nth(0);
    a.create(&log, &disk_ctr(&disk, ""));
    a.mark(&log, &[3, 4]);
    a.clear(&log, &[3]);
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(0).unwrap();
    let filler = fs.fill();
    a.ok(&log, T::Presuspend, &[]);
    a.expect_err(&log, T::Postsuspend, &[], -libc::ENOSPC, "the final write failed");
    std::fs::remove_file(&filler).unwrap();
    a.ok(&log, T::Postsuspend, &[]);
    let img = DiskLog::read(&disk);
    img.assert_header(N);
    assert_eq!(img.map(N), "1111011111111", "the retried POSTSUSPEND wrote the clear of 3 and the mark of 4");
}

/// The agent restarts in the middle of a table reload: the new table's log (B) was resumed and
/// writes the device; the old, suspended table (A) is still in the kernel, and its kmirrord
/// still finishes the recovery that was in flight when the suspend began (dm-region-hash's
/// `complete_resync_work`: SET_REGION_SYNC, then CLEAR and FLUSH from `dm_rh_update_states`),
/// so the kernel's reconnect loop re-creates and resumes A as well. A knows nothing of the
/// regions B marked after A loaded: its writes must not record clean a region B holds dirty
/// (B's writes are in flight there). Whoever writes, the device carries both logs' dirt.
#[test]
fn two_logs_of_one_device_never_write_away_each_others_dirt() {
    let mut a = Agent::start();
    // Region 7 is being resynchronised by the old table.
    let disk = device_with(&a.dir, &image(MAGIC, N, |r| r != 7));
    let ctr = disk_ctr(&disk, "");
    let (old, new) = (Log::nth(0), Log::nth(1));
    a.create(&old, &ctr);
    a.ctr_ok(&new, &ctr);
    a.suspend(&old);
    a.resume(&new);
    a.restart_after_kill9();
    // The old table's flush comes first: -ESRCH, reconnect, resume.
    a.expect_err(&old, T::Flush, &[], ESRCH, "unknown after the restart");
    a.request(&Request::ctr_reconnect(&old.uuid, old.luid, &ctr));
    a.resume(&old);
    // The live table writes to region 3.
    a.expect_err(&new, T::MarkRegion, &regions_payload(&[3]), ESRCH, "unknown after the restart");
    a.request(&Request::ctr_reconnect(&new.uuid, new.luid, &ctr));
    a.resume(&new);
    a.mark(&new, &[3]);
    assert_eq!(DiskLog::read(&disk).map(N), "1110111011111");
    // The old table's recovery of region 7 completes.
    a.set_sync(&old, 7, 1);
    a.clear(&old, &[7]);
    a.flush(&old, &[]);
    a.suspend(&old); // answered once its writes are done
    assert_eq!(
        DiskLog::read(&disk).map(N),
        "1110111011111",
        "region 3 must stay dirty while the live log holds it (and 7 while it needs a resync there)"
    );
    // The old table goes; the live one recovers 7 and clears 3, and the device follows it.
    a.ok(&old, T::Dtr, &[]);
    a.recover(&new, 7);
    a.clear(&new, &[3]);
    a.suspend(&new);
    assert_eq!(DiskLog::read(&disk).map(N), "1111111111111");
}
