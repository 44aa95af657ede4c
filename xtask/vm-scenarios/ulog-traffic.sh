# ulog-traffic: the request traffic of writes and reads through a clustered-core mirror.
# 8 MiB legs, 32 regions. Resync to N/N; write pattern W (4 MiB at 4 MiB = regions 16-31, 64 KiB
# O_DIRECT writes) through the mirror;
# read it back through the mirror; the legs are identical and hold A with W at 4 MiB. After
# remove and SIGTERM, the agent's exit summary must show MARK_REGION, CLEAR_REGION, FLUSH and
# IN_SYNC (and the create/resync/remove requests) served with errors=0, and, with the eBPF probe
# attached, served == kernel_sent for every request type.
. /scenarios/lib.sh

MIB=8
SECTORS=$((MIB * 2048))
REGION=512                         # 256 KiB: 32 regions
UUID=LVM-ulogtraffic00001
DEV=utraffic

loop_create L0 leg0.img "$MIB"
loop_create L1 leg1.img "$MIB"
make_pattern A.pat A "$MIB"
make_pattern W.pat W 4
write_at "$L0" A.pat 0

ulog_start
dm_create "$DEV" "0 $SECTORS mirror userspace 3 $UUID clustered-core $REGION 2 $L0 0 $L1 0 1 handle_errors"
wait_for_sync "$DEV" 60
run dd if=W.pat of="/dev/mapper/$DEV" bs=64k seek=64 oflag=direct status=none
drop_caches "/dev/mapper/$DEV"
assert_content "/dev/mapper/$DEV" 4 W.pat "W read back through the mirror"
assert_eq "$(mirror_sync_ratio "$DEV")" 32/32 "sync ratio after the writes"
assert_eq "$(mirror_health "$DEV")" AA "leg health"
legs_equal "$SECTORS" "$L0" "$L1"
cp A.pat expect.pat
run dd if=W.pat of=expect.pat bs=1M seek=4 conv=notrunc status=none
assert_content "$L0" 0 expect.pat "leg 0 (A with W at 4 MiB)"
agent_alive || fail "ulog-agent died"
dm_remove "$DEV"
ulog_stop_totals totals
assert_totals totals exact MARK_REGION CLEAR_REGION FLUSH IN_SYNC CTR RESUME GET_RESYNC_WORK SET_REGION_SYNC \
    GET_SYNC_COUNT STATUS_INFO PRESUSPEND POSTSUSPEND DTR
log "passed"
