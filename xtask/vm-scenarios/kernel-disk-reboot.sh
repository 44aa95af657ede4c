# kernel-disk-reboot (2 boots): the kernel's own `disk` log on persistent virtio disks across a
# hard reset with a write in flight: the reference for ulog's clustered-disk restart scenarios
# (and a test of the multi-boot runner). Disks: /dev/vda = leg 0, /dev/vdb = leg 1 (through a
# linear device, so it can be suspended), /dev/vdc = log (fresh, zero).
# Boot 1: leg 0 = pattern A; create; N/N; write B at 4 MiB; suspend leg 1 and write W at 12 MiB:
#         the write reaches leg 0 but hangs on leg 1, so its regions stay dirty on the log
#         device; hard reset.
# Boot 2: the on-disk log has the written regions dirty and all others clean; create the same
#         table: the kernel reads the log and resyncs from leg 0; N/N; the mirror holds A, B at
#         4 MiB and W's first MiB at 12 MiB; legs equal; remove; all regions clean on disk.
. /scenarios/lib.sh

MIB=16
SECTORS=$((MIB * 2048))
REGION=1024
REGIONS=$((SECTORS / REGION))   # 32: the clean bitmap is 4 bytes at offset 1024
L0=/dev/vda
L1=/dev/mapper/kdisk_l1
LOG=/dev/vdc
TABLE="0 $SECTORS mirror disk 2 $LOG $REGION 2 $L0 0 $L1 0"
DEV=kdisk

for d in /dev/vda /dev/vdb /dev/vdc; do [ -b "$d" ] || fail "$d missing (the scenario needs 3 virtio disks)"; done
make_pattern A.pat A "$MIB"
make_pattern B.pat B 4
make_pattern W.pat W 1

# The on-disk clean bitmap as hex bytes without blanks (O_DIRECT: the kernel writes it directly).
disk_bitmap() {
    dd if="$LOG" bs=4096 count=1 iflag=direct status=none | od -An -tx1 -j1024 -N$((REGIONS / 8)) | tr -d ' \n'
}

dm_create kdisk_l1 "0 $SECTORS linear /dev/vdb 0"

case $BOOT in
1)
    write_at "$L0" A.pat 0
    dm_create "$DEV" "$TABLE"
    wait_for_sync "$DEV" 60
    legs_equal "$SECTORS" "$L0" "$L1"
    write_at "/dev/mapper/$DEV" B.pat 4
    assert_eq "$(disk_bitmap)" ffffffff "on-disk bitmap before the hanging write"
    run dmsetup suspend kdisk_l1
    log "+ dd W.pat -> $DEV at 12 MiB (hangs on the suspended leg 1)"
    dd if=W.pat of="/dev/mapper/$DEV" bs=1M seek=12 oflag=direct status=none &
    n=0
    while [ "$(disk_bitmap)" = ffffffff ]; do
        [ "$n" -lt 100 ] || fail "no region became dirty on the log device within 10 s"
        usleep 100000
        n=$((n + 1))
    done
    log "on-disk bitmap with the write in flight: $(disk_bitmap)"
    log "status: $(mirror_status "$DEV")"
    hard_reset
    ;;
2)
    drop_caches "$LOG"
    assert_eq "$(dd if="$LOG" bs=4096 count=1 iflag=direct status=none | head -c 4)" "rRiM" "disk log magic after the reset"
    assert_eq "$(od -An -tu8 -j8 -N8 "$LOG" | tr -d ' ')" "$REGIONS" "disk log nr_regions after the reset"
    bm=$(disk_bitmap)
    log "on-disk bitmap after the reset: $bm"
    # Regions 24..27 (12-14 MiB) hold bits 0-3 of byte 3: some of them dirty, all others clean.
    assert_match "$bm" "fffffff[0-9a-e]" "on-disk bitmap after the reset (regions 24-27 dirty)"
    dm_create "$DEV" "$TABLE"
    log "status after create: $(mirror_status "$DEV")"
    wait_for_sync "$DEV" 60
    assert_eq "$(mirror_health "$DEV")" "AA" "leg health"
    legs_equal "$SECTORS" "$L0" "$L1"
    cp A.pat expect.pat
    run dd if=B.pat of=expect.pat bs=1M seek=4 conv=notrunc status=none
    run dd if=W.pat of=expect.pat bs=1M seek=12 conv=notrunc status=none
    drop_caches "/dev/mapper/$DEV"
    assert_content "/dev/mapper/$DEV" 0 expect.pat "mirror (A, B at 4 MiB, W at 12 MiB)"
    dm_remove "$DEV"
    assert_eq "$(disk_bitmap)" ffffffff "on-disk bitmap after remove"
    dm_remove kdisk_l1
    ;;
*) fail "unexpected boot $BOOT" ;;
esac
log "boot $BOOT passed"
