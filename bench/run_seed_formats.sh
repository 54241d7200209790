#!/usr/bin/env bash
# run_seed_formats.sh THREADS TYPE...
#
# Decode and prefill of the seed formats on the Qwen3-30B-A3B shape (random weights written by
# moe-bench --synthetic, every matrix in the type), one file at a time (each is deleted after its
# run: the files are 12-17 GB). Types llama.cpp reads (q4_0, mxfp4, nvfp4) run side by side with
# it through run_side_by_side.sh; our own (tq3, tq4, affine3, affine4) run moe-bench only, to be
# read against the q4_0 row of the same invocation.
#   PEER_DIR=... P=64 N=32 R=3 OUT_DIR=... bash bench/run_seed_formats.sh 16 q4_0 tq3 tq4 mxfp4
#   SHAPE=olmoe-1b-7b LAYERS=4 ... (another moe-bench shape, fewer layers: small machines)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
T=${1:?threads}; shift
DIR=${MODEL_DIR:-/tmp}
for q in "$@"; do
    f="$DIR/seed_${q}.gguf"
    case "$q" in
        q4_0|q8_0|mxfp4|nvfp4|q4_k|q6_k|q4_k_m) no_peer= ;;
        *) no_peer=1 ;;  # llama.cpp cannot read our own type ids
    esac
    NO_PEER=$no_peer SYNTH=${SHAPE:-qwen3-30b-a3b}:$q${LAYERS:+:$LAYERS} bash "$ROOT/bench/run_side_by_side.sh" "$f" "$T" || echo "[seed_formats] $q failed" >&2
    rm -f "$f"
done
