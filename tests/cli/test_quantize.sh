#!/usr/bin/env bash
# moe-quantize on the bundled demo model: every quantized file loads, generates and keeps a sane
# perplexity; sizes follow the bits per weight; --recipe mixed and hotcold, --calib, -t, and the errors.
# Usage: test_quantize.sh BUILD_DIR [REPO_ROOT]
#    or: test_quantize.sh MOE_QUANTIZE MOE_CLI [REPO_ROOT]   (REPO_ROOT defaults to two levels above)
# The calibration text is $MOE_SHARED_DIR/data/kjv.txt (default REPO_ROOT/../shared); without it the
# --calib checks are skipped. Needs bash, grep, awk, cmp; no python. Prints one line per failed
# check and a table of sizes and perplexities; exits 1 if any check failed.
set -u
if [ -d "${1:-}" ]; then
    QUANT=$1/moe-quantize; CLI=$1/moe-cli; ROOT=${2:-}
else
    QUANT=${1:?usage: test_quantize.sh BUILD_DIR [REPO_ROOT] | MOE_QUANTIZE MOE_CLI [REPO_ROOT]}; CLI=${2:?missing MOE_CLI}; ROOT=${3:-}
fi
ROOT=${ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
SHARED=${MOE_SHARED_DIR:-$ROOT/../shared}
MODEL=$ROOT/models/demo-qwen3moe.gguf
KJV=$SHARED/data/kjv.txt
for x in "$QUANT" "$CLI"; do [ -x "$x" ] || { echo "FAIL: '$x' is not an executable"; exit 1; }; done
[ -f "$MODEL" ] || { echo "FAIL: no demo model at $MODEL"; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
n_checks=0
n_failed=0

# quant ARGS... / cli ARGS...: run with 2 threads; set rc, $TMP/out and $TMP/err.
quant() { "$QUANT" "$@" </dev/null >"$TMP/out" 2>"$TMP/err"; rc=$?; }
cli() { "$CLI" -t 2 "$@" </dev/null >"$TMP/out" 2>"$TMP/err"; rc=$?; }
pass() { n_checks=$((n_checks + 1)); }
fail() {  # fail ID WHAT: prints the failed check with the command's stderr
    n_checks=$((n_checks + 1)); n_failed=$((n_failed + 1))
    echo "FAIL [$1] $2 (exit $rc)"
    grep -v '^quantizing: \|^calibrating: ' "$TMP/err" | awk 'NR <= 6 { print "    stderr: " $0 }'
    head -c 300 "$TMP/out" | awk 'NR <= 4 { print "    stdout: " $0 }'
}
size() { wc -c <"$1" | tr -d ' '; }
# ppl FILE: perplexity of the held-out text under model FILE ("" when it cannot be measured).
ppl() {
    [ -n "$HELDOUT" ] || { echo ""; return; }
    "$CLI" -t 2 -m "$1" --perplexity "$HELDOUT" -c 128 </dev/null 2>/dev/null | awk '/^perplexity: / { print $2 }'
}
# check_ppl ID FILE: finite and below 3x the source model's (a broken quantizer lands far above).
check_ppl() {
    local p
    p=$(ppl "$2")
    PPL[$1]=$p
    [ -n "$HELDOUT" ] || return 0
    if [ -z "$p" ] || ! awk -v p="$p" -v r="$REF_PPL" 'BEGIN { exit !(p + 0 > 1 && p + 0 < 3 * r) }'; then
        rc=-; : >"$TMP/out"; : >"$TMP/err"; fail "$1" "perplexity of $2 should be finite and below 3 x $REF_PPL, got '${p}'"
    else pass; fi
}
# generates ID FILE: 16 greedy token ids from "In the beginning".
generates() {
    cli -m "$2" -n 16 --temp 0 --print-tokens -p "In the beginning"
    if [ "$rc" = 0 ] && grep -qE '^[0-9]+(,[0-9]+){15}$' "$TMP/out"; then pass
    else fail "$1" "moe-cli -m $2 -n 16 --print-tokens should print 16 token ids"; fi
}
declare -A PPL

# The held-out text: the bundled one (never trained on), else the end of the KJV.
HELDOUT=$TMP/heldout.txt
if [ -f "$ROOT/tests/data/heldout.txt" ]; then head -n 100 "$ROOT/tests/data/heldout.txt" >"$HELDOUT"
elif [ -f "$KJV" ]; then tail -n 300 "$KJV" | head -n 100 >"$HELDOUT"
else HELDOUT=; echo "skip [ppl] no held-out text: perplexity not checked"; fi
REF_PPL=$(ppl "$MODEL")
if [ -n "$HELDOUT" ] && [ -z "$REF_PPL" ]; then echo "FAIL: no perplexity for the source model $MODEL"; exit 1; fi

# ---- 1. every type: converts, loads, generates, keeps a sane perplexity ----
TYPES="tq3 tq4 nvfp4 mxfp4 affine3 affine4 q4_0 q4_k q8_0"
for t in $TYPES; do
    out=$TMP/$t.gguf
    quant "$MODEL" "$out" "$t" -t 2
    # The summary names the type the matrices got (affine3/4 are the g64 ones).
    name=$(echo "$t" | tr a-z A-Z | sed 's/^AFFINE\([34]\)$/AFFINE\1_G64/')
    if [ "$rc" != 0 ] || [ ! -s "$out" ] || [ -e "$out.tmp" ]; then fail "$t" "moe-quantize $t should write $out (and no .tmp)"; continue
    elif ! grep -qE "^  tensors by type: .*\b$name [0-9]+ " "$TMP/err"; then fail "$t" "the summary should list $name tensors"
    elif ! grep -q '^quantizing: 100%' "$TMP/err"; then fail "$t" "stderr (not a terminal) should show progress lines up to 100%"
    else pass; fi
    generates "$t" "$out"
    check_ppl "$t" "$out"
done

# ---- 2. sizes follow the bits per weight ----
s_tq3=$(size "$TMP/tq3.gguf"); s_q4=$(size "$TMP/q4_0.gguf"); s_q8=$(size "$TMP/q8_0.gguf")
rc=-
if [ "$s_tq3" -lt "$s_q4" ] && [ "$s_q4" -lt "$s_q8" ]; then pass
else fail size "tq3 ($s_tq3) < q4_0 ($s_q4) < q8_0 ($s_q8) bytes"; fi

# ---- threads do not change the bytes ----
quant "$MODEL" "$TMP/tq3_t1.gguf" tq3 -t 1
if [ "$rc" = 0 ] && cmp -s "$TMP/tq3_t1.gguf" "$TMP/tq3.gguf"; then pass; else fail threads "tq3 with -t 1 and -t 2 should be identical"; fi

# ---- 3. --recipe mixed: larger than uniform, still runs ----
quant "$MODEL" "$TMP/tq3_mixed.gguf" tq3 --recipe mixed -t 2
if [ "$rc" != 0 ] || ! grep -qE '^  tensors by type: .*TQ4 [0-9]+ ' "$TMP/err"; then fail mixed "--recipe mixed should give some tensors TQ4"
elif [ "$(size "$TMP/tq3_mixed.gguf")" -le "$s_tq3" ]; then fail mixed "--recipe mixed ($(size "$TMP/tq3_mixed.gguf")) should be larger than uniform tq3 ($s_tq3)"
else pass; fi
generates mixed "$TMP/tq3_mixed.gguf"
check_ppl mixed "$TMP/tq3_mixed.gguf"

# ---- 4. --calib: an importance matrix changes the bytes ----
if [ -f "$KJV" ]; then
    quant "$MODEL" "$TMP/tq3_calib.gguf" tq3 --calib "$KJV" --calib-tokens 2048 --ctx 256 -t 2
    if [ "$rc" != 0 ] || [ ! -s "$TMP/tq3_calib.gguf" ]; then fail calib "--calib should write the file"
    elif ! grep -q '^calibrating: 100% (2048/2048 tokens)' "$TMP/err"; then fail calib "--calib should report the calibration progress to 2048/2048 tokens"
    elif ! grep -qE '^  importance matrix used by [1-9][0-9]* tensors' "$TMP/err"; then fail calib "the importance matrix should reach some tensors"
    elif cmp -s "$TMP/tq3_calib.gguf" "$TMP/tq3.gguf"; then fail calib "--calib should change the tq3 file"
    else pass; fi
    generates calib "$TMP/tq3_calib.gguf"
    check_ppl calib "$TMP/tq3_calib.gguf"

    # ---- 4b. --recipe hotcold: the most-routed experts at tq4 in their own stacks, loads and runs ----
    quant "$MODEL" "$TMP/tq3_hotcold.gguf" tq3 --recipe hotcold:25 --calib "$KJV" --calib-tokens 2048 --ctx 256 -t 2
    s_hc=$(size "$TMP/tq3_hotcold.gguf" 2>/dev/null || echo 0); s_tq4=$(size "$TMP/tq4.gguf")
    if [ "$rc" != 0 ] || ! grep -qE '^  hot experts: [1-9][0-9]* of [1-9][0-9]* \(tq4\), cold: tq3$' "$TMP/err"; then fail hotcold "--recipe hotcold:25 should report its hot (tq4) and cold (tq3) experts"
    elif [ "$s_hc" -le "$s_tq3" ] || [ "$s_hc" -ge "$s_tq4" ]; then fail hotcold "hotcold ($s_hc) should lie between uniform tq3 ($s_tq3) and tq4 ($s_tq4) bytes"
    else pass; fi
    generates hotcold "$TMP/tq3_hotcold.gguf"
    check_ppl hotcold "$TMP/tq3_hotcold.gguf"
    quant "$TMP/tq3_hotcold.gguf" "$TMP/x.gguf" tq3 --recipe hotcold --calib "$KJV" --calib-tokens 256
    if [ "$rc" = 1 ] && grep -q 'already has hot and cold experts' "$TMP/err" && [ ! -e "$TMP/x.gguf" ]; then pass
    else fail hotcold "--recipe hotcold on a hot/cold file should exit 1 and say so"; fi
    quant "$TMP/tq3_hotcold.gguf" "$TMP/hc_q8.gguf" q8_0 -t 2  # uniform keeps the split (and its list)
    generates hotcold_requant "$TMP/hc_q8.gguf"
else
    echo "skip [calib] no calibration text at $KJV"
fi

# ---- 5. errors: exit status, message, nothing left at OUT ----
quant "$MODEL" "$TMP/x.gguf" q9_9
if [ "$rc" = 2 ] && grep -q "unknown type 'q9_9'" "$TMP/err" && grep -q 'tq3' "$TMP/err" && grep -q 'affine4_g128' "$TMP/err" && grep -q 'q4_k' "$TMP/err"; then pass
else fail errors "an unknown TYPE should exit 2 and list the types"; fi
quant "$TMP/missing.gguf" "$TMP/x.gguf" tq3
if [ "$rc" = 1 ] && grep -q "^error: .*$TMP/missing.gguf" "$TMP/err" && [ ! -e "$TMP/x.gguf" ] && [ ! -e "$TMP/x.gguf.tmp" ]; then pass
else fail errors "a missing IN should exit 1 with a message naming it and create no OUT"; fi
quant "$MODEL" "$TMP/x.gguf" tq3 --recipe hotcold
if [ "$rc" = 2 ] && grep -q '^error: --recipe hotcold needs --calib FILE' "$TMP/err" && [ ! -e "$TMP/x.gguf" ]; then pass
else fail errors "--recipe hotcold without --calib should exit 2 saying it needs one"; fi
quant "$MODEL" "$TMP/x.gguf" tq3 --recipe hotcold:0 --calib "$TMP"
if [ "$rc" = 2 ] && grep -q 'percentage P in \[1, 99\]' "$TMP/err" && [ ! -e "$TMP/x.gguf" ]; then pass
else fail errors "--recipe hotcold:0 should exit 2"; fi
quant "$MODEL" "$TMP/no/such/dir/x.gguf" tq3
if [ "$rc" = 1 ] && grep -q "cannot create '$TMP/no/such/dir/x.gguf.tmp'" "$TMP/err" && [ ! -e "$TMP/no" ] && ! ls "$TMP" | grep -q '\.tmp$'; then pass
else fail errors "OUT in a missing directory should exit 1 and leave no .tmp"; fi
echo keep >"$TMP/kept.gguf"
quant "$MODEL" "$TMP/kept.gguf" tq3 --calib "$TMP"  # a failing run keeps an existing OUT
if [ "$rc" = 1 ] && grep -q "cannot read the calibration text '$TMP': is a directory" "$TMP/err" && [ "$(cat "$TMP/kept.gguf")" = keep ] && [ ! -e "$TMP/kept.gguf.tmp" ]; then pass
else fail errors "a failing run should exit 1 and leave an existing OUT as it was"; fi

# ---- the numbers ----
printf '%-8s %10s %10s\n' type bytes perplexity
printf '%-8s %10s %10s\n' source "$(size "$MODEL")" "${REF_PPL:--}"
for t in $TYPES mixed calib hotcold; do
    f=$TMP/$t.gguf; [ "$t" = mixed ] && f=$TMP/tq3_mixed.gguf; [ "$t" = calib ] && f=$TMP/tq3_calib.gguf; [ "$t" = hotcold ] && f=$TMP/tq3_hotcold.gguf
    [ -f "$f" ] && printf '%-8s %10s %10s\n' "$t" "$(size "$f")" "${PPL[$t]:--}"
done

echo "$n_checks checks, $n_failed failed"
[ "$n_failed" = 0 ]
