# ulog-smoke: the first end-to-end check of ulog-agent as the dm-log-userspace server.
# ulog-agent -f runs in the background; a clustered-core mirror over two loop devices (leg 0 =
# pattern A, leg 1 = zeros) must be created, resync to N/N (so leg 1 holds A), show the server's
# status text "1 clustered-core", carry writes to both legs, and be removed; the agent must then
# still be alive and exit on SIGTERM (no logs left).
. /scenarios/lib.sh

MIB=16
SECTORS=$((MIB * 2048))
REGION=1024
REGIONS=$((SECTORS / REGION))
UUID=LVM-ulogsmoke0001

loop_create L0 leg0.img "$MIB"
loop_create L1 leg1.img "$MIB"
make_pattern A.pat A "$MIB"
make_pattern B.pat B 4
write_at "$L0" A.pat 0

agent_start

DEV=smoke
# A server that never answers makes dmsetup block (the kernel resends CTR every 15 s): limit it.
dm_create "$DEV" "0 $SECTORS mirror userspace 3 $UUID clustered-core $REGION 2 $L0 0 $L1 0" 30
log "status after create: $(mirror_status "$DEV")"
assert_match "$(dmsetup table "$DEV")" "0 $SECTORS mirror userspace 3 $UUID clustered-core $REGION 2 *" "table"
wait_for_sync "$DEV" 60
assert_eq "$(mirror_sync_ratio "$DEV")" "$REGIONS/$REGIONS" "sync ratio"
assert_eq "$(mirror_health "$DEV")" "AA" "leg health"
assert_match "$(mirror_status "$DEV")" "*1 clustered-core" "status (server's STATUS_INFO text)"
assert_eq "$(mirror_log_status "$DEV")" "1 clustered-core" "log status"

legs_equal "$SECTORS" "$L0" "$L1"
assert_content "$L1" 0 A.pat "leg 1 after resync"

write_at "/dev/mapper/$DEV" B.pat 8
drop_caches "/dev/mapper/$DEV"
assert_content "/dev/mapper/$DEV" 8 B.pat "read back through the mirror"
wait_for_sync "$DEV" 30
legs_equal "$SECTORS" "$L0" "$L1"
cp A.pat expect.pat
run dd if=B.pat of=expect.pat bs=1M seek=8 conv=notrunc status=none
assert_content "$L1" 0 expect.pat "leg 1"

agent_alive || fail "ulog-agent died"
dm_remove "$DEV"
agent_alive || fail "ulog-agent died during remove"
agent_stop TERM
assert_eq "$AGENT_RC" 0 "ulog-agent exit status after SIGTERM with no logs"
log "passed"
