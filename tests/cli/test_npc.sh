#!/usr/bin/env bash
# examples/npc: every character speaks, the model never spends more tokens than the frames granted,
# and bad options are refused. Usage: test_npc.sh NPC_BIN
set -u
NPC=${1:?usage: test_npc.sh NPC_BIN}
# Until each character has said two lines (however slow the machine), at most 100000 frames.
out=$("$NPC" --frames 100000 --fps 400 --budget 3 -t 2 --seed 4 --until-lines 2 2>&1); rc=$?
fail=0
[ "$rc" = 0 ] || { echo "FAIL: npc exited $rc"; echo "$out" | tail -5; fail=1; }
summary=$(echo "$out" | grep -E '^frames [0-9]+, tokens ')
[ -n "$summary" ] || { echo "FAIL: no summary line"; fail=1; }
frames=$(echo "$summary" | sed -E 's/^frames ([0-9]+), .*/\1/')
tokens=$(echo "$summary" | sed -E 's/^frames [0-9]+, tokens ([0-9]+) .*/\1/')
[ "${tokens:-0}" -gt 0 ] && [ "${tokens:-0}" -le $(( ${frames:-0} * 3 )) ] || { echo "FAIL: tokens '$tokens' not in (0, $frames frames x 3]"; fail=1; }
for who in Guard Merchant Bard; do
    echo "$out" | grep -qE "^\[frame +[0-9]+\] $who *: .+" || { echo "FAIL: $who never finished a line"; fail=1; }
    echo "$summary" | grep -qE " $who ([2-9]|[1-9][0-9]+)" || { echo "FAIL: summary counts fewer than 2 lines for $who"; fail=1; }
done
"$NPC" --budget 0 >/dev/null 2>&1 && { echo "FAIL: --budget 0 accepted"; fail=1; }
"$NPC" --bogus >/dev/null 2>&1 && { echo "FAIL: unknown option accepted"; fail=1; }
"$NPC" -m /nonexistent.gguf >/dev/null 2>&1 && { echo "FAIL: missing model accepted"; fail=1; }
[ "$fail" = 0 ] && echo "npc: ok ($summary)"
exit $fail
