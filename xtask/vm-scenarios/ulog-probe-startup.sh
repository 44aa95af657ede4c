# ulog-probe-startup: the eBPF request counter must count every request the agent serves.
# Once the agent listens on the connector group, the kernel (a `dmsetup create`, or the reconnect
# loop of live mirrors after a restart) can reach it, so its probe must be attached by then.
# The scenario waits for the agent to listen (busy loop), freezes it (SIGSTOP) and asserts the
# kprobe on dm_consult_userspace is registered (/sys/kernel/debug/kprobes/list). When it is not,
# it shows the consequence: a mirror created while the agent is frozen, served after SIGCONT, and
# after SIGTERM the exit summary has served != kernel_sent for CTR. Three attempts: the window
# is tens of ms under TCG and the busy loop may miss it.
. /scenarios/lib.sh

KPROBES=/sys/kernel/debug/kprobes/list
[ -r "$KPROBES" ] || fail "$KPROBES is not readable (debugfs not mounted?)"
probe_registered() { grep -q 'dm_consult_userspace' "$KPROBES"; }
probe_registered && fail "a kprobe on dm_consult_userspace is registered before the agent starts"

loop_create L0 leg0.img 4
loop_create L1 leg1.img 4
add_fail_hook _agent_fail_hook
attempt=1
while [ "$attempt" -le 3 ]; do
    agent_log_mark
    log "attempt $attempt: ulog-agent -f --log-format json"
    RUST_LOG=debug /bin/ulog-agent -f --log-format json >>"$AGENT_LOG" 2>&1 &
    AGENT_PID=$!
    on_exit "agent_stop KILL"
    n=0
    until ulog_listener_present; do
        n=$((n + 1))
        [ "$n" -lt 20000 ] || fail "ulog-agent does not listen"
        agent_alive || fail "ulog-agent exited"
    done
    kill -STOP "$AGENT_PID"
    if probe_registered; then
        log "attempt $attempt: listening, probe registered"
        kill -CONT "$AGENT_PID"
        agent_stop TERM
        attempt=$((attempt + 1))
        continue
    fi
    log "attempt $attempt: the agent listens but its probe is not registered yet ($(agent_log_since_mark | grep -c .) log lines so far)"
    dmsetup create uprobe --table "0 8192 mirror userspace 4 LVM-ulogprobestart01 clustered-core 1024 nosync 2 $L0 0 $L1 0" &
    cpid=$!
    on_exit "_dm_cleanup uprobe"
    usleep 500000
    kill -CONT "$AGENT_PID"
    wait "$cpid" || fail "dmsetup create failed"
    dm_remove uprobe
    ulog_stop_totals totals
    assert_totals totals exact CTR
    fail "the agent listened before its probe was attached (its totals happened to agree)"
done
log "passed: in 3 attempts the probe was always registered once the agent listened"
