# selftest-hang (not in the suite): proves the guest watchdog. It hangs with a mirror and a
# background process alive; /init must kill its process group after the timeout, report
# ULOG-TIMEOUT and a failure, remove the leftovers and go on.
. /scenarios/lib.sh
loop_create L0 leg0.img 4
loop_create L1 leg1.img 4
dm_create selftest "0 8192 mirror core 1 1024 2 $L0 0 $L1 0"
sleep 1000 &
log "hanging"
sleep 1000
