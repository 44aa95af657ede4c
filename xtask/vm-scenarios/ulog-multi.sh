# ulog-multi: four mirrors on one agent at once (two clustered-core, two clustered-disk with
# their logs on loop devices), 8 MiB legs of 32 regions, each leg 0 = pattern A, leg 1 = zeros;
# all resync to N/N; then four writers in parallel, each its own pattern (B0..B3, 2 MiB at a
# different offset), all exit 0; every mirror reads back its own data, returns to N/N, and both
# legs hold the expected content (no cross-talk between logs); remove all; no request failed,
# served == kernel_sent, 4 CTR, 4 x 32 SET_REGION_SYNC.
. /scenarios/lib.sh

MIB=8
SECTORS=$((MIB * 2048))
REGION=512
make_pattern A.pat A "$MIB"
ulog_start
for i in 0 1 2 3; do
    loop_create L0_$i leg0_$i.img "$MIB"
    loop_create L1_$i leg1_$i.img "$MIB"
    eval "l0=\$L0_$i l1=\$L1_$i"
    write_at "$l0" A.pat 0
    make_pattern B$i.pat "$i" 2
    case $i in
        0 | 1) T="0 $SECTORS mirror userspace 3 LVM-ulogmulti0000$i clustered-core $REGION 2 $l0 0 $l1 0 1 handle_errors" ;;
        *)
            loop_create LG_$i log_$i.img 1
            eval "lg=\$LG_$i"
            T="0 $SECTORS mirror userspace 4 LVM-ulogmulti0000$i clustered-disk $lg $REGION 2 $l0 0 $l1 0 1 handle_errors"
            ;;
    esac
    dm_create umulti$i "$T"
done
for i in 0 1 2 3; do wait_for_sync umulti$i 60; done
PIDS=
for i in 0 1 2 3; do
    dd if=B$i.pat of=/dev/mapper/umulti$i bs=64k seek=$((2 * i * 16)) oflag=direct status=none &
    PIDS="$PIDS $!"
done
log "4 writers started"
for p in $PIDS; do wait "$p" || fail "a writer failed"; done
log "4 writers exited 0"
for i in 0 1 2 3; do
    eval "l0=\$L0_$i l1=\$L1_$i"
    off=$((2 * i))
    drop_caches /dev/mapper/umulti$i
    assert_content /dev/mapper/umulti$i "$off" B$i.pat "umulti$i reads back B$i"
    wait_for_sync umulti$i 30
    assert_eq "$(mirror_health umulti$i)" AA "umulti$i leg health"
    cp A.pat expect.pat
    run dd if=B$i.pat of=expect.pat bs=1M seek="$off" conv=notrunc status=none
    drop_caches "$l0" "$l1"
    assert_content "$l0" 0 expect.pat "umulti$i leg 0 (A with B$i at $off MiB)"
    assert_content "$l1" 0 expect.pat "umulti$i leg 1 (A with B$i at $off MiB)"
done
assert_match "$(mirror_log_status umulti2)" "3 clustered-disk * A" "umulti2 log status"
for i in 0 1 2 3; do dm_remove umulti$i; done
ulog_stop_totals totals
assert_totals totals exact MARK_REGION CLEAR_REGION FLUSH IN_SYNC SET_REGION_SYNC
assert_eq "$(total totals CTR)" 4 "CTR served (4 logs)"
assert_eq "$(total totals SET_REGION_SYNC)" 128 "SET_REGION_SYNC served (4 x 32 regions resynced once)"
log "passed"
