# vm-bench: the guest side of `cargo xtask vm bench` (xtask/src/vm/bench.rs). Installed as
# /scenarios/vm-bench.sh in the bench boot's initramfs only, with /bench/params.sh (written by the
# host), fio and its libraries, and /bin/const-responder (ulog-agent/examples/const_responder.rs).
#
# One boot runs everything; the host parses nothing from the console but progress: all results go
# to /tmp/results and, at the end, as a tar archive onto the results disk (/dev/vdc), which the
# host unpacks after qemu exits.
#
# Every run builds its own world: start the config's server (none, ulog-agent or the constant
# responder), create a fresh mirror with `nosync` (no resync traffic), run one fio job, read the
# dm device's write count, remove the mirror, stop the server (which prints its request counts).
# Runs are interleaved: for each round, for each job, every config in an order rotated per round.
#
# Modes: iops (nothing traced), rtt (kprobe + kretprobe on dm_consult_userspace only), breakdown
# (also cn_netlink_send, the server's recvfrom exit / sendto entry, cn_ulog_callback).
#
# Resync runs (RESYNC_CONFIGS, after the fio runs): a mirror created WITHOUT `nosync`, regions of
# RESYNC_REGION sectors (4096 regions at 256 MiB), so it starts with its initial resync.
#   resync.<cfg>.idle:   nothing else runs; time from `dmsetup create` to the table event the
#                        mirror raises when its sync completes (`dmsetup wait`: no polling, so
#                        no extra GET_SYNC_COUNT/STATUS_INFO during the resync).
#   resync.<cfg>.writes: right after create, 40 O_DIRECT 4 KiB writes (dd, one after the
#                        other) at fixed pseudo-random offsets in the last quarter of the device,
#                        the last region excluded; their total time; the sync count after them
#                        (it must be below 3/4 N: the resync had not reached them).
#   resync.<cfg>.iops:   fio (4 KiB random writes, depth 1) starts on a linear table over leg 0
#                        (fio needs ~3 s to start under TCG); at its first write the table is
#                        replaced by the mirror (suspend, load, resume: the resync starts), and
#                        fio measures RESYNC_IOPS_RUNTIME s after a 1 s ramp; the sync count
#                        after it tells whether the resync lasted that long.
# Each run removes its mirror without waiting for the resync to end.
# Then one traced (rtt) idle resync per userspace config for the per-type round trips.
# Trace timestamps are raw TSC (trace_clock x86-tsc, cycle resolution; the default clocks print
# microseconds); TRACE-CAL lines (TSC of a trace marker, /proc/uptime) let the host convert.
. /scenarios/lib.sh
. /bench/params.sh

OUT=/tmp/results
mkdir -p "$OUT"
T=/sys/kernel/tracing
KLOG_DEV=/dev/vda   # the kernel disk log's device (virtio, host file)
ULOG_DEV=/dev/vdb   # ulog clustered-disk's log device (virtio, host file)
RES_DEV=/dev/vdc    # results archive
SECTORS=$((SIZE_MIB * 2048))
UUID=LVM-ulogvmbench0001
DEV=bench

for d in "$KLOG_DEV" "$ULOG_DEV" "$RES_DEV"; do [ -b "$d" ] || fail "$d missing"; done
[ -x /usr/bin/fio ] || fail "no fio in the initramfs"

{
    echo "kernel $(uname -r)"
    echo "cpus $(grep -c ^processor /proc/cpuinfo)"
    echo "mem_kib $(awk '/MemTotal/ { print $2 }' /proc/meminfo)"
    echo "fio $(fio --version)"
    echo "clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    dmesg | grep -i 'tsc' | sed 's/^/dmesg /'
} >"$OUT/guest-info.txt"
cat "$OUT/guest-info.txt"

# Legs: loop devices over files in the guest's tmpfs, written once in full so no run pays for
# tmpfs page allocation.
loop_create L0 leg0.img "$SIZE_MIB"
loop_create L1 leg1.img "$SIZE_MIB"
for l in "$L0" "$L1"; do
    dd if=/dev/zero of="$l" bs=1M count="$SIZE_MIB" oflag=direct status=none || fail "fill $l"
done
dd if=/dev/zero of="$KLOG_DEV" bs=64k count=16 oflag=direct status=none
dd if=/dev/zero of="$ULOG_DEV" bs=64k count=16 oflag=direct status=none

table() {
    case $1 in
        lin) echo "0 $SECTORS linear $L0 0" ;;
        core) echo "0 $SECTORS mirror core 2 $REGION nosync 2 $L0 0 $L1 0" ;;
        disk) echo "0 $SECTORS mirror disk 3 $KLOG_DEV $REGION nosync 2 $L0 0 $L1 0" ;;
        ucore | pcore | qcore | rcore) echo "0 $SECTORS mirror userspace 4 $UUID clustered-core $REGION nosync 2 $L0 0 $L1 0" ;;
        uif | rif) echo "0 $SECTORS mirror userspace 5 $UUID integrated_flush clustered-core $REGION nosync 2 $L0 0 $L1 0" ;;
        udisk) echo "0 $SECTORS mirror userspace 5 $UUID clustered-disk $ULOG_DEV $REGION nosync 2 $L0 0 $L1 0" ;;
        *) fail "unknown config $1" ;;
    esac
}

server_of() {
    case $1 in
        ucore | uif | udisk) echo agent ;;
        rsync) echo responder-resync ;;
        pcore) echo agent-probes ;;
        qcore) echo agent-probes-nostats ;;
        rcore | rif) echo responder ;;
        *) echo none ;;
    esac
}

SERVER_PID=
server_start() { # KIND LOGFILE
    case $1 in
        agent) RUST_LOG=info /bin/ulog-agent -f --no-probes --log-format json >"$2" 2>&1 & ;;
        # As shipped: eBPF probes attached, kernel BPF statistics on (their own cost measured).
        agent-probes) RUST_LOG=info /bin/ulog-agent -f --log-format json >"$2" 2>&1 & ;;
        agent-probes-nostats) RUST_LOG=info /bin/ulog-agent -f --no-bpf-stats --log-format json >"$2" 2>&1 & ;;
        responder) /bin/const-responder >"$2" 2>&1 & ;;
        responder-resync) /bin/const-responder --resync >"$2" 2>&1 & ;;
        *) return 0 ;;
    esac
    SERVER_PID=$!
    _n=0
    until ulog_listener_present; do
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$2"; fail "$1 exited before listening"; }
        [ "$_n" -lt 200 ] || fail "$1 not listening after 10 s"
        usleep 50000
        _n=$((_n + 1))
    done
}

server_stop() {
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null
    # ulog-agent refuses SIGTERM while a mirror still uses it (e.g. on the way out after a failed
    # step): give it 10 s, then the restart-style exit (SIGRTMIN+1 = 35), then SIGKILL, so a
    # failing run ends instead of waiting forever.
    _n=0
    while kill -0 "$SERVER_PID" 2>/dev/null && [ "$_n" -lt 200 ]; do usleep 50000; _n=$((_n + 1)); done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "server $SERVER_PID still running 10 s after SIGTERM: restart-style exit" >&2
        kill -35 "$SERVER_PID" 2>/dev/null
        _n=0
        while kill -0 "$SERVER_PID" 2>/dev/null && [ "$_n" -lt 200 ]; do usleep 50000; _n=$((_n + 1)); done
        kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    wait "$SERVER_PID"
    _rc=$?
    SERVER_PID=
    [ "$_rc" -eq 0 ] || fail "server exited with $_rc"
    # The listener must be gone before the next server starts.
    _n=0
    while ulog_listener_present && [ "$_n" -lt 100 ]; do usleep 50000; _n=$((_n + 1)); done
}
on_exit "server_stop"

# Sum of on-CPU nanoseconds of all threads of a process (/proc/PID/task/*/schedstat field 1).
cpu_ns() {
    [ -n "$1" ] || { echo 0; return; }
    cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f\n", s }'
}

# "busy total" jiffies of all CPUs from /proc/stat.
cpu_jiffies() {
    awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

fio_job() { # JOB FILE RUNTIME OUTPUT
    case $1 in
        rand4k-qd1) _a="--rw=randwrite --bs=4k --iodepth=1" ;;
        rand4k-qd32) _a="--rw=randwrite --bs=4k --iodepth=32" ;;
        seq64k-qd8) _a="--rw=write --bs=64k --iodepth=8" ;;
        *) fail "unknown job $1" ;;
    esac
    # shellcheck disable=SC2086
    fio --name="$1" --filename="$2" --ioengine=libaio --direct=1 $_a --time_based \
        --runtime="$3" --ramp_time="$RAMP" --norandommap --randrepeat=0 \
        --output-format=json --output="$4" >/dev/null 2>"$4.err" || { cat "$4.err"; fail "fio $1 failed"; }
}

# ---- tracing ---------------------------------------------------------------------------------
TRACE_READY=
trace_setup() {
    [ -n "$TRACE_READY" ] && return 0
    [ -d "$T/events" ] || fail "no tracefs at $T"
    grep -q x86-tsc "$T/trace_clock" || fail "trace_clock has no x86-tsc: $(cat $T/trace_clock)"
    echo 0 >"$T/tracing_on"
    echo x86-tsc >"$T/trace_clock"
    echo "$TRACE_BUF_KB" >"$T/buffer_size_kb"
    # dm_consult_userspace(uuid, luid, request_type, data, data_size, rdata, rdata_size)
    echo 'p:ulogb/consult dm_consult_userspace type=%dx:s32' >>"$T/kprobe_events" || fail "kprobe consult"
    echo 'r:ulogb/consult_ret dm_consult_userspace ret=$retval:s32' >>"$T/kprobe_events" || fail "kretprobe"
    # cn_netlink_send(struct cn_msg *msg, ...): cb_id.idx +0, seq +8; the request's type at
    # 20 (cn_msg) + 152.
    echo 'p:ulogb/cnsend cn_netlink_send idx=+0(%di):u32 seq=+8(%di):u32 type=+172(%di):u32' >>"$T/kprobe_events" || fail "kprobe cn_netlink_send"
    echo 'idx == 7' >"$T/events/ulogb/cnsend/filter"
    # cn_ulog_callback(struct cn_msg *msg, struct netlink_skb_parms *nsp): the reply reaches dm.
    echo 'p:ulogb/cb cn_ulog_callback seq=+8(%di):u32 len=+16(%di):u16' >>"$T/kprobe_events" || fail "kprobe cn_ulog_callback"
    [ -d "$T/events/syscalls/sys_exit_recvfrom" ] || fail "no syscall tracepoints"
    TRACE_READY=1
}

trace_events() { # MODE: the events of that mode
    case $1 in
        rtt) echo "ulogb/consult ulogb/consult_ret" ;;
        breakdown) echo "ulogb/consult ulogb/consult_ret ulogb/cnsend ulogb/cb syscalls/sys_exit_recvfrom syscalls/sys_enter_sendto" ;;
    esac
}

trace_marker() {
    read -r _up _ </proc/uptime
    echo "TRACE-CAL $_up" >"$T/trace_marker"
}

trace_begin() { # MODE SERVER_PID
    trace_setup
    if [ "$1" = breakdown ]; then
        _f=
        for _t in /proc/"$2"/task/*; do
            _f="${_f:+$_f || }common_pid == ${_t##*/}"
        done
        echo "$_f" >"$T/events/syscalls/sys_exit_recvfrom/filter"
        echo "$_f" >"$T/events/syscalls/sys_enter_sendto/filter"
    fi
    echo >"$T/trace"
    for _e in $(trace_events "$1"); do echo 1 >"$T/events/$_e/enable"; done
    echo 1 >"$T/tracing_on"
    trace_marker
}

trace_end() { # MODE OUTFILE
    trace_marker
    echo 0 >"$T/tracing_on"
    for _e in $(trace_events "$1"); do echo 0 >"$T/events/$_e/enable"; done
    cat "$T/trace" >"$2"
    echo >"$T/trace"
}

# ---- one run -----------------------------------------------------------------------------
RUNS=0
one_run() { # MODE CONFIG JOB RUNTIME ROUND
    _mode=$1
    _cfg=$2
    _job=$3
    _tag="$1.$2.$3.r$5"
    _kind=$(server_of "$_cfg")
    server_start "$_kind" "$OUT/$_tag.server"
    run_limited 30 dmsetup create "$DEV" --table "$(table "$_cfg")"
    _dm=
    for _d in /sys/block/dm-*; do
        [ "$(cat "$_d/dm/name" 2>/dev/null)" = "$DEV" ] && _dm=${_d##*/}
    done
    [ -n "$_dm" ] || fail "no /sys/block/dm-* named $DEV"
    [ "$_mode" = iops ] || trace_begin "$_mode" "$SERVER_PID"
    _c0=$(cpu_ns "$SERVER_PID")
    # The host timestamps these console lines and samples qemu's CPU time meanwhile.
    echo "BENCH-MARK start $_tag"
    _j0=$(cpu_jiffies)
    _t0=$(now_cs)
    fio_job "$_job" "/dev/mapper/$DEV" "$4" "$OUT/$_tag.json"
    _t1=$(now_cs)
    _j1=$(cpu_jiffies)
    echo "BENCH-MARK end $_tag"
    _c1=$(cpu_ns "$SERVER_PID")
    [ "$_mode" = iops ] || trace_end "$_mode" "$OUT/$_tag.trace"
    # /sys/block/dm-N/stat field 1 = reads completed, 5 = writes completed (since creation).
    _writes=$(awk '{ print $5 }' "/sys/block/$_dm/stat")
    echo "writes $_writes" >"$OUT/$_tag.stat"
    echo "server_cpu_ns $((_c1 - _c0))" >>"$OUT/$_tag.stat"
    echo "cpu_jiffies $_j0 $_j1" >>"$OUT/$_tag.stat"
    echo "wall_cs $((_t1 - _t0))" >>"$OUT/$_tag.stat"
    if [ "$_kind" = agent-probes ] || [ "$_kind" = agent-probes-nostats ]; then
        # The probes' own cost (kernel BPF statistics) and counts, for the report.
        wget -q -O - http://127.0.0.1:9477/metrics 2>/dev/null |
            grep -E '^ulog_(probe_|kernel_requests_total|kernel_request_duration_seconds_(sum|count)|kernel_events_lost)' >"$OUT/$_tag.probes"
        grep -q '^ulog_probe_attached 1' "$OUT/$_tag.probes" || fail "$_tag: probes not attached: $(grep 'eBPF' "$OUT/$_tag.server" | head -n 2)"
    fi
    run_limited 30 dmsetup remove "$DEV"
    server_stop
    RUNS=$((RUNS + 1))
    log "run $RUNS/$TOTAL_RUNS $_tag: $(sed -n 's/.*"iops" : \([0-9.]*\).*/\1/p' "$OUT/$_tag.json" | sed -n 2p) IOPS, $_writes writes"
}

# rotate N WORD...: the words rotated left by N.
rotate() {
    _n=$1
    shift
    _c=$#
    _k=0
    _res=
    while [ "$_k" -lt "$_c" ]; do
        _idx=$(((_k + _n) % _c + 1))
        eval "_w=\${$_idx}"
        _res="$_res $_w"
        _k=$((_k + 1))
    done
    echo "$_res"
}

set -- $CONFIGS
NCONF=$#
set -- $JOBS
NJOBS=$#
set -- $TRACE_CONFIGS
NTRACE=$#
set -- $BREAKDOWN_JOBS
NBD=$#
set -- $RESYNC_CONFIGS
NRESYNC=$#
set -- $RESYNC_TRACE_CONFIGS
NRTRACE=$#
TOTAL_RUNS=$((ROUNDS * NJOBS * NCONF + NTRACE * (NJOBS + NBD) + ROUNDS * 3 * NRESYNC + NRTRACE))
log "plan: $ROUNDS rounds x $NJOBS jobs x $NCONF configs of ${RUNTIME}s, then $NTRACE traced configs x ($NJOBS + $NBD) runs of ${TRACE_RUNTIME}s: $TOTAL_RUNS runs"

round=1
while [ "$round" -le "$ROUNDS" ]; do
    for job in $JOBS; do
        # shellcheck disable=SC2086
        for cfg in $(rotate $((round - 1)) $CONFIGS); do
            one_run iops "$cfg" "$job" "$RUNTIME" "$round"
        done
    done
    round=$((round + 1))
done
if [ "$NTRACE" -gt 0 ]; then
    for job in $JOBS; do
        for cfg in $TRACE_CONFIGS; do one_run rtt "$cfg" "$job" "$TRACE_RUNTIME" 1; done
    done
    for job in $BREAKDOWN_JOBS; do
        for cfg in $TRACE_CONFIGS; do one_run breakdown "$cfg" "$job" "$TRACE_RUNTIME" 1; done
    done
fi

# ---- resync runs ----------------------------------------------------------------------------
resync_table() { # CONFIG: the same mirror, default sync mode (a full initial resync)
    case $1 in
        core) echo "0 $SECTORS mirror core 1 $RESYNC_REGION 2 $L0 0 $L1 0" ;;
        ucore | rsync) echo "0 $SECTORS mirror userspace 3 $UUID clustered-core $RESYNC_REGION 2 $L0 0 $L1 0" ;;
        *) fail "unknown resync config $1" ;;
    esac
}

# sync_count DEV: the first number of "<in sync>/<regions>" in the mirror's status.
sync_count() { dmsetup status "$1" | awk '{ split($(5 + $4), a, "/"); print a[1] }'; }

resync_run() { # MODE(iops|rtt) CONFIG KIND(idle|writes) ROUND
    _tag="resync.$2.$3.r$4"
    [ "$1" = rtt ] && _tag="resynctrace.$2.$3.r$4"
    _kind=$(server_of "$2")
    server_start "$_kind" "$OUT/$_tag.server"
    [ "$1" = iops ] || trace_begin "$1" "$SERVER_PID"
    _c0=$(cpu_ns "$SERVER_PID")
    if [ "$3" = iops ]; then
        run_limited 30 dmsetup create "$DEV" --table "0 $SECTORS linear $L0 0"
        _dm=$(dm_sysfs "$DEV")
        fio --name=rand4k --filename="/dev/mapper/$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
            --iodepth=1 --time_based --runtime="$RESYNC_IOPS_RUNTIME" --ramp_time=1 --norandommap --randrepeat=0 \
            --output-format=json --output="$OUT/$_tag.iopsjson" >/dev/null 2>"$OUT/$_tag.iops.err" &
        _fio=$!
        _n=0
        until [ "$(awk '{ print $5 }' "/sys/block/$_dm/stat")" -gt 0 ]; do
            [ "$_n" -lt 600 ] || fail "$_tag: fio wrote nothing in 30 s"
            usleep 50000
            _n=$((_n + 1))
        done
    fi
    echo "BENCH-MARK start $_tag"
    _j0=$(cpu_jiffies)
    _t0=$(now_cs)
    if [ "$3" = iops ]; then
        dmsetup suspend "$DEV" && dmsetup load "$DEV" --table "$(resync_table "$2")" && dmsetup resume "$DEV" ||
            fail "$_tag: linear -> mirror failed"
    else
        run_limited 30 dmsetup create "$DEV" --table "$(resync_table "$2")"
    fi
    _t1=$(now_cs)
    {
        echo "regions $RESYNC_REGIONS"
        echo "create_cs $((_t1 - _t0))"
    } >"$OUT/$_tag.res"
    if [ "$3" = iops ]; then
        wait "$_fio" || { cat "$OUT/$_tag.iops.err"; fail "fio rand4k failed"; }
        echo "sync_after_iops $(sync_count "$DEV")" >>"$OUT/$_tag.res"
    elif [ "$3" = idle ]; then
        # The mirror raises a table event when its sync completes (do_recovery); loop in case
        # another event (none expected) comes first.
        _ev=0
        _n=0
        while :; do
            run_limited 900 dmsetup wait "$DEV" "$_ev"
            _sc=$(sync_count "$DEV")
            [ "$_sc" = "$RESYNC_REGIONS" ] && break
            _ev=$(dmsetup info "$DEV" | awk '/Event number/ { print $3 }')
            _n=$((_n + 1))
            [ "$_n" -lt 10 ] || fail "$_tag: events but no sync ($_sc/$RESYNC_REGIONS)"
        done
        _t2=$(now_cs)
        echo "synced_cs $((_t2 - _t0))" >>"$OUT/$_tag.res"
    else
        _w0=$(now_cs)
        for _b in $W40_BLOCKS; do
            dd if=/dev/zero of="/dev/mapper/$DEV" bs=4096 count=1 seek="$_b" oflag=direct conv=notrunc status=none ||
                fail "$_tag: write at block $_b failed"
        done
        _w1=$(now_cs)
        echo "w40_cs $((_w1 - _w0))" >>"$OUT/$_tag.res"
        echo "sync_after_w40 $(sync_count "$DEV")" >>"$OUT/$_tag.res"
    fi
    _j1=$(cpu_jiffies)
    echo "BENCH-MARK end $_tag"
    _c1=$(cpu_ns "$SERVER_PID")
    [ "$1" = iops ] || trace_end "$1" "$OUT/$_tag.trace"
    {
        echo "server_cpu_ns $((_c1 - _c0))"
        echo "cpu_jiffies $_j0 $_j1"
        # Each server thread since it started: on-CPU ns, run-queue wait ns, timeslices
        # (schedstat), and context switches (voluntary, involuntary): where its time goes.
        [ -z "$SERVER_PID" ] || for _t in /proc/"$SERVER_PID"/task/*; do
            echo "thread_sched $(tr ' ' _ <"$_t/comm") $(cat "$_t/schedstat") $(awk '/ctxt_switches/ { printf "%s ", $2 }' "$_t/status")"
        done
    } >>"$OUT/$_tag.res"
    run_limited 60 dmsetup remove "$DEV"
    server_stop
    RUNS=$((RUNS + 1))
    log "run $RUNS/$TOTAL_RUNS $_tag: $(tr '\n' ' ' <"$OUT/$_tag.res")"
}

# dm_sysfs NAME: dm-N of a dm device.
dm_sysfs() {
    for _d in /sys/block/dm-*; do
        [ "$(cat "$_d/dm/name" 2>/dev/null)" = "$1" ] && echo "${_d##*/}"
    done
}

# The 40 writes' 4 KiB block numbers: fixed pseudo-random ones in the last quarter of the
# device, the last region excluded (the only one a hint of N-1 may still throttle).
W40_BLOCKS=$(awk -v n="$((SIZE_MIB * 256))" -v rb="$((RESYNC_REGION / 8))" 'BEGIN {
    srand(42); lo = int(n * 3 / 4); hi = n - rb
    for (i = 0; i < 40; i++) printf "%d ", lo + int(rand() * (hi - lo))
}')

if [ -n "$RESYNC_CONFIGS" ]; then
    round=1
    while [ "$round" -le "$ROUNDS" ]; do
        for kind in idle writes iops; do
            # shellcheck disable=SC2086
            for cfg in $(rotate $((round - 1)) $RESYNC_CONFIGS); do
                resync_run iops "$cfg" "$kind" "$round"
            done
        done
        round=$((round + 1))
    done
    for cfg in $RESYNC_TRACE_CONFIGS; do resync_run rtt "$cfg" idle 1; done
fi

log "writing $(du -sk "$OUT" | cut -f1) KiB of results to $RES_DEV"
(cd /tmp && tar -cf "$RES_DEV" results) || fail "tar to $RES_DEV failed"
sync
log "done"
