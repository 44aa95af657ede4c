# kernel-baseline: dm-mirror with the kernel's own logs, as the reference the ulog scenarios
# are compared with. For the `core` log and then the `disk` log (on a third loop device):
# leg 0 holds pattern A and leg 1 zeros; create; wait for N/N; both legs must now hold A (the
# resync copied it); write pattern B through the mirror; read it back; legs equal; status
# strings; remove. For the disk log, also check its on-disk header and clean bitmap.
. /scenarios/lib.sh

MIB=16
SECTORS=$((MIB * 2048))
REGION=1024                        # sectors (512 KiB)
REGIONS=$((SECTORS / REGION))      # 32

loop_create L0 leg0.img "$MIB"
loop_create L1 leg1.img "$MIB"
loop_create LOG log.img 4
make_pattern A.pat A "$MIB"
make_pattern B.pat B 4

for kind in core disk; do
    log "==== $kind log ===="
    # Fresh legs (leg 1 and the log zeroed: a new disk log means a full resync).
    write_at "$L0" A.pat 0
    run dd if=/dev/zero of="$L1" bs=1M count="$MIB" oflag=direct conv=fsync status=none
    run dd if=/dev/zero of="$LOG" bs=1M count=4 oflag=direct conv=fsync status=none
    case $kind in
        core) TABLE="0 $SECTORS mirror core 1 $REGION 2 $L0 0 $L1 0" ;;
        disk) TABLE="0 $SECTORS mirror disk 2 $LOG $REGION 2 $L0 0 $L1 0" ;;
    esac
    DEV=base_$kind
    dm_create "$DEV" "$TABLE"
    log "status after create: $(mirror_status "$DEV")"
    wait_for_sync "$DEV" 60
    assert_eq "$(mirror_sync_ratio "$DEV")" "$REGIONS/$REGIONS" "sync ratio"
    assert_eq "$(mirror_health "$DEV")" "AA" "leg health"
    case $kind in
        core) assert_eq "$(mirror_log_status "$DEV")" "1 core" "log status" ;;
        disk) assert_match "$(mirror_log_status "$DEV")" "3 disk [0-9]*:[0-9]* A" "log status" ;;
    esac
    assert_match "$(dmsetup table "$DEV")" "0 $SECTORS mirror $kind *" "table"

    # The resync copied leg 0 to leg 1.
    legs_equal "$SECTORS" "$L0" "$L1"
    assert_content "$L1" 0 A.pat "leg 1 after resync"

    # Writes through the mirror reach both legs.
    write_at "/dev/mapper/$DEV" B.pat 8
    drop_caches "/dev/mapper/$DEV"
    assert_content "/dev/mapper/$DEV" 8 B.pat "read back through the mirror"
    wait_for_sync "$DEV" 30
    legs_equal "$SECTORS" "$L0" "$L1"
    # Expected content of every leg: A with B at 8 MiB.
    cp A.pat expect.pat
    run dd if=B.pat of=expect.pat bs=1M seek=8 conv=notrunc status=none
    assert_content "$L0" 0 expect.pat "leg 0"
    assert_content "$L1" 0 expect.pat "leg 1"
    rm -f expect.pat

    dm_remove "$DEV"

    if [ "$kind" = disk ]; then
        # dm-log.c format: magic "MiRr" (le32 0x4D695272), version 2, nr_regions (le64), and the
        # clean bitmap at byte 1024: all regions clean after a clean shutdown.
        drop_caches "$LOG"
        assert_eq "$(dd if="$LOG" bs=4096 count=1 iflag=direct status=none | head -c 4)" "rRiM" "disk log magic"
        assert_eq "$(od -An -tu4 -j4 -N4 "$LOG" | tr -d ' ')" "2" "disk log version"
        assert_eq "$(od -An -tu8 -j8 -N8 "$LOG" | tr -d ' ')" "$REGIONS" "disk log nr_regions"
        assert_eq "$(od -An -tx1 -j1024 -N$((REGIONS / 8)) "$LOG" | tr -d ' \n')" \
            "$(printf 'ff%.0s' $(seq 1 $((REGIONS / 8))))" "disk log clean bitmap"
    fi
done
log "passed"
