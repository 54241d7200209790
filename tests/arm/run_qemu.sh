#!/usr/bin/env bash
# run_qemu.sh [BUILD_DIR]   (default: build-arm under the repository root)
#
# Tests the AArch64 (NEON, dotprod) kernels on an x86 machine: cross-compiles
# tests/arm/test_arm_kernels.cpp statically with the Debian cross compiler and runs it under
# qemu-user with two CPU models, so both run-time paths are taken:
#   -cpu max          has dotprod (SDOT)   -> detected ISA must be neon_dotprod
#   -cpu cortex-a57   ARMv8.0, no dotprod  -> detected ISA must be neon (qemu raises SIGILL on
#                                             any SDOT there, so nothing leaks past detection)
# plus a -DMOE_NO_NEON build (detected ISA must be scalar) to prove the fallback builds and passes.
# Both builds use -Wall -Wextra -Wpedantic -Werror over the whole header implementation.
# Installs g++-aarch64-linux-gnu and qemu-user with apt-get when missing. Exits non-zero on any
# failure. About a minute on a 2-core machine, plus the install on first use.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/build-arm}
CXX=aarch64-linux-gnu-g++
QEMU=qemu-aarch64

need=()
command -v "$CXX" >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v "$QEMU" >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing: ${need[*]}"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

mkdir -p "$OUT"
FLAGS=(-std=c++17 -O2 -static -Wall -Wextra -Wpedantic -Werror -pthread)
SRC=tests/arm/test_arm_kernels.cpp
echo "== cross-compiling $SRC ($($CXX -dumpfullversion))"
# The two builds in parallel; wait for each so that a failure of either stops the script.
"$CXX" "${FLAGS[@]}" "$SRC" -o "$OUT/test_arm_kernels" & simd_pid=$!
"$CXX" "${FLAGS[@]}" -DMOE_NO_NEON "$SRC" -o "$OUT/test_arm_kernels_no_neon" & scalar_pid=$!
wait "$simd_pid"
wait "$scalar_pid"

failed=0
run() {  # run CPU EXPECTED_ISA BINARY
  echo "== qemu-aarch64 -cpu $1 $(basename "$3") (expect $2)"
  if ! "$QEMU" -cpu "$1" "$3" "$ROOT" --expect-isa "$2"; then
    echo "error: $(basename "$3") failed on -cpu $1" >&2
    failed=1
  fi
}
run max neon_dotprod "$OUT/test_arm_kernels"
run cortex-a57 neon "$OUT/test_arm_kernels"
run max scalar "$OUT/test_arm_kernels_no_neon"

if [ "$failed" != 0 ]; then
  echo "== AArch64 tests FAILED" >&2
  exit 1
fi
echo "== AArch64 tests passed"
