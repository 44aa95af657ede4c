# cluster-bench: the guest side of `cargo xtask vm bench --jobs cluster` (not a test: nothing
# about timings is asserted; the host collects the `ULOG-BENCH key value` lines of node 1).
# Two guests, the same setup as cluster-pair (cluster-lib.sh), one clustered-core mirror of
# 64 MiB in 256 KiB regions (256 regions) on the shared legs:
# - IOPS: fio 4 KiB random writes, queue depth 1, on a `nosync` mirror, for BENCH_SECS seconds:
#   node 1 alone on its half (node 2's mirror active and idle), then both at once, each on its own
#   half; ROUNDS rounds alternating. Reported: per-node IOPS, one node vs two nodes.
# - Resync: the same mirror without `nosync` under a fresh uuid: node 1 alone creates it and
#   waits for N/N; then both create it at once (each kernel recovers one region at a time, the
#   agents hand out different regions) and node 1 waits for N/N. Time from create to N/N.
# - Round trips per request type: node 1 scrapes its agent's /metrics before and after one fio
#   write phase (the same fio as IOPS) in three configurations: `single` (node 1's agent without
#   --cluster, node 2 idle with no agent), `cluster1` (node 1 with --cluster, alone in the CPG
#   group) and `cluster2` (both with --cluster and writing: the first two-writer round). The
#   histogram bucket lines go to the host as `ULOG-BENCH h.CFG.0|1.SERIES COUNT` (k = the
#   kernel-side round trip, a = the agent's service time); the host takes the deltas and quantiles.
. /scenarios/lib.sh
. /scenarios/cluster-lib.sh

MIB=64
SECTORS=$((MIB * 2048))
REGION=512
REGIONS=$((SECTORS / REGION))
BENCH_SECS=${BENCH_SECS:-8}
ROUNDS=${ROUNDS:-2}
DEV=cbench
HALF=$((MIB / 2))
[ -x /usr/bin/fio ] || fail "no fio in the initramfs"

bench() { # KEY VALUE: a figure for the host (node 1 only)
    [ "$NODE" = 1 ] && echo "ULOG-BENCH $1 $2"
    log "bench $1 = $2"
}
table() { # UUID [nosync]
    if [ -n "$2" ]; then
        echo "0 $SECTORS mirror userspace 4 $1 clustered-core $REGION nosync 2 $LEG0 0 $LEG1 0 1 handle_errors"
    else
        echo "0 $SECTORS mirror userspace 3 $1 clustered-core $REGION 2 $LEG0 0 $LEG1 0 1 handle_errors"
    fi
}
fio_iops() { # OUT: 4 KiB random writes, depth 1, on this node's half; IOPS into OUT
    fio --name=rand4k --filename="/dev/mapper/$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
        --iodepth=1 --offset=$(((NODE - 1) * HALF))M --size=${HALF}M --norandommap --time_based \
        --runtime="$BENCH_SECS" --output-format=json --output="$1.json" >/dev/null 2>"$1.err" ||
        fail "fio failed: $(cat "$1.err")"
    sed -n 's/.*"iops" : \([0-9.]*\).*/\1/p' "$1.json" | sed -n 2p >"$1"
    grep -q . "$1" || fail "no write IOPS in $1.json"
}

hist_out() { # CFG SNAPSHOT FILE: the histogram buckets of FILE with a count, for the host
    [ "$NODE" = 1 ] || return 0
    sed -n -e 's/^ulog_kernel_request_duration_seconds_bucket{/k{/p' \
        -e 's/^ulog_request_duration_seconds_bucket{/a{/p' "$3" | grep -v ' 0$' |
        while read -r _s _v; do echo "ULOG-BENCH h.$1.$2.$_s $_v"; done
}
rtt_phase() { # CFG: node 1 creates the nosync mirror, scrapes, runs fio, scrapes, removes
    dm_create "$DEV" "$(table "LVM-ulogcbench00rtt$1" nosync)" 60
    wait_for_sync "$DEV" 60
    scrape "rtt-$1-0"
    fio_iops "rtt-$1"
    scrape "rtt-$1-1"
    bench "iops_$1" "$(cat "rtt-$1")"
    hist_out "$1" 0 "rtt-$1-0"
    hist_out "$1" 1 "rtt-$1-1"
    dm_remove "$DEV" 60
}

RUST_LOG=${RUST_LOG:-info}
# ---- round trips: node 1 alone, without and then with --cluster (node 2 has no agent yet) ----
if [ "$NODE" = 1 ]; then
    ulog_start
    rtt_phase single
    agent_stop
    ulog_start --cluster
    rtt_phase cluster1
fi
step 1 solo-done 300
[ "$NODE" = 2 ] && ulog_start --cluster
bench regions "$REGIONS"
bench secs "$BENCH_SECS"
step 2 agents

# ---- IOPS: one writer vs two ----------------------------------------------------------------
dm_create "$DEV" "$(table LVM-ulogcbench0000iops nosync)" 60
step 3 iops-mirror
wait_for_sync "$DEV" 60
K=3
for round in $(seq 1 "$ROUNDS"); do
    K=$((K + 1))
    step "$K" "one-writer-$round"
    if [ "$NODE" = 1 ]; then
        fio_iops one
        bench "iops_one_r$round" "$(cat one)"
    fi
    K=$((K + 1))
    step "$K" "two-writers-$round"
    [ "$round" = 1 ] && [ "$NODE" = 1 ] && scrape rtt-cluster2-0
    fio_iops two
    if [ "$round" = 1 ] && [ "$NODE" = 1 ]; then
        scrape rtt-cluster2-1
        hist_out cluster2 0 rtt-cluster2-0
        hist_out cluster2 1 rtt-cluster2-1
    fi
    # Node 2's figure in a slot of its own (its step slot moves on).
    [ "$NODE" = 2 ] && mbox_put $((10 + round)) "$(cat two)"
    K=$((K + 1))
    step "$K" "two-done-$round"
    if [ "$NODE" = 1 ]; then
        _peer_iops=$(mbox_get $((10 + round)))
        bench "iops_two_node1_r$round" "$(cat two)"
        bench "iops_two_node2_r$round" "$_peer_iops"
    fi
done
step $((K + 1)) iops-done
dm_remove "$DEV" 60
K=$((K + 2))
step "$K" iops-removed

# ---- resync: one node vs two ----------------------------------------------------------------
for round in $(seq 1 "$ROUNDS"); do
    if [ "$NODE" = 1 ]; then
        _t0=$(now_cs)
        dm_create "${DEV}1" "$(table "LVM-ulogcbench0res1r$round")" 60
        DEV1=${DEV}1
        wait_for_sync "$DEV1" 300
        bench "resync_one_ms_r$round" "$((($(now_cs) - _t0) * 10))"
        dm_remove "$DEV1" 60
    fi
    K=$((K + 1))
    step "$K" "resync-one-$round" 400
    _t0=$(now_cs)
    dm_create "${DEV}2" "$(table "LVM-ulogcbench0res2r$round")" 60
    wait_for_sync "${DEV}2" 300
    [ "$NODE" = 1 ] && bench "resync_two_ms_r$round" "$((($(now_cs) - _t0) * 10))"
    K=$((K + 1))
    step "$K" "resync-two-$round" 400
    dm_remove "${DEV}2" 60
    K=$((K + 1))
    step "$K" "resync-two-removed-$round"
done
log "bench done"
