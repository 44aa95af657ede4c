# ulog-suspend-flush: suspend/resume cycles under writes; no request may fail.
# dm core suspends a mirror as: presuspend (log PRESUSPEND, kmirrord flushed), wait for the
# bios in flight, postsuspend (log POSTSUSPEND). The completions of those last bios wake
# kmirrord again, which sends CLEAR_REGION for the regions that went idle and FLUSH,
# concurrently with (and so sometimes after) the log's POSTSUSPEND. The log is suspended, not
# gone: these must be answered (0; the clears need not be written before the next RESUME).
# A failed CLEAR/FLUSH makes the kernel raise a table event (dmeventd sees a log failure).
# nosync clustered-core mirror (8 MiB, 32 regions), four writers (64 KiB O_DIRECT writes, each
# over its own 2 MiB) while the mirror is suspended and resumed 15 times; after each suspend the
# agent's log is checked for a failed request. Then: writers exit 0, legs equal, no errors.
. /scenarios/lib.sh

MIB=8
SECTORS=$((MIB * 2048))
REGION=512
DEV=ususpend
CYCLES=15

loop_create L0 leg0.img "$MIB"
loop_create L1 leg1.img "$MIB"
make_pattern S.pat S 2
ulog_start
dm_create "$DEV" "0 $SECTORS mirror userspace 4 LVM-ulogsuspendflush1 clustered-core $REGION nosync 2 $L0 0 $L1 0 1 handle_errors"
PIDS=
for w in 0 1 2 3; do
    (
        while [ ! -e stop ]; do
            dd if=S.pat of="/dev/mapper/$DEV" bs=64k seek=$((w * 32)) oflag=direct conv=notrunc status=none ||
                { echo "writer $w: write error" >>writers.err; exit 1; }
        done
    ) &
    PIDS="$PIDS $!"
done
on_exit "touch stop"
c=1
while [ "$c" -le "$CYCLES" ]; do
    usleep 150000
    run dmsetup suspend "$DEV"
    if agent_request_errors | grep -q .; then
        fail "cycle $c: with $DEV $(dmsetup info -c --noheadings -o attr "$DEV") after 'dmsetup suspend', the agent had answered: $(agent_request_errors | head -n 2)"
    fi
    run dmsetup resume "$DEV"
    c=$((c + 1))
done
touch stop
for p in $PIDS; do wait "$p" || fail "a writer failed: $(cat writers.err 2>/dev/null)"; done
assert_eq "$(mirror_sync_ratio "$DEV")" 32/32 "sync ratio"
legs_equal "$SECTORS" "$L0" "$L1"
dm_remove "$DEV"
ulog_stop_totals totals
assert_totals totals exact FLUSH CLEAR_REGION PRESUSPEND POSTSUSPEND
log "passed"
