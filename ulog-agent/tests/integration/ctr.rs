//! CTR: the constructor grammar, region counts, the device-name reply and its reconnect form,
//! the reconnect form's idempotence and the replacement of stale logs, luids, log devices (size,
//! one mirror per device), and requests for logs that do not exist.

use crate::common::*;

#[test]
fn valid_constructor_strings_are_accepted() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let d = disk.display();
    let cases = [
        ("100 clustered-core 8".to_string(), 8u64),
        ("100 clustered-core 2".into(), 2),
        ("100 clustered-core 64".into(), 64),
        ("64 clustered-core 64".into(), 64),
        ("2097152 clustered-core 1024".into(), 1024),
        ("100 clustered-core 8 sync".into(), 8),
        ("100 clustered-core 8 nosync".into(), 8),
        ("100 clustered-core 8 block_on_error".into(), 8),
        ("100 clustered-core 8 sync block_on_error".into(), 8),
        ("100 clustered-core 8 nosync block_on_error".into(), 8),
        (format!("100 clustered-disk {d} 16"), 16),
        (format!("100 clustered-disk {d} 8 nosync"), 8),
        (format!("100 clustered-disk {d} 8 sync block_on_error"), 8),
        (format!("100 clustered-disk {d} 4 block_on_error"), 4),
    ];
    for (i, (ctr, size)) in cases.iter().enumerate() {
        let log = Log::nth(i as u64);
        let r = a.ctr(&log, ctr);
        assert_eq!(r.error, 0, "CTR {ctr:?}: {r}");
        assert_eq!(a.region_size(&log), *size, "{ctr:?}");
    }
}

#[test]
fn invalid_constructor_strings_are_einval() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let d = disk.display();
    let cases = [
        "".to_string(),
        "100".into(),
        "100 clustered-core".into(),
        "100 clustered-core 8 nosync block_on_error extra".into(),
        "100 clustered-foo 8".into(),
        "100 core 8".into(),
        "100 disk 8".into(),
        "abc clustered-core 8".into(),
        "12a clustered-core 8".into(),
        "-100 clustered-core 8".into(),
        "0x64 clustered-core 8".into(),
        "100 clustered-core x8".into(),
        "100 clustered-core 8x".into(),
        "100 clustered-core 6".into(),
        "100 clustered-core 12".into(),
        "100 clustered-core 1".into(),
        "100 clustered-core 0".into(),
        "100 clustered-core 128".into(),
        "0 clustered-core 8".into(),
        "100 clustered-core 8 fast".into(),
        "100 clustered-core 8 sync fast".into(),
        "100 clustered-core 8 nosync nosync".into(),
        "100 clustered-core 99999999999999999999999".into(),
        "99999999999999999999999 clustered-core 8".into(),
        // userspace_ctr keeps the region size as (uint32_t): 2^32 and up would become 0 and
        // the kernel would divide by it.
        "8589934592 clustered-core 4294967296".into(),
        "18446744073709551615 clustered-core 9223372036854775808".into(),
        format!("100 clustered-disk {d}"),
        format!("100 clustered-disk {d} 6"),
        format!("100 clustered-disk {d} 8 nosync block_on_error extra"),
        format!("100 clustered-disk {d} 8 fast"),
        "100 clustered-disk 8".into(),
    ];
    for (i, ctr) in cases.iter().enumerate() {
        let log = Log::nth(i as u64);
        let r = a.ctr(&log, ctr);
        assert_eq!(r.error, EINVAL, "CTR {ctr:?} must be -EINVAL: {r}");
        assert!(r.payload.is_empty(), "{ctr:?}: no payload with an error");
        a.expect_err(&log, T::GetRegionSize, &[], EINVAL, &format!("no log was created by {ctr:?}"));
    }
}

#[test]
fn missing_log_device_fails_the_ctr() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    let missing = a.dir.join("no-such-device");
    let r = a.ctr(&log, &format!("100 clustered-disk {} 8", missing.display()));
    assert!(r.error < 0, "CTR on a missing log device must fail: {r}");
    a.expect_err(&log, T::GetRegionSize, &[], EINVAL, "not created");
}

#[test]
fn region_count_is_dev_sectors_over_region_size_rounded_up() {
    let mut a = Agent::start();
    for (i, (ctr, n)) in [
        ("100 clustered-core 8 nosync", 13u64),
        ("96 clustered-core 8 nosync", 12),
        ("97 clustered-core 32 nosync", 4),
        ("2 clustered-core 2 nosync", 1),
    ]
    .into_iter()
    .enumerate()
    {
        let log = Log::nth(i as u64);
        a.ctr_ok(&log, ctr);
        assert_eq!(a.sync_count(&log), n, "{ctr}: every region in sync with nosync");
        assert!(a.in_sync(&log, n - 1), "{ctr}: last region exists");
        a.expect_err(&log, T::InSync, &n.to_ne_bytes(), EINVAL, &format!("{ctr}: region {n} does not exist"));
    }
}

#[test]
fn disk_ctr_replies_with_the_device_name_from_version_2_on() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let name = disk.display().to_string();
    let ctr = format!("100 clustered-disk {name} 8");
    let mut want = name.clone().into_bytes();
    want.push(0);
    for (i, version) in [3u32, 2, 1].into_iter().enumerate() {
        let log = Log::nth(i as u64);
        let r = a.request(&Request::ctr(&log.uuid, log.luid, &ctr).version(version));
        assert_eq!(r.error, 0, "version {version}: {r}");
        if version > 1 {
            assert_eq!(r.payload, want, "version {version}: the log_dev argument as given, plus NUL");
            assert_eq!(r.header.unwrap().data_size as usize, want.len());
        } else {
            assert!(r.payload.is_empty(), "version 1 kernels get no device name");
        }
    }
    // Core logs never return a name.
    let log = Log::nth(9);
    assert!(a.ctr_ok(&log, CORE).is_empty());
}

#[test]
fn reconnect_ctr_gets_no_payload() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let ctr = format!("100 clustered-disk {} 8", disk.display());
    // The kernel's reconnect CTR accepts no reply payload at all (capacity 0; the harness turns
    // any payload into -ENOSPC as the kernel does).
    let disk_log = Log::nth(0);
    let r = a.request(&Request::ctr_reconnect(&disk_log.uuid, disk_log.luid, &ctr));
    assert_eq!(r.error, 0, "reconnect CTR of a disk log: {r}");
    assert_eq!(r.header.unwrap().data_size, 0);
    assert_eq!(a.region_size(&disk_log), 8);
    let core_log = Log::nth(1);
    let r = a.request(&Request::ctr_reconnect(&core_log.uuid, core_log.luid, CORE));
    assert_eq!(r.error, 0, "reconnect CTR of a core log: {r}");
    assert_eq!(r.header.unwrap().data_size, 0);
    assert_eq!(a.region_size(&core_log), 8);
}

/// The kernel's reconnect loop (`userspace_do_request` after -ESRCH: CTR with the string
/// NUL-terminated, then RESUME) re-creates a log it still uses: with the same string it is the
/// log this agent has, and keeps its state.
#[test]
fn the_reconnect_form_of_the_same_ctr_keeps_the_log() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.set_sync(&log, 3, 1);
    a.mark(&log, &[4]);
    let r = a.request(&Request::ctr_reconnect(&log.uuid, log.luid, CORE));
    assert_eq!(r.error, 0, "the same string in reconnect form: {r}");
    a.resume(&log);
    assert!(a.in_sync(&log, 3), "state kept");
    assert!(!a.is_clean(&log, 4), "state kept");
    assert_eq!(a.sync_count(&log), 1);
}

/// A plain CTR for a (uuid, luid) that exists and was resumed: the kernel sends a plain CTR
/// only for a new log context, and luids are the contexts' slab addresses, so the old context
/// is gone without its DTR having reached the agent (a DTR lost to a full receive queue makes
/// the kernel see -ESRCH and free the context all the same) and the address is in use again.
/// The new table gets a new log: nothing of the old one's state, whatever its string.
#[test]
fn a_plain_ctr_for_a_resumed_log_replaces_it() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.set_sync(&log, 3, 1);
    a.mark(&log, &[4]);
    a.ctr_ok(&log, CORE);
    a.resume(&log);
    assert_eq!(a.sync_count(&log), 0, "a new log: nothing in sync");
    assert!(a.is_clean(&log, 4), "a new log: nothing marked");
    for other in ["100 clustered-core 16", "100 clustered-core 8 nosync", "200 clustered-core 8"] {
        let r = a.ctr(&log, other);
        assert_eq!(r.error, 0, "CTR {other:?} for a (uuid, luid) whose old context is gone: {r}");
    }
    assert_eq!(a.region_size(&log), 8);
    assert_eq!(a.sync_count(&log), 0);
    a.resume(&log);
    assert_eq!(a.resync_work(&log), (1, 0), "the last table's log (200 sectors) serves");
    a.expect_err(&log, T::InSync, &25u64.to_ne_bytes(), EINVAL, "25 regions in the last table");
    assert!(!a.in_sync(&log, 24));
}

/// `userspace_ctr` frees its context without a DTR when GET_REGION_SIZE, `dm_get_device` on the
/// device name we returned, or the workqueue allocation fail after the server's CTR succeeded.
/// Luids are slab addresses, so the next table can come with the same one: its CTR must create
/// its log (not -EEXIST), and the abandoned log's I/O thread and device must be released.
#[test]
fn a_ctr_for_a_log_the_kernel_abandoned_replaces_it_and_releases_its_device() {
    let mut a = Agent::start();
    let first = zero_file(&a.dir.join("first"), 65536);
    let second = zero_file(&a.dir.join("second"), 65536);
    let log = Log::nth(0);
    a.ctr_ok(&log, &format!("100 clustered-disk {} 8", first.display()));
    // ... the kernel's GET_REGION_SIZE or dm_get_device fails: no DTR, the context is freed.
    let r = a.ctr(&log, &format!("200 clustered-disk {} 16", second.display()));
    assert_eq!(r.error, 0, "CTR of the next table at the same address: {r}");
    assert_eq!(a.region_size(&log), 16);
    a.resume(&log);
    DiskLog::read(&second).assert_header(13);
    assert_eq!(read_head(&first, 1536), vec![0; 1536], "the abandoned log never wrote its device");
    let pid = a.proc.pid();
    let holds_first = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .any(|target| target == first)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while holds_first() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!holds_first(), "the abandoned log's device is still open");
}

#[test]
fn same_uuid_different_luids_are_independent_logs() {
    let mut a = Agent::start();
    let l1 = Log::new(UUID, 1);
    let l2 = Log::new(UUID, 2);
    let other_uuid = Log::new("LVM-ulog-other", 1);
    a.create(&l1, CORE);
    a.create(&l2, "100 clustered-core 4");
    a.create(&other_uuid, "100 clustered-core 32");
    assert_eq!(a.region_size(&l1), 8);
    assert_eq!(a.region_size(&l2), 4);
    assert_eq!(a.region_size(&other_uuid), 32);
    a.set_sync(&l1, 0, 1);
    a.mark(&l1, &[1]);
    assert!(a.in_sync(&l1, 0));
    assert!(!a.in_sync(&l2, 0));
    assert!(a.is_clean(&l2, 1));
    assert!(!a.in_sync(&other_uuid, 0));
    a.ok(&l2, T::Dtr, &[]);
    assert!(a.in_sync(&l1, 0), "DTR of luid 2 leaves luid 1 alone");
    a.expect_err(&l2, T::GetRegionSize, &[], EINVAL, "luid 2 is gone");
    a.expect_err(&Log::new(UUID, 3), T::GetRegionSize, &[], EINVAL, "luid 3 never existed");
}

#[test]
fn disk_log_device_must_hold_header_and_bitmap() {
    let mut a = Agent::start();
    // 40000 / 8 = 5000 regions: bitmap round_up(5000, 32) / 8 = 628 bytes; 1024 + 628 -> 2048.
    assert_eq!(min_device_bytes(5000), 2048);
    let small = zero_file(&a.dir.join("small"), 2047);
    let exact = zero_file(&a.dir.join("exact"), 2048);
    let log = Log::nth(0);
    let r = a.ctr(&log, &format!("40000 clustered-disk {} 8", small.display()));
    assert_eq!(r.error, EINVAL, "2047-byte device for 5000 regions: {r}");
    a.expect_err(&log, T::GetRegionSize, &[], EINVAL, "not created");
    a.create(&log, &format!("40000 clustered-disk {} 8", exact.display()));
    assert_eq!(a.sync_count(&log), 0);
    DiskLog::read(&exact).assert_header(5000);
    // 13 regions need 1536 bytes.
    let tiny = zero_file(&a.dir.join("tiny"), 1535);
    let r = a.ctr(&Log::nth(1), &format!("100 clustered-disk {} 8", tiny.display()));
    assert_eq!(r.error, EINVAL, "1535-byte device for 13 regions: {r}");
    let ok = zero_file(&a.dir.join("ok"), 1536);
    a.create(&Log::nth(2), &format!("100 clustered-disk {} 8", ok.display()));
    DiskLog::read(&ok).assert_header(N);
}

/// A well-formed payload for each non-CTR type.
pub fn sample_payload(t: T) -> Vec<u8> {
    match t {
        T::IsClean | T::InSync | T::IsRemoteRecovering => 0u64.to_ne_bytes().to_vec(),
        T::MarkRegion | T::ClearRegion => regions_payload(&[0, 1]),
        T::SetRegionSync => set_sync_payload(0, 1),
        _ => Vec::new(),
    }
}

#[test]
fn requests_for_an_unknown_log_get_esrch_where_the_kernel_reconnects_else_einval() {
    let mut a = Agent::start();
    let known = Log::new(UUID, 5);
    a.create(&known, CORE);
    let unknown = [Log::new("LVM-ulog-never-created", 5), Log::new(UUID, 6), Log::new(UUID, 0), Log::new("", 5)];
    for t in T::ALL.into_iter().filter(|&t| t != T::Ctr) {
        for log in &unknown {
            a.expect_err(log, t, &sample_payload(t), unknown_log_errno(t), "unknown (uuid, luid)");
        }
    }
    // Nothing of that reached the known log.
    assert_eq!(a.region_size(&known), 8);
    assert_eq!(a.sync_count(&known), 0);
    assert_eq!(a.clean_map(&known, N), "1".repeat(N as usize));
}

/// Two mirrors' logs on one device would overwrite each other's bitmap; device-mapper does not
/// stop two tables from opening one device (it holds every device with one shared claim).
#[test]
fn a_log_device_in_use_by_another_mirror_is_ebusy() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let ctr = format!("100 clustered-disk {} 8", disk.display());
    a.create(&Log::new("LVM-ulog-mirror-a", 1), &ctr);
    let other = Log::new("LVM-ulog-mirror-b", 2);
    let r = a.ctr(&other, &ctr);
    assert_eq!(r.error, -libc::EBUSY, "the device is in use by another mirror's log: {r}");
    a.expect_err(&other, T::GetRegionSize, &[], EINVAL, "not created");
    // The same uuid (the new table of a reload) may use it.
    a.ctr_ok(&Log::new("LVM-ulog-mirror-a", 3), &ctr);
    // Once the first mirror is gone, the device is free.
    a.ok(&Log::new("LVM-ulog-mirror-a", 1), T::Dtr, &[]);
    a.ok(&Log::new("LVM-ulog-mirror-a", 3), T::Dtr, &[]);
    a.ctr_ok(&other, &ctr);
}
