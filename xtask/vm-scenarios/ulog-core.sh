# ulog-core: ulog-agent serving `clustered-core` mirrors over two loop devices (8 MiB, 32 regions).
# 1. Default sync mode: leg 0 = pattern A, leg 1 = zeros. Create; the resync copies leg 0 to
#    leg 1 and reaches N/N; `dmsetup status` ends with ulog's STATUS_INFO text "1 clustered-core";
#    `dmsetup table` shows the userspace log arguments exactly; the legs are byte-identical and
#    hold A; after remove and SIGTERM the agent served exactly one SET_REGION_SYNC per region
#    (each region resynced once), no request failed, and it served what the kernel sent.
# 2. `nosync`: both legs hold pattern C; the mirror is N/N right after create (no resync: no
#    SET_REGION_SYNC at all); a write through it reaches both legs.
. /scenarios/lib.sh

MIB=8
SECTORS=$((MIB * 2048))
REGION=512                        # 256 KiB
REGIONS=$((SECTORS / REGION))   # 32

loop_create L0 leg0.img "$MIB"
loop_create L1 leg1.img "$MIB"
LEGS="$(devnum "$L0") 0 $(devnum "$L1") 0"
make_pattern A.pat A "$MIB"
make_pattern C.pat C "$MIB"
make_pattern B.pat B 2

log "==== clustered-core, default sync mode ===="
write_at "$L0" A.pat 0
UUID=LVM-ulogcore00000001
DEV=ucore
ulog_start
dm_create "$DEV" "0 $SECTORS mirror userspace 3 $UUID clustered-core $REGION 2 $L0 0 $L1 0"
log "status after create: $(mirror_status "$DEV")"
assert_eq "$(dmsetup table "$DEV")" "0 $SECTORS mirror userspace 3 $UUID clustered-core $REGION 2 $LEGS" "table"
wait_for_sync "$DEV" 60
assert_eq "$(mirror_sync_ratio "$DEV")" "$REGIONS/$REGIONS" "sync ratio"
assert_eq "$(mirror_health "$DEV")" AA "leg health"
assert_eq "$(mirror_log_status "$DEV")" "1 clustered-core" "log status (ulog's STATUS_INFO)"
assert_match "$(mirror_status "$DEV")" "0 $SECTORS mirror 2 $(devnum "$L0") $(devnum "$L1") $REGIONS/$REGIONS 1 AA 1 clustered-core" "status line"
legs_equal "$SECTORS" "$L0" "$L1"
assert_content "$L1" 0 A.pat "leg 1 after the resync"
dm_remove "$DEV"
ulog_stop_totals totals.sync
assert_eq "$(total totals.sync SET_REGION_SYNC)" "$REGIONS" "SET_REGION_SYNC served (one per resynced region)"
assert_totals totals.sync exact CTR RESUME GET_REGION_SIZE GET_SYNC_COUNT GET_RESYNC_WORK STATUS_INFO PRESUSPEND POSTSUSPEND DTR

log "==== clustered-core nosync ===="
write_at "$L0" C.pat 0
write_at "$L1" C.pat 0
UUID=LVM-ulogcore00000002
DEV=ucore_ns
ulog_start
dm_create "$DEV" "0 $SECTORS mirror userspace 4 $UUID clustered-core $REGION nosync 2 $L0 0 $L1 0"
# No waiting: nosync means in sync from the start.
assert_eq "$(mirror_sync_ratio "$DEV")" "$REGIONS/$REGIONS" "sync ratio right after create (nosync)"
assert_eq "$(dmsetup table "$DEV")" "0 $SECTORS mirror userspace 4 $UUID clustered-core $REGION nosync 2 $LEGS" "table (nosync)"
assert_eq "$(mirror_log_status "$DEV")" "1 clustered-core" "log status (nosync)"
write_at "/dev/mapper/$DEV" B.pat 6
drop_caches "/dev/mapper/$DEV"
assert_content "/dev/mapper/$DEV" 6 B.pat "read back through the nosync mirror"
assert_eq "$(mirror_sync_ratio "$DEV")" "$REGIONS/$REGIONS" "sync ratio after writes (nosync)"
legs_equal "$SECTORS" "$L0" "$L1"
cp C.pat expect.pat
run dd if=B.pat of=expect.pat bs=1M seek=6 conv=notrunc status=none
assert_content "$L1" 0 expect.pat "leg 1 (C with B at 6 MiB)"
dm_remove "$DEV"
ulog_stop_totals totals.nosync
assert_eq "$(total totals.nosync SET_REGION_SYNC)" 0 "SET_REGION_SYNC served for a nosync mirror (nothing to resync)"
assert_totals totals.nosync exact CTR RESUME MARK_REGION FLUSH
log "passed"
