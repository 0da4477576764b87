#!/usr/bin/env bash
# Side-by-side benchmark: basalt-img bench vs qemu-img bench with the same flags, in one run,
# on the same machine, reporting ops/s and the ratio. Absolute numbers on shared machines are
# noise; the ratio is what we track.
#
#   bench/compare.sh            # build release binaries, run every case 3 times, print ratios
#   RUNS=5 bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
cargo build --release -q -p basalt-tools --bin basalt-img
B=target/release/basalt-img
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
img="$dir/bench.raw"
qemu-img create -q -f raw "$img" 1G
# Fill it with data so reads come from the page cache, not holes.
dd if=/dev/urandom of="$img" bs=1M count=1024 conv=notrunc status=none
cat "$img" > /dev/null

secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }

run_case() {
    local name=$1 count=$2; shift 2
    local best_b=999999 best_q=999999
    for _ in $(seq "$RUNS"); do
        b=$("$B" bench -c "$count" "$@" | secs)
        q=$(qemu-img bench -c "$count" "$@" | secs)
        best_b=$(awk -v a="$best_b" -v b="$b" 'BEGIN{print (b<a)?b:a}')
        best_q=$(awk -v a="$best_q" -v b="$q" 'BEGIN{print (b<a)?b:a}')
    done
    awk -v n="$name" -v c="$count" -v b="$best_b" -v q="$best_q" \
        'BEGIN{printf "%-44s basalt %10.0f ops/s   qemu %10.0f ops/s   ratio %5.2fx\n", n, c/b, c/q, q/b}'
}

echo "basalt-img bench vs qemu-img bench ($(qemu-img --version | head -1)), best of $RUNS, $(nproc) cores"
run_case "null-co read  -d 32 -s 4096"                 2000000 -d 32 -s 4096 -f raw null-co://
run_case "null-co write -d 32 -s 4096"                 2000000 -d 32 -s 4096 -w -f raw null-co://
run_case "raw file read  -d 32 -s 4096 (page cache)"   1000000 -d 32 -s 4096 -t writeback -i io_uring -f raw "$img"
run_case "raw file write -d 32 -s 4096 (page cache)"    300000 -d 32 -s 4096 -t writeback -i io_uring -w -f raw "$img"
run_case "raw file read  -d 32 -s 4096 (threads)"      1000000 -d 32 -s 4096 -t writeback -i threads -f raw "$img"
run_case "raw file read  -d 16 -s 64k  (O_DIRECT)"       20000 -d 16 -s 65536 -t none -i io_uring -f raw "$img"

# qcow2: a fully allocated 1 GiB image (reads and overwrites), and allocating writes to an
# empty one (a fresh image for each tool and run).
qimg="$dir/full.qcow2"
qemu-img convert -q -f raw -O qcow2 "$img" "$qimg"
cat "$qimg" > /dev/null
run_case "qcow2 read  -d 32 -s 4096 (allocated)"         1000000 -d 32 -s 4096 -t writeback -i io_uring -f qcow2 "$qimg"
run_case "qcow2 write -d 32 -s 4096 (allocated)"          300000 -d 32 -s 4096 -t writeback -i io_uring -w -f qcow2 "$qimg"
best_b=999999
best_q=999999
for _ in $(seq "$RUNS"); do
    rm -f "$dir/e.qcow2"; qemu-img create -q -f qcow2 "$dir/e.qcow2" 1G
    b=$("$B" bench -w -c 16384 -d 32 -s 4096 -S 65536 -t writeback -i io_uring -f qcow2 "$dir/e.qcow2" | secs)
    rm -f "$dir/e.qcow2"; qemu-img create -q -f qcow2 "$dir/e.qcow2" 1G
    x=$(qemu-img bench -w -c 16384 -d 32 -s 4096 -S 65536 -t writeback -i io_uring -f qcow2 "$dir/e.qcow2" | secs)
    best_b=$(awk -v a="$best_b" -v b="$b" 'BEGIN{print (b<a)?b:a}')
    best_q=$(awk -v a="$best_q" -v b="$x" 'BEGIN{print (b<a)?b:a}')
done
awk -v b="$best_b" -v q="$best_q" \
    'BEGIN{printf "%-44s basalt %10.0f ops/s   qemu %10.0f ops/s   ratio %5.2fx\n", "qcow2 allocating write -d 32 -S 64k (empty)", 16384/b, 16384/q, q/b}'
