#!/usr/bin/env bash
# Set up, build, and run the whole test suite (CTest over the Boost.Test executables).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
scripts/build.sh
build=${KEEL_BUILD:-build}
cd "$build"
# No retry: a test that fails is a race in the code or the test (the ownership protocol's races
# are searched by keel-sim's seeded runs, tests/sim_test.cpp).
ctest --output-on-failure -j "$(nproc)"
cd "$root"
# The kernels' tests again under ASan + UBSan (scripts/sanitize.sh, a few minutes);
# KEEL_SANITIZE=0 skips it here.
if [ "${KEEL_SANITIZE:-1}" != 0 ]; then
  scripts/sanitize.sh
fi
# A bounded fuzz run of the Cap'n Proto entry points (docs/wire.md, "Fuzzing"): about two
# minutes with the clang build. fuzz.sh skips itself with a message when clang++ with libFuzzer
# is missing; KEEL_FUZZ_SECONDS=0 skips it here.
fuzz_seconds=${KEEL_FUZZ_SECONDS:-45}
if [ "$fuzz_seconds" -gt 0 ]; then
  scripts/fuzz.sh --seconds "$fuzz_seconds"
fi
