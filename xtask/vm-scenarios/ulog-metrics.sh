# ulog-metrics: a scrape of the agent's /metrics after a workload matches what the kernel did.
# A clustered-core mirror (8 MiB legs, 32 regions of 256 KiB) and a clustered-disk mirror (log on a
# third loop device) on one agent; after resync, 256 O_DIRECT 4 KiB writes through the core mirror
# (one bio each). Scraped with busybox wget over 127.0.0.1 (/init brings lo up):
#  - the agent found each log's mirror through DM ioctls: ulog_log_info{...,mirror="<dm name>"};
#  - ulog_mirror_writes_total of the core mirror grew by exactly 256 and its bytes by 1 MiB,
#    which is what the device's own /sys/block/dm-N/stat says;
#  - regions: out_of_sync 0, clean + dirty = 32, resync progress 1; the disk log's durable
#    writes are counted and its device is not failed;
#  - once the kernel is quiet, for every request type: the agent's answers (per log, plus those
#    without a log) equal its service-time histogram count, and, with the eBPF probe attached,
#    the kernel's own count (ulog_kernel_requests_total) from the same scrape;
#  - the cost model (requests per mirror write, by type) is logged.
. /scenarios/lib.sh

MIB=8
SECTORS=$((MIB * 2048))
REGION=512 # 256 KiB: 32 regions
CORE_UUID=LVM-ulogmetrics0001
DISK_UUID=LVM-ulogmetrics0002
CORE=ulogmetrics0001 # the log label: the uuid without LVM- (at most 24 characters)
DISK=ulogmetrics0002
URL=$AGENT_URL/metrics

loop_create L0 leg0.img "$MIB"
loop_create L1 leg1.img "$MIB"
loop_create D0 dleg0.img "$MIB"
loop_create D1 dleg1.img "$MIB"
loop_create LOGDEV log.img 1
make_pattern A.pat A "$MIB"
make_pattern W.pat W 1
write_at "$L0" A.pat 0
write_at "$D0" A.pat 0

ulog_start


dm_create umcore "0 $SECTORS mirror userspace 3 $CORE_UUID clustered-core $REGION 2 $L0 0 $L1 0 1 handle_errors"
dm_create umdisk "0 $SECTORS mirror userspace 4 $DISK_UUID clustered-disk $LOGDEV $REGION 2 $D0 0 $D1 0 1 handle_errors"
wait_for_sync umcore 60
wait_for_sync umdisk 60

# The mirror discovery runs every 5 s (and may run between the two creates): wait for both.
_n=0
until wget -q -O m0.txt "$URL" && grep -q "^ulog_mirror_writes_total{log=\"$CORE\"}" m0.txt &&
    grep -q "^ulog_mirror_writes_total{log=\"$DISK\"}" m0.txt; do
    [ "$_n" -lt 60 ] || fail "no ulog_mirror_writes_total for $CORE and $DISK after 12 s: $(grep -E '^ulog_log_info' m0.txt)"
    usleep 200000
    _n=$((_n + 1))
done
scrape m0.txt
grep -qF "ulog_log_info{log=\"$CORE\",uuid=\"$CORE_UUID\",type=\"clustered-core\",device=\"\",mirror=\"umcore\"} 1" m0.txt ||
    fail "log info of $CORE: $(grep '^ulog_log_info' m0.txt)"
grep -qF "ulog_log_info{log=\"$DISK\",uuid=\"$DISK_UUID\",type=\"clustered-disk\",device=\"$LOGDEV\",mirror=\"umdisk\"} 1" m0.txt ||
    fail "log info of $DISK: $(grep '^ulog_log_info' m0.txt)"
DMDEV=$(devnum /dev/mapper/umcore) # major:minor (no udev in the guest: /dev/mapper nodes are not links)
stat_writes() { awk '{ print $5 }' "/sys/dev/block/$DMDEV/stat"; }
w0=$(value m0.txt "ulog_mirror_writes_total{log=\"$CORE\"}")
assert_eq "$w0" "$(stat_writes)" "mirror writes of $CORE before the workload (= /sys/dev/block/$DMDEV/stat)"
b0=$(value m0.txt "ulog_mirror_written_bytes_total{log=\"$CORE\"}")

# 256 writes of 4 KiB, one bio each, spread over regions 0..3 (1 MiB).
run dd if=W.pat of=/dev/mapper/umcore bs=4k count=256 oflag=direct status=none
run dd if=W.pat of=/dev/mapper/umdisk bs=64k count=16 oflag=direct status=none

wait_quiet m1.txt

w1=$(value m1.txt "ulog_mirror_writes_total{log=\"$CORE\"}")
assert_eq "$((w1 - w0))" 256 "mirror writes of $CORE during the workload"
assert_eq "$w1" "$(stat_writes)" "mirror writes of $CORE (= /sys/dev/block/$DMDEV/stat)"
b1=$(value m1.txt "ulog_mirror_written_bytes_total{log=\"$CORE\"}")
assert_eq "$((b1 - b0))" 1048576 "bytes written to $CORE"

for L in $CORE $DISK; do
    assert_eq "$(value m1.txt "ulog_regions{log=\"$L\",state=\"out_of_sync\"}")" 0 "$L regions out of sync"
    _c=$(value m1.txt "ulog_regions{log=\"$L\",state=\"clean\"}")
    _d=$(value m1.txt "ulog_regions{log=\"$L\",state=\"dirty\"}")
    assert_eq "$((_c + _d))" 32 "$L clean + dirty regions"
    assert_eq "$(value m1.txt "ulog_resync_progress_ratio{log=\"$L\"}")" 1 "$L resync progress"
    _dirty_n=$(value m1.txt "ulog_region_dirty_duration_seconds_count{log=\"$L\"}")
    [ "$_dirty_n" -gt 0 ] || fail "$L: no region timed from MARK to CLEAR"
done
[ "$(value m1.txt "ulog_disk_flush_duration_seconds_count{log=\"$DISK\"}")" -gt 0 ] || fail "$DISK: no durable write counted"
[ "$(value m1.txt "ulog_disk_flush_bytes_total{log=\"$DISK\"}")" -gt 0 ] || fail "$DISK: no bytes written counted"
assert_eq "$(value m1.txt "ulog_log_device_failed{log=\"$DISK\"}")" 0 "$DISK device failed"
assert_eq "$(value m1.txt "ulog_kernel_reconnects_total{log=\"$CORE\"}")" 0 "reconnects of $CORE"

# Per request type: answers (per log + without a log) = the service-time histogram's count, and
# with the probe attached = what the kernel sent.
probe=$(value m1.txt ulog_probe_attached)
for t in CTR DTR PRESUSPEND POSTSUSPEND RESUME GET_REGION_SIZE IS_CLEAN IN_SYNC FLUSH MARK_REGION CLEAR_REGION \
    GET_RESYNC_WORK SET_REGION_SYNC GET_SYNC_COUNT STATUS_INFO STATUS_TABLE IS_REMOTE_RECOVERING; do
    answered=$(($(sum m1.txt "ulog_requests_total{log=\"$CORE\",type=\"$t\",") + $(sum m1.txt "ulog_requests_total{log=\"$DISK\",type=\"$t\",") +
        $(value m1.txt "ulog_requests_without_log_total{type=\"$t\"}")))
    timed=$(value m1.txt "ulog_request_duration_seconds_count{type=\"$t\"}")
    assert_eq "$timed" "$answered" "$t: service-time observations vs answers"
    errors=$(($(value m1.txt "ulog_requests_total{log=\"$CORE\",type=\"$t\",result=\"error\"}") + $(value m1.txt "ulog_requests_total{log=\"$DISK\",type=\"$t\",result=\"error\"}")))
    assert_eq "$errors" 0 "$t answered with errors"
    if [ "$probe" = 1 ]; then
        assert_eq "$answered" "$(value m1.txt "ulog_kernel_requests_total{type=\"$t\"}")" "$t: answered by the agent vs sent by the kernel"
    fi
done
if [ "$probe" = 1 ]; then
    log "every request type: answered by the agent == sent by the kernel (eBPF probe)"
else
    log "warning: eBPF probe not attached ($(ulog_probe_state)): kernel counts not compared"
fi

# The cost model: requests per mirror write during the workload, by type.
for t in IN_SYNC MARK_REGION FLUSH CLEAR_REGION IS_REMOTE_RECOVERING; do
    r0=$(sum m0.txt "ulog_requests_total{log=\"$CORE\",type=\"$t\",")
    r1=$(sum m1.txt "ulog_requests_total{log=\"$CORE\",type=\"$t\",")
    log "cost model: $t $((r1 - r0)) requests for 256 writes"
done
in_sync=$(($(sum m1.txt "ulog_requests_total{log=\"$CORE\",type=\"IN_SYNC\",") - $(sum m0.txt "ulog_requests_total{log=\"$CORE\",type=\"IN_SYNC\",")))
[ "$in_sync" -gt 0 ] || fail "no IN_SYNC for 256 writes"

# The JSON API agrees.
wget -q -O logs.json http://127.0.0.1:9477/api/v1/logs || fail "GET /api/v1/logs"
grep -qF "\"name\":\"$CORE\"" logs.json || fail "$CORE missing from /api/v1/logs: $(cat logs.json)"
grep -qF '"name":"umcore"' logs.json || fail "mirror umcore missing from /api/v1/logs: $(cat logs.json)"
wget -q -O hz.json http://127.0.0.1:9477/readyz || fail "GET /readyz"
assert_eq "$(cat hz.json)" '{"status":"ready"}' "readiness"

agent_alive || fail "ulog-agent died"
dm_remove umcore
dm_remove umdisk
ulog_stop_totals totals
assert_totals totals exact MARK_REGION CLEAR_REGION FLUSH IN_SYNC CTR RESUME DTR
log "passed"
