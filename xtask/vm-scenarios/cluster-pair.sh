# cluster-pair: the real-kernel cluster test of issue 11. Two guests (corosync node 1 = "A", node
# 2 = "B", from `ulog.node=` on the kernel command line) share the leg images, the log device and
# a mailbox disk (virtio-blk, share-rw, cache=none on the host: an O_DIRECT write of one guest is
# seen by an O_DIRECT read of the other), and talk corosync over a qemu `-netdev dgram` link. Each
# runs corosync, `ulog-agent --cluster` and the same mirror; its kernel asks only its own agent.
# The host side (xtask/src/vm/cluster.rs) boots both, kills B's qemu when B asks for it, and
# writes "fenced 2" into the mailbox once that qemu has exited (what a fencing agent reports).
#
# Phase 1 (both): quorate, both agents serve the log with members {1, 2}; initial resync split
# over the nodes reaches N/N on both; concurrent O_DIRECT writes: disjoint regions (A: 0-9,
# B: 22-31) and shared regions 10-21 (A the first half of each, B the second: the same region
# marked by both nodes at once, disjoint bytes, so the final content is defined); N/N and no
# failure on both; legs identical and equal to the expected image.
# Phase 2: B writes continuously from eight writers, then asks to be killed (qemu SIGKILL: no
# suspend, no CLEAR, writes possibly on one leg only). A: corosync sees B gone, the log shows
# node 2 departed with its marks held and those regions out of sync; after the host's fencing
# word A confirms by hand (`ulog-agent cluster confirm-fenced --node 2`, as an operator would);
# A's agent restarts its kernel's recovery by itself (a kernel that saw N/N asks for no resync
# work until its next RESUME) and A's kernel resyncs the reclaimed regions to N/N; legs identical.
#
# The mailbox: 4 KiB slot 0 = host, slot 1 = node 1, slot 2 = node 2. A node posts "<step>
# <label>" (or "FAIL <why>") in its slot; `step K LABEL` posts K and waits for the peer to reach
# K, failing at once when the peer posts FAIL.
. /scenarios/lib.sh

# The one switch for the log type: clustered-disk (the log on the shared log device, written by one
# node at a time: guarantee 8) or clustered-core. The table shape follows it (see log_args).
LOG_TYPE=${ULOG_CLUSTER_LOG_TYPE:-clustered-disk}

MIB=16
SECTORS=$((MIB * 2048))
REGION=1024 # 512 KiB: 32 regions
REGIONS=$((SECTORS / REGION))
UUID=LVM-ulogpair000000001
DEV=pair

. /scenarios/cluster-lib.sh

log_args() {
    case "$LOG_TYPE" in
        clustered-core) echo "3 $UUID clustered-core $REGION" ;;
        clustered-disk) echo "4 $UUID clustered-disk $LOGDEV $REGION" ;;
        *) fail "LOG_TYPE $LOG_TYPE" ;;
    esac
}
TABLE="0 $SECTORS mirror userspace $(log_args) 2 $LEG0 0 $LEG1 0 1 handle_errors"
# The log's part of `dmsetup status` (STATUS_INFO): `1 clustered-core`, or for a disk log
# `3 clustered-disk <maj:min> A` (A: the log device is alive; D would be a failed one).
log_status_ok() {
    case "$LOG_TYPE:$1" in
        "clustered-core:1 clustered-core") return 0 ;;
        clustered-disk:"3 clustered-disk "*:*" A") return 0 ;;
    esac
    return 1
}

RUST_LOG=${RUST_LOG:-info}
ulog_start --cluster
step 1 agents

# ---- phase 1: both nodes activate the mirror ----------------------------------------------
# Node 1 first, then node 2 (the joiner gets the log's state from node 1).
[ "$NODE" = 1 ] && dm_create "$DEV" "$TABLE" 60
step 2 created-by-node1
[ "$NODE" = 2 ] && dm_create "$DEV" "$TABLE" 60
# The initial resync (legs start as zeros on both): each kernel recovers one region at a time
# through GET_RESYNC_WORK / SET_REGION_SYNC; the agents hand out each region once.
wait_for_sync "$DEV" 120
step 3 synced

# Assertion 1b: both agents serve the same uuid as one cluster log with members 1 and 2, holding
# the replicated state, and corosync quorate.
ulog-agent status >status1.txt 2>&1 || fail "ulog-agent status failed: $(cat status1.txt)"
grep -q '^Cluster: quorate' status1.txt || fail "agent not quorate: $(cat status1.txt)"
grep -q "^Cluster log .*: node $NODE, members 1, 2; holding the state" status1.txt ||
    fail "the log is not served by both members: $(cat status1.txt)"
wget -q -O api1.json "$AGENT_URL/api/v1/logs" || fail "GET /api/v1/logs failed"
grep -q "\"uuid\":\"$UUID\"" api1.json || fail "/api/v1/logs does not list $UUID: $(head -c 2000 api1.json)"
grep -q '"cluster":{[^}]*"members":\[1,2\]' api1.json || fail "/api/v1/logs: the cluster log's members are not [1,2]: $(head -c 2000 api1.json)"
log "cluster log served by nodes 1 and 2"

make_pattern A.pat A "$MIB"
make_pattern B.pat B "$MIB"
dmesg_mark
step 4 writing

# Phase 1 writes, concurrent on both nodes, three rounds: MARK_REGION/CLEAR_REGION of the shared
# regions from both kernels at once (a region must stay dirty until both cleared it).
write_half() { # PATTERN REGION HALF(0|1)
    _b=$((2 * $2 + $3))
    dd if="$1" of="/dev/mapper/$DEV" bs=256K skip="$_b" seek="$_b" count=1 oflag=direct conv=notrunc status=none ||
        fail "write of region $2 half $3 failed"
}
for _round in 1 2 3; do
    if [ "$NODE" = 1 ]; then
        run dd if=A.pat of="/dev/mapper/$DEV" bs=512K count=10 oflag=direct conv=notrunc status=none
        for _r in $(seq 10 21); do write_half A.pat "$_r" 0; done
    else
        run dd if=B.pat of="/dev/mapper/$DEV" bs=512K skip=22 seek=22 count=10 oflag=direct conv=notrunc status=none
        for _r in $(seq 21 -1 10); do write_half B.pat "$_r" 1; done
    fi
done
log "phase 1 writes done"
step 5 written

# Assertion 2: N/N in sync on both (no region left out of sync by the other node's marks), both
# legs alive ('AA': no leg marked failed after a write error), the log status is the server's
# text (no log failure: dm-raid1 fails writes with -EIO after a failed MARK/FLUSH), and the
# kernel logged no userspace-log request timeout (a request not answered within 15 s: a hung MARK).
wait_for_sync "$DEV" 60
assert_eq "$(mirror_sync_ratio "$DEV")" "$REGIONS/$REGIONS" "sync ratio after phase 1"
assert_eq "$(mirror_health "$DEV")" AA "leg health after phase 1"
log_status_ok "$(mirror_log_status "$DEV")" || fail "log status after phase 1: $(mirror_log_status "$DEV")"
if dmesg_since_mark | grep -i 'timed out\|log failure\|error' | grep -qi 'dm\|mirror\|raid1\|userspace'; then
    fail "kernel errors during phase 1: $(dmesg_since_mark | tail -n 20)"
fi
step 6 checked

# Assertion 2 (data): node 1 compares the legs byte for byte (O_DIRECT reads of the shared
# images; nobody writes now) and against the expected image: A's regions, B's regions, and the
# shared regions with A's first halves and B's second halves.
if [ "$NODE" = 1 ]; then
    legs_equal "$SECTORS" "$LEG0" "$LEG1"
    cp A.pat expect.pat
    run dd if=B.pat of=expect.pat bs=512K skip=22 seek=22 count=10 conv=notrunc status=none
    for _r in $(seq 10 21); do
        dd if=B.pat of=expect.pat bs=256K skip=$((2 * _r + 1)) seek=$((2 * _r + 1)) count=1 conv=notrunc status=none
    done
    assert_content "$LEG0" 0 expect.pat "leg 0 after phase 1"
fi
step 7 compared

# ---- phase 2: node 2 dies mid-write ----------------------------------------------------------
if [ "$NODE" = 2 ]; then
    make_pattern C.pat C "$MIB"
    # Eight writers, two per region on regions 0-3, each on its own half of the region (64 KiB
    # O_DIRECT writes, disjoint blocks: concurrent writes to the same block could land in a
    # different order on each leg). With two writers per region its pending count rarely drops
    # to 0, so the region stays marked (a lone writer at depth 1 holds its mark only while its
    # write is in flight, and waits for each MARK with none held): the kill finds node 2 with
    # marks held and writes in flight.
    for _w in 0 1 2 3 4 5 6 7; do
        (
            _first=$(((_w / 2) * 8 + (_w % 2) * 4))
            while :; do
                dd if=C.pat of="/dev/mapper/$DEV" bs=64K skip="$_first" seek="$_first" count=4 \
                    oflag=direct conv=notrunc status=none
            done
        ) &
    done
    # Ask for the kill the moment this node's agent shows node 2 holding marks (the writers
    # run): the marks come and go with the writes, so nothing slow (a mailbox write, a second
    # status) may sit between the check and the request (a run once saw them all cleared).
    mbox_put "$NODE" "8 writing"
    _t0=$(now_cs)
    until ulog-agent status 2>/dev/null | awk '$1 == 2 && $2 == "live" && $3 > 0 { f = 1 } END { exit !f }'; do
        [ $(($(now_cs) - _t0)) -lt 3000 ] || fail "the writers did not leave node 2 with marked regions within 30 s: $(ulog-agent status 2>&1)"
        sleep 1
    done
    echo "ULOG-KILL-ME node $NODE"
    log "writers running with regions marked; asked the host to kill this guest"
    # The host kills qemu now; this guest never reports a result (a result line means a failure).
    sleep 120
    fail "not killed by the host within 120 s"
fi

# Node 1 (the survivor).
dmesg_mark
wait_peer 8 120
log "node 2 is writing and is about to be killed"
# Assertion 3a: corosync and the agent see node 2 gone (NodeDown after the token timeout, ~2 s);
# two_node keeps node 1 quorate.
_t0=$(now_cs)
while :; do
    ulog-agent status >status2.txt 2>&1
    grep -q "^Cluster log .*: node 1, members 1;" status2.txt && break
    [ $(($(now_cs) - _t0)) -lt 6000 ] || fail "node 2 still a member after 60 s: $(cat status2.txt)"
    sleep 1
done
log "node 2 left the log's group after $(($(now_cs) - _t0))0 ms"
grep -q '^Cluster: quorate' status2.txt || fail "the survivor lost quorum: $(cat status2.txt)"
# Assertion 3b: node 2's marks are held (guarantee 2/3: an acknowledged mark survives the crash
# of the node that made it), and its held regions count as out of sync (IN_SYNC false, so the
# kernel reads them from the default leg only, and GET_SYNC_COUNT drops).
HELD=$(awk '$1 == 2 && /departed/ { print $(NF - 1) }' status2.txt)
log "node 2's held marks: '${HELD}'; $(grep '^Cluster log' status2.txt)"
[ -n "$HELD" ] || fail "node 2 not listed as departed with marks held: $(cat status2.txt)"
[ "$HELD" -gt 0 ] || fail "node 2 died mid-write but holds no marked region: $(cat status2.txt)"
IN_SYNC=$(mirror_in_sync "$DEV")
log "dmsetup status before the fencing confirmation: $(mirror_status "$DEV")"
assert_le "$IN_SYNC" $((REGIONS - HELD)) "in-sync regions while node 2's $HELD marked regions are held"

# The host writes "fenced 2" once B's qemu has exited: only then is confirming safe.
_t0=$(now_cs)
until [ "$(mbox_get 0)" = "fenced 2" ]; do
    [ $(($(now_cs) - _t0)) -lt 6000 ] || fail "no fencing word from the host after 60 s: '$(mbox_get 0)'"
    sleep 1
done
log "host: node 2's qemu is gone"
LOGNAME=ulogpair000000001
resync_asks() { sum "$1" "ulog_requests_total{log=\"$LOGNAME\",type=\"GET_RESYNC_WORK\","; }
# Evidence only (a write in flight may or may not have reached one leg alone): do the legs
# differ now, before any resync of node 2's regions?
drop_caches "$LEG0" "$LEG1"
if [ "$(md5_of "$LEG0" 0 "$MIB")" = "$(md5_of "$LEG1" 0 "$MIB")" ]; then
    log "legs identical before the resync of node 2's regions (no torn write this time)"
else
    log "legs differ before the resync of node 2's regions (a write of node 2 reached one leg only)"
fi
scrape before-confirm.prom
run ulog-agent cluster confirm-fenced --node 2

# Assertion 3c: the survivor resyncs node 2's reclaimed regions once they are confirmed, with
# nothing more done on it. What the kernel does: dm-raid1 asks for resync work (GET_RESYNC_WORK,
# from do_recovery) when kmirrord runs, but dm-log-userspace answers get_resync_work itself with
# "no work" once its in_sync_hint reached region_count (set by any GET_SYNC_COUNT answer == N:
# `dmsetup status`, or the end of the initial resync), and only RESUME resets that hint. So the
# agent, seeing work that no node recovers for 5 s, suspends and resumes its own mirror
# (ulog_cluster_recovery_restarts_total); nothing on this node may be done here but waiting.
IDLE_RESYNC=ok
_t0=$(now_cs)
until [ "$(mirror_in_sync "$DEV")" = "$REGIONS" ]; do
    if [ $(($(now_cs) - _t0)) -ge 6000 ]; then
        IDLE_RESYNC="not in sync 60 s after the fencing confirmation: $(mirror_status "$DEV")"
        break
    fi
    sleep 1
done
scrape after-idle.prom
log "3c (the survivor resyncs after the confirmation): $IDLE_RESYNC; GET_RESYNC_WORK answered: $(resync_asks before-confirm.prom) before the confirmation, $(resync_asks after-idle.prom) after; recovery restarts: $(sum after-idle.prom ulog_cluster_recovery_restarts_total); $(ulog-agent status 2>&1 | grep '^Cluster log')"
[ "$IDLE_RESYNC" = ok ] || fail "3c: $IDLE_RESYNC"
assert_le 1 "$(sum after-idle.prom ulog_cluster_recovery_restarts_total)" "the agent restarted its kernel's recovery"
assert_eq "$(sum after-idle.prom ulog_cluster_recovery_restart_failures_total)" 0 "failed recovery restarts"

# Assertion 3d: the survivor's kernel resyncs node 2's regions (GET_RESYNC_WORK hands them out
# first, dm-raid1 copies the default leg over the other, SET_REGION_SYNC): N/N again, both legs
# alive, nothing left reclaimed, node 2 no longer holding regions.
wait_for_sync "$DEV" 60
assert_eq "$(mirror_health "$DEV")" AA "leg health after the resync"
log_status_ok "$(mirror_log_status "$DEV")" || fail "log status after the resync: $(mirror_log_status "$DEV")"
scrape after-resync.prom
log "GET_RESYNC_WORK answered after the resync: $(resync_asks after-resync.prom)"
# Each reclaimed region was handed out by GET_RESYNC_WORK and copied by this kernel (not just
# declared in sync): at least HELD more answers than before the confirmation.
assert_le $(($(resync_asks before-confirm.prom) + HELD)) "$(resync_asks after-resync.prom)" \
    "GET_RESYNC_WORK answered since the confirmation vs node 2's $HELD reclaimed regions"
_reclaimed=$(sum after-resync.prom ulog_cluster_reclaimed_regions)
assert_eq "$_reclaimed" 0 "ulog_cluster_reclaimed_regions after the resync"
ulog-agent status >status3.txt 2>&1
log "after the resync: $(grep '^Cluster log' status3.txt)"
if awk '$1 == 2 && /departed/' status3.txt | grep -q .; then fail "node 2 still held after the confirmation: $(cat status3.txt)"; fi

# No userspace-log request timed out on the survivor (a request held across node 2's death and
# never answered would show as "Request timed out" after 15 s), no mirror error.
if dmesg_since_mark | grep -i 'timed out\|log failure\|error' | grep -qi 'dm\|mirror\|raid1\|userspace'; then
    fail "kernel errors on the survivor during phase 2: $(dmesg_since_mark | tail -n 20)"
fi

# Assertion 3e: the legs are identical: whatever node 2 had in flight (possibly on one leg only)
# was resynced from the default leg.
legs_equal "$SECTORS" "$LEG0" "$LEG1"

dm_remove "$DEV"
agent_stop TERM
assert_eq "$AGENT_RC" 0 "ulog-agent exit status after SIGTERM"
log "passed"
