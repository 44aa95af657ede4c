# demo: what `cargo xtask demo` runs in the guest (not part of the suite). Brings up the
# network (qemu user networking: the host forwards a port to 10.0.2.15:9477), starts
# ulog-agent with its eBPF probes and its HTTP API on 0.0.0.0:9477, creates a clustered-core
# mirror and a clustered-disk mirror (64 MiB legs, 1024 regions of 64 KiB each, resyncing
# from scratch), prints ULOG-DEMO-READY, then writes 4 KiB O_DIRECT blocks to both mirrors at a
# bounded rate (DEMO_WRITES_PER_TICK every 0.2 s, spread over the regions) until the host stops
# the VM. Every 10 s it prints one status line per mirror.
. /scenarios/lib.sh

MIB=64
SECTORS=$((MIB * 2048))
REGION=128 # 64 KiB: 1024 regions
BLOCKS=$((MIB * 256))
PER_TICK=${DEMO_WRITES_PER_TICK:-4}

ip link set eth0 up || fail "no eth0 (virtio_net)"
ip addr add 10.0.2.15/24 dev eth0 || fail "cannot configure eth0"
ip route add default via 10.0.2.2 2>/dev/null

loop_create L0 core0.img "$MIB"
loop_create L1 core1.img "$MIB"
loop_create D0 disk0.img "$MIB"
loop_create D1 disk1.img "$MIB"
loop_create LOGDEV log.img 1
make_pattern W.pat W 1

RUST_LOG=info,aya=warn,aya_obj=warn ulog_start --http-addr 0.0.0.0:9477
log "eBPF probe: $(ulog_probe_state)"
dm_create democore "0 $SECTORS mirror userspace 3 LVM-ulogdemocore clustered-core $REGION 2 $L0 0 $L1 0 1 handle_errors"
dm_create demodisk "0 $SECTORS mirror userspace 4 LVM-ulogdemodisk clustered-disk $LOGDEV $REGION 2 $D0 0 $D1 0 1 handle_errors"
echo "ULOG-DEMO-READY"

i=0
tick=0
while :; do
    n=0
    while [ "$n" -lt "$PER_TICK" ]; do
        # A prime stride over the blocks: every region gets written, neighbours rarely in a row.
        b=$(((i * 7919) % BLOCKS))
        dd if=W.pat of=/dev/mapper/democore bs=4k count=1 skip=$((i % 256)) seek="$b" oflag=direct conv=notrunc status=none ||
            fail "write to democore failed"
        dd if=W.pat of=/dev/mapper/demodisk bs=4k count=1 skip=$((i % 256)) seek="$b" oflag=direct conv=notrunc status=none ||
            fail "write to demodisk failed"
        i=$((i + 1))
        n=$((n + 1))
    done
    tick=$((tick + 1))
    if [ $((tick % 50)) -eq 0 ]; then
        agent_alive || fail "ulog-agent died"
        log "writes so far: $i per mirror; democore $(mirror_sync_ratio democore) $(mirror_health democore); demodisk $(mirror_sync_ratio demodisk) $(mirror_health demodisk)"
    fi
    usleep 200000
done
