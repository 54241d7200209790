#!/usr/bin/env bash
# examples/moe-server under a bounded load on loopback (tests/cli/server_load.cpp checks every reply).
# Usage: test_server.sh MOE_SERVER SERVER_LOAD
set -u
SERVER=${1:?usage: test_server.sh MOE_SERVER SERVER_LOAD}
LOAD=${2:?usage: test_server.sh MOE_SERVER SERVER_LOAD}
TMP=$(mktemp -d)
"$SERVER" --port 0 --parallel 3 -c 512 -t 2 --max-tokens 64 --exact >"$TMP/out" 2>"$TMP/err" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$TMP"' EXIT
port=""
for _ in $(seq 1 300); do  # up to 30 s for the model to load
    port=$(sed -nE 's|^moe-server: listening on http://127\.0\.0\.1:([0-9]+) .*|\1|p' "$TMP/out")
    [ -n "$port" ] && break
    kill -0 $pid 2>/dev/null || { echo "FAIL: the server exited"; cat "$TMP/err"; exit 1; }
    sleep 0.1
done
[ -n "$port" ] || { echo "FAIL: the server did not start"; cat "$TMP/err"; exit 1; }
"$LOAD" "$port" 6 4 || exit 1
kill -0 $pid 2>/dev/null || { echo "FAIL: the server died under load"; cat "$TMP/err"; exit 1; }
"$SERVER" --port 0 --bogus >/dev/null 2>&1 && { echo "FAIL: unknown option accepted"; exit 1; }
exit 0
