# ulog-agent-kill: the agent is killed (SIGKILL) ten times during sustained writes and restarted
# each time after 0.3 s, as a supervisor would; nothing else talks to the kernel meanwhile.
# clustered-core with --state-dir (persistent: a restart does not resync everything), 16 MiB
# legs, features `1 handle_errors` (as LVM builds them).
# The writer rewrites the first 4 MiB (regions 0-7) pass after pass, one 512 KiB O_DIRECT write
# per region with a 150 ms pause after each, with data unique to each pass (pass n writes
# pattern P rotated by n 64 KiB chunks; P's blocks are all distinct), so a region that one leg
# missed is detected at the end.
# Kill moments are chosen, not left to chance:
# - kills 1-9 "between requests": 80 ms into a pause of the writer (its last write done and the
#   kernel's clear answered); the kernel's next request finds no server and starts its
#   reconnect loop (CTR + RESUME every 2 s), which reaches the new agent;
# - kill 10 "mid-request": the agent is frozen (SIGSTOP) in a pause of the writer, so the next
#   write's first request (IN_SYNC for its region) waits in dm_consult_userspace (seen in
#   /proc/*/stack); then it is killed. The kernel resends that request after 15 s to the new
#   agent, which does not know the log yet: the agent must make the kernel reconnect (answering
#   -ESRCH does) and the request must then be answered. (Kernel 6.1 retries such a request with
#   a reply capacity of 0 after an -ESRCH reply, "Insufficient space to receive package",
#   and takes the failed IN_SYNC as "not in sync": that write goes to leg 0 only. The log must
#   then not claim the region in sync.) The writer is stopped right after this pass, so no
#   later pass hides a write that missed leg 1.
# After each kill, the threads still waiting in dm_consult_userspace tell whether a request was
# left in flight (logged; a "between requests" kill that raced with a request costs 15 s more).
# After each restart: the kernel must reconnect within 25 s (the new agent logs the reconnect
# CTR; an answer with an error other than -ESRCH fails at once) and the writer must progress
# (the next kill waits for a write completed after the reconnect).
# At the end the writer exits 0 (no I/O error); the mirror is suspended + resumed (after a
# reconnect the kernel asks for resync work only after its next resume), returns to N/N, and both
# legs hold A with the last pass's data (per-region comparison printed on a difference).
. /scenarios/lib.sh

MIB=16
SECTORS=$((MIB * 2048))
REGION=1024
REGIONS=$((SECTORS / REGION))
UUID=LVM-ulogagentkill001
DEV=ukill
KILLS=10

loop_create L0 leg0.img "$MIB"
loop_create L1 leg1.img "$MIB"
make_pattern A.pat A "$MIB"
write_at "$L0" A.pat 0
mkdir -p state
ARGS="--state-dir $PWD/state"

ulog_start $ARGS
dm_create "$DEV" "0 $SECTORS mirror userspace 3 $UUID clustered-core $REGION 2 $L0 0 $L1 0 1 handle_errors"
wait_for_sync "$DEV" 60

make_pattern P.pat P 4
cat P.pat P.pat >PP.pat
# pass_data N: pass N's 4 MiB (P rotated by N mod 64 chunks of 64 KiB) on stdout.
pass_data() { dd if=PP.pat bs=64k skip=$(($1 % 64)) count=64 status=none; }
echo 0 >progress
(
    n=0
    while [ ! -e stop ]; do
        n=$((n + 1))
        c=0
        while [ "$c" -lt 8 ]; do
            dd if=PP.pat of="/dev/mapper/$DEV" bs=64k skip=$((n % 64 + c * 8)) seek=$((c * 8)) count=8 \
                oflag=direct conv=notrunc status=none || { echo "write error in pass $n" >writer.err; exit 1; }
            : >gap
            usleep 150000
            rm -f gap
            c=$((c + 1))
        done
        echo "$n" >progress
    done
) &
WRITER=$!
# After a failure: stop the writer and make sure an agent serves, so the kernel can finish its
# pending requests and the mirror can be removed (a kernel in its reconnect loop blocks removal).
cleanup_writer() {
    touch stop
    kill -CONT "$AGENT_PID" 2>/dev/null
    agent_alive || ulog_start $ARGS >/dev/null 2>&1
    _n=0
    while kill -0 "$WRITER" 2>/dev/null && [ "$_n" -lt 50 ]; do usleep 100000; _n=$((_n + 1)); done
}
on_exit cleanup_writer
# wait_progress SECS: until the writer finished one more pass.
wait_progress() {
    _p=$(cat progress)
    _t0=$(now_cs)
    while [ "$(cat progress)" -le "$_p" ]; do
        kill -0 "$WRITER" 2>/dev/null || fail "the writer stopped: $(cat writer.err 2>/dev/null)"
        [ $(($(now_cs) - _t0)) -lt $(($1 * 100)) ] || fail "the writer made no progress in $1 s: $(mirror_status "$DEV")"
        usleep 100000
    done
}
# kernel_waiters: threads blocked in dm_consult_userspace (a log request sent, no answer yet).
kernel_waiters() { grep -l dm_consult_userspace /proc/[0-9]*/stack 2>/dev/null | wc -l; }
# kill_agent_at idle|busy: SIGKILL the agent 80 ms into a pause of the writer (idle), or once it
# is frozen with the kernel waiting for its answer (busy). Sets IN_FLIGHT (waiters just after).
kill_agent_at() {
    rm -f gap
    _n=0
    until [ -e gap ]; do   # a write completed since the last kill: the writer progresses
        kill -0 "$WRITER" 2>/dev/null || fail "the writer stopped: $(cat writer.err 2>/dev/null)"
        [ "$_n" -lt 3000 ] || fail "no write completed within 30 s: $(mirror_status "$DEV")"
        usleep 10000
        _n=$((_n + 1))
    done
    usleep 80000
    case $1 in
        busy)
            kill -STOP "$AGENT_PID"
            _n=0
            until [ "$(kernel_waiters)" -gt 0 ]; do
                [ "$_n" -lt 100 ] || fail "no log request reached the frozen agent within 10 s"
                usleep 100000
                _n=$((_n + 1))
            done
            ;;
    esac
    agent_stop KILL
    IN_FLIGHT=$(kernel_waiters)
    log "ulog-agent killed ($1): $IN_FLIGHT request(s) left in flight"
}

wait_progress 30
k=1
while [ "$k" -le "$KILLS" ]; do
    t0=$(now_cs)
    mode=idle
    [ "$k" -eq "$KILLS" ] && mode=busy
    kill_agent_at "$mode"
    usleep 300000
    ulog_start $ARGS
    # A request in flight is resent after 15 s; the reconnect loop runs every 2 s.
    wait_reconnect 25
    log "kill $k ($mode): the kernel reconnected after $(($(now_cs) - t0))0 ms; in sync $(mirror_sync_ratio "$DEV")"
    k=$((k + 1))
done
touch stop   # the pass that the last kill interrupted is the last one
n=0
while kill -0 "$WRITER" 2>/dev/null; do
    [ "$n" -lt 300 ] || fail "the writer did not finish its pass within 30 s: $(mirror_status "$DEV")"
    usleep 100000
    n=$((n + 1))
done
wait "$WRITER" || fail "the writer failed: $(cat writer.err 2>/dev/null)"
log "writer exited 0 after $(cat progress) passes"
assert_eq "$(mirror_health "$DEV")" AA "leg health"
log "status before resume: $(mirror_status "$DEV")"
run dmsetup suspend "$DEV"
run dmsetup resume "$DEV"
wait_for_sync "$DEV" 60
last=$(cat progress)
[ "$last" -lt 64 ] || fail "$last passes: pass data repeats after 64 passes (make the writer area larger)"
cp A.pat expect.pat
pass_data "$last" >last.pat
run dd if=last.pat of=expect.pat conv=notrunc status=none
# One more write through the mirror, so the last agent serves a write's MARK_REGION + FLUSH
# whatever the kill left: the writer may have had no write left in its pass after kill 10, and
# the write that IN_SYNC failed for goes to one leg without a MARK. It rewrites region 8 with
# what it holds (A): outside the writer's regions 0-7, so it cannot hide a region that one leg
# missed, and the comparison below is unchanged.
run dd if=expect.pat of="/dev/mapper/$DEV" bs=512k skip=8 seek=8 count=1 oflag=direct conv=notrunc status=none
drop_caches "$L0" "$L1"
for leg in "$L0" "$L1"; do
    [ "$(md5_of "$leg" 0 "$MIB")" = "$(md5sum <expect.pat | cut -d' ' -f1)" ] && continue
    bad=
    r=0
    while [ "$r" -lt "$REGIONS" ]; do
        a=$(dd if="$leg" bs=512k skip="$r" count=1 iflag=direct status=none | md5sum)
        b=$(dd if=expect.pat bs=512k skip="$r" count=1 status=none | md5sum)
        [ "$a" = "$b" ] || bad="$bad $r"
        r=$((r + 1))
    done
    fail "$leg differs from A + the last pass ($last) in regions:$bad"
done
log "both legs hold A + the last pass ($last)"
dm_remove "$DEV"
ulog_stop_totals totals
# Errors in the totals may be -ESRCH answers (they make the kernel reconnect); anything else
# is logged as "request failed" (rate-limited) and fails here.
[ -z "$(agent_request_errors)" ] || fail "the last agent answered requests with errors: $(agent_request_errors | head -n 3)"
for t in CTR RESUME MARK_REGION FLUSH; do
    [ "$(total totals $t)" -gt 0 ] || fail "the last agent served no $t"
done
log "passed"
