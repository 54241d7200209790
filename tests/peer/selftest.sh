#!/usr/bin/env bash
# selftest.sh LLAMA_PEER TINY_GGUF VOCAB.gguf WORKDIR
# Checks the peer on tiny random Qwen3-MoE models (F32 and Q8_0) written by tiny_gguf:
#   - 64 greedy ids come out; the logits file has (n_prompt + 64) rows of n_vocab float32
#   - same ids and bitwise-same logits with -t 1 and -t 2
#   - feeding prompt ++ first 32 generated ids as one batch continues with the same last 32 ids
set -euo pipefail
peer=$1 tiny=$2 vocab=$3 work=$4
mkdir -p "$work"
fail() { echo "FAIL: $*"; exit 1; }
prompt=1,15043,3186,29892,920,526,366,29973   # 8 ids, valid in any vocab of >= 30000 tokens
n_prompt=8 n=64 passed=0
for ty in f32 q8_0; do
    m="$work/tiny_$ty.gguf"
    "$tiny" "$m" --vocab "$vocab" --type "$ty" --seed 11
    a=$("$peer" -m "$m" --tokens "$prompt" -n $n -t 1 --logits-out "$work/a_$ty.bin")
    b=$("$peer" -m "$m" --tokens "$prompt" -n $n -t 2 --logits-out "$work/b_$ty.bin")
    [ "$(echo "$a" | tr ',' '\n' | grep -c .)" -eq $n ] || fail "$ty: expected $n ids, got '$a'"
    [ "$a" = "$b" ] || fail "$ty: ids differ between -t 1 and -t 2"
    cmp -s "$work/a_$ty.bin" "$work/b_$ty.bin" || fail "$ty: logits differ between -t 1 and -t 2"
    size=$(stat -c %s "$work/a_$ty.bin")
    rows=$((n_prompt + n))
    [ $((size % (rows * 4))) -eq 0 ] || fail "$ty: logits file size $size is not $rows rows of float32"
    head32=$(echo "$a" | cut -d, -f1-32) tail32=$(echo "$a" | cut -d, -f33-64)
    c=$("$peer" -m "$m" --tokens "$prompt,$head32" -n 32)
    [ "$c" = "$tail32" ] || fail "$ty: batched prefix continues differently: '$c' vs '$tail32'"
    echo "ok: $ty (n_vocab $((size / rows / 4)), ids ${a:0:40}...)"
    passed=$((passed + 1))
done
echo "selftest: $passed model types ok"
