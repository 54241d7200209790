#!/usr/bin/env bash
# run_side_by_side.sh MODEL THREADS
#
# moe_infer.h (bench/moe-bench) and llama.cpp (bench/llama_bench_peer, the prebuilt libllama of
# node-llama-cpp@3.22.1) on the same GGUF with the same threads, back to back, then a comparison:
# prefill and decode tok/s (medians, and the best repetition), the ratio moe/llama, bytes per token,
# achieved GB/s and % of the measured read bandwidth (one denominator for both engines).
#
# Builds what it needs itself (no CMake): moe-bench with plain `g++ -O3` (the library picks its
# SIMD kernels at run time, as users get it) and llama_bench_peer against PEER_DIR.
#
# Environment (all optional):
#   P=64 N=32 R=3        prompt tokens, decoded tokens, repetitions
#   PEER_DIR=build/_peer output of tests/peer/fetch_llama.sh, or a slim copy made with
#                        `bench/run_side_by_side.sh --pack-peer DEST` (headers + libraries, ~30 MB)
#                        If PEER_DIR has no peer.env, fetch_llama.sh is tried (needs npm + internet);
#                        if that fails too, only moe-bench runs.
#   BUILD_DIR=build/bench where the two programs are built
#   OUT_DIR=$BUILD_DIR/results  each run writes OUT_DIR/<model>-t<T>-<time>/{moe.json,llama.json,summary.md,*.log}
#   SYNTH=SHAPE:QUANT[:LAYERS]  if MODEL does not exist, write it first with moe-bench --synthetic
#                        (e.g. SYNTH=qwen3-30b-a3b:q4_0)
#   NO_PEER=1            run moe-bench only (e.g. our own tensor types, which llama.cpp cannot read)
#   LLAMA_FTYPE=N        with SYNTH (QUANT f16): quantize that F16 file with llama.cpp's own
#                        llama_model_quantize (tests/peer/llama_peer --quantize, importance matrix,
#                        all cores) to llama_ftype N, e.g. 23 = IQ3_XXS, 12 = Q3_K_M: the type mixes
#                        of llama-quantize, including the IQ types moe-bench cannot write
#   MOE_ARGS, LLAMA_ARGS extra arguments for moe-bench / llama_bench_peer (e.g. LLAMA_ARGS=--no-repack)
#   BATCH=LIST           also batched decode of B sequences for each B in LIST (e.g. 1,2,4,8,16):
#                        moe-bench --batch (Session::eval_batch) and llama_bench_peer --batch
#                        (n_seq_max = B, one llama_decode per step), aggregate tok/s side by side
#   BW=GBS               skip the bandwidth measurements and use GBS for both (default: each program
#                        probes right before its run; the summary uses the larger probe for both)
#   QUIET_LOAD=X         before each engine, wait (at most QUIET_WAIT=600 s) until the 1-minute load
#                        average is below X (for shared machines)
#   ORDER=moe-first|llama-first   which engine runs first (default moe-first)
#   LLAMA_BENCH=PATH     also run llama.cpp's own llama-bench binary (-o json) if you have one
#   CXX=g++
#
# Other forms:
#   run_side_by_side.sh --pack-peer DEST   copy PEER_DIR's headers and libraries (what this script
#                                          needs, ~30 MB) to DEST, e.g. to carry to another machine
#   run_side_by_side.sh --build-only       build moe-bench and llama_bench_peer, run nothing
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[side_by_side] $*" >&2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
P=${P:-64}
N=${N:-32}
R=${R:-3}
CXX=${CXX:-g++}
PEER_DIR=${PEER_DIR:-$ROOT/build/_peer}
BUILD_DIR=${BUILD_DIR:-$ROOT/build/bench}
OUT_DIR=${OUT_DIR:-$BUILD_DIR/results}
ORDER=${ORDER:-moe-first}
mkdir -p "$BUILD_DIR"
BUILD_DIR=$(cd "$BUILD_DIR" && pwd -P)

# ---- peer paths from peer.env (absolute paths of the machine that fetched it; re-rooted here) ----
PEER_INC= PEER_LIB= PEER_LIBS=()
peer_locate() {
    local env="$PEER_DIR/peer.env"
    [ -f "$env" ] || return 1
    local dir inc lib old
    dir=$(cd "$PEER_DIR" && pwd -P)
    inc=$(sed -n 's/^INCLUDE_DIR=//p' "$env")
    lib=$(sed -n 's/^LIB_DIR=//p' "$env")
    [ -n "$inc" ] && [ -n "$lib" ] || return 1
    old=$(dirname "$inc")                       # DEST at fetch time: prefer the same layout under PEER_DIR
    [ -f "$dir/${inc#"$old"/}/llama.h" ] && inc="$dir/${inc#"$old"/}"
    [ -d "$dir/${lib#"$old"/}" ] && lib="$dir/${lib#"$old"/}"
    [ -f "$inc/llama.h" ] && [ -d "$lib" ] || return 1
    local l g b
    l=$(ls "$lib"/libllama.v*.so 2>/dev/null | head -n 1)
    g=$(ls "$lib"/libggml.v*.so 2>/dev/null | head -n 1)
    b="$lib/libggml-base.so"
    [ -f "$l" ] && [ -f "$g" ] && [ -f "$b" ] || return 1
    PEER_INC=$inc PEER_LIB=$lib PEER_LIBS=("$l" "$g" "$b")
}

if [ "${1:-}" = "--pack-peer" ]; then
    [ $# -eq 2 ] || die "usage: $0 --pack-peer DEST"
    peer_locate || die "no usable peer in PEER_DIR=$PEER_DIR (run tests/peer/fetch_llama.sh $PEER_DIR first)"
    dest=$2
    rel_lib=${PEER_LIB#"$(cd "$PEER_DIR" && pwd -P)"/}
    [ "$rel_lib" != "$PEER_LIB" ] || die "the lib dir $PEER_LIB is not inside PEER_DIR"
    rm -rf "$dest" && mkdir -p "$dest/include" "$dest/$rel_lib"
    cp "$PEER_INC"/*.h "$dest/include/"
    cp "$PEER_LIB"/*.so "$PEER_LIB"/_nlcBuildMetadata.json "$dest/$rel_lib/"
    rm -f "$dest/$rel_lib/libllama-common.so"   # not needed by libllama or by us
    # same layout under DEST; peer_locate re-roots peer.env's absolute paths wherever DEST ends up
    cp "$PEER_DIR/peer.env" "$dest/peer.env"
    log "packed $(du -sh "$dest" | cut -f1) into $dest (carry it and set PEER_DIR=$dest)"
    exit 0
fi

# ---- build -----------------------------------------------------------------------------------
newer() {  # target deps... : true if target is missing or older than any dep
    local t=$1; shift
    [ -f "$t" ] || return 0
    local d
    for d in "$@"; do [ "$d" -nt "$t" ] && return 0; done
    return 1
}
MOE_BENCH=$BUILD_DIR/moe-bench
mapfile -t moe_deps < <(ls "$ROOT/moe_infer.h" "$ROOT"/src/*.inc "$ROOT"/bench/moe-bench.cpp "$ROOT"/bench/membw.h 2>/dev/null)
if newer "$MOE_BENCH" "${moe_deps[@]}"; then
    log "building moe-bench ($CXX -O3, run-time SIMD dispatch)"
    "$CXX" -O3 -std=c++17 -pthread -I"$ROOT" "$ROOT/bench/moe-bench.cpp" -o "$MOE_BENCH.tmp" || die "cannot build moe-bench"
    mv "$MOE_BENCH.tmp" "$MOE_BENCH"
fi

LLAMA_PEER_BIN=$BUILD_DIR/llama_bench_peer
HAVE_LLAMA=0
[ -z "${NO_PEER:-}" ] || PEER_DIR=/nonexistent  # NO_PEER=1: moe-bench only (files llama.cpp cannot read)
if ! peer_locate; then
    if [ -z "${NO_PEER:-}" ] && command -v npm >/dev/null 2>&1; then
        log "no peer in $PEER_DIR: fetching it (tests/peer/fetch_llama.sh)"
        bash "$ROOT/tests/peer/fetch_llama.sh" "$PEER_DIR" >/dev/null || log "fetch failed"
    fi
    peer_locate || log "llama.cpp peer unavailable (PEER_DIR=$PEER_DIR): only moe-bench runs"
fi
if [ -n "$PEER_LIB" ]; then
    stamp="$BUILD_DIR/llama_bench_peer.libdir"
    if newer "$LLAMA_PEER_BIN" "$ROOT/bench/llama_bench_peer.cpp" "$ROOT/bench/membw.h" "$PEER_INC/llama.h" \
       || [ "$(cat "$stamp" 2>/dev/null)" != "$PEER_LIB" ]; then
        log "building llama_bench_peer against $PEER_LIB"
        "$CXX" -O2 -std=c++17 -pthread -I"$ROOT/bench" -isystem "$PEER_INC" \
            -DLLAMA_BENCH_PEER_LIB_DIR="\"$PEER_LIB\"" "$ROOT/bench/llama_bench_peer.cpp" -o "$LLAMA_PEER_BIN.tmp" \
            "${PEER_LIBS[@]}" -Wl,-rpath,"$PEER_LIB" || die "cannot build llama_bench_peer"
        mv "$LLAMA_PEER_BIN.tmp" "$LLAMA_PEER_BIN"
        echo "$PEER_LIB" > "$stamp"
    fi
    HAVE_LLAMA=1
fi
QUANTIZE_BIN=$BUILD_DIR/llama_peer
if [ -n "${LLAMA_FTYPE:-}" ] && [ -n "$PEER_LIB" ] && newer "$QUANTIZE_BIN" "$ROOT/tests/peer/llama_peer.cpp"; then
    log "building llama_peer (for llama_model_quantize) against $PEER_LIB"
    "$CXX" -O2 -std=c++17 -pthread -isystem "$PEER_INC" -DMOE_PEER_LIB_DIR="\"$PEER_LIB\"" \
        "$ROOT/tests/peer/llama_peer.cpp" -o "$QUANTIZE_BIN.tmp" "${PEER_LIBS[@]}" \
        -Wl,-rpath,"$PEER_LIB" || die "cannot build llama_peer"
    mv "$QUANTIZE_BIN.tmp" "$QUANTIZE_BIN"
fi
[ "${1:-}" = "--build-only" ] && { log "built $MOE_BENCH${PEER_LIB:+ and $LLAMA_PEER_BIN}"; exit 0; }

# ---- model -----------------------------------------------------------------------------------
[ $# -eq 2 ] || die "usage: $0 MODEL THREADS   (or --pack-peer DEST, --build-only; see the header of this script)"
MODEL=$1
THREADS=$2
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive integer, got '$THREADS'"
if [ ! -f "$MODEL" ]; then
    [ -n "${SYNTH:-}" ] || die "$MODEL does not exist (set SYNTH=SHAPE:QUANT[:LAYERS] to generate it)"
    IFS=: read -r s_shape s_quant s_layers <<< "$SYNTH"
    mkdir -p "$(dirname "$MODEL")"
    log "generating $MODEL ($SYNTH${LLAMA_FTYPE:+, then llama_ftype $LLAMA_FTYPE})"
    if [ -n "${LLAMA_FTYPE:-}" ]; then
        [ -x "$QUANTIZE_BIN" ] || die "LLAMA_FTYPE needs the llama.cpp peer (PEER_DIR)"
        "$MOE_BENCH" --synthetic "$s_shape" --quant "$s_quant" -o "$MODEL.src.gguf" ${s_layers:+--layers "$s_layers"} || die "cannot generate $MODEL.src.gguf"
        t0=$(date +%s)
        "$QUANTIZE_BIN" --quantize "$MODEL.src.gguf" "$MODEL" "$LLAMA_FTYPE" --imatrix --threads "$(nproc)" || die "llama_model_quantize failed"
        log "llama_model_quantize: $(( $(date +%s) - t0 )) s"
        rm -f "$MODEL.src.gguf"
    else
        "$MOE_BENCH" --synthetic "$s_shape" --quant "$s_quant" -o "$MODEL" ${s_layers:+--layers "$s_layers"} || die "cannot generate $MODEL"
    fi
    # The new file's dirty pages would otherwise be written back during the runs (measured: the
    # read-bandwidth probe halved and llama.cpp's decode fell 5x on a fresh 16-core machine).
    t0=$(date +%s)
    sync
    log "sync: $(( $(date +%s) - t0 )) s"
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
RUN_DIR="$OUT_DIR/$(basename "$MODEL" .gguf)-t$THREADS-$stamp"
mkdir -p "$RUN_DIR"
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$ROOT" status --porcelain -- moe_infer.h src 2>/dev/null | head -c1)
[ -n "$dirty" ] && commit="$commit+dirty"

jnum() { sed -n "s/.*\"$1\": \([-0-9.eE+]*\).*/\1/p" "$2" | head -n 1; }
jstr() { sed -n "s/.*\"$1\": \"\([^\"]*\)\".*/\1/p" "$2" | head -n 1; }

# Each program measures the bandwidth itself right before its model run (unless BW is given); the
# summary divides both engines by the larger of the two probes (on a busy machine a probe can only
# come out too low, never too high).
BW_ARG=()
[ -n "${BW:-}" ] && BW_ARG=(--bw "$BW")
wait_quiet() {  # QUIET_LOAD=X: wait up to QUIET_WAIT s (default 600) for the 1-min load average < X
    [ -n "${QUIET_LOAD:-}" ] || return 0
    local waited=0 limit=${QUIET_WAIT:-600}
    while awk -v l="$(cut -d' ' -f1 /proc/loadavg)" -v q="$QUIET_LOAD" 'BEGIN { exit !(l >= q) }'; do
        [ "$waited" -ge "$limit" ] && { log "load still $(cut -d' ' -f1 /proc/loadavg) after ${limit}s; running anyway"; return 0; }
        sleep 10; waited=$((waited + 10))
    done
}
run_moe() {
    wait_quiet
    log "moe-bench -m $MODEL -t $THREADS -p $P -n $N -r $R ${BW_ARG[*]} ${MOE_ARGS:-} (load $(cut -d' ' -f1 /proc/loadavg))"
    # shellcheck disable=SC2086
    "$MOE_BENCH" -m "$MODEL" -t "$THREADS" -p "$P" -n "$N" -r "$R" --json "${BW_ARG[@]}" ${BATCH:+--batch "$BATCH"} ${MOE_ARGS:-} \
        > "$RUN_DIR/moe.json" 2> "$RUN_DIR/moe.log" || { cat "$RUN_DIR/moe.log" >&2; die "moe-bench failed"; }
}
run_llama() {
    [ "$HAVE_LLAMA" = 1 ] || return 0
    wait_quiet
    log "llama_bench_peer -m $MODEL -t $THREADS -p $P -n $N -r $R ${BW_ARG[*]} ${LLAMA_ARGS:-} (load $(cut -d' ' -f1 /proc/loadavg))"
    # shellcheck disable=SC2086
    "$LLAMA_PEER_BIN" -m "$MODEL" -t "$THREADS" -p "$P" -n "$N" -r "$R" --json "${BW_ARG[@]}" ${BATCH:+--batch "$BATCH"} ${LLAMA_ARGS:-} \
        > "$RUN_DIR/llama.json" 2> "$RUN_DIR/llama.log" || { cat "$RUN_DIR/llama.log" >&2; die "llama_bench_peer failed"; }
}
load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")
t_start=$(date +%s)
if [ "$ORDER" = "llama-first" ]; then run_llama; run_moe; else run_moe; run_llama; fi

LB_PRE="" LB_DEC=""
if [ -n "${LLAMA_BENCH:-}" ]; then
    log "llama-bench -m $MODEL -t $THREADS -p $P -n $N -r $R -o json"
    if "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p "$P" -n "$N" -r "$R" -o json > "$RUN_DIR/llama-bench.json" 2> "$RUN_DIR/llama-bench.log"; then
        # entries in order: pp test then tg test; take each one's avg_ts
        mapfile -t ts < <(sed -n 's/.*"avg_ts": *\([0-9.eE+-]*\).*/\1/p' "$RUN_DIR/llama-bench.json")
        LB_PRE=${ts[0]:-} LB_DEC=${ts[1]:-}
    else
        log "llama-bench failed (see $RUN_DIR/llama-bench.log)"
    fi
fi
load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")

# ---- comparison ------------------------------------------------------------------------------
M=$RUN_DIR/moe.json
L=$RUN_DIR/llama.json
BW_MOE=$(jnum bandwidth_gbs "$M")
BW_LLAMA=$( [ "$HAVE_LLAMA" = 1 ] && jnum bandwidth_gbs "$L" || echo 0)
BWV=$(awk -v a="$BW_MOE" -v b="$BW_LLAMA" 'BEGIN { printf "%.2f", (a > b ? a : b) }')
{
    echo "## $(basename "$MODEL"), $THREADS threads, p=$P n=$N r=$R ($(date -u '+%Y-%m-%d %H:%M UTC'), moe_infer $commit)"
    echo
    echo "machine: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), $(nproc) CPUs," \
         "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM; load average before/after: $load_before / $load_after"
    echo "model: $(jstr arch "$M"), $(jnum n_layer "$M") layers, $(jnum n_expert "$M") experts top-$(jnum n_expert_used "$M")," \
         "$(jstr weights "$M"), $(awk -v b="$(jnum weight_bytes "$M")" 'BEGIN{printf "%.2f GB", b/1e9}') in all"
    if [ -n "${BW:-}" ]; then echo "bandwidth: $BWV GB/s (given with BW); moe_infer kernels: $(jstr isa "$M")"
    else echo "read bandwidth ($THREADS threads, best of 7): $BWV GB/s = max(moe-bench probe $BW_MOE, llama_bench_peer probe $BW_LLAMA); moe_infer kernels: $(jstr isa "$M")"; fi
    [ "$HAVE_LLAMA" = 1 ] && echo "llama.cpp: $(jstr llama_version "$L") ($(jstr cpu_backend "$L")), repack $(sed -n 's/.*"repack": \([a-z]*\).*/\1/p' "$L"), flash attention $(jstr flash_attn "$L")"
    echo
    echo "| engine | prefill tok/s | decode tok/s | bytes/token | decode GB/s | % of $BWV GB/s | best prefill / decode tok/s |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    row() {
        awk -v name="$1" -v pre="$(jnum prefill_tps "$2")" -v dec="$(jnum decode_tps "$2")" -v ab="$(jnum active_bytes_per_token "$2")" \
            -v bp="$(jnum prefill_tps_best "$2")" -v bd="$(jnum decode_tps_best "$2")" -v bw="$BWV" \
            'BEGIN { g = dec * ab / 1e9; printf "| %s | %.2f | %.2f | %.3f GB | %.2f | %.1f%% | %.2f / %.2f |\n", name, pre, dec, ab / 1e9, g, 100 * g / bw, bp, bd }'
    }
    row "moe_infer ($(jstr isa "$M"))" "$M"
    [ "$HAVE_LLAMA" = 1 ] && row "llama.cpp ($(jstr llama_version "$L"))" "$L"
    if [ -n "$LB_DEC" ]; then
        awk -v pre="$LB_PRE" -v dec="$LB_DEC" -v ab="$(jnum active_bytes_per_token "$M")" -v bw="$BWV" \
            'BEGIN { g = dec * ab / 1e9; printf "| llama-bench | %.2f | %.2f | %.3f GB | %.2f | %.1f%% | |\n", pre, dec, ab / 1e9, g, 100 * g / bw }'
    fi
    if [ "$HAVE_LLAMA" = 1 ]; then
        awk -v mp="$(jnum prefill_tps "$M")" -v md="$(jnum decode_tps "$M")" -v lp="$(jnum prefill_tps "$L")" -v ld="$(jnum decode_tps "$L")" \
            'BEGIN { printf "| **ratio moe/llama** | **%.2fx** | **%.2fx** | | | | |\n", (lp > 0 ? mp / lp : 0), (ld > 0 ? md / ld : 0) }'
    fi
    echo
    echo "per-rep decode tok/s: moe $(sed -n 's/.*"decode_tps_all": \(\[[^]]*\]\).*/\1/p' "$M")$( [ "$HAVE_LLAMA" = 1 ] && echo ", llama $(sed -n 's/.*"decode_tps_all": \(\[[^]]*\]\).*/\1/p' "$L")")"
    echo "per-rep prefill tok/s: moe $(sed -n 's/.*"prefill_tps_all": \(\[[^]]*\]\).*/\1/p' "$M")$( [ "$HAVE_LLAMA" = 1 ] && echo ", llama $(sed -n 's/.*"prefill_tps_all": \(\[[^]]*\]\).*/\1/p' "$L")")"
    if [ -n "${BATCH:-}" ]; then
        # "b": B, "aggregate_tps": X pairs of each JSON's "batch" array
        batch_pairs() { grep -o '"b": [0-9]*, "aggregate_tps": [0-9.]*' "$1" 2>/dev/null | sed 's/"b": \([0-9]*\), "aggregate_tps": \([0-9.]*\)/\1 \2/'; }
        echo
        echo "batched decode ($N steps per sequence, medians of $R; tok/s of all sequences together):"
        echo
        echo "| B | moe_infer tok/s | per sequence | vs B=1 | llama.cpp tok/s | ratio moe/llama |"
        echo "|---:|---:|---:|---:|---:|---:|"
        batch_pairs "$M" > "$RUN_DIR/batch_moe.txt"
        if [ "$HAVE_LLAMA" = 1 ]; then batch_pairs "$L" > "$RUN_DIR/batch_llama.txt"; else : > "$RUN_DIR/batch_llama.txt"; fi
        awk 'FILENAME == ARGV[1] { l[$1] = $2; next } { m[$1] = $2; order[++n] = $1 }
             END { one = m[1]; for (i = 1; i <= n; ++i) { b = order[i]; printf "| %d | %.2f | %.2f | %s | %s | %s |\n", b, m[b], m[b] / b,
                   (one > 0 ? sprintf("%.2fx", m[b] / one) : "-"), (b in l ? sprintf("%.2f", l[b]) : "-"), (b in l && l[b] > 0 ? sprintf("**%.2fx**", m[b] / l[b]) : "-") } }' \
            "$RUN_DIR/batch_llama.txt" "$RUN_DIR/batch_moe.txt"
    fi
    echo "wall time: $(( $(date +%s) - t_start )) s; raw results: $RUN_DIR"
} > "$RUN_DIR/summary.md"
cat "$RUN_DIR/summary.md"
