#!/usr/bin/env bash
# User-facing behaviour of moe-cli (the issue's defects D1..D8), with the bundled demo model.
# Usage: test_cli.sh MOE_CLI [REPO_ROOT]   (REPO_ROOT defaults to two levels above this script)
# Needs bash, grep, awk, sed; no python. Prints one line per failed check and exits 1 if any failed.
set -u
CLI=${1:?usage: test_cli.sh MOE_CLI [REPO_ROOT]}
ROOT=${2:-$(cd "$(dirname "$0")/../.." && pwd)}
[ -x "$CLI" ] || { echo "FAIL: '$CLI' is not an executable"; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
n_checks=0
n_failed=0

# run ARGS...: runs moe-cli with 2 threads; sets rc, $TMP/out and $TMP/err.
run() {
    "$CLI" -t 2 "$@" </dev/null >"$TMP/out" 2>"$TMP/err"
    rc=$?
}
pass() { n_checks=$((n_checks + 1)); }
fail() {  # fail ID WHAT: prints the failed check with the command's stderr
    n_checks=$((n_checks + 1)); n_failed=$((n_failed + 1))
    echo "FAIL [$1] $2 (exit $rc)"
    awk 'NR <= 6 { print "    stderr: " $0 }' "$TMP/err"
    head -c 300 "$TMP/out" | awk 'NR <= 4 { print "    stdout: " $0 }'
}
# expect_error ID TEXT ARGS...: exit 1, nothing on stdout, stderr one "error: " line containing TEXT.
expect_error() {
    local id=$1 text=$2; shift 2
    run "$@"
    if [ "$rc" != 1 ]; then fail "$id" "moe-cli $* should exit 1"
    elif [ -s "$TMP/out" ]; then fail "$id" "moe-cli $* should print nothing on stdout"
    elif [ "$(wc -l <"$TMP/err")" != 1 ] || ! grep -q '^error: ' "$TMP/err"; then fail "$id" "moe-cli $* should print one 'error: ' line"
    elif ! grep -qF -- "$text" "$TMP/err"; then fail "$id" "moe-cli $*: the error should say: $text"
    else pass; fi
}
# chat_turns FILE: "SEGMENTS REPLIED" of a --chat run's stdout+stderr: one segment per "> " prompt
# (the last one meets EOF), replied = segments with text besides the [...] notices.
chat_turns() {
    awk 'function seg() { if (!open) return; gsub(/\[(context full|this message is too long)[^]]*\]/, "", buf); if (buf ~ /[^ \t]/) replied++ }
         /^> / { seg(); open = 1; segs++; buf = substr($0, 3); next }
         { buf = buf $0 }
         END { seg(); print segs + 0, replied + 0 }' "$1"
}

# ---- D1: every check happens before anything goes to stdout ----
expect_error D1 "cannot create '$TMP/no/such/dir/x.bin'" --logits-out "$TMP/no/such/dir/x.bin" -n 2
expect_error D1 "exceed the context size" -c 16 -n 32
expect_error D1 "exceed the context size" -p "In the beginning God created" -c 8 -n 8
run --logits-out "$TMP/l.bin" -n 2 --temp 0
if [ "$rc" = 0 ] && [ -s "$TMP/l.bin" ] && [ $(( $(wc -c <"$TMP/l.bin") % 24 )) = 0 ]; then pass
else fail D1 "--logits-out FILE -n 2 should write 6 rows of float32 logits"; fi

# ---- D2: an unknown flag is unknown wherever it is ----
expect_error D2 "unknown option --bogus" --bogus
expect_error D2 "unknown option --bogus" -n 2 --bogus
expect_error D2 "unknown option --bogus" --bogus 3
expect_error D2 "missing value for -n" -n

# ---- D3: unreadable prompt files name the path and the reason ----
expect_error D3 "cannot read '$TMP': is a directory" -f "$TMP"
expect_error D3 "cannot read '$TMP/missing.txt': " -f "$TMP/missing.txt"
expect_error D3 "cannot read '$TMP': is a directory" --perplexity "$TMP"
: >"$TMP/empty.txt"
expect_error D3 "'$TMP/empty.txt' is empty" -f "$TMP/empty.txt"

# ---- D4: --tokens lists are parsed strictly ----
expect_error D4 "--tokens needs a comma-separated list of token ids, got ''" --tokens ""
expect_error D4 "--tokens needs a comma-separated list of token ids, got ' '" --tokens " "
expect_error D4 "--tokens: item 2 of '1,,2' is empty" --tokens "1,,2"
expect_error D4 "--tokens: item 2 of '1,' is empty" --tokens "1,"
expect_error D4 "--tokens: 'abc' (item 1 of 'abc') is not a token id" --tokens "abc"
expect_error D4 "--tokens: 99999999 is not a token id of this model" --tokens "1,99999999"
run --tokens "1, 2,3" -n 2 --print-tokens --temp 0
if [ "$rc" = 0 ] && grep -qE '^[0-9]+,[0-9]+$' "$TMP/out"; then pass; else fail D4 "--tokens '1, 2,3' -n 2 --print-tokens should print two ids"; fi

# ---- D5: one prompt source ----
echo "In the beginning" >"$TMP/prompt.txt"
expect_error D5 "-p and -f cannot be used together" -p hi -f "$TMP/prompt.txt"
expect_error D5 "-f and -p cannot be used together" -f "$TMP/prompt.txt" -p hi
expect_error D5 "--tokens and -p cannot be used together" --tokens 1,2 -p hi
expect_error D5 "-f and --tokens cannot be used together" -f "$TMP/prompt.txt" --tokens 1
expect_error D5 "-p and --chat cannot be used together" --chat -p hi

# ---- D6: -c range, training-context warning, KV-cache size ----
expect_error D6 "-c needs an integer in [1, 4194304], got '4194305'" -c 4194305
expect_error D6 "-c needs an integer in [1, 4194304], got '0'" -c 0
run -c 65536 -n 1 --temp 0  # the demo model was trained on 512 positions
if [ "$rc" = 0 ] && grep -qE "^warning: -c 65536 exceeds the model's training context \([0-9]+\); quality degrades past it$" "$TMP/err" &&
   grep -qE '^KV cache: [0-9.]+ [MG]iB' "$TMP/err"; then pass
else fail D6 "-c 65536 should warn about the training context and state the KV-cache size"; fi
run -n 1 --temp 0
if [ "$rc" = 0 ] && ! grep -qE '^(warning|KV cache)' "$TMP/err"; then pass; else fail D6 "the default context should not warn"; fi
# The demo's KV cache at -c 4194304 is 8 * 6 layers * 4194304 * 2 heads * 32 = 12 GiB: refused
# where that exceeds physical memory (checked only there: elsewhere it would allocate it).
mem_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo 2>/dev/null)
if [ -n "$mem_kib" ] && [ "$mem_kib" -lt $((12 * 1024 * 1024)) ]; then
    expect_error D6 "physical memory" -c 4194304
else
    echo "skip [D6] KV cache > physical memory: this machine has more than 12 GiB"
fi

# ---- D7: --chat drops the oldest turns instead of stopping at a full context ----
for i in $(seq 1 12); do echo "tell me about the king number $i"; done >"$TMP/in"
# stdout and stderr in one stream: each "> " prompt is followed by its reply.
"$CLI" -t 2 --chat -c 128 -n 16 --temp 0 <"$TMP/in" >"$TMP/both" 2>&1; rc=$?
read -r segs replied < <(chat_turns "$TMP/both")
cp "$TMP/both" "$TMP/err"; : >"$TMP/out"
if [ "$rc" != 0 ]; then fail D7 "--chat -c 128 -n 16 with 12 messages should exit 0"
elif ! grep -qE '^> \[context full: dropped [0-9]+ oldest turns?\]$' "$TMP/both"; then fail D7 "--chat should print [context full: dropped N oldest turns]"
elif [ "$segs" != 13 ] || [ "$replied" != 12 ]; then fail D7 "--chat: 12 messages should get 12 replies (got $replied in $((segs - 1)) turns)"
else pass; fi
{ echo "hello"; for i in $(seq 1 150); do printf 'word '; done; echo; echo "and again"; } >"$TMP/in"
"$CLI" -t 2 --chat -c 128 -n 16 --temp 0 --system "You are a scribe." <"$TMP/in" >"$TMP/both" 2>&1; rc=$?
read -r segs replied < <(chat_turns "$TMP/both")
cp "$TMP/both" "$TMP/err"; : >"$TMP/out"
if [ "$rc" != 0 ]; then fail D7 "--chat --system with a too long message should exit 0"
elif ! grep -qE 'this message is too long for the context \([0-9]+ tokens, context 128' "$TMP/both"; then fail D7 "--chat should say the message is too long for the context"
elif [ "$segs" != 4 ] || [ "$replied" != 2 ]; then fail D7 "--chat: the messages around a too long one should get replies (got $replied of 2)"
else pass; fi
expect_error D7 "no room for a message" --chat -c 32 -n 64
expect_error D7 "--system needs --chat" --system "be brief"

# ---- D8: -h and README's "## moe-cli" list the same flags ----
run -h
usage_flags=$(grep -oE '^  -[-a-z]+' "$TMP/out" | tr -d ' ' | sort -u)
readme_flags=$(awk '/^## moe-cli/ { on = 1; next } /^## / { on = 0 } on' "$ROOT/README.md" | grep -oE '`-[-a-z]+' | tr -d '`' | sort -u)
if [ "$rc" = 0 ] && grep -q -- '--system TEXT' "$TMP/out" && grep -qF '[1, 4194304]' "$TMP/out"; then pass
else fail D8 "-h should list --system TEXT and the -c range [1, 4194304]"; fi
if [ -z "$readme_flags" ]; then fail D8 "no flags found in $ROOT/README.md section '## moe-cli'"
elif [ "$usage_flags" != "$readme_flags" ]; then
    fail D8 "-h and README '## moe-cli' differ: $(diff <(echo "$usage_flags") <(echo "$readme_flags") | grep '^[<>]' | tr '\n' ' ')"
else pass; fi

# ---- expert statistics and prediction (issue 9) ----
expect_error stats "cannot create '$TMP/no/dir/s.csv'" --expert-stats "$TMP/no/dir/s.csv" -n 2
expect_error stats "--predict needs an integer in [1, 4]" --predict 5
run -p "In the beginning God created" -n 8 --temp 0 --expert-stats "$TMP/s.csv" --predict 2
# Every layer routes each evaluated token to n_expert_used experts: per layer the counts sum to
# tokens x k, and the shares to k (the demo model: 6 layers, 16 experts, top-4).
sums=$(awk -F, 'NR > 1 { c[$1] += $3; s[$1] += $5; n++ } END { for (l in c) printf "%d:%d:%.3f ", l, c[l], s[l]; print n }' "$TMP/s.csv" 2>/dev/null)
if [ "$rc" != 0 ] || ! head -1 "$TMP/s.csv" | grep -qx 'layer,expert,count,weight,share'; then fail stats "--expert-stats FILE should write a CSV"
elif ! echo "$sums" | grep -qE ' 96$' || echo "$sums" | tr ' ' '\n' | grep -E '^[0-9]+:' | grep -vqE ':4\.000$'; then fail stats "--expert-stats: 6 x 16 rows whose shares sum to 4 per layer (got $sums)"
elif ! grep -qE '^expert prediction 1 layer ahead: recall 0\.[0-9]+, precision' "$TMP/err" || ! grep -q '^expert prediction 2 layers ahead' "$TMP/err"; then fail stats "--predict 2 should report recall and precision at depths 1 and 2"
else pass; fi

# ---- expert store (issue 9): every read mode gives the tokens of the fully mapped model ----
expect_error store "--expert-reads: 'bogus' is not direct, buffered or mapped" --mem-budget 64M --expert-reads bogus
expect_error store "--expert-reads and --buffered-io need --mem-budget" --expert-reads mapped
run -p "In the beginning God created" -n 12 --temp 0
cp "$TMP/out" "$TMP/unbudgeted"
for mode in direct buffered mapped; do
    run -p "In the beginning God created" -n 12 --temp 0 --mem-budget 7M --expert-reads $mode --predict 1
    if [ "$rc" != 0 ] || ! cmp -s "$TMP/out" "$TMP/unbudgeted"; then fail store "--mem-budget 7M --expert-reads $mode should print the unbudgeted text"
    elif ! grep -qE "^expert store: .*(reads\)|read)" "$TMP/err" || ! grep -q "expert store: .*hit rate" "$TMP/err"; then fail store "--mem-budget should report the expert store"
    else pass; fi
done

# ---- huge pages: a bad mode refused, every mode prints the same text ----
expect_error pages "--huge-pages needs automatic, map or off, got 'big'" --huge-pages big
for mode in automatic map off; do
    run -p "In the beginning God created" -n 12 --temp 0 --huge-pages $mode
    if [ "$rc" != 0 ] || ! cmp -s "$TMP/out" "$TMP/unbudgeted"; then fail pages "--huge-pages $mode should print the same text"
    else pass; fi
done

# ---- samplers (issue 14): bad values refused before the model loads, a bias the greedy pick follows ----
expect_error sampler "typical_p" --typical 1.5
expect_error sampler "--mirostat needs 0 (off) or 2 (v2)" --mirostat 1
expect_error sampler "--logit-bias needs TOKEN_ID+BIAS" --logit-bias 12x
expect_error sampler "logit_bias token 99999999 is not in the vocabulary" --logit-bias 99999999+1 -n 2
run -p "In the beginning God created" -n 4 --temp 0 --print-tokens
first=$(tr ',' '\n' <"$TMP/out" | head -1)
run -p "In the beginning God created" -n 4 --temp 0 --print-tokens --logit-bias 7+inf
if [ "$rc" != 0 ] || [ "$(tr ',' '\n' <"$TMP/out" | sort -u | tr -d '[:space:]')" != 7 ]; then fail sampler "--logit-bias 7+inf should make greedy decoding pick token 7 every step"
else pass; fi
run -p "In the beginning God created" -n 4 --temp 0 --print-tokens --logit-bias "$first-inf"
if [ "$rc" != 0 ] || [ "$(tr ',' '\n' <"$TMP/out" | head -1)" = "$first" ]; then fail sampler "--logit-bias ID-inf should keep greedy decoding from picking ID"
else pass; fi
run -p "In the beginning God created" -n 16 --seed 5 --dry-multiplier 0.8 --typical 0.95 --top-nsigma 2 --xtc-probability 0.5 --presence-penalty 0.3 --frequency-penalty 0.2
if [ "$rc" != 0 ] || ! grep -q '^decode: ' "$TMP/err"; then fail sampler "the extended sampler chain should generate"
else pass; fi

# ---- chat templates (issue 14): --render-chat against jinja2's renderings, --chat through a Jinja template ----
CHAT="$ROOT/tests/data/chat"
printf '{"messages": [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name a prime number."}], "add_generation_prompt": true}' >"$TMP/sys.json"
for t in qwen2 qwen3 glm-4.5; do
    run --chat-template "$CHAT/$t.jinja" --render-chat "$TMP/sys.json"
    if [ "$rc" != 0 ] || ! cmp -s "$TMP/out" "$CHAT/expected/${t}__system.txt"; then fail chat "--render-chat with $t.jinja should print jinja2's rendering (tests/data/chat/expected/${t}__system.txt)"
    else pass; fi
done
expect_error chat "no chat template" --render-chat "$TMP/sys.json"
expect_error chat "Conversation roles must alternate" --chat-template "$CHAT/mixtral.jinja" --render-chat "$TMP/sys.json"
expect_error chat "--chat-template needs --chat or --render-chat" --chat-template "$CHAT/qwen2.jinja"
printf '[{"role": "user"' >"$TMP/bad.json"
expect_error chat "invalid JSON" --chat-template "$CHAT/qwen2.jinja" --render-chat "$TMP/bad.json"
printf 'Hello there\nWho are you?\n' | "$CLI" -t 2 --chat --chat-template "$CHAT/phi-3.jinja" -n 8 --temp 0 -c 128 >"$TMP/out" 2>&1; rc=$?
if [ "$rc" != 0 ] || [ "$(chat_turns "$TMP/out")" != "3 2" ]; then fail chat "--chat with a Jinja template should answer both messages (got $(chat_turns "$TMP/out"))"
else pass; fi

# ---- the README's main command still works ----
run -n 8 --temp 0
if [ "$rc" = 0 ] && grep -q '^In the beginning' "$TMP/out" && grep -q '^decode: ' "$TMP/err"; then pass
else fail main "moe-cli -n 8 --temp 0 should continue 'In the beginning'"; fi

echo "$n_checks checks, $n_failed failed"
[ "$n_failed" = 0 ]
