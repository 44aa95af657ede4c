# lib.sh: helpers for the VM scenarios (POSIX sh, busybox ash). Source it first:
#     . /scenarios/lib.sh
# /init runs each scenario as `sh /scenarios/<name>.sh` in a fresh working folder under /tmp
# (tmpfs), with SCENARIO, BOOT and BOOTS set, under a watchdog (see xtask/src/vm/scenarios.rs).
#
# Conventions:
# - Every step asserts: `fail MSG` prints "FAIL: [name] MSG" (also to /tmp/ulog-fail-reason, which
#   /init repeats after the dmesg dump) and exits 1.
# - `fail` only leaves the current (sub)shell: do not call failing helpers inside $(...). Helpers
#   that produce a value and can fail take the name of a variable to set instead.
# - Cleanups registered with `on_exit` run in reverse order when the script exits (also after a
#   failure); /init additionally kills the scenario's process group and removes dm/loop leftovers.
# - Sizes: MiB for files and patterns, 512-byte sectors for dm tables.

NAME=${SCENARIO:-$(basename "$0" .sh)}
BOOT=${BOOT:-1}
BOOTS=${BOOTS:-1}
export DM_DISABLE_UDEV=1

# log MSG: "[name uptime] MSG" (uptime in seconds: read without forking).
log() {
    read -r _up _ </proc/uptime
    echo "[$NAME $_up] $*"
}

fail() {
    echo "FAIL: [$NAME] $*" | tee /tmp/ulog-fail-reason >&2
    for _h in $FAIL_HOOKS; do "$_h" >&2; done
    exit 1
}

# Functions (no arguments) to run when fail is called, e.g. to print a daemon's log.
FAIL_HOOKS=
add_fail_hook() { FAIL_HOOKS="$FAIL_HOOKS $1"; }

# ---- cleanup ---------------------------------------------------------------------------------
_CLEANUPS=
on_exit() {
    _CLEANUPS="$1
$_CLEANUPS"
}
_run_cleanups() {
    _rc=$?
    trap - EXIT
    _old_ifs=$IFS
    IFS='
'
    for _c in $_CLEANUPS; do
        IFS=$_old_ifs
        eval "$_c" >/dev/null
    done
    IFS=$_old_ifs
    exit "$_rc"
}
trap _run_cleanups EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# ---- running commands ------------------------------------------------------------------------

# run CMD...: echo and run, fail on a non-zero exit.
run() {
    log "+ $*"
    "$@" || fail "command failed (exit $?): $*"
}

# must_fail CMD...: the command must exit non-zero.
must_fail() {
    log "+ (must fail) $*"
    if "$@"; then fail "command succeeded but must fail: $*"; fi
}

# run_limited SECS CMD...: like run, but fail if CMD has not finished after SECS seconds. The
# command runs in the background and is killed on timeout (a process in D state stays behind:
# dmsetup waiting on a log server that never answers cannot be killed). Sets LIMITED_RC.
run_limited() {
    _secs=$1
    shift
    log "+ (limit ${_secs}s) $*"
    "$@" &
    _pid=$!
    _n=0
    while kill -0 "$_pid" 2>/dev/null; do
        if [ "$_n" -ge $((_secs * 10)) ]; then
            kill -KILL "$_pid" 2>/dev/null
            fail "still running after ${_secs}s: $*"
        fi
        usleep 100000
        _n=$((_n + 1))
    done
    wait "$_pid"
    LIMITED_RC=$?
    [ "$LIMITED_RC" -eq 0 ] || fail "command failed (exit $LIMITED_RC): $*"
}

# Centiseconds since boot.
now_cs() { awk '{ printf "%d\n", $1 * 100 }' /proc/uptime; }

# ---- assertions ------------------------------------------------------------------------------
assert_eq() { # ACTUAL EXPECTED WHAT
    [ "$1" = "$2" ] || fail "$3: got '$1', expected '$2'"
}
assert_ne() { # ACTUAL UNEXPECTED WHAT
    [ "$1" != "$2" ] || fail "$3: got '$1', which it must not be"
}
assert_match() { # STRING GLOB WHAT   (shell pattern, e.g. '*1 clustered-core')
    # shellcheck disable=SC2254
    case "$1" in
        $2) ;;
        *) fail "$3: '$1' does not match '$2'" ;;
    esac
}
assert_le() { # A B WHAT   (integers)
    [ "$1" -le "$2" ] || fail "$3: $1 > $2"
}

# ---- loop devices and patterns -------------------------------------------------------------

# loop_create VAR FILE MIB: a sparse (zero) FILE of MIB MiB on a free loop device; VAR := device.
loop_create() {
    _var=$1
    _file=$2
    _mib=$3
    dd if=/dev/zero of="$_file" bs=1M count=0 seek="$_mib" 2>/dev/null || fail "cannot create $_file"
    _dev=$(losetup -f) || fail "no free loop device"
    losetup "$_dev" "$_file" || fail "losetup $_dev $_file failed"
    on_exit "losetup -d $_dev"
    eval "$_var=\$_dev"
    log "$_dev -> $_file (${_mib} MiB)"
}

# make_pattern FILE TAG MIB: a deterministic file of MIB MiB made of 4 KiB blocks, each starting
# with "<TAG>:<block number>:" (so misplaced or stale blocks are detected); the same TAG gives
# the same bytes on every boot. Pattern files are immutable: their md5 is cached in FILE.md5.
make_pattern() {
    awk -v tag="$2" -v mib="$3" 'BEGIN {
        pad = sprintf("%4096s", ""); gsub(/ /, substr(tag, 1, 1), pad)
        for (i = 0; i < mib * 256; i++) { h = sprintf("%s:%09d:", tag, i); printf "%s%s", h, substr(pad, length(h) + 1) }
    }' >"$1" || fail "make_pattern $1 failed"
    [ "$(stat -c %s "$1")" -eq $(($3 * 1048576)) ] || fail "make_pattern $1: wrong size"
    md5sum <"$1" | cut -d' ' -f1 >"$1.md5"
}

# write_at DEV FILE OFFSET_MIB: write FILE onto DEV at OFFSET_MIB, O_DIRECT and fsync.
write_at() {
    run dd if="$2" of="$1" bs=1M seek="$3" oflag=direct conv=fsync,notrunc status=none
}

# Forget cached pages of block devices, so the next read goes to the device.
drop_caches() {
    sync
    for _d in "$@"; do blockdev --flushbufs "$_d" 2>/dev/null; done
    echo 3 >/proc/sys/vm/drop_caches
}

# md5_of DEV OFFSET_MIB MIB: md5 of MIB MiB of DEV from OFFSET_MIB, read with O_DIRECT.
# Measured under TCG for 16 MiB: dd to tmpfs 0.1 s + md5sum 0.4 s; through a pipe 1.7 s;
# busybox cmp 1.4 s. So: hashes of a tmpfs copy first, cmp only to explain a difference.
md5_of() {
    dd if="$1" of=./.md5chunk bs=1M skip="$2" count="$3" iflag=direct status=none || fail "cannot read $1"
    md5sum ./.md5chunk | cut -d' ' -f1
    rm -f ./.md5chunk
}

# first_difference A B: cmp's description of the first differing byte of two files.
first_difference() { cmp "$1" "$2" 2>&1 | head -n 1; }

# assert_content DEV OFFSET_MIB FILE WHAT: DEV holds FILE (a whole number of MiB) at OFFSET_MIB.
assert_content() {
    _mib=$(($(stat -c %s "$3") / 1048576))
    if [ -f "$3.md5" ]; then _want=$(cat "$3.md5"); else _want=$(md5sum <"$3" | cut -d' ' -f1); fi
    [ "$(md5_of "$1" "$2" "$_mib")" = "$_want" ] && return 0
    dd if="$1" of=./.readback bs=1M skip="$2" count="$_mib" iflag=direct status=none
    fail "$4: $1 at $2 MiB differs from $3: $(first_difference ./.readback "$3")"
}

# legs_equal SECTORS DEV...: the first SECTORS sectors of every leg are identical.
# SECTORS must be a whole number of MiB (a multiple of 2048).
legs_equal() {
    _sectors=$1
    shift
    [ $((_sectors % 2048)) -eq 0 ] || fail "legs_equal: $_sectors is not a whole number of MiB"
    _mib=$((_sectors / 2048))
    drop_caches "$@"
    _first=$1
    _sum0=$(md5_of "$_first" 0 "$_mib")
    shift
    for _leg in "$@"; do
        [ "$(md5_of "$_leg" 0 "$_mib")" = "$_sum0" ] && continue
        dd if="$_first" of=./.leg0 bs=1M count="$_mib" iflag=direct status=none
        dd if="$_leg" of=./.legN bs=1M count="$_mib" iflag=direct status=none
        fail "legs differ: $_first vs $_leg: $(first_difference ./.leg0 ./.legN)"
    done
    log "legs equal over $_sectors sectors"
}

# ---- device-mapper -------------------------------------------------------------------------

# _dm_cleanup NAME: remove NAME if it exists, giving up after 10 s (never blocks the exit).
_dm_cleanup() {
    dm_exists "$1" || return 0
    dmsetup remove --retry "$1" &
    _p=$!
    _n=0
    while kill -0 "$_p" 2>/dev/null && [ "$_n" -lt 100 ]; do usleep 100000; _n=$((_n + 1)); done
    kill -0 "$_p" 2>/dev/null && echo "[$NAME] cleanup: dmsetup remove $1 still blocked after 10 s" >&2
    return 0
}

# dm_create NAME TABLE [LIMIT_SECS]: create (default limit 30 s) and register its removal.
dm_create() {
    on_exit "_dm_cleanup $1"
    run_limited "${3:-30}" dmsetup create "$1" --table "$2"
    [ -b "/dev/mapper/$1" ] || fail "/dev/mapper/$1 does not exist after create"
}

# dm_remove NAME [LIMIT_SECS]: remove, asserting it works (default limit 30 s).
dm_remove() {
    run_limited "${2:-30}" dmsetup remove "$1"
    [ ! -e "/dev/mapper/$1" ] || fail "/dev/mapper/$1 still exists after remove"
}

dm_exists() { dmsetup info "$1" >/dev/null 2>&1; }

# Fields of a mirror's `dmsetup status` line:
#   <start> <len> mirror <#legs> <dev>... <in-sync>/<regions> <#health> <health> <log status...>
mirror_status() { dmsetup status "$1"; }
mirror_sync_ratio() { dmsetup status "$1" | awk '{ print $(5 + $4) }'; }
mirror_health() { dmsetup status "$1" | awk '{ print $(7 + $4) }'; }
# The log's part, e.g. "1 core", "3 disk 7:2 A", "1 clustered-core", trailing blanks removed.
mirror_log_status() {
    dmsetup status "$1" | awk '{ s = ""; for (i = 8 + $4; i <= NF; i++) s = s (s == "" ? "" : " ") $i; print s }'
}

# wait_for_sync NAME TIMEOUT_SECS: until the status shows N/N (N > 0); fails with the last status.
wait_for_sync() {
    _t0=$(now_cs)
    while :; do
        _r=$(mirror_sync_ratio "$1")
        case "$_r" in
            */*) [ "${_r%/*}" = "${_r#*/}" ] && [ "${_r#*/}" -gt 0 ] && break ;;
        esac
        if [ $(($(now_cs) - _t0)) -ge $(($2 * 100)) ]; then
            fail "$1 not in sync after $2 s: $(dmsetup status "$1" 2>&1)"
        fi
        usleep 200000
    done
    log "$1 in sync ($_r) after $(($(now_cs) - _t0))0 ms"
}

# ---- kernel log ----------------------------------------------------------------------------
# dmesg_mark; ...; dmesg_since_mark | grep ...: only the kernel messages after the mark.
dmesg_mark() { _DMESG_MARK=$(dmesg | wc -l); }
dmesg_since_mark() { dmesg | tail -n +"$((${_DMESG_MARK:-0} + 1))"; }

# ---- the dm-log-userspace server ------------------------------------------------------------

# Is a process listening on the connector group of dm-log-userspace (CN_IDX_DM = 7)?
# /proc/net/netlink: protocol 11 = NETLINK_CONNECTOR; Groups = bitmap of groups 1..32 (bit g-1).
ulog_listener_present() {
    while read -r _sk _eth _pid _groups _rest; do
        [ "$_eth" = 11 ] || continue
        [ $((0x$_groups & 0x40)) -ne 0 ] && return 0
    done </proc/net/netlink
    return 1
}

AGENT_LOG=/tmp/ulog-agent.log
AGENT_PID=

_agent_fail_hook() {
    [ -f "$AGENT_LOG" ] || return 0
    echo "---- last 60 lines of $AGENT_LOG ----"
    tail -n 60 "$AGENT_LOG"
    echo "---- end of agent log ----"
}

# agent_start [ARGS...]: /bin/ulog-agent -f ARGS in the background (stderr to $AGENT_LOG), then
# wait up to 10 s for it to listen on the connector group; fails if it dies or never listens.
agent_start() {
    [ -x /bin/ulog-agent ] || fail "no /bin/ulog-agent in the initramfs (built with --agent-build skip?)"
    add_fail_hook _agent_fail_hook
    log "+ ulog-agent -f $* (RUST_LOG=${RUST_LOG:=debug})"
    RUST_LOG=$RUST_LOG /bin/ulog-agent -f "$@" >>"$AGENT_LOG" 2>&1 &
    AGENT_PID=$!
    on_exit "agent_stop"
    _n=0
    until ulog_listener_present; do
        kill -0 "$AGENT_PID" 2>/dev/null || { wait "$AGENT_PID"; fail "ulog-agent exited (status $?) before listening"; }
        [ "$_n" -lt 100 ] || fail "ulog-agent not listening on connector group 7 after 10 s"
        usleep 100000
        _n=$((_n + 1))
    done
    log "ulog-agent (pid $AGENT_PID) listening after ${_n}00 ms"
}

agent_alive() { [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; }

# agent_stop [SIGNAL]: signal (default TERM) and wait up to 5 s, then SIGKILL. Sets AGENT_RC.
# The agent obeys SIGTERM only when it serves no log: remove the mirrors first (a cleanup after
# a failure that could not remove them ends in the SIGKILL).
agent_stop() {
    [ -n "$AGENT_PID" ] || return 0
    kill -"${1:-TERM}" "$AGENT_PID" 2>/dev/null
    _n=0
    while kill -0 "$AGENT_PID" 2>/dev/null && [ "$_n" -lt 50 ]; do usleep 100000; _n=$((_n + 1)); done
    kill -0 "$AGENT_PID" 2>/dev/null && kill -KILL "$AGENT_PID" 2>/dev/null
    wait "$AGENT_PID"
    AGENT_RC=$?
    AGENT_PID=
    return 0
}

# ---- multi-boot scenarios ----------------------------------------------------------------

# hard_reset: end this boot now, like a power cut (sysrq b: no sync, no unmount, no device
# teardown). Everything so far counts as passed; the host boots the next stage on the same disks.
# The console's tty output is drained asynchronously and would be lost at the reset, so the
# markers go through the kernel log (printed synchronously), after a pause for earlier output.
hard_reset() {
    log "hard reset (boot $BOOT/$BOOTS)"
    sleep 1
    echo "<2>ULOG-RESULT $NAME 0" >/dev/kmsg
    echo "<2>ULOG-RESET" >/dev/kmsg
    echo b >/proc/sysrq-trigger
    sleep 10
    fail "still running after sysrq b"
}

# ---- ulog-agent: JSON log, request totals, restarts ------------------------------------------
# These helpers read the agent log in JSON form: start the agent with ulog_start (which passes
# --log-format json and marks where this instance's lines begin in $AGENT_LOG).

# agent_log_mark; ...; agent_log_since_mark: the agent log lines written after the mark.
agent_log_mark() { _AGENT_MARK=$(cat "$AGENT_LOG" 2>/dev/null | wc -l); }
agent_log_since_mark() { tail -n +"$((${_AGENT_MARK:-0} + 1))" "$AGENT_LOG" 2>/dev/null; }

# ulog_start [ARGS...]: agent_log_mark, then agent_start --log-format json ARGS (RUST_LOG
# defaults to debug without aya's loader chatter, so failed requests are logged: "request
# failed"), then wait until the agent
# says it is serving: it joins the connector group (where agent_start stops waiting) before it
# attaches its eBPF probe, so requests sent in between are served but not counted as sent.
ulog_start() {
    agent_log_mark
    : "${RUST_LOG:=debug,aya=info,aya_obj=info}"
    agent_start --log-format json "$@"
    _n=0
    until agent_log_since_mark | grep -q '"message":"serving dm-log-userspace requests"'; do
        agent_alive || fail "ulog-agent exited before serving"
        [ "$_n" -lt 100 ] || fail "ulog-agent did not log 'serving dm-log-userspace requests' within 10 s"
        usleep 100000
        _n=$((_n + 1))
    done
}

# ulog_restart_after_kill PAUSE_US [ARGS...]: SIGKILL the agent (like a crash), wait PAUSE_US
# microseconds, start a new one (ulog_start ARGS). The kernel keeps its logs: it reconnects
# (CTR + RESUME, then the pending request) when a request finds no server or fails with -ESRCH.
ulog_restart_after_kill() {
    _pause=$1
    shift
    agent_stop KILL
    log "ulog-agent killed (SIGKILL); restarting after ${_pause} us"
    usleep "$_pause"
    ulog_start "$@"
}

# agent_json_lines MESSAGE: this instance's log lines whose message is MESSAGE.
agent_json_lines() { agent_log_since_mark | grep -F "\"message\":\"$1\""; }

# agent_request_errors: this instance's "request failed" lines (debug level), except -ESRCH
# answers: those send the kernel into its reconnect loop (CTR + RESUME, then the request again),
# which is how a log the agent does not know (yet) gets reconnected.
agent_request_errors() { agent_json_lines "request failed" | grep -vF '"error":-3,'; }

# wait_agent_line MESSAGE FILTER SECS: wait until this instance logged MESSAGE on a line also
# containing FILTER (fixed string, "" for any); fails after SECS seconds, or at once when the
# instance answers a request with an error other than -ESRCH (FAIL_ON_REQUEST_ERROR=1, the
# default), with that line.
wait_agent_line() {
    _t0=$(now_cs)
    while :; do
        agent_json_lines "$1" | grep -qF -- "$2" && return 0
        if [ "${FAIL_ON_REQUEST_ERROR:-1}" = 1 ] && agent_request_errors | grep -q .; then
            fail "ulog-agent answered a request with an error while waiting for '$1': $(agent_request_errors | head -n 3)"
        fi
        agent_alive || fail "ulog-agent died while waiting for '$1'"
        [ $(($(now_cs) - _t0)) -lt $(($3 * 100)) ] || fail "ulog-agent did not log '$1' ($2) within $3 s"
        usleep 100000
    done
}

# wait_reconnect SECS: until the kernel's reconnect CTR reached this agent instance (the agent
# logs "log created" with reconnect=true); see wait_agent_line for the failure cases.
wait_reconnect() {
    wait_agent_line "log created" '"reconnect":true' "$1"
    log "the kernel reconnected to the new agent"
}

# ulog_totals FILE: after `agent_stop TERM` of an agent started with ulog_start, the summary it
# logged on exit ("request totals"), one "TYPE SERVED ERRORS KERNEL_SENT" line per request type
# into FILE (KERNEL_SENT is "-" when the probe did not attach). Fails without a summary.
ulog_totals() {
    agent_log_since_mark | awk '
        function val(k,   i, s) {
            i = index($0, "\"" k "\":")
            if (i == 0) return ""
            s = substr($0, i + length(k) + 3)
            sub(/[,}].*/, "", s)
            gsub(/"/, "", s)
            return s
        }
        /"message":"request totals"/ {
            ks = val("kernel_sent")
            if (ks ~ /^Some\(/) { sub(/^Some\(/, "", ks); sub(/\)$/, "", ks) } else ks = "-"
            print val("request"), val("served"), val("errors"), ks
        }' >"$1"
    grep -q . "$1" || fail "no 'request totals' lines in the agent log (did it exit through SIGTERM?)"
    log "request totals (type served errors kernel_sent): $(tr '\n' ';' <"$1")"
}

# total FILE TYPE [FIELD]: from a ulog_totals file, TYPE's served count (FIELD 2, default),
# errors (3) or kernel_sent (4); 0 for a type that is not listed.
total() { awk -v t="$2" -v f="${3:-2}" '$1 == t { v = $f } END { print (v == "" ? 0 : v) }' "$1"; }

# ulog_probe_state: "attached", "build" (this agent was built without the eBPF programs) or
# fails: the probe should attach in the test kernel, so any other reason is an error to report.
ulog_probe_state() {
    if agent_log_since_mark | grep -q '"message":"eBPF probe attached'; then
        echo attached
    elif agent_log_since_mark | grep '"message":"eBPF probes not attached' | grep -q 'without the `ebpf` feature\|AYA_BUILD_SKIP'; then
        echo build
    else
        echo "[$NAME] eBPF probes did not attach: $(agent_log_since_mark | grep 'eBPF prob' | head -n 1)" >&2
        echo other
    fi
}

# assert_totals FILE EXACT TYPE...: every request type in FILE has errors=0, each TYPE was
# served at least once, and, if EXACT=exact and the probe attached, served == kernel_sent for
# every type (the kernel sent exactly what the agent served: nothing lost, nothing invented).
# Use EXACT=exact only when no request could find the agent missing (no restarts).
assert_totals() {
    _f=$1
    _exact=$2
    shift 2
    while read -r _t _s _e _k; do
        [ "$_e" = 0 ] || fail "ulog-agent answered $_e $_t request(s) with an error (totals: $(tr '\n' ';' <"$_f"))"
    done <"$_f"
    for _t in "$@"; do
        [ "$(total "$_f" "$_t")" -gt 0 ] || fail "ulog-agent served no $_t request (totals: $(tr '\n' ';' <"$_f"))"
    done
    [ "$_exact" = exact ] || return 0
    case $(ulog_probe_state) in
        attached) ;;
        build) log "warning: agent built without eBPF: kernel_sent not compared"; return 0 ;;
        *) fail "the eBPF probe did not attach (see the line above)" ;;
    esac
    while read -r _t _s _e _k; do
        [ "$_k" != - ] || fail "probe attached but no kernel_sent for $_t"
        [ "$_s" = "$_k" ] || fail "$_t: the agent served $_s request(s), the kernel sent $_k (totals: $(tr '\n' ';' <"$_f"))"
    done <"$_f"
    log "totals: no errors; served == kernel_sent for every type"
}

# ulog_stop_totals FILE: agent_stop TERM, assert it exited 0, write its totals to FILE. Remove
# every mirror first: with a log live the agent keeps serving.
ulog_stop_totals() {
    agent_stop TERM
    assert_eq "$AGENT_RC" 0 "ulog-agent exit status after SIGTERM"
    ulog_totals "$1"
}

# ---- mirrors: sync counts, device numbers ---------------------------------------------------

# mirror_in_sync NAME: the in-sync region count of the status line (the N of N/M).
mirror_in_sync() { _r=$(mirror_sync_ratio "$1"); echo "${_r%/*}"; }

# devnum DEV: "major:minor" of a block device, as dm tables and status lines print it.
devnum() { printf '%d:%d\n' "0x$(stat -L -c %t "$1")" "0x$(stat -L -c %T "$1")"; }

# ---- disk-format logs (dm-log.c layout, also ulog's clustered-disk and state files) ----------

# disk_log_dirty VAR DEV REGIONS: VAR := the regions whose clean bit is 0 on the log DEV
# (ascending, space-separated; "" when all are clean). Reads with O_DIRECT unless DEV is a
# regular file. Bit r is bit r%8 of byte 1024 + r/8 (little-endian bit order).
disk_log_dirty() {
    _bytes=$((($3 + 7) / 8))
    if [ -b "$2" ]; then
        dd if="$2" of=./.logimg bs=4096 count=$(((1024 + _bytes + 4095) / 4096)) iflag=direct status=none ||
            fail "cannot read the log device $2"
    else
        cp "$2" ./.logimg || fail "cannot read $2"
    fi
    _v=$(od -An -v -tu1 -j1024 -N"$_bytes" ./.logimg | awk -v n="$3" '
        { for (i = 1; i <= NF; i++) b[c++] = $i }
        END {
            s = ""
            for (r = 0; r < n; r++) {
                v = b[int(r / 8)] + 0
                for (k = 0; k < r % 8; k++) v = int(v / 2)   # busybox awk has no ^
                if (v % 2 == 0) s = s (s == "" ? "" : " ") r
            }
            print s
        }') || fail "disk_log_dirty: cannot decode the bitmap of $2"
    eval "$1=\$_v"
}

# assert_disk_log_header DEV REGIONS WHAT: magic "MiRr" (le32 0x4D695272), version 2, nr_regions.
assert_disk_log_header() {
    dd if="$1" of=./.loghdr bs=4096 count=1 iflag=direct status=none || fail "cannot read $1"
    assert_eq "$(od -An -tx4 -N4 ./.loghdr | tr -d ' ')" 4d695272 "$3: magic"
    assert_eq "$(od -An -tu4 -j4 -N4 ./.loghdr | tr -d ' ')" 2 "$3: version"
    assert_eq "$(od -An -tu8 -j8 -N8 ./.loghdr | tr -d ' ')" "$2" "$3: nr_regions"
}

# wait_disk_log_dirty DEV REGIONS EXPECTED SECS: until the dirty set on DEV is EXPECTED.
wait_disk_log_dirty() {
    _t0=$(now_cs)
    while :; do
        disk_log_dirty _dirty "$1" "$2"
        [ "$_dirty" = "$3" ] && break
        [ $(($(now_cs) - _t0)) -lt $(($4 * 100)) ] || fail "dirty regions on $1: '$_dirty', expected '$3' (waited $4 s)"
        usleep 100000
    done
    log "dirty regions on $1: '$_dirty'"
}

# ---- region-addressed writes -----------------------------------------------------------------

# write_region_block DEV REGION_SECTORS R SRC: write 4 KiB block R of SRC at the start of region
# R of DEV (O_DIRECT). Run it in the background to keep it in flight.
write_region_block() {
    dd if="$4" of="$1" bs=4096 skip="$3" seek=$(($3 * $2 / 8)) count=1 oflag=direct conv=notrunc status=none
}

# expect_region_blocks FILE REGION_SECTORS SRC R...: put block R of SRC at region R's start in
# FILE (the expected image of a device after write_region_block).
expect_region_blocks() {
    _f=$1
    _rs=$2
    _src=$3
    shift 3
    for _r in "$@"; do
        dd if="$_src" of="$_f" bs=4096 skip="$_r" seek=$((_r * _rs / 8)) count=1 conv=notrunc status=none ||
            fail "expect_region_blocks $_f $_r"
    done
    rm -f "$_f.md5"
}

# wait_region_blocks DEV REGION_SECTORS SRC SECS R...: until DEV (read with O_DIRECT) holds
# block R of SRC at region R's start, for every R.
wait_region_blocks() {
    _dev=$1
    _rs=$2
    _src=$3
    _secs=$4
    shift 4
    _t0=$(now_cs)
    for _r in "$@"; do
        dd if="$_src" of=./.want bs=4096 skip="$_r" count=1 status=none
        while :; do
            dd if="$_dev" of=./.got bs=4096 skip=$((_r * _rs / 8)) count=1 iflag=direct status=none
            cmp -s ./.want ./.got && break
            [ $(($(now_cs) - _t0)) -lt $((_secs * 100)) ] || fail "$_dev: region $_r does not hold its new block after $_secs s"
            usleep 100000
        done
    done
}

# --- The agent's HTTP API (default address) ---
AGENT_URL=http://127.0.0.1:9477

# scrape FILE: GET /metrics into FILE.
scrape() {
    wget -q -O "$1" "$AGENT_URL/metrics" || fail "GET $AGENT_URL/metrics failed"
    grep -q '^ulog_build_info' "$1" || fail "$1 is not ulog-agent's exposition: $(head -c 300 "$1")"
}
# value FILE SERIES: the value of one series, exactly as exposed (labels in order); 0 if absent.
value() { awk -v s="$2" '$1 == s { v = $2 } END { print (v == "" ? 0 : v) }' "$1"; }
# sum FILE PREFIX: sum of the series starting with PREFIX.
sum() { awk -v p="$2" 'index($1, p) == 1 { s += $2 } END { printf "%d\n", s }' "$1"; }
# wait_quiet FILE: until the kernel is quiet (it clears regions and flushes a little after the
# writes): two scrapes 1 s apart with the same request totals; the last one stays in FILE.
wait_quiet() {
    _prev=-1
    _n=0
    while :; do
        scrape "$1"
        _tot=$(sum "$1" ulog_requests_total)
        [ "$_tot" = "$_prev" ] && break
        [ "$_n" -lt 30 ] || fail "requests still flowing after 30 s ($_prev -> $_tot)"
        _prev=$_tot
        _n=$((_n + 1))
        sleep 1
    done
}

# wait_exit PID SECS WHAT [OUTPUT]: until the background process PID has exited (at most SECS),
# then fail unless it exited 0 (with the file OUTPUT, its output, in the message).
wait_exit() {
    _n=0
    while kill -0 "$1" 2>/dev/null; do
        [ "$_n" -lt $(($2 * 10)) ] || fail "$3 still running after $2 s"
        usleep 100000
        _n=$((_n + 1))
    done
    wait "$1" || fail "$3 failed: $(cat ${4:-/dev/null} 2>/dev/null)"
}
