# ulog-slo-stall: a 2 s stall of the agent under a MARK_REGION-heavy write load turns the latency
# SLO (dashboards/ulog-slo.yml, eBPF probes attached) red, although every request the agent
# received was answered fast.
#  1. The agent (probes attached, --slow-request-us 500000: /api/v1/kernel/slow lists only round
#     trips of at least 0.5 s) serves four nosync clustered-core mirrors (256 regions of 64 KiB).
#  2. One writer per mirror: O_DIRECT 4 KiB writes, each to the next region (a clean region: the
#     kernel sends IN_SYNC, MARK_REGION, FLUSH for each). Once every mirror has written, the agent
#     is stopped (SIGSTOP) for 2 s and continued; the writers stop. The requests that waited
#     through the stall are those /api/v1/kernel/slow lists. Each busy mirror has one request in
#     flight, of whatever type; a round repeats (at most 6) until one of them is an SLO type
#     (MARK_REGION or FLUSH: a call of that type in the round's window beyond the threshold). Measured: most stalls catch IN_SYNC (two per write, and not in an
#     SLO), so 1-4 rounds are usual.
#  3. For each SLO type the last round's stall caught: the SLI of ulog-slo.yml evaluated by hand
#     on the counter increases over that round's window, from just before SIGSTOP (every writer
#     busy) to the quiet after the writers stopped (a window of steady MARK load with a stall in
#     it, as the rules' 5m window would be on a mirror written at this rate; Prometheus' rate
#     extrapolation cancels in the ratio):
#        SLI = (Δ ulog_kernel_request_duration_seconds_bucket{type=T,le="0.016384"}
#               - Δ sum ulog_requests_total{type=T,result="error"})
#              / Δ ulog_kernel_requests_total{type=T}
#     must be below the objective (0.999), and the fast-burn condition
#     1 - SLI > 14.4 * (1 - 0.999) must hold (for both windows, so UlogMarkLatencyBudgetFastBurn
#     or UlogFlushLatencyBudgetFastBurn would fire). The SLI of the previous rules (the agent's
#     service time: Δ ulog_request_duration_seconds_bucket{type=T,le="0.02"} / Δ _count) is logged
#     next to it; the agent never saw the stall, so it stays at or near 1.
# The stall is the input; nothing else is timed.
. /scenarios/lib.sh

MIB=16
SECTORS=$((MIB * 2048))
REGION=128 # 64 KiB: 256 regions
MIRRORS="0 1 2 3"
LE=0.016384 # the rules' bucket: ulog:slo_threshold:seconds
OBJECTIVE=0.999
FAST_BURN=14.4
URL=$AGENT_URL

make_pattern W.pat W 1
ulog_start --slow-request-us 500000
[ "$(ulog_probe_state)" = attached ] || fail "probes not attached: the kernel-side SLI needs them"
for j in $MIRRORS; do
    loop_create LA leg$j-a.img "$MIB"
    loop_create LB leg$j-b.img "$MIB"
    dm_create uslo$j "0 $SECTORS mirror userspace 4 LVM-ulogslostall000$j clustered-core $REGION nosync 2 $LA 0 $LB 0"
done
wait_quiet m0.txt

# writer J FIRST: one O_DIRECT 4 KiB write per region, region after region from region FIRST on,
# until ./stop exists; ./started.J after its second write.
writer() {
    _i=0
    w=$2
    while [ ! -e stop ]; do
        dd if=W.pat of=/dev/mapper/uslo$1 bs=4k count=1 skip=$((w % 256)) seek=$(((w % 256) * REGION / 8)) \
            oflag=direct conv=notrunc status=none || exit 1
        w=$((w + 1))
        _i=$((_i + 1))
        if [ "$_i" -eq 2 ]; then touch started.$1; fi
    done
}

# stalled_types: the types of the requests listed by /api/v1/kernel/slow (round trip >= 0.5 s).
stalled_types() {
    wget -q -O slow.json "$URL/api/v1/kernel/slow?limit=256" || fail "GET /api/v1/kernel/slow"
    grep -o '"type":"[A-Z_]*"' slow.json | cut -d'"' -f4 | sort | uniq -c | awk '{ printf "%s=%s ", $2, $1 }'
}

# d SERIES: its increase from m0.txt to m1.txt.
d() { echo $(($(value m1.txt "$1") - $(value m0.txt "$1"))); }
# error_answers FILE TYPE: sum of ulog_requests_total{type=TYPE,result="error"} over all logs.
error_answers() {
    awk -v t="$2" 'index($1, "ulog_requests_total{") == 1 && index($1, "type=\"" t "\"") && index($1, "result=\"error\"") { s += $2 } END { printf "%d\n", s }' "$1"
}

round=0
while :; do
    round=$((round + 1))
    rm -f stop started.*
    pids=""
    for j in $MIRRORS; do
        writer "$j" $((round * 64)) &
        pids="$pids $!"
    done
    # Until every mirror has written twice: the stall then finds each busy with a write (few
    # writes before it: a short run, so one stalled request weighs in the SLI as in a quiet hour).
    n=0
    while :; do
        [ "$(ls started.* 2>/dev/null | wc -l)" -eq "$(echo $MIRRORS | wc -w)" ] && break
        [ "$n" -lt 600 ] || fail "the writers made no progress in 30 s"
        usleep 50000
        n=$((n + 1))
    done
    # The window the SLI is evaluated over starts here, with every writer busy: it holds the
    # stall and the writes that complete after it (the writers stop right after SIGCONT).
    scrape m0.txt
    kill -STOP "$AGENT_PID"
    log "round $round: agent stopped (SIGSTOP) for 2 s under the write load"
    sleep 2
    kill -CONT "$AGENT_PID"
    touch stop
    for p in $pids; do wait_exit "$p" 30 "writer $p"; done
    wait_quiet m1.txt
    stalled=$(stalled_types)
    log "round $round: requests that waited through a stall so far (kernel round trip >= 0.5 s): ${stalled:-none}"
    # Did this round's stall catch an SLO type in flight (a kernel call of that type beyond the
    # threshold within the window)?
    caught=""
    for t in MARK_REGION FLUSH; do
        slow=$(($(d "ulog_kernel_requests_total{type=\"$t\"}") - $(d "ulog_kernel_request_duration_seconds_bucket{type=\"$t\",le=\"$LE\"}")))
        if [ "$slow" -gt 0 ]; then caught="$caught $t"; fi
    done
    if [ -n "$caught" ]; then break; fi
    [ "$round" -lt 6 ] || fail "6 stalls and none caught a MARK_REGION or FLUSH in flight: $stalled"
done

# The rule's expression, by hand (see the header).
checked=0
for t in MARK_REGION FLUSH; do
    case "$caught " in *" $t "*) ;; *) continue ;; esac
    good=$(d "ulog_kernel_request_duration_seconds_bucket{type=\"$t\",le=\"$LE\"}")
    total=$(d "ulog_kernel_requests_total{type=\"$t\"}")
    errors=$(($(error_answers m1.txt "$t") - $(error_answers m0.txt "$t")))
    old_good=$(d "ulog_request_duration_seconds_bucket{type=\"$t\",le=\"0.02\"}")
    old_total=$(d "ulog_request_duration_seconds_count{type=\"$t\"}")
    [ "$total" -gt 0 ] || fail "$t: no kernel calls counted"
    grep -qF "ulog_kernel_request_duration_seconds_bucket{type=\"$t\",le=\"$LE\"} " m1.txt ||
        fail "$t: no kernel bucket le=$LE: $(grep "^ulog_kernel_request_duration_seconds_bucket{type=\"$t\"" m1.txt | head -n 30)"
    verdict=$(awk -v g="$good" -v e="$errors" -v n="$total" -v o="$OBJECTIVE" -v f="$FAST_BURN" -v og="$old_good" -v on="$old_total" 'BEGIN {
        good = g - e; if (good < 0) good = 0
        sli = good / n
        old = (on > 0) ? og / on : 1
        printf "%.6f %d %d %.6f\n", sli, (sli < o), (1 - sli > f * (1 - o)), old
    }')
    set -- $verdict
    log "$t: SLI $1 (kernel: $good within $LE s, $errors errors, $total calls); objective $OBJECTIVE; previous rules' SLI (agent service time) $4 ($old_good of $old_total)"
    assert_eq "$2" 1 "$t: SLI below the objective after the stall"
    assert_eq "$3" 1 "$t: fast-burn condition (1 - SLI > $FAST_BURN x budget, 5m and 1h windows)"
    checked=$((checked + 1))
done
[ "$checked" -ge 1 ] || fail "no SLO type checked"
for j in $MIRRORS; do dm_remove uslo$j; done
ulog_stop_totals totals
log "passed"
