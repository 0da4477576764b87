#!/usr/bin/env bash
# Side-by-side convert benchmark: basalt-img convert vs qemu-img convert, both with their
# defaults and both with -m 16 -W, on a 1 GiB raw image of mixed data (random, repeated bytes,
# zeroes, holes), for raw->qcow2, qcow2->raw and compressed (-c, zlib and zstd). Best of RUNS
# wall times; the ratio is qemu-img's time over basalt-img's.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-2}
cargo build --release -q -p basalt-tools --bin basalt-img
B=$PWD/target/release/basalt-img
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
python3 - <<'PY'
import os, random
random.seed(1)
with open('mixed.raw', 'wb') as f:
    f.truncate(1 << 30)
    for i in range(0, 1 << 30, 1 << 20):
        r = random.random()
        f.seek(i)
        if r < 0.4:
            f.write(os.urandom(1 << 20))
        elif r < 0.6:
            f.write(b'\0' * (1 << 20))
        elif r < 0.8:
            f.write(bytes([random.randrange(256)]) * (1 << 20))
PY
sync
qemu-img convert -q -f raw -O qcow2 mixed.raw src.qcow2
cat mixed.raw src.qcow2 > /dev/null
best() { # best wall time of RUNS runs of the command
    local b=999999
    for _ in $(seq "$RUNS"); do
        rm -f out.*; sync
        local s=$(date +%s.%N); "$@" >/dev/null; local e=$(date +%s.%N)
        b=$(awk -v a="$b" -v x="$(echo "$e - $s" | bc)" 'BEGIN{print (x<a)?x:a}')
    done
    echo "$b"
}
row() {
    local name=$1; shift
    local fmt_args=("$@")
    local tb tq tbw tqw
    tb=$(best "$B" convert "${fmt_args[@]}")
    tq=$(best qemu-img convert "${fmt_args[@]}")
    tbw=$(best "$B" convert -m 16 -W "${fmt_args[@]}")
    tqw=$(best qemu-img convert -m 16 -W "${fmt_args[@]}")
    awk -v n="$name" -v b="$tb" -v q="$tq" -v bw="$tbw" -v qw="$tqw" \
        'BEGIN{printf "%-24s default: basalt %5.2fs qemu %5.2fs (%4.2fx)   -m 16 -W: basalt %5.2fs qemu %5.2fs (%4.2fx)\n", n, b, q, q/b, bw, qw, qw/bw}'
}
echo "basalt-img convert vs qemu-img convert ($(qemu-img --version | head -1)), 1 GiB mixed data, best of $RUNS, $(nproc) cores"
row "raw -> qcow2" -f raw -O qcow2 mixed.raw out.qcow2
row "qcow2 -> raw" -f qcow2 -O raw src.qcow2 out.raw
row "raw -> qcow2 -c (zlib)" -c -f raw -O qcow2 mixed.raw out.qcow2
row "raw -> qcow2 -c (zstd)" -c -o compression_type=zstd -f raw -O qcow2 mixed.raw out.qcow2
