# cluster-lib.sh: the common part of the two-guest scenarios (cluster-pair, and the cluster
# benchmark of `cargo xtask vm bench --jobs cluster`), sourced after lib.sh. Sets NODE (1|2, from
# `ulog.node=`), PEER, LEG0/LEG1/LOGDEV/MBOX (the shared disks, by serial), the mailbox helpers
# (mbox_put, mbox_get, wait_peer, step) and a failure hook with the cluster's evidence; brings
# up eth0 (10.77.0.NODE/24), writes the corosync config (two nodes, two_node: 1, token 1000) and
# starts corosync, then waits (polling once a second) until it is quorate with both votes.
# xtask/src/vm/cluster.rs is the host side.

PEERS=2
NODE=
for _a in $(cat /proc/cmdline); do
    case "$_a" in ulog.node=*) NODE=${_a#ulog.node=} ;; esac
done
[ "$NODE" = 1 ] || [ "$NODE" = 2 ] || fail "ulog.node=1|2 missing from the kernel command line"
PEER=$((3 - NODE))
NAME="$NAME/node$NODE"

# ---- disks: by the serial the host gave them ---------------------------------------------
disk_by_serial() { # VAR SERIAL
    for _s in /sys/block/vd*/serial; do
        [ "$(cat "$_s" 2>/dev/null)" = "$2" ] || continue
        _d=${_s%/serial}
        eval "$1=/dev/\${_d##*/}"
        return 0
    done
    fail "no virtio disk with serial $2 ($(grep -H . /sys/block/vd*/serial 2>/dev/null | tr '\n' ' '))"
}
disk_by_serial LEG0 leg0
disk_by_serial LEG1 leg1
disk_by_serial LOGDEV log
disk_by_serial MBOX mbox

# ---- mailbox ----------------------------------------------------------------------------
mbox_put() { # SLOT TEXT
    printf '%s\n' "$2" >./.mbox
    dd if=./.mbox of=./.mbox4k bs=4096 count=1 conv=sync status=none
    dd if=./.mbox4k of="$MBOX" bs=4096 seek="$1" count=1 oflag=direct conv=notrunc status=none
}
mbox_get() { # SLOT -> first line of the slot (never fails: used inside $(...))
    dd if="$MBOX" bs=4096 skip="$1" count=1 iflag=direct status=none | tr -d '\000' | head -n 1
}
_post_failure() { mbox_put "$NODE" "FAIL node $NODE: $(cat /tmp/ulog-fail-reason 2>/dev/null)"; }
add_fail_hook _post_failure

# wait_peer K SECS: until the peer's slot shows a step >= K.
wait_peer() {
    _t0=$(now_cs)
    while :; do
        _m=$(mbox_get "$PEER")
        case "$_m" in
            FAIL*) fail "the peer failed: $_m" ;;
            [0-9]*) [ "${_m%% *}" -ge "$1" ] && return 0 ;;
        esac
        [ $(($(now_cs) - _t0)) -lt $(($2 * 100)) ] || fail "peer (node $PEER) did not reach step $1 in $2 s (its slot: '$_m')"
        usleep 300000
    done
}
step() { # K LABEL [SECS]
    mbox_put "$NODE" "$1 $2"
    log "step $1 ($2): waiting for node $PEER"
    wait_peer "$1" "${3:-120}"
}

# ---- evidence on failure ----------------------------------------------------------------
_cluster_evidence() {
    echo "---- node $NODE: corosync-quorumtool -s ----"
    corosync-quorumtool -s 2>&1
    echo "---- node $NODE: dmsetup status ----"
    dmsetup status 2>&1
    echo "---- node $NODE: ulog-agent status ----"
    ulog-agent status 2>&1
    echo "---- node $NODE: /api/v1/logs ----"
    wget -q -O - "$AGENT_URL/api/v1/logs" 2>&1 | head -c 4000
    echo
    echo "---- node $NODE: corosync log (last 30 lines) ----"
    tail -n 30 ./corosync.log 2>/dev/null
    echo "---- mailbox: host '$(mbox_get 0)' node1 '$(mbox_get 1)' node2 '$(mbox_get 2)' ----"
}
add_fail_hook _cluster_evidence

# ---- network and corosync ---------------------------------------------------------------
run ip link set eth0 up
run ip addr add "10.77.0.$NODE/24" dev eth0
mkdir -p /etc/corosync /var/lib/corosync /var/log/cluster
[ -e /var/run ] || ln -s /run /var/run # corosync's pid file path is hard-coded under /var/run
grep -q ' /dev/shm ' /proc/mounts || mount -t tmpfs tmpfs /dev/shm
{
    printf 'totem {\n    version: 2\n    cluster_name: ulogpair\n    transport: knet\n'
    printf '    token: 1000\n    token_coefficient: 0\n    crypto_cipher: none\n    crypto_hash: none\n}\n'
    printf 'nodelist {\n'
    for _n in 1 2; do
        printf '    node {\n        nodeid: %s\n        name: node%s\n        ring0_addr: 10.77.0.%s\n    }\n' "$_n" "$_n" "$_n"
    done
    printf '}\nquorum {\n    provider: corosync_votequorum\n    two_node: 1\n}\n'
    printf 'logging {\n    to_stderr: yes\n    to_syslog: no\n    to_logfile: no\n    timestamp: on\n}\n'
    printf 'system {\n    state_dir: /var/lib/corosync\n}\n'
} >/etc/corosync/corosync.conf
corosync -f >./corosync.log 2>&1 &
COROSYNC_PID=$!
on_exit "kill $COROSYNC_PID"

# Assertion 1a: corosync quorate with both votes (two_node: the pair must have met once, since
# wait_for_all comes with it). Polled once a second: faster polling starves the guests' tokens.
_t0=$(now_cs)
until corosync-quorumtool -s 2>/dev/null | grep -q '^Quorate: *Yes' &&
    corosync-quorumtool -s 2>/dev/null | grep -q "^Total votes: *$PEERS\$"; do
    kill -0 "$COROSYNC_PID" 2>/dev/null || fail "corosync exited: $(tail -n 20 ./corosync.log)"
    [ $(($(now_cs) - _t0)) -lt 9000 ] || fail "not quorate with $PEERS votes after 90 s"
    sleep 1
done
log "corosync quorate with $PEERS votes after $(($(now_cs) - _t0))0 ms"

