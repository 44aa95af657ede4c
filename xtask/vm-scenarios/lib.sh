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
