# no-server: with nothing listening on the dm-log-userspace connector group, creating a
# `userspace` mirror (clustered-core, then clustered-disk) must fail, quickly (the kernel
# answers -EINVAL at once: "Userspace log server not found"), and leave no device behind.
. /scenarios/lib.sh

loop_create L0 leg0.img 16
loop_create L1 leg1.img 16
loop_create L2 log.img 4

grep -q dmlogusr /proc/net/connector || fail "dm-log-userspace is not registered in /proc/net/connector"
if ulog_listener_present; then fail "something already listens on connector group 7"; fi

for kind in core disk; do
    case $kind in
        core) TABLE="0 32768 mirror userspace 3 LVM-ulognoserver0001 clustered-core 1024 2 $L0 0 $L1 0" ;;
        disk) TABLE="0 32768 mirror userspace 4 LVM-ulognoserver0002 clustered-disk $L2 1024 2 $L0 0 $L1 0" ;;
    esac
    DEV=noserver_$kind
    dmesg_mark
    t0=$(now_cs)
    log "+ (must fail) dmsetup create $DEV --table '$TABLE'"
    dmsetup create "$DEV" --table "$TABLE" >./out 2>&1 &
    pid=$!
    n=0
    while kill -0 "$pid" 2>/dev/null; do
        [ "$n" -lt 100 ] || fail "dmsetup create still running after 10 s (blocked waiting for a server?)"
        usleep 50000
        n=$((n + 2))
    done
    if wait "$pid"; then fail "dmsetup create of a userspace mirror succeeded without a server"; fi
    dt=$(($(now_cs) - t0))
    log "failed as expected after ${dt}0 ms: $(tr '\n' ' ' <./out)"
    assert_le "$dt" 300 "time for dmsetup create to fail (centiseconds)"
    dmesg_since_mark | grep -q "Userspace log server not found" ||
        fail "dmesg lacks 'Userspace log server not found': $(dmesg_since_mark | tail -n 5 | tr '\n' '|')"
    if dm_exists "$DEV"; then fail "$DEV exists after the failed create"; fi
    [ ! -e "/dev/mapper/$DEV" ] || fail "/dev/mapper/$DEV left behind"
done
log "passed"
