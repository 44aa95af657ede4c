# ulog-shutdown: the agent must outlive its mirrors (issue 10, items 11 and 12), on the real
# kernel. A nosync clustered-core mirror (4 MiB legs, 8 regions of 512 KiB, all in sync and clean).
# 1. SIGTERM with the mirror live: the agent keeps serving and says why (once); a 4 KiB O_DIRECT
#    write to a clean region (needs MARK_REGION + FLUSH answered) completes within 10 s. Before
#    issue 10 the agent exited and the write waited in the kernel's reconnect loop for good.
# 2. After the mirror's removal (DTR), SIGTERM ends the agent with status 0.
# 3. A new agent and the mirror again:
#    - hardening: oom_score_adj -1000, memory locked (VmLck), every thread has
#      PF_MEMALLOC_NOIO|PF_LOCAL_THROTTLE (PR_SET_IO_FLUSHER, set before the threads existed);
#    - `ulog-agent check-state-dir` refuses a linear device stacked on the mirror (the chain
#      names both) and accepts a leg and /tmp. The VM kernel has no block filesystem module, so
#      the walk starts from the device node; at start-up the agent runs the same function on
#      its state dir's filesystem device;
#    - restart-style exit (`ulog-agent stop --restart`) with the mirror live: exit 0; a new
#      agent 0.3 s later; a write to another clean region completes within 15 s (the kernel's
#      reconnect loop retries every 2 s); the next write is served with MARK + FLUSH.
. /scenarios/lib.sh

MIB=4
SECTORS=$((MIB * 2048))
REGION=1024
UUID=LVM-ulogshutdown0001
DEV=ushut
TABLE="0 $SECTORS mirror userspace 4 $UUID clustered-core $REGION nosync 2"

loop_create L0 leg0.img "$MIB"
loop_create L1 leg1.img "$MIB"
make_pattern W.pat W 1
ulog_start
dm_create "$DEV" "$TABLE $L0 0 $L1 0"
assert_eq "$(mirror_sync_ratio "$DEV")" "8/8" "nosync: every region in sync"

log "==== 1. SIGTERM with the mirror live ===="
kill -TERM "$AGENT_PID"
usleep 1000000
run_limited 10 dd if=W.pat of="/dev/mapper/$DEV" bs=4096 count=1 seek=$((1 * REGION / 8)) oflag=direct conv=notrunc status=none
agent_alive || fail "the agent exited on SIGTERM with a live mirror"
kill -TERM "$AGENT_PID"
usleep 500000
agent_alive || fail "the agent exited on a second SIGTERM with a live mirror"
run_limited 10 dd if=W.pat of="/dev/mapper/$DEV" bs=4096 count=1 skip=1 seek=$((2 * REGION / 8)) oflag=direct conv=notrunc status=none
assert_eq "$(agent_log_since_mark | grep -c 'not exiting: logs are live, and without a log server')" 1 "one warning saying why"
log "the agent refused SIGTERM twice and served the writes"

log "==== 2. SIGTERM after the mirror is removed ===="
dm_remove "$DEV"
agent_stop TERM
assert_eq "$AGENT_RC" 0 "exit status after SIGTERM with no logs"
agent_log_since_mark | grep -q '"message":"no log is live: exiting"' || fail "the agent did not say why it exited"

log "==== 3. a new agent: hardening, state dir check, restart-style exit ===="
ulog_start
dm_create "$DEV" "$TABLE $L0 0 $L1 0"
log "---- hardening of the running agent"
assert_eq "$(cat /proc/"$AGENT_PID"/oom_score_adj)" -1000 "oom_score_adj"
locked=$(awk '$1 == "VmLck:" { print $2 }' /proc/"$AGENT_PID"/status)
rss=$(awk '$1 == "VmRSS:" { print $2 }' /proc/"$AGENT_PID"/status)
[ "${locked:-0}" -gt 0 ] || fail "agent memory not locked (VmLck $locked kB)"
log "agent VmLck $locked kB, VmRSS $rss kB; $(agent_json_lines 'memory locked (mlockall MCL_CURRENT|MCL_FUTURE)' | tr -d '\n')"
threads=0
for t in /proc/"$AGENT_PID"/task/*; do
    # stat field 9 is the task's flags (comm, field 2, has no blanks for our threads).
    flags=$(awk '{ print $9 }' "$t/stat")
    name=$(cat "$t/comm")
    # PF_MEMALLOC_NOIO 0x00080000, PF_LOCAL_THROTTLE 0x00100000
    [ $((flags & 0x180000)) -eq $((0x180000)) ] || fail "thread $name ($t): flags $flags lack PR_SET_IO_FLUSHER's PF_MEMALLOC_NOIO|PF_LOCAL_THROTTLE"
    threads=$((threads + 1))
done
log "PR_SET_IO_FLUSHER on all $threads threads"

log "---- a state dir on the mirror is refused"
dm_create ushut_lin "0 2048 linear /dev/mapper/$DEV 2048"
must_fail /bin/ulog-agent check-state-dir /dev/mapper/ushut_lin 2>check.err
cat check.err
mirror_dev=$(dmsetup info -c --noheadings -o major,minor "$DEV" | tr -d ' ')
assert_match "$(cat check.err)" "*sits on *dm-* -> $mirror_dev (dm-*), a device-mapper mirror with a userspace log (log $UUID)*" "check-state-dir on a device stacked on the mirror"
run /bin/ulog-agent check-state-dir "$L0"
run /bin/ulog-agent check-state-dir /tmp
dm_remove ushut_lin

log "---- restart-style exit with the mirror live"
run_limited 10 dd if=W.pat of="/dev/mapper/$DEV" bs=4096 count=1 skip=2 seek=$((3 * REGION / 8)) oflag=direct conv=notrunc status=none
old_pid=$AGENT_PID
run_limited 15 /bin/ulog-agent stop --restart
kill -0 "$old_pid" 2>/dev/null && fail "the agent still runs after stop --restart returned"
wait "$old_pid"
assert_eq "$?" 0 "exit status of the restart-style exit"
AGENT_PID=
usleep 300000
t0=$(now_cs)
ulog_start
run_limited 15 dd if=W.pat of="/dev/mapper/$DEV" bs=4096 count=1 skip=3 seek=$((4 * REGION / 8)) oflag=direct conv=notrunc status=none
log "write after the restart completed $(($(now_cs) - t0))0 ms after the new agent's start began"
wait_reconnect 5
# The write's IN_SYNC reached the new agent before the log did (-ESRCH: the kernel reconnects,
# then takes the resent IN_SYNC as "not in sync" and writes that region to one leg without a
# MARK; see ARCHITECTURE.md). The next write to a clean region is served normally.
run_limited 10 dd if=W.pat of="/dev/mapper/$DEV" bs=4096 count=1 skip=4 seek=$((5 * REGION / 8)) oflag=direct conv=notrunc status=none
dm_remove "$DEV"
ulog_stop_totals totals
for t in CTR RESUME MARK_REGION FLUSH; do
    [ "$(total totals $t)" -gt 0 ] || fail "the new agent served no $t"
done
log "passed"
