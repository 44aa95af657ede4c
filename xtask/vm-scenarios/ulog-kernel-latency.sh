# ulog-kernel-latency: the eBPF latency probes, end to end on the real kernel.
#  1. dm_log_userspace is unloaded, then the agent starts: it serves and reports the probes not
#     attached (ulog_probe_attached 0); `modprobe dm-log-userspace`: the probes attach (the agent
#     looks for the module every 2 s).
#  2. A clustered-core mirror (8 MiB, 32 regions), resync, 256 O_DIRECT 4 KiB writes, quiet.
#     For every request type: the kernel's count (kprobe) == the agent's own count (its service
#     time histogram) == the kernel round-trip histogram's count (every call returned) == the
#     requests correlated by seq (nothing lost, nothing unmatched); no inversions; stage
#     histograms present; the probes' own run counts (BPF statistics) are measured.
#  3. /api/v1/kernel/slow?all=true: for every correlated request, kernel total >= the agent's
#     service time (and >= the sum of the three stages).
#  4. Mirror removed, module unloaded: the probes detach (ulog_probe_attached 0), the kernel
#     counters keep their values; module loaded again: they reattach, and a second mirror's
#     requests add up (served == kernel_sent for every type in the exit summary).
. /scenarios/lib.sh

MIB=8
SECTORS=$((MIB * 2048))
REGION=512 # 256 KiB: 32 regions
UUID=LVM-ulogklatency0001
URL=$AGENT_URL

# wait_attached WANT SECS: until ulog_probe_attached is WANT.
wait_attached() {
    _n=0
    while :; do
        scrape wa.txt
        [ "$(value wa.txt ulog_probe_attached)" = "$1" ] && break
        [ "$_n" -lt $(($2 * 5)) ] || fail "ulog_probe_attached is not $1 after $2 s (status: $(wget -q -O - "$URL/api/v1/agent" | grep -o '"probe":{[^}]*}'))"
        agent_alive || fail "ulog-agent died"
        usleep 200000
        _n=$((_n + 1))
    done
    log "ulog_probe_attached $1 after ${_n}/5 s"
}
TYPES="CTR DTR PRESUSPEND POSTSUSPEND RESUME GET_REGION_SIZE IS_CLEAN IN_SYNC FLUSH MARK_REGION CLEAR_REGION GET_RESYNC_WORK SET_REGION_SYNC GET_SYNC_COUNT STATUS_INFO STATUS_TABLE IS_REMOTE_RECOVERING"

# 1. Module after the agent.
run rmmod dm_log_userspace
[ ! -d /sys/module/dm_log_userspace ] || fail "dm_log_userspace still loaded"
loop_create L0 leg0.img "$MIB"
loop_create L1 leg1.img "$MIB"
make_pattern W.pat W 1
ulog_start
agent_json_lines "eBPF probes not attached yet; they attach when the module loads" | grep -q . ||
    fail "the agent did not say it waits for the module: $(agent_log_since_mark | grep 'eBPF' | head -n 2)"
scrape m0.txt
assert_eq "$(value m0.txt ulog_probe_attached)" 0 "ulog_probe_attached before the module is loaded"
run modprobe dm-log-userspace
wait_attached 1 10

# 2. Workload.
dm_create uklat "0 $SECTORS mirror userspace 3 $UUID clustered-core $REGION 2 $L0 0 $L1 0 1 handle_errors"
wait_for_sync uklat 60
run dd if=W.pat of=/dev/mapper/uklat bs=4k count=256 oflag=direct status=none
run dmsetup status uklat
wait_quiet m1.txt

checked=0
for t in $TYPES; do
    kernel=$(value m1.txt "ulog_kernel_requests_total{type=\"$t\"}")
    agent=$(value m1.txt "ulog_request_duration_seconds_count{type=\"$t\"}")
    rt=$(value m1.txt "ulog_kernel_request_duration_seconds_count{type=\"$t\"}")
    corr=$(value m1.txt "ulog_kernel_requests_correlated_total{type=\"$t\"}")
    assert_eq "$kernel" "$agent" "$t: sent by the kernel (kprobe) vs served by the agent"
    assert_eq "$rt" "$kernel" "$t: kernel round trips timed vs calls"
    assert_eq "$corr" "$kernel" "$t: correlated by seq vs calls"
    [ "$kernel" -gt 0 ] && checked=$((checked + 1))
    if [ "$kernel" -gt 0 ]; then
        for st in send server wakeup; do
            assert_eq "$(value m1.txt "ulog_kernel_request_stage_duration_seconds_count{type=\"$t\",stage=\"$st\"}")" "$kernel" "$t: stage $st observations"
        done
        log "$t: $kernel requests; kernel mean $(awk -v s="$(value m1.txt "ulog_kernel_request_duration_seconds_sum{type=\"$t\"}")" -v n="$kernel" 'BEGIN { printf "%.1f", s / n * 1e6 }') us, agent mean $(awk -v s="$(value m1.txt "ulog_request_duration_seconds_sum{type=\"$t\"}")" -v n="$kernel" 'BEGIN { printf "%.1f", s / n * 1e6 }') us"
    fi
done
[ "$checked" -ge 6 ] || fail "only $checked request types seen"
for r in no_send no_server not_seen; do
    assert_eq "$(value m1.txt "ulog_kernel_requests_uncorrelated_total{reason=\"$r\"}")" 0 "uncorrelated ($r)"
done
assert_eq "$(value m1.txt ulog_kernel_events_lost_total)" 0 "events lost"
assert_eq "$(value m1.txt ulog_kernel_correlation_inversions_total)" 0 "inversions (kernel total < agent service time)"
assert_eq "$(value m1.txt ulog_kernel_esrch_returns_total)" 0 "-ESRCH returns"
assert_eq "$(value m1.txt ulog_kernel_reconnect_attempts_total)" 0 "reconnect attempts"
assert_eq "$(sum m1.txt ulog_kernel_request_retries_total)" 0 "retries"
calls=$(sum m1.txt ulog_kernel_requests_total)
# The counters of calls the probes saw only in part are exported (and zero here).
grep -q '^ulog_kernel_requests_untimed_total{reason="inflight_full"} ' m1.txt || fail "ulog_kernel_requests_untimed_total not exported"
assert_eq "$(value m1.txt 'ulog_kernel_requests_untimed_total{reason="inflight_full"}')" 0 "untimed: in-flight map full"
assert_eq "$(value m1.txt 'ulog_kernel_requests_untimed_total{reason="unmatched_return"}')" 0 "untimed: returns without entry"
assert_eq "$(value m1.txt ulog_kernel_sends_total)" "$calls" "sends seen vs calls (one send each, no resends)"
assert_eq "$(value m1.txt ulog_kernel_sends_unmatched_total)" 0 "sends outside a timed call"
for p in dm_consult_userspace dm_consult_userspace_ret cn_netlink_send; do
    runs=$(value m1.txt "ulog_probe_runs_total{program=\"$p\"}")
    secs=$(value m1.txt "ulog_probe_run_seconds_total{program=\"$p\"}")
    [ "$runs" -gt 0 ] || fail "no runs of $p counted (BPF statistics)"
    log "probe cost: $p $runs runs, $(awk -v s="$secs" -v n="$runs" 'BEGIN { printf "%.0f", s / n * 1e9 }') ns per run"
done
assert_eq "$(value m1.txt "ulog_probe_runs_total{program=\"dm_consult_userspace\"}")" "$calls" "kprobe runs vs kernel calls"

# 3. Per request: kernel total >= agent service time.
wget -q -O all.json "$URL/api/v1/kernel/slow?all=true&limit=256" || fail "GET /api/v1/kernel/slow"
grep -q '"kind":"all"' all.json || fail "not a kernel request list: $(head -c 300 all.json)"
awk '{
    n = split($0, recs, /\{"seq":/)
    bad = 0; c = 0
    for (i = 2; i <= n; i++) {
        r = recs[i]
        split("kernel_seconds send_seconds server_seconds wakeup_seconds", keys, " ")
        for (k = 1; k <= 4; k++) {
            j = index(r, "\"" keys[k] "\":")
            s = substr(r, j + length(keys[k]) + 3)
            sub(/[,}].*/, "", s)
            v[k] = s + 0
        }
        c++
        if (v[1] < v[3]) { bad++; print "kernel total " v[1] " < agent service " v[3] ": {\"seq\":" substr(r, 1, 300) > "/dev/stderr" }
        if (v[1] + 1e-9 < v[2] + v[3] + v[4]) { bad++; print "kernel total " v[1] " < stages " v[2] "+" v[3] "+" v[4] > "/dev/stderr" }
    }
    print c, bad
}' all.json >check.txt || fail "cannot check all.json"
read -r nrec nbad <check.txt
[ "$nrec" -gt 200 ] || fail "only $nrec correlated requests listed"
assert_eq "$nbad" 0 "requests whose kernel total is below the agent's service time (or the stages)"
log "$nrec correlated requests: kernel total >= agent service time and >= send+server+wakeup for each"

# 4. Unload, detach, reload, reattach.
dm_remove uklat
wait_quiet m2.txt
run rmmod dm_log_userspace
wait_attached 0 10
agent_json_lines "eBPF probes detached" | grep -q 'unloaded' || fail "no 'eBPF probes detached' line (module unloaded)"
scrape m3.txt
assert_eq "$(sum m3.txt ulog_kernel_requests_total)" "$(sum m2.txt ulog_kernel_requests_total)" "kernel request counts kept after the detach"
run modprobe dm-log-userspace
wait_attached 1 10
dm_create uklat2 "0 $SECTORS mirror userspace 4 LVM-ulogklatency0002 clustered-core $REGION nosync 2 $L0 0 $L1 0"
run dd if=W.pat of=/dev/mapper/uklat2 bs=4k count=64 oflag=direct status=none
dm_remove uklat2
wait_quiet m4.txt
for t in $TYPES; do
    assert_eq "$(value m4.txt "ulog_kernel_requests_total{type=\"$t\"}")" "$(value m4.txt "ulog_request_duration_seconds_count{type=\"$t\"}")" "$t after the reattach: kernel vs agent"
    assert_eq "$(value m4.txt "ulog_kernel_requests_correlated_total{type=\"$t\"}")" "$(value m4.txt "ulog_request_duration_seconds_count{type=\"$t\"}")" "$t after the reattach: correlated vs agent"
done
ulog_stop_totals totals
assert_totals totals exact CTR RESUME IN_SYNC MARK_REGION FLUSH DTR
log "passed"
