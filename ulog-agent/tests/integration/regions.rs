//! Region state: the initial state, IN_SYNC/IS_CLEAN, MARK/CLEAR, FLUSH with and without marks
//! (integrated_flush), SET_REGION_SYNC, their payload and range checks, and what needs a RESUME.

use crate::common::*;

const ALL: &str = "1111111111111";
const NONE: &str = "0000000000000";

#[test]
fn initial_state_is_clean_and_in_sync_only_with_nosync() {
    let mut a = Agent::start();
    let dflt = Log::nth(0);
    let sync = Log::nth(1);
    let nosync = Log::nth(2);
    a.ctr_ok(&dflt, CORE);
    a.ctr_ok(&sync, "100 clustered-core 8 sync");
    a.ctr_ok(&nosync, "100 clustered-core 8 nosync");
    for round in ["after CTR", "after RESUME"] {
        assert_eq!(a.clean_map(&dflt, N), ALL, "{round}");
        assert_eq!(a.sync_map(&dflt, N), NONE, "{round}");
        assert_eq!(a.sync_count(&dflt), 0, "{round}");
        assert_eq!(a.sync_map(&sync, N), NONE, "{round}");
        assert_eq!(a.sync_count(&sync), 0, "{round}");
        assert_eq!(a.clean_map(&nosync, N), ALL, "{round}");
        assert_eq!(a.sync_map(&nosync, N), ALL, "{round}");
        assert_eq!(a.sync_count(&nosync), N, "{round}");
        for l in [&dflt, &sync, &nosync] {
            a.resume(l);
        }
    }
}

#[test]
fn region_queries_check_payload_and_range() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    for t in [T::InSync, T::IsClean, T::IsRemoteRecovering] {
        for bad in [&[][..], &[0; 4], &[0; 7], &[0; 9], &[0; 16]] {
            a.expect_err(&log, t, bad, EINVAL, &format!("{}-byte payload", bad.len()));
        }
        for r in [N, N + 1, 1 << 32, u64::MAX] {
            a.expect_err(&log, t, &r.to_ne_bytes(), EINVAL, &format!("region {r} >= {N}"));
        }
        a.ok(&log, t, &(N - 1).to_ne_bytes());
    }
}

#[test]
fn writes_to_the_log_need_a_resume_first() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.ctr_ok(&log, CORE);
    a.expect_err(&log, T::MarkRegion, &regions_payload(&[1]), EINVAL, "MARK before RESUME");
    a.expect_err(&log, T::ClearRegion, &regions_payload(&[1]), EINVAL, "CLEAR before RESUME");
    a.expect_err(&log, T::Flush, &[], EINVAL, "FLUSH before RESUME");
    a.expect_err(&log, T::Flush, &regions_payload(&[1]), EINVAL, "FLUSH with marks before RESUME");
    a.expect_err(&log, T::SetRegionSync, &set_sync_payload(1, 1), EINVAL, "SET_REGION_SYNC before RESUME");
    assert_eq!(a.resync_work(&log), (0, N), "no resync work before RESUME");
    assert_eq!(a.clean_map(&log, N), ALL, "nothing applied");
    assert_eq!(a.sync_count(&log), 0);
    a.resume(&log);
    a.mark(&log, &[1]);
    a.flush(&log, &[]);
    a.set_sync(&log, 2, 1);
    a.clear(&log, &[2]);
    assert_eq!(a.clean_map(&log, N), "1011111111111");
    assert_eq!(a.sync_map(&log, N), "0010000000000");
}

#[test]
fn mark_dirties_and_clear_cleans_only_regions_in_sync() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.set_sync(&log, 2, 1);
    a.mark(&log, &[2, 3]);
    assert!(!a.is_clean(&log, 2));
    assert!(!a.is_clean(&log, 3));
    assert!(a.in_sync(&log, 2), "MARK does not change the sync state");
    a.clear(&log, &[2, 3]);
    assert!(a.is_clean(&log, 2), "in sync: CLEAR makes it clean");
    assert!(!a.is_clean(&log, 3), "out of sync: it stays dirty");
    // Marking twice and clearing once: clean (a single node does not count marks).
    a.mark(&log, &[2]);
    a.mark(&log, &[2]);
    a.clear(&log, &[2]);
    assert!(a.is_clean(&log, 2));
    // Once region 3 is recovered, a CLEAR cleans it.
    a.set_sync(&log, 3, 1);
    a.clear(&log, &[3]);
    assert!(a.is_clean(&log, 3));
    // The kernel's batching: clears then marks of one region in one interval leave it marked.
    a.clear(&log, &[5, 2]);
    a.mark(&log, &[2, 5, 12]);
    a.flush(&log, &[]);
    assert_eq!(a.clean_map(&log, N), "1101101111110");
    // An empty MARK/CLEAR is a no-op.
    a.mark(&log, &[]);
    a.clear(&log, &[]);
    assert_eq!(a.clean_map(&log, N), "1101101111110");
}

#[test]
fn mark_and_clear_check_every_region_before_applying_any() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, "100 clustered-core 8 nosync");
    for t in [T::MarkRegion, T::ClearRegion] {
        a.expect_err(&log, t, &[0; 12], EINVAL, "12 bytes: not a multiple of 8");
        a.expect_err(&log, t, &[0; 1], EINVAL, "1 byte");
    }
    a.expect_err(&log, T::MarkRegion, &regions_payload(&[1, 2, N]), EINVAL, "region 13 of 13");
    assert_eq!(a.clean_map(&log, N), ALL, "a rejected MARK applies nothing");
    a.expect_err(&log, T::MarkRegion, &regions_payload(&[u64::MAX, 4]), EINVAL, "u64::MAX first");
    assert!(a.is_clean(&log, 4));
    a.mark(&log, &[1, 2]);
    a.expect_err(&log, T::ClearRegion, &regions_payload(&[1, 2, N + 100]), EINVAL, "region out of range");
    assert_eq!(a.clean_map(&log, N), "1001111111111", "a rejected CLEAR applies nothing");
    // The largest batch the kernel sends (32 regions, 256 bytes) and beyond it (41 regions, the
    // most a 512-byte kernel buffer holds).
    let many: Vec<u64> = (0..41).map(|i| i % N).collect();
    a.mark(&log, &many);
    assert_eq!(a.clean_map(&log, N), NONE);
    a.clear(&log, &many);
    assert_eq!(a.clean_map(&log, N), ALL);
}

#[test]
fn flush_without_and_with_marks() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    let r = a.call(&log, T::Flush, &[]);
    assert_eq!((r.error, r.header.unwrap().data_size), (0, 0), "{r}");
    // integrated_flush: the marks travel in the FLUSH; the reply has no payload (the harness
    // enforces capacity 0, so an echoed data_size would show up as -ENOSPC).
    let r = a.call(&log, T::Flush, &regions_payload(&[4, 6]));
    assert_eq!((r.error, r.header.unwrap().data_size), (0, 0), "{r}");
    assert_eq!(a.clean_map(&log, N), "1111010111111");
    a.expect_err(&log, T::Flush, &[0; 12], EINVAL, "12 bytes: not a multiple of 8");
    a.expect_err(&log, T::Flush, &regions_payload(&[7, N]), EINVAL, "region out of range");
    assert!(a.is_clean(&log, 7), "a rejected FLUSH marks nothing");
    a.flush(&log, &(0..32).map(|i| i % N).collect::<Vec<_>>());
    assert_eq!(a.clean_map(&log, N), NONE);
}

#[test]
fn set_region_sync_checks_payload_and_updates_sync_and_clean_state() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    for bad in [&[][..], &[0; 8], &[0; 15], &[0; 17], &[0; 24]] {
        a.expect_err(&log, T::SetRegionSync, bad, EINVAL, &format!("{}-byte payload", bad.len()));
    }
    for r in [N, u64::MAX] {
        a.expect_err(&log, T::SetRegionSync, &set_sync_payload(r, 1), EINVAL, &format!("region {r}"));
    }
    assert_eq!(a.sync_count(&log), 0);
    a.set_sync(&log, 5, 1);
    assert!(a.in_sync(&log, 5));
    assert_eq!(a.sync_count(&log), 1);
    a.set_sync(&log, 5, 1);
    assert_eq!(a.sync_count(&log), 1, "setting it twice counts once");
    a.set_sync(&log, 6, 7);
    a.set_sync(&log, 7, -1);
    assert_eq!(a.sync_map(&log, N), "0000011100000", "any non-zero in_sync means in sync");
    assert!(a.is_clean(&log, 5));
    a.set_sync(&log, 5, 0);
    assert!(!a.in_sync(&log, 5), "in_sync 0: out of sync");
    assert!(!a.is_clean(&log, 5), "in_sync 0: and dirty");
    assert_eq!(a.sync_count(&log), 2);
    // Its payload is region first, then the flag: {region 1, in_sync 5} is not {region 5, ...}.
    a.set_sync(&log, 1, 5);
    assert!(a.in_sync(&log, 1));
    assert_eq!(a.sync_map(&log, N), "0100001100000");
}
