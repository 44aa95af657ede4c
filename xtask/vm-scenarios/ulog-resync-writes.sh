# ulog-resync-writes: writes above the resync point during a mirror's initial resync, on the
# real kernel: what ulog answers to IS_REMOTE_RECOVERING and what the kernel then asks.
#
# Kernel behaviour this stands for (dm-log-userspace-base.c `userspace_is_remote_recovering`,
# dm-raid1.c `do_writes`): for a region below the log's in-sync hint the kernel answers "not
# recovering" itself; at or above it, it asks the server at most once per 250 ms and answers
# "recovering" in between, and such writes are requeued on a 200 ms timer. A single node has no
# remote recoverer, so ulog answers {0, N-1} while resync work remains: after one query, no
# write below the last region is ever delayed or asked about again.
#
# The resync is held at region 0: leg 1 is a linear device that is suspended, so the kernel's
# copy of region 0 waits on it (writes to regions not yet in sync go to the default leg only,
# so they complete). That keeps the flight recorder free of resync traffic and the whole
# last quarter unsynced, without any timing.
# 1. Three O_DIRECT 4 KiB writes to distinct regions of the last quarter (not the last region)
#    complete; the agent answered IN_SYNC 0 for each (they came during the resync).
# 2. The kernel asked IS_REMOTE_RECOVERING exactly once (for the first write's region) and got
#    {0, N-1}; the other writes asked nothing (with the old exact hint, 0 here, every write
#    above it would ask again or be requeued).
# 3. A write to the last region completes; its question, if the kernel asked one, got {0, N-1}.
# 4. Leg 1 resumed, the resync completes (N/N) and the legs are equal; no request failed.
. /scenarios/lib.sh

MIB=8
SECTORS=$((MIB * 2048))
REGION=16                      # 8 KiB
REGIONS=$((SECTORS / REGION))  # 1024
UUID=LVM-ulogresyncw00001
DEV=uresw

loop_create L0 leg0.img "$MIB"
loop_create L1 leg1.img "$MIB"
make_pattern A.pat A "$MIB"
write_at "$L0" A.pat 0
on_exit "_dm_cleanup slowleg"
run dmsetup create slowleg --table "0 $SECTORS linear $L1 0"
run dmsetup suspend slowleg
ulog_start
dm_create "$DEV" "0 $SECTORS mirror userspace 3 $UUID clustered-core $REGION 2 $L0 0 /dev/mapper/slowleg 0"
# Runs before the mirror's removal (cleanups run in reverse order): never leave the copy stuck.
on_exit "dmsetup resume slowleg"
log "status: $(mirror_status "$DEV")"

# requests TYPE: the flight records of that type, one per line: "first_region reply".
requests() {
    wget -q -O - "$AGENT_URL/api/v1/logs/$UUID/requests?type=$1" |
        grep -o '"first_region":[0-9]*[^}]*"reply":\[[0-9,]*\]' |
        sed 's/"first_region":\([0-9]*\).*"reply":\[\([0-9,]*\)\]/\1 \2/'
}

# 4 KiB at region R's first byte, O_DIRECT.
write_region() {
    run dd if=A.pat of="/dev/mapper/$DEV" bs=4096 count=1 seek=$(($1 * REGION / 8)) skip=$(($1 * REGION / 8)) oflag=direct conv=notrunc status=none
}

LAST_QUARTER=$((REGIONS * 3 / 4))
for r in $((LAST_QUARTER + 10)) $((LAST_QUARTER + 100)) $((REGIONS - 2)); do
    write_region "$r"
done
assert_eq "$(mirror_in_sync "$DEV")" 0 "regions in sync while leg 1 is suspended (the copy of region 0 waits)"
requests IN_SYNC >insync.txt
for r in $((LAST_QUARTER + 10)) $((LAST_QUARTER + 100)) $((REGIONS - 2)); do
    assert_eq "$(awk -v r="$r" '$1 == r { print $2 }' insync.txt | head -n 1)" 0 "IN_SYNC($r): the write came during the resync"
done
requests IS_REMOTE_RECOVERING >rr.txt
log "IS_REMOTE_RECOVERING answers (region reply): $(tr '\n' ';' <rr.txt)"
assert_eq "$(wc -l <rr.txt)" 1 "IS_REMOTE_RECOVERING requests for three writes below the last region"
assert_eq "$(cat rr.txt)" "$((LAST_QUARTER + 10)) 0,$((REGIONS - 1))" "the answer: not recovering, hint N-1"

write_region $((REGIONS - 1))
requests IS_REMOTE_RECOVERING >rr2.txt
log "after a write to the last region: $(tr '\n' ';' <rr2.txt)"
awk -v n="$REGIONS" '$2 != "0," (n - 1) { exit 1 }' rr2.txt || fail "an IS_REMOTE_RECOVERING answer is not {0, N-1}: $(tr '\n' ';' <rr2.txt)"

run dmsetup resume slowleg
wait_for_sync "$DEV" 120
legs_equal "$SECTORS" "$L0" "/dev/mapper/slowleg"
dm_remove "$DEV"
ulog_stop_totals totals
assert_totals totals exact CTR RESUME IS_REMOTE_RECOVERING IN_SYNC GET_RESYNC_WORK SET_REGION_SYNC
log "passed"
