# ulog-leg-failure: a mirror leg fails; ulog records exactly the regions that went out of sync.
# clustered-core with --state-dir (so a reload keeps what the log knows), legs: a loop device and
# a linear device over another loop (ulf_l1); table features `2 handle_errors keep_log` (with
# only handle_errors, dm-raid1 holds writes that failed on a leg until userspace reconfigures
# the mirror, as dmeventd/LVM do; keep_log completes them from the surviving leg).
# 8 MiB legs, 32 regions of 256 KiB. After N/N, ulf_l1 becomes the `error` target; writes of
# pattern W to 2 MiB at 4 MiB (regions 16-23) succeed; the health shows "AD"; the kernel marks the 8 regions out of sync
# (SET_REGION_SYNC 0): 24/32, and it stays 24/32 (recovery to the dead leg fails); reads return W.
# Repair: ulf_l1 back to the linear device (whose old content is stale in regions 16-23), the
# mirror table reloaded (a new log over the same state file): 24/32 with leg 1 still suspended,
# then N/N; the legs are identical: the resync copied exactly what ulog recorded.
. /scenarios/lib.sh

MIB=8
SECTORS=$((MIB * 2048))
REGION=512                         # 256 KiB: 32 regions
REGIONS=$((SECTORS / REGION))   # 32
UUID=LVM-ulogfailleg00001
DEV=ulegfail

loop_create L0 leg0.img "$MIB"
loop_create L1RAW leg1.img "$MIB"
L1=/dev/mapper/ulf_l1
dm_create ulf_l1 "0 $SECTORS linear $L1RAW 0"
TABLE="0 $SECTORS mirror userspace 3 $UUID clustered-core $REGION 2 $L0 0 $L1 0 2 handle_errors keep_log"
make_pattern A.pat A "$MIB"
make_pattern W.pat W 2
write_at "$L0" A.pat 0

mkdir -p state
ulog_start --state-dir "$PWD/state"
dm_create "$DEV" "$TABLE"
on_exit "dmsetup resume ulf_l1"   # after a failure: leg 1 must not stay suspended
wait_for_sync "$DEV" 60
legs_equal "$SECTORS" "$L0" "$L1"

log "==== leg 1 fails ===="
run dmsetup load ulf_l1 --table "0 $SECTORS error"
run dmsetup suspend ulf_l1
run dmsetup resume ulf_l1
run dd if=W.pat of="/dev/mapper/$DEV" bs=64k seek=64 oflag=direct status=none
log "status after writes to the failed leg: $(mirror_status "$DEV")"
assert_eq "$(mirror_health "$DEV")" AD "leg health (leg 1 dead)"
n=0
while [ "$(mirror_in_sync "$DEV")" -gt 24 ]; do
    [ "$n" -lt 50 ] || fail "regions written while leg 1 failed are still in sync: $(mirror_status "$DEV")"
    usleep 100000
    n=$((n + 1))
done
sleep 2    # recovery attempts against the dead leg must not change the count
assert_eq "$(mirror_sync_ratio "$DEV")" "24/$REGIONS" "sync ratio (regions 16-23 out of sync)"
assert_eq "$(mirror_log_status "$DEV")" "1 clustered-core" "log status"
drop_caches "/dev/mapper/$DEV"
assert_content "/dev/mapper/$DEV" 4 W.pat "W read back through the degraded mirror"
agent_alive || fail "ulog-agent died"

log "==== repair: leg 1 back, table reloaded ===="
run dmsetup load ulf_l1 --table "0 $SECTORS linear $L1RAW 0"
run dmsetup load "$DEV" --table "$TABLE"
run dmsetup suspend "$DEV"
run dmsetup suspend ulf_l1
run dmsetup resume "$DEV"
assert_eq "$(mirror_sync_ratio "$DEV")" "24/$REGIONS" "sync ratio of the reloaded log (state file)"
run dmsetup resume ulf_l1
wait_for_sync "$DEV" 30
assert_eq "$(mirror_health "$DEV")" AA "leg health after the repair"
legs_equal "$SECTORS" "$L0" "$L1"
cp A.pat expect.pat
run dd if=W.pat of=expect.pat bs=1M seek=4 conv=notrunc status=none
assert_content "$L1" 0 expect.pat "leg 1 after the repair (A with W at 4 MiB)"
dm_remove "$DEV"
ulog_stop_totals totals
assert_totals totals exact SET_REGION_SYNC GET_RESYNC_WORK CTR DTR
log "passed"
