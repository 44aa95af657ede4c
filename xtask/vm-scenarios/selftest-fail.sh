# selftest-fail (not in the suite): proves the harness reports a failing assertion. It leaves a
# mirror and loop devices behind on purpose, so /init's dmesg dump and cleanup run too.
# `cargo xtask vm run selftest-fail` must exit non-zero and keep the console log.
. /scenarios/lib.sh
loop_create L0 leg0.img 4
loop_create L1 leg1.img 4
dm_create selftest "0 8192 mirror core 1 1024 2 $L0 0 $L1 0"
wait_for_sync selftest 30
assert_eq "$(mirror_sync_ratio selftest)" "7/8" "deliberately wrong expectation"
log "not reached"
