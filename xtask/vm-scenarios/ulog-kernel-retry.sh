# ulog-kernel-retry: a request that spans the kernel's 15 s timeout is counted as a resend.
# The agent runs with --probe-log (the eBPF programs' aya-log diagnostics). A nosync
# clustered-core mirror is created; the agent is frozen (SIGSTOP) and `dmsetup status` asks for
# GET_SYNC_COUNT, which waits 15 s, times out and is resent with a new seq; then the agent
# continues (SIGCONT) and answers both the stale request and the resend. Checked:
#  - ulog_kernel_request_retries_total{type="GET_SYNC_COUNT",reason="timeout"} is 1 (eagain 0);
#  - the kernel counts one GET_SYNC_COUNT call more than before, the agent two answers more;
#  - /api/v1/kernel/slow lists it: 2 attempts, first_seq != seq, kernel total >= 15 s, and
#    kernel total >= the agent's service time;
#  - the programs' own log (target ulog_ebpf) reported the resend.
# Adds ~17 s to the suite (the kernel's timeout cannot be shortened).
. /scenarios/lib.sh

URL=$AGENT_URL

loop_create L0 leg0.img 4
loop_create L1 leg1.img 4
RUST_LOG=debug,aya=info,aya_obj=info,ulog_ebpf=info ulog_start --probe-log
[ "$(ulog_probe_state)" = attached ] || fail "probes not attached"
dm_create ukretry "0 8192 mirror userspace 4 LVM-ulogkretry0001 clustered-core 1024 nosync 2 $L0 0 $L1 0"
run dmsetup status ukretry
scrape m0.txt
k0=$(value m0.txt 'ulog_kernel_requests_total{type="GET_SYNC_COUNT"}')
a0=$(value m0.txt 'ulog_request_duration_seconds_count{type="GET_SYNC_COUNT"}')
assert_eq "$k0" "$a0" "GET_SYNC_COUNT before: kernel vs agent"

kill -STOP "$AGENT_PID"
log "agent frozen; dmsetup status waits for the kernel's 15 s timeout"
dmsetup status ukretry >status.txt 2>&1 &
spid=$!
sleep 17
kill -CONT "$AGENT_PID"
wait_exit "$spid" 10 "dmsetup status (after the agent continued)" status.txt
log "status after the resend: $(cat status.txt)"

n=0
while :; do
    scrape m1.txt
    [ "$(value m1.txt 'ulog_kernel_requests_correlated_total{type="STATUS_INFO"}')" -gt "$(value m0.txt 'ulog_kernel_requests_correlated_total{type="STATUS_INFO"}')" ] && break
    [ "$n" -lt 20 ] || fail "the resent request's STATUS_INFO was never correlated"
    usleep 100000
    n=$((n + 1))
done
assert_eq "$(value m1.txt 'ulog_kernel_request_retries_total{type="GET_SYNC_COUNT",reason="timeout"}')" 1 "GET_SYNC_COUNT timeout resends"
assert_eq "$(value m1.txt 'ulog_kernel_request_retries_total{type="GET_SYNC_COUNT",reason="eagain"}')" 0 "GET_SYNC_COUNT eagain resends"
assert_eq "$(value m1.txt 'ulog_kernel_requests_total{type="GET_SYNC_COUNT"}')" "$((k0 + 1))" "GET_SYNC_COUNT calls (one call, two attempts)"
assert_eq "$(value m1.txt 'ulog_request_duration_seconds_count{type="GET_SYNC_COUNT"}')" "$((a0 + 2))" "GET_SYNC_COUNT answers (the stale attempt and the resend)"

wget -q -O slow.json "$URL/api/v1/kernel/slow" || fail "GET /api/v1/kernel/slow"
awk '{
    n = split($0, recs, /\{"seq":/)
    for (i = 2; i <= n; i++) {
        r = recs[i]
        if (index(r, "\"type\":\"GET_SYNC_COUNT\"") == 0 || index(r, "\"attempts\":2,") == 0) continue
        seq = r; sub(/,.*/, "", seq)
        f = r; sub(/.*"first_seq":/, "", f); sub(/,.*/, "", f)
        k = r; sub(/.*"kernel_seconds":/, "", k); sub(/[,}].*/, "", k)
        s = r; sub(/.*"server_seconds":/, "", s); sub(/[,}].*/, "", s)
        print seq, f, k + 0, s + 0
        exit
    }
}' slow.json >retry.txt
read -r seq first ktot serv <retry.txt || fail "no GET_SYNC_COUNT with 2 attempts in /api/v1/kernel/slow: $(head -c 600 slow.json)"
assert_ne "$seq" "$first" "the resend's seq vs the first attempt's"
awk -v k="$ktot" -v s="$serv" 'BEGIN { exit !(k >= 15 && k >= s) }' || fail "kernel total $ktot s (want >= 15 s and >= agent service $serv s)"
log "resent GET_SYNC_COUNT: seq $first then $seq, kernel total $ktot s, agent service of the resend $serv s"

agent_log_since_mark | grep '"target":"ulog_ebpf"' | grep -q 'resend: seq' ||
    fail "the eBPF programs' log (--probe-log) did not report the resend: $(agent_log_since_mark | grep -c ulog_ebpf) ulog_ebpf lines"
log "aya-log: $(agent_log_since_mark | grep '"target":"ulog_ebpf"' | grep 'resend' | head -n 1)"

dm_remove ukretry
ulog_stop_totals totals
assert_totals totals loose CTR GET_SYNC_COUNT
log "passed"
