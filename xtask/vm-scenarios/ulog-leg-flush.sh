# ulog-leg-flush: a clean bit reaches the log device only after the mirror legs' write caches
# were flushed, and when that flush fails no clean bit is written (dm-log.c disk_flush:
# flush_callback_fn = dm-raid1's mirror_flush before every write with touched_cleaned; on
# failure flush_failed = 1, every region dirty, later clears ignored).
# clustered-disk log on a loop device; legs: a loop device (L0) and dm-flakey over another loop
# (L1RAW; flakey passes flushes down). 16 regions of 256 KiB.
# 1. write region 5: once its clean bit is back on the log device, both legs' loop devices have
#    completed more flush requests (/sys/block/loopN/stat field 16) than before the write, and
#    the agent counts ulog_leg_flushes_total{result="ok"}. (Nothing else flushes the legs: the
#    writes are O_DIRECT without fsync.)
# 2. a second dm device gets an inactive table naming the same log uuid with a leg that fails
#    every write and flush (dm-flakey, down, error_writes), as during a reload to new legs; after
#    a suspend/resume the log flushes the legs of every table naming it. Region 9 is written (its
#    data reaches L0 and L1): the leg flush before its clean bit fails, the log device then holds
#    every region dirty, the agent logs the failure, exports ulog_leg_flush_failed 1 and the API
#    shows legs_flush_failed; the log device itself stays 'A'.
# 3. region 12 written: its CLEAR is ignored, the log stays all dirty, also after removal.
# (integrated_flush is not used: with it, 6.1 defers a clears-only FLUSH by 3 s, and a second
# clears-only flush within those 3 s cancels it without rescheduling, so clears may reach the
# server only with the next mark.)
. /scenarios/lib.sh

MIB=4
SECTORS=$((MIB * 2048))
REGION=512
REGIONS=$((SECTORS / REGION)) # 16
UUID=LVM-ulogflushlegs0001
DEV=ulegflush
ALL_DIRTY="0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"

loop_create L0 leg0.img "$MIB"
loop_create L1RAW leg1.img "$MIB"
loop_create LOGDEV log.img 1
loop_create L2RAW leg2.img "$MIB"
dm_create ulfl_l1 "0 $SECTORS flakey $L1RAW 0 3600 0"
L1=/dev/mapper/ulfl_l1
dm_create ulfl_bad "0 $SECTORS flakey $L2RAW 0 0 3600 1 error_writes"
BAD=/dev/mapper/ulfl_bad
TABLE="0 $SECTORS mirror userspace 4 $UUID clustered-disk $(devnum "$LOGDEV") $REGION 2 $(devnum "$L0") 0 $(devnum "$L1") 0"
GHOST="0 $SECTORS mirror userspace 3 $UUID clustered-core $REGION 2 $(devnum "$L0") 0 $(devnum "$BAD") 0"
make_pattern W.pat W 1

# flushes NAME: flush requests completed by /dev/NAME (field 16 of its stat, Linux >= 5.5).
flushes() { awk '{ print $16 }' "/sys/block/$1/stat"; }
LEG0=${L0#/dev/}
LEG1=${L1RAW#/dev/}
# leg_flushes FILE RESULT: the agent's ulog_leg_flushes_total with that result, summed over logs.
leg_flushes() { grep "^ulog_leg_flushes_total{.*result=\"$2\"" "$1" | awk '{ s += $2 } END { printf "%d\n", s }'; }

# On failure: what the agent counted, the legs' flush counts, where its threads wait.
_leg_flush_diag() {
    echo "---- leg flush diagnostics ----"
    wget -q -O - "$AGENT_URL/metrics" 2>/dev/null | grep -E '^ulog_(leg_flush|disk_flush_bytes|disk_flush_errors|requests_total.*(FLUSH|CLEAR|MARK)|kernel_requests_total)'
    echo "flushes: $LEG0 $(flushes "$LEG0") $LEG1 $(flushes "$LEG1")"
    for _t in /proc/"$AGENT_PID"/task/*; do echo "$(cat "$_t/comm" 2>/dev/null) $(cat "$_t/wchan" 2>/dev/null)"; done
    echo "---- end of leg flush diagnostics ----"
}
add_fail_hook _leg_flush_diag

ulog_start
dm_create "$DEV" "$TABLE"
wait_for_sync "$DEV" 60
wait_disk_log_dirty "$LOGDEV" "$REGIONS" "" 15
agent_json_lines "mirror legs found" | grep -qF "$(devnum "$L0") $(devnum "$L1")" ||
    fail "the agent did not find the legs $(devnum "$L0") $(devnum "$L1"): $(agent_json_lines "mirror legs found")"

log "==== 1. a clean bit follows a flush of both legs ===="
scrape m0
f0=$(flushes "$LEG0")
f1=$(flushes "$LEG1")
run dd if=W.pat of="/dev/mapper/$DEV" bs=64k count=1 seek=$((5 * 4)) oflag=direct status=none
disk_log_dirty d "$LOGDEV" "$REGIONS"
# Usually still dirty here; under load the kernel may already have cleared it and the agent
# written it clean again (the ordering check below then only has the counts read after it).
case "$d" in
    5) ;;
    "") log "region 5 was already clean again when first read" ;;
    *) fail "dirty regions on the log device after the write to region 5: '$d'" ;;
esac
t0=$(now_cs)
while :; do
    # Flush counts first, then the bitmap: if the bit is clean, the counts read before it must
    # already show the flushes.
    g0=$(flushes "$LEG0")
    g1=$(flushes "$LEG1")
    disk_log_dirty d "$LOGDEV" "$REGIONS"
    [ -z "$d" ] && break
    [ $(($(now_cs) - t0)) -lt 1000 ] || fail "region 5 never became clean on the log device"
    usleep 20000
done
log "leg flushes when region 5's clean bit was on the log device: $LEG0 $f0 -> $g0, $LEG1 $f1 -> $g1"
[ "$g0" -gt "$f0" ] || fail "a clean bit reached the log device before leg 0 ($LEG0) was flushed ($f0 -> $g0)"
[ "$g1" -gt "$f1" ] || fail "a clean bit reached the log device before leg 1 ($LEG1, under flakey) was flushed ($f1 -> $g1)"
scrape m1
[ "$(leg_flushes m1 ok)" -gt "$(leg_flushes m0 ok)" ] || fail "ulog_leg_flushes_total{result=\"ok\"} did not rise"
marks() { sum "$1" 'ulog_requests_total{log="ulogflushlegs0001",type="MARK_REGION",result="ok"}'; }
[ "$(marks m1)" -gt "$(marks m0)" ] || fail "the write to region 5 was not marked"
assert_eq "$(leg_flushes m1 error)" 0 "failed leg flushes"

log "==== 2. a leg flush fails: no clean bit is written ===="
run dmsetup create ulfl_ghost --notable
on_exit "dmsetup remove ulfl_ghost"
run dmsetup load ulfl_ghost --table "$GHOST"
run dmsetup suspend "$DEV"
agent_log_mark
run dmsetup resume "$DEV"
wait_agent_line "mirror legs found" "$(devnum "$BAD")" 5
run dd if=W.pat of="/dev/mapper/$DEV" bs=64k count=1 seek=$((9 * 4)) oflag=direct status=none
wait_disk_log_dirty "$LOGDEV" "$REGIONS" "$ALL_DIRTY" 10
wait_agent_line "flushing the mirror legs failed" '"error"' 5
scrape m2
assert_eq "$(leg_flushes m2 error)" 1 "failed leg flushes"
assert_eq "$(sum m2 'ulog_leg_flush_failed{')" 1 "ulog_leg_flush_failed"
wget -q -O logs.json "$AGENT_URL/api/v1/logs" || fail "GET /api/v1/logs"
grep -q '"legs_flush_failed":true' logs.json || fail "the API does not show the failure: $(head -c 600 logs.json)"
assert_eq "$(mirror_log_status "$DEV")" "3 clustered-disk $(devnum "$LOGDEV") A" "log status (the log device is fine)"
assert_eq "$(mirror_health "$DEV")" AA "leg health (the kernel does not know)"

log "==== 3. clears are ignored from then on ===="
run dmsetup remove ulfl_ghost
run dd if=W.pat of="/dev/mapper/$DEV" bs=64k count=1 seek=$((12 * 4)) oflag=direct status=none
sleep 1
disk_log_dirty d "$LOGDEV" "$REGIONS"
assert_eq "$d" "$ALL_DIRTY" "dirty regions on the log device after a clear"
agent_alive || fail "ulog-agent died"
dm_remove "$DEV"
disk_log_dirty d "$LOGDEV" "$REGIONS"
assert_eq "$d" "$ALL_DIRTY" "dirty regions on the log device after the mirror's removal"
ulog_stop_totals totals
log "passed"
