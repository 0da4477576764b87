#!/bin/bash
# basalt-nbd against qemu-nbd and nbdkit (file plugin), side by side on the same 1 GiB raw
# image in the page cache, over Unix sockets: nbdcopy out of the export, and fio's nbd engine
# (4 KiB random read and write at QD32, 1 MiB sequential read at QD8). For each run: the
# client's throughput, and the server's CPU time per request (user+system from /proc, the
# figure the servers differ in most). Ratios are qemu-nbd's or nbdkit's over basalt-nbd's.
#
# With TLS=1 every server requires TLS (x509 certificates made here with openssl: the same
# for the three) and nbdcopy connects with an nbds+unix URI; the fio jobs are left out (fio's
# nbd engine cannot pass certificate files: libnbd only reads them from URIs for callers that
# allow local files, which fio does not).
#
#     bench/nbd.sh            # RUNTIME=10 (seconds per fio job), RUNS=1, TLS=0, SHARED=4,
#                             # REACTORS=1 (basalt-nbd's), JOBS=1 (fio jobs, a connection each)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-10}
RUNS=${RUNS:-1}
TLS=${TLS:-0}
# Clients basalt-nbd and qemu-nbd take at once (`-e`). Above 1 they advertise multi-conn, as
# nbdkit's file plugin does by default, and nbdcopy then opens 4 connections to each server.
SHARED=${SHARED:-4}
# basalt-nbd's reactors (`--reactors`), and fio jobs, each with its own connection.
REACTORS=${REACTORS:-1}
JOBS=${JOBS:-1}
for t in qemu-nbd nbdkit nbdcopy fio openssl; do
    command -v $t >/dev/null || { echo "bench/nbd.sh: $t is missing" >&2; exit 1; }
done
cargo build --release -q -p basalt-tools --bins
BASALT_NBD=$PWD/target/release/basalt-nbd

work=$(mktemp -d /tmp/basalt-nbd-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
img=$work/img.raw
head -c 1G /dev/urandom >"$img"
# Written back before the first run (the first server would run under writeback throttling),
# and in the page cache.
sync "$img"
cat "$img" >/dev/null

srv_tls=() kit_tls=()
if [ "$TLS" = 1 ]; then
    pki=$work/pki
    mkdir -p "$pki/server" "$pki/client"
    (
        cd "$pki"
        ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
        openssl req -x509 "${ec[@]}" -keyout ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=bench CA" \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
        for side in server client; do
            openssl req "${ec[@]}" -keyout $side/$side-key.pem -out $side.csr -subj "/CN=localhost" 2>/dev/null
            printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=%sAuth\nbasicConstraints=critical,CA:FALSE\n' $side >ext
            openssl x509 -req -in $side.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
                -extfile ext -out $side/$side-cert.pem 2>/dev/null
            cp ca-cert.pem $side/
        done
    )
    srv_tls=(--object "tls-creds-x509,id=tls0,dir=$pki/server,endpoint=server" --tls-creds tls0)
    kit_tls=(--tls=require "--tls-certificates=$pki/server")
fi

start_server() { # name sock; sets $pid
    case $1 in
    basalt-nbd) "$BASALT_NBD" "${srv_tls[@]}" --reactors="$REACTORS" -t -e "$SHARED" -f raw -k "$2" "$img" >/dev/null 2>&1 & ;;
    qemu-nbd) qemu-nbd "${srv_tls[@]}" -t -e "$SHARED" -f raw -k "$2" "$img" >/dev/null 2>&1 & ;;
    nbdkit) nbdkit "${kit_tls[@]}" -f -U "$2" file "$img" >/dev/null 2>&1 & ;;
    esac
    pid=$!
    for _ in $(seq 200); do [ -S "$2" ] && break; sleep 0.05; done
    sleep 0.5 # the socket file can appear before the server listens
}

cpu_ticks() { # pid -> utime+stime in clock ticks, threads included
    awk '{print $14 + $15}' "/proc/$1/stat"
}

hz=$(getconf CLK_TCK)
printf '| server | case | throughput | server CPU per request |\n| --- | --- | ---: | ---: |\n'
for run in $(seq "$RUNS"); do
    for server in basalt-nbd qemu-nbd nbdkit; do
        sock=$work/$server.sock
        rm -f "$sock"
        start_server $server "$sock"
        uri="nbd+unix:///?socket=$sock"
        [ "$TLS" = 1 ] && uri="nbds+unix:///?socket=$sock&tls-certificates=$pki/client"
        # nbdcopy: the whole export to nowhere, three times (one copy takes under a second,
        # too short to measure alone on a shared machine).
        c0=$(cpu_ticks "$pid")
        t0=$(date +%s.%N)
        for _ in 1 2 3; do nbdcopy "$uri" null:; done
        t1=$(date +%s.%N)
        c1=$(cpu_ticks "$pid")
        awk -v s=$server -v t0=$t0 -v t1=$t1 -v c=$((c1 - c0)) -v hz=$hz 'BEGIN {
            mib = 3 * 1024 / (t1 - t0); reqs = 3 * 1024 * 1024 / 256;
            printf "| %s | nbdcopy to null: | %.0f MiB/s | %.1f us (per 256 KiB) |\n", s, mib, c / hz * 1e6 / reqs }'
        jobs=("randread 4k 32" "randwrite 4k 32" "read 1M 8")
        [ "$TLS" = 1 ] && jobs=()
        for job in "${jobs[@]}"; do
            set -- $job
            c0=$(cpu_ticks "$pid")
            out=$(fio --name=b --ioengine=nbd --uri="$uri" --rw=$1 --bs=$2 --iodepth=$3 --size=1G \
                --numjobs="$JOBS" --group_reporting \
                --runtime="$RUNTIME" --time_based --output-format=json 2>/dev/null | sed -n '/^{/,$p')
            c1=$(cpu_ticks "$pid")
            echo "$out" | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
rw = "write" if "write" in sys.argv[2] else "read"
ios = j[rw]["total_ios"]; iops = j[rw]["iops"]; bw = j[rw]["bw_bytes"] / 2**20
cpu = int(sys.argv[3]) / int(sys.argv[4]) * 1e6 / max(ios, 1)
print("| %s | fio %s %s QD%s | %.0f IOPS, %.0f MiB/s | %.1f us |" % (sys.argv[1], sys.argv[2], sys.argv[5], sys.argv[6], iops, bw, cpu))
' $server $1 $((c1 - c0)) $hz $2 $3
        done
        kill $pid
        wait $pid 2>/dev/null || true
    done
done
