#!/usr/bin/env bash
# Benchmark of the userspace NVMe driver against the guest kernel's own nvme driver, on the same
# emulated controller in one guest boot (scripts/vfio-guest, QEMU TCG). Emulation makes absolute
# figures meaningless; the ratios show what each driver path costs per I/O.
#
# In the guest, on one controller (256 MiB, filled with data by the host):
#   1. basalt-bench over nvme:// (Basalt's driver, VFIO, polled queue pair);
#   2. the controller handed to the kernel's nvme driver, then
#      basalt-bench over host_device:/dev/nvme0n1 (O_DIRECT, io_uring) - the same engine and
#      job over the kernel driver - and busybox dd with iflag=direct (QD 1 sequential 4 KiB).
# Jobs: 4 KiB sequential reads at queue depth 1, 4 KiB random reads at queue depth 32.
#
#   bench/nvme-guest.sh            # needs scripts/vfio-guest/setup and the guest build
#   MODE=noiommu bench/nvme-guest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-iommu}
N=${N:-20000}
./scripts/vfio-guest/setup
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --profile guest --target x86_64-unknown-linux-gnu \
    -p basalt-bench --bins
G=target/x86_64-unknown-linux-gnu/guest
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
qemu-img create -q -f raw "$dir/ns.img" 256M
qemu-io -f raw -c 'write -P 0x5c 0 256M' "$dir/ns.img" >/dev/null

cat >"$dir/guest.sh" <<EOF
set -e
BDF=\$NVME_BDFS
iops() { sed -n 's/.*IOPS=\([0-9.]*k*\).*/\1/p' | head -1; }
echo "basalt-nvme-qd1 \$(basalt-bench --filename=nvme://\$BDF/1 --format=raw --rw=read --bs=4096 --iodepth=1 --number_ios=$N | iops)"
echo "basalt-nvme-qd32 \$(basalt-bench --filename=nvme://\$BDF/1 --format=raw --rw=randread --bs=4096 --iodepth=32 --number_ios=$N | iops)"
dev=\$(use-kernel-nvme \$BDF)
echo "kernel-basalt-qd1 \$(basalt-bench --filename=host_device:\$dev --format=raw --direct=1 --rw=read --bs=4096 --iodepth=1 --number_ios=$N | iops)"
echo "kernel-basalt-qd32 \$(basalt-bench --filename=host_device:\$dev --format=raw --direct=1 --rw=randread --bs=4096 --iodepth=32 --number_ios=$N | iops)"
# busybox date has no sub-second format: time dd by /proc/uptime (10 ms steps; dd runs seconds).
t0=\$(cut -d' ' -f1 /proc/uptime)
dd if=\$dev of=/dev/null bs=4096 count=$N iflag=direct 2>/dev/null
t1=\$(cut -d' ' -f1 /proc/uptime)
echo "kernel-dd-qd1 \$(awk -v a=\$t0 -v b=\$t1 'BEGIN { printf "%.0f", $N / (b - a) }')"
EOF

out=$(./scripts/vfio-guest/run --mode "$MODE" --smp 2 --nvme "$dir/ns.img" --bin "$G/basalt-bench" --script "$dir/guest.sh")
num() { awk -v v="$1" 'BEGIN { if (v ~ /k$/) { sub(/k$/, "", v); v *= 1000 } print v + 0 }'; }
get() { num "$(echo "$out" | awk -v k="$1" '$1 == k { print $2 }')"; }
b1=$(get basalt-nvme-qd1); b32=$(get basalt-nvme-qd32)
k1=$(get kernel-basalt-qd1); k32=$(get kernel-basalt-qd32); d1=$(get kernel-dd-qd1)
echo "NVMe in a TCG guest ($MODE mode, $(qemu-system-x86_64 --version | head -1)), $N I/Os per job"
awk -v b1="$b1" -v b32="$b32" -v k1="$k1" -v k32="$k32" -v d1="$d1" 'BEGIN {
    printf "%-38s %10s %10s %8s\n", "job", "basalt", "kernel", "ratio"
    printf "%-38s %10.0f %10.0f %7.2fx\n", "4k seq read QD1 (basalt-bench both)", b1, k1, b1 / k1
    printf "%-38s %10.0f %10.0f %7.2fx\n", "4k seq read QD1 (kernel: busybox dd)", b1, d1, b1 / d1
    printf "%-38s %10.0f %10.0f %7.2fx\n", "4k rand read QD32 (basalt-bench both)", b32, k32, b32 / k32
}'
