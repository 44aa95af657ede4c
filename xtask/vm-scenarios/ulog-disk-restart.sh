# ulog-disk-restart (3 boots): a `clustered-disk` log on a persistent virtio disk keeps exactly
# the regions that were dirty, across an agent crash, across a hard reset, and in the format of
# the kernel's own `disk` log.
# Disks: /dev/vda = leg 0, /dev/vdb = leg 1 (through the linear device udr_l1, so it can be
# suspended: a write then reaches leg 0 and hangs on leg 1, its region stays marked), /dev/vdc =
# the log (fresh, zero). 16 MiB legs, 32 regions of 512 KiB; the clean bitmap is 4 bytes at 1024.
# Boot 1 (a): create, N/N; suspend leg 1 and write one block to regions 3 17 18; the log device
#   shows exactly these regions dirty; SIGKILL the agent; a status request finds no server (the
#   kernel's reconnect loop starts: CTR + RESUME every 2 s), a new agent starts: the kernel
#   reconnects, the new agent loads the log and the mirror shows 29/32 (not 0/32). Resume leg 1
#   (the writes complete on both legs). The kernel asks for resync work again only after its
#   next resume (its in_sync_hint stays at N after a reconnect): suspend + resume the mirror,
#   N/N; legs equal, content = A + the blocks; the agent served exactly 3 SET_REGION_SYNC.
#   (b) a new agent, the same table: N/N at once (a clean log: nothing to resync); suspend leg 1,
#   write regions 5 9 30, wait until leg 0 has the blocks and the log shows them dirty; hard reset.
# Boot 2 (b): the log shows 5 9 30 dirty; a new agent, leg 1 suspended (so the resync cannot
#   finish before the count is read), the same table: 29/32; resume leg 1: N/N, legs equal,
#   content A + all blocks, exactly 3 SET_REGION_SYNC served; remove: log all clean.
#   (c) create again, suspend leg 1, write regions 0 31, wait, hard reset.
# Boot 3 (c): the log ulog wrote shows 0 31 dirty; the kernel's own `disk` log opens it (leg 1
#   suspended again): 30/32, "3 disk <vdc> A"; resume leg 1: N/N, legs equal, content A + all
#   blocks; remove: the kernel wrote the log back all clean.
. /scenarios/lib.sh

MIB=16
SECTORS=$((MIB * 2048))
REGION=1024
REGIONS=$((SECTORS / REGION))   # 32
L0=/dev/vda
L1=/dev/mapper/udr_l1
LOG=/dev/vdc
UUID=LVM-ulogdiskrestart1
DEV=udr
TABLE="0 $SECTORS mirror userspace 4 $UUID clustered-disk $LOG $REGION 2 $L0 0 $L1 0"

for d in /dev/vda /dev/vdb /dev/vdc; do [ -b "$d" ] || fail "$d missing (the scenario needs 3 virtio disks)"; done
make_pattern A.pat A "$MIB"
make_pattern W.pat W 1   # block r of W goes to region r (4 KiB at the region's start)
dm_create udr_l1 "0 $SECTORS linear /dev/vdb 0"

# start_writes R...: one O_DIRECT block write per region, in the background (WRITERS := pids).
start_writes() {
    WRITERS=
    for _r in "$@"; do
        write_region_block "/dev/mapper/$DEV" "$REGION" "$_r" W.pat &
        WRITERS="$WRITERS $!"
    done
    log "writes in flight to regions $*"
}
wait_writes() {
    for _p in $WRITERS; do wait "$_p" || fail "a write to $DEV failed"; done
    WRITERS=
}

# hold_dirty R...: with leg 1 suspended, write to regions R: leg 0 gets the blocks and the log
# shows exactly R dirty; the writes stay in flight.
hold_dirty() {
    run dmsetup suspend udr_l1
    on_exit "dmsetup resume udr_l1"   # runs before the mirror's removal after a failure
    start_writes "$@"
    wait_region_blocks "$L0" "$REGION" W.pat 10 "$@"
    wait_disk_log_dirty "$LOG" "$REGIONS" "$*" 10
}

# The expected content after boot K's writes.
expected() {
    cp A.pat expect.pat
    expect_region_blocks expect.pat "$REGION" W.pat "$@"
}

case $BOOT in
1)
    write_at "$L0" A.pat 0
    ulog_start
    dm_create "$DEV" "$TABLE"
    wait_for_sync "$DEV" 60
    assert_eq "$(mirror_log_status "$DEV")" "3 clustered-disk $(devnum "$LOG") A" "log status (ulog's STATUS_INFO)"
    assert_eq "$(dmsetup table "$DEV")" "0 $SECTORS mirror userspace 4 $UUID clustered-disk $LOG $REGION 2 $(devnum "$L0") 0 $(devnum "$L1") 0" "table"
    legs_equal "$SECTORS" "$L0" "$L1"
    assert_disk_log_header "$LOG" "$REGIONS" "log header written by ulog"
    wait_disk_log_dirty "$LOG" "$REGIONS" "" 5

    log "==== (a) agent crash with regions 3 17 18 dirty ===="
    hold_dirty 3 17 18
    assert_eq "$(mirror_sync_ratio "$DEV")" "$REGIONS/$REGIONS" "sync ratio with writes in flight (marked is not out of sync)"
    agent_stop KILL
    dmesg_mark
    # A request while no server listens: the kernel starts its reconnect loop.
    dmsetup status "$DEV" >./status.bg 2>&1 &
    spid=$!
    n=0
    until dmesg_since_mark | grep -q "Userspace log server not found"; do
        [ "$n" -lt 50 ] || fail "the kernel did not report the missing server within 5 s"
        usleep 100000
        n=$((n + 1))
    done
    ulog_start
    wait_exit "$spid" 10 "dmsetup status (after the new agent started)" ./status.bg
    log "status answered through the reconnect: $(cat ./status.bg)"
    wait_reconnect 5
    agent_json_lines "loaded log" | grep -q '"nr_regions":32' || fail "the new agent did not load the log from $LOG"
    assert_eq "$(awk '{ print $(5 + $4) }' ./status.bg)" "29/32" "sync ratio answered to the reconnected kernel"
    assert_eq "$(mirror_sync_ratio "$DEV")" "29/32" "sync ratio after the restart (3 dirty regions out of sync)"
    assert_eq "$(mirror_log_status "$DEV")" "3 clustered-disk $(devnum "$LOG") A" "log status after the restart"
    run dmsetup resume udr_l1
    wait_writes
    wait_region_blocks "$L1" "$REGION" W.pat 5 3 17 18
    assert_eq "$(mirror_sync_ratio "$DEV")" "29/32" "sync ratio after the writes completed"
    run dmsetup suspend "$DEV"
    run dmsetup resume "$DEV"
    wait_for_sync "$DEV" 30
    legs_equal "$SECTORS" "$L0" "$L1"
    expected 3 17 18
    assert_content "/dev/mapper/$DEV" 0 expect.pat "mirror after (a)"
    dm_remove "$DEV"
    wait_disk_log_dirty "$LOG" "$REGIONS" "" 5
    ulog_stop_totals totals.a
    assert_totals totals.a - CTR RESUME GET_RESYNC_WORK
    assert_eq "$(total totals.a SET_REGION_SYNC)" 3 "SET_REGION_SYNC served after the restart (only the 3 dirty regions resynced)"

    log "==== (b) hard reset with regions 5 9 30 dirty ===="
    ulog_start
    dm_create "$DEV" "$TABLE"
    assert_eq "$(mirror_sync_ratio "$DEV")" "$REGIONS/$REGIONS" "sync ratio right after create on a clean log"
    hold_dirty 5 9 30
    hard_reset
    ;;
2)
    assert_disk_log_header "$LOG" "$REGIONS" "log header after the reset"
    disk_log_dirty dirty "$LOG" "$REGIONS"
    assert_eq "$dirty" "5 9 30" "dirty regions on the log after the reset"
    ulog_start
    run dmsetup suspend udr_l1
    dm_create "$DEV" "$TABLE"
    on_exit "dmsetup resume udr_l1"   # before the mirror's removal after a failure
    assert_eq "$(mirror_sync_ratio "$DEV")" "29/32" "sync ratio after the reset (3 dirty regions out of sync)"
    run dmsetup resume udr_l1
    wait_for_sync "$DEV" 30
    assert_eq "$(mirror_health "$DEV")" AA "leg health"
    legs_equal "$SECTORS" "$L0" "$L1"
    expected 3 17 18 5 9 30
    assert_content "/dev/mapper/$DEV" 0 expect.pat "mirror after (b)"
    dm_remove "$DEV"
    wait_disk_log_dirty "$LOG" "$REGIONS" "" 5
    ulog_stop_totals totals.b
    assert_totals totals.b exact CTR RESUME GET_RESYNC_WORK
    assert_eq "$(total totals.b SET_REGION_SYNC)" 3 "SET_REGION_SYNC served after the reset (only the 3 dirty regions resynced)"

    log "==== (c) hard reset with regions 0 31 dirty, for the kernel's disk log ===="
    ulog_start
    dm_create "$DEV" "$TABLE"
    assert_eq "$(mirror_sync_ratio "$DEV")" "$REGIONS/$REGIONS" "sync ratio right after create on a clean log"
    hold_dirty 0 31
    hard_reset
    ;;
3)
    assert_disk_log_header "$LOG" "$REGIONS" "log header after the second reset"
    disk_log_dirty dirty "$LOG" "$REGIONS"
    assert_eq "$dirty" "0 31" "dirty regions on the log after the second reset"
    run dmsetup suspend udr_l1
    dm_create udr_k "0 $SECTORS mirror disk 2 $LOG $REGION 2 $L0 0 $L1 0"
    on_exit "dmsetup resume udr_l1"
    assert_eq "$(mirror_sync_ratio udr_k)" "30/32" "sync ratio of the kernel's disk log on ulog's log"
    assert_eq "$(mirror_log_status udr_k)" "3 disk $(devnum "$LOG") A" "kernel disk log status"
    run dmsetup resume udr_l1
    wait_for_sync udr_k 30
    legs_equal "$SECTORS" "$L0" "$L1"
    expected 3 17 18 5 9 30 0 31
    assert_content /dev/mapper/udr_k 0 expect.pat "mirror after (c)"
    dm_remove udr_k
    wait_disk_log_dirty "$LOG" "$REGIONS" "" 5
    assert_disk_log_header "$LOG" "$REGIONS" "log header written back by the kernel"
    ;;
*) fail "unexpected boot $BOOT" ;;
esac
log "boot $BOOT passed"
