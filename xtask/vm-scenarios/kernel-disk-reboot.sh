# kernel-disk-reboot (2 boots): the kernel's own `disk` log on persistent virtio disks across a
# hard reset, the reference for ulog's clustered-disk restart scenarios (and a test of the
# multi-boot runner). Disks: /dev/vda = leg 0, /dev/vdb = leg 1, /dev/vdc = log (fresh, zero).
# Boot 1: leg 0 = pattern A; create; N/N; write B at 4 MiB (fsync'ed); keep writing W at
#         12-14 MiB in the background; hard reset while the mirror is live.
# Boot 2: the log header says 32 regions; create the same table: the kernel reads the log;
#         resync to N/N; B and A where they were written, legs equal; remove; all clean.
. /scenarios/lib.sh

MIB=16
SECTORS=$((MIB * 2048))
REGION=1024
REGIONS=$((SECTORS / REGION))
L0=/dev/vda
L1=/dev/vdb
LOG=/dev/vdc
TABLE="0 $SECTORS mirror disk 2 $LOG $REGION 2 $L0 0 $L1 0"
DEV=kdisk

for d in $L0 $L1 $LOG; do [ -b "$d" ] || fail "$d missing (the scenario needs 3 virtio disks)"; done
make_pattern A.pat A "$MIB"
make_pattern B.pat B 4
cp A.pat expect.pat
run dd if=B.pat of=expect.pat bs=1M seek=4 conv=notrunc status=none

case $BOOT in
1)
    write_at "$L0" A.pat 0
    dm_create "$DEV" "$TABLE"
    wait_for_sync "$DEV" 60
    legs_equal "$SECTORS" "$L0" "$L1"
    write_at "/dev/mapper/$DEV" B.pat 4
    make_pattern W.pat W 2
    (
        while :; do dd if=W.pat of="/dev/mapper/$DEV" bs=1M seek=12 oflag=direct status=none; done
    ) &
    sleep 1
    log "status while writing: $(mirror_status "$DEV")"
    hard_reset
    ;;
2)
    drop_caches "$LOG"
    assert_eq "$(dd if="$LOG" bs=4096 count=1 iflag=direct status=none | head -c 4)" "rRiM" "disk log magic after the reset"
    assert_eq "$(od -An -tu8 -j8 -N8 "$LOG" | tr -d ' ')" "$REGIONS" "disk log nr_regions after the reset"
    log "clean bitmap after the reset: $(od -An -tx1 -j1024 -N$((REGIONS / 8)) "$LOG" | tr -d '\n')"
    dm_create "$DEV" "$TABLE"
    log "status after create: $(mirror_status "$DEV")"
    wait_for_sync "$DEV" 60
    assert_eq "$(mirror_health "$DEV")" "AA" "leg health"
    legs_equal "$SECTORS" "$L0" "$L1"
    # Everything but the range that was being rewritten at the reset is known.
    dd if=expect.pat of=head.pat bs=1M count=12 status=none
    dd if=expect.pat of=tail.pat bs=1M skip=14 status=none
    drop_caches "/dev/mapper/$DEV"
    assert_content "/dev/mapper/$DEV" 0 head.pat "mirror 0-12 MiB (A, B at 4 MiB)"
    assert_content "/dev/mapper/$DEV" 14 tail.pat "mirror 14-16 MiB (A)"
    dm_remove "$DEV"
    drop_caches "$LOG"
    assert_eq "$(od -An -tx1 -j1024 -N$((REGIONS / 8)) "$LOG" | tr -d ' \n')" \
        "$(printf 'ff%.0s' $(seq 1 $((REGIONS / 8))))" "disk log clean bitmap after remove"
    ;;
*) fail "unexpected boot $BOOT" ;;
esac
log "boot $BOOT passed"
