#!/usr/bin/env bash
# run_mem_budget.sh MODEL [LIMIT] [BUDGET] [THREADS]
#
# Decode of a model that does not fit in memory: moe_infer's expert store (prediction off and on,
# O_DIRECT, buffered and mapped/madvise reads) and llama.cpp (mmap, no repacking: a repacked copy would not fit) on the same file,
# each inside the same cgroup-v1 memory limit (LIMIT, default 8G; RSS and page cache are both
# charged to it), each after posix_fadvise(DONTNEED) on the file (a cold page cache, no root
# needed for that part). moe_infer gets LoadOptions::mem_budget = BUDGET (default LIMIT - 512M:
# the KV cache, scratch and in-flight reads live beside it). Prints one JSON line per run with the
# cgroup's peak memory (memory.max_usage_in_bytes) added, and the disk's sequential O_DIRECT read
# bandwidth for reference.
#
# Needs root for the cgroup (/sys/fs/cgroup/memory), python3 for posix_fadvise, and the programs
# built by `bench/run_side_by_side.sh --build-only` (BUILD_DIR, default build/bench).
# Environment: P=16 N=16 R=2 (prompt, decoded tokens, repetitions), BUILD_DIR, CG_NAME=moe_budget.
set -euo pipefail
MODEL=${1:?usage: run_mem_budget.sh MODEL [LIMIT] [BUDGET] [THREADS]}
LIMIT=${2:-8G}
THREADS=${4:-$(nproc)}
P=${P:-16} N=${N:-16} R=${R:-2}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
BUILD_DIR=${BUILD_DIR:-$ROOT/build/bench}
to_bytes() { python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(float(s[:-1])*m[s[-1]]) if s[-1] in m else int(s))" "$1"; }
LIMIT_B=$(to_bytes "$LIMIT")
BUDGET_B=$(to_bytes "${3:-$((LIMIT_B - (512 << 20)))}")
CG=/sys/fs/cgroup/memory/${CG_NAME:-moe_budget}
mkdir -p "$CG"
drop() { sync; python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)" "$MODEL"; }
# run NAME CMD...: cold cache, fresh cgroup counters, the command inside the cgroup; one JSON line.
run() {
    local name=$1; shift
    drop
    echo "$LIMIT_B" > "$CG/memory.limit_in_bytes"
    echo 0 > "$CG/memory.max_usage_in_bytes"
    local t0 out; t0=$(date +%s.%N)
    out=$(sh -c 'echo $$ > "$0/cgroup.procs"; exec "$@"' "$CG" "$@" 2>"/tmp/run_mem_budget.$name.err") || { echo "{\"run\": \"$name\", \"error\": \"$(tail -1 /tmp/run_mem_budget.$name.err)\"}"; return; }
    local peak wall; peak=$(cat "$CG/memory.max_usage_in_bytes"); wall=$(python3 -c "import time,sys; print(round(time.time()-float(sys.argv[1]),1))" "$t0")
    echo "{\"run\": \"$name\", \"cgroup_limit_bytes\": $LIMIT_B, \"cgroup_peak_bytes\": $peak, \"wall_s\": $wall, ${out#\{}"
}
drop
disk=$(dd if="$MODEL" of=/dev/null bs=4M count=1024 iflag=direct 2>&1 | tail -1)
echo "{\"disk_sequential_direct_read\": \"$disk\", \"limit\": \"$LIMIT\", \"budget_bytes\": $BUDGET_B, \"threads\": $THREADS}"
COMMON=(-m "$MODEL" -t "$THREADS" -p "$P" -n "$N" -r "$R" --bw 10 --json --random-decode)
run moe_predict_off "$BUILD_DIR/moe-bench" "${COMMON[@]}" --mem-budget "$BUDGET_B"
run moe_predict_on "$BUILD_DIR/moe-bench" "${COMMON[@]}" --mem-budget "$BUDGET_B" --predict 1
run moe_predict_off_buffered "$BUILD_DIR/moe-bench" "${COMMON[@]}" --mem-budget "$BUDGET_B" --buffered-io
run moe_predict_on_buffered "$BUILD_DIR/moe-bench" "${COMMON[@]}" --mem-budget "$BUDGET_B" --predict 1 --buffered-io
run moe_predict_off_mapped "$BUILD_DIR/moe-bench" "${COMMON[@]}" --mem-budget "$BUDGET_B" --expert-reads mapped
run moe_predict_on_mapped "$BUILD_DIR/moe-bench" "${COMMON[@]}" --mem-budget "$BUDGET_B" --predict 1 --expert-reads mapped
run llama_mmap "$BUILD_DIR/llama_bench_peer" "${COMMON[@]}" --no-repack
