//! Resynchronisation: GET_RESYNC_WORK hand-out and cursor, SET_REGION_SYNC freeing the slot,
//! IS_REMOTE_RECOVERING hints, GET_SYNC_COUNT bounds, and recovery halted by PRESUSPEND.

use crate::common::*;

#[test]
fn resync_work_hands_out_the_lowest_region_until_it_is_reported() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    assert_eq!(a.resync_work(&log), (1, 0));
    assert_eq!(a.resync_work(&log), (1, 0), "not reported yet: the same region again");
    a.set_sync(&log, 0, 1);
    assert_eq!(a.resync_work(&log), (1, 1));
    // Regions already in sync are skipped.
    a.set_sync(&log, 2, 1);
    a.set_sync(&log, 3, 1);
    a.set_sync(&log, 1, 1);
    assert_eq!(a.resync_work(&log), (1, 4));
    for r in 4..N {
        assert_eq!(a.resync_work(&log), (1, r));
        a.set_sync(&log, r, 1);
    }
    assert_eq!(a.resync_work(&log), (0, N), "no work left");
    assert_eq!(a.resync_work(&log), (0, N));
    assert_eq!(a.sync_count(&log), N);
}

#[test]
fn resync_cursor_restarts_at_resume() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    assert_eq!(a.resync_work(&log), (1, 0));
    a.set_sync(&log, 0, 0); // recovery of region 0 failed: it stays out of sync
    let (i, r) = a.resync_work(&log);
    assert_eq!(i, 1);
    assert!(r <= 1, "the next work is region 0 or 1, got {r}");
    a.set_sync(&log, r, 1);
    a.suspend(&log);
    a.resume(&log);
    let lowest = if r == 0 { 1 } else { 0 };
    assert_eq!(a.resync_work(&log), (1, lowest), "after RESUME the search starts at region 0 again");
}

#[test]
fn recovery_is_halted_from_presuspend_until_resume() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.set_sync(&log, 0, 1);
    a.set_sync(&log, 1, 1);
    assert_eq!(a.resync_work(&log), (1, 2));
    assert_eq!(a.remote_recovering(&log, 5), (0, N - 1), "work remains: the hint keeps GET_RESYNC_WORK coming");
    a.ok(&log, T::Presuspend, &[]);
    assert_eq!(a.resync_work(&log), (0, N), "PRESUSPEND halts recovery");
    assert_eq!(a.remote_recovering(&log, 5), (0, N));
    a.ok(&log, T::Postsuspend, &[]);
    assert_eq!(a.resync_work(&log), (0, N), "still halted while suspended");
    assert_eq!(a.remote_recovering(&log, 5), (0, N));
    a.resume(&log);
    assert_eq!(a.resync_work(&log), (1, 2), "RESUME restarts recovery");
    assert_eq!(a.remote_recovering(&log, 5), (0, N - 1));
}

#[test]
fn nosync_logs_have_no_resync_work() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, "100 clustered-core 8 nosync");
    assert_eq!(a.resync_work(&log), (0, N));
    assert_eq!(a.remote_recovering(&log, 0), (0, N));
    assert_eq!(a.remote_recovering(&log, N - 1), (0, N));
    // A region that falls out of sync (a leg failure) is work again after the next RESUME,
    // which also resets the kernel's hint to 0; until then GET_RESYNC_WORK has nothing.
    a.set_sync(&log, 7, 0);
    assert_eq!(a.resync_work(&log), (0, N));
    assert_eq!(a.remote_recovering(&log, 9), (0, N), "no work before the next RESUME");
    a.suspend(&log);
    a.resume(&log);
    assert_eq!(a.remote_recovering(&log, 9), (0, N - 1));
    assert_eq!(a.resync_work(&log), (1, 7));
}

/// IS_REMOTE_RECOVERING over a real socket, against what the kernel does with the answer
/// (dm-log-userspace-base.c `userspace_is_remote_recovering`): regions below the hint are
/// answered 0 by the kernel itself; at or above it the kernel asks at most once per 250 ms and
/// says "recovering" in between, and dm-raid1 `do_writes` requeues those writes for 200 ms.
/// `userspace_get_resync_work` stops at hint >= region_count. So: never recovering (one node),
/// hint `N - 1` while GET_RESYNC_WORK has work (only the last region can be throttled), `N`
/// once it has none before the next RESUME. The old exact hint (first unsynced region) made
/// every write above it crawl during a resync.
#[test]
fn remote_recovering_never_throttles_below_the_last_region_during_resync() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    for r in [0, N - 1, 7] {
        assert_eq!(a.remote_recovering(&log, r), (0, N - 1), "nothing in sync yet (region {r})");
    }
    a.set_sync(&log, 0, 1);
    a.set_sync(&log, 1, 1);
    a.set_sync(&log, 5, 1);
    assert_eq!(a.remote_recovering(&log, 4), (0, N - 1), "a single node never has a remote recoverer");
    assert_eq!(a.resync_work(&log), (1, 2));
    assert_eq!(a.remote_recovering(&log, 2), (0, N - 1), "region 2 is being recovered");
    a.set_sync(&log, 1, 0);
    assert_eq!(a.remote_recovering(&log, 12), (0, N - 1), "region 1 fell out of sync");
    for r in 0..N {
        a.set_sync(&log, r, 1);
    }
    assert_eq!(a.remote_recovering(&log, 12), (0, N), "all in sync: the kernel stops asking");
    assert_eq!(a.resync_work(&log), (0, N));
}

#[test]
fn sync_count_never_exceeds_region_count() {
    let mut a = Agent::start();
    // 13 regions: the bitmap word has 19 padding bits that must never be counted.
    let nosync = Log::nth(0);
    a.ctr_ok(&nosync, "100 clustered-core 8 nosync");
    assert_eq!(a.sync_count(&nosync), N, "before RESUME");
    a.resume(&nosync);
    assert_eq!(a.sync_count(&nosync), N, "after RESUME");
    for r in 0..N {
        a.set_sync(&nosync, r, 1);
    }
    assert_eq!(a.sync_count(&nosync), N);
    let dflt = Log::nth(1);
    a.create(&dflt, CORE);
    for _ in 0..2 {
        for r in (0..N).rev() {
            a.set_sync(&dflt, r, 1);
        }
    }
    assert_eq!(a.sync_count(&dflt), N);
    // 2048 regions: exactly a multiple of 32.
    let big = Log::nth(2);
    a.create(&big, "2097152 clustered-core 1024 nosync");
    assert_eq!(a.sync_count(&big), 2048);
}
