# Runs inside the VFIO test guest (scripts/vfio-guest/run --script), driven by
# tests/tests/nvme_vfio.rs. Two controllers bound to vfio-pci, in NVME_BDFS order:
#   A: 128 MiB, 512-byte blocks, MDTS 16 KiB, 2 I/O queue pairs, discard passed to its file
#   B: 64 MiB, 4096-byte blocks, 1 I/O queue pair
# The host wrote patterns into both backing files before boot and checks what this script
# writes after the guest exits. Each check prints "ok NAME" or "FAIL NAME: ..."; the host
# expects every name, so a check that did not run fails too.

set -- $NVME_BDFS
A=$1
B=$2
IO=basalt-io
IMG=basalt-img
fails=0

check() {
    name=$1
    shift
    if out=$("$@" 2>&1); then
        echo "ok $name"
    else
        echo "FAIL $name: $out"
        fails=$((fails + 1))
    fi
}

# The command must fail and say $2.
refuse() {
    name=$1
    want=$2
    shift 2
    out=$("$@" 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && echo "$out" | grep -q "$want"; then
        echo "ok $name: $(echo "$out" | head -1)"
    else
        echo "FAIL $name (exit $rc, wanted '$want'): $out"
        fails=$((fails + 1))
    fi
}

# What the host wrote reads back here (A: 0x5a at 120 MiB, 512 KiB; B: 0xa5 in LBA 3).
check host-pattern-a $IO -f raw -c 'read -P 0x5a 120M 512k' -c 'read -P 0 119M 1M' nvme://$A/1
check host-pattern-b $IO -f raw -c 'read -P 0xa5 12k 4k' -c 'read -P 0 8k 4k' nvme://$B/1

# Patterns the host looks for: page- and MDTS-crossing transfers, an unaligned write (padded by
# the engine), 1 MiB transfers split at MDTS, FUA, zeroes and deallocation over written data.
check write-a $IO -f raw \
    -c 'write -P 0x11 100M 1M' \
    -c 'write -P 0x22 102400512 20480' \
    -c 'write -P 0x33 103809031 70001' \
    -c 'write -f -P 0x44 104M 12k' \
    -c 'write -P 0x55 105M 2M' -c 'write -z 105M 1M' -c 'discard 106M 1M' \
    -c 'flush' nvme://$A/1
check read-a $IO -f raw \
    -c 'read -P 0x11 100M 1M' -c 'read -P 0x22 102400512 20480' -c 'read -P 0x33 103809031 70001' \
    -c 'read -P 0x44 104M 12k' -c 'read -P 0 105M 2M' nvme://$A/1
# PRP lists where SGLs would otherwise be used (x-sgl=off): 1 MiB split at MDTS into 4-page
# transfers.
check prp-lists $IO --image-opts -c 'write -P 0x88 110M 1M' -c 'read -P 0x88 110M 1M' "driver=nvme,device=$A,x-sgl=off"
check write-b $IO -f raw -c 'write -P 0x66 40M 1M' -c 'write -P 0x77 41M 4k' -c 'write -z 40M 64k' nvme://$B/1
check info-a $IMG info nvme://$A/1

# basalt-img bench on the namespace (writes land in 0..8 MiB, which the copy below overwrites).
check img-bench-write $IMG bench -f raw -c 2000 -d 32 -w nvme://$A/1
check img-bench-read $IMG bench -f raw -c 2000 -d 32 nvme://$A/1

# Two reactors, two queue pairs: a copy of 96 MiB is spread over both cores.
check make-src $IMG create -q -f raw /tmp/src.raw 96M
check fill-src $IO -f raw -c 'write -P 1 0 32M' -c 'write -P 2 32M 32M' -c 'write -P 3 64M 32M' /tmp/src.raw
check convert-2q $IMG convert -n -f raw -O raw /tmp/src.raw nvme://$A/1
check bench-2q basalt-bench --filename=nvme://$A/1 --format=raw --rw=randread --cores=2 --iodepth=16 --number_ios=4000
# B grants one queue pair: a second core is refused, by name.
refuse one-queue-pair 'no I/O queue pair left' basalt-bench --filename=nvme://$B/1 --format=raw --rw=randread --cores=2 --runtime=3

# qcow2 on a namespace: created, written, checked here; the host checks it with qemu-img.
check qcow2-create $IMG create -q -f qcow2 nvme://$B/1 32M
check qcow2-write $IO -c 'write -P 0x44 0 1M' -c 'write -P 0x55 20M 64k' -c 'write -z 1M 64k' -c 'write -c -P 0x66 2M 64k' nvme://$B/1
check qcow2-check $IMG check nvme://$B/1
check qcow2-info sh -c "$IMG info nvme://$B/1 | grep -q 'file format: qcow2'"

# Bad cases.
refuse no-device 'does not exist' $IO -c 'read 0 512' nvme://0000:00:1f.6/1
refuse bad-address 'Invalid PCI address' $IO -c 'read 0 512' nvme://00:zz.0/1
refuse no-namespace 'namespace 5 does not exist' $IO -c 'read 0 512' nvme://$A/5
refuse bad-namespace 'positive number expected' $IO -c 'read 0 512' nvme://$A/x
$IO -f raw -c 'sleep 4000' nvme://$A/1 >/dev/null 2>&1 &
holder=$!
sleep 2
refuse in-use 'in use' $IO -f raw -c 'read 0 512' nvme://$A/1
wait $holder
# A controller that stops answering mid-run (memory decoding switched off behind the driver's
# back; QEMU then reads its registers as zeroes, so the command times out after 30 s): the I/O
# fails with EIO and a message saying why; nothing hangs. Closing the VFIO device resets it for
# whoever comes next.
(sleep 2; printf '\000\000' | dd of=/sys/bus/pci/devices/$A/config bs=1 seek=4 count=2 conv=notrunc 2>/dev/null) &
refuse controller-gone 'timed out after 30s: stopping the controller' $IO -f raw -c 'sleep 4000' -c 'read 0 4k' nvme://$A/1
wait
if [ "$VFIO_MODE" = noiommu ]; then
    # Without an IOMMU the driver takes only hugepages for DMA.
    n=$(cat /proc/sys/vm/nr_hugepages)
    echo 0 >/proc/sys/vm/nr_hugepages
    refuse noiommu-needs-hugepages 'only hugepages' $IO -f raw -c 'read 0 512' nvme://$A/1
    echo "$n" >/proc/sys/vm/nr_hugepages
fi
echo "$B" >/sys/bus/pci/devices/$B/driver/unbind
refuse not-vfio 'not bound to vfio-pci' $IO -c 'read 0 512' nvme://$B/1

echo "failures: $fails"
[ $fails -eq 0 ]
